"""No module of the package imports another module's private (``_``-prefixed) names: what
modules share is public and named as such, so a module can be read (and changed) on its own."""

import ast
from pathlib import Path

import loretta_merge

PACKAGE = Path(loretta_merge.__file__).parent


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("loretta_merge")):
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno} imports {alias.name} from "
                      f"{'.' * node.level}{node.module or ''}"
                      for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_private_names_of_another():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _private_imports(path)]
    assert offenders == []


def test_the_check_sees_a_private_import(tmp_path):
    (tmp_path / "m.py").write_text("from .other import _hidden, shown\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        assert _private_imports(tmp_path / "m.py") == ["m.py:1 imports _hidden from .other"]
    finally:
        PACKAGE = saved


def test_adapters_modules_do_not_reexport_each_other_lazily():
    for path in (PACKAGE / "adapters").glob("*.py"):
        if path.name != "__init__.py":
            assert "def __getattr__" not in path.read_text(), path
