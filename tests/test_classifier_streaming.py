"""The classifier streamed from sharded feature stores (classifier/streaming.py, issue 18)."""

from __future__ import annotations

from collections import Counter

import keras
import numpy as np
import pytest

from classifier.model import ClassifierConfig, augmented_store_path, build_classifier, head_inputs
from classifier.streaming import LabelledPart, LabelledStream, keras_data, stream_probabilities
from features.shards import ShardedStore, ShardWriter, convert_store
from features.store import FeatureStore, FeatureStoreError

META = {"encoder": "x", "weights": "none", "dim": 6, "spatial": True, "spatial_shape": [2, 2, 3]}


def write_store(path, ids, shard_size=4, seed=0):
    """Write images `ids` whose vectors start with their number (0.jpg -> 0.0); return (vectors, maps)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(ids), 6)).astype(np.float32)
    vectors[:, 0] = [float(i.split(".")[0].split("#")[0]) for i in ids]
    maps = rng.normal(size=(len(ids), 2, 2, 3)).astype(np.float16)
    writer = ShardWriter(path, META, shard_size, "float32")
    writer.add(ids, vectors, maps)
    writer.finish()
    return ShardedStore.open(path), vectors, maps


def one_pass(stream, with_ids=True):
    return list(stream.as_dataset(with_ids=with_ids).as_numpy_iterator())


def test_one_pass_serves_each_asked_image_once_with_its_label_and_features(tmp_path):
    ids = [f"{i}.jpg" for i in range(23)]
    store, vectors, maps = write_store(tmp_path / "s", ids)
    labels = {f"{i}.jpg": i % 3 for i in range(0, 23, 2)}  # 12 of the 23: the others are another split's
    for spatial in (False, True):
        stream = LabelledStream([LabelledPart(store, labels)], batch_size=5, shuffle=True, seed=1, spatial=spatial)
        batches = one_pass(stream)
        assert len(batches) == len(stream) == 3  # 12 images, 5 a batch
        served = [i.decode() for _, _, batch_ids in batches for i in batch_ids]
        assert sorted(served) == sorted(labels)
        for inputs, batch_labels, batch_ids in batches:
            assert inputs.dtype == np.float32
            for row, label, image_id in zip(inputs, batch_labels, batch_ids, strict=True):
                n = ids.index(image_id.decode())
                assert label == labels[image_id.decode()]
                np.testing.assert_array_equal(row, maps[n].astype(np.float32) if spatial else vectors[n])


def test_a_shuffled_stream_changes_its_order_every_pass_and_an_unshuffled_one_keeps_its_own(tmp_path):
    ids = [f"{i}.jpg" for i in range(40)]
    store, _, _ = write_store(tmp_path / "s", ids)
    labels = dict.fromkeys(ids, 0)
    shuffled = LabelledStream([LabelledPart(store, labels)], batch_size=8, shuffle=True, seed=0).as_dataset(True)
    first, second = ([i.decode() for _, _, b in shuffled.as_numpy_iterator() for i in b] for _ in range(2))
    assert sorted(first) == sorted(second) == sorted(ids) and first != second
    in_order = LabelledStream([LabelledPart(store, labels)], batch_size=8, shuffle=False).as_dataset(True)
    first, second = ([i.decode() for _, _, b in in_order.as_numpy_iterator() for i in b] for _ in range(2))
    assert first == second and sorted(first) == sorted(ids)


def test_two_parts_are_mixed_when_shuffled_and_each_keeps_its_labels(tmp_path):
    ids = [f"{i}.jpg" for i in range(30)]
    originals, _, _ = write_store(tmp_path / "s", ids)
    variants = [f"{i}.jpg#flip" for i in range(30)]
    augmented, _, _ = write_store(tmp_path / "s_augmented", variants, shard_size=8, seed=1)
    parts = [LabelledPart(originals, {i: 0 for i in ids}), LabelledPart(augmented, {i: 1 for i in variants})]
    stream = LabelledStream(parts, batch_size=10, shuffle=True, seed=3)
    batches = one_pass(stream)
    assert len(batches) == len(stream) == 6
    served = [(i.decode(), int(label)) for _, labels, b in batches for i, label in zip(b, labels, strict=True)]
    assert Counter(served) == Counter([(i, 0) for i in ids] + [(i, 1) for i in variants])
    # drawn from both parts throughout the pass, not the originals first
    assert {label for _, label in served[:20]} == {0, 1}


def test_images_missing_from_the_store_are_refused_before_any_read(tmp_path):
    store, _, _ = write_store(tmp_path / "s", ["0.jpg", "1.jpg"])
    with pytest.raises(FeatureStoreError, match="no features for 1 image"):
        LabelledStream([LabelledPart(store, {"0.jpg": 0, "7.jpg": 1})])


def test_stream_probabilities_come_back_in_the_order_asked(tmp_path):
    ids = [f"{i}.jpg" for i in range(13)]
    store, vectors, _ = write_store(tmp_path / "s", ids)
    model = build_classifier(ClassifierConfig(3, 6, (2, 2, 3), units=4))
    order = ids[::-1][:9]
    stream = LabelledStream([LabelledPart(store, dict.fromkeys(order, 0))], batch_size=4, shuffle=False)
    got = stream_probabilities(model, stream, order)
    expected = model.predict(vectors[[ids.index(i) for i in order]], verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_fit_on_a_stream_runs_one_pass_an_epoch(tmp_path):
    ids = [f"{i}.jpg" for i in range(20)]
    store, _, _ = write_store(tmp_path / "s", ids)
    stream = LabelledStream([LabelledPart(store, {i: n % 2 for n, i in enumerate(ids)})], batch_size=6, seed=0)
    model = build_classifier(ClassifierConfig(2, 6, (2, 2, 3), units=4))
    model.compile("adam", "sparse_categorical_crossentropy")
    data, steps = keras_data(stream, repeat=True)
    model.fit(data, steps_per_epoch=steps, epochs=3, verbose=0)
    assert steps == 4 and int(model.optimizer.iterations.numpy()) == 12


# ---- train and evaluate a classifier on a sharded store, end to end ----


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A dense run with flipped variants and a gru run, trained on a sharded store of 2 images a shard,
    with reading a sharded store into arrays forbidden; and the same store converted to a pickle."""
    from test_classifier import flower_folder

    from classifier.evaluation import evaluate_classifier
    from classifier.training import ClassifierTrainingOptions, train_classifier
    from features.extract import extract_features

    base = tmp_path_factory.mktemp("streamed")
    flowers = flower_folder(base / "flowers", per_class=5)
    shards = base / "store"
    sources = {f"{p.parent.name}/{p.name}": p for p in sorted(flowers.glob("*/*.png"))}
    extract_features(sources, shards, "efficientnet_lite0", "imagenet", 8, spatial=True, progress=False, shard_size=2)
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ShardedStore, "_gather", lambda *_: pytest.fail("a sharded store was read into an array"))
        for head, augmentations in (("dense", ["flip"]), ("gru", [])):
            options = ClassifierTrainingOptions(
                head=head, augmentations=augmentations, epochs=3, batch_size=4, learning_rate=1e-2, units=8,
                rnn_units=4, validation_fraction=0.4,
            )  # fmt: skip
            runs[head] = train_classifier(flowers, base / head, options, shards, progress=False, verbose=0)
            runs[f"{head}_evaluation"] = evaluate_classifier(base / head, flowers, progress=False)
        runs["flip_evaluation"] = evaluate_classifier(base / "dense", flowers, progress=False, flip=True)
    convert_store(shards, base / "store.pkl")
    return {"runs": runs, "shards": shards, "pickle": base / "store.pkl", "flowers": flowers}


def array_loss_and_accuracy(run_dir, pickle_path, head):
    """Return the saved model's validation loss and accuracy, computed from the pickle store's arrays."""
    from classifier.model import load_classifier_run

    run = load_classifier_run(run_dir)
    ids = run.split()["validation"]
    labels = np.array([run.classes.index(i.split("/")[0]) for i in ids])
    store = FeatureStore.load(pickle_path)
    probabilities = run.model.predict(head_inputs(store, pickle_path, ids, head == "gru").astype(np.float32), verbose=0)
    store.close()
    loss = float(keras.losses.sparse_categorical_crossentropy(labels, probabilities).numpy().mean())
    return loss, float((probabilities.argmax(1) == labels).mean()), len(ids)


@pytest.mark.parametrize("head", ["dense", "gru"])
def test_a_run_streamed_from_shards_scores_its_validation_split_as_the_arrays_do(streamed, head):
    result, evaluation = streamed["runs"][head], streamed["runs"][f"{head}_evaluation"]
    loss, accuracy, count = array_loss_and_accuracy(result.run_dir, streamed["pickle"], head)
    assert result.validation_images == evaluation.images == count == 6
    assert result.best_val_loss == pytest.approx(loss, rel=1e-5)
    assert result.val_accuracy == pytest.approx(accuracy) and evaluation.accuracy == pytest.approx(accuracy)


def test_the_flipped_variants_of_a_sharded_store_go_to_a_sharded_store_beside_it(streamed):
    result, evaluation = streamed["runs"]["dense"], streamed["runs"]["flip_evaluation"]
    variants = ShardedStore.open(augmented_store_path(streamed["shards"]))
    assert variants.path.name == "store_augmented"
    assert result.augmented_images == result.train_images == 9
    # the train images' variants, then the validation images' mirrors added by the --flip evaluation
    assert evaluation.flip and evaluation.images == 6 and len(variants) == 9 + 6
    assert all(i.endswith("#flip") for i in variants.image_ids())


def test_a_corrupt_shard_stops_classifier_training_with_one_line(streamed, tmp_path, capsys):
    import shutil

    import classify

    store = tmp_path / "store"
    shutil.copytree(streamed["shards"], store)
    shard = sorted(store.glob("shard-*.tfrecord"))[3]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the size is right: only reading finds it
    shard.write_bytes(bytes(data))
    argv = ["train", "--data", str(streamed["flowers"]), "--out", str(tmp_path / "run"), "--features", str(store),
            "--epochs", "1", "--no-progress"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        classify.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and len(err.splitlines()) == 1
    assert "a shard is corrupt or malformed" in err and str(store) in err


def test_a_new_sharded_store_keeps_spatial_maps_only_for_a_head_that_reads_them(streamed, tmp_path):
    from classifier.model import ensure_features

    sources = {f"{p.parent.name}/{p.name}": p for p in sorted(streamed["flowers"].glob("daisy/*.png"))}
    for needs_spatial in (False, True):
        store, _ = ensure_features(sources, tmp_path / f"s{needs_spatial}", "efficientnet_lite0", "imagenet",
                                   needs_spatial, progress=False)  # fmt: skip
        assert store.spatial_shape == ((7, 7, 1280) if needs_spatial else None) and len(store) == 5
    pickled, _ = ensure_features(sources, tmp_path / "p.pkl", "efficientnet_lite0", "imagenet", False, progress=False)
    assert pickled.metadata["spatial"]  # a small pickle store serves both heads
