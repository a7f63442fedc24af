"""Caption photos with a trained run (default: the model shipped in pretrained/).

python infer.py photo.jpg [more.jpg ...] [--model RUN_DIR] [--beam 3] [--json] [--classifier RUN_DIR]
python infer.py photo.jpg --model runs/a --model runs/b            # two runs decoded as an ensemble
python infer.py photo.jpg --model runs/attention --attention-map out.png   # one panel per word

A run with a LiteRT export (python export.py RUN_DIR) is captioned with it, without TensorFlow, unless
--runtime keras (or --attention-map, --encoder-weights) asks for the Keras models.
"""

from __future__ import annotations

import argparse
import json
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
    native_stderr_silenced,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from models.rundir import DEFAULT_RUN

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, help="image files to caption")
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        help=f"run or ensemble directory (default {DEFAULT_RUN.name}); repeat it to decode several runs as an ensemble",
    )
    add_decoding_arguments(parser)
    add_runtime_argument(parser)
    parser.add_argument("--encoder-weights", help="override the encoder weights recorded in the run")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    add_max_pixels_argument(parser)
    parser.add_argument(
        "--attention-map",
        type=Path,
        help="attention runs: draw each word's attention over the image to this PNG "
        "(several images: one PNG each, named OUT_<image>.png)",
    )
    parser.add_argument("--classifier", type=Path, help="image-classifier run (classify.py train): add its class")
    parser.add_argument(
        "--classifier-flip",
        action="store_true",
        help="average the classifier's probabilities over each image and its mirror (test-time augmentation)",
    )
    args = parser.parse_args(argv)
    args.model = args.model or [DEFAULT_RUN]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = decoding_options(args)
    from features.images import set_max_pixels

    set_max_pixels(args.max_pixels)
    keras_for = "--attention-map" if args.attention_map else None
    runtime = captioner_class(args.model, args.runtime, args.encoder_weights, keras_for)
    with clean_errors(*captioning_errors(runtime, classifier=args.classifier is not None)):
        with native_stderr_silenced():  # LiteRT and TensorFlow log through C++ as they load models
            captioner = runtime.load(args.model, args.encoder_weights)
        classifier = None
        if args.classifier:  # loaded before any captioning, so a bad run directory fails at once
            from classifier.model import load_classifier_run

            classifier = load_classifier_run(args.classifier)
        captions, errors = captioner.caption_files(args.images, options, attention=args.attention_map is not None)
        if args.attention_map:
            draw_attention_maps(captioner, captions, args.attention_map, several=len(args.images) > 1)
        classes = classify(classifier, captions, args.classifier_flip) if classifier is not None else {}
    for reason in errors.values():
        print(f"error: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(json_report(captioner.name, options, captions, classes, errors), indent=2))
    else:
        for caption in captions:
            label = classes.get(caption.image)
            suffix = f" | {label.label} ({label.probability:.2f})" if label else ""
            print((f"{caption.image}: {caption.caption}" if len(args.images) > 1 else caption.caption) + suffix)
    return 1 if errors else 0


def draw_attention_maps(captioner, captions: list, out: Path, several: bool) -> None:
    """Draw each caption's attention maps to `out` (one PNG per image, named OUT_<image>.png, if `several`)."""
    from features.images import load_image
    from models.attention import draw_attention_map

    for caption in captions:
        path = out.with_name(f"{out.stem}_{Path(caption.image).stem}{out.suffix or '.png'}") if several else out
        pixels = load_image(caption.image, captioner.spec.input_size)
        draw_attention_map(pixels, caption.caption.split(), caption.attention, path)


def classify(classifier, captions: list, flip: bool) -> dict:
    """Return {image: its classification} for the captioned images."""
    from classifier.model import classify_files

    if not captions:
        return {}
    labelled, _ = classify_files(classifier, [c.image for c in captions], flip=flip)
    return {c.image: c for c in labelled}


def json_report(model: str, options, captions: list, classes: dict, errors: dict[str, str]) -> dict:
    """Return infer.py --json's document: the model, the decoding settings, one result per image, errors."""
    results = [c.to_dict() for c in captions]
    for result in results:
        if result["image"] in classes:
            label = classes[result["image"]]
            result.update({"class": label.label, "probability": round(label.probability, 4)})
    return {
        "model": model,
        "beam": options.beam,
        "decoding": options.to_dict(),
        "results": results,
        "errors": [{"image": p, "error": r} for p, r in errors.items()],
    }


if __name__ == "__main__":
    sys.exit(main())
