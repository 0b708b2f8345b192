"""CNN features for a prepared dataset: the extraction that fills a features folder (:mod:`capcli.feature_store`).

Extraction resumes: it keeps the complete shards a killed run left and extracts the rest, and a complete folder
is left alone (``retry_failed`` extracts the shards with unreadable images again).

Decoding and resizing run beside the encoder (threads on the CPU, DataLoader worker processes for a
GPU; see :func:`capcli.photos.batch_source`), batch by batch, so memory stays flat whatever the dataset size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import lock, paths
from .encoders import DEFAULT_ENCODER, EncoderSpec, get_spec
from .errors import DatasetError, FeaturesError, OutputError, UsageError, os_reason
from .feature_store import (
    FORMAT,
    LOCK,
    MANIFEST,
    ShardWriter,
    check_same_photos,
    digest_of_files,
    digest_of_ids,
    read_manifest,
    shard_name,
    write_manifest,
)
from .feature_store import FeatureStore as FeatureStore  # capcli.features.FeatureStore: where callers import it
from .layout import Dataset, ImageRecord
from .names import display
from .photos import ImageItems, batch_source
from .progress import NULL, Progress
from .runtime import resolve_device

MAX_WARNINGS = 10  # unreadable images warned one by one; beyond this only the final count


def preprocessing(spec: EncoderSpec) -> dict:
    """How images were turned into encoder input, for the manifest."""
    return {
        "loader": "capcli.images.load_image (EXIF upright, RGB, alpha on white; JPEGs decoded at >= size)",
        "resize": "squash to square (no crop)",
        "size": spec.input_size,
        "interpolation": "bilinear",
        "input": "uint8 RGB",
        "mean": list(spec.mean),
        "std": list(spec.std),
    }


def extract_features(
    dataset: Dataset,
    encoder: str = DEFAULT_ENCODER,
    out: str | Path | None = None,
    *,
    shard_size: int = 1000,
    batch_size: int = 32,
    workers: int = 2,
    device: str = "auto",
    weights: str | Path | None = None,
    image_ids: Iterable[int] | None = None,
    root: str | Path | None = None,
    decode: str = "auto",
    retry_failed: bool = False,
    progress: Progress = NULL,
) -> Path:
    """Run ``encoder`` over the images of ``dataset`` (or only ``image_ids``) into the folder ``out``.

    ``out`` defaults to ``paths.features_dir(dataset.name, encoder, root)``. Resumes an interrupted
    run in the same folder; a complete folder is left alone, except that ``retry_failed`` extracts the shards
    with unreadable images again (after the photos were mended). Returns the folder.

    ``workers`` images are decoded in parallel with the encoder: by threads on the CPU and by
    DataLoader worker processes for CUDA (``decode="auto"``; or force ``"threads"``/``"processes"``).
    On the CPU, call :func:`capcli.runtime.tune_cpu_allocator` once first for up to ~2x the encoder's speed
    (``capcli features`` does).
    """
    spec = get_spec(encoder)  # unknown encoder -> EncoderError, before anything is touched
    if shard_size < 1 or batch_size < 1 or workers < 0:
        raise UsageError("--shard-size and --batch-size must be >= 1 and --workers >= 0")
    out = Path(out) if out is not None else paths.features_dir(dataset.name, encoder, root)
    existed = out.is_dir()
    try:
        with lock.exclusive(out / LOCK, str(out)):  # one run at a time writes a features folder
            return _extract(dataset, encoder, spec, out, shard_size, batch_size, workers, device, weights,
                            image_ids, decode, retry_failed, progress)
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if the run failed before writing anything


def _manifest_for(out: Path, dataset: Dataset, encoder: str, spec: EncoderSpec, weights: str | None,
                  records: list[ImageRecord], shard_size: int) -> dict:
    """The folder's manifest when it holds features of this very job (else FeaturesError), or a new one."""
    ids = [r.id for r in records]
    digest, files = digest_of_ids(ids), digest_of_files(records)
    manifest = read_manifest(out)
    if manifest is None:
        return {
            "format": FORMAT,
            "encoder": encoder,
            "spec": spec.to_dict(),
            "weights": weights,
            "preprocessing": preprocessing(spec),
            "dtype": "float16",
            "num_regions": spec.num_regions,
            "feature_dim": spec.feature_dim,
            "dataset": {"name": dataset.name, "path": dataset.source, "image_root": str(dataset.image_root)},
            "num_images": len(ids),
            "ids_digest": digest,
            "files_digest": files,
            "shard_size": shard_size,
            "shards": [],
            "failed": [],
            "num_extracted": 0,
            "complete": False,
        }
    if manifest.get("encoder") != encoder:
        raise FeaturesError(
            f"{out} holds features of encoder {manifest.get('encoder')!r}, not {encoder!r}; "
            "choose another --out or delete that folder"
        )
    if manifest.get("weights") != weights:
        raise FeaturesError(
            f"{out} holds {encoder} features from weights {manifest.get('weights') or 'default'}, "
            f"not {weights or 'default'}; choose another --out or delete that folder"
        )
    if manifest.get("ids_digest") != digest:
        raise FeaturesError(
            f"{out} holds {encoder} features of a different image set ({manifest.get('num_images')} images "
            f"of {manifest.get('dataset', {}).get('name')!r}); choose another --out or delete that folder"
        )
    check_same_photos(manifest, digest, files, out, dataset.name)
    return manifest


def _unlist_shards(manifest: dict, indices: set[int]) -> None:
    """Forget shards ``indices`` and their failures: they are extracted again (their files, no longer listed,
    are deleted first)."""
    if indices:
        manifest["shards"] = [s for s in manifest["shards"] if s["index"] not in indices]
        manifest["failed"] = [f for f in manifest["failed"] if f.get("shard") not in indices]
        manifest["complete"] = False


def _listed_shards(out: Path, manifest: dict) -> dict[int, dict]:
    """The manifest's shards whose files exist, by index; a listed shard that vanished is forgotten, with its
    failures, so that it is extracted again."""
    done = {int(s["index"]): s for s in manifest["shards"] if (out / s["file"]).is_file()}
    _unlist_shards(manifest, {int(s["index"]) for s in manifest["shards"]} - set(done))
    return done


def _clear_folder(out: Path, manifest: dict, done: dict[int, dict]) -> None:
    """Create ``out``, delete half-written shards and shards the manifest does not list, write the manifest."""
    with _write_errors(out, manifest):
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("shard-*.h5*"):  # half-written shards, or shards renamed after the last manifest
            k = int(stale.name[6:11]) if stale.name[6:11].isdigit() else -1
            if stale.name.endswith(".tmp") or k not in done:
                stale.unlink()
        write_manifest(out, manifest)


class _Shards:
    """Fills shard after shard from the encoded batches; publishes each, then the manifest, once complete."""

    def __init__(self, out: Path, manifest: dict, spec: EncoderSpec, encoder: str, n_records: int,
                 todo: list[int], progress: Progress) -> None:
        self.out, self.manifest, self.spec, self.encoder, self.progress = out, manifest, spec, encoder, progress
        self.shard_size, self.n_records = int(manifest["shard_size"]), n_records
        self.n_shards = (n_records + self.shard_size - 1) // self.shard_size
        self.remaining = {k: self.images_in(k) for k in todo}
        self.writer: ShardWriter | None = None
        self.current = -1
        self.shard_failed: list[dict] = []
        self.n_failed = 0  # in this run

    def images_in(self, k: int) -> int:
        return min((k + 1) * self.shard_size, self.n_records) - k * self.shard_size

    def begin(self, k: int, failed: list[tuple[int, str, str]]) -> None:
        """A batch of shard ``k`` is next; ``failed``: its images that could not be read."""
        if k != self.current:
            self.writer = ShardWriter(self.out, k, self.spec.num_regions, self.spec.feature_dim, self.encoder)
            self.current, self.shard_failed = k, []
        for image_id, file, reason in failed:
            self.shard_failed.append({"id": int(image_id), "file": file, "reason": reason, "shard": k})
            self.n_failed += 1
            if self.n_failed <= MAX_WARNINGS:
                self.progress.warn(f"skipped {reason}")

    def add(self, ids: np.ndarray, features: tuple[np.ndarray, np.ndarray] | None, n_items: int) -> None:
        """The batch's (grid, pooled) features (None: no image of it was readable) of its ``n_items`` images."""
        k = self.current
        if features is not None:
            self.writer.append(ids, *features)
        self.remaining[k] -= n_items
        if self.remaining[k] == 0:  # shard complete: publish it, then record it
            count = self.writer.n
            self.writer.close()
            self.writer = None
            m = self.manifest
            m["shards"].append({"index": k, "file": shard_name(k), "count": count, "images": self.images_in(k)})
            m["shards"].sort(key=lambda s: s["index"])
            m["failed"] += self.shard_failed
            m["num_extracted"] = sum(s["count"] for s in m["shards"])
            m["complete"] = len(m["shards"]) == self.n_shards
            write_manifest(self.out, m)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _extract(dataset: Dataset, encoder: str, spec: EncoderSpec, out: Path, shard_size: int, batch_size: int,
             workers: int, device: str, weights: str | Path | None, image_ids: Iterable[int] | None, decode: str,
             retry_failed: bool, progress: Progress) -> Path:
    """:func:`extract_features` once ``out`` is locked."""
    import torch

    records = dataset.images if image_ids is None else [dataset.get(int(i)) for i in dict.fromkeys(image_ids)]
    if not records:
        raise FeaturesError(f"dataset {dataset.name} has no images to extract features from")
    weights_s = str(Path(weights).expanduser().resolve()) if weights is not None else None
    manifest = _manifest_for(out, dataset, encoder, spec, weights_s, records, shard_size)
    asked_shard_size, shard_size = shard_size, int(manifest["shard_size"])  # the folder's shards stay
    n_shards = (len(records) + shard_size - 1) // shard_size
    if retry_failed:  # the shards with unreadable images
        _unlist_shards(manifest, {f.get("shard") for f in manifest["failed"]})
    done = _listed_shards(out, manifest)
    todo = [k for k in range(n_shards) if k not in done]
    if not todo:
        if not manifest.get("complete"):
            manifest["complete"] = True
            write_manifest(out, manifest)
        _check_some_read(manifest)
        n_failed = len(manifest["failed"])
        again = f" ({n_failed} unreadable: --retry-failed tries them again)" if n_failed else ""
        progress.info(f"already extracted: {manifest['num_extracted']} images in {out} ({encoder}); nothing to do"
                      + again)
        return out

    if not Path(dataset.image_root).is_dir():
        raise DatasetError(
            f"image folder {dataset.image_root} of dataset {dataset.name} not found; run `capcli prepare` again"
        )
    dev = resolve_device(device)
    # Batches never cross a shard boundary, so each batch belongs to exactly one shard.
    batches: list[list[int]] = []
    for k in todo:
        lo, hi = k * shard_size, min((k + 1) * shard_size, len(records))
        batches += [list(range(b, min(b + batch_size, hi))) for b in range(lo, hi, batch_size)]
    items = ImageItems([(r.id, str(dataset.path(r)), r.file) for r in records], spec)
    # Decoding starts now, while the encoder loads. Weights problems surface before the output
    # folder is touched.
    source = batch_source(items, batches, workers, decode, dev)
    shards = _Shards(out, manifest, spec, encoder, len(records), todo, progress)
    try:
        enc = _create(encoder, weights).to(dev)
        _clear_folder(out, manifest, done)
        if done:
            progress.info(f"resuming {out}: {len(done)} of {n_shards} shards already done")
        if asked_shard_size != shard_size:
            progress.info(f"keeping the folder's shard size {shard_size} (not {asked_shard_size})")
        progress.start(f"features {encoder}", total=sum(len(b) for b in batches), unit="img")
        with torch.inference_mode(), _write_errors(out, manifest):
            for batch_idx, (bids, images, failed, n_items) in enumerate(source):
                shards.begin(batches[batch_idx][0] // shard_size, failed)
                shards.add(bids.numpy(), _forward(enc, images, dev) if images is not None else None, n_items)
                progress.advance(n_items)
    finally:
        shards.abort()
        progress.done()
        source.close()  # stops the decoding now, also on error
    if shards.n_failed:
        progress.warn(f"{shards.n_failed} unreadable image(s) skipped; listed under 'failed' in {out / MANIFEST}")
    _check_some_read(manifest)
    return out


@contextlib.contextmanager
def _write_errors(out: Path, manifest: dict):  # noqa: ANN202
    """A failed write of a shard or the manifest (full disk, permission) -> one :class:`OutputError` line.

    Nothing is lost: the manifest is replaced atomically and lists only complete shards; the half-written
    shard is a ``.tmp`` file that the next run removes.
    """
    try:
        yield
    except OSError as e:
        shards = len(manifest["shards"])
        raise OutputError(f"cannot write features to {display(str(out))}: {os_reason(e)}; {manifest['num_extracted']} "
                          f"images in {shards} complete shard(s) are kept - run the same command again to continue"
                          ) from None


def _check_some_read(manifest: dict) -> None:
    if manifest["complete"] and manifest["num_extracted"] == 0:
        first = manifest["failed"][0]["reason"] if manifest["failed"] else "no images"
        raise FeaturesError(f"none of the {manifest['num_images']} images could be read (first: {first})")


def _create(encoder: str, weights: str | Path | None):  # noqa: ANN202
    from .encoders import create_encoder

    return create_encoder(encoder, weights).for_inference()


def _forward(enc, images, dev: str) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """uint8 (B, 3, S, S) -> float16 grid (B, N, D) and pooled (B, D) as numpy arrays."""
    import torch

    if dev.startswith("cuda"):
        images = images.to(dev, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16):
            grid = enc(images)  # (B, N, D)
    else:
        grid = enc(images)  # (B, N, D)
    pooled = grid.float().mean(1)  # (B, D), averaged before rounding to float16
    return grid.half().cpu().numpy(), pooled.half().cpu().numpy()
