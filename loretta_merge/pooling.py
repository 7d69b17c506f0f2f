"""Sequence-classification pooling as the base was trained: sentence-transformers bases.

A sentence-transformers model (``1_Pooling/config.json``) was trained with mean pooling over
the kept tokens; its BERT pooler (first token, dense, tanh) was never trained. A classifier
built on it should pool the same way:

- :class:`MeanPooler` replaces the encoder's ``pooler`` (no parameters);
- :func:`apply_pooling` installs it, with a forward pre-hook on the encoder that hands the
  attention mask to the pooler, and records ``config.loretta_pooling = "mean"`` so a saved
  or merged checkpoint says how to pool. Anything that loads such a checkpoint with
  ``from_pretrained`` (merge's verify, the ONNX export) calls ``apply_pooling(model)``.
- :func:`resolve_pooling` turns a config's ``pooling`` ("auto" / "mean" / None) into what
  to install.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError


class MeanPooler(nn.Module):
    """Masked mean of the last hidden states, in place of an encoder's first-token pooler
    (sentence-transformers' mean pooling: ``sum(h * m) / max(sum(m), 1e-9)``).

    The encoder's pooler only receives the hidden states; :func:`apply_pooling`
    registers a forward pre-hook on the encoder that hands the attention mask over in
    :attr:`mask` for the one call that follows. No parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, H)
        mask, self.mask = self.mask, None
        if mask is None:
            return hidden_states.mean(dim=1)
        m = mask.to(hidden_states.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


POOLING_CONFIG_KEY = "loretta_pooling"  # config.json key of a task model that mean-pools


def sentence_transformers_pooling(model_dir: str | Path | None) -> str | None:
    """The pooling a sentence-transformers model directory declares in
    ``1_Pooling/config.json`` ("mean", "cls", "max", ...), or None without one."""
    if not model_dir:
        return None
    path = Path(model_dir) / "1_Pooling" / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    for mode in ("mean", "cls", "max", "lasttoken", "weightedmean"):
        for key in (f"pooling_mode_{mode}_tokens", f"pooling_mode_{mode}_token", f"pooling_mode_{mode}"):
            if data.get(key) is True:
                return "mean" if mode == "mean" else mode
    return None


def _pooler_owner(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The encoder module that holds a first-token ``pooler`` (BERT family), or None."""
    for name, module in model.named_modules():
        pooler = getattr(module, "pooler", None)
        if isinstance(pooler, (nn.Module)) and (isinstance(pooler, MeanPooler)
                                                or type(pooler).__name__.endswith("Pooler")):
            return name, module
    return None


def _capture_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    module.pooler.mask = mask


def apply_pooling(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Make a sequence classifier pool as its base was trained (in place; idempotent).

    ``mode`` "mean" replaces the encoder's first-token pooler by :class:`layers.MeanPooler`
    and records ``config.loretta_pooling = "mean"`` (so a saved or merged checkpoint says
    so); None reads that key from ``model.config`` (a merged checkpoint) and does nothing
    without it. Loaders of such checkpoints (merge's verify, the ONNX export) call this
    after ``from_pretrained``: transformers alone would pool the first token.
    """
    mode = mode or getattr(getattr(model, "config", None), POOLING_CONFIG_KEY, None)
    if mode is None:
        return model
    if mode != "mean":
        raise ConfigError(f"pooling must be 'mean' or None, got {mode!r}; set pooling to 'mean' or leave it unset")
    found = _pooler_owner(model)
    if found is None:
        raise ConfigError(f"pooling 'mean' needs an encoder with a first-token pooler (BERT family); "
                          f"{type(model).__name__} has none: train it with pooling=None")
    _, owner = found
    if not isinstance(owner.pooler, MeanPooler):
        owner.pooler = MeanPooler()
        owner.register_forward_pre_hook(_capture_mask, with_kwargs=True)
    if getattr(model, "config", None) is not None:
        setattr(model.config, POOLING_CONFIG_KEY, "mean")
    return model


def resolve_pooling(model: nn.Module, pooling: str | None, task: str) -> str | None:
    """The pooling a config asks for on ``model``: None, "mean", or for "auto" "mean" when
    the directory ``model`` was loaded from is a sentence-transformers model that mean-pools
    (and the encoder has a pooler to replace), else None."""
    if pooling is None or task != "SEQ_CLS":
        return None
    if pooling == "mean":
        return "mean"
    base_dir = getattr(getattr(model, "config", None), "_name_or_path", None)
    if sentence_transformers_pooling(base_dir) == "mean" and _pooler_owner(model) is not None:
        return "mean"
    return None
