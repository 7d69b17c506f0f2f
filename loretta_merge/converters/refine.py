"""Data-aware refinement of an extracted adapter (TT or LoRA): a short distillation towards
the fine-tuned model's outputs on unlabelled text.

Extraction (:mod:`.extract`) fits each module's TT cores to its weight delta, one module at
a time, by the Frobenius norm: every direction of the delta counts the same, whether the
inputs the layer sees ever excite it or not. :func:`distill_modules` then trains the
TT cores (or LoRA factors) of every module together so that the model's outputs match the fine-tune's on some
unlabelled inputs (KL divergence of the class distributions for a classifier, mean squared
error of the outputs otherwise). No label is read. It stops at ``max_steps`` or at the
``seconds`` time budget, whichever comes first, shows a progress bar on stderr, and returns
the refined modules (new objects; the inputs are left as they were) with a record of the run.

The student is the fine-tuned model itself with each targeted Linear's weight replaced by
``W0`` (the base's) and the adapter's delta added in the forward pass, so everything the
adapter carries whole (norms, biases, a head) is the fine-tune's and stays fixed.

:func:`refine_adapter` is the checkpoint-level entry (``extract --refine-data``): it loads
the fine-tune and its tokenizer, reads the base's weights of the adapter's modules, tokenizes
the unlabelled texts (a data file's text column, or ``"embedded"``: the embedded Rotten
Tomatoes training snippets) and distils the adapter's modules in place of the extracted ones.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..formats import LoraModule, RepModule, TTMatrix


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


class LoraDeltaLinear(nn.Module):
    """``linear(x) + scale * (x @ A^T) @ B^T`` with trainable LoRA factors ``A (r, in)`` and
    ``B (out, r)``; the wrapped Linear (holding the base's weight) is frozen."""

    def __init__(self, linear: nn.Module, module: LoraModule):
        super().__init__()
        self.linear = linear
        for p in self.linear.parameters():
            p.requires_grad_(False)
        self.a = nn.Parameter(module.a.detach().float().clone())
        self.b = nn.Parameter(module.b.detach().float().clone())
        self.scale = float(module.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + ((x @ self.a.T.to(x.dtype)) @ self.b.T.to(x.dtype)) * self.scale

    def lora_module(self) -> LoraModule:
        return LoraModule(a=self.a.detach().clone(), b=self.b.detach().clone(), scale=self.scale)


def _wrap(linear: nn.Module, module) -> nn.Module:
    if isinstance(module, RepModule):
        return TTDeltaLinear(linear, module)
    if isinstance(module, LoraModule):
        return LoraDeltaLinear(linear, module)
    raise ConfigError(f"distillation refines LoRA or TT (LoRETTA_rep) modules, got "
                      f"{type(module).__name__}; pass one extracted with --to lora or --to tt")


def _unwrap(w: nn.Module):
    return w.rep_module() if isinstance(w, TTDeltaLinear) else w.lora_module()


def _is_linear(m) -> bool:
    """An ``nn.Linear`` or a GPT-2 style ``Conv1D`` (``x @ W + b``)."""
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None
                                        and m.weight.ndim == 2)


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


def distill_modules(model: nn.Module, modules: dict, base_weights: dict[str, torch.Tensor],
                    batches: Iterable[dict], *, lr: float = 1e-3, max_steps: int = 200,
                    seconds: float | None = 60.0, progress: bool = True,
                    teacher_outputs: list[torch.Tensor] | None = None) -> tuple[dict, DistillReport]:
    """Distil the TT or LoRA ``modules`` (``RepModule`` / ``LoraModule`` by module name in
    ``model``, the two may be mixed) towards ``model``'s own outputs.

    ``model``: the fine-tuned model (the teacher; it is modified in place while this runs and
    restored before it returns). ``base_weights``: the base's weight of each module, by module
    name, stored as the module stores its weight. ``batches``: model inputs (dicts of
    tensors), cycled; their labels, if any, are dropped. ``teacher_outputs``: the outputs to
    match, one per batch (default: ``model``'s own, computed once here). Classifier outputs (2-D) are matched by the KL divergence of
    their class distributions, token logits (3-D) by the KL per token over the tokens the
    attention mask keeps, anything else by the mean squared error.
    Returns ``(refined modules, DistillReport)``."""
    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}; pass a positive step count")
    if seconds is not None and not seconds > 0:
        raise ConfigError(f"seconds must be > 0, got {seconds}; pass a time budget in seconds or None")
    batches = [{k: v for k, v in b.items() if k not in ("labels", "label")} for b in batches]
    if not batches:
        raise ConfigError("distill_modules(batches=[]): distillation needs at least one batch of "
                          "unlabelled inputs; pass a non-empty list of tokenized batches")
    owners = dict(model.named_modules())
    missing = [n for n in modules if not _is_linear(owners.get(n))]
    if missing:
        raise ConfigError(f"{missing[0]} is not a Linear module of the model; pass the modules "
                          f"by their names in the model")
    for name in modules:   # all checked before the model is touched
        want, got = tuple(owners[name].weight.shape), tuple(base_weights[name].shape)
        if want != got:
            raise ConfigError(f"{name}: the base's weight has shape {got}, the model's {want}; "
                              f"pass the base of this fine-tune")
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
    wrapped: dict[str, nn.Module] = {}
    saved_w = {}
    for name, m in modules.items():
        lin = owners[name]
        saved_w[name] = lin.weight.data
        lin.weight.data = base_weights[name].to(lin.weight.dtype)
        wrapped[name] = _wrap(lin, m)
        parent, _, child = name.rpartition(".")
        setattr(owners[parent] if parent else model, child, wrapped[name])
    rep = DistillReport()
    try:
        params = [p for w in wrapped.values() for p in w.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        kind = {2: "classes", 3: "tokens"}.get(targets[0].ndim, "mse")
        start = time.perf_counter()
        bar = _bar(max_steps, progress)
        for step in range(max_steps):
            i = step % len(batches)
            out = _outputs(model(**batches[i]))
            if kind == "classes":
                loss = nn.functional.kl_div(out.log_softmax(-1), targets[i].log_softmax(-1),
                                            log_target=True, reduction="batchmean")
            elif kind == "tokens":
                per = nn.functional.kl_div(out.float().log_softmax(-1), targets[i].float().log_softmax(-1),
                                           log_target=True, reduction="none").sum(-1)
                mask = batches[i].get("attention_mask")
                mask = torch.ones_like(per) if mask is None else mask.to(per.dtype)
                loss = (per * mask).sum() / mask.sum().clamp_min(1)
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
        refined = {n: _unwrap(w) for n, w in wrapped.items()}
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


# --------------------------------------------------------------------------- checkpoints

EMBEDDED = "embedded"


def unlabelled_texts(data: str, *, text_column: str = "text", limit: int | None = None) -> list[str]:
    """The texts to distil on: ``"embedded"`` (the embedded Rotten Tomatoes training snippets,
    never its test movies) or a data file's ``text_column`` (.csv/.tsv/.jsonl/.json/.parquet;
    any label column is ignored). ``limit``: the first this many."""
    from ..datafiles import column_texts, read_rows

    if data == EMBEDDED:
        from ..embedded import rotten_tomatoes

        texts = [r["text"] for r in rotten_tomatoes()[0]]
    else:
        texts = column_texts(read_rows(data), column=text_column, source=f"--refine-data {data}")
    return texts[:limit] if limit else texts


def refine_options_without_data(given: dict) -> None:
    """Refuse ``--refine-*`` options (``RefineOptions`` field names) given without
    ``--refine-data`` (they would do nothing)."""
    if given:
        field_name = next(iter(given))
        flag = "--refine-" + {"max_steps": "steps"}.get(field_name, field_name).replace("_", "-")
        raise ConfigError(f"{flag} tunes the distillation, which only runs with --refine-data "
                          f"FILE|embedded; add --refine-data or drop {flag}")


def check_refine_options(*, seconds: float | None, max_steps: int, lr: float, batch_size: int,
                         max_length: int) -> None:
    """One-line refusals of the refinement's numbers (before any work)."""
    if seconds is not None and not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"--refine-seconds must be a positive number of seconds, got {seconds!r}; "
                          f"pass e.g. --refine-seconds 60")
    for flag, value in (("--refine-steps", max_steps), ("--refine-batch-size", batch_size),
                        ("--refine-max-length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} must be an integer >= 1, got {value!r}; pass a positive integer")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--refine-lr must be > 0, got {lr!r}; pass e.g. --refine-lr 1e-3")


@dataclass
class RefineOptions:
    """``extract(..., refine=RefineOptions(data=...))``: distil the extracted modules on
    ``data`` (a file or ``"embedded"``) for at most ``seconds`` / ``max_steps``."""

    data: str
    seconds: float | None = 60.0
    max_steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    max_length: int = 128
    text_column: str = "text"
    max_texts: int | None = None
    progress: bool = True

    def texts(self) -> list[str]:
        """Checks the numbers, then reads the texts (one-line errors, before any work)."""
        check_refine_options(seconds=self.seconds, max_steps=self.max_steps, lr=self.lr,
                             batch_size=self.batch_size, max_length=self.max_length)
        if self.max_texts is not None and (isinstance(self.max_texts, bool) or self.max_texts < 1):
            raise ConfigError(f"--refine-max-texts must be >= 1, got {self.max_texts!r}; pass a "
                              f"positive count or leave it out")
        texts = unlabelled_texts(self.data, text_column=self.text_column, limit=self.max_texts)
        if not texts:
            raise ConfigError(f"--refine-data {self.data} holds no text; pass a file with at least one row")
        return texts


def _load_teacher(finetuned, base):
    """The fine-tune as its architecture class (fp32, eval, pooled as trained) and the
    tokenizer saved with it (else with the base)."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from ..pooling import apply_pooling
    from ..io import TOKENIZER_FILES, has_tokenizer

    config = AutoConfig.from_pretrained(str(finetuned))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    model = (cls or AutoModel).from_pretrained(str(finetuned), torch_dtype=torch.float32)
    model = apply_pooling(model).eval()
    source = next((Path(d) for d in (finetuned, base)
                   if has_tokenizer(d)), None)
    if source is None:
        raise ConfigError(f"--refine-data needs a tokenizer: neither {finetuned} nor {base} holds "
                          f"one ({', '.join(TOKENIZER_FILES[:3])}, ...); save the tokenizer "
                          f"beside the fine-tune")
    tok = AutoTokenizer.from_pretrained(str(source))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model, tok


def refine_adapter(adapter, base, finetuned, texts: list[str], *, seconds: float | None = 60.0,
                   max_steps: int = 200, lr: float = 1e-3, batch_size: int = 16,
                   max_length: int = 128, progress: bool = True) -> tuple[dict, DistillReport]:
    """Distil an extracted ``adapter``'s modules (LoRA or TT) towards ``finetuned``'s outputs
    on ``texts`` (unlabelled): the modules are replaced in ``adapter`` (in place) and the
    ``DistillReport`` returned beside a record for the extract report.

    The teacher is the fine-tune; the student the fine-tune with each module's weight set to
    the base's plus the adapter's delta (what the adapter carries whole is the fine-tune's)."""
    from ..io import CheckpointReader

    check_refine_options(seconds=seconds, max_steps=max_steps, lr=lr, batch_size=batch_size,
                         max_length=max_length)
    if not texts:
        raise ConfigError("--refine-data holds no text; pass a file with at least one row")
    model, tok = _load_teacher(finetuned, base)
    owners = dict(model.named_modules())
    missing = [n for n in adapter.modules if n not in owners]
    if missing:
        raise ConfigError(f"{missing[0]}: the adapter's module is not in {finetuned}'s "
                          f"{type(model).__name__} (its module names differ from the "
                          f"checkpoint's keys); refinement needs a model whose modules carry the "
                          f"checkpoint's names: leave out --refine-data")
    with CheckpointReader(base) as r:
        base_w = {n: r.get(n + ".weight").float() for n in adapter.modules}
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:   # the model's own limit caps --refine-max-length
        max_length = min(max_length, int(positions))
    batches = [dict(tok(texts[i:i + batch_size], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt"))
               for i in range(0, len(texts), batch_size)]
    refined, rep = distill_modules(model, adapter.modules, base_w, batches, lr=lr,
                                   max_steps=max_steps, seconds=seconds, progress=progress)
    with CheckpointReader(finetuned) as r:   # each module's delta error after refinement
        errors = {}
        for n, m in refined.items():
            d = r.get(n + ".weight").float() - base_w[n]
            if n in adapter.fan_in_fan_out:
                d = d.T
            approx = m.delta().T                         # (out, in), LoRA or TT
            errors[n] = float(torch.linalg.matrix_norm(d - approx) / torch.linalg.matrix_norm(d).clamp_min(1e-30))
    adapter.modules.update(refined)
    record = {"texts": len(texts), "batches": len(batches), "batch_size": batch_size,
              "max_length": max_length, "lr": lr, "steps": rep.steps,
              "seconds": round(rep.seconds, 2), "time_budget_s": seconds, "max_steps": max_steps,
              "stopped_by": rep.stopped_by, "loss_first": rep.loss_first, "loss_last": rep.loss_last,
              "delta_errors": errors}
    return record, rep
