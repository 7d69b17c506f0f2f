"""The streaming merge against real PEFT and the in-memory LoRETTA model, on every tiny
architecture, plus its failure modes (mismatches, NaN, existing output, kill, Ctrl-C, full
disk)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import ARCHS, TINY, build_tiny, perturb_trainable, probe_inputs
from loretta_merge.cli import cli
from loretta_merge.errors import ConfigError, NumericsError, OutputExistsError, ShapeError
from loretta_merge.io import CheckpointReader
from loretta_merge.merge import merge
from loretta_merge.merge.buffers import BaseReads

ROOT = Path(__file__).resolve().parents[1]
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"],
                "bert": ["query", "value"], "roberta": ["query", "value"],
                "deberta": ["in_proj"], "opt": ["q_proj", "fc1"]}
SEQ_CLS = {"bert", "roberta", "deberta"}


def make_lora(arch: str, path: Path, *, seed: int = 1, **kw) -> Path:
    """A real PEFT LoRA on the tiny model with every trainable tensor perturbed."""
    from peft import LoraConfig, get_peft_model

    kw.setdefault("target_modules", LORA_TARGETS[arch])
    pm = get_peft_model(build_tiny(arch), LoraConfig(r=4, lora_alpha=8, **kw))
    perturb_trainable(pm, seed=seed, std=0.1)
    pm.save_pretrained(path)
    return path


def peft_merged_state(arch: str, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    return PeftModel.from_pretrained(build_tiny(arch), adapter).merge_and_unload().state_dict()


def read_all(out: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(out)
    return {k: reader.get(k) for k in reader.keys()}


def run(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    return result


def temps(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".loretta-" in p.name]


def model_class(arch: str):
    import transformers

    return getattr(transformers, TINY[arch][2])


def logits(model, vocab: int = 128) -> torch.Tensor:
    with torch.no_grad():
        return model(**probe_inputs(vocab)).logits.float()


@pytest.fixture
def small_blocks(monkeypatch):
    """Make the CPU path process tensors in many row blocks of 5 rows (64 columns)."""
    import loretta_merge.merge.kernel as kernel

    monkeypatch.setattr(kernel, "BLOCK_ELEMS", 5 * 64)


# --------------------------------------------------------------------------- PEFT LoRA

@pytest.mark.parametrize("arch", ARCHS)
def test_lora_merge_equals_peft_merge_and_unload(arch, tiny_model_dir, tmp_path):
    base = tiny_model_dir(arch)
    extra = {"modules_to_save": ["classifier"]} if arch in SEQ_CLS else {}
    adapter = make_lora(arch, tmp_path / "lora", **extra)
    out = tmp_path / "out"
    res = run(f"{base}+{adapter}", "-o", out, "-q")
    assert res.exit_code == 0, res.output + repr(res.exception)
    got, want = read_all(out), peft_merged_state(arch, adapter)
    assert set(got) <= set(want)
    for k, t in got.items():
        torch.testing.assert_close(t, want[k], rtol=1e-6, atol=1e-6, msg=k)
    # the targets really changed, and the output loads as a plain transformers model
    base_sd = build_tiny(arch).state_dict()
    changed = [k for k in got if not torch.equal(got[k], base_sd[k])]
    assert any(LORA_TARGETS[arch][0] in k for k in changed)
    if arch in SEQ_CLS:
        assert any(k.startswith("classifier") for k in changed)
    merged = model_class(arch).from_pretrained(out).eval()
    ref = build_tiny(arch)
    ref.load_state_dict(want, strict=False)
    torch.testing.assert_close(logits(merged), logits(ref), rtol=1e-5, atol=1e-5)


def test_lora_rslora_patterns_and_json(tiny_model_dir, tmp_path, small_blocks):
    base = tiny_model_dir("llama")
    adapter = make_lora("llama", tmp_path / "lora", use_rslora=True,
                        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 32})
    out = tmp_path / "out"
    res = run("merge", base, adapter, "-o", out, "--json", "--verify")
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads(res.stdout)
    assert report["merged_tensors"] == 6 and report["dtype"] == "float32"
    assert report["verify"]["passed"] and report["verify"]["max_abs_logit_diff"] < 1e-5
    got, want = read_all(out), peft_merged_state("llama", adapter)
    for k, t in got.items():
        torch.testing.assert_close(t, want[k], rtol=1e-6, atol=1e-6, msg=k)
    prov = json.loads((out / "loretta_merge_provenance.json").read_text())
    assert prov["adapters"][0]["weight"] == 1.0 and prov["base"] == str(base.resolve())


def test_two_adapters_weighted_sum(tiny_model_dir, tmp_path, small_blocks):
    base = tiny_model_dir("opt")
    a1 = make_lora("opt", tmp_path / "a1", seed=1)
    a2 = make_lora("opt", tmp_path / "a2", seed=2, target_modules=["q_proj", "v_proj"])
    w0 = read_all(base)
    d1 = {k: v - w0[k] for k, v in peft_merged_state("opt", a1).items() if k in w0}
    d2 = {k: v - w0[k] for k, v in peft_merged_state("opt", a2).items() if k in w0}
    out = tmp_path / "out"
    res = run(f"{base}+{a1}:0.7+{a2}:0.3", "-o", out, "-q")
    assert res.exit_code == 0, res.output + repr(res.exception)
    got = read_all(out)
    for k in w0:
        torch.testing.assert_close(got[k], w0[k] + 0.7 * d1[k] + 0.3 * d2[k],
                                   rtol=1e-6, atol=1e-6, msg=k)
    res = run("merge", base, a1, a2, "--weights", "0.7,0.3", "-o", tmp_path / "out2", "-q")
    assert res.exit_code == 0, res.output + repr(res.exception)
    got2 = read_all(tmp_path / "out2")
    assert all(torch.equal(got[k], got2[k]) for k in got)


def test_bf16_base_stays_bf16_within_one_ulp(tiny_model_dir, tmp_path, small_blocks):
    base = tiny_model_dir("llama", torch.bfloat16)
    adapter = make_lora("llama", tmp_path / "lora")
    out = tmp_path / "out"
    res = run(f"{base}+{adapter}", "-o", out, "-q")
    assert res.exit_code == 0, res.output + repr(res.exception)
    got, w0 = read_all(out), read_all(base)
    lora = load_file(adapter / "adapter_model.safetensors")
    scale = 8 / 4
    n_checked = 0
    for k, t in got.items():
        assert t.dtype == torch.bfloat16, k
        a_key = "base_model.model." + k.replace(".weight", ".lora_A.weight")
        if a_key not in lora:
            assert torch.equal(t, w0[k])
            continue
        b = lora[a_key.replace("lora_A", "lora_B")].double()
        ref = w0[k].double() + scale * (b @ lora[a_key].double())  # exact reference
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
        assert bool(((t.double() - ref).abs() <= ulp).all()), k
        n_checked += 1
    assert n_checked == 6
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # asking for fp32 casts everything and records it
    res = run(f"{base}+{adapter}", "-o", tmp_path / "f32", "-q", "--dtype", "float32")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert all(t.dtype == torch.float32 for t in read_all(tmp_path / "f32").values())
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


# --------------------------------------------------------------------------- tied embeddings

def test_tied_embeddings(tiny_model_dir, tmp_path):
    from peft import PeftModel

    base = tiny_model_dir("gpt2")
    assert "lm_head.weight" not in CheckpointReader(base)
    plain = make_lora("gpt2", tmp_path / "plain")
    res = run(f"{base}+{plain}", "-o", tmp_path / "o1", "-q")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "lm_head.weight" not in CheckpointReader(tmp_path / "o1")  # still tied
    assert json.loads((tmp_path / "o1" / "config.json").read_text()).get("tie_word_embeddings", True)

    emb = make_lora("gpt2", tmp_path / "emb", modules_to_save=["wte"])
    res = run(f"{base}+{emb}", "-o", tmp_path / "o2", "-q")
    assert res.exit_code == 0, res.output + repr(res.exception)
    got = read_all(tmp_path / "o2")
    assert torch.equal(got["lm_head.weight"], read_all(base)["transformer.wte.weight"])
    assert not torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = model_class("gpt2").from_pretrained(tmp_path / "o2").eval()
    unmerged = PeftModel.from_pretrained(build_tiny("gpt2"), emb).eval()
    torch.testing.assert_close(logits(merged), logits(unmerged), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- LoRETTA rep

def _rep_model(arch: str, seed: int = 0):
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model

    torch.manual_seed(seed)
    model = get_loretta_model(build_tiny(arch), RepConfig(r=4, lora_alpha=8, tensor_rank=3))
    return perturb_trainable(model, seed=seed + 1).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_rep_merge_equals_loretta_model(arch, tiny_model_dir, tmp_path, small_blocks):
    from loretta_merge.adapters import save_loretta_adapter

    model = _rep_model(arch)
    save_loretta_adapter(model, tmp_path / "rep")
    out = tmp_path / "out"
    res = run(f"{tiny_model_dir(arch)}+{tmp_path / 'rep'}", "-o", out, "-q")
    assert res.exit_code == 0, res.output + repr(res.exception)
    merged = model_class(arch).from_pretrained(out).eval()
    want = logits(model)
    assert not torch.allclose(want, logits(build_tiny(arch)), atol=1e-3)  # the adapter matters
    scale = float(want.abs().max())
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=2e-6 * max(1.0, scale))


def test_verify_flag_and_side_files(tiny_model_dir, tmp_path):
    from loretta_merge.adapters import save_loretta_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("llama"), base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# Tiny llama\n")
    (base / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}"}')
    (base / "pytorch_model.bin.index.json").write_text("{}")  # weights of another form: skipped
    save_loretta_adapter(_rep_model("llama"), tmp_path / "rep")
    out = tmp_path / "out"
    res = run(f"{base}+{tmp_path / 'rep'}", "-o", out, "--verify", "--json",
              "--max-shard-size", "100KB")
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads(res.stdout)
    assert report["verify"]["passed"] and report["verify"]["max_abs_logit_diff"] < 1e-4
    assert report["shards"] > 1 and (out / "model.safetensors.index.json").exists()
    assert report["largest_shard_bytes"] <= 100_000
    assert (out / "tokenizer_config.json").read_text() == '{"chat_template": "{{ x }}"}'
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\nlicense: mit\n---\n") and "Merged model" in readme
    assert not (out / "pytorch_model.bin.index.json").exists()


def test_adp_adapter_refused(tiny_model_dir, tmp_path):
    from loretta_merge.adapters.config import AdpConfig
    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter

    save_loretta_adapter(get_loretta_model(build_tiny("opt"), AdpConfig(bottleneck_size=8)),
                         tmp_path / "adp")
    with pytest.raises(ConfigError, match="export onnx MODEL --adapter"):
        merge(tiny_model_dir("opt"), [(tmp_path / "adp", 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- failures

def test_mismatched_base_reports_all_before_reading(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    kwargs = dict(TINY["llama"][1], intermediate_size=80, num_hidden_layers=1)
    other = tmp_path / "other"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).save_pretrained(other)
    adapter = make_lora("llama", tmp_path / "lora")

    def no_reads(self, key):
        raise AssertionError(f"read {key} before the plan was checked")

    monkeypatch.setattr(CheckpointReader, "get", no_reads)
    monkeypatch.setattr(BaseReads, "read", no_reads)  # the run's own buffered reads
    with pytest.raises(ShapeError) as info:
        merge(other, [(adapter, 1.0)], tmp_path / "out", progress=False)
    msg = str(info.value)
    assert "4 adapter target(s)" in msg and "Is BASE the model the adapter was trained on" in msg
    assert "model.layers.0.mlp.down_proj expects model.layers.0.mlp.down_proj.weight of shape (64, 96)" in msg
    assert "has (64, 80)" in msg
    for m in ("q_proj", "v_proj", "down_proj"):
        assert f"module model.layers.1.{m.replace('down', 'mlp.down') if m == 'down_proj' else 'self_attn.' + m}" in msg
    assert not (tmp_path / "out").exists() and not temps(tmp_path)


def test_seq_cls_adapter_matches_bare_base(tiny_model_dir, tmp_path):
    """An adapter trained on BertForSequenceClassification ('bert.' names) merges into a
    bare BertModel checkpoint (no prefix)."""
    import transformers

    bare = tmp_path / "bare"
    transformers.BertModel(transformers.BertConfig(**TINY["bert"][1])).save_pretrained(bare)
    adapter = make_lora("bert", tmp_path / "lora")
    report = merge(bare, [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.merged_tensors == 4


def test_seq_cls_rep_adapter_over_bare_base_writes_the_task_model(tmp_path):
    """The demo's situation: a bare BertModel checkpoint (MiniLM-style, no 'bert.' prefix)
    plus a rep adapter trained on BertForSequenceClassification, whose new head and TT pooler
    the base lacks. The output is a BertForSequenceClassification checkpoint equal to the
    in-memory LoRETTA model."""
    import transformers

    from loretta_merge.adapters import save_loretta_adapter

    model = _rep_model("bert")  # BertForSequenceClassification with rep, head and TT pooler
    bare = tmp_path / "bare"
    transformers.BertModel(model.config).save_pretrained(bare)  # different random weights
    # the adapter's model must be built on THIS base: reload it from the bare checkpoint
    base = transformers.BertForSequenceClassification.from_pretrained(bare).eval()
    from loretta_merge.adapters import adapter_from_model, load_loretta_model

    ref = load_loretta_model(base, adapter_from_model(model)).eval()
    save_loretta_adapter(ref, tmp_path / "rep")
    report = merge(bare, [(tmp_path / "rep", 1.0)], tmp_path / "out", progress=False, verify=True)
    assert report.verify["passed"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert len(cfg["id2label"]) == 2
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(merged), logits(ref), rtol=0, atol=1e-5)
    keys = set(read_all(tmp_path / "out"))
    assert "classifier.weight" in keys and "bert.pooler.dense.weight" in keys


def test_non_finite_adapter(tiny_model_dir, tmp_path, small_blocks):
    from loretta_merge.formats import read_adapter

    base = tiny_model_dir("llama")
    adapter = make_lora("llama", tmp_path / "lora")
    sd = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    sd[key][0, 0] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    bad = tmp_path / "nan"
    shutil.copytree(adapter, bad)
    shutil.move(tmp_path / "nan.safetensors", bad / "adapter_model.safetensors")
    res = run(f"{base}+{bad}", "-o", tmp_path / "out")
    assert res.exit_code != 0 and "v_proj" in str(res.exception)
    # an in-memory adapter that bypasses the reader's check is caught by the plan
    mem = read_adapter(adapter)
    mem.modules["model.layers.0.self_attn.q_proj"].b[1, 1] = float("inf")
    with pytest.raises(NumericsError, match="model.layers.0.self_attn.q_proj"):
        merge(base, [(mem, 1.0)], tmp_path / "out", progress=False)
    # finite factors whose product overflows: caught on the merged tensor, named
    mem = read_adapter(adapter)
    mod = mem.modules["model.layers.1.mlp.down_proj"]
    mod.a.fill_(1e20)
    mod.b.fill_(1e20)
    with pytest.raises(NumericsError, match=r"into model\.layers\.1\.mlp\.down_proj\.weight"):
        merge(base, [(mem, 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not temps(tmp_path)


def test_existing_output_and_failed_force_run(tiny_model_dir, tmp_path):
    from loretta_merge.formats import read_adapter

    base = tiny_model_dir("llama")
    adapter = make_lora("llama", tmp_path / "lora")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("keep me")
    res = run(f"{base}+{adapter}", "-o", out)
    assert isinstance(res.exception, OutputExistsError) and "--force" in str(res.exception)
    assert os.listdir(out) == ["precious"]
    mem = read_adapter(adapter)  # fails midway: overflow in the last layer's down_proj
    mem.modules["model.layers.1.mlp.down_proj"].a.fill_(1e20)
    mem.modules["model.layers.1.mlp.down_proj"].b.fill_(1e20)
    with pytest.raises(NumericsError):
        merge(base, [(mem, 1.0)], out, force=True, progress=False)
    assert os.listdir(out) == ["precious"] and not temps(tmp_path)
    res = run(f"{base}+{adapter}", "-o", out, "--force", "-q")
    assert res.exit_code == 0 and "precious" not in os.listdir(out) and not temps(tmp_path)


def test_disk_full_fails_cleanly(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import loretta_merge.io.writer as writer
    from loretta_merge.cli import main

    adapter = make_lora("llama", tmp_path / "lora")

    calls = []
    real = writer.write_bytes

    def full(fd, data, offset):  # the disk fills up a few writes into the run
        calls.append(len(memoryview(data).cast("B")))
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(writer, "write_bytes", full)
    with pytest.raises(SystemExit) as info:
        main([f"{tiny_model_dir('llama')}+{adapter}", "-o", str(tmp_path / "out"), "-q"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "free space or choose an output on another disk" in err
    assert not (tmp_path / "out").exists() and not temps(tmp_path)


# the CLI in a child process whose merge writes each tensor 0.3 s late (the test's own
# monkeypatching of the run's one write call; production code has no test hook)
_SLOW_CLI = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # live even if the tests run as `cmd &`
import loretta_merge.merge.run as run
write = run._write
def slow(writer, name, tensor):
    write(writer, name, tensor)
    time.sleep(0.3)
run._write = slow
from loretta_merge.cli import main
main(sys.argv[1:])
"""


def _start_slow_merge(base: Path, adapter: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", _SLOW_CLI, f"{base}+{adapter}",
                             "-o", str(out), "-q"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(proc: subprocess.Popen, parent: Path) -> None:
    deadline = time.time() + 60
    while not temps(parent):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the merge never started writing"
        time.sleep(0.05)
    time.sleep(0.5)  # a few tensors into the run


def test_sigkill_midway_then_next_run_cleans(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    adapter = make_lora("llama", tmp_path / "lora")
    out = tmp_path / "out"
    proc = _start_slow_merge(base, adapter, out)
    _wait_for_temp(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    stale = temps(tmp_path)
    assert not out.exists() and len(stale) == 1
    report = merge(base, [(adapter, 1.0)], out, progress=False)
    assert report.merged_tensors == 6 and out.is_dir() and not temps(tmp_path)


def test_sigint_leaves_nothing(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    adapter = make_lora("llama", tmp_path / "lora")
    out = tmp_path / "out"
    proc = _start_slow_merge(base, adapter, out)
    _wait_for_temp(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and ("interrupted" in err or "aborted" in err)
    assert not out.exists() and not temps(tmp_path)


def test_merge_spec_parsing(tmp_path):
    from loretta_merge.commands.merge import parse_merge_spec

    odd = tmp_path / "a+b:1"
    odd.mkdir()
    (tmp_path / "base").mkdir()
    (tmp_path / "x").mkdir()
    b = tmp_path / "base"
    assert parse_merge_spec([f"{b}+{odd}"]) == (str(b), [(str(odd), None)])
    assert parse_merge_spec([f"{b}+{odd}:0.5+{tmp_path / 'x'}:-1e-1"]) == (
        str(b), [(str(odd), 0.5), (str(tmp_path / "x"), -0.1)])
    assert parse_merge_spec([str(b), f"{tmp_path / 'x'}:2"]) == (str(b), [(str(tmp_path / "x"), 2.0)])
    with pytest.raises(ConfigError, match="no adapter"):
        parse_merge_spec([str(b)])
    res = run("merge", b, tmp_path / "x:0.5", "--weights", "1", "-o", tmp_path / "o")
    assert isinstance(res.exception, ConfigError) and "not both" in str(res.exception)
    res = run("merge", "--help")
    assert "BYTES" in res.output and "5GB" in res.output


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_equals_peft(arch, tiny_model_dir, tmp_path, small_blocks):
    base = tiny_model_dir(arch)
    dora = make_lora(arch, tmp_path / "dora", use_dora=True)
    assert any("magnitude" in k for k in load_file(dora / "adapter_model.safetensors"))
    merge(base, [(dora, 1.0)], tmp_path / "out", progress=False)
    got, want = read_all(tmp_path / "out"), peft_merged_state(arch, dora)
    for k, t in got.items():
        torch.testing.assert_close(t, want[k], rtol=1e-6, atol=1e-6, msg=k)
    assert not torch.equal(got[[k for k in got if LORA_TARGETS[arch][0] in k][0]],
                           read_all(base)[[k for k in got if LORA_TARGETS[arch][0] in k][0]])
    with pytest.raises(ConfigError, match="DoRA.*alone with weight 1"):
        merge(base, [(dora, 0.5)], tmp_path / "out2", progress=False)


def test_cuda_without_gpu(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    dora = make_lora("llama", tmp_path / "dora")
    if not torch.cuda.is_available():
        res = run(f"{base}+{dora}", "-o", tmp_path / "out", "--device", "cuda")
        assert isinstance(res.exception, ConfigError) and "--device cpu" in str(res.exception)


def test_tied_pair_stored_twice_is_untied_when_changed(tmp_path, small_blocks):
    """A checkpoint that stores lm_head although its config ties it: changing the input
    embedding must set tie_word_embeddings false, or loading would re-tie lm_head to it."""
    from peft import PeftModel

    base = tmp_path / "base"
    model = build_tiny("gpt2")
    model.save_pretrained(base)
    sd = load_file(base / "model.safetensors")
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    emb = make_lora("gpt2", tmp_path / "emb", modules_to_save=["wte"])
    report = merge(base, [(emb, 1.0)], tmp_path / "out", progress=False)
    assert report.untied == ["lm_head.weight"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = model_class("gpt2").from_pretrained(tmp_path / "out").eval()
    unmerged = PeftModel.from_pretrained(build_tiny("gpt2"), emb).eval()
    torch.testing.assert_close(logits(merged), logits(unmerged), rtol=1e-5, atol=1e-5)


def test_failed_verify_leaves_no_output(tiny_model_dir, tmp_path, monkeypatch):
    import loretta_merge.merge as lm

    adapter = make_lora("opt", tmp_path / "lora")
    monkeypatch.setitem(lm.VERIFY_TOLERANCE, torch.float32, -1.0)  # nothing can pass
    with pytest.raises(NumericsError, match="differs from base"):
        merge(tiny_model_dir("opt"), [(adapter, 1.0)], tmp_path / "out", verify=True, progress=False)
    assert not (tmp_path / "out").exists() and not temps(tmp_path)
