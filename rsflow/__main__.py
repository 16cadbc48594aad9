"""``python -m rsflow ...``: the ``rsflow`` command, where the console script is not on PATH (a job's
entrypoint in a bare environment, ``python -m`` under a specific interpreter)."""

import sys

from rsflow.cli import main

sys.exit(main())
