"""``--verify`` for weighted and multi-adapter merges (issue 24, point 3).

The reference is ``base + Σ w_i (W_i - base)``, W_i the base with adapter i merged in memory
(PEFT's ``merge_and_unload``, or ``merge_loretta_model``). The check must pass on a correct
merge, fail on a wrong one, and, when it cannot run, fail loudly with nothing written (never
the silent skip it used to be), under ``-q`` too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny, perturb_trainable, run_main
from loretta_merge.errors import ConfigError, NumericsError
from loretta_merge.merge import merge
from loretta_merge.merge.plan import OpKind

TARGETS = {"opt": ["q_proj", "fc1"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
           "bert": ["query", "value"]}


def make_lora(arch: str, path: Path, *, seed: int, **kw) -> Path:
    from peft import LoraConfig, get_peft_model

    kw.setdefault("target_modules", TARGETS[arch])
    pm = get_peft_model(build_tiny(arch), LoraConfig(r=4, lora_alpha=8, **kw))
    perturb_trainable(pm, seed=seed, std=0.1)
    pm.save_pretrained(path)
    return path


def make_rep(arch: str, path: Path, *, seed: int) -> Path:
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import RepConfig

    torch.manual_seed(seed)
    model = get_loretta_model(build_tiny(arch), RepConfig(r=4, lora_alpha=8, tensor_rank=3))
    save_loretta_adapter(perturb_trainable(model, seed=seed + 1), path)
    return path


def no_temps(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".loretta-" in p.name]


# --------------------------------------------------------------------------- it runs, it passes

def test_weighted_two_adapter_merge_verifies_and_prints_the_check(tiny_model_dir, tmp_path, capsys):
    base = tiny_model_dir("opt")
    a1 = make_lora("opt", tmp_path / "a1", seed=1)
    a2 = make_lora("opt", tmp_path / "a2", seed=2, target_modules=["q_proj", "v_proj"])
    code, out, err = run_main([f"{base}+{a1}:0.7+{a2}:0.3", "-o", tmp_path / "out", "--verify"],
                              capsys)
    assert code == 0, err
    assert "; verify: max |logit diff|" in out and "tolerance" in out
    code, out, err = run_main(["merge", base, a1, a2, "--weights", "0.7,0.3", "-o",
                               tmp_path / "out2", "--verify", "--json"], capsys)
    assert code == 0, err
    v = json.loads(out)["verify"]
    assert v["passed"] and v["max_abs_logit_diff"] < 1e-5
    assert v["reference"] == f"base + 0.7*({a1} - base) + 0.3*({a2} - base)"


@pytest.mark.parametrize("case", ["lora+rep", "single-weighted-tied", "three-negative", "task-head"])
def test_weighted_merges_of_every_kind_verify(case, tiny_model_dir, tmp_path):
    """Weights that do not sum to 1 (the base term), a negative weight, LoRETTA rep beside
    PEFT, a tied embedding the adapter unties, a replaced classifier head: the reference is
    built for each and agrees with the merge. (DoRA cannot be weighted: the plan refuses it.)"""
    if case == "lora+rep":
        arch, adapters = "llama", [(make_lora("llama", tmp_path / "a", seed=1), 0.6),
                                   (make_rep("llama", tmp_path / "b", seed=3), 0.8)]
    elif case == "single-weighted-tied":
        arch, adapters = "gpt2", [(make_lora("gpt2", tmp_path / "a", seed=1,
                                             modules_to_save=["wte"]), 0.5)]
    elif case == "three-negative":
        arch, adapters = "opt", [(make_lora("opt", tmp_path / "a", seed=1), 0.5),
                                 (make_lora("opt", tmp_path / "b", seed=2), -0.25),
                                 (make_rep("opt", tmp_path / "c", seed=3), 1.0)]
    else:  # a bare BertModel base: the head only from adapter a (its weight must be 1;
        # the base has zeros there, not a random head per load)
        import transformers

        from conftest import TINY

        arch, adapters = "bert", [(make_lora("bert", tmp_path / "a", seed=1,
                                             task_type="SEQ_CLS"), 1.0),
                                  (make_lora("bert", tmp_path / "b", seed=2), 0.5)]
        transformers.BertModel(transformers.BertConfig(**TINY["bert"][1])).save_pretrained(
            tmp_path / "bare")
    base = tmp_path / "bare" if case == "task-head" else tiny_model_dir(arch)
    report = merge(base, adapters, tmp_path / "out", verify=True, progress=False)
    assert report.verify["passed"], report.verify
    assert report.verify["max_abs_logit_diff"] <= report.verify["tolerance"]
    if case == "single-weighted-tied":
        assert report.untied == ["lm_head.weight"]
    if case == "task-head":
        assert report.task_model == "BertForSequenceClassification"


# --------------------------------------------------------------------------- it can fail

@pytest.fixture
def doubled_second_adapter(monkeypatch):
    """A kernel that adds the second adapter's low-rank update twice: a merge that is wrong
    only in how the adapters are weighted."""
    import loretta_merge.merge.kernel as kernel

    original = kernel._update

    def wrong(acc, rows, ops, values, *args, **kwargs):  # the fine-tunes' arguments
        original(acc, rows, ops, values, *args, **kwargs)
        for op in ops:
            if op.kind is OpKind.LOW_RANK and "a2" in op.source:
                acc.addmm_(op.left[rows], op.right, alpha=op.weight)

    monkeypatch.setattr(kernel, "_update", wrong)


def test_a_wrongly_weighted_merge_fails_verify(tiny_model_dir, tmp_path, capsys,
                                                doubled_second_adapter):
    base = tiny_model_dir("opt")
    a1 = make_lora("opt", tmp_path / "a1", seed=1)
    a2 = make_lora("opt", tmp_path / "a2", seed=2)
    with pytest.raises(NumericsError, match=r"differs from base \+ 0.7\*"):
        merge(base, [(a1, 0.7), (a2, 0.3)], tmp_path / "out", verify=True, progress=False)
    assert not (tmp_path / "out").exists() and no_temps(tmp_path)
    code, out, err = run_main([f"{base}+{a1}:0.7+{a2}:0.3", "-o", tmp_path / "out", "--verify",
                               "-q"], capsys)
    assert code != 0 and out == "" and "differs from base" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and no_temps(tmp_path)
    # without --verify the wrong merge goes through: the check is what caught it
    assert run_main([f"{base}+{a1}:0.7+{a2}:0.3", "-o", tmp_path / "out", "-q"], capsys)[0] == 0


def test_verify_is_not_fooled_by_a_reference_that_ignores_the_weights(tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    """Compared against the wrong combination (weights 1 and 1), the right merge fails."""
    import loretta_merge.merge.verify as verify

    base = tiny_model_dir("opt")
    a1 = make_lora("opt", tmp_path / "a1", seed=1)
    a2 = make_lora("opt", tmp_path / "a2", seed=2)
    real = verify._combined_reference
    monkeypatch.setattr(verify, "_combined_reference", lambda b, cls, items: real(
        b, cls, [dataclasses.replace(i, weight=1.0) for i in items]))
    with pytest.raises(NumericsError, match="differs from"):
        merge(base, [(a1, 0.7), (a2, 0.3)], tmp_path / "out", verify=True, progress=False)
    assert not (tmp_path / "out").exists() and no_temps(tmp_path)


# --------------------------------------------------------------------------- it cannot run: loud

@pytest.fixture
def unknown_class_base(tiny_model_dir, tmp_path):
    """A checkpoint whose config names a class and a model type transformers does not have."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("opt"), base)
    config = json.loads((base / "config.json").read_text())
    config.update(architectures=["NoSuchModelForCausalLM"], model_type="no-such-model")
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.mark.parametrize("quiet", [False, True])
def test_verify_that_cannot_build_the_model_fails_before_writing(unknown_class_base, tmp_path,
                                                                 capsys, quiet):
    a1 = make_lora("opt", tmp_path / "a1", seed=1)
    a2 = make_lora("opt", tmp_path / "a2", seed=2)
    argv = [f"{unknown_class_base}+{a1}:0.7+{a2}:0.3", "-o", tmp_path / "out", "--verify"]
    code, out, err = run_main(argv + (["-q"] if quiet else []), capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: --verify needs to build the model") and "NoSuchModelForCausalLM" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists() and no_temps(tmp_path)
    # the merge itself does not need the class: without --verify it is written
    assert run_main(argv[:-1] + ["-q"], capsys)[0] == 0 and (tmp_path / "out").is_dir()


@pytest.mark.parametrize("quiet", [False, True])
def test_verify_failing_while_it_runs_is_an_error_with_nothing_written(tiny_model_dir, tmp_path,
                                                                       capsys, monkeypatch, quiet):
    import loretta_merge.merge.verify as verify

    def broken(*args, **kwargs):
        raise RuntimeError("size mismatch for model.decoder.layers.0.fc1.weight")

    monkeypatch.setattr(verify, "_combined_reference", broken)
    base = tiny_model_dir("opt")
    a1 = make_lora("opt", tmp_path / "a1", seed=1)
    argv = [f"{base}+{a1}:0.5", "-o", tmp_path / "out", "--verify"] + (["-q"] if quiet else [])
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--verify could not run" in err and "RuntimeError" in err and "fc1" in err
    assert not (tmp_path / "out").exists() and no_temps(tmp_path)


def test_verify_without_peft_refused_up_front_for_several_adapters(tiny_model_dir, tmp_path,
                                                                   capsys, monkeypatch):
    base = tiny_model_dir("opt")
    a1 = make_lora("opt", tmp_path / "a1", seed=1)
    a2 = make_rep("opt", tmp_path / "a2", seed=2)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails, as if not installed
    code, out, err = run_main([f"{base}+{a2}:0.5+{a1}:0.5", "-o", tmp_path / "out", "--verify",
                               "-q"], capsys)
    assert code != 0 and out == "" and "pip install" in err and "peft" in err
    assert not (tmp_path / "out").exists() and no_temps(tmp_path)


def test_adapter_without_an_in_memory_model_refused_up_front(tiny_model_dir, tmp_path):
    """A LoRA given as an Adapter object (no directory for PEFT to load) has no reference."""
    from loretta_merge.formats import read_adapter

    adapter = dataclasses.replace(read_adapter(make_lora("opt", tmp_path / "a1", seed=1)), path=None)
    with pytest.raises(ConfigError, match="--verify cannot build the in-memory model"):
        merge(tiny_model_dir("opt"), [(adapter, 0.5)], tmp_path / "out", verify=True, progress=False)
    assert not (tmp_path / "out").exists() and no_temps(tmp_path)


def test_weighted_mean_pooling_merge_verifies(tmp_path):
    """Mean-pooling adapters over a sentence-transformers BertModel: the reference pools as
    the merged model does (the base's first-token pooler is not part of the sum)."""
    import transformers

    from loretta_merge.adapters import RepConfig, get_loretta_model, save_loretta_adapter
    from loretta_merge.formats import read_adapter

    base = tmp_path / "base"
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(base))
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}))
    for name, seed in (("a", 1), ("b", 2)):
        clf = transformers.BertForSequenceClassification.from_pretrained(str(base), num_labels=2)
        model = get_loretta_model(clf.eval(), RepConfig(r=4, tensor_rank=2, pooling="auto"))
        save_loretta_adapter(perturb_trainable(model, seed=seed), tmp_path / name)
    # b without its head (two heads cannot be summed): its rep modules only, weighted
    b = dataclasses.replace(read_adapter(tmp_path / "b"), tensors={})
    report = merge(base, [(tmp_path / "a", 1.0), (b, 0.5)], tmp_path / "out", verify=True,
                   progress=False)
    assert report.verify["passed"], report.verify
    assert json.loads((tmp_path / "out" / "config.json").read_text())["loretta_pooling"] == "mean"
