"""Beam search: K = 1 is greedy, and the batched search agrees with a plain one-image-at-a-time reference; every
search path (greedy, beam, constrained, the int8/bf16 twins) writes sound sentences (capcli/fluency.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capcli.captioner import DEFAULT_MODEL
from capcli.checkpoint import load_checkpoint
from capcli.encoders import create_encoder, get_spec
from capcli.errors import UsageError
from capcli.fluency import defects
from capcli.images import load_image
from capcli.models import build
from capcli.models.decoding import Constraints, Decoded, beam_search, block_repeats, greedy, sample
from capcli.models.grammar import Grammar
from capcli.runtime import PRECISIONS, resolve_device, resolve_precision
from capcli.vocab import Vocabulary

START, END = Vocabulary.start_id, Vocabulary.end_id
# The toy models' 300 words are the shipped vocabulary's 300 most frequent ("a", "the", "black", "dogs", ...), so
# the sentence rules have real words to hold them to.
WORDS = Vocabulary.from_dict(load_checkpoint(DEFAULT_MODEL)["vocab"]).words[:300]
GRAMMAR = Grammar.of(WORDS, END)


@pytest.fixture(scope="module")
def real_grids(example_photos) -> torch.Tensor:
    """Lite0 feature grids (B, 49, 1280) of the example photos, each also flipped left to right (B = 10)."""
    spec = get_spec("efficientnet-lite0")
    batch = torch.stack([spec.preprocess(load_image(p)) for p in example_photos])
    batch = torch.cat([batch, batch.flip(3)])
    with torch.inference_mode():
        return create_encoder("efficientnet-lite0")(batch).clone()


# How much to raise <end>'s logit so that captions end at varied lengths (a plain random model almost never
# ends before max_len, so every caption would be cut there).
ENDING = {"attention": 4.5, "basic": 0.8}


def _model(arch: str, ending: bool, seed: int = 0, cell: str = "lstm", cond: str = "first-step",
           feature_dim: int = 1280):
    """A seeded random-init model of small width, with peaky word distributions so beams diverge."""
    torch.manual_seed(seed)
    cfg = {"arch": arch, "vocab_size": 300, "feature_dim": feature_dim, "embed_dim": 32, "hidden_dim": 48,
           "cell": cell}
    cfg.update({"attention_dim": 40} if arch == "attention" else {"condition": cond})
    model = build(cfg).eval()
    out = model.L_o if arch == "attention" else model.out
    with torch.no_grad():
        out.bias[END] += ENDING[arch] if ending else 0.0
        out.weight.mul_(4.0)  # peakier word distributions: beams diverge from greedy
    return model


def allowed(words: list[int], rules: bool) -> torch.Tensor:
    """(V,) bool: the words that may follow ``words`` by fluency.defects itself (the one definition): none that
    makes a defect, and <end> only where the words end soundly."""
    ok = torch.ones(len(WORDS), dtype=torch.bool)
    if rules and words:
        said = [WORDS[w] for w in words]
        for w in range(len(WORDS)):
            broken = defects(said) if w == END else defects([*said, WORDS[w]]) - {"bad_ending"}
            ok[w] = not broken
    return ok


def reference_beam(model, feats: torch.Tensor, K: int, max_len: int, alpha: float, top_k: int,
                   rules: bool = False) -> list[Decoded]:
    """Textbook beam search for ONE image, hypotheses as Python lists, always run to max_len.

    Each step: expand every live hypothesis, sort all candidates by score; an <end> candidate among the K
    best is finished; the K best non-<end> candidates live on. At max_len words the live ones finish as they
    are. Finished ones are ranked by logprob / (number of scored tokens) ** alpha. With ``rules``, a
    hypothesis is expanded only by the words ``allowed`` after it.
    """
    state = model.init_state(feats.unsqueeze(0))
    live = [(0.0, [], state, [])]  # (score, words, state after the last word, alphas)
    finished = []  # (rank score, logprob, words, alphas)
    for _ in range(max_len):
        cands = []
        for score, words, st, alphas in live:
            last = torch.tensor([words[-1] if words else START])
            logp, st2, a = model.step(last, st)
            vals, ids = logp[0].masked_fill(~allowed(words, rules), float("-inf")).topk(K + 1)
            for v, w in zip(vals.tolist(), ids.tolist(), strict=True):
                cands.append((score + v, words, w, st2, alphas + ([a[0]] if a is not None else [])))
        cands.sort(key=lambda c: -c[0])
        for score, words, w, _, alphas in cands[:K]:
            if w == END:
                finished.append((score / (len(words) + 1) ** alpha, score, words, alphas[:-1] if alphas else []))
        live = [(s, words + [w], st2, al) for s, words, w, st2, al in cands if w != END][:K]
    for score, words, _, alphas in live:
        finished.append((score / len(words) ** alpha, score, words, alphas))
    finished.sort(key=lambda f: -f[0])
    return [Decoded(words, lp, torch.stack(al) if al else None) for _, lp, words, al in finished[:top_k]]


@pytest.mark.parametrize("arch", ["attention", "basic"])
@pytest.mark.parametrize(("ending", "rules"), [(False, True), (True, True), (True, False)])
def test_beam_one_equals_greedy(real_grids, arch, ending, rules):
    model = _model(arch, ending)
    feats = model.features_of_kind(real_grids, model.feature_kind)
    opts = {"block_ngram": 3, "grammar": GRAMMAR} if rules else {"block_ngram": 0}
    g = greedy(model, feats, START, END, max_len=12, **opts)
    b = beam_search(model, feats, START, END, beam_size=1, max_len=12, **opts)
    for gd, (bd,) in zip(g, b, strict=True):
        assert bd.tokens == gd.tokens
        assert bd.logprob == pytest.approx(gd.logprob, abs=1e-5)
        if arch == "attention":
            assert bd.alphas.shape == gd.alphas.shape == (len(gd.tokens), 49)
            assert torch.allclose(bd.alphas, gd.alphas, atol=1e-6)
    if ending:  # the <end> bias must really make captions of several lengths, or the test proves little
        assert len({len(d.tokens) for d in g}) > 1


@pytest.mark.parametrize("arch", ["attention", "basic"])
@pytest.mark.parametrize(("K", "alpha", "ending", "rules"), [(3, 0.0, True, True), (5, 0.0, True, True),
                                                             (3, 0.0, False, True), (5, 0.7, True, True),
                                                             (5, 0.0, True, False)])
def test_batched_beam_matches_reference(real_grids, arch, K, alpha, ending, rules):
    """The batched search is the textbook one; with the sentence rules on, the textbook one with
    ``fluency.defects`` itself deciding each hypothesis's next words."""
    model = _model(arch, ending)
    feats = model.features_of_kind(real_grids, model.feature_kind)
    max_len = 10
    opts = {"block_ngram": 3, "grammar": GRAMMAR} if rules else {"block_ngram": 0}
    got = beam_search(model, feats, START, END, beam_size=K, max_len=max_len, length_penalty=alpha, top_k=K,
                      **opts)
    differs = 0
    with torch.no_grad():
        for i in range(feats.size(0)):
            want = reference_beam(model, feats[i], K, max_len, alpha, top_k=K, rules=rules)
            assert [d.tokens for d in got[i]] == [d.tokens for d in want]
            for gd, wd in zip(got[i], want, strict=True):
                assert gd.logprob == pytest.approx(wd.logprob, abs=1e-5)
                if arch == "attention":
                    assert torch.allclose(gd.alphas, wd.alphas, atol=1e-6)
                else:
                    assert gd.alphas is None
            differs += got[i][0].tokens != greedy(model, feats[i : i + 1], START, END, max_len, **opts)[0].tokens
            if alpha == 0.0:  # ranked by raw log-prob, best first
                assert [d.logprob for d in got[i]] == sorted((d.logprob for d in got[i]), reverse=True)
    assert differs > 0  # beam search found captions greedy did not: the beams are meaningful


@pytest.mark.parametrize("arch", ["attention", "basic"])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_top_1_search_stops_early_with_the_same_best_caption(real_grids, arch, alpha):
    """With top_k=1 an image stops once its best finished caption beats every live one: same best caption."""
    model = _model(arch, ending=True)
    feats = model.features_of_kind(real_grids, model.feature_kind)
    best = beam_search(model, feats, START, END, beam_size=4, max_len=10, length_penalty=alpha, top_k=1,
                       grammar=GRAMMAR)
    with torch.no_grad():
        for i in range(feats.size(0)):
            want = reference_beam(model, feats[i], 4, 10, alpha, top_k=1, rules=True)[0]
            assert best[i][0].tokens == want.tokens
            assert best[i][0].logprob == pytest.approx(want.logprob, abs=1e-5)


def _twin_cases() -> list[tuple[str, str, str, str]]:
    """(architecture, cell, conditioning, precision): every model a checkpoint can hold, at every search precision."""
    shapes = [("attention", cell, "-") for cell in ("lstm", "gru", "rnn")]
    shapes += [("basic", cell, cond) for cell in ("lstm", "gru", "rnn") for cond in ("first-step", "init-state")]
    return [(*shape, p) for shape in shapes for p in ("float32", "bfloat16", "int8")]


# What a twin may differ by from its model per step: (log-probs over the whole vocabulary, attention weights).
# float32 regroups the equations only (measured 2e-6, 3e-8); bfloat16 and int8 round the matrix products
# (measured: attention up to 0.08 and 4e-4, basic up to 0.016).
TWIN_BOUNDS = {("attention", "float32"): (1e-5, 1e-6), ("attention", "bfloat16"): (0.2, 2e-3),
               ("attention", "int8"): (0.2, 2e-3), ("basic", "float32"): (1e-5, 0.0),
               ("basic", "bfloat16"): (0.05, 0.0), ("basic", "int8"): (0.05, 0.0)}


@pytest.mark.parametrize(("arch", "cell", "cond", "precision"), _twin_cases())
def test_search_twin_conforms_to_its_model(arch, cell, cond, precision):
    """A search twin (``for_search``) computes its model's equations: stepped along the model's greedy words
    from random grids, its log-probabilities (over the whole vocabulary) and attention weights stay within
    ``TWIN_BOUNDS`` of the model's, so it picks the model's word wherever the model's margin over the runner-up
    exceeds twice that bound; in float32 the beam search over twin and model gives the same captions (top 3).
    Models without a twin (GRU, plain RNN) are searched as they are: ``for_search`` is None."""
    model = _model(arch, ending=True, cell=cell, cond=cond, feature_dim=64)
    twins = [model.for_search(precision)]
    if cell != "lstm":
        assert twins == [None]
        return
    if arch == "attention":  # eq. 4 through e^-u e^-v (used when W_h is small enough), and through σ
        assert twins[0].exp_form
        twins.append(model.for_search(precision))
        twins[1].exp_form = False
    torch.manual_seed(1)
    grids = torch.randn(8, 16, 64).relu_().mul_(2)  # (B, L, D), non-negative like a CNN's
    feats = model.features_of_kind(grids, model.feature_kind)
    d_logp, d_alpha = TWIN_BOUNDS[arch, precision]
    for twin in twins:
        with torch.inference_mode():
            s_model, s_twin = model.init_state(feats), twin.init_state(feats)
            tokens = torch.full((len(feats),), START)
            for _ in range(10):
                logp, s_model, alpha = model.step(tokens, s_model)  # (B, V), (B, L) or None
                logp_twin, s_twin, alpha_twin = twin.step(tokens, s_twin)
                assert logp_twin.dtype == torch.float32 and logp_twin.shape == logp.shape
                assert (logp_twin - logp).abs().max() <= d_logp
                if arch == "attention":
                    assert (alpha_twin - alpha).abs().max() <= d_alpha
                else:
                    assert alpha is None and alpha_twin is None
                tokens = logp.argmax(1)
        if precision == "float32":  # the same search, sentence rules and all
            want = beam_search(model, feats, START, END, beam_size=3, max_len=10, top_k=3, grammar=GRAMMAR)
            got = beam_search(twin, feats, START, END, beam_size=3, max_len=10, top_k=3, grammar=GRAMMAR)
            for w, g in zip(want, got, strict=True):
                assert [d.tokens for d in g] == [d.tokens for d in w]
                assert [d.logprob for d in g] == pytest.approx([d.logprob for d in w], abs=1e-4)
                if arch == "attention":
                    assert all(torch.allclose(gd.alphas, wd.alphas, atol=1e-5) for gd, wd in zip(g, w, strict=True))


def _broken(captions: list[list[int]], max_len: int) -> int:
    """How many captions are broken sentences (one cut at max_len words may end anywhere: judged without it)."""
    return sum(bool(defects([WORDS[w] for w in c]) - ({"bad_ending"} if len(c) == max_len else set()))
               for c in captions)


@pytest.mark.parametrize("arch", ["attention", "basic"])
def test_every_search_path_writes_sound_sentences(real_grids, arch):
    """Greedy, beam, constrained beam, and the bfloat16 / int8 twins' beams: with the rules (the defaults plus the
    vocabulary's grammar) no caption is broken; without them, many are (so the rules are what makes the
    difference)."""
    model = _model(arch, ending=True)
    feats = model.features_of_kind(real_grids, model.feature_kind)
    B, V = feats.size(0), len(WORDS)
    constraints = Constraints.of([[[WORDS.index("dog"), WORDS.index("dogs")]]] * B, [[WORDS.index("red")]] * B, V)
    searchers = [model, model.for_search("bfloat16"), model.for_search("int8")]

    def captions(rules: dict) -> list[list[int]]:
        out = [d.tokens for d in greedy(model, feats, START, END, max_len=12, **rules)]
        for m in searchers:
            out += [h.tokens for hyps in beam_search(m, feats, START, END, beam_size=3, max_len=12, top_k=3,
                                                      **rules) for h in hyps]
        hyps = beam_search(model, feats, START, END, beam_size=3, max_len=12, constraints=constraints, **rules)
        assert all({WORDS.index("dog"), WORDS.index("dogs")} & set(h[0].tokens) for h in hyps)
        return out + [h[0].tokens for h in hyps]

    assert _broken(captions({"block_ngram": 0}), 12) > 0
    assert _broken(captions({"grammar": GRAMMAR}), 12) == 0


def test_a_banned_form_never_says_a_word_to_say(real_grids):
    """A word to say with a banned form ("bicycle": bicycle, bicycles, bicyclist; people banned): a model that
    prefers the banned form above all says the word by another form, never by the banned one; with the banned
    form in the constraint's tokens (built by hand) as well as left out of it (``Constraints.of``)."""
    model = _model("attention", ending=True)
    feats = model.features_of_kind(real_grids, model.feature_kind)
    B, V = feats.size(0), len(WORDS)
    bicycle, bicycles, bicyclist = 150, 151, 152
    with torch.no_grad():
        model.L_o.bias[bicyclist] += 6.0  # the model's favourite word, wherever it may go
    plain = beam_search(model, feats, START, END, beam_size=3, max_len=12)
    assert sum(bicyclist in h[0].tokens for h in plain) > B // 2
    made = Constraints.of([[[bicycle, bicycles, bicyclist]]] * B, [[bicyclist]] * B, V)
    assert not (made.tokens == bicyclist).any()
    by_hand = Constraints(torch.tensor([[[bicycle, bicycles, bicyclist]]] * B), made.banned)
    for cons in (made, by_hand):
        for hyps in beam_search(model, feats, START, END, beam_size=3, max_len=12, top_k=3, constraints=cons):
            assert bicyclist not in hyps[0].tokens and {bicycle, bicycles} & set(hyps[0].tokens)
            assert all(bicyclist not in h.tokens for h in hyps)


def test_a_word_to_say_takes_its_number(real_grids):
    """A word to say ("dog": dog, dogs) in captions of a model that favours "two" and "dog": without the grammar
    the captions say "two dog" and go on as if it were sound ("two dog is"); with it, no caption does, plain or
    constrained, and the constrained ones still say the word."""
    model = _model("attention", ending=True)
    feats = model.features_of_kind(real_grids, model.feature_kind)
    B, V = feats.size(0), len(WORDS)
    two, dog, dogs = (WORDS.index(w) for w in ("two", "dog", "dogs"))
    with torch.no_grad():
        model.L_o.bias[two] += 5.0
        model.L_o.bias[dog] += 5.0
    constraints = Constraints.of([[[dog, dogs]]] * B, [[]] * B, V)

    def number_defects(rules: dict) -> int:
        said = [h[0].tokens for h in beam_search(model, feats, START, END, beam_size=3, max_len=12, **rules)]
        hyps = beam_search(model, feats, START, END, beam_size=3, max_len=12, constraints=constraints, **rules)
        assert all({dog, dogs} & set(h[0].tokens) for h in hyps)
        said += [h[0].tokens for h in hyps]
        return sum("number_singular" in defects([WORDS[w] for w in c]) for c in said)

    assert number_defects({"block_ngram": 3}) > 0
    assert number_defects({"grammar": GRAMMAR}) == 0


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for p in PRECISIONS[1:]:
        assert resolve_precision(p, cpu) == p
    assert resolve_precision("auto", cuda) == "float32"
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    assert (resolve_precision("auto", cpu) == "int8") == vnni
    with pytest.raises(ValueError, match="use one of auto, float32, bfloat16, int8"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="is for CPUs"):
        resolve_precision("int8", cuda)


def test_device_resolution():
    assert resolve_device("cpu") == resolve_device("CPU") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="mps: Apple GPUs are not supported"):
        resolve_device("mps")
    with pytest.raises(UsageError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_beam_arguments():
    model = _model("basic", False)
    feats = torch.randn(2, 1280)
    with pytest.raises(ValueError):
        beam_search(model, feats, START, END, beam_size=2, top_k=3)
    with pytest.raises(ValueError):
        beam_search(model, feats, START, END, beam_size=200)
    out = beam_search(model, feats, START, END, beam_size=4, max_len=3, top_k=4)
    assert [len(o) for o in out] == [4, 4]
    assert all(len(d.tokens) <= 3 for o in out for d in o)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["attention", "basic"])
def test_beam_search_on_cuda_matches_cpu(real_grids, arch):
    model = _model(arch, True)
    feats = model.features_of_kind(real_grids, model.feature_kind)
    cpu = beam_search(model, feats, START, END, beam_size=3, max_len=10, top_k=3)
    gpu = beam_search(model.cuda(), feats.cuda(), START, END, beam_size=3, max_len=10, top_k=3)
    for c, g in zip(cpu, gpu, strict=True):
        assert [d.tokens for d in c] == [d.tokens for d in g]
        assert [d.logprob for d in c] == pytest.approx([d.logprob for d in g], abs=1e-3)


@pytest.mark.parametrize("arch", ["attention", "basic"])
def test_sampled_captions_carry_their_teacher_forced_log_probability(real_grids, arch):
    """sample(): n draws per image, image-major; each total log-prob is what teacher forcing gives that caption,
    and it is differentiable (self-critical training backpropagates through it)."""
    model = _model(arch, ending=True)
    feats = model.features_of_kind(real_grids.clone(), model.feature_kind)  # (not an inference-mode tensor)
    torch.manual_seed(1)
    words, total = sample(model, feats, 3, START, END, max_len=12, banned=(0, START))
    assert len(words) == 3 * len(feats) and total.shape == (3 * len(feats),) and total.requires_grad
    assert len({tuple(w) for w in words}) > len(feats)  # draws differ
    assert all(0 not in w and START not in w and END not in w and len(w) <= 12 for w in words)
    for i, w in enumerate(words):
        caption = torch.tensor([[START, *w] + ([END] if len(w) < 12 else [])])
        logits, _ = model(feats[i // 3: i // 3 + 1], caption, torch.tensor([caption.size(1)]))
        logp = torch.log_softmax(logits[0].float().index_fill(1, torch.tensor([0, START]), float("-inf")), -1)
        forced = logp.gather(1, caption[0, 1:, None]).sum()
        assert torch.allclose(total[i], forced, atol=1e-4), (i, float(total[i]), float(forced))
    total.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("prefix", [
    "a man is riding a bike on a",  # "bike" would say "a bike" again three words on
    "a black and white group of a group",  # "of" would say "group of" again
    "a dog on a rock on a",  # "on a" may come back ("on a hill"), "a rock" may not
    "a dog and a man in a",  # "man" would say "a man" again; "a dog", six words on, is a new phrase
    "two dogs two",
    "a small black and white",  # neither "small", "black" nor "white" again in this noun phrase
    "a black dog and a black",  # "black" may: another noun phrase
    "two dog",  # the number's phrase goes on ("two dog toys") or takes its plural, never "two dog is"
    "the two black and white soccer",
    "two dog brown",  # "and" goes on after a colour, in a number's phrase too
    "two black and one brown",  # but once a phrase
    "three young",  # not "three young three"
    "a black and brown",  # colours joined by "and" once a phrase: not "a black and brown and white hat"
    "a two",  # "a two year old": this number counts nothing
    "a small black and white two",
    "young two",  # this one counts
    "a dog is jumping into the water on a dog",  # not in or on itself: go on ("a dog bed") or not end there
    "a dog on a",
])
def test_the_masks_are_the_definition(prefix):
    """Every search path's masks (repeats, then the grammar) forbid exactly the words after which
    fluency.defects finds a new defect: the masks are derived from the one definition, word for word."""
    ids = [WORDS.index(w) for w in prefix.split()]
    seqs = torch.tensor([ids])
    logp = torch.zeros(1, len(WORDS))
    block_repeats(logp, seqs, 3)
    phrase = torch.zeros(1, dtype=torch.long)
    for i in range(len(ids)):
        phrase = GRAMMAR.advance(phrase, seqs[:, i - 1] if i else None, seqs[:, i])
    GRAMMAR.mask(logp, seqs, phrase)
    assert torch.equal(logp[0].isinf(), ~allowed(ids, rules=True))
