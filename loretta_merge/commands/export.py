"""``loretta-merge export``: ONNX (validated in ONNX Runtime) and safetensors re-sharding.

Thin commands: check the options, call one public function, print its report.
Torch and the converters are imported inside the command bodies so ``--help`` stays fast.
"""

from __future__ import annotations

import json

import click

from .options import force_option, json_option


@click.group("export")
def export_group():
    """Export a model to ONNX (validated) or re-shard/cast a safetensors checkpoint.

    \b
    Examples:
      loretta-merge export onnx ./merged -o ./merged-onnx
      loretta-merge export onnx ./llama --adapter ./adp-adapter -o ./llama-adp-onnx
      loretta-merge export onnx ./merged-llama -o ./onnx --task causal-lm --with-past
      loretta-merge export onnx ./base -o ./served --switchable-adapter a=./rep-a \\
          --switchable-adapter b=./peft-lora
      loretta-merge export onnx ./base -o ./bank --adapter-bank 8 \\
          --switchable-adapter a=./rep-a
      loretta-merge export onnx ./merged -o ./merged-int8 --quantize int8
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
              help="LoRETTA adapter applied first: rep is merged into the weights, adp stays in "
                   "the graph.")
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
              help="Absolute validation tolerance (default by dtype: 1e-4 fp32, 1e-2 fp16, "
                   "5e-2 bf16). Validation passes when |onnx - torch| <= atol + rtol*|torch| "
                   "at kept positions; rtol is not an option: it is set by dtype (the same "
                   "values).")
@click.option("--no-validate", is_flag=True,
              help="Skip the ONNX Runtime vs PyTorch check (not recommended).")
@click.option("--external-data-threshold", default="2GB", show_default=True, callback=_size,
              help="Weights above this size go to one model.onnx.data file beside the graph.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the model directory's own Python code to run (unsafe for untrusted "
                   "models).")
@click.option("--switchable-adapter", "switchable", multiple=True, metavar="NAME=ADAPTER_DIR",
              help="Repeatable. Export the base with this rep or PEFT LoRA adapter switchable at "
                   "run time: OUT/adapters/NAME.onnx_adapter, activated in ONNX Runtime with "
                   "RunOptions.add_active_adapter; with none active the graph is the base.")
@click.option("--adapter-bank", "adapter_bank", type=int, default=None, metavar="SIZE",
              help="Serve a different adapter per batch row: a bank of SIZE slots (extra input "
                   "adapter_slot, int64 per row, -1 = the base); --switchable-adapter fills "
                   "slots 0, 1, ... in order. Load and evict adapters at run time with "
                   "loretta_merge.serving.AdapterBank (docs/serving.md).")
@click.option("--switch-layout", type=click.Choice(["tt", "factors"]), default="tt",
              show_default=True,
              help="tt: rep TT cores in the adapter files, reconstructed in the graph "
                   "(kilobyte files); factors: A and B precomputed (larger files).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Dynamic int8 quantization (ONNX Runtime), checked against the fp32 graph "
                   "on real text: the --eval-file, else built-in sentences (Rotten Tomatoes "
                   "train rows).")
@click.option("--int8-max-error", type=float, default=None,
              help="With --quantize, causal-lm/feature-extraction (or no tokenizer): the largest "
                   "accepted ||int8 - fp32|| / ||fp32|| over the kept positions (default 0.1).")
@click.option("--int8-min-agreement", type=float, default=None,
              help="With --quantize on a seq-cls model: the smallest accepted share of texts "
                   "the int8 graph gives the fp32 graph's class (default 0.98).")
@click.option("--eval-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --quantize int8 on a seq-cls model (refused otherwise): a CSV/JSONL "
                   "with text and label columns; the accuracy of the fp32 and int8 graphs is "
                   "reported.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True,
              help="ONNX Runtime provider for validation; auto uses CUDA when the installed "
                   "onnxruntime offers it (pip install 'loretta-merge[gpu]'). The provider that "
                   "really ran is reported.")
@json_option
@force_option("OUT_DIR")
def onnx_command(model_dir, out_dir, adapter, task, with_past, opset, dtype, atol, no_validate,
                 external_data_threshold, trust_remote_code, switchable, adapter_bank,
                 switch_layout, quantize, int8_max_error, int8_min_agreement, eval_file, provider,
                 as_json, force):
    """Export MODEL_DIR to ONNX with dynamic batch/sequence axes, checked in ONNX Runtime.

    Validation runs the graph on padded probe batches of two shapes and compares it with
    PyTorch where the attention mask keeps tokens; a mismatch is an error and writes nothing.
    A rep --adapter is merged into the weights first; an adp --adapter stays in the graph.
    Each --switchable-adapter is validated with it active against the merged PyTorch model.
    """
    from ..converters.onnx import export_onnx

    report = export_onnx(model_dir, out_dir, adapter=adapter, task=task, with_past=with_past,
                         opset=opset, dtype=dtype, atol=atol, validate=not no_validate,
                         external_data_threshold_bytes=external_data_threshold, force=force,
                         trust_remote_code=trust_remote_code, switchable_adapters=switchable,
                         switch_layout=switch_layout, quantize=quantize, eval_file=eval_file,
                         provider=provider, int8_max_error=int8_max_error,
                         int8_min_agreement=int8_min_agreement, adapter_bank=adapter_bank)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    _print_onnx_report(report)


def _print_validation(v, what: str) -> None:
    ran = ", ".join(v.providers)
    if v.fallback:
        ran += f" (asked for {v.requested_providers[0]}, which this onnxruntime lacks: CPU ran)"
    click.echo(f"{what} validated on {ran}: max abs diff {v.max_abs_diff:.3g}, max rel diff "
               f"{v.max_rel_diff:.3g} (tolerance atol={v.atol:g}, rtol={v.rtol:g}) over "
               f"{len(v.probes)} probe shapes " + ", ".join(f"{p.batch}x{p.sequence}" for p in v.probes))
    if v.generation_match is not None:
        click.echo(f"greedy generation through the KV cache: {len(v.generation_tokens_onnx[0])} "
                   f"steps, tokens match PyTorch")


def _print_onnx_report(report) -> None:
    click.echo(f"wrote {report.onnx_path} ({report.task}, {report.dtype}, opset {report.opset}, "
               f"{report.exporter} exporter{', external data' if report.external_data else ''}) "
               f"in {report.export_seconds:.1f} s")
    if report.adapter_merged:
        click.echo(f"rep adapter {report.adapter} merged into the weights before export")
    if report.exporter_note:
        click.echo(f"note: {report.exporter_note}")
    for s in report.switchable:
        click.echo(f"adapter {s.name}: {s.file} ({s.file_bytes:,} bytes, {s.tensors} tensors, "
                   f"{s.method}, layout {report.switch_layout})")
    b = report.bank
    if b is not None:
        filled = [f"{i}={n}" for i, n in enumerate(b.slots) if n is not None]
        click.echo(f"adapter bank: {b.size} slots ({', '.join(filled) or 'all empty'}), "
                   f"{b.modules} projections, {b.bank_bytes:,} bytes ({b.bytes_per_slot:,} per "
                   f"slot); input adapter_slot (int64 per row, -1 = the base)")
    v = report.validation
    if v is None:
        click.echo("validation skipped (--no-validate)")
        return
    _print_validation(v, "base")
    for s in report.switchable:
        _print_validation(s.validation, f"adapter {s.name}")
    if b is not None:
        for slot_v in b.slot_validation:
            _print_validation(slot_v, f"bank slot {b.slots.index(slot_v.adapter)} ({slot_v.adapter})")
        if b.mixed_passed is not None:
            click.echo(f"mixed batch (row slots {b.mixed_rows}) vs each row alone, merged, in "
                       f"PyTorch: max abs diff {b.mixed_max_abs_diff:.3g}")
    q = report.quantize
    if q is not None:
        click.echo(f"int8: {q.fp32_bytes / 1e6:.1f} MB -> {q.int8_bytes / 1e6:.1f} MB ({q.recipe})")
        if q.text_agreement is not None:
            what = "same class" if q.min_agreement is not None else "same argmax"
            line = (f"int8 vs fp32 on {q.judged_on}: {what} {q.text_agreement:.1%}"
                    + (f" (needed {q.min_agreement:.0%})" if q.min_agreement is not None else "")
                    + f", relative error {q.text_rel_error:.3g}"
                    + ("" if q.min_agreement is not None else f" (allowed {q.rel_error_allowed})"))
            if q.accuracy_fp32 is not None:
                line += f"; accuracy fp32 {q.accuracy_fp32:.4f}, int8 {q.accuracy_int8:.4f}"
            click.echo(line)
        else:
            click.echo(f"int8 judged on {q.judged_on}")
        click.echo(f"int8 vs fp32 on random-token probes: max abs diff {q.max_abs_diff:.3g}, "
                   f"relative error {q.rel_error:.3g}, worst cosine {q.min_cosine:.4f}, argmax "
                   f"agreement {q.argmax_agreement:.1%}")


@export_group.command("safetensors")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(),
              help="Output directory.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True,
              help="Cast floating tensors: auto (keep), float32, float16, bfloat16.")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=_size,
              help="Largest shard in bytes (5GB = 5*10^9; 4GiB = 4*2^30).")
@json_option
@force_option("OUT_DIR")
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
