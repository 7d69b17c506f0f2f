"""Export a transformers model (optionally with LoRETTA adapters) to ONNX, and check the
result in ONNX Runtime against PyTorch before publishing it.

Why: a deployed graph that silently disagrees with the trained model is worse than no
export. So every export is run in ONNX Runtime on padded probe batches of two shapes and
compared with PyTorch eager at the positions the attention mask keeps (padded positions are
free to differ), the execution provider that really ran is reported, and a failing check
raises :class:`NumericsError` before anything appears at the output path.

Layout of an output directory::

    model.onnx            the graph (dynamic batch and sequence axes)
    model.onnx.data       all weights, when they exceed ``external_data_threshold_bytes``
    adapters/NAME.onnx_adapter   one per --switchable-adapter (only that adapter's tensors)
    bank.json             with --adapter-bank: the bank's layout, slots and graph inputs
    config.json, generation_config.json, tokenizer files   copied from MODEL_DIR

Inputs: ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` for models with segment
embeddings). Outputs: ``logits`` (causal-lm, seq-cls) or ``last_hidden_state``
(feature-extraction). With ``with_past`` (causal-lm only) the graph also takes
``past_key_values.{i}.key/value`` of shape (batch, kv_heads, past_len, head_dim), with
``past_len`` possibly 0 for the first step, and ``attention_mask`` covers past + new tokens;
it returns ``present.{i}.key/value`` to feed back at the next step. Position ids are derived
inside the graph from the attention mask (``cumsum - 1``), so left-padded batches work.

Modules: :mod:`.export` (options, loading, the run), :mod:`.wrappers` (what is traced),
:mod:`.graph` (the exporters), :mod:`.validate` (ONNX Runtime vs PyTorch), :mod:`.adapters`
and :mod:`.switch_layers` (switchable adapters), :mod:`.bank`, :mod:`.bank_export` and
:mod:`.bank_layers` (adapter banks: a different adapter per batch row; served by
:mod:`loretta_merge.serving`),
:mod:`.quantize` (int8), :mod:`.reports`.
"""

from .export import export_onnx, load_model, resolve_task
from .reports import (ONNX_NAME, PROBE_SHAPES, TASKS, BankReport, ExportReport, ProbeResult,
                      QuantizeReport, SwitchableReport, ValidationReport)
from .validate import validate_onnx

__all__ = ["ONNX_NAME", "PROBE_SHAPES", "TASKS", "BankReport", "ExportReport", "ProbeResult",
           "QuantizeReport", "SwitchableReport", "ValidationReport", "export_onnx", "load_model",
           "resolve_task", "validate_onnx"]
