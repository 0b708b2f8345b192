"""capcli prepare: every source kind built from real photos and captions, and every kind of bad input.

Sources are written into tmp folders from the real data in ../shared/data (read in place: image folders are
symlinked or passed with --images, never copied) or from the project's examples/photos.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli.errors import DatasetError, UsageError
from capcli.layout import Dataset, ImageRecord
from capcli.prepare import detect_kind, prepare
from capcli.progress import Progress

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "photos"


class Recorder(Progress):
    """Keeps what prepare reports, so tests can assert the warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.started: list[tuple[str, int | None]] = []
        self.advanced = 0

    def start(self, description: str, total: int | None = None, unit: str = "img") -> None:
        self.started.append((description, total))

    def advance(self, n: int = 1, **fields: object) -> None:
        self.advanced += n

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def _error(match: str, *args, **kwargs) -> str:
    """Run prepare, expect a DatasetError matching ``match``, return its (one-line) message."""
    with pytest.raises(DatasetError, match=match) as e:
        prepare(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- real data, loaded once ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def f8k(flickr8k_dir) -> dict:
    """Flickr8k captions by file name, and its splits."""
    doc = json.loads((flickr8k_dir / "captions.json").read_text())
    name = {im["id"]: im["file_name"] for im in doc["images"]}
    caps: dict[str, list[str]] = {}
    for a in doc["annotations"]:
        caps.setdefault(name[a["image_id"]], []).append(a["caption"])
    splits = json.loads((flickr8k_dir / "splits.json").read_text())
    return {"captions": caps, "splits": splits, "coco": doc, "images": flickr8k_dir / "images"}


def _pick(f8k: dict, train: int, val: int, restval: int = 0) -> list[tuple[str, str, list[str]]]:
    """(file, split, captions) for the first images of each split."""
    out = []
    for split, n in (("train", train), ("val", val), ("restval", restval)):
        out += [(f, split, f8k["captions"][f]) for f in f8k["splits"][split][:n]]
    return out


def _coco_subset(f8k: dict, files: list[str]) -> dict:
    """A COCO captions file restricted to ``files``, with the real ids and captions."""
    keep = set(files)
    images = [im for im in f8k["coco"]["images"] if im["file_name"] in keep]
    ids = {im["id"] for im in images}
    doc = {"images": images, "annotations": [a for a in f8k["coco"]["annotations"] if a["image_id"] in ids]}
    return json.loads(json.dumps(doc))  # a deep copy: tests edit it


@pytest.fixture(scope="module")
def coco_mini(coco_mini_dir) -> dict[str, dict]:
    ann = coco_mini_dir / "annotations"
    return {s: json.loads((ann / f"captions_{s}2017.json").read_text()) for s in ("train", "val")}


def _karpathy_coco(coco_mini: dict[str, dict], extra: int = 0) -> dict:
    """The real dataset_coco.json shape for the coco-mini photos; splits cycle train/val/test/restval."""
    images, sentid = [], 0
    for sub in ("train", "val"):
        doc = coco_mini[sub]
        anns: dict[int, list[str]] = {}
        for a in doc["annotations"]:
            anns.setdefault(a["image_id"], []).append(a["caption"])
        for im in doc["images"]:
            n = len(images)
            sents = []
            for c in anns[im["id"]]:
                sents.append({"tokens": c.lower().strip(" .").split(), "raw": c, "imgid": n, "sentid": sentid})
                sentid += 1
            images.append({"filepath": f"{sub}2017", "sentids": [s["sentid"] for s in sents],
                           "filename": im["file_name"], "imgid": n, "split": ("train", "val", "test", "restval")[n % 4],
                           "sentences": sents, "cocoid": im["id"]})
    for k in range(extra):  # Karpathy's file lists images this slice does not have
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{k:012d}.jpg", "imgid": len(images),
                       "split": "test", "sentences": [{"raw": "A photo.", "tokens": ["a", "photo"]}],
                       "cocoid": 900_000_000 + k})
    return {"images": images, "dataset": "coco"}


def _karpathy_flickr(items: list[tuple[str, str, list[str]]]) -> dict:
    """The real dataset_flickr8k.json shape: no filepath, no cocoid."""
    images, sentid = [], 0
    for n, (f, split, caps) in enumerate(items):
        sents = []
        for c in caps:
            sents.append({"tokens": c.lower().strip(" .").split(), "raw": c, "imgid": n, "sentid": sentid})
            sentid += 1
        images.append({"sentids": [s["sentid"] for s in sents], "imgid": n, "sentences": sents, "split": split,
                       "filename": f})
    return {"images": images, "dataset": "flickr8k"}


def _write_json(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _check_files(ds: Dataset) -> None:
    assert ds.images
    for r in ds.images:
        assert ds.path(r).is_file(), r
        assert r.captions and all(c == c.strip() and c for c in r.captions)


# ---- each source kind -----------------------------------------------------------------------------------
def test_coco_folder_official_split(coco_mini_dir, coco_mini, tmp_path) -> None:
    rec = Recorder()
    assert detect_kind(coco_mini_dir) == "coco"
    ds, rep = prepare(coco_mini_dir, out=tmp_path / "ds", progress=rec)
    assert rep.kind == "coco" and rep.out == tmp_path / "ds"
    assert ds.name == "coco-mini" and ds.image_root == coco_mini_dir.resolve()
    assert rep.splits == {"train": 80, "val": 79} and rep.images == 159
    assert rep.captions == sum(len(d["annotations"]) for d in coco_mini.values())
    assert any("no Karpathy split file" in n for n in rep.notes)
    assert rec.started == [("checking images", 159)] and rec.advanced == 159 and rec.warnings == []
    _check_files(ds)
    im = coco_mini["val"]["images"][0]
    r = ds.get(im["id"])  # COCO ids are kept
    assert r.file == f"val2017/{im['file_name']}" and r.split == "val"
    assert r.captions == [a["caption"].strip() for a in coco_mini["val"]["annotations"] if a["image_id"] == im["id"]]
    back = Dataset.load(tmp_path / "ds")
    assert back.images == ds.images and back.name == ds.name and back.image_root == ds.image_root


def test_coco_single_annotation_file(coco_mini_dir, tmp_path) -> None:
    src = coco_mini_dir / "annotations" / "captions_val2017.json"
    assert detect_kind(src) == "coco"
    ds, rep = prepare(src, out=tmp_path / "ds")
    assert ds.name == "coco-mini" and rep.splits == {"val": 79}
    assert all(r.file.startswith("val2017/") for r in ds.images)
    _check_files(ds)


def test_coco_with_karpathy_split(coco_mini_dir, coco_mini, tmp_path) -> None:
    kdoc = _karpathy_coco(coco_mini, extra=3)
    kfile = _write_json(tmp_path / "dataset_coco.json", kdoc)
    ds, rep = prepare(coco_mini_dir, karpathy=kfile, out=tmp_path / "ds")
    assert rep.images == 159 and rep.splits == {"train": 40, "val": 40, "test": 40, "restval": 39}
    assert any("3 images of the Karpathy split are not in the annotation files" in n for n in rep.notes)
    for k in kdoc["images"][:159]:
        r = ds.get(k["cocoid"])
        assert r.split == k["split"] and r.file == f"{k['filepath']}/{k['filename']}"
        assert r.captions == [s["raw"].strip() for s in k["sentences"]]
    assert len(ds.split("train")) == 79  # train + restval
    _check_files(ds)


def test_coco_folder_finds_its_karpathy_file(coco_mini_dir, coco_mini, tmp_path) -> None:
    """A COCO download folder (annotations/, train2017/, val2017/) with dataset_coco.json beside them."""
    src = tmp_path / "coco"
    for sub in ("train", "val"):
        _write_json(src / "annotations" / f"captions_{sub}2017.json", coco_mini[sub])
        os.symlink(coco_mini_dir / f"{sub}2017", src / f"{sub}2017")
    _write_json(src / "dataset_coco.json", _karpathy_coco(coco_mini))
    ds, rep = prepare(src, out=tmp_path / "ds")
    assert ds.name == "coco" and rep.kind == "coco" and rep.notes == []
    assert rep.splits == {"train": 40, "val": 40, "test": 40, "restval": 39}
    _check_files(ds)


def test_karpathy_alone_coco_shape(coco_mini_dir, coco_mini, tmp_path) -> None:
    kfile = _write_json(tmp_path / "dataset_coco.json", _karpathy_coco(coco_mini, extra=2))
    assert detect_kind(kfile) == "karpathy"
    rec = Recorder()
    ds, rep = prepare(kfile, images=coco_mini_dir, out=tmp_path / "ds", progress=rec)
    assert rep.kind == "karpathy" and rep.images == 159 and rep.missing_images == 2
    assert rec.warnings == [f"2 listed images are missing under {coco_mini_dir}: skipped"]
    assert {r.id for r in ds.images} == {im["id"] for d in coco_mini.values() for im in d["images"]}  # cocoids
    _check_files(ds)


def test_karpathy_alone_flickr8k_shape(f8k, tmp_path) -> None:
    items = _pick(f8k, 8, 4, 2)
    kdoc = _karpathy_flickr(items)
    del kdoc["images"][0]["sentences"][0]["raw"]  # a sentence with tokens only
    _write_json(tmp_path / "src" / "dataset_flickr8k.json", kdoc)
    assert detect_kind(tmp_path / "src") == "karpathy"
    ds, rep = prepare(tmp_path / "src", images=f8k["images"], out=tmp_path / "ds")
    assert rep.kind == "karpathy" and rep.splits == {"train": 8, "val": 4, "restval": 2}
    assert [r.id for r in ds.images] == list(range(14))  # Karpathy's imgid
    assert [(r.file, r.split) for r in ds.images] == [(f, s) for f, s, _ in items]
    assert ds.images[0].captions[0] == " ".join(kdoc["images"][0]["sentences"][0]["tokens"])
    assert ds.images[1].captions == [c.strip() for c in items[1][2]]
    _check_files(ds)


def test_flickr8k_text_release(f8k, tmp_path) -> None:
    items = _pick(f8k, 6, 6, 1)  # 6 train, 3 dev, 3 test, 1 in no list (-> restval)
    src = tmp_path / "Flickr8k_text"
    src.mkdir()
    lines = [f"{f}#{i}\t{c}" for f, _, caps in items for i, c in enumerate(caps)]
    lines.insert(3, "2258277193_586949ec62.jpg.1#0\tA photo that is listed but does not exist .")  # a real quirk
    (src / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n\n")
    files = [f for f, _, _ in items]
    (src / "Flickr_8k.trainImages.txt").write_text("\n".join(files[:6]) + "\n")
    (src / "Flickr_8k.devImages.txt").write_text("\n".join(files[6:9]) + "\n")
    (src / "Flickr_8k.testImages.txt").write_text("\n".join(files[9:12]) + "\n")
    os.symlink(f8k["images"], src / "Flicker8k_Dataset")  # the image folder's name in the official zip
    assert detect_kind(src) == "flickr8k"
    rec = Recorder()
    ds, rep = prepare(src, out=tmp_path / "ds", progress=rec)
    assert rep.kind == "flickr8k" and rep.splits == {"train": 6, "val": 3, "test": 3, "restval": 1}
    assert rep.missing_images == 1 and len(rec.warnings) == 1 and "1 listed images are missing" in rec.warnings[0]
    assert rep.notes == ["captioned images in none of the three split lists are put in restval"]
    assert ds.image_root == (src / "Flicker8k_Dataset").resolve()
    assert [r.file for r in ds.images] == files and [r.id for r in ds.images] == list(range(1, 14))
    assert [r.captions for r in ds.images] == [[c.strip() for c in caps] for _, _, caps in items]
    _check_files(ds)


def _flickr8k_text(src: Path, items: list[tuple[str, str, list[str]]], lists: dict[str, list[str]],
                   bom: bool = False) -> Path:
    """Flickr8k's text release in ``src``: the token file and the three lists (``bom``: every file starts with one)."""
    src.mkdir(exist_ok=True)
    enc = "utf-8-sig" if bom else "utf-8"
    lines = [f"{f}#{i}\t{c}" for f, _, caps in items for i, c in enumerate(caps)]
    (src / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding=enc)
    for key in ("train", "dev", "test"):
        (src / f"Flickr_8k.{key}Images.txt").write_text("".join(f + "\n" for f in lists[key]), encoding=enc)
    return src


def test_flickr8k_text_photo_in_two_lists_is_an_error(f8k, tmp_path) -> None:
    items = _pick(f8k, 2, 1)
    (a, _, _), (b, _, _), (c, _, _) = items
    src = _flickr8k_text(tmp_path / "ft", items, {"train": [a, b], "dev": [c, a], "test": [c]})
    msg = _error(f"{a} is in both train and val$", src, images=f8k["images"], out=tmp_path / "ds")
    assert msg.startswith(str(src / "Flickr_8k.devImages.txt"))
    _flickr8k_text(src, items, {"train": [a, b], "dev": [c], "test": [c]})
    _error(f"testImages.txt: {c} is in both val and test$", src, images=f8k["images"], out=tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    _flickr8k_text(src, items, {"train": [a, b, b], "dev": [c, "not-captioned.jpg"], "test": []})  # twice in one list
    rec = Recorder()
    ds, rep = prepare(src, images=f8k["images"], out=tmp_path / "ds", progress=rec)
    assert [(r.file, r.split) for r in ds.images] == [(a, "train"), (b, "train"), (c, "val")]
    assert rep.unknown_listed == 1 and not rep.notes
    assert rec.warnings == [f"1 file names in the split lists are not in {src / 'Flickr8k.token.txt'}: skipped"]


def test_byte_order_marks_are_stripped(f8k, tmp_path) -> None:
    """Files saved by Windows editors start with a UTF-8 BOM; it is not part of the first file name or caption."""
    items = _pick(f8k, 2, 1)
    files = [f for f, _, _ in items]
    src = _flickr8k_text(tmp_path / "ft", items, {"train": files[:2], "dev": files[2:], "test": []}, bom=True)
    ds, rep = prepare(src, images=f8k["images"], out=tmp_path / "ds")
    assert [(r.file, r.split) for r in ds.images] == [(f, s) for f, s, _ in items]
    assert rep.splits == {"train": 2, "val": 1} and not rep.notes and rep.missing_images == 0
    src, docs = _coco_src(f8k, tmp_path / "src", n=3)
    src.mkdir()
    for name in ("captions", "splits"):
        (src / f"{name}.json").write_text(json.dumps(docs[name]), encoding="utf-8-sig")
    ds, rep = prepare(src, images=f8k["images"], out=tmp_path / "ds2")
    assert [r.file for r in ds.images] == docs["splits"]["train"] and rep.splits == {"train": 3}
    kfile = tmp_path / "dataset_flickr8k.json"
    kfile.write_text(json.dumps(_karpathy_flickr(items)), encoding="utf-8-sig")
    ds, _ = prepare(kfile, images=f8k["images"], out=tmp_path / "ds3")
    assert [(r.file, r.split) for r in ds.images] == [(f, s) for f, s, _ in items]


def test_csv_with_split_column(f8k, tmp_path) -> None:
    items = _pick(f8k, 5, 3)
    rows = ["image,caption,split"]
    for f, split, caps in items:
        rows += [f'{f},"{c.replace(chr(34), chr(34) * 2)}",{"dev" if split == "val" else split}' for c in caps]
    # a spreadsheet export: byte-order mark and CRLF line ends
    (tmp_path / "captions.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8-sig"))
    assert detect_kind(tmp_path / "captions.csv") == "csv"
    ds, rep = prepare(tmp_path / "captions.csv", images=f8k["images"], name="mine", out=tmp_path / "ds")
    assert ds.name == "mine" and rep.kind == "csv" and rep.splits == {"train": 5, "val": 3}
    expected = [(f, s, [c.strip() for c in caps]) for f, s, caps in items]
    assert [(r.file, r.split, r.captions) for r in ds.images] == expected
    _check_files(ds)


def test_csv_without_split_column_next_to_the_photos(example_photos, tmp_path) -> None:
    """examples/photos with hand-written captions; the image folder defaults to the CSV's folder."""
    src = tmp_path / "photos"
    src.mkdir()
    for p in example_photos:
        os.symlink(p, src / p.name)
    captions = {
        "astronaut.jpg": ["An astronaut in a white suit poses in front of a flag .", "A smiling woman in a space suit"],
        "camera.png": ["A man with a camera on a tripod in a field ."],
        "chelsea.jpg": ["A tabby cat looks to the side .", "an orange and brown cat, sitting"],
        "coffee.jpg": ["A cup of coffee on a saucer ."],
        "rocket.jpg": ["A rocket stands on the launch pad ."],
    }
    text = "Image, Caption\n" + "".join(f'{f},"{c}"\n' for f, cs in captions.items() for c in cs)  # sloppy header
    (src / "captions.csv").write_text(text)
    ds, rep = prepare(src / "captions.csv", out=tmp_path / "ds")
    assert ds.name == "photos" and ds.image_root == src.resolve()
    assert {r.file: r.captions for r in ds.images} == captions
    assert set(rep.splits) <= {"train", "val", "test"} and sum(rep.splits.values()) == 5
    assert any("no 'split' column" in n for n in rep.notes)
    again, _ = prepare(src / "captions.csv", out=tmp_path / "ds2")
    assert [r.split for r in again.images] == [r.split for r in ds.images]  # the hash split is deterministic
    _check_files(ds)


def test_coco_splits_real_flickr8k(flickr8k_dir, f8k, tmp_path) -> None:
    assert detect_kind(flickr8k_dir) == "coco-splits"
    ds, rep = prepare(flickr8k_dir, out=tmp_path / "ds")
    assert rep.kind == "coco-splits" and ds.name == "flickr8k"
    assert rep.splits == {"train": 6000, "val": 1000, "restval": 91} and rep.captions == 5 * 7091
    assert len(ds.split("train")) == 6091 and len(ds.references("val")) == 1000
    assert {r.id for r in ds.images} == {im["id"] for im in f8k["coco"]["images"]}
    r = ds.images[0]
    assert ds.path(r).is_file() and r.captions == [c.strip() for c in f8k["captions"][r.file]]
    assert Dataset.load(tmp_path / "ds").split_counts() == rep.splits


def test_coco_splits_with_explicit_split_file(f8k, tmp_path) -> None:
    items = _pick(f8k, 4, 2, 1)
    _write_json(tmp_path / "ann.json", _coco_subset(f8k, [f for f, _, _ in items]))
    split_doc = {"dataset": "flickr8k", "train": [f for f, s, _ in items if s == "train"],
                 "validation": [f for f, s, _ in items if s == "val"]}  # restval image in no list: left out
    _write_json(tmp_path / "my_splits.json", split_doc)
    rec = Recorder()
    ds, rep = prepare(tmp_path / "ann.json", kind="coco-splits", splits=tmp_path / "my_splits.json",
                      images=f8k["images"], out=tmp_path / "ds", progress=rec)
    assert rep.splits == {"train": 4, "val": 2} and rep.unlisted_images == 1 and rep.unknown_listed == 0
    assert rec.warnings == [f"1 images of {tmp_path / 'ann.json'} are in no split of {tmp_path / 'my_splits.json'}: "
                            "skipped"]
    _check_files(ds)


def test_small_flickr8k_fixture(small_flickr8k) -> None:
    assert small_flickr8k.split_counts() == {"train": 20, "val": 10}
    _check_files(small_flickr8k)


def test_default_output_is_under_the_data_root(example_photos, tmp_path) -> None:
    (tmp_path / "c.csv").write_text("image,caption\nchelsea.jpg,A cat .\n")
    ds, rep = prepare(tmp_path / "c.csv", images=EXAMPLES, name="cats")
    assert rep.out == Path(os.environ["CAPCLI_HOME"]) / "datasets" / "cats"
    assert Dataset.load(rep.out).images == ds.images == [ImageRecord(1, "chelsea.jpg", ds.images[0].split, ["A cat ."])]


# ---- bad input ---------------------------------------------------------------------------------------
def _coco_src(f8k: dict, tmp_path: Path, n: int = 5) -> tuple[Path, dict]:
    items = _pick(f8k, n, 0)
    doc = _coco_subset(f8k, [f for f, _, _ in items])
    split_doc = {"train": [f for f, _, _ in items]}
    return tmp_path, {"captions": doc, "splits": split_doc}


def _write_src(src: Path, docs: dict) -> Path:
    _write_json(src / "captions.json", docs["captions"])
    _write_json(src / "splits.json", docs["splits"])
    return src


def test_missing_images_warn_with_a_count(f8k, tmp_path) -> None:
    src, docs = _coco_src(f8k, tmp_path / "src")
    for im in docs["captions"]["images"][:2]:
        docs["splits"]["train"].remove(im["file_name"])
        im["file_name"] = "gone_" + im["file_name"]
        docs["splits"]["train"].append(im["file_name"])
    _write_src(src, docs)
    rec = Recorder()
    ds, rep = prepare(src, images=f8k["images"], out=tmp_path / "ds", progress=rec)
    assert rep.missing_images == 2 and rep.images == 3 and len(ds.images) == 3
    assert rec.warnings == [f"2 listed images are missing under {f8k['images']}: skipped"]


def test_all_images_missing_is_an_error(f8k, tmp_path) -> None:
    src = _write_src(*_coco_src(f8k, tmp_path / "src"))
    msg = _error("none of the 5 images", src, images=EXAMPLES, out=tmp_path / "ds")
    assert msg.endswith(f"exist under {EXAMPLES}; pass --images")
    assert not (tmp_path / "ds").exists()
    _error(r"image folder .*nowhere does not exist; pass --images", src, images=tmp_path / "nowhere")


def test_malformed_json(f8k, tmp_path) -> None:
    src = _write_src(*_coco_src(f8k, tmp_path / "src"))
    good = (src / "captions.json").read_text()
    (src / "captions.json").write_text(good[: len(good) // 2])
    _error(r"captions.json: malformed JSON \(", src, images=f8k["images"])
    (src / "captions.json").write_text("[1, 2, 3]")
    _error("not a COCO captions file", src, images=f8k["images"])
    (src / "captions.json").write_bytes(b"\xff\xfe\x00garbage")
    _error("malformed JSON", src, images=f8k["images"])
    doc = json.loads(good)
    del doc["annotations"][0]["image_id"]
    (src / "captions.json").write_text(json.dumps(doc))
    _error(r"malformed COCO file \(missing 'image_id'\)", src, images=f8k["images"])
    doc = json.loads(good)
    del doc["images"][1]["file_name"]
    (src / "captions.json").write_text(json.dumps(doc))
    _error("has no 'file_name'", src, images=f8k["images"])
    doc = json.loads(good)
    doc["annotations"][0]["caption"] = ["not", "text"]
    (src / "captions.json").write_text(json.dumps(doc))
    _error("caption that is not text", src, images=f8k["images"])
    (src / "captions.json").write_text(good)
    (src / "splits.json").write_text('{"train": ')
    _error(r"splits.json: malformed JSON", src, images=f8k["images"])
    (src / "splits.json").write_text('["a.jpg"]')
    _error("expected a JSON object of split name", src, images=f8k["images"])
    _error(r"cannot read", src, splits=src, kind="coco-splits", images=f8k["images"])  # a folder


def test_malformed_split_lists(f8k, tmp_path) -> None:
    """A split key must hold a list of file names; the error names the split file and the key."""
    src = _write_src(*_coco_src(f8k, tmp_path / "src"))
    files = json.loads((src / "splits.json").read_text())["train"]
    cases = [
        ({"train": files[0]}, f"'train' must be a list of file names, not \"{files[0]}\""),
        ({"train": files[:2], "val": files[2]}, "'val' must be a list of file names, not"),
        ({"train": files[:2] + [5]}, "'train' must be a list of file names, not a list holding 5"),
        ({"train": [files[:2]]}, "'train' must be a list of file names, not a list holding"),
        ({"dev": None, "train": files}, "'dev' must be a list of file names, not null"),
        ({"dataset": "flickr8k"}, "no split lists"),
        ({}, "no split lists"),
        ({"train": ["not-in-captions.jpg"]}, "none of its 1 file names are in"),
    ]
    for doc, message in cases:
        _write_json(src / "splits.json", doc)
        msg = _error(message, src, images=f8k["images"], out=tmp_path / "ds")
        assert msg.startswith(f"{src / 'splits.json'}: ") and "captions.json:" not in msg
    assert not (tmp_path / "ds").exists()


def test_split_lists_and_captions_that_differ_warn_with_counts(f8k, tmp_path) -> None:
    src, docs = _coco_src(f8k, tmp_path / "src", n=6)
    files = docs["splits"]["train"]
    docs["splits"] = {"dataset": "flickr8k", "train": files[:3] + ["a.jpg", "b.jpg"], "val": files[3:4]}
    _write_src(src, docs)
    rec = Recorder()
    ds, rep = prepare(src, images=f8k["images"], out=tmp_path / "ds", progress=rec)
    assert [(r.file, r.split) for r in ds.images] == [(f, "train") for f in files[:3]] + [(files[3], "val")]
    assert rep.unlisted_images == 2 and rep.unknown_listed == 2 and rep.missing_images == 0
    assert rec.warnings == [f"2 images of {src / 'captions.json'} are in no split of {src / 'splits.json'}: skipped",
                            f"2 file names in {src / 'splits.json'} are not in {src / 'captions.json'}: skipped"]
    r = _cli("prepare", src, "--images", f8k["images"], "--out", tmp_path / "ds2")
    assert r.exit_code == 0, r.output
    assert "prepared 4 images" in r.output and r.output.count("warning:") == 2


def test_malformed_karpathy(f8k, tmp_path) -> None:
    kfile = tmp_path / "dataset_flickr8k.json"
    _write_json(kfile, {"dataset": "flickr8k"})
    _error("not a COCO captions file nor a Karpathy split file|neither a COCO", kfile)
    _error("not a Karpathy split file", kfile, kind="karpathy", images=f8k["images"])
    kdoc = _karpathy_flickr(_pick(f8k, 3, 0))
    del kdoc["images"][1]["split"]
    _write_json(kfile, kdoc)
    _error("malformed Karpathy entry", kfile, images=f8k["images"])
    kdoc = _karpathy_flickr(_pick(f8k, 3, 0))
    kdoc["images"][1]["sentences"] = "A dog ."
    _write_json(kfile, kdoc)
    _error("'sentences' must be a list", kfile, images=f8k["images"])
    kdoc = _karpathy_flickr(_pick(f8k, 3, 0))
    kdoc["images"][1]["imgid"] = "two"
    _write_json(kfile, kdoc)
    _error("id 'two' is not a number", kfile, images=f8k["images"])
    (tmp_path / "empty").mkdir()
    _error("no Karpathy split file", tmp_path / "empty", kind="karpathy")


def test_malformed_csv(tmp_path) -> None:
    bad = {
        "noheader.csv": "chelsea.jpg,A cat .\ncoffee.jpg,A cup .\n",
        "columns.csv": "file,text\nchelsea.jpg,A cat .\n",
        "empty.csv": "",
        "tsv.csv": "image\tcaption\nchelsea.jpg\tA cat .\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        msg = _error("CSV needs a header with 'image' and 'caption' columns", tmp_path / name, images=EXAMPLES)
        assert msg.startswith(str(tmp_path / name))
    (tmp_path / "binary.csv").write_bytes(b"image,caption\n\xff\xd8\xff\xe0 JFIF\n")
    _error("malformed CSV", tmp_path / "binary.csv", images=EXAMPLES)
    (tmp_path / "blank.csv").write_text("image,caption\nchelsea.jpg,A cat .\n,A caption without an image\n")
    _error(r"blank.csv:3: empty 'image' value", tmp_path / "blank.csv", images=EXAMPLES)
    _error("cannot read", tmp_path, kind="csv", images=EXAMPLES)  # a folder given as the CSV


def test_empty_captions_are_skipped_with_a_count(tmp_path) -> None:
    (tmp_path / "c.csv").write_text(
        "image,caption\n"
        "chelsea.jpg,A cat .\nchelsea.jpg,\nchelsea.jpg,   \n"
        "coffee.jpg,A cup of coffee .\n"
        "rocket.jpg,\n"  # its only caption is empty: the image is skipped too
    )
    rec = Recorder()
    ds, rep = prepare(tmp_path / "c.csv", images=EXAMPLES, out=tmp_path / "ds", progress=rec)
    assert rep.empty_captions == 3 and rep.images_without_captions == 1
    kept = [(r.file, r.captions) for r in ds.images]
    assert kept == [("chelsea.jpg", ["A cat ."]), ("coffee.jpg", ["A cup of coffee ."])]
    assert rec.warnings == ["3 empty captions skipped", "1 images without any caption skipped"]
    (tmp_path / "none.csv").write_text("image,caption\nchelsea.jpg,\ncoffee.jpg, \n")
    _error("no images with captions", tmp_path / "none.csv", images=EXAMPLES)


def test_no_image_kept_says_why_with_counts(f8k, tmp_path) -> None:
    """Missing files and images whose captions are all empty are counted apart, against all images listed."""
    here = next(iter(f8k["captions"]))
    (tmp_path / "m.csv").write_text(f"image,caption\nmissing.jpg,A dog .\n{here},\n{here}, \n")
    msg = _error("no images with captions", tmp_path / "m.csv", images=f8k["images"])
    assert msg == (f"{tmp_path / 'm.csv'}: no images with captions: of the 2 images listed, 1 missing under "
                   f"{f8k['images']} and 1 without any caption (2 empty captions)")
    src, docs = _coco_src(f8k, tmp_path / "src", n=2)
    docs["captions"]["annotations"] = []  # COCO images with no caption at all
    msg = _error("no images with captions", _write_src(src, docs), images=f8k["images"])
    assert msg.endswith("of the 2 images listed, 2 without any caption")
    (tmp_path / "header.csv").write_text("image,caption\n")
    _error("header.csv: no images listed$", tmp_path / "header.csv", images=f8k["images"])
    r = _cli("prepare", tmp_path / "m.csv", "--images", f8k["images"], "--out", tmp_path / "ds")
    assert r.exit_code != 0 and "1 missing under" in r.output and "1 without any caption" in r.output, r.output
    assert not (tmp_path / "ds").exists()


def test_coco_file_without_annotations(coco_mini_dir, tmp_path) -> None:
    doc = json.loads((coco_mini_dir / "annotations" / "captions_val2017.json").read_text())
    del doc["annotations"]
    ann = _write_json(tmp_path / "captions_val2017.json", doc)
    assert detect_kind(ann) == "coco"
    images = coco_mini_dir / "val2017"
    for kind in ("auto", "coco", "coco-splits"):
        _error("captions_val2017.json: a COCO captions file without its 'annotations' \\(the captions\\)$", ann,
               kind=kind, images=images)
    _error("a COCO captions file \\('file_name' entries\\), not a Karpathy split file; use --kind coco", ann,
           kind="karpathy", images=images)
    r = _cli("prepare", ann, "--images", images, "--out", tmp_path / "ds")
    assert r.exit_code != 0 and "without its 'annotations'" in r.output and "Karpathy" not in r.output, r.output


def test_duplicate_ids_and_files(f8k, tmp_path) -> None:
    src, docs = _coco_src(f8k, tmp_path / "src")
    dup_id = docs["captions"]["images"][0]["id"]
    docs["captions"]["images"][2]["id"] = dup_id
    _write_src(src, docs)
    _error(f"captions.json: duplicate image id {dup_id}$", src, images=f8k["images"])
    src, docs = _coco_src(f8k, tmp_path / "src2")
    docs["captions"]["images"].append(dict(docs["captions"]["images"][0], id=999_999))  # same file, new id
    _write_src(src, docs)
    _error(f"duplicate image {docs['captions']['images'][0]['file_name']}", src, images=f8k["images"])
    src, docs = _coco_src(f8k, tmp_path / "src3")
    docs["splits"]["val"] = docs["splits"]["train"][:1]
    _write_src(src, docs)
    _error("is in both train and val", src, images=f8k["images"])
    kdoc = _karpathy_flickr(_pick(f8k, 3, 1))
    kdoc["images"][3]["imgid"] = 1
    kfile = _write_json(tmp_path / "dataset_flickr8k.json", kdoc)
    _error("duplicate image id 1", kfile, images=f8k["images"])


def test_unknown_split_names(f8k, tmp_path) -> None:
    src, docs = _coco_src(f8k, tmp_path / "src")
    docs["splits"] = {"training": docs["splits"]["train"]}
    _write_src(src, docs)
    _error(r"splits.json: unknown split name 'training'", src, images=f8k["images"])
    (tmp_path / "c.csv").write_text("image,caption,split\nchelsea.jpg,A cat .,holdout\n")
    _error("unknown split name 'holdout'", tmp_path / "c.csv", images=EXAMPLES)
    kdoc = _karpathy_flickr(_pick(f8k, 2, 0))
    kdoc["images"][1]["split"] = "xval"
    _error("unknown split name 'xval'", _write_json(tmp_path / "k.json", kdoc), images=f8k["images"])


def test_bad_sources(tmp_path) -> None:
    _error("no such file or folder", tmp_path / "nothing-here")
    _error("no such file or folder", tmp_path / "nothing-here.json")
    (tmp_path / "empty").mkdir()
    _error("cannot tell the dataset kind; pass --kind", tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    _error("cannot tell the dataset kind; pass --kind", tmp_path / "notes.txt")
    with pytest.raises(UsageError, match="unknown kind 'yolo'; use one of auto, coco"):
        prepare(tmp_path / "notes.txt", kind="yolo")
    _error("no Flickr8k.token.txt found", tmp_path / "empty", kind="flickr8k")
    _error("no captions_.*json annotation files", tmp_path / "empty", kind="coco")


def test_bad_flickr8k_text(tmp_path) -> None:
    (tmp_path / "Flickr8k.token.txt").write_text("chelsea.jpg#0\tA cat .\nchelsea.jpg A cat without a tab\n")
    _error(r"Flickr8k.token.txt:2: expected 'image.jpg#N<TAB>caption'", tmp_path, images=EXAMPLES)
    (tmp_path / "Flickr8k.token.txt").write_text("chelsea.jpg#0\tA cat .\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("chelsea.jpg\n")
    _error(r"no Flickr_8k.devImages.txt found", tmp_path, images=EXAMPLES)
    (tmp_path / "Flickr8k.token.txt").write_bytes("chelsea.jpg#0\tA caf\xe9 .\n".encode("latin-1"))
    _error("not UTF-8 text", tmp_path, images=EXAMPLES)


def test_unwritable_output(tmp_path) -> None:
    (tmp_path / "c.csv").write_text("image,caption\nchelsea.jpg,A cat .\n")
    (tmp_path / "taken").write_text("a file where the output folder should go")
    _error("cannot write", tmp_path / "c.csv", images=EXAMPLES, out=tmp_path / "taken")


# ---- the canonical layout --------------------------------------------------------------------------------
def test_layout_load_and_errors(small_flickr8k, tmp_path) -> None:
    ds = Dataset.load(small_flickr8k.source)
    assert ds.images == small_flickr8k.images and ds.source == small_flickr8k.source
    assert Dataset.load(Path(small_flickr8k.source) / "dataset.json").name == "f8k-small"
    assert len(ds.split("train")) == 20 and len(ds.split("val")) == 10 and ds.split("test") == []
    refs = ds.references("val")
    assert len(refs) == 10 and all(len(c) == 5 for c in refs.values())
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        ds.split("dev")
    with pytest.raises(DatasetError, match="image id 123456789 is not in dataset f8k-small"):
        ds.get(123456789)
    with pytest.raises(DatasetError, match="is not a prepared dataset .*run `capcli prepare` first"):
        Dataset.load(tmp_path)
    doc = json.loads((Path(small_flickr8k.source) / "dataset.json").read_text())
    cases = {
        "trunc": "{\"format\": ",
        "format": json.dumps(dict(doc, format="other/1")),
        "record": json.dumps(dict(doc, images=[{"id": 1, "file": "a.jpg"}])),
        "dup": json.dumps(dict(doc, images=doc["images"][:2] + [dict(doc["images"][0], file="x.jpg")])),
        "split": json.dumps(dict(doc, images=[dict(doc["images"][0], split="dev")])),
    }
    expect = {"trunc": "not valid JSON", "format": "not a capcli dataset", "record": "malformed image record",
              "dup": "duplicate image id", "split": "unknown split 'dev'"}
    for key, text in cases.items():
        (tmp_path / key).mkdir()
        (tmp_path / key / "dataset.json").write_text(text)
        with pytest.raises(DatasetError, match=expect[key]) as e:
            Dataset.load(tmp_path / key)
        assert "\n" not in str(e.value)


# ---- through the command line ----------------------------------------------------------------------------
def _cli(*args: str):
    from capcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_cli_prepare_reports_counts_and_warnings(tmp_path) -> None:
    (tmp_path / "c.csv").write_text("image,caption,split\nchelsea.jpg,A cat .,train\nchelsea.jpg,,train\n"
                                    "coffee.jpg,A cup .,val\nmissing.jpg,A ghost .,train\n")
    r = _cli("prepare", tmp_path / "c.csv", "--images", EXAMPLES, "--out", tmp_path / "ds")
    assert r.exit_code == 0, r.output
    assert f"prepared 2 images, 2 captions (train 1, val 1) from csv -> {tmp_path / 'ds'}" in r.output
    assert "warning: 1 listed images are missing" in r.output and "warning: 1 empty captions skipped" in r.output
    assert Dataset.load(tmp_path / "ds").split_counts() == {"train": 1, "val": 1}
    r = _cli("prepare", tmp_path / "c.csv", "--images", EXAMPLES, "--root", tmp_path / "root", "--name", "Mini")
    assert r.exit_code == 0, r.output
    assert Dataset.load(tmp_path / "root" / "datasets" / "Mini").name == "Mini"
    r = _cli("prepare", tmp_path / "c.csv", "--images", EXAMPLES, "--root", tmp_path / "root")
    assert r.exit_code == 0, r.output
    default = tmp_path.name.lower()  # a CSV's dataset is named after its folder
    assert Dataset.load(tmp_path / "root" / "datasets" / default).name == default
    r = _cli("info", "--root", tmp_path / "root")
    assert r.exit_code == 0 and f"Mini, {default}" in r.output and str(tmp_path / "root") in r.output


def test_cli_prepare_coco_with_karpathy(coco_mini_dir, coco_mini, tmp_path) -> None:
    kfile = _write_json(tmp_path / "dataset_coco.json", _karpathy_coco(coco_mini, extra=1))
    r = _cli("prepare", coco_mini_dir, "--karpathy", kfile, "--out", tmp_path / "ds")
    assert r.exit_code == 0, r.output
    assert "note: 1 images of the Karpathy split are not in the annotation files: skipped" in r.output
    assert "prepared 159 images, 795 captions (restval 39, test 40, train 40, val 40) from coco" in r.output


def test_cli_prepare_real_coco(coco_mini_dir, tmp_path) -> None:
    r = _cli("prepare", coco_mini_dir / "annotations" / "captions_train2017.json", "--out", tmp_path / "ds")
    assert r.exit_code == 0, r.output
    assert "prepared 80 images" in r.output and "(train 80) from coco" in r.output
    r = _cli("prepare", coco_mini_dir, "--root", tmp_path / "root")
    assert r.exit_code == 0, r.output
    assert Dataset.load(tmp_path / "root" / "datasets" / "coco-mini").split_counts() == {"train": 80, "val": 79}


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({}, ["nowhere"], "nowhere: no such file or folder"),
        ({"a.csv": "file,text\nx.jpg,A cat\n"}, ["a.csv"], "CSV needs a header with 'image' and 'caption'"),
        ({"a.csv": "image,caption\nx.jpg,A cat\n"}, ["a.csv", "--images", "EXAMPLES"], "none of the 1 images listed"),
        ({"a.json": '{"images": [{"file'}, ["a.json"], "malformed JSON"),
        ({"a.json": '{"images": [{"filename": "chelsea.jpg", "split": "dev", "imgid": 1}, '
                    '{"filename": "coffee.jpg", "split": "train", "imgid": 1}]}'},
         ["a.json", "--images", "EXAMPLES"], "duplicate image id 1"),
        ({"a.csv": "image,caption,split\nchelsea.jpg,A cat,later\n"}, ["a.csv"], "unknown split name 'later'"),
        ({"a.csv": "image,caption\n"}, ["a.csv", "--kind", "parquet"], "unknown kind 'parquet'"),
        ({"a.csv": "image,caption\n"}, ["a.csv", "--karpathy", "a.csv"], "--karpathy goes with COCO annotation files"),
        ({"a.csv": "image,caption\n"}, ["a.csv", "--splits", "a.csv"], "--splits goes with --kind coco-splits"),
    ],
)
def test_cli_prepare_errors(tmp_path, files: dict[str, str], args: list[str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [str(EXAMPLES) if a == "EXAMPLES" else a for a in args]
    r = _cli("prepare", tmp_path / args[0], *args[1:], "--out", tmp_path / "out")
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.output
    assert not (tmp_path / "out").exists()
