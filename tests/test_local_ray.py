"""The local Ray rsflow starts itself (no cluster address): object-store memory is freed promptly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_CHURN = textwrap.dedent(
    """
    import time

    import numpy as np
    import psutil
    import ray

    from rsflow.pipeline import _ensure_ray

    _ensure_ray(None)

    @ray.remote
    def churn(n):
        # 16 MiB blocks written one after the other, each spent before the next, as a read task's are
        me, shared = psutil.Process(), []
        for _ in range(n):
            ref = ray.put(np.ones(16 * 2**20, dtype=np.uint8))
            del ref
            time.sleep(0.03)
            shared.append(me.memory_info().shared)
        return shared

    shared = ray.get(churn.remote(40))
    print((shared[-1] - shared[0]) // 2**20)
    """
)


@pytest.mark.slow
def test_a_local_ray_reuses_the_memory_of_spent_blocks():
    """40 blocks of 16 MiB, one spent every ~40 ms: the writer maps a handful of blocks' worth of
    object-store pages, not one block's worth per block written (Ray's default 1 s free period let
    every block of the first second land on fresh pages: about 380 MiB here)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    done = subprocess.run([sys.executable, "-c", _CHURN], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mib = int(done.stdout.strip().splitlines()[-1])
    assert grown_mib <= 8 * 16, f"the writer mapped {grown_mib} MiB more object-store pages over 40 blocks"


def test_the_driver_notices_finished_ray_data_tasks_within_the_shortened_wait(ray_local):
    """Ray Data's executor loop waits on its running tasks with ``ray.wait(..., num_returns=all,
    timeout=WAIT_FOR_TASK_COMPLETION_TIMEOUT_S)``: rsflow's datasets shorten that wait (0.1 s in Ray
    2.60), which each CPU slot sat idle after every task. The loop must still read the constant by that
    name, or the setting silently stops mattering after a Ray upgrade."""
    import inspect

    from ray.data._internal.execution import streaming_executor_state as state

    from rsflow.pipeline import RAY_DATA_TASK_WAIT_SECONDS, _configured

    assert "timeout=WAIT_FOR_TASK_COMPLETION_TIMEOUT_S" in inspect.getsource(state.process_completed_tasks)
    original = state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S
    try:
        state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = 0.1
        ds = _configured(ray_local.data.from_items([{"x": 1}]))
        assert state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == RAY_DATA_TASK_WAIT_SECONDS < 0.1
        assert ds.context.op_resource_reservation_enabled is False
    finally:
        state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = original
