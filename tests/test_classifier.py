"""The image classifier: heads, class folders, augmentation, training, evaluation, inference, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from classifier.classes import ClassFolderError, LabelledBatches, load_class_folder, stratified_split
from classifier.model import (
    ClassifierConfig,
    ClassifierError,
    build_classifier,
    classify_files,
    compile_classifier,
    head_inputs,
    load_classifier_run,
    predict_probabilities,
)
from conftest import make_image
from features.augment import AUGMENTATIONS, augment_pixels, augmented_id, original_id
from features.store import FeatureStore
from models.rundir import RunDirError, save_model_without_optimizer

FLOWER_COLOURS = {"daisy": (235, 235, 235), "roses": (200, 20, 40), "tulips": (240, 200, 20)}


def tiny_config(head: str, num_classes: int = 3) -> ClassifierConfig:
    return ClassifierConfig(num_classes, feature_dim=16, spatial_shape=(2, 3, 8), head=head, units=16, rnn_units=8)


def separable_inputs(config: ClassifierConfig, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random features whose class shifts their mean, so a head can learn them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, config.num_classes, count)
    shape = (config.feature_dim,) if config.head == "dense" else config.spatial_shape
    inputs = rng.normal(size=(count, *shape)).astype(np.float32)
    inputs[..., 0] += 3.0 * labels.reshape(-1, *[1] * len(shape))[..., 0]
    return inputs, labels


# ---- heads ----


@pytest.mark.parametrize("head", ["dense", "gru"])
def test_a_few_training_steps_lower_the_loss(head):
    keras.utils.set_random_seed(0)
    config = tiny_config(head)
    model = build_classifier(config)
    compile_classifier(model, 1e-2)
    inputs, labels = separable_inputs(config, 64)
    before = model.evaluate(inputs, labels, verbose=0)[0]
    for _ in range(30):
        model.train_on_batch(inputs, labels)
    after = model.evaluate(inputs, labels, verbose=0)[0]
    assert after < 0.5 * before


@pytest.mark.parametrize("head, input_shape", [("dense", (16,)), ("gru", (2, 3, 8))])
def test_heads_take_any_number_of_classes(head, input_shape):
    model = build_classifier(tiny_config(head, num_classes=7))
    assert tuple(model.input.shape[1:]) == input_shape
    probabilities = model.predict(np.zeros((2, *input_shape), np.float32), verbose=0)
    assert probabilities.shape == (2, 7)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_gru_head_reads_the_map_as_a_sequence_of_regions():
    model = build_classifier(tiny_config("gru"))
    assert tuple(model.get_layer("regions").output.shape[1:]) == (6, 8)  # 2 x 3 regions of 8 channels


def test_unknown_head_and_too_few_classes_are_refused():
    with pytest.raises(ClassifierError, match="unknown head 'cnn'"):
        build_classifier(tiny_config("cnn"))
    with pytest.raises(ClassifierError, match="at least 2 classes"):
        build_classifier(tiny_config("dense", num_classes=1))


def test_dense_head_without_hidden_layer_is_a_softmax_on_the_features():
    config = tiny_config("dense")
    config.units = 0
    model = build_classifier(config)
    assert [layer.name for layer in model.layers] == ["features", "dropout", "classes"]
    assert model.count_params() == 16 * 3 + 3


def test_l2_penalty_adds_its_weighted_sum_of_squares_to_the_loss():
    config = tiny_config("dense")
    config.l2 = 0.01
    model = build_classifier(config)
    expected = 0.01 * sum(float(np.sum(model.get_layer(n).kernel.numpy() ** 2)) for n in ("hidden", "classes"))
    assert len(model.losses) == 2
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)
    assert not build_classifier(tiny_config("dense")).losses


def test_label_smoothing_targets_the_smoothed_distribution():
    from classifier.model import classification_loss

    labels = np.array([0, 2])
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    plain = float(np.mean(classification_loss(0.0)(labels, probabilities)))
    assert plain == pytest.approx(-(np.log(0.7) + np.log(0.8)) / 2, rel=1e-5)
    # 0.3 smoothing over 3 classes: targets 0.8 on the true class, 0.1 on the others.
    smoothed = np.mean(classification_loss(0.3)(labels, probabilities))
    expected = -np.mean(
        [0.8 * np.log(0.7) + 0.1 * np.log(0.2) + 0.1 * np.log(0.1), 0.1 * np.log(0.1) * 2 + 0.8 * np.log(0.8)]
    )
    assert float(smoothed) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ClassifierError, match="label smoothing"):
        classification_loss(1.0)


@pytest.mark.parametrize("head", ["dense", "gru"])
def test_save_and_load_give_identical_predictions(tmp_path, head):
    config = tiny_config(head)
    config.l2 = 1e-3  # the regularizers must round-trip too
    model = build_classifier(config)
    inputs, _ = separable_inputs(config, 5)
    save_model_without_optimizer(model, tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_array_equal(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0))
    assert ClassifierConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_labelled_batches_widen_float16_and_cover_every_row_once():
    inputs = np.arange(10, dtype=np.float16).reshape(10, 1)
    batches = LabelledBatches(inputs, np.arange(10), batch_size=4, shuffle=True, seed=3)
    assert len(batches) == 3
    seen = np.concatenate([batches[i][1] for i in range(len(batches))])
    assert sorted(seen) == list(range(10))
    x, y = batches[0]
    assert x.dtype == np.float32 and np.array_equal(x[:, 0], y)


# ---- class folders and splits ----


def flower_folder(root: Path, per_class: int = 5, colours: dict = FLOWER_COLOURS) -> Path:
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            make_image(root / name / f"{k}.png", colour, size=(40, 30), noise_seed=k)
    return root


def test_class_folder_skips_empty_classes_and_stray_files(tmp_path):
    root = flower_folder(tmp_path / "flowers", per_class=2)
    (root / "sunflowers").mkdir()  # empty
    (root / ".cache").mkdir()  # hidden
    (root / "daisy" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("stray file at the top")
    folder = load_class_folder(root)
    assert folder.classes == ["daisy", "roses", "tulips"]
    assert folder.empty_classes == ["sunflowers"]
    assert sorted(folder.sources) == [
        "daisy/0.png",
        "daisy/1.png",
        "roses/0.png",
        "roses/1.png",
        "tulips/0.png",
        "tulips/1.png",
    ]
    assert folder.labels["roses/1.png"] == 1 and folder.sources["roses/1.png"] == root / "roses" / "1.png"
    assert folder.counts() == {"daisy": 2, "roses": 2, "tulips": 2}


def test_class_folder_follows_a_models_class_order_and_refuses_unknown_classes(tmp_path):
    root = flower_folder(tmp_path / "flowers", per_class=1)
    folder = load_class_folder(root, ["tulips", "roses", "daisy", "dandelion"])
    assert folder.labels == {"tulips/0.png": 0, "roses/0.png": 1, "daisy/0.png": 2}
    with pytest.raises(ClassFolderError, match="tulips unknown to the model"):
        load_class_folder(root, ["daisy", "roses"])


@pytest.mark.parametrize("make", ["missing", "one class"])
def test_unusable_class_folders_raise(tmp_path, make):
    if make == "one class":
        flower_folder(tmp_path, colours={"daisy": (1, 2, 3)})
    with pytest.raises(ClassFolderError, match="no such folder" if make == "missing" else "need at least 2"):
        load_class_folder(tmp_path / "nowhere" if make == "missing" else tmp_path)


def test_stratified_split_keeps_class_proportions_and_is_reproducible():
    labels = {f"a/{i}": 0 for i in range(40)} | {f"b/{i}": 1 for i in range(10)}
    train, validation = stratified_split(labels, labels, 0.2, seed=4)
    assert len(validation) == 10 and sum(labels[i] for i in validation) == 2  # 8 of a, 2 of b
    assert not set(train) & set(validation) and len(train) == 40
    assert stratified_split(labels, labels, 0.2, seed=4) == (train, validation)
    assert stratified_split(labels, labels, 0.2, seed=5)[1] != validation
    with pytest.raises(ClassFolderError, match="cannot split"):
        stratified_split(["a/0", "a/1", "b/0"], {"a/0": 0, "a/1": 0, "b/0": 1}, 0.3)


# ---- augmentation ----


def test_augmentations_are_deterministic_and_named_in_the_id():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, (32, 32, 3)).astype(np.float32)
    assert augmented_id("daisy/1.jpg", "flip") == "daisy/1.jpg#flip"
    assert original_id("daisy/1.jpg#flip") == "daisy/1.jpg" and original_id("a/b#c.jpg") == "a/b#c.jpg"
    np.testing.assert_array_equal(augment_pixels("daisy/1.jpg#flip", pixels), pixels[:, ::-1])
    np.testing.assert_array_equal(augment_pixels("daisy/1.jpg", pixels), pixels)
    np.testing.assert_array_equal(augment_pixels("daisy/1.jpg#bright", pixels), np.clip(pixels * 1.25, 0, 255))
    rotated = augment_pixels("daisy/1.jpg#rotate", pixels)
    assert rotated.shape == pixels.shape and rotated.dtype == np.float32
    assert not np.array_equal(rotated, pixels)
    np.testing.assert_array_equal(rotated, augment_pixels("x#rotate", pixels))
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmented_id("daisy/1.jpg", "blur")


# ---- a tiny trained run (random encoder weights) ----


@pytest.fixture(scope="module")
def flowers(tmp_path_factory) -> Path:
    root = flower_folder(tmp_path_factory.mktemp("flowers") / "train")
    (root / "sunflowers").mkdir()
    (root / "tulips" / "Thumbs.db").write_bytes(b"\0" * 10)
    return root


@pytest.fixture(scope="module")
def trained(flowers, tmp_path_factory) -> dict:
    from classifier.training import ClassifierTrainingOptions, train_classifier

    base = tmp_path_factory.mktemp("classifier")
    runs = {}
    for head, augmentations in (("dense", []), ("gru", list(AUGMENTATIONS))):
        options = ClassifierTrainingOptions(
            head=head,
            augmentations=augmentations,
            epochs=3,
            batch_size=4,
            learning_rate=1e-2,
            units=8,
            rnn_units=4,
            # The real encoder: with random weights (weights="none") every image's features are the
            # same ~1e-12 vector, and no test could tell one image from another.
            weights="imagenet",
            validation_fraction=0.4,
        )
        runs[head] = train_classifier(flowers, base / head, options, base / "store.pkl", progress=False, verbose=0)
    runs["store"] = base / "store.pkl"
    return runs


def test_training_writes_a_complete_run_directory(trained, flowers):
    result = trained["dense"]
    run_dir = result.run_dir
    for name in ("model.keras", "classes.json", "config.json", "split.json", "history.csv", "curves.png"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == "image-classifier" and config["head"] == "dense"
    assert config["encoder"] == "efficientnet_lite0" and config["weights"] == "imagenet"
    assert config["feature_dim"] == 1280 and config["classes"] == ["daisy", "roses", "tulips"]
    assert config["split_seed"] == 0 and config["empty_classes"] == ["sunflowers"]
    assert json.loads((run_dir / "classes.json").read_text()) == ["daisy", "roses", "tulips"]
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) == 9 and len(split["validation"]) == 6  # 40% of 5 per class
    assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + result.epochs_run
    assert not list(run_dir.glob(".*"))  # no leftover temporary or checkpoint file
    assert result.empty_classes == ["sunflowers"] and result.augmented_images == 0


def test_augmented_variants_of_train_images_only_go_to_their_own_store(trained):
    result = trained["gru"]
    split = json.loads((result.run_dir / "split.json").read_text())
    originals = FeatureStore.load(trained["store"])
    augmented = FeatureStore.load(trained["store"].with_name("store.augmented.pkl"))
    assert sorted(originals.features) == sorted(split["train"] + split["validation"])
    assert sorted(augmented.features) == sorted(f"{i}#{n}" for i in split["train"] for n in AUGMENTATIONS)
    assert result.augmented_images == 9 * len(AUGMENTATIONS)
    first = split["train"][0]
    assert not np.array_equal(augmented.features[f"{first}#flip"], originals.features[first])


def test_a_second_training_reuses_the_feature_store_and_refuses_to_overwrite_a_run(trained, flowers, tmp_path):
    from classifier.training import ClassifierTrainingOptions, train_classifier

    with pytest.raises(ClassifierError, match="already holds a training run"):
        train_classifier(
            flowers,
            trained["dense"].run_dir,
            ClassifierTrainingOptions(weights="none"),
            trained["store"],
            progress=False,
            verbose=0,
        )
    # Only the flipped variants, from the augmented store the gru run filled: nothing is extracted again.
    stores = [trained["store"], trained["store"].with_name("store.augmented.pkl")]
    before = [p.stat().st_mtime_ns for p in stores]
    options = ClassifierTrainingOptions(
        augmentations=["flip"], epochs=1, units=0, weights="imagenet", validation_fraction=0.4, seed=3, split_seed=0
    )
    result = train_classifier(flowers, tmp_path / "again", options, trained["store"], progress=False, verbose=0)
    assert [p.stat().st_mtime_ns for p in stores] == before
    # Another weight seed, the same validation split: split_seed alone decides it.
    split = json.loads((result.run_dir / "split.json").read_text())
    assert split == json.loads((trained["dense"].run_dir / "split.json").read_text())
    assert result.augmented_images == 9 and result.train_images == 9


def test_bad_training_options_fail_before_any_extraction(flowers, tmp_path):
    from classifier.training import ClassifierTrainingOptions, train_classifier

    for options, message in [
        (ClassifierTrainingOptions(head="cnn"), "unknown head 'cnn'"),
        (ClassifierTrainingOptions(augmentations=["flip", "blur"]), "unknown augmentation"),
        (ClassifierTrainingOptions(units=-1), "units must be"),
        (ClassifierTrainingOptions(label_smoothing=1.5), "label smoothing"),
    ]:
        with pytest.raises(ClassifierError, match=message):
            train_classifier(flowers, tmp_path / "run", options, tmp_path / "store.pkl", progress=False, verbose=0)
    assert not (tmp_path / "store.pkl").exists() and not (tmp_path / "run").exists()


def test_classify_files_matches_the_stored_features_and_reports_bad_files(trained, flowers, tmp_path):
    run = load_classifier_run(trained["dense"].run_dir)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    paths = [flowers / "roses" / "3.png", bad, flowers / "daisy" / "0.png", tmp_path / "missing.jpg"]
    results, errors = classify_files(run, paths)
    assert [r.image for r in results] == [str(paths[0]), str(paths[2])]
    assert set(errors) == {str(bad), str(tmp_path / "missing.jpg")}
    assert "not an image" in errors[str(bad)] and "no such file" in errors[str(tmp_path / "missing.jpg")]
    store = FeatureStore.load(trained["store"])
    expected = predict_probabilities(
        run.model, head_inputs(store, trained["store"], ["roses/3.png", "daisy/0.png"], False)
    )
    for result, row in zip(results, expected, strict=True):
        assert result.label == run.classes[int(row.argmax())]
        assert result.probability == pytest.approx(float(row.max()), abs=1e-5)
        assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(results[0].to_dict()) == {"image", "class", "probability", "probabilities"}


def test_classify_files_runs_the_gru_head_on_spatial_maps(trained, flowers):
    run = load_classifier_run(trained["gru"].run_dir)
    results, errors = classify_files(run, [flowers / "tulips" / "1.png", flowers / "daisy" / "2.png"])
    assert not errors
    store = FeatureStore.load(trained["store"])
    # The maps are stored as float16: the same probabilities to about 1e-3.
    expected = predict_probabilities(
        run.model, head_inputs(store, trained["store"], ["tulips/1.png", "daisy/2.png"], True)
    )
    for result, row in zip(results, expected, strict=True):
        np.testing.assert_allclose(list(result.probabilities.values()), row, atol=2e-3)
        assert result.label == run.classes[int(row.argmax())]


def test_flip_averages_each_images_probabilities_with_its_mirror_images(trained, tmp_path):
    from PIL import Image

    pixels = np.zeros((224, 224, 3), np.uint8)
    pixels[:, :80] = (200, 20, 40)  # a red band on the left of a white-on-noise picture
    pixels[:, 80:] = 255 - np.random.default_rng(0).integers(0, 60, (224, 144, 3))
    original, mirror = tmp_path / "original.png", tmp_path / "mirror.png"
    Image.fromarray(pixels).save(original)
    Image.fromarray(pixels[:, ::-1]).save(mirror)
    for head in ("dense", "gru"):
        run = load_classifier_run(trained[head].run_dir)
        (plain, mirrored), _ = classify_files(run, [original, mirror])
        (flipped, *_), errors = classify_files(run, [original, tmp_path / "missing.jpg"], flip=True)
        assert list(errors) == [str(tmp_path / "missing.jpg")]
        expected = (np.array(list(plain.probabilities.values())) + list(mirrored.probabilities.values())) / 2
        assert not np.allclose(list(plain.probabilities.values()), expected, atol=1e-3)  # the mirror counts
        np.testing.assert_allclose(list(flipped.probabilities.values()), expected, atol=2e-3 if head == "gru" else 1e-5)
        assert flipped.label == run.classes[int(expected.argmax())]


def test_loading_something_that_is_not_a_classifier_run_fails_clearly(tmp_path, tiny_run):
    with pytest.raises(RunDirError, match="no such run directory"):
        load_classifier_run(tmp_path / "nowhere")
    with pytest.raises(RunDirError, match="not an image-classifier run"):
        load_classifier_run(tiny_run)


# ---- the run format ----


def test_a_new_run_is_saved_as_a_classifier_run(trained):
    config = json.loads((trained["dense"].run_dir / "config.json").read_text())
    assert config["format"] == "classifier-run" and config["version"] == 1
    assert load_classifier_run(trained["dense"].run_dir).config["format"] == "classifier-run"


def copy_run_with_config(run_dir: Path, copy: Path, **changes) -> Path:
    """Copy a run directory, rewriting config.json's top-level keys with `changes`."""
    import shutil

    shutil.copytree(run_dir, copy)
    config = json.loads((run_dir / "config.json").read_text()) | changes
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


def test_a_classifier_run_saved_in_the_old_captioning_run_format_still_loads(trained, flowers, tmp_path):
    # What classifier runs wrote before they had a format of their own: the caption runs' name and version.
    old = copy_run_with_config(
        trained["dense"].run_dir, tmp_path / "old", format="captioning-run", version=1, task="image-classifier"
    )
    run = load_classifier_run(old)
    assert run.config["format"] == "captioning-run" and run.classes == ["daisy", "roses", "tulips"]
    assert run.model_config == load_classifier_run(trained["dense"].run_dir).model_config
    images = [flowers / "daisy" / "1.png", flowers / "roses" / "2.png"]
    expected, _ = classify_files(trained["dense"].run_dir, images)
    results, errors = classify_files(run, images)
    assert not errors and [r.to_dict() for r in results] == [r.to_dict() for r in expected]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "captioning-run", "version": 1, "task": "image-captioning"}, "not an image-classifier run"),
        ({"format": "captioning-run", "version": 2}, "captioning-run format version 2, expected 1"),
        ({"format": "classifier-run", "version": 2}, "classifier-run format version 2, expected 1"),
    ],
)
def test_other_formats_and_versions_are_refused(trained, tmp_path, changes, message):
    copy = copy_run_with_config(trained["dense"].run_dir, tmp_path / "run", **changes)
    with pytest.raises(RunDirError, match=message):
        load_classifier_run(copy)


# ---- evaluation ----


def test_scores_of_known_predictions():
    from classifier.evaluation import score

    class Run:
        path, classes = Path("run"), ["a", "b", "c"]

    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8], [0.1, 0.2, 0.7]]
    )
    evaluation = score(Run(), labels, probabilities)
    assert evaluation.accuracy == pytest.approx(5 / 6)
    assert evaluation.confusion == [[1, 1, 0], [0, 2, 0], [0, 0, 2]]
    assert evaluation.report["a"]["recall"] == pytest.approx(0.5) and evaluation.report["b"]["precision"] == 2 / 3
    assert evaluation.macro_f1 == pytest.approx((2 / 3 + 0.8 + 1.0) / 3)
    # AUC = share of (positive, negative) pairs ranked right: for a, 0.2 ranks below the 0.3 of a "b" image.
    assert evaluation.roc_auc == {"a": 7 / 8, "b": 7 / 8, "c": 1.0}


def test_auc_is_none_for_a_class_absent_from_the_data():
    from classifier.evaluation import score

    class Run:
        path, classes = Path("run"), ["a", "b", "c"]

    evaluation = score(Run(), np.array([0, 1]), np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]))
    assert evaluation.roc_auc["c"] is None and evaluation.report["c"]["support"] == 0


def test_evaluate_cli_scores_the_validation_split_and_writes_metrics_and_plots(trained, flowers, tmp_path, capsys):
    import classify

    run_dir = trained["dense"].run_dir
    assert (
        classify.main(
            [
                "evaluate",
                "--model",
                str(run_dir),
                "--data",
                str(flowers),
                "--json",
                str(tmp_path / "m.json"),
                "--plots",
                str(tmp_path / "plots"),
                "--no-progress",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["subset"] == "validation" and metrics["images"] == 6
    run = load_classifier_run(run_dir)
    validation = json.loads((run_dir / "split.json").read_text())["validation"]
    store = FeatureStore.load(trained["store"])
    predicted = predict_probabilities(run.model, store.matrix(validation)).argmax(axis=1)
    truth = [run.classes.index(i.split("/")[0]) for i in validation]
    expected = np.zeros((3, 3), int)
    np.add.at(expected, (truth, predicted), 1)
    assert metrics["confusion"] == expected.tolist()
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == truth))
    assert metrics["accuracy"] == pytest.approx(metrics["report"]["accuracy"])
    assert set(metrics["roc_auc"]) == {"daisy", "roses", "tulips"}
    for name in ("confusion_matrix.png", "roc.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert "macro F1" in capsys.readouterr().out


def test_evaluate_with_flip_scores_the_mean_of_each_image_and_its_mirror(trained, flowers, tmp_path):
    from classifier.evaluation import evaluate_classifier

    run = load_classifier_run(trained["dense"].run_dir)
    store = tmp_path / "own.pkl"
    evaluation = evaluate_classifier(run.path, flowers, store, flip=True, progress=False)
    validation = json.loads((run.path / "split.json").read_text())["validation"]
    mirrors = FeatureStore.load(tmp_path / "own.augmented.pkl")
    assert sorted(mirrors.features) == sorted(f"{i}#flip" for i in validation)  # the mirrors, stored once
    probabilities = (
        predict_probabilities(run.model, FeatureStore.load(store).matrix(validation))
        + predict_probabilities(run.model, mirrors.matrix([f"{i}#flip" for i in validation]))
    ) / 2
    truth = [run.classes.index(i.split("/")[0]) for i in validation]
    expected = np.zeros((3, 3), int)
    np.add.at(expected, (truth, probabilities.argmax(axis=1)), 1)
    assert evaluation.flip and evaluation.subset == "validation" and evaluation.images == len(validation)
    assert evaluation.confusion == expected.tolist()
    assert evaluation.roc_auc["daisy"] == pytest.approx(
        roc_auc_score(np.array(truth) == 0, probabilities[:, 0]), abs=1e-6
    )


def test_evaluate_on_another_class_folder_scores_every_image(trained, tmp_path):
    from classifier.evaluation import evaluate_classifier

    other = flower_folder(tmp_path / "holiday", per_class=2, colours={"roses": (190, 30, 50), "daisy": (250, 250, 250)})
    evaluation = evaluate_classifier(trained["dense"].run_dir, other, tmp_path / "holiday.pkl", progress=False)
    assert evaluation.subset == "all" and evaluation.images == 4
    assert evaluation.roc_auc["tulips"] is None and evaluation.report["tulips"]["support"] == 0
    # The holiday folder's classes are labelled in the run's order (daisy, roses, tulips), not its own.
    assert [sum(row) for row in evaluation.confusion] == [2, 2, 0]


# ---- command lines ----


def test_predict_cli_prints_class_and_probability(trained, flowers, capsys):
    import classify

    images = [flowers / "daisy" / "1.png", flowers / "roses" / "2.png"]
    expected, _ = classify_files(trained["dense"].run_dir, images)
    assert classify.main(["predict", "--model", str(trained["dense"].run_dir), *map(str, images)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{r.image}: {r.label} ({r.probability:.2f})" for r in expected]
    assert classify.main(["predict", "--model", str(trained["dense"].run_dir), str(images[0]), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["results"] == [expected[0].to_dict()] and document["errors"] == []


def test_predict_cli_reports_each_bad_image_on_one_line_and_exits_1(trained, flowers, tmp_path, capsys):
    import classify

    (tmp_path / "notes.jpg").write_text("not a jpeg")
    good = flowers / "tulips" / "2.png"
    argv = [
        "predict",
        "--model",
        str(trained["dense"].run_dir),
        str(tmp_path / "missing.jpg"),
        str(tmp_path / "notes.jpg"),
    ]
    assert classify.main([*argv, str(good)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}: ") and len(captured.out.splitlines()) == 1
    assert captured.err.splitlines() == [
        f"error: {tmp_path / 'missing.jpg'}: no such file",
        f"error: {tmp_path / 'notes.jpg'}: not an image file Pillow can read",
    ]


def test_infer_prints_the_class_beside_the_caption(trained, flowers, tiny_run, capsys):
    import infer

    images = [str(flowers / "roses" / "0.png"), str(flowers / "tulips" / "0.png")]
    classifier = str(trained["dense"].run_dir)
    expected, _ = classify_files(classifier, images)
    assert infer.main([*images, "--model", str(tiny_run), "--beam", "1"]) == 0
    captions_alone = capsys.readouterr().out.strip().splitlines()
    assert infer.main([*images, "--model", str(tiny_run), "--beam", "1", "--classifier", classifier]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"{line} | {r.label} ({r.probability:.2f})" for line, r in zip(captions_alone, expected, strict=True)
    ]
    assert infer.main([images[0], "--model", str(tiny_run), "--beam", "1", "--classifier", classifier, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["class"] == expected[0].label
    assert result["probability"] == round(expected[0].probability, 4)


def test_flip_options_reach_the_classifier(trained, flowers, tiny_run, monkeypatch):
    import classifier.model
    import classify
    import infer

    calls = []
    real = classifier.model.classify_files

    def recording(*args, **kwargs):
        calls.append(kwargs.get("flip", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(classifier.model, "classify_files", recording)
    image, run = str(flowers / "roses" / "0.png"), str(trained["dense"].run_dir)
    assert classify.main(["predict", "--model", run, image]) == 0
    assert classify.main(["predict", "--model", run, image, "--flip"]) == 0
    assert infer.main([image, "--model", str(tiny_run), "--beam", "1", "--classifier", run, "--classifier-flip"]) == 0
    assert calls == [False, True, True]


def test_infer_with_a_bad_classifier_run_fails_in_one_line(tiny_run, flowers, tmp_path, capsys):
    import infer

    image = str(flowers / "roses" / "0.png")
    for classifier, message in [(tmp_path / "nowhere", "no such run directory"), (tiny_run, "not an image-classifier")]:
        with pytest.raises(SystemExit) as exit_info:
            infer.main([image, "--model", str(tiny_run), "--classifier", str(classifier)])
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1
        assert captured.err.startswith("error: ") and message in captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "{tmp}/nowhere", "--out", "{tmp}/run"], "no such folder"),
        (["train", "--data", "{tmp}/one", "--out", "{tmp}/run"], "need at least 2"),
        (
            ["evaluate", "--model", "{tmp}/nowhere", "--data", "{tmp}", "--json", "{tmp}/m.json"],
            "no such run directory",
        ),
        (["predict", "--model", "{tmp}/nowhere", "x.jpg"], "no such run directory"),
        (["predict", "--model", "{tiny_run}", "x.jpg"], "not an image-classifier run"),
        (
            ["evaluate", "--model", "{dense}", "--data", "{tmp}/nowhere", "--json", "{tmp}/m.json"],
            "no such folder",
        ),
        (
            ["evaluate", "--model", "{dense}", "--data", "{tmp}/one", "--json", "{tmp}/one"],
            "is a folder",
        ),
        (["train", "--data", "{flowers}", "--out", "{dense}", "--weights", "none"], "already holds a training run"),
    ],
)
def test_bad_input_gives_one_line_and_a_non_zero_exit(tmp_path, capsys, argv, message, trained, flowers, tiny_run):
    import classify

    flower_folder(tmp_path / "one", per_class=1, colours={"daisy": (1, 2, 3)})
    places = {"{tmp}": tmp_path, "{dense}": trained["dense"].run_dir, "{flowers}": flowers, "{tiny_run}": tiny_run}
    for key, value in places.items():
        argv = [a.replace(key, str(value)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        classify.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_train_cli_parses_augmentations_and_refuses_unknown_ones(capsys):
    import classify

    data = ["train", "--data", "d", "--out", "o"]
    assert classify.parse_args(data).augmentations == []
    assert classify.parse_args([*data, "--augment"]).augmentations == ["flip", "rotate", "bright"]
    assert classify.parse_args([*data, "--augment", "flip, bright", "--units", "0"]).augmentations == [
        "flip",
        "bright",
    ]
    with pytest.raises(SystemExit) as exit_info:
        classify.parse_args([*data, "--augment", "flip,blur"])
    assert exit_info.value.code == 2 and "unknown blur" in capsys.readouterr().err


def test_train_cli_fills_every_training_option_from_its_flag():
    import dataclasses

    import classify
    from classifier.training import ClassifierTrainingOptions

    data = ["train", "--data", "d", "--out", "o"]
    args = classify.parse_args(data)
    fields = [f.name for f in dataclasses.fields(ClassifierTrainingOptions)]
    assert set(fields) <= set(vars(args))  # each option has its flag
    assert classify.dataclass_from_args(ClassifierTrainingOptions, args) == ClassifierTrainingOptions()
    flags = [
        *("--head", "gru", "--augment", "flip", "--epochs", "7", "--batch-size", "5", "--lr", "0.02"),
        *("--seed", "3", "--split-seed", "4", "--validation-fraction", "0.3", "--patience", "6"),
        *("--units", "0", "--rnn-units", "9", "--dropout", "0.1", "--l2", "0.001", "--label-smoothing", "0.2"),
        *("--encoder", "vgg16", "--weights", "none", "--fine-tune-epochs", "11", "--fine-tune-lr", "0.003"),
    ]
    options = classify.dataclass_from_args(ClassifierTrainingOptions, classify.parse_args([*data, *flags]))
    assert options == ClassifierTrainingOptions(
        head="gru",
        augmentations=["flip"],
        epochs=7,
        batch_size=5,
        learning_rate=0.02,
        seed=3,
        split_seed=4,
        validation_fraction=0.3,
        patience=6,
        units=0,
        rnn_units=9,
        dropout=0.1,
        l2=0.001,
        label_smoothing=0.2,
        encoder="vgg16",
        weights="none",
        fine_tune_epochs=11,
        fine_tune_lr=0.003,
    )
    blocks = classify.parse_args([*data, "--fine-tune-blocks", "2"])
    assert classify.dataclass_from_args(ClassifierTrainingOptions, blocks).fine_tune_blocks == 2


def test_a_gru_run_on_a_store_without_spatial_maps_fails_clearly(flowers, tmp_path, capsys):
    import classify
    from features.extract import extract_features

    folder = load_class_folder(flowers)
    extract_features(
        folder.sources, tmp_path / "pooled.pkl", "efficientnet_lite0", None, 8, spatial=False, progress=False
    )
    with pytest.raises(SystemExit):
        classify.main(
            [
                "train",
                "--data",
                str(flowers),
                "--out",
                str(tmp_path / "run"),
                "--head",
                "gru",
                "--weights",
                "none",
                "--features",
                str(tmp_path / "pooled.pkl"),
                "--no-progress",
            ]
        )
    assert "no spatial maps" in capsys.readouterr().err
