"""Tokenized training sets and the padding collator (the rows come from
:mod:`loretta_merge.datafiles` or :mod:`loretta_merge.embedded`, validated before any model is built)."""

from __future__ import annotations

import torch

class TokenizedDataset(torch.utils.data.Dataset):
    """Pre-tokenized examples: each item a dict of python lists (padded by the collator)."""

    def __init__(self, examples: list[dict[str, list[int] | int]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def tokenize_classification(tokenizer, texts: list[str], labels: list[int], *,
                            max_length: int, pairs: list[str] | None = None) -> TokenizedDataset:
    """Tokenize single sentences, or sentence pairs (``pairs``: the second sentences; the
    tokenizer joins them with its separator and truncates the longer one first)."""
    if pairs is not None:
        enc = tokenizer(texts, pairs, truncation="longest_first", max_length=max_length)
    else:
        enc = tokenizer(texts, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return TokenizedDataset([{**{k: enc[k][i] for k in keys}, "labels": labels[i]}
                             for i in range(len(texts))])


def tokenize_lm(tokenizer, pairs: list[tuple[str, str]], *, max_length: int) -> TokenizedDataset:
    """Prompt tokens get label -100 (no loss); an EOS token closes each response when the
    tokenizer has one. Truncation keeps the start of the sequence."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        r = tokenizer(response, add_special_tokens=not prompt)["input_ids"] + eos
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return TokenizedDataset(examples)


class PadCollator:
    """Right-pads a batch of token lists to its longest row (labels with -100)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        out: dict[str, torch.Tensor] = {}
        for key in batch[0]:
            if key == "labels" and not isinstance(batch[0]["labels"], list):
                out[key] = torch.tensor([b[key] for b in batch], dtype=torch.long)
                continue
            pad = {"input_ids": self.pad_token_id, "labels": -100}.get(key, 0)
            out[key] = torch.tensor([b[key] + [pad] * (width - len(b[key])) for b in batch],
                                    dtype=torch.long)
        return out
