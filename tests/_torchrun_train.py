"""Run by tests/test_torchrun.py under ``torch.distributed.run`` (2 CPU processes, gloo).

Each rank trains the same tiny model for a few steps through :func:`loretta_merge.train.train`
and dumps its trained tensors to ``<dump_dir>/rank<RANK>.safetensors`` so the test can check
that data-parallel training kept the ranks identical.
"""

import os
import sys

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


if __name__ == "__main__":
    main(*sys.argv[1:5])
