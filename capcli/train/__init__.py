"""Training a captioning model: one plain loop, as readable as nanoGPT's.

Each epoch shows the model every training caption once (each image with each of its captions, or
``captions_per_image`` of them), teacher-forced, in an order drawn from ``(seed, epoch)``::

    loss = cross_entropy(logits, next words, ignoring <pad>) + alpha_c * model.regularizer(alphas)

or, with ``scst`` (self-critical sequence training, Rennie et al. 2017; usually from a cross-entropy
model given by ``init_from``), each epoch takes every training image once, samples ``scst_samples``
captions per image and rewards each by its CIDEr-D against the image's references, less the mean reward
of the image's other samples (the baseline; Luo 2020)::

    loss = -mean((CIDEr-D(w^s) - baseline) * log p(w^s))

Each epoch then generates captions for the validation images without teacher forcing (greedy, or beam search
with ``val_beam``), scores BLEU-4 and CIDEr with :func:`capcli.scoring.score`, keeps the best
checkpoint by ``select`` and stops after ``patience`` epochs without improvement.

Data. By default the model trains on cached CNN features (``capcli features``; extracted here first
when missing) loaded into memory once and indexed directly; ``preload=False`` (or too little memory)
reads them from the HDF5 shards in DataLoader workers instead. ``fine_tune_encoder`` trains end to
end from the photos: images are decoded in DataLoader workers and the last ``fine_tune_blocks``
blocks of the encoder are trained with their own, lower learning rate. The encoder stays in eval
mode (BatchNorm statistics and stochastic depth frozen), only its weights learn.

Checkpoints (:mod:`capcli.checkpoint`) go to ``OUT/best.pt`` (best validation score) and
``OUT/last.pt`` (after every epoch, plus ``train_state``: optimiser, scheduler, counters, the data
position and every RNG). ``resume`` continues ``OUT/last.pt`` exactly where it stopped: the data
order is a function of ``(seed, epoch)`` and the batch position, and dropout draws from the restored
RNG, so on the CPU an interrupted and resumed run ends with the same weights as an uninterrupted one.
Ctrl-C (or SIGTERM) finishes the current step and saves a resumable ``last.pt``; a second Ctrl-C
stops at once.

Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel; each rank takes
its share of the epoch's caption order (DistributedSampler semantics), rank 0 validates, logs and
saves while the others wait, and rank 0's early-stopping decision is broadcast.

The parts, in the order a run uses them:

- :mod:`capcli.config`: ``TrainConfig`` (every option, its default, help and allowed values) and its checks
- ``run.py``: ``open_run`` (resume and config merge, run folder policy), ``RunState`` (what resume restores),
  ``checkpoint_of``, ``RunLog`` (metrics.jsonl, curves.png), Ctrl-C handling, ``RunContext`` (what each stage
  takes)
- ``data.py``: ``load_data`` (dataset, features, vocabulary, captions, batch sources), ``epoch_order``
- ``sources.py``: features in memory or read from the shards, photos decoded in workers
- ``model.py``: ``build_model`` (+ the encoder when fine-tuning), ``configure_optimizers``
- ``loop.py``: ``train``: ``setup``, then per epoch ``run_epoch`` (``train_epoch``, ``validate``, ``select``,
  save); ``ce_loss`` / ``scst_loss``
- ``distributed.py``: ``Dist`` (ranks, collectives, DDP wrapping); ``glove.py``: ``load_embeddings``
"""

from ..config import TrainConfig
from .data import epoch_order, resolve_dataset
from .glove import load_embeddings
from .loop import TrainResult, ce_loss, scst_loss, select, train

__all__ = ["TrainConfig", "TrainResult", "ce_loss", "epoch_order", "load_embeddings", "resolve_dataset",
           "scst_loss", "select", "train"]
