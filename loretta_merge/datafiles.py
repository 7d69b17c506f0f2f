"""Local data files (CSV / TSV / JSON / JSONL / Parquet) read into rows and validated: every
error names the file, the column and the line. Plain Python (Parquet through the optional
``pyarrow``), so training and the int8 export's evaluation read files the same way.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from .deps import require
from .errors import ConfigError, FormatError, LorettaError


class Rows(list):
    """The rows of a data file (dicts), with ``lines``: the line of the file each row ends on
    (1-based; for Parquet the row number), so errors can point into the file."""

    def __init__(self, rows: Sequence[dict], lines: Sequence[int]):
        super().__init__(rows)
        self.lines = list(lines)

    def line(self, i: int) -> str:
        return f" (line {self.lines[i]} of the file)" if i < len(getattr(self, "lines", [])) else ""


def _read_csv(path: Path, delimiter: str) -> Rows:
    rows, lines = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for row in reader:
                rows.append(row)
                lines.append(reader.line_num)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise FormatError(f"{path} line {reader.line_num + 1} cannot be read as "
                              f"{'TSV' if delimiter == chr(9) else 'CSV'} ({exc}); fix that "
                              "line or save the file as UTF-8 CSV") from None
    return Rows(rows, lines)


def _read_json(path: Path) -> Rows:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "save it as UTF-8") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} "
                              f"column {exc.colno}); fix it: a .json data file holds one list of "
                              'objects such as [{"text": "...", "label": 1}]') from None
        lines = list(range(1, len(rows) + 1))
        kind = "element of the JSON list"
    else:
        rows, lines = [], []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise FormatError(f"{path} line {i} is not valid JSON ({exc.msg}); "
                                      "fix that line (JSONL holds one JSON object per line)") from None
                lines.append(i)
        kind = "JSONL line"
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            where = f"line {lines[i]}" if kind == "JSONL line" else f"element {i}"
            raise FormatError(f"{path} {where}: every {kind} must be a JSON object "
                              f'(e.g. {{"text": "...", "label": 1}}), got {type(r).__name__}; fix or drop it')
    return Rows(rows, lines)


def read_rows(path: str | Path) -> Rows:
    """Rows of a local ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` / ``.parquet`` file.

    Any content gives rows or one FormatError naming the file (fuzzed in
    tests/test_fuzz_data.py): bytes that are not UTF-8, JSON nested too deeply or with
    numbers too long to convert, CSV fields over the csv module's limit.
    """
    path = Path(path)
    try:
        return _read_rows(path)
    except LorettaError:
        raise
    except (UnicodeDecodeError, csv.Error, ValueError, RecursionError) as exc:
        kind = path.suffix.lower().lstrip(".").upper()
        reason = " ".join(str(exc).split())[:200]
        raise FormatError(f"{path}: cannot read it as {kind} ({reason}); fix the file or "
                          f"re-save it as UTF-8 {kind}") from None


def _read_rows(path: Path) -> Rows:
    if not path.is_file():
        raise FormatError(f"data file {path} does not exist; pass an existing --train-file "
                          "/ --eval-file")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = _read_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        rows = _read_json(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise FormatError(f"{path}: unsupported data file type {suffix!r}; "
                          "use .csv, .tsv, .jsonl, .json or .parquet")
    if not rows:
        raise FormatError(f"data file {path} is empty (no rows); add a header line and data rows")
    return rows


def _read_parquet(path: Path) -> Rows:
    pq = require("pyarrow.parquet", extra="parquet", purpose=f"reading the Parquet file {path}")
    try:
        table = pq.read_table(path).to_pylist()
    except (OSError, ValueError, TypeError, ArithmeticError, LookupError) as exc:
        # pyarrow's ArrowException subclasses these; a damaged file is the user's, not a bug
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FormatError(f"{path} is not a readable Parquet file ({first}); write it again "
                          "(pandas.DataFrame.to_parquet) or convert it to CSV or JSONL") from None
    return Rows(table, range(1, len(table) + 1))


def _line(rows: list[dict], i: int) -> str:
    return rows.line(i) if isinstance(rows, Rows) else ""


def _check_columns(rows: list[dict], columns: Sequence[str], source: str) -> None:
    """Every column is present in every row (a row that lacks one is named)."""
    present = list(rows[0].keys())
    for col in columns:
        if col not in present:
            raise ConfigError(f"{source} has no column {col!r}; columns present: {present}. "
                              "Name the right one with --text-column / --text-pair-column / "
                              "--label-column / --prompt-column / --response-column")
    for i, r in enumerate(rows):
        for col in columns:
            if r.get(col) is None:
                raise ConfigError(f"{source} row {i}: no value in column {col!r}{_line(rows, i)}"
                                  "; fill it in or drop that row")


def _check_text(rows: list[dict], column: str, source: str) -> None:
    for i, r in enumerate(rows):
        value = r.get(column)
        if not isinstance(value, str):
            raise ConfigError(f"{source} row {i}: column {column!r} must hold text, got "
                              f"{type(value).__name__} {value!r}; fix or drop that row"
                              f"{_line(rows, i)}")


def _parse_label(value: Any, source: str, i: int, column: str, where: str = "") -> int | str:
    if isinstance(value, bool) or value is None or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{source} row {i}: label {value!r} in column {column!r} is neither "
                          f"an integer class id nor a class name{where}; fix or drop that row")
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.isascii() and s.lstrip("-").isdigit():  # not "²": int() rejects it
            return int(s)
        if not s:
            raise ConfigError(f"{source} row {i}: empty label in column {column!r}{where}; "
                              "fill it in or drop that row")
        return s
    raise ConfigError(f"{source} row {i}: label {value!r} in column {column!r} is a "
                      f"{type(value).__name__}; use an integer id or a class name{where}")


def classification_rows(rows: list[dict], *, text_column: str, label_column: str,
                        source: str) -> tuple[list[str], list[int | str]]:
    """Validate columns and text of every row and parse labels (ints stay ints, names stay
    strings)."""
    _check_columns(rows, [text_column, label_column], source)
    _check_text(rows, text_column, source)
    labels = [_parse_label(r[label_column], source, i, label_column, _line(rows, i))
              for i, r in enumerate(rows)]
    kinds = {type(x) for x in labels}
    if len(kinds) > 1:
        i = next(i for i, x in enumerate(labels) if type(x) is not type(labels[0]))
        raise ConfigError(f"{source} row {i}: column {label_column!r} mixes integer ids and "
                          f"class names ({labels[0]!r} and {labels[i]!r}); use one kind")
    return [r[text_column] for r in rows], labels


def column_texts(rows: list[dict], *, column: str, source: str) -> list[str]:
    """The text of ``column`` in every row, each row checked (the second sentence of pairs,
    ``--text-pair-column``; the unlabelled texts of ``extract --refine-data``)."""
    _check_columns(rows, [column], source)
    _check_text(rows, column, source)
    return [r[column] for r in rows]


def encode_labels(parts: dict[str, list[int | str]], *, num_labels: int | None,
                  label2id: dict[str, int] | None) -> tuple[dict[str, list[int]], dict[str, int], int]:
    """Map labels of every part (name -> raw labels) to ids that fit the head.

    Class names use ``label2id`` when given (e.g. from the model's config) or the sorted
    names. Returns ``(ids by part, label2id, num_labels)``; raises ConfigError, naming the
    part and row, when a label does not fit a head of ``num_labels`` classes.
    """
    everything = [x for labels in parts.values() for x in labels]
    names = any(isinstance(x, str) for x in everything)
    mapping: dict[str, int] = {}
    if names:
        if label2id and set(everything) <= set(label2id):
            mapping = dict(label2id)
        else:
            mapping = {name: i for i, name in enumerate(sorted(set(everything)))}
    needed = (max(mapping.values()) + 1) if names else (max(everything) + 1)
    if num_labels is None:
        num_labels = max(needed, 2)
    out = {}
    for part, labels in parts.items():
        ids = [mapping[x] if names else x for x in labels]
        for i, (raw, y) in enumerate(zip(labels, ids)):
            if not 0 <= y < num_labels:
                what = f"class {raw!r} (id {y})" if names else f"label {y}"
                raise ConfigError(
                    f"{part} row {i}: {what} does not fit the classification head, which has "
                    f"{num_labels} classes (ids 0..{num_labels - 1}); the data has "
                    f"{len(set(ids))} distinct labels. Pass --num-labels or a matching model")
        out[part] = ids
    return out, mapping, num_labels


def lm_rows(rows: list[dict], *, text_column: str | None, prompt_column: str | None,
            response_column: str | None, source: str) -> list[tuple[str, str]]:
    """Causal-LM examples as ``(prompt, response)``; a plain text column gives ``("", text)``
    (the loss covers all of it), a prompt/response pair puts the loss on the response only."""
    if prompt_column or response_column:
        if not (prompt_column and response_column):
            raise ConfigError("causal-lm needs both --prompt-column and --response-column, "
                              "or --text-column alone; pass both, or --text-column alone")
        _check_columns(rows, [prompt_column, response_column], source)
        _check_text(rows, prompt_column, source)
        _check_text(rows, response_column, source)
        return [(r[prompt_column], r[response_column]) for r in rows]
    column = text_column or "text"
    _check_columns(rows, [column], source)
    _check_text(rows, column, source)
    return [("", r[column]) for r in rows]
