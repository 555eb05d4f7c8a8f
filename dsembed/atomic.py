"""Files that are either whole or absent: written to a temporary name beside them, then renamed.

A kill during the write leaves the old file (or none) and a hidden temporary file, never a half
file that a resume, a study or a reader would take as finished.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `.<name>.tmp-<pid>` in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
