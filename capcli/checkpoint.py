"""The one checkpoint format, :class:`Checkpoint`. On disk it is plain data only, so it loads with
``torch.load(weights_only=True)``::

    {"format": "capcli-checkpoint/1",
     "config":  {"arch": "attention", ...},           # the model's JSON-able config (models.build reads it)
     "vocab":   {...},                                # Vocabulary.to_dict()
     "encoder": {"name": "efficientnet-lite0", ...},  # EncoderSpec.to_dict(): what features it expects
     "model":   state_dict,
     "metrics": {...},                                # e.g. best val scores, epoch
     "train_config": {...},                           # TrainConfig.to_dict() of the run that wrote it
     "encoder_state": state_dict,                     # only when the encoder was fine-tuned
     "familiarity": {...},                            # the training photos, for grounding (familiar.py)
     "train_state": {...}}                            # optimiser, scheduler, epoch, step, RNG: for --resume

The entries after ``model`` are optional and left out of the file when absent. Writes go through
:mod:`capcli.atomic`, so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import errno
import pickle
import re
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .errors import CheckpointError

FORMAT = "capcli-checkpoint/1"
REQUIRED = ("config", "vocab", "encoder", "model")


@dataclass
class Checkpoint:
    """A capcli checkpoint; the fields in the file's order. ``path`` is where it was loaded from (not saved)."""

    config: dict[str, Any]  # the model's config: models.build(config)
    vocab: dict[str, Any]  # Vocabulary.to_dict()
    encoder: dict[str, Any]  # EncoderSpec.to_dict()
    model: dict[str, torch.Tensor]  # the model's state_dict
    metrics: dict[str, Any] | None = None
    train_config: dict[str, Any] | None = None
    encoder_state: dict[str, torch.Tensor] | None = None  # the fine-tuned encoder's state_dict
    familiarity: dict[str, Any] | None = None  # Familiarity.to_dict()
    train_state: dict[str, Any] | None = None  # what --resume restores (train/run.py)
    path: Path | None = field(default=None, compare=False, repr=False)

    @property
    def encoder_name(self) -> str:
        return self.encoder["name"]

    def to_dict(self) -> dict[str, Any]:
        """The file's contents: ``format`` first, then every entry that is present."""
        entries = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}
        return {"format": FORMAT, **{k: v for k, v in entries.items() if k in REQUIRED or v is not None}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path | None = None) -> Checkpoint:
        """A checkpoint of ``d`` (``format`` and unknown entries ignored); CheckpointError if an entry that every
        checkpoint has is missing or malformed (messages name ``path`` when given)."""
        where = f"{path}: " if path is not None else ""
        for key in REQUIRED:
            if key not in d:
                raise CheckpointError(f"{where}checkpoint is missing {key!r}")
            if not isinstance(d[key], dict):
                raise CheckpointError(f"{where}checkpoint entry {key!r} is malformed")
        if "name" not in d["encoder"]:
            raise CheckpointError(f"{where}checkpoint does not name its encoder")
        known = {f.name for f in fields(cls)} - {"path"}
        return cls(**{k: v for k, v in d.items() if k in known}, path=Path(path) if path is not None else None)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Load and check a capcli checkpoint with ``weights_only=True``; CheckpointError if unusable."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            d = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # untrusted bytes: torch.load raises all kinds (KeyError for a text file...)
            raise CheckpointError(f"{path} is not a readable capcli checkpoint ({describe_load_error(e)})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a capcli checkpoint (expected format {FORMAT})")
        return cls.from_dict(d, path)

    def save(self, path: str | Path) -> Path:
        """Atomically write the checkpoint to ``path``; CheckpointError if it cannot be written (the previous
        file, if any, is then untouched)."""
        path = Path(path)
        try:
            with atomic.atomic_path(path) as tmp:
                torch.save(self.to_dict(), tmp)
        except OSError as e:  # disk full, read-only folder, a file where the folder should be
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
        return path

    def check_encoder(self, encoder_name: str, where: str) -> None:
        """Fail clearly when features or images come from another encoder than the checkpoint's."""
        if self.encoder_name != encoder_name:
            raise CheckpointError(
                f"the model expects {self.encoder_name} features but {where} uses {encoder_name}; "
                f"extract features with --encoder {self.encoder_name}"
            )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """:meth:`Checkpoint.load` as the file's plain dict (for scripts that read or edit entries)."""
    return Checkpoint.load(path, map_location).to_dict()


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """:meth:`Checkpoint.save` of a plain dict (which must hold config, vocab, encoder, model)."""
    return Checkpoint.from_dict(ckpt).save(path)


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
