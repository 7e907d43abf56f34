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
