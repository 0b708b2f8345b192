"""The Ray engine: the job as a Ray Data pipeline, so it runs on one machine or a whole cluster.

- read: one task per unit (tar shard, table, chunk of files) turns it into rows ``key, source, data, path,
  error`` (the photo's encoded bytes, never decoded pixels: 3-10x smaller through the object store). Units on
  this machine's disk are read on this machine's node; ``s3://`` units anywhere.
- caption: ``map_batches`` with :class:`CaptionActor`, a pool of ``workers`` actors. Each loads the model once,
  from its bytes in Ray's object store (a node needs no copy of a local checkpoint), decodes its batch in threads
  while the previous batch is encoded (two batches in flight per actor, the model behind a lock; a batch is
  ``GROUP_BATCHES`` encoder batches, searched at once as the local engine does), and returns one
  JSON record per row: a photo that fails is an error row, never an exception (an exception aborts a Ray job).
- write: the driver, the output's one writer, iterates the results and writes them as they come.

Ray restarts an actor that dies and retries its batch; rows are neither lost nor duplicated. Without
``--address`` (or ``RAY_ADDRESS``) capcli starts a local Ray and stops it at the end.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CapcliError
from ..provenance import Provenance
from ..samples import Sample, Unit, is_remote, read_unit, with_bytes
from .base import EngineOptions, caption_samples
from .local import GROUP_BATCHES

RAY_PIN = "ray[data]>=2.60,<2.61"
BLOCK_BYTES = 1 << 20
INSTALL = 'the Ray engine needs Ray: pip install "capcli[ray]" (or: pip install "ray[data]==2.60.*" pyarrow)'


class EngineError(CapcliError):
    """The Ray engine cannot run (Ray missing, a cluster unreachable, a job Ray aborted)."""


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # a running cluster (ray://host:10001, auto, host:6379); None: RAY_ADDRESS or local
    workers: int | None = None  # captioning actors; None: sized to the cluster
    threads: int | None = None  # torch threads (and CPUs reserved) per actor; None: min(4, this machine's cores)
    gpus_per_worker: float = 0.0
    decode_threads: int = 2  # per actor


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EngineError(INSTALL) from None
    return ray


def start_ray(opts: RayOptions) -> bool:
    """Join the cluster at ``opts.address`` or RAY_ADDRESS, or start a local Ray; True when this call started
    (or joined) it and :func:`stop_ray` should end it. A Ray already initialised in this process is used as is."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    address = opts.address or os.environ.get("RAY_ADDRESS")
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            cores = os.cpu_count() or 1
            # two logical CPUs more than cores: the read tasks always find a slot beside actors that take all cores
            ray.init(num_cpus=cores + 2, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise EngineError(f"cannot start or join Ray{f' at {address}' if address else ''}: "
                          f"{str(e).splitlines()[0]}") from None
    return True


def stop_ray(started: bool) -> None:
    if started:
        require_ray().shutdown()


def _pool_size(opts: RayOptions, threads: int) -> int:
    """Actors: ``--workers``, else one per ``gpus_per_worker`` GPUs, else the cluster's CPUs less one per node
    (for reading) in actors of ``threads`` CPUs."""
    import ray

    if opts.workers:
        return opts.workers
    res = ray.cluster_resources()
    if opts.gpus_per_worker > 0:
        return max(1, int(res.get("GPU", 0) / opts.gpus_per_worker))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return max(1, int(res.get("CPU", 1) - nodes) // threads)


class CaptionActor:
    """The Captioner in a Ray actor: loaded once from the checkpoint's bytes, called with batches of rows."""

    def __init__(self, model: list, name: str, device: str, precision: str, grounding: str,
                 options: EngineOptions, provenance: Provenance, threads: int, decode_threads: int) -> None:
        import tempfile
        from concurrent.futures import ThreadPoolExecutor

        import ray
        import torch

        from ..captioner import Captioner
        from ..runtime import tune_cpu_allocator

        torch.set_num_threads(threads)
        tune_cpu_allocator()  # the encoder's activations stay mapped between batches (up to 2x faster on CPUs)
        folder = tempfile.mkdtemp(prefix="capcli-model-")
        path = Path(folder) / name  # the checkpoint's own name and bytes: its calibration is matched by SHA-256
        path.write_bytes(ray.get(model[0]))
        try:
            self.captioner = Captioner.load(path, device=device, precision=precision, grounding=grounding)
        finally:
            path.unlink(missing_ok=True)
            os.rmdir(folder)
        self.options, self.provenance = options, provenance
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="capcli-decode")
        self.model_lock = threading.Lock()  # two batches in flight: one decodes while the other is captioned

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        from .base import decode_sample

        samples = [Sample(str(k), str(s), bytes(d) if len(d) else None, str(p) or None, str(e) or None)
                   for k, s, d, p, e in zip(batch["key"], batch["source"], batch["data"], batch["path"],
                                            batch["error"], strict=True)]
        spec = self.captioner.spec
        decoded = [f.result() for f in [self.pool.submit(decode_sample, s, spec) for s in samples]]
        with self.model_lock:
            records = caption_samples(self.captioner, samples, self.options, self.provenance, decoded=decoded)
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records]}


def _read_rows(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A read task: one unit's samples as rows (empty strings and bytes for what a sample lacks: one Arrow type
    per column whatever the unit)."""
    unit, skip, shard = pickle.loads(row["unit"])
    for s in read_unit(unit, skip, shard):
        if s.path is not None:  # a file on this node: its bytes travel, so an actor on any node can caption it
            s = with_bytes(s)
        yield {"key": s.key, "source": s.source, "data": s.data or b"", "path": "", "error": s.error or ""}


def caption_ray(captioner: Any, units: Sequence[tuple[Unit, frozenset[str]]], shard: tuple[int, int] | None,
                options: EngineOptions, provenance: Provenance, opts: RayOptions, device: str = "cpu",
                precision: str = "auto", grounding: str = "auto") -> Iterator[list[dict[str, Any]]]:
    """Records of the samples of ``units`` (each with the keys to skip), a list per finished batch, in the order
    batches finish. Ray must be started (:func:`start_ray`)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # capcli shows the whole job's progress itself
    ctx.print_on_execution_start = False
    # Blocks of 1 MB (~50 small JPEGs) rather than Ray's 128 MB: one actor task captions one block, so small blocks
    # let an actor decode one while it captions another, and stream records (and progress) as they are done.
    ctx.target_max_block_size = BLOCK_BYTES
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    threads = opts.threads or min(4, os.cpu_count() or 1)
    source = Path(str(captioner.source))
    model = ray.put(source.read_bytes())
    items = [{"unit": pickle.dumps((u, skip, shard))} for u, skip in units]
    pinned = None
    if any(not is_remote(u.source) or u.kind == "files" and not is_remote(u.files[0][1]) for u, _ in units):
        # this machine's files are on this node only (a shared filesystem would do, but cannot be assumed)
        pinned = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(_read_rows, num_cpus=1, label_selector=pinned)
    # two calls at once per actor, really in two threads: one decodes while the other holds the model
    pool = ray.data.ActorPoolStrategy(size=_pool_size(opts, threads), max_concurrent_calls_per_actor=2,
                                      enable_true_multi_threading=True)
    ds = ds.map_batches(
        CaptionActor, batch_size=options.batch_size * GROUP_BATCHES, batch_format="numpy", zero_copy_batch=True,
        compute=pool, num_cpus=threads, num_gpus=opts.gpus_per_worker or None,
        fn_constructor_kwargs=dict(model=[model], name=source.name, device=device,
                                   precision=precision, grounding=grounding, options=options, provenance=provenance,
                                   threads=threads, decode_threads=opts.decode_threads))
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield [json.loads(r) for r in batch.column("record").to_pylist()]
    except ray.exceptions.RayError as e:
        raise EngineError(f"the Ray job failed: {str(e).strip().splitlines()[-1]}") from None
