"""Random pruning (Drop And REscale): ``dare_linear``, ``dare_ties``."""

from __future__ import annotations

from . import prune
from .base import Method, at, register
from .core import combine_task_vectors


def _drop(params, generator):
    return lambda d, i: prune.random_keep(d, at(params["density"], i), generator,
                                          rescale=params["rescale"])


def dare_linear(deltas, weights, params, generator):
    return combine_task_vectors(deltas, weights, prune=_drop(params, generator),
                                normalize=params["normalize"], lam=params["lambda"])


def dare_ties(deltas, weights, params, generator):
    return combine_task_vectors(deltas, weights, prune=_drop(params, generator),
                                majority_sign=params["majority_sign"],
                                normalize=params["normalize"], lam=params["lambda"])


_COMMON = {"density": 1.0, "lambda": 1.0, "rescale": True, "normalize": False}
_REF = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"
register(Method("dare_linear", dare_linear, _COMMON, random=True,
                reference=f"{_REF} (mergekit's dare_linear)",
                summary="drop entries at random, rescale, weighted sum"))
register(Method("dare_ties", dare_ties, {**_COMMON, "majority_sign": "total"}, random=True,
                reference=f"{_REF} (mergekit's dare_ties)",
                summary="drop entries at random, rescale, TIES' sign election"))
