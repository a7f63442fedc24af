"""Caption datasets behind one interface: splits, captions, image paths, whatever the format on disk.

`open_dataset(path)` detects the format from what is at `path`; training, evaluation and extraction
then ask the dataset and never which format it is. A format is a `CaptionDataset` subclass with a
`detect` classmethod, added with `register_format`; Flickr8k's folder layout is the first:

- `Images/`: the photos, named by image id
- `Flickr8k.token.txt` (preferred) or `captions.txt`: the captions (readers in `pipeline.captions`)
- `Flickr_8k.{train,dev,test}Images.txt`: the official splits, one image id per line
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from pipeline.captions import CaptionFileError, Captions, read_captions_csv, read_split, read_token_file


class CaptionDataset(ABC):
    """Images with reference captions and named splits, stored in one of the field's formats."""

    format_name: ClassVar[str]  # short name of the format, e.g. "flickr8k"
    expected: ClassVar[str]  # what `detect` looks for, in words, for the "no dataset here" error
    splits: tuple[str, ...]  # the split names this dataset has, e.g. ("train", "dev", "test")

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._captions: Captions | None = None

    @classmethod
    @abstractmethod
    def detect(cls, path: Path) -> bool:
        """Return whether `path` (a folder or a file) holds a dataset of this format."""

    @abstractmethod
    def _read_captions(self) -> Captions:
        """Return image id -> raw captions for every image, read from disk."""

    @abstractmethod
    def _read_split(self, split: str) -> list[str]:
        """Return the image ids of `split`, one of `self.splits`, read from disk."""

    @abstractmethod
    def image_path(self, image_id: str) -> Path:
        """Return where the image `image_id` is (or would be) on disk."""

    def captions(self) -> Captions:
        """Return image id -> raw captions, in file order, for every image; read once, then cached."""
        if self._captions is None:
            self._captions = self._read_captions()
        return self._captions

    def split_ids(self, split: str) -> list[str]:
        """Return the image ids of `split`, in the dataset's order."""
        if split not in self.splits:
            raise CaptionFileError(f"{self.root}: unknown split {split!r}; choose one of {', '.join(self.splits)}")
        return self._read_split(split)

    def image_sources(self) -> tuple[dict[str, Path], list[str]]:
        """Return ({image id: path} of the captioned images on disk, captioned ids missing on disk)."""
        ids = sorted(self.captions())
        paths = {image_id: self.image_path(image_id) for image_id in ids}
        sources = {image_id: path for image_id, path in paths.items() if path.is_file()}
        return sources, [image_id for image_id in ids if image_id not in sources]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"


FORMATS: list[type[CaptionDataset]] = []  # tried in registration order by `open_dataset`


def register_format(cls: type[CaptionDataset]) -> type[CaptionDataset]:
    """Add a dataset format to those `open_dataset` detects; usable as a class decorator."""
    if any(known.format_name == cls.format_name for known in FORMATS):
        raise ValueError(f"a dataset format named {cls.format_name!r} is already registered")
    FORMATS.append(cls)
    return cls


def detect_dataset(path: str | Path) -> CaptionDataset | None:
    """Return the dataset at `path` in the first registered format that recognises it, or None."""
    path = Path(path)
    for cls in FORMATS:
        if cls.detect(path):
            return cls(path)
    return None


def open_dataset(path: str | Path) -> CaptionDataset:
    """Return the caption dataset at `path`, its format detected from what is there."""
    path = Path(path)
    if not path.exists():
        raise CaptionFileError(f"{path}: no such file or folder")
    dataset = detect_dataset(path)
    if dataset is None:
        expected = " or ".join(cls.expected for cls in FORMATS)
        raise CaptionFileError(f"{path}: not a caption dataset; expected {expected}")
    return dataset


def as_dataset(data: CaptionDataset | str | Path) -> CaptionDataset:
    """Return `data` itself, or the caption dataset at that path (`open_dataset`)."""
    return data if isinstance(data, CaptionDataset) else open_dataset(data)


def image_sources(path: str | Path) -> tuple[dict[str, Path], list[str]]:
    """Return ({image id: path} of images to encode, captioned ids missing on disk).

    A caption dataset gives its captioned images; any other folder gives every image file directly
    inside it (or inside its `Images/`, when it has one), keyed by file name.
    """
    from features.images import list_images

    path = Path(path)
    dataset = detect_dataset(path)
    if dataset is not None:
        return dataset.image_sources()
    if not path.is_dir():
        raise CaptionFileError(f"{path}: no such folder")
    images = path / Flickr8kFolder.IMAGE_DIR
    folder = images if images.is_dir() else path
    return {image.name: image for image in list_images(folder)}, []


@register_format
class Flickr8kFolder(CaptionDataset):
    """A Flickr8k folder: `Images/`, a token file or captions.txt, and the official split files."""

    format_name = "flickr8k"
    IMAGE_DIR = "Images"
    TOKEN_FILE = "Flickr8k.token.txt"
    CSV_FILE = "captions.txt"
    SPLIT_FILES = {
        "train": "Flickr_8k.trainImages.txt",
        "dev": "Flickr_8k.devImages.txt",
        "test": "Flickr_8k.testImages.txt",
    }
    expected = f"a Flickr8k folder ({IMAGE_DIR}/ plus {TOKEN_FILE} or {CSV_FILE})"
    splits = tuple(SPLIT_FILES)

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (path / cls.IMAGE_DIR).is_dir() and any(
            (path / name).is_file() for name in (cls.TOKEN_FILE, cls.CSV_FILE)
        )

    def _read_captions(self) -> Captions:
        # Both files ship with Flickr8k copies; the token file is the original (see test_captions).
        if (self.root / self.TOKEN_FILE).is_file():
            return read_token_file(self.root / self.TOKEN_FILE)
        if (self.root / self.CSV_FILE).is_file():
            return read_captions_csv(self.root / self.CSV_FILE)
        raise CaptionFileError(f"{self.root}: neither {self.TOKEN_FILE} nor {self.CSV_FILE} is there")

    def _read_split(self, split: str) -> list[str]:
        path = self.root / self.SPLIT_FILES[split]
        if not path.is_file():
            raise CaptionFileError(f"{path}: split file missing (the {split} split of a Flickr8k folder)")
        return read_split(path)

    def image_path(self, image_id: str) -> Path:
        return self.root / self.IMAGE_DIR / image_id
