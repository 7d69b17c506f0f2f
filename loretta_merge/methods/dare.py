"""Random pruning (Drop And REscale): ``dare_linear``, ``dare_ties``."""

from __future__ import annotations

from . import pruning
from .base import Method, at, register
from .stream import Recipe


def _drop(params):
    return lambda i, n, g: pruning.random_keep(at(params["density"], i), g,
                                               rescale=params["rescale"])


def dare_linear(params):
    return Recipe(_drop(params), None, params["normalize"], params["lambda"])


def dare_ties(params):
    return Recipe(_drop(params), params["majority_sign"], params["normalize"], params["lambda"])


_COMMON = {"density": 1.0, "lambda": 1.0, "rescale": True, "normalize": False}
_REF = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"
register(Method("dare_linear", recipe=dare_linear, defaults=_COMMON, random=True,
                reference=f"{_REF} (mergekit's dare_linear)",
                summary="drop entries at random, rescale, weighted sum"))
register(Method("dare_ties", recipe=dare_ties, defaults={**_COMMON, "majority_sign": "total"},
                random=True, reference=f"{_REF} (mergekit's dare_ties)",
                summary="drop entries at random, rescale, TIES' sign election"))
