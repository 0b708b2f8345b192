"""The canonical dataset layout that every command after ``prepare`` reads.

A prepared dataset is a folder holding ``dataset.json``::

    {"format": "capcli-dataset/1", "name": "flickr8k", "image_root": "/abs/path/to/images",
     "images": [{"id": 1, "file": "a.jpg", "split": "train", "captions": ["A dog runs .", ...]}, ...]}

``file`` is relative to ``image_root``. Splits are ``train``, ``val``, ``test`` and ``restval``
(Karpathy's extra training images; training uses train + restval by default). Captions are kept raw,
as written; tokenisation happens in :mod:`capcli.vocab`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import atomic
from .errors import DatasetError

FORMAT = "capcli-dataset/1"
FILENAME = "dataset.json"
SPLITS = ("train", "val", "test", "restval")
TRAIN_SPLITS = ("train", "restval")


@dataclass
class ImageRecord:
    id: int
    file: str
    split: str
    captions: list[str] = field(default_factory=list)


@dataclass
class Dataset:
    name: str
    image_root: Path
    images: list[ImageRecord]
    source: str = ""  # the folder this dataset was read from, for messages

    def __post_init__(self) -> None:
        self._by_id = {r.id: r for r in self.images}

    def path(self, rec: ImageRecord) -> Path:
        return self.image_root / rec.file

    def get(self, image_id: int) -> ImageRecord:
        try:
            return self._by_id[image_id]
        except KeyError:
            raise DatasetError(f"image id {image_id} is not in dataset {self.name}") from None

    def split(self, *names: str) -> list[ImageRecord]:
        """Images of the given splits (``"train"`` alone means train + restval)."""
        wanted = set(TRAIN_SPLITS) if names == ("train",) else set(names)
        unknown = wanted - set(SPLITS)
        if unknown:
            raise DatasetError(f"unknown split {sorted(unknown)[0]!r}; use one of {', '.join(SPLITS)}")
        return [r for r in self.images if r.split in wanted]

    def references(self, *names: str) -> dict[int, list[str]]:
        """image id -> raw reference captions, for evaluation."""
        return {r.id: list(r.captions) for r in self.split(*names)}

    def split_counts(self) -> dict[str, int]:
        return dict(Counter(r.split for r in self.images))

    # ---- on disk -------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``folder/dataset.json`` atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": FORMAT,
            "name": self.name,
            "image_root": str(Path(self.image_root).resolve()),
            "images": [asdict(r) for r in self.images],
        }
        return atomic.write_json(folder / FILENAME, doc, indent=None)

    @classmethod
    def load(cls, folder: str | Path) -> Dataset:
        """Read a prepared dataset folder (or its dataset.json) and validate it."""
        folder = Path(folder)
        path = folder if folder.is_file() else folder / FILENAME
        if not path.exists():
            raise DatasetError(f"{folder} is not a prepared dataset (no {FILENAME}); run `capcli prepare` first")
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise DatasetError(f"{path}: not a capcli dataset (expected format {FORMAT})")
        try:
            images = [
                ImageRecord(int(r["id"]), str(r["file"]), str(r["split"]), [str(c) for c in r["captions"]])
                for r in doc["images"]
            ]
            ds = cls(str(doc["name"]), Path(doc["image_root"]), images, source=str(path.parent))
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{path}: malformed image record ({e})") from e
        validate(ds.images, check_files=False, image_root=ds.image_root)
        return ds


def validate(images: Iterable[ImageRecord], check_files: bool, image_root: Path) -> None:
    """Raise DatasetError for duplicate ids, unknown splits or (optionally) missing files."""
    seen: set[int] = set()
    for r in images:
        if r.id in seen:
            raise DatasetError(f"duplicate image id {r.id} ({r.file})")
        seen.add(r.id)
        if r.split not in SPLITS:
            raise DatasetError(f"image {r.file}: unknown split {r.split!r}")
        if check_files and not (image_root / r.file).is_file():
            raise DatasetError(f"image file missing: {image_root / r.file}")


def open_dataset(ref: str | Path | Dataset, root: str | Path | None = None) -> Dataset:
    """A prepared dataset from a folder (or its dataset.json), else by name under the data root."""
    from . import paths

    if isinstance(ref, Dataset):
        return ref
    p = Path(ref).expanduser()
    if p.is_file() or (p / FILENAME).is_file():
        return Dataset.load(p)
    named = paths.dataset_dir(str(ref), root)
    if "/" not in str(ref) and (named / FILENAME).is_file():
        return Dataset.load(named)
    have_dir = paths.home(root) / "datasets"
    have = sorted(d.name for d in have_dir.iterdir() if (d / FILENAME).is_file()) if have_dir.is_dir() else []
    raise DatasetError(
        f"no prepared dataset {str(ref)!r}: not a folder with {FILENAME}, and none of that name in {have_dir}"
        + (f" (have: {', '.join(have[:8])})" if have else "; run `capcli prepare` or `capcli fetch` first")
    )
