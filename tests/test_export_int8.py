"""int8 export judged on real text (issue 27 part 4): a trained classifier with the embedded
tokenizer passes ``--quantize int8`` with no other option; a quantizer that breaks the graph
is refused in one line with nothing written. Real exports in real ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_main

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory):
    """A small BERT classifier with the embedded MiniLM's tokenizer, trained for a few steps
    on Rotten Tomatoes train rows (real weights that classify, not random ones)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from loretta_merge.embedded import default_model_path, rotten_tomatoes

    try:
        tok = AutoTokenizer.from_pretrained(default_model_path())
        train, _ = rotten_tomatoes()
    except Exception as exc:  # noqa: BLE001 - the embedded packages are optional
        pytest.skip(f"embedded model/data missing: {exc}")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128, num_labels=2))
    rows = train[1::20][:256]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(3):
        for s in range(0, len(rows), 32):
            enc = tok([r["text"] for r in rows[s:s + 32]], padding=True, truncation=True,
                      max_length=64, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([r["label"] for r in rows[s:s + 32]])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("int8") / "clf"
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_trained_classifier_passes_int8_by_default_on_real_sentences(trained_classifier,
                                                                       tmp_path, capsys):
    out = tmp_path / "int8"
    code, text, err = run_main(["export", "onnx", trained_classifier, "-o", out, "--task",
                                "seq-cls", "--quantize", "int8", "--json"], capsys)
    assert code == 0, err
    q = json.loads(text)["quantize"]
    assert q["passed"] and "Rotten Tomatoes train rows" in q["judged_on"]
    assert q["text_rows"] == 256 and q["min_agreement"] == 0.98
    assert q["text_agreement"] >= 0.98
    assert q["accuracy_fp32"] is not None and q["accuracy_int8"] is not None
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops and q["int8_bytes"] < q["fp32_bytes"]
    # the reported agreement is what the written graph does on those sentences
    from transformers import AutoTokenizer

    from loretta_merge.embedded import calibration_sentences

    texts, _, _ = calibration_sentences(256)
    enc = AutoTokenizer.from_pretrained(trained_classifier)(texts, padding=True, truncation=True,
                                                            max_length=128, return_tensors="np")
    feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    pred = ort.InferenceSession(str(out / "model.onnx"),
                                providers=["CPUExecutionProvider"]).run(None, feed)[0].argmax(-1)
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        want = AutoModelForSequenceClassification.from_pretrained(trained_classifier)(
            **{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy().argmax(-1)
    assert np.mean(pred == want) == pytest.approx(q["text_agreement"], abs=0.02)
    # the human report names the text it was judged on and keeps the probe figures
    code, text, err = run_main(["export", "onnx", trained_classifier, "-o", out, "--force",
                                "--task", "seq-cls", "--quantize", "int8"], capsys)
    assert code == 0, err
    assert "Rotten Tomatoes train rows (embedded): same class" in text
    assert "random-token probes" in text


def _negate_classifier(real):
    """A quantizer that produces a bad graph: the real one, then the classifier's weight (or its
    int8 scales) negated."""
    def broken(src, dst, **kwargs):
        real(src, dst, **kwargs)
        model = onnx.load(str(dst))
        for t in model.graph.initializer:
            if "classifier.weight" in t.name and t.data_type == onnx.TensorProto.FLOAT:
                arr = -onnx.numpy_helper.to_array(t)
                t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
        onnx.save(model, str(dst))
    return broken


def test_a_bad_int8_graph_is_refused_in_one_line_and_nothing_is_written(trained_classifier,
                                                                         tmp_path, capsys,
                                                                         monkeypatch):
    from loretta_merge.converters.onnx import quantize

    monkeypatch.setattr(quantize, "run_quantizer", _negate_classifier(quantize.run_quantizer))
    out = tmp_path / "bad"
    code, _, err = run_main(["export", "onnx", trained_classifier, "-o", out, "--task",
                             "seq-cls", "--quantize", "int8"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "disagrees with the fp32 graph" in err and "fp32 class on" in err
    assert "nothing was written" in err and "--int8-min-agreement" in err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_min_agreement_option_needs_seq_cls_and_a_share(trained_classifier, tmp_path, capsys):
    code, _, err = run_main(["export", "onnx", trained_classifier, "-o", tmp_path / "x",
                             "--task", "seq-cls", "--quantize", "int8",
                             "--int8-min-agreement", "1.5"], capsys)
    assert code == 2 and "--int8-min-agreement" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_causal_lm_int8_is_judged_on_text_by_relative_error(tmp_path, capsys):
    """A decoder with a tokenizer: judged by ||int8 - fp32|| / ||fp32|| on the calibration
    sentences, next-token agreement reported."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loretta_merge.embedded import default_model_path

    try:
        tok = AutoTokenizer.from_pretrained(default_model_path())
    except Exception as exc:  # noqa: BLE001 - the embedded package is optional
        pytest.skip(f"embedded tokenizer missing: {exc}")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=False)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    code, text, err = run_main(["export", "onnx", tmp_path / "lm", "-o", tmp_path / "out",
                                "--task", "causal-lm", "--quantize", "int8", "--json"], capsys)
    assert code == 0, err
    q = json.loads(text)["quantize"]
    assert "Rotten Tomatoes train rows" in q["judged_on"] and q["min_agreement"] is None
    assert 0 < q["text_rel_error"] <= q["rel_error_allowed"] == 0.1
    assert 0 < q["text_agreement"] <= 1 and q["accuracy_fp32"] is None
