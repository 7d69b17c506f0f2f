"""int8 export: ONNX Runtime's dynamic quantization of the validated fp32 graph.

The weights of the MatMuls (and the embedding tables) become int8 with per-channel scales
(activations are quantized at run time, per batch); ``RECIPE`` says what and why.
The int8 graph replaces the fp32 one in the output only if it agrees with it on real text:
the ``--eval-file`` rows when given, else :func:`loretta_merge.embedded.calibration_sentences`
(a fixed sample of Rotten Tomatoes TRAIN rows, or the package's own sentences). seq-cls passes
when both graphs give the same class on at least ``INT8_MIN_AGREEMENT`` of the rows (accuracy
of both reported when the rows have labels); causal-lm and feature-extraction when
||int8 - fp32|| / ||fp32|| over the kept positions is at most ``INT8_MAX_REL_ERROR``
(next-token agreement reported). Without a tokenizer the random-token probes decide by the
relative error; their figures are always reported, as information.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from ...deps import require
from ...errors import ConfigError, FormatError, NumericsError
from .reports import (INT8_MAX_REL_ERROR, INT8_MIN_AGREEMENT, INT8_TEXT_ROWS, PROBE_SHAPES,
                      QuantizeReport)
from .validate import compare, open_session, probe_batch


def _graph_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


# Chosen by benchmarks/bench_int8.py on the quickstart's fine-tuned MiniLM classifier: per-tensor
# scales, reduce_range, static QDQ and keeping the embeddings, the FFN-down MatMuls or the
# first/last layer in fp32 gave no better class agreement with fp32 on real sentences (see
# docs/onnx.md's int8 section); ORT never quantizes a MatMul of two activations (attention).
RECIPE = ("dynamic int8 (ONNX Runtime quantize_dynamic): weights of every MatMul with a "
          "constant input and the embedding Gathers int8, per-channel scales; activations "
          "quantized per batch at run time")


def run_quantizer(src: Path, dst: Path, *, external: bool = False, per_channel: bool = True,
                  reduce_range: bool = False, nodes_to_exclude=(), op_types=None) -> None:
    """ORT dynamic quantization of ``src`` into ``dst`` (int8 weights); the export uses the
    defaults, ``benchmarks/bench_int8.py`` the other settings to compare them."""
    quantization = require("onnxruntime.quantization", extra="onnx", purpose="--quantize int8")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice on the root logger
    try:
        quantization.quantize_dynamic(str(src), str(dst), weight_type=quantization.QuantType.QInt8,
                                      per_channel=per_channel, reduce_range=reduce_range,
                                      use_external_data_format=external,
                                      nodes_to_exclude=list(nodes_to_exclude),
                                      op_types_to_quantize=op_types)
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


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            return None
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _text_feeds(tokenizer, texts: list[str], names: list[str], batch: int = 32):
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start:start + batch], padding=True, truncation=True,
                        max_length=128, return_tensors="np")
        feed = {n: enc[n].astype(np.int64) for n in names if n in enc}
        if "token_type_ids" in names and "token_type_ids" not in feed:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        if set(feed) != set(names):
            return
        yield feed


def _text_agreement(fp32, int8, tokenizer, texts, names, task):
    """(rows, agreement, relative error, predicted classes fp32, int8) on the texts; seq-cls:
    same class; otherwise same argmax at every kept position (causal-lm: the next token).

    A decoder's logits are (batch, positions, vocabulary): the padded positions are dropped
    before anything else, the sums of squares are float32 BLAS dot products of the sessions'
    own outputs (no float64 copies), and a decoder's batches are smaller: a 150k vocabulary
    costs a few hundred MB here, not gigabytes."""
    same = total = 0
    err_sq = ref_sq = 0.0
    pred_fp32, pred_int8 = [], []
    for feed in _text_feeds(tokenizer, texts, names, batch=32 if task == "seq-cls" else 8):
        ref, got = fp32.run(None, feed)[0], int8.run(None, feed)[0]
        if task != "seq-cls":
            keep = feed["attention_mask"].astype(bool)
            ref, got = ref[keep], got[keep]
        else:
            pred_fp32.extend(ref.argmax(-1).tolist())
            pred_int8.extend(got.argmax(-1).tolist())
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += ref.shape[0]
        ref, diff = ref.reshape(-1), (got - ref).reshape(-1)
        err_sq += float(np.dot(diff, diff))
        ref_sq += float(np.dot(ref, ref))
    if total == 0:
        return None
    rel = (err_sq / max(ref_sq, 1e-30)) ** 0.5 if np.isfinite(err_sq) else float("inf")
    return total, same / total, rel, pred_fp32, pred_int8


def _judge_text(report, fp32, int8, model, names, task, model_dir: Path, eval_file) -> None:
    """Fill the text figures of ``report`` and decide ``report.passed``."""
    from ...embedded import calibration_sentences

    tokenizer = _tokenizer(model_dir)
    if tokenizer is None:
        if eval_file is not None:
            raise FormatError(f"--eval-file needs the tokenizer of {model_dir}, which cannot be "
                              f"loaded; copy the tokenizer files into {model_dir}")
        report.judged_on = f"random-token probes (no tokenizer in {model_dir})"
        report.passed = report.rel_error <= report.rel_error_allowed
        return
    if eval_file is not None:
        texts, labels = _eval_rows(Path(eval_file), model.config)
        source = f"{len(texts)} rows of {eval_file}"
    else:
        texts, labels, source = calibration_sentences(INT8_TEXT_ROWS)
    result = _text_agreement(fp32, int8, tokenizer, texts, names, task)
    if result is None:
        report.judged_on = "random-token probes (the tokenizer gives none of the graph inputs)"
        report.passed = report.rel_error <= report.rel_error_allowed
        return
    rows, agree, rel, pred_fp32, pred_int8 = result
    report.judged_on, report.text_rows = source, len(texts)
    report.text_agreement, report.text_rel_error = agree, rel
    if task == "seq-cls":
        report.passed = agree >= report.min_agreement
        n_labels = int(getattr(model.config, "num_labels", 0) or 0)
        if labels is not None and all(0 <= y < max(n_labels, 1) for y in labels):
            gold = np.asarray(labels)
            report.accuracy_fp32 = float(np.mean(np.asarray(pred_fp32) == gold))
            report.accuracy_int8 = float(np.mean(np.asarray(pred_int8) == gold))
            if eval_file is not None:
                report.eval_file, report.eval_rows = str(eval_file), len(texts)
    else:
        report.passed = rel <= report.rel_error_allowed


def _refusal(report) -> tuple[str, str]:
    """(what disagreed, the option that would accept it)."""
    if report.min_agreement is not None and report.text_agreement is not None:
        what = (f"it gives the fp32 class on {report.text_agreement:.1%} of {report.judged_on} "
                f"(needed {report.min_agreement:.0%})")
    elif report.text_rel_error is not None:
        what = (f"||int8 - fp32|| / ||fp32|| = {report.text_rel_error:.3g} on {report.judged_on} "
                f"(allowed {report.rel_error_allowed})")
    else:
        what = (f"||int8 - fp32|| / ||fp32|| = {report.rel_error:.3g} on the random-token probes "
                f"(allowed {report.rel_error_allowed})")
    flag = ("--int8-min-agreement" if report.min_agreement is not None
            and report.text_agreement is not None else "--int8-max-error")
    return what, flag


def quantize_int8(onnx_path: Path, model, *, task: str, names: list[str], model_dir: Path,
                  eval_file=None, external: bool = False, provider: str = "cpu",
                  max_rel_error: float = INT8_MAX_REL_ERROR,
                  min_agreement: float = INT8_MIN_AGREEMENT) -> QuantizeReport:
    """Replace ``onnx_path`` (fp32, validated) by its int8 form, checked against it."""
    fp32_dir = onnx_path.parent / ".fp32"
    fp32_dir.mkdir()
    fp32_path = fp32_dir / onnx_path.name
    for p in list(onnx_path.parent.glob(onnx_path.name + "*")):
        shutil.move(str(p), fp32_dir / p.name)
    try:
        run_quantizer(fp32_path, onnx_path, external=external)
        fp32, int8 = open_session(fp32_path, provider), open_session(onnx_path, provider)
        max_abs, max_rel, rel_error, cosine, agree = _agreement(fp32, int8, model.config, names,
                                                                task)
        report = QuantizeReport(method="int8-dynamic", fp32_bytes=_graph_bytes(fp32_path),
                                int8_bytes=_graph_bytes(onnx_path), max_abs_diff=max_abs,
                                max_rel_diff=max_rel, rel_error=rel_error,
                                rel_error_allowed=max_rel_error, min_cosine=cosine,
                                argmax_agreement=agree, passed=False, recipe=RECIPE,
                                min_agreement=min_agreement if task == "seq-cls" else None)
        _judge_text(report, fp32, int8, model, names, task, model_dir, eval_file)
        del fp32, int8
    except BaseException:
        for p in list(onnx_path.parent.glob(onnx_path.name + "*")):
            p.unlink()
        raise
    finally:
        shutil.rmtree(fp32_dir, ignore_errors=True)
    if not report.passed:
        what, flag = _refusal(report)
        raise NumericsError(f"the int8 graph of {model_dir} disagrees with the fp32 graph: {what}; "
                            f"nothing was written. Export without --quantize, or accept less "
                            f"with {flag}")
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
