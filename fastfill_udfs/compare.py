"""Compare backfill runs tracked in MLflow: a table (policy, AUCs, first and final mAP) and one
plot overlaying their curves (overall and, when logged, per subgroup)."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from fastfill_udfs.config import Config
from fastfill_udfs.subgroups import subgroup_report
from fastfill_udfs.tracking import RUN_TAG, configure_mlflow

log = logging.getLogger(__name__)


def find_runs(cfg: Config, run_prefix: str | None = None) -> pd.DataFrame:
    """Backfill runs of the configured experiment (optionally only runs named `<prefix>_*`),
    one row each (the latest ranking's): run, policy, mlflow_run_id, mAP_auc, top1_auc."""
    import mlflow

    exp_id = configure_mlflow(cfg)
    runs = mlflow.search_runs([exp_id], filter_string="tags.`fastfill.kind` = 'backfill'",
                              order_by=["attributes.start_time ASC"])
    if runs.empty:
        return pd.DataFrame(columns=["run", "policy", "mlflow_run_id", "mAP_auc", "top1_auc"])
    out = pd.DataFrame({
        "run": runs[f"tags.{RUN_TAG}"], "policy": runs["tags.fastfill.policy"],
        "mlflow_run_id": runs["run_id"],
        "mAP_auc": runs.get("metrics.mAP_auc"), "top1_auc": runs.get("metrics.top1_auc"),
    })
    if run_prefix:
        out = out[out["run"].str.startswith(f"{run_prefix}_")]
    # a re-ranked run has an MLflow run per ranking: the latest stands for it
    return out.drop_duplicates("run", keep="last").reset_index(drop=True)


def run_curves(mlflow_run_id: str, keys: list[str] | None = None) -> pd.DataFrame:
    """All logged per-step metrics of one run as a wide table indexed by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(mlflow_run_id)
    keys = keys or [k for k in run.data.metrics if not k.endswith("_auc")
                    and not k.startswith("new_new_")]
    cols = {k: pd.Series({m.step: m.value for m in client.get_metric_history(mlflow_run_id, k)})
            for k in keys}
    return pd.DataFrame(cols).sort_index()


def compare_runs(cfg: Config, run_prefix: str | None = None,
                 out_dir: str | Path | None = None) -> tuple[pd.DataFrame, Path | None]:
    """Tabulate and plot the backfill runs; writes comparison.csv/.md/.png into `out_dir`
    (default <paths.outputs>/compare). Returns (table, plot path or None when no runs)."""
    from fastfill_udfs.reporting import markdown_table, plot_curves

    runs = find_runs(cfg, run_prefix)
    out_dir = Path(out_dir or Path(cfg.resolve_path("paths.outputs")) / "compare")
    if runs.empty:
        log.warning("no backfill runs found in MLflow experiment %s",
                    cfg.get_path("mlflow.experiment"))
        return runs, None
    curves, rows = [], []
    for r in runs.itertuples():
        c = run_curves(r.mlflow_run_id)
        if c.empty or "mAP" not in c:
            continue
        c = c.assign(policy=r.policy, run=r.run)
        curves.append(c.reset_index(names="step"))
        rows.append({"run": r.run, "policy": r.policy, "mAP_auc": r.mAP_auc,
                     "top1_auc": r.top1_auc, "mAP_t0": c["mAP"].iloc[0],
                     "mAP_final": c["mAP"].iloc[-1], "steps": len(c)})
    table = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    return table, png


def plot_subgroup_curves(long: pd.DataFrame, subgroups: list[str], path: Path,
                         minority: str | None = None) -> Path:
    """Panels against the backfill fraction: top-1 per subgroup, then each subgroup's top-1 and
    (when logged) mAP shortfall against its own new/new level, with the 1-point line. One
    colour per run, solid for the minority, dashed for the others."""
    from fastfill_udfs.reporting import _pyplot

    panels = [("top1_{}", 1, "top-1 per subgroup", "top-1 (queries of that subgroup)")]
    for metric in ("top1", "mAP"):
        if all(f"{metric}_shortfall_{g}" in long.columns for g in subgroups):
            panels.append((f"{metric}_shortfall_{{}}", 100, f"{metric} shortfall vs new/new",
                           f"{metric} shortfall against own new/new level (points)"))
    plt = _pyplot()
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
