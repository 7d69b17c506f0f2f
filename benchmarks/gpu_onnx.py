"""ONNX Runtime on the GPU: CUDA provider vs CPU for fp32 and fp16 exports (prepared script).

One short run for a machine with a GPU and ``pip install 'loretta-merge[gpu]'``
(onnxruntime-gpu, which replaces the CPU-only onnxruntime):

    python benchmarks/gpu_onnx.py --output benchmarks/results/gpu_onnx.json
    python benchmarks/gpu_onnx.py --smoke        # tiny model; runs on a CPU-only machine

A small random Llama is exported twice with :func:`export_onnx` (float32, and float16 for the
GPU, each validated with ``provider="auto"``), then each graph runs the same batches in a
CPU session and in a session that asks for CUDA. Every figure is labelled with the
providers the session *really* used (``session.get_providers()``): onnxruntime-gpu falls
back to the CPU silently when CUDA cannot start, and this script says so instead of
reporting a CPU time as a GPU time. float16 on the CPU provider is measured only where the
installed onnxruntime has the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench_export import SMOKE_LLAMA, batch, median_ms, session  # noqa: E402

FULL_LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1024,
                  tie_word_embeddings=False)


def measure(path: Path, provider: str, sizes, vocab: int, args) -> dict:
    import torch

    try:
        sess = session(path, args.threads, provider)
    except Exception as exc:  # noqa: BLE001 - e.g. no fp16 kernels on this provider
        return {"asked": provider, "error": str(exc).splitlines()[0][:200]}
    ran = sess.get_providers()
    rows = []
    for b, s in sizes:
        feed = {k: v.numpy() for k, v in batch(vocab, b, s, torch).items()}
        (ms,) = median_ms([lambda: sess.run(None, feed)], args.warmup, args.repeats)
        rows.append({"batch": b, "sequence": s, "ms": round(ms, 3)})
    fallback = provider == "cuda" and ran[0] != "CUDAExecutionProvider"
    return {"asked": provider, "providers": ran, "cuda_fallback_to_cpu": fallback, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: ORT's default)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gpu_onnx.json"))
    args = parser.parse_args()
    if args.smoke:  # one CPU thread: smoke figures are unread, and the suite runs two at once
        args.warmup, args.repeats, args.threads = 1, 2, 1

    import onnxruntime as ort
    import torch
    import transformers

    from loretta_merge.converters.onnx import export_onnx

    cfg = SMOKE_LLAMA if args.smoke else FULL_LLAMA
    sizes = [(1, 16)] if args.smoke else [(1, 128), (8, 512), (32, 512)]
    result = {"smoke": args.smoke, "onnxruntime": ort.__version__,
              "available_providers": ort.get_available_providers(), "exports": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(tmp / "m")
        for dtype in ("float32", "float16"):
            out = tmp / dtype
            report = export_onnx(tmp / "m", out, dtype=dtype, provider="auto")
            v = report.validation
            entry = {"validated_on": v.providers, "max_abs_diff": v.max_abs_diff, "atol": v.atol,
                     "runs": [measure(out / "model.onnx", p, sizes, cfg["vocab_size"], args)
                              for p in ("cpu", "cuda")]}
            result["exports"][dtype] = entry
            for run in entry["runs"]:
                label = "ERROR " + run["error"] if "error" in run else (
                    f"ran on {run['providers'][0]}"
                    + (" (CUDA asked for, not available: CPU fallback)"
                       if run["cuda_fallback_to_cpu"] else "")
                    + "  " + ", ".join(f"{r['batch']}x{r['sequence']}: {r['ms']:.2f} ms"
                                       for r in run["rows"]))
                print(f"{dtype} asked {run['asked']:4s}: {label}", flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
