"""Where fastattn keeps files it can rebuild: tokenizers and tokens, measured ceilings, tuned
backend tables. Read when asked, never at import."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FASTATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastattn``, else ``~/.cache/fastattn``."""
    if os.environ.get("FASTATTN_CACHE_DIR"):
        return Path(os.environ["FASTATTN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastattn"
