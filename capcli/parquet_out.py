"""Caption records as a parquet dataset written in parts: ``-o captions.parquet`` is a folder (or an ``s3://``
prefix) of ``part-000000.parquet``, ``part-000001.parquet``, ... that pyarrow, pandas, DuckDB, Spark and
``ray.data.read_parquet`` read as one table.

A part is written whole when it holds ``part_rows`` records or ``part_seconds`` have passed, and at the end:
locally to a hidden temporary file renamed into place, on S3 as one object (an upload appears whole or not at all),
so a crash loses at most the part in flight and never leaves half a part.

Columns: ``key`` (the sample's key; a photo file's relative path), ``key_bytes`` (base64 of a key that is not
UTF-8, else null: :mod:`capcli.names`), ``source`` (the shard, table or folder), ``caption``, ``logprob``,
``confidence``, ``labels`` (list of {word, p}), ``alternatives`` (list of {caption, logprob}), ``error``, and the
provenance: ``model``, ``model_sha256``, ``search`` (:mod:`capcli.provenance`: the search options, precision,
grounding, capcli version). One row per input.

Resume: the key, source and error columns of every part are read; error rows are dropped by rewriting their part
without them under the same name (atomically: the part is either the old one or the new one, so no crash can
leave a key twice), so those samples are captioned again; new parts are numbered after the last one.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import OutputError, UsageError
from .names import display, record_key
from .provenance import FIELDS as PROVENANCE
from .samples import filesystem, is_remote

PART = re.compile(r"^part-(\d{6})\.parquet$")
PART_ROWS = 1000
PART_SECONDS = 60.0


def part_names(fs: Any, root: str) -> list[str]:
    """The parts in folder ``root`` of filesystem ``fs``, in order (temporary and other files left out)."""
    import pyarrow.fs as pafs

    found = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    return sorted(os.path.basename(f.path) for f in found if PART.match(os.path.basename(f.path)))


def schema() -> Any:
    import pyarrow as pa

    label = pa.struct([("word", pa.string()), ("p", pa.float64())])
    alt = pa.struct([("caption", pa.string()), ("logprob", pa.float64())])
    return pa.schema([("key", pa.string()), ("key_bytes", pa.string()), ("source", pa.string()),
                      ("caption", pa.string()), ("logprob", pa.float64()), ("confidence", pa.float64()),
                      ("labels", pa.list_(label)), ("alternatives", pa.list_(alt)), ("error", pa.string()),
                      ("model", pa.string()), ("model_sha256", pa.string()), ("search", pa.string())])


def _row(rec: dict[str, Any]) -> dict[str, Any]:
    """A caption record as a row of :func:`schema` (``path`` is the key)."""
    row = {name: rec.get(name) for name in schema().names}
    row["key"], row["key_bytes"] = rec["path"], rec.get("path_bytes")
    return row


@dataclass
class Kept:
    """What an earlier run left in the output: keys captioned (errors excluded), by source."""

    keys: set[str] = field(default_factory=set)
    by_source: dict[str, set[str]] = field(default_factory=dict)

    def add(self, key: str, source: str) -> None:
        self.keys.add(key)
        self.by_source.setdefault(source, set()).add(key)


class ParquetWriter:
    """``write(record)`` / ``close()`` / ``abort()``, as the other output writers; ``kept``: the keys already
    done (``resume``). Without ``resume`` the earlier parts are removed first."""

    def __init__(self, out: str, resume: bool, part_rows: int = PART_ROWS, part_seconds: float = PART_SECONDS) -> None:
        import pyarrow.fs as pafs

        self.out = out
        self.fs, self.root = filesystem(out)
        self.part_rows, self.part_seconds = part_rows, part_seconds
        self.rows: list[dict[str, Any]] = []
        self.safe = 0  # records in whole parts, this run's and the earlier ones kept
        self.kept = Kept()
        self.made_by: list[dict[str, Any]] = []  # the provenance of each kept part (--resume compares it)
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise UsageError(f"{display(out)} is a file; a .parquet output is a folder of parts (give a new name)")
        if info.type == pafs.FileType.NotFound and not is_remote(out):  # (an object store has no folders)
            self.fs.create_dir(self.root, recursive=True)
        parts = self._parts()
        if parts and not resume:
            for name in parts:
                self.fs.delete_file(f"{self.root}/{name}")
            parts = []
        self.next = max((int(PART.match(n).group(1)) for n in parts), default=-1) + 1
        for name in parts:
            self._keep(name)
        self.started = time.monotonic()

    def _parts(self) -> list[str]:
        return part_names(self.fs, self.root)

    def _keep(self, name: str) -> None:
        """Read part ``name``'s keys; rewrite it without its error rows (so they are captioned again)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        path = f"{self.root}/{name}"
        try:
            table = pq.read_table(path, filesystem=self.fs)
        except Exception as e:  # noqa: BLE001 - any damage: the part cannot be trusted
            raise UsageError(f"cannot resume {display(self.out)}: {name} is damaged ({str(e).splitlines()[0]}); "
                             "move it away to caption its photos again") from None
        missing = [c for c in ("key", "source", "error") if c not in table.column_names]
        if missing:
            raise UsageError(f"cannot resume {display(self.out)}: {name} is not a capcli caption part (no "
                             f"{', '.join(missing)} column)")
        good = table.filter(pc.is_null(table["error"]))
        if good.num_rows < table.num_rows:
            if good.num_rows:
                self._put(name, good)
            else:
                self.fs.delete_file(path)
        if good.num_rows and all(f in good.column_names for f in PROVENANCE):
            self.made_by.append({f: good[f][0].as_py() for f in PROVENANCE})  # one row's: a part is one run's
        for k, kb, s in zip(*(good[c].to_pylist() for c in ("key", "key_bytes", "source")), strict=True):
            self.kept.add(record_key({"path": k, "path_bytes": kb}), s or "")
        self.safe += good.num_rows

    def _put(self, name: str, table: Any) -> None:
        """Write ``table`` as part ``name`` whole: a temporary name renamed (local), one object (S3)."""
        import pyarrow.parquet as pq

        final = f"{self.root}/{name}"
        if is_remote(self.out):
            pq.write_table(table, final, filesystem=self.fs)
            return
        tmp = f"{self.root}/.{name}.tmp{os.getpid()}"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def write(self, rec: dict[str, Any]) -> None:
        self.rows.append(_row(rec))
        if len(self.rows) >= self.part_rows or time.monotonic() - self.started > self.part_seconds:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.rows:
            return
        name = f"part-{self.next:06d}.parquet"
        try:
            self._put(name, pa.Table.from_pylist(self.rows, schema=schema()))
        except OSError as e:
            raise OutputError(f"cannot write {display(self.out)}/{name}: {str(e).splitlines()[0]}; the "
                              f"{self.safe} record(s) in the earlier parts are safe") from None
        self.next += 1
        self.safe += len(self.rows)
        self.rows = []
        self.started = time.monotonic()

    def close(self) -> None:
        self.flush()

    def abort(self) -> None:
        self.rows = []


def read_parquet_records(out: str) -> list[dict[str, Any]]:
    """All records of a parquet output, as caption records (``path`` = key), in part order."""
    import pyarrow.parquet as pq

    fs, root = filesystem(out)
    out_records = []
    for name in part_names(fs, root):
        for row in pq.read_table(f"{root}/{name}", filesystem=fs).to_pylist():
            rec = {k: v for k, v in row.items() if v is not None and k not in ("key", "key_bytes")}
            rec["path"] = row["key"]
            if row.get("key_bytes"):
                rec["path_bytes"] = row["key_bytes"]
            out_records.append(rec)
    return out_records
