"""Every generated block of README.md is what its renderer makes of its JSON today (issue 24).

``tools/render_readme.py`` renders each block between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` from a JSON in ``benchmarks/results/`` (or a JSON a test writes); here it
runs in check mode, in-process, and a block that differs from a fresh rendering fails.
Fix: ``python tools/render_readme.py`` (after re-running what wrote the JSON, if it moved).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "tools" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_block_has_a_renderer_and_markers(render):
    names = render.block_names((ROOT / "README.md").read_text())
    assert sorted(names) == sorted(render.BLOCKS)
    assert len(names) == len(set(names))  # each block once


def test_no_generated_block_is_stale(render):
    stale = render.stale_blocks((ROOT / "README.md").read_text())
    assert not stale, f"stale README blocks {stale}: run python tools/render_readme.py"


def test_check_mode_exits_zero_on_the_readme(render, capsys):
    assert render.main(["--check"]) == 0, capsys.readouterr().err


def test_an_edited_block_is_detected_and_named(render, tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    begin, end = render.markers("onnx-export")
    inside = render.current(text, "onnx-export")
    edited = inside.replace("x |", "x (edited) |", 1)
    assert edited != inside
    copy = tmp_path / "README.md"
    copy.write_text(text.replace(begin + inside + end, begin + edited + end))
    assert render.stale_blocks(copy.read_text()) == ["onnx-export"]
    assert render.main(["--check", "--readme", str(copy)]) == 1
    assert "stale: onnx-export" in capsys.readouterr().err
    assert render.main(["--readme", str(copy)]) == 0  # rendering repairs it
    assert copy.read_text() == text


def test_a_block_without_a_renderer_is_stale(render):
    text = (ROOT / "README.md").read_text() + "\n<!-- typed-by-hand:begin -->\n3.4x\n<!-- typed-by-hand:end -->\n"
    assert "typed-by-hand" in render.stale_blocks(text)
