"""TTLinear / RepLinear / AdapterLinear against the math written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loretta_merge import tt
from loretta_merge.errors import ConfigError, ShapeError
from loretta_merge.adapters.layers import AdapterLinear, RepLinear, TTLinear


def dense(cores, rows, cols):
    """Independent TT reconstruction: contract left to right, reshape in C order."""
    full = cores[0]
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([full.ndim - 1], [0]))
    return full.reshape(rows, cols)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_ttlinear_forward_is_x_at_matrix_plus_bias():
    torch.manual_seed(0)
    layer = TTLinear(24, 10, [4, 6, 5, 2], 3, bias=True)
    assert sorted(k for k, _ in layer.named_parameters()) == ["bias"] + [f"tt_cores.{k}" for k in range(4)]
    assert layer.ranks == [1, 3, 3, 3, 1]
    x = _x(2, 3, 24)
    want = x @ dense(list(layer.tt_cores), 24, 10) + layer.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    assert abs(float(layer.bias.detach().abs().max())) <= 1 / math.sqrt(10)


def test_ttlinear_zero_init_outputs_zero_and_still_trains():
    torch.manual_seed(0)
    layer = TTLinear(16, 8, [4, 4, 8], 5, bias=True, init="zero")
    x = _x(3, 16)
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    (layer(x) * _x(3, 8, seed=1)).sum().backward()
    assert layer.tt_cores[-1].grad.abs().sum() > 0  # the zero core gets a gradient
    assert layer.bias.grad.abs().sum() > 0


def test_ttlinear_on_meta_and_in_bf16():
    meta = TTLinear(4096, 64, tt.matrix_modes(4096, 64), 5, bias=True, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.tt_cores) == tt.tt_num_params([16, 16, 16, 4, 4, 4], 5)
    half = TTLinear(16, 8, [4, 4, 8], 2, bias=True, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half(_x(2, 16).bfloat16()).dtype == torch.bfloat16


def test_ttlinear_from_cores_checks_shapes():
    cores = tt.random_cores([4, 4, 8], 2, 16, 8)
    with pytest.raises(ShapeError, match=r"\(16, 4\) matrix needs 64"):
        TTLinear.from_cores(cores, 16, 4)
    with pytest.raises(ShapeError, match=r"bias has shape \(7,\), expected \(8,\)"):
        TTLinear.from_cores(cores, 16, 8, bias=torch.zeros(7))


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
def test_rep_forward_delta_and_merge(conv):
    torch.manual_seed(0)
    base = Conv1D(12, 20) if conv else nn.Linear(20, 12)
    ref = Conv1D(12, 20) if conv else nn.Linear(20, 12)
    ref.load_state_dict(base.state_dict())
    layer = RepLinear(base, r=4, scale=16 / 4, tensor_rank=3, modes_a=[4, 5, 4], modes_b=[4, 3, 4])
    assert layer.fan_in_fan_out is conv
    x = _x(2, 5, 20)
    ma = dense(list(layer.lora_A.tt_cores), 20, 4)
    mb = dense(list(layer.lora_B.tt_cores), 4, 12)
    want = ref(x) + 4.0 * (x @ ma @ mb)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta(), 4.0 * ma @ mb, rtol=1e-5, atol=1e-7)
    merged = layer.merge()
    assert merged is base and type(merged) is type(ref)
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)


def test_rep_merge_in_bf16_sums_in_fp32_and_casts_once():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).bfloat16()
    w0 = base.weight.detach().clone()
    layer = RepLinear(base, r=2, scale=3.0, tensor_rank=2, modes_a=[4, 4, 2], modes_b=[2, 8])
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    want = (w0.float() + layer.delta().T).bfloat16()
    assert torch.equal(layer.merge().weight, want)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("placement", ["input", "output"])
def test_adapter_linear_matches_the_authors_formula(placement, act):
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    dim = 16 if placement == "input" else 24
    layer = AdapterLinear(base, placement=placement, bottleneck_size=8, tensor_rank=3,
                          modes_down=tt.matrix_modes(dim, 8), modes_up=tt.matrix_modes(8, dim),
                          non_linearity=act, scaling=0.5)
    f = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}[act]
    down = dense(list(layer.adapter_down.tt_cores), dim, 8)
    up = dense(list(layer.adapter_up.tt_cores), 8, dim)

    def adapter(h):
        return 0.5 * (f(h @ down + layer.adapter_down.bias) @ up + layer.adapter_up.bias)

    x = _x(3, 16)
    with torch.no_grad():
        if placement == "input":  # the authors' "mh" adapter: the linear sees x + a(x)
            want = nn.functional.linear(x + adapter(x), base.weight, base.bias)
        else:  # output adapter: h + a(h), h = linear(x)
            h = nn.functional.linear(x, base.weight, base.bias)
            want = h + adapter(h)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_adapter_zero_init_is_exact_noop_and_bad_options_raise():
    torch.manual_seed(0)
    base = Conv1D(24, 16)
    layer = AdapterLinear(base, placement="input", bottleneck_size=4, tensor_rank=2,
                          modes_down=[4, 4, 4], modes_up=[4, 4, 4], init="zero")
    x = _x(2, 16)
    assert torch.equal(layer(x), base(x))
    with pytest.raises(ConfigError, match="placement must be 'input' or 'output'"):
        AdapterLinear(base, placement="middle", bottleneck_size=4, tensor_rank=2,
                      modes_down=[4, 4, 4], modes_up=[4, 4, 4])
    with pytest.raises(ConfigError, match="nn.Linear or transformers Conv1D"):
        RepLinear(nn.Embedding(4, 4), r=2, scale=1.0, tensor_rank=2, modes_a=[8], modes_b=[8])
