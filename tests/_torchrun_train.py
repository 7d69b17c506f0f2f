"""Run by tests/test_torchrun.py under ``torch.distributed.run`` (2 CPU processes, gloo).

One launch runs every job listed in the JSON file given as its argument, in order (a launch
costs each process ~6 CPU-seconds of imports): ``{"mode": "dp" | "fsdp" | "fsdp-bf16",
"model", "data", "out"[, "dumps"]}``. A job that raises writes its traceback to
``<out>.failed-rank<RANK>`` and ends the launch (exit 1), so the test of that job names it.

``dp`` mode: each rank trains the same tiny model for a few steps through
:func:`loretta_merge.train.train` and dumps its trained tensors to
``<dump_dir>/rank<RANK>.safetensors`` so the test can check that data-parallel training
kept the ranks identical.

``fsdp`` mode: in one launch, the data-parallel run into ``OUT/ddp``, the
same run sharded with ``--fsdp`` into ``OUT/fsdp``, and an FSDP run killed after its
checkpoint at step 2 then resumed into ``OUT/resumed``.
"""

import json
import os
import sys
import traceback

import torch

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402

from loretta_merge.train import train  # noqa: E402


def main(model_dir: str, train_file: str, output_dir: str, dump_dir: str) -> None:
    from transformers import TrainerCallback

    trained = {}

    class Grab(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            trained.update({n: p.detach().clone() for n, p in model.named_parameters()
                            if p.requires_grad})

    report = train(model=model_dir, method="rep", train_file=train_file, output_dir=output_dir,
                   eval_split=0.0, max_steps=3, batch_size=4, learning_rate=1e-2,
                   max_length=16, seed=0, progress=False, callbacks=[Grab()])
    rank = os.environ["RANK"]
    save_file(trained, os.path.join(dump_dir, f"rank{rank}.safetensors"),
              metadata={"world_size": str(report.hyperparameters["world_size"]),
                        "steps": str(report.steps)})


class _Killed(Exception):
    pass


def fsdp_suite(model_dir: str, train_file: str, output_dir: str) -> None:
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                raise _Killed()

    # no evaluation: evaluate() advances the dropout RNG differently under DDP and FSDP
    kw = dict(model=model_dir, method="rep", train_file=train_file, eval_split=0.0,
              max_steps=4, save_steps=2, batch_size=4, learning_rate=1e-2, max_length=16,
              seed=0, progress=False)
    train(output_dir=os.path.join(output_dir, "ddp"), **kw)
    report = train(output_dir=os.path.join(output_dir, "fsdp"), fsdp=True, **kw)
    assert report.hyperparameters["fsdp"] and report.hyperparameters["world_size"] == 2
    resumed = os.path.join(output_dir, "resumed")
    try:
        train(output_dir=resumed, fsdp=True, callbacks=[Kill()], **kw)
    except _Killed:
        pass
    else:
        raise SystemExit("the run was not interrupted")
    done = train(output_dir=resumed, fsdp=True, resume=True, **kw)
    assert done.resumed_from_step == 2 and done.steps == 4, done


def fsdp_bf16(model_dir: str, train_file: str, output_dir: str) -> None:
    """A bf16 base sharded with --fsdp --bf16, evaluated before and after (the forward
    without backward leaves the root unit gathered in bf16)."""
    report = train(model=model_dir, method="rep", task="causal-lm", train_file=train_file,
                   eval_split=0.25, max_steps=3, batch_size=4, learning_rate=1e-2,
                   max_length=16, seed=0, progress=False, fsdp=True, bf16=True,
                   output_dir=output_dir)
    assert report.hyperparameters["autocast"] == "bfloat16", report.hyperparameters


def run_jobs(jobs_file: str) -> None:
    with open(jobs_file) as f:
        jobs = json.load(f)
    for job in jobs:
        args = (job["model"], job["data"], job["out"])
        try:
            if job["mode"] == "dp":
                main(*args, job["dumps"])
            elif job["mode"] == "fsdp":
                fsdp_suite(*args)
            elif job["mode"] == "fsdp-bf16":
                fsdp_bf16(*args)
            else:
                raise SystemExit(f"unknown mode {job['mode']!r}")
        except BaseException:
            with open(f"{job['out']}.failed-rank{os.environ['RANK']}", "w") as f:
                f.write(traceback.format_exc())
            raise


if __name__ == "__main__":
    run_jobs(sys.argv[1])
