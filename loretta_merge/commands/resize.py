"""`loretta-merge convert resize ADAPTER -o OUT`: lower an adapter's rank (registered on the
`convert` group in commands/convert.py)."""

from __future__ import annotations

import json

import click

from .options import force_option, json_option, rank_rule_options, unsafe_pickle_option


@click.command("resize")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Output adapter directory (same kind as the input).")
@rank_rule_options(
    rank="LoRA: the rank of every module (with --energy/--eps: a cap). LoRETTA_rep: the "
         "maximum inner TT rank.",
    energy="LoRA: keep the smallest rank whose squared singular values reach this fraction, "
           "in (0, 1]. rep: TT rounding to eps = sqrt(1 - energy).",
    eps="Relative Frobenius error target, in (0, 1): of each delta (LoRA), of each factor's TT "
        "rounding (rep).")
@json_option
@force_option()
@unsafe_pickle_option
def resize_command(adapter_dir, out, rank, energy, eps, as_json, force, allow_unsafe_pickle):
    """Lower the rank of the PEFT LoRA or LoRETTA_rep adapter in ADAPTER_DIR.

    LoRA: the best approximation of each delta at the chosen rank (SVD of B @ A from QR of
    the factors; the product is never formed), written with lora_alpha = r. LoRETTA_rep:
    TT rounding of each factor's cores. The report gives each module's rank, energy kept,
    measured relative delta error and parameters.

    \b
    Examples:
      loretta-merge convert resize ./lora-r64 -o ./lora-r16 --rank 16
      loretta-merge convert resize ./lora-r64 -o ./lora-e99 --energy 0.99 --json
      loretta-merge convert resize ./tt-adapter -o ./tt-r3 --rank 3
    """
    from ..converters.extract import output_exists_check
    from ..converters.resize import resize
    from ..formats import write_adapter, write_peft_lora

    output_exists_check(out, force)
    adapter, report = resize(adapter_dir, rank=rank, energy=energy, eps=eps,
                             allow_unsafe_pickle=allow_unsafe_pickle)
    (write_peft_lora if adapter.method == "lora" else write_adapter)(adapter, out, force=force)
    echo_report(report, out, as_json=as_json)


def echo_report(report, out, *, as_json: bool) -> None:
    """The per-module rank/error table (or its JSON) of ``extract`` and ``convert resize``."""
    if as_json:
        d = report.to_dict()
        d["output"] = str(out)
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo(report.table())
        click.echo(f"wrote {out}")
