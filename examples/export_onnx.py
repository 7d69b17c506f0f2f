"""Export a model directory (e.g. a merged output) to ONNX, validated in ONNX Runtime.

    python examples/export_onnx.py MODEL_DIR --output work/onnx [--task seq-cls] [--quantize int8]
"""

import argparse

from loretta_merge.converters.onnx import export_onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--output", default="work/onnx")
    ap.add_argument("--task", default="auto")
    ap.add_argument("--adapter", default=None, help="Apply a LoRETTA_adp/rep adapter in the graph.")
    ap.add_argument("--quantize", default=None, choices=["int8"], help="Dynamic int8 quantization.")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()

    report = export_onnx(args.model, args.output, task=args.task, adapter=args.adapter, force=args.force,
                         quantize=args.quantize)
    v = report.validation
    print(f"exported {report.onnx_path} ({report.exporter} exporter, opset {report.opset})")
    print(f"validated on {', '.join(v.providers)}: max |diff| {v.max_abs_diff:.2e} (atol {v.atol:.0e})")
    if report.quantize is not None:
        q = report.quantize
        print(f"int8: {q.int8_bytes / 1e6:.1f} MB (fp32 {q.fp32_bytes / 1e6:.1f} MB), judged on "
              f"{q.judged_on}: " + (f"agreement {q.text_agreement:.1%}, relative error "
                                    f"{q.text_rel_error:.3g}" if q.text_agreement is not None
                                    else f"relative error {q.rel_error:.3g}"))


if __name__ == "__main__":
    main()
