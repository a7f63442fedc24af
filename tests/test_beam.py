"""Feature extraction on Apache Beam (issue 19): the DirectRunner with two worker processes writes the
store the single-process extractor writes, resumes, and counts unreadable images without failing.

Two pipelines run (about 30 s each on 2 cores, most of it starting the workers), each in its own process
session, waited on with a timeout; the session (the driver and Beam's SDK worker processes) is killed in
`finally`. The tests that need a pipeline are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, SHARED_FLICKR, make_image
from features.extract import extract_features
from features.images import list_images
from features.shards import MANIFEST_FILE, ShardedStore
from features.store import FeatureStoreError

PHOTOS = 40
BAD = {"zz_empty.jpg": "empty file", "zz_text.jpg": "not an image file", "zz_truncated.jpg": "corrupt or truncated"}
TWO_WORKERS = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
COMMON = {"encoder": "efficientnet_lite0", "weights": "imagenet", "batch_size": 8, "shard_size": 16}
PIPELINE_TIMEOUT = 300  # one run of 43 images takes about 30 s on 2 cores, most of it the workers' start
TOLERANCE = 1e-5  # measured: 0.0 (the same float32 outputs, the same float16 rounding)

RUN_SCRIPT = """
import json, sys
from features.beam_extract import extract_features_beam
from features.images import list_images
folder, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sources = {path.name: path for path in list_images(folder)}
report = extract_features_beam(sources, out, **options["common"], beam_options=options["beam"])
print(json.dumps({"extracted": report.extracted, "already_present": report.already_present,
                  "failed": report.failed, "counters": report.counters}))
"""


def run_bounded(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run `python args...` from the project root in a new session; kill the session when it is done."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=PIPELINE_TIMEOUT)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the driver, and any Beam worker left behind
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
    result = subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())
    return result, time.perf_counter() - started


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of the first 40 Flickr8k photos (links) and three unreadable .jpg files."""
    folder = tmp_path_factory.mktemp("beam_photos")
    for image_id in sorted(path.name for path in (SHARED_FLICKR / "Images").iterdir())[:PHOTOS]:
        (folder / image_id).symlink_to(SHARED_FLICKR / "Images" / image_id)
    first = SHARED_FLICKR / "Images" / sorted(path.name for path in folder.iterdir())[0]
    (folder / "zz_truncated.jpg").write_bytes(first.read_bytes()[:3000])
    (folder / "zz_text.jpg").write_text("not a photo\n")
    (folder / "zz_empty.jpg").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory):
    """The single-process extractor's sharded store of the folder (it also converts the weights once)."""
    out = tmp_path_factory.mktemp("beam_reference") / "store"
    sources = {path.name: path for path in list_images(photos)}
    report = extract_features(sources, out, store_format="shards", progress=False, **COMMON)
    assert (report.extracted, sorted(report.failed)) == (PHOTOS, sorted(BAD))
    return ShardedStore.open(out)


@pytest.fixture(scope="module")
def beam_run(photos, reference, tmp_path_factory):
    """One Beam run into an empty store: (the report as JSON, the store's folder, the wall time in seconds)."""
    out = tmp_path_factory.mktemp("beam_store") / "store"
    options = json.dumps({"common": COMMON, "beam": TWO_WORKERS})
    result, seconds = run_bounded(["-c", RUN_SCRIPT, str(photos), str(out), options])
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"Beam DirectRunner, 2 worker processes, {PHOTOS + len(BAD)} files: {seconds:.1f} s")
    return json.loads(result.stdout.strip().splitlines()[-1]), out, seconds


@pytest.mark.slow
def test_every_good_photo_once_with_the_single_process_vectors(beam_run, reference):
    report, out, _ = beam_run
    store = ShardedStore.open(out)
    listed = [image_id for ids in store.shard_ids for image_id in ids]
    assert sorted(listed) == sorted(reference.image_ids()) and len(listed) == PHOTOS  # each exactly once
    assert [s.images for s in store.shards] == [16, 16, 8] and store.manifest["images"] == PHOTOS
    assert store.metadata == reference.metadata and store.vector_dtype == reference.vector_dtype == "float16"
    assert store.manifest["shard_size"] == reference.manifest["shard_size"] == 16
    ids = sorted(listed)
    difference = np.abs(store.matrix(ids) - reference.matrix(ids)).max()
    assert difference <= TOLERANCE, f"max abs difference {difference}"
    assert 0.1 < store.matrix(ids).mean() < 1.0  # ImageNet features of real photos, not zeros
    assert (report["extracted"], report["already_present"]) == (PHOTOS, 0)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_FILE] + [name for s in store.shards for name in (s.file, s.ids)]
    )  # no temporary or report file left


@pytest.mark.slow
def test_unreadable_files_are_counted_and_reported_not_fatal(beam_run):
    report, _, _ = beam_run
    assert report["counters"] == {"unreadable": 3, "extracted": PHOTOS, "shards": 3}
    assert sorted(report["failed"]) == sorted(BAD)
    for image_id, reason in report["failed"].items():
        assert image_id in reason and BAD[image_id] in reason


@pytest.mark.slow
def test_the_store_streams_like_any_sharded_store(beam_run, reference):
    _, out, _ = beam_run
    store = ShardedStore.open(out)
    ids = sorted(store.image_ids())
    chunks = list(store.chunks(ids, 12, shuffle_seed=3))
    assert [len(chunk_ids) for chunk_ids, _ in chunks] == [12, 12, 12, 4]
    streamed = dict(zip([i for c, _ in chunks for i in c], np.concatenate([v for _, v in chunks]), strict=True))
    np.testing.assert_array_equal(np.stack([streamed[i] for i in ids]), reference.matrix(ids))


@pytest.mark.slow
def test_a_second_run_extracts_nothing_and_starts_no_pipeline(beam_run, photos, monkeypatch):
    import features.beam_extract as beam_extract

    _, out, _ = beam_run
    manifest = (out / MANIFEST_FILE).read_bytes()
    monkeypatch.setattr(beam_extract, "run_pipeline", lambda *args: pytest.fail("a pipeline was started"))
    good = {path.name: path for path in list_images(photos) if path.name not in BAD}
    report = beam_extract.extract_features_beam(good, out, **COMMON, beam_options=TWO_WORKERS)
    assert (report.extracted, report.already_present, report.failed) == (0, PHOTOS, {})
    assert (out / MANIFEST_FILE).read_bytes() == manifest


@pytest.mark.slow
def test_a_store_holding_half_gains_only_the_other_half_through_the_cli(photos, reference, tmp_path):
    out = tmp_path / "store"
    first_half = {path.name: path for path in list_images(photos)[: PHOTOS // 2]}
    extract_features(first_half, out, store_format="shards", progress=False, **COMMON)
    before = {s.file: (out / s.file).read_bytes() for s in ShardedStore.open(out).shards}
    args = ["extract_features.py", "--data", str(photos), "--out", str(out), "--batch-size", "8"]
    result, _ = run_bounded([*args, "--shard-size", "16", "--beam", *TWO_WORKERS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{out}: {PHOTOS // 2} extracted" in result.stdout
    assert f"{PHOTOS // 2} already present, 3 unreadable" in result.stdout
    assert sum("  skipped " in line for line in result.stderr.splitlines()) == 3
    store = ShardedStore.open(out)
    assert [s.file for s in store.shards] == [f"shard-0000{n}.tfrecord" for n in range(4)]
    assert [s.images for s in store.shards] == [16, 4, 16, 4]  # the new half numbered after the old shards
    assert all((out / name).read_bytes() == data for name, data in before.items())  # old shards untouched
    ids = sorted(reference.image_ids())
    assert np.abs(store.matrix(ids) - reference.matrix(ids)).max() <= TOLERANCE


def test_beam_refuses_a_pickle_store_and_a_url_in_one_line(tmp_path, capsys):
    import extract_features as cli
    from features.beam_extract import extract_features_beam

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "x"), "--beam", "--store", "pickle"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--beam writes a sharded store" in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data", str(tmp_path), "--runner", "DirectRunner"])
    assert exit_info.value.code == 2 and "--runner DirectRunner (Beam's options need --beam)" in capsys.readouterr().err
    with pytest.raises(FeatureStoreError, match="a URL; --beam writes to a folder"):
        extract_features_beam({}, "gs://bucket/store")


def test_a_failed_pipeline_is_one_error_and_keeps_its_finished_shards(tmp_path, monkeypatch):
    import features.beam_extract as beam_extract

    sources = {f"{i}.jpg": make_image(tmp_path / f"{i}.jpg", (i * 40, 90, 10), noise_seed=i) for i in range(6)}
    out, original = tmp_path / "store", beam_extract.write_shard

    def write_or_fail(folder, number, records):
        if number == 1:
            raise OSError("disk full (simulated)")
        return original(folder, number, records)

    monkeypatch.setattr(beam_extract, "write_shard", write_or_fail)
    # In this process (Beam's in_memory mode): the patch reaches the DoFns, and no worker start to wait for.
    options = {"encoder": "efficientnet_lite0", "weights": None, "batch_size": 2, "shard_size": 2}
    options["beam_options"] = ["--direct_running_mode", "in_memory"]
    with pytest.raises(beam_extract.BeamPipelineError, match=r"the Beam pipeline failed: .*disk full \(simulated\)"):
        beam_extract.extract_features_beam(sources, out, **options)
    kept = ShardedStore.open(out).image_ids() if (out / MANIFEST_FILE).is_file() else set()
    assert kept.isdisjoint({"2.jpg", "3.jpg"}) and len(kept) in (0, 2, 4)  # shard 1 never written
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary or report file
    monkeypatch.setattr(beam_extract, "write_shard", original)
    report = beam_extract.extract_features_beam(sources, out, **options)
    assert (report.extracted, report.already_present) == (6 - len(kept), len(kept))
    assert ShardedStore.open(out).image_ids() == set(sources)
