"""The dataset formats behind one interface (issue 18): Karpathy's split JSON and COCO's caption JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import COLOURS, SHARED_FLICKR, TINY_CAPTIONS, make_image
from pipeline.captions import CaptionFileError, read_split, read_token_file, select_split
from pipeline.datasets import (
    CocoCaptions,
    DatasetOptions,
    Flickr8kFolder,
    KarpathySplit,
    image_sources,
    open_dataset,
)


def write_karpathy_json(path: Path, captions: dict[str, list[str]], splits: dict[str, list[str]], filepath="") -> Path:
    """Write Karpathy's split JSON for the images of `splits` ({Karpathy split: ids}), in split order."""
    images, sentence_id = [], 0
    for split, ids in splits.items():
        for image_id in ids:
            sentences = []
            for raw in captions[image_id]:
                tokens = [t for t in raw.lower().replace(".", " ").split() if t.isalpha()]
                sentences.append({"tokens": tokens, "raw": raw, "imgid": len(images), "sentid": sentence_id})
                sentence_id += 1
            entry = {"filename": image_id, "imgid": len(images), "split": split, "sentences": sentences}
            images.append({"filepath": filepath, **entry} if filepath else entry)
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


def write_coco_captions(path: Path, captions: dict[str, list[str]], first_id: int = 1) -> Path:
    """Write a COCO captions file: info, images[] (id, file_name), licenses, annotations[] as COCO orders them."""
    images = [{"id": first_id + k, "file_name": name, "width": 64, "height": 48} for k, name in enumerate(captions)]
    ids = {image["file_name"]: image["id"] for image in images}
    annotations = [
        {"image_id": ids[name], "id": 1000 * ids[name] + n, "caption": caption}
        for name, texts in captions.items()
        for n, caption in enumerate(texts)
    ]
    annotations.reverse()  # COCO's annotations are not grouped by image; the reader must not depend on it
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"info": {"year": 2014}, "images": images, "licenses": [], "annotations": annotations}
    path.write_text(json.dumps(payload))
    return path


def write_coco_set(root: Path, per_colour_train: int = 8, per_colour_val: int = 3) -> Path:
    """A COCO-layout folder: annotations/captions_{train,val}2014.json, train2014/ and val2014/ images."""
    splits = {"train2014": {}, "val2014": {}}
    for colour, texts in TINY_CAPTIONS.items():
        for k in range(per_colour_train + per_colour_val):
            folder = "train2014" if k < per_colour_train else "val2014"
            name = f"COCO_{folder}_{colour}{k:03d}.jpg"
            (root / folder).mkdir(parents=True, exist_ok=True)
            make_image(root / folder / name, COLOURS[colour], noise_seed=k)
            splits[folder][name] = texts
    write_coco_captions(root / "annotations" / "captions_train2014.json", splits["train2014"])
    write_coco_captions(root / "annotations" / "captions_val2014.json", splits["val2014"], first_id=5000)
    return root


def test_a_karpathy_json_of_flickr8k_gives_the_token_files_train_and_dev_captions(tmp_path):
    tokens = read_token_file(SHARED_FLICKR / "Flickr8k.token.txt")
    names = {"train": "train", "val": "dev", "test": "test"}
    splits = {k: read_split(SHARED_FLICKR / f"Flickr_8k.{v}Images.txt") for k, v in names.items()}
    path = write_karpathy_json(tmp_path / "dataset_flickr8k.json", tokens, splits)
    karpathy = open_dataset(path, DatasetOptions(images=SHARED_FLICKR / "Images"))
    flickr = open_dataset(SHARED_FLICKR)
    assert isinstance(karpathy, KarpathySplit) and isinstance(flickr, Flickr8kFolder)
    for split in ("train", "dev", "test"):
        assert karpathy.split_ids(split) == flickr.split_ids(split), split
        ours = select_split(karpathy.captions(), karpathy.split_ids(split), None)
        theirs = select_split(flickr.captions(), flickr.split_ids(split), None)
        assert ours == theirs, split
    assert len(karpathy.split_ids("train")) == 6000 and len(karpathy.split_ids("dev")) == 1000
    assert karpathy.split_ids("val") == karpathy.split_ids("dev")
    first = karpathy.split_ids("train")[0]
    assert karpathy.image_path(first) == flickr.image_path(first)
    assert karpathy.image_sources()[0] == flickr.image_sources()[0]  # the same files to encode


def test_karpathy_restval_trains_by_default_and_a_flag_keeps_it_out(tmp_path):
    captions = {f"{k}.jpg": [f"a dog number {k} ."] for k in range(6)}
    splits = {"train": ["0.jpg", "1.jpg"], "restval": ["2.jpg", "3.jpg"], "val": ["4.jpg"], "test": ["5.jpg"]}
    path = write_karpathy_json(tmp_path / "dataset_coco.json", captions, splits, filepath="val2014")
    dataset = open_dataset(path)
    assert dataset.format_name == "karpathy"
    assert dataset.splits == ("train", "dev", "test", "val", "restval")
    assert dataset.split_ids("train") == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert dataset.split_ids("dev") == ["4.jpg"] and dataset.split_ids("test") == ["5.jpg"]
    assert dataset.split_ids("restval") == ["2.jpg", "3.jpg"]
    assert dataset.image_path("4.jpg") == tmp_path / "val2014" / "4.jpg"  # root/filepath/filename
    assert dataset.run_facts() == {"data": str(path), "data_format": "karpathy", "restval_in_train": True}
    strict = open_dataset(path, DatasetOptions(images=tmp_path, restval_in_train=False))
    assert strict.split_ids("train") == ["0.jpg", "1.jpg"]
    assert strict.run_facts()["restval_in_train"] is False and strict.run_facts()["data_images"] == str(tmp_path)
    with pytest.raises(CaptionFileError, match=r"unknown split 'validation'; choose one of train, dev, test, val"):
        dataset.split_ids("validation")


def test_coco_captions_folder_and_single_file(tmp_path):
    root = write_coco_set(tmp_path / "coco", per_colour_train=2, per_colour_val=1)
    dataset = open_dataset(root)
    assert isinstance(dataset, CocoCaptions) and dataset.splits == ("train", "dev", "val")
    assert dataset.split_ids("train") == [f"COCO_train2014_{c}{k:03d}.jpg" for c in TINY_CAPTIONS for k in range(2)]
    assert dataset.split_ids("dev") == dataset.split_ids("val") == [f"COCO_val2014_{c}002.jpg" for c in TINY_CAPTIONS]
    # Captions come back in annotation-id order per image, whatever order the annotations are listed in.
    assert dataset.captions()["COCO_train2014_red001.jpg"] == TINY_CAPTIONS["red"][::-1]
    assert dataset.image_path("COCO_val2014_blue002.jpg") == root / "val2014" / "COCO_val2014_blue002.jpg"
    sources, missing = image_sources(root)
    assert len(sources) == 9 and missing == [] and all(path.is_file() for path in sources.values())
    # One file is one split; its images are found in the sub-folder named after it.
    val = open_dataset(root / "annotations" / "captions_val2014.json")
    assert val.format_name == "coco" and val.splits == ("dev", "val") and len(val.split_ids("dev")) == 3
    assert val.image_path("COCO_val2014_red002.jpg").is_file()
    with pytest.raises(CaptionFileError, match="unknown split 'train'; choose one of dev, val"):
        val.split_ids("train")
    # --images moves the image root; the sub-folder rule still applies under it.
    moved = open_dataset(root / "annotations", DatasetOptions(images=root))
    assert moved.image_path("COCO_train2014_red000.jpg") == root / "train2014" / "COCO_train2014_red000.jpg"


def test_coco_captions_as_coco_orders_them(tmp_path):
    path = write_coco_captions(tmp_path / "captions_train2017.json", {"b.jpg": ["one", "two"], "a.jpg": ["three"]})
    dataset = open_dataset(path)
    assert dataset.split_ids("train") == ["b.jpg", "a.jpg"]
    assert dataset.captions() == {"a.jpg": ["three"], "b.jpg": ["two", "one"]}
    assert dataset.image_path("a.jpg") == tmp_path / "a.jpg"  # no train2017/ folder: the JSON's folder


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.json", "{not json", "not a caption dataset; expected a Flickr8k folder"),
        ("x.json", json.dumps({"items": []}), ", a Karpathy split JSON"),
        ("k.json", '{"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}', r"images\[0\] needs"),
        ("k.json", '{"images": [{"filename": "a.jpg", "split": "val", "sentences": [3]}]}', "without raw text"),
        ("k.json", '{"images": [{"sentences": []}, ', "not valid JSON"),
        ("c.json", '{"images": [{"id": 1, "file_name": "a.jpg"}]}', "no annotations"),
        ("c.json", '{"images": [], "annotations": [{"image_id": 7, "caption": "x"}]}', "names image_id 7"),
        ("c.json", '{"images": [{"file_name": "a.jpg"}], "annotations": []}', r"images\[0\] needs an id"),
        (
            "k.json",
            '{"images": [{"filename": "a.jpg", "split": "val", "sentences": []}, '
            '{"filename": "a.jpg", "split": "test", "sentences": []}]}',
            "listed twice",
        ),
    ],
)
def test_a_malformed_or_unknown_json_is_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CaptionFileError, match=message) as error:
        dataset = open_dataset(path)
        dataset.split_ids(dataset.splits[0])
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_an_image_root_that_is_not_there_is_named(tmp_path):
    path = write_karpathy_json(tmp_path / "d.json", {"a.jpg": ["a dog"]}, {"train": ["a.jpg"]})
    with pytest.raises(CaptionFileError, match=r"absent: no such image folder \(--images\)"):
        open_dataset(path, DatasetOptions(images=tmp_path / "absent"))


# ---- mirrored train images (--mirror, issue 22) ----


def test_mirror_caption_swaps_left_and_right_as_whole_words_only():
    from pipeline.captions import mirror_caption

    assert (
        mirror_caption("A dog on the left turns Right , RIGHT-handed") == "A dog on the right turns Left , LEFT-handed"
    )
    assert mirror_caption("a bright leftover copyright") == "a bright leftover copyright"


def test_a_mirrored_dataset_adds_each_train_images_mirror_after_it(tiny_flickr):
    plain = open_dataset(tiny_flickr)
    mirrored = open_dataset(tiny_flickr, DatasetOptions(mirror_train=True))
    train = plain.split_ids("train")
    assert mirrored.split_ids("train")[:4] == [train[0], f"{train[0]}#flip", train[1], f"{train[1]}#flip"]
    assert len(mirrored.split_ids("train")) == 2 * len(train) == 18
    assert mirrored.split_ids("dev") == plain.split_ids("dev")
    assert f"{plain.split_ids('dev')[0]}#flip" not in mirrored.captions()  # only train is mirrored
    assert mirrored.image_path("red_0.jpg#flip") == plain.image_path("red_0.jpg")
    assert mirrored.run_facts() == {**plain.run_facts(), "mirror_train": True}
    sources, _ = image_sources(tiny_flickr, DatasetOptions(mirror_train=True))
    assert sources["red_0.jpg#flip"] == sources["red_0.jpg"] and "red_3.jpg#flip" not in sources
    with pytest.raises(CaptionFileError, match="needs a caption dataset"):
        image_sources(tiny_flickr / "Images", DatasetOptions(mirror_train=True))  # a plain folder has no train split


def test_a_mirror_images_captions_swap_sides(tmp_path):
    root = tmp_path / "flickr"
    (root / "Images").mkdir(parents=True)
    make_image(root / "Images" / "a.jpg")
    (root / "Flickr8k.token.txt").write_text("a.jpg#0\tA man on the left .\na.jpg#1\tTwo dogs\n")
    (root / "Flickr_8k.trainImages.txt").write_text("a.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("")
    captions = open_dataset(root, DatasetOptions(mirror_train=True)).captions()
    assert captions["a.jpg#flip"] == ["A man on the right .", "Two dogs"]
    assert captions["a.jpg"] == ["A man on the left .", "Two dogs"]


def test_extraction_and_training_with_mirror(tiny_flickr, tiny_store, tmp_path, capsys):
    """extract_features.py --mirror stores each train image's mirror as that mirror image's features;
    train.py --mirror trains on twice the images with the plain run's vocabulary, and refuses a store
    without mirrors."""
    from PIL import Image, ImageOps

    import extract_features
    import train
    from features.store import open_feature_store

    store = tmp_path / "mirrored.pkl"
    argv = ["--data", str(tiny_flickr), "--out", str(store), "--no-progress", "--mirror"]  # ImageNet weights
    assert extract_features.main(argv) == 0
    assert "21 extracted" in capsys.readouterr().out  # 9 train images and their 9 mirrors, 3 dev images
    features = open_feature_store(store).features
    assert len(features) == 21 and "red_3.jpg#flip" not in features

    # The same encoder on a mirrored copy of the file gives the mirror's vector; the image's own differs.
    mirror_folder = tmp_path / "mirror_files"
    mirror_folder.mkdir()
    ImageOps.mirror(Image.open(tiny_flickr / "Images" / "red_0.jpg")).save(mirror_folder / "red_0.png")
    assert extract_features.main(["--data", str(mirror_folder), "--out", str(tmp_path / "m.pkl")]) == 0
    copy = open_feature_store(tmp_path / "m.pkl").features["red_0.png"]
    assert np.abs(features["red_0.jpg#flip"] - copy).max() < 1e-3 * np.abs(copy).max()
    assert np.abs(features["red_0.jpg#flip"] - features["red_0.jpg"]).max() > 0.05 * np.abs(copy).max()

    common = ["--features", str(store), "--data", str(tiny_flickr), "--epochs", "1", "--batch-size", "8"]
    common += ["--units", "8", "--embedding-dim", "4", "--min-count", "4"]  # words of 3 captions: 6 with mirrors
    assert train.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert train.main([*common, "--out", str(tmp_path / "mirrored"), "--mirror"]) == 0
    config = json.loads((tmp_path / "mirrored" / "config.json").read_text())
    assert config["train_images"] == 18 and config["mirror_train"] is True
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["train_images"] == 9
    vocabulary = (tmp_path / "mirrored" / "vocabulary.json").read_text()
    assert vocabulary == (tmp_path / "plain" / "vocabulary.json").read_text() and '"square"' not in vocabulary
    critical = ["--self-critical", str(tmp_path / "plain"), "--features", str(store), "--data", str(tiny_flickr)]
    critical += ["--epochs", "1", "--batch-images", "6", "--samples", "2", "--out", str(tmp_path / "critical")]
    assert train.main([*critical, "--mirror"]) == 0
    config = json.loads((tmp_path / "critical" / "config.json").read_text())
    assert config["train_images"] == 18 and config["self_critical"]["mirror_train"] is True
    assert "mirror_train" not in config  # teacher forcing, the plain run's stage, read no mirrors
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(
            ["--features", str(tiny_store), "--data", str(tiny_flickr), "--mirror", "--out", str(tmp_path / "r")]
        )
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "extract_features.py --mirror" in error and len(error.splitlines()) == 1


def test_mirror_with_beam_is_one_error_line(tiny_flickr, tmp_path, capsys):
    import extract_features

    with pytest.raises(SystemExit) as exit_info:
        extract_features.main(["--data", str(tiny_flickr), "--out", str(tmp_path / "s"), "--beam", "--mirror"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--mirror runs without --beam" in error and len(error.splitlines()) == 1
