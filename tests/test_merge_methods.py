"""Task-vector merge methods (``merge --method``) against mergekit 0.1.5 and PEFT 0.21.

One job for every comparison: a tiny fp32 Llama base and three adapters of different kinds
and ranks (PEFT LoRA r4 on q/v, PEFT LoRA r8 on q/v/down, LoRETTA rep), weights 1, 0.7, 0.3.
mergekit sees the same job as full models (PEFT's ``merge_and_unload`` for the LoRAs, this
tool's linear merge for the rep adapter) and runs ``mergekit-yaml``'s own command, all
configs in ONE subprocess (importing mergekit costs ~20 s on the 2-core machine); the
package itself never imports mergekit. Deterministic methods must agree to fp32 rounding
(both compute ``W0 + combine(Δ)`` in fp32; mergekit's Δ is ``full - base``, ours the
low-rank product). Random methods: mergekit's masks come from the global torch RNG, ours
from a per-tensor generator, so whole merges cannot match; the pruning functions match
mergekit's draw for draw given the same seed, and the merge wiring is checked against the
pure functions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, perturb_trainable, run_main, save_tiny
from safetensors.torch import load_file, save_file

from loretta_merge.errors import ConfigError
from loretta_merge.io import CheckpointReader
from loretta_merge.merge import merge
from loretta_merge.methods import OwnedDeltas, get_method, method_names, pruning, tensor_generator
from loretta_merge.methods.stream import prune_whole

WEIGHTS = (1.0, 0.7, 0.3)
ATOL = 1e-6  # fp32 rounding of W0 + Δ (weights ~0.02-0.5): observed differences are ~3e-8


@dataclass
class Job:
    root: Path
    base: Path
    adapters: list[Path]  # what loretta-merge merges
    full: list[Path]  # the same inputs as full models, for mergekit


def read_all(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    try:
        return {k: reader.get(k) for k in reader.keys()}
    finally:
        reader.close()


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="session")
def job(tmp_path_factory) -> Job:
    from peft import LoraConfig, get_peft_model

    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import RepConfig

    root = tmp_path_factory.mktemp("methods")
    base = save_tiny("llama", root / "base")
    adapters, full = [], []
    for i, (r, targets) in enumerate([(4, ["q_proj", "v_proj"]),
                                      (8, ["q_proj", "v_proj", "down_proj"])]):
        pm = get_peft_model(build_tiny("llama"), LoraConfig(r=r, lora_alpha=2 * r,
                                                            target_modules=targets))
        perturb_trainable(pm, seed=i + 1, std=0.1)
        pm.save_pretrained(root / f"lora{i}")
        pm.merge_and_unload().save_pretrained(root / f"full{i}")
        adapters.append(root / f"lora{i}")
        full.append(root / f"full{i}")
    torch.manual_seed(3)
    rep = get_loretta_model(build_tiny("llama"), RepConfig(r=4, lora_alpha=8, tensor_rank=3))
    save_loretta_adapter(perturb_trainable(rep, seed=3, std=0.1).eval(), root / "rep")
    merge(base, [(root / "rep", 1.0)], root / "full2", progress=False)  # tested in test_merge
    adapters.append(root / "rep")
    full.append(root / "full2")
    return Job(root, base, adapters, full)


def ours(job: Job, name: str, method: str, weights=WEIGHTS, seed=None, **params) -> Path:
    out = job.root / "ours" / name
    merge(job.base, list(zip(job.adapters, weights)), out, progress=False, force=True,
          method=method, method_params=params, seed=seed)
    return out


# --------------------------------------------------------------------------- mergekit

def _mk(job: Job, method: str, params: dict | None = None, per_model: dict | None = None,
        *, base: bool = True) -> dict:
    models = [{"model": str(f), "parameters": {"weight": w, **{k: v[i] if isinstance(v, list)
                                                                else v for k, v in
                                                                (per_model or {}).items()}}}
              for i, (f, w) in enumerate(zip(job.full, WEIGHTS))]
    cfg = {"merge_method": method, "models": models, "dtype": "float32",
           "parameters": params or {}}
    if base:
        cfg["base_model"] = str(job.base)
    return cfg


# case -> (mergekit config builder, our method, our weights, our parameters)
CASES = {
    "linear": (lambda j: _mk(j, "task_arithmetic"), "linear", WEIGHTS, {}),
    # mergekit's linear averages the full models: ours with the weights divided by their sum
    "linear_vs_mergekit_linear": (lambda j: _mk(j, "linear", base=False), "linear",
                                  tuple(w / sum(WEIGHTS) for w in WEIGHTS), {}),
    "task_arithmetic": (lambda j: _mk(j, "task_arithmetic", {"lambda": 0.6, "normalize": True}),
                        "task_arithmetic", WEIGHTS, {"lambda": 0.6, "normalize": True}),
    "ties": (lambda j: _mk(j, "ties", per_model={"density": 0.5}), "ties", WEIGHTS,
             {"density": 0.5}),
    "ties_per_input_density": (lambda j: _mk(j, "ties", per_model={"density": [0.3, 0.5, 0.8]}),
                               "ties", WEIGHTS, {"density": (0.3, 0.5, 0.8)}),
    "ties_no_normalize_lambda_rescale": (
        lambda j: _mk(j, "ties", {"normalize": False, "lambda": 1.5, "rescale": True},
                      per_model={"density": 0.3}),
        "ties", WEIGHTS, {"density": 0.3, "normalize": False, "lambda": 1.5, "rescale": True}),
    "magnitude_prune": (lambda j: _mk(j, "breadcrumbs", per_model={"density": 0.4, "gamma": 0.0}),
                        "magnitude_prune", WEIGHTS, {"density": 0.4}),
    "breadcrumbs": (lambda j: _mk(j, "breadcrumbs", per_model={"density": 0.5, "gamma": 0.05}),
                    "breadcrumbs", WEIGHTS, {"density": 0.5, "gamma": 0.05}),
    "breadcrumbs_ties": (lambda j: _mk(j, "breadcrumbs_ties",
                                       per_model={"density": 0.5, "gamma": 0.05}),
                         "breadcrumbs_ties", WEIGHTS, {"density": 0.5, "gamma": 0.05}),
}

# mergekit-yaml's own click command, once per config, in one process; then mergekit's
# pruning functions on a probe tensor after torch.manual_seed (the draws ours must repeat)
_DRIVER = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from mergekit.scripts.run_yaml import main as mergekit_yaml
spec = json.load(open(sys.argv[1]))
for config, out, extra in spec["merges"]:
    mergekit_yaml([config, out, "--no-copy-tokenizer", *extra], standalone_mode=False)
from mergekit import sparsify
t = load_file(spec["probe"])["t"]
res = {}
torch.manual_seed(1234)
res["dare"] = sparsify.bernoulli(t, 0.3, sparsify.RescaleNorm.l1)
torch.manual_seed(1234)
res["dare_plain"] = sparsify.bernoulli(t, 0.3, None)
torch.manual_seed(99)
res["della"] = sparsify.della_magprune(t, 0.5, 0.2, sparsify.RescaleNorm.l1)
res["outliers"] = sparsify.magnitude_outliers(t, 0.5, None, gamma=0.05)
res["magnitude"] = sparsify.magnitude(t, 0.3, None)
save_file({k: v.contiguous() for k, v in res.items()}, spec["out"])
"""


def _mergekit_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mergekit") is not None


def run_mergekit(work: Path, configs: dict[str, dict], recipe_texts: dict[str, str],
                 probe: torch.Tensor) -> Path:
    """Every config (written as JSON, which is YAML) and recipe text (``BASE+LORA`` entries:
    mergekit needs a LoRA cache) through mergekit-yaml into ``work/NAME``, and mergekit's own
    pruning functions on ``probe`` into ``work/sparsify.safetensors``, in one subprocess."""
    if not _mergekit_available():
        pytest.fail("mergekit is not installed: `pip install -e '.[test]'` brings mergekit==0.1.5; "
                    "the comparisons need it, the package does not")
    work.mkdir()
    merges = []
    for name, config in configs.items():
        (work / f"{name}.yml").write_text(json.dumps(config, indent=1))
        merges.append([str(work / f"{name}.yml"), str(work / name), []])
    for name, text in recipe_texts.items():
        (work / f"{name}.yml").write_text(text)
        merges.append([str(work / f"{name}.yml"), str(work / name),
                       ["--lora-merge-cache", str(work / "lora-cache")]])
    save_file({"t": probe}, work / "probe.safetensors")
    spec = {"merges": merges, "probe": str(work / "probe.safetensors"),
            "out": str(work / "sparsify.safetensors")}
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(work / "spec.json")], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


@pytest.fixture(scope="session")
def mergekit_runs(job):
    """Every CASES config, the recipes and the pruning probe through mergekit."""
    probe = torch.randn(48, 80, generator=torch.Generator().manual_seed(5))
    work = run_mergekit(job.root / "mergekit", {name: build(job) for name, (build, *_r) in CASES.items()},
                        recipes(job), probe)
    return {"dirs": {name: work / name for name in [*CASES, *recipes(job)]}, "probe": probe,
            "sparsify": load_file(work / "sparsify.safetensors")}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_method_equals_mergekit(case, job, mergekit_runs):
    _, method, weights, params = CASES[case]
    got = read_all(ours(job, case, method, weights, **params))
    want = read_all(mergekit_runs["dirs"][case])
    diff = max_diff(got, want)
    print(f"{case}: max |ours - mergekit| = {diff:.3g}")
    assert diff <= ATOL, case
    base = read_all(job.base)
    assert any(not torch.equal(got[k], base[k]) for k in got)  # the adapters changed something


@pytest.mark.slow
def test_pruning_draws_equal_mergekit(mergekit_runs):
    """Same seed, same draws: DARE's and DELLA's masks (and both deterministic prunings)
    equal mergekit's functions, bit for bit. The L1 rescale factor of the rescaled ones is
    ours to fp32 rounding: we sum |Δ| in float64 chunk by chunk (the merge never holds a
    whole tensor), mergekit in float32 over the whole tensor (relative error up to ~1e-7
    here), so their values may differ by that much and no more."""
    t, want = mergekit_runs["probe"], mergekit_runs["sparsify"]
    g = lambda s: torch.Generator().manual_seed(s)
    got = {
        "dare": prune_whole(pruning.random_keep(0.3, g(1234)), t),
        "dare_plain": prune_whole(pruning.random_keep(0.3, g(1234), rescale=False), t),
        "della": prune_whole(pruning.magnitude_ranked_keep(0.5, 0.2, g(99)), t),
        "outliers": prune_whole(pruning.largest_below_outliers(t.numel(), 0.5, 0.05), t),
        "magnitude": prune_whole(pruning.largest(t.numel(), 0.3), t),
    }
    for name, value in got.items():
        assert torch.equal(value != 0, want[name] != 0), name  # the same entries kept
        if name in ("dare", "della"):
            ratio = value[value != 0] / want[name][value != 0]  # one factor per tensor
            assert float((ratio - 1).abs().max()) < 1e-6, name
        else:
            assert torch.equal(value, want[name]), name


# --------------------------------------------------------------------------- mergekit YAML

def ties_and_linear_recipes(base, first, second) -> dict[str, str]:
    """The ties and linear mergekit recipes over ``first`` and ``second`` (mergekit model
    specs: ``BASE+LORA`` entries here, fine-tune paths in test_merge_full); mergekit's linear
    averages models, the base among them, so it has no base_model."""
    return {
        "recipe_ties": f"""
merge_method: ties
base_model: {base}
models:
  - model: {first}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {second}
    parameters: {{weight: 0.7, density: 0.4}}
parameters:
  lambda: 0.9
dtype: float32
""",
        "recipe_linear": f"""
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {first}
    parameters: {{weight: 1.0}}
  - model: {second}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    }


def recipes(job: Job) -> dict[str, str]:
    """mergekit recipes over BASE+LORA entries (mergekit cannot read the rep adapter)."""
    b, l0, l1 = job.base, job.adapters[0], job.adapters[1]
    return {
        **ties_and_linear_recipes(b, f"{b}+{l0}", f"{b}+{l1}"),
        "recipe_breadcrumbs": f"""
merge_method: breadcrumbs
base_model: {b}
parameters:
  density: 0.5
  gamma: 0.02
models:
  - model: {{model: {{path: {b}}}, lora: {{path: {l0}}}}}
    parameters: {{weight: 0.6}}
  - model: {b}+{l1}
    parameters: {{weight: 0.4}}
dtype: float32
""",
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["recipe_ties", "recipe_linear", "recipe_breadcrumbs"])
def test_mergekit_yaml_runs_unchanged(name, job, mergekit_runs, capsys):
    """The same YAML file, given to mergekit-yaml and to `merge --config`, gives the same
    checkpoint."""
    config = job.root / "mergekit" / f"{name}.yml"
    out = job.root / "ours" / name
    code, _, stderr = run_main(["merge", "--config", config, "-o", out, "-q"], capsys)
    assert code == 0, stderr
    diff = max_diff(read_all(out), read_all(mergekit_runs["dirs"][name]))
    print(f"{name}: max |ours - mergekit| = {diff:.3g}")
    assert diff <= ATOL


def _recipe(job: Job, body: str) -> str:
    b, l0 = job.base, job.adapters[0]
    return body.format(b=b, l0=l0, full=job.full[1])


ONE_LORA = "merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {b}+{l0}\n"
BAD_RECIPES = [
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {b}+{l0}\nfoo: 1\n",
     "unknown key 'foo'"),
    ("merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}+{l0}\n",
     "merge_method 'slerp' is not supported"),
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {full}+{l0}\n",
     "every input must be base_model+ADAPTER"),
    ("slices: []\nmerge_method: ties\n", "key 'slices' is not supported"),
    (ONE_LORA + "    parameters: {{density: [0.1, 0.5]}}\n", "parameter density is list-valued"),
    (ONE_LORA + "    parameters: {{desnity: 0.5}}\n", "unknown parameter(s) desnity"),
    (ONE_LORA + "    parameters: {{density: 2}}\n", "--density 2: density is the fraction"),
]


@pytest.mark.parametrize("body, message", BAD_RECIPES, ids=[m for _, m in BAD_RECIPES])
def test_bad_recipes_are_refused_by_name(job, tmp_path, capsys, body, message):
    config = tmp_path / "recipe.yml"
    config.write_text(_recipe(job, body))
    out = tmp_path / "out"
    code, _, stderr = run_main(["merge", "--config", config, "-o", out], capsys)
    lines = stderr.strip().splitlines()
    assert code != 0 and len(lines) == 1 and message in lines[0], stderr
    assert not out.exists()


def test_config_excludes_command_line_inputs(job, tmp_path, capsys):
    config = tmp_path / "recipe.yml"
    config.write_text(_recipe(job, "merge_method: ties\nbase_model: {b}\nmodels:\n"
                                   "  - model: {b}+{l0}\n"))
    for extra, message in [(["--density", "0.5"], "--density cannot be combined with --config"),
                           ([job.base, job.adapters[0]], "not both")]:
        code, _, stderr = run_main(["merge", "--config", config, "-o", tmp_path / "o", *extra],
                                   capsys)
        assert code != 0 and message in stderr, stderr


# --------------------------------------------------------------------------- PEFT

def _deltas(n=3, shape=(40, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_equals_peft_with_unit_weights(majority):
    """With weights 1 PEFT's ties (sign elected on unweighted deltas, divided by the number
    of agreeing inputs) and mergekit's (weighted deltas, divided by the agreeing weights)
    coincide; ours follows mergekit."""
    from peft.utils.merge_utils import ties

    d = _deltas()
    m = get_method("ties")
    got = m.combine(d, [1, 1, 1], m.resolve({"density": 0.4, "majority_sign": majority},
                                            n_inputs=3), None)
    want = ties(d, torch.ones(3), 0.4, majority)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,params", [
    ("ties", {"density": 0.4}), ("ties", {"density": 1.0, "majority_sign": "frequency"}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}), ("task_arithmetic", {"lambda": 0.6}),
    ("dare_ties", {"density": 0.3}), ("linear", {})])
def test_handed_over_deltas_give_the_same_result_and_a_plain_list_is_untouched(name, params):
    """The merge hands its deltas over (OwnedDeltas): the method may prune them in place and
    drops each once used. The result is the same bits as from a plain list, which is never
    changed (density 1 returns the delta itself: it must not be scaled in place)."""
    m = get_method(name)
    resolved = m.resolve(params, n_inputs=3)
    plain = _deltas()
    before = [d.clone() for d in plain]
    seeded = (lambda: torch.Generator().manual_seed(4)) if m.random else (lambda: None)
    want = m.combine(plain, [1.0, 0.7, 0.5], resolved, seeded())
    assert all(torch.equal(a, b) for a, b in zip(plain, before))
    given = OwnedDeltas(d.clone() for d in before)
    got = m.combine(given, [1.0, 0.7, 0.5], resolved, seeded())
    assert torch.equal(got, want)
    assert list(given) == [None, None, None]  # each let go of once used


def test_dare_differs_from_peft_only_in_the_rescale():
    """PEFT's dare_linear divides the kept entries by the density (expected value); mergekit
    (and ours) scale each pruned delta back to its L1 norm. Same draws otherwise."""
    from peft.utils.merge_utils import dare_linear

    d = _deltas(2)
    m = get_method("dare_linear")
    params = m.resolve({"density": 0.3, "rescale": False}, n_inputs=2)
    got = m.combine(d, [1.0, 0.5], params, torch.Generator().manual_seed(11))
    torch.manual_seed(11)
    want = dare_linear(d, torch.tensor([1.0, 0.5]), 0.3)
    torch.testing.assert_close(got / 0.3, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- random methods

@pytest.mark.parametrize("rescale", [True, False])
def test_dare_keeps_the_expected_value(rescale):
    """On a 1M-entry delta with mean 0.5, the mean of the rescaled pruned delta (L1 rescale,
    or 1/density as PEFT does) agrees with the unpruned mean within 5 standard errors of
    the Bernoulli estimator: 5 * sqrt((1 - p) / p * mean(Δ²) / n)."""
    p, n = 0.3, 1024 * 1024
    delta = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(12345)) + 0.5
    bound = 5 * math.sqrt((1 - p) / p * float((delta ** 2).mean()) / n)
    for seed in range(3):
        pruned = prune_whole(pruning.random_keep(p, torch.Generator().manual_seed(seed),
                                                 rescale=rescale), delta)
        if not rescale:
            pruned = pruned / p
        kept = float((pruned != 0).float().mean())
        assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / n)
        assert abs(float(pruned.mean()) - float(delta.mean())) < bound, (seed, bound)


def test_della_keeps_large_entries_more_often():
    """DELLA: keep probabilities run from density - epsilon (smallest magnitude of a row) to
    density + epsilon (largest); on average the density."""
    p, eps, n = 0.5, 0.2, 512 * 512
    delta = torch.randn(512, 512, generator=torch.Generator().manual_seed(12345))
    kept = prune_whole(pruning.magnitude_ranked_keep(p, eps, torch.Generator().manual_seed(2),
                                                     rescale=False), delta) != 0
    assert abs(float(kept.float().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    order = delta.abs().argsort(dim=1)  # the 50 smallest and 50 largest of each row
    low, high = kept.gather(1, order[:, :50]).float(), kept.gather(1, order[:, -50:]).float()
    ramp = 2 * eps * 24.5 / 511  # the mean rank offset of 50 ends of a 512-entry row
    se = 5 * math.sqrt(0.35 * 0.65 / low.numel())
    assert abs(float(low.mean()) - (p - eps + ramp)) < se
    assert abs(float(high.mean()) - (p + eps - ramp)) < se


def test_random_methods_same_seed_same_bytes(job):
    a = ours(job, "dare_a", "dare_ties", seed=3, density=0.5)
    b = ours(job, "dare_b", "dare_ties", seed=3, density=0.5)
    c = ours(job, "dare_c", "dare_ties", seed=4, density=0.5)
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in b.glob("*.safetensors"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ta, tc = read_all(a), read_all(c)
    changed = [k for k in ta if "q_proj" in k or "v_proj" in k]
    assert changed and all(not torch.equal(ta[k], tc[k]) for k in changed)
    # the masks depend on the tensor's name only: another shard layout, the same tensors
    d = job.root / "ours" / "dare_d"
    merge(job.base, list(zip(job.adapters, WEIGHTS)), d, progress=False, method="dare_ties",
          method_params={"density": 0.5}, seed=3, max_shard_bytes="1MB")
    td = read_all(d)
    assert all(torch.equal(ta[k], td[k]) for k in ta)
    prov = json.loads((a / "loretta_merge_provenance.json").read_text())
    assert prov["merge_method"]["method"] == "dare_ties" and prov["merge_method"]["seed"] == 3


@pytest.mark.parametrize("method, params", [("dare_ties", {"density": 0.4}),
                                            ("della", {"density": 0.5, "epsilon": 0.1}),
                                            ("dare_linear", {"density": 0.6, "lambda": 0.8})])
def test_random_merge_is_the_method_applied_per_tensor(job, method, params):
    """The streamed merge equals W0 + method(Δ_i from the full models, weights, params,
    tensor_generator(seed, name)) for every tensor (the wiring: input order, per-tensor
    generators, zero deltas of inputs that do not touch a tensor)."""
    got = read_all(ours(job, f"wiring_{method}", method, seed=21, **params))
    base = read_all(job.base)
    fulls = [read_all(f) for f in job.full]
    m = get_method(method)
    resolved = m.resolve(params, n_inputs=3)
    for name, w0 in base.items():
        deltas = [f[name] - w0 for f in fulls]
        if not any(bool(d.any()) for d in deltas):
            assert torch.equal(got[name], w0), name
            continue
        want = w0 + m.combine(deltas, list(WEIGHTS), resolved, tensor_generator(21, name))
        torch.testing.assert_close(got[name], want, rtol=0, atol=ATOL, msg=name)


# --------------------------------------------------------------------------- the path itself

def test_task_arithmetic_path_equals_the_linear_fast_path(job):
    """The task-vector path (whole tensors) and the fused linear kernel agree; with two
    different adapter kinds and ranks on one tensor."""
    fast = read_all(ours(job, "fast", "linear"))
    slow = read_all(ours(job, "slow", "task_arithmetic"))
    for k in fast:  # the same sum in another order: an ulp or two of values up to ~2
        torch.testing.assert_close(slow[k], fast[k], rtol=0, atol=3e-7, msg=k)


def test_bf16_base_is_cast_once(job, tmp_path):
    """A bf16 base: every tensor equals the fp32 merge of the same (upcast) values, cast
    once to bf16: the method runs in fp32 and nothing is rounded in between."""
    model = build_tiny("llama", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    model.float().save_pretrained(tmp_path / "fp32")
    for base, name in ((tmp_path / "bf16", "o16"), (tmp_path / "fp32", "o32")):
        merge(base, list(zip(job.adapters, WEIGHTS)), tmp_path / name, progress=False,
              method="ties", method_params={"density": 0.5})
    got, ref = read_all(tmp_path / "o16"), read_all(tmp_path / "o32")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    for k in got:
        assert torch.equal(got[k], ref[k].to(torch.bfloat16)), k


def test_conv1d_orientation_gpt2(tiny_model_dir, tmp_path):
    """GPT-2 stores Conv1D weights (in, out): the deltas are combined in the stored
    orientation, as a merge of the full models would (DELLA ranks along rows)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model_dir("gpt2")
    adapters, fulls = [], []
    for i, r in enumerate((4, 8)):
        pm = get_peft_model(build_tiny("gpt2"), LoraConfig(r=r, lora_alpha=r, fan_in_fan_out=True,
                                                           target_modules=["c_attn", "c_proj"]))
        perturb_trainable(pm, seed=10 + i, std=0.1)
        pm.save_pretrained(tmp_path / f"l{i}")
        adapters.append(tmp_path / f"l{i}")
        fulls.append(pm.merge_and_unload().state_dict())
    out = tmp_path / "out"
    merge(base, [(a, w) for a, w in zip(adapters, (1.0, 0.5))], out, progress=False,
          method="della", method_params={"density": 0.6, "epsilon": 0.2}, seed=5)
    got, w0s = read_all(out), read_all(base)
    m = get_method("della")
    params = m.resolve({"density": 0.6, "epsilon": 0.2}, n_inputs=2)
    checked = 0
    for name, w0 in w0s.items():
        deltas = [f[name] - w0 for f in fulls]
        if any(bool(d.any()) for d in deltas):
            want = w0 + m.combine(deltas, [1.0, 0.5], params, tensor_generator(5, name))
            torch.testing.assert_close(got[name], want, rtol=0, atol=ATOL, msg=name)
            checked += 1
    assert checked == 6  # c_attn, attn.c_proj and mlp.c_proj of two layers


@pytest.mark.slow
def test_quantized_base_gptq(tmp_path):
    """A GPTQ base (committed fixture) is read dequantized: ties over two LoRAs equals
    W0 (dequantized) + ties(deltas), the deltas taken from each adapter's own linear merge
    into the same base."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from loretta_merge.io import read_model_config
    from loretta_merge.quant import open_base

    fixtures = Path(__file__).parent / "fixtures" / "quant"
    qdir = fixtures / "gptq"
    adapters = []
    for i, r in enumerate((4, 8)):
        model = transformers.LlamaForCausalLM.from_pretrained(fixtures / "base",
                                                              dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj",
                                                                                 "down_proj"]))
        perturb_trainable(pm, seed=30 + i, std=0.1)
        pm.save_pretrained(tmp_path / f"l{i}")
        adapters.append(tmp_path / f"l{i}")
    singles = []
    for i, a in enumerate(adapters):
        merge(qdir, [(a, 1.0)], tmp_path / f"single{i}", dtype="float32", progress=False)
        singles.append(read_all(tmp_path / f"single{i}"))
    merge(qdir, [(a, w) for a, w in zip(adapters, (1.0, 0.6))], tmp_path / "out",
          dtype="float32", progress=False, method="ties", method_params={"density": 0.5})
    got = read_all(tmp_path / "out")
    reader = open_base(qdir, read_model_config(qdir), CheckpointReader(qdir))
    m = get_method("ties")
    params = m.resolve({"density": 0.5}, n_inputs=2)
    checked = 0
    for name in got:
        w0 = reader.get(name).float()
        deltas = [s[name] - w0 for s in singles]
        if any(bool(d.any()) for d in deltas):
            want = w0 + m.combine(deltas, [1.0, 0.6], params, None)
            torch.testing.assert_close(got[name], want, rtol=0, atol=ATOL, msg=name)
            checked += 1
    reader.close()
    assert checked >= 2


def test_every_registered_method_runs_on_the_job(job):
    for name in method_names():
        m = get_method(name)
        params = {"density": 0.5} if "density" in m.defaults else {}
        out = ours(job, f"all_{name}", name, seed=0 if m.random else None, **params)
        assert (out / "config.json").exists()


# --------------------------------------------------------------------------- refusals

BAD = [
    (["--method", "ties", "--density", "0"], "--density 0: density is the fraction"),
    (["--method", "ties", "--density", "1.5"], "must be in (0, 1]"),
    (["--method", "task_arithmetic", "--lambda", "-1"], "--lambda -1 is negative"),
    (["--method", "dare_ties", "--density", "0.5"], "pass --seed N"),
    (["--method", "ties", "--seed", "1"], "--seed applies to the methods that draw"),
    (["--density", "0.5"], "--density does not apply to --method linear"),
    (["--method", "della", "--density", "0.5", "--epsilon", "0.6", "--seed", "0"],
     "density ± epsilon must lie strictly inside (0, 1)"),
    (["--method", "breadcrumbs", "--gamma", "1"], "--gamma 1: the fraction of largest"),
    (["--method", "slerp"], "unknown merge method 'slerp'; choose one of linear,"),
    (["--method", "ties", "--verify"], "--verify compares with base + adapters in memory"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_parameters_one_line_nothing_written(job, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, _, stderr = run_main(["merge", job.base, *job.adapters[:2], "-o", out, *args],
                               capsys)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_api_refusals(job, tmp_path):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(build_tiny("llama"), LoraConfig(r=4, target_modules=["q_proj"],
                                                        use_dora=True))
    perturb_trainable(pm, seed=9)
    pm.save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match="DoRA"):
        merge(job.base, [(tmp_path / "dora", 1.0)], tmp_path / "out", progress=False,
              method="ties")
    with pytest.raises(ConfigError, match="one value, or one per input"):
        merge(job.base, [(a, 1.0) for a in job.adapters], tmp_path / "out", progress=False,
              method="ties", method_params={"density": (0.5, 0.5)})
    with pytest.raises(ConfigError, match="--majority-sign 'most'"):
        merge(job.base, [(job.adapters[0], 1.0)], tmp_path / "out", progress=False,
              method="ties", method_params={"majority_sign": "most"})
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- exact selection

@pytest.mark.parametrize("shape", [(7,), (64, 33), (300, 1000)])
def test_largest_equals_topk(shape):
    """The histogram cut keeps exactly the entries torch.topk finds (no ties here)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    n = x.numel()
    for k in (1, 5, n // 3, n - 1):
        trim = pruning.largest(n, (k + 0.5) / n)
        got = prune_whole(trim, x)
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.topk(x.abs().reshape(-1), k).indices] = True
        assert trim._special is None
        assert torch.equal(got, x * want.view_as(x)), (shape, k)


def test_largest_with_ties_and_special_values():
    x = torch.tensor([0.0, 1.0, -1.0, 1.0, 2.0, 0.5, -0.0, float("inf")])
    kept = lambda k: prune_whole(pruning.largest(8, (k + 0.5) / 8), x) != 0
    # inf and 2 are largest; of the three 1s the one mergekit's argsort puts first
    trim = pruning.largest(8, 3.5 / 8)
    got = prune_whole(trim, x) != 0
    first = torch.argsort(x.abs(), descending=True)[:3]
    assert trim._special is not None and got[first].all() and int(got.sum()) == 3
    assert kept(5).tolist() == [False, True, True, True, True, False, False, True]  # all 1s fit
    trim = pruning.largest(8, 7.5 / 8)  # a cut through zeros needs no sort: they stay 0
    assert torch.equal(prune_whole(trim, x), x) and trim._special is None


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}),
                                           ("dare_ties", {"density": 0.5, "rescale": False})])
def test_merge_in_tiny_chunks_writes_the_same_bytes(job, method, params, monkeypatch):
    """The merge runs a method in chunks of rows (loretta_merge.methods.stream); chunks of
    a few rows, each delta computed again per pass, give the default merge's bytes."""
    from loretta_merge.methods import stream

    seed = 2 if get_method(method).random else None
    default = ours(job, f"chunks_{method}_default", method, seed=seed, **params)
    monkeypatch.setattr(stream, "CHUNK_ENTRIES", 100)
    tiny = ours(job, f"chunks_{method}_tiny", method, seed=seed, **params)
    files = sorted(p.name for p in default.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in tiny.glob("*.safetensors"))
    for name in files:
        assert (default / name).read_bytes() == (tiny / name).read_bytes(), name


def test_tie_break_first_from_the_command_line(job, tmp_path, capsys):
    """``--tie-break first`` keeps the first of equal magnitudes at TIES' cut instead of
    the ones mergekit's sort keeps: the merge runs, and differs from the default one at
    most at the entries of such ties (a few of the changed tensors' entries)."""
    outs = {}
    for rule in ("mergekit", "first"):
        outs[rule] = tmp_path / rule
        code, _, stderr = run_main(["merge", job.base, *job.adapters[:2], "-o", outs[rule],
                                    "--method", "ties", "--density", "0.5", "-q",
                                    "--tie-break", rule], capsys)
        assert code == 0, stderr
    a, b = read_all(outs["mergekit"]), read_all(outs["first"])
    differ = sum(int((a[k] != b[k]).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    assert differ < total * 1e-3, (differ, total)
    code, _, stderr = run_main(["merge", job.base, *job.adapters[:2], "-o", tmp_path / "x",
                                "--method", "dare_ties", "--seed", "1", "--tie-break", "first"],
                               capsys)
    assert code == 2 and "--tie-break does not apply to --method dare_ties" in stderr
    assert not (tmp_path / "x").exists()
