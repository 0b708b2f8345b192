"""`capcli caption` publishing: sidecars, embedded XMP, dry runs, the gallery and --min-confidence, end to end.

The captions come from the shipped model on a copy of examples/photos; what was written is read back by exiftool
(and the gallery by headless chromium), as a photo tool would.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli.caption import caption_files, in_shard
from capcli.captioner import Captioner
from capcli.cli import app
from capcli.names import path_fields
from capcli.outputs import CSV_FIELDS, read_records
from capcli.publish import PublishRequest, is_low_confidence, pair_records, publish_captioned, publish_output

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "photos"
PHOTOS = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in {".jpg", ".png"})
pytest.importorskip("pyexiv2")
needs_exiftool = pytest.mark.skipif(shutil.which("exiftool") is None,
                                    reason="exiftool not installed (apt-get install libimage-exiftool-perl)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def run(*args: str):
    return CliRunner().invoke(app, ["caption", *args], env={"COLUMNS": "200"}, prog_name="capcli")


def exiftool(*paths: Path) -> list[dict]:
    out = subprocess.run(["exiftool", "-json", "-struct", "-XMP:all", *map(str, paths)], capture_output=True,
                         text=True, timeout=120)
    return json.loads(out.stdout)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """A copy of examples/photos captioned once by the shipped model (out.json beside the folder)."""
    base = tmp_path_factory.mktemp("captioned")
    shutil.copytree(EXAMPLES, base / "photos")
    r = run(str(base / "photos"), "-o", str(base / "out.json"))
    assert r.exit_code == 0, r.output
    return base


@pytest.fixture
def work(captioned, tmp_path) -> Path:
    """A fresh copy of the captioned folder and its output, for one test to change."""
    shutil.copytree(captioned / "photos", tmp_path / "photos")
    shutil.copy(captioned / "out.json", tmp_path / "out.json")
    (tmp_path / "photos" / "LICENSE.md").unlink()  # nothing unsupported: --strict is about publishing
    return tmp_path


def records(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in json.loads(out.read_text())}


@needs_exiftool
@pytest.mark.slow
def test_sidecars_and_embedded_captions_are_read_back_by_exiftool(tmp_path):
    shutil.copytree(EXAMPLES, tmp_path / "photos")
    photos = tmp_path / "photos"
    r = run(str(photos), "-o", str(tmp_path / "out.json"), "--sidecar", "xmp", "--embed")
    assert r.exit_code == 0, r.output
    assert f"wrote {2 * len(PHOTOS)}, skipped 0" in r.output and "failed 0" in r.output
    recs = records(tmp_path / "out.json")
    for kind in ("photo", "sidecar"):
        files = [photos / n if kind == "photo" else photos / f"{Path(n).stem}.xmp" for n in PHOTOS]
        for name, tags in zip(PHOTOS, exiftool(*files), strict=True):
            assert tags["Description"] == recs[name]["caption"], (kind, name)
            assert tags["AltTextAccessibility"] == recs[name]["caption"]
            assert tags["Model"] == "attention" and tags["Tool"] == "capcli"  # capcli:model, capcli:tool
            words = [lab["word"] for lab in recs[name].get("labels") or []]
            subject = tags.get("Subject", [])
            assert (subject if isinstance(subject, list) else [subject]) == words
    # The sidecars are photos' sidecars, not unsupported files, on a rerun
    r = run(str(photos), "-o", str(tmp_path / "out.json"), "--resume")
    assert r.exit_code == 0, r.output
    assert "unsupported) 1 (.md 1)" in r.output


@needs_exiftool
@pytest.mark.slow
def test_a_persons_description_survives_and_the_rest_are_written(work):
    photos = work / "photos"
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=Chelsea on the lawn",
                    str(photos / "chelsea.jpg")], check=True, timeout=60)
    r = run(str(photos), "-o", str(work / "out.json"), "--resume", "--embed", "--strict")
    assert r.exit_code == 0, r.output  # a skipped photo is not a failure
    assert re.search(r"skipped \S*chelsea\.jpg: keeps a description a person wrote", r.output), r.output
    assert f"wrote {len(PHOTOS) - 1}, skipped 1" in r.output
    recs = records(work / "out.json")
    got = {Path(t["SourceFile"]).name: t for t in exiftool(*(photos / n for n in PHOTOS))}
    assert got["chelsea.jpg"]["Description"] == "Chelsea on the lawn"
    assert got["coffee.jpg"]["Description"] == recs["coffee.jpg"]["caption"]
    r = run(str(photos), "-o", str(work / "out.json"), "--resume", "--embed", "--overwrite")
    assert r.exit_code == 0 and f"wrote {len(PHOTOS)}, skipped 0" in r.output, r.output
    assert exiftool(photos / "chelsea.jpg")[0]["Description"] == recs["chelsea.jpg"]["caption"]


PERSON = "Cat and dog on the balcony"
# where a person's description lives: the exiftool arguments that put it there, and the file written
PERSONS_FIELD = {"exif": ("-EXIF:ImageDescription", "chelsea.jpg"), "iptc": ("-IPTC:Caption-Abstract", "chelsea.jpg"),
                 "xmp-sidecar": ("-XMP-dc:Description", "chelsea.xmp"),
                 "darktable-sidecar": ("-XMP-dc:Description", "chelsea.jpg.xmp")}
DELIVERY = {"embed": ["--embed"], "xmp": ["--sidecar", "xmp"], "txt": ["--sidecar", "txt"]}


def descriptions(*files: Path) -> dict[str, dict]:
    """Every description field exiftool finds in ``files`` (and the MWG-reconciled one), by file name."""
    out = subprocess.run(["exiftool", "-json", "-G1", "-MWG:Description", "-XMP-dc:Description",
                          "-XMP-iptcCore:AltTextAccessibility", "-EXIF:ImageDescription", "-IPTC:Caption-Abstract",
                          *map(str, files)], capture_output=True, text=True, timeout=120)
    return {Path(t.pop("SourceFile")).name: t for t in json.loads(out.stdout)}


@needs_exiftool
@pytest.mark.slow
@pytest.mark.parametrize("how", DELIVERY)
@pytest.mark.parametrize("where", PERSONS_FIELD)
def test_a_persons_description_in_any_field_or_sidecar_is_kept_whatever_the_delivery(work, where, how):
    """A description only in EXIF ImageDescription, only in IPTC Caption-Abstract or only in an XMP sidecar (either
    naming) is a person's: the photo is skipped by --embed, --sidecar xmp and --sidecar txt alike, and exiftool
    reads back only the person's words."""
    photos = work / "photos"
    tag, file = PERSONS_FIELD[where]
    subprocess.run(["exiftool", "-q", "-overwrite_original", f"{tag}={PERSON}", str(photos / file)], check=True,
                   timeout=60)
    r = run(str(photos), "-o", str(work / "out.json"), "--resume", "--strict", *DELIVERY[how])
    assert r.exit_code == 0, r.output  # a skipped photo is not a failure
    assert re.search(r"skipped \S*chelsea\.jpg: keeps a description a person wrote", r.output), r.output
    assert f"wrote {len(PHOTOS) - 1}, skipped 1" in r.output, r.output
    files = [f for f in (photos / n for n in ("chelsea.jpg", "chelsea.xmp", "chelsea.jpg.xmp")) if f.exists()]
    found = descriptions(*files)
    assert set(found[file].values()) == {PERSON}, found
    for name, fields in found.items():
        assert set(fields.values()) <= {PERSON}, (name, fields)  # nothing contradicts it, in any field
    assert not (photos / "chelsea.txt").exists()
    if how == "txt":  # capcli's record of its .txt files is not a hidden file left out on the next run
        assert (photos / ".capcli-txt.json").is_file()
        again = run(str(photos), "-o", str(work / "out.json"), "--resume")
        assert again.exit_code == 0 and "hidden" not in again.output, again.output


@needs_exiftool
@pytest.mark.slow
def test_a_cameras_description_is_replaced_and_overwrite_keeps_every_field_in_step(work):
    """EXIF ImageDescription "OLYMPUS DIGITAL CAMERA" is the camera's, not a person's: embedding replaces it, so
    the MWG description (which prefers EXIF) is the caption. With --overwrite a person's EXIF and IPTC text are
    replaced too, never left contradicting the XMP."""
    photos = work / "photos"
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-EXIF:Make=OLYMPUS IMAGING CORP.",
                    "-EXIF:ImageDescription=OLYMPUS DIGITAL CAMERA         ", str(photos / "coffee.jpg")], check=True,
                   timeout=60)
    subprocess.run(["exiftool", "-q", "-overwrite_original", f"-EXIF:ImageDescription={PERSON}",
                    f"-IPTC:Caption-Abstract={PERSON}", str(photos / "chelsea.jpg")], check=True, timeout=60)
    recs = records(work / "out.json")
    r = run(str(photos), "-o", str(work / "out.json"), "--resume", "--embed")
    assert r.exit_code == 0 and f"wrote {len(PHOTOS) - 1}, skipped 1" in r.output, r.output
    caption = recs["coffee.jpg"]["caption"]
    assert set(descriptions(photos / "coffee.jpg")["coffee.jpg"].values()) == {caption}
    r = run(str(photos), "-o", str(work / "out.json"), "--resume", "--embed", "--overwrite")
    assert r.exit_code == 0 and f"wrote {len(PHOTOS)}, skipped 0" in r.output, r.output
    fields = descriptions(photos / "chelsea.jpg")["chelsea.jpg"]
    assert set(fields) >= {"MWG:Description", "IFD0:ImageDescription", "IPTC:Caption-Abstract", "XMP-dc:Description"}
    assert set(fields.values()) == {recs["chelsea.jpg"]["caption"]}
    r = run(str(photos), "-o", str(work / "out.json"), "--resume", "--embed")  # all capcli's own now: replaced
    assert r.exit_code == 0 and f"wrote {len(PHOTOS)}, skipped 0" in r.output, r.output


@pytest.mark.slow
def test_dry_run_says_what_and_where_and_changes_no_bytes(work):
    photos = work / "photos"
    before = digests(photos)
    r = run(str(photos), "-o", str(work / "out.json"), "--resume", "--dry-run", "--embed", "--sidecar", "xmp",
            "--sidecar", "txt", "--sidecar-name", "ext")
    assert r.exit_code == 0, r.output
    assert digests(photos) == before  # no photo changed, no sidecar (nor .capcli-txt.json) appeared
    for name in PHOTOS:
        for target in (name, f"{name}.xmp", f"{Path(name).stem}.txt"):
            assert re.search(rf"would write \S*photos/{re.escape(target)}: \"", r.output), (target, r.output)
    assert f"would write {3 * len(PHOTOS)}, skipped 0" in r.output


class Cards(HTMLParser):
    def __init__(self, page: str) -> None:
        super().__init__()
        self.names: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article" and "card" in (a.get("class") or "").split():
            self.names.append(a["data-name"])


@pytest.mark.slow
def test_html_writes_a_gallery_with_one_card_per_photo(work):
    page = work / "review" / "gallery.html"
    r = run(str(work / "photos"), "-o", str(work / "out.json"), "--resume", "--html", str(page))
    assert r.exit_code == 0, r.output
    assert sorted(Cards(page.read_text()).names) == PHOTOS
    if CHROMIUM is not None:  # as a browser sees it
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={work / 'prof'}"]
        dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        assert sorted(Cards(dom).names) == PHOTOS


@pytest.mark.parametrize("target", ["photos/chelsea.jpg", "photos/chelsea.txt", "new.json", "./new.json",
                                    "notes.html", "photos"])
def test_html_never_replaces_a_photo_the_output_or_another_file(tmp_path, target):
    shutil.copytree(EXAMPLES, tmp_path / "photos")
    (tmp_path / "notes.html").write_text("<p>a page a person wrote</p>\n")
    notes = (tmp_path / "notes.html").read_bytes()
    before = digests(tmp_path / "photos")
    r = run(str(tmp_path / "photos"), "-o", str(tmp_path / "new.json"), "--sidecar", "txt",
            "--html", str(tmp_path / target))
    assert r.exit_code == 2 and r.stderr.startswith("error: --html ") and "Traceback" not in r.output, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "model" not in r.stdout  # refused before anything else
    assert not (tmp_path / "new.json").exists()
    assert digests(tmp_path / "photos") == before and (tmp_path / "notes.html").read_bytes() == notes


@pytest.mark.slow
def test_html_replaces_its_own_gallery_but_not_an_existing_output(work):
    out, page = work / "out.json", work / "review.html"
    before = out.read_bytes()
    r = run(str(work / "photos"), "-o", str(out), "--resume", "--html", str(out))
    assert r.exit_code == 2 and "is the output file (-o)" in r.stderr and out.read_bytes() == before
    for _ in range(2):  # a rerun replaces the gallery capcli wrote
        r = run(str(work / "photos"), "-o", str(out), "--resume", "--html", str(page))
        assert r.exit_code == 0, r.output
        assert sorted(Cards(page.read_text()).names) == PHOTOS
    (work / "empty.html").touch()  # nothing to lose
    r = run(str(work / "photos"), "-o", str(out), "--resume", "--html", str(work / "empty.html"))
    assert r.exit_code == 0 and sorted(Cards((work / "empty.html").read_text()).names) == PHOTOS


@pytest.mark.slow
def test_min_confidence_keeps_a_low_record_out_of_sidecars(work):
    photos, out = work / "photos", work / "out.json"
    recs = json.loads(out.read_text())
    confidence = {"chelsea.jpg": 0.2, "coffee.jpg": 0.9}  # the others have none: not filtered
    for rec in recs:
        rec.pop("confidence", None)  # the shipped model gave each one
        if rec["path"] in confidence:
            rec["confidence"] = confidence[rec["path"]]
    out.write_text(json.dumps(recs))
    page = work / "review.html"
    report = publish_output(out, [photos], PublishRequest(sidecars=("xmp",), min_confidence=0.5, html=page),
                            model="attention")
    # the cat's doubtful caption is not published: the label its evidence supports is, in its place
    assert report.labelled == ["chelsea.jpg"] and report.held_back == []
    # and the review page says so on the cat's card alone
    import html as _html

    note = _html.escape('below --min-confidence: metadata and sidecars say "Image may contain: cat"')
    assert page.read_text().count(note) == 1
    assert all((photos / f"{Path(n).stem}.xmp").is_file() for n in PHOTOS)
    assert "Image may contain: cat" in (photos / "chelsea.xmp").read_text()
    kept = records(out)
    assert kept["chelsea.jpg"]["low_confidence"] is True and kept["chelsea.jpg"]["caption"]
    assert not any("low_confidence" in r for n, r in kept.items() if n != "chelsea.jpg")
    # the command line does the same, and says so
    r = run(str(photos), "-o", str(out), "--resume", "--sidecar", "txt", "--min-confidence", "0.5")
    assert r.exit_code == 0, r.output
    assert "1 record(s) below --min-confidence 0.5" in r.output
    assert (photos / "chelsea.txt").read_text().startswith("Image may contain: cat")
    assert (photos / "coffee.txt").read_text().strip() == kept["coffee.jpg"]["caption"]
    r = run(str(photos), "-o", str(out), "--resume", "--min-confidence", "1.5")
    assert r.exit_code == 2 and "--min-confidence 1.5" in r.output


@pytest.mark.slow
def test_min_confidence_marks_csv_records_and_an_older_csv_is_read_and_resumed(work):
    """The mark lands in a .csv column; a CSV written before that column existed is still read, resumed and marked."""
    photos, recs = work / "photos", json.loads((work / "out.json").read_text())
    threshold = sorted(r["confidence"] for r in recs)[len(recs) // 2]  # the shipped model gives each a confidence
    low = sorted(r["path"] for r in recs if r["confidence"] < threshold)
    assert low and len(low) < len(recs)
    old = work / "old.csv"  # the columns before low_confidence, the last photo not captioned yet
    columns = ["path", "caption", "logprob", "error", "alternatives", "labels", "confidence", "path_bytes"]
    with old.open("w", newline="") as f:
        w = csv.DictWriter(f, columns, lineterminator="\n")
        w.writeheader()
        for r in recs[:-1]:
            w.writerow({"path": r["path"], "caption": r["caption"], "logprob": r["logprob"],
                        "labels": json.dumps(r["labels"]), "confidence": r["confidence"]})
    assert [r["path"] for r in read_records(old)] == [r["path"] for r in recs[:-1]]
    r = run(str(photos), "-o", str(old), "--resume", "--min-confidence", str(threshold))
    assert r.exit_code == 0, r.output
    assert "captioned 1, failed 0" in r.output and f"{len(low)} record(s) below --min-confidence" in r.output
    with old.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-5:] == ["low_confidence", "model", "model_sha256", "search", "path_bytes"]
    assert sorted(row["path"] for row in rows if row["low_confidence"] == "true") == low
    assert sorted(row["path"] for row in rows) == PHOTOS
    back = {rec["path"]: rec for rec in read_records(old)}
    assert sorted(p for p, rec in back.items() if rec.get("low_confidence") is True) == low
    before = old.read_bytes()
    r = run(str(photos), "-o", str(old), "--resume", "--min-confidence", str(threshold))  # nothing left to do
    assert r.exit_code == 0 and "captioned 0" in r.output and old.read_bytes() == before


def test_low_confidence_rule():
    assert is_low_confidence({"confidence": 0.1}, 0.5)
    assert not is_low_confidence({"confidence": 0.5}, 0.5)
    assert not is_low_confidence({}, 0.5)  # no confidence: never filtered
    assert not is_low_confidence({"confidence": 0.1}, None)


def test_records_are_matched_to_files_with_names_that_are_not_utf8(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(EXAMPLES / "chelsea.jpg", tmp_path / name)
    shutil.copy(EXAMPLES / "coffee.jpg", tmp_path / "coffee.jpg")
    recs = [{**path_fields(name), "caption": "a cat"}, {"path": "coffee.jpg", "caption": "a cup"},
            {"path": "gone.jpg", "caption": "not an input"}]
    assert "path_bytes" in recs[0]
    pairs = pair_records([tmp_path], recs)
    assert [(p.name, r["caption"]) for p, r in pairs] == [(name, "a cat"), ("coffee.jpg", "a cup")]


@needs_exiftool
@pytest.mark.slow
def test_any_file_name_gets_its_metadata_sidecars_and_attention_map(tmp_path):
    """Names the README promises work: not UTF-8, and long (244 bytes in 3-byte characters); one of 254 bytes
    still gets its embedded caption and .txt, while its attention map (NAME.png, 258 bytes) fails with the reason."""
    photos, maps = tmp_path / "photos", tmp_path / "maps"
    photos.mkdir()
    odd, long, longest = os.fsdecode(b"cat\xff.jpg"), "写真" * 40 + ".jpg", "写真" * 41 + "abcd.jpg"
    try:
        for src, name in (("chelsea.jpg", odd), ("coffee.jpg", long), ("rocket.jpg", longest)):
            shutil.copy(EXAMPLES / src, photos / name)
    except OSError as e:  # macOS takes no name that is not UTF-8; some file systems allow less than 255 bytes
        pytest.skip(f"this file system refuses the names: {e}")
    r = run(str(photos), "-o", str(tmp_path / "out.json"), "--embed", "--sidecar", "xmp", "--sidecar", "txt",
            "--attention-maps", str(maps))
    assert r.exit_code == 0, r.output
    assert "metadata (xmp, txt, embed): wrote 9, skipped 0" in r.output and "failed 0" in r.output, r.output
    flat = " ".join(r.output.split())  # the warning is wrapped to the terminal
    assert "cannot write its attention map" in flat and "File name too long (258 bytes; at most 255 here)" in flat
    caps = {rec["path"]: rec["caption"] for rec in json.loads((tmp_path / "out.json").read_text())}
    for name in (odd, long, longest):
        photo = photos / name
        want = caps["cat\\xff.jpg" if name == odd else name]
        for meta in exiftool(photo, photo.with_suffix(".xmp")):
            assert meta["Description"] == meta["AltTextAccessibility"] == meta["Caption"] == want
        assert photo.with_suffix(".txt").read_text("utf-8") == want + "\n"
    assert sorted(p.name for p in maps.iterdir()) == sorted([odd + ".png", long + ".png"])
    assert not [p for p in [*photos.iterdir(), *maps.iterdir()] if ".tmp" in p.name]


@pytest.mark.slow
def test_a_failed_write_is_one_line_the_rest_go_on_and_strict_fails(work):
    photos = work / "photos"
    (photos / "rocket.jpg").chmod(0o444)
    r = run(str(photos), "-o", str(work / "out.json"), "--resume", "--embed")
    assert r.exit_code == 0, r.output
    assert len(re.findall(r"^failed .*rocket\.jpg: ", r.output, re.M)) == 1, r.output
    assert f"wrote {len(PHOTOS) - 1}, skipped 0 (a person's words; --overwrite replaces them), failed 1" in r.output
    r = run(str(photos), "-o", str(work / "out.json"), "--resume", "--embed", "--strict")
    assert r.exit_code == 1 and "1 metadata write(s) failed (--strict)" in r.output


@pytest.mark.slow
def test_publishing_takes_the_runs_own_records_and_pairs(tmp_path):
    """A run hands publishing its (photo, record) pairs and what its output holds (an earlier run's records
    first, on --resume): publishing reads no output back and walks no folder (the output may even be gone)."""
    photos, out = tmp_path / "photos", tmp_path / "out.csv"
    shutil.copytree(EXAMPLES, photos)
    cap = Captioner.load(device="cpu")
    first = caption_files(cap, [photos], out, shard=(0, 2), workers=0, keep_records=True)
    assert first.output is not None and first.outside_shard
    shard = [p for p in sorted(photos.iterdir()) if p.name in PHOTOS and in_shard(p.name, (0, 2))]
    assert [p for p, _ in first.output.pairs] == shard
    run = caption_files(cap, [photos], out, resume=True, workers=0, keep_records=True).output
    assert run is not None and run.records == read_records(out)  # what the file holds, in its order
    assert [r["path"] for r in run.records[: len(shard)]] == [p.name for p in shard]  # the kept ones first
    assert [p.name for p, _ in run.pairs] == PHOTOS
    assert all(any(rec is r for r in run.records) for _, rec in run.pairs)  # one record, one object
    out.unlink()
    report = publish_captioned(run, PublishRequest(sidecars=("txt",)), model="attention")
    assert report.counts()["written"] == len(PHOTOS) and not out.exists()
    assert (photos / "chelsea.txt").read_text().strip() == run.pairs[PHOTOS.index("chelsea.jpg")][1]["caption"]
    # --min-confidence marks the records in the output, rewritten in its layout
    report = publish_captioned(run, PublishRequest(min_confidence=1.0), model="attention")
    assert sorted(report.held_back + report.labelled) == PHOTOS
    assert [r.get("low_confidence") for r in read_records(out)] == [True] * len(PHOTOS)
    assert out.read_text().splitlines()[0] == ",".join(CSV_FIELDS)
