"""The web app: a page that captions dropped photos and the JSON API behind it, over one CaptionBatcher.

    GET  /              the page (web/static/)
    POST /api/caption   multipart upload, field "files": one or more photos -> a caption per photo
    GET  /api/health    the loaded model
    GET  /docs          the OpenAPI page

Uploads are parsed in memory (never written to disk, never under a client-chosen name) and the
request body is capped while it streams in. Every problem with the input is a 4xx JSON error
{"detail": "..."} naming it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header
from starlette.requests import ClientDisconnect

from models.captioner import Captioner
from models.training import describe_device
from web.batcher import CaptionBatcher, Classify, Upload

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


class CaptionResponse(BaseModel):
    model: str
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
    classifier: bool
    batching: bool
    batch_window_ms: float
    max_batch: int
    max_upload_mb: float
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


async def _capped(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > max_bytes:
            raise UploadTooLarge
        yield chunk


def _label(filename: str | None) -> str:
    """Return a display label for a client file name: its last path part, shortened."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    return name[:MAX_NAME_LENGTH] or "upload"


async def read_uploads(request: Request, max_bytes: int) -> list[Upload]:
    """Return the files of the request's "files" field, read into memory; raise HTTPException for bad uploads."""
    too_large = HTTPException(
        413, f"upload too large: at most {max_bytes / 2**20:g} MB per request (all files together)"
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
        async with aclosing(_capped(request.stream(), max_bytes)) as stream:
            parser = MultiPartParser(
                request.headers, stream, max_files=MAX_FILES_PER_REQUEST, max_fields=MAX_FILES_PER_REQUEST
            )
            parser.spool_max_size = max_bytes + 1  # keep every file in memory: nothing goes to disk
            form = await parser.parse()
    except UploadTooLarge:
        raise too_large from None
    except MultiPartException as error:
        raise HTTPException(400, f"malformed multipart upload: {error.message}") from None
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected during the upload") from None
    try:
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
    captioner: Captioner,
    *,
    classify: Classify | None = None,
    beam: int = 3,
    max_upload_mb: float = 20.0,
    batch_window_ms: float = 10.0,
    max_batch: int = 32,
    batching: bool = True,
) -> FastAPI:
    """Return the FastAPI app captioning with `captioner` (and `classify`, when given)."""
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    max_bytes = int(max_upload_mb * 2**20)
    batcher = CaptionBatcher(
        captioner, beam=beam, window_ms=batch_window_ms, max_batch=max_batch, batching=batching, classify=classify
    )
    run = captioner.run
    health = Health(
        status="ok",
        model=captioner.name,
        encoder=captioner.spec.name,
        encoder_weights=str(captioner.encoder_weights),
        decoder=run.model_config.decoder,
        vocabulary_size=len(captioner.vocabulary),
        max_caption_length=run.model_config.max_caption_length,
        beam=beam,
        classifier=classify is not None,
        batching=batching,
        batch_window_ms=batch_window_ms,
        max_batch=max_batch,
        max_upload_mb=max_upload_mb,
        device=describe_device(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="Photo captioning",
        summary="Caption photos with a trained run: an encoder, then beam search with the run's decoder.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

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
            400: {"model": ErrorResponse, "description": "malformed multipart body"},
            413: {"model": ErrorResponse, "description": f"request larger than {max_upload_mb:g} MB"},
            415: {"model": ErrorResponse, "description": "not multipart/form-data"},
            422: {"model": ErrorResponse, "description": "no files, or no file is a readable image"},
        },
        openapi_extra=UPLOAD_BODY,
    )
    async def caption(request: Request):
        started = time.perf_counter()
        uploads = await read_uploads(request, max_bytes)
        results = await batcher.caption(uploads)
        total = round((time.perf_counter() - started) * 1000.0, 1)
        for result in results:
            if "timing_ms" in result:
                result["timing_ms"]["total"] = total
        body = {"model": str(run.path), "beam": beam, "results": results}
        if all("error" in result for result in results):
            detail = "; ".join(result["error"] for result in results)
            return JSONResponse({"detail": detail, "results": results}, status_code=422)
        return body

    return app
