"""Where the region job's stages run on a Ray cluster, and how many model actors it keeps.

Pure functions of the cluster's nodes (their Ray resources) and the user's flags; :mod:`rsflow.pipeline`
is the only place that hands the result to Ray.

Node kinds. A cluster marks its kinds of nodes with custom Ray resources, 1000 units per node
(``cluster/README.md``): ``rsflow_cpu_node`` on CPU workers, ``rsflow_gpu_node`` on GPU workers.
Asking for a sliver of one (0.001) puts a task or actor on a node of that kind without limiting how
many fit there. By default (``auto``), planning and read tasks ask for ``rsflow_cpu_node`` and model
actors for ``rsflow_gpu_node`` when some node of the cluster advertises that resource, and for
nothing extra when none does (a laptop, a cluster without kinds). ``--read-resources`` and
``--model-resources`` name other resources (``NAME=AMOUNT,...``), or ``none`` to place freely.
Planning and reads always ask for one CPU and never for a GPU.

Model actors. Each asks for one GPU when the cluster has GPUs when the job starts, else runs on
one CPU (with a warning). ``--require-gpu`` makes each ask for one GPU whatever the cluster holds at the
start: where none has joined yet (``ray up`` returns with the head alone; a GPU pod being rescheduled),
the actors wait for one (the run starts once one is up, and stops after an hour without one:
``rsflow.pipeline.REQUIRE_GPU_WAIT_SECONDS``), and that demand is what makes Ray's autoscaler add GPU nodes; without it such a
run keeps a 7B model on CPU for its whole length. The pool is Ray Data's autoscaling ``ActorPoolStrategy(min_size,
max_size)``: ``--min-model-actors`` (default 1) to ``--max-model-actors`` (default: the GPUs
present, at least 1); a maximum above the GPUs present lets the pool grow onto GPU nodes the
cluster's autoscaler adds. ``--model-actors N`` is a fixed pool of N.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rsflow.errors import RequestError

logger = logging.getLogger(__name__)

__all__ = [
    "CPU_NODE_RESOURCE",
    "GPU_NODE_RESOURCE",
    "NODE_SLIVER",
    "ClusterPlan",
    "StagePlacement",
    "parse_resources",
    "plan_cluster",
]

CPU_NODE_RESOURCE = "rsflow_cpu_node"
"""Custom Ray resource that CPU workers advertise (cluster/raycluster.yaml, cluster/ray-up.yaml)."""
GPU_NODE_RESOURCE = "rsflow_gpu_node"
"""Custom Ray resource that GPU workers advertise."""
NODE_SLIVER = 0.001
"""Amount of a node-kind resource asked for by the ``auto`` placement (a node has 1000)."""

Resources = tuple[tuple[str, float], ...]
MAX_RESOURCE_AMOUNT = 1e9
"""Largest custom resource amount a task or actor may ask for (Ray converts amounts to fixed point:
1e308 overflowed inside Ray Data after the cluster started)."""
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")
_RAY_BUILTIN = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def parse_resources(text: str | None, flag: str) -> Resources | None:
    """``--read-resources``/``--model-resources`` -> sorted ``(name, amount)`` pairs.

    ``None``, ``""`` or ``auto`` give None (the node-kind default, see the module docstring);
    ``none`` gives ``()`` (no custom resource); else ``NAME=AMOUNT[,NAME=AMOUNT...]`` with a positive
    amount (a sliver such as 0.001 places without limiting; a whole number limits how many fit).

    Raises:
        RequestError: (``flag``) a malformed pair, a non-positive amount, a name given twice, or one of
            Ray's own resources (CPU, GPU, memory are set by rsflow itself).
    """
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    if text.strip().lower() == "none":
        return ()
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, amount = part.strip().partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise RequestError(flag, f"expected NAME=AMOUNT[,NAME=AMOUNT...], 'auto' or 'none', got {part.strip()!r}")
        if name in _RAY_BUILTIN:
            raise RequestError(flag, f"{name} is set by rsflow itself; name custom resources only")
        if name in out:
            raise RequestError(flag, f"{name} is given twice; give each resource once")
        try:
            value = float(amount)
        except ValueError:
            raise RequestError(flag, f"amount of {name} must be a number, got {amount.strip()!r}") from None
        if not (math.isfinite(value) and 0 < value <= MAX_RESOURCE_AMOUNT):
            raise RequestError(flag, f"amount of {name} must be > 0 and at most {MAX_RESOURCE_AMOUNT:g}, "
                                     f"got {amount.strip()}")
        out[name] = value
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class StagePlacement:
    """Where the stages run, as the user asked (flags); resolved per cluster by :func:`plan_cluster`."""

    read_resources: Resources | None = None
    """Custom Ray resources every planning and read task asks for; None: ``auto`` (``rsflow_cpu_node``
    when the cluster has it), ``()``: none."""
    model_resources: Resources | None = None
    """Custom Ray resources every model actor asks for; None: ``auto`` (``rsflow_gpu_node`` when the
    cluster has it), ``()``: none."""
    min_model_actors: int | None = None
    """Smallest model-actor pool (default 1)."""
    max_model_actors: int | None = None
    """Largest model-actor pool (default: the GPUs present when the job starts, at least 1)."""
    require_gpu: bool = False
    """Model actors ask for one GPU each even when no GPU has joined the cluster yet (they wait for one)."""

    def __post_init__(self) -> None:
        for name in ("min_model_actors", "max_model_actors"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 1024:
                raise RequestError(f"--{name.replace('_', '-')}", f"must be between 1 and 1024, got {value}")
        if self.min_model_actors and self.max_model_actors and self.min_model_actors > self.max_model_actors:
            raise RequestError(
                "--min-model-actors",
                f"{self.min_model_actors} is more than --max-model-actors {self.max_model_actors}",
            )

    def to_json(self) -> dict[str, Any]:
        """The flags as plain JSON (for the run manifest); ``"auto"`` where not given."""
        return {
            "read_resources": "auto" if self.read_resources is None else dict(self.read_resources),
            "model_resources": "auto" if self.model_resources is None else dict(self.model_resources),
            "min_model_actors": self.min_model_actors,
            "max_model_actors": self.max_model_actors,
            "require_gpu": self.require_gpu,
        }


@dataclass(frozen=True)
class ClusterPlan:
    """How the region job's stages are placed and sized on one cluster."""

    gpus: int
    """GPUs in the cluster when the job starts (0: the model runs on CPU, unless ``wait_for_gpus``)."""
    min_actors: int
    """Model actors the pool starts with and keeps."""
    max_actors: int
    """Model actors the pool may grow to (equal to ``min_actors``: a fixed pool)."""
    read_max: int
    """Most read tasks at once."""
    read_resources: dict[str, float]
    """Custom Ray resources each planning and read task asks for (besides one CPU)."""
    model_resources: dict[str, float]
    """Custom Ray resources each model actor asks for (besides one GPU, or one CPU without GPUs)."""
    wait_for_gpus: bool = False
    """No GPU yet, and ``--require-gpu``: the model actors ask for one each and wait for the autoscaler."""

    @property
    def actor_gpus(self) -> int:
        """GPUs each model actor asks for: 1 where the cluster has GPUs or the run waits for them, else 0."""
        return 1 if self.gpus or self.wait_for_gpus else 0

    def to_json(self) -> dict[str, Any]:
        """The plan as plain JSON (for the run manifest)."""
        return {
            "gpus": self.gpus,
            "model_actors": {"min": self.min_actors, "max": self.max_actors},
            "model_actor_gpus": self.actor_gpus,
            "wait_for_gpus": self.wait_for_gpus,
            "read_max": self.read_max,
            "read_resources": dict(self.read_resources),
            "model_resources": dict(self.model_resources),
        }


def _resolve(asked: Resources | None, kind: str, nodes: Sequence[Mapping[str, float]], flag: str) -> dict[str, float]:
    if asked is None:  # auto: the node kind when some node has it
        return {kind: NODE_SLIVER} if any(n.get(kind, 0) > 0 for n in nodes) else {}
    wanted = dict(asked)
    for name, amount in wanted.items():
        if not any(n.get(name, 0) >= amount for n in nodes):
            logger.warning(
                "%s %s=%s: no node of the cluster has it now; those tasks wait until the autoscaler adds one",
                flag, name, amount,
            )
    return wanted


def _fits(node: Mapping[str, float], resources: Mapping[str, float]) -> bool:
    return all(node.get(name, 0) >= amount for name, amount in resources.items())


def plan_cluster(
    nodes: Sequence[Mapping[str, float]],
    placement: StagePlacement,
    *,
    model_actors: int | None = None,
    read_workers: int | None = None,
    model_cpus: float = 1.0,
    model_needs_gpu: bool = True,
    pool_flag: str | None = "--max-model-actors",
) -> ClusterPlan:
    """Place and size the stages for a cluster (see the module docstring for the rules).

    Args:
        nodes: the total Ray resources of every alive node (``ray.nodes()[i]["Resources"]``).
        placement: what the user asked.
        model_actors: a fixed pool size (``--model-actors``); excludes the min/max bounds.
        read_workers: most read tasks at once (``--read-workers``); default: the CPUs of the nodes
            reads may use, less the CPUs of the model actors where CPU-only model actors share those nodes.
        model_cpus: CPUs a model actor asks for without GPUs (the no-op model asks for none).
        model_needs_gpu: False for the no-op model, whose actors never ask for a GPU (``require_gpu``
            does not apply to it).
        pool_flag: the flag that lets a pool waiting for GPUs grow, named in its warning (None: the
            caller has none, e.g. ``rsflow eval``).

    Raises:
        RequestError: ``--model-actors`` together with ``--min-model-actors``/``--max-model-actors``;
            CPU-only model actors that would take every CPU the reads could use (the run would wait
            forever for a read slot).
    """
    if model_actors is not None and (placement.min_model_actors or placement.max_model_actors):
        raise RequestError("--model-actors", "is a fixed pool; give it or --min/--max-model-actors, not both")
    gpus = int(sum(n.get("GPU", 0) for n in nodes))
    waiting = placement.require_gpu and model_needs_gpu and gpus == 0
    if model_actors is not None:
        low = high = model_actors
    else:
        low = placement.min_model_actors or 1
        high = placement.max_model_actors or max(low, gpus, 1)
    read_resources = _resolve(placement.read_resources, CPU_NODE_RESOURCE, nodes, "--read-resources")
    model_resources = _resolve(placement.model_resources, GPU_NODE_RESOURCE, nodes, "--model-resources")
    read_nodes = [n for n in nodes if _fits(n, read_resources)]
    read_cpus = int(sum(n.get("CPU", 0) for n in read_nodes))
    shared = not gpus and not waiting and any(_fits(n, model_resources) for n in read_nodes)
    actor_cpus = low * model_cpus if shared else 0.0
    if shared and read_cpus and read_cpus - actor_cpus < 1:
        fits = int((read_cpus - 1) // max(model_cpus, 1e-9))
        if fits < 1:  # not even one actor beside a read task: no flag value helps
            raise RequestError(
                "--address", f"this cluster has {read_cpus} CPU(s): a model actor on CPU ({model_cpus:g} CPU) and "
                "the reads need at least one more; run on a machine or cluster with more CPUs, or with a GPU")
        flag = "--model-actors" if model_actors is not None else "--min-model-actors"
        raise RequestError(
            flag,
            f"{low} model actor(s) on CPU would take all {read_cpus} CPUs of this cluster and leave none for "
            f"reading tiles; use at most {fits} here",
        )
    all_cpus = int(sum(n.get("CPU", 0) for n in nodes))
    if not gpus and not waiting and all_cpus and low > all_cpus:  # each actor is a process
        flag = "--model-actors" if model_actors is not None else "--min-model-actors"
        raise RequestError(flag, f"{low} model actors without a GPU on a cluster of {all_cpus} CPUs; use at most "
                                 f"{all_cpus}")
    read_max = read_workers or max(1, int(read_cpus - actor_cpus))
    if read_workers is None and read_cpus == 0:
        # e.g. `ray up` or a KubeRay cluster whose CPU workers have not joined yet (the head has no CPU for tasks):
        # the whole run would keep one read task at a time
        logger.warning("no CPU for reads in the cluster yet: reads are sized for the nodes up now, 1 read task at a "
                       "time for the whole run; on a cluster whose CPU nodes are still joining, give --read-workers N")
    if waiting:
        logger.warning("--require-gpu: no GPU in the Ray cluster yet; the %d model actor(s) wait for the autoscaler "
                       "to add GPU nodes (the run starts once one is up)%s", low,
                       "" if high > low or model_actors is not None or pool_flag is None
                       else f"; the pool stays at {low} actor(s): give {pool_flag} N to grow onto more GPU nodes "
                       "as they join")
    elif gpus == 0:
        logger.warning("no GPU in the Ray cluster: the model runs on CPU (--require-gpu waits for one instead)")
    return ClusterPlan(
        gpus=gpus,
        wait_for_gpus=waiting,
        min_actors=low,
        max_actors=high,
        read_max=read_max,
        read_resources=read_resources,
        model_resources=model_resources,
    )
