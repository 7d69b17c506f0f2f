"""get_loretta_model / save / load / merge on every tiny architecture."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import copy
import functools

from conftest import ARCHS, perturb_trainable, probe_inputs
from conftest import build_tiny as _build
from loretta_merge.config import AdpConfig, RepConfig
from loretta_merge.errors import ConfigError, FormatError, ShapeError
from loretta_merge.layers import AdapterLinear, RepLinear, TTLinear, is_conv1d
from loretta_merge.model import (adapter_from_model, get_loretta_model, load_loretta_model,
                                 merge_loretta_model, save_loretta_adapter, trainable_parameters)

SEQ_CLS = {"bert", "roberta", "deberta"}
F = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}


@functools.lru_cache(maxsize=None)
def _cached(arch):
    return _build(arch)


def build_tiny(arch):
    """A fresh copy of the tiny model (built once per architecture: init is the slow part)."""
    return copy.deepcopy(_cached(arch))


def dense(cores, rows, cols):
    full = cores[0].detach()
    for core in cores[1:]:
        full = torch.tensordot(full, core.detach(), dims=([full.ndim - 1], [0]))
    return full.reshape(rows, cols)


def logits(model, seed=0):
    with torch.no_grad():
        return model(**probe_inputs(seed=seed)).logits


def _perturb(model, seed=1):
    """Move trained tensors away from their init so that losing one would show."""
    perturb_trainable(model, seed=seed)


def reference_with_hooks(arch, wrapped):
    """A fresh base model that reproduces ``wrapped`` with forward hooks computing the
    adapter math from hand-reconstructed matrices (no loretta_merge layer code)."""
    base = build_tiny(arch)
    base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in wrapped.state_dict().items()
                          if ".lora_" not in k and ".adapter_" not in k and ".tt_cores." not in k
                          and not _is_dense_bias(wrapped, k)}, strict=False)
    modules = dict(base.named_modules())
    for name, m in wrapped.named_modules():
        if isinstance(m, RepLinear):
            delta = m.scale * dense(m.lora_A.tt_cores, m.in_features, m.r) @ dense(m.lora_B.tt_cores, m.r, m.out_features)
            modules[name].register_forward_hook(lambda mod, inp, out, d=delta: out + inp[0] @ d)
        elif isinstance(m, AdapterLinear):
            dn = dense(m.adapter_down.tt_cores, m.dim, m.adapter_down.cols)
            up = dense(m.adapter_up.tt_cores, m.adapter_up.rows, m.dim)
            db, ub = m.adapter_down.bias.detach(), m.adapter_up.bias.detach()

            def adapter(h, dn=dn, up=up, db=db, ub=ub, f=F[m.non_linearity], s=m.scaling):
                return s * (f(h @ dn + db) @ up + ub)

            if m.placement == "input":
                modules[name].register_forward_pre_hook(lambda mod, inp, a=adapter: (inp[0] + a(inp[0]),))
            else:
                modules[name].register_forward_hook(lambda mod, inp, out, a=adapter: out + a(out))
        elif isinstance(m, TTLinear) and not name.endswith(("lora_A", "lora_B", "adapter_down", "adapter_up")):
            lin = modules[name]
            with torch.no_grad():
                lin.weight.copy_(dense(m.tt_cores, m.rows, m.cols).T)
                lin.bias.copy_(m.bias)
    return base.eval()


def _is_dense_bias(model, key):
    owner = key.rpartition(".")[0]
    return isinstance(model.get_submodule(owner), TTLinear)


@pytest.mark.parametrize("method", ["rep", "adp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_wrapped_forward_equals_base_plus_adapter_math(arch, method):
    torch.manual_seed(0)
    cfg = RepConfig(lora_dropout=0.0) if method == "rep" else AdpConfig(non_linearity="gelu", scaling=0.7)
    model = get_loretta_model(build_tiny(arch), cfg).eval()
    _perturb(model)  # norms and heads move too
    wrapped = [m for m in model.modules() if isinstance(m, (RepLinear, AdapterLinear))]
    assert wrapped and all(isinstance(m, RepLinear if method == "rep" else AdapterLinear) for m in wrapped)
    if arch == "gpt2":
        assert all(is_conv1d(m.base_layer) for m in wrapped)
    if arch in SEQ_CLS:  # the paper's replaced dense
        assert sum(isinstance(m, TTLinear) for m in model.modules()) == 2 * len(wrapped) + 1
    ref = reference_with_hooks(arch, model)
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["rep", "adp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_init_is_exact_noop(arch, method):
    cls = RepConfig if method == "rep" else AdpConfig
    model = get_loretta_model(build_tiny(arch), cls(init="zero", replace_dense=False))
    assert torch.equal(logits(model.eval()), logits(build_tiny(arch)))


@pytest.mark.parametrize("method", ["rep", "adp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_exact(arch, method, tmp_path):
    torch.manual_seed(0)
    cfg = RepConfig() if method == "rep" else AdpConfig()
    model = get_loretta_model(build_tiny(arch), cfg).eval()
    _perturb(model)
    want = logits(model)
    save_loretta_adapter(model, tmp_path / "ad", base_model_name_or_path="tiny")
    with pytest.raises(Exception, match="already exists"):
        save_loretta_adapter(model, tmp_path / "ad")
    loaded = load_loretta_model(build_tiny(arch), tmp_path / "ad")
    assert torch.equal(logits(loaded), want)
    assert not any(p.requires_grad for p in loaded.parameters())
    # the adapter holds every trained tensor, nothing frozen
    ad = adapter_from_model(model)
    trained = trainable_parameters(model)["total_trainable"]
    assert ad.num_params() == trained
    trainable = load_loretta_model(build_tiny(arch), ad, is_trainable=True)
    assert trainable_parameters(trainable)["total_trainable"] == trained


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_trainable_flags(arch):
    model = get_loretta_model(build_tiny(arch), RepConfig(modules_to_save=["embed_tokens"]
                                                          if arch == "llama" else None))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in names:
        assert (".lora_" in n or "norm" in n.lower() or ".ln_" in n or n.startswith("ln_")
                or "transformer.ln_f" in n or n.startswith(("classifier", "bert.pooler.dense.tt_cores",
                                                            "bert.pooler.dense.bias"))
                or "embed_tokens" in n), n
    assert not any(".base_layer." in n for n in names)
    c = trainable_parameters(model)
    assert c["total_trainable"] == sum(c[k] for k in ("tt_cores", "biases", "norms", "heads"))
    if arch == "llama":
        assert c["heads"] == 128 * 64  # embed_tokens saved in full
        assert "model.embed_tokens.weight" in adapter_from_model(model).tensors


def test_bf16_model_gets_bf16_adapters():
    model = get_loretta_model(build_tiny("llama").to(torch.bfloat16), AdpConfig())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert logits(model).dtype == torch.bfloat16
    merged_in = get_loretta_model(build_tiny("opt").to(torch.bfloat16), RepConfig())
    assert {p.dtype for p in merged_in.parameters()} == {torch.bfloat16}


def test_targets_follow_peft_matching_never_substrings():
    with pytest.raises(ConfigError, match=r"matches no module .*never a substring.*q_proj"):
        get_loretta_model(build_tiny("llama"), RepConfig(target_modules=["proj"]))
    one = get_loretta_model(build_tiny("llama"), RepConfig(target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    assert [n for n, m in one.named_modules() if isinstance(m, RepLinear)] == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ConfigError, match=r"matches module model\.layers\.0\.mlp, a LlamaMLP"):
        get_loretta_model(build_tiny("llama"), RepConfig(target_modules=["mlp"]))


def test_unknown_architecture_lists_candidates():
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64)
    model = transformers.GPTNeoXForCausalLM(cfg)
    with pytest.raises(ConfigError, match=r"gpt_neox.*set target_modules.*query_key_value.*dense_h_to_4h"):
        get_loretta_model(model, RepConfig())
    ok = get_loretta_model(model, RepConfig(target_modules=["query_key_value"]))
    assert sum(isinstance(m, RepLinear) for m in ok.modules()) == 1


def test_mode_shape_overrides_and_bad_overrides():
    model = get_loretta_model(build_tiny("llama"), RepConfig(mode_shapes={"64x8": [2, 4, 8, 8], 8: [2, 4]}))
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.modes == [2, 4, 8, 8]
    assert q.lora_B.modes == [2, 4, 8, 8]  # 8 -> [2, 4], 64 -> factorised [8, 8]
    with pytest.raises(ConfigError, match=r"mode_shapes\['64x8'\] = \[3, 4\] multiplies to 12.*512"):
        RepConfig(mode_shapes={"64x8": [3, 4]})


def test_load_rejects_adapters_that_do_not_fit(tmp_path):
    model = get_loretta_model(build_tiny("llama"), RepConfig())
    save_loretta_adapter(model, tmp_path / "ad")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    other = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ShapeError, match=r"model\.layers\.0\.self_attn\.q_proj: lora_A \(in, r\) has "
                                         r"shape \(64, 8\) but the model needs \(32, 8\)"):
        load_loretta_model(other, tmp_path / "ad")
    assert not any(isinstance(m, RepLinear) for m in other.modules())  # nothing changed
    with pytest.raises(ShapeError, match=r"not in this GPT2LMHeadModel"):
        load_loretta_model(build_tiny("gpt2"), tmp_path / "ad")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
def test_merge_rep_gives_plain_model_with_same_outputs(arch):
    torch.manual_seed(0)
    model = get_loretta_model(build_tiny(arch), RepConfig()).eval()
    _perturb(model)
    want = logits(model)
    merged = merge_loretta_model(model)
    assert not any(isinstance(m, (RepLinear, TTLinear)) for m in merged.modules())
    assert not hasattr(merged, "loretta_config")
    torch.testing.assert_close(logits(merged), want, rtol=1e-5, atol=1e-5)
    fresh = type(merged)(merged.config)
    fresh.load_state_dict(merged.state_dict())  # plain transformers keys
    assert torch.equal(logits(fresh.eval()), logits(merged))


def test_merge_refuses_adp():
    model = get_loretta_model(build_tiny("opt"), AdpConfig())
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge_loretta_model(model)


def test_plain_lora_adapter_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(build_tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(FormatError, match="not LoRETTA"):
        load_loretta_model(build_tiny("llama"), tmp_path / "lora")


def _llama768():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
                                   num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["rep", "adp"])
def test_authors_checkpoint_gives_the_authors_outputs(method, tmp_path):
    """A directory written by the real `loretta` 0.1 package (pickled adapter_model.bin),
    loaded safely, reproduces the authors' model logits. Width 768: their shape table
    knows no tiny widths."""
    import warnings

    loretta = pytest.importorskip("loretta")
    if method == "rep":
        cfg = loretta.LorettaRepConfig(r=8, lora_alpha=16, lora_dropout=0.0, tensor_rank=5,
                                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    else:
        cfg = loretta.LorettaAdpConfig(bottleneck_size=8, non_linearity="relu", tensor_rank=5, scaling=1.5,
                                       target_modules=["gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = loretta.get_peft_model(_llama768(), cfg)
        _perturb(theirs)
        theirs.eval()
        ids = probe_inputs(64, seq=9)["input_ids"]
        with torch.no_grad():
            want = theirs(input_ids=ids).logits
        theirs.save_pretrained(str(tmp_path / "authors"))
    assert (tmp_path / "authors" / "adapter_model.bin").is_file()
    ours = load_loretta_model(_llama768(), tmp_path / "authors")
    kinds = {type(m) for m in ours.modules()}
    assert (RepLinear if method == "rep" else AdapterLinear) in kinds
    if method == "adp":
        placements = {n.rsplit(".", 1)[-1]: m.placement for n, m in ours.named_modules()
                      if isinstance(m, AdapterLinear)}
        assert placements == {"gate_proj": "input", "up_proj": "input", "down_proj": "output"}
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    assert not torch.equal(got, _llama768()(input_ids=ids).logits)  # the adapter does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # converting to our format keeps the outputs bit for bit
    save_loretta_adapter(ours, tmp_path / "ours")
    again = load_loretta_model(_llama768(), tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, got)


def test_modules_to_save_on_a_wrapped_module_round_trips(tmp_path):
    torch.manual_seed(0)
    model = get_loretta_model(build_tiny("opt"), RepConfig(modules_to_save=["model.decoder.layers.0.self_attn.q_proj"]))
    _perturb(model)
    want = logits(model.eval())
    assert "model.decoder.layers.0.self_attn.q_proj.weight" in adapter_from_model(model).tensors
    save_loretta_adapter(model, tmp_path / "ad")
    loaded = load_loretta_model(build_tiny("opt"), tmp_path / "ad", is_trainable=True)
    assert torch.equal(logits(loaded.eval()), want)
    assert trainable_parameters(loaded) == trainable_parameters(model)


def test_configs_validate_and_round_trip():
    rep = RepConfig(r=4, target_modules=r".*q_proj", rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 8},
                    use_rslora=True, mode_shapes={768: [8, 8, 12]}, init="zero")
    assert RepConfig.from_dict(rep.to_dict()) == rep
    assert rep.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert rep.scale_for("model.layers.0.self_attn.v_proj") == pytest.approx(8 / 2 ** 0.5)
    assert rep.rank_for("model.layers.0.self_attn.xv_proj") == 4  # suffix rule, never substrings
    adp = AdpConfig(placement={"fc1": "input"}, non_linearity="tanh")
    assert AdpConfig.from_dict(adp.to_dict()) == adp
    assert RepConfig.__dataclass_fields__["r"].metadata["help"]
    for bad, match in [(dict(r=0), "r must be an integer >= 1"), (dict(lora_dropout=1.0), "lora_dropout"),
                       (dict(target_modules="("), "not a valid regex"), (dict(init="kaiming"), "init must be"),
                       (dict(task_type="SEQ2SEQ"), "task_type must be one of"),
                       (dict(mode_shapes={"768": [5, 5]}), r"multiplies to 25.*768")]:
        with pytest.raises(ConfigError, match=match):
            RepConfig(**bad)
    with pytest.raises(ConfigError, match=r"placement\['fc1'\] must be one of"):
        AdpConfig(placement={"fc1": "middle"})
    with pytest.raises(ConfigError, match="non_linearity must be one of"):
        AdpConfig(non_linearity="softmax")
    with pytest.raises(ConfigError, match="not 'adp'"):
        AdpConfig.from_dict(rep.to_dict())
