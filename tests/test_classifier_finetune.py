"""Fine-tuning the top of the encoder with the classifier: the split, the model, the run, the CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from test_classifier import flower_folder

from classifier.activations import CachedActivations, activation_cache_path, cache_activations, read_activations
from classifier.finetune import build_fine_tuned_classifier
from classifier.model import (
    ClassifierConfig,
    ClassifierError,
    classify_files,
    compile_classifier,
    load_classifier_run,
    predict_probabilities,
)
from features.efficientnet_lite import VARIANTS, build_efficientnet_lite
from features.encoders import EncoderError, build_encoder, build_encoder_split
from features.store import FeatureStoreError
from models.rundir import save_model_without_optimizer

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    """A Lite0 weights file with random kernels and random BatchNorm statistics (no identity BN).

    Every model built from this file has the same weights, which random initialisation would not give.
    """
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = build_efficientnet_lite(VARIANTS[LITE0], include_top=True)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.get_weights()[0].shape
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, channels),
                    rng.normal(0, 0.1, channels),
                    rng.normal(0, 0.1, channels),
                    rng.uniform(0.5, 1.5, channels),
                ]
            )
    path = tmp_path_factory.mktemp("weights") / "lite0_random.weights.h5"
    model.save_weights(path)
    return path


# ---- the split ----


@pytest.mark.parametrize("blocks, boundary", [(1, (7, 7, 192)), (5, (14, 14, 112))])
def test_bottom_then_top_gives_the_encoders_pooled_vector(random_weights, blocks, boundary):
    encoder = build_encoder(LITE0, random_weights)
    bottom, top = build_encoder_split(LITE0, random_weights, blocks)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    activations = bottom.predict(images, verbose=0)
    assert activations.shape == (2, *boundary)
    assert tuple(top.input.shape[1:]) == boundary
    expected = encoder.predict(images, verbose=0)
    assert np.abs(expected).max() > 0.1  # a vector worth comparing
    np.testing.assert_allclose(top.predict(activations, verbose=0), expected, rtol=1e-4, atol=1e-4)
    # The top really holds the last `blocks` blocks: the block before it is in the bottom only.
    names = {layer.name for layer in top.layers}
    first = 16 - blocks
    assert f"block{first}_expand_conv" in names and f"block{first - 1}_project_conv" not in names


def test_split_refuses_other_encoders_and_impossible_block_counts():
    with pytest.raises(EncoderError, match="only the EfficientNet-Lite"):
        build_encoder_split("vgg16", None, 2)
    for blocks in (0, 16):
        with pytest.raises(EncoderError, match="between 1 and 15"):
            build_encoder_split(LITE0, None, blocks)


# ---- the fine-tuned model ----


def tiny_head(num_classes: int = 3) -> ClassifierConfig:
    return ClassifierConfig(num_classes, 1280, (7, 7, 1280), units=16, dropout=0.1, fine_tune_blocks=1)


def test_a_few_fine_tuning_steps_lower_the_loss_and_leave_batch_norm_alone(random_weights):
    keras.utils.set_random_seed(0)
    _, top = build_encoder_split(LITE0, random_weights, 1)
    model, head = build_fine_tuned_classifier(tiny_head(), top)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 24)
    activations = rng.normal(size=(24, 7, 7, 192)).astype(np.float32)
    activations[..., :8] += 2.0 * labels[:, None, None, None]  # the class shifts some channels
    kernel_before = model.get_layer(top.name).get_layer("head_conv").get_weights()[0].copy()
    statistics_before = [w.copy() for w in model.get_layer(top.name).get_layer("head_bn").get_weights()]
    compile_classifier(model, 3e-3)
    before = model.evaluate(activations, labels, verbose=0)[0]
    for _ in range(30):
        model.train_on_batch(activations, labels)
    after = model.evaluate(activations, labels, verbose=0)[0]
    assert after < 0.5 * before
    tuned_top = model.get_layer(top.name)
    assert not np.allclose(tuned_top.get_layer("head_conv").get_weights()[0], kernel_before)  # the encoder learns
    for kept, now in zip(statistics_before, tuned_top.get_layer("head_bn").get_weights(), strict=True):
        np.testing.assert_array_equal(now, kept)  # BatchNorm: frozen, in inference mode
    assert model.get_layer(head.name) is head  # the head trained alone in phase 1 is the same layers


def test_a_fine_tuned_model_round_trips_through_a_keras_file(random_weights, tmp_path):
    config = tiny_head()
    config.l2 = 1e-3
    _, top = build_encoder_split(LITE0, random_weights, 2)
    model, _ = build_fine_tuned_classifier(config, top)
    activations = np.random.default_rng(2).normal(size=(3, 7, 7, 192)).astype(np.float32)
    save_model_without_optimizer(model, tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(activations, verbose=0), model.predict(activations, verbose=0), atol=1e-6)
    batch_norms = [layer for layer in loaded.get_layer(top.name).layers if "_bn" in layer.name]
    assert batch_norms and not any(layer.trainable for layer in batch_norms)


def test_the_gru_head_cannot_be_fine_tuned():
    from classifier.model import build_classifier

    with pytest.raises(ClassifierError, match="dense head"):
        build_classifier(ClassifierConfig(3, 1280, (7, 7, 1280), head="gru", fine_tune_blocks=2))


# ---- the activation cache ----


def test_the_cache_holds_the_bottoms_output_and_refuses_other_weights(random_weights, tmp_path):
    root = flower_folder(tmp_path / "flowers", per_class=1)
    sources = {f"{c}/0.png": root / c / "0.png" for c in ("daisy", "roses")}
    cache = activation_cache_path(tmp_path / "store.pkl", LITE0, 1)
    assert cache.name == "store.block15.h5"
    report = cache_activations(sources, cache, LITE0, random_weights, 1, progress=False)
    assert report.extracted == 2 and not (tmp_path / "store.block15.parts").exists()
    again = cache_activations(sources, cache, LITE0, random_weights, 1, progress=False)
    assert again.extracted == 0 and again.already_present == 2
    from features.images import load_image

    bottom, _ = build_encoder_split(LITE0, random_weights, 1)
    pixels = np.stack([load_image(sources["roses/0.png"], 224)])
    expected = bottom.predict((pixels - 127.0) / 128.0, verbose=0)
    np.testing.assert_allclose(read_activations(cache, ["roses/0.png"]), expected, rtol=2e-3, atol=2e-3)
    with pytest.raises(FeatureStoreError, match="another --features"):
        cache_activations(sources, cache, LITE0, None, 1, progress=False)


# ---- a fine-tuned run: training, evaluation, prediction, inference ----


def test_cached_activations_read_the_rows_asked_for_from_each_part(tmp_path):
    from features.store import write_spatial_shard

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 2, 2, 3)).astype(np.float16)
    write_spatial_shard(tmp_path / "a.h5", [f"{i}.png" for i in range(6)], maps)
    write_spatial_shard(tmp_path / "b.h5", ["0.png#flip"], maps[:1] * 2)
    rows = read_activations(tmp_path / "a.h5", ["4.png", "1.png", "5.png"]) + read_activations(
        tmp_path / "b.h5", ["0.png#flip"]
    )
    assert len(rows) == 4 and rows.shape == (4, 2, 2, 3) and rows.dtype == np.float16
    np.testing.assert_array_equal(rows[1:3], maps[[1, 5]])
    np.testing.assert_array_equal(rows[np.array([0, 3])], np.stack([maps[4], maps[0] * 2]))
    np.testing.assert_array_equal(np.asarray(rows), np.stack([maps[4], maps[1], maps[5], maps[0] * 2]))
    with pytest.raises(FeatureStoreError, match="no cached activation for 1 image"):
        read_activations(tmp_path / "a.h5", ["0.png", "9.png"])


@pytest.fixture(scope="module")
def flowers(tmp_path_factory) -> Path:
    return flower_folder(tmp_path_factory.mktemp("ft_flowers") / "train")


@pytest.fixture(scope="module")
def fine_tuned(flowers, random_weights, tmp_path_factory):
    from classifier.training import ClassifierTrainingOptions, train_classifier

    base = tmp_path_factory.mktemp("ft_runs")
    options = ClassifierTrainingOptions(
        augmentations=["flip"],
        epochs=2,
        batch_size=4,
        learning_rate=1e-2,
        units=8,
        weights=str(random_weights),
        validation_fraction=0.4,
        fine_tune_blocks=1,
        fine_tune_epochs=2,
        fine_tune_lr=1e-3,
        patience=5,
    )
    with pytest.MonkeyPatch.context() as patch:  # the cache is read batch by batch, never whole
        patch.setattr(CachedActivations, "__array__", lambda *_, **__: pytest.fail("the cache was read whole"))
        result = train_classifier(flowers, base / "run", options, base / "store.pkl", progress=False, verbose=0)
    return result, base / "store.pkl"


def test_fine_tuned_training_writes_a_run_on_the_activation_cache(fine_tuned):
    result, store = fine_tuned
    assert result.epochs_run == 4 and result.fine_tune_epochs_run == 2
    assert result.train_images == 9 and result.augmented_images == 9 and result.validation_images == 6
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["model"]["fine_tune_blocks"] == 1 and config["activation_shape"] == [7, 7, 192]
    assert config["activations"] == str(store.with_name("store.block15.h5"))
    assert config["augmented_activations"] == str(store.with_name("store.augmented.block15.h5"))
    assert not store.exists()  # the pooled feature store is not needed
    rows = (result.run_dir / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("epoch")  # both phases, one header
    run = load_classifier_run(result.run_dir)
    assert tuple(run.model.input.shape[1:]) == (7, 7, 192)


def test_photos_go_through_the_bottom_and_the_runs_own_fine_tuned_top(fine_tuned, flowers):
    result, _ = fine_tuned
    run = load_classifier_run(result.run_dir)
    # Change the run's top in memory: classify_files must use it, not a fresh encoder top.
    top = next(layer for layer in run.model.layers if isinstance(layer, keras.Model) and "_top" in layer.name)
    kernel = top.get_layer("head_conv")
    kernel.set_weights([kernel.get_weights()[0] * -2.0])
    ids = ["roses/3.png", "daisy/0.png", "tulips/4.png"]
    results, errors = classify_files(run, [flowers / i for i in ids])
    assert not errors
    cache = Path(run.config["activations"])
    expected = predict_probabilities(run.model, read_activations(cache, ids))
    for classification, row in zip(results, expected, strict=True):
        np.testing.assert_allclose(list(classification.probabilities.values()), row, atol=2e-3)
        assert classification.label == run.classes[int(row.argmax())]


def test_evaluate_and_predict_cli_on_a_fine_tuned_run(fine_tuned, flowers, tmp_path, capsys):
    import classify

    result, _ = fine_tuned
    run_dir = str(result.run_dir)
    metrics = tmp_path / "metrics.json"
    assert classify.main(["evaluate", "--model", run_dir, "--data", str(flowers), "--json", str(metrics)]) == 0
    evaluation = json.loads(metrics.read_text())
    assert evaluation["subset"] == "validation" and evaluation["images"] == 6
    assert evaluation["accuracy"] == pytest.approx(result.val_accuracy, abs=1e-6)
    capsys.readouterr()
    images = [flowers / "daisy" / "1.png", flowers / "tulips" / "2.png"]
    expected, _ = classify_files(run_dir, images)
    assert classify.main(["predict", "--model", run_dir, *map(str, images)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{r.image}: {r.label} ({r.probability:.2f})" for r in expected]


def test_infer_prints_the_fine_tuned_class_beside_the_caption(fine_tuned, flowers, tiny_run, capsys):
    import infer

    result, _ = fine_tuned
    image = str(flowers / "roses" / "0.png")
    (expected,), _ = classify_files(result.run_dir, [image])
    assert infer.main([image, "--model", str(tiny_run), "--beam", "1", "--classifier", str(result.run_dir)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith(f" | {expected.label} ({expected.probability:.2f})")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fine-tune-blocks", "16"], "between 1 and 15"),
        (["--fine-tune-blocks", "2", "--encoder", "vgg16"], "only the EfficientNet-Lite encoders"),
        (["--fine-tune-blocks", "2", "--head", "gru"], "dense head only"),
        (["--fine-tune-blocks", "-1"], "must be 0"),
        (["--fine-tune-blocks", "1", "--fine-tune-lr", "0"], "must be positive"),
    ],
)
def test_bad_fine_tuning_options_give_one_line_and_exit_2(flowers, tmp_path, capsys, extra, message):
    import classify

    argv = ["train", "--data", str(flowers), "--out", str(tmp_path / "run"), "--weights", "none", *extra]
    with pytest.raises(SystemExit) as exit_info:
        classify.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "run").exists()
