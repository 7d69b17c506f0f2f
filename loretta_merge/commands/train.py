"""``loretta-merge train``: fine-tune with LoRETTA (a thin layer over :func:`loretta_merge.train.train`)."""

from __future__ import annotations

import json

import click


@click.command("train", epilog="With no --model and no --train-file it fine-tunes the embedded "
               "default (MiniLM on Rotten Tomatoes, a few minutes on 2 CPU cores).\n\n"
               "Several processes: `torchrun --nproc_per_node N -m loretta_merge.cli train ...` "
               "or `accelerate launch -m loretta_merge.cli train ...` (data parallel).")
@click.option("--model", "model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local transformers model directory (default: the embedded MiniLM).")
@click.option("--method", type=click.Choice(["rep", "adp"]), default="rep", show_default=True,
              help="LoRETTA_rep (TT LoRA factors) or LoRETTA_adp (TT bottleneck adapters).")
@click.option("--task", type=click.Choice(["seq-cls", "causal-lm"]), default="seq-cls",
              show_default=True)
@click.option("--train-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV, TSV, JSONL or Parquet (default: the embedded Rotten Tomatoes split).")
@click.option("--eval-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Evaluation data (default: a fixed --eval-split of the train file).")
@click.option("--eval-split", type=float, default=0.1, show_default=True,
              help="Fraction of the train file held out when there is no --eval-file (0: none).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True,
              help="seq-cls labels: integer ids or class names.")
@click.option("--prompt-column", default=None, help="causal-lm: the prompt (no loss on it).")
@click.option("--response-column", default=None, help="causal-lm: the response (the loss).")
@click.option("--num-labels", type=int, default=None,
              help="Classes of a fresh head (default: from the data or the model).")
@click.option("-o", "--output", "output", type=click.Path(), default="loretta-adapter",
              show_default=True, help="Adapter directory (checkpoints go in OUTPUT/checkpoints).")
@click.option("--epochs", type=float, default=None,
              help="Default 10 (paper); 1 for the embedded default.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Per process.")
@click.option("--lr", "learning_rate", type=float, default=None,
              help="Default 1e-4 (paper); 2e-3 for the embedded default's short budget.")
@click.option("--warmup-steps", type=int, default=None,
              help="Default min(500, a tenth of the steps).")
@click.option("--max-length", type=int, default=None,
              help="Tokens per example; default 128 (paper), 64 for the embedded default.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps.")
@click.option("--max-train-samples", type=int, default=None,
              help="Train on a fixed subset (default 2000 for the embedded default).")
@click.option("--max-eval-samples", type=int, default=None,
              help="Evaluate on a fixed subset of the eval data (default: all of it).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--r", type=int, default=8, show_default=True, help="rep: LoRA rank.")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="rep: scale numerator.")
@click.option("--tensor-rank", type=int, default=5, show_default=True, help="TT rank of every core.")
@click.option("--bottleneck", type=int, default=64, show_default=True, help="adp: bottleneck width.")
@click.option("--no-train-norms", is_flag=True, help="Keep LayerNorm/RMSNorm frozen.")
@click.option("--replace-dense/--no-replace-dense", default=None,
              help="seq-cls: replace the pooler/classifier dense by a TT layer (paper: yes).")
@click.option("--save-steps", type=int, default=None, help="Checkpoint every N steps.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the last checkpoint in OUTPUT/checkpoints.")
@click.option("--force", is_flag=True, help="Overwrite an existing adapter / restart checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train_command(model, method, task, train_file, eval_file, eval_split, text_column,
                  label_column, prompt_column, response_column, num_labels, output, epochs,
                  batch_size, learning_rate, warmup_steps, max_length, max_steps,
                  max_train_samples, max_eval_samples, seed, r, lora_alpha, tensor_rank, bottleneck,
                  no_train_norms, replace_dense, save_steps, resume, force, as_json, quiet):
    """Fine-tune a model with LoRETTA_rep or LoRETTA_adp and write the adapter.

    \b
    Examples:
      loretta-merge train                                   # MiniLM + Rotten Tomatoes (embedded)
      loretta-merge train --method adp -o adp-adapter
      loretta-merge train --model ./llama --task causal-lm --train-file chat.jsonl \\
          --prompt-column prompt --response-column response -o llama-adapter
    """
    import contextlib
    import sys

    from ..train import train

    # with --json, stdout carries only the summary: progress and logs go to stderr
    redirect = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with redirect:
        report = train(model=model, method=method, task=task, train_file=train_file,
                       eval_file=eval_file, eval_split=eval_split, output_dir=output,
                       text_column=text_column, label_column=label_column,
                       prompt_column=prompt_column, response_column=response_column,
                       num_labels=num_labels, epochs=epochs, batch_size=batch_size,
                       learning_rate=learning_rate, warmup_steps=warmup_steps, max_length=max_length,
                       max_steps=max_steps, max_train_samples=max_train_samples,
                       max_eval_samples=max_eval_samples, seed=seed, r=r,
                       lora_alpha=lora_alpha, tensor_rank=tensor_rank, bottleneck=bottleneck,
                       train_norms=not no_train_norms, replace_dense=replace_dense,
                       save_steps=save_steps, resume=resume,
                       force=force, progress=not quiet and sys.stderr.isatty())
    summary = report.to_dict()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if quiet:
        return
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
