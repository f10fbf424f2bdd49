"""Temporary files and directories for atomic writes, made with the permissions the umask gives.

``tempfile.mkstemp`` and ``mkdtemp`` create ``0600`` files and ``0700`` directories, and those modes
survive the ``os.replace`` that publishes them: a snapshot or report written that way is unreadable
to the other users of a shared machine (or a TensorBoard server running as another user) whatever
their umask. These make the same unique names next to the target with ``os.open``/``mkdir``, which
apply the umask to ``0666``/``0777`` like any other file the process writes.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def new_temp_file(parent: Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """An open (write-only, binary) descriptor and path of a new file in ``parent``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        path = Path(parent) / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue


def new_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, empty directory in ``parent``."""
    while True:
        path = Path(parent) / f"{prefix}{secrets.token_hex(8)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
