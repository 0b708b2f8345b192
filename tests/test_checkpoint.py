"""The checkpoint format: a real round trip under weights_only, atomic writes, clear errors for bad files, and the
shipped checkpoints read as :class:`Checkpoint` unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import capcli
from capcli.checkpoint import FORMAT, Checkpoint, load_checkpoint, save_checkpoint
from capcli.encoders import get_spec
from capcli.errors import CheckpointError
from capcli.vocab import Vocabulary


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.norm = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        h, _ = self.lstm(self.embed(x))  # (B, T, H)
        return self.out(self.norm(h.transpose(1, 2)).transpose(1, 2))


@pytest.fixture(scope="module")
def trained() -> tuple[dict, nn.Module, torch.optim.Optimizer]:
    """A checkpoint dict of a really trained small module (read-only: tests copy it before changing it)."""
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randint(0, 12, (4, 5))
    for _ in range(2):  # real steps so the optimiser and BatchNorm have state
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    vocab = Vocabulary.build(["a dog runs", "a cat sits", "a dog sits"], min_count=1)
    ckpt = {
        "config": {"arch": "basic", "hidden": 16, "dropout": 0.5, "layers": [1, 2]},
        "vocab": vocab.to_dict(),
        "encoder": get_spec("efficientnet-lite0").to_dict(),
        "model": model.state_dict(),
        "metrics": {"epoch": 2, "CIDEr": 0.512, "best": True},
        "train_state": {"optimizer": opt.state_dict(), "step": 17, "rng": torch.get_rng_state()},
    }
    return ckpt, model, opt


def test_round_trip_under_weights_only(tmp_path, trained) -> None:
    ckpt, model, opt = trained
    path = save_checkpoint(tmp_path / "runs" / "best.pt", ckpt)
    assert path == tmp_path / "runs" / "best.pt" and path.is_file()
    # loads with the safe loader directly, too: plain data and tensors only
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT
    back = load_checkpoint(path)
    assert back["config"] == ckpt["config"] and back["metrics"] == ckpt["metrics"]
    assert Vocabulary.from_dict(back["vocab"]).words == Vocabulary.from_dict(ckpt["vocab"]).words
    assert back["encoder"]["name"] == "efficientnet-lite0" and tuple(back["encoder"]["mean"]) == (127.0,) * 3
    # the model's weights restore exactly into a fresh module and give the same outputs
    fresh = _Tiny()
    fresh.load_state_dict(back["model"])
    model.eval(), fresh.eval()
    x = torch.randint(0, 12, (3, 6))
    assert torch.equal(model(x), fresh(x))
    # the optimiser state restores and continues identically
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(back["train_state"]["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert back["train_state"]["step"] == 17
    # the RNG state restores: the same random numbers come out
    torch.set_rng_state(back["train_state"]["rng"])
    a = torch.rand(5)
    torch.set_rng_state(ckpt["train_state"]["rng"])
    assert torch.equal(a, torch.rand(5))


def test_atomic_write_leaves_no_temp_file_and_keeps_old_on_failure(tmp_path, trained) -> None:
    ckpt = dict(trained[0])
    save_checkpoint(tmp_path / "last.pt", ckpt)
    save_checkpoint(tmp_path / "last.pt", ckpt)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    before = (tmp_path / "last.pt").read_bytes()
    bad = dict(ckpt, metrics={"oops": lambda: 0})  # cannot be pickled: the save fails half-way
    with pytest.raises(Exception):  # noqa: B017 -- whatever pickle raises; what matters is what is left
        save_checkpoint(tmp_path / "last.pt", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind
    assert (tmp_path / "last.pt").read_bytes() == before  # the previous checkpoint is intact
    load_checkpoint(tmp_path / "last.pt")


def test_save_requires_the_core_entries(tmp_path, trained) -> None:
    ckpt = dict(trained[0])
    del ckpt["vocab"]
    with pytest.raises(CheckpointError, match="missing 'vocab'"):
        save_checkpoint(tmp_path / "x.pt", ckpt)
    assert not list(tmp_path.iterdir())


def test_save_into_unwritable_place_is_a_checkpoint_error(tmp_path, trained) -> None:
    ckpt = dict(trained[0])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint(tmp_path / "afile" / "best.pt", ckpt)


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg
    assert str(path) in msg
    return msg


def test_corrupt_files(tmp_path, trained) -> None:
    ckpt = dict(trained[0])
    good = save_checkpoint(tmp_path / "good.pt", ckpt).read_bytes()
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("this is a text file, not a checkpoint\n")
    assert "not a readable capcli checkpoint" in _error(tmp_path / "random.pt")
    assert "corrupt or truncated" in _error(tmp_path / "truncated.pt")
    assert "empty or truncated" in _error(tmp_path / "empty.pt")
    assert "not a readable capcli checkpoint" in _error(tmp_path / "text.pt")


def test_code_objects_are_refused(tmp_path) -> None:
    torch.save({"format": FORMAT, "config": {}, "vocab": {}, "encoder": {"name": "x"}, "model": {},
                "metrics": nn.Linear(2, 2)}, tmp_path / "pickled_module.pt")
    assert "weights-only load refuses" in _error(tmp_path / "pickled_module.pt")


def test_wrong_format(tmp_path) -> None:
    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.pt")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "state_dict.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"format": "capcli-checkpoint/999", "model": {}}, tmp_path / "future.pt")
    for name in ("plain.pt", "state_dict.pt", "list.pt", "future.pt"):
        assert f"expected format {FORMAT}" in _error(tmp_path / name)
    torch.save({"format": FORMAT, "config": {}, "vocab": {}, "model": {}}, tmp_path / "partial.pt")
    assert "missing 'encoder'" in _error(tmp_path / "partial.pt")
    torch.save({"format": FORMAT, "config": {}, "vocab": {}, "encoder": "lite0", "model": {}}, tmp_path / "bad.pt")
    assert "'encoder' is malformed" in _error(tmp_path / "bad.pt")
    assert "checkpoint not found" in _error(tmp_path / "nope.pt")
    assert "checkpoint not found" in _error(tmp_path)  # a folder


def test_check_encoder(tmp_path, trained) -> None:
    back = Checkpoint.load(save_checkpoint(tmp_path / "c.pt", dict(trained[0])))
    back.check_encoder("efficientnet-lite0", "features/flickr8k")  # same encoder: fine
    with pytest.raises(CheckpointError) as e:
        back.check_encoder("resnet101", "features/flickr8k/resnet101")
    assert str(e.value) == (
        "the model expects efficientnet-lite0 features but features/flickr8k/resnet101 uses resnet101; "
        "extract features with --encoder efficientnet-lite0"
    )


def test_checkpoint_fields_round_trip(tmp_path, trained) -> None:
    """The dataclass writes the file's entries in order, leaves absent ones out, and reads them back."""
    d = dict(trained[0])
    ckpt = Checkpoint.from_dict(d)
    assert ckpt.train_config is None and ckpt.familiarity is None and ckpt.encoder_name == "efficientnet-lite0"
    path = ckpt.save(tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["format", "config", "vocab", "encoder", "model", "metrics", "train_state"]
    back = Checkpoint.load(path)
    assert back.path == path and back.config == d["config"] and back.train_state["step"] == 17
    assert back == Checkpoint.from_dict(back.to_dict())  # (tensors compare by identity here: the same objects)


@pytest.mark.parametrize("name", ["flickr8k-attention", "flickr8k-basic"])
def test_shipped_checkpoints_read_unchanged(name) -> None:
    """Each shipped checkpoint reads as a Checkpoint whose to_dict() is the file's dict, entry for entry."""
    path = Path(capcli.__file__).parent / "assets" / f"{name}.pt"
    raw = torch.load(path, weights_only=True)
    ckpt = Checkpoint.load(path)
    again = ckpt.to_dict()
    assert list(again) == list(raw)
    for key in raw:
        if key in ("model", "encoder_state"):
            assert raw[key].keys() == again[key].keys()
            assert all(torch.equal(raw[key][k], again[key][k]) for k in raw[key]), key
        elif key != "familiarity":
            assert again[key] == raw[key], key
    assert ckpt.familiarity is not None and torch.equal(ckpt.familiarity["photos"], raw["familiarity"]["photos"])
