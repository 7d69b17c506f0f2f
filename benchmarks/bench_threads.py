"""Benchmark: the merge kernel's thread count and OMP_WAIT_POLICY (not a test).

Merges the ~1 GB bf16 LLaMA-shaped checkpoint of ``bench_merge.py`` (same builder) with its
PEFT LoRA (r 16) on CPU, once per configuration and round, each in its own subprocess (OpenMP
reads ``OMP_WAIT_POLICY`` when it starts, so it cannot change inside one process):

- ``OMP_WAIT_POLICY`` unset (OpenMP's default: idle threads spin a while) or ``PASSIVE``
  (idle threads sleep at once);
- kernel threads 1, 2, or auto (``LORETTA_KERNEL_THREADS`` unset: the cores available to the
  process minus one, see ``loretta_merge.merge.run.kernel_threads``).

Configurations are interleaved round by round (the order rotates), so a slow spell hits
each alike; the base is read once before each round (page cache warm). Each run records the
1-minute load average before and after it: on a shared machine the figures mean little
without it. The JSON gives per-configuration medians of the wall and CPU time.

    python benchmarks/bench_threads.py --smoke                # ~20 s, for CI
    python benchmarks/bench_threads.py --out benchmarks/results/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
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

from bench_merge import SIZES, generate  # noqa: E402 - the same checkpoint builder
from _machine import cores_available, measuring  # noqa: E402

POLICIES = ("unset", "PASSIVE")
THREADS = ("1", "2", "auto")


def child(work: Path, out: Path) -> dict:
    """One merge in this process: wall and CPU time of the work alone."""
    import torch  # noqa: F401 - imported before the timer

    from loretta_merge.merge import merge
    from loretta_merge.merge.run import kernel_threads

    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    merge(work / "base", [(work / "lora", 1.0)], out, device="cpu", progress=False)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
            "kernel_threads": kernel_threads()}


def _warm(base: Path) -> None:
    for p in base.glob("*.safetensors"):
        with open(p, "rb") as f:
            while f.read(64 * 2**20):
                pass


def _run_child(work: Path, policy: str, threads: str) -> dict:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for key in ("OMP_WAIT_POLICY", "LORETTA_KERNEL_THREADS", "OMP_NUM_THREADS"):
        env.pop(key, None)
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    if threads != "auto":
        env["LORETTA_KERNEL_THREADS"] = threads
    with measuring(torch_threads=None) as machine:  # the child's threads are in its result
        proc = subprocess.run([sys.executable, __file__, "--child", "--work", str(work),
                               "--out", str(out)], cwd=ROOT, capture_output=True, text=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{policy}/{threads} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    machine["torch_threads"] = result["kernel_threads"]  # the child's, not this process's
    return {**result, "load_before": machine["load_1min_before"],
            "load_after": machine["load_1min_after"], "machine_state": machine}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="1gb")
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint, one round: ~20 s (CI)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians reported")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (kept when given)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results path (the merge output, "
                    "with --child)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.work, args.out)))
        return
    if args.smoke:
        args.size, args.repeat = "smoke", 1
    work = args.work or Path(tempfile.mkdtemp(prefix=f"bench_threads-{args.size}-"))
    configs = [(p, t) for p in POLICIES for t in THREADS]
    if args.smoke:  # both policies, both ways of choosing the threads: two children
        configs = [("unset", "auto"), ("PASSIVE", "2")]
    runs: dict[str, list[dict]] = {f"{p}/{t}": [] for p, t in configs}
    try:
        generate(work, args.size)
        checkpoint = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
        for r in range(args.repeat):
            _warm(work / "base")
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for pos, (policy, threads) in enumerate(order, 1):
                res = _run_child(work, policy, threads)
                runs[f"{policy}/{threads}"].append({**res, "round": r + 1, "position_in_round": pos})
                print(f"round {r + 1} {policy:>7}/{threads:<4} {res['wall_s']:7.2f} s "
                      f"(load {res['load_before']} -> {res['load_after']})", file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "size": args.size, "checkpoint_bytes": checkpoint, "adapter": "PEFT LoRA r 16",
        "rounds": args.repeat, "cores_available": cores_available(), "cpu_count": os.cpu_count(),
        "page_cache": "warm", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "configs": {name: {"omp_wait_policy": name.split("/")[0],
                           "kernel_threads": name.split("/")[1],
                           "resolved_threads": rs[0]["kernel_threads"],
                           "wall_s": statistics.median(x["wall_s"] for x in rs),
                           "cpu_s": statistics.median(x["cpu_s"] for x in rs),
                           "load_before": [x["load_before"] for x in rs],
                           "load_after": [x["load_after"] for x in rs],
                           "runs": rs}
                    for name, rs in runs.items()},
    }
    for name, c in summary["configs"].items():
        print(f"{name:>14}: median {c['wall_s']:.2f} s wall, {c['cpu_s']:.2f} s CPU "
              f"(threads {c['resolved_threads']}; load {c['load_before']} -> {c['load_after']})")
    out = args.out or (Path(tempfile.gettempdir()) / "bench_threads-smoke.json" if args.smoke
                       else ROOT / "benchmarks" / "results" / "threads.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
