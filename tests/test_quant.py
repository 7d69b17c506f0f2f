"""Quantized bases, each made by its format's own package on a tiny Llama: (a) every weight
loretta-merge dequantizes equals the package's own dequantization; (b) merging a PEFT LoRA
(and a LoRETTA rep adapter) through the CLI gives the logits of the adapter applied to the
dequantized model.

bitsandbytes and compressed-tensors run here (the ``test`` extra installs them), torchao in a
child process (`make setup` keeps it beside site-packages: fixtures/side_packages.py);
GPTQ and AWQ bases are the committed fixtures in fixtures/quant/, made by gptqmodel with
its own dequantization saved beside them (``make_gptq_awq.py`` regenerates all of it).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import perturb_trainable, probe_inputs, run_main
from fixtures.quant.package_quantizers import QUANTIZERS
from fixtures.side_packages import package_version, run_with
from loretta_merge.io import CheckpointReader, read_model_config
from loretta_merge.quant import DequantizedReader, open_base

FIXTURES = Path(__file__).parent / "fixtures" / "quant"
BASE = FIXTURES / "base"  # the unquantized tiny Llama every format is made from
PACKAGE_FORMATS = ["bnb-nf4", "bnb-fp4", "bnb-nf4-dq", "bnb-fp4-dq", "bnb-int8",
                   "torchao-int8", "torchao-int4", "torchao-fp8",
                   "ct-fp8", "ct-int8", "ct-w4a16", "ct-w4a16-asym"]
FIXTURE_FORMATS = ["gptq", "gptq-actorder", "awq"]
FORMATS = PACKAGE_FORMATS + FIXTURE_FORMATS
TORCHAO_KINDS = ("int8", "int4", "fp8")
PACKAGE = {"bnb": "bitsandbytes", "torchao": "torchao", "ct": "compressed_tensors"}
LOGIT_TOL = 2e-2  # issue #18: merged vs PEFT on the dequantized model, absolute


# --------------------------------------------------------------------------- making bases

def make_quantized(fmt: str, out: Path) -> Path:
    family, kind = fmt.split("-", 1)
    if family == "torchao":  # a side package: one child process makes every kind and its
        # reference dequantization (fixtures/side_packages.py, fixtures/quant/side_tools.py)
        run_with("torchao", [str(FIXTURES / "side_tools.py"), "torchao", str(BASE), str(out.parent),
                             *TORCHAO_KINDS])
        return out.parent / kind / "model"
    pytest.importorskip(PACKAGE[family], reason=f"{PACKAGE[family]} is not installed (pip install "
                                                f"'loretta-merge[test]')")
    QUANTIZERS[family](BASE, out, kind)
    return out


@pytest.fixture(scope="session")
def quant_base(tmp_path_factory):
    """Factory: ``quant_base("bnb-nf4")`` -> a quantized checkpoint directory (read-only)."""
    cache: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if fmt in FIXTURE_FORMATS:
            return FIXTURES / fmt
        if fmt not in cache:
            if fmt.startswith("torchao-"):  # all kinds at once
                made = tmp_path_factory.mktemp("torchao") / "model"
                make_quantized(fmt, made)
                cache.update({f"torchao-{k}": made.parent / k / "model" for k in TORCHAO_KINDS})
            else:
                cache[fmt] = make_quantized(fmt, tmp_path_factory.mktemp(fmt) / "model")
        return cache[fmt]

    return get


# --------------------------------------------------------------------------- package references

def package_dequantized(fmt: str, qdir: Path) -> dict[str, torch.Tensor]:
    """{<module>.weight: fp32 (out, in)} as the format's own package dequantizes it."""
    import transformers

    if fmt in FIXTURE_FORMATS:
        from safetensors.torch import load_file

        return load_file(qdir.parent / f"{qdir.name}-reference.safetensors")
    family = fmt.split("-", 1)[0]
    if family == "torchao":  # torchao's own dequantize(), saved by the child that made qdir
        from safetensors.torch import load_file

        return load_file(qdir.parent / "dequantized.safetensors")
    kwargs = {"device_map": "cpu"}
    if family == "ct":
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(qdir, **kwargs)
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        if family == "bnb":
            import bitsandbytes as bnb

            if fmt == "bnb-int8":
                w = bnb.functional.int8_vectorwise_dequant(w.data, w.SCB)
            else:
                w = bnb.functional.dequantize_4bit(w.data, w.quant_state)
        out[f"{name}.weight"] = w.detach().float()
    return out


def _tolerance(fmt: str) -> dict:
    if fmt == "bnb-int8":  # bnb multiplies by 7.874015718698502e-3, we divide by 127
        return {"rtol": 1e-6, "atol": 0}
    return {"rtol": 0, "atol": 0}


def _round(fmt: str, t: torch.Tensor) -> torch.Tensor:
    """gptqmodel dequantizes in fp16 (its scales' dtype): compare after that one rounding."""
    return t.half().float() if fmt in FIXTURE_FORMATS else t


def open_quantized(qdir: Path) -> DequantizedReader:
    reader = open_base(qdir, read_model_config(qdir), CheckpointReader(qdir))
    assert reader is not None, f"{qdir} was not detected as quantized"
    return reader


# --------------------------------------------------------------------------- (a) dequantization

@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_weights_equal_the_package_dequantization(fmt, quant_base):
    qdir = quant_base(fmt)
    want = package_dequantized(fmt, qdir)
    with open_quantized(qdir) as reader:
        assert sorted(reader.layout.weights) == sorted(want)  # every Linear but lm_head
        hidden = set(CheckpointReader(qdir).keys()) - set(reader.keys())
        assert all(k not in reader for k in hidden)
        for name, ref in want.items():
            got = reader.get(name)
            assert got.dtype == torch.float32 and reader.dtype(name) == torch.float32
            assert tuple(got.shape) == reader.shape(name) == tuple(ref.shape)
            torch.testing.assert_close(_round(fmt, got), ref, **_tolerance(fmt), msg=name)
        plain = CheckpointReader(BASE)
        assert sorted(reader.keys()) == sorted(plain.keys())  # the logical checkpoint
        for key in set(plain.keys()) - set(want):  # embeddings, norms, lm_head: untouched
            stored = reader.dtype(key)  # (gptqmodel saves them in bf16)
            same = torch.equal(reader.get(key), plain.get(key).to(stored))
            # AWQ folds activation scales into the norms before its Linears
            assert same != (fmt == "awq" and key.endswith("layernorm.weight")), key


# --------------------------------------------------------------------------- (b) merge vs PEFT

def reference_model(fmt: str, qdir: Path):
    """The tiny Llama holding the package-dequantized weights (and the checkpoint's plain
    tensors), fp32: the model an adapter for this base is applied to."""
    import transformers

    config = {k: v for k, v in json.loads((BASE / "config.json").read_text()).items()}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    state = package_dequantized(fmt, qdir)
    with CheckpointReader(qdir) as raw:
        for key in model.state_dict():
            if key not in state:
                state[key] = raw.get(key).float()
    model.load_state_dict(state, strict=True)
    return model


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def make_peft_lora(model, path: Path, *, base_name: str | None = None, use_dora: bool = False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)  # PEFT's lora_A init draws from the global generator
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=use_dora, target_modules=[
        "q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]))
    perturb_trainable(pm, seed=3, std=0.1)
    if base_name:
        pm.peft_config["default"].base_model_name_or_path = base_name
    pm.save_pretrained(path)
    return pm.eval()


def merged_logits(qdir: Path, adapter: Path, out: Path, capsys, *extra) -> tuple[torch.Tensor, dict]:
    import transformers

    code, stdout, stderr = run_main([f"{qdir}+{adapter}", "-o", out, "--json", *extra], capsys)
    assert code == 0, stderr
    report = json.loads(stdout)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert not (out / "quantize_config.json").exists()
    merged = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return _logits(merged, probe_inputs()), report


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quant-errors.json"


def made_with(fmt: str, qdir: Path) -> str:
    """The package (and version) that quantized this base."""
    if fmt in FIXTURE_FORMATS:  # gptqmodel records itself in the fixture's config
        quantizer = json.loads((qdir / "config.json").read_text())["quantization_config"]["meta"]["quantizer"]
        return " ".join(q.replace(":", " ") for q in quantizer)
    package = PACKAGE[fmt.split("-", 1)[0]]
    return f"{package.replace('_', '-')} {package_version(package)}"


def record_error(kind: str, fmt: str, qdir: Path, worst: float, **extra: float) -> None:
    """With LORETTA_RECORD_RESULTS=1, put this measured error into
    benchmarks/results/quant-errors.json (docs/quantized.md's table is rendered from it); otherwise
    nothing is written. Safe under pytest-xdist: the file is locked while it is updated."""
    if os.environ.get("LORETTA_RECORD_RESULTS") != "1":
        return
    with open(Path(tempfile.gettempdir()) / "loretta-quant-errors.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {
            "source": "tests/test_quant.py with LORETTA_RECORD_RESULTS=1",
            "logit_tolerance": LOGIT_TOL, "errors": {}}
        data["errors"][f"{kind}/{fmt}"] = {"kind": kind, "format": fmt, "made_with": made_with(fmt, qdir),
                                           "max_abs_logit_diff": worst, **extra}
        data["errors"] = dict(sorted(data["errors"].items()))
        tmp = RESULTS.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(RESULTS)


WORST: dict[str, float] = {}  # fmt -> measured worst |logit diff| of the LoRA merge


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_lora_through_the_cli_matches_peft_on_the_dequantized_model(fmt, quant_base, tmp_path,
                                                                         capsys):
    qdir = quant_base(fmt)
    ref = reference_model(fmt, qdir)
    before = _logits(ref, probe_inputs())
    peft_model = make_peft_lora(ref, tmp_path / "lora", base_name=str(qdir))
    want = _logits(peft_model, probe_inputs())
    assert float((want - before).abs().max()) > 0.1  # the adapter matters
    got, report = merged_logits(qdir, tmp_path / "lora", tmp_path / "out", capsys)
    assert report["merged_tensors"] == 2 * 5
    worst = float((got - want).abs().max())
    WORST[fmt] = worst
    record_error("lora", fmt, qdir, worst, adapter_moves_logits_by=float((want - before).abs().max()),
                 max_abs_logit=float(want.abs().max()))
    print(f"\n[quant] {fmt}: LoRA merged vs PEFT on dequantized: max |logit diff| {worst:.2e} "
          f"(the LoRA moves logits by up to {float((want - before).abs().max()):.2f}, "
          f"logits up to {float(want.abs().max()):.2f})")
    assert worst < LOGIT_TOL


@pytest.mark.parametrize("fmt", ["bnb-nf4", "ct-w4a16-asym", "gptq-actorder"])
def test_merge_rep_adapter_matches_the_loretta_model(fmt, quant_base, tmp_path, capsys):
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    qdir = quant_base(fmt)
    torch.manual_seed(0)
    model = get_loretta_model(reference_model(fmt, qdir), RepConfig(r=4, lora_alpha=8, tensor_rank=3))
    model = perturb_trainable(model, seed=1).eval()
    save_loretta_adapter(model, tmp_path / "rep")
    want = _logits(model, probe_inputs())
    got, report = merged_logits(qdir, tmp_path / "rep", tmp_path / "out", capsys)
    worst = float((got - want).abs().max())
    record_error("rep", fmt, qdir, worst)
    print(f"\n[quant] {fmt}: rep merged vs LoRETTA model on dequantized: max |logit diff| {worst:.2e}")
    assert report["merged_tensors"] > 0 and worst < LOGIT_TOL


@pytest.mark.parametrize("fmt", ["bnb-nf4-dq", "awq"])
def test_merge_dora_matches_peft_on_the_dequantized_model(fmt, quant_base, tmp_path, capsys):
    qdir = quant_base(fmt)
    peft_model = make_peft_lora(reference_model(fmt, qdir), tmp_path / "dora", base_name=str(qdir),
                                use_dora=True)
    want = _logits(peft_model, probe_inputs())
    got, report = merged_logits(qdir, tmp_path / "dora", tmp_path / "out", capsys)
    worst = float((got - want).abs().max())
    record_error("dora", fmt, qdir, worst)
    print(f"\n[quant] {fmt}: DoRA merged vs PEFT on dequantized: max |logit diff| {worst:.2e}")
    assert report["merged_tensors"] == 2 * 5 and worst < LOGIT_TOL


def test_verify_flag_on_a_quantized_base(quant_base, tmp_path, capsys):
    qdir = quant_base("ct-w4a16")
    make_peft_lora(reference_model("ct-w4a16", qdir), tmp_path / "lora")
    code, stdout, stderr = run_main([f"{qdir}+{tmp_path / 'lora'}", "-o", tmp_path / "out",
                                     "--verify", "--json"], capsys)
    assert code == 0, stderr
    verify = json.loads(stdout)["verify"]
    assert verify["passed"] and verify["max_abs_logit_diff"] < LOGIT_TOL


def test_explicit_dtype_is_kept(quant_base, tmp_path, capsys):
    qdir = quant_base("gptq")
    make_peft_lora(reference_model("gptq", qdir), tmp_path / "lora")
    code, _, stderr = run_main([f"{qdir}+{tmp_path / 'lora'}", "-o", tmp_path / "out", "-q",
                                "--dtype", "float32"], capsys)
    assert code == 0, stderr
    with CheckpointReader(tmp_path / "out") as out:
        assert {out.dtype(k) for k in out.keys()} == {torch.float32}
        assert out.shape("model.layers.0.mlp.down_proj.weight") == (64, 128)


def test_errors_are_recorded_only_when_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "RESULTS", tmp_path / "quant-errors.json")
    monkeypatch.delenv("LORETTA_RECORD_RESULTS", raising=False)
    record_error("lora", "gptq", FIXTURES / "gptq", 1e-3)
    assert not (tmp_path / "quant-errors.json").exists()  # a plain test run writes nothing
    monkeypatch.setenv("LORETTA_RECORD_RESULTS", "1")
    record_error("lora", "gptq", FIXTURES / "gptq", 1e-3)
    data = json.loads((tmp_path / "quant-errors.json").read_text())
    assert data["errors"]["lora/gptq"]["max_abs_logit_diff"] == 1e-3
    assert data["errors"]["lora/gptq"]["made_with"].startswith("gptqmodel ")


def test_nibble_lookup_equals_shift_and_mask_unpacking():
    """The byte-table decoder reads the same codes as the shift/mask unpacker, in both nibble
    orders, including rows whose count is not a multiple of 8 (compressed-tensors' padding)."""
    from loretta_merge.quant.base import nibble_lookup, unpack_bits

    g = torch.Generator().manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (5, 3), dtype=torch.int64, generator=g).to(torch.int32)
    table = torch.randn(16, generator=g)
    for count in (24, 21, 17):
        want = table[unpack_bits(words, 4, count).long()]
        got = nibble_lookup(words, table, high_first=False).view(5, -1)[:, :count]
        assert torch.equal(got, want), count
    raw = torch.randint(0, 256, (40,), dtype=torch.uint8, generator=g)
    want = table[torch.stack([raw >> 4, raw & 0xF], dim=-1).reshape(-1).long()]
    assert torch.equal(nibble_lookup(raw, table, high_first=True), want)
