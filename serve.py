"""Serve a web page and an HTTP API that caption uploaded photos (default: the model shipped in pretrained/).

    python serve.py [--model RUN_DIR] [--classifier RUN_DIR] [--host 127.0.0.1] [--port 8000]

Then open http://127.0.0.1:8000/ for the page, http://127.0.0.1:8000/docs for the API.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import clean_errors, fail


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from models.rundir import DEFAULT_RUN

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_RUN, help=f"run or ensemble directory (default {DEFAULT_RUN.name})"
    )
    parser.add_argument("--classifier", type=Path, help="classifier run directory: also predict each photo's class")
    parser.add_argument("--encoder-weights", help="override the encoder weights recorded in the run")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--beam", type=int, default=3, help="beam width; 1 = greedy (default 3)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch collects (default 10)")
    parser.add_argument("--max-batch", type=int, default=32, help="most images in one batch (default 32)")
    parser.add_argument("--no-batching", action="store_true", help="caption each request on its own")
    args = parser.parse_args(argv)
    if args.beam < 1:
        parser.error("--beam must be at least 1")
    if args.max_batch < 1:
        parser.error("--max-batch must be at least 1")
    if args.batch_window_ms < 0:
        parser.error("--batch-window-ms must not be negative")
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    if not 0 < args.port < 65536:
        parser.error("--port must be between 1 and 65535")
    return args


def load_classify(run_dir: Path):
    """Return classify(image bytes list) -> [(label, probability)] with the classifier run, loaded once."""
    try:
        from models.classifier import classify_files, load_classifier_run
    except ImportError as error:  # the classifier is optional: captioning works without it
        fail(f"--classifier needs models/classifier.py, which cannot be imported here ({error})")
    run = load_classifier_run(run_dir)

    def classify(images: list[bytes]) -> list[tuple[str, float]]:
        classifications, _ = classify_files(run, images)  # load_image takes bytes as well as paths
        return [(c.label, c.probability) for c in classifications]

    return classify


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from features.encoders import EncoderError
    from models.captioner import Captioner
    from models.rundir import RunDirError
    from web.app import create_app

    with clean_errors(RunDirError, EncoderError):
        captioner = Captioner.load(args.model, args.encoder_weights)
        captioner.encoder  # noqa: B018  (build it now: a missing weights file fails here, not on the first upload)
        classify = load_classify(args.classifier) if args.classifier else None
    app = create_app(
        captioner,
        classify=classify,
        beam=args.beam,
        max_upload_mb=args.max_upload_mb,
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        batching=not args.no_batching,
    )
    print(f"captioning with {args.model} on http://{args.host}:{args.port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
