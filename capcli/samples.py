"""The photos of a caption job as a stream of samples, whatever holds them: folders and files, webdataset tar
shards, parquet or CSV tables; local paths or ``s3://`` (through :mod:`pyarrow.fs`, so S3 credentials are found as
pyarrow finds them: ``AWS_*`` variables, ``~/.aws``, an instance role; ``AWS_ENDPOINT_URL`` for a compatible server).

A job is a list of :class:`Unit` (one tar shard, one table, or a chunk of photo files: the pieces of work an engine
reads, each in one task) and each unit reads as :class:`Sample` (key, source, the photo's bytes or path, or why it
has none). Keys name the records of the output:

- a photo file: its path relative to the folder given (a file named alone: its name), as ``capcli caption`` always did;
- a tar member (the webdataset spec): the member's path up to the first dot of its file name; the members of one
  key, consecutive in the shard, are one sample. A sample with no image member, or several (``a.jpg`` and
  ``a.png``), is an error row saying so, never a guess. Meta members (``__*__``) and folders are skipped;
- a table row: its ``key`` column when the table has one, else its path, else ``<table name>#<row>``.

A table names its photos in a path column (``path``, ``file``, ``filename`` or ``image_path``; a relative path is
relative to the table) or holds them in a bytes column (``image``, ``jpg``, ``bytes``, ``image_bytes``; a Hugging
Face ``image`` struct of ``bytes`` too). An ``s3://`` prefix is listed: its tar shards when it has any (the
parquet files img2dataset writes beside them hold no photos), else its tables and photos.
"""

from __future__ import annotations

import csv
import io
import posixpath
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .images import IMAGE_EXTENSIONS
from .names import display
from .walk import LeftOut

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TABLE_SUFFIXES = (".parquet", ".csv")
PATH_COLUMNS = ("path", "file", "filename", "image_path")
BYTES_COLUMNS = ("image", "jpg", "bytes", "image_bytes")
# Image members of a webdataset sample: capcli's photo extensions and the netpbm ones webdataset decodes.
TAR_IMAGE_EXTS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS) | {"ppm", "pgm", "pbm", "pnm"}
FILES_PER_UNIT = 500  # photo files per read task: big enough that a task's start-up is amortised


@dataclass(frozen=True)
class Unit:
    """One piece of reading work: a tar shard, a table, or a chunk of photo files ((key, path) pairs)."""

    kind: str  # "tar" | "table" | "files"
    source: str  # the shard, table or folder as given (local path or s3:// URI): the records' "source"
    files: tuple[tuple[str, str], ...] = ()


@dataclass
class Sample:
    """One photo to caption: its bytes (tars, tables, s3) or local path (folders), or why there is none."""

    key: str
    source: str
    data: bytes | None = None
    path: str | None = None
    error: str | None = None


@dataclass
class Listing:
    """What :func:`list_units` found: the units, and what the folders walked left out (for the summary)."""

    units: list[Unit] = field(default_factory=list)
    left_out: LeftOut = field(default_factory=LeftOut)
    files: list[Any] = field(default_factory=list)  # the photo files taken (walk.InputFile), for the summary


# --------------------------------------------------------------------------------------------- file systems
def is_remote(uri: str) -> bool:
    return "://" in uri


def as_uri(path: str | Path) -> str:
    """An input or output as text: a ``Path`` made of an ``s3://`` URI (``s3:/bucket/key``) given back its ``//``."""
    text = str(path)
    return "s3://" + text[len("s3:/"):] if text.startswith("s3:/") and not text.startswith("s3://") else text


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local path or an ``s3://`` URI (``AWS_ENDPOINT_URL`` is honoured)."""
    import os

    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise UsageError(f"{display(uri)}: tar shards, tables, .parquet and s3:// need pyarrow: "
                         'pip install "capcli[ray]" (or pip install pyarrow)') from None
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if not uri.startswith("s3://"):
        raise UsageError(f"{display(uri)}: only local paths and s3:// URIs are read")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]


def _kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(TABLE_SUFFIXES):
        return "table"
    return "photo" if posixpath.splitext(low)[1] in IMAGE_EXTENSIONS else None


# ------------------------------------------------------------------------------------------------- listing
def list_units(inputs: Sequence[str | Path], recursive: bool = False) -> Listing:
    """The units of ``inputs``: local files and folders (folders walked as ``capcli caption`` walks them, a tar or
    a table named alone read as one), ``s3://`` objects and prefixes. UsageError for an input that is not there."""
    from .caption import collect_inputs  # the folder walk and its duplicate-key check stay in one place

    listing = Listing()
    photos: list[str | Path] = []
    for raw in inputs:
        text = as_uri(raw)
        kind = _kind(text)
        if is_remote(text):
            listing.units += _remote_units(text, kind)
        elif kind in ("tar", "table") and Path(text).is_file():
            listing.units.append(Unit(kind, text))
        else:
            photos.append(raw)
    if photos:
        listing.files = collect_inputs(photos, recursive, listing.left_out)
        pairs = [(it.key, str(it.path)) for it in listing.files]
        source = str(photos[0]) if len(photos) == 1 else ""
        listing.units += [Unit("files", source, tuple(pairs[i: i + FILES_PER_UNIT]))
                          for i in range(0, len(pairs), FILES_PER_UNIT)]
    return listing


def _remote_units(uri: str, kind: str | None) -> list[Unit]:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [Unit(kind, uri) if kind in ("tar", "table") else Unit("files", uri, ((posixpath.basename(path),
                                                                                           uri),))]
        if info.type != pafs.FileType.Directory:
            raise UsageError(f"no such object or prefix: {display(uri)}")
        # listed whole: object stores have no folders, and a shard set is often split in sub-prefixes
        found = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True))
    except OSError as e:
        raise UsageError(f"cannot list {display(uri)}: {str(e).splitlines()[0]}") from None
    names = sorted(f.path for f in found if f.type == pafs.FileType.File)
    kinds = {n: _kind(n) for n in names}
    base = uri[: len("s3://")] if uri.startswith("s3://") else ""
    tars = [Unit("tar", base + n) for n in names if kinds[n] == "tar"]
    if tars:
        return tars
    units = [Unit("table", base + n) for n in names if kinds[n] == "table"]
    prefix = path.rstrip("/") + "/"
    pairs = [(n[len(prefix):], base + n) for n in names if kinds[n] == "photo"]
    units += [Unit("files", uri, tuple(pairs[i: i + FILES_PER_UNIT])) for i in range(0, len(pairs), FILES_PER_UNIT)]
    if not units:
        raise UsageError(f"{display(uri)} holds no tar shards, tables or photos")
    return units


# ------------------------------------------------------------------------------------------------- reading
def read_unit(unit: Unit, skip: Iterable[str] = (), shard: tuple[int, int] | None = None) -> Iterator[Sample]:
    """The samples of ``unit``, less those whose key is in ``skip`` (done already: ``--resume``) or outside
    ``shard`` (I, N). A unit that cannot be read at all, or stops part-way (a truncated tar), gives one error
    sample saying where (key ``<source>#unreadable``)."""
    from .caption import in_shard

    skip = skip if isinstance(skip, (set, frozenset)) else set(skip)

    def wanted(key: str) -> bool:
        return key not in skip and (shard is None or in_shard(key, shard))

    if unit.kind == "files":
        for key, path in unit.files:
            if wanted(key):
                yield _file_sample(key, path, unit.source)
        return
    reader = _tar_samples if unit.kind == "tar" else _table_samples
    n = 0
    try:
        for sample in reader(unit.source):
            n += 1
            if wanted(sample.key):
                yield sample
    except (OSError, tarfile.TarError, ValueError, EOFError) as e:
        key = f"{unit.source}#unreadable"
        if wanted(key):
            where = f" after {n} sample(s)" if n else ""
            yield Sample(key, unit.source, error=f"cannot read {display(unit.source)}{where}: "
                                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _file_sample(key: str, path: str, source: str) -> Sample:
    if not is_remote(path):
        return Sample(key, source, path=path)
    fs, p = filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return Sample(key, source, data=f.read())
    except OSError as e:
        return Sample(key, source, error=f"cannot read ({str(e).splitlines()[0]})")


def with_bytes(sample: Sample) -> Sample:
    """A photo file's sample with its bytes read (for a reader on another machine), or the reason they cannot be."""
    from .errors import ImageError
    from .images import open_photo

    try:
        with open_photo(Path(sample.path or "")) as f:
            return Sample(sample.key, sample.source, data=f.read())
    except ImageError as e:
        text, name = str(e), Path(sample.path or "").name
        return Sample(sample.key, sample.source, error=text[len(name) + 2:] if text.startswith(f"{name}: ") else text)
    except OSError as e:
        return Sample(sample.key, sample.source, error=f"cannot read ({e.strerror or e})")


def split_member(name: str) -> tuple[str, str]:
    """A tar member's (key, extension) as the webdataset spec groups them: ``a/b.c.jpg`` -> (``a/b``, ``c.jpg``)."""
    name = name.removeprefix("./")
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower() if dot else ""


def _tar_samples(uri: str) -> Iterator[Sample]:
    fs, path = filesystem(uri)
    seen: set[str] = set()
    with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        key, members = None, {}
        for m in tar:
            name = m.name.removeprefix("./")
            base = posixpath.basename(name)
            if not m.isfile() or (base.startswith("__") and base.endswith("__")):
                continue
            k, ext = split_member(name)
            if k != key:
                if key is not None:
                    yield _tar_sample(key, members, uri, seen)
                key, members = k, {}
            f = tar.extractfile(m)
            members[ext] = f.read() if f is not None else b""
        if key is not None:
            yield _tar_sample(key, members, uri, seen)


def _tar_sample(key: str, members: dict[str, bytes], uri: str, seen: set[str]) -> Sample:
    if key in seen:
        return Sample(key, uri, error=f"a second sample of key {display(key)!r} in the shard (its members are not "
                                      "together); captioned once")
    seen.add(key)
    images = sorted(e for e in members if e in TAR_IMAGE_EXTS)
    if len(images) == 1:
        return Sample(key, uri, data=members[images[0]])
    if images:
        return Sample(key, uri, error=f"several images in the sample ({', '.join(images)}); which to caption is "
                                      "not known")
    return Sample(key, uri, error=f"no image in the sample (it has: {', '.join(sorted(members)) or 'nothing'})")


def _table_rows(uri: str) -> Iterator[dict[str, Any]]:
    """A table's rows as dicts, streamed (parquet by record batch; CSV as text)."""
    fs, path = filesystem(uri)
    if uri.lower().endswith(".csv"):
        with fs.open_input_stream(path) as f:
            yield from csv.DictReader(io.TextIOWrapper(io.BytesIO(f.read()), encoding="utf-8-sig", newline=""))
        return
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
            yield from batch.to_pylist()


def table_columns(uri: str, columns: Sequence[str]) -> tuple[str | None, str | None]:
    """The (path column, bytes column) of a table with these ``columns``, or UsageError naming what it has."""
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    bytes_col = next((c for c in BYTES_COLUMNS if c in columns), None)
    if path_col is None and bytes_col is None:
        raise ValueError(f"no photo column (a path column: {', '.join(PATH_COLUMNS)}; or a bytes column: "
                         f"{', '.join(BYTES_COLUMNS)}); it has {', '.join(columns) or 'none'}")
    return path_col, bytes_col


def _table_samples(uri: str) -> Iterator[Sample]:
    folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
    stem = posixpath.basename(uri).rsplit(".", 1)[0]
    cols: tuple[str | None, str | None] | None = None
    for i, row in enumerate(_table_rows(uri)):
        if cols is None:
            cols = table_columns(uri, list(row))
        path_col, bytes_col = cols
        where = row.get(path_col) if path_col else None
        key = str(row.get("key") or where or f"{stem}#{i}")
        data = row.get(bytes_col) if bytes_col else None
        if isinstance(data, dict):  # a Hugging Face image struct {"bytes", "path"}
            data = data.get("bytes")
        if data:
            yield Sample(key, uri, data=bytes(data))
        elif where:
            full = str(where) if is_remote(str(where)) or posixpath.isabs(str(where)) else f"{folder}/{where}"
            yield _file_sample(key, full, uri)
        else:
            yield Sample(key, uri, error="the row names no photo (its path and bytes are empty)")
