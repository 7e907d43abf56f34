"""Plots and tables for the study and the backfill runs: pure functions from DataFrames to files
(matplotlib on the non-interactive Agg backend, so they run on a headless driver or worker)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

# Fixed colours and labels so every plot of the project reads the same.
POLICY_STYLE = {
    "fct_random": ("FCT, random order", "tab:gray", "--"),
    "fastfill_random": ("FastFill, random order", "tab:blue", "-."),
    "fastfill_uncertainty": ("FastFill, uncertainty order", "tab:red", "-"),
    "fastfill_oracle": ("FastFill, oracle order (ceiling)", "tab:green", ":"),
    "fastfill_benefit": ("FastFill, benefit-head order", "tab:orange", "-"),
    "fastfill_prototype": ("FastFill, prototype order (no classifier)", "tab:olive", "-."),
    "random": ("random order", "tab:gray", "--"),
    "uncertainty": ("uncertainty order", "tab:red", "-"),
    "oracle": ("oracle order (ceiling)", "tab:green", ":"),
}
REFERENCE_STYLE = {"old/old": "black", "new/new": "tab:purple"}
LOSS_LABELS = {
    "old": "cross-entropy", "new": "cross-entropy",
    "h_fastfill": "FastFill loss (Gaussian NLL)", "h_fct": "FCT loss (L2, unit-RMS space)",
}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _require_columns(df: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing}; has {list(df.columns)}")


def save_figure(fig, path: str | Path, *, title: str | None = None, dpi: int = 110) -> Path:
    """Write the matplotlib figure `fig` to `path` (its folder created) with `title` as its
    suptitle, laid out tight, and close it; returns the path."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_curves(curves_df: pd.DataFrame, path: str | Path, metric: str = "mAP",
                references: pd.DataFrame | Mapping[str, Mapping[str, float]] | None = None,
                title: str = "Backfilling curves", second_metric: str | None = "top1",
                policy_column: str = "policy") -> Path:
    """Plot metric vs backfill_fraction, one line per policy, to `path` (PNG by extension).

    `curves_df`: long table with `policy_column`, `backfill_fraction`, `metric` (and
    `second_metric`, drawn in a second panel to the right when present). `references`: either a
    DataFrame with a `setting` column and metric columns (rows "old/old", "new/new" are drawn) or
    a mapping setting -> {metric: value}; drawn as dashed horizontal lines. Returns the path."""
    _require_columns(curves_df, [policy_column, "backfill_fraction", metric], "curves_df")
    metrics = [metric]
    if second_metric and second_metric in curves_df.columns and second_metric != metric:
        metrics.append(second_metric)
    refs = _reference_values(references)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.0 * len(metrics), 4.5), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for policy, group in curves_df.groupby(policy_column, sort=False):
            group = group.sort_values("backfill_fraction")
            label, color, style = POLICY_STYLE.get(str(policy), (str(policy), None, "-"))
            ax.plot(group["backfill_fraction"], group[m], linestyle=style, color=color,
                    label=label, linewidth=1.8)
        lo, hi = _axis_range(curves_df[m], refs, m)
        for setting, values in refs.items():
            value = values.get(m)
            if value is None or not math.isfinite(value):
                continue
            color = REFERENCE_STYLE.get(setting, "tab:brown")
            if lo <= value <= hi:
                ax.axhline(value, color=color, linestyle=(0, (4, 3)), linewidth=1.0, alpha=0.8,
                           label=f"{setting} ({value:.3f})")
            else:  # far below the curves (old/old): name it rather than squash the curves
                ax.plot([], [], color=color, linestyle=(0, (4, 3)), linewidth=1.0,
                        label=f"{setting} ({value:.3f}, off scale)")
        ax.set_ylim(lo, hi)
        ax.set_xlabel("backfill fraction t (share of gallery re-embedded by the new model)")
        ax.set_ylabel(m)
        ax.set_xlim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.set_title(f"{m} vs backfill fraction")
        ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path, title=title, dpi=120)


def _axis_range(values: pd.Series, refs: Mapping[str, Mapping[str, float]], metric: str
                ) -> tuple[float, float]:
    """y-range around the curves, stretched to reference values that lie near them (new/new),
    but not to one far below (old/old), which would flatten the differences between curves."""
    lo, hi = float(values.min()), float(values.max())
    span = max(hi - lo, 1e-3)
    for vals in refs.values():
        v = vals.get(metric)
        if v is not None and math.isfinite(v) and lo - span <= v <= hi + span:
            lo, hi = min(lo, v), max(hi, v)
    pad = 0.08 * max(hi - lo, 1e-3)
    # room at the bottom for the legend
    return lo - 4 * pad, hi + pad


def _reference_values(references) -> dict[str, dict[str, float]]:
    if references is None:
        return {}
    if isinstance(references, pd.DataFrame):
        _require_columns(references, ["setting"], "references")
        rows = references[references["setting"].isin(list(REFERENCE_STYLE))]
        return {r["setting"]: {k: float(v) for k, v in r.items()
                               if k != "setting" and _is_number(v)}
                for r in rows.to_dict("records")}
    return {str(k): {m: float(v) for m, v in vals.items()} for k, vals in references.items()}


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, bool)


def plot_loss_curves(histories: Mapping[str, object], path: str | Path,
                     title: str = "Training loss per epoch") -> Path:
    """One panel per model: mean training loss vs epoch. `histories` maps a model name
    ("old", "new", "h_fastfill", ...) to a `training.History` (or anything with a `loss`
    list). Each panel has its own y scale (the objectives differ in scale; the FastFill loss
    can go negative). Returns the path."""
    if not histories:
        raise ValueError("histories is empty: nothing to plot")
    plt = pyplot()
    n = len(histories)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, hist) in zip(axes.flat, histories.items()):
        loss = [float(v) for v in getattr(hist, "loss", hist)]
        ax.plot(range(1, len(loss) + 1), loss, marker="o" if len(loss) <= 20 else None,
                markersize=3, color="tab:blue")
        if loss and min(loss) > 0 and max(loss) / min(loss) > 20:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(LOSS_LABELS.get(name, "loss"))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return save_figure(fig, path, title=title)


def _format_cell(value, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return format(value, floatfmt)
    try:  # numpy scalars
        import numpy as np

        if isinstance(value, np.floating):
            return "" if np.isnan(value) else format(float(value), floatfmt)
        if isinstance(value, np.integer):
            return str(int(value))
    except ImportError:  # pragma: no cover
        pass
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4f", index: bool = False) -> str:
    """A GitHub-flavoured markdown table of `df` (floats formatted with `floatfmt`, numeric
    columns right-aligned). No third-party formatter needed."""
    frame = df.reset_index() if index else df
    headers = [str(c) for c in frame.columns]
    body = [[_format_cell(v, floatfmt) for v in row]
            for row in frame.itertuples(index=False, name=None)]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    widths = [max([len(h)] + [len(r[i]) for r in body] + [3]) for i, h in enumerate(headers)]

    def line(cells):
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in body])


def plot_forecast(forecast, path: str | Path, *, realised: pd.DataFrame | None = None,
                  key: str | None = None, top: int = 3, title: str | None = None) -> Path:
    """The forecast as a picture, to `path` (PNG): left, the forecast curves in its own units
    (the chosen order with its band, the next best `top` candidates, random order's mean and
    spread); right, the share of the t0 -> t=1 gain reached at each fraction (the normalised
    curve), with the `realised` run's curve beside it when given (a DataFrame with
    `backfill_fraction` and `gain_share`) and the recommended stop marked.
    `forecast`: a :class:`fastfill_udfs.forecast.Forecast`; `key` the candidate drawn as
    the run's order (default: the chosen one). Returns the path."""
    import numpy as np

    from fastfill_udfs.forecast import gain_share

    x = np.asarray(forecast.fractions, np.float64)
    chosen = forecast.chosen if key is None else forecast.candidate(key)
    others = [c for c in sorted(forecast.candidates, key=lambda c: -c["auc"])
              if c["key"] not in (chosen["key"], "random")][:top]
    rand = next((c for c in forecast.candidates if c["key"] == "random"), None)
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12.0, 4.6))
    for ax, normalise in ((left, False), (right, True)):
        def y(curve):
            return gain_share(curve) if normalise else np.asarray(curve, np.float64)
        if rand is not None:
            ax.plot(x, y(rand["curve"]), color="tab:gray", linestyle="--",
                    label=f"random order (mean of {len(forecast.random_aucs)})")
        for c in others:
            ax.plot(x, y(c["curve"]), linewidth=1.0, alpha=0.7, label=c["key"])
        ax.plot(x, y(chosen["curve"]), color="tab:red", linewidth=2.2,
                label=("chosen: " if chosen["key"] == forecast.decision["key"] else "this run: ")
                + chosen["key"])
        if not normalise:
            ax.fill_between(x, chosen["curve_lo"], chosen["curve_hi"], color="tab:red",
                            alpha=0.15, label=f"{forecast.info.get('band', 0.9):.0%} band")
        stop = forecast.stop.get("fraction")
        if stop is not None:
            ax.axvline(stop, color="tab:purple", linestyle=":", linewidth=1.2,
                       label=f"recommended stop t={stop:.2f}")
        if normalise and realised is not None and len(realised):
            r = realised.sort_values("backfill_fraction")
            ax.plot(r["backfill_fraction"], r["gain_share"], color="black", marker="o",
                    markersize=3, linewidth=1.6, label="realised (this run)")
        ax.set_xlim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.set_xlabel("backfill fraction t")
        ax.set_ylabel("share of the t0 -> t=1 gain" if normalise else
                      f"{forecast.metric} (held-out sample)")
        ax.set_title("normalised: forecast vs realised" if normalise else
                     f"forecast {forecast.metric} per candidate order")
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, title=title or f"Backfill forecast: {forecast.decision['key']}",
                       dpi=120)
