"""MLflow glue: tracking store, experiments (opened as model-training experiments), backfill
runs (name, tags, description, lifecycle status) and the saved "Backfill curves" view."""
from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

from fastfill_udfs.config import PROJECT_ROOT, Config

log = logging.getLogger(__name__)


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative `sqlite:///file.db` URI absolute against the project root."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(PROJECT_ROOT / uri[len(prefix):])
    return uri


def artifact_root(uri: str) -> str | None:
    """Where a local store keeps artifacts: next to the SQLite file, not in the CWD."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def tracking_uri_for(cfg: Config) -> str:
    """The tracking URI a job uses: `MLFLOW_TRACKING_URI` from the environment (Databricks sets
    it), else the config's `mlflow.tracking_uri` (a relative SQLite path is taken from the
    project root)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(
        cfg.get_path("mlflow.tracking_uri"))


def configure_mlflow(cfg: Config, experiment: str | None = None) -> str:
    """Point MLflow at the tracking store (`tracking_uri_for`) and experiment; returns its id.

    The environment is left as it was: mlflow.set_tracking_uri copies the URI into
    MLFLOW_TRACKING_URI, where it would pose as the user's setting and override the next
    config's store in this process and in every subprocess started after it."""
    import mlflow

    uri = tracking_uri_for(cfg)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    name = experiment or cfg.get_path("mlflow.experiment")
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        exp_id = mlflow.create_experiment(name, artifact_location=artifact_root(uri),
                                          tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    else:
        exp_id = found.experiment_id
        if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            _mark_model_training(exp_id)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# MLflow 3 experiments are either "GenAI apps & agents" (opens on traces) or "Machine
# learning" (opens on runs). The tag below is what Databricks and MLflow 3.1-3.x UIs read;
# MLflow >= 3.10's own UI follows its sidebar switch instead (GenAI | Model training, kept per
# browser), which the `workflowType=machine_learning` query of `experiment_url` sets.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
MODEL_TRAINING_QUERY = "workflowType=machine_learning"


def _mark_model_training(exp_id: str) -> None:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    except Exception as exc:  # a read-only experiment: the UI link still opens the runs
        log.warning("could not tag experiment %s as model training: %s", exp_id, exc)


def experiment_url(ui_url: str, exp_id: str, *, view: str | None = None) -> str:
    """Link to experiment `exp_id` in the MLflow UI at `ui_url`, opening on its runs (the
    model-training view); with `view` (a saved view's key, see `publish_backfill_view`), on
    that view's charts."""
    base = f"{ui_url.rstrip('/')}/#/experiments/{exp_id}/runs?{MODEL_TRAINING_QUERY}"
    if view:
        base += f"&compareRunsMode=CHART&viewStateShareKey={view}"
    return base


RUN_TAG = "fastfill.run"
RANKING_TAG = "fastfill.ranking"
POLICY_TAG = "fastfill.policy"
KIND_TAG = "fastfill.kind"
JOB_TAG = "fastfill.job"              # the lease owner of the job working on the run (RUNNING)
STATE_TAG = "fastfill.state"          # why the run has its status, in words
HISTORY_TAG = "fastfill.history"      # the last status changes, one line each
DESCRIPTION_TAG = "mlflow.note.content"
RUN_NAME_TAG = "mlflow.runName"
HISTORY_LINES = 40


def _short_model(version: str | None) -> str:
    """models:/fastfill_new/3 -> fastfill_new v3; other URIs and entry points as they are."""
    if not version:
        return "?"
    if version.startswith("models:/") and version.count("/") == 2:
        name, number = version[len("models:/"):].split("/")
        return f"{name} v{number}" if number.isdigit() else f"{name}@{number}"
    return version


def backfill_run_labels(run: str, policy: str, params: dict) -> tuple[str, dict, str]:
    """(run name, tags, description) of backfill run `run` from its params (the plan's
    batch-0 record): they say the policy, the models and the data."""
    model_new, model_h = params.get("model_new"), params.get("model_h")
    dataset = params.get("dataset") or "?"
    name = f"{run} · {policy} · {_short_model(model_new)}"
    tags = {POLICY_TAG: policy, "fastfill.model_new": str(model_new or ""),
            "fastfill.model_h": str(model_h or ""), "fastfill.dataset": str(dataset),
            "fastfill.gallery_table": str(params.get("gallery_table") or ""),
            "fastfill.n_gallery": str(params.get("n_gallery") or "")}
    order = {"uncertainty": f"decreasing sigma of h ({_short_model(model_h)})",
             "random": "a seeded random order (the FCT baseline)"}.get(policy, policy)
    batching = ", ".join(f"{k[len('backfill_'):]} {v}" for k, v in params.items()
                         if k.startswith("backfill_") and v not in (None, "", 0, "0"))
    description = (
        f"**Backfill run `{run}`**: the gallery is re-embedded with the new model "
        f"`{model_new}` in **{policy}** order ({order}); until then every item is searchable "
        f"through h `{model_h}`.\n\n"
        f"- data: `{dataset}`, {params.get('n_gallery', '?')} gallery items "
        f"(`{params.get('gallery_table', '?')}`), {params.get('n_queries', '?')} queries\n"
        f"- batching: {batching or 'see params'}\n"
        f"- curve: `mAP`, `top1`, `top5` and `backfill_fraction` at step = committed batches; "
        f"`mAP_auc`, `top1_auc` and `curve.png` once every batch is committed\n"
        f"- status: RUNNING while a job works on it, SCHEDULED when a job stopped with "
        f"batches left (`--max-batches`), FINISHED when the plan is fully backfilled, KILLED / "
        f"FAILED when the job was stopped or failed (tags `{STATE_TAG}`, `{HISTORY_TAG}`)")
    return name, tags, description


def backfill_mlflow_run(cfg: Config, run: str, policy: str, params: dict, *,
                        ranking: str) -> str:
    """The MLflow run id of backfill run `run` (tag fastfill.run) as ranked at `ranking` (tag
    fastfill.ranking; a re-ranked run starts a new MLflow run), created on first use, named
    and described after its policy, models and data (`backfill_run_labels`).

    Params are logged once; a later call with different values for an existing key keeps the
    first (MLflow params are immutable) and logs a warning naming the key."""
    import mlflow
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    exp_id = configure_mlflow(cfg)
    client = MlflowClient()
    found = find_backfill_run(client, exp_id, run, ranking)
    name, tags, description = backfill_run_labels(run, policy, params)
    if found is not None:
        run_id = found.info.run_id
        existing = found.data.params
    else:
        created = client.create_run(exp_id, run_name=name, tags={  # no job holds it yet
            RUN_TAG: run, RANKING_TAG: ranking, KIND_TAG: "backfill", JOB_TAG: ""})
        run_id, existing = created.info.run_id, {}
    new = {}
    for key, value in params.items():
        value = str(value)[:6000]
        if key not in existing:
            new[key] = value
        elif existing[key] != value:
            log.warning("MLflow run %s keeps param %s=%r (now %r)", run, key, existing[key], value)
    tags = {**tags, DESCRIPTION_TAG: description, RUN_NAME_TAG: name}
    client.log_batch(run_id, params=[Param(k, v) for k, v in new.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    mlflow.end_run() if mlflow.active_run() else None
    return run_id


def find_backfill_run(client, exp_id: str, run: str, ranking: str | None = None):
    """The MLflow run of backfill run `run` at `ranking` (any ranking's latest when None), or
    None."""
    flt = f"tags.`{RUN_TAG}` = '{run}'"
    if ranking is not None:
        flt += f" and tags.`{RANKING_TAG}` = '{ranking}'"
    found = client.search_runs([exp_id], filter_string=flt,
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def log_step_metrics(run_id: str, metrics: dict, step: int) -> None:
    """Log `metrics` at `step`. None means "not computed" and is left out; NaN and infinite
    values are logged as they are (MLflow keeps them) and named in a warning, never dropped."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    ts = int(time.time() * 1000)
    values = {k: float(v) for k, v in metrics.items() if v is not None}
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    if bad:
        log.warning("MLflow run %s step %d: non-finite %s", run_id, step,
                    ", ".join(f"{k}={values[k]}" for k in bad))
    MlflowClient().log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])


def logged_steps(run_id: str, key: str = "mAP") -> set[int]:
    from mlflow.tracking import MlflowClient

    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


# --- lifecycle: the status says whether a job works on the run -----------------------------

RUNNING, SCHEDULED, FINISHED, KILLED, FAILED = "RUNNING", "SCHEDULED", "FINISHED", "KILLED", "FAILED"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _append_history(client, run_id: str, tags: dict, line: str) -> str:
    lines = [x for x in tags.get(HISTORY_TAG, "").splitlines() if x.strip()]
    lines = (lines + [f"{_now()} {line}"])[-HISTORY_LINES:]
    return "\n".join(lines)[-7000:]


def _set_tags(client, run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _last_activity_ms(run) -> int:
    """When the run last showed a sign of life: its latest metric, else its start."""
    stamps = [m.timestamp for m in getattr(run.data, "_metric_objs", []) or []]
    return max(stamps + [run.info.start_time or 0])


def open_backfill_run(run_id: str, job: str) -> str:
    """Mark MLflow run `run_id` RUNNING for job `job` (the lease owner, who must hold the
    run's lease). A run left RUNNING by another job (or by a version of this project that did
    not track jobs) is recorded first: that job is gone (it was killed with SIGKILL, ran out
    of memory or lost its machine, as the lease is ours now), so the run is set KILLED at its
    last sign of life, with a tag saying so, then reopened. Returns the status the run had
    before (after recording a gone job: KILLED)."""
    from mlflow.tracking import MlflowClient

    if not job:
        raise ValueError("job: the lease owner of the job opening the run is required")
    client = MlflowClient()
    found = client.get_run(run_id)
    status, tags = found.info.status, dict(found.data.tags)
    if status == RUNNING and tags.get(JOB_TAG) == job:
        return status
    if status == RUNNING and tags.get(JOB_TAG) != "":  # "": created, not opened by any job
        gone = tags.get(JOB_TAG) or "an earlier job"
        note = (f"KILLED: job {gone} stopped without closing the run (SIGKILL, out of memory "
                f"or lost machine); found by {job}, which holds the run's lease")
        client.set_terminated(run_id, KILLED, end_time=_last_activity_ms(found))
        history = _append_history(client, run_id, tags, note)
        _set_tags(client, run_id, {STATE_TAG: note, HISTORY_TAG: history})
        tags[HISTORY_TAG] = history
        log.warning("MLflow run %s: %s", run_id, note)
        status = KILLED
    client.update_run(run_id, status=RUNNING)
    _set_tags(client, run_id, {
        JOB_TAG: job, STATE_TAG: f"RUNNING: job {job} works on it",
        HISTORY_TAG: _append_history(client, run_id, tags,
                                     f"RUNNING: opened by job {job} (was {status})")})
    return status


def close_backfill_run(run_id: str, job: str, status: str, note: str) -> bool:
    """Set MLflow run `run_id` to `status` (FINISHED, SCHEDULED, KILLED or FAILED) with `note`
    saying why, unless another job has opened it meanwhile (then it is left to that job and
    False is returned)."""
    from mlflow.tracking import MlflowClient

    if status not in (FINISHED, SCHEDULED, KILLED, FAILED):
        raise ValueError(f"status: FINISHED, SCHEDULED, KILLED or FAILED, got {status!r}")
    client = MlflowClient()
    found = client.get_run(run_id)
    tags = dict(found.data.tags)
    if tags.get(JOB_TAG, job) != job:
        log.warning("MLflow run %s: left to job %s (opened it after %s)", run_id,
                    tags.get(JOB_TAG), job)
        return False
    if status == SCHEDULED:
        client.update_run(run_id, status=SCHEDULED)
    else:
        client.set_terminated(run_id, status)
    _set_tags(client, run_id, {
        JOB_TAG: "", STATE_TAG: f"{status}: {note}",
        HISTORY_TAG: _append_history(client, run_id, tags, f"{status}: {note} (job {job})")})
    return True


def close_superseded_runs(run: str, current_run_id: str, job: str) -> list[str]:
    """Backfill run `run` re-ranked: its MLflow runs of earlier rankings that were left
    RUNNING are set KILLED (no job can work on a superseded plan). Returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp_id = client.get_run(current_run_id).info.experiment_id
    stale = client.search_runs([exp_id], filter_string=(
        f"tags.`{RUN_TAG}` = '{run}' and attributes.status = 'RUNNING'"))
    out = []
    for old in stale:
        if old.info.run_id == current_run_id:
            continue
        note = f"superseded: run {run} was ranked again (now MLflow run {current_run_id})"
        client.set_terminated(old.info.run_id, KILLED, end_time=_last_activity_ms(old))
        _set_tags(client, old.info.run_id, {
            JOB_TAG: "", STATE_TAG: f"KILLED: {note}",
            HISTORY_TAG: _append_history(client, old.info.run_id, dict(old.data.tags),
                                         f"KILLED: {note}; found by job {job}")})
        out.append(old.info.run_id)
    return out


# --- the saved "Backfill curves" view of the MLflow UI --------------------------------------

BACKFILL_VIEW = "fastfill-curves"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
CURVE_KEYS = ("mAP", "top1", "top5", "backfill_fraction")


def _chart(key: str, section: str, line: bool) -> dict:
    chart = {"uuid": f"fastfill-{key}", "type": "LINE" if line else "BAR",
             "runsCountToCompare": 10, "metricSectionId": section, "deleted": False,
             "isGenerated": False, "displayName": key, "metricKey": key}
    if line:
        chart.update({"lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear",
                      "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "",
                      "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False,
                      "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True})
    return chart


FORECAST_KEYS = ("forecast_gain_share", "gain_share")
FORECAST_CHART = "share of the gain: forecast vs realised"


def forecast_chart(keys, section: str) -> dict:
    """One line chart of the forecast's and the realised share of the t0 -> new/new gain per
    step: the forecast is logged for every planned step before the first batch, the realised
    curve grows beside it."""
    chart = _chart(keys[0], section, True)
    chart.update({"uuid": "fastfill-forecast-vs-realised", "displayName": FORECAST_CHART,
                  "selectedMetricKeys": list(keys)})
    return chart


def is_single_value_metric(key: str) -> bool:
    """Logged once per run (AUCs, the new/new reference at step 0, the minority's share of
    the first 10%), not along the curve."""
    return (key.endswith("_auc") or key.startswith("new_new_") or "_share_first_" in key
            or key == "forecast_gap_max")


def backfill_view_state(metric_keys) -> dict:
    """The UI state of the "Backfill curves" view: backfill runs only, their curves (mAP,
    top1, top5, backfill_fraction against step) in the first section, the other per-step
    metrics (subgroups, gaps) in the second, single values (AUCs, new/new, shares) last as
    bars; the run table shows policy, new model, data and the AUCs."""
    keys = sorted(set(metric_keys))
    curves = [k for k in CURVE_KEYS if k in keys]
    forecast = [k for k in FORECAST_KEYS if k in keys]
    single = [k for k in keys if k not in curves and is_single_value_metric(k)]
    lines = [k for k in keys if k not in curves and k not in single and k not in forecast
             and not k.startswith(("forecast_", "estimate_"))]
    sections = [("fastfill-curves", "Backfill curves (against step = committed batches)")]
    if forecast:
        sections.append(("fastfill-forecast",
                         "Forecast (logged before the first batch) vs realised"))
    sections += [("fastfill-steps", "Subgroups and gaps per step"),
                 ("fastfill-final", "Final values (AUC, new/new, shares)")]
    charts = ([_chart(k, "fastfill-curves", True) for k in curves]
              + ([forecast_chart(forecast, "fastfill-forecast")] if forecast else [])
              + [_chart(k, "fastfill-steps", True) for k in lines]
              + [_chart(k, "fastfill-final", False) for k in single])
    return {
        "searchFilter": f"tags.`{KIND_TAG}` = 'backfill'",
        "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": ["attributes.`Source`", f"tags.`{POLICY_TAG}`",
                            "tags.`fastfill.model_new`", "tags.`fastfill.dataset`",
                            "metrics.`mAP_auc`", "metrics.`top1_auc`"],
        "columnOrder": [], "columnWidths": {}, "runsExpanded": {}, "runsPinned": [],
        "runsHidden": [], "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS",
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": uid, "name": name, "display": True,
                                "isReordered": True, "deleted": False, "isGenerated": False}
                               for uid, name in sections],
        "viewMaximized": False, "runListHidden": False, "isAccordionReordered": True,
        "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
        "groupsExpanded": {}, "autoRefreshEnabled": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0,
                                  "selectedXAxisMetricKey": ""},
    }


def encode_view(name: str, state: dict, created_ms: int | None = None) -> str:
    """A saved view as the MLflow UI stores it in an experiment tag: an envelope with the
    name and the state, deflated and base64-encoded behind a `deflate;` header."""
    import base64

    packed = "deflate;" + base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    now = int(time.time() * 1000)
    return json.dumps({"name": name, "createdAt": created_ms or now, "updatedAt": now,
                       "state": packed})


def publish_backfill_view(exp_id: str, name: str = "Backfill curves") -> str:
    """Save (or refresh) the experiment's "Backfill curves" view from the metrics its backfill
    runs logged; the UI lists it under Views and `experiment_url(..., view=BACKFILL_VIEW)`
    opens it. Returns the view's key."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs([exp_id], filter_string=f"tags.`{KIND_TAG}` = 'backfill'",
                              max_results=200)
    keys = {k for r in runs for k in r.data.metrics}
    state = backfill_view_state(keys)
    client.set_experiment_tag(exp_id, SHARED_VIEW_PREFIX + BACKFILL_VIEW, encode_view(name, state))
    return BACKFILL_VIEW


FORECAST_DIR = "forecast"


def _metric_key(text: str) -> str:
    """An MLflow-safe metric name part ("benefit+margin reversed" -> "benefit_margin_reversed")."""
    import re

    return re.sub(r"[^0-9A-Za-z_]+", "_", text).strip("_")


def log_forecast(forecast, run_id: str | None = None) -> None:
    """Log a :class:`fastfill_udfs.forecast.Forecast` to the active (or given) MLflow run:
    params (decision, reason, metric, sample sizes), metrics (every candidate's forecast AUC
    and band, random order's spread, the recommended stop) and the artifacts
    forecast/forecast.json, forecast.csv and forecast.png."""
    import tempfile

    import mlflow
    import numpy as np

    from fastfill_udfs.reporting import plot_forecast

    client = mlflow.MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    d, info = forecast.decision, forecast.info
    params = {"forecast_choice": d["key"], "forecast_reason": d["reason"][:5000],
              "forecast_metric": forecast.metric, "forecast_items": info.get("n_items"),
              "forecast_queries": info.get("queries"), "forecast_probes": info.get("n_probe", 0),
              "forecast_stop": forecast.stop["reason"][:5000]}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    metrics = {"forecast_stop_fraction": forecast.stop["fraction"],
               "forecast_random_auc_mean": float(np.mean(forecast.random_aucs)),
               "forecast_random_auc_sd": float(np.std(forecast.random_aucs, ddof=1)),
               "forecast_random_auc_max": float(np.max(forecast.random_aucs)),
               "forecast_beats_random": float(d["beats_random"])}
    for c in forecast.candidates:
        k = _metric_key(c["key"])
        metrics.update({f"forecast_auc_{k}": c["auc"], f"forecast_auc_lo_{k}": c["auc_lo"],
                        f"forecast_auc_hi_{k}": c["auc_hi"]})
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "forecast.json").write_text(forecast.to_json())
        forecast.table().to_csv(folder / "forecast.csv", index=False)
        plot_forecast(forecast, folder / "forecast.png")
        client.log_artifacts(run_id, str(folder), FORECAST_DIR)


def download_forecast(run_id: str):
    """The forecast logged in MLflow run `run_id` (see `log_forecast`), or None when it has
    none."""
    import tempfile

    import mlflow

    from fastfill_udfs.forecast import Forecast

    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run_id, FORECAST_DIR)}
    if f"{FORECAST_DIR}/forecast.json" not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, f"{FORECAST_DIR}/forecast.json", tmp)
        return Forecast.from_json(Path(path).read_text())
