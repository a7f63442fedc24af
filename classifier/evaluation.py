"""Evaluating a classifier run: accuracy, per-class precision/recall/F1, confusion matrix, ROC curves.

On the folder it was trained on, a run is evaluated on its own validation split (split.json); on any
other class folder, on every image. A fine-tuned run reads the activation cache beside the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import auc, classification_report, confusion_matrix, roc_curve

from classifier.classes import ClassFolder, ClassFolderError, load_class_folder
from classifier.model import (
    ClassifierRun,
    augmented_store_path,
    default_store_path,
    load_classifier_run,
    prepare_inputs,
)
from features.augment import FLIP, augment_pixels, augmented_id, augmented_sources
from models.rundir import write_json

CONFUSION_FILE, ROC_FILE = "confusion_matrix.png", "roc.png"


@dataclass
class ClassifierEvaluation:
    run_dir: str
    data: str
    subset: str  # "validation" (the run's own split) or "all"
    classes: list[str]
    images: int
    accuracy: float
    macro_f1: float
    report: dict  # sklearn classification_report(output_dict=True)
    report_text: str
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    roc_auc: dict[str, float | None]  # one-vs-rest; None for a class absent from the data
    missing: list[str] = field(default_factory=list)  # validation ids no longer in the folder
    unreadable: list[str] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    flip: bool = False  # probabilities averaged over each image and its mirror (test-time augmentation)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "report_text"}


def evaluate_classifier(
    run_dir: str | Path,
    data_dir: str | Path,
    features: str | Path | None = None,
    plots_dir: str | Path | None = None,
    all_images: bool = False,
    progress: bool = True,
    flip: bool = False,
) -> ClassifierEvaluation:
    """Return the metrics of a run on a class folder, drawing the plots into `plots_dir` if given.

    With `flip`, each image's probabilities are the mean of its own and its mirror image's; the mirrors
    are encoded once into the augmented store beside the feature store (`augmented_store_path`).
    """
    run = load_classifier_run(run_dir)
    folder = load_class_folder(data_dir, run.classes)
    subset, ids, missing, store_path = images_to_score(run, folder, data_dir, features, all_images)
    encoder, weights = run.config["encoder"], run.config.get("weights", "imagenet")
    inputs = prepare_inputs(
        {i: folder.sources[i] for i in ids}, store_path, encoder, weights, run.model_config, progress
    )
    ids = [i for i in ids if i in inputs.available]
    if not ids:
        raise ClassFolderError(f"{data_dir}: no image to evaluate could be read")
    probabilities = inputs.probabilities(run.model, ids)
    if flip:
        probabilities = (probabilities + mirror_probabilities(run, folder.sources, ids, store_path, progress)) / 2
    labels = np.array([folder.labels[i] for i in ids])
    evaluation = score(run, labels, probabilities)
    evaluation.data, evaluation.subset = str(data_dir), subset
    evaluation.missing, evaluation.unreadable, evaluation.flip = missing, sorted(inputs.failed), flip
    if plots_dir is not None:
        evaluation.plots = draw_plots(evaluation, labels, probabilities, Path(plots_dir))
    return evaluation


def images_to_score(
    run: ClassifierRun, folder: ClassFolder, data_dir: str | Path, features: str | Path | None, all_images: bool
) -> tuple[str, list[str], list[str], Path]:
    """Return (subset, image ids, validation ids gone from the folder, feature store) of an evaluation.

    On the folder the run was trained on: its validation split and its own store, unless `all_images`;
    on another folder: every image, in a store of that folder.
    """
    own_folder = Path(data_dir).resolve() == Path(run.config.get("data", "")).resolve()
    if own_folder and not all_images:
        wanted = run.split()["validation"]
        ids = [i for i in wanted if i in folder.sources]
        missing = [i for i in wanted if i not in folder.sources]
        subset, store_path = "validation", Path(features or run.config["features"])
    else:
        ids, missing = sorted(folder.sources), []
        subset = "all"
        store_path = (
            Path(features) if features else default_store_path(data_dir, run.config["encoder"], len(folder.sources))
        )
    if not ids:
        raise ClassFolderError(f"{data_dir}: none of the images to evaluate is there")
    return subset, ids, missing, store_path


def mirror_probabilities(
    run: ClassifierRun, sources: dict[str, Path], ids: list[str], store_path: Path, progress: bool
) -> np.ndarray:
    """Return the probabilities of the mirror images of `ids`, encoded once into the augmented store."""
    mirrors = prepare_inputs(
        augmented_sources({i: sources[i] for i in ids}, [FLIP]),
        augmented_store_path(store_path),
        run.config["encoder"],
        run.config.get("weights", "imagenet"),
        run.model_config,
        progress,
        augment=augment_pixels,
    )
    return mirrors.probabilities(run.model, [augmented_id(i, FLIP) for i in ids])


def draw_plots(
    evaluation: ClassifierEvaluation, labels: np.ndarray, probabilities: np.ndarray, plots_dir: Path
) -> dict[str, str]:
    """Draw the confusion matrix and the ROC curves into `plots_dir`; return {plot: path}."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion(np.array(evaluation.confusion), evaluation.classes, plots_dir / CONFUSION_FILE)
    plot_roc(labels, probabilities, evaluation.classes, plots_dir / ROC_FILE)
    return {"confusion_matrix": str(plots_dir / CONFUSION_FILE), "roc": str(plots_dir / ROC_FILE)}


def score(run: ClassifierRun, labels: np.ndarray, probabilities: np.ndarray) -> ClassifierEvaluation:
    """Return the metrics of predicted `probabilities` (N, classes) against true class indices."""
    classes = run.classes
    every = list(range(len(classes)))
    predicted = probabilities.argmax(axis=1)
    rocs = [one_vs_rest_roc(labels, probabilities, k) for k in every]
    report = classification_report(
        labels, predicted, labels=every, target_names=classes, output_dict=True, zero_division=0
    )
    text = classification_report(labels, predicted, labels=every, target_names=classes, digits=4, zero_division=0)
    return ClassifierEvaluation(
        run_dir=str(run.path),
        data="",
        subset="",
        classes=classes,
        images=len(labels),
        accuracy=float(np.mean(predicted == labels)),
        macro_f1=float(report["macro avg"]["f1-score"]),
        report=report,
        report_text=text,
        confusion=confusion_matrix(labels, predicted, labels=every).tolist(),
        roc_auc={name: (roc or (None, None, None))[2] for name, roc in zip(classes, rocs, strict=True)},
    )


def one_vs_rest_roc(labels: np.ndarray, probabilities: np.ndarray, k: int):
    """Return (false positive rates, true positive rates, AUC) of class `k` against the rest, or None.

    None when the data holds only class `k` or none of it: ROC needs both kinds of example.
    """
    positives = labels == k
    if positives.all() or not positives.any():
        return None
    false_positive_rate, true_positive_rate, _ = roc_curve(positives, probabilities[:, k])
    return false_positive_rate, true_positive_rate, float(auc(false_positive_rate, true_positive_rate))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, out_png: Path) -> None:
    plt = _pyplot()
    temporary = out_png.with_name(f".{out_png.stem}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, out_png)


def plot_confusion(confusion: np.ndarray, classes: list[str], out_png: Path) -> None:
    """Draw the confusion matrix (counts, rows = true class) to a PNG."""
    plt = _pyplot()
    size = max(4.0, 0.8 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(confusion, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    threshold = confusion.max() / 2 if confusion.size else 0
    for (row, column), count in np.ndenumerate(confusion):
        axis.text(column, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    axis.set_title(f"confusion matrix ({int(confusion.sum())} images)")
    figure.tight_layout()
    _save(figure, out_png)


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], out_png: Path) -> None:
    """Draw one-vs-rest ROC curves with their AUC, one per class present in the data, to a PNG."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 5))
    for k, name in enumerate(classes):
        roc = one_vs_rest_roc(labels, probabilities, k)
        if roc is not None:
            axis.plot(roc[0], roc[1], label=f"{name} (AUC {roc[2]:.3f})")
    axis.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title("one-vs-rest ROC")
    axis.legend(loc="lower right")
    figure.tight_layout()
    _save(figure, out_png)


def write_evaluation(evaluation: ClassifierEvaluation, path: str | Path) -> None:
    """Write the evaluation as JSON, atomically."""
    write_json(Path(path), evaluation.to_dict())
