"""Fine-tuning with LoRETTA on the transformers ``Trainer``.

Public API::

    from loretta_merge.train import train, TrainArgs, TrainReport
    report = train(model="./bert", train_file="train.csv", output_dir="adapter")
    report = train(TrainArgs(model="./bert", train_file="train.csv", bf16=True))

Modules: :mod:`.args` (the one dataclass of options and its checks), :mod:`.data`
(readers of CSV/TSV/JSONL/JSON/Parquet and the embedded Rotten Tomatoes split,
tokenization), :mod:`.prepare` (a run's examples, every row validated), :mod:`.build`
(config, tokenizer, model, method, fp32 master weights), :mod:`.trainer` (the Trainer
subclass, atomic checkpoints, progress), :mod:`.fsdp` (sharding with ``fully_shard``),
:mod:`.outputs` (report, adapter, summary, overwrite rules), :mod:`.run` (the run).

With no model and no data it trains the embedded default: MiniLM on the movie-disjoint
Rotten Tomatoes split with the budget in :data:`DEFAULT_BUDGET`.

Only :mod:`.args` is imported with the package; :func:`train`, :class:`TrainReport` and the
output names load torch on first use.
"""

from __future__ import annotations

from .args import DEFAULT_BUDGET, METHODS, PAPER, TASKS, TrainArgs

# torch-backed names, imported on first use: the options (``.args``) stay as light as the
# command line needs (``loretta-merge train --help`` imports no torch)
_TORCH_NAMES = {
    "train": "run",
    "TrainReport": "outputs",
    "CHECKPOINTS": "outputs",
    "SUMMARY": "outputs",
    "TRAINED_FILE": "outputs",
}

__all__ = ["train", "TrainArgs", "TrainReport", "METHODS", "TASKS", "DEFAULT_BUDGET", "PAPER",
           "CHECKPOINTS", "SUMMARY", "TRAINED_FILE"]


def __getattr__(name: str):
    module = _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
