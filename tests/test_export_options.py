"""export onnx options beyond the plain graph: int8, a merged rep --adapter, float16, the
provider report, the one-line install hint. Real exports in real ONNX Runtime."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import build_tiny, probe_inputs, run_main, save_tiny
from loretta_merge.converters.onnx import export_onnx
from loretta_merge.errors import MissingDependencyError

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

# one layer for the Llama exports: they take about two thirds as long, and each option
# acts on the graph whatever its depth
LAYERS = 1


@pytest.fixture(scope="session")
def bert_with_tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("opts")
    base = save_tiny("bert", root / "bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(123)]
    (root / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(base)
    rows = [{"text": f"w{i} w{(i * 7) % 123} w{(i * 3) % 50}", "label": i % 2} for i in range(40)]
    (root / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return base, root / "eval.jsonl", rows


def test_int8_export_agrees_with_fp32_and_reports_accuracy(bert_with_tokenizer, tmp_path, capsys):
    from transformers import AutoTokenizer

    base, eval_file, rows = bert_with_tokenizer
    out = tmp_path / "int8"
    code, text, err = run_main(["export", "onnx", base, "-o", out, "--quantize", "int8",
                                "--eval-file", eval_file, "--json"], capsys)
    assert code == 0, err
    q = json.loads(text)["quantize"]
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops  # really an int8 graph
    assert q["int8_bytes"] < q["fp32_bytes"] and not (out / ".fp32").exists()
    # judged on the eval file's real rows by class agreement; the probe error is information
    assert q["judged_on"].endswith(str(eval_file)) and q["text_rows"] == len(rows)
    assert q["text_agreement"] >= q["min_agreement"] == 0.98
    assert 0 < q["max_abs_diff"] and 0 < q["rel_error"]
    # the reported int8 accuracy is what the written graph scores on the eval rows
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    enc = AutoTokenizer.from_pretrained(base)([r["text"] for r in rows], padding=True,
                                              return_tensors="np")
    pred = session.run(None, {k: enc[k].astype(np.int64) for k in
                              ("input_ids", "attention_mask", "token_type_ids")})[0].argmax(-1)
    assert q["eval_rows"] == len(rows)
    assert q["accuracy_int8"] == pytest.approx(np.mean(pred == [r["label"] for r in rows]))
    # and the int8 graph stays close to PyTorch on a padded probe (relative error)
    feed = probe_inputs(batch=2, seq=7, seed=4)
    feed["token_type_ids"] = torch.zeros_like(feed["input_ids"])
    got = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    with torch.no_grad():
        ref = build_tiny("bert")(**feed).logits.numpy()
    assert np.linalg.norm(got - ref) <= 0.1 * np.linalg.norm(ref)


def test_unsupported_quantize_value_is_one_line(bert_with_tokenizer, tmp_path, capsys):
    base, _, _ = bert_with_tokenizer
    code, _, err = run_main(["export", "onnx", base, "-o", tmp_path / "x", "--quantize", "int4"],
                            capsys)
    assert code == 2 and "int4" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_eval_file_without_quantize_is_refused_in_one_line(bert_with_tokenizer, tmp_path, capsys):
    """--eval-file reports fp32 and int8 accuracy side by side; without --quantize it would be
    ignored, so it is refused before the model loads, and nothing is written."""
    base, eval_file, _ = bert_with_tokenizer
    code, text, err = run_main(["export", "onnx", base, "-o", tmp_path / "x", "--eval-file",
                                eval_file], capsys)
    assert code == 2 and text == "" and len(err.strip().splitlines()) == 1
    assert "--eval-file" in err and "--quantize int8" in err
    assert not (tmp_path / "x").exists()


def test_eval_file_on_a_head_that_does_not_classify_is_refused(tmp_path, capsys):
    base = save_tiny("llama", tmp_path / "base", layers=LAYERS)
    (tmp_path / "eval.csv").write_text("text,label\na b,0\n")
    code, _, err = run_main(["export", "onnx", base, "-o", tmp_path / "x", "--task", "causal-lm",
                             "--quantize", "int8", "--eval-file", tmp_path / "eval.csv"], capsys)
    assert code == 2 and "seq-cls" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_atol_help_says_what_the_code_does():
    from click.testing import CliRunner

    from loretta_merge.commands.export import onnx_command

    text = " ".join(CliRunner().invoke(onnx_command, ["--help"]).output.split())
    assert "rtol is not an option: it is set by dtype" in text
    assert not any(p.name == "rtol" for p in onnx_command.params)


def test_rep_adapter_is_merged_before_export(tmp_path):
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import (get_loretta_model, load_loretta_model, merge_loretta_model,
                                     save_loretta_adapter)
    from conftest import perturb_trainable

    base = save_tiny("llama", tmp_path / "base", layers=LAYERS)
    torch.manual_seed(5)
    adapter = save_loretta_adapter(perturb_trainable(get_loretta_model(
        build_tiny("llama", layers=LAYERS), RepConfig(r=4, tensor_rank=3, lora_dropout=0.0))), tmp_path / "rep")
    report = export_onnx(base, tmp_path / "out", adapter=adapter)
    assert report.adapter_merged and report.validation.passed
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    names = [t.name for t in graph.graph.initializer]
    assert not [n for n in names if "lora" in n or "tt_cores" in n]  # no TT left in the graph
    merged = merge_loretta_model(load_loretta_model(build_tiny("llama", layers=LAYERS), adapter)).eval()
    feed = probe_inputs(batch=2, seq=9, seed=6)
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    with torch.no_grad():
        want = merged(**feed).logits.numpy()
    keep = feed["attention_mask"].numpy().astype(bool)
    assert np.abs(got - want)[keep].max() < 1e-4


def test_float16_and_the_provider_that_ran(tmp_path, capsys):
    base = save_tiny("llama", tmp_path / "base", layers=LAYERS)
    out = tmp_path / "fp16"
    code, text, err = run_main(["export", "onnx", base, "-o", out, "--dtype", "float16",
                                "--provider", "cuda"], capsys)
    if code != 0:  # an onnxruntime without fp16 CPU kernels must say what to do
        assert "CUDA provider" in err and not out.exists()
        return
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(int64)"
    assert "float16" in session.get_outputs()[0].type
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    # the line names the provider that really ran; a CPU build says CUDA was not there
    assert ("CPU ran" in text) == (not cuda)
    assert "atol=0.01" in text  # float16 tolerance


def test_missing_onnxscript_gives_the_install_line(tmp_path, monkeypatch):
    base = save_tiny("gpt2", tmp_path / "base")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'loretta-merge\[onnx\]'"):
        export_onnx(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
