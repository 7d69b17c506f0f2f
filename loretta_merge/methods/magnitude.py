"""Deterministic pruning by magnitude: ``ties``, ``magnitude_prune``, ``breadcrumbs``,
``breadcrumbs_ties``."""

from __future__ import annotations

from . import pruning
from .base import Method, at, register
from .stream import Recipe


def _largest(params, ties_as="magnitude"):
    ties_as = ties_as if params["tie_break"] == "mergekit" else "first"
    return lambda i, n, g: pruning.largest(n, at(params["density"], i),
                                           rescale=params["rescale"], ties_as=ties_as)


def _breadcrumbs(params):
    ties_as = "outliers" if params["tie_break"] == "mergekit" else "first"
    return lambda i, n, g: pruning.largest_below_outliers(
        n, at(params["density"], i), at(params["gamma"], i), rescale=params["rescale"],
        ties_as=ties_as)


def ties(params):
    return Recipe(_largest(params), params["majority_sign"], params["normalize"], params["lambda"])


def magnitude_prune(params):
    # equal magnitudes at the cut: kept as mergekit's breadcrumbs (gamma 0) keeps them
    return Recipe(_largest(params, "outliers"), None, params["normalize"], params["lambda"])


def breadcrumbs(params):
    return Recipe(_breadcrumbs(params), None, params["normalize"], params["lambda"])


def breadcrumbs_ties(params):
    return Recipe(_breadcrumbs(params), params["majority_sign"], params["normalize"],
                  params["lambda"])


_COMMON = {"density": 1.0, "lambda": 1.0, "rescale": False, "tie_break": "mergekit"}
register(Method(
    "ties", recipe=ties, defaults={**_COMMON, "majority_sign": "total", "normalize": True},
    reference="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708 (mergekit's ties)",
    summary="keep the largest entries, elect a sign per entry, average the agreeing ones"))
register(Method(
    "magnitude_prune", recipe=magnitude_prune, defaults={**_COMMON, "normalize": False},
    reference="PEFT's magnitude_prune (= mergekit's breadcrumbs with gamma 0)",
    summary="keep the largest entries of each delta, weighted sum"))
register(Method(
    "breadcrumbs", recipe=breadcrumbs, defaults={**_COMMON, "gamma": 0.01, "normalize": False},
    reference="Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795 (mergekit's "
              "breadcrumbs)",
    summary="drop the largest (outliers) and the smallest entries, weighted sum"))
register(Method(
    "breadcrumbs_ties", recipe=breadcrumbs_ties,
    defaults={**_COMMON, "gamma": 0.01, "majority_sign": "total", "normalize": False},
    reference="mergekit's breadcrumbs_ties (Model Breadcrumbs with TIES' sign election)",
    summary="breadcrumbs pruning, then TIES' sign election"))
