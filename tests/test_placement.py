"""Stage placement rules (rsflow.placement), without Ray: node kinds, the model-actor pool, read limits."""

from __future__ import annotations

import logging

import pytest

from rsflow.cli import main
from rsflow.errors import RequestError
from rsflow.placement import StagePlacement, parse_resources, plan_cluster

HEAD = {"CPU": 0.0, "memory": 1e9}
CPU_NODE = {"CPU": 8.0, "rsflow_cpu_node": 1000.0}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0, "rsflow_gpu_node": 1000.0}
LAPTOP = {"CPU": 2.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("", None),
        ("auto", None),
        ("none", ()),
        ("rsflow_cpu_node=0.001", (("rsflow_cpu_node", 0.001),)),
        (" b=2, a=0.5 ", (("a", 0.5), ("b", 2.0))),
    ],
)
def test_resource_flags_parse(text, expected):
    assert parse_resources(text, "--read-resources") == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rsflow_cpu_node", "NAME=AMOUNT"),
        ("=1", "NAME=AMOUNT"),
        ("x=abc", "must be a number"),
        ("x=0", "must be > 0"),
        ("x=-1", "must be > 0"),
        ("x=nan", "must be > 0"),
        ("x=1e308", "at most 1e"),  # overflowed inside Ray Data after the cluster started
        ("GPU=1", "set by rsflow itself"),
        ("foo=1,foo=2", "foo is given twice"),  # the last one won without a word
    ],
)
def test_bad_resource_flags_name_the_flag(text, match):
    with pytest.raises(RequestError, match=rf"^--model-resources: .*{match}"):
        parse_resources(text, "--model-resources")


def test_auto_targets_node_kinds_when_the_cluster_has_them():
    plan = plan_cluster([HEAD, CPU_NODE, GPU_NODE, GPU_NODE], StagePlacement())
    assert plan.read_resources == {"rsflow_cpu_node": 0.001}
    assert plan.model_resources == {"rsflow_gpu_node": 0.001}
    assert plan.gpus == 2
    assert (plan.min_actors, plan.max_actors) == (1, 2)  # follows the GPUs
    assert plan.read_max == 8  # the CPU node's CPUs; the GPU nodes' CPUs are not for reads
    assert plan.to_json()["model_actor_gpus"] == 1


def test_auto_places_freely_on_a_cluster_without_kinds(caplog):
    with caplog.at_level(logging.WARNING, logger="rsflow.placement"):
        plan = plan_cluster([LAPTOP], StagePlacement())
    assert plan.read_resources == {} and plan.model_resources == {}
    assert (plan.gpus, plan.min_actors, plan.max_actors) == (0, 1, 1)
    assert plan.read_max == 1  # one of the two CPUs runs the model actor
    assert "no GPU in the Ray cluster: the model runs on CPU" in caplog.text


def test_no_gpu_falls_back_to_cpu_actors_on_the_gpu_kind(caplog):
    cpu_only_gpu_kind = {"CPU": 1.0, "rsflow_gpu_node": 1000.0}
    with caplog.at_level(logging.WARNING, logger="rsflow.placement"):
        plan = plan_cluster([HEAD, {"CPU": 1.0, "rsflow_cpu_node": 1000.0}, cpu_only_gpu_kind], StagePlacement())
    assert plan.gpus == 0 and plan.to_json()["model_actor_gpus"] == 0
    assert plan.model_resources == {"rsflow_gpu_node": 0.001}
    assert plan.read_max == 1  # model actors do not share the CPU node, so reads keep its CPU
    assert "model runs on CPU" in caplog.text


def test_bounds_and_fixed_pool():
    nodes = [HEAD, CPU_NODE, GPU_NODE]
    plan = plan_cluster(nodes, StagePlacement(min_model_actors=2, max_model_actors=6))
    assert (plan.min_actors, plan.max_actors) == (2, 6)  # may grow onto GPU nodes not up yet
    plan = plan_cluster(nodes, StagePlacement(min_model_actors=3))
    assert (plan.min_actors, plan.max_actors) == (3, 3)  # the default max never falls below the min
    plan = plan_cluster(nodes, StagePlacement(), model_actors=4, read_workers=2)
    assert (plan.min_actors, plan.max_actors, plan.read_max) == (4, 4, 2)
    with pytest.raises(RequestError, match="^--model-actors: is a fixed pool"):
        plan_cluster(nodes, StagePlacement(max_model_actors=2), model_actors=1)
    with pytest.raises(RequestError, match="^--min-model-actors: 5 is more than --max-model-actors 2"):
        StagePlacement(min_model_actors=5, max_model_actors=2)
    with pytest.raises(RequestError, match="^--max-model-actors: must be between 1 and 1024"):
        StagePlacement(max_model_actors=0)


def test_explicit_resources_win_and_missing_ones_warn(caplog):
    asked = StagePlacement(read_resources=(("fast_disk", 0.01),), model_resources=())
    with caplog.at_level(logging.WARNING, logger="rsflow.placement"):
        plan = plan_cluster([HEAD, CPU_NODE, GPU_NODE], asked)
    assert plan.read_resources == {"fast_disk": 0.01}
    assert plan.model_resources == {}
    assert "--read-resources fast_disk=0.01: no node of the cluster has it now" in caplog.text
    assert plan.read_max == 1  # no node can run reads yet: at least one


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--read-resources", "rsflow_cpu_node"], "--read-resources: expected NAME=AMOUNT"),
        (["--model-resources", "CPU=1"], "--model-resources: CPU is set by rsflow itself"),
        (["--model-actors", "2", "--max-model-actors", "3"], "--model-actors: is a fixed pool"),
        (["--min-model-actors", "4", "--max-model-actors", "2"], "--min-model-actors: 4 is more than"),
    ],
)
def test_cli_refuses_bad_placement_before_any_work(flags, message, tmp_path, capsys):
    code = main(["region", "--model", "smoke", "--output", str(tmp_path / "out"), *flags])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_cpu_model_actors_that_would_starve_the_reads_are_refused():
    """On a 2-CPU machine without GPUs, 2 CPU model actors would hold both CPUs and no read could ever
    start: refused with the most that fit, instead of a run that waits forever."""
    laptop = [{"CPU": 2.0, "memory": 8e9}]
    with pytest.raises(RequestError, match=r"^--model-actors: 2 model actor\(s\) on CPU .* use at most 1 here"):
        plan_cluster(laptop, StagePlacement(), model_actors=2)
    with pytest.raises(RequestError, match="^--min-model-actors"):
        plan_cluster(laptop, StagePlacement(min_model_actors=2))
    assert plan_cluster(laptop, StagePlacement(), model_actors=1).read_max == 1
    # one CPU in all: no value of the flag helps, and the one that failed is not suggested
    with pytest.raises(RequestError, match=r"^--address: this cluster has 1 CPU\(s\): a model actor on CPU"):
        plan_cluster([{"CPU": 1.0, "memory": 8e9}], StagePlacement())
    # the no-op model's actors ask for no CPU: the reads get both
    plan = plan_cluster(laptop, StagePlacement(), model_actors=2, model_cpus=0.0)
    assert (plan.min_actors, plan.read_max) == (2, 2)
    # with a GPU the actors do not share the reads' CPUs
    assert plan_cluster([{"CPU": 2.0, "GPU": 2.0}], StagePlacement(), model_actors=2).read_max == 2


def test_more_cpu_model_actors_than_cpus_are_refused_even_for_the_no_op_model():
    """Without GPUs every model actor is a process on the CPUs: 1024 no-op actors (they ask for no CPU) on
    2 CPUs started processes until Ray gave up, where a model that asks for a CPU was refused."""
    nodes = [{"CPU": 2.0}]
    with pytest.raises(RequestError, match=r"^--model-actors: 1024 model actors without a GPU on a cluster of 2 CPUs"):
        plan_cluster(nodes, StagePlacement(), model_actors=1024, model_cpus=0.0)
    assert plan_cluster(nodes, StagePlacement(), model_actors=2, model_cpus=0.0).min_actors == 2


def test_require_gpu_waits_for_gpu_nodes_instead_of_running_the_model_on_cpu(caplog):
    """`ray up` returns with the head alone, and a GPU pod may be rescheduled: a job that started then kept
    its model on CPU for its whole length (a 7B model in fp32 ran out of memory there). With --require-gpu
    the actors ask for a GPU each and wait: that demand is what makes Ray's autoscaler add GPU nodes."""
    with caplog.at_level(logging.WARNING, logger="rsflow.placement"):
        plan = plan_cluster([HEAD, CPU_NODE], StagePlacement(require_gpu=True, max_model_actors=4))
    assert plan.gpus == 0 and plan.wait_for_gpus and plan.actor_gpus == 1
    assert (plan.min_actors, plan.max_actors) == (1, 4)
    assert plan.read_max == 8  # the actors will not share the CPU node: reads keep all its CPUs
    assert plan.to_json()["model_actor_gpus"] == 1 and plan.to_json()["wait_for_gpus"] is True
    assert "--require-gpu: no GPU in the Ray cluster yet" in caplog.text
    # a laptop with CPUs only: the CPU-actor limits do not apply (the actors do not run there)
    assert plan_cluster([LAPTOP], StagePlacement(require_gpu=True), model_actors=3).actor_gpus == 1
    # GPUs present: as without the flag
    present = plan_cluster([HEAD, GPU_NODE], StagePlacement(require_gpu=True))
    assert present.gpus == 1 and not present.wait_for_gpus and present.actor_gpus == 1
    without = plan_cluster([HEAD, CPU_NODE], StagePlacement())
    assert without.actor_gpus == 0 and not without.wait_for_gpus
    # the no-op model's actors never ask for a GPU: the flag does not apply
    noop = plan_cluster([HEAD, CPU_NODE], StagePlacement(require_gpu=True), model_cpus=0.0, model_needs_gpu=False)
    assert noop.actor_gpus == 0 and not noop.wait_for_gpus
    # a pool that cannot grow is said so
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rsflow.placement"):
        plan_cluster([HEAD, CPU_NODE], StagePlacement(require_gpu=True))
    assert "give --max-model-actors N to grow onto more GPU nodes" in caplog.text


def test_require_gpu_on_a_ray_this_run_starts_itself_is_refused(monkeypatch):
    """No node can join a local Ray this process starts: the actors would wait for a GPU for ever (Ray Data
    waits for an actor's resources without a limit). Once connected, what this process started decides,
    not the address (a notebook joined to a cluster by ``ray.init("ray://...")`` passes none)."""
    from types import SimpleNamespace

    import ray

    from rsflow import pipeline

    waiting = plan_cluster([LAPTOP], StagePlacement(require_gpu=True))
    refused = r"^--require-gpu: this machine has no GPU, and the local Ray"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # not connected yet: the address decides
    with pytest.raises(RequestError, match=refused):
        pipeline.refuse_waiting_on_own_ray(waiting, "local")
    pipeline.refuse_waiting_on_own_ray(waiting, "ray://head:10001")  # a cluster: its autoscaler may add one
    pipeline.refuse_waiting_on_own_ray(plan_cluster([LAPTOP], StagePlacement()), "local")  # not waiting
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray._private.worker, "_global_node", SimpleNamespace(head=False))  # joined a cluster
    pipeline.refuse_waiting_on_own_ray(waiting, None)
    monkeypatch.setattr(ray._private.worker, "_global_node", None)  # a ray:// client
    pipeline.refuse_waiting_on_own_ray(waiting, None)
    monkeypatch.setattr(ray._private.worker, "_global_node", SimpleNamespace(head=True))  # started its own
    with pytest.raises(RequestError, match=refused):
        pipeline.refuse_waiting_on_own_ray(waiting, "ray://head:10001")


def test_require_gpu_is_a_flag_and_a_monitor_key(tmp_path):
    from rsflow.cli import build_parser
    from rsflow.monitor.config import load_monitor_config

    args = build_parser().parse_args(["region", "--require-gpu"])
    assert args.require_gpu is True and build_parser().parse_args(["region"]).require_gpu is False
    config = tmp_path / "m.yaml"
    base = ("name: m\naoi: {bbox: [12.0, 41.0, 12.1, 41.1]}\nstac: sample\ntasks: {tasks: [caption]}\n"
            "model: {model: noop}\noutput: out\n")
    config.write_text(base + "require_gpu: true\n")
    assert load_monitor_config(config).request.placement.require_gpu is True
    config.write_text(base + "require_gpu: 'yes'\n")
    with pytest.raises(RequestError, match=r"^require_gpu: must be true or false"):
        load_monitor_config(config)


def test_a_cluster_with_no_cpu_for_reads_yet_warns_naming_read_workers(caplog: pytest.LogCaptureFixture) -> None:
    """Right after `ray up` the head (no CPU for tasks) is the whole cluster: the run would keep one read task for
    its whole length, silently."""
    head = [{"CPU": 0.0, "memory": 8e9}]
    with caplog.at_level("WARNING", logger="rsflow.placement"):
        plan = plan_cluster(head, StagePlacement(require_gpu=True))
    assert plan.read_max == 1 and "give --read-workers N" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rsflow.placement"):
        plan_cluster(head, StagePlacement(require_gpu=True), read_workers=8)
        plan_cluster([{"CPU": 2.0, "memory": 8e9}], StagePlacement(), model_cpus=0.0)
    assert "--read-workers" not in caplog.text


def test_require_gpu_on_a_machine_without_gpus_and_its_own_ray_is_refused_before_the_search(
        monkeypatch, tmp_path, capsys):
    """The refusal came after the search and Ray's start, behind a warning that the actors would wait."""
    from rsflow import pipeline
    from rsflow.cli import main

    def no_search(*args, **kwargs):
        raise AssertionError("searched")

    monkeypatch.setattr(pipeline, "local_gpu_possible", lambda: False)
    monkeypatch.setattr(pipeline, "on_own_ray", lambda address=None: True)
    monkeypatch.setattr(pipeline, "search_items", no_search)
    code = main(["region", "--require-gpu", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("rsflow region: error: --require-gpu: this machine has no GPU")
    assert not (tmp_path / "out").exists()
