"""Optional dependencies: every optional import goes through :func:`require`.

A command that needs ONNX, ONNX Runtime, accelerate or PEFT imports it with
``require("onnx", extra="onnx", purpose="export onnx")``; when the package is missing the
user gets one line naming the package, what needs it and the ``pip install`` that fixes it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# import name -> the name pip installs it under, where they differ
_PIP_NAMES = {"sklearn": "scikit-learn", "onnxruntime": "onnxruntime", "yaml": "pyyaml"}


def require(module: str, *, extra: str | None = None, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` with the install line.

    ``extra`` names this package's optional-dependency group that provides the module
    (``pip install 'loretta-merge[extra]'``); without it the plain package is suggested.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the package is there but one of ITS dependencies is broken: a real bug
        pip_name = _PIP_NAMES.get(top, top)
        fix = f"pip install 'loretta-merge[{extra}]'" if extra else f"pip install {pip_name}"
        raise MissingDependencyError(
            f"{purpose} needs the Python package {pip_name!r}, which is not installed; "
            f"install it with `{fix}` and run the command again") from None
