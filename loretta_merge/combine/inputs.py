"""The adapters ``combine`` reads: checked against each other, grouped by module.

Every input must be a linear, low-rank adapter (PEFT LoRA or LoRETTA_rep, any rank, any
scale) of the same base: a module present in several inputs must have the same
``(out, in)`` shape and the same orientation (GPT-2 ``Conv1D`` layers store ``(in, out)``).
A module present in only some inputs is a zero delta for the others (PEFT's
``add_weighted_adapter`` does the same). No base weight is read: the delta of a low-rank
module does not depend on it.

Refused, each with one line naming the input: LoRETTA_adp (a non-linear bottleneck, no
weight delta), DoRA (its magnitude vector rescales the whole merged weight), and full
tensors (trained norms, heads, TT-replaced dense layers): their change is ``W - W0``, which
needs the base; ``drop_full_tensors`` leaves them out instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, FormatError, ShapeError
from ..formats import Adapter, LoraModule, RepModule, as_adapter


@dataclass
class ModuleTerms:
    """One module: its shape, orientation and every input's low-rank change of it."""

    name: str
    out_features: int
    in_features: int
    fan_in_fan_out: bool
    terms: dict[int, LoraModule | RepModule] = field(default_factory=dict)  # input -> module

    def delta(self, i: int) -> torch.Tensor | None:
        """Input ``i``'s change of the weight in fp32, as the weight is STORED (``(out, in)``,
        ``(in, out)`` for ``Conv1D``); None when input ``i`` does not touch the module."""
        m = self.terms.get(i)
        if m is None:
            return None
        if isinstance(m, LoraModule):
            d = m.b.float() @ m.a.float()                         # (out, in), as PEFT forms it
            d = d.T if self.fan_in_fan_out else d
            return d * float(m.scale)
        d = m.delta(torch.float32)                                # (in, out)
        return d if self.fan_in_fan_out else d.T

    def rank_before(self) -> int:
        return max(_rank(m) for m in self.terms.values())

    def params_before(self) -> int:
        return sum(m.num_params() for m in self.terms.values())


@dataclass
class CombineInputs:
    """The inputs read and checked: adapters, weights, modules (in first-seen order)."""

    adapters: list[Adapter]
    weights: list[float]
    modules: dict[str, ModuleTerms]
    base_model_name_or_path: str | None
    task_type: str | None
    dropped: list[str] = field(default_factory=list)      # full tensors left out
    notes: list[str] = field(default_factory=list)

    def max_rank(self) -> int:
        return max(m.rank_before() for m in self.modules.values())


def _rank(m) -> int:
    return int(m.a.shape[0]) if isinstance(m, LoraModule) else int(m.a.cols)


def _where(a: Adapter, i: int) -> str:
    return str(a.path) if a.path is not None else f"input {i + 1}"


def _check_kind(a: Adapter, where: str, drop_full_tensors: bool, dropped: list[str]) -> None:
    if a.method == "adp":
        raise FormatError(f"{where}: is a LoRETTA_adp adapter, a non-linear bottleneck whose "
                          f"change of the model is no weight delta, so it cannot be combined; "
                          f"deploy it unmerged (export onnx) and combine rep or LoRA adapters")
    full = sorted(a.tensors)
    for name, m in a.modules.items():
        if isinstance(m, LoraModule) and m.magnitude is not None:
            raise ConfigError(f"{where}: module {name} is DoRA (lora_magnitude_vector), which "
                              f"rescales the whole merged weight by norms of the base weight "
                              f"rather than adding a delta; combine cannot mix it: merge it "
                              f"alone with `loretta-merge merge`")
        if not isinstance(m, (LoraModule, RepModule)):
            full.append(f"{name} (TT-replaced dense layer)")
    if full and not drop_full_tensors:
        raise ConfigError(f"{where}: carries {len(full)} full tensor(s) (e.g. {full[0]}: trained "
                          f"norms, heads or replaced layers); their change W - W0 needs the base "
                          f"weights, so combine cannot mix them: pass --drop-full-tensors to "
                          f"combine the low-rank modules only, or merge the adapters into the "
                          f"base with `loretta-merge merge`")
    dropped.extend(f"{where}: {k}" for k in full)


def _shape(m) -> tuple[int, int]:
    if isinstance(m, LoraModule):
        return int(m.b.shape[0]), int(m.a.shape[1])
    return int(m.b.cols), int(m.a.rows)


def read_inputs(inputs, *, drop_full_tensors: bool = False,
                allow_unsafe_pickle: bool = False) -> CombineInputs:
    """Read and check ``inputs``, a list of ``(adapter directory or Adapter, weight)``."""
    if not inputs:
        raise ConfigError("combine needs at least one adapter; pass ADAPTER[:W] ...")
    adapters, weights, dropped = [], [], []
    for i, (source, w) in enumerate(inputs):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"the weight of input {i + 1} ({source}) is {w!r}; give a finite "
                              f"number, e.g. ADAPTER:0.5")
        a = as_adapter(source, allow_unsafe_pickle=allow_unsafe_pickle)
        _check_kind(a, _where(a, i), drop_full_tensors, dropped)
        adapters.append(a)
        weights.append(float(w))
    modules: dict[str, ModuleTerms] = {}
    owner: dict[str, int] = {}
    for i, a in enumerate(adapters):
        for name, m in a.modules.items():
            if not isinstance(m, (LoraModule, RepModule)):
                continue
            out_f, in_f = _shape(m)
            fifo = name in a.fan_in_fan_out
            have = modules.get(name)
            if have is None:
                modules[name] = ModuleTerms(name, out_f, in_f, fifo, {i: m})
                owner[name] = i
                continue
            first = _where(adapters[owner[name]], owner[name])
            if (have.out_features, have.in_features) != (out_f, in_f):
                raise ShapeError(f"module {name} is (out, in) = ({have.out_features}, "
                                 f"{have.in_features}) in {first} but ({out_f}, {in_f}) in "
                                 f"{_where(a, i)}: the adapters were trained on different base "
                                 f"models; give adapters of one base")
            if have.fan_in_fan_out != fifo:
                raise ShapeError(f"module {name} is a Conv1D (fan_in_fan_out) in "
                                 f"{first if have.fan_in_fan_out else _where(a, i)} but a Linear "
                                 f"in {_where(a, i) if have.fan_in_fan_out else first}: the "
                                 f"adapters were trained on different base models; give "
                                 f"adapters of one base")
            have.terms[i] = m
    if not modules:
        raise FormatError(f"{_where(adapters[0], 0)}: the inputs have no LoRA or rep modules to "
                          f"combine; pass PEFT LoRA or LoRETTA_rep adapters")
    names = {a.base_model_name_or_path for a in adapters} - {None}
    tasks = {a.config.get("task_type") for a in adapters} - {None}
    notes = []
    if len(names) > 1:
        notes.append(f"the inputs name different bases ({', '.join(sorted(names))}); their "
                     f"module shapes agree, so they are combined; the output names the first")
    if len(tasks) > 1:
        notes.append(f"the inputs have different task types ({', '.join(sorted(tasks))}); the "
                     f"output takes the first")
    first_name = next((a.base_model_name_or_path for a in adapters if a.base_model_name_or_path), None)
    first_task = next((a.config.get("task_type") for a in adapters if a.config.get("task_type")), None)
    return CombineInputs(adapters, weights, modules, first_name, first_task, dropped, notes)
