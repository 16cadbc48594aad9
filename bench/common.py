"""What the bench sections share: the machine, scenes, the local Ray, one region run, targets."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Target:
    """One target of the issue: a figure, how it must compare, and whether this run met it."""

    section: str
    name: str
    value: float | None
    op: str  # ">=" or "<="
    threshold: float
    unit: str = ""
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


@dataclass
class Section:
    """A section's result: figures (plain JSON), its targets, and rows for the printed table."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    rows: list[tuple[str, str]] = field(default_factory=list)  # (figure, value) for the table
    seconds: float = 0.0
    error: str | None = None
    skipped: str | None = None
    load_average: tuple[float, float] | None = None  # 1-minute load average before and after the section

    def to_json(self) -> dict[str, Any]:
        return {
            "figures": self.figures,
            "targets": [t.to_json() for t in self.targets],
            "seconds": round(self.seconds, 1),
            "load_average_before_after": self.load_average,
            "error": self.error,
            "skipped": self.skipped,
        }


def set_batch_size(runner: Any, bs: int) -> None:
    """Make a ModelRunner generate ``bs`` prompts per call (its spec, and the size it resolved at init)."""
    import dataclasses

    runner.spec = dataclasses.replace(runner.spec, batch_size=bs)
    if hasattr(runner, "batch_size"):
        runner.batch_size = bs


def default_batch_size(runner: Any) -> int:
    """The batch size a ModelRunner chose for itself (``--batch-size`` given, or auto from free memory)."""
    return int(getattr(runner, "batch_size", None) or runner.spec.batch_size)


class PeriodicSampler:
    """Calls :meth:`sample` in a thread every ``interval`` seconds while its ``with`` block runs (and once
    more as it ends when ``sample_at_exit``). Subclasses keep what they read."""

    sample_at_exit = True

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                if self.sample_at_exit:
                    self.sample()
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_GPU_NAMES = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps([torch.cuda.get_device_name(i) for i in range(n)]))\n"
)


def _gpus() -> list[str]:
    """The CUDA devices' names, asked of torch in a child process: imported here, torch added about 180 MiB
    to the bench's own process, which is the pipeline's driver, and so to both driver peaks of the memory
    section (a ``--model noop`` run's driver imports no torch), pulling their ratio towards 1."""
    try:
        done = subprocess.run([sys.executable, "-c", _GPU_NAMES], capture_output=True, text=True, timeout=120,
                              check=True)
        names = json.loads(done.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - a broken CUDA install is "no GPU" for the bench
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, GPUs, OS, host name."""
    gpus = _gpus()
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus or "none",
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def git_state() -> dict[str, Any]:
    """The commit measured, and the files of the checkout that differ from it (others edit meanwhile)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import hashlib

    status = [line[3:] for line in git("status", "--porcelain").splitlines()
              if line[3:].startswith(("rsflow/", "bench/"))]
    diff = git("diff", "HEAD", "--", "rsflow", "bench")
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "rsflow_files_changed": status,  # rsflow/ and bench/ files that differ from the commit
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


# ---------------------------------------------------------------------------------------------- scenes


def cache_dir(override: str | None = None) -> Path:
    """Where synthetic scenes are kept between runs: ``--cache``, else ``$RSFLOW_CACHE/bench``, else
    ``~/.cache/rsflow/bench``."""
    if override:
        return Path(override).expanduser()
    root = os.environ.get("RSFLOW_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "rsflow") / "bench"


def scene(size_px: int, cache: Path) -> tuple[Path, tuple[float, float, float, float]]:
    """A synthetic ``size_px``-square scene (written once, reused): its items.json and lon/lat bbox.

    The scene is written (or found) in a child process: writing a 20,000 px scene left the bench's own
    process, which is the pipeline's driver, about 900 MiB larger, and the memory section's first run on a
    machine reported that as the driver's peak (1,484 MiB against 560 on the next run)."""
    from concurrent.futures import ProcessPoolExecutor

    from rsflow.synthetic import scene_bbox, write_synthetic_scene

    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        items = pool.submit(write_synthetic_scene, cache / "scenes", size_px).result()
    dt = time.perf_counter() - t
    if dt > 5:
        print(f"  (wrote the {size_px:,} px synthetic scene in {dt:.0f} s; cached in {items.parent})", flush=True)
    return items, scene_bbox(items)


def band_paths(items_json: Path) -> list[str]:
    """The RGB band files of a synthetic scene, in red, green, blue order."""
    from rsflow.synthetic import ASSETS

    item = json.loads(Path(items_json).read_text())["features"][0]
    return [item["assets"][key]["href"] for key in ASSETS]


# ---------------------------------------------------------------------------------------------- Ray


_PASS = re.compile(r"execution finished in ([0-9.]+) seconds")


class _PassTimes(logging.Handler):
    """Collects Ray Data's 'Dataset ... execution finished in X seconds' lines: the seconds of each
    Ray Data pass of a run. The first is the streaming pass (plan -> read -> infer -> interpret -> parts);
    the final sort and GeoParquet write come after it (in the driver for small outputs, else another pass)."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = _PASS.search(record.getMessage())
        if m:
            self.seconds.append(float(m.group(1)))


_PASSES = _PassTimes()


def quiet_ray_data() -> None:
    """Ray Data's INFO lines off the console (the table is the output), its pass times kept."""
    import ray.data  # noqa: F401 - configures the ray.data logger

    log = logging.getLogger("ray.data")
    for h in log.handlers:
        if type(h).__name__ == "PlainRayHandler":
            h.setLevel(logging.WARNING)
    if _PASSES not in log.handlers:
        log.addHandler(_PASSES)


def start_ray(num_cpus: int | None = None) -> dict[str, Any]:
    """A local Ray (``num_cpus`` logical CPUs, default: the machine's), restarted if it has another size;
    with the settings rsflow gives a local Ray it starts itself."""
    import ray

    from rsflow.pipeline import LOCAL_RAY_SYSTEM_CONFIG

    if ray.is_initialized():
        if num_cpus is None or int(ray.cluster_resources().get("CPU", 0)) == num_cpus:
            return ray.cluster_resources()
        ray.shutdown()
    t = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)  # as rsflow starts a local Ray
    quiet_ray_data()
    res = dict(ray.cluster_resources())
    print(f"  Ray started in {time.perf_counter() - t:.1f} s: {int(res.get('CPU', 0))} logical CPUs", flush=True)
    return res


def settle(max_seconds: float = 15.0, window: float = 0.5, busy: float = 0.1) -> dict[str, float]:
    """Wait until this process and everything under it (the local Ray included) use less than ``busy`` of a
    core over a ``window``, for at most ``max_seconds``: after a run Ray's workers, actors and raylet stay
    busy for a while, and a measurement started then shares the cores with them. Returns the seconds
    waited and the last window's CPU use (in cores)."""
    me = psutil.Process()

    def cpu() -> float:
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return total

    start = time.perf_counter()
    used = float("inf")
    while time.perf_counter() - start < max_seconds:
        before = cpu()
        time.sleep(window)
        used = max(0.0, cpu() - before) / window
        if used < busy:
            break
    return {"waited_s": round(time.perf_counter() - start, 2), "cores_busy": round(used, 3)}


def run_region(items_json: Path, bbox: tuple[float, ...], out_dir: Path, *flags: str) -> dict[str, Any]:
    """One ``rsflow region`` run in this process (on the bench's Ray); returns its manifest plus
    ``_bench``: wall seconds of ``main`` and the Ray Data pass seconds.

    Raises:
        RuntimeError: the run did not exit 0 (with the tail of what it printed).
    """
    from rsflow.cli import main
    from rsflow.output import MANIFEST_NAME

    if out_dir.exists():
        shutil.rmtree(out_dir)
    argv = ["--log-level", "ERROR", "region", "--stac", str(items_json), f"--bbox={','.join(map(str, bbox))}",
            "--no-preview", "--output", str(out_dir), *flags]
    buf = io.StringIO()
    start = len(_PASSES.seconds)
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    wall = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"rsflow {' '.join(argv)} exited {rc}: {buf.getvalue()[-500:]}")
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    manifest["_bench"] = {"wall_seconds": round(wall, 3), "pass_seconds": _PASSES.seconds[start:]}
    return manifest


def run_figures(m: dict[str, Any]) -> dict[str, Any]:
    """The figures of one region run worth keeping in the results."""
    c, t = m["counts"], m["timings"]
    passes = m["_bench"]["pass_seconds"]
    read = c["tiles_read"]
    return {
        "tiles_planned": c["tiles_planned"],
        "tiles_read": read,
        "tiles_ok": c["tiles_ok"],
        "tiles_skipped": c["tiles_skipped"],
        "tiles_failed": c["tiles_failed"],
        "pipeline_seconds": t["pipeline_seconds"],
        "read_seconds_sum": t["read_seconds_sum"],
        "infer_seconds_sum": t["infer_seconds_sum"],
        "manifest_tiles_per_second": m["throughput"]["tiles_per_second"],
        "tiles_read_per_second": round(read / t["pipeline_seconds"], 3) if t["pipeline_seconds"] else None,
        "stream_pass_seconds": passes[0] if passes else None,
        "after_stream_seconds": round(t["pipeline_seconds"] - passes[0], 3) if passes else None,
        "placement": m.get("placement"),
        "wall_seconds": m["_bench"]["wall_seconds"],
    }


def past_start_up(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """Two runs' figures (:func:`run_figures`) over a smaller and a larger area -> a per-tile rate (extra
    tiles / extra seconds: what a long run approaches) and the fixed seconds of a run (the smaller run's
    seconds less its tiles at that rate: the model actors' start, the first tasks, the final sort and
    write), or an ``error`` when the runs' noise hides the split.

    >>> past_start_up({"tiles_read": 256, "pipeline_seconds": 4.0}, {"tiles_read": 1024, "pipeline_seconds": 7.0})
    {'tiles_per_second': 256.0, 'fixed_seconds': 3.0}
    """
    extra_tiles = large["tiles_read"] - small["tiles_read"]
    extra_seconds = large["pipeline_seconds"] - small["pipeline_seconds"]
    if extra_tiles <= 0 or extra_seconds <= 0:
        return {"error": "the larger run was not longer"}
    rate = extra_tiles / extra_seconds
    fixed = small["pipeline_seconds"] - small["tiles_read"] / rate
    if fixed < 0:
        return {"error": f"fixed cost came out negative ({fixed:.3f} s)"}
    return {"tiles_per_second": round(rate, 1), "fixed_seconds": round(fixed, 3)}
