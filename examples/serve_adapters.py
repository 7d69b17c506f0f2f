"""Serve many LoRETTA/LoRA adapters from one ONNX base, switching adapters per request.

    python examples/serve_adapters.py                       # a tiny demo model, two adapters
    python examples/serve_adapters.py --base BASE --adapter a=./rep-a --adapter b=./lora-b

Exports BASE once with every adapter switchable (``loretta-merge export onnx BASE -o OUT
--switchable-adapter NAME=DIR ...``), then answers a stream of requests, each naming the
adapter it wants: ONNX Runtime activates that adapter's ``.onnx_adapter`` file for the one
``run`` (``RunOptions.add_active_adapter``). For comparison the same requests for the first
adapter also run on a graph with that adapter merged into the weights (what one model per
fine-tune costs); both are measured in this run and the per-request latencies printed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

from loretta_merge.converters.onnx import export_onnx
from loretta_merge.adapters import load_loretta_model, merge_loretta_model


def demo_model(root: Path) -> tuple[Path, dict[str, Path]]:
    """A small random Llama and two random rep adapters (stand-ins for real fine-tunes)."""
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    adapters = {}
    for i, name in enumerate(("support", "legal")):
        torch.manual_seed(i + 1)
        model = get_loretta_model(transformers.LlamaForCausalLM(config),
                                  RepConfig(r=8, tensor_rank=4, lora_dropout=0.0))
        with torch.no_grad():  # pretend it was trained: non-zero TT cores
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        adapters[name] = save_loretta_adapter(model, root / name)
    return root / "base", adapters


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_options(path: Path):
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter  # keep the adapter object alive with its options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="Base model directory (default: a tiny demo).")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--work", default=None, help="Where to write the exports (default: temp).")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="serve-adapters-"))
    if args.base:
        base = Path(args.base)
        adapters = {n: Path(p) for n, p in (s.split("=", 1) for s in args.adapter)}
    else:
        base, adapters = demo_model(work)

    report = export_onnx(base, work / "served", force=True,
                         switchable_adapters=[f"{n}={p}" for n, p in adapters.items()])
    for s in report.switchable:
        print(f"adapter {s.name}: {s.file_bytes / 1024:.1f} KiB, validated max diff "
              f"{s.validation.max_abs_diff:.1e} on {s.validation.providers[0]}")
    first = next(iter(adapters))
    merged_dir = work / f"merged-{first}"
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    merge_loretta_model(load_loretta_model(model, adapters[first])).save_pretrained(merged_dir)
    export_onnx(merged_dir, work / f"merged-{first}-onnx", force=True)

    served = session(work / "served" / "model.onnx")
    merged = session(work / f"merged-{first}-onnx" / "model.onnx")
    options = {n: run_options(work / "served" / "adapters" / f"{n}.onnx_adapter") for n in adapters}
    vocab = transformers.AutoConfig.from_pretrained(base).vocab_size
    rng = random.Random(0)
    warm = {"input_ids": np.full((1, 32), 3, dtype=np.int64), "attention_mask": np.ones((1, 32), np.int64)}
    for name in adapters:  # first runs allocate; not part of a request's latency
        served.run(None, warm, options[name][0])
    merged.run(None, warm)
    latency: dict[str, list[float]] = {n: [] for n in adapters}
    latency[f"merged {first}"] = []
    for _ in range(args.requests):
        name = rng.choice(list(adapters))
        ids = np.array([[rng.randrange(3, vocab) for _ in range(32)]], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        t0 = time.perf_counter()
        served.run(None, feed, options[name][0])
        latency[name].append(time.perf_counter() - t0)
        if name == first:  # the same request on the single-adapter merged graph
            t0 = time.perf_counter()
            merged.run(None, feed)
            latency[f"merged {first}"].append(time.perf_counter() - t0)
    for name, times in latency.items():
        if times:
            print(f"{name:>16s}: median {1000 * statistics.median(times):6.2f} ms per request "
                  f"over {len(times)} requests")


if __name__ == "__main__":
    main()
