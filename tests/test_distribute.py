"""Training past one device (issue 19): two workers on a loopback cluster, their restart from a backup,
and MirroredStrategy over two logical CPUs, each against single-process training on the same data.

Every process here is `python train.py` with one intra-op thread, on 127.0.0.1 ports that were free a
moment before, waited on with a timeout and killed in `finally`.

The data make distributed and single-process training comparable step for step: every caption has
the same number of words (so a replica's mean loss over its words, averaged over replicas, is the
mean over all words), each worker's shard holds exactly one per-replica batch of captions (so a
global batch is the whole train split in both cases, whatever the shuffle), and dropout is off.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from features.encoders import get_encoder_spec
from features.shards import ShardWriter
from models.distribute import loopback_tf_configs

PROJECT = Path(__file__).resolve().parent.parent
WORDS = ["a", "dog", "cat", "runs", "jumps", "on", "the", "grass", "red", "ball", "in", "park", "big", "small"]
TRAIN_PER_WORKER, DEV_IMAGES, CAPTIONS = 8, 4, 5  # 8 images x 5 captions = one batch of 40 a worker
PER_REPLICA_BATCH = TRAIN_PER_WORKER * CAPTIONS
# Adam with ulp-level differences between one process and two (reduction order) stays within this.
WEIGHT_TOLERANCE = 1e-5
WORKER_TIMEOUT = 240  # seconds a training process may take (TensorFlow starts in about 10 s here)
EPOCHS = 12  # of the run that is killed and restarted (an epoch takes about 2 s on 2 busy cores)


@pytest.fixture(scope="module")
def cluster_data(tmp_path_factory):
    """A Karpathy split JSON (16 train images, 4 dev; 5 captions of 6 words each) and a sharded store
    of random 16-d vectors: shard 0 and shard 1 hold 8 train images each, shard 2 the dev images."""
    folder = tmp_path_factory.mktemp("cluster")
    rng = np.random.default_rng(0)
    train = [f"train{i:02d}.jpg" for i in range(2 * TRAIN_PER_WORKER)]
    dev = [f"dev{i:02d}.jpg" for i in range(DEV_IMAGES)]
    images = [
        {
            "filename": name,
            "filepath": "images",
            "split": "train" if name in train else "val",
            "sentences": [{"raw": " ".join(rng.choice(WORDS, 6))} for _ in range(CAPTIONS)],
        }
        for name in train + dev
    ]
    (folder / "dataset_synthetic.json").write_text(json.dumps({"dataset": "synthetic", "images": images}))
    metadata = {**get_encoder_spec("efficientnet_lite0").metadata(), "dim": 16, "weights": "none", "spatial": False}
    writer = ShardWriter(folder / "shards", metadata, 8)
    writer.add(train + dev, rng.normal(size=(len(train) + len(dev), 16)).astype(np.float16))
    writer.finish()
    return folder / "dataset_synthetic.json", folder / "shards"


def train_command(data: Path, store: Path, out: Path, batch_size: int, epochs: int, *extra: str) -> list[str]:
    model = ["--units", "16", "--embedding-dim", "8", "--dropout", "0", "--min-count", "1", "--lr", "0.01"]
    return [sys.executable, str(PROJECT / "train.py"), "--data", str(data), "--features", str(store),
            "--out", str(out), "--batch-size", str(batch_size), "--epochs", str(epochs), *model, *extra]  # fmt: skip


def one_thread_env(tf_config: str | None = None) -> dict:
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config
    return env


def start_workers(command: list[str], logs: Path, worker_dirs: list[Path]) -> list[subprocess.Popen]:
    """Start a two-worker cluster on loopback: worker 0 (the chief) and worker 1, each logging to a file."""
    processes = []
    for index, (worker_dir, tf_config) in enumerate(zip(worker_dirs, loopback_tf_configs(2), strict=True)):
        env = one_thread_env(tf_config)
        log = (logs / f"worker{index}.log").open("a")
        extra = ["--distribute", "multi-worker", "--worker-dir", str(worker_dir)]
        processes.append(
            subprocess.Popen([*command, *extra], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT)
        )
    return processes


def wait_all(processes: list[subprocess.Popen], timeout: float = WORKER_TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in processes]


def kill_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def run_process(command: list[str]) -> subprocess.CompletedProcess:
    """Run one training process with one thread, bounded by WORKER_TIMEOUT; return what it did."""
    return subprocess.run(
        command, env=one_thread_env(), capture_output=True, text=True, timeout=WORKER_TIMEOUT, cwd=PROJECT
    )


def run_single(command: list[str]) -> None:
    result = run_process(command)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def checkpoint_weights(run: Path) -> list[np.ndarray]:
    import keras

    import models.merge  # noqa: F401  (registers the merge decoder's layers)

    return keras.saving.load_model(run / "last_epoch.keras", compile=False).get_weights()


def max_difference(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    assert [w.shape for w in first] == [w.shape for w in second]
    return max(float(np.max(np.abs(a - b))) for a, b in zip(first, second, strict=True))


def test_two_workers_train_like_one_process_with_the_same_global_batch(cluster_data, tmp_path):
    data, store = cluster_data
    chief, other = tmp_path / "cluster_run", tmp_path / "worker1"
    processes = start_workers(train_command(data, store, chief, PER_REPLICA_BATCH, 2), tmp_path, [chief, other])
    try:
        codes = wait_all(processes)
    finally:
        kill_all(processes)
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "global batch 80 = 40 per replica x 2" in logs[0]
    config = json.loads((chief / "config.json").read_text())
    assert config["distribution"] == {"strategy": "multi-worker", "replicas": 2, "workers": 2,
                                      "per_replica_batch": 40, "global_batch": 80}  # fmt: skip
    assert (chief / "model.keras").is_file() and not (chief / ".backup").exists()
    single = tmp_path / "single_run"
    run_single(train_command(data, store, single, 2 * PER_REPLICA_BATCH, 2))
    chief_weights = checkpoint_weights(chief)
    assert max_difference(chief_weights, checkpoint_weights(other)) == 0.0  # the workers hold one model
    assert max_difference(chief_weights, checkpoint_weights(single)) < WEIGHT_TOLERANCE
    history = (chief / "history.csv").read_text().splitlines()[1:]
    single_history = (single / "history.csv").read_text().splitlines()[1:]
    assert len(history) == len(single_history) == 2
    for ours, theirs in zip(history, single_history, strict=True):
        np.testing.assert_allclose(
            [float(v) for v in ours.split(",")], [float(v) for v in theirs.split(",")], rtol=1e-5, atol=1e-6
        )


def backed_up_epoch(metadata: Path) -> int:
    """Return the epoch in BackupAndRestore's metadata file, -1 while there is none (or it is being written)."""
    try:
        return int(json.loads(metadata.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return -1


def test_a_killed_worker_and_a_restarted_cluster_continue_from_the_backup(cluster_data, tmp_path):
    data, store = cluster_data
    chief, other = tmp_path / "cluster_run", tmp_path / "worker1"
    command = train_command(data, store, chief, PER_REPLICA_BATCH, EPOCHS, "--patience", "100")
    processes = start_workers(command, tmp_path, [chief, other])
    try:
        backup = chief / ".backup" / "training_metadata.json"
        deadline = time.monotonic() + WORKER_TIMEOUT
        while time.monotonic() < deadline and backed_up_epoch(backup) < 2:
            assert all(p.poll() is None for p in processes), "a worker stopped before it was killed"
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGKILL)  # worker 1 dies mid-run; the chief cannot go on without it
        processes[1].wait(timeout=30)
        processes[0].kill()
        processes[0].wait(timeout=30)
    finally:
        kill_all(processes)
    killed_at = backed_up_epoch(backup)
    assert 2 <= killed_at < EPOCHS
    processes = start_workers(command, tmp_path, [chief, other])  # the same command, again
    try:
        codes = wait_all(processes)
    finally:
        kill_all(processes)
    log = (tmp_path / "worker0.log").read_text()
    assert codes == [0, 0], log[-3000:]
    restored = int(log.split("continuing from the backup at epoch ")[1].split()[0])
    assert restored >= killed_at
    epochs = [int(row.split(",")[0]) for row in (chief / "history.csv").read_text().splitlines()[1:]]
    assert epochs == list(range(EPOCHS))  # every epoch once: none lost, none run twice in the history
    assert not (chief / ".backup").exists()


def test_mirrored_on_two_logical_cpus_trains_like_one_device(cluster_data, tmp_path):
    data, store = cluster_data
    mirrored, single = tmp_path / "mirrored", tmp_path / "single"
    command = train_command(
        data, store, mirrored, PER_REPLICA_BATCH, 2, "--distribute", "mirrored", "--cpu-devices", "2"
    )
    result = run_process(command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mirrored: 2 replica(s) on 1 worker(s), this is worker 0 (chief); global batch 80" in result.stdout
    run_single(train_command(data, store, single, 2 * PER_REPLICA_BATCH, 2))
    assert max_difference(checkpoint_weights(mirrored), checkpoint_weights(single)) < WEIGHT_TOLERANCE


def test_multi_worker_without_a_cluster_is_one_clear_error(cluster_data, tmp_path):
    data, store = cluster_data
    command = train_command(data, store, tmp_path / "run", 8, 1, "--distribute", "multi-worker")
    result = run_process(command)
    assert result.returncode != 0
    assert "needs a cluster: set TF_CONFIG on every worker" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_malformed_tf_config_is_one_clear_error(monkeypatch):
    from models.distribute import DistributeError, cluster_resolver

    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}}')  # no "task"
    with pytest.raises(DistributeError, match="TF_CONFIG is malformed .*KeyError: 'task'"):
        cluster_resolver()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(DistributeError, match="TF_CONFIG is malformed"):
        cluster_resolver()
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(DistributeError, match="needs a cluster"):
        cluster_resolver()


def test_the_keras_fixes_apply_only_while_a_distributed_fit_runs():
    from types import SimpleNamespace

    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    from models.distribute import keras_distributed_fixes

    reduce, build = trainer.reduce_per_replica, trainer.TensorFlowTrainer._maybe_symbolic_build
    with keras_distributed_fixes(tf.distribute.get_strategy()):  # one replica: nothing changes
        assert (trainer.reduce_per_replica, trainer.TensorFlowTrainer._maybe_symbolic_build) == (reduce, build)
    two_local_replicas = SimpleNamespace(num_replicas_in_sync=2)  # mirrored: only the shape-building fix
    with keras_distributed_fixes(two_local_replicas):
        assert trainer.TensorFlowTrainer._maybe_symbolic_build is not build
        assert trainer.reduce_per_replica is reduce
    assert (trainer.reduce_per_replica, trainer.TensorFlowTrainer._maybe_symbolic_build) == (reduce, build)


def test_a_backup_lets_only_a_distributed_rerun_continue(tmp_path):
    from models.rundir import BACKUP_DIR, STATE_FILE, RunDir, RunDirError

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / STATE_FILE).write_text('{"epochs_done": 3}')
    (run.path / BACKUP_DIR).mkdir()
    (run.path / BACKUP_DIR / "training_metadata.json").write_text('{"epoch": 4, "batch": 0}')
    assert run.backup_epoch() == 4
    run.check_start(resume=False, distributed=True)  # the same command again: continues from the backup
    with pytest.raises(RunDirError, match="already holds a training run"):
        run.check_start(resume=False)  # a single-process start would overwrite the run
    (run.path / BACKUP_DIR / "training_metadata.json").write_text("{half written")
    with pytest.raises(RunDirError, match="unreadable backup state"):
        run.backup_epoch()
