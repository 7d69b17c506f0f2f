"""Benchmark: merging a LoRA into a quantized base (NF4, compressed-tensors W4A16) against the
I/O floor, and the merge's peak memory against its largest output shard (not a test).

Generates a LLaMA-shaped bf16 checkpoint with random weights, quantizes it with
bitsandbytes (NF4, blocksize 64) and with compressed-tensors (W4A16, symmetric, group 128)
through their own packages, and writes a PEFT-format LoRA (r 16) on q,k,v,o,gate,up,down of
every layer. Then runs, each in its own subprocess (one torch thread):

- ``io_floor_<fmt>``: read every stored tensor of the quantized input, write the bf16
  output's tensors (same names, shapes and shard budget) with safetensors;
- ``merge_<fmt>``: ``loretta_merge.merge.merge`` on CPU (dequantize, merge, write bf16).

Each child reports its wall time (imports excluded) and peak RSS; the fastest of
``--repeat`` runs counts. Targets: time within 1.5x the floor (the dequantization is extra
compute the floor does not do), peak RSS <= 1.5x the largest output shard.

    python benchmarks/bench_quant.py --smoke            # seconds (CI)
    python benchmarks/bench_quant.py --size small       # ~25M parameters
    python benchmarks/bench_quant.py --size full        # ~0.55B parameters, ~1.1 GB bf16 out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import measuring  # noqa: E402

from loretta_merge.memory import peak_rss_bytes  # noqa: E402

SIZES = {  # LLaMA shapes; intermediate sizes are multiples of 128 (W4A16's group)
    "smoke": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, vocab_size=1024),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, vocab_size=8000),
    "full": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                 num_attention_heads=16, vocab_size=32000),
}
FORMATS = ("nf4", "w4a16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
# ratio -> (comparison, bound): the targets each format's merge is held to
TARGETS_BY_RATIO = {"vs_io_floor": "<= 1.5", "peak_rss_over_largest_shard": "<= 1.5"}
_COMPARE = {"<=": float.__le__, "<": float.__lt__, ">=": float.__ge__, ">": float.__gt__}


def evaluate_targets(ratios: dict[str, dict[str, float]]) -> list[dict]:
    """One check per format and target: the target, the measured ratio, whether it is met."""
    checks = []
    for fmt, measured in ratios.items():
        for ratio, target in TARGETS_BY_RATIO.items():
            op, bound = target.split()
            value = float(measured[ratio])
            checks.append({"format": fmt, "ratio": ratio, "target": target, "measured": value,
                           "met": bool(_COMPARE[op](value, float(bound)))})
    return checks


def generate(work: Path, size: str) -> None:
    """Write base/ (bf16), nf4/, w4a16/ and lora/ under ``work`` (skipped when there)."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.quant.package_quantizers import quantize_bnb, quantize_ct

    base = work / "base"
    if not base.exists():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**SIZES[size], tie_word_embeddings=False,
                                       max_position_embeddings=256)
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(base, max_shard_size="500MB")
        del model
    if not (work / "nf4").exists():
        quantize_bnb(base, work / "nf4", "nf4")
    if not (work / "w4a16").exists():
        quantize_ct(base, work / "w4a16", "w4a16", group_size=128)
    if not (work / "lora").exists():
        _write_lora(base, work / "lora")


def _write_lora(base: Path, out: Path) -> None:
    """A PEFT-format LoRA adapter written directly (random A and B, r 16)."""
    import torch
    from safetensors.torch import save_file

    from loretta_merge.io import CheckpointReader

    g = torch.Generator().manual_seed(1)
    tensors = {}
    with CheckpointReader(base) as reader:
        for key in reader.keys():
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS:
                n_out, n_in = reader.shape(key)
                tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, n_in, generator=g) / n_in**0.5
                tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, RANK, generator=g) * 0.01
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": TARGETS,
              "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "fan_in_fan_out": False,
              "bias": "none", "use_dora": False, "use_rslora": False}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def child(case: str, work: Path, out: Path, max_shard: str) -> dict:
    """Run one case in this process; return seconds and peak RSS."""
    import torch

    torch.set_num_threads(1)
    from loretta_merge.io import CheckpointReader, parse_size
    fmt = case.split("_")[-1]
    if case.startswith("io_floor"):
        from safetensors.torch import load_file, save_file
    else:
        from loretta_merge.merge import merge
    start = time.perf_counter()
    if case.startswith("io_floor"):
        stored = 0
        for shard in sorted((work / fmt).glob("*.safetensors")):
            stored += sum(t.nbytes for t in load_file(shard).values())  # read and drop
        with CheckpointReader(work / "base") as plain:  # the bf16 output's layout
            layout = [(k, plain.shape(k)) for k in plain.keys()]
        budget, buffer, size, count = parse_size(max_shard), {}, 0, 0
        out.mkdir()
        for key, shape in layout:
            t = torch.zeros(shape, dtype=torch.bfloat16)
            if buffer and size + t.nbytes > budget:
                count += 1
                save_file(buffer, out / f"model-{count:05d}.safetensors")
                buffer, size = {}, 0
            buffer[key], size = t, size + t.nbytes
        save_file(buffer, out / f"model-{count + 1:05d}.safetensors")
    else:
        merge(work / fmt, [(work / "lora", 1.0)], out, device="cpu", progress=False,
              max_shard_bytes=max_shard)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()  # its own: not ru_maxrss, which carries the parent's
    shards = [p.stat().st_size for p in out.glob("*.safetensors")]
    return {"seconds": seconds, "peak_rss_bytes": peak, "largest_output_shard_bytes": max(shards),
            "output_bytes": sum(shards), "output_shards": len(shards)}


def baseline_rss() -> int:
    """Peak RSS of a child that only imports what the merge cases import before their timer."""
    code = ("import torch, loretta_merge.merge; from loretta_merge.memory import peak_rss_bytes; "
            "print(peak_rss_bytes())")
    return int(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout)


def run_case(case: str, args, work: Path, in_process: bool = False) -> dict:
    """``case`` in its own process; with ``in_process`` (a smoke run's later cases, whose
    figures are unread: a torch import saved per case) in this one."""
    out = work / f"out-{case}"
    shutil.rmtree(out, ignore_errors=True)
    if in_process:
        try:
            return child(case, work, out, args.max_shard_size)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--size", args.size, "--work", str(work),
                           "--max-shard-size", args.max_shard_size, "--child", case,
                           "--child-out", str(out)], cwd=ROOT, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"case {case} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="full")
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint, one run: seconds (CI)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default /tmp/loretta-bench-quant-SIZE)")
    ap.add_argument("--output", type=Path, default=None,
                    help="JSON results (default benchmarks/results/quant[-SIZE].json)")
    ap.add_argument("--max-shard-size", default="5GB", help="output shard budget in bytes, e.g. 5GB")
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the fastest counts")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.size, args.repeat = "smoke", 1
    work = args.work or Path(f"/tmp/loretta-bench-quant-{args.size}")
    if args.child:
        print(json.dumps(child(args.child, work, args.child_out, args.max_shard_size)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    # generated in a child, so this parent stays small (children inherit its peak RSS)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                    f"from bench_quant import generate; from pathlib import Path; "
                    f"generate(Path({str(work)!r}), {args.size!r})"], check=True, cwd=ROOT,
                   capture_output=True)
    print(f"checkpoints ready in {work} ({time.perf_counter() - t0:.1f}s)", flush=True)
    results: dict[str, dict] = {}
    for _ in range(args.repeat):  # interleaved, so a slow spell hits every case alike
        for fmt in FORMATS:
            for case in (f"io_floor_{fmt}", f"merge_{fmt}"):
                with measuring(torch_threads=1) as machine:  # the child sets one thread
                    run = run_case(case, args, work, in_process=args.smoke and bool(results))
                run["machine_state"] = machine
                print(f"{case:15s} {run['seconds']:8.2f} s  peak RSS {run['peak_rss_bytes'] / 1e9:6.3f} GB",
                      flush=True)
                best = results.setdefault(case, dict(run, runs=[], machine_states=[]))
                best["runs"].append(run["seconds"])
                best["machine_states"].append(machine)
                best["seconds"] = min(best["runs"])
                best["machine_state"] = best["machine_states"][best["runs"].index(best["seconds"])]
                best["peak_rss_bytes"] = max(best["peak_rss_bytes"], run["peak_rss_bytes"])
    interpreter = baseline_rss()
    summary = {"size": args.size, "config": SIZES[args.size], "max_shard_size": args.max_shard_size,
               "repeat": args.repeat, "torch_threads": 1, "interpreter_rss_bytes": interpreter,
               "input_bytes": {f: sum(p.stat().st_size for p in (work / f).glob("*.safetensors"))
                               for f in FORMATS},
               "cases": results, "ratios": {}, "targets": dict(TARGETS_BY_RATIO)}
    for fmt in FORMATS:
        r, floor = results[f"merge_{fmt}"], results[f"io_floor_{fmt}"]
        summary["ratios"][fmt] = {
            "vs_io_floor": r["seconds"] / floor["seconds"],
            "peak_rss_over_largest_shard": r["peak_rss_bytes"] / r["largest_output_shard_bytes"],
            "peak_rss_above_interpreter_over_largest_shard":
                (r["peak_rss_bytes"] - interpreter) / r["largest_output_shard_bytes"]}
    summary["checks"] = evaluate_targets(summary["ratios"])
    print(f"\ninterpreter baseline RSS {interpreter / 1e9:.3f} GB")
    print(f"{'format':7s} {'in MB':>8s} {'out MB':>8s} {'time/floor':>10s} {'RSS/shard':>10s} {'(-interp)':>10s}")
    for fmt, r in summary["ratios"].items():
        print(f"{fmt:7s} {summary['input_bytes'][fmt] / 1e6:8.1f} "
              f"{results[f'merge_{fmt}']['output_bytes'] / 1e6:8.1f} {r['vs_io_floor']:10.2f} "
              f"{r['peak_rss_over_largest_shard']:10.2f} "
              f"{r['peak_rss_above_interpreter_over_largest_shard']:10.2f}")
    for c in summary["checks"]:
        print(f"target {c['format']} {c['ratio']} {c['target']}: measured {c['measured']:.2f}, "
              f"{'met' if c['met'] else 'MISSED'}")
    output = args.output or ROOT / "benchmarks" / "results" / (
        "quant.json" if args.size == "full" else f"quant-{args.size}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {output}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
