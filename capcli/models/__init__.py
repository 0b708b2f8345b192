"""Model registry: architecture name -> class, and rebuilding a model from its saved config."""

from __future__ import annotations

from ..errors import CheckpointError
from .base import CaptionModel

ARCHS: dict[str, type[CaptionModel]] = {}


def register(cls: type[CaptionModel]) -> type[CaptionModel]:
    ARCHS[cls.arch] = cls
    return cls


def build(config: dict) -> CaptionModel:
    """Instantiate the model described by ``config`` (as returned by ``config_dict()``)."""
    _load_builtin()
    cfg = dict(config)
    arch = cfg.pop("arch", None)
    if arch not in ARCHS:
        raise CheckpointError(f"unknown model architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch].from_config(cfg)  # type: ignore[attr-defined]


def _load_builtin() -> None:
    from . import show_attend_tell, show_tell  # noqa: F401  (registers the two architectures)


__all__ = ["ARCHS", "CaptionModel", "build", "register"]
