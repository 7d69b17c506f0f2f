"""What an extraction will do, decided from the two checkpoints' headers and configs before
any tensor is read: which keys the two share, which Linear (or GPT-2 ``Conv1D``) weights are
targets, and every refusal (another architecture, other shapes, a resized vocabulary, no
tensor in common). :func:`plan_extract` returns an :class:`ExtractPlan`; the work itself is
:func:`loretta_merge.converters.extract.extract`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters.config import default_targets, target_matches
from ..errors import ConfigError, FormatError, ShapeError
from ..io import CheckpointReader, read_model_config

__all__ = ["ALL_LINEAR", "ExtractPlan", "looks_like_embedding", "plan_extract"]

ALL_LINEAR = "all-linear"
# config fields that fix the architecture: equal in a base and its fine-tune
_ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "n_embd", "n_layer", "n_head", "d_model")
_VOCAB_HINTS = ("embed", "wte", "word_embeddings", "lm_head", "shared", "output.weight")


@dataclass
class ExtractPlan:
    """Everything decided from the two headers and configs, before any tensor is read."""

    base_dir: Path
    ft_dir: Path
    common: list[str]                       # keys in both, fine-tune order
    targets: dict[str, str]                 # weight key -> module name
    conv1d: set[str] = field(default_factory=set)       # module names stored (in, out)
    added: list[str] = field(default_factory=list)      # keys in the fine-tune only
    dropped: list[str] = field(default_factory=list)    # keys in the base only
    model_type: str | None = None
    target_source: str = ""                 # how the targets were chosen (for the report)
    dtype_changes: list[str] = field(default_factory=list)  # shared tensors stored in other dtypes


def _linear_modules(model_dir: Path, config: dict) -> tuple[set[str], set[str]] | None:
    """``(Linear modules, Conv1D modules)`` of the checkpoint's class, built on the meta
    device from its config (no weights); None when transformers cannot build it."""
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D

        model_config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        arch = (config.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls(model_config) if cls is not None else transformers.AutoModel.from_config(model_config)
    except Exception:  # noqa: BLE001 - an unknown architecture falls back to the names
        return None
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    conv = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    return linear | conv, conv


# model types whose Linear modules the key names alone tell (no modeling code imported, no
# model built): every 2-D ``.weight`` is a Linear (or GPT-2 ``Conv1D``) weight except the
# listed ``nn.Embedding`` modules; ``Conv1D`` modules by their last name. Checked against the
# classes built on the meta device by tests/test_extract.py; other types build the class.
_KNOWN_MODULES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "llama": (frozenset({"embed_tokens"}), frozenset()),
    "mistral": (frozenset({"embed_tokens"}), frozenset()),
    "qwen2": (frozenset({"embed_tokens"}), frozenset()),
    "gpt2": (frozenset({"wte", "wpe"}), frozenset({"c_attn", "c_proj", "c_fc"})),
    "bert": (frozenset({"word_embeddings", "position_embeddings", "token_type_embeddings"}),
             frozenset()),
}


def _known_modules(model_type: str | None, keys: list[str], reader: CheckpointReader
                   ) -> tuple[set[str], set[str]] | None:
    """``(Linear modules, Conv1D modules)`` from the names of ``keys`` for a model type in
    ``_KNOWN_MODULES``; None for any other."""
    known = _KNOWN_MODULES.get(model_type or "")
    if known is None:
        return None
    embeddings, conv1d = known
    linear = {k[: -len(".weight")] for k in keys if k.endswith(".weight") and len(reader.shape(k)) == 2}
    linear = {m for m in linear if m.rsplit(".", 1)[-1] not in embeddings}
    return linear, {m for m in linear if m.rsplit(".", 1)[-1] in conv1d}


def looks_like_embedding(key: str) -> bool:
    return any(h in key for h in _VOCAB_HINTS)


def _check_same_model(base: CheckpointReader, ft: CheckpointReader, base_cfg: dict,
                      ft_cfg: dict) -> None:
    base_keys, ft_keys = set(base.keys()), set(ft.keys())
    common = base_keys & ft_keys
    if not common:
        raise ShapeError(f"{base.model_dir} and {ft.model_dir} have no tensor name in common "
                         f"(e.g. {sorted(base_keys)[:1]} vs {sorted(ft_keys)[:1]}); pass the base this "
                         f"model was fine-tuned from, saved with the same model class")
    for f in _ARCH_FIELDS:
        if f in base_cfg and f in ft_cfg and base_cfg[f] != ft_cfg[f]:
            raise ShapeError(f"different architectures: config.json {f} is {base_cfg[f]!r} in "
                             f"{base.model_dir} and {ft_cfg[f]!r} in {ft.model_dir}; pass the base this "
                             f"model was fine-tuned from")
    bad = [(k, base.shape(k), ft.shape(k)) for k in sorted(common) if base.shape(k) != ft.shape(k)]
    if not bad:
        return
    vocab = [b for b in bad if looks_like_embedding(b[0]) and len(b[1]) == len(b[2])
             and b[1][1:] == b[2][1:]]
    v0, v1 = base_cfg.get("vocab_size"), ft_cfg.get("vocab_size")
    if vocab and len(vocab) == len(bad):
        names = ", ".join(f"{k} {tuple(s0)} -> {tuple(s1)}" for k, s0, s1 in vocab)
        rows = vocab[0][2][0]
        raise ShapeError(f"the fine-tune's vocabulary was resized ({names}"
                         + (f"; vocab_size {v0} -> {v1}" if v0 != v1 else "")
                         + f"); a delta needs equal shapes: load the base, call "
                         f"model.resize_token_embeddings({rows}), save it with save_pretrained and "
                         f"extract against that copy (the changed embeddings are then carried whole)")
    k, s0, s1 = bad[0]
    more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
    raise ShapeError(f"different architectures: tensor {k} is {tuple(s0)} in {base.model_dir} and "
                     f"{tuple(s1)} in {ft.model_dir}{more}; pass the base this model was fine-tuned from")


def _targets(plan_keys: list[str], ft: CheckpointReader, modules: set[str] | None,
             target_modules, model_type: str | None) -> tuple[dict[str, str], str]:
    weights = {k[: -len(".weight")]: k for k in plan_keys
               if k.endswith(".weight") and len(ft.shape(k)) == 2}
    if modules is not None:
        linear = {m: k for m, k in weights.items() if m in modules}
    else:  # unknown class: every 2-D weight except embeddings and output heads
        linear = {m: k for m, k in weights.items() if not looks_like_embedding(k)}
    if target_modules in (None, [], ()):
        keys = default_targets(model_type, "rep")
        if keys is None:
            chosen, source = dict(linear), f"all Linear weights (no defaults for model_type {model_type!r})"
        else:
            chosen = {m: k for m, k in linear.items() if target_matches(m, keys)}
            source = f"the {model_type} defaults {keys}"
    elif target_modules == ALL_LINEAR or list(target_modules) == [ALL_LINEAR]:
        chosen, source = dict(linear), "all Linear weights"
    else:
        keys = target_modules if isinstance(target_modules, str) else list(target_modules)
        chosen = {m: k for m, k in linear.items() if target_matches(m, keys)}
        source = f"--target-modules {keys}"
        if not chosen:
            suffixes = sorted({m.rsplit(".", 1)[-1] for m in linear})
            raise ConfigError(f"--target-modules {keys} matches no Linear module of "
                              f"{ft.model_dir}; its Linear module names end in: {suffixes} "
                              f"(or pass --target-modules {ALL_LINEAR})")
    if not chosen:
        raise ConfigError(f"{ft.model_dir}: no Linear weight to extract ({source}); pass "
                          f"--target-modules with names of its Linear modules or {ALL_LINEAR}")
    return {k: m for m, k in chosen.items()}, source


def plan_extract(base_dir, ft_dir, *, target_modules=None, rank: int | None = None) -> ExtractPlan:
    """Check the pair from headers and configs and decide the targets (nothing is read)."""
    base_dir, ft_dir = Path(base_dir), Path(ft_dir)
    for d, what in ((base_dir, "BASE"), (ft_dir, "FINETUNED")):
        if not d.is_dir():
            raise FormatError(f"{what} {d} is not a directory; pass a transformers model "
                              f"directory (config.json and *.safetensors)")
    base_cfg, ft_cfg = read_model_config(base_dir), read_model_config(ft_dir)
    with CheckpointReader(base_dir) as base, CheckpointReader(ft_dir) as ft:
        _check_same_model(base, ft, base_cfg, ft_cfg)
        base_keys = set(base.keys())
        common = [k for k in ft.keys() if k in base_keys]
        ft_keys = set(ft.keys())
        model_type = ft_cfg.get("model_type") or base_cfg.get("model_type")
        info = (_known_modules(model_type, common, ft) or _linear_modules(ft_dir, ft_cfg)) if ft_cfg else None
        modules, conv = (info if info is not None else (None, set()))
        targets, source = _targets(common, ft, modules, target_modules, model_type)
        if rank is not None:
            small = [(k, ft.shape(k)) for k in targets if rank > min(ft.shape(k))]
            if small:
                k, s = small[0]
                raise ConfigError(f"--rank {rank} is larger than min(dims) = {min(s)} of {k} "
                                  f"{tuple(s)}" + (f" (and {len(small) - 1} more)" if len(small) > 1 else "")
                                  + f"; pass --rank <= {min(min(s) for _, s in small)}, or "
                                  f"--energy / --eps with --rank as a cap")
        return ExtractPlan(base_dir=base_dir, ft_dir=ft_dir, common=common, targets=targets,
                           conv1d={targets[k] for k in targets if targets[k] in conv},
                           added=[k for k in ft.keys() if k not in base_keys],
                           dropped=sorted(k for k in base.keys() if k not in ft_keys),
                           model_type=model_type, target_source=source,
                           dtype_changes=[k for k in common if base.dtype(k) != ft.dtype(k)])
