"""Progress reporting without printing: library code calls a ``Progress``; the CLI renders it with Rich.

The default ``Progress`` reports nothing but sends ``info``/``warn`` to :mod:`logging`, so library
users get silence unless they ask for output.
"""

from __future__ import annotations

import logging

log = logging.getLogger("capcli")


class Progress:
    """Receives progress from long jobs. Subclass and override what you want to show."""

    def start(self, description: str, total: int | None = None, unit: str = "img") -> None:
        """A new phase begins with ``total`` items (None when unknown)."""

    def advance(self, n: int = 1, **fields: object) -> None:
        """``n`` more items are done; ``fields`` are shown beside the bar (loss=..., etc.)."""

    def done(self) -> None:
        """The current phase ended."""

    def info(self, message: str) -> None:
        log.info(message)

    def warn(self, message: str) -> None:
        log.warning(message)


NULL = Progress()
