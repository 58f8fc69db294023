"""Writes that survive a crash or a power cut: fsync of files and folders, and atomic replacement of a file.
Shared by the record stores (:mod:`infigw.records`) and the merge output (:mod:`infigw.merge`)."""
import os
import secrets
from pathlib import Path
from typing import Optional


def fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
    """Make the entries of a folder (new names, renames) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path, data: bytes, tmp_name: Optional[str] = None) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one (written to
    ``tmp_name``, default a unique hidden name, fsynced, then renamed)."""
    path = Path(path)
    tmp = path.with_name(tmp_name or f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
