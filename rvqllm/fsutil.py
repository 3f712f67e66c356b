"""Small file-system helpers shared by the atomic writers (checkpoint saves, resumable runs)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk; a no-op where the platform/filesystem cannot (renames stay atomic)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
