"""Benchmark: merge methods (``merge --method``) on the streaming merge (not a test).

The checkpoint and adapters are bench_merge.py's (a LLaMA-shaped bf16 base with random
weights, a PEFT LoRA r16 and a LoRETTA rep adapter on q, k, v, o, gate, up and down of every
layer). Each method merges the two adapters (weights 1 and 0.7) in its own subprocess, run
round by round; a child reports the wall time of the merge (imports excluded) and its peak
RSS (``ru_maxrss``, imports included). ``linear`` is the fused streaming kernel; every other
method works on whole tensors (docs/merge-methods.md).

    python benchmarks/bench_methods.py --smoke --out /tmp/methods.json   # seconds, for CI
    python benchmarks/bench_methods.py --size 1gb --out benchmarks/results/methods-1gb.json
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


def child(method: str, work: Path, out: Path) -> dict:
    from loretta_merge.merge import merge

    params, seed = METHODS[method]
    start = time.perf_counter()
    report = merge(work / "base", [(work / "lora", 1.0), (work / "rep", 0.7)], out, force=True,
                   progress=False, method=method, method_params=params, seed=seed)
    seconds = time.perf_counter() - start
    return {"method": method, "seconds": round(seconds, 3), "merged_tensors": report.merged_tensors,
            "total_bytes": report.total_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1gb", help="bench_merge.py size: smoke, 1gb, 2gb, 7b")
    parser.add_argument("--smoke", action="store_true", help="tiny size, one round (CI)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--work", default=None, help="where the checkpoint is generated/kept")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.size, args.repeat = "smoke", 1
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), Path(args.out))))
        return
    import bench_merge

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    keep = args.work is not None
    work = Path(args.work) if keep else Path(tempfile.mkdtemp(prefix="bench-methods-"))
    try:
        bench_merge.generate(work, args.size)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(args.repeat):
            for m in methods:
                with measuring() as machine:
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", m, "--work", str(work),
                         "--out", str(work / f"out-{m}")],
                        capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.exit(f"{m} failed:\n{done.stderr[-2000:]}")
                runs[m].append(json.loads(done.stdout.strip().splitlines()[-1]))
                runs[m][-1]["machine_state"] = machine
                shutil.rmtree(work / f"out-{m}", ignore_errors=True)
        summary = {"size": args.size, "repeat": args.repeat, "adapters": ["lora r16 (w 1.0)",
                                                                         "rep (w 0.7)"],
                   "methods": {m: {"median_seconds": statistics.median(r["seconds"] for r in rs),
                                   "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                                   "merged_tensors": rs[0]["merged_tensors"]}
                               for m, rs in runs.items()},
                   "runs": runs}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    for m, s in summary["methods"].items():
        print(f"{m:16s} {s['median_seconds']:8.2f} s  peak RSS {s['peak_rss_bytes'] / 2**30:5.2f} GiB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
