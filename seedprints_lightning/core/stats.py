"""The SeedPrints lineage test: a pure-function statistical core.

Data flow: two feature matrices ``[n, D]`` (last-position hidden states of two models on the
same probe inputs) -> identity dimensions -> per-row softmax normalisation -> per-dimension
Kendall tau -> ``z`` against a null -> :class:`LineageResult`.

Everything here is torch tensor arithmetic, so CUDA inputs stay on the GPU, and nothing here
knows about Lightning. The formulas are those of the SeedPrints paper (Tong et al., ICLR
2026), written from ``docs/method.md``:

* identity dimensions: the ``k`` coordinates with the smallest mean over the samples
  ("disliked" dimensions); ``coset`` intersects both models' sets, ``base`` uses the base's;
* rows normalised by ``softmax(x / T)`` over the chosen dimensions;
* ``tau_mean`` = mean over dimensions of Kendall's tau-b between the two columns;
* under H0 one tau has mean 0 and ``sigma_n = sqrt(2 (2n + 5) / (9 n (n - 1)))``, so
  ``z = tau_mean / (sigma_n / sqrt(k))``;
* ``p = 1 - Phi(z)``, ONE-SIDED as in the paper. The authors' code doubles it; we do not
  (``LineageResult.p_sided == "one-sided"`` says so in every result).

``log10_p`` is always computed in log space (``scipy.special.log_ndtr``), because p-values
like 1e-100000 are ordinary here and ``log10(p)`` of an underflowed float is ``-inf``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from scipy import special
from scipy import stats as sps

from ._kendall_cpu import argsort_rows, tau_b_ranked_rows, tau_b_rows, tau_b_sorted_rows
from .checks import check_bool, check_choice, check_int, check_number
from .errors import InputError

__all__ = [
    "DEFAULT_IDENTITY_RATIO",
    "DEFAULT_TEMPERATURE",
    "EmpiricalNull",
    "feature_matrix",
    "LineageResult",
    "PreparedTarget",
    "SubsetBounds",
    "check_test_options",
    "kendall_tau_b",
    "kendall_null_sigma",
    "log10_normal_sf",
    "normalised_column_ranks",
    "resolve_identity_k",
    "prepared_pair_taus",
    "softmax_normalise",
    "subset_tau_bounds",
    "lineage_test",
    "z_threshold",
]

# Fraction of the hidden size used as identity dimensions. 1.0 (every dimension) had the
# most power in every measurement (docs/method.md tables; docs/benchmarks.md), and with the
# negative controls the callback does not rely on the smaller, paper-default 10 %.
DEFAULT_IDENTITY_RATIO = 1.0
DEFAULT_TEMPERATURE = 10.0
_LN10 = math.log(10.0)

FeatureLike = Any  # torch.Tensor | np.ndarray


@dataclass(frozen=True)
class LineageResult:
    """Outcome of one lineage test of ``target`` against ``base``.

    ``related`` is ``True``/``False`` at ``alpha``, or ``None`` when the test could not be
    made (``reason`` says why). Undetermined results carry ``z = 0.0`` and ``log10_p = 0.0``
    (p = 1: no evidence), never NaN, so they can be logged safely.
    """

    z: float
    log10_p: float
    p_value: float
    tau_mean: float
    k: int
    n: int
    related: bool | None
    alpha: float
    method: str = "analytic"
    identity_mode: str = "coset"
    reason: str | None = None
    dropped_constant: int = 0
    identity_dims: tuple[int, ...] = field(default=(), repr=False)
    z_agg: float | None = None
    p_sided: str = "one-sided"

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed dict for JSON (identity dims included as a list)."""
        out = asdict(self)
        out["identity_dims"] = list(self.identity_dims)
        return out

    def summary(self) -> str:
        """One readable line: the verdict with its figures."""
        if self.related is None:
            return f"undetermined ({self.reason}); n={self.n}, k={self.k}"
        verdict = "RELATED (same lineage)" if self.related else "unrelated"
        return (
            f"{verdict}: z={self.z:.2f}, log10 p={self.log10_p:.2f}, tau_mean={self.tau_mean:.4f}, "
            f"k={self.k} dims, n={self.n}, alpha={self.alpha:g} ({self.p_sided})"
        )


# --------------------------------------------------------------------------------------
# Small formulas
# --------------------------------------------------------------------------------------


def kendall_null_sigma(n: int) -> float:
    """Std of one Kendall tau between independent samples of size ``n`` (no ties)."""
    if n < 3:
        raise InputError(f"Kendall's null needs n >= 3 samples, got n={n}")
    return math.sqrt(2.0 * (2 * n + 5) / (9.0 * n * (n - 1)))


def log10_normal_sf(z: float) -> float:
    """``log10(1 - Phi(z))`` computed in log space: finite for any finite ``z``."""
    return float(special.log_ndtr(-float(z)) / _LN10)


def _check_alpha(alpha: float) -> None:
    check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)


def z_threshold(alpha: float) -> float:
    """The one-sided z above which ``p < alpha``."""
    _check_alpha(alpha)
    return float(sps.norm.isf(alpha))


# --------------------------------------------------------------------------------------
# Kendall tau-b, vectorised over columns, O(n log n) per column
# --------------------------------------------------------------------------------------


_COLUMN_CHUNK = 32  # columns processed end to end at once: keeps a chunk's work in cache.


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort exactly like the float64 values (sorting ints is faster)."""
    bits = (values.to(torch.float64) + 0.0).view(torch.int64)  # + 0.0 turns -0.0 into +0.0
    # Negative floats order backwards as signed ints: flip their magnitude bits.
    return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


def _tied_pairs(sorted_values: torch.Tensor) -> torch.Tensor:
    """Per row, the number of tied pairs, sum over tie groups of t(t-1)/2, of sorted rows."""
    rows, n = sorted_values.shape
    positions = torch.arange(n, device=sorted_values.device).expand(rows, n)
    is_new = torch.ones_like(sorted_values, dtype=torch.bool)
    is_new[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    group_start = torch.cummax(torch.where(is_new, positions, torch.zeros_like(positions)), dim=1).values
    # Element i of a tie group is tied with the (i - start) members before it.
    return (positions - group_start).sum(dim=1)


def _has_ties(sorted_values: torch.Tensor) -> bool:
    return bool((sorted_values[:, 1:] == sorted_values[:, :-1]).any())


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    rows, n = order.shape
    positions = torch.arange(n, device=order.device).expand(rows, n)
    return torch.empty_like(order).scatter_(1, order, positions)


@lru_cache(maxsize=256)
def _group_correction(n: int, b: int) -> int:
    """Column-independent part of the level-``b`` pair count for a permutation of 0..n-1.

    At level ``b`` the sequence is stably partitioned by all higher bits, in bit-reversed
    order of the higher-bit prefix. Group ``p`` holds exactly the values
    ``[p * 2**(b+1), (p+1) * 2**(b+1)) & [0, n)``, so how many zeros each group has and how
    many ones precede it are fixed by ``n``: only the order inside groups is data.
    """
    size, half = 1 << (b + 1), 1 << b
    prefix_bits = max(0, (n - 1).bit_length() - (b + 1))
    groups = []
    for p in range((n + size - 1) // size):
        members = min(n, (p + 1) * size) - p * size
        zeros = min(members, half)
        reversed_prefix = int(format(p, f"0{prefix_bits}b")[::-1], 2) if prefix_bits else 0
        groups.append((reversed_prefix, zeros, members - zeros))
    correction, ones_before = 0, 0
    for _, zeros, ones in sorted(groups):
        correction += zeros * ones_before
        ones_before += ones
    return correction


def _count_inversions(perm: torch.Tensor) -> torch.Tensor:
    """Pairs ``j < i`` with ``perm[j] > perm[i]`` in each row of a ``[rows, n]`` permutation.

    A wavelet-matrix sweep from the most significant bit down: a pair is counted once, at
    the highest bit where its two values differ, as "a 1 there before a 0 there" among
    elements that share all higher bits. A stable partition by each bit keeps those groups
    contiguous and in sequence order, so a level is one cumsum, one sum and one scatter
    over the block: O(n log n) per row, no Python loop over samples, and it runs unchanged
    on CUDA. Because ``perm`` is a permutation, the part of the count that depends on where
    groups start is a constant (:func:`_group_correction`).
    """
    rows, n = perm.shape
    device = perm.device
    small = torch.int16 if n < 2**15 else torch.int32
    sum_dtype = torch.int32 if n < 46_000 else torch.int64
    positions = torch.arange(n, device=device, dtype=small)
    seq = perm.to(small)
    total = torch.zeros(rows, dtype=torch.int64, device=device)
    for b in range(max(1, (n - 1).bit_length()) - 1, -1, -1):
        block, rest = divmod(n, 1 << (b + 1))
        ones_total = block * (1 << b) + max(0, rest - (1 << b))
        bit = (seq & (1 << b)) != 0
        ones_incl = torch.cumsum(bit, dim=1, dtype=small)
        # Sum over zeros of "ones before it" = sum over all of ones_incl minus the ones'
        # own 1 + 2 + ... + T, minus what precedes each group's start.
        level = ones_incl.sum(dim=1, dtype=sum_dtype).to(torch.int64)
        total += level - ones_total * (ones_total + 1) // 2 - _group_correction(n, b)
        if b == 0:
            break
        dest = torch.where(bit, ones_incl + (n - ones_total - 1), positions - ones_incl)
        seq = torch.empty_like(seq).scatter_(1, dest.to(torch.int64), seq)
    return total


def _kendall_chunk(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """tau-b for rows of ``x``, ``y`` (``[m, n]``: one column of the caller per row)."""
    n = x.shape[1]
    y_keys = _order_keys(y)
    y_sorted, y_order = torch.sort(y_keys, dim=1, stable=True)
    x_keys = _order_keys(x)
    x_sorted, lex = torch.sort(x_keys, dim=1, stable=True)
    x_ties, y_ties = _has_ties(x_sorted), _has_ties(y_sorted)
    if x_ties:
        # Lexicographic (x, y) order: stable sort by x of the y-ordered sequence. Inside an
        # x tie y is then ascending, so x-tied pairs never count as discordant.
        _, by_x = torch.sort(torch.gather(x_keys, 1, y_order), dim=1, stable=True)
        lex = torch.gather(y_order, 1, by_x)
    if y_ties:
        # Rank y with ties broken by position in lex order: a y-tied pair then never counts
        # as an inversion, and the ranks form a permutation.
        y_in_lex = torch.gather(y_keys, 1, lex)
        _, order_in_lex = torch.sort(y_in_lex, dim=1, stable=True)
        perm = _inverse_permutation(order_in_lex)
    else:
        perm = torch.gather(_inverse_permutation(y_order), 1, lex)
    discordant = _count_inversions(perm)

    n0 = n * (n - 1) // 2
    zeros = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    ties_x = _tied_pairs(x_sorted) if x_ties else zeros
    ties_y = _tied_pairs(y_sorted) if y_ties else zeros
    ties_xy = zeros
    if x_ties and y_ties:
        # Joint ties: runs of equal (x, y) in lex order, found as ties of one packed dense key.
        x_lex = torch.gather(x_keys, 1, lex)
        x_new = (x_lex[:, 1:] != x_lex[:, :-1]).long()
        x_dense = torch.cumsum(torch.cat([torch.zeros_like(x_lex[:, :1]), x_new], 1), 1)
        y_dense = torch.empty_like(y_order).scatter_(
            1, y_order, torch.cumsum(torch.cat([torch.zeros_like(y_sorted[:, :1]),
                                                (y_sorted[:, 1:] != y_sorted[:, :-1]).long()], 1), 1))
        ties_xy = _tied_pairs(x_dense * n + torch.gather(y_dense, 1, lex))
    numerator = n0 - ties_x - ties_y + ties_xy - 2 * discordant
    denominator = torch.sqrt((n0 - ties_x).double() * (n0 - ties_y).double())
    return numerator.double() / denominator


def kendall_tau_b(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b between matching columns of ``x`` and ``y`` (both ``[n, m]``).

    Returns ``[m]`` float64 on the inputs' device. Exact (integer pair counts), so it
    matches ``scipy.stats.kendalltau`` (variant "b") to float rounding, ties included. A
    column constant in ``x`` or ``y`` has no defined tau and gives NaN here;
    :func:`lineage_test` drops such columns before calling this.
    """
    if x.dim() != 2 or x.shape != y.shape:
        raise InputError(f"kendall_tau_b needs two [n, m] tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.shape[0] < 2:
        raise InputError(f"Kendall's tau needs at least 2 samples, got {x.shape[0]}")
    if x.device.type == "cpu":
        # The compiled per-column kernel (x3 and more over the torch sweep on a CPU).
        # detach: a rank statistic has no gradient, and numpy cannot view a grad-tracking tensor.
        taus = tau_b_rows(x.detach().t().to(torch.float64).numpy(), y.detach().t().to(torch.float64).numpy(),
                          threads=torch.get_num_threads())
        return torch.from_numpy(taus)
    return _kendall_tau_b_torch(x, y)


def _kendall_tau_b_torch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The vectorised torch implementation: the path for CUDA tensors (any device works)."""
    xt, yt = x.t(), y.t()
    return torch.cat([
        _kendall_chunk(xt[i:i + _COLUMN_CHUNK].contiguous(), yt[i:i + _COLUMN_CHUNK].contiguous())
        for i in range(0, xt.shape[0], _COLUMN_CHUNK)
    ])


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _as_float_matrix(features: FeatureLike, name: str) -> torch.Tensor:
    if isinstance(features, np.ndarray):
        if not (np.issubdtype(features.dtype, np.floating)):
            raise InputError(
                f"{name} has dtype {features.dtype}; lineage_test needs floating-point hidden states "
                "(cast with .astype(np.float32) if these really are features)"
            )
        # torch cannot wrap non-native byte order (e.g. big-endian files): convert first.
        tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=features.dtype.newbyteorder("=")))
    elif isinstance(features, torch.Tensor):
        tensor = features.detach()
    else:
        raise InputError(f"{name} must be a torch.Tensor or numpy.ndarray of shape [n, D], got "
                         f"{type(features).__name__}")
    if not tensor.is_floating_point():
        raise InputError(
            f"{name} has dtype {tensor.dtype}; lineage_test needs floating-point hidden states "
            "(cast with .float() if these really are features)"
        )
    if tensor.dim() != 2:
        raise InputError(f"{name} must be 2-D [n_samples, hidden_dim], got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(tensor.shape)}); probe at least 3 samples of at least 2 "
                         "dimensions")
    finite = torch.isfinite(tensor).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise InputError(
            f"{name} has {len(bad)} of {tensor.shape[0]} rows with NaN or Inf (rows {shown}); "
            "the model produced non-finite hidden states on these probes: check for overflow "
            "(e.g. fp16) or diverged weights"
        )
    # Kept in its own dtype: the float64 copies are made after the identity dims are chosen
    # (softmax_normalise), so only the k columns tested are ever widened.
    return tensor


def resolve_identity_k(dim: int, identity_k: int | None, identity_ratio: float | None) -> int:
    """How many identity dimensions a test of width ``dim`` uses (``identity_k``, or ``identity_ratio`` of ``dim``).

    Args:
        dim: ``D``, the features' width.
        identity_k: a count of dimensions, or ``None``.
        identity_ratio: a fraction of ``D`` (default :data:`DEFAULT_IDENTITY_RATIO`), or ``None``.

    The one rule :func:`lineage_test` applies; a caller that batches tests (the audit) uses it to
    know when every column is an identity dimension, so one preparation serves every pair.

    Raises:
        InputError: both given, or a count or fraction that leaves fewer than 2 dimensions.
    """
    if identity_k is not None and identity_ratio is not None:
        raise InputError("give identity_k (a count) or identity_ratio (a fraction of D), not both")
    if identity_k is not None:
        check_int("identity_k", identity_k, low=2)
        if identity_k > dim:
            raise InputError(f"identity_k={identity_k} is larger than the feature dimension D={dim}; use at most {dim}")
        return int(identity_k)
    ratio = DEFAULT_IDENTITY_RATIO if identity_ratio is None else identity_ratio
    check_number("identity_ratio", ratio, low=0.0, high=1.0, low_open=True, hint="a fraction of D")
    k = min(dim, int(round(float(ratio) * dim)))
    if k < 2:
        raise InputError(
            f"identity_ratio={ratio} of D={dim} gives {k} identity dimension(s); the test needs at least 2: "
            "raise identity_ratio or give identity_k"
        )
    return k


def _identity_dims(base: torch.Tensor, target: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """Indices (sorted, int64) of the identity dimensions: the ``k`` smallest column means (``coset``: of both)."""
    base_dims = torch.topk(base.mean(dim=0, dtype=torch.float64), k, largest=False).indices
    if mode == "base":
        return torch.sort(base_dims).values
    target_dims = torch.topk(target.mean(dim=0, dtype=torch.float64), k, largest=False).indices
    in_target = torch.zeros(base.shape[1], dtype=torch.bool, device=base.device)
    in_target[target_dims] = True
    return torch.sort(base_dims[in_target[base_dims]]).values


def softmax_normalise(features: torch.Tensor, dims: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-wise ``softmax(x[:, dims] / T)`` in float64, ``[n, len(dims)]``.

    Computed on the transpose and returned as its view (column-major storage): the Kendall
    kernel reads one column at a time, and this saves it a transposing copy. The columns
    are gathered before they are widened to float64, which halves the bytes moved.
    """
    transposed = features.t()
    if dims.numel() == transposed.shape[0] and bool((dims == torch.arange(dims.numel(), device=dims.device)).all()):
        columns = transposed.to(torch.float64, memory_format=torch.contiguous_format, copy=True)  # no gather
    else:
        columns = transposed.index_select(0, dims).to(torch.float64)
    return torch.softmax(columns.div_(temperature), dim=0).t()


# --------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmpiricalNull:
    """Options of ``method="empirical"``: the null taus come from random matrices.

    ``draws`` matrices of ``N(0, I)`` noise replace ``base``, pass through the same
    normalisation (re-selecting identity dims when ``reselect``, else reusing the observed
    ones), and the observed per-dimension taus are compared with the null taus by ``test``
    (Welch t or Mann-Whitney U). Seeded by ``seed``; the global RNG is not touched.
    Validated when built, so a bad option fails before any test runs.
    """

    draws: int = 4
    seed: int = 0
    reselect: bool = True
    test: Literal["ttest", "mannwhitney"] = "ttest"

    def __post_init__(self) -> None:
        check_int("EmpiricalNull.draws", self.draws, low=1)
        check_int("EmpiricalNull.seed", self.seed, low=0)
        check_bool("EmpiricalNull.reselect", self.reselect)
        check_choice("EmpiricalNull.test", self.test, ("ttest", "mannwhitney"))


@dataclass(frozen=True)
class _Signal:
    """One test statistic on the analytic scale, with its one-sided p in log10."""

    z: float
    log10_p: float


def _undetermined(n: int, k: int, alpha: float, method: str, mode: str, reason: str, dropped: int = 0,
                  dims: tuple[int, ...] = ()) -> LineageResult:
    return LineageResult(
        z=0.0, log10_p=0.0, p_value=1.0, tau_mean=0.0, k=k, n=n, related=None, alpha=alpha,
        method=method, identity_mode=mode, reason=reason, dropped_constant=dropped, identity_dims=dims,
    )


def _empirical_tails(observed: torch.Tensor, null: torch.Tensor, test: str) -> tuple[float, float]:
    """Natural-log upper and lower tail probabilities that observed taus exceed the null's.

    Both tails are returned so that ``z`` stays finite for anti-related pairs, where the
    upper tail rounds to 1 and its normal quantile would be infinite.
    """
    obs = observed.double().cpu().numpy()
    nul = null.double().cpu().numpy()
    if test == "ttest":
        v1, v2 = obs.var(ddof=1) / len(obs), nul.var(ddof=1) / len(nul)
        se = math.sqrt(v1 + v2)
        if se == 0.0:
            return math.log(0.5), math.log(0.5)
        t = (obs.mean() - nul.mean()) / se
        df = (v1 + v2) ** 2 / (v1**2 / (len(obs) - 1) + v2**2 / (len(nul) - 1))
        upper, lower = float(sps.t.logsf(t, df)), float(sps.t.logcdf(t, df))
        # scipy's t tails underflow to -inf for extreme t; the normal tail is finite there
        # and only more extreme, which cannot change a verdict that far out.
        upper = upper if math.isfinite(upper) else float(special.log_ndtr(-t))
        lower = lower if math.isfinite(lower) else float(special.log_ndtr(t))
        return upper, lower
    # Mann-Whitney U, normal approximation with tie correction.
    n1, n2 = len(obs), len(nul)
    ranks = sps.rankdata(np.concatenate([obs, nul]))
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    _, tie_counts = np.unique(ranks, return_counts=True)
    big_n = n1 + n2
    tie_term = (tie_counts**3 - tie_counts).sum() / (big_n * (big_n - 1))
    sigma = math.sqrt(n1 * n2 / 12.0 * ((big_n + 1) - tie_term))
    if sigma == 0.0:
        return math.log(0.5), math.log(0.5)
    u_z = (u - n1 * n2 / 2.0) / sigma
    return float(special.log_ndtr(-u_z)), float(special.log_ndtr(u_z))


def _analytic_signal(taus: torch.Tensor, n: int) -> _Signal:
    """Mean tau against the closed-form Kendall null: ``z = tau_mean / (sigma_n / sqrt(k))``."""
    z = float(taus.mean()) / (kendall_null_sigma(n) / math.sqrt(taus.numel()))
    return _Signal(z=z, log10_p=log10_normal_sf(z))


def _empirical_signal(taus: torch.Tensor, target: torch.Tensor, dims: torch.Tensor, k_requested: int, mode: str,
                      temperature: float, null: EmpiricalNull) -> _Signal:
    """Observed taus against taus of random matrices; z is the normal quantile of that p."""
    null_taus = _empirical_null_taus(target, dims, k_requested, mode, temperature, null)
    log_upper, log_lower = _empirical_tails(taus, null_taus, null.test)
    # Taken from the smaller tail, so z stays finite at both ends.
    z = float(-special.ndtri_exp(log_upper)) if log_upper < log_lower else float(special.ndtri_exp(log_lower))
    return _Signal(z=z, log10_p=log_upper / _LN10)


def _aggregate_signal(base: torch.Tensor, target: torch.Tensor, dims: torch.Tensor) -> _Signal | None:
    """The paper's second signal: one tau between the per-sample means over the identity dims.

    Raw features, not softmax: after softmax every row sums to one, so its mean is constant.
    ``None`` when either mean is constant over the samples (no tau).
    """
    agg_tau = float(kendall_tau_b(base[:, dims].mean(dim=1, keepdim=True, dtype=torch.float64),
                                  target[:, dims].mean(dim=1, keepdim=True, dtype=torch.float64))[0])
    if not math.isfinite(agg_tau):
        return None
    z = agg_tau / kendall_null_sigma(base.shape[0])
    return _Signal(z=z, log10_p=log10_normal_sf(z))


def _bonferroni(main: _Signal, agg: _Signal) -> _Signal:
    """Either signal may reject: ``p = min(1, 2 min(p_main, p_agg))``, z from that same p.

    z is the normal quantile of the corrected p wherever that p is below 1/2 (so a verdict
    on z and one on p agree); with no evidence (p >= 1/2, where the quantile runs to -inf as
    p reaches 1) it is ``min(best z, 0)``, which keeps it finite and monotone.
    """
    log10_p = min(0.0, math.log10(2.0) + min(main.log10_p, agg.log10_p))
    best = max(main.z, agg.z)
    quantile = float(-special.ndtri_exp(log10_p * _LN10)) if log10_p < 0.0 else -math.inf
    return _Signal(z=max(quantile, min(best, 0.0)), log10_p=log10_p)


def _check_test_options(identity_mode: str, temperature: float, method: str, alpha: float, use_agg: bool,
                        null: EmpiricalNull | None) -> None:
    _check_alpha(alpha)
    check_choice("method", method, ("analytic", "empirical"))
    if null is not None and not isinstance(null, EmpiricalNull):
        raise InputError(f"null must be an EmpiricalNull(draws=..., seed=..., reselect=..., test=...), got {null!r}")
    if null is not None and method != "empirical":
        raise InputError("null= sets the empirical null's options: pass method='empirical' with it, or leave it out")
    check_choice("identity_mode", identity_mode, ("coset", "base"))
    check_number("temperature", temperature, low=0.0, low_open=True)
    check_bool("use_agg", use_agg)


def check_test_options(*, dim: int | None = None, identity_mode: str = "coset", identity_k: int | None = None,
                       identity_ratio: float | None = None, temperature: float = DEFAULT_TEMPERATURE,
                       method: str = "analytic", alpha: float = 0.01, use_agg: bool = False,
                       null: EmpiricalNull | None = None) -> None:
    """Raise :class:`InputError` for :func:`lineage_test` options that no features can make valid.

    With ``dim`` (the feature dimension D) the identity-dimension count is checked too. Callers
    that turn a test's data errors into an undetermined verdict (a diverged model's NaN) check
    the options first, so a mistyped option is still an error, not an undetermined result.
    """
    _check_test_options(identity_mode, temperature, method, alpha, use_agg, null)
    if dim is not None:
        resolve_identity_k(int(dim), identity_k, identity_ratio)
    elif identity_k is not None and identity_ratio is not None:
        raise InputError("give identity_k (a count) or identity_ratio (a fraction of D), not both")


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    n, dim = a.shape
    if b.shape[0] != n:
        raise InputError(
            f"base has {n} samples but target has {b.shape[0]}: both must be features of the SAME probe inputs, "
            "same order"
        )
    if b.shape[1] != dim:
        raise InputError(
            f"base has D={dim} dimensions but target has D={b.shape[1]}: dimension j must mean the same "
            "coordinate in both models, so the lineage test needs equal hidden sizes"
        )
    if n < 3:
        raise InputError(f"the lineage test needs at least 3 probe samples, got n={n}")


def lineage_test(
    base: FeatureLike,
    target: FeatureLike,
    *,
    identity_mode: Literal["coset", "base"] = "coset",
    identity_k: int | None = None,
    identity_ratio: float | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    method: Literal["analytic", "empirical"] = "analytic",
    alpha: float = 0.01,
    use_agg: bool = False,
    null: EmpiricalNull | None = None,
) -> LineageResult:
    """Test whether ``target`` descends from ``base`` (same init seed lineage).

    Args:
        base, target: ``[n, D]`` features of the two models on the SAME probe inputs, same
            row order (torch tensors, any device, or numpy arrays).
        identity_mode: ``"coset"`` (intersection of both models' bottom-k dims; use when
            neither model is the init itself) or ``"base"`` (the base's bottom-k only).
        identity_k / identity_ratio: number or fraction of dimensions (alternatives; the
            default is ``DEFAULT_IDENTITY_RATIO``).
        temperature: softmax temperature ``T``.
        method: ``"analytic"`` uses the closed-form Kendall null; ``"empirical"`` a null of
            random matrices, configured by ``null`` (an :class:`EmpiricalNull`, default
            options when left out).
        alpha: significance level of the one-sided test.
        use_agg: add the paper's second signal, one Kendall tau between the per-sample
            means over the identity dims, combined with the first by Bonferroni (factor 2
            on the smaller p); ``z`` is then the normal quantile of that corrected p.

    Returns:
        :class:`LineageResult`. ``related`` is ``None`` (with ``reason``) when fewer than
        2 identity dims intersect, or every identity column is constant.

    Constant columns (after normalisation, in either model) have no Kendall tau: they are
    dropped and counted in ``dropped_constant``; ``k`` is the number actually tested.
    """
    _check_test_options(identity_mode, temperature, method, alpha, use_agg, null)
    a = _as_float_matrix(base, "base")
    b = _as_float_matrix(target, "target").to(a.device)
    _check_pair(a, b)
    n, dim = a.shape
    k_requested = resolve_identity_k(dim, identity_k, identity_ratio)

    dims = _identity_dims(a, b, k_requested, identity_mode)
    if dims.numel() < 2:
        return _undetermined(
            n, int(dims.numel()), alpha, method, identity_mode,
            f"only {dims.numel()} identity dimension(s) in common (need >= 2): the two models' "
            f"bottom-{k_requested} sets barely overlap; raise identity_k/identity_ratio",
            dims=tuple(dims.tolist()),
        )
    all_taus = kendall_tau_b(softmax_normalise(a, dims, temperature), softmax_normalise(b, dims, temperature))
    # A column constant in either model has no tau (NaN from kendall_tau_b): drop, count.
    defined = torch.isfinite(all_taus)
    taus, dims = all_taus[defined], dims[defined]
    dropped = int((~defined).sum())
    k = int(dims.numel())
    if k == 0:
        return _undetermined(n, 0, alpha, method, identity_mode,
                             "every identity column is constant in one of the models: the features carry no signal",
                             dropped=dropped)

    if method == "analytic":
        signal = _analytic_signal(taus, n)
    else:
        signal = _empirical_signal(taus, b, dims, k_requested, identity_mode, temperature, null or EmpiricalNull())
    agg = _aggregate_signal(a, b, dims) if use_agg else None
    if agg is not None:
        signal = _bonferroni(signal, agg)

    return LineageResult(
        z=float(signal.z), log10_p=float(signal.log10_p), p_value=float(10.0**signal.log10_p),
        tau_mean=float(taus.mean()), k=k, n=n, related=bool(signal.log10_p < math.log10(alpha)),
        alpha=float(alpha), method=method, identity_mode=identity_mode, dropped_constant=dropped,
        identity_dims=tuple(int(d) for d in dims.tolist()), z_agg=None if agg is None else float(agg.z),
    )


def _empirical_null_taus(target: torch.Tensor, dims: torch.Tensor, k: int, mode: str, temperature: float,
                         null: EmpiricalNull) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(int(null.seed))
    n, dim = target.shape
    out = []
    for _ in range(null.draws):
        noise = torch.randn(n, dim, generator=generator, dtype=torch.float64).to(target.device)
        null_dims = _identity_dims(noise, target, k, mode) if null.reselect else dims
        if null_dims.numel() < 2:
            continue
        taus = kendall_tau_b(softmax_normalise(noise, null_dims, temperature),
                             softmax_normalise(target, null_dims, temperature))
        out.append(taus[torch.isfinite(taus)])
    if not out:
        raise InputError("the empirical null produced no usable dimensions; use method='analytic' or raise identity_k")
    null_taus = torch.cat(out)
    if null_taus.numel() < 2:
        raise InputError("the empirical null produced fewer than 2 usable dimensions; use method='analytic' or "
                         "raise identity_k")
    return null_taus


# --------------------------------------------------------------------------------------
# One target, many bases: the public seam for batched tests (identify, the batched audit)
# --------------------------------------------------------------------------------------


class PreparedTarget:
    """A target's features normalised and sorted per column once, to test many bases against it.

    :func:`lineage_test` normalises and sorts both sides on every call. A caller that tests many
    bases against one target (``identify``: every recorded fingerprint against one checkpoint; an
    audit: several records against one probe) prepares the target once and batches the bases'
    Kendall columns into one kernel call per chunk. Every dimension is an identity dimension
    (``identity_mode="coset"`` with ``identity_ratio`` 1, the default of every face), so
    :meth:`lineage_tests` equals ``lineage_test(base, target, alpha=alpha, temperature=...)``
    exactly (same taus, same z; tests/test_identify.py checks it). Tests with fewer identity
    dimensions choose them per pair and must call :func:`lineage_test`.

    Args:
        target: ``[n, D]`` features (a torch tensor on any device, or a numpy array).
        temperature: the softmax temperature ``T`` (:func:`lineage_test`'s default).

    Raises:
        InputError: features :func:`lineage_test` refuses (not 2-D, NaN/Inf rows, n < 3, D < 2).
    """

    def __init__(self, target: FeatureLike, *, temperature: float = DEFAULT_TEMPERATURE) -> None:
        check_number("temperature", temperature, low=0.0, low_open=True)
        self.matrix = _as_float_matrix(target, "target")
        self.n, self.dim = (int(s) for s in self.matrix.shape)
        if self.n < 3:
            raise InputError(f"the lineage test needs at least 3 probe samples, got n={self.n}")
        resolve_identity_k(self.dim, None, None)
        self.temperature = float(temperature)
        self.dims = torch.arange(self.dim, device=self.matrix.device)
        self.columns = softmax_normalise(self.matrix, self.dims, self.temperature).t()  # [D, n] contiguous
        self.on_cpu = self.matrix.device.type == "cpu"
        self._rows: np.ndarray | None = None
        self._order: np.ndarray | None = None

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def _cpu_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The target's normalised columns as float64 rows ``[D, n]`` and their per-row sort order (made once)."""
        if self._rows is None:
            self._rows = np.ascontiguousarray(self.columns.cpu().numpy())
            self._order = argsort_rows(self._rows)
        return self._rows, self._order  # type: ignore[return-value]

    def column_taus(self, bases: list[FeatureLike]) -> list[torch.Tensor]:
        """Per base, the ``[D]`` float64 Kendall taus of its normalised columns against the target's.

        Args:
            bases: ``[n, D]`` feature matrices of the target's shape (checked: :class:`InputError`).

        One kernel call for all of ``bases``: the caller chooses how many to pass at once (memory
        holds their float64 columns, ``8 n D`` bytes each). A column constant in either model has
        no tau (NaN), as in :func:`kendall_tau_b`.
        """
        matrices = []
        for base in bases:
            matrix = _as_float_matrix(base, "base")
            _check_pair(matrix, self.matrix)
            matrices.append(matrix)
        return self._column_taus(matrices)

    def _column_taus(self, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`column_taus` of matrices already validated."""
        if not matrices:
            return []
        columns = [softmax_normalise(m.to(self.device), self.dims, self.temperature).t() for m in matrices]
        if self.on_cpu:
            x = np.ascontiguousarray(torch.cat(columns).numpy())
            y, order_y = self._cpu_rows()  # paired cyclically with the bases' rows: the target is never copied
            taus = torch.from_numpy(tau_b_sorted_rows(x, y, argsort_rows(x), order_y, threads=torch.get_num_threads()))
        else:  # the torch kernel (CUDA): the columns of every base side by side, on the device
            taus = kendall_tau_b(torch.cat(columns).t(), self.columns.t().repeat(1, len(matrices)))
        return list(taus.split(self.dim))

    def result_of_taus(self, all_taus: torch.Tensor, *, alpha: float = 0.01) -> LineageResult:
        """The :class:`LineageResult` :func:`lineage_test` makes of these ``[D]`` taus (NaN columns dropped).

        Args:
            all_taus: one base's taus from :meth:`column_taus`.
            alpha: significance level of the one-sided test.
        """
        _check_alpha(alpha)
        defined = torch.isfinite(all_taus)
        taus, dims = all_taus[defined], self.dims.cpu()[defined.cpu()]
        dropped, k, n = int((~defined).sum()), int(dims.numel()), self.n
        if k == 0:
            return _undetermined(n, 0, alpha, "analytic", "coset", "every identity column is constant in one of the "
                                 "models: the features carry no signal", dropped=dropped)
        signal = _analytic_signal(taus, n)
        return LineageResult(
            z=float(signal.z), log10_p=float(signal.log10_p), p_value=float(10.0 ** signal.log10_p),
            tau_mean=float(taus.mean()), k=k, n=n, related=bool(signal.log10_p < math.log10(alpha)),
            alpha=float(alpha), method="analytic", identity_mode="coset", dropped_constant=dropped,
            identity_dims=tuple(int(d) for d in dims.tolist()),
        )

    def lineage_tests(self, bases: list[FeatureLike], *, alpha: float = 0.01, chunk: int = 16) -> list[LineageResult]:
        """``[lineage_test(b, target, alpha=alpha, temperature=T) for b in bases]``, batched ``chunk`` at a time.

        Args:
            bases: ``[n, D]`` feature matrices.
            alpha: significance level of each one-sided test.
            chunk: bases whose columns go to one kernel call.

        A base that cannot be tested (NaN rows, another shape) gives an undetermined result that
        names the reason, never an exception.
        """
        _check_alpha(alpha)
        check_int("chunk", chunk, low=1)
        results: list[LineageResult | None] = [None] * len(bases)
        usable: list[tuple[int, torch.Tensor]] = []
        for i, base in enumerate(bases):
            try:
                matrix = _as_float_matrix(base, "base")
                _check_pair(matrix, self.matrix)
                usable.append((i, matrix))
            except InputError as exc:
                results[i] = _undetermined(self.n, 0, alpha, "analytic", "coset", str(exc))
        for start in range(0, len(usable), chunk):
            block = usable[start:start + chunk]
            for (i, _), taus in zip(block, self._column_taus([m for _, m in block])):
                results[i] = self.result_of_taus(taus, alpha=alpha)
        return results  # type: ignore[return-value]

    def screen_taus(self, ranks: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Kendall taus of many bases on a subset of columns, from their stored ranks (a screen).

        Args:
            ranks: ``[m, s, n]`` integer ranks of ``m`` bases' normalised columns ``columns``
                (:func:`normalised_column_ranks`), ties kept as equal ranks.
            columns: the ``s`` column indices the ranks are of.

        Returns ``[m, s]`` float64 taus, :meth:`column_taus`' on those columns (Kendall's tau depends
        only on the ranks; see :func:`normalised_column_ranks` for rounding). The bases' sorts were
        paid when the ranks were made.
        """
        columns = np.asarray(columns, dtype=np.int64)
        ranks = np.asarray(ranks)
        if ranks.ndim != 3 or ranks.shape[1] != columns.shape[0] or ranks.shape[2] != self.n:
            raise InputError(f"ranks must be [m, {columns.shape[0]}, {self.n}] (bases, columns, samples), got "
                             f"{list(ranks.shape)}")
        if columns.size and (columns.min() < 0 or columns.max() >= self.dim):
            raise InputError(f"screen columns must lie in [0, {self.dim}), got {columns.min()}..{columns.max()}")
        rows, order = self._cpu_rows()
        return tau_b_ranked_rows(ranks, np.ascontiguousarray(rows[columns]), np.ascontiguousarray(order[columns]),
                                 threads=torch.get_num_threads())


def feature_matrix(features: FeatureLike, name: str = "features") -> torch.Tensor:
    """``features`` as a validated ``[n, D]`` floating-point tensor (its own dtype and device), as the tests take it.

    Args:
        features: a torch tensor or numpy array.
        name: what the error messages call it.

    Raises:
        InputError: not floating point, not 2-D, empty, or rows with NaN/Inf (named).
    """
    return _as_float_matrix(features, name)


def normalised_column_ranks(features: FeatureLike, columns: np.ndarray, *,
                            temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """Dense ranks ``[s, n]`` of ``features``' softmax-normalised columns ``columns``: what a screen keeps of a base.

    Args:
        features: ``[n, D]`` features.
        columns: the ``s`` column indices kept.
        temperature: the softmax temperature (the rows are normalised over all ``D`` dims, exactly
            as :func:`lineage_test` does, so the ranks are those its Kendall taus see).

    Returns int16 ranks (int32 when ``n > 32767``); tied values share a rank. They are the ranks
    the exact test's columns have, but where two of its float64 softmax values differ only by
    rounding (a screen's statistics do not notice; tests/test_identify_screen.py compares them).
    """
    matrix = _as_float_matrix(features, "features")
    dim = int(matrix.shape[1])
    columns = np.asarray(columns, dtype=np.int64)
    if columns.size and (columns.min() < 0 or columns.max() >= dim):
        raise InputError(f"columns must lie in [0, {dim}), got {columns.min()}..{columns.max()}")
    # Ranks of softmax(x / T)[:, j] = ranks of x_ij / T - logsumexp_i(x / T): only the row's log-normaliser
    # is needed over all D dims (one pass over the contiguous rows), then just the s columns. In float64
    # the order equals that of lineage_test's softmax values but where two differ by rounding (~1e-16).
    # numpy, single-threaded: on a busy 2-core host it was 3x faster than torch's threaded logsumexp.
    scaled = matrix.detach().cpu().numpy().astype(np.float64) / float(temperature)
    peak = scaled.max(axis=1, keepdims=True)
    log_norm = peak + np.log(np.exp(scaled - peak).sum(axis=1, keepdims=True))
    values = np.ascontiguousarray((scaled[:, columns] - log_norm).T)  # [s, n]
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    new = np.ones(ordered.shape, dtype=np.int64)
    new[:, 0] = 0
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    dense = np.cumsum(new, axis=1)
    ranks = np.empty(values.shape, dtype=np.int16 if values.shape[1] <= 32767 else np.int32)
    np.put_along_axis(ranks, order, dense.astype(ranks.dtype), axis=1)
    return ranks


@dataclass(frozen=True)
class SubsetBounds:
    """What a subset of ``s`` of ``D`` columns says about the mean tau over all ``D``.

    ``mean`` is the subset's mean tau, ``low``/``high`` the bounds ``mean -/+ margin * se``, where
    ``se`` is the standard error of a mean of ``s`` columns drawn without replacement from ``D``
    (finite-population corrected), its spread ``max(sample sd, sigma_n)``. ``z`` is the subset's
    own lineage z (``mean * sqrt(s) / sigma_n``). Bounds are infinite when a subset column has
    no tau (a constant column), so nothing is decided from them.
    """

    mean: float
    low: float
    high: float
    z: float


def subset_tau_bounds(taus: np.ndarray, dim: int, n: int, margin: float) -> list[SubsetBounds]:
    """Per row of ``taus`` (``[m, s]``: a random subset of ``s`` of ``dim`` columns), :class:`SubsetBounds`.

    Args:
        taus: subset taus of ``m`` bases (:meth:`PreparedTarget.screen_taus`).
        dim: ``D``, the number of columns the full test averages.
        n: samples per column (the Kendall null's ``sigma_n``).
        margin: bound half-width in standard errors.

    Why this bounds the full test: the subset is a uniform random draw of columns (seeded, made
    before any data is seen), so over that draw the subset mean is an unbiased estimate of the
    mean over all ``D`` columns with standard error ``sd * sqrt((D - s) / (D - 1) / s)``, whatever
    the dependence between columns (the data are fixed; only the draw is random). The spread is
    floored at the null's ``sigma_n``, so a few columns that happen to agree cannot shrink it.
    """
    taus = np.asarray(taus, dtype=np.float64)
    m, s = taus.shape
    sigma = kendall_null_sigma(int(n))
    fpc = math.sqrt(max(0.0, (dim - s) / max(dim - 1, 1)))
    out = []
    for row in taus:
        if s == 0 or not np.isfinite(row).all():
            out.append(SubsetBounds(mean=0.0, low=-math.inf, high=math.inf, z=0.0))
            continue
        mean = float(row.mean())
        sd = max(float(row.std(ddof=1)) if s > 1 else sigma, sigma)
        half = float(margin) * sd * fpc / math.sqrt(s)
        out.append(SubsetBounds(mean=mean, low=mean - half, high=mean + half, z=mean * math.sqrt(s) / sigma))
    return out


def prepared_pair_taus(base: PreparedTarget, target: PreparedTarget) -> torch.Tensor:
    """The ``[D]`` float64 Kendall taus of ``lineage_test(base.matrix, target.matrix)``, from two prepared sides.

    For a caller that tests the same matrices in many pairs: the custody audit tests every probe
    against the reference and each control, and then as the anchor of the next probe. Each
    :class:`PreparedTarget` normalises and sorts its matrix's columns once, so each pair costs
    only the counting pass. The taus are those :func:`lineage_test` computes with every column an
    identity dimension (the same normalisation and the same compiled kernel on the CPU; the torch
    kernel otherwise); :meth:`PreparedTarget.result_of_taus` of ``target`` makes its result.

    Args:
        base: the prepared base (``lineage_test``'s first argument).
        target: the prepared target, of the same shape and temperature.

    Raises:
        InputError: the two sides differ in shape or temperature.
    """
    if not isinstance(base, PreparedTarget) or not isinstance(target, PreparedTarget):
        raise InputError(f"prepared_pair_taus needs two PreparedTarget, got {type(base).__name__} and "
                         f"{type(target).__name__}")
    _check_pair(base.matrix, target.matrix)
    if base.temperature != target.temperature:
        raise InputError(f"the two sides were prepared at temperatures {base.temperature} and {target.temperature}: "
                         "prepare both with the temperature of the test")
    if base.on_cpu and target.on_cpu:
        x, order_x = base._cpu_rows()
        y, order_y = target._cpu_rows()
        return torch.from_numpy(tau_b_sorted_rows(x, y, order_x, order_y, threads=torch.get_num_threads()))
    return kendall_tau_b(base.columns.t(), target.columns.t().to(base.device))
