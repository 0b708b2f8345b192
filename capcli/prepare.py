"""Build the canonical layout (:mod:`capcli.layout`) from the common captioning dataset formats.

The kinds of source and their readers are in :mod:`capcli.annotations`; this module picks the kind, keeps the
listed images that exist and have a caption, and writes ``dataset.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from . import paths
from .annotations import (
    Entry,
    PrepareReport,
    detect_kind,
    read_coco,
    read_coco_splits,
    read_csv,
    read_flickr8k,
    read_karpathy,
)
from .errors import DatasetError, UsageError
from .layout import Dataset, ImageRecord, validate
from .progress import NULL, Progress

KINDS = ("auto", "coco", "karpathy", "flickr8k", "csv", "coco-splits")


def prepare(
    source: str | Path,
    *,
    kind: str = "auto",
    images: str | Path | None = None,
    splits: str | Path | None = None,
    karpathy: str | Path | None = None,
    name: str | None = None,
    out: str | Path | None = None,
    progress: Progress = NULL,
    root: str | Path | None = None,
) -> tuple[Dataset, PrepareReport]:
    """Read ``source`` and write the canonical layout to ``out`` (default: the data root's datasets/NAME)."""
    source = Path(source)
    kind = _resolve_kind(source, kind, splits, karpathy)
    report = PrepareReport(kind=kind)
    image_root, entries = _read_source(source, kind, Path(images) if images else None, splits, karpathy, report)
    if not image_root.is_dir():
        raise DatasetError(f"image folder {image_root} does not exist; pass --images")
    records = _records(entries, source, image_root, report, progress)
    _check_kept(records, source, image_root, report, progress)
    validate(records, check_files=False, image_root=image_root)
    ds_name = name or _default_name(source, kind)
    ds = Dataset(ds_name, image_root.resolve(), records)
    out_dir = Path(out) if out else paths.dataset_dir(ds_name, root)
    _save(ds, out_dir, report)
    return ds, report


def _resolve_kind(source: Path, kind: str, splits: str | Path | None, karpathy: str | Path | None) -> str:
    """The kind of ``source`` (detected for ``auto``), refusing options that do not go with it."""
    if kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    kind = detect_kind(source) if kind == "auto" else kind
    if karpathy is not None and kind != "coco":
        raise UsageError(f"--karpathy goes with COCO annotation files, but {source} is {kind}")
    if splits is not None and kind != "coco-splits":
        raise UsageError(f"--splits goes with --kind coco-splits, but {source} is {kind}")
    return kind


def _read_source(
    source: Path,
    kind: str,
    img_dir: Path | None,
    splits: str | Path | None,
    karpathy: str | Path | None,
    report: PrepareReport,
) -> tuple[Path, list[Entry]]:
    """Find the files of a ``kind`` source and read them with that kind's reader."""
    if kind == "coco":
        return _read_coco_source(source, img_dir, karpathy, report)
    if kind == "karpathy":
        kfile = source if source.is_file() else next(iter(sorted(source.glob("dataset_*.json"))), None)
        if kfile is None:
            raise DatasetError(f"{source}: no Karpathy split file (dataset_*.json)")
        return read_karpathy(kfile, img_dir or kfile.parent)
    if kind == "flickr8k":
        return read_flickr8k(source if source.is_dir() else source.parent, img_dir, report)
    if kind == "csv":
        return read_csv(source, img_dir, report)
    # coco-splits
    caps = source / "captions.json" if source.is_dir() else source
    split_file = Path(splits) if splits else caps.parent / "splits.json"
    return read_coco_splits(caps, split_file, img_dir, report)


def _read_coco_source(
    source: Path, img_dir: Path | None, karpathy: str | Path | None, report: PrepareReport
) -> tuple[Path, list[Entry]]:
    """A COCO annotation file, or a folder of them (with ``dataset_coco.json`` as the split when it is there)."""
    anns = sorted(source.glob("annotations/captions_*.json")) + sorted(source.glob("captions_*.json")) \
        if source.is_dir() else [source]
    if not anns:
        raise DatasetError(f"{source}: no captions_*.json annotation files")
    if karpathy is None and source.is_dir():
        karpathy = next(iter(sorted(source.glob("dataset_coco.json"))), None)
    coco_root = img_dir or (source if source.is_dir() else source.parent.parent)
    return read_coco(anns, coco_root, Path(karpathy) if karpathy else None, report)


def _records(
    entries: list[Entry], source: Path, image_root: Path, report: PrepareReport, progress: Progress
) -> list[ImageRecord]:
    """The entries whose image exists and that have a non-empty caption; what is skipped is counted in ``report``.

    Source ids become the image ids when every entry has one and they are unique; otherwise images are numbered
    from 1 in the order kept.
    """
    progress.start("checking images", total=len(entries))
    report.listed = len(entries)
    records: list[ImageRecord] = []
    seen_files: set[str] = set()
    use_source_ids = all(e[3] is not None for e in entries) and len({e[3] for e in entries}) == len(entries)
    for file, split, caps, src_id in entries:
        progress.advance()
        if file in seen_files:
            raise DatasetError(f"duplicate image {file} in {source}")
        seen_files.add(file)
        if not (image_root / file).is_file():
            report.missing_images += 1
            continue
        kept = [c.strip() for c in caps if c and c.strip()]
        report.empty_captions += len(caps) - len(kept)
        if not kept:
            report.images_without_captions += 1
            continue
        image_id = src_id if use_source_ids and src_id is not None else len(records) + 1
        records.append(ImageRecord(image_id, file, split, kept))
    progress.done()
    return records


def _check_kept(
    records: list[ImageRecord], source: Path, image_root: Path, report: PrepareReport, progress: Progress
) -> None:
    """Refuse a dataset with no usable image; warn about what was skipped."""
    if not records:
        _refuse_empty(source, image_root, report)
    for message in report.warnings:
        progress.warn(message)
    if report.missing_images:
        progress.warn(f"{report.missing_images} listed images are missing under {image_root}: skipped")
    if report.empty_captions:
        progress.warn(f"{report.empty_captions} empty captions skipped")
    if report.images_without_captions:
        progress.warn(f"{report.images_without_captions} images without any caption skipped")


def _refuse_empty(source: Path, image_root: Path, report: PrepareReport) -> NoReturn:
    """Raise the error for a source of which no image is kept, with what was wrong with each."""
    if not report.listed:
        raise DatasetError(f"{source}: no images listed")
    if report.missing_images == report.listed:
        raise DatasetError(f"none of the {report.listed} images listed in {source} exist under {image_root}; "
                           "pass --images")
    why = [f"{report.missing_images} missing under {image_root}"] if report.missing_images else []
    empty = f" ({report.empty_captions} empty captions)" if report.empty_captions else ""
    why.append(f"{report.images_without_captions} without any caption{empty}")
    raise DatasetError(f"{source}: no images with captions: of the {report.listed} images listed, {' and '.join(why)}")


def _save(ds: Dataset, out_dir: Path, report: PrepareReport) -> None:
    """Write ``ds`` to ``out_dir`` and fill in the report's totals."""
    try:
        ds.save(out_dir)
    except OSError as e:
        raise DatasetError(f"cannot write {out_dir / 'dataset.json'}: {e.strerror or e}") from e
    ds.source = str(out_dir)
    report.out = out_dir
    report.images = len(ds.images)
    report.captions = sum(len(r.captions) for r in ds.images)
    report.splits = ds.split_counts()


def _default_name(source: Path, kind: str) -> str:
    base = source if source.is_dir() else source.parent
    if kind == "coco" and base.name == "annotations":
        base = base.parent
    return base.resolve().name.lower() or "dataset"
