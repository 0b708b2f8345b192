"""The features folder (HDF5 shards of CNN features and ``manifest.json``): the shard writer and the reader,
:class:`FeatureStore`.

A features folder holds ``shard-00000.h5``, ``shard-00001.h5``, ... and ``manifest.json``. Each shard
covers ``shard_size`` consecutive images of the dataset (in dataset order) and stores::

    grid    (n, N, D) float16   the encoder's spatial grid, chunked (1, N, D) for one-image reads
    pooled  (n, D)    float16   grid.mean(1), computed in float32 before rounding
    ids     (n,)      int64     image ids

where ``n`` is the number of images of that slice that could be read (unreadable ones are listed in
the manifest under ``failed``). A shard is written under ``shard-XXXXX.h5.tmp`` and renamed when
complete; the manifest is rewritten atomically after each shard, so a killed run resumes from the
first incomplete shard and a reader only ever sees complete shards. The extraction that fills a folder is
:mod:`capcli.features`.
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

from . import atomic, paths
from .encoders import DEFAULT_ENCODER
from .errors import FeaturesError, UsageError
from .layout import Dataset, ImageRecord

FORMAT = "capcli-features/1"
MANIFEST = "manifest.json"
LOCK = ".lock"  # held by the run writing the folder (capcli.lock)
KINDS = ("grid", "pooled")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.h5"


def digest_of_ids(ids: Iterable[int]) -> str:
    return hashlib.sha1(",".join(str(i) for i in ids).encode()).hexdigest()


def digest_of_files(records: Iterable[ImageRecord]) -> str:
    """Which photo each id is: a dataset prepared again from other photos numbers them 1..N all the same."""
    return hashlib.sha1("\n".join(f"{r.id}\t{r.file}" for r in records).encode()).hexdigest()


def check_same_photos(manifest: dict, ids_digest: str, files_digest: str, folder: Path, name: str) -> None:
    """FeaturesError when ``manifest`` holds features of these ids but of other photos (folders written before
    the files digest have none, and pass)."""
    if manifest.get("ids_digest") == ids_digest and manifest.get("files_digest", files_digest) != files_digest:
        raise _other_photos(folder, name)


def _other_photos(out: Path, name: str) -> FeaturesError:
    return FeaturesError(f"{out} holds features of other photos than dataset {name!r} now lists under the same ids "
                         "(was it prepared again?); delete that folder and run `capcli features` again")


def read_manifest(folder: Path) -> dict | None:
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


def write_manifest(folder: Path, doc: dict) -> None:
    atomic.write_json(folder / MANIFEST, doc)


class ShardWriter:
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
        manifest = read_manifest(self.folder) if self.folder.is_dir() else None
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
            check_same_photos(self.manifest, digest_of_ids(r.id for r in dataset.images),
                               digest_of_files(dataset.images), self.folder, dataset.name)

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
