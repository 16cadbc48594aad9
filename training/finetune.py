"""Fine-tune a LLaVA on Ray Train: stage 1 (``align``, projector) or stage 2 (``instruct``, LoRA).

    python training/finetune.py --stage instruct --config training/configs/geochat.yaml [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python training/finetune.py --stage instruct --config training/configs/geochat.yaml \
        output=/shared/runs

``key=value`` overrides any config key (``lr=1e-4 workers=2 name=try2``). Relaunching the same
``output`` + ``name`` resumes from the last checkpoint, or does nothing when the run finished.

Exit codes: 0 done (a JSON summary on stdout); 2 bad input (one line on stderr naming the key);
1 anything unexpected (with its traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

# Under `ray job submit --working-dir .` the job runs from a copy of this repository; make the
# copied package importable even where rsflow is not installed on the cluster's Python.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsflow.errors import RequestError  # noqa: E402

logger = logging.getLogger("rsflow.finetune")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=("align", "instruct"),
                   help="align: projector only (LLaVA stage 1); instruct: LoRA (stage 2)")
    p.add_argument("--config", required=True, help="YAML file of FinetuneConfig keys (training/configs/)")
    p.add_argument("--data-actors", type=int, default=1,
                   help="Ray Data actors preparing rows (image decoding + tokenising)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rsflow.cli import check_ray_address
    from rsflow.finetune.config import load_config
    from rsflow.finetune.train import prepare_dataset, run_finetune

    try:
        check_ray_address(None)  # RAY_ADDRESS, or a `ray start` record, that nothing answers: one line, no wait
        config = load_config(args.config, args.overrides, defaults={"stage": args.stage})
        if config.stage != args.stage:
            overridden = any(o.partition("=")[0].strip().removeprefix("--").replace("-", "_") == "stage"
                             for o in args.overrides)
            raise RequestError("--stage", (
                f"is {args.stage}, but the override stage={config.stage} asks for {config.stage}; drop one of them"
                if overridden else f"{args.config} sets stage {config.stage!r}; run it with --stage "
                                   f"{config.stage}, or override stage={args.stage}"))
        if args.data_actors < 1:
            raise RequestError("--data-actors", f"must be >= 1, got {args.data_actors}")
        if (config.run_dir / "_done.json").is_file():
            result = run_finetune(config, None)  # type: ignore[arg-type]  # a finished run needs no data
        else:
            dataset, rows = prepare_dataset(config, args.data_actors)
            result = run_finetune(config, dataset, num_rows=rows, data_actors=args.data_actors)
    except RequestError as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
