"""Image loading: the one function that turns a file (or bytes) into encoder input pixels.

Extraction, inference, evaluation and the web app all call `load_image`, so an image is always
decoded, oriented, converted and resized the same way (see `docs` in the shared encoders page).

The pixel budget is decided from the header, before any pixel is decoded: a JPEG is reduced while it
decodes (Pillow's draft mode, by a power of two, to at least twice the target size); an image that
would still decode to more than `max_pixels` pixels is refused with `ImageDecodeError`. An accepted image
is shrunk by an integer factor in its own mode before the 8-bit RGB conversion, so the conversions
work on a small copy. Pillow's own decompression-bomb check (at open) stays in force above that.
Peak memory per accepted image: about 4 to 8 bytes per pixel decoded, so at most about 400 MB at the
default budget (a 50-megapixel RGBA PNG; a 50-megapixel JPEG: 7 MB); measured in BENCHMARKS.md.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_MAX_PIXELS = 50_000_000  # a 50-megapixel camera photo decodes; a 13000 x 13000 PNG does not
_REDUCIBLE_MODES = frozenset({"L", "LA", "I", "F", "RGB", "RGBA", "CMYK"})  # modes Image.reduce works in
_max_pixels = DEFAULT_MAX_PIXELS


class ImageDecodeError(ValueError):
    """An image file that cannot be turned into pixels (missing, empty, corrupt, not an image, too large)."""


def set_max_pixels(limit: int) -> None:
    """Set the process-wide pixel budget `load_image` uses when it is given none (the CLIs' --max-pixels)."""
    global _max_pixels
    if limit < 1:
        raise ValueError(f"the pixel budget must be at least 1, got {limit}")
    _max_pixels = int(limit)


def max_pixels() -> int:
    """Return the process-wide pixel budget: `DEFAULT_MAX_PIXELS` unless `set_max_pixels` changed it."""
    return _max_pixels


def pixel_count(text: str) -> int:
    """Return a pixel budget parsed from the command line: '50000000', '50e6' or '50M' (argparse type)."""
    scale = 1_000_000 if text[-1:] in ("M", "m") else 1
    value = float(text[:-1] if scale > 1 else text)
    if not value >= 1 / scale:  # also refuses nan
        raise ValueError(f"not a positive pixel count: {text!r}")
    return int(value * scale)


def _to_rgb(image: Image.Image, sixteen_bit: bool = False) -> Image.Image:
    """Return an 8-bit RGB image: grayscale, palette, RGBA (on white), CMYK and 16-bit all convert.

    `sixteen_bit`: the image was decoded from 16-bit samples (and may since be mode "I"), so its
    range is 0..65535 whatever its values.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer grayscale: scale the real range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if sixteen_bit or image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / high * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = float(array.max() - array.min()) or 1.0
        array = ((array - array.min()) / span * 255.0).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _check_budget(image: Image.Image, size: int, limit: int, name: str) -> None:
    """Reduce a JPEG's decoding size (draft mode); refuse an image that would still decode over `limit` pixels."""
    # Draft decoding shrinks huge photos by a power of two while decoding (still at least twice the
    # target size, so the final bilinear resize barely changes); it only changes the decoder's plan.
    image.draft(None, (2 * size, 2 * size))
    width, height = image.size
    if width * height > limit:
        raise ImageDecodeError(
            f"{name}: {width} x {height} pixels ({width * height / 1e6:.1f} megapixels) is over the limit of "
            f"{limit / 1e6:g} megapixels (--max-pixels)"
        )


def _shrink(image: Image.Image, size: int) -> Image.Image:
    """Return the image reduced by an integer factor (box average) to at least twice `size` a side.

    The non-JPEG counterpart of draft mode: the mode conversions then run on the small copy.
    Palette and 1-bit images are expanded first (they cannot be averaged), 16-bit ones widened to "I".
    """
    # At most 64: Pillow's fixed-point box average drifts for huge factors (a 750x reduce turns 252 into 245).
    factor = min(image.width // (2 * size), image.height // (2 * size), 64)
    if factor < 2:
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    return image.reduce(factor) if image.mode in _REDUCIBLE_MODES else image


def _decode(image: Image.Image, size: int, limit: int, name: str) -> np.ndarray:
    _check_budget(image, size, limit, name)
    image.load()
    ImageOps.exif_transpose(image, in_place=True)  # in place: no full-size copy
    sixteen_bit = image.mode.startswith("I;16")
    image = _to_rgb(_shrink(image, size), sixteen_bit)
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _open(source: str | Path | bytes, name: str) -> io.BufferedIOBase:
    """Return a binary handle on `source`; raise ImageDecodeError for a missing or empty file."""
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError(f"{name}: empty file (0 bytes)")
        return io.BytesIO(source)
    path = Path(source)
    if not path.is_file():
        raise ImageDecodeError(f"{name}: no such file")
    if path.stat().st_size == 0:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    return path.open("rb")


def load_image(source: str | Path | bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Return the image as a float32 array of shape (size, size, 3) with values in [0, 255].

    Decodes with Pillow within the pixel budget (`max_pixels`; None: the process-wide one, see
    `set_max_pixels`), applies the EXIF orientation, converts to 8-bit RGB and resizes the whole image
    (no crop) with bilinear filtering. Raises `ImageDecodeError` for anything unreadable or too large.
    """
    name = "<upload>" if isinstance(source, bytes) else str(source)
    limit = _max_pixels if max_pixels is None else max_pixels
    try:
        with _open(source, name) as handle, warnings.catch_warnings():
            # A decompression-bomb *warning* becomes an error only past Pillow's hard limit; keep quiet.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                return _decode(image, size, limit, name)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"{name}: too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({error})") from None


def list_images(folder: str | Path) -> list[Path]:
    """Return the image files directly inside `folder`, by suffix, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
