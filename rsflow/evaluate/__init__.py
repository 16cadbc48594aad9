"""Evaluation on the papers' own benchmarks with their own metrics (``rsflow eval``).

- :mod:`~rsflow.evaluate.samples`: the one record type every loader produces (:class:`Sample`);
- loaders, one per distributed format: :mod:`~rsflow.evaluate.rsvqa` (RSVQA-LR/HR JSON),
  :mod:`~rsflow.evaluate.captions` (Karpathy-style caption JSON: UCM-captions, Sydney-captions, RSICD),
  :mod:`~rsflow.evaluate.scenes` (UCMerced / AID class folders), :mod:`~rsflow.evaluate.geochat_bench`
  (GeoChat-Bench referring/grounding and region captioning), :mod:`~rsflow.evaluate.demo` (rsflow's demo set);
- :mod:`~rsflow.evaluate.benchmarks`: the registry of benchmark names;
- :mod:`~rsflow.evaluate.metrics` (accuracy, confusion matrix, rotated-box acc@0.5) and
  :mod:`~rsflow.evaluate.caption_metrics` (pycocoevalcap);
- :mod:`~rsflow.evaluate.scoring`: answers read per benchmark and the run's metrics;
- :mod:`~rsflow.evaluate.run`: :func:`run_eval`, the command's one verb; :mod:`~rsflow.evaluate.report`
  and :mod:`~rsflow.evaluate.published`: the files it writes and the papers' numbers;
- :mod:`~rsflow.evaluate.images`: the read stage that feeds benchmark images to the region job's model actors.
"""

from rsflow.evaluate.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from rsflow.evaluate.run import EvalConfig, EvalResult, run_eval
from rsflow.evaluate.samples import Sample

__all__ = ["BENCHMARKS", "Benchmark", "EvalConfig", "EvalResult", "Sample", "get_benchmark", "run_eval"]
