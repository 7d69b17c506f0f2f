"""Benchmark: ``loretta-merge extract`` against its I/O floor and ``mergekit-extract-lora``.

Builds the LLaMA-shaped bf16 base of ``bench_merge.py`` (same sizes, same generator) and a
"fine-tune" of it: every targeted projection (q, k, v, o, gate, up, down) gets a rank-32
delta with a geometrically decaying spectrum (ratio 0.8, elements of about 10% of the
weights' size), and every ``post_attention_layernorm`` changes; the rest is the base's. It
is written sharded, with config.json, so both tools load it. Then, each in its own process
and interleaved round by round:

- ``floor``: read every byte of both checkpoints (raw reads into one reused buffer) and
  write, then fsync, a file of the size of our adapter: what any extractor must do;
- ``ours``: ``loretta-merge extract BASE FT -o OUT --to lora --rank R`` (the CLI);
- ``mergekit``: ``mergekit-extract-lora --base-model BASE --model FT --out-path OUT
  --max-rank R`` (1 round by default: it is slow);
- ``startup-ours`` / ``startup-mergekit``: the same interpreter importing what each command
  imports and doing nothing else; subtracted from the command's wall to give ``work_s``.

Wall time is taken around the child process. Peak RSS is the child's ``ru_maxrss`` (read by
a small launcher, so no other child counts); "above interpreter" subtracts the startup
child's peak. The page cache is warm (both checkpoints read before each run). The
adapter's delta error at the sampled modules is compared with the exact truncated SVD's
(the least any rank-R factorisation can have), so a randomized SVD's error is measured.

    python benchmarks/bench_extract.py --smoke --out /tmp/x.json   # seconds, for CI
    python benchmarks/bench_extract.py                             # ~1 GB pair, results/extract.json
"""

from __future__ import annotations

import argparse
import json
import os
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
from bench_merge import SIZES, TARGETS  # noqa: E402

DELTA_RANK, DECAY, DELTA_RMS = 32, 0.8, 2e-3
CASES = ("floor", "ours", "mergekit")
# the interpreter of each command: Python with the code it loads before reading any tensor
# (ours plans a LLaMA pair from its key names: no transformers import)
STARTUP = {"ours": "import torch, loretta_merge.cli, loretta_merge.converters.extract, loretta_merge.formats",
           "mergekit": "import mergekit.scripts.extract_lora"}


def make_finetune(work: Path) -> None:
    """ft/ from base/: low-rank deltas on the targets, a changed norm (one tensor in memory)."""
    import torch

    from loretta_merge.io import CheckpointReader, StreamingShardWriter

    if (work / "ft-done").exists():
        return
    shutil.rmtree(work / "ft", ignore_errors=True)
    (work / "ft").mkdir()
    shutil.copy(work / "base" / "config.json", work / "ft" / "config.json")
    size = json.loads((work / "size").read_text())
    g = torch.Generator().manual_seed(1)
    with CheckpointReader(work / "base") as base:
        layout = [(k, base.shape(k), base.dtype(k)) for k in base.keys()]
        writer = StreamingShardWriter(work / "ft", layout, SIZES[size]["shard"])
        for key, _, _ in layout:
            w = base.get(key)
            if key.endswith("post_attention_layernorm.weight"):
                w = (w.float() + 0.01 * torch.randn(w.shape, generator=g)).to(w.dtype)
            elif len(w.shape) == 2 and any(f".{n}." in key for ns in TARGETS.values() for n in ns):
                out_f, in_f = w.shape
                s = DECAY ** torch.arange(DELTA_RANK, dtype=torch.float32)
                s *= DELTA_RMS * (out_f * in_f) ** 0.5 / float(s.norm())
                u = torch.linalg.qr(torch.randn(out_f, DELTA_RANK, generator=g))[0]
                v = torch.linalg.qr(torch.randn(in_f, DELTA_RANK, generator=g))[0]
                w = (w.float() + (u * s) @ v.T).to(w.dtype)
            writer.add(key, w)
        writer.close()
    (work / "ft-done").write_text("ok")


# --------------------------------------------------------------------------- children

def _floor(work: Path, out: Path, nbytes: int) -> None:
    import mmap

    chunk = 16 * 2**20
    buf = mmap.mmap(-1, chunk)
    for d in ("base", "ft"):
        for shard in sorted((work / d).glob("*.safetensors")):
            with open(shard, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    with open(out, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, chunk)
            f.write(memoryview(buf)[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


MERGEKIT_INCLUDE: str | None = None   # --mergekit-include: restrict mergekit to these modules


def _command(case: str, work: Path, out: Path, rank: int, adapter_bytes: int) -> list[str]:
    py = sys.executable
    if case == "floor":
        return [py, __file__, "--floor-child", str(work), str(out), str(adapter_bytes)]
    if case == "ours":
        return [py, "-c", "import sys; from loretta_merge.cli import main; sys.argv[0] = 'loretta-merge'; main()",
                "extract", str(work / "base"), str(work / "ft"), "-o", str(out), "--to", "lora",
                "--rank", str(rank), "--json", "--target-modules", ",".join(n for ns in TARGETS.values() for n in ns)]
    if case == "mergekit":
        exe = Path(sys.executable).with_name("mergekit-extract-lora")
        return [str(exe), "--base-model", str(work / "base"), "--model", str(work / "ft"),
                "--out-path", str(out), "--max-rank", str(rank), "--quiet"] + (
                    ["--include-regex", MERGEKIT_INCLUDE] if MERGEKIT_INCLUDE else [])
    if case.startswith("startup-"):
        return [py, "-c", STARTUP[case[len("startup-"):]]]
    raise ValueError(case)


_LAUNCH = ("import json, resource, subprocess, sys, time\n"
           "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "wall = time.perf_counter() - t; r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
           "print(json.dumps({'rc': p.returncode, 'wall_s': wall, 'cpu_s': r.ru_utime + r.ru_stime,\n"
           "  'peak_rss_bytes': r.ru_maxrss * 1024, 'stdout': p.stdout[-200000:], 'stderr': p.stderr[-3000:]}))\n")


def run_case(case: str, work: Path, rank: int, adapter_bytes: int) -> dict:
    out = work / f"out-{case}"
    shutil.rmtree(out, ignore_errors=True)
    if out.exists():
        out.unlink()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, *_command(case, work, out, rank, adapter_bytes)],
                          capture_output=True, text=True, env=env, cwd=work)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise SystemExit(f"case {case} failed:\n{r['stderr']}")
    if out.is_dir():
        r["output_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        if case == "mergekit" and (out / "adapter_model.safetensors").is_file():
            from safetensors import safe_open
            with safe_open(out / "adapter_model.safetensors", "pt") as f:
                r["adapter_keys"] = [k for k in f.keys() if "lora_" in k]
    report = None
    if case == "ours":
        report = json.loads(r["stdout"][r["stdout"].index("{"):])
    r.pop("stdout"), r.pop("stderr")
    return r | ({"report": report} if report else {}) | {"out": str(out)}


def _warm(work: Path) -> None:
    for d in ("base", "ft"):
        for p in (work / d).glob("*.safetensors"):
            with open(p, "rb") as f:
                while f.read(64 * 2**20):
                    pass


def exact_errors(work: Path, lora_dir: Path, rank: int, modules: list[str]) -> dict:
    """For ``modules``: the adapter's relative delta error and the exact rank-R optimum."""
    import torch
    from safetensors.torch import load_file

    from loretta_merge.io import CheckpointReader

    factors = load_file(lora_dir / "adapter_model.safetensors")
    rows = {}
    with CheckpointReader(work / "base") as b, CheckpointReader(work / "ft") as f:
        for m in modules:
            # float64 throughout: an fp32 norm over millions of elements is off by ~1e-4,
            # as large as the differences measured here
            d = f.get(m + ".weight").double() - b.get(m + ".weight").double()
            a = factors[f"base_model.model.{m}.lora_A.weight"].double()
            bb = factors[f"base_model.model.{m}.lora_B.weight"].double()
            s = torch.linalg.svdvals(d)
            best = float((s[rank:] ** 2).sum().sqrt() / s.norm())
            got = float(torch.linalg.matrix_norm(d - bb @ a) / torch.linalg.matrix_norm(d))
            rows[m] = {"shape": list(d.shape), "err": got, "err_exact_svd": best,
                       "err_over_exact": got / best if best > 0 else None}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=[s for s in SIZES if s in ("smoke", "1gb", "2gb")], default="1gb")
    ap.add_argument("--smoke", action="store_true", help="tiny pair, one round: seconds (CI)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of floor and ours (medians)")
    ap.add_argument("--mergekit-repeat", type=int, default=1, help="rounds of mergekit")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--mergekit-include", default=None,
                    help="regex: mergekit extracts only these modules (its exact SVDs are slow), "
                         "e.g. 'model\\.layers\\.0\\.' (recorded in the JSON)")
    ap.add_argument("--reuse-from", type=Path, default=None,
                    help="an earlier JSON of this script on the same pair: its runs of the cases "
                         "not measured now (e.g. mergekit, slow) are taken over, marked as such")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated pair")
    ap.add_argument("--out", type=Path, default=None, help="JSON results path")
    ap.add_argument("--floor-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global MERGEKIT_INCLUDE
    MERGEKIT_INCLUDE = args.mergekit_include
    if args.floor_child:
        _floor(Path(args.floor_child[0]), Path(args.floor_child[1]), int(args.floor_child[2]))
        return
    if args.smoke:
        args.size, args.repeat, args.mergekit_repeat, args.rank = "smoke", 1, 1, 8
        if args.cases == ",".join(CASES):  # mergekit's imports alone take longer than the rest
            args.cases = "floor,ours"
    work = args.work or Path(tempfile.gettempdir()) / f"loretta-extract-bench-{args.size}-{os.getpid() if args.smoke else 0}"
    t0 = time.perf_counter()
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmarks')!r}]; "
            f"from pathlib import Path; from bench_merge import generate; "
            f"from bench_extract import make_finetune; w = Path({str(work)!r}); "
            f"generate(w, {args.size!r}); (w / 'size').write_text('\"{args.size}\"'); make_finetune(w)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    base_b = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
    ft_b = sum(p.stat().st_size for p in (work / "ft").glob("*.safetensors"))
    shards = [p.stat().st_size for d in ("base", "ft") for p in (work / d).glob("*.safetensors")]
    print(f"pair {base_b / 1e9:.2f} + {ft_b / 1e9:.2f} GB ({len(shards)} shards), ready in "
          f"{time.perf_counter() - t0:.1f}s ({work})", flush=True)
    cases = [c for c in args.cases.split(",") if c]
    if "mergekit" in cases and not Path(sys.executable).with_name("mergekit-extract-lora").exists():
        cases.remove("mergekit")
    runs: dict[str, list[dict]] = {}
    adapter_bytes = 0
    exact = None
    try:
        # the adapter's size (for the floor) comes from one run of ours first
        order = (["ours"] if "ours" in cases else []) + [c for c in cases if c != "ours"]
        for round_ in range(max(args.repeat, args.mergekit_repeat)):
            todo = [c for c in order if round_ < (args.mergekit_repeat if c == "mergekit" else args.repeat)]
            if round_ % 2:
                todo = todo[::-1]
            if not args.smoke:  # the smoke run checks the script, not the figures
                todo += [f"startup-{c}" for c in todo if c in STARTUP]
            for case in todo:
                _warm(work)
                with measuring() as machine:
                    r = run_case(case, work, args.rank, adapter_bytes)
                r["machine_state"] = machine
                r["round"] = round_ + 1
                if case == "ours":
                    adapter_bytes = adapter_bytes or r["output_bytes"]
                    if exact is None:
                        names = [f"model.layers.0.{p}.{n}" for p, n in
                                 (("self_attn", "q_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj"))]
                        exact = exact_errors(work, Path(r["out"]), args.rank, names)
                    rep = r.pop("report")
                    r["report_summary"] = rep["summary"]
                    r["extract_seconds"] = rep["seconds"]
                runs.setdefault(case, []).append(r)
                print(f"round {round_ + 1} {case:17s} wall {r['wall_s']:7.2f}s cpu {r['cpu_s']:7.2f}s "
                      f"peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB  load {machine['load_1min_before']}",
                      flush=True)
                shutil.rmtree(work / f"out-{case}", ignore_errors=True)
                if (work / f"out-{case}").exists():
                    (work / f"out-{case}").unlink()
    finally:
        if args.smoke or not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    reused = []
    if args.reuse_from:
        earlier = json.loads(args.reuse_from.read_text())
        for case, c in earlier["cases"].items():
            if case not in runs:
                runs[case] = [dict(r, reused_from=str(args.reuse_from.name)) for r in c["runs"]]
                reused.append(case)

    def med(case, k):
        vals = [r[k] for r in runs.get(case, []) if r.get(k) is not None]
        return statistics.median(vals) if vals else None

    cases_out = {}
    for case in runs:
        cases_out[case] = {k: med(case, k) for k in ("wall_s", "cpu_s", "peak_rss_bytes")} | {"runs": runs[case]}
    for tool in STARTUP:
        if tool in runs and f"startup-{tool}" in runs:
            c, s = cases_out[tool], cases_out[f"startup-{tool}"]
            c["work_s"] = c["wall_s"] - s["wall_s"]
            c["peak_rss_above_interpreter_bytes"] = c["peak_rss_bytes"] - s["peak_rss_bytes"]
    floor = cases_out.get("floor", {}).get("wall_s")
    ratios = {}
    for tool in STARTUP:
        c = cases_out.get(tool)
        if c and floor:
            ratios[tool] = {"wall_over_floor": c["wall_s"] / floor,
                            "work_over_floor": c.get("work_s", c["wall_s"]) / floor,
                            "peak_rss_above_interpreter_over_two_shards":
                                c.get("peak_rss_above_interpreter_bytes", 0) / (2 * max(shards))}
    if "ours" in cases_out and "mergekit" in cases_out:
        ratios["mergekit_wall_over_ours"] = cases_out["mergekit"]["wall_s"] / cases_out["ours"]["wall_s"]
    summary = {"size": args.size, "rank": args.rank, "base_bytes": base_b, "finetune_bytes": ft_b,
               "largest_shard_bytes": max(shards), "shards": len(shards), "adapter_bytes": adapter_bytes,
               "finetune": {"delta_rank": DELTA_RANK, "decay": DECAY, "delta_rms": DELTA_RMS,
                            "changed_norm": "post_attention_layernorm"},
               "rounds": args.repeat, "mergekit_rounds": args.mergekit_repeat,
               "mergekit_include_regex": args.mergekit_include or (
                   earlier.get("mergekit_include_regex") if args.reuse_from else None),
               "reused_cases": {"cases": reused, "from": args.reuse_from.name if args.reuse_from else None},
               "mergekit_modules": (len([k for k in runs["mergekit"][0].get("adapter_keys", [])
                                         if "lora_A" in k])
                                    if runs.get("mergekit") else None),
               "page_cache": "warm (both checkpoints read before each run)",
               "interpreter": {k: v for k, v in STARTUP.items()},
               "cpu_count": os.cpu_count(), "sampled_module_errors": exact,
               "cases": cases_out, "ratios": ratios}
    for k, v in ratios.items():
        print(k, json.dumps(v) if isinstance(v, dict) else f"{v:.2f}")
    output = args.out or (Path(tempfile.gettempdir()) / "bench_extract-smoke.json" if args.smoke
                          else ROOT / "benchmarks" / "results" / "extract.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
