"""The ``capcli`` command line: parse options, call the API, render with Rich. No logic here.

Each subcommand calls the module named after it; library errors (:class:`CapcliError`) become one
red line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import shutil
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichBar
from rich.table import Table
from typer.core import TyperGroup, TyperOption

try:
    from typer._click.exceptions import NoSuchOption  # typer vendors Click since 0.2x
except ImportError:  # pragma: no cover - older typer, Click installed beside it
    from click.exceptions import NoSuchOption

from . import __version__
from .config import TrainConfig
from .errors import PATH_ERRNOS, WRITE_ERRNOS, CapcliError, os_reason
from .names import display
from .runtime import tune_cpu_allocator
from .terminal import RichProgress, console, err_console
from .terminal import error_line as _error

if TYPE_CHECKING:
    import torch

    from .chair import ChairScores
    from .evaluate import Evaluation

_typer_type_label = TyperOption.display_type_rich


def _type_label(self: TyperOption, ctx):  # noqa: ANN001, ANN202 (typer's vendored click Context)
    """A flag takes no value, so its help shows none. Typer's Rich help asks every option for a type label,
    flags included, and so printed ``<bool>`` beside ``--help``, ``--version`` and every flag; its plain help
    already leaves flags out."""
    return None if self.is_flag or self.count else _typer_type_label(self, ctx)


TyperOption.display_type_rich = _type_label  # type: ignore[method-assign]


def _near(name: str, options: list[str] | None) -> list[str]:
    """The options a mistyped one may mean, compared without their dashes: Click's own match counts the shared
    ``--`` and so offered ``--out`` for ``--bogus``."""
    bare = name.lstrip("-")
    return [o for o in options or [] if difflib.SequenceMatcher(None, bare, o.lstrip("-")).ratio() >= 0.6]


class _Group(TyperGroup):
    """Turns library errors and Ctrl-C into one line and an exit status."""

    def invoke(self, ctx):  # noqa: ANN001 (typer's vendored click Context)
        try:
            return super().invoke(ctx)
        except NoSuchOption as e:
            e.possibilities = _near(e.option_name, e.possibilities)
            raise
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
    workers: Annotated[int, typer.Option(min=0, help="Image decoders working beside the encoder (threads on "
                                         "the CPU, processes with CUDA; 0: decode in turn).")] = 2,
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
from .cli_caption import caption  # noqa: E402 (the command's own module; registered here)

app.command()(caption)


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
