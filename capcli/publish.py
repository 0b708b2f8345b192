"""``capcli caption``'s publishing step: its output records into photo metadata, sidecars and a review gallery.

A caption run hands over what its output holds, each record paired with its photo (:class:`capcli.caption.Captioned`,
by the record's file key, ``path_bytes`` first, as ``--resume`` matches them: :func:`capcli.names.record_key`), and
the pairs are published by :mod:`capcli.metadata` (XMP or ``.txt`` sidecars, embedded XMP) and
:mod:`capcli.gallery`: the output is not read again, nor the folders walked again.

``min_confidence``: a record whose ``confidence`` is below it stays in the output, marked
``"low_confidence": true`` (the output file is rewritten with the mark), and is kept out of the metadata and
sidecars; the gallery still shows it (that is where a person reviews it). Records without ``confidence`` are not
filtered. A dry run writes nothing into photos or sidecars; the output and the gallery are still written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import gallery, metadata
from .alttext import NO_DESCRIPTION, label_alt_text
from .caption import Captioned, collect_inputs
from .errors import UsageError
from .images import is_image_file
from .metadata import PublishOptions, PublishResult, Status, WrittenBy
from .names import record_key
from .outputs import read_output, rewrite_records


@dataclass(frozen=True)
class PublishRequest:
    """Where the captions go besides the output file."""

    sidecars: tuple[str, ...] = ()  # "xmp" and/or "txt"
    embed: bool = False
    naming: str = "stem"  # XMP sidecar names: "stem" (name.xmp) or "ext" (name.jpg.xmp)
    overwrite: bool = False  # replace a person's words too
    dry_run: bool = False
    html: Path | None = None  # review gallery
    min_confidence: float | None = None

    @property
    def hows(self) -> tuple[str, ...]:
        """The :func:`metadata.publish` targets, in the order they are written."""
        return (*dict.fromkeys(self.sidecars), *(("embed",) if self.embed else ()))

    @property
    def wanted(self) -> bool:
        return bool(self.hows) or self.html is not None or self.min_confidence is not None

    def check(self, out: Path, inputs: Sequence[str | Path], recursive: bool = False) -> None:
        """Fail on bad options before any captioning (``out``, ``inputs``: the run's, that ``html`` must not be)."""
        for kind in self.sidecars:
            if kind not in metadata.SIDECAR_KINDS:
                raise UsageError(f"--sidecar {kind!r}: use {' or '.join(metadata.SIDECAR_KINDS)}")
        if self.naming not in metadata.SIDECAR_NAMINGS:
            raise UsageError(f"--sidecar-name {self.naming!r}: use {' or '.join(metadata.SIDECAR_NAMINGS)}")
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise UsageError(f"--min-confidence {self.min_confidence}: give a number from 0 to 1")
        if self.html is not None:
            gallery.check_target(self.html, self._not_the_gallery(Path(self.html), out, inputs, recursive))

    def _not_the_gallery(self, html: Path, out: Path, inputs: Sequence[str | Path],
                         recursive: bool) -> dict[Path, str]:
        """The files this run reads or writes, which the gallery must not replace (path -> what it is). The
        folders are walked for them only when ``html`` could be one: named like a photo or a sidecar."""
        protected = {Path(out): "the output file (-o)"}
        if not (is_image_file(html) or html.suffix.lower() in (".xmp", ".txt")):
            return protected
        for item in collect_inputs(inputs, recursive):
            protected[item.path] = "one of the photos being captioned"
            for kind in self.sidecars:
                protected[metadata.sidecar_path(item.path, kind, self.naming)] = f"the {kind} sidecar of {item.key}"
        return protected


@dataclass
class PublishReport:
    """What publishing did: one result per photo and target, the records held back, the gallery written."""

    results: list[PublishResult] = field(default_factory=list)
    held_back: list[str] = field(default_factory=list)  # below --min-confidence, no label to say instead
    labelled: list[str] = field(default_factory=list)  # below --min-confidence, published as "Image may contain: ..."
    gallery: Path | None = None

    def counts(self) -> dict[str, int]:
        return metadata.counts(self.results)

    @property
    def failed(self) -> list[PublishResult]:
        return [r for r in self.results if r.status is Status.FAILED]


def is_low_confidence(record: dict[str, Any], min_confidence: float | None) -> bool:
    """Whether ``record`` has a ``confidence`` below ``min_confidence`` (no confidence: never low)."""
    conf = record.get("confidence")
    return min_confidence is not None and isinstance(conf, int | float) and conf < min_confidence


def mark_low_confidence(records: Sequence[dict[str, Any]], min_confidence: float | None) -> bool:
    """Set (or clear) each record's ``low_confidence`` mark; True when any record changed."""
    changed = False
    for rec in records:
        low = is_low_confidence(rec, min_confidence)
        if low and rec.get("low_confidence") is not True:
            rec["low_confidence"], changed = True, True
        elif not low and "low_confidence" in rec:
            del rec["low_confidence"]
            changed = True
    return changed


def pair_records(inputs: Sequence[str | Path], records: Sequence[dict[str, Any]],
                 recursive: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """``(photo, record)`` for each input file that has a record, in the inputs' order."""
    by_key = {record_key(r): r for r in records}
    return [(it.path, by_key[it.key]) for it in collect_inputs(inputs, recursive) if it.key in by_key]


def publish_records(items: Sequence[tuple[Path, dict[str, Any]]], request: PublishRequest,
                    model: str) -> PublishReport:
    """Publish paired records. A record marked ``low_confidence`` gives metadata and sidecars its labels' alt text
    (``Image may contain: cat``, :func:`capcli.alttext.label_alt_text`) instead of its caption, or nothing when no
    label has the evidence; the output and the gallery keep its caption."""
    report = PublishReport()
    kept = []
    notes: dict[Path, list[str]] = {}  # for the gallery's cards
    for photo, rec in items:
        if not (rec.get("low_confidence") or is_low_confidence(rec, request.min_confidence)):
            kept.append((photo, rec))
            continue
        honest = label_alt_text(rec.get("labels"))  # what the evidence supports, in place of a doubtful caption
        if honest == NO_DESCRIPTION:
            report.held_back.append(str(rec.get("path", photo.name)))
            notes.setdefault(photo, []).append("below --min-confidence: kept out of metadata and sidecars")
        else:
            report.labelled.append(str(rec.get("path", photo.name)))
            kept.append((photo, {**rec, "caption": honest}))
            notes.setdefault(photo, []).append(f'below --min-confidence: metadata and sidecars say "{honest}"')
    opts = PublishOptions(WrittenBy(model=model), overwrite=request.overwrite, dry_run=request.dry_run,
                          naming=request.naming)
    for how in request.hows:
        report.results += metadata.publish(kept, how, opts)
    report.results = metadata.covered_by_sidecars(report.results)
    for r in report.results:
        if r.status is Status.SKIPPED:
            notes.setdefault(r.photo, []).append(f"{r.target.name}: {r.reason}")
    if request.html is not None:
        report.gallery = gallery.write_gallery(request.html, list(items), notes=notes)
    return report


def publish_captioned(run: Captioned, request: PublishRequest, model: str) -> PublishReport:
    """Publish what a caption run left in its output (``caption_files(..., keep_records=True)``), marking the
    low-confidence records in the output (rewritten as it is laid out, when a mark changed)."""
    if mark_low_confidence(run.records, request.min_confidence):
        rewrite_records(run.out, run.records, run.found)
    return publish_records(run.pairs, request, model)


def publish_output(out: str | Path, inputs: Sequence[str | Path], request: PublishRequest, model: str,
                   recursive: bool = False) -> PublishReport:
    """Publish the records of a caption output written earlier, ``out``, for the files of ``inputs`` (read and
    walked here; after a run, :func:`publish_captioned` takes what the run has instead)."""
    found = read_output(out)
    return publish_captioned(Captioned(Path(out), found.records, found,
                                       pair_records(inputs, found.records, recursive)), request, model)
