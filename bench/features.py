"""Benchmark: `capcli features` end to end vs the encoder alone, on the same real photos.

Baseline: encoder-only forward passes over images already decoded to uint8 tensors in memory
(batch 32), in NCHW and in channels-last; the faster of the two is the ceiling. Then the whole
``extract_features`` call into a fresh folder (JPEG decoding in workers, model creation, HDF5 writing).
Each figure is the best of ``--repeats`` runs, to shrug off other jobs on the machine. On the CPU,
``capcli features`` raises glibc's mmap/trim thresholds (``capcli.runtime.tune_cpu_allocator``); both are
measured after the same tuning, so the ratio shows the pipeline's own overhead. The encoder with the
default allocator is printed too, for reference.

    python bench/features.py [IMAGES_DIR] [--n 160] [--workers 2] [--repeats 2] [--device auto]

The last line is ``ratio X.XX`` = end-to-end img/s / encoder-only img/s (target >= 0.90).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from capcli.encoders import DEFAULT_ENCODER, create_encoder, get_spec
from capcli.features import extract_features
from capcli.images import is_image_file
from capcli.layout import Dataset, ImageRecord
from capcli.runtime import resolve_device, tune_cpu_allocator

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def encoder_only(images: torch.Tensor, batch: int, channels_last: bool, device: str) -> float:
    """img/s of the encoder on uint8 images (N, 3, S, S) already in memory (on the device)."""
    enc = create_encoder(DEFAULT_ENCODER).for_inference().to(device)  # as extract_features runs it
    if not channels_last:
        enc = enc.to(memory_format=torch.contiguous_format)
    images = images.to(device)
    cuda = device.startswith("cuda")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):  # as extract_features does on CUDA
            if channels_last:
                grid = enc(x)  # the Encoder converts its input to channels-last itself
            else:
                grid = enc._forward_grid(enc.normalise(x).contiguous()).flatten(2).transpose(1, 2)  # NCHW
        return grid.float().mean(1)

    with torch.inference_mode():
        run(images[:batch])  # warm-up: oneDNN / cuDNN pick their kernels
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for lo in range(0, len(images), batch):
            run(images[lo:lo + batch])
        if cuda:
            torch.cuda.synchronize()
        return len(images) / (time.perf_counter() - t)


def end_to_end(ds: Dataset, batch: int, workers: int, device: str) -> float:
    out = Path(tempfile.mkdtemp(prefix="capcli-bench-features-"))
    shutil.rmtree(out)
    try:
        t = time.perf_counter()
        extract_features(ds, DEFAULT_ENCODER, out, batch_size=batch, workers=workers, device=device)
        return len(ds.images) / (time.perf_counter() - t)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="?", type=Path, default=DEFAULT_IMAGES, help="folder of photos (JPEG)")
    ap.add_argument("--n", type=int, default=160, help="number of photos (first N by name)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = ap.parse_args()
    device = resolve_device(args.device)

    files = sorted(p for p in args.images.iterdir() if is_image_file(p))[: args.n]
    if not files:
        raise SystemExit(f"no photos in {args.images}")
    spec = get_spec(DEFAULT_ENCODER)
    images = torch.stack([spec.read(f) for f in files])  # (N, 3, S, S) uint8, as the pipeline decodes them
    ds = Dataset("bench", args.images, [ImageRecord(i + 1, f.name, "train") for i, f in enumerate(files)])
    print(f"{len(files)} photos from {args.images}, {DEFAULT_ENCODER}, batch {args.batch}, "
          f"device {device}, torch threads {torch.get_num_threads()}, workers {args.workers}")

    cpu = device == "cpu"
    if cpu:  # for the record: the encoder with glibc's default allocator settings (before capcli tunes them)
        plain = encoder_only(images, args.batch, channels_last=True, device=device)
        # `capcli features` tunes the allocator (capcli.runtime.tune_cpu_allocator); do it now, for the
        # baseline and the pipeline below alike.
        tune_cpu_allocator()

    nchw, cl, e2e = [], [], []
    for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits all three alike
        nchw.append(encoder_only(images, args.batch, channels_last=False, device=device))
        cl.append(encoder_only(images, args.batch, channels_last=True, device=device))
        e2e.append(end_to_end(ds, args.batch, args.workers, device))

    def runs(v: list[float]) -> str:
        return f"(runs: {' '.join(f'{x:.1f}' for x in v)})"

    if cpu:
        print(f"encoder-only channels-last, default allocator  {plain:6.1f} img/s  (for reference)")
    print(f"encoder-only NCHW           {max(nchw):6.1f} img/s  {runs(nchw)}")
    print(f"encoder-only channels-last  {max(cl):6.1f} img/s  {runs(cl)}")
    base = max(max(nchw), max(cl))
    print(f"encoder-only ceiling        {base:6.1f} img/s")
    print(f"capcli features end-to-end  {max(e2e):6.1f} img/s  {runs(e2e)}")
    if cpu:
        print(f"end-to-end / default-allocator encoder  {max(e2e) / plain:.2f}")
    print(f"ratio {max(e2e) / base:.2f}")


if __name__ == "__main__":
    main()
