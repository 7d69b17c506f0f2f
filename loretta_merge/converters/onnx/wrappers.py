"""The torch modules the exporter traces: explicit tensors in, plain tensors out.

``PlainWrapper`` (one forward pass) and ``PastWrapper`` (one decoder step with a flat KV
cache) both take an optional tuple of *switch* tensors: parameters of the model that the
graph receives as inputs instead of constants (``torch.func.functional_call``), so that
ONNX Runtime can override them per request (switchable adapters).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def decoder_dims(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder's KV cache."""
    cfg = config.get_text_config(decoder=True)
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv, head_dim


def uses_token_types(model) -> bool:
    if getattr(model.config, "type_vocab_size", 0) <= 1:
        return False
    return "token_type_ids" in inspect.signature(model.forward).parameters


def cache_kwargs(model, cache) -> dict:
    """transformers 5.x names the cache argument ``cache``; older releases ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def past_names(layers: int) -> list[str]:
    names = []
    for i in range(layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def present_names(layers: int) -> list[str]:
    return [n.replace("past_key_values", "present") for n in past_names(layers)]


def _call(model, switch_names: tuple[str, ...], switch: tuple, slot_names: tuple[str, ...] = (),
          adapter_slot=None, **kwargs):
    if not switch_names and not slot_names:
        return model(**kwargs)
    values = dict(zip(switch_names, switch))
    values.update({n: adapter_slot for n in slot_names})  # every banked layer sees the rows' slots
    return torch.func.functional_call(model, values, (), kwargs, strict=False)


class _Wrapper(torch.nn.Module):
    """The model, and the names of its switchable tensors and of its banked layers."""

    def __init__(self, model, switch_names: tuple[str, ...] = (), slot_names: tuple[str, ...] = ()):
        super().__init__()
        self.model, self.switch_names, self.slot_names = model, tuple(switch_names), tuple(slot_names)


class PlainWrapper(_Wrapper):
    """Explicit tensors in, one plain tensor out: the signature the exporter sees."""

    def __init__(self, model, task: str, switch_names: tuple[str, ...] = (),
                 slot_names: tuple[str, ...] = ()):
        super().__init__(model, switch_names, slot_names)
        self.task = task

    def forward(self, input_ids, attention_mask, token_type_ids=None, adapter_slot=None,
                switch=()):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if self.task == "causal-lm":
            kw["use_cache"] = False
        out = _call(self.model, self.switch_names, switch, self.slot_names, adapter_slot,
                    input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kw)
        return out.logits if self.task != "feature-extraction" else out.last_hidden_state


class PastWrapper(_Wrapper):
    """Decoder step, KV cache as flat tensors: (ids, mask, past) -> (logits, *present)."""

    def __init__(self, model, layers: int, switch_names: tuple[str, ...] = (),
                 slot_names: tuple[str, ...] = ()):
        super().__init__(model, switch_names, slot_names)
        self.layers = layers

    def forward(self, input_ids, attention_mask, past, adapter_slot=None, switch=()):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1])
                                             for i in range(self.layers)],
                             config=self.model.config)
        seq = input_ids.shape[1]
        # positions count kept tokens only, so left padding works; (B, seq)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        out = _call(self.model, self.switch_names, switch, self.slot_names, adapter_slot,
                    input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=True,
                    return_dict=True, **cache_kwargs(self.model, cache))
        present = []
        for layer in cache_of(out).layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def dynamic_spec(names: list[str], with_past: bool, layers: int, n_switch: int = 0,
                 bank: bool = False) -> dict:
    """Dynamic axes for both exporters: batch and sequence (and past/total sequence)."""
    B, S = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    shapes: dict[str, Any] = {n: {0: B, 1: S} for n in names}
    if with_past:
        P, T = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
        shapes = {"input_ids": {0: B, 1: S}, "attention_mask": {0: B, 1: T},
                  "past": tuple({0: B, 2: P} for _ in range(2 * layers))}
        axes["attention_mask"] = {0: "batch", 1: "total_sequence"}
        for n in past_names(layers):
            axes[n] = {0: "batch", 2: "past_sequence"}
            axes[n.replace("past_key_values", "present")] = {0: "batch", 2: "total_sequence"}
    if n_switch:
        if not with_past and "token_type_ids" not in shapes:
            shapes["token_type_ids"] = None
        shapes["adapter_slot"] = {0: B} if bank else None
        # static adapter tensors; a bank's have a dynamic slot axis (any bank size at run time)
        slots = torch.export.Dim("slots")
        shapes["switch"] = [{0: slots} if bank else None for _ in range(n_switch)]
    if bank:
        axes["adapter_slot"] = {0: "batch"}
    return {"shapes": shapes, "axes": axes}


def build_wrapper(model, task: str, names: list[str], *, with_past: bool, layers: int,
                  example: dict, switch: tuple[tuple[str, torch.Tensor], ...] = (),
                  slot_names: tuple[str, ...] = ()):
    """(wrapper, example args, input names, output names) for one export. ``slot_names``
    (an adapter bank): the layers' slot buffers, fed by one ``adapter_slot`` input."""
    switch_names = tuple(n for n, _ in switch)
    switch_values = [t for _, t in switch]
    if with_past:
        wrapper = PastWrapper(model, layers, switch_names, slot_names).eval()
        _, kv, hd = decoder_dims(model.config)
        dtype = next(model.parameters()).dtype
        past = tuple(torch.zeros(2, kv, 3, hd, dtype=dtype) for _ in range(2 * layers))
        mask = torch.ones(2, 8, dtype=torch.long)
        args: tuple = (example["input_ids"], mask, past)
        input_names = names + past_names(layers)
        output_names = ["logits"] + present_names(layers)
    else:
        wrapper = PlainWrapper(model, task, switch_names, slot_names).eval()
        args = tuple(example[n] for n in names)
        if switch and "token_type_ids" not in names:
            args = args + (None,)
        input_names = list(names)
        output_names = ["last_hidden_state" if task == "feature-extraction" else "logits"]
    if switch:
        batch = example["input_ids"].shape[0]  # distinct slots per row, -1 (the base) among them
        slots = torch.arange(-1, batch - 1, dtype=torch.long) if slot_names else None
        args = args + (slots, switch_values)  # a list: the exporter turns specs into lists
        input_names = input_names + (["adapter_slot"] if slot_names else []) + list(switch_names)
    return wrapper, args, input_names, output_names
