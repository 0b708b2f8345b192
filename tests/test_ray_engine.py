"""The Ray engine on a simulated two-node cluster (ray.cluster_utils.Cluster, more logical CPUs than cores so the
read tasks and the actors both run): the same captions as the local engine key for key, s3:// in and out through
an S3-compatible server on 127.0.0.1 (moto's server mode), a worker killed mid-job, resume after an interrupted
job. Real photos (examples/photos) in real tar shards and parquet tables."""

from __future__ import annotations

import os
import signal
import tarfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("moto")

from test_samples import add, make_shard  # noqa: E402

from capcli.engines.base import EngineOptions  # noqa: E402
from capcli.engines.job import CaptionJob, run_caption_job  # noqa: E402
from capcli.engines.ray_engine import RayOptions  # noqa: E402
from capcli.parquet_out import read_parquet_records  # noqa: E402
from capcli.progress import Progress  # noqa: E402

pytestmark = pytest.mark.slow
ACTOR = "ray::MapWorker(MapBatches(CaptionActor))"
OPTIONS = EngineOptions(batch_size=4)
RAY = RayOptions(workers=1, threads=2)


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on 127.0.0.1 (moto), with credentials and endpoint in the environment before Ray
    starts (its workers inherit them, as they would a cluster's)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket="photos")
    yield client
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    """Two nodes: the head (this driver, 1 CPU: the read tasks) and a worker (3 CPUs: the captioning actor, which
    needs 2, so it cannot run where the driver's files are)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=3)
    ray.init(address=c.address, log_to_driver=False)
    yield worker
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def captioner():
    from capcli.captioner import Captioner

    return Captioner.load(device="cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, example_photos):
    """A shard with a corrupt member, a parquet table of photo bytes, a folder of photos."""
    tmp = tmp_path_factory.mktemp("ray_inputs")
    shard = tmp / "00000.tar"
    make_shard(shard, example_photos[:3])
    with tarfile.open(shard, "a") as tar:
        add(tar, "corrupt.jpg", example_photos[0].read_bytes()[:400])
    pq.write_table(pa.table({"key": ["t1", "t2"], "image": [p.read_bytes() for p in example_photos[3:5]]}),
                   tmp / "table.parquet")
    folder = tmp / "folder"
    folder.mkdir()
    for p in example_photos[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    return [shard, tmp / "table.parquet", folder]


def actor_pids() -> list[int]:
    """The captioning actors' processes among this test's descendants (the cluster's nodes are its children)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not cmd.startswith(ACTOR):
                continue
            pid = int(entry)
            while pid > 1:
                status = Path(f"/proc/{pid}/status").read_text()
                pid = int(next(ln for ln in status.splitlines() if ln.startswith("PPid:")).split()[1])
                if pid == me:
                    found.append(int(entry))
                    break
        except (OSError, StopIteration, ValueError):
            continue
    return found


def by_key(out: str) -> dict[str, dict]:
    recs = read_parquet_records(out)
    keys = [r["path"] for r in recs]
    assert len(keys) == len(set(keys)), "a key written twice"
    return {r["path"]: r for r in recs}


def test_ray_gives_the_local_captions_key_for_key(cluster, captioner, inputs, tmp_path):
    ray_out, local_out = str(tmp_path / "ray.parquet"), str(tmp_path / "local.parquet")
    s = run_caption_job(captioner, CaptionJob(inputs, ray_out, OPTIONS, engine="ray", ray=RAY))
    assert (s.captioned, s.failed) == (7, 1)
    run_caption_job(captioner, CaptionJob(inputs, local_out, OPTIONS))
    got, want = by_key(ray_out), by_key(local_out)
    assert set(got) == set(want) == {"00000000", "00000001", "00000002", "corrupt", "t1", "t2",
                                     "astronaut.jpg", "camera.png"}
    for key, rec in want.items():
        assert (got[key].get("caption"), got[key].get("logprob"), got[key]["source"], got[key]["search"]) == (
            rec.get("caption"), rec.get("logprob"), rec["source"], rec["search"]), key
    assert "cannot decode" in got["corrupt"]["error"]
    # the actor ran on the worker node, from the model's bytes in the object store
    nodes = {a["Address"]["NodeID"] for a in ray.state.actors().values() if "CaptionActor" in a["ActorClassName"]}
    assert nodes == {cluster.node_id}


def test_s3_in_and_out(cluster, captioner, s3, example_photos, tmp_path):
    shard = tmp_path / "00000.tar"
    keys = make_shard(shard, example_photos[:2])
    s3.upload_file(str(shard), "photos", "shards/00000.tar")
    s3.put_object(Bucket="photos", Key="shards/00000.parquet", Body=b"img2dataset's metadata: not read")
    out = "s3://photos/captions/run.parquet"
    s = run_caption_job(captioner, CaptionJob(["s3://photos/shards/"], out, OPTIONS, engine="ray", ray=RAY))
    assert (s.captioned, s.failed) == (2, 0)
    got = by_key(out)
    assert set(got) == set(keys) and all(r["source"] == "s3://photos/shards/00000.tar" for r in got.values())
    names = [o["Key"] for o in s3.list_objects_v2(Bucket="photos", Prefix="captions/")["Contents"]]
    assert names == ["captions/run.parquet/part-000000.parquet"]


class KillActorOnce(Progress):
    """Kills the captioning actor (SIGKILL) when the first records reach the driver; remembers how many."""

    def __init__(self) -> None:
        self.seen, self.at_kill = 0, None

    def advance(self, n: int = 1, **fields: object) -> None:
        self.seen += n
        if self.at_kill is None:
            pids = actor_pids()
            assert pids, "no captioning actor found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            self.at_kill = self.seen


def test_killed_worker_loses_and_duplicates_nothing(cluster, captioner, example_photos, tmp_path):
    shards, keys = [], []
    for i in range(6):  # 6 shards of 4 samples: 6 read tasks, 6 actor tasks (one per block)
        shards.append(tmp_path / f"{i:05d}.tar")
        keys += make_shard(shards[-1], example_photos[:4], prefix=f"{i}-")
    out = str(tmp_path / "caps.parquet")
    progress = KillActorOnce()
    s = run_caption_job(captioner, CaptionJob(shards, out, EngineOptions(batch_size=2), engine="ray", ray=RAY),
                        progress)
    assert progress.at_kill is not None and progress.at_kill < len(keys)  # killed with work left
    assert (s.captioned, s.failed) == (24, 0)
    assert sorted(by_key(out)) == sorted(keys)


class StopAfterFirst(Progress):
    def advance(self, n: int = 1, **fields: object) -> None:
        raise KeyboardInterrupt


def test_interrupted_job_resumed_captions_only_the_rest(cluster, captioner, example_photos, tmp_path):
    shards, keys = [], []
    for i in range(3):  # 3 shards, 12 samples
        shards.append(tmp_path / f"{i:05d}.tar")
        keys += make_shard(shards[-1], example_photos[:4], prefix=f"{i}-")
    out = str(tmp_path / "caps.parquet")
    job = CaptionJob(shards, out, EngineOptions(batch_size=2), engine="ray", ray=RAY, part_rows=2)
    with pytest.raises(KeyboardInterrupt):
        run_caption_job(captioner, job, StopAfterFirst())
    first = by_key(out)
    assert 0 < len(first) < len(keys)
    job.resume = True
    s = run_caption_job(captioner, job)
    assert (s.captioned, s.skipped) == (len(keys) - len(first), len(first))
    assert sorted(by_key(out)) == sorted(keys)
