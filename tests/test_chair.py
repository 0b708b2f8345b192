"""CHAIR (object hallucination): the matching rules, a hand-counted example, and `capcli evaluate` writing it."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from capcli import chair as ch
from capcli.cli import app
from capcli.errors import CapcliError, EvaluateError

COCO_80 = (  # the 80 COCO 2017 object categories, in COCO's order
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


def test_table_names_exactly_the_80_coco_categories():
    assert len(set(COCO_80)) == 80
    table = ch.default_table()
    assert sorted(table.categories) == sorted(COCO_80)
    # every category can be named: its own name (or a listed plural form) is one of its phrases
    for cat in table.categories:
        assert any(e.category == cat for e in table.phrases.values()), cat


def test_a_phrase_naming_two_categories_is_refused():
    with pytest.raises(CapcliError, match="'bat' names both"):
        ch.build_table({"categories": {"baseball bat": ["bat"], "bird": ["bat"]}})


@pytest.mark.parametrize(("singular", "plural"), [
    ("dog", "dogs"), ("bus", "buses"), ("bench", "benches"), ("puppy", "puppies"), ("boy", "boys"),
    ("man", "men"), ("child", "children"), ("knife", "knives"), ("mouse", "mice"), ("sheep", "sheep"),
    ("hot dog", "hot dogs"), ("glass of wine", "glasses of wine"), ("pair of scissors", "pairs of scissors"),
])
def test_plurals(singular, plural):
    irregular = json.loads(ch.TABLE_PATH.read_text())["irregular_plurals"]
    assert ch.plural(tuple(singular.split()), irregular) == tuple(plural.split())


@pytest.mark.parametrize(("caption", "objects"), [
    # plurals, irregular plurals, the capcli.vocab tokenisation (case, punctuation, clitics)
    ("Two DOGS chase frisbees.", {"dog", "frisbee"}),
    ("three men and two children", {"person"}),
    ("the dog's ball", {"dog", "sports ball"}),
    ("knives and forks on a table", {"knife", "fork", "dining table"}),
    # multi-word phrases, longest first; hyphenated words split
    ("a woman talks on her cell phone", {"person", "cell phone"}),
    ("a boy rides a dirt-bike", {"person", "motorcycle"}),
    ("a bride with a glass of wine", {"person", "wine glass"}),
    ("a fire hydrant by a stop sign", {"fire hydrant", "stop sign"}),
    # false friends: the longer phrase wins, or names no object at all
    ("a man eats a hot dog", {"person", "hot dog"}),
    ("two hot dogs", {"hot dog"}),
    ("a girl hugs her teddy bear", {"person", "teddy bear"}),
    ("a polar bear", {"bear"}),
    ("a baseball player swings a baseball bat", {"person", "baseball bat"}),
    ("a pit bull", {"dog"}),
    ("a prairie dog in the grass", set()),
    ("a man in a ball cap", {"person"}),
    # modifiers: sport names count as a ball only as the head of their phrase, orange after a determiner
    ("a boy kicks a football .", {"person", "sports ball"}),
    ("a football player", {"person"}),
    ("a man in an orange shirt", {"person"}),
    ("a girl dressed in orange", {"person"}),
    ("an orange and white dog", {"dog"}),
    ("a boy holds an orange", {"person", "orange"}),
    ("a bowl of oranges", {"bowl", "orange"}),
    ("a baby elephant", {"elephant"}),
    ("a mother holds her baby", {"person"}),
    ("", set()),
    ("a view of snowy mountains", set()),
])
def test_objects_in(caption, objects):
    assert ch.objects_in(caption) == objects


# Seven captions and their references; the objects of each, counted by hand:
HAND_CAPTIONS = {
    1: "a dog catches a frisbee on the grass",         # dog, frisbee                     -> none hallucinated
    2: "a man rides a bike down a hill",               # person, bicycle                  -> bicycle
    3: "two children eat hot dogs at a table",         # person, hot dog, dining table    -> none
    4: "a girl holds a teddy bear next to a dog",      # person, teddy bear, dog          -> dog
    5: "a baseball player swings a bat at the ball",   # person, baseball bat, sports ball -> baseball bat, sports ball
    6: "a man in an orange shirt sits on a bench",     # person, bench (orange: a colour) -> none
    7: "a view of the mountains",                      # no object                        -> none
}
HAND_REFERENCES = {  # the ground truth of each image, the union over its references, counted by hand:
    1: ["A brown dog jumps for a Frisbee .", "A dog playing in a park ."],  # dog, frisbee
    2: ["A cyclist on a dirt-bike .", "A person riding a motorcycle on a trail ."],  # person, motorcycle
    3: ["Kids eating lunch at a picnic table .", "Two boys with hot dogs ."],  # person, dining table, hot dog
    4: ["A little girl hugging her teddy bear .", "A child with a stuffed bear on the sofa ."],  # person, teddy, couch
    5: ["A batter swings at a pitch .", "A baseball player in a red uniform ."],  # person
    6: ["A man wearing orange sitting on a park bench .", "Someone resting on a bench ."],  # person, bench
    7: ["Snowy mountains under a blue sky ."],  # none
}
# Objects mentioned: 2 + 2 + 3 + 3 + 3 + 2 + 0 = 15; hallucinated: 0 + 1 + 0 + 1 + 2 + 0 + 0 = 4.
# CHAIR_i = 4 / 15 = 26.67 %; captions with a hallucination: 2, 4, 5 -> CHAIR_s = 3 / 7 = 42.86 %.


def test_chair_equals_the_hand_count():
    s = ch.chair(HAND_CAPTIONS, HAND_REFERENCES)
    assert (s.captions, s.mentioned, s.hallucinated, s.captions_hallucinating) == (7, 15, 4, 3)
    assert s.chair_i == pytest.approx(100 * 4 / 15)
    assert s.chair_s == pytest.approx(100 * 3 / 7)
    assert {i: r.hallucinated for i, r in s.per_image.items()} == {
        1: [], 2: ["bicycle"], 3: [], 4: ["dog"], 5: ["baseball bat", "sports ball"], 6: [], 7: []
    }
    assert s.per_image[4].truth == ["couch", "person", "teddy bear"]
    assert s.per_image[3].mentioned == ["dining table", "hot dog", "person"]
    assert s.top_hallucinated == [("baseball bat", 1), ("bicycle", 1), ("dog", 1), ("sports ball", 1)]
    assert ch.chair(HAND_CAPTIONS, HAND_REFERENCES, top=2).top_hallucinated == [("baseball bat", 1), ("bicycle", 1)]
    doc = s.to_json()
    assert doc["hallucinated"] == {"2": ["bicycle"], "4": ["dog"], "5": ["baseball bat", "sports ball"]}
    assert doc["unit"] == "percent" and doc["objects_mentioned"] == 15 and json.loads(json.dumps(doc)) == doc


def test_chair_without_objects_or_references():
    s = ch.chair({7: HAND_CAPTIONS[7]}, HAND_REFERENCES)
    assert s.chair_s == 0.0 and s.chair_i is None and s.mentioned == 0
    with pytest.raises(EvaluateError, match="image 8 has no reference captions"):
        ch.chair({8: "a dog"}, HAND_REFERENCES)
    with pytest.raises(EvaluateError, match="no captions"):
        ch.chair({}, HAND_REFERENCES)


def test_cli_evaluate_writes_chair_to_metrics_json_and_html(small_flickr8k, tmp_path):
    """`capcli evaluate --results` on real Flickr8k references: CHAIR in the JSON, the table and the report."""
    ds = small_flickr8k
    folder = tmp_path / "ds"
    ds.save(folder)
    val = ds.split("val")
    # real captions of other photos (so some objects are hallucinated), and one of the photo's own references
    captions = {r.id: val[(n + 3) % len(val)].captions[0] for n, r in enumerate(val)}
    captions[val[0].id] = val[0].captions[0]
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()]))
    report = tmp_path / "report.html"
    r = CliRunner().invoke(app, ["evaluate", "--results", str(res), "--data", str(folder), "--split", "val",
                                 "--tokenizer", "python", "--out", str(tmp_path / "out"), "--html", str(report)])
    assert r.exit_code == 0, r.output

    expected = ch.chair(captions, ds.references("val"))
    assert expected.mentioned > 0 and 0 < expected.captions_hallucinating < len(val)
    assert val[0].id not in {i for i, x in expected.per_image.items() if x.hallucinated}
    doc = json.loads((tmp_path / "out" / f"metrics_{ds.name}_val.json").read_text())
    assert doc["chair"] == json.loads(json.dumps(expected.to_json()))
    assert doc["chair"]["captions"] == 10 and "CIDEr" in doc["metrics"]

    out = " ".join(r.output.split())
    assert f"CHAIR_s │ {expected.chair_s:.1f}%" in out and f"CHAIR_i │ {expected.chair_i:.1f}%" in out
    assert f"{expected.captions_hallucinating} of 10 captions hallucinate" in out
    top, n = expected.top_hallucinated[0]
    assert f"most often hallucinated: {top} {n}" in out

    page = report.read_text()
    assert f'<th>CHAIR_s</th><td class="score">{expected.chair_s:.1f}%' in page
    badges = re.findall(r'<span class="obj hal"[^>]*>([^<]+)</span>', page)
    assert sorted(badges) == sorted(o for x in expected.per_image.values() for o in x.hallucinated)
