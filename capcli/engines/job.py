"""``capcli caption`` on either engine, for every input and output kind: list the inputs, open the output (its
one writer, locked for the run), skip what an earlier run did (``--resume``) and what is another shard's
(``--shard I/N``), caption the rest on the engine chosen, write each record as it comes, count.

Outputs: ``.parquet`` (a folder of parts, :mod:`capcli.parquet_out`; local or ``s3://``) or the caption
command's .json/.jsonl/.csv. Records of tar and table samples carry their key as ``path`` and their shard or
table as ``source``. A record whose key was done already is never written twice: a job killed at any point and
resumed ends with every key exactly once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import lock
from ..errors import UsageError
from ..names import display, record_key
from ..parquet_out import Kept, ParquetWriter
from ..progress import NULL, Progress
from ..provenance import Provenance
from ..samples import Unit, is_remote, list_units, read_unit
from .base import EngineOptions
from .local import caption_local
from .ray_engine import RayOptions, caption_ray, require_ray, start_ray, stop_ray

ENGINES = ("local", "ray")


@dataclass
class CaptionJob:
    inputs: Sequence[str | Path]
    out: str
    options: EngineOptions = field(default_factory=EngineOptions)
    engine: str = "local"
    ray: RayOptions = field(default_factory=RayOptions)
    recursive: bool = False
    resume: bool = False
    shard: tuple[int, int] | None = None
    threads: int = 2  # local engine: decoding threads
    precision: str = "auto"  # as asked (Ray's GPU actors resolve it themselves; CPU actors take the driver's choice)
    part_rows: int = 1000  # .parquet: records per part


def is_parquet(out: str | Path) -> bool:
    return str(out).lower().rstrip("/").endswith(".parquet")


def _open_writer(job: CaptionJob, made_by: Provenance) -> tuple[Any, Kept]:
    """The output's writer and what it holds already (captioned keys, by source); a resume of captions made
    another way is refused."""
    if is_parquet(job.out):
        w = ParquetWriter(job.out, job.resume, part_rows=job.part_rows)
        made_by.check_resume(w.made_by, job.out)
        return w, w.kept
    if is_remote(job.out):
        raise UsageError(f"{display(job.out)}: an s3:// output must be .parquet")
    from ..outputs import open_writer

    w = open_writer(Path(job.out), job.resume, check=lambda records: made_by.check_resume(records, job.out))
    kept = Kept()
    for rec in w.kept:
        kept.add(record_key(rec), str(rec.get("source", "")))
    return w, kept


def _todo(units: list[Unit], kept: Kept) -> tuple[list[tuple[Unit, frozenset[str]]], int]:
    """Each unit with the keys it must skip (done already), less the photo files done; and how many are done."""
    out, skipped = [], 0
    for u in units:
        if u.kind == "files":
            files = tuple((k, p) for k, p in u.files if k not in kept.keys)
            skipped += len(u.files) - len(files)
            if files:
                out.append((Unit("files", u.source, files), frozenset()))
        else:
            skip = frozenset(kept.by_source.get(display(u.source), ()))
            skipped += len(skip)
            out.append((u, skip))
    return out, skipped


def _provenance(captioner: Any, job: CaptionJob) -> Provenance:
    o = job.options
    return Provenance.of(captioner, o.beam_size, o.max_len, o.top_k, o.length_penalty)


def _records(captioner: Any, job: CaptionJob, todo: list[tuple[Unit, frozenset[str]]],
             provenance: Provenance) -> Iterator[list[dict[str, Any]]]:
    if job.engine == "ray":
        started = start_ray(job.ray)
        try:
            # the precision this machine resolved, so every node searches alike (a GPU resolves its own)
            precision = job.precision if job.ray.gpus_per_worker else captioner.precision
            # an actor runs where Ray puts it: on a GPU it was given one (--gpus-per-worker), else on its CPUs
            device = "cuda" if job.ray.gpus_per_worker else "cpu"
            yield from caption_ray(captioner, todo, job.shard, job.options, provenance, job.ray, device=device,
                                   precision=precision, grounding="auto" if captioner.grounder else "off")
        finally:
            stop_ray(started)
    else:
        samples = (s for u, skip in todo for s in read_unit(u, skip, job.shard))
        yield from caption_local(captioner, samples, job.options, provenance, threads=job.threads)


def run_caption_job(captioner: Any, job: CaptionJob, progress: Progress = NULL) -> Any:
    """Caption ``job.inputs`` into ``job.out`` on ``job.engine``; returns a ``CaptionSummary``. What is done is in
    the output even when this is interrupted; a second run writing the same local output fails at once."""
    from ..caption import CaptionSummary, left_out_summary

    if job.engine not in ENGINES:
        raise UsageError(f"--engine {job.engine!r}: use one of {', '.join(ENGINES)}")
    if job.engine == "ray":
        require_ray()
    o = job.options
    captioner.search_options(o.beam_size, o.max_len, o.top_k, o.length_penalty)  # checked before any work
    listing = list_units(job.inputs, job.recursive)
    local_out = not is_remote(job.out)
    summary = (left_out_summary(listing.left_out, listing.files, Path(job.out)) if local_out
               else CaptionSummary(job.out))
    if not listing.units:
        raise UsageError(f"no photos, tar shards or tables found in {', '.join(display(str(p)) for p in job.inputs)}")
    held = lock.output(job.out) if local_out else contextlib.nullcontext()
    with held:
        made_by = _provenance(captioner, job)
        writer, kept = _open_writer(job, made_by)
        todo, summary.skipped = _todo(listing.units, kept)
        total = sum(len(u.files) for u, _ in todo) if all(u.kind == "files" for u, _ in todo) else None
        _write_all(captioner, job, todo, writer, summary, total, progress, made_by)
    return summary


def _write_all(captioner: Any, job: CaptionJob, todo: list[tuple[Unit, frozenset[str]]], writer: Any,
               summary: Any, total: int | None, progress: Progress, made_by: Provenance) -> None:
    from ..outputs import finishing

    t0 = time.perf_counter()
    progress.start("captioning", total=total if job.shard is None else None, unit="img")
    try:
        with finishing(writer):
            for records in _records(captioner, job, todo, made_by):
                for rec in records:
                    writer.write(rec)
                    if "error" in rec:
                        summary.failed += 1
                        summary.failures.append((rec["path"], rec["error"]))
                        progress.warn(f"{rec['path']}: {rec['error']}")
                    else:
                        summary.captioned += 1
                if summary.failed:
                    progress.advance(len(records), failed=summary.failed)
                else:
                    progress.advance(len(records))
    finally:
        progress.done()
        summary.seconds = time.perf_counter() - t0


def wants_job(inputs: Sequence[str | Path], out: str | Path, engine: str) -> bool:
    """Whether ``capcli caption`` runs through :func:`run_caption_job` (the Ray engine, a tar, table or s3://
    input, a .parquet or s3:// output) rather than the folder captioner of :mod:`capcli.caption`; UsageError or
    EngineError (one line) when what that needs is not installed."""
    from ..samples import TABLE_SUFFIXES, TAR_SUFFIXES, as_uri

    def special(p: str | Path) -> bool:
        text = as_uri(p)
        return is_remote(text) or (text.lower().endswith(TAR_SUFFIXES + TABLE_SUFFIXES) and Path(text).is_file())

    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "ray":
        require_ray()  # one line saying what to install, before the model is loaded
    wanted = engine != "local" or is_parquet(out) or is_remote(as_uri(out)) or any(special(p) for p in inputs)
    if wanted:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError('tar shards, tables, .parquet and s3:// need pyarrow: pip install "capcli[ray]" (or '
                             "pip install pyarrow)") from None
    return wanted


def check_job_options(attention_maps: Any, publishing: bool) -> None:
    """What the job path does not do: attention maps and writing into photos need photo files in folders."""
    if attention_maps is not None:
        raise UsageError("--attention-maps works with photo folders on the local engine and a .json/.jsonl/.csv "
                         "output")
    if publishing:
        raise UsageError("--sidecar, --embed and --html work with photo folders on the local engine and a "
                         ".json/.jsonl/.csv output")


def caption_job_command(captioner: Any, inputs: Sequence[str | Path], out: str | Path, *, engine: str,
                        workers: int | None, gpus_per_worker: float, address: str | None, beam: int, top_k: int,
                        max_len: int, batch_size: int, length_penalty: float, recursive: bool, resume: bool,
                        shard: tuple[int, int] | None, device: str, precision: str,
                        attention_maps: Any, publishing: bool, progress: Progress) -> Any:
    """``capcli caption``'s options as a :class:`CaptionJob`, run (the CLI's one call into this module)."""
    from ..samples import as_uri

    check_job_options(attention_maps, publishing)
    options = EngineOptions(beam_size=beam, max_len=max_len, top_k=top_k, length_penalty=length_penalty,
                            batch_size=batch_size)
    if engine == "ray" and device.startswith("cuda") and not gpus_per_worker:
        gpus_per_worker = 1.0  # --device cuda: GPU actors, one GPU each
    ray = RayOptions(address=address, workers=workers if engine == "ray" else None, gpus_per_worker=gpus_per_worker)
    job = CaptionJob([as_uri(p) for p in inputs], as_uri(out), options, engine=engine, ray=ray, recursive=recursive,
                     resume=resume, shard=shard, threads=2 if workers is None or engine == "ray" else max(workers, 1),
                     precision=precision)
    return run_caption_job(captioner, job, progress)
