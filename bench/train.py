"""Benchmark: `capcli train` captions/s on cached Lite0 features vs end to end from photos.

Runs the real ``capcli.train.train`` on real Flickr8k photos: the first ``--images`` training images
(all their captions) and ``--val`` validation images, prepared once into ``--cache`` with their
efficientnet-lite0 features (extracted by ``extract_features`` on the first run, then reused). The
vocabulary is every word of those captions (``min_count=1``; about 1,950 words for 400 images, close
to full Flickr8k's 2,578 at min_count 5). Model sizes are capcli's defaults (embed/hidden/attention
512, dropout 0.5, LSTM); the captions/s of each run is measured from the training loop's own progress
reports over ``--steps`` optimiser steps after ``--warmup`` steps, best of ``--repeats`` runs (other jobs on
a small machine make single runs swing widely: two OpenMP threads spin-waiting on a busy 2-core CPU).

    python bench/train.py [--batch-sizes 64,128] [--device auto] [--threads N] [--flickr8k DIR]

Prints captions/s for each architecture and batch size on cached features, then for attention trained
end to end (``--fine-tune-encoder``, the last 2 Lite0 blocks learning) at the first batch size. The
last line is ``ratio X.XX`` = attention cached-feature captions/s / end-to-end captions/s at that batch
size: the speed-up the feature cache buys.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from capcli.features import extract_features
from capcli.layout import Dataset
from capcli.prepare import prepare
from capcli.progress import Progress
from capcli.runtime import resolve_device, tune_cpu_allocator
from capcli.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


class StepClock(Progress):
    """Times each training step as the loop reports it. The first step of each epoch is not timed (its
    interval would include the previous epoch's validation and checkpointing), nor set-up."""

    def __init__(self) -> None:
        self.phase = ""
        self.last: float | None = None
        self.steps: list[tuple[float, int]] = []  # (seconds, captions) of each timed step
        self.count = 0
        self.vocab = ""

    def start(self, description: str, total: int | None = None, unit: str = "img") -> None:
        self.phase, self.last = description, None

    def advance(self, n: int = 1, **fields: object) -> None:
        if self.phase.startswith("epoch") and "loss" in fields:
            now = time.perf_counter()
            self.count += 1
            if self.last is not None:
                self.steps.append((now - self.last, n))
            self.last = now

    def info(self, message: str) -> None:
        if message.startswith("vocabulary"):
            self.vocab = message

    def rate(self, warmup: int) -> float:
        """Captions per second over the timed steps after the first ``warmup``."""
        timed = self.steps[max(warmup - 1, 0):]
        return sum(n for _, n in timed) / sum(t for t, _ in timed)


def bench_data(flickr8k: Path, n_train: int, n_val: int, cache: Path) -> tuple[Dataset, Path]:
    """A prepared slice of Flickr8k and its Lite0 features, made once under ``cache``."""
    tag = cache / f"f8k-{n_train}-{n_val}"
    if not (tag / "ds" / "dataset.json").is_file():
        caps = json.loads((flickr8k / "captions.json").read_text())
        splits = json.loads((flickr8k / "splits.json").read_text())
        keep = {"train": splits["train"][:n_train], "val": splits["val"][:n_val]}
        names = set(keep["train"]) | set(keep["val"])
        images = [im for im in caps["images"] if im["file_name"] in names]
        ids = {im["id"] for im in images}
        tag.mkdir(parents=True, exist_ok=True)
        (tag / "captions.json").write_text(json.dumps(
            {"images": images, "annotations": [a for a in caps["annotations"] if a["image_id"] in ids]}))
        (tag / "splits.json").write_text(json.dumps(keep))
        prepare(tag, kind="coco-splits", images=flickr8k / "images", name="f8k-bench", out=tag / "ds")
    ds = Dataset.load(tag / "ds")
    feats = extract_features(ds, out=tag / "features")  # a complete folder is reused as is
    return ds, feats


def run(ds: Dataset, feats: Path, arch: str, batch: int, steps: int, warmup: int, device: str,
        fine_tune: bool = False, workers: int = 2) -> tuple[float, str]:
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="capcli-bench-train-") as out:
        cfg = TrainConfig(arch=arch, data=ds.source, features=None if fine_tune else str(feats), out=out,
                          batch_size=batch, epochs=10_000, max_steps=warmup + steps, min_count=1, val_images=5,
                          val_tokenizer="python", device=device, fine_tune_encoder=fine_tune, workers=workers)
        train(cfg, clock)
    if clock.count < warmup + steps:
        raise SystemExit(f"only {clock.count} steps ran")
    return clock.rate(warmup), clock.vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flickr8k", type=Path, default=DEFAULT_FLICKR8K, help="Flickr8k folder (captions.json, "
                    "splits.json, images/)")
    ap.add_argument("--images", type=int, default=400, help="training images (5 captions each)")
    ap.add_argument("--val", type=int, default=20)
    ap.add_argument("--batch-sizes", default="64,128")
    ap.add_argument("--steps", type=int, default=10, help="measured steps (cached features)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fine-tune-steps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="image-decoding workers for the end-to-end run")
    ap.add_argument("--repeats", type=int, default=2, help="each figure is the best of this many runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads [torch's default]")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "capcli-bench-train")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tune_cpu_allocator()  # as `capcli train` does
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}")
    ds, feats = bench_data(args.flickr8k, args.images, args.val, args.cache)
    n_caps = sum(len(r.captions) for r in ds.split("train"))
    print(f"data: {len(ds.split('train'))} Flickr8k training photos, {n_caps} captions; Lite0 features in {feats}")

    batches = [int(b) for b in args.batch_sizes.split(",")]
    cached: dict[tuple[str, int], float] = {}
    for arch in ("attention", "basic"):
        for b in batches:
            runs = [run(ds, feats, arch, b, args.steps, args.warmup, device) for _ in range(args.repeats)]
            rate = cached[arch, b] = max(r for r, _ in runs)
            words = runs[0][1].split(":")[1].split("seen")[0].strip()
            print(f"{arch:9s}  batch {b:4d}  cached features        {rate:6.1f} captions/s   (vocabulary {words})")
    b0 = batches[0]
    e2e = max(run(ds, feats, "attention", b0, args.fine_tune_steps, 1, device, fine_tune=True, workers=args.workers)[0]
              for _ in range(args.repeats))
    print(f"attention  batch {b0:4d}  end to end (fine-tune) {e2e:6.1f} captions/s")
    if not device.startswith("cuda"):
        best_att = max(cached["attention", b] for b in batches)
        best_basic = max(cached["basic", b] for b in batches)
        print(f"CPU targets: attention >= 100 captions/s (best {best_att:.1f}), basic >= 300 (best {best_basic:.1f})")
    for b in batches:
        print(f"basic / attention at batch {b}: {cached['basic', b] / cached['attention', b]:.2f}")
    print(f"ratio {cached['attention', b0] / e2e:.2f}")


if __name__ == "__main__":
    main()
