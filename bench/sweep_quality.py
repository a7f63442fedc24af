"""Caption quality of one or more runs on a Flickr8k split, over beam widths and length penalties.

    python bench/sweep_quality.py --model pretrained/flickr8k_merge_lite0 runs/other \
        --beams 1 3 5 --length-penalties 0 0.5 1 --features features/store/flickr8k_efficientnet_lite0.pkl

Each setting captions every image of the split that is on disk (evaluate.py's code path) and scores it
with pycocoevalcap. The table goes to bench/results_quality.md (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import DEFAULT_DATA, ROOT, Report, markdown_table

METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, nargs="+", required=True, help="run directories to compare")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--length-penalties", type=float, nargs="+", default=[0.0])
    parser.add_argument("--features", type=Path, help="feature store to reuse instead of encoding the images")
    parser.add_argument("--limit", type=int, help="only the first N images of the split")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_quality.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cli import clean_errors, import_tensorflow_quietly

    import_tensorflow_quietly()
    from features.encoders import EncoderError
    from features.store import FeatureStoreError
    from models.captioner import Captioner
    from models.evaluation import evaluate_captions
    from models.rundir import RunDirError
    from models.search import DecodingOptions
    from pipeline.captions import CaptionFileError
    from pipeline.metrics import MetricsError

    rows, counts = [], None
    with clean_errors(RunDirError, EncoderError, CaptionFileError, MetricsError, FeatureStoreError):
        for run_dir in args.model:
            captioner = Captioner.load(run_dir)
            for beam in args.beams:
                # The length penalty only reorders finished beams: with one beam it changes nothing.
                for penalty in args.length_penalties if beam > 1 else [0.0]:
                    options = DecodingOptions(beam=beam, length_penalty=penalty)
                    report = evaluate_captions(captioner, args.data, args.split, options, args.limit, args.features)
                    counts = report.counts
                    words = sum(len(c.split()) for c in report.captions.values()) / max(len(report.captions), 1)
                    row = [
                        run_dir.name,
                        beam,
                        penalty,
                        *(f"{report.metrics[m]:.4f}" for m in METRICS),
                        f"{words:.1f}",
                        f"{report.seconds:.0f}",
                    ]
                    print(" ".join(str(c) for c in row), flush=True)
                    rows.append(row)
    headers = ["run", "beam", "length penalty", *METRICS, "mean words", "seconds"]
    page = Report(
        title=f"Caption quality on the Flickr8k {args.split} split: beam width and length penalty",
        summary=(
            f"{counts['captioned']} {args.split} images captioned ({counts['missing_on_disk']} missing on disk), "
            "scored with pycocoevalcap against all their reference captions. `length penalty` A ranks "
            "finished beams by log P / length^A. `seconds` includes decoding and scoring."
        ),
        sections=[markdown_table(headers, rows)],
        side_by_side=False,  # settings run one after the other; only `seconds` feels the load
    )
    page.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
