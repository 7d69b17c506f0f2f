"""The conformance matrix (issue 13): every flow on every supported architecture family,
through the command line, on tiny random checkpoints saved by the classes the hub's own
checkpoints come from. One test per cell; see ``tests/conformance/cells.py`` for the flows.

- ``UNSUPPORTED[(family, flow)]``: the text of the error line the TOOL prints; the cell
  passes only when the command exits 2 with that line (and fails once the flow works).
- ``XFAIL[(family, flow)]``: known failures in code owned elsewhere, marked strict so
  that a fix makes the suite say so; the reason names the command and its error.

``LORETTA_CONFORMANCE_JSON=path`` writes every cell's result (pass / fail with the message /
unsupported with the tool's line) for ``tools/supported_models.py``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conformance.cells import FLOWS, cells
from tests.conformance.cells import cells as tests_cells
from tests.conformance.families import FAMILIES
from tests.conformance.flows import Unsupported, Workspace

UNSUPPORTED: dict[tuple[str, str], str] = {}

# Known failures: each names the command and the tool's error; strict, so a fix turns
# it into XPASS. None remain: the merge into hub-laid-out bases and the PEFT writer's
# modules_to_save for SEQ_CLS heads were fixed (issue 13).
XFAIL: dict[tuple[str, str], str] = {}


def _params():
    out = []
    for family, flow in cells():
        # a family's cells share its workspace (checkpoints, trained adapters, merged models):
        # they are one unit of work of `make test` (fixtures/scheduling.py), so one worker
        # runs them all and none of that is built twice
        marks = []
        if flow.startswith("onnx_"):  # export and ONNX Runtime validation, end to end
            marks.append(pytest.mark.slow)
        if (family, flow) in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[(family, flow)]))
        out.append(pytest.param(family, flow, marks=marks, id=f"{family}-{flow}"))
    return out


@pytest.fixture(scope="session")
def workspaces(tmp_path_factory):
    """Factory: one :class:`Workspace` per family, built once per session."""
    cache: dict[str, Workspace] = {}

    def get(family: str) -> Workspace:
        if family not in cache:
            unsupported = {flow: text for (fam, flow), text in UNSUPPORTED.items() if fam == family}
            cache[family] = Workspace(family, tmp_path_factory.mktemp(f"conf-{family}"),
                                      unsupported=unsupported)
        return cache[family]

    return get


class _Results(dict):
    """Cell results; with LORETTA_CONFORMANCE_JSON set, the file is rewritten after every
    cell (an interrupted run still leaves what it measured)."""

    def record(self, key: str, value: dict) -> None:
        self[key] = value
        path = os.environ.get("LORETTA_CONFORMANCE_JSON")
        if path:
            tmp = Path(path + ".tmp")
            tmp.write_text(json.dumps({"cells": dict(self)}, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)


@pytest.fixture(scope="session")
def results():
    return _Results()


@pytest.mark.parametrize("family,flow", _params())
def test_cell(family, flow, workspaces, results):
    start = time.perf_counter()
    record = {"family": family, "flow": flow}
    try:
        FLOWS[flow](workspaces(family))
        record.update(status="pass")
    except Unsupported as exc:
        record.update(status="unsupported", message=str(exc))
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}".replace(str(workspaces(family).root), family)
        record.update(status="fail", message=message.splitlines()[0][:500])
        raise
    finally:
        record["seconds"] = round(time.perf_counter() - start, 2)
        results.record(f"{family}/{flow}", record)


def test_supported_models_table_is_generated_from_results(tmp_path):
    """tools/supported_models.py: every tick comes from a result; a failing cell shows its
    message, an unsupported one the tool's line, and a missing one a question mark."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "supported_models", Path(__file__).resolve().parents[1] / "tools" / "supported_models.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cells = {f"{fam}/{flow}": {"status": "pass"} for fam, flow in tests_cells()}
    cells["roberta/merge_base"] = {"status": "fail", "message": "AssertionError: boom"}
    cells["gpt2/onnx_adp"] = {"status": "unsupported", "message": "error: not yet"}
    del cells["llama/lora_to_tt"]
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"cells": cells, "wall_seconds": 12.0}))
    out = tmp_path / "table.md"
    assert tool.main(["--json", str(results), "-o", str(out)]) == 0
    text = out.read_text()
    rows = {line.split(" (", 1)[0].strip("| "): line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| family")}
    assert set(rows) == set(FAMILIES)
    assert "✗ [1]" in rows["roberta"] and "[1] AssertionError: boom" in text
    assert "unsupported [2]" in rows["gpt2"] and "[2] error: not yet" in text
    assert "?" in rows["llama"]
    assert "12" not in text.split("|", 1)[0]  # the run's wall time (no load recorded) is not printed
    assert sum(row.count("✓") for row in rows.values()) == len(cells) - 2


def test_unsupported_needs_the_tools_own_line():
    """A cell is 'unsupported' only when the command exits 2 with the listed error text;
    any other failure fails the cell, and a listed cell that now works fails too."""
    from tests.conformance.flows import Run

    ws = Workspace.__new__(Workspace)
    ws.family = FAMILIES["gpt2"]
    ws.unsupported = {"onnx_adp": "cannot export"}
    refused = Run(["export"], 2, "", "error: gpt2 adapters cannot export yet; use --no-adapter\n")
    with pytest.raises(Unsupported, match="cannot export yet"):
        ws.require(refused, "onnx_adp")
    with pytest.raises(AssertionError, match="exited 2"):
        ws.require(refused, "onnx_merged")  # not listed for this flow
    with pytest.raises(AssertionError, match="exited 1"):
        ws.require(Run(["export"], 1, "", "error: cannot export (crash)\n"), "onnx_adp")
    with pytest.raises(AssertionError, match="now works"):
        ws.require(Run(["export"], 0, "ok", ""), "onnx_adp")
    assert ws.require(Run(["export"], 0, "ok", ""), "onnx_merged").out == "ok"
