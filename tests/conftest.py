"""Shared fixtures. Real data only: the project's example photos, and ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "photos"
SHARED = Path(os.environ.get("CAPCLI_SHARED_DATA", ROOT.parent / "shared" / "data"))
FLICKR8K = SHARED / "flickr8k"
COCO_MINI = SHARED / "coco-mini"

requires_shared = pytest.mark.skipif(
    not (FLICKR8K / "captions.json").is_file(),
    reason=f"real captioned photos not found at {SHARED} (set CAPCLI_SHARED_DATA to the shared/data folder)",
)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.capcli: each test gets its own data root."""
    monkeypatch.setenv("CAPCLI_HOME", str(tmp_path_factory.mktemp("capcli_home")))


@pytest.fixture(scope="session")
def example_photos() -> list[Path]:
    """The redistributable photos shipped in examples/photos (see its LICENSE.md)."""
    photos = sorted(p for p in EXAMPLES.iterdir() if p.suffix in {".jpg", ".png"})
    assert len(photos) >= 5
    return photos


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    if not (FLICKR8K / "captions.json").is_file():
        pytest.skip(f"real captioned photos not found at {SHARED} (set CAPCLI_SHARED_DATA)")
    return FLICKR8K


@pytest.fixture(scope="session")
def coco_mini_dir() -> Path:
    if not (COCO_MINI / "annotations").is_dir():
        pytest.skip(f"COCO slice not found at {COCO_MINI} (set CAPCLI_SHARED_DATA)")
    return COCO_MINI


@pytest.fixture(scope="session")
def small_flickr8k(flickr8k_dir, tmp_path_factory):
    """A prepared 30-image slice of Flickr8k (20 train, 10 val), read in place from shared data."""
    import json

    from capcli.prepare import prepare

    work = tmp_path_factory.mktemp("f8k_small")
    caps = json.loads((flickr8k_dir / "captions.json").read_text())
    splits = json.loads((flickr8k_dir / "splits.json").read_text())
    keep = {"train": splits["train"][:20], "val": splits["val"][:10]}
    names = set(keep["train"]) | set(keep["val"])
    images = [im for im in caps["images"] if im["file_name"] in names]
    ids = {im["id"] for im in images}
    sub = {"images": images, "annotations": [a for a in caps["annotations"] if a["image_id"] in ids]}
    (work / "captions.json").write_text(json.dumps(sub))
    (work / "splits.json").write_text(json.dumps(keep))
    ds, _ = prepare(work, kind="coco-splits", images=flickr8k_dir / "images", name="f8k-small", out=work / "ds")
    return ds


@pytest.fixture(scope="session")
def small_flickr8k_features(small_flickr8k, tmp_path_factory):
    """Real efficientnet-lite0 features (grid and pooled) of the 30 ``small_flickr8k`` photos, extracted once."""
    from capcli.features import extract_features

    out = tmp_path_factory.mktemp("f8k_small_features") / "efficientnet-lite0"
    return extract_features(small_flickr8k, "efficientnet-lite0", out=out, workers=0, device="cpu")
