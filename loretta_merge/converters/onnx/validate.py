"""Checking an exported graph in ONNX Runtime against the PyTorch model.

Every export is run on padded probe batches of two shapes and compared with PyTorch eager at
the positions the attention mask keeps (padded positions are free to differ). The execution
provider that really ran (``session.get_providers()``) is reported, with a flag when CUDA was
asked for and ONNX Runtime fell back to the CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ...errors import ConfigError, NumericsError
from .reports import (GENERATION_STEPS, PROBE_SHAPES, PROVIDERS, TOLERANCES, ProbeResult,
                      ValidationReport)
from .wrappers import PlainWrapper, cache_kwargs, cache_of, decoder_dims, past_names


def probe_batch(config, names: list[str], batch: int, seq: int, *, seed: int) -> dict:
    """Random token ids with the first row right-padded (its last ``seq // 3`` tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - max(1, seq // 3):] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        types = torch.zeros(batch, seq, dtype=torch.long)
        types[:, seq // 2:] = 1
        out["token_type_ids"] = types
    return out


def requested_providers(provider: str = "auto") -> list[str]:
    """The provider list to ask ONNX Runtime for: ``cpu``, ``cuda`` (CUDA first, CPU as the
    fallback ORT itself uses) or ``auto`` (CUDA when this onnxruntime build offers it)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider"
    if provider == "cuda" or (provider == "auto" and cuda in available):
        return [cuda, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: Path, provider: str = "auto"):
    """An InferenceSession on ``path``; a graph ORT cannot load is a NumericsError."""
    import onnxruntime as ort

    providers = requested_providers(provider)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if providers[0] != "CPUExecutionProvider":
        ort.set_default_logger_severity(3)  # a missing CUDA is reported, not logged
    try:
        with warnings.catch_warnings():  # a missing CUDA is reported (fallback), not warned
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - e.g. an op without a kernel for this dtype
        hint = ("float16 graphs need the CUDA provider (pip install 'loretta-merge[gpu]' on a "
                "GPU machine, --provider cuda), or export in float32 (--dtype float32), or skip "
                "the check with --no-validate")
        raise NumericsError(f"ONNX Runtime cannot load the exported {path.name} on "
                            f"{'/'.join(providers)} ({str(exc).splitlines()[0][:200]}); nothing "
                            f"was written. {hint}") from exc
    session.requested_providers = providers  # type: ignore[attr-defined]
    return session


def compare(onnx_out: np.ndarray, ref: np.ndarray, keep: np.ndarray | None, atol: float,
            rtol: float) -> tuple[float, float, bool]:
    """(max abs diff, max abs diff / max |ref|, within atol + rtol*|ref|) over kept entries."""
    o, r = onnx_out.astype(np.float64), ref.astype(np.float64)
    if keep is not None:  # (B, S) mask over (B, S, ...) outputs
        o, r = o[keep], r[keep]
    if not np.isfinite(o).all():
        return float("inf"), float("inf"), False
    diff = np.abs(o - r)
    max_abs = float(diff.max(initial=0.0))
    max_rel = max_abs / max(float(np.abs(r).max(initial=0.0)), 1e-12)
    return max_abs, max_rel, bool((diff <= atol + rtol * np.abs(r)).all())


def tolerances(dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    from ...io import dtype_name

    base_atol, base_rtol = TOLERANCES.get(dtype_name(dtype), TOLERANCES["float32"])
    return (base_atol if atol is None else float(atol)), (base_rtol if rtol is None else float(rtol))


def _np_dtype(model):
    import torch

    return np.float16 if next(model.parameters()).dtype == torch.float16 else np.float32


def slot_feed(slot: int | None, batch: int) -> dict:
    """The ``adapter_slot`` input of a bank graph: every row in ``slot`` (None: no bank)."""
    return {} if slot is None else {"adapter_slot": np.full(batch, slot, dtype=np.int64)}


def _probe(session, model, plain, names, shape, seed, with_past, run_options, slot=None):
    """(onnx output, torch output, kept-positions mask) of one probe batch."""
    import torch

    b, s = shape
    feed = probe_batch(model.config, names, b, s, seed=seed)
    with torch.no_grad():
        ref = plain(*(feed[n] for n in names)).float().numpy()
    ort_feed = {n: feed[n].numpy() for n in names} | slot_feed(slot, b)
    if with_past:
        layers, kv, hd = decoder_dims(model.config)
        for n in past_names(layers):
            ort_feed[n] = np.zeros((b, kv, 0, hd), dtype=_np_dtype(model))
    got = np.asarray(session.run(None, ort_feed, run_options)[0], dtype=np.float32)
    if got.shape != ref.shape:
        raise NumericsError(f"ONNX output shape {got.shape} != PyTorch {ref.shape} for probe "
                            f"batch={b} seq={s}; the export is broken: report the architecture")
    return got, ref, feed["attention_mask"].numpy().astype(bool)


def validate_onnx(onnx_path, model, *, task: str, with_past: bool = False,
                  input_names: list[str] | None = None, atol: float | None = None,
                  rtol: float | None = None, session=None, run_options=None,
                  provider: str = "auto", slot: int | None = None) -> ValidationReport:
    """Run ``onnx_path`` in ONNX Runtime on padded probes of two shapes and compare with
    ``model`` in PyTorch at kept positions; with ``with_past`` also compare greedy tokens.
    ``session``/``run_options`` reuse an open session (e.g. with an adapter active);
    ``slot``: a bank graph's slot for every row (-1: the base)."""
    atol, rtol = tolerances(next(model.parameters()).dtype, atol, rtol)
    names = input_names or ["input_ids", "attention_mask"]
    session = session or open_session(Path(onnx_path), provider)
    plain = PlainWrapper(model, task).eval()
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 512
    probes = []
    for i, (b, s) in enumerate(PROBE_SHAPES):
        s = min(s, max_pos)
        got, ref, keep = _probe(session, model, plain, names, (b, s), 100 + i, with_past,
                                run_options, slot)
        max_abs, max_rel, ok = compare(got, ref, None if task == "seq-cls" else keep, atol, rtol)
        probes.append(ProbeResult(b, s, max_abs, max_rel, ok))
    ran = session.get_providers()
    asked = getattr(session, "requested_providers", ran)
    report = ValidationReport(providers=ran, atol=atol, rtol=rtol,
                              max_abs_diff=max(p.max_abs_diff for p in probes),
                              max_rel_diff=max(p.max_rel_diff for p in probes), probes=probes,
                              passed=all(p.passed for p in probes), requested_providers=asked,
                              fallback=asked[0] != ran[0])
    if with_past:
        _add_generation_check(report, session, model, run_options, slot)
    return report


def _add_generation_check(report: ValidationReport, session, model, run_options, slot) -> None:
    got_tokens, ref_tokens, got, ref = greedy_check(session, model, run_options=run_options,
                                                    slot=slot)
    report.generation_tokens_onnx, report.generation_tokens_torch = got_tokens, ref_tokens
    report.generation_match = got_tokens == ref_tokens
    # the logits of every cached step must agree too, not only their argmax
    max_abs, max_rel, ok = compare(got, ref, None, report.atol, report.rtol)
    report.generation_max_abs_diff = max_abs
    report.max_abs_diff = max(report.max_abs_diff, max_abs)
    report.max_rel_diff = max(report.max_rel_diff, max_rel)
    report.passed = report.passed and ok and report.generation_match


def _onnx_greedy(session, prompt, mask, layers, kv, hd, np_dtype, steps, run_options, slot=None):
    past = {n: np.zeros((2, kv, 0, hd), dtype=np_dtype) for n in past_names(layers)}
    past |= slot_feed(slot, 2)
    ids, am, tokens, logits = prompt.numpy(), mask.numpy(), [], []
    for _ in range(steps):
        outs = session.run(None, {"input_ids": ids, "attention_mask": am, **past}, run_options)
        logits.append(np.asarray(outs[0])[:, -1].astype(np.float32))
        nxt = logits[-1].argmax(-1)
        tokens.append(nxt.tolist())
        past = dict(zip(past_names(layers), outs[1:])) | slot_feed(slot, 2)
        ids = nxt[:, None].astype(np.int64)
        am = np.concatenate([am, np.ones((2, 1), dtype=am.dtype)], axis=1)
    return tokens, logits


def _torch_greedy(model, prompt, mask, steps):
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids, am, tokens, logits = prompt, mask, [], []
    with torch.no_grad():
        for _ in range(steps):
            pos = (am.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True,
                        return_dict=True, **cache_kwargs(model, cache))
            logits.append(out.logits[:, -1].float().numpy())
            nxt = out.logits[:, -1].float().argmax(-1)
            tokens.append(nxt.tolist())
            cache = cache_of(out)
            ids = nxt[:, None]
            am = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], dim=1)
    return tokens, logits


def greedy_check(session, model, *, steps: int = GENERATION_STEPS, run_options=None,
                 slot: int | None = None):
    """Greedy tokens for a left-padded batch of two prompts, step by step through the KV
    cache: ONNX Runtime (the exported graph) vs PyTorch (the model with a DynamicCache).
    Returns (onnx tokens, torch tokens, per-step last-position logits of each)."""
    layers, kv, hd = decoder_dims(model.config)
    prompt = probe_batch(model.config, ["input_ids"], 2, 6, seed=7)["input_ids"]
    mask = prompt.new_ones(prompt.shape)
    mask[0, :2] = 0  # left padding on the first prompt
    onnx_tokens, onnx_logits = _onnx_greedy(session, prompt, mask, layers, kv, hd,
                                            _np_dtype(model), steps, run_options, slot)
    torch_tokens, torch_logits = _torch_greedy(model, prompt, mask, steps)
    transpose = lambda steps_: [list(t) for t in zip(*steps_)]  # noqa: E731 - per prompt
    return (transpose(onnx_tokens), transpose(torch_tokens), np.stack(onnx_logits),
            np.stack(torch_logits))


def failure_message(v: ValidationReport, model_dir: Path) -> str:
    worst = max(v.probes, key=lambda p: p.max_abs_diff)
    what = f" with switchable adapter {v.adapter!r} active" if v.adapter else ""
    msg = (f"ONNX export of {model_dir}{what} failed validation on {v.providers[0]}: max |onnx - "
           f"torch| = {v.max_abs_diff:.3g} (relative {v.max_rel_diff:.3g}) at probe "
           f"batch={worst.batch} seq={worst.sequence}, tolerance atol={v.atol:g} + "
           f"rtol={v.rtol:g}*|torch|")
    if v.generation_match is False:
        msg += (f"; greedy tokens through the KV cache differ: onnx {v.generation_tokens_onnx} "
                f"vs torch {v.generation_tokens_torch}")
    return msg + ("; no output was written. If the difference is expected for this dtype, "
                  "raise --atol; otherwise report the model architecture")
