"""Caption photos with a trained run (default: the model shipped in pretrained/).

python infer.py photo.jpg [more.jpg ...] [--model RUN_DIR] [--beam 3] [--json] [--classifier RUN_DIR]
python infer.py photo.jpg --model runs/a --model runs/b            # two runs decoded as an ensemble
python infer.py photo.jpg --model runs/attention --attention-map out.png   # one panel per word
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli import add_decoding_arguments, clean_errors


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
    parser.add_argument("--beam", type=int, default=3, help="beam width; 1 = greedy (default 3)")
    parser.add_argument("--max-length", type=int, help="longest caption in tokens (default: the run's)")
    add_decoding_arguments(parser)
    parser.add_argument("--encoder-weights", help="override the encoder weights recorded in the run")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
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
    if args.beam < 1:
        parser.error("--beam must be at least 1")
    if args.max_length is not None and args.max_length < 2:
        parser.error("--max-length must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from features.encoders import EncoderError
    from features.images import load_image
    from models.captioner import Captioner
    from models.rundir import RunDirError

    with clean_errors(RunDirError, EncoderError):
        captioner = Captioner.load(args.model, args.encoder_weights)
        classifier = None
        if args.classifier:  # loaded before any captioning, so a bad run directory fails at once
            from models.classifier import classify_files, load_classifier_run

            classifier = load_classifier_run(args.classifier)
        captions, errors = captioner.caption_files(
            args.images,
            args.beam,
            args.max_length,
            args.length_penalty,
            attention=args.attention_map is not None,
            no_repeat_ngram=args.no_repeat_ngram,
        )
        if args.attention_map:
            from models.attention import draw_attention_map

            for caption in captions:
                out = args.attention_map
                if len(args.images) > 1:
                    out = out.with_name(f"{out.stem}_{Path(caption.image).stem}{out.suffix or '.png'}")
                draw_attention_map(
                    load_image(caption.image, captioner.spec.input_size),
                    caption.caption.split(),
                    caption.attention,
                    out,
                )
        classes = {}
        if classifier is not None and captions:
            labelled, _ = classify_files(classifier, [c.image for c in captions], flip=args.classifier_flip)
            classes = {c.image: c for c in labelled}
    for reason in errors.values():
        print(f"error: {reason}", file=sys.stderr)
    if args.json:
        results = [c.to_dict() for c in captions]
        for result in results:
            if result["image"] in classes:
                label = classes[result["image"]]
                result.update({"class": label.label, "probability": round(label.probability, 4)})
        print(
            json.dumps(
                {
                    "model": captioner.name,
                    "beam": args.beam,
                    "results": results,
                    "errors": [{"image": p, "error": r} for p, r in errors.items()],
                },
                indent=2,
            )
        )
    else:
        for caption in captions:
            label = classes.get(caption.image)
            suffix = f" | {label.label} ({label.probability:.2f})" if label else ""
            print((f"{caption.image}: {caption.caption}" if len(args.images) > 1 else caption.caption) + suffix)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
