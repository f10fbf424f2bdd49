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


def fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
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


def atomic_write(path: Path, payload: bytes, *, durable: bool = False, prefix: str | None = None) -> None:
    """Writes ``payload`` to ``path`` through a temporary file beside it and a rename: an existing file
    is replaced whole or not at all.

    Args:
        durable: fsync the file before the rename and its directory after it, so that the new
            contents survive a crash of the machine, not only of the process.
        prefix: the temporary file's name prefix (``.<name>.`` by default: hidden; of a name over 200
            bytes, its first 50 characters, at most 200 bytes: the temporary name is 22 bytes longer, and a
            name the file system takes failed as "File name too long" of a temporary file).
    """
    path = Path(path)
    if prefix is None:
        name = path.name if len(os.fsencode(path.name)) <= 200 else path.name[:50]  # UTF-8: <= 4 bytes a character
        prefix = f".{name}."
    fd, tmp = new_temp_file(path.parent, prefix, ".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def make_dirs(path: Path, context: str) -> None:
    """``mkdir -p``; a failure names ``context`` (what was being written) and the file in the way, if a
    file blocks the path (``mkdir`` says only "File exists")."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise NotADirectoryError(f"{context}: {blocking} is a file") from None
        raise type(err)(f"{context}: {err.strerror or err}") from err
