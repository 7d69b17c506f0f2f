"""The torch side of an adapter bank: linear layers whose rows each pick their own adapter.

A targeted projection becomes ``BankedLinear``: for batch row ``i`` with slot ``s_i``,
``y_i = base(x_i) + sum_b scale_b[s_i] * B_b[s_i](A_b[s_i](x_i))``. Every branch tensor has a
leading *slot* axis of the bank's size ``S`` (one row per slot); a branch has one layout of
:class:`.switch_layers.BranchLayout` (TT cores or plain factors, ranks zero-padded to the
largest). The row's slot index (int64, shape ``(batch,)``) gathers that row's tensors:

- slot ``-1`` is the base: its scale is multiplied by 0, the gather reads slot 0 harmlessly;
- TT branches gather each row's cores, then reconstruct ``(batch, in, r)`` and
  ``(batch, r, out)`` at once (``tt.reconstruct_batched``), so the cost follows the batch,
  not the bank's size;
- the row's ``x`` (``(batch, ..., in)``) meets its factors in a batched MatMul.

The slot index reaches the layers as the buffer ``slot`` of every ``BankedLinear``, which the
export wrapper replaces by the graph input (``torch.func.functional_call``).
"""

from __future__ import annotations

import torch
from torch import nn

from ... import tt
from .switch_layers import BranchLayout


def _rows(param: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return param.index_select(0, idx)


class BankTTBranch(nn.Module):
    """Rep TT cores of every slot: ``lora_A.k`` is ``(S, r_{k-1}, n_k, r_k)``."""

    def __init__(self, layout: BranchLayout, size: int, dtype: torch.dtype):
        super().__init__()
        self.a_shape, self.b_shape = (layout.rows_a, layout.cols_a), (layout.rows_b, layout.cols_b)
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.zeros((size, *s), dtype=dtype), requires_grad=False)
             for s in layout.core_shapes("a")])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros((size, *s), dtype=dtype), requires_grad=False)
             for s in layout.core_shapes("b")])
        self.scale = nn.Parameter(torch.zeros(size, dtype=dtype), requires_grad=False)

    def factors(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = tt.reconstruct_batched([_rows(c, idx) for c in self.lora_A], *self.a_shape)
        b = tt.reconstruct_batched([_rows(c, idx) for c in self.lora_B], *self.b_shape)
        return a, b  # (batch, in, r), (batch, r, out)


class BankFactorBranch(nn.Module):
    """Plain factors of every slot: ``lora_A`` ``(S, in, r)``, ``lora_B`` ``(S, r, out)``."""

    def __init__(self, layout: BranchLayout, size: int, dtype: torch.dtype):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(size, layout.rows_a, layout.cols_a, dtype=dtype),
                                   requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(size, layout.rows_b, layout.cols_b, dtype=dtype),
                                   requires_grad=False)
        self.scale = nn.Parameter(torch.zeros(size, dtype=dtype), requires_grad=False)

    def factors(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _rows(self.lora_A, idx), _rows(self.lora_B, idx)


class BankedLinear(nn.Module):
    """``base_layer(x)`` plus, for each row, the branches of that row's slot."""

    def __init__(self, base: nn.Module, layouts: list[BranchLayout], size: int):
        super().__init__()
        self.base_layer = base
        dtype = base.weight.dtype
        self.bank = nn.ModuleList([BankTTBranch(lay, size, dtype) if lay.kind == "tt"
                                   else BankFactorBranch(lay, size, dtype) for lay in layouts])
        # replaced by the graph's slot input at export; -1 (the base) for eager use
        self.register_buffer("slot", torch.full((1,), -1, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        slot = self.slot
        idx = slot.clamp(min=0)                                  # (batch,)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])            # (batch, tokens, in)
        for branch in self.bank:
            a, b = branch.factors(idx)                           # (batch, in, r), (batch, r, out)
            on = (slot >= 0).to(a.dtype) * _rows(branch.scale, idx)   # (batch,)
            delta = torch.matmul(torch.matmul(rows.to(a.dtype), a), b) * on[:, None, None]
            y = y + delta.reshape(y.shape).to(y.dtype)
        return y
