"""Benchmark: merge methods (``merge --method``) on the streaming merge (not a test).

The checkpoint and adapters are bench_merge.py's (a LLaMA-shaped bf16 base with random
weights, a PEFT LoRA r16 and a LoRETTA rep adapter on q, k, v, o, gate, up and down of every
layer) and a third, a PEFT LoRA r8 on the same modules generated here (another seed). Each
method merges the three adapters (weights 1, 0.7 and 0.5) in its own subprocess, run round
by round; a child reports the wall time of the merge (imports excluded), its own peak RSS
(``VmHWM``, imports included; ``loretta_merge.memory`` says why not ``ru_maxrss``) and
that peak above the RSS it had after its imports, beside the largest input shard (the
issue's memory bound: 1.5x that shard).
``linear`` is the fused streaming kernel; every other method runs in passes over chunks of rows
(docs/merge-methods.md). ``floor`` merges nothing: it reads the base and the adapters' files
and writes the base once (``full_floor``), the I/O every case does at least; each case is
given over the floor of its round. ``CASE@N`` runs a case with ``LORETTA_KERNEL_THREADS=N``.

``mergekit`` (adapters, ``--mergekit ties,linear``; not in ``--smoke`` unless asked): the
same job through mergekit 0.1.5. mergekit merges adapters only as full models, so each
``base+adapter`` is first written as a full checkpoint (``loretta-merge merge BASE ADAPTER
--dtype float32``, the fastest writer at hand; mergekit cannot read the rep adapter at all):
that preparation's wall time and peak RSS are reported apart and counted in mergekit's
total. The full models are fp32 (``--mergekit-dtype``) so that mergekit's task vector
``full - base`` is the adapter's delta: in bf16, ``W0 + Δ`` rounds Δ (~1e-3 here) by up to
half a bf16 step of W0 (~6e-5 at |W0| ~0.02), which moves TIES' magnitude cut and signs.
Then ``mergekit-yaml`` runs the method (ties: density 0.5, the same weights; linear as
mergekit's task_arithmetic, which is this tool's linear over a base) in its own process,
fp32 arithmetic, bf16 output, as ours. Wall time is taken around each command (mergekit's
imports included: a user waits for them), peak RSS is the command's ``ru_maxrss`` read by a
small launcher. Our command line runs the same merge measured the same way (``ours_cli``:
imports included), and the two outputs (bf16) are compared tensor by tensor: the largest
absolute difference, where it is, and the count of entries that differ.

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
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import measuring  # noqa: E402

from loretta_merge.memory import peak_rss_bytes  # noqa: E402

METHODS = {  # case (a method, METHOD-VARIANT, CASE@THREADS) -> (parameters, seed)
    "floor": ({}, None),  # no merge: read the inputs, write one output (full_floor)
    "linear": ({}, None),
    "task_arithmetic": ({"lambda": 0.8}, None),
    "ties": ({"density": 0.5}, None),
    "ties-first": ({"density": 0.5, "tie_break": "first"}, None),
    "ties-first@1": ({"density": 0.5, "tie_break": "first"}, None),  # one tensor worker
    "dare_ties": ({"density": 0.5}, 0),
    "della": ({"density": 0.5, "epsilon": 0.1}, 0),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.01}, None),
}


ADAPTERS = (("lora", 1.0, "lora r16"), ("rep", 0.7, "rep"), ("lora8", 0.5, "lora r8"))
MERGEKIT = {"ties": {"merge_method": "ties", "density": 0.5},  # our method -> mergekit's
            "linear": {"merge_method": "task_arithmetic"}}
FULL_METHODS = ("floor", "linear", "ties", "ties-first")  # the cases of --inputs full


def case_label(case: str) -> str:
    """A case as the README names it: the method, the parameters it varies, the threads."""
    base, _, threads = case.partition("@")
    method, _, variant = base.partition("-")
    label = f"{method} --tie-break {variant}" if variant else base
    return f"{label}, LORETTA_KERNEL_THREADS={threads}" if threads else label


def case_env(case: str) -> dict[str, str]:
    """The environment a case's process adds: ``@N`` sets the merge's threads (a method's
    tensor workers); without it the merge chooses (every core for a method)."""
    threads = case.partition("@")[2]
    return {"LORETTA_KERNEL_THREADS": threads} if threads else {}
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


def generate_third_adapter(work: Path, size: str) -> None:
    """lora8/: a PEFT LoRA r8 (alpha 16) on bench_merge.py's targets, drawn as its LoRA r16
    is (another generator seed), so the adapter case merges three distinct adapters."""
    import bench_merge
    import torch

    out = work / "lora8"
    if (out / "done").exists():
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    cfg = bench_merge.SIZES[size]
    shapes = bench_merge._linear_shapes(cfg)
    g = torch.Generator().manual_seed(8)
    lora = {}
    for layer in range(cfg["num_hidden_layers"]):
        for part, names in bench_merge.TARGETS.items():
            for n in names:
                out_f, in_f = shapes[n]
                name = f"base_model.model.model.layers.{layer}.{part}.{n}"
                lora[f"{name}.lora_A.weight"] = torch.randn(8, in_f, generator=g) * 0.01
                lora[f"{name}.lora_B.weight"] = torch.randn(out_f, 8, generator=g) * 0.01
    targets = [n for names in bench_merge.TARGETS.values() for n in names]
    bench_merge.save_peft_lora(out, lora, r=8, targets=targets, base=work / "base")
    (out / "done").write_text("ok")


def largest_shard(*dirs: Path) -> int:
    return max(p.stat().st_size for d in dirs for p in d.glob("*.safetensors"))


def full_floor(work: Path, out: Path, budget: int, kind: str = "full") -> None:
    """Read every shard of the base and of the inputs (``load_file``: both fine-tunes, or
    the three adapters' files), write the base's tensors once under ``budget`` bytes per
    shard, each file fsynced."""
    from safetensors.torch import load_file

    from bench_merge import write_shards

    if kind == "adapters":
        for name, _, _ in ADAPTERS:
            for f in sorted((work / name).glob("*.safetensors")):
                load_file(f)
    dirs = ("base", *dict(FINE_TUNES)) if kind == "full" else ("base",)
    inputs = [sorted((work / d).glob("*.safetensors")) for d in dirs]

    def base_tensors():
        for i in range(max(len(shards) for shards in inputs)):
            for shards in inputs[1:]:  # the fine-tunes: read, as a merge must
                if i < len(shards):
                    load_file(shards[i])
            if i < len(inputs[0]):
                yield from load_file(inputs[0][i]).items()

    write_shards(base_tensors(), out, budget)


def child(method: str, work: Path, out: Path, inputs: str = "adapters") -> dict:
    import bench_merge

    from loretta_merge.io import parse_size
    from loretta_merge.merge import merge

    if inputs == "full":
        given = [(work / name, w) for name, w in FINE_TUNES]
        params, seed = METHODS.get(method, ({}, None))
    else:
        given = [(work / name, w) for name, w, _ in ADAPTERS]
        params, seed = METHODS[method]
    after_imports = bench_merge.rss_now()
    start = time.perf_counter()
    if method == "floor":
        full_floor(work, out, parse_size(MAX_SHARD), inputs)
        merged, total = 0, sum(p.stat().st_size for p in out.glob("*.safetensors"))
    else:
        report = merge(work / "base", given, out, force=True, progress=False,
                       method=method.partition("@")[0].partition("-")[0],
                       method_params=params, seed=seed, max_shard_bytes=MAX_SHARD)
        merged, total = report.merged_tensors, report.total_bytes
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()  # its own: not ru_maxrss, which carries the parent's
    return {"method": method, "seconds": round(seconds, 3), "merged_tensors": merged,
            "total_bytes": total, "peak_rss_bytes": peak,
            "peak_rss_above_imports_bytes": peak - after_imports}


def _rounds(methods: list[str], inputs: str, work: Path, repeat: int,
            smoke: bool = False) -> dict[str, list[dict]]:
    """Every case once per round, each in its own process. A smoke run (figures unread)
    launches the first case's process only and runs the other cases' ``child`` in this one,
    which saves a torch import per case."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(repeat):
        for i, m in enumerate(methods):
            out = work / f"out-{inputs}-{m}"
            shutil.rmtree(out, ignore_errors=True)
            in_process = smoke and i > 0
            with measuring() as machine:
                if in_process:
                    with mock.patch.dict(os.environ, case_env(m)):
                        run = child(m, work, out, inputs)
                else:
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", m, "--inputs", inputs, "--work",
                         str(work), "--out", str(out)], capture_output=True, text=True,
                        check=False, env=dict(os.environ, **case_env(m)))
            shutil.rmtree(out, ignore_errors=True)
            if not in_process:
                if done.returncode != 0:
                    sys.exit(f"{m} ({inputs}) failed:\n{done.stderr[-2000:]}")
                run = json.loads(done.stdout.strip().splitlines()[-1])
            runs[m].append(run)
            runs[m][-1]["machine_state"] = machine
    return runs


def _summary(runs: dict[str, list[dict]], shard: int) -> dict:
    """Per case: median seconds, peak RSS (the largest of the rounds), that peak above the
    RSS after imports and its ratio to the largest input shard ``shard``."""
    out = {}
    for m, rs in runs.items():
        out[m] = {"label": case_label(m),
                  "median_seconds": statistics.median(r["seconds"] for r in rs),
                  "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                  "merged_tensors": rs[0]["merged_tensors"]}
        if all("peak_rss_above_imports_bytes" in r for r in rs):
            above = max(r["peak_rss_above_imports_bytes"] for r in rs)
            out[m]["peak_rss_above_imports_bytes"] = above
            out[m]["rss_over_largest_shard"] = round(above / shard, 2)
    if "floor" in runs:
        for m, rs in runs.items():  # per round: this case over that round's floor
            out[m]["over_floor"] = round(statistics.median(
                r["seconds"] / f["seconds"] for r, f in zip(rs, runs["floor"])), 3)
    return out


# --------------------------------------------------------------------------- mergekit

_LAUNCH = ("import json, resource, subprocess, sys, time\n"
           "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "wall = time.perf_counter() - t; r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
           "print(json.dumps({'rc': p.returncode, 'wall_s': round(wall, 3), "
           "'cpu_s': round(r.ru_utime + r.ru_stime, 3),\n"
           "  'peak_rss_bytes': r.ru_maxrss * 1024, 'stderr': p.stderr[-3000:]}))\n")


def _launch(command: list[str], label: str) -> dict:
    """Run ``command`` under the launcher: its wall, CPU time and peak RSS (its own)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with measuring() as machine:
        proc = subprocess.run([sys.executable, "-c", _LAUNCH, *command], capture_output=True,
                              text=True, env=env, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        sys.exit(f"{label}: the launcher failed:\n{proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        sys.exit(f"{label} failed:\n{r['stderr']}")
    r.pop("stderr")
    r.pop("rc")
    r["machine_state"] = machine
    return r


def prepare_full_models(work: Path, dtype: str) -> dict:
    """Each ``base+adapter`` written as a full model in ``dtype`` (``mk-full-NAME``), what
    mergekit needs before it can merge adapters; one command per adapter, timed and measured."""
    steps = {}
    for name, _, _ in ADAPTERS:
        out = work / f"mk-full-{name}"
        shutil.rmtree(out, ignore_errors=True)
        steps[name] = _launch([sys.executable, "-m", "loretta_merge.cli", "merge",
                               str(work / "base"), str(work / name), "-o", str(out),
                               "--dtype", dtype], f"preparing {out.name}")
    return {"command": f"loretta-merge merge BASE ADAPTER -o FULL --dtype {dtype} (per adapter)",
            "dtype": dtype,
            "wall_s": round(sum(s["wall_s"] for s in steps.values()), 3),
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in steps.values()),
            "output_bytes": sum(p.stat().st_size for name, _, _ in ADAPTERS
                                for p in (work / f"mk-full-{name}").glob("*.safetensors")),
            "steps": steps}


def mergekit_config(work: Path, method: str) -> dict:
    spec = dict(MERGEKIT[method])
    mk_method = spec.pop("merge_method")
    return {"merge_method": mk_method, "base_model": str(work / "base"),
            "models": [{"model": str(work / f"mk-full-{name}"),
                        "parameters": {"weight": w, **spec}} for name, w, _ in ADAPTERS],
            "dtype": "float32", "out_dtype": "bfloat16"}


def run_mergekit(work: Path, method: str) -> dict:
    """``mergekit-yaml`` on the prepared full models, in its own process (JSON is YAML)."""
    config = work / f"mk-{method}.yml"
    config.write_text(json.dumps(mergekit_config(work, method), indent=1))
    out = work / f"mk-out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("mergekit-yaml")
    r = _launch([str(exe), str(config), str(out), "--no-copy-tokenizer", "--quiet"],
                f"mergekit-yaml ({method})")
    r["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return r


def run_ours_cli(work: Path, method: str) -> dict:
    """The same merge through our command line, measured as mergekit's is (imports
    included): the command-level figure beside mergekit's, and the output compared."""
    out = work / f"ours-out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    params = {k: v for k, v in MERGEKIT[method].items() if k != "merge_method"}
    flags = [x for k, v in params.items() for x in (f"--{k}", str(v))]
    r = _launch([sys.executable, "-m", "loretta_merge.cli", "merge", str(work / "base"),
                 *[str(work / name) for name, _, _ in ADAPTERS], "--weights",
                 ",".join(str(w) for _, w, _ in ADAPTERS), "--method", method, *flags,
                 "-o", str(out)], f"loretta-merge merge --method {method}")
    return r


def compare_outputs(ours: Path, theirs: Path, base: Path) -> dict:
    """Tensor by tensor: the largest |ours - mergekit| (and the tensor), beside the largest
    change either makes to the base (the scale of the merged deltas)."""
    from loretta_merge.io import CheckpointReader

    worst, where, change, differ, total = 0.0, None, 0.0, 0, 0
    with CheckpointReader(ours) as a, CheckpointReader(theirs) as b, CheckpointReader(base) as w:
        if set(a.keys()) != set(b.keys()):
            only = sorted(set(a.keys()) ^ set(b.keys()))
            sys.exit(f"ours {ours} and mergekit's {theirs} hold other tensors: {only[:5]}")
        for key in a.keys():
            x, y = a.get(key).float(), b.get(key).float()
            d = (x - y).abs()
            diff = float(d.max()) if x.numel() else 0.0
            differ += int((d > 0).sum())
            total += d.numel()
            if diff > worst:
                worst, where = diff, key
            if x.numel():
                change = max(change, float((x - w.get(key).float()).abs().max()))
            del x, y, d
    return {"max_abs_diff": worst, "max_abs_diff_tensor": where, "entries_differing": differ,
            "entries": total, "max_abs_merged_change": change}


def mergekit_cases(work: Path, methods: list[str], dtype: str) -> dict:
    """Preparation once, then each method through mergekit, compared with our output."""
    prep = prepare_full_models(work, dtype)
    result = {"preparation": prep, "methods": {}}
    for m in methods:
        run = run_mergekit(work, m)
        run["total_wall_s"] = round(run["wall_s"] + prep["wall_s"], 3)
        run["total_peak_rss_bytes"] = max(run["peak_rss_bytes"], prep["peak_rss_bytes"])
        run["config"] = mergekit_config(work, m)
        run["ours_cli"] = run_ours_cli(work, m)
        run["vs_ours"] = compare_outputs(work / f"ours-out-{m}", work / f"mk-out-{m}",
                                         work / "base")
        result["methods"][m] = run
        shutil.rmtree(work / f"mk-out-{m}", ignore_errors=True)
        shutil.rmtree(work / f"ours-out-{m}", ignore_errors=True)
    for name, _, _ in ADAPTERS:
        shutil.rmtree(work / f"mk-full-{name}", ignore_errors=True)
    return result


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
                             f"{','.join(FULL_METHODS)} by default, any of them)")
    parser.add_argument("--mergekit", default=None,
                        help="comma-separated methods also run through mergekit on the adapter "
                             f"case ({','.join(MERGEKIT)}; default: those of them the adapter "
                             "case runs, none with --smoke or --inputs full; '' for none)")
    parser.add_argument("--mergekit-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the full base+adapter models mergekit merges")
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
        allowed = set(METHODS)
        unknown = [m for m in methods if m not in allowed]
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(allowed))}")
        plans[kind] = methods
    if args.mergekit is None:
        args.mergekit = "" if args.smoke or not plans["adapters"] else ",".join(
            m for m in MERGEKIT if m in plans["adapters"])
    mk = [m for m in args.mergekit.split(",") if m]
    bad = [m for m in mk if m not in MERGEKIT or m not in plans["adapters"]]
    if bad:
        parser.error(f"--mergekit {','.join(bad)}: choose among {', '.join(MERGEKIT)}, each also "
                     f"among the adapter case's --methods")
    keep = args.work is not None
    work = Path(args.work) if keep else Path(tempfile.mkdtemp(prefix="bench-methods-"))
    summary = {"size": args.size, "repeat": args.repeat}
    try:
        bench_merge.generate(work, args.size)
        if plans["adapters"]:
            generate_third_adapter(work, args.size)
            runs = _rounds(plans["adapters"], "adapters", work, args.repeat, args.smoke)
            shard = largest_shard(work / "base")
            summary.update({"adapters": [f"{label} (w {w})" for _, w, label in ADAPTERS],
                            "largest_input_shard_bytes": shard,
                            "methods": _summary(runs, shard), "runs": runs})
            if mk:
                summary["mergekit"] = mergekit_cases(work, mk, args.mergekit_dtype)
        if plans["full"]:
            generate_fine_tunes(work, args.size)
            runs = _rounds(plans["full"], "full", work, args.repeat, args.smoke)
            shard = largest_shard(work / "base", *(work / n for n, _ in FINE_TUNES))
            summary["full"] = {
                "inputs": [f"{name}: full fine-tune, bf16 (w {w})" for name, w in FINE_TUNES],
                "checkpoint_bytes": sum(p.stat().st_size for p in (work / "base").glob("*.safetensors")),
                "max_shard_size": MAX_SHARD, "largest_input_shard_bytes": shard,
                "methods": _summary(runs, shard), "runs": runs}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    for title, section in (("adapters", summary.get("methods")),
                           ("full fine-tunes", summary.get("full", {}).get("methods"))):
        for m, s in (section or {}).items():
            ratio = f"  {s['over_floor']:5.2f}x floor" if "over_floor" in s else ""
            rss = (f" ({s['rss_over_largest_shard']:.2f}x shard above imports)"
                   if "rss_over_largest_shard" in s else "")
            print(f"{title:15s} {m:16s} {s['median_seconds']:8.2f} s  peak RSS "
                  f"{s['peak_rss_bytes'] / 2**30:5.2f} GiB{rss}{ratio}")
    if "mergekit" in summary:
        prep = summary["mergekit"]["preparation"]
        print(f"mergekit preparation ({len(ADAPTERS)} full models): {prep['wall_s']:.2f} s, peak RSS "
              f"{prep['peak_rss_bytes'] / 2**30:.2f} GiB")
        for m, r in summary["mergekit"]["methods"].items():
            print(f"ours (CLI) {m:8s} {r['ours_cli']['wall_s']:8.2f} s, peak RSS "
                  f"{r['ours_cli']['peak_rss_bytes'] / 2**30:.2f} GiB")
            print(f"mergekit {m:10s} {r['wall_s']:8.2f} s (total {r['total_wall_s']:.2f} s), peak "
                  f"RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB; max |ours - mergekit| "
                  f"{r['vs_ours']['max_abs_diff']:.3g} at {r['vs_ours']['entries_differing']} of "
                  f"{r['vs_ours']['entries']} entries (largest change "
                  f"{r['vs_ours']['max_abs_merged_change']:.3g})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
