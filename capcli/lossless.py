"""What a metadata edit must leave unchanged in a photo: its image data, as a digest to compare before and after."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sos_offset(data: bytes) -> int:
    """Where a JPEG's first SOS marker is: the compressed image starts there (the segments before are metadata)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError("corrupt JPEG marker sequence")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:
            return i
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2: i + 4], "big")
    raise ValueError("no SOS marker")


def image_data_digest(path: str | Path) -> str:
    """SHA-256 of what metadata edits must not change: a JPEG's bytes from its first SOS to the end of the file
    (the scan, and whatever follows EOI: a motion photo's video, MPF images), else the decoded pixels of every frame.
    """
    data = Path(path).read_bytes()
    if data[:2] == b"\xff\xd8":
        return hashlib.sha256(data[sos_offset(data):]).hexdigest()
    from PIL import Image, ImageSequence

    h = hashlib.sha256()
    with Image.open(path) as im:
        for frame in ImageSequence.Iterator(im):
            h.update(f"{frame.mode} {frame.size}".encode())
            h.update(frame.tobytes())
    return h.hexdigest()
