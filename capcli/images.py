"""Reading photos robustly: the one place that turns a file into an RGB PIL image.

Handles EXIF orientation, grayscale, palette, CMYK, 16-bit and alpha images; truncated files,
non-images and decompression bombs raise :class:`ImageError` with a one-line reason.

Formats: what Pillow reads (JPEG, PNG, WebP, TIFF, BMP, GIF, AVIF), HEIC/HEIF through the pillow-heif plugin
(libheif applies the photo's rotation while decoding; with ``min_size`` an embedded thumbnail at least that
large is decoded instead, as iPhones store a 320x240 one: ~20x faster than a 12-megapixel picture) and camera
RAW files through rawpy (LibRaw): the camera's embedded JPEG preview when it is large enough (much faster than
demosaicing), else a half-size decode of the raw data, turned upright by the camera's orientation either way.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

try:  # HEIC/HEIF (iPhones save HEIC by default): registers an opener with Pillow, in every process importing this
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
except ImportError:  # pragma: no cover - pillow-heif is a dependency; without it HEIC files fail with a reason
    HEIF_EXTENSIONS = frozenset()

# Camera RAW formats LibRaw reads (Canon, Nikon, Sony, Fujifilm, Olympus, Panasonic, Pentax, Samsung, Leica,
# Hasselblad, Phase One, Sigma, Kodak, Minolta, Adobe DNG).
RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf",
                            ".rw2", ".raw", ".pef", ".srw", ".rwl", ".3fr", ".fff", ".iiq", ".x3f", ".erf", ".kdc",
                            ".dcr", ".mrw", ".mos", ".mef"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".avif"}) | HEIF_EXTENSIONS | RAW_EXTENSIONS
# LibRaw's orientation code -> the transpose that turns the picture upright.
_LIBRAW_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}

# PIL warns above MAX_IMAGE_PIXELS and raises above twice that; we refuse anything over the limit.
MAX_PIXELS = 89_478_485


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an extension capcli reads (case-insensitive: ``.HEIC``, ``.Cr2``)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def not_a_file(mode: int) -> str | None:
    """What a ``st_mode`` is when it is not a regular file ("a named pipe (FIFO)", ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def link_problem(path: Path, e: OSError) -> str | None:
    """Why ``path`` cannot be opened when that is its symbolic link: broken (its target is missing) or a loop."""
    if e.errno == errno.ELOOP:
        return "a symbolic link loop"
    if e.errno == errno.ENOENT and path.is_symlink():
        try:
            return f"a broken symbolic link (to {os.readlink(path)})"
        except OSError:
            return "a broken symbolic link"
    return None


def _open_failure(path: Path, e: OSError) -> str:
    """Why opening ``path`` failed, in a few words."""
    problem = link_problem(path, e)
    if problem is not None:
        return problem
    if e.errno == errno.ENXIO:  # open() refuses a socket
        with contextlib.suppress(OSError):
            return f"{not_a_file(os.stat(path).st_mode) or 'not a regular file'}, not a photo file"
    return f"cannot read ({e.strerror or e})"


def open_photo(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (or a symbolic link to one), else :class:`ImageError`.

    Opened without blocking and checked before anything is read: a named pipe (FIFO) with a photo's name would
    otherwise wait forever for a writer, and a device could be read without end.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ENOENT and not path.is_symlink():
            raise ImageError(f"{path}: no such file") from e
        raise ImageError(f"{path.name}: {_open_failure(path, e)}") from e
    kind = not_a_file(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise ImageError(f"{path.name}: {kind}, not a photo file")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)  # reads of a file on a network filesystem may otherwise fail with EAGAIN
    return os.fdopen(fd, "rb")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent areas become white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16/32-bit grayscale: scale to 8 bits instead of clipping. 16-bit data maps its full range
        # 0..65535 to 0..255 (a dark photo stays dark); 32-bit "I" data holding 8- or 16-bit values is
        # read as such, anything larger is scaled by its own maximum.
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        top = a.max() if a.size else 0.0
        hi = 65535.0 if img.mode != "I" or 255 < top <= 65535 else 255.0 if top <= 255 else top
        img = Image.fromarray((a * (255.0 / hi)).round().clip(0, 255).astype("uint8"))  # mode L
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Open ``path`` as an upright RGB image, or raise :class:`ImageError`.

    ``min_size``: the image is only needed at least that large on both sides (an encoder's input), so a JPEG
    may be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's ``draft``): a 12-megapixel photo then
    decodes ~10x faster, and the encoder's input differs by ~0.4 grey levels on average.
    """
    path = Path(path)
    if path.suffix.lower() in RAW_EXTENSIONS:
        return _load_raw(path, min_size)
    with open_photo(path) as f:
        return decode_image(f, path.name, min_size)


def decode_bytes(data: bytes, name: str, min_size: int | None = None) -> Image.Image:
    """A photo held in memory (a tar member, a table's bytes column) as :func:`load_image` reads a file: ``name``
    says its format (a camera RAW goes through a temporary file of that name: LibRaw reads files, and RAW photos
    are few) and names it in an :class:`ImageError`."""
    if os.path.splitext(name)[1].lower() not in RAW_EXTENSIONS:
        return decode_image(io.BytesIO(data), name, min_size)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="capcli-raw-") as tmp:
        path = os.path.join(tmp, os.path.basename(name))
        with open(path, "wb") as f:
            f.write(data)
        return load_image(path, min_size)


def decode_image(f: BinaryIO, name: str, min_size: int | None = None) -> Image.Image:
    """An open photo file (or the bytes of one in memory) as an upright RGB image, or :class:`ImageError` whose
    reason starts with ``name``; ``min_size`` as for :func:`load_image`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow warns on stderr, with its own file paths, about metadata it cannot parse ("Corrupt EXIF data",
            # "Tag data larger than file"); the photo still decodes, and the caption does not need it
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(f) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{name}: {w}x{h} pixels is too large (possible decompression bomb)")
                if min_size is not None:
                    im.draft(im.mode, (min_size, min_size))  # JPEG: DCT scaling; HEIC: a thumbnail; others: no-op
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: too large (possible decompression bomb)") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image file") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot decode ({e})") from e


def _load_raw(path: Path, min_size: int | None) -> Image.Image:
    """A camera RAW file as an upright RGB image: its embedded preview if at least ``min_size``, else a
    half-size decode of the raw data (LibRaw applies the camera's orientation to that itself)."""
    try:
        import rawpy
    except ImportError:  # pragma: no cover - rawpy is a dependency
        raise ImageError(f"{path.name}: reading camera RAW files needs rawpy (pip install rawpy)") from None
    try:
        with open_photo(path) as f, rawpy.imread(f) as raw:  # a file object: any file name, any encoding
            preview = _raw_preview(raw, min_size)
            if preview is not None and (min_size is None or min(preview.size) >= min_size):
                return preview
            try:
                rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
            except (rawpy.LibRawError, MemoryError) as e:
                if preview is not None:
                    return preview  # small, but better than nothing
                raise ImageError(f"{path.name}: cannot decode its raw data ({_libraw_reason(e)})") from e
            if preview is not None and min(preview.size) >= min(rgb.shape[:2]):
                return preview  # the raw data is no larger than the preview
            return Image.fromarray(rgb)
    except rawpy.LibRawError as e:
        raise ImageError(f"{path.name}: not a camera RAW file LibRaw can read ({_libraw_reason(e)})") from e
    except OSError as e:
        raise ImageError(f"{path.name}: cannot read ({e.strerror or e})") from e


def _raw_preview(raw, min_size: int | None) -> Image.Image | None:  # noqa: ANN001 (rawpy.RawPy)
    """The largest embedded preview, upright (decoded no smaller than ``min_size`` for a JPEG, as
    :func:`load_image`), or None when there is none LibRaw can extract."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except rawpy.LibRawError:
        return None
    try:
        if thumb.format == rawpy.ThumbFormat.JPEG:
            with Image.open(io.BytesIO(thumb.data)) as im:
                if min_size is not None:
                    im.draft("RGB", (min_size, min_size))
                im.load()
                own = im.getexif().get(0x0112, 1)
                im = ImageOps.exif_transpose(im) if own not in (None, 1) else im.copy()
        else:
            im, own = Image.fromarray(thumb.data), 1
    except (OSError, SyntaxError, ValueError):
        return None  # a damaged preview: decode the raw data instead
    flip = _LIBRAW_FLIP.get(raw.sizes.flip)
    if own in (None, 1) and flip is not None:  # previews are stored as the sensor saw them
        im = im.transpose(flip)
    return to_rgb(im)


def _libraw_reason(e: Exception) -> str:
    text = e.args[0] if e.args else type(e).__name__
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text)


def thumbnail_data_uri(path: str | Path, px: int, quality: int = 80) -> tuple[str, tuple[int, int]]:
    """A photo as an upright JPEG ``data:`` URI at most ``px`` on its longest side (so a page keeps working when
    moved), and the thumbnail's size."""
    img = load_image(path, min_size=px)
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.size
