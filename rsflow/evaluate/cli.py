"""``rsflow eval``: the subcommand's flags and what it prints (``jobs/evaluate.py`` is the same)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rsflow.errors import EXIT_OK, EXIT_PARTIAL, RequestError


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``rsflow`` subcommands."""
    from rsflow.evaluate.benchmarks import BENCHMARKS
    from rsflow.evaluate.caption_metrics import CAPTION_METRICS

    p: argparse.ArgumentParser = sub.add_parser(
        "eval",
        help="score a model on a published benchmark with the papers' own metrics",
        description="Run a model over a remote-sensing benchmark as its authors distribute it (RSVQA-LR/HR, "
        "UCM-captions, Sydney-captions, RSICD, UCMerced, AID, NWPU-RESISC45, GeoChat-Bench scenes, LRBEN/HRBEN, referring and region captioning, "
        "rsflow's demo set) through the region job's model actors, and write predictions (Parquet), metrics "
        "(JSON) and a table beside the published numbers (Markdown). Rerunning into the same --output "
        "reuses the predictions already written.",
    )
    b = p.add_argument_group("benchmark")
    b.add_argument("--benchmark", required=True, help=f"one of: {', '.join(BENCHMARKS)}")
    b.add_argument("--data", required=True, help="the benchmark's folder, as its authors distribute it")
    b.add_argument("--images", help="image folder, when it is not found under --data")
    b.add_argument("--split", help="split to score (default: the papers' test split of the benchmark)")
    b.add_argument("--question-types", help="RSVQA: comma-separated types to keep (default: all)")
    b.add_argument("--questions", help="geochat-lrben/-hrben: GeoChat-Bench's lrben.jsonl / hrben.jsonl, where it is "
                   "not in --data (the RSVQA folder its answers come from)")
    b.add_argument("--limit", type=_whole, help="score only N samples (a quick run), chosen with --seed")
    b.add_argument("--seed", type=_whole, default=0, help="seed of the --limit choice (default 0)")
    b.add_argument(
        "--metrics",
        help=f"caption benchmarks: comma-separated subset of {', '.join(CAPTION_METRICS)} "
        "(default: the paper's); METEOR runs Java",
    )
    b.add_argument(
        "--tokenizer", choices=["ptb", "simple"], default="ptb",
        help="caption tokenisation: pycocoevalcap's PTB tokenizer (Java, default) or a pure-Python stand-in",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, help="transformers LLaVA dir or hub id; 'demo' or 'smoke' built in")
    m.add_argument("--adapter", help="peft LoRA adapter dir or hub id")
    m.add_argument("--prompt-format", choices=["llava", "rsllava", "geochat"], help="conversation template family")
    m.add_argument("--vision-tower", help="local CLIP folder for original LLaVA-repository checkpoints")
    m.add_argument("--image-size", type=_whole, help="model input side in px (default: from the checkpoint)")
    m.add_argument("--image-aspect", choices=["pad", "crop"], help="pad images to square or centre-crop (default: the checkpoint's image_aspect_ratio, else pad)")
    m.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    m.add_argument("--attn-implementation", choices=["auto", "sdpa", "eager", "flash_attention_2"], default="auto")
    m.add_argument("--max-new-tokens", type=_whole, help="default: the benchmark's (GeoChat's eval: 256)")
    m.add_argument("--batch-size", type=_whole, help="prompts per generate call (default: the benchmark's; 8 for most)")
    r = p.add_argument_group("run")
    r.add_argument("--output", required=True, help="folder for predictions and metrics (an earlier run's resumes)")
    r.add_argument("--overwrite", action="store_true", help="discard an earlier run in --output instead of resuming")
    r.add_argument("--model-actors", type=_whole, help="model actors (default: one per GPU, else 1)")
    r.add_argument("--read-workers", type=_whole, help="max image read tasks (default: CPUs left)")
    r.add_argument("--require-gpu", action="store_true",
                   help="model actors wait for a GPU node instead of running on CPU when none has joined yet "
                        "(as the region job's --require-gpu)")
    r.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a cluster `ray start` started "
                   "on this machine, else a new local Ray; 'local': a new local Ray)")
    return p


def run_eval_command(args: argparse.Namespace) -> int:
    """Run ``rsflow eval`` from parsed flags; prints where the results went and the headline number."""
    from rsflow.evaluate.benchmarks import get_benchmark
    from rsflow.evaluate.run import EvalConfig, headline, run_eval
    from rsflow.models.spec import spec_from_flags

    bench = get_benchmark(args.benchmark)
    spec = spec_from_flags(
        args,
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else bench.max_new_tokens,
        batch_size=args.batch_size if args.batch_size is not None else bench.batch_size,
    )
    types = tuple(t.strip() for t in (args.question_types or "").split(",") if t.strip())
    if args.question_types is not None and not types:
        raise RequestError("--question-types", "give at least one type, e.g. presence,comp")
    config = EvalConfig(
        benchmark=args.benchmark,
        data=args.data,
        model=spec,
        output=args.output,
        images=args.images,
        split=args.split,
        question_types=types,
        questions=args.questions,
        limit=args.limit,
        seed=args.seed,
        metrics=tuple(m.strip() for m in (args.metrics or "").split(",") if m.strip()),
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        model_actors=args.model_actors,
        read_workers=args.read_workers,
        require_gpu=args.require_gpu,
    )
    result = run_eval(config, address=args.address)
    c = result.counts
    print(
        f"{args.benchmark}: {headline(result.metrics['metrics'])} on {c['samples']} samples "
        f"(inferred {c['inferred']}, reused {c['reused']}, failed {c['failed']}); wrote {', '.join(result.files)} "
        f"to {result.output}"
    )
    if c["failed"]:
        print(
            f"rsflow eval: {c['failed']} samples got no answer (scored as wrong); predictions.parquet gives each "
            "one's reason under 'error', and running the same command again retries them",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return EXIT_OK
