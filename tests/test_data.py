"""The data readers never fail with anything but a one-line input error, whatever the
bytes of the file (a bounded hypothesis pass over CSV, TSV, JSONL and JSON)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loretta_merge.errors import LorettaError
from loretta_merge import datafiles as D

TEXTY = st.text(alphabet=st.sampled_from(list('ab,\t"\n{}[]:1 \\é') + ["\x00"]), max_size=60)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(TEXTY, st.binary(max_size=40)))
def test_readers_raise_only_input_errors(tmp_path, suffix, body):
    f = tmp_path / f"d{suffix}"
    f.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
    try:
        rows = D.read_rows(f)
    except LorettaError as exc:
        assert "\n" not in str(exc) and f.name in str(exc), str(exc)
        return
    assert rows and all(isinstance(r, dict) for r in rows) and len(rows.lines) == len(rows)
    try:  # validation of every row: an input error or a result, nothing else
        D.classification_rows(rows, text_column="text", label_column="label", source=str(f))
    except LorettaError as exc:
        assert "\n" not in str(exc)


def test_row_lines_point_into_the_file(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('text,label\n"two\nlines",1\nb,0\n')
    rows = D.read_rows(f)
    assert rows.lines == [3, 4]  # a quoted field spans lines 2-3
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert D.read_rows(f).lines == [1, 3]
