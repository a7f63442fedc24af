"""Evaluating a caption run on a split: caption every image present, score, report, draw samples."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.extract import decoded_batches
from features.images import ImageDecodeError, load_image
from features.store import FeatureStore, FeatureStoreError, SpatialMaps, spatial_path
from models.captioner import DEFAULT_LENGTH_PENALTY, Captioner
from models.rundir import write_json
from pipeline.captions import load_captions, load_split
from pipeline.metrics import coco_scores, nltk_corpus_bleu

DECODE_CHUNK = 500  # images decoded together in one beam search


@dataclass
class EvaluationReport:
    split: str
    beam: int
    length_penalty: float
    metrics: dict[str, float]
    secondary: dict[str, float]
    counts: dict[str, int]
    captions: dict[str, str]  # image id -> generated caption
    references: dict[str, list[str]] = field(repr=False, default_factory=dict)
    seconds: float = 0.0
    no_repeat_ngram: int = 0

    def to_dict(self, run_config: dict) -> dict:
        return {
            "split": self.split,
            "beam": self.beam,
            "length_penalty": self.length_penalty,
            "no_repeat_ngram": self.no_repeat_ngram,
            "metrics": self.metrics,
            "secondary_metrics": self.secondary,
            "counts": self.counts,
            "seconds": round(self.seconds, 1),
            "model_config": run_config,
            "captions": [
                {"image": i, "caption": c, "references": self.references[i]} for i, c in sorted(self.captions.items())
            ],
        }


def _stored_features(captioner: Captioner, features: Path | None, ids: list[str]) -> np.ndarray | None:
    """Return the ids' features (vectors, or spatial maps for an attention decoder) from a feature store
    made by the run's encoder, or None."""
    if features is None or not Path(features).is_file():
        return None
    try:
        store = FeatureStore.load(features)
    except FeatureStoreError:
        return None
    if store.encoder != captioner.spec.name or store.metadata.get("weights") != captioner.encoder_weights:
        return None
    if not all(i in store.features for i in ids):
        return None
    if captioner.reads_regions:
        try:
            maps = SpatialMaps(spatial_path(features))
        except FeatureStoreError:
            return None
        try:
            return maps.get(ids) if all(i in maps.index for i in ids) else None
        finally:
            maps.close()
    return store.matrix(ids)


def _encoded_features(captioner: Captioner, paths: list[Path], ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """Return (features of the readable images, their ids), decoding images in parallel threads."""
    kept, chunks = [], []
    items = list(zip(ids, paths, strict=True))
    for batch in decoded_batches(items, captioner.spec.input_size, 64, os.cpu_count() or 2):
        good = [(i, p) for i, p in batch if not isinstance(p, ImageDecodeError)]
        if good:
            kept += [i for i, _ in good]
            chunks.append(captioner.encode(np.stack([p for _, p in good])))
    return (np.concatenate(chunks) if chunks else np.zeros((0, *captioner.feature_shape), np.float32)), kept


def evaluate_captions(
    captioner: Captioner,
    data_dir: str | Path,
    split: str = "dev",
    beam: int = 3,
    limit: int | None = None,
    features: str | Path | None = None,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    no_repeat_ngram: int = 0,
) -> EvaluationReport:
    """Caption every image of `split` that is on disk and score it against all its references."""
    started = time.perf_counter()
    data_dir = Path(data_dir)
    captions = load_captions(data_dir)
    split_ids = load_split(data_dir, split)
    with_refs = [i for i in split_ids if i in captions]
    on_disk = [i for i in with_refs if (data_dir / "Images" / i).is_file()]
    if limit:
        on_disk = on_disk[:limit]
    counts = {
        "split_images": len(split_ids),
        "no_captions": len(split_ids) - len(with_refs),
        "missing_on_disk": sum(not (data_dir / "Images" / i).is_file() for i in with_refs),
    }
    matrix = _stored_features(captioner, Path(features) if features else None, on_disk)
    ids = on_disk
    if matrix is None:
        matrix, ids = _encoded_features(captioner, [data_dir / "Images" / i for i in on_disk], on_disk)
    counts["unreadable"] = len(on_disk) - len(ids)
    counts["captioned"] = len(ids)
    generated: dict[str, str] = {}
    for start in range(0, len(ids), DECODE_CHUNK):
        chunk = ids[start : start + DECODE_CHUNK]
        for result in captioner.caption_features(
            chunk,
            matrix[start : start + DECODE_CHUNK],
            beam,
            length_penalty=length_penalty,
            no_repeat_ngram=no_repeat_ngram,
        ):
            generated[result.image] = result.caption
    references = {i: captions[i] for i in ids}
    metrics = coco_scores(references, generated) if generated else {}
    secondary = nltk_corpus_bleu(references, generated) if generated else {}
    return EvaluationReport(
        split,
        beam,
        length_penalty,
        metrics,
        secondary,
        counts,
        generated,
        references,
        time.perf_counter() - started,
        no_repeat_ngram,
    )


def write_report(report: EvaluationReport, run_config: dict, path: str | Path) -> None:
    write_json(Path(path), report.to_dict(run_config))


def draw_samples(
    report: EvaluationReport, data_dir: str | Path, path: str | Path, count: int = 12, seed: int = 0
) -> None:
    """Draw a grid of sample images with their generated and first reference caption to a PNG."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = sorted(report.captions)
    if not ids:
        return
    rng = np.random.default_rng(seed)
    chosen = [ids[i] for i in rng.choice(len(ids), size=min(count, len(ids)), replace=False)]
    columns = 4
    rows = (len(chosen) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4.6 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image_id in zip(axes.flat, chosen, strict=False):
        try:
            axis.imshow(load_image(Path(data_dir) / "Images" / image_id, 224).astype(np.uint8))
        except ImageDecodeError:
            continue
        generated = textwrap.fill("ours: " + report.captions[image_id], 44)
        reference = textwrap.fill("ref: " + report.references[image_id][0], 44)
        axis.set_title(f"{generated}\n{reference}", fontsize=8, loc="left")
    figure.suptitle(f"{report.split} split, beam {report.beam}", fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=80)
    plt.close(figure)
    os.replace(temporary, path)
