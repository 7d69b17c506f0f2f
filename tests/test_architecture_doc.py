"""docs/ARCHITECTURE.md and the README's layout name only files that exist: a module that is
renamed or removed must take its description with it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("loretta_merge", "tests", "benchmarks", "examples", "tools")


def _existing() -> set[str]:
    return {p.name for tree in TREES for p in (ROOT / tree).rglob("*.py")}


def test_every_python_file_named_in_the_docs_exists():
    have = _existing()
    for doc in (ROOT / "docs" / "ARCHITECTURE.md", ROOT / "README.md"):
        named = set(re.findall(r"\b([a-z_][a-z0-9_]*\.py)\b", doc.read_text()))
        assert sorted(named - have) == [], doc.name


def test_every_package_module_is_in_the_architecture_page():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    globbed = set(re.findall(r"\b([a-z_]+)/\*\.py", text))  # `commands/*.py` names them all
    missing = [str(p.relative_to(ROOT)) for p in (ROOT / "loretta_merge").rglob("*.py")
               if p.name != "__init__.py" and p.name not in text and p.parent.name not in globbed]
    assert missing == []
