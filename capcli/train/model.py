"""The model (and, when fine-tuning, the encoder) a run trains, and its optimiser and learning-rate schedule."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..config import TrainConfig
from ..errors import CheckpointError
from ..models.base import CaptionModel
from ..progress import Progress
from .data import Data
from .distributed import Dist
from .glove import load_embeddings

PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 1  # halve the LR after 2 validations without improvement


@dataclass
class Net:
    """What learns. ``train_model`` / ``train_encoder`` are the same modules, wrapped in DDP with several ranks."""

    model: CaptionModel
    encoder: nn.Module | None  # the encoder being fine-tuned, else None (cached features)
    train_model: nn.Module
    train_encoder: nn.Module | None


@dataclass
class Optim:
    optimizer: torch.optim.Optimizer
    scheduler: Any  # ReduceLROnPlateau | CosineAnnealingLR | None
    params: list[nn.Parameter]  # everything that learns, for gradient clipping


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_config(cfg: TrainConfig, vocab_size: int, feature_dim: int) -> dict:
    """A new model's config (``capcli.models.build``) from the training options."""
    model_cfg = {"arch": cfg.arch, "vocab_size": vocab_size, "feature_dim": feature_dim, "embed_dim": cfg.embed_dim,
                 "hidden_dim": cfg.hidden_dim, "dropout": cfg.dropout, "cell": cfg.cell}
    model_cfg.update({"attention_dim": cfg.attention_dim} if cfg.arch == "attention" else {"condition": cfg.condition})
    return model_cfg


def build_model(cfg: TrainConfig, data: Data, resumed: Checkpoint | None, last_path: Path, dist: Dist,
                progress: Progress) -> Net:
    """The model: from ``data.start`` (resumed or ``--init-from``), else new from ``cfg.seed`` (the same initial
    weights on every rank), with ``--embeddings`` copied in; plus the encoder when fine-tuning."""
    from ..models import build

    if resumed is None:
        seed_all(cfg.seed)
    start = data.start
    model = build(start.config if start is not None else model_config(cfg, len(data.vocab), data.feature_dim))
    if start is not None:
        model.load_state_dict(start.model)
    elif cfg.embeddings:
        found, missing = load_embeddings(cfg.embeddings, data.vocab, model.embed.weight)
        progress.info(f"embeddings: {found} of {found + missing} words from {cfg.embeddings}; "
                      f"{missing} not in it were initialised randomly")
    if cfg.freeze_embeddings:
        model.embed.weight.requires_grad_(False)
    if resumed is None and dist.world > 1:
        torch.manual_seed(cfg.seed + 7919 * dist.rank)  # ... but each rank its own dropout masks
    model.to(dist.device)
    encoder = _fine_tuned_encoder(cfg, data, resumed, last_path, dist.device) if cfg.fine_tune_encoder else None
    return Net(model, encoder, dist.wrap(model), dist.wrap(encoder))


def _fine_tuned_encoder(cfg: TrainConfig, data: Data, resumed: Checkpoint | None, last_path: Path,
                        device: torch.device) -> nn.Module:
    """The encoder with its last ``fine_tune_blocks`` blocks trainable; in eval mode, so that its BatchNorm
    statistics (and stochastic depth) stay frozen and only its weights learn."""
    from ..encoders import create_encoder, trainable_parts

    encoder = create_encoder(data.spec.name, cfg.encoder_weights)
    encoder.requires_grad_(False)
    for part in trainable_parts(encoder, cfg.fine_tune_blocks):
        part.requires_grad_(True)
    if resumed is not None:
        if not resumed.encoder_state:
            raise CheckpointError(f"{last_path} holds no encoder weights to resume fine-tuning from")
        encoder.load_state_dict(resumed.encoder_state)
    return encoder.to(device).eval()


def configure_optimizers(cfg: TrainConfig, net: Net, steps_per_epoch: int, device: torch.device) -> Optim:
    """Adam over the decoder (``lr``) and the fine-tuned encoder parts (``encoder_lr``), and the LR schedule:
    plateau (halve on a stalled selection metric, stepped per epoch), cosine (per step) or none."""
    groups = [{"params": [p for p in net.model.parameters() if p.requires_grad], "lr": cfg.lr}]
    if net.encoder is not None:
        groups.append({"params": [p for p in net.encoder.parameters() if p.requires_grad], "lr": cfg.encoder_lr})
    # The fused kernel updates all parameters in one pass: ~4x cheaper than the default on a 10M-parameter model.
    optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    scheduler: Any = None
    if cfg.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE)
    elif cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(cfg.max_steps, total)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    return Optim(optimizer, scheduler, [p for g in groups for p in g["params"]])


def steps_per_epoch(n_captions: int, batch_size: int, world: int) -> int:
    return math.ceil(math.ceil(n_captions / world) / batch_size)
