"""Kept so ``loretta_merge.data`` still imports: the training data now live in
:mod:`loretta_merge.train.data` (this name is the same module object)."""

import sys

from .train import data as _data

sys.modules[__name__] = _data
