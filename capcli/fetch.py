"""Download the public captioning datasets from their official hosts, extract them safely, and prepare them.

``fetch("coco", year=2014)`` downloads COCO's train/val image zips and captions annotations (plus Karpathy's
split file when reachable), ``fetch("flickr8k")`` the Flickr8k release most tutorials use; both then run
:func:`capcli.prepare.prepare` so the dataset is ready for ``capcli features``.

Every source is declared once, in :data:`SOURCES` (file name, official URL, expected size, optional
sha256/md5). COCO publishes no checksums, so its archives are checked by size only.

Raw files live under ``paths.raw_dir(NAME)`` (NAME = coco2014, coco2017 or flickr8k)::

    downloads/train2014.zip            the archive (kept unless keep_archives=False)
    downloads/train2014.zip.part       an unfinished download; the next run resumes it with an HTTP Range request
    downloads/train2014.zip.done       JSON marker: url, size and sha256 of the verified archive
    downloads/train2014.zip.extracted  JSON marker: the archive was fully extracted
    downloads/train2014.zip.bad        a download that failed verification, moved aside (never reused)
    train2014/ val2014/ annotations/   the extracted contents (only the members the table selects)
    karpathy/dataset_coco.json         Karpathy's split, when available

A re-run skips every source whose ``.extracted`` marker exists (no network at all), extracts archives that
were downloaded but not extracted, and resumes ``.part`` files. An archive placed by hand in ``downloads/``
is used when its size matches the table; otherwise it is treated as a partial download and resumed.

Mirrors (``mirror=`` / ``--mirror`` / ``$CAPCLI_MIRROR``): a plain HTTP(S) folder that serves every file under
its bare file name, flat: ``MIRROR/train2014.zip``, ``MIRROR/val2014.zip``, ``MIRROR/annotations_trainval2014.zip``,
``MIRROR/caption_datasets.zip`` (optional), ``MIRROR/Flickr8k_Dataset.zip``, ``MIRROR/Flickr8k_text.zip``, and so
on for 2017. Range support is recommended (for resuming) but not required. The files are expected to be
byte-identical to the official ones and are checked against the table's sizes, unless the mirror also serves
``MIRROR/SHA256SUMS`` (the output of ``sha256sum *``): the files it lists are then checked against its hashes
instead, and their sizes are not checked (so a mirror may carry repacked archives). Library callers may also
pass their own table (``sources=``).
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from . import __version__, atomic, paths
from .errors import FetchError, UsageError
from .prepare import PrepareReport
from .progress import NULL, Progress

ENV_MIRROR = "CAPCLI_MIRROR"
CHUNK = 1 << 20  # bytes per read/write
USER_AGENT = f"capcli/{__version__} (python-urllib)"
BOMB_RATIO = 20  # refuse archives declaring more than this many times their size uncompressed ...
BOMB_MARGIN = 64 << 20  # ... plus this margin (small archives of text legitimately compress well)
JUNK = ("__MACOSX/", ".DS_Store")  # macOS resource forks shipped inside the Flickr8k zips
PARTS = ("images", "annotations")

KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


@dataclass(frozen=True)
class Source:
    """One downloadable file.

    ``part`` is ``images``, ``annotations`` or ``splits`` (``--only annotations`` takes annotations and splits).
    ``members`` are file-name globs (matched on the member's base name) of what to extract from a zip;
    ``()`` means the file is not an archive and is copied as is. ``dest`` is the folder under the raw dir
    to extract into. An ``optional`` source that fails is a warning, not an error. ``mirrored=False`` keeps
    the URL even when a mirror is set (a URL the user gave explicitly).
    """

    file: str
    url: str
    part: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    members: tuple[str, ...] = ("*",)
    dest: str = ""
    optional: bool = False
    mirrored: bool = True


_COCO = "http://images.cocodataset.org"

SOURCES: dict[str, tuple[Source, ...]] = {
    "coco2014": (
        Source("annotations_trainval2014.zip", f"{_COCO}/annotations/annotations_trainval2014.zip", "annotations",
               252_872_794, members=("captions_*.json",)),
        Source("caption_datasets.zip", KARPATHY_URL, "splits", members=("dataset_coco.json",), dest="karpathy",
               optional=True),
        Source("val2014.zip", f"{_COCO}/zips/val2014.zip", "images", 6_645_013_297, members=("*.jpg",)),
        Source("train2014.zip", f"{_COCO}/zips/train2014.zip", "images", 13_510_573_713, members=("*.jpg",)),
    ),
    "coco2017": (
        Source("annotations_trainval2017.zip", f"{_COCO}/annotations/annotations_trainval2017.zip", "annotations",
               252_907_541, members=("captions_*.json",)),
        Source("val2017.zip", f"{_COCO}/zips/val2017.zip", "images", 815_585_330, members=("*.jpg",)),
        Source("train2017.zip", f"{_COCO}/zips/train2017.zip", "images", 19_336_861_798, members=("*.jpg",)),
    ),
    "flickr8k": (
        Source("Flickr8k_text.zip", "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
               "annotations", 2_340_801, members=("*.txt",)),
        Source("Flickr8k_Dataset.zip",
               "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
               "images", 1_115_419_746, members=("*.jpg",)),
    ),
}


@dataclass
class FetchResult:
    """What one ``fetch`` did, for the CLI to print."""

    name: str
    raw: Path
    downloaded: list[str] = field(default_factory=list)  # fetched over the network in this run
    extracted: list[str] = field(default_factory=list)  # extracted in this run
    skipped: list[str] = field(default_factory=list)  # already complete from an earlier run
    dataset: Path | None = None  # the prepared dataset folder, when there is one
    report: PrepareReport | None = None  # set when prepare ran in this run
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.downloaded or self.extracted)


# ---- small helpers ---------------------------------------------------------------------------------

def human(n: float | None) -> str:
    """Bytes in decimal units, as download sites show them: 13.5 GB."""
    if n is None:
        return "? B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _disk_full(path: Path, need: int | None = None) -> FetchError:
    free = _free(path.parent)
    what = f" (need {human(need)})" if need else ""
    return FetchError(f"disk full while writing {path}: {human(free)} free{what}; free some space and re-run to resume")


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


class _Transient(Exception):
    """A failure worth retrying (dropped connection, timeout, HTTP 5xx)."""


class _RangeRefused(Exception):
    """HTTP 416: the resume offset is at or past the end; ``total`` is the server's size when it says."""

    def __init__(self, total: int | None) -> None:
        super().__init__(f"HTTP 416 (size {total})")
        self.total = total


class _NotFound(FetchError):
    """HTTP 404 or a missing local file."""


class _BadArchive(FetchError):
    """A downloaded archive that cannot be read: it is moved aside, never reused."""


def _network_error(url: str, err: BaseException) -> Exception:
    """Map a urllib/socket failure to a FetchError (permanent) or _Transient (retry)."""
    reason = err.reason if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError) \
        else err
    if isinstance(reason, socket.gaierror):
        return FetchError(f"cannot resolve {_host(url)}: no network or DNS failure (use --mirror for a reachable copy)")
    if isinstance(reason, ConnectionRefusedError):
        return FetchError(f"cannot connect to {_host(url)}: connection refused (no network, or the server is down)")
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return FetchError(f"cannot reach {_host(url)}: network unreachable (no network?)")
    if isinstance(reason, FileNotFoundError):
        return _NotFound(f"{url}: no such file")
    if isinstance(reason, ssl.SSLCertVerificationError):
        return FetchError(f"{_host(url)}: TLS certificate verification failed ({reason.verify_message})")
    if isinstance(reason, TimeoutError | ConnectionError | http.client.HTTPException | OSError):
        return _Transient(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__)
    return FetchError(f"{url}: {reason}")


def _http_error(url: str, err: urllib.error.HTTPError) -> Exception:
    if err.code in (408, 425, 429) or err.code >= 500:
        return _Transient(f"HTTP {err.code} {err.reason}")
    if err.code == 404:
        return _NotFound(f"{url}: not found (HTTP 404)")
    return FetchError(f"{url}: HTTP {err.code} {err.reason}")


def _open(url: str, headers: dict[str, str], timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    try:
        return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 (http/https/file by design)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416:
            cr = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", e.headers.get("Content-Range") or "")
            raise _RangeRefused(int(cr.group(1)) if cr else None) from None
        raise _http_error(url, e) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _network_error(url, e) from None


# ---- download -------------------------------------------------------------------------------------

class _Hashing:
    """Running digests of the bytes in a ``.part`` file; ``count`` is how many bytes they cover."""

    def __init__(self, algos: Sequence[str]) -> None:
        self.algos = tuple(algos)
        self.reset()

    def reset(self) -> None:
        self.hashers = {a: hashlib.new(a) for a in self.algos}
        self.count = 0

    def update(self, block: bytes) -> None:
        for h in self.hashers.values():
            h.update(block)
        self.count += len(block)

    def load(self, path: Path) -> _Hashing:
        self.reset()
        if path.exists():
            with path.open("rb") as fh:
                while block := fh.read(CHUNK):
                    self.update(block)
        return self

    def digests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self.hashers.items()}


def _algos(src: Source) -> list[str]:
    return ["sha256"] + (["md5"] if src.md5 else [])


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))


def download(
    src: Source,
    dest: Path,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    max_wait: float = 300.0,
    timeout: float = 30.0,
    progress: Progress = NULL,
) -> dict:
    """Download ``src.url`` to ``dest`` through ``dest.part``, resuming it; verify; write ``dest.done``.

    Transient failures (dropped connection, timeout, HTTP 5xx/429) are retried with exponential back-off
    (``backoff``, doubling, at most 60 s), resuming where the file stopped: at most ``retries`` failures in a
    row without new bytes, and at most ``max_wait`` seconds of waiting in all. A size or checksum mismatch
    moves the file aside to ``dest.bad`` and raises. Returns the ``.done`` marker (url, size, sha256).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    sink = _Hashing(_algos(src))
    sink.count = -1  # nothing hashed yet
    failures, waited = 0, 0.0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if src.size is not None and have > src.size:
            part.unlink()
            have = 0
        if sink.count != have:
            if have:
                progress.info(f"{src.file}: resuming at {human(have)}")
            if have:
                sink.load(part)
            else:
                sink.reset()
        try:
            _attempt(src, part, have, sink, timeout, progress)
            break
        except _Transient as e:
            now = part.stat().st_size if part.exists() else 0
            failures = 1 if now > have else failures + 1
            delay = min(backoff * 2 ** (failures - 1), 60.0)
            if failures > retries or waited + delay > max_wait:
                kept = f"; {human(now)} kept in {part.name}, re-run to resume" if now else ""
                raise FetchError(f"{src.file}: download failed from {_host(src.url)} ({e}){kept}") from None
            progress.warn(f"{src.file}: {e}; retry {failures}/{retries} in {delay:.1f} s")
            time.sleep(delay)
            waited += delay
    return _finish(src, dest, part, sink)


def _attempt(src: Source, part: Path, have: int, sink: _Hashing, timeout: float, progress: Progress) -> None:
    """One HTTP request that appends to ``part`` (from ``have``) and feeds ``sink``; _Transient when cut short."""
    try:
        resp = _open(src.url, {"Range": f"bytes={have}-"} if have else {}, timeout)
    except _RangeRefused as e:
        if e.total is not None and e.total == have:
            return  # the .part is already complete (stopped between the last byte and the rename)
        part.unlink(missing_ok=True)
        sink.reset()
        raise _Transient("the server refused to resume; starting over") from None
    with resp:
        status = getattr(resp, "status", None) or 200  # file:// answers have no status
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            cr = _content_range(resp.headers.get("Content-Range"))
            if cr is None or cr[0] != have:
                part.unlink(missing_ok=True)
                sink.reset()
                raise _Transient("the server resumed at the wrong offset; starting over")
            total = cr[1]
            mode = "ab"
        else:
            if have:
                progress.info(f"{src.file}: the server does not resume downloads; starting over")
            sink.reset()
            have, total, mode = 0, length, "wb"
        if src.size is not None and total is not None and total != src.size:
            raise FetchError(f"{src.url}: the server offers {total:,} bytes but {src.file} should be {src.size:,} "
                             "(a different file? check the mirror)")
        need = (total if total is not None else src.size or 0) - have
        if need > _free(part.parent):
            raise FetchError(f"not enough disk space for {src.file} in {part.parent}: need {human(need)}, "
                             f"{human(_free(part.parent))} free")
        expected = length if length is not None else (total - have if total is not None else None)
        got = 0
        progress.start(src.file, total=total, unit="B")
        try:
            if have:
                progress.advance(have)
            with part.open(mode) as fh:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (TimeoutError, OSError, http.client.HTTPException) as e:
                        raise _Transient(f"connection lost after {human(have + got)} ({type(e).__name__})") from None
                    if not block:
                        break
                    fh.write(block)
                    sink.update(block)
                    got += len(block)
                    progress.advance(len(block))
        except OSError as e:  # writing (reading errors are _Transient above)
            if e.errno == errno.ENOSPC:
                raise _disk_full(part, need) from None
            raise FetchError(f"cannot write {part}: {e.strerror or e}") from None
        finally:
            progress.done()
    if expected is not None and got < expected:
        raise _Transient(f"connection closed after {human(have + got)} of {human(have + expected)}")


def _finish(src: Source, dest: Path, part: Path, sink: _Hashing) -> dict:
    """Verify a complete ``.part`` and rename it to ``dest`` with a ``.done`` marker, or move it aside."""
    size = part.stat().st_size if part.exists() else 0
    if sink.count != size:
        sink.load(part)
    digests = sink.digests()
    problem = None
    if src.size is not None and size != src.size:
        problem = f"size mismatch: expected {src.size:,} bytes, got {size:,}"
    for algo in ("sha256", "md5"):
        want = getattr(src, algo)
        if problem is None and want and digests[algo] != want.lower():
            problem = f"checksum mismatch: {algo} expected {want.lower()}, got {digests[algo]}"
    if problem:
        bad = dest.with_name(dest.name + ".bad")
        os.replace(part, bad)
        raise FetchError(f"{src.file}: {problem}; the file was moved aside to {bad}")
    os.replace(part, dest)
    marker = {"file": src.file, "url": src.url, "size": size, "sha256": digests["sha256"],
              "completed": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic.write_json(dest.with_name(dest.name + ".done"), marker)
    return marker


def _downloaded(archive: Path) -> bool:
    """The archive is complete: its ``.done`` marker exists and records its current size."""
    marker = _read_json(archive.with_name(archive.name + ".done"))
    return bool(marker) and archive.is_file() and marker.get("size") == archive.stat().st_size


def _adopt(src: Source, archive: Path, progress: Progress) -> None:
    """A file in downloads/ without a valid marker (a manual download, a changed file): verify it when its
    size is the expected one, else treat it as a partial download to resume."""
    archive.with_name(archive.name + ".done").unlink(missing_ok=True)
    part = archive.with_name(archive.name + ".part")
    size = archive.stat().st_size
    os.replace(archive, part)
    if src.size is not None and size == src.size:
        progress.info(f"{src.file}: found in {archive.parent}, verifying")
        _finish(src, archive, part, _Hashing(_algos(src)).load(part))
    else:
        progress.info(f"{src.file}: found an unverified copy ({human(size)}) in {archive.parent}; resuming it")


# ---- extraction -----------------------------------------------------------------------------------

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
        raise _BadArchive(f"{archive.name}: not a valid zip archive ({e})") from None
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
        if need > _free(dest):
            raise FetchError(f"not enough disk space to extract {archive.name} into {dest}: need {human(need)}, "
                             f"{human(_free(dest))} free")
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
                    raise _BadArchive(f"{archive.name}: corrupt member {info.filename} ({e})") from None
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    if e.errno == errno.ENOSPC:
                        raise _disk_full(target, need) from None
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


def _install(src: Source, archive: Path, dest: Path, progress: Progress) -> int:
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
            raise _disk_full(dest / src.file) from None
        raise FetchError(f"cannot write {dest / src.file}: {e.strerror or e}") from None
    os.replace(tmp, dest / src.file)
    return 1


# ---- mirrors and the Karpathy split -----------------------------------------------------------------

def mirror_sums(mirror: str, timeout: float = 30.0) -> dict[str, str] | None:
    """``MIRROR/SHA256SUMS`` as {file name: sha256}, or None when the mirror has none."""
    url = mirror.rstrip("/") + "/SHA256SUMS"
    try:
        resp = _open(url, {}, timeout)
    except (_NotFound, _Transient, _RangeRefused):
        return None
    with resp:
        text = resp.read(1 << 22).decode("utf-8", "replace")
    sums = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s*([0-9a-fA-F]{64})\s+\*?(.+?)\s*", line)
        if m:
            sums[m.group(2).rsplit("/", 1)[-1]] = m.group(1).lower()
    return sums


def _mirrored(src: Source, mirror: str, sums: dict[str, str] | None) -> Source:
    src = replace(src, url=mirror.rstrip("/") + "/" + urllib.parse.quote(src.file))
    if sums and src.file in sums:
        src = replace(src, sha256=sums[src.file], md5=None, size=None)
    return src


def karpathy_source(where: str | Path) -> Source:
    """A Source for ``--karpathy``: a URL or local path of ``caption_datasets.zip`` or of ``dataset_coco.json``."""
    text = str(where)
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in ("http", "https", "ftp", "file"):
        url = text
        base = urllib.parse.unquote(PurePosixPath(urllib.parse.urlsplit(text).path).name) or "caption_datasets.zip"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FetchError(f"{path}: no such Karpathy split file (give caption_datasets.zip or dataset_coco.json)")
        url, base = path.resolve().as_uri(), path.name
    if base.lower().endswith(".json"):
        return Source("dataset_coco.json", url, "splits", members=(), dest="karpathy", mirrored=False)
    return Source(base, url, "splits", members=("dataset_coco.json",), dest="karpathy", mirrored=False)


def _karpathy_file(raw: Path) -> Path | None:
    folder = raw / "karpathy"
    return next(iter(sorted(folder.rglob("dataset_coco.json"))), None) if folder.is_dir() else None


# ---- the whole job ----------------------------------------------------------------------------------

def dataset_name(dataset: str, year: int = 2014) -> str:
    """``coco`` + year -> ``coco2014``/``coco2017``; ``flickr8k`` stays."""
    key = dataset.strip().lower()
    if key == "coco":
        if year not in (2014, 2017):
            raise UsageError(f"unknown COCO year {year}; use 2014 or 2017")
        key = f"coco{year}"
    if key not in SOURCES:
        raise UsageError(f"unknown dataset {dataset!r}; use coco or flickr8k")
    return key


@dataclass
class _FetchRun:
    """One :func:`fetch` call's settings and findings, shared by the sources it gets."""

    raw: Path
    result: FetchResult
    mirror: str | None
    keep_archives: bool
    retries: int
    backoff: float
    max_wait: float
    timeout: float
    progress: Progress
    _sums: dict[str, str] | None = None
    _sums_read: bool = False

    def sums(self) -> dict[str, str] | None:
        """The mirror's checksums, read once, when the first mirrored file is downloaded."""
        if not self._sums_read:
            self._sums, self._sums_read = mirror_sums(self.mirror, self.timeout), True
        return self._sums

    def get(self, src: Source) -> None:
        """Download (unless already here), verify and extract one source; an optional one that cannot be had
        is noted and marked ``.unavailable`` instead."""
        result, progress = self.result, self.progress
        archive = self.raw / "downloads" / src.file
        extracted = archive.with_name(src.file + ".extracted")
        unavailable = archive.with_name(src.file + ".unavailable")
        if extracted.exists():
            result.skipped.append(src.file)
            return
        if src.optional and unavailable.exists():
            note = f"{src.file} was unavailable on an earlier run; skipped (pass --karpathy URL_OR_PATH to add it)"
            result.notes.append(note)
            return
        if archive.exists() and not _downloaded(archive):
            _adopt(src, archive, progress)
        if not _downloaded(archive):
            if self.mirror and src.mirrored:
                src = _mirrored(src, self.mirror, self.sums())
            try:
                download(src, archive, retries=min(self.retries, 1) if src.optional else self.retries,
                         backoff=self.backoff, max_wait=self.max_wait, timeout=self.timeout, progress=progress)
            except FetchError as e:
                if not src.optional:
                    raise
                atomic.write_json(unavailable, {"url": src.url, "error": str(e)})
                result.notes.append(f"{src.file} unavailable ({e}); continuing without it")
                return
            result.downloaded.append(src.file)
        try:
            count = _install(src, archive, self.raw / src.dest, progress)
        except _BadArchive as e:  # never reuse a broken archive
            os.replace(archive, archive.with_name(src.file + ".bad"))
            archive.with_name(src.file + ".done").unlink(missing_ok=True)
            if not src.optional:
                raise FetchError(f"{e}; moved aside to {src.file}.bad") from None
            atomic.write_json(unavailable, {"url": src.url, "error": str(e)})
            result.notes.append(f"{src.file} unusable ({e}; moved aside to {src.file}.bad); continuing without it")
            return
        atomic.write_json(extracted, {"file": src.file, "dest": str(self.raw / src.dest), "files": count})
        unavailable.unlink(missing_ok=True)
        result.extracted.append(src.file)
        if not self.keep_archives:
            archive.unlink(missing_ok=True)


def fetch(
    dataset: str,
    *,
    year: int = 2014,
    root: str | Path | None = None,
    only: str | None = None,
    mirror: str | None = None,
    karpathy: str | Path | None = None,
    sources: Sequence[Source] | None = None,
    keep_archives: bool = True,
    retries: int = 5,
    backoff: float = 1.0,
    max_wait: float = 300.0,
    timeout: float = 30.0,
    progress: Progress = NULL,
) -> FetchResult:
    """Download, verify and extract ``dataset`` (``coco`` with ``year``, or ``flickr8k``), then prepare it.

    ``only`` (``annotations`` | ``images``) fetches one part; the dataset is prepared only once every
    required part is present. ``mirror`` (default ``$CAPCLI_MIRROR``) replaces the hosts (see the module
    docstring for the layout). ``karpathy`` is a URL or path of Karpathy's split (COCO 2014 only); without
    it the table's copy is tried, and when unavailable COCO falls back to the official train/val split.
    ``sources`` replaces the table for this dataset (tests, private copies with their own checksums).
    """
    from .prepare import prepare

    name = dataset_name(dataset, year)
    if only is not None and only not in PARTS:
        raise UsageError(f"unknown --only {only!r}; use annotations or images")
    table = list(sources if sources is not None else SOURCES[name])
    if karpathy is not None:
        if name != "coco2014":
            raise UsageError("Karpathy's split is defined on COCO 2014 file names; use it with --year 2014")
        table = [s for s in table if s.part != "splits"] + [karpathy_source(karpathy)]
    mirror = mirror or os.environ.get(ENV_MIRROR) or None
    raw = paths.raw_dir(name, root)
    downloads = raw / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    run = _FetchRun(raw, FetchResult(name, raw), mirror, keep_archives, retries, backoff, max_wait, timeout, progress)
    for src in table:
        if only is None or src.part == only or (only == "annotations" and src.part == "splits"):
            run.get(src)
    result = run.result

    if not result.changed:
        progress.info(f"{name}: nothing to download, every file is already here ({raw})")

    missing = [s.file for s in table if not s.optional and not (downloads / (s.file + ".extracted")).exists()]
    out = paths.dataset_dir(name, root)
    if missing:
        result.notes.append(f"not prepared: {', '.join(missing)} not fetched yet (--only {only}); "
                            f"run `capcli fetch {dataset}` without --only to finish")
        return result
    if not result.changed and (out / "dataset.json").is_file():
        result.dataset = out
        return result
    if name.startswith("coco"):
        kfile = _karpathy_file(raw)
        ds, report = prepare(raw, kind="coco", karpathy=kfile, name=name, out=out, progress=progress)
    else:
        ds, report = prepare(raw, kind="flickr8k", name=name, out=out, progress=progress)
    result.dataset, result.report = out, report
    result.notes.extend(report.notes)
    return result
