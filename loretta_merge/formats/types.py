"""The in-memory adapter: ONE form (:class:`Adapter`) for every on-disk kind.

Module names are relative to the model the adapter was trained on (what
``model.named_modules()`` gives), without PEFT's ``base_model.model.`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch

from .. import tt

@dataclass
class TTMatrix:
    """One TT-stored ``(rows, cols)`` matrix ``M`` (the layer computes ``y = x @ M``)."""

    cores: list[torch.Tensor]
    rows: int
    cols: int

    def matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return tt.reconstruct(self.cores, self.rows, self.cols, dtype=dtype)

    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)


@dataclass
class RepModule:
    """LoRETTA_rep on one Linear/Conv1D: ``delta = scale * A @ B`` with TT factors."""

    a: TTMatrix  # (in, r)
    b: TTMatrix  # (r, out)
    scale: float

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(in, out)`` weight change, computed in fp32 and cast once to ``dtype``."""
        ma = self.a.matrix(torch.float32)
        mb = self.b.matrix(torch.float32)
        return ((ma @ mb) * self.scale).to(dtype)

    def num_params(self) -> int:
        return self.a.num_params() + self.b.num_params()


@dataclass
class LoraModule:
    """Plain PEFT LoRA on one Linear/Conv1D: ``delta = scale * (B @ A).T``."""

    a: torch.Tensor  # lora_A.weight (r, in)
    b: torch.Tensor  # lora_B.weight (out, r)
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA lora_magnitude_vector

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(in, out)`` weight change, computed in fp32 and cast once to ``dtype``."""
        return ((self.b.float() @ self.a.float()).T * self.scale).to(dtype)

    def num_params(self) -> int:
        extra = self.magnitude.numel() if self.magnitude is not None else 0
        return self.a.numel() + self.b.numel() + extra


@dataclass
class AdpModule:
    """LoRETTA_adp bottleneck adapter: ``h + scaling * up(act(down(h)))``."""

    down: TTMatrix  # (dim, bottleneck)
    down_bias: torch.Tensor  # (bottleneck,)
    up: TTMatrix  # (bottleneck, dim)
    up_bias: torch.Tensor  # (dim,)
    placement: str  # "input" | "output"
    non_linearity: str
    scaling: float

    def num_params(self) -> int:
        return self.down.num_params() + self.up.num_params() + self.down_bias.numel() + self.up_bias.numel()


@dataclass
class TTDenseModule:
    """A dense layer replaced by a TT layer: ``nn.Linear`` weight = ``weight.matrix().T``."""

    weight: TTMatrix  # (in, out)
    bias: torch.Tensor | None

    def num_params(self) -> int:
        return self.weight.num_params() + (self.bias.numel() if self.bias is not None else 0)


Module = Union[RepModule, LoraModule, AdpModule, TTDenseModule]


@dataclass
class Adapter:
    """Everything an adapter directory holds, whatever its on-disk kind."""

    method: str  # "rep" | "adp" | "lora"
    source: str  # "loretta-merge" | "loretta-0.1" | "peft"
    modules: dict[str, Module]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    fan_in_fan_out: set[str] = field(default_factory=set)
    base_model_name_or_path: str | None = None
    path: Path | None = None

    def num_params(self) -> int:
        """Trained parameters: adapter modules plus full tensors (norms, heads)."""
        return sum(m.num_params() for m in self.modules.values()) + sum(t.numel() for t in self.tensors.values())

