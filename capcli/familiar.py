"""Whether a photo is like the photos a model learned from: out-of-distribution detection by nearest neighbours.

A decoder trained on Flickr8k writes Flickr8k's sentences about any photo; on a kitchen or a plate of food its
people and dogs are habits, not what it sees. Grounding (grounding.py) is stricter about such photos, so it has to
know them. The ImageNet words alone tell only part of it (a plate of food and a bar look like Flickr8k's
restaurants to them); the encoder's features tell more. A photo is *outside* the model's training photos when its
pooled, L2-normalised features are farther from their ``k``-th nearest training photo than ``threshold``
(deep nearest neighbours, Sun et al. 2022), the ``quantile`` of that distance over the validation photos, which
come from the training photos' own distribution. With ``quantile`` 0.9 a tenth of in-domain photos count as
outside: the largest share that costs Flickr8k val nothing measurable (docs/research.md, "Grounded captions").

The training photos' features are stored per dimension as uint8 between the dimension's least and largest value
(on Flickr8k val the decisions are those of the float32 features, 1000 of 1000): 6,091 Flickr8k photos are 7.8 MB;
of a larger training set a sample of ``MAX_PHOTOS`` is kept.

    pooled (B, D) -> normalise -> distance to each training photo (B, n) -> k-th smallest (B,) -> > threshold
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import CheckpointError

FORMAT = "capcli-familiarity/1"
K = 5  # neighbours: Sun et al. use k = 1..50 by training set size; 5 for a few thousand photos
QUANTILE = 0.9  # of the validation photos' distances (chosen on Flickr8k val, see the module docstring)
MAX_PHOTOS = 10_000  # kept of a larger training set (a fixed random sample: COCO's 113k would be 145 MB)


@dataclass
class Familiarity:
    """The training photos of a model, as far as telling familiar photos from the rest needs them."""

    photos: torch.Tensor  # (n, D) uint8: the training photos' normalised pooled features, quantised
    low: torch.Tensor  # (D,) float32: feature = low + uint8 value * scale
    scale: torch.Tensor  # (D,) float32
    k: int
    threshold: float  # a photo farther than this from its k-th nearest training photo is outside
    quantile: float  # the share of validation photos within ``threshold``
    _ref: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (n, D) float32, on first use

    @classmethod
    def fit(cls, train: torch.Tensor, val: torch.Tensor, k: int = K, quantile: float = QUANTILE,
            max_photos: int = MAX_PHOTOS) -> Familiarity:
        """From the pooled features (n, D) of the training photos and (m, D) of the validation photos. Of more than
        ``max_photos`` training photos a fixed random sample is kept; the threshold is measured against it."""
        if len(train) <= k or len(val) == 0:
            raise ValueError(f"need more than {k} training photos and some validation photos")
        ref = _normalise(train[sample(len(train), max_photos)])
        low = ref.amin(0)  # (D,)
        scale = (ref.amax(0) - low).clamp_min(1e-12) / 255  # (D,)
        fam = cls(((ref - low) / scale).round().clamp(0, 255).to(torch.uint8), low, scale, k, 0.0, quantile)
        fam.threshold = float(fam.distance(val).quantile(quantile))
        return fam

    def reference(self, device: torch.device) -> torch.Tensor:
        if self._ref is None or self._ref.device != device:
            self._ref = (self.low + self.photos.float() * self.scale).to(device)
        return self._ref

    def distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) -> distance to the k-th nearest training photo (B,)."""
        ref = self.reference(pooled.device)  # (n, D)
        d = torch.cdist(_normalise(pooled), ref)  # (B, n)
        return d.topk(self.k, dim=1, largest=False).values[:, -1]

    def relative(self, grid: torch.Tensor) -> torch.Tensor:
        """Grids (B, N, D) -> (B,) each photo's distance over the threshold (1: the edge, > 1: outside)."""
        return self.distance(grid.float().mean(1)) / self.threshold

    def outside(self, grid: torch.Tensor) -> torch.Tensor:
        """Grids (B, N, D) -> (B,) bool: the photos unlike the training photos."""
        return self.distance(grid.float().mean(1)) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint (loads with ``weights_only=True``)."""
        return {"format": FORMAT, "photos": self.photos, "low": self.low, "scale": self.scale, "k": self.k,
                "threshold": self.threshold, "quantile": self.quantile}

    @classmethod
    def of_checkpoint(cls, ckpt: Checkpoint | Mapping[str, Any], path: Path | None = None,
                      dim: int | None = None) -> Familiarity | None:
        """A checkpoint's ``familiarity`` (None for checkpoints without one); CheckpointError, naming ``path`` (by
        default the checkpoint's own), if it is malformed or not of ``dim``-d features (its encoder's).

        ``ckpt`` may still be the plain dict of ``load_checkpoint`` until every loader reads a Checkpoint."""
        if isinstance(ckpt, Checkpoint):
            d, path = ckpt.familiarity, path if path is not None else ckpt.path
        else:
            d = ckpt.get("familiarity")
        if d is None:
            return None
        try:
            fam = cls.from_dict(d)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: its familiarity entry is malformed ({e})") from None
        if dim is not None and fam.photos.size(1) != dim:
            raise CheckpointError(f"{path}: its familiarity holds {fam.photos.size(1)}-d features, its encoder "
                                  f"gives {dim}")
        return fam

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Familiarity:
        if d.get("format") != FORMAT:
            raise ValueError(f"expected {FORMAT}, got {d.get('format')!r}")
        photos, low, scale = d["photos"], d["low"], d["scale"]
        if photos.dtype != torch.uint8 or photos.dim() != 2 or not low.shape == scale.shape == photos.shape[1:]:
            raise ValueError("malformed training photos")
        return cls(photos, low.float(), scale.float(), int(d["k"]), float(d["threshold"]), float(d["quantile"]))


def sample(n: int, max_photos: int = MAX_PHOTOS) -> torch.Tensor:
    """The rows kept of ``n`` training photos: all, or a fixed random sample of ``max_photos``, in order."""
    if n <= max_photos:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_photos].sort().values


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)
