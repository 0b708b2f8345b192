"""capcli: natural-language captions for photos.

The command line (``capcli ...``) is a thin layer over this Python API; ``from capcli import Captioner``
loads a trained model (the shipped default when no checkpoint is given) and captions images.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("capcli")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

__all__ = ["Captioner", "__version__"]


def __getattr__(name: str):
    # Lazy: importing capcli (e.g. for `capcli --help`) must not import torch.
    if name == "Captioner":
        from .captioner import Captioner

        return Captioner
    raise AttributeError(name)
