"""Write the merge benchmark table (docs/benchmarks.md) from ``benchmarks/bench_merge.py``'s JSON files.

    python tools/merge_table.py benchmarks/results/merge-1gb.json benchmarks/results/merge-7b.json --readme docs/benchmarks.md

Every figure comes from the JSON (medians of the run's rounds and the ratios measured round by
round in that run); nothing is typed by hand. The section between
``<!-- merge-bench:begin -->`` and ``<!-- merge-bench:end -->`` is replaced.

``tools/render_readme.py`` renders this block (merge-bench) with every other one, and
``tests/test_rendered_blocks.py`` fails when the page's copy is stale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from readme_block import replace_block

BEGIN, END = "<!-- merge-bench:begin -->", "<!-- merge-bench:end -->"
LABELS = {
    "floor": "I/O floor: safetensors `load_file` + `save_file` + fsync of every file",
    "floor-nosync": "the same without fsync (page cache only)",
    "copy-direct": "copy of the shards' bytes, O_DIRECT writes + fsync (no tensors)",
    "lora": "`loretta-merge BASE+LORA` (PEFT LoRA r 16)",
    "rep": "`loretta-merge BASE+REP` (LoRETTA_rep)",
    "peft": "PEFT `merge_and_unload` + `save_pretrained`",
}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def table(result: dict) -> str:
    shard = result["largest_input_shard_bytes"]
    lines = [f"**{result['size']}**: {_gb(result['checkpoint_bytes'])} bf16 in "
             f"{result['input_shards']} shards (largest {_gb(shard)}), {result['rounds']} "
             f"interleaved rounds, page cache {result['page_cache']}, {result['cpu_count']} cores.",
             "", "| case | wall (median) | CPU user + sys | / floor | PEFT / case | peak RSS above "
             "the interpreter | / largest shard |", "|---|---|---|---|---|---|---|"]
    ratios = result.get("ratios", {})
    for case, label in LABELS.items():
        c = result["cases"].get(case)
        if c is None:
            continue
        r = ratios.get(case, {})
        over = "1.00x" if case == "floor" else (f"{r['wall_over_floor']:.2f}x" if "wall_over_floor" in r else "")
        if "wall_over_copy_direct" in r:
            over += f" ({r['wall_over_copy_direct']:.2f}x copy-direct)"
        peft = f"{r['peft_wall_over_ours']:.2f}x" if "peft_wall_over_ours" in r else ""
        rss = c["peak_rss_above_interpreter_bytes"]
        lines.append(f"| {label} | {c['wall_s']:.2f} s | {c['user_s']:.2f} + {c['sys_s']:.2f} s | "
                     f"{over} | {peft} | {rss / 2**20:,.0f} MiB | {rss / shard:.2f}x |")
    for case, why in result.get("skipped", {}).items():
        lines.append(f"\n{case} not run: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--readme", type=Path)
    args = ap.parse_args(argv)
    body = "\n".join(table(json.loads(p.read_text())) for p in args.results)
    if args.readme is None:
        print(body)
        return
    replace_block(args.readme, BEGIN, END, body)


if __name__ == "__main__":
    main()
