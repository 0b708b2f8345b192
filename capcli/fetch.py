"""Download the public captioning datasets from their official hosts, extract them safely, and prepare them.

``fetch("coco", year=2014)`` downloads COCO's train/val image zips and captions annotations (plus Karpathy's
split file when reachable), ``fetch("flickr8k")`` the Flickr8k release most tutorials use; both then run
:func:`capcli.prepare.prepare` so the dataset is ready for ``capcli features``.

Every source is declared once, in :data:`SOURCES` (file name, official URL, expected size, optional
sha256/md5). COCO publishes no checksums, so its archives are checked by size only. This module holds the table
and the job; a file's download is :mod:`capcli.download`'s, an archive's extraction :mod:`capcli.archives`'s.

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

import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from . import atomic, paths
from .archives import BadArchive, install
from .download import Source, adopt, download, is_downloaded, mirror_sums
from .errors import FetchError, UsageError
from .prepare import PrepareReport
from .progress import NULL, Progress

ENV_MIRROR = "CAPCLI_MIRROR"
PARTS = ("images", "annotations")

KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


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


# ---- mirrors and the Karpathy split -----------------------------------------------------------------

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
    name = dataset_name(dataset, year)
    if only is not None and only not in PARTS:
        raise UsageError(f"unknown --only {only!r}; use annotations or images")
    table = _table(name, sources, karpathy)
    run = _Run(raw=paths.raw_dir(name, root), mirror=mirror or os.environ.get(ENV_MIRROR) or None,
               keep_archives=keep_archives, retries=retries, backoff=backoff, max_wait=max_wait, timeout=timeout,
               progress=progress)
    run.downloads.mkdir(parents=True, exist_ok=True)
    result = FetchResult(name, run.raw)
    for src in table:
        if _wanted(src, only):
            _fetch_source(src, run, result)
    if not result.changed:
        progress.info(f"{name}: nothing to download, every file is already here ({run.raw})")
    return _prepare_fetched(dataset, only, table, run, result, root)


@dataclass
class _Run:
    """What one ``fetch`` applies to every source; the mirror's SHA256SUMS is read once, when first needed."""

    raw: Path
    mirror: str | None
    keep_archives: bool
    retries: int
    backoff: float
    max_wait: float
    timeout: float
    progress: Progress
    sums: dict[str, str] | None = None
    sums_read: bool = False

    @property
    def downloads(self) -> Path:
        return self.raw / "downloads"

    def located(self, src: Source) -> Source:
        """``src`` as this run downloads it: from the mirror when one is set and the source may be mirrored."""
        if not (self.mirror and src.mirrored):
            return src
        if not self.sums_read:
            self.sums, self.sums_read = mirror_sums(self.mirror, self.timeout), True
        return _mirrored(src, self.mirror, self.sums)


@dataclass(frozen=True)
class _Files:
    """One source's files in downloads/: the archive and its markers (see the module docstring)."""

    archive: Path
    done: Path
    extracted: Path
    unavailable: Path

    @classmethod
    def of(cls, downloads: Path, file: str) -> _Files:
        archive = downloads / file
        return cls(archive, archive.with_name(file + ".done"), archive.with_name(file + ".extracted"),
                   archive.with_name(file + ".unavailable"))


def _table(name: str, sources: Sequence[Source] | None, karpathy: str | Path | None) -> list[Source]:
    """The sources to fetch: ``sources`` or the built-in table, with ``karpathy`` replacing its split source."""
    table = list(sources if sources is not None else SOURCES[name])
    if karpathy is None:
        return table
    if name != "coco2014":
        raise UsageError("Karpathy's split is defined on COCO 2014 file names; use it with --year 2014")
    return [s for s in table if s.part != "splits"] + [karpathy_source(karpathy)]


def _wanted(src: Source, only: str | None) -> bool:
    return only is None or src.part == only or (only == "annotations" and src.part == "splits")


def _fetch_source(src: Source, run: _Run, result: FetchResult) -> None:
    """Bring one source to extracted (skipping what an earlier run finished), recording it in ``result``."""
    files = _Files.of(run.downloads, src.file)
    if files.extracted.exists():
        result.skipped.append(src.file)
        return
    if src.optional and files.unavailable.exists():
        note = f"{src.file} was unavailable on an earlier run; skipped (pass --karpathy URL_OR_PATH to add it)"
        result.notes.append(note)
        return
    if files.archive.exists() and not is_downloaded(files.archive):
        adopt(src, files.archive, run.progress)
    if not is_downloaded(files.archive):
        src = run.located(src)
        if not _download_source(src, files, run, result):
            return
    _install_source(src, files, run, result)


def _download_source(src: Source, files: _Files, run: _Run, result: FetchResult) -> bool:
    """Download ``src``; False when it is optional and failed (noted in ``result``), so there is nothing to install."""
    try:
        download(src, files.archive, retries=min(run.retries, 1) if src.optional else run.retries,
                 backoff=run.backoff, max_wait=run.max_wait, timeout=run.timeout, progress=run.progress)
    except FetchError as e:
        if not src.optional:
            raise
        _unavailable(src, files, e, f"{src.file} unavailable ({e}); continuing without it", result)
        return False
    result.downloaded.append(src.file)
    return True


def _install_source(src: Source, files: _Files, run: _Run, result: FetchResult) -> None:
    """Extract (or copy) a downloaded source and mark it extracted; a broken archive is moved aside to ``.bad``."""
    dest = run.raw / src.dest
    try:
        count = install(src, files.archive, dest, run.progress)
    except BadArchive as e:  # never reuse a broken archive
        os.replace(files.archive, files.archive.with_name(src.file + ".bad"))
        files.done.unlink(missing_ok=True)
        if not src.optional:
            raise FetchError(f"{e}; moved aside to {src.file}.bad") from None
        note = f"{src.file} unusable ({e}; moved aside to {src.file}.bad); continuing without it"
        _unavailable(src, files, e, note, result)
        return
    atomic.write_json(files.extracted, {"file": src.file, "dest": str(dest), "files": count})
    files.unavailable.unlink(missing_ok=True)
    result.extracted.append(src.file)
    if not run.keep_archives:
        files.archive.unlink(missing_ok=True)


def _unavailable(src: Source, files: _Files, error: FetchError, note: str, result: FetchResult) -> None:
    """Mark an optional source unavailable, so later runs skip it without trying the network again."""
    atomic.write_json(files.unavailable, {"url": src.url, "error": str(error)})
    result.notes.append(note)


def _prepare_fetched(
    dataset: str, only: str | None, table: list[Source], run: _Run, result: FetchResult, root: str | Path | None
) -> FetchResult:
    """Prepare the dataset once every required source is extracted, unless nothing changed and it already is."""
    from .prepare import prepare

    name = result.name
    missing = [s.file for s in table if not s.optional and not _Files.of(run.downloads, s.file).extracted.exists()]
    out = paths.dataset_dir(name, root)
    if missing:
        result.notes.append(f"not prepared: {', '.join(missing)} not fetched yet (--only {only}); "
                            f"run `capcli fetch {dataset}` without --only to finish")
        return result
    if not result.changed and (out / "dataset.json").is_file():
        result.dataset = out
        return result
    if name.startswith("coco"):
        kfile = _karpathy_file(run.raw)
        ds, report = prepare(run.raw, kind="coco", karpathy=kfile, name=name, out=out, progress=run.progress)
    else:
        ds, report = prepare(run.raw, kind="flickr8k", name=name, out=out, progress=run.progress)
    result.dataset, result.report = out, report
    result.notes.extend(report.notes)
    return result
