"""Task-vector merge methods: how the deltas of several inputs to ONE tensor combine.

Each method is a pure function ``combine(deltas, weights, params, generator) -> delta``
registered by name (:mod:`.base`); one module per family:

- :mod:`.arithmetic`: ``linear`` (the default), ``task_arithmetic``
- :mod:`.magnitude`: ``ties``, ``magnitude_prune``, ``breadcrumbs``, ``breadcrumbs_ties``
- :mod:`.dare`: ``dare_linear``, ``dare_ties`` (random)
- :mod:`.della`: ``della``, ``della_linear`` (random)
- :mod:`.peft_compat`: PEFT's own definitions under its names: ``svd``, ``ties_svd``,
  ``dare_linear_svd``, ``dare_ties_svd`` (random), ``magnitude_prune_svd``

The shared combination step (weights, sign election, normalisation, lambda) is
:mod:`.core`; pruning of one delta is :mod:`.prune`. A new method is one new function
registered with :func:`register`. docs/merge-methods.md describes each method.
"""

# each family registers its methods on import; this order is the order they are listed in
from . import arithmetic  # noqa: F401,I001
from . import magnitude  # noqa: F401
from . import dare  # noqa: F401
from . import della  # noqa: F401
from . import peft_compat  # noqa: F401
from .base import (MAJORITY_SIGNS, PARAMS, Method, ParamSpec, get_method, method_names,
                   register, tensor_generator)
from . import pruning, stream  # noqa: F401
from .core import OwnedDeltas, combine_task_vectors

DEFAULT_METHOD = "linear"

__all__ = ["DEFAULT_METHOD", "MAJORITY_SIGNS", "PARAMS", "Method", "OwnedDeltas", "ParamSpec",
           "combine_task_vectors", "get_method", "method_names", "register",
           "tensor_generator"]
