"""The identity verdict (seedprints_lightning.core.verdict): rules, thresholds, probe verdicts, metrics."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from seedprints_lightning import InputError, LineageResult
from seedprints_lightning.core.verdict import (
    BIRTH_RULE,
    CUSTODY_RULE,
    CUSTOM_SCALARS_LAYOUT,
    FAIL_ON,
    METRIC_NAMES,
    METRIC_TAGS,
    IdentityVerdict,
    ProbeVerdict,
    VerdictRule,
    decide_identity,
    judge_probe,
    safe_lineage_test,
)

Z_01 = 2.3263478740408408  # one-sided z of alpha = 0.01 (scipy.stats.norm.isf(0.01))


def sigma_n(n: int) -> float:
    """Kendall tau's null std, written out here so the threshold is checked independently."""
    return math.sqrt(2.0 * (2 * n + 5) / (9.0 * n * (n - 1)))


def expected_threshold(rule: VerdictRule, result: LineageResult, controls: list[LineageResult]) -> float:
    """threshold = max(z_alpha, control_z_max + z_margin, (control_tau_max + tau_margin) * sqrt(k) / sigma_n)."""
    parts = [Z_01]
    if controls:
        parts.append(max(c.z for c in controls) + rule.z_margin)
    tau_max = max((c.tau_mean for c in controls), default=0.0)
    parts.append((max(tau_max, 0.0) + rule.tau_margin) * math.sqrt(result.k) / sigma_n(result.n))
    return max(parts)


def result(z: float, tau: float | None = None, k: int = 32, n: int = 200, related: bool | None = None,
           alpha: float = 0.01) -> LineageResult:
    """A determined result with chosen figures; ``related`` defaults to the analytic test (z > z_alpha).

    ``tau`` defaults to the tau_mean that gives ``z`` at this k and n (as lineage_test would).
    """
    if tau is None:
        tau = z * sigma_n(n) / math.sqrt(k)
    if related is None:
        related = z > Z_01
    return LineageResult(z=z, log10_p=-z, p_value=0.5, tau_mean=tau, k=k, n=n, related=related, alpha=alpha)


def consistent(tau: float, k: int, n: int) -> LineageResult:
    """A result whose z is the one its tau_mean, k and n give (as lineage_test computes it)."""
    return result(tau * math.sqrt(k) / sigma_n(n), tau=tau, k=k, n=n)


def undetermined(reason: str = "only 1 identity dimension(s) in common", n: int = 200) -> LineageResult:
    return LineageResult(z=0.0, log10_p=0.0, p_value=1.0, tau_mean=0.0, k=1, n=n, related=None, alpha=0.01,
                         reason=reason)


def nan_result(reason: str = "diverged") -> LineageResult:
    nan = float("nan")
    return LineageResult(z=nan, log10_p=nan, p_value=nan, tau_mean=nan, k=0, n=200, related=None, alpha=0.01,
                         reason=reason)


def all_finite(obj) -> bool:
    """True when no float anywhere in a nested dict/list is NaN or infinite."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


PLAIN = VerdictRule(alpha=0.01, z_margin=3.0, tau_margin=0.0)


# ------------------------------------------------------------------ VerdictRule


@pytest.mark.parametrize("kwargs, match", [
    ({"z_margin": -1.0}, "z_margin must be a finite number >= 0"),
    ({"z_margin": float("nan")}, "z_margin must be a finite number >= 0"),
    ({"z_margin": float("inf")}, "z_margin must be a finite number >= 0"),
    ({"z_margin": True}, "z_margin must be a finite number >= 0"),
    ({"z_margin": "3"}, "z_margin must be a finite number >= 0"),
    ({"tau_margin": -0.01}, "tau_margin must be a finite number >= 0"),
    ({"tau_margin": float("nan")}, "tau_margin must be a finite number >= 0"),
    ({"tau_margin": False}, "tau_margin must be a finite number >= 0"),
    ({"tau_margin": None}, "tau_margin must be a finite number >= 0"),
    ({"alpha": 0.0}, r"alpha must be a number in \(0, 1\)"),
    ({"alpha": 1.0}, r"alpha must be a number in \(0, 1\)"),
    ({"alpha": 1.5}, r"alpha must be a number in \(0, 1\)"),
    ({"alpha": -0.01}, r"alpha must be a number in \(0, 1\)"),
    ({"alpha": float("nan")}, r"alpha must be a number in \(0, 1\)"),
    ({"alpha": "0.01"}, r"alpha must be a number in \(0, 1\)"),
])
def test_verdict_rule_validates(kwargs, match):
    with pytest.raises(InputError, match=match):
        VerdictRule(**kwargs)


def test_verdict_rule_normalises_and_round_trips():
    rule = VerdictRule(alpha=0.05, z_margin=2, tau_margin=0)
    assert isinstance(rule.z_margin, float) and isinstance(rule.tau_margin, float)
    assert VerdictRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    assert "control tau" not in rule.describe()
    assert f"control tau + {CUSTODY_RULE.tau_margin:g}" in CUSTODY_RULE.describe()
    assert BIRTH_RULE.tau_margin == 0.0 and CUSTODY_RULE.tau_margin > 0.0


def test_callback_rules_follow_its_arguments():
    # The defaults in use are checked on a real fit (tests/test_callback.py, the default-callback test).
    from seedprints_lightning import SeedPrintsCallback

    cb = SeedPrintsCallback(alpha=0.05, birth_z_margin=1.0, link_z_margin=2.0, link_tau_margin=0.1)
    rules = cb.chain.rules
    assert rules.birth_rule == VerdictRule(alpha=0.05, z_margin=1.0, tau_margin=0.0)  # no tau margin for the birth test
    assert rules.custody_rule == VerdictRule(alpha=0.05, z_margin=2.0, tau_margin=0.1)
    assert cb.settings.rules.birth_rule.alpha == 0.05
    with pytest.raises(InputError, match="link_tau_margin must be"):
        SeedPrintsCallback(link_tau_margin=-1.0)
    with pytest.raises(InputError, match="birth_z_margin must be"):
        SeedPrintsCallback(birth_z_margin=float("nan"))


# ------------------------------------------------------------------ decide_identity: the threshold


def test_no_controls_uses_the_analytic_threshold():
    v = decide_identity(result(5.0), (), PLAIN)
    assert v.related is True and v.reason is None
    assert v.threshold == pytest.approx(Z_01)
    assert v.control_z_max == 0.0 and v.control_z_mean == 0.0 and v.control_tau_max == 0.0
    v = decide_identity(result(1.0), (), PLAIN)
    assert v.related is False and "not significant" in v.reason


def test_related_when_z_clears_all_three_parts():
    rule = VerdictRule(alpha=0.01, z_margin=3.0, tau_margin=0.1)
    controls = [result(1.0, tau=0.01), result(2.0, tau=0.02), result(3.0, tau=0.03)]
    r = result(20.0, tau=0.5, k=32, n=200)
    # parts: 2.33 (alpha), 3 + 3 = 6 (controls' z), (0.03 + 0.1) * sqrt(32) / sigma_200 = 15.47 (effect size)
    tau_part = 0.13 * math.sqrt(32) / sigma_n(200)
    assert tau_part == pytest.approx(15.46, abs=0.01)
    v = decide_identity(r, controls, rule)
    assert v.threshold == pytest.approx(expected_threshold(rule, r, controls)) == pytest.approx(tau_part)
    assert v.related is True and v.reason is None
    assert v.control_z_max == pytest.approx(3.0) and v.control_z_mean == pytest.approx(2.0)
    assert v.control_tau_max == pytest.approx(0.03)
    assert v.headroom == pytest.approx(20.0 / tau_part)
    assert v.control_z == (1.0, 2.0, 3.0)


def test_not_related_below_the_control_z_part():
    rule = VerdictRule(alpha=0.01, z_margin=3.0, tau_margin=0.0)
    controls = [result(10.0, tau=0.01), result(4.0, tau=0.01)]
    r = result(12.0, tau=0.5)  # significant alone, but 12 < 10 + 3
    v = decide_identity(r, controls, rule)
    assert v.threshold == pytest.approx(expected_threshold(rule, r, controls)) == pytest.approx(13.0)
    assert v.related is False and "controls" in v.reason
    assert decide_identity(result(13.5, tau=0.5), controls, rule).related is True


def test_not_related_below_the_tau_part():
    rule = VerdictRule(alpha=0.01, z_margin=3.0, tau_margin=0.1)
    controls = [result(1.0, tau=0.02), result(2.0, tau=0.05)]
    r = result(12.0, tau=0.3, k=32, n=200)  # clears 2.33 and 2 + 3, not (0.05 + 0.1) * sqrt(32) / sigma_200 = 17.8
    v = decide_identity(r, controls, rule)
    want = 0.15 * math.sqrt(32) / sigma_n(200)
    assert v.threshold == pytest.approx(expected_threshold(rule, r, controls)) == pytest.approx(want)
    assert 12.0 < want
    assert v.related is False and "tau max 0.0500" in v.reason
    assert decide_identity(result(want + 0.01, tau=0.3), controls, rule).related is True


def test_tau_part_applies_without_controls():
    rule = VerdictRule(alpha=0.01, z_margin=3.0, tau_margin=0.1)
    r = result(10.0, tau=0.3, k=64, n=400)
    v = decide_identity(r, (), rule)
    assert v.threshold == pytest.approx(0.1 * 8.0 / sigma_n(400)) == pytest.approx(expected_threshold(rule, r, []))
    assert v.related is False


def test_controls_above_flag_a_significant_but_inflated_z():
    # docs/method.md: a swapped model at z = 4.1 with controls 2.3 .. 6.2 passes the analytic test alone.
    swapped = result(4.1)
    assert swapped.related is True
    v = decide_identity(swapped, [result(2.3), result(6.2), result(3.0)], PLAIN)
    assert v.related is False
    assert v.threshold == pytest.approx(6.2 + 3.0)
    assert "controls" in v.reason


def test_margin_edge_is_strict():
    assert decide_identity(result(7.0), [result(4.0)], PLAIN).related is False  # z must be > 4 + 3
    assert decide_identity(result(7.01), [result(4.0)], PLAIN).related is True


def test_negative_controls_do_not_lower_the_threshold():
    v = decide_identity(result(2.5), [result(-3.0, tau=-0.2), result(-1.0, tau=-0.1)],
                        VerdictRule(z_margin=3.0, tau_margin=0.0))
    assert v.threshold == pytest.approx(Z_01)
    assert v.related is True
    # A negative control tau does not lower the effect-size part below tau_margin either.
    rule = VerdictRule(z_margin=0.0, tau_margin=0.1)
    r = result(30.0)
    v = decide_identity(r, [result(-1.0, tau=-0.5)], rule)
    assert v.threshold == pytest.approx(0.1 * math.sqrt(32) / sigma_n(200))


def test_tau_margin_scales_with_sqrt_k_over_sigma_n_and_z_margin_does_not():
    rule_tau = VerdictRule(alpha=0.01, z_margin=0.0, tau_margin=0.1)
    rule_z = VerdictRule(alpha=0.01, z_margin=3.0, tau_margin=0.0)
    controls = [result(1.5, tau=0.0)]
    sizes = [(32, 200), (64, 400), (4096, 10000)]
    tau_thresholds = [decide_identity(result(1e4, k=k, n=n), controls, rule_tau).threshold for k, n in sizes]
    z_thresholds = [decide_identity(result(1e4, k=k, n=n), controls, rule_z).threshold for k, n in sizes]
    for (k, n), thr in zip(sizes, tau_thresholds):
        assert thr == pytest.approx(0.1 * math.sqrt(k) / sigma_n(n))
    assert tau_thresholds[0] < tau_thresholds[1] < tau_thresholds[2]
    assert z_thresholds == pytest.approx([4.5, 4.5, 4.5])
    # Scale-free in tau: a pair with tau_mean 0.12 holds at every size and 0.08 fails at every
    # size under the tau margin, while a z margin calls the 0.08 pair related once n and k are large.
    for k, n in sizes:
        assert decide_identity(consistent(0.12, k, n), controls, rule_tau).related is True
        assert decide_identity(consistent(0.08, k, n), controls, rule_tau).related is False
    big = consistent(0.08, 4096, 10000)
    assert big.z > 700
    assert decide_identity(big, controls, rule_z).related is True


# ------------------------------------------------------------------ decide_identity: undetermined


def test_undetermined_result_gives_none_with_reason():
    v = decide_identity(undetermined("every identity column is constant"), [result(1.0)], CUSTODY_RULE)
    assert v.related is None
    assert "undetermined" in v.reason and "constant" in v.reason
    assert v.threshold == pytest.approx(Z_01)  # no data-dependent part without a determined result
    assert "undetermined" in v.summary()


def test_controls_given_but_none_determined_is_undetermined():
    v = decide_identity(result(10.0), [undetermined("a"), undetermined("b")], PLAIN)
    assert v.related is None and "null cannot be measured" in v.reason
    assert "a; b" in v.reason
    assert v.control_z_max == 0.0 and v.control_z_mean == 0.0 and v.control_tau_max == 0.0


def test_undetermined_controls_are_left_out_of_max_and_mean():
    rule = VerdictRule(z_margin=3.0, tau_margin=0.1)
    big_undetermined = LineageResult(z=50.0, log10_p=0.0, p_value=1.0, tau_mean=0.9, k=1, n=200, related=None,
                                      alpha=0.01, reason="weird")
    v = decide_identity(result(20.0, tau=0.5), [big_undetermined, nan_result(), result(2.0, tau=0.04),
                                                result(1.0, tau=0.02)], rule)
    assert v.control_z_max == pytest.approx(2.0) and v.control_z_mean == pytest.approx(1.5)
    assert v.control_tau_max == pytest.approx(0.04)
    assert v.threshold == pytest.approx(expected_threshold(rule, result(20.0), [result(2.0, tau=0.04),
                                                                                 result(1.0, tau=0.02)]))
    assert v.related is True
    assert v.control_z == (50.0, 0.0, 2.0, 1.0)  # every control listed; NaN shown as 0.0


def test_no_nan_in_dict_metrics_or_summary():
    verdicts = [
        decide_identity(nan_result(), [nan_result(), result(2.0)], CUSTODY_RULE),
        decide_identity(result(9.0), [nan_result(), nan_result()], CUSTODY_RULE),
        decide_identity(undetermined(), (), BIRTH_RULE),
    ]
    for v in verdicts:
        assert v.related is None
        d = v.to_dict()
        assert all_finite(d)
        json.dumps(d, allow_nan=False)
        assert math.isfinite(v.z) and math.isfinite(v.headroom) and math.isfinite(v.threshold)
    p = ProbeVerdict(step=5, birth=verdicts[0], link=verdicts[1], anchor_step=0)
    metrics = p.to_metrics(float("nan"))
    assert all(isinstance(x, float) and math.isfinite(x) for x in metrics.values())
    # An undetermined test logs no figure (no fake 0), and the verdict is its own value, not "unrelated".
    assert "seedprints/z" not in metrics and "seedprints/log10_p" not in metrics and "seedprints/link_z" not in metrics
    assert metrics["seedprints/related"] == -1.0 and metrics["seedprints/undetermined"] == 1.0
    assert metrics["seedprints/probe_seconds"] == 0.0


def test_decide_identity_rejects_non_results():
    with pytest.raises(InputError, match="result must be a LineageResult"):
        decide_identity(3.0, (), PLAIN)
    with pytest.raises(InputError, match=r"control_results\[1\] must be a LineageResult"):
        decide_identity(result(3.0), [result(1.0), 3.0], PLAIN)
    with pytest.raises(InputError, match="rule must be a VerdictRule"):
        decide_identity(result(3.0), (), 0.01)


# ------------------------------------------------------------------ ProbeVerdict


def _verdict_of(state: bool | None) -> IdentityVerdict:
    r = {True: result(10.0), False: result(1.0), None: undetermined()}[state]
    v = decide_identity(r, (), PLAIN)
    assert v.related is state
    return v


def _expected(birth: bool | None, link: bool | None, fail_on: str) -> bool | None:
    if fail_on == "custody":
        return link
    if fail_on == "birth":
        return birth
    if False in (birth, link):
        return False
    if birth is True and link is True:
        return True
    return None


@pytest.mark.parametrize("fail_on", FAIL_ON)
@pytest.mark.parametrize("birth, link", list(itertools.product([True, False, None], repeat=2)))
def test_probe_verdict_related_for_each_fail_on(birth, link, fail_on):
    p = ProbeVerdict(step=30, birth=_verdict_of(birth), link=_verdict_of(link), anchor_step=10, fail_on=fail_on)
    assert p.related is _expected(birth, link, fail_on)
    assert p.birth_detectable is (birth is True)
    assert p.link_span == 20
    metrics = p.to_metrics(0.25)
    assert metrics["seedprints/related"] == {True: 1.0, False: 0.0, None: -1.0}[p.related]
    assert metrics["seedprints/undetermined"] == (1.0 if p.related is None else 0.0)
    assert metrics["seedprints/birth_detectable"] == (1.0 if birth is True else 0.0)
    if p.related is not True and fail_on in ("custody", "either") and link is not True:
        assert "custody link from step 10" in p.reason
    if fail_on == "custody":
        assert p.reason is None or "birth test" not in p.reason


def test_probe_verdict_fixed_cases():
    t, f, u = _verdict_of(True), _verdict_of(False), _verdict_of(None)
    assert ProbeVerdict(1, birth=f, link=t, anchor_step=0).related is True  # birth fading is not identity loss
    assert ProbeVerdict(1, birth=f, link=t, anchor_step=0, fail_on="either").related is False
    assert ProbeVerdict(1, birth=u, link=t, anchor_step=0, fail_on="either").related is None
    assert ProbeVerdict(1, birth=t, link=f, anchor_step=0, fail_on="birth").related is True


@pytest.mark.parametrize("bad", ["Custody", "both", "", None])
def test_probe_verdict_bad_fail_on(bad):
    with pytest.raises(InputError, match="fail_on must be one of 'custody', 'birth', 'either'"):
        ProbeVerdict(step=1, birth=_verdict_of(True), link=_verdict_of(True), anchor_step=0, fail_on=bad)


def test_to_metrics_keys_are_the_tags_in_order_and_finite():
    controls = [result(1.0, tau=0.01), result(3.0, tau=0.02)]
    p = ProbeVerdict(step=40, birth=decide_identity(result(9.0), controls, BIRTH_RULE),
                     link=decide_identity(result(30.0, tau=0.6), controls, CUSTODY_RULE), anchor_step=25)
    m = p.to_metrics(probe_seconds=1.25)
    assert tuple(m) == METRIC_TAGS
    assert METRIC_TAGS == tuple(f"seedprints/{n}" for n in METRIC_NAMES)
    assert len(set(METRIC_TAGS)) == len(METRIC_TAGS)
    assert all(type(x) is float and math.isfinite(x) for x in m.values())
    assert m["seedprints/related"] == 1.0
    assert m["seedprints/probe_seconds"] == 1.25
    assert m["seedprints/control_z_max"] == 3.0 and m["seedprints/control_z_mean"] == 2.0
    assert m["seedprints/identity_dims"] == 32.0
    assert m["seedprints/link_span"] == 15.0
    assert m["seedprints/z"] == 9.0 and m["seedprints/link_z"] == 30.0
    assert m["seedprints/threshold"] == pytest.approx(p.birth.threshold)
    assert m["seedprints/link_threshold"] == pytest.approx(p.link.threshold)


def test_custom_scalars_layout_only_names_logged_tags():
    import re

    patterns = [p for chart in CUSTOM_SCALARS_LAYOUT["seedprints"].values() for p in chart[1]]
    assert patterns
    for pattern in patterns:
        assert sum(bool(re.match(pattern, t)) for t in METRIC_TAGS) == 1, pattern


# ------------------------------------------------------------------ measuring: safe_lineage_test, judge_probe


def test_safe_lineage_test_turns_bad_input_into_undetermined():
    live = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    bad = live.clone()
    bad[3, 2] = float("nan")
    r = safe_lineage_test(live, bad, alpha=0.01)
    assert r.related is None and "NaN" in r.reason and r.n == 50 and r.z == 0.0
    v = decide_identity(r, (), CUSTODY_RULE)
    assert v.related is None and all_finite(v.to_dict())


@pytest.fixture(scope="module")
def matrices():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1234)
    n, dim = 200, 32
    base = torch.randn(n, dim, generator=g)
    return {
        "base": base,
        # A slightly noised copy: per-dimension Kendall tau about 0.8, z about 95 at n = 200, k = 32,
        # while the threshold is at most (control tau ~0.03 + 0.1) * sqrt(32) / sigma_200 ~ 16: margin > 5x.
        "noised": base + 0.3 * torch.randn(n, dim, generator=g),
        # Independent: z ~ N(0, 1), far below the analytic 2.33 + the controls' margin and the tau part.
        "other": torch.randn(n, dim, generator=g),
        "controls": [torch.randn(n, dim, generator=g) for _ in range(3)],
    }


def test_judge_probe_relates_a_noised_copy(matrices):
    m = matrices
    v = judge_probe(50, m["noised"], reference=m["base"], anchor=m["base"], anchor_step=0, controls=m["controls"])
    assert v.related is True and v.birth.related is True and v.link.related is True
    assert v.birth.z > 5 * v.birth.threshold and v.link.z > 5 * v.link.threshold
    assert v.link.threshold >= v.birth.threshold  # the link's tau margin only raises it
    assert v.link_span == 50 and len(v.birth.controls) == 3


def test_judge_probe_rejects_an_independent_matrix(matrices):
    m = matrices
    v = judge_probe(50, m["other"], reference=m["base"], anchor=m["noised"], anchor_step=25, controls=m["controls"])
    assert v.related is False and v.birth.related is False and v.link.related is False
    assert v.birth.z < 3.0 and v.link.z < 3.0
    assert v.link_span == 25
    # Without controls the analytic and effect-size parts alone still reject it.
    v = judge_probe(50, m["other"], reference=m["base"], anchor=m["noised"], anchor_step=25)
    assert v.related is False and v.birth.control_z_max == 0.0


def test_judge_probe_reuses_birth_test_when_anchor_is_reference(matrices):
    m = matrices
    v = judge_probe(3, m["noised"], reference=m["base"], anchor=m["base"], anchor_step=0, controls=m["controls"])
    assert v.link.result is v.birth.result
    # Different rules still give different thresholds on the same test.
    assert v.link.threshold > v.birth.threshold


def test_judge_probe_nan_live_is_undetermined_not_a_crash(matrices):
    m = matrices
    live = m["noised"].clone()
    live[0, 0] = float("inf")
    v = judge_probe(7, live, reference=m["base"], anchor=m["base"], anchor_step=0, controls=m["controls"])
    assert v.related is None and v.birth.related is None
    assert "controls" in v.link.reason or "undetermined" in v.link.reason
    assert all(math.isfinite(x) for x in v.to_metrics().values())
