"""The bad-input corpus: every command against broken, hostile or mistaken inputs.

Each case runs the real CLI (``loretta_merge.cli.main``) in-process on real files (a tiny
Llama checkpoint, a LoRETTA_rep and _adp adapter, a real PEFT LoRA, each copied and damaged
per case) and asserts the promise of issue 7: a non-zero exit, exactly one ``error:`` line
on stderr, no traceback, and no output left behind (no OUT, no ``.<OUT>.loretta-*`` temporary
beside it; an existing OUT is untouched). The line is held to the rule of tests/hint_rule.py
(issue 16): it names the case's culprit verbatim (the path as given, or the file, tensor,
module, option or value in it) and gives a concrete next step.
A few cases run as real subprocesses to prove the console behaviour, one with ``--debug``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny, perturb_trainable, run_main
from hint_rule import rule_problems

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_ST = "adapter_model.safetensors"
ADAPTER_CFG = "adapter_config.json"
class TrustedDict(dict):
    """A dict subclass: pickling it records a GLOBAL that ``weights_only`` loading refuses."""


# --------------------------------------------------------------------------- fixtures

def _tiny_llama(path: Path, *, hidden: int = 64) -> Path:
    """A tiny Llama saved in small shards (sharded index) with the given width."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, max_shard_size="40KB")
    return path


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    perturb_trainable(model, seed=seed)


def _loretta_adapter(path: Path, method: str, *, hidden: int = 64) -> Path:
    import transformers

    from loretta_merge.adapters.config import AdpConfig, RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    if hidden == 64:
        net = build_tiny("llama")
    else:
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False)
        net = transformers.LlamaForCausalLM(cfg).eval()
    config = RepConfig(lora_dropout=0.0) if method == "rep" else AdpConfig()
    model = get_loretta_model(net, config)
    _perturb(model)
    save_loretta_adapter(model, path)
    return path


def _peft_lora(path: Path, arch: str = "llama", targets=("q_proj", "v_proj")) -> Path:
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(build_tiny(arch), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    _perturb(pm)
    pm.save_pretrained(path)
    return path


@dataclass
class Env:
    root: Path
    base: Path            # tiny llama, sharded with an index
    rep: Path             # LoRETTA_rep adapter for base
    adp: Path             # LoRETTA_adp adapter for base
    lora: Path            # PEFT LoRA for base
    rep_wide: Path        # LoRETTA_rep adapter for a llama of another width (48)
    lora_gpt2: Path       # PEFT LoRA for gpt2 (module names absent from llama)
    data: Path            # a valid training CSV


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("corpus")
    base = _tiny_llama(root / "base")
    data = root / "train.csv"
    data.write_text("text,label\n" + "".join(f"the film {i},{i % 2}\n" for i in range(8)))
    return Env(root=root, base=base, rep=_loretta_adapter(root / "rep", "rep"),
               adp=_loretta_adapter(root / "adp", "adp"), lora=_peft_lora(root / "lora"),
               rep_wide=_loretta_adapter(root / "rep48", "rep", hidden=48),
               lora_gpt2=_peft_lora(root / "lora-gpt2", "gpt2", ("c_attn",)), data=data)


# --------------------------------------------------------------------------- corruptions

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def corrupt_header(path: Path) -> None:
    """Keep the length prefix, garble the JSON header."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8:8 + min(n, 16)] = b"#" * min(n, 16)
    path.write_bytes(bytes(data))


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, fn: Callable[[dict], None]) -> None:
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path), metadata={"format": "pt"})


def poison(value: float) -> Callable[[dict], None]:
    def fn(state: dict) -> None:
        key = sorted(k for k in state if state[k].is_floating_point())[0]
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value
    return fn


def to_unsafe_bin(d: Path) -> None:
    """Replace the adapter safetensors with a .bin that needs full unpickling."""
    state = TrustedDict(load_file(str(d / ADAPTER_ST)))
    torch.save(state, d / "adapter_model.bin")
    (d / ADAPTER_ST).unlink()


def link_outside(d: Path, name: str) -> None:
    """Move ``d/name`` out of the directory and leave a symlink to it."""
    outside = d.parent / f"{d.name}-outside-{name}"
    shutil.move(d / name, outside)
    (d / name).symlink_to(outside)


def index_escape(d: Path) -> None:
    """The index maps one tensor to ``../x.safetensors``, a real shard outside ``d``."""
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"][next(iter(data["weight_map"]))]
    shutil.copy(d / shard, d.parent / "x.safetensors")
    for k, v in data["weight_map"].items():
        if v == shard:
            data["weight_map"][k] = "../x.safetensors"
    (d / shard).unlink()
    index.write_text(json.dumps(data))


def rank_mismatch_ours(d: Path) -> None:
    """module_shapes claims a different rank than the cores hold."""
    def fn(cfg):
        name = sorted(cfg["module_shapes"])[0]
        rows, cols = cfg["module_shapes"][name]["a"]
        cfg["module_shapes"][name]["a"] = [rows, cols * 2]
    edit_json(d / ADAPTER_CFG, fn)


def modes_mismatch_ours(d: Path) -> None:
    """A core of the first module's A factor loses a mode (shape does not match the chain)."""
    def fn(state):
        key = sorted(k for k in state if ".lora_A.tt_cores.1" in k)[0]
        state[key] = state[key][:, :-1, :].contiguous()
    edit_tensors(d / ADAPTER_ST, fn)


# --------------------------------------------------------------------------- the table

Culprit = Callable[["Env", Path], "str | tuple[str, ...]"]


@dataclass
class Case:
    command: str               # the table's row: merge, lora-to-tt, tt-to-lora, onnx, ...
    name: str
    argv: Callable[[Env, Path], list[str]]   # (env, case dir) -> argv; OUT is case_dir/"out"
    expect: tuple[str, ...]    # substrings (case-insensitive) the error line must contain
    prepare: Callable[[Env, Path], None] | None = None
    out: str = "out"           # output path relative to case dir ("" when the command has none)
    code: int = 2
    # the offending input(s) the line must name verbatim (tests/hint_rule.py, rule (a))
    culprit: Culprit | None = None
    # optional packages made unimportable for the case (a missing dependency, simulated)
    hide: tuple[str, ...] = ()


CASES: list[Case] = []


def case(command, name, argv, expect, prepare=None, *, culprit: Culprit, **kw):
    CASES.append(Case(command, name, argv, tuple(expect), prepare, culprit=culprit, **kw))


def prep(src: str, fn: Callable[[Path], None] | None = None):
    def go(e: Env, d: Path) -> None:
        target = _copy(getattr(e, src), d / "in")
        if fn is not None:
            fn(target)
    return go


def not_a_dir_of_anything(e: Env, d: Path) -> None:
    (d / "in").mkdir()
    (d / "in" / "notes.txt").write_text("hello")


OUT = lambda d: str(d / "out")  # noqa: E731

# culprits: the input as the case's argv gives it, or the file/tensor/module/value inside it
IN = lambda e, d: str(d / "in")  # noqa: E731
OUT_PATH = lambda e, d: str(d / "out")  # noqa: E731


def inside(name: str) -> Culprit:
    return lambda e, d: str(d / "in" / name)


def lit(*names: str) -> Culprit:
    return lambda e, d: names


def env_path(attr: str) -> Culprit:
    return lambda e, d: str(getattr(e, attr))


def shard_in(k: int) -> Culprit:
    """The k-th shard of the damaged copy, as a path inside the given directory."""
    return lambda e, d: str(d / "in" / _shards(e.base)[k].name)


def shard_name(k: int) -> Culprit:
    return lambda e, d: _shards(e.base)[k].name


Q_PROJ = "model.layers.0.self_attn.q_proj"

# Each input family is tried against every command that reads it.
BASE_CASES = [  # (name, prepare, expect, culprit)
    ("nonexistent", None, ("does not exist",), IN),
    ("not-a-model", not_a_dir_of_anything, ("in",), IN),
    ("truncated-shard", prep("base", lambda t: truncate(_shards(t)[1])), ("model-00002",), shard_in(1)),
    ("corrupt-header", prep("base", lambda t: corrupt_header(_shards(t)[0])), ("model-00001",), shard_in(0)),
    ("missing-shard", prep("base", lambda t: _shards(t)[-1].unlink()), ("missing",), shard_name(-1)),
    ("index-escapes", prep("base", index_escape), ("x.safetensors", "outside"), lit("../x.safetensors")),
    ("shard-symlink-outside", prep("base", lambda t: link_outside(t, _shards(t)[0].name)),
     ("model-00001",), shard_name(0)),
    ("malformed-index", prep("base", lambda t: (t / "model.safetensors.index.json").write_text("{\"weight_map\": ")),
     ("model.safetensors.index.json",), inside("model.safetensors.index.json")),
    ("malformed-config", prep("base", lambda t: (t / "config.json").write_text("{model_type: llama")),
     ("config.json",), inside("config.json")),
]

ADAPTER_CASES = {  # kind -> [(name, prepare, expect, culprit)]
    "common": [
        ("nonexistent", None, ("does not exist",), IN),
        ("not-an-adapter", not_a_dir_of_anything, (ADAPTER_CFG,), IN),
        ("truncated", lambda k: prep(k, lambda t: truncate(t / ADAPTER_ST)), (ADAPTER_ST,), inside(ADAPTER_ST)),
        ("corrupt-header", lambda k: prep(k, lambda t: corrupt_header(t / ADAPTER_ST)), (ADAPTER_ST,),
         inside(ADAPTER_ST)),
        ("nan", lambda k: prep(k, lambda t: edit_tensors(t / ADAPTER_ST, poison(float("nan")))),
         ("NaN",), inside(ADAPTER_ST)),
        ("inf", lambda k: prep(k, lambda t: edit_tensors(t / ADAPTER_ST, poison(float("inf")))),
         ("Inf",), inside(ADAPTER_ST)),
        ("unknown-peft-type", lambda k: prep(k, lambda t: edit_json(t / ADAPTER_CFG,
                                                                     lambda c: c.update(peft_type="IA3"))),
         ("IA3", ADAPTER_CFG), inside(ADAPTER_CFG)),
        ("malformed-json", lambda k: prep(k, lambda t: (t / ADAPTER_CFG).write_text('{"peft_type": "LORA",')),
         (ADAPTER_CFG, "line"), inside(ADAPTER_CFG)),
        ("pickle-bin", lambda k: prep(k, to_unsafe_bin), ("adapter_model.bin", "unpickl"),
         inside("adapter_model.bin")),
        ("symlink-outside", lambda k: prep(k, lambda t: link_outside(t, ADAPTER_ST)),
         (ADAPTER_ST, "outside"), inside(ADAPTER_ST)),
    ],
    "rep": [
        ("rank-mismatch", lambda k: prep(k, rank_mismatch_ours), ("model.layers.0",), lit(Q_PROJ)),
        ("mode-mismatch", lambda k: prep(k, modes_mismatch_ours), ("model.layers.0",), lit(Q_PROJ)),
    ],
    "lora": [
        ("rank-mismatch", lambda k: prep(k, lambda t: edit_json(t / ADAPTER_CFG, lambda c: c.update(r=8))),
         ("lora_A", "r = 8"), lit(Q_PROJ)),
    ],
}


def _adapter_cases(kind: str):
    for name, make, expect, culprit in ADAPTER_CASES["common"] + ADAPTER_CASES.get(kind, []):
        if name in ("nonexistent",) or make is not_a_dir_of_anything:
            yield name, make, expect, culprit
        else:
            yield name, make(kind), expect, culprit


def _output_cases(command: str, argv_for_out: Callable[[Env, Path, str], list[str]]):
    """Output exists (untouched), output is a file, output parent not writable."""
    def exists(e, d):
        (d / "out").mkdir()
        (d / "out" / "precious").write_text("keep me")

    def is_file(e, d):
        (d / "out").write_text("a file")

    case(command, "output-exists", lambda e, d: argv_for_out(e, d, str(d / "out")), ("out", "--force"),
         exists, culprit=OUT_PATH)
    case(command, "output-is-a-file", lambda e, d: argv_for_out(e, d, str(d / "out")) + ["--force"],
         ("out", "file"), is_file, culprit=OUT_PATH)
    case(command, "output-unwritable", lambda e, d: argv_for_out(e, d, "/proc/loretta-out"),
         ("/proc",), out="/proc/loretta-out", culprit=lit("/proc/loretta-out"))


# ---- merge
for name, make, expect, who in BASE_CASES:
    case("merge", f"base-{name}", (lambda e, d: ["merge", str(d / "in"), str(e.lora), "-o", OUT(d)]),
         expect, make, culprit=who)
for kind in ("lora", "rep"):
    for name, make, expect, who in _adapter_cases(kind):
        case("merge", f"{kind}-{name}", (lambda e, d: ["merge", str(e.base), str(d / "in"), "-o", OUT(d)]),
             expect, make, culprit=who)
# a fully fine-tuned checkpoint as an input (merge/full.py): read like a base, so the same
# damage; and the refusals of its own
for name, make, expect, who in BASE_CASES[2:]:
    case("merge", f"finetune-{name}", (lambda e, d: ["merge", str(e.base), str(d / "in"), "-o", OUT(d)]),
         expect, make, culprit=who)


def _other_vocabulary(e: Env, d: Path) -> None:
    import transformers

    cfg = transformers.LlamaConfig.from_pretrained(e.base)
    cfg.vocab_size = 130
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "in", max_shard_size="40KB")


case("merge", "finetune-vocabulary", lambda e, d: ["merge", str(e.base), str(d / "in"), "-o", OUT(d)],
     ("another vocabulary", "(130, 64)", "resize_token_embeddings"), _other_vocabulary,
     culprit=lambda e, d: (str(d / "in"), "model.embed_tokens.weight"))
case("merge", "finetune-nan", lambda e, d: ["merge", str(e.base), str(d / "in"), "-o", OUT(d)],
     ("NaN",), prep("base", lambda t: edit_tensors(_shards(t)[0], poison(float("nan")))), culprit=IN)
def _extra_tensor(t: Path) -> None:
    """A task head the base lacks, in the first shard and the index."""
    edit_tensors(_shards(t)[0], lambda st_: st_.update({"score.weight": torch.zeros(2, 64)}))
    edit_json(t / "model.safetensors.index.json",
              lambda c: c["weight_map"].update({"score.weight": _shards(t)[0].name}))


case("merge", "finetune-extra-tensor", lambda e, d: ["merge", str(e.base), str(d / "in"), "-o", OUT(d)],
     ("score.weight",), prep("base", _extra_tensor),
     culprit=lambda e, d: (str(d / "in"), "score.weight"))
case("merge", "adapter-wrong-width", lambda e, d: ["merge", str(e.base), str(e.rep_wide), "-o", OUT(d)],
     ("model.layers.0", "48"), culprit=env_path("rep_wide"))
case("merge", "adapter-missing-modules", lambda e, d: [f"{e.base}+{e.lora_gpt2}", "-o", OUT(d)],
     ("c_attn",), culprit=env_path("lora_gpt2"))
case("merge", "adp-adapter", lambda e, d: ["merge", str(e.base), str(e.adp), "-o", OUT(d)], ("adp",),
     culprit=env_path("adp"))
case("merge", "dtype-int7", lambda e, d: ["merge", str(e.base), str(e.lora), "-o", OUT(d), "--dtype", "int7"],
     ("int7", "--dtype"), culprit=lit("int7"))
case("merge", "device-tpu", lambda e, d: ["merge", str(e.base), str(e.lora), "-o", OUT(d), "--device", "tpu"],
     ("tpu", "cpu"), culprit=lit("'tpu'"))
case("merge", "device-cuda", lambda e, d: ["merge", str(e.base), str(e.lora), "-o", OUT(d), "--device", "cuda"],
     ("cuda", "--device cpu"), culprit=lit("'cuda'"))
case("merge", "weights-count", lambda e, d: ["merge", str(e.base), str(e.lora), "-o", OUT(d), "--weights",
                                             "0.5,0.5"], ("--weights",), culprit=lit("--weights"))
case("merge", "weights-garbage", lambda e, d: ["merge", str(e.base), str(e.lora), "-o", OUT(d), "--weights",
                                               "half"], ("--weights",), culprit=lit("'half'"))
case("merge", "shard-size-garbage", lambda e, d: ["merge", str(e.base), str(e.lora), "-o", OUT(d),
                                                  "--max-shard-size", "huge"], ("huge",), culprit=lit("'huge'"))
case("merge", "lora-key-prefix", lambda e, d: ["merge", str(e.base), str(d / "in"), "-o", OUT(d)],
     ("base_model.model.",),
     prep("lora", lambda t: edit_tensors(t / ADAPTER_ST, lambda st_: st_.update(
         {k.replace("base_model.model.", "", 1): st_.pop(k) for k in list(st_)}))), culprit=inside(ADAPTER_ST))
case("merge", "empty-adapter-in-spec", lambda e, d: [f"{e.base}++{e.lora}", "-o", OUT(d)], ("+",),
     culprit=lambda e, d: f"{e.base}++{e.lora}")
case("merge", "no-adapter", lambda e, d: ["merge", str(e.base), "-o", OUT(d)], ("adapter",),
     culprit=env_path("base"))
_output_cases("merge", lambda e, d, o: ["merge", str(e.base), str(e.lora), "-o", o])

# ---- convert lora-to-tt
L2T = lambda e, d, src=None, o=None: ["convert", "lora-to-tt", src or str(d / "in"), "-o",  # noqa: E731
                                       o or OUT(d), "--tensor-rank", "2"]
for name, make, expect, who in _adapter_cases("lora"):
    case("lora-to-tt", name, lambda e, d: L2T(e, d), expect, make, culprit=who)
case("lora-to-tt", "given-a-tt-adapter", lambda e, d: L2T(e, d, str(e.rep)), ("LoRA",), culprit=env_path("rep"))
case("lora-to-tt", "device-tpu", lambda e, d: L2T(e, d, str(e.lora)) + ["--device", "tpu"], ("tpu", "cpu"),
     culprit=lit("'tpu'"))
case("lora-to-tt", "device-cuda", lambda e, d: L2T(e, d, str(e.lora)) + ["--device", "cuda"],
     ("cuda", "--device cpu"), culprit=lit("'cuda'"))
case("lora-to-tt", "eps-out-of-range", lambda e, d: L2T(e, d, str(e.lora)) + ["--eps", "1.5"], ("eps",),
     culprit=lit("--eps", "1.5"))
case("lora-to-tt", "no-rank-or-eps", lambda e, d: L2T(e, d, str(e.lora))[:-2], ("--tensor-rank", "--eps"),
     culprit=lit("--tensor-rank", "--eps"))
case("lora-to-tt", "tensor-rank-zero", lambda e, d: L2T(e, d, str(e.lora))[:-1] + ["0"], ("rank",),
     culprit=lit("--tensor-rank"))
_output_cases("lora-to-tt", lambda e, d, o: L2T(e, d, str(e.lora), o))

# ---- convert tt-to-lora
T2L = lambda e, d, src=None, o=None: ["convert", "tt-to-lora", src or str(d / "in"), "-o", o or OUT(d)]  # noqa: E731
for name, make, expect, who in _adapter_cases("rep"):
    case("tt-to-lora", name, lambda e, d: T2L(e, d), expect, make, culprit=who)
case("tt-to-lora", "given-an-adp-adapter", lambda e, d: T2L(e, d, str(e.adp)), ("adp",), culprit=env_path("adp"))
case("tt-to-lora", "given-a-peft-lora", lambda e, d: T2L(e, d, str(e.lora)), ("LoRA",), culprit=env_path("lora"))
case("tt-to-lora", "rank-zero", lambda e, d: T2L(e, d, str(e.rep)) + ["--rank", "0"], ("rank",),
     culprit=lit("--rank"))
_output_cases("tt-to-lora", lambda e, d, o: T2L(e, d, str(e.rep), o))

# ---- export safetensors
EST = lambda e, d, src=None, o=None: ["export", "safetensors", src or str(d / "in"), "-o", o or OUT(d)]  # noqa: E731
for name, make, expect, who in BASE_CASES:
    if name == "malformed-config":
        continue  # re-sharding copies config.json as a file; it does not parse it
    case("export-safetensors", f"base-{name}", lambda e, d: EST(e, d), expect, make, culprit=who)
case("export-safetensors", "dtype-int7", lambda e, d: EST(e, d, str(e.base)) + ["--dtype", "int7"], ("int7",),
     culprit=lit("int7"))
case("export-safetensors", "shard-size-garbage",
     lambda e, d: EST(e, d, str(e.base)) + ["--max-shard-size", "lots"], ("lots",), culprit=lit("'lots'"))
_output_cases("export-safetensors", lambda e, d, o: EST(e, d, str(e.base), o))

# ---- export onnx (every case must fail before any export work)
EOX = lambda e, d, src=None, o=None: ["export", "onnx", src or str(d / "in"), "-o", o or OUT(d)]  # noqa: E731
for name, make, expect, who in BASE_CASES:
    case("export-onnx", f"base-{name}", lambda e, d: EOX(e, d), expect, make, culprit=who)
case("export-onnx", "dtype-int7", lambda e, d: EOX(e, d, str(e.base)) + ["--dtype", "int7"], ("int7",),
     culprit=lit("int7"))
case("export-onnx", "adapter-wrong-width",
     lambda e, d: EOX(e, d, str(e.base)) + ["--adapter", str(e.rep_wide)], ("model.layers.0",), culprit=lit(Q_PROJ))
case("export-onnx", "adapter-nan",
     lambda e, d: EOX(e, d, str(e.base)) + ["--adapter", str(d / "in")], ("NaN",),
     prep("rep", lambda t: edit_tensors(t / ADAPTER_ST, poison(float("nan")))), culprit=inside(ADAPTER_ST))
case("export-onnx", "adapter-is-peft-lora",
     lambda e, d: EOX(e, d, str(e.base)) + ["--adapter", str(e.lora)], ("LoRA",), culprit=env_path("lora"))
case("export-onnx", "opset-99", lambda e, d: EOX(e, d, str(e.base)) + ["--opset", "99"], ("opset",),
     culprit=lit("--opset", "99"))
case("export-onnx", "with-past-on-encoder", lambda e, d: EOX(e, d, str(e.base)) + ["--with-past", "--task",
                                                                                   "feature-extraction"],
     ("--with-past",), culprit=lit("--with-past"))
case("export-onnx", "atol-negative", lambda e, d: EOX(e, d, str(e.base)) + ["--atol", "-1"], ("atol",),
     culprit=lit("--atol"))
_output_cases("export-onnx", lambda e, d, o: EOX(e, d, str(e.base), o))

# ---- inspect (no output)
for name, make, expect, who in _adapter_cases("rep"):
    if name in ("not-an-adapter",):
        expect = ("in",)
    case("inspect", f"rep-{name}", lambda e, d: ["inspect", str(d / "in")], expect, make, out="", culprit=who)
for name, make, expect, who in BASE_CASES[2:6] + BASE_CASES[7:]:
    case("inspect", f"base-{name}", lambda e, d: ["inspect", str(d / "in")], expect, make, out="", culprit=who)
case("inspect", "config-malformed", lambda e, d: ["inspect", "--config", str(d / "in" / "config.json"),
                                                  "--method", "rep"], ("config.json",),
     prep("base", lambda t: (t / "config.json").write_text("{oops")), out="", culprit=inside("config.json"))
case("inspect", "config-unknown-model-type",
     lambda e, d: ["inspect", "--config", str(d / "in" / "config.json"), "--method", "adp"],
     ("not-a-model-type",),
     prep("base", lambda t: edit_json(t / "config.json", lambda c: c.update(model_type="not-a-model-type"))),
     out="", culprit=inside("config.json"))
case("inspect", "config-without-method", lambda e, d: ["inspect", "--config", str(e.base / "config.json")],
     ("--method",), out="", culprit=lit("--method"))
case("inspect", "path-and-config", lambda e, d: ["inspect", str(e.rep), "--config", str(e.base)],
     ("--config",), out="", culprit=lit("--config"))
case("inspect", "nothing-given", lambda e, d: ["inspect"], ("PATH",), out="", culprit=lit("PATH", "--config"))
case("inspect", "adapter-with-count-options", lambda e, d: ["inspect", str(e.rep), "--tensor-rank", "3"],
     ("--tensor-rank", "--config only"), out="", culprit=lit("--tensor-rank"))
case("inspect", "model-with-method", lambda e, d: ["inspect", str(e.base), "--method", "rep"],
     ("--method", "--config"), out="", culprit=lit("--method"))


# ---- train (bad data; every case must fail before training starts)
def _train(e: Env, d: Path, data: str | None = None, *extra: str, model: str | None = None) -> list[str]:
    return ["train", "--model", model or str(e.base), "--train-file", data or str(d / "data.csv"),
            "-o", OUT(d), "--max-steps", "1", "--eval-split", "0", "-q", *extra]


def data_file(name: str, text: str):
    def go(e: Env, d: Path) -> None:
        (d / name).write_text(text)
    return go


def data_at(name: str, *more: str) -> Culprit:
    return lambda e, d: (str(d / name), *more)


case("train", "model-not-a-model", lambda e, d: _train(e, d, str(e.data), model=str(d / "in")), ("in",),
     not_a_dir_of_anything, culprit=IN)
case("train", "model-malformed-config", lambda e, d: _train(e, d, str(e.data), model=str(d / "in")),
     ("config.json",), prep("base", lambda t: (t / "config.json").write_text("{nope")),
     culprit=inside("config.json"))
case("train", "missing-column", lambda e, d: _train(e, d), ("label",),
     data_file("data.csv", "text,stars\n" + "the film,1\nthe plot,0\n" * 4), culprit=data_at("data.csv", "'label'"))
case("train", "missing-text-column", lambda e, d: _train(e, d, None, "--text-column", "review"),
     ("review",), data_file("data.csv", "text,label\n" + "the film,1\nthe plot,0\n" * 4),
     culprit=data_at("data.csv", "'review'"))
case("train", "empty-file", lambda e, d: _train(e, d), ("data.csv",), data_file("data.csv", ""),
     culprit=data_at("data.csv"))
case("train", "header-only", lambda e, d: _train(e, d), ("data.csv",), data_file("data.csv", "text,label\n"),
     culprit=data_at("data.csv"))
case("train", "labels-exceed-num-labels", lambda e, d: _train(e, d, None, "--num-labels", "2"),
     ("label",), data_file("data.csv", "text,label\n" + "a,0\nb,1\nc,5\nd,1\n" * 2),
     culprit=data_at("data.csv", "label 5"))
case("train", "non-string-text", lambda e, d: _train(e, d, str(d / "data.jsonl")), ("text",),
     data_file("data.jsonl", '{"text": 3, "label": 0}\n{"text": ["a"], "label": 1}\n' * 4),
     culprit=data_at("data.jsonl", "'text'"))
case("train", "malformed-jsonl", lambda e, d: _train(e, d, str(d / "data.jsonl")), ("data.jsonl",),
     data_file("data.jsonl", '{"text": "a", "label": 0}\n{"text": \n'), culprit=data_at("data.jsonl", "line 2"))
case("train", "unknown-extension", lambda e, d: _train(e, d, str(d / "data.xlsx")), ("data.xlsx",),
     data_file("data.xlsx", "text,label\na,0\n"), culprit=data_at("data.xlsx"))
case("train", "train-file-missing", lambda e, d: _train(e, d, str(d / "nope.csv")), ("nope.csv",),
     culprit=data_at("nope.csv"))
case("train", "batch-size-zero", lambda e, d: _train(e, d, str(e.data), "--batch-size", "0"), ("batch",),
     culprit=lit("--batch-size"))
case("train", "negative-epochs", lambda e, d: _train(e, d, str(e.data), "--epochs", "-1"), ("epochs",),
     culprit=lit("--epochs"))
case("train", "eval-split-one", lambda e, d: _train(e, d, str(e.data))[:-3] + ["--eval-split", "1", "-q"],
     ("eval",), culprit=lit("--eval-split"))
case("train", "model-without-tokenizer", lambda e, d: _train(e, d, str(e.data)), ("tokenizer",),
     culprit=env_path("base"))  # the loader's multi-line reason must still print as one line
case("train", "output-is-a-file", lambda e, d: _train(e, d, str(e.data)), ("out",),
     lambda e, d: (d / "out").write_text("a file"), culprit=OUT_PATH)
case("train", "output-unwritable", lambda e, d: _train(e, d, str(e.data)) + ["-o", "/proc/loretta-out"],
     ("/proc",), out="/proc/loretta-out", culprit=lit("/proc/loretta-out"))

# ---- missing optional dependencies (issue 16): the import of each package fails as if it
# were not installed; the command must say which package and give the `pip install` line
def _dep_case(command: str, module: str, argv, *, pip: str) -> None:
    case(command, f"missing-{module}", argv, ("pip install", pip), culprit=lit(f"'{module}'"),
         hide=(module,))


_dep_case("export-onnx", "onnx", lambda e, d: EOX(e, d, str(e.base)), pip="loretta-merge[onnx]")
_dep_case("export-onnx", "onnxruntime", lambda e, d: EOX(e, d, str(e.base)), pip="loretta-merge[onnx]")
_dep_case("merge", "peft", lambda e, d: ["merge", str(e.base), str(e.lora), "-o", OUT(d), "--verify", "-q"],
          pip="peft")
_dep_case("train", "accelerate", lambda e, d: _train(e, d, str(e.data)), pip="loretta-merge[train]")


# --------------------------------------------------------------------------- running

def _tree_digest(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    return run_main(argv, capsys)


def culprits_of(c: Case, env: Env, d: Path) -> tuple[str, ...]:
    assert c.culprit is not None, f"case {c.command}:{c.name} declares no culprit"
    got = c.culprit(env, d)
    return (got,) if isinstance(got, str) else tuple(got)


def check_error(code: int, err: str, expect: tuple[str, ...], *, want_code: int | None = 2,
                culprits: tuple[str, ...] = ()) -> str:
    assert code != 0, f"exit code 0; stderr: {err!r}"
    if want_code is not None:
        assert code == want_code, (code, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error: ") and len(line) > len("error: ") + 10, line
    for word in expect:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    problems = rule_problems(line, culprits)
    assert not problems, f"{line!r}: " + "; ".join(problems)
    return line


# "command:case" -> why it still fails, for a case whose fix is not in yet (none today).
# strict: the mark must come off as soon as the fix lands.
KNOWN_FAILURES: dict[str, str] = {}


def _param(c: Case):
    cid = f"{c.command}:{c.name}"
    marks = [pytest.mark.xfail(reason=KNOWN_FAILURES[cid], strict=True)] if cid in KNOWN_FAILURES else []
    return pytest.param(c, id=cid, marks=marks)


@pytest.mark.parametrize("c", [_param(c) for c in CASES])
def test_corpus(c: Case, env: Env, tmp_path: Path, capsys, monkeypatch) -> None:
    d = tmp_path
    for module in c.hide:  # `import module` now fails as if the package were not installed
        monkeypatch.setitem(sys.modules, module, None)
    if c.prepare is not None:
        c.prepare(env, d)
    out = Path(c.out) if c.out.startswith("/") else (d / c.out if c.out else None)
    before = _tree_digest(out) if out is not None and out.exists() else None
    argv = c.argv(env, d)
    code, _, err = run_cli(argv, capsys)
    check_error(code, err, c.expect, want_code=c.code, culprits=culprits_of(c, env, d))
    if out is not None:
        if before is None:
            assert not out.exists(), f"{out} was left behind"
        else:
            assert _tree_digest(out) == before, f"{out} was changed"
        if out.parent.exists() and str(out.parent) != "/proc":
            stray = [p.name for p in out.parent.iterdir() if ".loretta-" in p.name]
            assert not stray, stray


def test_unsafe_pickle_accepted_with_flag(env: Env, tmp_path: Path, capsys) -> None:
    """The same pickled .bin the corpus refuses is read with --allow-unsafe-pickle."""
    lora = _copy(env.lora, tmp_path / "lora-bin")
    to_unsafe_bin(lora)
    code, _, err = run_cli(["convert", "lora-to-tt", str(lora), "-o", str(tmp_path / "tt"),
                            "--tensor-rank", "2", "--allow-unsafe-pickle"], capsys)
    assert code == 0, err
    assert (tmp_path / "tt" / ADAPTER_ST).is_file()
    code, _, err = run_cli(["merge", str(env.base), str(lora), "-o", str(tmp_path / "merged"), "-q",
                            "--allow-unsafe-pickle"], capsys)
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()


def test_corpus_table(capsys) -> None:
    """Print the number of bad inputs tried per command (runs after the corpus)."""
    table = collections.Counter(c.command for c in CASES)
    with capsys.disabled():
        print("\nbad inputs per command: " + ", ".join(f"{k} {v}" for k, v in sorted(table.items()))
              + f"; total {sum(table.values())}")
    assert set(table) == {"merge", "lora-to-tt", "tt-to-lora", "export-onnx", "export-safetensors",
                          "train", "inspect"}
    assert all(v >= 10 for v in table.values()), table


# --------------------------------------------------------------------------- real console

def _console(argv: list[str], *, debug: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("LORETTA_DEBUG", None)
    cmd = [sys.executable, "-m", "loretta_merge.cli"] + (["--debug"] if debug else []) + argv
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


SUBPROCESS = ["merge:lora-nan", "tt-to-lora:pickle-bin", "export-safetensors:base-truncated-shard",
              "merge:device-cuda"]


@pytest.mark.parametrize("cid", SUBPROCESS)
def test_console_one_line(cid: str, env: Env, tmp_path: Path) -> None:
    c = next(c for c in CASES if f"{c.command}:{c.name}" == cid)
    if c.prepare is not None:
        c.prepare(env, tmp_path)
    proc = _console(c.argv(env, tmp_path))
    check_error(proc.returncode, proc.stderr, c.expect, want_code=2,
                culprits=culprits_of(c, env, tmp_path))
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()


def test_console_debug_shows_traceback(env: Env, tmp_path: Path) -> None:
    c = next(c for c in CASES if f"{c.command}:{c.name}" == "merge:lora-nan")
    c.prepare(env, tmp_path)
    proc = _console(c.argv(env, tmp_path), debug=True)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "NumericsError" in proc.stderr and "NaN" in proc.stderr
    assert not (tmp_path / "out").exists()
