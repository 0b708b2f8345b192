"""Fit capcli's caption confidence (capcli/confidence.py) on captions judged by looking at their photos.

    CAPCLI_HOME=... python scripts/fit_confidence.py collect --out val.jsonl [--coco coco.jsonl]
    python scripts/fit_confidence.py sheets --records val.jsonl --out SHEETS_DIR
    python scripts/fit_confidence.py fit --records val.jsonl [--coco coco.jsonl] [--l2 0.1] [--novel novel.jsonl]
    python scripts/fit_confidence.py novel --out SRC/f8k-novel     # then prepare, train, collect --checkpoint --split

``collect`` captions the 1,000 Flickr8k val photos (and, with ``--coco``, the 159 coco-mini photos, only ever
reported on) with the shipped model through the real ``Captioner`` (grounding on, CPU, default precision), with
what confidence reads besides the record: the photo's familiarity distance and person evidence (its grounding
plan's). ``sheets`` picks the photos to judge (:func:`judged_sample`: 150 of the least familiar
quarter of val, 150 of the rest) and draws contact sheets of them, 16 a sheet, each with its number and caption,
for a person to judge (data/judged/README.md says how; the sheets are not kept). ``fit`` fits the logistic
regression on the judged captions (data/judged/flickr8k-val-judged.jsonl), reports 10-fold cross-validated
calibration and ranking on them, and on coco-mini (report only: nothing is chosen by it) the share of captions
that name no COCO object the references lack among the confident ones; it writes the model, with what was
measured and the SHA-256 of the checkpoint, to capcli/assets/confidence-flickr8k-attention.json and the
reliability plot to docs/reliability.png. Rerun all three whenever the shipped model or grounding changes.

``novel`` writes a Flickr8k source folder whose training photos leave out every photo a reference of which names
a COCO object beyond people, dogs, their sports and what they wear (1,426 of 6,091); a model trained on it captions
those photos as the shipped model captions unfamiliar content, and ``fit --novel`` fits the CHAIR prior on its
captions instead of the shipped model's. Tried for issue 25 and not shipped: docs/research.md says why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from capcli import atomic, confidence
from capcli.alttext import label_alt_text
from capcli.chair import chair, objects_in

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
JUDGED = ROOT / "data" / "judged" / "flickr8k-val-judged.jsonl"
COCO_JUDGED = ROOT / "data" / "judged" / "coco-mini-judged-report-only.jsonl"  # never fitted on
PLOT = ROOT / "docs" / "reliability.png"
SAMPLE = 150  # photos judged from each familiarity stratum
FOLDS = 10
# The event confidence is the probability of: the caption is not wrong (its main subject and action are in the
# photo; judged right or partly right). Judged right alone is 28% of the sample: no caption reaches 0.9 of that.
RIGHT = {"right": 1.0, "partly": 1.0, "wrong": 0.0}
# What Flickr8k's photos are about: people, dogs, their sports and what they wear. A model trained without the
# photos whose references name any other COCO object (animals, vehicles, rooms, food) meets that content as the
# shipped model meets a kitchen: its captions of them show what goes wrong off the training photos.
FAMILIAR_OBJECTS = frozenset(["person", "dog", "sports ball", "frisbee", "skateboard", "surfboard", "snowboard",
                              "skis", "kite", "baseball bat", "baseball glove", "tennis racket", "backpack",
                              "handbag", "tie", "umbrella", "suitcase"])


def _order(name: str) -> str:
    """A fixed pseudo-random order of file names (any run, any machine)."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ collect
def flickr8k_references() -> dict[str, list[str]]:
    """Each Flickr8k photo's file name -> its reference captions."""
    caps = json.loads((DATA / "flickr8k" / "captions.json").read_text(encoding="utf-8"))
    files = {im["id"]: im["file_name"] for im in caps["images"]}
    refs: dict[str, list[str]] = {}
    for a in caps["annotations"]:
        refs.setdefault(files[a["image_id"]], []).append(a["caption"])
    return refs


def photo_list(which: str, files: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Flickr8k val (or the Flickr8k photos ``files``) or coco-mini (train2017 + val2017) as {file, id, path,
    references}, read in place."""
    items: list[dict[str, Any]] = []
    if which == "flickr8k":
        refs = flickr8k_references()
        if files is None:
            files = json.loads((DATA / "flickr8k" / "splits.json").read_text(encoding="utf-8"))["val"]
        return [{"file": f, "id": i, "path": str(DATA / "flickr8k" / "images" / f), "references": refs[f]}
                for i, f in enumerate(files)]
    for sub in ("train2017", "val2017"):
        caps = json.loads((DATA / "coco-mini" / "annotations" / f"captions_{sub}.json").read_text(encoding="utf-8"))
        refs = {}
        for a in caps["annotations"]:
            refs.setdefault(a["image_id"], []).append(a["caption"])
        items += [{"file": f"{sub}/{im['file_name']}", "id": im["id"], "path": str(DATA / "coco-mini" / sub /
                   im["file_name"]), "references": refs[im["id"]]} for im in caps["images"]]
    return items


def novel_split(out: Path) -> None:
    """A Flickr8k source folder whose model never sees :data:`NOVEL` content: splits.json's train is train + restval
    less every photo a reference of which names a COCO object outside :data:`FAMILIAR_OBJECTS`, val is Flickr8k val,
    test is the photos left out (captions.json and images/ are links)."""
    splits = json.loads((DATA / "flickr8k" / "splits.json").read_text(encoding="utf-8"))
    refs = flickr8k_references()
    pool = splits["train"] + splits.get("restval", [])
    novel = {f for f in pool if any(objects_in(r) - FAMILIAR_OBJECTS for r in refs[f])}
    out.mkdir(parents=True, exist_ok=True)
    for name in ("captions.json", "images"):
        if not (out / name).exists():
            (out / name).symlink_to((DATA / "flickr8k" / name).resolve())
    doc = {"dataset": "flickr8k", "train": [f for f in pool if f not in novel], "val": splits["val"],
           "test": sorted(novel)}
    (out / "splits.json").write_text(json.dumps(doc), encoding="utf-8")
    print(f"{out}: train {len(doc['train'])}, val {len(doc['val'])}, test (novel content) {len(novel)}")


def collect(items: list[dict[str, Any]], out: Path, batch: int = 16, checkpoint: Path | None = None) -> None:
    """Caption ``items`` as ``capcli caption`` does (beam 3, grounding on) and append each record, with its
    familiarity distance (over the threshold) and person evidence, to ``out`` (resumable)."""
    import torch

    from capcli import runtime
    from capcli.captioner import Captioner

    runtime.tune_cpu_allocator()
    cap = Captioner.load(checkpoint, device="cpu")
    opts = cap.search_options(beam_size=3)
    done = {json.loads(line)["file"] for line in out.read_text().splitlines()} if out.is_file() else set()
    todo = [it for it in items if it["file"] not in done]
    with out.open("a", encoding="utf-8") as f:
        for s in range(0, len(todo), batch):
            chunk = todo[s: s + batch]
            feats, plans = cap._encode(torch.stack([cap.spec.read(it["path"]) for it in chunk]))
            recs = cap._decode(feats, plans, opts, False)
            for it, r, plan in zip(chunk, recs, plans, strict=True):
                f.write(json.dumps(it | r | {"distance": plan.distance, "person": plan.person}) + "\n")
            f.flush()
            print(f"{s + len(chunk)}/{len(todo)}", flush=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evidence(rec: dict[str, Any]) -> confidence.Evidence:
    return confidence.Evidence(rec.get("distance"), rec.get("person"))


def features(rec: dict[str, Any]) -> dict[str, float]:
    return confidence.features(rec["caption"], rec["logprob"], rec.get("labels"), evidence(rec))


# ------------------------------------------------------------------------------------------ what to judge
def judged_sample(recs: Sequence[dict[str, Any]], per_stratum: int = SAMPLE) -> list[dict[str, Any]]:
    """The val photos to judge, over-sampling where errors live: ``per_stratum`` of the least familiar quarter (by
    familiarity distance) and ``per_stratum`` of the other three quarters, each picked in :func:`_order`; returned
    shuffled in that order, so a judge cannot tell the strata apart. Each gets its ``familiarity_rank`` (1: the
    least familiar of val) and ``stratum``."""
    by_distance = sorted(recs, key=lambda r: -r["distance"])
    quarter = len(by_distance) // 4
    picked = []
    for stratum, group in (("least familiar quarter", by_distance[:quarter]), ("rest", by_distance[quarter:])):
        for r in sorted(group, key=lambda r: _order(r["file"]))[:per_stratum]:
            picked.append(r | {"familiarity_rank": by_distance.index(r) + 1, "stratum": stratum})
    return sorted(picked, key=lambda r: _order("judge:" + r["file"]))


def contact_sheets(sample: Sequence[dict[str, Any]], out: Path, per_row: int = 4, rows: int = 4,
                   px: int = 224) -> None:
    """Sheets of ``per_row`` x ``rows`` photos (``px`` square, the number big, the caption below) and a text list
    of number, file and caption, for judging by eye."""
    from PIL import Image, ImageDraw, ImageFont

    big = ImageFont.truetype("DejaVuSans-Bold.ttf", 28)
    small = ImageFont.truetype("DejaVuSans.ttf", 13)
    text_h, per = 56, per_row * rows
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(0, len(sample), per):
        sheet = Image.new("RGB", (per_row * px, rows * (px + text_h)), "white")
        draw = ImageDraw.Draw(sheet)
        for j, rec in enumerate(sample[s: s + per]):
            n = s + j + 1
            x, y = (j % per_row) * px, (j // per_row) * (px + text_h)
            with Image.open(rec["path"]) as im:
                sheet.paste(im.convert("RGB").resize((px - 4, px - 4)), (x + 2, y + 2))
            draw.text((x + 6, y + 4), str(n), font=big, fill="yellow", stroke_width=3, stroke_fill="black")
            draw.multiline_text((x + 4, y + px + 1), "\n".join(textwrap.wrap(rec["caption"], 30)[:3]), font=small,
                                fill="black")
            lines.append(f"{n}\t{rec['file']}\t{rec['caption']}")
        sheet.save(out / f"sheet-{s // per + 1:02d}.png")
    (out / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------- fit and measure
PRIOR_NOVEL = ("CHAIR's label on the novel-content model's captions of the photos it never saw content like "
               "(`novel`) and of half the unjudged val photos, pulled towards by l2")
def judged(records: Sequence[dict[str, Any]], path: Path = JUDGED) -> list[tuple[dict[str, Any], str]]:
    """The judged captions joined to their records: (record, its label). A record whose
    caption is not the one judged (another model, another machine's precision) is left out, and counted."""
    by_file = {r["file"]: r for r in records}
    out, other = [], 0
    for j in read_jsonl(path):
        rec = by_file.get(j["file"])
        if rec is None or rec["caption"] != j["caption"]:
            other += 1
            continue
        out.append((rec, j["label"]))
    if other:
        print(f"{other} judged captions are not the records' captions: left out")
    return out


def chair_prior(unjudged: Sequence[dict[str, Any]], novel: Sequence[dict[str, Any]] | None = None
                ) -> tuple[confidence.ConfidenceModel, list[dict[str, Any]]]:
    """The prior: a model of CHAIR's narrower label (no COCO object the references lack) fitted on half of the
    val photos nobody judged (fixed by file name), and the other half, that neither model is fitted on. With
    ``novel`` (records of the novel-content model, ``collect --checkpoint --split``), the prior is fitted on that
    model's captions of the same half of val and of the novel-content photos instead: captions of content their
    model never saw, as the shipped model's of a kitchen are."""
    def prior_half(r: dict[str, Any]) -> bool:
        return int(_order("prior:" + r["file"]), 16) % 2 == 0

    kept = [r for r in unjudged if not prior_half(r)]
    fit_on = [r for r in unjudged if prior_half(r)]
    if novel is not None:
        half = {r["file"] for r in fit_on}
        fit_on = [r for r in novel if r.get("novel") or r["file"] in half]
    return confidence.fit([features(r) for r in fit_on], chair_right(fit_on), l2=0.01), kept


def cross_validated(rows: Sequence[tuple[dict[str, Any], str]], l2: float,
                    prior: confidence.ConfidenceModel) -> list[float]:
    """Each judged caption's confidence from a model fitted on the other folds (:data:`FOLDS`, by file name)."""
    fold = [int(_order("fold:" + r["file"]), 16) % FOLDS for r, _ in rows]
    p = [0.0] * len(rows)
    for k in range(FOLDS):
        train = [i for i in range(len(rows)) if fold[i] != k]
        model = confidence.fit([features(rows[i][0]) for i in train], [RIGHT[rows[i][1]] for i in train], l2=l2,
                               prior=prior)
        for i in range(len(rows)):
            if fold[i] == k:
                p[i] = model.probability(features(rows[i][0]))
    return p


def scores(p: Sequence[float], y: Sequence[float], high: float = 0.9) -> dict[str, float]:
    """Calibration and ranking of confidences ``p`` against outcomes ``y``, and what the confident captions are."""
    hi = [t for q, t in zip(p, y, strict=True) if q >= high]
    wrong = [q for q, t in zip(p, y, strict=True) if not t]
    return {"n": len(p), "right": round(sum(y) / len(y), 4), "mean_confidence": round(sum(p) / len(p), 4),
            "auc": round(confidence.ranking_auc(p, y), 4), "ece": round(confidence.expected_calibration_error(p, y), 4),
            "brier": round(sum((q - t) ** 2 for q, t in zip(p, y, strict=True)) / len(y), 4),
            f"share_at_{high}": round(len(hi) / len(p), 4),
            f"right_at_{high}": round(sum(hi) / len(hi), 4) if hi else float("nan"),
            f"wrong_at_{high}": round(sum(q >= high for q in wrong) / len(wrong), 4) if wrong else float("nan")}


def chair_right(recs: Sequence[dict[str, Any]], captions: Sequence[str] | None = None) -> list[float]:
    """1.0 per record whose caption (or the given text in its place) names no COCO object its references lack."""
    texts = captions if captions is not None else [r["caption"] for r in recs]
    per = chair(dict(enumerate(texts)), {i: r["references"] for i, r in enumerate(recs)}).per_image
    return [0.0 if per[i].hallucinated else 1.0 for i in range(len(recs))]


def offered_chair(recs: Sequence[dict[str, Any]], p: Sequence[float], min_confidence: float) -> dict[str, float]:
    """CHAIR_s of the alt text offered with ``--min-confidence``: the caption, or the labels below it."""
    texts = [r["caption"] if q >= min_confidence else label_alt_text(r.get("labels"))
             for r, q in zip(recs, p, strict=True)]
    y = chair_right(recs, texts)
    low = sum(q < min_confidence for q in p) / len(p)
    return {"min_confidence": min_confidence, "label_text_share": round(low, 4),
            "chair_s": round(1 - sum(y) / len(y), 4)}


def plot(bins: list[tuple[int, float, float]], ece: float, n: int, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    full = [(c, m, r) for c, m, r in bins if c]
    ax.plot([m for _, m, _ in full], [r for _, _, r in full], "o-", c="C0", label="judged val photos, cross-validated")
    for c, m, r in full:
        ax.annotate(str(c), (m, r), textcoords="offset points", xytext=(4, -10), fontsize=7, color="C0")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (mean per bin)", ylabel="captions judged right",
           title=f"Flickr8k val, {n} judged photos ({FOLDS}-fold): ECE {ece:.3f}")
    ax.title.set_fontsize(9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def fit_and_measure(val: list[dict[str, Any]], coco: list[dict[str, Any]] | None, l2: float,
                    novel: list[dict[str, Any]] | None = None) -> None:
    """Fit on the judged captions, its coefficients pulled towards the CHAIR prior's, measure (cross-validated
    on them; by CHAIR on the val photos neither model saw, and on coco-mini), write the asset and the plot."""
    from capcli.captioner import DEFAULT_MODEL

    rows = judged(val)
    y = [RIGHT[label] for _, label in rows]
    prior, kept = chair_prior([r for r in val if r["file"] not in {r["file"] for r, _ in rows}], novel)
    p_cv = cross_validated(rows, l2, prior)
    model = confidence.fit([features(r) for r, _ in rows], y, l2=l2, prior=prior)
    model.checkpoint_sha256 = confidence.file_sha256(DEFAULT_MODEL)
    familiar = [i for i, (r, _) in enumerate(rows) if r["distance"] <= 1.0]
    p_kept = [model.probability(features(r)) for r in kept]
    model.measured = {
        "data": f"{len(rows)} Flickr8k val captions judged by looking at their photos (data/judged/), "
                "half from the least familiar quarter of val",
        "label": "1 if judged right or partly right (its main subject and action are in the photo), 0 if wrong",
        "l2": l2, "folds": FOLDS, "prior": PRIOR_NOVEL if novel else "CHAIR's label on half the unjudged val "
        f"photos ({len(val) - len(rows) - len(kept)}), pulled towards by l2", "prior_coef": prior.coef,
        "judged_cross_validated": scores(p_cv, y),
        # how it ranks the captions judged right (every thing and doing named is in the photo) above the rest
        "judged_strictly_right_cross_validated": scores(p_cv, [float(label == "right") for _, label in rows]),
        "judged_familiar_cross_validated": scores([p_cv[i] for i in familiar], [y[i] for i in familiar]),
        "bins_judged_cross_validated": [{"n": c, "confidence": round(m, 4), "observed": round(r, 4)}
                                        for c, m, r in confidence.calibration_bins(p_cv, y) if c],
        "val_unseen_chair": scores(p_kept, chair_right(kept)),  # val photos neither model was fitted on
    }
    if coco:  # report only: nothing above was chosen by it
        p_coco = [model.probability(features(r)) for r in coco]
        model.measured["coco_mini_chair_report_only"] = scores(p_coco, chair_right(coco)) | {
            "caption_chair_s": round(1 - sum(chair_right(coco)) / len(coco), 4),
            "offered": [offered_chair(coco, p_coco, m) for m in (0.3, 0.5)]}
        coco_judged = judged(coco, COCO_JUDGED)  # judged by the same rule, only ever reported on
        model.measured["coco_mini_judged_report_only"] = scores(
            [model.probability(features(r)) for r, _ in coco_judged], [RIGHT[label] for _, label in coco_judged])
    atomic.write_json(confidence.ASSET, model.to_dict())
    plot(confidence.calibration_bins(p_cv, y), model.measured["judged_cross_validated"]["ece"], len(rows), PLOT)
    print(json.dumps({k: v for k, v in model.measured.items() if not k.startswith("bins")}, indent=1))
    print("coef", dict(zip(model.features, model.coef, strict=True)), "intercept", model.intercept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    c = sub.add_parser("collect", help="caption Flickr8k val (and coco-mini) with what confidence reads")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--coco", type=Path, help="also caption coco-mini into this file (report only)")
    c.add_argument("--checkpoint", type=Path, help="another model than the shipped one (the novel-content model)")
    c.add_argument("--split", type=Path, help="caption this source folder's val and test photos instead "
                   "(the folder `novel` writes)")
    n = sub.add_parser("novel", help="a Flickr8k source folder whose train split leaves out novel content")
    n.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("sheets", help="contact sheets of the photos to judge")
    s.add_argument("--records", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("fit", help="fit on the judged captions, measure, write the asset")
    f.add_argument("--records", type=Path, required=True)
    f.add_argument("--coco", type=Path)
    f.add_argument("--l2", type=float, default=0.1)
    f.add_argument("--novel", type=Path, help="records of the novel-content model (collect --checkpoint --split): "
                   "the CHAIR prior is fitted on them")
    args = ap.parse_args()
    if args.step == "novel":
        novel_split(args.out)
    elif args.step == "collect":
        split = json.loads((args.split / "splits.json").read_text(encoding="utf-8")) if args.split else None
        items = photo_list("flickr8k", split["val"] + split["test"] if split else None)
        for it in items:  # the photos of content the novel-content model never saw
            it["novel"] = split is not None and it["file"] in set(split["test"])
        collect(items, args.out, checkpoint=args.checkpoint)
        if args.coco:
            collect(photo_list("coco-mini"), args.coco, checkpoint=args.checkpoint)
    elif args.step == "sheets":
        contact_sheets(judged_sample(read_jsonl(args.records)), args.out)
    else:
        fit_and_measure(read_jsonl(args.records), read_jsonl(args.coco) if args.coco else None, args.l2,
                        read_jsonl(args.novel) if args.novel else None)


if __name__ == "__main__":
    main()
