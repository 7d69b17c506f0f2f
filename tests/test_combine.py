"""``combine``: several adapters into one new adapter, against PEFT 0.21's
``add_weighted_adapter`` and against this tool's own merge.

One job: a tiny fp32 Llama base and three adapters of different kinds and ranks (PEFT LoRA
r4 on q/v, PEFT LoRA r8 with rsLoRA on q/v/down, LoRETTA rep r4 on q/v). PEFT's five
``*_svd`` combination types are compared as reconstructed deltas per module (PEFT's
``get_delta_weight`` of the new adapter against ours, as the weight is stored). PEFT draws
DARE's masks from the global torch RNG; the comparison reseeds it, before each module, with
the seed our per-module generator uses (``tensor_generator(seed, name).initial_seed()``), so
the masks are the same draws and the deltas agree to fp32 rounding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY,
    build_tiny,
    perturb_trainable,
    probe_inputs,
    run_main,
    save_tiny,
)

from loretta_merge.combine import combine, combine_adapters
from loretta_merge.errors import ConfigError
from loretta_merge.formats import read_adapter
from loretta_merge.merge import merge
from loretta_merge.methods import get_method, method_names, tensor_generator

WEIGHTS = (0.7, 0.4)
PEFT_RTOL = 1e-6  # relative Frobenius difference of two fp32 rank-R deltas: observed <= 2.3e-7
PEFT_TYPES = {  # PEFT combination type -> our parameters (the same names as PEFT's)
    "svd": {},
    "ties_svd": {"density": 0.5},
    "dare_linear_svd": {"density": 0.5},
    "dare_ties_svd": {"density": 0.6, "majority_sign": "frequency"},
    "magnitude_prune_svd": {"density": 0.3},
}
SEED, RANK = 5, 6


@dataclass
class Job:
    root: Path
    base: Path
    loras: list[Path]       # PEFT LoRAs (r4 on q/v; r8 rsLoRA on q/v/down)
    rep: Path               # LoRETTA rep, no full tensors
    rep_norms: Path         # LoRETTA rep with trained norms (full tensors)


@pytest.fixture(scope="session")
def job(tmp_path_factory) -> Job:
    from peft import LoraConfig, get_peft_model

    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import RepConfig

    root = tmp_path_factory.mktemp("combine")
    base = save_tiny("llama", root / "base")
    loras = []
    for i, (r, targets, rslora) in enumerate([(4, ["q_proj", "v_proj"], False),
                                              (8, ["q_proj", "v_proj", "down_proj"], True)]):
        pm = get_peft_model(build_tiny("llama"), LoraConfig(r=r, lora_alpha=2 * r, use_rslora=rslora,
                                                            target_modules=targets))
        perturb_trainable(pm, seed=i + 1, std=0.1)
        pm.save_pretrained(root / f"lora{i}")
        loras.append(root / f"lora{i}")
    reps = []
    for norms in (False, True):
        torch.manual_seed(3)
        rep = get_loretta_model(build_tiny("llama"), RepConfig(r=4, lora_alpha=8, tensor_rank=3,
                                                               train_norms=norms))
        path = root / f"rep{'_norms' if norms else ''}"
        save_loretta_adapter(perturb_trainable(rep, seed=3, std=0.1).eval(), path)
        reps.append(path)
    return Job(root, base, loras, *reps)


def stored_deltas(adapter) -> dict[str, torch.Tensor]:
    """Each module's delta of an in-memory LoRA or rep adapter, (out, in), fp32."""
    return {n: m.delta(torch.float32).T for n, m in adapter.modules.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- PEFT

@pytest.fixture(scope="module")  # a patch of PEFT: never beyond this file
def peft_reseeded():
    """PEFT's per-module combination, with the global RNG reseeded first, for each module,
    with the seed our generator of that module uses (the only intervention). Returns
    ``register(peft_model)``: the models whose module names the reseeding knows."""
    import peft.tuners.lora.model as lora_model

    names: dict[int, str] = {}
    original = lora_model.LoraModel._svd_generalized_task_arithmetic_weighted_adapter

    def reseeded(self, combination_type, adapters, weights, new_rank, target, *args, **kwargs):
        torch.manual_seed(tensor_generator(SEED, names[id(target)] + ".weight").initial_seed())
        return original(self, combination_type, adapters, weights, new_rank, target, *args, **kwargs)

    def register(pm):
        names.update({id(m): n for n, m in pm.base_model.model.named_modules()})
        return pm

    mp = pytest.MonkeyPatch()
    mp.setattr(lora_model.LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter", reseeded)
    yield register
    mp.undo()


@pytest.fixture(scope="module")
def peft_combined(job, peft_reseeded):
    """PEFT's own combination of the two LoRAs, every type, rank RANK, weights WEIGHTS:
    {type: {module: delta as stored}}."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(build_tiny("llama"), job.loras[0], adapter_name="a0")
    pm.load_adapter(job.loras[1], adapter_name="a1")
    peft_reseeded(pm)
    out = {}
    for ctype, params in PEFT_TYPES.items():
        kw = {"density": params["density"]} if "density" in params else {}
        if "majority_sign" in params:
            kw["majority_sign_method"] = params["majority_sign"]
        pm.add_weighted_adapter(["a0", "a1"], list(WEIGHTS), ctype, combination_type=ctype,
                                svd_rank=RANK, **kw)
        out[ctype] = {n: m.get_delta_weight(ctype).detach().clone()
                      for n, m in pm.base_model.model.named_modules()
                      if hasattr(m, "lora_A") and ctype in m.lora_A}
    return out


@pytest.mark.parametrize("ctype", list(PEFT_TYPES))
def test_combined_lora_equals_peft_add_weighted_adapter(job, peft_combined, ctype):
    adapter, report = combine(list(zip(job.loras, WEIGHTS)), method=ctype,
                              params=PEFT_TYPES[ctype], seed=SEED if "dare" in ctype else None,
                              rank=RANK)
    want = peft_combined[ctype]
    got = stored_deltas(adapter)
    assert set(got) == set(want) and len(got) == 6          # down_proj: in one input only
    worst = max(rel(got[n], want[n]) for n in want)
    assert worst < PEFT_RTOL, (ctype, worst)
    assert all(r.rank == RANK for r in report.modules)


def test_conv1d_combination_equals_peft(tmp_path, peft_reseeded):
    """GPT-2's Conv1D stores (in, out): the deltas (and DARE's masks) are formed as stored,
    the SVD of (out, in) as PEFT takes it; c_fc is in one input only."""
    from peft import LoraConfig, PeftModel, get_peft_model

    paths = []
    for i, (r, targets) in enumerate([(4, ["c_attn"]), (6, ["c_attn", "c_fc"])]):
        pm = get_peft_model(build_tiny("gpt2"), LoraConfig(r=r, lora_alpha=r, fan_in_fan_out=True,
                                                           target_modules=targets))
        perturb_trainable(pm, seed=i + 7, std=0.1)
        pm.save_pretrained(tmp_path / f"g{i}")
        paths.append(tmp_path / f"g{i}")
    pm = PeftModel.from_pretrained(build_tiny("gpt2"), paths[0], adapter_name="a0")
    pm.load_adapter(paths[1], adapter_name="a1")
    peft_reseeded(pm)
    for ctype in ("ties_svd", "dare_ties_svd"):
        pm.add_weighted_adapter(["a0", "a1"], list(WEIGHTS), ctype, combination_type=ctype,
                                svd_rank=5, density=0.5)
        adapter, _ = combine(list(zip(paths, WEIGHTS)), method=ctype, params={"density": 0.5},
                             seed=SEED if "dare" in ctype else None, rank=5)
        assert adapter.fan_in_fan_out == set(adapter.modules) and len(adapter.modules) == 4
        for n, m in pm.base_model.model.named_modules():
            if hasattr(m, "lora_A") and ctype in m.lora_A:
                got = adapter.modules[n].delta(torch.float32)           # (in, out), as stored
                assert rel(got, m.get_delta_weight(ctype)) < PEFT_RTOL, (ctype, n)


def test_mergekit_definitions_equal_peft_where_they_coincide(job, peft_combined):
    """Our mergekit-definition methods give PEFT's result where the two definitions agree:
    linear == svd and magnitude_prune == magnitude_prune_svd for any weights; DARE with
    --no-rescale and lambda = 1/density is PEFT's divide-by-density rescale, on the modules
    both inputs touch (mergekit's definition draws a mask for an input's zero delta too, as
    mergekit does for a model that leaves a tensor unchanged; PEFT skips that input, so the
    draws of down_proj, in one input only, come from another point of the stream)."""
    inputs = list(zip(job.loras, WEIGHTS))
    cases = [("linear", {}, None, "svd"),
             ("magnitude_prune", {"density": 0.3}, None, "magnitude_prune_svd"),
             ("dare_linear", {"density": 0.5, "rescale": False, "lambda": 2.0}, SEED,
              "dare_linear_svd")]
    for method, params, seed, ctype in cases:
        adapter, _ = combine(inputs, method=method, params=params, seed=seed, rank=RANK)
        got, want = stored_deltas(adapter), peft_combined[ctype]
        both = [n for n in want if not (seed is not None and "down_proj" in n)]
        worst = max(rel(got[n], want[n]) for n in both)
        assert len(both) >= 4 and worst < PEFT_RTOL, (method, worst)


def test_ties_definitions_differ_unless_weights_are_one(job):
    """mergekit's ties (ours) elects signs from WEIGHTED deltas and divides by the agreeing
    weights; PEFT's ties_svd elects from unweighted ones and divides by their count. With
    weights 1 both are the same; with 0.7/0.4 they are not."""
    for weights, same in (((1.0, 1.0), True), (WEIGHTS, False)):
        inputs = list(zip(job.loras, weights))
        ours, _ = combine(inputs, method="ties", params={"density": 0.5}, rank=RANK)
        peft, _ = combine(inputs, method="ties_svd", params={"density": 0.5}, rank=RANK)
        worst = max(rel(a, b) for a, b in zip(stored_deltas(ours).values(),
                                              stored_deltas(peft).values()))
        assert (worst < PEFT_RTOL) is same, (weights, worst)


# --------------------------------------------------------------------------- random methods

def test_random_methods_same_seed_same_bytes(job, tmp_path):
    inputs = [*zip(job.loras, WEIGHTS), (job.rep, 1.0)]
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        combine_adapters(inputs, tmp_path / name, method="dare_ties", params={"density": 0.5},
                         seed=seed, rank=4)
        outs.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]


@pytest.mark.parametrize("method, params, band", [
    ("dare_linear_svd", {"density": 0.3}, (0.8, 1.2)),   # divides by the density: unbiased
    ("dare_linear", {"density": 0.3}, (0.8, 1.2)),       # L1 rescale: unbiased to O(1/n)
])
def test_dare_keeps_the_expected_value(job, method, params, band):
    """Over K seeds the mean combined delta approaches Σ w_i Δ_i: its squared distance is,
    for an unbiased estimator, Σ_entries Var / K with Var = Σ_i w_i² Δ_i² (1 - p) / p; a
    bias would add a term that does not shrink with K. The ratio must lie in ``band``."""
    name = "model.layers.0.self_attn.q_proj"
    deltas = [stored_deltas(read_adapter(a))[name] for a in job.loras]       # (64, 64) each
    w, p, k = [0.7, 0.4], params["density"], 200
    m = get_method(method)
    resolved = m.resolve(params, n_inputs=2)
    truth = w[0] * deltas[0] + w[1] * deltas[1]
    mean = sum(m.combine(deltas, w, resolved, torch.Generator().manual_seed(s))
               for s in range(k)) / k
    var = sum(wi ** 2 * d ** 2 for wi, d in zip(w, deltas)) * (1 - p) / p
    ratio = float(((mean - truth) ** 2).sum() / (var.sum() / k))
    assert band[0] < ratio < band[1], ratio


# --------------------------------------------------------------------------- outputs

def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_lora_output_loads_in_peft_and_equals_the_merge(job, tmp_path, capsys):
    """``combine --to lora`` at full rank (--eps tiny), loaded by PEFT on the base, gives the
    logits of ``merge --method ties`` of the same three inputs (LoRAs and a rep adapter)."""
    import transformers
    from peft import PeftModel

    out = tmp_path / "combined"
    args = [*job.loras, job.rep, "--weights", "0.7,0.4,1", "--method", "ties",
            "--density", "0.5"]
    code, stdout, stderr = run_main(["combine", *args, "-o", out, "--eps", "1e-6"], capsys)
    assert code == 0, stderr
    assert "method ties (density 0.5" in stdout and "parameters:" in stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert set(cfg["target_modules"]) == {f"model.layers.{i}.{m}" for i in (0, 1)
                                          for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                    "mlp.down_proj")}
    merged = tmp_path / "merged"
    code, _, stderr = run_main(["merge", job.base, *args, "-o", merged, "-q"], capsys)
    assert code == 0, stderr
    probe = probe_inputs()
    peft_model = PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(job.base), out).eval()
    want = _logits(transformers.LlamaForCausalLM.from_pretrained(merged).eval(), probe)
    torch.testing.assert_close(_logits(peft_model, probe), want, rtol=0, atol=2e-5)


def test_random_combine_then_merge_equals_merge_with_the_method(job, tmp_path):
    """The per-module seeds are merge's per-tensor seeds: ``combine --method dare_ties``
    at full rank, merged, equals ``merge --method dare_ties`` with the same seed."""
    from loretta_merge.io import CheckpointReader

    inputs = [*zip(job.loras, WEIGHTS), (job.rep, 1.0)]
    params = {"density": 0.5}
    combine_adapters(inputs, tmp_path / "c", method="dare_ties", params=params, seed=9, eps=1e-7)
    merge(job.base, [(tmp_path / "c", 1.0)], tmp_path / "via", progress=False)
    merge(job.base, inputs, tmp_path / "direct", progress=False, method="dare_ties",
          method_params=params, seed=9)
    with CheckpointReader(tmp_path / "via") as a, CheckpointReader(tmp_path / "direct") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():  # noqa: SIM118 (a reader, not a dict)
            torch.testing.assert_close(a.get(key), b.get(key), rtol=0, atol=2e-6, msg=key)


def test_tt_output_merges_within_the_reported_error(job, tmp_path, capsys):
    """``combine --to tt`` writes a rep adapter that ``merge`` merges; each module's merged
    delta is the combined delta to within the error the report gives."""
    from loretta_merge.io import CheckpointReader

    inputs = [*zip(job.loras, WEIGHTS), (job.rep, 1.0)]
    exact, _ = combine(inputs, method="magnitude_prune", params={"density": 0.5}, eps=1e-7)
    report = combine_adapters(inputs, tmp_path / "tt", method="magnitude_prune",
                              params={"density": 0.5}, to="tt", rank=4, tensor_rank=4)
    assert read_adapter(tmp_path / "tt").method == "rep"
    code, _, stderr = run_main(["merge", job.base, tmp_path / "tt", "-o", tmp_path / "m", "-q"],
                               capsys)
    assert code == 0, stderr
    with CheckpointReader(job.base) as b, CheckpointReader(tmp_path / "m") as m:
        for row in report.modules:
            key = row.name + ".weight"
            got = m.get(key).float() - b.get(key).float()
            want = stored_deltas(exact)[row.name]
            assert row.err_svd <= row.err <= 1 and row.rank == 4
            assert abs(rel(got, want) - row.err) < 1e-4 * max(1.0, row.err), row
    s = report.summary()
    assert s["params"] == sum(r.params for r in report.modules) and s["params_before"] > 0


def test_eps_picks_the_smallest_rank_meeting_the_bound(job):
    inputs = [*zip(job.loras, WEIGHTS), (job.rep, 1.0)]
    exact, _ = combine(inputs, method="ties", params={"density": 0.5}, eps=1e-7)
    _, report = combine(inputs, method="ties", params={"density": 0.5}, eps=0.3)
    for row in report.modules:
        e = torch.linalg.svdvals(stored_deltas(exact)[row.name].double()) ** 2
        tail = [math.sqrt(float(e[k:].sum() / e.sum())) for k in range(len(e) + 1)]
        assert row.err_svd <= 0.3 + 1e-6 and tail[row.rank] <= 0.3
        assert row.rank == 1 or tail[row.rank - 1] > 0.3, row


@pytest.mark.parametrize("name", method_names())
def test_every_method_combines_through_the_api(job, name):
    m = get_method(name)
    params = {"density": 0.5} if "density" in m.defaults else {}
    _, report = combine([*zip(job.loras, WEIGHTS), (job.rep, 1.0)], method=name,
                        params=params, seed=0 if m.random else None, rank=2)
    assert report.method["method"] == name and {r.rank for r in report.modules} == {2}


def test_mergekit_yaml_equals_the_command_line(job, tmp_path, capsys):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: dare_ties\nbase_model: {job.base}\nparameters:\n"
                      f"  density: 0.5\nmodels:\n"
                      + "".join(f"  - model: {job.base}+{a}\n    parameters:\n"
                                f"      weight: {w}\n" for a, w in zip(job.loras, WEIGHTS)))
    code, _, err = run_main(["combine", "--config", recipe, "-o", tmp_path / "y", "--seed", "2",
                             "--rank", "3", "--json"], capsys)
    assert code == 0, err
    code, out, err = run_main(["combine", f"{job.loras[0]}:0.7", f"{job.loras[1]}:0.4",
                               "--method", "dare_ties", "--density", "0.5", "--seed", "2",
                               "--rank", "3", "-o", tmp_path / "c", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["modules"][0]["rank"] == 3
    for f in ("adapter_model.safetensors",):
        assert (tmp_path / "y" / f).read_bytes() == (tmp_path / "c" / f).read_bytes()
    cfg = json.loads((tmp_path / "y" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(job.base)


def test_full_tensors_dropped_on_request(job):
    with pytest.raises(ConfigError, match="--drop-full-tensors"):
        combine([(job.rep_norms, 1.0), (job.loras[0], 1.0)], rank=2)
    _, report = combine([(job.rep_norms, 1.0), (job.loras[0], 1.0)], rank=2,
                        drop_full_tensors=True)
    assert any("left out" in n and "layernorm" in n for n in report.notes)


# --------------------------------------------------------------------------- refusals

@pytest.fixture(scope="session")
def other_base_lora(job) -> Path:
    """A LoRA on a Llama with another FFN width: down_proj is (64, 80), not (64, 96)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    _, kwargs, _ = TINY["llama"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kwargs,
                                                                      "intermediate_size": 80}))
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["down_proj"]))
    pm.save_pretrained(job.root / "other")
    return job.root / "other"


@pytest.fixture(scope="session")
def adp(job) -> Path:
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import AdpConfig

    path = job.root / "adp"
    save_loretta_adapter(get_loretta_model(build_tiny("llama"),
                                           AdpConfig(bottleneck_size=8, tensor_rank=3)), path)
    return path


BAD = [
    (["--method", "ties", "--density", "0"], "--density 0: density is the fraction"),
    (["--method", "ties", "--density", "1.5"], "must be in (0, 1]"),
    (["--method", "ties_svd", "--density", "-0.5"], "must be in (0, 1]"),
    (["--method", "task_arithmetic", "--lambda", "-1"], "--lambda -1 is negative"),
    (["--method", "dare_ties_svd", "--density", "0.5"], "pass --seed N"),
    (["--method", "ties", "--seed", "1"], "--seed applies to the methods that draw"),
    (["--to", "tt", "--rank", "40"], "--rank 40 cannot be split into the modes of module"),
    (["--rank", "40"], "--rank 40 is larger than min(out, in) = 32"),
    (["--eps", "1.5"], "--eps is a relative Frobenius error target"),
    (["--method", "slerp"], "unknown merge method 'slerp'"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_one_line_nothing_written(job, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, _, stderr = run_main(["combine", *job.loras, "-o", out, *args], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which, message", [
    ("other", "module model.layers.0.mlp.down_proj is (out, in) = (64, 96) in"),
    ("adp", "is a LoRETTA_adp adapter, a non-linear bottleneck"),
    ("rep_norms", "carries 5 full tensor(s)"),
])
def test_bad_inputs_one_line_nothing_written(job, other_base_lora, adp, tmp_path, capsys,
                                             which, message):
    bad = {"other": other_base_lora, "adp": adp, "rep_norms": job.rep_norms}[which]
    out = tmp_path / "out"
    code, _, stderr = run_main(["combine", job.loras[1], bad, "-o", out], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_force(job, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = run_main(["combine", *job.loras, "-o", out], capsys)
    assert code == 2 and "already exists" in stderr and list(out.iterdir()) == []
    code, stdout, stderr = run_main(["combine", *job.loras, "-o", out, "--force", "-q"], capsys)
    assert code == 0 and stdout == "" and stderr == "" and (out / "adapter_config.json").exists()
