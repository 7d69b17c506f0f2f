"""The TT math core: exactness, the error bound, batching, dtypes, devices, validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loretta_merge import tt
from loretta_merge.errors import ConfigError, LorettaError, ShapeError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def naive_chain(cores, rows, cols):
    """Independent reference: left-to-right tensordot chain in float64, C-order reshape."""
    full = cores[0].double()
    for core in cores[1:]:
        full = torch.tensordot(full, core.double(), dims=([full.ndim - 1], [0]))
    return full.reshape(rows, cols)


def random_tt(modes, rank, *, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ranks = tt.tt_ranks(modes, rank)
    return [torch.randn(ranks[k], n, ranks[k + 1], generator=g).to(dtype=dtype, device=device)
            for k, n in enumerate(modes)]


# --------------------------------------------------------------------------- reconstruct

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("modes,rows,cols", [
    ([4, 8, 8, 8, 4], 1024, 8),      # a mode straddles rows and columns (LORETTA.md)
    ([8, 8, 12, 8], 768, 8),
    ([16, 16, 8, 4, 4], 8, 4096),
    ([7], 7, 1),
    ([3, 5], 5, 3),
])
def test_reconstruct_matches_naive_chain(modes, rows, cols, device):
    cores = random_tt(modes, 5, device=device)
    got = tt.reconstruct(cores, rows, cols)
    assert got.shape == (rows, cols) and got.device.type == device
    want = naive_chain([c.cpu() for c in cores], rows, cols)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_reconstruct_uses_c_order_over_the_full_tensor():
    cores = random_tt([2, 3, 4], 2)
    full = tt.tt_to_tensor(cores)
    assert full.shape == (2, 3, 4)
    assert torch.equal(tt.reconstruct(cores, 4, 6), full.reshape(4, 6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cores_accumulate_in_fp32(dtype):
    cores = random_tt([8, 8, 8, 8], 8, dtype=dtype)
    ref = naive_chain([c.float() for c in cores], 64, 64)
    got32 = tt.reconstruct(cores, 64, 64, dtype=torch.float32)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-4)
    got = tt.reconstruct(cores, 64, 64)
    assert got.dtype == dtype
    # one rounding of the fp32 result: exactly the cast of the fp32 reconstruction
    assert torch.equal(got, got32.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_one_by_one(device):
    tts = [random_tt([4, 8, 8, 8, 4], 5, seed=s, device=device) for s in range(6)]
    batched = tt.reconstruct_batched(tt.stack_tts(tts), 1024, 8)
    assert batched.shape == (6, 1024, 8)
    for i, cores in enumerate(tts):
        torch.testing.assert_close(batched[i], tt.reconstruct(cores, 1024, 8), rtol=1e-6, atol=1e-6)
    back = tt.unstack_tts(tt.stack_tts(tts))
    assert all(torch.equal(a, b) for x, y in zip(back, tts) for a, b in zip(x, y))


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("cores,pattern", [
    ([torch.zeros(2, 4, 3)], r"core 0 .*rank r_0 = 2, expected 1"),
    ([torch.zeros(1, 4, 3), torch.zeros(2, 4, 1)], r"core 1 has shape \(2, 4, 1\).*expected 3 from core 0"),
    ([torch.zeros(1, 4, 3), torch.zeros(3, 4, 2)], r"last rank must be 1, got 2"),
    ([torch.zeros(4, 3)], r"core 0 has shape \(4, 3\); every core must be 3-D"),
    ([], r"non-empty list"),
    ([torch.zeros(1, 4, 1, dtype=torch.long)], r"floating point"),
])
def test_validate_cores_states_rule_and_value(cores, pattern):
    with pytest.raises(ShapeError, match=pattern):
        tt.validate_cores(cores)


def test_reconstruct_rejects_wrong_matrix_shape():
    cores = random_tt([4, 8], 3)
    with pytest.raises(ShapeError, match=r"modes \[4, 8\] multiply to 32, but a \(4, 4\) matrix"):
        tt.reconstruct(cores, 4, 4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=4), min_size=0, max_size=4),
       st.integers(-2, 40), st.integers(-2, 40))
def test_validators_raise_only_project_errors(shapes, rows, cols):
    cores = [torch.zeros(*s) if s else torch.zeros(()) for s in shapes]
    try:
        tt.reconstruct(cores, rows, cols)
    except LorettaError:
        pass


# --------------------------------------------------------------------------- TT-SVD

@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 10_000))
def test_tt_svd_exact_at_full_rank(modes, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*modes, generator=g, dtype=torch.float64)
    res = tt.tt_svd(x, modes)
    back = tt.tt_to_tensor(res.cores)
    torch.testing.assert_close(back, x, rtol=1e-9, atol=1e-9)
    assert float(res.rel_error) < 1e-6


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(2, 6), min_size=2, max_size=5), st.floats(0.01, 0.9), st.integers(0, 10_000))
def test_tt_svd_error_bound_and_reported_error(modes, eps, seed):
    g = torch.Generator().manual_seed(seed)
    # decaying spectrum so truncation really happens
    x = torch.randn(*modes, generator=g, dtype=torch.float64)
    x = x + 3 * torch.randn(*modes, generator=g, dtype=torch.float64).sign().cumsum(-1)
    res = tt.tt_svd(x, modes, eps=eps)
    actual = float((tt.tt_to_tensor(res.cores) - x).norm() / x.norm())
    assert actual <= eps * (1 + 1e-9) + 1e-12  # the classical bound
    assert actual == pytest.approx(float(res.rel_error), rel=1e-6, abs=1e-9)  # reported = achieved


def test_tt_svd_max_rank_caps_ranks_and_reports_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 8, 8, 8, generator=g)
    res = tt.tt_svd(x, [8, 8, 8, 8], max_rank=3)
    assert max(res.ranks) == 3
    actual = float((tt.tt_to_tensor(res.cores) - x).norm() / x.norm())
    assert actual == pytest.approx(float(res.rel_error), rel=1e-3)
    assert actual > 0.1  # a random tensor does not compress: the report must say so


def test_tt_svd_of_low_rank_matrix_is_exact_at_its_rank():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(64, 2, generator=g, dtype=torch.float64)
    b = torch.randn(2, 48, generator=g, dtype=torch.float64)
    x = a @ b  # rank 2 across the row/column boundary
    modes = tt.matrix_modes(64, 48, shapes="auto")
    res = tt.tt_svd(x, modes, eps=1e-10)
    k = len(tt.factorize(64))
    assert res.ranks[k] == 2
    torch.testing.assert_close(tt.reconstruct(res.cores, 64, 48), x, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tt_svd_accepts_half_inputs(dtype):
    x = torch.randn(16, 8).to(dtype)
    res = tt.tt_svd(x, [4, 4, 8], dtype=torch.float32)
    torch.testing.assert_close(tt.reconstruct(res.cores, 16, 8), x.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_tt_svd_equals_one_by_one_and_shares_ranks(device):
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(5, 32, 8, generator=g).to(device)
    xs[0] = torch.outer(torch.randn(32, generator=g), torch.randn(8, generator=g)).to(device)
    modes = [4, 8, 8]
    res = tt.tt_svd_batched(xs, modes, eps=0.2)
    assert res.cores[0].shape[0] == 5
    back = tt.reconstruct_batched(res.cores, 32, 8)
    for i in range(5):
        err = float((back[i] - xs[i]).norm() / xs[i].norm())
        assert err <= 0.2 + 1e-5
        assert err == pytest.approx(float(res.rel_error[i]), rel=1e-3, abs=1e-5)
        single = tt.tt_svd(xs[i], modes, eps=0.2)
        assert max(single.ranks) <= max(res.ranks)  # shared ranks are the largest needed


@pytest.mark.parametrize("eps", [-0.1, 1.0, 2.0, float("nan")])
def test_eps_outside_range_is_refused(eps):
    with pytest.raises(ConfigError, match="eps"):
        tt.tt_svd(torch.randn(4, 4), [4, 4], eps=eps)


def test_tt_svd_rejects_modes_that_do_not_fit():
    with pytest.raises(ShapeError, match=r"modes \[4, 4\] multiply to 16"):
        tt.tt_svd(torch.randn(4, 5), [4, 4])


# --------------------------------------------------------------------------- rounding

def test_tt_round_recompresses_without_loss_when_ranks_are_redundant():
    g = torch.Generator().manual_seed(4)
    cores = random_tt([4, 4, 4, 4], 2, seed=5)
    # pad ranks with a redundant duplicate TT: sum of a TT with itself has rank 4, true rank 2
    doubled = []
    for k, c in enumerate(cores):
        if k == 0:
            doubled.append(torch.cat([c, c], dim=2))
        elif k == len(cores) - 1:
            doubled.append(torch.cat([c, c], dim=0))
        else:
            z = torch.zeros_like(c)
            doubled.append(torch.cat([torch.cat([c, z], 2), torch.cat([z, c], 2)], 0))
    full = tt.tt_to_tensor(doubled)
    torch.testing.assert_close(full, 2 * tt.tt_to_tensor(cores))
    res = tt.tt_round(doubled, eps=1e-6)
    assert max(res.ranks) <= 2
    torch.testing.assert_close(tt.tt_to_tensor(res.cores), full, rtol=1e-4, atol=1e-4)
    del g


@settings(max_examples=20, deadline=None)
@given(st.floats(0.05, 0.8), st.integers(0, 1000))
def test_tt_round_error_bound(eps, seed):
    cores = [c.double() for c in random_tt([3, 4, 5, 4], 6, seed=seed)]
    res = tt.tt_round(cores, eps=eps)
    full = tt.tt_to_tensor(cores)
    actual = float((tt.tt_to_tensor(res.cores) - full).norm() / full.norm())
    assert actual <= eps + 1e-9
    assert actual == pytest.approx(float(res.rel_error), rel=1e-5, abs=1e-9)


# --------------------------------------------------------------------------- modes

def test_paper_table_is_reproduced():
    assert tt.matrix_modes(4096, 8) == [16, 16, 8, 4, 4]
    assert tt.matrix_modes(8, 4096) == [16, 16, 8, 4, 4]
    assert tt.matrix_modes(1024, 8) == [4, 8, 8, 8, 4]
    assert tt.matrix_modes(768, 64) == [8, 8, 12, 8, 8]
    assert tt.matrix_modes(768, 768) == [8, 8, 12, 12, 8, 8]
    used = 0
    for b, row in tt.PAPER_SHAPES.items():
        for w, modes in row.items():
            got = tt.matrix_modes(w, b)
            assert math.prod(got) == w * b  # the invariant holds even where the table is wrong
            if math.prod(modes) == w * b:
                assert got == list(modes)
                used += 1
    assert used == 45  # 53 entries, 8 of them typos in the reference table (product wrong)


@pytest.mark.parametrize("n", [384, 2048, 3072, 5632, 11008, 13824, 14336, 50257, 97, 1, 2, 65536])
def test_factorize_any_width(n):
    modes = tt.factorize(n)
    assert math.prod(modes) == n
    if n > 1:
        assert all(m > 1 for m in modes)
    for other in (8, 16, n):
        mm = tt.matrix_modes(n, other)
        assert math.prod(mm) == n * other


def test_factorize_balances_modes():
    assert tt.factorize(4096, 4) == [8, 8, 8, 8]
    assert sorted(tt.factorize(384, 3)) == [6, 8, 8]
    assert tt.factorize(13) == [13]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**7), st.one_of(st.none(), st.integers(1, 8)))
def test_factorize_product_invariant(n, n_modes):
    modes = tt.factorize(n, n_modes)
    assert math.prod(modes) == n
    if n_modes is not None:
        assert len(modes) <= n_modes


def test_factorize_rejects_non_positive():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="n must be an integer >= 1"):
            tt.factorize(bad)


def test_param_count():
    # paper: LLaMA-2-7B q_proj A factor (4096 x 8), modes [16,16,8,4,4], R=5
    modes = tt.matrix_modes(4096, 8)
    assert tt.tt_num_params(modes, 5) == 16 * 5 + 5 * 16 * 5 + 5 * 8 * 5 + 5 * 4 * 5 + 5 * 4
    cores = random_tt(modes, 5)
    assert tt.tt_num_params(modes, 5) == sum(c.numel() for c in cores)


def test_random_cores_follow_paper_scale():
    g = torch.Generator().manual_seed(0)
    cores = tt.random_cores([16, 16, 8, 4, 4], 5, 4096, 8, generator=g)
    m = tt.reconstruct(cores, 4096, 8)
    sigma = math.sqrt(1 / (4096 + 8))
    assert 0.3 * sigma < float(m.std()) < 3 * sigma
