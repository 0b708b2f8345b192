"""Photos decoded into encoder batches beside the encoder: the workers of ``caption`` and ``features`` (and so of
``train``, which extracts its features through ``features``; fine-tuning decodes in its own DataLoader workers).

:class:`ImageItems` reads one photo (``EncoderSpec.read``: upright, RGB, resized, uint8) or says why it cannot;
:func:`batch_source` runs it over batches of indices in threads on the CPU, DataLoader worker processes for a
GPU, or in turn (0 workers), and :func:`collate_images` stacks a batch and passes its failures on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .encoders import EncoderSpec
from .errors import ImageError, UsageError


class ImageItems:
    """Map-style dataset over (id, path): returns (id, uint8 tensor (3, S, S)) or (id, file, reason)."""

    def __init__(self, items: Sequence[tuple[int, str, str]], spec: EncoderSpec) -> None:
        self.items = list(items)  # (id, absolute path, file as in the dataset)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):  # noqa: ANN204
        image_id, path, file = self.items[i]
        try:
            return image_id, self.spec.read(path)
        except ImageError as e:
            return image_id, file, str(e)
        except Exception as e:  # noqa: BLE001 - any decoder surprise must not kill a long run
            return image_id, file, f"{file}: cannot read ({type(e).__name__}: {e})"


def collate_images(batch: list) -> tuple:
    """Stack the readable images; pass the failures on as (id, file, reason) triples."""
    import torch

    good = [b for b in batch if len(b) == 2]
    failed = [b for b in batch if len(b) == 3]
    ids = torch.tensor([b[0] for b in good], dtype=torch.int64)
    # numpy, not torch.stack: single-threaded, so a decoding thread never starts an OpenMP team. Stacked as
    # (B, S, S, 3) pixels and seen as (B, 3, S, S): channels-last, as preprocess gives them and the encoder runs.
    images = (torch.from_numpy(np.stack([b[1].permute(1, 2, 0).numpy() for b in good])).permute(0, 3, 1, 2)
              if good else None)  # (B, 3, S, S) uint8
    return ids, images, failed, len(batch)


class _ThreadBatches:
    """Decodes batches in a few threads of this process, ``prefetch`` batches ahead, in order.

    PIL releases the GIL while it decodes and resizes, and preprocessing is numpy, so threads overlap
    with the encoder as well as worker processes do on the CPU, without their costs: no fork of a
    large heap (copy-on-write faults on every page the encoder then writes), no start-up, no
    shared-memory transfer of every batch. Work starts in the constructor, so decoding overlaps with
    loading the encoder.
    """

    def __init__(self, items: ImageItems, batches: list[list[int]], threads: int, prefetch: int) -> None:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self._items = items
        self._todo = iter(batches)
        self._pool = ThreadPoolExecutor(max(threads, 1), thread_name_prefix="capcli-decode")
        self._pending: deque = deque()
        for _ in range(max(prefetch, 1)):
            self._submit()

    def _decode(self, batch: list[int]) -> tuple:
        return collate_images([self._items[i] for i in batch])

    def _submit(self) -> None:
        batch = next(self._todo, None)
        if batch is not None:
            self._pending.append(self._pool.submit(self._decode, batch))

    def __iter__(self) -> _ThreadBatches:
        return self

    def __next__(self) -> tuple:
        if not self._pending:
            raise StopIteration
        future = self._pending.popleft()
        self._submit()
        return future.result()

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _InlineBatches:
    """workers=0: decode each batch in the calling thread, when it is asked for."""

    def __init__(self, items: ImageItems, batches: list[list[int]]) -> None:
        self._gen = (collate_images([items[i] for i in b]) for b in batches)

    def __iter__(self):  # noqa: ANN204
        return self._gen

    def close(self) -> None:
        self._gen.close()


class _ProcessBatches:
    """DataLoader worker processes: decoding scales past the GIL (for a GPU, which outruns a few threads)."""

    def __init__(self, items: ImageItems, batches: list[list[int]], workers: int, pin: bool) -> None:
        import torch

        loader = torch.utils.data.DataLoader(
            items, batch_sampler=batches, num_workers=workers, collate_fn=collate_images, pin_memory=pin,
            prefetch_factor=4,
        )
        self._it = iter(loader)  # starts the workers now

    def __iter__(self):  # noqa: ANN204
        return self._it

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = None


def batch_source(items: ImageItems, batches: list[list[int]], workers: int, decode: str, dev: str):  # noqa: ANN202
    """Where decoded batches come from: threads on the CPU, worker processes for CUDA (``decode="auto"``)."""
    if decode not in ("auto", "threads", "processes"):
        raise UsageError(f"decode={decode!r}: use auto, threads or processes")
    workers = min(workers, len(batches))
    if workers == 0:
        return _InlineBatches(items, batches)
    if decode == "processes" or (decode == "auto" and dev.startswith("cuda")):
        return _ProcessBatches(items, batches, workers, pin=dev.startswith("cuda"))
    # One batch ahead per thread: a thread decodes 32 small photos in ~15 ms against the encoder's ~400 ms on two
    # cores, and a deeper queue only adds a burst of decoding beside the first batch (measured: 4 ahead made that
    # batch 14% slower, 2 ahead 2%).
    return _ThreadBatches(items, batches, workers, prefetch=workers)
