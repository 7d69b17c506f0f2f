"""`loretta-merge convert resize`: a PEFT LoRA resized to a lower rank is the best
approximation of each delta (checked against a dense SVD and PEFT's own convert_to_lora),
loads in real PEFT; a LoRETTA_rep adapter is TT-rounded with measured errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from loretta_merge.cli import cli
from loretta_merge.converters.lowrank import choose_rank, kept_energy, tail_error
from loretta_merge.converters.resize import lora_svd, resize
from loretta_merge.errors import ConfigError, FormatError
from loretta_merge.formats import read_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PREFIX = "base_model.model."


def tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def lora16(tmp_path_factory):
    """A rank-16 PEFT LoRA (alpha 32, random non-zero factors with decaying spectrum) plus a
    trained norm in modules_to_save."""
    root = tmp_path_factory.mktemp("resize")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False, modules_to_save=["norm"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:  # a decaying spectrum, so energy rules pick different ranks
                p.mul_(torch.logspace(0, -2, 16)[:, None])
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    path = root / "lora16"
    model.save_pretrained(path)
    return path


def dense_deltas(lora_dir) -> dict[str, torch.Tensor]:
    """scale * B @ A of every module, formed densely (the reference)."""
    state = load_file(lora_dir / "adapter_model.safetensors")
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    out = {}
    for key in state:
        if key.endswith("lora_A.weight"):
            m = key[len(PREFIX): -len(".lora_A.weight")]
            from loretta_merge.formats import scale_for
            a = state[key].double()
            b = state[key.replace("lora_A", "lora_B")].double()
            out[m] = (b @ a) * scale_for(cfg, m)
    return out


def best_rank_k(d: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def rel(x, y) -> float:
    return float((x - y).norm() / y.norm())


def test_lora_svd_from_qr_equals_dense_svd():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 50, generator=g), torch.randn(40, 8, generator=g)
    u, s, vh = lora_svd(a, b, -0.5)
    dense = -0.5 * (b.double() @ a.double())
    ref = torch.linalg.svdvals(dense)
    assert torch.allclose(s, ref[:8], rtol=1e-10, atol=1e-12) and float(ref[8:].max()) < 1e-10
    assert rel((u * s) @ vh, dense) < 1e-12


def test_resize_to_rank_4_is_the_best_approximation(lora16, tmp_path):
    out = tmp_path / "r4"
    res = CliRunner().invoke(cli, ["convert", "resize", str(lora16), "-o", str(out), "--rank", "4",
                                   "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    ref = dense_deltas(lora16)
    got = dense_deltas(out)
    assert set(got) == set(ref)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and not cfg["rank_pattern"]
    rows = {m["name"]: m for m in report["modules"]}
    worst = 0.0
    for m, d in ref.items():
        best = best_rank_k(d, 4)
        worst = max(worst, rel(got[m], best))
        s = torch.linalg.svdvals(d)
        # measured error = the SVD tail = ||d - best|| / ||d||
        assert rows[m]["err"] == pytest.approx(tail_error(s, 4), rel=1e-4)
        assert rows[m]["energy"] == pytest.approx(kept_energy(s, 4), rel=1e-6)
        assert rows[m]["rank_before"] == 16 and rows[m]["params"] * 4 == rows[m]["params_before"]
    print(f"resize r16->r4 vs dense SVD: max relative difference {worst:.2e}")
    assert worst < 1e-5
    # real PEFT loads it (norm in modules_to_save too) and merges base + best rank-4 deltas
    base = tiny_llama()
    ref_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.PeftModel.from_pretrained(base, str(out))
    merged = model.merge_and_unload().state_dict()
    for m, d in ref.items():
        assert torch.allclose(merged[f"{m}.weight"].double(),
                              ref_state[f"{m}.weight"].double() + best_rank_k(d, 4), atol=1e-6)
    norm = load_file(lora16 / "adapter_model.safetensors")[f"{PREFIX}model.norm.weight"]
    assert torch.equal(merged["model.norm.weight"], norm)


def test_agrees_with_peft_convert_to_lora(lora16, tmp_path):
    """PEFT 0.21's own resize (peft.tuners.lora.conversion.convert_to_lora, an SVD of each
    module's delta weight): same deltas at rank 4, same ranks for an energy threshold."""
    from peft.tuners.lora.conversion import convert_to_lora

    model = peft.PeftModel.from_pretrained(tiny_llama(), str(lora16))
    for rule, ours_kw in ((4, {"rank": 4}), (0.9, {"energy": 0.9})):
        with pytest.warns(UserWarning, match="already a LoRA"):
            cfg, state = convert_to_lora(model, rule)
        adapter, report = resize(lora16, **ours_kw)
        worst = 0.0
        for name, m in adapter.modules.items():
            key = f"{PREFIX}{name}"
            theirs = state[f"{key}.lora_B.weight"].double() @ state[f"{key}.lora_A.weight"].double()
            ours = m.b.double() @ m.a.double()
            assert ours.shape == theirs.shape
            assert m.a.shape[0] == state[f"{key}.lora_A.weight"].shape[0], name  # same rank
            worst = max(worst, rel(ours, theirs))
        print(f"resize vs PEFT convert_to_lora({rule}): max relative difference {worst:.2e}")
        assert worst < 1e-5


def test_energy_and_eps_rules(lora16):
    ref = dense_deltas(lora16)
    for kw in ({"energy": 0.95}, {"eps": 0.1}, {"eps": 0.3, "rank": 3}):
        adapter, report = resize(lora16, **kw)
        ranks = {r.name: r.rank for r in report.modules}
        for m, d in ref.items():
            assert ranks[m] == choose_rank(torch.linalg.svdvals(d), **kw), (kw, m)
        assert max(ranks.values()) < 16
    # a rank above a module's rank keeps it, and says so
    _, report = resize(lora16, rank=32)
    assert {r.rank for r in report.modules} == {16}
    assert any("kept at their own rank" in n for n in report.notes)


def test_rep_adapter_tt_rounding(lora16, tmp_path):
    from loretta_merge.converters.lora import lora_to_tt
    from loretta_merge.formats import write_adapter

    rep, _ = lora_to_tt(lora16, tensor_rank=8, shapes="auto")
    src = tmp_path / "rep"
    write_adapter(rep, src)
    out = tmp_path / "rep-r3"
    res = CliRunner().invoke(cli, ["convert", "resize", str(src), "-o", str(out), "--rank", "3",
                                   "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    resized = read_adapter(out)
    assert resized.method == "rep"
    for row in report["modules"]:
        m0, m1 = rep.modules[row["name"]], resized.modules[row["name"]]
        assert max(row["ranks_a"] + row["ranks_b"]) <= 3
        assert row["params"] < row["params_before"]
        # the reported error is the measured one
        d0, d1 = m0.delta().double(), m1.delta().double()
        assert row["err"] == pytest.approx(rel(d1, d0), rel=1e-3, abs=1e-6)
    assert torch.equal(resized.tensors["model.norm.weight"], rep.tensors["model.norm.weight"])
    # eps: every factor rounded within eps, so the delta is close
    adapter, report = resize(src, eps=1e-4)
    assert max(r.err for r in report.modules) < 1e-3


def test_refusals(lora16, tmp_path):
    for kw, match in (({"energy": 0.0}, r"\(0, 1\]"), ({"energy": 1.2}, r"\(0, 1\]"),
                      ({"eps": 1.0}, r"\(0, 1\)"), ({}, "needs --rank"), ({"rank": 0}, ">= 1")):
        with pytest.raises(ConfigError, match=match):
            resize(lora16, **kw)
    with pytest.raises(FormatError, match="not a directory"):
        resize(tmp_path / "missing", rank=2)
    res = CliRunner().invoke(cli, ["convert", "resize", str(lora16), "-o", str(tmp_path / "x"),
                                   "--energy", "2"])
    assert res.exit_code != 0 and not (tmp_path / "x").exists()
