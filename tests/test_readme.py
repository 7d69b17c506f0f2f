"""The README's command-line tour: every `$ ` command runs, in order, and succeeds, and prints
the lines the README shows under it. Figures may differ: a number matches any number, `...`
any text (`.../` any folder or none), a run of spaces any run of spaces. Where the README
trims an output (a `... (trimmed)` line), the lines after it are the output's last lines and
the ones before it its first line and sample rows (a table's rows are ordered by figures that
differ from run to run, so a sample row may be printed anywhere)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import readme_tour, tour_env

NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?"
TOKEN = re.compile(rf"(?P<dir>\.\.\./)|(?P<etc>\.\.\.)|(?P<num>{NUMBER})|(?P<space>\s+)|(?P<text>[^\s\d.]+|.)")
TRIMMED = "... (trimmed)"


def line_pattern(shown: str) -> re.Pattern:
    """The pattern an output line shown in the README stands for."""
    out = []
    for m in TOKEN.finditer(shown.strip()):
        kind = m.lastgroup
        out.append({"dir": "(?:.*/)?", "etc": ".*?", "num": NUMBER, "space": r"\s+"}.get(kind) or re.escape(m.group()))
    return re.compile("".join(out))


def mismatches(shown: list[str], printed: list[str]) -> list[str]:
    """How the printed lines differ from the shown ones (empty when they agree)."""
    plain = [s.strip() for s in shown]
    head, tail = shown, []
    if TRIMMED in plain:
        cut = plain.index(TRIMMED)
        head, tail = shown[:cut], shown[cut + 1:]
        if len(printed) < len(head) + len(tail):
            return [f"{len(printed)} lines printed, README shows at least {len(head) + len(tail)}"]
    elif len(printed) != len(shown):
        return [f"{len(printed)} lines printed, README shows {len(shown)}:\n" + "\n".join(printed)]
    pairs = list(zip(head, printed)) + list(zip(tail, printed[len(printed) - len(tail):]))
    if tail:  # the sample rows: anywhere in the output
        pairs = pairs[:1] + [(s, next((p for p in printed if line_pattern(s).fullmatch(p.strip())),
                                      "(no such line)")) for s in head[1:]] + pairs[len(head):]
    return [f"README: {s.strip()}\nprinted: {p.strip()}" for s, p in pairs
            if not line_pattern(s).fullmatch(p.strip())]


def test_line_pattern():
    pat = line_pattern("  eval accuracy: 0.5400 -> 0.7133")
    assert pat.fullmatch("eval accuracy: 0.6 -> 0.81") and not pat.fullmatch("eval accuracy: n/a -> 0.81")
    pat = line_pattern("merged 12 tensors (+28 replaced), 1.91e-06 at .../site-packages/x")
    assert pat.fullmatch("merged 3 tensors (+1,024 replaced), 2.5e-07 at /venv/lib/site-packages/x")
    assert pat.fullmatch("merged 3 tensors (+1 replaced), 2.5e-07 at site-packages/x")
    assert not pat.fullmatch("merged 3 tensors (+1 replaced), 2.5e-07 at /venv/site-packages/y")
    shown = ["a 1", "row b 1", "  ... (trimmed)", "z 2"]
    assert mismatches(shown, ["a 5", "row c 3", "row b 2", "z 9"]) == []
    assert mismatches(shown, ["a 5", "row c 3", "z 9"]) and mismatches(shown, ["a 5", "row b 2", "y 9"])
    assert mismatches(["a 1"], ["a 1", "b"])


def test_readme_tour_has_every_command():
    cmds = " ".join(cmd for cmd, _ in readme_tour())
    for needle in ("loretta-merge train", "+adapter -o merged", "convert tt-to-lora",
                   "convert lora-to-tt", "export onnx", "export safetensors", "inspect"):
        assert needle in cmds, needle


@pytest.mark.slow
def test_readme_train_command(minilm_adapter):
    """The tour's training command (run once per session by the minilm_adapter fixture)."""
    shown = dict(readme_tour())[minilm_adapter.command]
    assert "Traceback" not in minilm_adapter.stderr
    # training imports peft and with it bitsandbytes, whose import asks for a hub kernel
    # and logs about it: the CLI filters exactly that noise (cli._OptionalBackendNoise)
    for noise in ("kernels-community", "Failed to load", "register_constant"):
        assert noise not in minilm_adapter.stderr, minilm_adapter.stderr[-2000:]
    assert (minilm_adapter.path / "adapter_config.json").exists()
    problems = mismatches(shown, minilm_adapter.stdout.splitlines())
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
def test_readme_tour_runs(minilm_adapter, tmp_path):
    """The other commands, in order, in one shell, on a copy of the trained adapter."""
    steps = [(cmd, shown) for cmd, shown in readme_tour() if cmd != minilm_adapter.command]
    shutil.copytree(minilm_adapter.path, tmp_path / minilm_adapter.path.name)
    marker = "@@@ loretta-merge README step"
    script = "set -euo pipefail\n" + "".join(f"echo '{marker}'\n{cmd}\n" for cmd, _ in steps)
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=tour_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for d in ("adapter", "merged", "peft-lora", "tt-again", "merged-onnx", "merged-bf16"):
        assert (tmp_path / d).is_dir(), d
    printed = proc.stdout.split(marker + "\n")[1:]
    assert len(printed) == len(steps)
    problems = [f"$ {cmd}\n{p}" for (cmd, shown), out in zip(steps, printed)
                for p in mismatches(shown, out.splitlines())]
    assert not problems, "\n\n".join(problems)
