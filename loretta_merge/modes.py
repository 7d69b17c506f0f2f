"""Mode shapes for tensor trains: the LoRETTA paper's table and a balanced factoriser for
any width (primes included). Pure Python; :mod:`loretta_merge.tt` re-exports the public names.
"""

from __future__ import annotations

import math

from .errors import ConfigError

# Mode shapes used by the LoRETTA paper, ``PAPER_SHAPES[bottleneck][dim]``: the TT of a
# (dim, bottleneck) or (bottleneck, dim) matrix. Product = dim * bottleneck.
_WIDTHS = (768, 1024, 1280, 1536, 1600, 2304, 4096, 5120, 8192)
_TABLE = {
    5: ("5,8,12,8", "4,8,5,8,4", "4,8,5,8,5", "4,8,5,8,6", "5,8,5,8,5", "5,8,8,4,9",
        "16,16,5,4,4", "5,8,10,8,8", "4,16,16,10,4"),
    8: ("8,8,12,8", "4,8,8,8,4", "4,8,8,8,5", "4,8,8,8,6", "5,8,8,8,5", "8,8,8,4,9",
        "16,16,8,4,4", "8,8,10,8,8", "4,16,16,16,4"),
    16: ("8,16,12,8", "4,8,16,8,4", "4,8,16,8,5", "4,8,16,8,6", "5,8,16,8,5", "8,8,8,8,9",
         "16,16,16,4,4", "8,16,10,8,8", "4,16,16,16,8"),
    32: ("4,8,12,8,8", "4,8,16,8,4", "4,8,16,8,5", "4,8,16,8,6", "5,8,16,8,5",
         "8,8,16,8,9", "16,16,16,4,4", "8,16,10,8,8", "4,16,16,16,8"),
    64: ("8,8,12,8,8", "4,8,8,8,8,4", "4,8,8,8,8,5", "4,8,8,8,8,6", "5,8,8,8,8,5",
         "8,8,8,8,8,9", "16,16,16,4,4,4", "5,8,8,16,8,8", "4,16,16,16,8,4"),
    128: ("8,16,12,8,8", "4,8,16,8,8,4", "4,8,16,8,8,5", "4,8,16,8,8,6", "5,8,16,8,8,5",
          None, "16,16,16,8,4,4", "5,8,16,16,8,8", "4,16,16,16,16,4"),
}
PAPER_SHAPES: dict[int, dict[int, tuple[int, ...]]] = {
    b: {w: tuple(int(x) for x in s.split(",")) for w, s in zip(_WIDTHS, row) if s}
    for b, row in _TABLE.items()
}
PAPER_SQUARE_SHAPES: dict[int, tuple[int, ...]] = {
    768: (8, 8, 12, 12, 8, 8), 1024: (4, 8, 8, 16, 8, 8, 4), 1280: (4, 4, 8, 8, 8, 8, 5, 5),
    1536: (4, 4, 8, 8, 8, 8, 6, 6), 1600: (5, 5, 8, 8, 8, 8, 5, 5),
    2304: (4, 4, 8, 8, 8, 8, 9, 9), 4096: (4, 4, 16, 16, 16, 16, 4, 4),
    5120: (8, 8, 8, 10, 10, 8, 8), 8192: (4, 4, 16, 16, 16, 16, 8, 8),
}



def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}; pass an integer >= {minimum}")
    return value


# --------------------------------------------------------------------------- mode shapes

def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def factorize(n: int, n_modes: int | None = None, *, target: int = 8) -> list[int]:
    """Split a positive integer into ``n_modes`` balanced factors (sorted descending) whose
    product is ``n``. The default count is ``round(log(n) / log(target))``. Factors of 1 are
    dropped, so fewer modes come back when ``n`` has too few prime factors (a prime comes
    back as itself)."""
    check_int("n", n)
    if n == 1:
        return [1]
    primes = sorted(_prime_factors(n), reverse=True)
    if n_modes is None:
        n_modes = max(1, round(math.log(n) / math.log(target)))
    check_int("n_modes", n_modes)
    bins = [1] * min(n_modes, len(primes))
    for p in primes:  # longest-processing-time greedy: put each factor in the smallest bin
        i = min(range(len(bins)), key=lambda j: bins[j])
        bins[i] *= p
    return sorted(bins, reverse=True)


def matrix_modes(rows: int, cols: int, *, shapes: str = "paper", target: int = 8) -> list[int]:
    """Mode sizes for the TT of a ``(rows, cols)`` matrix.

    ``shapes="paper"`` returns the LoRETTA paper's table entry when it has one (a
    ``dim x bottleneck`` matrix in either orientation, or a square ``dim x dim`` one);
    otherwise, and always with ``shapes="auto"``, rows and cols are factorised separately
    into balanced modes of about ``target`` and concatenated, so the row/column boundary is
    a TT bond. The product of the modes is always ``rows * cols``.
    """
    check_int("rows", rows)
    check_int("cols", cols)
    if shapes not in ("paper", "auto"):
        raise ConfigError(f"shapes must be 'paper' or 'auto', got {shapes!r}; pass 'paper' or 'auto' (--shapes)")
    if shapes == "paper":
        # Some entries of the reference table do not multiply to dim * bottleneck (b=32 for
        # most widths, b=64 for 2304, square 5120): those are skipped, never used.
        candidates = []
        if rows == cols and rows in PAPER_SQUARE_SHAPES:
            candidates.append(PAPER_SQUARE_SHAPES[rows])
        for dim, b in ((rows, cols), (cols, rows)):
            if b in PAPER_SHAPES and dim in PAPER_SHAPES[b]:
                candidates.append(PAPER_SHAPES[b][dim])
        for modes in candidates:
            if math.prod(modes) == rows * cols:
                return list(modes)
    modes: list[int] = []
    for side in (rows, cols):
        if side > 1:
            modes += factorize(side, target=target)
    return modes or [1]
