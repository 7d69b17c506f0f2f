"""Adapters trained on a task model merge into the hub-laid-out base they were trained on.

The bases are saved by the classes hub checkpoints come from (``BertForMaskedLM``: ``bert.``
and ``cls.predictions``, no pooler; ``RobertaForMaskedLM``: ``roberta.`` and ``lm_head``;
``BertModel``: no prefix), the adapters by our own training API on the task model loaded
from that base. The merge writes the task model, equal to the in-memory LoRETTA model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import TINY, perturb_trainable, probe_inputs
from loretta_merge.cli import cli
from loretta_merge.errors import ShapeError
from loretta_merge.io import CheckpointReader
from loretta_merge.merge import merge
from loretta_merge.merge.buffers import BaseReads

# case -> (config family, class the base is saved from, task class the adapter is trained on)
CASES = {
    "bert-mlm": ("bert", "BertForMaskedLM", "BertForSequenceClassification"),
    "bert-bare": ("bert", "BertModel", "BertForSequenceClassification"),
    "bert-task": ("bert", "BertForSequenceClassification", "BertForSequenceClassification"),
    "roberta-mlm": ("roberta", "RobertaForMaskedLM", "RobertaForSequenceClassification"),
    "roberta-task": ("roberta", "RobertaForSequenceClassification",
                     "RobertaForSequenceClassification"),
    "llama-causal": ("llama", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "gpt2-lm": ("gpt2", "GPT2LMHeadModel", "GPT2ForSequenceClassification"),
}
# a classifier on a decoder pools at the last non-pad token: it needs a pad token id
_EXTRA = {"llama": {"pad_token_id": 0}, "gpt2": {"pad_token_id": 0}}


def _config(family: str, **overrides):
    import transformers

    cls = getattr(transformers, TINY[family][0])
    return cls(**{**TINY[family][1], **_EXTRA.get(family, {}), **overrides})


def save_base(case: str, path: Path, **overrides) -> Path:
    import transformers

    family, base_cls, _ = CASES[case]
    torch.manual_seed(0)
    getattr(transformers, base_cls)(_config(family, **overrides)).save_pretrained(path)
    return path


def task_model(case: str, base: Path):
    import transformers

    torch.manual_seed(1)  # the fresh head (and pooler, where the base lacks it)
    return getattr(transformers, CASES[case][2]).from_pretrained(base).eval()


def rep_adapter(case: str, base: Path, path: Path):
    """Our training API on the task model loaded from ``base``; every trainable tensor moved."""
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    torch.manual_seed(2)
    model = get_loretta_model(task_model(case, base), RepConfig(r=4, lora_alpha=8, tensor_rank=3))
    perturb_trainable(model, seed=3, std=0.05)
    save_loretta_adapter(model.eval(), path)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**probe_inputs(128)).logits.float()


def no_weight_reads(monkeypatch):
    def refuse(self, key):
        raise AssertionError(f"read {key} before the plan was checked")

    monkeypatch.setattr(CheckpointReader, "get", refuse)
    monkeypatch.setattr(BaseReads, "read", refuse)


@pytest.mark.parametrize("case", list(CASES))
def test_rep_adapter_merges_into_the_base_it_was_trained_on(case, tmp_path):
    import transformers

    base = save_base(case, tmp_path / "base")
    model = rep_adapter(case, base, tmp_path / "rep")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, [f"{base}+{tmp_path / 'rep'}", "-o", str(out), "--verify",
                                   "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads(res.stdout)
    assert report["verify"]["passed"]
    task_cls = CASES[case][2]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [task_cls]
    assert report["task_model"] == (None if CASES[case][1] == task_cls else task_cls)
    if report["task_model"]:  # the labels the head was trained with
        assert len(cfg["id2label"]) == 2 and cfg["label2id"] == {"LABEL_0": 0, "LABEL_1": 1}
    keys = set(CheckpointReader(out).keys())
    assert not any(k.startswith(("lm_head.", "cls.")) for k in keys)  # the LM head is dropped
    want = set(getattr(transformers, task_cls)(_config(CASES[case][0])).state_dict())
    assert keys == want  # exactly the task model's tensors
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ref = logits(model)
    assert not torch.allclose(ref, logits(task_model(case, base)), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(logits(merged), ref, rtol=0, atol=2e-6 * max(1.0, float(ref.abs().max())))


def test_peft_lora_with_head_merges_into_roberta_mlm_base(tmp_path):
    """A PEFT LoRA (modules_to_save=classifier) on RobertaForSequenceClassification built
    from a RobertaForMaskedLM checkpoint: equal to PEFT's own model, --verify through PEFT."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    base = save_base("roberta-mlm", tmp_path / "base")
    pm = get_peft_model(task_model("roberta-mlm", base),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                   modules_to_save=["classifier"], task_type="SEQ_CLS"))
    perturb_trainable(pm, seed=4, std=0.1)
    pm.save_pretrained(tmp_path / "lora")
    report = merge(base, [(tmp_path / "lora", 1.0)], tmp_path / "out", progress=False, verify=True)
    assert report.verify["passed"] and report.task_model == "RobertaForSequenceClassification"
    assert "lm_head.dense.weight" in report.dropped
    merged = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    reference = PeftModel.from_pretrained(task_model("roberta-mlm", base), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(merged), logits(reference), rtol=1e-5, atol=1e-5)


def test_adapter_without_the_fresh_pooler_is_refused_by_name(tmp_path, monkeypatch):
    """BertForSequenceClassification on a BertForMaskedLM checkpoint initialises its pooler
    fresh; an adapter that does not carry it cannot be merged, and the error names it."""
    from peft import LoraConfig, get_peft_model

    base = save_base("bert-mlm", tmp_path / "base")
    pm = get_peft_model(task_model("bert-mlm", base),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                   modules_to_save=["classifier"], task_type="SEQ_CLS"))
    perturb_trainable(pm, seed=4)
    pm.save_pretrained(tmp_path / "lora")
    no_weight_reads(monkeypatch)
    with pytest.raises(ShapeError) as info:
        merge(base, [(tmp_path / "lora", 1.0)], tmp_path / "out", progress=False)
    msg = str(info.value)
    assert "BertForSequenceClassification needs bert.pooler.dense.weight, bert.pooler.dense.bias" in msg
    assert "only the adapter can supply them" in msg and "nothing was written" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("other", ["narrower", "other-family", "fewer-layers"])
def test_a_different_model_is_refused_before_any_read(other, tmp_path, monkeypatch):
    base_case, overrides = {"narrower": ("roberta-mlm", {"hidden_size": 32}),
                            "other-family": ("bert-mlm", {}),
                            "fewer-layers": ("roberta-mlm", {"num_hidden_layers": 1})}[other]
    rep_adapter("roberta-mlm", save_base("roberta-mlm", tmp_path / "trained-on"), tmp_path / "rep")
    base = save_base(base_case, tmp_path / "other", **overrides)
    no_weight_reads(monkeypatch)
    with pytest.raises(ShapeError) as info:
        merge(base, [(tmp_path / "rep", 1.0)], tmp_path / "out", progress=False)
    msg = str(info.value)
    assert "Is BASE the model the adapter was trained on? Pass that base" in msg
    expected = {"narrower": "module roberta.encoder.layer.0.attention.self.query expects "
                            "roberta.encoder.layer.0.attention.self.query.weight of shape (64, 64), "
                            "the base has (32, 32)",
                "other-family": "module roberta.encoder.layer.0.attention.self.query has no base "
                                "tensor roberta.encoder.layer.0.attention.self.query.weight",
                "fewer-layers": "module roberta.encoder.layer.1.attention.self.query has no base "
                                "tensor"}[other]
    assert expected in msg
    assert not (tmp_path / "out").exists()
