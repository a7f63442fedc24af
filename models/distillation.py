"""Sequence-level knowledge distillation (Kim and Rush, 2016): a teacher's beam-search captions as more data.

The teacher (a run or an ensemble directory, or several: anything `Captioner.load` reads) captions
every train image with batched beam search from the stored features. Its captions go into the
student's run directory in chunks, each written atomically, so a killed pass goes on from the chunks it
finished. The student is then trained with teacher forcing like any run (`train_caption_model`) on the
human references plus the teacher's captions of the train split; dev keeps the human references alone,
so the student's dev loss compares with that of a run trained without a teacher.

RUN_DIR/teacher/config.json           the teacher, its settings, the images it captions, its seconds
RUN_DIR/teacher/captions_00000.json   one chunk's captions in the COCO results format
                                      ([{"image_id", "caption"}], an image's captions best first)
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from features.store import atomic_write_bytes, open_feature_store, read_versioned_json
from models.captioner import Captioner
from models.rundir import STATE_FILE, RunDir, RunDirError, write_json
from models.search import DecodingOptions
from models.training import TrainingOptions, TrainingResult, stored_ids, train_caption_model
from pipeline.caption_arrays import select_train_dev
from pipeline.captions import Captions
from pipeline.datasets import CaptionDataset, WithExtraCaptions, as_dataset

TEACHER_DIR = "teacher"
MANIFEST_FILE = "config.json"
MANIFEST_FORMAT, MANIFEST_VERSION = "teacher-captions", 1
CHUNK_IMAGES = 500  # images per chunk file: what a killed pass can lose, and one beam-search batch


class DistillationError(ValueError):
    """A teacher that cannot caption for this student, or teacher captions made with other settings."""


@dataclass(frozen=True)
class TeacherOptions:
    """Who the teacher is and how it captions: its directories, captions per image, its decoding."""

    runs: tuple[str, ...]  # run or ensemble directories, decoded together as one model
    captions_per_image: int = 1  # the best N beams of each image's beam search
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    chunk_images: int = CHUNK_IMAGES

    def __post_init__(self) -> None:
        if not self.runs:
            raise DistillationError("a teacher needs at least one run directory")
        if not 1 <= self.captions_per_image <= self.decoding.beam:
            raise DistillationError(
                f"teacher captions per image must be between 1 and the teacher's beam ({self.decoding.beam}), "
                f"got {self.captions_per_image}"
            )
        if self.chunk_images < 1:
            raise DistillationError(f"chunk_images must be positive, got {self.chunk_images}")

    def to_dict(self) -> dict:
        return {
            "runs": [str(run) for run in self.runs],
            "captions_per_image": self.captions_per_image,
            "decoding": self.decoding.to_dict(),
            "chunk_images": self.chunk_images,
        }


class TeacherCaptions:
    """The teacher's captions in a run directory: a manifest, then one file per chunk of images."""

    def __init__(self, run: RunDir):
        self.folder = run.file(TEACHER_DIR)

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_FILE

    def chunk_path(self, index: int) -> Path:
        return self.folder / f"captions_{index:05d}.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict:
        return read_versioned_json(
            self.manifest_path, MANIFEST_FORMAT, MANIFEST_VERSION, "teacher-captions manifest", DistillationError
        )

    def begin(self, manifest: dict) -> None:
        """Write the manifest, or check that the one there describes the same teacher, settings and images."""
        if not self.exists():
            write_json(self.manifest_path, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **manifest})
            return
        old = self.read_manifest()
        for key in ("teacher", "images", "image_ids_sha1"):
            if old.get(key) != manifest[key]:
                raise DistillationError(
                    f"{self.manifest_path}: these teacher captions were made with {key} {old.get(key)}, not "
                    f"{manifest[key]}; choose another output directory or delete {self.folder}"
                )

    def seconds(self) -> float:
        """Return the seconds that every pass spent on the chunks written so far."""
        return float(self.read_manifest().get("seconds", 0.0))

    def write_chunk(self, index: int, captions: Captions, seconds: float) -> None:
        """Write a chunk's captions, then add the `seconds` they took to the manifest's total (so a killed
        pass keeps the time of the chunks it finished)."""
        results = [{"image_id": image, "caption": text} for image, texts in captions.items() for text in texts]
        atomic_write_bytes(self.chunk_path(index), (json.dumps(results, indent=0) + "\n").encode())
        manifest = self.read_manifest()
        manifest["seconds"] = round(float(manifest.get("seconds", 0.0)) + seconds, 2)
        write_json(self.manifest_path, manifest)

    def read_chunk(self, index: int) -> Captions:
        path = self.chunk_path(index)
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
            captions: Captions = {}
            for result in results:
                captions.setdefault(result["image_id"], []).append(result["caption"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DistillationError(f"{path}: unreadable teacher captions ({error}); delete it to redo it") from None
        return captions


@dataclass
class TeacherPass:
    """What the teacher pass did: the captions (all chunks), and what this call computed and reused."""

    captions: Captions
    images: int
    chunks: int
    chunks_reused: int
    seconds: float  # this call's
    total_seconds: float  # every pass over this run's chunks together


def load_teacher(options: TeacherOptions) -> Captioner:
    """Return the teacher's captioner (its runs decoded as one model); DistillationError if it cannot load."""
    try:
        return Captioner.load([Path(run) for run in options.runs])
    except Captioner.errors as error:
        raise DistillationError(f"teacher: {error}") from None


def teacher_image_ids(teacher: Captioner, store, dataset: CaptionDataset, limit_train: int | None) -> list[str]:
    """Return the train images the teacher captions: those with captions and the features it reads,
    after checking that the store's encoder is the teacher's."""
    weights = store.metadata.get("weights")
    if store.encoder != teacher.spec.name or weights != teacher.encoder_weights:
        raise DistillationError(
            f"teacher {teacher.name} reads {teacher.spec.name} ({teacher.encoder_weights}) features, but "
            f"{store.path} holds {store.encoder} ({weights}); distil from a teacher trained on this store's encoder"
        )
    train, _ = select_train_dev(dataset, stored_ids(store, spatial=teacher.reads_regions), limit_train)
    if not train.image_ids:
        raise DistillationError(f"no train-split image of {dataset.root} has features in {store.path}")
    return train.image_ids


def caption_train_images(
    teacher: Captioner,
    features: str | Path,
    dataset: CaptionDataset,
    run: RunDir,
    options: TeacherOptions,
    limit_train: int | None = None,
    progress: bool = True,
) -> TeacherPass:
    """Return the teacher's captions of the train images, computing only the chunks not yet in the run."""
    started = time.perf_counter()  # the store's loading counts towards the first chunk
    store = open_feature_store(features)
    try:
        ids = teacher_image_ids(teacher, store, dataset, limit_train)
        chunks = [ids[start : start + options.chunk_images] for start in range(0, len(ids), options.chunk_images)]
        captions = TeacherCaptions(run)
        captions.begin(teacher_manifest(teacher, options, features, ids))
        todo = [index for index in range(len(chunks)) if not captions.chunk_path(index).is_file()]
        with tqdm(total=len(ids), unit="img", desc="teacher captions", disable=not progress) as bar:
            bar.update(len(ids) - sum(len(chunks[index]) for index in todo))
            pending = [(index, chunks[index]) for index in todo]
            write_missing_chunks(teacher, store, captions, pending, options, bar, started)
    finally:
        store.close()
    seconds = time.perf_counter() - started
    merged: Captions = {}
    for index in range(len(chunks)):
        merged.update(captions.read_chunk(index))
    return TeacherPass(merged, len(ids), len(chunks), len(chunks) - len(todo), seconds, captions.seconds())


def write_missing_chunks(
    teacher: Captioner,
    store,
    captions: TeacherCaptions,
    todo: list[tuple[int, list[str]]],
    options: TeacherOptions,
    bar: tqdm,
    started: float,
) -> None:
    """Caption the images of the chunks in `todo` in one pass over the store, writing each chunk as soon
    as all its images are captioned (at once for a pickle store, which serves them in the order asked)."""
    owner = {image_id: index for index, chunk in todo for image_id in chunk}
    members = dict(todo)
    found: Captions = {}
    pending = [image_id for _, chunk in todo for image_id in chunk]
    for chunk_ids, matrix in store.chunks(pending, options.chunk_images, teacher.reads_regions):
        found.update(best_captions(teacher, chunk_ids, matrix, options))
        for index in sorted({owner[image_id] for image_id in chunk_ids}):
            if all(image_id in found for image_id in members[index]):
                done = {image_id: found.pop(image_id) for image_id in members[index]}
                captions.write_chunk(index, done, time.perf_counter() - started)
                started = time.perf_counter()
        bar.update(len(chunk_ids))


def teacher_manifest(teacher: Captioner, options: TeacherOptions, features: str | Path, ids: list[str]) -> dict:
    """Return what the teacher captions are made from, as the manifest records it."""
    return {
        "teacher": options.to_dict(),
        "teacher_name": teacher.name,
        "features": str(features),
        "images": len(ids),
        "image_ids_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
        "seconds": 0.0,
    }


def best_captions(teacher: Captioner, ids: list[str], features, options: TeacherOptions) -> Captions:
    """Return each image's `captions_per_image` best beams as text, best first, in one batched beam search."""
    decoded = teacher.decode(features, options.decoding)
    words = teacher.vocabulary.decode
    return {
        image_id: [" ".join(words(h.tokens)) for h in hypotheses[: options.captions_per_image]]
        for image_id, hypotheses in zip(ids, decoded, strict=True)
    }


@dataclass
class DistillationResult:
    teacher: TeacherPass
    training: TrainingResult


def check_distillation_start(run: RunDir, resume: bool) -> None:
    """Refuse a fresh start over a run that has begun (teacher captions or training), and a resume of none."""
    begun = TeacherCaptions(run).exists() or run.file(STATE_FILE).is_file()
    if resume and not begun:
        raise RunDirError(f"{run.path}: nothing to resume (no teacher captions, no training); start without --resume")
    if not resume and begun:
        raise RunDirError(
            f"{run.path} already holds a distillation run; pass --resume to continue it or choose another --out"
        )


def teacher_captions(
    features: str | Path,
    dataset: CaptionDataset,
    run_dir: str | Path,
    teacher_options: TeacherOptions,
    limit_train: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TeacherPass:
    """Stage 1: the teacher's captions of the train images, in the run directory (finished there if a pass
    was interrupted and `resume`)."""
    run = RunDir(run_dir)
    check_distillation_start(run, resume)
    teacher = load_teacher(teacher_options)
    return caption_train_images(teacher, features, dataset, run, teacher_options, limit_train, progress)


def train_student(
    features: str | Path,
    dataset: CaptionDataset,
    run_dir: str | Path,
    captions: TeacherPass,
    teacher_options: TeacherOptions,
    options: TrainingOptions,
    model_options: dict | None = None,
    verbose: int | None = None,
) -> TrainingResult:
    """Stage 2: teacher forcing on the human and teacher captions of train (dev: human only), resumed
    when the run has a finished epoch; config.json records the teacher under "distillation"."""
    facts = {
        **teacher_options.to_dict(),
        "teacher_images": captions.images,
        "teacher_captions": sum(len(texts) for texts in captions.captions.values()),
        "teacher_seconds": captions.total_seconds,
        "captions_folder": TEACHER_DIR,
    }
    student_data = WithExtraCaptions(dataset, captions.captions, "train", facts, key="distillation")
    resume = RunDir(run_dir).file(STATE_FILE).is_file()
    return train_caption_model(features, student_data, run_dir, options, model_options, resume, verbose)


def distil_caption_model(
    features: str | Path,
    dataset: CaptionDataset | str | Path,
    run_dir: str | Path,
    teacher_options: TeacherOptions,
    options: TrainingOptions,
    model_options: dict | None = None,
    resume: bool = False,
    verbose: int | None = None,
) -> DistillationResult:
    """Caption the train images with the teacher (or finish doing so), then train the student on the
    human and teacher captions; `resume` continues whichever stage was interrupted."""
    dataset = as_dataset(dataset)
    captions = teacher_captions(
        features, dataset, run_dir, teacher_options, options.limit_train, resume, progress=verbose != 0
    )
    training = train_student(features, dataset, run_dir, captions, teacher_options, options, model_options, verbose)
    return DistillationResult(captions, training)
