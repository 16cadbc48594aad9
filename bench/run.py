"""Run the selected sections, print the table, write the results JSON."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import REPO, Section, cache_dir, git_state, machine, start_ray

QUICK_LIMIT_S = 300
SECTIONS = ("read", "batching", "memory", "scaling", "gpu")
RAY_SECTIONS = ("read", "memory", "scaling")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def table(sections: list[Section]) -> str:
    """Figures, then targets, as Markdown tables."""
    lines = ["| section | figure | value |", "| --- | --- | --- |"]
    for s in sections:
        if s.skipped:
            lines.append(f"| {s.name} | {s.skipped} | |")
        elif s.error:
            lines.append(f"| {s.name} | ERROR: {s.error.splitlines()[-1][:120]} | |")
        for fig, value in s.rows:
            lines.append(f"| {s.name} | {fig} | {value} |")
    lines += ["", "| target | measured | wanted | met |", "| --- | --- | --- | --- |"]
    for s in sections:
        for t in s.targets:
            met = {True: "yes", False: "**no**", None: "n/a"}[t.met]
            note = f" ({t.note})" if t.note else ""
            lines.append(f"| {t.name}{note} | {_fmt(t.value)}{t.unit} | {t.op} {t.threshold:g}{t.unit} | {met} |")
    return "\n".join(lines)


def _section(name: str, fn: Any, *a: Any, **kw: Any) -> Section:
    load_before = os.getloadavg()[0]
    print(f"== {name} (load average {load_before:.1f})", flush=True)
    t = time.perf_counter()
    try:
        sec: Section = fn(*a, **kw)
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others' figures
        sec = Section(name, error=f"{traceback.format_exc()}\n{type(exc).__name__}: {exc}")
        print(sec.error, file=sys.stderr, flush=True)
    sec.seconds = time.perf_counter() - t
    sec.load_average = (round(load_before, 2), round(os.getloadavg()[0], 2))
    if sec.skipped:
        print(sec.skipped, flush=True)
    for fig, value in sec.rows:
        print(f"   {fig}: {value}", flush=True)
    for tg in sec.targets:
        print(f"   target {tg.name}: {_fmt(tg.value)}{tg.unit} {tg.op} {tg.threshold:g} -> "
              f"{'met' if tg.met else 'MISSED' if tg.met is False else 'n/a'}", flush=True)
    print(f"   ({sec.seconds:.0f} s)", flush=True)
    return sec


def run_all(only: tuple[str, ...], *, quick: bool, out: str, cache: str | None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray started by the bench only
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\..*")
    t0 = time.perf_counter()
    started = datetime.now()
    from bench import batching, gpu, memory, readpath, scaling
    from rsflow.versions import package_versions

    host = machine()
    print(f"rsflow bench{' --quick' if quick else ''}: {host['cpu']}, {host['cores_logical']} cores, "
          f"{host['ram_gib']} GiB RAM, GPU: {', '.join(host['gpus']) if host['gpus'] != 'none' else 'none'}",
          flush=True)
    scenes = cache_dir(cache)
    work = Path(tempfile.mkdtemp(prefix="rsflow-bench-"))
    ray_info: dict[str, Any] = {}
    sections: list[Section] = []
    try:
        warm = None
        if any(s in only for s in RAY_SECTIONS):
            ray_info["bench_ray_cpus"] = int(start_ray().get("CPU", 0))
            ray_info["warm_up_seconds"] = round(readpath.warm_up(scenes, work), 1)
            print(f"  warm-up run (no-op, 2,000 px scene): {ray_info['warm_up_seconds']} s", flush=True)

            def warm() -> None:
                readpath.warm_up(scenes, work)

        # memory first: Ray reuses worker processes and their RSS never shrinks, so a larger run before
        # it would set the small scene's peaks
        if "memory" in only:
            sections.append(_section("memory", memory.run, scenes, work, quick))
        if "read" in only:
            sections.append(_section("read", readpath.run, scenes, work, quick))
        if "batching" in only:
            sections.append(_section("batching", batching.run, quick))
        if "scaling" in only:
            sections.append(_section("scaling", scaling.run, scenes, work, quick, warm))
        if "gpu" in only:
            sections.append(_section("gpu", gpu.run, work, quick))
    finally:
        try:
            if ray_info:  # a Ray section started the bench's local Ray
                import ray

                ray.shutdown()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    targets = [t.to_json() for s in sections for t in s.targets]
    result = {
        "date": started.strftime("%Y-%m-%d"),
        "started": started.isoformat(timespec="seconds"),
        "command": "python -m bench" + (" --quick" if quick else "")
        + ("" if set(only) == set(SECTIONS) else f" --only {','.join(only)}"),
        "quick": quick,
        "total_seconds": round(total, 1),
        # --quick must finish in 5 minutes on 2 cores (scenes written by a first run included)
        **({"quick_limit_seconds": QUICK_LIMIT_S, "within_quick_limit": total <= QUICK_LIMIT_S} if quick else {}),
        "machine": host,
        "ray": ray_info,
        "git": git_state(),
        "versions": package_versions(),
        "sections": {s.name: s.to_json() for s in sections},
        "targets": targets,
        "table": table(sections),
    }
    out_dir = Path(out) if Path(out).is_absolute() else Path.cwd() / out
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{started:%Y-%m-%d}-{host['hostname']}{'-quick' if quick else ''}"
    path = out_dir / f"{stem}.json"
    n = 1
    while path.exists():  # a second run the same day on the same host keeps the first (it may be committed)
        n += 1
        path = out_dir / f"{stem}-{n}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print()
    print(result["table"])
    print()
    try:
        shown = path.relative_to(REPO)
    except ValueError:
        shown = path
    print(f"results: {shown}")
    met = sum(1 for t in targets if t["met"])
    print(f"targets met: {met} of {len(targets)}")
    print(f"total: {total:.0f} s ({total / 60:.1f} min)"
          + (f" -- over the {QUICK_LIMIT_S} s a --quick run should take" if quick and total > QUICK_LIMIT_S else ""))
    return 1 if any(s.error for s in sections) else 0
