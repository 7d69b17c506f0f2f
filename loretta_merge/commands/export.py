"""``loretta-merge export``: ONNX (validated in ONNX Runtime) and safetensors re-sharding.

Thin commands: check the options, call one public function, print its report.
Torch and the converters are imported inside the command bodies so ``--help`` stays fast.
"""

from __future__ import annotations

import json

import click


@click.group("export")
def export_group():
    """Export a model to ONNX (validated) or re-shard/cast a safetensors checkpoint.

    \b
    Examples:
      loretta-merge export onnx ./merged -o ./merged-onnx
      loretta-merge export onnx ./llama --adapter ./adp-adapter -o ./llama-adp-onnx
      loretta-merge export onnx ./merged-llama -o ./onnx --task causal-lm --with-past
      loretta-merge export safetensors ./merged -o ./merged-bf16 --dtype bfloat16
    """


def _size(ctx, param, value):
    if value is None:
        return None
    from ..io import parse_size

    return parse_size(value)


@export_group.command("onnx")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(),
              help="Output directory (model.onnx [+ model.onnx.data], config, tokenizer).")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None,
              help="LoRETTA adapter applied in memory first (adp adapters stay in the graph).")
@click.option("--task", type=click.Choice(["auto", "causal-lm", "seq-cls", "feature-extraction"]),
              default="auto", show_default=True,
              help="Model head; auto reads config.architectures.")
@click.option("--with-past", is_flag=True,
              help="Causal LMs: KV-cache inputs past_key_values.{i}.key/value and outputs "
                   "present.{i}.key/value for step-by-step generation.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--dtype", default="auto", show_default=True,
              help="Cast the model before export: auto (keep), float32, float16, bfloat16.")
@click.option("--atol", type=float, default=None,
              help="Absolute validation tolerance; passes when |onnx - torch| <= atol + "
                   "rtol*|torch| at kept positions (atol and rtol by dtype: 1e-4 fp32, 1e-2 "
                   "fp16, 5e-2 bf16).")
@click.option("--no-validate", is_flag=True,
              help="Skip the ONNX Runtime vs PyTorch check (not recommended).")
@click.option("--external-data-threshold", default="2GB", show_default=True, callback=_size,
              help="Weights above this size go to one model.onnx.data file beside the graph.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the model directory's own Python code to run (unsafe for untrusted "
                   "models).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def onnx_command(model_dir, out_dir, adapter, task, with_past, opset, dtype, atol, no_validate,
                 external_data_threshold, trust_remote_code, as_json, force):
    """Export MODEL_DIR to ONNX with dynamic batch/sequence axes, checked in ONNX Runtime.

    Validation runs the graph on padded probe batches of two shapes and compares it with
    PyTorch where the attention mask keeps tokens; a mismatch is an error and writes nothing.
    """
    from ..converters.onnx import export_onnx

    report = export_onnx(model_dir, out_dir, adapter=adapter, task=task, with_past=with_past,
                         opset=opset, dtype=dtype, atol=atol, validate=not no_validate,
                         external_data_threshold_bytes=external_data_threshold, force=force,
                         trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(f"wrote {report.onnx_path} ({report.task}, {report.dtype}, opset {report.opset}, "
               f"{report.exporter} exporter{', external data' if report.external_data else ''}) "
               f"in {report.export_seconds:.1f} s")
    if report.exporter_note:
        click.echo(f"note: {report.exporter_note}")
    v = report.validation
    if v is None:
        click.echo("validation skipped (--no-validate)")
        return
    click.echo(f"validated on {', '.join(v.providers)}: max abs diff {v.max_abs_diff:.3g}, "
               f"max rel diff {v.max_rel_diff:.3g} (tolerance atol={v.atol:g}, rtol={v.rtol:g}) "
               f"over {len(v.probes)} probe shapes "
               + ", ".join(f"{p.batch}x{p.sequence}" for p in v.probes))
    if v.generation_match is not None:
        click.echo(f"greedy generation through the KV cache: {len(v.generation_tokens_onnx[0])} "
                   f"steps, tokens match PyTorch")


@export_group.command("safetensors")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(),
              help="Output directory.")
@click.option("--dtype", default="auto", show_default=True,
              help="Cast floating tensors: auto (keep), float32, float16, bfloat16.")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=_size,
              help="Largest shard in bytes (5GB = 5*10^9; 4GiB = 4*2^30).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def safetensors_command(model_dir, out_dir, dtype, max_shard_size, as_json, force):
    """Re-shard and/or cast a safetensors checkpoint, streaming one tensor at a time."""
    from ..converters.safetensors import reshard_checkpoint
    from ..io import parse_dtype

    report = reshard_checkpoint(model_dir, out_dir, dtype=parse_dtype(dtype),
                                max_shard_bytes=max_shard_size, force=force)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(f"wrote {report['out']}: {report['tensors']} tensors in {report['shards']} shard(s), "
               f"{report['total_bytes'] / 1e6:.1f} MB ({report['dtype']}), largest shard "
               f"{report['largest_shard_bytes'] / 1e6:.1f} MB, in {report['seconds']:.1f} s")
