"""``merge --config FILE.yml``: a mergekit YAML recipe, read as a merge of inputs into one base.

The recipe means what it means to mergekit 0.1.5 (so a mergekit file runs unchanged and
gives mergekit's output): ``merge_method``, ``base_model``, ``models`` whose entries are
fine-tuned models of the base (a plain path, as mergekit users write them: read as a full
checkpoint, :mod:`.full`) or ``BASE+ADAPTER`` (mergekit's syntax for a LoRA on a model; the
string or the ``{model: ..., lora: ...}`` form), per-model ``parameters`` (``weight``,
``density``, ``epsilon``, ``gamma``), global ``parameters`` (those, as defaults, plus
``lambda``, ``normalize``, ``rescale``, ``int8_mask``, and this tool's ``majority_sign`` and
``tie_break``),
``dtype`` / ``out_dtype``. Everything else (slices, modules, tokenizer settings, per-tensor
parameter filters, methods this tool lacks) is refused by name.

mergekit's ``linear`` averages whole models, ``Σ w_i W_i / Σ w_i`` (the base may be one of
them); over fine-tunes and adapters of one base that is ``W0 + Σ (w_i / Σ w) Δ_i``, this
tool's linear merge with normalised weights. Every other method has the same name and
meaning here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..deps import require
from ..errors import ConfigError
from ..methods import method_names

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
_REFUSED_TOP = {
    "slices": "layer slices (frankenmerges) are not supported",
    "modules": "per-module recipes are not supported",
    "tokenizer_source": "the output keeps the base's tokenizer files",
    "tokenizer": "the output keeps the base's tokenizer files",
    "chat_template": "the output keeps the base's chat template",
}
MODEL_PARAMS = ("weight", "density", "epsilon", "gamma")
GLOBAL_PARAMS = MODEL_PARAMS + ("lambda", "normalize", "rescale", "int8_mask", "majority_sign",
                                 "tie_break")


@dataclass
class Recipe:
    """What a recipe asks for, in :func:`loretta_merge.merge.merge`'s terms."""

    path: Path
    base: str
    adapters: list[tuple[str, float]]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None


def _where(path: Path) -> str:
    return f"config {path}"


def _model_ref(value: Any, where: str) -> tuple[str, str | None]:
    """mergekit's model reference -> (model path, adapter path or None)."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"model", "lora"})
        if unknown:
            raise ConfigError(f"{where}: model reference key(s) {', '.join(unknown)} are not "
                              f"supported; remove them (keep model and lora)")
        model, lora = value.get("model"), value.get("lora")
        model = model.get("path") if isinstance(model, dict) else model
        lora = lora.get("path") if isinstance(lora, dict) else lora
    elif isinstance(value, str):
        parts = value.split("+")
        if len(parts) > 2:
            raise ConfigError(f"{where}: {value!r} has more than one '+'; write MODEL+LORA")
        model, lora = parts[0], (parts[1] if len(parts) == 2 else None)
    else:
        raise ConfigError(f"{where}: a model must be a path or MODEL+LORA, not {value!r}; "
                          f"write it as BASE+ADAPTER")
    for p in (model, lora):
        if p is not None and (not isinstance(p, str) or not p):
            raise ConfigError(f"{where}: model paths must be non-empty strings, not {p!r}; "
                              f"give each as a path")
        if isinstance(p, str) and "@" in p:
            raise ConfigError(f"{where}: {p!r} names a hub revision; this tool reads local "
                              f"directories only: download it and give its path")
    return model, lora


def _local_dir(p: str, where: str, what: str) -> str:
    if not os.path.isdir(p):
        raise ConfigError(f"{where}: {what} {p!r} is not a local directory; give a local path "
                          f"(relative to the current directory, as mergekit reads it), and "
                          f"download a hub model first")
    return p


def _number(value: Any, key: str, where: str) -> Any:
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: parameter {key} is {type(value).__name__}-valued (a "
                          f"gradient or per-tensor filter), which is not supported; give one "
                          f"value")
    return value


def _parameters(raw: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: parameters must be a mapping, not {raw!r}; write them "
                          f"as `name: value` lines")
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown parameter(s) {', '.join(map(str, unknown))}; "
                          f"use one of {', '.join(allowed)}")
    return {k: _number(v, k, where) for k, v in raw.items()}


def _base_model(data: dict, models: list, where: str) -> str:
    """base_model; without one (mergekit's linear needs none), the one model every entry
    names, or for linear (an average of the listed models, whichever is taken as the base)
    the model under the adapters, else the first model listed."""
    if data.get("base_model") is None:
        refs = [_model_ref(e["model"], where) for e in models if isinstance(e, dict) and "model" in e]
        named = list(dict.fromkeys(m for m, _ in refs))
        under = list(dict.fromkeys(m for m, lora in refs if lora is not None))
        if len(named) == 1:
            return _local_dir(named[0], where, "model")
        if data.get("merge_method") == "linear" and named and len(under) <= 1:
            return _local_dir(under[0] if under else named[0], where, "model")
        raise ConfigError(f"{where}: base_model is required (the model every input was "
                          f"fine-tuned or trained from); add `base_model: BASE`")
    base, base_lora = _model_ref(data["base_model"], f"{where}: base_model")
    if base_lora is not None:
        raise ConfigError(f"{where}: base_model {data['base_model']!r} carries an adapter; "
                          f"give the plain base and list BASE+ADAPTER under models")
    return _local_dir(base, where, "base_model")


def read_recipe(path: str | os.PathLike) -> Recipe:
    """Read a mergekit YAML recipe (see the module docstring); ConfigError naming the key
    and the file for anything this tool cannot do as mergekit would."""
    path = Path(path)
    yaml = require("yaml", purpose="merge --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}; pass a readable "
                          f"YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML ({str(exc).splitlines()[0]}); "
                          f"fix its syntax") from None
    where = _where(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping; write merge_method, base_model and "
                          f"models keys")
    for key in data:
        if key in _REFUSED_TOP:
            raise ConfigError(f"{where}: key {key!r} is not supported ({_REFUSED_TOP[key]}); "
                              f"remove it")
        if key not in TOP_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; remove it (supported keys: "
                              f"{', '.join(TOP_KEYS)})")
    method = data.get("merge_method")
    if method not in method_names():
        raise ConfigError(f"{where}: merge_method {method!r} is not supported; choose one of "
                          f"{', '.join(method_names())} (task-vector merges of adapters into "
                          f"one base)")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: models must be a non-empty list; list each input as "
                          f"`- model: FINE_TUNED` or `- model: BASE+ADAPTER`")
    base = _base_model(data, models, where)
    defaults = _parameters(data.get("parameters"), GLOBAL_PARAMS, f"{where}: parameters")
    adapters: list[tuple[str, dict]] = []
    base_weights: list[float] = []  # the base listed as a model (mergekit's linear counts it)
    for i, entry in enumerate(models):
        at = f"{where}: models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{at}: each entry needs a model; add `model: FINE_TUNED` or "
                          f"`model: BASE+ADAPTER`")
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {', '.join(unknown)}; remove them "
                              f"(supported: model, parameters)")
        model, lora = _model_ref(entry["model"], at)
        params = {**{k: v for k, v in defaults.items() if k in MODEL_PARAMS},
                  **_parameters(entry.get("parameters"), MODEL_PARAMS, at)}
        same_base = os.path.realpath(model) == os.path.realpath(base)
        if lora is None:
            if same_base:
                base_weights.append(float(params.get("weight", 1.0)))
            else:  # a fine-tune of base_model: its task vector is its weights minus the base's
                adapters.append((_local_dir(model, at, "model"), params))
            continue
        if not same_base:
            raise ConfigError(f"{at}: adapter {lora!r} is applied to {model!r}, not to "
                              f"base_model {base!r}; every input must be base_model+ADAPTER: "
                              f"write {base}+{lora}")
        adapters.append((_local_dir(lora, at, "adapter"), params))
    if not adapters:
        raise ConfigError(f"{where}: models lists only the base, so there is nothing to "
                          f"merge; add a fine-tuned model or BASE+ADAPTER")
    return _resolve(path, method, base, adapters, base_weights, defaults,
                    data.get("out_dtype") or data.get("dtype"))


def _resolve(path: Path, method: str, base: str, adapters: list[tuple[str, dict]],
             base_weights: list[float], defaults: dict, dtype: str | None) -> Recipe:
    where = _where(path)
    weights = []
    for lora, params in adapters:
        try:
            weights.append(float(params.get("weight", 1.0)))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: weight {params.get('weight')!r} of {lora} is not a "
                              f"number; give a number") from None
    params: dict[str, Any] = {k: defaults[k] for k in ("lambda", "normalize", "rescale",
                                                        "majority_sign", "tie_break")
                              if k in defaults}
    for key in ("density", "epsilon", "gamma"):
        values = [p[key] for _, p in adapters if key in p]
        if not values:
            continue
        if len(values) != len(adapters):
            raise ConfigError(f"{where}: {key} is given for some models and not others; give "
                              f"it for every model or under the global parameters")
        params[key] = values[0] if len(set(values)) == 1 else tuple(values)
    if method == "linear":  # mergekit's linear: an average of whole models
        extra = sorted(set(params) - {"normalize"})
        if extra:
            raise ConfigError(f"{where}: merge_method linear takes weight and normalize only, "
                              f"not {', '.join(extra)}; remove them")
        total = sum(weights) + sum(base_weights)
        if params.get("normalize", True):
            if abs(total) < 1e-8:
                raise ConfigError(f"{where}: the linear weights sum to {total:g}; they are "
                                  f"divided by their sum: choose weights whose sum is not 0")
            weights = [w / total for w in weights]
        elif not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-6):
            raise ConfigError(f"{where}: linear with normalize false and weights summing to "
                              f"{total:g} scales the base itself; set normalize: true, or "
                              f"choose weights (base included) that sum to 1")
        params = {}
    return Recipe(path, base, [(lora, w) for (lora, _), w in zip(adapters, weights)], method,
                  params, str(dtype) if dtype is not None else None)
