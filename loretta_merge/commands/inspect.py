"""``loretta-merge inspect``: describe an adapter/model directory, or count what an adapter
would train on a model given only its config.json (built on the meta device)."""

from __future__ import annotations

import json

import click

# the options that shape a count (--config); they say nothing about an existing directory
COUNT_OPTIONS = ("method", "r", "lora_alpha", "tensor_rank", "bottleneck", "non_linearity", "task",
                 "shapes", "no_norms")


def _given(ctx: click.Context, names) -> list[str]:
    """The options among ``names`` that the command line set (defaults excluded), as flags."""
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    return [flags[n] for n in names
            if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]


@click.command("inspect")
@click.argument("path", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--config", "config_json", type=click.Path(exists=True),
              help="A model's config.json (or its directory): count what an adapter would train.")
@click.option("--method", type=click.Choice(["rep", "adp"]), help="With --config: LoRETTA_rep or _adp. The counting options (--method, --r, --lora-alpha, "
                   "--tensor-rank, --bottleneck, --non-linearity, --task, --shapes, --no-norms) "
                   "apply to --config only; with PATH they are refused.")
@click.option("--r", "r", type=click.IntRange(min=1), default=8, show_default=True,
              help="rep rank (and the r of the LoRA it is compared with).")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="rep lora_alpha.")
@click.option("--tensor-rank", type=click.IntRange(min=1), default=5, show_default=True,
              help="Inner TT rank R.")
@click.option("--bottleneck", type=click.IntRange(min=1), default=64, show_default=True,
              help="adp bottleneck size.")
@click.option("--non-linearity", type=click.Choice(["relu", "gelu", "silu", "tanh"]), default="relu",
              show_default=True, help="adp activation.")
@click.option("--task", type=click.Choice(["seq-cls", "causal-lm"]),
              help="Model head (default: seq-cls for encoders, causal-lm otherwise).")
@click.option("--shapes", type=click.Choice(["paper", "auto"]), default="paper", show_default=True,
              help="TT mode shapes: the paper's table where it applies, or factorised.")
@click.option("--no-norms", is_flag=True, help="Do not count trained norms (the paper trains them).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def inspect_command(ctx, path, config_json, method, r, lora_alpha, tensor_rank, bottleneck, non_linearity,
                    task, shapes, no_norms, as_json):
    """Describe PATH (an adapter or model directory), or with --config and --method count
    the trainable parameters an adapter would have, next to LoRA of the same r.

    \b
    Examples:
      loretta-merge inspect ./my-adapter
      loretta-merge inspect --config llama/config.json --method adp --json

    The counting options (--method, --r, --lora-alpha, --tensor-rank, --bottleneck,
    --non-linearity, --task, --shapes, --no-norms) apply to --config only: PATH is described
    as it is, so they are refused with PATH rather than ignored.
    """
    from ..errors import ConfigError
    from ..inspect import count_params, describe, format_report

    if (path is None) == (config_json is None):
        raise ConfigError("give either PATH (an adapter or model directory) or --config CONFIG_JSON")
    if path is not None and (given := _given(ctx, COUNT_OPTIONS)):
        raise ConfigError(f"{', '.join(given)} count what an adapter would train and apply to "
                          f"--config only; `inspect {path}` describes the directory as it is: drop "
                          f"{', '.join(given)}, or, for a model directory, count with `inspect "
                          f"--config {path} --method rep|adp`")
    if config_json is not None:
        if method is None:
            raise ConfigError("--config needs --method: pass --method rep or --method adp")
        info = count_params(config_json, method, r=r, tensor_rank=tensor_rank, bottleneck=bottleneck,
                            task=task, lora_alpha=lora_alpha, non_linearity=non_linearity,
                            train_norms=not no_norms, shapes=shapes)
    else:
        info = describe(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))
