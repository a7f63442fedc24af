"""Extract encoder features for a folder of images into a feature store.

python extract_features.py                       # Flickr8k in ../shared, efficientnet_lite0
python extract_features.py --data DIR --encoder vgg16 --weights vgg16.h5 --spatial
python extract_features.py --spatial --mirror          # also each train image's mirror, ID#flip (train.py --mirror)
python extract_features.py --data dataset_coco.json --images coco/ --store shards   # a folder of shards
python extract_features.py --convert features/store/flickr8k_efficientnet_lite0.pkl --out flickr8k_shards
python extract_features.py --out flickr8k_shards --beam --direct_running_mode multi_processing --direct_num_workers 2

With --beam, the extraction is an Apache Beam pipeline writing the same sharded store; every argument
this script does not know is one of Beam's pipeline options (--runner, --direct_num_workers, --project ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import (
    add_dataset_arguments,
    add_max_pixels_argument,
    clean_errors,
    dataset_options,
    fail,
    import_tensorflow_quietly,
)

import_tensorflow_quietly()  # before any Keras module: TensorFlow logs through C++ as it loads

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "shared" / "datasets" / "flickr8k"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from features.encoders import DEFAULT_ENCODER, ENCODERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="caption dataset (Flickr8k folder, Karpathy or COCO JSON) or any folder of images",
    )
    add_dataset_arguments(parser)
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, choices=sorted(ENCODERS))
    parser.add_argument("--weights", default="imagenet", help="imagenet | PATH to a Keras weights file | none")
    parser.add_argument(
        "--out", type=Path, help="feature store (default features/store/<data>_<encoder>[.pkl]: a folder for shards)"
    )
    parser.add_argument(
        "--store",
        default="auto",
        choices=["auto", "pickle", "shards"],
        help="pickle: one file; shards: a folder of TFRecord shards, streamed by training (auto: from --out, "
        "else pickle up to 20k images)",
    )
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard (at least one shard a worker)")
    parser.add_argument("--convert", type=Path, metavar="STORE", help="convert this store (pickle <-> shards) to --out")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--spatial", action="store_true", help="also store spatial maps (HDF5) for attention")
    parser.add_argument("--flush-every", type=int, default=512, help="images per atomic store update")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--beam",
        action="store_true",
        help="run as an Apache Beam pipeline (shards only); every argument this script does not know is one of "
        "Beam's pipeline options, e.g. --runner DirectRunner --direct_num_workers 2",
    )
    add_max_pixels_argument(parser, "skip")
    args, beam_options = parser.parse_known_args(argv)
    args.beam_options = beam_options
    if args.beam_options and not args.beam:
        parser.error(f"unrecognized arguments: {' '.join(args.beam_options)} (Beam's options need --beam)")
    if args.batch_size < 1 or args.flush_every < 1 or args.shard_size < 1:
        parser.error("--batch-size, --flush-every and --shard-size must be positive")
    if args.convert is not None and args.beam:
        parser.error("--convert runs without --beam")
    if args.convert is not None and args.out is None:
        parser.error("--convert needs --out (a .pkl file for a pickle store, a folder for shards)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from features.augment import augment_pixels
    from features.encoders import EncoderError
    from features.extract import choose_store_format, extract_features
    from features.images import set_max_pixels
    from features.store import FeatureStoreError
    from pipeline.captions import CaptionFileError
    from pipeline.datasets import image_sources

    if args.convert is not None:
        return convert(args.convert, args.out, args.shard_size)
    if args.beam and args.store == "pickle":
        fail("--beam writes a sharded store (a folder): drop --store pickle, or drop --beam")
    if args.beam and args.mirror:
        fail("--mirror runs without --beam: extract the mirror images with the local extraction")
    set_max_pixels(args.max_pixels)
    with clean_errors(EncoderError, FeatureStoreError, CaptionFileError, OSError):
        sources, missing = image_sources(args.data, dataset_options(args))
        store_format = "shards" if args.beam else choose_store_format(args.out, args.store, len(sources))
        out = args.out or default_out(args.data, args.encoder, store_format)
        if args.beam:
            report = extract_on_beam(sources, out, args)
        else:
            report = extract_features(
                sources,
                out,
                args.encoder,
                args.weights,
                args.batch_size,
                args.spatial,
                args.flush_every,
                progress=not args.no_progress,
                store_format=store_format,
                shard_size=args.shard_size,
                augment=augment_pixels if args.mirror else None,  # flips what an ID#flip id names
            )
    print_report(out, report, missing)
    if report.extracted == 0 and report.already_present == 0:
        fail(f"no image in {args.data} could be extracted", 1)
    return 0


def extract_on_beam(sources: dict, out: Path, args: argparse.Namespace):
    """Run the extraction as a Beam pipeline with the pipeline options left over from the command line."""
    from features.beam_extract import BeamPipelineError, extract_features_beam

    # Beam's workers log every bundle at INFO; a later --default_sdk_harness_log_level wins over this one.
    options = ["--default_sdk_harness_log_level=WARNING", *args.beam_options]
    with clean_errors(BeamPipelineError):
        return extract_features_beam(
            sources, out, args.encoder, args.weights, args.batch_size, args.spatial, args.shard_size, options
        )


def print_report(out: Path, report, missing: list) -> None:
    """Print the summary line of an extraction, then up to 20 unreadable images on stderr."""
    print(
        f"{out}: {report.extracted} extracted ({report.images_per_second:.1f} images/s), "
        f"{report.already_present} already present, {len(report.failed)} unreadable, "
        f"{len(missing)} listed in the caption file but missing"
    )
    for _, reason in sorted(report.failed.items())[:20]:
        print(f"  skipped {reason}", file=sys.stderr)
    if len(report.failed) > 20:
        print(f"  ... and {len(report.failed) - 20} more unreadable", file=sys.stderr)


def default_out(data: Path, encoder: str, store_format: str) -> Path:
    """Return features/store/<data>_<encoder>, with .pkl for a pickle store (a folder for shards)."""
    name = data.stem if data.is_file() else data.name
    return Path("features") / "store" / f"{name}_{encoder}{'.pkl' if store_format == 'pickle' else ''}"


def convert(source: Path, out: Path, shard_size: int) -> int:
    """Convert the store at `source` into the other kind at `out`; print what was written."""
    from features.shards import convert_store
    from features.store import FeatureStoreError

    with clean_errors(FeatureStoreError, OSError):
        converted = convert_store(source, out, shard_size)
    kind = "pickle store" if converted.in_memory else f"sharded store ({len(converted.shards)} shards)"
    print(f"{out}: {len(converted.image_ids())} images converted from {source} into a {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
