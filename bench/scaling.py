"""Scaling: 1 vs 2 read workers (no-op model), 1 vs 2 model actors (smoke model, small AOI).

Every read task and every CPU model actor asks Ray for one CPU. Two model actors plus one read task need
3 logical CPUs: on a Ray with 2 (a 2-core machine's default) ``--model-actors 2`` leaves no CPU for the
read tasks and the run waits forever. This section therefore runs on a Ray of ``max(cores, 3)`` logical
CPUs (restarted when the bench's Ray has fewer, then warmed up again); the model-actor runs fix
``--read-workers 1`` so that only the actor count changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.common import Section, past_start_up, run_figures, run_region, scene, start_ray

NEEDED_CPUS = 3


def _expected(cores: int) -> str:
    if cores >= 4:
        return ("reads are CPU-bound: 2 read workers should approach 2x; 2 model actors up to 2x when the "
                "model stage is the bottleneck")
    return (f"{cores} cores: a second read worker shares the cores with the driver, Ray Data's scheduling and "
            "the final sort/write pass, so expect well under 2x; the smoke model is so small that the model "
            "stage is rarely the bottleneck and each actor runs torch on 1 thread: 2 model actors should give "
            "about 1x (they also take CPU from the one read worker)")


def run(cache: Path, work: Path, quick: bool, warm_up: Any) -> Section:
    sec = Section("scaling")
    cores = os.cpu_count() or 1
    cpus = max(cores, NEEDED_CPUS)
    res = start_ray(cpus)
    if cpus != cores:
        warm_up()
    sec.figures["ray_logical_cpus"] = int(res.get("CPU", 0))
    sec.figures["expected"] = _expected(cores)

    items, bbox = scene(8_000, cache)
    reads = {}
    for k in (1, 2):
        m = run_region(items, bbox, work / f"scale-read-{k}", "--model", "noop", "--read-workers", str(k))
        reads[k] = run_figures(m)
    r_ratio = reads[2]["tiles_read_per_second"] / reads[1]["tiles_read_per_second"]

    items, b = scene(2_000, cache)
    quarter = (b[0], b[1], (b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    aoi = b if not quick else quarter  # quick: a quarter
    actors, starts = {}, {}
    for k in (1, 2):
        m = run_region(items, aoi, work / f"scale-actors-{k}", "--model", "smoke", "--tasks", "caption",
                       "--max-new-tokens", "16", "--model-actors", str(k), "--read-workers", "1")
        actors[k] = run_figures(m)
        if not quick:  # a quarter of the scene as well: what the actor count does past each run's start-up
            m = run_region(items, quarter, work / f"scale-actors-{k}-quarter", "--model", "smoke", "--tasks",
                           "caption", "--max-new-tokens", "16", "--model-actors", str(k), "--read-workers", "1")
            starts[k] = past_start_up(run_figures(m), actors[k])
    a_ratio = actors[2]["tiles_read_per_second"] / actors[1]["tiles_read_per_second"]
    sec.figures.update(read_workers=reads, read_workers_ratio=round(r_ratio, 3), model_actors=actors,
                       model_actors_ratio=round(a_ratio, 3),
                       model_actors_aoi="a quarter of the 2,000 px scene" if quick else "the whole 2,000 px scene")
    if starts:
        sec.figures["model_actors_past_start_up"] = starts
        if all("tiles_per_second" in starts[k] for k in (1, 2)):
            sec.figures["model_actors_past_start_up_ratio"] = round(
                starts[2]["tiles_per_second"] / starts[1]["tiles_per_second"], 3)
    n_read, n_act = reads[1]["tiles_read"], actors[1]["tiles_read"]
    sec.rows += [
        (f"no-op tiles/s, 1 / 2 read workers (8,000 px scene, {n_read} tiles)",
         f"{reads[1]['tiles_read_per_second']:.1f} / {reads[2]['tiles_read_per_second']:.1f}"),
        ("  ratio 2 / 1 read workers", f"{r_ratio:.2f}x"),
        (f"smoke tiles/s, 1 / 2 model actors (64 px, {n_act} tiles, caption)",
         f"{actors[1]['tiles_read_per_second']:.1f} / {actors[2]['tiles_read_per_second']:.1f}"),
        ("  ratio 2 / 1 model actors", f"{a_ratio:.2f}x"),
    ]
    if "model_actors_past_start_up_ratio" in sec.figures:
        rate = {k: starts[k]["tiles_per_second"] for k in (1, 2)}
        fixed = {k: starts[k]["fixed_seconds"] for k in (1, 2)}
        sec.rows += [
            ("  past start-up (whole scene less a quarter): tiles/s, 1 / 2 actors", f"{rate[1]:.1f} / {rate[2]:.1f}"),
            ("  ratio 2 / 1 model actors past start-up", f"{sec.figures['model_actors_past_start_up_ratio']:.2f}x"),
            ("  fixed seconds per run (start-up, last writes), 1 / 2 actors", f"{fixed[1]:.2f} / {fixed[2]:.2f}"),
        ]
    elif starts:
        sec.rows.append(("  past start-up", "; ".join(f"{k} actors: {starts[k].get('error', 'ok')}" for k in starts)))
    sec.rows += [
        ("Ray logical CPUs for this section", f"{sec.figures['ray_logical_cpus']} (on {cores} cores)"),
    ]
    return sec
