"""Training-time augmentation: deterministic variants of an image, named in its feature-store id.

An augmented id is the original id plus `#name`, e.g. `daisy/1.jpg#flip`. The extraction loop
decodes the file with `load_image` as always, then calls `augment_pixels(image_id, pixels)`, which
applies the variant the id names. Because the variant is fixed by the id, an interrupted extraction
resumes with exactly the same vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

SEPARATOR = "#"
FLIP = "flip"  # the horizontal mirror: the classifier's test-time augmentation, the captioner's --mirror
ROTATION_DEGREES = 10.0
BRIGHTNESS_FACTOR = 1.25


def _flip(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels[:, ::-1])


def _rotate(pixels: np.ndarray) -> np.ndarray:
    # Rotate, then zoom in on the largest centred square with no empty corner, back to full size.
    size = pixels.shape[0]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).rotate(
        ROTATION_DEGREES, resample=Image.Resampling.BILINEAR
    )
    angle = math.radians(ROTATION_DEGREES)
    side = size / (math.cos(angle) + math.sin(angle))
    margin = (size - side) / 2
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=(margin, margin, size - margin, size - margin))
    return np.asarray(image, dtype=np.float32)


def _brighten(pixels: np.ndarray) -> np.ndarray:
    return np.clip(pixels * BRIGHTNESS_FACTOR, 0, 255).astype(np.float32)


AUGMENTATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    FLIP: _flip,  # horizontal mirror
    "rotate": _rotate,  # 10 degrees counter-clockwise, cropped to hide the corners
    "bright": _brighten,  # brightness x1.25
}


def augmented_id(image_id: str, augmentation: str) -> str:
    """Return the id of `image_id`'s variant `augmentation` (e.g. `daisy/1.jpg#flip`)."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return f"{image_id}{SEPARATOR}{augmentation}"


def augmented_sources(sources: dict[str, object], augmentations: list[str] | None = None) -> dict[str, object]:
    """Return {augmented id: path} for every image of `sources` and every augmentation (default: all)."""
    names = list(AUGMENTATIONS) if augmentations is None else augmentations
    return {augmented_id(image_id, name): path for image_id, path in sources.items() for name in names}


def original_id(image_id: str) -> str:
    """Return the id of the image an (augmented or plain) id was made from."""
    base, separator, name = image_id.rpartition(SEPARATOR)
    return base if separator and name in AUGMENTATIONS else image_id


def augment_pixels(image_id: str, pixels: np.ndarray) -> np.ndarray:
    """Return `pixels` transformed by the augmentation `image_id` names, or unchanged if it names none."""
    _, separator, name = image_id.rpartition(SEPARATOR)
    if separator and name in AUGMENTATIONS:
        return AUGMENTATIONS[name](pixels)
    return pixels
