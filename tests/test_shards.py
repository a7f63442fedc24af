"""The sharded feature store (issue 18): shards written once, resumable, checked, converted exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_image
from features.extract import choose_store_format, extract_features
from features.shards import (
    MANIFEST_FILE,
    ShardedStore,
    ShardWriter,
    convert_store,
)
from features.store import FeatureStore, FeatureStoreError, open_feature_store

META = {"encoder": "x", "weights": "none", "dim": 6, "spatial": True, "spatial_shape": [2, 2, 3]}


def write_store(path, count=10, shard_size=4, vector_dtype="float16", seed=0):
    """Write `count` random images (ids 0.jpg ...) in shards of `shard_size`; return (ids, vectors, maps)."""
    rng = np.random.default_rng(seed)
    ids = [f"{i}.jpg" for i in range(count)]
    vectors = rng.normal(size=(count, 6)).astype(np.float32)
    maps = rng.normal(size=(count, 2, 2, 3)).astype(np.float16)
    writer = ShardWriter(path, META, shard_size, vector_dtype)
    writer.add(ids[:3], vectors[:3], maps[:3])
    writer.add(ids[3:], vectors[3:], maps[3:])
    writer.finish()
    return ids, vectors, maps


def test_shards_manifest_and_reads_by_id(tmp_path):
    ids, vectors, maps = write_store(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / MANIFEST_FILE).read_text())
    assert (manifest["format"], manifest["version"], manifest["vector_dtype"]) == (
        "captioning-feature-shards",
        1,
        "float16",
    )
    assert manifest["metadata"] == META and manifest["images"] == 10
    assert [s["images"] for s in manifest["shards"]] == [4, 4, 2]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{n}.tfrecord" for n in range(3)]
    store = open_feature_store(tmp_path / "s")
    assert isinstance(store, ShardedStore) and not store.in_memory and store.image_ids() == set(ids)
    assert (store.dim, store.encoder, store.spatial_shape) == (6, "x", (2, 2, 3))
    wanted = ["9.jpg", "0.jpg", "5.jpg", "0.jpg"]
    rows = [9, 0, 5, 0]
    np.testing.assert_array_equal(store.matrix(wanted), vectors[rows].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(store.maps(wanted), maps[rows].astype(np.float32))
    chunks = list(store.chunks(ids[2:], 3))
    assert [len(c) for c, _ in chunks] == [3, 3, 2] and sorted(i for c, _ in chunks for i in c) == sorted(ids[2:])
    shuffled = [i for c, _ in store.chunks(ids, 3, shuffle_seed=1) for i in c]
    assert sorted(shuffled) == sorted(ids) and shuffled != [i for c, _ in store.chunks(ids, 3) for i in c]
    with pytest.raises(FeatureStoreError, match="no features for 1 image"):
        store.matrix(["0.jpg", "absent.jpg"])


def test_workers_split_the_shards_and_too_many_workers_is_an_error(tmp_path):
    write_store(tmp_path / "s")
    store = ShardedStore.open(tmp_path / "s")
    shares = [store.shard_paths(worker=w, workers=2) for w in range(2)]
    assert [[p.name for p in share] for share in shares] == [
        ["shard-00000.tfrecord", "shard-00002.tfrecord"],
        ["shard-00001.tfrecord"],
    ]
    assert [p.name for p in store.shard_paths({"5.jpg"})] == ["shard-00001.tfrecord"]  # only shards holding them
    with pytest.raises(
        FeatureStoreError, match=r"3 shard\(s\) cannot be split among 4 workers; .*--shard-size 2 or less"
    ):
        store.shard_paths(workers=4)


def _only_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: (s / MANIFEST_FILE).write_text("{oops"), "manifest.json: not valid JSON"),
        (lambda s: (s / MANIFEST_FILE).write_text('{"format": "other"}'), "not a sharded feature store manifest"),
        (lambda s: _edit_manifest(s, version=9), "format version 9, expected 1"),
        (lambda s: _edit_manifest(s, vector_dtype="int8"), "vector_dtype must be one of"),
        (lambda s: _edit_manifest(s, metadata={"dim": 6}), "metadata with encoder and dim missing"),
        (lambda s: _edit_shard(s, file="../../etc/passwd"), "names a file outside the store folder"),
        (lambda s: _edit_shard(s, images=5), "expected a list of 5 image ids"),
        (
            lambda s: (s / "shard-00001.tfrecord").unlink(),
            "shard-00001.tfrecord: shard listed in the manifest is missing",
        ),
        (lambda s: _truncate(s / "shard-00001.tfrecord"), "441 bytes, the manifest says 448 (truncated or replaced)"),
        (lambda s: (s / "shard-00000.ids.json").write_text("[1, 2"), "unreadable shard id list"),
    ],
)
def test_a_malformed_manifest_or_shard_is_one_clear_error_at_open(tmp_path, damage, message):
    write_store(tmp_path / "s", vector_dtype="float32")
    damage(tmp_path / "s")
    with pytest.raises(FeatureStoreError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        open_feature_store(tmp_path / "s")
    assert str(tmp_path / "s") in _only_line(error)


def _edit_manifest(folder, **changes):
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, **changes}))


def _edit_shard(folder, **changes):
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["shards"][1].update(changes)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def test_a_corrupt_shard_of_the_right_size_is_one_error_when_read_never_a_skip(tmp_path):
    ids, _, _ = write_store(tmp_path / "s", vector_dtype="float32")
    shard = tmp_path / "s" / "shard-00001.tfrecord"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the record's checksum no longer matches
    shard.write_bytes(bytes(data))
    store = open_feature_store(tmp_path / "s")  # the size is right: only reading finds it
    with pytest.raises(FeatureStoreError, match="a shard is corrupt or malformed") as error:
        store.matrix(ids)
    _only_line(error)
    store.matrix(["0.jpg", "9.jpg"])  # the other shards still serve their images


def test_a_record_without_its_vector_is_an_error_not_a_skip(tmp_path):
    import tensorflow as tf

    write_store(tmp_path / "s", count=4, vector_dtype="float32")
    shard = tmp_path / "s" / "shard-00000.tfrecord"
    example = tf.train.Example(features=tf.train.Features(feature={"id": _bytes(b"0.jpg")}))
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for _ in range(4):
            writer.write(example.SerializeToString())
    _edit_shard_size(tmp_path / "s", shard.stat().st_size)
    with pytest.raises(FeatureStoreError, match="corrupt or malformed"):
        open_feature_store(tmp_path / "s").matrix(["1.jpg"])


def _bytes(value):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _edit_shard_size(folder, size):
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["shards"][0]["bytes"] = size
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_pickle_and_shards_convert_both_ways_exactly(tmp_path):
    rng = np.random.default_rng(3)
    ids = [f"{i}.jpg" for i in range(7)]
    exact16 = rng.normal(size=(7, 6)).astype(np.float16).astype(np.float32)  # every value a float16
    full = rng.normal(size=(7, 6)).astype(np.float32)
    metadata = {**META, "spatial": False}
    for name, vectors, dtype in (("f16", exact16, "float16"), ("f32", full, "float32")):
        FeatureStore(metadata, dict(zip(ids, vectors, strict=True))).save(tmp_path / f"{name}.pkl")
        shards = convert_store(tmp_path / f"{name}.pkl", tmp_path / f"{name}_shards", shard_size=3)
        assert shards.vector_dtype == dtype and len(shards.shards) == 3
        back = convert_store(tmp_path / f"{name}_shards", tmp_path / f"{name}_back.pkl")
        assert back.metadata == metadata and sorted(back.features) == ids
        for image_id, vector in zip(ids, vectors, strict=True):
            assert back.features[image_id].dtype == np.float32
            np.testing.assert_array_equal(back.features[image_id], vector)
        np.testing.assert_array_equal(shards.matrix(ids), vectors)
    with pytest.raises(FeatureStoreError, match="already exists"):
        convert_store(tmp_path / "f16.pkl", tmp_path / "f16_shards")


def test_spatial_maps_convert_both_ways_exactly(tmp_path):
    ids, vectors, maps = write_store(tmp_path / "s", count=5, shard_size=2)
    pickled = convert_store(tmp_path / "s", tmp_path / "p.pkl")
    assert pickled.spatial_shape == (2, 2, 3)
    np.testing.assert_array_equal(pickled.maps(ids), maps.astype(np.float32))
    again = convert_store(tmp_path / "p.pkl", tmp_path / "s2", shard_size=2)
    np.testing.assert_array_equal(again.maps(ids[::-1]), maps[::-1].astype(np.float32))
    np.testing.assert_array_equal(again.matrix(ids), vectors.astype(np.float16).astype(np.float32))
    assert again.vector_dtype == "float16"  # float16 vectors stay float16: nothing was lost to keep


def test_extraction_into_shards_matches_the_pickle_store(tmp_path):
    sources = {f"{i}.jpg": make_image(tmp_path / f"{i}.jpg", (i * 40, 20, 0), noise_seed=i) for i in range(5)}
    common = {"encoder": "efficientnet_lite0", "weights": None, "batch_size": 2, "spatial": True, "progress": False}
    extract_features(sources, tmp_path / "p.pkl", **common)
    report = extract_features(sources, tmp_path / "shards", shard_size=2, **common)
    assert report.extracted == 5
    pickled, sharded = FeatureStore.load(tmp_path / "p.pkl"), open_feature_store(tmp_path / "shards")
    assert [s.images for s in sharded.shards] == [2, 2, 1] and sharded.vector_dtype == "float16"
    assert {k: v for k, v in sharded.metadata.items()} == pickled.metadata
    ids = sorted(sources)
    np.testing.assert_allclose(sharded.matrix(ids), pickled.matrix(ids), rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(sharded.maps(ids), pickled.maps(ids), rtol=2e-3, atol=1e-3)
    again = extract_features(sources, tmp_path / "shards", shard_size=2, **common)
    assert (again.extracted, again.already_present) == (0, 5)
    with pytest.raises(FeatureStoreError, match="existing store has encoder"):
        extract_features(sources, tmp_path / "shards", "vgg16", None, progress=False)


def extract_killed_before_listing(sources: dict, out, shard: str) -> None:
    """Extract `sources` into `out` (2 images a shard) in a process killed (os._exit) once `shard`'s file
    and ids are written, just before the manifest would list it."""
    script = (
        "import os, features.shards as s\n"
        "original = s.atomic_write_bytes\n"
        "def write(path, data):\n"
        f"    if path.name == 'manifest.json' and b'{shard}' in data: os._exit(9)\n"
        "    original(path, data)\n"
        "s.atomic_write_bytes = write\n"
        "from features.extract import extract_features\n"
        f"extract_features({sources!r}, {str(out)!r}, 'efficientnet_lite0', None, batch_size=2, progress=False,"
        " shard_size=2)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert result.returncode == 9, result.stderr.decode()[-2000:]


def test_a_kill_between_shards_resumes_from_the_finished_ones(tmp_path):
    sources = {f"{i}.jpg": str(make_image(tmp_path / f"{i}.jpg", (0, i * 30, 0))) for i in range(7)}
    out = tmp_path / "shards"
    extract_killed_before_listing(sources, out, "shard-00002")
    assert (out / "shard-00002.tfrecord").is_file()  # written, but never listed: not part of the store
    first = ShardedStore.open(out)
    assert len(first) == 4 and [s.file for s in first.shards] == ["shard-00000.tfrecord", "shard-00001.tfrecord"]
    finished = {name: (out / name).read_bytes() for name in ("shard-00000.tfrecord", "shard-00001.tfrecord")}
    kept = first.matrix(sorted(first.image_ids()))
    report = extract_features(sources, out, "efficientnet_lite0", None, batch_size=2, progress=False, shard_size=2)
    assert (report.already_present, report.extracted) == (4, 3)
    final = ShardedStore.open(out)
    assert final.image_ids() == set(sources) and [s.images for s in final.shards] == [2, 2, 2, 1]
    assert all((out / name).read_bytes() == data for name, data in finished.items())  # written once
    np.testing.assert_array_equal(final.matrix(sorted(first.image_ids())), kept)
    assert not list(out.glob(".*tmp"))


def test_a_kill_before_the_first_shard_is_listed_resumes_too(tmp_path):
    sources = {f"{i}.jpg": str(make_image(tmp_path / f"{i}.jpg", (i * 30, 0, 0))) for i in range(3)}
    out = tmp_path / "shards"
    extract_killed_before_listing(sources, out, "shard-00000")
    assert (out / "shard-00000.tfrecord").is_file() and len(ShardedStore.open(out)) == 0  # a store, still empty
    report = extract_features(sources, out, "efficientnet_lite0", None, batch_size=2, progress=False, shard_size=2)
    assert (report.already_present, report.extracted) == (0, 3)
    assert ShardedStore.open(out).image_ids() == set(sources)


def test_store_format_follows_the_request_the_path_or_the_size(tmp_path):
    assert choose_store_format(None, "auto", 8_000) == "pickle"
    assert choose_store_format(None, "auto", 123_287) == "shards"
    assert choose_store_format(tmp_path / "s.pkl", "auto", 123_287) == "pickle"
    assert choose_store_format(tmp_path / "coco_lite0", "auto", 10) == "shards"
    assert choose_store_format(tmp_path / "s.pkl", "shards", 10) == "shards"
    (tmp_path / "s.pkl").write_bytes(b"")
    with pytest.raises(FeatureStoreError, match="a pickle store is there"):
        extract_features({}, tmp_path / "s.pkl", "efficientnet_lite0", None, store_format="shards", progress=False)
    (tmp_path / "folder").mkdir()
    with pytest.raises(FeatureStoreError, match="a folder is there"):
        extract_features({}, tmp_path / "folder", "efficientnet_lite0", None, store_format="pickle", progress=False)


def test_extract_cli_writes_shards_and_converts(tmp_path, capsys):
    import extract_features as cli

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        make_image(folder / f"p{i}.jpg", (i * 50, 100, 50))
    out = tmp_path / "store"
    args = ["--data", str(folder), "--weights", "none", "--no-progress", "--shard-size", "2"]
    assert cli.main([*args, "--out", str(out), "--store", "shards"]) == 0
    assert "5 extracted" in capsys.readouterr().out
    assert [s.images for s in ShardedStore.open(out).shards] == [2, 2, 1]
    assert cli.main(["--convert", str(out), "--out", str(tmp_path / "p.pkl")]) == 0
    assert "5 images converted" in capsys.readouterr().out
    assert len(FeatureStore.load(tmp_path / "p.pkl").features) == 5
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--convert", str(tmp_path / "p.pkl"), "--out", str(out)])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--convert", str(out)])
    assert "--convert needs --out" in capsys.readouterr().err


def test_the_classifier_reads_a_sharded_store_as_it_reads_a_pickle(tmp_path, tiny_spatial_store):
    from classifier.model import head_inputs

    shards = convert_store(tiny_spatial_store, tmp_path / "shards", shard_size=5)
    pickled = FeatureStore.load(tiny_spatial_store)
    ids = ["blue_1.jpg", "red_0.jpg", "green_3.jpg"]
    for spatial in (False, True):
        expected = head_inputs(pickled, tiny_spatial_store, ids, spatial)
        got = head_inputs(shards, shards.path, ids, spatial)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    pickled.close()


def test_a_new_shard_is_numbered_after_the_highest_listed_even_with_gaps(tmp_path):
    from features.shards import finished_shard, write_shard

    store = tmp_path / "s"
    writer = ShardWriter(store, META, 2, "float32")
    assert writer.next_number == 0
    records = [(f"{i}.jpg", np.full(6, i, np.float32), np.zeros((2, 2, 3), np.float16)) for i in range(3)]
    # A Beam run numbers shards before decoding: shard 1, all of it unreadable, was never written.
    written = [write_shard(store, number, records[n : n + 1]) for n, number in ((0, 0), (1, 2))]
    assert finished_shard(store, 1) is None
    writer.add_shards([(info, [records[n][0]]) for n, info in enumerate(written)])
    assert writer.next_number == 3
    again = ShardWriter(store, META, 2, "float32")  # a later single-process run goes on after shard 2
    again.add(["2.jpg"], records[2][1][None], records[2][2][None])
    again.finish()
    reopened = ShardedStore.open(store)
    assert [s.file for s in reopened.shards] == [f"shard-0000{n}.tfrecord" for n in (0, 2, 3)]
    np.testing.assert_array_equal(reopened.matrix(["0.jpg", "1.jpg", "2.jpg"])[:, 0], [0, 1, 2])
