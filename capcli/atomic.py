"""Atomic file writes: the one way capcli replaces a file, so a crash never leaves a half-written one.

Write to a temporary name in the same folder, then ``os.replace`` it onto the real name (atomic on POSIX
and Windows); on failure the temporary file is removed and the old file, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` when the block ends without error.

    A symbolic link is followed: its target is replaced, the link stays.
    ``durable``: the new file's bytes reach the disk before it replaces ``path``, and the folder's new entry after
    (a power cut leaves the old file or the new one, never an empty one: what writing into a person's photos needs).
    The temporary name always fits the file system (:func:`temp_name`); a ``path`` whose own name does not fails
    at once with ``ENAMETOOLONG``, saying how long it is and what the limit is.
    """
    path = Path(path)
    if os.path.islink(path):  # write the file the link points to and keep the link (os.replace would replace it)
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)  # a file where a folder should be: FileExistsError
    limit = check_name(path)
    if path.is_dir():  # an OSError, as the callers that write one file of many expect (it fails that one)
        raise IsADirectoryError(errno.EISDIR, "it is a folder, not a file", str(path))
    tmp = path.with_name(temp_name(path.name, limit))
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            with contextlib.suppress(OSError):  # not every platform or filesystem can fsync a folder
                _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def check_name(path: str | Path) -> int:
    """Raise ``OSError(ENAMETOOLONG)`` saying how long ``path``'s name is if its folder's file system cannot hold it
    (before any work is done, rather than at the end); else return that file system's limit (:func:`name_max`)."""
    path = Path(path)
    limit, size = name_max(path.parent), len(os.fsencode(path.name))
    if size > limit:
        raise OSError(errno.ENAMETOOLONG, f"File name too long ({size} bytes; at most {limit} here)", str(path))
    return limit


def name_max(folder: str | Path) -> int:
    """The longest file name, in bytes, that ``folder``'s file system takes (255 where it cannot say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or the folder is gone
        return 255


def temp_name(name: str, limit: int = 255) -> str:
    """The temporary name for writing ``name``: ``.NAME.tmpPID.EXT``, unique to this process and this name.

    It keeps the extension (some writers choose the format by it). When that is longer than ``limit`` bytes
    (a long name, most often in a script of 3-byte UTF-8 characters), the middle is the start of ``name``, cut at a
    character, and 12 hex digits of its SHA-256: ``.NAME-START~1a2b3c4d5e6f.tmpPID.EXT``. The extension goes too
    when it alone leaves no room.
    """
    suffix = Path(name).suffix
    full = f".{name}.tmp{os.getpid()}{suffix}"
    if len(os.fsencode(full)) <= limit:
        return full
    tag = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    end = f".tmp{os.getpid()}{suffix}"
    if len(os.fsencode(f".{tag}{end}")) > limit:
        end = f".tmp{os.getpid()}"
    room = limit - len(os.fsencode(f".{tag}{end}"))
    start = name
    while len(os.fsencode(start)) > room:  # whole characters only (an undecodable byte is one character)
        start = start[:-1]
    return f".{start}{tag}{end}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_bytes(doc: Any, indent: int | None = 1) -> bytes:
    """``doc`` as UTF-8 JSON (non-ASCII kept as is), ending in a newline.

    A lone surrogate (a file-name byte that is not UTF-8, as ``os.fsdecode`` holds it) is written as its JSON
    escape ``\\udcNN``: still valid JSON and UTF-8, and ``json.loads`` gives the same string back.
    """
    return (json.dumps(doc, ensure_ascii=False, indent=indent) + "\n").encode("utf-8", "backslashreplace")


def write_json(path: str | Path, doc: Any, indent: int | None = 1) -> Path:
    """Atomically write ``doc`` as JSON (:func:`json_bytes`) to ``path``."""
    return write_bytes(path, json_bytes(doc, indent))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
