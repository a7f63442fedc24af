"""Teacher-forcing batches streamed from a sharded feature store through `tf.data`.

The same samples as `pipeline.batches.CaptionSequence` (one per caption: the image's features, the
caption's inputs, its next words, weights 0 on padding), but the features are never all in memory:
shards are read a few at a time in a new order every epoch (`ShardedStore.records`), each image's
record becomes one sample per caption, samples pass through a shuffle buffer, and batches are formed
by caption length (`bucket_by_sequence_length`) and padded to a multiple of `LENGTH_BUCKET`, so a
batch wastes little on padding and only a few shapes get traced. What stays in memory grows with the
captions (their token ids, a few bytes each), not with the feature store.

A length bucket's batches hold about as many words as `batch_size` captions of mean length (more
captions when they are short, fewer when long). With the same number of captions in every bucket,
each batch's loss (a mean over its words) would give a short caption's words several times the weight
of a long one's: on Flickr8k that cost 0.07 of dev loss after one epoch, against 0.010 with the word
budget (mean of 4 seeds, within their spread; BENCHMARKS.md). The dev stream (`shuffle=False`) keeps `batch_size` captions a batch in the
store's order, padded the same way, so its loss is the figure `CaptionSequence` gives.
"""

from __future__ import annotations

import numpy as np

from features.shards import shuffle_buffer_size
from pipeline.batches import LENGTH_BUCKET
from pipeline.caption_arrays import EncodedCaptions

SHUFFLE_CAPTIONS = 8192  # samples in the shuffle buffer at most (fewer for big features: features.shards)


class CaptionStream:
    """Batches of ({"image" or "regions": features, "words": inputs}, next words, weights) for `model.fit`,
    read from a sharded store. Each pass over `as_dataset()` is one epoch, shuffled anew when `shuffle`."""

    def __init__(
        self,
        store,
        captions: EncodedCaptions,
        max_caption_length: int,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        spatial: bool = False,
    ):
        self.store, self.image_ids, self.spatial = store, list(captions.image_ids), spatial
        self.max_caption_length, self.batch_size = max_caption_length, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.tokens, self.caption_lengths = captions.tokens, captions.caption_lengths
        self.captions_per_image, self.caption_count = captions.captions_per_image, captions.caption_count

    def shuffle_buffer(self) -> int:
        """Return the shuffle buffer's size in samples: `SHUFFLE_CAPTIONS`, fewer for big features."""
        return shuffle_buffer_size(self.store, self.spatial, self.batch_size, SHUFFLE_CAPTIONS)

    def bucket_batch_sizes(self) -> list[int]:
        """Return the captions a batch takes in each length bucket: `batch_size` captions' worth of words."""
        mean_length = float(self.caption_lengths.mean()) if len(self.caption_lengths) else 1.0
        sizes = [max(1, round(self.batch_size * mean_length / (boundary - 1))) for boundary in self.bucket_boundaries()]
        return [*sizes, self.batch_size]  # the last bucket (longer than the longest caption) stays empty

    def bucket_boundaries(self) -> list[int]:
        """Return the length boundaries: a caption of n tokens is padded to the next multiple of
        LENGTH_BUCKET (at most `max_caption_length`), as `pipeline.batches.pad_batch` pads."""
        widths = list(range(LENGTH_BUCKET, self.max_caption_length, LENGTH_BUCKET)) + [self.max_caption_length]
        return [width + 1 for width in widths]

    def as_dataset(self, worker: int = 0, workers: int = 1):
        """Return the batches as a `tf.data.Dataset` (unknown length; one pass is one epoch); of worker
        `worker` of `workers`, the captions of its share of the shards (`ShardedStore.shard_paths`)."""
        import tensorflow as tf

        key = "regions" if self.spatial else "image"
        seed = self.seed if self.shuffle else None
        samples = self.store.records(self.image_ids, self.spatial, seed, worker=worker, workers=workers)
        samples = samples.map(self._expander(tf, key), num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        samples = samples.map(lambda features, tokens: (features, _dense(tokens, tf)))
        if self.shuffle:
            samples = samples.shuffle(self.shuffle_buffer(), seed=self.seed, reshuffle_each_iteration=True)
            batches = samples.bucket_by_sequence_length(
                lambda features, tokens: tf.shape(tokens)[0],
                self.bucket_boundaries(),
                self.bucket_batch_sizes(),
                pad_to_bucket_boundary=True,
            )
        else:
            batches = samples.padded_batch(self.batch_size).map(self._pad_to_bucket(tf))
        return batches.map(lambda features, tokens: _teacher_forcing(key, features, tokens, tf)).prefetch(
            tf.data.AUTOTUNE
        )

    def _pad_to_bucket(self, tf):
        """Return the map padding a batch of captions to a multiple of LENGTH_BUCKET (as `pad_batch`)."""

        def pad(features, tokens):
            width = tf.shape(tokens)[1]
            target = tf.minimum(self.max_caption_length, -(-width // LENGTH_BUCKET) * LENGTH_BUCKET)
            return features, tf.pad(tokens, [[0, 0], [0, target - width]])

        return pad

    def _expander(self, tf, key: str):
        """Return the map from a batch of records to one (features, tokens) row per caption of its images
        that are in this split (the others are dropped: a shard may hold other splits' images)."""
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(self.image_ids, tf.string), tf.range(len(self.image_ids), dtype=tf.int64)
            ),
            default_value=-1,
        )
        # Variables, not constants: a constant would be copied into the dataset's graph (twice, serialized).
        flat = tf.Variable(self.tokens, trainable=False)
        splits = [tf.Variable(np.concatenate([[0], np.cumsum(lengths)]), trainable=False)
                  for lengths in (self.captions_per_image, self.caption_lengths)]  # fmt: skip

        def expand(batch):
            rows = table.lookup(batch["id"])
            kept = rows >= 0
            rows, features = tf.boolean_mask(rows, kept), tf.boolean_mask(batch[key], kept)
            tokens = tf.RaggedTensor.from_nested_row_splits(flat, [s.read_value() for s in splits], validate=False)
            captions = tf.gather(tokens, rows)  # (images, captions, tokens), ragged
            image_of_caption = tf.repeat(tf.range(tf.shape(rows)[0]), captions.row_lengths())
            return tf.gather(features, image_of_caption), captions.values

        return expand

    def __len__(self) -> int:
        """Return the batches of one pass: with shuffling, each length bucket's captions over its batch
        size, rounded up (a part-filled batch per bucket at the end); the order does not change it."""
        if not self.shuffle:
            return -(-self.caption_count // self.batch_size)
        buckets = np.searchsorted(self.bucket_boundaries(), self.caption_lengths, side="right")
        counts = np.bincount(buckets, minlength=len(self.bucket_batch_sizes()))
        return int(sum(-(-int(n) // size) for n, size in zip(counts, self.bucket_batch_sizes(), strict=True)))


def _dense(tokens, tf):
    """Return one caption's token ids as a plain tensor (unbatching a ragged batch gives a ragged row)."""
    return tokens if isinstance(tokens, tf.Tensor) else tokens.flat_values


def _teacher_forcing(key: str, features, tokens, tf):
    """Return (inputs, next words, weights) of a padded batch of captions, as `CaptionSequence` gives them."""
    targets = tokens[:, 1:]
    inputs = {key: tf.cast(features, tf.float32), "words": tokens[:, :-1]}
    return inputs, targets, tf.cast(targets != 0, tf.float32)
