"""Reading the base and the fine-tune for ``extract``, one tensor ahead of the work.

:class:`DeltaPrefetch` walks the pair's tensors in checkpoint order on a reader thread:
unchanged tensors are recognised (big untargeted ones compared piece by piece, never held
twice), changed untargeted ones handed over whole, and each targeted weight's fp32 delta
formed, with its squared norm, in one of two reused buffers while the caller decomposes the
previous one.
"""

from __future__ import annotations

import math
import queue
import threading

import torch

from ..io import CheckpointReader
from .extract_plan import ExtractPlan
from .lowrank import frobenius_sq

STREAM_COMPARE = 32 * 2**20     # bytes: untargeted tensors this big are compared in pieces


def same_bytes(reader: CheckpointReader, key: str, t: torch.Tensor) -> bool:
    """Whether ``reader``'s stored ``key`` has exactly ``t``'s bytes (same dtype and shape
    checked by the caller and the plan), read 16 MiB at a time."""
    flat = t.contiguous().view(-1).view(torch.uint8)
    done = 0
    for piece in reader.iter_bytes(key):
        if not torch.equal(piece, flat[done:done + piece.numel()]):
            return False
        done += piece.numel()
    return done == flat.numel()


class DeltaPrefetch:
    """The pair's tensors in checkpoint order, prepared on a thread one tensor ahead of the
    work: while the caller decomposes one delta, the thread reads the next pair, forms its
    fp32 delta and ``||delta||^2`` (positioned reads and torch ops release the GIL, so both
    cores work). Items are ``(kind, key, payload, norm_sq)``:

    * ``"same"``: unchanged; ``"carry"``: changed or only in the fine-tune, not targeted
      (``payload`` the fine-tune's tensor, kept whole); ``"nonfinite"``: a targeted delta
      with NaN/Inf values;
    * ``"target"``: ``payload = (delta, token)``, the delta on ``device`` in one of two
      reused fp32 buffers (on the CPU: no fresh pages faulted in per tensor), handed back
      with :meth:`release` once decomposed; memory holds at most two deltas.

    An error on the thread is raised by the iteration; :meth:`close` stops the thread."""

    def __init__(self, plan: ExtractPlan, base_r: CheckpointReader, ft_r: CheckpointReader,
                 keys: list[str], device: torch.device) -> None:
        self.plan, self.base_r, self.ft_r, self.keys, self.device = plan, base_r, ft_r, keys, device
        self.added = set(plan.added)
        size = max((max(base_r.nbytes(k), ft_r.nbytes(k)) for k in plan.targets), default=0)
        numel = max((math.prod(ft_r.shape(k)) for k in plan.targets), default=0)
        self._raw = (torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8))
        cpu = device.type == "cpu"
        self._wide = torch.empty(numel if cpu else 0, dtype=torch.float32)   # w0 in fp32
        self._free: queue.Queue = queue.Queue()
        for _ in range(2):   # on a GPU the allocator reuses memory itself: tokens bound it
            self._free.put(torch.empty(numel, dtype=torch.float32) if cpu else None)
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="extract-reader", daemon=True)
        self._thread.start()

    def _wait(self, call, *args):
        while not self._stop.is_set():
            try:
                return call(*args, timeout=0.1)
            except (queue.Full, queue.Empty):
                continue
        raise _Stopped

    def _delta(self, w1: torch.Tensor, w0: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
        """``w1 - w0`` in fp32 on the device, exactly as ``w1.float() - w0.float()``."""
        if buf is None:
            d = w1.to(self.device).float()        # stored dtype over the bus, widened there
            return d.sub_(w0.to(self.device).float())
        d = buf[:w1.numel()].view(w1.shape)
        if w1.dtype == torch.float32 and w0.dtype == torch.float32:
            return torch.sub(w1, w0, out=d)
        d.copy_(w1)                               # widen each (one pass), then a same-dtype
        t = self._wide[:w0.numel()].view(w0.shape)  # subtraction (a mixed-dtype one is
        t.copy_(w0)                               # several times slower)
        return d.sub_(t)

    def _read(self, key: str):
        ft_r, base_r = self.ft_r, self.base_r
        if key in self.added:
            return "carry", key, ft_r.get(key), None
        if key not in self.plan.targets:
            w1 = ft_r.get(key)
            if w1.nbytes >= STREAM_COMPARE and base_r.dtype(key) == w1.dtype:
                # a big untargeted tensor (embeddings, a head): compared piece by piece, so
                # the base's copy is never held beside the fine-tune's
                same = same_bytes(base_r, key, w1)
            else:
                same = torch.equal(base_r.get(key), w1)
            return ("same" if same else "carry"), key, w1, None
        buf = self._wait(self._free.get)
        w1, w0 = ft_r.get(key, out=self._raw[1]), base_r.get(key, out=self._raw[0])
        d = self._delta(w1, w0, buf)
        # zero: unchanged (a difference of two floats is 0 only where they are equal); a
        # finite norm proves every element finite (far cheaper than isfinite(d).all())
        norm_sq = frobenius_sq(d)
        finite = math.isfinite(norm_sq) or bool(torch.isfinite(d).all())
        if norm_sq == 0 or (not finite and torch.equal(w0, w1)):
            self._free.put(buf)
            return "same", key, None, None
        if not finite:
            self._free.put(buf)
            return "nonfinite", key, None, None
        return "target", key, (d, buf), norm_sq

    def _run(self) -> None:
        try:
            for key in self.keys:
                self._wait(self._ready.put, self._read(key))
            self._wait(self._ready.put, None)
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - raised again by the consumer
            try:
                self._wait(self._ready.put, exc)
            except _Stopped:
                return

    def __iter__(self):
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, token) -> None:
        self._free.put(token)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _Stopped(Exception):
    """The consumer stopped reading (an error): the reader thread ends."""
