"""Benchmark: int8 export of the quickstart's fine-tuned MiniLM classifier (not a test).

1. The model: ``loretta-merge train --method rep`` on the embedded Rotten Tomatoes data
   (``--max-train-samples``, default 600) merged into the embedded MiniLM, as the quickstart
   does; or ``--model DIR`` (a merged seq-cls model with its tokenizer).
2. ``export_onnx(..., quantize="int8")`` with NO extra option: passed or refused, and the
   report (agreement with fp32 on the calibration sentences, random-probe error).
3. Quantization variants of the same fp32 graph (ORT dynamic per-channel / per-tensor /
   reduce_range / only MatMul / FFN-down or first/last layer kept fp32; ORT static QDQ
   calibrated on 128 calibration sentences), each judged on real text: the calibration
   sentences (``embedded.calibration_sentences``, Rotten Tomatoes TRAIN rows) and held-out
   Rotten Tomatoes TEST rows (every 5th, with labels: accuracy of fp32 and int8), and timed
   against fp32 at batch 32 x seq 128 (one thread each, taking turns in every repeat).

Output: ``--out`` (default benchmarks/results/int8.json), the machine state beside every timing.

    python benchmarks/bench_int8.py --smoke      # a tiny random classifier, seconds
    python benchmarks/bench_int8.py              # minutes on 2 cores (trains first)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def train_quickstart_model(tmp: Path, samples: int) -> tuple[Path, list[str]]:
    from loretta_merge.embedded import default_model_path

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    train = ["train", "--method", "rep", "--output", str(tmp / "adapter"),
             "--max-train-samples", str(samples), "-q"]
    merge = [f"{default_model_path()}+{tmp / 'adapter'}", "-o", str(tmp / "merged"), "-q"]
    for args in (train, merge):
        subprocess.run([sys.executable, "-m", "loretta_merge.cli", *args], check=True, env=env)
    shown = ["train", "--method", "rep", "--output", "adapter", "--max-train-samples", str(samples)]
    return tmp / "merged", ["loretta-merge " + " ".join(shown), "loretta-merge BASE+adapter -o merged"]


def smoke_model(tmp: Path) -> Path:
    """A tiny random BERT classifier with the embedded MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from loretta_merge.embedded import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=2)).eval()
    model.save_pretrained(tmp / "smoke")
    tok.save_pretrained(tmp / "smoke")
    return tmp / "smoke"


def variants(graph) -> dict[str, dict]:
    """name -> quantizer settings; node lists found from the graph's structure."""
    inits = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    weight_mm = [n.name for n in graph.node if n.op_type == "MatMul"
                 and any(i in inits for i in n.input)]
    ffn_down = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[0] in producer
                and producer[n.input[0]].op_type in ("Gelu", "FastGelu")]
    per_layer = len(weight_mm) // max(len(ffn_down), 1)
    return {
        "dynamic per-channel (default)": {"per_channel": True},
        "dynamic per-tensor": {"per_channel": False},
        "dynamic per-channel reduce_range": {"per_channel": True, "reduce_range": True},
        "dynamic per-channel, MatMul only (embeddings fp32)": {"per_channel": True,
                                                                "op_types": ["MatMul"]},
        "dynamic per-channel, FFN-down MatMuls fp32": {"per_channel": True,
                                                       "nodes_to_exclude": ffn_down},
        "dynamic per-channel, first layer fp32": {"per_channel": True,
                                                  "nodes_to_exclude": weight_mm[:per_layer]},
        "dynamic per-channel, last layer fp32": {"per_channel": True,
                                                 "nodes_to_exclude": weight_mm[-per_layer:]},
        "static QDQ (calibrated, per-channel, s8/s8)": {"static": True},
    }


def session(path: Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    try:
        run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="Tiny random classifier, seconds.")
    ap.add_argument("--model", default=None, help="A merged seq-cls model dir (default: train).")
    ap.add_argument("--max-train-samples", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8.json"))
    args = ap.parse_args()

    import numpy as np
    import onnx
    from onnxruntime import quantization as ortq
    from transformers import AutoTokenizer

    from loretta_merge.converters.onnx import export_onnx
    from loretta_merge.converters.onnx.quantize import run_quantizer
    from loretta_merge.embedded import calibration_sentences, rotten_tomatoes
    from loretta_merge.errors import LorettaError

    result: dict = {"smoke": args.smoke}
    if args.smoke:
        model_dir, how = smoke_model(tmp), ["tiny random BertForSequenceClassification (smoke)"]
        batch, seq, repeats, n_calib, test_every = 4, 16, 1, 32, 50
    elif args.model:
        model_dir, how = Path(args.model), [f"--model {args.model}"]
        batch, seq, repeats, n_calib, test_every = 32, 128, args.repeats, 256, 5
    else:
        t0 = time.perf_counter()
        model_dir, how = train_quickstart_model(tmp, args.max_train_samples)
        result["train_and_merge_seconds"] = round(time.perf_counter() - t0, 1)
        batch, seq, repeats, n_calib, test_every = 32, 128, args.repeats, 256, 5
    result["model"] = how

    # 2. the export as a user runs it: --quantize int8, nothing else
    try:
        rep = export_onnx(model_dir, tmp / "int8-default", task="seq-cls", quantize="int8",
                          provider="cpu")
        result["default_export"] = {"passed": True, **rep.quantize.__dict__}
    except LorettaError as exc:
        result["default_export"] = {"passed": False, "refusal": str(exc)}
    print("default export:", json.dumps(result["default_export"])[:600], flush=True)

    # 3. the variants, on the same fp32 graph
    export_onnx(model_dir, tmp / "fp32", task="seq-cls", provider="cpu")
    fp32_path = tmp / "fp32" / "model.onnx"
    tok = AutoTokenizer.from_pretrained(model_dir)
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    names = [i.name for i in graph.input]
    calib, _, calib_source = calibration_sentences(n_calib)
    _, test = rotten_tomatoes()
    test = test[::test_every]
    test_texts, test_labels = [r["text"] for r in test], np.asarray([r["label"] for r in test])

    def feeds(texts, b=32):
        for s in range(0, len(texts), b):
            enc = tok(texts[s:s + b], padding=True, truncation=True, max_length=128,
                      return_tensors="np")
            yield {k: enc[k].astype(np.int64) for k in names}

    def logits(sess, texts):
        return np.concatenate([sess.run(None, f)[0] for f in feeds(texts)])

    rng = np.random.default_rng(0)
    timing_feed = {"input_ids": rng.integers(1000, tok.vocab_size, (batch, seq)).astype(np.int64),
                   "attention_mask": np.ones((batch, seq), np.int64)}
    timing_feed["attention_mask"][0, seq - seq // 4:] = 0
    if "token_type_ids" in names:
        timing_feed["token_type_ids"] = np.zeros((batch, seq), np.int64)

    ref = session(fp32_path)
    ref_calib, ref_test = logits(ref, calib), logits(ref, test_texts)
    result.update(calibration=calib_source, test_rows=len(test), timing_shape=[batch, seq],
                  threads=1, repeats=repeats,
                  accuracy_fp32_test=float((ref_test.argmax(-1) == test_labels).mean()),
                  variants=[])

    class Reader(ortq.CalibrationDataReader):
        def __init__(self):
            self.it = iter(list(feeds(calib[:128], 16)))

        def get_next(self):
            return next(self.it, None)

    for name, spec in variants(graph).items():
        dst = tmp / f"v{len(result['variants'])}.onnx"
        spec = dict(spec)
        if spec.pop("static", False):
            logging.getLogger().setLevel(logging.ERROR)
            ortq.quantize_static(str(fp32_path), str(dst), Reader(),
                                 quant_format=ortq.QuantFormat.QDQ, per_channel=True,
                                 weight_type=ortq.QuantType.QInt8,
                                 activation_type=ortq.QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"],
                                 extra_options={"ActivationSymmetric": True})
        else:
            run_quantizer(fp32_path, dst, **spec)
        s8 = session(dst)
        got_calib, got_test = logits(s8, calib), logits(s8, test_texts)
        times = {"fp32": [], "int8": []}
        with measuring() as machine:
            s8.run(None, timing_feed), ref.run(None, timing_feed)
            for _ in range(repeats):
                for key, sess in (("fp32", ref), ("int8", s8)):
                    t = time.perf_counter()
                    sess.run(None, timing_feed)
                    times[key].append(time.perf_counter() - t)
        fp32_ms = 1000 * statistics.median(times["fp32"])
        int8_ms = 1000 * statistics.median(times["int8"])
        row = {"variant": name, "fp32_nodes": len(spec.get("nodes_to_exclude", [])),
               "agreement_calibration": float((got_calib.argmax(-1) == ref_calib.argmax(-1)).mean()),
               "agreement_test": float((got_test.argmax(-1) == ref_test.argmax(-1)).mean()),
               "rel_error_calibration": float(np.linalg.norm(got_calib - ref_calib)
                                              / np.linalg.norm(ref_calib)),
               "accuracy_int8_test": float((got_test.argmax(-1) == test_labels).mean()),
               "bytes": sum(p.stat().st_size for p in tmp.glob(dst.name + "*")),
               "fp32_ms": round(fp32_ms, 2), "int8_ms": round(int8_ms, 2),
               "speedup": round(fp32_ms / int8_ms, 3), "machine_state": machine}
        result["variants"].append(row)
        print(json.dumps(row), flush=True)
        del s8

    result["fp32_bytes"] = sum(p.stat().st_size for p in (tmp / "fp32").glob("model.onnx*"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
