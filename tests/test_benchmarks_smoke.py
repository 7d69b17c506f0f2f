"""Every benchmark script runs, at a tiny size, so none can rot unnoticed.

Each ``benchmarks/*.py`` that offers ``--smoke`` (found by reading the file) is run as a user
would run it, ``python benchmarks/<name>.py --smoke --out TMP/<name>.json``, but inside the
test worker (``fixtures/scripts.py``: the worker has imported torch and transformers already,
a child would spend ~4.5 CPU-seconds doing it again). The convention every benchmark
follows is ``--smoke`` for a run of a few seconds and ``--out PATH`` for where its JSON goes,
so a smoke run never touches ``benchmarks/results/``. The test asserts exit 0,
that the JSON it wrote parses, and that ``benchmarks/results/`` is unchanged. Timings from
smoke runs mean nothing and are not looked at.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fixtures.scripts import run_script

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"


def _scripts() -> list[Path]:
    """The benchmark scripts (``_machine.py`` and other ``_`` modules are helpers)."""
    return sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def _smoke_scripts() -> list[Path]:
    return [p for p in _scripts() if "--smoke" in p.read_text()]


def _dedicated(script: Path) -> list[str]:
    """Test files (other than this one) that run ``script --smoke`` themselves, checking
    more than exit 0; those scripts are not run twice. Such a file names the script as the
    end of a string literal (its path), not merely in a comment."""
    own = Path(__file__).name
    return [t.name for t in sorted(Path(__file__).parent.glob("test_*.py"))
            if t.name != own and f'{script.name}"' in (text := t.read_text()) and '"--smoke"' in text]


def test_every_benchmark_has_a_smoke_mode_that_ci_runs():
    scripts = _scripts()
    assert scripts
    for script in scripts:
        assert "--smoke" in script.read_text(), f"{script.name} has no --smoke mode"
    # each runs here or in a dedicated test
    assert all(_dedicated(s) or s in _generic() for s in scripts)


def _generic() -> list[Path]:
    return [s for s in _smoke_scripts() if not _dedicated(s)]


def _digest(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_benchmarks_of_this_area_have_a_smoke_mode():
    names = {p.name for p in _smoke_scripts()}
    assert {"bench_convert.py", "bench_tt.py", "bench_train.py", "bench_start.py", "bench_extract.py",
            "bench_int8.py", "bench_methods.py", "bench_threads.py", "bench_serving.py",
            "bench_extract_accuracy.py"} <= names, names
    # and each of these is run by test_benchmark_smoke_run below (no dedicated test takes it)
    generic = {p.name for p in _generic()}
    assert {"bench_serving.py", "bench_extract_accuracy.py", "bench_methods.py"} <= generic, generic


@pytest.mark.slow
@pytest.mark.parametrize("script", _generic(), ids=lambda p: p.name)
def test_benchmark_smoke_run(script: Path, tmp_path: Path):
    before = _digest(RESULTS)
    out = tmp_path / f"{script.stem}.json"
    proc = run_script(script, ["--smoke", "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, f"{script.name} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert out.is_file(), f"{script.name} --smoke wrote no JSON to --out {out}"
    data = json.loads(out.read_text())
    assert isinstance(data, dict) and data, f"{script.name} wrote an empty result"
    assert _digest(RESULTS) == before, f"{script.name} --smoke changed benchmarks/results/"
    if script.name.startswith("bench_"):  # issue 24: the machine's state beside each figure
        assert '"machine_state"' in out.read_text(), f"{script.name} records no machine_state"


def test_every_bench_script_records_the_machine_state():
    for script in _scripts():
        if script.name.startswith("bench_"):
            assert "measuring(" in script.read_text(), f"{script.name} does not use _machine.measuring"


def test_the_machine_state_names_the_cpu_and_the_note_prints_it(monkeypatch):
    """Figures from different CPUs are not comparable (MKL and ONNX Runtime choose kernels by
    the vector extensions): the state records the CPU and the rendered note says it; a JSON
    from before the CPU was recorded renders as it did."""
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import _machine
    from render_readme import machine_note

    with _machine.measuring(torch_threads=1) as state:
        pass
    assert isinstance(state["cpu"], str) and state["cpu"].strip()
    if sys.platform == "linux":
        flags = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
        assert ("AVX-512" in state["cpu"]) == (" avx512f" in flags)
    note = machine_note([state])
    assert f"cores available ({state['cpu']})" in note
    old = {k: v for k, v in state.items() if k != "cpu"}
    assert "(" not in machine_note([old]).split("cores available")[1].split(",")[0]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_child_reports_its_own_peak_rss_not_its_parents():
    """Linux carries a parent's peak into ``ru_maxrss`` of the children it starts: a
    benchmark that generated its checkpoint in memory would see that peak in every case.
    ``loretta_merge.memory.peak_rss_bytes`` (the benchmarks' and train's) reads the child's
    own (VmHWM)."""
    import subprocess
    import sys

    big = bytearray(768 * 2**20)
    big[::4096] = b"\1" * len(big[::4096])  # touched: resident
    code = ("import resource; from loretta_merge.memory import peak_rss_bytes; "
            "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    own, inherited = int(out[0]), int(out[1])
    del big
    assert inherited >= 768 * 2**20  # the hazard is real on this system
    assert 0 < own < 256 * 2**20
