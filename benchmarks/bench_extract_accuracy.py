"""What extraction costs, measured on real data (issue 26, part 3).

One run: the embedded MiniLM is fully fine-tuned (``train(method="full")``) on the embedded
Rotten Tomatoes split of ``bench_train.py`` (its ``make_split``: movie-disjoint train /
validation / test, the ``demo`` budget: 2,000 training rows, 1 epoch, batch 8, max length
64, mean pooling); the learning rate is chosen on the validation movies from a small grid.
The chosen fine-tune is then extracted at several budgets and every extracted model is
scored once on the test movies:

- ``lora_svd``: the truncated SVD of each delta at rank r (what ``extract --to lora`` computes);
- ``mergekit``: ``mergekit-extract-lora --max-rank r`` on the same fine-tune (the base saved as
  the same classifier architecture): its deltas of the same Linear weights, compared with ours
  (both are the exact SVD at rank r, so they must agree) and scored the same way;
- ``lora_refined``: the ``lora_svd`` factors distilled (as ``tt_refined``, the same budget);
- ``tt_svd``: TT cores by TT-SVD of those factors (``extract --to tt --fit-steps 0``);
- ``tt_fit``: the same cores, then fitted by alternating least squares to the delta itself
  (``tt_module(..., fit_to="delta")``), kept only where the measured delta error is lower;
- ``tt_refined``: the ``tt_fit`` cores of every module distilled together towards the
  fine-tune's logits on the training texts, labels unused
  (``converters.refine.distill_modules``, what ``extract --refine-data`` runs: KL, Adam, a
  time budget and a step cap per budget).

Each TT budget uses the largest TT rank whose parameters stay at or under the LoRA's at
rank r (the same inner width r): equal parameters, the budget's x value. Every Linear weight
of the encoder is a target (all-linear: a full fine-tune changed them all); the changed norms,
biases and the classifier head are carried whole and counted in every extracted model's
parameters; the embeddings are taken from the base (carrying the changed 11.7 M-entry word
embedding would dwarf every adapter), and the reference ``full_base_embeddings`` says what
that alone costs. Directly trained references (``head``, ``lora``, ``rep``) and TF-IDF + LR
are read from ``benchmarks/results/train_demo.json`` (that file's run, not re-run here).

Resize (``--no-resize`` skips it): a PEFT LoRA trained at rank 32 (``lora_alpha`` 64, the
default targets query and value, the same budget; its learning rate chosen on validation),
scored, then resized by rank and by energy with ``convert resize``
(``converters.resize.resize``) and with PEFT's ``convert_to_lora`` at the same ranks and
thresholds (it accepts a LoRA); every copy is scored, and PEFT's ranks and deltas are
compared with ours. The LoRA trained directly at rank 8 comes from train_demo.json.

    python benchmarks/bench_extract_accuracy.py            # benchmarks/results/extract_accuracy.json + .png
    python benchmarks/bench_extract_accuracy.py --smoke --out /tmp/ea.json   # for CI (no mergekit)
    python benchmarks/bench_extract_accuracy.py --replot benchmarks/results/extract_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import measuring  # noqa: E402

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

from bench_train import BUDGETS, make_split, describe_split, mean_pooling_callback, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DEMO = ROOT / "benchmarks" / "results" / "train_demo.json"
LR_GRID = [2e-5, 5e-5, 1e-4]
RANKS = [1, 2, 4, 8]
# ALS where a core's map is small (its (size, size) systems stay cheap), else Adam steps: at
# extract's default cap one 384x384 module at rank 8 took two minutes of ALS on this machine,
# and at rank 4 sixteen seconds for a 1.6 % lower delta error
ALS_MAX_ENTRIES = 300_000
FIT_STEPS = 150
STAGES = ("lora_svd", "lora_refined", "tt_svd", "tt_fit", "tt_refined", "mergekit")
REFINED = {"lora_refined": "lora_svd", "tt_refined": "tt_fit"}   # distilled stage -> its start
# the large LoRA, resized: bench_train's LoRA grid for rank 8 was chosen at its low edge
# (2e-3), so this one goes lower
LORA_BIG = 32
LORA_LR_GRID = [5e-4, 1e-3, 2e-3]
RESIZE_RANKS = [16, 8, 4, 2]
RESIZE_ENERGIES = [0.9, 0.95, 0.99]


# ----------------------------------------------------------------------- fine-tuning


def full_finetune(files: dict, out: Path, *, lr: float, budget: dict, seed: int = 0) -> dict:
    """One full fine-tune through the library's training API, scored on ``files['val']``;
    an existing run in ``out`` with the same key is reused (``--work`` keeps them)."""
    from loretta_merge.train import train

    key = {"lr": lr, "seed": seed, **budget}
    stamp = out / "bench_key.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return {**json.loads(stamp.read_text())["result"], "reused": True}
    rep = train(model=None, method="full", train_file=files["train"], eval_file=files["val"],
                output_dir=out, epochs=budget["epochs"], batch_size=budget["batch_size"],
                learning_rate=lr, max_length=budget["max_length"], max_steps=budget["max_steps"],
                seed=seed, eval_split=0.0, progress=False, eval_before=False, force=True,
                save_steps=10**9, callbacks=[mean_pooling_callback()])
    result = {"lr": lr, "val_accuracy": rep.metrics_after["accuracy"], "steps": rep.steps,
              "trainable_params": rep.trainable_params, "train_time_s": rep.train_time_s,
              "step_time_s": rep.step_time_s}
    stamp.write_text(json.dumps({"key": key, "result": result}))
    return result


def lora_finetune(files: dict, out: Path, *, lr: float, r: int, budget: dict, seed: int = 0) -> dict:
    """One PEFT LoRA run at rank ``r`` (``lora_alpha = 2 r``: the scale 2 of bench_train's
    rank-8 LoRA, so its learning-rate grid carries over) on the architecture's default
    targets (query, value: bench_train's), scored on ``files['val']``; reused like
    :func:`full_finetune`."""
    from loretta_merge.train import train

    key = {"lr": lr, "r": r, "lora_alpha": 2 * r, "seed": seed, **budget}
    stamp = out / "bench_key.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return {**json.loads(stamp.read_text())["result"], "reused": True}
    rep = train(model=None, method="lora", r=r, lora_alpha=2.0 * r, train_file=files["train"],
                eval_file=files["val"], output_dir=out, epochs=budget["epochs"],
                batch_size=budget["batch_size"], learning_rate=lr, max_length=budget["max_length"],
                max_steps=budget["max_steps"], seed=seed, eval_split=0.0, progress=False,
                eval_before=False, force=True, save_steps=10**9, callbacks=[mean_pooling_callback()])
    result = {"lr": lr, "r": r, "lora_alpha": 2 * r, "val_accuracy": rep.metrics_after["accuracy"],
              "steps": rep.steps, "trainable_params": rep.trainable_params,
              "adapter_params": rep.adapter_params, "train_time_s": rep.train_time_s}
    stamp.write_text(json.dumps({"key": key, "result": result}))
    return result


# ----------------------------------------------------------------------- scoring


class Scorer:
    """The fine-tuned classifier, tokenized test texts, and accuracy of any state dict."""

    def __init__(self, ft_dir: Path, rows: list[dict], *, max_length: int):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from loretta_merge.pooling import apply_pooling

        self.model = apply_pooling(AutoModelForSequenceClassification.from_pretrained(
            str(ft_dir))).eval()
        tok = AutoTokenizer.from_pretrained(str(ft_dir))
        self.batches = []
        for i in range(0, len(rows), 64):
            part = rows[i:i + 64]
            enc = tok([r["text"] for r in part], truncation=True, max_length=max_length,
                      padding=True, return_tensors="pt")
            self.batches.append((enc, torch.tensor([r["label"] for r in part])))
        self.ft_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.tok = tok

    def tokenized(self, texts: list[str], *, batch: int, max_length: int) -> list[dict]:
        return [dict(self.tok(texts[i:i + batch], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")) for i in range(0, len(texts), batch)]

    def accuracy(self, changes: dict | None = None) -> float:
        """Test accuracy of the fine-tune with ``changes`` (key -> tensor) written over it."""
        import torch

        state = {**self.ft_state, **(changes or {})}
        self.model.load_state_dict(state)
        right = total = 0
        with torch.no_grad():
            for enc, y in self.batches:
                right += int((self.model(**enc).logits.argmax(-1) == y).sum())
                total += len(y)
        return right / total


def base_state(num_labels: int = 2) -> dict:
    """The base's weights under the classifier's key names (MiniLM as a classifier)."""
    from transformers import AutoModelForSequenceClassification

    from loretta_merge.embedded import default_model_path

    net = AutoModelForSequenceClassification.from_pretrained(str(default_model_path()),
                                                             num_labels=num_labels)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def split_tensors(ft: dict, base: dict, *, layers: int | None) -> tuple[list[str], list[str], list[str]]:
    """(targets: changed encoder Linear weights; carried: other changed tensors but the
    embeddings; embeddings: changed embedding tables)."""
    targets, carried, emb = [], [], []
    for k, t in ft.items():
        if k not in base or torch_equal(t, base[k]):
            continue
        if "embeddings" in k and t.ndim == 2:
            emb.append(k)
        elif t.ndim == 2 and ".encoder.layer." in k and k.endswith(".weight"):
            if layers is None or int(k.split(".encoder.layer.")[1].split(".")[0]) < layers:
                targets.append(k)
            else:
                carried.append(k)
        else:
            carried.append(k)
    return targets, carried, emb


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


# ----------------------------------------------------------------------- extraction


def lora_factors(d, r: int):
    """Truncated SVD of ``d (out, in)`` as LoRA factors (scale 1): the ``extract`` route."""
    import torch

    from loretta_merge.formats import LoraModule

    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    root = s[:r].sqrt()
    return LoraModule(a=(root[:, None] * vh[:r]).contiguous(), b=(u[:, :r] * root).contiguous(),
                      scale=1.0)


def tt_at_budget(key: str, lora, d, *, fit: bool) -> tuple:
    """The TT module with the largest TT rank whose parameters stay <= the LoRA's
    (``r * (in + out)``); returns (module, tensor_rank, err_tt_svd, err_fit or None, how)."""
    from loretta_merge.converters.extract import tt_module

    limit = lora.a.numel() + lora.b.numel()
    made = {}

    def at(tr: int):
        if tr not in made:
            made[tr] = tt_module(key, lora, d, tensor_rank=tr, shapes="paper", fit_steps=0)[:2]
        return made[tr]

    lo, hi = 1, 64          # parameters never fall as the TT rank grows: bisect
    if at(hi)[0].num_params() <= limit:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid)[0].num_params() <= limit else (lo, mid)
    best = (lo, *at(lo))  # at TT rank 1 even over the limit: kept, its count reported as is
    tr, m0, e_svd = best
    if not fit:
        return m0, tr, e_svd, None, "tt-svd"
    m1, _, e_fit, how = tt_module(key, lora, d, tensor_rank=tr, shapes="paper", fit_steps=FIT_STEPS,
                                  fit_to="delta", als_max_entries=ALS_MAX_ENTRIES)
    return m1, tr, e_svd, e_fit, how


def extract_stage(stage: str, r: int, ft: dict, base: dict, targets: list[str], log) -> tuple[dict, dict]:
    """(changes over the fine-tune, record) for one stage at LoRA rank ``r``."""
    changes, params, errs, trs, secs = {}, 0, [], [], time.perf_counter()
    modules = {}
    for key in targets:
        d = ft[key].float() - base[key].float()
        lora = lora_factors(d, min(r, *d.shape))
        if stage == "lora_svd":
            approx = lora.b @ lora.a
            params += lora.a.numel() + lora.b.numel()
            modules[key.removesuffix(".weight")] = lora
        else:
            m, tr, e_svd, e_fit, how = tt_at_budget(key, lora, d, fit=stage == "tt_fit")
            approx = m.delta().T
            params += m.num_params()
            modules[key.removesuffix(".weight")] = m
            trs.append(tr)
        errs.append(float((d - approx).norm() / d.norm()))
        changes[key] = base[key] + approx.to(base[key].dtype)
    rec = {"stage": stage, "rank": r, "module_params": params,
           "delta_rel_error_mean": sum(errs) / len(errs), "seconds": round(time.perf_counter() - secs, 1)}
    if trs:
        rec["tensor_ranks"] = sorted(set(trs))
    log(f"  {stage} r={r}: {params:,} module params, mean delta error {rec['delta_rel_error_mean']:.3f}, "
        f"{rec['seconds']} s")
    return changes, rec, modules


def refine_stage(stage: str, r: int, modules: dict, base: dict, scorer, emb_reset: dict,
                 unlabelled: list, *, seconds: float, max_steps: int, log) -> tuple[dict, dict]:
    """``stage``'s starting modules (``REFINED``: the LoRA SVD factors, or the fitted TT
    cores) distilled towards the fine-tune's logits on unlabelled training texts (labels never
    read), the student with the base's embeddings as scored; the same budget for both."""
    from loretta_merge.converters.refine import distill_modules

    model = scorer.model
    model.load_state_dict(scorer.ft_state)            # the teacher: the fine-tune itself
    import torch

    with torch.no_grad():
        teacher = [model(**b).logits for b in unlabelled]
    model.load_state_dict({**scorer.ft_state, **emb_reset})
    t = time.perf_counter()
    refined, rep = distill_modules(
        model, modules, {n: base[n + ".weight"] for n in modules}, unlabelled,
        teacher_outputs=teacher, seconds=seconds, max_steps=max_steps, lr=1e-3, progress=True)
    changes, params, errs = {}, 0, []
    for name, m in refined.items():
        key = name + ".weight"
        d = scorer.ft_state[key].float() - base[key].float()
        approx = m.delta().T
        params += m.num_params()
        errs.append(float((d - approx).norm() / d.norm()))
        changes[key] = base[key] + approx.to(base[key].dtype)
    rec = {"stage": stage, "rank": r, "module_params": params,
           "delta_rel_error_mean": sum(errs) / len(errs), "seconds": round(time.perf_counter() - t, 1),
           "distill": {"steps": rep.steps, "seconds": round(rep.seconds, 1), "stopped_by": rep.stopped_by,
                       "kl_first": rep.loss_first, "kl_last": rep.loss_last, "lr": 1e-3,
                       "batch_size": unlabelled[0]["input_ids"].shape[0] if unlabelled else None,
                       "texts": "the training rows' texts, labels unused"}}
    log(f"  {stage} r={r}: {rep.steps} steps in {rep.seconds:.0f} s, KL {rep.loss_first:.4f} -> "
        f"{rep.loss_last:.4f}")
    return changes, rec


# ----------------------------------------------------------------------- mergekit


def save_base_classifier(out: Path) -> Path:
    """The base as the fine-tune's architecture (BertForSequenceClassification; a fresh head,
    which changed anyway), for tools that take two checkpoints of one architecture."""
    from transformers import AutoModelForSequenceClassification

    from loretta_merge.embedded import default_model_path

    if not (out / "model.safetensors").is_file():
        AutoModelForSequenceClassification.from_pretrained(str(default_model_path()), num_labels=2
                                                           ).save_pretrained(out)
    return out


def _peft_deltas(state: dict, config: dict, targets: list[str]) -> dict:
    """``{weight key: scale * B @ A}`` of the ``targets`` from a PEFT LoRA state dict (keys
    ``base_model.model.<module>.lora_A.weight``), its scale from ``config``'s alpha/rank
    patterns (exact module names) or ``lora_alpha / r``."""
    out = {}
    for key in targets:
        mod = key.removesuffix(".weight")
        a = state[f"base_model.model.{mod}.lora_A.weight"].float()
        b = state[f"base_model.model.{mod}.lora_B.weight"].float()
        short = mod.rsplit(".", 1)[-1]
        r = config.get("rank_pattern", {}).get(mod, config.get("rank_pattern", {}).get(short, config["r"]))
        alpha = config.get("alpha_pattern", {}).get(mod, config.get("alpha_pattern", {}).get(
            short, config["lora_alpha"]))
        out[key] = b @ a * (alpha / r)
    return out


def mergekit_stage(r: int, ft_dir: Path, base_dir: Path, work: Path, ft: dict, base: dict,
                   targets: list[str], ours: dict, log) -> tuple[dict, dict]:
    """``mergekit-extract-lora --max-rank r`` on the same fine-tune (its pooler excluded: the
    mean-pooled fine-tune has none), its deltas compared with our exact-SVD LoRA at rank r
    (``ours``: key -> LoraModule), and applied like ours (same carried tensors)."""
    import subprocess

    from safetensors.torch import load_file

    exe = Path(sys.executable).with_name("mergekit-extract-lora")
    if not exe.exists():
        raise SystemExit(f"{exe} is missing: `pip install -e '.[test]'` brings mergekit, or drop "
                         f"the mergekit stage (--stages)")
    out = work / f"mergekit-r{r}"
    t = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([str(exe), "--model", str(ft_dir.resolve()), "--base-model", str(base_dir.resolve()),
                           "--out-path", str(out), "--max-rank", str(r), "-e", "pooler"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out / "adapter_model.safetensors").is_file():
        raise SystemExit(f"mergekit-extract-lora failed at rank {r}: {proc.stderr[-1500:]}")
    secs = time.perf_counter() - t
    deltas = _peft_deltas(load_file(out / "adapter_model.safetensors"),
                          json.loads((out / "adapter_config.json").read_text()), targets)
    changes, params, errs, diffs = {}, 0, [], []
    for key in targets:
        d = ft[key].float() - base[key].float()
        mk = deltas[key]
        us = ours[key.removesuffix(".weight")]
        diffs.append(float((mk - us.b @ us.a).norm() / (us.b @ us.a).norm()))
        errs.append(float((d - mk).norm() / d.norm()))
        params += r * sum(d.shape)
        changes[key] = base[key] + mk.to(base[key].dtype)
    rec = {"stage": "mergekit", "rank": r, "module_params": params,
           "delta_rel_error_mean": sum(errs) / len(errs), "seconds": round(secs, 1),
           "vs_lora_svd": {"max_rel_diff": max(diffs), "mean_rel_diff": sum(diffs) / len(diffs),
                           "what": "||mergekit delta - our exact-SVD delta|| / ||ours||, per module"},
           "tool": "mergekit-extract-lora --max-rank r -e pooler (its LoRA deltas of the same "
                   "Linear weights; everything else carried as for ours)"}
    log(f"  mergekit r={r}: {secs:.0f} s; delta vs ours: max relative difference {max(diffs):.2e}")
    return changes, rec


# ----------------------------------------------------------------------- resize


def lora_changes(adapter, base: dict, ft_state: dict) -> tuple[dict, int]:
    """A LoRA ``Adapter`` (read from PEFT files) as weights over the base: every key the
    scorer's model holds from the base, the adapter's carried tensors (the head) and
    ``base + scale B A`` per module; with its parameter count (factors + carried)."""
    missing = [k for k in ft_state if k not in base]
    if missing:
        raise SystemExit(f"{missing[0]}: in the fine-tune but not in the base classifier")
    changes = {k: base[k] for k in ft_state}
    params = 0
    for name, t in adapter.tensors.items():
        changes[name] = t.to(base[name].dtype)
        params += t.numel()
    for name, m in adapter.modules.items():
        key = name + ".weight"
        changes[key] = base[key] + m.delta().T.to(base[key].dtype)
        params += m.a.numel() + m.b.numel()
    return changes, params


def _ranks(adapter) -> dict:
    ks = [m.a.shape[0] for m in adapter.modules.values()]
    return {"min": min(ks), "max": max(ks), "mean": round(sum(ks) / len(ks), 2)}


def resize_section(files: dict, work: Path, base: dict, base_dir: Path, scorer, budget: dict, *,
                   lrs: list[float], big: int, ranks: list[int], energies: list[float], log) -> dict:
    """A LoRA trained at rank ``big`` (learning rate chosen on validation), scored, then
    resized by rank and by energy with ``convert resize`` (``converters.resize.resize``) and
    with PEFT's ``convert_to_lora`` at the same ranks and thresholds, every one scored; the
    two tools' deltas compared where they coincide (exact SVD, same rank)."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from loretta_merge.converters.resize import resize
    from loretta_merge.formats import read_adapter

    with measuring() as machine:
        sweep = [lora_finetune(files, work / f"lora-r{big}-lr{lr:g}", lr=lr, r=big, budget=budget)
                 for lr in lrs]
    for res in sweep:
        log(f"lora r{big} lr {res['lr']:g}: validation accuracy {res['val_accuracy']:.4f}")
    best = max(sweep, key=lambda x: x["val_accuracy"])
    lora_dir = work / f"lora-r{big}-lr{best['lr']:g}"
    src = read_adapter(lora_dir)
    out = {"trained": {"rank": big, "lora_alpha": 2 * big, "lr_grid": lrs, "sweep": sweep,
                       "chosen_lr": best["lr"], "targets": sorted(src.modules)[:2] + ["..."],
                       "machine_state": machine}, "rows": []}
    ft_state = scorer.ft_state
    with measuring() as machine:
        changes, params = lora_changes(src, base, ft_state)
        out["trained"].update(test_accuracy=scorer.accuracy(changes), params=params)
    log(f"lora r{big}: test {out['trained']['test_accuracy']:.4f} at {params:,} parameters")
    # PEFT: the trained LoRA loaded on the base classifier, converted by convert_to_lora
    net = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=2)
    peft_model = peft.PeftModel.from_pretrained(net, str(lora_dir))
    targets = [n + ".weight" for n in src.modules]
    for how, values in (("rank", ranks), ("energy", energies)):
        for v in values:
            with measuring() as machine:
                ours, rep = resize(src, **{how: v})
                changes, params = lora_changes(ours, base, ft_state)
                row = {"by": how, "value": v, "tool": "loretta-merge convert resize",
                       "ranks": _ranks(ours), "params": params,
                       "seconds": round(rep.seconds, 2), "test_accuracy": scorer.accuracy(changes)}
            row["machine_state"] = machine
            out["rows"].append(row)
            log(f"  resize --{how} {v}: ranks {row['ranks']}, {params:,} params, test "
                f"{row['test_accuracy']:.4f}")
            import warnings

            with measuring() as machine, warnings.catch_warnings():
                warnings.simplefilter("ignore")       # "already a LoRA adapter": known, intended
                t = time.perf_counter()
                cfg, state = peft.convert_to_lora(peft_model, int(v) if how == "rank" else float(v))
                secs = time.perf_counter() - t
                cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
                state = {k if k.startswith("base_model.model.") else "base_model.model." + k: t_
                         for k, t_ in state.items()}
                theirs = _peft_deltas(state, cfg, targets)
                pchanges = {k: base[k] for k in ft_state}
                pchanges.update({k: t_.to(base[k].dtype) for k, t_ in src.tensors.items()})
                diffs, ks = [], []
                for key in targets:
                    name = key.removesuffix(".weight")
                    pchanges[key] = base[key] + theirs[key].to(base[key].dtype)
                    mine = ours.modules[name].delta().T
                    diffs.append(float((theirs[key] - mine).norm() / mine.norm()))
                    ks.append(state[f"base_model.model.{name}.lora_A.weight"].shape[0])
                pparams = sum(k * sum(base[key].shape) for k, key in zip(ks, targets)) + sum(
                    t_.numel() for t_ in src.tensors.values())
                prow = {"by": how, "value": v, "tool": f"peft {peft.__version__} convert_to_lora",
                        "ranks": {"min": min(ks), "max": max(ks), "mean": round(sum(ks) / len(ks), 2)},
                        "params": pparams, "seconds": round(secs, 2),
                        "same_ranks_as_ours": ks == [ours.modules[n.removesuffix('.weight')].a.shape[0]
                                                     for n in targets],
                        "vs_ours": {"max_rel_diff": max(diffs), "mean_rel_diff": sum(diffs) / len(diffs)},
                        "test_accuracy": scorer.accuracy(pchanges)}
            prow["machine_state"] = machine
            out["rows"].append(prow)
            log(f"  peft convert_to_lora {v}: ranks {prow['ranks']}, delta vs ours max "
                f"{max(diffs):.2e}, test {prow['test_accuracy']:.4f}")
    return out


# ----------------------------------------------------------------------- references


def references() -> dict:
    """Directly trained points and TF-IDF + LR from train_demo.json (read, not re-run)."""
    if not TRAIN_DEMO.is_file():
        return {}
    demo = json.loads(TRAIN_DEMO.read_text())
    out = {"source": f"{TRAIN_DEMO.relative_to(ROOT)} (read from that file's run, not re-run here)"}
    for m in ("head", "lora", "rep"):
        r = demo.get("finetuned", {}).get(m, {})
        if "test_accuracy_mean" in r:
            out[m] = {"test_accuracy": r["test_accuracy_mean"], "test_accuracy_std": r["test_accuracy_std"],
                      "trainable_params": r["trainable_params"], "seeds": r.get("seeds")}
    tf = demo.get("baselines", {}).get("tfidf_lr", {})
    if "test_accuracy" in tf:
        out["tfidf_lr"] = {"test_accuracy": tf["test_accuracy"], "trainable_params": tf["trainable_params"]}
    return out


# ----------------------------------------------------------------------- output


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    styles = {"lora_svd": ("o-", "LoRA extraction (SVD)"),
              "lora_refined": ("D-", "LoRA extraction + distillation"),
              "tt_svd": ("s--", "TT extraction (TT-SVD of factors)"),
              "tt_fit": ("^-", "TT extraction (ALS fit to the delta)"),
              "tt_refined": ("v-", "TT extraction + distillation"),
              "mergekit": ("1", "mergekit-extract-lora")}
    for stage, (fmt, label) in styles.items():
        pts = sorted((e["params"], e["test_accuracy"]) for e in results["extracted"] if e["stage"] == stage)
        if pts:
            ax.plot(*zip(*pts), fmt, label=label)
    rs = results.get("resize")
    if rs:
        big = rs["trained"]
        ax.plot(big["params"], big["test_accuracy"], "h", ms=8, color="tab:purple",
                label=f"LoRA r {big['rank']} trained, then resized:")
        for (tool, by), (fmt, color) in {("loretta", "rank"): ("h:", "tab:purple"),
                                         ("loretta", "energy"): ("H", "tab:pink"),
                                         ("peft", "rank"): ("+", "black"),
                                         ("peft", "energy"): ("x", "tab:pink")}.items():
            pts = sorted((e["params"], e["test_accuracy"]) for e in rs["rows"]
                         if e["by"] == by and e["tool"].startswith(tool))
            if pts:
                ax.plot(*zip(*pts), fmt, color=color, ms=7,
                        label=f"  by {by}, {'convert resize' if tool == 'loretta' else 'PEFT convert_to_lora'}")
    refs = results["references"]
    for m, mark in (("lora", "P"), ("rep", "*"), ("head", "x")):
        if m in refs.get("direct", {}):
            r = refs["direct"][m]
            ax.plot(r["trainable_params"], r["test_accuracy"], mark, ms=9, color="black",
                    label=f"{m} trained directly (train_demo.json)")
    for name, ls in (("full", "-"), ("full_base_embeddings", ":")):
        if name in refs:
            ax.axhline(refs[name]["test_accuracy"], color="tab:red", ls=ls, lw=1, label=name.replace("_", " "))
    if "tfidf_lr" in refs.get("direct", {}):
        ax.axhline(refs["direct"]["tfidf_lr"]["test_accuracy"], color="grey", ls="--", lw=1, label="TF-IDF + LR")
    ax.set_xscale("log")
    ax.set_xlabel("parameters of the adapter (modules + carried norms, biases, head; log scale)")
    ax.set_ylabel("test accuracy (test movies)")
    ax.set_title("MiniLM full fine-tune extracted, Rotten Tomatoes, budget demo" if results["extracted"]
                 else "MiniLM LoRA trained at a large rank, then resized, Rotten Tomatoes, budget demo",
                 fontsize=9)
    ax.legend(fontsize=6.5, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(results: dict, path: Path, *, with_plot: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(results, indent=1))
    os.replace(part, path)
    if with_plot:
        plot(results, path.with_suffix(".png"))


def summary(results: dict) -> dict:
    """Per rank: each stage's accuracy, TT minus LoRA at equal parameters (each TT stage
    against the LoRA SVD, the distilled TT against the distilled LoRA)."""
    out = {}
    for e in results["extracted"]:
        out.setdefault(str(e["rank"]), {})[e["stage"]] = e["test_accuracy"]
    for r, row in out.items():
        if "lora_svd" in row:
            for s in ("tt_svd", "tt_fit", "tt_refined", "mergekit"):
                if s in row:
                    row[f"{s}_minus_lora_points"] = round(100 * (row[s] - row["lora_svd"]), 2)
        if "lora_refined" in row and "tt_refined" in row:   # like for like: both distilled
            row["tt_refined_minus_lora_refined_points"] = round(
                100 * (row["tt_refined"] - row["lora_refined"]), 2)
    return out


# ----------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny split, 2 steps, one rank, "
                    "the first encoder layer's modules only")
    ap.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    ap.add_argument("--lr", type=float, nargs="+", default=LR_GRID)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--no-resize", dest="resize", action="store_false",
                    help="skip the resize part (a LoRA trained at --lora-rank, resized)")
    ap.add_argument("--only-resize", action="store_true",
                    help="the resize part alone (no extraction; default output "
                         "benchmarks/results/extract_resize.json)")
    ap.add_argument("--lora-rank", type=int, default=LORA_BIG)
    ap.add_argument("--lora-lr", type=float, nargs="+", default=LORA_LR_GRID)
    ap.add_argument("--resize-ranks", type=int, nargs="+", default=RESIZE_RANKS)
    ap.add_argument("--resize-energies", type=float, nargs="+", default=RESIZE_ENERGIES)
    ap.add_argument("--threads", type=int, default=2)
    # a step count, not a time budget, decides: LoRA and TT get the same effort on any load
    ap.add_argument("--distill-seconds", type=float, default=900.0,
                    help="*_refined: time budget of each distillation (a safety net)")
    ap.add_argument("--distill-steps", type=int, default=100,
                    help="*_refined: this many steps (batch 16 unlabelled texts)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the fine-tunes here and reuse them on a later run (default: a "
                         "temporary directory)")
    ap.add_argument("--out", "--output", dest="output", type=Path,
                    help="JSON path (the plot beside it); default benchmarks/results/extract_accuracy.json")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--replot", type=Path, default=None,
                    help="only draw the plot of an existing result JSON (beside it)")
    args = ap.parse_args(argv)
    if args.replot:
        return args
    if any(r < 1 for r in args.ranks + args.resize_ranks) or any(lr <= 0 for lr in args.lr + args.lora_lr):
        ap.error("--ranks, --resize-ranks, --lr and --lora-lr take positive values")
    if any(not 0 < e <= 1 for e in args.resize_energies):
        ap.error("--resize-energies take values in (0, 1]")
    if any(k >= args.lora_rank for k in args.resize_ranks):
        ap.error(f"--resize-ranks must be below --lora-rank {args.lora_rank}")
    if args.smoke:   # mergekit alone loads both models for 25+ s: not in the smoke run
        args.stages = [s for s in args.stages if s != "mergekit"]
        args.ranks, args.lr, args.lora_lr = args.ranks[:1], args.lr[-1:], args.lora_lr[-1:]
        args.lora_rank, args.resize_ranks, args.resize_energies = 4, [2], [0.9]
        args.distill_steps, args.distill_seconds = 1, 5.0
        args.threads = 1  # figures unread; two threads on a busy machine only spin
    if args.only_resize:
        if not args.resize:
            ap.error("--only-resize and --no-resize exclude each other")
        args.ranks = []
    name = "extract_resize" if args.only_resize else "extract_accuracy"
    args.output = args.output or ROOT / "benchmarks" / "results" / (
        f"{name}_smoke.json" if args.smoke else f"{name}.json")
    if args.output.exists() and not args.force:
        ap.error(f"{args.output} exists; pass --force or choose another --out")
    return args


def main(argv=None) -> int:
    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    t_start = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    budget = dict(BUDGETS["smoke" if args.smoke else "demo"])
    split, _ = make_split(val_movies=50, train_rows=budget["train_rows"], smoke=args.smoke)
    tmp = tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    files = {p: write_jsonl(rows, work / f"{p}.jsonl") for p, rows in split.items() if p != "test"}
    results = {"benchmark": "extract_accuracy", "command": " ".join(["python", *sys.argv]),
               "budget": budget, "split": describe_split(split), "lr_grid": args.lr,
               "ranks": args.ranks, "smoke": args.smoke, "distill_seconds": args.distill_seconds,
               "distill_max_steps": args.distill_steps, "distill_lr": 1e-3, "extracted": [],
               "complete": False}
    # 1. full fine-tunes, learning rate chosen on validation
    with measuring() as machine:
        sweep = []
        for lr in args.lr:
            res = full_finetune(files, work / f"full-lr{lr:g}", lr=lr, budget=budget)
            sweep.append(res)
            log(f"full lr {lr:g}: validation accuracy {res['val_accuracy']:.4f}")
    best = max(sweep, key=lambda r: r["val_accuracy"])
    ft_dir = work / f"full-lr{best['lr']:g}"
    results["finetune"] = {"sweep": sweep, "chosen_lr": best["lr"], "machine_state": machine}
    # 2. the pieces: fine-tune, base, what changed
    scorer = Scorer(ft_dir, split["test"], max_length=budget["max_length"])
    ft = scorer.ft_state
    base = base_state()
    targets, carried, emb = split_tensors(ft, base, layers=1 if args.smoke else None)
    if args.smoke:  # two modules extracted, the rest of the layer carried whole
        carried, targets = carried + targets[2:], targets[:2]
    carried_params = sum(ft[k].numel() for k in carried)
    emb_reset = {k: base[k] for k in emb}
    results["tensors"] = {"targets": len(targets), "target_params": sum(ft[k].numel() for k in targets),
                          "carried": len(carried), "carried_params": carried_params,
                          "embeddings_from_base": emb, "embedding_params": sum(ft[k].numel() for k in emb)}
    refs = {"direct": references()}
    results["references"] = refs
    if args.ranks:   # --only-resize: no extraction, so no extraction references
        with measuring() as machine:
            refs["full"] = {"test_accuracy": scorer.accuracy(), "params": best["trainable_params"]}
            refs["full_base_embeddings"] = {"test_accuracy": scorer.accuracy(emb_reset)}
            refs["no_linear_delta"] = {"test_accuracy": scorer.accuracy(
                {**emb_reset, **{k: base[k] for k in targets}}), "params": carried_params,
                "what": "base Linear weights and embeddings; the changed norms, biases and head"}
        refs["machine_state"] = machine
        log(f"full fine-tune: test {refs['full']['test_accuracy']:.4f}; base embeddings "
            f"{refs['full_base_embeddings']['test_accuracy']:.4f}; no Linear delta "
            f"{refs['no_linear_delta']['test_accuracy']:.4f}")
    # 3. extraction at each budget and stage, each scored once on the test movies
    unlabelled = scorer.tokenized([r["text"] for r in split["train"]], batch=16,
                                  max_length=budget["max_length"])
    started = {}                       # (stage, rank) -> modules, the starts of distillation
    base_dir = save_base_classifier(work / "base-cls") if "mergekit" in args.stages or args.resize else None
    for r in args.ranks:
        for stage in args.stages:
            with measuring() as machine:
                if stage in REFINED:
                    start = REFINED[stage]
                    if (start, r) not in started:
                        _, _, started[start, r] = extract_stage(start, r, ft, base, targets, log)
                    changes, rec = refine_stage(stage, r, started[start, r], base, scorer, emb_reset,
                                                unlabelled, seconds=args.distill_seconds,
                                                max_steps=args.distill_steps, log=log)
                elif stage == "mergekit":
                    if ("lora_svd", r) not in started:
                        _, _, started["lora_svd", r] = extract_stage("lora_svd", r, ft, base, targets, log)
                    changes, rec = mergekit_stage(r, ft_dir, base_dir, work, ft, base, targets,
                                                  started["lora_svd", r], log)
                else:
                    changes, rec, mods = extract_stage(stage, r, ft, base, targets, log)
                    started[stage, r] = mods
                rec["test_accuracy"] = scorer.accuracy({**emb_reset, **changes})
            rec["params"] = rec["module_params"] + carried_params
            rec["machine_state"] = machine
            results["extracted"].append(rec)
            log(f"  -> test accuracy {rec['test_accuracy']:.4f} at {rec['params']:,} parameters")
            results["summary"] = summary(results)
            save(results, args.output, with_plot=False)
    # 4. a large LoRA trained directly, resized by rank and by energy (ours and PEFT's)
    if args.resize:
        results["resize"] = resize_section(
            files, work, base, base_dir, scorer, budget, lrs=args.lora_lr, big=args.lora_rank,
            ranks=args.resize_ranks, energies=args.resize_energies, log=log)
        save(results, args.output, with_plot=False)
    results["complete"] = True
    results["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    results["summary"] = summary(results)
    save(results, args.output)
    log(f"wrote {args.output} in {results['wall_time_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
