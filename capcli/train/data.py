"""What a run trains on: the dataset, its features (extracted first when missing), the vocabulary, every
training caption as token ids, the CIDEr-D corpus for self-critical training, and each epoch's caption order."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .. import familiar, paths
from ..checkpoint import Checkpoint
from ..config import TrainConfig
from ..encoders import DEFAULT_ENCODER, EncoderSpec, get_spec
from ..errors import CapcliError, DatasetError, FeaturesError, UsageError
from ..familiar import Familiarity
from ..layout import FILENAME as DATASET_FILE
from ..layout import Dataset, ImageRecord, open_dataset
from ..progress import NULL, Progress
from ..vocab import Vocabulary
from .distributed import Dist
from .sources import Source, feature_sources, photo_sources

COCO_NAMES = ("coco", "coco2014", "coco2017")  # what --dataset coco resolves to, in order


def resolve_dataset(cfg: TrainConfig, progress: Progress = NULL) -> Dataset:
    """``--data DIR``, else ``--dataset NAME`` (a name under the data root, or a folder)."""
    if cfg.data:
        return Dataset.load(cfg.data)
    name = cfg.dataset
    if name == "coco":
        for cand in COCO_NAMES:
            d = paths.dataset_dir(cand, cfg.root)
            if (d / DATASET_FILE).is_file():
                if cand != "coco":
                    progress.info(f"--dataset coco: using {cand} ({d})")
                return Dataset.load(d)
        where = paths.home(cfg.root) / "datasets"
        raise DatasetError(f"no prepared COCO dataset in {where} (looked for coco2014 and coco2017); "
                           "run `capcli fetch coco` first, or pass --dataset NAME / --data DIR")
    return open_dataset(name, cfg.root)


def _manifest_complete(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def open_features(cfg: TrainConfig, ds: Dataset, dist: Dist, progress: Progress,
                  resumed: Checkpoint | None = None) -> tuple[Any, EncoderSpec]:
    """The FeatureStore to train on and its encoder; extracts the features first when they are missing (rank 0).

    ``resumed`` (a checkpoint) must have been trained on features of the same encoder."""
    from ..features import FeatureStore, extract_features

    encoder = cfg.encoder or DEFAULT_ENCODER
    folder = Path(cfg.features) if cfg.features else paths.features_dir(ds.name, encoder, cfg.root)
    if not _manifest_complete(folder):
        if cfg.features:
            raise FeaturesError(f"no complete features in {folder}; run `capcli features` first")
        if cfg.no_extract:
            raise FeaturesError(f"no {encoder} features for {ds.name} in {folder}; "
                                f"run `capcli features {ds.name} --encoder {encoder}` first, or drop --no-extract")
        if dist.main:
            progress.info(f"no {encoder} features for {ds.name} in {folder} yet: extracting them first "
                          "(once; later runs reuse them)")
            extract_features(ds, encoder, out=folder, device=dist.device.type, progress=progress)
        dist.barrier()
    store = FeatureStore(folder)
    store.check_photos(ds)
    if resumed is not None:
        resumed.check_encoder(store.encoder_name, f"the features in {folder}")
    if cfg.encoder and store.encoder_name != cfg.encoder:
        raise FeaturesError(f"{folder} holds {store.encoder_name} features, not {cfg.encoder}; "
                            f"use features of {cfg.encoder} or drop --encoder")
    try:
        spec = get_spec(store.encoder_name)
    except CapcliError as e:
        raise FeaturesError(f"{folder}: {e}") from None
    if spec.feature_dim != store.feature_dim:
        raise FeaturesError(f"{folder} says its features come from {spec.name} ({spec.feature_dim}-d) but they "
                            f"are {store.feature_dim}-d; extract them again")
    return store, spec


@dataclass
class Captions:
    """Every training caption as token ids: <start> w1 .. wn <end>, padded with <pad> (= 0)."""

    tokens: torch.Tensor  # (C, max_len + 2) int64
    lengths: torch.Tensor  # (C,) int64, <start> and <end> included
    image: torch.Tensor  # (C,) int64: row of the caption's image in the training image list

    def __len__(self) -> int:
        return len(self.lengths)


def training_captions(records: Sequence[ImageRecord], vocab: Vocabulary, cfg: TrainConfig) -> Captions:
    rows: list[list[int]] = []
    image: list[int] = []
    for r, rec in enumerate(records):
        for cap in captions_of(rec, cfg):
            words = vocab.encode(cap)[1:-1][: cfg.max_len]
            if words:  # an empty caption teaches nothing
                rows.append([vocab.start_id, *words, vocab.end_id])
                image.append(r)
    if not rows:
        raise DatasetError("no training captions: the training split has no captions with words")
    tokens = torch.zeros(len(rows), cfg.max_len + 2, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return Captions(tokens, torch.tensor([len(r) for r in rows]), torch.tensor(image))


def captions_of(rec: ImageRecord, cfg: TrainConfig) -> list[str]:
    return rec.captions if cfg.captions_per_image is None else rec.captions[: cfg.captions_per_image]


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's caption order for ``epoch``: a permutation drawn from (seed, epoch), then, with several
    ranks, padded to a multiple of ``world`` and dealt out like ``DistributedSampler``."""
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    if world > 1:
        total = math.ceil(n / world) * world
        order = torch.cat([order, order[: total - n]])[rank:total:world]
    return order


@dataclass
class Data:
    """Everything a run reads: images, their features or photos, the vocabulary and the captions."""

    ds: Dataset
    spec: EncoderSpec
    feature_dim: int
    store: Any | None  # the FeatureStore; None when fine-tuning from the photos
    train_recs: list[ImageRecord]
    val_recs: list[ImageRecord]
    start: Checkpoint | None  # the checkpoint the model and vocabulary come from (resumed, or --init-from)
    vocab: Vocabulary
    caps: Captions
    cider: Any | None  # CiderD over the training references (self-critical training)
    train_src: Source  # where the batches come from: features of the model's kind, or photos
    val_src: Source

    @cached_property
    def familiarity(self) -> Familiarity | None:
        """How like the training photos a photo is (familiar.py: grounding uses it), from the pooled features of
        the training and validation images; None when fine-tuning from the photos (grounding is then off)."""
        if self.store is None or len(self.train_recs) <= familiar.K:
            return None
        rows = familiar.sample(len(self.train_recs)).tolist()  # read only the photos it keeps (COCO: 10k of 113k)
        train = self.store.get_many([self.train_recs[i].id for i in rows], "pooled")
        val = self.store.get_many(self.val_ids, "pooled")
        return Familiarity.fit(torch.from_numpy(train), torch.from_numpy(val))

    @property
    def val_ids(self) -> list[int]:
        return [r.id for r in self.val_recs]

    @property
    def references(self) -> dict[int, list[str]]:
        return {r.id: r.captions for r in self.val_recs}


def load_data(cfg: TrainConfig, ds: Dataset, resumed: Checkpoint | None, dist: Dist, progress: Progress) -> Data:
    """The run's images and features, its starting checkpoint (``resumed``, else ``--init-from``), vocabulary,
    captions and batch sources. Self-critical training sees each image once per epoch (its first caption stands
    for it), with CIDEr-D document frequencies from all the training references."""
    train_recs, val_recs, store, spec = _images(cfg, ds, dist, progress, resumed)
    where = f"--fine-tune-encoder with --encoder {spec.name}" if store is None else f"the features in {store.folder}"
    if resumed is not None:
        resumed.check_encoder(spec.name, where)  # (features: checked when opened)
    start = resumed if resumed is not None else _init_from(cfg, spec, where, progress)
    if cfg.val_images:
        val_recs = val_recs[: cfg.val_images]
    if start is not None:
        vocab = Vocabulary.from_dict(start.vocab)
    else:
        vocab = Vocabulary.build((c for r in ds.split("train") for c in captions_of(r, cfg)), cfg.min_count)
        progress.info(f"vocabulary: {len(vocab)} words seen at least {cfg.min_count} times in the training captions")
    caps = training_captions(train_recs, vocab, replace(cfg, captions_per_image=1) if cfg.scst else cfg)
    cider = None
    if cfg.scst:
        from ..cider import CiderD
        from ..vocab import tokenize

        cider = CiderD({r: [tokenize(c) for c in rec.captions] for r, rec in enumerate(train_recs)})
    feature_dim = spec.feature_dim if store is None else store.feature_dim
    train_src, val_src = _sources(cfg, ds, store, spec, train_recs, val_recs, dist, progress)
    return Data(ds, spec, feature_dim, store, train_recs, val_recs, start, vocab, caps, cider, train_src, val_src)


def _images(cfg: TrainConfig, ds: Dataset, dist: Dist, progress: Progress,
            resumed: Checkpoint | None) -> tuple[list[ImageRecord], list[ImageRecord], Any | None, EncoderSpec]:
    """Training and validation images (those with features, unless fine-tuning), the store and the encoder."""
    train_recs = ds.split("train")
    val_recs = ds.split(cfg.val_split)
    if not train_recs:
        raise DatasetError(f"dataset {ds.name} has no training images (splits train and restval)")
    if not val_recs:
        raise DatasetError(f"dataset {ds.name} has no {cfg.val_split!r} images to validate on; pass --val-split")
    if cfg.fine_tune_encoder:
        return train_recs, val_recs, None, get_spec(cfg.encoder or DEFAULT_ENCODER)
    store, spec = open_features(cfg, ds, dist, progress, resumed=resumed)
    missing = sum(1 for r in train_recs if r.id not in store)
    if missing:
        progress.warn(f"{missing} of {len(train_recs)} training images have no features; training without them")
    train_recs = [r for r in train_recs if r.id in store]
    val_recs = [r for r in val_recs if r.id in store]
    if not train_recs or not val_recs:
        raise FeaturesError(f"{store.folder} has no features for the {'training' if not train_recs else 'val'} "
                            f"images of {ds.name}; run `capcli features {ds.name}` again")
    return train_recs, val_recs, store, spec


def _init_from(cfg: TrainConfig, spec: EncoderSpec, where: str, progress: Progress) -> Checkpoint | None:
    """The ``--init-from`` checkpoint a new run starts from, checked against this run's encoder and arch."""
    if not cfg.init_from:
        return None
    init = Checkpoint.load(cfg.init_from)
    init.check_encoder(spec.name, where)
    if init.config.get("arch") != cfg.arch:
        raise UsageError(f"--init-from {cfg.init_from} is a {init.config.get('arch')!r} model, "
                         f"not --arch {cfg.arch}")
    progress.info(f"starting from {cfg.init_from} (its model and vocabulary)")
    return init


def _sources(cfg: TrainConfig, ds: Dataset, store: Any | None, spec: EncoderSpec, train_recs: list[ImageRecord],
             val_recs: list[ImageRecord], dist: Dist, progress: Progress) -> tuple[Source, Source]:
    """Where training and validation batches come from: the features the model reads (its arch's kind), or
    photos when fine-tuning."""
    if store is None:
        return photo_sources([str(ds.path(r)) for r in train_recs], [str(ds.path(r)) for r in val_recs], spec,
                             cfg.workers, dist)
    return feature_sources(store, _feature_kind(cfg.arch), [r.id for r in train_recs], [r.id for r in val_recs],
                           cfg.preload, cfg.workers, dist, progress)


def _feature_kind(arch: str) -> str:
    """What a model of ``arch`` reads: its class's ``feature_kind`` ("pooled" or "grid")."""
    from ..models import ARCHS, show_attend_tell, show_tell  # noqa: F401  (importing them registers the two)

    return ARCHS[arch].feature_kind
