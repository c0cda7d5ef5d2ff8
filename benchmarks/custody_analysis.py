"""The ``analyse`` half of ``benchmarks/custody.py``: replay the callback's verdict on stored features.

Every figure comes from :func:`seedprints_lightning.core.verdict.judge_probe` and
:class:`seedprints_lightning.core.schedule.ProbeSchedule` at the package defaults, on the features
``custody.py collect`` stored (fp16, as the callback's ledger keeps them).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from seedprints_lightning.core.schedule import DEFAULT_ADAPT_HEADROOM, ProbeSchedule
from seedprints_lightning.core.stats import lineage_test
from seedprints_lightning.core.verdict import BIRTH_RULE, CUSTODY_RULE, VerdictRule, decide_identity

#: (tau margin, adapt headroom) pairs replayed besides the defaults, to show how the choice was made.
VARIANTS = ((0.03, 2.0), (0.04, 2.0), (0.04, 2.5), (0.05, 2.5), (0.1, 2.0))

PATIENCE = 2
SWAP_STEPS = (100, 1000, 1900)
LINK_SPANS = (50, 100, 200, 500, 1000)
BIRTH_NS = (1000, 2000, 5000, 10000)


def _load(path: Path) -> dict:
    data = torch.load(path, weights_only=False)
    for run in data["runs"].values():
        for entry in run.values():
            for key, value in list(entry.items()):
                if isinstance(value, torch.Tensor):
                    entry[key] = value.float()
    data["controls"] = {k: v.float() for k, v in data["controls"].items()}
    return data


@dataclass
class Replay:
    """One replayed chain: which probes were made, which links failed, when the callback acted."""

    probes: list[int]
    failed: list[int]
    acted_at: int | None
    min_headroom: float
    kept_after_swap: list[int]


def replay(features: dict[int, torch.Tensor], steps: list[int], controls: torch.Tensor, *, every_n: int,
           swap_at: int | None = None, swapped: dict[int, torch.Tensor] | None = None,
           adaptive: bool = True, last: int = 2000, rule=CUSTODY_RULE,
           adapt_headroom: float = DEFAULT_ADAPT_HEADROOM) -> Replay:
    """The callback's probe loop on the stored grid: the schedule's next step is rounded up to a stored step.

    From ``swap_at`` on, the live model is ``swapped`` (another seed's run at the same steps).
    """
    schedule = ProbeSchedule(every_n_steps=every_n, adaptive=adaptive, adapt_headroom=adapt_headroom)
    reference = features[0]
    anchor = reference
    nxt, interval = schedule.first()
    probes, failed, kept_after = [], [], []
    failures, acted, min_headroom = 0, None, math.inf
    grid = sorted(steps)
    if swap_at is not None and swap_at not in grid:
        raise ValueError(f"swap step {swap_at} is not on the stored grid")
    # A wrong resume probes at the resume step itself (train start); a swap is seen at the next probe.
    forced = {swap_at} if swap_at is not None else set()
    step = 0
    while True:
        candidates = [s for s in grid if s >= nxt and s > step]
        forced_now = [s for s in forced if step < s < (candidates[0] if candidates else math.inf)]
        if forced_now:
            step = forced_now[0]
        elif candidates:
            step = candidates[0]
        else:
            break
        if step > last:
            break
        is_swapped = swap_at is not None and step >= swap_at
        live = (swapped if is_swapped else features)[step]
        # judge_probe's link verdict, with the control tests cached across replays.
        key = (id(anchor), id(live))
        if key not in _LINK_CACHE:
            _LINK_CACHE[key] = lineage_test(anchor, live, identity_mode="coset")
        link = decide_identity(_LINK_CACHE[key], _control_results(live, controls), rule)
        probes.append(step)
        if not is_swapped:
            min_headroom = min(min_headroom, link.headroom)
        if link.related is False:
            failed.append(step)
            failures += 1
            if failures >= PATIENCE and acted is None:
                acted = step
        elif link.related:
            failures = 0
            anchor = live
            if is_swapped:
                kept_after.append(step)
        nxt, interval = schedule.after(step, interval, link.related, link.headroom)
        if acted is not None:
            break
    return Replay(probes, failed, acted, min_headroom, kept_after)


_CONTROL_CACHE: dict[int, list] = {}
_LINK_CACHE: dict[tuple[int, int], object] = {}


def _control_results(live: torch.Tensor, controls: torch.Tensor, cache: bool = True) -> list:
    """``lineage_test(control, live)`` per control, cached by the live tensor (each is tested against many
    bases). Only for tensors that stay alive (the stored features): ``id`` of a freed temporary is reused."""
    if not cache:
        return [lineage_test(c, live) for c in controls]
    key = id(live)
    if key not in _CONTROL_CACHE:
        _CONTROL_CACHE[key] = ([lineage_test(c, live) for c in controls], live)
    return _CONTROL_CACHE[key][0]


def _z_tau(base: torch.Tensor, live: torch.Tensor, controls: torch.Tensor, rule,
           cache: bool = True) -> tuple[float, float, float]:
    result = lineage_test(base, live, alpha=rule.alpha)
    verdict = decide_identity(result, _control_results(live, controls, cache), rule)
    return verdict.z, verdict.threshold, result.tau_mean - verdict.control_tau_max


def analyse_job(data: dict) -> dict:
    runs, controls = data["runs"], data["controls"]["token"]
    seeds = sorted(runs)
    steps = sorted(s for s in runs[seeds[0]] if isinstance(s, int))
    feats = {seed: {s: runs[seed][s]["token"] for s in steps} for seed in seeds}
    out: dict = {"loss": {seed: runs[seed][steps[-1]]["loss"] for seed in seeds}}
    # 1. own links by span (from step >= 50), and the geometric start
    spans = {}
    for span in LINK_SPANS:
        rows = []
        for s in steps:
            if s >= 50 and s + span in feats[seeds[0]]:
                for seed in seeds:
                    rows.append(_z_tau(feats[seed][s], feats[seed][s + span], controls, CUSTODY_RULE))
        if rows:
            spans[span] = (min(r[0] / r[1] for r in rows), min(r[0] for r in rows), min(r[2] for r in rows))
    out["spans"] = spans
    start = [s for s in steps if s <= 50]
    early = []
    for a, b in zip(start, start[1:]):
        for seed in seeds:
            early.append(_z_tau(feats[seed][a], feats[seed][b], controls, CUSTODY_RULE))
    out["early_min_headroom"] = min(r[0] / r[1] for r in early)
    # 2. peers: the other seed at step t against our probe at step a <= t (any anchor)
    worst_tau, worst_z = -math.inf, -math.inf
    coarse = [s for s in steps if s <= 50 or s % 100 == 0]
    for a in coarse:
        for t in coarse:
            if t < a or t - a > 1000:
                continue
            for seed in seeds:
                other = [s for s in seeds if s != seed][0]
                z, _, dtau = _z_tau(feats[seed][a], feats[other][t], controls, CUSTODY_RULE)
                worst_tau, worst_z = max(worst_tau, dtau), max(worst_z, z)
    out["peer_worst_dtau"], out["peer_worst_z"] = worst_tau, worst_z
    # 3. replays of the callback at every_n_steps = 1000: the defaults, a few (margin, headroom)
    #    variants, and the fixed interval without the adaptive schedule
    replays = {}
    settings = [("default", CUSTODY_RULE, DEFAULT_ADAPT_HEADROOM, True)]
    settings += [(f"tau {m:g}, headroom {h:g}", VerdictRule(z_margin=CUSTODY_RULE.z_margin, tau_margin=m), h, True)
                 for m, h in VARIANTS]
    settings.append(("default rule, fixed interval", CUSTODY_RULE, DEFAULT_ADAPT_HEADROOM, False))
    for name, rule, headroom, adaptive in settings:
        kw = dict(every_n=1000, adaptive=adaptive, rule=rule, adapt_headroom=headroom)
        healthy = [replay(feats[seed], steps, controls, **kw) for seed in seeds]
        swaps = []
        for swap_at in SWAP_STEPS:
            for seed in seeds:
                other = [s for s in seeds if s != seed][0]
                swapped = replay(feats[seed], steps, controls, swap_at=swap_at, swapped=feats[other], **kw)
                swaps.append((swap_at, swapped))
        replays[name] = (healthy, swaps)
    out["replays"] = replays
    # 4. birth test along the run (seed 42)
    out["birth"] = {s: _z_tau(feats[seeds[0]][0], feats[seeds[0]][s], controls, BIRTH_RULE)[:2]
                    for s in steps if s in (50, 100, 500, 1000, 2000)}
    return out


def analyse_birth(data: dict) -> dict:
    """Birth detectability against n and probe kind (rows subsets of the n = 10000 probes)."""
    run = data["runs"][sorted(data["runs"])[0]]
    table = {}
    for kind in ("token", "embedding"):
        controls = data["controls"][kind]
        for n in BIRTH_NS:
            for step in sorted(s for s in run if s > 0):
                base, live = run[0][kind][:n], run[step][kind][:n]
                z, threshold, _ = _z_tau(base, live, controls[:, :n], BIRTH_RULE, cache=False)
                cz = max(lineage_test(c[:n], live).z for c in controls)
                table[(kind, n, step)] = (z, threshold, cz)
    return table


def analyse(cache: Path) -> str:
    torch.set_num_threads(1)
    lines: list[str] = []
    add = lines.append
    jobs = sorted(p for p in Path(cache).glob("*.pt") if p.stem != "birth" and not p.stem.startswith("dense-"))
    results = {}
    for path in jobs:
        print(f"[analyse] {path.stem}", file=sys.stderr, flush=True)
        results[path.stem] = analyse_job(_load(path))
    add("### Custody links by span (own run, links starting at step >= 50, both seeds)")
    add("")
    add("Smallest link z / threshold (headroom), smallest link z, smallest link tau above the controls' largest tau.")
    add("")
    add("| job | " + " | ".join(f"span {s}" for s in LINK_SPANS) + " | geometric start 0..50: min headroom |")
    add("|---|" + "---|" * (len(LINK_SPANS) + 1))
    for job, r in results.items():
        cells = [f"{r['spans'][s][0]:.1f} / {r['spans'][s][1]:.0f} / {r['spans'][s][2]:.3f}" if s in r["spans"] else "-"
                 for s in LINK_SPANS]
        add(f"| {job} | " + " | ".join(cells) + f" | {r['early_min_headroom']:.1f} |")
    add("")
    add("### Peers: the other seed (same data, same order) against any of our probes up to 1000 steps earlier")
    add("")
    add("| job | worst tau above the controls' largest tau | worst z | final loss (seed 42 / 123) |")
    add("|---|---|---|---|")
    for job, r in results.items():
        loss = " / ".join(f"{v:.2f}" for v in r["loss"].values())
        add(f"| {job} | {r['peer_worst_dtau']:.4f} | {r['peer_worst_z']:.1f} | {loss} |")
    add("")
    add(f"### Replayed callback (every_n_steps 1000, patience {PATIENCE}): healthy runs and swaps at steps "
        f"{SWAP_STEPS}")
    add("")
    add("Probes fall on the stored grid (0, 1, 2, 4, 8, 16, 32, then every 50 steps): a scheduled step is rounded up "
        "to the next stored one, so replayed links span at least as many steps as the callback's would.")
    add("")
    add("| job | setting | healthy: probes, false failures, min headroom | swaps caught within patience "
        "| swap called kept | probes from swap to action |")
    add("|---|---|---|---|---|---|")
    for job, r in results.items():
        for setting, (healthy, swaps) in r["replays"].items():
            false = sum(len(h.failed) for h in healthy)
            probes = "/".join(str(len(h.probes)) for h in healthy)
            head = min(h.min_headroom for h in healthy)
            caught = sum(1 for _, sw in swaps if sw.acted_at is not None)
            kept = sum(len(sw.kept_after_swap) for _, sw in swaps)
            delays = [sum(1 for p in sw.probes if p >= at) for at, sw in swaps if sw.acted_at is not None]
            add(f"| {job} | {setting} | {probes}, {false}, {head:.1f} | "
                f"{caught}/{len(swaps)} | {kept} | {max(delays) if delays else '-'} |")
    add("")
    add("### Birth test along the run (seed 42, n = 1000): z / threshold")
    add("")
    add("| job | " + " | ".join(f"step {s}" for s in (50, 100, 500, 1000, 2000)) + " |")
    add("|---|" + "---|" * 5)
    for job, r in results.items():
        add(f"| {job} | " + " | ".join(f"{z:.1f} / {t:.1f}" for z, t in r["birth"].values()) + " |")
    add("")
    lines.extend(dense_markdown(cache))
    birth_path = Path(cache) / "birth.pt"
    if birth_path.exists():
        table = analyse_birth(_load(birth_path))
        steps = sorted({k[2] for k in table})
        add("")
        add("### Birth detectability against n and probe kind (LLaMA width 128, lr 3e-3): z / threshold (max "
            "control z)")
        add("")
        add("| probe, n | " + " | ".join(f"step {s}" for s in steps) + " |")
        add("|---|" + "---|" * len(steps))
        for kind in ("token", "embedding"):
            for n in BIRTH_NS:
                cells = []
                for s in steps:
                    z, t, cz = table[(kind, n, s)]
                    cells.append(f"{'**' if z > t else ''}{z:.1f}{'**' if z > t else ''} / {t:.1f} ({cz:.1f})")
                add(f"| {kind}, {n} | " + " | ".join(cells) + " |")
        add("")
        add("Bold: birth test detectable (z above its threshold).")
    return "\n".join(lines) + "\n"


DENSE_SPANS = (1, 2, 4, 8, 16)


def analyse_dense(data: dict) -> dict:
    """Links of short spans over the first 100 steps, and the replayed schedule on that stretch."""
    controls = data["controls"]["token"]
    out = {}
    for seed, run in data["runs"].items():
        feats = {s: run[s]["token"] for s in run if isinstance(s, int)}
        steps = sorted(feats)
        worst = {}
        for span in DENSE_SPANS:
            rows = [(s, *_z_tau(feats[s], feats[s + span], controls, CUSTODY_RULE)) for s in steps if s + span in feats]
            s, z, t, _ = min(rows, key=lambda r: r[1] / r[2])
            worst[span] = (z / t, s, z)
        replayed = replay(feats, steps, controls, every_n=1000, last=steps[-1])
        out[seed] = (worst, replayed)
    return out


def dense_markdown(cache: Path) -> list[str]:
    lines = ["### The first 100 steps, probed at every step: the weakest link of each span",
             "",
             "Smallest link z / threshold over all links of that span starting in steps 0..100 (at step s), and the "
             "replayed adaptive schedule on this stretch (every probe step available).",
             "",
             "| job, seed | " + " | ".join(f"span {s}" for s in DENSE_SPANS) + " | replay: probes, failed links |",
             "|---|" + "---|" * (len(DENSE_SPANS) + 1)]
    for path in sorted(Path(cache).glob("dense-*.pt")):
        for seed, (worst, rep) in analyse_dense(_load(path)).items():
            cells = [f"{h:.1f} (s={s}, z={z:.0f})" for h, s, z in (worst[span] for span in DENSE_SPANS)]
            lines.append(f"| {path.stem.removeprefix('dense-')}, {seed} | " + " | ".join(cells)
                         + f" | {len(rep.probes)}, {rep.failed or 'none'} |")
    return lines
