"""The merge model, its equivalence to the per-prefix formulation, and decoding (issue 3)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models.config import CaptionModelConfig
from models.decoding import EnsembleStepper
from models.merge import MergeStepper, build_merge_model
from models.rundir import save_model_without_optimizer
from models.search import DecodingOptions, SpecialTokens, beam_search, greedy_decode
from pipeline.vocabulary import Vocabulary

CONFIG = CaptionModelConfig(vocab_size=12, max_caption_length=8, feature_dim=6, embedding_dim=5, units=7)
TOKENS = SpecialTokens.of(Vocabulary)
CAPTIONS = np.array([[2, 4, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0, 0], [2, 8, 9, 10, 11, 4, 3]], dtype=np.int32)


def _model(seed=0, **changes):
    keras.utils.set_random_seed(seed)
    return build_merge_model(CaptionModelConfig(**{**CONFIG.__dict__, **changes}))


def _features(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, CONFIG.feature_dim)).astype(np.float32)


def _prefix_model(model: keras.Model) -> keras.Model:
    """The classic formulation: one (image, left-padded prefix) sample -> P(next word)."""
    layers = keras.layers
    image = keras.Input((CONFIG.feature_dim,))
    prefix = keras.Input((None,), dtype="int32")
    image_vector = model.get_layer("image_dense")(model.get_layer("image_dropout")(image))
    text = model.get_layer("embedding")(prefix)
    rnn = layers.LSTM(CONFIG.units, return_sequences=False)
    text = rnn(model.get_layer("text_dropout")(text))
    rnn.set_weights(model.get_layer("rnn").get_weights())
    hidden = model.get_layer("hidden")(layers.Add()([image_vector, text]))
    return keras.Model([image, prefix], model.get_layer("next_word")(hidden))


def test_sequence_and_per_prefix_formulations_give_the_same_probabilities():
    model = _model()
    features = _features()
    full = np.asarray(model({"image": features, "words": CAPTIONS[:, :-1]}))
    prefix_model = _prefix_model(model)
    width = CAPTIONS.shape[1] - 1
    compared = 0
    for i, caption in enumerate(CAPTIONS):
        length = int(np.count_nonzero(caption))
        for t in range(length - 1):
            prefix = np.zeros((1, width), np.int32)
            prefix[0, width - t - 1 :] = caption[: t + 1]  # left-padded, as pad_sequences does
            probabilities = np.asarray(prefix_model([features[i : i + 1], prefix]))[0]
            np.testing.assert_allclose(probabilities, full[i, t], rtol=1e-5, atol=1e-6)
            compared += 1
    assert compared == 4 + 2 + 6  # every next-word position of captions of 5, 3 and 7 tokens


def test_padding_does_not_change_the_probabilities_of_real_words():
    model = _model()
    features = _features(1)
    short = np.asarray(model({"image": features, "words": CAPTIONS[1:2, :2]}))
    padded = np.asarray(model({"image": features, "words": CAPTIONS[1:2, :6]}))
    np.testing.assert_allclose(short[0], padded[0, :2], rtol=1e-5, atol=1e-6)


def test_a_few_training_steps_lower_the_loss_and_padding_is_weighted_out():
    from models.training import compile_caption_model

    model = _model(dropout=0.0)
    compile_caption_model(model, 3e-2)
    inputs = {"image": _features(), "words": CAPTIONS[:, :-1]}
    targets = CAPTIONS[:, 1:]
    weights = (targets != 0).astype(np.float32)
    before = model.evaluate(inputs, targets, sample_weight=weights, verbose=0)[0]
    model.fit(inputs, targets, sample_weight=weights, epochs=60, verbose=0)
    after = model.evaluate(inputs, targets, sample_weight=weights, verbose=0)[0]
    assert after < 0.5 * before
    # Changing what the model predicts at padded positions cannot change the weighted loss.
    probabilities = np.asarray(model(inputs))
    manual = -np.log(np.take_along_axis(probabilities, targets[..., None], axis=2)[..., 0])
    assert (manual * weights).sum() / weights.sum() == pytest.approx(after, rel=1e-3)


def test_save_and_load_give_identical_predictions(tmp_path):
    model = _model(seed=4, cell="gru")
    save_model_without_optimizer(model, tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    inputs = {"image": _features(), "words": CAPTIONS[:, :-1]}
    np.testing.assert_array_equal(np.asarray(model(inputs)), np.asarray(loaded(inputs)))


def test_beam_of_one_is_greedy():
    model = _model(seed=5)
    stepper = MergeStepper(model)
    features = _features(4, seed=1)
    greedy = greedy_decode(stepper, features, 8, TOKENS)
    beams = beam_search(stepper, features, DecodingOptions(beam=1, max_length=8, no_repeat_ngram=0), TOKENS)
    assert [b[0].tokens for b in beams] == greedy


def test_an_ensemble_steps_on_the_mean_of_its_members_probabilities():
    from models.inject import InjectStepper, build_inject_model

    merge, other = _model(seed=6), _model(seed=7, cell="gru")
    keras.utils.set_random_seed(8)
    inject = build_inject_model(CaptionModelConfig(**{**CONFIG.__dict__, "decoder": "inject"}))
    members = [MergeStepper(merge), MergeStepper(other), InjectStepper(inject)]
    ensemble = EnsembleStepper(members)
    features = _features(2, seed=2)
    tokens = np.array([2, 2], np.int32)
    state, states = ensemble.start(features), [m.start(features) for m in members]
    for word in (5, 9):  # two steps, so the carried states are checked too
        log_probs, state = ensemble.step(tokens, state)
        expected = []
        for i, member in enumerate(members):
            member_log_probs, states[i] = member.step(tokens, states[i])
            expected.append(np.exp(member_log_probs))
        np.testing.assert_allclose(np.exp(log_probs), np.mean(expected, axis=0), rtol=1e-5, atol=1e-7)
        tokens = np.array([word, word], np.int32)
    # Beam search over an ensemble of one model with itself is beam search over that model.
    options = DecodingOptions(beam=3, max_length=8, length_penalty=0.0)
    alone = beam_search(MergeStepper(merge), features, options, TOKENS)
    doubled = beam_search(EnsembleStepper([MergeStepper(merge)] * 2), features, options, TOKENS)
    assert [[h.tokens for h in b] for b in doubled] == [[h.tokens for h in b] for b in alone]
