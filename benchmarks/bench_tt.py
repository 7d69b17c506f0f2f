"""Benchmark the TT math core against tensorly and the naive tensordot chain.

Shapes are those of LLaMA-2-7B adapters (hidden 4096, FFN 11008, r 8, R 5) plus a large
square TT (4096 x 4096 as [16]*6 and the paper's 8-mode square shape, rank 8).
Everything is measured in this one process; ratios are printed and written as JSON.

    python benchmarks/bench_tt.py [--threads 2] [--repeat 5] [--out benchmarks/results/tt.json]
    python benchmarks/bench_tt.py --smoke --out /tmp/tt-smoke.json   # tiny shapes, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from loretta_merge import tt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import measuring  # noqa: E402


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def naive_chain(cores, rows, cols):
    full = cores[0]
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([full.ndim - 1], [0]))
    return full.reshape(rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/tt.json", help="where the JSON goes")
    ap.add_argument("--smoke", action="store_true",
                    help="every case at 1/16 of its width, one repeat: checks the script runs")
    args = ap.parse_args()
    if args.smoke:  # one thread: smoke figures are unread, and the suite runs two at once
        args.repeat, args.threads = 1, 1
    torch.set_num_threads(args.threads)
    import tensorly
    from tensorly.decomposition import tensor_train

    tensorly.set_backend("pytorch")
    g = torch.Generator().manual_seed(0)
    results: dict = {"machine": platform.processor() or platform.machine(),
                     "threads": args.threads, "repeat": args.repeat, "torch": torch.__version__,
                     "tensorly": tensorly.__version__, "smoke": args.smoke, "reconstruct": [], "tt_svd": []}
    shrink = 16 if args.smoke else 1

    # ---- reconstruction: ours (halves + one matmul) vs naive chain vs tensorly tt_to_tensor
    cases = [
        ("q_proj A 4096x8, R5", 4096, 8, 5, 1),
        ("down_proj B 8x4096, R5", 8, 4096, 5, 1),
        ("gate A 4096x8 x64 modules (batched), R5", 4096, 8, 5, 64),
        ("square 4096x4096 [16]*6, R8", 4096, 4096, 8, 1),
        ("square 4096x4096 paper 8 modes, R8", 4096, 4096, 8, 1),
    ]
    print(f"{'reconstruct':44s} {'ours ms':>9s} {'chain ms':>9s} {'tensorly ms':>11s} {'chain/ours':>10s}")
    for name, rows, cols, rank, batch in cases:
        rows, cols = max(1, rows // shrink) if rows > 16 else rows, max(1, cols // shrink) if cols > 16 else cols
        if "[16]*6" in name:
            modes = [16] * 6 if shrink == 1 else [4] * 8  # 256 x 256
        else:
            modes = tt.matrix_modes(rows, cols)
        ranks = tt.tt_ranks(modes, rank)
        tts = [[torch.randn(ranks[k], n, ranks[k + 1], generator=g) for k, n in enumerate(modes)]
               for _ in range(batch)]
        with measuring() as machine:
            if batch == 1:
                ours = timeit(lambda: tt.reconstruct(tts[0], rows, cols), args.repeat)
            else:
                stacked = tt.stack_tts(tts)
                ours = timeit(lambda: tt.reconstruct_batched(stacked, rows, cols), args.repeat)
            chain = timeit(lambda: [naive_chain(c, rows, cols) for c in tts], args.repeat)
            tly = timeit(lambda: [tensorly.tt_to_tensor(c).reshape(rows, cols) for c in tts], args.repeat)
        ref = naive_chain(tts[0], rows, cols)
        err = float((tt.reconstruct(tts[0], rows, cols) - ref).norm() / ref.norm())
        row = dict(case=name, rows=rows, cols=cols, modes=modes, rank=rank, batch=batch, ours_s=ours, chain_s=chain,
                   tensorly_s=tly, speedup_vs_chain=chain / ours, speedup_vs_tensorly=tly / ours,
                   rel_diff_vs_chain=err, machine_state=machine)
        results["reconstruct"].append(row)
        print(f"{name:44s} {ours * 1e3:9.2f} {chain * 1e3:9.2f} {tly * 1e3:11.2f} {chain / ours:10.2f}")

    # ---- TT-SVD: ours vs tensorly tensor_train at the same ranks (so the same error class)
    svd_cases = [
        ("LoRA A factor 4096x16 -> paper-like modes, R8", 4096, 16, 8, None),
        ("LoRA B factor 16x11008 auto modes, R8", 16, 11008, 8, None),
        ("dense 4096x4096 as [16]*6, R8", 4096, 4096, 8, [16] * 6),
    ]
    print(f"\n{'tt_svd':48s} {'ours s':>8s} {'tensorly s':>10s} {'ratio':>6s} {'our err':>9s} {'tly err':>9s}")
    for name, rows, cols, rank, modes in svd_cases:
        if shrink > 1:
            rows, cols = (rows // shrink if rows > 16 else rows), (cols // shrink if cols > 16 else cols)
            modes = [4] * 8 if modes else None  # 256 x 256
        modes = modes or tt.matrix_modes(rows, cols)
        x = torch.randn(rows, cols, generator=g)
        xt = x.reshape(modes)
        with measuring() as machine:
            ours = timeit(lambda: tt.tt_svd(x, modes, max_rank=rank), max(1, args.repeat // 2))
            tly = timeit(lambda: tensor_train(xt, rank=rank), max(1, args.repeat // 2))
        res = tt.tt_svd(x, modes, max_rank=rank)
        our_err = float((tt.reconstruct(res.cores, rows, cols) - x).norm() / x.norm())
        ft = tensor_train(xt, rank=rank)
        tly_err = float((tensorly.tt_to_tensor(ft).reshape(rows, cols) - x).norm() / x.norm())
        row = dict(case=name, rows=rows, cols=cols, modes=modes, rank=rank, ours_s=ours, tensorly_s=tly,
                   speedup_vs_tensorly=tly / ours, our_rel_error=our_err, tensorly_rel_error=tly_err,
                   reported_rel_error=float(res.rel_error), machine_state=machine)
        results["tt_svd"].append(row)
        print(f"{name:48s} {ours:8.3f} {tly:10.3f} {tly / ours:6.2f} {our_err:9.5f} {tly_err:9.5f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
