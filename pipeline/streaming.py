"""Teacher-forcing batches streamed from a sharded feature store through `tf.data`.

The same samples as `pipeline.batches.CaptionSequence` (one per caption: the image's features, the
caption's inputs, its next words, weights 0 on padding), but the features are never all in memory:
shards are read a few at a time in a new order every epoch (`ShardedStore.records`), each image's
record becomes one sample per caption, samples pass through a shuffle buffer, and batches are formed
by caption length (`bucket_by_sequence_length`) and padded to a multiple of `LENGTH_BUCKET`, so a
batch wastes little on padding and only a few shapes get traced. What stays in memory grows with the
captions (their token ids, a few bytes each), not with the feature store.
"""

from __future__ import annotations

import numpy as np

from pipeline.batches import LENGTH_BUCKET, encode_captions

SHUFFLE_CAPTIONS = 8192  # samples in the shuffle buffer at most
SHUFFLE_BYTES = 256 << 20  # ... and at most this many bytes of features in it (spatial maps are big)


class CaptionStream:
    """Batches of ({"image" or "regions": features, "words": inputs}, next words, weights) for `model.fit`,
    read from a sharded store. Each pass over `as_dataset()` is one epoch, shuffled anew when `shuffle`."""

    def __init__(
        self,
        store,
        image_ids: list[str],
        captions: dict[str, list[list[str]]],
        vocabulary,
        max_caption_length: int,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        spatial: bool = False,
    ):
        self.store, self.image_ids, self.spatial = store, list(image_ids), spatial
        self.max_caption_length, self.batch_size = max_caption_length, batch_size
        self.shuffle, self.seed = shuffle, seed
        rows, sequences = encode_captions(self.image_ids, captions, vocabulary, max_caption_length)
        self.caption_count = len(sequences)
        # Compact token storage: one flat int32 array and two length arrays, not a list per caption.
        self.captions_per_image = np.bincount(rows, minlength=len(self.image_ids)).astype(np.int64)
        self.caption_lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        self.tokens = np.fromiter(
            (t for s in sequences for t in s), dtype=np.int32, count=int(self.caption_lengths.sum())
        )

    def shuffle_buffer(self) -> int:
        """Return the shuffle buffer's size in samples: `SHUFFLE_CAPTIONS`, fewer for big features."""
        shape = self.store.spatial_shape if self.spatial else (self.store.dim,)
        sample_bytes = int(np.prod(shape)) * (2 if self.spatial else 4)  # maps stay float16 until batched
        return max(4 * self.batch_size, min(SHUFFLE_CAPTIONS, SHUFFLE_BYTES // sample_bytes))

    def bucket_boundaries(self) -> list[int]:
        """Return the length boundaries: a caption of n tokens is padded to the next multiple of
        LENGTH_BUCKET (at most `max_caption_length`), as `pipeline.batches.pad_batch` pads."""
        widths = list(range(LENGTH_BUCKET, self.max_caption_length, LENGTH_BUCKET)) + [self.max_caption_length]
        return [width + 1 for width in widths]

    def as_dataset(self):
        """Return the batches as a `tf.data.Dataset` (unknown length; one pass is one epoch)."""
        import tensorflow as tf

        key = "regions" if self.spatial else "image"
        samples = self.store.records(self.image_ids, self.spatial, self.seed if self.shuffle else None)
        samples = samples.map(self._expander(tf, key), num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        samples = samples.map(lambda features, tokens: (features, _dense(tokens, tf)))
        if self.shuffle:
            samples = samples.shuffle(self.shuffle_buffer(), seed=self.seed, reshuffle_each_iteration=True)
        boundaries = self.bucket_boundaries()
        batches = samples.bucket_by_sequence_length(
            lambda features, tokens: tf.shape(tokens)[0],
            boundaries,
            [self.batch_size] * (len(boundaries) + 1),
            pad_to_bucket_boundary=True,
        )
        return batches.map(lambda features, tokens: _teacher_forcing(key, features, tokens, tf)).prefetch(
            tf.data.AUTOTUNE
        )

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
        """Return about how many batches an epoch has (bucketing leaves a part-filled batch per length)."""
        return -(-self.caption_count // self.batch_size)


def _dense(tokens, tf):
    """Return one caption's token ids as a plain tensor (unbatching a ragged batch gives a ragged row)."""
    return tokens if isinstance(tokens, tf.Tensor) else tokens.flat_values


def _teacher_forcing(key: str, features, tokens, tf):
    """Return (inputs, next words, weights) of a padded batch of captions, as `CaptionSequence` gives them."""
    targets = tokens[:, 1:]
    inputs = {key: tf.cast(features, tf.float32), "words": tokens[:, :-1]}
    return inputs, targets, tf.cast(targets != 0, tf.float32)
