"""A run's folder and state: which run this is (new, or resumed from ``OUT/last.pt``), where it stands
(:class:`RunState`, what resume restores), its checkpoints, its log (``metrics.jsonl``, ``curves.png``), Ctrl-C
handling, and :class:`RunContext`: all of it together, what each stage of the loop takes."""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import paths
from ..checkpoint import Checkpoint
from ..config import TrainConfig, check_config, merge_resumed
from ..errors import CheckpointError, UsageError
from ..layout import Dataset
from ..progress import Progress
from .data import Data, resolve_dataset
from .distributed import Dist
from .model import Net, Optim

PLOT_EVERY_S = 30.0  # redraw curves.png after an epoch at most this often (and always at the end)


@dataclass
class RunFiles:
    out: Path

    @property
    def last(self) -> Path:  # after every epoch, with the training state
        return self.out / "last.pt"

    @property
    def best(self) -> Path:  # the best validation score's weights
        return self.out / "best.pt"

    @property
    def metrics(self) -> Path:  # one JSON row per epoch
        return self.out / "metrics.jsonl"

    @property
    def curves(self) -> Path:
        return self.out / "curves.png"


@dataclass
class Run:
    cfg: TrainConfig  # with --resume: the checkpoint's settings, merged with the command line's
    ds: Dataset
    files: RunFiles
    resumed: Checkpoint | None  # OUT/last.pt, with --resume


def _load_resume(out: Path) -> Checkpoint:
    last = out / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"nothing to resume: no {last} (train without --resume first)")
    ckpt = Checkpoint.load(last)
    if not isinstance(ckpt.train_state, dict) or not isinstance(ckpt.train_config, dict):
        raise CheckpointError(f"{last} holds no training state to resume (only weights)")
    return ckpt


def open_run(cfg: TrainConfig, dist: Dist, progress: Progress) -> Run:
    """The dataset and run folder; with ``--resume`` the run's saved config (merged with the command line).
    A folder that holds a run is only reused with ``--resume`` or ``--overwrite``."""
    ckpt = None
    if cfg.resume and cfg.out:
        ckpt = _load_resume(Path(cfg.out))
        cfg = merge_resumed(cfg, ckpt.train_config, progress)
    ds = resolve_dataset(cfg, progress)
    out = Path(cfg.out) if cfg.out else paths.run_dir(ds.name, cfg.arch, cfg.root)
    if cfg.resume and ckpt is None:
        ckpt = _load_resume(out)
        cfg = merge_resumed(cfg, ckpt.train_config, progress)
    check_config(cfg)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run")
    if cfg.scst and dist.world > 1:
        raise UsageError("--scst trains in one process (its sampling loop bypasses DistributedDataParallel)")
    if not cfg.resume and (out / "last.pt").exists() and not cfg.overwrite:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it, --overwrite to "
                         "start over, or --out DIR to train elsewhere")
    return Run(cfg, ds, RunFiles(out), ckpt)


@dataclass
class RunState:
    """Where a run stands; saved in ``last.pt`` as ``train_state`` and restored by ``--resume``."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch finished
    step: int = 0  # optimiser steps in all
    best: float = -math.inf  # best selection metric so far ...
    best_epoch: int = 0  # ... and its epoch
    bad_epochs: int = 0  # epochs since it last improved
    loss_sum: float = 0.0  # sum of this epoch's batch losses so far
    ce_sum: float = 0.0  # ... of its cross-entropies (self-critical: mean rewards)
    loss_batches: int = 0
    stopped_early: bool = False
    best_metrics: dict[str, Any] = field(default_factory=dict)  # best.pt's metrics

    @classmethod
    def from_saved(cls, saved: dict) -> RunState:
        state = cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved and f.name != "best_metrics"})
        state.best_metrics = dict(saved.get("best_metrics", {}))
        return state

    def counters(self) -> dict[str, Any]:
        """Everything but ``best_metrics``, in train_state's order."""
        return {k: v for k, v in asdict(self).items() if k != "best_metrics"}


def resume_state(resumed: Checkpoint, opt: Optim, files: RunFiles, progress: Progress) -> RunState:
    """The resumed run's state, optimiser, schedule and every RNG, as ``last.pt`` saved them."""
    saved = resumed.train_state
    state = RunState.from_saved(saved)
    opt.optimizer.load_state_dict(saved["optimizer"])
    if opt.scheduler is not None and saved.get("scheduler") is not None:
        opt.scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    progress.info(f"resuming {files.last}: epoch {state.epoch + 1}, batch {state.batch}, step {state.step}")
    return state


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def _state_dict(module: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()
    return out


def checkpoint_of(ctx: RunContext, metrics: dict, resumable: bool = False) -> Checkpoint:
    """The run's model now: weights, vocabulary, configs and ``metrics``; ``resumable``, also everything
    ``--resume`` needs, in full precision. Else the weights in ``cfg.save_dtype``."""
    cfg, data, net = ctx.cfg, ctx.data, ctx.net
    dtype = torch.float16 if (cfg.save_dtype == "float16" and not resumable) else None
    ckpt = Checkpoint(config=net.model.config_dict(), vocab=data.vocab.to_dict(), encoder=data.spec.to_dict(),
                      model=_state_dict(net.model, dtype), metrics=metrics, train_config=cfg.to_dict())
    if net.encoder is not None:
        ckpt.encoder_state = _state_dict(net.encoder, dtype)
    if (fam := data.familiarity) is not None:
        ckpt.familiarity = fam.to_dict()
    if resumable:
        state, opt = ctx.state, ctx.opt
        ckpt.train_state = {
            **state.counters(), "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict() if opt.scheduler is not None else None,
            "rng": rng_state(), "best_metrics": state.best_metrics, "world_size": ctx.dist.world,
        }
    return ckpt


class RunLog:
    """``metrics.jsonl`` (one row per epoch) and ``curves.png`` drawn from it (rank 0 only)."""

    def __init__(self, files: RunFiles, progress: Progress) -> None:
        self.files, self.progress = files, progress
        self.last_plot = time.perf_counter()

    def start(self, resumed_epoch: int | None) -> None:
        """A new run clears the folder: nothing of an old run may pass for this one (``--overwrite``). A resumed
        one forgets the epochs logged after the state it resumes from."""
        f = self.files
        if resumed_epoch is None:
            f.out.mkdir(parents=True, exist_ok=True)
            for path in (f.metrics, f.curves, f.best, f.last):
                path.unlink(missing_ok=True)
        elif f.metrics.is_file():
            lines = [ln for ln in f.metrics.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= resumed_epoch]
            f.metrics.write_text("".join(ln + "\n" for ln in kept))

    def append(self, row: dict) -> None:
        with open(self.files.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def draw(self, force: bool = False) -> None:
        """Redraw the curves; unless ``force``, at most every ``PLOT_EVERY_S``. A plot never ends a run."""
        if not force and time.perf_counter() - self.last_plot <= PLOT_EVERY_S:
            return
        try:
            from ..viz import plot_curves

            plot_curves(self.files.metrics, self.files.curves)
        except Exception as e:  # noqa: BLE001 - a plot must never end a training run
            self.progress.warn(f"could not draw {self.files.curves}: {e}")
        self.last_plot = time.perf_counter()


class TornUpdate(KeyboardInterrupt):
    """Interrupted while parameters and optimiser state were changing: the step cannot be saved."""


class GracefulStop:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


@dataclass
class RunContext:
    """Everything the stages of a run share, made once by ``loop.setup``: what nanoGPT's train.py keeps in the
    variables of one script."""

    cfg: TrainConfig  # the run's settings (resumed: the checkpoint's, merged with the command line's)
    files: RunFiles
    data: Data
    net: Net
    opt: Optim
    state: RunState
    dist: Dist
    log: RunLog
    progress: Progress
    stop: GracefulStop = field(default_factory=GracefulStop)  # Ctrl-C / SIGTERM, while the epochs run
    unreadable: set[int] = field(default_factory=set)  # training image rows already warned about
