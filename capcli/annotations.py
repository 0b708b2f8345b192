"""The captioning dataset formats that :func:`capcli.prepare.prepare` reads, one reader per kind of source.

Kinds of source:

- ``coco``: COCO captions annotation files (``captions_train2014.json`` style), read with pycocotools;
  optionally a Karpathy split file (``dataset_coco.json``) that decides train/val/test/restval.
- ``karpathy``: a Karpathy split file alone (``dataset_flickr8k.json`` / ``dataset_coco.json`` shape),
  whose ``sentences`` carry the captions.
- ``flickr8k``: ``Flickr8k.token.txt`` with ``Flickr_8k.{train,dev,test}Images.txt``.
- ``csv``: ``image,caption`` rows (optionally a ``split`` column) with a folder of images.
- ``coco-splits``: a COCO captions file plus a JSON mapping split name -> file names
  (the layout of ``shared/data/flickr8k``).

Each reader returns the image folder and one :data:`Entry` per listed image, and notes in the
:class:`PrepareReport` what it skipped; :func:`detect_kind` tells the kind of a path. Checking that the images
exist and writing the layout is :mod:`capcli.prepare`'s part.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DatasetError

_SPLIT_ALIASES = {"train": "train", "val": "val", "dev": "val", "valid": "val", "validation": "val",
                  "test": "test", "restval": "restval"}


@dataclass
class PrepareReport:
    """What prepare kept and skipped, for the CLI to print."""

    kind: str
    out: Path | None = None
    images: int = 0
    captions: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    listed: int = 0  # images the source lists, before missing files and empty captions are skipped
    missing_images: int = 0
    empty_captions: int = 0
    images_without_captions: int = 0
    unlisted_images: int = 0  # captioned images that no split list names (coco-splits: skipped)
    unknown_listed: int = 0  # file names in split lists that the captions file does not have: skipped
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # said through Progress.warn once the dataset is kept


# ---- readers: each returns (image_root, list of (file, split, captions)) --------------------------

Entry = tuple[str, str, list[str], int | None]  # file, split, captions, source id


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: malformed JSON ({e})") from e
    except OSError as e:  # a folder, no permission
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e


def _load_coco(path: Path):
    """Load a COCO captions file with pycocotools, turning its failures into DatasetError."""
    from pycocotools.coco import COCO

    doc = _read_json(path)
    if _looks_coco(doc) and "annotations" not in doc:
        raise DatasetError(f"{path}: a COCO captions file without its 'annotations' (the captions)")
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise DatasetError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    coco = COCO()
    try:
        coco.dataset = doc
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except KeyError as e:
        raise DatasetError(f"{path}: malformed COCO file (missing {e})") from e
    except TypeError as e:
        raise DatasetError(f"{path}: malformed COCO file ({e})") from e
    ids = Counter(img["id"] for img in doc["images"])
    dup = next((i for i, n in ids.items() if n > 1), None)
    if dup is not None:
        raise DatasetError(f"{path}: duplicate image id {dup}")
    for img in doc["images"]:
        if not isinstance(img.get("file_name"), str):
            raise DatasetError(f"{path}: image {img['id']} has no 'file_name'")
    for ann in doc["annotations"]:
        if not isinstance(ann.get("caption", ""), str | None):
            raise DatasetError(f"{path}: annotation {ann.get('id')} has a caption that is not text")
    return coco


def _looks_coco(doc: object) -> bool:
    """Whether ``doc`` has COCO's ``images`` (``file_name`` and ``id``), whatever else it lacks."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not doc["images"]:
        return False
    first = doc["images"][0]
    return isinstance(first, dict) and "file_name" in first and "id" in first and "filename" not in first


def _coco_entries(coco, split: str, prefix: str = "") -> list[Entry]:
    out = []
    for img_id in sorted(coco.imgs):
        img = coco.imgs[img_id]
        caps = [a.get("caption", "") for a in coco.imgToAnns.get(img_id, [])]
        out.append((prefix + img["file_name"], split, caps, int(img_id)))
    return out


def _split_of_coco_file(path: Path) -> str:
    name = path.name.lower()
    for key, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if key in name:
            return split
    return "train"


def _karpathy_images(path: Path) -> list[dict]:
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DatasetError(f"{path}: not a Karpathy split file (needs an 'images' list)")
    if _looks_coco(doc):
        raise DatasetError(
            f"{path}: a COCO captions file ('file_name' entries), not a Karpathy split file; use --kind coco"
        )
    for img in doc["images"]:
        if not isinstance(img, dict) or "filename" not in img or "split" not in img:
            raise DatasetError(f"{path}: malformed Karpathy entry (needs 'filename' and 'split')")
        sentences = img.get("sentences", [])
        if not isinstance(sentences, list) or not all(isinstance(x, dict) for x in sentences):
            raise DatasetError(f"{path}: image {img['filename']}: 'sentences' must be a list of objects")
    return doc["images"]


def read_coco(annotations: list[Path], images: Path, karpathy: Path | None, report: PrepareReport):
    """COCO annotation files; image files under ``images/<train2014|val2014|...>/`` or ``images/``."""
    entries: list[Entry] = []
    for ann in annotations:
        coco = _load_coco(ann)
        sub = ann.stem.split("_")[-1]  # captions_train2014 -> train2014
        prefix = f"{sub}/" if (images / sub).is_dir() else ""
        entries += _coco_entries(coco, _split_of_coco_file(ann), prefix)
    if karpathy is None:
        report.notes.append("no Karpathy split file: using the official train/val split of the annotation files")
        return images, entries
    by_name = {Path(f).name: (f, caps, i) for f, _, caps, i in entries}
    out: list[Entry] = []
    unknown = 0
    for img in _karpathy_images(karpathy):
        hit = by_name.get(img["filename"])
        if hit is None:
            unknown += 1
            continue
        out.append((hit[0], _norm_split(img["split"], karpathy), hit[1], hit[2]))
    if unknown:
        report.notes.append(f"{unknown} images of the Karpathy split are not in the annotation files: skipped")
    return images, out


def read_karpathy(path: Path, images: Path) -> tuple[Path, list[Entry]]:
    entries = []
    seen: set[int] = set()
    for img in _karpathy_images(path):
        file = f"{img['filepath']}/{img['filename']}" if img.get("filepath") else img["filename"]
        caps = [str(s.get("raw") or " ".join(map(str, s.get("tokens") or []))) for s in img.get("sentences", [])]
        src_id = img.get("cocoid", img.get("imgid"))
        if src_id is not None:
            try:
                src_id = int(src_id)
            except (TypeError, ValueError):
                raise DatasetError(f"{path}: image {file}: id {src_id!r} is not a number") from None
            if src_id in seen:
                raise DatasetError(f"{path}: duplicate image id {src_id} ({file})")
            seen.add(src_id)
        entries.append((file, _norm_split(img["split"], path), caps, src_id))
    return images, entries


def read_flickr8k(folder: Path, images: Path | None, report: PrepareReport) -> tuple[Path, list[Entry]]:
    """Flickr8k's text release: ``Flickr8k.token.txt`` and the three split lists.

    Captioned photos in none of the lists go to restval (the 91 such photos of the release are Flickr8k's restval)
    and a note says so; a photo in two lists is an error, as in a coco-splits file.
    """
    text = _find(folder, "Flickr8k.token.txt")
    if text is None:
        raise DatasetError(f"{folder}: no Flickr8k.token.txt found")
    caps: dict[str, list[str]] = {}
    for n, line in enumerate(_read_text(text).splitlines(), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep or "#" not in key:
            raise DatasetError(f"{text}:{n}: expected 'image.jpg#N<TAB>caption'")
        caps.setdefault(key.rsplit("#", 1)[0], []).append(caption)
    split_of: dict[str, str] = {}
    for split, fname in (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"),
                         ("test", "Flickr_8k.testImages.txt")):
        f = _find(folder, fname)
        if f is None:
            raise DatasetError(f"{folder}: no {fname} found")
        _assign_split(split_of, _read_text(f).split(), split, f)
    if images is None:
        images = _find_dir(folder, ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")) or folder
    entries = [(f, split_of.get(f, "restval"), c, None) for f, c in caps.items()]
    report.unknown_listed = len(split_of.keys() - caps.keys())
    if report.unknown_listed:
        report.warnings.append(f"{report.unknown_listed} file names in the split lists are not in {text}: skipped")
    if any(f not in split_of for f in caps):  # the count is restval's in the summary, after missing files
        report.notes.append("captioned images in none of the three split lists are put in restval")
    return images, entries


def read_csv(path: Path, images: Path | None, report: PrepareReport) -> tuple[Path, list[Entry]]:
    """``image,caption[,split]`` rows; without a split column 5% go to val and 5% to test, by file-name hash."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(fh)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "image" not in cols or "caption" not in cols:
                raise DatasetError(f"{path}: CSV needs a header with 'image' and 'caption' columns")
            rows = [{k.strip().lower(): (v or "") for k, v in r.items() if k is not None} for r in reader]
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: malformed CSV ({e})") from e
    except OSError as e:  # a folder, no permission
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
    has_split = "split" in cols
    if not has_split:
        report.notes.append("no 'split' column: 90% train, 5% val, 5% test by a hash of the file name")
    caps: dict[str, list[str]] = {}
    split_of: dict[str, str] = {}
    for n, row in enumerate(rows, 2):
        image = row["image"].strip()
        if not image:
            raise DatasetError(f"{path}:{n}: empty 'image' value")
        caps.setdefault(image, []).append(row["caption"])
        split = _norm_split(row["split"], path) if has_split and row.get("split") else _hash_split(image)
        split_of[image] = split
    return images or path.parent, [(f, split_of[f], c, None) for f, c in caps.items()]


def read_coco_splits(
    captions: Path, splits: Path, images: Path | None, report: PrepareReport
) -> tuple[Path, list[Entry]]:
    """A COCO captions file plus ``{"train": [file, ...], "val": [...], ...}``.

    Keys that are not split names and hold no list (``"dataset": "flickr8k"``) are ignored. Images the split file
    does not list are skipped with a warning, not put in restval: a split file can name restval itself, and an image
    it leaves out may be held out on purpose (an official test split), which restval would train on.
    """
    coco = _load_coco(captions)
    split_of = _read_split_lists(splits)
    entries = _coco_entries(coco, "")
    kept = [(f, split_of[f], c, i) for f, _, c, i in entries if f in split_of]
    if not kept:
        raise DatasetError(f"{splits}: none of its {len(split_of)} file names are in {captions}")
    report.unlisted_images = len(entries) - len(kept)
    report.unknown_listed = len(split_of.keys() - {f for f, _, _, _ in entries})
    if report.unlisted_images:
        report.warnings.append(f"{report.unlisted_images} images of {captions} are in no split of {splits}: skipped")
    if report.unknown_listed:
        report.warnings.append(f"{report.unknown_listed} file names in {splits} are not in {captions}: skipped")
    if images is None:
        images = _find_dir(captions.parent, ("images", "Images")) or captions.parent
    return images, kept


def _read_split_lists(splits: Path) -> dict[str, str]:
    """File name -> split from a coco-splits JSON; a split key must hold a list of file names."""
    doc = _read_json(splits)
    if not isinstance(doc, dict):
        raise DatasetError(f"{splits}: expected a JSON object of split name -> list of file names")
    split_of: dict[str, str] = {}
    for name, files in doc.items():
        if not isinstance(files, list) and str(name).strip().lower() not in _SPLIT_ALIASES:
            continue  # e.g. {"dataset": "flickr8k"}
        split = _norm_split(name, splits)
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise DatasetError(f"{splits}: {name!r} must be a list of file names, not {_json_shape(files)}")
        _assign_split(split_of, files, split, splits)
    if not split_of:
        raise DatasetError(f"{splits}: no split lists (expected e.g. {{\"train\": [\"a.jpg\", ...]}})")
    return split_of


def _json_shape(value: object) -> str:
    """How a JSON value that should be a list of strings looks, for an error message."""
    if isinstance(value, list):
        bad = next(v for v in value if not isinstance(v, str))
        return f"a list holding {json.dumps(bad)[:40]}"
    return f"{json.dumps(value)[:40]}"


def _assign_split(split_of: dict[str, str], files: list[str], split: str, where: Path) -> None:
    """Put ``files`` in ``split``; a file already in another split is an error naming ``where``."""
    for f in files:
        prev = split_of.setdefault(f, split)
        if prev != split:
            raise DatasetError(f"{where}: {f} is in both {prev} and {split}")


# ---- helpers ---------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    """A UTF-8 text file, without the byte-order mark that editors on Windows write."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:  # a folder, no permission
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e


def _norm_split(name: str, where: Path) -> str:
    split = _SPLIT_ALIASES.get(str(name).strip().lower())
    if split is None:
        raise DatasetError(f"{where}: unknown split name {name!r}")
    return split


def _hash_split(name: str) -> str:
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100
    return "val" if h < 5 else "test" if h < 10 else "train"


def _find(folder: Path, name: str) -> Path | None:
    if (folder / name).is_file():
        return folder / name
    return next(iter(sorted(folder.rglob(name))), None)


def _find_dir(folder: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (folder / n).is_dir():
            return folder / n
    return None


def detect_kind(source: Path) -> str:
    """Guess the kind of a source path (see module docstring)."""
    if source.is_dir():
        if (source / "captions.json").is_file() and (source / "splits.json").is_file():
            return "coco-splits"
        if _find(source, "Flickr8k.token.txt"):
            return "flickr8k"
        if list(source.glob("annotations/captions_*.json")) or list(source.glob("captions_*.json")):
            return "coco"
        if list(source.glob("dataset_*.json")):
            return "karpathy"
        raise DatasetError(f"{source}: cannot tell the dataset kind; pass --kind")
    if source.suffix.lower() == ".csv":
        return "csv"
    if source.suffix.lower() == ".json":
        doc = _read_json(source)
        if (isinstance(doc, dict) and "annotations" in doc) or _looks_coco(doc):
            return "coco"
        if isinstance(doc, dict) and isinstance(doc.get("images"), list):
            return "karpathy"
        raise DatasetError(f"{source}: neither a COCO captions file nor a Karpathy split file")
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    raise DatasetError(f"{source}: cannot tell the dataset kind; pass --kind")
