"""Captioning photos with a trained model: the :class:`Captioner` API and ``capcli caption``'s file handling.

Pipeline for many files: photos are decoded and resized (``spec.read``, a uint8 tensor per image) beside the
encoder, by the same batch source as ``capcli features`` (threads on the CPU, DataLoader worker processes for
CUDA); the encoder, folded for inference, runs over batches of ``batch_size`` and one batched beam search then
decodes ``SEARCH_BATCH`` images at once (bigger matrix products: ~1.3-2x faster per image on the CPU), through
the model's search twin with int8 or bfloat16 products where the CPU computes them natively
(``precision="auto"``). Nothing but the small result records outlives a search group, so memory stays flat
however many photos.

Outputs (chosen by the extension of ``-o``):

- ``.jsonl``: one JSON object per line, written and flushed as each image is done;
- ``.csv``: columns path, caption, logprob, error, alternatives (a JSON list), labels, confidence,
  low_confidence (``true`` or empty: ``--min-confidence``'s mark), path_bytes, streamed the same way (a CSV of an
  earlier version, without low_confidence, is still read and resumed);
- ``.json``: one array, rewritten atomically every 30 s and at the end, also after Ctrl-C or a failure.

A record names its file by ``path``, plus ``path_bytes`` for a name that is not UTF-8 (the rule is in
:mod:`capcli.names`). A failed write (full disk, permission) raises :class:`OutputError` saying how many records
are safe; the file still ends at a whole record. The output is locked for the run (:mod:`capcli.lock`).

``--resume`` reads the existing output back, keeps its records and captions only the images missing there.
The file is first rewritten as it was, less a last line cut by a crash (that image is captioned again) and
lines too damaged to read: a UTF-8 BOM (Excel saves CSV with one) stays, and so do columns a person added to a
.csv (``reviewed``, say), in the file's column order, holding their text for the kept rows and empty for the
new ones; two columns of one name are refused, as both cannot be kept. Photos that failed are tried again
(their error records are dropped first). An output that is not a capcli caption
list (a .csv without ``path`` and ``caption`` columns, a .jsonl none of whose lines is a record with a
``path``, a .json that is no array of them) is refused with one error line and left untouched. Without
``--resume`` an existing output is replaced.
``--shard I/N`` (I = 0..N-1) keeps the files whose relative path hashes (SHA-1) to I modulo N: stable however
the files are listed, and the N shards are disjoint and cover everything.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from . import atomic, lock
from .checkpoint import load_checkpoint
from .confidence import ConfidenceModel, for_checkpoint
from .encoders import Encoder, create_encoder, get_spec
from .errors import CapcliError, CheckpointError, ImageError, OutputError, UsageError, os_reason
from .familiar import Familiarity
from .grounding import MODES as GROUNDING_MODES
from .grounding import Grounder, GroundingPolicy, Plan
from .images import load_image, to_rgb
from .metadata import SIDECAR_NAMINGS, sidecar_path
from .models import build
from .models.base import CaptionModel, Searchable
from .models.decoding import Decoded, beam_search, greedy
from .models.grammar import Grammar
from .names import display, name_bytes, path_fields, record_key
from .photos import ImageItems, batch_source
from .progress import NULL, Progress
from .runtime import resolve_device, resolve_precision
from .vocab import Vocabulary
from .walk import InputFile, LeftOut, walk_folder

_ASSETS = Path(__file__).resolve().parent / "assets"
# Models shipped in the package (trained on Flickr8k by recipes/flickr8k-default.sh), by name for --model.
SHIPPED_MODELS = {"attention": _ASSETS / "flickr8k-attention.pt", "basic": _ASSETS / "flickr8k-basic.pt"}
DEFAULT_MODEL = SHIPPED_MODELS["attention"]
FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}
CSV_FIELDS = ("path", "caption", "logprob", "error", "alternatives", "labels", "confidence", "low_confidence",
              "path_bytes")  # path_bytes stays last (README)
CSV_HEADER = ",".join(CSV_FIELDS) + "\n"
BOM = "\ufeff"  # at the start of a UTF-8 file (Excel saves CSV with one)
JSON_SAVE_EVERY_S = 30.0
SEARCH_BATCH = 128  # images per beam search in caption_paths (several encoder batches)
# The models are recurrent (no positional limit) but trained on captions cut to 20 words; past ~100 words a caption
# only repeats itself, and the search's buffers grow with the length.
MAX_LEN_LIMIT = 100
# Beams are ranked by logprob / len^ALPHA: above ~2 only the longest captions win; 5 keeps 100^ALPHA far inside
# float32 (a huge ALPHA overflowed it).
LENGTH_PENALTY_LIMIT = 5.0


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(resolve_device(device))


def _reason(path: Path, message: str) -> str:
    """A decoding failure without the file's path or name in front (the record already names the file)."""
    for prefix in (f"{path}: ", f"{path.name}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


# ------------------------------------------------------------------------------------------------ the model
class Captioner:
    """A trained captioning model with its encoder and vocabulary, ready to caption photos.

    >>> cap = Captioner.load("best.pt")                      # or Captioner.load() for the shipped default
    >>> for rec in cap.caption_paths([Path("a.jpg")]):
    ...     print(rec["path"], rec.get("caption"), rec.get("error"))
    """

    def __init__(self, model: CaptionModel, encoder: Encoder, vocab: Vocabulary, device: torch.device,
                 source: Path | None = None, precision: str = "auto", grounding: str = "auto",
                 policy: GroundingPolicy | None = None, familiarity: Familiarity | None = None) -> None:
        try:
            precision = resolve_precision(precision, device)  # of the search's matrix products (encoder: float32)
        except ValueError as e:
            raise UsageError(f"--{e}") from None
        if grounding not in GROUNDING_MODES:
            raise UsageError(f"--grounding {grounding!r}: use one of {', '.join(GROUNDING_MODES)}")
        # Grounding (grounding.py) needs the encoder's ImageNet head.
        self.grounder: Grounder | None = None
        if grounding == "auto" and encoder.has_head:
            self.grounder = Grounder.for_model(vocab, policy or GroundingPolicy())
        # The model's training photos (checkpoint "familiarity"): grounding is stricter about photos unlike them.
        self.familiarity = familiarity
        self.model = model.to(device).eval()
        self.encoder = encoder.to(device).eval()
        self.vocab = vocab
        self.grammar = Grammar.of(vocab.words, vocab.end_id)  # the search's sentence rules (capcli/fluency.py)
        self.device = device
        self.spec = encoder.spec
        self.source = source
        # Below float32 the search runs the model's twin, its products in bfloat16 or int8 (models/packed.py).
        twin = self.model.for_search(precision) if precision != "float32" else None
        self._search_model: Searchable = twin if twin is not None else self.model
        self.precision = precision if twin is not None else "float32"
        # P(the caption names no object not in the photo), for a checkpoint with a fitted calibration (load()).
        self.confidence: ConfidenceModel | None = None

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, device: str | torch.device = "auto",
             precision: str = "auto", grounding: str = "auto") -> Captioner:
        """Load a capcli checkpoint (default: the model shipped in the package).

        ``precision`` of the caption search's matrix products: auto (int8 or bfloat16 on CPUs that compute them
        natively, see ``runtime.resolve_precision``) | float32 | bfloat16 | int8.
        ``grounding``: auto (ground captions in the encoder's ImageNet evidence where the encoder has its ImageNet
        head, see ``capcli/grounding.py``) | off. A fine-tuned encoder's head no longer reads its features: off.
        Records get a ``confidence`` when the checkpoint has a fitted calibration (``capcli/confidence.py``: the
        shipped model) and grounding is on.
        """
        dev = _device(device)
        if checkpoint is None:
            if not DEFAULT_MODEL.is_file():
                raise CheckpointError("no default model is installed; pass --model CKPT")
            checkpoint = DEFAULT_MODEL
        elif str(checkpoint) in SHIPPED_MODELS and not Path(checkpoint).exists():
            checkpoint = SHIPPED_MODELS[str(checkpoint)]
        elif not Path(checkpoint).exists():
            raise CheckpointError(f"checkpoint not found: {display(str(checkpoint))} (give a checkpoint file, or a "
                                  f"shipped model: {', '.join(SHIPPED_MODELS)})")
        path = Path(checkpoint)
        ckpt = load_checkpoint(path)
        try:
            vocab = Vocabulary.from_dict(ckpt["vocab"])
        except CapcliError as e:
            raise CheckpointError(f"{path}: {e}") from None
        model = build(ckpt["config"])
        try:
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: the model weights do not fit its config ({str(e).splitlines()[0]})") from e
        spec = get_spec(ckpt["encoder"]["name"])
        dim = ckpt["config"].get("feature_dim")
        if dim is not None and dim != spec.feature_dim:
            raise CheckpointError(
                f"{path}: the model expects {dim}-d features but {spec.name} gives {spec.feature_dim}")
        encoder = create_encoder(spec.name)
        if ckpt.get("encoder_state"):
            try:
                encoder.load_state_dict(ckpt["encoder_state"])
            except (RuntimeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: its fine-tuned encoder weights do not fit {spec.name}") from e
            grounding = "off"
        cap = cls(model, encoder.for_inference(), vocab, dev, source=path, precision=precision, grounding=grounding,
                  familiarity=Familiarity.of_checkpoint(ckpt, path, spec.feature_dim))
        if cap.grounder is not None:  # fitted on grounded captions (their labels are features)
            cap.confidence = for_checkpoint(path)
        return cap

    @property
    def has_attention(self) -> bool:
        """Whether captions come with attention weights over the image grid (Show, Attend and Tell)."""
        return self.model.feature_kind == "grid"

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[Plan] | None]:
        """uint8 images (B, 3, S, S) -> what the model consumes, and the grounding plan of each image."""
        with torch.inference_mode():
            grid = self.encoder(images.to(self.device, non_blocking=True))  # (B, N, D)
            plans = None
            if self.grounder is not None:
                outside = self.familiarity.outside(grid) if self.familiarity is not None else None  # (B,)
                plans = self.grounder.plans(self.encoder.imagenet_logits(grid), outside)
            return self.model.features_of_kind(grid, self.model.feature_kind), plans

    def _decode(self, feats: torch.Tensor, plans: list[Plan] | None, beam_size: int, max_len: int, top_k: int,
                length_penalty: float, return_alphas: bool) -> list[dict[str, Any]]:
        """Features of a batch (and their grounding plans) -> one record per image."""
        v, model = self.vocab, self._search_model
        with torch.inference_mode():
            banned = (v.pad_id, v.start_id, v.unk_id)  # alt-text never says "<unk>"
            if plans is not None:
                results = self._grounded_search(feats, plans, beam_size, max_len, length_penalty, top_k, banned,
                                                return_alphas)
            elif beam_size == 1:
                results = [[d] for d in greedy(model, feats, v.start_id, v.end_id, max_len, banned=banned,
                                                       grammar=self.grammar)]
            else:
                results = beam_search(model, feats, v.start_id, v.end_id, beam_size=beam_size, max_len=max_len,
                                      length_penalty=length_penalty, top_k=top_k, banned=banned,
                                      with_alphas=return_alphas, grammar=self.grammar)
        plans = plans if plans is not None else [None] * len(results)
        return [self._record(hyps, plan, top_k, return_alphas) for hyps, plan in zip(results, plans, strict=True)]

    def _grounded_search(self, feats: torch.Tensor, plans: list[Plan], beam_size: int, max_len: int,
                         length_penalty: float, top_k: int, banned: tuple[int, ...],
                         return_alphas: bool) -> list[list[Decoded]]:
        """Today's search; then, for the photos whose caption breaks its plan (a held-back word said, a word to
        say missing), the search again with the plan's bans and constraints (one beam set per subset of the words
        to say met, each ``repair_beams`` wider), on those photos alone. Captions that keep their plan stay exactly
        as they were."""
        g, v, model = self.grounder, self.vocab, self._search_model
        assert g is not None

        def search(x: torch.Tensor, ps: list[Plan] | None) -> list[list[Decoded]]:
            beams = beam_size if ps is None else beam_size + g.policy.repair_beams
            return beam_search(model, x, v.start_id, v.end_id, beam_size=beams, max_len=max_len,
                               length_penalty=length_penalty, top_k=top_k, banned=banned, with_alphas=return_alphas,
                               constraints=g.constraints(ps, feats.device) if ps is not None else None,
                               grammar=self.grammar)

        results = search(feats, None)
        redo = [i for i, (hyps, plan) in enumerate(zip(results, plans, strict=True))
                if not g.keeps(plan, hyps[0].tokens)]
        if redo:
            again = search(feats[torch.tensor(redo, device=feats.device)], [plans[i] for i in redo])
            for i, hyps in zip(redo, again, strict=True):
                results[i] = hyps
        return results

    def _text(self, tokens: list[int], plan: Plan | None) -> str:
        if self.grounder is None:
            return self.vocab.to_text(tokens)
        return " ".join(self.grounder.words_of(plan, tokens))

    def _record(self, hyps: list[Decoded], plan: Plan | None, top_k: int, return_alphas: bool) -> dict[str, Any]:
        best = hyps[0]
        rec: dict[str, Any] = {"caption": self._text(best.tokens, plan), "logprob": round(best.logprob, 4)}
        if top_k > 1:
            rec["alternatives"] = [{"caption": self._text(h.tokens, plan), "logprob": round(h.logprob, 4)}
                                   for h in hyps]
        if plan is not None:
            rec["labels"] = [{"word": w, "p": p} for w, p in plan.labels]
            if self.confidence is not None:
                rec["confidence"] = round(self.confidence(rec["caption"], rec["logprob"], rec["labels"]), 4)
        if return_alphas and best.alphas is not None:
            rec["words"] = rec["caption"].split()  # one per row of alphas (a word per token)
            rec["alphas"] = best.alphas.float().numpy()  # (L, N)
        return rec

    def _check(self, beam_size: int, top_k: int, max_len: int, length_penalty: float) -> None:
        """The search options, checked before anything is read or written (the one place they are)."""
        if beam_size < 1:
            raise UsageError("--beam must be at least 1")
        if top_k < 1 or top_k > beam_size:
            raise UsageError(f"--top-k {top_k} needs --beam >= {top_k} (it is {beam_size})")
        if not 1 <= max_len <= MAX_LEN_LIMIT:
            raise UsageError(f"--max-len {max_len}: give a number of words from 1 to {MAX_LEN_LIMIT}")
        if not 0.0 <= length_penalty <= LENGTH_PENALTY_LIMIT:  # also NaN
            raise UsageError(f"--length-penalty {length_penalty:g}: give a number from 0 to {LENGTH_PENALTY_LIMIT:g}")
        if 2 * beam_size > len(self.vocab):
            raise UsageError(f"--beam {beam_size} is too large for a vocabulary of {len(self.vocab)} words")

    def caption_images(self, images: Sequence[Image.Image], beam_size: int = 3, max_len: int = 20, top_k: int = 1,
                       length_penalty: float = 0.0, batch_size: int = 32,
                       return_alphas: bool = False) -> list[dict[str, Any]]:
        """Caption PIL images: one record ``{"caption", "logprob", ["alternatives"]}`` per image, in order."""
        self._check(beam_size, top_k, max_len, length_penalty)
        out: list[dict[str, Any]] = []
        for s in range(0, len(images), batch_size):
            chunk = [self.spec.preprocess(to_rgb(ImageOps.exif_transpose(im))) for im in images[s: s + batch_size]]
            out += self._decode(*self._encode(torch.stack(chunk)), beam_size, max_len, top_k, length_penalty,
                                return_alphas)
        return out

    def caption_paths(self, paths: Sequence[str | Path], beam_size: int = 3, batch_size: int = 32, workers: int = 2,
                      max_len: int = 20, top_k: int = 1, progress: Progress = NULL, *, length_penalty: float = 0.0,
                      return_alphas: bool = False, search_batch: int = SEARCH_BATCH) -> Iterator[dict[str, Any]]:
        """Caption image files, decoded by ``workers`` threads (CPU) or processes (CUDA) beside the encoder,
        encoded ``batch_size`` at a time and searched about ``search_batch`` at a time; yields one record per
        path, in input order:
        ``{"path", "caption", "logprob", ["alternatives"], ["labels"], ["confidence"], ["words", "alphas"]}`` or
        ``{"path", "error"}``.

        ``path`` is the path as given (a string). Unreadable files yield an ``error`` record; the rest go on.

        On the CPU, :func:`capcli.runtime.tune_cpu_allocator` (called once, before) makes the encoder up to ~2x
        faster; ``capcli caption`` does that.
        """
        self._check(beam_size, top_k, max_len, length_penalty)
        paths = [Path(p) for p in paths]
        if not paths:
            return
        # Decoding runs beside the encoder, as for `capcli features`: threads on the CPU (no fork of this
        # big process), DataLoader worker processes for CUDA; 0 workers: decode each batch in turn.
        items = ImageItems([(i, str(p), p.name) for i, p in enumerate(paths)], self.spec)
        order = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
        source = batch_source(items, order, workers, "auto", self.device.type)
        progress.start("captioning", total=len(paths), unit="img")
        failed = 0
        # Encoded batches wait here until one search takes search_batch images of them at once.
        # (ids, decoding errors, (features, grounding plans) or None)
        group: list[tuple[list[int], list[tuple[int, str]], tuple[torch.Tensor, list[Plan] | None] | None]] = []

        def search_group() -> list[dict[str, Any]]:
            records = {i: {"path": str(paths[i]), "error": err} for _, errors, _ in group for i, err in errors}
            ok = [i for ids, _, f in group if f is not None for i in ids]
            if ok:
                encoded = [f for _, _, f in group if f is not None]
                feats = torch.cat([f for f, _ in encoded])
                plans = None if self.grounder is None else [p for _, ps in encoded for p in ps or []]
                done = self._decode(feats, plans, beam_size, max_len, top_k, length_penalty, return_alphas)
                records.update({i: {"path": str(paths[i]), **rec} for i, rec in zip(ok, done, strict=True)})
            group.clear()
            return [records[i] for i in sorted(records)]

        try:
            batches = iter(source)
            while True:
                nxt = next(batches, None)
                if nxt is not None:
                    ids, images, bad, _ = nxt
                    errors = [(i, _reason(paths[i], why)) for i, _, why in bad]
                    group.append((ids.tolist(), errors, None if images is None else self._encode(images)))
                    if sum(len(ids) for ids, _, f in group if f is not None) < search_batch:
                        continue
                for rec in search_group():
                    failed += "error" in rec
                    yield rec
                    if failed:
                        progress.advance(1, failed=failed)
                    else:
                        progress.advance(1)
                if nxt is None:
                    break
        finally:
            source.close()  # stops the decoding threads or workers, also when the caller stops early
            progress.done()


# ----------------------------------------------------------------------------------------- choosing files
def collect_inputs(inputs: Sequence[str | Path], recursive: bool = False,
                   left_out: LeftOut | None = None) -> list[InputFile]:
    """Image files of the given files and folders: a folder's files sorted, files in the order given.

    Folders contribute the entries with an image extension (subfolders with ``recursive``; see
    :mod:`capcli.walk`); a file named explicitly is taken whatever its extension, and so is a symbolic link
    named explicitly, broken or not (it then fails with its reason). Two inputs with the same relative path
    are an error. What the folders leave out is added to ``left_out`` when it is given.
    """
    out: list[InputFile] = []
    seen: dict[str, Path] = {}
    for raw in inputs:
        root = Path(raw)
        if root.is_dir():
            items = walk_folder(root, recursive, left_out if left_out is not None else LeftOut())
        elif root.exists() or root.is_symlink():
            items = [InputFile(root, root.name)]
        else:
            raise UsageError(f"no such file or folder: {display(str(root))}")
        for item in items:
            other = seen.get(item.key)
            if other is not None:
                if os.path.realpath(other) == os.path.realpath(item.path):
                    continue  # the same file named twice
                raise UsageError(f"{display(str(other))} and {display(str(item.path))} would both be recorded as "
                                 f"{display(item.key)!r}; caption them in separate runs")
            seen[item.key] = item.path
            out.append(item)
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard wants I/N, e.g. 0/4 (got {text!r})") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: need N >= 1 and 0 <= I < N (shards are numbered from 0)")
    return i, n


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    """Whether relative path ``key`` belongs to shard I of N (SHA-1 of the path's bytes, UTF-8, modulo N)."""
    i, n = shard
    return int.from_bytes(hashlib.sha1(name_bytes(key)).digest()[:8], "big") % n == i


# ------------------------------------------------------------------------------------------------- writers
def output_format(out: str | Path) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"unknown output format {suffix or '(no extension)'!r} for {out}; use .json, .jsonl or .csv")
    return FORMATS[suffix]


def _whole_text(path: Path) -> tuple[str, bool]:
    """A streamed output's text, without a leading UTF-8 BOM (Excel saves one), and whether it had one."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read {display(str(path))}: {e.strerror or e}") from None
    return (text[1:], True) if text.startswith(BOM) else (text, False)


def _complete(text: str) -> str:
    """``text`` up to its last newline: a last record without it (the writer was killed) is dropped."""
    return text[: text.rfind("\n") + 1]


def _not_captions(path: Path, why: str) -> UsageError:
    return UsageError(f"cannot read {display(str(path))}: not a capcli caption list ({why}); give -o another file")


@dataclass
class Found:
    """What an output holds: its records and, to write it back as it was, its CSV columns and BOM.

    ``kept`` is false for a file with nothing to keep (empty, or only a cut first line): it is started afresh.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    columns: tuple[str, ...] = CSV_FIELDS  # .csv: the file's columns in its order, then capcli's it lacks
    bom: bool = False
    kept: bool = False


def _read_jsonl(path: Path) -> Found:
    text, bom = _whole_text(path)
    out, others = [], 0
    for line in _complete(text).split("\n")[:-1]:  # after the last "\n" comes ""
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None  # a damaged line: that image is captioned again
        if isinstance(rec, dict) and "path" in rec:
            out.append(rec)
        elif line.strip(" \t\r\0"):  # zero bytes: a block a crash left unwritten
            others += 1
    if others and not out:
        raise _not_captions(path, f"none of its {others} line(s) is a record with a path")
    return Found(out, bom=bom, kept=bool(out))


def _csv_header(path: Path, text: str) -> tuple[list[str], Iterator[list[str]]] | None:
    """The columns and the reader of the rows after them; None for a file with no whole first line."""
    complete = _complete(text)
    if not complete:
        if not text.strip() or CSV_HEADER.startswith(text):
            return None  # empty, or capcli's header cut as it was written
        complete = text + "\n"  # one line without its newline: read as the header
    reader = csv.reader(io.StringIO(complete, newline=""), strict=True)
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        raise _not_captions(path, "its first line is not a CSV header") from None
    missing = [c for c in ("path", "caption") if c not in header]
    if missing and len(header) == 1 and header[0].startswith("path;"):
        raise _not_captions(path, "its columns are separated by ';', as a spreadsheet saves CSV in some regions; "
                            "save it with ',' to resume it")
    if missing:
        raise _not_captions(path, f"no {' or '.join(missing)} column")
    if len(set(header)) < len(header):
        twice = sorted({c for c in header if header.count(c) > 1})
        raise UsageError(f"cannot resume {display(str(path))}: column(s) {', '.join(map(repr, twice))} appear "
                         "twice, and both cannot be kept; rename one")
    return header, reader


def _csv_record(row: dict[str, str], extras: Sequence[str]) -> dict[str, Any] | None:
    """A record from a CSV row (None when damaged); ``extras``, columns a person added, kept as text."""
    rec: dict[str, Any] = {"path": row["path"]}
    if row.get("path_bytes"):
        rec["path_bytes"] = row["path_bytes"]
    if row.get("error"):
        rec["error"] = row["error"]
    else:
        rec["caption"] = row["caption"]
        try:
            if row.get("logprob"):  # a person who rewrote the caption may have cleared its score
                rec["logprob"] = float(row["logprob"])
            for key in ("alternatives", "labels"):
                if row.get(key):
                    rec[key] = json.loads(row[key])
            if row.get("confidence"):
                rec["confidence"] = float(row["confidence"])
            if (row.get("low_confidence") or "").lower() == "true":  # absent from older CSVs
                rec["low_confidence"] = True
        except (ValueError, json.JSONDecodeError):
            return None
    rec.update((c, row[c]) for c in extras)
    return rec


def _read_csv(path: Path) -> Found:
    text, bom = _whole_text(path)
    found = _csv_header(path, text)
    if found is None:
        return Found(bom=bom)
    header, reader = found
    extras = [c for c in header if c not in CSV_FIELDS]
    out = []
    while True:  # a quoted field may hold newlines (a file name can); a cut last row ends the file
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error:
            continue  # a damaged row (that image is captioned again); the rows after it are read on
        rec = _csv_record(dict(zip(header, values, strict=True)), extras) if len(values) == len(header) else None
        if rec is not None and rec["path"]:  # else a damaged row
            out.append(rec)
    columns = list(header)
    for c in (c for c in CSV_FIELDS if c not in header):  # a column newer than the file: before path_bytes
        columns.insert(columns.index("path_bytes") if "path_bytes" in columns else len(columns), c)
    return Found(out, tuple(columns), bom, kept=True)


def _read_json(path: Path) -> Found:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path}: not a readable JSON array ({e})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "path" in r for r in data):
        raise UsageError(f"cannot read {path}: not a capcli caption list")
    return Found(data, kept=True)


_READERS: dict[str, Callable[[Path], Found]] = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv}


def read_output(path: str | Path) -> Found:
    """What a caption output file holds (any of the three formats); damaged lines are skipped.

    Raises :class:`UsageError` for a file that is not a capcli caption list (a foreign CSV, JSON or JSONL).
    """
    path = Path(path)
    return _READERS[output_format(path)](path)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a caption output file (any of the three formats); damaged lines are skipped."""
    return read_output(path).records


class _Writer:
    """Record sink for one output file; ``kept`` holds the records of an earlier run (``resume``).

    A record is written whole or not at all: a failed write (full disk, file-size limit, permission, the file
    removed) raises :class:`OutputError`, which says how many records are safe in the file; the file then still
    ends at a whole record (.jsonl/.csv, cut back) or is the last complete array (.json).
    """

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.found = read_output(path) if resume and path.is_file() else Found()
        # a photo that failed is tried again (it may have been mended since): its error record is not kept
        self.kept: list[dict[str, Any]] = [r for r in self.found.records if "error" not in r]
        self.safe = 0  # records known to be in the file

    def write(self, rec: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish the file (may raise :class:`OutputError`)."""

    def abort(self) -> None:
        """Let go of the file without writing more (after a failure); never raises."""

    def failed(self, e: OSError, what: str = "write") -> OutputError:
        reason = os_reason(e)
        return OutputError(f"cannot {what} {display(str(self.path))}: {reason}; {self.safe} record(s) are safe in it "
                           "- run the same command with --resume to continue")


def _encode_line(text: str) -> bytes:
    """UTF-8; a stray lone surrogate is kept as a ``\\udcNN`` escape instead of ending the run."""
    return text.encode("utf-8", "backslashreplace")


def _jsonl_line(rec: dict[str, Any]) -> bytes:
    return atomic.json_bytes(rec, indent=None)


def _csv_row(rec: dict[str, Any]) -> dict[str, Any]:
    """Capcli's columns of a record; a column a person added holds its text (empty in a new record)."""
    alts = rec.get("alternatives")
    return {**rec, "path": rec["path"], "caption": rec.get("caption", ""), "logprob": rec.get("logprob", ""),
            "error": rec.get("error", ""), "alternatives": json.dumps(alts, ensure_ascii=False) if alts else "",
            "labels": json.dumps(rec["labels"], ensure_ascii=False) if rec.get("labels") else "",
            "confidence": rec.get("confidence", ""),
            "low_confidence": "true" if rec.get("low_confidence") is True else "",
            "path_bytes": rec.get("path_bytes", "")}


def _csv_line(values: Sequence[Any] | dict[str, Any], columns: Sequence[str]) -> bytes:
    buf = io.StringIO()
    if isinstance(values, dict):
        csv.DictWriter(buf, columns, lineterminator="\n", extrasaction="ignore").writerow(values)
    else:
        csv.writer(buf, lineterminator="\n").writerow(values)
    return _encode_line(buf.getvalue())


def _encoder(kind: str, found: Found) -> tuple[bytes, Callable[[dict[str, Any]], bytes]]:
    """The start of a .jsonl/.csv file laid out as ``found`` (its BOM, the CSV header) and its record encoder."""
    bom = BOM.encode() if found.bom else b""
    if kind == "jsonl":
        return bom, _jsonl_line
    columns = found.columns
    return bom + _csv_line(columns, columns), lambda rec: _csv_line(_csv_row(rec), columns)


def _file_bytes(head: bytes, encode: Callable[[dict[str, Any]], bytes], records: Sequence[dict[str, Any]]) -> bytes:
    """A whole .jsonl/.csv file of ``records``: the head, then one encoded record after another."""
    return head + b"".join(encode(r) for r in records)


class _StreamWriter(_Writer):
    """Appends each record to the file as it comes (unbuffered: a record is in the file once written).

    On resume the file is first rewritten as it was (BOM, CSV columns) without its damaged or cut lines.
    """

    def __init__(self, path: Path, resume: bool, kind: str) -> None:
        super().__init__(path, resume)
        self.head, self.encode = _encoder(kind, self.found)
        if self.found.kept:
            atomic.write_bytes(path, self.file_bytes(self.kept))
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.stat = os.fstat(self.fd)
        self.size = self.stat.st_size
        self.safe = len(self.kept)
        if not self.found.kept and self.head:
            self._append(self.head)

    def file_bytes(self, records: Sequence[dict[str, Any]]) -> bytes:
        return _file_bytes(self.head, self.encode, records)

    def _append(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)  # the file ends at the last whole record again
            raise
        self.size += len(data)

    def write(self, rec: dict[str, Any]) -> None:
        try:
            try:
                here = os.stat(self.path)
            except FileNotFoundError:
                here = None
            if here is None or not os.path.samestat(here, self.stat):
                raise OutputError(f"cannot write {display(str(self.path))}: it was deleted or moved during the run, "
                                  f"with the {self.safe} record(s) written so far; run the same command again (with "
                                  "--resume if you put it back)")
            self._append(self.encode(rec))
        except OSError as e:
            raise self.failed(e) from None
        self.safe += 1

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class _JsonWriter(_Writer):
    """Keeps the (small) records and rewrites the array atomically at the start, now and then and at the end.

    The rewrite interval is at least ``every_s`` and at least 20 x the last rewrite's duration, so the
    periodic saves cost under 5 % even when the array grows large (use .jsonl for huge collections).
    """

    def __init__(self, path: Path, resume: bool, every_s: float = JSON_SAVE_EVERY_S) -> None:
        super().__init__(path, resume)
        self.records = list(self.kept)
        self.every_s = every_s
        self.safe = len(self.kept)  # the earlier run's file holds them until the first save
        self.save()  # a valid file from the start (and a permission problem shows before any work)
        self.every_s = every_s  # timed by the saves of this run's records

    def write(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if time.monotonic() - self.saved > self.every_s:
            self.save()

    def save(self) -> None:
        t = time.monotonic()
        try:
            atomic.write_json(self.path, self.records)
        except OSError as e:
            raise self.failed(e) from None
        self.safe = len(self.records)
        self.saved = time.monotonic()
        self.every_s = max(self.every_s, 20 * (self.saved - t))

    def close(self) -> None:
        self.save()


def open_writer(out: Path, resume: bool = False) -> _Writer:
    kind = output_format(out)
    if out.is_dir():
        raise OutputError(f"cannot write {display(str(out))}: it is a folder; give -o a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return _JsonWriter(out, resume) if kind == "json" else _StreamWriter(out, resume, kind)
    except OSError as e:
        raise OutputError(f"cannot write {display(str(out))}: {os_reason(e)}") from None


def rewrite_records(out: str | Path, records: Sequence[dict[str, Any]], found: Found | None = None) -> None:
    """Replace ``out``'s records with ``records`` atomically, in its format and layout (under its lock);
    ``found``: ``out`` as :func:`read_output` read it, if the caller has it."""
    out = Path(out)
    kind = output_format(out)
    if kind == "json":
        data = atomic.json_bytes(list(records))
    else:  # laid out as the file is (a BOM, the columns a person added)
        if found is None:
            found = read_output(out) if out.is_file() else Found()
        data = _file_bytes(*_encoder(kind, found), records)
    with lock.exclusive(lock.sidecar(out), str(out)):
        try:
            atomic.write_bytes(out, data)
        except OSError as e:
            raise OutputError(f"cannot write {display(str(out))}: {os_reason(e)}") from None


# ---------------------------------------------------------------------------------------------- the command
@dataclass
class CaptionSummary:
    out: Path
    captioned: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output (--resume)
    outside_shard: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), for the report
    # What the folders left out (capcli/walk.py). Entries not captioned: files by extension, anything else by what
    # it is ("broken link", "named pipe", "unreadable folder"); these fail --strict.
    unsupported: dict[str, int] = field(default_factory=dict)
    hidden_files: int = 0  # not taken (.DS_Store)
    hidden_folders: int = 0  # not walked into (.thumbnails/, .git/)
    subfolders: int = 0  # not walked: no --recursive
    walked_already: int = 0  # symbolic links to a folder walked already (a loop, or a second link)

    @property
    def rate(self) -> float:
        return (self.captioned + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def n_unsupported(self) -> int:
        return sum(self.unsupported.values())

    def unsupported_text(self) -> str:
        """``"2 (.mov 1, .xmp 1)"``: entries not captioned, by extension or kind, most common first."""
        parts = ", ".join(f"{ext} {n}" for ext, n in sorted(self.unsupported.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"{self.n_unsupported} ({parts})"

    def left_out_text(self) -> str:
        """What else the folders left out, for the summary line: ``", skipped (hidden) 3 (1 folder, 2 files)"``."""
        hidden = [f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((self.hidden_folders, "folder"),
                                                                      (self.hidden_files, "file")) if n]
        n_hidden = self.hidden_files + self.hidden_folders
        return "".join([f", skipped (unsupported) {self.unsupported_text()}" if self.unsupported else "",
                        f", skipped (hidden) {n_hidden} ({', '.join(hidden)})" if n_hidden else "",
                        f", {self.subfolders} subfolder(s) not walked (no --recursive)" if self.subfolders else "",
                        f", {self.walked_already} linked folder(s) walked already" if self.walked_already else ""])


def _ours(path: Path, out: Path) -> bool:
    """Whether ``path`` is the output, or the lock or a temporary file capcli keeps beside it."""
    if not (path.name in (out.name, lock.sidecar(out).name) or path.name.startswith(f".{out.name}.tmp")):
        return False  # (the name first: the real folders only for the few entries named like these)
    return os.path.realpath(path.parent) == os.path.realpath(out.parent)


def _left_out(left_out: LeftOut, items: Sequence[InputFile], out: Path) -> CaptionSummary:
    """A summary counting what the folders left out: the output and the photos' sidecars are not counted (the
    ``.xmp`` and ``.txt`` files ``--sidecar`` writes: ``a.xmp``, ``a.jpg.xmp``, ``a.txt``)."""
    sidecars = {sidecar_path(it.path, "xmp", n) for it in items for n in SIDECAR_NAMINGS}
    sidecars |= {sidecar_path(it.path, "txt") for it in items}
    counts: dict[str, int] = {}
    for path, label in left_out.others:
        if path not in sidecars and not _ours(path, out):
            counts[label] = counts.get(label, 0) + 1
    hidden = [is_dir for path, is_dir in left_out.hidden if not _ours(path, out)]
    return CaptionSummary(out, unsupported=counts, hidden_files=hidden.count(False), hidden_folders=sum(hidden),
                          subfolders=len(left_out.subfolders), walked_already=len(left_out.walked_already))


def caption_files(captioner: Captioner, inputs: Sequence[str | Path], out: str | Path, *, beam_size: int = 3,
                  batch_size: int = 32, workers: int = 2, max_len: int = 20, top_k: int = 1,
                  length_penalty: float = 0.0, recursive: bool = False, attention_maps: str | Path | None = None,
                  resume: bool = False, shard: tuple[int, int] | None = None,
                  progress: Progress = NULL) -> CaptionSummary:
    """``capcli caption``: caption files and folders into ``out`` (.json/.jsonl/.csv); see the module doc.

    What is done is in ``out`` even when this is interrupted (Ctrl-C) or fails half-way. ``out`` is locked
    for the run: a second run writing it fails at once (:class:`LockedError`). A failed write of ``out``
    raises :class:`OutputError`, saying how many records are safe.
    """
    out = Path(out)
    output_format(out)
    if attention_maps is not None and not captioner.has_attention:
        raise UsageError(f"--attention-maps needs a model with attention (arch 'attention'); "
                         f"this one is {captioner.model.arch!r} and has none")
    captioner._check(beam_size, top_k, max_len, length_penalty)
    left_out = LeftOut()
    items = collect_inputs(inputs, recursive, left_out)
    summary = _left_out(left_out, items, out)
    if not items:
        said = [summary.left_out_text().removeprefix(", "), "" if recursive else "use --recursive for subfolders"]
        raise UsageError(f"no image files found in {', '.join(display(str(p)) for p in inputs)}"
                         + "".join(f"; {x}" for x in said if x))
    if shard is not None:
        mine = [it for it in items if in_shard(it.key, shard)]
        summary.outside_shard = len(items) - len(mine)
        items = mine
    with lock.exclusive(lock.sidecar(out), str(out)):
        _caption_into(captioner, items, open_writer(out, resume), summary, dict(
            beam_size=beam_size, batch_size=batch_size, workers=workers, max_len=max_len, top_k=top_k,
            length_penalty=length_penalty), Path(attention_maps) if attention_maps is not None else None, progress)
    return summary


def _caption_into(captioner: Captioner, items: list[InputFile], writer: _Writer, summary: CaptionSummary,
                  options: dict[str, Any], maps: Path | None, progress: Progress) -> None:
    """Caption ``items`` not already in ``writer`` into it, counting in ``summary``."""
    t0 = time.perf_counter()
    records = None
    try:
        done = {record_key(r) for r in writer.kept}
        todo = [it for it in items if it.key not in done]
        summary.skipped = len(items) - len(todo)
        records = captioner.caption_paths([it.path for it in todo], progress=progress,
                                          return_alphas=maps is not None, **options)
        for item, rec in zip(todo, records, strict=True):
            words, alphas = rec.pop("words", None), rec.pop("alphas", None)
            rec.pop("path")
            rec = {**path_fields(item.key), **rec}
            if "error" in rec:
                rec["error"] = display(rec["error"])
                summary.failed += 1
                summary.failures.append((display(item.key), rec["error"]))
                progress.warn(f"{display(item.key)}: {rec['error']}")
            else:
                summary.captioned += 1
                if maps is not None and words is not None:
                    _save_map(maps, item, words, alphas, captioner.spec.grid, progress)
            writer.write(rec)
    except OutputError:
        writer.abort()
        raise
    except BaseException:
        with contextlib.suppress(OutputError):
            writer.close()  # keep what is done (Ctrl-C, a failure)
        raise
    else:
        writer.close()
    finally:
        if records is not None:
            records.close()  # stops the decoding now, also on error
        summary.seconds = time.perf_counter() - t0


def _save_map(folder: Path, item: InputFile, words: list[str], alphas: Any, grid: int, progress: Progress) -> None:
    from .viz import save_attention_map

    target = folder / f"{item.key}.png"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_attention_map(target, load_image(item.path), words, alphas, grid=grid)
    except (OSError, ImageError) as e:
        progress.warn(f"{display(item.key)}: cannot write its attention map ({display(str(e))})")
