"""The COCO caption toolkit's text side and Java processes, as :func:`capcli.scoring.score` runs them.

With Java on the PATH, captions go through pycocoevalcap's Stanford ``PTBTokenizer`` (:func:`ptb_tokenize`); without
it, through :func:`capcli.vocab.tokenize` (:func:`python_tokenize`). METEOR is a Java program that :class:`Toolkit`
keeps warm between calls, and SPICE (:func:`spice_score`) runs only when its Stanford CoreNLP models are already
installed.

Two things the toolkit gets wrong on unusual input are guarded here without changing any score on
ordinary captions: the Java tokenizer splits lines at ``\\r``, form feeds and Unicode line separators
(which silently shifts every later caption onto the wrong image), and METEOR can hang when its
process stops answering. Captions are cleaned of line breaks, the tokenizer's output is checked with a
sentinel line, and METEOR runs under a watchdog.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import re
import shutil
import subprocess
import threading
import types
from pathlib import Path
from typing import Any

from .errors import EvaluateError

# Characters the Java PTBTokenizer (with -preserveLines) treats as line ends, plus the ones Python's
# str.splitlines does: each would split one caption into two lines and misalign all that follow.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_SURROGATES = re.compile("[\ud800-\udfff]")  # lone surrogates cannot even be written as UTF-8
_SENTINEL_TEXT = "capclisentinelzq"


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


def ptb_tokenize(captions: dict[Any, list[str]]) -> tuple[dict[Any, list[str]], str]:
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


def python_tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
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
    """The COCO toolkit's Java side, kept between calls of :func:`capcli.scoring.score`: the last references tokenised
    (validation scores the same references every epoch: one Java start less per epoch) and one METEOR JVM
    that has loaded its paraphrase tables. :data:`TOOLKIT` is the one :func:`capcli.scoring.score` uses.
    """

    def __init__(self) -> None:
        self._refs_lock = threading.Lock()
        self._refs: tuple[tuple, dict[Any, list[str]], str] | None = None  # (key, tokenised, stderr)
        self._meteor_lock = threading.Lock()
        self._meteor: Any = None  # a pycocoevalcap Meteor

    def tokenize_references(self, refs: dict[int, list[str]]) -> tuple[dict[Any, list[str]], str]:
        """:func:`ptb_tokenize` for references, remembering the last set."""
        key = tuple((i, tuple(v)) for i, v in refs.items())
        with self._refs_lock:
            if self._refs is not None and self._refs[0] == key:
                _, out, err = self._refs
                return {k: list(v) for k, v in out.items()}, err
        out, err = ptb_tokenize(refs)
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


def spice_score(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.spice.spice import Spice

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            score, scores = Spice().compute_score(gts, res)
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as e:
        raise EvaluateError(f"SPICE failed ({e!s:.200})") from e
    return float(score), [float(s["All"]["f"]) for s in scores]
