"""What a merged checkpoint carries besides its weights: its config, side files, provenance.

The config says the output's dtype, whether embeddings are still tied, and, when the output
is a task model, its class and labels. The model card gets a note naming the adapters;
``loretta_merge_provenance.json`` records what was merged, when, and with which tool.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

from .. import __version__, quant
from ..errors import ConfigError
from ..io import copy_side_files, dtype_name, write_file
from ..pooling import POOLING_CONFIG_KEY
from .inputs import LoadedAdapter
from .plan import MergePlan

PROVENANCE_NAME = "loretta_merge_provenance.json"


def merged_pooling(adapters: list[LoadedAdapter]) -> str | None:
    """The pooling the merged model must use: "mean" when the adapters were trained with
    mean pooling (:mod:`loretta_merge.pooling`), None for the model's own. Adapters that
    disagree cannot be merged into one model (its config has one pooling)."""
    pools = {a.label: a.adapter.config.get("pooling") for a in adapters}
    if len(set(pools.values())) > 1:
        listed = ", ".join(f"{label} ({pool or 'first token'})" for label, pool in pools.items())
        raise ConfigError(f"the adapters were trained with different poolings: {listed}; one "
                          f"model pools one way: merge them separately, or retrain one with "
                          f"the other's pooling")
    return next(iter(pools.values()), None)


def output_config(config: dict, plan: MergePlan, out_dtype: torch.dtype | None) -> dict:
    """The base config rewritten for the merged checkpoint."""
    out = dict(config)
    if not out:
        return out
    if out_dtype is not None:
        out["dtype"] = dtype_name(out_dtype)
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype_name(out_dtype)
    if plan.untied:
        out["tie_word_embeddings"] = False
    if plan.task is not None:
        out["architectures"] = [plan.task.class_name]
        if plan.task.id2label:
            out["id2label"] = dict(plan.task.id2label)
            out["label2id"] = {v: int(k) for k, v in plan.task.id2label.items()}
    pooling = merged_pooling(plan.adapters)
    if pooling is not None:  # read back by pooling.apply_pooling (verify, ONNX export, users)
        out[POOLING_CONFIG_KEY] = pooling
    return out


def _card_note(base_dir: Path, plan: MergePlan) -> str:
    names = " + ".join(f"`{a.label}` (weight {a.weight:g})" for a in plan.adapters)
    return (f"> **Merged model.** This checkpoint is `{base_dir.name}` with the adapter(s) "
            f"{names} merged into its weights by loretta-merge {__version__}; see "
            f"`{PROVENANCE_NAME}`.")


def _with_note(text: str, note: str) -> str:
    """The note after the model card's YAML front matter (kept first), else at the top."""
    if text.startswith("---\n") and "\n---" in text[4:]:
        end = text.index("\n---", 4) + 4
        return text[:end] + "\n\n" + note + "\n" + text[end:]
    return note + "\n\n" + text


def write_side_files(base_dir: Path, out_dir: Path, *, config: dict, note: str) -> None:
    """The base's side files by the one policy (:func:`loretta_merge.io.copy_side_files`),
    then the rewritten config and the model card with the merge note."""
    copy_side_files(base_dir, out_dir, exclude=("config.json", "README.md", "readme.md",
                                                PROVENANCE_NAME, *quant.QUANT_SIDE_FILES))
    for card in ("README.md", "readme.md"):
        if (base_dir / card).is_file():
            write_file(out_dir / card, _with_note((base_dir / card).read_text(errors="replace"), note))
    if config:
        write_file(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def provenance(base_dir: Path, plan: MergePlan) -> dict:
    return {
        "tool": "loretta-merge", "version": __version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base": str(base_dir.resolve()),
        "adapters": [{"path": a.label, "weight": a.weight, "method": a.adapter.method,
                      "source": a.adapter.source,
                      "base_model_name_or_path": a.adapter.base_model_name_or_path}
                     for a in plan.adapters],
        "dtype": dtype_name(plan.main_dtype), "untied": list(plan.untied),
        "task_model": plan.task.class_name if plan.task else None,
        "dropped": list(plan.task.dropped) if plan.task else [],
        "pooling": merged_pooling(plan.adapters),
        "merge_method": (plan.task_vectors.describe() if plan.task_vectors is not None
                         else {"method": "linear", "params": {}, "seed": None}),
    }


def finish_output(base_dir: Path, out_dir: Path, config: dict, plan: MergePlan,
                  out_dtype: torch.dtype | None) -> None:
    """Write config, side files and provenance beside the merged weights in ``out_dir``."""
    write_side_files(base_dir, out_dir, config=output_config(config, plan, out_dtype),
                     note=_card_note(base_dir, plan))
    write_file(out_dir / PROVENANCE_NAME, json.dumps(provenance(base_dir, plan), indent=2) + "\n")
