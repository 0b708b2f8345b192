"""What made a caption, on every record of every output format: the model (its file name and the first 12 hex
digits of its SHA-256), the search settings and capcli's version, in a compact form::

    {"model": "flickr8k-attention.pt", "model_sha256": "3f2a9c1b7d4e",
     "search": "beam=3 max_len=20 top_k=1 length_penalty=0 grounding=auto precision=int8 capcli=0.1.0"}

``--resume`` compares an output's records with the run's: another model or other settings would mix captions
that no one setting made (and a model without confidence would slip past ``--min-confidence``), so the resume is
refused, naming the difference. capcli's version is recorded but not compared: a newer capcli resumes an older
one's output. Records written before provenance existed are not checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from . import __version__
from .errors import UsageError
from .names import display

FIELDS = ("model", "model_sha256", "search")
SHA_PREFIX = 12
UNCOMPARED = ("capcli",)  # recorded, not a reason to refuse a resume


@dataclass(frozen=True)
class Provenance:
    model: str
    model_sha256: str
    search: str

    @classmethod
    def of(cls, captioner: Any, beam_size: int, max_len: int, top_k: int, length_penalty: float) -> Provenance:
        """The provenance of ``captioner``'s captions searched with these settings."""
        settings = {"beam": beam_size, "max_len": max_len, "top_k": top_k, "length_penalty": f"{length_penalty:g}",
                    "grounding": "auto" if captioner.grounder is not None else "off",
                    "precision": captioner.precision, "capcli": __version__}
        return cls(captioner.source.name if captioner.source is not None else "(in memory)",
                   captioner.checkpoint_sha256[:SHA_PREFIX], " ".join(f"{k}={v}" for k, v in settings.items()))

    def fields(self) -> dict[str, str]:
        return asdict(self)

    def differences(self, rec: Mapping[str, Any]) -> list[str]:
        """What ``rec``'s provenance says that this one does not (empty for a record without provenance)."""
        if not all(isinstance(rec.get(f), str) and rec.get(f) for f in FIELDS):
            return []
        said: list[str] = []
        if rec["model"] != self.model or rec["model_sha256"] != self.model_sha256:
            said.append(f"model {rec['model']} ({rec['model_sha256']}), this run {self.model} ({self.model_sha256})")
        theirs, ours = _settings(rec["search"]), _settings(self.search)
        for key in dict.fromkeys([*theirs, *ours]):
            if key not in UNCOMPARED and theirs.get(key) != ours.get(key):
                said.append(f"{key} {theirs.get(key, '(none)')}, this run {ours.get(key, '(none)')}")
        return said

    def check_resume(self, records: Iterable[Mapping[str, Any]], out: str) -> None:
        """:class:`UsageError` when a record of ``out`` was made by another model or other settings."""
        for rec in records:
            said = self.differences(rec)
            if said:
                raise UsageError(f"cannot --resume {display(out)}: its captions were made with {'; '.join(said)}; "
                                 "resume with the same settings, or write another -o")


def _settings(search: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in search.split() if "=" in part)
