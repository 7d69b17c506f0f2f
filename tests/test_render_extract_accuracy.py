"""tools/render_extract_accuracy.py: the block comes from the JSON, and docs/extract.md holds
the current rendering of it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from render_extract_accuracy import RESULT, extract_accuracy_block  # noqa: E402


def test_block_shows_every_measured_cell_and_docs_are_current(tmp_path):
    results = json.loads(RESULT.read_text())
    block = extract_accuracy_block()
    for e in results["extracted"]:
        assert f"{100 * e['test_accuracy']:.1f} ({e['params']:,} params" in block
    assert "Machine state" in block
    docs = (ROOT / "docs" / "extract.md").read_text()
    begin, end = "<!-- extract-accuracy:begin -->\n", "<!-- extract-accuracy:end -->"
    assert docs[docs.index(begin) + len(begin):docs.index(end)] == block
    # a changed figure in the JSON changes the block
    results["extracted"][0]["test_accuracy"] = 0.123456
    (tmp_path / "r.json").write_text(json.dumps(results))
    assert "12.3 (" in extract_accuracy_block(tmp_path / "r.json")
