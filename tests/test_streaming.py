"""Teacher-forcing batches streamed from shards (issue 18): the same samples as the in-memory batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from features.shards import ShardWriter, convert_store
from features.store import FeatureStore, FeatureStoreError, open_feature_store
from pipeline.batches import CaptionSequence, encode_captions
from pipeline.caption_arrays import EncodedCaptions
from pipeline.streaming import CaptionStream
from pipeline.vocabulary import Vocabulary

WORDS = ["a", "dog", "runs", "on", "the", "grass", "red", "ball", "in", "park", "big", "small"]


def synthetic_split(count: int, seed: int = 0):
    """Return (ids, {id: cleaned captions}, float16-exact vectors) with 1 to 5 captions of 1 to 20 words."""
    rng = np.random.default_rng(seed)
    ids = [f"{i:03d}.jpg" for i in range(count)]
    captions = {i: [list(rng.choice(WORDS, rng.integers(1, 21))) for _ in range(rng.integers(1, 6))] for i in ids}
    vectors = rng.normal(size=(count, 4)).astype(np.float16).astype(np.float32)
    return ids, captions, vectors


def samples(batches, key="image", longest=23):
    """Return the Counter of (features bytes, caption tokens) over batches; check each batch's shape rules."""
    found = Counter()
    for inputs, targets, weights in batches:
        inputs, targets, weights = (
            {k: np.asarray(v) for k, v in inputs.items()},
            np.asarray(targets),
            np.asarray(weights),
        )
        width = inputs["words"].shape[1] + 1
        assert width % 8 == 0 or width == longest, width  # padded to a multiple of 8, or to the longest caption
        np.testing.assert_array_equal(weights, (targets != 0).astype(np.float32))
        for features, words, target in zip(inputs[key], inputs["words"], targets, strict=True):
            tokens = [int(words[0]), *[int(t) for t in target if t != 0]]
            found[(features.astype(np.float32).tobytes(), tuple(tokens))] += 1
    return found


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A sharded store of 40 images (shards of 6) with float16-exact vectors, and the captions of 30 of them."""
    ids, captions, vectors = synthetic_split(40)
    path = tmp_path_factory.mktemp("stream") / "shards"
    writer = ShardWriter(path, {"encoder": "x", "weights": "none", "dim": 4, "spatial": False}, 6, "float16")
    writer.add(ids, vectors)
    writer.finish()
    vocabulary = Vocabulary.build([c for i in ids for c in captions[i]], min_count=1)
    return open_feature_store(path), ids[5:35], captions, dict(zip(ids, vectors, strict=True)), vocabulary


def test_a_stream_holds_exactly_the_in_memory_samples(sharded):
    store, split_ids, captions, vectors, vocabulary = sharded
    stream = CaptionStream(
        store, EncodedCaptions.encode(split_ids, captions, vocabulary, 23), 23, batch_size=8, shuffle=True, seed=1
    )
    rows, sequences = encode_captions(split_ids, captions, vocabulary, 23)
    memory = CaptionSequence(np.stack([vectors[i] for i in split_ids]), rows, sequences, 23, batch_size=8)
    streamed = samples(stream.as_dataset())
    assert streamed == samples(memory[i] for i in range(len(memory)))  # nothing lost, nothing doubled
    assert sum(streamed.values()) == stream.caption_count == len(sequences)
    # The other images' records are in the same shards, but not in the batches.
    others = {vectors[i].tobytes() for i in vectors if i not in split_ids}
    assert not others & {features for features, _ in streamed}


def test_batches_group_captions_of_a_length_and_epochs_reshuffle(sharded):
    store, split_ids, captions, _, vocabulary = sharded
    stream = CaptionStream(
        store, EncodedCaptions.encode(split_ids, captions, vocabulary, 23), 23, batch_size=8, shuffle=True, seed=1
    )
    dataset = stream.as_dataset()
    first = [np.asarray(t) for _, t, _ in dataset]
    second = [np.asarray(t) for _, t, _ in dataset]
    assert [t.shape for t in first] != [t.shape for t in second] or any(
        not np.array_equal(a, b) for a, b in zip(first, second, strict=True)
    )
    # Bucketing: every caption of a batch pads to the same multiple of 8 (the padding is never a whole bucket),
    # and a batch holds about as many words as 8 captions of mean length: more captions when they are short.
    sizes = dict(zip((8, 16, 23), stream.bucket_batch_sizes(), strict=False))
    mean_length = stream.caption_lengths.mean()
    assert stream.bucket_batch_sizes() == [round(8 * mean_length / w) for w in (8, 16, 23)] + [8]
    for targets in first:
        lengths = (targets != 0).sum(axis=1) + 1  # + <start>
        assert lengths.max() <= targets.shape[1] + 1 and lengths.min() > targets.shape[1] + 1 - 8
        assert len(targets) <= sizes[targets.shape[1] + 1]
    assert max(len(t) for t in first) == sizes[8] > 8
    # Without shuffling: batches of 8 captions in the store's order, padded alike; two passes are the same.
    fixed = CaptionStream(
        store, EncodedCaptions.encode(split_ids, captions, vocabulary, 23), 23, batch_size=8, shuffle=False
    ).as_dataset()
    passes = [[np.asarray(t) for _, t, _ in fixed] for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(*passes, strict=True))
    assert [len(t) for t in passes[0][:-1]] == [8] * (len(passes[0]) - 1)
    assert samples(fixed) == samples(stream.as_dataset())


def test_spatial_maps_stream_as_regions(tmp_path, tiny_spatial_store):
    store = convert_store(tiny_spatial_store, tmp_path / "shards", shard_size=4)
    pickled = FeatureStore.load(tiny_spatial_store)
    ids = sorted(pickled.features)[:5]
    captions = {i: [["a", "red", "box"], ["red"]] for i in ids}
    vocabulary = Vocabulary.build(captions[ids[0]], min_count=1)
    stream = CaptionStream(
        store, EncodedCaptions.encode(ids, captions, vocabulary, 5), 5, batch_size=4, shuffle=True, spatial=True
    )
    assert stream.shuffle_buffer() == 2139  # 256 MiB of 7x7x1280 float16 maps (125,440 bytes each)
    found = samples(stream.as_dataset(), key="regions", longest=5)
    expected = {
        (pickled.maps([i])[0].tobytes(), tuple(vocabulary.encode(c)[:-1] + [vocabulary.end_id]))
        for i in ids
        for c in captions[i]
    }
    assert set(found) == expected
    with pytest.raises(FeatureStoreError, match="no spatial maps"):
        vector_store = convert_store(_without_maps(tmp_path, pickled), tmp_path / "vector_shards")
        CaptionStream(vector_store, EncodedCaptions.encode(ids, captions, vocabulary, 5), 5, spatial=True).as_dataset()
    pickled.close()


def _without_maps(tmp_path, store):
    path = tmp_path / "vectors.pkl"
    FeatureStore({**store.metadata, "spatial": False}, store.features).save(path)
    return path


def test_training_streams_from_shards(tiny_flickr, tiny_store, tmp_path):
    from models.rundir import RunDir
    from models.training import TrainingOptions, train_caption_model

    shards = convert_store(tiny_store, tmp_path / "shards", shard_size=4)
    options = TrainingOptions(epochs=3, batch_size=8, learning_rate=1e-2, min_count=1, seed=1, patience=20)
    model_options = {"units": 16, "embedding_dim": 8, "dropout": 0.1}
    result = train_caption_model(shards.path, tiny_flickr, tmp_path / "run", options, model_options, verbose=0)
    assert result.epochs_run == 3 and result.train_captions == 27 and np.isfinite(result.best_val_loss)
    config = RunDir(tmp_path / "run").read_config()
    assert config["features"] == str(shards.path) and config["data_format"] == "flickr8k"
    assert config["train_images"] == 9 and config["dev_images"] == 3
    rows = RunDir(tmp_path / "run").read_history()
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])  # it learns from the stream


def test_a_corrupt_shard_stops_training_with_one_error_naming_the_store(tiny_flickr, tiny_store, tmp_path):
    from models.training import TrainingOptions, train_caption_model

    shards = convert_store(tiny_store, tmp_path / "shards", shard_size=4)
    shard = sorted(shards.path.glob("shard-*.tfrecord"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the size is right: only reading finds it, during the fit
    shard.write_bytes(bytes(data))
    options = TrainingOptions(epochs=1, batch_size=8, min_count=1)
    with pytest.raises(FeatureStoreError, match="a shard is corrupt or malformed") as error:
        train_caption_model(shards.path, tiny_flickr, tmp_path / "run", options, {"units": 8}, verbose=0)
    assert str(error.value).startswith(str(shards.path)) and "\n" not in str(error.value)


def test_self_critical_training_reads_shards_as_it_reads_the_pickle(tiny_run, tiny_store, tiny_flickr, tmp_path):
    import csv

    from models.self_critical import SelfCriticalOptions, self_critical_train

    shards = convert_store(tiny_store, tmp_path / "shards", shard_size=4)
    options = SelfCriticalOptions(epochs=1, batch_images=4, samples=2, learning_rate=1e-3)
    scores = {}
    for name, features in (("pickle", tiny_store), ("shards", shards.path)):
        result = self_critical_train(tiny_run, features, tiny_flickr, tmp_path / name, options, verbose=False)
        rows = list(csv.DictReader((tmp_path / name / "history.csv").open()))
        assert result.epochs_run == 1 and [int(r["epoch"]) for r in rows] == [0, 1]
        scores[name] = rows[0]["dev_cider_d"]
    # The starting model's dev score reads the same features from either store (exact float32 shards).
    assert scores["shards"] == scores["pickle"]


def test_an_attention_run_trains_on_streamed_maps(tiny_flickr, tiny_spatial_store, tmp_path):
    from models.training import TrainingOptions, train_caption_model

    shards = convert_store(tiny_spatial_store, tmp_path / "shards", shard_size=5)
    options = TrainingOptions(epochs=2, batch_size=8, learning_rate=1e-2, min_count=1, seed=1, patience=20)
    model_options = {"decoder": "attention", "cell": "gru", "units": 16, "embedding_dim": 8, "dropout": 0.1}
    result = train_caption_model(shards.path, tiny_flickr, tmp_path / "run", options, model_options, verbose=0)
    assert result.epochs_run == 2 and np.isfinite(result.best_val_loss)


def test_captions_encoded_in_a_child_process_are_those_encoded_here(tiny_flickr):
    from pipeline.caption_arrays import CaptionSelection, encode_caption_data, encode_caption_data_apart
    from pipeline.captions import CaptionFileError
    from pipeline.datasets import open_dataset

    dataset = open_dataset(tiny_flickr)
    available = set(dataset.captions())
    selection = CaptionSelection(min_count=1, limit_train=5)
    here = encode_caption_data(open_dataset(tiny_flickr), available, selection)
    apart = encode_caption_data_apart(open_dataset(tiny_flickr), available, selection)
    assert apart.data.vocabulary.words == here.data.vocabulary.words
    assert apart.data.max_caption_length == here.data.max_caption_length
    for ours, theirs in ((apart.train, here.train), (apart.dev, here.dev)):
        assert ours.image_ids == theirs.image_ids and ours.caption_count == theirs.caption_count > 0
        np.testing.assert_array_equal(ours.tokens, theirs.tokens)
        np.testing.assert_array_equal(ours.caption_lengths, theirs.caption_lengths)
    assert len(here.train.image_ids) == 5 and here.data.train.captions == {}  # the Python captions are dropped
    unread = open_dataset(tiny_flickr)  # its captions are read in the child, after the file is gone
    (tiny_flickr / "Flickr8k.token.txt").rename(tiny_flickr / "moved.txt")
    try:
        with pytest.raises(CaptionFileError, match="Flickr8k.token.txt"):  # raised in the child, seen here
            encode_caption_data_apart(unread, available, CaptionSelection(min_count=1))
    finally:
        (tiny_flickr / "moved.txt").rename(tiny_flickr / "Flickr8k.token.txt")
