"""Distillation of extracted TT modules towards the fine-tune's outputs
(``converters.refine.distill_rep_modules``), on a tiny BERT classifier."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from loretta_merge.converters.extract import tt_module
from loretta_merge.converters.refine import distill_rep_modules
from loretta_merge.errors import ConfigError
from loretta_merge.formats import LoraModule

NAMES = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


def _setup():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    ft = BertForSequenceClassification(cfg).eval()
    mods = dict(ft.named_modules())
    g = torch.Generator().manual_seed(1)
    base_w, tt = {}, {}
    for n in NAMES:  # the "fine-tune" = base + a full-rank delta; TT rank 2 cannot hold it
        d = torch.randn(32, 32, generator=g) * 0.3
        base_w[n] = mods[n].weight.detach().clone()
        with torch.no_grad():
            mods[n].weight.add_(d)
        u, s, vh = torch.linalg.svd(d)
        root = s[:2].sqrt()
        lora = LoraModule(a=root[:, None] * vh[:2], b=u[:, :2] * root, scale=1.0)
        tt[n] = tt_module(n, lora, d, tensor_rank=2, shapes="paper", fit_steps=0)[0]
    batches = [{"input_ids": torch.randint(0, 50, (8, 12), generator=g),
                "attention_mask": torch.ones(8, 12, dtype=torch.long),
                "labels": torch.zeros(8, dtype=torch.long)} for _ in range(4)]
    return ft, base_w, tt, batches


def _kl(ft, base_w, modules, batches) -> float:
    """KL of the rebuilt model (base + TT deltas) from the fine-tune, over the batches."""
    student = BertForSequenceClassification(ft.config).eval()
    state = dict(ft.state_dict())
    for n, m in modules.items():
        state[n + ".weight"] = base_w[n] + m.delta().T
    student.load_state_dict(state)
    with torch.no_grad():
        return sum(float(torch.nn.functional.kl_div(
            student(input_ids=b["input_ids"]).logits.log_softmax(-1),
            ft(input_ids=b["input_ids"]).logits.log_softmax(-1), log_target=True,
            reduction="batchmean")) for b in batches)


def test_distillation_lowers_the_gap_and_leaves_the_teacher_as_it_was():
    ft, base_w, tt, batches = _setup()
    before = {k: v.clone() for k, v in ft.state_dict().items()}
    refined, rep = distill_rep_modules(ft, tt, base_w, batches, lr=5e-3, max_steps=40,
                                       seconds=None, progress=False)
    assert rep.steps == 40 and rep.stopped_by == "max_steps" and len(rep.losses) == 40
    assert set(refined) == set(tt)
    for n in tt:  # same TT shapes, new values
        assert [c.shape for c in refined[n].a.cores] == [c.shape for c in tt[n].a.cores]
    assert _kl(ft, base_w, refined, batches) < 0.5 * _kl(ft, base_w, tt, batches)
    # the teacher model is restored: same modules, same weights, same trainable flags
    after = ft.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(isinstance(dict(ft.named_modules())[n], torch.nn.Linear) for n in NAMES)


def test_time_budget_and_refusals():
    ft, base_w, tt, batches = _setup()
    _, rep = distill_rep_modules(ft, tt, base_w, batches, max_steps=10_000, seconds=0.2,
                                 progress=False)
    assert rep.stopped_by == "time budget" and rep.steps < 10_000
    with pytest.raises(ConfigError, match="not a Linear"):
        distill_rep_modules(ft, {"bert.encoder": tt[NAMES[0]]}, base_w, batches, progress=False)
    with pytest.raises(ConfigError, match="max_steps"):
        distill_rep_modules(ft, tt, base_w, batches, max_steps=0, progress=False)
    with pytest.raises(ConfigError, match="teacher_outputs"):
        distill_rep_modules(ft, tt, base_w, batches, teacher_outputs=[torch.zeros(8, 3)],
                            progress=False)
