"""Serving throughput with request batching on and off, side by side in one run.

    python bench/bench_serve.py [--model RUN_DIR] [--requests 300] [--clients 50] [--out bench/serve_results.md]

Starts `serve.py` on a free loopback port twice (batching on, then --no-batching) with the same run
directory (default: serve.py's own default, the shipped model), sends `--requests` one-photo uploads
from `--clients` concurrent clients, every tenth a bad upload (a text file, a truncated JPEG or an
empty file, which must get 422), and reports requests/s, p50/p95 latency and the count of 5xx answers
(which must be 0). Writes the table, the command, the machine and the date as markdown to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import DEFAULT_DATA, conditions  # noqa: E402  (after the path set-up, as a script)
from features.store import atomic_write_bytes  # noqa: E402

DEFAULT_PHOTOS = DEFAULT_DATA / "Images"
BAD_EVERY = 10  # one request in ten is a bad upload


@dataclass
class LoadResult:
    label: str
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    wrong_answers: int = 0  # a good photo not captioned (non-200) or a bad upload not refused with 422
    connection_errors: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    alive_after: bool = False

    def count(self, low: int, high: int) -> int:
        return sum(n for status, n in self.statuses.items() if low <= status < high)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="run directory (default: serve.py's default, the shipped model)")
    parser.add_argument("--requests", type=int, default=300, help="requests per configuration (default 300)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of JPEG photos to upload")
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "serve_results.md", help="markdown to write")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # for the command line in the results
    if args.requests < 1 or args.clients < 1:
        parser.error("--requests and --clients must be positive")
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upload_bodies(photos: Path, count: int) -> list[tuple[str, bytes, bool]]:
    """Return (file name, bytes, is_good) for each request: Flickr8k photos, every tenth a bad upload."""
    files = sorted(photos.glob("*.jpg"))[:40]
    if not files:
        raise SystemExit(f"error: no .jpg photos in {photos} (pass --photos)")
    good = [(f.name, f.read_bytes()) for f in files]
    bad = [
        ("notes.txt", b"this is not a photo\n" * 20),
        ("truncated.jpg", good[0][1][: len(good[0][1]) // 2]),
        ("empty.jpg", b""),
    ]
    bodies = []
    for i in range(count):
        if i % BAD_EVERY == BAD_EVERY - 1:
            bodies.append((*bad[(i // BAD_EVERY) % len(bad)], False))
        else:
            bodies.append((*good[i % len(good)], True))
    return bodies


class Server:
    """serve.py in a subprocess on a free loopback port, stopped on exit."""

    def __init__(self, model: Path | None, extra: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "serve.py", "--port", str(self.port), *extra]
        if model is not None:
            self.command += ["--model", str(model)]
        self.log_path = log

    def __enter__(self) -> Server:
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"error: serve.py exited with {self.process.returncode}; see {self.log_path}")
            try:
                self.health = httpx.get(f"{self.url}/api/health", timeout=2).json()
                return self
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit(f"error: serve.py did not answer in 300 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def run_load(url: str, bodies: list[tuple[str, bytes, bool]], clients: int, label: str) -> LoadResult:
    """Send every body as a one-file upload from `clients` concurrent clients; return what came back."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        name, data, _ = bodies[0]
        await client.post("/api/caption", files={"files": (name, data)})  # open a connection, not measured
        pending = iter(bodies)
        result = LoadResult(label, 0.0)

        async def one_client() -> None:
            for name, data, good in pending:  # a shared iterator: each body is sent once
                started = time.perf_counter()
                try:
                    response = await client.post("/api/caption", files={"files": (name, data, "image/jpeg")})
                except httpx.HTTPError:
                    result.connection_errors += 1
                    continue
                result.latencies_ms.append((time.perf_counter() - started) * 1000.0)
                result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1
                if response.status_code != (200 if good else 422):
                    result.wrong_answers += 1
                elif good:
                    result.batch_sizes.append(response.json()["results"][0]["batch_size"])

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        result.seconds = time.perf_counter() - started
        result.alive_after = (await client.get("/api/health")).status_code == 200
    return result


def markdown(args: argparse.Namespace, health: dict, results: list[LoadResult], bad: int) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    script = Path(__file__).resolve().relative_to(ROOT)
    command = shlex.join(["python", str(script), *args.argv])

    def row(name: str, values: list[str]) -> str:
        return f"| {name} | " + " | ".join(values) + " |"

    def percentile(r: LoadResult, q: float) -> str:
        return f"{np.percentile(r.latencies_ms, q):.0f}" if r.latencies_ms else "-"

    lines = [
        "# Serving benchmark: request batching on and off",
        "",
        f"- Command: `{command}` (from the repository root)",
        f"- Machine: {cores}-core CPU ({platform.machine()}), no GPU; the server reports {health['device']}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Model: `{_relative(health['model'])}` ({health['decoder']} decoder, {health['encoder']} encoder with "
        f"weights {health['encoder_weights']}, {health['vocabulary_size']} words), beam {health['beam']}",
        f"- Requests: {args.requests} requests of one photo each from {args.clients} concurrent clients (httpx), "
        f"{bad} of them bad uploads (text file, truncated JPEG, empty file) that must get 422; "
        "client and server share the same cores",
        conditions(side_by_side=False),  # the configurations run one after the other
        "",
        "| | " + " | ".join(r.label for r in results) + " |",
        "|---|" + "---:|" * len(results),
        row("requests/s", [f"{len(r.latencies_ms) / r.seconds:.1f}" for r in results]),
        row("p50 latency (ms)", [percentile(r, 50) for r in results]),
        row("p95 latency (ms)", [percentile(r, 95) for r in results]),
        row("mean photos per batch", [f"{np.mean(r.batch_sizes):.1f}" if r.batch_sizes else "-" for r in results]),
        row("2xx / 4xx / 5xx", [f"{r.count(200, 300)} / {r.count(400, 500)} / {r.count(500, 600)}" for r in results]),
        row("wrong answers, connection errors", [f"{r.wrong_answers}, {r.connection_errors}" for r in results]),
        row("server healthy afterwards", ["yes" if r.alive_after else "NO" for r in results]),
        row("wall time (s)", [f"{r.seconds:.1f}" for r in results]),
        "",
    ]
    return "\n".join(lines)


def _relative(path: str) -> str:
    """Return `path` relative to the repository when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bodies = upload_bodies(args.photos, args.requests)
    bad = sum(1 for *_, good in bodies if not good)
    configurations = [
        (f"batching on (window {args.batch_window_ms:g} ms, max {args.max_batch})",
         ["--batch-window-ms", str(args.batch_window_ms), "--max-batch", str(args.max_batch)]),
        ("batching off", ["--no-batching"]),
    ]  # fmt: skip
    results, health = [], {}
    for i, (label, extra) in enumerate(configurations):
        log = ROOT / "bench" / "out" / f"serve_server{i}.log"  # kept when the server fails to start
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"{label}: starting serve.py ...", flush=True)
        with Server(args.model, extra, log) as server:
            health = server.health
            result = asyncio.run(run_load(server.url, bodies, args.clients, label))
        log.unlink(missing_ok=True)
        print(
            f"{label}: {len(result.latencies_ms) / result.seconds:.1f} requests/s, "
            f"5xx {result.count(500, 600)}, wrong answers {result.wrong_answers}",
            flush=True,
        )
        results.append(result)
    text = markdown(args, health, results, bad)
    atomic_write_bytes(args.out, text.encode())
    print(text)
    failed = any(r.count(500, 600) or r.wrong_answers or r.connection_errors or not r.alive_after for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
