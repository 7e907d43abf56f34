"""One backfill job per run at a time: a lease row in `runs/<run>/backfill_lease` (Delta).

Two jobs started together on the same run (a double-clicked Databricks job) race for the lease;
Delta's optimistic concurrency lets one MERGE win, and the loser, reading the lease back, stops
with a message naming the holder. A holder renews the lease after every batch; a lease whose
holder died is taken over: at once when the holder ran on this host and its process is gone (a
`kill -9`), else once it is older than `backfill.lease_timeout_s`."""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pyspark.sql import SparkSession

from fastfill_udfs.config import Config
from fastfill_udfs.spark.delta_io import is_delta_table, read_table, write_table

log = logging.getLogger(__name__)
LEASE_SCHEMA = ("run string, owner string, host string, pid long, acquired_at timestamp, "
                "heartbeat_at timestamp")


class RunBusyError(RuntimeError):
    """Another live job holds the run's lease."""


_CONFLICTS = ("ConcurrentAppendException", "ConcurrentDeleteReadException",
              "ConcurrentDeleteDeleteException", "ConcurrentTransactionException",
              "ConcurrentWriteException", "MetadataChangedException", "ProtocolChangedException")


def is_write_conflict(exc: BaseException) -> bool:
    """True for Delta's optimistic-concurrency conflicts (another writer committed first)."""
    text = type(exc).__name__ + " " + str(exc)[:500]
    return any(name in text for name in _CONFLICTS) or "[DELTA_CONCURRENT" in text


class ConcurrentWriteError(RunBusyError):
    """A Delta write kept losing to another job's commits on the same table (retried first)."""


def retry_conflicts(write, what: str, attempts: int = 5):
    """`write()` (one Delta commit that is safe to repeat: its conditions are read inside the
    transaction), retried when another writer committed first. Raises ConcurrentWriteError
    naming `what` after `attempts` lost races; other errors pass through."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return write()
        except Exception as exc:
            if not is_write_conflict(exc):
                raise
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            if attempt == attempts:
                raise ConcurrentWriteError(
                    f"{what}: another job kept committing to the same table first ({attempts} "
                    f"tries; last: {type(exc).__name__}: {first}). Nothing was half-written: "
                    "rerun it") from None
            log.warning("%s: another job committed first (%s); retrying (%d/%d)", what,
                        type(exc).__name__, attempt, attempts)
            time.sleep(0.3 * attempt)


def _pid_alive(pid: int) -> bool:
    """True while process `pid` runs. A zombie counts as gone: a driver killed with its
    spark-submit parent is reparented to PID 1, and in a container whose PID 1 never reaps,
    it stays a zombie that `kill(pid, 0)` still finds."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    state = _proc_state(pid)
    if state is None:   # no /proc (macOS: trust kill), or the entry vanished since
        return not os.path.isdir("/proc/self")
    return state not in ("Z", "X")


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, D, Z, ...), None where /proc has no entry."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:][:1] or None   # the name in (...) may hold spaces


class RunLease:
    """The lease on one run's backfill. Use as a context manager: acquire on enter (raises
    RunBusyError naming the holder), release on exit."""

    def __init__(self, spark: SparkSession, path: str, run: str, timeout_s: float = 1800.0):
        self.spark, self.path, self.run, self.timeout_s = spark, path, run, float(timeout_s)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self._renewed = 0.0

    def _current(self):
        if not is_delta_table(self.spark, self.path):
            return None
        rows = read_table(self.spark, self.path).where(f"run = '{self.run}'").collect()
        return rows[0] if rows else None

    def _dead(self, row) -> bool:
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        beat = row["heartbeat_at"].replace(tzinfo=None)
        if now - beat > timedelta(seconds=self.timeout_s):
            return True
        return row["host"] == self.host and row["pid"] != self.pid and not _pid_alive(row["pid"])

    def _merge(self, expected_owner: str | None) -> bool:
        """Compare-and-swap: write our row when the lease is free, ours, or still held by
        `expected_owner` (a holder found dead). True when the MERGE wrote our row: it matched
        or inserted exactly one row, atomically, so no read-back is needed."""
        from delta.tables import DeltaTable

        if not is_delta_table(self.spark, self.path):
            write_table(self.spark.createDataFrame([], LEASE_SCHEMA), self.path)
        mine = self.spark.sql(
            f"SELECT '{self.run}' AS run, '{self.owner}' AS owner, '{self.host}' AS host, "
            f"CAST({self.pid} AS BIGINT) AS pid, current_timestamp() AS acquired_at, "
            "current_timestamp() AS heartbeat_at")
        merge = DeltaTable.forPath(self.spark, self.path).alias("l").merge(
            mine.alias("n"), "l.run = n.run")
        if expected_owner is None:  # renew our own lease (or take a free one)
            merge = merge.whenMatchedUpdate(condition="l.owner = n.owner",
                                            set={"heartbeat_at": "n.heartbeat_at"})
        else:  # take over from a holder found dead, unless someone else was faster
            merge = merge.whenMatchedUpdateAll(condition=f"l.owner = '{expected_owner}'")
        counts = merge.whenNotMatchedInsertAll().execute().first()
        return int(counts["num_affected_rows"]) == 1

    def _busy(self, row) -> RunBusyError:
        return RunBusyError(
            f"run '{self.run}' is already being backfilled by {row['owner']} (host "
            f"{row['host']}, pid {row['pid']}) since {row['acquired_at']} UTC, last "
            f"heartbeat {row['heartbeat_at']} UTC. Not starting it twice: wait for that "
            f"job, or, if it died on another machine, rerun after "
            f"backfill.lease_timeout_s ({self.timeout_s:.0f} s) without a heartbeat")

    def acquire(self) -> "RunLease":
        """Take the lease: one MERGE when it is free (the common case); otherwise read who
        holds it and take it over when that holder is gone. Raises RunBusyError naming a live
        holder, or when five tries lost to concurrent writers."""
        expected = None                 # first try: a free lease
        for attempt in range(5):
            try:
                if self._merge(expected):
                    self._renewed = time.monotonic()
                    return self
            except Exception as exc:  # a concurrent writer won: read again who holds it
                if not is_write_conflict(exc):
                    raise
                time.sleep(0.2 * (attempt + 1))
            row = self._current()
            if row is None:
                expected = None
                continue
            if not self._dead(row):
                raise self._busy(row)
            log.warning("run %s: taking over the lease of %s (it is gone)", self.run,
                        row["owner"])
            expected = row["owner"]
        row = self._current()
        raise RunBusyError(f"run '{self.run}': could not take its lease, held by "
                           f"{row['owner'] if row else 'nobody'}")

    def renew_if_due(self) -> None:
        """Renew when a tenth of the timeout has passed since the last renewal (a renewal is a
        Delta commit: not worth one per batch)."""
        if time.monotonic() - self._renewed >= self.timeout_s / 10:
            self.renew()

    def renew(self) -> None:
        """Heartbeat; raises RunBusyError when the lease was taken over meanwhile."""
        if not self._merge(None):
            row = self._current()
            raise RunBusyError(f"run '{self.run}': lost the lease to "
                               f"{row['owner'] if row else 'nobody'}")
        self._renewed = time.monotonic()

    def release(self) -> None:
        from delta.tables import DeltaTable

        if is_delta_table(self.spark, self.path):
            DeltaTable.forPath(self.spark, self.path).delete(
                f"run = '{self.run}' AND owner = '{self.owner}'")

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        try:
            self.release()
        except Exception as err:  # never hide the job's own error behind the release's
            log.warning("run %s: could not release the lease: %s", self.run, err)


def conflict_attempts(cfg: Config) -> int:
    """sync.conflict_retries, checked (ValueError naming it below 1)."""
    n = cfg.get_path("sync.conflict_retries")
    if n < 1:
        raise ValueError(f"sync.conflict_retries must be >= 1, got {n}")
    return int(n)
