"""Captions into photo metadata: XMP sidecars, embedded XMP, .txt sidecars; read back by exiftool and pyexiv2."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capcli import atomic
from capcli.errors import UsageError
from capcli.metadata import (
    TXT_RECORD,
    Fields,
    PublishOptions,
    Status,
    WrittenBy,
    _sos_offset,
    counts,
    embed,
    image_data_digest,
    publish,
    read_fields,
    sidecar_path,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "photos"


def _jpeg_scan(data: bytes) -> bytes:
    """The bytes of a JPEG from its first SOS marker to its EOI (0xFFD9 cannot occur inside: 0xFF is stuffed)."""
    start = _sos_offset(data)
    end = data.find(b"\xff\xd9", start)
    return data[start: end + 2 if end >= 0 else len(data)]
pyexiv2 = pytest.importorskip("pyexiv2")
needs_exiftool = pytest.mark.skipif(shutil.which("exiftool") is None,
                                    reason="exiftool not installed (apt-get install libimage-exiftool-perl)")
PROV = WrittenBy(model="flickr8k-attention")
OPTS = PublishOptions(PROV)
LABELS = {"chelsea": ["cat", "tabby"], "camera": ["tripod"], "coffee": ["espresso", "cup"]}


@pytest.fixture
def photos(tmp_path) -> dict[str, Path]:
    """The example photos copied into tmp_path, plus WebP (lossless and lossy), TIFF and progressive JPEG copies."""
    folder = tmp_path / "photos"
    folder.mkdir()
    out = {}
    for p in sorted(EXAMPLES.glob("*.*")):
        if p.suffix in {".jpg", ".png"}:
            out[p.name] = Path(shutil.copy(p, folder / p.name))
    with Image.open(EXAMPLES / "chelsea.jpg") as im:
        im.save(folder / "chelsea-lossless.webp", lossless=True)
        im.save(folder / "chelsea-lossy.webp", quality=70)
        im.save(folder / "chelsea.tif", compression="tiff_lzw")
        im.save(folder / "chelsea-progressive.jpg", progressive=True, quality=90)
    for name in ("chelsea-lossless.webp", "chelsea-lossy.webp", "chelsea.tif", "chelsea-progressive.jpg"):
        out[name] = folder / name
    return out


def record(photo: Path, caption: str | None = None) -> dict:
    labels = LABELS.get(photo.stem.split("-")[0], [])
    return {"path": photo.name, "caption": caption or f"a photo of {photo.stem}", "logprob": -7.5,
            "labels": [{"word": w, "p": 0.9 - 0.1 * i} for i, w in enumerate(labels)]}


def exiftool(*paths: Path) -> list[dict]:
    out = subprocess.run(["exiftool", "-j", "-G1", "-XMP:all", "-IPTC:all", *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def pixels(path: Path) -> tuple[str, tuple[int, int], np.ndarray]:
    with Image.open(path) as im:
        return im.mode, im.size, np.asarray(im).copy()


def exiftool_set(path: Path, *assignments: str) -> None:
    subprocess.run(["exiftool", "-q", "-overwrite_original", *assignments, str(path)], check=True)


# ------------------------------------------------------------------------------------------- embedding
@needs_exiftool
def test_embedded_fields_are_read_back_by_exiftool_and_pyexiv2(photos):
    items = [(p, record(p)) for p in photos.values()]
    results = publish(items, "embed", OPTS)
    assert counts(results)["written"] == len(photos), [r.describe() for r in results]
    for meta, (photo, rec) in zip(exiftool(*photos.values()), items, strict=True):
        assert meta["XMP-dc:Description"] == rec["caption"]
        assert meta["XMP-iptcCore:AltTextAccessibility"] == rec["caption"]
        labels = [lab["word"] for lab in rec["labels"]]
        assert as_list(meta.get("XMP-dc:Subject", [])) == labels
        assert (meta["XMP-capcli:Tool"], meta["XMP-capcli:Model"]) == ("capcli", "flickr8k-attention")
        assert str(meta["XMP-capcli:Version"]) == PROV.version
        with pyexiv2.Image(str(photo)) as img:
            xmp = img.read_xmp()
        assert xmp["Xmp.dc.description"] == {'lang="x-default"': rec["caption"]}
        assert xmp["Xmp.iptc.AltTextAccessibility"] == {'lang="x-default"': rec["caption"]}
        assert xmp.get("Xmp.dc.subject", []) == labels
        assert read_fields(photo) == Fields(rec["caption"], tuple(labels), PROV)


def test_embedding_keeps_the_jpeg_scan_bytes_and_the_pixels(photos):
    before = {name: (p.read_bytes(), pixels(p)) for name, p in photos.items()}
    results = publish([(p, record(p)) for p in photos.values()], "embed", OPTS)
    assert all(r.status is Status.WRITTEN for r in results), [r.describe() for r in results]
    for name, p in photos.items():
        raw, (mode, size, px) = before[name]
        after = p.read_bytes()
        assert after != raw and b"a photo of" in after  # the caption is in the file ...
        if p.suffix == ".jpg":  # ... and every byte from the first SOS to EOI is the same
            scan = _jpeg_scan(raw)
            assert scan[:2] == b"\xff\xda" and scan[-2:] == b"\xff\xd9" and len(scan) > 0.5 * len(raw)
            assert _jpeg_scan(after) == scan
        mode2, size2, px2 = pixels(p)
        assert (mode2, size2) == (mode, size) and np.array_equal(px2, px)
    assert not [f for f in photos["chelsea.jpg"].parent.iterdir() if ".tmp" in f.name]  # no temporary left


def test_image_data_digest_sees_a_re_encoded_photo(photos, tmp_path):
    jpg = photos["chelsea.jpg"]
    with Image.open(jpg) as im:
        im.save(tmp_path / "again.jpg", quality=60)
        im.save(tmp_path / "again.png")
        im.rotate(180).save(tmp_path / "turned.png")
    assert image_data_digest(jpg) != image_data_digest(tmp_path / "again.jpg")
    assert image_data_digest(tmp_path / "again.png") != image_data_digest(tmp_path / "turned.png")
    assert image_data_digest(jpg) == image_data_digest(jpg)


@needs_exiftool
def test_a_persons_description_survives_a_rerun(photos):
    chelsea, coffee, astro, camera = (photos[n] for n in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg", "camera.png"))
    exiftool_set(chelsea, "-XMP-dc:Description=Our cat Chelsea, summer 2019", "-XMP-dc:Subject=family")
    exiftool_set(coffee, "-IPTC:Caption-Abstract=Espresso at Luigi's")
    exiftool_set(camera, "-XMP-dc:Subject=b&w")  # a person's keyword, no description
    items = [(p, record(p)) for p in (chelsea, coffee, astro, camera)]
    first = publish(items, "embed", OPTS)
    assert [r.status for r in first] == [Status.SKIPPED, Status.SKIPPED, Status.WRITTEN, Status.WRITTEN]
    assert "Our cat Chelsea" in first[0].reason and "--overwrite" in first[0].reason

    # A rerun replaces capcli's own words, not a person's, nor a capcli caption a person has since edited.
    exiftool_set(astro, "-XMP-dc:Description=Eileen Collins, STS-93")
    second = publish([(p, record(p, f"another caption of {p.stem}")) for p in (chelsea, coffee, astro, camera)],
                     "embed", OPTS)
    assert [r.status for r in second] == [Status.SKIPPED, Status.SKIPPED, Status.SKIPPED, Status.WRITTEN]
    chel, cof, ast, cam = exiftool(chelsea, coffee, astro, camera)
    assert chel["XMP-dc:Description"] == "Our cat Chelsea, summer 2019" and chel["XMP-dc:Subject"] == "family"
    assert cof["IPTC:Caption-Abstract"] == "Espresso at Luigi's" and "XMP-dc:Description" not in cof
    assert ast["XMP-dc:Description"] == "Eileen Collins, STS-93"
    assert cam["XMP-dc:Description"] == "another caption of camera"
    assert as_list(cam["XMP-dc:Subject"]) == ["b&w", "tripod"]  # the person's keyword kept, capcli's once

    # A rerun with other labels drops capcli's old keywords and keeps the person's.
    rec = record(camera, "a third caption") | {"labels": [{"word": "camera", "p": 0.8}]}
    assert publish([(camera, rec)], "embed", OPTS)[0].status is Status.WRITTEN
    assert as_list(exiftool(camera)[0]["XMP-dc:Subject"]) == ["b&w", "camera"]

    # --overwrite replaces a person's description too.
    forced = publish([(chelsea, record(chelsea))], "embed", PublishOptions(PROV, overwrite=True))
    assert forced[0].status is Status.WRITTEN
    assert exiftool(chelsea)[0]["XMP-dc:Description"] == "a photo of chelsea"


def test_unwritable_files_fail_one_by_one_and_the_rest_are_written(photos):
    folder = photos["chelsea.jpg"].parent
    readonly = photos["coffee.jpg"]
    readonly.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    raw_cr2 = folder / "IMG_0001.CR2"
    raw_cr2.write_bytes(b"II*\x00\x10\x00\x00\x00CR\x02\x00" + bytes(200))  # a CR2 header, nothing else
    raw_dng = shutil.copy(photos["chelsea.tif"], folder / "scan.DNG")  # a TIFF, as a DNG is
    with Image.open(photos["camera.png"]) as im:
        im.save(folder / "camera.bmp")
    garbage = folder / "broken.jpg"
    garbage.write_bytes(b"not a jpeg at all" * 20)
    paths = [photos["chelsea.jpg"], readonly, raw_cr2, Path(raw_dng), folder / "camera.bmp", garbage,
             photos["rocket.jpg"], folder / "missing.jpg"]
    before = {p: p.read_bytes() for p in paths if p.exists()}
    items = [(p, record(p)) for p in paths] + [(folder / "astronaut.jpg", {"path": "astronaut.jpg",
                                                                           "error": "astronaut.jpg: cannot decode"})]
    results = publish(items, "embed", OPTS)
    status = {r.photo.name: (r.status, r.reason) for r in results}
    assert status["chelsea.jpg"][0] is status["rocket.jpg"][0] is Status.WRITTEN
    assert status["coffee.jpg"] == (Status.FAILED, "read-only file")
    for raw in ("IMG_0001.CR2", "scan.DNG"):
        assert status[raw][0] is Status.FAILED and "RAW file" in status[raw][1] and "--sidecar xmp" in status[raw][1]
    assert status["camera.bmp"][0] is Status.FAILED and "cannot embed metadata in .bmp" in status["camera.bmp"][1]
    assert status["broken.jpg"][0] is Status.FAILED and "cannot read its metadata" in status["broken.jpg"][1]
    assert status["missing.jpg"] == (Status.FAILED, "no such file")
    assert status["astronaut.jpg"] == (Status.FAILED, "not captioned: astronaut.jpg: cannot decode")
    for p, data in before.items():
        if p.name not in ("chelsea.jpg", "rocket.jpg"):
            assert p.read_bytes() == data, p.name  # untouched
    assert not [f for f in folder.iterdir() if ".tmp" in f.name]


def test_dry_run_writes_nothing_and_says_what_and_where(photos):
    folder = photos["chelsea.jpg"].parent
    snapshot = {f.name: f.read_bytes() for f in folder.iterdir()}
    exiftool_free = photos["camera.png"]
    with pyexiv2.Image(str(exiftool_free)) as img:  # a person's words, written with pyexiv2 this time
        img.modify_xmp({"Xmp.dc.description": {'lang="x-default"': "Cameraman, MIT"}})
    snapshot["camera.png"] = exiftool_free.read_bytes()
    items = [(p, record(p)) for p in photos.values() if p.name != "chelsea.tif"]  # its sidecar is chelsea.jpg's
    for how in ("embed", "xmp", "txt"):
        results = publish(items, how, PublishOptions(PROV, dry_run=True))
        by_name = {r.photo.name: r for r in results}
        assert by_name["camera.png"].status is Status.SKIPPED  # its description is a person's, however delivered
        assert counts(results) == {"written": 0, "skipped": 1, "failed": 0, "would-write": len(items) - 1}
        r = by_name["chelsea.jpg"]
        expected = {"embed": "chelsea.jpg", "xmp": "chelsea.xmp", "txt": "chelsea.txt"}[how]
        assert r.target == folder / expected
        assert r.describe() == f'would write {folder / expected}: "a photo of chelsea"'
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == snapshot


def test_a_symlinked_photo_is_written_through_the_link(photos, tmp_path):
    link = tmp_path / "link.jpg"
    link.symlink_to(photos["chelsea.jpg"])
    r = embed(link, Fields("a cat", (), PROV), OPTS)
    assert r.status is Status.WRITTEN and link.is_symlink()
    assert read_fields(photos["chelsea.jpg"]).caption == "a cat"


# ------------------------------------------------------------------------------------------- XMP sidecars
@needs_exiftool
@pytest.mark.parametrize("naming", ["stem", "ext"])
def test_xmp_sidecars_are_read_back_and_the_photos_untouched(photos, naming):
    before = {p: p.read_bytes() for p in photos.values()}
    jpgs = [p for p in photos.values() if p.suffix == ".jpg" and "-" not in p.stem]
    results = publish([(p, record(p)) for p in jpgs], "xmp", PublishOptions(PROV, naming=naming))
    assert all(r.status is Status.WRITTEN for r in results), [r.describe() for r in results]
    sidecars = [r.target for r in results]
    assert sidecars == [p.with_name(p.name + ".xmp") if naming == "ext" else p.with_suffix(".xmp") for p in jpgs]
    for meta, photo in zip(exiftool(*sidecars), jpgs, strict=True):
        assert meta["XMP-dc:Description"] == meta["XMP-iptcCore:AltTextAccessibility"] == f"a photo of {photo.stem}"
        assert meta["XMP-capcli:Model"] == "flickr8k-attention"
    with pyexiv2.Image(str(sidecars[1])) as img:
        assert img.read_xmp()["Xmp.dc.subject"] == ["cat", "tabby"]  # chelsea.jpg's labels
    assert {p: p.read_bytes() for p in photos.values()} == before


@needs_exiftool
def test_an_existing_sidecar_keeps_its_other_fields_and_a_persons_words(photos):
    chelsea, coffee = photos["chelsea.jpg"], photos["coffee.jpg"]
    # Sidecars as a photo tool leaves them: a rating and a keyword; one also with a person's description.
    subprocess.run(["exiftool", "-q", "-o", str(chelsea.with_suffix(".xmp")), "-XMP-xmp:Rating=4",
                    "-XMP-dc:Subject=pets", "-XMP-lr:HierarchicalSubject=Animals|Cats", str(chelsea)], check=True)
    subprocess.run(["exiftool", "-q", "-o", str(coffee.with_suffix(".xmp")), "-XMP-xmp:Rating=2",
                    "-XMP-dc:Description=Luigi's best", str(coffee)], check=True)
    results = publish([(chelsea, record(chelsea)), (coffee, record(coffee))], "xmp", OPTS)
    assert [r.status for r in results] == [Status.WRITTEN, Status.SKIPPED]
    chel, cof = exiftool(chelsea.with_suffix(".xmp"), coffee.with_suffix(".xmp"))
    assert chel["XMP-xmp:Rating"] == 4 and chel["XMP-lr:HierarchicalSubject"] == "Animals|Cats"
    assert chel["XMP-dc:Subject"] == ["pets", "cat", "tabby"] and chel["XMP-dc:Description"] == "a photo of chelsea"
    assert cof["XMP-dc:Description"] == "Luigi's best" and cof["XMP-xmp:Rating"] == 2


@needs_exiftool
def test_a_sidecar_respects_a_description_embedded_in_the_photo(photos):
    chelsea = photos["chelsea.jpg"]
    exiftool_set(chelsea, "-XMP-dc:Description=Chelsea at two")
    r = publish([(chelsea, record(chelsea))], "xmp", OPTS)[0]
    assert r.status is Status.SKIPPED and not chelsea.with_suffix(".xmp").exists()
    # capcli's own embedded caption does not block its sidecar.
    publish([(photos["coffee.jpg"], record(photos["coffee.jpg"]))], "embed", OPTS)
    assert publish([(photos["coffee.jpg"], record(photos["coffee.jpg"]))], "xmp", OPTS)[0].status is Status.WRITTEN


def test_sidecars_for_raw_files_and_name_clashes(photos):
    folder = photos["chelsea.jpg"].parent
    raw = folder / "IMG_0002.CR2"
    raw.write_bytes(b"II*\x00\x10\x00\x00\x00CR\x02\x00" + bytes(200))
    shutil.copy(photos["camera.png"], folder / "chelsea.png")  # chelsea.jpg and chelsea.png: one chelsea.xmp
    items = [(raw, record(raw)), (photos["chelsea.jpg"], record(photos["chelsea.jpg"])),
             (folder / "chelsea.png", record(folder / "chelsea.png"))]
    stem = publish(items, "xmp", OPTS)
    assert [r.status for r in stem] == [Status.WRITTEN, Status.WRITTEN, Status.FAILED]
    assert stem[2].reason == "chelsea.xmp is already the sidecar of chelsea.jpg; use --sidecar-name ext"
    assert read_fields(raw.with_suffix(".xmp")).caption == "a photo of IMG_0002"
    assert read_fields(folder / "chelsea.xmp").caption == "a photo of chelsea"  # not chelsea.png's
    ext = publish(items, "xmp", PublishOptions(PROV, naming="ext"))
    assert [r.status for r in ext] == [Status.WRITTEN] * 3
    assert read_fields(folder / "chelsea.png.xmp").caption == "a photo of chelsea"  # stem of chelsea.png


def test_a_read_only_sidecar_fails_and_others_go_on(photos):
    chelsea, rocket = photos["chelsea.jpg"], photos["rocket.jpg"]
    publish([(chelsea, record(chelsea))], "xmp", OPTS)
    sidecar_path(chelsea).chmod(0o444)
    results = publish([(chelsea, record(chelsea, "new")), (rocket, record(rocket))], "xmp", OPTS)
    assert [(r.status, r.reason) for r in results] == [(Status.FAILED, "read-only file"), (Status.WRITTEN, "")]
    assert read_fields(sidecar_path(chelsea)).caption == "a photo of chelsea"


# ------------------------------------------------------------------------------------------- .txt sidecars
def test_txt_sidecars_follow_the_record_of_what_capcli_wrote(photos):
    folder = photos["chelsea.jpg"].parent
    chelsea, coffee, rocket, astro = (photos[n] for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg"))
    (folder / "coffee.txt").write_text("espresso, saucer, wooden table\n")  # a person's training caption
    first = publish([(p, record(p)) for p in (chelsea, coffee, rocket)], "txt", OPTS)
    assert [r.status for r in first] == [Status.WRITTEN, Status.SKIPPED, Status.WRITTEN]
    assert (folder / "chelsea.txt").read_text() == "a photo of chelsea\n"
    assert (folder / "coffee.txt").read_text() == "espresso, saucer, wooden table\n"
    hashes = json.loads((folder / TXT_RECORD).read_text())["files"]
    assert sorted(hashes) == ["chelsea.txt", "rocket.txt"]

    (folder / "rocket.txt").write_text("Falcon 9 on the pad\n")  # a person edits capcli's caption
    (folder / "astronaut.txt").write_text("a photo of astronaut\n")  # same text capcli would write: no record needed
    second = publish([(p, record(p, f"new caption of {p.stem}")) for p in (chelsea, coffee, rocket)]
                     + [(astro, record(astro))], "txt", OPTS)
    assert [r.status for r in second] == [Status.WRITTEN, Status.SKIPPED, Status.SKIPPED, Status.WRITTEN]
    assert (folder / "chelsea.txt").read_text() == "new caption of chelsea\n"
    assert (folder / "rocket.txt").read_text() == "Falcon 9 on the pad\n"

    # Without the record, capcli's older .txt files count as a person's: the safe side.
    (folder / TXT_RECORD).unlink()
    assert publish([(chelsea, record(chelsea, "third"))], "txt", OPTS)[0].status is Status.SKIPPED
    forced = publish([(coffee, record(coffee))], "txt", PublishOptions(PROV, overwrite=True))
    assert forced[0].status is Status.WRITTEN and (folder / "coffee.txt").read_text() == "a photo of coffee\n"


def test_txt_sidecar_failures_are_per_file(photos):
    folder = photos["chelsea.jpg"].parent
    publish([(photos["chelsea.jpg"], record(photos["chelsea.jpg"]))], "txt", OPTS)
    os.chmod(folder / "chelsea.txt", 0o444)
    results = publish([(p, record(p, "again")) for p in (photos["chelsea.jpg"], photos["rocket.jpg"])], "txt", OPTS)
    assert [(r.status, r.reason) for r in results] == [(Status.FAILED, "read-only file"), (Status.WRITTEN, "")]
    assert (folder / "chelsea.txt").read_text() == "a photo of chelsea\n"


def test_a_photo_listed_twice_and_bad_options(photos):
    chelsea = photos["chelsea.jpg"]
    results = publish([(chelsea, record(chelsea)), (chelsea, record(chelsea, "other"))], "embed", OPTS)
    assert [(r.status, r.reason) for r in results] == [(Status.WRITTEN, ""), (Status.FAILED, "listed twice")]
    assert read_fields(chelsea).caption == "a photo of chelsea"
    with pytest.raises(UsageError, match="publish as xmp, txt or embed"):
        publish([(chelsea, record(chelsea))], "exif", OPTS)
    with pytest.raises(UsageError, match="sidecar names are stem or ext"):
        publish([(chelsea, record(chelsea))], "xmp", PublishOptions(PROV, naming="darktable"))


def test_data_after_a_jpegs_end_is_kept(photos):
    """A motion photo's video (or MPF images) follows the JPEG's EOI: embedding keeps it, byte for byte."""
    rocket = photos["rocket.jpg"]
    trailer = b"ftypmp42" + bytes(range(256)) * 40
    rocket.write_bytes(rocket.read_bytes() + trailer)
    before = image_data_digest(rocket)
    assert publish([(rocket, record(rocket))], "embed", OPTS)[0].status is Status.WRITTEN
    assert rocket.read_bytes().endswith(trailer) and image_data_digest(rocket) == before


_EMBED_FOREVER = """
import sys
from pathlib import Path
from capcli.metadata import Fields, WrittenBy, PublishOptions, embed
photo, opts, i = Path(sys.argv[1]), PublishOptions(WrittenBy("m")), 0
print("ready", flush=True)
while True:
    i += 1
    assert embed(photo, Fields(f"caption {i}"), opts).status == "written"
"""


@pytest.mark.slow
def test_a_process_killed_while_embedding_leaves_the_old_or_the_new_photo(photos, tmp_path):
    """SIGKILL a process that embeds over and over, at several moments: the photo is always whole."""
    import signal
    import sys
    import time

    big = tmp_path / "big.jpg"
    with Image.open(photos["astronaut.jpg"]) as im:
        im.resize((2400, 2400)).save(big, quality=92)  # a few MB, so a write takes a while
    want = image_data_digest(big)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for delay in (0.05, 0.2, 0.45, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", _EMBED_FOREVER, str(big)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert image_data_digest(big) == want
        fields = read_fields(big)
        assert fields is None or fields.caption.startswith("caption ")
        with Image.open(big) as im:
            im.load()


# ------------------------------------------------------------------------------------------- any file name
ODD = os.fsdecode(b"caf\xe9 \xff.jpg")  # not UTF-8: Python holds each such byte as a lone surrogate
LONG = "写真" * 40 + ".jpg"  # 244 bytes: the name fits a file system's 255, ".NAME.tmpPID.jpg" does not


def _renamed(photo: Path, name: str) -> Path:
    """``photo`` renamed to ``name``, or skip where the file system takes no such name (macOS: not UTF-8)."""
    if len(os.fsencode(name)) > atomic.name_max(photo.parent):
        pytest.skip(f"this file system takes names of at most {atomic.name_max(photo.parent)} bytes")
    try:
        return photo.rename(photo.with_name(name))
    except OSError as e:
        pytest.skip(f"this file system refuses the name {name!r}: {e}")


@needs_exiftool
@pytest.mark.parametrize("name", [ODD, LONG], ids=["not-utf8", "244-bytes"])
def test_any_file_name_is_embedded_and_gets_its_sidecars(photos, name):
    photo = _renamed(photos["chelsea.jpg"], name)
    scan = _jpeg_scan(photo.read_bytes())
    rec = {"path": name, "caption": "a cat on a rug", "labels": [{"word": "cat", "p": 0.9}]}
    for how in ("embed", "xmp", "txt"):
        results = publish([(photo, rec)], how, OPTS)
        assert [r.status for r in results] == [Status.WRITTEN], [r.describe() for r in results]
    xmp, txt = photo.with_suffix(".xmp"), photo.with_suffix(".txt")
    for meta in exiftool(photo, xmp):
        assert meta["XMP-dc:Description"] == meta["XMP-iptcCore:AltTextAccessibility"] == "a cat on a rug"
        assert as_list(meta["XMP-dc:Subject"]) == ["cat"]
    assert read_fields(photo) == read_fields(xmp) == Fields("a cat on a rug", ("cat",), PROV)
    assert txt.read_text("utf-8") == "a cat on a rug\n"
    assert _jpeg_scan(photo.read_bytes()) == scan  # the image data, byte for byte
    names = {p.name for p in photo.parent.iterdir()}
    assert {photo.name, xmp.name, txt.name, TXT_RECORD} <= names and not [n for n in names if ".tmp" in n]

    short = photo.rename(photo.with_name("short.jpg"))  # exiftool's own temporary name would not fit
    exiftool_set(short, "-XMP-dc:Description=Our cat, by the window")  # a person's words, read back by name
    short.rename(photo)
    r = embed(photo, Fields("a dog", (), PROV), OPTS)
    assert r.status is Status.SKIPPED and "Our cat, by the window" in r.reason
    assert publish([(photo, {**rec, "caption": "a cat"})], "xmp", OPTS)[0].status is Status.SKIPPED
    r = embed(photo, Fields("a dog", (), PROV), PublishOptions(PROV, overwrite=True))
    assert r.status is Status.WRITTEN and exiftool(photo)[0]["XMP-dc:Description"] == "a dog"


def test_names_at_the_length_limit_are_written_and_a_sidecar_name_over_it_fails_alone(photos):
    longest = _renamed(photos["chelsea.jpg"], "写真" * 41 + "abcde.jpg")  # 255 bytes
    rec = {"caption": "a cat"}
    assert publish([(longest, rec)], "embed", OPTS)[0].status is Status.WRITTEN
    assert publish([(longest, rec)], "xmp", OPTS)[0].status is Status.WRITTEN  # NAME.xmp: 255 bytes too
    assert read_fields(longest).caption == read_fields(longest.with_suffix(".xmp")).caption == "a cat"
    items = [(longest, rec), (photos["coffee.jpg"], {"caption": "a cup"})]
    first, second = publish(items, "xmp", PublishOptions(PROV, naming="ext"))  # NAME.jpg.xmp: 259 bytes
    assert first.status is Status.FAILED and second.status is Status.WRITTEN
    assert first.reason == (f"cannot write {longest.name}.xmp: File name too long (259 bytes; at most 255 here); "
                            "--sidecar-name stem gives a shorter one")
    assert not [p for p in longest.parent.iterdir() if ".tmp" in p.name]


def test_temporary_names_fit_the_file_system_and_differ_by_name(tmp_path):
    """Real files at the limit, in 1-, 3- and 4-byte characters and undecodable bytes, with and without an
    extension: each is written atomically, its temporary name fits, and two names alike but at the end differ."""
    limit = atomic.name_max(tmp_path)
    names = ["a" * (limit - 4) + ".jpg", "写真" * ((limit - 5) // 6) + ".jpeg", "🐈" * ((limit - 4) // 4) + ".png",
             os.fsdecode(b"\xff" * (limit - 4)) + ".tif", "x" * limit, "a." + "b" * (limit - 2),
             "写真" * ((limit - 5) // 6) + ".jpe"]
    for name in names:
        assert len(os.fsencode(name)) <= limit
        tmp = atomic.temp_name(name, limit)
        assert tmp.startswith(".") and len(os.fsencode(tmp)) <= limit and tmp != name
        if len(Path(name).suffix) <= 5:
            assert tmp.endswith(Path(name).suffix)  # writers that go by the extension still can
        atomic.write_bytes(tmp_path / name, os.fsencode(name))  # its temporary file would fail if it were too long
        assert (tmp_path / name).read_bytes() == os.fsencode(name)
    assert atomic.temp_name(names[1], limit) != atomic.temp_name(names[6], limit)
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # no temporary left
    with pytest.raises(OSError, match=rf"File name too long \({limit + 1} bytes; at most {limit} here\)"):
        atomic.write_text(tmp_path / ("z" * (limit + 1)), "too long")


def test_switching_the_sidecar_naming_leaves_no_old_sidecar_of_capclis(photos):
    """--sidecar-name ext, then stem: capcli's chelsea.jpg.xmp goes (it would disagree with chelsea.xmp); a
    coffee.jpg.xmp another tool also wrote into (a rating) stays."""
    chelsea, coffee = photos["chelsea.jpg"], photos["coffee.jpg"]
    items = [(chelsea, record(chelsea)), (coffee, record(coffee))]
    assert counts(publish(items, "xmp", PublishOptions(PROV, naming="ext")))["written"] == 2
    with pyexiv2.Image(str(sidecar_path(coffee, "xmp", "ext"))) as img:
        img.modify_xmp({"Xmp.xmp.Rating": "3"})
    items = [(chelsea, record(chelsea, "a cat on a chair")), (coffee, record(coffee, "a cup"))]
    assert counts(publish(items, "xmp", PublishOptions(PROV, naming="stem")))["written"] == 2
    assert not sidecar_path(chelsea, "xmp", "ext").exists()
    assert read_fields(sidecar_path(chelsea, "xmp", "stem")).caption == "a cat on a chair"
    assert sidecar_path(coffee, "xmp", "ext").exists() and read_fields(sidecar_path(coffee, "xmp")).caption == "a cup"
