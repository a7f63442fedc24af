"""Encoders, weight conversion, the feature store and the extraction loop (issue 2)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SHARED_FLICKR, make_image
from features.encoders import ENCODERS, EncoderError, build_encoder, get_encoder_spec
from features.extract import extract_features
from features.images import ImageDecodeError, load_image
from features.store import FeatureStore, FeatureStoreError, SpatialMaps, safe_loads, spatial_path
from features.torch_checkpoint import CheckpointError, read_legacy_state_dict

SHARED_FLOWERS = SHARED_FLICKR.parent / "flowers" / "train"


@pytest.mark.parametrize(
    "name, size, dim, spatial",
    [
        ("efficientnet_lite0", 224, 1280, (7, 7, 1280)),
        ("efficientnet_lite1", 240, 1280, (8, 8, 1280)),
        ("efficientnet_lite2", 260, 1280, (9, 9, 1280)),
        ("vgg16", 224, 4096, (14, 14, 512)),
        ("resnet50", 224, 2048, (7, 7, 2048)),
    ],
)
def test_encoder_registry_shapes(name, size, dim, spatial):
    spec = get_encoder_spec(name)
    assert (spec.dim, spec.spatial_shape, spec.input_size) == (dim, spatial, size)
    model = build_encoder(name, None, spatial=True)
    pooled, maps = model.predict_on_batch(np.zeros((2, size, size, 3), np.float32))
    assert pooled.shape == (2, dim) and maps.shape == (2, *spatial)


def test_unknown_encoder_and_missing_weights_file_are_clear_errors(tmp_path):
    with pytest.raises(EncoderError, match="choose one of"):
        get_encoder_spec("alexnet")
    with pytest.raises(EncoderError, match="does not exist"):
        build_encoder("efficientnet_lite0", tmp_path / "nope.weights.h5")


def test_weights_load_from_local_file(tmp_path):
    from features.efficientnet_lite import VARIANTS, build_efficientnet_lite

    keras.utils.set_random_seed(3)
    source = build_efficientnet_lite(VARIANTS["efficientnet_lite0"], include_top=True)
    path = tmp_path / "lite0.weights.h5"
    source.save_weights(path)
    image = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
    expected = keras.Model(source.input, source.get_layer("avg_pool").output)(image)
    loaded = build_encoder("efficientnet_lite0", path)
    # Randomly initialised, this deep network's outputs are tiny: compare relatively, not absolutely.
    assert np.count_nonzero(expected) > 100
    np.testing.assert_allclose(loaded.predict_on_batch(image), expected, rtol=1e-3, atol=0)
    random = build_encoder("efficientnet_lite0", None)
    assert not np.allclose(random.predict_on_batch(image), expected, rtol=0.1, atol=0)


# From ../shared/docs/encoders.md: the original PyTorch model on sklearn's sample photos.
REFERENCE = {
    "china.jpg": (
        [(442, 0.2865), (449, 0.1611), (975, 0.0784), (698, 0.0767), (483, 0.0623)],
        0.24081,
        17.4537,
        [0, 0.0026, 0.1644, 0, 0, 0, 1.2986, 0.684],
    ),
    "flower.jpg": (
        [(985, 0.1466), (309, 0.0761), (738, 0.0431), (994, 0.0328), (599, 0.0301)],
        0.17828,
        14.9047,
        [0, 0.0171, 0, 0, 0, 0, 0, 1.8584],
    ),
}


def test_efficientnet_lite0_conversion_matches_the_pytorch_reference(tmp_path):
    from sklearn.datasets import load_sample_image

    from features.efficientnet_lite import VARIANTS, build_efficientnet_lite, imagenet_weights_file

    model = build_efficientnet_lite(VARIANTS["efficientnet_lite0"], include_top=True)
    model.load_weights(imagenet_weights_file(VARIANTS["efficientnet_lite0"]))
    pooled_model = keras.Model(model.input, [model.output, model.get_layer("avg_pool").output])
    spec = get_encoder_spec("efficientnet_lite0")
    for name, (top5, mean, norm, first8) in REFERENCE.items():
        path = tmp_path / name
        Image.fromarray(load_sample_image(name)).save(path, quality=100)
        # The reference resized the in-memory array; load_image re-reads a (near-lossless) JPEG of it.
        pixels = np.asarray(
            Image.fromarray(load_sample_image(name)).resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32
        )
        logits, pooled = pooled_model.predict_on_batch(spec.preprocess(pixels[None]))
        probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits[0]))
        for index, probability in top5:
            assert abs(probabilities[index] - probability) < 0.01
        assert list(np.argsort(-probabilities)[:5]) == [i for i, _ in top5]
        assert pooled[0].mean() == pytest.approx(mean, rel=0.01)
        assert np.linalg.norm(pooled[0]) == pytest.approx(norm, rel=0.01)
        np.testing.assert_allclose(pooled[0][:8], first8, atol=0.01)
        # Through the project's own loading function the top class is unchanged.
        via_loader = pooled_model.predict_on_batch(spec.preprocess(load_image(path, 224)[None]))[0]
        assert int(np.argmax(via_loader[0])) == top5[0][0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_efficientnet_lite_conversions_recognise_real_photos(name):
    # No PyTorch reference values exist for these here, so the check is what the network says about
    # photos whose ImageNet class is known: a wrong layout or weight mapping fails to load or says noise.
    from sklearn.datasets import load_sample_image

    from features.efficientnet_lite import VARIANTS, build_efficientnet_lite, imagenet_weights_file

    variant = VARIANTS[name]
    model = build_efficientnet_lite(variant, include_top=True)
    model.load_weights(imagenet_weights_file(variant))
    spec = get_encoder_spec(name)
    size = variant.image_size
    palace = np.asarray(Image.fromarray(load_sample_image("china.jpg")).resize((size, size)), dtype=np.float32)
    logits = model.predict_on_batch(spec.preprocess(palace[None]))[0]
    assert int(np.argmax(logits)) == 698  # "palace"
    daisies = sorted((SHARED_FLOWERS / "daisy").glob("*.jpg"))[:40]
    if not daisies:
        pytest.skip(f"no flower photos in {SHARED_FLOWERS}")
    pixels = np.stack([load_image(path, size) for path in daisies])
    top1 = np.argmax(model.predict(spec.preprocess(pixels), batch_size=20, verbose=0), axis=1)
    # Measured 2026-11-25 on 120 daisy photos: 86% (lite0 and lite2) and 83% (lite1) top-1 "daisy" (985).
    assert np.mean(top1 == 985) > 0.7


def test_checkpoint_reader_refuses_foreign_globals(tmp_path):
    path = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    with path.open("wb") as handle:
        pickle.dump(0x1950A86A20F9469CFC6C, handle)
        handle.write(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match="does not allow"):
        read_legacy_state_dict(path)
    assert not marker.exists()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def test_feature_store_refuses_a_malicious_pickle_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"format": "captioning-feature-store", "features": _Exploit(marker)}))
    with pytest.raises(FeatureStoreError, match="refusing to load subprocess.call"):
        FeatureStore.load(path)
    assert not marker.exists()
    with pytest.raises(FeatureStoreError, match="refusing"):
        safe_loads(pickle.dumps(np.array([object()], dtype=object)))


def test_feature_store_round_trip_and_structure_checks(tmp_path):
    store = FeatureStore({"encoder": "x", "dim": 3}, {"a.jpg": np.arange(3, dtype=np.float32)})
    store.save(tmp_path / "s.pkl")
    loaded = FeatureStore.load(tmp_path / "s.pkl")
    np.testing.assert_array_equal(loaded.features["a.jpg"], [0, 1, 2])
    assert loaded.metadata == {"encoder": "x", "dim": 3}
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind
    bad = {"format": "captioning-feature-store", "version": 1, "metadata": {"dim": 4}, "features": {"a": np.zeros(3)}}
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(FeatureStoreError, match="not a 4-d vector"):
        FeatureStore.load(tmp_path / "bad.pkl")


def _bad_inputs(folder):
    """Write one file of every awkward kind; return {name: expected readable?}."""
    make_image(folder / "gray.png", mode="L")
    make_image(folder / "rgba.png", mode="RGBA")
    make_image(folder / "palette.gif", mode="P")
    make_image(folder / "cmyk.jpg", mode="CMYK")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(folder / "deep16.png")
    make_image(folder / "huge.jpg", size=(4000, 3000))
    make_image(folder / "ok.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    make_image(folder / "truncated.jpg", size=(200, 200), noise_seed=1)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return {
        "gray.png": True,
        "rgba.png": True,
        "palette.gif": True,
        "cmyk.jpg": True,
        "deep16.png": True,
        "huge.jpg": True,
        "ok.jpg": True,
        "empty.jpg": False,
        "notes.jpg": False,
        "truncated.jpg": False,
    }


def test_load_image_converts_every_decodable_kind_and_rejects_the_rest(tmp_path):
    for name, readable in _bad_inputs(tmp_path).items():
        if readable:
            pixels = load_image(tmp_path / name, 32)
            assert pixels.shape == (32, 32, 3) and pixels.dtype == np.float32, name
        else:
            with pytest.raises(ImageDecodeError):
                load_image(tmp_path / name, 32)
    with pytest.raises(ImageDecodeError, match="no such file"):
        load_image(tmp_path / "absent.jpg", 32)
    # RGBA composites on white; 16-bit scales its full range to 8 bits instead of clipping.
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png", 8).min() == 255
    assert load_image(tmp_path / "deep16.png", 64).max() > 200


def test_extraction_skips_bad_inputs_and_counts_them(tmp_path):
    expected = _bad_inputs(tmp_path)
    sources = {name: tmp_path / name for name in expected}
    sources["listed_but_missing.jpg"] = tmp_path / "listed_but_missing.jpg"
    report = extract_features(sources, tmp_path / "out.pkl", "efficientnet_lite0", None, batch_size=4, progress=False)
    readable = {n for n, ok in expected.items() if ok}
    assert report.extracted == len(readable)
    assert set(report.failed) == set(sources) - readable
    store = FeatureStore.load(tmp_path / "out.pkl")
    assert set(store.features) == readable
    assert all(v.dtype == np.float32 and v.shape == (1280,) for v in store.features.values())
    assert store.metadata["encoder"] == "efficientnet_lite0" and store.metadata["weights"] == "none"


def test_extraction_resumes_and_an_interrupt_keeps_flushed_chunks(tmp_path, monkeypatch):
    import features.extract as extract

    sources = {f"{i}.jpg": make_image(tmp_path / f"{i}.jpg", (i * 20, 0, 0)) for i in range(10)}
    out = tmp_path / "store.pkl"
    original = extract.decoded_batches

    def interrupted(*args, **kwargs):
        for number, batch in enumerate(original(*args, **kwargs)):
            if number == 3:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(extract, "decoded_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_features(sources, out, "efficientnet_lite0", None, batch_size=2, flush_every=4, progress=False)
    first = FeatureStore.load(out)
    assert len(first.features) == 6  # three batches of two were done; Ctrl-C flushes them
    monkeypatch.setattr(extract, "decoded_batches", original)
    report = extract_features(sources, out, "efficientnet_lite0", None, batch_size=2, progress=False)
    assert (report.already_present, report.extracted) == (6, 4)
    final = FeatureStore.load(out)
    assert set(final.features) == set(sources)
    for key, vector in first.features.items():
        np.testing.assert_array_equal(final.features[key], vector)
    # A store made by another encoder is never mixed into.
    with pytest.raises(FeatureStoreError, match="existing store has encoder"):
        extract_features(sources, out, "vgg16", None, progress=False)


def test_a_killed_run_leaves_the_previous_store_intact(tmp_path):
    sources = {f"{i}.jpg": make_image(tmp_path / f"{i}.jpg", (0, i * 20, 0)) for i in range(4)}
    out = tmp_path / "store.pkl"
    extract_features(dict(list(sources.items())[:2]), out, "efficientnet_lite0", None, progress=False)
    before = out.read_bytes()
    script = (
        "import os, features.store as s\n"
        "def die(self, path): os._exit(9)\n"  # killed in the middle of writing the store
        "s.FeatureStore.save = die\n"
        "from features.extract import extract_features\n"
        f"extract_features({ {k: str(v) for k, v in sources.items()}!r}, {str(out)!r}, 'efficientnet_lite0', None,"
        " progress=False)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert result.returncode == 9
    assert out.read_bytes() == before


def test_spatial_maps_go_to_hdf5_beside_the_store(tmp_path):
    sources = {f"{i}.jpg": make_image(tmp_path / f"{i}.jpg", (i * 40, 0, 0)) for i in range(5)}
    out = tmp_path / "s.pkl"
    extract_features(
        dict(list(sources.items())[:3]),
        out,
        "efficientnet_lite0",
        None,
        spatial=True,
        batch_size=2,
        flush_every=2,
        progress=False,
    )
    extract_features(sources, out, "efficientnet_lite0", None, spatial=True, batch_size=2, progress=False)
    maps = SpatialMaps(spatial_path(out))
    assert set(maps.index) == set(sources) and maps.shape == (7, 7, 1280)
    got = maps.get(["4.jpg", "0.jpg"])
    assert got.shape == (2, 7, 7, 1280) and got.dtype == np.float32
    # The pooled vector is the spatial average of the map (float16 storage: small tolerance).
    store = FeatureStore.load(out)
    np.testing.assert_allclose(got[1].mean(axis=(0, 1)), store.features["0.jpg"], rtol=0.02, atol=0.02)
    assert not (tmp_path / "s.spatial.parts").exists()
    maps.close()


def test_merging_map_files_keeps_the_first_copy_of_each_kept_id_block_by_block(tmp_path, monkeypatch):
    import features.store as store_module
    from features.store import merge_spatial, write_spatial_shard

    monkeypatch.setattr(store_module, "MERGE_ROWS", 3)  # several blocks per file
    rng = np.random.default_rng(0)
    first = {f"{i}.jpg": rng.normal(size=(2, 2, 3)).astype(np.float16) for i in range(8)}
    second = {f"{i}.jpg": rng.normal(size=(2, 2, 3)).astype(np.float16) for i in range(5, 13)}
    for name, maps in (("a.h5", first), ("b.h5", second)):
        ids = sorted(maps, reverse=True)  # rows out of id order
        write_spatial_shard(tmp_path / name, ids, np.stack([maps[i] for i in ids]))
    keep = {f"{i}.jpg" for i in range(13)} - {"2.jpg", "11.jpg"}
    merge_spatial(tmp_path / "out.h5", [tmp_path / "a.h5", tmp_path / "b.h5"], keep)
    merged = SpatialMaps(tmp_path / "out.h5")
    assert set(merged.index) == keep
    for image_id in sorted(keep):
        expected = first.get(image_id, second.get(image_id))  # the first file's copy wins
        np.testing.assert_array_equal(merged.get([image_id])[0], expected.astype(np.float32))
    merged.close()


def test_extract_cli_on_generated_and_real_images(tmp_path, capsys):
    import extract_features as cli

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        make_image(folder / f"p{i}.jpg", (i * 60, 100, 50))
    (folder / "readme.txt").write_text("not an image, not listed")
    assert (
        cli.main(["--data", str(folder), "--weights", "none", "--out", str(tmp_path / "g.pkl"), "--no-progress"]) == 0
    )
    assert len(FeatureStore.load(tmp_path / "g.pkl").features) == 3
    assert "3 extracted" in capsys.readouterr().out

    real = tmp_path / "real"
    (real / "Images").mkdir(parents=True)
    lines = SHARED_FLICKR.joinpath("Flickr8k.token.txt").read_text().splitlines()
    ids = sorted(p.name for p in (SHARED_FLICKR / "Images").iterdir())[:10]
    for image_id in ids:
        (real / "Images" / image_id).symlink_to(SHARED_FLICKR / "Images" / image_id)
    wanted = set(ids) | {"1001773457_577c3a7d70.jpg", "not_on_disk.jpg"}
    kept = [line for line in lines if line.split("#")[0] in wanted] + ["not_on_disk.jpg#0\tA ghost ."]
    (real / "Flickr8k.token.txt").write_text("\n".join(kept) + "\n")
    assert cli.main(["--data", str(real), "--out", str(tmp_path / "r.pkl"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "10 extracted" in out and "1 listed in the caption file but missing" in out
    store = FeatureStore.load(tmp_path / "r.pkl")
    assert sorted(store.features) == ids and store.metadata["weights"] == "imagenet"
    # Real photos give non-trivial ImageNet features: sparse-ish ReLU6 output with spread.
    matrix = store.matrix(ids)
    assert 0.1 < matrix.mean() < 1.0 and matrix.std() > 0.2


def test_extract_cli_fails_cleanly_when_nothing_is_readable(tmp_path, capsys):
    import extract_features as cli

    (tmp_path / "junk.jpg").write_text("nope")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data", str(tmp_path), "--weights", "none", "--out", str(tmp_path / "x.pkl"), "--no-progress"])
    assert exit_info.value.code == 1
    assert "no image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data", str(tmp_path / "missing"), "--no-progress"])
    assert exit_info.value.code == 2


def test_offline_imagenet_download_is_a_clear_error():
    # This machine cannot reach Keras's weight host; a user online would get the real weights.
    with pytest.raises(EncoderError, match="--weights PATH"):
        build_encoder("resnet50", "imagenet")


def test_all_registered_encoders_record_their_preprocessing():
    for spec in ENCODERS.values():
        metadata = spec.metadata()
        assert metadata["preprocessing"] and metadata["dim"] == spec.dim
    lite = get_encoder_spec("efficientnet_lite0").preprocess(np.array([[0.0, 127.0, 255.0]]))
    np.testing.assert_allclose(lite, [[-127 / 128, 0.0, 1.0]])


# --- load_image's pixel budget ----------------------------------------------------------------------


def palette_png(width: int, height: int, index: int = 3) -> bytes:
    """Return a one-colour palette PNG, compressed row by row (13000 x 13000 pixels: about 0.2 MB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit, colour type 3: palette
    palette = bytes(v for i in range(256) for v in (i, 255 - i, i // 2))
    row, compressor = b"\x00" + bytes([index]) * width, zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    chunks = chunk(b"IHDR", header) + chunk(b"PLTE", palette) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


DECODE_IN_A_FRESH_PROCESS = """
import resource, sys, time
from features.images import ImageDecodeError, load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    outcome = str(load_image(sys.argv[1], 224).shape)
except ImageDecodeError as error:
    outcome = str(error)
print(outcome, time.perf_counter() - started, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, sep="\\n")
"""


def decode_in_a_fresh_process(path) -> tuple[str, float, float]:
    """Return (the shape or the error, seconds, peak memory in MB over the process's start) of load_image(path)."""
    result = subprocess.run(
        [sys.executable, "-c", DECODE_IN_A_FRESH_PROCESS, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    outcome, seconds, megabytes = result.stdout.strip().splitlines()
    return outcome, float(seconds), float(megabytes)


def test_an_image_over_the_pixel_budget_is_refused_before_decoding(tmp_path):
    # The image: 169 megapixels, under Pillow's bomb limit; decoding it took 3.6 GB and 8.7 s.
    (tmp_path / "big.png").write_bytes(palette_png(13000, 13000))
    outcome, seconds, megabytes = decode_in_a_fresh_process(tmp_path / "big.png")
    assert outcome == (
        f"{tmp_path / 'big.png'}: 13000 x 13000 pixels (169.0 megapixels) is over the limit of 50 megapixels "
        "(--max-pixels)"
    )
    assert seconds < 0.5 and megabytes < 50


def test_an_image_within_the_budget_decodes_in_bounded_memory(tmp_path):
    # 48 megapixels in palette mode: the old path expanded it to RGBA three times over (about 1 GB).
    (tmp_path / "camera.png").write_bytes(palette_png(8000, 6000))
    outcome, seconds, megabytes = decode_in_a_fresh_process(tmp_path / "camera.png")
    assert outcome == "(224, 224, 3)"
    assert megabytes < 400, f"peak {megabytes:.0f} MB"
    np.testing.assert_array_equal(load_image(tmp_path / "camera.png", 4)[0, 0], [3, 252, 1])  # palette entry 3


def test_the_pixel_budget_is_a_parameter_and_a_process_wide_setting(tmp_path, monkeypatch):
    import features.images as images

    make_image(tmp_path / "small.png", size=(40, 30))
    assert load_image(tmp_path / "small.png", 8, max_pixels=1200).shape == (8, 8, 3)
    with pytest.raises(ImageDecodeError, match=r"40 x 30 pixels \(0\.0 megapixels\) is over the limit"):
        load_image(tmp_path / "small.png", 8, max_pixels=1199)
    monkeypatch.setattr(images, "_max_pixels", images.DEFAULT_MAX_PIXELS)  # restored after the test
    images.set_max_pixels(1000)
    assert images.max_pixels() == 1000
    with pytest.raises(ImageDecodeError, match="over the limit of 0.001 megapixels"):
        load_image(tmp_path / "small.png", 8)
    with pytest.raises(ValueError):
        images.set_max_pixels(0)
    assert [images.pixel_count(t) for t in ("50000000", "50e6", "50M", "1.5m")] == [50_000_000] * 3 + [1_500_000]
    for text in ("0", "-3", "nan", "lots"):
        with pytest.raises(ValueError):
            images.pixel_count(text)


def test_a_jpeg_decodes_in_draft_mode_close_to_a_full_decode(tmp_path):
    # A 4000 x 3000 photo: draft mode decodes it at 1/4 scale (1000 x 750), never at full size.
    gradient = np.linspace(0, 255, 4000, dtype=np.float32)
    rng = np.random.default_rng(0)
    array = np.stack([gradient[None, :].repeat(3000, 0), gradient[::-1][None, :].repeat(3000, 0),
                      np.full((3000, 4000), 90.0)], axis=-1) + rng.normal(0, 3, (3000, 4000, 3))  # fmt: skip
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(tmp_path / "photo.jpg", quality=95)
    drafted = load_image(tmp_path / "photo.jpg", 224)
    with Image.open(tmp_path / "photo.jpg") as image:
        full = np.asarray(image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32)
    with Image.open(tmp_path / "photo.jpg") as image:
        image.draft(None, (448, 448))  # what load_image asks for at size 224
        assert image.size == (1000, 750)
    assert drafted.shape == full.shape == (224, 224, 3)
    assert np.abs(drafted - full).mean() < 1.0 and np.abs(drafted - full).max() < 8
