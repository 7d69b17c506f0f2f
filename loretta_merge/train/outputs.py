"""What a run writes: checkpoints' tensors, the adapter, ``train_summary.json``.

Layout of ``OUTPUT``::

    OUTPUT/adapter_config.json, adapter_model.safetensors   the adapter (rep/adp), or
    OUTPUT/head.safetensors / PEFT files                     the baselines
    OUTPUT/config.json, model.safetensors, tokenizer files   --method full (a checkpoint)
    OUTPUT/train_summary.json                                :class:`TrainReport`
    OUTPUT/checkpoints/run_config.json                       what a resume must match
    OUTPUT/checkpoints/checkpoint-N/                         trained tensors + Trainer state

Atomicity: a checkpoint appears complete or not at all (see :mod:`.trainer`); the final
``OUTPUT`` is assembled in a temporary directory beside it (adapter, summary, and the
checkpoints hard-linked) and renamed into place by :func:`loretta_merge.io.atomic_output_dir`,
so an existing adapter is replaced only by a complete new one. Only the main process
writes. Every safetensors file a run writes goes through :func:`write_tensors`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError, OutputExistsError

CHECKPOINTS = "checkpoints"
SUMMARY = "train_summary.json"
TRAINED_FILE = "trained_tensors.safetensors"
RUN_CONFIG = "run_config.json"


@dataclass
class TrainReport:
    """What a run did; ``to_dict()`` is what ``train_summary.json`` holds."""

    output_dir: str
    method: str
    task: str
    model: str
    data: str
    seed: int
    steps: int
    epochs: float
    train_examples: int
    eval_examples: int
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    trainable_params: int
    trainable_breakdown: dict[str, int]
    adapter_params: int
    lora_r8_equivalent_params: int
    total_params: int
    wall_time_s: float
    train_time_s: float
    step_time_s: float | None
    peak_rss_mib: float
    resumed_from_step: int | None
    label2id: dict[str, int] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def write_tensors(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Training's safetensors files (checkpoints, the head baseline), through the package's
    one writer (:func:`loretta_merge.io.write_safetensors`: aligned, fsynced, a full disk
    said in one line)."""
    from ..io import write_safetensors

    write_safetensors(path, {k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def prepare_output(out: Path, *, resume: bool, force: bool, run_key: dict) -> str | None:
    """Apply the overwrite rules; return the checkpoint to resume from (or None)."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = out / CHECKPOINTS
    if ((out / "adapter_config.json").exists() or (out / SUMMARY).exists()) and not force:
        raise OutputExistsError(f"{out} already holds a trained adapter; pass --force to "
                                "train again into it, or choose another --output")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another --output")
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last and resume and not force:
        _check_same_run(ckpt_dir, run_key)
        return last
    if last is not None and not force:
        raise OutputExistsError(f"{ckpt_dir} holds checkpoints; pass --resume to continue "
                                "them or --force to start over")
    if is_main():
        _fresh_checkpoints(out, ckpt_dir, run_key)
    return None


def _check_same_run(ckpt_dir: Path, run_key: dict) -> None:
    key_file = ckpt_dir / RUN_CONFIG
    old = json.loads(key_file.read_text()) if key_file.is_file() else None
    if old != run_key:
        changed = sorted(k for k in set(run_key) | set(old or {})
                         if (old or {}).get(k) != run_key.get(k))
        raise ConfigError(f"{ckpt_dir} holds checkpoints of a different run (changed: "
                          f"{changed}); pass --no-resume --force to start over, or "
                          "choose another --output")


def _fresh_checkpoints(out: Path, ckpt_dir: Path, run_key: dict) -> None:
    try:
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / RUN_CONFIG).write_text(json.dumps(run_key, indent=1, sort_keys=True))
    except OSError as exc:  # root passes permission checks on read-only mounts (/proc)
        raise ConfigError(f"cannot write to {out} ({exc.strerror or exc}); choose an "
                          f"--output in a directory you can write to") from exc


def write_outputs(out: Path, write_adapter: Callable[[Path], None], report: TrainReport) -> None:
    """Assemble the final ``out`` in a temporary directory beside it (``write_adapter(tmp)``
    writes the adapter files, then the summary; the checkpoints are hard-linked in) and
    rename it into place."""
    from ..io import atomic_output_dir, output_error

    with atomic_output_dir(out, force=True) as tmp:
        try:
            write_adapter(tmp)
            (tmp / SUMMARY).write_text(json.dumps(report.to_dict(), indent=2))
            if (out / CHECKPOINTS).is_dir():
                shutil.copytree(out / CHECKPOINTS, tmp / CHECKPOINTS, copy_function=_link_or_copy)
        except OSError as exc:  # atomic_output_dir fsyncs the tree before the rename
            raise output_error(exc, out) from None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
