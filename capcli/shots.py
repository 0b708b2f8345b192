"""RAW+JPEG and HEIC+JPEG pairs: one shot, saved twice by the camera (``IMG_0001.CR2`` + ``IMG_0001.JPG``).

Photo tools treat such a pair as one photo: Lightroom shows one shot, whose ``IMG_0001.xmp`` sidecar describes both
files, and writes into the JPEG, never into the RAW. Publishing does the same: the JPEG stands for the shot (its
record is the shot's caption), its sidecars (``name.xmp``, ``name.txt``, shared by the pair's names) are written
once, and it takes the caption embedded; the original (RAW, HEIC) gets no result of its own. With
``--sidecar-name ext`` each file has its own XMP sidecar (``IMG_0001.CR2.xmp``, darktable's way), and each is
written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .images import RAW_EXTENSIONS

ORIGINALS = RAW_EXTENSIONS | {".heic", ".heif", ".hif"}  # what a camera saves beside a JPEG of the same shot
RENDERINGS = frozenset({".jpg", ".jpeg"})


def originals_in_pairs(photos: Sequence[Path]) -> set[Path]:
    """The photos that are the original (RAW, HEIC) of a pair whose JPEG is also among ``photos``: one folder,
    one name but for the extension, exactly one JPEG."""
    shots: dict[tuple[Path, str], list[Path]] = {}
    for photo in photos:
        shots.setdefault((photo.parent, photo.stem.casefold()), []).append(photo)
    paired: set[Path] = set()
    for members in shots.values():
        jpegs = [p for p in members if p.suffix.lower() in RENDERINGS]
        originals = [p for p in members if p.suffix.lower() in ORIGINALS]
        if len(jpegs) == 1 and originals and len(jpegs) + len(originals) == len(members):
            paired.update(originals)
    return paired


def one_per_shot(items: Sequence[tuple[Path, dict[str, Any]]], how: str,
                 naming: str) -> list[tuple[Path, dict[str, Any]]]:
    """``items`` without the originals of pairs, where the JPEG stands for the shot: for an embedded caption and
    for sidecars the pair shares (``.txt``, ``.xmp`` named by stem); every item for ``name.ext.xmp`` sidecars."""
    if how == "xmp" and naming == "ext":
        return list(items)
    paired = originals_in_pairs([Path(p) for p, _ in items])
    return [(p, rec) for p, rec in items if Path(p) not in paired]
