"""Captions where photo tools read them: XMP sidecars, embedded XMP, and ``.txt`` sidecars.

What is written (XMP, through exiv2 via ``pyexiv2``; exiftool reads the same fields):

- ``dc:description`` (x-default) and ``Iptc4xmpCore:AltTextAccessibility`` (IPTC Photo Metadata 2021): the caption;
- ``dc:subject``: the grounding labels as keywords (a person's keywords are kept; capcli's from a previous run are
  replaced);
- ``capcli:caption``, ``capcli:labels``, ``capcli:tool``, ``capcli:version``, ``capcli:model`` (namespace
  :data:`NAMESPACE`): exactly what capcli wrote, and which tool, version and model wrote it;
- ``xmp:MetadataDate``: now (the XMP rule for "metadata changed"; Lightroom compares it to resync).
  ``xmp:CreatorTool`` is left alone: it names the tool that made the image, not its caption.

Whose words? A caption field (``dc:description`` in any language, ``AltTextAccessibility``, and for the photo itself
IPTC ``Caption-Abstract``) whose text differs from the ``capcli:caption`` stored beside it was written, or edited,
by a person: the file is skipped unless ``overwrite``. Text equal to ``capcli:caption`` is capcli's own and is
replaced on a rerun. For an XMP sidecar the photo's embedded fields count too (tools that prefer the sidecar would
otherwise hide the person's text). EXIF ``ImageDescription`` is not looked at: cameras fill it with their name.

``.txt`` sidecars (LoRA datasets: ``name.txt`` beside ``name.jpg``) carry no metadata, so capcli keeps a record of
what it wrote: ``.capcli-txt.json`` in each folder maps each .txt name to the SHA-256 of the text capcli wrote. An
existing .txt is capcli's (replaced) when its SHA-256 is the recorded one, or it already holds the new caption;
anything else, including a .txt with no record, is a person's words (skipped unless ``overwrite``).

Embedding changes only metadata, and atomically: the photo is copied to a temporary file in its folder, exiv2
writes there, the copy is read back (fields, and the image data: the JPEG bytes from the first SOS to the end of
the file, or the decoded pixels for other formats, must equal the original's), fsynced, and ``os.replace`` puts it
in place (``atomic.atomic_path(durable=True)``).
RAW files are never written into (use an XMP sidecar), nor read-only files or types exiv2 cannot write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from . import __version__, atomic
from .errors import UsageError, os_reason
from .images import RAW_EXTENSIONS as RAW_TYPES

NAMESPACE = "http://ns.capcli.org/xmp/1.0/"
PREFIX = "capcli"
TXT_RECORD = ".capcli-txt.json"
EMBED_TYPES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff"})
SIDECAR_KINDS = ("xmp", "txt")
SIDECAR_NAMINGS = ("stem", "ext")  # Lightroom: name.xmp; darktable: name.jpg.xmp
EMPTY_PACKET = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/">'
                '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/></x:xmpmeta>\n<?xpacket end="w"?>\n')

_DESC, _ALT, _SUBJECT = "Xmp.dc.description", "Xmp.iptc.AltTextAccessibility", "Xmp.dc.subject"
_OURS, _LABELS = f"Xmp.{PREFIX}.caption", f"Xmp.{PREFIX}.labels"
_IPTC_CAPTION = "Iptc.Application2.Caption"
_X_DEFAULT = 'lang="x-default"'


class Status(StrEnum):
    WRITTEN = "written"
    SKIPPED = "skipped"  # a person's words are there (and no overwrite)
    FAILED = "failed"
    WOULD_WRITE = "would-write"  # dry run


@dataclass(frozen=True)
class Provenance:
    """Which tool, version and model wrote a caption."""

    model: str
    tool: str = "capcli"
    version: str = __version__


@dataclass(frozen=True)
class Fields:
    """The caption fields capcli writes (or reads back) for one photo."""

    caption: str
    keywords: tuple[str, ...] = ()  # capcli's keywords (grounding labels), most likely first
    provenance: Provenance | None = None


@dataclass(frozen=True)
class PublishResult:
    """What happened to one photo: written, skipped, failed (with the reason) or would be written (dry run)."""

    photo: Path
    target: Path  # the file written (or that would be): the photo itself, its .xmp or its .txt
    status: Status
    reason: str = ""
    fields: Fields | None = None

    def describe(self) -> str:
        """One line for a report, e.g. ``would write a.xmp: "a cat on a sofa"``."""
        what = f'"{self.fields.caption}"' if self.fields else ""
        if self.status in (Status.WRITTEN, Status.WOULD_WRITE):
            verb = "wrote" if self.status is Status.WRITTEN else "would write"
            return f"{verb} {self.target}: {what}"
        return f"{self.status.value} {self.photo}: {self.reason}"


@dataclass(frozen=True)
class PublishOptions:
    provenance: Provenance
    overwrite: bool = False  # replace a person's words too
    dry_run: bool = False
    naming: str = "stem"  # XMP sidecar name: "stem" (name.xmp) or "ext" (name.jpg.xmp)


class _Refused(Exception):
    """This photo cannot be written; the message is the per-file reason."""


# ------------------------------------------------------------------------------------------- records -> fields
def record_fields(record: dict[str, Any], provenance: Provenance) -> Fields | None:
    """The fields for a caption record (``{"caption", ["labels": [{"word", "p"}]]}``); None if it has no caption."""
    caption = (record.get("caption") or "").strip()
    if not caption or record.get("error"):
        return None
    words: list[str] = []
    for label in record.get("labels") or []:
        word = str(label["word"]).strip()
        if word and word not in words:
            words.append(word)
    return Fields(caption, tuple(words), provenance)


# ------------------------------------------------------------------------------------------- exiv2 access
_registered = False


def _exiv2() -> Any:
    """pyexiv2, imported on first use, with capcli's namespace registered and exiv2's console chatter off."""
    global _registered
    import pyexiv2

    if not _registered:
        pyexiv2.set_log_level(4)  # mute: errors come back as exceptions
        pyexiv2.registerNs(NAMESPACE, PREFIX)
        _registered = True
    return pyexiv2


@dataclass
class _Existing:
    xmp: dict[str, Any] = field(default_factory=dict)
    iptc: dict[str, Any] = field(default_factory=dict)


def _open(path: Path) -> Any:
    """``pyexiv2.Image`` of ``path`` opened by its exact bytes (``os.fsencode``).

    ``pyexiv2.Image(name)`` encodes the name as strict UTF-8, which fails on a name that is not valid UTF-8 (its
    bytes are held as surrogates); its extension module takes the bytes, so it is given them directly.
    """
    pyexiv2 = _exiv2()
    from pyexiv2.lib import exiv2api

    img = pyexiv2.Image.__new__(pyexiv2.Image)
    img._exiv2api_image = exiv2api.Image(os.fsencode(path))  # what Image.__init__ sets (pyexiv2 2.15, 2.16)
    return img


def _read(path: Path, iptc: bool = True) -> _Existing:
    with _open(path) as img:
        return _Existing(img.read_xmp(), img.read_iptc() if iptc else {})


def _texts(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [str(v) for v in value.values()]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)] if value else []


def persons_text(existing: _Existing) -> str | None:
    """A caption a person wrote (or edited) in these fields, or None if all are empty or capcli's own."""
    ours = existing.xmp.get(_OURS)
    values = [existing.xmp.get(_DESC), existing.xmp.get(_ALT), existing.iptc.get(_IPTC_CAPTION)]
    for text in (t for v in values for t in _texts(v)):
        if text.strip() and text != ours:
            return text
    return None


def read_fields(path: str | Path) -> Fields | None:
    """The caption fields capcli wrote into a photo or an XMP sidecar, or None if it holds none."""
    xmp = _read(Path(path), iptc=False).xmp
    if _OURS not in xmp:
        return None
    p = {k: str(xmp.get(f"Xmp.{PREFIX}.{k}", "")) for k in ("model", "tool", "version")}
    return Fields(str(xmp[_OURS]), tuple(_texts(xmp.get(_LABELS))), Provenance(**p))


def _xmp_changes(fields: Fields, existing: dict[str, Any]) -> dict[str, Any]:
    """The pyexiv2 ``modify_xmp`` dict: capcli's fields, keeping a person's keywords and dropping capcli's old ones."""
    old_ours = set(_texts(existing.get(_LABELS)))
    kept = [k for k in _texts(existing.get(_SUBJECT)) if k not in old_ours]
    subject = kept + [k for k in fields.keywords if k not in kept]
    prov = fields.provenance or Provenance(model="")
    return {
        _DESC: {_X_DEFAULT: fields.caption},
        _ALT: {_X_DEFAULT: fields.caption},
        _SUBJECT: subject or None,  # None deletes the (now empty) bag
        _OURS: fields.caption,
        _LABELS: list(fields.keywords) or None,
        f"Xmp.{PREFIX}.tool": prov.tool,
        f"Xmp.{PREFIX}.version": prov.version,
        f"Xmp.{PREFIX}.model": prov.model,
        "Xmp.xmp.MetadataDate": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_xmp(path: Path, fields: Fields) -> None:
    """Write ``fields`` into ``path`` (a photo or sidecar) in place, then read them back."""
    with _open(path) as img:
        img.modify_xmp(_xmp_changes(fields, img.read_xmp()))
    back = read_fields(path)
    if back is None or back.caption != fields.caption or back.keywords != fields.keywords:
        raise _Refused("the fields read back differ from those written")


# ------------------------------------------------------------------------------------------- checks
def _check_writable(path: Path) -> None:
    """Refuse a file with no write permission bits, even for root (who may write anything)."""
    st = path.stat()
    if not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK):
        raise _Refused("read-only file")


def _check_name(target: Path, hint: str = "") -> None:
    """Refuse a sidecar whose name is too long for its folder's file system (a photo's name can be near the limit)."""
    try:
        atomic.check_name(target)
    except OSError as e:
        raise _Refused(f"cannot write {target.name}: {os_reason(e)}{hint}") from None


def _check_embeddable(photo: Path) -> None:
    ext = photo.suffix.lower()
    if ext in RAW_TYPES:
        raise _Refused(f"RAW file ({ext}): capcli never writes into RAW originals; use --sidecar xmp")
    if ext not in EMBED_TYPES:
        raise _Refused(f"cannot embed metadata in {ext or 'extension-less'} files "
                       f"(only {', '.join(sorted(EMBED_TYPES))}); use --sidecar xmp")
    if not photo.is_file():
        raise _Refused("no such file")
    _check_writable(photo)


def _sos_offset(data: bytes) -> int:
    """Where a JPEG's first SOS marker is: the compressed image starts there (the segments before are metadata)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError("corrupt JPEG marker sequence")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:
            return i
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2: i + 4], "big")
    raise ValueError("no SOS marker")


def image_data_digest(path: str | Path) -> str:
    """SHA-256 of what metadata edits must not change: a JPEG's bytes from its first SOS to the end of the file
    (the scan, and whatever follows EOI: a motion photo's video, MPF images), else the decoded pixels of every frame.
    """
    data = Path(path).read_bytes()
    if data[:2] == b"\xff\xd8":
        return hashlib.sha256(data[_sos_offset(data):]).hexdigest()
    from PIL import Image, ImageSequence

    h = hashlib.sha256()
    with Image.open(path) as im:
        for frame in ImageSequence.Iterator(im):
            h.update(f"{frame.mode} {frame.size}".encode())
            h.update(frame.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- one photo
def sidecar_path(photo: str | Path, kind: str = "xmp", naming: str = "stem") -> Path:
    """Where a photo's sidecar goes: ``name.xmp`` (Lightroom) or ``name.jpg.xmp`` (darktable); ``name.txt``."""
    photo = Path(photo)
    if kind == "txt":
        return photo.with_suffix(".txt")
    if naming not in SIDECAR_NAMINGS:
        raise UsageError(f"sidecar names are {' or '.join(SIDECAR_NAMINGS)}, not {naming!r}")
    return photo.with_name(photo.name + ".xmp") if naming == "ext" else photo.with_suffix(".xmp")


def _skipped(photo: Path, target: Path, fields: Fields, person: str | None, overwrite: bool) -> PublishResult | None:
    """The result for a photo whose caption fields hold a person's text (and no overwrite), else None."""
    if person is None or overwrite:
        return None
    short = person if len(person) <= 60 else person[:57] + "..."
    return PublishResult(photo, target, Status.SKIPPED, f'keeps a description a person wrote: "{short}" '
                         "(--overwrite replaces it)", fields)


def embed(photo: str | Path, fields: Fields, opts: PublishOptions) -> PublishResult:
    """Write ``fields`` into the photo's own XMP, atomically and losslessly (see the module doc)."""
    photo = Path(photo)
    target = photo.resolve() if photo.is_symlink() else photo  # write the file a link points to, keep the link
    try:
        _check_embeddable(target)
        try:
            existing = _read(target)
        except (RuntimeError, OSError) as e:
            raise _Refused(f"cannot read its metadata ({_short(e)})") from e
        skipped = _skipped(photo, target, fields, persons_text(existing), opts.overwrite)
        if skipped is not None:
            return skipped
        if opts.dry_run:
            return PublishResult(photo, target, Status.WOULD_WRITE, "", fields)
        before = image_data_digest(target)
        with atomic.atomic_path(target, durable=True) as tmp:
            shutil.copy2(target, tmp)  # keeps permissions and times
            _write_xmp(tmp, fields)
            if image_data_digest(tmp) != before:
                raise _Refused("exiv2 changed the image data; the photo was left as it was")
    except _Refused as e:
        return PublishResult(photo, target, Status.FAILED, str(e), fields)
    except (RuntimeError, OSError, ValueError) as e:
        return PublishResult(photo, target, Status.FAILED, f"cannot write its metadata ({_short(e)})", fields)
    return PublishResult(photo, target, Status.WRITTEN, "", fields)


def write_xmp_sidecar(photo: str | Path, fields: Fields, opts: PublishOptions) -> PublishResult:
    """Write ``fields`` into the photo's XMP sidecar, created or updated (its other fields kept), atomically."""
    photo = Path(photo)
    target = sidecar_path(photo, "xmp", opts.naming)
    try:
        _check_name(target, "; --sidecar-name stem gives a shorter one" if opts.naming == "ext" else "")
        person = None
        if target.exists():
            try:
                person = persons_text(_read(target, iptc=False))
            except (RuntimeError, OSError) as e:
                raise _Refused(f"cannot read the sidecar {target.name} ({_short(e)})") from e
        if person is None:
            with contextlib.suppress(RuntimeError, OSError):  # a photo exiv2 cannot read has no fields to protect
                person = persons_text(_read(photo))
        skipped = _skipped(photo, target, fields, person, opts.overwrite)
        if skipped is not None:
            return skipped
        if target.exists():
            _check_writable(target)
        if opts.dry_run:
            return PublishResult(photo, target, Status.WOULD_WRITE, "", fields)
        with atomic.atomic_path(target, durable=True) as tmp:
            if target.exists():
                shutil.copy2(target, tmp)
            else:
                tmp.write_text(EMPTY_PACKET, encoding="utf-8")
            _write_xmp(tmp, fields)
    except _Refused as e:
        return PublishResult(photo, target, Status.FAILED, str(e), fields)
    except (RuntimeError, OSError, ValueError) as e:
        return PublishResult(photo, target, Status.FAILED, f"cannot write {target.name} ({_short(e)})", fields)
    return PublishResult(photo, target, Status.WRITTEN, "", fields)


def _short(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[-1]


# ------------------------------------------------------------------------------------------- .txt sidecars
def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _txt_text(caption: str) -> str:
    return caption + "\n"


class TxtRecord:
    """``.capcli-txt.json`` of one folder: the SHA-256 of each .txt capcli wrote there."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / TXT_RECORD
        self.hashes: dict[str, str] = {}
        self.changed = False
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.hashes = {str(k): str(v) for k, v in json.loads(self.path.read_text("utf-8"))["files"].items()}

    def is_ours(self, target: Path, new_text: str) -> bool | None:
        """True if ``target`` holds what capcli wrote (or the new text), False if a person's, None if absent."""
        try:
            current = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return False
        return current == new_text or self.hashes.get(target.name) == _sha256(current)

    def record(self, target: Path, text: str) -> None:
        self.hashes[target.name] = _sha256(text)
        self.changed = True

    def save(self) -> None:
        if self.changed:
            atomic.write_json(self.path, {"version": 1, "files": dict(sorted(self.hashes.items()))})


def write_txt_sidecar(photo: str | Path, fields: Fields, opts: PublishOptions, record: TxtRecord) -> PublishResult:
    """Write the caption to ``name.txt`` beside the photo unless a person wrote that file (see the module doc)."""
    photo = Path(photo)
    target = sidecar_path(photo, "txt")
    text = _txt_text(fields.caption)
    try:
        _check_name(target)
        ours = record.is_ours(target, text)
        person = None if ours in (None, True) else target.read_text(encoding="utf-8", errors="replace").strip()
        skipped = _skipped(photo, target, fields, person, opts.overwrite)
        if skipped is not None:
            return skipped
        if ours is not None:
            _check_writable(target)
        if opts.dry_run:
            return PublishResult(photo, target, Status.WOULD_WRITE, "", fields)
        atomic.write_text(target, text)
        record.record(target, text)
    except _Refused as e:
        return PublishResult(photo, target, Status.FAILED, str(e), fields)
    except OSError as e:
        return PublishResult(photo, target, Status.FAILED, f"cannot write {target.name} ({_short(e)})", fields)
    return PublishResult(photo, target, Status.WRITTEN, "", fields)


# ------------------------------------------------------------------------------------------- many photos
def publish(items: Sequence[tuple[Path, dict[str, Any]]], how: str, opts: PublishOptions) -> list[PublishResult]:
    """Publish caption records: ``how`` is ``"xmp"``, ``"txt"`` (sidecars) or ``"embed"``; one result per item.

    ``items`` pairs each photo's path with its record (as ``capcli caption`` writes them). A record without a
    caption (it failed), a photo listed twice and a photo whose sidecar another photo of the batch already takes
    (``a.jpg`` and ``a.png`` both want ``a.xmp``) fail; every other photo is tried whatever happened to the rest.
    """
    if how not in ("xmp", "txt", "embed"):
        raise UsageError(f"publish as xmp, txt or embed, not {how!r}")
    if opts.naming not in SIDECAR_NAMINGS:
        raise UsageError(f"sidecar names are {' or '.join(SIDECAR_NAMINGS)}, not {opts.naming!r}")
    results: list[PublishResult] = []
    claimed: dict[Path, Path] = {}  # target -> the photo that writes it
    with _txt_records() as records:
        for photo, rec in items:
            photo = Path(photo)
            fields = record_fields(rec, opts.provenance)
            target = photo if how == "embed" else sidecar_path(photo, how, opts.naming)
            if fields is None:
                why = rec.get("error") or "no caption"
                results.append(PublishResult(photo, target, Status.FAILED, f"not captioned: {why}"))
            elif target.resolve() in claimed:
                results.append(PublishResult(photo, target, Status.FAILED,
                                             _clash(how, target, claimed[target.resolve()], photo)))
            else:
                claimed[target.resolve()] = photo
                if how == "embed":
                    results.append(embed(photo, fields, opts))
                elif how == "xmp":
                    results.append(write_xmp_sidecar(photo, fields, opts))
                else:
                    results.append(write_txt_sidecar(photo, fields, opts, records(photo.parent)))
    return results


def _clash(how: str, target: Path, first: Path, photo: Path) -> str:
    if first.resolve() == photo.resolve():
        return "listed twice"
    hint = "; use --sidecar-name ext" if how == "xmp" else ""
    return f"{target.name} is already the sidecar of {first.name}{hint}"


@contextlib.contextmanager
def _txt_records() -> Iterator[Any]:
    """A ``folder -> TxtRecord`` getter; every record changed is saved at the end, also after a failure."""
    opened: dict[Path, TxtRecord] = {}

    def get(folder: Path) -> TxtRecord:
        key = folder.resolve()
        if key not in opened:
            opened[key] = TxtRecord(folder)
        return opened[key]

    try:
        yield get
    finally:
        for rec in opened.values():
            rec.save()


def counts(results: Sequence[PublishResult]) -> dict[str, int]:
    """How many results of each status, e.g. ``{"written": 4, "skipped": 1, "failed": 1, "would-write": 0}``."""
    return {s.value: sum(r.status is s for r in results) for s in Status}
