"""Monitor job: process only the scenes of an area published since the last run, report what changed.

Run it locally (an embedded Ray starts), on a cluster, or from a schedule (cluster/monitor-cronjob.yaml):

    python jobs/monitor_aoi.py --config monitors/port.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/monitor_aoi.py --config monitors/port.yaml

It is ``rsflow monitor run --config FILE``: exit code 0 when done (also when there was nothing new),
4 when it committed but some items failed (retried next time) or were given up, 2 for a bad config (one
line naming the key), 3 when another run of the monitor holds its lock, 5 when the STAC source could not
be searched.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the job runs from a copy of this repository; make the
# copied package importable even where rsflow is not installed on the cluster's Python.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsflow.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["monitor", "run", *sys.argv[1:]]))
