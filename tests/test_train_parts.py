"""The training loop's parts, each against a hand computation or an independent path: the losses (label
smoothing, the doubly stochastic regulariser), the learning-rate schedules, best/patience selection, teacher forcing
against step-by-step decoding for every cell and conditioning, DDP ranks ending equal, and the one source of the
training options. Tiny models on random tensors: no data files needed.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capcli.config import ARCHS, CELLS, CONDITIONS, TrainConfig
from capcli.models import build
from capcli.train import ce_loss, select
from capcli.train.model import Net, configure_optimizers
from capcli.train.run import RunState

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(arch: str = "attention", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"arch": arch, "vocab_size": 11, "feature_dim": 6, "embed_dim": 8, "hidden_dim": 7, "dropout": 0.0,
           "cell": "lstm", **({"attention_dim": 5} if arch == "attention" else {"condition": "first-step"}), **kw}
    return build(cfg).eval()


def features_for(model: torch.nn.Module, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (batch, 4, 6) if model.feature_kind == "grid" else (batch, 6)
    return torch.randn(*shape, generator=g)


# ---- losses --------------------------------------------------------------------------------------


def test_label_smoothing_loss_is_the_hand_computed_mixture():
    """(1 - ε) · (-log p_y) + ε · mean_v(-log p_v), averaged over the real (non-<pad>) next words."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    tokens = torch.tensor([[1, 4, 2, 3], [1, 2, 0, 0]])  # the second caption: one word to predict, then <pad>
    eps = 0.1
    loss, ce = ce_loss(None, logits, None, tokens, pad_id=0, label_smoothing=eps, alpha_c=1.0)
    terms = []
    for b in range(2):
        for t in range(3):
            y = int(tokens[b, t + 1])
            if y == 0:
                continue
            logp = [math.log(math.exp(v) / sum(math.exp(u) for u in logits[b, t].tolist()))
                    for v in logits[b, t].tolist()]
            terms.append((1 - eps) * -logp[y] + eps * -sum(logp) / len(logp))
    assert len(terms) == 4
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert ce is loss  # no attention: the loss is the cross-entropy
    plain, _ = ce_loss(None, logits, None, tokens, pad_id=0, label_smoothing=0.0, alpha_c=1.0)
    assert plain.item() != pytest.approx(loss.item(), rel=1e-3)


def test_doubly_stochastic_regulariser_is_eq_14():
    """λ Σ_i (1 - Σ_t α_ti)^2, averaged over the captions, added to the cross-entropy by ce_loss."""
    model = tiny_model("attention")
    alphas = torch.tensor([[[0.75, 0.25], [0.5, 0.5]],  # Σ_t α = (1.25, 0.75): 0.0625 + 0.0625 = 0.125
                           [[1.0, 0.0], [0.0, 0.0]]])  # one real step, then padding: Σ_t α = (1, 0): 0 + 1 = 1
    assert model.regularizer(alphas).item() == pytest.approx((0.125 + 1.0) / 2)
    logits = torch.zeros(2, 2, 11)
    tokens = torch.tensor([[1, 5, 2], [1, 2, 0]])
    loss, ce = ce_loss(model, logits, alphas, tokens, pad_id=0, label_smoothing=0.0, alpha_c=2.0)
    assert ce.item() == pytest.approx(math.log(11))  # uniform logits
    assert (loss - ce).item() == pytest.approx(2.0 * 0.5625)
    off, _ = ce_loss(model, logits, alphas, tokens, pad_id=0, label_smoothing=0.0, alpha_c=0.0)
    assert off.item() == pytest.approx(ce.item())


def test_attention_weights_are_zero_on_padding_and_sum_to_one_on_words():
    """What eq. 14 relies on: the teacher-forced α (B, T-1, L) covers the real steps only."""
    model = tiny_model("attention")
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0], [1, 2, 0, 0, 0]])
    lengths = torch.tensor([5, 3, 2])
    _, alphas = model(features_for(model), tokens, lengths)
    for b, n in enumerate((lengths - 1).tolist()):
        assert torch.allclose(alphas[b, :n].sum(-1), torch.ones(n), atol=1e-6)
        assert torch.all(alphas[b, n:] == 0)


# ---- teacher forcing == step-by-step decoding ----------------------------------------------------


@pytest.mark.parametrize(("arch", "cell", "condition"), [
    ("basic", "lstm", "first-step"), ("basic", "gru", "first-step"), ("basic", "rnn", "first-step"),
    ("basic", "lstm", "init-state"), ("basic", "gru", "init-state"), ("basic", "rnn", "init-state"),
    ("attention", "lstm", None), ("attention", "gru", None), ("attention", "rnn", None)])
def test_teacher_forcing_equals_step_by_step_decoding(arch, cell, condition):
    """forward()'s log-probs for each next word are those of init_state() and repeated step() calls fed the
    same words: training and decoding run one model."""
    model = tiny_model(arch, cell=cell, **({"condition": condition} if condition else {}))
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0], [1, 10, 2, 0, 0]])
    lengths = torch.tensor([5, 4, 3])
    feats = features_for(model)
    with torch.no_grad():
        logits, _ = model(feats, tokens, lengths)
        state = model.init_state(feats)
        for t in range(tokens.size(1) - 1):
            logp, state, _ = model.step(tokens[:, t], state)
            real = lengths - 1 > t
            expected = torch.log_softmax(logits[:, t].float(), -1)
            assert torch.allclose(logp[real], expected[real], atol=1e-5), t


@pytest.mark.parametrize("cell", CELLS)
def test_init_state_conditioning_sets_the_rnn_state_from_the_image(cell):
    """Show and Tell with --condition init-state: h_0 = tanh(W_h f) (and c_0 = tanh(W_c f) for an LSTM), no image
    input step; the image changes every word's distribution."""
    model = tiny_model("basic", cell=cell, condition="init-state")
    assert not hasattr(model, "image_embed")
    f = features_for(model)
    state = model.init_state(f)
    h0 = torch.tanh(f @ model.init_h.weight.T + model.init_h.bias)
    assert torch.allclose(state[0][:, 0], h0, atol=1e-6)
    if cell == "lstm":
        assert torch.allclose(state[1][:, 0], torch.tanh(f @ model.init_c.weight.T + model.init_c.bias), atol=1e-6)
    else:
        assert len(state) == 1
    tokens = torch.tensor([[1, 5, 6, 2]] * 3)
    with torch.no_grad():
        logits, _ = model(f, tokens, torch.tensor([4, 4, 4]))
    for t in range(3):  # same words, different images -> different predictions at every step
        assert not torch.allclose(logits[0, t], logits[1, t], atol=1e-4)


# ---- learning-rate schedules and selection -------------------------------------------------------


def _optim(schedule: str, **kw):
    model = tiny_model("basic")
    cfg = TrainConfig(arch="basic", lr=1e-2, schedule=schedule, **kw)
    return configure_optimizers(cfg, Net(model, None, model, None), steps_per_epoch=5, device=torch.device("cpu"))


def _lr(opt) -> float:
    return opt.optimizer.param_groups[0]["lr"]


def test_cosine_schedule_decays_per_step_to_zero_over_the_run():
    opt = _optim("cosine", epochs=2)  # 2 epochs x 5 steps
    lrs = []
    for _ in range(10):
        opt.optimizer.step()
        opt.scheduler.step()
        lrs.append(_lr(opt))
    assert lrs == pytest.approx([1e-2 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(1, 11)], abs=1e-12)
    capped = _optim("cosine", epochs=2, max_steps=4)  # --max-steps shortens the decay
    for _ in range(4):
        capped.optimizer.step()
        capped.scheduler.step()
    assert _lr(capped) == pytest.approx(0.0, abs=1e-12)


def test_plateau_schedule_halves_after_two_validations_without_improvement():
    opt = _optim("plateau")
    lrs = []
    for value in (0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3):
        opt.scheduler.step(value)
        lrs.append(_lr(opt))
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3, 2.5e-3])


def test_no_schedule_keeps_the_learning_rate():
    opt = _optim("none")
    assert opt.scheduler is None
    for _ in range(3):
        opt.optimizer.step()
    assert _lr(opt) == 1e-2


def test_select_keeps_the_best_and_stops_after_patience_epochs():
    state, seen = RunState(), []
    for value in (0.3, 0.5, 0.4, 0.5, 0.2):
        chosen = select(state, value, patience=3)
        state.best, state.best_epoch, state.bad_epochs, state.stopped_early = chosen
        state.epoch += 1
        seen.append((chosen.improved, chosen.best_epoch, chosen.bad_epochs, chosen.stop))
    assert seen == [(True, 1, 0, False), (True, 2, 0, False), (False, 2, 1, False), (False, 2, 2, False),
                    (False, 2, 3, True)]  # a tie (0.5) is no improvement
    assert state.best == 0.5
    assert not select(RunState(bad_epochs=50), -1.0, patience=0).stop  # 0: never stop


# ---- several processes ---------------------------------------------------------------------------


def test_ddp_ranks_end_with_identical_weights(tmp_path):
    """Two gloo processes on the CPU train one epoch on different captions with different dropout masks; the
    averaged gradients leave both with the same weights, and not the initial ones."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "ddp_rank.py"), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:  # a rank left waiting for its peer
                p.kill()
                p.wait()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    initial = torch.load(tmp_path / "initial.pt")
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3  # 24 captions, 12 a rank, batches of 4
    assert ranks[0]["loss_sum"] != ranks[1]["loss_sum"]  # each rank saw its own captions
    for k, v in ranks[0]["model"].items():
        assert torch.equal(v, ranks[1]["model"][k]), k
    assert not torch.equal(ranks[0]["model"]["L_o.weight"], initial["L_o.weight"])


# ---- one source for the options; short functions -------------------------------------------------


def test_choices_match_the_models():
    from capcli.models import ARCHS as REGISTRY
    from capcli.models import _load_builtin, show_attend_tell, show_tell

    _load_builtin()
    assert set(REGISTRY) == set(ARCHS)
    assert tuple(show_tell.CELLS) == tuple(show_attend_tell.CELLS) == CELLS
    for condition in CONDITIONS:
        tiny_model("basic", condition=condition)
    with pytest.raises(ValueError, match="condition"):
        tiny_model("basic", condition="every-step")


def test_training_code_has_no_function_over_80_lines():
    spec = importlib.util.spec_from_file_location("longest_functions", ROOT / "scripts" / "longest_functions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lengths = module.function_lengths(ROOT / "capcli")
    train = [(n, where) for n, where in lengths if where.startswith(("capcli/train/", "capcli/config.py"))]
    assert len(train) > 40  # the package was found and read
    too_long = [f"{where} ({n} lines)" for n, where in train if n > 80]
    assert not too_long, too_long
    assert module.main(["--under", "capcli/train/", "--top", "1", "--max", "80"]) == 0


# cli.train_cmd is being shortened on another branch (issue #16's rough edges); drop it from here once merged
LONG_FOR_NOW = {("capcli/cli.py", "train_cmd")}


def test_no_function_in_capcli_is_over_80_lines():
    spec = importlib.util.spec_from_file_location("longest_functions", ROOT / "scripts" / "longest_functions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lengths = module.function_lengths(ROOT / "capcli")
    assert len(lengths) > 400  # the whole package was found and read
    too_long = [f"{where} ({n} lines)" for n, where in lengths
                if n > 80 and (where.split(":")[0], where.split(" ")[1]) not in LONG_FOR_NOW]
    assert not too_long, too_long
