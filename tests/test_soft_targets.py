"""Soft targets of word-level distillation (pipeline/soft_targets.py) and the batches that carry them."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.batches import CaptionSequence, pad_batch
from pipeline.soft_targets import SoftTargetError, SoftTargets, caption_digest, one_hot_targets, top_k_rows


def test_top_k_keeps_the_most_likely_words_first_renormalised():
    rows = np.array([[0.1, 0.4, 0.2, 0.3], [0.7, 0.0, 0.2, 0.1]])
    ids, probabilities = top_k_rows(rows, 2)
    assert ids.tolist() == [[1, 3], [0, 2]]
    np.testing.assert_allclose(probabilities, [[0.4 / 0.7, 0.3 / 0.7], [0.7 / 0.9, 0.2 / 0.9]], rtol=1e-6)
    assert top_k_rows(rows, 9)[0].shape == (2, 4)  # k beyond the vocabulary keeps every word


def _two_captions(weight: float) -> tuple[list[list[int]], SoftTargets]:
    sequences = [[2, 4, 3], [2, 3]]  # <start> w <end>: two positions, then one
    soft = SoftTargets(
        word_ids=np.array([[5, 4], [3, 6], [3, 5]], np.int32),
        probabilities=np.array([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]], np.float32),
        positions=np.array([2, 1]),
        digest=caption_digest(sequences),
        weight=weight,
    )
    return sequences, soft


def test_a_target_is_the_human_word_and_the_teachers_top_words_mixed_by_the_weight():
    sequences, soft = _two_captions(weight=0.25)
    targets = np.array([[3, 0, 0], [4, 3, 0]])  # caption 1 first, then caption 0; padded to width 3
    dense = soft.dense(targets, np.array([1, 0]), vocab_size=8)
    assert dense.shape == (2, 3, 8)
    np.testing.assert_allclose(dense[0, 0], np.eye(8)[3])  # human <end> 0.75 + the teacher's <end> 0.25 * 1.0
    expected = np.zeros(8)
    expected[[5, 4]] = [0.25 * 0.75, 0.75 + 0.25 * 0.25]  # the human word 4 also among the teacher's
    np.testing.assert_allclose(dense[1, 0], expected)
    np.testing.assert_allclose(dense[1, 1, [3, 6]], [0.75 + 0.125, 0.125])
    np.testing.assert_allclose(dense.sum(axis=2), [[1, 0, 0], [1, 1, 0]])  # padding all zero


def test_soft_targets_refuse_other_captions_and_a_weight_out_of_range():
    sequences, soft = _two_captions(weight=0.5)
    soft.check_captions(sequences)
    with pytest.raises(SoftTargetError, match="other captions"):
        soft.check_captions([[2, 5, 3], [2, 3]])
    with pytest.raises(SoftTargetError, match="weight"):
        SoftTargets(soft.word_ids, soft.probabilities, soft.positions, soft.digest, weight=0.0)
    with pytest.raises(SoftTargetError, match="caption positions"):
        SoftTargets(soft.word_ids, soft.probabilities, np.array([2, 2]), soft.digest)


def test_the_batches_give_each_caption_its_own_soft_targets_after_shuffling():
    # caption c's teacher says word 10 + c everywhere with weight 1: a batch row's target names its caption
    sequences = [[2] + [4] * (1 + c % 3) + [3] for c in range(10)]
    positions = np.array([len(s) - 1 for s in sequences])
    owner = np.repeat(np.arange(10), positions)
    soft = SoftTargets(
        (10 + owner)[:, None].astype(np.int32), np.ones((len(owner), 1), np.float32), positions,
        caption_digest(sequences), weight=1.0,
    )  # fmt: skip
    batches = CaptionSequence(None, np.arange(10), sequences, 8, batch_size=4, seed=3, vocab_size=20, soft_targets=soft)
    seen = []
    for index in range(len(batches)):
        inputs, targets, weights = batches[index]
        chosen = batches.order[index * 4 : (index + 1) * 4]
        for row, caption in enumerate(chosen):
            real = weights[row] > 0
            assert real.sum() == positions[caption]
            assert (targets[row][real].argmax(axis=1) == 10 + caption).all()
            assert not targets[row][~real].any()
        seen += chosen.tolist()
    assert sorted(seen) == list(range(10)) and seen != list(range(10))  # every caption, shuffled
    plain = CaptionSequence(None, np.arange(10), sequences, 8, batch_size=4, shuffle=False, vocab_size=20)
    _, targets, _ = plain[0]
    ids = pad_batch(sequences[:4], 8)[:, 1:]
    np.testing.assert_array_equal(targets, one_hot_targets(ids, 20))  # one-hot: the dev split's targets
    with pytest.raises(SoftTargetError, match="other captions"):
        CaptionSequence(None, np.arange(10), sequences[::-1], 8, vocab_size=20, soft_targets=soft)
