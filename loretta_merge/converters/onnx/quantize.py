"""int8 export: ONNX Runtime's dynamic quantization of the validated fp32 graph.

Weights of MatMul/Gemm become int8 (activations are quantized at run time, per batch). The
int8 graph replaces the fp32 one in the output only if it agrees with it on the probe
batches: ||int8 - fp32|| / ||fp32|| over the kept positions at most ``INT8_MAX_REL_ERROR``
(max abs/rel diffs, per-position cosines and argmax agreement are reported). For seq-cls with an eval file, both graphs also classify every row and the
accuracy of each is reported.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from ...deps import require
from ...errors import ConfigError, FormatError, NumericsError
from .reports import INT8_MAX_REL_ERROR, PROBE_SHAPES, QuantizeReport
from .validate import compare, open_session, probe_batch


def _graph_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _run_quantizer(src: Path, dst: Path, external: bool) -> None:
    quantization = require("onnxruntime.quantization", extra="onnx", purpose="--quantize int8")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice on the root logger
    try:
        # per-channel weight scales: on MiniLM the relative error of the hidden states drops
        # from 0.30 (per-tensor) to 0.14; reduce_range made it worse (0.55) on this CPU
        quantization.quantize_dynamic(str(src), str(dst), weight_type=quantization.QuantType.QInt8,
                                      per_channel=True, use_external_data_format=external)
    except Exception as exc:  # noqa: BLE001 - the quantizer's own failures
        raise FormatError(f"int8 quantization of {src.name} failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); export without --quantize, or report the "
                          f"architecture") from exc
    finally:
        root.setLevel(level)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching vectors along the last axis."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norms, 1e-30)


def _agreement(fp32, int8, config, names: list[str], task: str):
    """(max abs diff, max rel diff, relative error, min cosine, share of equal argmax) over
    the kept positions of the probes."""
    worst_abs = worst_rel = err_sq = ref_sq = 0.0
    cosine = 1.0
    same = total = 0
    for i, (b, s) in enumerate(PROBE_SHAPES):
        feed = {k: v.numpy() for k, v in probe_batch(config, names, b, s, seed=200 + i).items()}
        ref = np.asarray(fp32.run(None, feed)[0], dtype=np.float32)
        got = np.asarray(int8.run(None, feed)[0], dtype=np.float32)
        keep = None if task == "seq-cls" else feed["attention_mask"].astype(bool)
        max_abs, max_rel, _ = compare(got, ref, keep, np.inf, 0.0)
        worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
        a, r, cos = got.argmax(-1), ref.argmax(-1), _cosines(got, ref)
        if keep is not None:
            a, r, cos = a[keep], r[keep], cos[keep]
        cosine = min(cosine, float(cos.min()) if np.isfinite(cos).all() else -1.0)
        g, f = (got, ref) if keep is None else (got[keep], ref[keep])
        err_sq += float(((g.astype(np.float64) - f) ** 2).sum())
        ref_sq += float((f.astype(np.float64) ** 2).sum())
        same += int((a == r).sum())
        total += a.size
    rel_error = (err_sq / max(ref_sq, 1e-30)) ** 0.5 if np.isfinite(err_sq) else float("inf")
    return worst_abs, worst_rel, rel_error, cosine, same / max(total, 1)


def quantize_int8(onnx_path: Path, model, *, task: str, names: list[str], model_dir: Path,
                  eval_file=None, external: bool = False, provider: str = "cpu",
                  max_rel_error: float = INT8_MAX_REL_ERROR) -> QuantizeReport:
    """Replace ``onnx_path`` (fp32, validated) by its int8 form, checked against it."""
    fp32_dir = onnx_path.parent / ".fp32"
    fp32_dir.mkdir()
    fp32_path = fp32_dir / onnx_path.name
    for p in list(onnx_path.parent.glob(onnx_path.name + "*")):
        shutil.move(str(p), fp32_dir / p.name)
    try:
        _run_quantizer(fp32_path, onnx_path, external)
        fp32, int8 = open_session(fp32_path, provider), open_session(onnx_path, provider)
        max_abs, max_rel, rel_error, cosine, agree = _agreement(fp32, int8, model.config, names,
                                                                task)
        report = QuantizeReport(method="int8-dynamic", fp32_bytes=_graph_bytes(fp32_path),
                                int8_bytes=_graph_bytes(onnx_path), max_abs_diff=max_abs,
                                max_rel_diff=max_rel, rel_error=rel_error,
                                rel_error_allowed=max_rel_error, min_cosine=cosine,
                                argmax_agreement=agree, passed=rel_error <= max_rel_error)
        if eval_file is not None:
            _eval_accuracy(report, fp32, int8, model, names, Path(eval_file), model_dir)
        del fp32, int8
    finally:
        shutil.rmtree(fp32_dir, ignore_errors=True)
    if not report.passed:
        raise NumericsError(f"the int8 graph of {model_dir} disagrees with the fp32 graph: "
                            f"||int8 - fp32|| / ||fp32|| = {rel_error:.3g} on the probes (allowed "
                            f"{max_rel_error}), max |int8 - fp32| = {max_abs:.3g}; nothing was "
                            f"written. Export without --quantize, or accept a larger error with "
                            f"--int8-max-error")
    return report


def _eval_rows(eval_file: Path, config) -> tuple[list[str], list[int]]:
    from ...datafiles import classification_rows, read_rows

    texts, labels = classification_rows(read_rows(eval_file), text_column="text",
                                        label_column="label", source=str(eval_file))
    label2id = getattr(config, "label2id", None) or {}
    ids = []
    for i, label in enumerate(labels):
        if isinstance(label, str) and label not in label2id:
            raise ConfigError(f"{eval_file} row {i}: label {label!r} is not one of the model's "
                              f"labels {sorted(label2id)}; use integer ids or those names")
        ids.append(label2id[label] if isinstance(label, str) else int(label))
    return texts, ids


def _eval_accuracy(report: QuantizeReport, fp32, int8, model, names, eval_file: Path,
                   model_dir: Path, batch: int = 32) -> None:
    """Accuracy of both graphs on a seq-cls eval file (columns ``text`` and ``label``)."""
    from transformers import AutoTokenizer

    texts, labels = _eval_rows(eval_file, model.config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FormatError(f"--eval-file needs the tokenizer of {model_dir}, which cannot be "
                          f"loaded ({exc}); copy the tokenizer files into {model_dir}") from exc
    hits = {"fp32": 0, "int8": 0}
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start:start + batch], padding=True, truncation=True,
                        max_length=128, return_tensors="np")
        feed = {n: enc[n].astype(np.int64) for n in names if n in enc}
        gold = np.asarray(labels[start:start + batch])
        for key, session in (("fp32", fp32), ("int8", int8)):
            hits[key] += int((session.run(None, feed)[0].argmax(-1) == gold).sum())
    report.eval_file, report.eval_rows = str(eval_file), len(texts)
    report.accuracy_fp32 = hits["fp32"] / len(texts)
    report.accuracy_int8 = hits["int8"] / len(texts)
