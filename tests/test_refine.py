"""Distillation of extracted modules towards the fine-tune's outputs
(``converters.refine.distill_modules``) on a tiny BERT classifier, and ``extract
--refine-data`` through the real CLI on real files (a tiny classifier and its tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import BertConfig, BertForSequenceClassification

from loretta_merge.cli import cli
from loretta_merge.converters.extract import tt_module
from loretta_merge.converters.refine import distill_modules
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
    refined, rep = distill_modules(ft, tt, base_w, batches, lr=5e-3, max_steps=40,
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
    _, rep = distill_modules(ft, tt, base_w, batches, max_steps=10_000, seconds=0.2,
                                 progress=False)
    assert rep.stopped_by == "time budget" and rep.steps < 10_000
    with pytest.raises(ConfigError, match="not a Linear"):
        distill_modules(ft, {"bert.encoder": tt[NAMES[0]]}, base_w, batches, progress=False)
    with pytest.raises(ConfigError, match="max_steps"):
        distill_modules(ft, tt, base_w, batches, max_steps=0, progress=False)
    before = {k: v.clone() for k, v in ft.state_dict().items()}
    wrong = {**base_w, NAMES[-1]: torch.zeros(16, 32)}   # the last module's base: wrong shape
    with pytest.raises(ConfigError, match=r"the base's weight has shape \(16, 32\), the model's \(32, 32\)"):
        distill_modules(ft, tt, wrong, batches, progress=False)
    assert all(torch.equal(ft.state_dict()[k], v) for k, v in before.items())   # untouched
    assert all(isinstance(dict(ft.named_modules())[n], torch.nn.Linear) for n in NAMES)
    with pytest.raises(ConfigError, match="teacher_outputs"):
        distill_modules(ft, tt, base_w, batches, teacher_outputs=[torch.zeros(8, 3)],
                            progress=False)


# --------------------------------------------------------------------------- extract --refine-data

TARGETS = ("query", "value")


@pytest.fixture(scope="session")
def classifier_pair(tmp_path_factory):
    """A tiny BERT classifier (BASE) and a 'fine-tune' of it: full-rank deltas on query and
    value (rank 2 cannot hold them) and a changed head, with a real word tokenizer saved
    beside the fine-tune, and a JSONL of texts (labels present, never read)."""
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("refine-cli")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]
    (root / "vocab.txt").write_text("\n".join(vocab))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim == 2 and any(f".{t}." in key for t in TARGETS):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif key.startswith("classifier."):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(root / "ft")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(root / "ft")
    rows = [{"text": " ".join(f"w{(i * k) % 45}" for k in (1, 3, 7, 11, 13)), "label": i % 3}
            for i in range(48)]
    (root / "texts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def _kl_of_adapter(root: Path, adapter_dir: Path) -> float:
    """KL of base + the written adapter's deltas (+ its carried tensors) from the fine-tune,
    on the texts: the adapter read back from disk as a user would."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from loretta_merge.formats import read_adapter

    ft = BertForSequenceClassification.from_pretrained(root / "ft").eval()
    base = BertForSequenceClassification.from_pretrained(root / "base").state_dict()
    adapter = read_adapter(adapter_dir)
    state = dict(ft.state_dict())
    for name, m in adapter.modules.items():
        key = next(k for k in state if k.endswith(name.split("model.", 1)[-1] + ".weight"))
        state[key] = base[key] + m.delta().T
    student = BertForSequenceClassification(ft.config).eval()
    student.load_state_dict(state)
    tok = AutoTokenizer.from_pretrained(root / "ft")
    texts = [json.loads(line)["text"] for line in (root / "texts.jsonl").read_text().splitlines()]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return float(torch.nn.functional.kl_div(student(**enc).logits.log_softmax(-1),
                                                ft(**enc).logits.log_softmax(-1),
                                                log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("to", ["tt", "lora"])
def test_extract_refine_data_lowers_the_gap_through_the_cli(classifier_pair, tmp_path, to):
    root = classifier_pair
    common = ["extract", str(root / "base"), str(root / "ft"), "--to", to, "--rank", "2",
              "--tensor-rank", "2", "--target-modules", ",".join(TARGETS), "--fit-steps", "0"]
    plain, refined = tmp_path / "plain", tmp_path / "refined"
    res = CliRunner().invoke(cli, [*common, "-o", str(plain)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, [*common, "-o", str(refined), "--refine-data", str(root / "texts.jsonl"),
                                   "--refine-steps", "40", "--refine-seconds", "120",
                                   "--refine-lr", "5e-3", "--refine-batch-size", "8"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "distil [####################] 40/40" in res.output      # the progress bar
    assert "refined on 48 unlabelled texts" in res.output
    res = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "json"), "--json", "--refine-data",
                                   str(root / "texts.jsonl"), "--refine-steps", "40",
                                   "--refine-lr", "5e-3", "--refine-batch-size", "8"],
                             catch_exceptions=False)
    report = json.loads(res.stdout)
    rec = report["refine"]
    assert rec["steps"] == 40 and rec["stopped_by"] == "max_steps" and rec["texts"] == 48
    assert rec["batches"] == 6 and rec["loss_last"] < rec["loss_first"]
    assert {m["name"] for m in report["modules"]} == set(rec["delta_errors"])
    assert all(m["err_before_refine"] is not None for m in report["modules"])
    assert _kl_of_adapter(root, refined) < 0.5 * _kl_of_adapter(root, plain)


def test_extract_refine_time_budget_and_embedded_texts(classifier_pair, tmp_path):
    """The time budget stops it, on the embedded texts (here the first 64)."""
    root = classifier_pair
    res = CliRunner().invoke(cli, ["extract", str(root / "base"), str(root / "ft"), "--to", "tt",
                                   "--rank", "2", "--tensor-rank", "2", "--fit-steps", "0",
                                   "--target-modules", "query", "-o", str(tmp_path / "out"), "--json",
                                   "--refine-data", "embedded", "--refine-max-texts", "64",
                                   "--refine-steps", "100000", "--refine-seconds", "0.5"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)["refine"]
    assert rec["stopped_by"] == "time budget" and 1 <= rec["steps"] < 100000 and rec["texts"] == 64


def test_extract_refine_refusals_write_nothing(classifier_pair, tmp_path):
    from loretta_merge.cli import main

    root = classifier_pair
    (tmp_path / "notext.jsonl").write_text(json.dumps({"sentence": "w1 w2", "label": 0}))
    args = ["extract", str(root / "base"), str(root / "ft"), "--rank", "2"]
    cases = [
        (["--refine-seconds", "30"], "--refine-seconds tunes the distillation, which only runs with --refine-data"),
        (["--refine-data", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--refine-data", str(tmp_path / "notext.jsonl")], "has no column 'text'"),
        (["--refine-data", "embedded", "--refine-seconds", "0"], "--refine-seconds must be a positive"),
        (["--refine-data", "embedded", "--refine-steps", "0"], "--refine-steps must be an integer >= 1"),
    ]
    for extra, match in cases:
        out = tmp_path / "never"
        with pytest.raises(SystemExit) as exc:
            main([*args, *extra, "-o", str(out)])
        assert exc.value.code != 0
        assert not out.exists()
    for extra, match in cases:
        res = CliRunner().invoke(cli, [*args, *extra, "-o", str(tmp_path / "never")])
        assert res.exit_code != 0 and match in str(res.exception or res.output), (extra, res.output)
