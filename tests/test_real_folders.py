"""Real photo folders as people have them (issue 17): iPhone HEIC, AVIF and camera RAW files, any file name,
a full disk, two runs writing one output. Real files made here (pillow-heif and Pillow write HEIC and AVIF; a
DNG with an embedded JPEG preview is built byte by byte), the shipped model, real subprocesses and limits."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from capcli import atomic, lock
from capcli.caption import caption_files, in_shard
from capcli.captioner import Captioner
from capcli.cli import app
from capcli.errors import LockedError, OutputError, UsageError
from capcli.images import is_image_file, load_image
from capcli.names import display, path_fields, record_key
from capcli.outputs import read_records
from capcli.progress import Progress

ROOT = Path(__file__).resolve().parent.parent
ODD = os.fsdecode(b"bad\xffname.jpg")  # not UTF-8: Python holds the byte as the lone surrogate U+DCFF


# ------------------------------------------------------------------------------------------- real files
def _tiff_ifd(entries: list[tuple[int, int, object]], at: int) -> bytes:
    """One little-endian TIFF IFD placed at offset ``at``, its out-of-line values right after it."""
    fmt = {1: "B", 3: "H", 4: "I"}
    entries = sorted(entries, key=lambda e: e[0])
    body, extra = b"", b""
    extra_at = at + 2 + 12 * len(entries) + 4
    for tag, typ, vals in entries:
        if typ == 2:
            data, count = str(vals).encode() + b"\0", len(str(vals)) + 1
        elif typ in (5, 10):  # (signed) rationals
            flat = [x for v in vals for x in v]
            data, count = struct.pack("<" + ("I" if typ == 5 else "i") * len(flat), *flat), len(vals)
        else:
            data, count = struct.pack("<" + fmt[typ] * len(vals), *vals), len(vals)
        if len(data) <= 4:
            body += struct.pack("<HHI", tag, typ, count) + data.ljust(4, b"\0")
        else:
            body += struct.pack("<HHII", tag, typ, count, extra_at + len(extra))
            extra += data + b"\0" * (len(data) % 2)
    return struct.pack("<H", len(entries)) + body + struct.pack("<I", 0) + extra


def make_dng(path: Path, preview: Image.Image, orientation: int = 1, raw_size: tuple[int, int] = (64, 48)) -> Path:
    """A valid DNG 1.4: IFD0 is a JPEG preview (NewSubFileType 1) with the orientation, its SubIFD a 16-bit
    RGGB Bayer raw image of ``raw_size`` (random sensor values), as cameras and Adobe's converter write it."""
    buf = io.BytesIO()
    preview.convert("RGB").save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue() + b"\0" * (len(buf.getvalue()) % 2)
    rw, rh = raw_size
    raw = np.random.default_rng(0).integers(1000, 60000, (rh, rw)).astype("<u2").tobytes()
    (w, h), jpeg_at = preview.size, 8
    raw_at = jpeg_at + len(jpeg)
    ifd0_at = raw_at + len(raw)
    eye = [(1, 1), (0, 1), (0, 1), (0, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 1)]

    def ifd0(sub_at: int) -> list:
        return [(254, 4, [1]), (256, 4, [w]), (257, 4, [h]), (258, 3, [8, 8, 8]), (259, 3, [7]), (262, 3, [6]),
                (271, 2, "capcli"), (272, 2, "test"), (273, 4, [jpeg_at]), (274, 3, [orientation]), (277, 3, [3]),
                (278, 4, [h]), (279, 4, [len(jpeg)]), (330, 4, [sub_at]), (50706, 1, [1, 4, 0, 0]),
                (50707, 1, [1, 1, 0, 0]), (50708, 2, "capcli test"), (50721, 10, eye),
                (50728, 5, [(1, 1)] * 3), (50778, 3, [21])]

    sub_at = ifd0_at + len(_tiff_ifd(ifd0(0), ifd0_at))
    sub = [(254, 4, [0]), (256, 4, [rw]), (257, 4, [rh]), (258, 3, [16]), (259, 3, [1]), (262, 3, [32803]),
           (273, 4, [raw_at]), (277, 3, [1]), (278, 4, [rh]), (279, 4, [len(raw)]), (33421, 3, [2, 2]),
           (33422, 1, [0, 1, 1, 2]), (50714, 4, [0]), (50717, 4, [65535])]
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd0_at) + jpeg + raw + _tiff_ifd(ifd0(sub_at), ifd0_at)
                     + _tiff_ifd(sub, sub_at))
    return path


def _landscape(example_photos: list[Path]) -> Image.Image:
    """A real photo, 320x240, with its left half painted blue: where that half ends up shows the rotation."""
    im = Image.open(example_photos[0]).convert("RGB").resize((320, 240))
    im.paste((0, 0, 255), (0, 0, 160, 240))
    return im


def _rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown turned 90 degrees clockwise: the left half goes on top
    return exif.tobytes()


def _assert_upright(im: Image.Image) -> None:
    assert im.size == (240, 320)
    top, bottom = np.asarray(im)[:150].astype(int), np.asarray(im)[170:].astype(int)
    assert np.abs(top - (0, 0, 255)).mean() < 20  # the blue half is on top
    assert np.abs(bottom - (0, 0, 255)).mean() > 60


@pytest.fixture(scope="module")
def phone_dir(example_photos, tmp_path_factory) -> Path:
    """An iPhone-and-camera folder: JPEGs (one upper-case), rotated HEIC, AVIF and DNG, a broken CR2, a video and
    a sidecar, a hidden file, and names that are not UTF-8 or hold a newline, a comma and quotes."""
    d = tmp_path_factory.mktemp("phone")
    (d / "a.jpg").write_bytes(example_photos[1].read_bytes())
    (d / "b.JPG").write_bytes(example_photos[2].read_bytes())
    im = _landscape(example_photos)
    im.save(d / "IMG_0001.HEIC", exif=_rotated_exif())
    im.save(d / "IMG_0003.avif", exif=_rotated_exif())
    make_dng(d / "IMG_0002.DNG", im, orientation=6)
    (d / "IMG_0004.CR2").write_bytes(b"not a raw file " * 100)
    (d / "IMG_0005.MOV").write_bytes(b"\0" * 100)
    (d / "IMG_0001.AAE").write_text("<plist/>")
    (d / ".DS_Store").write_bytes(b"\0" * 10)
    (d / ODD).write_bytes(example_photos[3].read_bytes())
    (d / 'new\nline, "quoted".jpg').write_bytes(example_photos[4].read_bytes())
    return d


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.load(device="cpu")  # the shipped model


def _cli(*args: str):
    return CliRunner().invoke(app, ["caption", *args, "--device", "cpu"])


# ---------------------------------------------------------------------------------------------- reading
def test_extensions_are_matched_whatever_their_case():
    for name in ("x.heic", "x.HEIC", "x.heif", "x.avif", "x.AVIF", "x.Cr2", "x.NEF", "x.dng", "x.ARW", "x.jpg"):
        assert is_image_file(Path(name)), name
    assert not is_image_file(Path("x.mov")) and not is_image_file(Path("x.aae"))


@pytest.mark.parametrize("name", ["IMG_0001.HEIC", "IMG_0003.avif", "IMG_0002.DNG"])
def test_heic_avif_and_raw_are_read_upright(phone_dir, name):
    _assert_upright(load_image(phone_dir / name))
    _assert_upright(load_image(phone_dir / name, min_size=224))  # what captioning reads


def test_heic_with_a_thumbnail_is_decoded_from_it_when_that_is_enough(tmp_path, example_photos):
    """iPhones store a 320x240 thumbnail in each HEIC: an encoder's 224 px need nothing larger (~20x faster)."""
    big = _landscape(example_photos).resize((960, 720))
    big.paste((0, 0, 255), (0, 0, 480, 720))
    big.save(tmp_path / "t.heic", exif=_rotated_exif(), thumbnails=[320])
    _assert_upright(load_image(tmp_path / "t.heic", min_size=224))  # the thumbnail: 240x320, upright
    assert load_image(tmp_path / "t.heic").size == (720, 960)  # no size asked for: the picture itself
    assert load_image(tmp_path / "t.heic", min_size=400).size == (720, 960)  # the thumbnail is too small


def test_raw_without_a_large_enough_preview_is_decoded_from_its_raw_data(tmp_path, example_photos):
    small = _landscape(example_photos).resize((32, 24))
    dng = make_dng(tmp_path / "small.dng", small, orientation=6, raw_size=(128, 96))
    im = load_image(dng, min_size=224)
    assert im.size == (48, 64)  # half of 128x96, turned upright by LibRaw: larger than the 24x32 preview
    assert load_image(dng).size == (24, 32)  # no size asked for: the preview, upright


def test_a_file_that_is_no_raw_gives_a_reason(phone_dir):
    from capcli.errors import ImageError

    with pytest.raises(ImageError, match="not a camera RAW file"):
        load_image(phone_dir / "IMG_0004.CR2")


@contextlib.contextmanager
def _unblocking(fifos: list[Path], after: float = 30.0):
    """Yields a list that stays empty unless something waited on one of ``fifos`` for ``after`` seconds (opened
    it for reading, which blocks until a writer comes): this then becomes that writer and closes at once, so
    a regression fails the test instead of hanging it."""
    came, stop = [], threading.Event()

    def watch() -> None:
        if stop.wait(after):
            return
        for fifo in fifos:
            try:  # succeeds only while a reader waits
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                came.append(fifo.name)
            except OSError:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield came
    finally:
        stop.set()
        watcher.join()


def test_what_is_not_a_file_is_never_read_and_says_why(tmp_path):
    from capcli.errors import ImageError

    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("pipe.jpg", tmp_path / "pipe.dng")  # a RAW name: read by rawpy, through the same check
    (tmp_path / "folder.jpg").mkdir()
    os.symlink("/dev/zero", tmp_path / "zero.png")  # endless
    os.symlink("/nonexistent/photo.jpg", tmp_path / "dangling.jpg")
    os.symlink("loop2.jpg", tmp_path / "loop1.jpg")
    os.symlink("loop1.jpg", tmp_path / "loop2.jpg")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock.jpg"))
        expected = {"pipe.jpg": "a named pipe (FIFO), not a photo file", "pipe.dng": "a named pipe (FIFO), not a "
                    "photo file", "folder.jpg": "a folder, not a photo file", "zero.png": "a device, not a photo file",
                    "dangling.jpg": "a broken symbolic link (to /nonexistent/photo.jpg)",
                    "loop1.jpg": "a symbolic link loop", "sock.jpg": "a socket, not a photo file"}
        with _unblocking([tmp_path / "pipe.jpg"]) as came:
            for name, why in expected.items():
                with pytest.raises(ImageError) as e:
                    load_image(tmp_path / name, min_size=224)
                assert str(e.value) == f"{name}: {why}"
        assert came == []


# ---------------------------------------------------------------------------------------------- captioning
def test_a_phone_folder_is_captioned_and_what_is_not_is_counted(phone_dir, tmp_path):
    out = tmp_path / "caps.jsonl"
    r = _cli(str(phone_dir), "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "skipped (unsupported) 2 (.aae 1, .mov 1)" in r.output
    assert "captioned 7, failed 1" in r.output
    recs = {record_key(x): x for x in read_records(out)}
    assert set(recs) == {"a.jpg", "b.JPG", "IMG_0001.HEIC", "IMG_0002.DNG", "IMG_0003.avif", "IMG_0004.CR2", ODD,
                         'new\nline, "quoted".jpg'}
    for key in ("IMG_0001.HEIC", "IMG_0002.DNG", "IMG_0003.avif"):
        assert recs[key]["caption"] and "error" not in recs[key]
    assert "not a camera RAW file" in recs["IMG_0004.CR2"]["error"]
    strict = _cli(str(phone_dir), "-o", str(tmp_path / "strict.jsonl"), "--strict")
    assert strict.exit_code == 1
    assert "1 image(s) failed and 2 file(s) skipped as unsupported (--strict)" in strict.output


def test_rotated_heic_raw_and_avif_caption_as_the_upright_photo(phone_dir, captioner, tmp_path, example_photos):
    upright = _landscape(example_photos).rotate(-90, expand=True)  # what the viewer shows
    upright.save(tmp_path / "upright.png")
    paths = [tmp_path / "upright.png", *(phone_dir / n for n in ("IMG_0001.HEIC", "IMG_0002.DNG", "IMG_0003.avif"))]
    recs = list(captioner.caption_paths(paths, workers=0))
    assert all("caption" in r for r in recs), recs
    feats = [captioner.spec.read(p).float() for p in paths]  # the encoder's input of each file
    for f in feats[1:]:
        assert (f - feats[0]).abs().mean() < 12  # lossy codecs differ a little; a turned picture by ~60
    assert (captioner.spec.read(paths[0]).float() - captioner.spec.read(paths[0]).float().flip(-1)).abs().mean() > 30


@pytest.fixture()
def linked_dir(example_photos, tmp_path) -> Path:
    """A folder as links and leftovers make it: a photo, a link to a photo, a broken link and a link loop named like
    photos, a named pipe with a photo's name and one without, a broken link to a text file, a link to an album
    outside, a subfolder with a link back up (a loop) and a second link to it, a hidden folder of thumbnails and a
    hidden photo."""
    album = tmp_path / "album"
    album.mkdir()
    shutil.copy(example_photos[3], album / "coffee.jpg")
    shutil.copy(example_photos[4], album / "rocket.jpg")
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    (d / ".thumbs").mkdir()
    shutil.copy(example_photos[2], d / "chelsea.jpg")
    shutil.copy(example_photos[0], d / "sub" / "inner.jpg")
    shutil.copy(example_photos[0], d / ".thumbs" / "thumb.jpg")
    shutil.copy(example_photos[0], d / ".hidden.jpg")
    (d / "linked.jpg").symlink_to(example_photos[1])
    (d / "dangling.jpg").symlink_to("/nonexistent/photo.jpg")
    (d / "loop1.jpg").symlink_to("loop2.jpg")
    (d / "loop2.jpg").symlink_to("loop1.jpg")
    (d / "notes.txt").symlink_to("/nonexistent/notes.txt")
    os.mkfifo(d / "p.jpg")
    os.mkfifo(d / "pipe")
    (d / "album").symlink_to("../album")
    (d / "sub" / "up").symlink_to("..")
    (d / "again").symlink_to("sub")
    return d


def test_links_pipes_and_hidden_entries_in_a_folder_are_never_silent(linked_dir, tmp_path):
    out = tmp_path / "caps.jsonl"
    with _unblocking([linked_dir / "p.jpg", linked_dir / "pipe"]) as came:
        r = _cli(str(linked_dir), "-r", "--strict", "-o", str(out))
    assert came == [] and r.exit_code == 1, r.output
    said = " ".join(r.output.split())  # Rich wraps the line
    assert ("captioned 5, failed 4, skipped (unsupported) 2 (broken link 1, named pipe 1), skipped (hidden) 2 "
            "(1 folder, 1 file), 2 linked folder(s) walked already in") in said, said
    assert "4 image(s) failed and 2 file(s) skipped as unsupported (--strict)" in said
    recs = {record_key(x): x for x in read_records(out)}
    assert {k for k, x in recs.items() if "caption" in x} == {"album/coffee.jpg", "album/rocket.jpg", "chelsea.jpg",
                                                              "linked.jpg", "sub/inner.jpg"}  # once each
    assert {k: x.get("error") for k, x in recs.items() if "error" in x} == {
        "dangling.jpg": "a broken symbolic link (to /nonexistent/photo.jpg)", "loop1.jpg": "a symbolic link loop",
        "loop2.jpg": "a symbolic link loop", "p.jpg": "a named pipe (FIFO), not a photo file"}


def test_without_recursive_subfolders_are_counted_and_hidden_entries_named_are_captioned(linked_dir, tmp_path):
    out = tmp_path / "caps.jsonl"
    with _unblocking([linked_dir / "p.jpg", linked_dir / "pipe"]) as came:
        r = _cli(str(linked_dir), str(linked_dir / ".hidden.jpg"), str(linked_dir / ".thumbs"),
                 str(linked_dir / "loop1.jpg"), "-o", str(out))
    assert came == [] and r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert ("skipped (unsupported) 2 (broken link 1, named pipe 1), skipped (hidden) 2 (1 folder, 1 file), "
            "3 subfolder(s) not walked (no --recursive) in") in said, said
    recs = {record_key(x): x for x in read_records(out)}
    assert set(recs) == {"chelsea.jpg", "linked.jpg", "dangling.jpg", "loop1.jpg", "loop2.jpg", "p.jpg",
                         ".hidden.jpg", "thumb.jpg"}  # the hidden file and folder named: taken as any other
    assert "caption" in recs[".hidden.jpg"] and "caption" in recs["thumb.jpg"]


def test_a_named_pipe_or_broken_link_named_alone_is_a_failed_record(linked_dir, tmp_path):
    with _unblocking([linked_dir / "p.jpg"]) as came:
        r = _cli(str(linked_dir / "p.jpg"), str(linked_dir / "dangling.jpg"), "-o", str(tmp_path / "x.json"))
    assert came == [] and r.exit_code == 1 and "error: no image could be captioned" in r.output, r.output
    assert [x["error"] for x in read_records(tmp_path / "x.json")] == [
        "a named pipe (FIFO), not a photo file", "a broken symbolic link (to /nonexistent/photo.jpg)"]


def test_a_folder_of_only_hidden_photos_says_so(example_photos, captioner, tmp_path):
    (tmp_path / "d" / ".thumbnails").mkdir(parents=True)
    shutil.copy(example_photos[0], tmp_path / "d" / ".thumbnails" / "a.jpg")
    with pytest.raises(UsageError, match=r"no image files found in .*/d; skipped \(hidden\) 1 \(1 folder\)$"):
        caption_files(captioner, [tmp_path / "d"], tmp_path / "x.jsonl", recursive=True)


def test_an_unreadable_subfolder_is_counted_as_unsupported(example_photos, captioner, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any folder")
    (tmp_path / "d" / "locked").mkdir(parents=True)
    shutil.copy(example_photos[0], tmp_path / "d" / "a.jpg")
    (tmp_path / "d" / "locked").chmod(0)
    try:
        s = caption_files(captioner, [tmp_path / "d"], tmp_path / "x.jsonl", recursive=True, workers=0)
    finally:
        (tmp_path / "d" / "locked").chmod(0o700)
    assert s.captioned == 1 and s.unsupported == {"unreadable folder": 1}


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")
def test_raw_and_heic_pairs_with_jpegs_are_one_shot_and_a_lone_heic_is_covered_by_its_sidecar(example_photos,
                                                                                                tmp_path):
    """A camera folder: IMG_0001.DNG + IMG_0001.JPG, IMG_0002.HEIC + IMG_0002.JPG, and a lone IMG_0003.HEIC.
    ``--sidecar xmp --embed --strict``: each pair is one shot (its JPEG's caption in IMG_000N.xmp and embedded in
    the JPEG), the lone HEIC's caption is in its sidecar, and nothing fails."""
    d = tmp_path / "camera"
    d.mkdir()
    im = _landscape(example_photos)
    make_dng(d / "IMG_0001.DNG", im)
    im.save(d / "IMG_0001.JPG", quality=90)
    im.save(d / "IMG_0002.HEIC")
    im.save(d / "IMG_0002.JPG", quality=90)
    im.save(d / "IMG_0003.HEIC")
    out = tmp_path / "caps.json"
    r = _cli(str(d), "-o", str(out), "--sidecar", "xmp", "--embed", "--strict")
    assert r.exit_code == 0, r.output
    assert "failed 0" in r.output and "already the sidecar" not in r.output, r.output
    recs = {record_key(x): x for x in read_records(out)}
    tags = subprocess.run(["exiftool", "-json", "-XMP-dc:Description", *map(str, sorted(d.iterdir()))],
                          capture_output=True, text=True, timeout=120).stdout
    got = {Path(t["SourceFile"]).name: t.get("Description") for t in json.loads(tags)}
    for shot in ("IMG_0001", "IMG_0002"):
        assert got[f"{shot}.xmp"] == got[f"{shot}.JPG"] == recs[f"{shot}.JPG"]["caption"]
    assert got["IMG_0003.xmp"] == recs["IMG_0003.HEIC"]["caption"]
    assert got["IMG_0001.DNG"] is None and got["IMG_0002.HEIC"] is None  # originals are never written into
    # captioned once: each original's record is its JPEG's caption, and the run captioned 3 photos for 5 files
    for shot, original in (("IMG_0001", "IMG_0001.DNG"), ("IMG_0002", "IMG_0002.HEIC")):
        assert recs[original]["caption"] == recs[f"{shot}.JPG"]["caption"]
        assert recs[original]["logprob"] == recs[f"{shot}.JPG"]["logprob"]
    assert "captioned 5, failed 0" in r.output and "5/5" not in r.output and "3/3" in r.output, r.output


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_any_file_name_round_trips_in_every_format(phone_dir, tmp_path, fmt):
    out = tmp_path / f"caps.{fmt}"
    assert _cli(str(phone_dir), "-o", str(out)).exit_code == 0
    text = out.read_bytes().decode("utf-8")  # strict UTF-8: readable by any tool
    assert "bad\\\\xffname.jpg" in text or "bad\\xffname.jpg" in text
    recs = read_records(out)
    odd = [r for r in recs if r.get("path_bytes")]
    assert len(odd) == 1 and odd[0]["path"] == "bad\\xffname.jpg"
    assert base64.b64decode(odd[0]["path_bytes"]) == b"bad\xffname.jpg"
    assert {record_key(r) for r in recs} >= {ODD, 'new\nline, "quoted".jpg'}
    if fmt == "csv":  # any CSV reader sees the same columns
        with out.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert rows[0].keys() >= {"path", "path_bytes"} and len(rows) == len(recs)
    again = _cli(str(phone_dir), "-o", str(out), "--resume")  # matched by the same rule: only the failed retried
    n_err = sum("error" in r for r in recs)
    assert n_err == 1 and len(recs) == 8  # the broken RAW file
    assert again.exit_code == 0 and "captioned 0, failed 1, 7 already done" in again.output, again.output


def test_path_rule_and_shards_for_names_that_are_not_utf8():
    assert path_fields("a.jpg") == {"path": "a.jpg"}
    fields = path_fields(ODD)
    assert fields["path"] == display(ODD) == "bad\\xffname.jpg"
    assert record_key(fields) == ODD and record_key({"path": "bad\\xffname.jpg"}) == "bad\\xffname.jpg"
    assert sum(in_shard(ODD, (i, 4)) for i in range(4)) == 1
    assert in_shard("été.jpg", (0, 3)) == in_shard("été.jpg".encode().decode(), (0, 3))


def test_internal_json_keeps_such_names_exactly(tmp_path):
    doc = {"failed": [{"file": ODD, "reason": f"{ODD}: not an image file"}]}
    path = atomic.write_json(tmp_path / "m.json", doc)
    assert json.loads(path.read_bytes().decode("utf-8")) == doc


# --------------------------------------------------------------------------------------- full disk, two writers
def _limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """``capcli ARGS`` in a process whose files may not grow past ``limit`` bytes (RLIMIT_FSIZE; SIGXFSZ
    ignored, so a write past it fails with EFBIG, as a full disk fails with ENOSPC). No root needed."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from capcli.cli import main; sys.argv[0] = 'capcli'; main()")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def many_dir(example_photos, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("many")
    for i in range(24):
        (d / f"p{i:03d}.jpg").symlink_to(example_photos[i % len(example_photos)])
    return d


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_full_disk_is_one_line_and_resume_completes(many_dir, tmp_path, fmt):
    out = tmp_path / f"caps.{fmt}"
    r = _limited(["caption", str(many_dir), "-o", str(out), "--device", "cpu", "--batch-size", "8"], 1000)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and "--resume" in errors[0], r.stderr
    safe = int(errors[0].split("; ")[1].split()[0])
    kept = read_records(out)  # still valid: whole records (.jsonl/.csv), or the last saved array (.json)
    assert len(kept) == safe and (safe > 0 or fmt == "json")
    if fmt == "jsonl":
        assert out.read_bytes().endswith(b"\n") and all(json.loads(x) for x in out.read_text().splitlines())
    done = CliRunner().invoke(app, ["caption", str(many_dir), "-o", str(out), "--device", "cpu", "--resume"])
    assert done.exit_code == 0, done.output
    keys = [record_key(x) for x in read_records(out)]
    assert sorted(keys) == sorted(p.name for p in many_dir.iterdir())  # every photo exactly once


def test_a_folder_that_cannot_be_written_is_one_line(many_dir, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    r = _cli(str(many_dir), "-o", str(ro / "caps.jsonl"))
    assert r.exit_code == 1 and "error: cannot write" in r.output


class _RemovesFolder(Progress):
    """Removes ``folder`` (rm -rf, as a user cleaning up would) once ``after`` images are done."""

    def __init__(self, folder: Path, after: int) -> None:
        self.folder, self.after, self.n = folder, after, 0

    def advance(self, n: int = 1, **fields: object) -> None:
        self.n += n
        if self.n == self.after:
            shutil.rmtree(self.folder)


def test_an_output_folder_removed_during_the_run_is_one_error(many_dir, captioner, tmp_path):
    out = tmp_path / "gone" / "caps.jsonl"
    with pytest.raises(OutputError, match="deleted or moved during the run, with the 3 record"):
        caption_files(captioner, [many_dir], out, workers=0, batch_size=4, progress=_RemovesFolder(out.parent, 3))
    assert not out.parent.exists()
    again = caption_files(captioner, [many_dir], out, workers=0, batch_size=8, resume=True)
    assert again.captioned == 24


def _holds_lock(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds a ``flock`` on the file at ``path``, as the kernel lists it (/proc/locks):
    the lock itself, not its file's appearing (a lock file exists before it is locked)."""
    try:
        st = path.stat()
        rows = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(f[1] == "FLOCK" and f[4] == str(pid) and f[5] == inode for f in (r.split() for r in rows) if len(f) > 5)


def test_a_second_writer_is_refused_while_the_first_runs(many_dir, tmp_path):
    out = tmp_path / "caps.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "capcli.cli", "caption", str(many_dir), "-o", str(out),
                              "--device", "cpu", "--batch-size", "4"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        hang = time.monotonic() + 900  # bounds a hang only: starting up on a busy machine may take minutes
        while not _holds_lock(first.pid, lock.sidecar(out)):  # the first run holds the lock: about to caption
            assert first.poll() is None and time.monotonic() < hang, first.communicate()
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # paused mid-run (a slow disk, a big folder): it still holds the lock
        assert first.poll() is None, "the first run ended before it could be paused"
        second = _cli(str(many_dir), "-o", str(out))
        first.send_signal(signal.SIGCONT)
        assert second.exit_code == 1
        assert "is being written by another capcli run (pid" in second.output
        assert "Traceback" not in second.output
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert first.returncode == 0, stderr
    assert len(read_records(out)) == 24  # the refused run truncated nothing
    assert not lock.sidecar(out).exists()  # the lock file goes with the run


@pytest.mark.parametrize("other_name", ["symlink", "hardlink"])
def test_a_second_writer_through_another_name_of_the_output_is_refused(many_dir, tmp_path, other_name):
    """``-o slink.jsonl`` (a symbolic link to the output) or ``-o hard.jsonl`` (a hard link to it): the same file,
    so a second real process is refused at once and the first run's file stays whole."""
    out = tmp_path / "caps.jsonl"
    out.write_text("")  # an earlier output, written again (a hard link needs a file to point at)
    other = tmp_path / f"{other_name}.jsonl"
    if other_name == "symlink":
        other.symlink_to(out.name)
    else:
        os.link(out, other)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "capcli.cli", "caption", str(many_dir), "--device", "cpu", "--batch-size", "4", "-o"]
    first = subprocess.Popen([*cmd, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        hang = time.monotonic() + 900  # bounds a hang only
        while not _holds_lock(first.pid, out):  # the first run holds the lock (the file's own, taken last)
            assert first.poll() is None and time.monotonic() < hang, first.communicate()
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # paused mid-run: it still holds the lock
        second = subprocess.run([*cmd, str(other)], capture_output=True, text=True, env=env, timeout=300)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "being written by another capcli run" in second.stderr and "Traceback" not in second.stderr
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert first.returncode == 0, stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 24 and all(json.loads(x) for x in lines)  # whole, and only the first run's records
    assert other.read_bytes() == out.read_bytes()  # still the same file
    assert not lock.sidecar(out).exists() and not lock.sidecar(other).exists()


def test_writing_through_a_symlink_keeps_the_link(tmp_path):
    target = tmp_path / "real.json"
    link = tmp_path / "link.json"
    link.symlink_to(target.name)
    atomic.write_json(link, [1])
    assert link.is_symlink() and json.loads(target.read_text()) == [1]


def test_the_lock_is_exclusive_and_released(tmp_path):
    target = tmp_path / "x.json"
    first = lock.exclusive(lock.sidecar(target), str(target))
    with first, pytest.raises(LockedError, match="another capcli run"), lock.exclusive(lock.sidecar(target), "x"):
        pass
    with lock.exclusive(lock.sidecar(target), str(target)):  # free again
        pass


# ----------------------------------------------------------------------------------------------- features
def test_features_full_disk_is_one_line_and_the_next_run_completes(small_flickr8k, tmp_path):
    from capcli.features import LOCK, MANIFEST, FeatureStore

    out = tmp_path / "feats"
    args = ["features", small_flickr8k.source, "--out", str(out), "--shard-size", "10", "--workers", "0",
            "--device", "cpu"]
    r = _limited(args, 200_000)  # a shard of 10 images is ~1.3 MB
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write features" in errors[0] and "File too large" in errors[0], r.stderr
    manifest = json.loads((out / MANIFEST).read_text())  # still valid, listing only complete shards
    assert manifest["shards"] == [] and not manifest["complete"]
    assert not (out / LOCK).exists()
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert len(FeatureStore(out)) == 30


def test_features_second_writer_is_refused(small_flickr8k, tmp_path):
    from capcli.features import LOCK, extract_features

    out = tmp_path / "feats"
    with lock.exclusive(out / LOCK, str(out)), pytest.raises(LockedError, match="another capcli run"):
        extract_features(small_flickr8k, out=out, workers=0, device="cpu")
