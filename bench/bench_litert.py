"""LiteRT against Keras on the shipped model: cold start, captions and scores per precision, serving.

    python bench/bench_litert.py [--runs 5] [--photo PATH] [--requests 300] [--skip-quality] [--skip-serve]

1. Cold start: `python infer.py PHOTO --runtime litert` and `--runtime keras`, interleaved, `--runs`
   times each after one untimed run of each (so both find the files in the page cache): the time from
   process start to the caption printed, and the process's peak RSS (GNU time). Medians reported.
2. Quality on the Flickr8k dev split (1000 images): the Keras path on stored features is the
   reference; the LiteRT exports (float32 = the shipped pretrained/.../litert, float16 and int8
   exported to bench/out/ when missing) caption the same stored features (decoders only) and the
   photos themselves (encoder too). Same-caption share, BLEU-4, METEOR, CIDEr (pycocoevalcap).
3. Warm serving: bench/bench_serve.py's load (one-photo uploads from concurrent clients, every tenth
   a bad upload) against serve.py --runtime keras and --runtime litert, batching on.

Writes the tables, command, machine and date to --out (default bench/results_litert.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import DEFAULT_DATA, DEFAULT_STORE, command, conditions, machine  # noqa: E402
from features.store import atomic_write_bytes  # noqa: E402

PRECISIONS = ("float32", "float16", "int8")
GNU_TIME = "/usr/bin/time"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed cold starts per runtime (default 5)")
    parser.add_argument("--photo", type=Path, help="photo for the cold start (default: the first dev image)")
    parser.add_argument("--requests", type=int, default=300, help="serving requests per runtime (default 300)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent serving clients (default 50)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_litert.md")
    return parser.parse_args(argv)


def one_cold_start(photo: Path, runtime: str) -> tuple[float, float, str]:
    """Return (seconds to the caption printed, peak RSS in MB, the caption) of one infer.py process.

    The peak RSS comes from GNU time: a process forked straight from this one would report this
    process's own RSS as its peak (Linux carries the high-water mark across fork and exec).
    """
    if not Path(GNU_TIME).is_file():
        raise SystemExit(f"error: the cold-start figures need GNU time at {GNU_TIME} (apt-get install time)")
    started = time.perf_counter()
    process = subprocess.Popen(
        [GNU_TIME, "-f", "maxrss_kb=%M", sys.executable, "infer.py", str(photo), "--runtime", runtime],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    caption = process.stdout.readline().strip()
    seconds = time.perf_counter() - started
    rest, errors = process.communicate()
    peak = [line for line in errors.splitlines() if line.startswith("maxrss_kb=")]
    if process.returncode != 0 or not caption or not peak:
        raise SystemExit(f"error: infer.py --runtime {runtime} failed ({process.returncode}): {errors or rest}")
    return seconds, int(peak[-1].split("=")[1]) / 1024, caption


def cold_starts(photo: Path, runs: int) -> dict[str, dict]:
    """Return per runtime: the seconds and peak MB of each timed run, and the captions printed."""
    results = {runtime: {"seconds": [], "mb": [], "captions": set()} for runtime in ("litert", "keras")}
    for runtime in results:
        one_cold_start(photo, runtime)  # untimed: the page cache now holds both runtimes' files
    for run in range(runs):
        for runtime, result in results.items():
            seconds, mb, caption = one_cold_start(photo, runtime)
            result["seconds"].append(seconds)
            result["mb"].append(mb)
            result["captions"].add(caption)
            print(f"cold start {run + 1}/{runs} {runtime}: {seconds:.2f} s, {mb:.0f} MB: {caption}", flush=True)
    return results


def cold_start_table(results: dict[str, dict]) -> list[str]:
    lite, keras = (statistics.median(results[r]["seconds"]) for r in ("litert", "keras"))
    lines = [
        "| runtime | median s to caption | runs (s) | median peak RSS (MB) | caption |",
        "|:---|---:|:---|---:|:---|",
    ]
    for runtime, result in results.items():
        runs = ", ".join(f"{s:.2f}" for s in result["seconds"])
        caption = " / ".join(sorted(result["captions"]))
        lines.append(
            f"| {runtime} | **{statistics.median(result['seconds']):.2f}** | {runs} | "
            f"{statistics.median(result['mb']):.0f} | {caption} |"
        )
    return [*lines, "", f"LiteRT is **{keras / lite:.1f}x** faster from process start to caption."]


def exports() -> dict[str, Path]:
    """Return the export folder of each precision: the shipped float32 one, the others under bench/out/."""
    from models.export import export_run
    from models.litert import EXPORT_FOLDER, find_export
    from models.rundir import DEFAULT_RUN

    folders = {"float32": DEFAULT_RUN / EXPORT_FOLDER}
    for precision in PRECISIONS[1:]:
        folders[precision] = ROOT / "bench" / "out" / f"litert_{precision}"
        if find_export(folders[precision]) is None:
            print(f"exporting {precision} to {folders[precision]} ...", flush=True)
            export_run(DEFAULT_RUN, folders[precision], precision)
    return folders


def quality(folders: dict[str, Path]) -> list[dict]:
    """Return one row per (runtime, precision, input): scores and agreement with Keras on stored features."""
    from cli import native_stderr_silenced
    from models.captioner import Captioner
    from models.evaluation import evaluate_captions
    from models.litert import LiteCaptioner
    from models.rundir import DEFAULT_RUN
    from pipeline.datasets import open_dataset

    dataset = open_dataset(DEFAULT_DATA)
    keras = Captioner.load(DEFAULT_RUN)
    rows = [evaluated("keras", "float32", "stored features", evaluate_captions(keras, dataset, features=DEFAULT_STORE))]
    reference = rows[0]["captions"]
    rows.append(evaluated("keras", "float32", "photos", evaluate_captions(keras, dataset)))
    for precision, folder in folders.items():
        with native_stderr_silenced():
            lite = LiteCaptioner.load(folder)
        for source, store in (("stored features", DEFAULT_STORE), ("photos", None)):
            rows.append(evaluated("litert", precision, source, evaluate_captions(lite, dataset, features=store)))
    for row in rows:
        row["same"] = sum(row["captions"][i] == reference[i] for i in reference) / len(reference)
        row["mb"] = sum(p.stat().st_size for p in folders[row["precision"]].glob("*.tflite")) / 1e6
    return rows


def evaluated(runtime: str, precision: str, source: str, report) -> dict:
    print(f"{runtime} {precision} from {source}: {report.metrics} in {report.seconds:.0f} s", flush=True)
    return {
        "runtime": runtime,
        "precision": precision,
        "source": source,
        "captions": report.captions,
        "metrics": report.metrics,
        "seconds": report.seconds,
    }


def quality_table(rows: list[dict]) -> list[str]:
    reference = rows[0]["metrics"]
    lines = [
        "| runtime | precision | input | .tflite MB | same caption as Keras | BLEU-4 | METEOR | CIDEr | "
        "ΔBLEU-4 | ΔCIDEr | s |",
        "|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        m = row["metrics"]
        size = f"{row['mb']:.1f}" if row["runtime"] == "litert" else "-"
        lines.append(
            f"| {row['runtime']} | {row['precision']} | {row['source']} | {size} | {row['same']:.1%} | "
            f"{m['BLEU-4']:.4f} | {m['METEOR']:.4f} | {m['CIDEr']:.4f} | {m['BLEU-4'] - reference['BLEU-4']:+.4f} | "
            f"{m['CIDEr'] - reference['CIDEr']:+.4f} | {row['seconds']:.0f} |"
        )
    return lines


def serving(requests: int, clients: int) -> list[tuple[str, object, dict, float]]:
    """Return (runtime, LoadResult, health, server peak RSS MB) for serve.py with each runtime, batching on."""
    from bench.bench_serve import DEFAULT_PHOTOS, Server, run_load, upload_bodies

    bodies = upload_bodies(DEFAULT_PHOTOS, requests)
    results = []
    for runtime in ("keras", "litert"):
        log = ROOT / "bench" / "out" / f"litert_serve_{runtime}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with Server(None, ["--runtime", runtime], log) as server:
            result = asyncio.run(run_load(server.url, bodies, clients, runtime))
            peak = peak_rss_mb(server.process.pid)
            results.append((runtime, result, server.health, peak))
        print(f"serve {runtime}: {len(result.latencies_ms) / result.seconds:.1f} requests/s, {peak:.0f} MB", flush=True)
    return results


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serving_table(results: list[tuple[str, object, dict, float]]) -> list[str]:
    import numpy as np

    lines = [
        "| serve.py | requests/s | p50 latency (ms) | p95 latency (ms) | mean photos per batch | 2xx / 4xx / 5xx | "
        "wrong answers | server peak RSS (MB) | device |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for runtime, r, health, peak in results:
        lines.append(
            f"| --runtime {runtime} | **{len(r.latencies_ms) / r.seconds:.1f}** | {np.percentile(r.latencies_ms, 50):.0f} | "
            f"{np.percentile(r.latencies_ms, 95):.0f} | {np.mean(r.batch_sizes):.1f} | "
            f"{r.count(200, 300)} / {r.count(400, 500)} / {r.count(500, 600)} | {r.wrong_answers} | {peak:.0f} | "
            f"{health['device']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.datasets import open_dataset

    photo = args.photo or open_dataset(DEFAULT_DATA).image_path(open_dataset(DEFAULT_DATA).split_ids("dev")[0])
    lines = [
        "# LiteRT runtime against Keras (issue 20)",
        "",
        f"- Command: `{command()}`",
        f"- Machine: {machine()}; date {datetime.date.today().isoformat()}",
        "",
        f"## Cold start: `python infer.py {photo.name} --runtime litert|keras`, shipped model",
        "",
        *cold_start_table(cold_starts(photo, args.runs)),
    ]
    if not args.skip_quality:
        lines += ["", "## Flickr8k dev (1000 images), beam 3, the default decoding options", ""]
        lines += quality_table(quality(exports()))
    if not args.skip_serve:
        lines += ["", f"## Warm serving: {args.requests} one-photo requests, {args.clients} clients, batching on", ""]
        lines += serving_table(serving(args.requests, args.clients))
    lines += ["", conditions(), ""]
    text = "\n".join(lines)
    atomic_write_bytes(args.out, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
