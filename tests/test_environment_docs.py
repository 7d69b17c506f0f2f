"""Every environment variable the package reads is documented, in the README (for users) and
in docs/ARCHITECTURE.md (for maintainers): the keys are found in the code, not listed by hand."""

import ast
import re
from pathlib import Path

import loretta_merge

PACKAGE = Path(loretta_merge.__file__).parent
ROOT = PACKAGE.parent
NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
        (isinstance(node, ast.Name) and node.id == "environ")


def _keys(source: str) -> set[str]:
    """Constant keys of ``os.environ[...]``, ``os.environ.get/pop/setdefault(...)``,
    ``os.getenv(...)`` and ``"X" in os.environ``."""
    tree = ast.parse(source)
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}  # KEY_ENV = "LORETTA_..."
    found = set()
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and _is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr in ("get", "pop", "setdefault")
                    and _is_environ(f.value)) or \
               (isinstance(f, (ast.Attribute, ast.Name)) and getattr(f, "attr", getattr(f, "id", "")) == "getenv"):
                key = node.args[0]
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and \
                isinstance(node.ops[0], (ast.In, ast.NotIn)) and _is_environ(node.comparators[0]):
            key = node.left
        if isinstance(key, ast.Name):
            key = ast.Constant(constants.get(key.id))
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and NAME.match(key.value):
            found.add(key.value)
    return found


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def package_keys() -> set[str]:
    return set().union(*(_keys(p.read_text()) for p in PACKAGE.rglob("*.py")))


def test_the_scan_finds_each_kind_of_read():
    code = ('import os\nfrom os import environ\n'
            'a = os.environ["A_1"]; b = os.environ.get("B"); os.environ.setdefault("C", "1")\n'
            'os.environ.pop("D", None); e = os.getenv("E"); f = "F" in os.environ; g = environ.get("G")\n'
            'h = {"NOT_ENV": 1}.get("NOT_ENV")\nKEY = "H_KEY"\ni = os.environ.get(KEY)\n')
    assert _keys(code) == {"A_1", "B", "C", "D", "E", "F", "G", "H_KEY"}


def test_the_package_reads_the_variables_we_know_of():
    keys = package_keys()
    assert {"LORETTA_DEBUG", "LORETTA_DIRECT_IO", "LORETTA_KERNEL_THREADS", "WORLD_SIZE"} <= keys


def test_every_variable_is_in_the_readme_and_the_architecture_page():
    keys = package_keys()
    readme = _section((ROOT / "README.md").read_text(), "Environment variables")
    arch = _section((ROOT / "docs" / "ARCHITECTURE.md").read_text(), "Environment variables")
    assert sorted(k for k in keys if f"`{k}`" not in readme) == []
    assert sorted(k for k in keys if f"`{k}`" not in arch) == []
