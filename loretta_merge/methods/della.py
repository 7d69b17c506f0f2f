"""Magnitude-ranked random pruning (DELLA's MagPrune): ``della``, ``della_linear``."""

from __future__ import annotations

from ..errors import ConfigError
from . import prune
from .base import Method, at, register
from .core import combine_task_vectors


def _check_epsilon(params, n_inputs):
    """density ± epsilon must stay a probability strictly inside (0, 1)."""
    for i in range(n_inputs):
        d, e = at(params["density"], i), at(params["epsilon"], i)
        if d < 1 and not (d - e > 0 and d + e < 1):
            raise ConfigError(f"--epsilon {e:g} with --density {d:g}: the keep probabilities "
                              f"density ± epsilon must lie strictly inside (0, 1); choose "
                              f"epsilon < {min(d, 1 - d):g}")


def _magprune(params, generator):
    return lambda d, i: prune.magnitude_ranked_keep(
        d, at(params["density"], i), at(params["epsilon"], i), generator,
        rescale=params["rescale"])


def della(deltas, weights, params, generator):
    return combine_task_vectors(deltas, weights, prune=_magprune(params, generator),
                                majority_sign=params["majority_sign"],
                                normalize=params["normalize"], lam=params["lambda"])


def della_linear(deltas, weights, params, generator):
    return combine_task_vectors(deltas, weights, prune=_magprune(params, generator),
                                normalize=params["normalize"], lam=params["lambda"])


_COMMON = {"density": 1.0, "epsilon": 0.15, "lambda": 1.0, "rescale": True}
_REF = "Deep et al. 2024, DELLA-Merging, arXiv:2406.11617"
register(Method("della", della, {**_COMMON, "majority_sign": "total", "normalize": True},
                random=True, validate=_check_epsilon, reference=f"{_REF} (mergekit's della)",
                summary="drop entries at random, small magnitudes more often; TIES' election"))
register(Method("della_linear", della_linear, {**_COMMON, "normalize": False}, random=True,
                validate=_check_epsilon, reference=f"{_REF} (mergekit's della_linear)",
                summary="DELLA's pruning, weighted sum"))
