"""The merge command's output and --verify's memory guard."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny, perturb_trainable, run_main
from loretta_merge.errors import ConfigError
from loretta_merge.merge import merge


@pytest.fixture
def lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(build_tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    perturb_trainable(pm, seed=1)
    pm.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora"


def test_summary_goes_to_stdout(tiny_model_dir, lora, tmp_path, capsys):
    code, out, err = run_main([f"{tiny_model_dir('llama')}+{lora}", "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    assert out.startswith("merged 2 tensors") and str(tmp_path / "out") in out
    assert "merged" not in err


def test_help_says_verify_loads_two_fp32_copies(capsys):
    code, out, _ = run_main(["merge", "--help"], capsys)
    assert code == 0 and "two fp32 copies" in " ".join(out.split())


def test_verify_refused_up_front_when_it_cannot_fit(tiny_model_dir, lora, tmp_path, monkeypatch,
                                                    capsys):
    import loretta_merge.merge.verify as verify
    from loretta_merge.io import CheckpointReader

    base = tiny_model_dir("llama")
    reader = CheckpointReader(base)
    params = sum(torch.Size(reader.shape(k)).numel() for k in reader.keys())
    monkeypatch.setattr(verify, "available_memory_bytes", lambda: 8 * params)  # not 8.8 x
    with pytest.raises(ConfigError) as info:
        merge(base, [(lora, 1.0)], tmp_path / "out", verify=True, progress=False)
    msg = str(info.value)
    need = 2 * 4 * params * 1.1 / 2**30
    assert "two fp32 copies" in msg and f"about {need:.1f} GiB" in msg and "without --verify" in msg
    assert not (tmp_path / "out").exists()
    code, _, err = run_main([f"{base}+{lora}", "-o", tmp_path / "out", "--verify"], capsys)
    assert code == 2 and err.count("\n") == 1 and "without --verify" in err
    # with enough memory the same run verifies
    monkeypatch.setattr(verify, "available_memory_bytes", lambda: 9 * params)
    report = merge(base, [(lora, 1.0)], tmp_path / "out", verify=True, progress=False)
    assert report.verify["passed"]
