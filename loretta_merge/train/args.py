"""The arguments of a training run: one dataclass, validated before anything is read.

:class:`TrainArgs` holds every option of ``loretta-merge train`` (the command builds one)
and of :func:`loretta_merge.train.train` (its keyword arguments are these fields). Each
field carries its help text, which the command line shows. :meth:`TrainArgs.check` applies
every rule that needs no file and no model (ranges, flag combinations, the launcher that
``--fsdp`` needs, what mixed precision the device supports), so a wrong option fails in
milliseconds with one line naming the flag and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import ConfigError

METHODS = ("rep", "adp", "lora", "head", "full")
TASKS = ("seq-cls", "causal-lm")

# The embedded default's budget (used only where the caller leaves the value at None):
# 2,000 training snippets (a fixed subset, the same for every seed), 1 epoch at batch 8
# = 250 steps at max length 64; mean pooling (MiniLM is a sentence-transformers model, see
# --pooling auto). The learning rate is the one benchmarks/bench_train.py --budget demo
# chose for rep on its validation movies (never the test split): 2e-3 / 5e-3 / 1e-2 gave
# validation accuracy 0.779 / 0.783 / 0.675 (benchmarks/results/train_demo.json).
DEFAULT_BUDGET = dict(max_train_samples=2000, epochs=1.0, max_length=64, learning_rate=5e-3)
POOLINGS = ("auto", "mean", "none")
# The paper's recipe (LORETTA.md section 4) for everything else.
PAPER = dict(epochs=10.0, batch_size=8, learning_rate=1e-4, warmup_steps=500, max_length=128)


def _opt(default: Any, help: str, flag: str | None = None) -> Any:
    """A dataclass field with its help text and command-line flag in the metadata."""
    meta = {"help": help, "flag": flag}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainArgs:
    """Every option of a training run. ``None`` means "the default for this run"
    (the paper's recipe, or :data:`DEFAULT_BUDGET` for the embedded default)."""

    model: str | os.PathLike | None = _opt(None, "Local transformers model directory "
                                           "(default: the embedded MiniLM).", "--model")
    method: str = _opt("rep", "LoRETTA_rep (TT LoRA factors) or LoRETTA_adp (TT bottleneck "
                       "adapters).", "--method")
    task: str = _opt("seq-cls", "seq-cls (sequence classification) or causal-lm.", "--task")
    train_file: str | os.PathLike | None = _opt(None, "CSV, TSV, JSONL, JSON or Parquet "
                                                "(default: the embedded Rotten Tomatoes split).",
                                                "--train-file")
    eval_file: str | os.PathLike | None = _opt(None, "Evaluation data (default: a fixed "
                                               "--eval-split of the train file).", "--eval-file")
    output_dir: str | os.PathLike = _opt("loretta-adapter", "Adapter directory (checkpoints go "
                                         "in OUTPUT/checkpoints).", "--output")
    text_column: str = _opt("text", "Column with the text.", "--text-column")
    text_pair_column: str | None = _opt(None, "seq-cls: column with the second sentence of a "
                                        "pair (GLUE MRPC/RTE/QNLI style).", "--text-pair-column")
    label_column: str = _opt("label", "seq-cls labels: integer ids or class names.",
                             "--label-column")
    prompt_column: str | None = _opt(None, "causal-lm: the prompt (no loss on it).",
                                     "--prompt-column")
    response_column: str | None = _opt(None, "causal-lm: the response (the loss).",
                                       "--response-column")
    tokenizer: str | os.PathLike | None = _opt(None, "Tokenizer directory (default: the "
                                               "model's own).", "--tokenizer")
    num_labels: int | None = _opt(None, "Classes of a fresh head (default: from the data or "
                                  "the model).", "--num-labels")
    epochs: float | None = _opt(None, "Default 10 (paper); 1 for the embedded default.",
                                "--epochs")
    batch_size: int = _opt(PAPER["batch_size"], "Examples per step and process.", "--batch-size")
    learning_rate: float | None = _opt(None, "Default 1e-4 (paper); 2e-3 for the embedded "
                                       "default's short budget.", "--lr")
    warmup_steps: int | None = _opt(None, "Default min(500, a tenth of the steps).",
                                    "--warmup-steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay.", None)
    max_length: int | None = _opt(None, "Tokens per example; default 128 (paper), 64 for the "
                                  "embedded default.", "--max-length")
    seed: int = _opt(0, "Seed of the initialisation, the data order and dropout.", "--seed")
    eval_split: float = _opt(0.1, "Fraction of the train file held out when there is no "
                             "--eval-file (0: none).", "--eval-split")
    max_steps: int | None = _opt(None, "Stop after this many steps.", "--max-steps")
    max_train_samples: int | None = _opt(None, "Train on a fixed subset (default 2000 for the "
                                         "embedded default).", "--max-train-samples")
    max_eval_samples: int | None = _opt(None, "Evaluate on a fixed subset of the eval data "
                                        "(default: all of it).", "--max-eval-samples")
    eval_batch_size: int = _opt(64, "Examples per evaluation step.", None)
    r: int = _opt(8, "rep: LoRA rank.", "--r")
    lora_alpha: float = _opt(16.0, "rep: scale numerator.", "--lora-alpha")
    tensor_rank: int = _opt(5, "TT rank of every core.", "--tensor-rank")
    bottleneck: int = _opt(64, "adp: bottleneck width.", "--bottleneck")
    train_norms: bool = _opt(True, "Train LayerNorm/RMSNorm weights.", "--no-train-norms")
    replace_dense: bool | None = _opt(None, "seq-cls: replace the pooler/classifier dense by "
                                      "a TT layer (paper: yes).", "--replace-dense")
    pooling: str = _opt("auto", "seq-cls pooling: 'auto' mean-pools when the base is a "
                        "sentence-transformers model that was trained so (1_Pooling/config.json "
                        "says mean), else keeps the model's own; 'mean'; 'none' keeps the model's "
                        "own (BERT: first token + pooler dense). Recorded in the adapter; a merged "
                        "model says it in config.json (loretta_pooling).", "--pooling")
    init: str = _opt("paper", "Initialisation of the TT cores.", None)
    target_modules: Sequence[str] | str | None = _opt(None, "rep: modules to adapt (names or "
                                                      "suffixes; default per architecture).",
                                                      "--target-modules")
    save_steps: int | None = _opt(None, "Checkpoint every N steps (default: a tenth of the run).",
                                  "--save-steps")
    logging_steps: int = _opt(25, "Log the loss every N steps.", None)
    bf16: bool = _opt(False, "Mixed precision: autocast to bfloat16; trained tensors stay "
                      "float32 (master weights).", "--bf16")
    fp16: bool = _opt(False, "Mixed precision: autocast to float16 (CUDA only); trained "
                      "tensors stay float32 (master weights).", "--fp16")
    fsdp: bool = _opt(False, "Shard the model over the processes of a torchrun/accelerate "
                      "launch with PyTorch FSDP (fully_shard).", "--fsdp")
    resume: bool = _opt(True, "Continue from the last checkpoint in OUTPUT/checkpoints.",
                        "--resume")
    force: bool = _opt(False, "Overwrite an existing adapter / restart checkpoints.", "--force")
    progress: bool = _opt(True, "Show progress (steps, loss, time left) on stderr.", None)
    eval_before: bool = _opt(True, "Evaluate once before training too.", None)

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field ``name`` (the command line shows it)."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}[name]

    @property
    def default_data(self) -> bool:
        return self.train_file is None

    def resolved(self) -> "TrainArgs":
        """A copy with every ``None`` budget filled in (the embedded default's budget or the
        paper's recipe), checked. The caller's object is left as it was."""
        a = dataclasses.replace(self)
        budget = DEFAULT_BUDGET if a.default_data else {}
        if a.epochs is None:
            a.epochs = budget.get("epochs", PAPER["epochs"])
        if a.learning_rate is None:
            a.learning_rate = budget.get("learning_rate", PAPER["learning_rate"])
        if a.max_length is None:
            a.max_length = budget.get("max_length", PAPER["max_length"])
        if a.max_train_samples is None and a.max_steps is None:
            a.max_train_samples = budget.get("max_train_samples")
        if a.model is None and a.replace_dense is None:
            # MiniLM keeps its pretrained pooler (frozen, as LoRA's baseline does): replacing
            # it by a fresh TT layer measured 0.719 +- 0.033 against 0.743 +- 0.018 kept
            a.replace_dense = False
        if accelerate_fsdp_launch():
            a.fsdp = True  # `accelerate launch` with an FSDP config: our fully_shard path
        if isinstance(a.target_modules, str) and "," in a.target_modules:
            a.target_modules = [t.strip() for t in a.target_modules.split(",") if t.strip()]
        a.check()
        return a

    def check(self) -> None:
        """Every rule that needs no file and no model; raises ConfigError (one line)."""
        _check_choices(self)
        _check_numbers(self)
        _check_precision(self)
        _check_distributed(self)

    def run_key(self) -> dict[str, Any]:
        """What must match for checkpoints to be resumed (the hyperparameters of the run)."""
        keys = ("method", "task", "epochs", "batch_size", "learning_rate", "max_length", "seed",
                "max_steps", "max_train_samples", "r", "lora_alpha", "tensor_rank", "bottleneck",
                "train_norms", "replace_dense", "init", "weight_decay", "text_pair_column",
                "pooling")
        out = {k: getattr(self, k) for k in keys}
        tm = self.target_modules
        out["target_modules"] = list(tm) if isinstance(tm, (list, tuple)) else tm
        return out


def _check_choices(a: TrainArgs) -> None:
    if a.method not in METHODS:
        raise ConfigError(f"--method must be one of {list(METHODS[:2])} (or the baselines "
                          f"'lora', 'head', 'full'), got {a.method!r}; pass --method rep or "
                          f"--method adp")
    if a.method == "full":
        _check_full(a)
    if a.task not in TASKS:
        raise ConfigError(f"--task must be 'seq-cls' or 'causal-lm', got {a.task!r}; pass --task seq-cls or --task causal-lm")
    if a.default_data and a.task != "seq-cls":
        raise ConfigError("causal-lm training needs --train-file (the embedded default data "
                          "set is a classification task); pass --train-file with prompt/response or text data")
    if a.model is None and a.task == "causal-lm":
        raise ConfigError("causal-lm training needs --model DIR (the embedded MiniLM is an "
                          "encoder); pass --model with a local decoder checkpoint")
    if a.text_pair_column and a.task != "seq-cls":
        raise ConfigError("--text-pair-column is for seq-cls; drop it, and for causal-lm "
                          "pass --prompt-column and --response-column")
    if a.pooling not in POOLINGS:
        raise ConfigError(f"--pooling must be one of {list(POOLINGS)}, got {a.pooling!r}; pass "
                          f"--pooling auto (the default), mean or none")
    if a.pooling == "mean" and (a.task != "seq-cls" or a.method not in ("rep", "adp")):
        raise ConfigError("--pooling mean applies to seq-cls training with --method rep or adp; "
                          "drop --pooling (or pass --pooling none)")
    if a.target_modules is not None and a.method == "adp":
        raise ConfigError("--target-modules applies to --method rep; adp places its adapters "
                          "by architecture (drop --target-modules or use --method rep)")


def _check_full(a: TrainArgs) -> None:
    """``full`` trains every weight and writes a whole checkpoint: the options that shape an
    adapter mean nothing for it, and are refused rather than ignored."""
    adapter_only = [flag for flag, set_ in (
        ("--target-modules", a.target_modules is not None),
        ("--r", a.r != 8), ("--lora-alpha", a.lora_alpha != 16.0),
        ("--tensor-rank", a.tensor_rank != 5), ("--bottleneck", a.bottleneck != 64),
        ("--no-train-norms", not a.train_norms), ("--replace-dense", bool(a.replace_dense)),
        ("--pooling mean", a.pooling == "mean")) if set_]
    if adapter_only:
        raise ConfigError(f"--method full trains every weight of the model and writes a whole "
                          f"checkpoint, so {', '.join(adapter_only)} (adapter options) mean "
                          f"nothing for it; drop them, or pass --method rep, adp or lora")


_POSITIVE = {"epochs": "--epochs", "batch_size": "--batch-size", "learning_rate": "--lr",
             "max_length": "--max-length", "max_steps": "--max-steps",
             "max_train_samples": "--max-train-samples", "max_eval_samples": "--max-eval-samples",
             "save_steps": "--save-steps", "num_labels": "--num-labels", "r": "--r",
             "tensor_rank": "--tensor-rank", "bottleneck": "--bottleneck",
             "eval_batch_size": "eval_batch_size", "logging_steps": "logging_steps"}


def _check_numbers(a: TrainArgs) -> None:
    for name, flag in _POSITIVE.items():
        value = getattr(a, name)
        if value is not None and not value > 0:
            hint = " (a budget of 0 yields zero training steps)" if name in (
                "epochs", "max_steps", "max_train_samples") else ""
            raise ConfigError(f"{flag} ({name}) must be > 0, got {value!r}{hint}; pass a "
                              f"positive value")
    if a.warmup_steps is not None and a.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be >= 0, got {a.warmup_steps}; pass 0 or a positive number of steps")
    if not 0 <= a.eval_split < 1:
        raise ConfigError(f"--eval-split (eval_split) must be in [0, 1), got {a.eval_split!r}; "
                          "pass e.g. --eval-split 0.1, or --eval-file FILE")


def _check_precision(a: TrainArgs) -> None:
    if a.bf16 and a.fp16:
        raise ConfigError("--bf16 and --fp16 exclude each other; pass one of them")
    if a.fsdp and a.fp16:
        raise ConfigError("--fsdp runs mixed precision through FSDP, which has no float16 loss "
                          "scaling here; pass --bf16 with --fsdp instead of --fp16")
    if a.method in ("lora", "head", "full") and (a.bf16 or a.fp16 or a.fsdp):
        raise ConfigError(f"--bf16/--fp16/--fsdp are for --method rep or adp, not the "
                          f"{a.method!r} baseline; drop them, or pass --method rep or --method adp")
    import torch

    cuda = torch.cuda.is_available()
    if a.fp16 and not cuda:
        raise ConfigError("--fp16 needs a CUDA GPU (float16 autocast with loss scaling); this "
                          "machine has none: pass --bf16 instead (bfloat16 autocast runs on CPU)")
    if a.bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--bf16: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 "
                          "support; pass --fp16 instead")


def launched_distributed() -> bool:
    """Whether a distributed launcher (torchrun, accelerate launch) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def accelerate_fsdp_launch() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _check_distributed(a: TrainArgs) -> None:
    if a.fsdp and not launched_distributed():
        raise ConfigError("--fsdp shards the model over the processes of a distributed launch, "
                          "and this process was not started by one; run `torchrun "
                          "--nproc_per_node N -m loretta_merge.cli train --fsdp ...` (or "
                          "`accelerate launch`), or drop --fsdp")
