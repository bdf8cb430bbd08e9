"""The reference Transformer LM (``gpt``), its corpus and tokenizer (``data``) and the
``fastattn-train`` CLI (``train``). Imported on demand; ``import fastattn`` does not load them."""
