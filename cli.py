"""What the command-line scripts share: quiet TensorFlow start-up, one-line errors, decoding flags."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with stderr silenced: it logs through C++ before any Python setting applies."""
    if "tensorflow" in sys.modules:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe logs here on machines without a GPU
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


@contextmanager
def clean_errors(*known: type[BaseException]):
    """Turn the given exception types (and Ctrl-C) into one stderr line and a non-zero exit."""
    try:
        yield
    except KeyboardInterrupt:
        fail("interrupted; finished work is saved, run the same command again to resume", 130)
    except known as error:
        fail(str(error))


def _whole_number(minimum: int, allowed_zero: bool = False):
    """Return an argparse type: an integer at least `minimum` (or 0, when `allowed_zero`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum and not (allowed_zero and value == 0):
            raise argparse.ArgumentTypeError(f"must be {'0 (off) or ' if allowed_zero else ''}at least {minimum}")
        return value

    return parse


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the decoding flags that infer.py, evaluate.py and serve.py share, with the defaults of
    `models.search.DecodingOptions`: --beam, --max-length, --length-penalty, --no-repeat-ngram."""
    from models.search import DecodingOptions

    default = DecodingOptions()
    group = parser.add_argument_group("decoding")
    group.add_argument(
        "--beam", type=_whole_number(1), default=default.beam, help=f"beam width; 1 = greedy (default {default.beam})"
    )
    group.add_argument(
        "--max-length",
        type=_whole_number(2),
        help="longest caption in tokens (default: the run's longest train caption)",
    )
    group.add_argument(
        "--length-penalty",
        type=float,
        default=default.length_penalty,
        help=f"rank beams by logP / length**this (default {default.length_penalty})",
    )
    group.add_argument(
        "--no-repeat-ngram",
        type=_whole_number(2, allowed_zero=True),
        default=default.no_repeat_ngram,
        metavar="N",
        help=f"never repeat N consecutive words within a caption (N >= 2; default {default.no_repeat_ngram}: no block)",
    )


def decoding_options(args: argparse.Namespace):
    """Return the `models.search.DecodingOptions` of flags added by `add_decoding_arguments`."""
    from models.search import DecodingOptions

    return DecodingOptions(args.beam, args.max_length, args.length_penalty, args.no_repeat_ngram)


import_tensorflow_quietly()
