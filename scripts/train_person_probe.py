"""Train the person probe that grounding uses (capcli/grounding.py): is there a person in the photo?

ImageNet has no person class, so the encoder's head cannot say whether the photo shows people; the decoder, trained
on Flickr8k, says "a man" of most photos. The probe is a logistic regression on the encoder's pooled grid, trained on
Flickr8k's **train** split (train + restval) with labels read from its reference captions by capcli's CHAIR table
(capcli/chair.py): a person when at least two of the five references name one, none when no reference does (photos
in between are left out). The L2 weight is chosen on Flickr8k **val** by log-loss; coco-mini is never read.

    python scripts/train_person_probe.py --data flickr8k [--encoder efficientnet-lite0]

writes capcli/assets/person-probe-<encoder>.json (needs ``capcli prepare ../shared/data/flickr8k --name flickr8k``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from capcli.chair import objects_in
from capcli.encoders import create_encoder
from capcli.grounding import PERSON_PROBES, PersonProbe
from capcli.layout import Dataset

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def label(captions: list[str]) -> float | None:
    """1 if at least two references name a person, 0 if none does, else None (left out)."""
    n = sum("person" in objects_in(c) for c in captions)
    return 1.0 if n >= 2 else 0.0 if n == 0 else None


@torch.inference_mode()
def pooled_features(ds: Dataset, split: str, encoder_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled grids (n, D), labels (n,)) of the labelled photos of ``split``."""
    enc = create_encoder(encoder_name).for_inference()
    recs = [(r, y) for r in ds.split(split) if (y := label(r.captions)) is not None]
    feats = []
    for s in range(0, len(recs), 64):
        x = torch.stack([enc.spec.read(ds.path(r)) for r, _ in recs[s: s + 64]])
        feats.append(enc(x).mean(1))
        print(f"{split}: {s + len(x)}/{len(recs)}", end="\r", flush=True)
    print()
    return torch.cat(feats), torch.tensor([y for _, y in recs])


def fit(x: torch.Tensor, y: torch.Tensor, l2: float, mean: torch.Tensor, std: torch.Tensor) -> PersonProbe:
    """Logistic regression on standardised features, L2-penalised, by L-BFGS."""
    z = (x - mean) / std
    w = torch.zeros(x.size(1), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return PersonProbe(w.detach(), float(b), mean, std)


def log_loss(probe: PersonProbe, x: torch.Tensor, y: torch.Tensor) -> float:
    p = probe(x).clamp(1e-6, 1 - 1e-6)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="flickr8k", help="a prepared dataset (name or folder) with train and val")
    ap.add_argument("--encoder", default="efficientnet-lite0")
    args = ap.parse_args()
    from capcli.evaluate import open_dataset

    ds = open_dataset(args.data)
    x_tr, y_tr = pooled_features(ds, "train", args.encoder)
    x_va, y_va = pooled_features(ds, "val", args.encoder)
    mean, std = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)
    with torch.enable_grad():
        fits = {l2: fit(x_tr, y_tr, l2, mean, std) for l2 in L2_GRID}
    losses = {l2: log_loss(p, x_va, y_va) for l2, p in fits.items()}
    best = min(losses, key=losses.__getitem__)
    probe = fits[best]
    acc = float(((probe(x_va) >= 0.5).float() == y_va).float().mean())
    meta = {"encoder": args.encoder, "trained_on": f"{ds.name} train ({len(y_tr)} photos, {int(y_tr.sum())} with "
            "people)", "labels": "person: >= 2 of the references name one (capcli.chair); none: no reference does",
            "l2": best, "val_log_loss": {str(k): round(v, 4) for k, v in losses.items()},
            "val_accuracy": round(acc, 4), "val_photos": len(y_va)}
    out = Path(PERSON_PROBES[args.encoder])
    out.write_text(json.dumps(probe.to_dict(meta=meta)) + "\n", encoding="utf-8")
    print(json.dumps(meta, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
