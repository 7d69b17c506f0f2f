"""Replace the generated block between two HTML-comment markers in a README.

The table tools (``merge_table.py``, ``train_table.py``) write their output with
:func:`replace_block`; everything outside the markers is left as it is.
"""

from __future__ import annotations

from pathlib import Path


def replace_block(readme: Path, begin: str, end: str, body: str) -> None:
    """Put ``body`` between ``begin`` and ``end`` in ``readme`` (markers kept)."""
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme}: no {begin} ... {end} markers; add them where the "
                         f"generated block belongs")
    start, stop = text.index(begin), text.index(end) + len(end)
    readme.write_text(f"{text[:start]}{begin}\n{body.strip()}\n{end}{text[stop:]}")
