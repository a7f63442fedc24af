"""Request batching: concurrent uploads share one encoder pass and one beam search, on one worker thread.

Requests wait in an asyncio queue. A collector task on the event loop takes the first waiting request,
keeps taking more for up to `window_ms` (or until `max_batch` images), and hands the batch to a single
worker thread: the event loop never runs model code, and the model never runs twice at once. While the
worker is busy, new requests queue up, so under load the next batch fills without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass

import numpy as np

from features.images import ImageDecodeError, load_image
from models.captioner import Captioner

# The classifier hook: image bytes in, one (label, probability) per image out.
Classify = Callable[[list[bytes]], list[tuple[str, float]]]

log = logging.getLogger(__name__)


@dataclass
class Upload:
    """One uploaded file, held in memory; `name` is the client's file name, used only as a label."""

    name: str
    data: bytes


@dataclass
class _Request:
    uploads: list[Upload]
    future: asyncio.Future
    queued_at: float  # time.perf_counter() when submitted


def _milliseconds(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 1)


class CaptionBatcher:
    """Captions uploads with a Captioner, batching concurrent requests together on one worker thread."""

    def __init__(
        self,
        captioner: Captioner,
        *,
        beam: int = 3,
        window_ms: float = 10.0,
        max_batch: int = 32,
        batching: bool = True,
        classify: Classify | None = None,
    ):
        if beam < 1:
            raise ValueError(f"beam must be at least 1, got {beam}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if window_ms < 0:
            raise ValueError(f"window_ms must not be negative, got {window_ms}")
        self.captioner = captioner
        self.beam = beam
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        self.batching = batching
        self.classify = classify
        self._queue: asyncio.Queue[_Request] | None = None
        self._carried: _Request | None = None  # taken from the queue but did not fit the last batch
        self._collector: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Warm the models up on the worker thread, then start collecting requests."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner")
        self._queue = asyncio.Queue()
        await asyncio.get_running_loop().run_in_executor(self._executor, self.warm_up)
        self._collector = asyncio.create_task(self._collect(), name="caption-batcher")

    async def stop(self) -> None:
        """Stop collecting, fail the requests still waiting, and let the worker thread finish."""
        if self._collector is not None:
            self._collector.cancel()
            with suppress(asyncio.CancelledError):
                await self._collector
        waiting = [self._carried] if self._carried else []
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for request in waiting:
            if not request.future.done():
                request.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def warm_up(self) -> None:
        """Build the encoder and trace the decoder once, so that the first request is not the slow one."""
        size = self.captioner.spec.input_size
        features = self.captioner.encode(np.zeros((1, size, size, 3), np.float32))
        self.captioner.caption_features(["warm-up"], features, self.beam)

    async def caption(self, uploads: list[Upload]) -> list[dict]:
        """Return one result per upload, in order: a caption (see `run_batch`) or {"image", "error"}."""
        if self._queue is None:
            raise RuntimeError("CaptionBatcher.start() has not run (use the app's lifespan)")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(uploads, future, time.perf_counter()))
        return await future

    async def _next_batch(self) -> list[_Request]:
        """Wait for one request, then gather more for the collection window, up to `max_batch` images."""
        first = self._carried or await self._queue.get()
        self._carried = None
        batch, images = [first], len(first.uploads)
        if not self.batching:
            return batch
        deadline = asyncio.get_running_loop().time() + self.window
        while images < self.max_batch:
            try:
                request = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    request = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if images + len(request.uploads) > self.max_batch:
                self._carried = request  # a request is never split: it starts the next batch
                break
            batch.append(request)
            images += len(request.uploads)
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [r for r in await self._next_batch() if not r.future.done()]  # done = client gone
            if not batch:
                continue
            started = time.perf_counter()
            uploads = [upload for request in batch for upload in request.uploads]
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, uploads)
            except Exception as error:  # a model failure fails this batch, not the server
                log.exception("captioning a batch of %d images failed", len(uploads))
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            for request in batch:
                mine, results = results[: len(request.uploads)], results[len(request.uploads) :]
                for result in mine:
                    if "timing_ms" in result:
                        result["timing_ms"] = {
                            "queue": _milliseconds(request.queued_at, started),
                            **result["timing_ms"],
                        }
                if not request.future.done():
                    request.future.set_result(mine)

    def run_batch(self, uploads: list[Upload]) -> list[dict]:
        """Return one result per upload: decode all, encode the readable ones together, beam search together.

        A caption result is `Caption.to_dict()` plus "class" (with a classifier), "batch_size" and
        "timing_ms" (the batch's decode, encode, beam-search and classify times); an unreadable upload
        gives {"image": name, "error": reason}. Blocking: runs on the worker thread.
        """
        started = time.perf_counter()
        size = self.captioner.spec.input_size
        results: list[dict | None] = [None] * len(uploads)
        pixels, readable = [], []
        for i, upload in enumerate(uploads):
            try:
                pixels.append(load_image(upload.data, size))
                readable.append(i)
            except ImageDecodeError as error:
                results[i] = {"image": upload.name, "error": f"{upload.name}: {str(error).removeprefix('<upload>: ')}"}
            except Exception as error:  # a Pillow failure load_image does not know yet is still bad input
                log.exception("unexpected error decoding upload %r", upload.name)
                results[i] = {"image": upload.name, "error": f"{upload.name}: cannot decode ({type(error).__name__})"}
        if not readable:
            return results
        decoded = time.perf_counter()
        features = self.captioner.encode(np.stack(pixels))
        encoded = time.perf_counter()
        captions = self.captioner.caption_features([uploads[i].name for i in readable], features, self.beam)
        searched = time.perf_counter()
        classes = self.classify([uploads[i].data for i in readable]) if self.classify else None
        classified = time.perf_counter()
        timing = {
            "decode": _milliseconds(started, decoded),
            "encode": _milliseconds(decoded, encoded),
            "beam_search": _milliseconds(encoded, searched),
        }
        if classes is not None:
            timing["classify"] = _milliseconds(searched, classified)
        for k, (i, caption) in enumerate(zip(readable, captions, strict=True)):
            result = caption.to_dict()
            if classes is not None:
                label, probability = classes[k]
                result["class"] = {"label": label, "probability": round(float(probability), 4)}
            results[i] = {**result, "batch_size": len(readable), "timing_ms": dict(timing)}
        return results
