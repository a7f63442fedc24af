"""What the speed benchmarks share: the machine line, the command, what else was running, the results file.

Each `bench/bench_*.py` times the project's fast path and a naive reference side by side in one run,
prints a markdown table and writes it with the command, machine and date to `bench/results_<name>.md`.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from features.store import atomic_write_bytes  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "flickr8k"  # the benchmarks' Flickr8k copy
DEFAULT_STORE = ROOT / "features" / "store" / "flickr8k_efficientnet_lite0.pkl"  # extract_features.py's default store


def machine() -> str:
    """Return e.g. '2-core x86_64 CPU, no GPU' (the GPU part as TensorFlow sees it)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    accelerator = f"{len(gpus)} GPU(s) visible to TensorFlow" if gpus else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {accelerator}"


def command() -> str:
    """Return the command line that started this benchmark, with its `nice` level if any."""
    niceness = os.nice(0)
    prefix = f"nice -n {niceness} " if niceness else ""
    script = os.path.relpath(sys.argv[0], ROOT)
    return prefix + shlex.join(["python", script, *sys.argv[1:]])


def other_training_jobs() -> list[str]:
    """Return the command lines of other processes running a training script (they share the CPU)."""
    jobs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended while we looked
            continue
        if any(Path(w).name in ("train.py", "classify.py") for w in words):
            line = " ".join(w for w in words if w)
            jobs.append(line if len(line) <= 160 else line[:160].rstrip() + " ...")
    return jobs


JOBS_AT_START = other_training_jobs()  # seen when the benchmark started, joined with those at the end


def conditions(side_by_side: bool = True) -> str:
    """Return one markdown line on what else loaded the CPU while this benchmark ran.

    `side_by_side`: the benchmark timed the paths it compares interleaved, so a load affects them alike.
    """
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else ["?"]
    jobs = list(dict.fromkeys(JOBS_AT_START + other_training_jobs()))
    if not jobs:
        return (
            f"- Load: no other training job seen at the start or the end; load average {' '.join(load)} at the "
            f"end on {os.cpu_count()} cores"
        )
    listed = "; ".join(f"`{j}`" for j in jobs)
    what = "a training job" if len(jobs) == 1 else f"{len(jobs)} training jobs"
    return (
        f"- Load: the machine was also running {what} ({listed}) while this benchmark ran at nice "
        f"{os.nice(0)}, the other job{'s' if len(jobs) > 1 else ''} as set by {'their' if len(jobs) > 1 else 'its'} "
        f"own command (load average {' '.join(load)} at the end, on {os.cpu_count()} cores). Absolute figures "
        "are therefore lower than on an idle machine; "
        + (
            "the ratios stay fair because both paths were timed side by side (interleaved) in the same run, "
            "under the same load."
            if side_by_side
            else "the figures were measured one after the other, so the load may have differed between them."
        )
    )


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """Return a markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """A benchmark's results page: a title, what was measured, tables, targets and notes."""

    title: str
    summary: str
    sections: list[str] = field(default_factory=list)
    targets: list[tuple[str, float, float]] = field(default_factory=list)  # (what, measured, target)
    notes: list[str] = field(default_factory=list)
    side_by_side: bool = True  # the compared paths were timed interleaved (see `conditions`)

    def target(self, what: str, measured: float, target: float) -> None:
        self.targets.append((what, measured, target))

    def markdown(self) -> str:
        parts = [
            f"# {self.title}",
            "",
            f"- Command: `{command()}` (from the repository root)",
            f"- Machine: {machine()}",
            f"- Date: {datetime.date.today().isoformat()}",
            conditions(self.side_by_side),
            "",
            self.summary,
        ]
        for section in self.sections:
            parts += ["", section]
        if self.targets:
            rows = [[what, f"{measured:.1f}x", f">= {target:g}x", "met" if measured >= target else "**not met**"]
                    for what, measured, target in self.targets]  # fmt: skip
            parts += ["", markdown_table(["target", "measured", "wanted", ""], rows)]
        if self.notes:
            parts += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(parts) + "\n"

    def write(self, path: Path) -> None:
        """Print the page and write it atomically to `path`."""
        text = self.markdown()
        print(text)
        atomic_write_bytes(path, text.encode())
        print(f"wrote {os.path.relpath(path, ROOT)}")
