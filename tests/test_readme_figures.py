"""No measured figure is typed into the prose of README.md or of the docs pages moved out of it
(issue 24): ``GUARDED`` below.

A figure with a unit or a ratio (``1.2x``, ``3.4 s``, ``12 ms``, ``38%``, ``1.5 GiB``) belongs in
a generated block (``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``, rendered from JSON by
``tools/render_readme.py``). This guard strips the generated blocks, fenced code (command
lines and their captured outputs) and inline code, and fails on every figure left in the
prose, except the few in ``ALLOWED``: numbers that are not measurements of this project
(sizes in the product description, buffer sizes that are design constants, the paper's claim).

The other docs pages (ARCHITECTURE.md, extract.md, merge-methods.md, ...) are not guarded yet:
they still type figures of their own into prose (design notes and measurements from before the
rendered blocks); moving those into blocks is a change of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# README.md and the pages that hold what was its benchmark and feature reference
GUARDED = ("README.md", "docs/benchmarks.md", "docs/quantized.md", "docs/onnx.md", "docs/training.md")

UNITS = r"(?:x|%|ms|s|sec|seconds?|min|minutes?|h|hours?|[KMGT]i?B(?:/s)?)"
FIGURE = re.compile(rf"(?<![\w.-])(?:~|about )?\d[\d,]*(?:\.\d+)?(?:[-–]\d[\d,]*(?:\.\d+)?)?\s?{UNITS}(?![\w])")

# exact phrases (as they appear, whitespace collapsed) -> why they are not a measurement
ALLOWED = {
    "up to 100x fewer": "the paper's claim, cited",
    "64 MiB or more": "the writer's O_DIRECT threshold, a design constant",
    "16 MiB stage": "the writer's staging buffer size, a design constant",
    "5.6 MiB of state": "computed parameter memory (examples/fsdp_memory.py), arithmetic",
    "about 12.6 GiB": "bf16 LLaMA-2-7B weights, arithmetic",
    "0.289x": "ratio of parameter counts, fixed by the architecture",
    "58.3% fresh": "class balance of the fixed validation split, a property of the data",
    "52.2% fresh": "class balance of the fixed test split, a property of the data",
    "59.3% fresh": "class balance of the fixed demo subset, a property of the data",
}


def prose(text: str) -> str:
    text = re.sub(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", "", text, flags=re.S)
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "``", text)
    return re.sub(r"\s+", " ", text)


def typed_figures(text: str) -> list[str]:
    flat = prose(text)
    for phrase in ALLOWED:
        flat = flat.replace(phrase, " ")
    return [flat[max(0, m.start() - 40):m.end() + 10] for m in FIGURE.finditer(flat)]


@pytest.mark.parametrize("name", GUARDED)
def test_prose_has_no_typed_figures(name):
    found = typed_figures((ROOT / name).read_text())
    assert not found, (f"figures typed into {name}'s prose (move them into a block rendered from "
                       "JSON by tools/render_readme.py, or allow-list a non-measurement):\n"
                       + "\n".join(f"  ...{f}..." for f in found))


def test_every_allowed_phrase_is_still_used():
    flat = " ".join(prose((ROOT / name).read_text()) for name in GUARDED)
    assert [p for p in ALLOWED if p not in flat] == []


def test_the_guard_catches_typed_figures():
    text = ("Intro.\n\nThe merge runs at 2.3x its floor in 4.5 s, 38% of samples, 1.5-1.6 GiB.\n\n"
            "<!-- merge-bench:begin -->\n1.21x\n<!-- merge-bench:end -->\n\n```console\n$ x  # 470 s\n```\n")
    found = typed_figures(text)
    assert len(found) == 4 and not any("1.21x" in f or "470 s" in f for f in found), found
