"""Fuzzing the training-data readers (issue 16): whatever bytes or rows a user's CSV, TSV,
JSONL, JSON or Parquet file holds, reading and validating it gives rows or one
:class:`LorettaError` naming the file, never another exception.

Two generators: raw bytes (anything at all, under each suffix), and well-formed files built
from random rows (random columns, JSON scalars and nested values, missing cells, extra
cells) that are then damaged (truncated, bytes spliced in). Both run the whole pre-training
path: ``read_rows`` then ``classification_rows`` + ``encode_labels`` and ``lm_rows``.
The example counts are bounded for CI (``LORETTA_FUZZ_EXAMPLES`` raises them locally).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loretta_merge.errors import LorettaError

from loretta_merge import datafiles as D

N = int(os.environ.get("LORETTA_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SUFFIXES = [".csv", ".tsv", ".jsonl", ".json", ".parquet"]
HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None


def check_one_error(exc: LorettaError, path: Path) -> None:
    """A reader's error: one line that names the file."""
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    assert str(path) in msg or path.name in msg, msg


def pipeline(path: Path) -> None:
    """Everything training does with a data file before a model is built."""
    try:
        rows = D.read_rows(path)
    except LorettaError as exc:
        check_one_error(exc, path)
        return
    assert isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
    source = f"train data {path}"
    try:
        texts, labels = D.classification_rows(rows, text_column="text", label_column="label",
                                              source=source)
        assert all(isinstance(t, str) for t in texts) and len(texts) == len(labels)
        ids, _, num_labels = D.encode_labels({source: labels}, num_labels=None, label2id=None)
        assert all(0 <= y < num_labels for y in ids[source])
    except LorettaError as exc:
        check_one_error(exc, path)
    try:
        pairs = D.lm_rows(rows, text_column="text", prompt_column=None, response_column=None,
                          source=source)
        assert all(isinstance(p, str) and isinstance(r, str) for p, r in pairs)
    except LorettaError as exc:
        check_one_error(exc, path)


def run_on(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        pipeline(path)


# --------------------------------------------------------------------------- raw bytes

@FUZZ
@given(content=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES))
@example(content=b"\xff\xfe\x00t\x00e\x00x\x00t", suffix=".csv")          # UTF-16, not UTF-8
@example(content=b"text,label\n\xe9t\xe9,1\n", suffix=".tsv")            # Latin-1 bytes
@example(content=b"text,label\na\x00b,1\n", suffix=".csv")               # a NUL byte
@example(content=b"[" * 100_000, suffix=".json")                         # nested too deep
@example(content=b'{"text": ' + b"[" * 100_000 + b"\n", suffix=".jsonl")
@example(content=b'{"text": "a", "label": ' + b"9" * 5000 + b"}\n", suffix=".jsonl")  # huge int
@example(content=b'[{"text": "a", "label": 1},', suffix=".json")          # truncated array
@example(content=b'{"text": "a", "label": 1}', suffix=".json")            # one object, no list
@example(content=b"not parquet at all", suffix=".parquet")
@example(content=b"text,label\n" + b"x" * 200_000 + b",1\n", suffix=".csv")  # over csv's field limit
@example(content="text,label\na,\u00b2\nb,1\n".encode(), suffix=".csv")  # "²".isdigit(), int() fails
def test_raw_bytes_give_rows_or_one_error(content, suffix):
    run_on(content, suffix)


# --------------------------------------------------------------------------- structured rows

_scalar = (st.none() | st.booleans() | st.integers(-3, 10**30) | st.floats(allow_nan=True)
           | st.text(max_size=8))
_value = st.recursive(_scalar, lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=3), c, max_size=2),
                      max_leaves=4)
_column = st.sampled_from(["text", "label", "stars", "", "text ", "Label"])
_rows = st.lists(st.dictionaries(_column, _value, max_size=4), min_size=0, max_size=6)


def _serialise(rows: list[dict], suffix: str) -> bytes:
    if suffix in (".csv", ".tsv"):
        columns = sorted({k for r in rows for k in r})
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="\t" if suffix == ".tsv" else ",")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([r.get(c, "") for c in columns])
        return buf.getvalue().encode("utf-8")
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    if suffix == ".json":
        return json.dumps(rows).encode("utf-8")
    if HAVE_PYARROW:  # pragma: no cover - pyarrow is not installed on this machine
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = pa.BufferOutputStream()
        try:
            pq.write_table(pa.Table.from_pylist([{k: str(v) for k, v in r.items()} for r in rows]), buf)
        except pa.ArrowException:
            return b""
        return buf.getvalue().to_pybytes()
    return b"PAR1"


@FUZZ
@given(rows=_rows, suffix=st.sampled_from(SUFFIXES), cut=st.none() | st.integers(0, 300),
       splice=st.binary(max_size=6), at=st.integers(0, 300))
def test_damaged_files_give_rows_or_one_error(rows, suffix, cut, splice, at):
    content = _serialise(rows, suffix)
    if cut is not None:
        content = content[:cut]
    at = min(at, len(content))
    run_on(content[:at] + splice + content[at:], suffix)


@FUZZ
@given(rows=_rows, suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]))
def test_wellformed_files_read_back(rows, suffix):
    """Undamaged files: the readers return exactly the rows written (JSON kinds), or one
    error when there is nothing to read."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(_serialise(rows, suffix))
        if suffix in (".jsonl", ".json") and rows:
            got = D.read_rows(path)  # NaN != NaN, so compare the JSON texts
            assert json.dumps(got) == json.dumps(rows)
        pipeline(path)


def test_parquet_without_pyarrow_is_one_clear_error(tmp_path):
    """Run where pyarrow cannot be imported (blocked in a fresh interpreter): one line naming
    the file and the extra that installs it."""
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    code = ("import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
            "from loretta_merge import datafiles\n"
            "from loretta_merge.errors import LorettaError\n"
            "try:\n    datafiles.read_rows(sys.argv[1])\n"
            "except LorettaError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out.count("\n") == 0 and str(path) in out, out
    assert "pip install 'loretta-merge[parquet]'" in out, out


@pytest.mark.skipif(not HAVE_PYARROW, reason="needs pyarrow (the test extra installs it)")
def test_damaged_parquet_is_one_clear_error(tmp_path):
    path = tmp_path / "data.parquet"
    for payload in (b"PAR1", b"PAR1" + bytes(range(64)) + b"PAR1", b"not parquet at all"):
        path.write_bytes(payload)
        with pytest.raises(LorettaError) as info:
            D.read_rows(path)
        check_one_error(info.value, path)
