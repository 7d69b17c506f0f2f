"""The streaming run: read each base tensor once, merge it, write it; three stages overlap.

A reader thread reads the next base tensor into a reused buffer while the main thread
merges the current one (:mod:`.kernel`) and a writer thread puts the previous result on
disk. The output shards are laid out from the plan before the first write, so each tensor
goes to disk as soon as it is computed: peak memory is a few tensors, whatever the model.
On a GPU the merged tensors' ranges are checked once per input shard, so the device is not
synchronised per tensor. Fully fine-tuned inputs (:mod:`.full`) are read in the same reader
thread, tensor beside tensor, into the same pool of buffers. A task-vector method (ties,
dare...) is CPU-bound: on the CPU two worker threads merge its tensors side by side
(:func:`method_workers`), sharing its intra-op threads, and they are written in order.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import CheckpointReader, StreamingShardWriter
from . import kernel, task_vectors
from .buffers import BaseReads, BufferPool, typed_view
from .full import FullReads
from .plan import MergePlan, OpKind, OutputTensor

KERNEL_THREADS_ENV = "LORETTA_KERNEL_THREADS"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity on this platform
        return max(1, os.cpu_count() or 1)


def kernel_threads(*, cpu_bound: bool = False) -> int:
    """Threads for the CPU kernel: ``LORETTA_KERNEL_THREADS`` when set (a whole number, 1
    or more), else the available cores minus one (the reader and writer threads beside the
    kernel need a core between them), at least 1; with ``cpu_bound`` (a task-vector method:
    ties, dare, della..., whose passes over each tensor leave the reader and writer idle
    most of the time) every available core, shared by the tensors it merges side by side
    (:func:`method_workers`).

    For the linear kernel, on the loaded 2-core development machine that is 1. There, with OpenMP's default wait
    policy, a second thread made a 1 GB LoRA merge 13x slower (the barrier spins while its
    partner waits for a core); with ``OMP_WAIT_POLICY=PASSIVE``, which the command line sets,
    1 and 2 threads are close (docs/ARCHITECTURE.md, "Memory and speed";
    benchmarks/results/threads.json)."""
    raw = os.environ.get(KERNEL_THREADS_ENV)
    if raw is None or not raw.strip():
        return available_cores() if cpu_bound else max(1, available_cores() - 1)
    try:
        n = int(raw.strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{KERNEL_THREADS_ENV}={raw!r} is not a thread count; set it to a "
                          f"whole number of 1 or more (e.g. {KERNEL_THREADS_ENV}=1), or unset "
                          f"it to use the available cores minus one "
                          f"({max(1, available_cores() - 1)} here)")
    return n


METHOD_WORKERS = 2  # tensors a method merges at once, at most: each holds its own buffers


def method_workers(plan: MergePlan, device: torch.device, threads: int) -> int:
    """How many tensors a task-vector method merges at once on the CPU, its ``threads``
    shared among them as intra-op threads (:func:`run_plan`). A method that prunes runs
    passes of short ops over 1 MiB chunks, which split badly across OpenMP threads inside
    one tensor (each op pays a fork and a barrier, and a wake-up under the CLI's
    ``OMP_WAIT_POLICY=PASSIVE``); two tensors side by side need neither. At most
    :data:`METHOD_WORKERS`: each tensor in flight holds its buffers, and a cut through tied
    magnitudes its whole-tensor sort. 1 for the linear kernel, a method that does not prune
    (one pass of a few ops per chunk), a GPU, and PEFT's ``*_svd`` forms (whole dense
    deltas per tensor)."""
    tv = plan.task_vectors
    if tv is None or tv.method.recipe is None or device.type != "cpu":
        return 1
    if tv.method.recipe(tv.params).prune is None:
        return 1
    return max(1, min(threads, METHOD_WORKERS))


@contextlib.contextmanager
def _intra_op_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class RunResult:
    tensors: int = 0
    merged: int = 0  # a low-rank or TT update
    replaced: int = 0  # set from the adapter
    copied: int = 0
    files: tuple[str, ...] = ()
    total_bytes: int = 0
    largest_shard_bytes: int = 0


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _common_bytes(plan: MergePlan, reader: CheckpointReader) -> int:
    """The buffer size that nine in ten tensors (read or written) fit in."""
    sizes = sorted([reader.nbytes(k) for k in plan.reads()]
                   + [max(1, _numel(o.shape)) * _element_size(o.dtype) for o in plan.outputs])
    return sizes[min(len(sizes) - 1, (len(sizes) * 9) // 10)] if sizes else 1


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _write(writer: StreamingShardWriter, name: str, tensor: torch.Tensor) -> None:
    """Every output tensor goes to disk here (tests wrap it to slow a run down)."""
    writer.add(name, tensor)


class _Pipeline:
    """One merge run: the reader and writer threads around the main thread's kernel."""

    def __init__(self, plan: MergePlan, reader: CheckpointReader, writer: StreamingShardWriter,
                 device: torch.device) -> None:
        self.plan, self.reader, self.writer, self.device = plan, reader, writer, device
        self.cuda = device.type == "cuda"
        n_full = sum(a.full is not None for a in plan.adapters)
        # in flight: one set of inputs being read, one being merged; an output being written
        self.pool = BufferPool(_common_bytes(plan, reader), pin=self.cuda, keep=6 + 2 * n_full)
        self.reads = BaseReads(reader, self.pool)
        self.full_reads = FullReads(self.pool)
        self.scratch = torch.empty(kernel.BLOCK_ELEMS, dtype=torch.float32)
        self.delta_scratch = torch.empty(kernel.full_scratch_elems(n_full), dtype=torch.float32)
        self.checks: list[kernel.RangeCheck] = []
        self.result = RunResult()
        self._pending: Future | None = None
        # a task-vector method's tensor workers (None: every tensor merged here, in turn);
        # outputs go to the writer in the order they were computed, once done
        self.method_pool: ThreadPoolExecutor | None = None
        self.workers = 1
        self._queue: deque = deque()  # (Future or None, name, tensor, buffer, event)

    def put(self, wpool: ThreadPoolExecutor, name: str, tensor: torch.Tensor,
            buf: torch.Tensor | None, event=None, job: Future | None = None) -> None:
        """Hand a tensor to the writer thread, after the ones before it, once ``job`` (the
        worker computing it, if any) is done; its buffer returns to the pool after."""
        self._queue.append((job, name, tensor, buf, event))
        self.drain(wpool, self.workers - 1)

    def drain(self, wpool: ThreadPoolExecutor, busy: int) -> None:
        """Write the queued outputs that are done, in order, and return once at most
        ``busy`` workers are computing (a worker is free for the next tensor) and at most
        ``2 * workers`` outputs are queued (each holds its buffers); -1: write everything."""
        while self._queue:
            head = self._queue[0][0]
            if head is None or head.done() or busy < 0 or len(self._queue) > 2 * self.workers:
                job, name, tensor, buf, event = self._queue.popleft()
                if job is not None:
                    job.result()  # waits for it; its error, if any, is the run's
                self._write_next(wpool, name, tensor, buf, event)
                continue
            computing = [q[0] for q in self._queue if q[0] is not None and not q[0].done()]
            if len(computing) <= busy:
                return
            wait(computing, return_when=FIRST_COMPLETED)  # a tensor behind the head may end first

    def _write_next(self, wpool: ThreadPoolExecutor, name: str, tensor: torch.Tensor,
                    buf: torch.Tensor | None, event=None) -> None:
        def job() -> None:
            if event is not None:
                event.synchronize()  # its copy back from the device has landed
            _write(self.writer, name, tensor)
            self.pool.give(buf)

        self.wait_for_writer()
        self._pending = wpool.submit(job)

    def wait_for_writer(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def read(self, key: str, outs: list[OutputTensor]):
        """(the base tensor, its buffer, {id(op): (fine-tune tensor, buffer)}): the reader
        thread's work for one base tensor."""
        w0, buf = self.reads.read(key)
        return w0, buf, self.full_reads.read(outs)

    def compute(self, wpool: ThreadPoolExecutor, out: OutputTensor, w0: torch.Tensor | None,
                in_buf: torch.Tensor | None, full: dict[int, torch.Tensor] | None = None,
                release: tuple = (), alone: bool = True) -> None:
        """Merge (or cast, or copy) one output tensor and hand it to the writer (``full``:
        the fine-tunes' tensors of its FULL ops; ``release``: buffers to give back once it
        is computed; ``alone``: the only output of its base tensor, so a worker may merge
        it while the next is read)."""
        r = self.result
        r.tensors += 1
        if not out.ops and w0 is not None and w0.dtype == out.dtype:
            r.copied += 1
            for b in release:
                self.pool.give(b)
            self.put(wpool, out.name, w0, in_buf)  # the read buffer goes straight to disk
            return
        if not out.ops:
            r.copied += 1
        elif any(op.kind is not OpKind.REPLACE for op in out.ops):
            r.merged += 1
        else:
            r.replaced += 1
        nbytes = max(1, _numel(out.shape)) * _element_size(out.dtype)
        out_buf = self.pool.take(nbytes)
        result = typed_view(out_buf, out.shape, out.dtype)
        if self.plan.task_vectors is not None and out.ops and w0 is not None:
            # a method other than linear: chunks of rows (whole tensors for PEFT's forms), on
            # the merge's device (random masks are drawn on the CPU there too, so a seed
            # gives the same draws anywhere)
            def merge() -> None:
                check = task_vectors.merge_tensor_task_vectors(
                    out.name, w0, out.ops, result, self.plan.task_vectors, self.device, full)
                for b in (in_buf, *release):
                    self.pool.give(b)
                kernel.check_ranges([check])

            if self.method_pool is not None and alone:
                self.put(wpool, out.name, result, out_buf, job=self.method_pool.submit(merge))
            else:
                merge()
                self.put(wpool, out.name, result, out_buf)
            return
        if self.cuda and out.ops:
            self.checks.append(kernel.merge_tensor_device(out.name, w0, out.ops, result,
                                                          self.device, full))
            event = torch.cuda.Event()
            event.record()
            for b in (in_buf, *release):
                self.pool.give(b, event)
            self.put(wpool, out.name, result, out_buf, event)
        else:
            check = kernel.merge_tensor_cpu(out.name, w0, out.ops, result, self.scratch, full,
                                            self.delta_scratch if full else None)
            for b in (in_buf, *release):  # after the kernel has read them
                self.pool.give(b)
            kernel.check_ranges([check])  # CPU values: no cost to look now (device ones wait)
            self.put(wpool, out.name, result, out_buf)


def _prefetch(read, keys: list[str], rpool: ThreadPoolExecutor):
    """Yield (key, read(key)) while the next key is read in the reader thread."""
    future = rpool.submit(read, keys[0]) if keys else None
    for i, key in enumerate(keys):
        got = future.result()
        future = rpool.submit(read, keys[i + 1]) if i + 1 < len(keys) else None
        try:
            yield key, got
        except GeneratorExit:
            if future is not None:
                future.cancel()
            raise


def run_plan(plan: MergePlan, reader: CheckpointReader, out_dir: Path, *, device: torch.device,
             max_shard_bytes: int, progress: bool = False,
             threads: int | None = None) -> RunResult:
    """Write every output tensor of ``plan`` into ``out_dir`` (a temporary directory);
    the CPU kernel runs on ``threads`` intra-op threads (None: :func:`kernel_threads`)."""
    threads = kernel_threads() if threads is None else threads
    writer = StreamingShardWriter(out_dir, [(o.name, o.shape, o.dtype) for o in plan.outputs],
                                  max_shard_bytes)
    by_source: dict[str, list[OutputTensor]] = {}
    for o in plan.outputs:
        by_source.setdefault(o.source, []).append(o)
    if device.type == "cuda":
        for o in plan.outputs:
            kernel.ops_to(o.ops, device)
    run = _Pipeline(plan, reader, writer, device)
    run.workers = method_workers(plan, device, threads)
    bar = _progress_bar(reader) if progress else None
    keys, shard = plan.reads(), None
    try:
        with _intra_op_threads(max(1, threads // run.workers)), \
                ThreadPoolExecutor(run.workers, thread_name_prefix="loretta-method") as mpool, \
                ThreadPoolExecutor(1, thread_name_prefix="loretta-read") as rpool, \
                ThreadPoolExecutor(1, thread_name_prefix="loretta-write") as wpool:
            run.method_pool = mpool if run.workers > 1 else None
            stream = _prefetch(lambda k: run.read(k, by_source[k]), keys, rpool)
            try:
                for key, (w0, buf, full) in stream:
                    if reader.shard_of(key) != shard:  # one device sync per input shard
                        kernel.check_ranges(run.checks)
                        run.checks.clear()
                        shard = reader.shard_of(key)
                    _compute_from(run, wpool, by_source[key], w0, buf, full)
                    if bar is not None:
                        bar.update(reader.nbytes(key))
                for out in by_source.get(None, []):
                    run.compute(wpool, out, None, None)
                run.drain(wpool, -1)
                kernel.check_ranges(run.checks)
                run.wait_for_writer()
            finally:
                stream.close()
                run.reads.close()
                run.full_reads.close()
    finally:
        if bar is not None:
            bar.close()
    files = writer.close()
    r = run.result
    r.files, r.total_bytes = tuple(files), writer.total_bytes
    r.largest_shard_bytes = writer.largest_shard_bytes
    return r


def _compute_from(run: _Pipeline, wpool, outs: list[OutputTensor], w0: torch.Tensor,
                  buf: torch.Tensor | None, full: dict[int, tuple]) -> None:
    """All outputs computed from one base tensor (two when an embedding is untied), then
    the fine-tunes' buffers go back to the pool (after the device has read them)."""
    values = {k: t for k, (t, _) in full.items()}
    # with tensor workers, the last output's merge gives the fine-tunes' buffers back
    release = tuple(b for _, b in full.values()) if run.method_pool is not None else ()
    for i, out in enumerate(outs):
        last = i == len(outs) - 1
        if last:
            run.compute(wpool, out, w0, buf, values, release=release, alone=len(outs) == 1)
        else:  # the buffer must outlive this output: it is released with the last one
            run.compute(wpool, out, w0 if out.ops or w0.dtype != out.dtype else w0.clone(), None,
                        values, alone=False)
    if release:
        return
    event = None
    if full and run.cuda:
        event = torch.cuda.Event()
        event.record()
    for _, ft_buf in full.values():
        run.pool.give(ft_buf, event)


def _progress_bar(reader: CheckpointReader):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=reader.total_bytes(), unit="B", unit_scale=True, desc="merging",
                file=sys.stderr, leave=False)
