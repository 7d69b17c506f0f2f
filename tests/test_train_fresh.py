"""Tensors the base checkpoint lacks (a pooler absent from a ``BertForMaskedLM`` checkpoint,
a fresh classifier) are saved in the adapter even when frozen, so the trained model can be
rebuilt from that same base and the adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from loretta_merge.train import train
from test_train import FAST, _csv, _sentences, _tokenizer


@pytest.fixture(scope="session")
def mlm_bert(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    d = tmp_path_factory.mktemp("bert-mlm")
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(d)  # as the hub ships BERT: no pooler, an MLM head
    _tokenizer(d, causal=False)
    return d


def _logits_at_end(store: dict):
    from transformers import TrainerCallback

    class Logits(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            model.eval()
            with torch.no_grad():
                store["logits"] = model(input_ids=torch.tensor([[2, 4, 10, 3]])).logits.clone()

    return Logits()


@pytest.mark.parametrize("method", ["rep", "adp"])
def test_fresh_frozen_pooler_is_saved_and_rebuilds_the_model(mlm_bert, tmp_path, method):
    from transformers import BertForSequenceClassification

    from loretta_merge.adapters import load_loretta_model

    store: dict = {}
    out = tmp_path / "out"
    rep = train(model=mlm_bert, method=method, train_file=_csv(tmp_path / "d.csv", _sentences(16, 0)),
                eval_split=0, output_dir=out, max_steps=2, learning_rate=1e-2, replace_dense=False,
                callbacks=[_logits_at_end(store)], **FAST)
    assert "replaced_dense" not in rep.trainable_breakdown  # the pooler was frozen
    saved = load_file(out / "adapter_model.safetensors")
    names = {k.removeprefix("base_model.model.") for k in saved}
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
            "classifier.bias"} <= names, sorted(names)
    assert not any(k.startswith("bert.embeddings.word") for k in names)  # loaded tensors stay out
    torch.manual_seed(1234)  # another fresh init for what the checkpoint lacks
    base = BertForSequenceClassification.from_pretrained(mlm_bert, num_labels=2)
    net = load_loretta_model(base, out).eval()
    with torch.no_grad():
        logits = net(input_ids=torch.tensor([[2, 4, 10, 3]])).logits
    torch.testing.assert_close(logits, store["logits"], rtol=1e-5, atol=1e-6)
