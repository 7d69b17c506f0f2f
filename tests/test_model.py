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
from loretta_merge.adapters.config import AdpConfig, RepConfig
from loretta_merge.errors import ConfigError, FormatError, ShapeError
from loretta_merge.adapters.layers import AdapterLinear, RepLinear, TTLinear, is_conv1d
from loretta_merge.adapters import (adapter_from_model, get_loretta_model, load_loretta_model,
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


# ----------------------------------------------------------------- architectures (issue 13)

@pytest.mark.parametrize("config_cls,kwargs,model_cls,targets,placement", [
    ("DistilBertConfig", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=48),
     "DistilBertForSequenceClassification", ["q_lin", "v_lin"], ["ffn.lin2"]),
    ("DebertaV2Config", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=48), "DebertaV2ForSequenceClassification",
     ["query_proj", "value_proj"], ["output.dense"]),
    ("Phi3Config", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48, pad_token_id=0), "Phi3ForCausalLM",
     ["qkv_proj"], ["gate_up_proj", "down_proj"]),
    ("GPT2Config", dict(n_embd=32, n_layer=1, n_head=4), "GPT2LMHeadModel", ["c_attn"],
     ["c_fc", "c_proj"]),
])
def test_every_family_has_default_targets(config_cls, kwargs, model_cls, targets, placement):
    """Default rep targets and adp placements exist and wrap exactly the named projections."""
    config = getattr(transformers, config_cls)(vocab_size=128, **kwargs)
    rep = get_loretta_model(getattr(transformers, model_cls)(config), RepConfig(r=4, tensor_rank=2))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in rep.named_modules() if isinstance(m, RepLinear)}
    assert wrapped == {t.rsplit(".", 1)[-1] for t in targets}
    adp = get_loretta_model(getattr(transformers, model_cls)(config), AdpConfig(bottleneck_size=4, tensor_rank=2))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in adp.named_modules() if isinstance(m, AdapterLinear)}
    assert wrapped == {p.rsplit(".", 1)[-1] for p in placement}


def test_unsupported_architecture_names_the_closest_family_and_the_flag():
    # StableLM names its projections like Llama: the error says so and gives the flag to try
    cfg = transformers.StableLmConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=48)
    with pytest.raises(ConfigError, match=r"StableLmForCausalLM is not a supported architecture.*"
                       r"'stablelm' has no default target_modules.*supported 'llama' family: "
                       r"try --target-modules q_proj,v_proj"):
        get_loretta_model(transformers.StableLmForCausalLM(cfg), RepConfig())
    # GPT-NeoX shares no name with a supported family: its attention projection is suggested
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ConfigError, match=r"no supported family uses its module names.*"
                       r"--target-modules query_key_value"):
        get_loretta_model(neox, RepConfig())


def test_tied_output_projection_merges_in_memory_without_changing_the_embedding():
    """A rep adapter on a tied lm_head: the in-memory merge gives the head its own weight
    (the embedding is the adapter-free input side) and saves untied."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    embedding = model.get_input_embeddings().weight.detach().clone()
    model = get_loretta_model(model, RepConfig(r=4, tensor_rank=2, target_modules=["q_proj", "lm_head"])).eval()
    _perturb(model)
    want = logits(model)
    merged = merge_loretta_model(model)
    assert torch.equal(merged.get_input_embeddings().weight, embedding)
    assert merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(merged), want, rtol=1e-5, atol=1e-5)


def test_tied_embedding_trained_in_full_is_saved_under_both_names(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4)
    torch.manual_seed(0)
    model = get_loretta_model(transformers.GPT2LMHeadModel(cfg),
                              RepConfig(r=4, tensor_rank=2, modules_to_save=["wte"])).eval()
    _perturb(model)
    assert model.lm_head.weight is model.transformer.wte.weight  # training keeps one tensor
    adapter = adapter_from_model(model)
    assert set(adapter.tensors) >= {"transformer.wte.weight", "lm_head.weight"}
    assert torch.equal(adapter.tensors["lm_head.weight"], adapter.tensors["transformer.wte.weight"])
    save_loretta_adapter(model, tmp_path / "ad")
    torch.manual_seed(0)  # the same base weights
    fresh = load_loretta_model(transformers.GPT2LMHeadModel(cfg).eval(), tmp_path / "ad")
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


# ----------------------------------------------------------------- mean pooling (issue 13)

def _sentence_transformers_bert(path, *, mean: bool = True):
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=48)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(path))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 32, "pooling_mode_cls_token": %s, '
        '"pooling_mode_mean_tokens": %s, "pooling_mode_max_tokens": false}'
        % (str(not mean).lower(), str(mean).lower()))
    return transformers.BertForSequenceClassification.from_pretrained(str(path), num_labels=2).eval()


def test_sentence_transformers_base_classifies_on_the_mean_of_kept_tokens(tmp_path):
    from loretta_merge.pooling import MeanPooler, sentence_transformers_pooling

    model = _sentence_transformers_bert(tmp_path / "st")
    assert sentence_transformers_pooling(tmp_path / "st") == "mean"
    model = get_loretta_model(model, RepConfig(r=4, tensor_rank=2, pooling="auto")).eval()
    assert isinstance(model.bert.pooler, MeanPooler)
    assert model.loretta_config.pooling == "mean" and model.config.loretta_pooling == "mean"
    assert not any(isinstance(m, TTLinear) and "pooler" in n for n, m in model.named_modules())
    _perturb(model)
    inputs = probe_inputs(vocab_size=128)
    with torch.no_grad():
        hidden = model.bert.embeddings  # the check below recomputes the pooled vector by hand
        states = model.bert(**inputs).last_hidden_state
        m = inputs["attention_mask"].unsqueeze(-1).float()
        pooled = (states * m).sum(1) / m.sum(1)
        want = model.classifier(pooled)
        got = model(**inputs).logits
    assert hidden is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # padding the kept tokens more does not change the logits (the mask is honoured)
    longer = {k: torch.cat([v, torch.zeros(v.shape[0], 3, dtype=v.dtype)], 1) for k, v in inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**longer).logits, got, rtol=1e-5, atol=1e-5)
    # the adapter records the pooling, and loading it restores it
    save_loretta_adapter(model, tmp_path / "ad")
    fresh = load_loretta_model(_sentence_transformers_bert(tmp_path / "st2"), tmp_path / "ad")
    assert isinstance(fresh.bert.pooler, MeanPooler)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, got, rtol=1e-5, atol=1e-6)


def test_pooling_auto_keeps_the_model_pooler_without_mean_pooling_config(tmp_path):
    from loretta_merge.pooling import MeanPooler

    model = _sentence_transformers_bert(tmp_path / "st", mean=False)
    model = get_loretta_model(model, RepConfig(r=4, tensor_rank=2, pooling="auto"))
    assert not isinstance(model.bert.pooler, MeanPooler)
    assert model.loretta_config.pooling is None
    with pytest.raises(ConfigError, match=r"pooling 'mean' needs an encoder with a first-token pooler"):
        get_loretta_model(build_tiny("llama"), RepConfig(pooling="mean", task_type="SEQ_CLS"))


def test_merged_checkpoint_says_how_to_pool(tmp_path):
    """save_pretrained of a mean-pooled classifier writes loretta_pooling; apply_pooling on
    the reloaded model restores the pooling (what merge verify and ONNX export call)."""
    from loretta_merge.pooling import apply_pooling

    model = get_loretta_model(_sentence_transformers_bert(tmp_path / "st"),
                              RepConfig(r=4, tensor_rank=2, pooling="mean")).eval()
    _perturb(model)
    inputs = probe_inputs(vocab_size=128)
    with torch.no_grad():
        want = model(**inputs).logits
    merged = merge_loretta_model(model)
    merged.save_pretrained(str(tmp_path / "merged"))
    back = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert back.config.loretta_pooling == "mean"
    with torch.no_grad():
        torch.testing.assert_close(apply_pooling(back)(**inputs).logits, want, rtol=1e-5, atol=1e-5)
