"""The extraction-accuracy block: a Markdown table from ``benchmarks/results/extract_accuracy.json``
(written by ``benchmarks/bench_extract_accuracy.py``) and one line on the machine's state.

    python tools/render_extract_accuracy.py          # print the block

:func:`extract_accuracy_block` returns the Markdown between the block's markers; every figure
in it comes from the JSON, nothing is typed in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "extract_accuracy.json"  # one run: both parts
STAGES = {"lora_svd": "LoRA: truncated SVD", "mergekit": "mergekit-extract-lora",
          "lora_refined": "LoRA: SVD + distillation", "tt_svd": "TT: TT-SVD of the factors",
          "tt_fit": "TT: ALS fit to the delta", "tt_refined": "TT: fit + distillation"}
TT_STAGES = ("tt_svd", "tt_fit", "tt_refined")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def extract_accuracy_block(path: Path = RESULT) -> str:
    """Markdown: test accuracy (%) of each extraction stage at each budget, with the
    parameters of each adapter, the references, and the machine note."""
    r = json.loads(Path(path).read_text())
    ranks = r["ranks"]
    cell = {(e["stage"], e["rank"]): e for e in r["extracted"]}
    stages = [s for s in STAGES if any((s, k) in cell for k in ranks)]
    head = "| stage | " + " | ".join(f"LoRA rank {k} budget" for k in ranks) + " |"
    lines = [head, "|---|" + "---|" * len(ranks)]
    for s in stages:
        row = []
        for k in ranks:
            e = cell.get((s, k))
            row.append("-" if e is None else f"{_pct(e['test_accuracy'])} ({e['params']:,} params, "
                       f"delta error {e['delta_rel_error_mean']:.2f})")
        lines.append(f"| {STAGES[s]} | " + " | ".join(row) + " |")
    refs = r["references"]
    direct = refs.get("direct", {})
    ref_rows = [("full fine-tune (every weight)", refs["full"]["test_accuracy"], refs["full"].get("params")),
                ("full fine-tune, embeddings from the base", refs["full_base_embeddings"]["test_accuracy"], None),
                ("norms, biases, head only (no Linear delta)", refs["no_linear_delta"]["test_accuracy"],
                 refs["no_linear_delta"].get("params"))]
    names = {"lora": "PEFT LoRA r 8 trained directly", "rep": "LoRETTA_rep trained directly",
             "head": "head trained directly", "tfidf_lr": "TF-IDF + LR"}
    for m, name in names.items():
        if m in direct:
            ref_rows.append((name + " (train_demo.json)", direct[m]["test_accuracy"],
                             direct[m].get("trainable_params")))
    lines += ["", "| reference | test accuracy (%) | parameters |", "|---|---|---|"]
    lines += [f"| {n} | {_pct(a)} | {'-' if p is None else f'{p:,}'} |" for n, a, p in ref_rows]
    gaps, fair = [], []
    for k, row in sorted(r.get("summary", {}).items(), key=lambda kv: int(kv[0])):
        parts = [_points(row[f"{s}_minus_lora_points"]) for s in TT_STAGES
                 if f"{s}_minus_lora_points" in row]
        if parts:
            gaps.append(f"rank {k}: {' / '.join(parts)}")
        if "tt_refined_minus_lora_refined_points" in row:
            fair.append(f"rank {k}: {_points(row['tt_refined_minus_lora_refined_points'])}")
    states = [r.get("finetune", {}).get("machine_state"), refs.get("machine_state")]
    states += [e.get("machine_state") for e in r["extracted"]]
    lr = r.get("finetune", {}).get("chosen_lr")
    notes = [f"Test accuracy in % on the test movies ({r['split']['test']['rows']:,} rows); "
             f"full fine-tune at learning rate {lr:g} (chosen on validation from "
             f"{', '.join(f'{x:g}' for x in r['lr_grid'])}){_reused(r.get('finetune', {}))}."]
    if gaps:
        shown = [STAGES[s].split(": ")[1] for s in TT_STAGES if s in stages]
        notes.append(f"TT minus LoRA SVD at equal parameters, in points ({' / '.join(shown)}): "
                     + "; ".join(gaps) + ".")
    if fair:
        notes.append("Like for like, TT + distillation minus LoRA + distillation (the same "
                     "texts, learning rate, time budget and step cap): " + "; ".join(fair) + " points.")
    for stage in ("lora_refined", "tt_refined"):
        refined = [e for e in r["extracted"] if e["stage"] == stage and "distill" in e]
        if refined:
            notes.append(f"Distillation of {STAGES[stage].split(':')[0]}: "
                         + _steps_note(refined, r) + ".")
    if not any(e["stage"] == "lora_refined" for e in r["extracted"]):
        notes.append("LoRA was not distilled.")
    mk = [e for e in r["extracted"] if e["stage"] == "mergekit" and "vs_lora_svd" in e]
    if mk:
        worst = max(e["vs_lora_svd"]["max_rel_diff"] for e in mk)
        notes.append(f"mergekit-extract-lora on the same fine-tune at the same ranks: its deltas "
                     f"differ from our exact-SVD LoRA's by at most {worst:.1e} (relative, per module, "
                     f"over {len(mk)} ranks).")
    # every block's one wording of the machine state; imported here, at call time, because
    # render_readme imports this module
    from render_readme import machine_note

    notes.append(machine_note(states) + " Accuracies do not depend on the load.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + " Source: `benchmarks/results/extract_accuracy.json`.\n"


def _reused(trained: dict) -> str:
    """Which runs of a learning-rate sweep were read back from ``--work`` (trained by an
    earlier run of the same command) rather than trained in this one."""
    old = [f"{e['lr']:g}" for e in trained.get("sweep", []) if e.get("reused")]
    if not old:
        return ""
    return (f"; the runs at {', '.join(old)} were trained by an earlier run of the same command "
            f"and reused from its --work folder, the others trained in this one")


def _points(x: float) -> str:
    """Signed points, one decimal; a gap that rounds to zero is 0.0 (no sign)."""
    text = f"{x:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


def _steps_note(refined: list[dict], r: dict) -> str:
    """How long each distillation ran: a fixed step count when every one reached the cap
    (the time budget unused), else the range of steps the budget allowed."""
    steps = [e["distill"]["steps"] for e in refined]
    batch = refined[0]["distill"]["batch_size"]
    cap, budget = r.get("distill_max_steps", "?"), r.get("distill_seconds", "?")
    if all(e["distill"].get("stopped_by") == "max_steps" for e in refined) and min(steps) == max(steps):
        return (f"{steps[0]} steps of batch {batch} each (the step cap; none reached its time "
                f"budget of {budget} s)")
    return (f"{min(steps)}-{max(steps)} steps of batch {batch} (a time budget of {budget} s, at "
            f"most {cap} steps, each)")


def _resize_notes(rs: dict) -> list[str]:
    notes = []
    peft_rows = [e for e in rs["rows"] if "vs_ours" in e]
    if peft_rows:
        worst = max(e["vs_ours"]["max_rel_diff"] for e in peft_rows)
        same = all(e["same_ranks_as_ours"] for e in peft_rows)
        notes.append(f"{peft_rows[0]['tool']} at the same ranks and thresholds "
                     f"{'chose the same rank for every module' if same else 'chose other ranks for some modules'}"
                     f" and its deltas differ from convert resize's by at most {worst:.1e} (relative).")
    grid = rs["trained"]["lr_grid"]
    notes.append(f"The trained LoRA's learning rate: {rs['trained']['chosen_lr']:g}"
                 + (f", chosen on validation from {', '.join(f'{x:g}' for x in grid)}"
                    f"{_reused(rs['trained'])}." if len(grid) > 1
                    else " (one value, not a choice on validation: bench_train's rank-8 LoRA chose it "
                         "on validation at the same scale, lora_alpha = 2 r)."))
    return notes


def extract_resize_block(path: Path = RESULT) -> str:
    """Markdown: the large LoRA and its resized copies (the resize part of the same
    ``bench_extract_accuracy.py`` run), with the machine note."""
    r = json.loads(Path(path).read_text())
    rs = r["resize"]
    lines = _resize_table(rs, r["references"].get("direct", {}).get("lora"))
    notes = [f"Test accuracy in % on the test movies ({r['split']['test']['rows']:,} rows); parameters: "
             f"the LoRA factors plus the classifier head each copy carries."] + _resize_notes(rs)
    from render_readme import machine_note

    states = [rs["trained"].get("machine_state")] + [e.get("machine_state") for e in rs["rows"]]
    notes.append(machine_note(states) + " Accuracies do not depend on the load.")
    return ("\n".join(lines) + "\n\n" + " ".join(notes)
            + f" Source: `benchmarks/results/{Path(path).name}`.\n")


def _resize_table(rs: dict, direct_lora: dict | None) -> list[str]:
    """The resize part: the large LoRA, each resized copy (ours and PEFT's), and the LoRA
    trained directly at rank 8 (train_demo.json) for comparison."""
    t = rs["trained"]
    lines = [f"| LoRA trained at rank {t['rank']}, resized | tool | ranks (min-max) | test accuracy (%) | parameters |",
             "|---|---|---|---|---|",
             f"| trained at rank {t['rank']} (alpha {t['lora_alpha']}) | - | {t['rank']} | "
             f"{_pct(t['test_accuracy'])} | {t['params']:,} |"]
    for e in rs["rows"]:
        what = f"--rank {e['value']}" if e["by"] == "rank" else f"--energy {e['value']}"
        tool = "convert resize" if e["tool"].startswith("loretta") else "PEFT convert_to_lora"
        k = e["ranks"]
        ks = f"{k['min']}" if k["min"] == k["max"] else f"{k['min']}-{k['max']} (mean {k['mean']})"
        lines.append(f"| {what} | {tool} | {ks} | {_pct(e['test_accuracy'])} | {e['params']:,} |")
    if direct_lora:
        lines.append(f"| LoRA trained directly at rank 8 (train_demo.json, mean of "
                     f"{len(direct_lora.get('seeds') or [])} seeds) | - | 8 | "
                     f"{_pct(direct_lora['test_accuracy'])} | {direct_lora['trainable_params']:,} |")
    return lines


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULT
    print(extract_accuracy_block(path) + "\n" + (extract_resize_block(path) if "resize" in
                                                  json.loads(path.read_text()) else ""))
