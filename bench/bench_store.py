"""Feature stores at COCO's size: the pickle store against TFRecord shards streamed through tf.data.

    nice -n 10 python bench/bench_store.py [--sizes 1000 10000 113287] [--steps 200] [--skip-flickr]

1. Write cost per image at 1k, 10k and 113k images (synthetic: random 1280-d vectors, efficientnet_lite0's
   size), side by side at each size: the pickle store as extraction writes it (`_StoreWriter`, the
   whole pickle rewritten every 512 images) and shards as extraction writes them (`ShardWriter`,
   1024 images a shard, float16). "Marginal" is one flush at that store size divided by the images it
   adds (what the next image costs); "whole run" writes the store from empty. The pickle's whole run at
   113k (221 flushes, 64 GB written) is extrapolated from its marginal costs, which are linear in size.
2. Training memory and speed at 10k vs 113k images (each in its own process): a Karpathy split JSON of
   N train images + 500 dev images, 5 captions each sampled from the Flickr8k caption pool; the merge
   model (units 256), batch 64, a warm-up then `--steps` timed steps of `model.fit` from the shards
   (streamed) and, for contrast, from a pickle store. Peak RSS is the process's high-water mark during
   the steps (reset after the data is prepared); "after preparing" is the RSS once captions are read,
   cleaned, counted into a vocabulary and encoded: what grows with the captions (vocabulary aside);
   "while training" is what the steps add on top (features, shuffle buffer, batches, the model). From
   shards, as train.py does, the captions are read, cleaned and encoded in a spawned child process
   (pipeline/caption_arrays.py); the training process never holds them (the child's own peak is not
   measured here: `RUSAGE_CHILDREN` would mix in every other child; see BENCHMARKS.md).
3. Classifier training memory and speed at 10k vs 113k images (each in its own process; the same
   synthetic stores, image n of class n % 10): the dense head (256 units), batch 64, `--passes` whole
   passes over the images (the same number at every size), timed after `--warmup` steps; streamed
   from the shards (`classifier.streaming.LabelledStream`, what `classify.py train` does with a
   sharded store), the same with glibc's default malloc arenas instead of the 2 that the scripts set
   (`cli.limit_malloc_arenas`), and, for contrast, from the pickle store's vectors read into an array
   (`LabelledBatches`, what it does with a pickle).
4. One teacher-forcing epoch on the real Flickr8k features from the pickle store and from shards
   converted from it (float32, exact), for each of `--seeds`, interleaved: seconds, and the dev loss per
   word of the saved model on the same dev batches for every run (the val_loss `fit` reports is a mean
   over batches, which the two batchings weigh differently).
5. Float16 pooled vectors on the real Flickr8k dev split, the shipped model's seed0 member: dev loss
   and beam-3 captions with float32 vs float16-rounded features.

Writes `bench/results_store.md`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import DEFAULT_DATA, DEFAULT_STORE, Report, markdown_table  # noqa: E402

DIM = 1280
META = {"encoder": "efficientnet_lite0", "image_size": 224, "preprocessing": "(x - 127) / 128",
        "weights": "none", "dim": DIM, "spatial": False}  # fmt: skip
DEV_IMAGES = 500
FLUSH_EVERY = 512
PARTS = ("write", "train", "classifier", "flickr")
CLASSES = 10  # the synthetic classifier's classes: image n is of class n % CLASSES
DEFAULT_ARENAS = "shards, glibc's default arenas"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 113287], help="store sizes (images)")
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[10000, 113287], help="train images")
    parser.add_argument("--steps", type=int, default=200, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--passes", type=int, default=20, help="classifier: passes over the images per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="seeds of the Flickr8k epochs")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--features", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--skip-flickr", action="store_true", help="leave out parts 3 and 4 (real features)")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="what to run (default all; a part alone writes bench/results_store_<parts>.md)",
    )
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--out", type=Path, help="results page (default bench/results_store.md)")
    parser.add_argument(
        "--train-child", nargs=4, metavar=("KIND", "FEATURES", "DATA", "JSON_OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--classifier-child", nargs=3, metavar=("KIND", "FEATURES", "JSON_OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.skip_flickr and "flickr" in args.parts:
        args.parts.remove("flickr")
    if args.out is None:
        whole = set(args.parts) == set(PARTS)
        args.out = ROOT / "bench" / ("results_store.md" if whole else f"results_store_{'_'.join(args.parts)}.md")
    return args


# ---- 1. write cost ----


def pickle_marginal(count: int, repeats: int = 3) -> float:
    """Return the seconds one flush costs with `count` images in the pickle store (mean of `repeats`)."""
    from features.store import FeatureStore

    rng = np.random.default_rng(count)
    store = FeatureStore(dict(META), {f"{i:06d}.jpg": rng.random(DIM, dtype=np.float32) for i in range(count)})
    folder = Path(tempfile.mkdtemp(dir=WORK))
    started = time.perf_counter()
    for _ in range(repeats):
        store.save(folder / "store.pkl")
    seconds = (time.perf_counter() - started) / repeats
    shutil.rmtree(folder)
    return seconds


def pickle_whole_run(count: int) -> float:
    """Return the seconds the pickle writer takes to write `count` images from empty, flushing every 512."""
    from features.extract import _StoreWriter
    from features.store import FeatureStore

    folder = Path(tempfile.mkdtemp(dir=WORK))
    writer = _StoreWriter(FeatureStore(dict(META)), folder / "store.pkl", False, FLUSH_EVERY)
    seconds = _feed(writer, count)
    shutil.rmtree(folder)
    return seconds


def shards_whole_run(count: int) -> tuple[float, float, int]:
    """Return (seconds for `count` images from empty, seconds of the last shard per its image, bytes)."""
    from features.shards import ShardWriter

    folder = Path(tempfile.mkdtemp(dir=WORK))
    writer = ShardWriter(folder / "store", META, 1024, "float16")
    seconds = _feed(writer, count)
    last = _feed(writer, 1024, offset=count)  # one more shard at this size: the marginal cost
    size = sum(p.stat().st_size for p in (folder / "store").iterdir())
    shutil.rmtree(folder)
    return seconds, last / 1024, size


def _feed(writer, count: int, offset: int = 0, batch: int = 32) -> float:
    """Add `count` random vectors in extraction-sized batches and finish; return the seconds."""
    rng = np.random.default_rng(offset)
    vectors = rng.random((batch, DIM), dtype=np.float32)
    started = time.perf_counter()
    for start in range(offset, offset + count, batch):
        ids = [f"{i:06d}.jpg" for i in range(start, min(start + batch, offset + count))]
        writer.add(ids, vectors[: len(ids)])
    writer.finish()
    return time.perf_counter() - started


def write_costs(sizes: list[int]) -> tuple[str, dict]:
    """Return the write-cost table and {size: figures}, pickle and shards timed one after the other per size."""
    rows, figures = [], {}
    for count in sizes:
        marginal = pickle_marginal(count) / FLUSH_EVERY
        if count <= 20_000:
            whole = pickle_whole_run(count) / count
        else:  # the sum of its flushes' costs, each linear in the store's size (fitted below)
            whole = None
        seconds, shard_marginal, size = shards_whole_run(count)
        figures[count] = {"pickle_marginal": marginal, "pickle_whole": whole, "shards_whole": seconds / count,
                          "shards_marginal": shard_marginal, "bytes": size}  # fmt: skip
        print(
            f"write {count}: pickle {1e6 * marginal:.0f} us/img marginal, shards {1e6 * seconds / count:.0f} us/img",
            flush=True,
        )
    slope = np.polyfit(list(figures), [f["pickle_marginal"] for f in figures.values()], 1)
    for count, f in figures.items():
        if f["pickle_whole"] is None:
            flushes = np.arange(FLUSH_EVERY, count + FLUSH_EVERY, FLUSH_EVERY)
            f["pickle_whole"] = float(np.polyval(slope, flushes).sum() * FLUSH_EVERY / count)
        pickle_bytes = sum(
            min(n, count) * (DIM * 4 + 150) for n in range(FLUSH_EVERY, count + FLUSH_EVERY, FLUSH_EVERY)
        )
        rows.append([f"{count:,}", f"{1e6 * f['pickle_marginal']:.0f}", f"{1e6 * f['pickle_whole']:.0f}"
                     + ("" if count <= 20_000 else " (extrapolated)"), f"{pickle_bytes / 1e9:.1f}",
                     f"{1e6 * f['shards_marginal']:.0f}", f"{1e6 * f['shards_whole']:.0f}",
                     f"{f['bytes'] / 1e6 * count / (count + 1024):.0f}", f"{f['bytes'] / (count + 1024):.0f}"])  # fmt: skip
    headers = ["images", "pickle: us/image, marginal", "pickle: us/image, whole run", "pickle: GB written",
               "shards: us/image, marginal", "shards: us/image, whole run", "shards: MB on disk", "shards: bytes/image"]  # fmt: skip
    return markdown_table(headers, rows), figures


# ---- 2. training memory and speed ----


def synthetic_dataset(folder: Path, train: int, seed: int = 0) -> Path:
    """Write a Karpathy split JSON of `train` + DEV_IMAGES images, 5 captions each from the Flickr8k pool."""
    from pipeline.captions import read_token_file

    pool = [c for captions in read_token_file(ARGS.data / "Flickr8k.token.txt").values() for c in captions]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pool), size=(train + DEV_IMAGES, 5))
    images = [
        {"filename": f"{n:06d}.jpg", "split": "train" if n < train else "val",
         "sentences": [{"raw": pool[k]} for k in row]}
        for n, row in enumerate(picks)
    ]  # fmt: skip
    path = folder / f"dataset_synthetic_{train}.json"
    path.write_text(json.dumps({"images": images, "dataset": "synthetic"}))
    return path


def synthetic_stores(folder: Path, train: int) -> dict[str, Path]:
    """Write random-vector stores (shards, and a pickle for contrast) of `train` + DEV_IMAGES images."""
    from features.shards import ShardWriter
    from features.store import FeatureStore

    count, rng = train + DEV_IMAGES, np.random.default_rng(train)
    writer = ShardWriter(folder / f"shards_{train}", META, 1024, "float16")
    pickled = FeatureStore(dict(META))
    for start in range(0, count, 4096):
        ids = [f"{i:06d}.jpg" for i in range(start, min(start + 4096, count))]
        vectors = rng.random((len(ids), DIM), dtype=np.float32).astype(np.float16)
        writer.add(ids, vectors)
        pickled.features.update(zip(ids, vectors.astype(np.float32), strict=True))
    writer.finish()
    pickled.save(folder / f"store_{train}.pkl")
    return {"shards": folder / f"shards_{train}", "pickle": folder / f"store_{train}.pkl"}


def pool_vocabulary():
    """Return the vocabulary of the Flickr8k caption pool (min count 5): the same at every size, so that
    memory and speed compare the stores and the data's size, not two vocabularies."""
    from pipeline.captions import clean_caption, read_token_file
    from pipeline.vocabulary import Vocabulary

    pool = read_token_file(ARGS.data / "Flickr8k.token.txt")
    return Vocabulary.build([clean_caption(c) for captions in pool.values() for c in captions], 5)


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_child(kind: str, features: str, data: str, out: str) -> None:
    """In a fresh process: prepare the data, reset the RSS high-water mark, time `--steps` training steps."""
    from cli import limit_malloc_arenas

    limit_malloc_arenas()  # as train.py does before TensorFlow starts
    import keras

    from features.store import open_feature_store
    from models.config import CaptionModelConfig
    from models.training import build_caption_model, caption_batches, compile_caption_model, prepare_caption_data
    from pipeline.caption_arrays import CaptionSelection, encode_caption_data_apart
    from pipeline.datasets import open_dataset

    keras.utils.set_random_seed(0)
    started_rss = rss_mb()
    store, dataset = open_feature_store(features), open_dataset(data)
    if store.in_memory:  # as train.py prepares each kind (models.training.load_training_inputs)
        data_, encoded = prepare_caption_data(store, dataset, 5, pool_vocabulary()), None
    else:
        encoded = encode_caption_data_apart(dataset, store.image_ids(), CaptionSelection(5, pool_vocabulary()))
        data_ = encoded.data
    batches = caption_batches(store, data_.train, data_, 64, True, 0, False, encoded and encoded.train)
    config = CaptionModelConfig(vocab_size=len(data_.vocabulary), max_caption_length=data_.max_caption_length,
                                feature_dim=store.dim)  # fmt: skip
    model = build_caption_model(config)
    compile_caption_model(model, 1e-3)
    prepared_rss, prepared_peak = rss_mb(), rss_mb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on is training's
    times: list[float] = []
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: times.append(time.perf_counter()))
    model.fit(batches.as_dataset().take(ARGS.warmup + ARGS.steps), epochs=1, verbose=0, callbacks=[timer])
    result = {
        "kind": kind, "captions": batches.caption_count, "vocabulary": len(data_.vocabulary),
        "rss_start_mb": started_rss, "rss_prepared_mb": prepared_rss, "peak_preparing_mb": prepared_peak,
        "peak_training_mb": rss_mb("VmHWM"), "steps_per_s": ARGS.steps / (times[-1] - times[ARGS.warmup - 1]),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip
    Path(out).write_text(json.dumps(result))


def run_child(flag: str, *args, out: Path) -> dict:
    """Run this script as `flag`'s child in a fresh process (a clean RSS high-water mark); return its figures."""
    command = [sys.executable, __file__, flag, *map(str, args), str(out),
               "--steps", str(ARGS.steps), "--warmup", str(ARGS.warmup), "--passes", str(ARGS.passes)]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def training_runs(sizes: list[int]) -> tuple[str, dict]:
    """Return the training table and figures: each size and store kind in its own process."""
    figures = {}
    for train in sizes:
        folder = WORK / f"train_{train}"
        folder.mkdir(exist_ok=True)
        data, stores = synthetic_dataset(folder, train), synthetic_stores(folder, train)
        for kind in ("shards", "pickle"):
            f = figures[(train, kind)] = run_child(
                "--train-child", kind, stores[kind], data, out=folder / f"{kind}.json"
            )
            print(
                f"train {train} {kind}: {f['steps_per_s']:.2f} steps/s, peak {f['peak_training_mb']:.0f} MB", flush=True
            )
        shutil.rmtree(folder)
    rows = [[f"{train:,}", kind, f"{f['captions']:,}", f"{f['vocabulary']:,}", f"{f['rss_prepared_mb']:.0f}",
             f"{f['peak_preparing_mb']:.0f}", f"{f['peak_training_mb']:.0f}",
             f"{f['peak_training_mb'] - f['rss_prepared_mb']:.0f}", f"{f['steps_per_s']:.2f}"]
            for (train, kind), f in figures.items()]  # fmt: skip
    headers = ["train images", "store", "train captions", "vocabulary", "RSS after preparing (MB)",
               "peak while preparing (MB)", "peak RSS while training (MB)", "added while training (MB)",
               "steps/s (batch 64)"]  # fmt: skip
    return markdown_table(headers, rows), figures


# ---- 3. classifier memory and speed ----


def classifier_child(kind: str, features: str, out: str) -> None:
    """In a fresh process: the train images' labels and batches, then `--steps` timed steps of the dense head."""
    from cli import limit_malloc_arenas

    if kind != DEFAULT_ARENAS:
        limit_malloc_arenas()  # what every script does before TensorFlow starts (cli.import_tensorflow_quietly)
    import keras

    from classifier.classes import LabelledBatches
    from classifier.model import ClassifierConfig, build_classifier, compile_classifier
    from classifier.streaming import LabelledPart, LabelledStream, keras_data
    from features.store import open_feature_store

    keras.utils.set_random_seed(0)
    store = open_feature_store(features)
    labels = {image_id: int(image_id.split(".")[0]) % CLASSES for image_id in sorted(store.image_ids())}
    if store.in_memory:  # as classifier.training.TrainingData.batches does for each kind of store
        batches = LabelledBatches(store.matrix(list(labels)), np.array(list(labels.values())), 64)
        data, steps = batches, None
    else:
        batches = LabelledStream([LabelledPart(store, labels)], 64, seed=0)
        data, steps = keras_data(batches, repeat=True)
    epochs = ARGS.passes  # whole passes, as training runs them: the same number at every size
    model = build_classifier(ClassifierConfig(CLASSES, DIM, (7, 7, DIM)))
    compile_classifier(model, 1e-3)
    prepared_rss = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on is training's
    times: list[float] = []
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: times.append(time.perf_counter()))
    model.fit(data, steps_per_epoch=steps, epochs=epochs, verbose=0, callbacks=[timer])
    timed = len(times) - ARGS.warmup  # every step after the warm-up, to the end of the last pass
    result = {"kind": kind, "images": len(labels), "rss_prepared_mb": prepared_rss, "passes": epochs,
              "steps": timed, "peak_training_mb": rss_mb("VmHWM"),
              "steps_per_s": timed / (times[-1] - times[ARGS.warmup - 1])}  # fmt: skip
    Path(out).write_text(json.dumps(result))


def classifier_runs(sizes: list[int]) -> tuple[str, dict]:
    """Return the classifier table and figures: each size and store kind in its own process."""
    figures = {}
    for train in sizes:
        folder = WORK / f"classifier_{train}"
        folder.mkdir(exist_ok=True)
        stores = synthetic_stores(folder, train)
        for n, kind in enumerate(("shards", DEFAULT_ARENAS, "pickle")):
            store = stores[kind.split(",")[0]]
            f = figures[(train, kind)] = run_child(
                "--classifier-child", kind, store, out=folder / f"classifier_{n}.json"
            )
            print(
                f"classifier {train} {kind}: {f['steps_per_s']:.1f} steps/s, peak {f['peak_training_mb']:.0f} MB",
                flush=True,
            )
        shutil.rmtree(folder)
    rows = [[f"{f['images']:,}", kind, str(f["passes"]), f"{f['steps']:,}", f"{f['rss_prepared_mb']:.0f}",
             f"{f['peak_training_mb']:.0f}", f"{f['steps_per_s']:.1f}"] for (_, kind), f in figures.items()]  # fmt: skip
    headers = ["images", "store", "passes", "timed steps", "RSS with the batches ready (MB)",
               "peak RSS while training (MB)", "steps/s (batch 64)"]  # fmt: skip
    return markdown_table(headers, rows), figures


# ---- 4. a real epoch, shards vs pickle ----


def flickr_epochs() -> tuple[str, dict]:
    """Return the table and figures of one teacher-forcing epoch from each store, seed by seed, interleaved."""
    from features.shards import convert_store
    from models.training import TrainingOptions, train_caption_model

    shards = convert_store(ARGS.features, WORK / "flickr8k_shards")
    figures: dict[tuple[int, str], dict] = {}
    for seed in ARGS.seeds:
        for kind, features in (("pickle", ARGS.features), ("shards", shards.path)):
            options = TrainingOptions(epochs=1, batch_size=64, seed=seed)
            result = train_caption_model(features, ARGS.data, WORK / f"run_{kind}_{seed}", options, verbose=0)
            per_word = per_word_dev_loss(WORK / f"run_{kind}_{seed}")
            figures[(seed, kind)] = {"seconds": result.seconds, "val_loss": result.best_val_loss, "dev_loss": per_word}
            print(f"flickr8k seed {seed} {kind}: {result.seconds:.0f} s, dev loss {per_word:.4f}", flush=True)
    rows = [[str(seed), kind, f"{f['seconds']:.0f}", f"{f['val_loss']:.4f}", f"{f['dev_loss']:.4f}"]
            for (seed, kind), f in figures.items()]  # fmt: skip
    headers = ["seed", "store", "seconds for the epoch (incl. dev loss)", "val_loss as fit reports it",
               "dev loss per word, the same batches for all"]  # fmt: skip
    return markdown_table(headers, rows), figures


def per_word_dev_loss(run_dir: Path) -> float:
    """Return the run's mean loss per dev word, on the pickle store's dev batches (the same for every run)."""
    from features.store import FeatureStore
    from models.rundir import load_run
    from models.training import caption_sequence, prepare_caption_data
    from pipeline.datasets import open_dataset

    run, store = load_run(run_dir), FeatureStore.load(ARGS.features)
    data = prepare_caption_data(store, open_dataset(ARGS.data), 5, run.vocabulary)
    data.max_caption_length = run.model_config.max_caption_length
    batches = caption_sequence(store, data.dev, data, 64, False)
    total = words = 0.0
    for index in range(len(batches)):
        inputs, targets, weights = batches[index]
        probabilities = np.asarray(run.model(inputs, training=False))
        picked = np.take_along_axis(probabilities, targets[..., None], -1)[..., 0]
        total += float(-(np.log(np.maximum(picked, 1e-12)) * weights).sum())
        words += float(weights.sum())
    return total / words


# ---- 5. float16 vectors ----


def float16_effect() -> tuple[str, dict]:
    """Return the table and figures of the shipped seed0 member on dev with float32 vs float16 features."""
    from features.store import FeatureStore
    from models.captioner import Captioner
    from models.rundir import load_run
    from models.search import DecodingOptions
    from models.training import caption_sequence, compile_caption_model, prepare_caption_data
    from pipeline.datasets import open_dataset

    store = FeatureStore.load(ARGS.features)
    run = load_run(ROOT / "pretrained" / "flickr8k_merge_lite0" / "seed0")
    data = prepare_caption_data(store, open_dataset(ARGS.data), 5, run.vocabulary)
    data.max_caption_length = run.model_config.max_caption_length
    compile_caption_model(run.model, 1e-3)
    rounded = FeatureStore(
        store.metadata, {k: v.astype(np.float16).astype(np.float32) for k, v in store.features.items()}
    )
    ids, figures = data.dev.image_ids, {}
    captioner = Captioner(run)
    for name, source in (("float32", store), ("float16", rounded)):
        loss = run.model.evaluate(caption_sequence(source, data.dev, data, 64, False).as_dataset(), verbose=0)[0]
        found = captioner.caption_features(ids, source.matrix(ids), DecodingOptions(beam=3))
        figures[name] = {"loss": loss, "captions": [c.caption for c in found]}
    m = store.matrix(sorted(store.features))
    error = np.abs(m.astype(np.float16).astype(np.float32) - m)
    same = sum(a == b for a, b in zip(figures["float32"]["captions"], figures["float16"]["captions"], strict=True))
    figures["same_captions"], figures["max_error"], figures["max_value"] = same, float(error.max()), float(m.max())
    rows = [[name, f"{figures[name]['loss']:.7f}"] for name in ("float32", "float16")]
    table = markdown_table(["pooled vectors", "dev loss (shipped seed0 member, teacher forcing)"], rows)
    return table + f"\n\nBeam-3 dev captions identical: {same} of {len(ids)}; largest rounding error "  \
        f"{figures['max_error']:.5f} on values up to {figures['max_value']:.2f}.", figures  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    global ARGS, WORK
    ARGS = parse_args(argv)
    if ARGS.train_child:
        train_child(*ARGS.train_child)
        return 0
    if ARGS.classifier_child:
        classifier_child(*ARGS.classifier_child)
        return 0
    WORK = ARGS.work or Path(tempfile.mkdtemp(prefix="bench_store_"))
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        sections, figures = build_sections()
    finally:
        if ARGS.work is None:
            shutil.rmtree(WORK, ignore_errors=True)
    summary = __doc__.split("\n\n", 2)[2].split("Writes `bench")[0].strip()
    page = Report("Feature stores at COCO's size: pickle vs TFRecord shards (issue 18)", summary,
                  sections=[targets_table(figures), *sections])  # fmt: skip
    page.write(ARGS.out)
    return 0


def build_sections() -> tuple[list[str], dict]:
    sections, figures = [], {}
    if "write" in ARGS.parts:
        table, figures["write"] = write_costs(ARGS.sizes)
        sections += ["## Write cost per image", table]
    if "train" in ARGS.parts:
        table, figures["train"] = training_runs(ARGS.train_sizes)
        sections += ["## Training memory and speed (synthetic, merge model, batch 64)", table]
    if "classifier" in ARGS.parts:
        table, figures["classifier"] = classifier_runs(ARGS.train_sizes)
        sections += ["## Classifier training memory and speed (synthetic, dense head, batch 64)", table]
    if "flickr" in ARGS.parts:
        table, figures["flickr"] = flickr_epochs()
        sections += ["## One teacher-forcing epoch on the real Flickr8k features", table]
        table, figures["float16"] = float16_effect()
        sections += ["## Float16 pooled vectors", table]
    Path(WORK / "figures.json").write_text(json.dumps({k: str(v) for k, v in figures.items()}))
    return sections, figures


def targets_table(figures: dict) -> str:
    """Return the issue's targets, measured, as a table."""
    rows = []
    if "write" in figures:
        write = figures["write"]
        small, large = min(write), max(write)
        growth = write[large]["shards_whole"] / write[small]["shards_whole"]
        rows.append([f"shards: cost per image at {large:,} vs {small:,}", f"{growth:.2f}x", "<= 1.5x", growth <= 1.5])
    train = figures.get("train", {})
    sizes = sorted({t for t, _ in train})
    if len(sizes) >= 2:
        low, high = train[(sizes[0], "shards")], train[(sizes[-1], "shards")]
        versus = f"at {sizes[-1]:,} vs {sizes[0]:,}"
        rss = high["peak_training_mb"] / low["peak_training_mb"] - 1
        added = [f["peak_training_mb"] - f["rss_prepared_mb"] for f in (low, high)]
        speed = high["steps_per_s"] / low["steps_per_s"]
        rows.append([f"streamed training: whole process's peak RSS {versus}", f"{rss:+.1%}", "<= +15%", rss <= 0.15])
        rows.append([f"streamed training: RSS added by training, captions aside, {versus}",
                     f"{added[1] / added[0] - 1:+.1%} ({added[0]:.0f} -> {added[1]:.0f} MB)", "<= +15%",
                     added[1] / added[0] <= 1.15])  # fmt: skip
        rows.append([f"streamed training: steps/s {versus}", f"{speed:.2f}x", ">= 0.9x", speed >= 0.9])
    classifier = figures.get("classifier", {})
    sizes = sorted({t for t, _ in classifier})
    if len(sizes) >= 2:
        low, high = classifier[(sizes[0], "shards")], classifier[(sizes[-1], "shards")]
        rss = high["peak_training_mb"] / low["peak_training_mb"] - 1
        speed = high["steps_per_s"] / low["steps_per_s"]
        versus = f"at {high['images']:,} vs {low['images']:,} images"
        rows.append([f"streamed classifier: peak RSS {versus}", f"{rss:+.1%}", "<= +15%", rss <= 0.15])
        rows.append([f"streamed classifier: steps/s {versus}", f"{speed:.2f}x", ">= 0.9x", speed >= 0.9])
        for size in sizes:
            capped, default = classifier[(size, "shards")], classifier[(size, DEFAULT_ARENAS)]
            rows.append([f"streamed classifier, {capped['images']:,} images, {capped['passes']} passes: peak RSS "
                         "with 2 malloc arenas vs glibc's default", f"{capped['peak_training_mb']:.0f} vs "
                         f"{default['peak_training_mb']:.0f} MB", "lower", capped["peak_training_mb"] < default["peak_training_mb"]])  # fmt: skip
    if "flickr" in figures:
        rows += flickr_targets(figures["flickr"])
    rows = [[what, measured, wanted, "met" if ok else "**not met**"] for what, measured, wanted, ok in rows]
    return markdown_table(["target", "measured", "wanted", ""], rows)


def flickr_targets(flickr: dict) -> list[list]:
    """Return the speed and dev-loss rows: the mean over seeds, against the spread of the pickle's seeds."""
    seeds = sorted({seed for seed, _ in flickr})
    pickle_s = sum(flickr[(s, "pickle")]["seconds"] for s in seeds)
    shards_s = sum(flickr[(s, "shards")]["seconds"] for s in seeds)
    loss = {kind: [flickr[(s, kind)]["dev_loss"] for s in seeds] for kind in ("pickle", "shards")}
    gap = float(np.mean(loss["shards"]) - np.mean(loss["pickle"]))
    spread = max(loss["pickle"]) - min(loss["pickle"])
    return [
        ["Flickr8k epoch: speed from shards vs pickle", f"{pickle_s / shards_s:.2f}x", ">= 0.9x", pickle_s / shards_s >= 0.9],
        [f"Flickr8k epoch: dev loss per word, shards minus pickle (mean of {len(seeds)} seeds)", f"{gap:+.4f}",
         f"within noise: the pickle's {len(seeds)} seeds span {spread:.4f}", abs(gap) <= spread],
    ]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
