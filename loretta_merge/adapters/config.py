"""Configs of the two LoRETTA methods and their per-architecture defaults.

``RepConfig`` (LoRETTA_rep: LoRA whose factors are tensor trains) and ``AdpConfig``
(LoRETTA_adp: bottleneck adapters whose projections are tensor trains). Both validate in
``__post_init__`` and round-trip through ``to_dict`` / ``from_dict`` (JSON-safe).

Target matching follows PEFT exactly: a list entry ``key`` matches a module name when
``name == key`` or ``name.endswith("." + key)``; a string is a regex that must fullmatch
the name. Never substrings.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

from ..errors import ConfigError
from ..patterns import check_patterns, pattern_value

TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION")
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
PLACEMENTS = ("input", "output")
POOLINGS = ("auto", "mean")

_LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
                "olmo", "olmo2", "granite")
# model_type -> default rep targets: the attention query and value projections (the paper's
# choice), under each architecture's own module names
REP_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in _LLAMA_STYLE},
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],                      # GPT-2 fuses q, k, v in one Conv1D
    "phi3": ["qkv_proj"],                    # Phi-3 fuses q, k, v in one Linear
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
}
# model_type -> default adp placement {module key: "input" | "output"}: around the MLP
ADP_PLACEMENT: dict[str, dict[str, str]] = {
    **{t: {"gate_proj": "input", "up_proj": "input", "down_proj": "output"} for t in _LLAMA_STYLE},
    "opt": {"fc1": "input", "fc2": "output"},
    "gpt2": {"mlp.c_fc": "input", "mlp.c_proj": "output"},
    "phi3": {"gate_up_proj": "input", "down_proj": "output"},
    **{t: {"output.dense": "output"} for t in ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2")},
    "distilbert": {"ffn.lin2": "output"},
}
# the family each model_type's defaults were checked on (the conformance matrix's rows)
FAMILY_OF: dict[str, str] = {
    **{t: "llama" for t in _LLAMA_STYLE}, "mistral": "mistral", "qwen2": "qwen2",
    "gemma": "gemma", "opt": "opt", "gpt2": "gpt2", "phi3": "phi3", "bert": "bert",
    "roberta": "roberta", "xlm-roberta": "roberta", "deberta": "deberta",
    "deberta-v2": "deberta-v2", "distilbert": "distilbert",
}


# --------------------------------------------------------------------------- matching

def key_matches(name: str, key: str) -> bool:
    """PEFT's list rule: ``name == key`` or ``name`` ends with ``"." + key``."""
    return name == key or name.endswith("." + key)


def target_matches(name: str, targets: list[str] | str) -> bool:
    """Whether module ``name`` is targeted: a regex string must fullmatch, a list entry
    matches by :func:`key_matches`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(key_matches(name, k) for k in targets)


def placement_for(name: str, placement: dict[str, str]) -> str | None:
    """The adp placement ("input"/"output") of module ``name``: the value of the longest
    ``placement`` key that matches by the list rule (:func:`key_matches`), or None.
    (PEFT's ``rank_pattern``/``alpha_pattern`` follow another rule: :mod:`patterns`.)"""
    hits = [k for k in placement if key_matches(name, k)]
    return placement[max(hits, key=len)] if hits else None


# --------------------------------------------------------------------------- helpers

def _help(text: str, default: Any = MISSING, factory: Any = MISSING):
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}; set {name} to an integer >= {minimum}")


def _prob(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be a probability in [0, 1), got {value!r}; set {name} to a value in [0, 1), e.g. 0.05")


def _choice(name: str, value: Any, choices: tuple, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}; set {name} to one of {list(choices)}")


def _key_list(name: str, value: Any, *, regex_ok: bool) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if not regex_ok:
            raise ConfigError(f"{name} must be a list of module names, got the string {value!r}; pass a list such as [{value!r}]")
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{name} {value!r} is not a valid regex ({exc}); "
                              f"pass a list of module names instead") from None
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{name} must be a non-empty list of module names"
                          f"{' or a regex string' if regex_ok else ''}, got {value!r}; pass a list such as ['q_proj', 'v_proj']")


def parse_shape_key(key: Any) -> tuple[int, ...]:
    """A ``mode_shapes`` key: a width (``768`` / ``"768"``) -> ``(768,)``; ``"768x8"`` ->
    ``(768, 8)``."""
    text = str(key).replace(" ", "").lower()
    parts = text.split("x")
    # isascii: str.isdigit() also accepts "¹" or "٣", which int() rejects or reads as another number
    if len(parts) in (1, 2) and all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
        return tuple(int(p) for p in parts)
    raise ConfigError(f"mode_shapes key {key!r} must be a width like 768 or 'rows x cols' like '768x8'; use a width (768) or 'ROWSxCOLS' ('768x8') as the key")


def _check_mode_shapes(value: Any) -> dict[str, list[int]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"mode_shapes must be a dict {{width or 'rows x cols': [modes]}}, got {value!r}; pass a dict that maps a width to its modes, e.g. 768: [8, 12, 8]")
    out: dict[str, list[int]] = {}
    for key, modes in value.items():
        dims = parse_shape_key(key)
        if (not isinstance(modes, (list, tuple)) or not modes
                or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in modes)):
            raise ConfigError(f"mode_shapes[{key!r}] must be a list of positive integers, got {modes!r}; give positive integers whose product is the width")
        want = math.prod(dims)
        if math.prod(modes) != want:
            what = f"the width {dims[0]}" if len(dims) == 1 else f"rows * cols = {dims[0]} * {dims[1]}"
            raise ConfigError(f"mode_shapes[{key!r}] = {list(modes)} multiplies to {math.prod(modes)}, "
                              f"but it must multiply to {what} = {want}; fix the modes")
        out["x".join(map(str, dims))] = [int(m) for m in modes]
    return out


@dataclass
class _Base:
    """Fields, to_dict / from_dict and checks shared by both configs."""

    method: ClassVar[str] = ""

    mode_shapes: dict[str, list[int]] | None = _help(
        "Mode overrides: {width: modes of that side} or {'rows x cols': modes of the whole matrix}.", None)
    shapes: str = _help("'paper' (the paper's table where it applies) or 'auto' (factorise).", "paper")
    train_norms: bool = _help("Train every LayerNorm/RMSNorm (the paper does).", True)
    modules_to_save: list[str] | None = _help("Extra modules trained in full and saved.", None)
    task_type: str | None = _help("SEQ_CLS, CAUSAL_LM or FEATURE_EXTRACTION; None = from the model class.",
                                  None)
    replace_dense: bool | None = _help(
        "SEQ_CLS: replace the pooler dense (BERT/DeBERTa) or classifier dense (RoBERTa) by a square "
        "TT layer with bias, as the paper does. None = true for SEQ_CLS.", None)
    pooling: str | None = _help(
        "SEQ_CLS pooling: None keeps the model's own (BERT: first token + pooler dense); 'mean' "
        "averages the last hidden states of the kept tokens, as sentence-transformers bases were "
        "trained; 'auto' = 'mean' when the base ships 1_Pooling/config.json saying mean.", None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[arg-type]
        d["method"] = self.method
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        method = data.get("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}; use RepConfig for 'rep' and AdpConfig for 'adp'")
        return cls(**{k: v for k, v in data.items() if k in known})

    def _check_common(self) -> None:
        _int("tensor_rank", self.tensor_rank)  # type: ignore[attr-defined]
        _choice("shapes", self.shapes, ("paper", "auto"))  # type: ignore[attr-defined]
        _choice("init", self.init, ("paper", "zero"))  # type: ignore[attr-defined]
        _choice("task_type", self.task_type, TASK_TYPES, optional=True)  # type: ignore[attr-defined]
        _key_list("modules_to_save", self.modules_to_save, regex_ok=False)  # type: ignore[attr-defined]
        if self.modules_to_save is not None:  # type: ignore[attr-defined]
            self.modules_to_save = list(self.modules_to_save)  # type: ignore[attr-defined]
        for flag in ("train_norms",):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}; set {flag} to true or false")
        if self.replace_dense is not None and not isinstance(self.replace_dense, bool):  # type: ignore
            raise ConfigError(f"replace_dense must be true, false or null, got {self.replace_dense!r}; set replace_dense to true, false or null")  # type: ignore
        self.mode_shapes = _check_mode_shapes(self.mode_shapes)  # type: ignore[attr-defined]
        _choice("pooling", self.pooling, POOLINGS, optional=True)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- configs

@dataclass
class RepConfig(_Base):
    """LoRETTA_rep: ``y = W0 x + b + s * B(A(dropout(x)))`` with A, B tensor trains."""

    method = "rep"

    r: int = _help("LoRA rank: A is (in, r), B is (r, out).", 8)
    lora_alpha: float = _help("Scale numerator: s = lora_alpha / r (or / sqrt(r) with use_rslora).", 16)
    lora_dropout: float = _help("Dropout on the adapter input.", 0.05)
    tensor_rank: int = _help("Inner TT rank R of every core (the paper uses 5).", 5)
    target_modules: list[str] | str | None = _help(
        "Module names (PEFT suffix rule) or a regex that fullmatches; None = architecture default.", None)
    use_rslora: bool = _help("Scale by lora_alpha / sqrt(r) instead of lora_alpha / r.", False)
    rank_pattern: dict[str, int] = _help("Per-module r overrides {module key: r}.", factory=dict)
    alpha_pattern: dict[str, float] = _help("Per-module lora_alpha overrides {module key: alpha}.",
                                            factory=dict)
    init: str = _help("'paper' (Gaussian TT init) or 'zero' (B's last core zero: an exact no-op at "
                      "step 0).", "paper")

    def __post_init__(self) -> None:
        _int("r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}; set lora_alpha to a positive number, e.g. 16")
        _prob("lora_dropout", self.lora_dropout)
        _key_list("target_modules", self.target_modules, regex_ok=True)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be true or false, got {self.use_rslora!r}; set use_rslora to true or false")
        for name, pat in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pat, dict):
                raise ConfigError(f"{name} must be a dict {{module key: value}}, got {pat!r}; pass a dict of module key -> value, or remove it")
        for name, pat in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            check_patterns(pat, field_name=name)
        for k, v in self.rank_pattern.items():
            _int(f"rank_pattern[{k!r}]", v)
        for k, v in self.alpha_pattern.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"alpha_pattern[{k!r}] must be a positive number, got {v!r}; set it to a positive number")
        self._check_common()

    def rank_for(self, name: str) -> int:
        """``r`` of module ``name``: ``rank_pattern`` by PEFT's rule (:mod:`patterns`), else ``r``."""
        return int(pattern_value(self.rank_pattern, name, self.r, field_name="rank_pattern"))

    def scale_for(self, name: str) -> float:
        """PEFT's scale of module ``name``: alpha / r, or alpha / sqrt(r) with use_rslora."""
        r = self.rank_for(name)
        alpha = float(pattern_value(self.alpha_pattern, name, self.lora_alpha, field_name="alpha_pattern"))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class AdpConfig(_Base):
    """LoRETTA_adp: ``h' = h + s * up(act(down(dropout(h))))``, up/down TT layers with bias."""

    method = "adp"

    bottleneck_size: int = _help("Bottleneck width b: down is (dim, b), up is (b, dim).", 64)
    non_linearity: str = _help("Activation between down and up: relu, gelu, silu or tanh.", "relu")
    adapter_dropout: float = _help("Dropout on the adapter input.", 0.0)
    scaling: float = _help("Scale s of the adapter output.", 1.0)
    tensor_rank: int = _help("Inner TT rank R of every core (the paper uses 5).", 5)
    placement: dict[str, str] | None = _help(
        "{module key (PEFT suffix rule): 'input' | 'output'}: an input adapter acts on the wrapped "
        "linear's input, an output adapter on its output. None = architecture default.", None)
    init: str = _help("'paper' (Gaussian TT init) or 'zero' (up's last core and bias zero: an exact "
                      "no-op at step 0).", "paper")

    def __post_init__(self) -> None:
        _int("bottleneck_size", self.bottleneck_size)
        _choice("non_linearity", self.non_linearity, NON_LINEARITIES)
        _prob("adapter_dropout", self.adapter_dropout)
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) \
                or not math.isfinite(self.scaling):
            raise ConfigError(f"scaling must be a finite number, got {self.scaling!r} "
                              f"(a learned scaling is not supported); set scaling to a finite number")
        if self.placement is not None:
            if not isinstance(self.placement, dict) or not self.placement:
                raise ConfigError(f"placement must be a non-empty dict {{module key: 'input' | 'output'}}, "
                                  f"got {self.placement!r}; give each module key 'input' or 'output'")
            for k, v in self.placement.items():
                if not isinstance(k, str) or not k:
                    raise ConfigError(f"placement keys must be module names, got {k!r}; use module-name strings as keys")
                _choice(f"placement[{k!r}]", v, PLACEMENTS)
        self._check_common()


LorettaConfig = RepConfig | AdpConfig


def config_from_dict(data: dict[str, Any]) -> RepConfig | AdpConfig:
    """Build the config named by ``data["method"]`` ("rep" or "adp")."""
    method = data.get("method")
    if method == "rep":
        return RepConfig.from_dict(data)
    if method == "adp":
        return AdpConfig.from_dict(data)
    raise ConfigError(f"config method must be 'rep' or 'adp', got {method!r}; pass 'rep' or 'adp'")


# --------------------------------------------------------------------------- defaults

def default_targets(model_type: str | None, method: str) -> list[str] | dict[str, str] | None:
    """The architecture default: rep target keys, or adp placement; None if unknown."""
    table = REP_TARGETS if method == "rep" else ADP_PLACEMENT
    value = table.get(model_type or "")
    if value is None:
        return None
    return list(value) if isinstance(value, list) else dict(value)


def closest_family(module_names: list[str]) -> tuple[str, list[str]] | None:
    """For an architecture without defaults: the supported model_type whose default rep
    targets name the most of ``module_names`` (Linear/Conv1D suffixes), and those targets;
    None when no default target name occurs."""
    suffixes = set(module_names)
    best: tuple[int, str] | None = None
    for model_type, targets in REP_TARGETS.items():
        hits = sum(t.rsplit(".", 1)[-1] in suffixes for t in targets)
        if hits and (best is None or hits > best[0]):
            best = (hits, model_type)
    if best is None:
        return None
    return best[1], [t for t in REP_TARGETS[best[1]] if t.rsplit(".", 1)[-1] in suffixes]


def unsupported_architecture_hint(model_type: str | None, module_names: list[str], *,
                                  method: str) -> str:
    """The body of the error for an architecture without defaults: the supported families,
    the closest one (by module names) and the ``--target-modules`` to try."""
    what = "target_modules" if method == "rep" else "placement"
    supported = ", ".join(sorted(REP_TARGETS))
    near = closest_family(module_names)
    if near is not None:
        family, targets = near
        advice = (f"its module names are those of the supported {family!r} family: try "
                  f"--target-modules {','.join(targets)}")
    else:
        attn = [n for n in module_names if any(k in n.lower() for k in ("q", "query", "qkv", "attn"))]
        advice = (f"no supported family uses its module names; the closest supported setting "
                  f"targets the attention projections, e.g. --target-modules "
                  f"{','.join(attn[:2] or module_names[:1])}")
    if method == "adp":
        advice += " (adp: placement {module: 'input'|'output'} on its MLP projections)"
    return (f"model_type {model_type!r} has no default {what} (defaults exist for: {supported}); "
            f"set {what}: {advice}; its Linear/Conv1D modules are: {module_names}")
