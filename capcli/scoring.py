"""Scoring captions with the COCO caption toolkit (pycocoevalcap), exactly as the papers' tables do.

capcli does not re-implement any metric. With Java on the PATH, :func:`score` runs the pipeline of
pycocoevalcap's ``COCOEvalCap``: the Stanford ``PTBTokenizer`` (Java) on references and hypotheses,
then ``Bleu(4)``, ``Meteor()``, ``Rouge()`` and ``Cider()`` (CIDEr-D) on the tokenised text, so its
numbers are the toolkit's numbers. Without Java, BLEU, ROUGE-L and CIDEr still come from the toolkit's
Python scorers but on text tokenised by :func:`capcli.vocab.tokenize`; they are flagged approximate,
and METEOR (a Java program) is left out. SPICE needs Stanford CoreNLP models that pycocoevalcap
downloads at first use; capcli runs it only when they are already installed. The tokenizers and the Java
processes are :mod:`capcli.toolkit`'s.

Beside the toolkit's metrics, :func:`add_chair` sets CHAIR_s / CHAIR_i (object hallucination, :mod:`capcli.chair`),
which is capcli's own code: the toolkit has no such metric.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .chair import ChairScores
from .chair import chair as chair_scores
from .config import VAL_TOKENIZERS
from .errors import EvaluateError
from .progress import NULL, Progress
from .toolkit import TOOLKIT, ptb_tokenize, python_tokenize, spice_score, spice_status

METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")
BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METRIC_KEYS = (*BLEU_KEYS, "METEOR", "ROUGE-L", "CIDEr", "SPICE")
_NAMES = {"bleu": "BLEU", "meteor": "METEOR", "rouge": "ROUGE-L", "cider": "CIDEr", "spice": "SPICE"}
TOKENIZERS = VAL_TOKENIZERS


@dataclass
class Scores:
    """Corpus scores (``values``), per-image scores, which ones are official toolkit numbers, and notes.

    ``values`` keys: ``BLEU-1``..``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr`` (CIDEr-D), ``SPICE``: only
    the metrics that were computed. ``skipped`` maps a metric that was asked for but not computed to
    the reason; each such reason is also one line of ``notes``.
    """

    values: dict[str, float] = field(default_factory=dict)
    per_image: dict[int, dict[str, float]] = field(default_factory=dict)
    official: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    tokenizer: str = ""  # "ptb" (the toolkit's Java PTBTokenizer) or "python" (capcli.vocab.tokenize)
    chair: ChairScores | None = None  # object hallucination (capcli.chair), set by evaluate_results/_checkpoint


# ---- the scorers ---------------------------------------------------------------------------------
@dataclass
class _Run:
    """One :func:`score` call: the tokenised text in image-id order, and the scores recorded so far."""

    ids: list[int]
    gts: dict[int, list[str]]
    res: dict[int, list[str]]
    use_ptb: bool  # tokenised by the toolkit's Java PTBTokenizer, so its numbers are official
    java: bool  # `java` is on the PATH
    out: Scores
    meteor_timeout: float = 180.0

    def record(self, key: str, total: float, each: Sequence[float], official: bool) -> None:
        self.out.values[key] = float(total)
        self.out.official[key] = official
        for i, v in zip(self.ids, each, strict=True):
            self.out.per_image[i][key] = float(v)

    def skip(self, metric: str, reason: str) -> None:
        self.out.skipped[_NAMES[metric]] = reason
        self.out.notes.append(reason)


def _bleu(run: _Run) -> None:
    from pycocoevalcap.bleu.bleu import Bleu

    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its pooled counts
        total, each = Bleu(4).compute_score(run.gts, run.res)
    for n, key in enumerate(BLEU_KEYS):
        run.record(key, total[n], each[n], run.use_ptb)


def _rouge(run: _Run) -> None:
    from pycocoevalcap.rouge.rouge import Rouge

    total, each = Rouge().compute_score(run.gts, run.res)
    run.record("ROUGE-L", total, each, run.use_ptb)


def _cider(run: _Run) -> None:
    from pycocoevalcap.cider.cider import Cider

    try:
        total, each = Cider().compute_score(run.gts, run.res)
    except ValueError as e:  # no n-gram at all in the references
        raise EvaluateError(f"CIDEr cannot be computed: the references hold no words ({e})") from e
    run.record("CIDEr", total, each, run.use_ptb)


def _meteor(run: _Run) -> None:
    if not run.use_ptb:
        run.skip("meteor", "METEOR skipped: it runs only in the toolkit's Java pipeline "
                 f"({'tokenizer=python was asked for' if run.java else 'no `java` was found on the PATH'})")
        return
    try:
        total, each = TOOLKIT.meteor(run.gts, run.res, run.meteor_timeout)
    except EvaluateError as e:
        run.skip("meteor", f"METEOR skipped: {e}")
        return
    run.record("METEOR", total, each, True)


def _spice(run: _Run) -> None:
    ok, why = spice_status()
    if not ok:
        run.skip("spice", why)
        return
    try:
        total, each = spice_score(run.gts, run.res)
    except EvaluateError as e:
        run.skip("spice", f"SPICE skipped: {e}")
        return
    run.record("SPICE", total, each, run.use_ptb)


# each records its numbers on the run (or why it was skipped); score() runs them in METRICS order
SCORERS: dict[str, Callable[[_Run], None]] = {
    "bleu": _bleu, "meteor": _meteor, "rouge": _rouge, "cider": _cider, "spice": _spice,
}


# ---- the scoring API -----------------------------------------------------------------------------
def check_metrics(metrics: Sequence[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    wanted = [m.strip().lower() for m in metrics]
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise EvaluateError(f"unknown metric {unknown[0]!r}; use some of {', '.join(METRICS)}")
    if not wanted:
        raise EvaluateError("no metric asked for")
    return [m for m in METRICS if m in wanted]


def check_tokenizer(tokenizer: str) -> None:
    if tokenizer not in TOKENIZERS:
        raise EvaluateError(f"unknown tokenizer {tokenizer!r}; use one of {', '.join(TOKENIZERS)}")


def _check_captions(hypotheses: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> list[int]:
    """The hypotheses' image ids, sorted, once each has a string caption and references."""
    if not hypotheses:
        raise EvaluateError("no captions to score")
    ids = sorted(hypotheses)
    for i in ids:
        if not isinstance(hypotheses[i], str):
            raise EvaluateError(f"image {i}: the caption must be a string, not {type(hypotheses[i]).__name__}")
        if not references.get(i):
            raise EvaluateError(f"image {i} has no reference captions to score against")
    return ids


def _tokenised(hypotheses: Mapping[int, str], references: Mapping[int, Sequence[str]], ids: list[int],
               wanted: list[str], tokenizer: str) -> _Run:
    """References and hypotheses tokenised as the toolkit does (Java PTBTokenizer) or, without Java or with
    ``tokenizer="python"``, by capcli's tokenizer, with a note saying which numbers are then approximate."""
    out = Scores()
    java = shutil.which("java") is not None
    if tokenizer == "java" and not java:
        raise EvaluateError("tokenizer 'java' needs Java, and no `java` was found on the PATH")
    use_ptb = java and tokenizer != "python"
    refs_in = {i: [str(r) for r in references[i]] for i in ids}
    hyps_in = {i: [hypotheses[i]] for i in ids}
    if use_ptb:
        try:
            # Like COCOEvalCap: references and hypotheses are tokenised in two separate runs.
            gts, err_r = TOOLKIT.tokenize_references(refs_in)
            res, err_h = ptb_tokenize(hyps_in)
            out.tokenizer = "ptb"
            n_bad = (err_r + err_h).count("Untokenizable")
            if n_bad:
                out.notes.append(f"the PTB tokenizer dropped {n_bad} character(s) it could not tokenise")
        except EvaluateError as e:
            if tokenizer == "java":
                raise
            use_ptb = False
            out.notes.append(f"{e}; falling back to capcli's Python tokenizer")
    if not use_ptb:
        gts, res = python_tokenize(refs_in), python_tokenize(hyps_in)
        out.tokenizer = "python"
        why = "tokenizer='python' was asked for" if java else "no `java` was found on the PATH"
        approx = [_NAMES[m] for m in wanted if m in ("bleu", "rouge", "cider")]
        if approx:
            out.notes.append(
                f"{', '.join(approx)} are approximate: {why}, so captions were tokenised by capcli's Python "
                "tokenizer instead of the COCO toolkit's Java PTBTokenizer; they are usually close to the "
                "official numbers but not guaranteed identical (install Java for numbers comparable with papers)"
            )
    out.per_image = {i: {} for i in ids}
    # the scorers iterate in this order; per-image lists follow it
    return _Run(ids, {i: gts[i] for i in ids}, {i: res[i] for i in ids}, use_ptb, java, out)


def score(
    hypotheses: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    tokenizer: str = "auto",
    progress: Progress = NULL,
    meteor_timeout: float | None = None,
) -> Scores:
    """Score one caption per image against its references with the COCO caption toolkit.

    ``hypotheses`` {image id: caption}; ``references`` {image id: [captions]} must cover every
    hypothesis id (extra reference ids are ignored). ``tokenizer``: ``"auto"`` (Java's PTBTokenizer
    when ``java`` is on the PATH, else capcli's), ``"java"`` (fail without Java) or ``"python"``
    (approximate). Corpus-level statistics (BLEU's pooled counts, CIDEr's document frequencies) are
    over the hypotheses given, as in ``COCOEvalCap``. The Java side is :data:`TOOLKIT`'s, kept warm.
    """
    wanted = check_metrics(metrics)
    check_tokenizer(tokenizer)
    ids = _check_captions(hypotheses, references)
    run = _tokenised(hypotheses, references, ids, wanted, tokenizer)
    run.meteor_timeout = meteor_timeout if meteor_timeout is not None else 180.0 + 0.05 * len(ids)
    # say only what will run: SPICE without its models or Java, METEOR without Java, are skipped
    runs = [m for m in wanted if (m != "spice" or spice_status()[0]) and (m != "meteor" or run.use_ptb)]
    progress.start(f"scoring {', '.join(_NAMES[m] for m in runs)}", total=len(wanted), unit="metric")
    try:
        for m in wanted:
            SCORERS[m](run)
            progress.advance(1)
    finally:
        progress.done()
    return run.out


def add_chair(scores: Scores, captions: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> Scores:
    """Set ``scores.chair``: CHAIR_s / CHAIR_i of the captions (:mod:`capcli.chair`; needs no Java)."""
    scores.chair = chair_scores(captions, references)
    return scores
