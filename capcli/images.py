"""Reading photos robustly: the one place that turns a file into an RGB PIL image.

Handles EXIF orientation, grayscale, palette, CMYK, 16-bit and alpha images; truncated files,
non-images and decompression bombs raise :class:`ImageError` with a one-line reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# PIL warns above MAX_IMAGE_PIXELS and raises above twice that; we refuse anything over the limit.
MAX_PIXELS = 89_478_485


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent areas become white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping.
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size and a.max() > 0 else 1.0
        img = Image.fromarray((a * (255.0 / hi)).clip(0, 255).astype("uint8"), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an upright RGB image, or raise :class:`ImageError`."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{path.name}: {w}x{h} pixels is too large (possible decompression bomb)")
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path.name}: too large (possible decompression bomb)") from e
    except FileNotFoundError as e:
        raise ImageError(f"{path}: no such file") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path.name}: not an image file") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path.name}: cannot decode ({e})") from e
