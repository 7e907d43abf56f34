"""Forecast the backfill before it starts, and choose its order (no Spark).

The pairs `train_transformation` embeds with the new model and holds out from `h` have both
embeddings: they are a small copy of the backfill in which every candidate order can be tried
before a single gallery item is re-embedded. :func:`forecast_orders` simulates, on those
held-out items, the backfilling curve of every candidate:

* components: h's own sigma (the paper's head), a benefit head (fitted to each item's realised
  benefit of being backfilled), the prototype margin (second-nearest minus nearest class
  prototype of h(old): items between two classes), the distance to the nearest prototype
  (atypical items), and blends; each in both directions; each with and without the
  mixed-gallery calibration (:mod:`fastfill_udfs.calibration`, affine); and random orders
  (several permutations, for random order's own spread);
* cross-fitted: the held-out items are split into folds, and whatever a candidate fits (the
  benefit head, the blend's quantiles, the calibration) is fitted on the other folds before it
  scores a fold, so no order is scored on the items it was fitted on;
* queries: the user's labelled queries (new embeddings) where given, else the held-out items
  themselves, leave-one-out; the backfill starts from the share of the gallery that is already
  new (h's training pairs) and steps along the given fractions;
* units: mAP and top-1, as the evaluation logs them, and the label-free ``agreement@k`` (the
  share of each query's top-k in the mixed gallery that is also in its top-k in the all-new
  gallery); without labels the forecast decides on agreement alone;
* band: a bootstrap over the held-out items (as queries): central ``band`` intervals of every
  curve point, every AUC and every candidate's gain over random order's mean.

:func:`choose_order` (called by it) takes the best candidate when it beats every random
permutation and its gain's band lies above zero; otherwise random order, and says so.
:func:`recommend_stop` gives the fraction at which the chosen curve comes within epsilon of
its end point (new/new), and its peak when the mixed gallery beats new/new.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from fastfill_udfs.metrics import DISTANCES, retrieval_metrics, similarity_scores

log = logging.getLogger(__name__)

__all__ = ["Candidate", "Forecast", "forecast_fractions", "share_gap", "forecast_orders", "choose_order", "recommend_stop",
           "neighbour_agreement", "reference_neighbours", "fit_auto_order", "gain_share",
           "forecast_settings", "copy_auto_order",
           "FORECAST_VERSION"]

FORECAST_VERSION = 1
QUANTILE_LEVELS = 101
# the default forecast grid, as shares of the backfill after its start: dense early, where the
# orders differ most
GRID = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
        1.0)
CALIBRATED_BASES = 3      # calibrated variants are tried for the best few uncalibrated orders
# base order -> terms (component, weight, descending); weight None = the margin blend's weight
BASES: dict[str, tuple] = {
    "sigma": (("sigma", 1.0, True),),
    "benefit": (("benefit", 1.0, True),),
    "margin": (("margin", 1.0, False),),           # smallest margin (between two classes) first
    "distance": (("distance", 1.0, True),),        # farthest from every prototype first
    "benefit+margin": (("benefit", None, True), ("margin", None, False)),
    "sigma+margin": (("sigma", 0.5, True), ("margin", 0.5, False)),
}


@dataclass(frozen=True)
class Candidate:
    """One candidate order: a base order of :data:`BASES` (or ``random``), its direction and
    whether the transformed items are scored through the mixed-gallery calibration."""
    base: str
    reverse: bool = False
    calibrated: bool = False

    @property
    def key(self) -> str:
        return (self.base + (" reversed" if self.reverse else "")
                + (" + calibration" if self.calibrated else ""))

    @classmethod
    def from_key(cls, key: str) -> "Candidate":
        calibrated = key.endswith(" + calibration")
        key = key[: -len(" + calibration")] if calibrated else key
        reverse = key.endswith(" reversed")
        base = key[: -len(" reversed")] if reverse else key
        if base not in BASES and base != "random":
            raise ValueError(f"unknown candidate order {base!r}; known: {sorted(BASES)} and "
                             "'random'")
        return cls(base, reverse, calibrated)


@dataclass
class Forecast:
    """What the held-out sample says each candidate order will buy (see the module docstring).

    ``metric`` is what the decision used (``mAP`` with labels, else ``agreement@k``);
    ``fractions`` the backfill fractions of every curve; ``candidates`` one dict per candidate
    (key, auc, auc_lo/hi, gain (over random's mean), gain_lo/hi, curve, curve_lo/hi, and the
    other metrics' curves and AUCs); ``random_aucs`` the AUC of each random permutation;
    ``decision`` (key, reason, beats_random, decided); ``stop`` (see :func:`recommend_stop`)."""
    metric: str
    fractions: list
    candidates: list
    random_aucs: list
    decision: dict
    stop: dict
    info: dict = field(default_factory=dict)

    def candidate(self, key: str) -> dict:
        for c in self.candidates:
            if c["key"] == key:
                return c
        raise KeyError(f"no candidate {key!r} in this forecast")

    @property
    def chosen(self) -> dict:
        return self.candidate(self.decision["key"])

    def to_json(self) -> str:
        return json.dumps({"version": FORECAST_VERSION, "metric": self.metric,
                           "fractions": self.fractions, "candidates": self.candidates,
                           "random_aucs": self.random_aucs, "decision": self.decision,
                           "stop": self.stop, "info": self.info}, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "Forecast":
        d = json.loads(text)
        if d.get("version") != FORECAST_VERSION:
            raise ValueError(f"forecast version {d.get('version')!r} is not {FORECAST_VERSION}")
        return cls(d["metric"], d["fractions"], d["candidates"], d["random_aucs"],
                   d["decision"], d["stop"], d.get("info", {}))

    def table(self):
        """The candidates as a DataFrame, best forecast AUC first."""
        import pandas as pd

        cols = ["key", "auc", "auc_lo", "auc_hi", "gain", "gain_lo", "gain_hi"]
        extra = [c for c in ("mAP_auc", "top1_auc", "agreement_auc") if c in self.candidates[0]]
        df = pd.DataFrame([{k: c.get(k) for k in cols + extra} for c in self.candidates])
        return df.sort_values("auc", ascending=False).reset_index(drop=True)

    def summary_lines(self, top: int = 8) -> list[str]:
        """What `rank_gallery` prints: the setting, the best candidates with their bands,
        random order's spread, the decision with its reason, and the recommended stop."""
        i, d, s = self.info, self.decision, self.stop
        lines = [f"forecast on {i.get('n_items')} held-out items ({i.get('n_probe', 0)} of "
                 f"them probes), {i.get('n_queries')} queries ({i.get('queries')}); metric "
                 f"{self.metric} AUC over backfill fraction {self.fractions[0]:.2f}..1, band "
                 f"{i.get('band', 0.9):.0%} (bootstrap over held-out items)",
                 f"  {'candidate order':<36} {'AUC':>8} {'band':>17} {'vs random':>10}"]
        table = self.table()
        shown = table.head(top)
        if d["key"] not in set(shown["key"]):
            shown = table[(table.index < top - 1) | (table["key"] == d["key"])]
        for row in shown.itertuples():
            mark = " <- chosen" if row.key == d["key"] else ""
            lines.append(f"  {row.key:<36} {row.auc:8.4f} {row.auc_lo:8.4f}-{row.auc_hi:<8.4f} "
                         f"{row.gain:+10.4f}{mark}")
        r = np.asarray(self.random_aucs)
        lines.append(f"  random order, {len(r)} permutations: mean {r.mean():.4f}, sd "
                     f"{r.std(ddof=1) if len(r) > 1 else 0.0:.4f}, max {r.max():.4f}")
        lines.append(f"decision: {d['key']}: {d['reason']}")
        lines.append(f"where to stop: {s['reason']}")
        return lines


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-able: {type(x).__name__}")


# ----------------------------------------------------------------------------- agreement
def reference_neighbours(query_emb, gallery_new, k: int, *, distance: str = "l2",
                         query_ids=None, gallery_ids=None) -> np.ndarray:
    """Per query, the indices of its top-``k`` items in the all-new gallery (Q x k, int64),
    leaving a query's own item out when ids are given: the reference of
    :func:`neighbour_agreement`."""
    return _topk(query_emb, gallery_new, k, distance=distance, query_ids=query_ids,
                 gallery_ids=gallery_ids)


def _own_positions(query_ids, gallery_ids, nq: int) -> np.ndarray | None:
    """Per query, the gallery row with its own id (-1: none), for leave-one-out."""
    if query_ids is None:
        return None
    pos = {g: i for i, g in enumerate(np.asarray(gallery_ids).astype(str).tolist())}
    own = np.array([pos.get(q, -1) for q in np.asarray(query_ids).astype(str).tolist()],
                   np.int64)
    if len(own) != nq:
        raise ValueError(f"query_ids must have {nq} entries, got {len(own)}")
    return own


def _topk(q, g, k, *, distance, query_ids=None, gallery_ids=None, scale=None, bias=None,
          own=None, block: int = 2048) -> np.ndarray:
    q, g = np.asarray(q), np.asarray(g)
    if not 1 <= k < len(g):
        raise ValueError(f"k must be in [1, {len(g) - 1}] for a gallery of {len(g)}, got {k}")
    if own is None:
        own = _own_positions(query_ids, gallery_ids, len(q))
    out = np.empty((len(q), k), np.int64)
    for lo in range(0, len(q), block):
        hi = min(lo + block, len(q))
        s = similarity_scores(q[lo:hi], g, distance=distance, gallery_scale=scale,
                              gallery_bias=bias)
        if own is not None:
            r = np.flatnonzero(own[lo:hi] >= 0)
            s[r, own[lo:hi][r]] = -np.inf
        out[lo:hi] = np.argpartition(-s, k - 1, axis=1)[:, :k]
    return out


def neighbour_agreement(query_emb, gallery_emb, reference: np.ndarray, *, distance: str = "l2",
                        query_ids=None, gallery_ids=None, gallery_scale=None,
                        gallery_bias=None, own=None) -> np.ndarray:
    """Per query, the share of its top-k items in ``gallery_emb`` (a mixed gallery, scored
    with the optional per-item correction) that are also among its ``reference`` top-k (Q x k
    indices into the same gallery rows, :func:`reference_neighbours` of the all-new gallery).
    1 means the mixed gallery retrieves what the new model alone would; it needs no labels.
    ``own`` (per query, the gallery row to leave out, -1 for none) may replace the ids.
    Raises ValueError on bad shapes."""
    ref = np.asarray(reference)
    if ref.ndim != 2 or len(ref) != len(query_emb):
        raise ValueError(f"reference must be (queries x k), got shape {ref.shape}")
    k = ref.shape[1]
    got = _topk(query_emb, gallery_emb, k, distance=distance, query_ids=query_ids,
                gallery_ids=gallery_ids, scale=gallery_scale, bias=gallery_bias, own=own)
    return (got[:, :, None] == ref[:, None, :]).any(axis=2).sum(axis=1) / k


# ----------------------------------------------------------------------------- fitting
def _quantiles(x: np.ndarray) -> list:
    return np.quantile(np.asarray(x, np.float64), np.linspace(0, 1, QUANTILE_LEVELS)).tolist()


def order_spec(candidate: Candidate, quantiles: dict, margin_weight: float,
               calibration: dict | None = None) -> dict:
    """The order spec (:func:`fastfill_udfs.models.order_priority`) of a non-random
    ``candidate``, with each blended term's ``quantiles`` (component -> list) and the blend's
    ``margin_weight``; ``calibration`` is carried along for the index. Raises ValueError for
    the random candidate or a missing quantile."""
    from fastfill_udfs.models import ORDER_SPEC_VERSION

    if candidate.base == "random":
        raise ValueError("the random order has no spec of terms")
    terms = BASES[candidate.base]
    blend = len(terms) > 1
    out = []
    for name, weight, descending in terms:
        if weight is None:
            weight = margin_weight if name == "margin" else 1.0 - margin_weight
        if blend and name not in quantiles:
            raise ValueError(f"no quantiles of component {name!r} for the blend "
                             f"{candidate.base!r}")
        out.append({"component": name, "weight": float(weight), "descending": bool(descending),
                    "quantiles": quantiles[name] if blend else None})
    return {"version": ORDER_SPEC_VERSION, "name": candidate.key, "terms": out,
            "reverse": bool(candidate.reverse), "calibration": calibration}


def random_spec(seed: int, calibration: dict | None = None) -> dict:
    from fastfill_udfs.models import ORDER_SPEC_VERSION

    return {"version": ORDER_SPEC_VERSION, "name": "random" + (" + calibration"
                                                               if calibration else ""),
            "random": True, "seed": int(seed), "calibration": calibration}


def _components(h, heads: dict, old: np.ndarray) -> dict[str, np.ndarray]:
    """Order components of `old` items: h's output through each of `heads` and, with
    prototypes on h, margin and distance (as `Transformation.order_components`)."""
    import torch

    from fastfill_udfs.models import prototype_geometry

    with torch.inference_mode():
        out = h.eval().mlp(torch.from_numpy(np.ascontiguousarray(old, dtype=np.float32)))
        comps = {name: head.eval()(out).squeeze(1) for name, head in heads.items()}
        if h.prototypes is not None:
            comps.update(prototype_geometry(out, h.prototypes))
        return {k: v.double().numpy() for k, v in comps.items()}


def _priority(spec: dict, comps: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    from fastfill_udfs.models import order_priority

    return order_priority(spec, {k: torch.from_numpy(v) for k, v in comps.items()}).numpy()


@dataclass
class _Fitted:
    heads: dict                  # component -> head module (sigma, benefit)
    quantiles: dict              # component -> quantiles over the fit items
    calibration: dict | None     # affine mixed-gallery calibration, or None


def _fit_parts(h, sigma_head, old, new, labels, *, distance: str, head_hidden_dim: int,
               top1_weight: float, seed: int, benefit: bool, calibrate: bool) -> _Fitted:
    """Fit what the candidates read (the benefit head, quantiles, the calibration) on items."""
    from fastfill_udfs.calibration import fit_calibration
    from fastfill_udfs.order_fitting import realised_benefit
    from fastfill_udfs.training import benefit_head, transform

    heads = {} if sigma_head is None else {"sigma": sigma_head}
    t = None
    if benefit:
        t, _ = transform(h, old)
        b = realised_benefit(new.astype(np.float64), labels, t.astype(np.float64),
                             distance=distance, top1_weight=top1_weight)
        heads["benefit"] = benefit_head(h, old, b, head_hidden_dim=head_hidden_dim, seed=seed)
    comps = _components(h, heads, old)
    quantiles = {k: _quantiles(v) for k, v in comps.items()}
    cal = None
    if calibrate:
        if t is None:
            t, _ = transform(h, old)
        ids = np.arange(len(labels))
        try:
            cal = fit_calibration(new, labels, new, t, labels, distance=distance,
                                  query_ids=ids, gallery_ids=ids, seed=seed)
        except ValueError as exc:
            log.info("forecast: no calibration on these items (%s)", exc)
    return _Fitted(heads, quantiles, cal)


def _folds(n: int, labels, k: int, seed: int) -> np.ndarray:
    """Fold id per item, class-balanced where there are labels."""
    rng = np.random.default_rng(seed)
    fold = np.empty(n, np.int64)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c)
                                                    for c in np.unique(labels)]
    offset = 0
    for g in groups:
        g = rng.permutation(g)
        fold[g] = (np.arange(len(g)) + offset) % k
        offset += len(g)
    return fold


# ----------------------------------------------------------------------------- simulation
class _Simulator:
    """Per-query metrics of the held-out gallery at each fraction, for any order."""

    def __init__(self, transformed, new, labels, queries, query_labels, query_ids, gallery_ids,
                 fractions, start, distance, agreement_k, dtype="float32"):
        self.t, self.n = transformed, new
        self.labels, self.queries, self.query_labels = labels, queries, query_labels
        self.qids, self.gids = query_ids, gallery_ids
        self.fractions, self.start = np.asarray(fractions), start
        self.distance, self.dtype = distance, dtype
        n = len(new)
        self.counts = np.clip(np.floor(self.fractions * n + 0.5).astype(np.int64), len(start), n)
        self.k = int(min(agreement_k, n - 2))
        self.own = _own_positions(query_ids, gallery_ids, len(queries))
        self.reference = _topk(queries, new, self.k, distance=distance, own=self.own)
        self.labelled = labels is not None
        self.query_index = None

    def run(self, priority: np.ndarray | None, order: np.ndarray | None = None,
            cal_scale=None, cal_bias=None) -> dict[str, np.ndarray]:
        """{metric: (fractions x counted queries)} for the order of ``priority`` over the
        items not in the start set (or an explicit ``order`` of them)."""
        n = len(self.n)
        rest = np.setdiff1d(np.arange(n), self.start)
        if order is None:
            order = rest[np.lexsort((rest, -priority[rest]))]
        seq = np.concatenate([self.start, order])
        gallery = self.t.copy()
        scale = None if cal_scale is None else np.asarray(cal_scale, np.float64).copy()
        bias = None if cal_bias is None else np.asarray(cal_bias, np.float64).copy()
        out = {m: [] for m in (("mAP", "top1", "agreement") if self.labelled else ("agreement",))}
        done = 0
        for c in self.counts:
            if c > done:
                idx = seq[done:c]
                gallery[idx] = self.n[idx]
                if scale is not None:
                    scale[idx], bias[idx] = 1.0, 0.0
                done = c
            if self.labelled:
                m = retrieval_metrics(self.queries, self.query_labels, gallery, self.labels,
                                      query_ids=self.qids, gallery_ids=self.gids, topk=(1,),
                                      distance=self.distance, dtype=self.dtype,
                                      gallery_scale=scale, gallery_bias=bias, per_query=True)
                if self.query_index is None:
                    self.query_index = m["query_index"]
                out["mAP"].append(m["ap"])
                out["top1"].append(m["hit1"].astype(np.float64))
            out["agreement"].append(neighbour_agreement(
                self.queries, gallery, self.reference, distance=self.distance,
                gallery_scale=scale, gallery_bias=bias, own=self.own))
        return {m: np.stack(v) for m, v in out.items()}


def _auc_weights(fractions: np.ndarray) -> np.ndarray:
    """Weights w with AUC = w @ curve: trapezoid over the fractions, held flat before the
    first point (the run's batch 0, already partly new) and after the last, as
    `spark.evaluate.run_curve_auc` does."""
    x = np.asarray(fractions, np.float64)
    w = np.zeros(len(x))
    d = np.diff(x)
    w[:-1] += d / 2.0
    w[1:] += d / 2.0
    w[0] += x[0]
    w[-1] += 1.0 - x[-1]
    return w


def gain_share(curve, start: float | None = None, end: float | None = None) -> np.ndarray:
    """The normalised curve: the share of the gain from its first to its last point reached at
    each point ((c - c[0]) / (c[-1] - c[0]); NaN when the two are equal)."""
    c = np.asarray(curve, np.float64)
    a = c[0] if start is None else start
    b = c[-1] if end is None else end
    return (c - a) / (b - a) if b != a else np.full(len(c), np.nan)


def forecast_fractions(forecast: "Forecast", fractions, key: str | None = None) -> dict:
    """The forecast curve of candidate `key` (default: the chosen one) at the run's own
    backfill `fractions`, linearly interpolated: {"curve", "lo", "hi", "gain_share"} (the band
    only where the candidate has one)."""
    x = np.asarray(forecast.fractions, np.float64)
    c = forecast.chosen if key is None else forecast.candidate(key)
    at = np.asarray(fractions, np.float64)
    curve = np.interp(at, x, c["curve"])
    return {"curve": curve, "lo": np.interp(at, x, c.get("curve_lo", c["curve"])),
            "hi": np.interp(at, x, c.get("curve_hi", c["curve"])),
            "gain_share": np.interp(at, x, gain_share(c["curve"]))}


def share_gap(forecast: "Forecast", fractions, realised, *, key: str | None = None,
              end: float | None = None) -> dict:
    """A backfill's realised curve (`realised`, one value per entry of `fractions`) against
    the forecast of candidate `key` (default: the chosen one), both as the share of the gain
    (`gain_share`; the realised one ends at `end`, default its last point): {"predicted",
    "realised" (arrays), "gap" (the largest absolute difference, NaN points skipped)}."""
    predicted = forecast_fractions(forecast, fractions, key=key)["gain_share"]
    share = gain_share(np.asarray(realised, np.float64), end=end)
    return {"predicted": predicted, "realised": share,
            "gap": float(np.nanmax(np.abs(predicted - share)))}


def forecast_orders(h, old, new, labels=None, *, sigma_head=None, queries=None,
                    query_labels=None, fractions=None, start_share: float = 0.0,
                    distance: str = "l2", folds: int = 5, random_orders: int = 12,
                    bootstrap: int = 200, band: float = 0.9, calibration: bool = True,
                    margin_weight: float = 0.5, top1_weight: float = 0.5,
                    head_hidden_dim: int = 64, agreement_k: int = 10,
                    stop_epsilon: float = 0.005, stop_epsilon_agreement: float = 0.01,
                    min_benefit_items: int = 100, seed: int = 0) -> Forecast:
    """Forecast every candidate order's backfilling curve on held-out pairs, and choose.

    Args: ``h`` the trained transformation (never trained on these items; its prototypes, if
    any, give the margin and distance components); ``old``/``new`` (N x d) the held-out items'
    embeddings, ``labels`` (N,) or None; ``sigma_head`` h's own joint uncertainty head (None:
    no ``sigma`` candidate); ``queries``/``query_labels`` new-model query embeddings and labels
    (default: the held-out items, leave-one-out); ``fractions`` ascending in
    [start_share, 1] ending at 1 (default 21 even steps); ``start_share`` the share of the
    gallery already new before batch 1 (h's training pairs); ``distance``; ``folds`` of the
    cross-fitting; ``random_orders`` permutations; ``bootstrap`` resamples and ``band`` the
    central interval; ``calibration`` whether calibrated variants are candidates (needs
    labels); ``margin_weight``/``top1_weight``/``head_hidden_dim`` of the blend and benefit
    head (as `transformation.*`); ``agreement_k``; the stop rule's epsilons (mAP points, and
    agreement for label-free forecasts); ``min_benefit_items`` per fold fit for a benefit head.
    Returns a :class:`Forecast`. Raises ValueError naming a bad argument.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny heads: threads only wait on each other
    try:
        return _forecast(h, old, new, labels, sigma_head=sigma_head, queries=queries,
                         query_labels=query_labels, fractions=fractions,
                         start_share=start_share, distance=distance, folds=folds,
                         random_orders=random_orders, bootstrap=bootstrap, band=band,
                         calibration=calibration, margin_weight=margin_weight,
                         top1_weight=top1_weight, head_hidden_dim=head_hidden_dim,
                         agreement_k=agreement_k, stop_epsilon=stop_epsilon,
                         stop_epsilon_agreement=stop_epsilon_agreement,
                         min_benefit_items=min_benefit_items, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _forecast(h, old, new, labels, *, sigma_head, queries, query_labels, fractions,
              start_share, distance, folds, random_orders, bootstrap, band, calibration,
              margin_weight, top1_weight, head_hidden_dim, agreement_k, stop_epsilon,
              stop_epsilon_agreement, min_benefit_items, seed) -> Forecast:
    old, new = np.asarray(old, np.float32), np.asarray(new, np.float32)
    n = len(old)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if new.shape[0] != n or n < 8:
        raise ValueError(f"old ({n}) and new ({len(new)}) must have one row per held-out item, "
                         "at least 8")
    labelled = labels is not None
    if labelled:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have {n} entries, got shape {labels.shape}")
    if not 0.0 <= start_share < 1.0:
        raise ValueError(f"start_share must be in [0, 1), got {start_share}")
    if not 0.5 <= band < 1.0:
        raise ValueError(f"band must be in [0.5, 1), got {band}")
    if random_orders < 2 or bootstrap < 10 or folds < 2:
        raise ValueError("random_orders >= 2, bootstrap >= 10 and folds >= 2 are needed")
    if fractions is None:
        fractions = start_share + (1.0 - start_share) * np.asarray(GRID)
    fractions = np.asarray(fractions, np.float64)
    if fractions.ndim != 1 or len(fractions) < 2 or np.any(np.diff(fractions) < 0) \
            or abs(fractions[-1] - 1.0) > 1e-9 or fractions[0] < start_share - 1e-9:
        raise ValueError("fractions must ascend from start_share to 1")
    from fastfill_udfs.training import transform

    rng = np.random.default_rng(seed)
    start = np.sort(rng.permutation(n)[: int(round(start_share * n))])
    transformed, _ = transform(h, old)
    own_queries = queries is None
    if own_queries:
        queries, query_labels = new, labels
        qids = gids = np.arange(n)
    else:
        queries = np.asarray(queries, np.float32)
        qids = gids = None
        if labelled and query_labels is None:
            raise ValueError("query_labels are needed with queries when there are labels")
    sim = _Simulator(transformed, new, labels, queries, query_labels, qids, gids, fractions,
                     start, distance, agreement_k)

    # cross-fitted priorities: what a candidate fits never scores the items it was fitted on
    k = int(min(folds, max(2, n // 20)))
    fold = _folds(n, labels, k, seed + 1)
    want_benefit = labelled and (n * (k - 1) / k) >= min_benefit_items
    calibrate = calibration and labelled
    bases = [b for b in BASES if _base_available(b, sigma_head is not None, want_benefit,
                                                 h.prototypes is not None)]
    candidates = [Candidate(b, r, c) for b in bases for r in (False, True)
                  for c in ((False, True) if calibrate else (False,))]   # priorities of all
    priority = {c.key: np.zeros(n) for c in candidates}
    cal_scale, cal_bias = np.ones(n), np.zeros(n)
    have_cal = np.zeros(n, bool)
    for f in range(k):
        fit, score = fold != f, fold == f
        parts = _fit_parts(h, sigma_head, old[fit], new[fit],
                           labels[fit] if labelled else None, distance=distance,
                           head_hidden_dim=head_hidden_dim, top1_weight=top1_weight,
                           seed=seed + 10 + f, benefit=want_benefit, calibrate=calibrate)
        comps = _components(h, parts.heads, old[score])
        for c in candidates:
            priority[c.key][score] = _priority(order_spec(c, parts.quantiles, margin_weight),
                                               comps)
        if parts.calibration is not None:
            cal_scale[score], cal_bias[score] = parts.calibration["scale"], \
                parts.calibration["bias"]
            have_cal[score] = True
    if calibrate and not have_cal.all():
        log.info("forecast: the calibration could not be fitted on every fold; calibrated "
                 "candidates left out")
        candidates = [c for c in candidates if not c.calibrated]
        calibrate = False

    metric = "mAP" if labelled else "agreement"
    weights = _auc_weights(fractions)
    curves = {c.key: sim.run(priority[c.key]) for c in candidates if not c.calibrated}
    if calibrate:   # the calibrated variants of the best few orders (halves the work)
        best = sorted(curves, key=lambda key: -(weights @ curves[key][metric]).mean())
        for key in best[:CALIBRATED_BASES]:
            c = Candidate.from_key(key)
            c = Candidate(c.base, c.reverse, True)
            curves[c.key] = sim.run(priority[c.key], cal_scale=cal_scale, cal_bias=cal_bias)
    rest = np.setdiff1d(np.arange(n), start)
    random_runs = {False: [], True: []}
    for r in range(random_orders):
        order = np.random.default_rng(seed + 100 + r).permutation(rest)
        random_runs[False].append(sim.run(None, order=order))
        if calibrate and r < max(2, random_orders // 3):
            random_runs[True].append(sim.run(None, order=order, cal_scale=cal_scale,
                                             cal_bias=cal_bias))
    for cal, runs in random_runs.items():
        if runs:
            key = Candidate("random", calibrated=cal).key
            curves[key] = {m: np.mean([run[m] for run in runs], axis=0) for m in runs[0]}
    random_per_query = np.stack([weights @ run[metric] for run in random_runs[False]])
    random_aucs = random_per_query.mean(axis=1)
    baseline = random_per_query.mean(axis=0)                 # per query: random's mean AUC
    boot = rng.integers(0, random_per_query.shape[1], (bootstrap, random_per_query.shape[1]))
    lo_q, hi_q = (1.0 - band) / 2.0, 1.0 - (1.0 - band) / 2.0
    rows = []
    for key, cur in curves.items():
        per_query = weights @ cur[metric]
        gain = per_query - baseline
        row = {"key": key, "auc": float(per_query.mean()),
               "auc_lo": float(np.quantile(per_query[boot].mean(axis=1), lo_q)),
               "auc_hi": float(np.quantile(per_query[boot].mean(axis=1), hi_q)),
               "gain": float(gain.mean()),
               "gain_lo": float(np.quantile(gain[boot].mean(axis=1), lo_q)),
               "gain_hi": float(np.quantile(gain[boot].mean(axis=1), hi_q))}
        for m, v in cur.items():
            means = v[:, boot].mean(axis=2)                  # fractions x bootstrap
            name = "agreement" if m == "agreement" else m
            row[f"{name}_curve"] = v.mean(axis=1).tolist()
            row[f"{name}_auc"] = float((weights @ v).mean())
            if m == metric:
                row["curve"] = row[f"{name}_curve"]
                row["curve_lo"] = np.quantile(means, lo_q, axis=1).tolist()
                row["curve_hi"] = np.quantile(means, hi_q, axis=1).tolist()
        rows.append(row)
    decision = choose_order(rows, random_aucs)
    chosen = next(r for r in rows if r["key"] == decision["key"])
    eps = stop_epsilon if labelled else stop_epsilon_agreement
    stop = recommend_stop(fractions, chosen["curve"], eps, metric)
    info = {"n_items": n, "n_queries": int(len(sim.query_index) if sim.query_index is not None
                                           else len(queries)),
            "queries": "held-out items, leave-one-out" if own_queries else "labelled queries",
            "start_share": float(start_share), "folds": k, "band": band,
            "bootstrap": bootstrap, "agreement_k": sim.k, "distance": distance,
            "calibration_candidates": bool(calibrate), "benefit_head": bool(want_benefit),
            "labelled": labelled}
    return Forecast(metric if labelled else f"agreement@{sim.k}", fractions.tolist(), rows,
                    random_aucs.tolist(), decision, stop, info)


def _base_available(base: str, sigma: bool, benefit: bool, prototypes: bool) -> bool:
    needs = {name for name, _, _ in BASES[base]}
    return (("sigma" not in needs or sigma) and ("benefit" not in needs or benefit)
            and (not needs & {"margin", "distance"} or prototypes))


def choose_order(candidates: list[dict], random_aucs) -> dict:
    """The ``auto`` policy's decision from forecast rows (key, auc, gain_lo, gain_hi) and the
    random permutations' AUCs: the best candidate if it beats every random permutation and the
    band of its gain over random's mean lies above zero; else random order. ``decided`` is
    False when more held-out items could change that (the best's gain band reaches beyond
    random's own spread without clearing it). Raises ValueError without a random AUC."""
    r = np.asarray(random_aucs, np.float64)
    if len(r) < 1:
        raise ValueError("choose_order needs random order's AUCs")
    mean, top = float(r.mean()), float(r.max())
    rest = [c for c in candidates if c["key"] != "random"]
    best = max(rest, key=lambda c: c["auc"]) if rest else None
    if best is not None and best["auc"] > top and best["gain_lo"] > 0:
        return {"key": best["key"], "beats_random": True, "decided": True,
                "reason": (f"the best forecast: AUC {best['auc']:.4f} beats all {len(r)} random "
                           f"permutations (best {top:.4f}, mean {mean:.4f}); its gain over "
                           f"random's mean is {best['gain']:+.4f} (band {best['gain_lo']:+.4f} "
                           f"to {best['gain_hi']:+.4f})")}
    decided = best is None or best["gain_hi"] <= top - mean
    why = ("no candidate order" if best is None else
           f"the best, {best['key']} (AUC {best['auc']:.4f}, gain {best['gain']:+.4f}, band "
           f"{best['gain_lo']:+.4f} to {best['gain_hi']:+.4f}),")
    return {"key": "random", "beats_random": False, "decided": bool(decided),
            "reason": (f"{why} does not beat random order by more than random's own spread "
                       f"(best of {len(r)} permutations {top:.4f}, mean {mean:.4f}): the "
                       "backfill runs in random order")}


def recommend_stop(fractions, curve, epsilon: float, metric: str = "mAP") -> dict:
    """Where to stop a backfill along a forecast ``curve``: the first fraction at which it
    comes within ``epsilon`` of its end point (the all-new gallery), and its peak when the
    mixed gallery beats the end point by more than ``epsilon``. Returns {fraction, epsilon,
    peak_fraction, peak_gain, reason}. Raises ValueError on bad shapes or epsilon."""
    x = np.asarray(fractions, np.float64)
    y = np.asarray(curve, np.float64)
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"fractions {x.shape} and curve {y.shape} must be 1-D of equal length")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    end = y[-1]
    at = float(x[np.flatnonzero(y >= end - epsilon)[0]])
    peak = int(np.argmax(y))
    out = {"fraction": at, "epsilon": float(epsilon), "metric": metric,
           "peak_fraction": float(x[peak]), "peak_gain": float(y[peak] - end)}
    def points(v):
        n = f"{v * 100:.2g}"
        return f"{n} {'mAP ' if metric == 'mAP' else ''}point{'' if n == '1' else 's'}" + (
            "" if metric == "mAP" else " of agreement")
    out["reason"] = (f"the forecast comes within {points(epsilon)} of the all-new gallery at "
                     f"t={at:.2f}")
    if y[peak] > end + epsilon:
        out["reason"] += (f"; it peaks at t={x[peak]:.2f}, {points(y[peak] - end)} above the "
                          "all-new gallery (the mixed gallery beats the new model alone there)")
    return out


def fit_auto_order(h, sigma_head, old, new, labels, decision_key: str, *, distance: str = "l2",
                   margin_weight: float = 0.5, top1_weight: float = 0.5,
                   head_hidden_dim: int = 64, seed: int = 0):
    """A copy of ``h`` that carries the chosen order for the ``auto`` policy, fitted on all
    held-out items: the heads it reads (h's own sigma head, a benefit head) as `order_heads`,
    the spec (with quantiles and, when chosen, the calibration) as `auto_order`."""
    cand = Candidate.from_key(decision_key)
    out = copy.deepcopy(h)
    labels = None if labels is None else np.asarray(labels)
    needs = set() if cand.base == "random" else {t[0] for t in BASES[cand.base]}
    parts = _fit_parts(h, sigma_head if "sigma" in needs else None,
                       np.asarray(old, np.float32), np.asarray(new, np.float32), labels,
                       distance=distance, head_hidden_dim=head_hidden_dim,
                       top1_weight=top1_weight, seed=seed, benefit="benefit" in needs,
                       calibrate=cand.calibrated)
    if cand.calibrated and parts.calibration is None:
        raise ValueError(f"the chosen order {decision_key!r} is calibrated, but the calibration "
                         "could not be fitted on the held-out items")
    if cand.base == "random":
        out.auto_order = random_spec(seed, parts.calibration)
        return out
    for name, head in parts.heads.items():
        if name in needs:
            out.set_order_head(name, copy.deepcopy(head), _head_hidden(head))
    out.auto_order = order_spec(cand, parts.quantiles, margin_weight, parts.calibration)
    return out


def forecast_settings(cfg) -> dict:
    """The keyword arguments of `forecast_orders` from `forecast.*`, `transformation.*` and
    `evaluation.distance`."""
    f, t = cfg.get_path("forecast"), cfg.get_path("transformation")
    return dict(distance=cfg.get_path("evaluation.distance"), folds=f["folds"],
                random_orders=f["random_orders"], bootstrap=f["bootstrap"], band=f["band"],
                calibration=f["calibration"], margin_weight=t["order_margin_weight"],
                top1_weight=t["order_top1_weight"], head_hidden_dim=t["order_head_hidden"],
                agreement_k=f["agreement_k"], stop_epsilon=f["stop_epsilon"],
                stop_epsilon_agreement=f["stop_epsilon_agreement"])


def copy_auto_order(source, target):
    """A copy of `target` (another h with the same `mlp` and prototypes) carrying `source`'s
    auto order: its order heads and spec."""
    out = copy.deepcopy(target)
    out.auto_order = copy.deepcopy(source.auto_order)
    for name, head in source.order_heads.items():
        out.set_order_head(name, copy.deepcopy(head), source.order_head_dims[name])
    return out


def _head_hidden(head) -> int:
    """The hidden width `make_uncertainty_head` was given for ``head``."""
    import torch

    return 0 if isinstance(head, torch.nn.Linear) else int(head[0].out_features)
