"""The pure pieces a moving gallery relies on (no Spark session): Delta write conflicts are
retried and then refused with a message, a sync commit's effect on the number of `new` rows is
read from its own metrics, and the AUC of a curve whose t moved back (docs/moving_gallery.md)."""
import pytest

from fastfill_udfs.spark.lease import ConcurrentWriteError, RunBusyError, retry_conflicts
from fastfill_udfs.spark.sync_history import Commit


class ConcurrentAppendException(Exception):
    """Named as Delta's: `lease.is_write_conflict` recognises it by name."""


def test_a_write_that_loses_a_race_is_retried_then_refused_with_a_message(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def loses_twice():
        calls.append(1)
        if len(calls) < 3:
            raise ConcurrentAppendException("Files were added to partition [planned_batch_id=2]")
        return "committed"

    assert retry_conflicts(loses_twice, "sync 4: MERGE", attempts=5) == "committed"
    assert len(calls) == 3

    def always_loses():
        raise ConcurrentAppendException("Files were added by a concurrent update")

    with pytest.raises(ConcurrentWriteError, match=r"sync 4: MERGE: another job kept committing "
                       r"to the same table first \(3 tries.*rerun it") as err:
        retry_conflicts(always_loses, "sync 4: MERGE", attempts=3)
    assert isinstance(err.value, RunBusyError)          # the jobs print it, exit 3, no trace
    seen = []

    def broken():
        seen.append(1)
        raise ValueError("not a conflict")

    with pytest.raises(ValueError, match="not a conflict"):
        retry_conflicts(broken, "x", attempts=5)
    assert len(seen) == 1
    with pytest.raises(ValueError, match="attempts"):
        retry_conflicts(broken, "x", attempts=0)


def test_a_sync_commit_counts_its_own_change_of_new_rows():
    metrics = {"numTargetRowsUpdated": "3", "numTargetRowsInserted": "2",
               "numTargetRowsDeleted": "4"}

    def commit(meta):
        return Commit(7, "MERGE", 6, metrics, meta)

    arrive = {"fastfill_sync": 2, "new_sign": 1,
              "new_counts": ["numTargetRowsUpdated", "numTargetRowsInserted"]}
    leave = {"fastfill_sync": 2, "new_sign": -1, "new_counts": ["numTargetRowsDeleted"]}
    assert commit(arrive).new_delta() == 5 and commit(leave).new_delta() == -4
    assert commit({"fastfill_sync": 2, "new_sign": 0}).new_delta() == 0
    assert commit({"fastfill_batch": 3, "new_sign": 1}).new_delta() == 0   # not a sync's
    assert commit(arrive).sync_id == 2 and commit({}).sync_id is None


def test_auc_of_a_curve_whose_fraction_moved_back_counts_each_stretch_once():
    from fastfill_udfs.simulate import curve_auc
    from fastfill_udfs.spark.evaluate import run_curve_auc

    t, v = [0.0, 0.5, 1.0], [0.4, 0.6, 0.8]
    assert run_curve_auc(t, v) == pytest.approx(curve_auc(t, v))
    # a sync queued transformed items: t fell from 0.5 to 0.4, then the backfill went on
    moved = run_curve_auc([0.0, 0.5, 0.4, 1.0], [0.4, 0.6, 0.55, 0.8])
    assert moved == pytest.approx(curve_auc([0.0, 0.5, 0.5, 1.0], [0.4, 0.6, 0.55, 0.8]))
    assert moved == pytest.approx(0.25 * 1.0 + 0.5 * 0.675)
