"""Scoring captions with the COCO caption toolkit (pycocoevalcap), exactly as the papers' tables do.

capcli does not re-implement any metric. With Java on the PATH, :func:`score` runs the pipeline of
pycocoevalcap's ``COCOEvalCap``: the Stanford ``PTBTokenizer`` (Java) on references and hypotheses,
then ``Bleu(4)``, ``Meteor()``, ``Rouge()`` and ``Cider()`` (CIDEr-D) on the tokenised text, so its
numbers are the toolkit's numbers. Without Java, BLEU, ROUGE-L and CIDEr still come from the toolkit's
Python scorers but on text tokenised by :func:`capcli.vocab.tokenize`; they are flagged approximate,
and METEOR (a Java program) is left out. SPICE needs Stanford CoreNLP models that pycocoevalcap
downloads at first use; capcli runs it only when they are already installed.

Two things the toolkit gets wrong on unusual input are guarded here without changing any score on
ordinary captions: the Java tokenizer splits lines at ``\\r``, form feeds and Unicode line separators
(which silently shifts every later caption onto the wrong image), and METEOR can hang when its
process stops answering. Captions are cleaned of line breaks, the tokenizer's output is checked with a
sentinel line, and METEOR runs under a watchdog.

Beside the toolkit's metrics, :func:`evaluate_results` and :func:`evaluate_checkpoint` add CHAIR_s / CHAIR_i
(object hallucination, :mod:`capcli.chair`), which is capcli's own code: the toolkit has no such metric.
:func:`run` is ``capcli evaluate`` as one call (which options go together, where the outputs go); the HTML
report is :mod:`capcli.report`.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import re
import shutil
import subprocess
import threading
import types
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import atomic
from .chair import ChairScores
from .chair import chair as chair_scores
from .config import VAL_TOKENIZERS
from .errors import EvaluateError, UsageError
from .layout import Dataset, ImageRecord, open_dataset
from .progress import NULL, Progress

METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")
BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METRIC_KEYS = (*BLEU_KEYS, "METEOR", "ROUGE-L", "CIDEr", "SPICE")
_NAMES = {"bleu": "BLEU", "meteor": "METEOR", "rouge": "ROUGE-L", "cider": "CIDEr", "spice": "SPICE"}
TOKENIZERS = VAL_TOKENIZERS

# Characters the Java PTBTokenizer (with -preserveLines) treats as line ends, plus the ones Python's
# str.splitlines does: each would split one caption into two lines and misalign all that follow.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_SURROGATES = re.compile("[\ud800-\udfff]")  # lone surrogates cannot even be written as UTF-8
_SENTINEL_TEXT = "capclisentinelzq"


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


# ---- text preparation ---------------------------------------------------------------------------
def clean_caption(text: str) -> str:
    """A caption as one line: line breaks become spaces, lone surrogates are dropped.

    Ordinary captions come back unchanged, so the scores on them are exactly the toolkit's.
    """
    return _SURROGATES.sub("", _LINE_BREAKS.sub(" ", text))


class _QuietSubprocess(types.SimpleNamespace):
    """Stands in for the ``subprocess`` module inside pycocoevalcap's tokenizer so that the Java
    tokenizer's stderr chatter ("PTBTokenizer tokenized N tokens ...") is captured, not printed."""


_ptb_lock = threading.Lock()  # guards the swap of pycocoevalcap's ptbtokenizer.subprocess below


def _ptb_tokenize(captions: dict[Any, list[str]]) -> tuple[dict[Any, list[str]], str]:
    """pycocoevalcap's PTBTokenizer on ``{key: [caption, ...]}``; returns tokenised captions and stderr.

    A sentinel line is appended and checked, so a misaligned output raises instead of scoring
    captions against the wrong images.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    sentinel = ("capcli", "sentinel")
    data: dict[Any, list[dict[str, str]]] = {k: [{"caption": clean_caption(c)} for c in v] for k, v in captions.items()}
    data[sentinel] = [{"caption": _SENTINEL_TEXT}]
    stderr: list[bytes] = []

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
        kwargs["stderr"] = subprocess.PIPE
        p = subprocess.Popen(*args, **kwargs)
        communicate = p.communicate

        def capture(*a: Any, **kw: Any) -> tuple[Any, Any]:
            out, err = communicate(*a, **kw)
            stderr.append(err or b"")
            return out, err

        p.communicate = capture  # type: ignore[method-assign]
        return p

    quiet = _QuietSubprocess(Popen=popen, PIPE=subprocess.PIPE)
    with _ptb_lock:
        saved = ptbtokenizer.subprocess
        ptbtokenizer.subprocess = quiet  # type: ignore[assignment]
        try:
            out = ptbtokenizer.PTBTokenizer().tokenize(data)
        except OSError as e:
            raise EvaluateError(f"the Java PTBTokenizer could not run ({e})") from e
        finally:
            ptbtokenizer.subprocess = saved
    err = b"".join(stderr).decode("utf-8", "replace")
    if out.get(sentinel) != [_SENTINEL_TEXT] or any(len(out.get(k, ())) != len(v) for k, v in captions.items()):
        first = err.strip().splitlines()[-1] if err.strip() else "no output"
        raise EvaluateError(f"the Java PTBTokenizer returned misaligned output ({first[:200]})")
    out.pop(sentinel)
    return out, err


def _python_tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    from .vocab import tokenize

    return {k: [" ".join(tokenize(clean_caption(c))) for c in v] for k, v in captions.items()}


# ---- the toolkit's Java side, kept warm -----------------------------------------------------------
def _drop_meteor(m: Any) -> None:
    """Stop a Meteor JVM so that nothing (its ``__del__`` included) can block on it afterwards."""
    m.lock = threading.Lock()  # a failed compute_score may still hold the old one; __del__ takes it
    with contextlib.suppress(Exception):
        m.meteor_p.kill()
    with contextlib.suppress(Exception):
        m.meteor_p.stdin.close()
    with contextlib.suppress(Exception):
        m.meteor_p.wait(timeout=5)


class Toolkit:
    """The COCO toolkit's Java side, kept between calls of :func:`score`: the last references tokenised
    (validation scores the same references every epoch: one Java start less per epoch) and one METEOR JVM
    that has loaded its paraphrase tables. :data:`TOOLKIT` is the one :func:`score` uses unless given another.
    """

    def __init__(self) -> None:
        self._refs_lock = threading.Lock()
        self._refs: tuple[tuple, dict[Any, list[str]], str] | None = None  # (key, tokenised, stderr)
        self._meteor_lock = threading.Lock()
        self._meteor: Any = None  # a pycocoevalcap Meteor

    def tokenize_references(self, refs: dict[int, list[str]]) -> tuple[dict[Any, list[str]], str]:
        """:func:`_ptb_tokenize` for references, remembering the last set."""
        key = tuple((i, tuple(v)) for i, v in refs.items())
        with self._refs_lock:
            if self._refs is not None and self._refs[0] == key:
                _, out, err = self._refs
                return {k: list(v) for k, v in out.items()}, err
        out, err = _ptb_tokenize(refs)
        with self._refs_lock:
            self._refs = (key, {k: list(v) for k, v in out.items()}, err)
        return out, err

    def meteor(self, gts: dict[int, list[str]], res: dict[int, list[str]], timeout: float) -> tuple[float, list[float]]:
        """pycocoevalcap's ``Meteor().compute_score`` under a watchdog; EvaluateError if it fails or stops answering."""
        from pycocoevalcap.meteor.meteor import Meteor

        # "|||" separates fields in METEOR's protocol; the PTB tokenizer already splits it into "| | |".
        gts = {k: [r.replace("|||", "| | |") for r in v] for k, v in gts.items()}
        res = {k: [h.replace("|||", "| | |") for h in v] for k, v in res.items()}
        with self._meteor_lock:
            if self._meteor is None or self._meteor.meteor_p.poll() is not None:
                try:
                    self._meteor = Meteor()
                except OSError as e:
                    raise EvaluateError(f"METEOR could not start ({e})") from e
            m = self._meteor
            box: dict[str, Any] = {}

            def work() -> None:
                try:
                    box["value"] = m.compute_score(gts, res)
                except Exception as e:  # noqa: BLE001 (reported below as one line)
                    box["error"] = e

            t = threading.Thread(target=work, name="capcli-meteor", daemon=True)
            t.start()
            t.join(timeout)
            if t.is_alive() or "error" in box:
                _drop_meteor(m)
                self._meteor = None
                t.join(5)
                why = f"no answer within {timeout:.0f} s" if "error" not in box else f"{box['error']!s:.200}"
                raise EvaluateError(f"METEOR failed ({why or 'its process stopped'})")
            score, scores = box["value"]
            return float(score), [float(s) for s in scores]

    def close(self) -> None:
        """Stop the warm METEOR process, if any."""
        with self._meteor_lock:
            if self._meteor is not None:
                _drop_meteor(self._meteor)
                self._meteor = None


TOOLKIT = Toolkit()


def close_meteor() -> None:
    """Stop :data:`TOOLKIT`'s warm METEOR process, if any (done automatically at exit)."""
    TOOLKIT.close()


atexit.register(close_meteor)


# ---- SPICE ---------------------------------------------------------------------------------------
def spice_status() -> tuple[bool, str]:
    """Whether SPICE can run offline, and if not, why."""
    try:
        from pycocoevalcap.spice import get_stanford_models as gsm
    except ImportError:  # pragma: no cover - pycocoevalcap is a dependency
        return False, "SPICE skipped: pycocoevalcap's SPICE module is not installed"
    lib = Path(gsm.SPICEDIR) / gsm.SPICELIB
    needed = [lib / f"{gsm.JAR}.jar", lib / f"{gsm.JAR}-models.jar"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        return False, (
            f"SPICE skipped: it needs the Stanford CoreNLP models ({', '.join(missing)}), which pycocoevalcap "
            f"downloads (about 1 GB) at first use; capcli does not download them. Put them in {lib} to enable SPICE"
        )
    if shutil.which("java") is None:
        return False, "SPICE skipped: it needs Java, and no `java` was found on the PATH"
    return True, ""


def _spice_score(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.spice.spice import Spice

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            score, scores = Spice().compute_score(gts, res)
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as e:
        raise EvaluateError(f"SPICE failed ({e!s:.200})") from e
    return float(score), [float(s["All"]["f"]) for s in scores]


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
        total, each = _spice_score(run.gts, run.res)
    except EvaluateError as e:
        run.skip("spice", f"SPICE skipped: {e}")
        return
    run.record("SPICE", total, each, run.use_ptb)


# each records its numbers on the run (or why it was skipped); score() runs them in METRICS order
SCORERS: dict[str, Callable[[_Run], None]] = {
    "bleu": _bleu, "meteor": _meteor, "rouge": _rouge, "cider": _cider, "spice": _spice,
}


# ---- the scoring API -----------------------------------------------------------------------------
def _check_metrics(metrics: Sequence[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    wanted = [m.strip().lower() for m in metrics]
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise EvaluateError(f"unknown metric {unknown[0]!r}; use some of {', '.join(METRICS)}")
    if not wanted:
        raise EvaluateError("no metric asked for")
    return [m for m in METRICS if m in wanted]


def _check_tokenizer(tokenizer: str) -> None:
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
            res, err_h = _ptb_tokenize(hyps_in)
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
        gts, res = _python_tokenize(refs_in), _python_tokenize(hyps_in)
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
    wanted = _check_metrics(metrics)
    _check_tokenizer(tokenizer)
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
    from .caption import Captioner

    ds = open_dataset(dataset)
    recs = split_records(ds, split)
    _check_metrics(metrics)  # fail before the slow part
    _check_tokenizer(tokenizer)
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
