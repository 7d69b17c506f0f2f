"""A mean-pooling classifier (sentence-transformers base) from training to deployment.

The base is laid out as sentence-transformers ships one: a bare ``BertModel`` checkpoint
with ``1_Pooling/config.json`` (mean pooling). A rep adapter trained on it with
``pooling="auto"`` mean-pools; merging it must write a checkpoint that says so
(``loretta_pooling`` in its config, read by :func:`loretta_merge.pooling.apply_pooling`),
``--verify`` must compare with padding in its probe, the ONNX export of the merged model must
pool the same way in ONNX Runtime, and the conversions that cannot carry the pooling (PEFT
LoRA) or models that would disagree (two adapters pooling differently) are refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from conftest import perturb_trainable, probe_inputs, run_main
from loretta_merge.adapters import (RepConfig, get_loretta_model, load_loretta_model,
                                 save_loretta_adapter)
from loretta_merge.pooling import MeanPooler, apply_pooling


def _st_base(path):
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(path))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}))
    return path


def _classifier(base):
    return transformers.BertForSequenceClassification.from_pretrained(str(base), num_labels=2).eval()


def _adapter(base, out, *, pooling="auto", seed=1):
    model = get_loretta_model(_classifier(base), RepConfig(r=4, tensor_rank=2, pooling=pooling))
    perturb_trainable(model, seed=seed)
    save_loretta_adapter(model, out)
    return out


@pytest.fixture(scope="session")
def st(tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    base = _st_base(d / "base")
    adapter = _adapter(base, d / "mean-adapter")
    with torch.no_grad():
        want = load_loretta_model(_classifier(base), adapter).eval()(**probe_inputs()).logits
    return {"dir": d, "base": base, "adapter": adapter, "want": want}


def test_merge_writes_a_model_that_pools_as_trained(st, capsys):
    out = st["dir"] / "merged"
    code, _, err = run_main([f"{st['base']}+{st['adapter']}", "-o", out, "--verify"], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["loretta_pooling"] == "mean"
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert (out / "1_Pooling" / "config.json").is_file()  # the sentence-transformers module kept
    provenance = json.loads((out / "loretta_merge_provenance.json").read_text())
    assert provenance["pooling"] == "mean"
    merged = apply_pooling(transformers.BertForSequenceClassification.from_pretrained(str(out))).eval()
    assert isinstance(merged.bert.pooler, MeanPooler)
    with torch.no_grad():
        got = merged(**probe_inputs()).logits  # the probe pads its first row
    torch.testing.assert_close(got, st["want"], rtol=1e-5, atol=1e-5)
    # without apply_pooling transformers pools the first token: the logits would differ
    plain = transformers.BertForSequenceClassification.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(**probe_inputs()).logits, st["want"], atol=1e-4)


def test_onnx_export_of_the_merged_model_mean_pools(st, capsys):
    ort = pytest.importorskip("onnxruntime")
    merged = st["dir"] / "merged-for-onnx"
    assert run_main([f"{st['base']}+{st['adapter']}", "-o", merged], capsys)[0] == 0
    code, out, err = run_main(["export", "onnx", merged, "-o", st["dir"] / "onnx", "--task", "seq-cls"],
                              capsys)
    assert code == 0, err
    assert "validated on" in out
    session = ort.InferenceSession(str(st["dir"] / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy().astype(np.int64) for k, v in probe_inputs().items() if k in names}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    logits = session.run(None, feed)[0]
    np.testing.assert_allclose(logits, st["want"].numpy(), rtol=1e-4, atol=1e-4)


def test_verify_catches_a_merge_that_lost_the_pooling(st, capsys, monkeypatch):
    """The check has teeth: a merged config without the pooling key fails --verify."""
    import loretta_merge.merge.finish as finish

    monkeypatch.setattr(finish, "merged_pooling", lambda adapters: None)
    out = st["dir"] / "merged-lost"
    code, _, err = run_main([f"{st['base']}+{st['adapter']}", "-o", out, "--verify"], capsys)
    assert code != 0
    assert "verify" in err and "differs" in err
    assert not out.exists()


def test_tt_to_lora_refuses_a_mean_pooling_adapter(st, capsys):
    out = st["dir"] / "lora"
    code, _, err = run_main(["convert", "tt-to-lora", st["adapter"], "-o", out], capsys)
    assert code != 0
    assert "mean pooling" in err and "merge it instead" in err
    assert not out.exists()


def test_adapters_pooling_differently_are_not_merged_together(st, capsys):
    own = _adapter(st["base"], st["dir"] / "cls-adapter", pooling=None, seed=2)
    out = st["dir"] / "both"
    code, _, err = run_main(["merge", st["base"], f"{st['adapter']}:0.5", f"{own}:0.5", "-o", out],
                            capsys)
    assert code != 0
    assert "different poolings" in err and "merge them separately" in err
    assert not out.exists()
