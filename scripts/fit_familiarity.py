"""Give checkpoints their training photos' familiarity (capcli/familiar.py), which grounding uses to be stricter about
photos unlike them.

`capcli train` stores it in the checkpoints it writes; this adds it to checkpoints trained before that, such as the
shipped ones (capcli/assets/flickr8k-*.pt, trained on Flickr8k train + restval with val to select). It encodes the
photos of the dataset's **train** split (train + restval) and of its **val** split with the checkpoint's encoder,
fits the nearest-neighbour distance threshold at the val quantile ``familiar.QUANTILE`` and rewrites each
checkpoint atomically with the entry added (nothing else in it changes). coco-mini is never read.

    python scripts/fit_familiarity.py CKPT [CKPT ...] [--data flickr8k] [--cache FILE]

(needs ``capcli prepare ../shared/data/flickr8k --name flickr8k``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from capcli.checkpoint import load_checkpoint, save_checkpoint
from capcli.encoders import create_encoder
from capcli.familiar import Familiarity
from capcli.layout import Dataset, open_dataset


@torch.no_grad()
def pooled(ds: Dataset, split: str, encoder: str) -> torch.Tensor:
    """The pooled features (n, D) of the photos of ``split``."""
    enc = create_encoder(encoder).for_inference()
    recs = ds.split(split)
    out = []
    for s in range(0, len(recs), 64):
        x = torch.stack([enc.spec.read(ds.path(r)) for r in recs[s: s + 64]])
        out.append(enc(x).float().mean(1))  # (b, D)
        print(f"{split}: {s + len(x)}/{len(recs)}", end="\r", flush=True)
    print()
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--data", default="flickr8k", help="the prepared dataset the checkpoints were trained on")
    ap.add_argument("--cache", type=Path, help="keep the pooled features here (and reuse them)")
    a = ap.parse_args()
    ckpts = {p: load_checkpoint(p) for p in a.checkpoints}
    encoders = {ck["encoder"]["name"] for ck in ckpts.values()}
    if len(encoders) != 1:
        raise SystemExit(f"the checkpoints use different encoders: {sorted(encoders)}")
    encoder = encoders.pop()
    if a.cache is not None and a.cache.is_file():
        train, val = torch.load(a.cache).values()
    else:
        ds = open_dataset(a.data)
        train, val = pooled(ds, "train", encoder), pooled(ds, "val", encoder)
        if a.cache is not None:
            torch.save({"train": train, "val": val}, a.cache)
    fam = Familiarity.fit(train, val)
    outside = int(fam.outside(val.unsqueeze(1)).sum())
    print(f"{len(train)} training photos, {len(val)} val photos; threshold {fam.threshold:.4f} "
          f"(k = {fam.k}, quantile {fam.quantile}): {outside} val photos outside")
    for path, ckpt in ckpts.items():
        ckpt["familiarity"] = fam.to_dict()
        save_checkpoint(path, {k: v for k, v in ckpt.items() if k != "format"})
        print(f"{path}: familiarity added ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
