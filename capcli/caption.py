"""``capcli caption``: files and folders in, one record per photo into an output file (:mod:`capcli.outputs`).

The photos are captioned by a :class:`capcli.captioner.Captioner` (the API: photos in, records out, no files); this
module chooses the files (folders walked once, :mod:`capcli.walk`; ``--shard``), skips those already in the output
(``--resume``), writes each record as it comes, draws the attention maps and counts what happened
(:class:`CaptionSummary`). When asked (``keep_records``, for publishing) it also hands back what the output holds
and which input file each record is of (:class:`Captioned`), so publishing neither reads the output again nor
walks the folders again.

What is done is in the output even when a run is interrupted (Ctrl-C) or fails half-way; the output is locked for
the run (:mod:`capcli.lock`). ``--shard I/N`` (I = 0..N-1) keeps the files whose relative path hashes (SHA-1) to I
modulo N: stable however the files are listed, and the N shards are disjoint and cover everything.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import lock
from .captioner import Captioner
from .errors import ImageError, UsageError
from .images import load_image
from .metadata import SIDECAR_NAMINGS, sidecar_path
from .names import display, name_bytes, path_fields, record_key
from .outputs import Found, Writer, finishing, open_writer, output_format
from .progress import NULL, Progress
from .provenance import Provenance
from .search import SearchOptions
from .shots import RENDERINGS, originals_in_pairs
from .walk import InputFile, LeftOut, walk_folder


# ----------------------------------------------------------------------------------------- choosing files
def collect_inputs(inputs: Sequence[str | Path], recursive: bool = False,
                   left_out: LeftOut | None = None) -> list[InputFile]:
    """Image files of the given files and folders: a folder's files sorted, files in the order given.

    Folders contribute the entries with an image extension (subfolders with ``recursive``; see
    :mod:`capcli.walk`); a file named explicitly is taken whatever its extension, and so is a symbolic link
    named explicitly, broken or not (it then fails with its reason). Two inputs with the same relative path
    are an error. What the folders leave out is added to ``left_out`` when it is given.
    """
    out: list[InputFile] = []
    seen: dict[str, Path] = {}
    for raw in inputs:
        root = Path(raw)
        if root.is_dir():
            items = walk_folder(root, recursive, left_out if left_out is not None else LeftOut())
        elif root.exists() or root.is_symlink():
            items = [InputFile(root, root.name)]
        else:
            raise UsageError(f"no such file or folder: {display(str(root))}")
        for item in items:
            other = seen.get(item.key)
            if other is not None:
                if os.path.realpath(other) == os.path.realpath(item.path):
                    continue  # the same file named twice
                raise UsageError(f"{display(str(other))} and {display(str(item.path))} would both be recorded as "
                                 f"{display(item.key)!r}; caption them in separate runs")
            seen[item.key] = item.path
            out.append(item)
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard wants I/N, e.g. 0/4 (got {text!r})") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: need N >= 1 and 0 <= I < N (shards are numbered from 0)")
    return i, n


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    """Whether relative path ``key`` belongs to shard I of N (SHA-1 of the path's bytes, UTF-8, modulo N)."""
    i, n = shard
    return int.from_bytes(hashlib.sha1(name_bytes(key)).digest()[:8], "big") % n == i


# ---------------------------------------------------------------------------------------------- the command
@dataclass
class CaptionSummary:
    out: Path
    captioned: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output (--resume)
    outside_shard: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), for the report
    # What the folders left out (capcli/walk.py). Entries not captioned: files by extension, anything else by what
    # it is ("broken link", "named pipe", "unreadable folder"); these fail --strict.
    unsupported: dict[str, int] = field(default_factory=dict)
    hidden_files: int = 0  # not taken (.DS_Store)
    hidden_folders: int = 0  # not walked into (.thumbnails/, .git/)
    subfolders: int = 0  # not walked: no --recursive
    walked_already: int = 0  # symbolic links to a folder walked already (a loop, or a second link)
    output: Captioned | None = None  # what the output holds, with keep_records (for publishing)

    @property
    def rate(self) -> float:
        return (self.captioned + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def n_unsupported(self) -> int:
        return sum(self.unsupported.values())

    def unsupported_text(self) -> str:
        """``"2 (.mov 1, .xmp 1)"``: entries not captioned, by extension or kind, most common first."""
        parts = ", ".join(f"{ext} {n}" for ext, n in sorted(self.unsupported.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"{self.n_unsupported} ({parts})"

    def left_out_text(self) -> str:
        """What else the folders left out, for the summary line: ``", skipped (hidden) 3 (1 folder, 2 files)"``."""
        hidden = [f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((self.hidden_folders, "folder"),
                                                                      (self.hidden_files, "file")) if n]
        n_hidden = self.hidden_files + self.hidden_folders
        return "".join([f", skipped (unsupported) {self.unsupported_text()}" if self.unsupported else "",
                        f", skipped (hidden) {n_hidden} ({', '.join(hidden)})" if n_hidden else "",
                        f", {self.subfolders} subfolder(s) not walked (no --recursive)" if self.subfolders else "",
                        f", {self.walked_already} linked folder(s) walked already" if self.walked_already else ""])


def _ours(path: Path, out: Path) -> bool:
    """Whether ``path`` is the output, or the lock or a temporary file capcli keeps beside it."""
    if not (path.name in (out.name, lock.sidecar(out).name) or path.name.startswith(f".{out.name}.tmp")):
        return False  # (the name first: the real folders only for the few entries named like these)
    return os.path.realpath(path.parent) == os.path.realpath(out.parent)


def left_out_summary(left_out: LeftOut, items: Sequence[InputFile], out: Path) -> CaptionSummary:
    """A summary counting what the folders left out: the output and the photos' sidecars are not counted (the
    ``.xmp`` and ``.txt`` files ``--sidecar`` writes: ``a.xmp``, ``a.jpg.xmp``, ``a.txt``)."""
    sidecars = {sidecar_path(it.path, "xmp", n) for it in items for n in SIDECAR_NAMINGS}
    sidecars |= {sidecar_path(it.path, "txt") for it in items}
    counts: dict[str, int] = {}
    for path, label in left_out.others:
        if path not in sidecars and not _ours(path, out):
            counts[label] = counts.get(label, 0) + 1
    hidden = [is_dir for path, is_dir in left_out.hidden if not _ours(path, out)]
    return CaptionSummary(out, unsupported=counts, hidden_files=hidden.count(False), hidden_folders=sum(hidden),
                          subfolders=len(left_out.subfolders), walked_already=len(left_out.walked_already))


@dataclass
class Captioned:
    """What a run left in its output, for publishing: kept only on request (``keep_records``), as a huge run's
    records would otherwise fill memory."""

    out: Path
    records: list[dict[str, Any]]  # every record of the output, in its order (an earlier run's kept ones first)
    found: Found  # the output's layout (CSV columns, BOM), to rewrite it as it is
    pairs: list[tuple[Path, dict[str, Any]]]  # (photo, its record): each input file the output has a record of


def caption_files(captioner: Captioner, inputs: Sequence[str | Path], out: str | Path, *, beam_size: int = 3,
                  batch_size: int = 32, workers: int = 2, max_len: int = 20, top_k: int = 1,
                  length_penalty: float = 0.0, recursive: bool = False, attention_maps: str | Path | None = None,
                  resume: bool = False, shard: tuple[int, int] | None = None, keep_records: bool = False,
                  progress: Progress = NULL) -> CaptionSummary:
    """``capcli caption``: caption files and folders into ``out`` (see :mod:`capcli.outputs` for its formats).

    What is done is in ``out`` even when this is interrupted (Ctrl-C) or fails half-way. ``out`` is locked
    for the run: a second run writing it fails at once (:class:`LockedError`). A failed write of ``out``
    raises :class:`OutputError`, saying how many records are safe. With ``keep_records`` the summary's ``output``
    holds what ``out`` holds and which input file each record is of (:class:`Captioned`), for publishing.
    """
    out = Path(out)
    output_format(out)
    if attention_maps is not None and not captioner.has_attention:
        raise UsageError(f"--attention-maps needs a model with attention (arch 'attention'); "
                         f"this one is {captioner.model.arch!r} and has none")
    opts = captioner.search_options(beam_size, max_len, top_k, length_penalty)
    left_out = LeftOut()
    inputs_found = collect_inputs(inputs, recursive, left_out)
    summary = left_out_summary(left_out, inputs_found, out)
    if not inputs_found:
        said = [summary.left_out_text().removeprefix(", "), "" if recursive else "use --recursive for subfolders"]
        raise UsageError(f"no image files found in {', '.join(display(str(p)) for p in inputs)}"
                         + "".join(f"; {x}" for x in said if x))
    items = inputs_found
    if shard is not None:
        items = [it for it in inputs_found if in_shard(it.key, shard)]
        summary.outside_shard = len(inputs_found) - len(items)
    made_by = Provenance.of(captioner, beam_size, max_len, top_k, length_penalty)
    with lock.output(out):
        writer = open_writer(out, resume, check=lambda records: made_by.check_resume(records, str(out)))
        records = _caption_into(captioner, items, writer, summary, _Run(
            opts, made_by, batch_size, workers, Path(attention_maps) if attention_maps is not None else None,
            keep_records), progress)
    if records is not None:
        by_key = {record_key(r): r for r in records}  # (a photo's record as --resume matches it)
        summary.output = Captioned(out, records, writer.found,
                                   [(it.path, by_key[it.key]) for it in inputs_found if it.key in by_key])
    return summary


@dataclass(frozen=True)
class _Run:
    """How one ``caption_files`` run captions."""

    opts: SearchOptions
    made_by: Provenance  # on every record
    batch_size: int
    workers: int
    maps: Path | None  # the attention maps' folder
    keep_records: bool


def _caption_into(captioner: Captioner, items: list[InputFile], writer: Writer, summary: CaptionSummary, run: _Run,
                  progress: Progress) -> list[dict[str, Any]] | None:
    """Caption ``items`` not already in ``writer`` into it, counting in ``summary``; with ``run.keep_records``
    the records the file then holds, in its order."""
    t0 = time.perf_counter()
    records = None
    kept = list(writer.kept) if run.keep_records else None
    try:
        with finishing(writer):
            done = {record_key(r) for r in writer.kept}
            todo = [it for it in items if it.key not in done]
            summary.skipped = len(items) - len(todo)
            twins = _same_shot(todo)  # a RAW/HEIC + JPEG pair is one shot: its JPEG is captioned, once
            search = [it for it in todo if it.key not in twins.originals]
            records = captioner.caption_paths([it.path for it in search], batch_size=run.batch_size,
                                              workers=run.workers, progress=progress,
                                              return_alphas=run.maps is not None, options=run.opts)
            for item, rec in zip(search, records, strict=True):
                rec = {**_record_of(item, rec, captioner, summary, run.maps, progress), **run.made_by.fields()}
                shot = [rec] + [_copy_of(orig, rec, summary) for orig in twins.of_jpeg.get(item.key, ())]
                for r in shot:
                    writer.write(r)
                if kept is not None:
                    kept += shot
    finally:
        if records is not None:
            records.close()  # stops the decoding now, also on error
        summary.seconds = time.perf_counter() - t0
    return kept


@dataclass
class _Shots:
    """The pairs among the photos to caption: each original (RAW, HEIC) by key, and the originals of each JPEG."""

    originals: set[str] = field(default_factory=set)
    of_jpeg: dict[str, list[InputFile]] = field(default_factory=dict)


def _same_shot(items: Sequence[InputFile]) -> _Shots:
    paired = originals_in_pairs([it.path for it in items])
    jpegs = {(it.path.parent, it.path.stem.casefold()): it for it in items
             if it.path not in paired and it.path.suffix.lower() in RENDERINGS}
    shots = _Shots()
    for it in items:
        if it.path in paired:
            shots.originals.add(it.key)
            shots.of_jpeg.setdefault(jpegs[(it.path.parent, it.path.stem.casefold())].key, []).append(it)
    return shots


def _copy_of(original: InputFile, rec: dict[str, Any], summary: CaptionSummary) -> dict[str, Any]:
    """The record of a pair's original: its JPEG's caption (one shot, one caption), under its own name."""
    copy = {**path_fields(original.key), **{k: v for k, v in rec.items() if k not in ("path", "path_bytes")}}
    if "error" in copy:
        summary.failed += 1
        summary.failures.append((display(original.key), copy["error"]))
    else:
        summary.captioned += 1
    return copy


def _record_of(item: InputFile, rec: dict[str, Any], captioner: Captioner, summary: CaptionSummary,
               maps: Path | None, progress: Progress) -> dict[str, Any]:
    """The output's record of a photo's captioner record (named by its file key), counted in ``summary``, its
    attention map drawn into ``maps``."""
    words, alphas = rec.pop("words", None), rec.pop("alphas", None)
    rec.pop("path")
    rec = {**path_fields(item.key), **rec}
    if "error" in rec:
        rec["error"] = display(rec["error"])
        summary.failed += 1
        summary.failures.append((display(item.key), rec["error"]))
        progress.warn(f"{display(item.key)}: {rec['error']}")
    else:
        summary.captioned += 1
        if maps is not None and words is not None:
            _save_map(maps, item, words, alphas, captioner.spec.grid, progress)
    return rec


def _save_map(folder: Path, item: InputFile, words: list[str], alphas: Any, grid: int, progress: Progress) -> None:
    from .viz import save_attention_map

    target = folder / f"{item.key}.png"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_attention_map(target, load_image(item.path), words, alphas, grid=grid)
    except (OSError, ImageError) as e:
        progress.warn(f"{display(item.key)}: cannot write its attention map ({display(str(e))})")
