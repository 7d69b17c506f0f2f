"""Training benchmark on the embedded default, with honest baselines and tuning.

One command, one run, one split. The embedded Rotten Tomatoes data
(``loretta_merge.embedded.rotten_tomatoes``: 100 test movies) is split once more: the first
``--val-movies`` training movies in SHA-256 order of their names form a validation split
(movie-disjoint from both training and test). Then, for one budget:

- ``tfidf_lr``: TF-IDF (word 1-2 grams) + logistic regression, ``C`` chosen on validation;
- ``frozen_lr``: frozen MiniLM, mean-pooled embeddings + logistic regression, ``C`` likewise;
- ``head``, ``lora`` (PEFT LoRA r 8 on rep's targets), ``rep``, ``adp``: fine-tuned through
  ``loretta_merge.train.train``, all with the same rows, steps, batch and max length; each
  method's learning rate (and the pooling, CLS or mean, when both are given) is chosen by a
  recorded sweep on the validation split (one seed); only then is each chosen setting
  trained with every seed and scored once on the test split.

The budgets: ``demo`` (the embedded default's: 2,000 training rows, 1 epoch, batch 8,
max length 64 = 250 steps) and ``full`` (every training row, 3 epochs, batch 32, max length
64). Every figure in the JSON and the plot is measured by the run that writes them.

    python benchmarks/bench_train.py --budget demo            # benchmarks/results/train_demo.json
    python benchmarks/bench_train.py --budget full            # hours on 2 CPU cores
    python benchmarks/bench_train.py --smoke --output /tmp/train_smoke.json   # seconds, for CI
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import measuring  # noqa: E402

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # the machine is shared; before numpy/torch load
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUDGETS = {
    "demo": dict(train_rows=2000, epochs=1.0, batch_size=8, max_length=64, max_steps=None),
    "full": dict(train_rows=None, epochs=3.0, batch_size=32, max_length=64, max_steps=None),
    "smoke": dict(train_rows=16, epochs=1.0, batch_size=8, max_length=16, max_steps=2),
}
FINETUNED = ("head", "lora", "rep", "adp")
BASELINES = ("tfidf_lr", "frozen_lr")
ALL_ROWS = "tfidf_lr_all_train_rows"  # reference when the budget trains on a subset
# rep's earlier demo sweep (validation only) peaked at its grid's top, 5e-3: the grids of the
# three adapter methods go one step higher, the same for each
LR_GRIDS = {"head": [3e-3, 1e-2, 3e-2], "lora": [2e-3, 5e-3, 1e-2],
            "rep": [2e-3, 5e-3, 1e-2], "adp": [2e-3, 5e-3, 1e-2]}
C_GRID = [0.01, 0.1, 1.0, 10.0, 100.0]
SMOKE_SIZES = dict(val=16, test=16)


# ----------------------------------------------------------------------- the split


def _movie_order(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def make_split(*, val_movies: int, train_rows: int | None, smoke: bool) -> tuple[dict, list]:
    """``({"train", "val", "test"}, pool)``: val = the first ``val_movies`` training movies by
    SHA-256 of the name; pool = every other training row; train = the budget's fixed subset
    of the pool (the pool itself when the budget takes every row)."""
    from loretta_merge.embedded import rotten_tomatoes

    train_all, test = rotten_tomatoes()
    movies = sorted({r["movie_name"] for r in train_all}, key=_movie_order)
    val_set = set(movies[:val_movies])
    val = [r for r in train_all if r["movie_name"] in val_set]
    train = pool = [r for r in train_all if r["movie_name"] not in val_set]
    if train_rows is not None and train_rows < len(train):
        keep = sorted(random.Random(0).sample(range(len(train)), train_rows))
        train = [train[i] for i in keep]  # a fixed subset, the same for every method and seed
    if smoke:
        val = [val[i] for i in sorted(random.Random(1).sample(range(len(val)), SMOKE_SIZES["val"]))]
        test = [test[i] for i in sorted(random.Random(2).sample(range(len(test)), SMOKE_SIZES["test"]))]
    return {"train": train, "val": val, "test": test}, pool


def describe_split(split: dict) -> dict:
    out = {}
    for part, rows in split.items():
        out[part] = {"rows": len(rows), "movies": len({r["movie_name"] for r in rows}),
                     "fresh_fraction": round(sum(r["label"] for r in rows) / len(rows), 4)}
    movies = {p: {r["movie_name"] for r in rows} for p, rows in split.items()}
    out["movie_disjoint"] = not (movies["train"] & movies["val"] or movies["train"] & movies["test"]
                                 or movies["val"] & movies["test"])
    return out


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                            for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------- LR baselines


def _fit_lr(x_train, y_train, x_val, y_val, x_test, y_test) -> dict:
    """C chosen by validation accuracy, then one fit and one test score."""
    from sklearn.linear_model import LogisticRegression

    sweep = []
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
        sweep.append({"C": c, "val_accuracy": float(clf.score(x_val, y_val))})
    best = max(sweep, key=lambda s: s["val_accuracy"])
    clf = LogisticRegression(C=best["C"], max_iter=2000).fit(x_train, y_train)
    return {"sweep": sweep, "chosen_C": best["C"], "val_accuracy": best["val_accuracy"],
            "test_accuracy": float(clf.score(x_test, y_test)),
            "trainable_params": int(clf.coef_.size + clf.intercept_.size)}


def tfidf_baseline(split: dict) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer

    t = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x = {p: (vec.fit_transform if p == "train" else vec.transform)([r["text"] for r in rows])
         for p, rows in split.items()}
    y = {p: [r["label"] for r in rows] for p, rows in split.items()}
    res = _fit_lr(x["train"], y["train"], x["val"], y["val"], x["test"], y["test"])
    return {**res, "features": "TF-IDF word 1-2 grams, min_df 2, sublinear tf",
            "wall_s": round(time.perf_counter() - t, 1)}


@functools.lru_cache(maxsize=1)
def _frozen_encoder():
    """MiniLM's tokenizer and bare encoder, loaded once per process."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from loretta_merge.embedded import default_model_path

    hf_logging.set_verbosity_error()
    path = str(default_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def mean_pooled_embeddings(texts: list[str], *, max_length: int) -> "object":
    """Frozen MiniLM sentence embeddings: masked mean of the last hidden state, L2-normed
    (how all-MiniLM-L6-v2 was trained and is used)."""
    import torch

    tok, enc = _frozen_encoder()
    chunks = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            batch = tok(texts[i:i + 64], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
            hidden = enc(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks).numpy()


def frozen_baseline(split: dict, *, max_length: int) -> dict:
    t = time.perf_counter()
    x = {p: mean_pooled_embeddings([r["text"] for r in rows], max_length=max_length)
         for p, rows in split.items()}
    y = {p: [r["label"] for r in rows] for p, rows in split.items()}
    res = _fit_lr(x["train"], y["train"], x["val"], y["val"], x["test"], y["test"])
    return {**res, "features": f"frozen MiniLM, masked mean pooling, L2-normed, max length "
                               f"{max_length}", "wall_s": round(time.perf_counter() - t, 1)}


# ----------------------------------------------------------------------- fine-tuning


def mean_pooling_callback():
    """A TrainerCallback that installs the library's mean pooling
    (:func:`loretta_merge.pooling.apply_pooling`) on a head-only or PEFT LoRA model, which
    ``train(pooling=...)`` does not cover (it records pooling in LoRETTA adapters only). It
    runs at the Trainer's ``on_init_end``, before the optimizer."""
    from transformers import TrainerCallback

    from loretta_merge.pooling import apply_pooling

    class MeanPooling(TrainerCallback):
        def on_init_end(self, args, state, control, model=None, **kw):
            apply_pooling(model, "mean")

    return MeanPooling()


def finetune(spec: dict, files: dict, out_dir: Path) -> dict:
    """THE adapter to the library's training API: one fine-tuning run, one evaluation on
    ``files[spec['evaluate_on']]``. Switch this function alone when the API moves."""
    from loretta_merge.train import train

    b = spec["budget"]
    # rep/adp pool through the library's own option (what a user gets with --pooling);
    # head and LoRA get the same MeanPooler through a callback
    mean = spec["pooling"] == "mean"
    loretta = spec["method"] in ("rep", "adp")
    rep = train(model=None, method=spec["method"], train_file=files["train"],
                eval_file=files[spec["evaluate_on"]], output_dir=out_dir, epochs=b["epochs"],
                batch_size=b["batch_size"], learning_rate=spec["lr"], max_length=b["max_length"],
                max_steps=b["max_steps"], seed=spec["seed"], eval_split=0.0,
                replace_dense=False, progress=False, eval_before=False,
                pooling="mean" if mean and loretta else "none",
                callbacks=[mean_pooling_callback()] if mean and not loretta else [])
    return {"accuracy": rep.metrics_after["accuracy"], "f1_macro": rep.metrics_after["f1_macro"],
            "trainable_params": rep.trainable_params, "breakdown": rep.trainable_breakdown,
            "adapter_params": rep.adapter_params, "steps": rep.steps,
            "step_time_s": rep.step_time_s, "train_time_s": rep.train_time_s,
            "run_wall_s": rep.wall_time_s, "peak_rss_mib": rep.peak_rss_mib}


def run_specs(specs: list[dict], files: dict, threads: int) -> list[dict]:
    """Run specs one after another in this process; returns one record per spec."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()  # no per-run weight-loading report
    records = []
    for spec in specs:
        with tempfile.TemporaryDirectory() as tmp, measuring() as machine:
            t = time.perf_counter()
            res = finetune(spec, files, Path(tmp) / "out")
        records.append({**{k: v for k, v in spec.items() if k != "budget"}, **res,
                        "wall_s": round(time.perf_counter() - t, 1), "machine_state": machine})
        print(json.dumps(records[-1]), flush=True)
    return records


def run_isolated(specs: list[dict], files: dict, threads: int) -> list[dict]:
    """The same in a child process, so each method's peak RSS and state are its own."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"specs": specs, "files": {k: str(v) for k, v in files.items()}}, f)
    records = []
    try:
        with subprocess.Popen([sys.executable, __file__, "--worker", f.name, "--threads",
                               str(threads)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as proc:
            for line in proc.stdout:  # echoed as each run ends, so a long run shows progress
                if line.startswith("{"):
                    records.append(json.loads(line))
                    print(f"  run {line.strip()}", flush=True)
            stderr = proc.stderr.read()
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        sys.exit(f"{specs[0]['method']} runs failed:\n{stderr[-3000:]}")
    return records


_KEY = ("method", "lr", "pooling", "seed", "evaluate_on")


def reusable_runs(path: Path | None) -> dict[tuple, dict]:
    """Runs that a stopped run of this script printed (its log's ``  run {...}`` lines), by
    (method, lr, pooling, seed, split): ``--reuse LOG`` takes them instead of training them
    again. Validation and test runs alike: a run is a pure function of its key and budget."""
    if path is None:
        return {}
    found = {}
    for line in path.read_text().splitlines():
        if line.startswith("  run {"):
            rec = json.loads(line[len("  run "):])
            found[tuple(rec[k] for k in _KEY)] = {**rec, "reused_from": str(path)}
    return found


def run_all(specs: list[dict], *, args, files: dict, slots: threading.Semaphore) -> list[dict]:
    """One record per spec, in order: reused from ``--reuse`` where the log has it, else run.
    With ``--jobs N`` every run is its own child process and at most N run at once across
    all methods (``slots``), so the machine stays busy until the last run."""
    known = args.reusable
    todo = [s for s in specs if tuple(s[k] for k in _KEY) not in known]
    if args.jobs == 0:
        fresh = run_specs(todo, files, args.threads)
    else:
        def one(spec: dict) -> dict:
            with slots:
                return run_isolated([spec], files, args.threads)[0]
        with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
            fresh = list(pool.map(one, todo))
    # check_reusable compares logged runs with planned_steps: hold it to the Trainer's count
    if any(r["steps"] != args.planned_steps for r in fresh):
        raise RuntimeError(f"planned_steps() said {args.planned_steps} steps, the Trainer took "
                           f"{sorted({r['steps'] for r in fresh})}: mend planned_steps()")
    fresh = iter(fresh)
    return [known.get(tuple(s[k] for k in _KEY)) or next(fresh) for s in specs]


def planned_steps(budget: dict, rows: int) -> int:
    """The optimizer steps the Trainer takes for this budget on ``rows`` training rows (one
    process, no accumulation, last partial batch kept)."""
    return budget["max_steps"] or math.ceil(budget["epochs"] * math.ceil(rows / budget["batch_size"]))


def check_reusable(path: Path | None, steps: int) -> dict[tuple, dict]:
    """The runs of a ``--reuse`` log (read once, here); refuses, before any work, a log whose
    runs took another step count than this budget's."""
    runs = reusable_runs(path)
    other = {r["steps"] for r in runs.values()} - {steps}
    if other:
        sys.exit(f"--reuse {path}: its runs took {sorted(other)} steps, this budget takes "
                 f"{steps}; pass the log of a run with the same budget (or drop --reuse)")
    return runs


def tune_and_test(method: str, *, args, budget: dict, files: dict, log,
                  slots: threading.Semaphore) -> dict:
    """Sweep (lr x pooling) on validation with one seed, then every seed at the best, on test."""
    grid = args.lr.get(method, LR_GRIDS[method])
    base = dict(method=method, budget=budget)
    sweep = run_all([{**base, "lr": lr, "pooling": pool, "seed": args.sweep_seed,
                      "evaluate_on": "val"} for pool in args.pooling[method] for lr in grid],
                    args=args, files=files, slots=slots)
    best = max(sweep, key=lambda r: r["accuracy"])
    log(f"{method}: sweep " + ", ".join(f"{r['pooling']} lr {r['lr']:g} val {r['accuracy']:.4f}"
                                        for r in sweep) + f" -> {best['pooling']} lr {best['lr']:g}")
    tests = run_all([{**base, "lr": best["lr"], "pooling": best["pooling"], "seed": s,
                      "evaluate_on": "test"} for s in args.seeds],
                    args=args, files=files, slots=slots)
    acc = [r["accuracy"] for r in tests]
    summary = {"sweep": sweep, "chosen_lr": best["lr"], "chosen_pooling": best["pooling"],
               "chosen_val_accuracy": best["accuracy"],
               "chosen_at_grid_edge": len(grid) > 1 and best["lr"] in (min(grid), max(grid)),
               "test_runs": tests, "seeds": args.seeds, "test_accuracy": acc,
               "test_accuracy_mean": statistics.mean(acc),
               "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else None,
               "trainable_params": tests[0]["trainable_params"], "breakdown": tests[0]["breakdown"],
               "adapter_params": tests[0]["adapter_params"], "steps": tests[0]["steps"],
               # this invocation's runs only: a run taken from --reuse ran under another load
               "step_time_s_median": _fresh_median([*sweep, *tests], "step_time_s"),
               "peak_rss_mib": max(r["peak_rss_mib"] for r in tests)}
    log(f"{method}: test {summary['test_accuracy_mean']:.4f} ± {summary['test_accuracy_std'] or 0:.4f} "
        f"over seeds {args.seeds}, {summary['trainable_params']:,} trainable")
    return summary


def _fresh_median(runs: list[dict], key: str) -> float | None:
    """Median of ``key`` over the runs trained by this invocation (not taken from --reuse)."""
    values = [r[key] for r in runs if not r.get("reused_from") and r.get(key)]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------- report


def checks(results: dict) -> dict:
    """The issue's targets, computed from this run's figures (absent methods: no check)."""
    out: dict = {}
    ft = {m: r for m, r in results["finetuned"].items() if "test_accuracy_mean" in r}
    lines = {b: results["baselines"][b]["test_accuracy"] for b in BASELINES
             if "test_accuracy" in results["baselines"].get(b, {})}
    reference = results["baselines"].get(ALL_ROWS, {}).get("test_accuracy")
    for m, r in ft.items():
        for b, acc in [*lines.items(), *([(ALL_ROWS, reference)] if reference else [])]:
            out[f"{m}_minus_{b}"] = round(r["test_accuracy_mean"] - acc, 4)
        if lines:
            out[f"{m}_above_both_lr_baselines"] = all(r["test_accuracy_mean"] > a for a in lines.values())
    if {"rep", "lora"} <= set(ft):
        rep, lora = ft["rep"], ft["lora"]
        out["rep_minus_lora"] = round(rep["test_accuracy_mean"] - lora["test_accuracy_mean"], 4)
        out["rep_within_1_point_of_lora"] = out["rep_minus_lora"] >= -0.01
        out["rep_over_lora_trainable"] = round(rep["trainable_params"] / lora["trainable_params"], 3)
        out["rep_at_most_a_third_of_lora"] = out["rep_over_lora_trainable"] <= 1 / 3
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 4.3))
    for m, r in results["finetuned"].items():
        if "test_accuracy_mean" in r:
            ax.errorbar(r["trainable_params"], r["test_accuracy_mean"],
                        yerr=r["test_accuracy_std"] or 0, fmt="o", capsize=3,
                        label=f"{m}: {r['test_accuracy_mean']:.3f} ({r['chosen_pooling']}, "
                              f"lr {r['chosen_lr']:g}; {r['trainable_params']:,})")
    for b, style in zip([*BASELINES, ALL_ROWS], ("--", ":", "-.")):
        if "test_accuracy" in results["baselines"].get(b, {}):
            acc = results["baselines"][b]["test_accuracy"]
            ax.axhline(acc, color="grey", ls=style, lw=1, label=f"{b}: {acc:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (everything counted, log scale)")
    ax.set_ylabel(f"test accuracy (mean ± std, seeds {results['seeds']})")
    ax.set_title(f"MiniLM, Rotten Tomatoes, movie-disjoint; budget {results['budget_name']}",
                 fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(results: dict, path: Path) -> None:
    """JSON (atomic) and plot, after every method: a stopped run keeps what it measured
    (``complete`` says whether every method ran). A smoke run plots at the end only."""
    results["checks"] = checks(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(results, indent=1))
    os.replace(part, path)
    if results["complete"] or results["budget_name"] != "smoke":  # a smoke run plots once
        plot(results, path.with_suffix(".png"))


# ----------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", choices=["demo", "full"], default="demo")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: tiny subsets, 1 seed, 2 steps, one lr each, in-process")
    ap.add_argument("--methods", nargs="+", default=[*BASELINES, *FINETUNED],
                    choices=[*BASELINES, *FINETUNED])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sweep-seed", type=int, default=0)
    ap.add_argument("--pooling", nargs="+", default=["mean"], metavar="[METHOD=]P,P",
                    help="poolings (cls, mean) in the sweeps: for every method, or per method "
                         "as METHOD=cls,mean (default mean: it beat cls on validation at every "
                         "rep learning rate in a cls,mean sweep)")
    ap.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR,LR",
                    help="replace a method's learning-rate grid, e.g. rep=2e-3,5e-3")
    ap.add_argument("--val-movies", type=int, default=50)
    ap.add_argument("--train-rows", type=int, help="override the budget's training rows")
    ap.add_argument("--epochs", type=float, help="override the budget's epochs")
    ap.add_argument("--batch-size", type=int, help="override the budget's batch size")
    ap.add_argument("--max-length", type=int, help="override the budget's max length")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs side by side, each in its own process; 0 = in-process")
    ap.add_argument("--out", "--output", dest="output", type=Path, help="JSON path (the plot goes beside it); "
                    "default benchmarks/results/train_<budget>.json")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --output")
    ap.add_argument("--reuse", type=Path, default=None, metavar="LOG",
                    help="take runs (validation and test) from a stopped run's log (same budget) "
                         "instead of training them again")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    grids = {}
    for item in args.lr:
        method, _, values = item.partition("=")
        if method not in FINETUNED or not values:
            ap.error(f"--lr {item!r}: expected METHOD=LR[,LR...] with METHOD in {list(FINETUNED)}")
        grids[method] = [float(v) for v in values.split(",")]
    args.lr = grids
    args.pooling = _pooling_grids(ap, args.pooling)
    if args.smoke:
        args.seeds, args.jobs = args.seeds[:1], 0
        args.lr = {m: args.lr.get(m, LR_GRIDS[m])[1:2] for m in FINETUNED}
        args.pooling = {m: p[-1:] for m, p in args.pooling.items()}
    name = "smoke" if args.smoke else args.budget
    args.output = args.output or Path(f"benchmarks/results/train_{name}.json")
    if args.output.exists() and not args.force and not args.worker:
        ap.error(f"{args.output} exists; pass --force to overwrite it or choose another --output")
    return args


def _pooling_grids(ap, items: list[str]) -> dict[str, list[str]]:
    grids = {m: ["cls", "mean"] for m in FINETUNED}
    for item in items:
        method, _, values = item.rpartition("=")
        pools = values.split(",")
        if (method and method not in FINETUNED) or not set(pools) <= {"cls", "mean"}:
            ap.error(f"--pooling {item!r}: expected [METHOD=]cls,mean with METHOD in "
                     f"{list(FINETUNED)}")
        for m in ([method] if method else FINETUNED):
            grids[m] = pools
    return grids


def budget_of(args) -> dict:
    b = dict(BUDGETS["smoke" if args.smoke else args.budget])
    for key in ("train_rows", "epochs", "batch_size", "max_length"):
        if getattr(args, key) is not None:
            b[key] = getattr(args, key)
    return b


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        run_specs(job["specs"], {k: Path(v) for k, v in job["files"].items()}, args.threads)
        return
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)  # noqa: E731
    budget = budget_of(args)
    split, pool = make_split(val_movies=args.val_movies, train_rows=budget["train_rows"],
                       smoke=args.smoke)
    results = {
        "benchmark": "train", "command": "python benchmarks/bench_train.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "budget_name": "smoke" if args.smoke else args.budget, "budget": budget,
        "seeds": args.seeds, "sweep_seed": args.sweep_seed,
        "pooling_grids": {m: args.pooling[m] for m in FINETUNED if m in args.methods},
        "lr_grids": {m: args.lr.get(m, LR_GRIDS[m]) for m in FINETUNED if m in args.methods},
        "C_grid": C_GRID, "split": {"how": f"loretta_merge.embedded.rotten_tomatoes (100 test "
                                           f"movies); validation = the first {args.val_movies} "
                                           f"training movies by SHA-256 of the name",
                                    **describe_split(split), "train_pool_rows": len(pool)},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "threads_per_run": args.threads, "jobs": args.jobs,
                    "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "reused_runs_from": str(args.reuse) if args.reuse else None,
        "baselines": {}, "finetuned": {}, "complete": False,
    }
    log(f"split {json.dumps(results['split'])}")
    args.planned_steps = planned_steps(budget, len(split["train"]))
    args.reusable = check_reusable(args.reuse, args.planned_steps)
    out = args.output
    for b in (b for b in BASELINES if b in args.methods):
        results["baselines"][b] = (tfidf_baseline(split) if b == "tfidf_lr" else
                                   frozen_baseline(split, max_length=budget["max_length"]))
        r = results["baselines"][b]
        log(f"{b}: C {r['chosen_C']} (val {r['val_accuracy']:.4f}) test {r['test_accuracy']:.4f}")
        save(results, out)
    if "tfidf_lr" in args.methods and len(pool) > len(split["train"]) and not args.smoke:
        # a reference line: what TF-IDF does with every training row, not the budget's subset
        results["baselines"][ALL_ROWS] = r = tfidf_baseline({**split, "train": pool})
        log(f"{ALL_ROWS} ({len(pool)} rows): C {r['chosen_C']} (val {r['val_accuracy']:.4f}) "
            f"test {r['test_accuracy']:.4f}")
        save(results, out)
    methods = [m for m in args.methods if m in FINETUNED]  # in the order given
    with tempfile.TemporaryDirectory() as tmp:
        files = {p: write_jsonl(rows, Path(tmp) / f"{p}.jsonl") for p, rows in split.items()}
        slots = threading.Semaphore(max(1, args.jobs))

        def one(method: str) -> None:
            results["finetuned"][method] = tune_and_test(method, args=args, budget=budget,
                                                          files=files, log=log, slots=slots)
            save(results, out)
        # every method's thread queues its runs on `slots`; in-process (--jobs 0) one at a time
        with ThreadPoolExecutor(max_workers=len(methods) if args.jobs else 1) as pool:
            list(pool.map(one, methods))
    results["finetuned"] = {m: results["finetuned"][m] for m in methods}
    results["wall_time_s"] = round(time.perf_counter() - t0, 1)
    results["load_average_at_end"] = os.getloadavg()
    results["complete"] = True
    save(results, out)
    log(f"checks {json.dumps(results['checks'])}")
    log(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
