"""``loretta-merge combine A1[:W] A2[:W] ... -o NEW``: several adapters into one new adapter."""

from __future__ import annotations

import click

from .options import (
    METHOD_HELP,
    force_option,
    json_option,
    method_param_options,
    method_params,
    unsafe_pickle_option,
)


@click.command("combine")
@click.argument("specs", nargs=-1, required=False, metavar="ADAPTER[:W] [ADAPTER[:W] ...]")
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Output adapter directory (written atomically; must not exist unless --force).")
@click.option("--to", "to", type=click.Choice(["lora", "tt"]), default="lora", show_default=True,
              help="A PEFT LoRA, or a LoRETTA_rep (tensor-train) adapter.")
@click.option("--rank", type=int, default=None,
              help="LoRA rank of every module (with --eps: a cap). Default: the largest input "
                   "rank (PEFT's default).")
@click.option("--eps", type=float, default=None,
              help="Keep the smallest rank whose relative Frobenius error is <= this, in (0, 1).")
@click.option("--weights", default=None,
              help="Comma-separated adapter weights, e.g. 0.7,0.3 (default 1 each).")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="A mergekit YAML recipe (merge_method, base_model, models as BASE+ADAPTER "
                   "with weight/density, parameters) instead of ADAPTER arguments.")
@click.option("--method", default=None, metavar="METHOD", help=METHOD_HELP)
@method_param_options
@click.option("--tensor-rank", type=int, default=5, show_default=True,
              help="--to tt: maximum inner TT rank of each factor.")
@click.option("--shapes", type=click.Choice(["paper", "auto"]), default="paper",
              show_default=True, help="--to tt: TT mode shapes.")
@click.option("--fit-steps", type=int, default=300, show_default=True,
              help="--to tt: fit the cores to the delta after TT-SVD; 0: TT-SVD only.")
@click.option("--drop-full-tensors", is_flag=True,
              help="Leave out the inputs' full tensors (trained norms, heads) instead of "
                   "refusing them: their change needs the base weights.")
@json_option
@force_option()
@unsafe_pickle_option
def combine_command(specs, out, to, rank, eps, weights, config, method, density, lambda_,
                    epsilon, gamma, majority_sign, normalize, rescale, tie_break, seed,
                    tensor_rank, shapes,
                    fit_steps, drop_full_tensors, as_json, force, allow_unsafe_pickle):
    """Combine adapters into ONE new adapter (not a merged model).

    Per module the inputs' deltas are combined by --method, as `merge --method` combines
    them, then compressed by a truncated SVD into LoRA factors and, for --to tt, into
    LoRETTA_rep cores. No base weights are needed. The report gives each module's rank,
    the relative error of its delta after the SVD (and the TT) stage, and the parameters.

    \b
    Examples:
      loretta-merge combine ./a1 ./a2:0.5 -o ./both --method ties --density 0.5 --rank 16
      loretta-merge combine ./a1 ./a2 -o ./both-tt --to tt --eps 0.05
      loretta-merge combine ./a1 ./a2 -o ./peft --method ties_svd --density 0.5 --rank 8
      loretta-merge combine --config recipe.yml -o ./both --rank 16
    """
    from ..combine import combine_adapters
    from ..converters.extract import output_exists_check
    from ..errors import ConfigError
    from .merge import recipe_alone, split_weight
    from .resize import echo_report

    params = method_params(density, lambda_, epsilon, gamma, majority_sign, normalize, rescale,
                           tie_break)
    base_name = None
    if config is not None:
        recipe = recipe_alone(config, specs, {"--method": method, "--weights": weights,
                                              **{f"--{k.replace('_', '-')}": v
                                                 for k, v in params.items()}})
        adapters, method, params, base_name = recipe.adapters, recipe.method, recipe.params, recipe.base
    else:
        if not specs:
            raise ConfigError("give the adapters to combine (ADAPTER[:W] ...) or --config FILE")
        adapters = [split_weight(s) for s in specs]
    if weights is not None:
        if any(w is not None for _, w in adapters):
            raise ConfigError("give adapter weights either as ADAPTER:W or with --weights, not both")
        try:
            values = [float(x) for x in weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights {weights!r}: expected comma-separated numbers; pass e.g. "
                              f"--weights 0.7,0.3") from None
        if len(values) != len(adapters):
            raise ConfigError(f"--weights has {len(values)} value(s) for {len(adapters)} "
                              f"adapter(s); give one weight per adapter, e.g. --weights 0.7,0.3")
        adapters = [(a, w) for (a, _), w in zip(adapters, values)]
    adapters = [(a, 1.0 if w is None else w) for a, w in adapters]
    output_exists_check(out, force)
    report = combine_adapters(adapters, out, method=method or "linear", params=params, seed=seed,
                              to=to, rank=rank, eps=eps, tensor_rank=tensor_rank, shapes=shapes,
                              fit_steps=fit_steps, drop_full_tensors=drop_full_tensors,
                              force=force, allow_unsafe_pickle=allow_unsafe_pickle,
                              base_model_name_or_path=base_name)
    echo_report(report, out, as_json=as_json)
