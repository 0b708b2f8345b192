"""The ``capcli`` command line: parse options, call the API, render with Rich. No logic here.

Each subcommand calls the module named after it; library errors (:class:`CapcliError`) become one
red line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
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
from typer.core import TyperGroup

from . import __version__
from .errors import CapcliError
from .progress import Progress

console = Console()
err_console = Console(stderr=True)


class _Group(TyperGroup):
    """Turns library errors and Ctrl-C into one line and an exit status."""

    def invoke(self, ctx):  # noqa: ANN001 (typer's vendored click Context)
        try:
            return super().invoke(ctx)
        except CapcliError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
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
        self._unit = "img"

    def start(self, description: str, total: int | None = None, unit: str = "img") -> None:
        self.done()
        self._unit, self._n, self._t0 = unit, 0, time.perf_counter()
        self._bar = RichBar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, rate="", info="")

    def advance(self, n: int = 1, **fields: object) -> None:
        if self._bar is None:
            return
        self._n += n
        dt = max(time.perf_counter() - self._t0, 1e-9)
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._bar.update(self._task, advance=n, rate=f"{self._n / dt:.1f} {self._unit}/s", info=info)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def info(self, message: str) -> None:
        (self._bar.console if self._bar else self.console).print(message, highlight=False)

    def warn(self, message: str) -> None:
        (self._bar.console if self._bar else self.console).print(f"[yellow]warning:[/] {message}", highlight=False)


def _version(value: bool) -> None:
    if value:
        console.print(f"capcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """capcli: natural-language captions for photos."""


DataRoot = Annotated[
    Path | None,
    typer.Option("--root", help="Data root for fetch/prepare/features/train [env CAPCLI_HOME; default ~/.capcli]."),
]


# --- prepare ---------------------------------------------------------------------------------------
@app.command()
def prepare(
    source: Annotated[Path, typer.Argument(help="Annotation file or dataset folder (COCO, Karpathy, Flickr8k, CSV).")],
    kind: Annotated[str, typer.Option(help="auto | coco | karpathy | flickr8k | csv | coco-splits")] = "auto",
    images: Annotated[Path | None, typer.Option(help="Folder of the image files, if not next to the source.")] = None,
    splits: Annotated[Path | None, typer.Option(help="coco-splits: JSON of split name -> file names.")] = None,
    karpathy: Annotated[Path | None, typer.Option(help="coco: Karpathy split file (dataset_coco.json).")] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name [default: the source folder's name].")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder [default: ROOT/datasets/NAME].")] = None,
    root: DataRoot = None,
) -> None:
    """Build capcli's canonical dataset layout (dataset.json) from a captioning dataset."""
    from . import paths
    from .prepare import prepare as run_prepare

    if out is None and root is not None:
        out = paths.dataset_dir(name or Path(source).resolve().name.lower(), root)
    _, rep = run_prepare(source, kind=kind, images=images, splits=splits, karpathy=karpathy, name=name,
                         out=out, progress=RichProgress())
    for note in rep.notes:
        err_console.print(f"note: {note}", highlight=False)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(rep.splits.items()))
    console.print(f"prepared {rep.images} images, {rep.captions} captions ({counts}) from {rep.kind} -> {rep.out}",
                  highlight=False)


# --- fetch -----------------------------------------------------------------------------------------

# --- features --------------------------------------------------------------------------------------

# --- train -----------------------------------------------------------------------------------------

# --- evaluate --------------------------------------------------------------------------------------

# --- caption ---------------------------------------------------------------------------------------

# --- info ------------------------------------------------------------------------------------------
@app.command()
def info(root: DataRoot = None) -> None:
    """Show versions, the compute device, the data root and what is in it."""
    import torch

    from . import paths
    from .encoders import list_encoders

    t = Table(show_header=False, box=None)
    t.add_row("capcli", __version__)
    t.add_row("torch", torch.__version__)
    t.add_row("device", f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu")
    home = paths.home(root)
    t.add_row("data root", str(home))
    t.add_row("encoders", ", ".join(list_encoders()))
    for sub in ("datasets", "features", "runs"):
        d = home / sub
        found = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        t.add_row(sub, ", ".join(found) or "-")
    console.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
