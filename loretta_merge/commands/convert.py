"""`loretta-merge convert`: PEFT LoRA <-> LoRETTA_rep. Thin: parse, call, print."""

from __future__ import annotations

import json

import click

from .options import force_option, json_option, unsafe_pickle_option

def _table(report, *, limit: int = 10) -> str:
    """Human summary: the worst ``limit`` modules by delta error, then the totals."""
    s = report.summary()
    lines = []
    mods = sorted(report.modules, key=lambda m: m.err_delta, reverse=True)
    factors = report.direction == "lora-to-tt"  # tt-to-lora factors are exact: no A/B columns
    if mods:
        lines.append(f"{'module':<48} {'r':>4} " + (f"{'err A':>9} {'err B':>9} " if factors else "")
                     + f"{'err BA':>9} {'params':>17} {'ratio':>8}")
        for m in mods[:limit]:
            name = m.name if len(m.name) <= 48 else "..." + m.name[-45:]
            lines.append(f"{name:<48} {m.r:>4} " + (f"{m.err_a:>9.2e} {m.err_b:>9.2e} " if factors else "")
                         + f"{m.err_delta:>9.2e} {m.params_before:>8}->{m.params_after:<8} "
                         f"{m.compression:>7.2f}x")
        if len(mods) > limit:
            lines.append(f"... {len(mods) - limit} more module(s) with smaller delta error (--json lists all)")
    lines.append(f"modules: {s['modules']}   parameters: {s['params_before']:,} -> {s['params_after']:,} "
                 f"({s['compression']:.2f}x)   time: {report.seconds:.2f} s")
    lines.append(f"delta error (relative Frobenius): max {s['max_err_delta']:.3e}, "
                 f"mean {s['mean_err_delta']:.3e}, worst {s['worst_module']}")
    if report.direction == "lora-to-tt":
        lines.append(f"factor error: A max {s['max_err_a']:.3e}, B max {s['max_err_b']:.3e}; "
                     f"bound (1+eA)(1+eB)-1 on the delta relative to |A||B|: {s['max_delta_bound']:.3e}")
        if report.eps is not None:
            verdict = "MET" if report.eps_met else "NOT MET"
            lines.append(f"eps {report.eps}: {verdict} (every measured factor error <= eps)"
                         if report.eps_met else f"eps {report.eps}: {verdict}")
    if report.modules_to_save:
        lines.append(f"modules_to_save ({len(report.modules_to_save)}): "
                     + ", ".join(report.modules_to_save[:8])
                     + (" ..." if len(report.modules_to_save) > 8 else ""))
    elif report.full_tensors:
        lines.append(f"full tensors carried: {len(report.full_tensors)}")
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)


def _emit(report, out, as_json: bool) -> None:
    if as_json:
        d = report.to_dict()
        d["output"] = str(out)
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo(_table(report))
        click.echo(f"wrote {out}")


@click.group("convert")
def convert_group():
    """Convert between PEFT LoRA and LoRETTA tensor-train (rep) adapters."""


@convert_group.command("lora-to-tt")
@click.argument("lora_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Output directory for the LoRETTA_rep adapter.")
@click.option("--tensor-rank", type=int, default=None, help="Maximum inner TT rank.")
@click.option("--eps", type=float, default=None,
              help="Relative Frobenius error target for each factor, in (0, 1).")
@click.option("--shapes", type=click.Choice(["paper", "auto"]), default="paper", show_default=True,
              help="TT mode shapes: the paper's table where it applies, or balanced factors.")
@click.option("--device", default="cpu", show_default=True, help="Device for the decomposition: cpu, cuda, cuda:N or auto.")
@json_option
@force_option()
@unsafe_pickle_option
def lora_to_tt_command(lora_dir, out, tensor_rank, eps, shapes, device, as_json, force, allow_unsafe_pickle):
    """TT-decompose the factors of the PEFT LoRA in LORA_DIR (needs --tensor-rank and/or --eps).

    Reports, per module and overall, the relative error of each factor and of the delta
    B @ A, and the compression; with --eps it proves every factor error is <= eps.

    \b
    Examples:
      loretta-merge convert lora-to-tt ./peft-lora -o ./tt --eps 0.05
      loretta-merge convert lora-to-tt ./peft-lora -o ./tt --tensor-rank 5 --json
    """
    from ..converters.lora import lora_to_tt
    from ..errors import OutputExistsError
    from ..formats import write_adapter
    from pathlib import Path

    if Path(out).exists() and not force:  # fail before the work, not after
        raise OutputExistsError(f"{out} already exists; choose another output or pass --force")
    adapter, report = lora_to_tt(lora_dir, tensor_rank=tensor_rank, eps=eps, shapes=shapes,
                                 device=device, allow_unsafe_pickle=allow_unsafe_pickle)
    write_adapter(adapter, out, force=force)
    _emit(report, out, as_json)


@convert_group.command("tt-to-lora")
@click.argument("tt_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Output directory for the PEFT LoRA adapter.")
@click.option("--rank", type=int, default=None,
              help="Truncate each delta to this rank by SVD (the error is reported).")
@json_option
@force_option()
@unsafe_pickle_option
@click.option("--ignore-pooling", is_flag=True,
              help="Convert an adapter trained with mean pooling anyway: the weights carry over "
                   "exactly, the pooling does not (PEFT pools the first token).")
def tt_to_lora_command(tt_dir, out, rank, as_json, force, allow_unsafe_pickle, ignore_pooling):
    """Convert the LoRETTA_rep adapter in TT_DIR to a PEFT LoRA directory (exact unless --rank).

    Trained norms, heads and TT-replaced dense layers go to PEFT's modules_to_save, so
    nothing trained is lost. TT_DIR may also be the authors' loretta 0.1 format.

    \b
    Examples:
      loretta-merge convert tt-to-lora ./my-adapter -o ./peft-lora
      loretta-merge convert tt-to-lora ./my-adapter -o ./peft-lora-r4 --rank 4
    """
    from ..converters.lora import tt_to_lora
    from ..formats import write_peft_lora
    from ..errors import OutputExistsError
    from pathlib import Path

    if Path(out).exists() and not force:
        raise OutputExistsError(f"{out} already exists; choose another output or pass --force")
    adapter, report = tt_to_lora(tt_dir, rank=rank, allow_unsafe_pickle=allow_unsafe_pickle,
                                 ignore_pooling=ignore_pooling)
    write_peft_lora(adapter, out, force=force)
    _emit(report, out, as_json)


from .resize import resize_command  # defined in its own module, registered here

convert_group.add_command(resize_command)
