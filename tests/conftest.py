"""Shared fixtures: tiny real transformers models built offline from configs, and the MiniLM
adapter the README tour trains.

Each tiny model is saved once per session with safetensors in several small shards, so the
index code always runs. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# as the CLI sets it (loretta_merge/cli.py): MKL's GEMMs give the same bits on any thread
# count, so in-process merges are byte-identical across thread counts as the CLI's are
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# Under pytest-xdist (`make test`: two workers on two cores) each worker and the commands its
# tests start get one thread, so the workers do not oversubscribe the cores.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    # torch is imported by the processes that run tests, not by xdist's controller, which
    # loads this file before it starts the workers (~1.5 s sooner)
    if XDIST_WORKER or not config.getoption("numprocesses", None):
        import torch

        torch.set_num_threads(1 if XDIST_WORKER else 2)

# name -> (config class, config kwargs, model class used for the saved checkpoint)
TINY = {
    "llama": ("LlamaConfig", dict(vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=False), "LlamaForCausalLM"),
    "gpt2": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=0),
             "GPT2LMHeadModel"),
    "bert": ("BertConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=96,
                                max_position_embeddings=64, num_labels=2),
             "BertForSequenceClassification"),
    "roberta": ("RobertaConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=96,
                                      max_position_embeddings=70, num_labels=2, pad_token_id=1),
                "RobertaForSequenceClassification"),
    "deberta": ("DebertaConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=96,
                                      max_position_embeddings=64, num_labels=2),
                "DebertaForSequenceClassification"),
    "opt": ("OPTConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, ffn_dim=96, max_position_embeddings=64,
                              word_embed_proj_dim=64), "OPTForCausalLM"),
}
ARCHS = list(TINY)

# Fixtures that build something costly (a checkpoint, an export, a trained adapter) are
# session-scoped even when one file uses them: an xdist worker interleaves the tests of
# several files, and a module-scoped fixture is torn down whenever the next test comes from
# another file, then built again (test_serving's bank export ran twice, ~16 s each). Only a
# fixture that patches a library stays module-scoped (test_combine's peft_reseeded).


def build_tiny(name: str, *, seed: int = 0, dtype=None, layers: int | None = None):
    """A freshly initialised tiny model of the named architecture (deterministic; float32
    unless ``dtype``; ``layers`` instead of its two: an ONNX export of one layer takes
    about two thirds of the time)."""
    import torch
    import transformers

    cfg_cls, kwargs, model_cls = TINY[name]
    if layers is not None:
        kwargs = {**kwargs, "n_layer" if "n_layer" in kwargs else "num_hidden_layers": layers}
    config = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    return model.to(dtype or torch.float32)


def save_tiny(name: str, path: Path, *, seed: int = 0, dtype=None,
              max_shard_size: str = "40KB", layers: int | None = None) -> Path:
    model = build_tiny(name, seed=seed, dtype=dtype, layers=layers)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def pytest_collection_finish(session):
    """Everything imported so far (torch, transformers, the test modules: ~600k objects)
    lives until the end: freeze it, so that each garbage collection stops re-scanning it
    (about 7% of an ONNX export's time goes to the collector otherwise)."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_xdist_make_scheduler(config, log):
    """``make test``'s units of work: fixtures/scheduling.py says why not xdist_group marks."""
    if config.getvalue("dist") == "loadgroup":
        from fixtures.scheduling import UnitScheduling

        return UnitScheduling(config, log)
    return None


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir("llama")`` -> a saved, sharded checkpoint directory
    (built once per session per name/dtype). Treat it as read-only."""
    cache: dict = {}

    def get(name: str, dtype=None) -> Path:
        import torch

        dtype = dtype or torch.float32
        key = (name, dtype)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{name}-{str(dtype).split('.')[-1]}")
            cache[key] = save_tiny(name, d, dtype=dtype)
        return cache[key]

    return get


def perturb_trainable(model, *, seed: int = 1, std: float = 0.05):
    """Add seeded Gaussian noise to every trainable tensor (PEFT starts lora_B at zero;
    this makes an adapter really change outputs, so losing a tensor would show)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def run_main(argv, capsys) -> tuple[int, str, str]:
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    from loretta_merge.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def probe_inputs(vocab_size: int = 128, batch: int = 2, seq: int = 7, *, seed: int = 0):
    """Token ids and an attention mask with right padding on the first row."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------- README tour

def readme_tour() -> list[tuple[str, list[str]]]:
    """The README's command-line tour: each ``$ `` command with the output lines shown
    under it, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The command line at a glance", 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
    return steps


def tour_env() -> dict:
    """The environment the tour's commands run in: this interpreter's ``loretta-merge`` and
    ``python`` first on PATH, offline."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@dataclass(frozen=True)
class TrainedAdapter:
    """A finished training command: the adapter folder it wrote (read-only: copy it to
    change it) and what the command printed."""

    path: Path
    command: str
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def minilm_adapter(tmp_path_factory) -> TrainedAdapter:
    """The LoRETTA_rep adapter on the embedded MiniLM and Rotten Tomatoes data that the README
    tour's ``loretta-merge train`` command trains, run once per test session (the command
    itself, end to end; ``tests/test_readme.py`` checks its output against the README).

    With pytest-xdist the first worker to take the lock trains; the others wait for it and
    reuse its folder. The files whose tests take this fixture form one unit of work
    (fixtures/scheduling.py), so one worker runs them and the other is never left waiting."""
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    # the session's own folder: shared by its xdist workers, never by two sessions
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if XDIST_WORKER else base
    work = shared / "minilm-adapter"
    done = shared / "minilm-adapter.json"
    command = next(cmd for cmd, _ in readme_tour() if cmd.startswith("loretta-merge train "))
    with FileLock(str(shared / "minilm-adapter.lock")):
        if not done.exists():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + command], cwd=work,
                                  env=tour_env(), capture_output=True, text=True, timeout=1200)
            result = dict(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(done)
        result = json.loads(done.read_text())
    if result["returncode"] != 0:
        pytest.fail(f"{command!r} exited {result['returncode']}:\n"
                    + result["stdout"][-3000:] + result["stderr"][-3000:])
    out = command.split(" -o ", 1)[1].split()[0]
    return TrainedAdapter(path=work / out, command=command, **result)
