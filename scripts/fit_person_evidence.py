"""Fit the person evidence that grounding uses (capcli/grounding.py): how much a photo's ImageNet classes say a person.

ImageNet has no person class, so the encoder's head cannot say whether a photo shows people, and the decoder, trained
on Flickr8k, says "a man" of most photos. This learns, from Flickr8k's **train** split (train + restval), which
ImageNet classes come with people: a logistic regression on the head's 1,000 probabilities whose weights are held
**non-negative**. So a class counts only for a person, never against one, and a class the training photos never
showed (a refrigerator, a toilet) counts for nothing: a photo whose evidence is all on such classes gets no person
evidence, instead of the guess an unconstrained probe extrapolates (one on the pooled features said "person" 0.84-0.99
of toilets and kitchens). The person evidence of a photo is ``Σ_c w_c p(c)``, in logit units.

Labels come from the reference captions by capcli's CHAIR table: a person when at least two of the five references
name one, none when no reference does (photos in between are left out). The L2 weight is chosen on Flickr8k **val**
by log-loss. The fit's intercept holds Flickr8k's share of photos with people (77%); the script prints how many val
photos would have their people held back at even odds (``GroundingPolicy.person_p``), at that share and at a share of
one half, and how many of those have none. coco-mini is never read.

    python scripts/fit_person_evidence.py [--data flickr8k] [--cache DIR]

writes capcli/assets/person-evidence.json (needs ``capcli prepare ../shared/data/flickr8k --name flickr8k``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from capcli import atomic
from capcli.chair import objects_in
from capcli.encoders import create_encoder
from capcli.grounding import PERSON_EVIDENCE
from capcli.layout import Dataset

L2_GRID = (1e-7, 1e-6, 1e-5, 1e-4)
ENCODER = "efficientnet-lite0"  # the shipped encoder; the weights are over ImageNet classes, as any head's


def label(captions: list[str]) -> float | None:
    """1 if at least two references name a person, 0 if none does, else None (left out)."""
    n = sum("person" in objects_in(c) for c in captions)
    return 1.0 if n >= 2 else 0.0 if n == 0 else None


@torch.no_grad()
def imagenet_probs(ds: Dataset, split: str, cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ImageNet probabilities (n, 1000), labels (n,)) of the labelled photos of ``split`` (kept in ``cache``)."""
    if cache is not None and cache.is_file():
        saved = torch.load(cache)
        return saved["p"], saved["y"]
    enc = create_encoder(ENCODER).for_inference()
    recs = [(r, y) for r in ds.split(split) if (y := label(r.captions)) is not None]
    probs = []
    for s in range(0, len(recs), 64):
        x = torch.stack([enc.spec.read(ds.path(r)) for r, _ in recs[s: s + 64]])
        probs.append(enc.imagenet_logits(enc(x)).float().softmax(-1))
        print(f"{split}: {s + len(x)}/{len(recs)}", end="\r", flush=True)
    print()
    p, y = torch.cat(probs), torch.tensor([y for _, y in recs])
    if cache is not None:
        torch.save({"p": p, "y": y}, cache)
    return p, y


def fit(p: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 3000) -> tuple[torch.Tensor, float]:
    """Non-negative weights (1000,) (softplus of free parameters) and a bias, by Adam on the penalised log-loss."""
    torch.manual_seed(0)
    u = torch.full((p.size(1),), -5.0, requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([u, b], lr=0.05)
    for _ in range(steps):
        w = torch.nn.functional.softplus(u)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(p @ w + b, y) + l2 * (w * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.nn.functional.softplus(u).detach(), float(b.detach())


def log_loss(z: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.binary_cross_entropy_with_logits(z, y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="flickr8k", help="a prepared dataset (name or folder) with train and val")
    ap.add_argument("--cache", type=Path, help="a folder to keep the ImageNet probabilities in between runs")
    args = ap.parse_args()
    from capcli.evaluate import open_dataset

    ds = open_dataset(args.data)
    cache = {s: args.cache / f"{ds.name}-{s}-{ENCODER}-probs.pt" if args.cache else None for s in ("train", "val")}
    p_tr, y_tr = imagenet_probs(ds, "train", cache["train"])
    p_va, y_va = imagenet_probs(ds, "val", cache["val"])
    with torch.enable_grad():
        fits = {l2: fit(p_tr, y_tr, l2) for l2 in L2_GRID}
    losses = {l2: log_loss(p_va @ w + b, y_va) for l2, (w, b) in fits.items()}
    best = min(losses, key=losses.__getitem__)
    w, b = fits[best]
    base_rate = float(y_tr.mean())
    mass = p_va @ w
    held = {}
    for prior in (base_rate, 0.5):  # P(person) < 0.5 at the training photos' share of people, and at even odds
        below = mass + b - math.log(base_rate / (1 - base_rate)) + math.log(prior / (1 - prior)) < 0
        held[f"{prior:.4f}"] = {"photos": int(below.sum()), "without_people": int((below & (y_va == 0)).sum())}
    meta = {"encoder": ENCODER, "trained_on": f"{ds.name} train ({len(y_tr)} photos, {int(y_tr.sum())} with people)",
            "labels": "person: >= 2 of the references name one (capcli.chair); none: no reference does",
            "l2": best, "bias": round(b, 4), "base_rate": round(base_rate, 4),
            "val_log_loss": {str(k): round(v, 4) for k, v in losses.items()}, "val_photos": len(y_va),
            "val_held_back_at_prior": held}
    weights = {str(c): round(float(v), 4) for c, v in enumerate(w.tolist()) if v >= 1e-3}
    atomic.write_json(PERSON_EVIDENCE, {"meta": meta, "weights": weights})
    print(json.dumps(meta, indent=1))
    print(f"wrote {PERSON_EVIDENCE} ({len(weights)} classes with weight >= 0.001)")


if __name__ == "__main__":
    main()
