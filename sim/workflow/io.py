"""Atomic file writes: a reader (or a restarted sweep) never sees half a file."""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file.

    ``os.replace`` within one filesystem is atomic on POSIX and Windows; the temporary name starts with a dot
    so readers globbing for results ignore it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _new_temporary(path: Path) -> str:
    """A new empty hidden file beside ``path`` with the permissions of any new file (0666 less the umask: 0644
    under the usual umask 022, so the group can read results; ``tempfile.mkstemp`` would make it 0600)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def write_text_atomically(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomically(path, write)
