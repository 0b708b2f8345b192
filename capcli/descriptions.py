"""Whose words are in a photo's description fields: every field a photo tool shows as its description.

The Metadata Working Group's guidelines (2010, "Description") map three fields onto one description, and photo
tools show whichever their reconciliation picks: EXIF ``ImageDescription`` first when present, IPTC
``Caption-Abstract`` when it was changed after the XMP (its digest no longer matches) or there is no XMP, else XMP
``dc:description``. So a person's text in any of them is what someone sees, and counts as theirs; so does XMP
``Iptc4xmpCore:AltTextAccessibility`` (IPTC 2021 alt text) and ``tiff:ImageDescription`` (EXIF copied into XMP).
They are read from the photo and from its XMP sidecars (``name.xmp``, ``name.jpg.xmp``), where tools that prefer
the sidecar read them.

A field is *not* a person's words when it is empty, when it is capcli's own (equal to the ``capcli:caption``
stored in the same file), or when it is what a camera writes into ``ImageDescription`` by itself
(``OLYMPUS DIGITAL CAMERA``, ``SONY DSC``, blanks): only its maker's name, model and words like "digital camera".
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAMESPACE = "http://ns.capcli.org/xmp/1.0/"
PREFIX = "capcli"
OURS = f"Xmp.{PREFIX}.caption"
EXIF_DESCRIPTION = "Exif.Image.ImageDescription"
IPTC_CAPTION = "Iptc.Application2.Caption"
XMP_DESCRIPTION, XMP_ALT_TEXT = "Xmp.dc.description", "Xmp.iptc.AltTextAccessibility"
# key -> what a person knows it as (exiftool's names), in the MWG order of preference
FIELDS = {EXIF_DESCRIPTION: "EXIF ImageDescription", IPTC_CAPTION: "IPTC Caption-Abstract",
          XMP_DESCRIPTION: "XMP dc:description", XMP_ALT_TEXT: "XMP AltTextAccessibility",
          "Xmp.tiff.ImageDescription": "XMP tiff:ImageDescription"}

# Words a camera puts in ImageDescription on its own, besides its maker's and model's names and codes with digits.
_CAMERA_WORDS = frozenset({"digital", "camera", "cameras", "dsc", "dcim", "image", "images", "img", "picture",
    "photo", "photos", "still", "default", "zoom", "corp", "corporation", "co", "ltd", "inc", "imaging", "optical",
    "company", "electronics", "mobile", "phone", "smartphone"})
_MAKERS = frozenset({"olympus", "sony", "nikon", "canon", "pentax", "samsung", "kodak", "fujifilm", "fuji",
    "minolta", "konica", "panasonic", "lumix", "casio", "ricoh", "sanyo", "lg", "huawei", "apple", "iphone",
    "xiaomi", "leica", "sigma", "hasselblad", "gopro", "dji", "motorola", "htc", "nokia", "oneplus", "google",
    "pixel", "vivo", "oppo", "zte", "hp", "sharp", "mamiya", "asus", "lenovo", "blackberry", "benq", "agfa",
    "polaroid", "vivitar", "praktica", "epson", "creative"})


@dataclass(frozen=True)
class Description:
    """A description a person wrote (or edited): its text, the field and the file it is in."""

    text: str
    field: str  # "EXIF ImageDescription", "XMP dc:description", ...
    file: Path

    def short(self, width: int = 60) -> str:
        return self.text if len(self.text) <= width else self.text[: width - 3] + "..."


@dataclass(frozen=True)
class Metadata:
    """The fields of one file as pyexiv2 reads them (an XMP sidecar has only ``xmp``)."""

    xmp: dict[str, Any]
    iptc: dict[str, Any]
    exif: dict[str, Any]


def texts(value: Any) -> list[str]:
    """The strings of a pyexiv2 value: a lang-alt dict, a bag or sequence list, or one string."""
    if isinstance(value, dict):
        return [str(v) for v in value.values()]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)] if value else []


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def is_camera_text(text: str, make: str = "", model: str = "") -> bool:
    """Whether ``text`` is what a camera writes into ``ImageDescription`` by itself, not a person's description:
    blank, or only its maker's and model's names, generic words ("digital camera", "DSC") and codes with digits."""
    known = _CAMERA_WORDS | _MAKERS | set(_words(make)) | set(_words(model))
    return all(w in known or any(c.isdigit() for c in w) for w in _words(text))


def persons_description(meta: Metadata, file: Path) -> Description | None:
    """The first description in ``meta`` (the fields of ``file``) that a person wrote, or None."""
    ours = texts(meta.xmp.get(OURS))
    make, model = str(meta.exif.get("Exif.Image.Make", "")), str(meta.exif.get("Exif.Image.Model", ""))
    for key, name in FIELDS.items():
        where = meta.exif if key.startswith("Exif.") else meta.iptc if key.startswith("Iptc.") else meta.xmp
        for text in texts(where.get(key)):
            text = text.strip("\x00 \t\r\n")
            if text and text not in ours and not is_camera_text(text, make, model):
                return Description(text, name, file)
    return None


def read(path: Path, pyexiv2: Any, sidecar: bool = False) -> Metadata:
    """The fields of ``path`` (a photo, or with ``sidecar`` an XMP sidecar: XMP only). Raises ``RuntimeError``
    (exiv2 cannot read it) or ``OSError``."""
    with open_image(path, pyexiv2) as img:
        if sidecar:
            return Metadata(img.read_xmp(), {}, {})
        return Metadata(img.read_xmp(), img.read_iptc(), img.read_exif())


def open_image(path: Path, pyexiv2: Any) -> Any:
    """``pyexiv2.Image`` of ``path``, by its exact bytes (``os.fsencode``): a name that is not UTF-8 (its bytes held
    as surrogates) is passed as Latin-1 text with ``encoding="latin-1"``, which encodes back to the same bytes."""
    return pyexiv2.Image(os.fsencode(path).decode("latin-1"), encoding="latin-1")


def find(files: Iterable[tuple[Path, bool]], pyexiv2: Any) -> Description | None:
    """A person's description in the first of ``files`` (path, is a sidecar) that holds one; a file that does not
    exist or that exiv2 cannot read holds none (callers check the file they write themselves)."""
    for path, sidecar in files:
        try:
            meta = read(path, pyexiv2, sidecar)
        except (RuntimeError, OSError):
            continue
        found = persons_description(meta, path)
        if found is not None:
            return found
    return None
