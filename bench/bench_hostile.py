"""Serving under attack: 50 good clients alone and beside 10 hostile ones, on one server, in one run.

    python bench/bench_hostile.py [--model RUN_DIR] [--requests 1000] [--clients 50] [--hostile 10]
                                  [--out bench/hostile_results.md]

Starts `serve.py` with its default limits (default model: serve.py's own, the shipped one) on a free
loopback port and sends the same good load three times: alone, beside the hostile clients, alone again.
The good load is `--requests` one-photo uploads (Flickr8k photos) from `--clients` concurrent clients.
The hostile clients, in turn by kind, loop until the good load is done:

- large-pixel PNGs: three 13000 x 13000 palette PNGs (46 KB each, 169 megapixels) in one request;
- stalled headers: connect, send half a request head, wait for the server to hang up;
- stalled bodies: send an upload's head announcing 19 MB, 1 MB of it, then wait for the server.

Reports the good clients' requests/s, p50/p95 latency and status counts per phase, what the hostile
clients got and how long they were held, and the server's peak RSS (sampled every 50 ms from /proc, and
its high-water mark). Exits 1 unless the good clients got no 5xx, their p95 beside the hostile clients
stayed within 2x of the better alone phase, and the server was healthy at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import os
import platform
import shlex
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_serve import DEFAULT_PHOTOS, LoadResult, Server, _relative, run_load  # noqa: E402
from bench.common import conditions  # noqa: E402
from features.store import atomic_write_bytes  # noqa: E402

KINDS = ("large-pixel PNGs", "stalled headers", "stalled bodies")
HALF_A_HEADER = b"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"
BODY_ANNOUNCED, BODY_SENT = 19 * 2**20, 2**20


def large_pixel_png() -> bytes:
    """Return the issue's PNG: 13000 x 13000 pixels of one palette colour, under Pillow's bomb limit."""
    buffer = io.BytesIO()
    Image.new("P", (13000, 13000), 3).save(buffer, "PNG")
    return buffer.getvalue()


def stalled_upload_head() -> bytes:
    head = (
        "POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
        f"Content-Length: {BODY_ANNOUNCED}\r\n\r\n"
        '--xyz\r\nContent-Disposition: form-data; name="files"; filename="big.jpg"\r\n\r\n'
    ).encode()
    return head + b"\xff" * BODY_SENT


@dataclass
class Hostile:
    """What the hostile clients of one kind did: per attempt, the answer's status (0: none) and seconds held."""

    kind: str
    clients: int = 0
    statuses: Counter = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)


class RssSampler:
    """Samples a process's resident memory every 50 ms in a thread; `peak_mb` since the last `reset`."""

    def __init__(self, pid: int):
        self.status = Path(f"/proc/{pid}/status")
        self.peak_mb = 0.0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def field_mb(self, name: str) -> float:
        for line in self.status.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while self.running:
            try:
                self.peak_mb = max(self.peak_mb, self.field_mb("VmRSS"))
            except OSError:
                return
            time.sleep(0.05)

    def reset(self) -> None:
        self.peak_mb = self.field_mb("VmRSS")

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=5)


async def read_answer(reader: asyncio.StreamReader, limit_s: float = 60.0) -> int:
    """Read until the server closes; return the status of its answer (0: it closed without one)."""
    data = await asyncio.wait_for(reader.read(-1), limit_s)
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


async def raw_attempt(host: str, port: int, first_bytes: bytes, record: Hostile) -> None:
    """Send `first_bytes` on a new connection, stall, and record what the server answered and when."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as error:
        record.errors[type(error).__name__] += 1
        await asyncio.sleep(0.5)
        return
    try:
        writer.write(first_bytes)
        await writer.drain()
        record.statuses[await read_answer(reader)] += 1
        record.seconds.append(time.perf_counter() - started)
    except (OSError, TimeoutError) as error:
        record.errors[type(error).__name__] += 1
    finally:
        writer.close()


async def hostile_client(url: str, kind: str, record: Hostile, png: bytes, stop: asyncio.Event) -> None:
    """Attack with one `kind` until `stop` is set."""
    host, port = url.removeprefix("http://").split(":")
    if kind != KINDS[0]:
        first_bytes = HALF_A_HEADER if kind == KINDS[1] else stalled_upload_head()
        while not stop.is_set():
            await raw_attempt(host, int(port), first_bytes, record)
        return
    files = [("files", (f"big{i}.png", png, "image/png")) for i in range(3)]
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = await client.post("/api/caption", files=files)
                record.statuses[response.status_code] += 1
                record.seconds.append(time.perf_counter() - started)
            except httpx.HTTPError as error:
                record.errors[type(error).__name__] += 1


async def load_beside_hostile(url: str, bodies: list, clients: int, hostile: int, label: str):
    """Run the good load with `hostile` attackers beside it; return (its LoadResult, the Hostile records)."""
    png = large_pixel_png()
    records = {kind: Hostile(kind) for kind in KINDS}
    stop = asyncio.Event()
    attackers = []
    for i in range(hostile):
        kind = KINDS[i % len(KINDS)]
        records[kind].clients += 1
        attackers.append(asyncio.create_task(hostile_client(url, kind, records[kind], png, stop)))
    await asyncio.sleep(1.0)  # the attack is under way before the first good request
    try:
        result = await run_load(url, bodies, clients, label)
    finally:
        stop.set()
        _, late = await asyncio.wait(attackers, timeout=90)
        for task in late:
            task.cancel()
    return result, list(records.values())


def good_bodies(photos: Path, count: int) -> list[tuple[str, bytes, bool]]:
    files = sorted(photos.glob("*.jpg"))[:40]
    if not files:
        raise SystemExit(f"error: no .jpg photos in {photos} (pass --photos)")
    return [(files[i % len(files)].name, files[i % len(files)].read_bytes(), True) for i in range(count)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="run directory (default: serve.py's default, the shipped model)")
    parser.add_argument("--requests", type=int, default=1000, help="good requests per phase (default 1000)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent good clients (default 50)")
    parser.add_argument("--hostile", type=int, default=10, help="hostile clients, kinds in turn (default 10)")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of JPEG photos to upload")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "hostile_results.md", help="markdown to write")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.requests < 1 or args.clients < 1 or args.hostile < 0:
        parser.error("--requests and --clients must be positive, --hostile not negative")
    return args


def p95(result: LoadResult) -> float:
    return float(np.percentile(result.latencies_ms, 95)) if result.latencies_ms else float("nan")


def markdown(args, health: dict, phases: list[tuple[LoadResult, float]], hostile: list[Hostile], hwm_mb: float) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = shlex.join(["python", "bench/bench_hostile.py", *args.argv])

    def row(name: str, values: list[str]) -> str:
        return f"| {name} | " + " | ".join(values) + " |"

    def status_line(statuses: Counter) -> str:
        return ", ".join(f"{n} x {status or 'closed, no answer'}" for status, n in sorted(statuses.items())) or "-"

    results = [r for r, _ in phases]
    lines = [
        "# Serving under attack: good clients alone and beside hostile ones",
        "",
        f"- Command: `{command}` (from the repository root)",
        f"- Machine: {cores}-core CPU ({platform.machine()}), no GPU; the server reports {health['device']}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Model: `{_relative(health['model'])}` ({health['decoder']} decoder, {health['encoder']}), beam {health['beam']}",
        f"- Server limits (serve.py defaults): {health['limits']}, max_pixels {health['max_pixels']:,}, "
        f"decode_workers {health['decode_workers']}, max_upload_mb {health['max_upload_mb']:g}",
        f"- Good load per phase: {args.requests} one-photo uploads from {args.clients} concurrent clients (httpx); "
        f"hostile: {args.hostile} clients ({', '.join(f'{h.clients} {h.kind}' for h in hostile)}); "
        "clients and server share the same cores",
        conditions(side_by_side=False),
        "",
        "| good clients | " + " | ".join(r.label for r in results) + " |",
        "|---|" + "---:|" * len(results),
        row("requests/s", [f"{len(r.latencies_ms) / r.seconds:.1f}" for r in results]),
        row("p50 latency (ms)", [f"{np.percentile(r.latencies_ms, 50):.0f}" for r in results]),
        row("p95 latency (ms)", [f"{p95(r):.0f}" for r in results]),
        row("2xx / 4xx / 5xx", [f"{r.count(200, 300)} / {r.count(400, 500)} / {r.count(500, 600)}" for r in results]),
        row("wrong answers, connection errors", [f"{r.wrong_answers}, {r.connection_errors}" for r in results]),
        row("server peak RSS (MB, sampled)", [f"{peak:.0f}" for _, peak in phases]),
        row("server healthy afterwards", ["yes" if r.alive_after else "NO" for r in results]),
        "",
        "| hostile clients | clients | attempts | answers | median / max seconds held | errors |",
        "|---|---:|---:|---|---:|---|",
    ]
    for h in hostile:
        held = f"{np.median(h.seconds):.2f} / {max(h.seconds):.2f}" if h.seconds else "-"
        lines.append(
            f"| {h.kind} | {h.clients} | {sum(h.statuses.values())} | {status_line(h.statuses)} | {held} | "
            f"{dict(h.errors) or 'none'} |"
        )
    ratio = p95(results[1]) / min(p95(results[0]), p95(results[2]))
    lines += [
        "",
        f"p95 latency of the good clients beside the hostile ones / in the better alone phase: {ratio:.2f}x. "
        f"Server's memory high-water mark (VmHWM) over the whole run: {hwm_mb:.0f} MB.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bodies = good_bodies(args.photos, args.requests)
    log = ROOT / "bench" / "out" / "hostile_server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print("starting serve.py ...", flush=True)
    with Server(args.model, [], log) as server:
        sampler = RssSampler(server.process.pid)
        phases, hostile = [], []
        try:
            for label in ("alone", f"beside {args.hostile} hostile", "alone again"):
                sampler.reset()
                if label.startswith("beside"):
                    result, hostile = asyncio.run(
                        load_beside_hostile(server.url, bodies, args.clients, args.hostile, label)
                    )
                else:
                    result = asyncio.run(run_load(server.url, bodies, args.clients, label))
                phases.append((result, sampler.peak_mb))
                print(f"{label}: p95 {p95(result):.0f} ms, 5xx {result.count(500, 600)}, "
                      f"peak RSS {sampler.peak_mb:.0f} MB", flush=True)  # fmt: skip
            hwm_mb = sampler.field_mb("VmHWM")
            alive = httpx.get(f"{server.url}/api/health", timeout=10).status_code == 200
        finally:
            sampler.stop()
        health = server.health
    log.unlink(missing_ok=True)
    text = markdown(args, health, phases, hostile, hwm_mb)
    atomic_write_bytes(args.out, text.encode())
    print(text)
    results = [r for r, _ in phases]
    ratio = p95(results[1]) / min(p95(results[0]), p95(results[2]))
    print(f"p95 beside the hostile clients / the better alone phase: {ratio:.2f}")
    failed = any(r.count(500, 600) or r.wrong_answers or r.connection_errors for r in results)
    return 1 if failed or ratio > 2.0 or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
