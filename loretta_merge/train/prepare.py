"""A run's data, from :class:`TrainArgs` to validated examples, before any model is loaded.

:func:`load_examples` reads the train (and eval) rows, validates EVERY row of every file
(columns, text, labels: the error names the file, the row and the column), applies the
fixed subset / eval split, and maps labels to ids that fit the head. Tokenizing comes
later (:func:`tokenize`), once the tokenizer is loaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .. import datafiles as F
from .. import embedded as E
from ..errors import ConfigError
from . import data as D
from .args import TrainArgs


@dataclass
class Examples:
    """Validated examples of one run. seq-cls: ``texts``/``pairs``/``labels`` per part;
    causal-lm: ``lm`` pairs ``(prompt, response)`` per part. Parts: "train", "eval"."""

    description: str
    texts: dict[str, list[str]] = field(default_factory=dict)
    pairs: dict[str, list[str] | None] = field(default_factory=dict)
    labels: dict[str, list[int]] = field(default_factory=dict)
    lm: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)
    num_labels: int | None = None

    def size(self, part: str) -> int:
        return len(self.texts.get(part) or self.lm.get(part) or [])


def subset(rows: list, n: int | None) -> list:
    """A fixed subset (seed 0, whatever the training seed) so budgets compare across seeds."""
    if n is None or n >= len(rows):
        return rows
    idx = list(range(len(rows)))
    random.Random(0).shuffle(idx)
    return [rows[i] for i in sorted(idx[:n])]


def split(rows: list, fraction: float) -> tuple[list, list]:
    """``(train, eval)``: a fixed ``fraction`` of the rows held out (seed 0)."""
    idx = list(range(len(rows)))
    random.Random(0).shuffle(idx)
    n_eval = int(round(len(rows) * fraction))
    if fraction > 0 and (n_eval < 1 or n_eval >= len(rows)):
        raise ConfigError(f"--eval-split {fraction} of {len(rows)} rows leaves "
                          f"{'no eval' if n_eval < 1 else 'no train'} rows; pass --eval-file "
                          f"FILE, or an --eval-split between {1 / len(rows):.3g} and "
                          f"{(len(rows) - 1) / len(rows):.3g}")
    ev = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in ev], [r for i, r in enumerate(rows) if i in ev]


def _rows(a: TrainArgs) -> tuple[list, list, str, str, str]:
    """Raw rows ``(train, eval, description, train source, eval source)``; the files' rows
    are validated whole by the callers before any subset is taken."""
    if a.default_data:
        train_rows, eval_rows = E.rotten_tomatoes()
        return (train_rows, eval_rows, f"embedded Rotten Tomatoes ({E.rotten_tomatoes_path()})",
                "train data (embedded train split)", "eval data (embedded test split)")
    train_rows = F.read_rows(a.train_file)
    eval_rows = F.read_rows(a.eval_file) if a.eval_file else []
    src_eval = f"eval data {a.eval_file}" if a.eval_file else f"eval data {a.train_file} (eval split)"
    return train_rows, eval_rows, str(a.train_file), f"train data {a.train_file}", src_eval


def _validate(a: TrainArgs, rows: list, source: str) -> None:
    """Check every row of a whole file for the columns the task reads."""
    if not rows:
        return
    if a.task == "seq-cls":
        tcol, lcol = ("text", "label") if a.default_data else (a.text_column, a.label_column)
        F.classification_rows(rows, text_column=tcol, label_column=lcol, source=source)
        if a.text_pair_column:
            F.column_texts(rows, column=a.text_pair_column, source=source)
    else:
        F.lm_rows(rows, text_column=a.text_column, prompt_column=a.prompt_column,
                  response_column=a.response_column, source=source)


def load_examples(a: TrainArgs, *, head_labels: tuple[int | None, dict | None]) -> Examples:
    """Every example of the run, validated; ``head_labels`` is ``(num_labels, label2id)``
    fixed by a checkpoint that is already a classifier (else ``(a.num_labels, None)``)."""
    train_rows, eval_rows, desc, src_train, src_eval = _rows(a)
    _validate(a, train_rows, src_train)
    _validate(a, eval_rows, src_eval)
    if not eval_rows and not a.default_data and a.eval_split:
        train_rows, eval_rows = split(train_rows, a.eval_split)
    train_rows = subset(train_rows, a.max_train_samples)
    eval_rows = subset(eval_rows, a.max_eval_samples)
    ex = Examples(description=desc)
    parts = {"train": (train_rows, src_train), "eval": (eval_rows, src_eval)}
    if a.task == "causal-lm":
        for part, (rows, src) in parts.items():
            ex.lm[part] = F.lm_rows(rows, text_column=a.text_column, prompt_column=a.prompt_column,
                                    response_column=a.response_column, source=src) if rows else []
        return ex
    tcol, lcol = ("text", "label") if a.default_data else (a.text_column, a.label_column)
    raw: dict[str, list[Any]] = {}
    for part, (rows, src) in parts.items():
        texts, labels = (F.classification_rows(rows, text_column=tcol, label_column=lcol,
                                               source=src) if rows else ([], []))
        ex.texts[part], raw[src] = texts, labels
        ex.pairs[part] = (F.column_texts(rows, column=a.text_pair_column, source=src)
                          if a.text_pair_column and rows else None)
    ids, ex.label2id, ex.num_labels = F.encode_labels(raw, num_labels=head_labels[0],
                                                      label2id=head_labels[1])
    ex.labels = {"train": ids[src_train], "eval": ids[src_eval]}
    if a.default_data:
        ex.label2id = {name: i for i, name in enumerate(E.RT_LABELS)}
    return ex


def tokenize(ex: Examples, tokenizer, *, task: str, max_length: int) -> tuple[Any, Any]:
    """``(train_dataset, eval_dataset or None)``."""
    out = []
    for part in ("train", "eval"):
        if not ex.size(part):
            out.append(None)
        elif task == "seq-cls":
            out.append(D.tokenize_classification(tokenizer, ex.texts[part], ex.labels[part],
                                                 max_length=max_length, pairs=ex.pairs[part]))
        else:
            out.append(D.tokenize_lm(tokenizer, ex.lm[part], max_length=max_length))
    return out[0], out[1]
