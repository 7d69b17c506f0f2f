"""``make test``'s units of work (fixtures/scheduling.py): the rules, and that the hints it
keeps name units that exist."""

from __future__ import annotations

from pathlib import Path

from fixtures.scheduling import HEAVY_FIRST, SHARED, unit_of
from tests.conformance.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def test_units():
    assert unit_of("tests/test_conformance.py::test_cell[bert-mlm-onnx_adp]") == "conformance-bert-mlm"
    assert unit_of("tests/test_conformance.py::test_cell[deberta-v2-train_seqcls_rep]") == "conformance-deberta-v2"
    assert unit_of("tests/test_conformance.py::test_matrix_is_complete") == "tests/test_conformance.py"
    assert unit_of("tests/test_export.py::test_llama_causal_lm") == "tests/test_export.py"
    assert unit_of("tests/test_cli.py::test_quiet_prints_nothing[export-onnx]") == "tests/test_cli.py"
    assert unit_of("tests/test_readme.py::test_readme_tour_runs") == unit_of(
        "tests/test_examples.py::test_merge_export_chain") == "minilm"
    assert unit_of("tests/test_x.py::test_y[a]@grp") == "grp"  # an xdist that renames ids


def test_hints_name_existing_units():
    files = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")}
    assert set(SHARED) <= files
    units = files | set(SHARED.values()) | {f"conformance-{f}" for f in FAMILIES}
    assert set(HEAVY_FIRST) <= units, set(HEAVY_FIRST) - units
