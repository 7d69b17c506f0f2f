"""inspect: counts on the meta device against hand computations; describe; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import build_tiny
from loretta_merge.commands.inspect import inspect_command
from loretta_merge.adapters.config import AdpConfig, RepConfig
from loretta_merge.errors import ConfigError, FormatError
from loretta_merge.inspect import count_params, describe
from loretta_merge.adapters import get_loretta_model, save_loretta_adapter, trainable_parameters

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def tt_params(modes, rank=5):
    """sum_k r_{k-1} n_k r_k with ranks [1, R, ..., R, 1], written out by hand."""
    ranks = [1] + [rank] * (len(modes) - 1) + [1]
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(modes))


# The paper's mode table, copied from LORETTA.md section 1.
R8 = {768: [8, 8, 12, 8], 2304: [8, 8, 8, 4, 9], 4096: [16, 16, 8, 4, 4]}
B64 = {768: [8, 8, 12, 8, 8], 4096: [16, 16, 16, 4, 4, 4]}
SQUARE_768 = [8, 8, 12, 12, 8, 8]


def test_deberta_base_counts_match_the_paper_recipe_by_hand():
    h, layers, labels = 768, 12, 2
    norms = 2 * h * (1 + 2 * layers)  # embeddings LN + attention-output LN + output LN per layer
    dense = tt_params(SQUARE_768) + h  # pooler dense replaced by a square TT with bias
    head = h * labels + labels  # classifier
    rep = count_params(CONFIGS / "deberta-base.json", "rep")
    in_proj = tt_params(R8[768]) + tt_params(R8[2304])  # fused 768 -> 2304
    assert rep["task"] == "seq-cls" and rep["num_wrapped_modules"] == layers
    assert rep["trainable_params"] == layers * in_proj + norms + dense + head == 55766
    assert rep["breakdown"] == {"tt_cores": layers * in_proj + tt_params(SQUARE_768), "biases": h,
                                "norms": norms, "heads": head}
    assert rep["lora_params"] == layers * 8 * (h + 3 * h)
    adp = count_params(CONFIGS / "deberta-base.json", "adp")
    one = 2 * tt_params(B64[768]) + 64 + h  # down + up cores, both biases
    assert adp["num_wrapped_modules"] == 2 * layers  # attention.output.dense and output.dense
    assert adp["trainable_params"] == 2 * layers * one + norms + dense + head == 99194


def test_llama_2_7b_adp_on_meta_matches_the_paper():
    info = count_params(CONFIGS / "llama-2-7b.json", "adp", task="causal-lm")
    one = 2 * tt_params(B64[4096]) + 64 + 4096
    norms = 4096 * (2 * 32 + 1)
    assert info["num_wrapped_modules"] == 3 * 32
    assert info["trainable_params"] == 3 * 32 * one + norms == 876800  # paper: about 0.88M
    assert info["base_params"] == 6738415616  # LLaMA-2-7B
    assert info["lora_params"] == 32 * 3 * 8 * (4096 + 11008)
    rep = count_params(CONFIGS / "llama-2-7b.json", "rep")
    assert rep["trainable_params"] == 64 * 2 * tt_params(R8[4096]) + norms
    assert rep["lora_params"] == 64 * 8 * 2 * 4096


def test_cli_config_json_and_table():
    runner = CliRunner()
    res = runner.invoke(inspect_command, ["--config", str(CONFIGS / "roberta-base.json"), "--method", "rep",
                                          "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert isinstance(data["trainable_params"], int)
    assert data == count_params(CONFIGS / "roberta-base.json", "rep")
    res = runner.invoke(inspect_command, ["--config", str(CONFIGS / "roberta-base.json"), "--method", "adp",
                                          "--bottleneck", "32", "--tensor-rank", "4"])
    assert res.exit_code == 0, res.output
    want = count_params(CONFIGS / "roberta-base.json", "adp", bottleneck=32, tensor_rank=4)["trainable_params"]
    assert f"{want:,}" in res.output and "output.dense" in res.output


def test_describe_adapter_and_model(tmp_path, tiny_model_dir):
    model = get_loretta_model(build_tiny("llama"), RepConfig())
    save_loretta_adapter(model, tmp_path / "rep")
    info = describe(tmp_path / "rep")
    counts = trainable_parameters(model)
    assert info["method"] == "rep" and info["source"] == "loretta-merge"
    assert info["targets"] == ["q_proj", "v_proj"] and info["num_modules"] == 4
    assert info["trainable_params"] == counts["total_trainable"]
    assert info["breakdown"] == {k: counts[k] for k in ("tt_cores", "biases", "norms", "heads")}
    q = info["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["lora_A"] == {"shape": [64, 8], "modes": [8, 8, 8], "ranks": [1, 5, 5, 1],
                           "params": tt_params([8, 8, 8])}
    assert info["lora_params_same_r"] == 2 * 8 * (64 + 64) + 2 * 8 * (64 + 32)  # v_proj: 2 kv heads
    adp = get_loretta_model(build_tiny("bert"), AdpConfig())
    save_loretta_adapter(adp, tmp_path / "adp")
    res = CliRunner().invoke(inspect_command, [str(tmp_path / "adp")])
    assert res.exit_code == 0, res.output
    assert "bert.pooler.dense (tt_dense)" in res.output and "[output]" in res.output
    a = describe(tmp_path / "adp")
    assert a["trainable_params"] == trainable_parameters(adp)["total_trainable"]
    m = describe(tiny_model_dir("llama"))
    assert m["kind"] == "model" and m["model_type"] == "llama" and len(m["shards"]) > 1
    assert m["params"] == sum(p.numel() for p in build_tiny("llama").parameters())
    with pytest.raises(FormatError, match="neither an adapter directory"):
        describe(tmp_path)


def test_count_options_with_path_are_refused_not_ignored(tmp_path):
    """--r, --method, ... shape a count (--config); with PATH they would change nothing, so
    they are refused in one line, even when their value equals the default."""
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    save_loretta_adapter(get_loretta_model(build_tiny("llama"), RepConfig(lora_dropout=0.0)),
                         tmp_path / "rep")
    runner = CliRunner()
    assert runner.invoke(inspect_command, [str(tmp_path / "rep")]).exit_code == 0
    assert runner.invoke(inspect_command, [str(tmp_path / "rep"), "--json"]).exit_code == 0
    for extra, flags in ((["--r", "8"], "--r"), (["--no-norms", "--shapes", "auto"], "--shapes, --no-norms"),
                         (["--method", "adp", "--bottleneck", "16"], "--method, --bottleneck")):
        res = runner.invoke(inspect_command, [str(tmp_path / "rep"), *extra])
        assert res.exit_code != 0 and isinstance(res.exception, ConfigError), res.output
        assert str(res.exception).startswith(f"{flags} count what an adapter would train")
        assert "--config only" in str(res.exception)
    model = QUANT / "awq"
    res = runner.invoke(inspect_command, [str(model), "--task", "causal-lm"])
    assert isinstance(res.exception, ConfigError) and "--task" in str(res.exception)
    # with --config the same options count
    res = runner.invoke(inspect_command, ["--config", str(CONFIGS / "roberta-base.json"), "--method",
                                          "rep", "--r", "4", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["lora_r"] == 4


def test_command_module_imports_without_torch():
    code = "import sys, loretta_merge.commands.inspect; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- quantized bases

QUANT = Path(__file__).parent / "fixtures" / "quant"


@pytest.mark.parametrize("fmt, bits, group, act_order", [("gptq", 4, 32, False),
                                                         ("gptq-actorder", 4, 32, True),
                                                         ("awq", 4, 32, None)])
def test_inspect_reports_a_quantized_base(fmt, bits, group, act_order):
    info = describe(QUANT / fmt)
    quant = info["quantization"]
    assert quant["mergeable"] and quant["format"] == ("AWQ" if fmt == "awq" else "GPTQ")
    assert quant["bits"] == bits and quant["group_size"] == group and quant.get("act_order") == act_order
    linears = [f"model.layers.{i}.{m}.weight" for i in range(2)
               for m in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                         "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")]
    assert quant["quantized_weights"] == sorted(linears)  # lm_head and embeddings are not
    res = CliRunner().invoke(inspect_command, [str(QUANT / fmt)])
    assert res.exit_code == 0, res.output
    assert f"quantized                    {quant['format']}" in res.output
    assert "group size                   32" in res.output
    assert all(name in res.output for name in linears)


def test_inspect_on_a_plain_model_reports_no_quantization():
    assert describe(QUANT / "base")["quantization"] is None
    assert "quantized" not in CliRunner().invoke(inspect_command, [str(QUANT / "base")]).output


def test_inspect_on_a_quantized_base_that_cannot_be_merged_says_why(tmp_path):
    import shutil

    shutil.copytree(QUANT / "gptq", tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    data["quantization_config"]["quant_method"] = "fbgemm_fp8"
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    quant = describe(tmp_path / "m")["quantization"]
    assert not quant["mergeable"] and "'fbgemm_fp8'" in quant["reason"]
    res = CliRunner().invoke(inspect_command, [str(tmp_path / "m")])
    assert res.exit_code == 0 and "fbgemm_fp8; cannot be merged" in res.output


def test_inspect_calls_a_peft_lora_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(build_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "lora")
    out = CliRunner().invoke(inspect_command, [str(tmp_path / "lora")]).output
    assert ": LoRA (peft format)" in out.splitlines()[0] and "LoRETTA_lora" not in out
