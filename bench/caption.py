"""Benchmark ``capcli caption``: how close does the whole pipeline get to the encoder alone?

    python bench/caption.py [FOLDER] [--checkpoint CKPT] [--n 256] [--rss 100,1000] [--device cpu] [--rounds 3]
                            [--formats heic]

On the same photos (default: the first 256 of ../shared/data/flickr8k/images), in one run:

1. encoder only: images already decoded into memory, batch 32, the faster of NCHW and channels-last:
   the ceiling for any captioning pipeline;
2. the search alone (greedy and beam 3) over features already computed, and end to end through
   ``Captioner.caption_paths`` (files decoded in 2 threads, encoder batch 32, one batched search per 128
   images), greedy (beam 1) and beam 3, both with the search in float32 and in the default precision
   (``auto``: the model's search twin with int8 or bfloat16 products where the CPU computes them natively);
   both grounded (the default, ``capcli/grounding.py``), and the default once more without grounding: the line
   ``grounding: ... ratio`` is grounded over ungrounded end-to-end img/s;
3. the same end-to-end beam-3 run (default precision) on HEIC copies of the photos (``--formats``: heic, with a
   320-px thumbnail as iPhones write them, which capcli decodes instead of the picture when it is large enough;
   heic-nothumb; avif; made once by pillow-heif / Pillow at their default quality): img/s next to the JPEG figure,
   with each format's decoding alone (``spec.read``, one thread) -- an iPhone folder's cost;
4. peak memory (VmHWM; on the CPU decoding runs in threads of that process, with CUDA also the largest
   DataLoader worker process) of a whole ``caption_files`` run to a .json file on 100 and 1000 images (the
   photos repeated through symlinks), each in a fresh subprocess.

The model is ``--checkpoint``, else the shipped default model (``capcli.captioner.DEFAULT_MODEL``), else a
random-init attention model with a ~2500-word Flickr8k vocabulary (its captions run to max_len: the worst
case for beam search cost).
The last line is ``ratio X.XX`` = end-to-end beam-3 img/s (default precision) over encoder-only img/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capcli.caption import caption_files  # noqa: E402
from capcli.captioner import DEFAULT_MODEL, SEARCH_BATCH, Captioner  # noqa: E402
from capcli.images import is_image_file  # noqa: E402
from capcli.photos import collate_images  # noqa: E402
from capcli.runtime import tune_cpu_allocator  # noqa: E402

DEFAULT_FOLDER = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def random_checkpoint(folder: Path, out: Path) -> Path:
    """A seeded random-init attention model (default sizes) over a 2500-word vocabulary of real captions."""
    from capcli.checkpoint import save_checkpoint
    from capcli.encoders import get_spec
    from capcli.models import build
    from capcli.vocab import Vocabulary

    caps_file = folder.parent / "captions.json"
    caps = [a["caption"] for a in json.loads(caps_file.read_text())["annotations"]]
    vocab = Vocabulary.build(caps, min_count=5, max_size=2500)
    torch.manual_seed(0)
    model = build({"arch": "attention", "vocab_size": len(vocab), "feature_dim": 1280})
    return save_checkpoint(out, {"config": model.config_dict(), "vocab": vocab.to_dict(),
                                 "encoder": get_spec("efficientnet-lite0").to_dict(), "model": model.state_dict()})


def encoder_pass(cap: Captioner, images: torch.Tensor, fmt: str, batch: int = 32) -> tuple[float, float]:
    """(img/s, CPU s per image) of one pass of the encoder alone over in-memory uint8 images, in format ``fmt``."""
    enc = cap.encoder
    mf = torch.channels_last if fmt == "channels-last" else torch.contiguous_format
    enc.to(memory_format=mf)

    def run(x: torch.Tensor) -> torch.Tensor:
        x = enc.normalise(x.to(cap.device)).contiguous(memory_format=mf)
        return enc._forward_grid(x).flatten(2).transpose(1, 2)  # (B, N, D), as Encoder.forward

    images = images.contiguous(memory_format=mf)  # the batches arrive in the format they are encoded in
    with torch.inference_mode():
        run(images[:batch])  # warm-up (memory format change)
        sync(cap)
        t, c = time.perf_counter(), time.process_time()
        for s in range(0, len(images), batch):
            run(images[s: s + batch])
        sync(cap)
        rate, cpu = len(images) / (time.perf_counter() - t), (time.process_time() - c) / len(images)
    enc.to(memory_format=torch.channels_last)  # as create_encoder leaves it
    return rate, cpu


def sync(cap: Captioner) -> None:
    if cap.device.type == "cuda":
        torch.cuda.synchronize()


def encode_all(cap: Captioner, images: torch.Tensor) -> tuple[torch.Tensor, list | None]:
    """The model's features of all images, and their grounding plans (None without grounding), batch 32."""
    encoded = [cap._encode(images[s: s + 32]) for s in range(0, len(images), 32)]
    plans = None if cap.grounder is None else [p for _, ps in encoded for p in ps or []]
    return torch.cat([f for f, _ in encoded]), plans


def search_pass(cap: Captioner, feats: torch.Tensor, plans: list | None, beam: int) -> float:
    """img/s of the caption search alone (greedy or beam) over features already computed, as caption_paths
    (grounded, with its repair pass, when the captioner grounds)."""
    opts = cap.search_options(beam_size=beam)
    t = time.perf_counter()
    for s in range(0, len(feats), SEARCH_BATCH):
        cap._decode(feats[s: s + SEARCH_BATCH], plans[s: s + SEARCH_BATCH] if plans is not None else None, opts,
                    False)
    sync(cap)
    return len(feats) / (time.perf_counter() - t)


def e2e_pass(cap: Captioner, paths: list[Path], beam: int) -> tuple[float, float, list[dict]]:
    """(img/s, CPU s per image, records) of one full pass of caption_paths (2 decoding workers, batch 32)."""
    t, c = time.perf_counter(), time.process_time()
    recs = list(cap.caption_paths(paths, beam_size=beam, batch_size=32, workers=2))
    return len(paths) / (time.perf_counter() - t), (time.process_time() - c) / len(paths), recs


def format_copies(paths: list[Path], kind: str, folder: Path) -> list[Path]:
    """The photos re-encoded into ``folder`` as ``kind``, EXIF (orientation) kept: heic (with a 320-px thumbnail,
    as iPhones write them) | heic-nothumb (the picture alone) | avif."""
    from PIL import Image

    extra = {"heic": {"thumbnails": [320]}}.get(kind, {})
    out = []
    for p in paths:
        target = folder / f"{p.stem}.{kind.split('-')[0]}"
        with Image.open(p) as im:
            im.save(target, exif=im.getexif().tobytes(), **extra)
        out.append(target)
    return out


def decode_rate(cap: Captioner, paths: list[Path]) -> float:
    """img/s of decoding and resizing alone (``spec.read``, as a decoding thread does), in this thread."""
    t = time.perf_counter()
    for p in paths:
        cap.spec.read(p)
    return len(paths) / (time.perf_counter() - t)


def vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def rss_child(ckpt: Path, folder: Path, n: int, device: str) -> None:
    """Caption ``n`` images (the photos repeated) to a .json file; print peak memory as JSON."""
    photos = sorted(p for p in folder.iterdir() if is_image_file(p))
    with tempfile.TemporaryDirectory() as tmp:
        many = Path(tmp) / "many"
        many.mkdir()
        for i in range(n):
            (many / f"{i:05d}{photos[i % len(photos)].suffix}").symlink_to(photos[i % len(photos)].resolve())
        cap = Captioner.load(ckpt, device=device)
        s = caption_files(cap, [many], Path(tmp) / "out.json", beam_size=3, batch_size=32, workers=2)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps({"n": n, "captioned": s.captioned, "main_kb": vm_hwm_kb(), "worker_kb": kids,
                          "img_s": s.rate}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--n", type=int, default=256, help="photos to time on")
    ap.add_argument("--rss", default="100,1000", help="image counts for the peak-memory runs ('' to skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of each is kept)")
    ap.add_argument("--formats", default="heic,heic-nothumb",
                    help="also time copies in these formats: heic, heic-nothumb, avif ('' to skip)")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.rss_child is not None:
        rss_child(a.checkpoint, a.folder, a.rss_child, a.device)
        return

    tmp = tempfile.TemporaryDirectory()
    if a.checkpoint is not None:
        ckpt, which = a.checkpoint, f"checkpoint {a.checkpoint}"
    elif DEFAULT_MODEL.is_file():
        ckpt, which = DEFAULT_MODEL, f"the shipped default model {DEFAULT_MODEL}"
    else:
        ckpt = random_checkpoint(a.folder, Path(tmp.name) / "random.pt")
        which = "a RANDOM-INIT attention model (2500-word vocabulary; captions run to max_len: worst case)"
    cap = Captioner.load(ckpt, device=a.device)
    paths = sorted(p for p in a.folder.iterdir() if is_image_file(p))[: a.n]
    print(f"model: {which}")
    tuned = tune_cpu_allocator() if cap.device.type == "cpu" else False  # as `capcli caption` does
    print(f"{len(paths)} photos from {a.folder}; device {cap.device}; torch threads {torch.get_num_threads()}; "
          f"{os.cpu_count()} CPUs; glibc allocator tuned for both: {tuned}")

    images = collate_images([(i, cap.spec.read(p)) for i, p in enumerate(paths)])[1]  # as the pipeline decodes them
    caps = {"float32": Captioner(cap.model, cap.encoder, cap.vocab, cap.device, precision="float32",
                                 familiarity=cap.familiarity), "auto": cap,
            "ungrounded": Captioner(cap.model, cap.encoder, cap.vocab, cap.device, grounding="off")}
    caps["float32"].confidence = cap.confidence  # as Captioner.load gives it: both grounded captioners score it
    print(f"search precision: auto = {cap.precision} on this machine")
    copies = {"jpeg": paths}
    for kind in [f.strip().lower() for f in a.formats.split(",") if f.strip()]:
        (Path(tmp.name) / kind).mkdir()
        copies[kind] = format_copies(paths, kind, Path(tmp.name) / kind)
    list(cap.caption_paths(paths[:8], beam_size=3, batch_size=8, workers=2))  # warm-up
    # Interleaved rounds, best of each: on a shared machine the load comes and goes, and every figure
    # should see the same quiet moments.
    best: dict[str, float] = {}
    cpu_s: dict[str, float] = {}  # CPU seconds (all threads) per image: the work, whatever the machine's load
    words: dict[str, float] = {}
    captions: dict[str, list[str]] = {}
    encoded = {name: encode_all(c, images) for name, c in caps.items()}
    for _ in range(a.rounds):
        for fmt in ("channels-last", "nchw"):
            rate, cpu = encoder_pass(cap, images, fmt)
            best[fmt] = max(best.get(fmt, 0.0), rate)
            cpu_s[fmt] = min(cpu_s.get(fmt, 1e9), cpu)
        for prec, c in caps.items():
            for beam in (1, 3):
                key = f"{prec} beam {beam}"
                best[f"search {key}"] = max(best.get(f"search {key}", 0.0), search_pass(c, *encoded[prec], beam))
                rate, cpu, recs = e2e_pass(c, paths, beam)
                best[key] = max(best.get(key, 0.0), rate)
                cpu_s[key] = min(cpu_s.get(key, 1e9), cpu)
                captions[key] = [r.get("caption", "") for r in recs]
                words[key] = sum(len(t.split()) for t in captions[key]) / len(recs)
        for kind, files in copies.items():
            best[f"decode {kind}"] = max(best.get(f"decode {kind}", 0.0), decode_rate(cap, files))
            if kind != "jpeg":
                rate, _, recs = e2e_pass(cap, files, 3)
                best[f"{kind} e2e"] = max(best.get(f"{kind} e2e", 0.0), rate)
                captions[f"{kind} e2e"] = [r.get("caption", "") for r in recs]
    fmt = max(("channels-last", "nchw"), key=best.__getitem__)
    enc_rate = best[fmt]
    for f in ("channels-last", "nchw"):
        print(f"encoder only, {f:13s}: {best[f]:6.1f} img/s  ({cpu_s[f]:.3f} CPU s per image)")
    for prec in caps:
        for beam in (1, 3):
            key = f"{prec} beam {beam}"
            rate = best[f"search {key}"]
            bound = 1 / (1 + enc_rate / rate)  # encoder and search one after the other, nothing else
            print(f"search alone, {key:15s}: {rate:6.1f} img/s (encoder + search in turn would give {bound:.2f} x "
                  "encoder only)")
    for prec in caps:
        for beam in (1, 3):
            key = f"{prec} beam {beam}"
            print(f"end to end, {key:15s}: {best[key]:6.1f} img/s  ({best[key] / enc_rate:.2f} x encoder only; "
                  f"{cpu_s[key]:.3f} CPU s per image; {words[key]:.1f} words per caption)")
    for kind in copies:
        e2e = best["auto beam 3"] if kind == "jpeg" else best[f"{kind} e2e"]
        same = sum(x == y for x, y in zip(captions.get(f"{kind} e2e", []), captions["auto beam 3"], strict=False))
        print(f"{kind:12s} files: end to end, auto beam 3: {e2e:6.1f} img/s (JPEG: {best['auto beam 3']:.1f}); "
              f"decoding alone, one thread: {best[f'decode {kind}']:6.1f} img/s" + (
                  f"; same caption as from the JPEG: {same}/{len(paths)}" if kind != "jpeg" else ""))
    same = sum(x == y for x, y in zip(captions["float32 beam 3"], captions["auto beam 3"], strict=True))
    print(f"beam-3 captions identical in float32 and auto precision: {same}/{len(paths)}")
    changed = sum(x != y for x, y in zip(captions["ungrounded beam 3"], captions["auto beam 3"], strict=True))
    print(f"grounding: end to end, auto beam 3: {best['auto beam 3']:.1f} img/s grounded vs "
          f"{best['ungrounded beam 3']:.1f} without: ratio {best['auto beam 3'] / best['ungrounded beam 3']:.2f} "
          f"(target >= 0.75); {changed}/{len(paths)} captions changed by grounding")
    print(f"encoder only (best: {fmt}): {enc_rate:.1f} img/s; timings are the best of {a.rounds} rounds")
    ratio = best["auto beam 3"] / enc_rate  # the default pipeline, beam 3
    print(f"CPU-time ratio, beam 3 (encoder-only CPU s per image / end-to-end CPU s per image): "
          f"{cpu_s[fmt] / cpu_s['auto beam 3']:.2f}")

    for n in [int(x) for x in a.rss.split(",") if x.strip()]:
        res = subprocess.run([sys.executable, __file__, str(a.folder), "--checkpoint", str(ckpt), "--device",
                              a.device, "--rss-child", str(n)], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        kids = f", largest decoding worker process {r['worker_kb'] / 1024:.0f} MiB" if cap.device.type == "cuda" else ""
        print(f"peak RSS (VmHWM), {r['n']:5d} images to .json: {r['main_kb'] / 1024:.0f} MiB{kids} "
              f"({r['img_s']:.1f} img/s)")
    tmp.cleanup()
    print(f"ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
