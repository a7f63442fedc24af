"""Classifier batches streamed from sharded feature stores through `tf.data`.

The same batches as `classifier.classes.LabelledBatches` ((inputs as float32, class indices)), but the
features are never all in memory: shards are read a few at a time in a new order every epoch
(`ShardedStore.records`), each record is looked up in an id -> class table (records of images not
asked for are dropped: a store may hold other splits' images), and images pass through a shuffle
buffer. What stays in memory grows with the ids and their labels, not with the feature store.

The train images' augmented variants live in a store of their own (`classifier.model.augmented_store_path`);
a stream reads several stores as parts, drawn at random in proportion to their images when shuffled,
one after the other when not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from features.shards import ShardedStore, shuffle_buffer_size
from features.store import FeatureStoreError

SHUFFLE_IMAGES = 8192  # images in the shuffle buffer at most (fewer for big features: features.shards)


@dataclass
class LabelledPart:
    """The images a stream reads from one store, with their class indices."""

    store: ShardedStore
    labels: dict[str, int]  # image id -> class index


class LabelledStream:
    """Batches of (inputs as float32, class indices) for `model.fit`, read from sharded stores. Each pass
    over `as_dataset()` is one epoch, reshuffled when `shuffle`; `len()` is its exact number of batches."""

    def __init__(
        self, parts: list[LabelledPart], batch_size: int = 32, shuffle: bool = True, seed: int = 0, spatial=False
    ):
        for part in parts:
            if spatial:
                part.store.require_spatial()
            missing = set(part.labels) - part.store.image_ids()
            if missing:
                raise FeatureStoreError(
                    f"{part.store.path}: no features for {len(missing)} image(s), e.g. {sorted(missing)[0]!r}"
                )
        self.parts = [part for part in parts if part.labels]
        self.batch_size, self.shuffle, self.seed, self.spatial = batch_size, shuffle, seed, spatial

    @property
    def images(self) -> int:
        return sum(len(part.labels) for part in self.parts)

    def __len__(self) -> int:
        return math.ceil(self.images / self.batch_size)

    def shuffle_buffer(self) -> int:
        """Return the shuffle buffer's size in images: `SHUFFLE_IMAGES`, fewer for big features."""
        return shuffle_buffer_size(self.parts[0].store, self.spatial, self.batch_size, SHUFFLE_IMAGES)

    def as_dataset(self, with_ids: bool = False):
        """Return the batches as a `tf.data.Dataset` of (inputs, labels), or (inputs, labels, ids)."""
        import tensorflow as tf

        if not self.parts:
            raise FeatureStoreError("no image to stream")
        parts = [self._samples(part, tf) for part in self.parts]
        if len(parts) == 1:
            samples = parts[0]
        elif self.shuffle:
            weights = [len(part.labels) / self.images for part in self.parts]
            samples = tf.data.Dataset.sample_from_datasets(parts, weights, seed=self.seed, stop_on_empty_dataset=False)
        else:
            samples = parts[0]
            for part in parts[1:]:
                samples = samples.concatenate(part)
        if self.shuffle:
            samples = samples.shuffle(self.shuffle_buffer(), seed=self.seed, reshuffle_each_iteration=True)
        batches = samples.batch(self.batch_size)
        if with_ids:
            batches = batches.map(lambda inputs, labels, ids: (tf.cast(inputs, tf.float32), labels, ids))
        else:
            batches = batches.map(lambda inputs, labels, ids: (tf.cast(inputs, tf.float32), labels))
        return batches.prefetch(tf.data.AUTOTUNE)

    def _samples(self, part: LabelledPart, tf):
        """Return one part's (features, class index, id) samples, features as stored (maps stay float16)."""
        ids = sorted(part.labels)
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(ids, tf.string), tf.constant([part.labels[i] for i in ids], tf.int32)
            ),
            default_value=-1,
        )
        key = "regions" if self.spatial else "image"

        def select(batch):
            labels = table.lookup(batch["id"])
            kept = labels >= 0
            return tuple(tf.boolean_mask(x, kept) for x in (batch[key], labels, batch["id"]))

        seed = self.seed if self.shuffle else None
        records = part.store.records(ids, self.spatial, seed)
        return records.map(select, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def stream_probabilities(model, stream: LabelledStream, order: list[str]) -> np.ndarray:
    """Return the model's class probabilities (len(order), classes) for the stream's images, in `order`
    (the stream yields them in the stores' order); float32."""
    row = {image_id: n for n, image_id in enumerate(order)}
    out = np.zeros((len(order), model.output.shape[-1]), dtype=np.float32)
    seen = np.zeros(len(order), dtype=bool)
    for inputs, _, ids in stream.as_dataset(with_ids=True).as_numpy_iterator():
        rows = [row[i.decode()] for i in ids]
        out[rows] = np.asarray(model.predict_on_batch(inputs), dtype=np.float32)
        seen[rows] = True
    if not seen.all():
        raise FeatureStoreError(f"{int((~seen).sum())} of {len(order)} images were not in the stream")
    return out


def keras_data(batches, repeat: bool) -> tuple[object, int | None]:
    """Return (what `model.fit` or `evaluate` reads, its steps) for `LabelledBatches` or a `LabelledStream`.

    A stream for `fit` repeats, and an epoch (a validation) is its exact number of batches: Keras 3.15
    counts one optimizer step too many when a pass of unknown length runs dry (as in models.training).
    """
    if not isinstance(batches, LabelledStream):
        return batches, None
    dataset = batches.as_dataset()
    return (dataset.repeat(), len(batches)) if repeat else (dataset, None)
