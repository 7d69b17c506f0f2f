"""The chunked runner of the merge methods (loretta_merge.methods.stream / .pruning).

A method with a recipe is run over a tensor in chunks of rows: its prunings first ask for
passes over the chunks (histograms for a magnitude cut, L1 norms for a rescale, the one
gather a cut through equal magnitudes needs), then each chunk is pruned and combined. These
tests check that the chunking changes nothing: one chunk and one row per chunk give the same
bits; a cut through equal magnitudes keeps the entries mergekit's own sort keeps; the random
methods draw, input after input, what one generator drawing whole tensors in turn draws;
and a merge written with tiny chunks is byte for byte the default one.
"""

from __future__ import annotations

import pytest
import torch

from loretta_merge.methods import get_method, method_names, pruning, stream
from loretta_merge.methods.stream import prune_whole

SHAPE = (23, 41)
STREAMED = [m for m in method_names() if get_method(m).recipe is not None]
PARAMS = {"ties": {"density": 0.4}, "magnitude_prune": {"density": 0.3},
          "breadcrumbs": {"density": 0.5, "gamma": 0.05},
          "breadcrumbs_ties": {"density": 0.5, "gamma": 0.05},
          "dare_linear": {"density": 0.4}, "dare_ties": {"density": 0.4},
          "della": {"density": 0.5, "epsilon": 0.2}, "della_linear": {"density": 0.5, "epsilon": 0.2},
          "task_arithmetic": {"lambda": 0.8}, "linear": {}}


def tied_deltas(n=3, shape=SHAPE, seed=0) -> list[torch.Tensor]:
    """Deltas with many equal magnitudes (rounded to a coarse grid, as deltas of bf16
    weights are), so magnitude cuts fall through runs of ties; the last is all zeros (an
    input that does not touch the tensor)."""
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(shape, generator=g) * 8).round() / 8 for _ in range(n - 1)]
    return out + [torch.zeros(shape)]


def run(method: str, deltas, *, chunk: int, rescale: bool | None = None, seed=5):
    m = get_method(method)
    params = dict(PARAMS[method])
    if rescale is not None and "rescale" in m.defaults:
        params["rescale"] = rescale
    resolved = m.resolve(params, n_inputs=len(deltas))
    generator = torch.Generator().manual_seed(seed) if m.random else None
    old = stream.CHUNK_ENTRIES
    stream.CHUNK_ENTRIES = chunk
    try:
        return m.combine(deltas, [1.0, 0.7, 0.5][:len(deltas)], resolved, generator)
    finally:
        stream.CHUNK_ENTRIES = old


def test_every_method_but_peft_forms_is_streamed():
    assert set(PARAMS) == set(STREAMED)  # a new recipe method gets a case here
    assert all(get_method(m).recipe is None for m in method_names() if m.endswith("_svd"))


@pytest.mark.parametrize("method", STREAMED)
def test_one_row_per_chunk_gives_the_bits_of_one_chunk(method):
    """Without a rescale, everything after the passes is elementwise: the same bits."""
    deltas = tied_deltas()
    whole = run(method, deltas, chunk=1 << 20, rescale=False)
    rows = run(method, deltas, chunk=SHAPE[1], rescale=False)  # one row per chunk
    assert torch.equal(whole, rows)
    assert bool(whole.any())


@pytest.mark.parametrize("method", ["dare_ties", "della", "ties", "breadcrumbs"])
def test_rescale_is_the_same_in_chunks_to_rounding(method):
    """The L1 norms are summed in float64 chunk by chunk: other chunks, other order of
    the additions, so the factor may move by an fp32 rounding, and the kept entries not."""
    deltas = tied_deltas()
    whole = run(method, deltas, chunk=1 << 20, rescale=True)
    rows = run(method, deltas, chunk=SHAPE[1] * 2, rescale=True)
    assert torch.equal(whole != 0, rows != 0)
    torch.testing.assert_close(rows, whole, rtol=1e-6, atol=0)


@pytest.mark.parametrize("density", [0.3, 0.5, 0.71])
def test_a_cut_through_equal_magnitudes_keeps_what_mergekits_sort_keeps(density):
    """TIES' trim keeps ``argsort(|Δ|, descending=True)[:k]`` (mergekit's magnitude);
    breadcrumbs ``sort(|Δ|).indices[start:stop]``: with runs of equal magnitudes across the
    cuts, chunk by chunk, the same entries."""
    delta = tied_deltas(2, shape=(64, 50), seed=3)[0]
    n, old = delta.numel(), stream.CHUNK_ENTRIES
    magnitude = delta.abs().reshape(-1)
    stream.CHUNK_ENTRIES = 150  # three rows a chunk
    try:
        trim = pruning.largest(n, density)
        got = prune_whole(trim, delta)
        assert trim._special is not None  # the cut did fall through a run of ties
        keep = max(1, int(density * n))
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.argsort(magnitude, descending=True)[:keep]] = True
        assert torch.equal(got, delta * want.view_as(delta))

        crumbs = pruning.largest_below_outliers(n, density, 0.1)
        got = prune_whole(crumbs, delta)
        keep, outliers = int(density * n), int(0.1 * n)
        start = n - keep - outliers
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.sort(magnitude).indices[start:start + keep]] = True
        assert torch.equal(got, delta * want.view_as(delta))
    finally:
        stream.CHUNK_ENTRIES = old


def test_a_cut_between_distinct_magnitudes_needs_no_sort():
    delta = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    trim = pruning.largest(delta.numel(), 0.5)
    got = prune_whole(trim, delta)
    assert trim._special is None
    assert int((got != 0).sum()) == delta.numel() // 2
    assert float(got.abs()[got != 0].min()) >= float(delta.abs()[got == 0].max())


def test_random_inputs_draw_as_one_generator_over_whole_tensors_in_turn():
    """dare_linear without rescale, three inputs pruned chunk by chunk side by side: input
    i's mask is the one a single generator draws for it after drawing the whole tensors of
    the inputs before it (PEFT's and mergekit's order)."""
    deltas = tied_deltas()
    got = run("dare_linear", deltas, chunk=SHAPE[1] * 3, rescale=False, seed=9)
    g = torch.Generator().manual_seed(9)
    want = None
    for d, w in zip(deltas, [1.0, 0.7, 0.5]):
        kept = torch.bernoulli(torch.full_like(d, 0.4), generator=g)
        term = (d * kept).mul_(w)
        want = term if want is None else want.add_(term)
    assert torch.equal(got, want)


def test_packed_masks_round_trip():
    kept = torch.rand(7, 13, generator=torch.Generator().manual_seed(1)) < 0.5
    packed = pruning.pack_mask(kept.float())
    assert packed.dtype == torch.uint8 and packed.numel() == (kept.numel() + 7) // 8
    assert torch.equal(pruning.unpack_mask(packed, kept), kept)


def test_chunks_are_fixed_by_the_shape():
    assert stream.chunk_rows((10,)) == [(None, 0)]
    assert stream.chunk_rows((0, 5)) == [(None, 0)]
    chunks = stream.chunk_rows((5000, 100))
    assert chunks[0] == (slice(0, stream.CHUNK_ENTRIES // 100), 0)
    assert chunks[-1][0].stop == 5000 and chunks[1][1] == chunks[0][0].stop * 100


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_rescaled_methods_give_the_same_bits_on_any_thread_count(method):
    """The L1 norms of a rescale are summed in an order the thread count does not change
    (a merge's bytes must not depend on the machine's cores)."""
    deltas = [torch.randn(700, 600, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(method, deltas, chunk=1 << 18, rescale=True)
        torch.set_num_threads(2)
        two = run(method, deltas, chunk=1 << 18, rescale=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("density", [0.3, 0.5, 0.71])
def test_tie_break_first_keeps_ties_in_memory_order_without_a_sort(density):
    """``--tie-break first``: equal magnitudes at a cut rank as a stable descending sort
    ranks them (the first in memory order counts as larger), counted chunk by chunk; no
    magnitude is gathered."""
    delta = tied_deltas(2, shape=(64, 50), seed=3)[0]
    n, old = delta.numel(), stream.CHUNK_ENTRIES
    order = torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices
    stream.CHUNK_ENTRIES = 150
    try:
        trim = pruning.largest(n, density, ties_as="first")
        got = prune_whole(trim, delta)
        assert any(c.straddles for c in trim.cuts) and trim._special is None
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:max(1, int(density * n))]] = True
        assert torch.equal(got, delta * want.view_as(delta))

        crumbs = pruning.largest_below_outliers(n, density, 0.1, ties_as="first")
        got = prune_whole(crumbs, delta)
        keep, outliers = int(density * n), int(0.1 * n)
        want = torch.zeros(n, dtype=torch.bool)
        want[order[outliers:outliers + keep]] = True
        assert torch.equal(got, delta * want.view_as(delta))
    finally:
        stream.CHUNK_ENTRIES = old


def test_tie_break_is_a_parameter_of_the_magnitude_methods_only():
    from loretta_merge.errors import ConfigError

    for method in ("ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties"):
        assert get_method(method).resolve({"tie_break": "first"}, n_inputs=2)["tie_break"] == "first"
    with pytest.raises(ConfigError, match="--tie-break does not apply to --method dare_ties"):
        get_method("dare_ties").resolve({"tie_break": "first"}, n_inputs=2)
    with pytest.raises(ConfigError, match="--tie-break 'stable' is not one of mergekit, first"):
        get_method("ties").resolve({"tie_break": "stable"}, n_inputs=2)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "magnitude_prune"])
def test_deltas_that_require_grad_combine_as_plain_ones(method):
    """The CPU paths that go through numpy take tensors autograd tracks (a user's
    parameters handed to the Python API) and give the same bits."""
    deltas = tied_deltas()
    plain = run(method, deltas, chunk=SHAPE[1] * 4)
    tracked = run(method, [d.clone().requires_grad_(True) for d in deltas], chunk=SHAPE[1] * 4)
    assert torch.equal(plain, tracked.detach())
