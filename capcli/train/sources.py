"""Where a batch's model input comes from: cached features held in memory, read from the HDF5 shards, or
photos decoded in DataLoader workers (fine-tuning).

A source's ``iterate(groups)`` yields, for each group of image rows, ``(x, inverse, failed)``:

- ``x``: float16 features (B, ...) or, with ``inverse``, features / uint8 images (U, ...) of the unique rows
- ``inverse``: None, or (B,) index into ``x`` for each requested row (-1: that image could not be read)
- ``failed``: ``[(row, reason)]`` for unreadable images

:func:`model_input` turns one such group into what the model consumes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..encoders import EncoderSpec
from ..errors import ImageError
from ..progress import Progress
from .distributed import Dist

PRELOAD_FRACTION = 0.6  # preload features only when they take at most this share of available memory


class Source(Protocol):
    def iterate(self, groups: Sequence[torch.Tensor]) -> Iterator[tuple]: ...


def _ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which saves and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Preloaded:
    """Features of a list of images held in one tensor (CPU or GPU memory), indexed directly."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (n, ...) float16

    def iterate(self, groups: Sequence[torch.Tensor]) -> Iterator[tuple]:
        for rows in groups:
            yield self.table.index_select(0, rows.to(self.table.device)), None, []


class StoreRows(torch.utils.data.Dataset):
    """Reads the features of a group of image rows from the HDF5 store (in DataLoader workers)."""

    def __init__(self, store: Any, ids: Sequence[int], kind: str) -> None:
        self.store, self.ids, self.kind = store, np.asarray(ids, dtype=np.int64), kind

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: torch.Tensor) -> tuple:
        uniq, inverse = torch.unique(rows, return_inverse=True)
        x = torch.from_numpy(self.store.get_many(self.ids[uniq.numpy()].tolist(), self.kind))
        return x, inverse, []


class ImageRows(torch.utils.data.Dataset):
    """Decodes and preprocesses the photos of a group of image rows (in DataLoader workers)."""

    def __init__(self, files: Sequence[str], spec: EncoderSpec) -> None:
        self.files, self.spec = list(files), spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, rows: torch.Tensor) -> tuple:
        uniq, inverse = torch.unique(rows, return_inverse=True)
        images, failed, slot = [], [], torch.full((len(uniq),), -1, dtype=torch.long)
        for j, r in enumerate(uniq.tolist()):
            try:
                images.append(self.spec.read(self.files[r]))
                slot[j] = len(images) - 1
            except ImageError as e:
                failed.append((r, str(e)))
        x = torch.stack(images) if images else None  # (U, 3, S, S) uint8
        return x, slot[inverse], failed


class Loaded:
    """Groups read by a DataLoader (features from the store, or photos) in worker processes."""

    def __init__(self, items: torch.utils.data.Dataset, workers: int, pin: bool) -> None:
        self.items, self.workers, self.pin = items, workers, pin

    def iterate(self, groups: Sequence[torch.Tensor]) -> Iterator[tuple]:
        if not groups:
            return iter(())
        w = min(self.workers, len(groups))
        return iter(torch.utils.data.DataLoader(
            self.items, sampler=list(groups), batch_size=None, num_workers=w, pin_memory=self.pin,
            worker_init_fn=_ignore_sigint if w else None, prefetch_factor=4 if w else None,
            generator=torch.Generator(),  # its seed draw must not consume the global RNG that dropout uses
        ))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB" if n < 2**30 else f"{n / 2**30:,.1f} GB"


def photo_sources(train_files: list[str], val_files: list[str], spec: EncoderSpec, workers: int,
                  dist: Dist) -> tuple[Source, Source]:
    """Training and validation photos, decoded in DataLoader workers (rank 0 alone validates)."""
    pin = dist.device.type == "cuda"
    return (Loaded(ImageRows(train_files, spec), workers, pin),
            Loaded(ImageRows(val_files, spec), workers if dist.main else 0, pin))


def feature_sources(store: Any, kind: str, train_ids: list[int], val_ids: list[int], preload: bool, workers: int,
                    dist: Dist, progress: Progress) -> tuple[Source, Source]:
    """Training and validation features: in memory (on the GPU when they fit there) when they fit, else read
    from the store in DataLoader workers."""
    need = (len(train_ids) + len(val_ids)) * int(np.prod(store.shape(kind))) * 2  # float16 bytes
    avail = _available_memory()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))  # ranks on this machine each hold a copy
    if preload and avail is not None and need * local > PRELOAD_FRACTION * avail:
        progress.warn(f"the {kind} features need {_mb(need * local)}, more than fits in the {_mb(avail)} of "
                      "available memory: reading them from disk during training instead")
        preload = False
    if not preload:
        pin = dist.device.type == "cuda"
        return (Loaded(StoreRows(store, train_ids, kind), workers, pin),
                Loaded(StoreRows(store, val_ids, kind), 0, pin))
    progress.info(f"loading {kind} features of {len(train_ids) + len(val_ids)} images into memory ({_mb(need)})")
    where = torch.device("cpu")
    if dist.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dist.device)
        where = dist.device if need < 0.4 * free else where
    tables = []
    for ids in (train_ids, val_ids):
        tables.append(torch.from_numpy(store.get_many(ids, kind)).to(where))
    return Preloaded(tables[0]), Preloaded(tables[1])


def model_input(x: torch.Tensor, inverse: torch.Tensor | None, encoder: nn.Module | None, kind: str,
                device: torch.device) -> torch.Tensor:
    """What the model consumes, (B, D) or (B, N, D), for one group: cached features or images."""
    x = x.to(device, non_blocking=True)
    if encoder is not None:
        from ..models.base import CaptionModel

        x = CaptionModel.features_of_kind(encoder(x), kind)  # (U, N, D) grid -> kind
    else:
        x = x.float()
    if inverse is not None:
        keep = inverse[inverse >= 0].to(device)
        x = x.index_select(0, keep)
    return x
