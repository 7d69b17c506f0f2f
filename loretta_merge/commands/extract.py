"""`loretta-merge extract BASE FINETUNED -o OUT`: a low-rank adapter from a fine-tune."""

from __future__ import annotations

import click

from .options import force_option, json_option, rank_rule_options


def _targets(values: tuple[str, ...]) -> list[str] | str | None:
    """``--target-modules q_proj,v_proj --target-modules o_proj`` -> a list; ``all-linear``."""
    keys = [k.strip() for v in values for k in v.split(",") if k.strip()]
    if keys == ["all-linear"]:
        return "all-linear"
    return keys or None


@click.command("extract")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("finetuned", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Output adapter directory.")
@click.option("--to", "to", type=click.Choice(["lora", "tt"]), default="lora", show_default=True,
              help="PEFT LoRA, or a LoRETTA_rep (tensor-train) adapter.")
@rank_rule_options(
    rank="Rank of every module (with --energy/--eps: a cap).",
    energy="Keep the smallest rank whose squared singular values reach this fraction, in (0, 1].",
    eps="Keep the smallest rank whose relative Frobenius error is <= this, in (0, 1).")
@click.option("--target-modules", multiple=True,
              help="Module names or suffixes (comma-separated, repeatable), or all-linear. "
                   "Default: the architecture's defaults, all Linear weights when it has none.")
@click.option("--tensor-rank", type=int, default=5, show_default=True,
              help="--to tt: maximum inner TT rank of each factor.")
@click.option("--shapes", type=click.Choice(["paper", "auto"]), default="paper", show_default=True,
              help="--to tt: TT mode shapes.")
@click.option("--fit-steps", type=int, default=300, show_default=True,
              help="--to tt: fit the cores to the delta after TT-SVD (alternating least squares "
                   "for small cores, else this many Adam steps); 0: TT-SVD only.")
@click.option("--fit-to", type=click.Choice(["svd", "delta"]), default="svd", show_default=True,
              help="--to tt: fit the cores to the rank-k truncated SVD, or to the delta itself "
                   "(its full SVD: a lower error against the delta, a slower fit).")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto",
              show_default=True,
              help="auto: a randomized SVD for a fixed --rank well below a module's size (its "
                   "error is measured and reported), else the exact SVD.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the deltas are formed and decomposed: cpu, cuda, cuda:N or auto "
                   "(the checkpoints are read on the CPU; --to tt fits its cores there).")
@click.option("--refine-data", default=None, metavar="FILE|embedded",
              help="After extraction, distil the adapter (LoRA or TT) towards FINETUNED's outputs "
                   "on these unlabelled texts (a .csv/.tsv/.jsonl/.json/.parquet file's text "
                   "column, labels ignored; 'embedded': the embedded Rotten Tomatoes training "
                   "snippets). Needs a tokenizer saved with FINETUNED or BASE.")
@click.option("--refine-seconds", type=float, default=None,
              help="--refine-data: time budget of the distillation  [default: 60]")
@click.option("--refine-steps", type=int, default=None,
              help="--refine-data: at most this many Adam steps  [default: 200]")
@click.option("--refine-lr", type=float, default=None,
              help="--refine-data: learning rate  [default: 1e-3]")
@click.option("--refine-batch-size", type=int, default=None,
              help="--refine-data: texts per step  [default: 16]")
@click.option("--refine-max-length", type=int, default=None,
              help="--refine-data: tokens per text  [default: 128]")
@click.option("--refine-text-column", default=None,
              help="--refine-data FILE: the column holding the text  [default: text]")
@click.option("--refine-max-texts", type=int, default=None,
              help="--refine-data: use only the first N texts  [default: all]")
@json_option
@force_option()
def extract_command(base, finetuned, out, to, rank, energy, eps, target_modules, tensor_rank,
                    shapes, fit_steps, fit_to, svd, device, refine_data, refine_seconds,
                    refine_steps, refine_lr, refine_batch_size, refine_max_length,
                    refine_text_column, refine_max_texts, as_json, force):
    """Extract the difference FINETUNED - BASE as a low-rank adapter (truncated SVD per module).

    Both checkpoints are streamed tensor by tensor. Changed tensors that are not targets
    (norms, biases, heads) are carried whole; unchanged ones are not written. The report
    gives each module's rank, energy kept, relative delta error and parameters.

    \b
    Examples:
      loretta-merge extract ./base ./finetuned -o ./lora --rank 16
      loretta-merge extract ./base ./finetuned -o ./tt --to tt --energy 0.99 --json
      loretta-merge extract ./base ./ft -o ./tt --to tt --rank 4 --refine-data texts.jsonl --refine-seconds 120
    """
    from ..converters.extract import extract, output_exists_check
    from ..converters.refine import RefineOptions, refine_options_without_data
    from ..formats import write_adapter, write_peft_lora
    from .resize import echo_report

    given = {flag: value for flag, value in (
        ("seconds", refine_seconds), ("max_steps", refine_steps), ("lr", refine_lr),
        ("batch_size", refine_batch_size), ("max_length", refine_max_length),
        ("text_column", refine_text_column), ("max_texts", refine_max_texts)) if value is not None}
    refine = None
    if refine_data is None:
        refine_options_without_data(given)
    else:
        refine = RefineOptions(data=refine_data, progress=not as_json, **given)
    output_exists_check(out, force)
    adapter, report = extract(base, finetuned, to=to, rank=rank, energy=energy, eps=eps,
                              target_modules=_targets(target_modules), tensor_rank=tensor_rank,
                              shapes=shapes, fit_steps=fit_steps, svd=svd, fit_to=fit_to,
                              device=device, refine=refine)
    (write_adapter if to == "tt" else write_peft_lora)(adapter, out, force=force)
    echo_report(report, out, as_json=as_json)
