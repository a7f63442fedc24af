"""Sequence- and word-level distillation (models/distillation.py, train.py --distill-from) on the tiny data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from features.store import open_feature_store
from models.captioner import Captioner
from models.distillation import (
    DistillationError,
    SoftTargetOptions,
    TeacherCaptions,
    TeacherOptions,
    TeacherSoftTargets,
    caption_train_images,
    distil_caption_model,
    teacher_soft_targets,
)
from models.rundir import RunDir, RunDirError
from models.search import DecodingOptions
from models.training import TrainingOptions, prepare_caption_data
from pipeline.batches import encode_captions
from pipeline.captions import CaptionFileError, clean_caption
from pipeline.datasets import WithExtraCaptions, open_dataset
from pipeline.soft_targets import top_k_rows

TRAIN_IDS = [f"{colour}_{k}.jpg" for colour in ("red", "green", "blue") for k in range(3)]  # conftest's split
DECODING = DecodingOptions(beam=3)


def _teacher_options(tiny_run, **changes) -> TeacherOptions:
    settings = {"captions_per_image": 2, "decoding": DECODING, "chunk_images": 4}  # 9 train images: 3 chunks
    return TeacherOptions((str(tiny_run),), **{**settings, **changes})


def _two_best_beams(teacher: Captioner, store_path) -> dict[str, list[str]]:
    """Each train image's two best beams, decoded straight from the store's features."""
    decoded = teacher.decode(open_feature_store(store_path).matrix(TRAIN_IDS), DECODING)
    return {
        image: [" ".join(teacher.vocabulary.decode(h.tokens)) for h in hypotheses[:2]]
        for image, hypotheses in zip(TRAIN_IDS, decoded, strict=True)
    }


def test_the_teacher_captions_written_are_its_beam_search_of_those_images(tiny_run, tiny_flickr, tiny_store, tmp_path):
    teacher = Captioner.load(tiny_run)
    run = RunDir(tmp_path / "student")
    result = caption_train_images(teacher, tiny_store, open_dataset(tiny_flickr), run, _teacher_options(tiny_run))
    expected = _two_best_beams(teacher, tiny_store)
    assert result.captions == expected
    assert (result.images, result.chunks, result.chunks_reused) == (9, 3, 0)
    files = TeacherCaptions(run)
    assert sorted(p.name for p in files.folder.iterdir()) == [
        "captions_00000.json",
        "captions_00001.json",
        "captions_00002.json",
        "config.json",
    ]
    first = json.loads(files.chunk_path(0).read_text())  # COCO results format, best beam first
    assert first[:2] == [{"image_id": "red_0.jpg", "caption": c} for c in expected["red_0.jpg"]]
    manifest = files.read_manifest()
    assert manifest["teacher"]["runs"] == [str(tiny_run)] and manifest["images"] == 9


def test_the_student_trains_on_human_and_teacher_captions_and_dev_keeps_the_human_ones(tiny_flickr, tiny_store):
    dataset = open_dataset(tiny_flickr)
    teacher = {"red_0.jpg": ["a teacher caption"], "blue_2.jpg": ["another one", "and a third"]}
    student = WithExtraCaptions(dataset, teacher, "train", {"teacher": "t"}, key="distillation")
    data = prepare_caption_data(open_feature_store(tiny_store), student, min_count=1)
    human = dataset.captions()
    assert data.train.captions["red_0.jpg"] == [clean_caption(c) for c in human["red_0.jpg"]] + [
        ["a", "teacher", "caption"]
    ]
    assert len(data.train.captions["blue_2.jpg"]) == len(human["blue_2.jpg"]) + 2
    assert data.train.captions["green_0.jpg"] == [clean_caption(c) for c in human["green_0.jpg"]]
    assert data.dev.image_ids == ["red_3.jpg", "green_3.jpg", "blue_3.jpg"]
    for image in data.dev.image_ids:
        assert data.dev.captions[image] == [clean_caption(c) for c in human[image]]
    assert student.run_facts() == {**dataset.run_facts(), "distillation": {"teacher": "t"}}
    with pytest.raises(CaptionFileError, match="not in the train split"):
        WithExtraCaptions(dataset, {"red_3.jpg": ["a dev image"]}).captions()


def test_a_killed_teacher_pass_resumes_without_redoing_finished_chunks(
    tiny_run, tiny_flickr, tiny_store, tmp_path, monkeypatch
):
    teacher, dataset, options = Captioner.load(tiny_run), open_dataset(tiny_flickr), _teacher_options(tiny_run)
    run = RunDir(tmp_path / "student")
    write_chunk = TeacherCaptions.write_chunk

    def killed_after_the_first_chunk(self, index, captions, seconds):
        write_chunk(self, index, captions, seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr(TeacherCaptions, "write_chunk", killed_after_the_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        caption_train_images(teacher, tiny_store, dataset, run, options, progress=False)
    monkeypatch.undo()
    first = TeacherCaptions(run).chunk_path(0)
    assert first.is_file() and not TeacherCaptions(run).chunk_path(1).exists()
    written, seconds_before = first.stat().st_mtime_ns, TeacherCaptions(run).seconds()
    assert seconds_before > 0  # the killed pass's finished chunk kept its time
    decoded = []
    decode = teacher.decode
    monkeypatch.setattr(teacher, "decode", lambda features, o: decoded.append(len(features)) or decode(features, o))
    result = caption_train_images(teacher, tiny_store, dataset, run, options, progress=False)
    assert decoded == [4, 1] and result.chunks_reused == 1  # chunks 1 and 2 only
    assert first.stat().st_mtime_ns == written
    assert result.total_seconds > seconds_before
    whole = caption_train_images(teacher, tiny_store, dataset, RunDir(tmp_path / "whole"), options, progress=False)
    assert result.captions == whole.captions
    with pytest.raises(DistillationError, match="captions_per_image"):  # other settings never mix in
        caption_train_images(teacher, tiny_store, dataset, run, _teacher_options(tiny_run, captions_per_image=1))


def test_the_student_trains_and_its_run_loads_and_captions(tiny_run, tiny_flickr, tiny_store, tmp_path, capsys):
    import train

    out = tmp_path / "student"
    args = ["--features", str(tiny_store), "--data", str(tiny_flickr), "--out", str(out), "--distill-from"]
    args += [str(tiny_run), "--teacher-captions", "2", "--epochs", "2", "--batch-size", "8", "--min-count", "1"]
    assert train.main([*args, "--units", "16", "--embedding-dim", "8", "--lr", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "teacher captions: 9 images in 1 chunks (0 from an earlier pass)" in printed
    assert "2 epochs in" in printed and "45 train captions (human + teacher)" in printed  # 9 x (3 + 2)
    config = json.loads((out / "config.json").read_text())
    facts = config["distillation"]
    assert facts["runs"] == [str(tiny_run)] and facts["captions_per_image"] == 2
    assert (facts["teacher_images"], facts["teacher_captions"], facts["decoding"]["beam"]) == (9, 18, 3)
    student = Captioner.load(out)
    store = open_feature_store(tiny_store)
    captions = student.caption_features(["red_3.jpg"], store.matrix(["red_3.jpg"]), DecodingOptions(beam=2))
    assert captions[0].image == "red_3.jpg" and len(captions[0].beams) == 2
    with pytest.raises(SystemExit):  # a fresh start over it is refused, as for any run
        train.main([*args, "--units", "16"])
    assert "already holds a distillation run; pass --resume" in capsys.readouterr().err


def test_a_missing_teacher_is_one_error_line(tiny_flickr, tiny_store, tmp_path, capsys):
    import train

    args = ["--features", str(tiny_store), "--data", str(tiny_flickr), "--out", str(tmp_path / "student")]
    with pytest.raises(SystemExit) as exit_info:
        train.main([*args, "--distill-from", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: teacher: {tmp_path / 'nope'}: no such run directory")


def test_a_teacher_of_another_encoder_is_one_error_line(tiny_run, tiny_flickr, tiny_store, tmp_path, capsys):
    import train

    teacher = tmp_path / "lite2_teacher"
    shutil.copytree(tiny_run, teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "encoder": "efficientnet_lite2"}))
    out = tmp_path / "student"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--features", str(tiny_store), "--data", str(tiny_flickr), "--out", str(out), "--distill-from",
                    str(teacher)])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "reads efficientnet_lite2" in err and "holds efficientnet_lite0" in err
    assert not out.exists()  # nothing written before the teacher is checked


def test_the_teacher_settings_are_checked(tiny_run):
    with pytest.raises(DistillationError, match="between 1 and the teacher's beam"):
        TeacherOptions((str(tiny_run),), captions_per_image=4, decoding=DecodingOptions(beam=3))
    with pytest.raises(DistillationError, match="at least one run"):
        TeacherOptions(())


def test_training_options_carry_over_to_the_student(tiny_run, tiny_flickr, tiny_store, tmp_path):
    options = TrainingOptions(epochs=1, batch_size=8, learning_rate=1e-2, min_count=1, limit_train=3)
    result = distil_caption_model(
        tiny_store, tiny_flickr, tmp_path / "s", _teacher_options(tiny_run), options, {"units": 8}, verbose=0
    )
    assert result.teacher.images == 3 and result.training.train_captions == 3 * (3 + 2)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["train_images"] == 3


def test_resume_after_a_killed_teacher_pass_finishes_it_then_trains(
    tiny_run, tiny_flickr, tiny_store, tmp_path, monkeypatch
):
    options = TrainingOptions(epochs=1, batch_size=8, learning_rate=1e-2, min_count=1)
    args = (tiny_store, tiny_flickr, tmp_path / "s", _teacher_options(tiny_run), options, {"units": 8})
    write_chunk = TeacherCaptions.write_chunk

    def killed_after_the_first_chunk(*args):
        write_chunk(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(TeacherCaptions, "write_chunk", killed_after_the_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        distil_caption_model(*args, verbose=0)
    monkeypatch.undo()
    assert not (tmp_path / "s" / "config.json").exists()  # no training yet
    with pytest.raises(RunDirError, match="pass --resume"):
        distil_caption_model(*args, verbose=0)
    with pytest.raises(RunDirError, match="holds a sequence-level distillation run"):
        teacher_soft_targets(tiny_store, tiny_flickr, tmp_path / "s", SoftTargetOptions((str(tiny_run),)), options,
                             "merge", resume=True)  # fmt: skip
    result = distil_caption_model(*args, resume=True, verbose=0)
    assert (result.teacher.chunks_reused, result.training.epochs_run) == (1, 1)


def test_a_sharded_store_gives_its_beam_search_captions_and_trains_the_student(
    tiny_run, tiny_flickr, tiny_store, tmp_path
):
    from features.shards import convert_store

    shards = convert_store(tiny_store, tmp_path / "shards", shard_size=4)
    options = TrainingOptions(epochs=1, batch_size=8, learning_rate=1e-2, min_count=1)
    result = distil_caption_model(
        shards.path, tiny_flickr, tmp_path / "s", _teacher_options(tiny_run), options, {"units": 8}, verbose=0
    )
    assert result.teacher.captions == _two_best_beams(Captioner.load(tiny_run), shards.path)
    assert result.training.train_captions == 9 * (3 + 2)  # the streamed batches hold the teacher's captions too


def test_an_attention_ensemble_teaches_an_attention_student_from_spatial_maps(
    tiny_attention_run, tiny_flickr, tiny_spatial_store, tmp_path
):
    # issue 22's recipe in small: attention teachers decoded together (here the same run twice), their
    # captions read from the spatial maps, and an attention student trained on them
    teacher = TeacherOptions((str(tiny_attention_run),) * 2, captions_per_image=1, decoding=DECODING, chunk_images=4)
    options = TrainingOptions(epochs=1, batch_size=8, learning_rate=1e-2, min_count=1)
    model_options = {"decoder": "attention", "cell": "gru", "units": 8, "embedding_dim": 8}
    result = distil_caption_model(
        tiny_spatial_store, tiny_flickr, tmp_path / "s", teacher, options, model_options, verbose=0
    )
    regions = open_feature_store(tiny_spatial_store).maps(TRAIN_IDS)
    alone = Captioner.load(tiny_attention_run).decode(regions, DECODING)
    assert result.teacher.captions == {
        image: [" ".join(Captioner.load(tiny_attention_run).vocabulary.decode(hypotheses[0].tokens))]
        for image, hypotheses in zip(TRAIN_IDS, alone, strict=True)
    }  # two copies of one run decode as the run alone
    assert result.training.train_captions == 9 * (3 + 1)
    assert RunDir(tmp_path / "s").read_config()["model"]["decoder"] == "attention"


# --- word level ------------------------------------------------------------------------------------
def _soft_options(tiny_run, **changes) -> SoftTargetOptions:
    return SoftTargetOptions((str(tiny_run),), **{"top_k": 3, "chunk_captions": 10, **changes})  # 27 captions


def test_the_soft_targets_are_the_teachers_top_words_at_every_position(tiny_run, tiny_flickr, tiny_store, tmp_path):
    dataset, options = open_dataset(tiny_flickr), TrainingOptions(min_count=1)
    soft = teacher_soft_targets(tiny_store, dataset, tmp_path / "s", _soft_options(tiny_run), options, "merge")
    data = prepare_caption_data(open_feature_store(tiny_store), dataset, min_count=1)
    rows, sequences = encode_captions(data.train.image_ids, data.train.captions, data.vocabulary, 99)
    assert len(soft.positions) == 27 and soft.positions.tolist() == [len(s) - 1 for s in sequences]
    teacher = Captioner.load(tiny_run).run.model
    features = open_feature_store(tiny_store).matrix(data.train.image_ids)
    for caption in (0, 13, 26):  # one of each chunk
        sequence = np.array([sequences[caption][:-1]], np.int32)
        expected = teacher.predict_on_batch({"image": features[rows[caption]][None], "words": sequence})[0]
        ids, probabilities = top_k_rows(expected, 3)
        start = soft.offsets[caption]
        np.testing.assert_array_equal(soft.word_ids[start : start + len(ids)], ids)
        np.testing.assert_allclose(soft.probabilities[start : start + len(ids)], probabilities, atol=1e-3)  # float16
    whole = teacher_soft_targets(
        tiny_store, dataset, tmp_path / "all", _soft_options(tiny_run, top_k=999), options, "merge"
    )
    assert whole.top_k == len(data.vocabulary) and np.allclose(whole.probabilities.sum(axis=1), 1, atol=1e-2)
    assert sorted(p.name for p in TeacherSoftTargets(RunDir(tmp_path / "s")).folder.iterdir()) == [
        "soft_targets.json",
        "soft_targets_00000.npz",
        "soft_targets_00001.npz",
        "soft_targets_00002.npz",
    ]


def test_a_killed_soft_target_pass_resumes_without_redoing_finished_chunks(
    tiny_run, tiny_flickr, tiny_store, tmp_path, monkeypatch
):
    dataset, options = open_dataset(tiny_flickr), TrainingOptions(min_count=1)
    args = (tiny_store, dataset, tmp_path / "s", _soft_options(tiny_run), options, "merge")
    write_chunk = TeacherSoftTargets.write_chunk

    def killed_after_the_first_chunk(self, index, *arrays):
        write_chunk(self, index, *arrays)
        raise KeyboardInterrupt

    monkeypatch.setattr(TeacherSoftTargets, "write_chunk", killed_after_the_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        teacher_soft_targets(*args, progress=False)
    monkeypatch.undo()
    files = TeacherSoftTargets(RunDir(tmp_path / "s"))
    written = files.chunk_path(0).stat().st_mtime_ns
    assert not files.chunk_path(1).exists()
    with pytest.raises(RunDirError, match="pass --resume"):
        teacher_soft_targets(*args, progress=False)
    soft = teacher_soft_targets(*args, resume=True, progress=False)
    assert files.chunk_path(0).stat().st_mtime_ns == written and files.chunk_path(2).is_file()
    whole = teacher_soft_targets(tiny_store, dataset, tmp_path / "w", *args[3:], progress=False)
    np.testing.assert_array_equal(soft.word_ids, whole.word_ids)
    with pytest.raises(DistillationError, match="top_k"):  # other settings never mix in
        teacher_soft_targets(*args[:3], _soft_options(tiny_run, top_k=4), *args[4:], resume=True, progress=False)
    with pytest.raises(RunDirError, match="holds a word-level distillation run"):  # nor the two levels
        distil_caption_model(tiny_store, dataset, tmp_path / "s", _teacher_options(tiny_run), options, resume=True)


def test_a_teacher_with_other_word_ids_reads_and_answers_in_the_students(tiny_run):
    import tensorflow as tf

    from models.distillation import TeacherMember
    from models.rundir import CaptionRun
    from pipeline.vocabulary import SPECIAL_TOKENS, Vocabulary

    teacher_words = Vocabulary([*SPECIAL_TOKENS, "dog", "cat", "red"], 1)  # ids 4, 5, 6
    student_words = Vocabulary([*SPECIAL_TOKENS, "red", "dog", "blue"], 1)  # "blue" unknown to the teacher
    read = []

    def forward(inputs):  # the teacher's model: what it read, and fixed distributions over its own words
        read.append(inputs["words"].tolist())
        return tf.constant(np.tile(np.array([0.05, 0.1, 0.05, 0.1, 0.2, 0.3, 0.2]), (1, 2, 1)))

    loaded = Captioner.load(tiny_run).run
    member = TeacherMember.of(CaptionRun(loaded.path, None, teacher_words, loaded.config), student_words)
    member.forward = forward
    out = member.probabilities(np.array([[2, 4, 6]]), {"image": np.zeros((1, 4))})
    assert read == [[[2, 6, 1]]]  # <start> red blue -> the teacher's ids
    np.testing.assert_allclose(out[0, 0], [0.05, 0.1 + 0.3, 0.05, 0.1, 0.2, 0.2, 0.0])  # cat's 0.3 -> <unk>


def test_the_word_level_student_trains_and_its_dev_loss_is_the_plain_loss(
    tiny_run, tiny_flickr, tiny_store, tmp_path, capsys
):
    import keras

    import train
    from models.training import caption_sequence

    out = tmp_path / "student"
    args = ["--features", str(tiny_store), "--data", str(tiny_flickr), "--out", str(out), "--distill-from"]
    args += [str(tiny_run), "--distill-level", "word", "--soft-top-k", "5", "--soft-weight", "0.7"]
    args += ["--epochs", "1", "--batch-size", "8", "--min-count", "1", "--units", "16", "--embedding-dim", "8"]
    assert train.main(args) == 0
    printed = capsys.readouterr().out
    assert "teacher soft targets: top 5 words at" in printed and "27 train captions with soft targets" in printed
    facts = json.loads((out / "config.json").read_text())["distillation"]
    assert (facts["level"], facts["top_k"], facts["weight"], facts["teacher_captions"]) == ("word", 5, 0.7, 27)
    run = RunDir(out)
    # dev targets are one-hot, so the logged dev loss is the usual per-word loss of the saved model
    store = open_feature_store(tiny_store)
    data = prepare_caption_data(store, open_dataset(tiny_flickr), 1, run.load().vocabulary)
    model = run.load().model
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(reduction="mean_with_sample_weight"))
    dev = caption_sequence(store, data.dev, data, 64, shuffle=False)
    inputs, targets, weights = dev[0]
    assert len(dev) == 1
    plain = model.evaluate(inputs, targets, sample_weight=weights, verbose=0)
    assert float(run.read_history()[-1]["val_loss"]) == pytest.approx(plain, rel=1e-4)
    student = Captioner.load(out)
    assert student.caption_features(["red_3.jpg"], store.matrix(["red_3.jpg"]), DECODING)[0].beams


def test_word_level_settings_are_one_error_line(tiny_run, tiny_flickr, tiny_store, tmp_path, capsys):
    import train
    from features.shards import convert_store

    base = ["--features", str(tiny_store), "--data", str(tiny_flickr), "--out", str(tmp_path / "s")]
    for extra, message in (
        (["--distill-level", "word"], "--distill-level word needs --distill-from"),
        (["--distill-from", str(tiny_run), "--distill-level", "word", "--soft-weight", "0"], "--soft-weight must be"),
        (["--distill-from", str(tiny_run), "--distill-level", "word", "--soft-top-k", "0"], "--soft-top-k must be"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            train.main([*base, *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    shards = convert_store(tiny_store, tmp_path / "shards", shard_size=4)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--features", str(shards.path), *base[2:], "--distill-from", str(tiny_run), "--distill-level",
                    "word"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "reads a pickle feature store" in err
