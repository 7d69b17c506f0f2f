"""`loretta-merge extract BASE FINETUNED`: recovery of a known low-rank delta, rank rules,
real PEFT loading and merging, loretta-merge merging the TT form, mergekit agreement, and
one-line refusals that write nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from loretta_merge.cli import cli
from loretta_merge.converters.extract import extract
from loretta_merge.converters.lowrank import choose_rank, kept_energy, tail_error
from loretta_merge.errors import ConfigError, LorettaError, ShapeError
from loretta_merge.formats import read_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

DELTA_RANK = 4
TARGET_KEYS = ("query", "value", "q_proj", "v_proj")


def _config(kind: str, **over):
    if kind == "bert":
        kw = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64)
        kw.update(over)
        return transformers.BertConfig(**kw), transformers.BertModel
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=False)
    kw.update(over)
    return transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM


def build(kind: str, seed: int = 0, **over):
    cfg, cls = _config(kind, **over)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def make_pair(kind: str, root: Path, *, seed: int = 0) -> tuple[Path, Path, dict]:
    """BASE and a 'fine-tune' = BASE + a rank-4 delta on the default targets + shifted norms.
    Returns (base dir, ft dir, {weight key: delta (out, in)})."""
    model = build(kind, seed)
    base, ft = root / f"{kind}-base", root / f"{kind}-ft"
    model.save_pretrained(base)
    g = torch.Generator().manual_seed(seed + 1)
    deltas = {}
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim == 2 and any(f".{t}." in key for t in TARGET_KEYS):
                d = (torch.randn(p.shape[0], DELTA_RANK, generator=g)
                     @ torch.randn(DELTA_RANK, p.shape[1], generator=g)) * 0.02
                p.add_(d)
                deltas[key] = d
            elif "LayerNorm.weight" in key or key.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(ft, max_shard_size="40KB")  # sharded: the index path is read too
    return base, ft, deltas


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-pairs")
    return {kind: make_pair(kind, root) for kind in ("bert", "llama")}


def run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def peft_merged(kind: str, base_dir: Path, lora_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT loads the LoRA on a fresh base (no missing/unexpected keys) and merges it."""
    base = type(build(kind)).from_pretrained(base_dir).eval()
    model = peft.PeftModel.from_pretrained(base, str(lora_dir))
    again = model.load_adapter(str(lora_dir), adapter_name="check")
    assert not again.unexpected_keys
    assert not [k for k in again.missing_keys if "check" in k]
    model.set_adapter("default")
    model.delete_adapter("check")
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(d.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


# --------------------------------------------------------------------------- rank rules

def test_choose_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])     # energies 16, 4, 1, 1, 0 of 22
    assert choose_rank(s, rank=3) == 3
    assert choose_rank(s, energy=16 / 22) == 1
    assert choose_rank(s, energy=0.9) == 2          # 20/22 = 0.909
    assert choose_rank(s, energy=1.0) == 4          # the zero is never needed
    assert choose_rank(s, eps=math.sqrt(2 / 22) + 1e-9) == 2
    assert choose_rank(s, eps=0.01) == 4
    assert choose_rank(s, energy=1.0, rank=2) == 2   # --rank caps
    assert kept_energy(s, 2) == pytest.approx(20 / 22)
    assert tail_error(s, 2) == pytest.approx(math.sqrt(2 / 22))
    assert choose_rank(torch.zeros(3), energy=0.5) == 1


# --------------------------------------------------------------------------- LoRA

@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_lora_recovers_delta_and_peft_merges_it(kind, pairs, tmp_path):
    base, ft, deltas = pairs[kind]
    out = tmp_path / "lora"
    res = run(["extract", str(base), str(ft), "-o", str(out), "--rank", str(DELTA_RANK), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["summary"]["modules"] == len(deltas)
    assert report["summary"]["max_err"] < 1e-5
    carried = set(report["carried"])
    assert carried and all("norm" in k.lower() for k in carried)  # norms (whole modules for PEFT)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == DELTA_RANK
    # the file's factors give the known delta
    state = load_file(out / "adapter_model.safetensors")
    for key, d in deltas.items():
        m = "base_model.model." + key[: -len(".weight")]
        got = state[f"{m}.lora_B.weight"] @ state[f"{m}.lora_A.weight"]
        assert rel(got, d) < 1e-5, key
    # real PEFT: loads with no missing/unexpected keys; its merged model is the fine-tune
    merged = peft_merged(kind, base, out)
    ft_state = load_dir(ft)
    for key, value in ft_state.items():
        assert torch.allclose(merged[key], value, atol=1e-6, rtol=0), key


def test_energy_and_eps_choose_ranks(pairs):
    base, ft, deltas = pairs["llama"]
    svals = {k[: -len(".weight")]: torch.linalg.svdvals(d) for k, d in deltas.items()}
    for opts, rule in (({"energy": 0.9}, {"energy": 0.9}), ({"eps": 0.3}, {"eps": 0.3}),
                       ({"energy": 1.0}, {"energy": 1.0})):
        _, report = extract(base, ft, **opts)
        for row in report.modules:
            s = svals[row.name]
            want = choose_rank(s, **rule)
            # the delta's rank-4 singular values decide; float noise beyond them never does
            assert row.rank == want, (opts, row.name, row.rank, want)
            assert row.err == pytest.approx(tail_error(s, want), abs=2e-5)
            assert row.energy == pytest.approx(kept_energy(s, want), abs=1e-5)
            if "eps" in opts:
                assert row.err <= opts["eps"] + 1e-6
            if "energy" in opts:
                assert row.energy >= opts["energy"] - 1e-6
    _, report = extract(base, ft, rank=2)
    assert {r.rank for r in report.modules} == {2}
    for row in report.modules:  # the measured error of the written factors is the SVD tail
        assert row.err == pytest.approx(tail_error(svals[row.name], 2), rel=1e-4)


def test_all_linear_and_target_modules(pairs, tmp_path):
    base, ft, deltas = pairs["llama"]
    _, report = extract(base, ft, rank=4, target_modules="all-linear")
    # untouched Linear weights are unchanged: not written, not reported as modules
    assert {r.name for r in report.modules} == {k[: -len(".weight")] for k in deltas}
    _, report = extract(base, ft, rank=4, target_modules=["q_proj"])
    assert all(r.name.endswith("q_proj") for r in report.modules)
    assert any(k.endswith("v_proj.weight") for k in report.carried)  # changed, not targeted
    assert any("carried whole" in n for n in report.notes)
    with pytest.raises(ConfigError, match="matches no Linear module"):
        extract(base, ft, rank=4, target_modules=["nonexistent"])


# --------------------------------------------------------------------------- TT

def test_tt_output_merges_with_loretta_merge(pairs, tmp_path):
    from loretta_merge.merge import merge

    base, ft, deltas = pairs["llama"]
    out = tmp_path / "tt"
    res = run(["extract", str(base), str(ft), "-o", str(out), "--to", "tt", "--rank", "4",
               "--tensor-rank", "4", "--fit-steps", "100", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    adapter = read_adapter(out)
    assert adapter.method == "rep" and set(adapter.modules) == {k[:-7] for k in deltas}
    rows = {m["name"]: m for m in report["modules"]}
    for row in rows.values():  # the better of TT-SVD and the fit is kept and reported
        assert row["err_tt_fit"] is not None and row["tt_method"] in ("als", "tt-svd")
        assert row["err"] == pytest.approx(min(row["err_tt_svd"], row["err_tt_fit"]))
        assert row["err"] <= row["err_tt_svd"]
    merged_dir = tmp_path / "merged"
    merge(base, [(out, 1.0)], merged_dir, progress=False, device="cpu")
    merged = {}
    for f in merged_dir.glob("*.safetensors"):
        merged.update(load_file(f))
    base_state, ft_state = load_dir(base), load_dir(ft)
    for key, d in deltas.items():
        got = merged[key] - base_state[key]
        # the merged model's delta is the adapter's: its error against the true delta is the reported one
        assert rel(got, d) == pytest.approx(rows[key[:-7]]["err"], rel=1e-3, abs=1e-6), key
    for key in report["carried"]:
        assert torch.equal(merged[key], ft_state[key])


def test_tt_exact_with_full_tensor_rank(pairs):
    """Enough TT rank makes the TT form exact too (TT-SVD alone, no fit)."""
    base, ft, deltas = pairs["llama"]
    _, report = extract(base, ft, to="tt", rank=4, tensor_rank=64, fit_steps=0)
    assert max(r.err for r in report.modules) < 1e-5


# --------------------------------------------------------------------------- mergekit

@pytest.mark.slow
def test_agrees_with_mergekit_extract_lora(pairs, tmp_path):
    exe = Path(sys.executable).with_name("mergekit-extract-lora")
    if not exe.exists():
        pytest.fail("mergekit-extract-lora is not installed: `pip install -e '.[test]'` brings it")
    base, ft, deltas = pairs["llama"]
    rank = 2  # below the delta's rank: both must keep the same top singular directions
    mk = tmp_path / "mergekit"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([str(exe), "--model", str(ft.resolve()), "--base-model", str(base.resolve()),
                           "--out-path", str(mk), "--max-rank", str(rank)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert (mk / "adapter_model.safetensors").exists(), proc.stderr[-2000:]
    theirs = load_file(mk / "adapter_model.safetensors")
    mk_cfg = json.loads((mk / "adapter_config.json").read_text())
    ours_dir = tmp_path / "ours"
    assert run(["extract", str(base), str(ft), "-o", str(ours_dir), "--rank", str(rank)]).exit_code == 0
    ours = load_file(ours_dir / "adapter_model.safetensors")
    worst = 0.0
    for key in deltas:
        m = "base_model.model." + key[:-7]
        scale = mk_cfg["lora_alpha"] / mk_cfg["r"]
        d_mk = theirs[f"{m}.lora_B.weight"].float() @ theirs[f"{m}.lora_A.weight"].float() * scale
        d_us = ours[f"{m}.lora_B.weight"] @ ours[f"{m}.lora_A.weight"]
        worst = max(worst, rel(d_us, d_mk))
    print(f"mergekit agreement at rank {rank}: max relative difference {worst:.2e}")
    assert worst < 1e-5


# --------------------------------------------------------------------------- refusals

def _fails(args, tmp_path, match):
    out = tmp_path / "never"
    res = CliRunner().invoke(cli, ["extract", *args, "-o", str(out)])
    assert res.exit_code != 0
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    from loretta_merge.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["extract", *args, "-o", str(out)])
    assert exc.value.code != 0
    assert not out.exists()
    return res


def test_refusals_write_nothing(pairs, tmp_path, capsys):
    base, ft, _ = pairs["llama"]
    bert_base, _, _ = pairs["bert"]
    cases = [
        ([str(base), str(ft), "--energy", "1.5"], "in \\(0, 1\\]"),
        ([str(base), str(ft), "--energy", "0"], "in \\(0, 1\\]"),
        ([str(base), str(ft), "--eps", "1"], "in \\(0, 1\\)"),
        ([str(base), str(ft)], "needs --rank"),
        ([str(base), str(ft), "--rank", "33"], "larger than min\\(dims\\) = 32"),
        ([str(base), str(bert_base), "--rank", "2"], ""),
        ([str(base), str(ft), "--rank", "4", "--device", "tpu"], "unknown device 'tpu'"),
    ]
    for args, match in cases:
        _fails(args, tmp_path, match)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, err
        assert pytest.importorskip("re").search(match, lines[0]), lines[0]


def test_architecture_and_vocabulary_mismatch(tmp_path):
    base = tmp_path / "base"
    build("llama").save_pretrained(base)
    wide = tmp_path / "wide"
    build("llama", intermediate_size=128).save_pretrained(wide)
    with pytest.raises(ShapeError, match=r"different architectures: .*intermediate_size"):
        extract(base, wide, rank=2)
    vocab = tmp_path / "vocab"
    model = build("llama")
    model.resize_token_embeddings(136)
    model.save_pretrained(vocab)
    with pytest.raises(ShapeError, match=r"vocabulary was resized \(lm_head.weight \(128, 64\) -> \(136, 64\), "
                                         r"model.embed_tokens.weight \(128, 64\) -> \(136, 64\).*"
                                         r"resize_token_embeddings\(136\)"):
        extract(base, vocab, rank=2)
    # a layer's shape changed without a config field saying so: named with both shapes
    other = tmp_path / "other"
    shutil.copytree(base, other)
    from safetensors.torch import save_file
    state = load_file(other / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(90, 64)
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ShapeError, match=r"tensor model.layers.0.mlp.up_proj.weight is \(96, 64\) in .* and \(90, 64\)"):
        extract(base, other, rank=2)
    with pytest.raises(LorettaError, match="no tensor name in common"):
        bert = tmp_path / "bert"
        build("bert").save_pretrained(bert)
        extract(base, bert, rank=2)
    # identical checkpoints: nothing to extract, said so
    with pytest.raises(ShapeError, match="nothing to extract"):
        extract(base, base, rank=2)


def test_als_and_adam_fits_agree_and_never_lose():
    """The two fitting methods reach the same error from the TT-SVD start (a cross-check of
    both), and the fit is never worse than TT-SVD."""
    from loretta_merge.converters.lora import lora_to_tt
    from loretta_merge.converters.ttfit import als_rep_cores, fit_rep_cores
    from loretta_merge.formats import Adapter, LoraModule

    g = torch.Generator().manual_seed(1)
    d = (torch.randn(32, 4, generator=g) @ torch.randn(4, 64, generator=g)) * 0.02
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    root = s[:4].sqrt()
    lora = LoraModule(a=root[:, None] * vh[:4], b=u[:, :4] * root, scale=1.0)
    rep, _ = lora_to_tt(Adapter(method="lora", source="peft", modules={"m": lora},
                                config={"r": 4, "lora_alpha": 4}), tensor_rank=5)
    m = rep.modules["m"]
    p, q = lora.a.T.contiguous(), lora.b.T.contiguous()
    _, _, start, als = als_rep_cores(p, q, m.a.cores, m.b.cores)
    _, _, start2, adam = fit_rep_cores(p, q, m.a.cores, m.b.cores, steps=300)
    assert start == pytest.approx(start2, rel=1e-6)
    assert als <= start and adam <= start
    assert als == pytest.approx(adam, rel=2e-3)


def test_tt_fit_to_the_delta_beats_the_fit_to_its_truncation():
    """A full-rank delta (a full fine-tune's): cores fitted to the delta itself reach a lower
    delta error than cores fitted to its rank-k truncated SVD, and both beat TT-SVD."""
    from loretta_merge.converters.extract import tt_module
    from loretta_merge.errors import ConfigError
    from loretta_merge.formats import LoraModule

    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    v, _ = torch.linalg.qr(torch.randn(64, 32, generator=g))
    d = (u * torch.arange(1, 33).float() ** -0.5) @ v.T          # (32, 64), decaying spectrum
    uu, s, vh = torch.linalg.svd(d, full_matrices=False)
    root = s[:4].sqrt()
    lora = LoraModule(a=root[:, None] * vh[:4], b=uu[:, :4] * root, scale=1.0)
    _, e0, e_svd, _ = tt_module("m", lora, d, tensor_rank=2, shapes="paper", fit_steps=300)
    m, e0b, e_delta, how = tt_module("m", lora, d, tensor_rank=2, shapes="paper", fit_steps=300,
                                     fit_to="delta")
    assert e0 == e0b and e_svd < e0 and how == "als"
    assert e_delta < e_svd - 1e-4
    assert float((d - m.delta().T).norm() / d.norm()) == pytest.approx(e_delta, rel=1e-5)
    with pytest.raises(ConfigError, match="fit_to"):
        tt_module("m", lora, d, tensor_rank=2, shapes="paper", fit_steps=1, fit_to="x")


def test_changed_bias_of_a_target(tmp_path):
    """A targeted module whose bias changed too: the LoRA carries its weight whole (PEFT
    cannot hold both) and PEFT still merges to the fine-tune; the TT form keeps the module
    low-rank, carries the bias, and loretta-merge writes both."""
    from loretta_merge.merge import merge

    base, ft, deltas = make_pair("bert", tmp_path)
    model = type(build("bert")).from_pretrained(ft)
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.bias.add_(0.05)
    ft2 = tmp_path / "bert-ft2"
    model.save_pretrained(ft2)
    ft_state = load_dir(ft2)
    lora_out = tmp_path / "lora"
    adapter, report = extract(base, ft2, rank=4)
    q0 = "encoder.layer.0.attention.self.query"
    assert q0 not in adapter.modules and f"{q0}.weight" in adapter.tensors
    assert any("also changed their bias" in n for n in report.notes)
    from loretta_merge.formats import write_peft_lora
    write_peft_lora(adapter, lora_out)
    merged = peft_merged("bert", base, lora_out)
    for key, value in ft_state.items():
        assert torch.allclose(merged[key], value, atol=1e-6, rtol=0), key
    tt_out = tmp_path / "tt"
    assert run(["extract", str(base), str(ft2), "-o", str(tt_out), "--to", "tt", "--rank", "4",
                "--tensor-rank", "64", "--fit-steps", "0"]).exit_code == 0
    assert q0 in read_adapter(tt_out).modules
    merge(base, [(tt_out, 1.0)], tmp_path / "merged", progress=False, device="cpu")
    got = load_dir(tmp_path / "merged")
    for key, value in ft_state.items():
        assert torch.allclose(got[key], value, atol=1e-5, rtol=0), key


def test_gpt2_conv1d(tmp_path):
    """GPT-2 stores c_attn as a Conv1D weight (in, out): the delta is taken in (out, in)
    orientation, the LoRA is written with fan_in_fan_out, PEFT merges it to the fine-tune."""
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    base, ft = tmp_path / "gpt2-base", tmp_path / "gpt2-ft"
    model.save_pretrained(base)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in model.transformer.h:
            w = block.attn.c_attn.weight                     # (64, 192) = (in, out)
            w.add_(torch.randn(64, 3, generator=g) @ torch.randn(3, 192, generator=g) * 0.02)
    model.save_pretrained(ft)
    out = tmp_path / "lora"
    adapter, report = extract(base, ft, rank=3)
    assert adapter.fan_in_fan_out == set(adapter.modules) and len(adapter.modules) == 2
    assert report.summary()["max_err"] < 1e-5
    from loretta_merge.formats import write_peft_lora
    write_peft_lora(adapter, out)
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    base_model = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
    merged = peft.PeftModel.from_pretrained(base_model, str(out)).merge_and_unload().state_dict()
    for key, value in load_dir(ft).items():
        assert torch.allclose(merged[key], value, atol=1e-6, rtol=0), key


def test_dtype_change_is_reported(tmp_path):
    base = tmp_path / "base"
    build("llama").save_pretrained(base)
    ft = tmp_path / "ft-bf16"
    model = build("llama").to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.5)
    model.save_pretrained(ft)
    _, report = extract(base, ft, rank=1)
    assert any("another dtype" in n for n in report.notes)


def test_mixed_ranks_load_in_peft(pairs, tmp_path):
    """--eps gives modules different ranks: rank_pattern/alpha_pattern keep every scale at 1
    in real PEFT, whose merge equals base + the written factors."""
    from loretta_merge.formats import write_peft_lora

    base, ft, deltas = pairs["llama"]
    adapter, report = extract(base, ft, eps=0.4)
    assert len({r.rank for r in report.modules}) > 1
    out = tmp_path / "lora"
    write_peft_lora(adapter, out)
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    merged = peft_merged("llama", base, out)
    base_state = load_dir(base)
    for key in deltas:
        m = adapter.modules[key[:-7]]
        want = base_state[key] + m.b @ m.a
        assert torch.allclose(merged[key], want, atol=1e-6), key


def test_rank_cap_above_a_module_size_is_clamped(pairs):
    base, ft, _ = pairs["llama"]
    _, report = extract(base, ft, energy=1.0, rank=33)   # v_proj is 32 x 64: a cap, not an error
    assert {r.rank for r in report.modules} == {4}


def test_randomized_svd_matches_the_exact_truncation():
    """The fixed-rank fast path: within 1% of the exact rank-R error on a decaying spectrum,
    reproducible, and chosen by auto only where the rank is well below the module's size."""
    from loretta_merge.converters.extract import _decompose, _use_randomized
    from loretta_merge.converters.lowrank import sketch_svd

    g = torch.Generator().manual_seed(0)
    m, n, r = 300, 260, 8
    u = torch.linalg.qr(torch.randn(m, 40, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, 40, generator=g))[0]
    d = (u * 0.7 ** torch.arange(40.0)) @ v.T + 1e-5 * torch.randn(m, n, generator=g)
    s = torch.linalg.svdvals(d).double()
    best = float((s[r:] ** 2).sum().sqrt() / s.norm())
    sk = sketch_svd(d, r)
    uu, ss, vh = sk.u, sk.s, sk.vh
    assert uu.shape == (m, r) and ss.shape == (r,) and vh.shape == (r, n)
    got = float(torch.linalg.matrix_norm(d - (uu * ss) @ vh) / torch.linalg.matrix_norm(d))
    assert best <= got <= 1.01 * best
    assert torch.equal(sketch_svd(d, r).s, ss)
    lora, kept, k, err, _ = _decompose(d, rank=r, energy=None, eps=None, svd="randomized")
    assert k == r and err == pytest.approx(got, rel=1e-3) and kept == pytest.approx(1 - best**2, rel=1e-3)
    assert _use_randomized("auto", (2048, 2048), 16, None, None)
    assert not _use_randomized("auto", (64, 64), 16, None, None)          # small: exact
    assert not _use_randomized("auto", (2048, 2048), 16, 0.99, None)      # energy rule: exact
    assert not _use_randomized("exact", (2048, 2048), 16, None, None)
    with pytest.raises(ConfigError):
        extract("a", "b", rank=4, energy=0.9, svd="randomized")


def test_extract_fit_to_delta_is_never_worse_against_the_delta(tmp_path):
    """``extract(fit_to="delta")``: each module's measured delta error is at most the one of
    the fit to the truncation (both start from the same TT-SVD cores); a bad value is refused."""
    base, ft, _ = make_pair("bert", tmp_path)
    _, rep_svd = extract(base, ft, to="tt", rank=2, tensor_rank=3)
    adapter, rep_delta = extract(base, ft, to="tt", rank=2, tensor_rank=3, fit_to="delta")
    assert adapter.modules
    by_name = {r.name: r for r in rep_svd.modules}
    for r in rep_delta.modules:
        assert r.err <= by_name[r.name].err + 1e-6
    with pytest.raises(ConfigError, match="--fit-to"):
        extract(base, ft, to="tt", rank=2, fit_to="full")


# --------------------------------------------------------------------------- speed paths
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_known_model_types_plan_from_names_as_the_class_would(kind, tmp_path):
    """The plan of a known model type comes from the key names (no modeling code imported):
    the same Linear and Conv1D modules as the transformers class built on the meta device."""
    from loretta_merge.converters.extract_plan import _known_modules, _linear_modules
    from loretta_merge.io import CheckpointReader

    small = {"vocab_size": 64, "num_attention_heads": 4}
    llama_like = {**small, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                  "num_key_value_heads": 2, "tie_word_embeddings": False}
    cfg, cls = {
        "llama": (transformers.LlamaConfig(**llama_like), transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig(**llama_like), transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config(**llama_like), transformers.Qwen2ForCausalLM),
        "gpt2": (transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                         bos_token_id=0, eos_token_id=0), transformers.GPT2LMHeadModel),
        "bert": (transformers.BertConfig(**small, hidden_size=32, num_hidden_layers=1, intermediate_size=48,
                                         max_position_embeddings=16), transformers.BertForSequenceClassification),
    }[kind]
    cls(cfg).save_pretrained(tmp_path / kind)
    reader = CheckpointReader(tmp_path / kind)
    got = _known_modules(kind, reader.keys(), reader)
    want = _linear_modules(tmp_path / kind, json.loads((tmp_path / kind / "config.json").read_text()))
    keys = reader.keys()
    stored = {k[: -len(".weight")] for k in keys if k.endswith(".weight") and len(reader.shape(k)) == 2}
    assert got == (want[0] & stored, want[1] & stored)
    assert got[0] != stored                                       # the embeddings are not Linear
    assert bool(got[1]) == (kind == "gpt2")
    assert _known_modules("t5", reader.keys(), reader) is None   # unknown: the class is built


def test_sketch_error_from_the_norms_is_the_residual():
    """The randomized SVD's error from ||D||^2 - sum s_k^2 is the written factors' residual;
    the subspace iterations stop once 5 fewer sketch columns give the same error, stay below
    the cap, and a fixed count is honoured; a near-exact delta leaves the residual to measure."""
    from loretta_merge.converters.lowrank import (
        POWER_ITERS,
        frobenius_sq,
        residual_error,
        sketch_svd,
    )

    g = torch.Generator().manual_seed(3)
    m, n, r = 400, 300, 8
    u = torch.linalg.qr(torch.randn(m, 40, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, 40, generator=g))[0]
    d = (u * 0.8 ** torch.arange(40.0)) @ v.T + 1e-4 * torch.randn(m, n, generator=g)
    assert frobenius_sq(d) == pytest.approx(float(d.double().square().sum()), rel=1e-7)
    assert frobenius_sq(d.T) == pytest.approx(frobenius_sq(d), rel=1e-7)
    s = torch.linalg.svdvals(d).double()
    best = float((s[r:] ** 2).sum().sqrt() / s.norm())
    sk = sketch_svd(d, r)
    assert 1 <= sk.iters <= POWER_ITERS
    explicit = residual_error(d, sk.u * sk.s, sk.vh)
    assert sk.err == pytest.approx(explicit, rel=1e-3)
    assert sk.err == pytest.approx(best, rel=1e-3)
    assert sketch_svd(d, r, power_iters=0).iters == 0
    assert sketch_svd(d, r, power_iters=0).err > 1.02 * best       # no iteration: 4.6% worse here
    exact = (u[:, :r] * 0.8 ** torch.arange(float(r))) @ v[:, :r].T
    near = sketch_svd(exact, r)
    assert near.err is None                                          # cancellation: measure it
    assert residual_error(exact, near.u * near.s, near.vh) < 1e-5


def test_device_cpu_explicit_and_bad_device(pairs):
    """--device cpu is the default path (same factors); an unknown device is one line."""
    base, ft, _ = pairs["llama"]
    a1, _ = extract(base, ft, rank=4)
    a2, _ = extract(base, ft, rank=4, device="cpu", svd="randomized")
    a3, _ = extract(base, ft, rank=4, svd="randomized")
    for name, m in a1.modules.items():
        assert torch.equal(a2.modules[name].a, a3.modules[name].a)
        assert rel(a2.modules[name].b @ a2.modules[name].a, m.b @ m.a) < 1e-4
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):   # the CLI: test_refusals_write_nothing
        extract(base, ft, rank=4, device="tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this torch sees none)")
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_cuda_extract_equals_cpu_extract(svd, pairs, tmp_path):
    """--device cuda decomposes on the GPU: the same modules, ranks, carried tensors, deltas
    within fp32 rounding and errors within 1e-3 of the CPU's."""
    base, ft, _ = pairs["llama"]
    cpu, rep_cpu = extract(base, ft, rank=4, svd=svd, device="cpu")
    gpu, rep_gpu = extract(base, ft, rank=4, svd=svd, device="cuda")
    assert sorted(cpu.modules) == sorted(gpu.modules) and sorted(cpu.tensors) == sorted(gpu.tensors)
    for name, m in cpu.modules.items():
        g = gpu.modules[name]
        assert g.a.device.type == "cpu" and g.a.shape == m.a.shape
        assert rel(g.b @ g.a, m.b @ m.a) < 1e-4, name
    errs = {r.name: r.err for r in rep_cpu.modules}
    for r in rep_gpu.modules:
        assert r.err == pytest.approx(errs[r.name], rel=1e-3, abs=1e-6)
    for key, t in cpu.tensors.items():
        assert torch.equal(gpu.tensors[key], t)
