"""Merge a LoRETTA_rep (or PEFT LoRA) adapter into its base checkpoint (Python API).

    python examples/merge.py BASE_DIR ADAPTER_DIR --output work/merged
"""

import argparse

from loretta_merge.merge import merge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("--output", default="work/merged")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()

    # Streams the base tensor by tensor; verify=True reloads both and compares logits.
    report = merge(args.base, [(args.adapter, 1.0)], args.output, verify=True,
                   force=args.force, progress=False)
    print(f"merged {report.merged_tensors} tensors, replaced {report.replaced_tensors}, "
          f"copied {report.copied_tensors} in {report.seconds:.1f} s")
    print(f"max |logit difference| against the unmerged model: {report.verify['max_abs_logit_diff']:.2e}")


if __name__ == "__main__":
    main()
