"""Training past one process: the model sharded with PyTorch FSDP2 (``fully_shard``).

Why ``fully_shard`` directly and not the Trainer/accelerate FSDP integration: accelerate
turns FSDP on only for GPU launches (on CPU it silently falls back to DDP), so its path
could not be tested in CI, which has no GPU; and it wraps by a class list while LoRETTA
adds its own modules after loading. Here every decoder/encoder block
(``model._no_split_modules``) and then the root are sharded with one device mesh over all
processes; the Trainer is told the model owns its placement and gradient reduction
(transformers' ``is_distributed_loading_by_transformers`` path: no DDP wrap) and runs
unchanged otherwise: data sharding, schedule, logging, evaluation. Gradients are
reduce-scattered and averaged like DDP's all-reduce, and AdamW is element-wise, so the
sharded run follows the data-parallel one up to the order of float sums.

Every function here is a no-op pass-through for an unsharded model, so callers need not
branch. The functions that gather (:func:`full_tensors`, :func:`save_optimizer`) are
collectives: every rank calls them, in the same order.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

OPTIMIZER_FILE = "optimizer.pt"


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def shard_model(model: nn.Module, *, param_dtype: torch.dtype | None) -> nn.Module:
    """Shard ``model`` in place over every process of the launch: each block of
    ``model._no_split_modules``, then the root. ``param_dtype`` (bf16) is FSDP's mixed
    precision: shards stay in their own dtype (float32 master weights for trained tensors),
    all-gathered copies are cast for compute, gradients reduced in float32."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        model.to(torch.device("cuda", torch.cuda.current_device()))
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_tensors(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]
                 ) -> dict[str, torch.Tensor]:
    """``{name: full tensor on the CPU}`` of the parameters ``keep`` selects; gathers
    sharded ones (a collective: every rank calls it and gets the full tensors)."""
    _reshard(model)
    out = {}
    for name, p in model.named_parameters():
        if keep(name, p):
            t = p.detach()
            if _is_dtensor(t):
                t = t.full_tensor()
            out[name] = t.to("cpu").contiguous().clone()
    return out


def _reshard(model: nn.Module) -> None:
    """Put every FSDP unit back into its sharded state: after a forward without backward
    (evaluation) the root keeps its gathered compute-dtype copy registered as the
    parameters, which would otherwise be read instead of the float32 shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def load_full_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the model's parameters (each rank keeps its own shard)."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            if _is_dtensor(p):
                t = distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements)
            p.copy_(t.to(device=p.device, dtype=p.dtype))


def materialize(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the named (sharded) parameters by plain full ones, e.g. before the adapter
    is read from the model at the end of a run. The model is not trained further."""
    for name, t in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)


def _optimizer(opt):
    return getattr(opt, "optimizer", opt)  # accelerate wraps it


def save_optimizer(model: nn.Module, optimizer, output_dir: str, *, main: bool) -> None:
    """The full optimizer state (gathered: collective), written by the main process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, _optimizer(optimizer), options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    if main:
        torch.save(state, os.path.join(output_dir, OPTIMIZER_FILE))


def load_optimizer(model: nn.Module, optimizer, checkpoint: str) -> None:
    """Load the full optimizer state on rank 0 and scatter it to the shards (collective)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = (torch.load(os.path.join(checkpoint, OPTIMIZER_FILE), weights_only=True)
             if dist.get_rank() == 0 else {})
    set_optimizer_state_dict(model, _optimizer(optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True,
                                                      broadcast_from_rank0=True))


# ----------------------------------------------------------------------- memory estimate

def memory_per_process(*, params: int, trainable: int, world: int, root_params: int,
                       block_params: int, base_bytes: int = 2) -> dict[str, float]:
    """GiB each process holds for the model's weights and training state (activations
    excluded: they depend on batch and length): the frozen base (``base_bytes`` per
    element) and the trained tensors' float32 master weights, gradients and two AdamW
    moments (16 bytes each), sharded over ``world`` processes; plus what FSDP gathers
    unsharded for compute: the root unit (embeddings, final norm, head: ``root_params``)
    and two blocks (``block_params`` each: the one computing and the one prefetched).
    ``"unsharded"`` is the same without sharding (one process, or DDP)."""
    gib = 1024 ** 3
    base = params * base_bytes / gib
    state = trainable * 16 / gib
    gathered = (root_params + 2 * block_params) * base_bytes / gib if world > 1 else 0.0
    return {"sharded": round((base + state) / world + gathered, 2),
            "unsharded": round(base + state, 2), "gathered": round(gathered, 2)}
