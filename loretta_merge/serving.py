"""Serve many adapters at once from one ONNX graph: each batch row runs its own adapter.

An export made with ``loretta-merge export onnx BASE -o OUT --adapter-bank SIZE`` holds
``bank.json`` (the bank's layout) and a graph with an ``adapter_slot`` input (int64, one per
row; -1 = the base) and one input per bank tensor, each ``(SIZE, ...)``. :class:`AdapterBank`
keeps those bank arrays in memory (kilobytes per slot for rep adapters) and passes them with
every run, so loading an adapter into a slot, or evicting it, is a write into the arrays:
no re-export, no new session.

    bank = AdapterBank.open("served")                 # providers=None: CUDA when available
    bank.load("./rep-sentiment", name="sentiment")    # -> its slot
    logits = bank.run({"input_ids": ids, "attention_mask": mask},
                      ["sentiment", None, "topic", "sentiment"])   # one entry per row
    tokens = bank.generate(ids, ["chat", "sql"], max_new_tokens=16)  # causal-lm --with-past
    bank.evict("topic")

Rows name their adapter (a loaded name), a slot index, or ``None`` / -1 for the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, FormatError, ShapeError
from .converters.onnx.bank import (NO_ADAPTER, SLOT_INPUT, check_bankable, dense_as_tensors,
                                   read_bank_file, slot_values)
from .converters.onnx.reports import ONNX_NAME

__all__ = ["AdapterBank"]

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class AdapterBank:
    """An ONNX Runtime session on a bank export, and the bank arrays it is fed."""

    def __init__(self, folder: Path, session, meta: dict, layout, arrays: dict[str, np.ndarray]):
        self.folder, self.session, self.meta, self.layout = folder, session, meta, layout
        self.arrays = arrays                    # graph input name -> (size, ...) array
        self.slots: list[str | None] = list(layout.slots)
        self.task: str = meta["task"]
        self.with_past: bool = bool(meta["with_past"])
        self.input_names: list[str] = list(meta["inputs"])

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, folder, *, providers: Sequence[str] | None = None, session_options=None,
             slots: int | None = None) -> "AdapterBank":
        """Open an ``--adapter-bank`` export. ``providers``: ONNX Runtime execution providers
        (default: CUDA first when this onnxruntime offers it, then CPU). ``slots``: serve a
        bank of this many slots instead of the exported size (the graph's slot axis is
        dynamic); the slots filled at export are kept."""
        import onnxruntime as ort

        folder = Path(folder)
        meta, layout = read_bank_file(folder)
        if providers is None:
            cuda = "CUDAExecutionProvider"
            providers = ([cuda] if cuda in ort.get_available_providers() else []) + [
                "CPUExecutionProvider"]
        if session_options is None:
            session_options = ort.SessionOptions()
            # ORT warns once per bank input that an overridable initializer is not folded:
            # that is the point of a bank, not news
            session_options.log_severity_level = 3
        session = ort.InferenceSession(str(folder / ONNX_NAME), sess_options=session_options,
                                       providers=list(providers))
        arrays = _read_defaults(folder / ONNX_NAME, layout.input_names())
        over = {i.name for i in session.get_overridable_initializers()}
        missing = [n for n in layout.input_names() if n not in over]
        if missing:
            raise FormatError(f"{folder / ONNX_NAME} lacks the bank input {missing[0]} that "
                              f"{folder / 'bank.json'} names; the two files are from different "
                              f"exports: export the bank again")
        bank = cls(folder, session, meta, layout, arrays)
        if slots is not None:
            bank.resize(slots)
        return bank

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def bank_bytes(self) -> int:
        """Bytes of every bank array (what each run passes besides the batch)."""
        return sum(a.nbytes for a in self.arrays.values())

    # ------------------------------------------------------------------ slots
    def load(self, adapter_dir, *, name: str | None = None, slot: int | None = None) -> int:
        """Read an adapter (rep or PEFT LoRA) into ``slot`` (default: the first free one)
        under ``name`` (default: the folder's name); returns the slot."""
        from .formats import read_adapter

        name = name or Path(adapter_dir).name
        if name in self.slots:
            raise ConfigError(f"an adapter named {name!r} is already in slot "
                              f"{self.slots.index(name)}; evict it first (bank.evict({name!r})) "
                              f"or load this one under another name")
        if slot is None:
            if None not in self.slots:
                raise ConfigError(f"the bank is full: all {self.size} slots hold adapters "
                                  f"({', '.join(s for s in self.slots if s)}); evict one first "
                                  f"(bank.evict(NAME)) or export a larger --adapter-bank")
            slot = self.slots.index(None)
        slot = self._check_slot_number(slot)
        if self.slots[slot] is not None:
            raise ConfigError(f"slot {slot} holds adapter {self.slots[slot]!r}; evict it first "
                              f"(bank.evict({slot})) or leave slot= out to take a free slot")
        adapter = read_adapter(adapter_dir)
        adapter.path = Path(adapter_dir)
        check_bankable(name, adapter)
        adapter = dense_as_tensors(adapter)
        values = slot_values(name, adapter, self.layout)  # every shape checked before writing
        self._clear(slot)
        for key, value in values.items():
            self.arrays[key][slot] = value
        self.slots[slot] = name
        return slot

    def evict(self, which: str | int) -> int:
        """Empty the slot of adapter ``which`` (a name or a slot index); returns the slot."""
        slot = self.slot_of(which)
        self._clear(slot)
        self.slots[slot] = None
        return slot

    def slot_of(self, which: str | int) -> int:
        if isinstance(which, str):
            if which not in self.slots:
                raise ConfigError(f"no adapter named {which!r} is loaded (loaded: "
                                  f"{', '.join(s for s in self.slots if s) or 'none'}); load it "
                                  f"with bank.load(DIR, name={which!r})")
            return self.slots.index(which)
        slot = self._check_slot_number(which)
        if self.slots[slot] is None:
            raise ConfigError(f"slot {slot} holds no adapter; pass a loaded slot or name")
        return slot

    def resize(self, slots: int) -> None:
        """Serve a bank of ``slots`` slots (the graph's slot axis is dynamic): new slots are
        empty; a slot that holds an adapter cannot be dropped (evict it first)."""
        from .converters.onnx.bank import MAX_BANK_SIZE

        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= MAX_BANK_SIZE:
            raise ConfigError(f"slots={slots!r} must be a whole number from 1 to {MAX_BANK_SIZE}; "
                              f"pass e.g. slots=8")
        held = [i for i, name in enumerate(self.slots) if name is not None and i >= slots]
        if held:
            raise ConfigError(f"slots={slots} would drop slot {held[0]}, which holds adapter "
                              f"{self.slots[held[0]]!r}; evict it first, or give at least "
                              f"{held[-1] + 1} slots")
        for key, arr in self.arrays.items():
            grown = np.zeros((slots, *arr.shape[1:]), dtype=arr.dtype)
            keep = min(slots, arr.shape[0])
            grown[:keep] = arr[:keep]
            self.arrays[key] = grown
        self.slots = (self.slots + [None] * slots)[:slots]
        self.layout.size = slots

    def _check_slot_number(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) \
                or not 0 <= int(slot) < self.size:
            raise ConfigError(f"slot {slot!r} is out of range: this bank has {self.size} slots, "
                              f"0 to {self.size - 1}; pass one of them, or resize() the bank")
        return int(slot)

    def _clear(self, slot: int) -> None:
        for arr in self.arrays.values():
            arr[slot] = 0

    # ------------------------------------------------------------------ running
    def rows(self, slots, batch: int) -> np.ndarray:
        """The ``adapter_slot`` input for a batch: one entry per row, a loaded adapter's name,
        its slot index, or None / -1 for the base. Every entry is checked here, so a bad one
        is a clear error and never reaches the runtime."""
        if isinstance(slots, np.ndarray):
            if slots.dtype.kind not in "iu":
                raise ConfigError(f"adapter slots must be integers (int64) or names, got an "
                                  f"array of {slots.dtype}; pass np.asarray(slots, np.int64)")
            entries = slots.tolist() if slots.ndim == 1 else None
        else:
            entries = list(slots) if not isinstance(slots, (str, bytes)) else None
        if entries is None or len(entries) != batch:
            got = getattr(slots, "shape", None) or (len(entries) if entries is not None else slots)
            raise ShapeError(f"adapter slots must give one entry per row: {batch} rows, got "
                             f"{got!r}; pass a list such as ['a', None, 'b'] of length {batch}")
        out = np.empty(batch, dtype=np.int64)
        for i, entry in enumerate(entries):
            out[i] = self._row_slot(i, entry)
        return out

    def _row_slot(self, row: int, entry) -> int:
        if entry is None:
            return NO_ADAPTER
        if isinstance(entry, str):
            if entry not in self.slots:
                raise ConfigError(f"row {row}: no adapter named {entry!r} is loaded (loaded: "
                                  f"{', '.join(s for s in self.slots if s) or 'none'}); load it first, or pass a loaded name")
            return self.slots.index(entry)
        if isinstance(entry, bool) or not isinstance(entry, (int, np.integer)):
            raise ConfigError(f"row {row}: adapter slot {entry!r} is a {type(entry).__name__}; "
                              f"give an integer slot, a loaded adapter's name, or None for the base")
        if entry == NO_ADAPTER:
            return NO_ADAPTER
        if not 0 <= entry < self.size:
            raise ConfigError(f"row {row}: adapter slot {entry} is out of range: this bank has "
                              f"{self.size} slots, 0 to {self.size - 1}; pass one of them, or -1 (None) for the base")
        if self.slots[entry] is None:
            raise ConfigError(f"row {row}: slot {entry} holds no adapter; load one into it, or "
                              f"pass -1 / None for the base")
        return int(entry)

    def _feed(self, inputs: dict, slots) -> dict:
        ids = np.asarray(inputs["input_ids"])
        if ids.ndim != 2:
            raise ShapeError(f"input_ids must be (batch, sequence), got shape {ids.shape}; pass a 2-D "
                             f"array, e.g. ids[None, :] for one sequence")
        batch = ids.shape[0]
        feed = {"input_ids": ids.astype(np.int64, copy=False)}
        mask = inputs.get("attention_mask")
        feed["attention_mask"] = (np.ones_like(feed["input_ids"]) if mask is None
                                  else np.asarray(mask).astype(np.int64, copy=False))
        if "token_type_ids" in self.input_names:
            types = inputs.get("token_type_ids")
            feed["token_type_ids"] = (np.zeros_like(feed["input_ids"]) if types is None
                                      else np.asarray(types).astype(np.int64, copy=False))
        feed[SLOT_INPUT] = self.rows(slots, batch)
        feed.update(self.arrays)
        return feed

    def run(self, inputs: dict, slots) -> np.ndarray:
        """One forward pass of a mixed batch: the graph's first output (seq-cls and causal-lm:
        logits; feature-extraction: last hidden state). ``slots``: one entry per row."""
        feed = self._feed(inputs, slots)
        if self.with_past:
            feed.update(self._empty_past(feed["input_ids"].shape[0]))
        return self.session.run(None, feed)[0]

    def generate(self, input_ids, slots, max_new_tokens: int, *, attention_mask=None,
                 return_logits: bool = False):
        """Greedy decoding through the KV cache (a ``--with-past`` causal-lm bank), each row
        with its own adapter. Left-pad the prompts (``attention_mask`` 0 on the padding).
        Returns the new tokens ``(batch, max_new_tokens)``; with ``return_logits`` also the
        last-position logits of each step ``(max_new_tokens, batch, vocab)``."""
        if not self.with_past:
            raise ConfigError(f"generate needs a causal-lm bank exported with --with-past; "
                              f"{self.folder} is {self.task} without a KV cache; use run()")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}; "
                              f"pass e.g. max_new_tokens=16")
        feed = self._feed({"input_ids": input_ids, "attention_mask": attention_mask}, slots)
        batch = feed["input_ids"].shape[0]
        feed.update(self._empty_past(batch))
        past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        tokens, logits = [], []
        for _ in range(max_new_tokens):
            outs = self.session.run(None, feed)
            last = np.asarray(outs[0])[:, -1]
            nxt = last.argmax(-1).astype(np.int64)
            tokens.append(nxt)
            logits.append(last)
            feed.update(zip(past_names, outs[1:]))
            feed["input_ids"] = nxt[:, None]
            feed["attention_mask"] = np.concatenate(
                [feed["attention_mask"], np.ones((batch, 1), np.int64)], axis=1)
        out = np.stack(tokens, axis=1)
        return (out, np.stack(logits)) if return_logits else out

    def _empty_past(self, batch: int) -> dict:
        past = {}
        for i in self.session.get_inputs():
            if i.name.startswith("past_key_values."):
                _, kv, _, hd = i.shape
                past[i.name] = np.zeros((batch, kv, 0, hd), dtype=_NP.get(i.type, np.float32))
        return past


def _read_defaults(onnx_path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The bank arrays the graph holds as defaults (the slots filled at export), writable."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path), load_external_data=False)
    wanted = set(names)
    found = {}
    for init in proto.graph.initializer:
        if init.name in wanted:
            found[init.name] = np.array(numpy_helper.to_array(init, str(onnx_path.parent)))
    missing = [n for n in names if n not in found]
    if missing:
        raise FormatError(f"{onnx_path} has no default value for the bank input {missing[0]}; "
                          f"it is not the graph its bank.json describes: export the bank again")
    return {n: found[n] for n in names}
