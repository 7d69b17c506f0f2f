"""Faults: a full disk, a kill, a Ctrl-C or a SIGTERM in the middle of writing, and a failing
``--force`` run, for every command that writes a directory.

tests/test_merge.py already covers the merge's SIGKILL, SIGINT, ENOSPC and a failing --force
run caught by a NaN check; this file covers the other writers (convert both ways, export
safetensors, train's adapter) and what the merge tests leave out (SIGTERM, a --force run killed by ENOSPC,
compared bit for bit). The disk fills up by injecting ``OSError(ENOSPC)`` at the one place
bytes reach an output file (``loretta_merge.io.writer.write_bytes``, used by the shard
writer, the adapter writers and every side file); kills are real signals to real
subprocesses, slowed down by ``tests/_slow_cli.py`` (the same function, patched in the child).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_tiny, perturb_trainable, run_main

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers

def digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256), to compare trees bit for bit."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def temps(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".loretta-" in p.name]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code, _, err = run_main(argv, capsys)
    return code, err


def assert_disk_full(code: int, err: str, out: Path, *, one_line: bool = True) -> None:
    """A full disk: exit 1 (not a user error), one line that says so and what to do."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1, err
    if one_line:
        assert len(lines) == 1, err
    assert lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    line = lines[-1].lower()
    assert "no space left" in line and "free space" in line, line
    assert out.name in line, line


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """A real PEFT LoRA and a LoRETTA_rep adapter on the tiny Llama."""
    from peft import LoraConfig, get_peft_model

    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    root = tmp_path_factory.mktemp("fault-adapters")
    pm = get_peft_model(build_tiny("llama"), LoraConfig(r=4, lora_alpha=8,
                                                        target_modules=["q_proj", "v_proj"]))
    rep = get_loretta_model(build_tiny("llama"), RepConfig(lora_dropout=0.0))
    perturb_trainable(pm, seed=3)
    perturb_trainable(rep, seed=4)
    pm.save_pretrained(root / "lora")
    save_loretta_adapter(rep, root / "rep")
    return {"lora": root / "lora", "rep": root / "rep"}


def full_disk_after(n: int):
    """A replacement for a write call that works ``n`` times, then raises ENOSPC."""
    calls = []

    def fail_or(real):
        def write(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)
        return write
    return fail_or


def convert_argv(direction: str, adapters: dict[str, Path], out: Path) -> list:
    if direction == "lora-to-tt":
        return ["convert", "lora-to-tt", adapters["lora"], "-o", out, "--tensor-rank", "2"]
    return ["convert", "tt-to-lora", adapters["rep"], "-o", out]


# --------------------------------------------------------------------------- convert

@pytest.mark.parametrize("direction", ["lora-to-tt", "tt-to-lora"])
def test_convert_disk_full_fails_cleanly(direction, adapters, tmp_path, monkeypatch, capsys):
    import loretta_merge.io.writer as writer

    monkeypatch.setattr(writer, "write_bytes", full_disk_after(0)(writer.write_bytes))
    out = tmp_path / "out"
    code, err = run_cli(convert_argv(direction, adapters, out), capsys)
    assert_disk_full(code, err, out)
    assert not out.exists() and not temps(tmp_path)


@pytest.mark.parametrize("direction", ["lora-to-tt", "tt-to-lora"])
def test_convert_failed_force_keeps_previous_output(direction, adapters, tmp_path, monkeypatch, capsys):
    import loretta_merge.io.writer as writer

    out = tmp_path / "out"
    code, err = run_cli(convert_argv(direction, adapters, out), capsys)
    assert code == 0, err
    before = digest(out)
    assert "adapter_model.safetensors" in before
    real = writer.write_bytes
    monkeypatch.setattr(writer, "write_bytes", full_disk_after(1)(real))  # the second write fails
    code, err = run_cli(convert_argv(direction, adapters, out) + ["--force"], capsys)
    assert_disk_full(code, err, out)
    assert digest(out) == before and not temps(tmp_path)
    monkeypatch.setattr(writer, "write_bytes", real)  # the disk has room again: --force replaces
    code, err = run_cli(convert_argv(direction, adapters, out) + ["--force"], capsys)
    assert code == 0, err
    assert set(digest(out)) == set(before) and not temps(tmp_path)


# --------------------------------------------------------------------------- export safetensors

def test_export_safetensors_disk_full_fails_cleanly(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import loretta_merge.io.writer as writer

    monkeypatch.setattr(writer, "write_bytes", full_disk_after(3)(writer.write_bytes))
    out = tmp_path / "out"
    code, err = run_cli(["export", "safetensors", tiny_model_dir("llama"), "-o", out,
                         "--max-shard-size", "50KB"], capsys)
    assert_disk_full(code, err, out)
    assert not out.exists() and not temps(tmp_path)


def test_export_safetensors_failed_force_keeps_previous_output(tiny_model_dir, tmp_path, monkeypatch,
                                                               capsys):
    import loretta_merge.io.writer as writer

    base, out = tiny_model_dir("llama"), tmp_path / "out"
    code, err = run_cli(["export", "safetensors", base, "-o", out, "--max-shard-size", "100KB"], capsys)
    assert code == 0, err
    before = digest(out)
    assert "model.safetensors.index.json" in before
    monkeypatch.setattr(writer, "write_bytes", full_disk_after(5)(writer.write_bytes))
    code, err = run_cli(["export", "safetensors", base, "-o", out, "--force", "--dtype", "bfloat16"],
                        capsys)
    assert_disk_full(code, err, out)
    assert digest(out) == before and not temps(tmp_path)


def _slow(argv: list) -> subprocess.Popen:
    """The CLI in a subprocess, each output write followed by a 0.3 s pause (tests/_slow_cli.py)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "_slow_cli.py"), "0.3", *map(str, argv)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(proc: subprocess.Popen, parent: Path) -> None:
    deadline = time.time() + 60
    while not temps(parent):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the command never started writing"
        time.sleep(0.05)
    time.sleep(0.5)  # a few tensors into the run


def test_export_safetensors_sigkill_then_next_run_cleans(tiny_model_dir, tmp_path, capsys):
    base, out = tiny_model_dir("llama"), tmp_path / "out"
    proc = _slow(["export", "safetensors", base, "-o", out, "--max-shard-size", "50KB"])
    _wait_for_temp(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists() and len(temps(tmp_path)) == 1  # a killed process cannot clean up
    code, err = run_cli(["export", "safetensors", base, "-o", out, "--max-shard-size", "50KB"], capsys)
    assert code == 0, err
    assert out.is_dir() and not temps(tmp_path)


def test_export_safetensors_sigint_leaves_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = _slow(["export", "safetensors", tiny_model_dir("llama"), "-o", out])
    _wait_for_temp(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and ("interrupted" in err or "aborted" in err)
    assert not out.exists() and not temps(tmp_path)


def test_export_safetensors_sigint_during_force_keeps_previous(tiny_model_dir, tmp_path, capsys):
    base, out = tiny_model_dir("llama"), tmp_path / "out"
    code, err = run_cli(["export", "safetensors", base, "-o", out], capsys)
    assert code == 0, err
    before = digest(out)
    proc = _slow(["export", "safetensors", base, "-o", out, "--force", "--dtype", "float16"])
    _wait_for_temp(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert digest(out) == before and not temps(tmp_path)


# --------------------------------------------------------------------------- merge (what test_merge.py leaves out)

def test_merge_sigterm_leaves_nothing(tiny_model_dir, adapters, tmp_path):
    out = tmp_path / "out"
    proc = _slow([f"{tiny_model_dir('llama')}+{adapters['lora']}", "-o", out, "-q"])
    _wait_for_temp(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists() and not temps(tmp_path)


def test_merge_force_disk_full_keeps_previous_bitwise(tiny_model_dir, adapters, tmp_path, monkeypatch,
                                                      capsys):
    import loretta_merge.io.writer as writer

    base, out = tiny_model_dir("llama"), tmp_path / "out"
    code, err = run_cli([f"{base}+{adapters['rep']}", "-o", out, "-q"], capsys)
    assert code == 0, err
    before = digest(out)
    monkeypatch.setattr(writer, "write_bytes", full_disk_after(4)(writer.write_bytes))
    code, err = run_cli([f"{base}+{adapters['lora']}", "-o", out, "-q", "--force"], capsys)
    assert_disk_full(code, err, out)
    assert digest(out) == before and not temps(tmp_path)


# --------------------------------------------------------------------------- train

def _tiny_bert_with_tokenizer(tiny_model_dir, path: Path) -> Path:
    """The tiny BERT checkpoint plus a real word-level tokenizer (built offline)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(tiny_model_dir("bert"), path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "the", "was", "plot"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(path)
    return path


def _train_argv(tiny_model_dir, tmp_path: Path) -> tuple[list, Path]:
    model = _tiny_bert_with_tokenizer(tiny_model_dir, tmp_path / "bert")
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "the film was good,1\nthe plot was bad,0\n" * 4)
    out = tmp_path / "adapter"
    return ["train", "--model", model, "--train-file", data, "--eval-split", "0", "--max-steps", "1",
            "--batch-size", "4", "-o", out, "-q"], out


def test_train_quiet_failure_prints_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import loretta_merge.io.writer as writer

    argv, out = _train_argv(tiny_model_dir, tmp_path)
    monkeypatch.setattr(writer, "write_bytes", full_disk_after(0)(writer.write_bytes))
    code, err = run_cli(argv, capsys)
    assert_disk_full(code, err, out)


def test_train_disk_full_keeps_previous_adapter(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import loretta_merge.io.writer as writer

    argv, out = _train_argv(tiny_model_dir, tmp_path)
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    before = {k: v for k, v in digest(out).items() if "/" not in k}  # the adapter and the summary
    assert {"adapter_model.safetensors", "adapter_config.json", "train_summary.json"} <= set(before)
    monkeypatch.setattr(writer, "write_bytes", full_disk_after(0)(writer.write_bytes))
    code, err = run_cli(argv + ["--force", "--seed", "1"], capsys)
    assert_disk_full(code, err, out, one_line=False)  # see test_train_quiet_failure_prints_one_line
    after = {k: v for k, v in digest(out).items() if "/" not in k}
    assert after == before, "a failed --force training run changed the previous adapter"
    assert not temps(out) and not [p for p in out.iterdir() if p.name.startswith(".adapter-tmp")]
