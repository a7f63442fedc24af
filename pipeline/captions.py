"""Caption files and splits in the formats Flickr8k ships, and caption cleaning.

- `Flickr8k.token.txt`: `IMAGE.jpg#N<TAB>caption`
- `captions.txt`: CSV with an `image,caption` header; split on the first comma only (captions may
  hold commas, and the Kaggle copy quotes those)
- `Flickr_8k.{train,dev,test}Images.txt`: one image id per line

Which file of a dataset folder holds what is the dataset's business: see `pipeline.datasets`.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from nltk.tokenize import wordpunct_tokenize


class CaptionFileError(ValueError):
    """A caption or split file that is missing or malformed."""


Captions = dict[str, list[str]]  # image id -> raw captions, in file order


def read_token_file(path: str | Path) -> Captions:
    """Return captions from a Flickr8k token file (`IMAGE#N<TAB>caption` lines)."""
    captions: Captions = defaultdict(list)
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab or "#" not in key:
            raise CaptionFileError(f"{path}:{number}: expected 'IMAGE#N<TAB>caption', got {line[:60]!r}")
        captions[key.rsplit("#", 1)[0]].append(caption.strip())
    return dict(captions)


def read_captions_csv(path: str | Path) -> Captions:
    """Return captions from an `image,caption` CSV, splitting each row on its first comma."""
    lines = _read_lines(path)
    if not lines or lines[0].strip().lower() != "image,caption":
        raise CaptionFileError(f"{path}: expected an 'image,caption' header line")
    captions: Captions = defaultdict(list)
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        image, comma, caption = line.partition(",")
        if not comma:
            raise CaptionFileError(f"{path}:{number}: expected 'image,caption', got {line[:60]!r}")
        caption = caption.strip()
        if len(caption) >= 2 and caption[0] == caption[-1] == '"':
            caption = caption[1:-1].replace('""', '"')
        captions[image.strip()].append(caption)
    return dict(captions)


def read_split(path: str | Path) -> list[str]:
    """Return the image ids listed in a split file, in order."""
    return [line.strip() for line in _read_lines(path) if line.strip()]


def clean_caption(text: str) -> list[str]:
    """Return the caption's words: lowercased, punctuation and non-alphabetic tokens dropped.

    NLTK's `wordpunct_tokenize` is a regular expression, so it needs no downloaded NLTK data. Words are
    interned: COCO's 600k captions then hold one copy of each word, not one per use (a third of a GB).
    """
    return [sys.intern(token) for token in wordpunct_tokenize(text.lower()) if token.isalpha()]


_SIDES = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}
_SIDE_WORD = re.compile(r"\b(?:left|right|Left|Right|LEFT|RIGHT)\b")


def mirror_caption(text: str) -> str:
    """Return the caption of the image's mirror image: `left` and `right` swapped, as whole words."""
    return _SIDE_WORD.sub(lambda match: _SIDES[match.group(0)], text)


@dataclass
class SplitCaptions:
    """The cleaned captions of one split, restricted to ids that have features."""

    image_ids: list[str]
    captions: dict[str, list[list[str]]]  # image id -> cleaned captions
    skipped: list[str]  # split ids with no captions or no features


def select_split(captions: Captions, split_ids: list[str], available: set[str] | None) -> SplitCaptions:
    """Return the split's cleaned captions, skipping (and listing) ids without captions or features."""
    kept, skipped, cleaned = [], [], {}
    for image_id in split_ids:
        if image_id not in captions or (available is not None and image_id not in available):
            skipped.append(image_id)
            continue
        kept.append(image_id)
        cleaned[image_id] = [clean_caption(c) for c in captions[image_id]]
    return SplitCaptions(kept, cleaned, skipped)


def _read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CaptionFileError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise CaptionFileError(f"{path}: not UTF-8 text ({error})") from None
