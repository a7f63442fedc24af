"""Caption datasets behind one interface: splits, captions, image paths, whatever the format on disk.

`open_dataset(path)` detects the format from what is at `path`; training, evaluation and extraction
then ask the dataset and never which format it is. A format is a `CaptionDataset` subclass with a
`detect` classmethod, added with `register_format`; Flickr8k's folder layout is the first:

- `Images/`: the photos, named by image id
- `Flickr8k.token.txt` (preferred) or `captions.txt`: the captions (readers in `pipeline.captions`)
- `Flickr_8k.{train,dev,test}Images.txt`: the official splits, one image id per line

then Karpathy's split JSON (`dataset_{coco,flickr8k,flickr30k}.json`) and COCO's caption JSON
(`captions_{train,val}2014.json`, or the folder that holds them). Every format names its splits in the
project's words, `train`, `dev` and `test`, whatever the file calls them (Karpathy's and COCO's `val` is
`dev`, and the file's own name works too); an image id is the image's file name in every format, so a
feature store serves a dataset whatever file its captions came from. The images are found under an
image root (`DatasetOptions.images`, the scripts' `--images DIR`), by default beside the caption file.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from features.augment import FLIP, augmented_id, original_id
from pipeline.captions import (
    CaptionFileError,
    Captions,
    mirror_caption,
    read_captions_csv,
    read_split,
    read_token_file,
)


@dataclass(frozen=True)
class DatasetOptions:
    """How to read a caption dataset beyond its path: where its images are, which images train takes."""

    images: Path | None = None  # the image root; None: the format's default, beside the caption file
    restval_in_train: bool = True  # Karpathy's `restval` images train, as in his split (False: left out)
    mirror_train: bool = False  # the train split also holds each train image's mirror image (`WithMirroredTrain`)


class CaptionDataset(ABC):
    """Images with reference captions and named splits, stored in one of the field's formats."""

    format_name: ClassVar[str]  # short name of the format, e.g. "flickr8k"
    expected: ClassVar[str]  # what `detect` looks for, in words, for the "no dataset here" error
    splits: tuple[str, ...]  # the split names this dataset has, e.g. ("train", "dev", "test")

    def __init__(self, root: str | Path, options: DatasetOptions | None = None) -> None:
        self.root = Path(root)
        self.options = options or DatasetOptions()
        self._captions: Captions | None = None

    def run_facts(self) -> dict:
        """Return what a run's config.json records about its data: where, which format, read how."""
        facts = {"data": str(self.root), "data_format": self.format_name}
        if self.options.images is not None:
            facts["data_images"] = str(self.options.images)
        return facts

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


class DerivedDataset(CaptionDataset):
    """A dataset made from another (`base`): its root, options, splits, image paths and facts, unless a
    subclass changes them. Not a format on disk: never registered, so `open_dataset` never returns one."""

    def __init__(self, base: CaptionDataset) -> None:
        super().__init__(base.root, base.options)
        self.base = base
        self.splits = base.splits

    @classmethod
    def detect(cls, path: Path) -> bool:
        return False

    def run_facts(self) -> dict:
        return self.base.run_facts()

    def _read_split(self, split: str) -> list[str]:
        return self.base.split_ids(split)

    def image_path(self, image_id: str) -> Path:
        return self.base.image_path(image_id)


class WithExtraCaptions(DerivedDataset):
    """A dataset with more captions for images of one split (a teacher's, for distillation).

    Its splits, image paths and the other splits' captions are the wrapped dataset's; each image of
    `split` named in `extra` gets those captions after its own. `run_facts` adds `facts` (what made the
    extra captions) under `key`.
    """

    def __init__(
        self, base: CaptionDataset, extra: Captions, split: str = "train", facts: dict | None = None, key: str = "extra"
    ) -> None:
        super().__init__(base)
        self.extra, self.split, self.facts, self.key = extra, split, facts or {}, key

    def run_facts(self) -> dict:
        return {**self.base.run_facts(), self.key: self.facts}

    def _read_captions(self) -> Captions:
        in_split = set(self.base.split_ids(self.split))
        outside = [image_id for image_id in self.extra if image_id not in in_split]
        if outside:
            raise CaptionFileError(
                f"{self.root}: {len(outside)} images with extra captions are not in the {self.split} split "
                f"(e.g. {outside[0]})"
            )
        captions = dict(self.base.captions())
        for image_id, more in self.extra.items():
            captions[image_id] = [*captions.get(image_id, []), *more]
        return captions


class WithMirroredTrain(DerivedDataset):
    """A dataset whose train split also holds each train image's mirror image, `ID#flip`, right after it.

    A mirror's captions are its image's with `left` and `right` swapped (`mirror_caption`); its path is
    its image's, and extraction flips the pixels the id names (`features.augment.augment_pixels`), so a
    feature store keeps both under their own ids. `detect_dataset` wraps a dataset in it when
    `DatasetOptions.mirror_train` is set (the scripts' `--mirror`).
    """

    def run_facts(self) -> dict:
        return {**self.base.run_facts(), "mirror_train": True}

    def _read_captions(self) -> Captions:
        captions = dict(self.base.captions())
        for image_id in self.base.split_ids("train"):
            if image_id in captions:
                captions[augmented_id(image_id, FLIP)] = [mirror_caption(c) for c in captions[image_id]]
        return captions

    def _read_split(self, split: str) -> list[str]:
        ids = self.base.split_ids(split)
        return [i for image_id in ids for i in (image_id, augmented_id(image_id, FLIP))] if split == "train" else ids

    def image_path(self, image_id: str) -> Path:
        return self.base.image_path(original_id(image_id))


FORMATS: list[type[CaptionDataset]] = []  # tried in registration order by `open_dataset`


def register_format(cls: type[CaptionDataset]) -> type[CaptionDataset]:
    """Add a dataset format to those `open_dataset` detects; usable as a class decorator."""
    if any(known.format_name == cls.format_name for known in FORMATS):
        raise ValueError(f"a dataset format named {cls.format_name!r} is already registered")
    FORMATS.append(cls)
    return cls


def detect_dataset(path: str | Path, options: DatasetOptions | None = None) -> CaptionDataset | None:
    """Return the dataset at `path` in the first registered format that recognises it, or None."""
    path = Path(path)
    for cls in FORMATS:
        if cls.detect(path):
            dataset = cls(path, options)
            return WithMirroredTrain(dataset) if dataset.options.mirror_train else dataset
    return None


def open_dataset(path: str | Path, options: DatasetOptions | None = None) -> CaptionDataset:
    """Return the caption dataset at `path`, its format detected from what is there."""
    path = Path(path)
    if not path.exists():
        raise CaptionFileError(f"{path}: no such file or folder")
    if options is not None and options.images is not None and not Path(options.images).is_dir():
        raise CaptionFileError(f"{options.images}: no such image folder (--images)")
    dataset = detect_dataset(path, options)
    if dataset is None:
        names = [cls.expected for cls in FORMATS]
        expected = names[0] if len(names) == 1 else f"{', '.join(names[:-1])}, or {names[-1]}"
        raise CaptionFileError(f"{path}: not a caption dataset; expected {expected}")
    return dataset


def as_dataset(data: CaptionDataset | str | Path) -> CaptionDataset:
    """Return `data` itself, or the caption dataset at that path (`open_dataset`)."""
    return data if isinstance(data, CaptionDataset) else open_dataset(data)


def image_sources(path: str | Path, options: DatasetOptions | None = None) -> tuple[dict[str, Path], list[str]]:
    """Return ({image id: path} of images to encode, captioned ids missing on disk).

    A caption dataset gives its captioned images; any other folder gives every image file directly
    inside it (or inside its `Images/`, when it has one), keyed by file name.
    """
    from features.images import list_images

    path = Path(path)
    dataset = detect_dataset(path, options)
    if dataset is not None:
        return dataset.image_sources()
    if not path.is_dir():
        raise CaptionFileError(f"{path}: no such folder")
    if options is not None and options.mirror_train:
        raise CaptionFileError(f"{path}: --mirror needs a caption dataset (its train split); this is a plain folder")
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
        return Path(self.options.images or self.root / self.IMAGE_DIR) / image_id


SNIFF_BYTES = 1 << 16  # the head of a JSON file read to tell Karpathy's format from COCO's


def _json_head(path: Path) -> str:
    """Return the beginning of `path` as text if it is a .json file, else ""."""
    if not (path.is_file() and path.suffix.lower() == ".json"):
        return ""
    try:
        with path.open("rb") as handle:
            return handle.read(SNIFF_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _read_json(path: Path, expected: str) -> dict:
    """Return the JSON object in `path`, which must hold an `images` list; CaptionFileError otherwise."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as error:
        raise CaptionFileError(f"{path}: cannot read ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CaptionFileError(f"{path}: not valid JSON ({error}); expected {expected}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise CaptionFileError(f"{path}: no images[] list; expected {expected}")
    return payload


def _default_image_root(folder: Path) -> Path:
    """Return where images are by default for a caption file in `folder`: its `Images/`, or the folder."""
    return folder / Flickr8kFolder.IMAGE_DIR if (folder / Flickr8kFolder.IMAGE_DIR).is_dir() else folder


@dataclass
class _Index:
    """A JSON caption file read once: captions, each image's split, its sub-folder under the image root."""

    captions: Captions = field(default_factory=dict)
    split_of: dict[str, str] = field(default_factory=dict)  # image id -> the file's split name, file order
    folders: dict[str, str] = field(default_factory=dict)  # image id -> sub-folder of the image root

    def add(self, image_id: str, split: str, folder: str, captions: list[str], where: str) -> None:
        if image_id in self.split_of:
            raise CaptionFileError(f"{where}: image {image_id!r} is listed twice")
        self.split_of[image_id], self.folders[image_id] = split, folder
        if captions:
            self.captions.setdefault(image_id, []).extend(captions)


class _JsonCaptionDataset(CaptionDataset):
    """A format read from JSON once into an `_Index`; its split names map onto the file's own."""

    def __init__(self, root: str | Path, options: DatasetOptions | None = None) -> None:
        super().__init__(root, options)
        self._index: _Index | None = None

    @abstractmethod
    def _read_index(self) -> _Index:
        """Return the whole file's captions, splits and folders, checked."""

    @abstractmethod
    def split_names(self) -> dict[str, tuple[str, ...]]:
        """Return {split name asked for: the file's split names it takes}."""

    @property
    def image_root(self) -> Path:
        return Path(self.options.images) if self.options.images is not None else self._default_image_root()

    @abstractmethod
    def _default_image_root(self) -> Path: ...

    @property
    def index(self) -> _Index:
        if self._index is None:
            self._index = self._read_index()
        return self._index

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.split_names())

    def _read_captions(self) -> Captions:
        return self.index.captions

    def _read_split(self, split: str) -> list[str]:
        wanted = set(self.split_names()[split])
        return [image_id for image_id, name in self.index.split_of.items() if name in wanted]

    def image_path(self, image_id: str) -> Path:
        return self.image_root / self.index.folders.get(image_id, "") / image_id


KARPATHY_SPLITS = ("train", "val", "test", "restval")


@register_format
class KarpathySplit(_JsonCaptionDataset):
    """Karpathy's split JSON (`dataset_coco.json`, ...): `images[]` with `filename`, `filepath`, `split`
    and `sentences[]` (`raw`, `tokens`). Its `val` is the `dev` split; `restval` trains unless
    `DatasetOptions.restval_in_train` is False. Image root by default: the JSON's folder (or its
    `Images/`); an image is at root/filepath/filename."""

    format_name = "karpathy"
    expected = "a Karpathy split JSON (images[] with filename, split and sentences[])"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return '"sentences"' in _json_head(path)

    def split_names(self) -> dict[str, tuple[str, ...]]:
        train = ("train", "restval") if self.options.restval_in_train else ("train",)
        return {"train": train, "dev": ("val",), "test": ("test",), "val": ("val",), "restval": ("restval",)}

    def _default_image_root(self) -> Path:
        return _default_image_root(self.root.parent)

    def run_facts(self) -> dict:
        return {**super().run_facts(), "restval_in_train": self.options.restval_in_train}

    def _read_index(self) -> _Index:
        index = _Index()
        for number, image in enumerate(_read_json(self.root, self.expected)["images"]):
            where = f"{self.root}: images[{number}]"
            if not (
                isinstance(image, dict)
                and isinstance(image.get("filename"), str)
                and image.get("split") in KARPATHY_SPLITS
                and isinstance(image.get("sentences"), list)
            ):
                raise CaptionFileError(
                    f"{where} needs a filename, a split ({', '.join(KARPATHY_SPLITS)}) and sentences[]"
                )
            captions = [self._sentence(sentence, where) for sentence in image["sentences"]]
            index.add(image["filename"], image["split"], str(image.get("filepath", "")), captions, where)
        return index

    @staticmethod
    def _sentence(sentence: object, where: str) -> str:
        """Return a sentence's raw text (its tokens joined when it has no `raw`)."""
        if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
            return sentence["raw"].strip()
        if isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
            return " ".join(str(token) for token in sentence["tokens"])
        raise CaptionFileError(f"{where}: a sentence without raw text or tokens")


COCO_SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test"}  # COCO's file names -> the project's


@register_format
class CocoCaptions(_JsonCaptionDataset):
    """COCO's caption JSON (`captions_train2014.json`: `images[]` with `id` and `file_name`,
    `annotations[]` with `image_id` and `caption`), or a folder of them (itself or its `annotations/`).
    Each file is one split, named from the file (`captions_val2014.json` is `dev`, also `val`). Image
    root by default: the folder above `annotations/` (or the JSON's folder); a file's images are in the
    root's sub-folder named after it (`train2014/`) when there is one, else in the root itself."""

    format_name = "coco"
    expected = (
        "a COCO captions JSON (images[] with id and file_name, annotations[] with image_id and caption) "
        "or a folder of them"
    )

    @classmethod
    def caption_files(cls, path: Path) -> list[Path]:
        """Return the COCO caption files at `path`: itself, or the captions_*.json of a folder."""
        if path.is_dir():
            return sorted((path / "annotations").glob("captions_*.json")) or sorted(path.glob("captions_*.json"))
        return [path]

    @classmethod
    def detect(cls, path: Path) -> bool:
        if path.is_dir():
            return bool(cls.caption_files(path))
        head = _json_head(path)
        return '"sentences"' not in head and ('"annotations"' in head or '"file_name"' in head)

    @staticmethod
    def file_split(path: Path) -> tuple[str, str]:
        """Return (the project's split name, the image sub-folder name) of a caption file."""
        folder = path.stem.removeprefix("captions_")
        kind = folder.rstrip("0123456789")
        return COCO_SPLIT_NAMES.get(kind, folder), folder

    def split_names(self) -> dict[str, tuple[str, ...]]:
        names = {self.file_split(path)[0]: None for path in self.caption_files(self.root)}
        found = {name: (name,) for name in names}
        return {**found, "val": ("dev",)} if "dev" in found else found

    def _default_image_root(self) -> Path:
        folder = self.caption_files(self.root)[0].parent
        return folder.parent if folder.name == "annotations" else _default_image_root(folder)

    def _read_index(self) -> _Index:
        index = _Index()
        for path in self.caption_files(self.root):
            split, folder = self.file_split(path)
            self._read_file(path, split, folder if (self.image_root / folder).is_dir() else "", index)
        return index

    def _read_file(self, path: Path, split: str, folder: str, index: _Index) -> None:
        payload = _read_json(path, self.expected)
        annotations = payload.get("annotations")
        if not isinstance(annotations, list):
            raise CaptionFileError(f"{path}: no annotations[] list; expected {self.expected}")
        names: dict[object, str] = {}
        for number, image in enumerate(payload["images"]):
            if not (isinstance(image, dict) and "id" in image and isinstance(image.get("file_name"), str)):
                raise CaptionFileError(f"{path}: images[{number}] needs an id and a file_name")
            names[image["id"]] = image["file_name"]
        captions: dict[str, list[str]] = {}
        for number, annotation in enumerate(annotations):
            if not (isinstance(annotation, dict) and isinstance(annotation.get("caption"), str)):
                raise CaptionFileError(f"{path}: annotations[{number}] needs an image_id and a caption")
            if annotation.get("image_id") not in names:
                raise CaptionFileError(f"{path}: annotations[{number}] names image_id {annotation.get('image_id')!r}, "
                                       "which images[] does not list")  # fmt: skip
            captions.setdefault(names[annotation["image_id"]], []).append(annotation["caption"].strip())
        for file_name in names.values():
            index.add(file_name, split, folder, captions.get(file_name, []), str(path))
