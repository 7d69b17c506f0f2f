"""Benchmark: the ONNX exporter's graph optimization, onnxscript's default rules against ours
(not a test).

``export onnx`` optimizes the traced graph with onnxscript's default optimizer (constant
folding, rewrite rules, dead-code removal, fusions) without the rules named in
``loretta_merge.converters.onnx.graph.SKIPPED_REWRITE_RULES``. This script measures why: an
adapter bank's graph (``--adapter-bank``) of a tiny Llama with the KV cache (two rep adapters
and a PEFT LoRA in a bank of 4 slots, as tests/test_serving.py exports it) is traced at
growing depth, and the same traced graph is optimized twice in this process, taking turns:

- ``default``: ``onnxscript.optimizer.optimize_ir`` + ``onnx_fusions.fuse``, what
  ``torch.onnx.export(optimize=True)`` runs;
- ``ours``: the same inside ``graph.skipped_rewrite_rules()``.

Per depth: the graph's nodes and Slice nodes, each optimization's seconds (median of
``--repeat``), their ratio, and whether both give the same graph (serialized protos equal).

    python benchmarks/bench_onnx_optimize.py --smoke --out /tmp/o.json   # seconds
    python benchmarks/bench_onnx_optimize.py                              # a few minutes
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

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def make_inputs(tmp: Path, layers: int, smoke: bool) -> tuple[Path, list[str]]:
    """A tiny Llama of ``layers`` layers, and its bank's adapters as ``NAME=DIR`` specs (a
    smoke run: the first rep adapter alone)."""
    import peft
    import torch
    import transformers

    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import RepConfig

    def model():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=layers, **LLAMA)).eval()

    base = tmp / "base"
    model().save_pretrained(base)
    specs = []
    for name, r, tt, targets in (("a", 4, 3, ["q_proj", "v_proj"]),
                                 ("b", 8, 2, ["q_proj", "o_proj", "gate_proj"])):
        rep = get_loretta_model(model(), RepConfig(r=r, lora_alpha=2 * r, tensor_rank=tt,
                                                   lora_dropout=0.0, target_modules=targets))
        specs.append(f"{name}={save_loretta_adapter(rep, tmp / name)}")
        if smoke:
            return base, specs
    lora = peft.get_peft_model(model(), peft.LoraConfig(r=4, lora_alpha=8,
                                                        target_modules=["q_proj", "v_proj", "down_proj"]))
    lora.save_pretrained(tmp / "g")
    specs.append(f"g={tmp / 'g'}")
    return base, specs


def traced_graph(tmp: Path, layers: int, smoke: bool) -> bytes:
    """The bank graph as traced, before any optimization (a serialized ONNX model)."""
    import onnx_ir as ir

    from loretta_merge.converters.onnx import export_onnx, graph

    base, specs = make_inputs(tmp, layers, smoke)
    captured = []
    real = graph.optimize

    def capture(program):
        captured.append(ir.serde.serialize_model(program.model).SerializeToString())
        real(program)

    graph.optimize = capture
    try:
        export_onnx(base, tmp / "onnx", adapter_bank=4, with_past=True, validate=False,
                    switchable_adapters=specs)
    finally:
        graph.optimize = real
    return captured[0]


def optimize_copy(proto: bytes, skip: bool) -> tuple[float, bytes]:
    import onnx
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    from loretta_merge.converters.onnx import graph

    model = ir.serde.deserialize_model(onnx.load_from_string(proto))
    start = time.perf_counter()
    if skip:
        with graph.skipped_rewrite_rules():
            onnxscript.optimizer.optimize_ir(model)
    else:
        onnxscript.optimizer.optimize_ir(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    seconds = time.perf_counter() - start
    return seconds, ir.serde.serialize_model(model).SerializeToString()


def bench_depth(layers: int, repeat: int, smoke: bool = False) -> dict:
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        proto = traced_graph(Path(tmp), layers, smoke)
    nodes = onnx.load_from_string(proto).graph.node
    times: dict[str, list[float]] = {"default": [], "ours": []}
    outputs: dict[str, bytes] = {}
    with measuring() as machine:
        for _ in range(repeat):
            for case in ("default", "ours"):
                seconds, outputs[case] = optimize_copy(proto, skip=case == "ours")
                times[case].append(seconds)
    row = {"layers": layers, "nodes": len(nodes),
           "slice_nodes": sum(n.op_type == "Slice" for n in nodes),
           "default_s": round(statistics.median(times["default"]), 3),
           "ours_s": round(statistics.median(times["ours"]), 3),
           "runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
           "same_graph": outputs["default"] == outputs["ours"], "machine_state": machine}
    row["default_over_ours"] = round(row["default_s"] / row["ours_s"], 2)
    print(f"{layers} layers: {row['nodes']} nodes ({row['slice_nodes']} Slice), default "
          f"{row['default_s']:.2f} s, ours {row['ours_s']:.2f} s ({row['default_over_ours']:.2f}x), "
          f"same graph: {row['same_graph']}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one layer, one adapter, seconds")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", "--output", dest="output", type=Path,
                    default=ROOT / "benchmarks" / "results" / "onnx_optimize.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.repeat = [1], 1
    import onnxscript
    import torch

    from loretta_merge.converters.onnx import graph

    torch.set_num_threads(args.threads)
    rows = [bench_depth(n, args.repeat, args.smoke) for n in args.layers]
    result = {"benchmark": "onnx_optimize", "command": " ".join(["python", *sys.argv]),
              "smoke": args.smoke, "skipped_rules": list(graph.SKIPPED_REWRITE_RULES),
              "onnxscript": onnxscript.__version__, "torch": torch.__version__,
              "threads": args.threads, "repeat": args.repeat, "bank_slots": 4, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
