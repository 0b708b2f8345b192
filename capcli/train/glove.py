"""Pretrained word vectors (GloVe or word2vec text format) for a model's embedding table."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from ..vocab import Vocabulary


def load_embeddings(path: str | Path, vocab: Vocabulary, weight: torch.Tensor) -> tuple[int, int]:
    """Copy the vectors of vocabulary words found in a GloVe-format text file into ``weight`` (V, E).

    Lines are ``word v1 .. vE`` (a word2vec ``count dim`` header line is skipped; words that contain
    spaces are allowed). Words not in the file keep their random initialisation. Returns
    (found, missing) over the vocabulary's real words (the four special tokens are not counted).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--embeddings: no such file {path}")
    dim = weight.shape[1]
    wanted = {w: i for i, w in enumerate(vocab.words) if w not in Vocabulary.SPECIALS}
    found: set[int] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                parts = line.rstrip("\n\r").rstrip(" ").split(" ")
                if n == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue  # word2vec text header: "<count> <dim>"
                if len(parts) < 2:
                    if not line.strip():
                        continue
                    raise UsageError(f"--embeddings {path}, line {n}: expected 'word v1 v2 ...'")
                if n <= 2 and len(parts) - 1 != dim:
                    raise UsageError(f"--embeddings {path} holds {len(parts) - 1}-d vectors but the model's "
                                     f"embedding is {dim}-d; pass --embed-dim {len(parts) - 1}")
                if len(parts) < dim + 1:
                    raise UsageError(f"--embeddings {path}, line {n}: {len(parts) - 1} numbers, expected {dim}")
                word = " ".join(parts[:-dim])
                i = wanted.get(word)
                if i is None or i in found:
                    continue
                try:
                    vec = torch.tensor([float(v) for v in parts[-dim:]])
                except ValueError:
                    raise UsageError(f"--embeddings {path}, line {n}: not a number in the vector") from None
                with torch.no_grad():
                    weight[i] = vec
                found.add(i)
    except OSError as e:
        raise UsageError(f"--embeddings: cannot read {path} ({e.strerror or e})") from None
    return len(found), len(wanted) - len(found)
