"""``capcli evaluate``: score captions of a dataset's split, from a checkpoint or a COCO results file, and write
the results, the metrics JSON and the HTML report.

The scores are the COCO caption toolkit's (:mod:`capcli.scoring`, which runs it; :mod:`capcli.toolkit` holds its
tokenizers and Java processes) plus CHAIR's object hallucination (:mod:`capcli.chair`). :func:`run` is
``capcli evaluate`` as one call (which options go together, where the outputs go); the HTML report is
:mod:`capcli.report`. :func:`score` and :class:`Scores` are :mod:`capcli.scoring`'s, here for callers that score
captions they already have.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import atomic
from .errors import EvaluateError, UsageError
from .layout import Dataset, ImageRecord, open_dataset
from .progress import NULL, Progress
from .scoring import (
    DEFAULT_METRICS,
    METRIC_KEYS,
    METRICS,
    TOKENIZERS,
    Scores,
    add_chair,
    check_metrics,
    check_tokenizer,
    score,
)
from .toolkit import close_meteor, spice_status

__all__ = ["DEFAULT_METRICS", "METRICS", "METRIC_KEYS", "TOKENIZERS", "Evaluation", "Scores", "add_chair",
           "close_meteor", "evaluate_checkpoint", "evaluate_results", "load_results", "metrics_document",
           "open_dataset", "run", "score", "spice_status", "split_records", "splits_of", "write_metrics",
           "write_results"]


# ---- datasets and results files ------------------------------------------------------------------
def splits_of(split: str) -> tuple[str, ...]:
    """``"train+val"`` -> ("train", "val"): several splits scored as one (e.g. all of a small test set)."""
    return tuple(s for s in split.split("+") if s)


def split_records(dataset: Dataset, split: str) -> list[ImageRecord]:
    """The images of ``split`` (``a+b`` for several) that have references (raises if there are none)."""
    recs = dataset.split(*splits_of(split))
    if not recs:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(dataset.split_counts().items()))
        raise EvaluateError(f"split {split!r} of dataset {dataset.name} has no images (it has: {counts})")
    return recs


def _few(ids: Sequence[int], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def load_results(
    path: str | Path, dataset: Dataset, split: str, allow_missing: bool = False
) -> dict[int, str]:
    """Read a COCO results file ``[{"image_id": int, "caption": str}, ...]`` for ``split`` of ``dataset``.

    EvaluateError (one line) for unreadable or malformed files, duplicate image ids, ids that are not
    in the split, and images of the split without a caption (unless ``allow_missing``).
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"results file not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise EvaluateError(f"{path}: not a UTF-8 text file ({e.reason})") from e
    except json.JSONDecodeError as e:
        raise EvaluateError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except OSError as e:
        raise EvaluateError(f"cannot read results file {path}: {e.strerror or e}") from e
    if not isinstance(doc, list):
        raise EvaluateError(
            f"{path}: expected a COCO results list [{{\"image_id\": ..., \"caption\": ...}}, ...], "
            f"got a JSON {type(doc).__name__ if not isinstance(doc, dict) else 'object'}"
        )
    results: dict[int, str] = {}
    counts: Counter[int] = Counter()
    for n, entry in enumerate(doc):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise EvaluateError(
                f"{path}: entry {n} is not an object with \"image_id\" and \"caption\": {str(entry):.80}"
            )
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise EvaluateError(f"{path}: entry {n}: image_id must be an integer, got {image_id!r:.40}")
        if not isinstance(caption, str):
            raise EvaluateError(f"{path}: entry {n} (image {image_id}): caption must be a string, got {caption!r:.40}")
        counts[image_id] += 1
        results[image_id] = caption
    dups = sorted(i for i, c in counts.items() if c > 1)
    if dups:
        raise EvaluateError(
            f"{path}: {len(dups)} image id(s) appear more than once (e.g. {_few(dups)}); "
            "a results file holds one caption per image"
        )
    split_ids = {r.id for r in split_records(dataset, split)}
    unknown = sorted(set(results) - split_ids)
    if unknown:
        elsewhere = [i for i in unknown if i in {r.id for r in dataset.images}]
        where = f"; {len(elsewhere)} of them belong to other splits" if elsewhere else ""
        raise EvaluateError(
            f"{path}: {len(unknown)} image id(s) are not in split {split!r} of {dataset.name} "
            f"(e.g. {_few(unknown)}){where}"
        )
    missing = sorted(split_ids - set(results))
    if missing and not allow_missing:
        raise EvaluateError(
            f"{path}: {len(missing)} of the {len(split_ids)} images of split {split!r} have no caption "
            f"(e.g. {_few(missing)}); pass --allow-missing to score only the {len(results)} captioned ones"
        )
    if not results:
        raise EvaluateError(f"{path}: holds no captions")
    return dict(sorted(results.items()))


def evaluate_results(
    path: str | Path,
    dataset: Dataset,
    split: str = "val",
    allow_missing: bool = False,
    metrics: Sequence[str] = DEFAULT_METRICS,
    tokenizer: str = "auto",
    progress: Progress = NULL,
) -> tuple[dict[int, str], Scores]:
    """Score a COCO results file against ``split`` of ``dataset``."""
    results = load_results(path, dataset, split, allow_missing=allow_missing)
    refs = dataset.references(*splits_of(split))
    scores = add_chair(score(results, refs, metrics=metrics, tokenizer=tokenizer, progress=progress), results, refs)
    if len(results) < len(refs):
        scores.notes.insert(
            0, f"scored {len(results)} of the {len(refs)} images of split {split!r}: "
            f"{len(refs) - len(results)} have no caption in the results (--allow-missing)"
        )
    return results, scores


def evaluate_checkpoint(
    checkpoint: str | Path | None,
    dataset: str | Path | Dataset,
    split: str = "val",
    beam_size: int = 3,
    batch_size: int = 32,
    device: str = "auto",
    progress: Progress = NULL,
    metrics: Sequence[str] = DEFAULT_METRICS,
    tokenizer: str = "auto",
    max_len: int = 20,
    workers: int = 2,
    length_penalty: float = 0.0,
    precision: str = "float32",
    grounding: str = "auto",
) -> tuple[dict[int, str], Scores]:
    """Caption every image of ``split`` with ``checkpoint`` and score the captions.

    ``grounding`` as for ``capcli caption`` (auto: grounded in the encoder's ImageNet evidence where it can be).

    The search runs in float32 by default, so that scores do not depend on the machine; ``precision="auto"``
    scores what ``capcli caption`` writes (int8 or bfloat16 products where the CPU computes them natively).

    Images that cannot be read are left out (with a note), never scored as empty captions silently.
    """
    from .captioner import Captioner

    ds = open_dataset(dataset)
    recs = split_records(ds, split)
    check_metrics(metrics)  # fail before the slow part
    check_tokenizer(tokenizer)
    captioner = Captioner.load(checkpoint, device=device, precision=precision, grounding=grounding)
    results: dict[int, str] = {}
    failed: list[tuple[ImageRecord, str]] = []
    outs = captioner.caption_paths(
        [ds.path(r) for r in recs], beam_size=beam_size, batch_size=batch_size, workers=workers,
        max_len=max_len, progress=progress, length_penalty=length_penalty,
    )
    n_out = 0
    for item in outs:  # drain the generator (not zip) so that it reaches its end and closes its progress
        if n_out < len(recs):
            rec = recs[n_out]
            if "error" in item:
                failed.append((rec, str(item["error"])))
            else:
                results[rec.id] = str(item["caption"])
        n_out += 1
    if n_out != len(recs):
        raise EvaluateError(f"the captioner returned {n_out} captions for {len(recs)} images")
    if not results:
        first = failed[0] if failed else None
        raise EvaluateError(
            f"no image of split {split!r} could be captioned"
            + (f" (first: {ds.path(first[0])}: {first[1]})" if first else "")
        )
    empty = sum(1 for c in results.values() if not c.strip())
    if empty:  # an undertrained model says <end> first: scored as it is, but never silently
        progress.warn(f"{empty} of {len(results)} captions are empty (the model ends them at once: undertrained?)")
    refs = ds.references(*splits_of(split))
    scores = add_chair(score(results, refs, metrics=metrics, tokenizer=tokenizer, progress=progress), results, refs)
    if failed:
        rec, why = failed[0]
        scores.notes.insert(
            0, f"{len(failed)} of the {len(recs)} images could not be read and were left out "
            f"(first: {rec.file}: {why})"
        )
    return results, scores


# ---- writing outputs -----------------------------------------------------------------------------
def write_results(path: str | Path, results: Mapping[int, str]) -> Path:
    """COCO results format: ``[{"image_id": int, "caption": str}, ...]`` sorted by image id."""
    return atomic.write_json(Path(path), [{"image_id": int(i), "caption": results[i]} for i in sorted(results)])


def metrics_document(
    scores: Scores,
    split: str,
    n_images: int,
    checkpoint: str | Path | None = None,
    results: str | Path | None = None,
    beam: int | None = None,
    dataset: str | None = None,
    length_penalty: float | None = None,
    grounding: str | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "metrics": {k: scores.values[k] for k in METRIC_KEYS if k in scores.values},
        "official": {k: scores.official[k] for k in METRIC_KEYS if k in scores.official},
        "notes": list(scores.notes),
        "skipped": dict(scores.skipped),
        "tokenizer": scores.tokenizer,
        "dataset": dataset,
        "split": split,
        "n_images": n_images,
    }
    if checkpoint is not None:
        doc["checkpoint"] = str(checkpoint)
    if results is not None:
        doc["results"] = str(results)
    doc["beam"] = beam
    if length_penalty is not None:
        doc["length_penalty"] = length_penalty
    if grounding is not None:
        doc["grounding"] = grounding
    if scores.chair is not None:
        doc["chair"] = scores.chair.to_json()
    return doc


def write_metrics(path: str | Path, scores: Scores, split: str, n_images: int, **source: Any) -> Path:
    """The metrics JSON: ``{"metrics", "official", "notes", "split", "n_images", "checkpoint"|"results", "beam"}``,
    and ``"chair"`` (:meth:`capcli.chair.ChairScores.to_json`) when CHAIR was computed."""
    return atomic.write_json(Path(path), metrics_document(scores, split, n_images, **source))


# ---- `capcli evaluate` as one call ---------------------------------------------------------------
@dataclass
class Evaluation:
    """What :func:`run` did: the dataset and split scored, the captions, their scores and the files written."""

    dataset: Dataset
    split: str
    captions: dict[int, str]
    scores: Scores
    written: list[Path] = field(default_factory=list)


def run(
    data: str | Path | Dataset,
    checkpoint: str | Path | None = None,
    *,
    results: str | Path | None = None,
    split: str = "val",
    beam: int = 3,
    length_penalty: float = 0.0,
    out: str | Path | None = None,
    html: str | Path | None = None,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "float32",
    grounding: str = "auto",
    allow_missing: bool = False,
    tokenizer: str = "auto",
    root: str | Path | None = None,
    metrics: Sequence[str] = (*DEFAULT_METRICS, "spice"),
    progress: Progress = NULL,
) -> Evaluation:
    """``capcli evaluate``: score ``checkpoint``'s captions of ``split`` (or the COCO ``results`` file) and write
    the outputs.

    ``data``: a prepared dataset folder, a dataset name under ``root``, or a :class:`Dataset`. Give a checkpoint
    (None: the default model) or ``results``, not both; ``allow_missing`` goes with ``results``.

    Outputs: with a checkpoint, ``results_STEM.json`` and ``metrics_STEM.json`` in ``out`` (default: the
    checkpoint's folder, the current folder for the default model), STEM naming the dataset, split, beam and
    any non-default length penalty, precision and grounding; with ``results``, ``metrics_DATASET_SPLIT.json`` in
    ``out`` or else ``RESULTS.metrics.json`` beside the results file. ``html``: also the report there
    (:func:`capcli.report.write_html`).
    """
    from .gallery import check_target
    from .report import write_html

    if not data:
        raise UsageError("--data is required: a prepared dataset folder or a dataset name (see `capcli info`)")
    if results is not None and checkpoint is not None:
        raise UsageError("give either a CHECKPOINT to caption the split with, or --results FILE, not both")
    if allow_missing and results is None:
        raise UsageError("--allow-missing goes with --results")
    searching = {"--beam": (beam, 3), "--length-penalty": (length_penalty, 0.0), "--batch-size": (batch_size, 32),
                 "--device": (device, "auto"), "--precision": (precision, "float32"),
                 "--grounding": (grounding, "auto")}
    if results is not None and (given := [k for k, (v, default) in searching.items() if v != default]):
        raise UsageError(f"{', '.join(given)} set how a checkpoint is captioned; --results are captions already")
    if html is not None:  # never replace the results scored, or any file that is not a capcli page
        check_target(html, {Path(results): "the --results file"} if results is not None else {})
    ds = open_dataset(data, root)
    out = Path(out) if out is not None else None
    if results is not None:
        results = Path(results)
        captions, scores = evaluate_results(results, ds, split, allow_missing=allow_missing, metrics=metrics,
                                            tokenizer=tokenizer, progress=progress)
        metrics_path = (out / f"metrics_{ds.name}_{split}.json") if out else results.with_name(
            f"{results.stem}.metrics.json")
        written = [write_metrics(metrics_path, scores, split, len(captions), results=results, dataset=ds.name)]
        title = f"capcli evaluation: {results.name}"
    else:
        checkpoint = Path(checkpoint) if checkpoint is not None else None
        captions, scores = evaluate_checkpoint(checkpoint, ds, split, beam_size=beam, batch_size=batch_size,
                                               device=device, progress=progress, metrics=metrics,
                                               tokenizer=tokenizer, length_penalty=length_penalty,
                                               precision=precision, grounding=grounding)
        folder = out or (checkpoint.parent if checkpoint is not None else Path.cwd())
        stem = f"{ds.name}_{split}_beam{beam}" + (f"_lp{length_penalty:g}" if length_penalty else "") + (
            f"_{precision}" if precision != "float32" else "") + ("_ungrounded" if grounding == "off" else "")
        written = [
            write_results(folder / f"results_{stem}.json", captions),
            write_metrics(folder / f"metrics_{stem}.json", scores, split, len(captions),
                          checkpoint=checkpoint if checkpoint is not None else "default model", beam=beam,
                          length_penalty=length_penalty, grounding=grounding, dataset=ds.name),
        ]
        title = f"capcli evaluation: {checkpoint or 'default model'}"
    if html is not None:
        written.append(write_html(html, ds, captions, scores, split, title=title, progress=progress))
    return Evaluation(ds, split, captions, scores, written)
