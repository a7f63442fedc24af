"""The model that ships in pretrained/: it loads, and it captions real Flickr8k photos well (issues 4 and 22).

This checks the whole path a user gets after install: the committed run directory, the encoder named
in its config with the real ImageNet weights, the shared preprocessing, beam search and the scorer.
A wrong preprocessing, vocabulary or weight file gives captions that score near zero here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_FLICKR
from models.attention import AttentionStepper
from models.captioner import Captioner
from models.evaluation import evaluate_captions
from models.litert import find_export, read_export, stale_sources
from models.rundir import DEFAULT_RUN, load_runs
from models.search import DecodingOptions


def test_shipped_model_is_one_small_attention_run_with_a_fresh_litert_export():
    (run,) = load_runs(DEFAULT_RUN)  # one model, not an ensemble (issue 22)
    assert DEFAULT_RUN.parent.name == "pretrained" and run.path == DEFAULT_RUN
    assert run.config["encoder"] == "efficientnet_lite0" and run.config["weights"] == "imagenet"
    assert run.config["model"]["decoder"] == "attention" and run.model_config.reads_regions
    assert len(run.vocabulary) == run.model_config.vocab_size == 2533
    assert run.model_config.max_caption_length == 38
    assert run.config["self_critical"]["meteor_weight"] == 3.0  # teacher forcing, then CIDEr-D + 3 METEOR
    assert (DEFAULT_RUN / "model.keras").stat().st_size < 20e6  # weights only, under issue 22's 20 MB
    assert isinstance(Captioner.load(DEFAULT_RUN).stepper, AttentionStepper)
    export = find_export(DEFAULT_RUN)  # what infer.py runs without TensorFlow; re-export after changing the model
    assert export == DEFAULT_RUN / "litert" and stale_sources(export) == []
    assert [member["decoder"] for member in read_export(export)["decoders"]] == ["attention"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_FLICKR / "Images").is_dir(), reason=f"no Flickr8k images in {SHARED_FLICKR}")
def test_shipped_model_scores_on_fifty_dev_photos():
    # Measured 2026-12-07 on the first 50 dev images, encoded from the JPEGs, with the default decoding
    # (beam 3, length penalty 1, trigram block): BLEU-4 0.258, CIDEr 0.577, METEOR 0.207 (the merge pair that
    # shipped before it: 0.233, 0.565, 0.207). A broken encoder, preprocessing or vocabulary scores near
    # zero; the bounds leave room for a retrained model.
    report = evaluate_captions(Captioner.load(DEFAULT_RUN), SHARED_FLICKR, "dev", DecodingOptions(beam=3), limit=50)
    assert report.counts["captioned"] == 50
    assert report.metrics["BLEU-4"] > 0.15
    assert report.metrics["CIDEr"] > 0.38
    assert report.metrics["METEOR"] > 0.15


@pytest.mark.slow
def test_readme_main_command_captions_the_sample_photo():
    result = subprocess.run(
        [sys.executable, "infer.py", "samples/palace.jpg", "--json"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    caption = output["results"][0]["caption"]
    words = caption.split()
    assert 3 <= len(words) <= 38
    assert "<" not in caption  # no <start>, <end>, <unk> or <pad>
    assert output["results"][0]["beams"][0]["caption"] == caption
    assert output["errors"] == []
