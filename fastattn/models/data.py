"""Training text, its tokenizer and batches, with nothing downloaded.

The default corpus is English that every CPython installation ships: the language reference
topics behind ``help()`` (``pydoc_data.topics``) followed by the docstrings of the standard
library's own source files (read with ``ast``, nothing imported), a few MB in all. A byte-level
BPE tokenizer (the ``tokenizers`` library) is trained on the text locally and, with the encoded
tokens, cached under :func:`cache_dir` keyed by a hash of the text and the vocabulary size.

Batches are a pure function of ``(seed, step)``: every process of a distributed run draws the
same global batch and takes its own rows, so N processes see exactly the rows one process would.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from fastattn._cache import cache_dir

DEFAULT_CORPUS_CHARS = 4_000_000
VAL_FRACTION = 0.1


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [doc for doc in map(ast.get_docstring, nodes) if doc and len(doc) > 80]


def default_corpus(max_chars: int = DEFAULT_CORPUS_CHARS) -> str:
    """The embedded English corpus (deterministic for a given Python installation)."""
    from pydoc_data.topics import topics

    parts = [topics[key] for key in sorted(topics)]
    size = sum(map(len, parts))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if size >= max_chars:
            break
        if path.name.startswith("test") or "test" in path.parent.name \
                or path.parent.name in ("site-packages", "dist-packages"):
            continue  # tests are not prose; installed packages differ between machines
        for doc in _docstrings(path):
            parts.append(doc)
            size += len(doc)
    return "\n\n".join(parts)[:max_chars]


def load_text(path: str | os.PathLike | None) -> str:
    """The text of ``path`` (UTF-8), or the default corpus when ``path`` is None."""
    if path is None:
        return default_corpus()
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--data {path} holds no text")
    return text


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("training needs the `tokenizers` library: "
                          "pip install 'fastattn[train]' (or pip install tokenizers)") from e
    return tokenizers


def _cache_key(text: str) -> str:
    """The name under which the tokenizer and tokens of ``text`` are cached."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_tokenizer(text: str, vocab_size: int, key: str | None = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries trained on ``text``,
    cached on disk (``key``: :func:`_cache_key` of ``text``, computed when not given).
    Byte-level means any later text encodes without unknown tokens."""
    tk = _tokenizers()
    key = key or _cache_key(text)
    path = cache_dir() / f"tokenizer-{key}-{vocab_size}.json"
    if path.exists():
        return tk.Tokenizer.from_file(str(path))
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    chunks = text.split("\n\n")
    tokenizer.train_from_iterator(chunks, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tokenizer.save(str(tmp))
    tmp.replace(path)  # atomic: concurrent processes never read half a file
    return tokenizer


def encode(tokenizer, text: str) -> torch.Tensor:
    """``text`` as a 1-d int64 tensor of token ids (paragraph by paragraph, in parallel)."""
    chunks = [c + "\n\n" for c in text.split("\n\n")]
    ids = [i for enc in tokenizer.encode_batch(chunks) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.int64)


@dataclass
class TokenData:
    """Token ids split into train and validation parts, and the tokenizer that made them."""

    train: torch.Tensor
    val: torch.Tensor
    tokenizer: object

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def batch(self, step: int, seed: int, batch_size: int, block_size: int, rank: int = 0,
              world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the global training batch of ``step``: inputs and targets
        (batch_size // world, block_size), targets shifted by one token."""
        if len(self.train) <= block_size + 1:
            raise ValueError(f"the training split has {len(self.train)} tokens, fewer than "
                             f"block_size + 2 = {block_size + 2}; use more text or a smaller "
                             "--block-size")
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - block_size - 1, (batch_size,), generator=g)
        per_rank = batch_size // world
        starts = starts[rank * per_rank:(rank + 1) * per_rank]
        return _windows(self.train, starts, block_size)

    def val_batches(self, batches: int, batch_size: int, block_size: int, rank: int = 0,
                    world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's rows of ``batches`` fixed global validation batches of ``batch_size``
        evenly spaced windows: the same windows every call and for any number of processes."""
        usable = len(self.val) - block_size - 1
        if usable <= 0:
            raise ValueError(f"the validation split has {len(self.val)} tokens, fewer than "
                             f"block_size + 2 = {block_size + 2}")
        starts = torch.linspace(0, usable, batches * batch_size).long().view(batches, batch_size)
        per_rank = batch_size // world
        return [_windows(self.val, row[rank * per_rank:(rank + 1) * per_rank], block_size)
                for row in starts]


def _windows(ids: torch.Tensor, starts: torch.Tensor, block_size: int):
    offsets = starts[:, None] + torch.arange(block_size + 1)  # (B, T + 1)
    rows = ids[offsets]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T) each


def prepare(path: str | os.PathLike | None, vocab_size: int) -> TokenData:
    """Load, tokenize (cached) and split the text: the last 10% is the validation split."""
    text = load_text(path)
    key = _cache_key(text)
    tokenizer = train_tokenizer(text, vocab_size, key)
    ids_path = cache_dir() / f"tokens-{key}-{vocab_size}.pt"
    if ids_path.exists():
        ids = torch.load(ids_path)
    else:
        ids = encode(tokenizer, text)
        tmp = ids_path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(ids, tmp)
        tmp.replace(ids_path)
    split = int(len(ids) * (1 - VAL_FRACTION))
    return TokenData(ids[:split], ids[split:], tokenizer)
