"""The one checkpoint format. Plain data only, so it loads with ``torch.load(weights_only=True)``::

    {"format": "capcli-checkpoint/1",
     "config":  {"arch": "attention", ...},           # the model's JSON-able config (models.build reads it)
     "vocab":   {...},                                # Vocabulary.to_dict()
     "encoder": {"name": "efficientnet-lite0", ...},  # EncoderSpec.to_dict(): what features it expects
     "model":   state_dict,
     "encoder_state": state_dict | None,              # only when the encoder was fine-tuned
     "metrics": {...},                                # e.g. best val scores, epoch
     "train_state": {...} | None}                     # optimiser, scheduler, epoch, step, RNG: for --resume

Writes go to a temporary file in the same folder and are renamed into place, so a crash never
leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

FORMAT = "capcli-checkpoint/1"


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Atomically write ``ckpt`` (which must hold config, vocab, encoder, model) to ``path``."""
    for key in ("config", "vocab", "encoder", "model"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint is missing {key!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format": FORMAT, **ckpt}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a capcli checkpoint with ``weights_only=True``; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable capcli checkpoint ({first[:160]})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a capcli checkpoint (expected format {FORMAT})")
    for key in ("config", "vocab", "encoder", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint is missing {key!r}")
    return ckpt


def check_encoder(ckpt: dict[str, Any], encoder_name: str, where: str) -> None:
    """Fail clearly when features or images come from another encoder than the checkpoint's."""
    expected = ckpt["encoder"]["name"]
    if expected != encoder_name:
        raise CheckpointError(
            f"the model expects {expected} features but {where} uses {encoder_name}; "
            f"extract features with --encoder {expected}"
        )
