"""A COCO-format set of a few dozen images end to end (issue 18): extract -> train -> evaluate -> infer,
through the command-line faces, on a sharded feature store; and a Karpathy split of the same images."""

from __future__ import annotations

import json

import pytest
from test_datasets import write_coco_set, write_karpathy_json

from features.shards import ShardedStore


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """33 images: annotations/captions_{train,val}2014.json, train2014/ (24) and val2014/ (9)."""
    return write_coco_set(tmp_path_factory.mktemp("coco"), per_colour_train=8, per_colour_val=3)


def test_coco_extract_train_evaluate_infer(coco, tmp_path, capsys):
    import evaluate
    import extract_features
    import infer
    import train

    shards, run = tmp_path / "coco_shards", tmp_path / "run"
    assert extract_features.main(["--data", str(coco), "--weights", "none", "--out", str(shards), "--shard-size", "8",
                                  "--no-progress"]) == 0  # fmt: skip
    assert "33 extracted" in capsys.readouterr().out
    assert [s.images for s in ShardedStore.open(shards).shards] == [8, 8, 8, 8, 1]
    model = ["--units", "16", "--embedding-dim", "8", "--min-count", "1", "--batch-size", "8", "--lr", "0.01"]
    assert train.main(["--features", str(shards), "--data", str(coco), "--out", str(run), "--epochs", "1", *model]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["data_format"], config["train_images"], config["dev_images"]) == ("coco", 24, 9)
    capsys.readouterr()
    report = tmp_path / "report.json"
    args = ["--model", str(run), "--data", str(coco), "--split", "dev", "--features", str(shards), "--beam", "2"]
    assert evaluate.main([*args, "--json", str(report)]) == 0
    assert "9 images captioned, 0 missing on disk" in capsys.readouterr().out
    scored = json.loads(report.read_text())
    assert len(scored["captions"]) == 9 and 0 <= scored["metrics"]["CIDEr"]
    assert scored["captions"][0]["image"].startswith("COCO_val2014_")
    photo = coco / "val2014" / "COCO_val2014_red010.jpg"
    assert infer.main([str(photo), "--model", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["image"] == str(photo) and result["caption"]


def test_a_karpathy_split_of_the_coco_images_trains_with_restval(coco, tmp_path):
    from features.extract import extract_features
    from models.training import prepare_caption_data
    from pipeline.datasets import DatasetOptions, open_dataset

    captions = open_dataset(coco).captions()
    train = sorted(i for i in captions if "train2014" in i)
    val = sorted(i for i in captions if "val2014" in i)
    splits = {"train": train[:12], "restval": train[12:], "val": val[:5], "test": val[5:]}
    path = write_karpathy_json(tmp_path / "dataset_coco.json", captions, {})
    images = [
        {
            "filepath": name.split("_")[1],
            "filename": name,
            "split": split,
            "sentences": [{"raw": c} for c in captions[name]],
        }
        for split, names in splits.items()
        for name in names
    ]
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    dataset = open_dataset(path, DatasetOptions(images=coco))
    sources, missing = dataset.image_sources()
    assert len(sources) == 33 and missing == []
    extract_features(sources, tmp_path / "shards", "efficientnet_lite0", None, progress=False, shard_size=10)
    store = ShardedStore.open(tmp_path / "shards")
    data = prepare_caption_data(store, dataset, min_count=1)
    assert (len(data.train.image_ids), len(data.dev.image_ids)) == (24, 5)
    strict = open_dataset(path, DatasetOptions(images=coco, restval_in_train=False))
    assert len(prepare_caption_data(store, strict, min_count=1).train.image_ids) == 12
