"""Render every generated block of README.md and the docs pages from the JSON it comes from (issue 24).

    python tools/render_readme.py            # rewrite the generated blocks of every file in FILES in place
    python tools/render_readme.py --check    # exit 1 and name each stale block and its file; write nothing

A generated block sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``, in one of the
files of ``FILES`` (README.md and the docs pages that carry figures; a block name is unique
across them). Each block has one small function below that reads its JSON
(``benchmarks/results/*.json``, or ``docs/supported_models.json``) and returns the Markdown;
nothing in a block is typed by hand, and a figure outside the blocks is refused by
``tests/test_readme_figures.py``. Where a JSON records the machine's state (``machine_state``:
load average before and after, cores available, torch threads; ``benchmarks/_machine.py``),
the block prints it beside the figures. ``docs/supported_models.md`` is not in ``FILES``: it
is the whole output of ``tools/supported_models.py``, which writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path[:0] = [str(TOOLS), str(ROOT)]

import merge_table  # noqa: E402
import render_extract_accuracy  # noqa: E402
import supported_models  # noqa: E402
import train_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
# the files whose blocks are rendered here, relative to the repository root
FILES = ("README.md", "docs/benchmarks.md", "docs/quantized.md", "docs/onnx.md", "docs/merge-methods.md",
         "docs/extract.md")


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _src(*names: str) -> str:
    return "Source: " + ", ".join(f"`benchmarks/results/{n}`" for n in names) + "."


def _range(values, fmt: str = "{:.2f}", unit: str = "") -> str:
    lo, hi = min(values), max(values)
    return f"{fmt.format(lo)}{unit}" if fmt.format(lo) == fmt.format(hi) else \
        f"{fmt.format(lo)}-{fmt.format(hi)}{unit}"


def _e(x: float) -> str:
    """``4.4e-3``: one decimal, no zero-padded exponent."""
    return f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e")


def machine_note(states: list[dict | None]) -> str:
    """One sentence on the machine's state during the measurements of a block."""
    states = [s for s in states if s]
    if not states:
        return ("The JSON records no machine state (load average, cores, threads): it was "
                "measured before benchmarks recorded it; the figures may carry other jobs' load.")
    loads = [s["load_1min_before"] for s in states] + [s["load_1min_after"] for s in states]
    cores = sorted({s["cores_available"] for s in states})
    threads = sorted({s["torch_threads"] for s in states if s.get("torch_threads") is not None})
    cpus = sorted({s["cpu"] for s in states if s.get("cpu")})  # recorded since 2026-12
    busy = max(loads) > max(cores)
    return (f"Machine state during the measurements: 1-minute load average "
            f"{_range(loads, '{:.1f}')} on {'/'.join(map(str, cores))} cores available"
            + (f" ({' / '.join(cpus)})" if cpus else "")
            + (f", {'/'.join(map(str, threads))} torch thread(s)" if threads else "")
            + (" (busier than its cores: absolute times are inflated by other jobs)." if busy else "."))


# ----------------------------------------------------------------------------- blocks

def supported_models_block() -> str:
    results = json.loads((ROOT / "docs" / "supported_models.json").read_text())
    section = supported_models.table(results)
    begin, end = supported_models.BEGIN, supported_models.END
    return section[section.index(begin) + len(begin):section.index(end)]


MERGE_FILES = ("merge-1gb.json", "merge-2gb.json", "merge-7b.json")


def merge_block() -> str:
    parts = []
    for name in MERGE_FILES:
        result = _load(name)
        states = [r.get("machine_state") for c in result["cases"].values() for r in c.get("runs", [])]
        parts.append(merge_table.table(result) + "\n" + machine_note(states) + "\n")
    small = [_load(n) for n in MERGE_FILES[:2]]
    floor = {c: [r["ratios"][c]["wall_over_floor"] for r in small] for c in ("lora", "rep")}
    peft = [r["ratios"][c]["peft_wall_over_ours"] for r in small for c in ("lora", "rep")]
    rss = [r["cases"]["lora"]["peak_rss_above_interpreter_bytes"] / r["largest_input_shard_bytes"]
           for r in small]
    parts.append(
        f"On the 1 GB and 2 GB checkpoints both merges are within "
        f"{max(floor['lora'] + floor['rep']):.2f}x of the durable floor (LoRA "
        f"{floor['lora'][0]:.2f}x and {floor['lora'][1]:.2f}x, rep {floor['rep'][0]:.2f}x and "
        f"{floor['rep'][1]:.2f}x) and {_range(peft, '{:.1f}')}x faster than PEFT, with peak RSS "
        f"above the interpreter at {rss[0]:.2f}x and {rss[1]:.2f}x the largest shard. "
        + big_sentence(_load(MERGE_FILES[2])) + _src(*MERGE_FILES))
    return "\n".join(parts)


def big_sentence(result: dict) -> str:
    """The 7B run in words: its page cache is partly cold, so its floor is not the others'."""
    r = result["ratios"]
    cases = [c for c in ("lora", "rep") if c in r]
    floor = [r[c]["wall_over_floor"] for c in cases]
    direct = [r[c]["wall_over_copy_direct"] for c in cases if "wall_over_copy_direct" in r[c]]
    peft = [r[c]["peft_wall_over_ours"] for c in cases if "peft_wall_over_ours" in r[c]]
    text = (f"On the {result['checkpoint_bytes'] / 1e9:.1f} GB checkpoint, which does not fit in "
            f"the page cache beside its outputs, the merges take {_range(floor, '{:.2f}')}x the "
            f"safetensors floor: that floor writes through the page cache and then waits for "
            f"the disk, while the merge's writer streams with O_DIRECT")
    if direct:
        text += f"; against the O_DIRECT copy of the same bytes they take {_range(direct, '{:.2f}')}x"
    if peft:
        text += f", and PEFT takes {_range(peft, '{:.1f}')}x as long as they do"
    return text + ". "


def train_block() -> str:
    return train_table.render([Path("benchmarks/results/train_demo.json"),
                               Path("benchmarks/results/train_full.json")], root=ROOT)


QUANT_FORMATS = {
    "bnb-nf4": "bitsandbytes NF4", "bnb-fp4": "bitsandbytes FP4",
    "bnb-nf4-dq": "bitsandbytes NF4, double quant", "bnb-fp4-dq": "bitsandbytes FP4, double quant",
    "bnb-int8": "bitsandbytes int8 (LLM.int8)", "torchao-int8": "torchao int8 weight-only",
    "torchao-int4": "torchao int4 (`IntxWeightOnlyConfig`, group 32)",
    "torchao-fp8": "torchao float8 weight-only", "ct-fp8": "compressed-tensors FP8 (per channel)",
    "ct-int8": "compressed-tensors INT8 (per channel)",
    "ct-w4a16": "compressed-tensors W4A16 pack-quantized, symmetric (group 32)",
    "ct-w4a16-asym": "compressed-tensors W4A16 pack-quantized, asymmetric (group 32)",
    "gptq": "GPTQ 4-bit, group 32", "gptq-actorder": "GPTQ 4-bit, group 32, act-order",
    "awq": "AWQ GEMM 4-bit, group 32",
}
SHORT = {"bnb-nf4": "NF4", "bnb-nf4-dq": "NF4 double quant", "ct-w4a16-asym": "W4A16 asymmetric",
         "gptq-actorder": "GPTQ act-order", "awq": "AWQ"}


def quant_errors_block() -> str:
    data = _load("quant-errors.json")
    errors = data["errors"]
    lora = [errors[f"lora/{f}"] for f in QUANT_FORMATS if f"lora/{f}" in errors]
    moves = max(e["adapter_moves_logits_by"] for e in lora)
    logits = max(e["max_abs_logit"] for e in lora)
    lines = [f"The LoRA moves the logits by up to {moves:.2f} (logits up to {logits:.2f}); the "
             f"remaining difference is the output's bf16 rounding. Test bound: "
             f"{data['logit_tolerance']:.0e}.".replace("e-0", "e-"),
             "", "| format | made with | max \\|logit diff\\| |", "|---|---|---|"]
    lines += [f"| {QUANT_FORMATS[e['format']]} | {e['made_with']} | {_e(e['max_abs_logit_diff'])} |"
              for e in lora]
    other = {kind: ", ".join(f"on {SHORT.get(e['format'], e['format'])} {_e(e['max_abs_logit_diff'])}"
                             for e in errors.values() if e["kind"] == kind) for kind in ("rep", "dora")}
    lines += ["", f"Other adapter kinds: LoRETTA rep adapter {other['rep']}; DoRA {other['dora']}. "
              f"Written by `LORETTA_RECORD_RESULTS=1 pytest tests/test_quant.py`; "
              + _src("quant-errors.json")]
    return "\n".join(lines)


def quant_bench_block() -> str:
    name = "quant.json" if (RESULTS / "quant.json").is_file() else "quant-small.json"
    q = _load(name)
    mb = q["cases"]["merge_nf4"]["output_bytes"] / 1e6
    interp = q["interpreter_rss_bytes"] / 1e9
    peaks = [q["cases"][f"merge_{f}"]["peak_rss_bytes"] / 1e9 for f in ("nf4", "w4a16")]
    r = q["ratios"]
    checks = q.get("checks") or []
    met = "; ".join(f"{c['format']} {c['ratio']} {c['measured']:.2f} against {c['target']}: "
                    f"**{'met' if c['met'] else 'missed'}**" for c in checks)
    states = [s for c in q["cases"].values() for s in c.get("machine_states", [])]
    merges = [_load(n) for n in MERGE_FILES[:2]]
    bf16 = [m["ratios"][c]["wall_over_floor"] for m in merges for c in ("lora", "rep")]
    other = ("" if q["size"] == "full" else
             "The ~1 GB preset (`--size full`, ~0.55B parameters) is to be run on a quiet machine: "
             "`python benchmarks/bench_quant.py --size full`. ")
    return (
        f"Benchmark (`benchmarks/bench_quant.py`, one torch thread, fastest of {q['repeat']} runs): "
        f"NF4 and compressed-tensors W4A16 (group 128) bases merged with an r-16 LoRA. "
        f"`--size {q['size']}` ({mb:.0f} MB bf16 output): NF4 {r['nf4']['vs_io_floor']:.2f}x the "
        f"I/O floor (read the quantized input, write the bf16 output), W4A16 "
        f"{r['w4a16']['vs_io_floor']:.2f}x; peak RSS {_range(peaks)} GB of which {interp:.2f} GB "
        f"is the interpreter ({r['nf4']['peak_rss_above_interpreter_over_largest_shard']:.1f}x / "
        f"{r['w4a16']['peak_rss_above_interpreter_over_largest_shard']:.1f}x the {mb:.0f} MB output "
        f"shard above it). "
        + (f"Targets, evaluated by the run (`checks` in the JSON): {met}. " if checks else
           "The JSON evaluates no targets. ")
        + machine_note(states)
        + f" For comparison, the bf16 merges of `bench_merge.py` (1 GB and 2 GB checkpoints) run at "
        f"{_range(bf16)}x their floor. " + other
        + _src(name, *MERGE_FILES[:2]))


def onnx_switch_block() -> str:
    e = _load("export.json")
    layouts = e["switchable"]["layouts"]
    lines = ["| layout | batch x seq | adapter active ms | merged graph ms | no adapter ms | "
             "adapter file bytes |", "|---|---|---|---|---|---|"]
    for name, lay in layouts.items():
        size = max(lay["adapter_file_bytes"].values())
        lines += [f"| {name} | {r['batch']} x {r['sequence']} | {r['switchable_ms']:.2f} | "
                  f"{r['merged_ms']:.2f} | {r['no_adapter_ms']:.2f} | {size:,} |" for r in lay["rows"]]
    tt, fa = layouts["tt"], layouts["factors"]
    pairs = "; ".join(f"{a['batch']} x {a['sequence']}: {a['switchable_ms']:.1f} vs {b['switchable_ms']:.1f} ms"
                      for a, b in zip(tt["rows"], fa["rows"]))
    tt_b, fa_b = max(tt["adapter_file_bytes"].values()), max(fa["adapter_file_bytes"].values())
    states = [r.get("machine_state") for lay in layouts.values() for r in lay["rows"]]
    return "\n".join([f"One thread, median of {e['repeats']} interleaved runs:", "", *lines, "",
                      f"Adapter active, tt against factors: {pairs}. The TT files are "
                      f"{fa_b / tt_b:.1f}x smaller ({tt_b / 1e3:.0f} KB against {fa_b / 1e3:.0f} KB). "
                      + machine_note(states) + " " + _src("export.json")])


def onnx_optimize_block() -> str:
    e = _load("onnx_optimize.json")
    lines = [f"Measured by `python benchmarks/bench_onnx_optimize.py` (onnxscript "
             f"{e['onnxscript']}, torch {e['torch']}, {e['threads']} thread, median of "
             f"{e['repeat']} runs taking turns): the bank graph of a tiny Llama with the KV cache "
             f"({e['bank_slots']} slots, two rep adapters and a PEFT LoRA), as traced, optimized "
             f"by onnxscript's default rules and by ours (without "
             f"{', '.join(e['skipped_rules'])}):", "",
             "| layers | nodes (Slice) | default rules | ours | default / ours | same graph |",
             "|---|---|---|---|---|---|"]
    for r in e["rows"]:
        lines.append(f"| {r['layers']} | {r['nodes']:,} ({r['slice_nodes']}) | {r['default_s']:.2f} s "
                     f"| {r['ours_s']:.2f} s | {r['default_over_ours']:.2f}x | "
                     f"{'yes' if r['same_graph'] else 'no'} |")
    lines += ["", machine_note([r.get("machine_state") for r in e["rows"]]) + " "
              + _src("onnx_optimize.json")]
    return "\n".join(lines)


def onnx_bank_block() -> str:
    e = _load("serving.json")
    t, m = e["throughput"], e["memory"]
    lines = [f"Measured by `python benchmarks/bench_serving.py` on {e['model']}, adapters "
             f"{e['adapter']}, ONNX Runtime on {e['providers'][0]}, {e['threads']} thread, median "
             f"of {e['repeats']} interleaved runs; {t['rows']} rows of {t['sequence']} tokens, "
             f"{t['rows'] // t['adapters']} rows per adapter:", "",
             "| served as | runs per batch | ms per batch | rows per second |", "|---|---|---|---|",
             f"| one mixed batch, bank of {t['adapters']} | 1 | {t['mixed_ms']:.1f} | "
             f"{t['mixed_rows_per_s']:.0f} |",
             f"| one `--switchable-adapter` run per adapter | {t['adapters']} | "
             f"{t['switchable_ms']:.1f} | {t['switchable_rows_per_s']:.0f} |",
             f"| {t['adapters']} merged models | {t['adapters']} | {t['merged_ms']:.1f} | "
             f"{t['merged_rows_per_s']:.0f} |",
             f"| bound, not a mixed batch: all rows through one merged model | 1 | "
             f"{t['one_model_whole_batch_ms']:.1f} | {t['one_model_whole_batch_rows_per_s']:.0f} |", "",
             "| bank slots | bank bytes | one request ms | merged model ms | bank / merged |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['slots']} | {r['bank_bytes']:,} | {r['request_ms']:.2f} | "
              f"{r['merged_model_ms']:.2f} | {r['over_merged']:.2f}x |" for r in e["latency"]]
    full = e.get("full_adapters")
    states = [t.get("machine_state")] + [r.get("machine_state") for r in e["latency"]] + (
        [full.get("machine_state")] if full else [])
    if full:
        lines += ["", (f"Adapters as `train` makes them (every LayerNorm, the replaced pooler "
                       f"dense and the head switched per row too: {full['row_tensors']} tensors "
                       f"per slot): the mixed batch takes {full['mixed_ms']:.1f} ms against "
                       f"{full['low_rank_only_mixed_ms']:.1f} ms for the low-rank-only bank "
                       f"({full['over_low_rank_only']:.2f}x), a bank of "
                       f"{full['bank_bytes_8']:,} bytes for {t['adapters']} slots; every row "
                       f"equals PyTorch with its adapter merged to "
                       f"{_e(full['max_abs_diff_vs_torch_merged'])}.")]
    rec = e.get("reconstruction") or []
    if rec:
        states += [r.get("machine_state") for r in rec]
        pairs = "; ".join(f"{r['slots']} slots, batch {r['batch']}: {r['per_row_ms']:.3f} vs "
                          f"{r['per_slot_ms']:.3f} ms" for r in rec)
        lines += ["", (f"Where the rep factors are rebuilt, for one banked projection of this "
                       f"model (r 8, TT rank 5, 64 tokens per row): per row (each row's cores "
                       f"gathered, then rebuilt: the exported choice, whose cost follows the "
                       f"batch) against per slot (the whole bank rebuilt, then gathered): {pairs}.")]
    return "\n".join(lines + ["", (
        f"Memory: the bank holds {m['bytes_per_slot']:,} bytes per slot "
        f"({m['bank_bytes_8']:,} for {t['adapters']} slots, {m['bank_bytes_64']:,} for 64) beside "
        f"a base graph of {m['base_graph_bytes'] / 1e6:.1f} MB ({100 * m['bank_64_over_base']:.2f}% "
        f"at 64 slots); {t['adapters']} merged models take {m['merged_models_bytes_8'] / 1e6:.0f} MB. "
        f"The mixed batch's rows equal the merged models' rows to "
        f"{_e(t['max_abs_diff_mixed_vs_merged'])} (max abs diff). The mixed run costs "
        f"{100 * (t['mixed_ms'] / t['one_model_whole_batch_ms'] - 1):+.1f}% against the same "
        f"batch through one merged model: the per-row gather is cheap, but on one CPU thread a "
        f"{t['rows']}-row batch is no faster than {t['adapters']} small ones, so one run instead "
        f"of {t['adapters']} gains nothing here; it pays where batching does (GPUs, many "
        f"threads: not measured on this machine). " + machine_note(states)
        + " " + _src("serving.json"))])


def onnx_int8_block() -> str:
    e = _load("export.json")
    lines = [f"Measured by `python benchmarks/bench_export.py --repeats {e['repeats']}` (one thread "
             f"each, the runtimes taking turns within every repeat):", "",
             "| model | batch x seq | PyTorch ms | ORT fp32 ms | ORT int8 ms | int8 vs fp32 | "
             "int8 vs PyTorch |", "|---|---|---|---|---|---|---|"]
    rows = [(m, r) for m in e["models"] for r in m["rows"]]
    lines += [f"| {m['model']} | {r['batch']} x {r['sequence']} | {r['torch_ms']:.1f} | "
              f"{r['ort_fp32_ms']:.1f} | {r['ort_int8_ms']:.1f} | {r['fp32_over_int8']:.2f}x | "
              f"{r['torch_over_int8']:.2f}x |" for m, r in rows]
    lines.append("")
    for m in e["models"]:
        q = m["int8"]
        lines.append(f"- {m['model']}: {q['fp32_bytes'] / 1e6:.1f} MB -> {q['int8_bytes'] / 1e6:.1f} MB; "
                     f"relative error {q['rel_error_vs_fp32']:.3f}, max abs diff "
                     f"{q['max_abs_diff_vs_fp32']:.3g}, worst cosine {q['min_cosine_vs_fp32']:.4f}, "
                     f"argmax agreement {100 * q['argmax_agreement']:.1f}%")
    vs32 = [r["fp32_over_int8"] for _, r in rows]
    vst = [r["torch_over_int8"] for _, r in rows]
    faster = all(v > 1 for v in vs32) and all(v > 1 for v in vst)
    minilm = next(m for m in e["models"] if m["model"] == "minilm")
    lines += ["", (f"int8 is faster than fp32 ORT in every row ({min(vs32):.1f}x to {max(vs32):.1f}x) "
                   f"and than PyTorch eager ({min(vst):.1f}x to {max(vst):.1f}x). " if faster else
                   f"int8 against fp32 ORT: {min(vs32):.1f}x to {max(vs32):.1f}x; against PyTorch "
                   f"eager: {min(vst):.1f}x to {max(vst):.1f}x. ")
                  + f"The errors above are on random-token probes (information: the export "
                  f"judges int8 on real sentences, see the next table); MiniLM's, "
                  f"{minilm['int8']['rel_error_vs_fp32']:.2f}, is "
                  f"{'above' if minilm['int8']['rel_error_vs_fp32'] > 0.1 else 'within'} 0.1 "
                  f"(the benchmark accepts up to {e['int8_max_error']}). "
                  + machine_note([r.get("machine_state") for _, r in rows]) + " " + _src("export.json")]
    return "\n".join(lines)


def onnx_export_block() -> str:
    e = _load("export.json")
    times = ", ".join(f"{m['model']} {m['export_seconds']:.1f} s (validated apart: max diff "
                      f"{_e(m['validation_fp32'])} on {m['providers']['fp32'][0]})" for m in e["models"])
    lines = [f"ONNX Runtime (CPU provider, all graph optimisations) against PyTorch eager, "
             f"{e['threads']} thread each, median of {e['repeats']} interleaved runs; MiniLM is the "
             f"real embedded model (feature extraction), the Llama a random hidden-256, 4-layer "
             f"causal LM. Export times (tracing and saving, validation not included): {times}.", "",
             "| model | batch x seq | PyTorch ms | ORT ms | PyTorch / ORT | max abs diff |",
             "|---|---|---|---|---|---|"]
    rows = [(m, r) for m in e["models"] for r in m["rows"]]
    lines += [f"| {m['model']} | {r['batch']} x {r['sequence']} | {r['torch_ms']:.1f} | "
              f"{r['ort_fp32_ms']:.1f} | {r['torch_over_fp32']:.2f}x | {_e(r['max_abs_diff_fp32'])} |"
              for m, r in rows]
    slower = [f"{m['model']} at {r['batch']} x {r['sequence']} ({r['torch_over_fp32']:.2f}x)"
              for m, r in rows if r["torch_over_fp32"] < 1]
    lines += ["", ("ONNX Runtime is faster in every row. " if not slower else
                   "ONNX Runtime is slower than PyTorch eager on " + ", ".join(slower)
                   + " and faster elsewhere. ")
              + machine_note([r.get("machine_state") for _, r in rows]) + " " + _src("export.json")]
    return "\n".join(lines)


def tt_block() -> str:
    t = _load("tt.json")
    rec = t["reconstruct"]
    repeats = f"median of {t['repeat']}" if "repeat" in t else "median of the repeats"
    lines = [f"LLaMA-2-7B adapter shapes, {t['threads']} threads, {repeats}. "
             "Reconstruction contracts the left and right halves and finishes with one matmul; "
             "the reference is the naive left-to-right tensordot chain and tensorly's "
             "`tt_to_tensor`.", "",
             "| reconstruct | ours ms | chain ms | tensorly ms | chain / ours |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {1e3 * r['ours_s']:.2f} | {1e3 * r['chain_s']:.2f} | "
              f"{1e3 * r['tensorly_s']:.2f} | {r['speedup_vs_chain']:.2f}x |" for r in rec]
    lines += ["", "TT-SVD against tensorly's `tensor_train` at the same ranks (so the same error):", "",
              "| TT-SVD | ours ms | tensorly ms | tensorly / ours | our error | tensorly error |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {1e3 * r['ours_s']:.1f} | {1e3 * r['tensorly_s']:.1f} | "
              f"{r['speedup_vs_tensorly']:.2f}x | {r['our_rel_error']:.5f} | {r['tensorly_rel_error']:.5f} |"
              for r in t["tt_svd"]]
    big = [r["speedup_vs_chain"] for r in rec if r["batch"] > 1 or len(r["modes"]) >= 8]
    six = next(r for r in rec if "[16]*6" in r["case"])
    states = [r.get("machine_state") for r in rec + t["tt_svd"]]
    lines += ["", f"Reconstruction is {_range(big, '{:.0f}')}x faster than the chain for batched "
              f"and 8-mode TTs; for the 6-mode 4096 x 4096 TT both are bound by writing the 64 MiB "
              f"result ({six['speedup_vs_chain']:.1f}x). The errors of random matrices at rank 8 are "
              f"near 1 by nature; the point is equal error at lower cost. " + machine_note(states)
              + " " + _src("tt.json")]
    return "\n".join(lines)


def convert_block() -> str:
    c = _load("convert.json")
    runs = c["runs"]
    lines = ["| factors | setting | ours s | tensorly s | speed-up | compression | delta error max / "
             "mean | tensorly max | eps met |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
        eps = "-" if r["eps_met"] is None else str(r["eps_met"])
        lines.append(f"| {r['kind']} | {setting} | {r['ours_s']:.2f} | {r['tensorly_s']:.2f} | "
                     f"{r['speedup']:.1f}x | {r['compression']:.1f}x | {r['max_delta_err']:.3f} / "
                     f"{r['mean_delta_err']:.3f} | {r['tensorly_max_delta_err']:.3f} | {eps} |")
    faster = all(r["speedup"] > 1 for r in runs)
    grow = [r for r in runs if r["compression"] < 1]
    lines += ["", ("Faster than the tensorly loop at the same error in every setting" if faster else
                   "Not faster than the tensorly loop in every setting")
              + " (same-shaped factors are decomposed together in one batched TT-SVD)."
              + (" Random factors do not compress, and the report says so ("
                 + "; ".join(f"at {', '.join(f'{k} {v}' for k, v in r['setting'].items())} the TT is "
                             f"larger than the LoRA: {r['compression']:.1f}x" for r in grow) + ")."
                 if grow else "")
              + " " + machine_note([r.get("machine_state") for r in runs]) + " " + _src("convert.json")]
    return "\n".join(lines)


def extract_block() -> str:
    r = _load("extract.json")
    cases, ratios = r["cases"], r["ratios"]
    ours, floor, mk = cases["ours"], cases["floor"], cases.get("mergekit")
    gib = 2**30
    states = [x.get("machine_state") for c in cases.values() for x in c.get("runs", [])]
    rows = ["| case | runs | wall s | work s (startup subtracted) | peak RSS GiB | above interpreter GiB |",
            "|---|---|---|---|---|---|"]

    def row(name, c, label):
        work = c.get("work_s")
        above = c.get("peak_rss_above_interpreter_bytes")
        rows.append(f"| {label} | {len(c['runs'])} | {c['wall_s']:.2f} | "
                    f"{'-' if work is None else f'{work:.2f}'} | {c['peak_rss_bytes'] / gib:.2f} | "
                    f"{'-' if above is None else f'{above / gib:.2f}'} |")

    row("floor", floor, "I/O floor: read both, write and fsync an adapter-sized file")
    row("ours", ours, f"`loretta-merge extract --rank {r['rank']} --to lora`")
    if mk:
        scope = (f"{r['mergekit_modules']} modules (`--include-regex {r['mergekit_include_regex']}`)"
                 if r.get("mergekit_include_regex") else "all modules")
        row("mergekit", mk, f"`mergekit-extract-lora --max-rank {r['rank']}`, {scope}")
    o = ratios["ours"]
    errs = list((r.get("sampled_module_errors") or {}).values())
    summ = ours["runs"][0]["report_summary"]
    text = (f"A {r['base_bytes'] / 1e9:.2f} GB bf16 base and its fine-tune ({r['shards']} shards "
            f"in all, rank-{r['finetune']['delta_rank']} deltas on the {summ['modules']} targeted "
            f"projections, a changed norm), page cache {r['page_cache'].split(' ')[0]}, medians. "
            f"Ours takes {o['wall_over_floor']:.0f}x the I/O floor's wall ({o['work_over_floor']:.0f}x "
            f"with its interpreter startup subtracted)"
            + (": within the 2x-of-floor goal. " if o["work_over_floor"] <= 2 else
               ": the floor reads cached bytes at memory speed, while every module's delta is "
               "formed in fp32 and passed over several times by the sketch's matrix products, so "
               "the 2x-of-floor goal is not met on this machine. ")
            + f"Peak RSS above the interpreter is "
            f"{o['peak_rss_above_interpreter_over_two_shards']:.2f}x two shards (goal: 1.5x"
            + ("; met). " if o["peak_rss_above_interpreter_over_two_shards"] <= 1.5 else "; missed). "))
    if errs:
        text += (f"The rank-{r['rank']} factors come from a randomized SVD; at the sampled modules their "
                 f"delta error is {_range([e['err_over_exact'] for e in errs], '{:.3f}')}x the exact "
                 f"truncated SVD's (relative error {_range([e['err'] for e in errs], '{:.4f}')}). ")
    if mk:
        text += (f"mergekit (exact SVD of every delta) took {mk['wall_s']:.0f} s for "
                 + (f"{r['mergekit_modules']} of the {summ['modules']} modules" if r.get("mergekit_include_regex")
                    else "all modules")
                 + f" (peak RSS {mk['peak_rss_bytes'] / gib:.2f} GiB), ours {ours['wall_s']:.0f} s for "
                 f"all {summ['modules']}"
                 + (" (mergekit measured in an earlier run on the same pair, at the load below)"
                    if "mergekit" in (r.get("reused_cases") or {}).get("cases", []) else "") + ". ")
    text += ("Interpreter: Python with what each command loads before reading a tensor"
             + (" (ours includes the Llama modeling code it uses to find the Linear modules). "
                if "transformers" in r["interpreter"]["ours"] else
                " (ours finds a Llama's Linear modules from its key names: no transformers import). "))
    return "\n".join(rows) + "\n\n" + text + machine_note(states) + " " + _src("extract.json")


def _threads_table(name: str) -> list[str]:
    r = _load(name)
    configs = r["configs"]
    policies = ["unset", "PASSIVE"]
    threads = list(dict.fromkeys(c["kernel_threads"] for c in configs.values()))
    lines = ["| kernel threads | " + " | ".join(f"`OMP_WAIT_POLICY` {p}" for p in policies) + " |",
             "|---|" + "---|" * len(policies)]
    for t in threads:
        resolved = next(c["resolved_threads"] for c in configs.values() if c["kernel_threads"] == t)
        label = f"auto (= {resolved} here)" if t == "auto" else t
        lines.append(f"| {label} | " + " | ".join(f"{configs[f'{p}/{t}']['wall_s']:.2f} s"
                                                 for p in policies) + " |")
    loads = [x for c in configs.values() for x in c["load_before"] + c["load_after"]]
    states = [x.get("machine_state") for c in configs.values() for x in c["runs"]]
    note = (machine_note(states) if any(states) else
            f"1-minute load average {_range(loads, '{:.1f}')} around the runs (from the JSON).")
    lines += ["", f"Merge of the {r['checkpoint_bytes'] / 1e9:.2f} GB bf16 checkpoint with a "
                  f"{r['adapter']}, page cache {r['page_cache']}, one process per configuration, "
                  f"median of {r['rounds']}. " + note + " " + _src(name)]
    return lines


def threads_block() -> str:
    """The quiet run (``threads.json``), then the same script on the loaded machine."""
    return "\n".join(["On a quiet machine:", ""] + _threads_table("threads.json")
                     + ["", "The same benchmark while other jobs loaded the machine:", ""]
                     + _threads_table("threads-loaded.json"))

def onnx_int8_classifier_block() -> str:
    e = _load("int8.json")
    d = e["default_export"]
    how = "; ".join(f"`{c}`" for c in e["model"])
    lines = [f"The quickstart's classifier ({how}), exported with `--quantize int8` and no other "
             f"option: " + (f"**passed**, the int8 graph gives the fp32 class on "
                            f"{100 * d['text_agreement']:.1f}% of {d['judged_on']} (needed "
                            f"{100 * d['min_agreement']:.0f}%), relative error "
                            f"{d['text_rel_error']:.3f} there; {100 * d['argmax_agreement']:.0f}% "
                            f"argmax agreement and relative error {d['rel_error']:.2f} on the "
                            f"random-token probes (reported, not judged)."
                            if d["passed"] else f"**refused**: {d['refusal']}"),
             "",
             f"Variants of the same fp32 graph ({e['fp32_bytes'] / 1e6:.1f} MB), measured by "
             f"`python benchmarks/bench_int8.py --repeats {e['repeats']}`: class agreement with "
             f"fp32 on the {e['calibration']} and on {e['test_rows']} held-out test rows, test "
             f"accuracy (fp32: {100 * e['accuracy_fp32_test']:.1f}%), time at batch "
             f"{e['timing_shape'][0]} x seq {e['timing_shape'][1]} (one ORT thread each, taking "
             f"turns):", "",
             "| variant | agreement (calibration) | agreement (test) | rel. error (calibration) "
             "| test accuracy | MB | fp32 ms | int8 ms | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in e["variants"]:
        lines.append(f"| {v['variant']} | {100 * v['agreement_calibration']:.1f}% | "
                     f"{100 * v['agreement_test']:.1f}% | {v['rel_error_calibration']:.3f} | "
                     f"{100 * v['accuracy_int8_test']:.1f}% | {v['bytes'] / 1e6:.1f} | "
                     f"{v['fp32_ms']:.0f} | {v['int8_ms']:.0f} | {v['speedup']:.2f}x |")
    default = e["variants"][0]
    lines += ["", f"The export uses the first row (ORT dynamic quantization, per-channel weight "
                  f"scales): {default['speedup']:.2f}x fp32 at this shape "
                  f"({'at least' if default['speedup'] >= 1.5 else 'below'} the 1.5x aimed for). "
              + machine_note([v.get("machine_state") for v in e["variants"]])
              + " " + _src("int8.json")]
    return "\n".join(lines)


def _rss_cell(m: dict) -> str:
    """Peak RSS, and that peak above the RSS after imports over the largest input shard
    (the issue's bound: 1.5x) where the JSON has it."""
    cell = f"{m['peak_rss_bytes'] / 2**30:.2f} GiB"
    if "rss_over_largest_shard" in m:
        cell += (f" | {m['peak_rss_above_imports_bytes'] / 2**30:.2f} GiB = "
                 f"{m['rss_over_largest_shard']:.1f}x")
    return cell


def _methods_rows(methods: dict, *, floor: bool) -> list[str]:
    rows = []
    for name, m in methods.items():
        label = ("floor (read every input, write one output, fsync)" if name == "floor"
                 else m.get("label", name))
        ratio = f" | {m['over_floor']:.2f}x" if floor else ""
        rows.append(f"| {label} | {m['median_seconds']:.2f}{ratio} | {_rss_cell(m)} |")
    return rows


def _methods_header(first: str, floor: bool, rss_ratio: bool) -> list[str]:
    cols = [first, "seconds", *(["over the floor"] if floor else []), "peak RSS",
            *(["peak RSS above imports = x largest input shard"] if rss_ratio else [])]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _methods_states(runs: dict) -> list:
    return [r.get("machine_state") for rs in runs.values() for r in rs]


def _shard_note(q: dict) -> str:
    if "largest_input_shard_bytes" not in q:
        return ""
    return (f" The largest input shard is {q['largest_input_shard_bytes'] / 2**30:.2f} GiB "
            f"(the issue bounds peak RSS above the interpreter by 1.5x of it).")


def _mergekit_lines(mk: dict) -> tuple[list[str], list]:
    """The mergekit rows of the adapter block, and their machine states."""
    prep = mk["preparation"]
    lines = ["", f"The same job through mergekit 0.1.5 (`mergekit-yaml`, its own process; wall "
                 f"time includes its imports). mergekit merges adapters only as full models, so "
                 f"each base+adapter is written first (`{prep['command']}`: "
                 f"{prep['output_bytes'] / 1e9:.2f} GB in all); that preparation is counted in its "
                 f"total. Ours runs the same merge through its command line, measured the same "
                 f"way (imports included), and the outputs are compared tensor by tensor:", "",
             "| command | seconds | peak RSS | mergekit's total with the preparation | "
             r"max \|ours - mergekit\| (entries that differ) |", "|---|---|---|---|---|",
             f"| preparation for mergekit ({len(prep['steps'])} full models) | {prep['wall_s']:.2f} | "
             f"{prep['peak_rss_bytes'] / 2**30:.2f} GiB | | |"]
    states = [st.get("machine_state") for st in prep["steps"].values()]
    for name, r in mk["methods"].items():
        cmp, ours = r["vs_ours"], r["ours_cli"]
        lines.append(f"| loretta-merge merge --method {name} | {ours['wall_s']:.2f} | "
                     f"{ours['peak_rss_bytes'] / 2**30:.2f} GiB | | |")
        states.append(ours.get("machine_state"))
        lines.append(f"| mergekit-yaml {r['config']['merge_method']} | {r['wall_s']:.2f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['total_wall_s']:.2f} s, "
                     f"{r['total_peak_rss_bytes'] / 2**30:.2f} GiB | {cmp['max_abs_diff']:.2g} "
                     f"({cmp['entries_differing']:,} of {cmp['entries']:,}; largest change "
                     f"{cmp['max_abs_merged_change']:.2g}) |")
        states.append(r.get("machine_state"))
    return lines, states


def methods_block() -> str:
    q = _load("methods-1gb.json")
    rss = any("rss_over_largest_shard" in m for m in q["methods"].values())
    lines = [f"`python benchmarks/bench_methods.py --size {q['size']}`: bench_merge.py's ~1 GB bf16 "
             f"LLaMA-shaped checkpoint, {', '.join(q['adapters'])} on all seven linears of every "
             f"layer; each method in its own process, median of {q['repeat']} round(s); peak RSS "
             f"includes the interpreter and imports.{_shard_note(q)}", ""]
    floor = "floor" in q["methods"]  # (results before the adapter case had a floor: none)
    if floor:
        lines[0] += (" Each case over the floor of its own round: read the base and the "
                     "adapters, write one output.")
    lines += _methods_header("method", floor, rss)
    lines += _methods_rows(q["methods"], floor=floor)
    states = _methods_states(q["runs"])
    if "mergekit" in q:
        more, mk_states = _mergekit_lines(q["mergekit"])
        lines += more
        states += mk_states
    lines += ["", machine_note(states) + " " + _src("methods-1gb.json")]
    return "\n".join(lines)


def methods_summary_block() -> str:
    """The README's lines on merge methods' speed: the figures of the two method runs."""
    q = _load("methods-1gb.json")
    m, full = q["methods"], _load("methods-full-1gb.json")["full"]["methods"]

    def case(c: dict) -> str:
        ratio = f", {c['over_floor']:.1f}x the I/O floor" if "over_floor" in c else ""
        return (f"{c['median_seconds']:.1f} s{ratio}, peak RSS above imports "
                f"{c['rss_over_largest_shard']:.1f}x the largest input shard")

    text = (f"On the ~1 GB bf16 benchmark checkpoint and this project's 2-core CPU, three "
            f"adapters merge by `ties` in {case(m['ties'])}; by `ties --tie-break first` in "
            f"{case(m['ties-first'])}; by `linear` in {case(m['linear'])}.")
    mk = q.get("mergekit", {}).get("methods", {}).get("ties")
    if mk:
        text += (f" mergekit's `ties` on the same adapters takes {mk['total_wall_s']:.0f} s, "
                 f"writing the base+adapter models it needs first, and peaks at "
                 f"{mk['total_peak_rss_bytes'] / 2**30:.1f} GiB; our command line "
                 f"{mk['ours_cli']['wall_s']:.1f} s and {mk['ours_cli']['peak_rss_bytes'] / 2**30:.1f} GiB.")
    text += (f" Two full fine-tunes of the base: `linear` {full['linear']['over_floor']:.1f}x the "
             f"floor (read every input, write one output), `ties` {full['ties']['over_floor']:.1f}x, "
             f"`ties --tie-break first` {full['ties-first']['over_floor']:.1f}x. The methods are "
             f"CPU-bound; the tables and why: [speed and memory](docs/merge-methods.md#speed-and-memory). "
             f"Source: `benchmarks/results/methods-1gb.json`, `benchmarks/results/methods-full-1gb.json`.")
    return text


def methods_full_block() -> str:
    name = next(n for n in ("methods-full-1gb.json", "methods-full-100mb.json")
                if (RESULTS / n).is_file())
    q = _load(name)
    f = q["full"]
    rss = any("rss_over_largest_shard" in m for m in f["methods"].values())
    lines = [f"`--size {q['size']} --inputs full` ({f['checkpoint_bytes'] / 1e9:.2f} GB bf16 base; "
             f"{'; '.join(f['inputs'])}), median of {q['repeat']} round(s), each case over the "
             f"floor of its own round.{_shard_note(f)}", ""]
    lines += _methods_header("case", True, rss)
    lines += _methods_rows(f["methods"], floor=True)
    lines += ["", machine_note(_methods_states(f["runs"])) + " " + _src(name)]
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {
    "supported-models": supported_models_block,
    "quant-errors": quant_errors_block,
    "quant-bench": quant_bench_block,
    "onnx-switch": onnx_switch_block,
    "onnx-bank": onnx_bank_block,
    "onnx-optimize": onnx_optimize_block,
    "onnx-int8": onnx_int8_block,
    "onnx-int8-classifier": onnx_int8_classifier_block,
    "tt-bench": tt_block,
    "merge-bench": merge_block,
    "merge-threads": threads_block,
    "extract-bench": extract_block,
    "convert-bench": convert_block,
    "onnx-export": onnx_export_block,
    "train-bench": train_block,
    "methods-bench": methods_block,
    "methods-full-bench": methods_full_block,
    "methods-summary": methods_summary_block,
    "extract-accuracy": render_extract_accuracy.extract_accuracy_block,
    "extract-resize": render_extract_accuracy.extract_resize_block,
}


# ----------------------------------------------------------------------------- machinery

def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def block_names(text: str) -> list[str]:
    """The names of the generated blocks the text marks, in order."""
    import re

    return re.findall(r"<!-- ([\w-]+):begin -->", text)


def current(text: str, name: str) -> str:
    begin, end = markers(name)
    return text[text.index(begin) + len(begin):text.index(end)]


def rendered(name: str) -> str:
    return "\n" + BLOCKS[name]().strip() + "\n"


def stale_blocks(text: str) -> list[str]:
    """Names of the blocks whose text differs from a fresh rendering (or that have no renderer);
    blank lines at a block's edges do not count (the older per-table tools write them)."""
    return [n for n in block_names(text)
            if n not in BLOCKS or current(text, n).strip() != rendered(n).strip()]


def render_all(text: str) -> str:
    for name in block_names(text):
        if name not in BLOCKS:
            raise SystemExit(f"block {name!r} has no renderer in tools/render_readme.py")
        begin, end = markers(name)
        start, stop = text.index(begin) + len(begin), text.index(end)
        text = text[:start] + rendered(name) + text[stop:]
    return text


def files_blocks(root: Path = ROOT) -> dict[Path, list[str]]:
    """Each file of ``FILES`` under ``root`` (those that exist) and the blocks it marks."""
    return {root / f: block_names((root / f).read_text()) for f in FILES if (root / f).is_file()}


def placement_errors(found: dict[Path, list[str]]) -> list[str]:
    """What is wrong with where the blocks sit: a renderer whose block no file marks, a block
    marked more than once (in one file or across files)."""
    where: dict[str, list[str]] = {}
    for path, names in found.items():
        for n in names:
            where.setdefault(n, []).append(path.name if path.parent.name != "docs" else f"docs/{path.name}")
    errors = [f"no markers for block {n} in any of {', '.join(FILES)}" for n in BLOCKS if n not in where]
    errors += [f"block {n} is marked more than once: {', '.join(w)}" for n, w in where.items() if len(w) > 1]
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report stale blocks, write nothing")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the tree whose FILES are rendered (default: this repository)")
    args = ap.parse_args(argv)
    found = files_blocks(args.root)
    errors = placement_errors(found)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 1
    if args.check:
        stale = [(path, name) for path in found for name in stale_blocks(path.read_text())]
        for path, name in stale:
            print(f"stale: {name} in {path} (run python tools/render_readme.py)", file=sys.stderr)
        return 1 if stale else 0
    for path in found:
        text = path.read_text()
        new = render_all(text)
        if new != text:
            path.write_text(new)
    print(f"rendered {sum(map(len, found.values()))} blocks into {len(found)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
