"""The device kernel against the CPU kernel, and (with CUDA) a whole merge on both.

The device kernel's arithmetic runs on any torch device, so it is checked against the CPU
kernel here on CPU; the CUDA comparison of whole merges runs where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny, perturb_trainable
from loretta_merge.io import CheckpointReader
from loretta_merge.merge import Op, OpKind, merge
from loretta_merge.merge.kernel import check_ranges, merge_tensor_cpu, merge_tensor_device

_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    a, b = got.double(), want.double()
    big = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
    ulp = torch.exp2(torch.floor(torch.log2(big)) - _MANTISSA[got.dtype])
    worst = float(((a - b).abs() / ulp).max()) if a.numel() else 0.0
    assert worst <= 1.0, f"{what}: {worst:.2f} ulp apart"


def fp32_error_bound(w0: torch.Tensor, ops: list[Op]) -> torch.Tensor:
    """Per element, how far two fp32 evaluations of the kernel's update may differ, from
    the standard forward-error bound of a sum of k products (k*u times the sum of the
    absolute terms, u = eps/2) taken for each of the two evaluations; DoRA's per-output
    scale m/||W|| adds a relative error of about (n+4)*u for a norm over n values."""
    eps = torch.finfo(torch.float32).eps
    mag, exact = w0.double().abs(), w0.double()
    terms = 1
    for op in ops:  # the replacement first, as the kernel applies it
        if op.kind is OpKind.REPLACE:
            mag = (1 - op.weight) * mag + op.weight * op.value.double().abs()
            exact = exact.lerp(op.value.double(), op.weight)
            terms += 2
    for op in ops:
        if op.kind is OpKind.LOW_RANK:
            mag = mag + abs(op.weight) * (op.left.double().abs() @ op.right.double().abs())
            exact = exact + op.weight * (op.left.double() @ op.right.double())
            terms += op.left.shape[1]
    bound = terms * eps * mag
    for op in ops:
        if op.magnitude is not None:
            norm = torch.linalg.norm(exact, dim=op.norm_dim, keepdim=True)
            m = op.magnitude.double().unsqueeze(op.norm_dim)
            n = exact.shape[op.norm_dim]
            bound = (m / norm).abs() * bound + (n + 4) * eps * (exact * m / norm).abs()
    return bound + eps * mag  # one final rounding each


def _ops(kind: str, rows: int, cols: int, g: torch.Generator) -> list[Op]:
    left, right = torch.randn(rows, 4, generator=g), torch.randn(4, cols, generator=g)
    if kind == "lora":
        return [Op(OpKind.LOW_RANK, 0.7, "a:m", left=left, right=right)]
    if kind == "two-adapters":
        return [Op(OpKind.LOW_RANK, 0.7, "a:m", left=left, right=right),
                Op(OpKind.LOW_RANK, -0.3, "b:m", left=left.flip(0), right=right.flip(1))]
    if kind == "replace-weighted":
        return [Op(OpKind.REPLACE, 0.25, "a:t", value=torch.randn(rows, cols, generator=g))]
    if kind == "dora-rows":
        return [Op(OpKind.LOW_RANK, 1.0, "a:m", left=left, right=right,
                   magnitude=torch.rand(rows, generator=g) + 0.5, norm_dim=1)]
    return [Op(OpKind.LOW_RANK, 1.0, "a:m", left=left, right=right,  # dora-cols (Conv1D)
               magnitude=torch.rand(cols, generator=g) + 0.5, norm_dim=0)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["lora", "two-adapters", "replace-weighted", "dora-rows", "dora-cols"])
def test_device_kernel_matches_cpu_kernel(kind, dtype):
    g = torch.Generator().manual_seed(0)
    rows, cols = 37, 64
    w0 = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    ops = _ops(kind, rows, cols, g)
    blocked = torch.empty(rows, cols, dtype=dtype)
    check_cpu = merge_tensor_cpu("w", w0, ops, blocked, torch.empty(5 * cols))  # 5-row blocks
    whole = torch.empty(rows, cols, dtype=dtype)
    check_dev = merge_tensor_device("w", w0, ops, whole, torch.device("cpu"))
    assert not torch.equal(blocked.float(), w0.float())  # the ops did something
    if dtype == torch.float32:
        # no output rounding absorbs the order of the fp32 sums (block sizes pick different
        # BLAS kernels per CPU): compare against the error bound of the arithmetic itself
        diff = (whole.double() - blocked.double()).abs()
        bound = fp32_error_bound(w0, ops)
        assert bool((diff <= bound).all()), f"{kind}: {float((diff / bound).max()):.2f}x the bound"
        assert float(diff.max()) < 1e-4  # and the bound is tight enough to catch a wrong update
    else:
        assert_within_one_ulp(whole, blocked, f"{kind} {dtype}")
    for check, out in ((check_cpu, blocked), (check_dev, whole)):
        # min/max of the fp32 result before the cast; rounding is monotonic, so cast they
        # are exactly the min/max of the output
        assert check.low.to(dtype) == out.min() and check.high.to(dtype) == out.max()
    check_ranges([check_cpu, check_dev])  # finite and in range: no error


def test_device_kernel_flags_overflow_for_the_shard_check():
    from loretta_merge.errors import NumericsError

    w0 = torch.zeros(4, 4, dtype=torch.float16)
    big = [Op(OpKind.LOW_RANK, 1.0, "a:m", left=torch.full((4, 1), 1e3), right=torch.full((1, 4), 1e3))]
    fine = merge_tensor_device("ok", w0, [], torch.empty(4, 4, dtype=torch.float16), torch.device("cpu"))
    bad = merge_tensor_device("w", w0, big, torch.empty(4, 4, dtype=torch.float16), torch.device("cpu"))
    with pytest.raises(NumericsError, match=r"^w has values up to 1e\+06 .*float16's range"):
        check_ranges([fine, bad])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this torch sees none)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_merge_equals_cpu_merge_tensor_by_tensor(dtype, tiny_model_dir, tmp_path):
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from peft import LoraConfig, get_peft_model

    base = tiny_model_dir("llama", dtype)
    torch.manual_seed(0)
    rep = perturb_trainable(get_loretta_model(build_tiny("llama"), RepConfig(r=4, tensor_rank=3)), seed=1)
    save_loretta_adapter(rep, tmp_path / "rep")
    pm = get_peft_model(build_tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                        use_dora=True))
    perturb_trainable(pm, seed=2)
    pm.save_pretrained(tmp_path / "dora")
    for name in ("rep", "dora"):
        outs = {}
        for device in ("cpu", "cuda"):
            outs[device] = tmp_path / f"{name}-{device}"
            report = merge(base, [(tmp_path / name, 1.0)], outs[device], device=device, progress=False)
            assert report.device.startswith(device)
        cpu, gpu = CheckpointReader(outs["cpu"]), CheckpointReader(outs["cuda"])
        assert cpu.keys() == gpu.keys()
        for key in cpu.keys():
            assert_within_one_ulp(gpu.get(key), cpu.get(key), f"{name} {key}")


def test_random_masks_are_drawn_on_the_generators_device():
    """A GPU merge draws DARE/DELLA masks with the CPU generator and moves them over, so a
    seed keeps the same entries on every device; on the CPU it is torch.bernoulli itself (the
    draws mergekit's tests compare). The CUDA side runs in the test below, where a GPU is."""
    from loretta_merge.methods.base import tensor_generator
    from loretta_merge.methods.pruning import draw_bernoulli

    probs = torch.full((64, 32), 0.3)
    same = draw_bernoulli(probs, tensor_generator(7, "w"))
    want = torch.bernoulli(probs, generator=tensor_generator(7, "w"))
    assert torch.equal(same, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this torch sees none)")
@pytest.mark.parametrize("method,params,seed", [("task_arithmetic", {"lambda": 0.8}, None),
                                                ("dare_linear", {"density": 0.5}, 3),
                                                ("ties", {"density": 0.5}, None)])
def test_cuda_method_merge_equals_cpu_merge(method, params, seed, tiny_model_dir, tmp_path):
    """--device cuda runs the task-vector methods on the GPU: within one bf16 ulp of the CPU
    merge, except (ties) the few entries where equal magnitudes at the cut or a sign vote of
    ~0 fall the other way under another summation order: at most 1 in 10^4."""
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from peft import LoraConfig, get_peft_model

    base = tiny_model_dir("llama", torch.bfloat16)
    rep = perturb_trainable(get_loretta_model(build_tiny("llama"), RepConfig(r=4, tensor_rank=3)), seed=1)
    save_loretta_adapter(rep, tmp_path / "rep")
    pm = perturb_trainable(get_peft_model(build_tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "down_proj"])), seed=2)
    pm.save_pretrained(tmp_path / "lora")
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / f"out-{device}"
        merge(base, [(tmp_path / "rep", 1.0), (tmp_path / "lora", 0.7)], outs[device], device=device,
              progress=False, method=method, method_params=params, seed=seed)
    cpu, gpu = CheckpointReader(outs["cpu"]), CheckpointReader(outs["cuda"])
    assert cpu.keys() == gpu.keys()
    for key in cpu.keys():
        a, b = gpu.get(key).double(), cpu.get(key).double()
        ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp_min(1e-30))) - 7)
        off = int(((a - b).abs() > ulp).sum())
        allowed = max(1, a.numel() // 10**4) if method == "ties" else 0
        assert off <= allowed, f"{method} {key}: {off} entries more than 1 ulp apart"
