"""File names that are not valid UTF-8, and how every record capcli writes keeps them.

A POSIX file name is bytes; Python holds each byte that is not UTF-8 as a lone surrogate U+DC80..U+DCFF
(``os.fsdecode``, "surrogateescape"), and such a string cannot be written as UTF-8 text. The rule for the
records of ``capcli caption`` (all three formats):

- ``path``: the name as readable text, each byte that is not UTF-8 written as ``\\xNN`` (``bad\\xffname.jpg``);
- ``path_bytes``: present (non-empty) only for such names: the exact bytes of ``path``, base64 (RFC 4648).

A reader takes ``path_bytes`` when it is there, else ``path`` (as ``--resume`` does): lossless and never
ambiguous, since a name that really holds a backslash has no ``path_bytes``. Files that only capcli reads back
(manifests, dataset.json) keep such names as JSON ``\\udcNN`` escapes instead (:func:`capcli.atomic.write_json`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogates(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def name_bytes(text: str) -> bytes:
    """The bytes a (surrogate-escaped) name stands for."""
    return text.encode("utf-8", "surrogateescape")


def display(text: str) -> str:
    """``text`` as valid UTF-8: undecodable name bytes become ``\\xNN`` (anything else unpaired ``\\udNNN``)."""
    if not has_surrogates(text):
        return text
    try:
        return name_bytes(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (U+D800..U+DC7F, U+DD00..)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def path_fields(key: str) -> dict[str, str]:
    """The ``path`` (and, for a name that is not UTF-8, ``path_bytes``) of a record for file ``key``."""
    if not has_surrogates(key):
        return {"path": key}
    return {"path": display(key), "path_bytes": base64.b64encode(name_bytes(key)).decode("ascii")}


def record_key(rec: Mapping[str, Any]) -> str:
    """The file a record names, as Python holds it: ``path_bytes`` decoded when present, else ``path``."""
    raw = rec.get("path_bytes")
    if raw:
        try:
            return base64.b64decode(str(raw), validate=True).decode("utf-8", "surrogateescape")
        except (binascii.Error, ValueError):
            pass  # damaged: fall back to the readable form
    return str(rec["path"])
