"""Size and decoding speed of whole models side by side: the shipped pair, an ensemble, one distilled run.

    nice -n 10 python bench/bench_models.py --model shipped=pretrained/flickr8k_merge_lite0 \\
        --model ensemble=runs/a,runs/b,... --model distilled=runs/kd [--images 1000] [--repeats 3] [--beam 3]

Each `--model NAME=PATH[,PATH...]` is loaded as `infer.py --model PATH --model ...` loads it (run or
ensemble directories, decoded together as one model). Every model captions the same first `--images`
dev images from the stored features (`--features`: vectors for merge members, spatial maps when a
member attends), 500 images per batch as `evaluate.py` does, with the decoding defaults
(`models.search.DecodingOptions`: length penalty 1, trigram block) and `--beam`. The models are timed
interleaved, `--repeats` times each after one untimed warm-up batch, and the median is reported with
each model's members, parameters and weight files (`model.keras`, no optimizer state). Decoding time
depends on the architecture and the number of members, not on the weights' values. Writes
`bench/results_models.md` (or `--out`).
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
from models.captioner import Captioner  # noqa: E402
from models.evaluation import DECODE_CHUNK, stored_features  # noqa: E402
from models.rundir import MODEL_FILE  # noqa: E402
from models.search import DecodingOptions  # noqa: E402
from pipeline.datasets import open_dataset  # noqa: E402


def named_model(text: str) -> tuple[str, list[str]]:
    name, sep, paths = text.partition("=")
    if not sep or not name or not paths:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[,PATH...], got {text!r}")
    return name, paths.split(",")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=named_model, action="append", required=True, help="NAME=PATH[,PATH...]")
    parser.add_argument("--reference", help="the model the others are compared with (default: most members)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--features", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--images", type=int, default=1000, help="dev images decoded per timing (default 1000)")
    parser.add_argument("--beam", type=int, default=DecodingOptions().beam)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_models.md")
    args = parser.parse_args(argv)
    names = [name for name, _ in args.model]
    if len(set(names)) != len(names):
        parser.error("each --model needs its own NAME")
    if args.reference is not None and args.reference not in names:
        parser.error(f"--reference {args.reference} is none of the --model names")
    if args.images < 1 or args.repeats < 1 or args.beam < 1:
        parser.error("--images, --repeats and --beam must be positive")
    return args


def decode(captioner: Captioner, features: np.ndarray, options: DecodingOptions) -> None:
    for start in range(0, len(features), DECODE_CHUNK):
        captioner.decode(features[start : start + DECODE_CHUNK], options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ids = open_dataset(args.data).split_ids("dev")[: args.images]
    options = DecodingOptions(beam=args.beam)
    captioners, features, loaded = {}, {}, {}  # loaded: the vectors or the maps, read once for every model
    for name, paths in args.model:
        captioner = captioners[name] = Captioner.load(paths)
        if captioner.reads_regions not in loaded:
            chunks = stored_features(captioner, args.features, ids)
            loaded[captioner.reads_regions] = np.concatenate([chunk for _, chunk in chunks])
        features[name] = loaded[captioner.reads_regions]
        decode(captioner, features[name][:8], options)  # trace the step functions before timing
    seconds: dict[str, list[float]] = {name: [] for name in captioners}
    for _ in range(args.repeats):
        for name, captioner in captioners.items():
            started = time.perf_counter()
            decode(captioner, features[name], options)
            seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    reference = args.reference or max(captioners, key=lambda name: len(captioners[name].runs))
    rows = []
    for name, captioner in captioners.items():
        megabytes = sum((run.path / MODEL_FILE).stat().st_size for run in captioner.runs) / 1e6
        parameters = sum(run.model.count_params() for run in captioner.runs)
        decoders = sorted({run.model_config.decoder for run in captioner.runs})
        rows.append(
            [
                f"`{name}` ({', '.join(os.path.relpath(run.path, ROOT) for run in captioner.runs)})",
                f"{len(captioner.runs)} x {'/'.join(decoders)}",
                f"{parameters:,}",
                f"{megabytes:.1f}",
                f"{1000 * median[name] / len(ids):.2f}",
                ", ".join(f"{t:.2f}" for t in seconds[name]),
                f"{median[reference] / median[name]:.2f}x",
            ]
        )
    headers = [
        "model",
        "members",
        "parameters",
        "weights MB",
        "ms per image",
        "each repeat, s",
        f"speed vs `{reference}`",
    ]
    page = Report(
        "Model size and decoding speed, side by side",
        f"Beam search (beam {options.beam}, length penalty {options.length_penalty}, "
        f"{'no repeated ' + str(options.no_repeat_ngram) + '-grams' if options.no_repeat_ngram else 'no n-gram block'}, "
        f"{DECODE_CHUNK} images per batch) over the first {len(ids)} Flickr8k dev images' stored features "
        f"(`{os.path.relpath(args.features, ROOT)}`). The models were timed interleaved, {args.repeats} times each "
        "after an untimed warm-up; medians. Weights: the members' `model.keras` files (no optimizer state).",
        sections=[markdown_table(headers, rows)],
    )
    page.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
