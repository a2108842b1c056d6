"""The estimators every summary builds on: the Wilson interval, a percentile, and
Fisher's exact test. Pure numbers, below both the statistics and the bisection that
use them (so neither imports the other to get them)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (0, 1 when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 or k = n the bound is exactly p; rounding must not push it past.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


# Relative tolerance for "as or less likely than the observed table" (as scipy), in log
# space; lgamma's rounding at n = 10^6 is ~1e-9 in absolute terms, well inside it.
_LOG_TIE = 1e-7


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided Fisher exact test p-value for the table [[a, b], [c, d]].

    The hypergeometric terms are computed in log space (``math.lgamma``), so 10^5 to
    10^6 iterations cost microseconds per term instead of exact big-integer products,
    and only the two tails are summed: the distribution is unimodal, every term on the
    observed side of the mode beyond the observation is in, the other tail starts where
    a binary search finds the first term no likelier than the observation, and each
    tail stops once its terms no longer change the sum."""
    n1, n2, m = a + b, c + d, a + c
    n = n1 + n2
    lo, hi = max(0, m - n2), min(m, n1)
    if lo == hi:
        return 1.0
    log_total = _log_comb(n, m)

    def lp(x: int) -> float:
        return _log_comb(n1, x) + _log_comb(n2, m - x) - log_total

    limit = lp(a) + _LOG_TIE
    mode = min(hi, max(lo, (m + 1) * (n1 + 1) // (n + 2)))

    def tail(start: int, stop: int, step: int) -> float:
        total = 0.0
        for x in range(start, stop + step, step):
            term = math.exp(lp(x))
            total += term
            if term < total * 1e-17:
                break
        return total

    def first_unlikely(left: int, right: int, rising: bool) -> int | None:
        """In [left, right], where lp is monotone, the x nearest the mode with lp <= limit."""
        if left > right:
            return None
        if rising:  # lp rises with x (left of the mode): the largest x with lp <= limit
            if lp(left) > limit:
                return None
            while left < right:
                mid = (left + right + 1) // 2
                left, right = (mid, right) if lp(mid) <= limit else (left, mid - 1)
            return left
        if lp(right) > limit:  # lp falls with x (right of the mode): the smallest such x
            return None
        while left < right:
            mid = (left + right) // 2
            left, right = (left, mid) if lp(mid) <= limit else (mid + 1, right)
        return left

    if a <= mode:
        p = tail(a, lo, -1)
        start = first_unlikely(max(mode, a + 1), hi, rising=False)
        if start is not None:
            p += tail(start, hi, 1)
    else:
        p = tail(a, hi, 1)
        end = first_unlikely(lo, min(mode, a - 1), rising=True)
        if end is not None:
            p += tail(end, lo, -1)
    return min(1.0, p)
