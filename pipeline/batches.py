"""The batch generator: image features and whole right-padded captions, for teacher forcing.

One sample per caption (not per caption prefix): the decoder reads `<start> w1 .. wn` and is
trained on every next word `w1 .. wn <end>` at once, with padding weighted out of the loss. This is
the classic merge-model objective, linear instead of quadratic in caption length.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from pipeline.caption_arrays import encoded_captions
from pipeline.soft_targets import SoftTargets, one_hot_targets

LENGTH_BUCKET = 8  # pad each batch to a multiple of this, so only a few shapes get compiled


def encode_captions(
    image_ids: list[str], captions: dict[str, list[list[str]]], vocabulary, max_caption_length: int
) -> tuple[np.ndarray, list[list[int]]]:
    """Return (image row of each caption, token ids of each caption truncated to max_caption_length)."""
    rows, sequences = [], []
    for row, ids in encoded_captions(image_ids, captions, vocabulary, max_caption_length):
        rows.append(row)
        sequences.append(ids)
    return np.array(rows, dtype=np.int64), sequences


def pad_batch(sequences: list[list[int]], max_caption_length: int) -> np.ndarray:
    """Return the sequences right-padded with 0 to the bucketed batch length (int32)."""
    longest = max(len(s) for s in sequences)
    width = min(max_caption_length, math.ceil(longest / LENGTH_BUCKET) * LENGTH_BUCKET)
    out = np.zeros((len(sequences), width), dtype=np.int32)
    for i, sequence in enumerate(sequences):
        out[i, : len(sequence)] = sequence
    return out


class CaptionSequence(keras.utils.PyDataset):
    """Batches of ({"image": features, "words": inputs}, next words, weights) for `model.fit`.

    `inputs` is each caption without its last token, `next words` the caption shifted by one; the
    weights are 1 on real words and 0 on padding. Reshuffles caption order every epoch. With
    `features=None` there is no "image" input: a decoder that reads only `extra_inputs` (spatial maps).
    Given `vocab_size`, the next words come as (batch, width, vocabulary) distributions instead of ids:
    one-hot, or mixed with the teacher's `soft_targets` (word-level distillation, pipeline/soft_targets.py).
    """

    def __init__(
        self,
        features: np.ndarray | None,
        image_rows: np.ndarray,
        sequences: list[list[int]],
        max_caption_length: int,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        extra_inputs: dict[str, object] | None = None,
        vocab_size: int | None = None,
        soft_targets: SoftTargets | None = None,
    ):
        super().__init__()
        if soft_targets is not None:
            if vocab_size is None:
                raise ValueError("soft targets are distributions over the vocabulary: give vocab_size")
            soft_targets.check_captions(sequences)
        self.vocab_size = vocab_size
        self.soft_targets = soft_targets
        self.features = features
        self.image_rows = image_rows
        self.sequences = sequences
        self.max_caption_length = max_caption_length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        # name -> callable(image rows) -> array, e.g. spatial maps for attention decoders
        self.extra_inputs = extra_inputs or {}
        self.order = np.arange(len(sequences))
        if shuffle:
            self.rng.shuffle(self.order)

    def __len__(self) -> int:
        return math.ceil(len(self.sequences) / self.batch_size)

    @property
    def caption_count(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int):
        chosen = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        tokens = pad_batch([self.sequences[i] for i in chosen], self.max_caption_length)
        rows = self.image_rows[chosen]
        inputs = {"words": tokens[:, :-1]}
        if self.features is not None:
            inputs["image"] = self.features[rows]
        for name, lookup in self.extra_inputs.items():
            inputs[name] = lookup(rows)
        targets = tokens[:, 1:]
        weights = (targets != 0).astype(np.float32)
        if self.soft_targets is not None:
            return inputs, self.soft_targets.dense(targets, chosen, self.vocab_size), weights
        if self.vocab_size is not None:
            return inputs, one_hot_targets(targets, self.vocab_size), weights
        return inputs, targets, weights

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.rng.shuffle(self.order)

    def as_dataset(self):
        """Return these batches as a `tf.data.Dataset` whose batch size and caption width are variable.

        `model.fit(sequence)` is not safe with the TensorFlow backend: Keras infers each input's shape
        from the first two batches (3.15: `NUM_BATCHES_FOR_TENSOR_SPEC`), and when both happen to be
        padded to the same width, the first wider batch stops training ("`generator` yielded an
        element of shape (64, 31) where an element of shape (None, 23) was expected"). Here the width
        is declared variable. Each pass over the dataset is one epoch; passes after the first
        reshuffle first, as `on_epoch_end` would.
        """
        import tensorflow as tf

        inputs, targets, weights = self[0]

        def spec(array: np.ndarray, variable_width: bool):
            shape = (None, None, *array.shape[2:]) if variable_width else (None, *array.shape[1:])
            return tf.TensorSpec(shape, tf.as_dtype(array.dtype))

        signature = (
            {name: spec(array, name == "words") for name, array in inputs.items()},
            spec(targets, True),
            spec(weights, True),
        )
        passes = 0

        def batches():
            nonlocal passes
            if passes:
                self.on_epoch_end()
            passes += 1
            for index in range(len(self)):
                yield self[index]

        dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
        return dataset.apply(tf.data.experimental.assert_cardinality(len(self))).prefetch(2)
