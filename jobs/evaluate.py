"""Evaluation job: one model on one published benchmark, with the papers' metrics.

Run it locally (an embedded Ray starts) or on a cluster:

    python jobs/evaluate.py --benchmark rsvqa-lr --data /data/RSVQA_LR --model MODEL --output out/lr
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py ...

Flags are those of ``rsflow eval`` (``--help`` lists them).
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the job runs from a copy of this repository; make the
# copied package importable even where rsflow is not installed on the cluster's Python.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
