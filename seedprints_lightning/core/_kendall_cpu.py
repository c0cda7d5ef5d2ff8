"""Kendall's tau-b on the CPU: one compiled pass per column, columns in parallel (numba).

Per column: order the samples by ``x`` (ties broken by ``y``: the "lex" order), rank ``y``
with ties broken by lex position, and count the inversions of those ranks read in lex
order. With ``n0 = n (n - 1) / 2`` and the tied-pair counts ``t_x``, ``t_y``, ``t_xy``,

    tau_b = (n0 - t_x - t_y + t_xy - 2 * discordant) / sqrt((n0 - t_x) (n0 - t_y)).

Every count is an integer, so the result is exact up to the final division and matches
``scipy.stats.kendalltau`` to float rounding. The two sorts are numpy's (SIMD sorts, much
faster than a compiled comparison sort); the rest is one fused compiled loop per column
whose working set stays in cache. The torch implementation in :mod:`.stats` remains the
path for CUDA tensors (docs/benchmarks.md, "Speed", has the measurement that chose this).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

# numba's default threading layer (workqueue) aborts the process when two Python threads
# launch parallel kernels at once; a user may run tests from several threads.
_KERNEL_LOCK = threading.Lock()


@numba.njit(cache=True, nogil=True)
def _count_inversions(ranks: np.ndarray, scratch: np.ndarray) -> int:
    """Pairs ``p < q`` with ``ranks[p] > ranks[q]``, for a permutation of ``0..n-1``.

    An MSD radix sort that counts as it partitions: at bit ``b`` the values sharing all
    higher bits form one group, and because ``ranks`` is a permutation that group holds
    exactly the values ``[g, g + 2**(b+1))`` at positions ``[g, ...)``. A pair is counted
    at the highest bit where its values differ, as a one before a zero inside a group.
    Branch-free inner loop, O(n log n), ``ranks`` is consumed.
    """
    n = ranks.shape[0]
    inversions = 0
    source, target = ranks, scratch
    b = 0
    while (1 << (b + 1)) < n:
        b += 1
    while b >= 0:
        half = 1 << b
        for start in range(0, n, 2 * half):
            stop = min(start + 2 * half, n)
            ones = 0
            zeros = 0
            for p in range(start, stop):
                value = source[p]
                bit = (value >> b) & 1
                inversions += ones * (1 - bit)
                destination = start + zeros + bit * (half + ones - zeros)
                target[destination] = value
                ones += bit
                zeros += 1 - bit
        source, target = target, source
        b -= 1
    return inversions


@numba.njit(cache=True, nogil=True)
def _run_end(values: np.ndarray, order: np.ndarray, start: int) -> int:
    """One past the last position of the run of equal values that starts at ``start``,
    reading ``values`` in ``order``."""
    end = start + 1
    while end < order.shape[0] and values[order[end]] == values[order[start]]:
        end += 1
    return end


@numba.njit(cache=True, nogil=True)
def _tau_b_column(x: np.ndarray, y: np.ndarray, order_x: np.ndarray, order_y: np.ndarray) -> float:
    n = x.shape[0]
    lex = order_x.copy()
    ties_x = 0
    ties_xy = 0
    i = 0
    while i < n:
        j = _run_end(x, lex, i)
        if j - i > 1:
            # Inside an x tie, put y ascending: x-tied pairs then never count as inversions,
            # and equal (x, y) pairs sit next to each other.
            ties_x += (j - i) * (j - i - 1) // 2
            members = lex[i:j].copy()
            by_y = np.argsort(y[members])
            for t in range(j - i):
                lex[i + t] = members[by_y[t]]
            run = 1
            for t in range(i + 1, j + 1):
                if t < j and y[lex[t]] == y[lex[t - 1]]:
                    run += 1
                else:
                    ties_xy += run * (run - 1) // 2
                    run = 1
        i = j

    lex_position = np.empty(n, dtype=np.int64)
    for p in range(n):
        lex_position[lex[p]] = p
    # ranks[p]: rank of y at lex position p, y ties broken by lex position so that a
    # y-tied pair is never an inversion.
    ranks = np.empty(n, dtype=np.int64)
    ties_y = 0
    i = 0
    while i < n:
        j = _run_end(y, order_y, i)
        if j - i == 1:
            ranks[lex_position[order_y[i]]] = i
        else:
            ties_y += (j - i) * (j - i - 1) // 2
            positions = np.empty(j - i, dtype=np.int64)
            for t in range(j - i):
                positions[t] = lex_position[order_y[i + t]]
            positions.sort()
            for t in range(j - i):
                ranks[positions[t]] = i + t
        i = j

    discordant = _count_inversions(ranks, np.empty(n, dtype=np.int64))
    total = n * (n - 1) // 2
    denominator = np.sqrt(float(total - ties_x) * float(total - ties_y))
    if denominator == 0.0:
        return np.nan  # a constant column has no tau
    return float(total - ties_x - ties_y + ties_xy - 2 * discordant) / denominator


@numba.njit(cache=True, parallel=True)
def _tau_b_from_orders(x, y, order_x, order_y):
    rows = x.shape[0]
    out = np.empty(rows)
    for r in numba.prange(rows):
        out[r] = _tau_b_column(x[r], y[r], order_x[r], order_y[r])
    return out


def tau_b_rows(x: np.ndarray, y: np.ndarray, threads: int) -> np.ndarray:
    """tau-b between matching rows of two ``[m, n]`` float64 arrays, on ``threads`` cores."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    if threads > 1:
        # numpy's sort releases the GIL: sort the two matrices side by side.
        with ThreadPoolExecutor(2) as pool:
            order_x, order_y = pool.map(lambda values: np.argsort(values, axis=1), (x, y))
    else:
        order_x, order_y = np.argsort(x, axis=1), np.argsort(y, axis=1)
    with _KERNEL_LOCK:
        numba.set_num_threads(threads)
        return _tau_b_from_orders(x, y, order_x, order_y)
