"""Shared fixtures: generated images, a tiny Flickr8k-style folder, a tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED_FLICKR = ROOT.parent / "shared" / "datasets" / "flickr8k"

TINY_CAPTIONS = {
    "red": ["A red square on a table .", "a red box", "The red thing is here !"],
    "green": ["A green field with grass .", "green grass in a field", "a big green field"],
    "blue": ["A blue sky over the sea .", "blue water and sky", "the blue sea"],
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_image(path: Path, colour=(128, 64, 32), size=(64, 48), mode="RGB", noise_seed=None) -> Path:
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
        array = np.clip(array.astype(int) + rng.integers(-20, 20, array.shape), 0, 255).astype(np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_flickr(tmp_path_factory) -> Path:
    """A Flickr8k-style folder: 4 images per colour, 3 captions each, train/dev/test split files."""
    root = tmp_path_factory.mktemp("flickr")
    (root / "Images").mkdir()
    token_lines, train, dev = [], [], []
    for colour, captions in TINY_CAPTIONS.items():
        for k in range(4):
            image_id = f"{colour}_{k}.jpg"
            make_image(root / "Images" / image_id, COLOURS[colour], noise_seed=k)
            token_lines += [f"{image_id}#{n}\t{c}" for n, c in enumerate(captions)]
            (dev if k == 3 else train).append(image_id)
    # Like the real test split: captioned in the token file, but the image is not on disk.
    token_lines.append("missing_0.jpg#0\ta red square")
    (root / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(train) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(dev) + "\n")
    (root / "Flickr_8k.testImages.txt").write_text("missing_0.jpg\n")
    return root


@pytest.fixture(scope="session")
def tiny_store(tiny_flickr, tmp_path_factory) -> Path:
    """Features of the tiny folder from a randomly initialised efficientnet_lite0."""
    from features.extract import extract_features
    from pipeline.datasets import image_sources

    out = tmp_path_factory.mktemp("store") / "tiny.pkl"
    sources, _ = image_sources(tiny_flickr)
    extract_features(sources, out, "efficientnet_lite0", None, batch_size=8, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_flickr, tiny_store, tmp_path_factory) -> Path:
    """A merge model trained for a dozen short epochs on the tiny folder."""
    from models.training import TrainingOptions, train_caption_model

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    options = TrainingOptions(epochs=12, batch_size=8, learning_rate=1e-2, min_count=1, seed=1, patience=20)
    model_options = {"units": 16, "embedding_dim": 8, "dropout": 0.1}
    train_caption_model(tiny_store, tiny_flickr, run_dir, options, model_options, verbose=0)
    return run_dir


@pytest.fixture(scope="session")
def tiny_spatial_store(tiny_flickr, tmp_path_factory) -> Path:
    """Like tiny_store, with the 7x7x1280 spatial maps beside it (extract_features.py --spatial)."""
    from features.extract import extract_features
    from pipeline.datasets import image_sources

    out = tmp_path_factory.mktemp("spatial_store") / "tiny.pkl"
    sources, _ = image_sources(tiny_flickr)
    extract_features(sources, out, "efficientnet_lite0", None, batch_size=8, spatial=True, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_attention_run(tiny_flickr, tiny_spatial_store, tmp_path_factory) -> Path:
    """An attention model trained for a few short epochs on the tiny folder's spatial maps."""
    from models.training import TrainingOptions, train_caption_model

    run_dir = tmp_path_factory.mktemp("runs") / "tiny_attention"
    options = TrainingOptions(epochs=6, batch_size=8, learning_rate=1e-2, min_count=1, seed=1, patience=20)
    model_options = {"decoder": "attention", "cell": "gru", "units": 16, "embedding_dim": 8, "dropout": 0.1}
    train_caption_model(tiny_spatial_store, tiny_flickr, run_dir, options, model_options, verbose=0)
    return run_dir
