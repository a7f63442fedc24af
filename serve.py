"""Serve a web page and an HTTP API that caption uploaded photos (default: the model shipped in pretrained/).

    python serve.py [--model RUN_DIR] [--classifier RUN_DIR] [--host 127.0.0.1] [--port 8000]

Then open http://127.0.0.1:8000/ for the page, http://127.0.0.1:8000/docs for the API. The limits
against hostile clients (timeouts, caps, the pixel budget) are explained in docs/serving.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import (
    add_decoding_arguments,
    add_max_pixels_argument,
    add_runtime_argument,
    captioner_class,
    captioning_errors,
    clean_errors,
    decoding_options,
    fail,
    native_stderr_silenced,
)


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
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch collects (default 10)")
    parser.add_argument("--max-batch", type=int, default=32, help="most images in one batch (default 32)")
    parser.add_argument("--no-batching", action="store_true", help="caption each request on its own")
    add_decoding_arguments(parser)
    add_runtime_argument(parser)
    add_limit_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error("--max-batch must be at least 1")
    if args.batch_window_ms < 0:
        parser.error("--batch-window-ms must not be negative")
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    if not 0 < args.port < 65536:
        parser.error("--port must be between 1 and 65535")
    args.limits = client_limits(args)
    return args


def _positive(kind: type):
    """Return an argparse type: a positive number of `kind` (int or float)."""

    def positive(text: str):
        value = kind(text)
        if not value > 0:
            raise ValueError(text)
        return value

    positive.__name__ = f"positive {kind.__name__}"  # argparse names it in its error line
    return positive


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of the pixel budget, the decoding threads and `web.limits.ClientLimits`, with their defaults."""
    from web.limits import ClientLimits

    default = ClientLimits()
    group = parser.add_argument_group("limits against hostile clients (docs/serving.md)")
    add_max_pixels_argument(group)
    group.add_argument(
        "--decode-workers", type=_positive(int), default=2, metavar="N", help="image-decoding threads (default 2)"
    )
    for flag, field, what in [
        ("--header-timeout", "header_timeout_s", "seconds for a request's headers to arrive in full"),
        ("--body-timeout", "body_timeout_s", "seconds an upload may stall between two chunks"),
        ("--keep-alive-timeout", "keep_alive_s", "seconds an idle keep-alive connection stays open"),
        ("--max-connections", "max_connections", "open connections served; beyond: 503 with Retry-After"),
        ("--max-uploads", "max_uploads", "request bodies in flight; beyond: 503 with Retry-After"),
        ("--retry-after", "retry_after_s", "seconds a 503 tells the client to wait"),
    ]:
        value = getattr(default, field)
        metavar = "SECONDS" if field.endswith("_s") else "N"
        help_text = f"{what} (default {value:g})"
        group.add_argument(
            flag, dest=field, type=_positive(type(value)), default=value, metavar=metavar, help=help_text
        )


def client_limits(args: argparse.Namespace):
    """Return the `web.limits.ClientLimits` of the flags added by `add_limit_arguments`."""
    from dataclasses import fields

    from web.limits import ClientLimits

    return ClientLimits(**{f.name: getattr(args, f.name) for f in fields(ClientLimits)})


def load_classify(run_dir: Path):
    """Return classify(image bytes list) -> [(label, probability)] with the classifier run, loaded once."""
    try:
        from classifier.model import classify_files, load_classifier_run
    except ImportError as error:  # the classifier is optional: captioning works without it
        fail(f"--classifier needs the classifier package, which cannot be imported here ({error})")
    run = load_classifier_run(run_dir)

    def classify(images: list[bytes]) -> list[tuple[str, float]]:
        classifications, _ = classify_files(run, images)  # load_image takes bytes as well as paths
        return [(c.label, c.probability) for c in classifications]

    return classify


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from features.images import set_max_pixels
    from web.app import create_app
    from web.limits import uvicorn_config

    set_max_pixels(args.max_pixels)  # process-wide: the classifier hook decodes with the same budget

    runtime = captioner_class([args.model], args.runtime, args.encoder_weights)
    with clean_errors(*captioning_errors(runtime, classifier=args.classifier is not None)):
        with native_stderr_silenced():  # LiteRT and TensorFlow log through C++ as they load models
            captioner = runtime.load(args.model, args.encoder_weights)
            captioner.load_encoder()  # now: a missing weights file fails here, not on the first upload
        classify = load_classify(args.classifier) if args.classifier else None
    app = create_app(
        captioner,
        classify=classify,
        decoding=decoding_options(args),
        max_upload_mb=args.max_upload_mb,
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        batching=not args.no_batching,
        decode_workers=args.decode_workers,
        limits=args.limits,
    )
    print(
        f"captioning with {args.model} ({captioner.device}) on http://{args.host}:{args.port}/ (API docs at /docs)",
        flush=True,
    )
    uvicorn.Server(uvicorn_config(app, args.host, args.port, args.limits)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
