"""models.export and models.litert: a run exported to LiteRT captions as the Keras runtime does, without TensorFlow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.store import FeatureStore, SpatialMaps, spatial_path
from models.captioner import Captioner
from models.export import export_captioner
from models.litert import EXPORT_FILE, EXPORT_FOLDER, ExportError, LiteCaptioner, find_export, stale_sources
from models.runtimes import choose_runtime
from models.search import DecodingOptions

ROOT = Path(__file__).resolve().parent.parent
# Imported by every Python started with it on PYTHONPATH: TensorFlow, Keras and h5py then fail to import.
NO_TENSORFLOW = """import sys
for name in ("tensorflow", "keras", "h5py"):
    sys.modules[name] = None
"""


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[Path, Captioner]:
    """A copy of tiny_run with a float32 export in litert/, and the Keras captioner it was exported from
    (the tiny run's encoder has random weights: only this captioner's encoder is the exported one)."""
    run = tmp_path_factory.mktemp("exported") / "tiny"
    shutil.copytree(tiny_run, run)
    captioner = Captioner.load(run)
    report = export_captioner(captioner, run / EXPORT_FOLDER)
    assert set(report.sizes) == {"encoder.tflite", "decoder.tflite"}
    return run, captioner


@pytest.fixture(scope="module")
def exported_ensemble(tiny_run, tiny_attention_run, tmp_path_factory) -> tuple[Path, Captioner]:
    """A merge run and an attention run exported as one ensemble (the merge member pools the maps)."""
    captioner = Captioner.load([tiny_run, tiny_attention_run])
    out = tmp_path_factory.mktemp("ensemble") / "litert"
    export_captioner(captioner, out)
    return out, captioner


def test_exported_steps_and_encoder_match_keras(exported):
    run, captioner = exported
    lite = LiteCaptioner.load(run)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 1280)).astype(np.float32)
    tokens = rng.integers(0, len(captioner.vocabulary), 5).astype(np.int32)
    keras_state = captioner.stepper.start(features)
    lite_state = lite.stepper.start(features)
    for keras_part, lite_part in zip(keras_state, lite_state, strict=True):
        np.testing.assert_allclose(lite_part, np.asarray(keras_part), atol=1e-5)
    keras_log_probs, _ = captioner.stepper.step(tokens, keras_state)
    lite_log_probs, lite_next = lite.stepper.step(tokens, lite_state)
    assert lite_log_probs.shape == (5, len(captioner.vocabulary)) and len(lite_next) == 3  # context, h, c
    np.testing.assert_allclose(lite_log_probs, keras_log_probs, atol=1e-4)
    pixels = rng.uniform(0, 255, (3, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(lite.encode(pixels), captioner.encode(pixels), atol=1e-4)
    config = json.loads((run / EXPORT_FOLDER / EXPORT_FILE).read_text())
    assert config["precision"] == "float32" and config["max_caption_length"] == 8
    assert [d["decoder"] for d in config["decoders"]] == ["merge"]
    assert lite.spec.input_size == 224 and lite.decoder == "merge" and lite.encoder_weights == "none"


def test_lite_beam_search_equals_the_keras_path_on_stored_features(exported, tiny_store):
    run, captioner = exported
    lite = LiteCaptioner.load(run)
    store = FeatureStore.load(tiny_store)
    ids = sorted(store.features)
    features = store.matrix(ids)
    for options in [DecodingOptions(), DecodingOptions(beam=2, length_penalty=0.0, no_repeat_ngram=0)]:
        expected = captioner.caption_features(ids, features, options)
        got = lite.caption_features(ids, features, options)
        assert [c.caption for c in got] == [c.caption for c in expected]
        for mine, theirs in zip(got, expected, strict=True):
            assert [b[0] for b in mine.beams] == [b[0] for b in theirs.beams]
            np.testing.assert_allclose([b[1] for b in mine.beams], [b[1] for b in theirs.beams], atol=1e-3)


@pytest.mark.slow
def test_an_ensemble_with_an_attention_member_exports_and_decodes_alike(exported_ensemble, tiny_spatial_store):
    out, captioner = exported_ensemble
    config = json.loads((out / EXPORT_FILE).read_text())
    assert [d["decoder"] for d in config["decoders"]] == ["merge", "attention"]
    assert config["reads_regions"] is True and config["feature_shape"] == [7, 7, 1280]
    lite = LiteCaptioner.load(out)
    maps = SpatialMaps(spatial_path(tiny_spatial_store))
    ids = sorted(maps.index)
    features = maps.get(ids)
    maps.close()
    expected = captioner.caption_features(ids, features)
    got = lite.caption_features(ids, features)
    assert [c.caption for c in got] == [c.caption for c in expected]
    np.testing.assert_allclose([c.beams[0][1] for c in got], [c.beams[0][1] for c in expected], atol=1e-3)
    with pytest.raises(ExportError, match="--runtime keras"):
        lite.caption_features(ids[:1], features[:1], attention=True)


def test_infer_uses_an_export_by_itself_and_prints_the_same_captions(exported, tiny_flickr, capsys):
    import infer

    run, captioner = exported
    images = [str(tiny_flickr / "Images" / f"{colour}_0.jpg") for colour in ("red", "green", "blue")]
    assert choose_runtime([run]) == ("litert", None)
    expected, _ = captioner.caption_files(images)
    assert infer.main([*images, "--model", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{c.image}: {c.caption}" for c in expected]
    assert captured.err == ""


def test_a_run_without_an_export_falls_back_to_keras_and_litert_asks_for_one(tiny_run, tiny_flickr, capsys):
    import infer

    assert find_export(tiny_run) is None and choose_runtime([tiny_run]) == ("keras", None)
    assert choose_runtime([tiny_run], "auto", keras_for="--attention-map") == ("keras", None)
    image = str(tiny_flickr / "Images" / "red_0.jpg")
    assert infer.main([image, "--model", str(tiny_run)]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit) as exit_info:
        infer.main([image, "--model", str(tiny_run), "--runtime", "litert"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "no LiteRT export" in err and "export.py" in err and "Traceback" not in err


def test_an_export_older_than_its_run_is_skipped_with_a_warning(exported, tmp_path):
    run = tmp_path / "retrained"
    shutil.copytree(exported[0], run)
    config_path = run / EXPORT_FOLDER / EXPORT_FILE
    config = json.loads(config_path.read_text())
    config["sources"]["../model.keras"] = "0" * 64  # as if train.py had rewritten the model since
    config_path.write_text(json.dumps(config))
    assert stale_sources(run / EXPORT_FOLDER) == [str(run / "model.keras")]
    runtime, warning = choose_runtime([run])
    assert runtime == "keras" and "older than" in warning and "export.py" in warning


@pytest.mark.parametrize("damage", ["garbage", "truncated", "garbage with its checksum recorded"])
def test_a_corrupt_tflite_is_one_clear_error_line(exported, tiny_flickr, tmp_path, capsys, damage):
    import infer

    run = tmp_path / "damaged"
    shutil.copytree(exported[0], run)
    decoder = run / EXPORT_FOLDER / "decoder.tflite"
    data = decoder.read_bytes()
    decoder.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"TFL3" + os.urandom(4000))
    if damage.endswith("recorded"):
        from models.litert import sha256_of

        config = json.loads((run / EXPORT_FOLDER / EXPORT_FILE).read_text())
        config["decoders"][0]["sha256"] = sha256_of(decoder)
        (run / EXPORT_FOLDER / EXPORT_FILE).write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        infer.main([str(tiny_flickr / "Images" / "red_0.jpg"), "--model", str(run)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    expected = "not a LiteRT model" if damage.endswith("recorded") else "do not match export.json"
    assert str(decoder) in err and expected in err and "export.py" in err


def test_a_malformed_export_json_is_one_clear_error_line(exported, tiny_flickr, tmp_path, capsys):
    import infer

    run = tmp_path / "malformed"
    shutil.copytree(exported[0], run)
    (run / EXPORT_FOLDER / EXPORT_FILE).write_text('{"format": "captioning-litert-export", "version": 7}')
    with pytest.raises(SystemExit) as exit_info:
        infer.main([str(tiny_flickr / "Images" / "red_0.jpg"), "--model", str(run)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "format version 7, expected 1" in err and len(err.strip().splitlines()) == 1


def run_without_tensorflow(arguments: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run Python with `arguments` in the project root where importing TensorFlow, Keras or h5py fails."""
    shim = tmp_path / "no_tensorflow"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(NO_TENSORFLOW)
    env = {**os.environ, "PYTHONPATH": str(shim)}
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_litert_path_needs_no_tensorflow(exported, tiny_flickr, tmp_path):
    run, captioner = exported
    blocked = run_without_tensorflow(["-c", "import tensorflow"], tmp_path)
    assert blocked.returncode != 0 and "import of tensorflow halted" in blocked.stderr  # the shim works
    images = [str(tiny_flickr / "Images" / f"{colour}_1.jpg") for colour in ("red", "blue")]
    expected, _ = captioner.caption_files(images, DecodingOptions(beam=2))
    done = run_without_tensorflow(["infer.py", *images, "--model", str(run), "--beam", "2", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert [r["caption"] for r in json.loads(done.stdout)["results"]] == [c.caption for c in expected]
    serving = "import serve, web.app, sys; print(sorted(m for m in ('tensorflow', 'keras') if sys.modules.get(m)))"
    assert run_without_tensorflow(["-c", serving], tmp_path).stdout.strip() == "[]"
    keras = run_without_tensorflow(["infer.py", images[0], "--model", str(run), "--runtime", "keras"], tmp_path)
    assert keras.returncode == 2 and keras.stderr.startswith("error: --runtime keras needs TensorFlow")
    assert len(keras.stderr.splitlines()) == 1


def test_export_refuses_a_missing_run_in_one_line(tmp_path, capsys):
    import export

    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "absent")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no such run directory" in err and len(err.strip().splitlines()) == 1
