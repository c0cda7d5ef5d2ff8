"""The identity verdict: one Lightning-free rule for the callback, the CLI and the audit.

Two tests are made at every probe of a run, and both are judged by :class:`VerdictRule`:

* the **birth test**: the live model against the run's step-0 reference (its birth
  certificate). It fades as training moves the weights away from the init: at lr 3e-3 the
  demo model's birth z falls from 32 to 2-5 within 50 steps (``docs/method.md``). Fading is not
  identity loss, so by default it is only reported (``seedprints/birth_detectable``).
* the **custody link**: the live model against the features of the last probe whose own link
  held (the *anchor*). Consecutive probes of one run stay tied at z of about 70-560 at n = 1000,
  while a swapped-in model (another seed trained on the same data) scores below 5 against the
  anchor. A failed link never becomes the anchor, so a swapped model cannot "link to itself"
  at the next probe. "Identity lost" means a broken link.

Why two margins
---------------
z grows like ``tau_mean * sqrt(k) / sigma_n``: a margin in z fitted at n = 1000, D = 128 does not
transfer to n = 10000, D = 4096. The rule therefore has two parts that do not need re-tuning:

* ``z_margin``, in z, over the largest z of the fresh-init controls. The controls measure the
  null of "an unrelated model against this live model" in real time, including the inflated
  null the analytic test misses; their z is noise around that null, so a few z of margin is
  a noise allowance whatever n and D are.
* ``tau_margin``, in units of ``tau_mean`` (an effect size: it does not grow with n or k), over
  the largest control tau. It is needed by the custody link only: a model trained from another
  seed on the same data in the same order shares a small response with the run's trained
  anchor (tau up to 0.023: ``peers`` z of 5-18 at n = 1000), which fresh-init controls
  cannot see, and whose z grows with ``sqrt(n k)``. Own links stand far above it (measured in
  docs/benchmarks.md, "Custody"). The birth test has no such shared response (the unrelated
  relation at birth is exactly what the controls measure), so its ``tau_margin`` is 0.

The threshold of a test is reported in z so that it can be drawn beside z::

    threshold = max(z_alpha, control_z_max + z_margin, (control_tau_max + tau_margin) * sqrt(k) / sigma_n)
    related   = p < alpha and z > threshold

``metric tags``: :data:`METRIC_TAGS` is the one list of what the callback logs; the TensorBoard
layout (:data:`CUSTOM_SCALARS_LAYOUT`), :mod:`.plotting` and the callback's history derive
from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .checks import check_number
from .errors import InputError
from .stats import LineageResult, kendall_null_sigma, lineage_test, z_threshold

__all__ = [
    "BIRTH_RULE",
    "CUSTODY_RULE",
    "CUSTOM_SCALARS_LAYOUT",
    "DEFAULT_BIRTH_Z_MARGIN",
    "DEFAULT_LINK_TAU_MARGIN",
    "DEFAULT_LINK_Z_MARGIN",
    "FAIL_ON",
    "IdentityVerdict",
    "METRIC_TAGS",
    "ProbeVerdict",
    "VerdictRule",
    "decide_identity",
    "judge",
    "judge_probe",
    "tag",
]

#: Over the largest fresh-init control z (a noise allowance, z units): unrelated pairs stood at
#: most 3.7 above their largest control at n = 1000 (cross and fresh-init pairs,
#: docs/benchmarks.md "Calibration").
DEFAULT_BIRTH_Z_MARGIN = 4.0
DEFAULT_LINK_Z_MARGIN = 4.0
#: Effect-size margin of the custody link over the largest control tau (docs/benchmarks.md,
#: "Custody"): another seed trained on the same data in the same order reached at most 0.023
#: above the controls against any of our probes (LLaMA width 256, lr 6e-3), so 0.04 leaves a
#: factor 1.7; own links of up to 200 steps stayed >= 0.060 above them at every lr and width.
DEFAULT_LINK_TAU_MARGIN = 0.04

FAIL_ON = ("custody", "birth", "either")


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


@dataclass(frozen=True)
class VerdictRule:
    """How far a test must stand above the analytic null and the measured (control) null.

    ``alpha`` is the one-sided significance level; ``z_margin`` is in z units over the largest
    control z; ``tau_margin`` is in ``tau_mean`` units over the largest control tau. See the
    module docstring for why there are two margins.
    """

    alpha: float = 0.01
    z_margin: float = DEFAULT_BIRTH_Z_MARGIN
    tau_margin: float = 0.0

    def __post_init__(self) -> None:
        z_threshold(self.alpha)  # validates alpha with a clear message
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "z_margin", check_number("z_margin", self.z_margin, low=0.0))
        object.__setattr__(self, "tau_margin", check_number("tau_margin", self.tau_margin, low=0.0))

    def to_dict(self) -> dict[str, float]:
        return {"alpha": self.alpha, "z_margin": self.z_margin, "tau_margin": self.tau_margin}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerdictRule:
        return cls(alpha=data["alpha"], z_margin=data["z_margin"], tau_margin=data["tau_margin"])

    def describe(self) -> str:
        text = f"alpha {self.alpha:g}, control z + {self.z_margin:g}"
        return text + (f", control tau + {self.tau_margin:g}" if self.tau_margin else "")


#: The rule of the birth test (live model vs the step-0 reference, or any init-based fingerprint).
BIRTH_RULE = VerdictRule(z_margin=DEFAULT_BIRTH_Z_MARGIN, tau_margin=0.0)
#: The rule of a custody link (live model vs the last held probe, or any trained fingerprint).
CUSTODY_RULE = VerdictRule(z_margin=DEFAULT_LINK_Z_MARGIN, tau_margin=DEFAULT_LINK_TAU_MARGIN)


@dataclass(frozen=True)
class IdentityVerdict:
    """One test (``result``) judged against its controls by ``rule``.

    ``related`` is ``True`` (same lineage shown), ``False`` (not shown: the model responds like
    an unrelated one) or ``None`` (undetermined: the test could not be made; ``reason`` says
    why). ``control_*`` figures are over the controls whose test was determined, 0.0 when there
    are none (never NaN). ``threshold`` is the z the test had to exceed.
    """

    result: LineageResult
    controls: tuple[LineageResult, ...]
    control_z_max: float
    control_z_mean: float
    control_tau_max: float
    threshold: float
    related: bool | None
    reason: str | None
    rule: VerdictRule

    @property
    def z(self) -> float:
        return _finite(self.result.z)

    @property
    def control_z(self) -> tuple[float, ...]:
        """Every control's z (undetermined controls give 0.0)."""
        return tuple(_finite(c.z) for c in self.controls)

    @property
    def headroom(self) -> float:
        """``z / threshold``: above 1 the test holds; the schedule shortens its interval below ``adapt_headroom``."""
        return self.z / self.threshold if self.threshold > 0 else 0.0

    def summary(self) -> str:
        """One readable line with the figures behind the verdict."""
        r = self.result
        controls = ", ".join(f"{z:.2f}" for z in self.control_z) or "none"
        state = {True: "related", False: "NOT related", None: "undetermined"}[self.related]
        text = (f"{state}: z={r.z:.2f} (log10 p={r.log10_p:.2f}, tau_mean={r.tau_mean:.4f}, k={r.k}, n={r.n}) vs "
                f"threshold {self.threshold:.2f} [{self.rule.describe()}; control z: {controls}]")
        return text + (f"; {self.reason}" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"z": _finite(r.z), "log10_p": _finite(r.log10_p), "tau_mean": _finite(r.tau_mean), "k": int(r.k),
                "n": int(r.n), "threshold": _finite(self.threshold), "related": self.related, "reason": self.reason,
                "control_z": list(self.control_z), "control_tau_max": _finite(self.control_tau_max),
                "rule": self.rule.to_dict()}


def _z_of_tau(tau: float, result: LineageResult) -> float:
    if result.k < 1 or result.n < 3:
        return 0.0
    return tau * math.sqrt(result.k) / kendall_null_sigma(result.n)


def decide_identity(
    result: LineageResult,
    control_results: Sequence[LineageResult] = (),
    rule: VerdictRule = BIRTH_RULE,
) -> IdentityVerdict:
    """Judge ``result`` (``lineage_test(base, live)``) against ``control_results``.

    ``control_results[i]`` is ``lineage_test(control_i, live)``: each fresh-init control as the
    base, the same live model as the target, so the controls measure in real time the z an
    unrelated model gets. Undetermined controls are left out; controls given but none
    determined make the verdict undetermined (the null cannot be measured).
    """
    if not isinstance(result, LineageResult):
        raise InputError(f"result must be a LineageResult, got {type(result).__name__}")
    if not isinstance(rule, VerdictRule):
        raise InputError(f"rule must be a VerdictRule, got {type(rule).__name__}")
    controls = tuple(control_results)
    for i, c in enumerate(controls):
        if not isinstance(c, LineageResult):
            raise InputError(f"control_results[{i}] must be a LineageResult, got {type(c).__name__}")
    determined = [c for c in controls if c.related is not None and math.isfinite(c.z)]
    z_max = max((float(c.z) for c in determined), default=0.0)
    z_mean = sum(float(c.z) for c in determined) / len(determined) if determined else 0.0
    tau_max = max((float(c.tau_mean) for c in determined), default=0.0)
    # z is the normal quantile of the test's own p (Bonferroni-corrected with use_agg), so
    # the analytic threshold is z(alpha) either way.
    threshold = z_threshold(rule.alpha)
    if result.related is not None:
        if determined:
            threshold = max(threshold, z_max + rule.z_margin)
        threshold = max(threshold, _z_of_tau(max(tau_max, 0.0) + rule.tau_margin, result))

    def verdict(related: bool | None, reason: str | None) -> IdentityVerdict:
        return IdentityVerdict(result=result, controls=controls, control_z_max=z_max, control_z_mean=z_mean,
                               control_tau_max=tau_max, threshold=threshold, related=related, reason=reason, rule=rule)

    z = float(result.z)
    if result.related is None:
        return verdict(None, f"the lineage test was undetermined: {result.reason}")
    if controls and not determined:
        reasons = "; ".join(sorted({str(c.reason) for c in controls}))
        return verdict(None, f"none of the {len(controls)} control tests was determined ({reasons}), so the null "
                             "cannot be measured")
    if not result.related:
        return verdict(False, f"z={z:.2f} is not significant at alpha={rule.alpha:g} (needs > "
                              f"{z_threshold(rule.alpha):.2f})")
    if not z > threshold:
        return verdict(False, f"z={z:.2f} (tau_mean {result.tau_mean:.4f}) does not stand clear of the fresh-init "
                              f"controls (z max {z_max:.2f}, tau max {tau_max:.4f}; needs z > {threshold:.2f} with "
                              f"{rule.describe()})")
    return verdict(True, None)


# --------------------------------------------------------------------------------------
# One probe of a run: birth test + custody link -> the verdict that drives the action
# --------------------------------------------------------------------------------------


def _combine(birth: bool | None, link: bool | None, fail_on: str) -> bool | None:
    if fail_on == "custody":
        return link
    if fail_on == "birth":
        return birth
    if birth is False or link is False:
        return False
    return True if (birth and link) else None


@dataclass(frozen=True)
class ProbeVerdict:
    """What one probe found: the birth test, the custody link, and the deciding verdict.

    ``related`` drives the callback's action: the link (``fail_on="custody"``), the birth test
    (``"birth"``), or both (``"either"``: False when either fails). ``anchor_step`` is the step
    of the features the link was tested against; ``link_span`` = ``step - anchor_step``.
    """

    step: int
    birth: IdentityVerdict
    link: IdentityVerdict
    anchor_step: int
    fail_on: str = "custody"

    def __post_init__(self) -> None:
        if self.fail_on not in FAIL_ON:
            raise InputError(f"fail_on must be one of {', '.join(map(repr, FAIL_ON))}, got {self.fail_on!r}")

    @property
    def related(self) -> bool | None:
        return _combine(self.birth.related, self.link.related, self.fail_on)

    @property
    def birth_detectable(self) -> bool:
        return self.birth.related is True

    @property
    def link_span(self) -> int:
        return int(self.step - self.anchor_step)

    @property
    def reason(self) -> str | None:
        parts = []
        if self.fail_on in ("custody", "either") and self.link.reason:
            parts.append(f"custody link from step {self.anchor_step}: {self.link.reason}")
        if self.fail_on in ("birth", "either") and self.birth.reason:
            parts.append(f"birth test: {self.birth.reason}")
        return "; ".join(parts) or None

    def to_metrics(self, probe_seconds: float = 0.0) -> dict[str, float]:
        """The logged tags (:data:`METRIC_TAGS`), all finite floats.

        ``related`` is 1 (held), 0 (shown NOT related) or -1 (undetermined), and ``undetermined``
        flags the last case, so a dashboard or ``EarlyStopping`` never reads "could not be
        measured" as "unrelated". A test that could not be made logs no z, log10 p, tau or
        threshold at all (a gap in its curve, not a fake 0); ``birth_detectable`` is 1 only when
        confirmed.
        """
        b, link = self.birth, self.link
        values: dict[str, float] = {
            "identity_dims": float(b.result.k), "birth_detectable": 1.0 if self.birth_detectable else 0.0,
            "link_span": float(self.link_span),
            "related": {True: 1.0, False: 0.0, None: -1.0}[self.related],
            "undetermined": 1.0 if self.related is None else 0.0,
            "probe_seconds": _finite(probe_seconds),
        }
        if b.related is not None:
            values.update({"z": b.z, "log10_p": _finite(b.result.log10_p), "tau_mean": _finite(b.result.tau_mean),
                           "threshold": _finite(b.threshold)})
        if link.related is not None:
            values.update({"link_z": link.z, "link_log10_p": _finite(link.result.log10_p),
                           "link_tau_mean": _finite(link.result.tau_mean), "link_threshold": _finite(link.threshold)})
        if any(c.related is not None for c in b.controls) or not b.controls:
            values.update({"control_z_max": _finite(b.control_z_max), "control_z_mean": _finite(b.control_z_mean)})
        return {tag(name): values[name] for name in METRIC_NAMES if name in values}


#: Short metric names, in log order; the tag of ``name`` is ``seedprints/<name>``.
METRIC_NAMES = (
    "z", "log10_p", "tau_mean", "identity_dims", "threshold", "birth_detectable",
    "link_z", "link_log10_p", "link_tau_mean", "link_threshold", "link_span",
    "related", "undetermined", "control_z_max", "control_z_mean", "probe_seconds",
)


def tag(name: str) -> str:
    """The logged tag of a metric name: ``seedprints/<name>``."""
    return f"seedprints/{name}"


#: Every tag the callback can log, in order (an undetermined test's figures are left out).
METRIC_TAGS = tuple(tag(name) for name in METRIC_NAMES)

#: TensorBoard custom-scalars layout: the birth curve with its controls and threshold, and the
#: custody link with its threshold, each on one chart.
CUSTOM_SCALARS_LAYOUT = {
    "seedprints": {
        "birth test: z vs fresh-init controls": [
            "Multiline", [f"^{tag(n)}$" for n in ("z", "control_z_max", "control_z_mean", "threshold")],
        ],
        "custody link: z vs threshold": ["Multiline", [f"^{tag(n)}$" for n in ("link_z", "link_threshold")]],
    },
}


# --------------------------------------------------------------------------------------
# Measure -> decide, shared by the callback and the offline audit
# --------------------------------------------------------------------------------------


def safe_lineage_test(base: Any, live: Any, *, alpha: float, identity_mode: str = "coset",
                      identity_ratio: float | None = None, **test_kwargs: Any) -> LineageResult:
    """``lineage_test`` whose bad-input errors (e.g. NaN hidden states of a diverged model) become
    an undetermined result with the reason, so a probe never crashes a run and nothing NaN is logged."""
    try:
        return lineage_test(base, live, identity_mode=identity_mode, identity_ratio=identity_ratio, alpha=alpha,
                            **test_kwargs)
    except InputError as exc:
        n = int(live.shape[0]) if hasattr(live, "shape") and len(live.shape) else 0
        return LineageResult(z=0.0, log10_p=0.0, p_value=1.0, tau_mean=0.0, k=0, n=n, related=None, alpha=alpha,
                             identity_mode=identity_mode, reason=str(exc))


def judge(
    base: Any,
    live: Any,
    controls: Sequence[Any] = (),
    rule: VerdictRule = BIRTH_RULE,
    *,
    control_results: Sequence[LineageResult] | None = None,
    **test_kwargs: Any,
) -> IdentityVerdict:
    """The one way features are judged: ``live`` against ``base`` and against every control, by ``rule``.

    ``base``, ``live`` and each of ``controls`` are ``[n, D]`` feature matrices on the same probe
    (each control is a fresh init: ``lineage_test(control, live)`` measures the unrelated null).
    Every test is :func:`safe_lineage_test`, so features a test cannot use (a diverged model's
    NaN) make the verdict undetermined instead of raising. ``control_results`` passes tests of
    the same controls against the same ``live`` already made (one probe's two verdicts share
    them). ``test_kwargs`` go to :func:`~seedprints_lightning.lineage_test`.
    """
    def test(reference: Any) -> LineageResult:
        return safe_lineage_test(reference, live, alpha=rule.alpha, **test_kwargs)

    if control_results is None:
        control_results = tuple(test(c) for c in controls)
    return decide_identity(test(base), control_results, rule)


def judge_probe(
    step: int,
    live: Any,
    *,
    reference: Any,
    anchor: Any,
    anchor_step: int,
    controls: Sequence[Any] = (),
    birth_rule: VerdictRule = BIRTH_RULE,
    custody_rule: VerdictRule = CUSTODY_RULE,
    fail_on: str = "custody",
    identity_mode: str = "coset",
    identity_ratio: float | None = None,
) -> ProbeVerdict:
    """One probe's two verdicts (:func:`judge` twice): the birth test and the custody link.

    ``reference`` is the birth fingerprint's ``[n, D]`` features, ``anchor`` the last held
    probe's, ``controls`` each fresh-init control's. The link always uses ``coset`` identity
    dims (neither side is an init); the birth test uses ``identity_mode``. The two share their
    control tests when their identity modes agree, and their test when the anchor is the reference.
    """
    birth = judge(reference, live, controls, birth_rule, identity_mode=identity_mode, identity_ratio=identity_ratio)
    if anchor is reference and identity_mode == "coset":
        link = decide_identity(birth.result, birth.controls, custody_rule)
    else:
        link = judge(anchor, live, controls, custody_rule, identity_ratio=identity_ratio,
                     control_results=birth.controls if identity_mode == "coset" else None)
    return ProbeVerdict(step=int(step), birth=birth, link=link, anchor_step=int(anchor_step), fail_on=fail_on)
