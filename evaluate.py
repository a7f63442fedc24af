"""Score a caption run on a Flickr8k split with the COCO caption metrics.

python evaluate.py                                  # shipped model, dev split, beam 3
python evaluate.py --model runs/merge --split dev --beam 5 --json report.json --samples samples.png
python evaluate.py --model runs/a --model runs/b    # two runs decoded as an ensemble
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import (
    add_dataset_arguments,
    add_decoding_arguments,
    clean_errors,
    dataset_options,
    decoding_options,
    import_tensorflow_quietly,
)

import_tensorflow_quietly()  # before any Keras module: TensorFlow logs through C++ as it loads

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "shared" / "datasets" / "flickr8k"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from models.rundir import DEFAULT_RUN

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        help="run or ensemble directory (default: the shipped model); repeat it to score several runs as an ensemble",
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="caption dataset (Flickr8k folder, Karpathy JSON, COCO JSON)"
    )
    parser.add_argument(
        "--split", default="dev", help="a split of the dataset: train, dev, test (Karpathy also val = dev, restval)"
    )
    add_dataset_arguments(parser)
    add_decoding_arguments(parser)
    parser.add_argument("--limit", type=int, help="evaluate only the first N images of the split")
    parser.add_argument("--features", type=Path, help="feature store (pickle or shards) to reuse instead of encoding")
    parser.add_argument("--json", type=Path, help="write the full report (metrics, counts, captions) here")
    parser.add_argument("--samples", type=Path, help="write a PNG grid of sample captions here")
    args = parser.parse_args(argv)
    args.model = args.model or [DEFAULT_RUN]
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from features.encoders import EncoderError
    from features.store import FeatureStoreError
    from models.captioner import Captioner
    from models.evaluation import draw_samples, evaluate_captions, write_report
    from models.rundir import RunDirError
    from pipeline.captions import CaptionFileError
    from pipeline.datasets import open_dataset
    from pipeline.metrics import MetricsError

    options = decoding_options(args)
    with clean_errors(RunDirError, EncoderError, CaptionFileError, MetricsError, FeatureStoreError):
        dataset = open_dataset(args.data, dataset_options(args))
        captioner = Captioner.load(args.model)
        report = evaluate_captions(captioner, dataset, args.split, options, args.limit, args.features)
    counts = report.counts
    print(
        f"{captioner.name} on {dataset.root.name} {args.split} split, beam {options.beam}, length penalty "
        f"{options.length_penalty}{f', no repeated {options.no_repeat_ngram}-grams' if options.no_repeat_ngram else ''}: "
        f"{counts['captioned']} images captioned, {counts['missing_on_disk']} missing "
        f"on disk, {counts['unreadable']} unreadable, {counts['no_captions']} without captions"
    )
    for name, value in {**report.metrics, **report.secondary}.items():
        print(f"  {name:12s} {value:.4f}")
    if args.json:
        write_report(report, captioner.description, args.json)
    if args.samples:
        draw_samples(report, dataset, args.samples)
    if counts["captioned"] == 0:
        print(f"error: no image of the {args.split} split of {dataset.root} is on disk", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
