"""What a merge method is, the parameters methods take, and the one registry.

A method is a pure function over the task vectors of ONE tensor::

    combine(deltas, weights, params, generator) -> combined delta

``deltas`` are fp32 tensors ``Δ_i = W_i - W0`` of one shape (zeros for an input that does
not change this tensor), ``weights`` one float per input, ``params`` the method's resolved
parameters (:meth:`Method.resolve`), ``generator`` a seeded ``torch.Generator`` for the
methods that draw random masks (None for the others). The merged tensor is ``W0 + result``.

Most methods are given as a ``recipe`` instead (:mod:`.stream`): how each delta is pruned
and how the pruned deltas combine. The streaming merge runs a recipe in chunks of rows, so
no whole fp32 tensor is held per input; ``combine`` is then derived from it (same bits).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError

CombineFn = Callable[[Sequence[torch.Tensor], Sequence[float], Mapping[str, Any],
                      "torch.Generator | None"], torch.Tensor]

MAJORITY_SIGNS = ("total", "frequency")
TIE_BREAKS = ("mergekit", "first")


def _density(v: float) -> None:
    if not 0 < v <= 1:
        raise ConfigError(f"--density {v:g}: density is the fraction of each task vector kept "
                          f"and must be in (0, 1]; pass e.g. --density 0.5")


def _non_negative(flag: str, example: str) -> Callable[[float], None]:
    def check(v: float) -> None:
        if v < 0:
            raise ConfigError(f"{flag} {v:g} is negative; it must be >= 0: pass e.g. "
                              f"{flag} {example}")
    return check


def _gamma(v: float) -> None:
    if not 0 <= v < 1:
        raise ConfigError(f"--gamma {v:g}: the fraction of largest entries dropped must be in "
                          f"[0, 1); pass e.g. --gamma 0.01")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method may take: its flag, its type, its rule."""

    flag: str
    kind: type  # float, bool or str
    check: Callable[[Any], None] | None = None  # raises ConfigError when the value breaks the rule
    per_input: bool = False  # may be given once per input (a list), as mergekit allows
    choices: tuple[str, ...] = ()


PARAMS: dict[str, ParamSpec] = {
    "density": ParamSpec("--density", float, _density, per_input=True),
    "lambda": ParamSpec("--lambda", float, _non_negative("--lambda", "1.0")),
    "epsilon": ParamSpec("--epsilon", float, _non_negative("--epsilon", "0.1"), per_input=True),
    "gamma": ParamSpec("--gamma", float, _gamma, per_input=True),
    "majority_sign": ParamSpec("--majority-sign", str, choices=MAJORITY_SIGNS),
    "normalize": ParamSpec("--normalize/--no-normalize", bool),
    "rescale": ParamSpec("--rescale/--no-rescale", bool),
    "tie_break": ParamSpec("--tie-break", str, choices=TIE_BREAKS),
}


@dataclass(frozen=True)
class Method:
    """A registered merge method: its name, its function, the parameters it takes (with
    their defaults), whether it draws random masks, and the reference it follows."""

    name: str
    combine: CombineFn | None = None  # derived from ``recipe`` when that is given
    defaults: Mapping[str, Any] = field(default_factory=dict)
    random: bool = False
    reference: str = ""
    summary: str = ""
    validate: Callable[[Mapping[str, Any], int], None] | None = None  # rules across parameters
    # params -> stream.Recipe: the method as prunings and a combination, which the merge
    # runs in chunks of rows (methods without one get whole tensors)
    recipe: Callable[[Mapping[str, Any]], Any] | None = None

    def __post_init__(self):
        if self.combine is None:
            if self.recipe is None:
                raise ValueError(f"merge method {self.name!r} needs a combine or a recipe")
            from .stream import combine_whole
            recipe = self.recipe
            object.__setattr__(self, "combine", lambda deltas, weights, params, generator=None:
                               combine_whole(recipe(params), deltas, weights, generator))

    def resolve(self, given: Mapping[str, Any] | None, *, n_inputs: int) -> dict[str, Any]:
        """The method's parameters: its defaults overridden by ``given`` (None values are
        "not given"). Raises one ConfigError naming the first parameter that breaks a rule."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        for key in given:
            if key not in PARAMS:
                raise ConfigError(f"unknown merge parameter {key!r}; use one of "
                                  f"{', '.join(sorted(PARAMS))}")
            if key not in self.defaults:
                takes = ", ".join(PARAMS[k].flag for k in self.defaults) or "no parameters"
                raise ConfigError(f"{PARAMS[key].flag} does not apply to --method {self.name} "
                                  f"(it takes {takes}); remove it or choose another method")
        params = dict(self.defaults)
        for key, value in given.items():
            params[key] = _checked(key, value, n_inputs)
        if self.validate is not None:
            self.validate(params, n_inputs)  # raises ConfigError
        return params


def _checked(key: str, value: Any, n_inputs: int) -> Any:
    spec = PARAMS[key]
    if isinstance(value, (list, tuple)):
        if not spec.per_input:
            raise ConfigError(f"{spec.flag} takes one value, not a list ({list(value)!r}); "
                              f"give one number")
        if len(value) != n_inputs:
            raise ConfigError(f"{spec.flag} has {len(value)} values for {n_inputs} input(s); "
                              f"give one value, or one per input")
        return tuple(_checked(key, v, n_inputs) for v in value)
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{spec.flag.split('/')[0]} takes true or false, not {value!r}; "
                              f"give a boolean")
        return value
    if spec.kind is str:
        if value not in spec.choices:
            raise ConfigError(f"{spec.flag} {value!r} is not one of {', '.join(spec.choices)}; "
                              f"pass e.g. {spec.flag} {spec.choices[0]}")
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{spec.flag} takes a number, not {value!r}; give a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{spec.flag} takes a number, not {value!r}; give a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{spec.flag} {value!r} must be a finite number; give one")
    if spec.check is not None:
        spec.check(number)  # raises ConfigError
    return number


def at(value: Any, index: int) -> Any:
    """A parameter's value for input ``index`` (per-input lists hold one per input)."""
    return value[index] if isinstance(value, tuple) else value


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available by name to the merge, the CLI and configs."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    for key in method.defaults:
        if key not in PARAMS:
            raise ValueError(f"merge method {method.name!r}: unknown parameter {key!r}")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name`` (ConfigError listing the known ones)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}; choose one of "
                          f"{', '.join(method_names())}") from None


def method_names() -> list[str]:
    return list(_REGISTRY)


def tensor_generator(seed: int, tensor: str) -> torch.Generator:
    """The generator of one tensor's random draws: seeded from the run's seed and the
    tensor's name, so a tensor's masks depend on neither shard layout nor tensor order."""
    digest = hashlib.sha256(f"{int(seed)}\0{tensor}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
