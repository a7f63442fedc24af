"""Extract encoder features for a folder of images into a feature store.

python extract_features.py                       # Flickr8k in ../shared, efficientnet_lite0
python extract_features.py --data DIR --encoder vgg16 --weights vgg16.h5 --spatial
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import clean_errors, fail

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "shared" / "datasets" / "flickr8k"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from features.encoders import DEFAULT_ENCODER, ENCODERS
    from features.images import DEFAULT_MAX_PIXELS, pixel_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="Flickr8k-style folder (Images/ + caption file) or any folder of images",
    )
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, choices=sorted(ENCODERS))
    parser.add_argument("--weights", default="imagenet", help="imagenet | PATH to a Keras weights file | none")
    parser.add_argument("--out", type=Path, help="feature store (default features/store/<data>_<encoder>.pkl)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--spatial", action="store_true", help="also store spatial maps (HDF5) for attention")
    parser.add_argument("--flush-every", type=int, default=512, help="images per atomic store update")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--max-pixels", type=pixel_count, default=DEFAULT_MAX_PIXELS, help="skip images with more pixels (default 50M)"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.flush_every < 1:
        parser.error("--batch-size and --flush-every must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from features.encoders import EncoderError
    from features.extract import extract_features
    from features.images import set_max_pixels
    from features.store import FeatureStoreError
    from pipeline.captions import CaptionFileError
    from pipeline.datasets import image_sources

    set_max_pixels(args.max_pixels)
    with clean_errors(EncoderError, FeatureStoreError, CaptionFileError, OSError):
        sources, missing = image_sources(args.data)
        out = args.out or Path("features") / "store" / f"{args.data.name}_{args.encoder}.pkl"
        report = extract_features(
            sources,
            out,
            args.encoder,
            args.weights,
            args.batch_size,
            args.spatial,
            args.flush_every,
            progress=not args.no_progress,
        )
    print(
        f"{out}: {report.extracted} extracted ({report.images_per_second:.1f} images/s), "
        f"{report.already_present} already present, {len(report.failed)} unreadable, "
        f"{len(missing)} listed in the caption file but missing"
    )
    for _, reason in sorted(report.failed.items())[:20]:
        print(f"  skipped {reason}", file=sys.stderr)
    if len(report.failed) > 20:
        print(f"  ... and {len(report.failed) - 20} more unreadable", file=sys.stderr)
    if report.extracted == 0 and report.already_present == 0:
        fail(f"no image in {args.data} could be extracted", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
