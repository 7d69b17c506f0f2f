"""Fine-tune MiniLM with LoRETTA_rep on the embedded Rotten Tomatoes split (Python API).

    python examples/finetune.py --output work/adapter [--max-steps 60]
"""

import argparse

from loretta_merge.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="work/adapter")
    ap.add_argument("--max-steps", type=int, default=None, help="Cap the run (default: the embedded budget).")
    ap.add_argument("--max-train-samples", type=int, default=None)
    ap.add_argument("--max-eval-samples", type=int, default=None, help="Evaluate on a fixed subset.")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()

    # No model and no data: the embedded default (MiniLM + movie-disjoint Rotten Tomatoes).
    report = train(method="rep", output_dir=args.output, max_steps=args.max_steps,
                   max_train_samples=args.max_train_samples,
                   max_eval_samples=args.max_eval_samples, force=args.force, progress=False)
    print(f"accuracy {report.metrics_before['accuracy']:.3f} -> {report.metrics_after['accuracy']:.3f}, "
          f"{report.trainable_params:,} trainable parameters "
          f"(LoRA r=8 on the same targets: {report.lora_r8_equivalent_params:,})")
    print(f"adapter written to {report.output_dir}")


if __name__ == "__main__":
    main()
