"""CPU and GPU merges side by side on a generated checkpoint, in GB/s against the I/O floor.

One short prepared script for a GPU machine: generates the LLaMA-shaped bf16 checkpoint and
the rep and LoRA adapters of ``bench_merge.py``, then times, in this process, the floor
(safetensors ``load_file`` + ``save_file``), the CPU merge and (when CUDA is present) the
GPU merge of each adapter and, by ``--method ties`` (and ``--tie-break first``), of the three adapters ``bench_methods.py``
merges (LoRA r16 weight 1, rep 0.7, a LoRA r8 0.5; issue 25), and compares the GPU output with
the CPU output tensor by tensor (bf16 ulps). Throughput is checkpoint bytes / wall seconds. JSON to ``--output``.

The ``extract`` case (issue 26): the fine-tune of ``bench_extract.py`` beside the base, then
``extract(..., rank=16)`` plus writing the LoRA, on the CPU and (when CUDA is present) with
``device="cuda"``, against that pair's I/O floor (read both checkpoints, write the adapter's
bytes, fsync); the CUDA adapter's deltas and errors against the CPU's, and both errors at
three modules against the exact truncated SVD's.

    python benchmarks/gpu_merge.py --smoke             # CPU only where no GPU: seconds
    python benchmarks/gpu_merge.py --size 2gb --output benchmarks/results/gpu_merge.json
    python benchmarks/gpu_merge.py --size 1gb --cases extract --output /tmp/gpu_extract.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worst_ulps(a_dir: Path, b_dir: Path) -> float:
    import torch

    from loretta_merge.io import CheckpointReader

    a_r, b_r = CheckpointReader(a_dir), CheckpointReader(b_dir)
    worst = 0.0
    for key in a_r.keys():
        a, b = a_r.get(key).double(), b_r.get(key).double()
        big = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
        ulp = torch.exp2(torch.floor(torch.log2(big)) - 7)
        worst = max(worst, float(((a - b).abs() / ulp).max()))
    return worst


def _device_case(work: Path, name: str, devices, gb: float, floor: float, run,
                 case: dict | None = None) -> dict:
    """``run(out_dir, device)`` (a merge) timed on each device against the floor, and, with
    CUDA, the GPU output's largest difference from the CPU output in bf16 ulps."""
    outs, case = {}, dict(case or {})
    for device in devices:
        outs[device] = work / f"out-{name}-{device}"
        shutil.rmtree(outs[device], ignore_errors=True)
        secs = _timed(lambda: run(outs[device], device))
        case[device] = {"seconds": secs, "gb_per_s": gb / secs, "over_floor": secs / floor}
        print(f"{name:4s} {device:4s} {secs:7.2f}s = {gb / secs:6.2f} GB/s "
              f"({secs / floor:.2f}x the floor)")
    if "cuda" in outs:
        case["cuda_vs_cpu_max_bf16_ulps"] = worst_ulps(outs["cuda"], outs["cpu"])
        print(f"{name:4s} cuda vs cpu: at most {case['cuda_vs_cpu_max_bf16_ulps']:.2f} bf16 ulp")
    return case


def _merge_cases(work, base, gb, floor, devices, merge, result) -> None:
    for adapter in ("lora", "rep"):
        result["cases"][adapter] = _device_case(
            work, adapter, devices, gb, floor,
            lambda out, device: merge(base, [(work / adapter, 1.0)], out, device=device,
                                      progress=False))
    # a task-vector method (issue 25): TIES of bench_methods.py's three adapters, its kernels
    # on each device, with mergekit's tie order and with --tie-break first
    from bench_methods import ADAPTERS, generate_third_adapter

    generate_third_adapter(work, result["size"])
    inputs = [(work / name, weight) for name, weight, _ in ADAPTERS]
    for name, params in (("ties", {"density": 0.5}),
                         ("ties-first", {"density": 0.5, "tie_break": "first"})):
        result["cases"][name] = _device_case(
            work, name, devices, gb, floor,
            lambda out, device: merge(base, inputs, out, device=device, progress=False,
                                      method="ties", method_params=params),
            {"inputs": [label for *_, label in ADAPTERS], "params": params})


def extract_case(work: Path, size: str, devices: list[str], rounds: int) -> dict:
    """``extract`` + ``write_peft_lora`` on each device against the pair's I/O floor."""
    import statistics

    import torch
    from bench_extract import _floor as extract_floor
    from bench_extract import exact_errors, make_finetune
    from bench_merge import TARGETS
    from safetensors.torch import load_file

    from loretta_merge.converters.extract import extract
    from loretta_merge.formats import write_peft_lora

    (work / "size").write_text(json.dumps(size))
    make_finetune(work)
    rank = 8 if size == "smoke" else 16
    targets = [n for ns in TARGETS.values() for n in ns]
    pair_gb = sum(p.stat().st_size for d in ("base", "ft") for p in (work / d).glob("*.safetensors")) / 1e9
    for d in ("base", "ft"):                     # warm page cache, as bench_extract does
        for p in (work / d).glob("*.safetensors"):
            p.read_bytes()
    case: dict = {"pair_gb": pair_gb, "rank": rank, "devices": {}}
    reports = {}
    for device in devices:
        out = work / f"out-extract-{device}"
        runs = case["devices"].setdefault(device, {"seconds": []})
        for i in range(rounds + 1):               # the first: a warm-up (CUDA libraries, buffers)
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            adapter, report = extract(work / "base", work / "ft", rank=rank, target_modules=targets,
                                      device=device)
            write_peft_lora(adapter, out)
            if i:
                runs["seconds"].append(time.perf_counter() - start)
            reports[device] = report
        runs["median_s"] = statistics.median(runs["seconds"])
        runs["max_err"] = report.summary()["max_err"]
        print(f"extract {device:4s} {runs['median_s']:7.2f}s (runs {', '.join(f'{x:.2f}' for x in runs['seconds'])})")
    adapter_bytes = sum(p.stat().st_size for p in (work / f"out-extract-{devices[0]}").rglob("*") if p.is_file())
    floors = []
    for _ in range(rounds):
        out = work / "out-extract-floor"
        floors.append(_timed(lambda out=out: extract_floor(work, out, adapter_bytes)))
        out.unlink()
    floor = statistics.median(floors)
    case.update({"adapter_bytes": adapter_bytes, "floor_s": floor, "floor_runs_s": floors})
    for device, runs in case["devices"].items():
        runs["over_floor"] = runs["median_s"] / floor
        print(f"extract {device:4s} {runs['over_floor']:.2f}x the floor ({floor:.2f}s)")
    names = [f"model.layers.0.{p}.{n}" for p, n in (("self_attn", "q_proj"), ("mlp", "gate_proj"),
                                                     ("mlp", "down_proj"))]
    case["sampled_module_errors"] = {d: exact_errors(work, work / f"out-extract-{d}", rank, names)
                                     for d in devices}
    if "cuda" in devices:
        cpu, gpu = (load_file(work / f"out-extract-{d}" / "adapter_model.safetensors") for d in ("cpu", "cuda"))
        worst = 0.0
        for key in (k for k in cpu if ".lora_A." in k):
            ref = cpu[key.replace("lora_A", "lora_B")].float() @ cpu[key].float()
            got = gpu[key.replace("lora_A", "lora_B")].float() @ gpu[key].float()
            worst = max(worst, float(torch.linalg.matrix_norm(got - ref) / torch.linalg.matrix_norm(ref)))
        errs = {r.name: r.err for r in reports["cpu"].modules}
        case["cuda_vs_cpu"] = {
            "max_rel_delta_diff": worst,
            "max_rel_err_diff": max(abs(r.err - errs[r.name]) / errs[r.name] for r in reports["cuda"].modules)}
        print(f"extract cuda vs cpu: deltas within {worst:.1e}, errors within "
              f"{case['cuda_vs_cpu']['max_rel_err_diff']:.1e} (relative)")
    return case


def main() -> None:
    from bench_merge import SIZES, _floor, generate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="2gb")
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint (CI; CPU where no GPU)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--cases", default="merge,extract", help="merge, extract or both (comma-separated)")
    ap.add_argument("--extract-rounds", type=int, default=2, help="runs of each extract device (the median)")
    args = ap.parse_args()
    cases = {c for c in args.cases.split(",") if c}
    import torch

    from loretta_merge.merge import merge

    size = "smoke" if args.smoke else args.size
    work = args.work or Path(tempfile.gettempdir()) / f"loretta-gpu-bench-{size}"
    generate(work, size)
    base = work / "base"
    gb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices:
        torch.ones(1, device="cuda").sum().item()  # the CUDA context, outside the timings
    result = {"size": size, "checkpoint_gb": gb, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
              "cuda_skipped": None if "cuda" in devices else "no CUDA device visible to torch",
              "cases": {}}
    floor_out = work / "out-floor"
    shutil.rmtree(floor_out, ignore_errors=True)
    floor = _timed(lambda: _floor(base, floor_out, 5 * 10**9))
    shutil.rmtree(floor_out, ignore_errors=True)
    result["floor"] = {"seconds": floor, "gb_per_s": gb / floor}
    print(f"checkpoint {gb:.2f} GB; floor {floor:.2f}s = {gb / floor:.2f} GB/s")
    try:
        if "merge" in cases:
            _merge_cases(work, base, gb, floor, devices, merge, result)
        if "extract" in cases:
            result["cases"]["extract"] = extract_case(work, size, devices, args.extract_rounds)
    finally:
        for p in work.glob("out-*"):
            shutil.rmtree(p, ignore_errors=True)
        if args.smoke:
            shutil.rmtree(work, ignore_errors=True)
    output = args.output or Path(tempfile.gettempdir()) / f"gpu_merge-{size}.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
