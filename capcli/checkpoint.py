"""The one checkpoint format. Plain data only, so it loads with ``torch.load(weights_only=True)``::

    {"format": "capcli-checkpoint/1",
     "config":  {"arch": "attention", ...},           # the model's JSON-able config (models.build reads it)
     "vocab":   {...},                                # Vocabulary.to_dict()
     "encoder": {"name": "efficientnet-lite0", ...},  # EncoderSpec.to_dict(): what features it expects
     "model":   state_dict,
     "encoder_state": state_dict | None,              # only when the encoder was fine-tuned
     "metrics": {...},                                # e.g. best val scores, epoch
     "familiarity": {...} | None,                     # the training photos, for grounding (familiar.py)
     "train_state": {...} | None}                     # optimiser, scheduler, epoch, step, RNG: for --resume

Writes go to a temporary file in the same folder and are renamed into place, so a crash never
leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save({"format": FORMAT, **ckpt}, tmp)
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only folder: the previous checkpoint (if any) is untouched
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a capcli checkpoint with ``weights_only=True``; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # untrusted bytes: torch.load raises all kinds (KeyError for a text file...)
        raise CheckpointError(f"{path} is not a readable capcli checkpoint ({describe_load_error(e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a capcli checkpoint (expected format {FORMAT})")
    for key in ("config", "vocab", "encoder", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint is missing {key!r}")
        if not isinstance(ckpt[key], dict):
            raise CheckpointError(f"{path}: checkpoint entry {key!r} is malformed")
    if "name" not in ckpt["encoder"]:
        raise CheckpointError(f"{path}: checkpoint does not name its encoder")
    return ckpt


def describe_load_error(e: Exception) -> str:
    """A short, one-line reason for a failed ``torch.load`` (torch's own messages are paragraphs)."""
    text = str(e).strip()
    if isinstance(e, EOFError) or (isinstance(e, pickle.UnpicklingError) and not text):
        return "empty or truncated file"
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return f"it holds a Python object ({found.group(1)}) that a safe weights-only load refuses"
        return "not a torch checkpoint: corrupt or another kind of file"
    if isinstance(e, PermissionError):
        return "permission denied"
    # torch's zip reader says "[Errno 22] Invalid argument" or a miniz paragraph for a truncated file
    if isinstance(e, zipfile.BadZipFile) or "zip archive" in text or getattr(e, "errno", None) == errno.EINVAL:
        return "corrupt or truncated file"
    if isinstance(e, KeyError | IndexError | TypeError | ValueError | AttributeError):
        return "not a torch checkpoint: corrupt or another kind of file"
    first = text.splitlines()[0] if text else type(e).__name__
    return first[:160]


def check_encoder(ckpt: dict[str, Any], encoder_name: str, where: str) -> None:
    """Fail clearly when features or images come from another encoder than the checkpoint's."""
    expected = ckpt["encoder"]["name"]
    if expected != encoder_name:
        raise CheckpointError(
            f"the model expects {expected} features but {where} uses {encoder_name}; "
            f"extract features with --encoder {expected}"
        )
