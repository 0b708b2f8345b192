"""Inputs beyond folders (webdataset tar shards, parquet and CSV tables), the parquet output in parts, resume by
key, on the local engine: real photos (examples/photos), real tars and tables, a real killed process."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from capcli.engines.base import EngineOptions  # noqa: E402
from capcli.engines.job import CaptionJob, run_caption_job  # noqa: E402
from capcli.parquet_out import ParquetWriter, read_parquet_records  # noqa: E402
from capcli.samples import Unit, list_units, read_unit, split_member  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "photos"


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(path: Path, photos: list[Path], prefix: str = "", copies: int = 1) -> list[str]:
    """A webdataset shard as img2dataset writes it (KEY.jpg, KEY.txt, KEY.json per sample); returns the keys."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for c in range(copies):
            for i, photo in enumerate(photos):
                key = f"{prefix}{c:03d}{i:05d}"
                add(tar, f"{key}{photo.suffix}", photo.read_bytes())
                add(tar, f"{key}.txt", b"a caption written by a person")
                add(tar, f"{key}.json", json.dumps({"key": key}).encode())
                keys.append(key)
    return keys


@pytest.fixture(scope="module")
def captioner():
    from capcli.captioner import Captioner

    return Captioner.load(device="cpu")


def test_member_keys_follow_the_webdataset_spec():
    assert split_member("a/b.c.jpg") == ("a/b", "c.jpg")
    assert split_member("./000001.JPG") == ("000001", "jpg")
    assert split_member("dir.v2/x.png") == ("dir.v2/x", "png")  # dots of folders are not the key's
    assert split_member("noext") == ("noext", "")


def test_tar_samples_grouped_and_odd_samples_reported(tmp_path, example_photos):
    jpg, png = example_photos[0], next(p for p in example_photos if p.suffix == ".png")
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "__meta__", b"{}")
        add(tar, "k1.jpg", jpg.read_bytes())
        add(tar, "k1.txt", b"hi")
        add(tar, "k2.jpg", jpg.read_bytes())
        add(tar, "k2.png", png.read_bytes())  # two images: ambiguous
        add(tar, "k3.txt", b"no photo")
        add(tar, "sub/k4.seg.png", png.read_bytes())  # not an image member of the spec's set: "seg.png"
        add(tar, "sub/k5.webp", b"not really a webp")
    samples = list(read_unit(Unit("tar", str(shard))))
    assert [s.key for s in samples] == ["k1", "k2", "k3", "sub/k4", "sub/k5"]
    assert samples[0].data == jpg.read_bytes() and samples[0].error is None
    assert "several images in the sample (jpg, png)" in samples[1].error
    assert "no image" in samples[2].error and "txt" in samples[2].error
    assert "no image" in samples[3].error
    assert samples[4].data == b"not really a webp"  # read; decoding says why later
    assert all(s.source == str(shard) for s in samples)


def test_truncated_tar_is_one_error_row_after_what_was_read(tmp_path, example_photos):
    shard = tmp_path / "cut.tar"
    make_shard(shard, example_photos[:3])
    data = shard.read_bytes()
    first = len(example_photos[0].read_bytes())
    shard.write_bytes(data[: 512 * 6 + first + 4000])  # inside the second sample's photo
    samples = list(read_unit(Unit("tar", str(shard))))
    assert samples[-1].key == f"{shard}#unreadable" and "after" in samples[-1].error
    assert [s.key for s in samples[:-1]] == ["00000000"]


def test_tables_with_paths_bytes_and_keys(tmp_path, example_photos):
    photos = example_photos[:3]
    pq.write_table(pa.table({"key": ["a", "b", "c"], "image": [p.read_bytes() for p in photos]}),
                   tmp_path / "bytes.parquet")
    (tmp_path / "pics").mkdir()
    for p in photos:
        (tmp_path / "pics" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "paths.csv").write_text("path,other\n" + "".join(f"pics/{p.name},x\n" for p in photos) + ",y\n")
    pq.write_table(pa.table({"url": ["http://x"]}), tmp_path / "nocol.parquet")
    listing = list_units([tmp_path / "bytes.parquet", tmp_path / "paths.csv", tmp_path / "nocol.parquet"])
    assert [u.kind for u in listing.units] == ["table", "table", "table"]
    by_bytes = list(read_unit(listing.units[0]))
    assert [(s.key, s.data) for s in by_bytes] == [(k, p.read_bytes()) for k, p in zip("abc", photos, strict=True)]
    by_path = list(read_unit(listing.units[1]))
    assert [s.key for s in by_path[:3]] == [f"pics/{p.name}" for p in photos]
    assert by_path[0].path == f"{tmp_path}/pics/{photos[0].name}"
    assert by_path[3].key == "paths#3" and "names no photo" in by_path[3].error
    (bad,) = read_unit(listing.units[2])
    assert bad.key.endswith("#unreadable") and "no photo column" in bad.error and "url" in bad.error


def test_parquet_parts_resume_drops_errors_and_keeps_the_rest(tmp_path):
    out = str(tmp_path / "caps.parquet")
    w = ParquetWriter(out, resume=False, part_rows=2)
    for i in range(5):
        rec = {"path": f"k{i}", "source": "s", **({"error": "bad"} if i == 1 else {"caption": f"c{i}"})}
        w.write(rec)
    w.abort()  # a crash: the fifth record was in flight
    assert sorted(os.listdir(out)) == ["part-000000.parquet", "part-000001.parquet"]
    w = ParquetWriter(out, resume=True, part_rows=2)
    assert w.kept.keys == {"k0", "k2", "k3"} and w.kept.by_source == {"s": {"k0", "k2", "k3"}}
    w.write({"path": "k1", "source": "s", "caption": "again"})
    w.close()
    recs = read_parquet_records(out)
    assert sorted(r["path"] for r in recs) == ["k0", "k1", "k2", "k3"]  # each key once, the error gone
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary file left


def test_local_engine_tar_with_a_corrupt_member_and_resume(tmp_path, example_photos, captioner):
    shard = tmp_path / "00000.tar"
    keys = make_shard(shard, example_photos[:3])
    with tarfile.open(shard, "a") as tar:
        add(tar, "broken.jpg", example_photos[0].read_bytes()[:300])
    out = str(tmp_path / "caps.parquet")
    s = run_caption_job(captioner, CaptionJob([shard], out, part_rows=2))
    assert (s.captioned, s.failed) == (3, 1)
    recs = {r["path"]: r for r in read_parquet_records(out)}
    assert set(recs) == {*keys, "broken"} and "cannot decode" in recs["broken"]["error"]
    assert all(recs[k]["caption"] and recs[k]["source"] == str(shard) and recs[k]["model_sha256"] for k in keys)
    again = run_caption_job(captioner, CaptionJob([shard], out, resume=True, part_rows=2))
    assert (again.captioned, again.failed, again.skipped) == (0, 1, 3)  # only the failed one is tried again
    assert sorted(r["path"] for r in read_parquet_records(out)) == sorted([*keys, "broken"])


JOB = """
import sys
from capcli.captioner import Captioner
from capcli.engines.base import EngineOptions
from capcli.engines.job import CaptionJob, run_caption_job
from capcli.progress import Progress

class Say(Progress):
    def advance(self, n=1, **fields):
        print("advanced", n, flush=True)
        sys.stdin.readline()  # the test lets the job go on, or kills it here

run_caption_job(Captioner.load(device="cpu"), CaptionJob(sys.argv[2:], sys.argv[1], EngineOptions(batch_size=2),
                part_rows=4, resume=True), Say())
"""


@pytest.mark.slow
def test_killed_job_resumed_recomputes_only_the_rest(tmp_path, example_photos, captioner):
    """A job killed with SIGKILL after its first parts: the resumed run captions only the samples not in a whole
    part, and the output ends with every key exactly once."""
    shard = tmp_path / "00000.tar"
    keys = make_shard(shard, example_photos[:4], copies=5)  # 20 samples; the engine works in groups of 4 batches
    out = str(tmp_path / "caps.parquet")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, "-c", JOB, out, str(shard)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert job.stdout.readline().split() == ["advanced", "8"]  # the first group is written: 2 parts of 4
        job.send_signal(signal.SIGKILL)
    finally:
        job.kill()
        job.wait(60)
    done = read_parquet_records(out)
    assert len(done) == 8
    s = run_caption_job(captioner, CaptionJob([shard], out, EngineOptions(batch_size=2), resume=True))
    assert (s.captioned, s.skipped) == (12, 8)
    assert sorted(r["path"] for r in read_parquet_records(out)) == sorted(keys)


def test_cli_captions_a_tar_into_parquet(tmp_path, example_photos):
    from typer.testing import CliRunner

    from capcli.cli import app

    shard = tmp_path / "00000.tar"
    keys = make_shard(shard, example_photos[:2])
    out = tmp_path / "caps.parquet"
    r = CliRunner().invoke(app, ["caption", str(shard), "-o", str(out), "--device", "cpu"], prog_name="capcli")
    assert r.exit_code == 0, r.output
    assert "captioned 2, failed 0" in r.output
    assert sorted(x["path"] for x in read_parquet_records(str(out))) == keys
    r = CliRunner().invoke(app, ["caption", str(shard), "-o", str(out), "--attention-maps", str(tmp_path / "m")],
                           prog_name="capcli")
    assert r.exit_code == 2 and "--attention-maps works with photo folders" in r.output


def test_job_gives_caption_paths_captions(tmp_path, example_photos, captioner):
    """The job path (any input kind, either engine) captions as capcli caption always did, record for record."""
    want = {Path(r["path"]).name: r for r in captioner.caption_paths(example_photos)}
    out = tmp_path / "caps.jsonl"
    s = run_caption_job(captioner, CaptionJob([EXAMPLES], str(out)))
    assert (s.captioned, s.failed) == (len(example_photos), 0)
    got = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(got) == set(want)
    for name, rec in want.items():
        assert (got[name]["caption"], got[name]["logprob"], got[name]["labels"], got[name].get("confidence")) == (
            rec["caption"], rec["logprob"], rec["labels"], rec.get("confidence")), name
        assert got[name]["source"] == str(EXAMPLES) and got[name]["model"] == "flickr8k-attention.pt"
