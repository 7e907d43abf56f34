"""The run lease (`spark/lease.py`) tells a live holder from one that is gone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fastfill_udfs.spark.lease import _pid_alive, _proc_state


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombies are read from /proc")
def test_a_killed_process_nobody_reaped_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _proc_state(child.pid) != "Z":     # killed, not yet reaped: a zombie
            assert time.monotonic() < deadline, _proc_state(child.pid)
            time.sleep(0.05)
        os.kill(child.pid, 0)                      # what fooled the lease: kill(0) finds it
        assert not _pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not _pid_alive(child.pid)
    assert _pid_alive(os.getpid())


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()                                   # reaped: its pid names no process now
    return child.pid


def test_one_holder_at_a_time_a_dead_one_is_taken_over_and_its_renewal_fails(spark, tmp_path):
    from fastfill_udfs.spark.delta_io import read_table
    from fastfill_udfs.spark.lease import RunBusyError, RunLease

    path = str(tmp_path / "backfill_lease")
    dead = RunLease(spark, path, "r1")
    dead.pid = _dead_pid()
    dead.owner = f"{dead.host}:{dead.pid}:gone"
    dead.acquire()                                 # a free lease: taken
    live = RunLease(spark, path, "r1").acquire()   # its holder is gone: taken over
    assert [r["owner"] for r in read_table(spark, path).collect()] == [live.owner]
    with pytest.raises(RunBusyError, match=f"lost the lease to {live.owner}"):
        dead.renew()

    other = RunLease(spark, path, "r1")            # same host and process, holder alive
    with pytest.raises(RunBusyError, match=f"already being backfilled by {live.owner}"):
        other.acquire()
    live.renew()
    with RunLease(spark, path, "r2") as elsewhere:  # another run's lease is its own
        assert {r["run"] for r in read_table(spark, path).collect()} == {"r1", "r2"}
    assert {r["run"] for r in read_table(spark, path).collect()} == {"r1"}   # released
    live.release()
    assert other.acquire() is other                # free again: one MERGE takes it
    assert [r["owner"] for r in read_table(spark, path).collect()] == [other.owner]
    assert elsewhere.owner != other.owner
