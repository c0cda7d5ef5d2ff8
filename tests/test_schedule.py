"""When to probe (seedprints_lightning.core.schedule.ProbeSchedule): a pure function, no models."""

from __future__ import annotations

import pytest

from seedprints_lightning import InputError
from seedprints_lightning.core.schedule import DEFAULT_ADAPT_HEADROOM, ProbeSchedule

STRONG = 10.0  # headroom (z / threshold) well above DEFAULT_ADAPT_HEADROOM = 2
NO_RAMP = 1e9  # ramp_fraction that never binds: isolates the doubling / halving rules
WEAK = 1.5  # held, but below the adapt headroom


def run(schedule: ProbeSchedule, outcomes: list[tuple[bool | None, float]]) -> list[tuple[int, int]]:
    """The (step, interval) of each probe when the probes' links have these (related, headroom)."""
    step, interval = schedule.first()
    out = [(step, interval)]
    for related, headroom in outcomes:
        step, interval = schedule.after(step, interval, related, headroom)
        out.append((step, interval))
    return out


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
    ({"every_n_steps": -5}, "every_n_steps must be an integer >= 1"),
    ({"every_n_steps": 2.5}, "every_n_steps must be an integer >= 1"),
    ({"every_n_steps": True}, "every_n_steps must be an integer >= 1"),
    ({"every_n_steps": "100"}, "every_n_steps must be an integer >= 1"),
    ({"first_interval": 0}, "first_interval must be an integer >= 1"),
    ({"first_interval": 1.0}, "first_interval must be an integer >= 1"),
    ({"min_interval": 0}, "min_interval must be an integer >= 1"),
    ({"min_interval": False}, "min_interval must be an integer >= 1"),
    ({"every_n_steps": 10, "min_interval": 11}, "min_interval=11 must be <= every_n_steps=10"),
    ({"adapt_headroom": 0.5}, "adapt_headroom must be a finite number >= 1"),
    ({"adapt_headroom": float("nan")}, "adapt_headroom must be a finite number >= 1"),
    ({"adapt_headroom": float("inf")}, "adapt_headroom must be a finite number >= 1"),
    ({"adapt_headroom": True}, "adapt_headroom must be a finite number >= 1"),
    ({"adapt_headroom": "2"}, "adapt_headroom must be a finite number >= 1"),
    ({"adaptive": 1}, "adaptive must be True or False"),
    ({"ramp_fraction": 0}, "ramp_fraction must be a finite number > 0"),
    ({"ramp_fraction": float("nan")}, "ramp_fraction must be a finite number > 0"),
    ({"adaptive": "yes"}, "adaptive must be True or False"),
])
def test_schedule_validates(kwargs, match):
    with pytest.raises(InputError, match=match):
        ProbeSchedule(**kwargs)


def test_default_schedule_starts_dense_adapts_and_settles_on_every_1000_steps():
    s = ProbeSchedule()
    assert s.first() == (1, 1)  # the first probe one step after the step-0 reference
    got = run(s, [(True, STRONG)] * 45)
    steps = [step for step, _ in got]
    assert steps[:8] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert max(i for _, i in got) == 1000 and [step for step in steps if step >= 4000][:3] == [4000, 5000, 6000]
    # Adaptive: a link at twice its threshold keeps doubling the interval, one just below halves it, and
    # weak links bring it down to a single step.
    assert s.after(100, 4, True, 2.0) == (108, 8)
    assert s.after(100, 4, True, 1.99) == (102, 2)
    assert s.after(102, 2, True, 1.5) == s.after(102, 2, False, 0.0) == (103, 1)
    assert s.after(103, 1, True, 1.5) == (104, 1)  # never below one step
    # A failed link halves the interval even at its full length (confirmed or cleared soon).
    assert s.after(5000, 1000, False, 0.0) == (5500, 500)


def test_edge_values_accepted():
    ProbeSchedule(every_n_steps=1, min_interval=1, adapt_headroom=1.0)
    ProbeSchedule(every_n_steps=10, min_interval=10, adapt_headroom=1)


# ------------------------------------------------------------------ geometric start


def test_geometric_start_with_strong_links_reaches_every_n_aligned():
    s = ProbeSchedule(every_n_steps=1000, ramp_fraction=NO_RAMP)
    steps = [step for step, _ in run(s, [(True, STRONG)] * 12)]
    # By hand: the interval doubles 1, 2, 4, ..., 256 (steps 1, 3, 7, ..., 511); the next
    # interval, 512, would overshoot 1000, so the probe falls on 1000; then 1024 >= 1000
    # and every probe is on a multiple of 1000.
    assert steps == [1, 3, 7, 15, 31, 63, 127, 255, 511, 1000, 2000, 3000, 4000]


def test_geometric_start_intervals():
    s = ProbeSchedule(every_n_steps=1000, ramp_fraction=NO_RAMP)
    got = run(s, [(True, STRONG)] * 11)
    assert [i for _, i in got] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000]


def test_first_interval_and_small_every_n():
    assert ProbeSchedule(every_n_steps=1000, first_interval=8).first() == (8, 8)
    assert ProbeSchedule(every_n_steps=10, first_interval=50).first() == (10, 10)
    s = ProbeSchedule(every_n_steps=10, first_interval=3, ramp_fraction=NO_RAMP)
    # 3, then 3 + 6 = 9, then 12 >= 10: aligned 10, 20, 30.
    assert [step for step, _ in run(s, [(True, STRONG)] * 4)] == [3, 9, 10, 20, 30]


def test_headroom_equal_to_adapt_headroom_counts_as_strong():
    s = ProbeSchedule(every_n_steps=1000, ramp_fraction=NO_RAMP)
    assert s.after(7, 4, True, DEFAULT_ADAPT_HEADROOM) == (15, 8)
    assert s.after(7, 4, True, DEFAULT_ADAPT_HEADROOM - 1e-9) == (9, 2)


# ------------------------------------------------------------------ adaptation


def test_weak_link_halves_the_interval_not_below_min_interval():
    s = ProbeSchedule(every_n_steps=1000, min_interval=100)
    assert s.after(2000, 1000, True, WEAK) == (2500, 500)
    got = [(2000, 1000)]
    for _ in range(5):
        got.append(s.after(*got[-1], True, WEAK))
    assert got == [(2000, 1000), (2500, 500), (2750, 250), (2875, 125), (2975, 100), (3000, 100)]
    # The last one would be 3075: the schedule stops on the multiple of every_n_steps instead.
    assert s.after(3000, 100, True, WEAK) == (3100, 100)


def test_weak_link_at_interval_one_stays_one():
    s = ProbeSchedule(every_n_steps=1000)
    assert s.after(3, 2, True, WEAK) == (4, 1)
    assert s.after(4, 1, True, WEAK) == (5, 1)


def test_failed_link_halves_the_interval_whatever_the_headroom():
    s = ProbeSchedule(every_n_steps=1000, min_interval=1)
    assert s.after(2000, 1000, False, STRONG) == (2500, 500)
    assert s.after(2500, 500, False, 0.0) == (2750, 250)
    assert s.after(10, 1, False, 0.0) == (11, 1)
    s = ProbeSchedule(every_n_steps=1000, min_interval=400)
    assert s.after(2500, 500, False, 0.0) == (2900, 400)


def test_undetermined_keeps_the_interval():
    s = ProbeSchedule(every_n_steps=1000)
    assert s.after(15, 8, None, 0.0) == (23, 8)
    assert s.after(15, 8, None, STRONG) == (23, 8)
    assert s.after(2000, 1000, None, 0.0) == (3000, 1000)
    assert s.after(2500, 500, None, 0.0) == (3000, 500)


def test_recovery_after_weak_links_realigns():
    s = ProbeSchedule(every_n_steps=1000, ramp_fraction=NO_RAMP)
    got = [(2000, 1000)]
    for related, headroom in [(True, WEAK), (True, WEAK), (True, STRONG), (True, STRONG), (True, STRONG)]:
        got.append(s.after(*got[-1], related, headroom))
    # 2000 -(weak)-> 2500 (500) -(weak)-> 2750 (250) -(strong)-> 3000 (500, not 3250)
    # -(strong)-> 4000 (1000) -(strong)-> 5000
    assert [step for step, _ in got] == [2000, 2500, 2750, 3000, 4000, 5000]


def test_no_probe_steps_over_a_multiple_of_every_n():
    s = ProbeSchedule(every_n_steps=100)
    outcomes = [(True, STRONG), (True, WEAK), (False, 0.0), (None, 0.0), (True, STRONG), (True, STRONG)] * 10
    steps = [step for step, _ in run(s, outcomes)]
    assert steps == sorted(set(steps))
    for m in range(100, steps[-1] + 1, 100):
        assert m in steps


# ------------------------------------------------------------------ non-adaptive and resume


@pytest.mark.parametrize("related, headroom", [(True, STRONG), (True, WEAK), (False, 0.0), (None, 0.0)])
def test_non_adaptive_always_next_multiple(related, headroom):
    s = ProbeSchedule(every_n_steps=1000, adaptive=False)
    assert s.first() == (1000, 1000)
    assert s.after(1000, 1000, related, headroom) == (2000, 1000)
    assert s.after(1234, 1000, related, headroom) == (2000, 1000)
    assert s.after(0, 1000, related, headroom) == (1000, 1000)
    assert s.after(1999, 7, related, headroom) == (2000, 1000)


@pytest.mark.parametrize("adaptive", [True, False])
def test_resume_at_an_arbitrary_step_aligns_to_the_next_multiple(adaptive):
    s = ProbeSchedule(every_n_steps=1000, adaptive=adaptive, ramp_fraction=NO_RAMP)
    # A resumed run's first probe is at the checkpoint's step, whatever it is; with the full
    # interval the next probe is the next multiple of every_n_steps.
    assert s.after(1234, 1000, True, STRONG) == (2000, 1000)
    assert s.after(5001, 1000, True, STRONG) == (6000, 1000)
    assert s.after(5999, 1000, None, 0.0) == (6000, 1000)
    # Mid-ramp at an arbitrary step: the doubled interval still stops at the next multiple.
    if adaptive:
        assert s.after(1234, 512, True, STRONG) == (2000, 1000)
        assert s.after(1900, 256, True, STRONG) == (2000, 512)


def test_schedule_is_a_pure_function():
    s = ProbeSchedule(every_n_steps=50)
    assert s.after(7, 4, True, STRONG) == s.after(7, 4, True, STRONG)
    with pytest.raises(Exception):
        s.every_n_steps = 10  # frozen


def test_ramp_keeps_early_intervals_within_a_quarter_of_the_step():
    s = ProbeSchedule(every_n_steps=1000)
    got = run(s, [(True, STRONG)] * 45)
    steps = [step for step, _ in got]
    # By hand: interval <= step // 4 (at least 1) while it doubles: 1..8 one step apart, then
    # 10, 12, 15, ... each about 1.25x the last; 1000 is never stepped over; the full interval of
    # 1000 is reached only from step 4000 (4 x every_n_steps) on.
    assert steps[:16] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 18, 22, 27, 33, 41]
    assert 1000 in steps and 2000 in steps and 4000 in steps
    for (a, _), (b, _) in zip(got, got[1:]):
        assert b - a <= max(1, a // 4) or b % 1000 == 0
    assert [step for step in steps if step >= 4000][:3] == [4000, 5000, 6000]
