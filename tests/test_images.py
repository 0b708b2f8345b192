"""images.load_image: every odd kind of photo becomes an upright RGB image; bad files raise ImageError."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capcli.errors import ImageError
from capcli.images import MAX_PIXELS, is_image_file, load_image, to_rgb


def _rgb(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_example_photos_load_as_rgb(example_photos) -> None:
    for p in example_photos:
        img = load_image(p)
        assert img.mode == "RGB" and min(img.size) > 16, p


def test_grayscale_png_becomes_rgb(example_photos) -> None:
    camera = next(p for p in example_photos if p.name == "camera.png")
    with Image.open(camera) as raw:
        assert raw.mode == "L"  # the shipped photo really is grayscale
        gray = np.asarray(raw)
    a = np.asarray(load_image(camera))
    assert a.shape == (*gray.shape, 3)
    assert (a[..., 0] == gray).all() and (a[..., 1] == gray).all() and (a[..., 2] == gray).all()


def test_exif_orientation_is_applied(tmp_path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert raw.size == (40, 20) and raw.getexif()[0x0112] == 6
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)  # rotated upright
    r, _, b = _rgb(out, (10, 5))  # the stored left (red) side is now on top
    assert r > 200 and b < 60
    r, _, b = _rgb(out, (10, 35))
    assert b > 200 and r < 60


def test_big_jpeg_decodes_small_when_the_encoder_needs_small(tmp_path, example_photos) -> None:
    """min_size: a big JPEG decodes at a DCT scale that is still >= min_size, upright, and preprocesses to nearly
    the same encoder input as the full decode."""
    from capcli.encoders import get_spec

    photo = next(p for p in example_photos if p.name == "chelsea.jpg")
    big = Image.open(photo).convert("RGB").resize((1800, 1200), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    big.save(tmp_path / "big.jpg", quality=92, exif=exif)
    full, small = load_image(tmp_path / "big.jpg"), load_image(tmp_path / "big.jpg", min_size=224)
    assert full.size == (1200, 1800)  # upright
    assert small.size == (300, 450)  # 1/4 scale: the smallest that keeps both sides >= 224, upright too
    spec = get_spec("efficientnet-lite0")
    a = spec.preprocess(full).float()
    b = spec.preprocess(small).float()
    assert (a - b).abs().mean() < 1.5  # grey levels of 255
    png = tmp_path / "big.png"
    big.save(png)
    assert load_image(png, min_size=224).size == (1800, 1200)  # not a JPEG: decoded whole


def test_cmyk_jpeg(tmp_path) -> None:
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # red in CMYK
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg")
    r, g, b = _rgb(out, (16, 12))
    assert out.size == (32, 24) and r > 200 and g < 60 and b < 60


def test_16bit_png_keeps_its_brightness(tmp_path) -> None:
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (8, 1))).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as raw:
        assert raw.mode.startswith("I")
    a = np.asarray(load_image(tmp_path / "ramp16.png"))
    assert a.shape == (8, 64, 3) and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # still gray
    assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255
    assert abs(int(a[0, 32, 0]) - round(ramp[32] / 257)) <= 1  # full 16-bit range maps linearly to 8 bits
    # A dark 16-bit photo stays dark: it is not stretched to full contrast.
    Image.fromarray(np.full((8, 8), 1024, np.uint16)).save(tmp_path / "dark16.png")
    assert np.asarray(load_image(tmp_path / "dark16.png")).max() <= 5


def _half_transparent(mode: str) -> Image.Image:
    img = Image.new("RGBA", (20, 10), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (10, 0, 20, 10))  # right half fully transparent
    return img.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_becomes_white(tmp_path, mode: str) -> None:
    path = tmp_path / f"alpha_{mode}.png"
    _half_transparent(mode).save(path)
    with Image.open(path) as raw:
        assert raw.mode == mode
    out = load_image(path)
    assert _rgb(out, (15, 5)) == (255, 255, 255)  # transparent -> white
    assert _rgb(out, (5, 5)) == (0, 0, 0)


def test_palette_alpha_mode_becomes_white() -> None:
    img = _half_transparent("PA")  # PNG cannot store PA, so convert in memory
    assert img.mode == "PA" and img.getpixel((15, 5))[1] == 0
    out = to_rgb(img)
    assert _rgb(out, (15, 5)) == (255, 255, 255) and _rgb(out, (5, 5)) == (0, 0, 0)


def test_palette_with_transparency(tmp_path) -> None:
    img = Image.new("P", (20, 10), 1)
    img.putpalette([0, 255, 0] + [255, 0, 0] * 255)  # index 0 green, the rest red
    img.paste(0, (10, 0, 20, 10))
    img.save(tmp_path / "pal.png", transparency=0)  # index 0 (the right half) is transparent
    img.save(tmp_path / "pal.gif", transparency=0)
    for name in ("pal.png", "pal.gif"):
        out = load_image(tmp_path / name)
        assert _rgb(out, (15, 5)) == (255, 255, 255), name
        assert _rgb(out, (5, 5)) == (255, 0, 0), name


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_truncated_jpeg(tmp_path, example_photos) -> None:
    src = next(p for p in example_photos if p.name == "chelsea.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(src[: len(src) // 2])
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "cut.jpg")
    msg = _one_line(e)
    assert msg.startswith("cut.jpg: cannot decode") and "truncated" in msg


@pytest.mark.parametrize(("content", "name"), [(b"hello, I am not a photo\n", "notes.jpg"), (b"", "empty.png")])
def test_non_image_file(tmp_path, content: bytes, name: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / name)
    assert _one_line(e) == f"{name}: not an image file"


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "nope.jpg")
    assert _one_line(e).endswith("nope.jpg: no such file")


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A real tiny PNG (1x1 pixel data) whose header declares width x height."""
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # valid CRC: only the size is a lie
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("width", "height"), [(10_000, 9_000), (60_000, 60_000)])  # just over, and far over
def test_decompression_bomb(tmp_path, width: int, height: int) -> None:
    assert width * height > MAX_PIXELS
    path = tmp_path / "bomb.png"
    _png_claiming(path, width, height)
    assert path.stat().st_size < 200
    with pytest.raises(ImageError) as e:
        load_image(path)
    msg = _one_line(e)
    assert msg.startswith("bomb.png:") and "decompression bomb" in msg


def test_large_but_allowed_header_is_not_a_bomb(tmp_path) -> None:
    path = tmp_path / "wide.png"
    _png_claiming(path, 3, 1)  # declared 3x1 with 1 pixel of data: a plain decode failure, not a bomb
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert "bomb" not in _one_line(e)


def test_is_image_file() -> None:
    assert is_image_file(Path("a/B.JPG")) and is_image_file(Path("x.png")) and is_image_file(Path("x.webp"))
    assert not is_image_file(Path("notes.txt")) and not is_image_file(Path("jpg"))


def test_unparseable_exif_decodes_without_pillow_warnings(tmp_path, example_photos) -> None:
    """A JPEG whose EXIF Pillow cannot parse still decodes, and Pillow's warnings (with its own file paths) do not
    reach the user's terminal."""
    import io
    import warnings

    photo = next(p for p in example_photos if p.name == "chelsea.jpg")
    buf = io.BytesIO()
    bad_exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x0f\x00\x02\x00\x00\x00\xff\xff\xff\xff\xff"
    Image.open(photo).save(buf, "JPEG", exif=bad_exif)
    (tmp_path / "bad-exif.jpg").write_bytes(buf.getvalue())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(tmp_path / "bad-exif.jpg") as im:
            im.getexif()  # control: Pillow itself does warn about this EXIF
        assert caught, "the EXIF was meant to be unparseable"
        caught.clear()
        img = load_image(tmp_path / "bad-exif.jpg")
    assert img.size == Image.open(photo).size and not caught, [str(w.message) for w in caught]
