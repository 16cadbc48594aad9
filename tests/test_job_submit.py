"""``ray job submit`` of the region job and of a finetuning run to a real local cluster (``ray start --head``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import geopandas as gpd
import pytest

from tests.stac_fixtures import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The cluster resolves the job's `python` through its own PATH: put this environment's first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A head node started with `ray start --head --block` in its own process group; yields the
    dashboard (job API) address."""
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rsjob-", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port), "--include-dashboard", "true",
         "--temp-dir", temp_dir, "--disable-usage-stats",
         # its own agent ports: another Ray on this machine (the suite's local one) holds the defaults,
         # and an agent that cannot bind leaves the job API answering "No available agent"
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"ray start exited early: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the Ray dashboard did not come up within 90 s")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever of the cluster ignored SIGTERM (the group outlives `ray start` itself)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _submit(address: str, entrypoint: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
           "--working-dir", str(REPO), "--", *entrypoint]
    # The dashboard answers before its job agent is up; Ray then says "No available agent to submit
    # job, please try again later". Wait for the agent as a user would, a bounded number of times.
    for _ in range(20):
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    return proc


def test_ray_job_submit_runs_the_region_job(ray_head, sample_catalog, tmp_path):
    out = tmp_path / "submitted"
    _submit(ray_head, ["python", "jobs/caption_region.py", "--stac", str(sample_catalog),
                       "--bbox", "-75.70,37.650,-75.69,37.655", "--max-new-tokens", "4", "--output", str(out)])
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    gdf = gpd.read_parquet(out)
    assert len(gdf) == manifest["counts"]["rows_written"] > 0
    assert (gdf["status"] == "ok").all()


def test_ray_job_submit_runs_a_short_instruct_finetune(ray_head, tmp_path):
    from rsflow.finetune.demo_data import build_demo_dataset
    from rsflow.finetune.train import read_steps

    data = build_demo_dataset(tmp_path / "data")
    proc = _submit(ray_head, [
        "python", "training/finetune.py", "--stage", "instruct", "--config", "training/configs/demo.yaml",
        f"data={data.train_json}", f"image_root={data.image_dir}", f"output={tmp_path / 'runs'}",
        "name=submitted", "max_steps=3", "checkpoint_every=3",
    ])
    run_dir = tmp_path / "runs" / "submitted"
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"already_done"')))
    assert summary["steps"] == 3 and summary["attempts"] == 1 and summary["run_dir"] == str(run_dir)
    assert [int(r["step"]) for r in read_steps(run_dir)] == [1, 2, 3]
    assert (run_dir / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "export" / "llava_repo" / "non_lora_trainables.bin").is_file()


def test_the_region_job_joins_a_cluster_ray_start_left_on_this_machine(sample_catalog, tmp_path):
    """``ray.init()`` without an address joins the cluster ``ray start`` last started on the machine (Ray
    keeps its address in ``<RAY_TMPDIR>/ray/ray_current_cluster``). The job passed settings only a new
    local Ray takes and died with "When connecting to an existing cluster, _system_config must not be
    provided"; it joins now, and a record whose cluster is gone is refused in one line instead of
    waiting on it. RAY_TMPDIR keeps this cluster away from the suite's own Ray."""
    ray_tmp = tempfile.mkdtemp(prefix="rst-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**_env(), "RAY_TMPDIR": ray_tmp}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
         "--port", str(free_port()), "--include-dashboard", "false", "--disable-usage-stats",
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
    )
    record = Path(ray_tmp) / "ray" / "ray_current_cluster"
    region = [sys.executable, "-m", "rsflow.cli", "region", "--model", "noop", "--stac", str(sample_catalog),
              "--bbox", "-75.70,37.650,-75.69,37.655"]
    try:
        deadline = time.monotonic() + 90
        while not record.is_file() and time.monotonic() < deadline and head.poll() is None:
            time.sleep(0.5)
        assert record.is_file(), "ray start did not come up"
        time.sleep(2)  # the raylet registers after the record is written
        proc = subprocess.run([*region, "--output", str(tmp_path / "joined")], env=env, capture_output=True,
                              text=True, timeout=300, cwd=REPO, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "joining the Ray cluster started on this machine" in proc.stderr
        assert json.loads((tmp_path / "joined" / "_manifest.json").read_text())["status"] == "complete"
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    # the record stays behind a cluster that died without `ray stop`: one line, no wait
    record.write_text(f"127.0.0.1:{free_port()}")
    proc = subprocess.run([*region, "--output", str(tmp_path / "stale")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 2 and "set RAY_ADDRESS=local (or --address local)" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "stale").exists()
    # which is what it says: a new local Ray, whatever the record names
    proc = subprocess.run([*region, "--address", "local", "--output", str(tmp_path / "local")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "local" / "_manifest.json").read_text())["status"] == "complete"


def test_ray_job_submit_refuses_an_output_that_ray_would_delete(ray_head, sample_catalog):
    """The default output of a submitted job would land in Ray's temporary copy of --working-dir: the job
    fails at once, naming --output, instead of 'succeeding' into a folder Ray deletes."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
           "--", "python", "jobs/caption_region.py", "--stac", str(sample_catalog), "--model", "noop"]
    for _ in range(20):
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(3)
    assert proc.returncode != 0 and "failed" in proc.stdout + proc.stderr
    assert "--output: out/region-" in proc.stdout and "temporary copy of --working-dir" in proc.stdout, proc.stdout[-2000:]
