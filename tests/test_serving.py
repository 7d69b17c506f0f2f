"""Adapter banks: one ONNX graph, every batch row its own adapter, in real ONNX Runtime.

A tiny BERT classifier and a tiny Llama (with the KV cache) are exported with
``adapter_bank=``, some slots filled at export; more adapters are loaded into free slots of
the running session with :class:`loretta_merge.serving.AdapterBank` (no re-export). Every row
of a mixed batch must equal the same row run ALONE in PyTorch with its adapter merged (rep
adapters through ``load_loretta_model`` + ``merge_loretta_model``, the LoRA adapter through
PEFT's own ``merge_and_unload``), rows with no adapter the base; for the decoder, the greedy
tokens and each step's logits through the cache equal PyTorch's full recomputation per row.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import build_tiny, perturb_trainable, run_main, save_tiny
from loretta_merge.converters.onnx import export_onnx
from loretta_merge.errors import ConfigError, ShapeError

ort = pytest.importorskip("onnxruntime")
peft = pytest.importorskip("peft")

# the two banks are session fixtures (an export each; conftest.py says why not module ones):
# this file is one unit of work of `make test` (fixtures/scheduling.py), so one worker runs
# all its tests and neither bank is exported twice

# the causal-LM bank has one layer: its export (a third of this file's time) takes about half
# as long, every layer's modules are banked alike, and the KV cache of several layers is
# test_export.py's; the seq-cls bank keeps two (one adapter's change of its tiny logits
# would be within the bar its tests set for a change)
LAYERS = {"bert": 2, "llama": 1}
ATOL = 1e-4
WORST: dict[str, float] = {}  # worst row difference of each exactness test (printed)


def _rep(arch: str, path, *, r: int, tensor_rank: int, seed: int, targets=None,
         full: bool = False):
    """A rep adapter of its low-rank modules only, or with ``full`` as ``train`` makes them by
    default: trained norms, and for a classifier the replaced pooler dense and the head."""
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import RepConfig

    torch.manual_seed(seed)
    only = {} if full else dict(train_norms=False, replace_dense=False,
                                task_type="FEATURE_EXTRACTION")
    model = get_loretta_model(build_tiny(arch, layers=LAYERS[arch]), RepConfig(
        r=r, lora_alpha=2 * r, tensor_rank=tensor_rank, lora_dropout=0.0, target_modules=targets,
        **only))
    perturb_trainable(model, seed=seed)
    return save_loretta_adapter(model, path)


def _lora(arch: str, path, *, seed: int, targets, std: float = 0.05, save=None):
    torch.manual_seed(seed)
    model = peft.get_peft_model(build_tiny(arch, layers=LAYERS[arch]), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, modules_to_save=save))
    perturb_trainable(model, seed=seed, std=std)
    model.save_pretrained(path)
    return path


def _merged(arch: str, path):
    """The independent PyTorch reference: the base with the adapter merged."""
    from loretta_merge.adapters import load_loretta_model, merge_loretta_model

    base = build_tiny(arch, layers=LAYERS[arch])
    if (path / "adapter_config.json").read_text().find('"LORA"') >= 0:
        return peft.PeftModel.from_pretrained(base, path).merge_and_unload().eval()
    return merge_loretta_model(load_loretta_model(base, path)).eval()


# --------------------------------------------------------------------------- seq-cls

@pytest.fixture(scope="session")
def cls_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank-cls")
    base = save_tiny("bert", root / "base")
    adapters = {
        # rep of two shapes on `query` (r 4 / TT rank 3 and r 8 / TT rank 2): two TT branches
        "small": _rep("bert", root / "rep-small", r=4, tensor_rank=3, seed=1,
                      targets=["query", "value"]),
        # as `train` makes it: + every LayerNorm, the replaced pooler dense and the head
        "wide": _rep("bert", root / "rep-wide", r=8, tensor_rank=2, seed=2, full=True,
                     targets=["query", "key", "attention.output.dense"]),
        "lora": _lora("bert", root / "lora", seed=3, std=0.3, save=["classifier"],
                      targets=["query", "value", "intermediate.dense"]),
    }
    late = _rep("bert", root / "rep-late", r=4, tensor_rank=2, seed=4, targets=["value"])
    out = root / "onnx"
    report = export_onnx(base, out, adapter_bank=6,
                         switchable_adapters=[f"{k}={v}" for k, v in adapters.items()])
    return root, base, adapters, late, out, report


def _cls_batch(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, 9), generator=g)
    mask = torch.ones(rows, 9, dtype=torch.long)
    for i in range(rows):  # right padding of different lengths
        mask[i, 9 - (i % 4):] = 0
    return ids, mask


def test_export_report_and_files(cls_bank):
    _, _, _, _, out, report = cls_bank
    b = report.bank
    assert b.size == 6 and b.slots == ["small", "wide", "lora", None, None, None]
    assert report.validation.passed and all(v.passed for v in b.slot_validation)
    assert [v.adapter for v in b.slot_validation] == ["small", "wide", "lora"]
    assert b.mixed_passed and b.mixed_rows[:4] == [-1, 0, 1, 2] and b.mixed_max_abs_diff < ATOL
    meta = json.loads((out / "bank.json").read_text())
    assert meta["slot_input"] == "adapter_slot" and meta["task"] == "seq-cls"
    assert "adapter_slot" in report.inputs and "adapter_slot" in meta["inputs"]
    # query holds two TT branches (the two rep shapes) and one factors branch (the LoRA)
    kinds = [br["kind"] for br in meta["modules"]["bert.encoder.layer.0.attention.self.query"]["branches"]]
    assert sorted(kinds) == ["factors", "tt", "tt"]
    # full tensors switched per row: the head (both adapters), the pooler dense ("wide"'s TT
    # layer, as the weight a merge writes) and every LayerNorm ("wide")
    assert {"classifier", "bert.pooler.dense", "bert.embeddings.LayerNorm"} <= set(meta["tensors"])
    assert meta["tensors"]["bert.pooler.dense"]["leaves"] == {"weight": [64, 64], "bias": [64]}
    base_bytes = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    assert b.bank_bytes < base_bytes


def test_mixed_batch_matches_each_row_alone_merged(cls_bank):
    from loretta_merge.serving import AdapterBank

    root, _, adapters, late, out, _ = cls_bank
    bank = AdapterBank.open(out, providers=["CPUExecutionProvider"])
    assert bank.session.get_providers()[0] == "CPUExecutionProvider"
    assert bank.load(late, name="late") == 3  # the first free slot, no re-export
    paths = {**adapters, "late": late}
    order = ["small", None, "wide", "lora", "late", "small", None, "lora", "wide", "late", 2]
    ids, mask = _cls_batch(len(order), seed=5)
    got = bank.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, order)
    refs = {name: _merged("bert", path) for name, path in paths.items()}
    refs[None] = build_tiny("bert")
    worst = 0.0
    for i, entry in enumerate(order):
        name = bank.slots[entry] if isinstance(entry, int) else entry
        with torch.no_grad():
            want = refs[name](input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits.numpy()
        diff = float(np.abs(got[i:i + 1] - want).max())
        assert diff < ATOL, (i, entry, diff)
        worst = max(worst, diff)
    WORST["seq-cls"] = worst
    print(f"seq-cls mixed batch of {len(order)} rows over 4 adapters: worst row diff {worst:.3g}")
    # each adapter really changes its rows, and differently from the others
    with torch.no_grad():
        plain = refs[None](input_ids=ids, attention_mask=mask).logits.numpy()
    for i, entry in enumerate(order):
        if entry is not None:
            assert np.abs(got[i] - plain[i]).max() > 1e-3, (i, entry)


def test_load_evict_without_reexport(cls_bank):
    from loretta_merge.serving import AdapterBank

    root, _, adapters, late, out, _ = cls_bank
    bank = AdapterBank.open(out, providers=["CPUExecutionProvider"])
    session = bank.session
    ids, mask = _cls_batch(3, seed=6)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    base = bank.run(feed, [None, None, None])
    with_wide = bank.run(feed, ["wide", "wide", None])
    assert bank.evict("wide") == 1 and bank.slots[1] is None
    assert all(not a[1].any() for a in bank.arrays.values())
    with pytest.raises(ConfigError, match="no adapter named 'wide'"):
        bank.run(feed, ["wide", None, None])
    with pytest.raises(ConfigError, match="slot 1 holds no adapter"):
        bank.run(feed, [1, None, None])
    assert bank.load(late, name="late") == 1  # into the freed slot
    want = _merged("bert", late)
    with torch.no_grad():
        ref = want(input_ids=ids, attention_mask=mask).logits.numpy()
    got = bank.run(feed, ["late", "late", None])
    assert np.abs(got[:2] - ref[:2]).max() < ATOL
    assert np.abs(got[2] - base[2]).max() < ATOL and np.abs(got[0] - with_wide[0]).max() > 1e-3
    assert bank.load(adapters["wide"], name="wide") == 3
    assert np.abs(bank.run(feed, ["wide", "wide", None]) - with_wide).max() < ATOL
    assert bank.session is session  # one session throughout


def test_bad_inputs_are_one_clear_error(cls_bank, tmp_path):
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import AdpConfig
    from loretta_merge.serving import AdapterBank

    root, _, adapters, late, out, _ = cls_bank
    bank = AdapterBank.open(out, providers=["CPUExecutionProvider"])
    ids, mask = _cls_batch(2, seed=7)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    cases = [
        (lambda: bank.run(feed, [0, 9]), "row 1: adapter slot 9 is out of range: this bank has 6 slots"),
        (lambda: bank.run(feed, [0, -2]), "row 1: adapter slot -2 is out of range"),
        (lambda: bank.run(feed, np.array([0.0, 1.0], np.float32)), "must be integers (int64)"),
        (lambda: bank.run(feed, [0.5, 1]), "row 0: adapter slot 0.5 is a float"),
        (lambda: bank.run(feed, [0]), "one entry per row: 2 rows"),
    ]
    for call, message in cases:
        with pytest.raises((ConfigError, ShapeError)) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    # an adapter whose shapes fit no branch of the bank: the module and both shapes named
    odd = _rep("bert", tmp_path / "odd", r=16, tensor_rank=2, seed=8, targets=["query"])
    with pytest.raises(ShapeError, match=r"module bert\.encoder\.layer\.0\.attention\.self\.query "
                                         r"\(64 -> 64\) is rep A \(64, 16\) .* fits none of the "
                                         r"bank's layouts .*rep A \(64, 4\)") as err:
        bank.load(odd)
    assert "\n" not in str(err.value)
    not_banked = _rep("bert", tmp_path / "ffn", r=4, tensor_rank=2, seed=9, targets=["layer.0.output.dense"])
    with pytest.raises(ShapeError, match=r"module bert\.encoder\.layer\.0\.output\.dense is not "
                                         r"in this bank"):
        bank.load(not_banked)
    adp = save_loretta_adapter(get_loretta_model(build_tiny("bert"), AdpConfig(
        train_norms=False, replace_dense=False, task_type="FEATURE_EXTRACTION")), tmp_path / "adp")
    with pytest.raises(ConfigError, match="is LoRETTA_adp, whose bottleneck is not linear"):
        bank.load(adp)
    other_tensor = _lora("bert", tmp_path / "ffn-head", seed=10, targets=["query"],
                         save=["layer.1.output.dense"])
    with pytest.raises(ShapeError, match=r"trains the full tensor bert\.encoder\.layer\.1\.output"
                                         r"\.dense\.(weight|bias), which this bank does not switch"):
        bank.load(other_tensor)
    assert bank.slots == ["small", "wide", "lora", None, None, None]  # nothing half-loaded
    for i in range(3):
        bank.load(late, name=f"late{i}")
    with pytest.raises(ConfigError, match="the bank is full: all 6 slots hold adapters"):
        bank.load(late, name="one-more")


def test_cli_bank_refusals_are_one_line(cls_bank, tmp_path, capsys):
    _, base, adapters, _, _, _ = cls_bank
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import AdpConfig

    adp = save_loretta_adapter(get_loretta_model(build_tiny("bert"), AdpConfig(
        train_norms=False, replace_dense=False, task_type="FEATURE_EXTRACTION")), tmp_path / "adp")
    embed = _lora("bert", tmp_path / "embed", seed=19, targets=["query"], save=["word_embeddings"])
    out = tmp_path / "o"
    cases = [
        (["--adapter-bank", "2", "--switchable-adapter", f"e={embed}"],
         "trains bert.embeddings.word_embeddings.weight, a tensor of a Embedding; a bank switches"),
        (["--adapter-bank", "1", "--switchable-adapter", f"a={adapters['small']}",
          "--switchable-adapter", f"b={adapters['wide']}"], "the bank is full: 2 --switchable-adapter"),
        (["--adapter-bank", "0"], "must be a whole number of slots from 1"),
        (["--adapter-bank", "2", "--switchable-adapter", f"x={adp}"], "is LoRETTA_adp"),
        (["--adapter-bank", "2", "--quantize", "int8"], "--quantize with --adapter-bank"),
    ]
    for extra, message in cases:
        code, _, err = run_main(["export", "onnx", base, "-o", out, *extra], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


# --------------------------------------------------------------------------- causal-lm

@pytest.fixture(scope="session")
def lm_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank-lm")
    base = save_tiny("llama", root / "base", layers=LAYERS["llama"])
    adapters = {
        "alpha": _rep("llama", root / "rep-a", r=4, tensor_rank=3, seed=11, targets=["q_proj", "v_proj"]),
        # + every RMSNorm trained, as `train` makes it
        "beta": _rep("llama", root / "rep-b", r=8, tensor_rank=2, seed=12, full=True,
                     targets=["q_proj", "o_proj", "gate_proj"]),
    }
    lora = _lora("llama", root / "lora", seed=13, targets=["q_proj", "v_proj", "down_proj"])
    out = root / "onnx"
    # validate=False: the export's own checks run in the seq-cls fixture; this module checks
    # more than they do (every row of a mixed batch through the cache, steps recomputed)
    report = export_onnx(base, out, adapter_bank=4, with_past=True, validate=False,
                         switchable_adapters=[f"{k}={v}" for k, v in adapters.items()]
                         + [f"gamma={lora}"])
    return root, {**adapters, "gamma": lora}, out, report


def _torch_greedy(model, prompt: torch.Tensor, steps: int):
    """Greedy tokens and last-position logits of one unpadded prompt, recomputing the whole
    sequence at every step (no cache): independent of the graph's KV-cache path."""
    ids, tokens, logits = prompt[None], [], []
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=ids, use_cache=False).logits[0, -1]
            logits.append(last.numpy())
            tokens.append(int(last.argmax()))
            ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
    return tokens, np.stack(logits)


def test_greedy_decoding_each_row_its_adapter(lm_bank):
    from loretta_merge.serving import AdapterBank

    root, paths, out, report = lm_bank
    assert report.bank.slots == ["alpha", "beta", "gamma", None] and report.validation is None
    bank = AdapterBank.open(out, providers=["CPUExecutionProvider"])
    late = _rep("llama", root / "rep-late", r=4, tensor_rank=3, seed=14, targets=["v_proj"])
    assert bank.load(late, name="late") == 3
    paths = {**paths, "late": late}
    order = ["alpha", "gamma", None, "beta", "late", "alpha", None, "gamma"]
    lengths = [6, 4, 5, 6, 3, 5, 6, 2]
    g = torch.Generator().manual_seed(15)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = np.zeros((len(order), width), np.int64)
    mask = np.zeros((len(order), width), np.int64)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):], mask[i, width - len(p):] = p.numpy(), 1
    steps = 4
    tokens, logits = bank.generate(ids, order, steps, attention_mask=mask, return_logits=True)
    assert tokens.shape == (len(order), steps) and logits.shape[:2] == (steps, len(order))
    refs = {name: _merged("llama", p) for name, p in paths.items()}
    refs[None] = build_tiny("llama", layers=LAYERS["llama"])
    worst = 0.0
    for i, name in enumerate(order):
        want_tokens, want_logits = _torch_greedy(refs[name], prompts[i], steps)
        assert tokens[i].tolist() == want_tokens, (i, name)
        diff = float(np.abs(logits[:, i] - want_logits).max())
        assert diff < ATOL, (i, name, diff)
        worst = max(worst, diff)
    WORST["causal-lm"] = worst
    print(f"causal-lm greedy {steps} steps, {len(order)} rows over 4 adapters + base: worst "
          f"logit diff {worst:.3g}")
    # rows of different adapters on the same prompt really decode differently somewhere
    plain = bank.run({"input_ids": ids, "attention_mask": mask}, [None] * len(order))
    mixed = bank.run({"input_ids": ids, "attention_mask": mask}, order)
    keep = mask.astype(bool)
    changed = [np.abs(mixed[i] - plain[i])[keep[i]].max() for i in range(len(order))]
    assert all((c > 1e-3) == (name is not None) for c, name in zip(changed, order))


def test_default_layout_when_no_adapter_fills_the_bank(tmp_path):
    """With no --switchable-adapter the bank is laid out for the base's default LoRETTA_rep
    adapter (its default targets, r 8, TT rank 5): such an adapter fits its slots exactly
    (TT branches, no padding), and an adapter of another rank does not."""
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.converters.onnx.bank import slot_values
    from loretta_merge.converters.onnx.bank_export import plan_bank
    from loretta_merge.formats import read_adapter

    layout = plan_bank({}, build_tiny("llama", layers=LAYERS["llama"]), 2)
    assert layout.slots == [None, None]
    assert sorted({m.rsplit(".", 1)[1] for m in layout.modules}) == ["q_proj", "v_proj"]
    model = perturb_trainable(get_loretta_model(build_tiny("llama", layers=LAYERS["llama"]), RepConfig(
        lora_dropout=0.0, train_norms=False)), seed=16)
    adapter = read_adapter(save_loretta_adapter(model, tmp_path / "rep"))
    values = slot_values("rep", adapter, layout)
    module = "model.layers.0.self_attn.q_proj"
    cores = adapter.modules[module].a.cores
    assert [values[f"{module}.bank.0.lora_A.{k}"].shape for k in range(len(cores))] == [
        tuple(c.shape) for c in cores]
    assert np.array_equal(values[f"{module}.bank.0.lora_A.0"], cores[0].numpy())
    other = read_adapter(_rep("llama", tmp_path / "r4", r=4, tensor_rank=5, seed=17,
                              targets=["q_proj"]))
    with pytest.raises(ShapeError, match=r"q_proj \(64 -> 64\) is rep A \(64, 4\)"):
        slot_values("r4", other, layout)


def test_bank_size_is_chosen_when_serving(cls_bank):
    """The graph's slot axis is dynamic: the same export serves a bank of 64 slots (or 3),
    with the same rows, and refuses to drop a slot filled at export."""
    from loretta_merge.serving import AdapterBank

    _, _, _, late, out, _ = cls_bank
    ids, mask = _cls_batch(4, seed=18)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    six = AdapterBank.open(out, providers=["CPUExecutionProvider"])
    six.load(late, name="late")
    want = six.run(feed, ["small", "late", None, "lora"])
    big = AdapterBank.open(out, providers=["CPUExecutionProvider"], slots=64)
    assert big.size == 64 and big.slots[:3] == ["small", "wide", "lora"]
    assert big.load(late, name="late", slot=63) == 63
    assert all(a.shape[0] == 64 for a in big.arrays.values())
    assert np.abs(big.run(feed, ["small", 63, None, "lora"]) - want).max() < 1e-6
    small = AdapterBank.open(out, providers=["CPUExecutionProvider"], slots=3)
    assert np.abs(small.run(feed, [0, None, None, 2])[[0, 3]] - want[[0, 3]]).max() < 1e-6
    with pytest.raises(ConfigError, match="slots=2 would drop slot 2, which holds adapter 'lora'; evict it first"):
        AdapterBank.open(out, slots=2)
