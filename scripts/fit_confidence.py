"""Fit capcli's caption confidence (capcli/confidence.py) on Flickr8k val and measure its calibration.

    CAPCLI_HOME=... python scripts/fit_confidence.py [--records CACHE.jsonl] [--l2 0.01]

Captions the 1,000 Flickr8k val photos with the shipped model through the real ``Captioner`` (grounding on, CPU,
default precision), labels each caption by CHAIR against its references (1: names no object they do not name),
fits the logistic regression on one fixed half (``confidence.held_apart`` false) and measures it on the other:
expected calibration error (10 bins) and a reliability plot (docs/reliability.png). Writes the model, with what
was measured and the SHA-256 of the checkpoint, to capcli/assets/confidence-flickr8k-attention.json. Rerun it
whenever the shipped model or grounding changes (the model is matched to the checkpoint file by its hash).

``--records`` keeps the captioned records in a file and reuses them on the next run (delete it to recaption).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from capcli import atomic, confidence
from capcli.captioner import DEFAULT_MODEL, Captioner
from capcli.evaluate import open_dataset

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "reliability.png"


def caption_val(cache: Path | None) -> list[dict[str, Any]]:
    """One record per Flickr8k val photo: id, file, references, and the Captioner's caption, logprob, labels."""
    if cache is not None and cache.is_file():
        return [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
    ds = open_dataset("flickr8k")
    val = ds.split("val")
    cap = Captioner.load(DEFAULT_MODEL, device="cpu")
    t0 = time.perf_counter()
    recs = list(cap.caption_paths([ds.path(r) for r in val]))
    print(f"captioned {len(val)} photos in {time.perf_counter() - t0:.0f} s")
    out = [{"id": r.id, "file": r.file, "references": r.captions, "caption": rec["caption"],
            "logprob": rec["logprob"], "labels": rec.get("labels", [])} for r, rec in zip(val, recs, strict=True)]
    if cache is not None:
        cache.write_text("".join(json.dumps(o) + "\n" for o in out), encoding="utf-8")
    return out


def ranking_auc(p: list[float], y: list[float]) -> float:
    """The chance that a random right caption gets more confidence than a random wrong one (ties half)."""
    right = [q for q, t in zip(p, y, strict=True) if t]
    wrong = [q for q, t in zip(p, y, strict=True) if not t]
    wins = sum((a > b) + 0.5 * (a == b) for a in right for b in wrong)
    return wins / (len(right) * len(wrong))


def brier(p: list[float], y: list[float]) -> float:
    return sum((q - t) ** 2 for q, t in zip(p, y, strict=True)) / len(y)


def plot(bins: list[tuple[int, float, float]], ece: float, n: int, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    full = [(c, m, r) for c, m, r in bins if c]
    ax.plot([m for _, m, _ in full], [r for _, _, r in full], "o-", c="C0", label="held-apart val photos")
    for c, m, r in full:
        ax.annotate(str(c), (m, r), textcoords="offset points", xytext=(4, -10), fontsize=7, color="C0")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (mean per bin)",
           ylabel="captions naming no made-up object",
           title=f"Flickr8k val, {n} held-apart photos: ECE {ece:.3f}")
    ax.title.set_fontsize(9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=Path, help="cache of the captioned records (reused when present)")
    ap.add_argument("--l2", type=float, default=1e-2)
    args = ap.parse_args()
    recs = caption_val(args.records)
    y = confidence.outcomes({r["id"]: r["caption"] for r in recs}, {r["id"]: r["references"] for r in recs})
    x = [confidence.features(r["caption"], r["logprob"], r["labels"]) for r in recs]
    fit_i = [i for i, r in enumerate(recs) if not confidence.held_apart(r["file"])]
    test_i = [i for i, r in enumerate(recs) if confidence.held_apart(r["file"])]
    model = confidence.fit([x[i] for i in fit_i], [y[recs[i]["id"]] for i in fit_i], l2=args.l2)
    p = [model.probability(x[i]) for i in test_i]
    t = [y[recs[i]["id"]] for i in test_i]
    ece = confidence.expected_calibration_error(p, t)
    bins = confidence.calibration_bins(p, t)
    model.checkpoint_sha256 = confidence.file_sha256(DEFAULT_MODEL)
    model.measured = {
        "data": "Flickr8k val (1,000 photos), split in halves by confidence.held_apart",
        "label": "1 if the caption names no COCO object that its references do not name (CHAIR)",
        "n_fit": len(fit_i), "n_held_apart": len(test_i),
        "base_rate_fit": round(sum(y[recs[i]["id"]] for i in fit_i) / len(fit_i), 4),
        "base_rate_held_apart": round(sum(t) / len(t), 4),
        "ece_held_apart": round(ece, 4), "ece_bins": 10, "l2": args.l2,
        "mean_confidence_held_apart": round(sum(p) / len(p), 4),
        "auc_held_apart": round(ranking_auc(p, t), 4), "brier_held_apart": round(brier(p, t), 4),
        # the fit half's base rate for every caption: calibrated on average, but ranks nothing
        "brier_base_rate_held_apart": round(brier([sum(y[recs[i]["id"]] for i in fit_i) / len(fit_i)] * len(t), t), 4),
        "bins_held_apart": [{"n": c, "confidence": round(m, 4), "observed": round(r, 4)} for c, m, r in bins if c],
    }
    atomic.write_json(confidence.ASSET, model.to_dict())
    plot(bins, ece, len(test_i), PLOT)
    print(json.dumps({k: v for k, v in model.measured.items() if k != "bins_held_apart"}, indent=1))
    print("coef", dict(zip(model.features, model.coef, strict=True)), "intercept", model.intercept)
    print(f"wrote {confidence.ASSET.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
