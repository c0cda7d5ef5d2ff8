"""What the faces tell the user about a probe: the chain's decisions and notes, in words, with the fix.

The core (:class:`~seedprints_lightning.core.chain.CustodyChain`) decides and gives the figures;
the wording, which names the faces' arguments (``count_undetermined``, ``fail_on``, ``probe``), is here.
"""

from __future__ import annotations

from ..core.chain import ChainNote, CustodyChain
from ..core.probes import ProbeSpec
from ..core.verdict import ProbeVerdict

__all__ = ["identity_lost_message", "note_message", "probe_spec_message", "unrecorded_save_message"]


def probe_spec_message(face: str, asked: ProbeSpec | None, used: ProbeSpec, origin: str) -> str:
    """The one warning of a resume whose face asks for another probe spec than its restored chain's (which wins)."""
    shown = f"probe={asked!r}" if asked is not None else f"probe=None (the default {ProbeSpec()!r})"
    return (
        f"SeedPrints: {face} was constructed with {shown} ({(asked or ProbeSpec()).describe()}), but the chain "
        f"restored from {origin} was fingerprinted with {used!r} ({used.describe()}). The chain's spec is used: the "
        "run's step-0 reference and every probe in its ledger were taken with it, and probes on other inputs could "
        f"not be linked to them. To silence this warning, construct {face} with probe={used!r}; to probe with the "
        "new spec, start a new run in a new save_dir from step 0 (a spec cannot change within a run)"
    )


def unrecorded_save_message(step: int, where: object, error: BaseException) -> str:
    """The warning of a checkpoint save whose ledger record could not be written (the save itself goes on)."""
    return (
        f"SeedPrints: the save record of the checkpoint at step {step} could not be written to the custody ledger in "
        f"{where} ({type(error).__name__}: {error}). The checkpoint is saved all the same (a SeedPrints face never "
        "stops your save), and its SeedPrints state lists this save under 'unrecorded_saves', but `seedprints audit "
        "--chain` cannot name it as a recorded save. Make the run directory writable (or free space) for the next "
        "saves and probes"
    )


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
