"""Dense-head variants on the flowers set: validation accuracy over several weight seeds, one split.

    python bench/classifier_variants.py [--data DIR] [--seeds 0 1 2] [--only NAME ...]

Each variant is a set of `classify.py train` options (shown as flags in the table); each runs once per
weight seed (`--seed`) on the same stratified validation split (`--split-seed 0`), so the spread
between seeds is the noise a single run carries. Features come from the cached feature stores
(extracted on first use); runs are written to runs/classifier/variants/<variant>/seed<k>, and a run
already there is read back instead of trained again. Prints a markdown table and writes every
figure to bench/out/classifier_variants.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402  (after the path set-up, as a script)

from classifier.training import ClassifierTrainingOptions, train_classifier  # noqa: E402
from features.store import atomic_write_bytes  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "flowers" / "train"
RUNS = ROOT / "runs" / "classifier" / "variants"
RESULTS = ROOT / "bench" / "out" / "classifier_variants.json"
ALL = ["flip", "rotate", "bright"]

VARIANTS: dict[str, dict] = {
    "baseline": {},  # Dense(256, relu), dropout 0.5, Adam 1e-3, patience 5
    "dropout_0.2": {"dropout": 0.2},
    "dropout_0.7": {"dropout": 0.7},
    "no_hidden": {"units": 0},
    "no_hidden_dropout_0.2": {"units": 0, "dropout": 0.2},
    "units_1024": {"units": 1024},
    "l2_1e-3": {"l2": 1e-3},
    "label_smoothing_0.1": {"label_smoothing": 0.1},
    "lr_3e-4_patience_10": {"learning_rate": 3e-4, "patience": 10},
    "patience_10": {"patience": 10},
    "augment_all": {"augmentations": ALL},
    "augment_flip": {"augmentations": ["flip"]},
    "augment_flip_rotate": {"augmentations": ["flip", "rotate"]},
    "augment_all_label_smoothing_0.1": {"augmentations": ALL, "label_smoothing": 0.1},
    "augment_all_dropout_0.7_l2_1e-3": {"augmentations": ALL, "dropout": 0.7, "l2": 1e-3},
    # The L2 runs above were still improving at the 30-epoch cap:
    "l2_1e-3_epochs_80": {"l2": 1e-3, "epochs": 80},
    "augment_all_dropout_0.7_l2_1e-3_epochs_80": {"augmentations": ALL, "dropout": 0.7, "l2": 1e-3, "epochs": 80},
    "augment_all_l2_3e-3_epochs_80": {"augmentations": ALL, "l2": 3e-3, "epochs": 80},
}
FLAGS = {"learning_rate": "--lr", "augmentations": "--augment"}


def flags(variant: dict) -> str:
    """Return the classify.py train flags that give `variant`."""
    parts = []
    for key, value in variant.items():
        value = ",".join(value) if isinstance(value, list) else value
        parts.append(f"{FLAGS.get(key, '--' + key.replace('_', '-'))} {value}")
    return " ".join(parts) or "(defaults)"


def run_variant(data: Path, name: str, variant: dict, seed: int) -> dict:
    """Train one variant with one weight seed (or read the run back) and return its figures."""
    run_dir = RUNS / name / f"seed{seed}"
    figures_path = run_dir / "bench.json"
    if figures_path.is_file():
        return json.loads(figures_path.read_text())
    options = ClassifierTrainingOptions(seed=seed, split_seed=0, **variant)
    keras.backend.clear_session()
    result = train_classifier(data, run_dir, options, progress=False, verbose=0)
    figures = {
        "variant": name,
        "seed": seed,
        "val_accuracy": result.val_accuracy,
        "val_loss": result.best_val_loss,
        "epochs": result.epochs_run,
        "fit_seconds": result.seconds,
        "train_images": result.train_images,
        "augmented_images": result.augmented_images,
        "validation_images": result.validation_images,
        "options": asdict(options),
    }
    atomic_write_bytes(figures_path, (json.dumps(figures, indent=2) + "\n").encode())
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="class-per-folder image set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="weight seeds (default 0 1 2)")
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run these variants only")
    args = parser.parse_args()
    rows = []
    print("| variant | classify.py train flags | val accuracy per seed | mean | epochs | fit s (mean) |")
    print("|---|---|---|---:|---|---:|")
    for name in args.only or VARIANTS:
        figures = [run_variant(args.data, name, VARIANTS[name], seed) for seed in args.seeds]
        accuracies = [f["val_accuracy"] for f in figures]
        rows.append({"variant": name, "flags": flags(VARIANTS[name]), "runs": figures})
        print(
            f"| {name} | `{flags(VARIANTS[name])}` | {' / '.join(f'{a:.4f}' for a in accuracies)} "
            f"| {statistics.mean(accuracies):.4f} | {' / '.join(str(f['epochs']) for f in figures)} "
            f"| {statistics.mean(f['fit_seconds'] for f in figures):.0f} |",
            flush=True,
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS, (json.dumps(rows, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
