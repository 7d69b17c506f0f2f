"""``loretta-merge train``: fine-tune with LoRETTA (builds a :class:`TrainArgs` and runs
:func:`loretta_merge.train.train`). Help texts come from the dataclass's fields."""

from __future__ import annotations

import json

import click

from ..train.args import TrainArgs

H = TrainArgs.help


def _default_targets_help() -> str:
    from ..adapters.config import REP_TARGETS

    by_targets: dict[str, list[str]] = {}
    for model_type, targets in REP_TARGETS.items():
        by_targets.setdefault(",".join(targets), []).append(model_type)
    shown = "; ".join(f"{'/'.join(types)}: {t}" for t, types in by_targets.items())
    return (f"rep: modules to adapt, comma-separated names or suffixes (default per "
            f"architecture: {shown}).")


@click.command("train", epilog="With no --model and no --train-file it fine-tunes the embedded "
               "default (MiniLM on Rotten Tomatoes, a few minutes on 2 CPU cores).\n\n"
               "Several processes: `torchrun --nproc_per_node N -m loretta_merge.cli train ...` "
               "or `accelerate launch -m loretta_merge.cli train ...` (data parallel; add "
               "--fsdp to shard the model).")
@click.option("--model", "model", type=click.Path(exists=True, file_okay=False), default=None,
              help=H("model"))
@click.option("--method", type=click.Choice(["rep", "adp"]), default="rep", show_default=True,
              help=H("method"))
@click.option("--task", type=click.Choice(["seq-cls", "causal-lm"]), default="seq-cls",
              show_default=True, help=H("task"))
@click.option("--train-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help=H("train_file"))
@click.option("--eval-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help=H("eval_file"))
@click.option("--eval-split", type=float, default=0.1, show_default=True, help=H("eval_split"))
@click.option("--text-column", default="text", show_default=True, help=H("text_column"))
@click.option("--text-pair-column", default=None, help=H("text_pair_column"))
@click.option("--label-column", default="label", show_default=True, help=H("label_column"))
@click.option("--prompt-column", default=None, help=H("prompt_column"))
@click.option("--response-column", default=None, help=H("response_column"))
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), default=None,
              help=H("tokenizer"))
@click.option("--num-labels", type=int, default=None, help=H("num_labels"))
@click.option("-o", "--output", "output_dir", type=click.Path(), default="loretta-adapter",
              show_default=True, help=H("output_dir"))
@click.option("--epochs", type=float, default=None, help=H("epochs"))
@click.option("--batch-size", type=int, default=8, show_default=True, help=H("batch_size"))
@click.option("--lr", "learning_rate", type=float, default=None, help=H("learning_rate"))
@click.option("--warmup-steps", type=int, default=None, help=H("warmup_steps"))
@click.option("--max-length", type=int, default=None, help=H("max_length"))
@click.option("--max-steps", type=int, default=None, help=H("max_steps"))
@click.option("--max-train-samples", type=int, default=None, help=H("max_train_samples"))
@click.option("--max-eval-samples", type=int, default=None, help=H("max_eval_samples"))
@click.option("--seed", type=int, default=0, show_default=True, help=H("seed"))
@click.option("--r", type=int, default=8, show_default=True, help=H("r"))
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help=H("lora_alpha"))
@click.option("--tensor-rank", type=int, default=5, show_default=True, help=H("tensor_rank"))
@click.option("--bottleneck", type=int, default=64, show_default=True, help=H("bottleneck"))
@click.option("--target-modules", default=None, help=_default_targets_help())
@click.option("--no-train-norms", is_flag=True, help="Keep LayerNorm/RMSNorm frozen.")
@click.option("--replace-dense/--no-replace-dense", default=None, help=H("replace_dense"))
@click.option("--pooling", type=click.Choice(["auto", "mean", "none"]), default="auto",
              show_default=True, help=H("pooling"))
@click.option("--bf16", is_flag=True, help=H("bf16"))
@click.option("--fp16", is_flag=True, help=H("fp16"))
@click.option("--fsdp", is_flag=True, help=H("fsdp") + " Needs `torchrun`.")
@click.option("--save-steps", type=int, default=None, help=H("save_steps"))
@click.option("--resume/--no-resume", default=True, show_default=True, help=H("resume"))
@click.option("--force", is_flag=True, help=H("force"))
@click.option("--json", "as_json", is_flag=True,
              help="Print the full summary as JSON on stdout (progress stays on stderr).")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no summary lines.")
def train_command(as_json: bool, quiet: bool, no_train_norms: bool, target_modules, **options):
    """Fine-tune a model with LoRETTA_rep or LoRETTA_adp and write the adapter.

    \b
    Examples:
      loretta-merge train                                   # MiniLM + Rotten Tomatoes (embedded)
      loretta-merge train --method adp -o adp-adapter
      loretta-merge train --model ./roberta --train-file mrpc.csv \\
          --text-column sentence1 --text-pair-column sentence2 -o mrpc-adapter
      loretta-merge train --model ./llama --task causal-lm --train-file chat.jsonl \\
          --prompt-column prompt --response-column response --bf16 -o llama-adapter
    """
    import contextlib
    import sys

    from ..train import train

    targets = [t.strip() for t in target_modules.split(",") if t.strip()] if target_modules else None
    args = TrainArgs(**options, train_norms=not no_train_norms, target_modules=targets,
                     progress=not quiet and sys.stderr.isatty())
    # with --json, stdout carries only the summary: progress and logs go to stderr
    redirect = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with redirect:
        report = train(args)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        _print_summary(report)


def _print_summary(report) -> None:
    m0, m1 = report.metrics_before, report.metrics_after
    click.echo(f"trained {report.method} on {report.train_examples} examples, {report.steps} steps "
               f"in {report.train_time_s:.0f} s; adapter written to {report.output_dir}")
    for key in ("accuracy", "f1_macro", "loss", "perplexity"):
        if key in m1:
            before = f"{m0[key]:.4f} -> " if key in m0 else ""
            click.echo(f"  eval {key}: {before}{m1[key]:.4f}")
    click.echo(f"  trainable parameters: {report.trainable_params:,} "
               f"({', '.join(f'{k} {v:,}' for k, v in report.trainable_breakdown.items())}); "
               f"peak RSS {report.peak_rss_mib:.0f} MiB")
