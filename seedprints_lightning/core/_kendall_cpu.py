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


def argsort_rows(x: np.ndarray) -> np.ndarray:
    """``np.argsort(x, axis=1)``, the rows split over the threads torch may use (numpy's sort releases the GIL)."""
    import torch

    threads = max(1, min(torch.get_num_threads(), x.shape[0] // 64))
    if threads == 1:
        return np.argsort(x, axis=1)
    out = np.empty(x.shape, dtype=np.intp)
    bounds = np.linspace(0, x.shape[0], threads + 1).astype(int)

    def sort(i: int) -> None:
        out[bounds[i]:bounds[i + 1]] = np.argsort(x[bounds[i]:bounds[i + 1]], axis=1)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(sort, range(threads)))
    return out


@numba.njit(cache=True, parallel=True)
def _tau_b_from_orders_cyclic(x, y, order_x, order_y):
    rows = x.shape[0]
    period = y.shape[0]
    out = np.empty(rows)
    for r in numba.prange(rows):
        out[r] = _tau_b_column(x[r], y[r % period], order_x[r], order_y[r % period])
    return out


def tau_b_sorted_rows(x: np.ndarray, y: np.ndarray, order_x: np.ndarray, order_y: np.ndarray,
                      threads: int) -> np.ndarray:
    """tau-b of the rows of ``x`` (``[m, n]``) against those of ``y`` (``[p, n]``, ``p`` divides ``m``), cyclically.

    Row ``r`` of ``x`` is paired with row ``r % p`` of ``y``: a caller that prepares one target
    (``y``, sorted once: ``order_y``) tests many bases stacked in ``x`` without copying the target.
    The same per-column kernel as :func:`tau_b_rows`, the ``m`` rows spread over ``threads`` cores.
    """
    if x.shape[0] % max(y.shape[0], 1) or x.shape[1] != y.shape[1]:
        raise ValueError(f"x {x.shape} must stack whole copies of y's rows {y.shape}")
    threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    with _KERNEL_LOCK:
        numba.set_num_threads(threads)
        return _tau_b_from_orders_cyclic(x, y, order_x, order_y)


@numba.njit(cache=True, nogil=True)
def _tau_b_ranked_column(r: np.ndarray, order_y: np.ndarray, tree: np.ndarray, counts: np.ndarray) -> float:
    """tau-b of dense ranks ``r`` (ties equal) against a target column with NO ties, read in its order ``order_y``.

    With the target strictly ordered, a pair is discordant when the ranks, read in target
    order, fall (an inversion), tied when they are equal; so ``tau_b = (n0 - t_x - 2 d) /
    sqrt((n0 - t_x) n0)``. The inversions are counted with a Fenwick tree over the rank values:
    O(n log n), no sort, no allocation (``tree`` and ``counts`` are the caller's scratch).
    """
    n = r.shape[0]
    for v in range(n + 1):
        tree[v] = 0
        counts[v] = 0
    discordant = 0
    for p in range(n):
        value = r[order_y[p]] + 1  # 1-based for the tree
        counts[value] += 1
        seen = 0  # earlier values <= value
        i = value
        while i > 0:
            seen += tree[i]
            i -= i & (-i)
        discordant += p - seen
        i = value
        while i <= n:
            tree[i] += 1
            i += i & (-i)
    ties_x = 0
    for v in range(n + 1):
        ties_x += counts[v] * (counts[v] - 1) // 2
    total = n * (n - 1) // 2
    if total - ties_x == 0:
        return np.nan  # a constant column has no tau
    return float(total - ties_x - 2 * discordant) / np.sqrt(float(total - ties_x) * float(total))


@numba.njit(cache=True, parallel=True)
def _tau_b_from_ranks(ranks, y, order_y):
    m, s, n = ranks.shape
    out = np.empty((m, s))
    # Which target columns have ties (then the general kernel is used for them).
    y_tied = np.zeros(s, dtype=np.bool_)
    for j in range(s):
        for p in range(1, n):
            if y[j, order_y[j, p]] == y[j, order_y[j, p - 1]]:
                y_tied[j] = True
                break
    for job in numba.prange(m * s):
        c = job // s
        j = job % s
        r = ranks[c, j]
        if not y_tied[j]:
            out[c, j] = _tau_b_ranked_column(r, order_y[j], np.empty(n + 1, dtype=np.int64),
                                             np.empty(n + 1, dtype=np.int64))
            continue
        # A stable counting sort of the dense ranks: the order the kernel needs, in O(n).
        counts = np.zeros(n + 1, dtype=np.int64)
        for p in range(n):
            counts[r[p] + 1] += 1
        for v in range(n):
            counts[v + 1] += counts[v]
        order = np.empty(n, dtype=np.int64)
        for p in range(n):
            order[counts[r[p]]] = p
            counts[r[p]] += 1
        out[c, j] = _tau_b_column(r, y[j], order, order_y[j])
    return out


def tau_b_ranked_rows(ranks: np.ndarray, y: np.ndarray, order_y: np.ndarray, threads: int) -> np.ndarray:
    """tau-b of ``m`` bases' ranked columns against a target's, ``[m, s]``.

    ``ranks`` is ``[m, s, n]`` dense integer ranks (ties equal) of the bases' ``s`` columns,
    ``y`` the target's matching ``[s, n]`` float64 values and ``order_y`` their sort order. The
    ``m * s`` columns are spread over ``threads`` cores.
    """
    ranks = np.ascontiguousarray(ranks)
    if ranks.dtype not in (np.int16, np.int32, np.int64):
        ranks = ranks.astype(np.int64)
    threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    with _KERNEL_LOCK:
        numba.set_num_threads(threads)
        return _tau_b_from_ranks(ranks, np.ascontiguousarray(y, dtype=np.float64),
                                 np.ascontiguousarray(order_y, dtype=np.int64))
