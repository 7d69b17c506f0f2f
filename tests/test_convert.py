"""LoRA <-> TT conversion against the real PEFT package on tiny offline models.

Invariants: full-rank PEFT LoRA -> TT -> LoRA gives the original delta to fp32 rounding;
a LoRETTA_rep model converted to LoRA and loaded by ``PeftModel.from_pretrained`` (no
missing/unexpected keys) gives the LoRETTA model's logits; ``eps`` holds on every factor,
checked by reconstructing the written cores; bad input gets a clear LorettaError.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import build_tiny, probe_inputs
from loretta_merge import tt
from loretta_merge.adapters.config import RepConfig
from loretta_merge.converters.lora import lora_to_tt, tt_to_lora, write_peft_lora
from loretta_merge.errors import ConfigError, FormatError, OutputExistsError
from loretta_merge.formats import Adapter, LoraModule, read_adapter, write_adapter
from loretta_merge.adapters import get_loretta_model, load_loretta_model, save_loretta_adapter

peft = pytest.importorskip("peft")

# arch -> (PEFT target modules, fan_in_fan_out)
LORA_TARGETS = {"llama": (["q_proj", "v_proj", "down_proj"], False),
                "gpt2": (["c_attn", "c_proj"], True),
                "bert": (["query", "value", "intermediate.dense"], False)}
FULL = 10**6  # a tensor-rank cap that never binds: exact TT-SVD


def make_peft_lora(arch: str, path: Path, *, seed: int = 1, **kwargs) -> Path:
    """A saved PEFT LoRA with random (non-zero) A and B on a tiny model."""
    targets, fifo = LORA_TARGETS[arch]
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fifo,
               init_lora_weights=False)
    if arch == "bert":
        cfg["task_type"] = "SEQ_CLS"
    cfg.update(kwargs)
    torch.manual_seed(seed)
    model = peft.get_peft_model(build_tiny(arch), peft.LoraConfig(**cfg))
    with torch.no_grad():  # make the saved head differ from a fresh base
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


def peft_load(arch: str, lora_dir: Path, caplog):
    """PeftModel.from_pretrained on a fresh base; fail on any missing/unexpected-key message."""
    base = build_tiny(arch)
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(lora_dir))
        again = model.load_adapter(str(lora_dir), adapter_name="check")
    text = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    bad = [t for t in text if "missing" in t.lower() or "unexpected" in t.lower()]
    assert not bad, bad
    assert not again.unexpected_keys
    assert not [k for k in again.missing_keys if "check" in k]
    model.set_adapter("default")
    return model.eval()


def logits(model, arch: str):
    with torch.no_grad():
        return model(**probe_inputs()).logits


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_full_rank_round_trip_and_peft_load(arch, tmp_path, caplog):
    src = make_peft_lora(arch, tmp_path / "lora")
    original = read_adapter(src)
    tt_adapter, report = lora_to_tt(src, tensor_rank=FULL)
    assert report.summary()["max_err_delta"] < 2e-6
    assert set(tt_adapter.modules) == set(original.modules)
    assert tt_adapter.fan_in_fan_out == original.fan_in_fan_out
    assert (len(original.fan_in_fan_out) > 0) == (arch == "gpt2")
    assert set(tt_adapter.tensors) == set(original.tensors)
    write_adapter(tt_adapter, tmp_path / "tt")

    lora, back = tt_to_lora(tmp_path / "tt")
    assert back.summary()["max_err_delta"] == 0.0
    write_peft_lora(lora, tmp_path / "out")
    again = read_adapter(tmp_path / "out")
    assert again.source == "peft" and set(again.modules) == set(original.modules)
    for name, m in original.modules.items():
        assert rel(again.modules[name].delta(), m.delta()) < 2e-6, name
        assert again.modules[name].scale == pytest.approx(m.scale)
    for key, value in original.tensors.items():
        torch.testing.assert_close(again.tensors[key], value, rtol=0, atol=0)

    # PEFT loads the converted LoRA and gives the original PEFT model's logits.
    ref = peft.PeftModel.from_pretrained(build_tiny(arch), str(src)).eval()
    conv = peft_load(arch, tmp_path / "out", caplog)
    torch.testing.assert_close(logits(conv, arch), logits(ref, arch))
    # ... and so does the LoRETTA model built from the TT adapter.
    if arch != "bert":  # bert: the PEFT head sits in modules_to_save, compared above
        lor = load_loretta_model(build_tiny(arch), tmp_path / "tt")
        torch.testing.assert_close(logits(lor, arch), logits(ref, arch))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_loretta_model_to_peft_equals_loretta(arch, tmp_path, caplog):
    """A LoRETTA_rep model (norms, head, replaced pooler dense) -> PEFT LoRA: same logits."""
    torch.manual_seed(3)
    model = get_loretta_model(build_tiny(arch), RepConfig(r=4, lora_alpha=12, tensor_rank=3))
    with torch.no_grad():  # "trained": perturb every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    save_loretta_adapter(model, tmp_path / "tt")
    lora, report = tt_to_lora(tmp_path / "tt")
    write_peft_lora(lora, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 12
    norms = [m for m in report.modules_to_save if "norm" in m.lower() or m.endswith("ln_1")]
    assert norms, report.modules_to_save  # trained norms are not lost
    if arch == "bert":
        assert report.replaced_dense == ["bert.pooler.dense"]
        assert "bert.pooler.dense" in cfg["modules_to_save"] and "classifier" in cfg["modules_to_save"]
        keys = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
        assert keys["base_model.model.bert.pooler.dense.weight"].shape == (64, 64)
    conv = peft_load(arch, tmp_path / "out", caplog)
    torch.testing.assert_close(logits(conv, arch), logits(model, arch))


def test_rank_pattern_and_rslora(tmp_path, caplog):
    src = make_peft_lora("llama", tmp_path / "lora", r=4, lora_alpha=8, use_rslora=True,
                         rank_pattern={"v_proj": 6}, alpha_pattern={"down_proj": 3})
    original = read_adapter(src)
    ranks = {n: m.a.shape[0] for n, m in original.modules.items()}
    assert set(ranks.values()) == {4, 6}
    tt_adapter, report = lora_to_tt(src, tensor_rank=FULL, shapes="auto")
    assert {m.r for m in report.modules} == {4, 6}
    write_adapter(tt_adapter, tmp_path / "tt")
    lora, _ = tt_to_lora(tmp_path / "tt")
    write_peft_lora(lora, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and set(cfg["rank_pattern"].values()) == {6}
    again = read_adapter(tmp_path / "out")
    for name, m in original.modules.items():
        assert again.modules[name].scale == pytest.approx(m.scale)
        assert rel(again.modules[name].delta(), m.delta()) < 2e-6
    ref = peft.PeftModel.from_pretrained(build_tiny("llama"), str(src)).eval()
    torch.testing.assert_close(logits(peft_load("llama", tmp_path / "out", caplog), "llama"),
                               logits(ref, "llama"))


def test_rank_truncation_is_the_optimal_svd(tmp_path):
    src = make_peft_lora("llama", tmp_path / "lora", r=6)
    tt_adapter, _ = lora_to_tt(src, tensor_rank=FULL)
    lora, report = tt_to_lora(tt_adapter, rank=2)
    by_name = {m.name: m for m in report.modules}
    for name, m in tt_adapter.modules.items():
        full = m.delta().double()
        s = torch.linalg.svdvals(full)
        best = float((s[2:] ** 2).sum().sqrt() / s.norm())  # Eckart-Young
        got = rel(lora.modules[name].delta(), full)
        assert lora.modules[name].a.shape[0] == 2
        assert got == pytest.approx(best, rel=1e-4, abs=1e-6)
        assert by_name[name].err_delta == pytest.approx(got, rel=1e-4, abs=1e-6)
        assert got > 1e-3  # the truncation really dropped something


# --------------------------------------------------------------------------- eps

def structured_adapter(seed: int = 0) -> Adapter:
    """'Trained-like' factors: low TT rank plus 3% noise, several same-shaped modules."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(3):
        mats = []
        for rows, cols in ((256, 8), (8, 128)):
            modes = tt.matrix_modes(rows, cols, shapes="auto")
            x = tt.reconstruct(tt.random_cores(modes, 2, rows, cols, generator=g), rows, cols)
            noise = torch.randn(rows, cols, generator=g)
            mats.append(x / x.norm() + 0.03 * noise / noise.norm())
        modules[f"layers.{i}.proj"] = LoraModule(a=mats[0].T.contiguous(), b=mats[1].T.contiguous(), scale=2.0)
    return Adapter(method="lora", source="peft", modules=modules, tensors={},
                   config={"r": 8, "lora_alpha": 16}, fan_in_fan_out=set())


def peft_trained_lora(path: Path) -> Path:
    """A PEFT LoRA really trained (a few Adam steps of next-token loss on fixed tokens)."""
    torch.manual_seed(5)
    model = peft.get_peft_model(build_tiny("llama"), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = probe_inputs(batch=4, seq=12)["input_ids"]
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,eps", [("random", 0.3), ("random", 0.6), ("trained", 0.1),
                                      ("peft-trained", 0.2)])
def test_eps_is_honoured(kind, eps, tmp_path):
    src = {"random": lambda: make_peft_lora("llama", tmp_path / "lora", r=8),
           "trained": structured_adapter,
           "peft-trained": lambda: peft_trained_lora(tmp_path / "lora")}[kind]()
    original = src if isinstance(src, Adapter) else read_adapter(src)
    tt_adapter, report = lora_to_tt(src, eps=eps, shapes="auto")
    assert report.eps_met is True
    write_adapter(tt_adapter, tmp_path / "tt")
    written = read_adapter(tmp_path / "tt")
    truncated = False
    for name, m in original.modules.items():  # independent check on the written cores
        w = written.modules[name]
        ea, eb = rel(w.a.matrix(), m.a.T), rel(w.b.matrix(), m.b.T)
        assert max(ea, eb) <= eps, (name, ea, eb)
        delta_err = rel(w.delta(), m.delta())
        rep = next(r for r in report.modules if r.name == name)
        assert rep.err_delta == pytest.approx(delta_err, rel=1e-3, abs=1e-6)
        # the stated bound, relative to |A||B|
        bound = ((1 + ea) * (1 + eb) - 1) * float(m.a.norm() * m.b.norm() * m.scale)
        assert float((w.delta() - m.delta()).norm()) <= bound * (1 + 1e-5)
        truncated |= max(ea, eb) > 1e-4
    assert truncated  # eps really cut ranks
    if kind == "trained":  # random factors are incompressible: TT may even be larger
        assert report.compression > 2.0
    else:
        assert (report.compression < 1.0) == any("larger than the LoRA" in n for n in report.notes)


def test_rank_cap_can_break_eps_and_says_so():
    _, report = lora_to_tt(structured_adapter(), eps=0.01, tensor_rank=1, shapes="auto")
    assert report.eps_met is False
    assert any("not met" in n for n in report.notes)


# --------------------------------------------------------------------------- bad input

def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match=r"eps must be a relative error in \(0, 1\)"):
        lora_to_tt(structured_adapter(), eps=1.5)
    with pytest.raises(ConfigError, match=r"eps must be a relative error in \(0, 1\)"):
        lora_to_tt(structured_adapter(), eps=0.0)
    with pytest.raises(ConfigError, match="needs --tensor-rank N"):
        lora_to_tt(structured_adapter())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="adapter_config.json"):
        lora_to_tt(empty, eps=0.1)
    with pytest.raises(FormatError, match="not a directory"):
        lora_to_tt(tmp_path / "nope", eps=0.1)

    dora = make_peft_lora("llama", tmp_path / "dora", use_dora=True)
    with pytest.raises(ConfigError, match=r"module model\.layers\.0\..*is DoRA"):
        lora_to_tt(dora, eps=0.1)

    emb = make_peft_lora("llama", tmp_path / "emb", target_modules=["embed_tokens"])
    with pytest.raises(FormatError, match="embedding LoRA"):
        lora_to_tt(emb, eps=0.1)

    src = make_peft_lora("llama", tmp_path / "broken")
    state = load_file(str(src / "adapter_model.safetensors"))
    gone = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    del state[gone]
    save_file(state, str(src / "adapter_model.safetensors"))
    with pytest.raises(FormatError, match=r"model\.layers\.0\.self_attn\.q_proj has lora_A.weight but no lora_B"):
        lora_to_tt(src, eps=0.1)

    good = make_peft_lora("llama", tmp_path / "good")
    with pytest.raises(FormatError, match="not LoRETTA_rep"):
        tt_to_lora(good)
    tt_adapter, _ = lora_to_tt(good, tensor_rank=2)
    with pytest.raises(FormatError, match="is a 'rep' adapter.*not a PEFT LoRA"):
        lora_to_tt(tt_adapter, eps=0.1)
    lora, _ = tt_to_lora(tt_adapter)
    write_peft_lora(lora, tmp_path / "out")
    with pytest.raises(OutputExistsError, match="already exists"):
        write_peft_lora(lora, tmp_path / "out")
    write_peft_lora(lora, tmp_path / "out", force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


# --------------------------------------------------------------------------- CLI

def test_cli_both_directions(tmp_path, caplog):
    from loretta_merge.cli import cli

    src = make_peft_lora("gpt2", tmp_path / "lora")
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", "lora-to-tt", str(src), "-o", str(tmp_path / "tt"),
                              "--eps", "0.5", "--tensor-rank", "4", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["direction"] == "lora-to-tt"
    assert data["summary"]["modules"] == len(read_adapter(src).modules) == 6
    assert data["summary"]["worst_module"] in {m["name"] for m in data["modules"]}
    assert read_adapter(tmp_path / "tt").method == "rep"

    res = runner.invoke(cli, ["convert", "tt-to-lora", str(tmp_path / "tt"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "delta error" in res.output and "wrote" in res.output
    peft_load("gpt2", tmp_path / "out", caplog)

    res = runner.invoke(cli, ["convert", "tt-to-lora", str(tmp_path / "tt"), "-o", str(tmp_path / "out")])
    assert isinstance(res.exception, OutputExistsError)


def test_cli_one_line_error(tmp_path):
    src = make_peft_lora("llama", tmp_path / "lora")
    proc = subprocess.run([sys.executable, "-m", "loretta_merge.cli", "convert", "lora-to-tt", str(src),
                           "-o", str(tmp_path / "tt"), "--eps", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: eps must be a relative error in (0, 1)")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "tt").exists()


def test_authors_loretta01_rep_to_peft(tmp_path, caplog):
    """The authors' own checkpoint (loretta 0.1.0, pickled .bin read with weights_only)."""
    import transformers

    from loretta_merge.cli import cli

    fixture = Path(__file__).parent / "fixtures" / "loretta01" / "rep-llama"
    res = CliRunner().invoke(cli, ["convert", "tt-to-lora", str(fixture), "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["summary"]["max_err_delta"] == 0.0
    lora = read_adapter(tmp_path / "out")
    ref = load_file(str(fixture / "reference.safetensors"))
    names = {k.rsplit(".", 1)[0] for k in ref}
    assert names == set(lora.modules)
    for name in names:  # loretta's own layer output: lora_B(lora_A(x)) * scaling
        m = lora.modules[name]
        torch.testing.assert_close(ref[f"{name}.x"] @ m.a.T @ m.b.T * m.scale, ref[f"{name}.y"])

    def base():
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=768, intermediate_size=1024,
                                       num_hidden_layers=1, num_attention_heads=12, num_key_value_heads=12,
                                       max_position_embeddings=32, tie_word_embeddings=False)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()

    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conv = peft.PeftModel.from_pretrained(base(), str(tmp_path / "out")).eval()
    text = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [t for t in text if "missing" in t.lower() or "unexpected" in t.lower()]
    lor = load_loretta_model(base(), fixture)
    ids = probe_inputs(vocab_size=64)
    with torch.no_grad():
        torch.testing.assert_close(conv(**ids).logits, lor(**ids).logits)


# --------------------------------------------------------------------------- tt-to-lora measures its error

def test_tt_to_lora_error_is_measured_not_a_constant(tmp_path, monkeypatch):
    """The report's delta error compares the delta PEFT will compute from the result (its
    factors and the scale from the written r/alpha/patterns) with the TT delta. A correct
    conversion measures 0; a corrupted one (a factor perturbed, a scale lost) measures the
    damage."""
    import loretta_merge.converters.lora as conv
    import loretta_merge.formats.peft as fpeft

    src = make_peft_lora("llama", tmp_path / "lora", rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    tt_adapter, _ = lora_to_tt(src, tensor_rank=FULL)
    _, good = tt_to_lora(tt_adapter)
    assert [m.err_delta for m in good.modules] == [0.0] * len(good.modules)

    real_module = conv._lora_module

    def perturbed(m, rank):  # a conversion that damages one factor by ~1e-2
        out = real_module(m, rank)
        out.b = out.b + 1e-2 * out.b.norm() / out.b.numel() ** 0.5 * torch.randn_like(out.b)
        return out

    monkeypatch.setattr(conv, "_lora_module", perturbed)
    _, bad = tt_to_lora(tt_adapter)
    assert all(1e-3 < m.err_delta < 1e-1 for m in bad.modules), [m.err_delta for m in bad.modules]
    monkeypatch.undo()

    real_config = fpeft.peft_lora_config

    def no_alpha_pattern(adapter):  # a config that forgets the per-module alphas
        return {**real_config(adapter), "alpha_pattern": {}}

    monkeypatch.setattr(conv, "peft_lora_config", no_alpha_pattern)
    _, lost = tt_to_lora(tt_adapter)
    errs = {m.name: m.err_delta for m in lost.modules}
    scales = {n: m.scale for n, m in tt_adapter.modules.items()}
    for name, err in errs.items():
        config_scale = 8 / (2 if name.endswith("v_proj") else 4)
        assert err == pytest.approx(abs(scales[name] - config_scale) / scales[name], rel=1e-5), name
    assert max(errs.values()) > 0.5


def test_tt_to_lora_cli_prints_the_measured_error(tmp_path):
    from loretta_merge.cli import cli

    src = make_peft_lora("llama", tmp_path / "lora")
    tt_adapter, _ = lora_to_tt(src, tensor_rank=2)  # lossy TT: tt-to-lora is still exact
    write_adapter(tt_adapter, tmp_path / "tt")
    res = CliRunner().invoke(cli, ["convert", "tt-to-lora", str(tmp_path / "tt"), "-o",
                                   str(tmp_path / "out"), "--rank", "1", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)["summary"]
    assert 1e-3 < summary["max_err_delta"] < 1.0  # rank 1 of a rank-4 delta loses a real amount
