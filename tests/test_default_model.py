"""The default model shipped in the package: loads offline, captions real photos sensibly, scores above a floor."""

from __future__ import annotations

import pytest

from capcli.captioner import DEFAULT_MODEL, SHIPPED_MODELS, Captioner
from capcli.checkpoint import load_checkpoint
from capcli.vocab import tokenize

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no default model in capcli/assets")


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.load(device="cpu")


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_shipped_checkpoints_load_with_weights_only(name) -> None:
    ckpt = load_checkpoint(SHIPPED_MODELS[name])  # torch.load(weights_only=True) inside
    assert ckpt["config"]["arch"] == name
    assert ckpt["encoder"]["name"] == "efficientnet-lite0"
    assert ckpt["metrics"]["split"] == "val" and ckpt["metrics"]["images"] == 1000


def test_default_is_the_attention_model(captioner) -> None:
    assert captioner.model.arch == "attention"


def test_captions_of_the_example_photos_are_sensible(captioner, example_photos) -> None:
    recs = list(captioner.caption_paths(example_photos, beam_size=3, workers=0))
    assert [r["path"] for r in recs] == [str(p) for p in example_photos]
    captions = [r["caption"] for r in recs]
    for c in captions:
        words = tokenize(c)
        assert 3 <= len(words) <= 20, c
        assert all(a != b for a, b in zip(words, words[1:], strict=False)), f"repeated word in {c!r}"
        assert "<unk>" not in words
    assert len(set(captions)) >= 4, captions  # different photos, different captions
    by_name = {p.name: c for p, c in zip(example_photos, captions, strict=True)}
    people = ("man", "men", "woman", "person", "people", "girl", "boy", "child", "children", "kids")
    assert any(w in tokenize(by_name["astronaut.jpg"]) for w in people), by_name


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_reduced_precision_search_keeps_the_float32_captions(captioner, example_photos, precision) -> None:
    """The search twin with bfloat16 or int8 products (``auto`` picks one on most CPUs) rounds only the products."""
    f32 = Captioner(captioner.model, captioner.encoder, captioner.vocab, captioner.device, precision="float32")
    low = Captioner(captioner.model, captioner.encoder, captioner.vocab, captioner.device, precision=precision)
    assert f32.precision == "float32" and low.precision == precision
    a = f32.caption_paths(example_photos, beam_size=3, workers=0)
    b = low.caption_paths(example_photos, beam_size=3, workers=0)
    pairs = list(zip(a, b, strict=True))
    same = [(x, y) for x, y in pairs if x["caption"] == y["caption"]]
    assert len(same) >= len(pairs) - 1, pairs
    assert all(abs(x["logprob"] - y["logprob"]) < 0.15 for x, y in same), same


def test_scores_above_a_floor_on_fixed_val_images(captioner, flickr8k_dir) -> None:
    """40 fixed val images, beam 3: a random or broken model scores ~0 here; the shipped one well above."""
    import json

    from capcli.evaluate import score

    caps = json.loads((flickr8k_dir / "captions.json").read_text())
    val = json.loads((flickr8k_dir / "splits.json").read_text())["val"][:40]
    by_file = {im["file_name"]: im["id"] for im in caps["images"]}
    refs: dict[int, list[str]] = {by_file[f]: [] for f in val}
    for a in caps["annotations"]:
        if a["image_id"] in refs:
            refs[a["image_id"]].append(a["caption"])
    paths = [flickr8k_dir / "images" / f for f in val]
    hyps = {by_file[f]: r["caption"] for f, r in zip(val, captioner.caption_paths(paths, beam_size=3, workers=0),
                                                      strict=True)}
    values = score(hyps, refs, metrics=("bleu", "cider"), tokenizer="python").values
    assert values["BLEU-4"] > 0.12 and values["CIDEr"] > 0.30, values
