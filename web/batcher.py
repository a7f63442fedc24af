"""Request batching: concurrent uploads share one encoder pass and one beam search, on one worker thread.

A request's images are decoded first, on a small pool of decoding threads (`decode_workers`; one
request holds one thread at a time), so a slow image costs its own request a thread, not the model's
time. Decoded requests wait in an asyncio queue. A collector task on the event loop takes the first
waiting request, keeps taking more for up to `window_ms` (or until `max_batch` images), and hands the
batch to a single worker thread: the event loop never runs model code, and the model never runs twice
at once. While the worker is busy, new requests queue up, so under load the next batch fills without
waiting. (The classifier hook, when given, still decodes its bytes again on the worker thread.)
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
from models.runtimes import CaptionerBase
from models.search import DecodingOptions

# The classifier hook: image bytes in, one (label, probability) per image out.
Classify = Callable[[list[bytes]], list[tuple[str, float]]]

log = logging.getLogger(__name__)


@dataclass
class Upload:
    """One uploaded file, held in memory; `name` is the client's file name, used only as a label."""

    name: str
    data: bytes


Decoded = np.ndarray | str  # an upload's pixels, or why it could not be decoded


@dataclass
class _Request:
    uploads: list[Upload]
    decoded: list[Decoded]
    future: asyncio.Future
    queued_at: float  # time.perf_counter() when queued, after decoding
    decode_ms: float


def _milliseconds(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 1)


class CaptionBatcher:
    """Captions uploads with a captioner (Keras or LiteRT), batching concurrent requests together on one worker thread."""

    def __init__(
        self,
        captioner: CaptionerBase,
        *,
        decoding: DecodingOptions | None = None,
        window_ms: float = 10.0,
        max_batch: int = 32,
        batching: bool = True,
        classify: Classify | None = None,
        decode_workers: int = 2,
        max_pixels: int | None = None,
    ):
        if max_batch < 1 or decode_workers < 1:
            raise ValueError(f"max_batch and decode_workers must be at least 1, got {max_batch}, {decode_workers}")
        if window_ms < 0:
            raise ValueError(f"window_ms must not be negative, got {window_ms}")
        self.captioner = captioner
        self.decoding = decoding or DecodingOptions()
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        self.batching = batching
        self.classify = classify
        self.decode_workers = decode_workers
        self.max_pixels = max_pixels  # None: features.images' process-wide budget
        self._queue: asyncio.Queue[_Request] | None = None
        self._carried: _Request | None = None  # taken from the queue but did not fit the last batch
        self._collector: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._decoders: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Warm the models up on the worker thread, then start collecting requests."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner")
        self._decoders = ThreadPoolExecutor(max_workers=self.decode_workers, thread_name_prefix="decode")
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
        for executor in (self._executor, self._decoders):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    def warm_up(self) -> None:
        """Build the encoder and trace the decoder once, so that the first request is not the slow one."""
        size = self.captioner.spec.input_size
        features = self.captioner.encode(np.zeros((1, size, size, 3), np.float32))
        self.captioner.caption_features(["warm-up"], features, self.decoding)

    async def caption(self, uploads: list[Upload]) -> list[dict]:
        """Return one result per upload, in order: a caption (see `run_batch`) or {"image", "error"}."""
        if self._queue is None:
            raise RuntimeError("CaptionBatcher.start() has not run (use the app's lifespan)")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        decoded = await loop.run_in_executor(self._decoders, self.decode, uploads)
        if not any(isinstance(pixels, np.ndarray) for pixels in decoded):  # nothing for the model to do
            return [{"image": u.name, "error": reason} for u, reason in zip(uploads, decoded, strict=True)]
        queued = time.perf_counter()
        future = loop.create_future()
        self._queue.put_nowait(_Request(uploads, decoded, future, queued, _milliseconds(started, queued)))
        return await future

    def decode(self, uploads: list[Upload]) -> list[Decoded]:
        """Return each upload's pixels, or the reason it cannot be captioned. Blocking: runs on a decoding thread."""
        size = self.captioner.spec.input_size
        decoded: list[Decoded] = []
        for upload in uploads:
            try:
                decoded.append(load_image(upload.data, size, self.max_pixels))
            except ImageDecodeError as error:
                decoded.append(f"{upload.name}: {str(error).removeprefix('<upload>: ')}")
            except Exception as error:  # a Pillow failure load_image does not know yet is still bad input
                log.exception("unexpected error decoding upload %r", upload.name)
                decoded.append(f"{upload.name}: cannot decode ({type(error).__name__})")
        return decoded

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
            decoded = [pixels for request in batch for pixels in request.decoded]
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, uploads, decoded)
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
                            "decode": request.decode_ms,
                            **result["timing_ms"],
                        }
                if not request.future.done():
                    request.future.set_result(mine)

    def run_batch(self, uploads: list[Upload], decoded: list[Decoded]) -> list[dict]:
        """Return one result per upload: encode the decoded ones together, beam search them together.

        `decoded` is `decode(uploads)`. A caption result is `Caption.to_dict()` plus "class" (with a
        classifier), "batch_size" and "timing_ms" (the batch's encode, beam-search and classify times);
        an undecodable upload gives {"image": name, "error": reason}. Blocking: runs on the worker thread.
        """
        results: list[dict] = [{"image": u.name, "error": d} for u, d in zip(uploads, decoded, strict=True)]
        readable = [i for i, pixels in enumerate(decoded) if isinstance(pixels, np.ndarray)]
        if not readable:
            return results
        started = time.perf_counter()
        features = self.captioner.encode(np.stack([decoded[i] for i in readable]))
        encoded = time.perf_counter()
        captions = self.captioner.caption_features([uploads[i].name for i in readable], features, self.decoding)
        searched = time.perf_counter()
        classes = self.classify([uploads[i].data for i in readable]) if self.classify else None
        classified = time.perf_counter()
        timing = {"encode": _milliseconds(started, encoded), "beam_search": _milliseconds(encoded, searched)}
        if classes is not None:
            timing["classify"] = _milliseconds(searched, classified)
        for k, (i, caption) in enumerate(zip(readable, captions, strict=True)):
            result = caption.to_dict()
            if classes is not None:
                label, probability = classes[k]
                result["class"] = {"label": label, "probability": round(float(probability), 4)}
            results[i] = {**result, "batch_size": len(readable), "timing_ms": dict(timing)}
        return results
