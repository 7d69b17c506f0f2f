"""bench_train's --reuse: a stopped full-budget run is resumed from its log, and a log of
another budget is refused before any training starts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="session")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log(path: Path, runs: list[dict]) -> Path:
    lines = ["[    1.0 s] split {}", "some warning line"]
    lines += [f"  run {json.dumps(r)}" for r in runs]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(method="rep", lr=5e-3, seed=0, split="val", steps=867, acc=0.8):
    return {"method": method, "lr": lr, "pooling": "mean", "seed": seed, "evaluate_on": split,
            "accuracy": acc, "steps": steps}


def test_planned_steps_follow_the_trainer_arithmetic(bench):
    full, demo = bench.BUDGETS["full"], bench.BUDGETS["demo"]
    assert bench.planned_steps(full, 9219) == 867     # 289 batches of 32 (last one partial) x 3
    assert bench.planned_steps(demo, 2000) == 250
    assert bench.planned_steps({**demo, "epochs": 0.5}, 2001) == 126
    assert bench.planned_steps(bench.BUDGETS["smoke"], 48) == 2


def test_reuse_takes_validation_and_test_runs_by_their_key(bench, tmp_path):
    log = _log(tmp_path / "stopped.log", [_run(), _run(split="test", seed=2, acc=0.7)])
    found = bench.reusable_runs(log)
    assert set(found) == {("rep", 5e-3, "mean", 0, "val"), ("rep", 5e-3, "mean", 2, "test")}
    assert found[("rep", 5e-3, "mean", 2, "test")]["accuracy"] == 0.7
    assert all(r["reused_from"] == str(log) for r in found.values())
    assert bench.reusable_runs(None) == {}


def test_a_log_of_another_budget_is_refused_before_any_run(bench, tmp_path):
    log = _log(tmp_path / "demo.log", [_run(steps=250), _run(method="lora", steps=867)])
    accepted = bench.check_reusable(_log(tmp_path / "full.log", [_run()]), 867)  # same budget
    assert set(accepted) == {("rep", 5e-3, "mean", 0, "val")}
    with pytest.raises(SystemExit, match=r"\[250\] steps, this budget takes 867"):
        bench.check_reusable(log, 867)
