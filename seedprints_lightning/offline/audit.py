"""After-the-fact lineage checks of saved models: pairwise comparison and audits of a run's checkpoints.

The library layer under ``seedprints compare`` and ``seedprints audit`` (:mod:`.cli`), usable on
its own. Paths are resolved to fingerprints by :mod:`.sources`; here they are judged, with the
callback's verdict (:func:`~seedprints_lightning.core.verdict.judge`) against fresh-init controls:

* :func:`compare_sources` tests one source against another (``A`` is the base, ``B`` the target);
* :func:`audit_checkpoints` tests every checkpoint of a run against one reference fingerprint and
  returns one typed :class:`AuditRow` each: the paper's birth-to-lifecycle trajectory, computed
  after training instead of by the callback during it.

The re-verification of a run's custody ledger (``seedprints audit --chain``) is
:func:`seedprints_lightning.core.verify.verify_chain`: it replays the records through the chain itself.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..core.controls import (
    INIT_STREAMED,
    ControlSet,
    built_init_scheme,
    control_seeds,
    probe_controls,
    probe_streamed_controls,
)
from ..core.errors import FingerprintFileError, IncompatibleFingerprintsError, InputError
from ..core.families import family_of, family_of_checkpoint
from ..core.fingerprint import Fingerprint
from ..core.ledger import CONTROLS_FILE
from ..core.probes import ProbeSpec
from ..core.state import model_weights_prefix
from ..core.stats import LineageResult, check_test_options
from ..core.verdict import BIRTH_RULE, CUSTODY_RULE, IdentityVerdict, VerdictRule, judge
from ..core.weights import weights_digest
from .sources import (
    ProbeRuntime,
    Source,
    SourceKind,
    check_fits,
    classify_source,
    expand_checkpoints,
    fingerprint_source,
    load_model,
    open_model,
    read_checkpoint,
    seedprints_state,
    source_step,
    spec_for_models,
    weights_of,
)

__all__ = [
    "checkpoint_weights_digest",
    "AuditRow",
    "Comparison",
    "audit_checkpoints",
    "compare_sources",
    "find_controls",
    "measurement_line",
    "measurement_of",
    "rule_for_base",
    "rule_name_for_base",
    "verdict_word",
]


# --------------------------------------------------------------------------------------
# Evidence and rule
# --------------------------------------------------------------------------------------


def _sibling_controls(path: Path, spec: ProbeSpec) -> ControlSet | None:
    """The callback's ``controls.safetensors`` beside a reference file, if it was made on ``spec``."""
    sibling = path.parent / CONTROLS_FILE
    if not sibling.is_file():
        return None
    try:
        controls = ControlSet.load(sibling)
    except FingerprintFileError:
        return None
    return controls if controls.spec == spec else None


def find_controls(
    spec: ProbeSpec,
    fingerprints: Sequence[tuple[Source, Fingerprint]] = (),
    models: Sequence[tuple[Source, torch.nn.Module]] = (),
    *,
    num_controls: int = 4,
    runtime: ProbeRuntime = ProbeRuntime(),
) -> ControlSet:
    """The fresh-init controls an offline verdict is judged against, from the best source at hand.

    In order: controls stored in a fingerprint file (made on the same spec); fresh inits built
    from a model's config (the callback's control seeds); the callback's ``controls.safetensors``
    beside a fingerprint file. ``num_controls=0`` asks for none. Without controls the verdict
    rests on the analytic threshold and the effect-size margin alone, and says so.
    """
    if num_controls == 0:
        return ControlSet.none("no controls (--controls 0): analytic threshold and effect-size margin only")
    for source, fp in fingerprints:
        if fp.controls is not None and fp.controls.shape[0] > 0:
            count = min(num_controls, fp.controls.shape[0])
            return ControlSet(fp.controls[:count], fp.control_seeds[:count], fp.spec, fp.config_digest,
                              fp.model_class, f"{count} fresh-init controls stored in {source.path}",
                              init_scheme=fp.controls_init_scheme)
    for source, model in models:
        seeds = control_seeds(num_controls)
        features = probe_controls(model, spec, seeds, batch_size=runtime.batch_size, device=runtime.device)
        return ControlSet(features, seeds, spec, description=f"{len(seeds)} fresh inits of {source.path}'s config "
                                                             f"(seeds {seeds[0]}..{seeds[-1]})",
                          init_scheme=built_init_scheme(model))
    for source, _ in fingerprints:
        found = _sibling_controls(source.path, spec)
        if found is not None:
            count = min(num_controls, len(found))
            return found.head(count, f"{count} fresh-init controls from {source.path.parent / 'controls.safetensors'}")
    return ControlSet.none("no controls available (fingerprints without stored controls; re-create them with "
                           "`seedprints fingerprint --controls 4`): analytic threshold and effect-size margin only")


def rule_name_for_base(base_step: int | None, rule: str = "auto") -> str:
    """``"birth"`` or ``"custody"``: the callback's rule for a base fingerprint taken at ``base_step``.

    A base that is an init (step 0) is judged like the callback's birth test (fresh-init controls
    measure exactly the unrelated relation); a trained base like a custody link (with the
    effect-size margin: models trained on the same data share a small response the controls
    cannot see). A base of unknown step gets the stricter custody rule. ``rule`` forces one.
    """
    if rule not in ("auto", "birth", "custody"):
        raise InputError(f"rule must be 'auto', 'birth' or 'custody', got {rule!r}")
    if rule == "auto":
        return "birth" if base_step == 0 else "custody"
    return rule


def rule_for_base(base_step: int | None, rule: str = "auto", alpha: float = 0.01) -> VerdictRule:
    """The :class:`VerdictRule` named by :func:`rule_name_for_base`, at significance level ``alpha``."""
    base = BIRTH_RULE if rule_name_for_base(base_step, rule) == "birth" else CUSTODY_RULE
    return VerdictRule(alpha=alpha, z_margin=base.z_margin, tau_margin=base.tau_margin)


def verdict_word(related: bool | None) -> str:
    return "undetermined" if related is None else ("related" if related else "not shown related")


def _check_same_width(fa: Fingerprint, fb: Fingerprint, names: tuple[str, str]) -> None:
    if fa.hidden_size != fb.hidden_size:
        raise IncompatibleFingerprintsError(
            f"{names[0]} has {fa.hidden_size} feature dimensions and {names[1]} has {fb.hidden_size}: the lineage "
            "test compares coordinate j of one model with coordinate j of the other, so it needs equal hidden sizes"
        )


# --------------------------------------------------------------------------------------
# Pairwise comparison
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare_sources`: both inputs, the shared probe, the verdict and its evidence."""

    a: Source
    b: Source
    spec: ProbeSpec
    verdict: IdentityVerdict
    evidence: ControlSet
    rule_name: str
    #: How each side was read: ``{"path": "whole" | "streamed", "reason": ..., ...}`` (:mod:`.streaming`),
    #: or ``None`` for a fingerprint file.
    load_a: dict[str, Any] | None = None
    load_b: dict[str, Any] | None = None
    #: How each side was measured (:class:`~seedprints_lightning.core.families.MeasurementPlan` as a dict:
    #: ``how``, ``family``, ``reason``, ``controls``), or ``None`` for a fingerprint file.
    measurement_a: dict[str, str] | None = None
    measurement_b: dict[str, str] | None = None

    @property
    def result(self) -> LineageResult:
        return self.verdict.result

    @property
    def related(self) -> bool | None:
        return self.verdict.related

    def to_dict(self) -> dict[str, Any]:
        """``LineageResult.to_dict()`` at the top level, plus the verdict, the inputs and the probe."""
        out = self.result.to_dict()
        out.update(self.verdict.to_dict())
        out["verdict"] = verdict_word(self.related)
        out["rule_name"] = self.rule_name
        out["evidence"] = self.evidence.description
        out["a"] = self.a.to_dict()
        out["b"] = self.b.to_dict()
        out["spec"] = self.spec.to_dict()
        out["load"] = {"a": self.load_a, "b": self.load_b}
        out["measurement"] = {"a": self.measurement_a, "b": self.measurement_b}
        return out


def _resolve_pair(sa: Source, sb: Source, probe_options: dict[str, Any], runtime: ProbeRuntime, num_controls: int,
                  names: tuple[str, str]) -> tuple[Fingerprint, Fingerprint, ControlSet]:
    """Both sources as fingerprints on one probe, and the controls to judge them against."""
    given = [key for key, value in probe_options.items() if value is not None]
    if sa.kind == "fingerprint" or sb.kind == "fingerprint":
        loaded = {s.path: Fingerprint.load(s.path) for s in (sa, sb) if s.kind == "fingerprint"}  # file errors first
        if given:
            raise InputError(f"probe options ({', '.join(given)}) cannot be used when A or B is a fingerprint file: "
                             "its probe spec is used")
        if sa.kind == "fingerprint":
            fa = loaded[sa.path]
            fb = loaded[sb.path] if sb.kind == "fingerprint" else fingerprint_source(sb, fa.spec, runtime=runtime)
        else:
            fb = loaded[sb.path]
            fa = fingerprint_source(sa, fb.spec, runtime=runtime)
        fa.check_comparable(fb)
        fingerprints = [(s, loaded[s.path]) for s in (sa, sb) if s.kind == "fingerprint"]
        evidence = find_controls(fa.spec, fingerprints, [], num_controls=num_controls, runtime=runtime)
        model_source = next((s for s in (sa, sb) if s.kind != "fingerprint"), None)
        if evidence.features is None and num_controls and model_source is not None:
            evidence = _config_controls(model_source, fa.spec, num_controls, runtime)
        return fa, fb, evidence
    # Two models: never both in memory. Their configs (meta-device models, no weights) fix the probe; A is
    # probed (with its controls) and freed, then B; each whole or one block at a time (runtime.load).
    handle_a, handle_b = open_model(sa, runtime), open_model(sb, runtime)
    kind = probe_options["kind"] or "token"
    stats = handle_a.embedding_stats() if kind == "embedding" else None
    spec = spec_for_models(handle_a.meta, handle_b.meta, kind=kind, names=names, embed_stats=stats,
                           **{k: probe_options[k] for k in ("num_samples", "length", "seed", "vocab_size")})
    check_fits(handle_b.meta, spec, names[1])
    fa = handle_a.fingerprint(spec, step=source_step(sa, trust_pickle=runtime.trust_pickle), num_controls=num_controls)
    fb = handle_b.fingerprint(spec, step=source_step(sb, trust_pickle=runtime.trust_pickle))
    if num_controls and fa.controls is not None:
        seeds = fa.control_seeds
        evidence = ControlSet(fa.controls, seeds, spec, description=f"{len(seeds)} fresh inits of {sa.path}'s config "
                                                                    f"(seeds {seeds[0]}..{seeds[-1]})",
                              init_scheme=fa.controls_init_scheme)
    else:
        evidence = find_controls(spec, [], [], num_controls=num_controls, runtime=runtime)
    return fa, fb, evidence


def _config_controls(source: Source, spec: ProbeSpec, num_controls: int, runtime: ProbeRuntime) -> ControlSet:
    """Fresh inits of a model source's config on ``spec`` (streamed where the family streams, else from its model)."""
    handle = open_model(source, runtime)
    if callable(getattr(handle, "controls", None)):  # a family with its own init (OLMo-core, torchtitan)
        return handle.controls(spec, num_controls)
    seeds = control_seeds(num_controls)
    family = family_of(handle.meta)
    if family is None or not family.streams_controls(handle.meta):
        model = load_model(source, dtype=runtime.dtype, trust_pickle=runtime.trust_pickle)
        return find_controls(spec, [], [(source, model)], num_controls=num_controls, runtime=runtime)
    device = runtime.device if runtime.device is not None else "cpu"
    features = probe_streamed_controls(handle.config, seeds, spec, batch_size=runtime.batch_size, device=device,
                                       dtype=runtime.dtype)
    return ControlSet(features, seeds, spec, description=f"{len(seeds)} fresh inits of {source.path}'s config "
                                                         f"(seeds {seeds[0]}..{seeds[-1]})", init_scheme=INIT_STREAMED)


def compare_sources(
    a: str | Path | Source,
    b: str | Path | Source,
    *,
    kind: Literal["token", "embedding"] | None = None,
    num_samples: int | None = None,
    length: int | None = None,
    seed: int | None = None,
    vocab_size: int | None = None,
    runtime: ProbeRuntime = ProbeRuntime(),
    num_controls: int = 4,
    rule: str = "auto",
    alpha: float = 0.01,
    **test_kwargs: Any,
) -> Comparison:
    """Is ``b`` descended from ``a``? Each is a fingerprint file, model directory or checkpoint.

    Judged by the callback's verdict (:func:`~seedprints_lightning.core.verdict.judge`) against
    fresh-init controls found by :func:`find_controls`, with the rule of :func:`rule_for_base`
    (birth rule when ``a`` is an init, custody rule otherwise; ``rule`` forces one).

    * two fingerprints: compared as they are (different probe specs raise
      :class:`IncompatibleFingerprintsError`);
    * a fingerprint and a model: the model is probed with the fingerprint's spec;
    * two models: both are probed with :func:`~seedprints_lightning.offline.sources.spec_for_models`
      (``kind`` etc. choose it, from the configs), never both in memory: A is probed (with its
      controls) and freed, then B; each whole or one block at a time as ``runtime.load`` says
      (:mod:`.streaming`). Each fingerprint's ``extra["load"]`` says which path it took.

    The probe options apply only when both are models; passing one while a fingerprint fixes
    the probe is an :class:`InputError`. ``test_kwargs`` go to :func:`lineage_test`; features a
    test cannot use (a diverged model's NaN) make the verdict undetermined, as in the callback.
    """
    rule_name = rule_name_for_base(None, rule)  # an unknown rule is refused before any model is loaded
    check_test_options(alpha=alpha, **test_kwargs)
    sa, sb = classify_source(a), classify_source(b)
    names = (f"A ({sa.path})", f"B ({sb.path})")
    probe_options = {"kind": kind, "num_samples": num_samples, "length": length, "seed": seed, "vocab_size": vocab_size}
    fa, fb, evidence = _resolve_pair(sa, sb, probe_options, runtime, num_controls, names)
    _check_same_width(fa, fb, names)
    rule_name = rule_name_for_base(fa.step, rule)
    check_test_options(alpha=alpha, dim=fa.hidden_size, **test_kwargs)
    verdict = judge(fa.features, fb.features, evidence.as_list(), rule_for_base(fa.step, rule, alpha), **test_kwargs)
    return Comparison(a=sa, b=sb, spec=fa.spec, verdict=verdict, evidence=evidence, rule_name=rule_name,
                      load_a=_load_of(sa, fa), load_b=_load_of(sb, fb),
                      measurement_a=measurement_of(sa, fa), measurement_b=measurement_of(sb, fb))


def _load_of(source: Source, fp: Fingerprint) -> dict[str, Any] | None:
    """How a source was read (``extra["load"]`` of a fingerprint just probed); ``None`` for a fingerprint file."""
    return None if source.kind == "fingerprint" else fp.extra.get("load")


def measurement_of(source: Source, fp: Fingerprint) -> dict[str, str] | None:
    """How a source was measured (``extra["measurement"]`` of a fingerprint just probed); ``None`` for a file."""
    return None if source.kind == "fingerprint" else fp.extra.get("measurement")


def measurement_line(measurement: Any) -> str:
    """``<how> (<family>): <reason>``, the text output's line for a ``measurement`` dict (``-`` when none)."""
    if not isinstance(measurement, dict):
        return "-"
    return f"{measurement.get('how')} ({measurement.get('family')}): {measurement.get('reason')}"


# --------------------------------------------------------------------------------------
# Audit of a run's checkpoints
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    """One checkpoint's lineage test against the reference."""

    name: str
    kind: SourceKind
    step: int | None
    z: float
    log10_p: float
    tau_mean: float
    k: int
    related: bool | None
    threshold: float
    result: LineageResult = field(repr=False, compare=False)
    verdict: IdentityVerdict | None = field(default=None, repr=False, compare=False)
    load: dict[str, Any] | None = field(default=None, compare=False)  # how the checkpoint was read (None: a file)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "step": self.step, "z": self.z, "log10_p": self.log10_p,
            "tau_mean": self.tau_mean, "k": self.k, "related": self.related, "verdict": verdict_word(self.related),
            "threshold": self.threshold, "control_z": list(self.verdict.control_z) if self.verdict else [],
            "n": self.result.n, "alpha": self.result.alpha,
            "reason": self.verdict.reason if self.verdict else self.result.reason,
            "load": self.load,
        }


def audit_checkpoints(
    reference: Fingerprint,
    checkpoints: Sequence[str | Path | Source],
    *,
    runtime: ProbeRuntime = ProbeRuntime(),
    evidence: ControlSet | None = None,
    rule: VerdictRule | None = None,
    **test_kwargs: Any,
) -> list[AuditRow]:
    """Test each checkpoint against ``reference`` with the callback's verdict.

    ``evidence`` holds the controls (default: those stored in the reference, else none);
    ``rule`` defaults to :func:`rule_for_base` of the reference's step.

    Every checkpoint is probed with the reference's spec (one model in memory at a time);
    directories expand as in :func:`~seedprints_lightning.offline.sources.expand_checkpoints`. Rows come
    in that order. The first checkpoint that cannot be loaded or probed raises (nothing is
    silently skipped); one whose features a test cannot use is an undetermined row.
    """
    if evidence is None:
        evidence = (ControlSet(reference.controls, reference.control_seeds, reference.spec,
                               description=f"{reference.controls.shape[0]} fresh-init controls stored with the "
                                           "reference", init_scheme=reference.controls_init_scheme)
                    if reference.controls is not None else ControlSet.none())
    rule = rule or rule_for_base(reference.step, "auto", test_kwargs.pop("alpha", 0.01))
    check_test_options(alpha=rule.alpha, dim=reference.hidden_size, **test_kwargs)
    expanded = expand_checkpoints(checkpoints, trust_pickle=runtime.trust_pickle)
    items: Iterable[tuple[Source, int | None]] = expanded
    if runtime.progress:
        from tqdm.auto import tqdm  # why: tqdm is imported only when a progress bar is asked for (start-up cost)

        items = tqdm(expanded, desc="checkpoints", unit="ckpt", file=sys.stderr)
    rows: list[AuditRow] = []
    for source, step in items:
        fp = fingerprint_source(source, reference.spec, step=step, runtime=runtime)
        reference.check_comparable(fp)
        _check_same_width(reference, fp, ("the reference", str(source.path)))
        verdict = judge(reference.features, fp.features, evidence.as_list(), rule, **test_kwargs)
        result = verdict.result
        rows.append(AuditRow(
            name=source.name, kind=source.kind, step=step if step is not None else fp.step, z=result.z,
            log10_p=result.log10_p, tau_mean=result.tau_mean, k=result.k, related=verdict.related,
            threshold=verdict.threshold, result=result, verdict=verdict, load=_load_of(source, fp),
        ))
    return rows


def checkpoint_weights_digest(source: str | Path | Source, *, trust_pickle: bool = False) -> tuple[str | None, str]:
    """``(weights_digest of the model weights a source holds, or None; how they were read / why not)``.

    What a face's save record digests (:func:`~seedprints_lightning.core.weights.weights_digest`):
    the causal LM's state dict, names relative to the LM, dtypes as saved. A training checkpoint's
    weights are read as saved (memory-mapped, one tensor at a time), its model prefix removed
    (:func:`~seedprints_lightning.core.state.model_weights_prefix`: ``model.``, or the one its
    SeedPrints state records, ``""`` included); a model directory is loaded in its config's
    dtype. A fingerprint file, or a checkpoint whose weights cannot be read, gives ``None``.
    """
    source = classify_source(source)
    if source.kind == "fingerprint":
        return None, f"{source.path} is a fingerprint file: it holds no weights to match against a recorded save"
    family = family_of_checkpoint(source.path) if source.kind == "checkpoint" else None
    read_weights = None if family is None else family.checkpoint.get("read_weights")
    if read_weights is not None:  # a family's own checkpoint (OLMo-core, torchtitan): its model's weights
        return weights_digest(read_weights(source.path)), f"the model weights of {source.path}, as saved"
    if source.kind == "checkpoint":
        checkpoint = read_checkpoint(source, trust_pickle=trust_pickle)
        if not checkpoint:
            return None, f"the weights of {source.path} could not be read as one checkpoint file"
        # The recorded prefix "" (a monitor's or Fabric's checkpoint of the transformers model itself) is a
        # prefix: read as "missing", "model." would cut lm_head.weight out of the digest (issue 27).
        prefix = model_weights_prefix(checkpoint, seedprints_state(checkpoint))
        weights = weights_of(checkpoint, prefix)
        if not weights:
            return None, f"{source.path} holds no '{prefix}*' weights"
        return weights_digest(weights), f"the '{prefix}*' weights of {source.path}, as saved"
    config = {}
    try:
        config = json.loads((source.path / "config.json").read_text())
    except (OSError, ValueError):
        pass
    name = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    model = load_model(source, dtype=dtype, trust_pickle=trust_pickle)
    try:
        return weights_digest(model.state_dict()), f"the weights of {source.path} ({str(dtype).removeprefix('torch.')})"
    finally:
        del model
