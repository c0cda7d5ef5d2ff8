"""When to probe: dense at the start, ``every_n_steps`` later, closer when a link weakens.

Early training moves a model fastest: at lr 3e-3 the demo model's link from step 0 to step 50
is only z = 4.3 while its 25-step links later in the run stay at z = 230-360 (``method.md``).
So a chain of custody needs probes close together at the start and can space them out
later. :class:`ProbeSchedule` is a pure function of the last probe's step, the interval that
led to it and the link's headroom (``z / threshold``); the callback keeps its two numbers
(``next_step``, ``interval``) in its checkpoint state, and every rank computes the same
schedule from the same (broadcast) features.

The rule:

* the interval starts at ``first_interval`` and doubles after each link that held with
  headroom ``>= adapt_headroom``, up to ``every_n_steps``; once there, probes fall on
  multiples of ``every_n_steps`` (so they line up with checkpoints saved every N steps), and
  a shorter interval never steps over such a multiple (the probe falls on it instead);
* a link that held with headroom below ``adapt_headroom`` halves the interval (not below
  ``min_interval``): the next link spans fewer steps, so it is stronger;
* a failed link halves it too, so the failure is confirmed (or cleared) soon;
* an undetermined probe keeps the interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InputError

__all__ = ["DEFAULT_ADAPT_HEADROOM", "DEFAULT_RAMP_FRACTION", "ProbeSchedule"]

#: Shorten the interval when a link's z falls below this multiple of its threshold. Measured in
#: docs/benchmarks.md ("Custody"): own links kept at least about half their effect size when
#: the span doubled (e.g. 0.12 -> 0.07 from 100 to 200 steps), so a link at 2x its threshold
#: leaves the doubled span above it; 2.5 changed no replayed outcome.
DEFAULT_ADAPT_HEADROOM = 2.0
#: The largest interval, as a fraction of the step it starts from, while the schedule ramps up.
DEFAULT_RAMP_FRACTION = 0.25


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ProbeSchedule:
    """Probe steps: geometric start, then every ``every_n_steps``, adapted to the link's strength."""

    every_n_steps: int = 1000
    first_interval: int = 1
    min_interval: int = 1
    adapt_headroom: float = DEFAULT_ADAPT_HEADROOM
    adaptive: bool = True
    ramp_fraction: float = DEFAULT_RAMP_FRACTION

    def __post_init__(self) -> None:
        _positive_int("every_n_steps", self.every_n_steps)
        _positive_int("first_interval", self.first_interval)
        _positive_int("min_interval", self.min_interval)
        if self.min_interval > self.every_n_steps:
            raise InputError(f"min_interval={self.min_interval} must be <= every_n_steps={self.every_n_steps}")
        h = self.adapt_headroom
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h < 1.0:
            raise InputError(f"adapt_headroom must be a finite number >= 1 (z / threshold), got {h!r}")
        r = self.ramp_fraction
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise InputError(f"ramp_fraction must be a finite number > 0 (largest interval / current step), got {r!r}")
        if not isinstance(self.adaptive, bool):
            raise InputError(f"adaptive must be True or False, got {self.adaptive!r}")

    def first(self) -> tuple[int, int]:
        """``(next_step, interval)`` right after the step-0 reference."""
        if not self.adaptive:
            return self.every_n_steps, self.every_n_steps
        interval = min(self.first_interval, self.every_n_steps)
        return interval, interval

    def after(self, step: int, interval: int, link_related: bool | None, headroom: float) -> tuple[int, int]:
        """``(next_step, interval)`` after a probe at ``step`` whose link had this verdict and headroom."""
        n = self.every_n_steps
        aligned = (step // n + 1) * n
        if not self.adaptive:
            return aligned, n
        if link_related is None:
            new = interval
        elif link_related is False or headroom < self.adapt_headroom:
            new = max(self.min_interval, interval // 2)
        else:
            new = min(n, interval * 2, max(self.min_interval, int(step * self.ramp_fraction)))
        if new >= n:
            return aligned, n
        # Never step over a multiple of every_n_steps: every checkpoint step keeps its probe.
        return min(step + new, aligned), new
