"""Train, evaluate and use an image classifier on encoder features of a class-per-folder image set.

    python classify.py train --data DIR --out RUN_DIR [--head dense|gru] [--augment [flip,rotate,bright]]
    python classify.py train --data DIR --out RUN_DIR --fine-tune-blocks 5 [--fine-tune-lr 1e-4] [--augment]
    python classify.py evaluate --model RUN_DIR --data DIR --json FILE [--plots DIR] [--flip]
    python classify.py predict --model RUN_DIR photo.jpg [more.jpg ...] [--json] [--flip]

DIR holds one sub-folder of images per class (DIR/daisy/*.jpg, DIR/tulips/*.jpg, ...). Features are
extracted once into a feature store (default features/store/<parent>_<folder>_<encoder>.pkl) and
reused; an interrupted extraction resumes. On the folder a run was trained on, `evaluate` scores the
run's own validation split; on any other class folder, every image.

--fine-tune-blocks N (EfficientNet-Lite encoders, dense head) also trains the encoder's last N MBConv
blocks and its 1x1 head conv: the rest of the encoder runs once per image into an activation cache
beside the feature store (<store>.block<K>.h5, K = first tuned block), the head is trained first on
the frozen encoder's pooled vectors, then blocks and head together at --fine-tune-lr for up to
--fine-tune-epochs epochs (BatchNorm statistics stay frozen). Lite0 has 16 blocks: N=1 is the
192->320 block at 7x7, N=5 adds the four 112->192 blocks (the first one stride 2, from 14x14).
The run directory works with evaluate, predict and infer.py --classifier like any other.

--flip (evaluate, predict; infer.py --classifier-flip) averages each image's class probabilities with
those of its mirror image: a test-time augmentation that costs one more encoding per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TypeVar

from cli import clean_errors, fail, import_tensorflow_quietly

import_tensorflow_quietly()  # before any Keras module: TensorFlow logs through C++ as it loads

T = TypeVar("T")

FLIP_HELP = "test-time augmentation: average each image's probabilities with its mirror image's"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        check_train_arguments(parser, args)
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_command(commands)
    add_evaluate_command(commands)
    add_predict_command(commands)
    return parser


def add_train_command(commands) -> None:
    """Add `train`, whose options are named like the fields of ClassifierTrainingOptions."""
    from classifier.model import HEADS
    from features.augment import AUGMENTATIONS
    from features.encoders import DEFAULT_ENCODER, ENCODERS

    train = commands.add_parser("train", help="train a classifier head and write a run directory")
    train.add_argument("--data", type=Path, required=True, help="class-per-folder image set DIR/<class>/*")
    train.add_argument("--out", type=Path, required=True, help="run directory to write")
    train.add_argument("--head", default="dense", choices=sorted(HEADS), help="dense: pooled vector; gru: 7x7 map")
    train.add_argument(
        "--augment",
        dest="augmentations",
        nargs="?",
        const=",".join(AUGMENTATIONS),
        default="",
        metavar="NAMES",
        help=f"add augmented variants of the train images: comma-separated from {','.join(AUGMENTATIONS)} (bare: all)",
    )
    train.add_argument(
        "--features",
        type=Path,
        help="feature store: a .pkl file, or a folder of shards, streamed (default features/store/<parent>_<folder>_"
        "<encoder>.pkl; a folder above 20,000 images)",
    )
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", dest="learning_rate", metavar="LR", type=float, default=1e-3, help="Adam learning rate")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights, shuffling and validation split")
    train.add_argument("--split-seed", type=int, help="seed of the validation split alone (default: --seed)")
    train.add_argument("--validation-fraction", type=float, default=0.2, help="share of each class held out")
    train.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs")
    train.add_argument("--units", type=int, default=256, help="dense head: hidden units; 0 = no hidden layer")
    train.add_argument("--rnn-units", type=int, default=128, help="gru head: GRU units")
    train.add_argument("--dropout", type=float, default=0.5)
    train.add_argument("--l2", type=float, default=0.0, help="L2 penalty on the head's kernels (default 0: none)")
    train.add_argument("--label-smoothing", type=float, default=0.0, help="smooth the one-hot targets (default 0)")
    train.add_argument("--encoder", default=DEFAULT_ENCODER, choices=sorted(ENCODERS))
    train.add_argument("--weights", default="imagenet", help="encoder weights: imagenet | PATH | none")
    train.add_argument(
        "--fine-tune-blocks",
        type=int,
        default=0,
        metavar="N",
        help="also train the encoder's last N blocks (dense head, efficientnet_lite*; default 0: frozen encoder)",
    )
    train.add_argument("--fine-tune-epochs", type=int, default=10, help="epochs of blocks + head together (10)")
    train.add_argument("--fine-tune-lr", type=float, default=1e-4, help="Adam learning rate of that phase (1e-4)")
    train.add_argument("--no-progress", action="store_true")


def add_evaluate_command(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="score a run: accuracy, per-class F1, confusion, ROC")
    evaluate.add_argument("--model", type=Path, required=True, help="run directory from classify.py train")
    evaluate.add_argument("--data", type=Path, required=True, help="class-per-folder image set")
    evaluate.add_argument("--json", type=Path, required=True, help="metrics file to write")
    evaluate.add_argument("--plots", type=Path, help="folder for confusion_matrix.png and roc.png")
    evaluate.add_argument("--features", type=Path, help="feature store (default: the run's, or one per folder)")
    evaluate.add_argument("--all", action="store_true", help="score every image, even of the training folder")
    evaluate.add_argument("--flip", action="store_true", help=FLIP_HELP)
    evaluate.add_argument("--no-progress", action="store_true")


def add_predict_command(commands) -> None:
    predict = commands.add_parser("predict", help="print the class of each photo")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--model", type=Path, required=True, help="run directory from classify.py train")
    predict.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    predict.add_argument("--flip", action="store_true", help=FLIP_HELP)


def check_train_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse impossible train options with argparse's one line; split --augment into its names."""
    from features.augment import AUGMENTATIONS

    for name in ("epochs", "batch_size", "patience", "rnn_units", "fine_tune_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.units < 0:
        parser.error("--units must be 0 (no hidden layer) or positive")
    if not 0 < args.validation_fraction < 1:
        parser.error("--validation-fraction must be between 0 and 1")
    for name in ("dropout", "label_smoothing"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    if args.learning_rate <= 0 or args.fine_tune_lr <= 0:
        parser.error("--lr and --fine-tune-lr must be positive")
    if args.fine_tune_blocks < 0:
        parser.error("--fine-tune-blocks must be 0 (frozen encoder) or positive")
    if args.fine_tune_blocks and args.head != "dense":
        parser.error("--fine-tune-blocks works with the dense head only")
    if args.l2 < 0:
        parser.error("--l2 must be 0 or positive")
    args.augmentations = [name.strip() for name in args.augmentations.split(",") if name.strip()]
    unknown = sorted(set(args.augmentations) - set(AUGMENTATIONS))
    if unknown:
        parser.error(f"--augment: unknown {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Return the dataclass `cls` filled from the parsed arguments named like its fields (the rest: defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in vars(args).items() if name in names})


def train(args: argparse.Namespace) -> int:
    from classifier.training import ClassifierTrainingOptions, train_classifier

    options = dataclass_from_args(ClassifierTrainingOptions, args)
    result = train_classifier(args.data, args.out, options, args.features, progress=not args.no_progress)
    if result.empty_classes:
        print(
            f"warning: skipped {len(result.empty_classes)} empty class folder(s): {', '.join(result.empty_classes)}",
            file=sys.stderr,
        )
    if result.unreadable:
        print(f"warning: skipped {len(result.unreadable)} unreadable image(s)", file=sys.stderr)
    fine_tuned = f" ({result.fine_tune_epochs_run} fine-tuning the encoder's top)" if args.fine_tune_blocks else ""
    print(
        f"{result.run_dir}: {result.epochs_run} epochs{fine_tuned} in {result.seconds:.0f} s on {result.device}; "
        f"validation accuracy {result.val_accuracy:.4f}, loss {result.best_val_loss:.4f} "
        f"({result.train_images} train + {result.augmented_images} augmented, "
        f"{result.validation_images} validation images)"
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from classifier.evaluation import evaluate_classifier, write_evaluation

    if args.json.is_dir():  # checked first: the metrics would be lost after the whole evaluation
        fail(f"--json {args.json}: is a folder; give the name of the metrics file to write")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    evaluation = evaluate_classifier(
        args.model, args.data, args.features, args.plots, args.all, progress=not args.no_progress, flip=args.flip
    )
    write_evaluation(evaluation, args.json)
    print(evaluation.report_text)
    print(
        f"{evaluation.subset} images: {evaluation.images}{' (each with its mirror)' if args.flip else ''}; accuracy {evaluation.accuracy:.4f}, "
        f"macro F1 {evaluation.macro_f1:.4f}; metrics in {args.json}"
    )
    for name, value in evaluation.roc_auc.items():
        print(f"  ROC AUC {name}: {'n/a (class absent)' if value is None else f'{value:.4f}'}")
    if evaluation.missing:
        print(f"warning: {len(evaluation.missing)} validation image(s) no longer in {args.data}", file=sys.stderr)
    if evaluation.unreadable:
        print(f"warning: skipped {len(evaluation.unreadable)} unreadable image(s)", file=sys.stderr)
    return 0


def predict(args: argparse.Namespace) -> int:
    from classifier.model import classify_files

    results, errors = classify_files(args.model, args.images, flip=args.flip)
    for reason in errors.values():
        print(f"error: {reason}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "results": [r.to_dict() for r in results],
                    "errors": [{"image": p, "error": r} for p, r in errors.items()],
                },
                indent=2,
            )
        )
    else:
        for result in results:
            print(f"{result.image}: {result.label} ({result.probability:.2f})")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from classifier.classes import ClassFolderError
    from classifier.model import ClassifierError
    from features.encoders import EncoderError
    from features.store import FeatureStoreError
    from models.rundir import RunDirError

    with clean_errors(ClassifierError, ClassFolderError, FeatureStoreError, EncoderError, RunDirError, OSError):
        code = {"train": train, "evaluate": evaluate, "predict": predict}[args.command](args)
    return code


if __name__ == "__main__":
    sys.exit(main())
