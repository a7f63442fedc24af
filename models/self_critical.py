"""Self-critical sequence training (Rennie et al., 2017): fine-tune a trained caption run on CIDEr-D.

Teacher forcing maximises the likelihood of each next word; the scores captioners are compared on
judge whole sentences. Here the model samples K captions per image, each is scored with CIDEr-D
against that image's references, and a policy gradient raises the log-probability of the captions
that beat the mean of the other K - 1 samples of the same image and lowers the others (the baseline of
Luo, "A better variant of self-critical sequence training", 2020: no extra greedy pass needed).

The reward is pycocoevalcap's own CIDEr-D, with document frequencies taken once from the references
of the whole train split (the scorer would otherwise take them from each small batch), plus, with a
`meteor_weight`, that weight times pycocoevalcap's METEOR of the caption (Java): CIDEr-D alone shortens
captions, which METEOR's recall term punishes. Every epoch the dev split is captioned with beam search
and scored the same way; the best epoch is the model.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

from features.store import open_feature_store
from models.decoders import get_decoder
from models.rundir import CaptionRun, RunDir, load_run
from models.search import DecodingOptions, SpecialTokens, beam_search, sample_captions
from models.training import TrainingError, describe_device
from pipeline.batches import LENGTH_BUCKET
from pipeline.caption_arrays import select_train_dev
from pipeline.captions import SplitCaptions
from pipeline.datasets import CaptionDataset, as_dataset
from pipeline.metrics import stop_meteor
from pipeline.vocabulary import Vocabulary

DEV_CHUNK = 500  # dev images decoded together in one beam search


@dataclass
class SelfCriticalOptions:
    epochs: int = 10
    batch_images: int = 50  # images per update; each contributes `samples` captions
    samples: int = 5
    learning_rate: float = 2e-5  # the best of 1e-5 / 2e-5 / 5e-5 on Flickr8k dev (BENCHMARKS.md)
    max_length: int = 20  # words sampled per caption at most (Flickr8k references average 11)
    patience: int = 3  # stop after this many epochs without a better dev CIDEr-D
    # dev captions for model selection, decoded as infer.py decodes them by default
    dev_decoding: DecodingOptions = field(default_factory=DecodingOptions)
    seed: int = 0
    limit_train: int | None = None  # the first N train images only (quick runs, tests)
    meteor_weight: float = 0.0  # reward = CIDEr-D + meteor_weight * METEOR (0: CIDEr-D alone, no Java)


class _CorpusCiderScorer(CiderScorer):
    """pycocoevalcap's CIDEr-D scorer with the document frequencies of a whole reference corpus.

    `compute_cider` sets `ref_len` to log(number of scored items); here it stays log(corpus size), so
    a batch is scored exactly as if it were part of the corpus.
    """

    def __init__(self, document_frequency: dict, corpus_size: int):
        self._corpus_ref_len = float(np.log(float(corpus_size)))
        super().__init__()
        self.document_frequency = document_frequency

    ref_len = property(lambda self: self._corpus_ref_len, lambda self, value: None)


class CiderReward:
    """CIDEr-D of captions against the references of the image each one describes."""

    def __init__(self, references: dict[str, list[list[str]]]):
        """`references`: image id -> its reference captions as word lists (the corpus for the idf)."""
        self.references = {i: cook_refs([" ".join(words) for words in refs]) for i, refs in references.items()}
        self.document_frequency: dict = defaultdict(float)
        for refs in self.references.values():
            for ngram in {ngram for ref in refs for ngram in ref}:
                self.document_frequency[ngram] += 1
        self.document_frequency = dict(self.document_frequency)

    def __call__(self, image_ids: list[str], captions: list[list[str]]) -> np.ndarray:
        """Return the CIDEr-D of each caption (a word list) against the references of its image."""
        scorer = _CorpusCiderScorer(defaultdict(float, self.document_frequency), len(self.references))
        scorer.crefs = [self.references[i] for i in image_ids]
        scorer.ctest = [cook_test(" ".join(words)) for words in captions]
        return np.asarray(scorer.compute_cider(), dtype=np.float64)


class MeteorReward:
    """METEOR (pycocoevalcap's METEOR 1.5, run in Java) of captions against the references of their image."""

    def __init__(self, references: dict[str, list[list[str]]]):
        if shutil.which("java") is None:
            raise TrainingError("a METEOR reward needs Java: apt-get install default-jre-headless")
        from pycocoevalcap.meteor.meteor import Meteor

        self.references = {i: [" ".join(words) for words in refs] for i, refs in references.items()}
        self._meteor = Meteor()  # one Java process, kept for every call

    def __call__(self, image_ids: list[str], captions: list[list[str]]) -> np.ndarray:
        """Return the METEOR of each caption (a word list) against the references of its image."""
        if not captions:
            return np.zeros(0)
        gts = {k: self.references[i] for k, i in enumerate(image_ids)}
        res = {k: [" ".join(words)] for k, words in enumerate(captions)}
        try:
            return np.asarray(self._meteor.compute_score(gts, res)[1], dtype=np.float64)
        except (OSError, ValueError) as error:  # the Java process died or answered garbage
            stop_meteor(self._meteor)  # also frees the lock pycocoevalcap keeps on an error
            raise TrainingError(f"the METEOR scorer failed: {error}") from None

    def close(self) -> None:
        stop_meteor(self._meteor)


class CaptionReward:
    """The self-critical reward: CIDEr-D, plus `meteor_weight` times METEOR when that weight is not 0."""

    def __init__(self, references: dict[str, list[list[str]]], meteor_weight: float = 0.0):
        self.cider = CiderReward(references)
        self.meteor = MeteorReward(references) if meteor_weight else None
        self.meteor_weight = meteor_weight

    def parts(self, image_ids: list[str], captions: list[list[str]]) -> dict[str, np.ndarray]:
        """Return {"cider_d": ..., "meteor": ... (with a weight), "reward": ...}, one value per caption."""
        parts = {"cider_d": self.cider(image_ids, captions)}
        parts["reward"] = parts["cider_d"]
        if self.meteor is not None:
            parts["meteor"] = self.meteor(image_ids, captions)
            parts["reward"] = parts["cider_d"] + self.meteor_weight * parts["meteor"]
        return parts

    def __call__(self, image_ids: list[str], captions: list[list[str]]) -> np.ndarray:
        return self.parts(image_ids, captions)["reward"]

    def close(self) -> None:
        if self.meteor is not None:
            self.meteor.close()


def leave_one_out_advantages(rewards: np.ndarray, samples: int) -> np.ndarray:
    """Return each sample's reward minus the mean reward of the other samples of the same image.

    `rewards` is image-major: (images * samples,).
    """
    grouped = rewards.reshape(-1, samples)
    others = (grouped.sum(axis=1, keepdims=True) - grouped) / (samples - 1)
    return (grouped - others).reshape(-1)


def teacher_forcing_arrays(
    captions: np.ndarray, start_id: int, end_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (decoder inputs, targets, mask) for sampled captions (rows of ids ending in <end>, 0 after).

    The inputs are `<start>` then the caption without its last token; the mask is 1 on every generated
    token up to and including `<end>`. The width is cut to the longest caption, rounded up to a multiple
    of LENGTH_BUCKET, so only a few shapes get traced.
    """
    mask = np.cumsum(captions == end_id, axis=1) - (captions == end_id) == 0  # True up to the first <end>
    mask &= captions != 0
    longest = int(mask.sum(axis=1).max()) if len(captions) else 1
    width = min(captions.shape[1], max(LENGTH_BUCKET, math.ceil(longest / LENGTH_BUCKET) * LENGTH_BUCKET))
    targets = np.where(mask, captions, 0)[:, :width].astype(np.int32)
    inputs = np.concatenate([np.full((len(captions), 1), start_id, np.int32), targets[:, :-1]], axis=1)
    return inputs, targets, mask[:, :width].astype(np.float32)


def policy_gradient_update(model: keras.Model, optimizer: keras.optimizers.Optimizer):
    """Return a traced update: (inputs, targets, mask, advantages) -> loss, one optimizer step.

    The loss is -sum(advantage * log p(word)) over the masked words, divided by their number: a
    caption with a positive advantage becomes more probable, one with a negative advantage less.
    Dropout stays off, so the gradient is that of the distribution the captions were sampled from.
    """

    @tf.function(reduce_retracing=True)
    def update(inputs, targets, mask, advantages):
        with tf.GradientTape() as tape:
            probabilities = model(inputs, training=False)
            picked = tf.gather(probabilities, targets, batch_dims=2)
            log_probs = tf.math.log(tf.maximum(picked, 1e-12))
            loss = -tf.reduce_sum(advantages[:, None] * log_probs * mask) / tf.reduce_sum(mask)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss

    return update


@dataclass
class SelfCriticalResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_dev_score: float
    start_dev_score: float
    seconds: float
    device: str
    criterion: str  # what the dev score is: "CIDEr-D" or "CIDEr-D + w * METEOR"


class _FeatureSource:
    """The decoder's input for image ids, from either kind of feature store: pooled vectors, or maps."""

    def __init__(self, features: str | Path, reads_regions: bool):
        self.store = open_feature_store(features)
        self.spatial = reads_regions
        if reads_regions:
            self.store.require_spatial()
        self.input_name = "regions" if reads_regions else "image"

    def ids(self) -> set[str]:
        return self.store.image_ids(self.spatial)

    def chunks(self, image_ids: list[str], size: int, shuffle_seed: int | None = None):
        """Yield (ids, features) for `image_ids`, `size` at a time: in that order from a store in memory,
        in the shards' order (shuffled by `shuffle_seed`) from a sharded one."""
        return self.store.chunks(image_ids, size, self.spatial, shuffle_seed)

    def close(self) -> None:
        self.store.close()


@dataclass
class _Session:
    """Everything the epochs of one self-critical run share."""

    run: RunDir
    decoder: str
    model: keras.Model
    vocabulary: Vocabulary
    source: _FeatureSource
    train: SplitCaptions
    dev: SplitCaptions
    options: SelfCriticalOptions
    dev_decoding: DecodingOptions  # with the run's max caption length filled in
    verbose: bool
    train_reward: CaptionReward | None = None
    dev_reward: CaptionReward | None = None

    def __post_init__(self) -> None:
        self.stepper = get_decoder(self.decoder).stepper(self.model)
        self.tokens = SpecialTokens.of(self.vocabulary)
        self.update = policy_gradient_update(self.model, self.model.optimizer)

    @property
    def criterion(self) -> str:
        weight = self.options.meteor_weight
        return f"CIDEr-D + {weight:g} * METEOR" if weight else "CIDEr-D"

    @property
    def score_column(self) -> str:
        return "dev_reward" if self.options.meteor_weight else "dev_cider_d"

    def open_rewards(self) -> None:
        self.train_reward = CaptionReward(self.train.captions, self.options.meteor_weight)
        self.dev_reward = CaptionReward(self.dev.captions, self.options.meteor_weight)

    def close(self) -> None:
        for reward in (self.train_reward, self.dev_reward):
            if reward is not None:
                reward.close()


def self_critical_train(
    init_run: str | Path,
    features: str | Path,
    dataset: CaptionDataset | str | Path,
    run_dir: str | Path,
    options: SelfCriticalOptions,
    resume: bool = False,
    verbose: bool = True,
) -> SelfCriticalResult:
    """Fine-tune `init_run`'s model on CIDEr-D and write a new run directory (resumable) to `run_dir`."""
    dataset, run = as_dataset(dataset), RunDir(run_dir)
    run.check_start(resume)
    check_options(options)
    keras.utils.set_random_seed(options.seed)
    source_run = load_run(run_dir if resume else init_run)
    source = _FeatureSource(features, source_run.model_config.reads_regions)
    session = None
    try:
        train, dev = usable_splits(source, source_run, features, dataset, options)
        model, rows = (
            resume_state(run, source_run, options)
            if resume
            else start_run(run, init_run, source_run, features, dataset, train, dev, options)
        )
        decoding = options.dev_decoding.with_max_length(source_run.model_config.max_caption_length)
        decoder = source_run.model_config.decoder
        session = _Session(run, decoder, model, source_run.vocabulary, source, train, dev, options, decoding, verbose)
        session.open_rewards()
        started = time.perf_counter()
        scores = run_epochs(session, rows or score_start(session))
    finally:
        if session is not None:
            session.close()
        source.close()
    best = int(np.argmax(scores))
    return SelfCriticalResult(
        run.path,
        len(scores) - 1,
        best,
        scores[best],
        scores[0],
        time.perf_counter() - started,
        describe_device(),
        session.criterion,
    )


def check_options(options: SelfCriticalOptions) -> None:
    if options.samples < 2:
        raise TrainingError(
            "self-critical training needs at least 2 samples per image (the baseline is the others' mean)"
        )
    if options.meteor_weight < 0:
        raise TrainingError("the METEOR weight must not be negative")


def usable_splits(
    source: _FeatureSource, source_run: CaptionRun, features: str | Path, dataset: CaptionDataset, options
) -> tuple[SplitCaptions, SplitCaptions]:
    """Return the train and dev captions of images with features made by the run's encoder."""
    config, feature_dim = source_run.config, source_run.model_config.feature_dim
    if source.store.encoder != config["encoder"] or source.store.dim != feature_dim:
        raise TrainingError(
            f"{features}: features of {source.store.encoder} ({source.store.dim}-d), but {source_run.path} was "
            f"trained on {config['encoder']} ({feature_dim}-d)"
        )
    train, dev = select_train_dev(dataset, source.ids(), options.limit_train)
    if not train.image_ids or not dev.image_ids:
        raise TrainingError(f"{dataset.root}: self-critical training needs train and dev images with features")
    return train, dev


def resume_state(run: RunDir, source_run: CaptionRun, options: SelfCriticalOptions) -> tuple[keras.Model, list]:
    """Return the last checkpoint's model (with its optimizer) and the history up to it."""
    trained_weight = source_run.config.get("self_critical", {}).get("meteor_weight", 0.0)
    if trained_weight != options.meteor_weight:
        raise TrainingError(
            f"{run.path} was trained with METEOR weight {trained_weight:g}; resume it with the same weight"
        )
    epochs_done = run.epochs_done()
    return run.load_checkpoint(), [r for r in run.read_history() if int(r["epoch"]) <= epochs_done]


def start_run(
    run: RunDir,
    init_run,
    source_run: CaptionRun,
    features,
    dataset: CaptionDataset,
    train: SplitCaptions,
    dev: SplitCaptions,
    options,
) -> tuple[keras.Model, list]:
    """Return the starting run's model, compiled, after writing the new run's vocabulary and config.

    The top-level data facts stay the starting run's (what teacher forcing read); `self_critical`
    records the dataset this stage read, which may differ (another folder, `--mirror`)."""
    model = source_run.model
    model.compile(optimizer=keras.optimizers.Adam(options.learning_rate), loss="sparse_categorical_crossentropy")
    run.copy_vocabulary_from(RunDir(init_run))
    run.write_config(
        {
            **source_run.config,
            "self_critical": {
                **asdict(options),
                "init_run": str(init_run),
                "features": str(features),
                **dataset.run_facts(),
            },
            "train_images": len(train.image_ids),
            "dev_images": len(dev.image_ids),
        }
    )
    return model, []


def score_start(session: _Session) -> list[dict]:
    """Return the history's first row, epoch 0: the starting model's dev scores, which it is saved with."""
    start = dev_scores(session)
    rows = [{"epoch": 0, "mean_reward": "", **start, "seconds": "0"}]
    session.run.write_history(rows)
    session.run.save_model(session.model)
    if session.verbose:
        print(
            f"self-critical training on {describe_device()}: {len(session.train.image_ids)} train images; "
            f"dev {session.criterion} at start {start[session.score_column]}"
        )
    return rows


def run_epochs(session: _Session, rows: list[dict]) -> list[float]:
    """Train epoch after epoch until the last or until patience runs out; return each epoch's dev score."""
    options, column = session.options, session.score_column
    scores = [float(r[column]) for r in rows]
    for epoch in range(int(rows[-1]["epoch"]) + 1, options.epochs + 1):
        if len(scores) - 1 - int(np.argmax(scores)) >= options.patience:
            break
        started = time.perf_counter()
        mean_reward = train_epoch(session, epoch)
        scores_now = dev_scores(session)
        if float(scores_now[column]) > max(scores):
            session.run.save_model(session.model)
        scores.append(float(scores_now[column]))
        seconds = time.perf_counter() - started
        rows.append({"epoch": epoch, "mean_reward": f"{mean_reward:.4f}", **scores_now, "seconds": f"{seconds:.0f}"})
        session.run.write_history(rows)
        session.run.save_checkpoint(session.model, epoch)
        if session.verbose:
            shown = ", ".join(f"{k.removeprefix('dev_')} {v}" for k, v in scores_now.items())
            print(
                f"\repoch {epoch}/{options.epochs}: mean train reward ({session.criterion} of samples) "
                f"{mean_reward:.4f}, dev (beam {session.dev_decoding.beam}) {shown}, {seconds:.0f} s"
            )
    return scores


def train_epoch(session: _Session, epoch: int) -> float:
    """Run one epoch of policy-gradient updates; return the mean reward of the sampled captions."""
    options, train = session.options, session.train
    rng = np.random.default_rng([options.seed, epoch])  # per epoch, so a resumed run draws the same
    order = [train.image_ids[i] for i in rng.permutation(len(train.image_ids))]
    rewards_seen, done = [], 0
    for ids, image_features in session.source.chunks(order, options.batch_images, options.seed * 100_003 + epoch):
        rewards_seen.append(update_batch(session, ids, image_features, rng))
        done += len(ids)
        if session.verbose and sys.stdout.isatty():
            print(f"\repoch {epoch}: {done}/{len(order)} images, mean reward {np.mean(rewards_seen):.4f}", end="")
    return float(np.mean(rewards_seen))


def update_batch(session: _Session, ids: list[str], image_features: np.ndarray, rng: np.random.Generator) -> float:
    """Sample captions for `ids` (whose features are given), reward them, take one policy-gradient step;
    return the mean reward."""
    options, vocabulary = session.options, session.vocabulary
    sampled = sample_captions(session.stepper, image_features, options.samples, options.max_length, rng, session.tokens)
    repeated_ids = [i for i in ids for _ in range(options.samples)]
    rewards = session.train_reward(repeated_ids, [vocabulary.decode(row) for row in sampled])
    inputs, targets, mask = teacher_forcing_arrays(sampled, vocabulary.start_id, vocabulary.end_id)
    session.update(
        {session.source.input_name: np.repeat(image_features, options.samples, axis=0), "words": inputs},
        targets,
        mask,
        leave_one_out_advantages(rewards, options.samples).astype(np.float32),
    )
    return float(rewards.mean())


def dev_scores(session: _Session) -> dict[str, str]:
    """Return the history columns of the dev split: the mean CIDEr-D of its beam-search captions (decoded
    in chunks) and, with a METEOR term, their mean METEOR and mean reward."""
    image_ids, words = [], []
    for chunk, image_features in session.source.chunks(session.dev.image_ids, DEV_CHUNK):
        found = beam_search(session.stepper, image_features, session.dev_decoding, session.tokens)
        words += [session.vocabulary.decode(hypotheses[0].tokens) for hypotheses in found]
        image_ids += chunk
    parts = session.dev_reward.parts(image_ids, words)
    scores = {"dev_cider_d": f"{parts['cider_d'].mean():.4f}"}
    if "meteor" in parts:
        scores.update(dev_meteor=f"{parts['meteor'].mean():.4f}", dev_reward=f"{parts['reward'].mean():.4f}")
    return scores
