"""The model side of a run: config, tokenizer, model, method, precision.

- :func:`read_config` reads the base's ``config.json`` as data (refusing custom code)
  before any weight is read; :func:`head_labels` takes the classes of a checkpoint that is
  already a classifier.
- :func:`load_model` loads the task model offline and records which tensors the
  checkpoint lacked (transformers' ``missing_keys``: a fresh head, a pooler absent from a
  ``*ForMaskedLM`` checkpoint). Those tensors are saved in the adapter even when frozen,
  so a merge into the same base reproduces the trained model.
- :func:`apply_method` wraps/freezes the model for rep, adp or the baselines.
- :func:`keep_fp32_master` keeps every trained tensor in float32 whatever the base dtype,
  and :func:`autocast_dtype` says which autocast the run uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, FormatError, UnsafeInputError
from ..io import TOKENIZER_FILES, has_tokenizer
from .args import TrainArgs

FRESH = "loretta_fresh_tensors"  # model attribute: parameters the checkpoint lacked


def read_config(model_path: Path):
    """transformers' config of ``model_path``, read as data (no custom code)."""
    from transformers import AutoConfig

    from ..io import read_model_config

    if not (model_path / "config.json").is_file():
        raise FormatError(f"{model_path} is not a transformers model directory (no config.json); "
                          "pass --model DIR with a locally saved model")
    cfg_path = model_path / "config.json"
    if read_model_config(model_path).get("auto_map"):
        raise UnsafeInputError(f"{cfg_path} asks for custom model code (auto_map); loretta-merge "
                               f"never runs a model's own code: use a model whose architecture "
                               f"transformers ships")
    try:
        return AutoConfig.from_pretrained(str(model_path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise FormatError(f"{cfg_path}: transformers cannot read this config ({exc}); pass a "
                          f"model directory saved with save_pretrained") from exc


def head_labels(config, num_labels: int | None) -> tuple[int | None, dict | None]:
    """A checkpoint that is already a classifier fixes the head size and label names."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
        if all(k.startswith("LABEL_") for k in label2id):
            label2id = None
        if num_labels is not None and num_labels != config.num_labels:
            raise ConfigError(f"--num-labels {num_labels} does not match the model's "
                              f"classification head ({config.num_labels} classes); drop "
                              f"--num-labels or pass {config.num_labels}")
        return config.num_labels, label2id
    return num_labels, None


def load_tokenizer(a: TrainArgs, model_path: Path):
    from transformers import AutoTokenizer

    source = Path(a.tokenizer or model_path)
    if source.is_dir() and not has_tokenizer(source):
        # transformers 5 would build an empty tokenizer here and train on unknown tokens
        raise FormatError(f"{source} holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}"
                          f", ...); save the model's tokenizer into it or pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise FormatError(f"no tokenizer could be loaded from {source} ({exc}); save one into "
                          "the model directory or pass --tokenizer DIR") from None


def load_model(a: TrainArgs, model_path: Path, *, num_labels: int | None,
               label2id: dict[str, int], pad_id: int) -> nn.Module:
    """The task model (offline); ``model.loretta_fresh_tensors`` lists the parameters the
    checkpoint lacked, which were initialised fresh (seeded by the caller)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if a.task == "seq-cls":
        kwargs: dict[str, Any] = dict(num_labels=num_labels)
        if label2id:
            kwargs.update(label2id=dict(label2id), id2label={v: k for k, v in label2id.items()})
        net, info = AutoModelForSequenceClassification.from_pretrained(
            str(model_path), output_loading_info=True, **kwargs)
        if getattr(net.config, "pad_token_id", None) is None:
            net.config.pad_token_id = pad_id
    else:
        net, info = AutoModelForCausalLM.from_pretrained(str(model_path), output_loading_info=True)
    setattr(net, FRESH, fresh_parameters(net, info.get("missing_keys") or []))
    return net


def fresh_parameters(net: nn.Module, missing_keys) -> list[str]:
    """The parameters among ``missing_keys`` that own their storage (a tied parameter is
    loaded through its partner, so it is not fresh)."""
    params = dict(net.named_parameters())
    fresh = [k for k in missing_keys if k in params]
    loaded = {id(p) for n, p in net.named_parameters(remove_duplicate=False) if n not in fresh}
    return [k for k in fresh if id(params[k]) not in loaded]


def fresh_names_after_wrapping(net: nn.Module, before: dict[str, nn.Parameter]) -> None:
    """Record, for each fresh parameter, its name once adapters wrapped its module
    (``{checkpoint key: current name}``); a replaced dense is gone (the adapter holds it as
    a TT layer). ``before`` is ``dict(net.named_parameters())`` taken before wrapping."""
    now = {id(p): n for n, p in net.named_parameters()}
    setattr(net, FRESH, {k: now[id(before[k])] for k in getattr(net, FRESH, [])
                         if k in before and id(before[k]) in now})


def fresh_tensors(net: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fresh tensors by checkpoint key, taken from ``tensors`` (current names)."""
    names = getattr(net, FRESH, {})
    return {key: tensors[name] for key, name in names.items() if name in tensors}


def check_vocab(net: nn.Module, tok, source) -> None:
    vocab = net.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise ConfigError(f"the tokenizer of {source} has {len(tok)} tokens but the model's "
                          f"embedding has {vocab} rows; use the model's own tokenizer "
                          "(drop --tokenizer)")


def apply_method(model: nn.Module, a: TrainArgs) -> tuple[nn.Module, int, int]:
    """Wrap / freeze ``model`` for ``a.method``; returns ``(model, lora_r8_equivalent,
    adapter_params)``."""
    from ..adapters.config import REP_TARGETS, AdpConfig, RepConfig, target_matches

    task_type = "SEQ_CLS" if a.task == "seq-cls" else "CAUSAL_LM"
    model_type = getattr(model.config, "model_type", None)
    targets = a.target_modules or REP_TARGETS.get(model_type or "")
    lora_eq = sum(8 * sum(mod.weight.shape) for name, mod in model.named_modules()
                  if targets and target_matches(name, targets) and hasattr(mod, "weight")
                  and getattr(mod.weight, "ndim", 0) == 2)
    if a.method in ("rep", "adp"):
        from ..adapters.inject import get_loretta_model

        common = dict(tensor_rank=a.tensor_rank, train_norms=a.train_norms, task_type=task_type,
                      replace_dense=a.replace_dense, init=a.init,
                      pooling=None if a.pooling == "none" else a.pooling)
        cfg = (RepConfig(r=a.r, lora_alpha=a.lora_alpha, target_modules=a.target_modules, **common)
               if a.method == "rep" else AdpConfig(bottleneck_size=a.bottleneck, **common))
        model = get_loretta_model(model, cfg)
        adapter = sum(p.numel() for n, p in model.named_parameters()
                      if p.requires_grad and category(n) == "adapter")
        return model, lora_eq, adapter
    if a.method == "lora":
        return _apply_lora(model, a, targets, task_type), lora_eq, 0
    if a.method == "full":  # every weight trained: a fine-tuned checkpoint, not an adapter
        for p in model.parameters():
            p.requires_grad_(True)
        return model, lora_eq, 0
    for p in model.parameters():  # head: everything frozen except the classifier
        p.requires_grad_(False)
    for p in _head_module(model).parameters():
        p.requires_grad_(True)
    return model, lora_eq, 0


def _apply_lora(model: nn.Module, a: TrainArgs, targets, task_type: str) -> nn.Module:
    from ..deps import require

    peft = require("peft", extra="peft", purpose="the 'lora' baseline")
    if not targets:
        raise ConfigError(f"no default LoRA targets for model type "
                          f"{getattr(model.config, 'model_type', None)!r}; pass --target-modules")
    cfg = peft.LoraConfig(r=a.r, lora_alpha=a.lora_alpha, lora_dropout=0.05,
                          target_modules=targets if isinstance(targets, str) else list(targets),
                          task_type=task_type)
    model = peft.get_peft_model(model, cfg)
    model._lora_adapter_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return model


def _head_module(model: nn.Module) -> nn.Module:
    for name in ("classifier", "score", "lm_head"):
        mod = getattr(model, name, None)
        if mod is not None:
            return mod
    raise ConfigError(f"{type(model).__name__} has no classifier/score/lm_head to train; pass --model with a *ForSequenceClassification or *ForCausalLM checkpoint")


def category(name: str) -> str:
    """Which kind of trained tensor a parameter is (for the breakdown in the summary)."""
    low = name.lower()
    if "tt_dense" in low or ".pooler." in low or low.startswith("pooler."):
        return "replaced_dense"
    if any(k in low for k in ("tt_cores", "lora_", "adapter_down", "adapter_up")):
        return "adapter"
    if "norm" in low:
        return "norms"
    if any(k in low for k in ("classifier", "score", "lm_head")):
        return "head"
    return "other"


def breakdown(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[category(name)] = out.get(category(name), 0) + p.numel()
    return out


# ----------------------------------------------------------------------- precision

def keep_fp32_master(model: nn.Module) -> int:
    """Every trained tensor (TT cores, biases, trained norms, heads) becomes float32 in
    place, whatever the base dtype; the frozen base keeps its dtype (a bf16 base is not
    upcast). Returns how many tensors were cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of the frozen weights have."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if not p.requires_grad:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def autocast_dtype(a: TrainArgs, model: nn.Module) -> torch.dtype | None:
    """bf16 / fp16 when asked; a half-precision base without a flag autocasts in its own
    dtype (its fp32 trained tensors and half activations need autocast to meet)."""
    if a.bf16:
        return torch.bfloat16
    if a.fp16:
        return torch.float16
    dtype = base_dtype(model)
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise ConfigError("the base model is float16, which cannot be trained on CPU (no "
                          "float16 autocast there); pass --bf16")
    return dtype if dtype in (torch.bfloat16, torch.float16) else None
