"""The process's own peak memory, as reports print it (torch-free, so a benchmark can read it
before importing anything heavy)."""

from __future__ import annotations

import sys


def peak_rss_bytes() -> int:
    """This process's own peak resident set (``VmHWM`` of ``/proc/self/status`` on Linux).

    Not ``ru_maxrss``: Linux carries the parent's peak into a child across ``fork``/``exec``
    (a child of a 1 GiB process reports at least 1 GiB, whatever it used), so a command started
    by a large process, or a benchmark whose parent generated its checkpoint in memory, would
    report that. Elsewhere: ``ru_maxrss`` (bytes on macOS, KiB on other systems)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
