"""Training step time of the merge, inject and attention decoders, side by side in one run.

    nice -n 15 python bench/decoders_step_time.py [--steps 30] [--batch-size 64]

Each decoder is built from the same config (units 256, embedding 256, LSTM) and trained with
`train_on_batch` on the same real Flickr8k train batches from `models.training.caption_sequence`
(pooled efficientnet_lite0 vectors for merge and inject; the 7x7x1280 spatial maps read batch by
batch from the HDF5 store for attention, reading included), interleaved in rounds after a warm-up
that traces every padded width. Prints a markdown table; the seconds per epoch are extrapolated from
the measured step time to the whole train split.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_train import run_steps, warmup_indices  # noqa: E402
from bench.common import DEFAULT_DATA, DEFAULT_STORE, conditions, machine, markdown_table  # noqa: E402
from features.store import FeatureStore  # noqa: E402
from models.config import CaptionModelConfig  # noqa: E402
from models.training import (  # noqa: E402
    build_caption_model,
    caption_sequence,
    compile_caption_model,
    open_spatial_maps,
    prepare_caption_data,
)
from pipeline.datasets import open_dataset  # noqa: E402

DECODERS = ("merge", "inject", "attention")  # the built-in decoders of models.decoders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per decoder")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import keras

    keras.utils.set_random_seed(0)
    store = FeatureStore.load(args.features)
    regions = open_spatial_maps(store, args.features)
    data = prepare_caption_data(store, open_dataset(args.data), min_count=5, regions=regions)
    models, batches = {}, {}
    for decoder in DECODERS:
        config = CaptionModelConfig(len(data.vocabulary), data.max_caption_length, store.dim, decoder=decoder,
                                    spatial_shape=regions.shape)  # fmt: skip
        models[decoder] = build_caption_model(config)
        compile_caption_model(models[decoder], 1e-3)
        batches[decoder] = caption_sequence(store, data.train, data, args.batch_size, True, 0,
                                            regions if config.reads_regions else None)  # fmt: skip
        run_steps(models[decoder], batches[decoder], warmup_indices(batches[decoder], 2))
    seconds = dict.fromkeys(DECODERS, 0.0)
    per_round = math.ceil(args.steps / args.rounds)
    for round_ in range(args.rounds):
        indices = range(100 + round_ * per_round, 100 + (round_ + 1) * per_round)  # past the warm-up batches
        for decoder in DECODERS:
            seconds[decoder] += run_steps(models[decoder], batches[decoder], indices)
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{d} {s:.1f} s" for d, s in seconds.items()))
    steps = per_round * args.rounds
    steps_per_epoch = len(batches["merge"])
    rows = [
        [d, f"{models[d].count_params():,}", f"{1000 * seconds[d] / steps:.0f}",
         f"{seconds[d] / steps * steps_per_epoch:.0f}", f"{seconds[d] / seconds['merge']:.2f}x"]
        for d in DECODERS
    ]  # fmt: skip
    print(f"- Machine: {machine()}\n{conditions()}\n")
    print(f"{len(batches['merge'].sequences)} train captions, batch {args.batch_size}, {steps} timed steps each\n")
    print(markdown_table(["decoder", "parameters", "ms per train step", "s per epoch (extrapolated)", "vs merge"],
                         rows))  # fmt: skip
    regions.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
