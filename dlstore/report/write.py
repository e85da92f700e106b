"""Writing a report page where the user asked: the path checked before any work, the page
written through a temporary name (a reader never opens half a page), one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

from dlstore.errors import UsageError


def page_path(path: Path, force: bool = False) -> Path:
    """Where the page goes (an existing directory means report.html in it), refused in one line
    if it cannot be written or exists without `force`."""
    if path.is_dir():
        path = path / "report.html"
    if path.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"cannot write the report to {path}: give a file ending in .html")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write the report to {path}: directory {path.parent} does not "
                         "exist")
    if path.exists() and not force:
        raise UsageError(f"{path} exists; give --force to overwrite it")
    return path


def write_page(text: str, path: Path) -> int:
    """Write `text` to `path` (checked by `page_path`); the bytes written."""
    data = text.encode()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise UsageError(f"cannot write the report to {path}: {e.strerror or e}") from None
    return len(data)
