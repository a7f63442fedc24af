"""The merge model, its equivalence to the per-prefix formulation, and decoding (issue 3)."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

from models.config import CaptionModelConfig
from models.decoding import EnsembleStepper, MergeStepper, beam_search, greedy_decode
from models.merge import build_merge_model
from models.rundir import save_model_without_optimizer

CONFIG = CaptionModelConfig(vocab_size=12, max_caption_length=8, feature_dim=6, embedding_dim=5, units=7)
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
    greedy = greedy_decode(stepper, features, max_length=8)
    beams = beam_search(stepper, features, beam_size=1, max_length=8)
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
    alone = beam_search(MergeStepper(merge), features, beam_size=3, max_length=8)
    doubled = beam_search(EnsembleStepper([MergeStepper(merge)] * 2), features, beam_size=3, max_length=8)
    assert [[h.tokens for h in b] for b in doubled] == [[h.tokens for h in b] for b in alone]


class ToyStepper:
    """A hand-built Markov model over 6 tokens where greedy decoding is not the best sequence."""

    # rows: previous token; columns: <pad> <unk> <start> <end> x y
    TABLE = np.log(
        np.array(
            [
                [1, 1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1, 1],
                [1e-9, 1e-9, 1e-9, 0.02, 0.53, 0.45],  # after <start>: x looks best
                [1, 1, 1, 1, 1, 1],
                [1e-9, 1e-9, 1e-9, 0.30, 0.36, 0.34],  # after x: nothing is likely
                [1e-9, 1e-9, 1e-9, 0.96, 0.02, 0.02],  # after y: <end> almost surely
            ]
        )
    )

    def start(self, features):
        return [np.zeros((len(features), 1), np.float32)]

    def step(self, tokens, state):
        return self.TABLE[np.asarray(tokens)].copy(), state


def _exhaustive_best(max_length):
    best, best_score = None, -np.inf
    for length in range(1, max_length):
        for words in itertools.product([4, 5], repeat=length - 1):
            sequence = [*words, 3]
            previous, score = 2, 0.0
            for token in sequence:
                score += ToyStepper.TABLE[previous, token]
                previous = token
            if score > best_score:
                best, best_score = sequence, score
    return best, best_score


def test_beam_search_finds_the_highest_scoring_sequence_on_a_toy_model():
    stepper = ToyStepper()
    best, best_score = _exhaustive_best(max_length=6)
    assert best == [5, 3]
    greedy = greedy_decode(stepper, np.zeros((1, 1)), max_length=6)[0]
    assert greedy[0] == 4  # greedy commits to x and misses it
    result = beam_search(stepper, np.zeros((2, 1)), beam_size=2, max_length=6)
    for hypotheses in result:
        assert hypotheses[0].tokens == best
        assert hypotheses[0].log_prob == pytest.approx(best_score)
        assert hypotheses[0].score >= hypotheses[1].score


def test_length_penalty_prefers_longer_captions_when_asked():
    stepper = ToyStepper()
    plain = beam_search(stepper, np.zeros((1, 1)), beam_size=3, max_length=6)[0]
    normalised = beam_search(stepper, np.zeros((1, 1)), beam_size=3, max_length=6, length_penalty=1.0)[0]
    for hypothesis in normalised:
        length = len(hypothesis.tokens)
        assert hypothesis.score == pytest.approx(hypothesis.log_prob / length)
    assert plain[0].tokens == [5, 3]
    assert [h.tokens for h in sorted(plain, key=lambda h: -h.log_prob / len(h.tokens))][0] == normalised[0].tokens


class LoopStepper:
    """A Markov model over <end> and the words 4, 5, 6 that would rather go round 4 -> 5 -> 4 -> 5 than stop."""

    # rows: previous token; columns: <pad> <unk> <start> <end> 4 5 6
    TABLE = np.log(
        np.array(
            [
                [1, 1, 1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1, 1, 1],
                [1e-9, 1e-9, 1e-9, 0.01, 0.80, 0.10, 0.09],  # after <start>: 4
                [1, 1, 1, 1, 1, 1, 1],
                [1e-9, 1e-9, 1e-9, 0.01, 0.05, 0.84, 0.10],  # after 4: 5
                [1e-9, 1e-9, 1e-9, 0.01, 0.80, 0.04, 0.15],  # after 5: back to 4
                [1e-9, 1e-9, 1e-9, 0.60, 0.20, 0.10, 0.10],  # after 6: stop
            ]
        )
    )

    def start(self, features):
        return [np.zeros((len(features), 1), np.float32)]

    def step(self, tokens, state):
        return self.TABLE[np.asarray(tokens)].copy(), state


def _ngrams(tokens, n):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_keeps_every_n_gram_of_a_caption_unique(n):
    features = np.zeros((3, 1))
    plain = beam_search(LoopStepper(), features, beam_size=3, max_length=12)
    assert plain[0][0].tokens[:4] == [4, 5, 4, 5]  # without the block the model loops
    blocked = beam_search(LoopStepper(), features, beam_size=3, max_length=12, no_repeat_ngram=n)
    for hypotheses in blocked:
        assert len(hypotheses) == 3
        for hypothesis in hypotheses:
            grams = _ngrams(hypothesis.tokens, n)
            assert len(grams) == len(set(grams)), hypothesis.tokens
    # the block only removes words: a caption it allows keeps its log-probability
    best = blocked[0][0]
    previous, total = 2, 0.0
    for token in best.tokens:
        total += LoopStepper.TABLE[previous, token]
        previous = token
    assert best.log_prob == pytest.approx(total)


def test_no_repeat_ngram_keeps_the_captions_that_do_not_repeat():
    stepper = ToyStepper()
    plain = beam_search(stepper, np.zeros((2, 1)), beam_size=2, max_length=6)
    blocked = beam_search(stepper, np.zeros((2, 1)), beam_size=2, max_length=6, no_repeat_ngram=3)
    for before, after in zip(plain, blocked, strict=True):
        assert before[0].tokens == after[0].tokens == [5, 3]  # the best caption has no repeat: kept
        assert before[1].tokens == [4, 4, 4, 4, 4]  # the runner-up repeats (4, 4, 4) ...
        assert after[1].tokens != before[1].tokens and len(set(_ngrams(after[1].tokens, 3))) == len(
            _ngrams(after[1].tokens, 3)
        )  # ... and is replaced by one that does not
