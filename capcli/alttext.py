"""Alt text that says only what the evidence supports, for a caption too unsure to offer.

Below ``--min-confidence`` a caption is more likely wrong than a reader should be told; a sentence about the
wrong thing is worse alt text than a short honest one. :func:`label_alt_text` writes that short one from the
record's grounding labels (the words the encoder's own ImageNet evidence gives the photo, ``capcli/grounding.py``),
in the form photo sites use for automatic descriptions: ``Image may contain: rocket, tower``. Only labels with at
least :data:`MIN_EVIDENCE` are named, at most :data:`MAX_LABELS`, most likely first; a photo with none gets
:data:`NO_DESCRIPTION`, never a guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "Image may contain: "
NO_DESCRIPTION = "No description available"
# The grounding's own bar for naming a label when nothing else is in view (GroundingPolicy.say_unfamiliar).
MIN_EVIDENCE = 0.2
MAX_LABELS = 3


def label_alt_text(labels: Sequence[Mapping[str, Any]] | None, min_evidence: float = MIN_EVIDENCE,
                   max_labels: int = MAX_LABELS) -> str:
    """``Image may contain: w1, w2`` from a record's ``labels`` (``[{"word", "p"}, ...]``): the words with evidence
    ``p >= min_evidence``, at most ``max_labels``, likeliest first, each once; :data:`NO_DESCRIPTION` when none."""
    ranked = sorted(((float(lab["p"]), str(lab["word"])) for lab in labels or []), key=lambda pw: -pw[0])
    words: list[str] = []
    for p, word in ranked:
        if p >= min_evidence and word not in words and len(words) < max_labels:
            words.append(word)
    return PREFIX + ", ".join(words) if words else NO_DESCRIPTION


def alt_text(record: Mapping[str, Any], min_confidence: float | None) -> str | None:
    """The alt text to offer for a captioned record: its caption, or, when its ``confidence`` is below
    ``min_confidence``, :func:`label_alt_text` of its labels; None for a record without a caption."""
    caption = record.get("caption")
    if not isinstance(caption, str):
        return None
    conf = record.get("confidence")
    if min_confidence is not None and isinstance(conf, int | float) and conf < min_confidence:
        return label_alt_text(record.get("labels"))
    return caption
