"""The machine's state beside each benchmark figure (issue 24, point 2).

Every ``bench_*.py`` records, next to each measured figure, the 1-minute load average before
and after the measurement, the cores this process may run on, the torch threads it used and
the CPU (its model name and vector extension: MKL and ONNX Runtime pick kernels by it, so
figures from different CPUs are not comparable):

    from _machine import measuring

    with measuring() as machine:          # torch threads read from torch when it is imported
        seconds = run_case()
    row = {"seconds": seconds, "machine": machine}

A figure taken with the load above the cores available was taken on a busy machine; the
renderers in ``tools/`` print the state beside the figure so a reader can tell.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

# Every benchmark runs offline and quietly; a script imports this module before transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def cores_available() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_1min() -> float:
    return round(os.getloadavg()[0], 2)


def cpu() -> str:
    """The CPU's model name and widest x86 vector extension (Linux), e.g. ``"Intel(R) Xeon(R)
    Processor, AVX-512"``; the platform's processor string elsewhere."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    first = info.split("\n\n", 1)[0]  # the first processor's block
    fields = {k.strip(): v.strip() for k, v in
              (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    name = " ".join(fields.get("model name", platform.machine()).split())
    flags = set(fields.get("flags", "").split())
    isa = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                          ("avx", "AVX")) if flag in flags), None)
    return f"{name}, {isa}" if isa else name


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


@contextmanager
def measuring(torch_threads: int | None = None) -> Iterator[dict]:
    """Yield a dict filled with the state before the block; the load after it is added on exit.

    ``torch_threads``: the threads of the process that measures, when that is a child process
    (default: this process's torch, when imported)."""
    state = {"load_1min_before": load_1min(), "cores_available": cores_available(),
             "torch_threads": torch_threads if torch_threads is not None else _torch_threads(),
             "cpu": cpu()}
    try:
        yield state
    finally:
        state["load_1min_after"] = load_1min()
