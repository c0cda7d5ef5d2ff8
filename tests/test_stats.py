"""Tests of seedprints_lightning.core.stats: Kendall tau-b, the lineage test and its input checks.

The lineage test is checked against a plain reference written straight from docs/method.md
(numpy + one ``scipy.stats.kendalltau`` per column), not against the package's own helpers.
All random data come from fixed seeds.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import special
from scipy import stats as sps

from seedprints_lightning.core import _kendall_cpu, stats
from seedprints_lightning.core.errors import InputError
from seedprints_lightning.core.stats import (
    EmpiricalNull,
    LineageResult,
    kendall_null_sigma,
    kendall_tau_b,
    lineage_test,
    log10_normal_sf,
    z_threshold,
)

LN10 = math.log(10.0)


# --------------------------------------------------------------------------------------
# Reference implementation, written from docs/method.md
# --------------------------------------------------------------------------------------


def reference_lineage(
    base: np.ndarray, target: np.ndarray, k: int, mode: str = "coset", temperature: float = 10.0
) -> dict:
    """docs/method.md steps 2-6 with numpy and scipy only (one-sided p, no agg, analytic null)."""
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(target, dtype=np.float64)
    n = a.shape[0]
    # 2. identity dims: the k smallest column means; coset = intersection, base = base's set.
    base_set = np.argsort(a.mean(axis=0))[:k]
    if mode == "coset":
        dims = np.intersect1d(base_set, np.argsort(b.mean(axis=0))[:k])
    else:
        dims = np.sort(base_set)

    # 3. softmax(x / T) over the chosen dims, per row.
    def softmax(x: np.ndarray) -> np.ndarray:
        z = x[:, dims] / temperature
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    sa, sb = softmax(a), softmax(b)
    # 4. Kendall tau per dimension.
    taus = np.array([sps.kendalltau(sa[:, j], sb[:, j], variant="b").statistic for j in range(len(dims))])
    # 5. tau_mean, sigma_n, z.
    tau_mean = float(taus.mean())
    sigma_n = math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))
    z = tau_mean / (sigma_n / math.sqrt(len(dims)))
    # 6. one-sided p, in log space.
    log10_p = float(sps.norm.logsf(z) / LN10)
    return {"dims": dims, "k": len(dims), "tau_mean": tau_mean, "z": z, "log10_p": log10_p, "sigma_n": sigma_n}


def make_pair(n: int, dim: int, related: bool, seed: int, noise: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Continuous features: a related pair (target = base + noise) or an independent pair.

    Per-column offsets make the column means, hence the identity dims, well defined.
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, dim)) + rng.normal(scale=0.5, size=dim)
    if related:
        target = base + noise * rng.normal(size=(n, dim))
    else:
        target = rng.normal(size=(n, dim)) + rng.normal(scale=0.5, size=dim)
    return base, target


# --------------------------------------------------------------------------------------
# Agreement with the reference
# --------------------------------------------------------------------------------------

REFERENCE_CASES = [
    # (n, D, k, mode, T, related, seed)
    (200, 24, 12, "coset", 10.0, True, 1),
    (200, 24, 12, "coset", 10.0, False, 2),
    (150, 16, 16, "base", 1.0, True, 3),
    (300, 40, 8, "base", 10.0, False, 4),
    (120, 32, 20, "coset", 0.5, True, 5),
    (90, 48, 40, "coset", 3.0, False, 6),
    (400, 12, 12, "coset", 10.0, True, 7),
    (60, 20, 10, "base", 25.0, False, 8),
]


@pytest.mark.parametrize("n, dim, k, mode, temperature, related, seed", REFERENCE_CASES)
def test_lineage_test_matches_reference(n, dim, k, mode, temperature, related, seed) -> None:
    base, target = make_pair(n, dim, related, seed)
    ref = reference_lineage(base, target, k, mode, temperature)
    assert ref["k"] >= 2  # fixed seeds: every case has a testable intersection
    res = lineage_test(base, target, identity_k=k, identity_mode=mode, temperature=temperature)
    assert res.k == ref["k"]
    assert list(res.identity_dims) == [int(d) for d in ref["dims"]]
    assert res.n == n
    # Exact integer pair counts on both sides: agreement far beyond the required 1e-6.
    assert res.tau_mean == pytest.approx(ref["tau_mean"], rel=1e-6, abs=1e-12)
    assert res.z == pytest.approx(ref["z"], rel=1e-6, abs=1e-12)
    assert res.log10_p == pytest.approx(ref["log10_p"], rel=1e-6, abs=1e-12)
    assert res.related == (ref["log10_p"] < math.log10(0.01))
    assert res.p_sided == "one-sided"
    assert res.method == "analytic" and res.identity_mode == mode and res.dropped_constant == 0
    # Margins: related pairs (noise 0.7 sd) reach z >> 10; unrelated pairs land within |z| < 3
    # for these seeds (measured |z| <= 1.97).
    if related:
        assert res.related is True and res.z > 10
    else:
        assert res.related is False and abs(res.z) < 3


def test_identity_ratio_sets_k() -> None:
    base, target = make_pair(100, 20, True, seed=11)
    res = lineage_test(base, target, identity_ratio=0.5, identity_mode="base")
    assert res.k == 10
    assert res.z == pytest.approx(reference_lineage(base, target, 10, "base")["z"], rel=1e-9)
    # Default ratio: every dimension.
    assert lineage_test(base, target).k == 20


def test_null_sigma_formula() -> None:
    for n in (3, 10, 1000):
        assert kendall_null_sigma(n) == pytest.approx(math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1))), rel=1e-15)
    with pytest.raises(InputError, match="n >= 3"):
        kendall_null_sigma(2)
    assert z_threshold(0.01) == pytest.approx(2.3263478740408408, rel=1e-12)


# --------------------------------------------------------------------------------------
# Kendall tau-b against scipy
# --------------------------------------------------------------------------------------


def _scipy_taus(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = []
    for j in range(x.shape[1]):
        with np.errstate(all="ignore"):
            out.append(sps.kendalltau(x[:, j], y[:, j], variant="b").statistic)
    return np.array(out, dtype=np.float64)


def _kendall_case(name: str, n: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cont = lambda: rng.normal(size=(n, m))  # noqa: E731
    small_int = lambda: rng.integers(0, 4, size=(n, m)).astype(np.float64)  # noqa: E731
    if name == "continuous":
        return cont(), cont()
    if name == "ties_x":
        return small_int(), cont()
    if name == "ties_y":
        return cont(), small_int()
    if name == "ties_both_int":
        return small_int(), small_int()
    if name == "ties_both_rounded":
        return np.round(cont(), 1), np.round(cont(), 1)
    if name == "correlated_ties":
        x = small_int()
        return x, np.round(x + 0.8 * cont())
    if name == "signed_zeros":
        values = np.array([-2.5, -1.0, -0.0, 0.0, 0.5, 3.0])
        return rng.choice(values, size=(n, m)), rng.choice(values, size=(n, m))
    if name == "negative":
        return -np.exp(cont()), -np.exp(3 * cont())
    raise AssertionError(name)


# Two implementations: the compiled CPU kernel behind kendall_tau_b, and the torch sweep
# that CUDA tensors take (run here on the CPU, where it gives the same integers).
KENDALL_IMPLS = {"cpu_kernel": kendall_tau_b, "torch": stats._kendall_tau_b_torch}


@pytest.fixture(params=sorted(KENDALL_IMPLS))
def tau_b(request):
    return KENDALL_IMPLS[request.param]


KENDALL_NAMES = ["continuous", "ties_x", "ties_y", "ties_both_int", "ties_both_rounded", "correlated_ties",
                 "signed_zeros", "negative"]


@pytest.mark.parametrize("name", KENDALL_NAMES)
@pytest.mark.parametrize("n, m, seed", [(60, 40, 0), (257, 5, 1)])  # 40 columns: more than one chunk
def test_kendall_matches_scipy(name: str, n: int, m: int, seed: int, tau_b) -> None:
    x, y = _kendall_case(name, n, m, seed)
    got = tau_b(torch.from_numpy(x), torch.from_numpy(y))
    assert got.dtype == torch.float64 and got.shape == (m,)
    np.testing.assert_allclose(got.numpy(), _scipy_taus(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("name", ["continuous", "ties_x", "ties_y", "ties_both_int", "signed_zeros"])
def test_kendall_small_n_matches_scipy(n: int, name: str, tau_b) -> None:
    # Many columns so that every small-n pattern (incl. all-tied -> NaN) shows up.
    x, y = _kendall_case(name, n, 200, seed=100 + n)
    got = tau_b(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, _scipy_taus(x, y), rtol=1e-12, atol=1e-12, equal_nan=True)


def test_kendall_exhaustive_n3_permutations(tau_b) -> None:
    # Every ordering pair of 3 distinct values: tau in {-1, -1/3, 1/3, 1}.
    import itertools

    perms = [np.array(p, dtype=np.float64) for p in itertools.permutations([0.0, 1.0, 2.0])]
    x = np.stack([p for p in perms for _ in perms], axis=1)
    y = np.stack([q for _ in perms for q in perms], axis=1)
    got = tau_b(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, _scipy_taus(x, y), rtol=1e-12, atol=1e-12)


def test_kendall_signed_zero_is_a_tie(tau_b) -> None:
    x = torch.tensor([[-0.0], [0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [0.0], [2.0]], dtype=torch.float64)
    # -0.0 == 0.0: the first pair is an x tie, not a discordant pair.
    expected = sps.kendalltau([0.0, 0.0, 1.0], [1.0, 0.0, 2.0], variant="b").statistic
    assert float(tau_b(x, y)[0]) == pytest.approx(expected, abs=1e-15)
    assert float(tau_b(x, y)[0]) == pytest.approx(2 / math.sqrt(2 * 3), abs=1e-15)


def test_kendall_constant_column_is_nan(tau_b) -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    x[:, 1] = 2.5  # constant in x
    y[:, 3] = -1.0  # constant in y
    got = tau_b(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    assert np.isnan(got[1]) and np.isnan(got[3])
    np.testing.assert_allclose(got[[0, 2]], _scipy_taus(x[:, [0, 2]], y[:, [0, 2]]), rtol=1e-12)


@pytest.mark.parametrize("n", [3000, 40000, 50000])  # int16 / int32-sum / int64-sum paths
def test_kendall_large_n_matches_scipy(n: int, tau_b) -> None:
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 3))
    y = 0.3 * x + rng.normal(size=(n, 3))
    y[:, 2] = np.round(y[:, 2], 1)  # one column with ties
    got = tau_b(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, _scipy_taus(x, y), rtol=1e-12, atol=1e-12)


def test_kendall_float32_and_identity(tau_b) -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(100, 3)).astype(np.float32)
    y = rng.normal(size=(100, 3)).astype(np.float32)
    got = tau_b(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, _scipy_taus(x.astype(np.float64), y.astype(np.float64)), rtol=1e-12)
    same = tau_b(torch.from_numpy(x), torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(same, 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tau_b(torch.from_numpy(x), -torch.from_numpy(x)).numpy(), -1.0, atol=1e-15)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 64, 100, 1025])
def test_cpu_inversion_count_matches_brute_force(n: int) -> None:
    # The radix count relies on its input being a permutation of 0..n-1 (group layout);
    # sizes around powers of two exercise the clipped last group.
    rng = np.random.default_rng(n)
    for ranks in (rng.permutation(n), np.arange(n), np.arange(n)[::-1].copy()):
        brute = sum(int(ranks[p] > ranks[q]) for p in range(n) for q in range(p + 1, n))
        got = _kendall_cpu._count_inversions(ranks.astype(np.int64), np.empty(n, dtype=np.int64))
        assert got == brute


def test_cpu_kernel_is_independent_of_thread_count() -> None:
    x, y = _kendall_case("correlated_ties", 300, 9, seed=4)
    one = _kendall_cpu.tau_b_rows(x.T, y.T, threads=1)
    two = _kendall_cpu.tau_b_rows(x.T, y.T, threads=2)
    np.testing.assert_array_equal(one, two)


def test_kendall_accepts_grad_tracking_tensors() -> None:
    x, y = _kendall_case("continuous", 40, 3, seed=5)
    tracked = torch.from_numpy(x).requires_grad_(True)
    got = kendall_tau_b(tracked, torch.from_numpy(y))
    np.testing.assert_allclose(got.numpy(), _scipy_taus(x, y), rtol=1e-12, atol=1e-12)


def test_kendall_shape_errors() -> None:
    with pytest.raises(InputError, match="one shape"):
        kendall_tau_b(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(InputError, match="one shape"):
        kendall_tau_b(torch.zeros(5), torch.zeros(5))
    with pytest.raises(InputError, match="at least 2 samples"):
        kendall_tau_b(torch.zeros(1, 2), torch.zeros(1, 2))


# --------------------------------------------------------------------------------------
# log-space p-values
# --------------------------------------------------------------------------------------


def test_huge_z_has_finite_log10_p() -> None:
    # Identical features: every tau is 1, so z = sqrt(k) / sigma_n = sqrt(111) / sigma_1000 ~ 499.
    rng = np.random.default_rng(21)
    base = rng.normal(size=(1000, 120))
    res = lineage_test(base, base.copy(), identity_k=111, identity_mode="base")
    expected_z = math.sqrt(111) / kendall_null_sigma(1000)
    assert res.tau_mean == pytest.approx(1.0, abs=1e-12)
    assert res.z == pytest.approx(expected_z, rel=1e-9)
    assert 450 < res.z < 550
    assert math.isfinite(res.log10_p)
    assert res.log10_p == pytest.approx(float(special.log_ndtr(-res.z) / LN10), rel=1e-9)
    assert -56000 < res.log10_p < -52000  # about -z^2 / (2 ln 10) = -54000
    assert res.p_value >= 0.0  # underflows to 0.0, which is allowed
    assert res.related is True
    assert log10_normal_sf(1e4) == pytest.approx(float(special.log_ndtr(-1e4) / LN10), rel=1e-12)


def test_negative_z_gives_log10_p_near_zero() -> None:
    rng = np.random.default_rng(22)
    base = rng.normal(size=(200, 16))
    res = lineage_test(base, -base, identity_mode="base")  # anti-related: taus strongly negative
    assert res.z < -10
    assert -1e-6 < res.log10_p <= 0.0
    assert res.p_value == pytest.approx(1.0, abs=1e-6)
    assert res.related is False
    # With the agg signal also negative, the Bonferroni-doubled p is capped at 1.
    agg = lineage_test(base, -base, identity_mode="base", use_agg=True)
    assert agg.z_agg is not None and agg.z_agg < 0 and agg.log10_p == 0.0 and agg.p_value == 1.0
    assert agg.related is False


# --------------------------------------------------------------------------------------
# agg signal, empirical null, RNG
# --------------------------------------------------------------------------------------


def _bonferroni_z(log10_p: float, best: float) -> float:
    """What lineage_test reports as z with two signals: the quantile of the corrected p, floored."""
    quantile = float(sps.norm.isf(10.0**log10_p)) if log10_p < 0 else -math.inf
    return max(quantile, min(best, 0.0))


@pytest.mark.parametrize("related, seed", [(True, 31), (False, 32), (False, 33)])
def test_use_agg_combines_by_bonferroni(related: bool, seed: int) -> None:
    base, target = make_pair(150, 24, related, seed, noise=2.0)
    plain = lineage_test(base, target, identity_k=12)
    agg = lineage_test(base, target, identity_k=12, use_agg=True)
    assert agg.tau_mean == plain.tau_mean and agg.k == plain.k
    # Manual: one Kendall tau between the per-sample means of the RAW features over the dims.
    dims = np.array(plain.identity_dims)
    agg_tau = sps.kendalltau(base[:, dims].mean(axis=1), target[:, dims].mean(axis=1), variant="b").statistic
    z_agg = agg_tau / kendall_null_sigma(150)
    assert agg.z_agg == pytest.approx(z_agg, rel=1e-9)
    best = max(plain.z, z_agg)
    expected = min(0.0, math.log10(2.0) + sps.norm.logsf(best) / LN10)
    assert agg.log10_p == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert agg.z == pytest.approx(_bonferroni_z(expected, best), rel=1e-7, abs=1e-9)
    assert agg.related == (expected < math.log10(0.01))
    if related:
        assert agg.related is True


def test_use_agg_z_and_log10_p_agree() -> None:
    # The reported z is the normal quantile of the reported (corrected) p, not the raw max z:
    # a z-threshold verdict and a p verdict can no longer disagree.
    base, target = make_pair(150, 24, True, seed=34, noise=3.0)
    plain = lineage_test(base, target)
    agg = lineage_test(base, target, use_agg=True)
    assert agg.z_agg is not None and agg.z_agg < plain.z  # precondition for this seed: plain wins
    assert agg.log10_p - plain.log10_p == pytest.approx(math.log10(2.0), rel=1e-9)
    assert log10_normal_sf(agg.z) == pytest.approx(agg.log10_p, rel=1e-9)
    assert agg.z < plain.z  # the Bonferroni factor costs z
    assert (agg.z > z_threshold(0.01)) == agg.related


def test_use_agg_z_is_finite_and_monotone_without_evidence() -> None:
    # Where the corrected p reaches 1 its quantile is -inf; z is floored at min(best z, 0).
    for best in (-3.0, -0.5, 0.0, 0.3, 0.6, 0.7, 1.0, 3.0):
        log10_p = min(0.0, math.log10(2.0) + log10_normal_sf(best))
        got = stats._bonferroni(stats._Signal(best, log10_normal_sf(best)),
                                stats._Signal(best - 1.0, log10_normal_sf(best - 1.0)))
        assert got.log10_p == pytest.approx(log10_p, abs=1e-12)
        assert math.isfinite(got.z) and got.z == pytest.approx(_bonferroni_z(log10_p, best), abs=1e-9)
    zs = [stats._bonferroni(stats._Signal(b, log10_normal_sf(b)), stats._Signal(-9.0, 0.0)).z
          for b in np.linspace(-4, 4, 81)]
    assert all(later >= earlier for earlier, later in zip(zs, zs[1:]))


@pytest.mark.parametrize("null_test", ["ttest", "mannwhitney"])
def test_empirical_null_verdicts_and_determinism(null_test: str) -> None:
    rel_base, rel_target = make_pair(200, 32, True, seed=41, noise=1.5)
    unr_base, unr_target = make_pair(200, 32, False, seed=42)
    kwargs = dict(method="empirical", identity_k=16)
    related = lineage_test(rel_base, rel_target, null=EmpiricalNull(test=null_test, seed=0), **kwargs)
    unrelated = lineage_test(unr_base, unr_target, null=EmpiricalNull(test=null_test, seed=0), **kwargs)
    assert related.method == "empirical"
    # Margins (fixed seeds): the related pair's log10 p is far below log10(0.01) = -2, the
    # unrelated pair's far above it.
    assert related.related is True and related.log10_p < -5 and related.z > 3
    assert unrelated.related is False and unrelated.log10_p > -1.5
    for res in (related, unrelated):
        assert all(math.isfinite(v) for v in (res.z, res.log10_p, res.p_value, res.tau_mean))
        # z is reported on the analytic scale: the normal quantile of the same p.
        assert float(special.log_ndtr(-res.z) / LN10) == pytest.approx(res.log10_p, rel=1e-6, abs=1e-9)
    again = lineage_test(unr_base, unr_target, null=EmpiricalNull(test=null_test, seed=0), **kwargs)
    assert again == unrelated
    other = lineage_test(unr_base, unr_target, null=EmpiricalNull(test=null_test, seed=1), **kwargs)
    assert other.log10_p != unrelated.log10_p


def test_empirical_with_agg_keeps_the_empirical_p() -> None:
    # Bonferroni over the empirical p and the agg's analytic p: the empirical p is not replaced.
    base, target = make_pair(200, 32, True, seed=45, noise=2.5)
    empirical = lineage_test(base, target, identity_k=16, method="empirical")
    both = lineage_test(base, target, identity_k=16, method="empirical", use_agg=True)
    agg_log10_p = log10_normal_sf(both.z_agg)
    expected = min(0.0, math.log10(2.0) + min(empirical.log10_p, agg_log10_p))
    assert both.log10_p == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert both.method == "empirical"
    assert empirical.log10_p < agg_log10_p  # precondition for this seed: the empirical p is the smaller


def test_empirical_z_is_finite_for_anti_related_pair() -> None:
    base = np.random.default_rng(44).normal(size=(200, 64))
    res = lineage_test(base, -base, identity_mode="base", method="empirical")
    assert res.related is False  # holds today
    assert math.isfinite(res.z) and res.z < -10


@pytest.mark.parametrize("reselect", [True, False])
def test_empirical_null_reselect_option(reselect: bool) -> None:
    base, target = make_pair(150, 24, True, seed=43, noise=1.0)
    res = lineage_test(base, target, method="empirical", identity_k=12, null=EmpiricalNull(reselect=reselect))
    assert res.related is True


@pytest.mark.parametrize("options, message", [
    ({"draws": 0}, r"EmpiricalNull.draws must be an integer >= 1, got 0"),
    ({"draws": 2.0}, r"EmpiricalNull.draws must be an integer"),
    ({"seed": -1}, r"EmpiricalNull.seed must be an integer >= 0"),
    ({"reselect": 1}, r"EmpiricalNull.reselect must be True or False"),
    ({"test": "ks"}, r"EmpiricalNull.test must be 'ttest' or 'mannwhitney'"),
])
def test_empirical_options_are_validated_when_built(options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        EmpiricalNull(**options)


def test_empirical_options_are_checked_before_any_work() -> None:
    # Bad combinations fail before the features are even read (these features are invalid too).
    with pytest.raises(InputError, match="pass method='empirical'"):
        lineage_test(np.zeros((2, 2)), np.zeros((2, 2)), null=EmpiricalNull())
    with pytest.raises(InputError, match="null must be an EmpiricalNull"):
        lineage_test(np.zeros((2, 2)), np.zeros((2, 2)), method="empirical", null={"draws": 4})


@pytest.mark.parametrize("kwargs", [{}, {"method": "empirical"},
                                    {"method": "empirical", "null": EmpiricalNull(test="mannwhitney")},
                                    {"use_agg": True}])
def test_global_rng_untouched(kwargs: dict) -> None:
    base, target = make_pair(100, 16, True, seed=51)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    lineage_test(base, target, identity_k=8, **kwargs)
    lineage_test(torch.from_numpy(base), torch.from_numpy(target), identity_k=8, **kwargs)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def _good(n: int = 20, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim))


def test_nan_and_inf_rows_are_reported() -> None:
    base = _good()
    bad = _good(seed=1)
    bad[3, 2] = np.nan
    bad[7, 0] = np.inf
    bad[7, 1] = -np.inf
    with pytest.raises(InputError, match=r"target has 2 of 20 rows with NaN or Inf \(rows 3, 7\)"):
        lineage_test(base, bad)
    with pytest.raises(InputError, match=r"base has 2 of 20 rows with NaN or Inf \(rows 3, 7\)"):
        lineage_test(torch.from_numpy(bad), torch.from_numpy(base))
    many = _good(n=30)
    many[::2, 0] = np.nan  # 15 rows: only the first 10 are listed
    with pytest.raises(InputError, match=r"15 of 30 rows .*rows 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, \.\.\.\)"):
        lineage_test(many, _good(n=30))


@pytest.mark.parametrize(
    "base, target, kwargs, message",
    [
        (_good(20), _good(19), {}, r"base has 20 samples but target has 19"),
        (_good(20, 8), _good(20, 6), {}, r"base has D=8 dimensions but target has D=6"),
        (_good(2), _good(2), {}, r"at least 3 probe samples, got n=2"),
        (_good().astype(np.int64), _good(), {}, r"base has dtype int64.*floating"),
        (_good(), _good().astype(np.int32), {}, r"target has dtype int32.*floating"),
        (torch.ones(20, 8, dtype=torch.int64), _good(), {}, r"base has dtype torch.int64.*floating"),
        (_good(), torch.ones(20, 8, dtype=torch.int32), {}, r"target has dtype torch.int32.*floating"),
        (_good(), torch.ones(20, 8, dtype=torch.bool), {}, r"target has dtype torch.bool"),
        (np.zeros((0, 8)), np.zeros((0, 8)), {}, r"base is empty"),
        (_good(), np.zeros((20, 0)), {}, r"target is empty"),
        (np.zeros(20), np.zeros(20), {}, r"base must be 2-D"),
        (_good(), torch.zeros(2, 20, 8), {}, r"target must be 2-D"),
        ([[1.0, 2.0]] * 5, _good(5, 2), {}, r"torch.Tensor or numpy.ndarray"),
        (_good(), _good(), {"identity_k": 9}, r"identity_k=9 is larger than the feature dimension D=8"),
        (_good(), _good(), {"identity_k": 1}, r"identity_k must be an integer >= 2"),
        (_good(), _good(), {"identity_k": 2.5}, r"identity_k must be an integer >= 2"),
        (_good(), _good(), {"identity_k": 4, "identity_ratio": 0.5}, r"not both"),
        (_good(), _good(), {"identity_ratio": 0.0}, r"identity_ratio must be a number in \(0, 1\] \(a fraction of D\)"),
        (_good(), _good(), {"identity_ratio": 1.5}, r"identity_ratio must be a number in \(0, 1\] \(a fraction of D\)"),
        (_good(), _good(), {"identity_ratio": -0.1}, r"identity_ratio must be a number in \(0, 1\] \(a fraction of "
                                                     r"D\), got -0.1"),
        (_good(), _good(), {"alpha": 0.0}, r"alpha must be a number in \(0, 1\)"),
        (_good(), _good(), {"alpha": 1.0}, r"alpha must be a number in \(0, 1\)"),
        (_good(), _good(), {"alpha": float("nan")}, r"alpha must be"),
        (_good(), _good(), {"alpha": "0.01"}, r"alpha must be"),
        (_good(), _good(), {"temperature": 0.0}, r"temperature must be a finite number > 0, got"),
        (_good(), _good(), {"temperature": -1.0}, r"temperature must be a finite number > 0, got"),
        (_good(), _good(), {"temperature": float("inf")}, r"temperature must be a finite number > 0, got"),
        (_good(), _good(), {"temperature": float("nan")}, r"temperature must be a finite number > 0, got"),
        (_good(), _good(), {"temperature": True}, r"temperature must be a finite number > 0, got"),
        (_good(), _good(), {"identity_mode": "both"}, r"identity_mode must be 'coset' or 'base'"),
        (_good(), _good(), {"method": "bootstrap"}, r"method must be 'analytic' or 'empirical'"),
        (_good(), _good(), {"use_agg": 1}, r"use_agg must be True or False"),
    ],
)
def test_bad_inputs_raise_clear_errors(base, target, kwargs, message) -> None:
    with pytest.raises(InputError, match=message):
        lineage_test(base, target, **kwargs)


def test_input_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        lineage_test(_good(20), _good(19))


def _assert_no_nan(res: LineageResult) -> None:
    for key, value in res.to_dict().items():
        if isinstance(value, float):
            assert math.isfinite(value), key
    assert isinstance(res.summary(), str)


def test_disjoint_identity_sets_are_undetermined() -> None:
    rng = np.random.default_rng(61)
    base = rng.normal(size=(50, 8))
    target = rng.normal(size=(50, 8))
    base[:, :4] -= 10.0  # base's bottom-4: dims 0-3
    target[:, 4:] -= 10.0  # target's bottom-4: dims 4-7
    res = lineage_test(base, target, identity_k=4)
    assert res.related is None
    assert res.k == 0 and res.identity_dims == ()
    assert "only 0 identity dimension(s) in common" in res.reason
    assert res.z == 0.0 and res.log10_p == 0.0 and res.p_value == 1.0 and res.tau_mean == 0.0
    _assert_no_nan(res)
    assert "undetermined" in res.summary()
    # One dimension in common is still too few.
    target[:, 3] -= 20.0
    res1 = lineage_test(base, target, identity_k=4)
    assert res1.related is None and res1.k == 1 and res1.identity_dims == (3,)
    assert "only 1 identity dimension(s)" in res1.reason
    _assert_no_nan(res1)
    # Same data in base mode: the test runs.
    assert lineage_test(base, target, identity_k=4, identity_mode="base").related is not None


def test_all_constant_identity_columns_are_undetermined() -> None:
    rng = np.random.default_rng(62)
    base = np.tile(rng.normal(size=10), (40, 1))  # every row identical: all columns constant
    target = rng.normal(size=(40, 10))
    for kwargs in ({}, {"use_agg": True}, {"method": "empirical"}):
        res = lineage_test(base, target, **kwargs)
        assert res.related is None, kwargs
        assert res.k == 0 and res.dropped_constant == 10
        assert "constant" in res.reason
        _assert_no_nan(res)


def test_some_constant_columns_are_dropped_and_counted() -> None:
    rng = np.random.default_rng(63)
    base = rng.normal(size=(80, 16))
    target = base + 0.5 * rng.normal(size=(80, 16))
    # Three columns at -1e6: exp underflows to exactly 0 after softmax, a constant column,
    # and they are the smallest means, so the base's identity set contains them.
    base[:, [2, 5, 11]] = -1e6
    res = lineage_test(base, target, identity_k=10, identity_mode="base")
    assert res.dropped_constant == 3
    assert res.k == 7
    assert not {2, 5, 11} & set(res.identity_dims)
    assert res.related is True
    _assert_no_nan(res)
    # The 7 remaining columns match the reference computed on the same softmax dims.
    dims10 = np.argsort(base.mean(axis=0))[:10]
    sa = torch.softmax(torch.from_numpy(base[:, np.sort(dims10)]) / 10.0, dim=1).numpy()
    sb = torch.softmax(torch.from_numpy(target[:, np.sort(dims10)]) / 10.0, dim=1).numpy()
    keep = [i for i, d in enumerate(np.sort(dims10)) if d not in (2, 5, 11)]
    tau_mean = float(np.mean(_scipy_taus(sa[:, keep], sb[:, keep])))
    assert res.tau_mean == pytest.approx(tau_mean, rel=1e-9)
    assert res.z == pytest.approx(tau_mean * math.sqrt(7) / kendall_null_sigma(80), rel=1e-9)


# --------------------------------------------------------------------------------------
# Input types and precision
# --------------------------------------------------------------------------------------


def test_numpy_and_torch_inputs_agree() -> None:
    base, target = make_pair(120, 20, True, seed=71)
    from_numpy = lineage_test(base, target, identity_k=10, use_agg=True)
    from_torch = lineage_test(torch.from_numpy(base), torch.from_numpy(target), identity_k=10, use_agg=True)
    mixed = lineage_test(base, torch.from_numpy(target), identity_k=10, use_agg=True)
    assert from_numpy == from_torch == mixed
    # A tensor that requires grad is accepted (detached) and gives the same answer.
    with_grad = torch.from_numpy(base).clone().requires_grad_(True)
    assert lineage_test(with_grad, torch.from_numpy(target), identity_k=10, use_agg=True) == from_numpy


@pytest.mark.parametrize("related, seed", [(True, 72), (False, 73)])
def test_float32_and_float64_agree(related: bool, seed: int) -> None:
    base, target = make_pair(200, 24, related, seed)
    r64 = lineage_test(base, target, identity_k=12)
    r32 = lineage_test(base.astype(np.float32), target.astype(np.float32), identity_k=12)
    t32 = lineage_test(torch.from_numpy(base).float(), torch.from_numpy(target).float(), identity_k=12)
    assert r32 == t32
    assert r32.identity_dims == r64.identity_dims and r32.related == r64.related
    # float32 rounding can only flip the order of near-equal pairs: tau moves by a few 1e-5.
    assert r32.tau_mean == pytest.approx(r64.tau_mean, abs=1e-4)
    assert r32.z == pytest.approx(r64.z, abs=0.02)


def test_result_serialises() -> None:
    import json

    base, target = make_pair(60, 10, True, seed=81)
    res = lineage_test(base, target, identity_k=6, use_agg=True)
    data = json.loads(json.dumps(res.to_dict()))
    assert data["identity_dims"] == list(res.identity_dims)
    assert data["k"] == res.k and data["z"] == res.z and data["p_sided"] == "one-sided"
    assert "RELATED" in res.summary()
