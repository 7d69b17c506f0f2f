"""The torch side of switchable adapters: linear layers with zero-valued adapter branches.

A targeted projection becomes ``SwitchableLinear``: ``base(x) + sum_b scale_b * B_b(A_b(x))``
over its *branches*. A branch holds one graph layout that several adapters can share:

- ``TTBranch``: the rep TT cores of ``A`` (in, r) and ``B`` (r, out), reconstructed in the
  graph (a few small MatMul/Reshape per factor); TT ranks are the maximum over the adapters
  that share the branch, smaller ones are zero-padded (exact: padded slices contribute 0);
- ``FactorBranch``: ``A`` (in, r) and ``B`` (r, out) as plain matrices (PEFT LoRA, or rep
  factors precomputed); the rank is zero-padded to the largest.

Every branch parameter starts at zero, so with no adapter active the layer is the base layer
exactly (``y + 0``). ONNX Runtime overrides a branch's tensors with an adapter's values.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import tt


class TTBranch(nn.Module):
    def __init__(self, layout: "BranchLayout", dtype: torch.dtype):
        super().__init__()
        self.a_shape, self.b_shape = (layout.rows_a, layout.cols_a), (layout.rows_b, layout.cols_b)
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.zeros(s, dtype=dtype), requires_grad=False)
             for s in layout.core_shapes("a")])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(s, dtype=dtype), requires_grad=False)
             for s in layout.core_shapes("b")])
        self.scale = nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = tt.reconstruct(list(self.lora_A), *self.a_shape)
        b = tt.reconstruct(list(self.lora_B), *self.b_shape)
        return (x.to(a.dtype) @ a) @ b * self.scale


class FactorBranch(nn.Module):
    def __init__(self, layout: "BranchLayout", dtype: torch.dtype):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(layout.rows_a, layout.cols_a, dtype=dtype),
                                   requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(layout.rows_b, layout.cols_b, dtype=dtype),
                                   requires_grad=False)
        self.scale = nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.lora_A.dtype) @ self.lora_A) @ self.lora_B * self.scale


class SwitchableLinear(nn.Module):
    """``base_layer(x) + sum over branches``; the base layer is kept as it was."""

    def __init__(self, base: nn.Module, layouts: list["BranchLayout"]):
        super().__init__()
        self.base_layer = base
        dtype = base.weight.dtype
        self.switch = nn.ModuleList([TTBranch(lay, dtype) if lay.kind == "tt"
                                     else FactorBranch(lay, dtype) for lay in layouts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for branch in self.switch:
            y = y + branch(x).to(y.dtype)
        return y


class BranchLayout:
    """The shape of one branch: kind ``tt`` (modes and max ranks of A and B) or ``factors``."""

    def __init__(self, kind: str, rows_a: int, cols_a: int, rows_b: int, cols_b: int,
                 modes_a: tuple[int, ...] = (), modes_b: tuple[int, ...] = ()):
        self.kind = kind
        self.rows_a, self.cols_a, self.rows_b, self.cols_b = rows_a, cols_a, rows_b, cols_b
        self.modes_a, self.modes_b = tuple(modes_a), tuple(modes_b)
        self.ranks_a = [1] * (len(modes_a) + 1)
        self.ranks_b = [1] * (len(modes_b) + 1)

    def signature(self) -> tuple:
        if self.kind == "tt":
            return ("tt", self.rows_a, self.cols_a, self.modes_a, self.rows_b, self.cols_b,
                    self.modes_b)
        return ("factors", self.rows_a, self.cols_b)

    def widen(self, ranks_a: list[int], ranks_b: list[int], rank: int) -> None:
        """Grow the ranks to hold another adapter (element-wise maximum)."""
        if self.kind == "tt":
            self.ranks_a = [max(x, y) for x, y in zip(self.ranks_a, ranks_a)]
            self.ranks_b = [max(x, y) for x, y in zip(self.ranks_b, ranks_b)]
        else:
            self.cols_a = self.rows_b = max(self.cols_a, rank)

    def core_shapes(self, which: str) -> list[tuple[int, int, int]]:
        modes, ranks = (self.modes_a, self.ranks_a) if which == "a" else (self.modes_b, self.ranks_b)
        return [(ranks[k], modes[k], ranks[k + 1]) for k in range(len(modes))]


def pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` zero-padded at the end of every axis to ``shape``."""
    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out
