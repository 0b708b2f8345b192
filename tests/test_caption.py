"""``capcli caption`` and the Captioner API, on real photos and real broken files, with real (random-init,
seeded) models over the shipped models' vocabulary of real Flickr8k captions. Only the shard balance test reads
../shared/data; everything else runs on examples/photos."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from capcli.caption import caption_files, collect_inputs, in_shard, parse_shard
from capcli.captioner import DEFAULT_MODEL, SHIPPED_MODELS, Captioner
from capcli.checkpoint import load_checkpoint, save_checkpoint
from capcli.cli import app
from capcli.encoders import get_spec
from capcli.errors import CheckpointError, UsageError
from capcli.images import load_image
from capcli.models import build
from capcli.outputs import read_records, rewrite_records
from capcli.progress import Progress
from capcli.viz import save_attention_map
from capcli.vocab import Vocabulary

BAD = {"truncated.jpg", "text.jpg", "empty.jpg"}
ODD_BUT_FINE = {"gray16.png", "cmyk.jpg", "rgba.png"}


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    """The shipped models' vocabulary (2,578 words of Flickr8k's training captions)."""
    return Vocabulary.from_dict(load_checkpoint(SHIPPED_MODELS["basic"])["vocab"])


def _checkpoint(path: Path, arch: str, vocab: Vocabulary) -> Path:
    torch.manual_seed(0)
    cfg = {"arch": arch, "vocab_size": len(vocab), "feature_dim": 1280, "embed_dim": 64, "hidden_dim": 64}
    if arch == "attention":
        cfg["attention_dim"] = 64
    model = build(cfg)
    return save_checkpoint(path, {"config": model.config_dict(), "vocab": vocab.to_dict(),
                                  "encoder": get_spec("efficientnet-lite0").to_dict(), "model": model.state_dict()})


@pytest.fixture(scope="module")
def ckpts(vocab, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    return {arch: _checkpoint(d / f"{arch}.pt", arch, vocab) for arch in ("attention", "basic")}


@pytest.fixture(scope="module")
def captioner(ckpts) -> Captioner:
    return Captioner.load(ckpts["attention"], device="cpu")


@pytest.fixture(scope="module")
def photo_dir(example_photos, tmp_path_factory) -> Path:
    """Real photos plus the awkward and broken files a real folder holds."""
    d = tmp_path_factory.mktemp("photos")
    for p in example_photos:
        (d / p.name).write_bytes(p.read_bytes())
    gray = np.asarray(Image.open(d / "camera.png").convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(d / "gray16.png")  # 16-bit grayscale
    assert Image.open(d / "gray16.png").mode.startswith("I")
    Image.open(d / "chelsea.jpg").convert("CMYK").save(d / "cmyk.jpg")
    rgba = Image.open(d / "astronaut.jpg").convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    data = (d / "coffee.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "text.jpg").write_text("this is not a photo\n")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image: ignored in folders\n")
    (d / "sub").mkdir()
    (d / "sub" / "deep.jpg").write_bytes(example_photos[0].read_bytes())
    return d


def _names(photo_dir: Path, recursive: bool = False) -> set[str]:
    names = {p.name for p in photo_dir.iterdir() if p.suffix in {".jpg", ".png"}}
    return names | {"sub/deep.jpg"} if recursive else names


def _cli(*args: str):
    return CliRunner().invoke(app, ["caption", *args])


class Counting(Progress):
    """Counts the images reported done; raises KeyboardInterrupt (a real Ctrl-C's exception) after ``stop``."""

    def __init__(self, stop: int | None = None) -> None:
        self.n, self.stop = 0, stop

    def advance(self, n: int = 1, **fields: object) -> None:
        self.n += n
        if self.stop is not None and self.n >= self.stop:
            raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_outputs_list_every_file(photo_dir, ckpts, tmp_path, fmt):
    out = tmp_path / f"caps.{fmt}"
    r = _cli(str(photo_dir), "-o", str(out), "--model", str(ckpts["attention"]), "--recursive", "--beam", "2",
             "--top-k", "2", "--max-len", "6", "--workers", "1", "--batch-size", "8")
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    if fmt == "csv":
        with out.open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["path", "caption", "logprob", "error", "alternatives", "labels", "confidence",
                                "low_confidence", "model", "model_sha256", "search", "path_bytes"]
        recs = read_records(out)
        assert [row["path"] for row in rows] == [rec["path"] for rec in recs]
    elif fmt == "json":
        recs = json.loads(out.read_text())
    else:
        recs = [json.loads(line) for line in out.read_text().splitlines()]
    by_path = {rec["path"]: rec for rec in recs}
    assert len(by_path) == len(recs) == len(_names(photo_dir, recursive=True))
    assert set(by_path) == _names(photo_dir, recursive=True)
    for name, rec in by_path.items():
        if name in BAD:
            assert rec["error"] and not rec.get("caption")
        else:
            assert "error" not in rec, rec
            assert 1 <= len(rec["caption"].split()) <= 6 and rec["logprob"] < 0
            alts = rec["alternatives"]
            assert len(alts) == 2 and alts[0]["caption"] == rec["caption"] and alts[1]["logprob"] <= rec["logprob"]
    assert "not an image" in by_path["text.jpg"]["error"]
    assert "truncated" in by_path["truncated.jpg"]["error"]
    assert f"captioned {len(by_path) - 3}, failed 3" in r.stdout
    for bad in BAD:  # each failure reported on its own line
        assert bad in r.stderr


def test_without_recursive_subfolders_are_skipped(photo_dir, captioner, tmp_path):
    s = caption_files(captioner, [photo_dir], tmp_path / "c.jsonl", beam_size=1, max_len=3, workers=0)
    assert {r["path"] for r in read_records(tmp_path / "c.jsonl")} == _names(photo_dir)
    assert (s.captioned, s.failed) == (len(_names(photo_dir)) - 3, 3)


def test_file_arguments_are_recorded_by_name(photo_dir, captioner, tmp_path):
    files = [photo_dir / "sub" / "deep.jpg", photo_dir / "notes.txt", photo_dir / "chelsea.jpg"]
    caption_files(captioner, files, tmp_path / "c.json", beam_size=1, max_len=3, workers=0)
    recs = read_records(tmp_path / "c.json")
    assert [r["path"] for r in recs] == ["deep.jpg", "notes.txt", "chelsea.jpg"]
    assert "caption" in recs[0] and "error" in recs[1]  # a file named explicitly is tried whatever its name


def test_exit_status_when_nothing_or_something_fails(photo_dir, ckpts, tmp_path):
    bad = [str(photo_dir / n) for n in sorted(BAD)]
    r = _cli(*bad, "-o", str(tmp_path / "bad.jsonl"), "--model", str(ckpts["basic"]), "--workers", "0")
    assert r.exit_code == 1 and "no image could be captioned" in r.stderr and "Traceback" not in r.output
    assert {rec["path"] for rec in read_records(tmp_path / "bad.jsonl")} == BAD  # still recorded
    mixed = [*bad, str(photo_dir / "rocket.jpg")]
    r = _cli(*mixed, "-o", str(tmp_path / "m.csv"), "--model", str(ckpts["basic"]), "--workers", "0")
    assert r.exit_code == 0, r.output
    r = _cli(*mixed, "-o", str(tmp_path / "m.csv"), "--model", str(ckpts["basic"]), "--workers", "0", "--strict")
    assert r.exit_code == 1 and "--strict" in r.stderr and len(read_records(tmp_path / "m.csv")) == 4


@pytest.mark.parametrize(("args", "message"), [
    (["-o", "caps.txt"], "unknown output format '.txt'"),
    (["-o", "c.json", "--shard", "3/3"], "--shard"),
    (["-o", "c.json", "--shard", "x"], "--shard wants I/N"),
    (["nope", "-o", "c.json"], "no such file or folder"),
    (["-o", "c.json", "--top-k", "4"], "--top-k 4 needs --beam >= 4"),
    (["-o", "c.json", "--precision", "fp16"], "--precision 'fp16': use one of auto, float32, bfloat16, int8"),
    (["-o", "c.json", "--max-len", "1000000000000"], "--max-len 1000000000000: give a number of words from 1 to 100"),
    (["-o", "c.json", "--length-penalty", "300"], "--length-penalty 300: give a number from 0 to 5"),
])
def test_bad_arguments_give_one_clear_line(photo_dir, ckpts, tmp_path, args, message):
    args = [str(tmp_path / a) if a.startswith("c") and "." in a else a for a in args]
    paths = [] if "nope" in args else [str(photo_dir)]
    r = _cli(*paths, *args, "--model", str(ckpts["basic"]))
    assert r.exit_code == 2, r.output
    assert message in r.stderr and r.stderr.startswith("error:") and "Traceback" not in r.output
    assert not list(tmp_path.iterdir())  # failed before writing anything


@pytest.mark.parametrize("option", [["--max-len", "101"], ["--length-penalty", "5.5"], ["--length-penalty", "1e300"]])
def test_search_options_out_of_range_leave_the_earlier_output_as_it_was(photo_dir, ckpts, tmp_path, option):
    out = tmp_path / "c.json"
    r = _cli(str(photo_dir / "chelsea.jpg"), "-o", str(out), "--model", str(ckpts["basic"]), "--beam", "2",
             "--max-len", "4", "--workers", "0")
    assert r.exit_code == 0, r.output
    before = out.read_bytes()
    r = _cli(str(photo_dir / "chelsea.jpg"), "-o", str(out), "--model", str(ckpts["basic"]), "--beam", "2",
             "--workers", "0", *option)
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {option[0]} ") and "Traceback" not in r.output
    assert out.read_bytes() == before


def test_the_search_runs_at_the_limits_of_its_options(captioner, example_photos):
    recs = captioner.caption_images([load_image(example_photos[0])], beam_size=2, max_len=100, length_penalty=5.0)
    assert 1 <= len(recs[0]["caption"].split()) <= 100 and math.isfinite(recs[0]["logprob"])
    with pytest.raises(UsageError, match="--length-penalty 300"):
        captioner.caption_images([load_image(example_photos[0])], length_penalty=300.0)


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_resume_after_interrupt_captions_only_the_rest(photo_dir, captioner, ckpts, tmp_path, fmt):
    out = tmp_path / f"caps.{fmt}"
    everything = _names(photo_dir)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after 7 images
        caption_files(captioner, [photo_dir], out, beam_size=2, max_len=5, batch_size=4, workers=1,
                      progress=Counting(stop=7))
    first = read_records(out)
    assert len(first) == 7  # nothing done was lost, also for .json
    good = [r for r in first if "error" not in r]
    assert len(good) < 7  # the broken files among them are tried again, the rest kept
    again = Counting()
    s = caption_files(captioner, [photo_dir], out, beam_size=2, max_len=5, batch_size=4, workers=1, resume=True,
                      progress=again)
    assert again.n == len(everything) - len(good) == s.captioned + s.failed and s.skipped == len(good)
    final = read_records(out)
    assert final[: len(good)] == good  # kept as they were
    assert sorted(r["path"] for r in final) == sorted(everything)
    # and through the command line: only the broken files are left to try, and they fail again
    broken = [r for r in final if "error" in r]
    r = _cli(str(photo_dir), "-o", str(out), "--model", str(ckpts["attention"]), "--resume", "--beam", "2",
             "--max-len", "5")  # the search that made the records (another is refused: see provenance below)
    assert r.exit_code == 0 and f"captioned 0, failed {len(broken)}" in r.stdout, r.stdout
    assert f"{len(everything) - len(broken)} already done" in r.stdout
    assert sorted(read_records(out), key=str) == sorted(final, key=str)


def test_ctrl_c_on_the_command_keeps_what_is_done_and_resume_skips_a_cut_line(photo_dir, ckpts, tmp_path):
    """A real SIGINT to a running ``capcli caption`` (as Ctrl-C sends it to the whole process group)."""
    out = tmp_path / "caps.jsonl"
    N = 400  # enough that the run is still going when the signal lands, even on a fast machine
    many = tmp_path / "many"
    many.mkdir()
    photos = sorted(p for p in photo_dir.iterdir() if p.suffix == ".jpg" and p.name not in BAD)
    for i in range(N):
        (many / f"{i:03d}.jpg").symlink_to(photos[i % len(photos)])
    cmd = [sys.executable, "-m", "capcli.cli", "caption", str(many), "-o", str(out), "--model",
           str(ckpts["basic"]), "--beam", "1", "--max-len", "4", "--batch-size", "4", "--workers", "2"]
    # A background job inherits an ignored SIGINT; give the child the default so Python turns it into Ctrl-C.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Ctrl-C once 8 records are in the file, however long that takes on a busy machine (the bound is for a hang)
    hang = time.monotonic() + 900
    while not (out.is_file() and out.read_text().count("\n") >= 8):
        if p.poll() is not None or time.monotonic() > hang:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"the run ended or hung before 8 records: {p.communicate()}")
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    done = [json.loads(line) for line in out.read_text().splitlines()]
    assert 8 <= len(done) < N
    said = " ".join(err.split())  # Rich wraps the line
    assert f"interrupted: {len(done)} record(s) are kept in" in said and "--resume" in said, err
    with out.open("a") as f:  # as if killed in the middle of writing a line
        f.write(f'{{"path": "{N - 1:03d}.jpg", "capt')
    r = _cli(str(many), "-o", str(out), "--model", str(ckpts["basic"]), "--beam", "1", "--max-len", "4",
             "--resume", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert f"captioned {N - len(done)}, failed 0, {len(done)} already done" in r.stdout
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[: len(done)] == done and sorted(r["path"] for r in recs) == [f"{i:03d}.jpg" for i in range(N)]


@pytest.fixture(scope="module")
def five_dir(example_photos, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("five")
    for p in example_photos:
        (d / p.name).write_bytes(p.read_bytes())
    return d


def _quick(folder: Path, out: Path, ckpt: Path, *more: str):
    return _cli(str(folder), "-o", str(out), "--model", str(ckpt), "--beam", "1", "--max-len", "4", "--workers", "0",
                *more)


def test_resume_keeps_an_excel_saved_csv_with_its_edits_bom_and_added_column(five_dir, ckpts, tmp_path):
    out = tmp_path / "caps.csv"
    assert _quick(five_dir, out, ckpts["basic"]).exit_code == 0
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert header[:2] == ["path", "caption"] and len(body) == 5
    body[0][1] = "My own caption: Chelsea, the cat — “édité”"  # a person's words, not ASCII
    assert header[2] == "logprob"
    body[0][2] = ""  # and cleared the model's score of it
    header.insert(2, "reviewed")
    for i, row in enumerate(body):
        row.insert(2, f"yes {i}")
    dropped = body.pop()  # its image is captioned again
    with out.open("w", newline="", encoding="utf-8-sig") as f:  # as Excel saves CSV UTF-8: a BOM, CRLF
        csv.writer(f).writerows([header, *body])
    r = _quick(five_dir, out, ckpts["basic"], "--resume")
    assert r.exit_code == 0, r.output
    assert "captioned 1, failed 0, 4 already done" in r.stdout
    data = out.read_bytes()
    assert data.startswith(b"\xef\xbb\xbfpath,caption,reviewed,")  # the BOM and the person's column order stay
    with out.open(newline="", encoding="utf-8-sig") as f:
        again = list(csv.DictReader(f))
    assert [list(row.values()) for row in again[:4]] == body  # the kept rows as they were
    assert again[4]["path"] == dropped[0] and again[4]["reviewed"] == "" and again[4]["caption"]
    recs = read_records(out)
    assert recs[0]["caption"] == body[0][1] and "logprob" not in recs[0]
    assert [r["reviewed"] for r in recs] == ["yes 0", "yes 1", "yes 2", "yes 3", ""]
    r = _quick(five_dir, out, ckpts["basic"], "--resume")
    assert "captioned 0, failed 0, 5 already done" in r.stdout and out.read_bytes() == data  # nothing changes
    rewrite_records(out, recs)  # as publishing's low-confidence mark rewrites it: the same layout
    assert out.read_bytes() == data


def test_resume_refuses_a_csv_with_a_column_twice_and_leaves_it(five_dir, ckpts, tmp_path):
    out = tmp_path / "caps.csv"
    assert _quick(five_dir, out, ckpts["basic"]).exit_code == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    lines = [lines[0] + ",note,note"] + [line + ",a,b" for line in lines[1:-1]] + [""]
    out.write_text("\n".join(lines), encoding="utf-8")
    before = out.read_bytes()
    r = _quick(five_dir, out, ckpts["basic"], "--resume")
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "'note' appear twice" in " ".join(r.stderr.split())
    assert out.read_bytes() == before


FOREIGN = {"people.csv": "id,name\n1,alice\n", "oneline.csv": "id,name", "notes.csv": "just some text\nmore\n",
           "cfg.jsonl": '{"id": 1}\n{"id": 2}\n', "log.jsonl": "started\nfinished\n", "list.jsonl": "[1, 2]\n",
           "cfg.json": '{"id": 1}',
           "semicolons.csv": "path;caption;logprob\r\nchelsea.jpg;a cat;-1,5\r\n"}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_resume_refuses_a_file_that_is_no_caption_list_and_leaves_it(five_dir, ckpts, tmp_path, name):
    out = tmp_path / name
    out.write_text(FOREIGN[name], encoding="utf-8")
    r = _quick(five_dir, out, ckpts["basic"], "--resume")
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error:") and "not a capcli caption list" in r.stderr and "Traceback" not in r.output
    assert len(" ".join(r.stderr.split()).split("error:")) == 2  # one error
    assert out.read_bytes() == FOREIGN[name].encode()  # untouched
    if name == "semicolons.csv":
        assert "separated by ';'" in " ".join(r.stderr.split())
    r = _quick(five_dir, out, ckpts["basic"])  # without --resume an existing output is replaced, as documented
    assert r.exit_code == 0 and len(read_records(out)) == 5


def test_resume_reads_on_past_a_damaged_csv_row(five_dir, ckpts, tmp_path):
    out = tmp_path / "caps.csv"
    assert _quick(five_dir, out, ckpts["basic"]).exit_code == 0
    whole = read_records(out)
    lines = out.read_text(encoding="utf-8").split("\n")
    path, caption, rest = lines[2].split(",", 2)
    lines[2] = f'{path},"{caption}"oops,{rest}'  # bad quoting, as a hand edit can leave it
    out.write_text("\n".join(lines), encoding="utf-8")
    r = _quick(five_dir, out, ckpts["basic"], "--resume")
    assert r.exit_code == 0 and "captioned 1, failed 0, 4 already done" in r.stdout, r.output  # only that row
    assert sorted(r["path"] for r in read_records(out)) == sorted(r["path"] for r in whole)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resume_after_a_cut_last_line_or_a_cut_header(five_dir, ckpts, tmp_path, fmt):
    """A crash leaves a last line without its newline: that image is captioned again, the rest kept."""
    out = tmp_path / f"caps.{fmt}"
    assert _quick(five_dir, out, ckpts["basic"]).exit_code == 0
    whole = read_records(out)
    text = out.read_text(encoding="utf-8")
    last = text[:-1].rfind("\n") + 1
    out.write_text(text[: last + (len(text) - last) // 2], encoding="utf-8")  # half the last record
    r = _quick(five_dir, out, ckpts["basic"], "--resume")
    assert r.exit_code == 0 and "captioned 1, failed 0, 4 already done" in r.stdout, r.output
    assert read_records(out) == whole  # the same model and options: the same caption again
    for start in ("", "path,capt", "\ufeff", '{"path": "ches'):  # nothing whole: started afresh
        if fmt == "jsonl" and "capt" in start or fmt == "csv" and "{" in start:
            continue
        out.write_text(start, encoding="utf-8")
        r = _quick(five_dir, out, ckpts["basic"], "--resume")
        assert r.exit_code == 0 and "captioned 5, failed 0" in r.stdout, (start, r.output)
        assert read_records(out) == whole


# ------------------------------------------------------------------------------------------------- shards
def test_shards_of_a_big_folder_are_balanced(flickr8k_dir):
    keys = [it.key for it in collect_inputs([flickr8k_dir / "images"])]
    assert len(keys) > 7000
    parts = [[k for k in keys if in_shard(k, (i, 4))] for i in range(4)]
    assert sorted(k for part in parts for k in part) == sorted(keys)
    assert all(abs(len(part) - len(keys) / 4) < 0.05 * len(keys) for part in parts)  # balanced


def test_shards_are_disjoint_and_cover_everything(photo_dir, captioner, tmp_path):
    assert parse_shard("2/4") == (2, 4)
    with pytest.raises(UsageError):
        parse_shard("4/4")
    seen: list[str] = []
    for i in range(3):  # the real command path, three "array jobs"
        out = tmp_path / f"shard{i}.jsonl"
        s = caption_files(captioner, [photo_dir], out, beam_size=1, max_len=2, workers=0, shard=(i, 3))
        got = [r["path"] for r in read_records(out)]
        assert s.outside_shard == len(_names(photo_dir)) - len(got)
        seen += got
    assert len(seen) == len(set(seen)) and set(seen) == _names(photo_dir)


# ---------------------------------------------------------------------------------------- attention maps
def test_attention_maps_one_panel_per_word(photo_dir, captioner, tmp_path):
    photos = [Image.open(photo_dir / n) for n in ("chelsea.jpg", "rocket.jpg")]
    heights = []
    for max_len in (3, 12):
        recs = captioner.caption_images(photos, beam_size=3, max_len=max_len, return_alphas=True)
        for rec, photo in zip(recs, photos, strict=True):
            words = rec["words"]
            assert rec["alphas"].shape == (len(words), 49)
            tol = 1e-4  # softmax in float32 at every precision
            assert np.allclose(rec["alphas"].sum(1), 1.0, atol=tol)
            assert words == rec["caption"].split()
            png = tmp_path / f"{max_len}.png"
            assert save_attention_map(png, photo, words, rec["alphas"], grid=7) == len(words)
            w, h = Image.open(png).size
            panels = len(words) + 1  # the photo, then a panel per word, 5 to a row
            # the photo's aspect ratio, its longest side 224
            pw, ph = ((224, round(224 * photo.height / photo.width)) if photo.width >= photo.height
                      else (round(224 * photo.width / photo.height), 224))
            assert min(pw, ph) < 200  # neither example photo is square: the panels are not squashed
            assert (w, h) == (min(panels, 5) * pw, math.ceil(panels / 5) * (ph + 22))
            heights.append(h)
    assert heights[-1] > heights[0]  # more words, more panels

    maps = tmp_path / "maps"
    s = caption_files(captioner, [photo_dir], tmp_path / "c.jsonl", beam_size=2, max_len=4, workers=0,
                      attention_maps=maps, recursive=True)
    pngs = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*.png"))
    assert len(pngs) == s.captioned == len(_names(photo_dir, True)) - 3
    assert "sub/deep.jpg.png" in pngs and "truncated.jpg.png" not in pngs


def test_attention_maps_need_an_attention_model(photo_dir, ckpts, tmp_path):
    r = _cli(str(photo_dir), "-o", str(tmp_path / "c.jsonl"), "--model", str(ckpts["basic"]),
             "--attention-maps", str(tmp_path / "maps"))
    assert r.exit_code == 2 and "needs a model with attention" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "maps").exists()


# ------------------------------------------------------------------------------------------------ the API
def test_caption_images_and_paths(example_photos, captioner, photo_dir):
    # The photos as caption_paths decodes them (a JPEG at the scale the encoder needs), for the same pixels both
    # ways; the grayscale PNG as it is.
    imgs = [Image.open(p) if p.suffix == ".png" else load_image(p, captioner.spec.input_size) for p in example_photos]
    assert any(im.mode == "L" for im in imgs)
    recs = captioner.caption_images(imgs, beam_size=3, top_k=3, max_len=8)
    assert len(recs) == len(imgs)
    for rec in recs:
        assert rec["caption"] and rec["logprob"] < 0
        lps = [a["logprob"] for a in rec["alternatives"]]
        assert len(lps) == 3 and lps == sorted(lps, reverse=True) and lps[0] == rec["logprob"]
    greedy = captioner.caption_images(imgs[:2], beam_size=1, max_len=8)
    assert all("alternatives" not in g for g in greedy)
    paths = [photo_dir / "text.jpg", *example_photos]
    out = list(captioner.caption_paths(paths, beam_size=3, batch_size=2, workers=1, max_len=8))
    assert [o["path"] for o in out] == [str(p) for p in paths]  # input order
    assert "error" in out[0] and [o["caption"] for o in out[1:]] == [r["caption"] for r in recs]
    # Searching a few images at a time (groups of encoder batches, failures among them) changes nothing.
    small = list(captioner.caption_paths(paths, beam_size=3, batch_size=2, workers=1, max_len=8, search_batch=3))
    assert small == out
    with pytest.raises(UsageError):
        captioner.caption_images(imgs, beam_size=2, top_k=3)


def test_default_model(example_photos, tmp_path):
    if not DEFAULT_MODEL.is_file():
        with pytest.raises(CheckpointError, match="no default model is installed; pass --model CKPT"):
            Captioner.load()
        r = _cli(str(example_photos[0]), "-o", str(tmp_path / "c.json"))
        assert r.exit_code == 1 and "no default model is installed" in r.stderr
        return
    r = _cli(str(example_photos[0].parent), "-o", str(tmp_path / "c.json"), "--workers", "0")
    assert r.exit_code == 0, r.output
    recs = read_records(tmp_path / "c.json")
    assert len(recs) == len(example_photos) and all(rec["caption"].strip() for rec in recs)


def test_json_output_is_saved_periodically_not_only_at_the_end(tmp_path):
    """A .json run killed outright (no chance to save at the end) still leaves the last periodic save."""
    from capcli.outputs import _JsonWriter

    out = tmp_path / "c.json"
    w = _JsonWriter(out, resume=False, every_s=0.0)
    w.write({"path": "a.jpg", "caption": "a dog", "logprob": -1.0})
    assert read_records(out) == [{"path": "a.jpg", "caption": "a dog", "logprob": -1.0}]  # before close()
    w.write({"path": "b.jpg", "error": "not an image file"})
    w.close()
    assert [r["path"] for r in read_records(out)] == ["a.jpg", "b.jpg"]
    assert not [p for p in tmp_path.iterdir() if p.name != "c.json"]  # no temporary files left behind


def test_caption_bytes_gives_the_records_caption_paths_gives(example_photos, captioner, photo_dir):
    """Photos as the bytes of their files, all in memory (a distributed engine's workers): the same records as
    from the files, in order; bytes that are no photo give an error record and the rest go on."""
    paths = [*example_photos, photo_dir / "text.jpg", photo_dir / "empty.jpg"]
    data = [p.read_bytes() for p in paths]
    recs = captioner.caption_bytes(data, beam_size=3, top_k=2, max_len=8, batch_size=2, search_batch=3)
    want = list(captioner.caption_paths(paths, beam_size=3, top_k=2, max_len=8, batch_size=2, workers=0,
                                        search_batch=3))
    assert recs == [{k: v for k, v in w.items() if k != "path"} for w in want]
    assert [("error" in r) for r in recs] == [False] * len(example_photos) + [True, True]
    assert recs[-2]["error"] == "not an image file" and recs[-1]["error"] == "not an image file"
    assert captioner.caption_bytes([]) == []
    with pytest.raises(UsageError, match="--top-k 4"):
        captioner.caption_bytes(data, top_k=4)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_every_record_names_its_model_and_search_and_resume_refuses_another(tmp_path, example_photos, suffix):
    """Records carry the model (file name, SHA-256 prefix) and the search settings; --resume with another model or
    other settings is one error line naming the difference, and the output is left as it was."""
    import hashlib

    two = [str(p) for p in sorted(example_photos)[:2]]
    out = tmp_path / f"out{suffix}"
    r = CliRunner().invoke(app, ["caption", two[0], "-o", str(out)], prog_name="capcli")
    assert r.exit_code == 0, r.output
    (rec,) = read_records(out)
    sha = hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest()[:12]
    assert (rec["model"], rec["model_sha256"]) == ("flickr8k-attention.pt", sha)
    assert rec["search"].startswith("beam=3 max_len=20 top_k=1 length_penalty=0 grounding=auto precision=")
    before = out.read_bytes()
    for extra, says in ((["--beam", "1"], "beam 3, this run 1"), (["--model", "basic"], "model flickr8k-attention.pt"),
                        (["--grounding", "off"], "grounding auto, this run off")):
        r = CliRunner().invoke(app, ["caption", *two, "-o", str(out), "--resume", *extra], prog_name="capcli")
        assert r.exit_code == 2 and r.stderr.count("error:") == 1 and says in r.stderr, (extra, r.output)
        assert out.read_bytes() == before
    r = CliRunner().invoke(app, ["caption", *two, "-o", str(out), "--resume"], prog_name="capcli")
    assert r.exit_code == 0, r.output
    assert [x["search"] for x in read_records(out)] == [rec["search"]] * 2
