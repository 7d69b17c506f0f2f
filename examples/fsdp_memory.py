"""Memory per process for training a LLaMA-2-7B-sized model with LoRETTA_rep under --fsdp.

Builds the model on the meta device (no weights, no download) from LLaMA-2-7B's published
shape, adds the rep adapters exactly as `loretta-merge train` does, counts the frozen and
trained parameters, and applies :func:`loretta_merge.train.fsdp.memory_per_process`:

    python examples/fsdp_memory.py [--world 1 2 4 8] [--json]
"""

import argparse
import json

import torch


def llama2_7b_counts() -> dict[str, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model
    from loretta_merge.train.build import keep_fp32_master

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model = get_loretta_model(model, RepConfig(task_type="CAUSAL_LM"))
        keep_fp32_master(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    return {"params": total, "trainable": trained, "block_params": block,
            "root_params": total - block * cfg.num_hidden_layers}


def main() -> None:
    from loretta_merge.train.fsdp import memory_per_process

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    counts = llama2_7b_counts()
    rows = {w: memory_per_process(params=counts["params"], trainable=counts["trainable"],
                                  root_params=counts["root_params"],
                                  block_params=counts["block_params"], world=w, base_bytes=2)
            for w in args.world}
    if args.json:
        print(json.dumps({"counts": counts, "per_process_gib": rows}, indent=2))
        return
    print(f"parameters {counts['params']:,} (bf16 base), trained {counts['trainable']:,} "
          f"(fp32 master weights + grads + AdamW moments)")
    print("processes | GiB per process, sharded (FSDP) | without sharding (DDP)")
    for w, r in rows.items():
        print(f"{w:9d} | {r['sharded']:31.2f} | {r['unsharded']:.2f}")


if __name__ == "__main__":
    main()
