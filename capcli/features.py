"""CNN features for a prepared dataset, stored as HDF5 shards, and the reader that training uses.

A features folder holds ``shard-00000.h5``, ``shard-00001.h5``, ... and ``manifest.json``. Each shard
covers ``shard_size`` consecutive images of the dataset (in dataset order) and stores::

    grid    (n, N, D) float16   the encoder's spatial grid, chunked (1, N, D) for one-image reads
    pooled  (n, D)    float16   grid.mean(1), computed in float32 before rounding
    ids     (n,)      int64     image ids

where ``n`` is the number of images of that slice that could be read (unreadable ones are listed in
the manifest under ``failed``). A shard is written under ``shard-XXXXX.h5.tmp`` and renamed when
complete; the manifest is rewritten atomically after each shard, so a killed run resumes from the
first incomplete shard and a reader only ever sees complete shards.

Decoding and resizing run beside the encoder (threads on the CPU, DataLoader worker processes for a
GPU; see :func:`capcli.photos.batch_source`), batch by batch, so memory stays flat whatever the dataset size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atomic, lock, paths
from .encoders import DEFAULT_ENCODER, EncoderSpec, get_spec
from .errors import DatasetError, FeaturesError, OutputError, UsageError, os_reason
from .layout import Dataset, ImageRecord
from .names import display
from .photos import ImageItems, batch_source
from .progress import NULL, Progress
from .runtime import resolve_device

FORMAT = "capcli-features/1"
MANIFEST = "manifest.json"
LOCK = ".lock"  # held by the run writing the folder (capcli.lock)
KINDS = ("grid", "pooled")
MAX_WARNINGS = 10  # unreadable images warned one by one; beyond this only the final count


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.h5"


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


def _ids_digest(ids: Iterable[int]) -> str:
    return hashlib.sha1(",".join(str(i) for i in ids).encode()).hexdigest()


def _files_digest(records: Iterable[ImageRecord]) -> str:
    """Which photo each id is: a dataset prepared again from other photos numbers them 1..N all the same."""
    return hashlib.sha1("\n".join(f"{r.id}\t{r.file}" for r in records).encode()).hexdigest()


def _check_same_photos(manifest: dict, ids_digest: str, files_digest: str, folder: Path, name: str) -> None:
    """FeaturesError when ``manifest`` holds features of these ids but of other photos (folders written before
    the files digest have none, and pass)."""
    if manifest.get("ids_digest") == ids_digest and manifest.get("files_digest", files_digest) != files_digest:
        raise _other_photos(folder, name)


def _other_photos(out: Path, name: str) -> FeaturesError:
    return FeaturesError(f"{out} holds features of other photos than dataset {name!r} now lists under the same ids "
                         "(was it prepared again?); delete that folder and run `capcli features` again")


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FeaturesError(f"{path}: not valid JSON ({e}); delete the folder and run `capcli features` again") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FeaturesError(f"{path}: not a capcli features manifest (expected format {FORMAT})")
    return doc


def _write_manifest(folder: Path, doc: dict) -> None:
    atomic.write_json(folder / MANIFEST, doc)


class _ShardWriter:
    """Appends batches to ``shard-XXXXX.h5.tmp``; ``close`` renames it to its final name."""

    def __init__(self, folder: Path, k: int, num_regions: int, dim: int, encoder: str) -> None:
        import h5py

        self.final = folder / shard_name(k)
        self.tmp = folder / (shard_name(k) + ".tmp")
        self.tmp.unlink(missing_ok=True)
        self.f = h5py.File(self.tmp, "w")
        self.f.attrs["format"] = FORMAT
        self.f.attrs["encoder"] = encoder
        self.grid = self.f.create_dataset(
            "grid", shape=(0, num_regions, dim), maxshape=(None, num_regions, dim), dtype="f2",
            chunks=(1, num_regions, dim),
        )
        self.pooled = self.f.create_dataset("pooled", shape=(0, dim), maxshape=(None, dim), dtype="f2",
                                            chunks=(1, dim))
        self.ids = self.f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype="i8", chunks=(1024,))
        self.n = 0

    def append(self, ids: np.ndarray, grid: np.ndarray, pooled: np.ndarray) -> None:
        b = len(ids)
        if b == 0:
            return
        lo, hi = self.n, self.n + b
        for ds in (self.grid, self.pooled, self.ids):
            ds.resize(hi, axis=0)
        self.grid[lo:hi] = grid
        self.pooled[lo:hi] = pooled
        self.ids[lo:hi] = ids
        self.n = hi

    def close(self) -> None:
        self.f.flush()  # a full disk fails here, while the file can still be let go of (see abort)
        self.f.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        """Close without publishing; the half-written ``.tmp`` file is removed by the next run.

        HDF5 flushes its caches when a file closes; after a failed write (a full disk) that flush fails again
        and leaves the library holding the file, and the process then crashes at exit. So the file's
        descriptor is pointed at /dev/null first: the last flush succeeds and goes nowhere.
        """
        with contextlib.suppress(Exception):
            fd = self.f.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)
            os.close(null)
        with contextlib.suppress(Exception):
            self.f.close()


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
    digest, files = _ids_digest(ids), _files_digest(records)
    manifest = _read_manifest(out)
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
    _check_same_photos(manifest, digest, files, out, dataset.name)
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
        _write_manifest(out, manifest)


class _Shards:
    """Fills shard after shard from the encoded batches; publishes each, then the manifest, once complete."""

    def __init__(self, out: Path, manifest: dict, spec: EncoderSpec, encoder: str, n_records: int,
                 todo: list[int], progress: Progress) -> None:
        self.out, self.manifest, self.spec, self.encoder, self.progress = out, manifest, spec, encoder, progress
        self.shard_size, self.n_records = int(manifest["shard_size"]), n_records
        self.n_shards = (n_records + self.shard_size - 1) // self.shard_size
        self.remaining = {k: self.images_in(k) for k in todo}
        self.writer: _ShardWriter | None = None
        self.current = -1
        self.shard_failed: list[dict] = []
        self.n_failed = 0  # in this run

    def images_in(self, k: int) -> int:
        return min((k + 1) * self.shard_size, self.n_records) - k * self.shard_size

    def begin(self, k: int, failed: list[tuple[int, str, str]]) -> None:
        """A batch of shard ``k`` is next; ``failed``: its images that could not be read."""
        if k != self.current:
            self.writer = _ShardWriter(self.out, k, self.spec.num_regions, self.spec.feature_dim, self.encoder)
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
            _write_manifest(self.out, m)

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
            _write_manifest(out, manifest)
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


# ---- the reader ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    path: Path
    ids: np.ndarray  # (n,) int64


class FeatureStore:
    """Random access to extracted features by image id, across shards.

    HDF5 files are opened lazily, once per process (the store tracks ``os.getpid()``), and pickling
    drops open handles, so a store can be handed to DataLoader workers.
    """

    def __init__(self, folder: str | Path, allow_incomplete: bool = False) -> None:
        import h5py

        self.folder = Path(folder)
        manifest = _read_manifest(self.folder) if self.folder.is_dir() else None
        if manifest is None:
            raise FeaturesError(f"no features in {self.folder} (no {MANIFEST}); run `capcli features` first")
        if not manifest.get("complete") and not allow_incomplete:
            raise FeaturesError(
                f"features in {self.folder} are incomplete ({len(manifest['shards'])} shards done); "
                "run `capcli features` again to finish them"
            )
        self.manifest = manifest
        self._shards: list[_Shard] = []
        self._index: dict[int, tuple[int, int]] = {}
        for s in manifest["shards"]:
            path = self.folder / s["file"]
            try:
                with h5py.File(path, "r", locking=False) as f:
                    ids = f["ids"][:].astype(np.int64)
            except (OSError, KeyError) as e:
                raise FeaturesError(f"cannot read {path} ({e}); run `capcli features` again") from e
            for row, i in enumerate(ids.tolist()):
                self._index[i] = (len(self._shards), row)
            self._shards.append(_Shard(path, ids))
        self._ids = np.concatenate([s.ids for s in self._shards]) if self._shards else np.zeros(0, np.int64)
        self._files: dict[int, object] = {}  # shard index -> open h5py.File, in this process only
        self._datasets: dict[tuple[int, str], object] = {}  # (shard index, kind) -> h5py.Dataset
        self._pid = os.getpid()

    @classmethod
    def open_for(cls, dataset: str | Dataset, encoder: str = DEFAULT_ENCODER,
                 root: str | Path | None = None) -> FeatureStore:
        """The store at the default place for ``dataset`` (a name or a Dataset) and ``encoder``."""
        name = dataset.name if isinstance(dataset, Dataset) else str(dataset)
        folder = paths.features_dir(name, encoder, root)
        if not (folder / MANIFEST).is_file():
            raise FeaturesError(
                f"no {encoder} features for {name} in {folder}; run `capcli features {name} --encoder {encoder}` first"
            )
        return cls(folder)

    def check_photos(self, dataset: Dataset) -> None:
        """FeaturesError when these are features of the whole of ``dataset``'s ids but of other photos (it was
        prepared again from other files). Features of part of a dataset, or from before the check, pass."""
        if "files_digest" in self.manifest:
            _check_same_photos(self.manifest, _ids_digest(r.id for r in dataset.images),
                               _files_digest(dataset.images), self.folder, dataset.name)

    # ---- facts -------------------------------------------------------------------------------------
    @property
    def encoder_name(self) -> str:
        return str(self.manifest["encoder"])

    @property
    def num_regions(self) -> int:
        return int(self.manifest["num_regions"])

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    @property
    def ids(self) -> np.ndarray:
        """All image ids with features, in storage order (int64)."""
        return self._ids.copy()

    @property
    def failed(self) -> list[dict]:
        return list(self.manifest.get("failed", []))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        try:
            return int(image_id) in self._index  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def shape(self, kind: str = "grid") -> tuple[int, ...]:
        """Shape of one image's features of ``kind``."""
        _check_kind(kind)
        return (self.num_regions, self.feature_dim) if kind == "grid" else (self.feature_dim,)

    # ---- reading -----------------------------------------------------------------------------------
    def _dataset(self, k: int, kind: str):  # noqa: ANN202
        """The h5py dataset ``kind`` of shard ``k``, opening the file on first use in this process."""
        if self._pid != os.getpid():  # forked: never reuse the parent's HDF5 handles
            self._files, self._datasets, self._pid = {}, {}, os.getpid()
        ds = self._datasets.get((k, kind))
        if ds is None:
            import h5py

            f = self._files.get(k)
            if f is None:
                f = self._files[k] = h5py.File(self._shards[k].path, "r", locking=False)
            ds = self._datasets[(k, kind)] = f[kind]
        return ds

    def _where(self, image_id: int) -> tuple[int, int]:
        try:
            return self._index[int(image_id)]
        except KeyError:
            raise FeaturesError(f"image id {image_id} has no features in {self.folder}") from None

    def get(self, image_id: int, kind: str = "grid") -> np.ndarray:
        """float16 (N, D) for ``grid`` or (D,) for ``pooled``."""
        _check_kind(kind)
        k, row = self._where(image_id)
        return self._dataset(k, kind)[row]

    def get_many(self, image_ids: Sequence[int], kind: str = "grid") -> np.ndarray:
        """float16 (B, N, D) or (B, D), in the order of ``image_ids``; reads shard by shard in row order."""
        _check_kind(kind)
        out = np.empty((len(image_ids), *self.shape(kind)), dtype=np.float16)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(image_ids):
            k, row = self._where(i)
            by_shard.setdefault(k, []).append((row, pos))
        for k, pairs in by_shard.items():
            ds = self._dataset(k, kind)
            for row, pos in sorted(pairs):  # row order within a shard; plain reads beat h5py fancy indexing
                out[pos] = ds[row]
        return out

    def load_all(self, kind: str = "pooled") -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), features (n, ...)) for every image, read shard by shard into one array."""
        _check_kind(kind)
        ids = self.ids
        out = np.empty((len(ids), *self.shape(kind)), dtype=np.float16)
        lo = 0
        for k, s in enumerate(self._shards):
            n = len(s.ids)
            if n:
                self._dataset(k, kind).read_direct(out, np.s_[0:n], np.s_[lo:lo + n])
            lo += n
        return ids, out

    def close(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(Exception):
                f.close()
        self._files, self._datasets = {}, {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"], state["_datasets"], state["_pid"] = {}, {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.folder)!r}, encoder={self.encoder_name!r}, images={len(self)})"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UsageError(f"feature kind {kind!r}: use one of {', '.join(KINDS)}")
