"""The MLflow status of a backfill run follows the jobs working on it.

A job holding the run's lease (`lease.RunLease`) wraps its work in `backfill_run_status`:
- it opens the run's MLflow run RUNNING (a run left RUNNING by a job that is gone, e.g. after
  a `kill -9`, is first recorded as KILLED: the lease is ours, so no job works on it);
- on success it closes it FINISHED when every planned batch is committed, else SCHEDULED
  (a compute budget, `--max-batches`, left batches for a later job);
- SIGTERM and SIGINT (Ctrl-C, a cancelled Databricks run) close it KILLED, any other error
  FAILED (tag fastfill.state names the error), a refusal (stale plan, other model) leaves the
  status it had; a later job reopens it.
Tags `fastfill.state` and `fastfill.history` say why, in words."""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from pyspark.sql import SparkSession

from fastfill_udfs.config import Config

log = logging.getLogger(__name__)


class JobTerminated(BaseException):
    """The job's process got SIGTERM (raised in the main thread so cleanup runs)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def refusal_errors() -> tuple[type, ...]:
    """Errors that refuse a job on purpose, before it changes anything: their message says
    what is wrong and what to do, so the job prints it and exits without a traceback."""
    from fastfill_udfs.model_loading import ModelNotFoundError
    from fastfill_udfs.spark.backfill import ModelMismatchError
    from fastfill_udfs.spark.delta_io import TableNotFoundError
    from fastfill_udfs.spark.forecast import NoForecastError
    from fastfill_udfs.spark.rank import StaleRankingError

    return (ModelNotFoundError, ModelMismatchError, TableNotFoundError, StaleRankingError,
            NoForecastError)


@contextmanager
def terminate_raises() -> Iterator[None]:
    """While inside, SIGTERM raises JobTerminated in the main thread (Python's default is to
    die without cleanup). Elsewhere than the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise JobTerminated(signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def plan_progress(spark: SparkSession, cfg: Config, run: str) -> tuple[int, int]:
    """(committed batches, planned batches) of `run`, batch 0 not counted."""
    from fastfill_udfs.spark.backfill import committed_batches, planned_batches

    planned = set(planned_batches(spark, cfg, run))
    done = set(committed_batches(spark, cfg, run)) & planned
    return len(done), len(planned)


class BackfillRunStatus:
    """The MLflow run one job works on; `track` opens it (see the module docstring)."""

    def __init__(self, spark: SparkSession, cfg: Config, run: str, job: str):
        self.spark, self.cfg, self.run, self.job = spark, cfg, run, job
        self.mlflow_run_id: str | None = None
        self.previous: str | None = None

    def track(self, mlflow_run_id: str) -> None:
        """Open `mlflow_run_id` RUNNING for this job (recording a job that left it RUNNING)."""
        from fastfill_udfs.tracking import close_superseded_runs, open_backfill_run

        if not mlflow_run_id:
            raise ValueError("mlflow_run_id: the backfill run's MLflow run id is required")
        self.previous = open_backfill_run(mlflow_run_id, self.job)
        self.mlflow_run_id = mlflow_run_id
        close_superseded_runs(self.run, mlflow_run_id, self.job)

    def track_existing(self) -> None:
        """Open the MLflow run of the run's current ranking when there is one (a job that
        does not evaluate creates none)."""
        from mlflow.tracking import MlflowClient

        from fastfill_udfs.spark.delta_io import ranking_id
        from fastfill_udfs.tracking import configure_mlflow, find_backfill_run

        exp_id = configure_mlflow(self.cfg)
        found = find_backfill_run(MlflowClient(), exp_id, self.run,
                                  ranking_id(self.spark, self.cfg, self.run))
        if found is not None:
            self.track(found.info.run_id)

    def close(self, status: str, note: str) -> None:
        """Set the MLflow status; when that fails here (a signal that landed in the middle of
        a library call can leave this process's clients unusable), a fresh Python process
        sets it."""
        import mlflow

        from fastfill_udfs.tracking import close_backfill_run

        if self.mlflow_run_id is None:
            return
        try:
            close_backfill_run(self.mlflow_run_id, self.job, status, note)
            return
        except Exception as exc:
            log.warning("MLflow run %s: could not set %s here (%s: %s); trying a fresh process",
                        self.mlflow_run_id, status, type(exc).__name__, exc)
        try:
            _close_in_fresh_process(mlflow.get_tracking_uri(), self.mlflow_run_id, self.job,
                                    status, note)
        except Exception as exc:  # never hide the job's own outcome behind the status's
            log.warning("MLflow run %s: could not set %s: %s", self.mlflow_run_id, status, exc)

    def close_done(self) -> None:
        """After a job that ended normally: FINISHED when the plan is fully backfilled."""
        from fastfill_udfs.tracking import FINISHED, SCHEDULED, publish_backfill_view

        if self.mlflow_run_id is None:
            return
        done, planned = plan_progress(self.spark, self.cfg, self.run)
        if done == planned:
            self.close(FINISHED, f"the plan is fully backfilled ({planned} batches)")
        else:
            self.close(SCHEDULED, f"{done} of {planned} batches committed; the next "
                                  f"backfill job continues with batch {done + 1}")
        try:
            from mlflow.tracking import MlflowClient

            publish_backfill_view(MlflowClient().get_run(self.mlflow_run_id).info.experiment_id)
        except Exception as exc:  # the view is a convenience: never fail a finished job on it
            log.warning("could not save the 'Backfill curves' view: %s", exc)


def _close_in_fresh_process(uri: str, run_id: str, job: str, status: str, note: str) -> None:
    """`tracking.close_backfill_run` in a new interpreter (raises RuntimeError with its
    output when it fails)."""
    import os
    import subprocess
    import sys

    from fastfill_udfs.config import PROJECT_ROOT

    code = ("import sys, mlflow\n"
            "from fastfill_udfs.tracking import close_backfill_run\n"
            "mlflow.set_tracking_uri(sys.argv[1])\n"
            "close_backfill_run(*sys.argv[2:6])\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH"))
                                        if p)
    proc = subprocess.run([sys.executable, "-c", code, uri, run_id, job, status, note],
                          capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])


def _resync_spark(spark: SparkSession) -> None:
    """After a signal interrupted a call into the JVM, that call's answer is still on this
    thread's py4j connection and would be read as the next call's (MLflow's client asks the
    session for its registry URI, the lease's release runs a Delta delete): drop the
    connection (the next call opens a new one) and cancel the Spark jobs the interrupted call
    started."""
    try:
        client = spark.sparkContext._gateway._gateway_client
        connection = getattr(client, "get_thread_connection", lambda: None)()
        if connection is not None:
            connection.close()
        spark.sparkContext.cancelAllJobs()
    except Exception as exc:  # the JVM may be going down as well
        log.warning("could not reset the connection to Spark after the signal: %s", exc)


@contextmanager
def backfill_run_status(spark: SparkSession, cfg: Config, run: str,
                        job: str) -> Iterator[BackfillRunStatus]:
    """Wrap one job's work on `run` (while holding its lease as `job`); see the module
    docstring for the statuses it sets. SIGTERM raises JobTerminated inside."""
    from fastfill_udfs.tracking import FAILED, KILLED

    status = BackfillRunStatus(spark, cfg, run, job)
    with terminate_raises():
        try:
            yield status
        except (KeyboardInterrupt, JobTerminated) as exc:
            what = exc if isinstance(exc, JobTerminated) else "interrupted (SIGINT)"
            _resync_spark(spark)   # first: even MLflow's client asks the Spark session
            status.close(KILLED, f"the job was stopped: {what}; rerun to continue")
            raise
        except refusal_errors() as exc:
            if status.previous is not None:
                from fastfill_udfs.tracking import RUNNING

                previous = status.previous if status.previous != RUNNING else KILLED
                status.close(previous, f"a job was refused and changed nothing: {exc}")
            raise
        except BaseException as exc:
            status.close(FAILED, f"the job failed: {type(exc).__name__}: {str(exc)[:1500]}")
            raise
        else:
            status.close_done()
