"""``rsflow eval`` end to end on a real local Ray: a 20-sample fixture of every benchmark through the
region job's model actors, resumed runs that infer nothing twice, the demo model's recorded figures,
and bad input refused before any inference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import rsflow.pipeline
from rsflow.cli import main
from rsflow.evaluate.benchmarks import get_benchmark
from rsflow.evaluate.published import PUBLISHED
from rsflow.finetune.demo import demo_model_dir, scores_from_card
from rsflow.finetune.demo_data import build_demo_dataset
from tests import eval_fixtures as fx

pytestmark = pytest.mark.ray

_REPO = Path(__file__).resolve().parents[1]
JAVA = shutil.which("java") is not None
_FAST = ["--max-new-tokens", "4"]
# Only one caption run pays for Java (PTB tokenizer + METEOR, when Java is here); the others score BLEU,
# ROUGE and CIDEr on the pure-Python tokens.
_NO_JAVA_CAPTIONS = ["--metrics", "bleu,rouge-l,cider", "--tokenizer", "simple"]

_WRITERS: dict[str, tuple[Callable[[Path], Any], list[str]]] = {
    "rsvqa-lr": (lambda d: fx.write_rsvqa(d), []),
    "rsvqa-hr": (lambda d: fx.write_rsvqa(d, hr=True), []),
    "ucm-captions": (lambda d: fx.write_karpathy(d, flavour="ucm"), [] if JAVA else _NO_JAVA_CAPTIONS),
    "sydney-captions": (lambda d: fx.write_karpathy(d, flavour="sydney"), _NO_JAVA_CAPTIONS),
    "rsicd": (lambda d: fx.write_karpathy(d, flavour="rsicd"), _NO_JAVA_CAPTIONS),
    "ucmerced": (lambda d: fx.write_ucmerced(d), []),
    "aid": (lambda d: fx.write_aid(d), []),
    "geochat-ucmerced": (lambda d: fx.write_geochat_scenes(d, dataset="ucmerced", per_class=10), []),
    "geochat-aid": (lambda d: fx.write_geochat_scenes(d, dataset="aid", per_class=10), []),
    "geochat-lrben": (lambda d: fx.write_geochat_vqa(d, n=21), ["--prompt-format", "geochat"]),
    "geochat-referring": (lambda d: fx.write_referring(d), ["--prompt-format", "geochat"]),
    "geochat-region-captioning": (
        lambda d: fx.write_region_captioning(d),
        ["--prompt-format", "geochat", "--metrics", "rouge-1,rouge-l", "--tokenizer", "simple"],
    ),
}


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, (write, _) in _WRITERS.items():
        folder = tmp_path_factory.mktemp(name)
        write(folder)
        out[name] = folder
    return out


@pytest.fixture
def no_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call of the pipeline's inference fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Iterator[Any]:
        raise AssertionError("inference was started")

    monkeypatch.setattr(rsflow.pipeline, "infer_images", refuse)


def _eval(name: str, data: Path, out: Path, *extra: str, model: str = "smoke") -> int:
    return main(["--log-level", "WARNING", "eval", "--benchmark", name, "--data", str(data), "--model", model,
                 "--output", str(out), *extra])


def _predictions(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "predictions.parquet").to_pylist()


@pytest.mark.parametrize("name", list(_WRITERS))
def test_benchmark_end_to_end_then_resumed_without_inference(
    name: str, ray_local: Any, bench_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    extra = [*_FAST, *_WRITERS[name][1]]
    out = tmp_path / "out"
    assert _eval(name, bench_data[name], out, *extra) == 0
    printed = capsys.readouterr().out
    assert "(inferred 20, reused 0, failed 0)" in printed, printed

    rows = _predictions(out)
    assert len(rows) == 20 and all(r["scored"] and r["status"] == "ok" for r in rows)
    assert all(r["text"] is not None and r["prompt"] and r["reference"] for r in rows)
    assert len({r["sample_id"] for r in rows}) == 20
    bench = get_benchmark(name)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["benchmark"] == name and metrics["counts"]["samples"] == 20
    m = metrics["metrics"]
    if bench.kind == "vqa":
        assert m["n"] == 20 and set(m["per_type"]) == {r["group"] for r in rows}
        assert m["correct"] == sum(bool(r["correct"]) for r in rows)
    elif bench.kind == "classify":
        assert m["n"] == 20 and sum(map(sum, m["confusion_matrix"]["counts"])) == 20
        csv_lines = (out / "confusion_matrix.csv").read_text().splitlines()
        assert csv_lines[0].startswith("true \\ predicted,") and len(csv_lines) == len(bench.classes) + 1
        assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    elif bench.kind == "boxes":
        assert m["objects"] == 27 and set(m["by_size"]) == {"small", "medium", "large"}
        assert set(m["by_type"]) == {"ref", "grounding"}
    else:
        wanted = ("ROUGE_1", "ROUGE_L") if name == "geochat-region-captioning" else ("Bleu_4", "ROUGE_L", "CIDEr")
        assert all(k in m for k in wanted)
        if name == "ucm-captions" and JAVA:
            assert m["tokenizer"] == "ptb" and "METEOR" in m
    table = (out / "results.md").read_text()
    assert "(this run)" in table
    for row in PUBLISHED[name][0]:
        assert row.label in table
        for value in row.values.values():
            if value is not None:
                assert f"{value:.2f}" in table
    assert not (out / "_parts").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]

    # The same command again: every prediction is reused and the pipeline is never started.
    monkeypatch.setattr(rsflow.pipeline, "infer_images", _refuse)
    assert _eval(name, bench_data[name], out, *extra) == 0
    assert "(inferred 0, reused 20, failed 0)" in capsys.readouterr().out
    again = _predictions(out)
    assert [(r["sample_id"], r["text"], r["run_id"]) for r in again] == [
        (r["sample_id"], r["text"], r["run_id"]) for r in rows
    ]
    assert json.loads((out / "metrics.json").read_text())["metrics"] == m


def _refuse(*args: Any, **kwargs: Any) -> Iterator[Any]:
    raise AssertionError("inference was started for samples that were already predicted")


def test_resume_infers_only_what_is_missing(
    ray_local: Any, bench_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, out = bench_data["rsvqa-lr"], tmp_path / "out"
    assert _eval("rsvqa-lr", data, out, *_FAST, "--limit", "8", "--seed", "3") == 0
    first = {r["sample_id"]: r for r in _predictions(out)}
    assert len(first) == 8
    # As if that run had been killed after its first part: only a part file and a half-written temp file
    (out / "_parts").mkdir()
    (out / "predictions.parquet").rename(out / "_parts" / "part-killed-00000.parquet")
    (out / ".predictions.parquet.x1y2.tmp").write_bytes(b"PAR1 half written")

    real = rsflow.pipeline.infer_images
    sent: list[str] = []

    def spy(rows: Any, **kwargs: Any) -> Iterator[Any]:
        sent.extend(p["key"] for row in rows for p in row["row_prompts"])
        yield from real(rows, **kwargs)

    monkeypatch.setattr(rsflow.pipeline, "infer_images", spy)
    assert _eval("rsvqa-lr", data, out, *_FAST, "--seed", "3") == 0
    assert "(inferred 12, reused 8, failed 0)" in capsys.readouterr().out
    assert len(sent) == 12 and not set(sent) & set(first)  # the model saw only the 12 new samples
    rows = {r["sample_id"]: r for r in _predictions(out)}
    assert len(rows) == 20
    assert not [p.name for p in out.iterdir() if p.name.startswith((".", "_"))]
    for sid, r in first.items():  # reused as written: same text, the first run's id
        assert (rows[sid]["text"], rows[sid]["run_id"]) == (r["text"], r["run_id"])
    assert len({rows[s]["run_id"] for s in sent}) == 1 and rows[sent[0]]["run_id"] != next(iter(first.values()))["run_id"]

    # A smaller --limit reuses a subset; the other predictions stay in the file, not scored.
    monkeypatch.setattr(rsflow.pipeline, "infer_images", _refuse)
    assert _eval("rsvqa-lr", data, out, *_FAST, "--limit", "8", "--seed", "3") == 0
    kept = _predictions(out)
    assert len(kept) == 20 and {r["sample_id"] for r in kept if r["scored"]} == set(first)

    # Another model into the same folder is refused, before any inference.
    assert _eval("rsvqa-lr", data, out, *_FAST, model="demo") == 2
    assert "--output:" in capsys.readouterr().err


def _answer_yes(rows: Any, *, spec: Any, **kwargs: Any) -> Iterator[dict[str, list[Any]]]:
    """The model stage's batch, without Ray or a model: every prompt answered "yes" (a fast stand-in for
    runs whose subject is the output folder, not inference)."""
    from rsflow.models.spec import model_id

    keys = [p["key"] for row in rows for p in row["row_prompts"]]
    n = len(keys)
    yield {"prompt_key": keys, "text": ["yes"] * n, "status": ["ok"] * n, "error": [None] * n,
           "model_id": [model_id(spec)] * n, "image_width": [32] * n, "image_height": [32] * n,
           "infer_seconds": [0.0] * n}


def test_resume_with_other_image_files_refuses_or_infers_them_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, out = tmp_path / "lr", tmp_path / "out"
    fx.write_rsvqa(data, n=5)
    wrong, fixed = tmp_path / "wrong", tmp_path / "fixed"
    shutil.copytree(data / "Images_LR", wrong)
    shutil.copytree(data / "Images_LR", fixed)
    monkeypatch.setattr(rsflow.pipeline, "infer_images", _answer_yes)
    assert _eval("rsvqa-lr", data, out, "--images", str(wrong)) == 0
    assert "(inferred 5, reused 0, failed 0)" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["identity"]["images"] == str(wrong.resolve())

    # --images is part of the data: another image folder into the same output is refused (README), as is
    # leaving it out, before any inference
    monkeypatch.setattr(rsflow.pipeline, "infer_images", _refuse)
    for extra in (["--images", str(fixed)], []):
        err = _one_line_error(capsys, _eval("rsvqa-lr", data, out, *extra), "--output")
        assert "holds a run with another images" in err and str(wrong.resolve()) in err

    # a run.json written before --images was in the identity: each row's image file decides, and the
    # predictions made on other files are inferred again, not reused
    record = json.loads((out / "run.json").read_text())
    del record["identity"]["images"]
    (out / "run.json").write_text(json.dumps(record))
    monkeypatch.setattr(rsflow.pipeline, "infer_images", _answer_yes)
    assert _eval("rsvqa-lr", data, out) == 0
    assert "(inferred 5, reused 0, failed 0)" in capsys.readouterr().out
    assert {Path(r["image"]).parent for r in _predictions(out)} == {(data / "Images_LR").resolve()}

    # the same pictures written again (a copy without -p: new modification times): nothing is inferred again
    for image in {Path(r["image"]) for r in _predictions(out)}:
        image.write_bytes(image.read_bytes())
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert _eval("rsvqa-lr", data, out) == 0
    assert "(inferred 0, reused 5, failed 0)" in capsys.readouterr().out
    # an image file replaced at the same path: its predictions are made again, the others reused
    replaced = Path(_predictions(out)[0]["image"])
    replaced.write_bytes(replaced.read_bytes() + b"\0")  # a changed file (PNG readers ignore the tail)
    assert _eval("rsvqa-lr", data, out) == 0
    inferred = int(capsys.readouterr().out.split("(inferred ", 1)[1].split(",", 1)[0])
    assert inferred == sum(r["image"] == str(replaced) for r in _predictions(out)) >= 1


@pytest.mark.parametrize(("name", "split", "shown"), [("rsvqa-hr", "test_phili", True), ("rsvqa-hr", "test", False),
                                                      ("rsvqa-lr", "val", False)])
def test_results_show_the_published_numbers_only_for_their_split(
    name: str, split: str, shown: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # HR `test` is test set 1; GeoChat's HRBEN numbers are test set 2 (test_phili). LR val is not LR test.
    data, out = tmp_path / "data", tmp_path / "out"
    fx.write_rsvqa(data, hr=name == "rsvqa-hr", n=5)
    written = "test_phili" if name == "rsvqa-hr" else "test"
    prefix = "USGS" if name == "rsvqa-hr" else "LR"
    for kind in ("questions", "answers", "images") if split != written else ():  # the fixture's split, renamed
        shutil.copy(data / f"{prefix}_split_{written}_{kind}.json", data / f"{prefix}_split_{split}_{kind}.json")
    monkeypatch.setattr(rsflow.pipeline, "infer_images", _answer_yes)
    assert _eval(name, data, out, "--split", split) == 0
    table = (out / "results.md").read_text()
    assert ("GeoChat (paper)" in table and "58.45" in table if name == "rsvqa-hr" else "91.09" in table) is shown
    assert ("they are left out" in table) is not shown
    assert ("the published numbers are of the" in caplog.text) is not shown


def test_an_unreadable_image_is_a_failed_sample_that_the_next_run_retries(
    ray_local: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, out = tmp_path / "aid", tmp_path / "out"
    fx.write_aid(data, n_classes=2, per_class=2)
    broken = data / "AID" / "BareLand" / "bareland_2.jpg"
    good = broken.read_bytes()
    broken.write_bytes(b"not a jpeg")
    assert _eval("aid", data, out, *_FAST) == 4  # finished, with a failed sample: EXIT_PARTIAL
    captured = capsys.readouterr()
    assert "(inferred 4, reused 0, failed 1)" in captured.out
    assert "1 samples got no answer" in captured.err
    [row] = [r for r in _predictions(out) if r["status"] != "ok"]
    assert row["sample_id"] == "BareLand/bareland_2.jpg" and "cannot identify image file" in row["error"]
    assert row["correct"] is False
    assert json.loads((out / "metrics.json").read_text())["metrics"]["n"] == 4  # a failed sample counts as wrong

    broken.write_bytes(good)
    real = rsflow.pipeline.infer_images
    sent: list[str] = []

    def spy(rows: Any, **kwargs: Any) -> Iterator[Any]:
        sent.extend(p["key"] for r in rows for p in r["row_prompts"])
        yield from real(rows, **kwargs)

    monkeypatch.setattr(rsflow.pipeline, "infer_images", spy)
    assert _eval("aid", data, out, *_FAST) == 0
    assert "(inferred 1, reused 3, failed 0)" in capsys.readouterr().out
    assert sent == ["BareLand/bareland_2.jpg"]


def test_demo_model_reports_its_recorded_held_out_accuracy(
    ray_local: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = build_demo_dataset(tmp_path / "demo-data")
    out = tmp_path / "out"
    assert _eval("rsflow-demo", demo.root, out, model="demo") == 0
    assert "(inferred 1344, reused 0, failed 0)" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    recorded = scores_from_card(demo_model_dir())
    assert {k: (v["correct"], v["n"]) for k, v in m["per_type"].items()} == {
        k: (v["correct"], v["n"]) for k, v in recorded.items()
    }
    table = (out / "results.md").read_text()
    assert "recorded by its training run" in table
    for v in recorded.values():
        assert table.count(f"{100 * v['accuracy']:.2f}") >= 2  # this run's column and the recorded one
    # the 20-sample quick run of the same benchmark reuses those predictions
    monkeypatch.setattr(rsflow.pipeline, "infer_images", _refuse)
    assert _eval("rsflow-demo", demo.root, out, "--limit", "20", model="demo") == 0
    assert "on 20 samples (inferred 0, reused 20, failed 0)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ bad input


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, field: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"rsflow eval: error: {field}"), err
    return err


def test_bad_input_fails_before_inference_with_one_line(
    bench_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, no_inference: None,
) -> None:
    out = tmp_path / "out"
    err = _one_line_error(capsys, _eval("rsvqa", bench_data["rsvqa-lr"], out), "--benchmark")
    assert "choose from rsvqa-lr, rsvqa-hr" in err
    err = _one_line_error(capsys, _eval("rsvqa-lr", bench_data["ucm-captions"], out), "--data")
    assert "LR_split_test_questions.json is missing" in err
    err = _one_line_error(capsys, _eval("ucmerced", bench_data["aid"], out), "--data")
    assert "holds no class folder" in err or "is not a class folder" in err
    err = _one_line_error(capsys, _eval("geochat-referring", bench_data["geochat-referring"], out), "--benchmark")
    assert "needs a model of the geochat family" in err
    err = _one_line_error(capsys, _eval("rsvqa-lr", bench_data["rsvqa-lr"], out, "--questions",
                                        str(bench_data["geochat-lrben"] / "lrben.jsonl")), "--questions")
    assert "only geochat-lrben, geochat-hrben read a questions file" in err
    err = _one_line_error(capsys, _eval("geochat-lrben", bench_data["geochat-lrben"], out, "--questions",
                                        str(tmp_path / "none.jsonl")), "--questions")
    err = _one_line_error(capsys, _eval("geochat-hrben", bench_data["geochat-lrben"], out), "--questions")
    assert "holds no hrben.jsonl" in err
    err = _one_line_error(capsys, _eval("rsvqa-lr", bench_data["rsvqa-lr"], "s3://bucket/eval"), "--output")
    assert "is a URL: rsflow eval writes a local folder" in err
    err = _one_line_error(capsys, _eval("rsvqa-lr", bench_data["rsvqa-lr"], out, "--image-size", "336"), "--image-size")
    assert "does not match the vision tower's 64 px" in err
    err = _one_line_error(capsys, _eval("rsvqa-lr", bench_data["rsvqa-lr"], out, "--limit", "0"), "--limit")
    err = _one_line_error(capsys, _eval("rsvqa-lr", bench_data["rsvqa-lr"], out, "--model-actors", "0"),
                          "--model-actors")
    err = _one_line_error(capsys, _eval("rsvqa-lr", bench_data["rsvqa-lr"], out, "--read-workers", "0"),
                          "--read-workers")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    err = _one_line_error(capsys, _eval("rsvqa-lr", bench_data["rsvqa-lr"], tmp_path / "busy"), "--output")
    assert "holds no rsflow eval run" in err

    # METEOR and the PTB tokenizer need Java: without it, one line says how to get it or skip them
    monkeypatch.setenv("PATH", str(tmp_path / "no-java"))
    err = _one_line_error(capsys, _eval("ucm-captions", bench_data["ucm-captions"], out), "--metrics")
    assert "no `java` is on PATH" in err and "apt-get install default-jre-headless" in err
    assert "--metrics bleu,rouge-l,cider --tokenizer simple" in err
    assert not out.exists()  # nothing written for a refused run


def test_missing_image_is_named_before_inference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_inference: None
) -> None:
    data = tmp_path / "sydney"
    fx.write_karpathy(data, flavour="sydney")
    (data / "images" / "7.tif").unlink()
    err = _one_line_error(capsys, _eval("sydney-captions", data, tmp_path / "out", *_NO_JAVA_CAPTIONS), "--data")
    assert "images/7.tif of sample '7.tif' is missing" in err


def test_job_script_is_the_eval_command(tmp_path: Path) -> None:
    help_text = subprocess.run([sys.executable, str(_REPO / "jobs" / "evaluate.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--benchmark" in help_text and "--output" in help_text
    bad = subprocess.run([sys.executable, str(_REPO / "jobs" / "evaluate.py"), "--benchmark", "nope", "--data",
                          str(tmp_path), "--model", "smoke", "--output", str(tmp_path / "o")],
                         check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("rsflow eval: error: --benchmark: unknown benchmark")


def test_require_gpu_without_a_device_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for the region job: on a machine with no NVIDIA device, on a Ray the run starts itself, --require-gpu
    is one line before the data is read or anything is written (the actors would wait an hour for nothing)."""
    data, out = tmp_path / "lr", tmp_path / "out"
    fx.write_rsvqa(data, n=5)
    monkeypatch.setattr(rsflow.pipeline, "local_gpu_possible", lambda: False)
    monkeypatch.setattr(rsflow.pipeline, "on_own_ray", lambda address=None: True)
    monkeypatch.setattr(rsflow.pipeline, "infer_images", _refuse)
    err = _one_line_error(capsys, _eval("rsvqa-lr", data, out, "--require-gpu"), "--require-gpu")
    assert "this machine has no GPU" in err and not out.exists()
