"""``--verify``: the merged checkpoint against base + adapter in memory, on a probe batch.

Both models run in fp32 (the merged weights are upcast exactly), so the difference measures
the merge and its one cast. That means two fp32 copies of the model in memory at once: the
need is estimated from the plan and a run that cannot fit is refused before anything is
read or written.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import quant
from ..deps import require
from ..errors import ConfigError, NumericsError
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


def check_verify_fits(plan: MergePlan) -> None:
    """Refuse ``--verify`` up front when its two fp32 copies cannot fit in memory, or when
    the package its reference model needs (PEFT, for a PEFT LoRA) is missing."""
    if any(_is_peft(a.adapter) for a in plan.adapters):
        require("peft", extra="verify", purpose="--verify of a PEFT LoRA adapter")
    need, have = verify_memory_bytes(plan), available_memory_bytes()
    if need > have:
        raise ConfigError(f"--verify loads two fp32 copies of the model (about {need / 2**30:.1f} "
                          f"GiB) but only {have / 2**30:.1f} GiB of memory is available; run "
                          f"without --verify, or verify on a machine with more memory "
                          f"(nothing was written)")


def _is_peft(adapter) -> bool:
    return adapter.method == "lora" and adapter.source == "peft" and adapter.path is not None


def _model_class(config: dict):
    import transformers

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value.float()
    return out[0].float()


def _reference(base, item: LoadedAdapter):
    adapter = item.adapter
    if _is_peft(adapter):
        peft = require("peft", extra="verify", purpose="--verify of a PEFT LoRA adapter")
        return peft.PeftModel.from_pretrained(base, adapter.path).eval()
    from ..adapters.files import load_loretta_model

    return load_loretta_model(base, adapter).eval()


def verify_merge(base_dir: str | os.PathLike, adapters: list[LoadedAdapter],
                 out_dir: str | os.PathLike, *, dtype: torch.dtype) -> dict:
    """Compare the merged model with base + adapter in memory on a small probe batch.

    Raises NumericsError above ``VERIFY_TOLERANCE[dtype]`` relative to the logit scale.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if len(adapters) != 1 or adapters[0].weight != 1.0:
        return {"skipped": "verify compares one adapter with weight 1 against its in-memory model"}
    config = read_model_config(out_dir) or read_model_config(base_dir)
    cls = _model_class(config)  # the output's class: the task model when one was written
    base = (quant.load_dequantized_model(base_dir, cls)  # None unless the base is quantized
            or cls.from_pretrained(base_dir, dtype=torch.float32))
    reference = _reference(base.eval(), adapters[0])
    merged = apply_pooling(cls.from_pretrained(out_dir, dtype=torch.float32)).eval()
    vocab = int(config.get("vocab_size") or 100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), min(vocab, 1000), (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the probe: a masked (mean) pooling must agree too
    inputs = {"input_ids": ids, "attention_mask": mask}
    want, got = _logits(reference, inputs), _logits(merged, inputs)
    diff = float((want - got).abs().max())
    scale = max(1.0, float(want.abs().max()))
    tol = VERIFY_TOLERANCE.get(dtype, 3e-2) * scale
    if not diff <= tol:
        raise NumericsError(f"verify: the merged model in {out_dir} differs from base + "
                            f"{adapters[0].label} by {diff:.3g} in logits (tolerance {tol:.3g} "
                            f"for {dtype_name(dtype)}); report it with both directories (no "
                            f"output was written)")
    return {"max_abs_logit_diff": diff, "logit_scale": scale, "tolerance": tol, "passed": True}
