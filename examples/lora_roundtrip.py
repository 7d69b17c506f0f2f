"""PEFT LoRA -> LoRETTA_rep (TT) -> PEFT LoRA, with the error at each step (Python API).

Builds a tiny Llama offline, attaches a real PEFT LoRA with random factors, compresses it
to tensor-train form at a relative error target, and converts it back.

    python examples/lora_roundtrip.py --workdir work/roundtrip [--eps 0.05]
"""

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loretta_merge.converters.lora import lora_to_tt, tt_to_lora
from loretta_merge.formats import read_adapter, write_adapter, write_peft_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="work/roundtrip")
    ap.add_argument("--eps", type=float, default=0.05)
    args = ap.parse_args()
    work = Path(args.workdir)

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4))
    peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; give it something to compress
            torch.nn.init.normal_(p, std=0.02)
    peft_model.save_pretrained(work / "lora")

    tt_adapter, report = lora_to_tt(work / "lora", eps=args.eps)
    write_adapter(tt_adapter, work / "tt", force=True)
    print(f"LoRA -> TT: compression {report.params_before / report.params_after:.1f}x, "
          f"max factor error {max(max(m.err_a, m.err_b) for m in report.modules):.4f} "
          f"(eps {args.eps}, met: {report.eps_met}), "
          f"max delta error {max(m.err_delta for m in report.modules):.4f}")

    lora_again, back = tt_to_lora(read_adapter(work / "tt"))
    write_peft_lora(lora_again, work / "lora-again", force=True)
    # measured: the delta PEFT computes from the written LoRA against the TT delta
    print(f"TT -> LoRA: max delta error {max(m.err_delta for m in back.modules):.1e} (measured)")


if __name__ == "__main__":
    main()
