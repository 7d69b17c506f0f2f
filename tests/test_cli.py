"""The command line's own behaviour: the BASE+ADAPTER shorthand wherever ``-o`` stands, and
``-q/--quiet`` on every command (nothing on stdout or stderr on success; --json still prints).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import build_tiny, perturb_trainable, run_main, save_tiny
from loretta_merge.cli import shorthand_args


@pytest.fixture(scope="session")
def files(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """A tiny Llama, a PEFT LoRA and a LoRETTA_rep adapter for it, and a training CSV."""
    from peft import LoraConfig, get_peft_model

    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    root = tmp_path_factory.mktemp("cli")
    lora = get_peft_model(build_tiny("llama"), LoraConfig(r=4, lora_alpha=8,
                                                          target_modules=["q_proj", "v_proj"]))
    perturb_trainable(lora)
    lora.save_pretrained(root / "lora")
    rep = get_loretta_model(build_tiny("llama"), RepConfig(lora_dropout=0.0))
    perturb_trainable(rep)
    save_loretta_adapter(rep, root / "rep")
    (root / "train.csv").write_text("text,label\n" + "".join(f"the film {w},{i % 2}\n"
                                                             for i, w in enumerate(["good", "bad"] * 4)))
    trainable = root / "llama-tok"
    shutil.copytree(tiny_model_dir("llama"), trainable)
    _word_tokenizer(trainable, ["the", "film", "good", "bad"])
    # one layer for export-onnx: -q acts alike at any depth, and its export is a third faster
    return {"base": tiny_model_dir("llama"), "lora": root / "lora", "rep": root / "rep",
            "data": root / "train.csv", "trainable": trainable,
            "one-layer": save_tiny("llama", root / "llama-1", layers=1)}


def _word_tokenizer(path: Path, words: list[str]) -> None:
    """A real word-level fast tokenizer saved beside the tiny model (train needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                            bos_token="[BOS]", eos_token="[EOS]").save_pretrained(path)


def _tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --------------------------------------------------------------------------- shorthand

@pytest.mark.parametrize("argv, want", [
    (["b+a", "-o", "o"], ["merge", "b+a", "-o", "o"]),
    (["-o", "o", "b+a"], ["merge", "-o", "o", "b+a"]),
    (["--output", "o", "b+a:0.5+c", "-q"], ["merge", "--output", "o", "b+a:0.5+c", "-q"]),
    (["--out=o", "b+a"], ["merge", "--out=o", "b+a"]),
    (["--debug", "-o", "o", "--dtype", "bf16", "b+a"], ["--debug", "merge", "-o", "o", "--dtype", "bf16", "b+a"]),
    (["-q", "-o", "o", "b+a"], ["merge", "-q", "-o", "o", "b+a"]),
    # an output whose name holds '+' is the value of -o, not the spec
    (["-o", "x+y", "b+a"], ["merge", "-o", "x+y", "b+a"]),
    # commands and plain arguments are left alone
    (["merge", "b", "a", "-o", "o"], ["merge", "b", "a", "-o", "o"]),
    (["inspect", "x+y"], ["inspect", "x+y"]),
    (["--debug", "convert", "lora-to-tt", "a+b"], ["--debug", "convert", "lora-to-tt", "a+b"]),
    (["--help"], ["--help"]),
])
def test_shorthand_args(argv, want):
    assert shorthand_args(argv) == want


def test_output_before_shorthand_merges(files, tmp_path, capsys):
    """`loretta-merge -o OUT BASE+ADAPTER` (issue 16) writes what `BASE+ADAPTER -o OUT` does."""
    spec = f"{files['base']}+{files['lora']}"
    code, out, err = run_main([spec, "-o", tmp_path / "after", "-q"], capsys)
    assert code == 0, err
    code, out, err = run_main(["-o", tmp_path / "before", spec, "-q"], capsys)
    assert code == 0, err
    code, out, err = run_main(["--debug", "--output", tmp_path / "debug", "-q", spec], capsys)
    assert code == 0, err
    ref = _tensors(tmp_path / "after")
    assert ref
    for name in ("before", "debug"):
        got = _tensors(tmp_path / name)
        assert got.keys() == ref.keys()
        assert all((got[k] == ref[k]).all() for k in ref), name


# --------------------------------------------------------------------------- -q everywhere

def _argv(files: dict[str, Path], tmp: Path, command: str) -> list:
    b, lora, rep = files["base"], files["lora"], files["rep"]
    return {
        "merge": ["merge", b, lora, "-o", tmp / "out"],
        "shorthand": [f"{b}+{lora}", "-o", tmp / "out"],
        "lora-to-tt": ["convert", "lora-to-tt", lora, "-o", tmp / "out", "--tensor-rank", "2"],
        "tt-to-lora": ["convert", "tt-to-lora", rep, "-o", tmp / "out"],
        "export-safetensors": ["export", "safetensors", b, "-o", tmp / "out"],
        "export-onnx": ["export", "onnx", files["one-layer"], "-o", tmp / "out"],
        "inspect": ["inspect", rep],
        "train": ["train", "--model", files["trainable"], "--train-file", files["data"], "-o", tmp / "out",
                  "--max-steps", "1", "--eval-split", "0", "--batch-size", "4"],
    }[command]


COMMANDS = ["merge", "shorthand", "lora-to-tt", "tt-to-lora", "export-safetensors", "export-onnx",
            "inspect", "train"]


@pytest.mark.parametrize("command", COMMANDS)
def test_quiet_prints_nothing(command, files, tmp_path, capsys):
    # without -q the command reports something (so the check below is not vacuous); for
    # export-onnx that is test_export.py::test_bert_seq_cls_cli (an export costs ~4 s)
    if command != "export-onnx":
        code, out, err = run_main(_argv(files, tmp_path, command), capsys)
        assert code == 0, err
        assert out.strip() or err.strip(), "without -q the command reports something"
        if (tmp_path / "out").exists():
            shutil.rmtree(tmp_path / "out")
    code, out, err = run_main(_argv(files, tmp_path, command) + ["-q"], capsys)
    assert code == 0, err
    assert out == "", out
    assert err == "", err
    if command != "inspect":
        assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "shorthand"])  # = merge
def test_quiet_keeps_json(command, files, tmp_path, capsys):
    argv = _argv(files, tmp_path, command)
    code, out, err = run_main(argv + ["-q", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert isinstance(report, dict) and report


def test_every_command_documents_quiet(capsys):
    for argv in (["merge"], ["train"], ["inspect"], ["convert", "lora-to-tt"], ["convert", "tt-to-lora"],
                 ["export", "onnx"], ["export", "safetensors"]):
        code, out, _ = run_main(argv + ["--help"], capsys)
        assert code == 0
        assert "-q, --quiet" in out, argv


def test_quiet_does_not_hide_errors(files, tmp_path, capsys):
    code, out, err = run_main(["convert", "tt-to-lora", files["lora"], "-o", tmp_path / "out", "-q"], capsys)
    assert code == 2
    assert err.startswith("error: ") and out == ""


@pytest.mark.slow
def test_quiet_in_a_fresh_process_prints_nothing(files, tmp_path, capsys):
    """In a new process (as a user runs it), -q also hides import-time warnings and log
    records of the libraries a command loads (transformers and what it pulls in); stdout and
    stderr stay empty. Without -q the same command prints its table (checked in this
    process: a second child would only import torch again)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    env.pop("LORETTA_DEBUG", None)
    args = ["inspect", "--config", str(files["base"] / "config.json"), "--method", "rep"]
    code, out, err = run_main(args, capsys)
    assert code == 0 and out.strip(), err
    proc = subprocess.run([sys.executable, "-m", "loretta_merge.cli", *args, "-q"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", proc.stderr[-2000:]
