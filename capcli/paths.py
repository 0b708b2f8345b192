"""Where capcli keeps things by default: one data root shared by fetch, prepare, features and train.

The root is ``$CAPCLI_HOME`` when set, else ``~/.capcli``. Below it::

    raw/<dataset>/                 downloaded archives and their extracted contents (fetch)
    datasets/<dataset>/            the canonical layout, dataset.json (prepare)
    features/<dataset>/<encoder>/  HDF5 shards and manifest.json (features)
    runs/<dataset>-<arch>/         checkpoints and metrics (train)
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "CAPCLI_HOME"


def home(root: str | Path | None = None) -> Path:
    """The data root: ``root`` if given, else ``$CAPCLI_HOME``, else ``~/.capcli``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".capcli"


def raw_dir(dataset: str, root: str | Path | None = None) -> Path:
    return home(root) / "raw" / dataset


def dataset_dir(dataset: str, root: str | Path | None = None) -> Path:
    return home(root) / "datasets" / dataset


def features_dir(dataset: str, encoder: str, root: str | Path | None = None) -> Path:
    return home(root) / "features" / dataset / encoder


def run_dir(dataset: str, arch: str, root: str | Path | None = None) -> Path:
    return home(root) / "runs" / f"{dataset}-{arch}"
