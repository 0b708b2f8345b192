"""Caption output files: every format's reader and writer, ``--resume`` and :func:`rewrite_records`.

The format is chosen by the extension of ``-o`` (:data:`FORMATS`, one :class:`Format` each):

- ``.jsonl``: one JSON object per line, written and flushed as each image is done;
- ``.csv``: columns path, caption, logprob, error, alternatives (a JSON list), labels, confidence,
  low_confidence (``true`` or empty: ``--min-confidence``'s mark), path_bytes, streamed the same way (a CSV of an
  earlier version, without low_confidence, is still read and resumed);
- ``.json``: one array, rewritten atomically every 30 s and at the end, also after Ctrl-C or a failure.

A record names its file by ``path``, plus ``path_bytes`` for a name that is not UTF-8 (the rule is in
:mod:`capcli.names`). A failed write (full disk, permission) raises :class:`OutputError` saying how many records
are safe; the file still ends at a whole record.

On ``--resume`` (``open_writer(out, resume=True)``) the existing output is read back and its records kept
(``Writer.kept``). The file is first rewritten as it was, less a last line cut by a crash (that image is captioned
again) and lines too damaged to read: a UTF-8 BOM (Excel saves CSV with one) stays, and so do columns a person added
to a .csv (``reviewed``, say), in the file's column order, holding their text for the kept rows and empty for the
new ones; two columns of one name are refused, as both cannot be kept. Error records are dropped (those photos are
tried again). An output that is not a capcli caption list (a .csv without ``path`` and ``caption`` columns, a .jsonl
none of whose lines is a record with a ``path``, a .json that is no array of them) is refused with one error line
and left untouched.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import atomic, lock
from .errors import OutputError, UsageError, os_reason
from .names import display
from .provenance import FIELDS as PROVENANCE

CSV_FIELDS = ("path", "caption", "logprob", "error", "alternatives", "labels", "confidence", "low_confidence",
              "model", "model_sha256", "search", "path_bytes")  # path_bytes stays last (README)
CSV_HEADER = ",".join(CSV_FIELDS) + "\n"
BOM = "\ufeff"  # at the start of a UTF-8 file (Excel saves CSV with one)
JSON_SAVE_EVERY_S = 30.0


def output_format(out: str | Path) -> Format:
    """The format of an output file, by its extension (:class:`UsageError` for one no format has)."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        names = list(FORMATS)
        raise UsageError(f"unknown output format {suffix or '(no extension)'!r} for {out}; "
                         f"use {', '.join(names[:-1])} or {names[-1]}")
    return FORMATS[suffix]


def _whole_text(path: Path) -> tuple[str, bool]:
    """A streamed output's text, without a leading UTF-8 BOM (Excel saves one), and whether it had one."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read {display(str(path))}: {e.strerror or e}") from None
    return (text[1:], True) if text.startswith(BOM) else (text, False)


def _complete(text: str) -> str:
    """``text`` up to its last newline: a last record without it (the writer was killed) is dropped."""
    return text[: text.rfind("\n") + 1]


def _not_captions(path: Path, why: str) -> UsageError:
    return UsageError(f"cannot read {display(str(path))}: not a capcli caption list ({why}); give -o another file")


@dataclass
class Found:
    """What an output holds: its records and, to write it back as it was, its CSV columns and BOM.

    ``kept`` is false for a file with nothing to keep (empty, or only a cut first line): it is started afresh.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    columns: tuple[str, ...] = CSV_FIELDS  # .csv: the file's columns in its order, then capcli's it lacks
    bom: bool = False
    kept: bool = False


def _read_jsonl(path: Path) -> Found:
    text, bom = _whole_text(path)
    out, others = [], 0
    for line in _complete(text).split("\n")[:-1]:  # after the last "\n" comes ""
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None  # a damaged line: that image is captioned again
        if isinstance(rec, dict) and "path" in rec:
            out.append(rec)
        elif line.strip(" \t\r\0"):  # zero bytes: a block a crash left unwritten
            others += 1
    if others and not out:
        raise _not_captions(path, f"none of its {others} line(s) is a record with a path")
    return Found(out, bom=bom, kept=bool(out))


def _csv_header(path: Path, text: str) -> tuple[list[str], Iterator[list[str]]] | None:
    """The columns and the reader of the rows after them; None for a file with no whole first line."""
    complete = _complete(text)
    if not complete:
        if not text.strip() or CSV_HEADER.startswith(text):
            return None  # empty, or capcli's header cut as it was written
        complete = text + "\n"  # one line without its newline: read as the header
    reader = csv.reader(io.StringIO(complete, newline=""), strict=True)
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        raise _not_captions(path, "its first line is not a CSV header") from None
    missing = [c for c in ("path", "caption") if c not in header]
    if missing and len(header) == 1 and header[0].startswith("path;"):
        raise _not_captions(path, "its columns are separated by ';', as a spreadsheet saves CSV in some regions; "
                            "save it with ',' to resume it")
    if missing:
        raise _not_captions(path, f"no {' or '.join(missing)} column")
    if len(set(header)) < len(header):
        twice = sorted({c for c in header if header.count(c) > 1})
        raise UsageError(f"cannot resume {display(str(path))}: column(s) {', '.join(map(repr, twice))} appear "
                         "twice, and both cannot be kept; rename one")
    return header, reader


def _csv_record(row: dict[str, str], extras: Sequence[str]) -> dict[str, Any] | None:
    """A record from a CSV row (None when damaged); ``extras``, columns a person added, kept as text."""
    rec: dict[str, Any] = {"path": row["path"]}
    if row.get("path_bytes"):
        rec["path_bytes"] = row["path_bytes"]
    made_by = {f: row[f] for f in PROVENANCE if row.get(f)}  # absent from older CSVs
    if row.get("error"):
        rec["error"] = row["error"]
    else:
        rec["caption"] = row["caption"]
        try:
            if row.get("logprob"):  # a person who rewrote the caption may have cleared its score
                rec["logprob"] = float(row["logprob"])
            for key in ("alternatives", "labels"):
                if row.get(key):
                    rec[key] = json.loads(row[key])
            if row.get("confidence"):
                rec["confidence"] = float(row["confidence"])
            if (row.get("low_confidence") or "").lower() == "true":  # absent from older CSVs
                rec["low_confidence"] = True
        except (ValueError, json.JSONDecodeError):
            return None
    rec.update(made_by)
    rec.update((c, row[c]) for c in extras)
    return rec


def _read_csv(path: Path) -> Found:
    text, bom = _whole_text(path)
    found = _csv_header(path, text)
    if found is None:
        return Found(bom=bom)
    header, reader = found
    extras = [c for c in header if c not in CSV_FIELDS]
    out = []
    while True:  # a quoted field may hold newlines (a file name can); a cut last row ends the file
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error:
            continue  # a damaged row (that image is captioned again); the rows after it are read on
        rec = _csv_record(dict(zip(header, values, strict=True)), extras) if len(values) == len(header) else None
        if rec is not None and rec["path"]:  # else a damaged row
            out.append(rec)
    columns = list(header)
    for c in (c for c in CSV_FIELDS if c not in header):  # a column newer than the file: before path_bytes
        columns.insert(columns.index("path_bytes") if "path_bytes" in columns else len(columns), c)
    return Found(out, tuple(columns), bom, kept=True)


def _read_json(path: Path) -> Found:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path}: not a readable JSON array ({e})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "path" in r for r in data):
        raise UsageError(f"cannot read {path}: not a capcli caption list")
    return Found(data, kept=True)


def read_output(path: str | Path) -> Found:
    """What a caption output file holds (in any of its formats); damaged lines are skipped.

    Raises :class:`UsageError` for a file that is not a capcli caption list (a foreign CSV, JSON or JSONL).
    """
    path = Path(path)
    return output_format(path).read(path)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a caption output file (in any of its formats); damaged lines are skipped."""
    return read_output(path).records


class Writer:
    """Record sink for one output file; ``kept`` holds the records of an earlier run (``resume``).

    A record is written whole or not at all: a failed write (full disk, file-size limit, permission, the file
    removed) raises :class:`OutputError`, which says how many records are safe in the file; the file then still
    ends at a whole record (.jsonl/.csv, cut back) or is the last complete array (.json).
    """

    def __init__(self, path: Path, resume: bool, found: Found | None = None) -> None:
        self.path = path
        if found is None:  # ``found``: the file as the caller read it already
            found = read_output(path) if resume and path.is_file() else Found()
        self.found = found
        # a photo that failed is tried again (it may have been mended since): its error record is not kept
        self.kept: list[dict[str, Any]] = [r for r in self.found.records if "error" not in r]
        self.safe = 0  # records known to be in the file

    def write(self, rec: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish the file (may raise :class:`OutputError`)."""

    def abort(self) -> None:
        """Let go of the file without writing more (after a failure); never raises."""

    def failed(self, e: OSError, what: str = "write") -> OutputError:
        reason = os_reason(e)
        return OutputError(f"cannot {what} {display(str(self.path))}: {reason}; {self.safe} record(s) are safe in it "
                           "- run the same command with --resume to continue")


def _encode_line(text: str) -> bytes:
    """UTF-8; a stray lone surrogate is kept as a ``\\udcNN`` escape instead of ending the run."""
    return text.encode("utf-8", "backslashreplace")


def _jsonl_line(rec: dict[str, Any]) -> bytes:
    return atomic.json_bytes(rec, indent=None)


def _csv_row(rec: dict[str, Any]) -> dict[str, Any]:
    """Capcli's columns of a record; a column a person added holds its text (empty in a new record)."""
    alts = rec.get("alternatives")
    return {**rec, "path": rec["path"], "caption": rec.get("caption", ""), "logprob": rec.get("logprob", ""),
            "error": rec.get("error", ""), "alternatives": json.dumps(alts, ensure_ascii=False) if alts else "",
            "labels": json.dumps(rec["labels"], ensure_ascii=False) if rec.get("labels") else "",
            "confidence": rec.get("confidence", ""),
            "low_confidence": "true" if rec.get("low_confidence") is True else "",
            **{f: rec.get(f, "") for f in PROVENANCE}, "path_bytes": rec.get("path_bytes", "")}


def _csv_line(values: Sequence[Any] | dict[str, Any], columns: Sequence[str]) -> bytes:
    buf = io.StringIO()
    if isinstance(values, dict):
        csv.DictWriter(buf, columns, lineterminator="\n", extrasaction="ignore").writerow(values)
    else:
        csv.writer(buf, lineterminator="\n").writerow(values)
    return _encode_line(buf.getvalue())


# A streamed format's file laid out as a :class:`Found` says: its start (a BOM, a CSV header) and its record encoder.
Layout = Callable[[Found], tuple[bytes, Callable[[dict[str, Any]], bytes]]]


def _jsonl_layout(found: Found) -> tuple[bytes, Callable[[dict[str, Any]], bytes]]:
    return BOM.encode() if found.bom else b"", _jsonl_line


def _csv_layout(found: Found) -> tuple[bytes, Callable[[dict[str, Any]], bytes]]:
    columns = found.columns
    bom = BOM.encode() if found.bom else b""
    return bom + _csv_line(columns, columns), lambda rec: _csv_line(_csv_row(rec), columns)


def _streamed_bytes(layout: Layout) -> Callable[[Sequence[dict[str, Any]], Found], bytes]:
    """A whole file of ``records`` in a streamed format: its start, then one encoded record after another."""
    def file_bytes(records: Sequence[dict[str, Any]], found: Found) -> bytes:
        head, encode = layout(found)
        return head + b"".join(encode(r) for r in records)
    return file_bytes


class _StreamWriter(Writer):
    """Appends each record to the file as it comes (unbuffered: a record is in the file once written).

    On resume the file is first rewritten as it was (BOM, CSV columns) without its damaged or cut lines.
    """

    def __init__(self, path: Path, resume: bool, layout: Layout, found: Found | None = None) -> None:
        super().__init__(path, resume, found)
        self.head, self.encode = layout(self.found)
        if self.found.kept:
            atomic.write_bytes(path, self.file_bytes(self.kept))
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.stat = os.fstat(self.fd)
        self.size = self.stat.st_size
        self.safe = len(self.kept)
        if not self.found.kept and self.head:
            self._append(self.head)

    def file_bytes(self, records: Sequence[dict[str, Any]]) -> bytes:
        return self.head + b"".join(self.encode(r) for r in records)

    def _append(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)  # the file ends at the last whole record again
            raise
        self.size += len(data)

    def write(self, rec: dict[str, Any]) -> None:
        try:
            try:
                here = os.stat(self.path)
            except FileNotFoundError:
                here = None
            if here is None or not os.path.samestat(here, self.stat):
                raise OutputError(f"cannot write {display(str(self.path))}: it was deleted or moved during the run, "
                                  f"with the {self.safe} record(s) written so far; run the same command again (with "
                                  "--resume if you put it back)")
            self._append(self.encode(rec))
        except OSError as e:
            raise self.failed(e) from None
        self.safe += 1

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class _JsonWriter(Writer):
    """Keeps the (small) records and rewrites the array atomically at the start, now and then and at the end.

    The rewrite interval is at least ``every_s`` and at least 20 x the last rewrite's duration, so the
    periodic saves cost under 5 % even when the array grows large (use .jsonl for huge collections).
    """

    def __init__(self, path: Path, resume: bool, every_s: float = JSON_SAVE_EVERY_S,
                 found: Found | None = None) -> None:
        super().__init__(path, resume, found)
        self.records = list(self.kept)
        self.every_s = every_s
        self.safe = len(self.kept)  # the earlier run's file holds them until the first save
        self.save()  # a valid file from the start (and a permission problem shows before any work)
        self.every_s = every_s  # timed by the saves of this run's records

    def write(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if time.monotonic() - self.saved > self.every_s:
            self.save()

    def save(self) -> None:
        t = time.monotonic()
        try:
            atomic.write_json(self.path, self.records)
        except OSError as e:
            raise self.failed(e) from None
        self.safe = len(self.records)
        self.saved = time.monotonic()
        self.every_s = max(self.every_s, 20 * (self.saved - t))

    def close(self) -> None:
        self.save()


def check_paths(inputs: Sequence[str | Path], out: str | Path, create_dirs: bool = False) -> None:
    """Before anything is loaded: every input exists (an s3:// one is checked when read), and so does the folder
    ``out`` goes in, unless ``create_dirs`` (then it is made). A mistyped path is one error line, not a folder
    made at the root of the disk."""
    for raw in inputs:
        p = str(raw)
        if "://" not in p and not os.path.lexists(p):
            raise UsageError(f"no such file or folder: {display(p)}")
    if "://" in str(out):
        return
    parent = Path(out).parent
    if parent.is_dir():
        return
    if parent.exists():
        raise UsageError(f"cannot write {display(str(out))}: {display(str(parent))} is not a folder")
    if not create_dirs:
        raise UsageError(f"cannot write {display(str(out))}: the folder {display(str(parent))} does not exist "
                         "(create it, or add --create-dirs)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {display(str(parent))}: {os_reason(e)}") from None


@contextlib.contextmanager
def finishing(writer: Any) -> Iterator[Any]:
    """Run a block that writes into ``writer``, then close it: what is done is kept also after Ctrl-C or a
    failure; a failed write (:class:`OutputError`) aborts it instead, leaving the file at its last whole record."""
    try:
        yield writer
    except OutputError:
        writer.abort()
        raise
    except BaseException:
        with contextlib.suppress(OutputError):
            writer.close()  # keep what is done (Ctrl-C, a failure)
        raise
    else:
        writer.close()


def open_writer(out: Path, resume: bool = False,
                check: Callable[[list[dict[str, Any]]], None] | None = None) -> Writer:
    """A writer of ``out`` in its format; with ``resume`` it keeps the records ``out`` holds (``kept``).
    ``check`` sees those records (errors too) before the file is touched: it may refuse the resume by raising."""
    fmt = output_format(out)
    if out.is_dir():
        raise OutputError(f"cannot write {display(str(out))}: it is a folder; give -o a file name")
    try:
        found = read_output(out) if resume and out.is_file() else None
        if found is not None and check is not None:
            check(found.records)
        out.parent.mkdir(parents=True, exist_ok=True)
        return fmt.open(out, resume, found)
    except OSError as e:
        raise OutputError(f"cannot write {display(str(out))}: {os_reason(e)}") from None


def rewrite_records(out: str | Path, records: Sequence[dict[str, Any]], found: Found | None = None) -> None:
    """Replace ``out``'s records with ``records`` atomically, in its format and layout (under its lock);
    ``found``: ``out`` as :func:`read_output` read it, if the caller has it."""
    out = Path(out)
    fmt = output_format(out)
    if found is None:  # laid out as the file is (a BOM, the columns a person added)
        found = read_output(out) if fmt.laid_out and out.is_file() else Found()
    data = fmt.file_bytes(records, found)
    with lock.output(out):
        try:
            atomic.write_bytes(out, data)
        except OSError as e:
            raise OutputError(f"cannot write {display(str(out))}: {os_reason(e)}") from None




@dataclass(frozen=True)
class Format:
    """One output format: how its files are read, written as a run goes, and written whole (``rewrite_records``).

    A new format is one more entry of :data:`FORMATS`, by the extension that chooses it.
    """

    name: str
    read: Callable[[Path], Found]  # raises UsageError for a file that is no capcli caption list
    open: Callable[[Path, bool, Found | None], Writer]  # (path, resume, the file as read if it was) -> a writer
    file_bytes: Callable[[Sequence[dict[str, Any]], Found], bytes]  # a whole file of records, laid out as found
    laid_out: bool = True  # whether a rewrite keeps the file's layout (so reads it first)


def _streamed(layout: Layout) -> Callable[[Path, bool, Found | None], Writer]:
    return lambda path, resume, found: _StreamWriter(path, resume, layout, found)


FORMATS: dict[str, Format] = {
    ".json": Format("json", _read_json, lambda path, resume, found: _JsonWriter(path, resume, found=found),
                    lambda records, _: atomic.json_bytes(list(records)), laid_out=False),
    ".jsonl": Format("jsonl", _read_jsonl, _streamed(_jsonl_layout), _streamed_bytes(_jsonl_layout)),
    ".csv": Format("csv", _read_csv, _streamed(_csv_layout), _streamed_bytes(_csv_layout)),
}
