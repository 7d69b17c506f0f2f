"""Security: untrusted files run no code, paths stay inside their directories, outputs follow
the umask, and no command touches the network.

The hostile inputs are real: a model directory whose config.json points ``auto_map`` at a
local ``.py`` that would write a marker file when imported, and pickles whose unpickling
would create a file. The markers must never appear.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny, perturb_trainable, run_main
from loretta_merge.errors import FormatError, LorettaError, UnsafeInputError

ROOT = Path(__file__).resolve().parents[1]


class Opener:
    """Unpickling this calls ``open(marker, "w")``: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run_cli(argv: list, capsys) -> tuple[int, str]:
    code, _, err = run_main(argv, capsys)
    return code, err


@pytest.fixture(scope="session")
def lora(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("sec") / "lora"
    pm = get_peft_model(build_tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    perturb_trainable(pm, seed=5)
    pm.save_pretrained(d)
    return d


# --------------------------------------------------------------------------- remote code

@pytest.fixture
def evil_model(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """The tiny Llama's weights with a config whose auto_map names a local evil.py."""
    d = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir("llama"), d)
    marker = tmp_path / "REMOTE-CODE-RAN"
    (d / "evil.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("ran")
        from transformers import LlamaConfig, LlamaForCausalLM
        class EvilConfig(LlamaConfig):
            model_type = "evilnet"
        class EvilModel(LlamaForCausalLM):
            config_class = EvilConfig
    """))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evilnet", architectures=["EvilModel"],
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    return d, marker


def test_export_onnx_refuses_remote_code_without_the_flag(evil_model, tmp_path, capsys):
    model, marker = evil_model
    code, err = run_cli(["export", "onnx", model, "-o", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "--trust-remote-code" in err and "evil.py" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["inspect", "inspect-config", "merge", "train"])
def test_other_commands_never_run_model_code(command, evil_model, lora, tmp_path, capsys):
    """Commands without --trust-remote-code read config.json as data; whatever they answer
    (an error, or a result for merge/inspect), evil.py is never imported."""
    model, marker = evil_model
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "a b,0\nb a,1\n" * 4)
    argv = {"inspect": ["inspect", model],
            "inspect-config": ["inspect", "--config", model / "config.json", "--method", "rep"],
            "merge": ["merge", model, lora, "-o", tmp_path / "out", "-q"],
            "train": ["train", "--model", model, "--train-file", data, "--eval-split", "0",
                      "--max-steps", "1", "-o", tmp_path / "out", "-q"]}[command]
    code, err = run_cli(argv, capsys)
    assert "Traceback" not in err
    assert not marker.exists(), f"{command} imported the model's own code"
    if code != 0:
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


# --------------------------------------------------------------------------- unpickling

def test_read_adapter_never_unpickles_by_default(lora, tmp_path):
    from loretta_merge.formats import read_adapter

    d = tmp_path / "pickled"
    shutil.copytree(lora, d)
    marker = tmp_path / "PICKLE-RAN"
    state = dict(load_file(str(d / "adapter_model.safetensors")))
    state["payload"] = Opener(str(marker))
    torch.save(state, d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsafeInputError, match="adapter_model.bin") as info:
        read_adapter(d)
    assert "allow_unsafe_pickle" in str(info.value)
    assert not marker.exists()
    # the kind detector (header-only path, memory-mapped weights_only load) refuses it too
    from loretta_merge.formats import detect_adapter_kind

    with pytest.raises(LorettaError):
        detect_adapter_kind(d)
    assert not marker.exists()


@pytest.mark.parametrize("direction", ["lora-to-tt", "tt-to-lora"])
def test_allow_unsafe_pickle_help_says_what_it_does(direction, capsys):
    """The flag enables FULL unpickling; its help must say so (it once claimed that
    loading stayed weights_only=True)."""
    code, out, _ = run_main(["convert", direction, "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    flag = text[text.index("--allow-unsafe-pickle"):]
    flag = flag[:flag.index("-h, --help")] if "-h, --help" in flag else flag
    assert "Fully unpickle" in flag and "can execute code" in flag and "trust" in flag, flag
    assert "still" not in flag


def test_no_test_switch_in_production_code():
    """Fault injection lives in the tests (monkeypatch of io.writer.write_bytes), not in an
    environment variable read at write time."""
    root = Path(__file__).resolve().parents[1] / "loretta_merge"
    hits = [str(p) for p in root.rglob("*.py") if "LORETTA_TEST" in p.read_text()]
    assert not hits, hits


def test_read_adapter_reads_plain_bin_weights_only(lora, tmp_path):
    """A .bin that is a plain state dict loads with weights_only=True, no flag needed."""
    from loretta_merge.formats import read_adapter

    d = tmp_path / "plain-bin"
    shutil.copytree(lora, d)
    torch.save(dict(load_file(str(d / "adapter_model.safetensors"))), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    ref = read_adapter(lora)
    got = read_adapter(d)
    assert set(got.modules) == set(ref.modules)
    for name in ref.modules:
        assert torch.equal(got.modules[name].a, ref.modules[name].a)


def test_base_checkpoint_in_pickle_form_is_refused(tmp_path, lora, capsys):
    d = tmp_path / "bin-base"
    d.mkdir()
    marker = tmp_path / "BASE-PICKLE-RAN"
    model = build_tiny("llama")
    model.config.save_pretrained(d)
    state = dict(model.state_dict())
    state["payload"] = Opener(str(marker))
    torch.save(state, d / "pytorch_model.bin")
    for argv in (["merge", d, lora, "-o", tmp_path / "out"],
                 ["export", "safetensors", d, "-o", tmp_path / "out"]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and "pytorch_model.bin" in err and "unpickling" in err, err
        assert not (tmp_path / "out").exists()
    code, err = run_cli(["export", "onnx", d, "-o", tmp_path / "out"], capsys)
    assert code != 0 and "Traceback" not in err
    assert not marker.exists()


# --------------------------------------------------------------------------- symlinks

def test_adapter_symlinks_outside_refused_unless_allowed(lora, tmp_path):
    from loretta_merge.formats import read_adapter

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    d = tmp_path / "linked"
    d.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(lora / name, outside / name)
    (d / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (d / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(UnsafeInputError, match="outside"):
        read_adapter(d)
    assert set(read_adapter(d, allow_symlinks=True).modules) == set(read_adapter(lora).modules)
    # a symlink that stays inside the directory is fine
    inside = tmp_path / "inside"
    inside.mkdir()
    shutil.copy(lora / "adapter_config.json", inside / "adapter_config.json")
    shutil.copy(lora / "adapter_model.safetensors", inside / "real.safetensors")
    (inside / "adapter_model.safetensors").symlink_to("real.safetensors")
    assert set(read_adapter(inside).modules) == set(read_adapter(lora).modules)


def test_checkpoint_shard_symlink_outside_refused(tiny_model_dir, tmp_path):
    from loretta_merge.io import CheckpointReader

    d = tmp_path / "base"
    shutil.copytree(tiny_model_dir("llama"), d)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shutil.move(shard, tmp_path / shard.name)
    shard.symlink_to(tmp_path / shard.name)
    with pytest.raises(FormatError, match=shard.name):
        CheckpointReader(d)
    shard.unlink()
    shutil.copy(tmp_path / shard.name, d / "inside.bin.copy")
    shard.symlink_to("inside.bin.copy")  # inside the directory: allowed
    with CheckpointReader(d) as reader:
        assert len(reader.keys()) > 0


# --------------------------------------------------------------------------- umask and network

_SCRIPT = """
import os, socket, sys
os.environ["HF_HUB_OFFLINE"] = "1"
{guard}
os.umask({umask})
from loretta_merge.cli import main
for argv in {commands!r}:
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            sys.exit(f"{{argv[0]}} failed with {{exc.code}}")
print("ALL-OK")
"""

_NO_NET = """
def _refuse(*a, **k):
    raise RuntimeError("network access attempted")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def _commands(base: Path, lora: Path, out: Path) -> list[list[str]]:
    return [["merge", str(base), str(lora), "-o", str(out / "merged"), "-q"],
            ["convert", "lora-to-tt", str(lora), "-o", str(out / "tt"), "--tensor-rank", "2"],
            ["convert", "tt-to-lora", str(out / "tt"), "-o", str(out / "lora-again")],
            ["export", "safetensors", str(base), "-o", str(out / "resharded")],
            ["inspect", str(out / "tt")]]


def _run_script(guard: str, umask: int, commands: list) -> subprocess.CompletedProcess:
    code = _SCRIPT.format(guard=guard, umask=oct(umask), commands=commands)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)


def test_outputs_follow_umask_and_no_network(tiny_model_dir, lora, tmp_path):
    """One subprocess: sockets refuse to connect, umask 027; every command must still work and
    every file it writes must be rw-r----- (dirs rwxr-x---)."""
    out = tmp_path / "outs"
    out.mkdir()
    proc = _run_script(_NO_NET, 0o027, _commands(tiny_model_dir("llama"), lora, out))
    assert proc.returncode == 0 and "ALL-OK" in proc.stdout, proc.stderr[-3000:]
    assert "network access attempted" not in proc.stderr
    written = [p for p in out.rglob("*")]
    assert len([p for p in written if p.is_file()]) >= 8
    for p in written:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = 0o750 if p.is_dir() else 0o640
        assert mode == want, f"{p.relative_to(out)}: mode {oct(mode)}, expected {oct(want)} under umask 027"


def test_guard_really_blocks_the_network(tmp_path):
    """The guard used above does stop a connection attempt (the test could fail)."""
    code = _NO_NET.replace("\n", "\n") + textwrap.dedent("""
        try:
            socket.create_connection(("127.0.0.1", 9))
        except RuntimeError as exc:
            print("BLOCKED", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", "import socket\n" + code], capture_output=True,
                          text=True, timeout=60)
    assert "BLOCKED network access attempted" in proc.stdout, proc.stderr
