"""ONNX export and safetensors re-sharding, checked with real ONNX Runtime sessions.

Every exported graph is run here in ONNX Runtime again and compared with the PyTorch model
at the positions the attention mask keeps, independently of the exporter's own validation.
Exports are shared between tests through session-scoped fixtures (see conftest.py) to keep the file fast.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import build_tiny, probe_inputs, save_tiny
from loretta_merge.cli import cli
from loretta_merge.converters import onnx as onnx_export
from loretta_merge.converters.onnx import export_onnx
from loretta_merge.errors import ConfigError, NumericsError, OutputExistsError

ort = pytest.importorskip("onnxruntime")

ATOL_FP32 = 1e-4  # fp32 graphs agree to ~2e-7 here; 1e-4 leaves room for kernel order only


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Saved tiny checkpoints for this module (seeded, so tests can rebuild the same model)."""
    root = tmp_path_factory.mktemp("export-models")
    return {name: save_tiny(name, root / name) for name in ("llama", "gpt2", "bert")}


@pytest.fixture(scope="session")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("export-out")


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def ort_outputs(path: Path, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v.numpy() for k, v in feed.items() if k in names})


def check_parity(out: Path, model, *, output: str, with_types: bool = False) -> float:
    """ORT vs PyTorch on two padded probe shapes; returns the max abs diff at kept positions."""
    worst = 0.0
    for batch, seq, seed in ((2, 7, 11), (3, 12, 12)):
        feed = probe_inputs(batch=batch, seq=seq, seed=seed)
        if with_types:
            feed["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq)
        got = ort_outputs(out, feed)[0]
        with torch.no_grad():
            ref = getattr(model(**feed), output).numpy()
        assert got.shape == ref.shape
        keep = feed["attention_mask"].numpy().astype(bool)
        diff = np.abs(got - ref)
        diff = diff[keep] if output != "logits" or got.ndim == 3 else diff
        worst = max(worst, float(diff.max()))
    assert worst < ATOL_FP32
    return worst


# --------------------------------------------------------------------------- exports

@pytest.fixture(scope="session")
def llama_export(models, out_root):
    out = out_root / "llama"
    return out, export_onnx(models["llama"], out)


@pytest.fixture(scope="session")
def gpt2_past_export(models, out_root):
    out = out_root / "gpt2-past"
    report = json.loads(run_cli("export", "onnx", models["gpt2"], "-o", out, "--with-past",
                                "--json"))
    return out, report


@pytest.fixture(scope="session")
def bert_fe_export(models, out_root):
    """Feature extraction, with a tiny external-data threshold: weights go to model.onnx.data."""
    out = out_root / "bert-fe"
    return out, export_onnx(models["bert"], out, task="feature-extraction",
                            external_data_threshold_bytes=1000)


def test_llama_causal_lm(llama_export):
    out, report = llama_export
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.onnx"]
    assert report.task == "causal-lm" and report.exporter == "dynamo"
    assert report.inputs == ["input_ids", "attention_mask"] and report.outputs == ["logits"]
    v = report.validation
    assert v.passed and v.providers[0] == "CPUExecutionProvider"
    assert len({(p.batch, p.sequence) for p in v.probes}) >= 2
    assert v.max_abs_diff < v.atol == 1e-4
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert all(isinstance(d, str) for d in shapes["input_ids"])  # dynamic batch and sequence
    check_parity(out, build_tiny("llama"), output="logits")


def test_bert_feature_extraction_external_data(bert_fe_export):
    out, report = bert_fe_export
    assert report.external_data
    assert {"model.onnx", "model.onnx.data"} <= {p.name for p in out.iterdir()}
    # the data file holds the weights: the graph file itself is small
    assert (out / "model.onnx.data").stat().st_size > 250_000
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    assert report.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert report.outputs == ["last_hidden_state"] and report.validation.passed
    encoder = build_tiny("bert").bert  # the same weights AutoModel loads from the checkpoint
    check_parity(out, encoder, output="last_hidden_state", with_types=True)


def test_bert_seq_cls_cli(models, out_root):
    out = out_root / "bert-cls"
    text = run_cli("export", "onnx", models["bert"], "-o", out)
    assert "validated on CPUExecutionProvider" in text
    check_parity(out, build_tiny("bert"), output="logits", with_types=True)


def test_gpt2_with_past_generation(gpt2_past_export):
    out, report = gpt2_past_export
    v = report["validation"]
    assert v["passed"] and v["generation_match"]
    assert v["generation_tokens_onnx"] == v["generation_tokens_torch"]
    assert report["outputs"][1:] == ["present.0.key", "present.0.value", "present.1.key",
                                     "present.1.value"]
    # independent check: prompt through the graph, then one token through its cache, must
    # give the logits of the full sequence in PyTorch
    model = build_tiny("gpt2")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    full = probe_inputs(batch=2, seq=9, seed=5)["input_ids"]
    past_names = [n for n in report["inputs"] if n.startswith("past_key_values")]
    empty = {n: np.zeros((2, 4, 0, 16), np.float32) for n in past_names}
    first = session.run(None, {"input_ids": full[:, :8].numpy(),
                               "attention_mask": np.ones((2, 8), np.int64), **empty})
    second = session.run(None, {"input_ids": full[:, 8:].numpy(),
                                "attention_mask": np.ones((2, 9), np.int64),
                                **dict(zip(past_names, first[1:]))})
    assert first[1].shape == (2, 4, 8, 16) and second[1].shape == (2, 4, 9, 16)
    with torch.no_grad():
        ref = model(input_ids=full).logits.numpy()
    assert np.abs(first[0] - ref[:, :8]).max() < ATOL_FP32
    assert np.abs(second[0][:, 0] - ref[:, 8]).max() < ATOL_FP32
    # and greedy tokens from PyTorch's own generate() equal the graph's greedy loop
    prompt = full[:, :4]
    with torch.no_grad():
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[:, 4:]
    ids, mask, past, tokens = prompt.numpy(), np.ones((2, 4), np.int64), empty, []
    for _ in range(4):
        outs = session.run(None, {"input_ids": ids, "attention_mask": mask, **past})
        nxt = outs[0][:, -1].argmax(-1)
        tokens.append(nxt)
        past = dict(zip(past_names, outs[1:]))
        ids = nxt[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    assert np.stack(tokens, 1).tolist() == gen.tolist()


@pytest.mark.slow
def test_adp_adapter_inside_graph(models, out_root, tmp_path):
    from loretta_merge.adapters.config import AdpConfig
    from loretta_merge.adapters import get_loretta_model, load_loretta_model, save_loretta_adapter

    torch.manual_seed(3)
    adapted = get_loretta_model(build_tiny("llama"), AdpConfig(bottleneck_size=8, tensor_rank=3,
                                                               placement={"down_proj": "output"}))
    adapter_dir = save_loretta_adapter(adapted, tmp_path / "adp")
    out = out_root / "llama-adp"
    report = export_onnx(models["llama"], out, adapter=adapter_dir)
    assert report.validation.passed and report.adapter == str(adapter_dir)
    reloaded = load_loretta_model(build_tiny("llama"), adapter_dir).eval()
    check_parity(out, reloaded, output="logits")
    # the adapter really is in the graph: the output differs from the base model's
    feed = probe_inputs(batch=2, seq=7)
    with torch.no_grad():
        base = build_tiny("llama")(**feed).logits.numpy()
    keep = feed["attention_mask"].numpy().astype(bool)
    assert np.abs(ort_outputs(out, feed)[0] - base)[keep].max() > 1e-3


# --------------------------------------------------------------------------- failures

def test_wrong_graph_fails_validation_and_writes_nothing(models, out_root, llama_export,
                                                       monkeypatch):
    import onnx
    from onnx import numpy_helper

    good = onnx.load(str(llama_export[0] / "model.onnx"))

    def export_a_corrupted_graph(wrapper, args, *, path, **kw):
        # the real graph of this model with one initializer off by 1e-2 in one element
        bad = copy.deepcopy(good)
        init = next(t for t in bad.graph.initializer if t.name.endswith("input_layernorm.weight"))
        values = numpy_helper.to_array(init).copy()
        values[0] += 1e-2
        init.CopyFrom(numpy_helper.from_array(values, init.name))
        onnx.save_model(bad, str(path))
        return "dynamo", None

    monkeypatch.setattr(onnx_export.export, "export_graph", export_a_corrupted_graph)
    out = out_root / "llama-wrong"
    with pytest.raises(NumericsError, match=r"failed validation .* max \|onnx - torch\|"):
        export_onnx(models["llama"], out)
    assert not out.exists()
    assert not [p for p in out_root.iterdir() if "llama-wrong" in p.name]  # no temp left


def test_refuses_existing_output_and_bad_options(models, llama_export):
    out, _ = llama_export
    with pytest.raises(OutputExistsError, match="already exists"):
        export_onnx(models["llama"], out)
    with pytest.raises(ConfigError, match="causal-lm"):
        export_onnx(models["bert"], out.parent / "x", with_past=True)
    with pytest.raises(ConfigError, match="unknown task"):
        export_onnx(models["bert"], out.parent / "x", task="translation")
    assert not (out.parent / "x").exists()


# --------------------------------------------------------------------------- safetensors

def test_export_safetensors_reshards_and_casts(models, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "resharded"
    run_cli("export", "safetensors", models["llama"], "-o", out, "--dtype", "bfloat16",
            "--max-shard-size", "100KB", "--json")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    got = {k: v for s in shards for k, v in load_file(s).items()}
    ref = build_tiny("llama").state_dict()
    assert set(got) == set(ref)  # lm_head is untied in the tiny Llama
    for key, tensor in ref.items():
        assert got[key].dtype == torch.bfloat16
        assert torch.equal(got[key], tensor.to(torch.bfloat16)), key


def test_exports_share_one_op_table_that_no_export_changes(tmp_path):
    """The exporter's table of ONNX implementations of ATen ops is built once per process
    and opset version inside graph.shared_op_registry() (0.4 s of every export otherwise);
    the class is restored after the block, and the exports run so far in this process left
    every shared table as a fresh one is built (so each export sees what it would have)."""
    from torch.onnx._internal.exporter import _registration

    from loretta_merge.converters.onnx import graph

    def content(registry):
        return {k: [(m.onnx_function, m.fx_target, m.is_custom, m.is_complex) for m in v]
                for k, v in registry.functions.items()}

    cls = _registration.ONNXRegistry
    original = cls.__dict__["from_torchlib"]
    save_tiny("bert", tmp_path / "bert", layers=1)  # any graph: one layer exports faster
    export_onnx(tmp_path / "bert", tmp_path / "onnx", validate=False)  # through the block
    assert cls.__dict__["from_torchlib"] is original
    ops_now = graph._registered_ops()  # the tables the exports would use now
    tables = [t for ops, t in graph._SHARED_REGISTRIES.values()
              if graph._still_current(ops, ops_now)]
    assert tables and all(t.functions for t in tables)
    with graph.shared_op_registry():
        patched = cls.__dict__["from_torchlib"]
        with graph.shared_op_registry():  # nested: the outer block's stays, and is restored
            assert cls.__dict__["from_torchlib"] is patched
        assert cls.__dict__["from_torchlib"] is patched
        for table in tables:  # however the exporter asks for it
            assert cls.from_torchlib(opset_version=table.opset_version) is table
            assert cls().from_torchlib(table.opset_version) is table
    assert cls.__dict__["from_torchlib"] is original
    for table in tables:
        fresh = cls.from_torchlib(opset_version=table.opset_version)
        assert fresh is not table and content(fresh) == content(table)


def test_shared_op_table_is_rebuilt_when_torch_loads_more_ops():
    """The table depends on the op libraries torch has loaded: a process that builds it, then
    imports torch.ao's quantized_decomposed ops, gets a table with those ops from the next
    export, as a fresh process would (a fresh python: whether this one has them loaded depends
    on which tests ran before)."""
    script = (
        "import sys, torch\n"
        "from torch.onnx._internal.exporter import _registration as r\n"
        "from loretta_merge.converters.onnx import graph\n"
        "assert 'quantized_decomposed' not in str(sorted(graph._registered_ops())), 'loaded'\n"
        "with graph.shared_op_registry():\n"
        "    before = r.ONNXRegistry.from_torchlib(opset_version=23)\n"
        "    import torch.ao.quantization.fx._decomposed\n"
        "    after = r.ONNXRegistry.from_torchlib(opset_version=23)\n"
        "    again = r.ONNXRegistry.from_torchlib(opset_version=23)\n"
        "new = set(after.functions) - set(before.functions)\n"
        "assert again is after and new, new\n"
        "assert all(k.startswith('quantized_decomposed::') for k in new), new\n"
        "assert set(r.ONNXRegistry.from_torchlib(opset_version=23).functions) == set(after.functions)\n"
        "print(len(new))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 0


def test_graph_optimizer_skips_only_its_named_rules():
    """export onnx optimizes with onnxscript's default optimizer minus SKIPPED_REWRITE_RULES
    (SlicesSplit: its time grows with the square of a graph's Slice nodes, which an adapter
    bank multiplies). The skipped rules exist in onnxscript (so the skip is not vacuous) and
    are back once the block ends; that the optimizer's output is the same graph with and
    without them, on a traced Llama bank graph, is checked by the benchmark's smoke run
    (test_export_bench.py::test_bench_onnx_optimize_smoke_gives_the_same_graph)."""
    from onnxscript import rewriter

    from loretta_merge.converters.onnx import graph

    defaults = rewriter._DEFAULT_REWRITE_RULES
    assert graph.SKIPPED_REWRITE_RULES
    assert set(graph.SKIPPED_REWRITE_RULES) <= {r.name for r in defaults}
    with graph.skipped_rewrite_rules():
        inside = {r.name for r in rewriter._DEFAULT_REWRITE_RULES}
    assert not inside & set(graph.SKIPPED_REWRITE_RULES)
    assert inside == {r.name for r in defaults} - set(graph.SKIPPED_REWRITE_RULES)
    assert rewriter._DEFAULT_REWRITE_RULES is defaults
