"""Export a trained run to LiteRT, so that infer.py and serve.py caption without TensorFlow.

python export.py RUN_DIR [--out DIR] [--precision float32|float16|int8]

Writes the encoder and the decoder's one-token step as .tflite files, the vocabulary and export.json
to RUN_DIR/litert/ (an ensemble directory: one decoder per member, one shared encoder). infer.py and
serve.py then use it by themselves (--runtime auto); the folder alone, with requirements-lite.txt
installed, is all a captioning machine needs. What each precision costs on Flickr8k dev: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import clean_errors, import_tensorflow_quietly, native_stderr_silenced

import_tensorflow_quietly()  # before any Keras module: TensorFlow logs through C++ as it loads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from models.export import PRECISIONS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run or ensemble directory (train.py, or pretrained/...)")
    parser.add_argument("--out", type=Path, help="export folder (default RUN/litert, where infer.py looks)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=PRECISIONS[0],
        help="float32 (default); float16 halves the files; int8 (dynamic range) quarters them",
    )
    parser.add_argument("--encoder-weights", help="override the encoder weights recorded in the run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from features.encoders import EncoderError
    from models.export import export_run
    from models.litert import ExportError
    from models.rundir import RunDirError

    with clean_errors(RunDirError, EncoderError, ExportError):
        # The converter logs pages through C++ on stderr; its failures are Python exceptions, shown as one line.
        with native_stderr_silenced():
            report = export_run(args.run, args.out, args.precision, args.encoder_weights, progress=print)
    total = sum(report.sizes.values())
    print(
        f"exported {args.run} ({report.precision}) to {report.folder}: {total / 1e6:.1f} MB in {report.seconds:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
