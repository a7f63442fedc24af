"""Knowledge distillation (Kim and Rush, 2016): a teacher's beam-search captions as more data (sequence
level), or its next-word distributions as soft targets (word level).

The teacher (a run or an ensemble directory, or several: anything `Captioner.load` reads) captions
every train image with batched beam search from the stored features. Its captions go into the
student's run directory in chunks, each written atomically, so a killed pass goes on from the chunks it
finished. The student is then trained with teacher forcing like any run (`train_caption_model`) on the
human references plus the teacher's captions of the train split; dev keeps the human references alone,
so the student's dev loss compares with that of a run trained without a teacher.

RUN_DIR/teacher/config.json           the teacher, its settings, the images it captions, its seconds
RUN_DIR/teacher/captions_00000.json   one chunk's captions in the COCO results format
                                      ([{"image_id", "caption"}], an image's captions best first)

Word level (Hinton et al. 2015, Kim and Rush's "word-level"): the teacher's runs read every human train
caption with teacher forcing; their mean next-word distribution, cut to its top k
(pipeline/soft_targets.py), is mixed with the human word as the student's target. Its chunks, written
the same way, go beside:

RUN_DIR/teacher/soft_targets.json          the teacher, k, the captions' digest, its seconds
RUN_DIR/teacher/soft_targets_00000.npz     one chunk of captions' top-k word ids and probabilities
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

from features.store import atomic_write_bytes, open_feature_store, read_versioned_json
from models.captioner import Captioner
from models.decoders import get_decoder
from models.rundir import CONFIG_FILE, STATE_FILE, CaptionRun, RunDir, RunDirError, load_runs, write_json
from models.search import DecodingOptions
from models.training import (
    TrainingOptions,
    TrainingResult,
    check_soft_target_store,
    prepare_caption_data,
    stored_ids,
    train_caption_model,
)
from pipeline.batches import encode_captions, pad_batch
from pipeline.caption_arrays import select_train_dev
from pipeline.captions import Captions
from pipeline.datasets import CaptionDataset, WithExtraCaptions, as_dataset
from pipeline.soft_targets import SoftTargets, caption_digest, top_k_rows
from pipeline.vocabulary import Vocabulary

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


class TeacherFiles:
    """What a teacher pass writes in a run directory: a manifest, then one file per chunk, each written
    atomically; the manifest adds up the seconds of the chunks written."""

    manifest_file, manifest_format, manifest_version = MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION
    chunk_name = "captions_{index:05d}.json"
    what = "teacher captions"
    same_keys = ("teacher", "images", "image_ids_sha1")  # a resumed pass must match the manifest on these

    def __init__(self, run: RunDir):
        self.folder = run.file(TEACHER_DIR)

    @property
    def manifest_path(self) -> Path:
        return self.folder / self.manifest_file

    def chunk_path(self, index: int) -> Path:
        return self.folder / self.chunk_name.format(index=index)

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict:
        return read_versioned_json(
            self.manifest_path, self.manifest_format, self.manifest_version, f"{self.what} manifest", DistillationError
        )

    def begin(self, manifest: dict) -> None:
        """Write the manifest, or check that the one there describes the same teacher, settings and data."""
        if not self.exists():
            write_json(
                self.manifest_path, {"format": self.manifest_format, "version": self.manifest_version, **manifest}
            )
            return
        old = self.read_manifest()
        for key in self.same_keys:
            if old.get(key) != manifest[key]:
                raise DistillationError(
                    f"{self.manifest_path}: these {self.what} were made with {key} {old.get(key)}, not "
                    f"{manifest[key]}; choose another output directory or delete {self.folder}"
                )

    def seconds(self) -> float:
        """Return the seconds that every pass spent on the chunks written so far."""
        return float(self.read_manifest().get("seconds", 0.0))

    def write_bytes(self, index: int, data: bytes, seconds: float) -> None:
        """Write a chunk, then add the `seconds` it took to the manifest's total (so a killed pass keeps
        the time of the chunks it finished)."""
        atomic_write_bytes(self.chunk_path(index), data)
        manifest = self.read_manifest()
        manifest["seconds"] = round(float(manifest.get("seconds", 0.0)) + seconds, 2)
        write_json(self.manifest_path, manifest)


class TeacherCaptions(TeacherFiles):
    """The teacher's captions in a run directory, one file per chunk of images."""

    def write_chunk(self, index: int, captions: Captions, seconds: float) -> None:
        results = [{"image_id": image, "caption": text} for image, texts in captions.items() for text in texts]
        self.write_bytes(index, (json.dumps(results, indent=0) + "\n").encode(), seconds)

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


def check_teacher_encoder(teacher: str, encoder: str, weights: str | None, store) -> None:
    """Refuse a teacher that reads another encoder's features (or its other weights) than the store holds."""
    held = store.metadata.get("weights")
    if store.encoder != encoder or held != weights:
        raise DistillationError(
            f"teacher {teacher} reads {encoder} ({weights}) features, but {store.path} holds {store.encoder} "
            f"({held}); distil from a teacher trained on this store's encoder"
        )


def teacher_image_ids(teacher: Captioner, store, dataset: CaptionDataset, limit_train: int | None) -> list[str]:
    """Return the train images the teacher captions: those with captions and the features it reads,
    after checking that the store's encoder is the teacher's."""
    check_teacher_encoder(teacher.name, teacher.spec.name, teacher.encoder_weights, store)
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


def check_distillation_start(run: RunDir, resume: bool, level: str = "sequence") -> None:
    """Refuse a fresh start over a run that has begun (a teacher pass or training), a resume of none, and
    a resume at the other `level` ("sequence" or "word") than the run's."""
    held = {"sequence": TeacherCaptions(run).exists(), "word": TeacherSoftTargets(run).exists()}
    begun = any(held.values()) or run.file(STATE_FILE).is_file()
    if resume and not begun:
        raise RunDirError(f"{run.path}: nothing to resume (no teacher captions, no training); start without --resume")
    if not resume and begun:
        raise RunDirError(
            f"{run.path} already holds a distillation run; pass --resume to continue it or choose another --out"
        )
    for run_level, present in held.items():
        if present and run_level != level:
            raise RunDirError(
                f"{run.path} holds a {run_level}-level distillation run; resume it with --distill-level {run_level}"
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


# --- word level ------------------------------------------------------------------------------------
SOFT_MANIFEST_FORMAT, SOFT_MANIFEST_VERSION = "teacher-soft-targets", 1
CHUNK_CAPTIONS = 5000  # captions per chunk file of soft targets
TEACHER_BATCH = 250  # captions a teacher forward pass reads at once


@dataclass(frozen=True)
class SoftTargetOptions:
    """Word-level distillation: the teacher's runs (their mean distribution), its top k words kept at each
    position, and the teacher's share of the student's target."""

    runs: tuple[str, ...]
    top_k: int = 20
    weight: float = 0.5
    chunk_captions: int = CHUNK_CAPTIONS

    def __post_init__(self) -> None:
        if not self.runs:
            raise DistillationError("a teacher needs at least one run directory")
        if self.top_k < 1:
            raise DistillationError(f"the teacher's top k must be positive, got {self.top_k}")
        if not 0.0 < self.weight <= 1.0:
            raise DistillationError(f"the teacher's weight must be in (0, 1], got {self.weight}")
        if self.chunk_captions < 1:
            raise DistillationError(f"chunk_captions must be positive, got {self.chunk_captions}")

    def to_dict(self) -> dict:
        return {
            "level": "word",
            "runs": [str(run) for run in self.runs],
            "top_k": self.top_k,
            "weight": self.weight,
            "chunk_captions": self.chunk_captions,
        }


class TeacherSoftTargets(TeacherFiles):
    """The teacher's top-k next words of the train captions in a run directory, one .npz per chunk."""

    manifest_file = "soft_targets.json"
    manifest_format, manifest_version = SOFT_MANIFEST_FORMAT, SOFT_MANIFEST_VERSION
    chunk_name = "soft_targets_{index:05d}.npz"
    what = "soft targets"
    same_keys = ("teacher", "captions", "captions_sha1")

    def write_chunk(
        self, index: int, word_ids: np.ndarray, probabilities: np.ndarray, positions: np.ndarray, seconds: float
    ) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, word_ids=word_ids, probabilities=probabilities.astype(np.float16), positions=positions)
        self.write_bytes(index, buffer.getvalue(), seconds)

    def read_chunk(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        path = self.chunk_path(index)
        try:
            with np.load(path) as arrays:
                return arrays["word_ids"], arrays["probabilities"].astype(np.float32), arrays["positions"]
        except (OSError, ValueError, KeyError) as error:
            raise DistillationError(f"{path}: unreadable soft targets ({error}); delete it to redo it") from None


@dataclass
class TeacherMember:
    """One run of a word-level teacher, and how the student's vocabulary maps onto its own."""

    run: CaptionRun
    to_teacher: np.ndarray | None  # the teacher's id of each student word (<unk> if it has none); None: same ids
    known: np.ndarray | None  # whether the teacher knows each student word

    @classmethod
    def of(cls, run: CaptionRun, vocabulary: Vocabulary) -> TeacherMember:
        if run.vocabulary.words == vocabulary.words:
            return cls(run, None, None)
        index = run.vocabulary.index
        to_teacher = np.array([index.get(word, Vocabulary.unk_id) for word in vocabulary.words])
        return cls(run, to_teacher, np.array([word in index for word in vocabulary.words]))

    @property
    def feature_input(self) -> str:
        return "regions" if self.run.model_config.reads_regions else "image"

    @cached_property
    def forward(self):
        """The model's forward pass, traced once for any batch size and caption width (predict_on_batch
        traces again for every new shape, and TensorFlow warns about it)."""
        import tensorflow as tf

        return tf.function(lambda inputs: self.run.model(inputs, training=False), reduce_retracing=True)

    def probabilities(self, words: np.ndarray, features: dict[str, np.ndarray]) -> np.ndarray:
        """Return the run's next-word distributions (batch, width, student vocabulary) after the student's
        token ids `words`, reading its input ("image" or "regions") from `features`. The teacher's mass
        on words the student does not have goes to the student's <unk>."""
        if self.to_teacher is not None:
            words = self.to_teacher[words].astype(np.int32)
        output = self.forward({"words": words, self.feature_input: features[self.feature_input]}).numpy()
        if self.to_teacher is None:
            return output
        student = output[..., self.to_teacher] * self.known
        student[..., Vocabulary.unk_id] += np.maximum(0.0, 1.0 - student.sum(axis=-1))
        return student


def load_teacher_members(runs: tuple[str, ...], vocabulary: Vocabulary, store) -> list[TeacherMember]:
    """Return the teacher's runs (ensemble directories opened), each checked against the store's encoder
    and mapped to the student's vocabulary."""
    members = []
    for path in runs:
        try:
            loaded = load_runs(path)
        except RunDirError as error:
            raise DistillationError(f"teacher: {error}") from None
        for run in loaded:
            check_teacher_encoder(str(run.path), run.config["encoder"], run.config.get("weights"), store)
            if run.model_config.reads_regions:
                store.require_spatial()
            members.append(TeacherMember.of(run, vocabulary))
    return members


def soft_targets_of(
    members: list[TeacherMember],
    store,
    image_ids: list[str],
    rows: np.ndarray,
    sequences: list[list[int]],
    max_caption_length: int,
    top_k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the teacher's top-k (word ids, probabilities) at every position of `sequences` (rows: one per
    position, captions in order) and each caption's number of positions; read shortest captions first in
    batches, so little is padding."""
    positions = np.array([len(s) - 1 for s in sequences], np.int64)
    offsets = np.concatenate([[0], np.cumsum(positions)])
    word_ids = np.zeros((offsets[-1], top_k), np.int32)
    probabilities = np.zeros((offsets[-1], top_k), np.float32)
    order = np.argsort(positions, kind="stable")
    for start in range(0, len(order), TEACHER_BATCH):
        batch = order[start : start + TEACHER_BATCH]
        words = pad_batch([sequences[c] for c in batch], max_caption_length)[:, :-1]
        ids = [image_ids[rows[c]] for c in batch]
        read = {"image": store.matrix, "regions": store.maps}
        features = {name: read[name](ids) for name in {member.feature_input for member in members}}
        mean = sum(member.probabilities(words, features) for member in members) / len(members)
        top_ids, top_probabilities = top_k_rows(mean, top_k)
        for row, caption in enumerate(batch):
            count = positions[caption]
            word_ids[offsets[caption] : offsets[caption] + count] = top_ids[row, :count]
            probabilities[offsets[caption] : offsets[caption] + count] = top_probabilities[row, :count]
    return word_ids, probabilities, positions


def teacher_soft_targets(
    features: str | Path,
    dataset: CaptionDataset,
    run_dir: str | Path,
    soft_options: SoftTargetOptions,
    options: TrainingOptions,
    decoder: str,
    resume: bool = False,
    progress: bool = True,
) -> SoftTargets:
    """Stage 1 of word-level distillation: the teacher's top-k next words at every position of every
    human train caption (the captions and vocabulary the student will train on), computed in chunks
    into the run directory; `resume` goes on from the chunks written."""
    run = RunDir(run_dir)
    check_distillation_start(run, resume, "word")
    store = open_feature_store(features)
    try:
        check_soft_target_store(store, features)
        if run.file(CONFIG_FILE).is_file():  # resumed training: the run's decoder, whatever --decoder says
            decoder = run.read_config()["model"].get("decoder", decoder)
        spatial = get_decoder(decoder).reads_regions
        data = prepare_caption_data(store, dataset, options.min_count, limit_train=options.limit_train, spatial=spatial)
        members = load_teacher_members(soft_options.runs, data.vocabulary, store)
        ids, longest = data.train.image_ids, data.max_caption_length
        rows, sequences = encode_captions(ids, data.train.captions, data.vocabulary, longest)
        captions = StudentCaptions(ids, longest, len(data.vocabulary), rows, sequences)
        files = TeacherSoftTargets(run)
        manifest = {"teacher": soft_options.to_dict(), "captions": len(sequences), "captions_sha1": captions.digest}
        files.begin(manifest)
        write_missing_soft_targets(members, store, files, captions, soft_options, progress)
    finally:
        store.close()
    return read_soft_targets(files, captions, soft_options)


@dataclass
class StudentCaptions:
    """The student's train captions, in the order its batches index them."""

    image_ids: list[str]
    max_caption_length: int
    vocabulary_size: int
    rows: np.ndarray  # each caption's image (an index into image_ids)
    sequences: list[list[int]]  # each caption's token ids

    @cached_property
    def digest(self) -> str:
        return caption_digest(self.sequences)


def write_missing_soft_targets(
    members: list[TeacherMember],
    store,
    files: TeacherSoftTargets,
    captions: StudentCaptions,
    soft_options: SoftTargetOptions,
    progress: bool,
) -> None:
    """Compute and write each chunk of soft targets not yet in the run directory."""
    size, total = soft_options.chunk_captions, len(captions.sequences)
    started = time.perf_counter()
    with tqdm(total=total, unit="caption", desc="teacher soft targets", disable=not progress) as bar:
        for index, start in enumerate(range(0, total, size)):
            if not files.chunk_path(index).is_file():
                arrays = soft_targets_of(
                    members,
                    store,
                    captions.image_ids,
                    captions.rows[start : start + size],
                    captions.sequences[start : start + size],
                    captions.max_caption_length,
                    min(soft_options.top_k, captions.vocabulary_size),  # a k past the vocabulary keeps it all
                )
                files.write_chunk(index, *arrays, time.perf_counter() - started)
                started = time.perf_counter()
            bar.update(min(size, total - start))


def read_soft_targets(
    files: TeacherSoftTargets, captions: StudentCaptions, soft_options: SoftTargetOptions
) -> SoftTargets:
    """Return the soft targets of every chunk written, with what made them (for config.json)."""
    chunks = range(-(-len(captions.sequences) // soft_options.chunk_captions))
    parts = [files.read_chunk(index) for index in chunks]
    facts = {
        **soft_options.to_dict(),
        "teacher_captions": len(captions.sequences),
        "teacher_seconds": files.seconds(),
        "soft_targets_folder": TEACHER_DIR,
    }
    word_ids, probabilities, positions = (np.concatenate([part[n] for part in parts]) for n in range(3))
    return SoftTargets(word_ids, probabilities, positions, captions.digest, soft_options.weight, facts)


def train_soft_student(
    features: str | Path,
    dataset: CaptionDataset,
    run_dir: str | Path,
    soft_targets: SoftTargets,
    options: TrainingOptions,
    model_options: dict | None = None,
    verbose: int | None = None,
) -> TrainingResult:
    """Stage 2 of word-level distillation: teacher forcing on the human train captions, each position's
    target mixed with the teacher's distribution (dev: the human words alone, so its loss compares with
    any run's); resumed when the run has a finished epoch. config.json records the teacher under
    "distillation"."""
    resume = RunDir(run_dir).file(STATE_FILE).is_file()
    return train_caption_model(
        features, dataset, run_dir, options, model_options, resume, verbose, soft_targets=soft_targets
    )
