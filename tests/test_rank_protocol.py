"""tests/launch.py itself: the marker a torchrun launch needs, and the per-rank protocol (a record
per rank; a failing rank leaves its traceback and stops at once), run in plain processes."""

import subprocess

import pytest

import launch

RANK_PROGRAM = """
import sys
from launch import reporting, write_result
where = sys.argv[1]
with reporting(where):
    if sys.argv[2] == "fail":
        raise ValueError("rank gave up")
    write_result(where, {"ok": True})
print("after the work")
"""


def rank_run(where, rank, outcome):
    return launch.python("-c", RANK_PROGRAM, where, outcome, env={"RANK": str(rank)},
                         cwd=launch.TESTS, timeout=60)


def test_torchrun_is_refused_to_a_test_not_marked_torchrun():
    with pytest.raises(RuntimeError, match="request the `torchrun` fixture"):
        launch.torchrun("-c", "pass")


def test_ranks_records_are_read_in_rank_order(tmp_path):
    for rank in (1, 0):
        assert rank_run(tmp_path, rank, "ok").returncode == 0
    assert launch.rank_results(tmp_path, 2) == [{"ok": True}, {"ok": True}]
    with pytest.raises(AssertionError):
        launch.rank_results(tmp_path, 3)


def test_a_failing_rank_leaves_its_traceback_and_stops_at_once(tmp_path):
    result = rank_run(tmp_path / "out", 1, "fail")
    assert result.returncode == 1 and "after the work" not in result.stdout
    assert "ValueError: rank gave up" in (tmp_path / "out" / "rank1.error").read_text()
    with pytest.raises(AssertionError, match="rank gave up"):
        launch.check_launch(subprocess.CompletedProcess([], 1, "", ""), tmp_path)
