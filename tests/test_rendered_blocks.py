"""Every generated block of README.md and the docs pages is what its renderer makes of its JSON
today (issue 24).

``tools/render_readme.py`` renders each block between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` in the files of its ``FILES`` (README.md, docs/benchmarks.md, ...) from a
JSON in ``benchmarks/results/`` (or a JSON a test writes); here it runs in check mode,
in-process, and a block that differs from a fresh rendering fails.
Fix: ``python tools/render_readme.py`` (after re-running what wrote the JSON, if it moved).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# written whole by tools/supported_models.py (its own generator), not by render_readme.py
OWN_GENERATOR = {"docs/supported_models.md"}


@pytest.fixture(scope="session")
def render():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "tools" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_renderer_has_its_block_in_exactly_one_file(render):
    found = render.files_blocks()
    assert len(found) == len(render.FILES), "a file of FILES is missing"
    names = [n for ns in found.values() for n in ns]
    assert sorted(names) == sorted(render.BLOCKS)
    assert len(names) == len(set(names))  # each block once, across all files
    assert render.placement_errors(found) == []


def test_every_file_with_markers_is_rendered(render):
    """A Markdown page that marks a block is in FILES (or has its own generator)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    marked = {str(p.relative_to(ROOT)) for p in pages if render.block_names(p.read_text())}
    assert marked - OWN_GENERATOR == set(render.FILES)


def test_no_generated_block_is_stale(render):
    stale = {f: s for f in render.FILES if (s := render.stale_blocks((ROOT / f).read_text()))}
    assert not stale, f"stale blocks {stale}: run python tools/render_readme.py"


def test_check_mode_exits_zero_on_the_repository(render, capsys):
    assert render.main(["--check"]) == 0, capsys.readouterr().err


def _copy_tree(render, dst: Path) -> None:
    for f in render.FILES:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / f, dst / f)


def test_an_edited_block_is_detected_and_named(render, tmp_path, capsys):
    _copy_tree(render, tmp_path)
    page = tmp_path / "docs" / "benchmarks.md"
    text = page.read_text()
    begin, end = render.markers("onnx-export")
    inside = render.current(text, "onnx-export")
    edited = inside.replace("x |", "x (edited) |", 1)
    assert edited != inside
    page.write_text(text.replace(begin + inside + end, begin + edited + end))
    assert render.stale_blocks(page.read_text()) == ["onnx-export"]
    assert render.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stale: onnx-export in " in err and "benchmarks.md" in err
    assert render.main(["--root", str(tmp_path)]) == 0  # rendering repairs it
    assert page.read_text() == text
    assert render.main(["--check", "--root", str(tmp_path)]) == 0


def test_a_block_without_a_renderer_is_stale(render):
    text = (ROOT / "README.md").read_text() + "\n<!-- typed-by-hand:begin -->\n3.4x\n<!-- typed-by-hand:end -->\n"
    assert "typed-by-hand" in render.stale_blocks(text)


def test_a_renderer_without_markers_or_a_block_marked_twice_is_an_error(render, tmp_path, capsys):
    _copy_tree(render, tmp_path)
    page = tmp_path / "docs" / "benchmarks.md"
    text = page.read_text()
    begin, end = render.markers("tt-bench")
    block = text[text.index(begin):text.index(end) + len(end)]
    page.write_text(text.replace(block, ""))
    assert render.main(["--check", "--root", str(tmp_path)]) == 1
    assert "no markers for block tt-bench" in capsys.readouterr().err
    readme = tmp_path / "README.md"
    page.write_text(text)
    readme.write_text(readme.read_text() + "\n" + block + "\n")
    assert render.main(["--root", str(tmp_path)]) == 1
    assert "block tt-bench is marked more than once: README.md, docs/benchmarks.md" in capsys.readouterr().err
