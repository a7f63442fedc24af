"""Class-per-folder image sets (`DIR/<class>/*.jpg`), their stratified split, and labelled batches.

Image ids are `class/filename`, unique across the whole set and stable between runs, so the same
feature store serves training, evaluation and any later run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from sklearn.model_selection import train_test_split

from features.images import list_images


class ClassFolderError(ValueError):
    """A class-per-folder image set that is missing, empty, or does not fit the classes asked for."""


@dataclass
class ClassFolder:
    """The labelled images of `DIR/<class>/*`: ids `class/filename`, their files and class indices."""

    root: Path
    classes: list[str]  # index -> class name
    sources: dict[str, Path] = field(default_factory=dict)  # image id -> file
    labels: dict[str, int] = field(default_factory=dict)  # image id -> class index
    empty_classes: list[str] = field(default_factory=list)  # class folders skipped for holding no image

    def counts(self) -> dict[str, int]:
        """Return the number of images of each class."""
        counts = dict.fromkeys(self.classes, 0)
        for label in self.labels.values():
            counts[self.classes[label]] += 1
        return counts


def load_class_folder(root: str | Path, classes: list[str] | None = None) -> ClassFolder:
    """Return the images of `root/<class>/*`, labelled by sorted class name or by `classes`.

    Sub-folders without an image are skipped (listed in `empty_classes`); files that are not images
    by suffix, and files lying directly in `root`, are ignored. With `classes` (a trained model's
    class list) every non-empty folder must name one of them, and labels follow that order.
    """
    root = Path(root)
    if not root.is_dir():
        raise ClassFolderError(f"{root}: no such folder (expected one sub-folder of images per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    images = {folder.name: list_images(folder) for folder in folders}
    empty = [name for name, files in images.items() if not files]
    found = [name for name, files in images.items() if files]
    if classes is None:
        if len(found) < 2:
            raise ClassFolderError(
                f"{root}: {len(found)} class folder(s) with images, need at least 2 (expected DIR/<class>/*.jpg)"
            )
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ClassFolderError(
                f"{root}: class folder(s) {', '.join(unknown)} unknown to the model (it knows {', '.join(classes)})"
            )
        if not found:
            raise ClassFolderError(f"{root}: no class folder holds an image")
    index = {name: i for i, name in enumerate(classes)}
    result = ClassFolder(root, list(classes), empty_classes=empty)
    for name in found:
        for path in images[name]:
            image_id = f"{name}/{path.name}"
            result.sources[image_id] = path
            result.labels[image_id] = index[name]
    return result


def stratified_split(
    image_ids: Iterable[str], labels: dict[str, int], validation_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Return (train ids, validation ids), each class split in the same proportion, reproducibly."""
    ids = sorted(image_ids)
    if not 0 < validation_fraction < 1:
        raise ClassFolderError(f"validation fraction must be between 0 and 1, got {validation_fraction}")
    try:
        train, validation = train_test_split(
            ids, test_size=validation_fraction, random_state=seed, stratify=[labels[i] for i in ids]
        )
    except ValueError as error:  # too few images in some class for a stratified split
        raise ClassFolderError(f"cannot split {len(ids)} images into train and validation: {error}") from None
    return sorted(train), sorted(validation)


class LabelledBatches(keras.utils.PyDataset):
    """Batches of (inputs as float32, class indices) for `model.fit`, reshuffled every epoch.

    `inputs` may be float16 (spatial maps): each batch is widened only when it is served.
    """

    def __init__(
        self, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 32, shuffle: bool = True, seed: int = 0
    ):
        super().__init__()
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs = inputs
        self.labels = np.asarray(labels, dtype=np.int32)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(labels))
        if shuffle:
            self.rng.shuffle(self.order)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index: int):
        # Sorted rows: fancy indexing reads memory in order; the order inside a batch does not matter.
        chosen = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        return self.inputs[chosen].astype(np.float32), self.labels[chosen]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.rng.shuffle(self.order)
