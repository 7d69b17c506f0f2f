"""Every `$ ` command in the README's command-line tour runs, in order, and succeeds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tour_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The command line at a glance", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```console\n(.*?)```", section, flags=re.S):
        commands += [line[2:] for line in block.splitlines() if line.startswith("$ ")]
    return commands


def test_readme_tour_has_every_command():
    cmds = " ".join(tour_commands())
    for needle in ("loretta-merge train", "+adapter -o merged", "convert tt-to-lora",
                   "convert lora-to-tt", "export onnx", "export safetensors", "inspect"):
        assert needle in cmds, needle


def test_readme_tour_runs(tmp_path):
    script = "set -euo pipefail\n" + "\n".join(tour_commands()) + "\n"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for d in ("adapter", "merged", "peft-lora", "tt-again", "merged-onnx", "merged-bf16"):
        assert (tmp_path / d).is_dir(), d
