"""The hint rule of tests/hint_rule.py, held (1) to hand-written lines, so that vague messages
are shown to fail it, and (2) to every error message the package raises, read from the source.

The bad-input corpus (tests/test_bad_inputs.py) holds the lines users really get to the full
rule (culprit named verbatim + a next step); this file proves the rule has teeth and keeps
every ``raise LorettaError(...)`` message in the package, including ones no corpus case
reaches yet, to its next-step half.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from hint_rule import next_steps, rule_problems

PACKAGE = Path(__file__).resolve().parents[1] / "loretta_merge"

GOOD = [  # (line, culprits)
    ("error: /m/model-00002-of-00003.safetensors: header says tensor data ends at byte 10, but the "
     "file has 5 bytes; re-download or re-save it", ("/m/model-00002-of-00003.safetensors",)),
    ("error: output /o already exists; pass --force to replace it", ("/o",)),
    ("error: Invalid value for '--dtype': 'int7' is not one of 'auto', 'bf16'. "
     "(see `loretta-merge merge --help`)", ("int7",)),
    ("error: export onnx needs the Python package 'onnx', which is not installed; install it with "
     "`pip install 'loretta-merge[onnx]'`", ("onnx",)),
    ("error: unknown device 'tpu': use auto, cpu, cuda or cuda:N", ("'tpu'",)),
    ("error: adapter module q_proj: lora_A has shape (48, 8) but the model needs (64, 8); is this "
     "the base model? Pass the base the adapter was trained on", ("q_proj",)),
    ("error: give either PATH or --config CONFIG_JSON", ("--config",)),
]

BAD = [  # (line, culprits, the problem the rule must report)
    # no culprit named
    ("error: the file is truncated; re-download it", ("/m/model.safetensors",), "offending input"),
    ("error: cannot write to /proc; choose another output", ("/proc/loretta-out",), "offending input"),
    # names it but says nothing to do
    ("error: /m/model.safetensors is corrupt", ("/m/model.safetensors",), "next step"),
    ("error: rank must be an integer >= 1, got 0", ("0",), "next step"),
    ("error: --dtype must be one of auto, bf16, fp16, fp32, got int7", ("int7",), "next step"),
    ("error: 'x' expected a JSON object", ("'x'",), "next step"),
    ("error: only LoRA adapters are supported, got 'x'", ("'x'",), "next step"),
    ("error: /a needs a header; see the documentation", ("/a",), "next step"),
    ("error: /a is broken; check your inputs", ("/a",), "next step"),
    ("error: /a failed; try again", ("/a",), "next step"),
    ("error: is /a the base model the adapter was trained on?", ("/a",), "next step"),
    # a verb that describes what happened is not an instruction
    ("error: could not convert /a to float", ("/a",), "next step"),
    ("error: failed to copy /a: disk full", ("/a",), "next step"),
    ("error: /a: cannot use the file", ("/a",), "next step"),
    # a verb with nothing after it, a backticked word that is not a command, a flag mentioned
    # as the culprit only
    ("error: /a is broken; fix", ("/a",), "next step"),
    ("error: /a has no `weight_map`", ("/a",), "next step"),
    ("error: --with-past needs task causal-lm", ("--with-past",), "next step"),
    # not the one-line form
    ("Traceback (most recent call last):", ("x",), "error: "),
    ("error: /a is corrupt; re-save it", (), "no culprit"),
]


@pytest.mark.parametrize("line, culprits", GOOD)
def test_rule_accepts_helpful_lines(line, culprits):
    assert rule_problems(line, culprits) == []


@pytest.mark.parametrize("line, culprits, problem", BAD)
def test_rule_rejects_vague_lines(line, culprits, problem):
    problems = rule_problems(line, culprits)
    assert problems, f"{line!r} passed the rule"
    assert any(problem in p for p in problems), problems


def test_old_hint_words_are_not_enough():
    """The old corpus check accepted any of these words; alone, none is a next step."""
    for word in ("must", "see", "expected", "expects", "needs", "only", "supported", "check", "try"):
        assert not next_steps(f"/a is wrong; {word} it again"), word


# --------------------------------------------------------------------------- every raise

ERRORS = {"LorettaError", "ConfigError", "ShapeError", "FormatError", "UnsafeInputError",
          "OutputExistsError", "NumericsError", "OutputError", "MissingDependencyError",
          "DiskFullError"}
# io.writer.make_output_error(cls, errno, message) builds an OutputError carrying errno; its
# message (argument 2) is held to the rule wherever the call is, raised or returned
BUILDERS = {"make_output_error": 2}

# messages whose next step comes from a part the source cannot show (a variable or a wrapped
# error), each checked elsewhere: template prefix -> where
INDIRECT = {
    "shard {shard}{where}: {exc}": "wraps a header error of io's own parser, itself checked here",
    "{where}: is a {adapter.method!r} adapter, not LoRETTA_rep; {why}":
        "both {why} texts give a step (corpus: tt-to-lora:given-an-adp-adapter / given-a-peft-lora)",
    "{str(mapped).replace(str(tmp), str(out))}":
        "io.atomic renames a mapped output_error (its messages checked here) to name OUT",
    "{failure_message(": "failure_message ends 'raise --atol; otherwise report the model architecture'",
    "{cls} is not a supported architecture for LoRETTA_{config.method}: {hint}":
        "config.unsupported_architecture_hint always says 'set target_modules' / 'set placement' "
        "(tests/test_model.py checks the full line)",
}
# a message names its input when it interpolates it, or names an option, a quoted value, an
# ARGUMENT, a parameter (name=) or the API it guards (``name: ...``)
NAMES_SOMETHING = re.compile(r"\{|--[a-z]|'[^']+'|\b[A-Z]{4,}\b|\w+=|^\w+:")


def _template(node: ast.AST, constants: dict[str, str] | None = None) -> str | None:
    """The message as written, ``{expr}`` for what the source cannot show; a name the file
    binds once to a string literal (``_FIX = "... re-download it"``) reads as that text."""
    constants = constants or {}
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(v.value)
            elif (isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name)
                  and v.value.id in constants and v.conversion == -1 and v.format_spec is None):
                parts.append(constants[v.value.id])
            else:
                parts.append("{" + ast.unparse(v).strip("{}") + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left, constants), _template(node.right, constants)
        return None if left is None or right is None else left + right
    return "{" + ast.unparse(node) + "}"


def _string_constants(tree: ast.AST) -> dict[str, str]:
    """Names assigned exactly once in the file, to a plain string literal."""
    seen: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
        for target in targets:
            if isinstance(target, ast.Name):
                seen.setdefault(target.id, []).append(
                    node.value if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
    return {name: values[0].value for name, values in seen.items()
            if len(values) == 1 and isinstance(values[0], ast.Constant)
            and isinstance(values[0].value, str)}


def package_messages() -> list[tuple[str, str]]:
    """(file:line, message template) for every ``raise <LorettaError subclass>(msg, ...)``
    and every ``make_output_error(cls, errno, msg)``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        constants = _string_constants(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                k = BUILDERS.get(name)
                if k is not None and len(node.args) > k:
                    found.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno}",
                                  _template(node.args[k], constants) or ""))
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in ERRORS and node.exc.args:
                found.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno}",
                              _template(node.exc.args[0], constants) or ""))
    return found


def test_package_has_messages_to_check():
    assert len(package_messages()) > 200  # the scan sees the package's raises


def test_every_package_message_gives_a_next_step():
    bad = [f"{where}: {msg}" for where, msg in package_messages()
           if not next_steps(msg) and not any(msg.startswith(p) for p in INDIRECT)]
    assert not bad, "messages without a next step:\n" + "\n".join(bad)


def test_every_package_message_names_something():
    bad = [f"{where}: {msg}" for where, msg in package_messages()
           if not NAMES_SOMETHING.search(msg) and not any(msg.startswith(p) for p in INDIRECT)]
    assert not bad, "messages that name no input:\n" + "\n".join(bad)


def test_indirect_messages_still_exist():
    """Every exemption above must still match a raise (remove it when the code changes)."""
    messages = [msg for _, msg in package_messages()]
    for prefix in INDIRECT:
        assert any(m.startswith(prefix) for m in messages), prefix
