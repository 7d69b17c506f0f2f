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


# --------------------------------------------------------------------------- full tensors per row

# RMSNorm classes whose forward is Llama's: weight * (x / sqrt(mean(x^2) + eps)), in fp32
LLAMA_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                  "OlmoRMSNorm", "Olmo2RMSNorm", "GraniteRMSNorm", "Phi3RMSNorm")


def row_kind(module: nn.Module) -> str | None:
    """How :class:`RowParams` runs ``module`` per row: ``linear``, ``layernorm``, ``rmsnorm``;
    None when it cannot (the module's own forward is not one it reproduces)."""
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.LayerNorm and module.elementwise_affine:
        return "layernorm"
    if type(module).__name__ in LLAMA_RMSNORMS and hasattr(module, "variance_epsilon"):
        return "rmsnorm"
    return None


class RowParams(nn.Module):
    """A Linear or norm whose trained full tensors (a head, a norm's weight and bias) may
    differ per row: ``rows.<leaf>`` ``(S, *shape)`` holds each slot's value and
    ``rows.<leaf>_on`` ``(S,)`` is 1 where the slot sets it; other rows use the base value."""

    def __init__(self, base: nn.Module, leaves: list[str], size: int):
        super().__init__()
        self.base_layer, self.kind = base, row_kind(base)
        dtype = base.weight.dtype
        rows = {}
        for leaf in leaves:
            shape = tuple(getattr(base, leaf).shape)
            rows[leaf] = nn.Parameter(torch.zeros((size, *shape), dtype=dtype), requires_grad=False)
            rows[f"{leaf}_on"] = nn.Parameter(torch.zeros(size, dtype=dtype), requires_grad=False)
        self.rows = nn.ParameterDict(rows)
        self.register_buffer("slot", torch.full((1,), -1, dtype=torch.long), persistent=False)

    def _value(self, leaf: str, idx: torch.Tensor, active: torch.Tensor):
        """The leaf of each row: (batch, *shape), or (1, *shape) when every row shares it;
        None for a missing bias."""
        base = getattr(self.base_layer, leaf)
        if base is None:
            return None
        if leaf not in self.rows:
            return base.unsqueeze(0)
        on = active & (_rows(self.rows[f"{leaf}_on"], idx) > 0)           # (batch,)
        return torch.where(on.view(-1, *[1] * base.dim()), _rows(self.rows[leaf], idx), base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.slot
        idx, active = slot.clamp(min=0), slot >= 0
        w = self._value("weight", idx, active)
        b = self._value("bias", idx, active) if hasattr(self.base_layer, "bias") else None
        lead = [1] * (x.dim() - 2)                       # broadcast over the middle axes
        if self.kind == "linear":
            rows = x.reshape(x.shape[0], -1, x.shape[-1])    # (batch, tokens, in)
            y = torch.matmul(rows, w.transpose(1, 2))        # (batch, tokens, out)
            if b is not None:
                y = y + b[:, None, :]
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if self.kind == "layernorm":
            base = self.base_layer
            y = nn.functional.layer_norm(x, base.normalized_shape, None, None, base.eps)
            y = y * w.view(w.shape[0], *lead, -1)
            return y + b.view(b.shape[0], *lead, -1) if b is not None else y
        dtype = x.dtype                                  # rmsnorm, as Llama computes it
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.base_layer.variance_epsilon)
        return w.view(w.shape[0], *lead, -1) * h.to(dtype)
