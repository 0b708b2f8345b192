"""The one seam between the caption engines and the :class:`~capcli.captioner.Captioner`: a batch of samples in,
one record per sample out, failures as records (an engine never raises for one photo).

Both engines (``local``: this process; ``ray``: actors of a Ray cluster) caption through :func:`caption_samples`,
so they give the same captions key for key. Photos are decoded (no larger than the encoder needs) and resized in
a few threads beside the encoder, then encoded and searched as ``Captioner.caption_paths`` does.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ImageError
from ..images import decode_bytes, load_image
from ..names import display, path_fields
from ..provenance import Provenance
from ..samples import Sample


@dataclass(frozen=True)
class EngineOptions:
    """How captions are searched, as plain values a worker receives (its Captioner makes them its
    :class:`capcli.search.SearchOptions`), and the encoder's batch size; the same for every engine, and recorded
    with each caption."""

    beam_size: int = 3
    max_len: int = 20
    top_k: int = 1
    length_penalty: float = 0.0
    batch_size: int = 32  # images per encoder batch


def decode_sample(sample: Sample, spec: Any) -> Any:
    """A sample's photo as the encoder's input (``spec.preprocess``: upright, RGB, resized, a uint8 (3, S, S)
    tensor), or the reason it has none (str). Pure PIL and numpy: cheap in a decoding thread."""
    if sample.error is not None:
        return sample.error
    name = posixpath.basename(sample.key) or sample.key
    size = spec.input_size
    try:
        if sample.data is not None:
            return spec.preprocess(decode_bytes(sample.data, name, size))
        return spec.preprocess(load_image(sample.path or "", size))
    except ImageError as e:
        text = str(e)
        return text[len(name) + 2:] if text.startswith(f"{name}: ") else text
    except Exception as e:  # noqa: BLE001 - any decoder surprise is that photo's error, never the job's
        return f"cannot read ({type(e).__name__}: {e})"


def record_of(sample: Sample, result: dict[str, Any] | str, provenance: Provenance) -> dict[str, Any]:
    """The output record of one sample: key fields, source, the caption's fields or ``error``, provenance."""
    rec: dict[str, Any] = {**path_fields(sample.key), "source": display(sample.source)}
    if isinstance(result, str):
        rec["error"] = display(result)
    else:
        rec.update(result)
    rec.update(provenance.fields())
    return rec


def encode_and_search(captioner: Any, images: Sequence[Any], options: EngineOptions) -> list[dict[str, Any]]:
    """Decoded photos ((3, S, S) uint8 tensors) -> one record each, as ``Captioner.caption_paths`` runs them."""
    search = captioner.search_options(options.beam_size, options.max_len, options.top_k, options.length_penalty)
    return captioner.caption_tensors(list(images), search, options.batch_size)


def caption_samples(captioner: Any, samples: Sequence[Sample], options: EngineOptions, provenance: Provenance,
                    decoded: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """One record per sample, in order. ``decoded``: what :func:`decode_sample` gave for each sample, when the
    caller decoded them beforehand (in threads, overlapping the previous batch); else they are decoded here."""
    images = list(decoded) if decoded is not None else [decode_sample(s, captioner.spec) for s in samples]
    ok = [i for i, im in enumerate(images) if not isinstance(im, str)]
    results: list[dict[str, Any] | str] = list(images)
    if ok:
        try:
            done = encode_and_search(captioner, [images[i] for i in ok], options)
        except Exception as e:  # noqa: BLE001 - a batch the model cannot take: its rows say why, the job goes on
            done = [f"cannot caption ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"] * len(ok)
        for i, rec in zip(ok, done, strict=True):
            results[i] = rec
    return [record_of(s, r, provenance) for s, r in zip(samples, results, strict=True)]
