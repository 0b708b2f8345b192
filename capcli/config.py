"""Every training option in one place, without torch: ``TrainConfig``, the choices it allows and its checks.

Each option is declared once, here: its field's default and help (``option``) make ``capcli train``'s option
(cli.py builds the command from the fields), and the models' cell tables are checked against :data:`CELLS`
(tests/test_train.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

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


def option(default: Any, help: str, *, flag: bool = False, path: bool = False) -> Any:
    """A :class:`TrainConfig` field and its ``capcli train`` option (cli.py builds the command from the fields).

    ``help``: the option's help text; ``flag``: a bool given as ``--name`` alone (no ``--no-name``); ``path``: the
    option takes a path (the config keeps it as a string: JSON-able)."""
    return field(default=default, metadata={"help": help, "flag": flag, "path": path})


@dataclass
class TrainConfig:
    """Every training option, with its default and help. JSON-able; stored in checkpoints as ``train_config``."""

    # what to train on, and where things go
    arch: str = option("attention", "basic (Show and Tell) | attention (Show, Attend and Tell)")
    dataset: str = option("coco", "Prepared dataset name under the data root; 'coco' picks coco2014, else coco2017.")
    data: str | None = option(None, "A prepared dataset folder (instead of --dataset).", path=True)
    root: str | None = field(default=None, metadata={"shared": True})  # the --root of every data command (cli.py)
    encoder: str | None = option(None, "Encoder of the features (default: efficientnet-lite0, or the --features "
                                       "folder's).")
    features: str | None = option(None, "Features folder (default: ROOT/features/DATASET/ENCODER, extracted first "
                                        "when missing).", path=True)
    no_extract: bool = option(False, "Fail instead of extracting missing features.", flag=True)
    out: str | None = option(None, "Run folder (default: ROOT/runs/DATASET-ARCH).", path=True)
    resume: bool = option(False, "Continue OUT/last.pt where it stopped.", flag=True)
    overwrite: bool = option(False, "Start over in an OUT that holds a run.", flag=True)
    # model
    embed_dim: int = option(512, "Word embedding size.")
    hidden_dim: int = option(512, "RNN hidden size.")
    attention_dim: int = option(512, "Attention MLP size (attention).")
    dropout: float = option(0.5, "Dropout probability.")
    cell: str = option("lstm", "lstm | gru | rnn")
    condition: str = option("first-step", "basic: first-step (the paper) | init-state")  # how Show and Tell sees
    embeddings: str | None = option(None, "Pretrained word vectors, GloVe text format.", path=True)
    freeze_embeddings: bool = option(False, "Keep --embeddings fixed.", flag=True)
    # text
    min_count: int = option(5, "Rarer words become <unk>.")  # than this many times in the training captions
    max_len: int = option(20, "Captions are truncated to this many words.")
    captions_per_image: int | None = option(None, "Train on the first K captions of each image (default: all).")
    # optimisation
    epochs: int = option(20, "Most epochs to train.")
    batch_size: int = option(64, "Captions per step.")
    lr: float = option(4e-4, "Decoder learning rate (Adam).")
    encoder_lr: float = option(1e-4, "Encoder learning rate with --fine-tune-encoder.")
    weight_decay: float = option(0.0, "Adam weight decay.")
    grad_clip: float = option(5.0, "Max gradient norm (0: off).")
    alpha_c: float = option(1.0, "Weight of the doubly stochastic attention regulariser.")
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy.")
    # self-critical sequence training (Rennie et al. 2017), usually after cross-entropy training
    init_from: str | None = option(None, "Start from this checkpoint's model and vocabulary (e.g. --scst after "
                                         "cross-entropy training).", path=True)  # with a fresh optimiser
    scst: bool = option(False, "Self-critical training: reward sampled captions by CIDEr-D instead of "
                               "cross-entropy.", flag=True)
    # each sampled caption's baseline is the mean reward of the image's others
    scst_samples: int = option(5, "Captions sampled per image with --scst.")
    schedule: str = option("plateau", "plateau (halve the LR when --select stalls) | cosine | none")
    patience: int = option(4, "Stop after this many epochs without a better --select (0: never).")
    max_steps: int | None = option(None, "Stop after this many optimiser steps.")  # smoke tests, benchmarks
    seed: int = option(0, "Random seed (initialisation, data order, dropout).")
    # validation
    select: str = option("cider", "cider | bleu4: metric for best.pt and early stopping.")  # and the plateau schedule
    val_split: str = option("val", "Split to validate on.")
    val_images: int | None = option(None, "Validate on the first N images only.")
    val_beam: int = option(1, "Beam size for validation captions (1: greedy).")
    val_batch_size: int = option(100, "Images per validation batch.")
    # java: the PTBTokenizer, when java is found (auto)
    val_tokenizer: str = option("auto", "auto | java | python (fast, approximate scores)")
    # end-to-end training from images
    fine_tune_encoder: bool = option(False, "Train end to end from the photos, fine-tuning the encoder's last "
                                            "blocks.", flag=True)
    fine_tune_blocks: int = option(2, "Encoder blocks to fine-tune.")
    encoder_weights: str | None = option(None, "Encoder weights file (torchvision state dict).", path=True)
    workers: int = option(2, "DataLoader worker processes.")  # images, or features without preloading
    # compute
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    amp: bool = option(True, "bfloat16 autocast on CUDA.")  # ignored on the CPU
    preload: bool = option(True, "Hold the features in memory (falls back when they do not fit).")
    save_dtype: str = option("float32", "float32 | float16 for best.pt.")  # last.pt always keeps full precision

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

