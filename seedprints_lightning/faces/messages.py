"""What the faces tell the user about a probe: the chain's decisions and notes, in words, with the fix.

The core (:class:`~seedprints_lightning.core.chain.CustodyChain`) decides and gives the figures;
the wording, which names the faces' arguments (``count_undetermined``, ``fail_on``, ``probe``), is here.
"""

from __future__ import annotations

from ..core.chain import ChainNote, CustodyChain
from ..core.verdict import ProbeVerdict

__all__ = ["identity_lost_message", "note_message"]


def note_message(note: ChainNote) -> str:
    """A one-time warning for ``note``: what the probe found, why it is not identity loss, what to do."""
    verdict = note.verdict
    if note.kind == "undetermined":
        counted = (f"it counts as a failed probe towards patience ({note.consecutive_failures} of {note.patience}; "
                   "count_undetermined=False would only report it)" if note.counted
                   else "it counts neither as a failure nor as a success (count_undetermined=False)")
        return (f"SeedPrints: the lineage probe at step {verdict.step} is undetermined ({verdict.reason}): the "
                f"model's lineage could not be measured, so nothing vouches for it; {counted}. Further undetermined "
                "probes are not reported")
    return (
        f"SeedPrints: the birth test is no longer detectable at step {verdict.step} (z={verdict.birth.z:.2f}, "
        f"threshold {verdict.birth.threshold:.2f}): training has moved the weights far from their init, as it does "
        "at ordinary learning rates. This is NOT identity loss: the custody chain holds (link z="
        f"{verdict.link.z:.2f} from step {verdict.anchor_step}). To keep the birth test itself detectable, probe "
        "with more samples (ProbeSpec(num_samples=4000 or more): z grows like sqrt(n)) or the other probe kind; "
        "pass fail_on='birth' or 'either' if your audit needs it to hold.")


def identity_lost_message(chain: CustodyChain, verdict: ProbeVerdict) -> str:
    """Why the run's identity is lost at ``verdict``: its figures and what to check."""
    link, birth = verdict.link, verdict.birth
    controls = ", ".join(f"{z:.2f}" for z in birth.control_z) or "none"
    reason = f" {verdict.reason.rstrip('.')}." if verdict.reason else ""
    ref, failures = chain.reference, chain.failures
    origin = f"reference: {chain.reference_source}, step {None if ref is None else ref.step}"
    if verdict.related is None:
        return (
            f"SeedPrints: the run's lineage could not be measured at step {verdict.step} "
            f"({failures.consecutive} consecutive failed or undetermined probes, patience {failures.patience}):"
            f"{reason} Nothing vouches for these weights ({origin}): check for a diverged run (NaN or constant "
            "hidden states) or a swapped-in model. Pass count_undetermined=False to only report undetermined probes."
        )
    return (
        f"SeedPrints: the run lost its lineage identity at step {verdict.step} ({failures.consecutive} "
        f"consecutive failed probes, patience {failures.patience}, fail_on={chain.rules.fail_on!r}): custody link "
        f"from step {verdict.anchor_step} z={link.z:.2f} (threshold {link.threshold:.2f}), birth z={birth.z:.2f} "
        f"(threshold {birth.threshold:.2f}), controls z [{controls}].{reason} The weights do not descend from the "
        f"run's last good probe ({origin}): check for a swapped or wrongly loaded checkpoint."
    )
