"""The command line starts without the heavy libraries: ``--help``, ``--version`` and every
``<command> [<sub-command>] --help`` run in a process where ``import torch`` (and
transformers, onnx, onnxruntime) fails, and still exit 0 with their usual output.

Each case is its own process: a ``-c`` wrapper puts ``None`` in ``sys.modules`` for the
blocked names (so any import of them, or of their sub-modules, raises ImportError) and then
calls :func:`loretta_merge.cli.main`, as the console script does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from loretta_merge import __version__
from fixtures.side_packages import run_with
from loretta_merge.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "transformers", "onnx", "onnxruntime")

WRAPPER = """\
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` (and name.sub) raises ImportError
from loretta_merge.cli import main
main(sys.argv[1:])
"""


def _run_blocked(args: list[str]) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("LORETTA_DEBUG", None)
    return subprocess.run([sys.executable, "-c", WRAPPER.format(blocked=BLOCKED), *args],
                          env=env, capture_output=True, text=True, timeout=120)


def _help_cases() -> list[list[str]]:
    """``--help`` of the group, of every command and of every sub-command of a group."""
    ctx = click.Context(cli)
    cases = [["--help"]]
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        cases.append([name, "--help"])
        if isinstance(command, click.Group):
            cases += [[name, sub, "--help"] for sub in command.commands]
    return cases


def test_the_blocking_wrapper_blocks():
    code = WRAPPER.format(blocked=BLOCKED).replace("from loretta_merge.cli import main\nmain(sys.argv[1:])\n",
                                                   "import torch\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr


def test_every_command_is_covered():
    names = {" ".join(case[:-1]) for case in _help_cases()}
    assert set(COMMANDS) <= names
    assert {"convert lora-to-tt", "convert tt-to-lora", "export onnx", "export safetensors"} <= names


def test_version_starts_without_torch():
    proc = _run_blocked(["--version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"loretta-merge, version {__version__}"


@pytest.mark.parametrize("args", _help_cases(), ids=lambda a: " ".join(a))
def test_help_starts_without_torch(args: list[str]):
    proc = _run_blocked(args)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    command = " ".join(["loretta-merge", *args[:-1]])
    assert proc.stdout.startswith(f"Usage: {command} "), proc.stdout[:300]
    assert "Options:" in proc.stdout and "--help" in proc.stdout
    if args == ["--help"]:
        for name in COMMANDS:
            assert f"  {name} " in proc.stdout, f"{name} missing from the command list"
    assert proc.stderr == "", proc.stderr  # no warning, no traceback


def test_optional_backend_import_noise_is_filtered_and_nothing_else():
    """transformers imports torchao (when installed) as soon as a model class loads; its
    import logs two kinds of records that say nothing about the command. The CLI drops
    exactly those; another record of the same loggers still passes."""
    import logging

    from loretta_merge.cli import _OptionalBackendNoise

    f = _OptionalBackendNoise()

    def record(name, msg, *args):
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)

    assert not f.filter(record("torch.utils._pytree", "%s is an Enum subclass and is now natively "
                               "supported by torch.compile as an opaque value type. Calling "
                               "register_constant() on Enum subclasses is deprecated and will be "
                               "an error in a future release.", "<enum 'KernelPreference'>"))
    assert not f.filter(record("torchao", "Failed to load /venv/site-packages/torchao/_C_mxfp8.so: "
                               "Could not load this library"))
    assert f.filter(record("torch.utils._pytree", "another pytree warning"))
    assert f.filter(record("torchao", "Failed to load the user's own config"))
    # peft imports bitsandbytes, which asks the kernels package for a hub kernel (offline)
    assert not f.filter(record("kernels._internals.hf_hub", "Skipping publisher trust check for "
                               "'kernels-community/quantization-bitsandbytes' because Hugging "
                               "Face Hub is in offline mode."))
    assert not f.filter(record("bitsandbytes.backends.cpu.ops", "Failed to load CPU "
                               "gemm_4bit_forward from kernels-community: %s. Please make sure "
                               "you already `pip install kernels`", "offline"))
    assert f.filter(record("kernels._internals.hf_hub", "Skipping publisher trust check for "
                           "'someone/their-kernel' because Hugging Face Hub is in offline mode."))
    assert f.filter(record("bitsandbytes.backends.cpu.ops", "another bitsandbytes warning"))


def test_a_command_that_loads_a_model_class_prints_no_torchao_noise():
    # inspect --config builds the model on the meta device: transformers.quantizers loads,
    # and with it torchao (importable here from the side folder, fixtures/side_packages.py)
    config = Path(__file__).parent / "fixtures" / "configs" / "roberta-base.json"
    proc = run_with("torchao", ["-c", "import importlib.util; assert importlib.util.find_spec('torchao'); "
                                      "from loretta_merge.cli import main; main()",
                                "inspect", "--config", str(config), "--method", "rep", "--json"])
    assert "register_constant" not in proc.stderr and "Failed to load" not in proc.stderr, proc.stderr

