"""One matcher for rank_pattern / alpha_pattern: training, reading, converting and real PEFT
agree module by module, also when the patterns overlap (where the first key wins, as in
PEFT, not the longest)."""

from __future__ import annotations

import math


import pytest

from conftest import build_tiny, perturb_trainable
from loretta_merge.errors import ConfigError
from loretta_merge.patterns import pattern_key, pattern_value

PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj", "o_proj"]
# Overlapping on purpose: ".*q_proj" comes first, so layer 0's q_proj gets 4 (PEFT's first
# match; the longest key would give 8) and so does layer 1's (not 2); "proj" matches no whole
# name part. Keys are listed in sorted order because PEFT's save_pretrained writes
# adapter_config.json with sort_keys=True: an order-dependent config in any other order
# changes meaning when PEFT saves it (PEFT itself then fails to load its own adapter).
RANK_PATTERN = {r".*q_proj": 4, "layers.0.self_attn.q_proj": 8, r"layers\.1\..*_proj": 2}
ALPHA_PATTERN = {r".*v_proj": 5, "layers.0.self_attn.v_proj": 3, r"layers\.1\.self_attn\.o_proj": 7,
                 "proj": 99}


def _peft_model(rslora: bool):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=6, lora_alpha=10, target_modules=TARGETS, rank_pattern=RANK_PATTERN,
                     alpha_pattern=ALPHA_PATTERN, use_rslora=rslora)
    return get_peft_model(build_tiny("llama"), cfg)


def _peft_truth(model) -> dict[str, tuple[int, float]]:
    """{module name in the base model: (r, scaling)} as PEFT itself set them."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out[name.removeprefix(PREFIX)] = (module.r["default"], module.scaling["default"])
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_training_reading_and_peft_agree_on_overlapping_patterns(rslora, tmp_path):
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.formats import rank_for, read_adapter, scale_for
    from loretta_merge.adapters.layers import RepLinear
    from loretta_merge.adapters import get_loretta_model

    pm = _peft_model(rslora)
    truth = _peft_truth(pm)
    assert len(truth) == 6 and len({v for v in truth.values()}) >= 4  # the patterns really differ
    assert list(RANK_PATTERN) == sorted(RANK_PATTERN) and list(ALPHA_PATTERN) == sorted(ALPHA_PATTERN)
    assert truth["model.layers.0.self_attn.q_proj"][0] == 4  # first key wins, not the longest
    assert truth["model.layers.1.self_attn.q_proj"][0] == 4
    assert truth["model.layers.0.self_attn.v_proj"][1] == (5 / math.sqrt(6) if rslora else 5 / 6)
    perturb_trainable(pm, seed=2)
    pm.save_pretrained(tmp_path / "lora")

    # reading: the config rule and the adapter read from PEFT's own files
    config = {"r": 6, "lora_alpha": 10, "rank_pattern": RANK_PATTERN, "alpha_pattern": ALPHA_PATTERN,
              "use_rslora": rslora}
    adapter = read_adapter(tmp_path / "lora")
    # training: the config and the layers it builds
    rep = RepConfig(r=6, lora_alpha=10, target_modules=TARGETS, rank_pattern=RANK_PATTERN,
                    alpha_pattern=ALPHA_PATTERN, use_rslora=rslora, lora_dropout=0.0)
    layers = {n: m for n, m in get_loretta_model(build_tiny("llama"), rep).named_modules()
              if isinstance(m, RepLinear)}
    assert set(layers) == set(truth) == set(adapter.modules)
    for name, (r, scaling) in truth.items():
        assert rank_for(config, name) == r and scale_for(config, name) == pytest.approx(scaling, rel=1e-12)
        assert adapter.modules[name].a.shape[0] == r
        assert adapter.modules[name].scale == pytest.approx(scaling, rel=1e-12)
        assert rep.rank_for(name) == r and rep.scale_for(name) == pytest.approx(scaling, rel=1e-12)
        assert layers[name].r == r and layers[name].scale == pytest.approx(scaling, rel=1e-12)


def test_converting_keeps_every_module_scale_in_real_peft(tmp_path):
    """lora -> tt -> lora: the written PEFT config, loaded by PEFT, gives each module the
    r and scaling of the original, overlapping patterns and all."""
    from peft import PeftModel

    from loretta_merge.converters.lora import lora_to_tt, tt_to_lora
    from loretta_merge.formats import write_peft_lora

    pm = _peft_model(False)
    truth = _peft_truth(pm)
    perturb_trainable(pm, seed=3)
    pm.save_pretrained(tmp_path / "lora")
    rep, _ = lora_to_tt(tmp_path / "lora", tensor_rank=64)
    back, report = tt_to_lora(rep)
    write_peft_lora(back, tmp_path / "again")
    again = _peft_truth(PeftModel.from_pretrained(build_tiny("llama"), tmp_path / "again"))
    assert again.keys() == truth.keys()
    for name, (r, scaling) in truth.items():
        assert again[name][0] == r and again[name][1] == pytest.approx(scaling, rel=1e-9)
    assert max(m.err_delta for m in report.modules) < 1e-6


def test_pattern_key_rule():
    patterns = {"q_proj": 1, "layers.0.q_proj": 2}
    assert pattern_key(patterns, "model.layers.0.q_proj") == "q_proj"
    assert pattern_key(patterns, "model.layers.0.xq_proj") is None  # whole name parts only
    assert pattern_value({"layers.0.q_proj": 2, "q_proj": 1}, "model.layers.0.q_proj", 9) == 2
    assert pattern_value(patterns, "k_proj", 9) == 9
    with pytest.raises(ConfigError, match="rank_pattern key '\\(' is not a valid regular expression"):
        pattern_key({"(": 1}, "x")
    with pytest.raises(ConfigError, match="alpha_pattern"):
        from loretta_merge.adapters.config import RepConfig

        RepConfig(alpha_pattern={"[": 2.0})
