"""The flows of the conformance matrix, each run through the command line as a user would.

A :class:`Workspace` holds one family's checkpoints and the outputs of the commands run on
them; every command runs once per session (cached), so the cells of one family share
their training runs and merges. A flow function raises ``AssertionError`` on failure,
:class:`Unsupported` when the tool refused with the exact line the matrix expects.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .families import FAMILIES, Family
from .fixtures import build_family

TRAIN_STEPS = 2
ATOL = 1e-4  # fp32 logits, as the merge's --verify


class Unsupported(Exception):
    """The tool refused the flow with an error line the matrix lists as unsupported."""


@dataclass
class Run:
    argv: list[str]
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        lines = [ln for ln in self.err.splitlines() if ln.startswith("error:")]
        return lines[-1] if lines else (self.err.strip().splitlines() or ["(no stderr)"])[-1]

    def describe(self) -> str:
        return f"`loretta-merge {' '.join(self.argv)}` exited {self.code}: {self.error_line}"


def cli(argv: list[str]) -> Run:
    """Run the console entry point in this process, capturing stdout and stderr."""
    from loretta_merge.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # noqa: BLE001 - a traceback is a failure of the cell
            code = -1
            err.write(f"error: uncaught {type(exc).__name__}: {exc}\n")
    return Run([str(a) for a in argv], code, out.getvalue(), err.getvalue())


def cli_subprocess(argv: list[str], *, timeout_s: float = 300) -> Run:
    """Run ``python -m loretta_merge.cli`` in a fresh process (what a user's shell does)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "loretta_merge.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout_s, env=env)
    return Run([str(a) for a in argv], proc.returncode, proc.stdout, proc.stderr)


class Workspace:
    """One family's checkpoints, data and the cached outputs of the commands run on them."""

    def __init__(self, name: str, root: Path, *, unsupported: dict[str, str]) -> None:
        self.family: Family = FAMILIES[name]
        self.root = root
        self.paths = build_family(name, root)
        self.unsupported = unsupported  # flow -> the error text the tool must print
        self._runs: dict[str, Run] = {}

    # ---------------------------------------------------------------- running commands

    def run(self, key: str, argv: list[str], *, fresh_process: bool = False) -> Run:
        if key not in self._runs:
            self._runs[key] = (cli_subprocess if fresh_process else cli)(argv)
        return self._runs[key]

    def require(self, run: Run, flow: str) -> Run:
        """Fail (or raise Unsupported with the tool's own line) unless ``run`` succeeded."""
        expected = self.unsupported.get(flow)
        if run.code == 0:
            assert expected is None, (f"{flow} on {self.family.name} now works; drop it from "
                                      f"the unsupported table ({expected!r})")
            return run
        if expected is not None and run.code == 2 and expected in run.error_line:
            raise Unsupported(run.error_line)
        raise AssertionError(run.describe())

    def out(self, key: str) -> Path:
        return self.root / "out" / key

    # ---------------------------------------------------------------- shared outputs

    def train(self, task: str, method: str, flow: str) -> Path:
        data = self.paths["lm" if task == "causal-lm" else "seq_cls"]
        key = f"train-{task}-{method}"
        argv = ["train", "--model", self.paths["base"], "--task", task, "--method", method,
                "--train-file", data, "--eval-split", "0", "--max-steps", TRAIN_STEPS,
                "--batch-size", 4, "--max-length", 16, "--lr", "1e-3", "--seed", 0,
                "--r", 4, "--tensor-rank", 2, "--bottleneck", 8, "-q", "-o", self.out(key)]
        # one family's training goes through a real subprocess, as a shell would run it
        # (the README tour and test_cli run other commands so; a child costs ~6 CPU-s)
        run = self.run(key, argv, fresh_process=(task, method) == ("seq-cls", "rep")
                       and self.family.name == "roberta")
        self.require(run, flow)
        return self.out(key)

    def merge(self, into: str, adapter: Path, key: str, flow: str) -> Path:
        run = self.run(key, ["merge", self.paths[into], adapter, "-o", self.out(key), "--verify"])
        self.require(run, flow)
        said = run.out + run.err  # the merge summary goes to stderr today
        assert "verify: max |logit diff|" in said, f"no verify line in: {said!r}"
        return self.out(key)


# -------------------------------------------------------------------- model checks

def probe(family: Family, *, batch: int = 3, seq: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids (no special ids) and a right-padded attention mask."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(family.config.get("vocab_size", 96), 96)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 3:] = 0
    ids[0, seq - 3:] = int(family.config.get("pad_token_id") or 0)
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, family: Family) -> torch.Tensor:
    """Logits at kept positions (seq-cls: one row per example)."""
    inputs = probe(family)
    with torch.no_grad():
        out = model(**inputs).logits.float()
    if out.dim() == 3:
        return out[inputs["attention_mask"].bool()]
    return out


def load_task_model(path: Path, task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    torch.manual_seed(123)  # tensors the checkpoint lacks get a fixed (visible) init
    return cls.from_pretrained(str(path)).eval()


def in_memory(base: Path, adapter: Path, task: str):
    """The base with the adapter attached in memory (the reference every output matches)."""
    from loretta_merge.adapters import load_loretta_model

    return load_loretta_model(load_task_model(base, task), adapter)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shapes {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = float((got - want).abs().max())
    assert diff <= ATOL, f"{what}: max |logit diff| {diff:.3g} > {ATOL}"


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


FlowFn = Callable[[Workspace], None]
