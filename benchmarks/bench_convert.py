"""Benchmark `lora_to_tt` on a LLaMA-2-7B-shaped PEFT LoRA against a tensorly loop.

The adapter: r=16 on q,k,v,o (4096 -> 4096), gate, up (4096 -> 11008) and down
(11008 -> 4096) of N layers (32 by default), factors generated here. Two kinds:
- "random": Gaussian factors (incompressible: the worst case for TT);
- "trained": each factor is a low TT-rank matrix (rank 4) plus 5% noise, the kind of
  structure a trained, compressible adapter has (decaying TT spectrum).
For every setting the same factors go through tensorly's ``tensor_train`` one by one at
the ranks our run chose (matched rank, so matched error class), timed in this process.

    python benchmarks/bench_convert.py [--layers 32] [--threads 1] [--repeat 2] [--out benchmarks/results/convert.json]
    python benchmarks/bench_convert.py --smoke --out /tmp/convert-smoke.json   # tiny shapes, seconds (CI)

Times are the best of ``--repeat`` runs of each side (the machine may be shared). Our time
includes what the tensorly loop does not do: measuring every factor and delta error.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from loretta_merge import tt
from loretta_merge.converters.lora import lora_to_tt
from loretta_merge.converters.reports import rel_delta_error
from loretta_merge.formats import Adapter, LoraModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import measuring  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
          "o_proj": (4096, 4096), "gate_proj": (4096, 11008), "up_proj": (4096, 11008),
          "down_proj": (11008, 4096)}
# --smoke: the same projections at 1/16 of the width, one layer, one setting per kind
SMOKE_SHAPES = {k: (n_in // 16, n_out // 16) for k, (n_in, n_out) in SHAPES.items()}
R = 16


def structured(rows: int, cols: int, g: torch.Generator, *, rank: int = 4, noise: float = 0.05):
    """A (rows, cols) factor of low TT rank plus relative noise, unit Frobenius norm."""
    modes = tt.matrix_modes(rows, cols)
    cores = [torch.randn(r0, n, r1, generator=g)
             for r0, n, r1 in zip(tt.tt_ranks(modes, rank), modes, tt.tt_ranks(modes, rank)[1:])]
    x = tt.reconstruct(cores, rows, cols)
    x = x / x.norm()
    e = torch.randn(rows, cols, generator=g)
    return x + noise * e / e.norm()


def make_adapter(layers: int, kind: str, seed: int = 0, shapes: dict = SHAPES) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(layers):
        for proj, (n_in, n_out) in shapes.items():
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{i}.{block}.{proj}"
            if kind == "random":
                a = torch.randn(R, n_in, generator=g) / math.sqrt(n_in)
                b = torch.randn(n_out, R, generator=g) * 0.01
            else:
                a = structured(n_in, R, g).T.contiguous()        # lora_A.weight (r, in)
                b = structured(R, n_out, g).T.contiguous() * 0.1  # lora_B.weight (out, r)
            modules[name] = LoraModule(a=a, b=b, scale=2.0)
    config = {"r": R, "lora_alpha": 32, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
              "target_modules": sorted(SHAPES), "task_type": "CAUSAL_LM"}
    return Adapter(method="lora", source="peft", modules=modules, tensors={}, config=config,
                   fan_in_fan_out=set(), base_model_name_or_path="llama-2-7b-shaped", path=None)


def tensorly_loop(adapter: Adapter, report, shapes: str):
    """Each factor through tensorly's tensor_train at the ranks our run chose."""
    import tensorly
    from tensorly.decomposition import tensor_train

    by_name = {m.name: m for m in report.modules}
    errs = []
    start = time.perf_counter()
    for name, m in adapter.modules.items():
        rep = by_name[name]
        out = []
        for mat, ranks in ((m.a.T, rep.ranks_a), (m.b.T, rep.ranks_b)):
            modes = tt.matrix_modes(mat.shape[0], mat.shape[1], shapes=shapes)
            fac = tensor_train(mat.contiguous().reshape(modes), rank=ranks)
            out.append(tensorly.tt_to_tensor(fac).reshape(mat.shape))
        errs.append((m.a.T, m.b.T, out[0], out[1]))
    seconds = time.perf_counter() - start
    delta = [rel_delta_error(a, b, a2, b2) for a, b, a2, b2 in errs]
    return seconds, max(delta), sum(delta) / len(delta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs for both sides")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/convert.json", help="where the JSON goes")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes (1/16 width), one layer, one repeat: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.repeat = 1, 1
    torch.set_num_threads(args.threads)
    import tensorly

    tensorly.set_backend("pytorch")
    settings = [("random", dict(tensor_rank=5)), ("random", dict(tensor_rank=16)),
                ("random", dict(eps=0.3)),
                ("trained", dict(tensor_rank=5)), ("trained", dict(eps=0.1)),
                ("trained", dict(eps=0.1, tensor_rank=8))]
    if args.smoke:
        settings = [("random", dict(tensor_rank=5)), ("trained", dict(eps=0.1, tensor_rank=8))]
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "repeat": args.repeat, "smoke": args.smoke,
               "torch": torch.__version__, "tensorly": tensorly.__version__, "layers": args.layers,
               "lora_rank": R, "device": args.device, "runs": []}
    adapters = {}
    head = (f"{'kind':8s} {'setting':22s} {'ours s':>8s} {'tly s':>8s} {'speedup':>8s} {'ratio':>8s} "
            f"{'max dErr':>9s} {'mean dErr':>9s} {'tly max':>9s} {'eps met':>7s}")
    print(head)
    for kind, opts in settings:
        if kind not in adapters:
            adapters[kind] = make_adapter(args.layers, kind, shapes=SMOKE_SHAPES if args.smoke else SHAPES)
        adapter = adapters[kind]
        lora_to_tt(adapter, device=args.device, **opts)  # warm-up (allocator, kernels)
        ours = math.inf
        with measuring() as machine:
            for _ in range(args.repeat):  # best of N: the machine is shared, noise only adds time
                start = time.perf_counter()
                _, report = lora_to_tt(adapter, device=args.device, **opts)
                ours = min(ours, time.perf_counter() - start)
            tly = math.inf
            for _ in range(args.repeat):
                seconds, tly_max, tly_mean = tensorly_loop(adapter, report, "paper")
                tly = min(tly, seconds)
        s = report.summary()
        row = dict(kind=kind, setting=opts, ours_s=ours, tensorly_s=tly, speedup=tly / ours,
                   compression=s["compression"], params_before=s["params_before"],
                   params_after=s["params_after"], max_delta_err=s["max_err_delta"],
                   mean_delta_err=s["mean_err_delta"], max_factor_err=max(s["max_err_a"], s["max_err_b"]),
                   tensorly_max_delta_err=tly_max, tensorly_mean_delta_err=tly_mean,
                   eps_met=report.eps_met, modules=s["modules"], machine_state=machine)
        results["runs"].append(row)
        setting = ",".join(f"{k}={v}" for k, v in opts.items())
        print(f"{kind:8s} {setting:22s} {ours:8.2f} {tly:8.2f} {tly / ours:7.1f}x {s['compression']:7.1f}x "
              f"{s['max_err_delta']:9.4f} {s['mean_err_delta']:9.4f} {tly_max:9.4f} {str(report.eps_met):>7s}",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
