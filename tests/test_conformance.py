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
from tests.conformance.flows import Unsupported, Workspace

UNSUPPORTED: dict[tuple[str, str], str] = {}
XFAIL: dict[tuple[str, str], str] = {}


def _params():
    out = []
    for family, flow in cells():
        marks = []
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


@pytest.fixture(scope="session")
def results():
    """Cell results, written as JSON at the end of the session when asked."""
    table: dict[str, dict] = {}
    yield table
    path = os.environ.get("LORETTA_CONFORMANCE_JSON")
    if path:
        Path(path).write_text(json.dumps({"cells": table}, indent=2, sort_keys=True) + "\n")


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
        record.update(status="fail", message=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
        raise
    finally:
        record["seconds"] = round(time.perf_counter() - start, 2)
        results[f"{family}/{flow}"] = record
