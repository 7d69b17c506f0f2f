"""Benchmark: merge methods (``merge --method``) on the streaming merge (not a test).

The checkpoint and adapters are bench_merge.py's (a LLaMA-shaped bf16 base with random
weights, a PEFT LoRA r16 and a LoRETTA rep adapter on q, k, v, o, gate, up and down of every
layer). Each method merges the two adapters (weights 1 and 0.7) in its own subprocess, run
round by round; a child reports the wall time of the merge (imports excluded) and its peak
RSS (``ru_maxrss``, imports included). ``linear`` is the fused streaming kernel; every other
method works on whole tensors (docs/merge-methods.md).

``--inputs full``: the inputs are two fully fine-tuned checkpoints of the base instead (every
weight of the base moved by seeded noise, bf16, laid out in shards as the base is), merged
with weights 1 and 0.7 (``FULL_METHODS``), beside ``floor``: the least any tool that reads
every input and durably writes one output spends (safetensors ``load_file`` of every shard of
the base and both fine-tunes, ``save_file`` of the base's tensors under the same output shard
budget, each written file fsynced: bench_merge.py's floor with the fine-tunes read too).
Each round runs every case once, in its own process; the JSON gives per-case medians and the
median of the per-round ratios to that round's floor.

    python benchmarks/bench_methods.py --smoke --out /tmp/methods.json   # seconds, for CI
    python benchmarks/bench_methods.py --size 1gb --out benchmarks/results/methods-1gb.json
    python benchmarks/bench_methods.py --size 1gb --inputs full --repeat 3 \
        --out benchmarks/results/methods-full-1gb.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import measuring  # noqa: E402

METHODS = {  # method -> (parameters, seed)
    "linear": ({}, None),
    "task_arithmetic": ({"lambda": 0.8}, None),
    "ties": ({"density": 0.5}, None),
    "dare_ties": ({"density": 0.5}, 0),
    "della": ({"density": 0.5, "epsilon": 0.1}, 0),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.01}, None),
}


FULL_METHODS = ("floor", "linear", "ties")  # the cases of --inputs full
FINE_TUNES = (("ft0", 1.0), ("ft1", 0.7))  # fine-tune directory, weight
MAX_SHARD = "5GB"  # the output shard budget of the merges and the floor (the merge's default)


def generate_fine_tunes(work: Path, size: str) -> None:
    """ft0/ and ft1/ beside bench_merge.py's base/: every tensor of the base plus seeded
    noise (std 0.002, about a tenth of the weights'), bf16, one tensor at a time, in shards
    of the base's budget (skipped when already there)."""
    import bench_merge
    import torch

    from loretta_merge.io import CheckpointReader, StreamingShardWriter

    for seed, (name, _) in enumerate(FINE_TUNES, start=1):
        if (work / name / "done").exists():
            continue
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir()
        shutil.copy(work / "base" / "config.json", work / name / "config.json")
        g = torch.Generator().manual_seed(seed)
        with CheckpointReader(work / "base") as base:
            writer = StreamingShardWriter(work / name, [(k, base.shape(k), base.dtype(k))
                                                        for k in base.keys()],
                                          bench_merge.SIZES[size]["shard"])
            for key in base.keys():
                w = base.get(key)
                writer.add(key, (w.float() + torch.randn(w.shape, generator=g) * 0.002).to(w.dtype))
            writer.close()
        (work / name / "done").write_text("ok")


def full_floor(work: Path, out: Path, budget: int) -> None:
    """Read every shard of the base and of both fine-tunes (``load_file``), write the base's
    tensors once under ``budget`` bytes per shard, each file fsynced."""
    from safetensors.torch import load_file

    from bench_merge import write_shards

    inputs = [sorted((work / d).glob("*.safetensors")) for d in ("base", *dict(FINE_TUNES))]

    def base_tensors():
        for i in range(max(len(shards) for shards in inputs)):
            for shards in inputs[1:]:  # the fine-tunes: read, as a merge must
                if i < len(shards):
                    load_file(shards[i])
            if i < len(inputs[0]):
                yield from load_file(inputs[0][i]).items()

    write_shards(base_tensors(), out, budget)


def child(method: str, work: Path, out: Path, inputs: str = "adapters") -> dict:
    from loretta_merge.io import parse_size
    from loretta_merge.merge import merge

    if inputs == "full":
        given = [(work / name, w) for name, w in FINE_TUNES]
        params, seed = METHODS.get(method, ({}, None))
    else:
        given = [(work / "lora", 1.0), (work / "rep", 0.7)]
        params, seed = METHODS[method]
    start = time.perf_counter()
    if method == "floor":
        full_floor(work, out, parse_size(MAX_SHARD))
        merged, total = 0, sum(p.stat().st_size for p in out.glob("*.safetensors"))
    else:
        report = merge(work / "base", given, out, force=True, progress=False, method=method,
                       method_params=params, seed=seed, max_shard_bytes=MAX_SHARD)
        merged, total = report.merged_tensors, report.total_bytes
    seconds = time.perf_counter() - start
    return {"method": method, "seconds": round(seconds, 3), "merged_tensors": merged,
            "total_bytes": total,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _rounds(methods: list[str], inputs: str, work: Path, repeat: int) -> dict[str, list[dict]]:
    """Every case once per round, each in its own process."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(repeat):
        for m in methods:
            out = work / f"out-{inputs}-{m}"
            shutil.rmtree(out, ignore_errors=True)
            with measuring() as machine:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", m, "--inputs", inputs, "--work",
                     str(work), "--out", str(out)], capture_output=True, text=True, check=False)
            shutil.rmtree(out, ignore_errors=True)
            if done.returncode != 0:
                sys.exit(f"{m} ({inputs}) failed:\n{done.stderr[-2000:]}")
            runs[m].append(json.loads(done.stdout.strip().splitlines()[-1]))
            runs[m][-1]["machine_state"] = machine
    return runs


def _summary(runs: dict[str, list[dict]]) -> dict:
    out = {m: {"median_seconds": statistics.median(r["seconds"] for r in rs),
               "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
               "merged_tensors": rs[0]["merged_tensors"]} for m, rs in runs.items()}
    if "floor" in runs:
        for m, rs in runs.items():  # per round: this case over that round's floor
            out[m]["over_floor"] = round(statistics.median(
                r["seconds"] / f["seconds"] for r, f in zip(rs, runs["floor"])), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1gb", help="bench_merge.py size: smoke, 1gb, 2gb, 7b")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny size, one round, adapters and full fine-tunes (CI)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds")
    parser.add_argument("--inputs", default="adapters", choices=["adapters", "full"],
                        help="adapters: a LoRA and a rep adapter; full: two fully fine-tuned "
                             "checkpoints, against the I/O floor")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated (adapters: {','.join(METHODS)}; full: "
                             f"{','.join(FULL_METHODS)} by default, any method or floor)")
    parser.add_argument("--work", default=None, help="where the checkpoint is generated/kept")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), Path(args.out), args.inputs)))
        return
    import bench_merge

    if args.smoke:
        args.size, args.repeat = "smoke", 1
    plans = {"adapters": [], "full": []}
    kinds = ["adapters", "full"] if args.smoke else [args.inputs]
    for kind in kinds:
        default = ",".join(METHODS if kind == "adapters" else FULL_METHODS)
        methods = [m for m in (args.methods or default).split(",") if m]
        allowed = set(METHODS) | ({"floor"} if kind == "full" else set())
        unknown = [m for m in methods if m not in allowed]
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(allowed))}")
        plans[kind] = methods
    keep = args.work is not None
    work = Path(args.work) if keep else Path(tempfile.mkdtemp(prefix="bench-methods-"))
    summary = {"size": args.size, "repeat": args.repeat}
    try:
        bench_merge.generate(work, args.size)
        if plans["adapters"]:
            runs = _rounds(plans["adapters"], "adapters", work, args.repeat)
            summary.update({"adapters": ["lora r16 (w 1.0)", "rep (w 0.7)"],
                            "methods": _summary(runs), "runs": runs})
        if plans["full"]:
            generate_fine_tunes(work, args.size)
            runs = _rounds(plans["full"], "full", work, args.repeat)
            summary["full"] = {
                "inputs": [f"{name}: full fine-tune, bf16 (w {w})" for name, w in FINE_TUNES],
                "checkpoint_bytes": sum(p.stat().st_size for p in (work / "base").glob("*.safetensors")),
                "max_shard_size": MAX_SHARD, "methods": _summary(runs), "runs": runs}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    for title, section in (("adapters", summary.get("methods")),
                           ("full fine-tunes", summary.get("full", {}).get("methods"))):
        for m, s in (section or {}).items():
            ratio = f"  {s['over_floor']:5.2f}x floor" if "over_floor" in s else ""
            print(f"{title:15s} {m:16s} {s['median_seconds']:8.2f} s  peak RSS "
                  f"{s['peak_rss_bytes'] / 2**30:5.2f} GiB{ratio}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
