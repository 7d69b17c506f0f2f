"""The architecture families of the conformance matrix: tiny configs and hub layouts.

Each family names the config class, tiny config kwargs, the class the hub's base
checkpoints are saved from (so the layout is real: ``roberta.`` prefix and ``lm_head`` for
RoBERTa, ``bert.`` and ``cls.`` for BERT MLM, bare keys for ``BertModel``...), and the
task-model class (``*ForSequenceClassification``) used for the second checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VOCAB = 96  # the tiny tokenizers' vocabulary size (every family's embedding has these rows)
# one layer: every layer has the same layout, and the ONNX exports (most of the matrix's
# time) take about half as long as with two
_ENC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64)
_DEC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64)


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    config: dict[str, Any]
    base_class: str          # what the hub's base checkpoints are saved from
    seq_cls_class: str       # the task model
    decoder: bool
    tied: bool = False       # input and output embeddings share one tensor
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "decoder" if self.decoder else "encoder"


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("bert-mlm", "BertConfig", dict(_ENC), "BertForMaskedLM", "BertForSequenceClassification",
           decoder=False, notes="bert. prefix, cls. head, no pooler"),
    Family("bert-model", "BertConfig", dict(_ENC), "BertModel", "BertForSequenceClassification",
           decoder=False, notes="bare encoder, pooler"),
    Family("roberta", "RobertaConfig", dict(_ENC, max_position_embeddings=70, pad_token_id=1),
           "RobertaForMaskedLM", "RobertaForSequenceClassification", decoder=False,
           notes="roberta. prefix, lm_head, no pooler"),
    Family("deberta-v2", "DebertaV2Config", dict(_ENC, relative_attention=True, position_buckets=16,
                                                 pos_att_type=["p2c", "c2p"]),
           "DebertaV2ForMaskedLM", "DebertaV2ForSequenceClassification", decoder=False,
           notes="deberta. prefix, query_proj/value_proj"),
    Family("distilbert", "DistilBertConfig", dict(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4,
                                                  hidden_dim=48, max_position_embeddings=64),
           "DistilBertForMaskedLM", "DistilBertForSequenceClassification", decoder=False,
           notes="distilbert. prefix, q_lin/v_lin"),
    Family("gpt2", "GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4,
                                      n_positions=64, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0),
           "GPT2LMHeadModel", "GPT2ForSequenceClassification", decoder=True, tied=True,
           notes="Conv1D, tied"),
    Family("opt", "OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, ffn_dim=48, max_position_embeddings=64,
                                    word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2),
           "OPTForCausalLM", "OPTForSequenceClassification", decoder=True, tied=True,
           notes="tied"),
    Family("llama", "LlamaConfig", dict(_DEC, num_key_value_heads=2, tie_word_embeddings=False,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2),
           "LlamaForCausalLM", "LlamaForSequenceClassification", decoder=True,
           notes="untied, grouped KV heads"),
    Family("llama-tied", "LlamaConfig", dict(_DEC, num_key_value_heads=2, tie_word_embeddings=True,
                                             pad_token_id=0, bos_token_id=1, eos_token_id=2),
           "LlamaForCausalLM", "LlamaForSequenceClassification", decoder=True, tied=True,
           notes="tied, grouped KV heads"),
    Family("mistral", "MistralConfig", dict(_DEC, num_key_value_heads=2, pad_token_id=0,
                                            bos_token_id=1, eos_token_id=2, sliding_window=None),
           "MistralForCausalLM", "MistralForSequenceClassification", decoder=True),
    # transformers forces Qwen2Tokenizer (byte-level BPE) on model_type qwen2: a bigger vocab
    Family("qwen2", "Qwen2Config", dict(_DEC, vocab_size=320, num_key_value_heads=2,
                                        pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                        tie_word_embeddings=False),
           "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", decoder=True,
           notes="biases on q/k/v"),
    Family("gemma", "GemmaConfig", dict(_DEC, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2),
           "GemmaForCausalLM", "GemmaForSequenceClassification", decoder=True, tied=True,
           notes="tied, scaled embeddings"),
    Family("phi3", "Phi3Config", dict(_DEC, num_key_value_heads=2, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2),
           "Phi3ForCausalLM", "Phi3ForSequenceClassification", decoder=True,
           notes="fused qkv_proj, gate_up_proj"),
]}
