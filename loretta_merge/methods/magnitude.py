"""Deterministic pruning by magnitude: ``ties``, ``magnitude_prune``, ``breadcrumbs``,
``breadcrumbs_ties``."""

from __future__ import annotations

from . import prune
from .base import Method, at, register
from .core import combine_task_vectors


def _largest(params, ties_as="magnitude"):
    return lambda d, i: prune.largest(d, at(params["density"], i), rescale=params["rescale"],
                                      ties_as=ties_as)


def _breadcrumbs(params):
    return lambda d, i: prune.largest_below_outliers(
        d, at(params["density"], i), at(params["gamma"], i), rescale=params["rescale"])


def ties(deltas, weights, params, generator=None):
    return combine_task_vectors(deltas, weights, prune=_largest(params),
                                majority_sign=params["majority_sign"],
                                normalize=params["normalize"], lam=params["lambda"])


def magnitude_prune(deltas, weights, params, generator=None):
    # equal magnitudes at the cut: kept as mergekit's breadcrumbs (gamma 0) keeps them
    return combine_task_vectors(deltas, weights, prune=_largest(params, "outliers"),
                                normalize=params["normalize"], lam=params["lambda"])


def breadcrumbs(deltas, weights, params, generator=None):
    return combine_task_vectors(deltas, weights, prune=_breadcrumbs(params),
                                normalize=params["normalize"], lam=params["lambda"])


def breadcrumbs_ties(deltas, weights, params, generator=None):
    return combine_task_vectors(deltas, weights, prune=_breadcrumbs(params),
                                majority_sign=params["majority_sign"],
                                normalize=params["normalize"], lam=params["lambda"])


_COMMON = {"density": 1.0, "lambda": 1.0, "rescale": False}
register(Method(
    "ties", ties, {**_COMMON, "majority_sign": "total", "normalize": True},
    reference="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708 (mergekit's ties)",
    summary="keep the largest entries, elect a sign per entry, average the agreeing ones"))
register(Method(
    "magnitude_prune", magnitude_prune, {**_COMMON, "normalize": False},
    reference="PEFT's magnitude_prune (= mergekit's breadcrumbs with gamma 0)",
    summary="keep the largest entries of each delta, weighted sum"))
register(Method(
    "breadcrumbs", breadcrumbs, {**_COMMON, "gamma": 0.01, "normalize": False},
    reference="Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795 (mergekit's "
              "breadcrumbs)",
    summary="drop the largest (outliers) and the smallest entries, weighted sum"))
register(Method(
    "breadcrumbs_ties", breadcrumbs_ties,
    {**_COMMON, "gamma": 0.01, "majority_sign": "total", "normalize": False},
    reference="mergekit's breadcrumbs_ties (Model Breadcrumbs with TIES' sign election)",
    summary="breadcrumbs pruning, then TIES' sign election"))
