"""Walking a folder of photos (``capcli caption`` and its publishing step): which entries are photos, and what is
left out and why, so that nothing is skipped silently.

- An entry with a photo's extension is taken whatever it is: a regular file or a symbolic link to one is read; a
  broken link, a link loop, a named pipe, a socket or a device fails when read, with its reason, and is never
  read from (:func:`capcli.images.open_photo`).
- Other entries are left out, each with a label: its extension for a file (``.mov``), else what it is
  (``broken link``, ``named pipe``, ``unreadable folder``, ...).
- Hidden entries (names starting with a dot: ``.DS_Store``, ``.thumbnails/``, ``.git/``) are neither taken nor
  walked into, only counted; capcli's own record of the ``.txt`` sidecars it wrote is not even counted. (A
  hidden file or folder named by the caller is a root, taken as any other.)
- Subfolders are walked with ``recursive``, else counted. Symbolic links to folders are followed, each folder
  walked at most once (by device and inode): a link back up (a loop) or to a folder walked already is counted
  instead. The real subfolders of a walk come before the links in it, so a photo with a real path inside the
  root is recorded under that path.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .images import is_image_file
from .metadata import TXT_RECORD

# What an entry that is not a file or folder is, for the count of what was left out.
_KINDS = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"),
          (stat.S_ISBLK, "device"))


@dataclass(frozen=True)
class InputFile:
    path: Path  # where to read it
    key: str  # the record's "path": relative to the folder given ("/" between folders), or a file's name


@dataclass
class LeftOut:
    """What walks left out, each entry once however often it was reached (a folder given twice)."""

    others: list[tuple[Path, str]] = field(default_factory=list)  # (entry, label: ".mov", "broken link", ...)
    hidden: list[tuple[Path, bool]] = field(default_factory=list)  # (entry, whether it is a folder)
    subfolders: list[Path] = field(default_factory=list)  # not walked: no ``recursive``
    walked_already: list[Path] = field(default_factory=list)  # links to a folder walked already (a loop, ...)
    _seen: set[str] = field(default_factory=set, repr=False)
    _real: dict[Path, str] = field(default_factory=dict, repr=False)  # folder -> its real path, once per folder

    def first_time(self, path: Path) -> bool:
        """Whether ``path`` (an entry of a folder walked) is reached for the first time."""
        folder = self._real.get(path.parent)
        if folder is None:
            folder = self._real[path.parent] = os.path.realpath(path.parent)
        where = os.path.join(folder, path.name)
        if where in self._seen:
            return False
        self._seen.add(where)
        return True


def _stat(path: Path) -> tuple[os.stat_result | None, str]:
    """``path``'s stat (through links), or None and why not ("broken link", "link loop", "unreadable")."""
    try:
        return os.stat(path), ""
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "link loop"
        return None, "broken link" if e.errno == errno.ENOENT and path.is_symlink() else "unreadable"


def _label(path: Path, st: os.stat_result | None, why: str) -> str:
    """How a left-out entry is counted: a file by its extension, anything else by what it is."""
    if st is None:
        return why
    if stat.S_ISREG(st.st_mode):
        return path.suffix.lower() or "(no extension)"
    return next((name for test, name in _KINDS if test(st.st_mode)), "not a file")


def walk_folder(root: Path, recursive: bool, left_out: LeftOut) -> list[InputFile]:
    """The photos in folder ``root`` (and its subfolders with ``recursive``), sorted by key; the rest is added
    to ``left_out``."""
    st = os.stat(root)
    walked = {(st.st_dev, st.st_ino)}
    todo: deque[tuple[Path, str]] = deque([(root, "")])
    links: deque[tuple[Path, str]] = deque()  # symlinked folders, walked after the real ones
    found: list[InputFile] = []
    while todo or links:
        if not todo:
            link, key = links.popleft()
            st, _ = _stat(link)
            if st is None or (st.st_dev, st.st_ino) in walked:
                if left_out.first_time(link):
                    left_out.walked_already.append(link)
                continue
            walked.add((st.st_dev, st.st_ino))
            todo.append((link, key))
            continue
        folder, prefix = todo.popleft()
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it)
        except OSError:
            if left_out.first_time(folder):
                left_out.others.append((folder, "unreadable folder"))
            continue
        for name in names:
            path, key = folder / name, prefix + name
            st, why = _stat(path)
            is_dir = st is not None and stat.S_ISDIR(st.st_mode)
            if name == TXT_RECORD:
                continue  # capcli's own file, beside the .txt sidecars it wrote
            if name.startswith("."):
                if left_out.first_time(path):
                    left_out.hidden.append((path, is_dir))
            elif is_dir and not recursive:
                if left_out.first_time(path):
                    left_out.subfolders.append(path)
            elif is_dir and path.is_symlink():
                links.append((path, key + "/"))
            elif is_dir:
                if (st.st_dev, st.st_ino) not in walked:  # always new, but for a bind mount of a folder above
                    walked.add((st.st_dev, st.st_ino))
                    todo.append((path, key + "/"))
                elif left_out.first_time(path):
                    left_out.walked_already.append(path)
            elif is_image_file(path):
                found.append(InputFile(path, key))
            elif left_out.first_time(path):
                left_out.others.append((path, _label(path, st, why)))
    return sorted(found, key=lambda f: f.key)
