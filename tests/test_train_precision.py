"""Mixed precision: trained tensors stay float32 (master weights) whatever the base dtype;
a bf16 base is not upcast; bf16 autocast runs on CPU."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from safetensors import safe_open

from loretta_merge.errors import ConfigError
from loretta_merge.train import train
from test_train import FAST, FILLER, _jsonl, _tokenizer


def _lm_data(tmp_path):
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.sample(FILLER, 5))} for _ in range(24)]
    return _jsonl(tmp_path / "lm.jsonl", rows)


@pytest.fixture(scope="session")
def llama_bf16(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama-bf16")
    shutil.copytree(tiny_model_dir("llama", torch.bfloat16), d, dirs_exist_ok=True)
    _tokenizer(d, causal=True)
    return d


def _grab():
    from transformers import TrainerCallback

    seen: dict = {}

    class Grab(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            seen["trained"] = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
            seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}

    return Grab(), seen


@pytest.mark.parametrize("method", ["rep", "adp"])
def test_bf16_base_trains_fp32_master_weights(llama_bf16, tmp_path, method):
    grab, seen = _grab()
    out = tmp_path / "out"
    rep = train(model=llama_bf16, method=method, task="causal-lm", train_file=_lm_data(tmp_path),
                eval_split=0.25, output_dir=out, max_steps=3, learning_rate=1e-2, bf16=True,
                callbacks=[grab], **FAST)
    assert set(seen["trained"].values()) == {torch.float32}, seen["trained"]
    assert seen["frozen"] == {torch.bfloat16}  # the base was not upcast
    assert rep.hyperparameters["autocast"] == "bfloat16"
    assert torch.isfinite(torch.tensor(rep.metrics_after["loss"]))
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}, dtypes


def test_bf16_base_without_flag_autocasts_in_its_dtype(llama_bf16, tmp_path):
    grab, seen = _grab()
    rep = train(model=llama_bf16, method="rep", task="causal-lm", train_file=_lm_data(tmp_path),
                eval_split=0, output_dir=tmp_path / "o", max_steps=2, callbacks=[grab], **FAST)
    assert rep.hyperparameters["autocast"] == "bfloat16"
    assert set(seen["trained"].values()) == {torch.float32}


def test_fp32_base_with_bf16_flag_keeps_fp32(tiny_model_dir, tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(tiny_model_dir("llama"), d)
    _tokenizer(d, causal=True)
    grab, seen = _grab()
    rep = train(model=d, method="rep", task="causal-lm", train_file=_lm_data(tmp_path),
                eval_split=0, output_dir=tmp_path / "o", max_steps=2, bf16=True,
                callbacks=[grab], **FAST)
    assert rep.hyperparameters["autocast"] == "bfloat16"
    assert seen["frozen"] == {torch.float32} and set(seen["trained"].values()) == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_fp16_without_cuda_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"--fp16 needs a CUDA GPU.*pass --bf16"):
        train(model=tmp_path / "not-read", train_file=tmp_path / "not-read.csv",
              output_dir=tmp_path / "o", fp16=True)
    assert not (tmp_path / "o").exists()
