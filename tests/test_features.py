"""`capcli features`: real Lite0 forward passes on real photos, real HDF5 shards, real worker processes."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capcli import paths
from capcli.cli import app
from capcli.encoders import DEFAULT_ENCODER, create_encoder, get_spec
from capcli.errors import DatasetError, FeaturesError
from capcli.features import MANIFEST, FeatureStore, extract_features, shard_name
from capcli.layout import Dataset, ImageRecord
from capcli.progress import Progress

SHARD = 4  # small shards: 30 images -> 8 shards (7 x 4 + 2)
BATCH = 2  # two batches per shard
TOL = 4e-3  # float16 keeps ~3 significant digits; Lite0 activations are in 0..6


class Recorder(Progress):
    """Keeps what the library reports; optionally interrupts the run like Ctrl-C after ``stop_after`` images."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []
        self.seen = 0
        self.stop_after = stop_after

    def advance(self, n: int = 1, **fields: object) -> None:
        self.seen += n
        if self.stop_after is not None and self.seen >= self.stop_after:
            raise KeyboardInterrupt

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def _direct(ds: Dataset, ids: list[int]) -> torch.Tensor:
    """The encoder applied directly, without the pipeline: (n, N, D) float32."""
    spec = get_spec(DEFAULT_ENCODER)
    batch = torch.stack([spec.read(ds.path(ds.get(i))) for i in ids])
    with torch.inference_mode():
        return create_encoder()(batch)


def _photos_dataset(folder: Path, photos: list[Path], extra: dict[str, bytes] | None = None) -> Path:
    """Save a prepared dataset of ``photos`` (plus raw ``extra`` files) in ``folder``; returns the folder."""
    images = folder / "images"
    images.mkdir(parents=True)
    for p in photos:
        shutil.copy(p, images / p.name)
    for name, data in (extra or {}).items():
        (images / name).write_bytes(data)
    files = [p.name for p in photos] + list(extra or {})
    ds = Dataset("photos", images, [ImageRecord(i + 1, f, "train", [f"a photo {i}"]) for i, f in enumerate(files)])
    ds.save(folder / "ds")
    return folder / "ds"


@pytest.fixture(scope="module")
def extracted(small_flickr8k, tmp_path_factory) -> Path:
    """One uninterrupted extraction of the 30-image Flickr8k slice, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("feats") / "lite0"
    extract_features(small_flickr8k, out=out, shard_size=SHARD, batch_size=BATCH, workers=2, device="cpu")
    return out


def test_shards_equal_a_direct_forward_pass(small_flickr8k, extracted):
    ids = [r.id for r in small_flickr8k.images]
    names = sorted(p.name for p in extracted.iterdir())
    assert names == [MANIFEST] + [shard_name(k) for k in range(8)]
    ref = _direct(small_flickr8k, ids).numpy()  # (30, 49, 1280)

    got_ids, grids, pooled = [], [], []
    for k in range(8):
        with h5py.File(extracted / shard_name(k), "r") as f:
            assert f["grid"].dtype == np.float16 and f["pooled"].dtype == np.float16
            assert f["grid"].chunks == (1, 49, 1280)
            assert f["ids"].dtype == np.int64
            got_ids += f["ids"][:].tolist()
            grids.append(f["grid"][:])
            pooled.append(f["pooled"][:])
    grid, pooled = np.concatenate(grids), np.concatenate(pooled)
    assert got_ids == ids  # dataset order, nothing lost or repeated
    assert grid.shape == (30, 49, 1280) and pooled.shape == (30, 1280)
    np.testing.assert_allclose(grid.astype(np.float32), ref, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(pooled.astype(np.float32), grid.astype(np.float32).mean(1), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(pooled.astype(np.float32), ref.mean(1), rtol=TOL, atol=TOL)
    assert float(np.abs(grid).max()) > 0.5  # real activations, not zeros


def test_manifest_records_encoder_dims_dataset_and_shards(small_flickr8k, extracted):
    m = json.loads((extracted / MANIFEST).read_text())
    assert m["encoder"] == DEFAULT_ENCODER
    assert m["spec"] == json.loads(json.dumps(get_spec(DEFAULT_ENCODER).to_dict()))
    assert (m["num_regions"], m["feature_dim"]) == (49, 1280)
    assert m["preprocessing"]["size"] == 224
    assert m["dataset"]["name"] == "f8k-small"
    assert m["complete"] is True and m["failed"] == [] and m["num_extracted"] == 30
    assert [s["file"] for s in m["shards"]] == [shard_name(k) for k in range(8)]
    assert [s["count"] for s in m["shards"]] == [4] * 7 + [2]


def test_store_random_access_across_shards(small_flickr8k, extracted):
    store = FeatureStore(extracted)
    ids = [r.id for r in small_flickr8k.images]
    assert store.encoder_name == DEFAULT_ENCODER
    assert store.ids.tolist() == ids and len(store) == 30
    assert ids[0] in store and ids[-1] in store and -1 not in store and "x" not in store
    _, grid_all = store.load_all("grid")
    ids_p, pooled_all = store.load_all("pooled")
    assert ids_p.tolist() == ids and grid_all.shape == (30, 49, 1280) and pooled_all.shape == (30, 1280)

    pick = [ids[29], ids[0], ids[13], ids[0], ids[5]]  # shards 7, 0, 3, 0 again, 1; unsorted, a duplicate
    rows = [ids.index(i) for i in pick]
    many = store.get_many(pick, "grid")
    assert many.dtype == np.float16 and many.shape == (5, 49, 1280)
    np.testing.assert_array_equal(many, grid_all[rows])
    np.testing.assert_array_equal(store.get_many(pick, "pooled"), pooled_all[rows])
    np.testing.assert_array_equal(store.get(ids[13]), grid_all[13])
    np.testing.assert_array_equal(store.get(ids[13], kind="pooled"), pooled_all[13])
    with pytest.raises(FeaturesError, match="no features"):
        store.get(10**9)

    clone = pickle.loads(pickle.dumps(store))  # the store has open HDF5 files now; pickling must drop them
    np.testing.assert_array_equal(clone.get(ids[29]), grid_all[29])
    store.close()


class _Grids(torch.utils.data.Dataset):
    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.ids = store.ids.tolist()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):  # noqa: ANN204
        import os

        return self.ids[i], torch.from_numpy(self.store.get(self.ids[i])), os.getpid()


def test_store_in_a_dataloader_with_two_worker_processes(extracted):
    store = FeatureStore(extracted)
    ids, grid_all = store.load_all("grid")  # opens every shard in the parent before the workers fork
    loader = torch.utils.data.DataLoader(_Grids(store), batch_size=3, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    seen, pids = {}, set()
    for bids, grids, pid in loader:
        pids.update(pid.tolist())
        for i, g in zip(bids.tolist(), grids, strict=True):
            seen[i] = g.numpy()
    assert len(pids) == 2  # really two processes
    assert sorted(seen) == sorted(ids.tolist())
    for row, i in enumerate(ids.tolist()):
        np.testing.assert_array_equal(seen[i], grid_all[row])


def test_interrupted_run_resumes_to_the_same_result(small_flickr8k, extracted, tmp_path):
    out = tmp_path / "feats"
    # A real interruption of the real function: Ctrl-C arrives once 10 images are through, mid-shard 2.
    # (Decoding in DataLoader worker processes here; the reference run decoded in threads.)
    with pytest.raises(KeyboardInterrupt):
        extract_features(small_flickr8k, out=out, shard_size=SHARD, batch_size=BATCH, workers=2, device="cpu",
                         decode="processes", progress=Recorder(stop_after=10))
    m = json.loads((out / MANIFEST).read_text())
    assert [s["file"] for s in m["shards"]] == [shard_name(0), shard_name(1)] and m["complete"] is False
    assert (out / (shard_name(2) + ".tmp")).is_file()  # the half shard is on disk, under its temporary name
    assert not (out / shard_name(2)).exists()
    with pytest.raises(FeaturesError, match="incomplete"):
        FeatureStore(out)
    partial = FeatureStore(out, allow_incomplete=True)
    assert len(partial) == 8  # the reader sees only the two complete shards

    rec = Recorder()
    extract_features(small_flickr8k, out=out, shard_size=SHARD, batch_size=BATCH, workers=2, device="cpu", progress=rec)
    assert any("resuming" in m and "2 of 8" in m for m in rec.infos)
    assert rec.seen == 22  # only the images of the unfinished shards
    assert not list(out.glob("*.tmp"))
    resumed, reference = FeatureStore(out), FeatureStore(extracted)
    assert resumed.ids.tolist() == reference.ids.tolist()
    for kind in ("grid", "pooled"):
        np.testing.assert_array_equal(resumed.load_all(kind)[1], reference.load_all(kind)[1])

    # A shard lost from a complete folder is extracted again, and only that one.
    (out / shard_name(3)).unlink()
    with pytest.raises(FeaturesError, match="run `capcli features` again"):
        FeatureStore(out)
    rec = Recorder()
    extract_features(small_flickr8k, out=out, shard_size=SHARD, batch_size=BATCH, workers=1, device="cpu", progress=rec)
    assert rec.seen == 4
    np.testing.assert_array_equal(FeatureStore(out).load_all("grid")[1], reference.load_all("grid")[1])

    # A complete folder: nothing happens, and it says so.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rec = Recorder()
    extract_features(small_flickr8k, out=out, shard_size=SHARD, batch_size=BATCH, workers=2, device="cpu", progress=rec)
    assert rec.seen == 0 and any("nothing to do" in m for m in rec.infos)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_unreadable_images_are_listed_and_skipped(example_photos, tmp_path):
    photos = [p for p in example_photos if p.name in {"astronaut.jpg", "camera.png", "chelsea.jpg"}]
    truncated = (example_photos[0].parent / "coffee.jpg").read_bytes()[:3000]
    ds_dir = _photos_dataset(tmp_path, photos, {"broken.jpg": truncated, "notes.jpg": b"not a photo at all\n"})
    ds = Dataset.load(ds_dir)
    rec = Recorder()
    out = extract_features(ds, out=tmp_path / "out", shard_size=2, batch_size=2, workers=1, device="cpu",
                           progress=rec)

    store = FeatureStore(out)
    good = [r.id for r in ds.images if r.file in {p.name for p in photos}]
    assert store.ids.tolist() == good  # camera.png is grayscale: read fine
    failed = {f["file"]: f for f in store.manifest["failed"]}
    assert sorted(failed) == ["broken.jpg", "notes.jpg"]
    assert failed["notes.jpg"]["id"] == 5 and "not an image" in failed["notes.jpg"]["reason"]
    assert failed["broken.jpg"]["id"] == 4 and "broken.jpg" in failed["broken.jpg"]["reason"]
    assert store.manifest["num_extracted"] == 3 and store.manifest["num_images"] == 5
    assert [s["count"] for s in store.manifest["shards"]] == [2, 1, 0]  # the last shard held only broken files
    assert sum("skipped" in w for w in rec.warnings) == 3 and any(w.startswith("2 unreadable") for w in rec.warnings)
    ref = _direct(ds, good).numpy()
    np.testing.assert_allclose(store.load_all("grid")[1].astype(np.float32), ref, rtol=TOL, atol=TOL)

    # The broken photo mended: a plain rerun leaves the folder alone and says how to retry; --retry-failed
    # extracts the shards that had failures again, and only those.
    (Path(ds.image_root) / "broken.jpg").write_bytes((example_photos[0].parent / "coffee.jpg").read_bytes())
    first = (out / shard_name(0)).stat().st_mtime_ns
    rec = Recorder()
    extract_features(ds, out=out, shard_size=2, workers=1, device="cpu", progress=rec)
    assert any("nothing to do" in m and "--retry-failed" in m for m in rec.infos), rec.infos
    assert len(FeatureStore(out)) == 3
    extract_features(ds, out=out, shard_size=2, workers=1, device="cpu", retry_failed=True)
    store = FeatureStore(out)
    assert [f["file"] for f in store.manifest["failed"]] == ["notes.jpg"]
    assert sorted(store.ids.tolist()) == sorted([*good, 4]) and store.manifest["num_extracted"] == 4
    assert (out / shard_name(0)).stat().st_mtime_ns == first  # the shard without failures was kept
    np.testing.assert_allclose(store.get(4).astype(np.float32), _direct(ds, [4]).numpy()[0], rtol=TOL, atol=TOL)


def test_cli_extracts_a_prepared_folder_and_reruns_as_a_no_op(example_photos, tmp_path):
    ds_dir = _photos_dataset(tmp_path, example_photos)
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(app, ["features", str(ds_dir), "--out", str(out), "--shard-size", "4", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "features: 5 images" in r.stdout and str(out) in r.stdout.replace("\n", "")
    assert [s["count"] for s in FeatureStore(out).manifest["shards"]] == [4, 1]

    r = runner.invoke(app, ["features", str(ds_dir), "--out", str(out), "--shard-size", "4"])
    assert r.exit_code == 0 and "nothing to do" in r.output
    assert f"already extracted: 5 images in {out}" in r.output.replace("\n", ""), r.output

    # Another image set into the same folder: refused.
    with pytest.raises(FeaturesError, match="different image set"):
        extract_features(Dataset.load(ds_dir), out=out, image_ids=[1, 2])

    # The same ids, other photos (the dataset prepared again from other files): refused, not reused.
    shuffled = Dataset.load(ds_dir)
    files = [r.file for r in shuffled.images]
    for r, f in zip(shuffled.images, files[1:] + files[:1], strict=True):
        r.file = f
    with pytest.raises(FeaturesError, match="other photos"):
        extract_features(shuffled, out=out)
    with pytest.raises(FeaturesError, match="other photos"):
        FeatureStore(out).check_photos(shuffled)
    FeatureStore(out).check_photos(Dataset.load(ds_dir))  # the photos it was extracted from pass

    # Another encoder into the same folder: refused before anything is loaded.
    r = runner.invoke(app, ["features", str(ds_dir), "--out", str(out), "--encoder", "resnet50"])
    assert r.exit_code == 1 and "error:" in r.stderr and "efficientnet-lite0" in r.stderr
    assert "Traceback" not in r.output


def test_cli_dataset_by_name_goes_to_the_default_features_folder(example_photos, tmp_path):
    ds = Dataset.load(_photos_dataset(tmp_path, example_photos[:2]))
    ds.save(paths.dataset_dir("photos"))  # under $CAPCLI_HOME, isolated per test
    r = CliRunner().invoke(app, ["features", "photos", "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    store = FeatureStore.open_for("photos", DEFAULT_ENCODER)
    assert store.folder == paths.features_dir("photos", DEFAULT_ENCODER) and len(store) == 2


def test_cli_torchvision_encoder_without_weights_fails_clearly(example_photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    ds_dir = _photos_dataset(tmp_path, example_photos[:1])
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["features", str(ds_dir), "--encoder", "resnet50", "--out", str(out)])
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "--weights" in lines[0] and "resnet50" in lines[0]
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    assert not out.exists()  # nothing written for a run that could not start


def test_a_dataset_where_nothing_can_be_read_is_an_error(tmp_path):
    ds = Dataset.load(_photos_dataset(tmp_path, [], {"a.jpg": b"text", "b.png": b""}))
    with pytest.raises(FeaturesError, match="none of the 2 images could be read"):
        extract_features(ds, out=tmp_path / "out", workers=0, device="cpu")
    shutil.rmtree(ds.image_root)
    with pytest.raises(DatasetError, match="image folder"):
        extract_features(ds, out=tmp_path / "out2", workers=0, device="cpu")
    assert not (tmp_path / "out2").exists()


def test_missing_features_are_a_one_line_error(tmp_path):
    with pytest.raises(FeaturesError, match="run `capcli features"):
        FeatureStore(tmp_path / "nowhere")
    with pytest.raises(FeaturesError, match="run `capcli features photos --encoder efficientnet-lite0`"):
        FeatureStore.open_for("photos")
    r = CliRunner().invoke(app, ["features", str(tmp_path / "nope")])
    assert r.exit_code != 0 and "capcli prepare" in r.stderr and "Traceback" not in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_extraction_matches_the_cpu_encoder_within_fp16_autocast_error(example_photos, tmp_path):
    ds = Dataset.load(_photos_dataset(tmp_path, example_photos))
    store = FeatureStore(extract_features(ds, out=tmp_path / "out", shard_size=4, workers=1, device="cuda"))
    ids = [r.id for r in ds.images]
    assert store.ids.tolist() == ids
    ref = _direct(ds, ids).numpy()  # float32 on the CPU
    grid = store.load_all("grid")[1].astype(np.float32)
    assert np.linalg.norm(grid - ref) / np.linalg.norm(ref) < 0.02  # fp16 autocast through 16 conv blocks
    pooled = store.load_all("pooled")[1].astype(np.float32)
    np.testing.assert_allclose(pooled, grid.mean(1), atol=TOL, rtol=TOL)
