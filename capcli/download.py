"""Resumable, verified downloads of one file over HTTP(S) (or ``file://``), for :mod:`capcli.fetch`.

A :class:`Source` names the file, its URL and what it must be (size, sha256/md5). :func:`download` writes it
through ``FILE.part``, resuming with HTTP Range requests and retrying transient failures with back-off, checks it,
and leaves ``FILE.done`` (url, size, sha256) beside it; a file that fails the check is moved aside to ``FILE.bad``.
:func:`mirror_sums` reads a mirror's ``SHA256SUMS``.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__, atomic
from .errors import FetchError
from .progress import NULL, Progress

CHUNK = 1 << 20  # bytes per read/write
USER_AGENT = f"capcli/{__version__} (python-urllib)"


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


def free_space(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def disk_full(path: Path, need: int | None = None) -> FetchError:
    free = free_space(path.parent)
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
        if need > free_space(part.parent):
            raise FetchError(f"not enough disk space for {src.file} in {part.parent}: need {human(need)}, "
                             f"{human(free_space(part.parent))} free")
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
                raise disk_full(part, need) from None
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


def is_downloaded(archive: Path) -> bool:
    """The archive is complete: its ``.done`` marker exists and records its current size."""
    marker = _read_json(archive.with_name(archive.name + ".done"))
    return bool(marker) and archive.is_file() and marker.get("size") == archive.stat().st_size


def adopt(src: Source, archive: Path, progress: Progress) -> None:
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


# ---- mirrors ---------------------------------------------------------------------------------------

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
