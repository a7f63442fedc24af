"""Caption metrics: the COCO caption scorer (pycocoevalcap) and NLTK corpus BLEU as a second opinion.

pycocoevalcap's PTB tokenizer and METEOR run Java. SPICE is left out: it downloads Stanford
CoreNLP models on first use, which cannot be done offline.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

from pipeline.captions import clean_caption

COCO_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


class MetricsError(RuntimeError):
    """The scorer cannot run (Java missing) or the inputs do not match."""


def coco_scores(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, float]:
    """Return BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap) of one hypothesis per image."""
    if set(references) != set(hypotheses) or not hypotheses:
        raise MetricsError("references and hypotheses must cover the same, non-empty set of images")
    if shutil.which("java") is None:
        raise MetricsError("pycocoevalcap needs Java for tokenising and METEOR: apt-get install default-jre-headless")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
        res = tokenizer.tokenize({k: [{"caption": h}] for k, h in hypotheses.items()})
        scores: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
        meteor = Meteor()
        try:
            scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:
            stop_meteor(meteor)
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def stop_meteor(meteor) -> None:
    """End the Java process of a pycocoevalcap `Meteor` (it has no close method of its own; its `__del__`
    would block on the lock a failed `compute_score` leaves held, so that lock is released too)."""
    if meteor.lock.locked():
        meteor.lock.release()
    process = meteor.meteor_p
    if process.poll() is None:
        process.stdin.close()
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def nltk_corpus_bleu(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, float]:
    """Return NLTK corpus BLEU-1..4 on cleaned tokens (a secondary figure; no smoothing on BLEU-n
    except method1 to avoid zero precision on tiny sets)."""
    ids = sorted(hypotheses)
    refs = [[clean_caption(r) for r in references[i]] for i in ids]
    hyps = [clean_caption(hypotheses[i]) for i in ids]
    smoothing = SmoothingFunction().method1
    weights = {1: (1.0,), 2: (0.5, 0.5), 3: (1 / 3,) * 3, 4: (0.25,) * 4}
    return {
        f"NLTK-BLEU-{n}": float(corpus_bleu(refs, hyps, weights=w, smoothing_function=smoothing))
        for n, w in weights.items()
    }
