"""The benchmark's own arithmetic (``python -m bench`` is never run by the suite; its ratios and verdicts are
tested here): targets, the split of a run into start-up and a rate, and the memory target per worker role."""

from __future__ import annotations

import doctest

import pytest

import bench.common
import bench.memory
from bench.common import Target, past_start_up
from bench.memory import role_ratios


@pytest.mark.parametrize("module", [bench.common, bench.memory])
def test_the_bench_docstring_examples_hold(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted >= 1 and result.failed == 0


def test_a_target_is_met_on_its_side_of_the_threshold_and_unknown_without_a_value() -> None:
    assert Target("s", "ratio", 0.8, ">=", 0.8).met is True
    assert Target("s", "ratio", 0.79, ">=", 0.8).met is False
    assert Target("s", "ratio", 1.2, "<=", 1.2).met is True and Target("s", "ratio", 1.21, "<=", 1.2).met is False
    assert Target("s", "ratio", None, "<=", 1.2).met is None
    assert Target("s", "ratio", 1.3, "<=", 1.2).to_json()["met"] is False


def test_the_memory_target_is_judged_on_the_worker_role_that_grew_most() -> None:
    """The largest worker of each run can stay within 1.2x while a smaller one grows past it."""
    small = {"read tasks": {"max_peak_mib": 325.0}, "other workers": {"max_peak_mib": 100.0},
             "ray system": {"max_peak_mib": 50.0}}
    large = {"read tasks": {"max_peak_mib": 330.0}, "other workers": {"max_peak_mib": 190.0},
             "ray system": {"max_peak_mib": 150.0}, "model actor": {"max_peak_mib": 200.0}}
    ratios, worst = role_ratios(small, large)
    assert worst == "other workers" and ratios["other workers"] == 1.9
    assert "model actor" not in ratios and ratios["ray system"] == 3.0  # Ray's processes are reported, not judged
    assert role_ratios({"ray system": {"max_peak_mib": 1.0}}, {"ray system": {"max_peak_mib": 2.0}})[1] is None


def test_past_start_up_refuses_runs_whose_noise_hides_the_split() -> None:
    assert past_start_up({"tiles_read": 100, "pipeline_seconds": 2.0},
                         {"tiles_read": 400, "pipeline_seconds": 2.0}) == {"error": "the larger run was not longer"}
    assert "negative" in past_start_up({"tiles_read": 100, "pipeline_seconds": 0.1},
                                       {"tiles_read": 400, "pipeline_seconds": 2.0})["error"]
