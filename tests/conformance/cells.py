"""The matrix: one function per flow, and which families each applies to.

Flows (columns of the README table):
- ``train_seqcls_rep`` / ``train_seqcls_adp`` / ``train_causal_rep`` / ``train_causal_adp``:
  ``loretta-merge train`` on the hub-laid-out base.
- ``merge_base``: the seq-cls rep adapter merged into the base it was trained on; ``--verify``
  passes, the task model is written (architectures, labels, head) and its logits equal the
  in-memory model's.
- ``merge_task``: the same adapter into the ``*ForSequenceClassification`` checkpoint.
- ``merge_causal``: the causal-lm rep adapter into the base (decoders).
- ``peft_tt_to_lora``: ``convert tt-to-lora``, then PEFT's ``PeftModel.from_pretrained`` on
  the base gives the in-memory model's logits (which ``merge_base`` ties to the merged model).
- ``lora_to_tt``: a real PEFT LoRA on the family converted to TT; the TT deltas equal the
  LoRA deltas.
- ``onnx_merged`` / ``onnx_adp`` / ``onnx_with_past``: ``export onnx`` of the merged task
  model, of base + adp adapter (unmerged), and of the merged causal LM with its KV cache.
- ``tied``: tied embeddings: training, the in-memory model and the merged checkpoint agree.
- ``extract``: the merged task model (``merge_task``) is a fine-tune of the task checkpoint
  whose deltas have the adapter's rank: ``extract --to lora`` at that rank, loaded by PEFT,
  gives the merged model's logits; the Python API's ``extract(to="tt")`` gives them through
  the in-memory TT adapter.
- ``resize``: ``convert resize --rank 2`` of that LoRA equals each delta's best rank-2
  approximation and loads in PEFT; the API's ``resize`` of the trained rep adapter keeps
  its deltas within the error target.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .families import FAMILIES
from .flows import (FlowFn, Workspace, assert_close, in_memory, load_task_model, logits,
                    probe, read_config)


def _train_cell(task: str, method: str) -> FlowFn:
    def flow(ws: Workspace) -> None:
        out = ws.train(task, method, flow=f"train_{'seqcls' if task == 'seq-cls' else 'causal'}_{method}")
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["steps"] == 2, summary["steps"]
        assert (out / "adapter_config.json").is_file()
    return flow


def merge_base(ws: Workspace) -> None:
    adapter = ws.train("seq-cls", "rep", flow="merge_base")
    merged = ws.merge("base", adapter, "merge-base", flow="merge_base")
    _check_task_model(ws, merged, base_key="base", adapter=adapter)


def merge_task(ws: Workspace) -> None:
    adapter = ws.train("seq-cls", "rep", flow="merge_task")
    merged = ws.merge("task", adapter, "merge-task", flow="merge_task")
    _check_task_model(ws, merged, base_key="task", adapter=adapter)


def _check_task_model(ws: Workspace, merged: Path, *, base_key: str, adapter: Path) -> None:
    family = ws.family
    config = read_config(merged)
    assert config.get("architectures") == [family.seq_cls_class], config.get("architectures")
    labels = sorted(str(v) for v in (config.get("id2label") or {}).values())
    assert labels == ["negative", "positive"], config.get("id2label")
    want = logits(in_memory(ws.paths[base_key], adapter, "seq-cls"), family)
    got = logits(load_task_model(merged, "seq-cls"), family)
    assert_close(got, want, f"merged {merged.name} vs base + adapter in memory")


def merge_causal(ws: Workspace) -> None:
    adapter = ws.train("causal-lm", "rep", flow="merge_causal")
    merged = ws.merge("base", adapter, "merge-causal", flow="merge_causal")
    want = logits(in_memory(ws.paths["base"], adapter, "causal-lm"), ws.family)
    assert_close(logits(load_task_model(merged, "causal-lm"), ws.family), want,
                 "merged causal LM vs base + adapter in memory")


def peft_tt_to_lora(ws: Workspace) -> None:
    from peft import PeftModel

    adapter = ws.train("seq-cls", "rep", flow="peft_tt_to_lora")
    out = ws.out("tt-to-lora")
    ws.require(ws.run("tt-to-lora", ["convert", "tt-to-lora", adapter, "-o", out]), "peft_tt_to_lora")
    want = logits(in_memory(ws.paths["base"], adapter, "seq-cls"), ws.family)
    peft_model = PeftModel.from_pretrained(load_task_model(ws.paths["base"], "seq-cls"), str(out))
    assert_close(logits(peft_model.eval(), ws.family), want, "PEFT LoRA vs LoRETTA in memory")


def lora_to_tt(ws: Workspace) -> None:
    from peft import LoraConfig, get_peft_model

    from loretta_merge.adapters.config import default_targets
    from loretta_merge.formats import read_adapter

    lora_dir, tt_dir = ws.out("peft-lora"), ws.out("lora-to-tt")
    if not lora_dir.exists():
        model = load_task_model(ws.paths["base"], "causal-lm" if ws.family.decoder else "seq-cls")
        targets = default_targets(model.config.model_type, "rep")
        assert targets, f"no default rep targets for {model.config.model_type}"
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a trained LoRA: lora_B away from its zero init
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        peft_model.save_pretrained(str(lora_dir))
    ws.require(ws.run("lora-to-tt", ["convert", "lora-to-tt", lora_dir, "-o", tt_dir,
                                     "--eps", "1e-4"]), "lora_to_tt")
    lora, tt = read_adapter(lora_dir), read_adapter(tt_dir)
    assert set(lora.modules) == set(tt.modules) and lora.modules, sorted(tt.modules)
    for name, mod in lora.modules.items():
        want, got = mod.delta(), tt.modules[name].delta()
        err = float((got - want).norm() / want.norm())
        assert err <= 1e-3 and math.isfinite(err), f"{name}: relative delta error {err:.2e}"


def onnx_merged(ws: Workspace) -> None:
    merged = ws.merge("task", ws.train("seq-cls", "rep", flow="onnx_merged"), "merge-task",
                      flow="onnx_merged")
    run = ws.run("onnx-merged", ["export", "onnx", merged, "-o", ws.out("onnx-merged"),
                                 "--task", "seq-cls"])
    assert "validated on" in ws.require(run, "onnx_merged").out, run.out


def onnx_adp(ws: Workspace) -> None:
    adapter = ws.train("seq-cls", "adp", flow="onnx_adp")
    run = ws.run("onnx-adp", ["export", "onnx", ws.paths["base"], "--adapter", adapter,
                              "-o", ws.out("onnx-adp"), "--task", "seq-cls"])
    assert "validated on" in ws.require(run, "onnx_adp").out, run.out


def onnx_with_past(ws: Workspace) -> None:
    merged = ws.merge("base", ws.train("causal-lm", "rep", flow="onnx_with_past"),
                      "merge-causal", flow="onnx_with_past")
    run = ws.run("onnx-past", ["export", "onnx", merged, "-o", ws.out("onnx-past"),
                               "--task", "causal-lm", "--with-past"])
    assert "validated on" in ws.require(run, "onnx_with_past").out, run.out


def tied(ws: Workspace) -> None:
    """Tied embeddings: the shared tensor trained in full and a rep adapter on the output
    projection; training keeps input and output embeddings one tensor, and the in-memory
    model, its in-memory merge and the streamed merged checkpoint give the same logits."""
    from loretta_merge.adapters.config import RepConfig
    from loretta_merge.adapters import get_loretta_model, merge_loretta_model, save_loretta_adapter

    family = ws.family
    model = load_task_model(ws.paths["base"], "causal-lm")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.weight is head.weight, "fixture: the base is not tied"
    names = {id(m): n for n, m in model.named_modules()}
    torch.manual_seed(0)
    model = get_loretta_model(model, RepConfig(
        r=4, tensor_rank=2, target_modules=[names[id(head)]], modules_to_save=[names[id(emb)]]))
    # one optimiser step: the embedding and the adapter both move
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    inputs = probe(family)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    before = emb.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, emb.weight), "the embedding did not train"
    assert model.get_output_embeddings().base_layer.weight is model.get_input_embeddings().weight, \
        "training untied the embeddings"
    model.eval()
    want = logits(model, family)
    adapter = ws.out("tied-adapter")
    save_loretta_adapter(model, adapter, base_model_name_or_path=str(ws.paths["base"]))
    merged = ws.merge("base", adapter, "merge-tied", flow="tied")
    assert_close(logits(load_task_model(merged, "causal-lm"), family), want,
                 "merged checkpoint vs trained model")
    assert_close(logits(in_memory(ws.paths["base"], adapter, "causal-lm"), family), want,
                 "reloaded adapter vs trained model")
    assert_close(logits(merge_loretta_model(model), family), want, "in-memory merge vs trained model")


def _extracted_lora(ws: Workspace, flow: str) -> tuple[Path, Path]:
    """The merged task model and the LoRA ``extract`` takes from it (rank: the adapter's)."""
    merged = ws.merge("task", ws.train("seq-cls", "rep", flow=flow), "merge-task", flow=flow)
    out = ws.out("extract-lora")
    ws.require(ws.run("extract-lora", ["extract", ws.paths["task"], merged, "-o", out,
                                       "--to", "lora", "--rank", ADAPTER_RANK, "-q"]), flow)
    return merged, out


def extract(ws: Workspace) -> None:
    from peft import PeftModel

    from loretta_merge.converters.extract import extract as extract_api
    from loretta_merge.formats import write_adapter

    merged, lora_dir = _extracted_lora(ws, "extract")
    want = logits(load_task_model(merged, "seq-cls"), ws.family)
    peft_model = PeftModel.from_pretrained(load_task_model(ws.paths["task"], "seq-cls"), str(lora_dir))
    assert_close(logits(peft_model.eval(), ws.family), want, "base + extracted LoRA (PEFT) vs merged")
    adapter, report = extract_api(ws.paths["task"], merged, to="tt", rank=ADAPTER_RANK,
                                  tensor_rank=ADAPTER_RANK * 4)
    assert report.modules, "extract found no module"
    tt_dir = write_adapter(adapter, ws.out("extract-tt"), force=True)
    assert_close(logits(in_memory(ws.paths["task"], tt_dir, "seq-cls"), ws.family), want,
                 "base + extracted TT adapter vs merged")


def resize(ws: Workspace) -> None:
    from peft import PeftModel

    from loretta_merge.converters.resize import resize as resize_api
    from loretta_merge.formats import read_adapter

    _, lora_dir = _extracted_lora(ws, "resize")
    out = ws.out("resize-lora")
    ws.require(ws.run("resize-lora", ["convert", "resize", lora_dir, "-o", out, "--rank", 2, "-q"]),
               "resize")
    before, after = read_adapter(lora_dir), read_adapter(out)
    assert set(before.modules) == set(after.modules) and before.modules, sorted(after.modules)
    for name, mod in before.modules.items():
        d = mod.delta().double()
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        err = float((after.modules[name].delta().double() - best).norm() / max(float(d.norm()), 1e-30))
        assert err <= 1e-5, f"{name}: resized delta vs the best rank-2 approximation: {err:.2e}"
    PeftModel.from_pretrained(load_task_model(ws.paths["task"], "seq-cls"), str(out))
    rep = read_adapter(ws.train("seq-cls", "rep", flow="resize"))
    rounded, _ = resize_api(rep, eps=1e-2)
    for name, mod in rep.modules.items():
        if not hasattr(mod, "delta"):
            continue
        d = mod.delta()
        err = float((rounded.modules[name].delta() - d).norm() / max(float(d.norm()), 1e-30))
        assert err <= 2e-2, f"{name}: rounded rep delta error {err:.2e} above the target"


FLOWS: dict[str, FlowFn] = {
    "train_seqcls_rep": _train_cell("seq-cls", "rep"),
    "train_seqcls_adp": _train_cell("seq-cls", "adp"),
    "train_causal_rep": _train_cell("causal-lm", "rep"),
    "train_causal_adp": _train_cell("causal-lm", "adp"),
    "merge_base": merge_base,
    "merge_task": merge_task,
    "merge_causal": merge_causal,
    "peft_tt_to_lora": peft_tt_to_lora,
    "lora_to_tt": lora_to_tt,
    "onnx_merged": onnx_merged,
    "onnx_adp": onnx_adp,
    "onnx_with_past": onnx_with_past,
    "tied": tied,
    "extract": extract,
    "resize": resize,
}
ADAPTER_RANK = 4  # the trained adapters' LoRA rank (``--r`` in Workspace.train)
DECODER_ONLY = {"train_causal_rep", "train_causal_adp", "merge_causal", "onnx_with_past"}


def applies(family: str, flow: str) -> bool:
    fam = FAMILIES[family]
    if flow in DECODER_ONLY:
        return fam.decoder
    if flow == "tied":
        return fam.tied
    return True


def cells() -> list[tuple[str, str]]:
    return [(f, flow) for f in FAMILIES for flow in FLOWS if applies(f, flow)]
