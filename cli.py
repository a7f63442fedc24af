"""What the command-line scripts share: quiet TensorFlow start-up, one-line errors, decoding and runtime flags.

Importing this module does not import TensorFlow: a script that uses Keras calls
`import_tensorflow_quietly()` first, and infer.py and serve.py only when they load the Keras runtime,
so that the LiteRT runtime starts without it.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextmanager
def native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for the block: TensorFlow logs through C++, past any Python setting."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


MALLOC_ARENAS = 2  # glibc malloc arenas for the whole process (MALLOC_ARENA_MAX in the environment wins)
M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at `arenas`, before TensorFlow starts its threads; return whether it was set.

    Each tf.data pass over a sharded store frees and reallocates its buffers (the shuffle buffer is
    42 MB of vectors) on other threads, and glibc keeps the freed memory in per-thread arenas (8 per
    core by default): a streamed training's RSS grew from 838 to 1,396 MB between 2 and 41 passes over
    10,500 images, and stays at 835-847 MB with 2 arenas, at the same steps/s (BENCHMARKS.md). A user's
    MALLOC_ARENA_MAX is left to glibc, which reads it itself; other C libraries are left alone.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with stderr silenced: it logs through C++ before any Python setting applies.
    Malloc's arenas are capped first (`limit_malloc_arenas`)."""
    if sys.modules.get("tensorflow") is not None:
        return
    limit_malloc_arenas()
    with native_stderr_silenced():
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe logs here on machines without a GPU


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


def add_max_pixels_argument(parser, action: str = "refuse") -> None:
    """Add `--max-pixels N` (the pixel budget of `features.images.load_image`); `action` says what happens
    to a bigger image. The script then calls `features.images.set_max_pixels(args.max_pixels)`."""
    from features.images import DEFAULT_MAX_PIXELS, pixel_count

    parser.add_argument(
        "--max-pixels",
        type=pixel_count,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"{action} images with more pixels, before decoding; 50e6 or 50M work (default {DEFAULT_MAX_PIXELS:,})",
    )


def add_runtime_argument(parser: argparse.ArgumentParser) -> None:
    """Add --runtime auto|keras|litert (infer.py, serve.py); its choices come from `models.runtimes.RUNTIMES`."""
    from models.runtimes import AUTO, RUNTIMES

    parser.add_argument(
        "--runtime",
        choices=[AUTO, *RUNTIMES],
        default=AUTO,
        help="litert: the run's export (export.py), without TensorFlow; keras: the trained models; "
        "auto (default): litert when every --model has a current export",
    )


def captioner_class(paths: list[Path], runtime: str, encoder_weights: str | None = None, keras_for: str | None = None):
    """Return the captioner class (`load(paths, encoder_weights)`, `errors`) of the runtime that `runtime`
    picks for `paths` (see `models.runtimes.choose_runtime`). TensorFlow is imported, quietly, only for
    the Keras runtime; a warning (an export older than its run) is one line on stderr."""
    from models.litert import ExportError
    from models.runtimes import choose_runtime, runtime_class

    keras_for = keras_for or ("--encoder-weights" if encoder_weights else None)
    with clean_errors(ExportError):  # a malformed export.json
        chosen, warning = choose_runtime(paths, runtime, keras_for)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if chosen == "keras":
        try:
            import_tensorflow_quietly()
        except ImportError:  # a LiteRT-only install (requirements-lite.txt)
            why = (
                "--runtime keras" if runtime == "keras" else f"{', '.join(map(str, paths))} (no current LiteRT export)"
            )
            fail(f"{why} needs TensorFlow: pip install -r requirements.txt (export.py makes a LiteRT export)")
    return runtime_class(chosen)


def captioning_errors(runtime, classifier: bool = False) -> tuple[type[Exception], ...]:
    """Return the errors a captioning script shows as one line: a run directory's, the runtime's
    (`captioner_class(...).errors`), and with a classifier (always Keras) the encoder's."""
    from models.rundir import RunDirError

    if not classifier:
        return (RunDirError, *runtime.errors)
    import_tensorflow_quietly()
    from features.encoders import EncoderError

    return (RunDirError, EncoderError, *runtime.errors)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags that say how to read a caption dataset (`pipeline.datasets.DatasetOptions`):
    --images, --no-restval, --mirror. train.py, evaluate.py and extract_features.py share them."""
    group = parser.add_argument_group("dataset")
    group.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help="image root of a Karpathy or COCO caption file (default: beside the file; COCO: above annotations/)",
    )
    group.add_argument(
        "--no-restval",
        action="store_true",
        help="Karpathy split: keep the restval images out of train (by default they train, as in Karpathy's split)",
    )
    group.add_argument(
        "--mirror",
        action="store_true",
        help="the train split also holds each train image's mirror image (ID#flip, its captions with left and "
        "right swapped): extract_features.py extracts them, train.py trains on them",
    )


def dataset_options(args: argparse.Namespace):
    """Return the `pipeline.datasets.DatasetOptions` of flags added by `add_dataset_arguments`."""
    from pipeline.datasets import DatasetOptions

    return DatasetOptions(images=args.images, restval_in_train=not args.no_restval, mirror_train=args.mirror)
