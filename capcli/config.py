"""Every training option in one place, without torch: ``TrainConfig``, the choices it allows and its checks.

``capcli train``'s option defaults read ``TrainConfig``'s field defaults, and the models' cell tables are
checked against :data:`CELLS` (tests/test_train.py), so a default or a choice is written down once, here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .errors import UsageError
from .progress import Progress

ARCHS = ("basic", "attention")
CELLS = ("lstm", "gru", "rnn")
CONDITIONS = ("first-step", "init-state")  # how Show and Tell sees the image
SCHEDULES = ("plateau", "cosine", "none")
SELECT = {"cider": "CIDEr", "bleu4": "BLEU-4"}  # --select -> key of Scores.values
SAVE_DTYPES = ("float32", "float16")
# what `capcli evaluate --tokenizer` takes (evaluate.TOKENIZERS; defined here so that this module stays a leaf)
VAL_TOKENIZERS = ("auto", "java", "python")


@dataclass
class TrainConfig:
    """Every training option. JSON-able; stored in checkpoints as ``train_config``."""

    # what to train on, and where things go
    arch: str = "attention"  # basic (Show and Tell) | attention (Show, Attend and Tell)
    dataset: str = "coco"  # a prepared dataset's name under the data root ("coco": coco2014, else coco2017)
    data: str | None = None  # a prepared dataset folder (instead of --dataset)
    root: str | None = None  # data root [env CAPCLI_HOME, ~/.capcli]
    encoder: str | None = None  # None: the default encoder, or the one of the --features folder
    features: str | None = None  # features folder [ROOT/features/DATASET/ENCODER]
    no_extract: bool = False  # fail instead of extracting missing features
    out: str | None = None  # run folder [ROOT/runs/DATASET-ARCH]
    resume: bool = False  # continue OUT/last.pt
    overwrite: bool = False  # start over in an OUT that already holds a run
    # model
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5
    cell: str = "lstm"  # lstm | gru | rnn
    condition: str = "first-step"  # basic only: first-step | init-state
    embeddings: str | None = None  # GloVe-format text file of pretrained word vectors
    freeze_embeddings: bool = False
    # text
    min_count: int = 5  # words seen fewer times in the training captions become <unk>
    max_len: int = 20  # captions are truncated to this many words
    captions_per_image: int | None = None  # None: all of each image's captions
    # optimisation
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4  # decoder (Adam)
    encoder_lr: float = 1e-4  # encoder, when fine-tuning
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # max gradient norm; 0 = off
    alpha_c: float = 1.0  # weight of the doubly stochastic attention regulariser
    label_smoothing: float = 0.0
    # self-critical sequence training (Rennie et al. 2017), usually after cross-entropy training
    init_from: str | None = None  # start from this checkpoint's model and vocabulary (a fresh optimiser)
    scst: bool = False  # reward sampled captions by CIDEr-D instead of teacher-forced cross-entropy
    scst_samples: int = 5  # captions sampled per image; each one's baseline is the others' mean reward
    schedule: str = "plateau"  # plateau (on the selection metric) | cosine | none
    patience: int = 4  # epochs without improvement before stopping; 0 = never stop early
    max_steps: int | None = None  # stop after this many optimiser steps in all (smoke tests, benchmarks)
    seed: int = 0
    # validation
    select: str = "cider"  # cider | bleu4: the metric for best.pt, early stopping and the plateau schedule
    val_split: str = "val"
    val_images: int | None = None  # score only the first N validation images
    val_beam: int = 1  # 1 = greedy
    val_batch_size: int = 100
    val_tokenizer: str = "auto"  # auto (Java PTBTokenizer when present) | java | python (fast, approximate)
    # end-to-end training from images
    fine_tune_encoder: bool = False
    fine_tune_blocks: int = 2
    encoder_weights: str | None = None
    workers: int = 2  # DataLoader workers (images, or features without preloading)
    # compute
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on the CPU)
    preload: bool = True  # load the features into memory (falls back when they do not fit)
    save_dtype: str = "float32"  # float32 | float16 for best.pt (last.pt always keeps full precision)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_config(cfg: TrainConfig) -> None:
    """Raise :class:`UsageError` for an option out of range or options that exclude each other."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UsageError(msg)

    need(cfg.arch in ARCHS, f"--arch {cfg.arch!r}: use one of {', '.join(ARCHS)}")
    need(cfg.schedule in SCHEDULES, f"--schedule {cfg.schedule!r}: use one of {', '.join(SCHEDULES)}")
    need(cfg.select in SELECT, f"--select {cfg.select!r}: use one of {', '.join(SELECT)}")
    need(cfg.cell in CELLS, f"--cell {cfg.cell!r}: use {', '.join(CELLS[:-1])} or {CELLS[-1]}")
    need(cfg.condition in CONDITIONS, f"--condition {cfg.condition!r}: use {' or '.join(CONDITIONS)}")
    need(cfg.save_dtype in SAVE_DTYPES, f"--save-dtype {cfg.save_dtype!r}: use {' or '.join(SAVE_DTYPES)}")
    need(cfg.val_tokenizer in VAL_TOKENIZERS,
         f"--val-tokenizer: use {', '.join(VAL_TOKENIZERS[:-1])} or {VAL_TOKENIZERS[-1]}")
    for name in ("embed_dim", "hidden_dim", "attention_dim", "max_len", "batch_size", "epochs", "min_count",
                 "val_batch_size", "val_beam"):
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    for name in ("captions_per_image", "val_images", "max_steps"):
        v = getattr(cfg, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be at least 1")
    need(0.0 <= cfg.dropout < 1.0, "--dropout must be in [0, 1)")
    need(0.0 <= cfg.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)")
    need(cfg.lr > 0 and cfg.encoder_lr > 0, "--lr and --encoder-lr must be positive")
    need(cfg.grad_clip >= 0 and cfg.alpha_c >= 0 and cfg.weight_decay >= 0,
         "--grad-clip, --alpha-c and --weight-decay must not be negative")
    need(cfg.workers >= 0, "--workers must not be negative")
    need(not (cfg.resume and cfg.overwrite), "--resume continues a run and --overwrite starts it over: give one")
    need(not (cfg.fine_tune_encoder and cfg.fine_tune_blocks < 1), "--fine-tune-blocks must be at least 1")
    need(not (cfg.freeze_embeddings and not cfg.embeddings), "--freeze-embeddings needs --embeddings PATH")
    need(not (cfg.fine_tune_encoder and cfg.features), "--features and --fine-tune-encoder exclude each other")
    need(not cfg.scst or cfg.scst_samples >= 2, "--scst-samples must be at least 2 (the baseline needs others)")


# On --resume these come from the command line; the rest comes from the checkpoint's train_config.
RESUME_CURRENT = ("resume", "overwrite", "out", "root", "device", "amp", "preload", "workers", "no_extract")
# ... and these from the command line only when given there (different from the default).
RESUME_IF_GIVEN = ("dataset", "data", "features", "encoder", "epochs", "max_steps", "patience", "val_tokenizer")


def merge_resumed(cfg: TrainConfig, saved: dict, progress: Progress) -> TrainConfig:
    """The run's own settings from the checkpoint; locations and compute settings from the command line."""
    default = TrainConfig()
    merged = TrainConfig.from_dict(saved)
    for f in fields(TrainConfig):
        now, was = getattr(cfg, f.name), saved.get(f.name, getattr(default, f.name))
        if f.name in RESUME_CURRENT or (f.name in RESUME_IF_GIVEN and now != getattr(default, f.name)):
            setattr(merged, f.name, now)
        elif now != getattr(default, f.name) and now != was:
            opt = "--" + f.name.replace("_", "-")
            progress.warn(f"{opt} {now} ignored on --resume: the run keeps its own setting ({was})")
    return merged


# With --init-from the model (and its vocabulary) come from the checkpoint: these settings of the command line
# cannot apply, and the run records the checkpoint's.
INIT_FROM_MODEL = ("embed_dim", "hidden_dim", "attention_dim", "dropout", "cell", "condition")


def merge_init_from(cfg: TrainConfig, model_config: dict, progress: Progress) -> TrainConfig:
    """``cfg`` with the ``--init-from`` checkpoint's model settings; a warning for each one given otherwise."""
    default, merged = TrainConfig(), replace(cfg)
    for name in INIT_FROM_MODEL:
        now, was = getattr(cfg, name), model_config.get(name, getattr(cfg, name))
        if now != getattr(default, name) and now != was:
            progress.warn(f"--{name.replace('_', '-')} {now} ignored with --init-from: the model keeps its own ({was})")
        setattr(merged, name, was)
    for name in ("min_count", "embeddings"):
        if getattr(cfg, name) != getattr(default, name):
            progress.warn(f"--{name.replace('_', '-')} ignored with --init-from: the vocabulary and its embeddings "
                          "come from the checkpoint")
    return merged

