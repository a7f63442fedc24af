"""What the command-line scripts share: quiet TensorFlow start-up and one-line errors."""

from __future__ import annotations

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


import_tensorflow_quietly()
