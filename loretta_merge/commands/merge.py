"""``loretta-merge merge BASE INPUT [INPUT ...] -o OUT`` and ``loretta-merge BASE+A:0.7+B -o OUT``
(an input: an adapter, or a fully fine-tuned checkpoint of BASE)."""

from __future__ import annotations

import json
import os
import re

import click

from .options import (
    METHOD_HELP,
    force_option,
    method_param_options,
    method_params,
    unsafe_pickle_option,
)

_WEIGHT_RE = re.compile(r"^(?P<path>.+):(?P<weight>[-+]?(?:[0-9]*\.)?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def split_weight(spec: str) -> tuple[str, float | None]:
    """``dir:0.7`` -> (dir, 0.7); an existing directory named with a colon stays whole."""
    if os.path.isdir(spec):
        return spec, None
    m = _WEIGHT_RE.match(spec)
    if m:
        return m.group("path"), float(m.group("weight"))
    return spec, None


def _group(tokens: list[str], *, weighted: bool) -> tuple[str, int]:
    """The longest run of ``+``-joined tokens that names an existing directory (so paths
    containing '+' work); one token when none does."""
    for n in range(len(tokens), 0, -1):
        cand = "+".join(tokens[:n])
        path = split_weight(cand)[0] if weighted else cand
        if os.path.isdir(path):
            return cand, n
    return tokens[0], 1


def _human(nbytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def parse_merge_spec(args: tuple[str, ...] | list[str]) -> tuple[str, list[tuple[str, float | None]]]:
    """``("BASE+A1:0.7+A2:0.3",)`` or ``("BASE", "A1:0.7", "A2")`` -> base and
    ``[(adapter, weight or None)]``."""
    from ..errors import ConfigError

    args = list(args)
    if not args:
        raise ConfigError("give BASE and at least one ADAPTER (or BASE+ADAPTER)")
    base, rest = args[0], args[1:]
    adapters: list[str] = []
    if not os.path.isdir(base) and "+" in base:
        tokens = base.split("+")
        base, n = _group(tokens, weighted=False)
        tokens = tokens[n:]
        while tokens:
            spec, n = _group(tokens, weighted=True)
            adapters.append(spec)
            tokens = tokens[n:]
    adapters += rest
    if not adapters:
        raise ConfigError(f"no adapter given after {base!r}; use BASE+ADAPTER or "
                          f"`merge BASE ADAPTER`")
    if any(a == "" for a in adapters):
        raise ConfigError(f"empty adapter path in {' '.join(args)!r} (two '+' in a row?); remove the extra '+'")
    return base, [split_weight(a) for a in adapters]


def recipe_alone(config: str, specs, given: dict):
    """The mergekit YAML of ``--config``, read; refused with BASE/ADAPTER arguments or with
    a flag the recipe itself sets (``given``: flag -> value, None when not given)."""
    from ..errors import ConfigError
    from ..merge.recipe import read_recipe

    if specs:
        raise ConfigError("give either BASE/ADAPTER arguments or --config FILE, not both")
    for flag, value in given.items():
        if value is not None:
            flag = {"--normalize": "--[no-]normalize", "--rescale": "--[no-]rescale"}.get(flag, flag)
            raise ConfigError(f"{flag} cannot be combined with --config {config}: the recipe "
                              f"sets the method and its parameters; edit the recipe instead")
    return read_recipe(config)


def _from_recipe(config: str, specs, dtype: str, given: dict):
    """BASE, adapters, method, parameters and dtype from a mergekit YAML (``--config``)."""
    from ..errors import ConfigError

    recipe = recipe_alone(config, specs, given)
    if recipe.dtype is not None:
        if dtype != "auto":
            raise ConfigError(f"--dtype {dtype} and the recipe's dtype {recipe.dtype} disagree; "
                              f"remove one")
        dtype = recipe.dtype
    return recipe.base, recipe.adapters, recipe.method, recipe.params, dtype


@click.command("merge")
@click.argument("specs", nargs=-1, required=False, metavar="BASE ADAPTER[:W] [ADAPTER[:W] ...]")
@click.option("-o", "--output", "--out", "out", required=True, type=click.Path(),
              help="Output directory (written atomically; must not exist unless --force).")
@click.option("--weights", default=None,
              help="Comma-separated adapter weights, e.g. 0.7,0.3 (default 1 each).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"]),
              help="Output dtype; auto keeps the base checkpoint's dtypes (bfloat16 for a "
                   "quantized base, which is dequantized).")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N (where the deltas are computed).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest output shard in BYTES, with units: 5GB, 500MB, 2GiB or a number.")
@force_option("OUT")
@click.option("--verify", is_flag=True,
              help="After writing, compare logits of OUT with base + adapter in memory (weighted or "
                   "several adapters: base + sum of w * (base with the adapter merged - base)); "
                   "a check that cannot run is an error, and nothing is written. Loads "
                   "two fp32 copies of the model (8 bytes per parameter); refused up front, "
                   "with the estimate, when they cannot fit in the available memory.")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="A mergekit YAML recipe (merge_method, base_model, models as fine-tuned "
                   "model paths or BASE+ADAPTER with weight/density, parameters, dtype) "
                   "instead of BASE ADAPTER...; run unchanged, it gives mergekit's output.")
@click.option("--method", default=None, metavar="METHOD", help=METHOD_HELP)
@method_param_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@unsafe_pickle_option
@click.option("--awq-adapter-trained-on", type=click.Choice(["awq", "original"]), default=None,
              help="AWQ base only: the model the adapter was trained on. Default: the AWQ model "
                   "(the adapter's base_model_name_or_path is never followed); 'original' is "
                   "refused (AWQ's activation scales are not stored).")
def merge_command(specs, out, weights, dtype, device, max_shard_size, force, verify, method,
                  config, density, lambda_, epsilon, gamma, majority_sign, normalize, rescale,
                  tie_break, seed, as_json, quiet, allow_unsafe_pickle, awq_adapter_trained_on):
    """Merge adapters (or fully fine-tuned checkpoints of BASE) into BASE and write a plain
    transformers checkpoint to OUT.

    \b
    loretta-merge merge ./llama ./adapter -o ./merged
    loretta-merge ./llama+./a1:0.7+./a2:0.3 -o ./merged
    loretta-merge merge ./llama ./a1 ./a2 -o ./merged --method ties --density 0.5
    loretta-merge merge ./llama ./finetune-a ./a2:0.5 -o ./merged   (a full fine-tune too)
    loretta-merge merge --config recipe.yml -o ./merged   (a mergekit YAML)

    Streams the base one tensor at a time (peak memory: a few tensors), checks
    every adapter target before reading weights, and never leaves a half-written OUT.
    """
    import signal

    from ..errors import ConfigError
    from ..io import parse_size
    from ..merge import merge

    params = method_params(density, lambda_, epsilon, gamma, majority_sign, normalize, rescale,
                           tie_break)
    if config is not None:
        base, adapters, method, params, dtype = _from_recipe(
            config, specs, dtype, {"--method": method, "--weights": weights,
                                   **{f"--{k.replace('_', '-')}": v for k, v in params.items()}})
    else:
        base, adapters = parse_merge_spec(specs)
    if weights is not None:
        if any(w is not None for _, w in adapters):
            raise ConfigError("give adapter weights either as ADAPTER:W or with --weights, not both")
        try:
            values = [float(x) for x in weights.split(",")]
        except ValueError as exc:
            raise ConfigError(f"--weights {weights!r}: expected comma-separated numbers; pass e.g. --weights 0.7,0.3") from exc
        if len(values) != len(adapters):
            raise ConfigError(f"--weights has {len(values)} value(s) for {len(adapters)} adapter(s); "
                              f"give one comma-separated weight per adapter, e.g. --weights 0.7,0.3")
        adapters = [(a, w) for (a, _), w in zip(adapters, values)]
    adapters = [(a, 1.0 if w is None else w) for a, w in adapters]

    def on_term(signum, frame):  # SIGTERM cleans up like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        report = merge(base, adapters, out, dtype=dtype, device=device,
                       max_shard_bytes=parse_size(max_shard_size), force=force, verify=verify,
                       progress=not (quiet or as_json), allow_unsafe_pickle=allow_unsafe_pickle,
                       awq_adapter_trained_on=awq_adapter_trained_on,
                       method=method or "linear", method_params=params, seed=seed)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        msg = (f"merged {report.merged_tensors} tensors (+{report.replaced_tensors} replaced, "
               f"{report.copied_tensors} copied) into {report.out}: {report.shards} shard(s), "
               f"{_human(report.total_bytes)}, {report.dtype}, {report.seconds:.1f}s")
        if report.method:
            m = report.method
            msg += f"; method {m['method']}" + (f", seed {m['seed']}" if m["seed"] is not None else "")
        if report.task_model:
            msg += (f"; wrote {report.task_model} (the model the adapter was trained on; "
                    f"{len(report.dropped)} base tensor(s) it lacks dropped)")
        if report.untied:
            msg += f"; untied {', '.join(report.untied)} (the adapter changes the embeddings)"
        if report.verify:
            v = report.verify
            msg += (f"; verify: max |logit diff| {v['max_abs_logit_diff']:.3g} "
                    f"(tolerance {v['tolerance']:.3g})")
        click.echo(msg)  # the summary is the command's output, like every other command
