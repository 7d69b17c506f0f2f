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
RESULT = ROOT / "benchmarks" / "results" / "extract_accuracy.json"
STAGES = {"lora_svd": "LoRA: truncated SVD", "tt_svd": "TT: TT-SVD of the factors",
          "tt_fit": "TT: ALS fit to the delta", "tt_refined": "TT: fit + distillation"}


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
    gaps = []
    for k, row in sorted(r.get("summary", {}).items(), key=lambda kv: int(kv[0])):
        parts = [f"{row[f'{s}_minus_lora_points']:+.1f}" for s in ("tt_svd", "tt_fit", "tt_refined")
                 if f"{s}_minus_lora_points" in row]
        if parts:
            gaps.append(f"rank {k}: {' / '.join(parts)}")
    states = [r.get("finetune", {}).get("machine_state"), refs.get("machine_state")]
    states += [e.get("machine_state") for e in r["extracted"]]
    lr = r.get("finetune", {}).get("chosen_lr")
    notes = [f"Test accuracy in % on the test movies ({r['split']['test']['rows']:,} rows); "
             f"full fine-tune at learning rate {lr:g} (chosen on validation from "
             f"{', '.join(f'{x:g}' for x in r['lr_grid'])})."]
    if gaps:
        shown = [STAGES[s].split(": ")[1] for s in ("tt_svd", "tt_fit", "tt_refined") if s in stages]
        notes.append(f"TT minus LoRA at equal parameters, in points ({' / '.join(shown)}): "
                     + "; ".join(gaps) + ".")
    refined = [e for e in r["extracted"] if e["stage"] == "tt_refined" and "distill" in e]
    if refined:
        steps = [e["distill"]["steps"] for e in refined]
        notes.append(f"Distillation: {min(steps)}-{max(steps)} steps of batch "
                     f"{refined[0]['distill']['batch_size']} (a time budget of "
                     f"{r.get('distill_seconds', '?')} s each); LoRA was not distilled.")
    # every block's one wording of the machine state; imported here, at call time, because
    # render_readme imports this module
    from render_readme import machine_note

    notes.append(machine_note(states) + " Accuracies do not depend on the load.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + " Source: `benchmarks/results/extract_accuracy.json`.\n"


if __name__ == "__main__":
    print(extract_accuracy_block(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULT))
