"""Caption readers, cleaning, vocabulary and the batch generator (issue 3)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED_FLICKR
from pipeline.batches import CaptionSequence, encode_captions, pad_batch
from pipeline.captions import (
    CaptionFileError,
    clean_caption,
    read_captions_csv,
    read_token_file,
    select_split,
)
from pipeline.datasets import Flickr8kFolder, image_sources, open_dataset
from pipeline.vocabulary import Vocabulary, VocabularyError


def test_clean_caption_exact_outputs():
    assert clean_caption("A dog, running  on the GRASS .") == ["a", "dog", "running", "on", "the", "grass"]
    assert clean_caption("Two 2 kids -- play ball!") == ["two", "kids", "play", "ball"]
    assert clean_caption("  \t ") == []


def test_token_and_csv_readers(tmp_path):
    (tmp_path / "t.txt").write_text("a.jpg#0\tA dog .\na.jpg#1\tA cat , too .\nb.jpg#0\tBird\n")
    (tmp_path / "c.txt").write_text('image,caption\na.jpg,A dog .\na.jpg,"A cat , too ."\nb.jpg,Bird\n')
    expected = {"a.jpg": ["A dog .", "A cat , too ."], "b.jpg": ["Bird"]}
    assert read_token_file(tmp_path / "t.txt") == expected
    assert read_captions_csv(tmp_path / "c.txt") == expected
    (tmp_path / "bad.txt").write_text("no tab here\n")
    with pytest.raises(CaptionFileError, match=":1:"):
        read_token_file(tmp_path / "bad.txt")
    with pytest.raises(CaptionFileError, match="header"):
        read_captions_csv(tmp_path / "t.txt")


def test_both_readers_agree_on_the_real_flickr8k_files():
    tokens = read_token_file(SHARED_FLICKR / "Flickr8k.token.txt")
    csv = read_captions_csv(SHARED_FLICKR / "captions.txt")
    assert sum(map(len, tokens.values())) == 40460 and sum(map(len, csv.values())) == 40455
    # The token file's one quirk line names no image; every real image has the same five captions.
    assert set(tokens) - set(csv) == {"2258277193_586949ec62.jpg.1"}
    assert all(tokens[k] == csv[k] for k in csv)


def test_open_dataset_detects_a_flickr8k_folder_by_token_file_or_captions_csv(tmp_path):
    (tmp_path / "Images").mkdir()
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,A dog .\n")
    only_csv = open_dataset(tmp_path)
    assert isinstance(only_csv, Flickr8kFolder) and only_csv.format_name == "flickr8k"
    assert only_csv.captions() == {"a.jpg": ["A dog ."]}
    # The token file wins when both are there.
    (tmp_path / "Flickr8k.token.txt").write_text("b.jpg#0\tA cat .\n")
    assert open_dataset(tmp_path).captions() == {"b.jpg": ["A cat ."]}


def test_open_dataset_names_what_it_expected_in_one_line(tmp_path):
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,A dog .\n")  # no Images/
    with pytest.raises(CaptionFileError) as error:
        open_dataset(tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}: not a caption dataset")
    assert message.endswith(
        "expected a Flickr8k folder (Images/ plus Flickr8k.token.txt or captions.txt), "
        "a Karpathy split JSON (images[] with filename, split and sentences[]), "
        "or a COCO captions JSON (images[] with id and file_name, annotations[] with image_id and caption) "
        "or a folder of them"
    )
    with pytest.raises(CaptionFileError, match="no such file or folder"):
        open_dataset(tmp_path / "absent")


def test_flickr8k_folder_values_on_the_tiny_fixture(tiny_flickr):
    dataset = open_dataset(tiny_flickr)
    assert dataset.root == tiny_flickr and dataset.splits == ("train", "dev", "test")
    assert dataset.image_path("red_0.jpg") == tiny_flickr / "Images" / "red_0.jpg"
    assert dataset.split_ids("dev") == ["red_3.jpg", "green_3.jpg", "blue_3.jpg"]
    assert dataset.split_ids("test") == ["missing_0.jpg"]
    assert len(dataset.split_ids("train")) == 9
    captions = dataset.captions()
    assert len(captions) == 13 and captions["missing_0.jpg"] == ["a red square"]
    assert captions["green_2.jpg"] == ["A green field with grass .", "green grass in a field", "a big green field"]
    assert dataset.captions() is captions  # read once
    sources, missing = dataset.image_sources()
    assert len(sources) == 12 and missing == ["missing_0.jpg"]
    assert sources["blue_1.jpg"] == tiny_flickr / "Images" / "blue_1.jpg"
    assert image_sources(tiny_flickr) == (sources, missing)


def test_unknown_or_missing_split_is_a_clear_error(tiny_flickr, tmp_path):
    with pytest.raises(CaptionFileError, match=r"unknown split 'val'; choose one of train, dev, test"):
        open_dataset(tiny_flickr).split_ids("val")
    (tmp_path / "Images").mkdir()
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog .\n")
    with pytest.raises(CaptionFileError, match=r"Flickr_8k\.devImages\.txt: split file missing"):
        open_dataset(tmp_path).split_ids("dev")


def test_image_sources_of_a_plain_folder_lists_its_images(tmp_path):
    from conftest import make_image

    make_image(tmp_path / "a.jpg")
    make_image(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert image_sources(tmp_path) == ({"a.jpg": tmp_path / "a.jpg", "b.png": tmp_path / "b.png"}, [])
    with pytest.raises(CaptionFileError, match="no such folder"):
        image_sources(tmp_path / "absent")


def test_split_selection_skips_and_counts_missing_ids():
    captions = {"a": ["A dog ."], "b": ["A cat ."]}
    split = select_split(captions, ["a", "b", "c"], available={"a"})
    assert split.image_ids == ["a"] and split.skipped == ["b", "c"]
    assert split.captions == {"a": [["a", "dog"]]}


def test_vocabulary_from_literal_captions(tmp_path):
    captions = [["a", "dog", "runs"], ["a", "dog"], ["a", "cat"]]
    vocabulary = Vocabulary.build(captions, min_count=2)
    assert vocabulary.words == ["<pad>", "<unk>", "<start>", "<end>", "a", "dog"]
    assert vocabulary.encode(["a", "cat", "dog"]) == [2, 4, 1, 5, 3]
    assert vocabulary.decode([4, 1, 5, 3, 4]) == ["a", "dog"]  # stops at <end>, drops specials
    vocabulary.save(tmp_path / "v.json")
    loaded = Vocabulary.load(tmp_path / "v.json")
    assert loaded.words == vocabulary.words and loaded.min_count == 2
    (tmp_path / "bad.json").write_text('{"format": "captioning-vocabulary", "version": 1, "words": ["a"]}')
    with pytest.raises(VocabularyError, match="special tokens"):
        Vocabulary.load(tmp_path / "bad.json")


def test_generator_shapes_padding_and_weights():
    vocabulary = Vocabulary.build([["a", "dog"], ["a", "red", "ball", "here"]], min_count=1)
    captions = {"x": [["a", "dog"]], "y": [["a", "red", "ball", "here"]]}
    rows, sequences = encode_captions(["x", "y"], captions, vocabulary, max_caption_length=6)
    assert rows.tolist() == [0, 1]
    # ids: a=4 (most frequent), then ball=5 dog=6 here=7 red=8 alphabetically
    assert sequences[1] == [2, 4, 8, 5, 7, 3]  # <start> a red ball here <end>
    features = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    sequence = CaptionSequence(features, rows, sequences, 6, batch_size=2, shuffle=False)
    inputs, targets, weights = sequence[0]
    assert inputs["words"].tolist() == [[2, 4, 6, 3, 0], [2, 4, 8, 5, 7]]
    assert targets.tolist() == [[4, 6, 3, 0, 0], [4, 8, 5, 7, 3]]
    assert weights.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    np.testing.assert_array_equal(inputs["image"], features)
    assert len(sequence) == 1


def test_long_captions_are_truncated_with_end_and_batches_bucketed():
    vocabulary = Vocabulary.build([["w"] * 3], min_count=1)
    _, sequences = encode_captions(["x"], {"x": [["w"] * 20]}, vocabulary, max_caption_length=10)
    assert len(sequences[0]) == 10 and sequences[0][-1] == vocabulary.end_id
    assert pad_batch([[2, 4, 3]], 40).shape == (1, 8)
    assert pad_batch([[2] * 9], 40).shape == (1, 16)
    assert pad_batch([[2] * 9], 10).shape == (1, 10)


def test_generator_reshuffles_every_epoch_and_covers_every_caption():
    rows = np.arange(10)
    sequences = [[2, 4 + i, 3] for i in range(10)]
    sequence = CaptionSequence(np.eye(10, dtype=np.float32), rows, sequences, 5, batch_size=4, seed=0)

    def epoch_order():
        return [int(t) for b in range(len(sequence)) for t in sequence[b][0]["words"][:, 1]]

    first = epoch_order()
    sequence.on_epoch_end()
    second = epoch_order()
    assert sorted(first) == sorted(second) == list(range(4, 14))
    assert first != second


def _widening_sequence(shuffle: bool = False, seed: int = 0) -> CaptionSequence:
    """Six captions in batches of two: the first two batches pad to width 8, the third to 16."""
    sequences = [[2, 4, 3], [2, 5, 3], [2, 6, 3], [2, 7, 3], [2, *range(4, 14), 3], [2, 8, 3]]
    return CaptionSequence(
        np.eye(6, 3, dtype=np.float32), np.arange(6), sequences, 20, batch_size=2, shuffle=shuffle, seed=seed
    )


def test_fit_on_the_dataset_survives_a_batch_wider_than_the_first_two():
    import keras

    from models.config import CaptionModelConfig
    from models.merge import build_merge_model
    from models.training import compile_caption_model

    sequence = _widening_sequence()
    assert [sequence[b][1].shape[1] for b in range(3)] == [7, 7, 15]
    # Keras infers a PyDataset's shapes from its first two batches; fitting on `sequence` itself
    # would fail at the third. The dataset declares the width variable.
    keras.utils.set_random_seed(0)
    model = build_merge_model(
        CaptionModelConfig(vocab_size=14, max_caption_length=20, feature_dim=3, embedding_dim=4, units=5, dropout=0.0)
    )
    compile_caption_model(model, 1e-2)
    history = model.fit(sequence.as_dataset(), validation_data=sequence.as_dataset(), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["val_loss"]).all()


def test_dataset_passes_cover_every_caption_and_reshuffle_like_epochs():
    sequence = _widening_sequence(shuffle=True, seed=1)
    dataset = sequence.as_dataset()

    def one_pass():
        return [int(t) for inputs, _, _ in dataset for t in inputs["words"][:, 1].numpy()]

    first, second = one_pass(), one_pass()
    assert sorted(first) == sorted(second) == [4, 4, 5, 6, 7, 8]
    assert first != second
