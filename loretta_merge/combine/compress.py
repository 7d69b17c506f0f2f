"""One combined delta into adapter factors: truncated SVD to LoRA, then (``--to tt``) TT.

For ``D (out, in) = U S V^T`` the LoRA factors are ``lora_B = U_k sqrt(S_k)``,
``lora_A = sqrt(S_k) V_k^T`` with scale 1 (``lora_alpha = r``), so PEFT's delta is the
rank-``k`` truncation, the best there is (Eckart-Young). ``k`` is a fixed rank, or the
smallest with a relative Frobenius error <= eps (:func:`converters.lowrank.choose_rank`).
For ``--to tt`` the factors become LoRETTA_rep cores as ``extract --to tt`` makes them
(TT-SVD of the factors, then cores fitted to the delta; the better kept:
:func:`converters.extract.tt_module`). Every error is MEASURED against ``D``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..converters.extract import tt_module
from ..converters.lowrank import choose_rank, kept_energy
from ..formats import LoraModule, RepModule


@dataclass
class Compressed:
    """A module's written form and how close it is to the combined delta."""

    module: LoraModule | RepModule
    rank: int
    energy: float
    err_svd: float
    err_tt_svd: float | None = None
    err_tt_fit: float | None = None
    tt_method: str | None = None

    @property
    def err(self) -> float:
        """The written module's relative error."""
        errs = [e for e in (self.err_tt_svd, self.err_tt_fit) if e is not None]
        return min(errs) if errs else self.err_svd


def rel_error(d: torch.Tensor, approx: torch.Tensor) -> float:
    """``||d - approx||_F / ||d||_F`` (0 for a zero ``d``)."""
    n = float(torch.linalg.matrix_norm(d))
    return float(torch.linalg.matrix_norm(d - approx)) / n if n > 0 else 0.0


def svd_lora(d: torch.Tensor, *, rank: int | None, eps: float | None) -> tuple[LoraModule, int, float, float]:
    """``d (out, in)`` -> (LoRA factors at scale 1, k, energy kept, measured error)."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = choose_rank(s, rank=rank, eps=eps)
    root = s[:k].clamp_min(0).sqrt()
    b = (u[:, :k] * root).contiguous()                   # (out, k)
    a = (root[:, None] * vh[:k]).contiguous()            # (k, in)
    return LoraModule(a=a, b=b, scale=1.0), k, min(kept_energy(s, k), 1.0), rel_error(d, b @ a)


def compress(name: str, d: torch.Tensor, *, to: str, rank: int | None, eps: float | None,
             tensor_rank: int = 5, shapes: str = "paper", fit_steps: int = 300) -> Compressed:
    """The module written for combined delta ``d (out, in)`` (see the module docstring)."""
    lora, k, energy, err = svd_lora(d, rank=rank, eps=eps)
    if to == "lora":
        return Compressed(lora, k, energy, err)
    rep, e_svd, e_fit, how = tt_module(name, lora, d, tensor_rank=tensor_rank, shapes=shapes,
                                       fit_steps=fit_steps)
    return Compressed(rep, k, energy, err, e_svd, e_fit, how)
