"""capcli fetch against a real HTTP server on 127.0.0.1 serving small COCO- and Flickr8k-shaped archives
built at test time from real photos (no internet needed)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from capcli import paths
from capcli.archives import extract
from capcli.cli import app
from capcli.download import Source, download
from capcli.errors import FetchError, UsageError
from capcli.fetch import SOURCES, fetch
from capcli.layout import Dataset

# ---- a small mirror server ----------------------------------------------------------------------------


class Mirror:
    """What the test server serves, and what it was asked for."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.drop: dict[str, int] = {}  # file name -> bytes to send before cutting the connection (once)
        self.unavailable: dict[str, int] = {}  # file name -> how many more requests get HTTP 503
        self.base = ""

    def asked(self, name: str) -> list[str | None]:
        return [r for n, r in self.requests if n == name]

    def add_sums(self) -> None:
        self.files["SHA256SUMS"] = "".join(
            f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in self.files.items() if n != "SHA256SUMS"
        ).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        m: Mirror = self.server.mirror  # type: ignore[attr-defined]
        name = unquote(self.path.lstrip("/"))
        rng = self.headers.get("Range")
        m.requests.append((name, rng))
        data = m.files.get(name)
        if data is None:
            self.send_error(404)
            return
        if m.unavailable.get(name):
            m.unavailable[name] -= 1
            self.send_error(503)
            return
        start = 0
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        cut = m.drop.pop(name, None)
        if cut is not None:  # announce the whole body, send part of it, hang up
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def mirror():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.mirror = Mirror()  # type: ignore[attr-defined]
    server.mirror.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.mirror
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _zip(entries: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _table(name: str, files: dict[str, bytes], base: str) -> list[Source]:
    """The real table for ``name`` with the test server's URLs and the test archives' sizes and hashes."""
    return [replace(s, url=f"{base}/{s.file}", size=len(files[s.file]) if s.file in files else None,
                    sha256=_sha(files[s.file]) if s.file in files else None) for s in SOURCES[name]]


# ---- COCO 2014- and Flickr8k-shaped archives from real photos ----------------------------------------

KARPATHY_SPLITS = {"train": 3, "restval": 2, "val": 2, "test": 2}


@pytest.fixture(scope="module")
def coco2014(coco_mini_dir) -> dict[str, bytes]:
    """train2014.zip (5 photos), val2014.zip (4), annotations_trainval2014.zip, caption_datasets.zip."""
    files: dict[str, bytes] = {}
    ann_entries: dict[str, bytes] = {}
    karpathy: list[dict] = []
    kinds = iter(["train"] * 3 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 2)
    for src_split, split, n in (("train2017", "train2014", 5), ("val2017", "val2014", 4)):
        doc = json.loads((coco_mini_dir / "annotations" / f"captions_{src_split}.json").read_text())
        imgs = sorted(doc["images"], key=lambda im: (coco_mini_dir / src_split / im["file_name"]).stat().st_size)[:n]
        ids = {im["id"] for im in imgs}
        folder = coco_mini_dir / src_split
        photos = {f"{split}/COCO_{split}_{im['id']:012d}.jpg": (folder / im["file_name"]).read_bytes() for im in imgs}
        files[f"{split}.zip"] = _zip(photos)
        anns = [a for a in doc["annotations"] if a["image_id"] in ids]
        new_imgs = [{**im, "file_name": f"COCO_{split}_{im['id']:012d}.jpg"} for im in imgs]
        ann_entries[f"annotations/captions_{split}.json"] = json.dumps(
            {"info": {}, "licenses": [], "images": new_imgs, "annotations": anns}).encode()
        ann_entries[f"annotations/instances_{split}.json"] = b'{"not": "wanted"}'
        for im in new_imgs:
            karpathy.append({"filepath": split, "filename": im["file_name"], "split": next(kinds), "cocoid": im["id"],
                             "sentences": [{"raw": a["caption"]} for a in anns if a["image_id"] == im["id"]]})
    files["annotations_trainval2014.zip"] = _zip(ann_entries, zipfile.ZIP_DEFLATED)
    files["caption_datasets.zip"] = _zip({"dataset_coco.json": json.dumps({"images": karpathy}).encode(),
                                          "dataset_flickr8k.json": b"{}"}, zipfile.ZIP_DEFLATED)
    return files


@pytest.fixture(scope="module")
def flickr8k(flickr8k_dir) -> dict[str, bytes]:
    """Flickr8k_Dataset.zip (10 photos under Flicker8k_Dataset/, plus macOS junk) and Flickr8k_text.zip."""
    caps = json.loads((flickr8k_dir / "captions.json").read_text())
    splits = json.loads((flickr8k_dir / "splits.json").read_text())
    lists = {"train": splits["train"][:6], "dev": splits["val"][:2], "test": splits["train"][6:8]}
    names = [n for v in lists.values() for n in v]
    by_file = {im["file_name"]: im["id"] for im in caps["images"]}
    caps_of: dict[int, list[str]] = {}
    for a in caps["annotations"]:
        caps_of.setdefault(a["image_id"], []).append(a["caption"])
    token = "".join(f"{n}#{i}\t{c}\n" for n in names for i, c in enumerate(caps_of[by_file[n]]))
    photos = {f"Flicker8k_Dataset/{n}": (flickr8k_dir / "images" / n).read_bytes() for n in names}
    photos[f"__MACOSX/Flicker8k_Dataset/._{names[0]}"] = b"\x00\x05\x16\x07 junk"
    text = {"Flickr8k.token.txt": token.encode(), "readme.txt": b"Flickr8k text"}
    for split, lst in lists.items():
        kind = {"train": "train", "dev": "dev", "test": "test"}[split]
        text[f"Flickr_8k.{kind}Images.txt"] = "".join(f"{n}\n" for n in lst).encode()
    return {"Flickr8k_Dataset.zip": _zip(photos), "Flickr8k_text.zip": _zip(text, zipfile.ZIP_DEFLATED)}


def _one_line_error(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


# ---- full fetches -------------------------------------------------------------------------------------

def test_fetch_coco2014_prepares_karpathy_splits_and_rerun_is_a_noop(mirror, coco2014, tmp_path):
    mirror.files.update(coco2014)
    table = _table("coco2014", coco2014, mirror.base)
    res = fetch("coco", year=2014, root=tmp_path, sources=table, backoff=0.01)
    assert sorted(res.downloaded) == sorted(coco2014)
    assert res.dataset == paths.dataset_dir("coco2014", tmp_path)
    ds = Dataset.load(res.dataset)
    assert ds.name == "coco2014"
    assert ds.split_counts() == KARPATHY_SPLITS
    assert len(ds.split("train")) == 5
    assert all(ds.path(r).is_file() and len(r.captions) >= 5 for r in ds.images)
    raw = paths.raw_dir("coco2014", tmp_path)
    assert not list(raw.rglob("instances_*.json"))  # only the captions files are extracted
    assert not list(raw.rglob("*.capcli-part")) and not list(raw.rglob("*.part"))
    marker = json.loads((raw / "downloads" / "train2014.zip.done").read_text())
    assert marker["sha256"] == _sha(coco2014["train2014.zip"])

    mirror.requests.clear()
    again = fetch("coco", year=2014, root=tmp_path, sources=table)
    assert mirror.requests == []
    assert not again.changed and again.report is None
    assert sorted(again.skipped) == sorted(coco2014)
    assert again.dataset == res.dataset


def test_cli_coco_mirror_with_sha256sums_without_karpathy(mirror, coco2014, tmp_path):
    mirror.files.update({k: v for k, v in coco2014.items() if k != "caption_datasets.zip"})
    mirror.add_sums()  # the mirror vouches for its (small) files: sizes of the real table are not checked
    args = ["fetch", "coco", "--year", "2014", "--mirror", mirror.base, "--root", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "caption_datasets.zip unavailable" in out and "404" in out
    assert "official train/val split" in out
    assert "prepared 9 images" in out
    assert "next: capcli features coco2014" in out
    ds = Dataset.load(paths.dataset_dir("coco2014", tmp_path))
    assert ds.split_counts() == {"train": 5, "val": 4}
    assert ("SHA256SUMS", None) in mirror.requests

    mirror.requests.clear()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert mirror.requests == []  # not even the unavailable Karpathy file is asked for again
    assert "nothing to download" in result.output and "already fetched and prepared" in result.output


def test_cli_flickr8k_from_env_mirror(mirror, flickr8k, tmp_path, monkeypatch):
    mirror.files.update(flickr8k)
    mirror.add_sums()
    monkeypatch.setenv("CAPCLI_MIRROR", mirror.base + "/")
    result = CliRunner().invoke(app, ["fetch", "flickr8k", "--root", str(tmp_path), "--delete-archives"])
    assert result.exit_code == 0, result.output
    ds = Dataset.load(paths.dataset_dir("flickr8k", tmp_path))
    assert ds.split_counts() == {"train": 6, "val": 2, "test": 2}
    assert ds.image_root.name == "Flicker8k_Dataset"
    assert all(ds.path(r).is_file() for r in ds.images)
    raw = paths.raw_dir("flickr8k", tmp_path)
    assert not (raw / "__MACOSX").exists()
    assert not (raw / "downloads" / "Flickr8k_Dataset.zip").exists()  # --delete-archives
    assert "next: capcli features flickr8k" in result.output
    mirror.requests.clear()
    assert CliRunner().invoke(app, ["fetch", "flickr8k", "--root", str(tmp_path)]).exit_code == 0
    assert mirror.requests == []


def test_only_annotations_then_images_with_local_karpathy_file(mirror, coco2014, tmp_path):
    mirror.files.update(coco2014)
    table = _table("coco2014", coco2014, mirror.base)
    kfile = tmp_path / "my_split.json"
    kfile.write_bytes(zipfile.ZipFile(io.BytesIO(coco2014["caption_datasets.zip"])).read("dataset_coco.json"))
    res = fetch("coco", root=tmp_path, sources=table, only="annotations", karpathy=kfile)
    assert res.dataset is None and any("not prepared" in n for n in res.notes)
    raw = paths.raw_dir("coco2014", tmp_path)
    assert (raw / "annotations" / "captions_val2014.json").is_file() and not (raw / "train2014").exists()
    assert (raw / "karpathy" / "dataset_coco.json").is_file()
    assert {n for n, _ in mirror.requests} == {"annotations_trainval2014.zip"}

    mirror.requests.clear()
    res = fetch("coco", root=tmp_path, sources=table, only="images")
    assert {n for n, _ in mirror.requests} == {"train2014.zip", "val2014.zip"}
    assert Dataset.load(res.dataset).split_counts() == KARPATHY_SPLITS


def test_bad_arguments():
    with pytest.raises(UsageError, match="2014"):
        fetch("coco", year=2017, karpathy="http://example.invalid/caption_datasets.zip")
    with pytest.raises(UsageError, match="unknown dataset"):
        fetch("imagenet")
    with pytest.raises(UsageError, match="--only"):
        fetch("flickr8k", only="everything")


# ---- downloads: resume, verification, errors -----------------------------------------------------------

def test_dropped_connection_is_resumed_with_range(mirror, tmp_path):
    data = os.urandom(3 << 20)
    mirror.files["blob.bin"] = data
    mirror.drop["blob.bin"] = 1_500_000
    src = Source("blob.bin", f"{mirror.base}/blob.bin", "images", size=len(data), sha256=_sha(data))
    marker = download(src, tmp_path / "blob.bin", backoff=0.01)
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert mirror.asked("blob.bin") == [None, "bytes=1500000-"]
    assert marker["sha256"] == _sha(data) and marker["size"] == len(data)
    assert not (tmp_path / "blob.bin.part").exists()


def test_server_errors_are_retried_then_reported(mirror, tmp_path):
    data = os.urandom(100_000)
    mirror.files["blob.bin"] = data
    mirror.unavailable["blob.bin"] = 2
    src = Source("blob.bin", f"{mirror.base}/blob.bin", "images", size=len(data))
    download(src, tmp_path / "blob.bin", backoff=0.01)
    assert len(mirror.asked("blob.bin")) == 3 and (tmp_path / "blob.bin").read_bytes() == data
    mirror.unavailable["blob.bin"] = 5
    with pytest.raises(FetchError, match="HTTP 503") as e:
        download(src, tmp_path / "again.bin", retries=2, backoff=0.01)
    assert "\n" not in str(e.value)
    assert len(mirror.asked("blob.bin")) == 3 + 3  # the first try and 2 retries, then it gives up


def test_complete_part_file_is_not_downloaded_again(mirror, tmp_path):
    data = os.urandom(200_000)
    mirror.files["blob.bin"] = data
    (tmp_path / "blob.bin.part").write_bytes(data)  # stopped after the last byte, before the rename
    src = Source("blob.bin", f"{mirror.base}/blob.bin", "images", sha256=_sha(data))
    download(src, tmp_path / "blob.bin", backoff=0.01)
    assert mirror.asked("blob.bin") == [f"bytes={len(data)}-"]  # answered 416: nothing more to send
    assert (tmp_path / "blob.bin").read_bytes() == data


def test_archive_placed_by_hand_is_verified_and_used(mirror, flickr8k, tmp_path):
    mirror.files.update(flickr8k)
    table = _table("flickr8k", flickr8k, mirror.base)
    dl = paths.raw_dir("flickr8k", tmp_path) / "downloads"
    dl.mkdir(parents=True)
    (dl / "Flickr8k_Dataset.zip").write_bytes(flickr8k["Flickr8k_Dataset.zip"])
    half = len(flickr8k["Flickr8k_text.zip"]) // 2
    (dl / "Flickr8k_text.zip").write_bytes(flickr8k["Flickr8k_text.zip"][:half])  # an unfinished manual download
    res = fetch("flickr8k", root=tmp_path, sources=table)
    assert mirror.asked("Flickr8k_Dataset.zip") == []
    assert mirror.asked("Flickr8k_text.zip") == [f"bytes={half}-"]
    assert res.downloaded == ["Flickr8k_text.zip"]
    assert Dataset.load(res.dataset).split_counts() == {"train": 6, "val": 2, "test": 2}


def test_interrupted_download_resumes_on_the_next_run(mirror, flickr8k, tmp_path):
    mirror.files.update(flickr8k)
    table = _table("flickr8k", flickr8k, mirror.base)
    cut = len(flickr8k["Flickr8k_Dataset.zip"]) // 2
    mirror.drop["Flickr8k_Dataset.zip"] = cut
    with pytest.raises(FetchError, match="re-run to resume") as e:
        fetch("flickr8k", root=tmp_path, sources=table, retries=0)
    assert "\n" not in str(e.value)
    part = paths.raw_dir("flickr8k", tmp_path) / "downloads" / "Flickr8k_Dataset.zip.part"
    assert part.stat().st_size == cut
    res = fetch("flickr8k", root=tmp_path, sources=table)
    assert mirror.asked("Flickr8k_Dataset.zip") == [None, f"bytes={cut}-"]
    assert mirror.asked("Flickr8k_text.zip") == [None]  # finished on the first run: not fetched again
    assert (part.parent / "Flickr8k_Dataset.zip").read_bytes() == flickr8k["Flickr8k_Dataset.zip"]
    assert Dataset.load(res.dataset).split_counts() == {"train": 6, "val": 2, "test": 2}


def test_checksum_mismatch_moves_the_file_aside(mirror, flickr8k, tmp_path):
    mirror.files.update(flickr8k)
    good = _table("flickr8k", flickr8k, mirror.base)
    bad = [replace(s, sha256="0" * 64) if s.file == "Flickr8k_text.zip" else s for s in good]
    with pytest.raises(FetchError, match="checksum mismatch") as e:
        fetch("flickr8k", root=tmp_path, sources=bad)
    assert "\n" not in str(e.value)
    dl = paths.raw_dir("flickr8k", tmp_path) / "downloads"
    assert (dl / "Flickr8k_text.zip.bad").read_bytes() == flickr8k["Flickr8k_text.zip"]
    assert not (dl / "Flickr8k_text.zip").exists() and not (dl / "Flickr8k_text.zip.done").exists()
    mirror.requests.clear()
    fetch("flickr8k", root=tmp_path, sources=good)
    assert mirror.asked("Flickr8k_text.zip") == [None]  # downloaded again, not reused from .bad


def test_mirror_without_sums_is_checked_against_the_real_sizes(mirror, coco2014, tmp_path):
    mirror.files["annotations_trainval2014.zip"] = coco2014["annotations_trainval2014.zip"]
    args = ["fetch", "coco", "--only", "annotations", "--mirror", mirror.base, "--root", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    line = _one_line_error(result.output)
    assert "should be 252,872,794" in line
    assert not list(paths.raw_dir("coco2014", tmp_path).rglob("*.part"))


def test_404_is_one_clear_error(mirror, tmp_path):
    result = CliRunner().invoke(app, ["fetch", "flickr8k", "--mirror", mirror.base, "--root", str(tmp_path)])
    assert result.exit_code == 1
    line = _one_line_error(result.output)
    assert "Flickr8k_text.zip" in line and "404" in line


def test_connection_refused_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match="connection refused") as e:
        fetch("coco", root=tmp_path, mirror=f"http://127.0.0.1:{port}")
    assert "\n" not in str(e.value) and f"127.0.0.1:{port}" in str(e.value)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
def test_disk_full_is_a_clear_error(mirror, tmp_path):
    data = os.urandom(2 << 20)
    mirror.files["blob.bin"] = data
    (tmp_path / "blob.bin.part").symlink_to("/dev/full")  # every write into the .part fails with ENOSPC
    src = Source("blob.bin", f"{mirror.base}/blob.bin", "images", size=len(data))
    with pytest.raises(FetchError, match="disk full") as e:
        download(src, tmp_path / "blob.bin", backoff=0.01)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "blob.bin").exists()


# ---- extraction ---------------------------------------------------------------------------------------

def _evil_zip(path: Path, kind: str, outside: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        if kind == "traversal":
            zf.writestr("sub/../../evil.txt", b"pwned")
        elif kind == "absolute":
            zf.writestr(str(outside / "evil.txt"), b"pwned")
        else:  # a symlink entry pointing outside
            info = zipfile.ZipInfo("link")
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, str(outside))


@pytest.mark.parametrize(("kind", "why"), [("traversal", "escapes the target folder"),
                                         ("absolute", "an absolute path"), ("symlink", "a symbolic link")])
def test_malicious_zip_is_refused_with_nothing_written(kind, why, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "box" / "dest"
    _evil_zip(tmp_path / "evil.zip", kind, outside)
    with pytest.raises(FetchError, match=f"refusing to extract: entry .* is .*{why}"):
        extract(tmp_path / "evil.zip", dest)
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "box" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not dest.exists() or list(dest.iterdir()) == []


def test_fetch_refuses_a_malicious_archive(mirror, tmp_path):
    _evil_zip(tmp_path / "evil.zip", "traversal", tmp_path)
    mirror.files["Flickr8k_text.zip"] = (tmp_path / "evil.zip").read_bytes()
    table = _table("flickr8k", mirror.files, mirror.base)
    with pytest.raises(FetchError, match="escapes the target folder"):
        fetch("flickr8k", root=tmp_path / "home", sources=table)
    raw = paths.raw_dir("flickr8k", tmp_path / "home")
    assert not (raw / "downloads" / "Flickr8k_text.zip.extracted").exists()
    assert not (raw / "ok.txt").exists() and not (raw.parent / "evil.txt").exists()


def test_zip_bomb_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("zeros.bin", bytes(80 << 20))
    assert (tmp_path / "bomb.zip").stat().st_size < 1 << 20
    with pytest.raises(FetchError, match="zip bomb"):
        extract(tmp_path / "bomb.zip", tmp_path / "dest")
    assert not (tmp_path / "dest" / "zeros.bin").exists()


def test_extraction_never_leaves_a_half_written_file_and_resumes(tmp_path):
    good = {"a.txt": b"A" * 5000, "b.txt": b"B" * 5000, "c.txt": b"C" * 5000}
    data = bytearray(_zip(good))
    pos = data.index(b"B" * 5000)
    data[pos + 100] = ord("X")  # b.txt's bytes no longer match its CRC
    (tmp_path / "broken.zip").write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(FetchError, match="corrupt member b.txt"):
        extract(tmp_path / "broken.zip", dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]  # no b.txt, no temporary file
    assert (dest / "a.txt").read_bytes() == good["a.txt"]
    (tmp_path / "good.zip").write_bytes(_zip(good))
    assert extract(tmp_path / "good.zip", dest) == 2  # a.txt was already complete
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == good
