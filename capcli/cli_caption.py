"""``capcli caption``'s command line: its options, and the run's summary, Ctrl-C and publishing report as the
terminal shows them. The work is :mod:`capcli.caption` (files and folders) or :mod:`capcli.engines.job` (tar
shards, tables, s3://, .parquet, ``--engine ray``); this module only parses and renders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from .errors import CapcliError
from .names import display
from .terminal import RichProgress, console, err_console
from .terminal import error_line as _error

if TYPE_CHECKING:
    from .caption import Captioned, CaptionSummary
    from .engines.base import EngineOptions
    from .publish import PublishRequest

_Paths = Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.")]
_Out = Annotated[Path, typer.Option("-o", "--out", help="Output file: .json, .jsonl or .csv.")]
_Model = Annotated[Path | None, typer.Option(
        "--model", help="Checkpoint file, or a shipped model: attention (the default) | basic.")]
_Beam = Annotated[int, typer.Option(min=1, help="Beam size (1 = greedy).")]
_TopK = Annotated[int, typer.Option("--top-k", min=1, help="Also list the K best beams as alternatives.")]
_MaxLen = Annotated[int, typer.Option("--max-len", min=1, help="Longest caption, in words (1-100).")]
_LengthPenalty = Annotated[
        float, typer.Option("--length-penalty", min=0.0, help="Rank beams by logprob / len^ALPHA (0 = raw; 0-5).")
    ]
_BatchSize = Annotated[int, typer.Option(min=1, help="Images per batch.")]
_Workers = Annotated[int | None, typer.Option(min=0, help="Image decoders working beside the encoder (threads "
                                                "on the CPU, processes with CUDA; 0: decode in turn; default 2). "
                                                "--engine ray: captioning actors (default: sized to the cluster).")
                       ]
_Recursive = Annotated[bool, typer.Option("--recursive", "-r", help="Descend into subfolders.")]
_AttentionMaps = Annotated[
        Path | None, typer.Option("--attention-maps", help="Write a PNG per image: where each word looked.")
    ]
_Resume = Annotated[bool, typer.Option("--resume", help="Keep OUT's records; caption only the rest.")]
_CreateDirs = Annotated[bool, typer.Option("--create-dirs", help="Create -o's missing folders (without it a "
                                              "missing folder is an error, as a mistyped path usually is).")
                           ]
_Shard = Annotated[
        str | None, typer.Option(help="I/N: caption only shard I (0..N-1) of N, split by a hash of the path.")
    ]
_Strict = Annotated[bool, typer.Option("--strict", help="Exit non-zero if any image failed or any file in the "
                                         "folders was skipped as unsupported.")]
_Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
_Precision = Annotated[str, typer.Option(
        help="Search arithmetic: auto (int8 or bfloat16 products where the CPU computes them natively: 2-3x "
        "faster) | float32 | bfloat16 | int8."
    )]
_Grounding = Annotated[str, typer.Option(
        help="auto: ground captions in what the encoder's ImageNet head recognises (say confident objects, hold back "
        "what it contradicts, add labels) where the model's encoder has that head | off.")]
_Sidecar = Annotated[list[str] | None, typer.Option(
        "--sidecar", help="Also write each caption to a sidecar beside its photo: xmp | txt (repeatable).")]
_SidecarName = Annotated[str, typer.Option(
        "--sidecar-name", help="XMP sidecar names: stem (photo.xmp, Lightroom) | ext (photo.jpg.xmp, darktable).")
    ]
_Embed = Annotated[bool, typer.Option("--embed", help="Also write each caption into its photo's XMP (metadata "
                                        "only, atomically; RAW files: use --sidecar xmp).")]
_Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace captions a person wrote or edited in the "
                                            "photos and sidecars too.")]
_DryRun = Annotated[bool, typer.Option("--dry-run", help="Say what --sidecar/--embed would write and where; "
                                          "write nothing into photos or sidecars.")]
_Html = Annotated[Path | None, typer.Option("--html", help="Also write a review gallery page here (one card "
                                              "per photo, least confident first).")]
_MinConfidence = Annotated[float | None, typer.Option(
        "--min-confidence", help="Records whose confidence is below this give metadata and sidecars only what "
        "their labels support ('Image may contain: cat'), or nothing (they stay in the output, marked "
        "low_confidence).")]
_Engine = Annotated[str, typer.Option(help="local (this process) | ray (a Ray cluster: --address or RAY_ADDRESS, "
                                        "else a local Ray started and stopped here; pip install \"capcli\\[ray]\").")
                      ]
_GpusPerWorker = Annotated[float, typer.Option("--gpus-per-worker", min=0.0, help="Ray engine: GPUs per "
                                                   "captioning actor (0: CPU actors).")]
_Address = Annotated[str | None, typer.Option(help="Ray engine: the cluster to join (auto, HOST:6379, "
                                                "ray://HOST:10001; default: RAY_ADDRESS).")]


def caption(
    paths: _Paths,
    out: _Out,
    model: _Model = None,
    beam: _Beam = 3,
    top_k: _TopK = 1,
    max_len: _MaxLen = 20,
    length_penalty: _LengthPenalty = 0.0,
    batch_size: _BatchSize = 32,
    workers: _Workers = None,
    recursive: _Recursive = False,
    attention_maps: _AttentionMaps = None,
    resume: _Resume = False,
    create_dirs: _CreateDirs = False,
    shard: _Shard = None,
    strict: _Strict = False,
    device: _Device = "auto",
    precision: _Precision = "auto",
    grounding: _Grounding = "auto",
    sidecar: _Sidecar = None,
    sidecar_name: _SidecarName = "stem",
    embed: _Embed = False,
    overwrite: _Overwrite = False,
    dry_run: _DryRun = False,
    html: _Html = None,
    min_confidence: _MinConfidence = None,
    engine: _Engine = "local",
    gpus_per_worker: _GpusPerWorker = 0.0,
    address: _Address = None,
) -> None:
    """Caption photos: files and folders in, one record per image out (caption, logprob, labels, or error).

    Also webdataset tar shards and parquet/CSV tables of photo paths or bytes, local or s3://, into .parquet."""
    from .caption import parse_shard
    from .captioner import Captioner
    from .engines.base import EngineOptions
    from .engines.job import wants_job
    from .outputs import check_paths, output_format
    from .publish import PublishRequest

    job = wants_job(paths, out, engine)
    if not job:
        output_format(out)  # fail on a bad -o before loading anything
    check_paths(paths, out, create_dirs)
    shard_ij = parse_shard(shard) if shard is not None else None
    request = PublishRequest(sidecars=tuple(sidecar or ()), embed=embed, naming=sidecar_name, overwrite=overwrite,
                             dry_run=dry_run, html=html, min_confidence=min_confidence)
    if not job:
        request.check(out, paths, recursive)
    captioner = Captioner.load(model, device=device, precision=precision, grounding=grounding)
    console.print(f"model {escape(display(str(captioner.source)))}, search precision {captioner.precision}"
                  + (" (auto)" if precision == "auto" else ""), highlight=False, soft_wrap=True)
    search = EngineOptions(beam, max_len, top_k, length_penalty, batch_size)
    if job:
        from .engines.job import caption_job_command

        return _caption_job_summary(caption_job_command(
            captioner, paths, out, engine=engine, workers=workers, gpus_per_worker=gpus_per_worker, address=address,
            recursive=recursive, resume=resume, shard=shard_ij, device=device, precision=precision,
            attention_maps=attention_maps, publishing=request.wanted, progress=RichProgress(), beam=beam,
            top_k=top_k, max_len=max_len, batch_size=batch_size, length_penalty=length_penalty),
            out, strict)
    _caption_local(captioner, paths, out, search, 2 if workers is None else workers, recursive, attention_maps,
                   resume, shard_ij, request, model, strict)


def _caption_local(captioner: Any, paths: list[Path], out: Path, search: EngineOptions, workers: int,
                   recursive: bool, attention_maps: Path | None, resume: bool, shard: tuple[int, int] | None,
                   request: PublishRequest, model: Path | None, strict: bool) -> None:
    """Files and folders into a .json/.jsonl/.csv, then publishing; the summary and --strict's verdict."""
    from .caption import caption_files

    try:
        s = caption_files(captioner, paths, out, beam_size=search.beam_size, batch_size=search.batch_size,
                          workers=workers, max_len=search.max_len, top_k=search.top_k,
                          length_penalty=search.length_penalty, recursive=recursive,
                          attention_maps=attention_maps, resume=resume, shard=shard, keep_records=request.wanted,
                          progress=RichProgress())
    except KeyboardInterrupt:
        _interrupted(out)
    _caption_summary(s, out)
    n_publish_failed = _publish(s.output, request, model) if s.output is not None else 0
    if strict and (s.failed or s.unsupported or n_publish_failed):
        what = [f"{s.failed} image(s) failed" if s.failed else "",
                f"{s.n_unsupported} file(s) skipped as unsupported" if s.unsupported else "",
                f"{n_publish_failed} metadata write(s) failed" if n_publish_failed else ""]
        _error(f"{' and '.join(w for w in what if w)} (--strict)")
        raise typer.Exit(1)


def _caption_job_summary(s: CaptionSummary, out: Path, strict: bool) -> None:
    """The summary of a job run by capcli.engines.job (tars, tables, s3://, .parquet, --engine ray)."""
    _caption_summary(s, out)
    if strict and s.failed:
        _error(f"{s.failed} image(s) failed (--strict)")
        raise typer.Exit(1)


def _caption_summary(s: CaptionSummary, out: Path) -> None:
    """The caption command's summary line; exit 1 when no image could be captioned."""
    extra = "".join([f", {s.skipped} already done" if s.skipped else "",
                     f", {s.outside_shard} in other shards" if s.outside_shard else "",
                     s.left_out_text()])
    nothing = s.failed and not s.captioned and not s.skipped  # (on --resume the photos already done count)
    colour = "red" if nothing else "yellow" if s.failed or s.unsupported else "green"
    console.print(f"[{colour}]captioned {s.captioned}, failed {s.failed}[/]{extra} in {s.seconds:.1f} s of "
                  f"captioning ({s.rate:.1f} img/s; the model's loading apart) -> {escape(display(str(out)))}",
                  highlight=False, soft_wrap=True)
    if nothing:
        _error("no image could be captioned")
        raise typer.Exit(1)


def _interrupted(out: Path) -> None:
    """Ctrl-C during captioning: what is kept, and how to go on."""
    from .outputs import read_records

    try:
        kept = f"{len(read_records(out))} record(s) are kept in {escape(display(str(out)))}"
    except (CapcliError, OSError):
        kept = "nothing was written"
    err_console.print(f"[yellow]interrupted:[/] {kept}; run the same command with --resume to caption the rest",
                      highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _publish(run: Captioned, request: PublishRequest, model: Path | None) -> int:
    """Run caption's publishing step on what the run captioned and render it: one line per file not written, then
    the counts."""
    from .captioner import SHIPPED_MODELS
    from .publish import publish_captioned

    name = "attention" if model is None else str(model) if str(model) in SHIPPED_MODELS else model.name
    rep = publish_captioned(run, request, model=name)
    for r in rep.results:
        if r.status is not r.status.WRITTEN:
            colour = {"failed": "red", "skipped": "yellow"}.get(r.status.value, "cyan")
            console.print(f"[{colour}]{escape(display(r.describe()))}[/]", highlight=False, soft_wrap=True)
    if request.hows:
        c = rep.counts()
        done = f"would write {c['would-write']}" if request.dry_run else f"wrote {c['written']}"
        console.print(f"metadata ({', '.join(request.hows)}): {done}, skipped {c['skipped']} (a person's words; "
                      f"--overwrite replaces them), failed {c['failed']}", highlight=False, soft_wrap=True)
    if rep.held_back or rep.labelled:
        console.print(f"[yellow]{len(rep.held_back) + len(rep.labelled)} record(s) below --min-confidence "
                      f"{request.min_confidence}: marked low_confidence in the output; metadata and sidecars got "
                      f"their labels ('Image may contain: ...') for {len(rep.labelled)}, nothing for "
                      f"{len(rep.held_back)} (no label with the evidence)[/]", highlight=False)
    if rep.gallery is not None:
        console.print(f"gallery -> {escape(display(str(rep.gallery)))}", highlight=False, soft_wrap=True)
    return len(rep.failed)
