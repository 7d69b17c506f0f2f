"""Switchable adapters: one ONNX base, one ``.onnx_adapter`` per adapter, in real ONNX Runtime.

A tiny Llama is exported once with two rep adapters of different shapes (r and TT rank) and
one real PEFT LoRA adapter. Each adapter, activated with ``RunOptions.add_active_adapter``,
must reproduce an independent PyTorch reference: the rep adapters through
``load_loretta_model`` + ``merge_loretta_model``, the LoRA adapter through PEFT's own
``merge_and_unload``; with no adapter active the graph must be the base model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import build_tiny, perturb_trainable, probe_inputs, run_main, save_tiny
from loretta_merge.converters.onnx import export_onnx
from loretta_merge.errors import ConfigError, ShapeError

ort = pytest.importorskip("onnxruntime")
peft = pytest.importorskip("peft")

# one layer: the exports (most of this file's time) take about two thirds as long; every
# layer's modules switch alike
LAYERS = 1
ATOL = 1e-4


def _rep_adapter(path, *, r: int, tensor_rank: int, seed: int, targets):
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    torch.manual_seed(seed)
    model = get_loretta_model(build_tiny("llama", layers=LAYERS), RepConfig(
        r=r, lora_alpha=2 * r, tensor_rank=tensor_rank, lora_dropout=0.0, target_modules=targets))
    perturb_trainable(model, seed=seed)
    return save_loretta_adapter(model, path)


def _peft_adapter(path, seed: int):
    torch.manual_seed(seed)
    model = peft.get_peft_model(build_tiny("llama", layers=LAYERS), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb_trainable(model, seed=seed)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("switch")
    base = save_tiny("llama", root / "base", layers=LAYERS)
    adapters = {
        "alpha": _rep_adapter(root / "rep-a", r=4, tensor_rank=3, seed=1,
                              targets=["q_proj", "v_proj"]),
        "beta": _rep_adapter(root / "rep-b", r=8, tensor_rank=2, seed=2,
                             targets=["q_proj", "o_proj", "gate_proj"]),
        "gamma": _peft_adapter(root / "lora", seed=3),
    }
    out = root / "onnx"
    report = export_onnx(base, out, switchable_adapters=[f"{k}={v}" for k, v in adapters.items()])
    return base, adapters, out, report


def _reference(name: str, path):
    from loretta_merge.adapters import load_loretta_model, merge_loretta_model

    if name == "gamma":
        base = build_tiny("llama", layers=LAYERS)
        model = peft.PeftModel.from_pretrained(base, path).merge_and_unload()
    else:
        model = merge_loretta_model(load_loretta_model(build_tiny("llama", layers=LAYERS), path))
    return model.eval()


def _run(session, feed, adapter_file=None):
    options = None
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
    return session.run(None, {k: v.numpy() for k, v in feed.items()}, options)[0]


def test_each_adapter_and_none_match_pytorch(setup):
    _, adapters, out, report = setup
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [
        "alpha.onnx_adapter", "beta.onnx_adapter", "gamma.onnx_adapter"]
    assert report.validation.passed and all(s.validation.passed for s in report.switchable)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = [probe_inputs(batch=2, seq=7, seed=21), probe_inputs(batch=3, seq=12, seed=22)]
    base = build_tiny("llama", layers=LAYERS)
    refs = {name: _reference(name, path) for name, path in adapters.items()}
    outputs = {}
    for feed in feeds:
        keep = feed["attention_mask"].numpy().astype(bool)
        got = _run(session, feed)
        with torch.no_grad():
            assert np.abs(got - base(**feed).logits.numpy())[keep].max() < ATOL
        for name, ref in refs.items():
            got = _run(session, feed, out / "adapters" / f"{name}.onnx_adapter")
            with torch.no_grad():
                want = ref(**feed).logits.numpy()
            assert np.abs(got - want)[keep].max() < ATOL, name
            outputs[name] = got
    # each adapter really changes the output, and differently from the others
    with torch.no_grad():
        plain = base(**feeds[-1]).logits.numpy()
    for name, got in outputs.items():
        assert np.abs(got - plain).max() > 1e-3, name
    assert np.abs(outputs["alpha"] - outputs["beta"]).max() > 1e-3


def test_adapter_files_hold_only_their_tensors(setup):
    from loretta_merge.formats import read_adapter

    _, adapters, out, report = setup
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    overridable = {i.name for i in session.get_overridable_initializers()}
    by_name = {s.name: s for s in report.switchable}
    for name, path in adapters.items():
        adapter = read_adapter(path)
        fmt = ort.AdapterFormat.read_adapter(str(out / "adapters" / f"{name}.onnx_adapter"))
        params = fmt.get_parameters()
        assert set(params) <= overridable  # names exactly those of the graph
        branch = {k for k in params if ".switch." in k}
        assert {k.split(".switch.")[0] for k in branch} == set(adapter.modules)
        assert set(params) - branch == set(adapter.tensors)  # trained norms/heads, if any
        stored = sum(v.numpy().nbytes for v in params.values())
        full = sum(t.numel() * 4 for t in adapter.tensors.values())
        if adapter.method == "rep":  # the TT cores, one fp32 scale per module, its full tensors
            cores = sum(4 * m.num_params() for m in adapter.modules.values())
            assert stored == cores + 4 * len(adapter.modules) + full
        size = (out / "adapters" / f"{name}.onnx_adapter").stat().st_size
        assert stored <= size <= stored + 200 * len(params) + 1024
        assert by_name[name].file_bytes == size and by_name[name].tensor_bytes == stored
    base_bytes = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    assert max(s.file_bytes for s in report.switchable) < base_bytes / 20


def test_cli_refusals_write_nothing(setup, tmp_path, capsys):
    base, adapters, _, _ = setup
    out = tmp_path / "o"
    cases = [
        (["--switchable-adapter", f"../x={adapters['alpha']}"], "not a valid file name"),
        (["--switchable-adapter", f"a={adapters['alpha']}", "--switchable-adapter",
          f"a={adapters['beta']}"], "given twice"),
        (["--switchable-adapter", f"a={adapters['alpha']}", "--quantize", "int8"],
         "--quantize with --switchable-adapter"),
        (["--switchable-adapter", "noequals"], "NAME=ADAPTER_DIR"),
    ]
    for extra, message in cases:
        code, _, err = run_main(["export", "onnx", base, "-o", out, *extra], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_adp_and_foreign_adapters_are_refused(setup, tmp_path):
    from loretta_merge.adapters.config import AdpConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    base, _, _, _ = setup
    adp = save_loretta_adapter(get_loretta_model(build_tiny("llama", layers=LAYERS), AdpConfig()),
                               tmp_path / "adp")
    with pytest.raises(ConfigError, match="--adapter"):
        export_onnx(base, tmp_path / "o1", switchable_adapters=[f"x={adp}"])
    gpt2 = _gpt2_rep(tmp_path / "gpt2-rep")
    with pytest.raises(ShapeError, match=r"module .*(c_attn|c_proj)"):
        export_onnx(base, tmp_path / "o2", switchable_adapters=[f"x={gpt2}"])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def _gpt2_rep(path):
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    return save_loretta_adapter(get_loretta_model(build_tiny("gpt2"), RepConfig()), path)


def test_report_json_lists_adapters(setup):
    _, _, _, report = setup
    data = json.loads(json.dumps(report.to_dict()))
    assert [s["name"] for s in data["switchable"]] == ["alpha", "beta", "gamma"]
    assert data["switch_layout"] == "tt" and data["inputs"] == ["input_ids", "attention_mask"]


def test_zero_padded_tt_ranks_are_exact():
    """Two adapters with the same modes but different TT ranks share one branch: the smaller
    one's cores are zero-padded to the larger ranks, which must not change its delta."""
    from loretta_merge import tt
    from loretta_merge.converters.onnx.switch_layers import BranchLayout, TTBranch, pad_to

    torch.manual_seed(0)
    a = tt.random_cores([4, 8, 4], 2, 16, 8)          # (16, 8) with TT rank 2
    b = tt.random_cores([2, 8, 4], 2, 8, 8)           # (8, 8)
    lay = BranchLayout("tt", 16, 8, 8, 8, (4, 8, 4), (2, 8, 4))
    lay.widen([1, 5, 5, 1], [1, 3, 4, 1], 8)          # another adapter's larger ranks
    branch = TTBranch(lay, torch.float32)
    with torch.no_grad():
        for k, core in enumerate(a):
            branch.lora_A[k].copy_(pad_to(core, lay.core_shapes("a")[k]))
        for k, core in enumerate(b):
            branch.lora_B[k].copy_(pad_to(core, lay.core_shapes("b")[k]))
        branch.scale.fill_(0.5)
        x = torch.randn(3, 16)
        want = 0.5 * (x @ tt.reconstruct(a, 16, 8)) @ tt.reconstruct(b, 8, 8)
        assert [c.shape[2] for c in branch.lora_A][:2] == [5, 5]
        torch.testing.assert_close(branch(x), want, rtol=1e-6, atol=1e-6)


def test_gpt2_conv1d_with_past_switchable(tmp_path):
    """GPT-2 (Conv1D projections, transposed weights) with the KV cache: the adapter active
    through every cached step gives PyTorch's merged model's greedy tokens."""
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    base = save_tiny("gpt2", tmp_path / "base")
    torch.manual_seed(4)
    adapter = save_loretta_adapter(perturb_trainable(get_loretta_model(
        build_tiny("gpt2"), RepConfig(r=4, tensor_rank=3, lora_dropout=0.0)), seed=4),
        tmp_path / "rep")
    report = export_onnx(base, tmp_path / "out", with_past=True,
                         switchable_adapters=[f"chat={adapter}"])
    v = report.switchable[0].validation
    assert v.passed and v.generation_match and v.adapter == "chat"
    assert report.validation.generation_match  # and the base with no adapter active
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    feed = probe_inputs(batch=1, seq=6, seed=9)
    past = {i.name: np.zeros((1, 4, 0, 16), np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values")}
    np_feed = {k: v.numpy() for k, v in feed.items()}
    plain = session.run(None, {**np_feed, **past})[0]
    on = _run_past(session, {**np_feed, **past}, tmp_path / "out" / "adapters" / "chat.onnx_adapter")
    from loretta_merge.adapters import load_loretta_model, merge_loretta_model

    merged = merge_loretta_model(load_loretta_model(build_tiny("gpt2"), adapter)).eval()
    with torch.no_grad():
        want = merged(**feed).logits.numpy()
    keep = feed["attention_mask"].numpy().astype(bool)  # the row's last 2 tokens are padding
    assert np.abs(on - want)[keep].max() < ATOL and np.abs(plain - want)[keep].max() > 1e-3


def _run_past(session, feed, adapter_file):
    adapter = ort.LoraAdapter()
    adapter.Load(str(adapter_file))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return session.run(None, feed, options)[0]
