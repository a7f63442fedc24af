"""Multi-worker training on one machine: a two-worker loopback cluster against one process.

    nice -n 10 python bench/bench_distribute.py [--limit-train 3000] [--epochs 1]

The real Flickr8k features (the pickle store, converted once to shards of 512 images), the merge model
with the default recipe, teacher forcing for `--epochs` on the first `--limit-train` train images,
global batch 64 in every row, interleaved (`--repeats` rounds, each in a rotated order; the table has
each setup's mean):
- one process (`--distribute none`, batch 64, TensorFlow's default threads: both cores);
- two workers on 127.0.0.1 (`--distribute multi-worker`, 32 per replica, one intra-op thread each);
- MirroredStrategy over two logical CPUs in one process (`--distribute mirrored --cpu-devices 2`, 32 per
  replica).
Reported: the fit's seconds (as train.py prints them), optimizer steps per second, the dev loss after
the run. On 2 cores no speed-up is expected: the figure is the overhead of the distributed path.

Writes `bench/results_distribute.md`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import DEFAULT_STORE, Report, markdown_table  # noqa: E402

OUT = ROOT / "bench" / "out" / "distribute"
TIMEOUT = 3600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, default=DEFAULT_STORE, help="pickle store to convert to shards")
    parser.add_argument("--limit-train", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three setups, each round in a new order")
    return parser.parse_args(argv)


def shards_of(features: Path) -> Path:
    """Return the sharded copy of `features` (made once: 512 images a shard, float32 as the pickle)."""
    shards = OUT / "shards"
    if not (shards / "manifest.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "extract_features.py"), "--convert", str(features), "--out",
                        str(shards), "--shard-size", "512"], check=True, cwd=ROOT)  # fmt: skip
    return shards


def train_command(shards: Path, out: Path, batch: int, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--features", str(shards), "--out", str(out), "--epochs",
            str(args.epochs), "--batch-size", str(batch), "--limit-train", str(args.limit_train), *extra]  # fmt: skip


def figures(log: str, wall: float) -> dict:
    """Return the fit seconds, steps, steps/s and last dev loss from train.py's output (verbose 2)."""
    seconds = float(re.search(r"epochs in (\d+) s", log).group(1))
    steps = sum(int(n) for n in re.findall(r"^(\d+)/\1 - ", log, re.MULTILINE))
    dev_loss = float(re.findall(r"val_loss: ([0-9.]+)", log)[-1])
    return {"seconds": seconds, "wall": wall, "steps": steps, "steps_per_s": steps / seconds, "dev_loss": dev_loss}


def run_one(command: list[str], env: dict | None = None) -> dict:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return figures(result.stdout, time.perf_counter() - started)


def run_cluster(command: list[str], out: Path) -> dict:
    """Run `command` as a two-worker loopback cluster; return the chief's figures."""
    from models.distribute import loopback_tf_configs

    started, processes, logs = time.perf_counter(), [], []
    try:
        for index, tf_config in enumerate(loopback_tf_configs(2)):
            env = {**os.environ, "TF_CONFIG": tf_config, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
            extra = ["--distribute", "multi-worker", "--worker-dir", str(out.with_name(out.name + "_worker1"))]
            log = out.with_name(f"{out.name}_worker{index}.log")
            logs.append(log)
            with log.open("w") as handle:
                processes.append(subprocess.Popen([*command, *extra], stdout=handle, stderr=subprocess.STDOUT, env=env))
        codes = [p.wait(timeout=TIMEOUT) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    if codes != [0, 0]:
        raise SystemExit(f"the cluster failed ({codes}); see {logs[0]} and {logs[1]}")
    return figures(logs[0].read_text(), time.perf_counter() - started)


SETUPS = {
    "one process (`--distribute none`), batch 64": (64, ()),
    "two workers on loopback (`multi-worker`), 32 per replica": (32, ("cluster",)),
    "two logical CPUs (`mirrored --cpu-devices 2`), 32 per replica": (
        32,
        ("--distribute", "mirrored", "--cpu-devices", "2"),
    ),
}


def run_setup(name: str, shards: Path, args: argparse.Namespace, round_: int) -> dict:
    """Run one setup of SETUPS into a fresh run directory; return its figures."""
    batch, extra = SETUPS[name]
    out = OUT / f"{list(SETUPS).index(name)}_{round_}"
    for folder in (out, out.with_name(out.name + "_worker1")):
        shutil.rmtree(folder, ignore_errors=True)
    if extra == ("cluster",):
        return run_cluster(train_command(shards, out, batch, args), out)
    return run_one(train_command(shards, out, batch, args, *extra))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    shards = shards_of(args.features)
    names, runs = list(SETUPS), {name: [] for name in SETUPS}
    for round_ in range(args.repeats):
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            runs[name].append(run_setup(name, shards, args, round_))
            print(name, runs[name][-1], flush=True)
    rows = {name: {key: float(np.mean([r[key] for r in found])) for key in found[0]} for name, found in runs.items()}
    single = rows[names[0]]
    table = [[name, f"{r['seconds']:.0f} s", f"{r['steps']:.0f}", f"{r['steps_per_s']:.2f}",
              f"{r['steps_per_s'] / single['steps_per_s']:.2f}x", f"{r['dev_loss']:.4f}", f"{r['wall']:.0f} s"]
             for name, r in rows.items()]  # fmt: skip
    report = Report(
        "Training past one device on one 2-core machine (issue 19)",
        f"Merge model, Flickr8k features from shards (512 images a shard), first {args.limit_train} train images, "
        f"{args.epochs} epoch(s), global batch 64 in every row; {args.repeats} round(s), the setups interleaved "
        "(each round in a rotated order), the mean of the rounds in the table.",
        [
            markdown_table(
                ["setup", "fit", "steps", "steps/s", "vs one process", "dev loss", "wall (with start-up)"], table
            )
        ],  # fmt: skip
    )
    report.notes.append(
        "Two processes on two cores: each worker has one intra-op thread and they synchronise the gradients of "
        "every step over gRPC on loopback, so the ratio is the overhead of the multi-worker path, not a speed-up."
    )
    report.write(ROOT / "bench" / "results_distribute.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
