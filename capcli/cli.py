"""The ``capcli`` command line: parse options, call the API, render with Rich. No logic here.

Each subcommand calls the module named after it; library errors (:class:`CapcliError`) become one
red line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichBar
from rich.table import Table
from typer.core import TyperGroup, TyperOption

from . import __version__
from .config import TrainConfig
from .errors import PATH_ERRNOS, WRITE_ERRNOS, CapcliError, os_reason
from .names import display
from .progress import Progress
from .runtime import tune_cpu_allocator

if TYPE_CHECKING:
    import torch

    from .caption import Captioned, CaptionSummary
    from .chair import ChairScores
    from .evaluate import Evaluation
    from .publish import PublishRequest

console = Console()
err_console = Console(stderr=True)

_typer_type_label = TyperOption.display_type_rich


def _type_label(self: TyperOption, ctx):  # noqa: ANN001, ANN202 (typer's vendored click Context)
    """A flag takes no value, so its help shows none. Typer's Rich help asks every option for a type label,
    flags included, and so printed ``<bool>`` beside ``--help``, ``--version`` and every flag; its plain help
    already leaves flags out."""
    return None if self.is_flag or self.count else _typer_type_label(self, ctx)


TyperOption.display_type_rich = _type_label  # type: ignore[method-assign]


def _error(message: str) -> None:
    """One red ``error:`` line on stderr (a file name that is not UTF-8 shown with ``\\xNN``)."""
    err_console.print(f"[bold red]error:[/] {escape(display(message))}", highlight=False, soft_wrap=True)


class _Group(TyperGroup):
    """Turns library errors and Ctrl-C into one line and an exit status."""

    def invoke(self, ctx):  # noqa: ANN001 (typer's vendored click Context)
        try:
            return super().invoke(ctx)
        except CapcliError as e:
            _error(str(e))
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            if e.errno not in WRITE_ERRNOS | PATH_ERRNOS:
                raise
            # a full disk (or a read-only one, a quota, an impossible path) met where no library code expected it
            where = f" ({e.filename})" if e.filename else ""
            _error(f"{os_reason(e)}{where}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    help="capcli: natural-language captions for photos. Fetch data, extract CNN features, train Show and "
    "Tell or Show, Attend and Tell, evaluate with the COCO metrics, caption whole folders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class RichProgress(Progress):
    """Renders library progress as a Rich progress bar with a rate and an ETA."""

    def __init__(self, console: Console = err_console, unit_rate: bool = True) -> None:
        self.console = console
        self._bar: RichBar | None = None
        self._task = None
        self._t0 = 0.0
        self._n = 0
        self._total: int | None = None
        self._unit = "img"

    def start(self, description: str, total: int | None = None, unit: str = "img") -> None:
        self.done()
        self._unit, self._n, self._t0, self._total = unit, 0, time.perf_counter(), total
        self._bar = RichBar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, rate="", info="", eta="-:--:--")

    def advance(self, n: int = 1, **fields: object) -> None:
        if self._bar is None:
            return
        self._n += n
        dt = max(time.perf_counter() - self._t0, 1e-9)
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._bar.update(self._task, advance=n, rate=f"{self._n / dt:.1f} {self._unit}/s", info=info,
                         eta=eta_text(self._n, self._total, dt))

    def done(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def info(self, message: str) -> None:
        (self._bar.console if self._bar else self.console).print(message, highlight=False)

    def warn(self, message: str) -> None:
        (self._bar.console if self._bar else self.console).print(f"[yellow]warning:[/] {escape(display(message))}",
                                                                 highlight=False)


def eta_text(done: int, total: float | None, seconds: float) -> str:
    """The time left at the run's own mean rate so far (done / seconds since the phase began).

    Rich's own estimate averages the rate over its samples' span; items that arrive in bursts (a batch of
    128 results at once) make that span milliseconds and the estimate absurd (``ETA 0:00:01`` for 7,000
    images at 80 img/s), so the ETA is computed from the same rate the bar shows.
    """
    if not total or done <= 0 or seconds <= 0:
        return "-:--:--"
    left = max(total - done, 0) * seconds / done
    h, rem = divmod(round(left), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def _version(value: bool) -> None:
    if value:
        console.print(f"capcli {__version__}")
        raise typer.Exit()


_ROOT_HELP = "Data root for fetch, prepare, features, train, evaluate and info (env CAPCLI_HOME; default ~/.capcli)."
_ROOT_KEY = "capcli.root"


def _inherit_root(ctx: typer.Context, value: Path | None) -> Path | None:
    """A command's ``--root``, else the one given before the command (``capcli --root DIR CMD``)."""
    return value if value is not None else ctx.meta.get(_ROOT_KEY)


DataRoot = Annotated[Path | None, typer.Option("--root", help=_ROOT_HELP, callback=_inherit_root)]


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    root: Annotated[Path | None, typer.Option("--root", help=_ROOT_HELP + " Also accepted after the command.")]
    = None,
) -> None:
    """capcli: natural-language captions for photos."""
    ctx.meta[_ROOT_KEY] = root  # ctx.meta is shared with the command's context
    # The command opts in to the process-wide allocator tuning that makes CPU forward passes up to ~2x faster
    # (the library never does it itself); one command runs and exits, so keeping its peak heap costs nothing.
    tune_cpu_allocator()


# --- prepare ---------------------------------------------------------------------------------------
@app.command()
def prepare(
    source: Annotated[Path, typer.Argument(help="Annotation file or dataset folder (COCO, Karpathy, Flickr8k, CSV).")],
    kind: Annotated[str, typer.Option(help="auto | coco | karpathy | flickr8k | csv | coco-splits")] = "auto",
    images: Annotated[Path | None, typer.Option(help="Folder of the image files, if not next to the source.")] = None,
    splits: Annotated[Path | None, typer.Option(help="coco-splits: JSON of split name -> file names.")] = None,
    karpathy: Annotated[Path | None, typer.Option(help="coco: Karpathy split file (dataset_coco.json).")] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the source folder's name).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: ROOT/datasets/NAME).")] = None,
    root: DataRoot = None,
) -> None:
    """Build capcli's canonical dataset layout (dataset.json) from a captioning dataset."""
    from .prepare import prepare as run_prepare

    _, rep = run_prepare(source, kind=kind, images=images, splits=splits, karpathy=karpathy, name=name,
                         out=out, progress=RichProgress(), root=root)
    for note in rep.notes:
        err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(rep.splits.items()))
    console.print(f"prepared {rep.images} images, {rep.captions} captions ({counts}) from {rep.kind} -> {rep.out}",
                  highlight=False, soft_wrap=True)


# --- fetch -----------------------------------------------------------------------------------------
class _FetchProgress(RichProgress):
    """RichProgress that shows byte phases (unit "B") as size done/total, transfer speed and ETA."""

    def start(self, description: str, total: int | None = None, unit: str = "img") -> None:
        if unit != "B":
            super().start(description, total, unit)
            return
        from rich.progress import DownloadColumn, TransferSpeedColumn

        self.done()
        self._unit, self._n, self._t0 = unit, 0, time.perf_counter()
        self._bar = RichBar(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TaskProgressColumn(),
                            TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, rate="", info="")


@app.command()
def fetch(
    dataset: Annotated[str, typer.Argument(help="coco | flickr8k")],
    year: Annotated[int, typer.Option(help="COCO release: 2014 or 2017.")] = 2014,
    only: Annotated[str | None, typer.Option(help="annotations | images: fetch one part (prepare waits for both).")]
    = None,
    karpathy: Annotated[str | None, typer.Option(
        help="COCO 2014: URL or path of Karpathy's caption_datasets.zip or dataset_coco.json.")] = None,
    mirror: Annotated[str | None, typer.Option(
        help="Fetch every file from MIRROR/<file name> instead of the official hosts (env CAPCLI_MIRROR).")] = None,
    delete_archives: Annotated[bool, typer.Option(
        "--delete-archives", help="Delete each zip once extracted (saves about half the disk).")] = False,
    root: DataRoot = None,
) -> None:
    """Download a dataset from its official hosts (resumable, verified), extract it and prepare it."""
    from .fetch import fetch as run_fetch

    res = run_fetch(dataset, year=year, root=root, only=only, mirror=mirror, karpathy=karpathy,
                    keep_archives=not delete_archives, progress=_FetchProgress())
    for note in res.notes:
        err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if res.report is not None:
        rep = res.report
        counts = ", ".join(f"{k} {v}" for k, v in sorted(rep.splits.items()))
        console.print(f"prepared {rep.images} images, {rep.captions} captions ({counts}) -> {rep.out}",
                      highlight=False, soft_wrap=True)
    elif res.dataset is not None:
        console.print(f"{res.name} is already fetched and prepared: {res.dataset}", highlight=False, soft_wrap=True)
    else:
        console.print(f"fetched into {res.raw}", highlight=False, soft_wrap=True)
    if res.dataset is not None:
        extra = f" --root {root}" if root is not None else ""
        console.print(f"next: capcli features {res.name}{extra}", highlight=False, soft_wrap=True)


# --- features --------------------------------------------------------------------------------------
@app.command()
def features(
    dataset: Annotated[str, typer.Argument(help="Prepared dataset folder (with dataset.json) or a dataset name "
                                           "under the data root.")],
    encoder: Annotated[str, typer.Option(help="Image encoder (see `capcli info`).")] = "efficientnet-lite0",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: ROOT/features/DATASET/ENCODER).")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per HDF5 shard.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder forward pass.")] = 32,
    workers: Annotated[int | None, typer.Option(min=0, help="Image decoders working beside the encoder (threads "
                                                "on the CPU, processes with CUDA; 0: decode in turn; default 2). "
                                                "--engine ray: captioning actors (default: sized to the cluster).")
                       ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    weights: Annotated[Path | None, typer.Option(help="Encoder weights file (torchvision state dict).")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Extract the shards with unreadable images "
                                               "again (after mending the photos).")] = False,
    root: DataRoot = None,
) -> None:
    """Extract CNN features (spatial grid + pooled vector) of every image into resumable HDF5 shards."""
    from .features import FeatureStore, extract_features
    from .layout import open_dataset

    ds = open_dataset(dataset, root)
    folder = extract_features(ds, encoder, out, shard_size=shard_size, batch_size=batch_size, workers=workers,
                              device=device, weights=weights, root=root, retry_failed=retry_failed,
                              progress=RichProgress())
    store = FeatureStore(folder)
    n_failed = len(store.failed)
    failed = f", {n_failed} unreadable skipped" if n_failed else ""
    console.print(f"features: {len(store)} images{failed}, grid {store.num_regions}x{store.feature_dim} "
                  f"+ pooled {store.feature_dim} ({store.encoder_name}, float16) -> {display(str(folder))}",
                  highlight=False)


# --- train -----------------------------------------------------------------------------------------
def _train_options() -> list[inspect.Parameter]:
    """``capcli train``'s options, one per TrainConfig field, from the field's type, default and help
    (capcli.config imports no torch, so `capcli --help` stays fast)."""
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if meta.get("shared"):  # --root: the option every data command shares
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=DataRoot))
            continue
        decls = ("--" + f.name.replace("_", "-"),) if meta["flag"] else ()
        kind = (Path | None) if meta["path"] else hints[f.name]
        annotation = Annotated[kind, typer.Option(*decls, help=meta["help"])]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=annotation))
    return params


def train_cmd(**options: Any) -> None:
    """Train Show and Tell (basic) or Show, Attend and Tell (attention) on cached features or end to end.

    Under `torchrun --nproc_per_node N` it trains with DistributedDataParallel.
    """
    from .train import train as run_train

    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    res = run_train(TrainConfig(**options), progress=RichProgress())
    for note in res.notes:
        err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if not res.best_metrics:  # a rank other than 0 under torchrun, or nothing recorded
        return
    m = res.best_metrics
    t = Table(title=f"best on {m.get('split', 'val')} ({m.get('images', '?')} images), epoch {m.get('epoch')}, "
              "percent")
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"):
        if key in m:
            t.add_column(key, justify="right")
    t.add_row(*(f"{100 * m[k]:.1f}" for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr") if k in m))
    console.print(t)
    console.print(f"best checkpoint: {res.best_path}\nresumable: {res.last_path}\ncurves: {res.out / 'curves.png'}",
                  highlight=False, soft_wrap=True)


train_cmd.__signature__ = inspect.Signature(_train_options())  # type: ignore[attr-defined]
train_cmd.__annotations__ = {p.name: p.annotation for p in train_cmd.__signature__.parameters.values()}
app.command("train")(train_cmd)


# --- evaluate --------------------------------------------------------------------------------------
@app.command()
def evaluate(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint to evaluate (default: the caption command's default model).")
    ] = None,
    data: Annotated[str, typer.Option("--data", help="Prepared dataset folder, or a dataset name under the root.")] = (
        ""
    ),
    split: Annotated[str, typer.Option(help="Split to score: val | test | train; several joined by +, e.g. train+val.")
                     ] = "val",
    results: Annotated[
        Path | None, typer.Option("--results", help="Score this COCO results file instead of a checkpoint.")
    ] = None,
    beam: Annotated[int, typer.Option(min=1, help="Beam size for captioning.")] = 3,
    length_penalty: Annotated[
        float, typer.Option("--length-penalty", min=0.0, help="Rank beams by logprob / len^ALPHA (0 = raw; 0-5).")
    ] = 0.0,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the results and metrics JSON (default: the checkpoint's folder, the "
                                  "current folder for the default model, or next to the --results file).")
    ] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report here.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per captioning batch.")] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(
        help="Search arithmetic: float32 (exact, the same on every machine) | auto (as `capcli caption`) | bfloat16 "
        "| int8."
    )] = "float32",
    grounding: Annotated[str, typer.Option(
        help="auto (ground captions in the encoder's ImageNet evidence, as `capcli caption`) | off.")] = "auto",
    allow_missing: Annotated[
        bool, typer.Option("--allow-missing", help="With --results: score only the images that have a caption.")
    ] = False,
    tokenizer: Annotated[
        str, typer.Option(help="auto (the Java PTBTokenizer when java is found) | java | python")
    ] = "auto",
    root: DataRoot = None,
) -> None:
    """Score captions with the COCO caption toolkit (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; SPICE if installed) and
    object hallucination (CHAIR_s, CHAIR_i)."""
    from . import evaluate as ev

    done = ev.run(data, checkpoint, results=results, split=split, beam=beam, length_penalty=length_penalty, out=out,
                  html=html, batch_size=batch_size, device=device, precision=precision, grounding=grounding,
                  allow_missing=allow_missing, tokenizer=tokenizer, root=root, progress=RichProgress())
    _render_evaluation(done)


def _render_evaluation(done: Evaluation) -> None:
    """The scores as a table (CHAIR under the toolkit's metrics), the notes on stderr, the files written."""
    from .evaluate import METRIC_KEYS

    scores, captions = done.scores, done.captions
    how = "the COCO toolkit's Java PTBTokenizer" if scores.tokenizer == "ptb" else "capcli's Python tokenizer"
    console.print(f"{done.dataset.name} {done.split}: {len(captions)} images, tokenised by {how}", highlight=False)
    t = Table()
    t.add_column("metric")
    t.add_column("score (%)", justify="right")  # percent, as the README and the papers; the JSON keeps 0..1
    t.add_column("")
    for key in METRIC_KEYS:
        if key in scores.values:
            kind = "official" if scores.official.get(key) else "[yellow]approximate[/]"
            t.add_row(key, f"{100 * scores.values[key]:.1f}", kind)
        elif key in scores.skipped:
            t.add_row(key, "-", "[dim]skipped[/]")
    _add_chair_rows(t, scores.chair)
    console.print(t)
    if scores.chair is not None and scores.chair.top_hallucinated:
        top = ", ".join(f"{c} {n}" for c, n in scores.chair.top_hallucinated)
        console.print(f"most often hallucinated: {top}", highlight=False, soft_wrap=True)
    for note in scores.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for path in done.written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def _add_chair_rows(table: Table, chair: ChairScores | None) -> None:
    """CHAIR_s and CHAIR_i (percent, lower is better) under the toolkit's metrics, with their counts."""
    if chair is None:
        return
    table.add_row("CHAIR_s", f"{chair.chair_s:.1f}%",
                  f"{chair.captions_hallucinating} of {chair.captions} captions hallucinate (lower is better)")
    table.add_row("CHAIR_i", f"{chair.chair_i:.1f}%" if chair.chair_i is not None else "-",
                  f"{chair.hallucinated} of {chair.mentioned} objects mentioned are hallucinated")


# --- caption ---------------------------------------------------------------------------------------
@app.command()
def caption(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output file: .json, .jsonl or .csv.")],
    model: Annotated[Path | None, typer.Option(
        "--model", help="Checkpoint file, or a shipped model: attention (the default) | basic.")] = None,
    beam: Annotated[int, typer.Option(min=1, help="Beam size (1 = greedy).")] = 3,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Also list the K best beams as alternatives.")] = 1,
    max_len: Annotated[int, typer.Option("--max-len", min=1, help="Longest caption, in words (1-100).")] = 20,
    length_penalty: Annotated[
        float, typer.Option("--length-penalty", min=0.0, help="Rank beams by logprob / len^ALPHA (0 = raw; 0-5).")
    ] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 32,
    workers: Annotated[int | None, typer.Option(min=0, help="Image decoders working beside the encoder (threads "
                                                "on the CPU, processes with CUDA; 0: decode in turn; default 2). "
                                                "--engine ray: captioning actors (default: sized to the cluster).")
                       ] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into subfolders.")] = False,
    attention_maps: Annotated[
        Path | None, typer.Option("--attention-maps", help="Write a PNG per image: where each word looked.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep OUT's records; caption only the rest.")] = False,
    create_dirs: Annotated[bool, typer.Option("--create-dirs", help="Create -o's missing folders (without it a "
                                              "missing folder is an error, as a mistyped path usually is).")
                           ] = False,
    shard: Annotated[
        str | None, typer.Option(help="I/N: caption only shard I (0..N-1) of N, split by a hash of the path.")
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit non-zero if any image failed or any file in the "
                                         "folders was skipped as unsupported.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(
        help="Search arithmetic: auto (int8 or bfloat16 products where the CPU computes them natively: 2-3x "
        "faster) | float32 | bfloat16 | int8."
    )] = "auto",
    grounding: Annotated[str, typer.Option(
        help="auto: ground captions in what the encoder's ImageNet head recognises (say confident objects, hold back "
        "what it contradicts, add labels) where the model's encoder has that head | off.")] = "auto",
    sidecar: Annotated[list[str] | None, typer.Option(
        "--sidecar", help="Also write each caption to a sidecar beside its photo: xmp | txt (repeatable).")] = None,
    sidecar_name: Annotated[str, typer.Option(
        "--sidecar-name", help="XMP sidecar names: stem (photo.xmp, Lightroom) | ext (photo.jpg.xmp, darktable).")
    ] = "stem",
    embed: Annotated[bool, typer.Option("--embed", help="Also write each caption into its photo's XMP (metadata "
                                        "only, atomically; RAW files: use --sidecar xmp).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace captions a person wrote or edited in the "
                                            "photos and sidecars too.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what --sidecar/--embed would write and where; "
                                          "write nothing into photos or sidecars.")] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a review gallery page here (one card "
                                              "per photo, least confident first).")] = None,
    min_confidence: Annotated[float | None, typer.Option(
        "--min-confidence", help="Keep records whose confidence is below this out of metadata and sidecars "
        "(they stay in the output, marked low_confidence).")] = None,
    engine: Annotated[str, typer.Option(help="local (this process) | ray (a Ray cluster: --address or RAY_ADDRESS, "
                                        "else a local Ray started and stopped here; pip install \"capcli\\[ray]\").")
                      ] = "local",
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0.0, help="Ray engine: GPUs per "
                                                   "captioning actor (0: CPU actors).")] = 0.0,
    address: Annotated[str | None, typer.Option(help="Ray engine: the cluster to join (auto, HOST:6379, "
                                                "ray://HOST:10001; default: RAY_ADDRESS).")] = None,
) -> None:
    """Caption photos: files and folders in, one record per image out (caption, logprob, labels, or error).

    Also webdataset tar shards and parquet/CSV tables of photo paths or bytes, local or s3://, into .parquet."""
    from .caption import caption_files, parse_shard
    from .captioner import Captioner
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
    if job:
        from .engines.job import caption_job_command

        return _caption_job_summary(caption_job_command(
            captioner, paths, out, engine=engine, workers=workers, gpus_per_worker=gpus_per_worker, address=address,
            beam=beam, top_k=top_k, max_len=max_len, batch_size=batch_size, length_penalty=length_penalty,
            recursive=recursive, resume=resume, shard=shard_ij, device=device, precision=precision,
            attention_maps=attention_maps, publishing=request.wanted, progress=RichProgress()),
            out, strict)
    try:
        s = caption_files(captioner, paths, out, beam_size=beam, batch_size=batch_size,
                          workers=2 if workers is None else workers,
                          max_len=max_len, top_k=top_k, length_penalty=length_penalty, recursive=recursive,
                          attention_maps=attention_maps, resume=resume, shard=shard_ij, keep_records=request.wanted,
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


# --- info ------------------------------------------------------------------------------------------
@app.command()
def info(root: DataRoot = None) -> None:
    """Show versions, the compute device, the data root and what is in it."""
    import torch

    from . import paths
    from .encoders import encoders_text

    t = Table(show_header=False, box=None)
    t.add_row("capcli", __version__)
    t.add_row("torch", torch.__version__)
    t.add_row("device", f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu")
    t.add_row("search precision", _auto_precision(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    java = shutil.which("java")
    t.add_row("java", f"{java} (the official PTB tokenizer and METEOR)" if java else
              "not found: evaluate tokenises with capcli's Python tokenizer (approximate) and cannot run METEOR")
    home = paths.home(root)
    t.add_row("data root", str(home))
    t.add_row("encoders", encoders_text())
    for sub in ("datasets", "features", "runs"):
        d = home / sub
        found = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        t.add_row(sub, ", ".join(found) or "-")
    console.print(t)


def _auto_precision(device: torch.device) -> str:
    """What ``--precision auto`` picks for the caption search on this machine, and why."""
    from .runtime import resolve_precision

    chosen = resolve_precision("auto", device)
    why = {"int8": "the CPU has VNNI", "bfloat16": "the CPU computes bfloat16 natively",
           "float32": "no faster arithmetic here" if device.type == "cpu" else "on a GPU"}
    return f"{chosen} (what --precision auto picks: {why[chosen]})"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
