"""``method="full"``: every weight trained, a whole fine-tuned checkpoint written, which
``extract`` reads as FINETUNED; adapter options are refused, not ignored."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from loretta_merge.errors import ConfigError
from loretta_merge.train import TrainArgs, train

from test_train import FAST, _csv, _sentences, with_tokenizer


@pytest.fixture(scope="session")
def bert(tiny_model_dir, tmp_path_factory):
    return with_tokenizer(tiny_model_dir, tmp_path_factory, "bert", "full-bert", causal=False)


def test_full_writes_a_loadable_checkpoint_with_every_weight_changed(bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loretta_merge.converters.extract import extract

    train_f = _csv(tmp_path / "train.csv", _sentences(16, 0))
    out = tmp_path / "ft"
    rep = train(model=bert, method="full", train_file=train_f, eval_split=0.0, output_dir=out,
                max_steps=2, learning_rate=1e-2, seed=0, save_steps=10_000, **FAST)
    assert rep.steps == 2
    base = AutoModelForSequenceClassification.from_pretrained(bert)
    ft = AutoModelForSequenceClassification.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)  # the tokenizer travels with the checkpoint
    assert rep.trainable_params == sum(p.numel() for p in ft.parameters())
    # the file on disk is what was trained: every Linear weight moved from the base's
    stored = load_file(out / "model.safetensors")
    base_sd = base.state_dict()
    moved = [k for k, t in stored.items() if k in base_sd and not torch.equal(t, base_sd[k])]
    linears = [k for k, t in stored.items() if k.endswith(".weight") and t.ndim == 2
               and "embeddings" not in k and k in base_sd]
    assert linears and set(linears) <= set(moved)
    for k, t in ft.state_dict().items():
        assert torch.equal(t, stored[k]), k
    # and extract reads the pair: base -> full fine-tune, as a TT adapter (a PEFT LoRA cannot
    # hold a module whose bias changed too, which a full fine-tune always does)
    adapter, report = extract(bert, out, to="tt", rank=1, fit_steps=0)
    assert adapter.modules and all(r.rank == 1 for r in report.modules)
    assert any(k.endswith("query.bias") for k in adapter.tensors)


@pytest.mark.parametrize("opts, flag", [(dict(r=4), "--r"), (dict(target_modules=["query"]),
                                                           "--target-modules"),
                                        (dict(train_norms=False), "--no-train-norms"),
                                        (dict(bf16=True), "--bf16")])
def test_full_refuses_adapter_options(opts, flag):
    with pytest.raises(ConfigError, match=flag):
        TrainArgs(method="full", **opts).check()
