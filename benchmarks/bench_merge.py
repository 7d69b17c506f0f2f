"""Benchmark: streaming merge vs the I/O floor and vs PEFT merge_and_unload (not a test).

Generates a synthetic LLaMA-shaped bf16 checkpoint (random weights, several input shards),
a LoRETTA_rep adapter (our format; R 5, r 8) and a PEFT LoRA (r 16), both on
q,k,v,o,gate,up,down of every layer. Then runs, each in its own subprocess (one thread):

- ``cp``: a byte copy of the shards (for information);
- ``io_floor``: a plain safetensors read-and-write copy (``load_file`` / ``save_file``)
  with the same output shard layout as the merge;
- ``merge_rep`` / ``merge_lora``: ``loretta_merge.merge.merge`` on CPU;
- ``peft``: transformers ``from_pretrained`` + ``PeftModel.from_pretrained`` +
  ``merge_and_unload`` + ``save_pretrained``.

Each child reports its wall time (the work only, imports excluded) and its own peak RSS
(``getrusage(RUSAGE_SELF)``); with ``--repeat N`` (default 2) the cases run N times
interleaved and the fastest time and the largest RSS count. Results go to
``benchmarks/results/merge.json`` (``merge-small.json`` for ``--size small``) with ratios
against the I/O floor and PEFT. All runs read a warm page cache.

    python benchmarks/bench_merge.py --size small    # ~25M parameters, a quick check
    python benchmarks/bench_merge.py                 # ~1B parameters
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # LLaMA shapes: hidden, intermediate, layers, heads, vocab
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, vocab_size=8000),
    "full": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=16, vocab_size=32000),
}
TARGETS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
INPUT_SHARD_BYTES = {"small": 15 * 10**6, "full": 500 * 10**6}


def _linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # (out, in)


def generate(work: Path, size: str) -> None:
    """Write base/, rep/ and lora/ under ``work`` (skipped when already there)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from loretta_merge import tt
    from loretta_merge.formats import Adapter, RepModule, TTMatrix, write_adapter
    from loretta_merge.io import ShardWriter

    if (work / "done").exists():
        return
    shutil.rmtree(work, ignore_errors=True)
    (work / "base").mkdir(parents=True)
    cfg = SIZES[size]
    config = LlamaConfig(**cfg, num_key_value_heads=cfg["num_attention_heads"],
                         tie_word_embeddings=False, max_position_embeddings=2048)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(work / "base")
    g = torch.Generator().manual_seed(0)
    h, shapes = cfg["hidden_size"], _linear_shapes(cfg)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    writer = ShardWriter(work / "base", INPUT_SHARD_BYTES[size])
    writer.add("model.embed_tokens.weight", rnd(cfg["vocab_size"], h))
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        writer.add(f"{p}.input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
        for part, names in TARGETS.items():
            for n in names:
                writer.add(f"{p}.{part}.{n}.weight", rnd(*shapes[n]))
        writer.add(f"{p}.post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rnd(cfg["vocab_size"], h))
    writer.close()

    modules, lora = {}, {}
    for layer in range(cfg["num_hidden_layers"]):
        for part, names in TARGETS.items():
            for n in names:
                out_f, in_f = shapes[n]
                name = f"model.layers.{layer}.{part}.{n}"
                a = TTMatrix(tt.random_cores(tt.matrix_modes(in_f, 8), 5, in_f, 8, generator=g), in_f, 8)
                b = TTMatrix(tt.random_cores(tt.matrix_modes(8, out_f), 5, 8, out_f, generator=g), 8, out_f)
                modules[name] = RepModule(a=a, b=b, scale=2.0)
                lora[f"base_model.model.{name}.lora_A.weight"] = torch.randn(16, in_f, generator=g) * 0.01
                lora[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, 16, generator=g) * 0.01
    targets = [n for names in TARGETS.values() for n in names]
    write_adapter(Adapter(method="rep", source="loretta-merge", modules=modules,
                          config={"r": 8, "lora_alpha": 16, "tensor_rank": 5, "target_modules": targets},
                          base_model_name_or_path=str(work / "base")), work / "rep")
    (work / "lora").mkdir()
    save_file(lora, work / "lora" / "adapter_model.safetensors", metadata={"format": "pt"})
    (work / "lora" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32,
        "lora_dropout": 0.0, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(work / "base"), "inference_mode": True}))
    (work / "done").write_text("ok")


def child(case: str, work: Path, out: Path, max_shard: str) -> dict:
    """Run one case in this process; return seconds and peak RSS."""
    import torch

    torch.set_num_threads(1)
    # each case imports what it needs before its timer (and only that: imports count in RSS)
    from loretta_merge.io import parse_size
    if case == "io_floor":
        from safetensors.torch import load_file, save_file
    elif case.startswith("merge_"):
        from loretta_merge.merge import merge
    elif case == "peft":
        import transformers.models.llama.modeling_llama  # noqa: F401
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

    base = work / "base"
    start = time.perf_counter()
    if case == "cp":
        out.mkdir()
        for p in base.iterdir():
            shutil.copyfile(p, out / p.name)
    elif case == "io_floor":
        budget, buffer, size, shards = parse_size(max_shard), {}, 0, []
        out.mkdir()
        for shard in sorted(base.glob("*.safetensors")):
            for k, t in load_file(shard).items():
                if buffer and size + t.nbytes > budget:
                    shards.append(buffer)
                    save_file(buffer, out / f"model-{len(shards):05d}.safetensors")
                    buffer, size = {}, 0
                buffer[k] = t
                size += t.nbytes
        save_file(buffer, out / f"model-{len(shards) + 1:05d}.safetensors")
    elif case in ("merge_rep", "merge_lora"):
        merge(base, [(work / case.split("_")[1], 1.0)], out, device="cpu", progress=False,
              max_shard_bytes=max_shard)
    elif case == "peft":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, work / "lora").merge_and_unload()
        model.save_pretrained(out, max_shard_size=max_shard)
    else:
        raise SystemExit(f"unknown case {case}")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out_shards = [p.stat().st_size for p in out.glob("*.safetensors")]
    return {"seconds": seconds, "peak_rss_bytes": peak, "largest_output_shard_bytes": max(out_shards),
            "output_shards": len(out_shards)}


def baseline_rss() -> int:
    """Peak RSS of a child that only imports what the merge cases import before their timer."""
    code = ("import resource, torch, loretta_merge.merge;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="full")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default /tmp/loretta-bench-SIZE)")
    ap.add_argument("--max-shard-size", default="5GB", help="output shard budget in bytes, e.g. 5GB")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per case; the fastest counts (the machine is shared and noisy)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work or Path(f"/tmp/loretta-bench-{args.size}")
    if args.child:
        print(json.dumps(child(args.child, work, args.out, args.max_shard_size)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    # generated in a child: a forked child inherits this process's peak RSS across exec,
    # so the parent must stay small for the children's peak RSS to mean anything
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                    f"from bench_merge import generate; from pathlib import Path; "
                    f"generate(Path({str(work)!r}), {args.size!r})"], check=True, cwd=ROOT)
    print(f"checkpoint ready in {work} ({time.perf_counter() - t0:.1f}s)", flush=True)
    base_bytes = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
    cases = ["cp", "io_floor", "merge_rep", "merge_lora"] + ([] if args.skip_peft else ["peft"])
    results: dict[str, dict] = {}
    for _ in range(args.repeat):  # interleaved, so a slow spell hits every case alike
        for case in cases:
            out = work / f"out-{case}"
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.run([sys.executable, __file__, "--size", args.size, "--work", str(work),
                                   "--max-shard-size", args.max_shard_size, "--child", case,
                                   "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"case {case} failed")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            shutil.rmtree(out, ignore_errors=True)
            print(f"{case:11s} {run['seconds']:8.2f} s  peak RSS {run['peak_rss_bytes'] / 1e9:6.2f} GB",
                  flush=True)
            best = results.setdefault(case, dict(run, runs=[]))
            best["runs"].append(run["seconds"])
            best["seconds"] = min(best["runs"])
            best["peak_rss_bytes"] = max(best["peak_rss_bytes"], run["peak_rss_bytes"])
    floor = results["io_floor"]["seconds"]
    summary = {"size": args.size, "checkpoint_bytes": base_bytes, "max_shard_size": args.max_shard_size,
               "repeat": args.repeat, "torch_threads": 1,
               "interpreter_rss_bytes": baseline_rss(), "cases": results, "ratios": {}}
    for case in ("merge_rep", "merge_lora"):
        r = results[case]
        summary["ratios"][case] = {
            "vs_io_floor": r["seconds"] / floor,
            "peft_over_ours": results["peft"]["seconds"] / r["seconds"] if "peft" in results else None,
            "peak_rss_over_largest_shard": r["peak_rss_bytes"] / r["largest_output_shard_bytes"],
        }
    targets = {"vs_io_floor": "<= 1.25", "peft_over_ours": ">= 3", "peak_rss_over_largest_shard": "< 1.5"}
    print(f"\ncheckpoint {base_bytes / 1e9:.2f} GB bf16; interpreter baseline RSS "
          f"{summary['interpreter_rss_bytes'] / 1e9:.2f} GB")
    print(f"{'case':11s} {'time/floor':>10s} {'PEFT/time':>10s} {'RSS/shard':>10s}")
    for case, r in summary["ratios"].items():
        peft = f"{r['peft_over_ours']:.2f}" if r["peft_over_ours"] else "-"
        print(f"{case:11s} {r['vs_io_floor']:10.2f} {peft:>10s} {r['peak_rss_over_largest_shard']:10.2f}")
    print("targets: " + ", ".join(f"{k} {v}" for k, v in targets.items()))
    summary["targets"] = targets
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    name = "merge.json" if args.size == "full" else f"merge-{args.size}.json"  # keep the full figures
    (res_dir / name).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {res_dir / name}")


if __name__ == "__main__":
    main()
