"""The searches of models.search (greedy, beam, n-gram block, options), on hand-built Markov steppers."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.search import DecodingOptions, SpecialTokens, beam_search, greedy_decode
from pipeline.vocabulary import Vocabulary

TOKENS = SpecialTokens.of(Vocabulary)
ROOT = Path(__file__).resolve().parent.parent


def test_special_tokens_come_from_the_vocabulary():
    vocabulary = Vocabulary.build([["a", "dog"]], min_count=1)
    assert SpecialTokens.of(vocabulary) == SpecialTokens(pad=0, unk=1, start=2, end=3)
    assert TOKENS.never_generated == [0, 1, 2]


@pytest.mark.parametrize(
    "changes,message",
    [({"beam": 0}, "beam"), ({"max_length": 1}, "max_length"), ({"no_repeat_ngram": 1}, "no_repeat_ngram")],
)
def test_decoding_options_refuse_impossible_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**changes)


def test_the_run_fills_in_max_length_only_when_it_was_left_open():
    assert DecodingOptions().with_max_length(17).max_length == 17
    assert DecodingOptions(max_length=9).with_max_length(17).max_length == 9
    with pytest.raises(ValueError, match="max_length"):
        beam_search(ToyStepper(), np.zeros((1, 1)), DecodingOptions(), TOKENS)


def test_the_search_module_does_not_import_tensorflow():
    code = "import sys, models.search; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


class MarkovStepper:
    """A stepper whose next-word log-probabilities depend on the previous token only: TABLE[previous]."""

    TABLE: np.ndarray

    def start(self, features):
        return [np.zeros((len(features), 1), np.float32)]

    def step(self, tokens, state):
        return self.TABLE[np.asarray(tokens)].copy(), state

    def reorder(self, state, indices):
        return [part[indices] for part in state]


class ToyStepper(MarkovStepper):
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
    greedy = greedy_decode(stepper, np.zeros((1, 1)), 6, TOKENS)[0]
    assert greedy[0] == 4  # greedy commits to x and misses it
    result = beam_search(
        stepper, np.zeros((2, 1)), DecodingOptions(beam=2, max_length=6, length_penalty=0.0, no_repeat_ngram=0), TOKENS
    )
    for hypotheses in result:
        assert hypotheses[0].tokens == best
        assert hypotheses[0].log_prob == pytest.approx(best_score)
        assert hypotheses[0].score >= hypotheses[1].score


def test_length_penalty_prefers_longer_captions_when_asked():
    stepper = ToyStepper()
    plain = beam_search(
        stepper, np.zeros((1, 1)), DecodingOptions(beam=3, max_length=6, length_penalty=0.0, no_repeat_ngram=0), TOKENS
    )[0]
    normalised = beam_search(
        stepper, np.zeros((1, 1)), DecodingOptions(beam=3, max_length=6, length_penalty=1.0, no_repeat_ngram=0), TOKENS
    )[0]
    for hypothesis in normalised:
        length = len(hypothesis.tokens)
        assert hypothesis.score == pytest.approx(hypothesis.log_prob / length)
    assert plain[0].tokens == [5, 3]
    assert [h.tokens for h in sorted(plain, key=lambda h: -h.log_prob / len(h.tokens))][0] == normalised[0].tokens


class LoopStepper(MarkovStepper):
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


def _ngrams(tokens, n):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_keeps_every_n_gram_of_a_caption_unique(n):
    features = np.zeros((3, 1))
    plain = beam_search(
        LoopStepper(), features, DecodingOptions(beam=3, max_length=12, length_penalty=0.0, no_repeat_ngram=0), TOKENS
    )
    assert plain[0][0].tokens[:4] == [4, 5, 4, 5]  # without the block the model loops
    blocked = beam_search(
        LoopStepper(), features, DecodingOptions(beam=3, max_length=12, length_penalty=0.0, no_repeat_ngram=n), TOKENS
    )
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
    plain = beam_search(
        stepper, np.zeros((2, 1)), DecodingOptions(beam=2, max_length=6, length_penalty=0.0, no_repeat_ngram=0), TOKENS
    )
    blocked = beam_search(
        stepper, np.zeros((2, 1)), DecodingOptions(beam=2, max_length=6, length_penalty=0.0, no_repeat_ngram=3), TOKENS
    )
    for before, after in zip(plain, blocked, strict=True):
        assert before[0].tokens == after[0].tokens == [5, 3]  # the best caption has no repeat: kept
        assert before[1].tokens == [4, 4, 4, 4, 4]  # the runner-up repeats (4, 4, 4) ...
        assert after[1].tokens != before[1].tokens and len(set(_ngrams(after[1].tokens, 3))) == len(
            _ngrams(after[1].tokens, 3)
        )  # ... and is replaced by one that does not
