"""Everything fitted with `h` beyond its map, on held-out pairs (issue 10).

After `h` is trained (:func:`fastfill_udfs.training.train_transformation`), a held-out set of
training pairs -- items `h` did not train on, with their old and new embeddings and labels --
fits the parts that the backfill order and the mixed gallery need:

* the order head (``order_head``): ``"sigma"`` keeps the paper's uncertainty head trained
  jointly with h; ``"benefit"`` refits the head to the *realised benefit* of backfilling each
  held-out item (the exact change in mAP plus top-1 when that item alone switches from h(old)
  to its new embedding, :mod:`fastfill_udfs.reachability`), so that sigma orders items by
  predicted benefit. On training pairs a wide h has memorised, the joint head learns little about
  the gallery; the held-out benefit is what the backfill order is for.
* the mixed-gallery calibration (``calibration``): ``"none"``, ``"affine"`` or
  ``"affine_sigma"`` (:mod:`fastfill_udfs.calibration`), stored as ``h.calibration``;
* class prototypes in the new space for the classifier-free ``prototype`` order, stored as
  ``h.prototypes``;
* the margin blend (``margin_weight`` > 0, benefit head only): sigma becomes
  (1 - w) x the head's held-out CDF + w x the prototype margin's reversed CDF, so items the
  head ranks high *or* that sit between two classes come first; stored as ``h.order_blend``.

All of it travels inside h's JSON spec and state dict (MLflow, the Spark broadcast), so a worker
that has `h` computes the order score of an item from its old embedding alone.
"""
from __future__ import annotations

import numpy as np

from fastfill_udfs.calibration import CALIBRATIONS, fit_calibration
from fastfill_udfs.config import ORDER_HEADS
from fastfill_udfs.metrics import check_distance
from fastfill_udfs.models import Transformation
from fastfill_udfs.policies import fit_prototypes, prototype_margin
from fastfill_udfs.reachability import item_map_benefit, item_top1_benefit
from fastfill_udfs.training import fit_benefit_head, transform

__all__ = ["ORDER_HEADS", "CALIBRATIONS", "realised_benefit", "fit_h_extras", "fit_order_blend",
           "holdout_split"]
BLEND_VERSION = 1



def holdout_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): a seeded, class-stratified ``fraction`` of the rows held out
    (at least 2 rows each side). Raises ValueError for a fraction outside (0, 1) or too few
    rows."""
    from fastfill_udfs.data import stratified_subset

    y = np.asarray(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    k = int(round(fraction * len(y)))
    if k < 2 or len(y) - k < 2:
        raise ValueError(f"{len(y)} rows are too few to hold out a fraction {fraction}")
    held = stratified_subset(y, k, int(seed))
    return np.setdiff1d(np.arange(len(y)), held), held


def realised_benefit(new, labels, transformed, *, distance: str = "l2", ids=None,
                     top1_weight: float = 0.0) -> np.ndarray:
    """Per item of a held-out set: the change in mAP plus ``top1_weight`` times the change in
    top-1 if that item alone were backfilled, with the set's new embeddings as queries
    (leave-one-out) and its transformed embeddings as the gallery (t = 0)."""
    ids = np.arange(len(labels)) if ids is None else np.asarray(ids)
    kw = dict(query_ids=ids, gallery_ids=ids, distance=distance)
    benefit = item_map_benefit(new, labels, transformed, new, labels, **kw)
    if top1_weight:
        benefit = benefit + top1_weight * item_top1_benefit(new, labels, transformed, new,
                                                            labels, **kw)
    return benefit


def _check_margin_weight(weight) -> None:
    if not (np.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise ValueError(f"margin_weight (transformation.order_margin_weight) must be in [0, 1], "
                         f"got {weight!r}")


def fit_order_blend(h: Transformation, old, weight: float, levels: int = 101) -> dict:
    """The `order_blend` of `h` (which must carry prototypes and an uncertainty head, no blend
    yet): `levels` quantiles of the head's sigma and of the prototype margin over the held-out
    items ``old``, and the margin's ``weight`` in [0, 1]. Raises ValueError otherwise."""
    _check_margin_weight(weight)
    if h.prototypes is None or not h.has_uncertainty or h.order_blend is not None:
        raise ValueError("fit_order_blend needs an h with prototypes and an uncertainty head and "
                         "no blend yet")
    t, sigma = transform(h, np.asarray(old, np.float32))
    grid = np.linspace(0.0, 1.0, int(levels))
    return {"version": BLEND_VERSION, "weight": float(weight),
            "sigma_quantiles": np.quantile(sigma, grid).tolist(),
            "margin_quantiles": np.quantile(prototype_margin(t, h.prototypes), grid).tolist()}


def fit_h_extras(h: Transformation, old, new, labels, *, order_head: str = "benefit",
                 calibration: str = "none", distance: str = "l2", head_hidden_dim: int = 64,
                 top1_weight: float = 0.5, margin_weight: float = 0.0, prototype_new=None,
                 prototype_labels=None, seed: int = 0) -> Transformation:
    """A copy of `h` with its order head, calibration and prototypes fitted on held-out pairs.

    Args: ``old``, ``new`` (N x d) and ``labels`` of items h was NOT trained on; ``order_head``
    in :data:`ORDER_HEADS`; ``calibration`` in :data:`CALIBRATIONS`; ``distance`` of the
    retrieval (cosine | l2); ``head_hidden_dim`` of the benefit head (0: linear);
    ``top1_weight`` of top-1 in the benefit the head is fitted to (mAP change + this x top-1
    change; 0.5, as ``transformation.order_top1_weight``; 0: mAP alone, whose order dips below
    random order's top-1 early on; see README); ``margin_weight`` in [0, 1] of the prototype
    margin blended into the benefit head's order (:func:`fit_order_blend`; 0: the head alone;
    ``transformation.order_margin_weight`` is 0.5 by default); ``prototype_new``/``prototype_labels`` the new
    embeddings the class prototypes are averaged from (default: the held-out ones).
    Raises ValueError naming a bad argument.
    """
    if order_head not in ORDER_HEADS:
        raise ValueError(f"order_head must be one of {ORDER_HEADS}, got {order_head!r}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    check_distance(distance)
    if not (np.isfinite(top1_weight) and top1_weight >= 0):
        raise ValueError(f"top1_weight (transformation.order_top1_weight) must be a finite "
                         f"number >= 0, got {top1_weight!r}")
    _check_margin_weight(margin_weight)
    old, new = np.asarray(old, np.float32), np.asarray(new, np.float32)
    labels = np.asarray(labels)
    if not (len(old) == len(new) == len(labels)) or len(old) < 4:
        raise ValueError(f"old ({len(old)}), new ({len(new)}) and labels ({len(labels)}) must "
                         "have one row per held-out item, at least 4")
    if order_head == "sigma" and calibration == "affine_sigma" and not h.has_uncertainty:
        raise ValueError("calibration 'affine_sigma' needs an h with an uncertainty head")
    out = h
    if order_head == "benefit":
        t, _ = transform(h, old)
        benefit = realised_benefit(new.astype(np.float64), labels, t.astype(np.float64),
                                   distance=distance, top1_weight=top1_weight)
        out = fit_benefit_head(h, old, benefit, head_hidden_dim=head_hidden_dim, seed=seed)
    else:
        import copy

        out = copy.deepcopy(h)
    pn = new if prototype_new is None else np.asarray(prototype_new, np.float32)
    pl = labels if prototype_labels is None else np.asarray(prototype_labels)
    out.prototypes = fit_prototypes(pn, pl, distance=distance)
    out.order_blend = None
    if order_head == "benefit" and margin_weight > 0:
        out.order_blend = fit_order_blend(out, old, margin_weight)
    t, sigma = transform(out, old)  # the sigma the calibration will see (blended, if so)
    if calibration != "none":
        out.calibration = fit_calibration(
            new, labels, new, t, labels, distance=distance, sigma=sigma,
            use_sigma=(calibration == "affine_sigma"), query_ids=np.arange(len(labels)),
            gallery_ids=np.arange(len(labels)), seed=seed)
    return out
