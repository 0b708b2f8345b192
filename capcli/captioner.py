"""The :class:`Captioner` API: a trained model with its encoder and vocabulary; photos in, records out.

It opens no output file and walks no folder (``capcli caption``'s files are :mod:`capcli.caption`'s and
:mod:`capcli.outputs`'): photos come as paths, PIL images or the bytes of image files, and each gives one record
``{"caption", "logprob", ["alternatives"], ["labels"], ["confidence"], ["words", "alphas"]}`` or ``{"error"}``.

Pipeline for many files: photos are decoded and resized (``spec.read``, a uint8 tensor per image) beside the
encoder, by the same batch source as ``capcli features`` (threads on the CPU, DataLoader worker processes for
CUDA); the encoder, folded for inference, runs over batches of ``batch_size`` and one batched beam search then
decodes ``SEARCH_BATCH`` images at once (bigger matrix products: ~1.3-2x faster per image on the CPU), through
the model's search twin with int8 or bfloat16 products where the CPU computes them natively
(``precision="auto"``). Nothing but the small result records outlives a search group, so memory stays flat
however many photos. The search's options are one :class:`capcli.search.SearchOptions`, checked before anything
is read.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from .checkpoint import Checkpoint
from .confidence import ConfidenceModel, Evidence, file_sha256, for_checkpoint
from .encoders import Encoder, create_encoder, get_spec
from .errors import CapcliError, CheckpointError, ImageError, UsageError
from .familiar import Familiarity
from .grounding import MODES as GROUNDING_MODES
from .grounding import Grounder, GroundingPolicy, Plan, grounded_search
from .images import decode_bytes, to_rgb
from .models import build
from .models.base import CaptionModel, Searchable
from .models.decoding import Decoded
from .names import display
from .photos import ImageItems, batch_source
from .progress import NULL, Progress
from .runtime import resolve_device, resolve_precision
from .search import SearchOptions, search
from .vocab import Vocabulary

_ASSETS = Path(__file__).resolve().parent / "assets"
# Models shipped in the package (trained on Flickr8k by recipes/flickr8k-default.sh), by name for --model.
SHIPPED_MODELS = {"attention": _ASSETS / "flickr8k-attention.pt", "basic": _ASSETS / "flickr8k-basic.pt"}
DEFAULT_MODEL = SHIPPED_MODELS["attention"]
SEARCH_BATCH = 128  # images per beam search in caption_paths (several encoder batches)

# An encoded batch waiting for its search: (ids, decoding errors, (features, grounding plans) or None)
_Encoded = tuple[list[int], list[tuple[int, str]], tuple[torch.Tensor, list[Plan] | None] | None]


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(resolve_device(device))


def _reason(path: Path, message: str) -> str:
    """A decoding failure without the file's path or name in front (the record already names the file)."""
    for prefix in (f"{path}: ", f"{path.name}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def _checkpoint_path(checkpoint: str | Path | None) -> Path:
    """A checkpoint file, a shipped model's name, or None (the shipped default) -> the file."""
    if checkpoint is None:
        if not DEFAULT_MODEL.is_file():
            raise CheckpointError("no default model is installed; pass --model CKPT")
        return DEFAULT_MODEL
    if str(checkpoint) in SHIPPED_MODELS and not Path(checkpoint).exists():
        return SHIPPED_MODELS[str(checkpoint)]
    if not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint not found: {display(str(checkpoint))} (give a checkpoint file, or a "
                              f"shipped model: {', '.join(SHIPPED_MODELS)})")
    return Path(checkpoint)


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
        self.device = device
        self.spec = encoder.spec
        self.source = source
        # Below float32 the search runs the model's twin, its products in bfloat16 or int8 (models/packed.py).
        twin = self.model.for_search(precision) if precision != "float32" else None
        self._search_model: Searchable = twin if twin is not None else self.model
        self.precision = precision if twin is not None else "float32"
        # P(the caption is not wrong), for a checkpoint with a fitted calibration (load(); capcli/confidence.py).
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
        path = _checkpoint_path(checkpoint)
        ckpt = Checkpoint.load(path)
        try:
            vocab = Vocabulary.from_dict(ckpt.vocab)
        except CapcliError as e:
            raise CheckpointError(f"{path}: {e}") from None
        model = build(ckpt.config)
        try:
            model.load_state_dict(ckpt.model)
        except (RuntimeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: the model weights do not fit its config ({str(e).splitlines()[0]})") from e
        spec = get_spec(ckpt.encoder_name)
        dim = ckpt.config.get("feature_dim")
        if dim is not None and dim != spec.feature_dim:
            raise CheckpointError(
                f"{path}: the model expects {dim}-d features but {spec.name} gives {spec.feature_dim}")
        encoder = create_encoder(spec.name)
        if ckpt.encoder_state:
            try:
                encoder.load_state_dict(ckpt.encoder_state)
            except (RuntimeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: its fine-tuned encoder weights do not fit {spec.name}") from e
            grounding = "off"
        cap = cls(model, encoder.for_inference(), vocab, dev, source=path, precision=precision, grounding=grounding,
                  familiarity=Familiarity.of_checkpoint(ckpt, path, spec.feature_dim))
        if cap.grounder is not None:  # fitted on grounded captions (their labels are features)
            cap.confidence = for_checkpoint(path, sha256=cap.checkpoint_sha256)  # hashed once, for both
        return cap

    @functools.cached_property
    def checkpoint_sha256(self) -> str:
        """The SHA-256 of the checkpoint file (records name their model by it); empty for a model not from a file."""
        return file_sha256(self.source) if self.source is not None and Path(self.source).is_file() else ""

    @property
    def has_attention(self) -> bool:
        """Whether captions come with attention weights over the image grid (Show, Attend and Tell)."""
        return self.model.feature_kind == "grid"

    def search_options(self, beam_size: int = 3, max_len: int = 20, top_k: int = 1,
                       length_penalty: float = 0.0) -> SearchOptions:
        """This model's search options, checked (:class:`UsageError` naming the command-line option)."""
        return SearchOptions.of(self.vocab, beam_size=beam_size, max_len=max_len, top_k=top_k,
                                length_penalty=length_penalty)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[Plan] | None]:
        """uint8 images (B, 3, S, S) -> what the model consumes, and the grounding plan of each image."""
        with torch.inference_mode():
            grid = self.encoder(images.to(self.device, non_blocking=True))  # (B, N, D)
            plans = None
            if self.grounder is not None:
                distance = self.familiarity.relative(grid) if self.familiarity is not None else None  # (B,)
                plans = self.grounder.plans(self.encoder.imagenet_logits(grid), None if distance is None
                                            else distance > 1)
                if distance is not None:
                    for plan, d in zip(plans, distance.tolist(), strict=True):
                        plan.distance = round(d, 4)
            return self.model.features_of_kind(grid, self.model.feature_kind), plans

    def _decode(self, feats: torch.Tensor, plans: list[Plan] | None, opts: SearchOptions,
                return_alphas: bool) -> list[dict[str, Any]]:
        """Features of a batch (and their grounding plans) -> one record per image."""
        with torch.inference_mode():
            if plans is not None:
                assert self.grounder is not None
                results = grounded_search(self._search_model, feats, plans, self.grounder, opts, return_alphas)
            else:
                results = search(self._search_model, feats, opts, with_alphas=return_alphas)
        plans = plans if plans is not None else [None] * len(results)
        records = [self._record(hyps, plan, opts.top_k, return_alphas)
                   for hyps, plan in zip(results, plans, strict=True)]
        if self.confidence is not None and plans[0] is not None:
            for rec, plan in zip(records, plans, strict=True):
                assert plan is not None
                rec["confidence"] = round(self.confidence(rec["caption"], rec["logprob"], rec["labels"],
                                                          Evidence.of(plan)), 4)
        return records

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
        if return_alphas and best.alphas is not None:
            rec["words"] = rec["caption"].split()  # one per row of alphas (a word per token)
            rec["alphas"] = best.alphas.float().numpy()  # (L, N)
        return rec

    def caption_images(self, images: Sequence[Image.Image], beam_size: int = 3, max_len: int = 20, top_k: int = 1,
                       length_penalty: float = 0.0, batch_size: int = 32,
                       return_alphas: bool = False) -> list[dict[str, Any]]:
        """Caption PIL images: one record ``{"caption", "logprob", ["alternatives"]}`` per image, in order."""
        opts = self.search_options(beam_size, max_len, top_k, length_penalty)
        out: list[dict[str, Any]] = []
        for s in range(0, len(images), batch_size):
            chunk = [self.spec.preprocess(to_rgb(ImageOps.exif_transpose(im))) for im in images[s: s + batch_size]]
            out += self._decode(*self._encode(torch.stack(chunk)), opts, return_alphas)
        return out

    def caption_bytes(self, images: Sequence[bytes], beam_size: int = 3, max_len: int = 20, top_k: int = 1,
                      length_penalty: float = 0.0, batch_size: int = 32, search_batch: int = SEARCH_BATCH,
                      options: SearchOptions | None = None) -> list[dict[str, Any]]:
        """Caption photos given as the bytes of their files (JPEG, PNG, HEIC...: what :func:`decode_bytes` reads),
        all in memory: one record per image, in order, ``{"error"}`` for bytes that are no readable photo.

        For a worker of a distributed engine: no file, folder or progress display, and the same records
        :meth:`caption_paths` gives for those files (decoded, encoded and searched the same way). ``options``
        as for :meth:`caption_paths`.
        """
        opts = options or self.search_options(beam_size, max_len, top_k, length_penalty)
        tensors: dict[int, torch.Tensor] = {}
        errors: list[tuple[int, str]] = []
        for i, data in enumerate(images):
            try:
                img = decode_bytes(data, f"image {i}", self.spec.input_size)
                tensors[i] = self.spec.preprocess(img)
            except ImageError as e:
                errors.append((i, str(e).removeprefix(f"image {i}: ")))
        records = dict(zip(tensors, self.caption_tensors(list(tensors.values()), opts, batch_size, search_batch),
                           strict=True))
        records.update((i, {"error": err}) for i, err in errors)
        return [records[i] for i in range(len(images))]

    def caption_tensors(self, images: Sequence[torch.Tensor], options: SearchOptions, batch_size: int = 32,
                        search_batch: int = SEARCH_BATCH) -> list[dict[str, Any]]:
        """Caption photos already decoded and resized (``spec.preprocess``: uint8 (3, S, S) each): one record per
        image, in order, encoded ``batch_size`` at a time (stacked channels-last, as the batch source stacks them)
        and searched about ``search_batch`` at a time, as :meth:`caption_paths` does."""
        group: list[_Encoded] = []
        records: list[tuple[int, dict[str, Any]]] = []
        for s in range(0, len(images), batch_size):
            ids = list(range(s, min(s + batch_size, len(images))))
            batch = torch.stack([images[i].permute(1, 2, 0) for i in ids]).permute(0, 3, 1, 2)  # (B, 3, S, S)
            group.append((ids, [], self._encode(batch)))
            if sum(len(c) for c, _, _ in group) >= search_batch:
                records += self._search_group(group, options, False)
        records += self._search_group(group, options, False)
        return [rec for _, rec in sorted(records, key=lambda ir: ir[0])]

    def _search_group(self, group: list[_Encoded], opts: SearchOptions,
                      return_alphas: bool) -> list[tuple[int, dict[str, Any]]]:
        """One search over the encoded batches of ``group`` (emptied): (id, record) in id order, the decoding
        errors among them as ``{"error"}``."""
        records: dict[int, dict[str, Any]] = {i: {"error": err} for _, errors, _ in group for i, err in errors}
        ok = [i for ids, _, f in group if f is not None for i in ids]
        if ok:
            encoded = [f for _, _, f in group if f is not None]
            feats = torch.cat([f for f, _ in encoded])
            plans = None if self.grounder is None else [p for _, ps in encoded for p in ps or []]
            records.update(zip(ok, self._decode(feats, plans, opts, return_alphas), strict=True))
        group.clear()
        return sorted(records.items())

    def caption_paths(self, paths: Sequence[str | Path], beam_size: int = 3, batch_size: int = 32, workers: int = 2,
                      max_len: int = 20, top_k: int = 1, progress: Progress = NULL, *, length_penalty: float = 0.0,
                      return_alphas: bool = False, search_batch: int = SEARCH_BATCH,
                      options: SearchOptions | None = None) -> Iterator[dict[str, Any]]:
        """Caption image files, decoded by ``workers`` threads (CPU) or processes (CUDA) beside the encoder,
        encoded ``batch_size`` at a time and searched about ``search_batch`` at a time; yields one record per
        path, in input order:
        ``{"path", "caption", "logprob", ["alternatives"], ["labels"], ["confidence"], ["words", "alphas"]}`` or
        ``{"path", "error"}``.

        ``path`` is the path as given (a string). Unreadable files yield an ``error`` record; the rest go on.
        The search's ``options`` (:meth:`search_options`; else made of the keyword options) are checked when
        this is called, before any file is read.

        On the CPU, :func:`capcli.runtime.tune_cpu_allocator` (called once, before) makes the encoder up to ~2x
        faster; ``capcli caption`` does that.
        """
        opts = options or self.search_options(beam_size, max_len, top_k, length_penalty)
        return self._caption_paths([Path(p) for p in paths], opts, batch_size, workers, progress, return_alphas,
                                   search_batch)

    def _caption_paths(self, paths: list[Path], opts: SearchOptions, batch_size: int, workers: int,
                       progress: Progress, return_alphas: bool, search_batch: int) -> Iterator[dict[str, Any]]:
        if not paths:
            return
        # Decoding runs beside the encoder, as for `capcli features`: threads on the CPU (no fork of this
        # big process), DataLoader worker processes for CUDA; 0 workers: decode each batch in turn.
        items = ImageItems([(i, str(p), p.name) for i, p in enumerate(paths)], self.spec)
        order = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
        source = batch_source(items, order, workers, "auto", self.device.type)
        progress.start("captioning", total=len(paths), unit="img")
        failed = 0
        group: list[_Encoded] = []  # encoded batches wait here until one search takes search_batch images of them
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
                for i, rec in self._search_group(group, opts, return_alphas):
                    failed += "error" in rec
                    yield {"path": str(paths[i]), **rec}
                    if failed:
                        progress.advance(1, failed=failed)
                    else:
                        progress.advance(1)
                if nxt is None:
                    break
        finally:
            source.close()  # stops the decoding threads or workers, also when the caller stops early
            progress.done()
