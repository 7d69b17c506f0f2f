"""A task-vector method run over one tensor in chunks of rows.

A method is described by a :class:`Recipe`: how each input's delta is pruned
(:mod:`.pruning`) and how the pruned deltas combine (:func:`.core.combine_task_vectors`:
weights, sign election, normalisation, lambda). :func:`stream` runs it over a tensor whose
deltas a ``source`` computes chunk by chunk (the merge's low-rank products, a fine-tune's
rows minus W0's): first the passes the prunings ask for (histograms for a magnitude cut,
L1 norms for a rescale), each computing the chunks again, then one pass that prunes and
combines each chunk. Memory is a few chunks, never a whole fp32 tensor per input (except
the one gather a cut through equal magnitudes needs, see :mod:`.pruning`).

Everything after the passes is elementwise, so the result does not depend on the chunking;
:func:`combine_whole` runs the same code over tensors already in memory (the ``combine``
command, tests), so a merge and a whole-tensor call give the same bits.

Random prunings draw from one generator per input, each placed where the inputs before it
end their draws (:func:`make_prunings`), so chunks of several inputs can be pruned side by
side and the draws are still those of every whole tensor drawn in turn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .core import OwnedDeltas, combine_task_vectors
from .pruning import Pruning

CHUNK_ENTRIES = 1 << 18  # about 1 MiB of fp32 per input and temporary: they stay in cache

Source = Callable[[slice | None, int], torch.Tensor]  # (rows or None for all, input) -> fp32


@dataclass(frozen=True)
class Recipe:
    """A method, resolved: ``prune(input, numel, generator)`` gives that input's pruning of a
    tensor of ``numel`` entries (None: no pruning); then the combination's settings."""

    prune: Callable[[int, int, "torch.Generator | None"], Pruning] | None = None
    majority_sign: str | None = None
    normalize: bool = False
    lam: float = 1.0


def _copy(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _skip(generator: torch.Generator, entries: int) -> None:
    """Advance ``generator`` past the draws of ``entries`` Bernoulli entries (one uniform
    float each, as ``torch.bernoulli`` draws them on the CPU; the tests against PEFT and
    mergekit check that it lands where their draws do)."""
    scratch = torch.empty(min(entries, CHUNK_ENTRIES), device=generator.device)
    while entries > 0:
        m = min(entries, scratch.numel())
        scratch[:m].uniform_(generator=generator)
        entries -= m


def make_prunings(recipe: Recipe, n_inputs: int, numel: int,
                  generator: torch.Generator | None) -> list[Pruning]:
    """Each input's pruning of a tensor of ``numel`` entries. A random pruning gets its own
    copy of ``generator``, advanced past the draws of the inputs before it: its draws are
    the ones it would make if every input drew its whole tensor in turn from ``generator``
    (as PEFT and mergekit do), though the merge prunes them chunk by chunk, side by side.
    ``generator`` itself is left as it is."""
    if recipe.prune is None:
        return [Pruning() for _ in range(n_inputs)]
    running = None if generator is None else _copy(generator)
    prunings = []
    for i in range(n_inputs):
        pruning = recipe.prune(i, numel, None if running is None else _copy(running))
        if pruning.draws and i + 1 < n_inputs:
            _skip(running, numel)
        prunings.append(pruning)
    return prunings


def chunk_rows(shape: Sequence[int]) -> list[tuple[slice | None, int]]:
    """(rows, offset of the chunk's first entry) for each chunk of a tensor: runs of rows
    of a 2-D tensor about :data:`CHUNK_ENTRIES` long; a tensor of any other rank is one
    chunk (``None``: all of it). Fixed by the shape alone."""
    if len(shape) != 2 or shape[0] == 0:
        return [(None, 0)]
    rows, cols = shape
    step = max(1, CHUNK_ENTRIES // max(1, cols))
    return [(slice(r, min(r + step, rows)), r * cols) for r in range(0, rows, step)]


def run_passes(prunings: Sequence[Pruning], chunks: list[tuple[slice | None, int]],
               source: Source) -> None:
    """Every pass the prunings ask for, each over all chunks (only the inputs that asked
    have their chunks computed), until all can prune."""
    while True:
        passes = {i: p for i, pruning in enumerate(prunings)
                  if (p := pruning.next_pass()) is not None}
        if not passes:
            return
        for rows, offset in chunks:
            for i, (observe, _) in passes.items():
                observe(source(rows, i), offset)
        for _, end in passes.values():
            end()


def stream(recipe: Recipe, weights: Sequence[float], shape: Sequence[int], source: Source,
           generator: torch.Generator | None = None
           ) -> Iterator[tuple[slice | None, torch.Tensor]]:
    """Yield ``(rows, combined delta of those rows)`` chunk by chunk. ``source(rows, i)``
    must return a new fp32 tensor (it is pruned in place): input ``i``'s delta at ``rows``."""
    n_inputs = len(weights)
    prunings = make_prunings(recipe, n_inputs, math.prod(shape), generator)
    chunks = chunk_rows(shape)
    run_passes(prunings, chunks, source)
    for rows, offset in chunks:
        deltas = OwnedDeltas(source(rows, i) for i in range(n_inputs))
        yield rows, combine_task_vectors(
            deltas, weights, prune=lambda d, i, o=offset: prunings[i].apply(d, o),
            majority_sign=recipe.majority_sign, normalize=recipe.normalize, lam=recipe.lam)


def _slicer(deltas: Sequence[torch.Tensor]) -> Source:
    def source(rows, i):
        d = deltas[i] if rows is None else deltas[i][rows]
        return d.to(torch.float32, copy=True)
    return source


def _assemble(shape: tuple[int, ...], device: torch.device,
              pieces: Iterator[tuple[slice | None, torch.Tensor]]) -> torch.Tensor:
    """One fp32 tensor of ``shape`` from its chunks (a chunk of rows None is all of it)."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    for rows, piece in pieces:
        if rows is None:
            return piece.reshape(shape)
        out[rows] = piece
    return out


def prune_whole(pruning: Pruning, delta: torch.Tensor) -> torch.Tensor:
    """One delta in memory pruned by ``pruning`` (its passes, then each chunk): a new
    fp32 tensor. A random pruning draws from its own generator as given."""
    chunks, source = chunk_rows(delta.shape), _slicer([delta])
    run_passes([pruning], chunks, source)
    return _assemble(tuple(delta.shape), delta.device,
                     ((rows, pruning.apply(source(rows, 0), offset)) for rows, offset in chunks))


def combine_whole(recipe: Recipe, deltas: Sequence[torch.Tensor], weights: Sequence[float],
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The combined delta of tensors already in memory (fp32, one shape): :func:`stream`
    over them. Deltas handed over in :class:`OwnedDeltas` are dropped when done; a plain
    list is never changed."""
    if not deltas:
        raise ValueError("a merge method needs at least one delta")
    shape = tuple(deltas[0].shape)
    out = _assemble(shape, deltas[0].device,
                    stream(recipe, weights, shape, _slicer(deltas), generator))
    if isinstance(deltas, OwnedDeltas):
        for i in range(len(deltas)):
            deltas[i] = None
    return out
