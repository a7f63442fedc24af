"""The web app: a page that captions dropped photos and the JSON API behind it, over one CaptionBatcher.

    GET  /              the page (web/static/)
    POST /api/caption   multipart upload, field "files": one or more photos -> a caption per photo
    GET  /api/health    the loaded model
    GET  /docs          the OpenAPI page

Uploads are parsed in memory (never written to disk, never under a client-chosen name) and the
request body is capped while it streams in. Every problem with the input is a 4xx JSON error
{"detail": "..."} naming it. Against hostile clients (web/limits.py, docs/serving.md): an upload that
stalls between two chunks for `body_timeout_s` gets 408 and its connection closed; beyond `max_uploads`
bodies in flight, 503 with Retry-After; images over the pixel budget are refused before decoding.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header
from starlette.requests import ClientDisconnect

from features import images
from models.runtimes import CaptionerBase
from models.search import DecodingOptions
from web.batcher import CaptionBatcher, Classify, Upload
from web.limits import ClientLimits, busy_headers

STATIC_DIR = Path(__file__).resolve().parent / "static"
FILES_FIELD = "files"
MAX_FILES_PER_REQUEST = 64
MAX_NAME_LENGTH = 200


class Beam(BaseModel):
    caption: str
    log_prob: float = Field(description="summed log-probability of the caption's words")


class ImageClass(BaseModel):
    label: str
    probability: float


class ImageResult(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    image: str = Field(description="the uploaded file's name, as sent by the client")
    caption: str | None = Field(None, description="the best beam's caption")
    beams: list[Beam] | None = Field(None, description="the beam search's captions, best first")
    image_class: ImageClass | None = Field(None, alias="class", description="only when a classifier is loaded")
    batch_size: int | None = Field(None, description="images captioned together in this image's batch")
    timing_ms: dict[str, float] | None = Field(
        None, description="queue, decode, encode, beam_search (and classify) for the batch; total for the request"
    )
    error: str | None = Field(None, description="why this file could not be captioned (then no caption)")


class Decoding(BaseModel):
    beam: int
    max_length: int | None = Field(description="longest caption in tokens; null: the run's own")
    length_penalty: float
    no_repeat_ngram: int = Field(description="no N consecutive words repeated within a caption; 0: off")


class CaptionResponse(BaseModel):
    model: str = Field(description="what decodes: a run, or the runs of an ensemble joined by ' + '")
    beam: int
    results: list[ImageResult] = Field(description="one per uploaded file, in upload order")


class ErrorResponse(BaseModel):
    detail: str
    results: list[ImageResult] | None = None


class Health(BaseModel):
    status: str
    model: str
    encoder: str
    encoder_weights: str
    decoder: str
    vocabulary_size: int
    max_caption_length: int
    beam: int
    decoding: Decoding = Field(description="the decoding settings every caption is made with")
    classifier: bool
    batching: bool
    batch_window_ms: float
    max_batch: int
    max_upload_mb: float
    max_pixels: int = Field(description="images with more pixels (after JPEG draft reduction) are refused")
    decode_workers: int
    limits: dict[str, int | float] = Field(description="timeouts (s) and caps against slow or greedy clients")
    device: str


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILES_FIELD],
                    "properties": {
                        FILES_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": f"one or more photos (JPEG, PNG, ...), at most {MAX_FILES_PER_REQUEST}",
                        }
                    },
                }
            }
        },
    }
}


class UploadTooLarge(Exception):
    """The request body passed the size limit while streaming in."""


class UploadStalled(Exception):
    """No chunk of the request body arrived within the body timeout."""


async def _capped(stream: AsyncIterator[bytes], max_bytes: int, chunk_timeout_s: float) -> AsyncIterator[bytes]:
    """Yield the body's chunks; raise UploadTooLarge past `max_bytes`, UploadStalled when a chunk is late."""
    received, chunks = 0, aiter(stream)
    while True:
        try:
            async with asyncio.timeout(chunk_timeout_s):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadStalled from None
        received += len(chunk)
        if received > max_bytes:
            raise UploadTooLarge
        yield chunk


class _MultiPartParser(MultiPartParser):
    """Starlette's parser, noting whether the body reached its closing boundary (python-multipart does not check)."""

    ended = False

    def on_end(self) -> None:
        self.ended = True


def _label(filename: str | None) -> str:
    """Return a display label for a client file name: its last path part, shortened."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    return name[:MAX_NAME_LENGTH] or "upload"


async def read_uploads(request: Request, max_bytes: int, chunk_timeout_s: float = 5.0) -> list[Upload]:
    """Return the files of the request's "files" field, read into memory; raise HTTPException for bad uploads.

    The body is cut off past `max_bytes` (413) or when no chunk comes for `chunk_timeout_s` (408);
    both close the connection, whose unread rest is not waited for.
    """
    close = {"Connection": "close"}
    too_large = HTTPException(
        413, f"upload too large: at most {max_bytes / 2**20:g} MB per request (all files together)", close
    )
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        got = content_type.decode("latin-1") or "no Content-Type"
        raise HTTPException(
            415, f"expected multipart/form-data with the photos in the field '{FILES_FIELD}', got {got}"
        )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    try:
        async with aclosing(_capped(request.stream(), max_bytes, chunk_timeout_s)) as stream:
            parser = _MultiPartParser(
                request.headers, stream, max_files=MAX_FILES_PER_REQUEST, max_fields=MAX_FILES_PER_REQUEST
            )
            parser.spool_max_size = max_bytes + 1  # keep every file in memory: nothing goes to disk
            form = await parser.parse()
    except UploadTooLarge:
        raise too_large from None
    except UploadStalled:
        raise HTTPException(408, f"the upload stalled: no data for {chunk_timeout_s:g} s", close) from None
    except MultiPartException as error:
        raise HTTPException(400, f"malformed multipart upload: {error.message}") from None
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected during the upload") from None
    try:
        if not parser.ended:  # else a cut-off body would look like a body without files (422)
            raise HTTPException(400, "malformed multipart upload: the body ends before its closing boundary")
        files = [value for value in form.getlist(FILES_FIELD) if isinstance(value, UploadFile)]
        if not files:
            fields = ", ".join(sorted(set(form.keys()))) or "none"
            raise HTTPException(
                422, f"no files in the field '{FILES_FIELD}' (fields sent: {fields}); send photos as '{FILES_FIELD}'"
            )
        return [Upload(_label(file.filename), file.file.read()) for file in files]
    finally:
        await form.close()


def create_app(
    captioner: CaptionerBase,
    *,
    classify: Classify | None = None,
    decoding: DecodingOptions | None = None,
    max_upload_mb: float = 20.0,
    batch_window_ms: float = 10.0,
    max_batch: int = 32,
    batching: bool = True,
    decode_workers: int = 2,
    max_pixels: int | None = None,
    limits: ClientLimits | None = None,
) -> FastAPI:
    """Return the FastAPI app captioning with `captioner` (and `classify`, when given).

    `max_pixels`: the pixel budget of an upload (None: features.images' process-wide one, which the
    classifier hook also decodes with). `limits`: the timeouts and caps against hostile clients; the
    app enforces the body ones, and `web.limits.uvicorn_config` the connection ones (`app.state.limits`).
    """
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    decoding = decoding or DecodingOptions()
    limits = limits or ClientLimits()
    batcher = CaptionBatcher(
        captioner,
        decoding=decoding,
        window_ms=batch_window_ms,
        max_batch=max_batch,
        batching=batching,
        classify=classify,
        decode_workers=decode_workers,
        max_pixels=max_pixels,
    )
    health = _health(captioner, batcher, batch_window_ms, max_upload_mb, limits)
    app = FastAPI(
        title="Photo captioning",
        summary="Caption photos with a trained run: an encoder, then beam search with the run's decoder.",
        lifespan=_lifespan(batcher),
    )
    app.state.batcher, app.state.limits = batcher, limits
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    add_routes(app, batcher, health, limits)
    return app


def _health(
    captioner: CaptionerBase,
    batcher: CaptionBatcher,
    batch_window_ms: float,
    max_upload_mb: float,
    limits: ClientLimits,
) -> Health:
    """Return what /api/health answers: the model, the decoding settings and the server's limits."""
    return Health(
        status="ok",
        model=captioner.name,
        encoder=captioner.spec.name,
        encoder_weights=str(captioner.encoder_weights),
        decoder=captioner.decoder,
        vocabulary_size=len(captioner.vocabulary),
        max_caption_length=captioner.max_caption_length,
        beam=batcher.decoding.beam,
        decoding=Decoding(**batcher.decoding.to_dict()),
        classifier=batcher.classify is not None,
        batching=batcher.batching,
        batch_window_ms=batch_window_ms,
        max_batch=batcher.max_batch,
        max_upload_mb=max_upload_mb,
        max_pixels=batcher.max_pixels or images.max_pixels(),
        decode_workers=batcher.decode_workers,
        limits=asdict(limits),
        device=captioner.device,
    )


def _lifespan(batcher: CaptionBatcher):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    return lifespan


CAPTION_RESPONSES = {
    400: {"model": ErrorResponse, "description": "malformed multipart body"},
    408: {"model": ErrorResponse, "description": "the upload stalled (no data within the body timeout)"},
    415: {"model": ErrorResponse, "description": "not multipart/form-data"},
    422: {
        "model": ErrorResponse,
        "description": "no files, or no file is a readable image (or within the pixel limit)",
    },
    503: {"model": ErrorResponse, "description": "too many uploads in flight; retry after the Retry-After seconds"},
}


def add_routes(app: FastAPI, batcher: CaptionBatcher, health: Health, limits: ClientLimits) -> None:
    """Add the page, /api/health and /api/caption to `app`."""
    max_bytes = int(health.max_upload_mb * 2**20)
    uploads_in_flight = asyncio.Semaphore(limits.max_uploads)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/api/health", response_model=Health, summary="The loaded model and server settings")
    async def get_health() -> Health:
        return health

    @app.post(
        "/api/caption",
        response_model=CaptionResponse,
        response_model_exclude_none=True,
        summary="Caption one or more uploaded photos",
        description=(
            f"Send the photos as multipart/form-data in the field `{FILES_FIELD}`. Each gets the best caption, "
            "the beam search's alternatives with summed log-probabilities, the class when a classifier is "
            "loaded, and timings. A file that is not a readable image gets an `error` instead; if no file "
            "is readable the answer is 422."
        ),
        responses={
            **CAPTION_RESPONSES,
            413: {"model": ErrorResponse, "description": f"request larger than {health.max_upload_mb:g} MB"},
        },
        openapi_extra=UPLOAD_BODY,
    )
    async def caption(request: Request):
        if uploads_in_flight.locked():  # answered at once: a waiting upload would still hold its socket
            detail = f"too many uploads in flight (at most {limits.max_uploads}); retry in {limits.retry_after_s} s"
            raise HTTPException(503, detail, busy_headers(limits))
        async with uploads_in_flight:
            started = time.perf_counter()
            uploads = await read_uploads(request, max_bytes, limits.body_timeout_s)
            results = await batcher.caption(uploads)
        total = round((time.perf_counter() - started) * 1000.0, 1)
        for result in results:
            if "timing_ms" in result:
                result["timing_ms"]["total"] = total
        if all("error" in result for result in results):
            detail = "; ".join(result["error"] for result in results)
            return JSONResponse({"detail": detail, "results": results}, status_code=422)
        return {"model": health.model, "beam": health.beam, "results": results}
