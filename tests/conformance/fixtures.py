"""Tiny checkpoints laid out as the hub ships them, with tiny offline tokenizers and data.

:func:`build_family` writes, for one family, a directory with
- ``base/``: random weights saved by the family's hub base class (``BertForMaskedLM``,
  ``RobertaForMaskedLM``, ``LlamaForCausalLM``...), in several shards, with a tokenizer;
- ``task/``: the same config saved by its ``*ForSequenceClassification`` class;
- ``seq_cls.csv`` (text,label with two named labels) and ``lm.jsonl`` (text).

Tokenizers are WordLevel tokenizers built with the ``tokenizers`` package and saved as a
``PreTrainedTokenizerFast`` (``tokenizer.json``), so ``AutoTokenizer`` loads them offline.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

from .families import FAMILIES, VOCAB, Family

WORDS_POS = ["good", "great", "fine", "nice", "superb", "lovely", "bright", "warm"]
WORDS_NEG = ["bad", "awful", "poor", "dull", "grim", "boring", "cold", "weak"]
SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIALS_ROBERTA = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # pad id 1, as RoBERTa's
SPECIALS_DECODER = ["<pad>", "<s>", "</s>", "<unk>"]            # pad 0, bos 1, eos 2


def _vocab(specials: list[str]) -> dict[str, int]:
    words = specials + WORDS_POS + WORDS_NEG
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    return {w: i for i, w in enumerate(words)}


def _byte_level_bpe(path: Path) -> None:
    """Qwen2's kind: a byte-level BPE (transformers rebuilds Qwen2Tokenizer from it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = " ".join(WORDS_POS + WORDS_NEG + [f"w{i}" for i in range(60)])
    tok.train_from_iterator([corpus] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=64,
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(path))


def save_tokenizer(family: Family, path: Path) -> None:
    """A WordLevel tokenizer over :data:`VOCAB` words (Qwen2: a byte-level BPE), saved
    into ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if family.config_class == "Qwen2Config":
        _byte_level_bpe(path)
        return
    if family.decoder:
        specials, (pad, bos, eos, unk) = SPECIALS_DECODER, SPECIALS_DECODER
        cls_tok, sep_tok, mask = bos, eos, None
    elif family.name == "roberta":
        specials = SPECIALS_ROBERTA
        cls_tok, pad, sep_tok, unk, mask = SPECIALS_ROBERTA
        bos, eos = cls_tok, sep_tok
    else:
        specials = SPECIALS_BERT
        pad, unk, cls_tok, sep_tok, mask = SPECIALS_BERT
        bos = eos = None
    vocab = _vocab(specials)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if family.decoder:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls_tok} $A {sep_tok}", pair=f"{cls_tok} $A {sep_tok} $B:1 {sep_tok}:1",
            special_tokens=[(cls_tok, vocab[cls_tok]), (sep_tok, vocab[sep_tok])])
    kwargs = dict(unk_token=unk, pad_token=pad)
    if family.decoder:
        kwargs.update(bos_token=bos, eos_token=eos)
    else:
        kwargs.update(cls_token=cls_tok, sep_token=sep_tok, mask_token=mask)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64,
                                   model_input_names=["input_ids", "attention_mask"], **kwargs)
    fast.save_pretrained(str(path))


def write_data(root: Path, *, rows: int = 24, seed: int = 0) -> dict[str, Path]:
    """``seq_cls.csv`` (text, label in {negative, positive}), ``seq_pair.csv`` (text,
    text_pair, label) and ``lm.jsonl`` (text), deterministic."""
    rng = random.Random(seed)
    cls_rows, pair_rows, lm_rows = [], [], []
    for i in range(rows):
        positive = i % 2 == 0
        words = WORDS_POS if positive else WORDS_NEG
        text = " ".join(rng.choice(words) if rng.random() < 0.6 else f"w{rng.randrange(60)}"
                        for _ in range(rng.randint(3, 8)))
        label = "positive" if positive else "negative"
        cls_rows.append({"text": text, "label": label})
        pair_rows.append({"text": text, "text_pair": " ".join(rng.sample(words, 3)), "label": label})
        lm_rows.append({"text": text})
    paths = {"seq_cls": root / "seq_cls.csv", "seq_pair": root / "seq_pair.csv",
             "lm": root / "lm.jsonl"}
    for key, data in (("seq_cls", cls_rows), ("seq_pair", pair_rows)):
        with open(paths[key], "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    paths["lm"].write_text("".join(json.dumps(r) + "\n" for r in lm_rows), encoding="utf-8")
    return paths


def build_model(family: Family, cls_name: str, *, seed: int = 0):
    """A freshly initialised model of ``cls_name`` on the family's tiny config."""
    import transformers

    config = getattr(transformers, family.config_class)(**family.config)
    if cls_name.endswith("ForSequenceClassification"):
        config.num_labels = 2
        config.id2label = {0: "negative", 1: "positive"}
        config.label2id = {"negative": 0, "positive": 1}
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(config).eval()


def build_family(name: str, root: Path) -> dict[str, Path]:
    """Write the family's ``base/`` and ``task/`` checkpoints and data under ``root``."""
    family = FAMILIES[name]
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for key, cls_name, seed in (("base", family.base_class, 0), ("task", family.seq_cls_class, 1)):
        model = build_model(family, cls_name, seed=seed)
        model.save_pretrained(str(root / key), max_shard_size="20KB")
        save_tokenizer(family, root / key)
        out[key] = root / key
    out.update(write_data(root))
    return out
