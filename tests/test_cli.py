"""train.py, infer.py and evaluate.py end to end on a tiny run, and their bad-input handling."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from conftest import make_image
from models.rundir import RunDirError, load_run
from models.search import DecodingOptions
from models.training import (
    ResumedEarlyStopping,
    ResumedReduceLROnPlateau,
    TrainingOptions,
    plateau_state,
    train_caption_model,
)
from pipeline.metrics import coco_scores, nltk_corpus_bleu


def test_tiny_run_directory_holds_everything_inference_needs(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"model.keras", "vocabulary.json", "config.json", "history.csv", "curves.png"} <= names
    config = json.loads((tiny_run / "config.json").read_text())
    run = load_run(tiny_run)
    assert (config["format"], config["version"]) == ("captioning-run", 2)
    assert config["encoder"] == "efficientnet_lite0" and config["model"]["feature_dim"] == 1280
    # max length derived from data: the longest tiny caption has 6 words, + <start> and <end>
    assert config["model"]["max_caption_length"] == 8 == run.model_config.max_caption_length
    assert config["model"]["vocab_size"] == len(run.vocabulary)
    # each fact once: the sizes live in "model" only (version 1 also wrote them at the top)
    assert not {"dim", "feature_dim", "max_caption_length", "vocab_size", "min_count"} & set(config)
    with (tiny_run / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_training_resumes_from_the_last_saved_epoch_with_optimizer_state(tiny_flickr, tiny_store, tmp_path):
    options = TrainingOptions(epochs=2, batch_size=8, learning_rate=1e-2, min_count=1, seed=3)
    small = {"units": 8, "embedding_dim": 4}
    run_dir = tmp_path / "run"
    train_caption_model(tiny_store, tiny_flickr, run_dir, options, small, verbose=0)
    with pytest.raises(RunDirError, match="--resume"):
        train_caption_model(tiny_store, tiny_flickr, run_dir, options, small, verbose=0)
    options.epochs = 4
    result = train_caption_model(tiny_store, tiny_flickr, run_dir, options, resume=True, verbose=0)
    assert result.epochs_run == 2  # epochs 3 and 4 only
    with (run_dir / "history.csv").open() as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [0, 1, 2, 3]
    import keras

    restored = keras.saving.load_model(run_dir / "last_epoch.keras")
    steps_per_epoch = -(-27 // 8)  # 9 train images x 3 captions, batch 8
    assert int(restored.optimizer.iterations) == 4 * steps_per_epoch
    with pytest.raises(RunDirError, match="nothing to resume"):
        train_caption_model(tiny_store, tiny_flickr, tmp_path / "fresh", options, resume=True, verbose=0)


def test_plateau_state_counts_epochs_since_the_best_as_the_callbacks_do():
    losses = [3.0, 2.5, 2.6, 2.7, 2.55]
    assert plateau_state(losses, patience=5, min_delta=0.0, reset_after_patience=False) == (2.5, 3)
    # ReduceLROnPlateau (patience 2) reduced after 2.7 and started counting again.
    assert plateau_state(losses, patience=2, min_delta=1e-4, reset_after_patience=True) == (2.5, 1)
    assert plateau_state([2.0, 1.99995], patience=2, min_delta=1e-4, reset_after_patience=True) == (2.0, 1)
    assert plateau_state([], patience=2, min_delta=0.0, reset_after_patience=False) == (None, 0)


def _compiled_toy_model():
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def test_resumed_callbacks_carry_on_the_interrupted_runs_patience():
    model = _compiled_toy_model()
    stopper = ResumedEarlyStopping(monitor="val_loss", patience=3, history=[2.0, 2.1, 2.2])
    stopper.set_model(model)
    stopper.on_train_begin()
    stopper.on_epoch_end(3, {"val_loss": 2.3})  # the third epoch without improvement since epoch 0
    assert model.stop_training is True

    model = _compiled_toy_model()
    reducer = ResumedReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, history=[2.0, 2.1])
    reducer.set_model(model)
    reducer.on_train_begin()
    reducer.on_epoch_end(2, {"val_loss": 2.2})
    assert float(model.optimizer.learning_rate) == pytest.approx(5e-4)

    model = _compiled_toy_model()  # an improvement resets the count as usual
    stopper = ResumedEarlyStopping(monitor="val_loss", patience=3, history=[2.0, 2.1, 2.2])
    stopper.set_model(model)
    stopper.on_train_begin()
    stopper.on_epoch_end(3, {"val_loss": 1.9})
    assert not model.stop_training and stopper.best == 1.9


def test_training_is_deterministic_with_a_seed(tiny_flickr, tiny_store, tmp_path):
    options = TrainingOptions(epochs=1, batch_size=8, min_count=1, seed=7)
    losses = []
    for name in ("a", "b"):
        result = train_caption_model(tiny_store, tiny_flickr, tmp_path / name, options, {"units": 8}, verbose=0)
        losses.append((tmp_path / name / "history.csv").read_text())
        assert result.epochs_run == 1
    assert losses[0] == losses[1]


def test_infer_captions_images_and_reports_bad_ones(tiny_run, tiny_flickr, tmp_path, capsys):
    import infer

    good = tiny_flickr / "Images" / "red_0.jpg"
    assert infer.main([str(good), "--model", str(tiny_run)]) == 0
    caption = capsys.readouterr().out.strip()
    vocabulary = load_run(tiny_run).vocabulary
    assert caption and all(word in vocabulary.index for word in caption.split())
    assert "<start>" not in caption and "<end>" not in caption

    (tmp_path / "notes.jpg").write_text("not an image")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good.read_bytes()[:200])
    args = [str(good), str(tmp_path / "absent.jpg"), str(tmp_path / "notes.jpg"), str(corrupt)]
    assert infer.main([*args, "--model", str(tiny_run), "--json", "--beam", "2"]) == 1
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert [r["image"] for r in document["results"]] == [str(good)]
    assert len(document["results"][0]["beams"]) == 2
    assert len(document["errors"]) == 3
    assert len(captured.err.strip().splitlines()) == 3 and "Traceback" not in captured.err


def test_infer_rejects_bad_run_directories(tiny_run, tiny_flickr, tmp_path, capsys):
    import infer

    image = str(tiny_flickr / "Images" / "red_0.jpg")
    for run_dir, message in [(tmp_path / "missing", "no such run directory")]:
        with pytest.raises(SystemExit) as exit_info:
            infer.main([image, "--model", str(run_dir)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_run, incomplete)
    (incomplete / "model.keras").unlink()
    with pytest.raises(SystemExit):
        infer.main([image, "--model", str(incomplete)])
    assert "model.keras missing" in capsys.readouterr().err
    mismatch = tmp_path / "mismatch"
    shutil.copytree(tiny_run, mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["encoder"] = "vgg16"
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        infer.main([image, "--model", str(mismatch)])
    assert "expects 1280-d features but encoder vgg16 gives 4096-d" in capsys.readouterr().err


def test_a_version_1_run_still_loads_and_is_rewritten_without_its_copies(tiny_run, tmp_path):
    from models.rundir import RunDir

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    config = json.loads((old / "config.json").read_text())
    model = config["model"]
    config.update(  # how version 1 wrote it: the sizes twice more at the top
        version=1,
        dim=1280,
        feature_dim=model["feature_dim"],
        max_caption_length=model["max_caption_length"],
        vocab_size=model["vocab_size"],
        min_count=1,
    )
    (old / "config.json").write_text(json.dumps(config))
    run = load_run(old)
    assert run.model_config == load_run(tiny_run).model_config
    RunDir(old).write_config(run.config)
    rewritten = json.loads((old / "config.json").read_text())
    assert rewritten["version"] == 2 and "feature_dim" not in rewritten and rewritten["model"] == model


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model": {"x": 1}}, "malformed 'model' settings"),
        ({"model": "x"}, "'model' must be an object"),
        ({"model": None}, "'model' must be an object"),
        ({"encoder": 3}, "'encoder' must name the encoder"),
        (
            {"model": {"decoder": "transformer", "vocab_size": 5, "max_caption_length": 4, "feature_dim": 3}},
            "unknown decoder 'transformer'",
        ),
    ],
)
def test_a_config_of_the_wrong_shape_is_one_error_line(tiny_run, tiny_flickr, tmp_path, capsys, change, message):
    import infer

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SystemExit) as exit_info:
        infer.main([str(tiny_flickr / "Images" / "red_0.jpg"), "--model", str(broken)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_infer_batches_many_images_in_one_call(tiny_run, tmp_path, capsys):
    import infer

    paths = [str(make_image(tmp_path / f"{i}.png", (i * 7 % 255, 90, 30), size=(40 + i, 30))) for i in range(40)]
    assert infer.main([*paths, "--model", str(tiny_run), "--beam", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 40 and lines[0].startswith(paths[0] + ": ")


def test_metrics_on_literal_captions():
    perfect = coco_scores({"a": ["a dog runs on the grass"]}, {"a": "a dog runs on the grass"})
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["BLEU-4"] == pytest.approx(1.0)
    assert perfect["METEOR"] == pytest.approx(1.0) and perfect["ROUGE-L"] == pytest.approx(1.0)
    # Worked CIDEr-D example: two images, one reference each ("a dog", "a cat"), hypotheses equal to
    # them. "a" is in both documents, so its idf log(2/2) is 0; "dog"/"cat" and the bigrams have idf
    # log 2. Unigram and bigram cosine similarities are 1, tri/4-gram vectors are empty (0): the mean
    # over n = 1..4 is 0.5, times CIDEr-D's factor 10 = 5.0.
    cider = coco_scores({"A": ["a dog"], "B": ["a cat"]}, {"A": "a dog", "B": "a cat"})["CIDEr"]
    assert cider == pytest.approx(5.0)
    wrong = coco_scores({"A": ["a dog"], "B": ["a cat"]}, {"A": "a cat", "B": "a dog"})["CIDEr"]
    assert wrong == pytest.approx(0.0)
    nltk = nltk_corpus_bleu({"a": ["A dog runs on the grass ."]}, {"a": "a dog runs on the grass"})
    assert nltk["NLTK-BLEU-4"] == pytest.approx(1.0)


def test_evaluate_blocks_repeated_word_pairs_when_asked(tiny_run, tiny_flickr, tmp_path, capsys):
    import evaluate

    report_path = tmp_path / "report.json"
    args = ["--model", str(tiny_run), "--data", str(tiny_flickr), "--beam", "3", "--json", str(report_path)]
    assert evaluate.main([*args, "--no-repeat-ngram", "2"]) == 0
    assert "no repeated 2-grams" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["no_repeat_ngram"] == 2 and report["counts"]["captioned"] == 3
    for item in report["captions"]:
        words = item["caption"].split()
        assert len(set(zip(words, words[1:], strict=False))) == len(words) - 1, item["caption"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*args, "--no-repeat-ngram", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--no-repeat-ngram: must be 0 (off) or at least 2" in err[-1]


def test_evaluate_end_to_end_on_a_tiny_run(tiny_run, tiny_flickr, tiny_store, tmp_path, capsys):
    import evaluate

    report_path, samples = tmp_path / "report.json", tmp_path / "samples.png"
    code = evaluate.main(
        [
            "--model",
            str(tiny_run),
            "--data",
            str(tiny_flickr),
            "--split",
            "dev",
            "--beam",
            "2",
            "--json",
            str(report_path),
            "--samples",
            str(samples),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "dev split, beam 2" in out and "CIDEr" in out and "NLTK-BLEU-4" in out
    report = json.loads(report_path.read_text())
    assert report["split"] == "dev" and report["beam"] == 2 and report["counts"]["captioned"] == 3
    assert set(report["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    for item in report["captions"]:
        assert "<start>" not in item["caption"] and "<end>" not in item["caption"] and len(item["references"]) == 3
    assert samples.stat().st_size > 10_000
    # Reusing stored features gives the same captions as encoding the images again.
    from models.captioner import Captioner
    from models.evaluation import evaluate_captions
    from pipeline.datasets import open_dataset

    captioner = Captioner(load_run(tiny_run))
    from_store = evaluate_captions(
        captioner, open_dataset(tiny_flickr), "dev", DecodingOptions(beam=2), features=tiny_store
    )
    assert from_store.captions == {i["image"]: i["caption"] for i in report["captions"]}
    # The test split's images are all missing: counted, and a non-zero exit.
    assert evaluate.main(["--model", str(tiny_run), "--data", str(tiny_flickr), "--split", "test"]) == 1
    assert "1 missing on disk" in capsys.readouterr().out


def test_evaluate_refuses_a_feature_store_it_cannot_use(tiny_run, tiny_flickr, tiny_store, tmp_path, capsys):
    import os
    import pickle

    import evaluate

    class Payload:  # unpickling this would run a command: the store reader must refuse it
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "owned"),))

    unsafe = tmp_path / "unsafe.pkl"
    unsafe.write_bytes(pickle.dumps({"metadata": {"dim": 3}, "features": Payload()}))
    other = tmp_path / "other.pkl"
    from features.store import FeatureStore

    store = FeatureStore.load(tiny_store)
    FeatureStore({**store.metadata, "weights": "some.weights.h5"}, store.features).save(other)
    partial = tmp_path / "partial.pkl"
    FeatureStore(store.metadata, {"red_3.jpg": store.features["red_3.jpg"]}).save(partial)
    cases = [
        (unsafe, "unsafe.pkl"),
        (tmp_path / "absent.pkl", "absent.pkl"),
        (other, "leave --features out"),
        (partial, "2 of the 3 images to caption have no stored features"),
    ]
    base = ["--model", str(tiny_run), "--data", str(tiny_flickr), "--features"]
    for path, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([*base, str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "owned").exists()


def test_train_cli_reports_a_store_without_train_images(tiny_flickr, tmp_path, capsys):
    import train
    from features.store import FeatureStore

    FeatureStore({"encoder": "efficientnet_lite0", "dim": 2}, {"x.jpg": np.zeros(2, np.float32)}).save(
        tmp_path / "s.pkl"
    )
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--features", str(tmp_path / "s.pkl"), "--data", str(tiny_flickr), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "no train-split image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--features", str(tmp_path / "none.pkl"), "--data", str(tiny_flickr)])
    assert "run extract_features.py first" in capsys.readouterr().err


def _perturbed_copy(run_dir, out, seed):
    """A copy of a run whose weights are nudged: another member for an ensemble, same vocabulary."""
    import keras

    from models.rundir import save_model_without_optimizer

    shutil.copytree(run_dir, out)
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(scale=0.3, size=w.shape).astype(w.dtype) for w in model.get_weights()])
    save_model_without_optimizer(model, out / "model.keras")
    return out


def test_an_ensemble_decodes_with_the_mean_of_its_members_probabilities(tiny_run, tiny_flickr, tiny_store, tmp_path):
    from features.store import FeatureStore
    from models.captioner import Captioner
    from models.decoding import EnsembleStepper
    from models.rundir import RunDirError, load_runs

    other = _perturbed_copy(tiny_run, tmp_path / "other", seed=3)
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    (ensemble / "config.json").write_text(
        json.dumps({"format": "captioning-ensemble", "version": 1, "members": [str(tiny_run), "../other"]})
    )
    assert [r.path for r in load_runs(ensemble)] == [tiny_run, ensemble / "../other"]
    with pytest.raises(RunDirError, match="an ensemble of 2 runs; this needs a single run"):
        load_run(ensemble)
    captioner = Captioner.load(ensemble)
    assert isinstance(captioner.stepper, EnsembleStepper) and captioner.name == str(ensemble)
    store = FeatureStore.load(tiny_store)
    ids = sorted(store.features)[:4]
    features = store.matrix(ids)
    results = captioner.caption_features(ids, features, DecodingOptions(beam=2, length_penalty=0.0))
    # Each best caption's log-probability is that of the members' mean distribution, word by word,
    # from the full teacher-forced models.
    members = [run.model for run in load_runs(ensemble)]
    vocabulary = captioner.vocabulary
    for row, result in enumerate(results):
        tokens = vocabulary.encode(result.caption.split())
        inputs = {"image": features[row : row + 1], "words": np.array([tokens[:-1]], np.int32)}
        mean = np.mean([np.asarray(model(inputs))[0] for model in members], axis=0)
        expected = sum(np.log(mean[t, token]) for t, token in enumerate(tokens[1:]))
        assert result.beams[0][1] == pytest.approx(float(expected), abs=1e-3)
    # Two --model paths make the same ensemble as the directory.
    again = Captioner.load([tiny_run, other]).caption_features(
        ids, features, DecodingOptions(beam=2, length_penalty=0.0)
    )
    assert [r.caption for r in again] == [r.caption for r in results]
    assert Captioner.load([tiny_run, other]).name == f"{tiny_run} + {other}"


def test_ensemble_cli_and_mismatched_members(tiny_run, tiny_flickr, tmp_path, capsys):
    import evaluate
    import infer

    other = _perturbed_copy(tiny_run, tmp_path / "other", seed=4)
    report = tmp_path / "report.json"
    models = ["--model", str(tiny_run), "--model", str(other)]
    assert evaluate.main([*models, "--data", str(tiny_flickr), "--beam", "2", "--json", str(report)]) == 0
    assert f"{tiny_run} + {other} on" in capsys.readouterr().out
    described = json.loads(report.read_text())["model_config"]["ensemble"]
    assert [member["path"] for member in described] == [str(tiny_run), str(other)]
    image = str(tiny_flickr / "Images" / "red_0.jpg")
    assert infer.main([image, *models, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == f"{tiny_run} + {other}"
    # Members must share the vocabulary: the same words in another order are refused in one line.
    shuffled = tmp_path / "shuffled"
    shutil.copytree(tiny_run, shuffled)
    vocabulary = json.loads((shuffled / "vocabulary.json").read_text())
    vocabulary["words"][4], vocabulary["words"][5] = vocabulary["words"][5], vocabulary["words"][4]
    (shuffled / "vocabulary.json").write_text(json.dumps(vocabulary))
    with pytest.raises(SystemExit):
        infer.main([image, "--model", str(tiny_run), "--model", str(shuffled)])
    err = capsys.readouterr().err
    assert "vocabulary differs" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_merge_and_an_attention_run_decode_as_one_ensemble_on_spatial_maps(
    tiny_run, tiny_attention_run, tiny_flickr, tiny_store, tiny_spatial_store, capsys
):
    import evaluate
    from features.encoders import get_encoder_spec
    from features.store import FeatureStore, SpatialMaps, spatial_path
    from models.captioner import Captioner
    from models.decoding import PooledStepper
    from models.merge import MergeStepper

    captioner = Captioner.load([tiny_run, tiny_attention_run])
    assert captioner.reads_regions and captioner.feature_shape == (7, 7, 1280)
    merge_member, attention_member = captioner.stepper.steppers
    assert isinstance(merge_member, PooledStepper) and isinstance(merge_member.inner, MergeStepper)
    ids = ["red_3.jpg", "blue_3.jpg", "green_0.jpg"]
    maps = SpatialMaps(spatial_path(tiny_spatial_store))
    regions = maps.get(ids)
    maps.close()
    vectors = FeatureStore.load(tiny_store).matrix(ids)
    # The merge member reads the mean of the map: the encoder's pooled vector, to float16 rounding.
    np.testing.assert_allclose(regions.mean(axis=(1, 2)), vectors, atol=2e-3)
    # One ensemble step is the log of the mean of the merge model's distribution on the stored vectors
    # and the attention model's on the maps.
    tokens = np.full(len(ids), 2, np.int32)
    log_probs, _ = captioner.stepper.step(tokens, captioner.stepper.start(regions))
    merge_probs = np.asarray(load_run(tiny_run).model({"image": vectors, "words": tokens[:, None]}))[:, 0]
    attention_model = load_run(tiny_attention_run).model
    attention_probs = np.asarray(attention_model({"regions": regions, "words": tokens[:, None]}))[:, 0]
    np.testing.assert_allclose(np.exp(log_probs), (merge_probs + attention_probs) / 2, atol=1e-4)
    assert not np.allclose(merge_probs, attention_probs, atol=1e-2)
    # evaluate.py takes the maps from the store for the whole ensemble.
    models = ["--model", str(tiny_run), "--model", str(tiny_attention_run)]
    features = ["--features", str(tiny_spatial_store)]
    assert evaluate.main([*models, *features, "--data", str(tiny_flickr), "--beam", "2"]) == 0
    assert f"{tiny_run} + {tiny_attention_run} on" in capsys.readouterr().out
    # The vector of vgg16 (fc2) is not the mean of its map; lite0's and resnet50's are.
    assert [get_encoder_spec(name).pools_spatial_map for name in ("efficientnet_lite0", "resnet50", "vgg16")] == [
        True,
        True,
        False,
    ]


def test_infer_evaluate_and_serve_decode_with_the_same_defaults(tmp_path):
    import evaluate
    import infer
    import serve
    from cli import decoding_options

    parsed = [infer.parse_args(["photo.jpg"]), evaluate.parse_args([]), serve.parse_args([])]
    assert [decoding_options(args) for args in parsed] == [DecodingOptions()] * 3
    # the defaults chosen on dev for the shipped model: length penalty 1 and the trigram block
    assert DecodingOptions() == DecodingOptions(beam=3, max_length=None, length_penalty=1.0, no_repeat_ngram=3)
    off = infer.parse_args(["photo.jpg", "--no-repeat-ngram", "0", "--length-penalty", "0.5"])
    assert decoding_options(off) == DecodingOptions(length_penalty=0.5, no_repeat_ngram=0)


def test_scripts_cap_malloc_arenas_unless_the_user_chose_a_number():
    import os
    import subprocess
    import sys

    from conftest import ROOT

    code = "import cli; print(cli.limit_malloc_arenas())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    capped = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    chosen = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True, text=True
    )
    assert (capped.stdout.strip(), chosen.stdout.strip()) == ("True", "False")
