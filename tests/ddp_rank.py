"""One rank of ``test_train_parts.py::test_ddp_ranks_end_with_identical_weights`` (run as a script).

Joins a 2-process gloo group from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), builds the model
with ``build_model`` (DDP-wrapped), trains one epoch of ``train_epoch`` on tiny random data (each rank its share of
the captions, its own dropout masks) and saves this rank's weights to ``OUT/rank{R}.pt`` (rank 0 also saves the
initial weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from capcli.config import TrainConfig
from capcli.progress import NULL
from capcli.train.data import Captions, Data
from capcli.train.distributed import Dist
from capcli.train.loop import train_epoch
from capcli.train.model import build_model, configure_optimizers, steps_per_epoch
from capcli.train.run import RunContext, RunFiles, RunLog, RunState
from capcli.train.sources import Preloaded
from capcli.vocab import Vocabulary


def tiny_data(n_images: int = 12, n_captions: int = 24, regions: int = 5, dim: int = 8) -> Data:
    """Random grid features and captions: the same on every rank (a generator of its own, seed 0)."""
    g = torch.Generator().manual_seed(0)
    vocab = Vocabulary([f"w{i}" for i in range(10)])
    lengths = torch.randint(3, 8, (n_captions,), generator=g)  # <start> + words + <end>
    tokens = torch.zeros(n_captions, 8, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        words = torch.randint(4, len(vocab), (n - 2,), generator=g)
        tokens[i, :n] = torch.cat([torch.tensor([vocab.start_id]), words, torch.tensor([vocab.end_id])])
    caps = Captions(tokens, lengths, torch.randint(0, n_images, (n_captions,), generator=g))
    feats = torch.randn(n_images, regions, dim, generator=g).half()
    return Data(ds=None, spec=None, feature_dim=dim, store=None, train_recs=[], val_recs=[], start=None, vocab=vocab,
                caps=caps, cider=None, train_src=Preloaded(feats), val_src=Preloaded(feats[:0]))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    cfg = TrainConfig(arch="attention", embed_dim=16, hidden_dim=16, attention_dim=16, dropout=0.3, batch_size=4,
                      lr=1e-2, epochs=1, schedule="none", seed=1, device="cpu")
    dist = Dist.setup(cfg.device)
    try:
        data = tiny_data()
        net = build_model(cfg, data, None, out / "last.pt", dist, NULL)
        if dist.main:
            torch.save(net.model.state_dict(), out / "initial.pt")
        opt = configure_optimizers(cfg, net, steps_per_epoch(len(data.caps), cfg.batch_size, dist.world), dist.device)
        state = RunState()
        files = RunFiles(out)
        train_epoch(RunContext(cfg, files, data, net, opt, state, dist, RunLog(files, NULL), NULL))
        torch.save({"model": net.model.state_dict(), "steps": state.step, "loss_sum": state.loss_sum},
                   out / f"rank{dist.rank}.pt")
        dist.barrier()
    finally:
        dist.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
