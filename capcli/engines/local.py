"""The local engine: samples read and captioned in this process, decoding in threads one group ahead of the
encoder (as ``capcli caption`` always ran), through the same seam as the Ray engine (:mod:`.base`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

from ..provenance import Provenance
from ..samples import Sample
from .base import EngineOptions, caption_samples, decode_sample

GROUP_BATCHES = 4  # encoder batches per captioning call: decoding of the next group overlaps this one's


def caption_local(captioner: Any, samples: Iterable[Sample], options: EngineOptions, provenance: Provenance,
                  threads: int = 2) -> Iterator[list[dict[str, Any]]]:
    """Records of ``samples``, a list per group of ``GROUP_BATCHES x batch_size`` samples, in input order."""
    spec = captioner.spec
    group = options.batch_size * GROUP_BATCHES
    it = iter(samples)
    pool = ThreadPoolExecutor(max(threads, 1), thread_name_prefix="capcli-decode")
    ahead: deque = deque()

    def submit() -> None:
        chunk = list(islice(it, group))
        if chunk:
            ahead.append((chunk, [pool.submit(decode_sample, s, spec) for s in chunk]))

    try:
        submit()
        while ahead:
            chunk, futures = ahead.popleft()
            submit()  # the next group decodes while this one is captioned
            yield caption_samples(captioner, chunk, options, provenance, decoded=[f.result() for f in futures])
    finally:
        for _, futures in ahead:
            for f in futures:
                f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
