"""Benchmark the Ray engine against the local engine on the same photos on this machine.

    python bench/scale.py [FOLDER] [--n 1000] [--batch-size 32] [--threads 2] [--decode-threads 2]
                          [--engines local,ray] [--tar]

The photos (default: the first ``--n`` of ../shared/data/flickr8k/images) are captioned into a .parquet output
by each engine in turn, through ``run_caption_job`` as ``capcli caption`` runs it (``--tar``: from webdataset
shards of 1000 photos written first, as img2dataset's output is read). For each engine:

- steady-state throughput: photos after the first batch reached the writer, over the time since (start-up
  apart: Ray's start, the actors' model load and the first batch);
- start-up: ``ray.init`` of a local Ray (reported apart), and the time to the first records;
- CPU-seconds per photo: user + system CPU of this process and every process it started (the Ray nodes, their
  workers), read from /proc as records arrive and at the end, before Ray stops (a process that ended since
  counts what it had used when last seen).

The last line is ``ratio X.XX``: Ray's steady-state photos/s over the local engine's (target >= 0.6, goal 0.8);
with few photos Ray may hand all records over at the end, and then the whole job's rate (its actors' start-up
included) stands in: use ``--n 1000`` or more.
The machine should be quiet: another job on its cores changes every figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capcli.progress import Progress  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int, seen: dict[int, float]) -> float:
    """User + system CPU of ``root``, its live descendants and their reaped children; ``seen`` keeps each
    process's latest figure, so a process gone since (an actor Ray ended) still counts what it used."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime
    todo = [root]
    while todo:
        pid = todo.pop()
        seen[pid] = max(seen.get(pid, 0.0), times.get(pid, 0.0))
        todo += [p for p, parent in parents.items() if parent == pid]
    return sum(seen.values())


class Clock(Progress):
    """When the first records reached the writer, and how many; the time of the last."""

    def __init__(self) -> None:
        self.procs: dict[int, float] = {}
        self.cpu0 = tree_cpu(os.getpid(), self.procs)
        self.t0 = time.perf_counter()
        self.first: tuple[float, int] | None = None
        self.last = self.t0
        self.n = 0
        self.cpu_end = 0.0

    def advance(self, n: int = 1, **fields: object) -> None:
        self.n += n
        self.last = time.perf_counter()
        tree_cpu(os.getpid(), self.procs)
        if self.first is None:
            self.first = (self.last, self.n)

    def done(self) -> None:
        self.cpu_end = tree_cpu(os.getpid(), self.procs) - self.cpu0  # before Ray stops its processes

    def steady(self) -> float:
        """Photos/s after the first records; the whole job's rate when the records came in one burst (Ray can
        hand a small job's records over together at its end: then there is no steady state to see)."""
        t1, n1 = self.first or (self.t0, 0)
        if self.n - n1 < self.n / 2 or self.last - t1 < 1.0:
            return self.whole()
        return (self.n - n1) / (self.last - t1)

    def whole(self) -> float:
        return self.n / (self.last - self.t0) if self.last > self.t0 else 0.0


def write_shards(photos: list[Path], folder: Path, per_shard: int = 1000) -> list[Path]:
    shards = []
    for s in range(0, len(photos), per_shard):
        shard = folder / f"{s // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i, p in enumerate(photos[s: s + per_shard]):
                tar.add(p, arcname=f"{s + i:09d}{p.suffix.lower()}")
        shards.append(shard)
    return shards


def run(engine: str, inputs: list, args: argparse.Namespace, captioner: object) -> Clock:
    from capcli.engines.base import EngineOptions
    from capcli.engines.job import CaptionJob, run_caption_job
    from capcli.engines.ray_engine import RayOptions

    ray_opts = RayOptions(workers=args.workers, threads=args.threads, decode_threads=args.decode_threads)
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        s = run_caption_job(captioner, CaptionJob(inputs, f"{tmp}/out.parquet", EngineOptions(
            batch_size=args.batch_size), engine=engine, ray=ray_opts, threads=args.decode_threads), clock)
        wall = time.perf_counter() - clock.t0
        first = (clock.first[0] - clock.t0) if clock.first else float("nan")
        print(f"{engine:5s}: {s.captioned} captioned, {s.failed} failed in {wall:.1f} s; first records after "
              f"{first:.1f} s; steady {clock.steady():.1f} photos/s; whole job {clock.whole():.1f} photos/s; "
              f"{clock.cpu_end / max(clock.n, 1) * 1000:.0f} CPU-ms/photo", flush=True)
    return clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=str(ROOT.parent / "shared" / "data" / "flickr8k" / "images"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per Ray actor (default: min(4, cores))")
    ap.add_argument("--workers", type=int, default=None, help="Ray actors (default: sized to the cluster)")
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--tar", action="store_true", help="read the photos from webdataset shards")
    args = ap.parse_args()

    from capcli.captioner import Captioner
    from capcli.engines.ray_engine import RayOptions, start_ray, stop_ray
    from capcli.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as the capcli command does
    photos = sorted(p for p in Path(args.folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.n]
    print(f"{len(photos)} photos from {args.folder}; {os.cpu_count()} cores; batch {args.batch_size}", flush=True)
    captioner = Captioner.load(device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_shards(photos, Path(tmp)) if args.tar else photos
        rates = {}
        for engine in args.engines.split(","):
            started = False
            if engine == "ray":
                t = time.perf_counter()
                started = start_ray(RayOptions())
                print(f"ray  : ray.init {time.perf_counter() - t:.1f} s (start-up, apart)", flush=True)
            try:
                rates[engine] = run(engine, inputs, args, captioner).steady()
            finally:
                stop_ray(started)
    if "local" in rates and "ray" in rates and rates["local"]:
        print(f"ratio {rates['ray'] / rates['local']:.2f}")


if __name__ == "__main__":
    main()
