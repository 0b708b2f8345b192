"""Safe extraction of a downloaded zip archive (only the members a source selects), for :mod:`capcli.fetch`.

An archive with an entry that is an absolute path, escapes the target folder, is a link or a special file, or that
declares an absurd uncompressed size, is refused before anything is written. Each member is written under a
temporary name and renamed, so an interrupted extraction leaves no half-written file and resumes.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import shutil
import stat
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from .download import CHUNK, Source, disk_full, free_space, human
from .errors import FetchError
from .progress import NULL, Progress

BOMB_RATIO = 20  # refuse archives declaring more than this many times their size uncompressed ...
BOMB_MARGIN = 64 << 20  # ... plus this margin (small archives of text legitimately compress well)
JUNK = ("__MACOSX/", ".DS_Store")  # macOS resource forks shipped inside the Flickr8k zips


class BadArchive(FetchError):
    """A downloaded archive that cannot be read: it is moved aside, never reused."""


def _unsafe(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry may not be extracted, or None when it is a plain file or folder inside the target."""
    name = info.filename.replace("\\", "/")
    if "\x00" in name:
        return "a NUL byte in its name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "a path that escapes the target folder"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "a special file"
    return None


def _selected(name: str, members: Sequence[str]) -> bool:
    if name.endswith("/") or any(name.startswith(j) or f"/{j}" in name for j in JUNK):
        return False
    base = name.rsplit("/", 1)[-1]
    return not base.startswith("._") and any(fnmatch.fnmatch(base, p) for p in members)


def extract(archive: Path, dest: Path, members: Sequence[str] = ("*",), progress: Progress = NULL) -> int:
    """Extract the members of zip ``archive`` whose base names match ``members`` into ``dest``, safely.

    The whole archive is refused, before anything is written, if any entry is an absolute path, escapes
    ``dest`` (``..``), is a symlink or special file, or if the archive declares an absurd uncompressed size
    (over ``BOMB_RATIO`` x its size + ``BOMB_MARGIN``) or more than the free disk. Each member is written to
    a temporary name and renamed, so no half-written file is ever in place; members already present with
    their declared size are skipped, so an interrupted extraction resumes. Returns the files written.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise BadArchive(f"{archive.name}: not a valid zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        for info in infos:
            why = _unsafe(info)
            if why:
                raise FetchError(f"{archive.name}: refusing to extract: entry {info.filename!r} is {why}")
        declared = sum(i.file_size for i in infos)
        size = archive.stat().st_size
        if declared > BOMB_RATIO * size + BOMB_MARGIN:
            raise FetchError(f"{archive.name}: refusing to extract: it declares {human(declared)} uncompressed from "
                             f"{human(size)} (more than {BOMB_RATIO}x; a zip bomb?)")
        chosen = [i for i in infos if _selected(i.filename.replace("\\", "/"), members)]
        dest.mkdir(parents=True, exist_ok=True)
        todo = [i for i in chosen if not _present(dest / i.filename.replace("\\", "/"), i.file_size)]
        need = sum(i.file_size for i in todo)
        if need > free_space(dest):
            raise FetchError(f"not enough disk space to extract {archive.name} into {dest}: need {human(need)}, "
                             f"{human(free_space(dest))} free")
        progress.start(f"extracting {archive.name}", total=len(chosen), unit="file")
        made: set[Path] = set()
        try:
            progress.advance(len(chosen) - len(todo))
            for info in todo:
                target = dest / info.filename.replace("\\", "/")
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                tmp = target.with_name(f".{target.name}.capcli-part")
                try:
                    with zf.open(info) as fin, tmp.open("wb") as fout:
                        shutil.copyfileobj(fin, fout, CHUNK)
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    tmp.unlink(missing_ok=True)
                    raise BadArchive(f"{archive.name}: corrupt member {info.filename} ({e})") from None
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    if e.errno == errno.ENOSPC:
                        raise disk_full(target, need) from None
                    raise FetchError(f"cannot write {target}: {e.strerror or e}") from None
                except BaseException:  # Ctrl-C: leave no temporary file behind either
                    tmp.unlink(missing_ok=True)
                    raise
                os.replace(tmp, target)
                progress.advance()
        finally:
            progress.done()
    return len(todo)


def _present(path: Path, size: int) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


def install(src: Source, archive: Path, dest: Path, progress: Progress) -> int:
    """Extract an archive, or copy a plain file (``members=()``) into ``dest``. Returns the files written."""
    if src.members:
        return extract(archive, dest, src.members, progress)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{src.file}.capcli-part"
    try:
        shutil.copyfile(archive, tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise disk_full(dest / src.file) from None
        raise FetchError(f"cannot write {dest / src.file}: {e.strerror or e}") from None
    os.replace(tmp, dest / src.file)
    return 1
