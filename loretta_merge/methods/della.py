"""Magnitude-ranked random pruning (DELLA's MagPrune): ``della``, ``della_linear``."""

from __future__ import annotations

from ..errors import ConfigError
from . import pruning
from .base import Method, at, register
from .stream import Recipe


def _check_epsilon(params, n_inputs):
    """density ± epsilon must stay a probability strictly inside (0, 1)."""
    for i in range(n_inputs):
        d, e = at(params["density"], i), at(params["epsilon"], i)
        if d < 1 and not (d - e > 0 and d + e < 1):
            raise ConfigError(f"--epsilon {e:g} with --density {d:g}: the keep probabilities "
                              f"density ± epsilon must lie strictly inside (0, 1); choose "
                              f"epsilon < {min(d, 1 - d):g}")


def _magprune(params):
    return lambda i, n, g: pruning.magnitude_ranked_keep(
        at(params["density"], i), at(params["epsilon"], i), g, rescale=params["rescale"])


def della(params):
    return Recipe(_magprune(params), params["majority_sign"], params["normalize"],
                  params["lambda"])


def della_linear(params):
    return Recipe(_magprune(params), None, params["normalize"], params["lambda"])


_COMMON = {"density": 1.0, "epsilon": 0.15, "lambda": 1.0, "rescale": True}
_REF = "Deep et al. 2024, DELLA-Merging, arXiv:2406.11617"
register(Method("della", recipe=della,
                defaults={**_COMMON, "majority_sign": "total", "normalize": True},
                random=True, validate=_check_epsilon, reference=f"{_REF} (mergekit's della)",
                summary="drop entries at random, small magnitudes more often; TIES' election"))
register(Method("della_linear", recipe=della_linear, defaults={**_COMMON, "normalize": False},
                random=True,
                validate=_check_epsilon, reference=f"{_REF} (mergekit's della_linear)",
                summary="DELLA's pruning, weighted sum"))
