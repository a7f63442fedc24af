"""The web app and its batching: caption JSON, every kind of bad upload, and the page in a real browser.

A tiny run directory is built once per session: a merge model fitted for a few seconds to one fixed
caption, with the image input cut off, so every photo gets that caption; the encoder is
EfficientNet-Lite0 with random weights ("weights": "none"), so no weight file is needed.
"""

from __future__ import annotations

import asyncio
import io
import resource
import socket
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import httpx
import keras
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from features.encoders import get_encoder_spec
from models.captioner import Captioner
from models.config import CaptionModelConfig
from models.merge import build_merge_model
from models.rundir import MODEL_FILE, VOCABULARY_FILE, RunDir, load_run, save_model_without_optimizer
from models.search import DecodingOptions
from pipeline.vocabulary import Vocabulary
from web.app import create_app
from web.batcher import CaptionBatcher, Upload
from web.limits import ClientLimits, uvicorn_config

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT.parent / "shared" / "datasets" / "flickr8k" / "Images"
CHROMIUM = Path("/usr/bin/chromium")
TINY_CAPTION = "a dog runs on the grass"
MAX_UPLOAD_MB = 2


def build_fixed_caption_run(run_dir: Path, caption: str = TINY_CAPTION, seed: int = 0) -> Path:
    """Write a run directory whose small merge model always says `caption`."""
    words = caption.split()
    vocabulary = Vocabulary.build([words, ["a", "cat", "sits"]], min_count=1)
    spec = get_encoder_spec("efficientnet_lite0")
    config = CaptionModelConfig(
        vocab_size=len(vocabulary),
        max_caption_length=len(words) + 4,
        feature_dim=spec.dim,
        embedding_dim=16,
        units=16,
        dropout=0.0,
    )
    keras.utils.set_random_seed(seed)
    model = build_merge_model(config)
    image_dense = model.get_layer("image_dense")  # zero and frozen: the caption ignores the image
    image_dense.set_weights([np.zeros_like(w) for w in image_dense.get_weights()])
    image_dense.trainable = False
    ids = np.array([vocabulary.encode(words)] * 4, dtype=np.int32)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    inputs = {"image": np.zeros((len(ids), spec.dim), np.float32), "words": ids[:, :-1]}
    model.fit(inputs, ids[:, 1:], epochs=60, batch_size=len(ids), verbose=0)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocabulary.save(run_dir / VOCABULARY_FILE)
    RunDir(run_dir).write_config(
        {
            **{k: v for k, v in spec.metadata().items() if k in ("encoder", "image_size", "preprocessing")},
            "weights": "none",
            "model": asdict(config),
        }
    )
    save_model_without_optimizer(model, run_dir / MODEL_FILE)
    return run_dir


@pytest.fixture(scope="session")
def captioner(tmp_path_factory) -> Captioner:
    return Captioner(load_run(build_fixed_caption_run(tmp_path_factory.mktemp("tiny_run"))))


@pytest.fixture(scope="module")
def client(captioner):
    app = create_app(captioner, max_upload_mb=MAX_UPLOAD_MB, batch_window_ms=5)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def photo() -> Path:
    photos = sorted(PHOTOS.glob("*.jpg"))[:1] if PHOTOS.is_dir() else []
    if not photos:
        pytest.skip(f"no Flickr8k photos in {PHOTOS}")
    return photos[0]


def jpeg_bytes(size: tuple[int, int] = (64, 48), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png() -> bytes:
    """Return a tiny PNG whose header claims 20000 x 20000 pixels (past Pillow's hard limit)."""
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


def post_files(client: TestClient, *files: tuple[str, bytes], field: str = "files"):
    return client.post(
        "/api/caption", files=[(field, (name, data, "application/octet-stream")) for name, data in files]
    )


# --- the API ---------------------------------------------------------------------------------------


def test_health_describes_the_loaded_run(client, captioner):
    health = client.get("/api/health").json()
    assert health["model"] == str(captioner.run.path)
    assert health["encoder"] == "efficientnet_lite0"
    assert health["decoder"] == "merge"
    assert health["vocabulary_size"] == len(captioner.vocabulary) == 12
    assert health["beam"] == 3 and health["batching"] is True and health["classifier"] is False


def test_caption_json_matches_the_captioner(client, captioner, photo):
    response = post_files(client, (photo.name, photo.read_bytes()))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["beam"] == 3 and body["model"] == str(captioner.run.path)
    [result] = body["results"]
    assert result["image"] == photo.name
    assert result["caption"] == TINY_CAPTION
    [expected], errors = captioner.caption_files([photo])  # the same encoder, decoder and beam search
    assert errors == {}
    assert [b["caption"] for b in result["beams"]] == [c for c, _ in expected.beams]
    assert [b["log_prob"] for b in result["beams"]] == pytest.approx([p for _, p in expected.beams], abs=1e-3)
    log_probs = [b["log_prob"] for b in result["beams"]]
    assert len(log_probs) == 3 and log_probs == sorted(log_probs, reverse=True) and log_probs[0] <= 0
    assert set(result["timing_ms"]) == {"queue", "decode", "encode", "beam_search", "total"}
    assert result["batch_size"] == 1
    assert "error" not in result and "class" not in result


def test_the_service_decodes_with_the_flags_infer_takes(captioner, photo):
    import serve
    from cli import decoding_options

    args = serve.parse_args(["--beam", "4", "--length-penalty", "1.0", "--no-repeat-ngram", "2", "--max-length", "6"])
    options = decoding_options(args)
    assert options == DecodingOptions(beam=4, max_length=6, length_penalty=1.0, no_repeat_ngram=2)
    with TestClient(create_app(captioner, decoding=options)) as client:
        health = client.get("/api/health").json()
        response = post_files(client, (photo.name, photo.read_bytes()))
    assert health["decoding"] == {"beam": 4, "max_length": 6, "length_penalty": 1.0, "no_repeat_ngram": 2}
    assert response.status_code == 200, response.text
    served = [(b["caption"], b["log_prob"]) for b in response.json()["results"][0]["beams"]]
    [expected], _ = captioner.caption_files([photo], options)  # what infer.py prints with the same flags
    [default], _ = captioner.caption_files([photo])
    assert [c for c, _ in served] == [c for c, _ in expected.beams]
    assert [p for _, p in served] == pytest.approx([p for _, p in expected.beams], abs=1e-3)
    assert len(served) == 4 and [c for c, _ in served] != [c for c, _ in default.beams]
    for caption, _ in served:  # no word pair twice, no caption over 6 tokens (5 words and <end>)
        words = caption.split()
        assert len(words) <= 5 and len(set(zip(words, words[1:], strict=False))) == len(words) - 1


def test_an_ensemble_is_named_by_all_its_members(captioner, tmp_path):
    other = build_fixed_caption_run(tmp_path / "other", seed=1)
    ensemble = Captioner.load([captioner.run.path, other])
    with TestClient(create_app(ensemble)) as client:
        body = post_files(client, ("red.jpg", jpeg_bytes())).json()
        health = client.get("/api/health").json()
    assert body["model"] == health["model"] == f"{captioner.run.path} + {other}"
    assert body["results"][0]["caption"] == TINY_CAPTION


def test_several_files_keep_their_order_and_a_bad_one_gets_an_error(client):
    response = post_files(client, ("red.jpg", jpeg_bytes()), ("notes.txt", b"hello"), ("blue.jpg", jpeg_bytes()))
    assert response.status_code == 200
    red, notes, blue = response.json()["results"]
    assert (red["image"], red["caption"], red["batch_size"]) == ("red.jpg", TINY_CAPTION, 2)
    assert notes == {"image": "notes.txt", "error": "notes.txt: not an image file Pillow can read"}
    assert blue["caption"] == TINY_CAPTION


def test_client_file_names_are_labels_only(client):
    response = post_files(client, ("../../etc/passwd.jpg", jpeg_bytes()))
    assert response.status_code == 200
    assert response.json()["results"][0]["image"] == "passwd.jpg"


@pytest.mark.parametrize(
    "name, data, status, message",
    [
        ("notes.txt", b"just some text, not a photo\n", 422, "notes.txt: not an image file Pillow can read"),
        ("empty.jpg", b"", 422, "empty.jpg: empty file (0 bytes)"),
        ("bomb.png", decompression_bomb_png(), 422, "bomb.png: too large to decode safely"),
    ],
)
def test_unreadable_image_is_422_naming_the_problem(client, name, data, status, message):
    response = post_files(client, (name, data))
    assert response.status_code == status
    assert response.json()["detail"].startswith(message)
    assert response.json()["results"][0]["error"].startswith(message)


def test_truncated_jpeg_is_422(client, photo):
    data = photo.read_bytes()
    response = post_files(client, ("cut.jpg", data[: len(data) // 2]))
    assert response.status_code == 422
    assert response.json()["detail"].startswith("cut.jpg: corrupt or truncated image")


def test_upload_over_the_size_limit_is_413(client):
    response = post_files(client, ("big.jpg", b"\xff" * (MAX_UPLOAD_MB * 2**20 + 1)))
    assert response.status_code == 413
    assert response.json()["detail"] == f"upload too large: at most {MAX_UPLOAD_MB} MB per request (all files together)"


def test_size_limit_holds_without_content_length(client):
    def body():  # a generator: httpx sends it chunked, with no Content-Length to check up front
        yield b"--xyz\r\nContent-Disposition: form-data; name=files; filename=a.jpg\r\n\r\n"
        for _ in range(MAX_UPLOAD_MB * 4):
            yield b"\xff" * 2**19
        yield b"\r\n--xyz--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    response = client.post("/api/caption", content=body(), headers=headers)
    assert response.status_code == 413


def test_missing_files_field_is_422_naming_it(client):
    response = post_files(client, ("red.jpg", jpeg_bytes()), field="photo")
    assert response.status_code == 422
    assert response.json()["detail"] == "no files in the field 'files' (fields sent: photo); send photos as 'files'"


def test_text_in_the_files_field_is_not_a_file(client):
    response = client.post("/api/caption", data={"files": "red.jpg"}, files={"other": ("x.jpg", b"x")})
    assert response.status_code == 422
    assert "no files in the field 'files'" in response.json()["detail"]


def test_not_multipart_is_415(client):
    response = client.post("/api/caption", json={"files": []})
    assert response.status_code == 415
    assert "expected multipart/form-data" in response.json()["detail"]


def test_malformed_multipart_is_400(client):
    response = client.post("/api/caption", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert response.status_code == 400
    assert response.json()["detail"] == "malformed multipart upload: Missing boundary in multipart."


def test_uploads_stay_in_memory(client, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)  # where SpooledTemporaryFile rolls over to
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    assert 2**20 < len(buffer.getvalue()) < MAX_UPLOAD_MB * 2**20  # past Starlette's 1 MB default spool
    response = post_files(client, ("noise.png", buffer.getvalue()))
    assert response.status_code == 200
    assert response.json()["results"][0]["caption"] == TINY_CAPTION


def test_server_survives_bad_input(client):
    post_files(client, ("bomb.png", decompression_bomb_png()))
    client.post("/api/caption", content=b"\x00" * 100, headers={"content-type": "multipart/form-data; boundary=q"})
    assert client.get("/api/health").status_code == 200
    assert post_files(client, ("red.jpg", jpeg_bytes())).status_code == 200


def test_page_static_files_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop-zone"' in page.text
    assert client.get("/static/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/api/caption"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["files"]["items"]["format"] == "binary"
    assert {"400", "413", "415", "422"} <= set(schema["paths"]["/api/caption"]["post"]["responses"])
    assert client.get("/docs").status_code == 200


# --- batching -------------------------------------------------------------------------------------


def batch_sizes(captioner: Captioner, requests: int, **options) -> list[int]:
    """Return the batch size each of `requests` concurrent one-photo requests was captioned in."""

    async def run() -> list[int]:
        batcher = CaptionBatcher(captioner, **options)
        await batcher.start()
        try:
            uploads = [[Upload(f"{i}.jpg", jpeg_bytes(color=(i * 20, 0, 0)))] for i in range(requests)]
            answers = await asyncio.gather(*(batcher.caption(u) for u in uploads))
        finally:
            await batcher.stop()
        assert all(a[0]["caption"] == TINY_CAPTION for a in answers)
        return [a[0]["batch_size"] for a in answers]

    return asyncio.run(run())


def test_concurrent_requests_share_one_batch(captioner):
    assert batch_sizes(captioner, 5, window_ms=50, max_batch=8) == [5] * 5


def test_batches_stop_at_max_batch(captioner):
    # Sorted: uploads are decoded on a thread pool, so which request ends up alone depends on the threads.
    assert sorted(batch_sizes(captioner, 5, window_ms=50, max_batch=2)) == [1, 2, 2, 2, 2]


def test_no_batching_captions_each_request_alone(captioner):
    assert batch_sizes(captioner, 3, batching=False) == [1, 1, 1]


def test_classifier_hook_adds_the_class(captioner):
    def classify(images: list[bytes]) -> list[tuple[str, float]]:
        return [("dog", 0.75)] * len(images)

    with TestClient(create_app(captioner, classify=classify)) as client:
        assert client.get("/api/health").json()["classifier"] is True
        [result] = post_files(client, ("red.jpg", jpeg_bytes())).json()["results"]
    assert result["class"] == {"label": "dog", "probability": 0.75}
    assert "classify" in result["timing_ms"]


# --- the page in a real browser -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.browser
def test_page_in_chromium(captioner, photo, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(captioner), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]  # fmt: skip
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_function("document.getElementById('model-info').textContent.includes('merge')")
                page.set_input_files("#file-input", [str(photo), str(notes)])
                page.wait_for_selector(".card:not(.pending) .caption:not(:empty)", timeout=60_000)
                page.wait_for_selector(".card.error .status", timeout=60_000)
                assert page.locator(".card .caption").filter(has_text=TINY_CAPTION).count() == 1
                assert page.locator(".card .beams li").count() == 3
                error = page.locator(".card.error .status").inner_text()
                assert error == "Cannot caption this file. notes.txt: not an image file Pillow can read"
                (ROOT / "test-output").mkdir(exist_ok=True)
                page.screenshot(path=str(ROOT / "test-output" / "web.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- hostile clients: the pixel budget, decoding off the model's thread, malformed bodies ---------


def test_a_large_pixel_png_is_refused_fast_with_little_memory(client):
    from test_features import palette_png

    # The attack: a 13000 x 13000 palette PNG (under Pillow's bomb limit), three in one request.
    # Decoded at full size it took 3.6 GB and 8.7 s of the model's thread each.
    big = palette_png(13000, 13000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    response = post_files(client, ("big.png", big), ("big2.png", big), ("big3.png", big))
    seconds = time.perf_counter() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert response.status_code == 422
    assert response.json()["detail"].startswith(
        "big.png: 13000 x 13000 pixels (169.0 megapixels) is over the limit of 50 megapixels (--max-pixels)"
    )
    assert seconds < 2.0 and grown_mb < 300, (seconds, grown_mb)
    assert client.get("/api/health").json()["max_pixels"] == 50_000_000


def test_a_slow_image_does_not_hold_up_other_requests(captioner, monkeypatch):
    import web.batcher

    real_load_image, threads = web.batcher.load_image, set()

    def load_image(data: bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
        threads.add(threading.current_thread().name)
        if data == b"SLOW":  # an image that takes 2 s to decode
            time.sleep(2.0)
            return np.zeros((size, size, 3), np.float32)
        return real_load_image(data, size, max_pixels)

    monkeypatch.setattr(web.batcher, "load_image", load_image)

    async def timed(batcher: CaptionBatcher, upload: Upload) -> tuple[str, float]:
        started = time.perf_counter()
        [result] = await batcher.caption([upload])
        return result["caption"], time.perf_counter() - started

    async def run() -> tuple[tuple[str, float], tuple[str, float]]:
        batcher = CaptionBatcher(captioner, window_ms=20, decode_workers=2)
        await batcher.start()
        try:
            slow = asyncio.create_task(timed(batcher, Upload("slow.png", b"SLOW")))
            await asyncio.sleep(0.05)  # the slow one is decoding when the normal one arrives
            return await timed(batcher, Upload("red.jpg", jpeg_bytes())), await slow
        finally:
            await batcher.stop()

    (fast_caption, fast_seconds), (slow_caption, slow_seconds) = asyncio.run(run())
    assert fast_caption == slow_caption == TINY_CAPTION
    assert fast_seconds < 1.0 and slow_seconds >= 2.0, (fast_seconds, slow_seconds)
    assert threads and all(name.startswith("decode") for name in threads), threads  # never the model's thread


def test_a_body_without_its_closing_boundary_is_400(client):
    part = b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="red.jpg"\r\n\r\n' + jpeg_bytes()
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    response = client.post("/api/caption", content=part + b"\r\n", headers=headers)
    assert response.status_code == 400
    assert response.json()["detail"] == "malformed multipart upload: the body ends before its closing boundary"
    assert client.post("/api/caption", content=part + b"\r\n--xyz--\r\n", headers=headers).status_code == 200


# --- hostile clients: timeouts and caps, on a real uvicorn on a free loopback port ----------------


@contextmanager
def live_server(captioner: Captioner, limits: ClientLimits) -> Iterator[str]:
    """Serve the tiny run with `limits` on 127.0.0.1 (as serve.py does) in a thread; yield its URL."""
    import uvicorn

    port = free_port()
    config = uvicorn_config(create_app(captioner, limits=limits), "127.0.0.1", port, limits, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    try:
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def raw_connections(url: str, count: int, first_bytes: bytes = b"") -> Iterator[list[socket.socket]]:
    """Open `count` sockets to the server, send each `first_bytes`, and close them all on exit."""
    host, port = url.removeprefix("http://").split(":")
    sockets = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection((host, int(port)), timeout=10))
            sockets[-1].sendall(first_bytes)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> tuple[bytes, float]:
    """Return (what the server sent until it closed the connection, seconds waited); inf seconds if it did not."""
    started, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, float("inf")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


HALF_A_HEADER = b"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"
UPLOAD_HEAD = (
    b"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
    b"Content-Length: 100000\r\n\r\n"
    b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n' + b"\xff" * 1000
)  # then it stalls, 98 KB short


def test_stalled_headers_are_dropped_within_the_header_timeout(captioner):
    limits = ClientLimits(header_timeout_s=1.0)
    with live_server(captioner, limits) as url:
        opened = time.monotonic()
        with raw_connections(url, 1) as [silent], raw_connections(url, 1, HALF_A_HEADER) as [half]:
            for sock in (silent, half):
                data, _ = read_until_closed(sock)
                assert data == b"" and 0.8 < time.monotonic() - opened < 3.0, time.monotonic() - opened
        with httpx.Client(base_url=url, timeout=10) as http:  # a keep-alive client: two requests, one connection
            assert http.get("/api/health").status_code == http.get("/api/health").status_code == 200


def test_a_stalled_body_is_dropped_with_408(captioner):
    limits = ClientLimits(body_timeout_s=1.0)
    with live_server(captioner, limits) as url:
        with raw_connections(url, 1, UPLOAD_HEAD) as [sock]:
            data, waited = read_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 408 "), data[:100]
        assert b"connection: close" in data.lower()
        assert data.endswith(b'{"detail":"the upload stalled: no data for 1 s"}')
        assert 0.8 < waited < 3.0, waited
        assert httpx.get(f"{url}/api/health", timeout=10).status_code == 200


def test_over_the_connection_cap_is_503_with_retry_after(captioner):
    limits = ClientLimits(max_connections=3, header_timeout_s=3.0, retry_after_s=7)
    with live_server(captioner, limits) as url:
        with raw_connections(url, 3, HALF_A_HEADER):
            time.sleep(0.3)  # the server has accepted the three
            response = httpx.get(f"{url}/api/health", timeout=10)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7" and response.headers["connection"] == "close"
        assert response.json() == {"detail": "too many connections (at most 3); retry in 7 s"}
        deadline = time.monotonic() + 5  # the three are gone: served again
        while (status := httpx.get(f"{url}/api/health", timeout=10).status_code) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == 200


def test_over_the_upload_cap_is_503_with_retry_after(captioner):
    limits = ClientLimits(max_uploads=2, body_timeout_s=2.0, retry_after_s=4)
    with live_server(captioner, limits) as url:
        with raw_connections(url, 2, UPLOAD_HEAD) as stalled:
            time.sleep(0.3)  # both uploads are in flight, stalled
            response = httpx.post(f"{url}/api/caption", files={"files": ("red.jpg", jpeg_bytes())}, timeout=10)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "4"
            assert response.json() == {"detail": "too many uploads in flight (at most 2); retry in 4 s"}
            assert all(read_until_closed(sock)[0].startswith(b"HTTP/1.1 408 ") for sock in stalled)
        response = httpx.post(f"{url}/api/caption", files={"files": ("red.jpg", jpeg_bytes())}, timeout=30)
        assert response.status_code == 200 and response.json()["results"][0]["caption"] == TINY_CAPTION


def test_serve_flags_set_the_limits():
    import serve

    args = serve.parse_args(
        ["--header-timeout", "2", "--body-timeout", "3.5", "--max-connections", "10", "--max-uploads", "4",
         "--retry-after", "9", "--keep-alive-timeout", "1", "--max-pixels", "20M", "--decode-workers", "3"]
    )  # fmt: skip
    assert args.limits == ClientLimits(
        header_timeout_s=2.0, body_timeout_s=3.5, keep_alive_s=1.0, max_connections=10, max_uploads=4, retry_after_s=9
    )
    assert (args.max_pixels, args.decode_workers) == (20_000_000, 3)
    assert serve.parse_args([]).limits == ClientLimits()
    config = uvicorn_config(object(), "127.0.0.1", 8000, args.limits)
    assert config.timeout_keep_alive == 1.0 and config.http.limits == args.limits
    with pytest.raises(SystemExit):
        serve.parse_args(["--max-connections", "0"])
