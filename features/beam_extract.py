"""Feature extraction as an Apache Beam pipeline: the sharded store of `features.extract`, on many workers.

    driver          the store's ids (`ShardWriter`); the images not in it, sorted, numbered into shards of
                    `shard_size` after the store's last shard (`plan_shards`)
    ReadFromText    the plan, (shard, id, path) a line, from a JSON-lines file the driver writes into the
                    store folder (not inside the pipeline: a job description has a size limit, 10 MB on
                    Dataflow, which millions of images would pass), then reshuffled over the workers
    DecodeImage     path -> pixels (`load_image`); an unreadable image goes to a tagged output, counted
    BatchElements   `batch_size` images at a time
    EncodeBatch     the encoder, built once per worker in `setup`; batches padded to `batch_size`
                    (`encode_batch`), so an image's vector is the single-process extractor's
    GroupByKey      by shard number
    WriteShard      one TFRecord shard and its id list, each through a temporary file (`write_shard`)
    driver          lists the finished shards in the manifest, last (`ShardWriter.add_shards`)

The unreadable images (id, reason) reach the driver through a small hidden file in the store folder,
removed once read. A failed or killed run leaves its finished shards listed (or, if the driver died
too, unlisted and removed by the next run), so the same command goes on from them.

Paths are plain file paths: the store folder and the images must be at the same path on the driver and
on every worker (the local disk with the DirectRunner; a shared mount with a cluster runner). Training
reads a store from a local folder, so URLs such as gs://bucket/store are refused.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from features.encoders import build_encoder, get_encoder_spec, local_weights_file
from features.extract import ExtractionReport, encode_batch, store_metadata
from features.images import ImageDecodeError, load_image, max_pixels
from features.shards import DEFAULT_SHARD_SIZE, MAP_DTYPE, ShardWriter, finished_shard, write_shard
from features.store import FeatureStoreError, atomic_write_bytes

METRICS_NAMESPACE = "extract_features"
UNREADABLE = "unreadable"  # the tag of DecodeImage's output of (id, reason)
UNREADABLE_FILE = ".beam-unreadable.json"  # in the store folder while a run is on
PLAN_FILE = ".beam-plan.jsonl"  # the images to extract, (shard, id, path) a line; in the store folder while a run is on
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class BeamPipelineError(RuntimeError):
    """The Beam pipeline failed (on a worker, or in the runner); its finished shards are kept."""


@dataclass(frozen=True)
class EncodingSettings:
    """What every worker needs to turn pixels into stored vectors: one object, pickled to the workers."""

    encoder: str
    weights: str | None
    spatial: bool
    batch_size: int
    vector_dtype: str
    max_pixels: int


@dataclass
class BeamReport(ExtractionReport):
    """An extraction run on Beam: `ExtractionReport` plus the pipeline's counters (committed values)."""

    counters: dict[str, int] = field(default_factory=dict)


class DecodeImage(beam.DoFn):
    """(shard, id, path) -> (shard, id, pixels); an unreadable image -> tagged (id, reason), counted."""

    def __init__(self, size: int, pixel_budget: int):
        self.size, self.pixel_budget = size, pixel_budget
        self.unreadable = Metrics.counter(METRICS_NAMESPACE, "unreadable")

    def process(self, element):
        number, image_id, path = element
        try:
            pixels = load_image(path, self.size, self.pixel_budget)
        except ImageDecodeError as error:
            self.unreadable.inc()
            yield beam.pvalue.TaggedOutput(UNREADABLE, (image_id, str(error)))
            return
        yield number, image_id, pixels


class EncodeBatch(beam.DoFn):
    """A batch of (shard, id, pixels) -> (shard, (id, vector, map or None)) in the store's dtypes."""

    def __init__(self, settings: EncodingSettings):
        self.settings = settings
        self.extracted = Metrics.counter(METRICS_NAMESPACE, "extracted")

    def setup(self):
        self.spec = get_encoder_spec(self.settings.encoder)
        self.model = build_encoder(self.settings.encoder, self.settings.weights, spatial=self.settings.spatial)

    def process(self, batch):
        outputs = encode_batch(self.model, self.spec, [pixels for _, _, pixels in batch], self.settings.batch_size)
        vectors = outputs[0].astype(self.settings.vector_dtype)
        maps = outputs[1].astype(MAP_DTYPE) if self.settings.spatial else None
        self.extracted.inc(len(batch))
        for n, (number, image_id, _) in enumerate(batch):
            yield number, (image_id, vectors[n], None if maps is None else maps[n])


class WriteShard(beam.DoFn):
    """(shard, records) -> the shard's file name, once its file and id list are written."""

    def __init__(self, folder: str):
        self.folder = folder
        self.shards = Metrics.counter(METRICS_NAMESPACE, "shards")

    def process(self, element):
        number, records = element
        records = sorted(records, key=lambda record: record[0])  # the same bytes however the group arrived
        info = write_shard(Path(self.folder), number, records)
        self.shards.inc()
        yield info.file


def write_unreadable(failures: list[tuple[str, str]], path: str) -> None:
    """Write the run's unreadable images as a JSON object {id: reason} (the driver reads it back)."""
    atomic_write_bytes(Path(path), json.dumps(dict(sorted(failures))).encode("utf-8"))


def plan_shards(image_ids: list[str], first_number: int, shard_size: int) -> dict[str, int]:
    """Return {id: shard number}: the sorted ids, `shard_size` a shard, numbered from `first_number`."""
    return {image_id: first_number + n // shard_size for n, image_id in enumerate(sorted(image_ids))}


def write_plan(todo: list[tuple[int, str, str]], path: Path) -> None:
    """Write the images to extract as JSON lines [shard, id, path], atomically."""
    atomic_write_bytes(path, "".join(json.dumps(list(item)) + "\n" for item in todo).encode("utf-8"))


def build_pipeline(pipeline: beam.Pipeline, out: Path, settings: EncodingSettings):
    """Add the extraction of the plan in `out`/PLAN_FILE ((shard, id, path) a line) into the store at `out`."""
    size = get_encoder_spec(settings.encoder).input_size
    decoded = (
        pipeline
        | "Plan" >> beam.io.ReadFromText(str(out / PLAN_FILE))
        | "Parse" >> beam.Map(lambda line: tuple(json.loads(line)))
        | "Spread" >> beam.Reshuffle()  # over the workers: one file is read by few
        | "Decode" >> beam.ParDo(DecodeImage(size, settings.max_pixels)).with_outputs(UNREADABLE, main="pixels")
    )
    (
        decoded.pixels
        | "Batch" >> beam.BatchElements(min_batch_size=settings.batch_size, max_batch_size=settings.batch_size)
        | "Encode" >> beam.ParDo(EncodeBatch(settings))
        | "ByShard" >> beam.GroupByKey()
        | "Write" >> beam.ParDo(WriteShard(str(out)))
    )
    (
        decoded[UNREADABLE]
        | "CollectUnreadable" >> beam.combiners.ToList()
        | "ReportUnreadable" >> beam.Map(write_unreadable, str(out / UNREADABLE_FILE))
    )


def extract_features_beam(
    sources: dict[str, Path],
    out: str | Path,
    encoder: str = "efficientnet_lite0",
    weights: str | Path | None = "imagenet",
    batch_size: int = 32,
    spatial: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    beam_options: list[str] | None = None,
) -> BeamReport:
    """Encode every image in `sources` ({image_id: path}) not yet in the sharded store at `out`, on Beam.

    `beam_options`: Beam's own flags (["--runner", "DirectRunner", "--direct_num_workers", "2", ...]);
    none: Beam's default, the DirectRunner. The store is the one `extract_features(..., store_format=
    "shards")` writes, with the same vectors; see the module's docstring for the paths workers need.
    """
    if "://" in str(out):
        raise FeatureStoreError(f"{out}: a URL; --beam writes to a folder on a disk every worker mounts at that path")
    out = Path(out)
    local_weights_file(weights)  # a missing file: one error here, not one on every worker
    writer = ShardWriter(out, store_metadata(encoder, weights, spatial), shard_size)
    report = BeamReport(out)
    plan = plan_shards(
        [image_id for image_id in sources if image_id not in writer.done], writer.next_number, shard_size
    )
    report.already_present = len(sources) - len(plan)
    if not plan:
        return report
    settings = EncodingSettings(
        encoder, None if weights in (None, "none") else str(weights), spatial, batch_size,
        writer.manifest["vector_dtype"], max_pixels(),
    )  # fmt: skip
    todo = [(number, image_id, str(Path(sources[image_id]).resolve())) for image_id, number in plan.items()]
    (out / UNREADABLE_FILE).unlink(missing_ok=True)
    write_plan(todo, out / PLAN_FILE)
    started = time.perf_counter()
    try:
        report.counters = run_pipeline(out, settings, beam_options or [])
        report.failed = json.loads((out / UNREADABLE_FILE).read_text(encoding="utf-8"))
    finally:
        written = [shard for number in sorted(set(plan.values())) if (shard := finished_shard(out, number))]
        writer.add_shards(written)  # on a failure too: the finished shards are kept for the next run
        (out / UNREADABLE_FILE).unlink(missing_ok=True)
        (out / PLAN_FILE).unlink(missing_ok=True)
    report.extracted = sum(info.images for info, _ in written)
    report.seconds = time.perf_counter() - started
    return report


def run_pipeline(out: Path, settings: EncodingSettings, flags: list[str]) -> dict:
    """Run the extraction pipeline to its end; return its counters {name: committed value}."""
    with _project_importable_by_workers():
        pipeline = beam.Pipeline(options=PipelineOptions(flags))
        build_pipeline(pipeline, out, settings)
        try:
            result = pipeline.run()
            result.wait_until_finish()
        except Exception as error:  # runners raise many kinds, the worker's own error in the message
            last_line = (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]
            raise BeamPipelineError(f"the Beam pipeline failed: {last_line}") from error
    counters: dict[str, int] = {}
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    except NotImplementedError:  # a runner that does not report metrics to the launching process
        return counters
    for counter in found:
        value = counter.committed if counter.committed is not None else counter.attempted
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + int(value or 0)
    return counters


@contextmanager
def _project_importable_by_workers():
    """Put the project on PYTHONPATH while the pipeline runs: local worker processes (the DirectRunner's
    multi_processing mode) inherit it and can import `features` whatever the current folder."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), saved) if p)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
