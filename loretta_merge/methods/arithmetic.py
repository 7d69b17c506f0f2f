"""Linear task arithmetic: ``linear`` (this tool's rule, the default) and ``task_arithmetic``."""

from __future__ import annotations

from .base import Method, register
from .stream import Recipe


def linear(params):
    """``Σ w_i Δ_i``: the streaming merge's own rule (its kernel has a fused fast path for
    it; this recipe is the same arithmetic)."""
    return Recipe()


def task_arithmetic(params):
    """``lambda * Σ w_i Δ_i`` (divided by ``Σ w_i`` with normalize)."""
    return Recipe(normalize=params["normalize"], lam=params["lambda"])


register(Method(
    "linear", recipe=linear, defaults={},
    reference="loretta-merge: W = W0 + Σ w_i Δ_i (mergekit task_arithmetic with lambda 1)",
    summary="weighted sum of the deltas; the fast streaming path"))
register(Method(
    "task_arithmetic", recipe=task_arithmetic, defaults={"lambda": 1.0, "normalize": False},
    reference="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089",
    summary="weighted sum of the deltas scaled by lambda"))
