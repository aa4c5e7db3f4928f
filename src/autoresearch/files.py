"""Files written so that a reader never sees half of one: through a temporary file beside the
target, renamed over it (results.tsv, report.html, an agent's replies)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str, mode: int | None = 0o644) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file of its own (one per writer, so two
    writers never share one) and a rename; `mode` None keeps the temporary file's 0600. A failed
    write leaves no temporary file."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if mode is not None:
            os.chmod(name, mode)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return path
