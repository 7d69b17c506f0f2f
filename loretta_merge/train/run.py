"""One training run: arguments -> data -> model -> Trainer -> outputs.

:func:`train` reads and validates the data before any model is built, loads a local
model offline, wraps it for the method, trains with :class:`.trainer.LorettaTrainer`
(data-parallel under ``torchrun`` / ``accelerate launch``, sharded with ``--fsdp``),
evaluates before and after, and writes the adapter and ``train_summary.json`` from the
main process only.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from . import build, fsdp
from .. import embedded
from ..memory import peak_rss_bytes
from . import data as D
from .args import TrainArgs
from .outputs import CHECKPOINTS, TrainReport, is_main, prepare_output, write_outputs, write_tensors
from .prepare import Examples, load_examples, tokenize
from .trainer import make_trainer_class, progress_printer, step_timer


def train(args: TrainArgs | None = None, *, callbacks: Sequence[Any] = (),
          **fields: Any) -> TrainReport:
    """Fine-tune with LoRETTA. Pass a :class:`TrainArgs`, or its fields as keywords
    (``train(model=..., train_file=..., output_dir=...)``); ``callbacks`` are extra
    ``TrainerCallback`` objects. Returns the :class:`TrainReport` (also written as
    ``OUTPUT/train_summary.json``)."""
    if args is None:
        args = TrainArgs(**fields)
    elif fields:
        import dataclasses

        args = dataclasses.replace(args, **fields)
    return _Run(args.resolved(), list(callbacks)).go()


def _peak_rss_mib() -> float:
    return peak_rss_bytes() / 2**20


class _Run:
    """The steps of one run, in order; each method does one of them."""

    def __init__(self, a: TrainArgs, callbacks: list):
        self.a, self.callbacks, self.t_start = a, callbacks, time.perf_counter()
        self.model_path = Path(a.model) if a.model is not None else embedded.default_model_path()
        self.out = Path(a.output_dir)

    def go(self) -> TrainReport:
        from ..deps import require

        require("accelerate", extra="train", purpose="loretta-merge train (the transformers "
                "Trainer)")
        config = build.read_config(self.model_path)        # data, validated, before any model
        ex = load_examples(self.a, head_labels=build.head_labels(config, self.a.num_labels)
                           if self.a.task == "seq-cls" else (None, None))
        existed = self.out.exists()
        last_ckpt = prepare_output(self.out, resume=self.a.resume, force=self.a.force,
                                   run_key=self._run_key(ex))
        try:
            tok = build.load_tokenizer(self.a, self.model_path)
        except BaseException:
            if not existed and is_main():  # a refused model leaves no OUT behind
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        net, tok, info = self._model(ex, tok)
        self.tok = tok
        trainer, datasets = self._trainer(net, tok, ex, info["autocast"])
        return self._train_and_write(trainer, datasets, info, ex, last_ckpt)

    def _run_key(self, ex: Examples) -> dict:
        return {**self.a.run_key(), "model": str(self.model_path), "data": ex.description}

    def _model(self, ex: Examples, tok):
        from transformers import set_seed
        from transformers.utils import logging as hf_logging

        if not self.a.progress:  # quiet means quiet: no weight-loading bars either
            hf_logging.disable_progress_bar()
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        set_seed(self.a.seed)
        net = build.load_model(self.a, self.model_path, num_labels=ex.num_labels,
                               label2id=ex.label2id, pad_id=pad_id)
        build.check_vocab(net, tok, self.a.tokenizer or self.model_path)
        total = sum(p.numel() for p in net.parameters())
        before = dict(net.named_parameters())
        net, lora_eq, adapter_params = build.apply_method(net, self.a)
        build.fresh_names_after_wrapping(net, before)
        if self.a.method in ("rep", "adp"):
            build.keep_fp32_master(net)
        autocast = build.autocast_dtype(self.a, net) if self.a.method in ("rep", "adp") else None
        info = dict(total=total, lora_eq=lora_eq, breakdown=build.breakdown(net), pad_id=pad_id,
                    adapter_params=getattr(net, "_lora_adapter_params", adapter_params),
                    autocast=autocast)
        return net, tok, info

    def _training_args(self, n_train: int, autocast):
        import torch
        from transformers import TrainingArguments

        a, world = self.a, int(os.environ.get("WORLD_SIZE", "1"))
        if a.fsdp:  # we shard with fully_shard; accelerate must not wrap the model again
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        total_steps = a.max_steps or math.ceil(math.ceil(n_train / a.batch_size) / world * a.epochs)
        warmup = a.warmup_steps if a.warmup_steps is not None else min(500, total_steps // 10)
        use_cpu = not torch.cuda.is_available()
        amp = {} if a.fsdp else dict(bf16=autocast == torch.bfloat16, fp16=autocast == torch.float16)
        return TrainingArguments(
            output_dir=str(self.out / CHECKPOINTS), per_device_train_batch_size=a.batch_size,
            per_device_eval_batch_size=a.eval_batch_size, learning_rate=a.learning_rate,
            warmup_steps=warmup, weight_decay=a.weight_decay, num_train_epochs=a.epochs,
            max_steps=a.max_steps or -1, lr_scheduler_type="linear", seed=a.seed,
            data_seed=a.seed, save_strategy="steps",
            save_steps=a.save_steps or max(1, total_steps // 10), save_total_limit=2,
            logging_steps=a.logging_steps, report_to="none", disable_tqdm=True,
            use_cpu=use_cpu, remove_unused_columns=False, label_names=["labels"],
            dataloader_num_workers=0, ddp_find_unused_parameters=False,
            ddp_backend="gloo" if use_cpu and world > 1 else None,
            prediction_loss_only=a.task == "causal-lm", **amp), warmup, world

    def _trainer(self, net, tok, ex: Examples, autocast):
        from transformers.trainer_callback import PrinterCallback

        train_ds, eval_ds = tokenize(ex, tok, task=self.a.task, max_length=self.a.max_length)
        targs, warmup, world = self._training_args(len(train_ds), autocast)
        self.warmup, self.world = warmup, world
        self.timer = step_timer()
        extra = [progress_printer()] if self.a.progress else []
        trainer = make_trainer_class()(
            model=net, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
            data_collator=D.PadCollator(tok.pad_token_id if tok.pad_token_id is not None
                                        else (tok.eos_token_id or 0)),
            compute_metrics=_classification_metrics if self.a.task == "seq-cls" else None,
            callbacks=[self.timer, *extra, *self.callbacks])
        trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
        if self.a.fsdp:  # after the Trainer set up the process group; before the optimizer
            fsdp.shard_model(net, param_dtype=autocast)
            trainer.sharded = True
            trainer.is_distributed_loading_by_transformers = True  # no DDP wrap: FSDP reduces
        return trainer, (train_ds, eval_ds)

    def _train_and_write(self, trainer, datasets, info: dict, ex: Examples,
                         last_ckpt: str | None) -> TrainReport:
        import sys

        train_ds, eval_ds = datasets
        a = self.a
        before = (_clean_metrics(trainer.evaluate(), a.task)
                  if eval_ds is not None and a.eval_before else {})
        if a.progress and before and is_main():
            print(f"before training: {before}", file=sys.stderr)
        t_train = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=last_ckpt)
        train_time = time.perf_counter() - t_train
        after = _clean_metrics(trainer.evaluate(), a.task) if eval_ds is not None else {}
        report = self._report(trainer, info, ex, len(train_ds), len(eval_ds) if eval_ds else 0,
                              before, after or {"train_loss": float(result.training_loss)},
                              train_time, last_ckpt)
        net = trainer.accelerator.unwrap_model(trainer.model)
        saved = self._tensors_to_save(net)  # every rank: gathering shards is collective
        report.wall_time_s = round(time.perf_counter() - self.t_start, 3)
        report.peak_rss_mib = round(_peak_rss_mib(), 1)
        if trainer.is_world_process_zero():
            write_outputs(self.out, lambda tmp: self._write_adapter(net, saved, tmp), report)
        return report

    def _tensors_to_save(self, net) -> dict:
        """Trained tensors and the fresh ones (the checkpoint lacked them), full; a sharded
        model gets them back as plain parameters so the adapter can be read from it."""
        fresh = set(getattr(net, build.FRESH, {}).values())
        tensors = fsdp.full_tensors(net, lambda n, p: p.requires_grad or n in fresh)
        if fsdp.is_sharded(net):
            fsdp.materialize(net, tensors)
        return tensors

    def _write_adapter(self, net, tensors: dict, tmp: Path) -> None:
        import shutil

        if self.a.method in ("rep", "adp"):
            from ..formats import write_adapter
            from ..adapters.files import adapter_from_model

            adapter = adapter_from_model(net)
            adapter.base_model_name_or_path = str(self.model_path)
            for key, t in build.fresh_tensors(net, tensors).items():
                adapter.tensors.setdefault(key, t)
            write_adapter(adapter, tmp / "adapter", force=True)
        elif self.a.method == "lora":
            net.save_pretrained(str(tmp / "adapter"))
        elif self.a.method == "full":  # a whole checkpoint (safetensors) + its tokenizer
            net.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
            self.tok.save_pretrained(str(tmp / "adapter"))
        else:
            (tmp / "adapter").mkdir()
            write_tensors({n: t for n, t in tensors.items()}, tmp / "adapter" / "head.safetensors")
        for f in (tmp / "adapter").iterdir():
            os.replace(f, tmp / f.name)
        shutil.rmtree(tmp / "adapter")

    def _report(self, trainer, info: dict, ex: Examples, n_train: int, n_eval: int,
                before: dict, after: dict, train_time: float, last_ckpt) -> TrainReport:
        a = self.a
        hyper = {**a.run_key(), "model": str(self.model_path), "data": ex.description,
                 "warmup_steps": self.warmup, "world_size": self.world, "fsdp": a.fsdp,
                 "autocast": str(info["autocast"]).replace("torch.", "") if info["autocast"]
                 else None}
        return TrainReport(
            output_dir=str(self.out), method=a.method, task=a.task, model=str(self.model_path),
            data=ex.description, seed=a.seed, steps=int(trainer.state.global_step),
            epochs=float(trainer.state.epoch or 0), train_examples=n_train, eval_examples=n_eval,
            metrics_before=before, metrics_after=after,
            trainable_params=sum(info["breakdown"].values()),
            trainable_breakdown=info["breakdown"], adapter_params=info["adapter_params"],
            lora_r8_equivalent_params=info["lora_eq"], total_params=info["total"],
            wall_time_s=0.0, train_time_s=round(train_time, 3), step_time_s=self.timer.median(),
            peak_rss_mib=0.0, resumed_from_step=int(last_ckpt.rsplit("-", 1)[-1])
            if last_ckpt else None, label2id=ex.label2id, hyperparameters=hyper)


def _classification_metrics(pred) -> dict[str, float]:
    import numpy as np

    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    y_hat = np.asarray(logits).argmax(-1)
    y = np.asarray(pred.label_ids)
    f1s = []
    for c in np.unique(np.concatenate([y, y_hat])):
        tp = np.sum((y_hat == c) & (y == c))
        denom = np.sum(y_hat == c) + np.sum(y == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(y_hat == y)), "f1_macro": float(np.mean(f1s))}


def _clean_metrics(metrics: dict, task: str) -> dict[str, float]:
    out = {k.removeprefix("eval_"): float(v) for k, v in metrics.items()
           if k in ("eval_loss", "eval_accuracy", "eval_f1_macro")}
    if task == "causal-lm" and "loss" in out:
        out["perplexity"] = float(math.exp(min(out["loss"], 50.0)))
    return out
