"""capcli train: real Lite0 features of real Flickr8k photos, real models, real checkpoints.

The 30-photo slice (``small_flickr8k``: 20 train, 10 val) and its features are made once per session.
Validation uses the Python tokenizer (``val_tokenizer="python"``) to keep the many short runs fast.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from capcli import paths
from capcli.checkpoint import load_checkpoint
from capcli.cli import app
from capcli.config import TrainConfig, check_config
from capcli.errors import UsageError
from capcli.evaluate import score
from capcli.familiar import Familiarity
from capcli.features import FeatureStore
from capcli.layout import Dataset
from capcli.models import build
from capcli.models.decoding import greedy
from capcli.progress import Progress
from capcli.search import SearchOptions, search
from capcli.train import epoch_order, train
from capcli.vocab import Vocabulary, tokenize

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Recorder(Progress):
    def __init__(self, interrupt_at: int | None = None, how: str = "raise") -> None:
        self.messages: list[str] = []
        self.phase = ""
        self.steps = 0
        self.interrupt_at, self.how = interrupt_at, how

    def start(self, description: str, total: int | None = None, unit: str = "img") -> None:
        self.phase = description

    def advance(self, n: int = 1, **fields: object) -> None:
        if not self.phase.startswith("epoch") or "loss" not in fields:
            return
        self.steps += 1
        if self.steps == self.interrupt_at:
            if self.how == "sigint":  # a real Ctrl-C: the handler asks the loop to stop after this step
                signal.raise_signal(signal.SIGINT)
            else:
                raise KeyboardInterrupt

    def info(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.messages.append("warning: " + message)


def tiny(data: Dataset, features: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=data.source, features=str(features), out=str(out), embed_dim=32, hidden_dim=32,
                attention_dim=32, dropout=0.3, min_count=1, batch_size=16, epochs=2, lr=1e-3,
                val_tokenizer="python", patience=0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for (ka, va), (_, vb) in zip(sa["train_state"]["optimizer"]["state"].items(),
                                 sb["train_state"]["optimizer"]["state"].items(), strict=True):
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(va[name], vb[name]), (ka, name)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def cli(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def assert_clean_error(r, *needles: str) -> None:
    assert r.exit_code != 0, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.output
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in errors[0], r.stderr


# ---- learning ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "epochs", "batch", "lr", "dim"), [("basic", 40, 4, 3e-3, 256),
                                                                    ("attention", 12, 5, 3e-3, 256)])
def test_overfits_twenty_photos(small_flickr8k, small_flickr8k_features, tmp_path, arch, epochs, batch, lr, dim):
    """Each model can memorise one caption for each of 20 real photos: the loop, loss and data are right."""
    out = tmp_path / arch
    cfg = TrainConfig(arch=arch, data=small_flickr8k.source, features=str(small_flickr8k_features), out=str(out),
                      captions_per_image=1, embed_dim=dim, hidden_dim=dim, attention_dim=dim, dropout=0.0,
                      alpha_c=0.0, lr=lr, batch_size=batch, epochs=epochs, schedule="none", patience=0,
                      min_count=1, val_tokenizer="python")
    res = train(cfg)
    rows = metrics(out)
    assert len(rows) == epochs == res.epochs_run
    assert rows[-1]["train_ce"] < 0.1 < 2 < rows[0]["train_ce"]  # near zero (seeds 0-2 end below 0.015)
    assert {"epoch", "step", "train_loss", "val_BLEU-4", "val_CIDEr", "lr", "captions_per_s", "seconds"} <= set(rows[0])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ck = load_checkpoint(res.last_path)
    assert ck["train_config"]["arch"] == arch and ck["encoder"]["name"] == "efficientnet-lite0"
    model = build(ck["config"]).eval()
    model.load_state_dict(ck["model"])
    vocab = Vocabulary.from_dict(ck["vocab"])
    recs = small_flickr8k.split("train")
    feats = torch.from_numpy(FeatureStore(small_flickr8k_features).get_many([r.id for r in recs], model.feature_kind))
    decoded = greedy(model, feats.float(), vocab.start_id, vocab.end_id, max_len=20)
    exact = sum(d.tokens == vocab.encode(r.captions[0])[1:-1][:20] for d, r in zip(decoded, recs, strict=True))
    assert exact >= 18, f"{exact}/20 training captions reproduced"
    best = load_checkpoint(res.best_path)
    assert best["metrics"]["CIDEr"] == max(r["val_CIDEr"] for r in rows) and "train_state" not in best


# ---- resuming ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "how"), [("basic", "sigint"), ("attention", "raise")])
def test_resume_gives_identical_weights(small_flickr8k, small_flickr8k_features, tmp_path, arch, how):
    """2 epochs straight == 1 epoch + resume + 1 == interrupted mid-epoch + resume (every tensor equal)."""
    ds, feats = small_flickr8k, small_flickr8k_features
    sigint_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    straight = train(tiny(ds, feats, tmp_path / "straight", arch=arch))

    train(tiny(ds, feats, tmp_path / "split", arch=arch, epochs=1))
    resumed = train(tiny(ds, feats, tmp_path / "split", arch=arch, epochs=2, resume=True))
    assert resumed.epochs_run == 2
    same_weights(straight.last_path, resumed.last_path)

    # Ctrl-C (or a KeyboardInterrupt) after the 3rd step of the first epoch leaves a resumable last.pt.
    rec = Recorder(interrupt_at=3, how=how)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(ds, feats, tmp_path / "cut", arch=arch), rec)
    state = load_checkpoint(tmp_path / "cut" / "last.pt")["train_state"]
    assert (state["epoch"], state["batch"], state["step"]) == (0, 3, 3)
    assert any("resume with" in m for m in rec.messages)
    assert signal.getsignal(signal.SIGINT) is sigint_before  # handlers restored
    # --resume with --out only: everything else comes from the checkpoint
    again = train(TrainConfig(out=str(tmp_path / "cut"), resume=True))
    assert again.epochs_run == 2
    same_weights(straight.last_path, again.last_path)
    assert [r["train_loss"] for r in metrics(tmp_path / "cut")] == [r["train_loss"] for r in metrics(straight.out)]


def test_refuses_to_overwrite_a_run(small_flickr8k, small_flickr8k_features, tmp_path):
    cfg = tiny(small_flickr8k, small_flickr8k_features, tmp_path / "run", epochs=1, arch="basic", val_beam=3)
    best = train(cfg).best_metrics
    # validation captions by the search caption and evaluate use: best.pt's own beam-3 captions of the 10 val
    # photos score the same
    ck = load_checkpoint(tmp_path / "run" / "best.pt")
    model = build(ck["config"]).eval()
    model.load_state_dict(ck["model"])
    vocab = Vocabulary.from_dict(ck["vocab"])
    recs = small_flickr8k.split("val")
    feats = FeatureStore(small_flickr8k_features).get_many([r.id for r in recs], model.feature_kind)
    beams = search(model, torch.from_numpy(feats).float(), SearchOptions.of(vocab, beam_size=3, max_len=20))
    hyps = {r.id: vocab.to_text(b[0].tokens) for r, b in zip(recs, beams, strict=True)}
    again = score(hyps, {r.id: r.captions for r in recs}, metrics=("bleu", "cider"), tokenizer="python").values
    assert (best["epoch"], best["split"], best["images"], best["select"]) == (1, "val", 10, "CIDEr")
    assert best["CIDEr"] == pytest.approx(again["CIDEr"]) and best["BLEU-4"] == pytest.approx(again["BLEU-4"])
    assert best["CIDEr"] == metrics(tmp_path / "run")[0]["val_CIDEr"]
    # the training photos' familiarity (grounding's out-of-domain check), fitted on their features: a tenth of val out
    fam = Familiarity.of_checkpoint(ck, tmp_path / "run" / "best.pt")
    store = FeatureStore(small_flickr8k_features)
    assert fam is not None and fam.photos.shape == (len(small_flickr8k.split("train")), store.feature_dim)
    pooled = torch.from_numpy(store.get_many([r.id for r in recs], "pooled")).float()
    assert int(fam.outside(pooled.unsqueeze(1)).sum()) == 1
    r = cli("--data", small_flickr8k.source, "--features", str(small_flickr8k_features), "--out", str(tmp_path / "run"))
    assert_clean_error(r, "already holds a training run", "--resume")
    # finished runs resume to nothing
    res = train(TrainConfig(out=str(tmp_path / "run"), resume=True))
    assert res.epochs_run == 1 and res.notes


# Recorded with the training loop before its refactor into capcli/train/ (commit 5352441): the same seed and
# settings must give the same losses and learning rates. (Relative 1e-5 absorbs other CPUs' float rounding.)
PINNED = {
    "basic": (dict(arch="basic", label_smoothing=0.1, schedule="cosine", captions_per_image=2, epochs=3),
              [5.189330259958903, 5.17390791575114, 5.168654441833496], [7.5e-4, 2.5e-4, 0.0], [3, 6, 9]),
    "attention-gru": (dict(arch="attention", cell="gru", preload=False, workers=0, weight_decay=1e-4),
                      [33.61850084577288, 34.0025885445731], [1e-3, 1e-3], [7, 14]),
}


@pytest.mark.parametrize("name", PINNED)
def test_losses_match_the_recorded_run(small_flickr8k, small_flickr8k_features, tmp_path, name):
    """A short fixed-seed run's per-epoch losses (cross-entropy with label smoothing; cross-entropy plus the
    attention regulariser), learning rates (cosine: (1 + cos(pi k / 9)) / 2 after k of 9 steps) and steps."""
    kw, losses, lrs, steps = PINNED[name]
    rec = Recorder()
    train(tiny(small_flickr8k, small_flickr8k_features, tmp_path / name, **kw), progress=rec)
    rows = metrics(tmp_path / name)
    assert [r["train_loss"] for r in rows] == pytest.approx(losses, rel=1e-5)
    for r in rows:  # the loss's terms, also in the epoch lines
        assert r["train_ce"] + r["train_reg"] == pytest.approx(r["train_loss"])
        if kw["arch"] == "attention":
            assert r["train_reg"] > r["train_ce"] > 1
            assert any(f"loss {r['train_loss']:.3f} (= cross-entropy {r['train_ce']:.3f} + attention regulariser "
                       f"{r['train_reg']:.3f}" in m for m in rec.messages), rec.messages
        else:
            assert r["train_reg"] == 0
    assert [r["lr"] for r in rows] == pytest.approx(lrs, abs=1e-12)
    assert [r["step"] for r in rows] == steps


# ---- data paths ----------------------------------------------------------------------------------


def test_disk_reading_matches_preloading_and_float16_export(small_flickr8k, small_flickr8k_features, tmp_path):
    """Reading features from the HDF5 shards in a DataLoader gives the same training as preloading them."""
    a = train(tiny(small_flickr8k, small_flickr8k_features, tmp_path / "a", arch="attention", epochs=1,
                   save_dtype="float16"))
    b = train(tiny(small_flickr8k, small_flickr8k_features, tmp_path / "b", arch="attention", epochs=1,
                   preload=False, workers=1))
    same_weights(a.last_path, b.last_path)
    best = load_checkpoint(a.best_path)
    assert all(t.dtype == torch.float16 for t in best["model"].values() if t.is_floating_point())
    last = load_checkpoint(a.last_path)
    assert all(t.dtype == torch.float32 for t in last["model"].values() if t.is_floating_point())
    model = build(best["config"])
    model.load_state_dict(best["model"])  # a float16 export loads into a float32 model


def test_epoch_order_is_a_sharded_permutation():
    full = epoch_order(101, seed=1, epoch=4)
    assert sorted(full.tolist()) == list(range(101))
    assert torch.equal(full, epoch_order(101, seed=1, epoch=4)) and not torch.equal(full, epoch_order(101, 1, 5))
    shards = [epoch_order(101, 1, 4, rank=r, world=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(101))


def test_fine_tunes_the_encoder_end_to_end(small_flickr8k, tmp_path):
    """From photos: the last block (+ head) of Lite0 learns, the rest stays as it was, encoder_state is saved."""
    from capcli.encoders import create_encoder

    cfg = TrainConfig(arch="basic", data=small_flickr8k.source, out=str(tmp_path / "ft"), fine_tune_encoder=True,
                      fine_tune_blocks=1, embed_dim=32, hidden_dim=32, min_count=1, batch_size=4, max_steps=2,
                      epochs=1, val_images=2, workers=0, val_tokenizer="python", encoder_lr=1e-2)
    res = train(cfg)
    ck = load_checkpoint(res.last_path)
    before = create_encoder().state_dict()
    after = ck["encoder_state"]
    assert ck["train_state"]["step"] == 2
    assert "familiarity" not in ck  # a fine-tuned encoder's head no longer reads its features: no grounding
    for name, learns in [("_blocks.15._project_conv.weight", True), ("_conv_head.weight", True),
                         ("_blocks.14._project_conv.weight", False), ("_conv_stem.weight", False),
                         ("_bn1.running_mean", False)]:  # BatchNorm statistics stay frozen
        assert torch.equal(before[f"trunk.{name}"], after[f"trunk.{name}"]) != learns, name


# ---- embeddings ----------------------------------------------------------------------------------


def test_glove_embeddings_are_loaded_and_frozen(small_flickr8k, small_flickr8k_features, tmp_path):
    words = sorted({w for r in small_flickr8k.split("train") for c in r.captions for w in tokenize(c)})
    known = words[::2]  # half the vocabulary is in the file
    glove = tmp_path / "glove.8d.txt"
    lines = [f"{w} " + " ".join(f"{(i + 1) * 0.01 + j:.4f}" for j in range(8)) for i, w in enumerate(known)]
    lines.insert(3, "notacaptionword " + " ".join(["0.5"] * 8))
    glove.write_text("\n".join(lines) + "\n")

    rec = Recorder()
    res = train(tiny(small_flickr8k, small_flickr8k_features, tmp_path / "emb", arch="attention", embed_dim=8,
                     epochs=1, embeddings=str(glove), freeze_embeddings=True), rec)
    assert any(f"{len(known)} of {len(words)} words" in m and f"{len(words) - len(known)} not in it" in m
               for m in rec.messages), rec.messages
    ck = load_checkpoint(res.last_path)
    vocab = Vocabulary.from_dict(ck["vocab"])
    emb = ck["model"]["embed.weight"]
    for i, w in enumerate(known):
        expected = torch.tensor([(i + 1) * 0.01 + j for j in range(8)])
        assert torch.allclose(emb[vocab.index(w)], expected, atol=1e-6), w  # loaded, and unchanged by training

    r = cli("--data", small_flickr8k.source, "--features", str(small_flickr8k_features), "--out",
            str(tmp_path / "bad"), "--embeddings", str(glove), "--embed-dim", "16", "--min-count", "1")
    assert_clean_error(r, "8-d vectors", "--embed-dim 8")


def test_self_critical_training_raises_the_cider_reward(small_flickr8k, small_flickr8k_features, tmp_path):
    """--init-from a cross-entropy model, then --scst: every training image once per epoch, 4 samples each; the
    mean CIDEr-D reward of the samples climbs, and the run keeps the starting model's vocabulary and config."""
    xe = train(tiny(small_flickr8k, small_flickr8k_features, tmp_path / "xe", arch="attention", epochs=10,
                    embed_dim=128, hidden_dim=128, attention_dim=128, batch_size=10, lr=3e-3, dropout=0.0, seed=1))
    rec = Recorder()
    res = train(tiny(small_flickr8k, small_flickr8k_features, tmp_path / "scst", arch="attention", epochs=10,
                     init_from=str(xe.last_path), scst=True, scst_samples=4, lr=1e-3, batch_size=4, alpha_c=0.0,
                     dropout=0.0, min_count=2, seed=1), rec)
    assert any("starting from" in m for m in rec.messages), rec.messages
    rows = metrics(tmp_path / "scst")
    assert "train_ce" not in rows[0] and len(rows) == 10
    assert rows[0]["step"] == 5  # 20 images, batch 4: each image once per epoch
    rewards = [r["train_reward"] for r in rows]
    # The reward of 16 samples is noisy from epoch to epoch: the last three epochs' mean against the first.
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.1, rewards  # (seed 1: 1.50 -> 1.68; a flipped sign falls)
    start, end = load_checkpoint(xe.best_path), load_checkpoint(res.last_path)
    assert end["vocab"] == start["vocab"] and end["config"] == start["config"]  # not min_count=2, not dim 32
    # ... said so, and the run records the model it trained, not the ignored options
    assert any("--embed-dim 32 ignored with --init-from" in m and "(128)" in m for m in rec.messages), rec.messages
    assert any("--min-count ignored with --init-from" in m for m in rec.messages), rec.messages
    dims = ("embed_dim", "hidden_dim", "attention_dim", "dropout")
    assert [end["train_config"][k] for k in dims] == [128, 128, 128, 0.0]
    more = train(TrainConfig(out=str(tmp_path / "scst"), resume=True, epochs=11))  # resumes as self-critical
    assert more.epochs_run == 11 and "train_reward" in metrics(tmp_path / "scst")[-1]

    r = cli("--data", small_flickr8k.source, "--features", str(small_flickr8k_features), "--out",
            str(tmp_path / "bad"), "--arch", "basic", "--init-from", str(xe.best_path), "--scst")
    assert_clean_error(r, "is a 'attention' model, not --arch basic")


# ---- the product owner's flow and bad input --------------------------------------------------------


def test_train_after_fetch_needs_no_arguments(small_flickr8k):
    """`capcli fetch coco` leaves ROOT/datasets/coco2014; `capcli train --arch attention` finds it, extracts the
    features it needs into ROOT/features, and trains into ROOT/runs (here shortened to one epoch)."""
    r = cli("--arch", "attention")
    assert_clean_error(r, "no prepared COCO dataset", "capcli fetch coco")

    ds = Dataset.load(small_flickr8k.source)
    ds.name = "coco2014"
    ds.save(paths.dataset_dir("coco2014"))
    r = cli("--arch", "attention", "--epochs", "1", "--no-extract")
    assert_clean_error(r, "no efficientnet-lite0 features for coco2014", "--no-extract")

    r = cli("--arch", "attention", "--epochs", "1", "--val-tokenizer", "python")
    assert r.exit_code == 0, r.output
    assert "using coco2014" in r.output and "extracting" in r.output
    assert (paths.features_dir("coco2014", "efficientnet-lite0") / "manifest.json").is_file()
    run = paths.run_dir("coco2014", "attention")
    assert str(run / "best.pt") in r.output.replace("\n", "")
    ck = load_checkpoint(run / "best.pt")
    assert ck["train_config"]["embed_dim"] == 512 and ck["config"]["arch"] == "attention"
    assert len(metrics(run)) == 1


def test_bad_input_gives_one_clear_error(small_flickr8k, small_flickr8k_features, tmp_path):
    ds, feats = small_flickr8k.source, str(small_flickr8k_features)
    # features of another encoder: a real copy of the Lite0 folder whose manifest names resnet50
    other = tmp_path / "resnet50-features"
    shutil.copytree(feats, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["encoder"] = "resnet50"
    (other / "manifest.json").write_text(json.dumps(manifest))
    r = cli("--data", ds, "--features", str(other), "--encoder", "efficientnet-lite0", "--out", str(tmp_path / "x"))
    assert_clean_error(r, "resnet50 features, not efficientnet-lite0")

    # resuming a Lite0 run on them
    train(tiny(small_flickr8k, small_flickr8k_features, tmp_path / "run", arch="basic", epochs=1))
    r = cli("--out", str(tmp_path / "run"), "--resume", "--epochs", "2", "--features", str(other))
    assert_clean_error(r, "expects efficientnet-lite0 features", "resnet50")

    # no features and --no-extract
    r = cli("--data", ds, "--no-extract", "--out", str(tmp_path / "y"))
    assert_clean_error(r, "no efficientnet-lite0 features for f8k-small", "capcli features")

    # a corrupt checkpoint, and none at all
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "last.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    r = cli("--out", str(bad), "--resume")
    assert_clean_error(r, "not a readable capcli checkpoint")
    r = cli("--out", str(tmp_path / "nothing"), "--resume")
    assert_clean_error(r, "nothing to resume")

    r = cli("--data", ds, "--features", feats, "--arch", "transformer")
    assert_clean_error(r, "--arch 'transformer'")
    with pytest.raises(UsageError, match="give one"):  # --overwrite would otherwise be ignored on --resume
        check_config(TrainConfig(resume=True, overwrite=True))
    r = cli("--data", ds, "--features", feats, "--val-split", "test")
    assert_clean_error(r, "no 'test' images")


def test_cli_options_are_train_config_fields():
    """Each option is declared once, as a TrainConfig field: `capcli train` has exactly its fields as options, with
    their defaults and help."""
    cmd = typer.main.get_command(app).commands["train"]
    params = {p.name: p for p in cmd.params}
    assert list(params) == [f.name for f in fields(TrainConfig)]
    for f in fields(TrainConfig):
        assert params[f.name].default == getattr(TrainConfig(), f.name), f.name
        if not f.metadata.get("shared"):  # --root's help is every data command's
            assert params[f.name].help == f.metadata["help"], f.name
            assert params[f.name].opts == ["--" + f.name.replace("_", "-")], f.name


# ---- several processes -----------------------------------------------------------------------------


def test_torchrun_two_processes(small_flickr8k, small_flickr8k_features, tmp_path):
    """DistributedDataParallel over gloo: both ranks train, rank 0 alone validates, logs and saves."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "capcli.cli", "train", "--data", small_flickr8k.source, "--features", str(small_flickr8k_features),
           "--out", str(out), "--arch", "attention", "--epochs", "2", "--embed-dim", "32", "--hidden-dim", "32",
           "--attention-dim", "32", "--batch-size", "16", "--min-count", "1", "--val-tokenizer", "python",
           "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("best checkpoint:") == 1  # only rank 0 reports
    ck = load_checkpoint(out / "last.pt")
    assert ck["train_state"]["world_size"] == 2
    steps = math.ceil(100 / 2 / 16)  # 100 captions, 50 per rank, batches of 16
    assert ck["train_state"]["step"] == 2 * steps
    assert [r["epoch"] for r in metrics(out)] == [1, 2]  # one writer
    assert (out / "best.pt").is_file() and not list(out.glob(".*tmp*"))
