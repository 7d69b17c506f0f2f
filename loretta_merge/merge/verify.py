"""``--verify``: the merged checkpoint against base + adapter in memory, on a probe batch.

The reference is the model the merge stands for: base + adapter, unmerged, for one adapter
with weight 1; ``base + Σ w_i (W_i - base)`` for weighted or several adapters, W_i the base
with adapter i merged in memory. A verify that cannot run is an error, never a skip. Both
models run in fp32 (the merged weights are upcast exactly), so the difference measures
the merge and its one cast. That means two fp32 copies of the model in memory at once: the
need is estimated from the plan and a run that cannot fit is refused before anything is
read or written.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .. import quant
from ..deps import require
from ..errors import ConfigError, LorettaError, NumericsError
from ..io import dtype_name, read_model_config
from ..pooling import apply_pooling
from .inputs import LoadedAdapter
from .plan import MergePlan

# tolerance on max |logit difference| / max(1, max |logit|), by output dtype
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
_OVERHEAD = 1.1  # activations of the probe batch, the adapter, Python


def available_memory_bytes() -> int:
    """Memory the system can give this process now without swapping."""
    psutil = require("psutil", extra="verify", purpose="--verify (to check that two fp32 "
                     "copies of the model fit in memory)")
    return int(psutil.virtual_memory().available)


def verify_memory_bytes(plan: MergePlan) -> int:
    """What ``--verify`` needs: two fp32 copies of the merged model, plus a margin."""
    return int(2 * 4 * plan.elements() * _OVERHEAD)


def check_verify_fits(plan: MergePlan, config: dict | None = None) -> None:
    """Refuse ``--verify`` up front when it cannot run: its two fp32 copies do not fit in
    memory, the package its reference model needs (PEFT, for a PEFT LoRA) is missing, an
    adapter has no in-memory form to compare with, or transformers has no class for the
    output model (``config``: the base's)."""
    for item in plan.adapters:
        if _is_peft(item.adapter):
            require("peft", extra="verify", purpose="--verify of a PEFT LoRA adapter")
        elif item.adapter.method != "rep":
            raise ConfigError(f"--verify cannot build the in-memory model of adapter {item.label} "
                              f"({item.adapter.method} from {item.adapter.source}"
                              f"{'' if item.adapter.path else ', not read from a directory'}): "
                              f"only PEFT LoRA/DoRA directories and LoRETTA rep adapters have "
                              f"one; run without --verify (nothing was written)")
    if config is not None:
        _model_class(config, plan.task.class_name if plan.task else None)
    need, have = verify_memory_bytes(plan), available_memory_bytes()
    if need > have:
        raise ConfigError(f"--verify loads two fp32 copies of the model (about {need / 2**30:.1f} "
                          f"GiB) but only {have / 2**30:.1f} GiB of memory is available; run "
                          f"without --verify, or verify on a machine with more memory "
                          f"(nothing was written)")


def _is_peft(adapter) -> bool:
    return adapter.method == "lora" and adapter.source == "peft" and adapter.path is not None


def _model_class(config: dict, class_name: str | None = None):
    """The transformers class of the output model: ``class_name`` (a task model the merge
    writes) or the config's architectures, else the Auto class of its model type; a
    ConfigError when transformers has none (``--verify`` cannot build the model)."""
    import transformers

    for arch in ([class_name] if class_name else []) + list(config.get("architectures") or []):
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if config.get("model_type") in transformers.CONFIG_MAPPING:
        return transformers.AutoModel
    names = ", ".join(([class_name] if class_name else []) + list(config.get("architectures") or []))
    raise ConfigError(f"--verify needs to build the model in memory, but this transformers "
                      f"({transformers.__version__}) has no class {names or '(none named)'} "
                      f"and no model type {config.get('model_type')!r}; upgrade transformers, "
                      f"or run without --verify (nothing was written)")


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value.float()
    return out[0].float()


def _load_base(base_dir: Path, cls, *, zero_missing: bool = False):
    """The base model in fp32 (dequantized when the base is quantized). ``zero_missing``:
    parameters the checkpoint lacks (a task head over a bare base) are zeros, as the merge
    takes them, not random initialisations."""
    model = quant.load_dequantized_model(base_dir, cls)  # None unless the base is quantized
    if model is None:
        model, info = cls.from_pretrained(base_dir, dtype=torch.float32, output_loading_info=True)
        if zero_missing:
            missing = set(info.get("missing_keys") or ())
            with torch.no_grad():
                for p, names in _aliases(model).values():
                    if all(n in missing for n in names):
                        p.zero_()
    return model.eval()


def _aliases(model) -> dict[int, tuple[torch.nn.Parameter, list[str]]]:
    """Each parameter once, with every name it has (tied weights have several)."""
    out: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), (p, []))[1].append(name)
    return out


def _reference(base, item: LoadedAdapter):
    """Base + adapter in memory, unmerged (the check for one adapter with weight 1)."""
    adapter = item.adapter
    if _is_peft(adapter):
        peft = require("peft", extra="verify", purpose="--verify of a PEFT LoRA adapter")
        return peft.PeftModel.from_pretrained(base, adapter.path).eval()
    from ..adapters.files import load_loretta_model

    return load_loretta_model(base, adapter).eval()


def _merged_in_memory(base, item: LoadedAdapter):
    """W_i: the base with one adapter merged in memory, by PEFT's own ``merge_and_unload``
    for a PEFT LoRA/DoRA, by :func:`merge_loretta_model` for a LoRETTA adapter."""
    if _is_peft(item.adapter):
        return _reference(base, item).merge_and_unload().eval()
    from ..adapters.files import merge_loretta_model

    return merge_loretta_model(_reference(base, item)).eval()


def _untie_like(acc, other) -> None:
    """Give ``acc`` its own tensor under every name whose tensor ``other`` does not share
    (an adapter that changed a tied embedding untied it in its model)."""
    theirs = {n: id(p) for n, p in other.named_parameters(remove_duplicate=False)}
    for p, names in _aliases(acc).values():
        for name in names[1:]:
            if theirs.get(name) != theirs.get(names[0]):
                prefix, _, leaf = name.rpartition(".")
                setattr(acc.get_submodule(prefix), leaf,
                        torch.nn.Parameter(p.detach().clone(), requires_grad=False))


def _add_scaled(acc, other, weight: float) -> None:
    """``acc += weight * other``, parameter by parameter, matched by name (``other`` may
    hold parameters ``acc`` lacks and never uses: a first-token pooler that a mean-pooling
    adapter replaced)."""
    _untie_like(acc, other)
    theirs = dict(other.named_parameters(remove_duplicate=False))
    ours = _aliases(acc)
    names = {n for _, ns in ours.values() for n in ns}
    if not names <= set(theirs):
        odd = sorted(names - set(theirs))
        raise ConfigError(f"--verify: the in-memory models of the adapters do not have the same "
                          f"parameters ({', '.join(odd[:3])} missing from one); run without "
                          f"--verify (nothing was written)")
    with torch.no_grad():
        for p, ns in ours.values():
            p.add_(theirs[ns[0]].to(torch.float32), alpha=weight)


def _combined_reference(base_dir: Path, cls, adapters: list[LoadedAdapter]):
    """``base + Σ w_i (W_i - base)`` as ``(1 - Σ w_i) base + Σ w_i W_i``: one W_i at a time
    beside the sum, so two fp32 copies at most (as :func:`verify_memory_bytes` counts)."""
    acc = _merged_in_memory(_load_base(base_dir, cls, zero_missing=True), adapters[0])
    with torch.no_grad():
        for p, _ in _aliases(acc).values():
            p.mul_(adapters[0].weight)
    for item in adapters[1:]:
        other = _merged_in_memory(_load_base(base_dir, cls, zero_missing=True), item)
        _add_scaled(acc, other, item.weight)
        del other
    rest = 1.0 - sum(item.weight for item in adapters)
    if rest != 0.0:
        other = _load_base(base_dir, cls, zero_missing=True)
        _add_scaled(acc, other, rest)
        del other
    return acc.eval()


@contextlib.contextmanager
def _no_load_bars():
    """transformers' weight-loading bars off while verify loads its models (the merge's
    ``progress=False`` and ``-q`` mean nothing on stderr but errors), restored after."""
    from transformers.utils import logging as tf_logging

    enabled = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            tf_logging.enable_progress_bar()


def _combination(adapters: list[LoadedAdapter]) -> str:
    if len(adapters) == 1 and adapters[0].weight == 1.0:
        return f"base + {adapters[0].label}"
    return "base + " + " + ".join(f"{a.weight:g}*({a.label} - base)" for a in adapters)


def verify_merge(base_dir: str | os.PathLike, adapters: list[LoadedAdapter],
                 out_dir: str | os.PathLike, *, dtype: torch.dtype) -> dict:
    """Compare the merged model with the model the merge stands for, on a small probe batch.

    One adapter with weight 1: base + adapter in memory, unmerged. Otherwise (weights,
    several adapters) ``base + Σ w_i (W_i - base)``, W_i the base with adapter i merged in
    memory (PEFT's ``merge_and_unload``, or :func:`merge_loretta_model`), summed in fp32.
    Raises NumericsError above ``VERIFY_TOLERANCE[dtype]`` relative to the logit scale, and
    ConfigError when the models cannot be built (never a silent skip).
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config = read_model_config(out_dir) or read_model_config(base_dir)
    cls = _model_class(config)  # the output's class: the task model when one was written
    vocab = int(config.get("vocab_size") or 100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), min(vocab, 1000), (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the probe: a masked (mean) pooling must agree too
    inputs = {"input_ids": ids, "attention_mask": mask}
    what = _combination(adapters)
    try:
        with _no_load_bars():
            merged = apply_pooling(cls.from_pretrained(out_dir, dtype=torch.float32)).eval()
            got = _logits(merged, inputs)
            del merged  # two fp32 copies at most, also while the reference is built
            if len(adapters) == 1 and adapters[0].weight == 1.0:
                reference = _reference(_load_base(base_dir, cls), adapters[0])
            else:
                reference = _combined_reference(base_dir, cls, adapters)
            want = _logits(reference, inputs)
    except (LorettaError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a check that cannot run must say so
        raise ConfigError(f"--verify could not run: building {what} in memory failed with "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}; run "
                          f"without --verify (nothing was written)") from exc
    diff = float((want - got).abs().max())
    scale = max(1.0, float(want.abs().max()))
    tol = VERIFY_TOLERANCE.get(dtype, 3e-2) * scale
    if not diff <= tol:
        raise NumericsError(f"verify: the merged model in {out_dir} differs from {what} by "
                            f"{diff:.3g} in logits (tolerance {tol:.3g} for {dtype_name(dtype)}); "
                            f"report it with both directories (no output was written)")
    return {"max_abs_logit_diff": diff, "logit_scale": scale, "tolerance": tol, "passed": True,
            "reference": what}
