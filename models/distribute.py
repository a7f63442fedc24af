"""Training past one device: the `tf.distribute` strategy, who writes, and what each worker reads.

    none          the default strategy: one device (a GPU when there is one)
    mirrored      `MirroredStrategy`: every local GPU (or the CPU split into `cpu_devices` logical devices,
                  which only tests the path: it is no faster)
    multi-worker  `MultiWorkerMirroredStrategy`: one process per machine, the cluster from `TF_CONFIG`
                  (or from Slurm through TensorFlow's `SlurmClusterResolver` when there is no `TF_CONFIG`)

`--batch-size` is the batch of one replica; the global batch (what one optimizer step averages over) is
that times the replicas in sync. The learning rate is used as given for the global batch: when the
global batch grows k times, the linear rule (Goyal et al. 2017) scales `--lr` by k, which Adam
tolerates up to a few times the single-device rate (docs/training.md).

Each worker reads its own shards (worker i of n takes shards i, i+n, ...: the split of
`AutoShardPolicy.FILE`, made explicitly through `distribute_datasets_from_function` so that every worker
can count every worker's share) and every worker runs the same number of steps an epoch (its stream
repeats; an epoch is the train captions over the global batch). The dev split is read whole by every
worker, so the dev loss is the single-process one. Only the chief writes the run directory; the others
write theirs to a scratch folder.

Keras 3.15's `model.fit` fails under a multi-worker strategy (keras-team/keras issues 20585 and 20329,
tensorflow/tensorflow issue 72388), and under `MirroredStrategy` when the replicas' first batches
differ in shape; `keras_distributed_fixes` mends the two places, only while a distributed fit runs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import tensorflow as tf

DISTRIBUTE_CHOICES = ("none", "mirrored", "multi-worker")


class DistributeError(ValueError):
    """The requested distribution cannot be set up (no cluster, a malformed TF_CONFIG, a Keras it does not know)."""


@dataclass
class Replicas:
    """The strategy a run trains under, and this process's place in it."""

    strategy: tf.distribute.Strategy
    kind: str = "none"
    worker: int = 0  # this process's worker index (the chief is 0)
    workers: int = 1
    is_chief: bool = True

    @property
    def count(self) -> int:
        """Return the replicas in sync: devices on every worker together."""
        return self.strategy.num_replicas_in_sync

    @property
    def distributed(self) -> bool:
        return self.kind != "none"

    def global_batch(self, per_replica_batch: int) -> int:
        return per_replica_batch * self.count

    def describe(self, per_replica_batch: int) -> str:
        """Return one line: the strategy, the replicas and workers, the global batch."""
        return (
            f"{self.kind}: {self.count} replica(s) on {self.workers} worker(s), this is worker {self.worker}"
            f"{' (chief)' if self.is_chief else ''}; global batch {self.global_batch(per_replica_batch)} "
            f"= {per_replica_batch} per replica x {self.count}"
        )

    def to_config(self, per_replica_batch: int) -> dict:
        """Return what config.json records of the distribution."""
        return {
            "strategy": self.kind,
            "replicas": self.count,
            "workers": self.workers,
            "per_replica_batch": per_replica_batch,
            "global_batch": self.global_batch(per_replica_batch),
        }


def distribution(kind: str = "none", cpu_devices: int | None = None) -> Replicas:
    """Return the strategy of `kind` ("none", "mirrored", "multi-worker") and this process's place in it."""
    if kind == "none":
        return Replicas(tf.distribute.get_strategy())
    if kind == "mirrored":
        return Replicas(mirrored_strategy(cpu_devices), "mirrored")
    if kind == "multi-worker":
        return multi_worker()
    raise DistributeError(f"unknown distribution {kind!r}; choose one of {', '.join(DISTRIBUTE_CHOICES)}")


def mirrored_strategy(cpu_devices: int | None = None) -> tf.distribute.MirroredStrategy:
    """Return a MirroredStrategy over the local GPUs, or over `cpu_devices` logical CPUs when there is none."""
    if tf.config.list_physical_devices("GPU") or not cpu_devices:
        return tf.distribute.MirroredStrategy()
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    except RuntimeError:
        raise DistributeError(
            "the CPU can be split into logical devices only before TensorFlow starts; pass --cpu-devices to a new process"
        ) from None
    devices = [device.name for device in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())


def cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    """Return the cluster of this job: from TF_CONFIG, else from Slurm; one clear error when neither is there."""
    if "TF_CONFIG" in os.environ:
        try:
            config = json.loads(os.environ["TF_CONFIG"])
            workers = config["cluster"]["worker"] if "worker" in config["cluster"] else []
            config["task"]["type"], int(config["task"]["index"])
        except (ValueError, KeyError, TypeError) as error:
            raise DistributeError(
                f"TF_CONFIG is malformed ({type(error).__name__}: {error}); expected "
                '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}'
            ) from None
        if not workers and "chief" not in config["cluster"]:
            raise DistributeError('TF_CONFIG names no workers: expected {"cluster": {"worker": ["host:port", ...]}}')
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if "SLURM_JOB_ID" in os.environ:
        return tf.distribute.cluster_resolver.SlurmClusterResolver()
    raise DistributeError(
        "--distribute multi-worker needs a cluster: set TF_CONFIG on every worker, or launch with srun under Slurm "
        "(docs/training.md, 'Training on a cluster')"
    )


def multi_worker() -> Replicas:
    """Return a MultiWorkerMirroredStrategy over the cluster of TF_CONFIG (or Slurm), and who this process is."""
    resolver = cluster_resolver()
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    jobs = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id)
    chiefs = len(jobs.get("chief", []))
    worker = task_id + (chiefs if task_type == "worker" else 0)
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not chiefs)
    return Replicas(strategy, "multi-worker", worker, chiefs + len(jobs.get("worker", [])), is_chief)


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """Return whether `strategy` spans more than one worker (where Keras 3.15's fit needs both fixes)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()


@contextlib.contextmanager
def keras_distributed_fixes(strategy: tf.distribute.Strategy) -> Iterator[None]:
    """Mend Keras 3.15's TensorFlow trainer for `model.fit` under a distributed strategy, while in the block.

    1. `TensorFlowTrainer._maybe_symbolic_build` averages the first batch over every replica to learn
       its shapes (`strategy.reduce("MEAN", batch, axis=None)`). A multi-worker strategy cannot do
       that with per-replica batches ("Attempt to convert a value (PerReplica:{...}) ... to a
       Tensor"), and no strategy can when the replicas' batches differ in shape, as the last dev batch
       of a mirrored run can ("Inputs to operation AddN ... must have the same size and shape"); the
       shapes of this worker's first replica's batch are as good. Applied under any strategy of more
       than one replica.
    2. `reduce_per_replica` reduces the step's logs with `strategy.reduce("MEAN", value, axis=0)`,
       which fails on scalars under a multi-worker strategy ("Invalid reduction dimension 0 for input
       with 0 dimensions"); the logs (metric results, synchronised already) are averaged over replicas
       element by element, `axis=None`. Applied under a multi-worker strategy only.
    With one replica nothing changes.
    """
    if strategy.num_replicas_in_sync == 1:
        yield
        return
    from keras.src.backend.tensorflow import trainer

    if not hasattr(trainer, "reduce_per_replica") or not hasattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build"):
        import keras

        raise DistributeError(
            f"Keras {keras.__version__} is not a version the distributed-training fixes know (tested: 3.15); "
            "install the keras of requirements.txt"
        )
    original_reduce, original_build = trainer.reduce_per_replica, trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(first_local_value(self.distribute_strategy), next(batches))
                break
        return original_build(self, iterator=None, data_batch=data_batch)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    if in_multi_worker_mode(strategy):
        trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        trainer.reduce_per_replica, trainer.TensorFlowTrainer._maybe_symbolic_build = original_reduce, original_build


def first_local_value(strategy: tf.distribute.Strategy):
    """Return the function giving a distributed value's first local replica's value (others as they are)."""

    def first(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return first


def loopback_tf_configs(workers: int) -> list[str]:
    """Return the TF_CONFIG of each worker of a cluster on this machine (127.0.0.1, ports free a moment
    ago): what the tests and the benchmark start, and an example of what a real cluster sets per worker."""
    import socket

    sockets = [socket.socket() for _ in range(workers)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        hosts = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()
    return [
        json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})
        for index in range(workers)
    ]
