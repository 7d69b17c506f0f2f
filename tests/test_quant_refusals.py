"""Quantized bases that cannot be merged honestly are refused: one line naming the format,
the tensor and shapes where there are some, and what to do instead; nothing is written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import test_quant
from conftest import run_main
from fixtures.side_packages import run_with
from test_quant import BASE, FIXTURES, make_peft_lora

quant_base = test_quant.quant_base  # the fixture, shared with test_quant.py


def refused(args, out: Path, capsys) -> str:
    code, stdout, stderr = run_main(args + ["-o", out], capsys)
    print(stderr, file=sys.__stderr__)  # shown with -s: the messages users get
    assert code == 2, (code, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.loretta-*")), "wrote output"
    return lines[0]


@pytest.fixture(scope="session")
def lora(tmp_path_factory) -> Path:
    """A PEFT LoRA trained (perturbed) on the original, unquantized tiny Llama."""
    path = tmp_path_factory.mktemp("lora") / "lora"
    import transformers

    make_peft_lora(transformers.LlamaForCausalLM.from_pretrained(BASE).eval(), path,
                   base_name=str(BASE))
    return path


def edited(src: Path, dst: Path, *, config=None, drop: str | None = None) -> Path:
    """A copy of checkpoint ``src`` with its quantization_config changed by ``config(qc)``
    or one stored tensor dropped."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data["quantization_config"])
        (dst / "config.json").write_text(json.dumps(data))
    if drop is not None:
        tensors = load_file(dst / "model.safetensors")
        del tensors[drop]
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# --------------------------------------------------------------------------- AWQ

def test_awq_with_an_adapter_trained_on_the_original_model_is_refused(lora, tmp_path, capsys):
    line = refused([f"{FIXTURES / 'awq'}+{lora}", "--awq-adapter-trained-on", "original"],
                   tmp_path / "out", capsys)
    assert "AWQ" in line and "merge into the original model instead" in line
    assert "--awq-adapter-trained-on awq" in line and "W·diag(s)" in line


def test_awq_never_follows_the_path_an_adapter_names(tmp_path, capsys):
    """The adapter's base_model_name_or_path is input from whoever wrote the adapter: the
    AWQ policy must not open it. Here it names a local unquantized model (which used to
    flip the default to "original" and refuse); without the option the merge goes ahead,
    and no file under that directory is opened."""
    import transformers

    named = tmp_path / "named-base"
    shutil.copytree(BASE, named)
    adapter = tmp_path / "lora"
    make_peft_lora(transformers.LlamaForCausalLM.from_pretrained(BASE).eval(), adapter,
                   base_name=str(named))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(named)
    opened: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event == "open" and args and str(args[0]).startswith(str(named)):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # cannot be removed: it stops recording below
    try:
        code, _, stderr = run_main([f"{FIXTURES / 'awq'}+{adapter}", "-o", tmp_path / "out", "-q"],
                                   capsys)
    finally:
        watching[0] = False
    assert code == 0, stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert opened == [], f"merge opened files the adapter named: {opened}"


def test_awq_told_the_adapter_was_trained_on_the_awq_model_merges(lora, tmp_path, capsys):
    code, _, stderr = run_main([f"{FIXTURES / 'awq'}+{lora}", "-o", tmp_path / "out", "-q",
                                "--awq-adapter-trained-on", "awq"], capsys)
    assert code == 0, stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- formats not read

def test_optimum_quanto_checkpoint_is_refused(lora, tmp_path, capsys):
    pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed")
    import transformers
    from optimum.quanto import QuantizedModelForCausalLM, qint4

    model = transformers.AutoModelForCausalLM.from_pretrained(BASE)
    QuantizedModelForCausalLM.quantize(model, weights=qint4, exclude="lm_head").save_pretrained(
        tmp_path / "quanto")
    assert "quantization_config" not in json.loads((tmp_path / "quanto" / "config.json").read_text())
    line = refused([f"{tmp_path / 'quanto'}+{lora}"], tmp_path / "out", capsys)
    assert "optimum-quanto" in line and "dequantize" in line and "save_pretrained" in line


def test_hqq_checkpoint_is_refused(lora, tmp_path, capsys):
    run_with("hqq", [str(FIXTURES / "side_tools.py"), "hqq", str(BASE), str(tmp_path / "hqq")])
    assert (tmp_path / "hqq" / "qmodel.pt").is_file()
    line = refused([f"{tmp_path / 'hqq'}+{lora}"], tmp_path / "out", capsys)
    assert "HQQ" in line and "pickle" in line and "qmodel.pt" in line and "bf16" in line


def test_unknown_quant_method_is_refused(lora, tmp_path, capsys):
    base = edited(FIXTURES / "gptq", tmp_path / "fp8base",
                  config=lambda qc: qc.update(quant_method="fbgemm_fp8"))
    line = refused([f"{base}+{lora}"], tmp_path / "out", capsys)
    assert "'fbgemm_fp8'" in line and "bitsandbytes" in line and "save it in bf16" in line


# --------------------------------------------------------------------------- config vs tensors

def test_missing_scales_are_refused(lora, quant_base, tmp_path, capsys):
    key = "model.layers.0.self_attn.q_proj.weight_scale"
    base = edited(quant_base("ct-w4a16"), tmp_path / "noscale", drop=key)
    line = refused([f"{base}+{lora}"], tmp_path / "out", capsys)
    assert "compressed-tensors" in line and key in line and "missing" in line
    key = "model.layers.1.mlp.up_proj.scales"
    base = edited(FIXTURES / "gptq", tmp_path / "noscale-gptq", drop=key)
    line = refused([f"{base}+{lora}"], tmp_path / "out", capsys)
    assert "GPTQ" in line and key in line and "missing" in line


def test_bnb_missing_absmax_is_refused(lora, quant_base, tmp_path, capsys):
    key = "model.layers.1.mlp.down_proj.weight.absmax"
    base = edited(quant_base("bnb-nf4"), tmp_path / "noabsmax", drop=key)
    line = refused([f"{base}+{lora}"], tmp_path / "out", capsys)
    assert "bitsandbytes" in line and key in line and "missing" in line


def test_wrong_packed_shapes_are_refused(lora, quant_base, tmp_path, capsys):
    def eight_bits(qc):
        qc["config_groups"]["group_0"]["weights"]["num_bits"] = 8

    base = edited(quant_base("ct-w4a16"), tmp_path / "8bit", config=eight_bits)
    line = refused([f"{base}+{lora}"], tmp_path / "out", capsys)
    # down_proj (64, 128) comes first: 8-bit packs it into (64, 32); the file has (64, 16)
    assert "down_proj.weight_packed" in line and "(64, 32)" in line and "(64, 16)" in line
    base = edited(FIXTURES / "gptq", tmp_path / "gptq8", config=lambda qc: qc.update(bits=8))
    line = refused([f"{base}+{lora}"], tmp_path / "out", capsys)
    assert "GPTQ" in line and "scales" in line and "bits=8" in line and "(2, 64)" in line


def test_group_size_not_dividing_the_width_is_refused(lora, quant_base, tmp_path, capsys):
    def group48(qc):
        qc["config_groups"]["group_0"]["weights"]["group_size"] = 48

    base = edited(quant_base("ct-w4a16"), tmp_path / "g48", config=group48)
    line = refused([f"{base}+{lora}"], tmp_path / "out", capsys)
    assert "group size 48 does not divide the input width 128" in line and "weight_packed" in line
    base = edited(FIXTURES / "awq", tmp_path / "awq48", config=lambda qc: qc.update(group_size=48))
    line = refused([f"{base}+{lora}"], tmp_path / "out", capsys)
    assert "AWQ" in line and "group size 48 does not divide" in line and "qweight" in line


def test_adapter_shapes_not_fitting_the_dequantized_widths_are_refused(tmp_path, quant_base, capsys):
    import transformers

    config = json.loads((BASE / "config.json").read_text())
    config["intermediate_size"] = 96  # another model
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    make_peft_lora(other, tmp_path / "lora96")
    line = refused([f"{quant_base('ct-w4a16')}+{tmp_path / 'lora96'}"], tmp_path / "out", capsys)
    assert "model.layers.0.mlp.down_proj.weight" in line and "(64, 96)" in line
    assert "(64, 128)" in line and "trained on" in line


def test_quantization_config_that_is_not_an_object_is_refused(lora, tmp_path, capsys):
    base = tmp_path / "bad"
    shutil.copytree(FIXTURES / "gptq", base)
    data = json.loads((base / "config.json").read_text())
    data["quantization_config"] = "gptq"
    (base / "config.json").write_text(json.dumps(data))
    line = refused([f"{base}+{lora}"], tmp_path / "out", capsys)
    assert "quantization_config must be an object" in line
