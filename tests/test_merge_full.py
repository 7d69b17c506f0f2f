"""Fully fine-tuned checkpoints as merge inputs (issue 25): ``merge BASE FT1 FT2 --method M``.

One job: a tiny fp32 Llama base saved in shards, two "fine-tunes" (the same class with every
weight perturbed, saved in shards of another size; the second leaves the final norm as the
base has it), a PEFT LoRA r4. mergekit sees the same directories and runs its own command
(all configs in one subprocess, as tests/test_merge_methods.py does; the package never
imports mergekit): deterministic methods must agree to fp32 rounding. Random methods:
mergekit's masks come from the global RNG, ours from a per-tensor generator, so the streamed
merge is checked against the pure method on the fine-tunes' deltas, and for same seed, same
bytes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, perturb_trainable, run_main, save_tiny
from safetensors.torch import save_file
from test_merge_methods import ATOL, max_diff, read_all, run_mergekit, ties_and_linear_recipes

from loretta_merge.errors import ConfigError, ShapeError
from loretta_merge.merge import merge
from loretta_merge.methods import get_method, tensor_generator

WEIGHTS = (1.0, 0.6)


@dataclass
class Job:
    root: Path
    base: Path
    fts: list[Path]  # two full fine-tunes
    lora: Path  # a PEFT LoRA r4 on q/v
    lora_full: Path  # the same LoRA merged by PEFT, for mergekit
    base16: Path  # a bf16 base and two bf16 fine-tunes: their deltas tie in magnitude often
    fts16: list[Path]


def _fine_tune(path: Path, seed: int, *, keep: tuple[str, ...] = (), std: float = 0.02,
               dtype: torch.dtype = torch.float32, **config) -> Path:
    """A tiny Llama of the base's class with every weight moved (except ``keep``), in
    shards of another size than the base's."""
    model = build_tiny("llama", dtype=dtype)
    if config:
        import transformers

        cfg = model.config.to_dict() | config
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in keep:
                p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    model.save_pretrained(path, max_shard_size="30KB")
    return path


@pytest.fixture(scope="session")
def job(tmp_path_factory) -> Job:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("full")
    base = save_tiny("llama", root / "base")
    fts = [_fine_tune(root / "ft0", 1), _fine_tune(root / "ft1", 2, keep=("model.norm.weight",))]
    pm = get_peft_model(build_tiny("llama"), LoraConfig(r=4, lora_alpha=8,
                                                        target_modules=["q_proj", "v_proj"]))
    perturb_trainable(pm, seed=5, std=0.1)
    pm.save_pretrained(root / "lora")
    pm.merge_and_unload().save_pretrained(root / "lora_full")
    base16 = save_tiny("llama", root / "base16", dtype=torch.bfloat16)
    fts16 = [_fine_tune(root / f"ft16_{i}", 10 + i, std=0.003, dtype=torch.bfloat16)
             for i in range(2)]
    return Job(root, base, fts, root / "lora", root / "lora_full", base16, fts16)


def ours(job: Job, name: str, inputs, method: str, seed=None, **params) -> Path:
    out = job.root / "ours" / name
    merge(job.base, inputs, out, progress=False, force=True, method=method,
          method_params=params, seed=seed)
    return out


# --------------------------------------------------------------------------- mergekit

def _mk(models: list, method: str, params: dict | None = None, per_model: dict | None = None,
        base: Path | None = None) -> dict:
    entries = [{"model": str(m), "parameters": {"weight": w, **{
        k: v[i] if isinstance(v, list) else v for k, v in (per_model or {}).items()}}}
               for i, (m, w) in enumerate(models)]
    cfg = {"merge_method": method, "models": entries, "dtype": "float32",
           "parameters": params or {}}
    if base is not None:
        cfg["base_model"] = str(base)
    return cfg


def _two(j: Job) -> list:
    return list(zip(j.fts, WEIGHTS))


# case -> (mergekit config, our inputs, our method, our parameters)
CASES = {
    "linear": (lambda j: _mk(_two(j), "task_arithmetic", base=j.base),
               lambda j: _two(j), "linear", {}),
    # mergekit's linear averages the models: ours with the weights divided by their sum
    "linear_vs_mergekit_linear": (
        lambda j: _mk(_two(j), "linear"),
        lambda j: [(f, w / sum(WEIGHTS)) for f, w in _two(j)], "linear", {}),
    "task_arithmetic": (lambda j: _mk(_two(j), "task_arithmetic",
                                      {"lambda": 0.6, "normalize": True}, base=j.base),
                        lambda j: _two(j), "task_arithmetic", {"lambda": 0.6, "normalize": True}),
    "ties": (lambda j: _mk(_two(j), "ties", per_model={"density": 0.5}, base=j.base),
             lambda j: _two(j), "ties", {"density": 0.5}),
    "ties_per_input_density": (
        lambda j: _mk(_two(j), "ties", per_model={"density": [0.3, 0.8]}, base=j.base),
        lambda j: _two(j), "ties", {"density": (0.3, 0.8)}),
    "ties_no_normalize_lambda_rescale": (
        lambda j: _mk(_two(j), "ties", {"normalize": False, "lambda": 1.5, "rescale": True},
                      per_model={"density": 0.3}, base=j.base),
        lambda j: _two(j), "ties", {"density": 0.3, "normalize": False, "lambda": 1.5,
                                    "rescale": True}),
    "magnitude_prune": (
        lambda j: _mk(_two(j), "breadcrumbs", per_model={"density": 0.4, "gamma": 0.0},
                      base=j.base),
        lambda j: _two(j), "magnitude_prune", {"density": 0.4}),
    "breadcrumbs": (
        lambda j: _mk(_two(j), "breadcrumbs", per_model={"density": 0.5, "gamma": 0.05},
                      base=j.base),
        lambda j: _two(j), "breadcrumbs", {"density": 0.5, "gamma": 0.05}),
    "breadcrumbs_ties": (
        lambda j: _mk(_two(j), "breadcrumbs_ties", per_model={"density": 0.5, "gamma": 0.05},
                      base=j.base),
        lambda j: _two(j), "breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}),
    # one full fine-tune and one PEFT LoRA in one merge (mergekit: the LoRA merged by PEFT)
    "mixed_ties": (
        lambda j: _mk([(j.fts[0], 1.0), (j.lora_full, 0.7)], "ties", per_model={"density": 0.5},
                      base=j.base),
        lambda j: [(j.fts[0], 1.0), (j.lora, 0.7)], "ties", {"density": 0.5}),
    "mixed_linear": (
        lambda j: _mk([(j.fts[1], 0.5), (j.lora_full, 0.7)], "task_arithmetic", base=j.base),
        lambda j: [(j.fts[1], 0.5), (j.lora, 0.7)], "linear", {}),
}


# bf16 checkpoints, computed in fp32 by both (mergekit's dtype float32; ours --dtype float32):
# many deltas are equal in magnitude at the pruning cut, where the choice is mergekit's sort's
BF16_CASES = {
    "bf16_ties": ("ties", {"density": 0.5}),
    "bf16_magnitude_prune": ("breadcrumbs", {"density": 0.3, "gamma": 0.0}),
    "bf16_breadcrumbs": ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
    "bf16_breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.02}),
}
OURS_BF16 = {"bf16_magnitude_prune": ("magnitude_prune", {"density": 0.3})}


def _bf16_config(j: Job, name: str) -> dict:
    method, per_model = BF16_CASES[name]
    return _mk(list(zip(j.fts16, WEIGHTS)), method, per_model=per_model, base=j.base16)


def recipes(job: Job) -> dict[str, str]:
    """mergekit recipes whose models are plain paths of fine-tunes, as mergekit users write."""
    b, f0, f1, lo = job.base, job.fts[0], job.fts[1], job.lora
    return {
        **ties_and_linear_recipes(b, f0, f1),
        "recipe_mixed_breadcrumbs": f"""
merge_method: breadcrumbs
base_model: {b}
parameters: {{density: 0.5, gamma: 0.02}}
models:
  - model: {f0}
    parameters: {{weight: 0.6}}
  - model: {b}+{lo}
    parameters: {{weight: 0.4}}
dtype: float32
""",
    }


@pytest.fixture(scope="session")
def mergekit_runs(job):
    """Every CASES config, the bf16 cases and the recipes through mergekit-yaml."""
    configs = {name: build(job) for name, (build, *_rest) in CASES.items()}
    configs.update({name: _bf16_config(job, name) for name in BF16_CASES})
    work = run_mergekit(job.root / "mergekit", configs, recipes(job), torch.randn(8, 8))
    return {name: work / name for name in [*configs, *recipes(job)]}


@pytest.mark.parametrize("case", list(CASES))
def test_full_checkpoints_equal_mergekit(case, job, mergekit_runs):
    _, inputs, method, params = CASES[case]
    got = read_all(ours(job, case, inputs(job), method, **params))
    want = read_all(mergekit_runs[case])
    diff = max_diff(got, want)
    print(f"{case}: max |ours - mergekit| = {diff:.3g}")
    assert diff <= ATOL, case
    base = read_all(job.base)
    changed = [k for k in got if not torch.equal(got[k], base[k])]
    assert len(changed) >= len(got) - 1, case  # a full fine-tune changes (nearly) every tensor


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bf16_fine_tunes_equal_mergekit(case, job, mergekit_runs):
    """Deltas of bf16 weights often tie in magnitude at the pruning cut (the test checks
    that they do); the entries kept among them are mergekit's, so the outputs agree."""
    method, params = OURS_BF16.get(case, BF16_CASES[case])
    out = job.root / "ours" / case
    merge(job.base16, list(zip(job.fts16, WEIGHTS)), out, progress=False, dtype="float32",
          method=method, method_params=params)
    got, want = read_all(out), read_all(mergekit_runs[case])
    diff = max_diff(got, want)
    print(f"{case}: max |ours - mergekit| = {diff:.3g}")
    assert diff <= ATOL, case
    base, ft = read_all(job.base16), read_all(job.fts16[0])
    k = "model.layers.0.mlp.down_proj.weight"
    magnitude = (ft[k].float() - base[k].float()).abs().reshape(-1)
    cut = magnitude.kthvalue(magnitude.numel() - int(0.5 * magnitude.numel()) + 1).values
    assert int((magnitude == cut).sum()) > 1  # equal magnitudes at the cut: the hard case


@pytest.mark.parametrize("name", ["recipe_ties", "recipe_linear", "recipe_mixed_breadcrumbs"])
def test_mergekit_yaml_with_model_paths_runs_unchanged(name, job, mergekit_runs, capsys):
    config = job.root / "mergekit" / f"{name}.yml"
    out = job.root / "ours" / name
    code, _, stderr = run_main(["merge", "--config", config, "-o", out, "-q"], capsys)
    assert code == 0, stderr
    diff = max_diff(read_all(out), read_all(mergekit_runs[name]))
    print(f"{name}: max |ours - mergekit| = {diff:.3g}")
    assert diff <= ATOL


# --------------------------------------------------------------------------- random methods

@pytest.mark.parametrize("method, params", [("dare_ties", {"density": 0.4}),
                                            ("della", {"density": 0.5, "epsilon": 0.1}),
                                            ("dare_linear", {"density": 0.6, "lambda": 0.8})])
def test_random_method_is_the_method_on_full_deltas(job, method, params):
    """Every tensor equals W0 + method(W_i - W0, weights, tensor_generator(seed, name))."""
    got = read_all(ours(job, f"random_{method}", _two(job), method, seed=21, **params))
    base, fulls = read_all(job.base), [read_all(f) for f in job.fts]
    m = get_method(method)
    resolved = m.resolve(params, n_inputs=2)
    for name, w0 in base.items():
        want = w0 + m.combine([f[name] - w0 for f in fulls], list(WEIGHTS), resolved,
                              tensor_generator(21, name))
        torch.testing.assert_close(got[name], want, rtol=0, atol=ATOL, msg=name)


def test_random_method_same_seed_same_bytes(job):
    a = ours(job, "seed_a", _two(job), "dare_ties", seed=3, density=0.5)
    b = job.root / "ours" / "seed_b"
    merge(job.base, _two(job), b, progress=False, method="dare_ties", seed=3,
          method_params={"density": 0.5}, max_shard_bytes="20KB")  # another shard layout
    ta, tb = read_all(a), read_all(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    c = read_all(ours(job, "seed_c", _two(job), "dare_ties", seed=4, density=0.5))
    assert all(not torch.equal(ta[k], c[k]) for k in ta if ta[k].ndim == 2)


# --------------------------------------------------------------------------- rules

def test_linear_is_base_plus_weighted_deltas_and_an_unchanged_tensor_adds_nothing(job):
    got = read_all(ours(job, "rule_linear", _two(job), "linear"))
    base, f0, f1 = read_all(job.base), read_all(job.fts[0]), read_all(job.fts[1])
    for k, w0 in base.items():
        want = w0 + WEIGHTS[0] * (f0[k] - w0) + WEIGHTS[1] * (f1[k] - w0)
        torch.testing.assert_close(got[k], want, rtol=0, atol=ATOL, msg=k)
    # ft1 leaves the final norm as the base has it: only ft0 moves it, bit for bit
    k = "model.norm.weight"
    assert torch.equal(f1[k], base[k]) and not torch.equal(f0[k], base[k])
    only = read_all(ours(job, "rule_only_ft0", [(job.fts[0], WEIGHTS[0])], "linear"))
    assert torch.equal(got[k], only[k])


@pytest.mark.parametrize("method, params", [("linear", {}), ("ties", {"density": 0.5})])
def test_a_copy_of_the_base_changes_nothing(job, method, params):
    copy = job.root / "base_copy"
    if not copy.exists():
        shutil.copytree(job.base, copy)
    got = read_all(ours(job, f"copy_{method}", [(copy, 0.8)], method, **params))
    base = read_all(job.base)
    assert all(torch.equal(got[k], base[k]) for k in base)


def test_bf16_inputs_difference_in_fp32_cast_once(tmp_path):
    """bf16 base and fine-tune: W0 + w (W_i - W0) of the upcast values, cast once to bf16
    (a bf16 subtraction would round the small difference first). The reference adds with
    ``alpha`` as the kernel does (a fused multiply-add rounds once, ``w * d`` then ``+``
    twice, which moves a bf16 rounding now and then)."""
    base = save_tiny("llama", tmp_path / "base", dtype=torch.bfloat16)
    ft = build_tiny("llama", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.003).to(p.dtype))
    ft.save_pretrained(tmp_path / "ft", max_shard_size="30KB")
    merge(base, [(tmp_path / "ft", 0.3)], tmp_path / "out", progress=False)
    got, w0s, fts = read_all(tmp_path / "out"), read_all(base), read_all(tmp_path / "ft")
    for k, w0 in w0s.items():
        assert got[k].dtype == torch.bfloat16
        want = w0.float().add(fts[k].float() - w0.float(), alpha=0.3).to(torch.bfloat16)
        assert torch.equal(got[k], want), k
    out = tmp_path / "out32"
    merge(base, [(tmp_path / "ft", 0.3)], out, progress=False, dtype="float32")
    assert all(t.dtype == torch.float32 for t in read_all(out).values())


def _gpt2_fine_tune(path: Path, *, tied: bool) -> dict:
    import transformers

    model = build_tiny("gpt2")
    if not tied:
        model.config.tie_word_embeddings = False
        model = transformers.GPT2LMHeadModel(model.config).eval()
        model.load_state_dict(build_tiny("gpt2").state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(path, max_shard_size="30KB")
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_gpt2(tiny_model_dir, tmp_path, tied):
    """GPT-2 ties lm_head to wte and stores wte only. A tied fine-tune changes wte and the
    output stays tied; an untied one (its own lm_head stored) changes lm_head against the
    base's wte, and the output is written untied."""
    import transformers

    base = tiny_model_dir("gpt2")
    ft = _gpt2_fine_tune(tmp_path / "ft", tied=tied)
    out = tmp_path / "out"
    merge(base, [(tmp_path / "ft", 0.5)], out, progress=False)
    got, w0s = read_all(out), read_all(base)
    assert ("lm_head.weight" in got) == (not tied)
    config = json.loads((out / "config.json").read_text())
    assert config.get("tie_word_embeddings", True) == tied
    wte = "transformer.wte.weight"
    torch.testing.assert_close(got[wte], w0s[wte] + 0.5 * (ft[wte] - w0s[wte]), rtol=0, atol=ATOL)
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    head = model.lm_head.weight.detach()
    want = w0s[wte] + 0.5 * ((ft[wte] if tied else ft["lm_head.weight"]) - w0s[wte])
    torch.testing.assert_close(head, want, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- refusals

def _edited(job: Job, path: Path, edit) -> Path:
    """A copy of ft0 as one model.safetensors whose tensors ``edit`` changed."""
    path.mkdir()
    tensors = read_all(job.fts[0])
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy(job.fts[0] / "config.json", path / "config.json")
    return path


REFUSALS = {
    "vocabulary": (lambda j, p: _fine_tune(p, 1, vocab_size=130),
                   ["another vocabulary", "model.embed_tokens.weight is (130, 64)",
                    "(128, 64) in the base", "lm_head.weight", "resize_token_embeddings(130)"]),
    "shape": (lambda j, p: _fine_tune(p, 1, intermediate_size=80),
              ["does not fit the base", "model.layers.0.mlp.gate_proj.weight is (80, 64)",
               "(96, 64) in the base"]),
    "missing": (lambda j, p: _edited(j, p, lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
                ["lacks 1 tensor(s)", "model.layers.1.mlp.down_proj.weight"]),
    "extra": (lambda j, p: _edited(j, p, lambda t: t.update({"score.weight": torch.zeros(2, 64)})),
              ["has 1 tensor(s) the base", "score.weight", "model.safetensors"]),
    "model_type": (lambda j, p: _fine_tune_as_mistral(p),
                   ["is a mistral model", "a llama model"]),
}


def _fine_tune_as_mistral(path: Path) -> Path:
    _fine_tune(path, 1)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "mistral"
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_one_line_nothing_written(job, tmp_path, capsys, case):
    make, messages = REFUSALS[case]
    bad = make(job, tmp_path / "bad")
    out = tmp_path / "out"
    for method in ("linear", "ties"):
        code, _, stderr = run_main(["merge", job.base, job.fts[1], bad, "-o", out,
                                    "--method", method], capsys)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert str(bad) in lines[0] and all(m in lines[0] for m in messages), stderr
        assert not out.exists()


def test_recipe_with_another_vocabulary_is_refused(job, tmp_path, capsys):
    bad = _fine_tune(tmp_path / "bad", 1, vocab_size=130)
    config = tmp_path / "recipe.yml"
    config.write_text(f"merge_method: ties\nbase_model: {job.base}\nmodels:\n  - model: {bad}\n"
                      f"    parameters: {{weight: 1.0, density: 0.5}}\n")
    code, _, stderr = run_main(["merge", "--config", config, "-o", tmp_path / "out"], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "another vocabulary" in lines[0], stderr
    assert not (tmp_path / "out").exists()


def test_api_refusals(job, tmp_path):
    with pytest.raises(ConfigError, match="--verify compares with base"):
        merge(job.base, _two(job), tmp_path / "out", progress=False, verify=True)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(job.fts[0] / "config.json", pickled / "config.json")
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors only"):
        merge(job.base, [(pickled, 1.0)], tmp_path / "out", progress=False)
    no_head = _edited(job, tmp_path / "no_head", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ShapeError, match="lacks 1 tensor.*lm_head.weight"):
        merge(job.base, [(no_head, 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_report_names_the_fine_tunes(job, capsys):
    out = job.root / "ours" / "report"
    code, stdout, stderr = run_main(["merge", job.base, f"{job.fts[0]}:0.5", job.lora, "-o", out,
                                     "--json"], capsys)
    assert code == 0, stderr
    report = json.loads(stdout)
    assert [a["source"] for a in report["adapters"]] == ["checkpoint", "peft"]
    assert report["adapters"][0]["tensors"] == len(read_all(job.fts[0]))
    prov = json.loads((out / "loretta_merge_provenance.json").read_text())
    assert prov["adapters"][0]["source"] == "checkpoint"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_variants_agree_on_full_ops(dtype):
    """The CPU kernel (row blocks, an fp32 copy of W0's block) and the device kernel (whole
    tensor, run here on the CPU) give the same bytes for FULL ops: both take every
    difference from the upcast values and add them in the same order. (A low-rank op beside
    them would not be bit-exact in fp32: the block size picks the BLAS kernel,
    tests/test_merge_gpu.py.)"""
    from loretta_merge.merge.full import FullTensor
    from loretta_merge.merge.kernel import merge_tensor_cpu, merge_tensor_device
    from loretta_merge.merge.plan import Op, OpKind

    g = torch.Generator().manual_seed(0)
    rows, cols = 37, 64
    w0 = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    fts = [(w0.float() + torch.randn(rows, cols, generator=g) * 0.003).to(dtype) for _ in range(2)]
    ops = [Op(OpKind.FULL, w, f"ft{i}:w", value=FullTensor(None, "w"), input=i)
           for i, w in enumerate((1.0, -0.4))]
    full = {id(ops[0]): fts[0], id(ops[1]): fts[1]}
    blocked, whole = torch.empty_like(w0), torch.empty_like(w0)
    merge_tensor_cpu("w", w0, ops, blocked, torch.empty(5 * cols), full)  # 5-row blocks
    merge_tensor_device("w", w0, ops, whole, torch.device("cpu"), full)
    want = w0.float().clone()  # w0 itself when fp32
    for ft, w in zip(fts, (1.0, -0.4)):
        want.add_(ft.float() - w0.float(), alpha=w)
    assert not torch.equal(blocked, w0)
    assert torch.equal(blocked, want.to(dtype)) and torch.equal(whole, want.to(dtype))


def test_quantized_base_gptq(tmp_path):
    """Into a GPTQ base (committed fixture, read dequantized) the delta is taken against the
    dequantized weights: a fine-tune of the original model at weight 1 comes out as itself
    (the quantization error is part of its delta), at 0.5 halfway from the dequantized base."""
    import transformers

    from loretta_merge.io import CheckpointReader, read_model_config
    from loretta_merge.quant import open_base

    fixtures = Path(__file__).parent / "fixtures" / "quant"
    qdir = fixtures / "gptq"
    model = transformers.LlamaForCausalLM.from_pretrained(fixtures / "base", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(tmp_path / "ft", max_shard_size="200KB")
    ft = read_all(tmp_path / "ft")
    merge(qdir, [(tmp_path / "ft", 1.0)], tmp_path / "one", progress=False, dtype="float32")
    assert max_diff(read_all(tmp_path / "one"), ft) <= ATOL
    merge(qdir, [(tmp_path / "ft", 0.5)], tmp_path / "half", progress=False, dtype="float32")
    got = read_all(tmp_path / "half")
    reader = open_base(qdir, read_model_config(qdir), CheckpointReader(qdir))
    try:
        for name, value in got.items():
            w0 = reader.get(name).float()
            torch.testing.assert_close(value, w0 + 0.5 * (ft[name] - w0), rtol=0, atol=ATOL,
                                       msg=name)
        assert reader.is_quantized("model.layers.0.self_attn.q_proj.weight")
    finally:
        reader.close()
