"""Small file system helpers shared by storage and the users file."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` durable (new, renamed, removed
    names): the file's own fsync does not cover its directory entry."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
