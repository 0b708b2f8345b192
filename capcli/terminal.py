"""What the command line shows: one Rich console for stdout and one for stderr, the ``error:`` line, and library
progress rendered as Rich progress bars. Shared by every command module (``cli.py``, ``cli_caption.py``)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichBar

from .names import display
from .progress import Progress

console = Console()
err_console = Console(stderr=True)



def error_line(message: str) -> None:
    """One red ``error:`` line on stderr (a file name that is not UTF-8 shown with ``\\xNN``)."""
    err_console.print(f"[bold red]error:[/] {escape(display(message))}", highlight=False, soft_wrap=True)


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
