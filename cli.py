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


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the beam-search ranking flags of infer.py and evaluate.py: `--length-penalty A` and
    `--no-repeat-ngram N` (never repeat N tokens in a row; 0, the default, is off)."""
    from models.captioner import DEFAULT_LENGTH_PENALTY

    parser.add_argument(
        "--length-penalty",
        type=float,
        default=DEFAULT_LENGTH_PENALTY,
        help=f"rank beams by logP / length**this (default {DEFAULT_LENGTH_PENALTY})",
    )

    def size(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < 0 or value == 1:
            raise argparse.ArgumentTypeError("must be 0 (off) or at least 2")
        return value

    parser.add_argument(
        "--no-repeat-ngram",
        type=size,
        default=0,
        metavar="N",
        help="never repeat N consecutive words within a caption (N >= 2; default 0: no block)",
    )


import_tensorflow_quietly()
