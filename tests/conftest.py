"""Shared fixtures: tiny real transformers models built offline from configs.

Each model is saved once per session with safetensors in several small shards, so the
index code always runs. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)

# name -> (config class, config kwargs, model class used for the saved checkpoint)
TINY = {
    "llama": ("LlamaConfig", dict(vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=False), "LlamaForCausalLM"),
    "gpt2": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=0),
             "GPT2LMHeadModel"),
    "bert": ("BertConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=96,
                                max_position_embeddings=64, num_labels=2),
             "BertForSequenceClassification"),
    "roberta": ("RobertaConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=96,
                                      max_position_embeddings=70, num_labels=2, pad_token_id=1),
                "RobertaForSequenceClassification"),
    "deberta": ("DebertaConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=96,
                                      max_position_embeddings=64, num_labels=2),
                "DebertaForSequenceClassification"),
    "opt": ("OPTConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, ffn_dim=96, max_position_embeddings=64,
                              word_embed_proj_dim=64), "OPTForCausalLM"),
}
ARCHS = list(TINY)


def build_tiny(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A freshly initialised tiny model of the named architecture (deterministic)."""
    import transformers

    cfg_cls, kwargs, model_cls = TINY[name]
    config = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    return model.to(dtype)


def save_tiny(name: str, path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
              max_shard_size: str = "40KB") -> Path:
    model = build_tiny(name, seed=seed, dtype=dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir("llama")`` -> a saved, sharded checkpoint directory
    (built once per session per name/dtype). Treat it as read-only."""
    cache: dict = {}

    def get(name: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (name, dtype)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{name}-{str(dtype).split('.')[-1]}")
            cache[key] = save_tiny(name, d, dtype=dtype)
        return cache[key]

    return get


def perturb_trainable(model, *, seed: int = 1, std: float = 0.05):
    """Add seeded Gaussian noise to every trainable tensor (PEFT starts lora_B at zero;
    this makes an adapter really change outputs, so losing a tensor would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def run_main(argv, capsys) -> tuple[int, str, str]:
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    from loretta_merge.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def probe_inputs(vocab_size: int = 128, batch: int = 2, seq: int = 7, *, seed: int = 0):
    """Token ids and an attention mask with right padding on the first row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}
