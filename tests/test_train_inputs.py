"""Bad input to `train`: one line each, before any model is loaded; every row of every
data file validated (file, row, column); the training CLI flags of the "real models" issue."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from safetensors.torch import load_file

from conftest import run_main
from loretta_merge.errors import ConfigError, MissingDependencyError
from loretta_merge.train import TrainArgs, train
from loretta_merge.train import build
from test_train import FAST, _csv, _sentences, _tokenizer, with_tokenizer


@pytest.fixture(scope="session")
def bert(tiny_model_dir, tmp_path_factory):
    return with_tokenizer(tiny_model_dir, tmp_path_factory, "bert", "inputs-bert", causal=False)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load the model fails the test: the errors must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(build, "load_model", refuse)
    monkeypatch.setattr(build, "load_tokenizer", refuse)


def _one_line(capsys, argv) -> str:
    code, out, err = run_main([str(a) for a in argv], capsys)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


ROWS = "text,label\n" + "the film was good,1\nthe plot was bad,0\n" * 4


@pytest.mark.parametrize("case", ["csv-missing-label", "tsv-missing-text", "jsonl-no-label",
                                  "json-invalid", "json-not-objects", "pair-missing",
                                  "eval-file-bad-row", "csv-empty-label"])
def test_bad_rows_name_file_row_and_column(bert, tmp_path, capsys, no_model_load, case):
    extra: list = []
    if case == "csv-missing-label":  # a row past the first lacks the label field
        f = tmp_path / "d.csv"
        f.write_text(ROWS + "a lonely text\n")
        want = [r"d\.csv", r"row 8", r"'label'", r"line 10"]
    elif case == "tsv-missing-text":
        f = tmp_path / "d.tsv"
        f.write_text("label\ttext\n1\tgood film\n0\n")
        want = [r"d\.tsv", r"row 1", r"'text'", r"line 3"]
    elif case == "jsonl-no-label":
        f = tmp_path / "d.jsonl"
        f.write_text('{"text": "good", "label": 1}\n\n{"text": "bad"}\n')
        want = [r"d\.jsonl", r"row 1", r"'label'", r"line 3"]
    elif case == "json-invalid":
        f = tmp_path / "d.json"
        f.write_text('[{"text": "good", "label": 1},\n {"text": "bad" "label": 0}]')
        want = [r"d\.json is not valid JSON", r"line 2", r"list of objects"]
    elif case == "json-not-objects":
        f = tmp_path / "d.json"
        f.write_text('[{"text": "good", "label": 1}, ["bad", 0]]')
        want = [r"d\.json element 1", r"JSON object"]
    elif case == "pair-missing":
        f = tmp_path / "d.jsonl"
        f.write_text('{"a": "x", "b": "y", "label": 1}\n{"a": "x", "label": 0}\n')
        extra = ["--text-column", "a", "--text-pair-column", "b"]
        want = [r"d\.jsonl", r"row 1", r"'b'"]
    elif case == "eval-file-bad-row":
        f = _csv(tmp_path / "d.csv", _sentences(8, 0))
        ev = tmp_path / "ev.csv"
        ev.write_text("text,label\ngood,pos\nbad,\n")
        extra = ["--eval-file", ev]
        want = [r"ev\.csv", r"row 1", r"'label'"]
    else:
        f = tmp_path / "d.csv"
        f.write_text(ROWS + "a text,\n")
        want = [r"d\.csv", r"row 8", r"'label'"]
    line = _one_line(capsys, ["train", "--model", bert, "--train-file", f, "-o", tmp_path / "o",
                              "--eval-split", "0", *extra])
    import re
    for pattern in want:
        assert re.search(pattern, line), (pattern, line)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["fsdp-no-launcher", "zero-epochs", "zero-steps",
                                  "eval-split-too-large", "eval-split-one", "bf16-and-fp16",
                                  "target-modules-adp", "pair-causal"])
def test_bad_options_one_line_before_the_model(bert, tmp_path, capsys, no_model_load, monkeypatch,
                                               case):
    data = _csv(tmp_path / "d.csv", _sentences(4, 0))
    extra, want = {
        "fsdp-no-launcher": (["--fsdp"], [r"--fsdp", r"torchrun --nproc_per_node"]),
        "zero-epochs": (["--epochs", "0"], [r"--epochs", r"zero training steps"]),
        "zero-steps": (["--max-steps", "0"], [r"--max-steps", r"zero training steps"]),
        "eval-split-too-large": (["--eval-split", "0.9"], [r"--eval-split 0.9 of 4 rows leaves "
                                                          r"no train rows", r"--eval-file"]),
        "eval-split-one": (["--eval-split", "1"], [r"--eval-split", r"\[0, 1\)"]),
        "bf16-and-fp16": (["--bf16", "--fp16"], [r"--bf16 and --fp16"]),
        "target-modules-adp": (["--method", "adp", "--target-modules", "query"],
                               [r"--target-modules", r"--method rep"]),
        "pair-causal": (["--task", "causal-lm", "--text-pair-column", "b"],
                        [r"--text-pair-column", r"--prompt-column"]),
    }[case]
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    line = _one_line(capsys, ["train", "--model", bert, "--train-file", data, "-o",
                              tmp_path / "o", *extra])
    import re
    for pattern in want:
        assert re.search(pattern, line), (pattern, line)
    assert not (tmp_path / "o").exists()


def test_missing_accelerate_gives_the_install_line(bert, tmp_path, monkeypatch, no_model_load):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'loretta-merge\[train\]'"):
        train(model=bert, train_file=_csv(tmp_path / "d.csv", _sentences(4, 0)),
              output_dir=tmp_path / "o")


def test_args_dataclass_and_keywords_agree(tmp_path):
    a = TrainArgs(model="m", train_file="f.csv", epochs=2, target_modules="query, value")
    r = a.resolved()
    assert r.target_modules == ["query", "value"] and r.epochs == 2 and r.max_length == 128
    assert a.target_modules == "query, value"  # the caller's object is left alone
    with pytest.raises(ConfigError, match="--batch-size"):
        TrainArgs(batch_size=0).resolved()
    assert "pair" in TrainArgs.help("text_pair_column")


# ----------------------------------------------------------------------- the flags themselves

def test_sentence_pairs_tokenize_as_pairs_and_train(bert, tmp_path):
    from transformers import AutoTokenizer

    from loretta_merge.train import data as D

    tok = AutoTokenizer.from_pretrained(bert)
    ds = D.tokenize_classification(tok, ["good film"], [1], max_length=16, pairs=["bad plot"])
    ids = tok.convert_ids_to_tokens(ds[0]["input_ids"])
    assert ids == ["[CLS]", "good", "film", "[SEP]", "bad", "plot", "[SEP]"]
    rows = [{"s1": r["text"], "s2": "the movie", "label": r["label"]} for r in _sentences(16, 0)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = train(model=bert, train_file=f, text_column="s1", text_pair_column="s2",
                eval_split=0.25, output_dir=tmp_path / "o", max_steps=2, **FAST)
    assert rep.hyperparameters["text_pair_column"] == "s2" and rep.steps == 2


def test_target_modules_and_tokenizer_flags(bert, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    _tokenizer(tok_dir, causal=False)
    model_only = tmp_path / "model"
    shutil.copytree(bert, model_only)
    for p in model_only.iterdir():
        if "token" in p.name or p.name == "special_tokens_map.json":
            p.unlink()
    data = _csv(tmp_path / "d.csv", _sentences(16, 0))
    out = tmp_path / "o"
    code, _, err = run_main(["train", "--model", str(model_only), "--tokenizer", str(tok_dir),
                             "--train-file", str(data), "--target-modules", "query",
                             "--max-steps", "1", "--eval-split", "0", "-o", str(out), "-q"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["query"]
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert any(".query." in k for k in keys) and not any(".value." in k for k in keys)
    # without --tokenizer the model directory has none: one line naming the flag
    line = _one_line(capsys, ["train", "--model", model_only, "--train-file", data,
                              "--max-steps", "1", "-o", tmp_path / "o2"])
    assert "--tokenizer" in line


def test_help_shows_default_targets_per_architecture(capsys):
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    assert "--target-modules" in flat and "bert/roberta/xlm-roberta: query,value" in flat
    assert "gpt2: c_attn" in flat and "--text-pair-column" in flat and "--fsdp" in flat


def test_progress_line_shows_steps_loss_and_time_left():
    from loretta_merge.train.trainer import format_progress

    line = format_progress(50, 250, 0.69314, elapsed=10.0)
    assert line == "step 50/250 | loss 0.6931 | 10.0 s elapsed | ~40s left"
    assert "~1m 40s left" in format_progress(10, 110, None, elapsed=10.0)
    assert "time left -" in format_progress(5, 10, 1.0, elapsed=1.0, first_step=5)  # just resumed


def test_fsdp_memory_example_counts_llama2_7b():
    """The per-process memory in docs/training.md comes from examples/fsdp_memory.py: the model it
    builds on the meta device has LLaMA-2-7B's published 6,738,415,616 base parameters."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "fsdp_memory.py"
    spec = importlib.util.spec_from_file_location("fsdp_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    counts = mod.llama2_7b_counts()
    cores = counts["trainable"] - 65 * 4096  # the trained RMSNorm weights: 2 per block + final
    assert counts["params"] - cores == 6_738_415_616
    from loretta_merge.train.fsdp import memory_per_process

    one = memory_per_process(params=counts["params"], trainable=counts["trainable"], world=1,
                             root_params=counts["root_params"], block_params=counts["block_params"])
    eight = memory_per_process(params=counts["params"], trainable=counts["trainable"], world=8,
                               root_params=counts["root_params"],
                               block_params=counts["block_params"])
    assert one["sharded"] == one["unsharded"] and eight["sharded"] < one["sharded"] / 3
