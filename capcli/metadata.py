"""Captions where photo tools read them: XMP sidecars, embedded XMP, and ``.txt`` sidecars.

What is written (XMP, through exiv2 via ``pyexiv2``; exiftool reads the same fields):

- ``dc:description`` (x-default) and ``Iptc4xmpCore:AltTextAccessibility`` (IPTC Photo Metadata 2021): the caption;
- ``dc:subject``: the grounding labels as keywords (a person's keywords are kept; capcli's from a previous run are
  replaced);
- ``capcli:caption``, ``capcli:labels``, ``capcli:tool``, ``capcli:version``, ``capcli:model`` (namespace
  :data:`NAMESPACE`): exactly what capcli wrote, and which tool, version and model wrote it;
- ``xmp:MetadataDate``: now (the XMP rule for "metadata changed"; Lightroom compares it to resync).
  ``xmp:CreatorTool`` is left alone: it names the tool that made the image, not its caption.

Whose words? Every description field a photo tool shows (XMP ``dc:description`` and ``AltTextAccessibility``, IPTC
``Caption-Abstract``, EXIF ``ImageDescription``), in the photo or in its XMP sidecars, whose text differs from the
``capcli:caption`` stored beside it was written, or edited, by a person (:mod:`capcli.descriptions`): the photo
is skipped, whichever way it is delivered (embedded, XMP or .txt sidecar), unless ``overwrite``. Text equal to
``capcli:caption`` is capcli's own and is replaced on a rerun. Embedding also replaces the photo's EXIF
``ImageDescription`` and IPTC ``Caption-Abstract`` where it has them (a camera's name, capcli's earlier caption),
so that tools following the MWG rules, which prefer those, show the same caption.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from . import __version__, atomic, descriptions, shots
from .descriptions import EXIF_DESCRIPTION, IPTC_CAPTION, NAMESPACE, PREFIX, Description, Metadata, texts
from .errors import UsageError, os_reason
from .images import RAW_EXTENSIONS as RAW_TYPES
from .lossless import image_data_digest
from .lossless import sos_offset as _sos_offset  # noqa: F401 - the tests use it from here

TXT_RECORD = ".capcli-txt.json"
EMBED_TYPES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff"})
SIDECAR_KINDS = ("xmp", "txt")
SIDECAR_NAMINGS = ("stem", "ext")  # Lightroom: name.xmp; darktable: name.jpg.xmp
EMPTY_PACKET = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/">'
                '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/></x:xmpmeta>\n<?xpacket end="w"?>\n')

_DESC, _ALT, _SUBJECT = descriptions.XMP_DESCRIPTION, descriptions.XMP_ALT_TEXT, "Xmp.dc.subject"
_OURS, _LABELS = descriptions.OURS, f"Xmp.{PREFIX}.labels"
_X_DEFAULT = 'lang="x-default"'


class Status(StrEnum):
    WRITTEN = "written"
    SKIPPED = "skipped"  # a person's words are there (and no overwrite)
    FAILED = "failed"
    WOULD_WRITE = "would-write"  # dry run


@dataclass(frozen=True)
class WrittenBy:
    """Which tool, version and model wrote a caption into a photo or sidecar (its XMP fields; a caption record's
    own provenance is :class:`capcli.provenance.Provenance`)."""

    model: str
    tool: str = "capcli"
    version: str = __version__


@dataclass(frozen=True)
class Fields:
    """The caption fields capcli writes (or reads back) for one photo."""

    caption: str
    keywords: tuple[str, ...] = ()  # capcli's keywords (grounding labels), most likely first
    provenance: WrittenBy | None = None


@dataclass(frozen=True)
class PublishResult:
    """What happened to one photo: written, skipped, failed (with the reason) or would be written (dry run)."""

    photo: Path
    target: Path  # the file written (or that would be): the photo itself, its .xmp or its .txt
    status: Status
    reason: str = ""
    fields: Fields | None = None
    unembeddable: bool = False  # FAILED as embed because of the file's type (RAW, HEIC): an XMP sidecar is the way

    def describe(self) -> str:
        """One line for a report, e.g. ``would write a.xmp: "a cat on a sofa"``."""
        what = f'"{self.fields.caption}"' if self.fields else ""
        if self.status in (Status.WRITTEN, Status.WOULD_WRITE):
            verb = "wrote" if self.status is Status.WRITTEN else "would write"
            return f"{verb} {self.target}: {what}"
        return f"{self.status.value} {self.photo}: {self.reason}"


@dataclass(frozen=True)
class PublishOptions:
    provenance: WrittenBy
    overwrite: bool = False  # replace a person's words too
    dry_run: bool = False
    naming: str = "stem"  # XMP sidecar name: "stem" (name.xmp) or "ext" (name.jpg.xmp)


class _Refused(Exception):
    """This photo cannot be written; the message is the per-file reason."""


class _Unembeddable(_Refused):
    """The photo's type cannot hold an embedded caption (RAW, HEIC, ...)."""


# ------------------------------------------------------------------------------------------- records -> fields
def record_fields(record: dict[str, Any], provenance: WrittenBy) -> Fields | None:
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


def _open(path: Path) -> Any:
    return descriptions.open_image(path, _exiv2())


def _read(path: Path, sidecar: bool = False) -> Metadata:
    return descriptions.read(path, _exiv2(), sidecar)


def xmp_sidecars(photo: str | Path) -> list[Path]:
    """Where a photo tool looks for the photo's XMP sidecar: ``name.xmp`` and ``name.jpg.xmp``."""
    return [sidecar_path(photo, "xmp", naming) for naming in SIDECAR_NAMINGS]


def persons_description(photo: str | Path, besides: Path | None = None, photo_too: bool = True) -> Description | None:
    """A description a person wrote in ``photo`` (unless not ``photo_too``) or in its XMP sidecars (``besides``:
    one not to read, the caller has), or None. A file exiv2 cannot read holds none; so does a sidecar name too
    long to exist."""
    photo = Path(photo)
    files = [(photo, False)] if photo_too else []
    files += [(s, True) for s in xmp_sidecars(photo) if s != besides and os.path.isfile(s)]
    return descriptions.find(files, _exiv2())


def read_fields(path: str | Path) -> Fields | None:
    """The caption fields capcli wrote into a photo or an XMP sidecar, or None if it holds none."""
    xmp = _read(Path(path), sidecar=True).xmp
    if _OURS not in xmp:
        return None
    p = {k: str(xmp.get(f"Xmp.{PREFIX}.{k}", "")) for k in ("model", "tool", "version")}
    return Fields(str(xmp[_OURS]), tuple(texts(xmp.get(_LABELS))), WrittenBy(**p))


def _xmp_changes(fields: Fields, existing: dict[str, Any]) -> dict[str, Any]:
    """The pyexiv2 ``modify_xmp`` dict: capcli's fields, keeping a person's keywords and dropping capcli's old ones."""
    old_ours = set(texts(existing.get(_LABELS)))
    kept = [k for k in texts(existing.get(_SUBJECT)) if k not in old_ours]
    subject = kept + [k for k in fields.keywords if k not in kept]
    prov = fields.provenance or WrittenBy(model="")
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


def _write_xmp(path: Path, fields: Fields, photo: bool = False) -> None:
    """Write ``fields`` into ``path`` (a sidecar, or with ``photo`` a photo, whose EXIF and IPTC descriptions
    are replaced too where there are some: see the module doc) in place, then read them back."""
    with _open(path) as img:
        img.modify_xmp(_xmp_changes(fields, img.read_xmp()))
        if photo and img.read_exif().get(EXIF_DESCRIPTION) is not None:
            img.modify_exif({EXIF_DESCRIPTION: fields.caption})
        if photo and img.read_iptc().get(IPTC_CAPTION) is not None:
            img.modify_iptc({IPTC_CAPTION: fields.caption})
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
        raise _Unembeddable(f"RAW file ({ext}): capcli never writes into RAW originals; use --sidecar xmp")
    if ext not in EMBED_TYPES:
        raise _Unembeddable(f"cannot embed metadata in {ext or 'extension-less'} files "
                       f"(only {', '.join(sorted(EMBED_TYPES))}); use --sidecar xmp")
    if not photo.is_file():
        raise _Refused("no such file")
    _check_writable(photo)


# ------------------------------------------------------------------------------------------- one photo
def sidecar_path(photo: str | Path, kind: str = "xmp", naming: str = "stem") -> Path:
    """Where a photo's sidecar goes: ``name.xmp`` (Lightroom) or ``name.jpg.xmp`` (darktable); ``name.txt``."""
    photo = Path(photo)
    if kind == "txt":
        return photo.with_suffix(".txt")
    if naming not in SIDECAR_NAMINGS:
        raise UsageError(f"sidecar names are {' or '.join(SIDECAR_NAMINGS)}, not {naming!r}")
    return photo.with_name(photo.name + ".xmp") if naming == "ext" else photo.with_suffix(".xmp")


def _skipped(photo: Path, target: Path, fields: Fields, person: Description | None,
             overwrite: bool) -> PublishResult | None:
    """The result for a photo whose description fields hold a person's text (and no overwrite), else None."""
    if person is None or overwrite:
        return None
    where = person.field if person.file == target else f"{person.field} of {person.file.name}"
    return PublishResult(photo, target, Status.SKIPPED, f'keeps a description a person wrote: "{person.short()}" '
                         f"({where}; --overwrite replaces it)", fields)


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
        person = descriptions.persons_description(existing, target) or persons_description(photo, photo_too=False)
        skipped = _skipped(photo, target, fields, person, opts.overwrite)
        if skipped is not None:
            return skipped
        if opts.dry_run:
            return PublishResult(photo, target, Status.WOULD_WRITE, "", fields)
        before = image_data_digest(target)
        with atomic.atomic_path(target, durable=True) as tmp:
            shutil.copy2(target, tmp)  # keeps permissions and times
            _write_xmp(tmp, fields, photo=True)
            if image_data_digest(tmp) != before:
                raise _Refused("exiv2 changed the image data; the photo was left as it was")
    except _Refused as e:
        return PublishResult(photo, target, Status.FAILED, str(e), fields, isinstance(e, _Unembeddable))
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
                person = descriptions.persons_description(_read(target, sidecar=True), target)
            except (RuntimeError, OSError) as e:
                raise _Refused(f"cannot read the sidecar {target.name} ({_short(e)})") from e
        person = person or persons_description(photo, besides=target)
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
    _drop_other_sidecar(photo, opts.naming)
    return PublishResult(photo, target, Status.WRITTEN, "", fields)


def _drop_other_sidecar(photo: Path, naming: str) -> None:
    """Remove the photo's XMP sidecar of the other naming (``name.jpg.xmp`` after ``--sidecar-name stem``, and the
    reverse) when capcli alone wrote it: a run with the other naming left it, and it would disagree with the new
    one. A sidecar holding anything else (a person's words or keywords, another tool's fields) is kept."""
    other = sidecar_path(photo, "xmp", "ext" if naming == "stem" else "stem")
    with contextlib.suppress(RuntimeError, OSError):
        if os.path.isfile(other) and _only_ours(_read(other, sidecar=True), other):
            other.unlink()


def _only_ours(meta: Metadata, path: Path) -> bool:
    """Whether XMP ``meta`` (of sidecar ``path``) holds only fields capcli wrote, with capcli's own values."""
    if _OURS not in meta.xmp or descriptions.persons_description(meta, path) is not None:
        return False
    own_keywords = set(texts(meta.xmp.get(_SUBJECT))) <= set(texts(meta.xmp.get(_LABELS)))
    return own_keywords and set(meta.xmp) <= set(_xmp_changes(Fields(""), {}))


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
        person = None
        if ours is False:
            person = Description(target.read_text(encoding="utf-8", errors="replace").strip(), "the .txt", target)
        person = person or persons_description(photo)
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
    A RAW+JPEG pair is one shot (:mod:`capcli.shots`): the JPEG's record is published for both.
    """
    if how not in ("xmp", "txt", "embed"):
        raise UsageError(f"publish as xmp, txt or embed, not {how!r}")
    if opts.naming not in SIDECAR_NAMINGS:
        raise UsageError(f"sidecar names are {' or '.join(SIDECAR_NAMINGS)}, not {opts.naming!r}")
    results: list[PublishResult] = []
    claimed: dict[Path, Path] = {}  # target -> the photo that writes it
    with _txt_records() as records:
        for photo, rec in shots.one_per_shot(items, how, opts.naming):
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


def covered_by_sidecars(results: Sequence[PublishResult]) -> list[PublishResult]:
    """``results`` without the embeds that failed for the photo's type (RAW, HEIC) where the photo's XMP sidecar
    did not fail: the sidecar is how such a photo carries its caption, so it is not a failure."""
    covered = {r.photo for r in results if r.target.suffix == ".xmp" and r.status is not Status.FAILED}
    return [r for r in results if not (r.unembeddable and r.photo in covered)]


def counts(results: Sequence[PublishResult]) -> dict[str, int]:
    """How many results of each status, e.g. ``{"written": 4, "skipped": 1, "failed": 1, "would-write": 0}``."""
    return {s.value: sum(r.status is s for r in results) for s in Status}
