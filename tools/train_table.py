"""Render the training-benchmark tables (docs/benchmarks.md) from the JSON that bench_train.py writes.

    python tools/train_table.py benchmarks/results/train_demo.json benchmarks/results/train_full.json \\
        --readme docs/benchmarks.md

Replaces the text between ``<!-- train-bench:begin -->`` and ``<!-- train-bench:end -->``
(without --readme: prints it). Every figure comes from the JSON files; nothing is typed in.

``tools/render_readme.py`` renders this block (train-bench) with every other one, and
``tests/test_rendered_blocks.py`` fails when the page's copy is stale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from readme_block import replace_block

BEGIN, END = "<!-- train-bench:begin -->", "<!-- train-bench:end -->"
NAMES = {"tfidf_lr": "TF-IDF + LR", "frozen_lr": "frozen MiniLM (mean-pooled) + LR",
         "tfidf_lr_all_train_rows": "*reference:* TF-IDF + LR on all training rows",
         "head": "head only", "lora": "PEFT LoRA r 8 (query, value) + head",
         "rep": "LoRETTA_rep (r 8, R 5) + norms + head", "adp": "LoRETTA_adp (64, R 5) + norms + head"}


def _lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def _budget(r: dict) -> str:
    b, split = r["budget"], r["split"]
    rows = b["train_rows"] or split["train"]["rows"]
    steps = next((f["steps"] for f in r["finetuned"].values() if "steps" in f), None)
    return (f"{rows:,} training rows, {b['epochs']:g} epoch(s), batch {b['batch_size']}, max length "
            f"{b['max_length']}" + (f" = {steps} steps" if steps else ""))


def render_one(r: dict) -> str:
    load = r["machine"].get("load_average_at_start")
    lines = [f"#### Budget `{r['budget_name']}`: {_budget(r)}"
             + ("" if r.get("complete") else " (incomplete run: the methods missing below did not finish)"),
             "",
             f"`{r['command']}`: {r['machine']['threads_per_run']} thread per run, {r['machine']['jobs']} "
             f"run(s) side by side on {r['machine']['cpu_count']} cores"
             + (f", load average {load[0]:.1f} at start" if load else "") + ".",
             "",
             "| method | chosen on validation | val. acc. | test acc., mean ± std (seeds) | trainable |",
             "|---|---|---|---|---|"]
    for key in ("tfidf_lr", "frozen_lr"):
        b = r["baselines"].get(key)
        if b:
            lines.append(f"| {NAMES[key]} | C {b['chosen_C']:g} | {b['val_accuracy']:.3f} | "
                         f"{b['test_accuracy']:.3f} (deterministic) | {b['trainable_params']:,} |")
    for key in ("head", "lora", "rep", "adp"):
        f = r["finetuned"].get(key)
        if not f or "test_accuracy_mean" not in f:
            continue
        edge = " (grid edge)" if f.get("chosen_at_grid_edge") else ""
        seeds = ", ".join(f"{a:.4f}" for a in f["test_accuracy"])
        parts = ", ".join(f"{v:,} {k}" for k, v in f["breakdown"].items())
        lines.append(f"| {NAMES[key]} | {f['chosen_pooling']} pooling, lr {_lr(f['chosen_lr'])}{edge} | "
                     f"{f['chosen_val_accuracy']:.3f} | **{f['test_accuracy_mean']:.3f} ± "
                     f"{f['test_accuracy_std']:.3f}** ({seeds}) | {f['trainable_params']:,} ({parts}) |")
    ref = r["baselines"].get("tfidf_lr_all_train_rows")
    if ref:
        rows = r["split"].get("train_pool_rows")
        lines.append(f"| {NAMES['tfidf_lr_all_train_rows']}" + (f" ({rows:,})" if rows else "") + " | C "
                     f"{ref['chosen_C']:g} | {ref['val_accuracy']:.3f} | {ref['test_accuracy']:.3f} | |")
    sweeps = []
    for key in ("head", "lora", "rep", "adp"):
        f = r["finetuned"].get(key)
        if f and f.get("sweep"):
            pts = ", ".join(f"{_lr(s['lr'])} {s['accuracy']:.3f}" for s in f["sweep"])
            sweeps.append(f"- {key}: {pts}")
    if sweeps:
        lines += ["", "Learning-rate sweeps (validation accuracy, seed 0):", "", *sweeps]
    runs = [x for f in r["finetuned"].values() for x in f.get("sweep", []) + f.get("test_runs", [])]
    reused = [x for x in runs if x.get("reused_from")]
    if reused:
        names = ", ".join(f"{x['method']} lr {_lr(x['lr'])} seed {x['seed']} on {x['evaluate_on']}"
                          for x in reused)
        lines += ["", f"{len(reused)} of these {len(runs)} fine-tuning runs were taken from the "
                  f"`--reuse` log (runs an earlier, stopped invocation at the same budget had "
                  f"finished; same step count, checked): {names}."]
    lines += ["", *cost(r)]
    checks = r.get("checks") or {}
    if checks:
        lines += ["", "Targets, computed by the run (`checks` in the JSON): "
                  + "; ".join(f"{k} {v}" for k, v in checks.items()) + "."]
    return "\n".join(lines)


def _runs(f: dict) -> list[dict]:
    return f.get("sweep", []) + f.get("test_runs", [])


def cost(r: dict) -> list[str]:
    """Step times and run costs, compared among this invocation's runs only: a run taken
    from --reuse ran in another invocation, under another load, and is listed apart."""
    fresh, reused = [], []
    for key in ("head", "lora", "rep", "adp"):
        runs = _runs(r["finetuned"].get(key) or {})
        own = [x for x in runs if not x.get("reused_from") and x.get("step_time_s")]
        old = [x for x in runs if x.get("reused_from") and x.get("step_time_s")]
        if own:
            fresh.append(f"{key} {statistics.median(x['step_time_s'] for x in own):.2f} s "
                         f"({len(own)} run{'s' * (len(own) > 1)}, whole run "
                         f"{min(x['run_wall_s'] for x in own) / 60:.1f}-"
                         f"{max(x['run_wall_s'] for x in own) / 60:.1f} min)")
        if old:
            reused.append(f"{key} " + ", ".join(f"{x['step_time_s']:.2f}" for x in old) + " s")
    rss = [x["peak_rss_mib"] for f in r["finetuned"].values() for x in _runs(f)
           if not x.get("reused_from") and x.get("peak_rss_mib")]
    m = r["machine"]
    lines = [f"Cost, runs of this invocation only ({m['threads_per_run']} thread a run, "
             f"{m['jobs']} side by side; invocation wall time {r['wall_time_s']:,.0f} s): median "
             f"step " + "; ".join(fresh) + (f"; peak RSS {min(rss) / 1024:.2f}-{max(rss) / 1024:.2f} "
                                             f"GiB a run." if rss else ".")]
    states = [x["machine_state"] for f in r["finetuned"].values() for x in _runs(f)
              if not x.get("reused_from") and x.get("machine_state")]
    if states:
        loads = [s[k] for s in states for k in ("load_1min_before", "load_1min_after")]
        lines[-1] += (f" 1-minute load average {min(loads):.1f}-{max(loads):.1f} around the runs, "
                      f"{states[0]['cores_available']} cores available.")
    if reused:
        lines += ["", "Step times of the runs taken from `--reuse` (another invocation, under its "
                  "own load; not compared with the above): " + "; ".join(reused) + "."]
    return lines


def render(paths: list[Path], root: Path | None = None) -> str:
    parts = [render_one(json.loads(((root or Path()) / p).read_text())) + f"\n\nSource: `{p.as_posix()}`."
             for p in paths]
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--readme", type=Path)
    args = ap.parse_args(argv)
    block = render(args.json)
    if args.readme is None:
        print(block)
        return 0
    replace_block(args.readme, BEGIN, END, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
