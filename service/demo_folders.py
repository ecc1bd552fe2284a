"""The demo's output folders: complete (a marker written last), or visibly not (a partial flag written first).

Gallery and samples may be volume mount points, which cannot be renamed into place, so the demo publishes them
with this marker protocol instead; a run that crashed leaves the partial flag and is redone by the next one.
The demo's error type lives here too, as the lowest layer every other demo module uses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MARKER = ".demo.json"  # written last: the folder is complete and matches its content
PARTIAL = ".demo-partial"  # written first: the folder is the demo's, being (re)built


class DemoError(RuntimeError):
    """The demo cannot be built at the given paths; the message says what to change."""


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker's content, or None while the folder is incomplete (no marker, or still marked partial)."""
    if (folder / PARTIAL).exists():
        return None
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def claim(folder: Path) -> None:
    """Empty ``folder`` for a rebuild, marked partial first; refuse a non-empty folder the demo did not make."""
    folder.mkdir(parents=True, exist_ok=True)
    children = list(folder.iterdir())
    if children and not ((folder / MARKER).exists() or (folder / PARTIAL).exists()):
        raise DemoError(f"{folder} is not empty and was not made by the demo: remove it or choose another path")
    (folder / PARTIAL).touch()
    (folder / MARKER).unlink(missing_ok=True)  # before any content goes
    for child in children:
        if child.name in (PARTIAL, MARKER):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def mark_complete(folder: Path, content: dict[str, Any]) -> None:
    """Write the marker atomically (temp file, fsync, rename), then drop the partial flag."""
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".demo-", suffix=".tmp", delete=False) as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile makes it 0600
    os.replace(handle.name, folder / MARKER)
    (folder / PARTIAL).unlink(missing_ok=True)
