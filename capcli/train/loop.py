"""The training loop: :func:`train`, a plain loop of named stages over one :class:`RunContext` (see
:mod:`capcli.train`): set up, then per epoch train, validate, select, log and save."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SELECT, TrainConfig, check_config, merge_init_from
from ..errors import CheckpointError
from ..progress import NULL, Progress
from ..vocab import Vocabulary
from .data import Data, epoch_order, load_data
from .distributed import Dist
from .model import Net, Optim, build_model, configure_optimizers, steps_per_epoch
from .run import RunContext, RunLog, RunState, TornUpdate, checkpoint_of, open_run, resume_state
from .sources import model_input


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    best_metrics: dict[str, Any]
    epochs_run: int
    out: Path = Path()
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)


def train(cfg: TrainConfig, progress: Progress = NULL) -> TrainResult:
    """Train a captioning model as ``cfg`` says; see :mod:`capcli.train`. Returns where the checkpoints are."""
    check_config(cfg)
    dist = Dist.setup(cfg.device)
    try:
        result = _train(cfg, dist, progress if dist.main else NULL)
        dist.barrier()  # leave together: a rank tearing down gloo while rank 0 still saves can abort the peer
        return result
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Dist, progress: Progress) -> TrainResult:
    """Set up, then run epochs until done. Ctrl-C saves a resumable last.pt on the way out."""
    ctx = setup(cfg, dist, progress)
    epochs_before = ctx.state.epoch
    try:
        with ctx.stop:
            while not _finished(ctx):
                run_epoch(ctx)
    except KeyboardInterrupt as e:
        progress.done()
        if dist.main:
            _save_interrupted(e, ctx)
        raise
    return _finish(ctx, epochs_before)


def setup(cfg: TrainConfig, dist: Dist, progress: Progress) -> RunContext:
    """The run folder (new, or resumed from its last.pt), the data, the model, its optimiser, where the run stands
    and its log."""
    run = open_run(cfg, dist, progress)
    cfg, files = run.cfg, run.files
    data = load_data(cfg, run.ds, run.resumed, dist, progress)
    if data.start is not None and run.resumed is None:  # --init-from: its model, recorded as such
        cfg = merge_init_from(cfg, data.start.config, progress)
    net = build_model(cfg, data, run.resumed, files.last, dist, progress)
    opt = configure_optimizers(cfg, net, steps_per_epoch(len(data.caps), cfg.batch_size, dist.world), dist.device)
    state = resume_state(run.resumed, opt, files, progress) if run.resumed is not None else RunState()
    log = RunLog(files, progress)
    if dist.main:
        log.start(state.epoch if run.resumed is not None else None)
    ctx = RunContext(cfg, files, data, net, opt, state, dist, log, progress)
    _announce(ctx)
    return ctx


def run_epoch(ctx: RunContext) -> None:
    """One epoch: train, validate (rank 0), select, then log and save (rank 0)."""
    cfg, state, dist = ctx.cfg, ctx.state, ctx.dist
    t0 = time.perf_counter()
    trained = train_epoch(ctx)
    train_seconds = time.perf_counter() - t0
    ctx.progress.done()
    train_loss = dist.mean(state.loss_sum / max(state.loss_batches, 1))
    train_ce = dist.mean(state.ce_sum / max(state.loss_batches, 1))
    scores = validate(ctx) if dist.main else {}
    improved = _choose(ctx, scores)
    lr = ctx.opt.optimizer.param_groups[0]["lr"]
    state.epoch, state.batch = state.epoch + 1, 0
    row = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss,
           "train_reward" if cfg.scst else "train_ce": train_ce,
           **({} if cfg.scst else {"train_reg": train_loss - train_ce}),
           **{f"val_{k}": v for k, v in scores.items()}, "lr": lr,
           "captions_per_s": trained * dist.world / max(train_seconds, 1e-9),
           "seconds": time.perf_counter() - t0}
    state.loss_sum, state.ce_sum, state.loss_batches = 0.0, 0.0, 0
    if dist.main:
        ctx.log.append(row)
        _save_epoch(ctx, row, scores, improved)
        ctx.log.draw()
        _report(ctx, row, improved)
    dist.barrier()


def _finished(ctx: RunContext) -> bool:
    state = ctx.state
    return state.epoch >= ctx.cfg.epochs or state.stopped_early or _steps_done(ctx.cfg, state)


def _finish(ctx: RunContext, epochs_before: int) -> TrainResult:
    """The final curves and the result (rank 0: an error when no epoch was ever validated)."""
    files, state, main = ctx.files, ctx.state, ctx.dist.main
    if main and files.metrics.is_file() and state.epoch > epochs_before:
        ctx.log.draw(force=True)
    if main and not files.best.is_file():
        raise CheckpointError(f"training ended before any validation, so there is no {files.best}")
    return TrainResult(files.best, files.last, state.best_metrics if main else {}, state.epoch, out=files.out,
                       stopped_early=bool(state.stopped_early),
                       notes=[] if state.epoch > epochs_before else ["nothing to do: the run had already finished"])


def _steps_done(cfg: TrainConfig, state: RunState) -> bool:
    return cfg.max_steps is not None and state.step >= cfg.max_steps


def _announce(ctx: RunContext) -> None:
    cfg, data, dist = ctx.cfg, ctx.data, ctx.dist
    source = f"fine-tuning {data.spec.name}" if ctx.net.encoder is not None else f"{data.spec.name} features"
    amp = " (bf16 autocast)" if _use_amp(cfg, dist.device) else ""
    ctx.progress.info(
        f"training {cfg.arch} on {data.ds.name}: {len(data.train_recs)} images, "
        f"{f'self-critical, {cfg.scst_samples} samples each' if cfg.scst else f'{len(data.caps)} captions'}, "
        f"validating on {len(data.val_recs)} {cfg.val_split} images; {source}; device {dist.device}{amp}"
        f"{f', {dist.world} processes' if dist.world > 1 else ''}; run folder {ctx.files.out}")


def _use_amp(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.amp and device.type == "cuda"


def autocast(cfg: TrainConfig, device: torch.device) -> Any:
    """bfloat16 autocast on CUDA (with ``amp``), else nothing."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if _use_amp(cfg, device) else nullcontext()


# ---- one epoch -----------------------------------------------------------------------------------


def train_epoch(ctx: RunContext) -> int:
    """The rest of epoch ``state.epoch`` (all of it unless resumed mid-epoch), or up to ``max_steps``: one
    optimiser step per batch of this rank's share of the caption order. Returns the captions trained on."""
    cfg, data, net, opt, state, dist, progress = ctx.cfg, ctx.data, ctx.net, ctx.opt, ctx.state, ctx.dist, ctx.progress
    order = epoch_order(len(data.caps), cfg.seed, state.epoch, dist.rank, dist.world)
    batches = list(order.split(cfg.batch_size))
    progress.start(f"epoch {state.epoch + 1}/{cfg.epochs}", total=len(order), unit="img" if cfg.scst else "cap")
    if state.batch:
        progress.advance(sum(len(b) for b in batches[: state.batch]))
    net.train_model.train()
    todo = batches[state.batch:]
    loss_sum = torch.tensor(state.loss_sum, dtype=torch.float64, device=dist.device)  # kept on the device: no sync
    ce_sum = torch.tensor(state.ce_sum, dtype=torch.float64, device=dist.device)
    trained, shown_loss, shown_ce = 0, math.nan, math.nan
    try:
        for idx, (x, inverse, failed) in zip(todo, data.train_src.iterate([data.caps.image[b] for b in todo]),
                                             strict=True):
            idx = _readable(ctx, idx, inverse, failed)
            if x is not None and len(idx):
                with autocast(cfg, dist.device):
                    loss, ce = batch_loss(cfg, data, net, model_input(x, inverse, net.train_encoder,
                                                                      net.model.feature_kind, dist.device), idx)
                _backward(loss, opt, cfg.grad_clip)
                try:  # parameters, optimiser state and counters change together
                    opt.optimizer.step()
                    if cfg.schedule == "cosine":
                        opt.scheduler.step()
                    loss_sum += loss.detach()
                    ce_sum += ce.detach()
                    state.step += 1
                    state.loss_batches += 1
                except KeyboardInterrupt:
                    raise TornUpdate from None
                trained += len(idx)
                if state.step % 10 == 1 or dist.device.type == "cpu" or math.isnan(shown_loss):
                    shown_loss, shown_ce = loss.item(), ce.item()  # (a device sync: not every step on a GPU)
            state.batch += 1
            progress.advance(len(idx), batch=f"{state.batch}/{len(batches)}", loss=round(shown_loss, 4),
                             **_loss_terms(cfg, shown_loss, shown_ce),
                             lr=opt.optimizer.param_groups[0]["lr"])
            if ctx.stop.requested:
                raise KeyboardInterrupt
            if _steps_done(cfg, state):
                break
    finally:
        state.loss_sum, state.ce_sum = float(loss_sum), float(ce_sum)
    return trained


def _readable(ctx: RunContext, idx: torch.Tensor, inverse: torch.Tensor | None, failed: list) -> torch.Tensor:
    """The captions of ``idx`` whose images could be read (each unreadable image is reported once)."""
    for r, why in failed:
        if r not in ctx.unreadable:
            ctx.unreadable.add(r)
            ctx.progress.warn(f"skipping image {ctx.data.train_recs[r].id}: {why}")
    return idx[inverse >= 0] if inverse is not None and failed else idx


def _backward(loss: torch.Tensor, opt: Optim, grad_clip: float) -> None:
    opt.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(opt.params, grad_clip)


def batch_loss(cfg: TrainConfig, data: Data, net: Net, feats: torch.Tensor,
               idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, what the log shows: the cross-entropy, or with ``scst`` the mean reward) of the
    captions ``idx`` given their images' model input ``feats`` (B, D) or (B, N, D)."""
    if data.cider is not None:
        return scst_loss(net.model, feats, data.caps.image[idx], data.cider, data.vocab, cfg.scst_samples,
                         cfg.max_len)
    lengths = data.caps.lengths[idx]
    tokens = data.caps.tokens[idx, : int(lengths.max())].to(feats.device, non_blocking=True)  # (B, T)
    logits, alphas = net.train_model(feats, tokens, lengths.to(feats.device, non_blocking=True))
    return ce_loss(net.model, logits, alphas, tokens, data.vocab.pad_id, cfg.label_smoothing, cfg.alpha_c)


def ce_loss(model: nn.Module, logits: torch.Tensor, alphas: torch.Tensor | None, tokens: torch.Tensor, pad_id: int,
            label_smoothing: float, alpha_c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced cross-entropy of logits (B, T-1, V) against the next words tokens[:, 1:] (ignoring <pad>),
    plus ``alpha_c`` times the model's attention regulariser of alphas (B, T-1, N). Returns (loss, cross-entropy)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=pad_id,
                         label_smoothing=label_smoothing)
    if alphas is not None and alpha_c > 0:
        return ce + alpha_c * model.regularizer(alphas.float()), ce
    return ce, ce


def scst_loss(model: nn.Module, feats: torch.Tensor, images: torch.Tensor, cider: Any, vocab: Vocabulary, n: int,
              max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-critical loss of one batch and its mean reward: n sampled captions per image, each rewarded by its
    CIDEr-D less the mean CIDEr-D of the image's other n - 1 samples (drawn as the caption search searches: its
    banned specials, its <start>/<end>, ``max_len``)."""
    from ..models.decoding import sample
    from ..search import SearchOptions

    opts = SearchOptions.of(vocab, beam_size=1, max_len=max_len)
    words, logp = sample(model, feats, n, opts.start_id, opts.end_id, opts.max_len, banned=opts.banned)
    rows = images.tolist()
    reward = torch.tensor([cider.score(rows[i // n], [vocab.words[w] for w in ws]) for i, ws in enumerate(words)])
    reward = reward.view(-1, n)
    baseline = (reward.sum(1, keepdim=True) - reward) / (n - 1)
    advantage = (reward - baseline).flatten().to(logp.device)
    return -(advantage * logp).mean(), reward.mean().to(logp.device)


# ---- validation, selection, saving ---------------------------------------------------------------


def validate(ctx: RunContext) -> dict[str, float]:
    """BLEU and CIDEr of captions generated (greedy, or beam ``val_beam``) for the validation images."""
    from ..scoring import score

    cfg, data, model, encoder, device, progress = (ctx.cfg, ctx.data, ctx.net.model, ctx.net.encoder,
                                                   ctx.dist.device, ctx.progress)
    model.eval()
    ids = data.val_ids
    groups = list(torch.arange(len(ids)).split(cfg.val_batch_size))
    progress.start("validate", total=len(ids), unit="img")
    hyps = _generate(model, data.val_src.iterate(groups), groups, ids, data.vocab, cfg, device, encoder, progress)
    progress.done()
    if ctx.stop.requested:
        raise KeyboardInterrupt
    return score(hyps, data.references, metrics=("bleu", "cider"), tokenizer=cfg.val_tokenizer).values


@torch.no_grad()
def _generate(model: nn.Module, x_groups: Iterator[tuple], groups: Sequence[torch.Tensor], ids: Sequence[int],
              vocab: Vocabulary, cfg: TrainConfig, device: torch.device, encoder: nn.Module | None,
              progress: Progress) -> dict[int, str]:
    """Captions, without teacher forcing, for the images of ``groups`` (rows into ``ids``), searched as
    ``capcli caption`` and ``capcli evaluate`` search them (greedy or beam ``val_beam``; the specials banned)."""
    from ..search import SearchOptions, search

    opts = SearchOptions.of(vocab, beam_size=cfg.val_beam, max_len=cfg.max_len)
    hyps: dict[int, str] = {}
    for rows, (x, inverse, failed) in zip(groups, x_groups, strict=True):
        for r, why in failed:
            progress.warn(f"validation skips image {ids[r]}: {why}")
        if x is not None:
            with autocast(cfg, device):
                feats = model_input(x, inverse, encoder, model.feature_kind, device)
                if inverse is not None:
                    rows = rows[inverse >= 0]
                out = [beams[0] for beams in search(model, feats, opts)]
            for r, d in zip(rows.tolist(), out, strict=True):
                hyps[int(ids[r])] = vocab.to_text(d.tokens)
        progress.advance(len(rows))
    empty = sum(1 for h in hyps.values() if not h)
    if empty:
        progress.warn(f"validation: {empty} of {len(hyps)} captions are empty (scored as they are)")
    return hyps


class Selection(NamedTuple):
    best: float
    best_epoch: int
    bad_epochs: int
    stop: bool

    @property
    def improved(self) -> bool:
        return self.bad_epochs == 0


def select(state: RunState, value: float, patience: int) -> Selection:
    """After validating epoch ``state.epoch + 1`` at ``value``: the best so far, its epoch, the epochs since, and
    whether to stop (``patience`` epochs without improvement; 0 = never)."""
    if value > state.best:
        best, best_epoch, bad = value, state.epoch + 1, 0
    else:
        best, best_epoch, bad = state.best, state.best_epoch, state.bad_epochs + 1
    return Selection(best, best_epoch, bad, 0 < patience <= bad)


def _choose(ctx: RunContext, scores: dict[str, float]) -> bool:
    """Select on rank 0's validation ``scores`` (broadcast to every rank), step the plateau schedule; whether the
    selection metric improved."""
    cfg, state = ctx.cfg, ctx.state
    value = ctx.dist.broadcast([scores.get(SELECT[cfg.select], 0.0)])[0]
    chosen = select(state, value, cfg.patience)
    state.best, state.best_epoch, state.bad_epochs, state.stopped_early = chosen
    if cfg.schedule == "plateau":
        ctx.opt.scheduler.step(value)
    return chosen.improved


def _save_epoch(ctx: RunContext, row: dict, scores: dict, improved: bool) -> None:
    """Rank 0 after each epoch: best.pt when the selection metric improved (its metrics kept in the state for
    the result), then last.pt with everything ``--resume`` needs."""
    cfg, state, files = ctx.cfg, ctx.state, ctx.files
    if improved:
        state.best_metrics = {"epoch": row["epoch"], "step": state.step, "select": SELECT[cfg.select],
                              "split": cfg.val_split, "images": len(ctx.data.val_recs), **scores}
        checkpoint_of(ctx, state.best_metrics).save(files.best)
    checkpoint_of(ctx, row, resumable=True).save(files.last)


def _loss_terms(cfg: TrainConfig, loss: float, ce: float) -> dict[str, float]:
    """The loss's terms for the progress line: the mean reward (SCST), or the cross-entropy and the attention
    regulariser (``alpha_c`` x the doubly stochastic term) when there is one."""
    if cfg.scst:
        return {"reward": round(ce, 4)}
    if math.isnan(loss) or abs(loss - ce) < 1e-9:
        return {}
    return {"ce": round(ce, 4), "reg": round(loss - ce, 4)}


def _report(ctx: RunContext, row: dict, improved: bool) -> None:
    cfg, state = ctx.cfg, ctx.state
    if cfg.scst:
        terms = f"mean CIDEr-D reward {row['train_reward']:.3f}"
    elif abs(row["train_reg"]) > 1e-9:
        terms = (f"= cross-entropy {row['train_ce']:.3f} + attention regulariser {row['train_reg']:.3f}, "
                 f"alpha_c {cfg.alpha_c:g} x the doubly stochastic term")
    else:
        terms = f"cross-entropy {row['train_ce']:.3f}"
    ctx.progress.info(
        f"epoch {row['epoch']}: loss {row['train_loss']:.3f} ({terms}), "
        f"val BLEU-4 {100 * row.get('val_BLEU-4', 0):.1f} CIDEr {100 * row.get('val_CIDEr', 0):.1f}"
        f"{' (best)' if improved else ''}, lr {row['lr']:.2g}, {row['captions_per_s']:.0f} captions/s")
    if state.stopped_early:
        ctx.progress.info(f"no better {SELECT[cfg.select]} for {state.bad_epochs} epochs: stopping early "
                          f"(best {100 * state.best:.1f} at epoch {state.best_epoch})")


def _save_interrupted(e: KeyboardInterrupt, ctx: RunContext) -> None:
    """Ctrl-C: save a resumable last.pt where the run stands, unless it stopped in the middle of an update."""
    state, files, progress = ctx.state, ctx.files, ctx.progress
    if isinstance(e, TornUpdate):
        progress.warn(f"interrupted in the middle of an update: {files.last} keeps the last epoch's state")
        return
    interrupted = {"interrupted": True, "epoch": state.epoch + 1, "batch": state.batch, "step": state.step}
    checkpoint_of(ctx, interrupted, resumable=True).save(files.last)
    progress.warn(f"interrupted at epoch {state.epoch + 1}, batch {state.batch}: saved {files.last}; "
                  f"resume with `capcli train --out {files.out} --resume`")
