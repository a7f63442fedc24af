"""Image loading: the one function that turns a file (or bytes) into encoder input pixels.

Extraction, inference, evaluation and the web app all call `load_image`, so an image is always
decoded, oriented, converted and resized the same way (see `docs` in the shared encoders page).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


class ImageDecodeError(ValueError):
    """An image file that cannot be turned into pixels (missing, empty, corrupt, not an image)."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Return an 8-bit RGB image: grayscale, palette, RGBA (on white), CMYK and 16-bit all convert."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer grayscale: scale the real range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
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


def load_image(source: str | Path | bytes, size: int) -> np.ndarray:
    """Return the image as a float32 array of shape (size, size, 3) with values in [0, 255].

    Decodes with Pillow, applies the EXIF orientation, converts to 8-bit RGB and resizes the whole
    image (no crop) with bilinear filtering. Raises `ImageDecodeError` for anything unreadable.
    """
    name = "<upload>" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageDecodeError(f"{name}: empty file (0 bytes)")
            handle = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageDecodeError(f"{name}: no such file")
            if path.stat().st_size == 0:
                raise ImageDecodeError(f"{name}: empty file (0 bytes)")
            handle = path.open("rb")
        with handle, warnings.catch_warnings():
            # A decompression-bomb *warning* becomes an error only past Pillow's hard limit; keep quiet.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                # JPEG draft decoding: shrink huge photos by a power of two while decoding (still
                # at least twice the target size, so the final bilinear resize barely changes).
                image.draft(None, (2 * size, 2 * size))
                image = ImageOps.exif_transpose(image)
                image = _to_rgb(image)
                image = image.resize((size, size), Image.Resampling.BILINEAR)
                return np.asarray(image, dtype=np.float32)
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
