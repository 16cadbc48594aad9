"""Region job: every task asked (caption by default; vqa, classify, detect, refer, region-caption) on every
tile of an area, written as GeoParquet.

Run it locally (an embedded Ray starts) or on a cluster:

    python jobs/caption_region.py --bbox -75.70,37.64,-75.66,37.67 --output out/demo
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/caption_region.py ...

Flags are those of ``rsflow region`` (``--help`` lists them).
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the job runs from a copy of this repository; make the
# copied package importable even where rsflow is not installed on the cluster's Python.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsflow.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["region", *sys.argv[1:]]))
