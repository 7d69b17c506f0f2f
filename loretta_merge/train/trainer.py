"""The ``Trainer`` subclass a run uses, and its callbacks.

:class:`LorettaTrainer` differs from a plain ``transformers.Trainer`` in what a checkpoint
holds and how it appears:

- a checkpoint holds only the trained tensors (``trained_tensors.safetensors``, written by
  :func:`outputs.write_tensors`) plus the Trainer's optimizer, scheduler and RNG state, so
  resuming continues exactly;
- a checkpoint is written into ``checkpoints/.partial/`` and renamed into place when
  complete (files fsynced first): a run killed mid-save leaves no half checkpoint that a
  resume would pick up;
- with ``--fsdp`` the trained tensors and the optimizer state are gathered from the shards
  (collectives on every rank) and written once, by rank 0 (see :mod:`.fsdp`).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..errors import FormatError
from . import fsdp
from ..io import fsync_path, fsync_tree
from .outputs import TRAINED_FILE, write_tensors

STAGING = ".partial"


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def make_trainer_class():
    from safetensors.torch import load_file
    from transformers import Trainer

    class LorettaTrainer(Trainer):
        """See the module docstring. ``sharded`` is set once the model is FSDP-sharded."""

        sharded = False
        _staging: str | None = None

        def trained_tensors(self) -> dict[str, torch.Tensor]:
            """Every trained tensor, full (gathered when sharded), on the CPU; collective
            when sharded, so every rank calls it."""
            model = self.accelerator.unwrap_model(self.model)
            return fsdp.full_tensors(model, lambda n, p: p.requires_grad)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            tensors = self.trained_tensors()  # every rank: gathering is collective
            if not self.args.should_save:
                return
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            write_tensors(tensors, os.path.join(output_dir, TRAINED_FILE))

        def _get_output_dir(self, trial) -> str:
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial) -> None:
            run_dir = super()._get_output_dir(trial)
            self._staging = os.path.join(run_dir, STAGING)
            try:
                _publish_checkpoint(self, lambda: super(LorettaTrainer, self)._save_checkpoint(
                    model, trial), run_dir)
            finally:
                self._staging = None

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            path = os.path.join(resume_from_checkpoint, TRAINED_FILE)
            if not os.path.isfile(path):
                raise FormatError(f"checkpoint {resume_from_checkpoint} has no {TRAINED_FILE}; "
                                  "it was not written by loretta-merge train. Pass --no-resume "
                                  "--force to start over")
            saved = load_file(path)
            model = self.accelerator.unwrap_model(model or self.model)
            _check_fits(model, saved, path)
            fsdp.load_full_tensors(model, saved)

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if not self.sharded:
                return super()._save_optimizer_and_scheduler(output_dir)
            fsdp.save_optimizer(self.model, self.optimizer, output_dir,
                                main=self.args.should_save)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if not self.sharded or checkpoint is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            fsdp.load_optimizer(self.model, self.optimizer, checkpoint)
            self.lr_scheduler.load_state_dict(
                torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    return LorettaTrainer


def _publish_checkpoint(trainer, save, run_dir: str) -> None:
    """Run the Trainer's checkpoint ``save`` into ``run_dir/.partial``, then (main process,
    once every rank has written) fsync it and rename ``checkpoint-N`` into ``run_dir``, and
    keep the newest ``save_total_limit`` checkpoints."""
    from transformers.trainer_utils import rotate_checkpoints

    name = f"checkpoint-{trainer.state.global_step}"
    main = trainer.args.should_save
    try:
        save()
        _barrier()
        if main:
            fsync_tree(Path(trainer._staging, name))
            os.replace(os.path.join(trainer._staging, name), os.path.join(run_dir, name))
            fsync_path(Path(run_dir))
    finally:
        if main:
            shutil.rmtree(trainer._staging, ignore_errors=True)
    _barrier()
    if main:
        rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                           best_model_checkpoint=None, use_mtime=False)


def _check_fits(model, saved: dict[str, torch.Tensor], path: str) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    extra = [n for n in saved if n not in params]
    if missing or extra:
        raise FormatError(f"checkpoint {path} does not fit this model (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}); was it written with other --method/--r/"
                          "--tensor-rank options? Pass --no-resume --force to start over")
    for n, t in saved.items():
        if tuple(params[n].shape) != tuple(t.shape):
            raise FormatError(f"checkpoint {path}: tensor {n} has shape {tuple(t.shape)}, the "
                              f"model expects {tuple(params[n].shape)}; pass --no-resume "
                              "--force to start over")


# ----------------------------------------------------------------------- callbacks

def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step; :meth:`median` skips the warm-up steps."""

        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

        def median(self) -> float | None:
            t = sorted(self.times[2:] or self.times)
            return t[len(t) // 2] if t else None

    return StepTimer()


def format_progress(step: int, total: int, loss: float | None, elapsed: float,
                    first_step: int = 0) -> str:
    """``step 12/250 | loss 0.6931 | 3.1 s elapsed | ~1m 40s left`` (time left from the
    steps taken in this process, so a resumed run does not count the skipped ones)."""
    done = max(step - first_step, 0)
    left = (total - step) * elapsed / done if done else math.nan
    parts = [f"step {step}/{total}", f"loss {loss:.4f}" if loss is not None else "loss -",
             f"{elapsed:.1f} s elapsed", f"~{_duration(left)} left" if done else "time left -"]
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_printer(stream=None):
    """Steps, loss and time left on stderr, on the main process: one line redrawn in place
    on a terminal, a line per logging step otherwise."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.stream = stream or sys.stderr
            self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
            self.loss: float | None = None
            self.t0 = time.perf_counter()
            self.first = 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.first = time.perf_counter(), state.global_step

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                if not self.tty and state.is_world_process_zero:
                    self._print(state, end="\n")

        def on_step_end(self, args, state, control, **kw):
            if self.tty and state.is_world_process_zero:
                self._print(state, end="")

        def on_train_end(self, args, state, control, **kw):
            if self.tty and state.is_world_process_zero:
                self.stream.write("\n")
                self.stream.flush()

        def _print(self, state, *, end: str) -> None:
            line = format_progress(state.global_step, state.max_steps, self.loss,
                                   time.perf_counter() - self.t0, self.first)
            self.stream.write(("\r\033[K" if self.tty else "") + line + end)
            self.stream.flush()

    return Progress()
