"""Evaluating a caption run on a split: caption every image present, score, report, draw samples."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.extract import decoded_batches
from features.images import ImageDecodeError, load_image
from features.store import FeatureStoreError, open_feature_store
from models.captioner import Captioner
from models.rundir import write_json
from models.search import DecodingOptions
from pipeline.datasets import CaptionDataset, as_dataset
from pipeline.metrics import coco_scores, nltk_corpus_bleu

DECODE_CHUNK = 500  # images decoded together in one beam search


@dataclass
class EvaluationReport:
    split: str
    decoding: DecodingOptions
    metrics: dict[str, float]
    secondary: dict[str, float]
    counts: dict[str, int]
    captions: dict[str, str]  # image id -> generated caption
    references: dict[str, list[str]] = field(repr=False, default_factory=dict)
    seconds: float = 0.0

    def to_dict(self, run_config: dict) -> dict:
        return {
            "split": self.split,
            **self.decoding.to_dict(),  # beam, max_length, length_penalty, no_repeat_ngram
            "metrics": self.metrics,
            "secondary_metrics": self.secondary,
            "counts": self.counts,
            "seconds": round(self.seconds, 1),
            "model_config": run_config,
            "captions": [
                {"image": i, "caption": c, "references": self.references[i]} for i, c in sorted(self.captions.items())
            ],
        }


def stored_features(
    captioner: Captioner, features: str | Path, ids: list[str], chunk: int = DECODE_CHUNK
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (ids, their features: vectors, or spatial maps for an attention decoder) from either kind of
    feature store, `chunk` images at a time (in the store's order when it streams); FeatureStoreError,
    before anything is yielded, when the store cannot serve them (missing, unsafe, another encoder, ids
    absent)."""
    store = open_feature_store(features)  # a missing, unreadable or unsafe store raises here
    try:
        weights = store.metadata.get("weights")
        if store.encoder != captioner.spec.name or weights != captioner.encoder_weights:
            raise FeatureStoreError(
                f"{features}: features of {store.encoder} ({weights}), but the model reads {captioner.spec.name} "
                f"({captioner.encoder_weights}); leave --features out to encode the images"
            )
        held = store.image_ids()
        missing = [i for i in ids if i not in held]
        if not missing and captioner.reads_regions:
            held = store.image_ids(spatial=True)
            missing = [i for i in ids if i not in held]
        if missing:
            raise FeatureStoreError(_missing_message(features, missing, len(ids)))
        yield from store.chunks(ids, chunk, captioner.reads_regions)
    finally:
        store.close()


def _missing_message(path, missing: list[str], wanted: int) -> str:
    return (
        f"{path}: {len(missing)} of the {wanted} images to caption have no stored features (e.g. {missing[0]}); "
        "extract them with extract_features.py or leave --features out to encode the images"
    )


def _encoded_chunks(
    captioner: Captioner, paths: list[Path], ids: list[str], chunk: int = DECODE_CHUNK
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (ids, features) of the readable images, `chunk` at a time, decoding images in threads."""
    kept: list[str] = []
    encoded: list[np.ndarray] = []
    items = list(zip(ids, paths, strict=True))
    for batch in decoded_batches(items, captioner.spec.input_size, 64, os.cpu_count() or 2):
        good = [(i, p) for i, p in batch if not isinstance(p, ImageDecodeError)]
        if good:
            kept += [i for i, _ in good]
            encoded.append(captioner.encode(np.stack([p for _, p in good])))
        while len(kept) >= chunk:
            matrix = np.concatenate(encoded)
            yield kept[:chunk], matrix[:chunk]
            kept, encoded = kept[chunk:], [matrix[chunk:]]
    if kept:
        yield kept, np.concatenate(encoded)


def evaluate_captions(
    captioner: Captioner,
    dataset: CaptionDataset | str | Path,
    split: str = "dev",
    decoding: DecodingOptions | None = None,
    limit: int | None = None,
    features: str | Path | None = None,
) -> EvaluationReport:
    """Caption every image of `split` that is on disk and score it against all its references.

    With `features`, the images' features come from that store (which must hold all of them, made by
    the run's encoder); otherwise the images are encoded.
    """
    started, decoding = time.perf_counter(), decoding or DecodingOptions()
    dataset = as_dataset(dataset)
    captions = dataset.captions()
    split_ids = dataset.split_ids(split)
    with_refs = [i for i in split_ids if i in captions]
    present = [i for i in with_refs if dataset.image_path(i).is_file()]
    on_disk = present[:limit] if limit else present
    counts = {
        "split_images": len(split_ids),
        "no_captions": len(split_ids) - len(with_refs),
        "missing_on_disk": len(with_refs) - len(present),
    }
    if features is not None:
        chunks = stored_features(captioner, features, on_disk)
    else:
        chunks = _encoded_chunks(captioner, [dataset.image_path(i) for i in on_disk], on_disk)
    generated: dict[str, str] = {}
    for chunk, matrix in chunks:
        for result in captioner.caption_features(chunk, matrix, decoding):
            generated[result.image] = result.caption
    ids = [i for i in on_disk if i in generated]
    counts["unreadable"] = len(on_disk) - len(ids)
    counts["captioned"] = len(ids)
    references = {i: captions[i] for i in ids}
    metrics = coco_scores(references, generated) if generated else {}
    secondary = nltk_corpus_bleu(references, generated) if generated else {}
    seconds = time.perf_counter() - started
    return EvaluationReport(split, decoding, metrics, secondary, counts, generated, references, seconds)


def write_report(report: EvaluationReport, run_config: dict, path: str | Path) -> None:
    write_json(Path(path), report.to_dict(run_config))


def draw_samples(
    report: EvaluationReport, dataset: CaptionDataset, path: str | Path, count: int = 12, seed: int = 0
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
            axis.imshow(load_image(dataset.image_path(image_id), 224).astype(np.uint8))
        except ImageDecodeError:
            continue
        generated = textwrap.fill("ours: " + report.captions[image_id], 44)
        reference = textwrap.fill("ref: " + report.references[image_id][0], 44)
        axis.set_title(f"{generated}\n{reference}", fontsize=8, loc="left")
    figure.suptitle(f"{report.split} split, beam {report.decoding.beam}", fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=80)
    plt.close(figure)
    os.replace(temporary, path)
