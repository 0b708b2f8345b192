"""capcli evaluate: the numbers must be the COCO caption toolkit's numbers, on real Flickr8k references."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli import evaluate as ev
from capcli import report
from capcli.cli import app
from capcli.errors import EvaluateError, UsageError
from capcli.progress import Progress

requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is needed for the official pipeline")
ALL_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


# ---- real references and deliberately imperfect hypotheses -------------------------------------
@pytest.fixture(scope="module")
def val_refs(flickr8k_dir) -> dict[int, list[str]]:
    """Raw references of the first 40 Flickr8k val images."""
    caps = json.loads((flickr8k_dir / "captions.json").read_text())
    val = json.loads((flickr8k_dir / "splits.json").read_text())["val"][:40]
    ids = {im["id"] for im in caps["images"] if im["file_name"] in set(val)}
    refs: dict[int, list[str]] = {}
    for a in caps["annotations"]:
        if a["image_id"] in ids:
            refs.setdefault(a["image_id"], []).append(a["caption"])
    assert len(refs) == 40
    return refs


def imperfect(refs: dict[int, list[str]]) -> dict[int, str]:
    """Hypotheses that score somewhere between 0 and perfect, and one empty caption."""
    rng = random.Random(0)
    ids = sorted(refs)
    hyps = {}
    for n, i in enumerate(ids):
        ref = refs[i][n % len(refs[i])]
        words = ref.split()
        kind = n % 4
        if kind == 0:  # another image's reference
            hyps[i] = refs[ids[(n + 7) % len(ids)]][0]
        elif kind == 1:  # a truncated reference
            hyps[i] = " ".join(words[: max(2, len(words) // 2)])
        elif kind == 2:  # a word-shuffled reference
            rng.shuffle(words)
            hyps[i] = " ".join(words)
        else:  # a reference with its last words replaced
            hyps[i] = " ".join(words[:-3] + ["on", "a", "sunny", "day"])
    hyps[ids[5]] = ""  # an empty caption must neither hang nor shift other images
    return hyps


def coco_eval_cap(hyps: dict[int, str], refs: dict[int, list[str]], meteor) -> tuple[dict, dict]:
    """pycocoevalcap run directly, as COCOEvalCap.evaluate does (without SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in hyps})
    res = tok.tokenize({i: [{"caption": hyps[i]}] for i in hyps})
    values, per = {}, {i: {} for i in gts}
    for scorer, names in ((Bleu(4), ALL_KEYS[:4]), (meteor, ["METEOR"]), (Rouge(), ["ROUGE-L"]),
                          (Cider(), ["CIDEr"])):
        with contextlib.redirect_stdout(io.StringIO()):
            total, each = scorer.compute_score(gts, res)
        if len(names) == 1:
            total, each = [total], [each]
        for name, t, e in zip(names, total, each, strict=True):
            values[name] = t
            for i, v in zip(gts.keys(), e, strict=True):
                per[i][name] = v
    return values, per


@pytest.fixture(scope="module")
def official(val_refs):
    """capcli's scores and the toolkit's scores on the same captions (one METEOR JVM each)."""
    if shutil.which("java") is None:
        pytest.skip("Java is needed for the official pipeline")
    from pycocoevalcap.meteor.meteor import Meteor

    hyps = imperfect(val_refs)
    meteor = Meteor()  # its JVM loads the paraphrase tables while capcli scores
    ours = ev.score(hyps, val_refs)
    theirs = coco_eval_cap(hyps, val_refs, meteor)
    del meteor
    return hyps, ours, theirs


@requires_java
def test_scores_equal_pycocoevalcap(official, val_refs):
    hyps, ours, (values, per) = official
    assert set(ours.values) == set(ALL_KEYS)
    for key in ALL_KEYS:
        assert ours.values[key] == pytest.approx(values[key], abs=1e-9), key
        assert ours.official[key] is True
    assert set(ours.per_image) == set(val_refs)
    for i in val_refs:
        for key in ALL_KEYS:
            assert ours.per_image[i][key] == pytest.approx(per[i][key], abs=1e-9), (i, key)
    # the hypotheses really are imperfect: neither trivially 0 nor 1
    assert 0.05 < ours.values["BLEU-4"] < 0.9 and 0.1 < ours.values["CIDEr"] < 5
    empty = sorted(val_refs)[5]
    assert hyps[empty] == "" and ours.per_image[empty]["CIDEr"] == 0.0 and ours.per_image[empty]["METEOR"] == 0.0
    assert ours.tokenizer == "ptb"
    assert not ours.skipped


@requires_java
def test_line_breaks_and_separators_do_not_shift_images(official, val_refs):
    """The Java tokenizer splits lines at \\r and U+2028; capcli keeps every caption on its own image."""
    hyps, ours, _ = official
    ids = sorted(val_refs)
    weird = dict(hyps)
    weird[ids[1]] = "a dog\r\nruns\u2028on the ||| grass\x0c"
    weird[ids[2]] = "   "
    got = ev.score(weird, val_refs)  # METEOR's JVM is warm by now
    same = dict(hyps)
    same[ids[1]] = "a dog  runs on the ||| grass"
    same[ids[2]] = ""
    want = ev.score(same, val_refs)
    for i in ids:
        for key in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
            assert got.per_image[i][key] == pytest.approx(want.per_image[i][key], abs=1e-12), (i, key)
    # images other than the edited ones score as before (CIDEr's idf depends on references only)
    for i in ids[3:]:
        assert got.per_image[i]["CIDEr"] == pytest.approx(ours.per_image[i]["CIDEr"], abs=1e-12)
        assert got.per_image[i]["METEOR"] == pytest.approx(ours.per_image[i]["METEOR"], abs=1e-12)


# ---- hand-checkable cases ----------------------------------------------------------------------
HAND_REFS = {
    1: ["a black dog runs across the green grass"] * 3,
    2: ["a woman sings on a stage", "a singer performs"],
    3: ["a boy jumps into a blue swimming pool", "a child is jumping into the water at a pool"],
}
HAND_HYPS = {
    1: "A black dog runs across the green grass.",  # identical to every reference once tokenised
    2: "two cats sleep",  # no word in common
    3: "a boy jumps into the lake",  # 6 words, shorter than the closest reference (8 words)
}


@pytest.mark.parametrize("tokenizer", [pytest.param("java", marks=requires_java), "python"])
def test_hand_checkable_values(tokenizer):
    s = ev.score(HAND_HYPS, HAND_REFS, metrics=("bleu", "rouge", "cider"), tokenizer=tokenizer)
    p = s.per_image
    # 1: every n-gram matches and the length equals the references': BLEU-n = 1, ROUGE-L = 1;
    #    CIDEr-D: identical tf-idf vectors, no length penalty -> 10 * mean(1, 1, 1, 1) = 10.
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert p[1][k] == pytest.approx(1.0, abs=1e-9)
    assert p[1]["ROUGE-L"] == 1.0
    assert p[1]["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    # 2: no overlap at all
    assert p[2]["BLEU-1"] < 1e-9 and p[2]["BLEU-4"] < 1e-9
    assert p[2]["ROUGE-L"] == 0.0 and p[2]["CIDEr"] == 0.0
    # 3: clipped unigram precision 5/6 ("lake" is in no reference); closest reference length 8 > 6,
    #    so the brevity penalty is exp(1 - 8/6).
    bp = math.exp(1 - 8 / 6)
    assert p[3]["BLEU-1"] == pytest.approx(bp * 5 / 6, rel=1e-8)
    # ROUGE-L: LCS "a boy jumps into" with ref 1 (P 4/6, R 4/8); best recall/precision over refs.
    prec, rec, beta = 4 / 6, 4 / 8, 1.2
    assert p[3]["ROUGE-L"] == pytest.approx((1 + beta**2) * prec * rec / (rec + beta**2 * prec), abs=1e-12)
    # corpus BLEU-1 pools counts: correct 8+0+5, guessed 8+3+6, reference lengths 8+3+8.
    assert s.values["BLEU-1"] == pytest.approx(13 / 17 * math.exp(1 - 19 / 17), rel=1e-8)
    assert s.values["ROUGE-L"] == pytest.approx((1 + 0 + p[3]["ROUGE-L"]) / 3, abs=1e-12)
    assert s.values["CIDEr"] == pytest.approx((10 + 0 + p[3]["CIDEr"]) / 3, abs=1e-9)


def test_python_tokenizer_fallback_is_flagged_approximate(val_refs):
    hyps = imperfect(val_refs)
    s = ev.score(hyps, val_refs, metrics=("bleu", "meteor", "rouge", "cider", "spice"), tokenizer="python")
    assert s.tokenizer == "python"
    assert set(s.values) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert not any(s.official.values())
    assert "METEOR" in s.skipped and "SPICE" in s.skipped
    text = "\n".join(s.notes)
    assert "approximate" in text and "METEOR skipped" in text and "SPICE" in text
    assert 0.05 < s.values["BLEU-4"] < 0.9
    # the same toolkit scorers run: with plain captions the numbers agree closely with the official ones
    if shutil.which("java"):
        java = ev.score(hyps, val_refs, metrics=("bleu", "cider"), tokenizer="java")
        assert s.values["BLEU-4"] == pytest.approx(java.values["BLEU-4"], abs=5e-3)
        assert s.values["CIDEr"] == pytest.approx(java.values["CIDEr"], abs=5e-2)


def test_spice_is_skipped_with_one_reason_unless_installed():
    ok, why = ev.spice_status()
    if ok:
        pytest.skip("SPICE's CoreNLP models are installed here")
    phases: list[str] = []

    class Phases(Progress):
        def start(self, description: str, total: int | None = None, unit: str = "img") -> None:
            phases.append(description)

    s = ev.score(HAND_HYPS, HAND_REFS, metrics=("bleu", "meteor", "spice"), tokenizer="python", progress=Phases())
    assert "SPICE" not in s.values
    assert phases == ["scoring BLEU"]  # the skipped metrics are not announced
    spice_notes = [n for n in s.notes if n.startswith("SPICE skipped")]
    assert len(spice_notes) == 1 and "CoreNLP" in spice_notes[0] and "\n" not in spice_notes[0]


def test_score_rejects_bad_arguments():
    with pytest.raises(EvaluateError, match="no reference captions"):
        ev.score({1: "a dog", 9: "a cat"}, {1: ["a dog"]}, metrics=("bleu",))
    with pytest.raises(EvaluateError, match="unknown metric 'bleurt'"):
        ev.score({1: "a dog"}, {1: ["a dog"]}, metrics=("bleurt",))
    with pytest.raises(EvaluateError, match="no captions to score"):
        ev.score({}, {1: ["a dog"]})


# ---- results files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds_dir(small_flickr8k, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("evalds")
    small_flickr8k.save(folder)
    return folder


def write(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def good_results(ds) -> list[dict]:
    val = ds.split("val")
    # a real but imperfect caption: the reference of the next image
    return [{"image_id": r.id, "caption": val[(n + 1) % len(val)].captions[0]} for n, r in enumerate(val)]


def bad_files(ds, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (results file, expected error text)."""
    good = good_results(ds)
    train_id = ds.split("train")[0].id
    return {
        "bad-json": (write(tmp / "bad.json", '[{"image_id": 1, "caption": "a dog"'), "not valid JSON"),
        "not-list": (write(tmp / "obj.json", {"image_id": 1, "caption": "x"}), "expected a COCO results list"),
        "not-objects": (write(tmp / "strs.json", ["a dog", "a cat"]), "entry 0 is not an object"),
        "unknown": (write(tmp / "unknown.json", [*good, {"image_id": 99999991, "caption": "x"},
                                                 {"image_id": train_id, "caption": "y"}]),
                    f"2 image id(s) are not in split 'val' of {ds.name} (e.g. {min(train_id, 99999991)}, "),
        "missing": (write(tmp / "missing.json", good[3:]), "3 of the 10 images of split 'val' have no caption"),
        "duplicate": (write(tmp / "dup.json", [*good, good[4]]), f"appear more than once (e.g. {good[4]['image_id']})"),
    }


def test_load_results_errors(small_flickr8k, tmp_path):
    ds = small_flickr8k
    for name, (path, expected) in bad_files(ds, tmp_path).items():
        with pytest.raises(EvaluateError) as e:
            ev.load_results(path, ds, "val")
        assert expected in str(e.value), name
        assert "\n" not in str(e.value)
    with pytest.raises(EvaluateError, match="results file not found"):
        ev.load_results(tmp_path / "nope.json", ds, "val")
    got = ev.load_results(write(tmp_path / "ok.json", good_results(ds)), ds, "val")
    assert sorted(got) == sorted(r.id for r in ds.split("val"))
    subset = ev.load_results(tmp_path / "missing.json", ds, "val", allow_missing=True)
    assert len(subset) == 7


def test_cli_errors_are_one_line(ds_dir, small_flickr8k, tmp_path):
    runner = CliRunner()
    for name, (path, expected) in bad_files(small_flickr8k, tmp_path).items():
        r = runner.invoke(app, ["evaluate", "--results", str(path), "--data", str(ds_dir), "--split", "val"])
        assert r.exit_code != 0, name
        assert "Traceback" not in r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, r.output)
        assert expected.split(" (e.g.")[0] in " ".join(r.output.split()), (name, r.output)
    r = runner.invoke(app, ["evaluate", "--results", str(tmp_path / "dup.json"), "--data", "no-such-dataset"])
    assert r.exit_code != 0 and "no prepared dataset 'no-such-dataset'" in r.output


def test_cli_scores_results_file_and_writes_html(ds_dir, small_flickr8k, tmp_path, monkeypatch):
    ds = small_flickr8k
    res = write(tmp_path / "res.json", good_results(ds))
    report = tmp_path / "moved" / "report.html"
    # --data by name, from the data root
    monkeypatch.setenv("CAPCLI_HOME", str(tmp_path / "home"))
    ds.save(tmp_path / "home" / "datasets" / "f8k-small")
    r = CliRunner().invoke(app, ["evaluate", "--results", str(res), "--data", "f8k-small", "--split", "val",
                                 "--out", str(tmp_path / "out"), "--html", str(report)])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    java = shutil.which("java") is not None
    assert "BLEU-4" in out and "CIDEr" in out and ("official" if java else "approximate") in out
    assert "SPICE skipped" in out or ev.spice_status()[0]
    doc = json.loads((tmp_path / "out" / "metrics_f8k-small_val.json").read_text())
    assert doc["split"] == "val" and doc["n_images"] == 10 and doc["results"] == str(res)
    assert set(doc["metrics"]) >= {"BLEU-4", "ROUGE-L", "CIDEr"} and doc["official"]["CIDEr"] is java
    # the table in percent, one decimal (as the README and the papers); the JSON in 0..1
    assert "score (%)" in out and re.search(rf"BLEU-1 │ {100 * doc['metrics']['BLEU-1']:.1f} │", out), out
    assert 0 < doc["metrics"]["BLEU-4"] <= 1
    assert ("METEOR" in doc["metrics"]) is java

    page = report.read_text()
    for entry in good_results(ds):
        from html import escape

        assert escape(entry["caption"]) in page
        assert f'data-id="{entry["image_id"]}"' in page
    assert page.count('src="data:image/jpeg;base64,') == 10
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert attr.startswith(("data:", "#")), attr
    assert "<link" not in page and "url(" not in page
    # worst first: the rows' CIDEr values never decrease down the page
    rows = re.findall(r"<b>CIDEr (\d+\.\d+)</b>", page)
    assert len(rows) == 10 and [float(x) for x in rows] == sorted(float(x) for x in rows)
    assert 'id="worst"' in page and 'id="best"' in page


def test_cli_allow_missing_scores_subset(ds_dir, small_flickr8k, tmp_path):
    res = write(tmp_path / "part.json", good_results(small_flickr8k)[3:])
    r = CliRunner().invoke(app, ["evaluate", "--results", str(res), "--data", str(ds_dir), "--allow-missing",
                                 "--tokenizer", "python"])
    assert r.exit_code == 0, r.output
    assert "scored 7 of the 10 images" in " ".join(r.output.split())
    doc = json.loads((tmp_path / "part.metrics.json").read_text())
    assert doc["n_images"] == 7


def test_run_is_the_cli_as_a_call(ds_dir, small_flickr8k, tmp_path):
    """evaluate.run: the CLI's option rules and output names, and what the CLI prints, for a Python caller."""
    res = write(tmp_path / "res.json", good_results(small_flickr8k))
    with pytest.raises(UsageError, match="not both"):
        ev.run(ds_dir, "model.pt", results=res)
    with pytest.raises(UsageError, match="--allow-missing goes with --results"):
        ev.run(ds_dir, allow_missing=True)
    with pytest.raises(UsageError, match="--data is required"):
        ev.run("", results=res)
    with pytest.raises(UsageError, match="--beam, --grounding set how a checkpoint is captioned"):
        ev.run(ds_dir, results=res, beam=5, grounding="off")  # would do nothing: said, not ignored
    done = ev.run(ds_dir, results=res, tokenizer="python", html=tmp_path / "r.html")
    assert done.split == "val" and done.dataset.name == small_flickr8k.name and len(done.captions) == 10
    assert done.written == [tmp_path / "res.metrics.json", tmp_path / "r.html"]
    assert all(p.is_file() for p in done.written)
    doc = json.loads(done.written[0].read_text())
    assert doc["metrics"] == {k: done.scores.values[k] for k in ev.METRIC_KEYS if k in done.scores.values}
    r = CliRunner().invoke(app, ["evaluate", "--results", str(res), "--data", str(ds_dir), "--tokenizer", "python"])
    assert r.exit_code == 0, r.output
    assert json.loads(done.written[0].read_text())["metrics"] == doc["metrics"]  # the CLI wrote the same numbers
    assert re.search(rf"CIDEr\s*│\s*{100 * done.scores.values['CIDEr']:.1f}", r.output), r.output  # in percent


def test_html_report_never_replaces_the_results_or_a_file_capcli_did_not_write(ds_dir, small_flickr8k, tmp_path):
    res = write(tmp_path / "res.json", good_results(small_flickr8k))
    mine = write(tmp_path / "mine.html", "<p>a page a person wrote</p>\n")
    kept = {p: p.read_bytes() for p in (res, mine)}
    for target, message in ((res, "is the --results file"), (mine, "is not a page capcli wrote")):
        r = CliRunner().invoke(app, ["evaluate", "--results", str(res), "--data", str(ds_dir), "--tokenizer",
                                     "python", "--html", str(target)])
        assert r.exit_code == 2 and r.output.startswith("error: --html") and message in r.output, r.output
    assert {p: p.read_bytes() for p in kept} == kept and not (tmp_path / "res.metrics.json").exists()
    for _ in range(2):  # its own report is replaced on a rerun
        done = ev.run(ds_dir, results=res, tokenizer="python", html=tmp_path / "r.html")
        assert done.written[-1] == tmp_path / "r.html" and 'data-id="' in done.written[-1].read_text()


def test_html_escapes_captions(small_flickr8k, tmp_path):
    ds = small_flickr8k
    val = ds.split("val")[:2]
    results = {val[0].id: '<script>alert("x")</script> & a dog', val[1].id: "a dog"}
    s = ev.score(results, ds.references("val"), metrics=("bleu", "cider"), tokenizer="python")
    page = report.write_html(tmp_path / "r.html", ds, results, s, "val").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a dog" in page
    # scores in percent with one decimal, as the terminal's table shows them
    assert f'<th>CIDEr</th><td class="score">{100 * s.values["CIDEr"]:.1f}</td>' in page


def test_write_results_and_metrics(tmp_path):
    s = ev.score(HAND_HYPS, HAND_REFS, metrics=("bleu", "cider"), tokenizer="python")
    p = ev.write_results(tmp_path / "r.json", {3: "c", 1: "a", 2: "b"})
    assert json.loads(p.read_text()) == [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"},
                                         {"image_id": 3, "caption": "c"}]
    m = json.loads(ev.write_metrics(tmp_path / "m.json", s, "val", 3, checkpoint="x.pt", beam=3).read_text())
    assert m["metrics"]["CIDEr"] == s.values["CIDEr"] and m["checkpoint"] == "x.pt" and m["beam"] == 3
    assert m["n_images"] == 3 and m["official"]["BLEU-4"] is False and m["notes"] == s.notes


# ---- the watchdog: a METEOR that does not answer is skipped, never waited on forever ------------
@requires_java
def test_meteor_watchdog_skips_instead_of_hanging():
    ev.close_meteor()  # a cold JVM cannot answer within a millisecond
    s = ev.score(HAND_HYPS, HAND_REFS, metrics=("bleu", "meteor"), meteor_timeout=0.001)
    assert "METEOR" not in s.values and "BLEU-4" in s.values
    assert any(n.startswith("METEOR skipped: METEOR failed") for n in s.notes)
    ev.close_meteor()


# ---- captioning a split with a checkpoint ------------------------------------------------------
@pytest.fixture(scope="module")
def untrained_checkpoint(small_flickr8k, tmp_path_factory) -> Path:
    """A real (small, untrained, seeded) Show and Tell checkpoint: enough to drive the whole pipeline."""
    import torch

    import capcli.captioner  # noqa: F401  (evaluate_checkpoint captions with it: an import error fails, never skips)
    from capcli.checkpoint import save_checkpoint
    from capcli.encoders import DEFAULT_ENCODER, get_spec
    from capcli.models import build
    from capcli.vocab import Vocabulary

    spec = get_spec(DEFAULT_ENCODER)
    vocab = Vocabulary.build([c for r in small_flickr8k.split("train") for c in r.captions], min_count=2)
    torch.manual_seed(0)
    model = build({"arch": "basic", "vocab_size": len(vocab), "feature_dim": spec.feature_dim,
                   "embed_dim": 32, "hidden_dim": 32})
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, {"config": model.config_dict(), "vocab": vocab.to_dict(), "encoder": spec.to_dict(),
                           "model": model.state_dict()})
    return path


def test_cli_evaluates_a_checkpoint_on_every_image_of_the_split(untrained_checkpoint, small_flickr8k, ds_dir,
                                                                 tmp_path):
    ds = small_flickr8k
    r = CliRunner().invoke(app, ["evaluate", str(untrained_checkpoint), "--data", str(ds_dir), "--beam", "2",
                                 "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path),
                                 "--tokenizer", "python"])
    assert r.exit_code == 0, r.output
    val_ids = sorted(r.id for r in ds.split("val"))
    written = json.loads((tmp_path / f"results_{ds.name}_val_beam2.json").read_text())
    assert [e["image_id"] for e in written] == val_ids
    assert all(isinstance(e["caption"], str) and e["caption"] for e in written)
    doc = json.loads((tmp_path / f"metrics_{ds.name}_val_beam2.json").read_text())
    assert doc["checkpoint"] == str(untrained_checkpoint) and doc["beam"] == 2 and doc["n_images"] == 10
    # the metrics are those of the captions written
    again = ev.score({e["image_id"]: e["caption"] for e in written}, ds.references("val"),
                     metrics=("bleu", "rouge", "cider"), tokenizer="python")
    assert {k: doc["metrics"][k] for k in again.values} == again.values


def test_evaluate_checkpoint_leaves_out_unreadable_images_with_a_note(untrained_checkpoint, small_flickr8k, tmp_path):
    from capcli.layout import Dataset, ImageRecord

    val = small_flickr8k.split("val")
    images = tmp_path / "images"
    images.mkdir()
    for r in val:
        shutil.copy(small_flickr8k.path(r), images / r.file)
    (images / val[3].file).write_bytes(b"not a jpeg at all")
    ds = Dataset("broken", images, [ImageRecord(r.id, r.file, r.split, r.captions) for r in val])
    results, scores = ev.evaluate_checkpoint(untrained_checkpoint, ds, "val", beam_size=2, batch_size=4,
                                             device="cpu", metrics=("bleu", "cider"), workers=0)
    assert sorted(results) == sorted(r.id for r in val if r.id != val[3].id)
    assert scores.notes[0].startswith(f"1 of the 10 images could not be read and were left out (first: {val[3].file}")
    assert set(scores.per_image) == set(results)
    assert scores.values == ev.score(results, ds.references("val"), metrics=("bleu", "cider")).values
    assert scores.chair is not None and set(scores.chair.per_image) == set(results)  # CHAIR on the same captions
