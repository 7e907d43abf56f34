"""Compare backfill runs tracked in MLflow: a table (policy, AUCs, first and final mAP) and one
plot overlaying their curves (overall and, when logged, per subgroup).

Only rankings that are current in Delta are compared: an MLflow run whose backfill run was
ranked again since, or whose tables are gone, is left out and named with the reason. Runs can be
selected with an MLflow search filter, e.g. "tags.fastfill.policy = 'uncertainty'". A NaN
metric is reported (in the table and in `nan_metrics`), never dropped."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fastfill_udfs.config import Config
from fastfill_udfs.subgroups import subgroup_report
from fastfill_udfs.tracking import KIND_TAG, RANKING_TAG, RUN_TAG, configure_mlflow

log = logging.getLogger(__name__)
RUN_COLUMNS = ["run", "policy", "mlflow_run_id", "status", "ranking", "log_table", "mAP_auc",
               "top1_auc"]


def backfill_filter(filter_string: str | None = None) -> str:
    """The MLflow search filter for backfill runs, narrowed by the user's `filter_string`
    (MLflow syntax, clauses joined by `and`; e.g. "tags.fastfill.policy = 'uncertainty'")."""
    base = f"tags.`{KIND_TAG}` = 'backfill'"
    extra = (filter_string or "").strip()
    return f"{base} and {extra}" if extra else base


def backfill_runs(cfg: Config, run_prefix: str | None = None,
                  filter_string: str | None = None) -> pd.DataFrame:
    """Every MLflow run of a backfill run in the configured experiment (all rankings, oldest
    first), optionally only runs named `<prefix>_*` and matching `filter_string`; columns
    RUN_COLUMNS. Raises ValueError naming the filter when MLflow rejects it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    exp_id = configure_mlflow(cfg)
    try:
        runs = mlflow.search_runs([exp_id], filter_string=backfill_filter(filter_string),
                                  order_by=["attributes.start_time ASC"])
    except MlflowException as exc:
        raise ValueError(f"MLflow search filter {filter_string!r} is invalid: "
                         f"{exc.message}") from None
    if runs.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)

    def column(name):
        return runs[name] if name in runs else pd.Series([None] * len(runs), index=runs.index)

    out = pd.DataFrame({
        "run": column(f"tags.{RUN_TAG}"), "policy": column("tags.fastfill.policy"),
        "mlflow_run_id": runs["run_id"], "status": column("status"),
        "ranking": column(f"tags.{RANKING_TAG}"), "log_table": column("params.log_table"),
        "mAP_auc": column("metrics.mAP_auc"), "top1_auc": column("metrics.top1_auc"),
    })
    if run_prefix:
        out = out[out["run"].str.startswith(f"{run_prefix}_")]
    return out.reset_index(drop=True)


def find_runs(cfg: Config, run_prefix: str | None = None,
              filter_string: str | None = None) -> pd.DataFrame:
    """Backfill runs of the configured experiment, one row each (the latest ranking's):
    run, policy, mlflow_run_id, status, ranking, log_table, mAP_auc, top1_auc."""
    runs = backfill_runs(cfg, run_prefix, filter_string)
    # a re-ranked run has an MLflow run per ranking: the latest stands for it
    return runs.drop_duplicates("run", keep="last").reset_index(drop=True)


def current_runs(runs: pd.DataFrame, cfg: Config, spark=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split MLflow backfill runs into (current, left_out): a run is current when its ranking
    (tag fastfill.ranking) is the one its Delta backfill_log holds now (param log_table, else
    the configured warehouse's). left_out has run, mlflow_run_id and reason."""
    from fastfill_udfs.spark.delta_io import logged_ranking, table_paths
    from fastfill_udfs.spark.session import get_spark

    if runs.empty:
        return runs, pd.DataFrame(columns=["run", "mlflow_run_id", "reason"])
    spark = spark or get_spark(cfg["spark"])
    keep, left, rankings = [], [], {}
    for r in runs.itertuples():
        path = r.log_table if isinstance(r.log_table, str) and r.log_table else \
            table_paths(cfg, r.run).backfill_log
        if path not in rankings:
            rankings[path] = logged_ranking(spark, path)
        now = rankings[path]
        if now is None:
            left.append((r.run, r.mlflow_run_id, f"its tables are gone (no ranked backfill_log "
                                                 f"at {path})"))
        elif str(r.ranking) != now:
            left.append((r.run, r.mlflow_run_id, f"re-ranked since: this MLflow run belongs to "
                                                 f"ranking {r.ranking}, {path} holds {now}"))
        else:
            keep.append(r.Index)
    current = runs.loc[keep].drop_duplicates("run", keep="last").reset_index(drop=True)
    dup = runs.loc[keep].index.difference(runs.loc[keep].drop_duplicates("run", keep="last").index)
    left += [(runs.at[i, "run"], runs.at[i, "mlflow_run_id"],
              "an older MLflow run of the same ranking") for i in dup]
    return current, pd.DataFrame(left, columns=["run", "mlflow_run_id", "reason"])


def _histories(mlflow_run_id: str, keys: list[str] | None = None
               ) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """(per-step histories of the curve metrics, the run's logged final AUCs)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(mlflow_run_id)
    keys = keys or [k for k in run.data.metrics if not k.endswith("_auc")
                    and not k.startswith("new_new_")]
    finals = {k: v for k, v in run.data.metrics.items() if k.endswith("_auc")}
    return ({k: {m.step: m.value for m in client.get_metric_history(mlflow_run_id, k)}
             for k in keys}, finals)


def _wide(histories: dict[str, dict[int, float]]) -> pd.DataFrame:
    return pd.DataFrame({k: pd.Series(h, dtype="float64") for k, h in histories.items()}
                        ).sort_index()


def run_curves(mlflow_run_id: str, keys: list[str] | None = None) -> pd.DataFrame:
    """All logged per-step metrics of one run as a wide table indexed by step (NaN values
    kept as logged)."""
    return _wide(_histories(mlflow_run_id, keys)[0])


def nonfinite_values(histories: dict[str, dict[int, float]], finals: dict) -> str:
    """'mAP@3, top1@3, mAP_auc' for the logged NaN or infinite values of a run (per-step
    `histories`, logged `finals`); '' if none."""
    out = [f"{k}@{step}" for k, h in sorted(histories.items())
           for step, v in sorted(h.items()) if not math.isfinite(v)]
    out += [k for k, v in sorted(finals.items()) if not math.isfinite(float(v))]
    return ", ".join(out)


def synced_summary(curve: pd.DataFrame) -> dict:
    """{"synced": "+added ~changed -deleted", "n_gallery": items at the last step} from a run's
    curve when syncs reached it (metrics `synced_*`, `n_gallery`), else {}."""
    keys = ("synced_added", "synced_changed", "synced_deleted")
    if not all(k in curve for k in keys) or curve[list(keys)].dropna().empty:
        return {}
    last = curve[list(keys) + ["n_gallery"]].dropna().iloc[-1]
    return {"synced": f"+{int(last['synced_added'])} ~{int(last['synced_changed'])} "
                      f"-{int(last['synced_deleted'])}",
            "n_gallery": int(last["n_gallery"])}


@dataclass
class Comparison:
    """What `compare` found: the table of current runs, the plot, and the runs left out."""
    table: pd.DataFrame
    plot: Path | None
    left_out: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["run", "mlflow_run_id", "reason"]))
    out_dir: Path | None = None


def compare(cfg: Config, run_prefix: str | None = None, out_dir: str | Path | None = None,
            filter_string: str | None = None, spark=None) -> Comparison:
    """Tabulate and plot the current backfill runs (see the module docstring); writes
    comparison.csv/.md/.png and curves.csv into `out_dir` (default <paths.outputs>/compare),
    and left_out.csv when runs were left out. Raises ValueError on an invalid filter."""
    from fastfill_udfs.reporting import markdown_table, plot_curves

    out_dir = Path(out_dir or Path(cfg.resolve_path("paths.outputs")) / "compare")
    runs, left_out = current_runs(backfill_runs(cfg, run_prefix, filter_string), cfg, spark)
    for r in left_out.itertuples():
        log.warning("compare: left out MLflow run %s of %s: %s", r.mlflow_run_id, r.run, r.reason)
    curves, rows, skipped = [], [], []
    for r in runs.itertuples():
        histories, finals = _histories(r.mlflow_run_id)
        c = _wide(histories)
        if c.empty or "mAP" not in c:
            skipped.append((r.run, r.mlflow_run_id, "no mAP logged yet (not evaluated)"))
            continue
        nan = nonfinite_values(histories, finals)
        if nan:
            log.warning("compare: run %s has non-finite metrics: %s", r.run, nan)
        c = c.assign(policy=r.policy, run=r.run)
        curves.append(c.reset_index(names="step"))
        rows.append({"run": r.run, "policy": r.policy, "status": r.status,
                     "mAP_auc": r.mAP_auc, "top1_auc": r.top1_auc,
                     "mAP_t0": c["mAP"].iloc[0], "mAP_final": c["mAP"].iloc[-1],
                     "steps": len(c), "nan_metrics": nan, **synced_summary(c)})
    left_out = pd.concat([left_out, pd.DataFrame(skipped, columns=left_out.columns)],
                         ignore_index=True) if skipped else left_out
    out_dir.mkdir(parents=True, exist_ok=True)
    if not left_out.empty:
        left_out.to_csv(out_dir / "left_out.csv", index=False)
    if not rows:
        log.warning("no current backfill runs with a curve in MLflow experiment %s%s",
                    cfg.get_path("mlflow.experiment"),
                    f" matching {filter_string!r}" if filter_string else "")
        return Comparison(pd.DataFrame(rows), None, left_out, out_dir)
    table = pd.DataFrame(rows)
    if "synced" in table:   # a moving gallery: say so for every run (docs/moving_gallery.md)
        table["synced"] = table["synced"].fillna("none")
        table["n_gallery"] = table["n_gallery"].astype("Int64")
    table.to_csv(out_dir / "comparison.csv", index=False)
    (out_dir / "comparison.md").write_text(markdown_table(table) + "\n")
    long = pd.concat(curves, ignore_index=True)
    long.to_csv(out_dir / "curves.csv", index=False)
    png = plot_curves(long, out_dir / "comparison.png", policy_column="run",
                      title="Backfill runs: retrieval vs backfill fraction")
    subgroups = sorted(c[len("top1_shortfall_"):] for c in long.columns
                       if c.startswith("top1_shortfall_"))
    if subgroups:
        minority = cfg.get_path("data.subgroups.minority_name")
        plot_subgroup_curves(long, subgroups, out_dir / "subgroups.png", minority=minority)
        if f"top1_shortfall_{minority}" in long.columns:
            share_key = f"{minority}_share_first_10pct"
            shares = {r: float(g[share_key].dropna().iloc[0]) for r, g in long.groupby("run")
                      if share_key in g and g[share_key].notna().any()}
            report = subgroup_report(long, minority, shares)
            report.to_csv(out_dir / "subgroups.csv", index=False)
            (out_dir / "subgroups.md").write_text(markdown_table(report) + "\n")
    return Comparison(table, png, left_out, out_dir)


def compare_runs(cfg: Config, run_prefix: str | None = None,
                 out_dir: str | Path | None = None, filter_string: str | None = None,
                 spark=None) -> tuple[pd.DataFrame, Path | None]:
    """`compare` as (table, plot path or None when no runs)."""
    found = compare(cfg, run_prefix, out_dir, filter_string, spark)
    return found.table, found.plot


def plot_subgroup_curves(long: pd.DataFrame, subgroups: list[str], path: Path,
                         minority: str | None = None) -> Path:
    """Panels against the backfill fraction: top-1 per subgroup, then each subgroup's top-1 and
    (when logged) mAP shortfall against its own new/new level, with the 1-point line. One
    colour per run, solid for the minority, dashed for the others."""
    from fastfill_udfs.reporting import pyplot, save_figure

    panels = [("top1_{}", 1, "top-1 per subgroup", "top-1 (queries of that subgroup)")]
    for metric in ("top1", "mAP"):
        if all(f"{metric}_shortfall_{g}" in long.columns for g in subgroups):
            panels.append((f"{metric}_shortfall_{{}}", 100, f"{metric} shortfall vs new/new",
                           f"{metric} shortfall against own new/new level (points)"))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (column, scale, title, ylabel) in zip(axes[0], panels):
        for i, (run, group) in enumerate(long.groupby("run", sort=False)):
            group = group.sort_values("backfill_fraction")
            for name in subgroups:
                ax.plot(group["backfill_fraction"], scale * group[column.format(name)],
                        color=colours[i % len(colours)],
                        linestyle="-" if name == minority else "--", label=f"{run}: {name}")
        if scale == 100:
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":", label="1 point")
        ax.set(title=title, ylabel=ylabel, xlabel="backfill fraction t", xlim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, path)
