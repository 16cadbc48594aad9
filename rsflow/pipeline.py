"""The one place that assembles Ray Data: search -> plan -> read -> infer -> write.

Search runs on the driver (a handful of HTTP requests). Everything per tile runs on the
cluster as a streaming Ray Data pipeline::

    from_items(units) -> flat_map(plan)                     CPU tasks, one per unit (a rectangle of an
                      -> map_batches(read_blocks)            item's tiles, a block or a few tall): planning
                                                            and reading fused, chips out a block at a time
                      -> map_batches(ModelRunner)           model actor pool, num_gpus=1 when GPUs
                                                            (--engine vllm: rsflow.models.vllm_engine;
                                                            --model noop: NoopRunner, no torch)
                      -> map_batches(interpret_batch)       CPU tasks, then RawPartsSink (staging parts)
    read_parquet(parts) -> sort(hilbert key) -> GeoParquetDatasink   (in the driver up to 100,000 rows)

Reading and inference are separate operators so that they overlap. A tile that fails in any
stage becomes a row with ``status="failed"`` and the reason; nothing is dropped. Ray Data's
per-operator resource reservation is off for these datasets (:func:`_configured`): reads take the
CPU slots the other stages leave.

Which nodes each stage runs on and how many model actors there are is decided by
:mod:`rsflow.placement` from the cluster's resources. Imagery and outputs may be on object stores
(``s3://``, ``gs://``, ``az://``): reads go through GDAL's virtual file systems (:mod:`rsflow.read`),
outputs through fsspec (:mod:`rsflow.output`).

Benchmark evaluation (``rsflow eval``) runs the same infer stage (:func:`add_model_stage`: the same
``ModelRunner`` actors) on images read from a folder instead of STAC tiles (:func:`infer_images`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import posixpath
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import fsspec
import rasterio
import shapely
from shapely.geometry import mapping

from rsflow import output as out
from rsflow.errors import GpuUnavailable, RequestError
from rsflow.georef import region_to_box
from rsflow.hrefs import HrefPolicy, HrefRefused, redact
from rsflow.interpret import interpret_batch
from rsflow.models.spec import (
    NOOP_MODEL,
    ModelSpec,
    model_card,
    model_id,
    model_input_size,
    resolve_adapter,
    resolve_model_dir,
    resolve_prompt_format,
)
from rsflow.models.vllm_engine import add_vllm_stage, check_vllm_available, check_vllm_spec
from rsflow.placement import ClusterPlan, StagePlacement, plan_cluster
from rsflow.plan import item_datetime, plan_tiles, plan_units, tile_offsets
from rsflow.read import GDAL_REMOTE_OPTIONS, configure_gdal, read_blocks
from rsflow.request import RegionRequest, search_geometry
from rsflow.search import SearchQuery, search_items
from rsflow.sources import SourceProfile, check_signing, load_profiles, resolve_profile, sign_href
from rsflow.versions import package_versions

logger = logging.getLogger(__name__)


#: Memory a read task asks Ray for (plus its batch's chip buffers): the read worker's own memory (RSS less
#: shared pages, as Ray counts a worker's heap), which reached 264 MiB reading 336 px tiles of a 20,000 px
#: scene (interpreter and libraries about 130 MiB, GDAL's 64 MB block cache, 5 MB VSI caches per open
#: file, the block being built), plus a quarter.
_READ_TASK_MEMORY_BYTES = 336 * 1024**2


@dataclass(frozen=True)
class RunResult:
    """What a region run did."""

    output: str
    """Where the dataset was committed."""
    manifest: dict[str, Any]
    """The run manifest as written."""


REFUSED_KEY = "rsflow:refused"
"""Key the region job adds to an item the search refused (its value: why); planning records it as failed."""


def _failed_plan_row(item: dict[str, Any], size: int, error: str, unit: tuple[list[int], list[int]] | None = None,
                     ) -> dict[str, Any]:
    """A row standing for an item that could not be planned, or (``unit``: its ``(rows, cols)`` offset
    ranges) for one planning unit of it, so that the failure is recorded and ``--resume`` plans those
    tiles again. It has no pixel grid: its geometry is the item's footprint (made valid; its bbox when
    the geometry is unusable, null when it has neither) and its CRS empty; its transform (zeros) and
    window (the tile size at offset 0) only keep the read and model stages' columns filled, and are
    written as nulls (:func:`rsflow.interpret._tile_base`)."""
    geom = item.get("geometry")
    try:  # the item's footprint, made valid (a catalog's geometry can self-intersect), else its bbox
        footprint = shapely.make_valid(shapely.geometry.shape(geom)) if geom else None
    except Exception:  # noqa: BLE001 - a malformed geometry: the bbox stands in
        footprint = None
    bbox = item.get("bbox")
    if (footprint is None or footprint.is_empty) and isinstance(bbox, list | tuple) and len(bbox) >= 4:
        try:
            footprint = shapely.box(*map(float, bbox[:4]))
        except (TypeError, ValueError):
            footprint = None
    if footprint is not None and footprint.is_empty:
        footprint = None  # neither geometry nor bbox: a null geometry, not a made-up box at (0, 0)
    tile_id = f"{item.get('id')}:plan-failed"
    if unit is not None:
        (r0, r1), (c0, c1) = unit
        tile_id = f"{tile_id}:r{r0}-{r1}c{c0}-{c1}"
        error = f"planning the tiles at row offsets {r0}-{r1} px, column offsets {c0}-{c1} px failed: {error}"
    return {
        "tile_id": tile_id,
        "item_id": str(item.get("id")),
        "collection": item.get("collection") or "",
        "datetime": _time_or_none(item),
        "crs": "",
        "transform": [0.0] * 6,
        "col_off": 0,
        "row_off": 0,
        "width": size,
        "height": size,
        "res": 0.0,
        # b"" rather than None: a block whose rows all lack it would turn the column into floats
        "footprint_wkb": shapely.to_wkb(footprint) if footprint is not None else b"",
        "hrefs": ["", "", ""],
        "bands": [0, 0, 0],
        "scale": [1.0, 1.0, 1.0],
        "offset": [0.0, 0.0, 0.0],
        "nodata": [float("nan")] * 3,
        "stretch_lo": 0.0,
        "stretch_hi": 1.0,
        "signing": "",
        "status": "failed",
        "error": error,
        "stage": "plan",
        "nodata_fraction": float("nan"),
    }


def _plan_item(
    row: dict[str, Any],
    *,
    profiles: dict[str, SourceProfile],
    gdal_options: dict[str, str] | None = None,
    spec: Any,
    aoi_wkb: bytes,
    regions: list[tuple[str, bytes]],
    regions_only: bool,
    href_policy: HrefPolicy,
    skip_tile_ids: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """flat_map UDF: one planning unit (an item and a rectangle of its tiles) -> its tile rows (or, for
    the item's first unit, one failed row when the item cannot be planned).

    The item's RGB asset hrefs are checked against ``href_policy`` first (:mod:`rsflow.hrefs`); a
    refused one fails the item with the asset and the reason.

    With region-caption regions, each tile gets ``region_boxes``: the 0-100 grid box of every
    region that touches it; when region-caption is the only task, tiles without a region are not
    planned (there would be nothing to ask of them).
    """
    item = json.loads(row["item_json"])
    configure_gdal(GDAL_REMOTE_OPTIONS if gdal_options is None else gdal_options)  # planning opens the assets too
    if item.get(REFUSED_KEY):  # refused by the search: one failed row, apart from the item that has its id
        failed = _plan_failure(item, spec, ValueError(item[REFUSED_KEY]))
        failed["tile_id"] = f"{item.get('id')}:refused:{hashlib.sha1(row['item_json'].encode()).hexdigest()[:8]}"
        return [failed]
    try:  # the item as a whole: every unit of it would fail the same way, so its first unit records it once
        item_datetime(item)
        profile = profiles[item.get("collection") or ""]
        for ref in profile.rgb:  # a catalog is outside input: refuse hrefs it may not make us read
            href = (item.get("assets", {}).get(ref.asset) or {}).get("href")
            if isinstance(href, str):
                try:
                    href_policy.check(href)
                except HrefRefused as exc:
                    raise HrefRefused(f"asset {ref.asset!r} refused: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - one bad item must not stop the others
        return [_plan_failure(item, spec, exc)] if row.get("first_unit", True) else []
    rows = tuple(row["rows"]) if row.get("rows") is not None else None
    cols = tuple(row["cols"]) if row.get("cols") is not None else None
    try:  # this unit's tiles: a failure here (a header read, a region) may be this unit's alone
        tiles = plan_tiles(item, profile, spec, shapely.from_wkb(aoi_wkb), header_opener(profile, href_policy),
                           rows=rows, cols=cols)
        geoms = [(rid, shapely.from_wkb(wkb)) for rid, wkb in regions]
        out = []
        for t in tiles:
            r = t.to_row()
            boxes = []
            footprint = shapely.from_wkb(t.footprint_wkb) if geoms else None
            for rid, geom in geoms:
                if geom.intersects(footprint):
                    box = region_to_box(geom, t.transform, t.crs, t.width, t.height)
                    if box is not None:
                        boxes.append({"region_id": rid, "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3]})
            r["region_boxes"] = boxes
            if (boxes or not regions_only) and r["tile_id"] not in skip_tile_ids:  # skip: done by --resume's source
                out.append(r)
    except Exception as exc:  # noqa: BLE001 - recorded for this unit, never dropped: its item's other units go on
        unit = (list(rows), list(cols)) if rows is not None and cols is not None else None
        return [_plan_failure(item, spec, exc, unit)]
    return out


def header_opener(profile: SourceProfile, href_policy: HrefPolicy) -> Any:
    """``href -> rasterio dataset`` for planning's header reads (items without ``proj:*`` fields), on the
    driver and in the read tasks alike: the href is checked against the catalog's policy first (a
    remote catalog's href to a loopback or metadata address is never opened; :class:`HrefRefused`)
    and signed as the item's profile says (Planetary Computer hrefs are private until signed)."""

    def open_header(href: str) -> Any:
        href_policy.check(href)
        return rasterio.open(sign_href(href, profile))

    return open_header


def _time_or_none(item: dict[str, Any]) -> str:
    """:func:`item_datetime`, or ``""`` (null) where it is not a time (that is then the failure's reason)."""
    try:
        return item_datetime(item)
    except ValueError:
        return ""


def _plan_failure(item: dict[str, Any], spec: Any, exc: Exception,
                  unit: tuple[list[int], list[int]] | None = None) -> dict[str, Any]:
    reason = redact(f"{type(exc).__name__}: {exc}")  # an href's signature must not reach a row or a log
    failed = _failed_plan_row(item, spec.size_px, reason, unit)
    logger.warning("item %s: %s", item.get("id"), failed["error"] if unit else f"planning failed: {reason}")
    failed["region_boxes"] = []
    return failed


#: Ray settings of a local Ray that rsflow starts itself (a cluster's nodes get the same from
#: cluster/Dockerfile's environment, ``RAY_free_objects_period_milliseconds``).
#:
#: ``free_objects_period_milliseconds``: how long the raylet gathers objects whose last reference is
#: gone before it deletes them from the object store (Ray's default: 1,000 ms). Blocks of chips stream
#: through at a few hundred MB/s, so for a second after they are spent their memory cannot be reused:
#: each new block lands on fresh object-store pages, and every process that writes or reads blocks
#: maps more of them. At 100 ms the largest read worker of a 20,000 px scene went from about 185 to 75
#: MiB of object-store pages (bench/README.md, "memory").
LOCAL_RAY_SYSTEM_CONFIG: dict[str, Any] = {"free_objects_period_milliseconds": 100}


def _ensure_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if starts_local_ray(address):  # a new local Ray of our own
        ray.init(address="local", include_dashboard=False, log_to_driver=True, _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    elif not (address or os.environ.get("RAY_ADDRESS")):  # `ray start` ran on this machine: ray.init() joins it
        logger.info("joining the Ray cluster started on this machine at %s (ray start)", local_cluster_address())
        ray.init(log_to_driver=True)  # (Ray's rule); a cluster being joined takes no settings (_system_config raised)
    else:
        ray.init(address=address, log_to_driver=True)  # a cluster: `ray job submit` sets RAY_ADDRESS
    logger.info("Ray resources: %s", ray.cluster_resources())


def starts_local_ray(address: str | None = None) -> bool:
    """Whether connecting with ``address`` (else ``RAY_ADDRESS``) starts a Ray of this process's own, which
    no node can join later: ``local``, or nothing given and no cluster ``ray start`` left on this machine."""
    target = address or os.environ.get("RAY_ADDRESS") or None
    return target == "local" or (target is None and not local_cluster_address())


def local_cluster_address() -> str | None:
    """The address of the cluster ``ray start`` last started on this machine, which ``ray.init()`` without
    an address joins (Ray keeps it in ``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`` until ``ray stop``),
    or None."""
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:  # a Ray that moved it: ray.init() decides on its own
        return None
    return find_bootstrap_address(None) or None


def _cluster_nodes() -> list[dict[str, float]]:
    """The total Ray resources of every alive node of the connected cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _cluster_shape(model_actors: int | None, read_workers: int | None, *, require_gpu: bool = False,
                   address: str | None = None) -> tuple[int, int, int, bool]:
    """``(gpus, model actors, read task limit, waiting for GPUs)`` for the connected Ray cluster: one model
    actor per GPU (at least one) unless ``model_actors`` says otherwise; reads on the CPUs the actors leave
    free. ``require_gpu``: as ``--require-gpu`` (:func:`refuse_waiting_on_own_ray`)."""
    plan = plan_cluster(
        _cluster_nodes(), StagePlacement(read_resources=(), model_resources=(), require_gpu=require_gpu),
        model_actors=model_actors, read_workers=read_workers, pool_flag=None,
    )
    refuse_waiting_on_own_ray(plan, address)
    return plan.gpus or plan.actor_gpus, plan.max_actors, plan.read_max, plan.wait_for_gpus


_ACTORS_TIMED_OUT = "Timed out while starting actors"
"""How Ray Data's actor pool says its ``wait_for_min_actors_s`` ran out (``GetTimeoutError``)."""


@contextlib.contextmanager
def bounded_gpu_wait(ds: Any, waiting: bool) -> Iterator[None]:
    """Around the run of ``ds``: where its model actors wait for GPUs (``waiting``), at most
    :data:`REQUIRE_GPU_WAIT_SECONDS` (Ray Data waits for an actor's resources without a limit by default),
    and that wait running out is :class:`GpuUnavailable` (:func:`gpu_wait_expired`)."""
    import ray

    if waiting:
        ds.context.wait_for_min_actors_s = REQUIRE_GPU_WAIT_SECONDS
    try:
        yield
    except ray.exceptions.GetTimeoutError as exc:
        expired = gpu_wait_expired(exc) if waiting else None
        if expired is None:
            raise
        raise expired from exc


def gpu_wait_expired(exc: BaseException) -> GpuUnavailable | None:
    """The error of a ``--require-gpu`` run whose model actors did not start within
    :data:`REQUIRE_GPU_WAIT_SECONDS` (Ray Data's ``GetTimeoutError`` from the actor pool's start); None
    for any other timeout."""
    if _ACTORS_TIMED_OUT not in str(exc):
        return None
    return GpuUnavailable(f"--require-gpu: no model actor started within {REQUIRE_GPU_WAIT_SECONDS} s (a GPU node "
                          "joining, then loading the model); check the cluster's GPU node group and autoscaler "
                          "(`ray status`), then run it again")


def local_gpu_possible() -> bool:
    """Whether a Ray started here would find a GPU, by Ray's own detection (NVIDIA, AMD, Intel, Apple or MetaX:
    the accelerator manager that ``ray.init`` uses for the ``GPU`` resource); True where that cannot be asked.
    Without one, ``--require-gpu`` on a Ray this process starts is refused before the search."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        return manager is None or int(manager.get_current_node_num_accelerators()) > 0
    except Exception:  # noqa: BLE001 - a private API: when it cannot answer, Ray's own count decides later
        return True


def on_own_ray(address: str | None) -> bool:
    """Whether this process runs (or, not connected yet, would start) a Ray of its own, which no node can
    join later. Connected: whether this process started the head (``ray.init()`` without a cluster to
    join); a process joined to a cluster, by address or ``ray://``, is not on its own Ray whatever
    ``address`` says (a notebook that called ``ray.init("ray://head:10001")`` passes none)."""
    import ray

    if ray.is_initialized():
        node = getattr(ray._private.worker, "_global_node", None)  # None for a ray:// client
        return bool(node is not None and getattr(node, "head", False))
    return starts_local_ray(address)


def refuse_waiting_on_own_ray(plan: ClusterPlan, address: str | None) -> None:
    """A plan whose model actors would wait for GPUs (``--require-gpu``) on a Ray this process started
    itself, which no node can ever join: they would only wait out :data:`REQUIRE_GPU_WAIT_SECONDS`.

    Raises:
        RequestError: (``--require-gpu``) as above.
    """
    if plan.wait_for_gpus and on_own_ray(address):
        raise RequestError("--require-gpu", _NO_GPU_HERE)


_NO_GPU_HERE: Final[str] = ("this machine has no GPU, and the local Ray this run starts can never gain one: run on "
                            "a cluster with GPU nodes (--address), or leave --require-gpu out to run the model on CPU")


def refuse_require_gpu_here(require_gpu: bool, spec: ModelSpec, address: str | None) -> None:
    """``--require-gpu`` on a machine where Ray finds no GPU (:func:`local_gpu_possible`), on a Ray this process
    starts itself: refused before the search or any data is read (:func:`refuse_waiting_on_own_ray` refuses
    the rest once Ray's own count is known).

    Raises:
        RequestError: (``--require-gpu``) as above.
    """
    if require_gpu and spec.model != NOOP_MODEL and not local_gpu_possible() and on_own_ray(address):
        raise RequestError("--require-gpu", _NO_GPU_HERE)


def _configured(ds: Any) -> Any:
    """``ds`` with rsflow's Ray Data settings (for it and every stage built on it; other datasets keep
    theirs): per-operator resource reservation off, and blocks of at most :data:`_MAX_BLOCK_BYTES`.

    With reservations on, each operator is held to its reserved share of the CPUs plus what the
    shared pool gives it: on 2 CPUs the read stage ran one task at a time, backpressured
    ("ResourceBudget") while the other CPU sat idle, because the planning, model and interpret/write
    operators each kept a share. Without them, reads take every CPU slot the other stages leave
    (`TaskPoolStrategy(size=read_max)` still caps them) and the object-store limit still
    backpressures them: 270 -> 340 tiles/s on the bench's read path (2 cores, 336 px).

    A read task writes its chips out in blocks of at most :data:`_MAX_BLOCK_BYTES` as it goes,
    instead of gathering a whole planning unit (43 MB of 336 px chips with the no-op model) into one.
    """
    ds.context.op_resource_reservation_enabled = False
    ds.context.target_max_block_size = _MAX_BLOCK_BYTES
    shorten_task_wait()
    return ds


RAY_DATA_TASK_WAIT_SECONDS = 0.02
"""How long Ray Data's streaming executor waits on its running tasks before it looks at them again
(:func:`shorten_task_wait`)."""


def shorten_task_wait() -> None:
    """Make Ray Data's streaming executor notice a finished task within :data:`RAY_DATA_TASK_WAIT_SECONDS`
    instead of 0.1 s, in this (the driver's) process.

    Each step of the executor's loop waits on its running tasks with ``ray.wait(all of them,
    num_returns=all, timeout=WAIT_FOR_TASK_COMPLETION_TIMEOUT_S)``: unless every task is done, it sees
    a task that finished (and starts the next one in its CPU slot) only when the 0.1 s are up. Ray Data
    submits no more tasks than there are slots, so each slot idles up to 0.1 s after every task: the
    known gaps of ray-project/ray#42377 and #45934, where the maintainers' and reporters' fix is a
    shorter wait. On the bench's read path (2 cores, 20,000 px scene, a read task per planning unit of
    about 0.4 s) each read worker sat idle about 1.5 s of a 7 s run; with 0.02 s (and the no-op model's
    interpret tasks already batched, :func:`interpret_batch_rows`) single runs went from about 520 to
    560-590 tiles/s.

    Ray Data has no setting for it: this sets the module constant its loop reads on every step (Ray is
    pinned, and a test checks that the loop still reads it). A shorter wait costs the driver more
    steps of the loop while tasks run.
    """
    from ray.data._internal.execution import streaming_executor_state as state

    current = getattr(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", None)
    if isinstance(current, int | float) and current > RAY_DATA_TASK_WAIT_SECONDS:
        state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = RAY_DATA_TASK_WAIT_SECONDS


def add_read_stage(
    ds: Any, *, max_nodata: float, size_px: int, read_max: int, block_tiles: int,
    resources: dict[str, float] | None = None,
) -> Any:
    """The read stage of the region job: tile rows -> rows with the chip as a uint8 ``image`` tensor.

    CPU tasks (at most ``read_max`` at once) running :func:`rsflow.read.read_blocks`. The chip travels
    on to the model actors as a ``[size, size, 3]`` uint8 Arrow tensor column: never encoded to an
    image format and decoded again.
    """
    return ds.map_batches(
        read_blocks,
        # A whole planning unit per task (no batch size: so that Ray Data fuses planning into it), read
        # and yielded a block's worth of chips at a time: each output block is then one Arrow chunk,
        # which the model actors take as a numpy view (rows gathered from calls of 8 tiles were
        # copied into one array there, 43 MB a block).
        fn_kwargs={"max_nodata": max_nodata, "gdal_options": GDAL_REMOTE_OPTIONS,
                   "tiles_per_block": read_batch_tiles(size_px, block_tiles)},
        batch_size=None,
        **read_task_args(size_px=size_px, block_tiles=block_tiles, read_max=read_max, resources=resources),
    )


def read_task_args(*, size_px: int, block_tiles: int, read_max: int, resources: dict[str, float] | None) -> dict[str, Any]:
    """Ray arguments of a read task, which the planning step shares so that Ray Data fuses the two
    into one task per planning unit (plan it, then read it): no planning operator holding CPU slots
    while reads wait, and no tile rows through the object store between them."""
    from ray.data import TaskPoolStrategy

    batch = read_batch_tiles(size_px, block_tiles)
    return {
        "num_cpus": 1,
        "compute": TaskPoolStrategy(size=read_max),
        "resources": resources or None,
        # GDAL's block cache plus the batch's chip buffers. Declaring it also keeps Ray from
        # fusing reads into the model actors: the two stages must stay separate to overlap.
        "memory": _READ_TASK_MEMORY_BYTES + 2 * batch * size_px**2 * 3,
    }


def add_model_stage(
    ds: Any,
    *,
    spec: ModelSpec,
    prompts: Sequence[Any],
    actors: int,
    gpus: int,
    region_adapter: str | None = None,
    row_prompts: bool = False,
    max_actors: int | None = None,
    resources: dict[str, float] | None = None,
) -> Any:
    """The infer stage of every job: ``ds.map_batches(ModelRunner)`` on a pool of model actors.

    Args:
        ds: rows with ``tile_id``, ``image``, ``status`` (see :mod:`rsflow.models.runner`).
        spec: the model.
        prompts: ``TaskPrompt`` values asked of every row.
        actors: model actors in the pool (one GPU each when ``gpus``); its minimum when ``max_actors``.
        gpus: GPUs in the cluster (0: actors on CPU).
        region_adapter: named adapter answering region-caption prompts.
        row_prompts: rows carry their own prompts (``ModelRunner`` ``row_prompts`` column).
        max_actors: the pool autoscales from ``actors`` up to this many (default: a fixed pool).
        resources: custom Ray resources each actor asks for, e.g. ``{"rsflow_gpu_node": 0.001}`` to
            place it on a GPU node (see :mod:`rsflow.placement`).

    Returns:
        The dataset of model rows (one per row and prompt).
    """
    from ray.data import ActorPoolStrategy

    if spec.model == NOOP_MODEL:  # its actors need no torch: they start in a fraction of a second
        from rsflow.models.slots import NoopRunner as runner_class
    else:
        from rsflow.models.runner import ModelRunner as runner_class

    kwargs: dict[str, Any] = {"spec": spec, "prompts": prompts, "region_adapter": region_adapter}
    if row_prompts:
        kwargs["row_prompts"] = True
    if max_actors is None or max_actors == actors:
        pool = ActorPoolStrategy(size=actors)
    else:
        pool = ActorPoolStrategy(min_size=actors, max_size=max_actors)
    return ds.map_batches(
        runner_class,
        compute=pool,
        fn_constructor_kwargs=kwargs,
        # Tiles per actor call: the prompt batch size given, else a block (the actor picks its own
        # prompts per generate call from its device's free memory); the no-op model takes each block
        # whole (its blocks are larger: slicing them into calls only cost copies).
        batch_size=None if spec.model == NOOP_MODEL else spec.batch_size or _MODEL_TILES_PER_BLOCK,
        num_gpus=1 if gpus and spec.model != NOOP_MODEL else None,
        num_cpus=model_actor_cpus(spec),
        resources=resources or None,
    )


def model_actor_cpus(spec: ModelSpec) -> float:
    """CPUs a model actor asks Ray for: one (it feeds the GPU, or is the model on a CPU); none for the
    no-op model, whose actor only shapes rows, so the reads it is measured against get every CPU."""
    return 0.0 if spec.model == NOOP_MODEL else 1.0


#: Per image-read task: decoding buffers plus a batch of 8 images of up to 1024 x 1024 RGB.
_IMAGE_TASK_MEMORY_BYTES = 160 * 1024**2 + 8 * 3 * 1024**2


def infer_images(
    rows: Sequence[dict[str, Any]],
    *,
    spec: ModelSpec,
    model_actors: int | None = None,
    read_workers: int | None = None,
    address: str | None = None,
    require_gpu: bool = False,
) -> Iterator[dict[str, Any]]:
    """Images from files through the region job's infer stage; yields the model rows batch by batch.

    ``from_items(rows) -> map_batches(read_image_batch) (CPU tasks) -> add_model_stage`` (the same
    ``ModelRunner`` actors as the region job, each row asking its own prompts).

    Args:
        rows: one per image: ``tile_id`` (str, unique), ``image_path`` (a local file),
            ``row_prompts`` (list of ``{"task", "prompt", "key"}``), plus any columns to carry along.
        spec: the model.
        model_actors: model actors (default: one per GPU, else 1).
        read_workers: most concurrent read tasks (default: the CPUs the actors leave).
        address: Ray address (default: ``RAY_ADDRESS``, else a local Ray).

    Yields:
        Model-stage batches as dicts of numpy arrays (see :mod:`rsflow.models.runner`), plus
        ``image_width``/``image_height`` in pixels; rows whose image cannot be read have
        ``status="failed"``, ``stage="read"`` and the reason.
    """
    import ray
    from ray.data import TaskPoolStrategy

    from rsflow.evaluate.images import read_image_batch

    if not rows:
        return
    _ensure_ray(address)
    gpus, actors, read_max, waiting = _cluster_shape(model_actors, read_workers,
                                                     require_gpu=require_gpu and spec.model != NOOP_MODEL,
                                                     address=address)
    ds = _configured(ray.data.from_items(list(rows)))
    ds = ds.map_batches(
        read_image_batch,
        batch_size=8,
        num_cpus=1,
        compute=TaskPoolStrategy(size=read_max),
        memory=_IMAGE_TASK_MEMORY_BYTES,  # also keeps reads out of the model actors (they must overlap)
    )
    ds = add_model_stage(ds, spec=spec, prompts=[], actors=actors, gpus=gpus, row_prompts=True)
    with bounded_gpu_wait(ds, waiting):
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _profiles_for(request: RegionRequest, items: list[dict[str, Any]]) -> dict[str, SourceProfile]:
    """One profile per collection present, resolved before any tile work (a missing one is a
    user error)."""
    collections = sorted({i.get("collection") or "" for i in items})
    profiles = {c: resolve_profile(request.stac, c, request.profile) for c in collections}
    # With --collections the request check has the profile read one of them; without, it must fit an item.
    if request.profile is not None and items and not request.collections and request.profile not in {
        p.name for p in profiles.values()
    }:
        raise RequestError("--profile", f"profile {request.profile!r} reads collection "
                                        f"{load_profiles()[request.profile].collection!r}, which none of the "
                                        f"{len(items)} items found is in ({', '.join(collections)})")
    for profile in profiles.values():
        check_signing(profile)
    return profiles


def run_region(
    request: RegionRequest, *, address: str | None = None, items: Sequence[dict[str, Any]] | None = None
) -> RunResult:
    """Run one region job to a committed GeoParquet dataset.

    Args:
        request: the validated request.
        address: Ray address (default: ``RAY_ADDRESS``, else a local Ray).
        items: STAC items (dicts) already searched by the caller, e.g. the monitor's items not yet
            processed; when given, the request's source is not searched again and exactly these
            items are planned (an empty list writes an empty dataset). Default: search the request.

    Raises:
        RequestError: a bad request found after parsing (unknown profile, model without size).
        SourceError: the STAC source could not be searched.
    """
    import ray

    started = datetime.now(UTC)
    t0 = time.perf_counter()
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"

    # Model first: its input size is the default tile size, and a bad model fails before search.
    spec: ModelSpec = request.model
    refuse_require_gpu_here(request.placement.require_gpu, spec, address)
    if request.engine == "vllm":  # vLLM missing, or a model it cannot load: refused before search
        check_vllm_available()
        check_vllm_spec(spec)
    resolve_adapter(spec)  # a typo in --adapter must not wait for a model to be built or fetched
    resolve_model_dir(spec)
    tile_spec = request.tile.resolved(model_input_size(spec))
    card = model_card(spec)
    mid = model_id(spec)
    prompt_format = resolve_prompt_format(spec)
    inputs = request.inputs
    prompts = inputs.prompts(request.tasks, prompt_format)  # also refuses a task the family cannot do
    # after the checks: a refused request is its one error line, not a demo-model warning and then the line
    if card.get("kind") == "smoke":
        logger.warning("model %s is a SMOKE model: %s", mid, card.get("note", "its text is meaningless"))
    elif card.get("kind") == "demo":
        logger.warning("model %s is a DEMO model: %s", mid, card.get("note", "not for real use"))
    use = dict(request.task_adapters)
    prompts = [dataclasses.replace(p, adapter=use.get(p.task)) for p in prompts]
    regions = [(r.region_id, shapely.to_wkb(r.geometry)) for r in inputs.regions]

    # before the search: a --resume that differs from its run, or has nothing to do, says so at once
    resume = _resume_source(request) if request.resume else None
    if resume is not None and resume.committed and resume.failed_tiles == 0:
        logger.warning("--resume: %s is complete with no failed tile: nothing to do", request.output)
        with fsspec.open(f"{request.output.rstrip('/')}/{out.MANIFEST_NAME}", "r") as fh:
            return RunResult(output=request.output, manifest=json.load(fh))

    t_search = time.perf_counter()
    if items is None:
        found = search_items(
            SearchQuery(
                stac=request.stac,
                collections=request.collections,
                intersects=mapping(search_geometry(request.aoi)),
                datetime=request.datetime,
                max_cloud=request.max_cloud,
                max_items=request.max_items,
            )
        )
        # Items the search refused (no geometry or assets, an id another item has) are failed rows too.
        items = [*found.items, *({**item, REFUSED_KEY: reason} for item, reason in found.refused)]
        items_given = False
        search_record: dict[str, Any] = {
            "items": len(found.items), "refused": len(found.refused), "duplicates": found.n_duplicates,
            "cloud_filtered": found.n_cloud_filtered, "max_items": request.max_items,
            "reached_max_items": found.reached_max_items,
        }
    else:
        items = list(items)
        items_given = True
        search_record = {"items": len(items), "given_by_caller": True}
    search_seconds = time.perf_counter() - t_search
    logger.info("search: %d items in %.1f s%s", len(items), search_seconds,
                " (given by the caller)" if items_given else "")
    if not items and not items_given:  # an empty dataset is still written (a monitor's quiet day), but say why
        minx, miny, maxx, maxy = request.aoi.bounds
        logger.warning("the search found no item in %s for the AOI %.4f,%.4f,%.4f,%.4f (lon,lat order), datetime "
                       "%s, collections %s: the dataset will be empty", request.stac, minx, miny, maxx, maxy,
                       request.datetime or "any", ",".join(request.collections) or "any")
    profiles = _profiles_for(request, items)
    # Planned on the driver from metadata (proj:* fields, else file headers) before any pixel is read:
    # the tile count for --max-tiles, and (once the cluster's read slots are known) the planning units
    # (rectangles of tiles, a read task each) that the cluster plans again in parallel.
    item_offsets: list[tuple[str, list[tuple[int, int]]]] = []
    n_tiles, per_unit = 0, tiles_per_block(tile_spec.size_px, model=spec.model != NOOP_MODEL)
    refused: list[RequestError] = []
    href_policy = HrefPolicy.for_catalog(request.stac, request.allowed_hosts)
    for item in items:
        profile = profiles.get(item.get("collection") or "")
        opener = header_opener(profile, href_policy) if profile is not None else None
        try:  # an item that cannot be planned here gets no offsets: its read task records why
            offsets = [] if item.get(REFUSED_KEY) else tile_offsets(item, profiles, tile_spec, request.aoi, opener)
        except RequestError as exc:  # e.g. --gsd on an item in degrees: that item fails (planning says why)
            refused.append(exc)
            offsets = []
        n_tiles += len(offsets)
        if n_tiles > request.max_tiles:
            raise RequestError(
                "--max-tiles",
                f"the AOI plans more than {request.max_tiles} tiles ({n_tiles}+ counted over {len(items)} items); "
                "shrink the AOI or the date range, or raise --max-tiles",
            )
        item_offsets.append((json.dumps(item), offsets))
    if refused and len(refused) == len(items):  # the request cannot work for any of them: say so first
        raise refused[0]

    staging = out.staging_path(request.output, run_id)
    manifest: dict[str, Any] = {
        "run_id": run_id,
        "status": "running",
        "started": started.isoformat(),
        "request": request.to_json(),
        "tile_spec": {"size_px": tile_spec.size_px, "overlap_px": tile_spec.overlap_px, "gsd_m": tile_spec.gsd_m},
        "model": {"id": mid, "card": card, "smoke": card.get("kind") == "smoke", "demo": card.get("kind") == "demo"},
        "prompt_format": prompt_format,
        "engine": request.engine,
        "prompts": [{"task": p.task, "prompt": p.prompt, "key": p.key, "adapter": p.adapter} for p in prompts],
        "profiles": {c: p.name for c, p in profiles.items()},
        "items": [{"id": i["id"], "collection": i.get("collection"), "datetime": i.get("properties", {}).get("datetime")} for i in items],
        "items_given": items_given,
        "search": search_record,
        "versions": package_versions(),
        "columns": out.RESULT_COLUMNS,
    }
    finished = False
    try:
        t_pipe = time.perf_counter()
        sink = out.GeoParquetDatasink(staging, split_objects=request.merge_iou is not None)
        # A run that replaces a committed output (--overwrite, or --resume of a committed run, directly or
        # through an interrupted --resume of one) may commit over it; a --resume of this run may too.
        replaces = request.overwrite or (resume is not None and (resume.committed or resume.replaces_committed))
        parts_dir = f"{staging.rstrip('/')}/{out.PARTS_DIR}"
        done_tiles: set[str] = set()
        if resume is not None:
            done_tiles = out.carry_over(resume, staging)
            manifest["resumed_from"] = {"directory": resume.directory, "committed": resume.committed,
                                        "tiles_carried": len(done_tiles)}
            logger.info("--resume: %d tiles carried over from %s; the rest run now", len(done_tiles),
                        resume.directory)
        # Only now does this staging directory stand for the run: written before the carry-over, a resume
        # killed during it left an empty directory that the next --resume continued (carrying nothing) and
        # whose commit then deleted the earlier run holding the finished rows.
        _write_resume_file(staging, run_id, request, replaces_committed=replaces)
        if items:
            _ensure_ray(address)
            plan = plan_cluster(
                _cluster_nodes(), request.placement, model_actors=request.model_actors,
                read_workers=request.read_workers, model_cpus=model_actor_cpus(spec),
                model_needs_gpu=spec.model != NOOP_MODEL,
            )
            refuse_waiting_on_own_ray(plan, address)
            check_output_shared(staging)
            manifest["placement"] = plan.to_json()
            logger.info("placement: %s", manifest["placement"])
            call_tiles = read_batch_tiles(tile_spec.size_px, per_unit)
            unit_size = unit_tiles(per_unit, n_tiles - len(done_tiles), plan.read_max, call_tiles=call_tiles)
            units = [{"item_json": item_json, "rows": list(u[0]) if u else None, "cols": list(u[1]) if u else None,
                      "first_unit": k == 0}
                     for item_json, offsets in item_offsets
                     for k, u in enumerate(plan_units(offsets, per_unit, unit_size))]
            manifest["planning"] = {"units": len(units), "unit_tiles": unit_size, "block_tiles": per_unit,
                                    "read_call_tiles": call_tiles}
            logger.info("planning: %s", manifest["planning"])
            ds = _configured(ray.data.from_items(units, override_num_blocks=len(units)))  # a planning task per unit
            ds = ds.flat_map(
                _plan_item,
                fn_kwargs={
                    "gdal_options": GDAL_REMOTE_OPTIONS,
                    "profiles": profiles,
                    "spec": tile_spec,
                    "aoi_wkb": shapely.to_wkb(request.aoi),
                    "regions": regions,
                    "regions_only": set(request.tasks) == {"region-caption"},
                    "href_policy": href_policy,
                    "skip_tile_ids": frozenset(done_tiles),
                },
                # CPU nodes only (see rsflow.placement); fused with the read stage
                **read_task_args(size_px=tile_spec.size_px, block_tiles=per_unit, read_max=plan.read_max,
                                 resources=plan.read_resources),
            )
            ds = add_read_stage(ds, max_nodata=request.max_nodata, size_px=tile_spec.size_px, block_tiles=per_unit,
                                read_max=plan.read_max, resources=plan.read_resources)
            ds = (add_vllm_stage if request.engine == "vllm" else add_model_stage)(
                ds, spec=spec, prompts=prompts, region_adapter=use.get("region-caption"), actors=plan.min_actors,
                max_actors=plan.max_actors, gpus=plan.gpus or plan.actor_gpus, resources=plan.model_resources,
            )
            ds = ds.map_batches(interpret_batch, batch_format="pandas", fn_kwargs={"classes": inputs.classes},
                                batch_size=interpret_batch_rows(spec, call_tiles * len(prompts)))
            # Rows land in the staging parts as their tasks finish (with a model, a block at a time; with the
            # no-op model, 512 rows or more), one file per task: a killed run keeps them for --resume.
            parts_sink = out.RawPartsSink(parts_dir)
            carried_rows = out.count_part_rows(parts_dir) if done_tiles else 0
            with bounded_gpu_wait(ds, plan.wait_for_gpus):
                ds.write_datasink(parts_sink)
            manifest["rows_run_now"] = int(parts_sink.rows)
            n_rows = out.count_part_rows(parts_dir)  # one read of the parts' footers, for the check and the sort
            check_parts_visible(parts_dir, written=parts_sink.rows, carried=carried_rows, visible=n_rows)
        else:
            n_rows = None
        fs_parts, parts_root = fsspec.core.url_to_fs(parts_dir)
        if fs_parts.exists(parts_root) and fs_parts.find(parts_root):
            # The final pass: every finished row (carried over or new), in Hilbert order, as GeoParquet:
            # sorted here when it fits in memory, else by a Ray Data sort into files of ROWS_PER_FILE.
            n_rows = out.count_part_rows(parts_dir) if n_rows is None else n_rows
            if n_rows <= _DRIVER_SORT_ROWS:
                sink.write_sorted_parts(parts_dir)
            else:
                _ensure_ray(address)
                files = math.ceil(n_rows / out.ROWS_PER_FILE)
                ray.data.read_parquet(parts_dir, file_extensions=["parquet"]).repartition(files).sort(
                    "_hilbert"
                ).write_datasink(sink)
            # the parts stay until the manifest is written: a failure before then leaves them to --resume
        fs_files = list(sink.summary.files)
        object_files, n_objects = [], 0
        if request.merge_iou is not None:
            object_files, n_objects = out.merge_object_files(staging, request.merge_iou)
        else:
            n_objects = sink.summary.objects
        fs_files = [*fs_files, *object_files]
        for name in out.remove_unfinished(staging):
            logger.warning("removed %s, left by a write task that was killed (Ray ran it again)", name)
        if not fs_files:
            fs, root = fsspec.core.url_to_fs(staging)
            fs.makedirs(root, exist_ok=True)
            fs_files = [out.write_empty(staging)]
        pipeline_seconds = time.perf_counter() - t_pipe
        preview = None
        if request.preview:
            preview = _write_preview(staging, title=f"rsflow: {request.output.rstrip('/').rsplit('/', 1)[-1]}")
        s = sink.summary
        counts = tile_counts(s, items_found=len(items))
        manifest.update(
            status="complete",
            finished=datetime.now(UTC).isoformat(),
            files=sorted(fs_files),
            geo=out.dataset_geo(staging, fs_files),
            counts={
                **counts,
                "rows_written": s.rows + (n_objects if request.merge_iou is not None else 0),
                "objects_detected": s.objects,
                "objects_written": n_objects,
                "rows_by_status": s.rows_by_status,
            },
            failures=failure_list(s, "failed"),
            skipped=failure_list(s, "skipped"),
            lists_truncated_at=LISTED_FAILURES,
            preview=preview,
            throughput={
                "tiles_per_second": round(counts["tiles_ok"] / pipeline_seconds, 3) if pipeline_seconds else None,
                "prompts_per_second": round(s.rows_by_status.get("ok", 0) / pipeline_seconds, 3)
                if pipeline_seconds
                else None,
            },
            timings={
                "search_seconds": round(search_seconds, 3),
                "pipeline_seconds": round(pipeline_seconds, 3),
                "read_seconds_sum": round(s.read_seconds, 3),
                "infer_seconds_sum": round(s.infer_seconds, 3),
            },
        )
        t_commit = time.perf_counter()
        manifest["timings"]["total_seconds"] = round(time.perf_counter() - t0, 3)
        manifest["driver_max_rss_mb"] = _max_rss_mb()
        out.write_manifest(staging, manifest)
        finished = True  # from here on, staging holds the complete result: it is never deleted unless committed
        fs, root = fsspec.core.url_to_fs(staging)
        fs.rm(f"{root.rstrip('/')}/{out.RESUME_NAME}")  # before the parts: never a resumable run without them
        if fs_parts.exists(parts_root):
            fs_parts.rm(parts_root, recursive=True)
        out.commit(staging, request.output, overwrite=replaces)
        if resume is not None and not resume.committed:
            out.discard(resume.directory)  # its rows are in the committed output now
        try:  # tidying after the commit: the run has succeeded whatever happens here
            for stale in (out.discard_superseded(request.output, run_id) if resume is not None else []):
                logger.info("removed %s, an interrupted run this one supersedes", stale)
        except OSError as exc:
            logger.warning("could not remove the superseded staging directories of %s: %s", request.output, exc)
        logger.info("committed %s in %.2f s", request.output, time.perf_counter() - t_commit)
    except BaseException as exc:
        if finished and not isinstance(exc, FileExistsError):  # commit's FileExistsError says so itself
            logger.error("the run finished but was not committed (%s): the complete result is in %s; an object "
                         "store's %s may hold part of it. Move the files of %s into %s, _manifest.json last",
                         f"{type(exc).__name__}: {exc}", staging, request.output, staging, request.output)
        _keep_or_discard(staging, result_left=finished)
        raise
    return RunResult(output=request.output, manifest=manifest)


_SHARED_STORAGE_HINT: Final[str] = ("OUTPUT must be storage that this driver and every node of the Ray cluster "
                                     "share: a shared filesystem mounted at the same path, or s3://, gs://, az://")


def check_parts_visible(parts_dir: str, *, written: int, carried: int, visible: int) -> None:
    """After the stages: every row the write tasks reported is readable here, where the final pass reads them.

    Write tasks run on any node (a cluster's head often runs none): a local OUTPUT that is not shared, or
    ``memory://`` (each process its own), kept their rows where this driver cannot see them, and the run
    committed a "complete" dataset without them, exit 0.

    Args:
        parts_dir: the staging parts.
        written: rows the write tasks reported.
        carried: rows carried over by ``--resume`` before the stages.
        visible: rows this process reads in the parts now (:func:`rsflow.output.count_part_rows`).

    Raises:
        RequestError: (``--output``) fewer rows visible than written; the staging directory is kept.
    """
    visible -= carried
    if visible < written:
        raise RequestError("--output", f"the write tasks wrote {written} rows into {parts_dir}, but this process "
                                       f"can read {max(visible, 0)} of them: {_SHARED_STORAGE_HINT} (memory:// is "
                                       "private to each process)")


def check_output_shared(staging: str) -> None:
    """Before the stages, on a cluster of several nodes: every node sees the local staging directory (its
    ``_resume.json``), or the rows its write tasks keep would be lost to the final pass (see
    :func:`check_parts_visible`, which finds it only after all the inference). A node that does not answer
    within a minute is not judged; an object store needs no check.

    Raises:
        RequestError: (``--output``) a node cannot see the staging directory, naming it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fs, root = fsspec.core.url_to_fs(staging)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    marker = posixpath.join(root, out.RESUME_NAME)
    sees = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
    refs = {n["NodeManagerAddress"]: sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(marker) for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=60)
    blind = []
    for address, ref in refs.items():
        try:
            if ref in ready and not ray.get(ref):
                blind.append(address)
        except ray.exceptions.RayError:  # the node went away (an autoscaler removing an idle one): not judged
            continue
    blind.sort()
    if blind:
        raise RequestError("--output", f"{root} is not shared with every node: {len(blind)} of {len(nodes)} "
                                       f"nodes cannot see it ({', '.join(blind[:3])}); {_SHARED_STORAGE_HINT}")


LISTED_FAILURES: Final[int] = 1000
"""The manifest lists at most this many failed rows, and as many skipped (the dataset has them all)."""


def tile_counts(s: out.SinkSummary, *, items_found: int) -> dict[str, int]:
    """The manifest's tile counts from what the write tasks saw: every planned tile is exactly one of ok,
    skipped or failed. A tile is failed when any of its rows failed: one whose first prompt was answered
    and another's generation failed had been counted as ok and as failed."""
    tiles = s.tiles_by_status
    plan_failed = {f["tile_id"] for f in s.failures if f["stage"] == "plan"}  # an item, or a unit of one
    failed_tiles = {f["tile_id"] for f in s.failures if f["status"] == "failed"} - plan_failed
    partly_failed = failed_tiles - {f["tile_id"] for f in s.failures if f["status"] == "failed" and f["primary"]}
    read_failed = {f["tile_id"] for f in s.failures if f["status"] == "failed" and f["stage"] == "read"}
    planned = sum(tiles.values()) - len(plan_failed)
    return {
        "items_found": items_found,
        "items_failed": len({f["item_id"] for f in s.failures if f["stage"] == "plan"}),
        "tiles_planned": planned,
        "tiles_read": planned - len(read_failed),
        "tiles_skipped": tiles.get("skipped", 0),
        "tiles_failed": len(failed_tiles),
        "tiles_ok": tiles.get("ok", 0) - len(partly_failed),
    }


def failure_list(s: out.SinkSummary, status: str) -> list[dict[str, Any]]:
    """The first :data:`LISTED_FAILURES` rows of ``status`` (``failed`` or ``skipped``), as the manifest lists them."""
    return [{k: v for k, v in f.items() if k != "primary"}
            for f in itertools.islice((f for f in s.failures if f["status"] == status), LISTED_FAILURES)]


def _keep_or_discard(staging: str, *, result_left: bool) -> None:
    """After a run failed or was interrupted (Ctrl-C included): keep its staging directory where it holds
    work, else delete it. A complete result (its manifest written) that could not be committed stays
    where the error says (``result_left``); rows the stages finished (``_parts/``, kept until the manifest
    is written) stay for ``--resume``, which continues from them. Nothing there is read as a result: a
    dataset exists only once committed."""
    if result_left:
        return
    try:
        fs, root = fsspec.core.url_to_fs(staging)
        parts = f"{root.rstrip('/')}/{out.PARTS_DIR}"
        kept = fs.exists(f"{root.rstrip('/')}/{out.RESUME_NAME}") and fs.exists(parts) and any(
            posixpath.basename(p).startswith("raw-") for p in fs.find(parts))
    except Exception:  # noqa: BLE001 - cleanup must never hide the run's own error
        kept = False
    if kept:
        logger.warning("the run stopped with finished rows in %s: `--resume` continues from them", staging)
    else:
        out.discard(staging)


_BLOCK_PIXELS = 128 * 336 * 336
"""Chip pixels per planning block with the no-op model: 128 LLaVA-1.5 tiles (about 43 MB of RGB chips,
read in calls of at most :data:`_MAX_BLOCK_BYTES`). Bigger units meant fewer Ray tasks and fewer internal
blocks decoded by two read workers (a block row straddled by two tile rows of different planning units):
on 2 cores the read path went from 0.34x to 0.53x of bare reads going from 32 to 128 tiles, and to 0.65x
at 256, where the read workers' memory doubled (units now also grow taller without growing wider:
:func:`unit_tiles`)."""


_MAX_BLOCK_BYTES = 16 * 1024**2
"""Largest block a stage of rsflow's datasets emits (Ray Data's ``target_max_block_size``; its default is
128 MiB). A read task builds each output block in its own memory and then copies it into the object store:
with units of 128 chips of 336 px, that was 43 MB held twice per read worker. At 16 MiB the no-op read
worker on a 20,000 px scene peaked about 50 MiB lower, with the same number of tasks; model-run blocks (32
chips of 336 px, 11 MB) and 64 px blocks (12.6 MB) are below it and unchanged."""


_MODEL_TILES_PER_BLOCK = 32
"""Tiles per block when a model answers: the unit in which rows stream to the staging parts (and
so what a killed run loses at most), and seconds of model work, far above Ray's per-task cost."""


_UNITS_PER_READ_SLOT = 6
"""Planning units a run aims for per read slot (:func:`unit_tiles`): enough that every read worker has
work until near the end, few enough that units are taller than a block."""

_MAX_UNIT_BLOCKS = 4
"""A planning unit holds about this many blocks of tiles at most (whole rows of a band, split evenly): its
tile rows are built at once in its read task, and a task that fails is retried whole."""


def unit_tiles(per_unit: int, tiles: int, read_slots: int, *, call_tiles: int) -> int:
    """Tiles per planning unit for a run of ``tiles`` tiles (still to read) on ``read_slots`` read slots,
    when a block holds ``per_unit`` tiles and a read call ``call_tiles`` (:func:`read_batch_tiles`).

    Where one read call's chips fill a block by themselves (``call_tiles < per_unit``: 336 px tiles with
    the no-op model), units aim at :data:`_UNITS_PER_READ_SLOT` per slot, between one block and about
    :data:`_MAX_UNIT_BLOCKS` blocks of tiles: a band of columns as wide as a near-square block of tiles,
    taller (:func:`rsflow.plan.plan_units`), whose read task yields a block at a time. Each internal
    block under the edge between two units is decoded twice, once by each unit's read task, so fewer,
    taller units decode less: on the 20,000 px bench scene (2 read slots, 512 px blocks) 12 units of 300
    tiles decode 1,845 internal blocks of each band file, which has 1,600, where 30 near-square units of
    128 decoded 1,980, and the read path ran at 586 instead of 515 tiles/s (medians of four runs each) on
    15 % less CPU.

    Elsewhere (a model's blocks of 32 tiles, small tiles with the no-op model) units stay one block: Ray
    Data adds a task's outputs to one block until the block exceeds its size limit, so a taller unit's
    smaller yields would leave as one large block, once all of them were read. So does a run small for
    its cluster.

    >>> unit_tiles(128, 3_600, 2, call_tiles=50), unit_tiles(128, 1_089, 14, call_tiles=50)
    (300, 128)
    >>> unit_tiles(128, 100_000, 2, call_tiles=50), unit_tiles(32, 100_000, 2, call_tiles=32)
    (512, 32)
    """
    if call_tiles >= per_unit:
        return per_unit
    wanted = math.ceil(max(0, tiles) / (_UNITS_PER_READ_SLOT * max(1, read_slots)))
    return min(_MAX_UNIT_BLOCKS * per_unit, max(per_unit, wanted))


def read_batch_tiles(size_px: int, block_tiles: int) -> int:
    """Tiles per call of the read UDF for blocks of ``block_tiles`` tiles of ``size_px``: ``block_tiles``
    when the block's RGB chips fit in :data:`_MAX_BLOCK_BYTES`, else the fewest tiles whose chips fill such
    a block (50 of 336 px), so that Ray Data emits each call's output as a block of its own (it adds
    calls' outputs to a block until the block exceeds the limit). Planning units grow taller than a block
    only in the second case (:func:`unit_tiles`), and are then read and yielded a call at a time."""
    chip = 3 * max(1, size_px) ** 2
    if block_tiles * chip <= _MAX_BLOCK_BYTES:
        return max(1, block_tiles)
    return max(1, min(block_tiles, math.ceil(_MAX_BLOCK_BYTES / chip)))


_NOOP_INTERPRET_ROWS = 512
"""Rows per interpret-and-write task with the no-op model (:func:`interpret_batch_rows`)."""


def interpret_batch_rows(spec: ModelSpec, block_rows: int) -> int | None:
    """Rows per task of the interpret-and-write step: ``None`` (each model block on its own) with a
    model; with the no-op model, :data:`_NOOP_INTERPRET_ROWS` or a block's rows (``block_rows``: tiles
    per block times prompts), whichever is more, so that a task always takes whole blocks.

    A model block is seconds of model work, so a task per block costs nothing that matters and each
    block's rows reach the staging parts (what ``--resume`` keeps of a killed run) as soon as they are
    answered. The no-op model answers a block of 50 chips of 336 px in milliseconds: a task per block
    (about 90 on the bench's 20,000 px scene) then takes a CPU slot from the reads for each, plus Ray
    Data's wait before it sees the task done. Gathering 512 rows per task cut them to 8 and took the
    read path from about 470 to 500 tiles/s (2 cores, 336 px; before :func:`shorten_task_wait`). Blocks of
    64 px tiles already hold 1,024 rows and go one to a task.
    """
    return max(_NOOP_INTERPRET_ROWS, block_rows) if spec.model == NOOP_MODEL else None


def tiles_per_block(size_px: int, *, model: bool = True) -> int:
    """Tiles per block after planning.

    With a model each block is one model-actor call and one staging file (and one read task: see
    :func:`unit_tiles`), 32 tiles
    (:data:`_MODEL_TILES_PER_BLOCK`). With the no-op model the work per tile is a read (well under a
    millisecond for small tiles), so Ray Data's per-task cost (tens of ms of scheduling on a busy
    node) would dominate: blocks then hold :data:`_BLOCK_PIXELS` worth of chips, 8 to 1024 tiles
    (64 px tiles: 1024 a block, 336 px: 128).
    """
    if model:
        return _MODEL_TILES_PER_BLOCK
    return max(8, min(1024, _BLOCK_PIXELS // max(1, size_px) ** 2))

REQUIRE_GPU_WAIT_SECONDS = 3600
"""How long the model actors of a ``--require-gpu`` run that started without GPUs wait for a GPU node
(Ray Data's ``wait_for_min_actors_s``, which holds the whole run until they are up) before the run
stops, naming the flag: a GPU node group that cannot grow would otherwise leave the run waiting for ever."""

_DRIVER_SORT_ROWS = 100_000
"""Result rows up to which the final pass sorts in the driver: about 100 MB of Arrow, plus one file
being written (``out.DRIVER_ROWS_PER_FILE``); larger outputs are sorted by Ray Data."""

_RESUME_KEYS = ("aoi", "collections", "datetime", "max_cloud", "max_items", "max_nodata", "model", "profile",
                "stac", "tasks", "inputs", "merge_iou", "task_adapters", "tile", "engine")
"""Request keys a ``--resume`` must repeat exactly (the rest, e.g. actors and placement, may change)."""
_RESUME_FLAGS = {
    "aoi": "--bbox/--intersects", "collections": "--collections", "datetime": "--datetime",
    "max_cloud": "--max-cloud", "max_items": "--max-items", "max_nodata": "--max-nodata", "profile": "--profile",
    "stac": "--stac", "tasks": "--tasks", "merge_iou": "--merge/--merge-iou", "engine": "--engine",
    "inputs": "the tasks' inputs (--question, --questions, --classes, --detect, --refer, --regions, --task-file)",
    "task_adapters": "the task file's adapters", "tile": "--tile-size/--overlap/--gsd",
}
"""The flags that set each of :data:`_RESUME_KEYS`, as a ``--resume`` refusal names them."""
_MODEL_FLAG_NAMES = {"adapters": "the task file's adapters"}
"""Model settings that no flag of their own name sets, as a ``--resume`` refusal names them."""
_RESUME_MODEL_FREE = ("batch_size",)
"""Model settings a ``--resume`` may change: ``--batch-size`` (resuming a run that ran out of memory with a
smaller batch is what resume is for; greedy answers do not depend on it beyond padding's rounding)."""


def _max_rss_mb() -> float:
    """The driver process's peak resident memory so far, in MiB (``getrusage``; the process's whole
    life, so a driver that ran several jobs reports the largest)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


def _write_resume_file(staging: str, run_id: str, request: RegionRequest, *, replaces_committed: bool) -> None:
    fs, root = fsspec.core.url_to_fs(staging)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/{out.RESUME_NAME}", "w") as fh:
        json.dump({"run_id": run_id, "request": request.to_json(), "replaces_committed": replaces_committed}, fh,
                  sort_keys=True, default=str)


def _resume_source(request: RegionRequest) -> out.ResumeSource:
    """The interrupted or partly failed run ``--resume`` continues, checked against this request.

    Raises:
        RequestError: (``--resume``) nothing to resume there, or a request that differs from the run's.
    """
    source = out.find_resumable(request.output)
    if source is None:
        raise RequestError("--resume", f"{request.output} holds no interrupted run and no finished one to complete")
    now = json.loads(json.dumps(request.to_json(), sort_keys=True, default=str))
    differs = [k for k in _RESUME_KEYS if _resume_value(k, now.get(k)) != _resume_value(k, source.request.get(k))]
    if "model" in differs:  # name the model flags that differ (--dtype, --max-new-tokens), not just "model"
        was, new = _resume_value("model", source.request.get("model")), _resume_value("model", now.get("model"))
        if isinstance(was, dict) and isinstance(new, dict):
            keys = sorted(k for k in {*was, *new} if was.get(k) != new.get(k))
            named = [_MODEL_FLAG_NAMES.get(k, f"--{k.replace('_', '-')}") for k in keys]
            differs[differs.index("model")] = "model (" + ", ".join(named) + ")"
    differs = [_RESUME_FLAGS.get(k, k) for k in differs]
    if differs:
        raise RequestError(
            "--resume", f"the request differs from the run being resumed in {', '.join(differs)}; repeat its flags"
        )
    return source


def _resume_value(key: str, value: Any) -> Any:
    """A request value as ``--resume`` compares it: a day, month or year written by an earlier rsflow
    ended at its last second (``...T23:59:59Z``), now at its last microsecond; the same period either way."""
    if key == "datetime" and isinstance(value, str) and value.endswith("T23:59:59Z"):
        return value[: -len("Z")] + ".999999Z"
    if key == "engine":  # the two engines' answers may differ (kernels, image handling): no mixing them
        return value or "transformers"  # a request written before --engine: the transformers engine
    if key == "model" and isinstance(value, dict):  # how many prompts share a generate call may change:
        return {k: v for k, v in value.items() if k not in _RESUME_MODEL_FREE}  # a smaller batch after an OOM
    return value


def _write_preview(directory: str, *, title: str) -> str | None:
    """The HTML map preview inside the output (``_preview.html``); a dataset too large for one page
    is not previewed, and a preview that fails for any reason is logged (the run still succeeds)."""
    import fsspec

    from rsflow.preview import write_preview

    fs, root = fsspec.core.url_to_fs(directory)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        logger.info("no preview for a remote output; run `rsflow preview` on a local copy")
        return None
    try:
        write_preview(root, f"{root}/{out.PREVIEW_NAME}", title=title)
    except RequestError as exc:
        logger.warning("preview not written: %s", exc)
        return None
    except Exception:  # a page is a convenience: it never fails a run whose rows are written
        logger.exception("preview not written (the run's result is complete without it)")
        return None
    return out.PREVIEW_NAME
