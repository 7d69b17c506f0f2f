"""Start-up time of the command line: ``loretta-merge --help`` / ``--version`` / ``<command>
--help`` against ``python -c "import torch"`` (the named reference: what every command would
pay if the CLI imported torch to print its help) and ``python -c pass`` (the interpreter alone).

Each case is a fresh process, started exactly as the console script starts
(``from loretta_merge.cli import main; main()``); the cases take turns, round after round,
so a slow spell of the machine hits them all alike. Reported per case: the median and the
minimum and maximum wall time over ``--runs`` rounds, and whether the process imported torch
(checked in one extra run per case). Load average before and after and the core count are
written with the figures, since a busy machine slows every case.

    python benchmarks/bench_start.py [--runs 15] [--out benchmarks/results/start.json]
    python benchmarks/bench_start.py --smoke --out /tmp/start-smoke.json   # 1 round, no warm-up (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import measuring  # benchmarks/ is the script's own folder, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from loretta_merge.cli import main; main()"
# one extra run per case reports (on stderr) whether torch got imported
PROBE = ("import atexit, sys; atexit.register(lambda: sys.stderr.write("
         "'\\nLORETTA-PROBE torch=%s\\n' % ('torch' in sys.modules))); ")

CASES = {
    "loretta-merge --help": ["-c", CLI, "--help"],
    "loretta-merge --version": ["-c", CLI, "--version"],
    "loretta-merge merge --help": ["-c", CLI, "merge", "--help"],
    "loretta-merge train --help": ["-c", CLI, "train", "--help"],
    "python -c 'import torch' (reference)": ["-c", "import torch"],
    "python -c pass (interpreter only)": ["-c", "pass"],
}
REFERENCE = "python -c 'import torch' (reference)"


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{args} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return elapsed, proc


def _imports_torch(args: list[str], env: dict[str, str]) -> bool:
    probed = ["-c", PROBE + args[1], *args[2:]]
    _, proc = _run(probed, env)
    return "LORETTA-PROBE torch=True" in proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15, help="rounds (each case once per round)")
    ap.add_argument("--out", default="benchmarks/results/start.json", help="where the JSON goes")
    ap.add_argument("--smoke", action="store_true", help="1 round, no warm-up: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.runs = 1
    env = _env()
    for case in () if args.smoke else CASES.values():  # warm the file cache once, untimed
        _run(case, env)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    with measuring(torch_threads=None) as machine:  # the cases run in fresh processes
        for _ in range(args.runs):
            for name, case in CASES.items():
                times[name].append(_run(case, env)[0])

    cases = {}
    for name, case in CASES.items():
        ts = times[name]
        cases[name] = {"median_s": round(statistics.median(ts), 4), "min_s": round(min(ts), 4),
                       "max_s": round(max(ts), 4), "runs": len(ts),
                       "imports_torch": _imports_torch(case, env)}
    ref = cases[REFERENCE]["median_s"]
    for entry in cases.values():
        entry["vs_import_torch"] = round(entry["median_s"] / ref, 3)

    results = {
        "what": "wall time of a fresh process, median over rounds; cases interleaved",
        "reference": REFERENCE,
        "smoke": args.smoke,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "machine_state": machine,
        "cases": cases,
    }
    width = max(map(len, cases))
    print(f"{'case':{width}s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'x torch':>8s}  torch?")
    for name, e in cases.items():
        print(f"{name:{width}s} {e['median_s']:9.3f} {e['min_s']:7.3f} {e['max_s']:7.3f} "
              f"{e['vs_import_torch']:8.3f}  {'yes' if e['imports_torch'] else 'no'}")
    print(f"load average before {machine['load_1min_before']}, after {machine['load_1min_after']}; "
          f"{machine['cores_available']} cores available")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
