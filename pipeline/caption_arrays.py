"""The train and dev captions a trainer reads, and the same as compact token arrays made in a child process.

`caption_data` selects each split's cleaned captions (images with features only) and builds the
vocabulary from train. A trainer that streams from shards needs only each caption's token ids, and
holding the captions as Python objects would make its memory grow with the dataset: COCO's 616k
captions cost about 300 MB of strings, lists and dicts (the caption file parsed, then cleaned), which
Python keeps after they are freed. `encode_caption_data_apart` therefore reads, cleans and encodes them
in a child process (`python -m pipeline.caption_arrays`, the request and the answer pickled through two
temporary files) and hands back `EncodedCaptions` (a flat int32 array and two length arrays, a few bytes
a word): the trainer's memory then hardly depends on the number of captions (BENCHMARKS.md,
"COCO-sized data"). A plain child process, not `multiprocessing`'s spawn, which would import the
launching script (and with train.py, TensorFlow) again; nothing here imports Keras or TensorFlow, so
the child starts in about a second.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from features.augment import original_id
from pipeline.captions import CaptionFileError, SplitCaptions, select_split
from pipeline.vocabulary import Vocabulary

if TYPE_CHECKING:
    from pipeline.datasets import CaptionDataset


@dataclass
class CaptionData:
    """The train and dev captions that have features, and the vocabulary built from train."""

    vocabulary: Vocabulary
    max_caption_length: int
    train: SplitCaptions
    dev: SplitCaptions


def select_train_dev(
    dataset: CaptionDataset, available: set[str], limit_train: int | None = None
) -> tuple[SplitCaptions, SplitCaptions]:
    """Return the cleaned train (its first `limit_train` images) and dev captions of images in `available`.

    A dataset with mirrored train images is refused when the store has none of them: training would
    silently be the plain run.
    """
    captions = dataset.captions()
    train = select_split(captions, dataset.split_ids("train")[:limit_train], available)
    if dataset.options.mirror_train and not any(original_id(i) != i for i in train.image_ids):
        raise CaptionFileError(
            f"{dataset.root}: the feature store has none of the train images' mirrors (ID#flip); "
            "extract them with extract_features.py --mirror"
        )
    return train, select_split(captions, dataset.split_ids("dev"), available)


@dataclass(frozen=True)
class CaptionSelection:
    """Which captions a trainer takes: words seen `min_count` times in train (or a given `vocabulary`),
    the first `limit_train` train images (all: None)."""

    min_count: int = 5
    vocabulary: Vocabulary | None = None
    limit_train: int | None = None


def caption_data(dataset: CaptionDataset, available: set[str], selection: CaptionSelection) -> CaptionData:
    """Return the train/dev captions of images in `available` and the train vocabulary (unless given).
    With no train image, the vocabulary is empty and the longest caption 2 (the caller refuses it)."""
    train, dev = select_train_dev(dataset, available, selection.limit_train)
    train_captions = [c for i in train.image_ids for c in train.captions[i]]
    vocabulary = selection.vocabulary
    if vocabulary is None:  # a mirror image's captions would count each word twice
        originals = [c for i in train.image_ids if original_id(i) == i for c in train.captions[i]]
        vocabulary = Vocabulary.build(originals, selection.min_count)
    max_caption_length = max((len(c) for c in train_captions), default=0) + 2  # + <start>, <end>
    return CaptionData(vocabulary, max_caption_length, train, dev)


def encoded_captions(
    image_ids: list[str], captions: dict[str, list[list[str]]], vocabulary, max_caption_length: int
) -> Iterator[tuple[int, list[int]]]:
    """Yield (image row, token ids truncated to max_caption_length) for every caption, image by image."""
    for row, image_id in enumerate(image_ids):
        for words in captions[image_id]:
            ids = vocabulary.encode(words)
            if len(ids) > max_caption_length:
                ids = ids[: max_caption_length - 1] + [vocabulary.end_id]
            yield row, ids


@dataclass
class EncodedCaptions:
    """One split's captions as token ids: every caption's ids one after another, each caption's length,
    each image's number of captions (in `image_ids` order). Never a list per caption."""

    image_ids: list[str]
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    caption_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    captions_per_image: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def encode(
        cls, image_ids: list[str], captions: dict[str, list[list[str]]], vocabulary, max_caption_length: int
    ) -> EncodedCaptions:
        tokens, lengths, per_image = array("i"), array("q"), np.zeros(len(image_ids), np.int64)
        for row, ids in encoded_captions(image_ids, captions, vocabulary, max_caption_length):
            tokens.extend(ids)
            lengths.append(len(ids))
            per_image[row] += 1
        return cls(list(image_ids), np.array(tokens, np.int32), np.array(lengths, np.int64), per_image)

    @property
    def caption_count(self) -> int:
        return len(self.caption_lengths)


@dataclass
class EncodedCaptionData:
    """`CaptionData` whose splits keep their ids and skipped ids but not their captions, which are here
    as token arrays."""

    data: CaptionData
    train: EncodedCaptions
    dev: EncodedCaptions


def encode_caption_data(
    dataset: CaptionDataset, available: set[str], selection: CaptionSelection
) -> EncodedCaptionData:
    """Return `caption_data(...)` with each split's captions encoded into token arrays (and dropped)."""
    data = caption_data(dataset, available, selection)
    encoded = [
        EncodedCaptions.encode(split.image_ids, split.captions, data.vocabulary, data.max_caption_length)
        for split in (data.train, data.dev)
    ]
    data.train.captions, data.dev.captions = {}, {}
    return EncodedCaptionData(data, *encoded)


def encode_caption_data_apart(
    dataset: CaptionDataset, available: set[str], selection: CaptionSelection
) -> EncodedCaptionData:
    """Return `encode_caption_data(...)`, computed in a child process (see the module's docstring); an
    error there (a malformed caption file) is raised here."""
    project = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="captions-") as folder:
        request, answer = Path(folder) / "request.pickle", Path(folder) / "answer.pickle"
        request.write_bytes(pickle.dumps((dataset, available, selection)))
        command = [sys.executable, "-m", "pipeline.caption_arrays", str(request), str(answer)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not answer.is_file():
            detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the caption-preparing child process failed ({detail})")
        result = pickle.loads(answer.read_bytes())
    if isinstance(result, Exception):
        raise result
    return result


def _serve_request(request: Path, answer: Path) -> None:
    """In the child: answer one pickled request with the pickled result, or the pickled error."""
    try:
        result = encode_caption_data(*pickle.loads(request.read_bytes()))
    except Exception as error:  # every error goes back to the parent, which raises it
        result = error
    answer.write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    # Run as `python -m pipeline.caption_arrays`: import this module under its own name, so that what is
    # pickled back names `pipeline.caption_arrays` classes, not `__main__` ones.
    from pipeline.caption_arrays import _serve_request as serve

    serve(Path(sys.argv[1]), Path(sys.argv[2]))
