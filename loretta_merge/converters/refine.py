"""Data-aware refinement of an extracted TT adapter: a short distillation towards the
fine-tuned model's outputs on unlabelled text.

Extraction (:mod:`.extract`) fits each module's TT cores to its weight delta, one module at
a time, by the Frobenius norm: every direction of the delta counts the same, whether the
inputs the layer sees ever excite it or not. :func:`distill_rep_modules` then trains the
cores of every module together so that the model's outputs match the fine-tune's on some
unlabelled inputs (KL divergence of the class distributions for a classifier, mean squared
error of the outputs otherwise). No label is read. It stops at ``max_steps`` or at the
``seconds`` time budget, whichever comes first, shows a progress bar on stderr, and returns
the refined modules (new objects; the inputs are left as they were) with a record of the run.

The student is the fine-tuned model itself with each targeted Linear's weight replaced by
``W0`` (the base's) and the TT delta added in the forward pass, so everything the adapter
carries whole (norms, biases, a head) is the fine-tune's and stays fixed.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..formats import RepModule, TTMatrix


def _contract(cores, rows: int, cols: int) -> torch.Tensor:
    out = cores[0].reshape(-1, cores[0].shape[-1])
    for c in cores[1:]:
        out = (out @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
    return out.reshape(rows, cols)


class TTDeltaLinear(nn.Module):
    """``linear(x) + scale * (x @ A) @ B`` with trainable TT cores for ``A`` and ``B``; the
    wrapped Linear (holding the base's weight) is frozen."""

    def __init__(self, linear: nn.Linear, module: RepModule):
        super().__init__()
        self.linear = linear
        for p in self.linear.parameters():
            p.requires_grad_(False)
        self.cores_a = nn.ParameterList([nn.Parameter(c.detach().float().clone()) for c in module.a.cores])
        self.cores_b = nn.ParameterList([nn.Parameter(c.detach().float().clone()) for c in module.b.cores])
        self.shape_a, self.shape_b = (module.a.rows, module.a.cols), (module.b.rows, module.b.cols)
        self.scale = float(module.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _contract(list(self.cores_a), *self.shape_a)
        b = _contract(list(self.cores_b), *self.shape_b)
        return self.linear(x) + ((x @ a.to(x.dtype)) @ b.to(x.dtype)) * self.scale

    def rep_module(self) -> RepModule:
        return RepModule(a=TTMatrix(cores=[c.detach().clone() for c in self.cores_a], rows=self.shape_a[0],
                                    cols=self.shape_a[1]),
                         b=TTMatrix(cores=[c.detach().clone() for c in self.cores_b], rows=self.shape_b[0],
                                    cols=self.shape_b[1]), scale=self.scale)


@dataclass
class DistillReport:
    steps: int = 0
    seconds: float = 0.0
    stopped_by: str = ""
    loss_first: float | None = None
    loss_last: float | None = None
    losses: list[float] = field(default_factory=list)


def _outputs(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def distill_rep_modules(model: nn.Module, modules: dict[str, RepModule], base_weights: dict[str, torch.Tensor],
                        batches: Iterable[dict], *, lr: float = 1e-3, max_steps: int = 200,
                        seconds: float | None = 60.0, progress: bool = True,
                        teacher_outputs: list[torch.Tensor] | None = None
                        ) -> tuple[dict[str, RepModule], DistillReport]:
    """Distil the TT ``modules`` (by module name in ``model``) towards ``model``'s own outputs.

    ``model``: the fine-tuned model (the teacher; it is modified in place while this runs and
    restored before it returns). ``base_weights``: the base's weight of each module, by module
    name. ``batches``: model inputs (dicts of tensors), cycled; their labels, if any, are
    dropped. ``teacher_outputs``: the outputs to match, one per batch (default: ``model``'s
    own, computed once here). Returns ``(refined modules, DistillReport)``."""
    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}; pass a positive step count")
    if seconds is not None and not seconds > 0:
        raise ConfigError(f"seconds must be > 0, got {seconds}; pass a time budget in seconds or None")
    batches = [{k: v for k, v in b.items() if k not in ("labels", "label")} for b in batches]
    if not batches:
        raise ConfigError("distill_rep_modules(batches=[]): distillation needs at least one batch of "
                          "unlabelled inputs; pass a non-empty list of tokenized batches")
    owners = dict(model.named_modules())
    missing = [n for n in modules if not isinstance(owners.get(n), nn.Linear)]
    if missing:
        raise ConfigError(f"{missing[0]} is not a Linear module of the model; pass the modules "
                          f"by their names in the model")
    was_training = model.training
    model.eval()
    if teacher_outputs is not None and len(teacher_outputs) != len(batches):
        raise ConfigError(f"teacher_outputs has {len(teacher_outputs)} entries for {len(batches)} "
                          f"batches; pass one per batch (or none)")
    with torch.no_grad():  # the teacher's outputs, once per batch
        targets = ([t.detach() for t in teacher_outputs] if teacher_outputs is not None
                   else [_outputs(model(**b)).detach() for b in batches])
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    wrapped: dict[str, TTDeltaLinear] = {}
    saved_w = {}
    for name, m in modules.items():
        lin = owners[name]
        saved_w[name] = lin.weight.data
        lin.weight.data = base_weights[name].to(lin.weight.dtype)
        wrapped[name] = TTDeltaLinear(lin, m)
        parent, _, child = name.rpartition(".")
        setattr(owners[parent] if parent else model, child, wrapped[name])
    rep = DistillReport()
    try:
        params = [p for w in wrapped.values() for p in w.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        classify = targets[0].ndim == 2
        start = time.perf_counter()
        bar = _bar(max_steps, progress)
        for step in range(max_steps):
            i = step % len(batches)
            out = _outputs(model(**batches[i]))
            if classify:
                loss = nn.functional.kl_div(out.log_softmax(-1), targets[i].log_softmax(-1),
                                            log_target=True, reduction="batchmean")
            else:
                loss = nn.functional.mse_loss(out, targets[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ConfigError(f"distillation diverged at step {step + 1} (loss {value}); "
                                  f"pass a smaller lr")
            rep.losses.append(value)
            rep.steps = step + 1
            rep.seconds = time.perf_counter() - start
            bar(rep.steps, value, rep.seconds)
            if seconds is not None and rep.seconds >= seconds:
                rep.stopped_by = "time budget"
                break
        else:
            rep.stopped_by = "max_steps"
        bar(None, None, None)
        refined = {n: w.rep_module() for n, w in wrapped.items()}
    finally:
        for name, w in wrapped.items():  # the teacher back as it was
            parent, _, child = name.rpartition(".")
            setattr(owners[parent] if parent else model, child, w.linear)
            w.linear.weight.data = saved_w[name]
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    rep.loss_first = rep.losses[0] if rep.losses else None
    rep.loss_last = rep.losses[-1] if rep.losses else None
    return refined, rep


def _bar(total: int, on: bool):
    """A one-line progress bar on stderr: steps, loss, elapsed seconds."""
    def show(step, loss, secs):
        if not on:
            return
        if step is None:
            print(file=sys.stderr, flush=True)
            return
        done = int(20 * step / total)
        print(f"\rdistil [{'#' * done}{'.' * (20 - done)}] {step}/{total} loss {loss:.4f} "
              f"{secs:.0f} s", end="", file=sys.stderr, flush=True)
    return show
