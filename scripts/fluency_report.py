"""How many captions are broken sentences (capcli/fluency.py), per caption file.

    python scripts/fluency_report.py RESULTS [RESULTS ...] [--examples 5]

RESULTS: a COCO results file (``capcli evaluate`` writes one: ``[{"image_id", "caption"}, ...]``), or what
``capcli caption -o`` writes (.json: a list of records; .jsonl: one record a line). Prints, per file, the share
of captions with each defect and with any, and a few broken captions.

How the numbers in the README were made (CAPCLI_HOME of your own; Flickr8k val is where the search rules were
checked, coco-mini is reported, never tuned on):

    capcli prepare ../shared/data/flickr8k --name flickr8k
    capcli evaluate --data flickr8k --grounding auto --out after-auto     # and --grounding off
    capcli caption ../shared/data/coco-mini/val2017 ../shared/data/coco-mini/train2017 -o coco.jsonl
    python scripts/fluency_report.py after-auto/*results*.json coco.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capcli.fluency import DEFECTS, defects  # noqa: E402
from capcli.vocab import tokenize  # noqa: E402


def captions_of(path: Path) -> list[str]:
    """The captions of a results / records file (records without a caption, e.g. errors, are skipped)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        records = data if isinstance(data, list) else data.get("records", data.get("images", []))
    return [str(r["caption"]) for r in records if isinstance(r, dict) and r.get("caption")]


def report(path: Path, examples: int) -> str:
    caps = captions_of(path)
    found = [defects(tokenize(c)) for c in caps]
    n = max(len(caps), 1)
    cols = [f"{d} {100 * sum(d in f for f in found) / n:.1f}%" for d in DEFECTS]
    cols.append(f"any {100 * sum(bool(f) for f in found) / n:.1f}%")
    lines = [f"{path}: {len(caps)} captions; " + ", ".join(cols)]
    lines += [f"    {c!r}: {', '.join(sorted(f))}" for c, f in zip(caps, found, strict=True) if f][:examples]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--examples", type=int, default=5, help="broken captions to show per file")
    args = ap.parse_args()
    for f in args.files:
        print(report(f, args.examples))


if __name__ == "__main__":
    main()
