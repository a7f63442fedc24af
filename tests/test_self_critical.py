"""Self-critical training: the CIDEr-D reward, the baseline, sampling, the update's sign, a tiny run."""

from __future__ import annotations

import csv
import json

import keras
import numpy as np
import pytest

from models.rundir import RunDirError
from models.search import SpecialTokens, sample_captions
from models.self_critical import (
    CaptionReward,
    CiderReward,
    MeteorReward,
    SelfCriticalOptions,
    leave_one_out_advantages,
    policy_gradient_update,
    self_critical_train,
    teacher_forcing_arrays,
)
from models.training import TrainingError
from pipeline.vocabulary import Vocabulary

REFERENCES = {
    "a": [["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "is", "running"]],
    "b": [["two", "children", "play", "in", "the", "water"], ["kids", "splash", "in", "a", "pool"]],
    "c": [["a", "man", "rides", "a", "bike"], ["a", "cyclist", "on", "a", "road"]],
}


def test_reward_is_pycocoevalcaps_cider_when_the_corpus_is_the_scored_set():
    from pycocoevalcap.cider.cider import Cider

    hypotheses = {"a": "a dog runs on grass", "b": "children play in a pool", "c": "a man on a road"}
    gts = {i: [" ".join(r) for r in refs] for i, refs in REFERENCES.items()}
    expected_mean, expected = Cider().compute_score(gts, {i: [h] for i, h in hypotheses.items()})
    scores = CiderReward(REFERENCES)(list(hypotheses), [h.split() for h in hypotheses.values()])
    np.testing.assert_allclose(scores, expected, rtol=1e-9)
    assert scores.mean() == pytest.approx(expected_mean)
    assert scores[0] > 1.0 and scores[2] < scores[0]  # not a degenerate all-equal result


def test_reward_of_a_batch_uses_the_corpus_document_frequencies():
    """Scoring one caption alone gives the same value as scoring it among the whole corpus."""
    reward = CiderReward(REFERENCES)
    together = reward(["a", "b", "c"], [["a", "dog", "runs"], ["kids", "in", "water"], ["a", "bike"]])
    alone = reward(["b"], [["kids", "in", "water"]])
    assert alone[0] == pytest.approx(together[1])
    # the same image twice (two samples) scores each on its own
    np.testing.assert_allclose(
        reward(["a", "a"], [["a", "dog", "runs"], ["a", "bike"]]), [together[0], 0.0], atol=1e-12
    )


def test_meteor_reward_is_pycocoevalcaps_meteor_per_caption():
    from pycocoevalcap.meteor.meteor import Meteor

    ids = ["a", "b", "c", "a"]
    captions = [["a", "dog", "runs", "on", "the", "grass"], ["a", "man", "rides", "a", "bike"], [], ["a", "dog"]]
    gts = {k: [" ".join(r) for r in REFERENCES[i]] for k, i in enumerate(ids)}
    expected = Meteor().compute_score(gts, {k: [" ".join(c)] for k, c in enumerate(captions)})[1]
    reward = MeteorReward(REFERENCES)
    try:
        scores = reward(ids, captions)
        np.testing.assert_allclose(scores, expected, rtol=1e-12)
        assert scores[0] > 0.9  # a reference, word for word
        assert scores[1] < 0.1 and scores[2] == 0.0  # another image's caption; nothing
        assert 0.1 < scores[3] < scores[0]  # the right words, too few of them: recall is low
        assert reward([], []).shape == (0,)
    finally:
        reward.close()
    with pytest.raises(TrainingError, match="the METEOR scorer failed"):  # its Java process is gone
        reward(ids, captions)
    assert not reward._meteor.lock.locked()  # so the scorer's own clean-up does not block


def test_caption_reward_adds_the_weighted_meteor_to_cider_d():
    ids, captions = ["a", "b", "c"], [["a", "dog", "runs"], ["kids", "in", "water"], ["a", "man", "on", "a", "bike"]]
    plain = CaptionReward(REFERENCES)
    assert plain.meteor is None  # no Java process without a METEOR term
    np.testing.assert_allclose(plain(ids, captions), CiderReward(REFERENCES)(ids, captions))
    mixed = CaptionReward(REFERENCES, meteor_weight=2.5)
    try:
        parts = mixed.parts(ids, captions)
        assert set(parts) == {"cider_d", "meteor", "reward"} and parts["meteor"].min() > 0
        np.testing.assert_allclose(parts["reward"], parts["cider_d"] + 2.5 * parts["meteor"])
        np.testing.assert_allclose(mixed(ids, captions), parts["reward"])
    finally:
        mixed.close()


def test_leave_one_out_advantages():
    rewards = np.array([1.0, 2.0, 3.0, 0.5, 0.5, 2.0])  # two images, three samples each
    np.testing.assert_allclose(
        leave_one_out_advantages(rewards, 3), [1 - 2.5, 2 - 2.0, 3 - 1.5, 0.5 - 1.25, 0.5 - 1.25, 2.0 - 0.5]
    )


def test_teacher_forcing_arrays_stop_at_end():
    sampled = np.array([[5, 6, 3, 0, 0, 0, 0, 0, 0, 0], [7, 3, 0, 0, 0, 0, 0, 0, 0, 0], [4] * 10])  # 3 = <end>
    inputs, targets, mask = teacher_forcing_arrays(sampled, start_id=2, end_id=3)
    assert inputs.shape == targets.shape == mask.shape == (3, 10)  # longest is 10 (cut, no <end>)
    assert inputs[0, :4].tolist() == [2, 5, 6, 3] and targets[0, :3].tolist() == [5, 6, 3]
    assert mask.sum(axis=1).tolist() == [3, 2, 10]
    short = teacher_forcing_arrays(sampled[:2], 2, 3)
    assert short[0].shape == (2, 8)  # rounded up to one length bucket, not the sampled width


class FixedStepper:
    """A decoder whose next-word distribution is the same at every step: p over 6 tokens."""

    def __init__(self, probabilities):
        with np.errstate(divide="ignore"):
            self.log_probs = np.log(np.asarray(probabilities, dtype=np.float64))

    def start(self, features):
        return [np.zeros(len(features))]

    def step(self, tokens, state):
        return np.tile(self.log_probs, (len(tokens), 1)), state


def test_sampling_draws_words_in_proportion_and_stops_at_end():
    probabilities = [0.0, 0.0, 0.0, 0.1, 0.6, 0.3]  # <pad>, <unk>, <start> never; <end> 0.1
    tokens = SpecialTokens.of(Vocabulary)
    captions = sample_captions(FixedStepper(probabilities), np.zeros((400, 1)), 5, 30, np.random.default_rng(0), tokens)
    assert captions.shape == (2000, 30)
    first = captions[:, 0]
    assert np.mean(first == 4) == pytest.approx(0.6, abs=0.04)
    assert np.mean(first == 5) == pytest.approx(0.3, abs=0.04)
    lengths = (captions != 0).sum(axis=1)
    ended = (captions == 3).any(axis=1)
    assert np.all(captions[np.arange(len(captions))[ended], lengths[ended] - 1] == 3)  # <end> is last
    assert np.mean(lengths[ended]) == pytest.approx(1 / 0.1, rel=0.15)  # geometric, mean 1/p(<end>)


@pytest.mark.parametrize("advantages", [(1.0, 0.0), (0.0, -1.0)])
def test_update_moves_a_caption_the_way_of_its_advantage(tiny_run, advantages):
    from models.rundir import load_run

    model = load_run(tiny_run).model
    update = policy_gradient_update(model, keras.optimizers.Adam(1e-3))
    features = np.random.default_rng(0).normal(size=(2, model.input["image"].shape[-1])).astype(np.float32)
    sampled = np.array([[5, 6, 3, 0], [7, 3, 0, 0]])  # two captions ending in <end> (3)
    inputs, targets, mask = teacher_forcing_arrays(sampled, 2, 3)
    batch = {"image": features, "words": inputs}

    def caption_log_probs():
        picked = np.take_along_axis(model.predict_on_batch(batch), targets[..., None], axis=2)[..., 0]
        return np.where(mask > 0, np.log(np.where(mask > 0, picked, 1.0)), 0.0).sum(axis=1)

    before = caption_log_probs()
    for _ in range(5):
        update(batch, targets, mask, np.array(advantages, np.float32))
    change = caption_log_probs() - before
    moved = int(np.flatnonzero(advantages)[0])
    assert np.sign(change[moved]) == np.sign(advantages[moved]) and abs(change[moved]) > 0.05


def test_tiny_run_writes_a_loadable_run_and_resumes(tiny_run, tiny_store, tiny_flickr, tmp_path):
    from models.rundir import load_run

    out = tmp_path / "scst"
    options = SelfCriticalOptions(epochs=2, batch_images=4, samples=3, learning_rate=1e-3, patience=5)
    result = self_critical_train(tiny_run, tiny_store, tiny_flickr, out, options, verbose=False)
    assert result.epochs_run == 2
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert result.best_dev_score == pytest.approx(max(float(r["dev_cider_d"]) for r in rows), abs=1e-4)
    run = load_run(out)
    assert run.config["self_critical"]["samples"] == 3 and run.config["model"] == load_run(tiny_run).config["model"]
    with pytest.raises(RunDirError, match="--resume"):
        self_critical_train(tiny_run, tiny_store, tiny_flickr, out, options, verbose=False)
    options.epochs = 3
    resumed = self_critical_train(tiny_run, tiny_store, tiny_flickr, out, options, resume=True, verbose=False)
    assert resumed.epochs_run == 3
    assert json.loads((out / "last_epoch.json").read_text())["epochs_done"] == 3
    assert [int(r["epoch"]) for r in csv.DictReader((out / "history.csv").open())] == [0, 1, 2, 3]


def test_a_meteor_term_is_in_the_history_picks_the_epoch_and_must_match_on_resume(
    tiny_run, tiny_store, tiny_flickr, tmp_path
):
    out = tmp_path / "scst_meteor"
    options = SelfCriticalOptions(
        epochs=2, batch_images=4, samples=3, learning_rate=1e-3, patience=5, meteor_weight=4.0
    )
    result = self_critical_train(tiny_run, tiny_store, tiny_flickr, out, options, verbose=False)
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert list(rows[0]) == ["epoch", "mean_reward", "dev_cider_d", "dev_meteor", "dev_reward", "seconds"]
    for row in rows:
        combined = float(row["dev_cider_d"]) + 4.0 * float(row["dev_meteor"])
        assert float(row["dev_reward"]) == pytest.approx(combined, abs=3e-4)  # each printed to 4 places
    assert result.criterion == "CIDEr-D + 4 * METEOR"
    assert result.best_dev_score == pytest.approx(max(float(r["dev_reward"]) for r in rows), abs=1e-4)
    assert result.best_epoch == int(np.argmax([float(r["dev_reward"]) for r in rows]))
    options.epochs, options.meteor_weight = 3, 1.0
    with pytest.raises(TrainingError, match="METEOR weight 4"):
        self_critical_train(tiny_run, tiny_store, tiny_flickr, out, options, resume=True, verbose=False)


def test_cli_self_critical_bad_input_is_one_line(tmp_path, capsys):
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--self-critical", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run directory" in err[0]
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--self-critical", str(tmp_path), "--meteor-weight", "-1", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--meteor-weight must not be negative" in err[-1]


def test_cli_self_critical_reads_the_store_its_run_was_trained_on(tiny_run, tiny_store, tiny_flickr, tmp_path):
    # Without --features the stage reads the run's own store (here not the default lite0 store, absent in CI),
    # and falls back to the default store when the recorded one is gone.
    import shutil

    import train

    out = tmp_path / "scst_cli"
    argv = ["--self-critical", str(tiny_run), "--data", str(tiny_flickr), "--epochs", "1", "--samples", "2"]
    assert train.main([*argv, "--batch-images", "4", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["features"] == str(tiny_store)
    moved = tmp_path / "moved_run"
    shutil.copytree(tiny_run, moved)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "features": str(tmp_path / "gone.pkl")}))
    assert train.trained_features(moved) == train.DEFAULT_FEATURES
    assert train.trained_features(tiny_run) == tiny_store


def test_attention_run_fine_tunes_on_its_spatial_maps(tiny_attention_run, tiny_spatial_store, tiny_flickr, tmp_path):
    from models.rundir import load_run

    options = SelfCriticalOptions(epochs=1, batch_images=4, samples=2, learning_rate=1e-3)
    result = self_critical_train(
        tiny_attention_run, tiny_spatial_store, tiny_flickr, tmp_path / "a", options, verbose=False
    )
    assert result.epochs_run == 1
    assert load_run(tmp_path / "a").model_config.decoder == "attention"
