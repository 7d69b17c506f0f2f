"""What extraction costs, measured on real data (issue 26, part 3).

One run: the embedded MiniLM is fully fine-tuned (``train(method="full")``) on the embedded
Rotten Tomatoes split of ``bench_train.py`` (its ``make_split``: movie-disjoint train /
validation / test, the ``demo`` budget: 2,000 training rows, 1 epoch, batch 8, max length
64, mean pooling); the learning rate is chosen on the validation movies from a small grid.
The chosen fine-tune is then extracted at several budgets and every extracted model is
scored once on the test movies:

- ``lora_svd``: the truncated SVD of each delta at rank r (what ``extract --to lora`` computes);
- ``tt_svd``: TT cores by TT-SVD of those factors (``extract --to tt --fit-steps 0``);
- ``tt_fit``: the same cores, then fitted by alternating least squares to the delta itself
  (``tt_module(..., fit_to="delta")``), kept only where the measured delta error is lower;
- ``tt_refined``: the ``tt_fit`` cores of every module distilled together towards the
  fine-tune's logits on the training texts, labels unused
  (``converters.refine.distill_modules``: KL, Adam, a time budget per budget).

Each TT budget uses the largest TT rank whose parameters stay at or under the LoRA's at
rank r (the same inner width r): equal parameters, the budget's x value. Every Linear weight
of the encoder is a target (all-linear: a full fine-tune changed them all); the changed norms,
biases and the classifier head are carried whole and counted in every extracted model's
parameters; the embeddings are taken from the base (carrying the changed 11.7 M-entry word
embedding would dwarf every adapter), and the reference ``full_base_embeddings`` says what
that alone costs. Directly trained references (``head``, ``lora``, ``rep``) and TF-IDF + LR
are read from ``benchmarks/results/train_demo.json`` (that file's run, not re-run here).

    python benchmarks/bench_extract_accuracy.py            # benchmarks/results/extract_accuracy.json + .png
    python benchmarks/bench_extract_accuracy.py --smoke --out /tmp/ea.json   # seconds, for CI
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
STAGES = ("lora_svd", "tt_svd", "tt_fit", "tt_refined")


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


def refine_stage(r: int, modules: dict, base: dict, scorer, emb_reset: dict, unlabelled: list,
                 *, seconds: float, max_steps: int, log) -> tuple[dict, dict]:
    """The ``tt_fit`` modules distilled towards the fine-tune's logits on unlabelled training
    texts (labels never read), the student with the base's embeddings as scored."""
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
    rec = {"stage": "tt_refined", "rank": r, "module_params": params,
           "delta_rel_error_mean": sum(errs) / len(errs), "seconds": round(time.perf_counter() - t, 1),
           "distill": {"steps": rep.steps, "seconds": round(rep.seconds, 1), "stopped_by": rep.stopped_by,
                       "kl_first": rep.loss_first, "kl_last": rep.loss_last, "lr": 1e-3,
                       "batch_size": unlabelled[0]["input_ids"].shape[0] if unlabelled else None,
                       "texts": "the training rows' texts, labels unused"}}
    log(f"  tt_refined r={r}: {rep.steps} steps in {rep.seconds:.0f} s, KL {rep.loss_first:.4f} -> "
        f"{rep.loss_last:.4f}")
    return changes, rec


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
    styles = {"lora_svd": ("o-", "LoRA extraction (SVD)"), "tt_svd": ("s--", "TT extraction (TT-SVD of factors)"),
              "tt_fit": ("^-", "TT extraction (ALS fit to the delta)"),
              "tt_refined": ("v-", "TT extraction + distillation")}
    for stage, (fmt, label) in styles.items():
        pts = sorted((e["params"], e["test_accuracy"]) for e in results["extracted"] if e["stage"] == stage)
        if pts:
            ax.plot(*zip(*pts), fmt, label=label)
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
    ax.set_title("MiniLM full fine-tune extracted, Rotten Tomatoes, budget demo", fontsize=9)
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
    """Per rank: each stage's accuracy, and TT minus LoRA at equal parameters."""
    out = {}
    for e in results["extracted"]:
        out.setdefault(str(e["rank"]), {})[e["stage"]] = e["test_accuracy"]
    for r, row in out.items():
        if "lora_svd" in row:
            for s in ("tt_svd", "tt_fit", "tt_refined"):
                if s in row:
                    row[f"{s}_minus_lora_points"] = round(100 * (row[s] - row["lora_svd"]), 2)
    return out


# ----------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny split, 2 steps, one rank, "
                    "the first encoder layer's modules only")
    ap.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    ap.add_argument("--lr", type=float, nargs="+", default=LR_GRID)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--distill-seconds", type=float, default=60.0,
                    help="tt_refined: time budget of each distillation")
    ap.add_argument("--distill-steps", type=int, default=250,
                    help="tt_refined: at most this many steps (batch 16 unlabelled texts)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the fine-tunes here and reuse them on a later run (default: a "
                         "temporary directory)")
    ap.add_argument("--out", "--output", dest="output", type=Path,
                    help="JSON path (the plot beside it); default benchmarks/results/extract_accuracy.json")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if any(r < 1 for r in args.ranks) or any(lr <= 0 for lr in args.lr):
        ap.error("--ranks and --lr take positive values")
    if args.smoke:
        args.ranks, args.lr = args.ranks[:1], args.lr[-1:]
        args.distill_steps, args.distill_seconds = 1, 5.0
    args.output = args.output or ROOT / "benchmarks" / "results" / (
        "extract_accuracy_smoke.json" if args.smoke else "extract_accuracy.json")
    if args.output.exists() and not args.force:
        ap.error(f"{args.output} exists; pass --force or choose another --out")
    return args


def main(argv=None) -> int:
    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
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
               "distill_max_steps": args.distill_steps, "extracted": [], "complete": False}
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
    with measuring() as machine:
        refs["full"] = {"test_accuracy": scorer.accuracy(), "params": best["trainable_params"]}
        refs["full_base_embeddings"] = {"test_accuracy": scorer.accuracy(emb_reset)}
        refs["no_linear_delta"] = {"test_accuracy": scorer.accuracy(
            {**emb_reset, **{k: base[k] for k in targets}}), "params": carried_params,
            "what": "base Linear weights and embeddings; the changed norms, biases and head"}
    refs["machine_state"] = machine
    results["references"] = refs
    log(f"full fine-tune: test {refs['full']['test_accuracy']:.4f}; base embeddings "
        f"{refs['full_base_embeddings']['test_accuracy']:.4f}; no Linear delta "
        f"{refs['no_linear_delta']['test_accuracy']:.4f}")
    # 3. extraction at each budget and stage, each scored once on the test movies
    unlabelled = scorer.tokenized([r["text"] for r in split["train"]], batch=16,
                                  max_length=budget["max_length"])
    fitted = {}
    for r in args.ranks:
        for stage in args.stages:
            with measuring() as machine:
                if stage == "tt_refined":
                    if r not in fitted:
                        _, _, fitted[r] = extract_stage("tt_fit", r, ft, base, targets, log)
                    changes, rec = refine_stage(r, fitted[r], base, scorer, emb_reset, unlabelled,
                                                seconds=args.distill_seconds,
                                                max_steps=args.distill_steps, log=log)
                else:
                    changes, rec, mods = extract_stage(stage, r, ft, base, targets, log)
                    if stage == "tt_fit":
                        fitted[r] = mods
                rec["test_accuracy"] = scorer.accuracy({**emb_reset, **changes})
            rec["params"] = rec["module_params"] + carried_params
            rec["machine_state"] = machine
            results["extracted"].append(rec)
            log(f"  -> test accuracy {rec['test_accuracy']:.4f} at {rec['params']:,} parameters")
            results["summary"] = summary(results)
            save(results, args.output, with_plot=False)
    results["complete"] = True
    results["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    results["summary"] = summary(results)
    save(results, args.output)
    log(f"wrote {args.output} in {results['wall_time_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
