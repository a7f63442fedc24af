"""Exporting a run to LiteRT (export.py): the encoder and each decoder's one-token step as .tflite files.

The folder written is described in models.litert, the runtime that reads it. Each graph is traced
from the Keras runtime's own parts, so the two cannot disagree: the encoder is the captioner's
(`features.encoders.build_encoder`) with the spec's preprocessing in front, and a decoder's "start"
and "step" signatures are its stepper's `_start_impl` and `_step_impl` (models.decoding), pooling
included for a vector decoder in an ensemble with attention decoders. Keras writes a SavedModel with
the signatures (`keras.export.ExportArchive`, which tracks the weights; converting the tf.functions
directly leaves them out) and TensorFlow's converter turns it into a flatbuffer.

Precisions: float32 (the default); float16 stores the weights as half floats (LiteRT computes in
float32 on a CPU); int8 is dynamic-range quantisation (int8 weights, activations quantised on the
fly), which needs no calibration images.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from features.store import atomic_write_bytes
from models.captioner import Captioner
from models.litert import (
    ENCODER_FILE,
    EXPORT_FILE,
    EXPORT_FOLDER,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    VOCABULARY_FILE,
    ExportError,
    sha256_of,
)
from models.rundir import MODEL_FILE, write_json
from models.rundir import VOCABULARY_FILE as RUN_VOCABULARY_FILE

PRECISIONS = ("float32", "float16", "int8")


@dataclass
class ExportReport:
    folder: Path
    precision: str
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    seconds: float = 0.0


def convert(archive: keras.export.ExportArchive, signatures: list[str], precision: str) -> bytes:
    """Return the .tflite flatbuffer of an archive's endpoints `signatures`, at `precision`."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    with tempfile.TemporaryDirectory(prefix="litert-export-") as folder:
        archive.write_out(folder, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=signatures)
        if precision != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if precision == "float16":
            converter.target_spec.supported_types = [tf.float16]
        return converter.convert()


def encoder_archive(captioner: Captioner) -> keras.export.ExportArchive:
    """Return the archive of signature "encode": pixels in [0, 255] -> the features the decoders read."""
    encoder, spec = captioner.encoder, captioner.spec

    def encode(pixels):
        outputs = encoder(spec.preprocess(pixels), training=False)
        return {"features": outputs[1] if captioner.reads_regions else outputs}

    size = spec.input_size
    archive = keras.export.ExportArchive()
    archive.track(encoder)
    archive.add_endpoint("encode", encode, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, "pixels")])
    return archive


def decoder_archive(stepper, model: keras.Model, feature_shape: tuple[int, ...]) -> keras.export.ExportArchive:
    """Return the archive of a stepper's signatures "start" (features -> state_i) and "step"
    (tokens, state_i -> log_probs, state_i)."""
    example = stepper._start_impl(tf.zeros((1, *feature_shape)))
    state_specs = [tf.TensorSpec([None, *part.shape[1:]], part.dtype, f"state_{i}") for i, part in enumerate(example)]

    def start(features):
        return {f"state_{i}": part for i, part in enumerate(stepper._start_impl(features))}

    def step(tokens, *state):
        log_probs, new_state = stepper._step_impl(tokens, list(state))[:2]
        return {"log_probs": log_probs, **{f"state_{i}": part for i, part in enumerate(new_state)}}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "start", start, input_signature=[tf.TensorSpec([None, *feature_shape], tf.float32, "features")]
    )
    archive.add_endpoint("step", step, input_signature=[tf.TensorSpec([None], tf.int32, "tokens"), *state_specs])
    return archive


def decoder_files(captioner: Captioner) -> list[str]:
    """Return each member's decoder file name: decoder.tflite alone, decoder_<run folder>.tflite in an ensemble."""
    if len(captioner.runs) == 1:
        return ["decoder.tflite"]
    names = [run.path.name for run in captioner.runs]
    if len(set(names)) < len(names):  # two members in folders of the same name
        names = [f"{i}_{name}" for i, name in enumerate(names)]
    return [f"decoder_{name}.tflite" for name in names]


def export_run(
    paths: str | Path | list[str | Path],
    out: str | Path | None = None,
    precision: str = "float32",
    encoder_weights: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export run or ensemble directories (decoded together) to `out` (default: the one directory's litert/)."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    if out is None and len(paths) > 1:
        raise ExportError("several runs export to one folder: name it with --out")
    captioner = Captioner.load(paths, encoder_weights)
    return export_captioner(captioner, Path(out) if out else Path(paths[0]) / EXPORT_FOLDER, precision, progress)


def export_captioner(
    captioner: Captioner, out: Path, precision: str = "float32", progress: Callable[[str], None] | None = None
) -> ExportReport:
    """Write the captioner's encoder, decoders, vocabulary and export.json to `out`; export.json comes last,
    so an interrupted export is no export."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    say = progress or (lambda line: None)
    started, report = time.perf_counter(), ExportReport(out, precision)
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPORT_FILE).unlink(missing_ok=True)
    tick = time.perf_counter()
    encoder = _save(out / ENCODER_FILE, convert(encoder_archive(captioner), ["encode"], precision), report, say, tick)
    decoders = []
    for run, stepper, name in zip(captioner.runs, captioner.steppers, decoder_files(captioner), strict=True):
        tick = time.perf_counter()
        archive = decoder_archive(stepper, run.model, captioner.feature_shape)
        sha256 = _save(out / name, convert(archive, ["start", "step"], precision), report, say, tick)
        decoders.append({"file": name, "sha256": sha256, "run": run.path.name, "decoder": run.model_config.decoder})
    captioner.vocabulary.save(out / VOCABULARY_FILE)
    _remove_other_decoders(out, [d["file"] for d in decoders])
    write_json(out / EXPORT_FILE, export_config(captioner, out, precision, encoder, decoders))
    report.seconds = time.perf_counter() - started
    return report


def _save(path: Path, data: bytes, report: ExportReport, say: Callable[[str], None], since: float) -> str:
    """Write a converted model atomically, record its size, say so; return its SHA-256."""
    atomic_write_bytes(path, data)
    report.sizes[path.name] = len(data)
    say(f"{path}: {len(data) / 1e6:.1f} MB ({time.perf_counter() - since:.0f} s)")
    return sha256_of(path)


def _remove_other_decoders(out: Path, keep: list[str]) -> None:
    """Remove decoder files of an earlier export to the same folder that this one does not list."""
    for path in out.glob("decoder*.tflite"):
        if path.name not in keep:
            path.unlink()


def export_config(captioner: Captioner, out: Path, precision: str, encoder_sha256: str, decoders: list[dict]) -> dict:
    """Return export.json: what the runtime needs, and the source files to notice a retrained run by."""
    spec = captioner.spec
    sources = {}
    for run in captioner.runs:
        for name in (MODEL_FILE, RUN_VOCABULARY_FILE):
            sources[os.path.relpath(run.path / name, out)] = sha256_of(run.path / name)
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "precision": precision,
        "encoder": {
            "file": ENCODER_FILE,
            "sha256": encoder_sha256,
            "name": spec.name,
            "weights": str(captioner.encoder_weights),
            "input_size": spec.input_size,
            "preprocessing": f"{spec.preprocessing} (inside the graph: feed pixels in [0, 255])",
            "dim": spec.dim,
            "spatial_shape": list(spec.spatial_shape),
        },
        "reads_regions": captioner.reads_regions,
        "feature_shape": list(captioner.feature_shape),
        "max_caption_length": captioner.max_caption_length,
        "vocabulary": VOCABULARY_FILE,
        "decoders": decoders,
        "sources": sources,
        "exported": datetime.date.today().isoformat(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__},
    }
