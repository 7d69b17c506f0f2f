"""The three LoRETTA layers.

- :class:`TTLinear`: a ``(rows, cols)`` matrix stored as TT cores (+ optional bias),
  ``y = x @ M + b``. The matrix is rebuilt once per forward by :func:`tt.reconstruct`,
  which owns the TT convention.
- :class:`RepLinear`: LoRETTA_rep around an ``nn.Linear`` or GPT-2 ``Conv1D``:
  ``y = base(x) + s * B(A(dropout(x)))`` with A ``(in, r)`` and B ``(r, out)`` TT layers.
- :class:`AdapterLinear`: LoRETTA_adp around an ``nn.Linear``/``Conv1D``: a bottleneck
  adapter ``a(h) = s * up(act(down(dropout(h))))`` (TT layers with bias) applied to the
  wrapped linear's input (``y = base(x + a(x))``, the authors' "mh" adapter) or to its
  output (``y = base(x) + a(base(x))``).

New parameters are created on the wrapped module's device and dtype (the meta device
included, so parameter counts of huge models need no memory).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .. import tt
from ..errors import ConfigError, ShapeError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (weight stored ``(in, out)``, i.e. fan_in_fan_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or ``Conv1D``."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    raise ConfigError(f"expected an nn.Linear or transformers Conv1D, got {type(module).__name__}; pass an nn.Linear or a Conv1D module")


class TTLinear(nn.Module):
    """``y = x @ M + b`` with ``M`` a ``(rows, cols)`` matrix stored as TT cores.

    Parameters are ``tt_cores.<k>`` (shape ``(r_{k-1}, n_k, r_k)``) and, with bias,
    ``bias`` of shape ``(cols,)``. ``init="paper"`` draws the paper's Gaussian cores and a
    ``U(-1/sqrt(cols), 1/sqrt(cols))`` bias; ``init="zero"`` keeps the paper's cores but
    zeroes the last core and the bias, so the layer outputs exactly 0 yet still trains.
    """

    def __init__(self, rows: int, cols: int, modes: Sequence[int], rank: int, *, bias: bool = False,
                 init: str = "paper", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.rows, self.cols = int(rows), int(cols)
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "meta":  # no data: shapes only
            cores = [torch.empty(r0, n, r1, dtype=dtype, device=device)
                     for r0, n, r1 in zip(tt.tt_ranks(modes, rank), modes, tt.tt_ranks(modes, rank)[1:])]
            tt._check_matrix(modes, self.rows, self.cols, "TTLinear")
        else:
            cores = tt.random_cores(modes, rank, self.rows, self.cols, generator=generator,
                                    dtype=dtype, device=device)
            if init == "zero":
                cores[-1] = torch.zeros_like(cores[-1])
            elif init != "paper":
                raise ConfigError(f"init must be 'paper' or 'zero', got {init!r}; pass 'paper' or 'zero'")
        self.tt_cores = nn.ParameterList([nn.Parameter(c) for c in cores])
        if bias:
            b = torch.empty(self.cols, dtype=dtype, device=device)
            if device.type != "meta":
                if init == "zero":
                    b.zero_()
                else:
                    bound = 1.0 / math.sqrt(self.cols)
                    b.copy_(torch.rand(self.cols, generator=generator) * 2 * bound - bound)
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_cores(cls, cores: Sequence[torch.Tensor], rows: int, cols: int, *,
                   bias: torch.Tensor | None = None, name: str = "TT") -> "TTLinear":
        """A layer holding copies of given cores (and bias); shapes are checked."""
        tt.validate_cores(list(cores), name=name)
        modes = tt.tt_modes_of(cores)
        if math.prod(modes) != rows * cols:
            raise ShapeError(f"{name}: cores with modes {modes} hold {math.prod(modes)} entries, "
                             f"a ({rows}, {cols}) matrix needs {rows * cols}; pass cores whose modes multiply to {rows * cols}")
        if bias is not None and tuple(bias.shape) != (cols,):
            raise ShapeError(f"{name}: bias has shape {tuple(bias.shape)}, expected ({cols},); pass a bias of shape ({cols},)")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.rows, layer.cols = int(rows), int(cols)
        layer.tt_cores = nn.ParameterList([nn.Parameter(c.detach().clone()) for c in cores])
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        else:
            layer.register_parameter("bias", None)
        return layer

    @property
    def modes(self) -> list[int]:
        return [int(c.shape[1]) for c in self.tt_cores]

    @property
    def ranks(self) -> list[int]:
        return [1] + [int(c.shape[2]) for c in self.tt_cores]

    def matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(rows, cols)`` matrix (fp32 contraction for half-precision cores)."""
        return tt.reconstruct(list(self.tt_cores), self.rows, self.cols, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.matrix()  # (rows, cols), cores' dtype
        y = x.to(m.dtype) @ m
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, modes={self.modes}, ranks={self.ranks}, " \
               f"bias={self.bias is not None}"


def _param_like(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    w = base.weight
    return w.dtype, w.device


class RepLinear(nn.Module):
    """LoRETTA_rep around ``base_layer``: ``base(x) + scale * lora_B(lora_A(dropout(x)))``."""

    def __init__(self, base: nn.Module, *, r: int, scale: float, tensor_rank: int,
                 modes_a: Sequence[int], modes_b: Sequence[int], dropout: float = 0.0,
                 init: str = "paper", generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear_dims(base)
        self.fan_in_fan_out = is_conv1d(base)
        self.base_layer = base
        self.r, self.scale = int(r), float(scale)
        dtype, device = _param_like(base)
        self.lora_A = TTLinear(self.in_features, r, modes_a, tensor_rank, dtype=dtype, device=device,
                               generator=generator)
        self.lora_B = TTLinear(r, self.out_features, modes_b, tensor_rank, init=init, dtype=dtype,
                               device=device, generator=generator)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    @classmethod
    def from_tt(cls, base: nn.Module, a: TTLinear, b: TTLinear, *, scale: float,
                dropout: float = 0.0) -> "RepLinear":
        """Wrap ``base`` around existing TT layers (used when loading)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear_dims(base)
        layer.fan_in_fan_out = is_conv1d(base)
        layer.base_layer = base
        layer.r, layer.scale = int(a.cols), float(scale)
        layer.lora_A, layer.lora_B = a, b
        layer.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        layer.disabled = False
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        delta = self.lora_B(self.lora_A(self.lora_dropout(x)))
        return result + delta.to(result.dtype) * self.scale

    def delta(self) -> torch.Tensor:
        """``scale * A @ B`` as an fp32 ``(in, out)`` matrix."""
        return self.scale * (self.lora_A.matrix(torch.float32) @ self.lora_B.matrix(torch.float32))

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The base module with the delta added to its weight (fp32 sum, one cast).
        Linear weight ``(out, in)`` gets ``delta.T``; Conv1D weight ``(in, out)`` gets ``delta``.

        The merged weight is a NEW parameter: a weight shared with another module (an output
        projection tied to the input embedding) must not change the other module, whose
        input side the adapter never touched."""
        base = self.base_layer
        d = self.delta().to(base.weight.device)
        w = base.weight
        merged = w.float() + (d if self.fan_in_fan_out else d.T)
        base.weight = nn.Parameter(merged.to(w.dtype), requires_grad=w.requires_grad)
        return base

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale}, fan_in_fan_out={self.fan_in_fan_out}"


class AdapterLinear(nn.Module):
    """LoRETTA_adp around ``base_layer``.

    ``placement="input"``: ``base(x + s * up(act(down(dropout(x)))))`` (dim = in_features).
    ``placement="output"``: ``h + s * up(act(down(dropout(h))))`` with ``h = base(x)``
    (dim = out_features). The adapter term is cast to the activation dtype before scaling,
    as the authors' package does.
    """

    def __init__(self, base: nn.Module, *, placement: str, bottleneck_size: int, tensor_rank: int,
                 modes_down: Sequence[int], modes_up: Sequence[int], non_linearity: str = "relu",
                 dropout: float = 0.0, scaling: float = 1.0, init: str = "paper",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        dim = self._setup(base, placement, non_linearity, dropout, scaling)
        dtype, device = _param_like(base)
        self.adapter_down = TTLinear(dim, bottleneck_size, modes_down, tensor_rank, bias=True,
                                     dtype=dtype, device=device, generator=generator)
        self.adapter_up = TTLinear(bottleneck_size, dim, modes_up, tensor_rank, bias=True, init=init,
                                   dtype=dtype, device=device, generator=generator)

    def _setup(self, base: nn.Module, placement: str, non_linearity: str, dropout: float,
               scaling: float) -> int:
        if placement not in ("input", "output"):
            raise ConfigError(f"adapter placement must be 'input' or 'output', got {placement!r}; pass 'input' or 'output'")
        if non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity must be one of {list(ACTIVATIONS)}, got {non_linearity!r}; pass one of {list(ACTIVATIONS)}")
        self.in_features, self.out_features = linear_dims(base)
        self.fan_in_fan_out = is_conv1d(base)
        self.base_layer = base
        self.placement = placement
        self.non_linearity = non_linearity
        self.scaling = float(scaling)
        self.act = ACTIVATIONS[non_linearity]()
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        return self.dim

    @property
    def dim(self) -> int:
        return self.in_features if self.placement == "input" else self.out_features

    @classmethod
    def from_tt(cls, base: nn.Module, down: TTLinear, up: TTLinear, *, placement: str,
                non_linearity: str, scaling: float, dropout: float = 0.0) -> "AdapterLinear":
        """Wrap ``base`` around existing TT layers (used when loading)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(base, placement, non_linearity, dropout, scaling)
        layer.adapter_down, layer.adapter_up = down, up
        return layer

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        """``s * up(act(down(dropout(h))))`` in ``h``'s dtype."""
        out = self.adapter_up(self.act(self.adapter_down(self.adapter_dropout(h))))
        return out.to(h.dtype) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        if self.placement == "input":
            return self.base_layer(x + self.adapter(x))
        h = self.base_layer(x)
        return h + self.adapter(h)

    def extra_repr(self) -> str:
        return f"placement={self.placement}, non_linearity={self.non_linearity}, scaling={self.scaling}"

