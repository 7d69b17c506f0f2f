"""Fully fine-tuned checkpoints as merge inputs: the task vector ``W_i - W0``, read beside the base.

A fine-tune of the base (a transformers model directory with safetensors shards and the
base's tensor names) is one more input of a merge. Per base tensor its delta is
``W_i - W0``, taken in fp32 from the two stored tensors; every method (``linear`` included)
combines it as it combines an adapter's. Nothing is loaded whole: the plan checks names,
shapes and dtypes from the shard headers alone, and the run reads the fine-tune's tensor
beside the base's in the reader thread (:class:`FullReads`), into the same reused buffers.

The rules (docs/merge-methods.md, "Fully fine-tuned checkpoints"), each refused by name
before any weight is read:

- every floating-point tensor of the base must be in the fine-tune, with the base's shape
  (another vocabulary: both embedding shapes and the resize that fixes it);
- a tensor only the fine-tune has (a task head, a new module) is refused: it has no base
  value, so it has no task vector;
- tied embeddings: a fine-tune that ties them as the base does changes the one stored
  embedding, and the output stays tied; one that stores its own output embedding (untied)
  changes it against the base's tied one, and the output is written untied;
- integer tensors (buffers) are the base's;
- dtypes: any floating dtype; the difference is taken in fp32, the output has the base's
  dtype (or ``--dtype``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, ShapeError
from ..formats import Adapter
from ..io import CheckpointReader, read_model_config
from .buffers import BaseReads, BufferPool
from .plan import Op, OpKind, OutputTensor, tied_pairs

KIND = "checkpoint"  # an input's ``source`` in reports and provenance
_SHOWN = 5  # names listed in one error line


@dataclass(eq=False)
class FullCheckpoint:
    """A fine-tuned model directory, open for tensor-by-tensor reads."""

    path: Path
    reader: CheckpointReader
    config: dict
    tied: dict[str, str] = field(default_factory=dict)  # its output -> input embedding

    def adapter(self) -> Adapter:
        """The stand-in :class:`Adapter` a merge input carries (no modules: the deltas are
        read at run time)."""
        return Adapter(method="full", source=KIND, modules={}, config={}, path=self.path)


@dataclass(frozen=True, eq=False)
class FullTensor:
    """The value of a FULL op: which fine-tune tensor to read beside a base tensor."""

    checkpoint: FullCheckpoint
    key: str
    ties: bool = False  # this is an input embedding the fine-tune ties its output one to


def open_checkpoint(path: str | os.PathLike) -> FullCheckpoint:
    """Open a fine-tuned model directory: its config and every shard's header."""
    path = Path(path)
    config = read_model_config(path, required=True)
    return FullCheckpoint(path, CheckpointReader(path), config, tied_pairs(config))


def _check_architecture(ft: FullCheckpoint, label: str, base_config: dict, base_dir) -> None:
    ours, theirs = base_config.get("model_type"), ft.config.get("model_type")
    if ours and theirs and ours != theirs:
        raise ConfigError(f"fine-tuned checkpoint {label} is a {theirs} model, the base "
                          f"{base_dir} a {ours} model; a task vector is the change of one "
                          f"model's weights: pass the base it was fine-tuned from (nothing "
                          f"was written)")


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _is_vocabulary(key: str, want: tuple, got: tuple, vocab) -> bool:
    """An embedding (or output projection) whose row count is the vocabulary."""
    return (len(want) == 2 and len(got) == 2 and want[1] == got[1] and want[0] != got[0]
            and (want[0] == vocab or "embed" in key or "lm_head" in key or key.endswith("wte.weight")))


def _refuse_shapes(ft: FullCheckpoint, label: str, bad: list[tuple], base_dir, vocab) -> None:
    """bad: (base key, fine-tune key, base shape, fine-tune shape)."""
    if not bad:
        return
    def where(key: str) -> Path:  # the fine-tune's shard that holds ``key``
        return ft.reader.model_dir / ft.reader.shard_of(key)

    vocab_bad = [b for b in bad if _is_vocabulary(b[0], b[2], b[3], vocab)]
    if vocab_bad:
        shown = "; ".join(f"{k} is {tuple(g)} in {where(s)}, {tuple(w)} in the base"
                          for k, s, w, g in vocab_bad[:_SHOWN])
        theirs = vocab_bad[0][3][0]
        raise ShapeError(f"fine-tuned checkpoint {label} has another vocabulary than the base "
                         f"{base_dir} ({theirs} tokens, the base {vocab_bad[0][2][0]}): {shown}; "
                         f"merge into the base resized to its vocabulary "
                         f"(model.resize_token_embeddings({theirs}), then save_pretrained), or "
                         f"pass the base it was fine-tuned from (nothing was written)")
    shown = "; ".join(f"{k} is {tuple(g)} in {where(s)}, {tuple(w)} in the base"
                      for k, s, w, g in bad[:_SHOWN])
    more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    raise ShapeError(f"fine-tuned checkpoint {label} does not fit the base {base_dir}: "
                     f"{shown}{more}; is BASE the model it was fine-tuned from? Pass that base "
                     f"(nothing was written)")


def full_ops(item, index: int, virtual: dict[str, str], base, base_config: dict) -> dict[str, Op]:
    """One FULL op per floating base tensor (``virtual``: the base's tied output embeddings
    it does not store -> the input embedding they are read from). Raises one error line
    naming what does not fit: shapes, then tensors the fine-tune lacks, then tensors only
    it has."""
    ft: FullCheckpoint = item.full
    label, base_dir = item.label, base.model_dir
    _check_architecture(ft, label, base_config, base_dir)
    keys = set(ft.reader.keys())
    # input embeddings whose tied output embedding both models leave unstored
    tied_both = {s for t, s in virtual.items() if t not in keys and ft.tied.get(t) == s}
    ops: dict[str, Op] = {}
    used, missing, bad = set(), [], []
    for key in [*base.keys(), *sorted(virtual)]:
        stored = virtual.get(key, key)
        if key in virtual and key not in keys and key in ft.tied:
            used.add(ft.tied[key])  # both tie it: the input embedding's op changes it
            continue
        src = key if key in keys else ft.tied.get(key)  # its output embedding may be tied
        if src is None or src not in keys:
            if base.dtype(stored).is_floating_point:
                missing.append(key)
            continue
        used.add(src)
        if not base.dtype(stored).is_floating_point:
            continue  # an integer buffer: the base's
        want, got = tuple(base.shape(stored)), tuple(ft.reader.shape(src))
        if want != got:
            bad.append((key, src, want, got))
            continue
        ops[key] = Op(OpKind.FULL, item.weight, f"{label}:{src}",
                      value=FullTensor(ft, src, ties=key in tied_both),
                      adapter_weight=item.weight, input=index)
    _refuse_shapes(ft, label, bad, base_dir, base_config.get("vocab_size"))
    if missing:
        raise ShapeError(f"fine-tuned checkpoint {label} lacks {len(missing)} tensor(s) of the "
                         f"base {base_dir}: {_names(missing)}; a task vector needs every weight "
                         f"of the base: pass the base it was fine-tuned from, or re-save the "
                         f"fine-tune from the base's model class (nothing was written)")
    extra = sorted(keys - used)
    if extra:
        raise ShapeError(f"fine-tuned checkpoint {label} has {len(extra)} tensor(s) the base "
                         f"{base_dir} lacks: {_names(extra)} (in "
                         f"{ft.reader.model_dir / ft.reader.shard_of(extra[0])}); they have no "
                         f"base value, so no task vector: merge into a base saved from the same "
                         f"model class, or remove them from the fine-tune (nothing was written)")
    return ops


def stays_tied(out_ops: list[Op] | None, in_ops: list[Op] | None) -> bool:
    """A tied output embedding the base does not store stays tied when nothing changes it
    but tied fine-tunes' changes of the input embedding (so both change alike)."""
    return (not out_ops and bool(in_ops)
            and all(op.kind is OpKind.FULL and op.value.ties for op in in_ops))


class FullReads:
    """Reads, for the outputs of one base tensor, the fine-tunes' tensors their FULL ops
    need: one positioned read each into a pool buffer, one file open per fine-tune."""

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self._reads: dict[int, BaseReads] = {}

    def read(self, outs: list[OutputTensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """{id(op): (the fine-tune's tensor, its pool buffer)} for every FULL op of ``outs``."""
        got = {}
        for out in outs:
            for op in out.ops:
                if op.kind is OpKind.FULL:
                    ft = op.value.checkpoint
                    reads = self._reads.get(id(ft))
                    if reads is None:
                        reads = self._reads[id(ft)] = BaseReads(ft.reader, self.pool)
                    got[id(op)] = reads.read(op.value.key)
        return got

    def close(self) -> None:
        for reads in self._reads.values():
            reads.close()
        self._reads.clear()
