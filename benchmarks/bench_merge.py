"""Benchmark: the streaming merge against the I/O floor and PEFT (not a test).

Generates a LLaMA-shaped bf16 checkpoint (random weights) in shards, a PEFT LoRA (r 16) and
a LoRETTA rep adapter, both on q, k, v, o, gate, up and down of every layer. Then runs each
case in its own subprocess, interleaved round by round (a slow spell hits every case alike):

- ``floor``: safetensors ``load_file`` + ``save_file`` of every shard (the same output
  shard budget as the merge), each written file fsynced: the least any tool that reads and
  DURABLY writes the weights does (the merge fsyncs every file before its rename, issue 16);
- ``floor-nosync``: the same without the fsyncs (what the page cache alone costs; PEFT's
  ``save_pretrained`` does not fsync either);
- ``copy-direct``: every shard's bytes copied as they are, read into one reused aligned
  buffer and written with ``O_DIRECT`` (the tail through the page cache), each file
  fsynced: no tensor is built, no byte changes. The least a durable writer that bypasses
  the page cache (as the merge's writer does) can spend;
- ``lora`` / ``rep``: ``loretta_merge.merge.merge`` on CPU;
- ``peft``: ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload`` +
  ``save_pretrained`` (LoRA only; skipped, with the reason, when its estimate does not fit
  in the available memory).

Each child reports the wall time of the work (imports excluded), its user+sys CPU time and
its peak RSS above the RSS it had after its imports. The JSON gives per-case medians over
the rounds and, per round, the ratios to the floor and to PEFT measured in that round,
with their medians; ``page_cache`` says whether the base was in the page cache ("warm": read
once before each round) or evicted from it before each child ("cold", ``--cold``, through
``posix_fadvise(DONTNEED)`` on the base's own files: no root needed, nothing else evicted).

    python benchmarks/bench_merge.py --smoke                 # seconds, for CI
    python benchmarks/bench_merge.py --size 1gb --output benchmarks/results/merge-1gb.json
    python benchmarks/bench_merge.py --size 7b  --repeat 3    # ~13.5 GB, deleted afterwards
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
from _machine import measuring  # noqa: E402

from loretta_merge.memory import peak_rss_bytes  # noqa: E402

# LLaMA shapes: hidden, intermediate, layers, heads, vocab; input shard budget
SIZES = {
    "smoke": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                  num_attention_heads=4, vocab_size=1000, shard="1MB"),
    "100mb": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=3,
                  num_attention_heads=8, vocab_size=8000, shard="50MB"),
    "1gb": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=7,
                num_attention_heads=16, vocab_size=32000, shard="200MB"),
    "2gb": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=16, vocab_size=32000, shard="500MB"),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, vocab_size=32000, shard="4GB"),
}
TARGETS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "mlp": ["gate_proj", "up_proj", "down_proj"]}
CASES = ("floor", "floor-nosync", "copy-direct", "lora", "rep", "peft")


def _linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # (out, in)


def _base_layout(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, shapes = cfg["hidden_size"], _linear_shapes(cfg)
    layout = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        layout.append((f"{p}.input_layernorm.weight", (h,)))
        layout += [(f"{p}.{part}.{n}.weight", shapes[n]) for part, names in TARGETS.items()
                   for n in names]
        layout.append((f"{p}.post_attention_layernorm.weight", (h,)))
    return layout + [("model.norm.weight", (h,)), ("lm_head.weight", (cfg["vocab_size"], h))]


def generate(work: Path, size: str) -> None:
    """Write base/, rep/ and lora/ under ``work`` (skipped when already there), one tensor
    at a time (memory: one tensor, whatever the size)."""
    import torch
    from transformers import LlamaConfig

    from loretta_merge import tt
    from loretta_merge.formats import Adapter, RepModule, TTMatrix, write_adapter
    from loretta_merge.io import StreamingShardWriter

    if (work / "done").exists():
        return
    shutil.rmtree(work, ignore_errors=True)
    (work / "base").mkdir(parents=True)
    cfg = {k: v for k, v in SIZES[size].items() if k != "shard"}
    config = LlamaConfig(**cfg, num_key_value_heads=cfg["num_attention_heads"],
                         tie_word_embeddings=False, max_position_embeddings=2048)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(work / "base")
    g = torch.Generator().manual_seed(0)
    layout = _base_layout(cfg)
    writer = StreamingShardWriter(work / "base", [(k, s, torch.bfloat16) for k, s in layout],
                                  SIZES[size]["shard"])
    for key, shape in layout:
        t = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02)
        writer.add(key, t.to(torch.bfloat16))
    writer.close()
    modules, lora = {}, {}
    for layer in range(cfg["num_hidden_layers"]):
        for part, names in TARGETS.items():
            for n in names:
                out_f, in_f = _linear_shapes(cfg)[n]
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
    save_peft_lora(work / "lora", lora, r=16, targets=targets, base=work / "base")
    (work / "done").write_text("ok")


def save_peft_lora(out: Path, state: dict, *, r: int, targets: list[str], base: Path) -> None:
    """``out/``: a PEFT LoRA directory as PEFT writes one (``state``: its factors, alpha 2 r)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "lora_dropout": 0.0, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base), "inference_mode": True}))


# --------------------------------------------------------------------------- one case (child)

def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_shards(tensors, out: Path, budget: int, *, sync: bool = True) -> None:
    """Write ``(name, tensor)`` pairs into ``out/model-NNNNN.safetensors`` files of at most
    ``budget`` bytes each (a tensor larger than that gets a file of its own), each fsynced
    when ``sync``: the writing half of every I/O floor."""
    from safetensors.torch import save_file

    def save(buffer: dict, path: Path) -> None:
        save_file(buffer, path)
        if sync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    buffer, size, n = {}, 0, 0
    out.mkdir()
    for k, t in tensors:
        if buffer and size + t.nbytes > budget:
            n += 1
            save(buffer, out / f"model-{n:05d}.safetensors")
            buffer, size = {}, 0
        buffer[k] = t
        size += t.nbytes
    save(buffer, out / f"model-{n + 1:05d}.safetensors")


def _floor(base: Path, out: Path, budget: int, *, sync: bool = True) -> None:
    from safetensors.torch import load_file

    write_shards((kv for shard in sorted(base.glob("*.safetensors")) for kv in load_file(shard).items()),
                 out, budget, sync=sync)


def _copy_direct(base: Path, out: Path) -> None:
    import mmap

    chunk = 16 * 2**20
    buf = mmap.mmap(-1, chunk)  # page-aligned, reused for every chunk
    out.mkdir()
    for shard in sorted(base.glob("*.safetensors")):
        dst = out / shard.name
        with open(shard, "rb", buffering=0) as src, open(dst, "wb") as plain:
            direct = os.open(dst, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
            try:
                offset = 0
                while True:
                    n = src.readinto(buf)
                    if not n:
                        break
                    whole = n - n % 4096
                    with memoryview(buf) as view:
                        if whole:
                            os.pwrite(direct, view[:whole], offset)
                        if n > whole:  # the file's last partial block
                            os.pwrite(plain.fileno(), view[whole:n], offset + whole)
                    offset += n
                os.fsync(plain.fileno())
            finally:
                os.close(direct)


def child(case: str, work: Path, out: Path, max_shard: str, profile: Path | None) -> dict:
    """Run one case in this process: wall, CPU and peak RSS of the work alone."""
    import torch  # noqa: F401 - imported before the timer, as every case needs it

    from loretta_merge.io import parse_size
    from loretta_merge.merge import merge
    if case == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    base, rss0 = work / "base", rss_now()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if profile is not None:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    if case in ("floor", "floor-nosync"):
        _floor(base, out, parse_size(max_shard), sync=case == "floor")
    elif case == "copy-direct":
        _copy_direct(base, out)
    elif case in ("lora", "rep"):
        merge(base, [(work / case, 1.0)], out, device="cpu", progress=False,
              max_shard_bytes=max_shard)
    elif case == "peft":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        PeftModel.from_pretrained(model, work / "lora").merge_and_unload().save_pretrained(
            out, max_shard_size=max_shard)
    if profile is not None:
        prof.disable()
        prof.dump_stats(profile)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
            "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
            "peak_rss_above_interpreter_bytes": peak_rss_bytes() - rss0,
            "interpreter_rss_bytes": rss0, "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- the rounds (parent)

def _evict(base: Path) -> None:
    """Drop the base's own pages from the page cache (a cold read follows)."""
    for p in base.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _warm(base: Path) -> None:
    for p in base.glob("*.safetensors"):
        with open(p, "rb") as f:
            while f.read(64 * 2**20):
                pass


def _cache_state(cold: bool, checkpoint_bytes: int) -> str:
    if cold:
        return "cold"
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    if checkpoint_bytes > total // 2:  # input and output cannot both stay cached
        return "partly warm (the checkpoint is over half the memory; reads partly hit the disk)"
    return "warm"


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def peft_skip_reason(base_bytes: int, largest_shard: int) -> str | None:
    """PEFT holds the whole model plus a shard being serialised: estimate, then decide."""
    need = int(1.1 * base_bytes + 2 * largest_shard)
    have = _available_bytes()
    if need > have:
        return (f"PEFT needs about {need / 2**30:.1f} GiB (the whole bf16 model plus a shard "
                f"being saved), {have / 2**30:.1f} GiB is available")
    return None


def _run_child(case: str, args, work: Path, profile: Path | None, in_process: bool = False) -> dict:
    """``case`` in its own process; with ``in_process`` (a smoke run's later cases, whose
    figures are unread: a torch import saved per case) in this one."""
    out = work / f"out-{case}"
    shutil.rmtree(out, ignore_errors=True)
    if in_process:
        try:
            return child(case, work, out, args.max_shard_size, profile)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", case, "--work", str(work), "--out", str(out),
           "--max-shard-size", args.max_shard_size]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per-case medians, and per-round ratios (to the floor, PEFT over ours) with medians."""
    cases = {}
    for case, rs in runs.items():
        cases[case] = {k: _median([r[k] for r in rs]) for k in
                       ("wall_s", "cpu_s", "user_s", "sys_s", "peak_rss_above_interpreter_bytes")}
        cases[case]["runs"] = rs
    ratios = {}
    for case in ("lora", "rep"):
        if case not in runs:
            continue
        n = len(runs[case])
        ratios[case] = {"wall_over_floor": _median(
            [runs[case][i]["wall_s"] / runs["floor"][i]["wall_s"] for i in range(n)])}
        for ref in ("floor-nosync", "copy-direct"):
            if ref in runs:
                ratios[case][f"wall_over_{ref.replace('-', '_')}"] = _median(
                    [runs[case][i]["wall_s"] / runs[ref][i]["wall_s"] for i in range(n)])
        if "peft" in runs:
            ratios[case]["peft_wall_over_ours"] = _median(
                [runs["peft"][i]["wall_s"] / runs[case][i]["wall_s"] for i in range(n)])
    if "peft" in runs:
        ratios["peft"] = {"wall_over_floor": _median(
            [r["wall_s"] / f["wall_s"] for r, f in zip(runs["peft"], runs["floor"])])}
    return {"cases": cases, "ratios": ratios}


def _rounds(cases: list[str], args, work: Path) -> dict[str, list[dict]]:
    """Every case once per round, interleaved; warm (read first) or cold (evicted) cache.

    The order rotates from round to round (round 2 starts with the second case, ...): on a
    virtual machine that hands freed memory back to its host (virtio-balloon free page
    reporting, as on this project's machines) the first touch of a page costs several times
    a copy, and whichever case runs after a big free pays it; rotating spreads that cost."""
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for round_ in range(args.repeat):
        shift = round_ % len(cases)
        for i, case in enumerate(cases[shift:] + cases[:shift]):
            _evict(work / "base") if args.cold else _warm(work / "base")
            prof = args.profile / f"{case}-{round_}.prof" if args.profile else None
            if prof:
                args.profile.mkdir(parents=True, exist_ok=True)
            with measuring() as machine:
                r = _run_child(case, args, work, prof, in_process=args.smoke and i > 0)
            machine["torch_threads"] = r.pop("torch_threads", None)  # the child's, not ours
            r["machine_state"] = machine
            r["round"], r["position_in_round"] = round_ + 1, (cases.index(case) - shift) % len(cases) + 1
            runs[case].append(r)
            print(f"round {round_ + 1} {case:6s} wall {r['wall_s']:7.2f}s  cpu {r['cpu_s']:7.2f}s "
                  f"(sys {r['sys_s']:5.2f})  peak RSS +{r['peak_rss_above_interpreter_bytes'] / 2**20:7.0f} MiB",
                  flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="1gb")
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint, one round: seconds (CI)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (paired runs); medians reported")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--cold", action="store_true", help="evict the base from the page cache before each run")
    ap.add_argument("--max-shard-size", default="5GB", help="output shard budget, e.g. 5GB")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--profile", type=Path, default=None, help="write cProfile stats of each case here (a dir)")
    ap.add_argument("--output", type=Path, default=None, help="JSON results path")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.out, args.max_shard_size, args.profile)))
        return
    if args.smoke:
        args.size, args.repeat = "smoke", 1
    work = args.work or Path(tempfile.gettempdir()) / f"loretta-bench-{args.size}"
    t0 = time.perf_counter()
    # generated in a child, so this parent stays small (children inherit nothing big)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = [{str(ROOT)!r}, "
                    f"{str(ROOT / 'benchmarks')!r}]; from bench_merge import generate; "
                    f"from pathlib import Path; generate(Path({str(work)!r}), {args.size!r})"],
                   check=True, cwd=ROOT)
    shards = [p.stat().st_size for p in (work / "base").glob("*.safetensors")]
    print(f"checkpoint {sum(shards) / 1e9:.2f} GB in {len(shards)} shard(s), ready in "
          f"{time.perf_counter() - t0:.1f}s ({work})", flush=True)
    cases = [c for c in args.cases.split(",") if c]
    skipped = {}
    if "peft" in cases and (reason := peft_skip_reason(sum(shards), max(shards))):
        cases.remove("peft")
        skipped["peft"] = reason
        print(f"peft skipped: {reason}")
    try:
        runs = _rounds(cases, args, work)
    finally:
        if (args.size == "7b" and not args.keep) or args.smoke:
            shutil.rmtree(work, ignore_errors=True)
    summary = {"size": args.size, "checkpoint_bytes": sum(shards), "input_shards": len(shards),
               "largest_input_shard_bytes": max(shards), "max_shard_size": args.max_shard_size,
               "rounds": args.repeat, "page_cache": _cache_state(args.cold, sum(shards)),
               "cpu_count": os.cpu_count(), "skipped": skipped, **summarise(runs)}
    _print_and_write(summary, args)


def _print_and_write(summary: dict, args) -> None:
    for case, r in summary["ratios"].items():
        extra = (f", PEFT/ours {r['peft_wall_over_ours']:.2f}" if r.get("peft_wall_over_ours") else "")
        rss = summary["cases"][case]["peak_rss_above_interpreter_bytes"]
        print(f"{case:6s} wall/floor {r['wall_over_floor']:.2f}{extra}; peak RSS "
              f"{rss / summary['largest_input_shard_bytes']:.2f}x the largest shard")
    output = args.output or (Path(tempfile.gettempdir()) / "bench_merge-smoke.json" if args.smoke
                             else ROOT / "benchmarks" / "results" / f"merge-{args.size}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
