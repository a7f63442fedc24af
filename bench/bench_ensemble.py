"""Ensemble decoding: one traced step over all members against stepping each member on its own.

    nice -n 10 python bench/bench_ensemble.py [--model ENSEMBLE_DIR] [--images 1000] [--repeats 3]

Beam search (beam 3, the default length penalty) over the dev-split features of the project's store,
with three step functions, timed interleaved (single, project, naive) `--repeats` times; the median
of each is reported:
- **single**: the ensemble's first member alone (`MergeStepper`), for scale;
- **project**: `models.decoding.EnsembleStepper`, which runs every member's step and the mean of
  their distributions (log-sum-exp) in one traced TensorFlow call;
- **naive**: each member stepped through its own traced call, its log-probabilities brought to NumPy,
  and the mean taken there (how one would first write it; this project's first version did).
Checks that project and naive give the same captions. Writes `bench/results_ensemble.md`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import DEFAULT_DATA, DEFAULT_STORE, Report, markdown_table  # noqa: E402
from features.store import FeatureStore  # noqa: E402
from models.captioner import make_stepper  # noqa: E402
from models.decoding import EnsembleStepper  # noqa: E402
from models.rundir import DEFAULT_RUN, load_runs  # noqa: E402
from models.search import DecodingOptions, SpecialTokens, beam_search  # noqa: E402
from pipeline.datasets import open_dataset  # noqa: E402
from pipeline.vocabulary import Vocabulary  # noqa: E402

TOKENS = SpecialTokens.of(Vocabulary)
BEAM, CHUNK = 3, 500  # images decoded together, as evaluate.py does
LENGTH_PENALTY = 0.5  # the setting BENCHMARKS.md's figures were timed with


class NaiveEnsemble(EnsembleStepper):
    """The project's ensemble with its one traced step replaced: each member stepped on its own, the
    mean distribution computed in NumPy."""

    def step(self, tokens, state):
        log_probs, new_state, at = [], [], 0
        for stepper, size in zip(self.steppers, self._sizes, strict=True):
            member_log_probs, member_state = stepper.step(tokens, state[at : at + size])
            log_probs.append(member_log_probs)
            new_state += list(member_state)
            at += size
        mean = np.logaddexp.reduce(np.stack(log_probs), axis=0) - np.log(len(log_probs))
        return mean.astype(np.float32), new_state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_RUN, help="ensemble directory (default: shipped)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--features", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--images", type=int, default=1000, help="dev images decoded per timing (default 1000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_ensemble.md")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be positive")
    return args


def decode(stepper, features: np.ndarray, max_length: int) -> list[list[int]]:
    options, best = DecodingOptions(BEAM, max_length, LENGTH_PENALTY, no_repeat_ngram=0), []
    for start in range(0, len(features), CHUNK):
        for hypotheses in beam_search(stepper, features[start : start + CHUNK], options, TOKENS):
            best.append(hypotheses[0].tokens)
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = load_runs(args.model)
    if len(runs) < 2:
        print(f"error: {args.model} is a single run; pass an ensemble directory", file=sys.stderr)
        return 1
    ids = [i for i in open_dataset(args.data).split_ids("dev")][: args.images]
    features = FeatureStore.load(args.features).matrix(ids)
    max_length = max(run.model_config.max_caption_length for run in runs)
    members = [make_stepper(run) for run in runs]
    steppers = {"single": members[0], "project": EnsembleStepper(members), "naive": NaiveEnsemble(members)}
    for stepper in steppers.values():  # trace every step function before timing
        decode(stepper, features[:8], max_length)
    seconds: dict[str, list[float]] = {name: [] for name in steppers}
    captions = {}
    for _ in range(args.repeats):
        for name, stepper in steppers.items():
            started = time.perf_counter()
            captions[name] = decode(stepper, features, max_length)
            seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    same = sum(a == b for a, b in zip(captions["project"], captions["naive"], strict=True))
    rows = [
        [
            label,
            f"{median[name]:.2f}",
            ", ".join(f"{t:.2f}" for t in seconds[name]),
            f"{1000 * median[name] / len(ids):.2f}",
        ]
        for name, label in (
            ("single", "one member alone (`MergeStepper`)"),
            ("project", f"project: `EnsembleStepper`, {len(runs)} members in one traced step"),
            ("naive", f"naive: {len(runs)} members stepped apart, mean in NumPy"),
        )
    ]
    table = markdown_table(["decoder", "median s", "each repeat, s", "ms per image"], rows)
    page = Report(
        "Ensemble decoding: one traced step over all members vs stepping members apart",
        f"Beam search (beam {BEAM}, length penalty {LENGTH_PENALTY}, {CHUNK} images per batch) over "
        f"the first {len(ids)} Flickr8k dev images' stored features (`{os.path.relpath(args.features, ROOT)}`), "
        f"with `{os.path.relpath(args.model, ROOT)}` ({len(runs)} members). The three decoders were timed "
        f"interleaved, {args.repeats} times each; step functions traced before timing.",
        sections=[table],
    )
    page.notes += [
        f"**Naive / project: {median['naive'] / median['project']:.1f}x** (medians).",
        f"Project and naive give the same best caption for {same} of {len(ids)} images (the same model, "
        "computed in a different order: float rounding could in principle flip a near tie).",
        f"The ensemble costs {median['project'] / median['single']:.2f}x one member's decoding time.",
    ]
    page.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
