"""When to probe: dense at the start, ``every_n_steps`` later, closer when a link weakens.

Early training moves a model fastest: at lr 3e-3 the demo model's link from step 0 to step 50
is only z = 4.3 while its 25-step links later in the run stay at z = 230-360 (``docs/method.md``).
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

from dataclasses import dataclass

from .checks import check_bool, check_int, check_number
from .errors import InputError

__all__ = ["DEFAULT_ADAPT_HEADROOM", "DEFAULT_RAMP_FRACTION", "ProbeSchedule"]

#: Shorten the interval when a link's z falls below this multiple of its threshold. Measured in
#: docs/benchmarks.md ("Custody"): own links kept at least about half their effect size when
#: the span doubled (e.g. 0.12 -> 0.07 from 100 to 200 steps), so a link at 2x its threshold
#: leaves the doubled span above it; 2.5 changed no replayed outcome.
DEFAULT_ADAPT_HEADROOM = 2.0
#: The largest interval, as a fraction of the step it starts from, while the schedule ramps up.
DEFAULT_RAMP_FRACTION = 0.25


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
        check_int("every_n_steps", self.every_n_steps, low=1)
        check_int("first_interval", self.first_interval, low=1)
        check_int("min_interval", self.min_interval, low=1)
        if self.min_interval > self.every_n_steps:
            raise InputError(f"min_interval={self.min_interval} must be <= every_n_steps={self.every_n_steps}")
        check_number("adapt_headroom", self.adapt_headroom, low=1.0, hint="z / threshold")
        check_number("ramp_fraction", self.ramp_fraction, low=0.0, low_open=True,
                     hint="largest interval / current step")
        check_bool("adaptive", self.adaptive)

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
