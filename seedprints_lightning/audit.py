"""After-the-fact lineage checks of saved models: sources, pairwise comparison, audits.

This is the library layer under the ``seedprints`` command line (:mod:`.cli`), usable on its
own. It knows three kinds of *source* a user can point at:

* a fingerprint file written by :meth:`Fingerprint.save` (any suffix but ``.ckpt``),
* a ``save_pretrained`` model directory (it has a ``config.json``),
* a Lightning ``.ckpt`` of :class:`~seedprints_lightning.train.CausalLMModule`.

:func:`compare_sources` tests one source against another (``A`` is the base, ``B`` the
target), probing models with a shared :class:`ProbeSpec` when needed.
:func:`audit_checkpoints` tests every checkpoint of a run against one reference fingerprint
and returns one typed :class:`AuditRow` each: the paper's birth-to-lifecycle trajectory,
computed after training instead of by the callback during it.

Models are loaded on CPU (``local_files_only``: nothing is downloaded), cast to ``dtype``
(float32 by default, so fingerprints made on different machines agree), moved to ``device``
only while they are probed, and released afterwards. Lightning checkpoints are read with
``torch.load(weights_only=True)`` unless ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .checks import check_int
from .errors import FingerprintFileError, IncompatibleFingerprintsError, InputError, SeedPrintsError, SourceError
from .files import load_lightning_checkpoint
from .fingerprint import Fingerprint, fingerprint_model
from .probes import ProbeSpec, find_causal_lm
from .stats import LineageResult, lineage_test
from .verdict import BIRTH_RULE, CUSTODY_RULE, IdentityVerdict, VerdictRule, decide_identity

__all__ = [
    "AuditRow",
    "Comparison",
    "Evidence",
    "ProbeRuntime",
    "find_controls",
    "rule_for_base",
    "Source",
    "SourceError",
    "audit_checkpoints",
    "classify_source",
    "compare_sources",
    "expand_checkpoints",
    "fingerprint_source",
    "load_model",
    "load_source_fingerprint",
    "spec_for_models",
]

SourceKind = Literal["fingerprint", "model_dir", "checkpoint"]
CHECKPOINT_SUFFIX = ".ckpt"
_KIND_WORDS = {"fingerprint": "fingerprint file", "model_dir": "model directory", "checkpoint": "Lightning checkpoint"}


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A path the user named, and what kind of thing it is."""

    path: Path
    kind: SourceKind

    @property
    def name(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"{self.path} ({_KIND_WORDS[self.kind]})"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind}


def classify_source(path: str | Path | Source) -> Source:
    """Tell what ``path`` is; raise :class:`SourceError` (naming it) when it is none of them."""
    if isinstance(path, Source):
        return path
    path = Path(path).expanduser()
    if not path.exists():
        raise SourceError(f"{path} does not exist")
    if path.is_dir():
        if (path / "config.json").is_file():
            return Source(path, "model_dir")
        hint = ""
        if any(path.glob(f"*{CHECKPOINT_SUFFIX}")):
            hint = f"; it holds {CHECKPOINT_SUFFIX} files: name one of them"
        raise SourceError(f"{path} is a directory but not a save_pretrained model directory (no config.json){hint}")
    if path.suffix == CHECKPOINT_SUFFIX:
        return Source(path, "checkpoint")
    return Source(path, "fingerprint")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_checkpoint_dict(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        if not trust_pickle:
            return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return None


def source_step(source: Source, *, trust_pickle: bool = False) -> int | None:
    """The training step a source records, if any.

    ``global_step`` of a Lightning checkpoint (read memory-mapped, without loading the
    weights), ``global_step`` of a Hugging Face Trainer's ``trainer_state.json`` next to a
    model directory, or the step stored in a fingerprint file. ``None`` when unknown.
    """
    if source.kind == "checkpoint":
        checkpoint = _load_checkpoint_dict(source.path, trust_pickle)
        step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    elif source.kind == "model_dir":
        state = _read_json(source.path / "trainer_state.json")
        step = state.get("global_step") if isinstance(state, dict) else None
    else:
        try:
            step = Fingerprint.load(source.path).step
        except SeedPrintsError:
            step = None
    return int(step) if isinstance(step, int) and not isinstance(step, bool) else None


def expand_checkpoints(paths: Iterable[str | Path], *, trust_pickle: bool = False) -> list[tuple[Source, int | None]]:
    """Resolve checkpoint arguments to ``(source, step)`` pairs.

    A file or a model directory stands for itself, in the order given. Any other directory
    expands to the ``.ckpt`` files and ``save_pretrained`` model directories directly inside
    it, sorted by their recorded step (unknown steps last, then by name).
    """
    out: list[tuple[Source, int | None]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            members = [Source(p, "checkpoint") for p in path.iterdir() if p.is_file() and p.suffix == CHECKPOINT_SUFFIX]
            members += [Source(p, "model_dir") for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file()]
            if not members:
                raise SourceError(
                    f"{path} is a directory with no config.json and no {CHECKPOINT_SUFFIX} files or model "
                    "directories in it"
                )
            stepped = [(member, source_step(member, trust_pickle=trust_pickle)) for member in members]
            stepped.sort(key=lambda item: (item[1] is None, item[1] if item[1] is not None else 0, item[0].path.name))
            out.extend(stepped)
        else:
            source = classify_source(path)
            out.append((source, source_step(source, trust_pickle=trust_pickle)))
    return out


#: Checkpoint key under which a LightningModule stores its model's transformers config
#: (``CausalLMModule.on_save_checkpoint`` does; any module can).
HF_CONFIG_KEY = "hf_config"


def _model_from_lightning_checkpoint(path: Path, trust_pickle: bool) -> torch.nn.Module:
    """Rebuild the transformers model of a Lightning checkpoint from its ``hf_config`` and ``model.*`` weights.

    Needs no training code: the checkpoint carries the model's config (``CausalLMModule``
    stores it; another LightningModule can too, with ``checkpoint["hf_config"] =
    json.loads(model.config.to_json_string())`` in ``on_save_checkpoint``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = load_lightning_checkpoint(path, trust_pickle=trust_pickle, error=SourceError)
    config_dict = checkpoint.get(HF_CONFIG_KEY)
    state_dict = {key[len("model."):]: value for key, value in checkpoint["state_dict"].items()
                  if key.startswith("model.")}
    if not isinstance(config_dict, dict) or not state_dict:
        raise SourceError(
            f"{path} has no '{HF_CONFIG_KEY}' entry or no 'model.*' weights, so the model cannot be rebuilt from it: "
            "save the checkpoint with seedprints_lightning.train.CausalLMModule (or store the config under "
            f"checkpoint['{HF_CONFIG_KEY}'] in on_save_checkpoint), or export the model with save_pretrained"
        )
    config_dict = dict(config_dict)
    try:
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state_dict, strict=True)
    except Exception as exc:
        raise SourceError(f"{path}: the weights do not match the model its '{HF_CONFIG_KEY}' describes "
                          f"({type(exc).__name__}: {exc})") from exc
    return model


def load_model(
    source: str | Path | Source, *, dtype: torch.dtype = torch.float32, trust_pickle: bool = False
) -> torch.nn.Module:
    """Load the causal LM of a model directory or checkpoint, on CPU, in eval mode."""
    source = classify_source(source)
    if source.kind == "fingerprint":
        raise SourceError(f"{source.path} is a fingerprint file, not a model")
    if source.kind == "checkpoint":
        model = _model_from_lightning_checkpoint(source.path, trust_pickle)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(source.path), local_files_only=True, dtype=dtype)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, safetensors errors...
            raise SourceError(
                f"{source.path} could not be loaded as a save_pretrained model ({type(exc).__name__}: {exc})"
            ) from exc
    lm = find_causal_lm(model)
    return lm.to(dtype=dtype).eval()


def _check_fits(model: torch.nn.Module, spec: ProbeSpec, name: str) -> None:
    """Raise :class:`IncompatibleFingerprintsError` unless ``model`` can take ``spec``'s inputs."""
    try:
        spec.resolve(model)  # a resolved spec resolves to itself, or raises on a misfit
    except InputError as exc:
        raise IncompatibleFingerprintsError(f"{name} cannot be probed with this probe spec: {exc}") from exc


@dataclass(frozen=True)
class ProbeRuntime:
    """How sources are loaded and probed (not what is probed), shared by every entry point here.

    ``dtype`` is what models are cast to (float32 by default, so fingerprints made on
    different machines agree); ``device`` where each is moved while probed (None: stays on
    CPU); ``trust_pickle`` allows full-pickle ``.ckpt`` files; ``progress`` shows bars.
    """

    batch_size: int = 64
    device: str | torch.device | None = None
    dtype: torch.dtype = torch.float32
    trust_pickle: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, low=1)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise InputError(f"dtype must be a floating torch.dtype such as torch.float32, got {self.dtype!r}")


def fingerprint_source(
    source: str | Path | Source,
    spec: ProbeSpec | None = None,
    *,
    step: int | None = None,
    runtime: ProbeRuntime = ProbeRuntime(),
    num_controls: int = 0,
) -> Fingerprint:
    """Fingerprint a model directory or checkpoint (a fingerprint file is just loaded).

    ``num_controls`` fresh inits of the model's config are probed and stored with it.

    With a resolved ``spec`` the model must accept its inputs (vocabulary, width), else
    :class:`IncompatibleFingerprintsError`; an unresolved or missing spec is resolved from
    the model. A fingerprint file is returned as it is: check it with
    :meth:`Fingerprint.check_comparable`.
    """
    source = classify_source(source)
    if source.kind == "fingerprint":
        return Fingerprint.load(source.path)
    model = load_model(source, dtype=runtime.dtype, trust_pickle=runtime.trust_pickle)
    if spec is not None and spec.is_resolved:
        _check_fits(model, spec, str(source.path))
    if step is None:
        step = source_step(source, trust_pickle=runtime.trust_pickle)
    if runtime.device is not None:
        model.to(runtime.device)
    return fingerprint_model(model, spec, step=step, batch_size=runtime.batch_size, progress=runtime.progress,
                             extra={"source": str(source.path)}, num_controls=num_controls)


def load_source_fingerprint(path: str | Path | Source) -> Fingerprint:
    """Load a fingerprint file, with a clear error when the path is a model instead."""
    source = classify_source(path)
    if source.kind != "fingerprint":
        raise SourceError(f"{source.path} is a {_KIND_WORDS[source.kind]}, not a fingerprint file")
    return Fingerprint.load(source.path)


def _model_sizes(model: torch.nn.Module) -> tuple[int, int]:
    config = find_causal_lm(model).config
    hidden = next((getattr(config, n) for n in ("hidden_size", "n_embd", "d_model") if getattr(config, n, None)), None)
    return int(config.vocab_size), int(hidden) if hidden is not None else -1


def spec_for_models(
    base: torch.nn.Module,
    target: torch.nn.Module,
    *,
    kind: Literal["token", "embedding"] = "token",
    num_samples: int | None = None,
    length: int | None = None,
    seed: int | None = None,
    vocab_size: int | None = None,
    names: tuple[str, str] = ("A", "B"),
) -> ProbeSpec:
    """The probe both models see (method.md step 1).

    Token probes draw ids from ``[0, V)``, ``V`` the smaller vocabulary of the two (or
    ``vocab_size``, which must fit both). Embedding probes take the mean and std of the
    BASE model's input-embedding matrix and need equal hidden sizes.
    """
    fields: dict[str, Any] = {"kind": kind}
    for key, value in (("num_samples", num_samples), ("length", length), ("seed", seed)):
        if value is not None:
            fields[key] = value
    (vocab_a, hidden_a), (vocab_b, hidden_b) = _model_sizes(base), _model_sizes(target)
    if kind == "token":
        smallest = min(vocab_a, vocab_b)
        if vocab_size is not None and vocab_size > smallest:
            raise IncompatibleFingerprintsError(
                f"--vocab-size {vocab_size} exceeds the smaller vocabulary of the two models ({names[0]}: {vocab_a}, "
                f"{names[1]}: {vocab_b}); use at most {smallest}"
            )
        fields["vocab_size"] = smallest if vocab_size is None else vocab_size
    elif vocab_size is not None:
        raise InputError("--vocab-size applies to token probes only")
    if kind == "embedding" and hidden_a != hidden_b:
        raise IncompatibleFingerprintsError(
            f"embedding probes need one hidden size, but {names[0]} has {hidden_a} and {names[1]} has {hidden_b}; "
            "use token probes (--kind token) across widths"
        )
    return ProbeSpec(**fields).resolve(base)


# --------------------------------------------------------------------------------------
# Pairwise comparison
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """What a verdict was judged against: the controls' features (or none) and where they came from."""

    controls: torch.Tensor | None
    description: str

    @property
    def num_controls(self) -> int:
        return 0 if self.controls is None else int(self.controls.shape[0])


def _sibling_controls(path: Path, spec: ProbeSpec) -> torch.Tensor | None:
    """The callback's ``controls.safetensors`` beside a reference file, if it was made on ``spec``."""
    from .controls import load_controls
    from .custody import CONTROLS_FILE

    sibling = path.parent / CONTROLS_FILE
    if not sibling.is_file():
        return None
    try:
        features, _, control_spec = load_controls(sibling)
    except FingerprintFileError:
        return None
    return features if control_spec == spec else None


def find_controls(
    spec: ProbeSpec,
    fingerprints: Sequence[tuple[Source, Fingerprint]] = (),
    models: Sequence[tuple[Source, torch.nn.Module]] = (),
    *,
    num_controls: int = 4,
    runtime: ProbeRuntime = ProbeRuntime(),
) -> Evidence:
    """The fresh-init controls an offline verdict is judged against, from the best source at hand.

    In order: controls stored in a fingerprint file (made on the same spec); fresh inits built
    from a model's config (the callback's control seeds); the callback's ``controls.safetensors``
    beside a fingerprint file. ``num_controls=0`` asks for none. Without controls the verdict
    rests on the analytic threshold and the effect-size margin alone, and says so.
    """
    from .controls import control_seeds, probe_controls

    if num_controls == 0:
        return Evidence(None, "no controls (--controls 0): analytic threshold and effect-size margin only")
    for source, fp in fingerprints:
        if fp.controls is not None and fp.controls.shape[0] > 0:
            return Evidence(fp.controls[:num_controls], f"{min(num_controls, fp.controls.shape[0])} fresh-init "
                                                        f"controls stored in {source.path}")
    for source, model in models:
        seeds = control_seeds(num_controls)
        features = probe_controls(model, spec, seeds, batch_size=runtime.batch_size, device=runtime.device)
        return Evidence(features, f"{len(seeds)} fresh inits of {source.path}'s config (seeds {seeds[0]}..{seeds[-1]})")
    for source, _ in fingerprints:
        found = _sibling_controls(source.path, spec)
        if found is not None:
            return Evidence(found[:num_controls], f"{min(num_controls, found.shape[0])} fresh-init controls from "
                                                  f"{source.path.parent / 'controls.safetensors'}")
    return Evidence(None, "no controls available (fingerprints without stored controls; re-create them with "
                          "`seedprints fingerprint --controls 4`): analytic threshold and effect-size margin only")


def rule_for_base(base_step: int | None, rule: str = "auto", alpha: float = 0.01) -> VerdictRule:
    """The callback's rule for a base fingerprint: ``birth`` for an init (step 0), ``custody`` otherwise.

    A base that is an init is judged like the callback's birth test (fresh-init controls measure
    exactly the unrelated relation); a trained base like a custody link (with the effect-size
    margin: models trained on the same data share a small response the controls cannot see).
    A base of unknown step gets the stricter custody rule.
    """
    if rule not in ("auto", "birth", "custody"):
        raise InputError(f"rule must be 'auto', 'birth' or 'custody', got {rule!r}")
    if rule == "auto":
        rule = "birth" if base_step == 0 else "custody"
    base = BIRTH_RULE if rule == "birth" else CUSTODY_RULE
    return VerdictRule(alpha=alpha, z_margin=base.z_margin, tau_margin=base.tau_margin)


def judge(base: torch.Tensor, target: torch.Tensor, evidence: Evidence, rule: VerdictRule,
          **test_kwargs: Any) -> IdentityVerdict:
    """``lineage_test(base, target)`` and each ``lineage_test(control, target)``, judged by ``rule``."""
    test_kwargs["alpha"] = rule.alpha
    result = lineage_test(base, target, **test_kwargs)
    controls = [] if evidence.controls is None else list(evidence.controls)
    return decide_identity(result, [lineage_test(c, target, **test_kwargs) for c in controls], rule)


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare_sources`: both inputs, the shared probe, the verdict and its evidence."""

    a: Source
    b: Source
    spec: ProbeSpec
    verdict: IdentityVerdict
    evidence: Evidence
    rule_name: str

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
        return out


def verdict_word(related: bool | None) -> str:
    return "undetermined" if related is None else ("related" if related else "not shown related")


def _check_same_width(fa: Fingerprint, fb: Fingerprint, names: tuple[str, str]) -> None:
    if fa.hidden_size != fb.hidden_size:
        raise IncompatibleFingerprintsError(
            f"{names[0]} has {fa.hidden_size} feature dimensions and {names[1]} has {fb.hidden_size}: the lineage "
            "test compares coordinate j of one model with coordinate j of the other, so it needs equal hidden sizes"
        )


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

    Judged by the callback's verdict (:mod:`.verdict`) against fresh-init controls found by
    :func:`find_controls`, with the rule of :func:`rule_for_base` (birth rule when ``a`` is an
    init, custody rule otherwise; ``rule`` forces one).

    * two fingerprints: compared as they are (different probe specs raise
      :class:`IncompatibleFingerprintsError`);
    * a fingerprint and a model: the model is probed with the fingerprint's spec;
    * two models: both are probed with :func:`spec_for_models` (``kind`` etc. choose it;
      both are held in CPU memory at once, and each is on ``device`` only while probed).

    The probe options apply only when both are models; passing one while a fingerprint fixes
    the probe is an :class:`InputError`. ``test_kwargs`` go to :func:`lineage_test`.
    """
    sa, sb = classify_source(a), classify_source(b)
    names = (f"A ({sa.path})", f"B ({sb.path})")
    probe_options = {"kind": kind, "num_samples": num_samples, "length": length, "seed": seed, "vocab_size": vocab_size}
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
        spec = fa.spec
        fingerprints = [(s, loaded[s.path]) for s in (sa, sb) if s.kind == "fingerprint"]
        evidence = find_controls(spec, fingerprints, [], num_controls=num_controls, runtime=runtime)
        if evidence.controls is None and num_controls:
            model_source = next((s for s in (sa, sb) if s.kind != "fingerprint"), None)
            if model_source is not None:
                model = load_model(model_source, dtype=runtime.dtype, trust_pickle=runtime.trust_pickle)
                evidence = find_controls(spec, [], [(model_source, model)], num_controls=num_controls,
                                         runtime=runtime)
                del model
    else:
        model_a = load_model(sa, dtype=runtime.dtype, trust_pickle=runtime.trust_pickle)
        model_b = load_model(sb, dtype=runtime.dtype, trust_pickle=runtime.trust_pickle)
        spec = spec_for_models(model_a, model_b, kind=kind or "token", num_samples=num_samples, length=length,
                               seed=seed, vocab_size=vocab_size, names=names)
        _check_fits(model_b, spec, names[1])
        features = []
        for model in (model_a, model_b):
            if runtime.device is not None:
                model.to(runtime.device)
            step = source_step(sa if model is model_a else sb, trust_pickle=runtime.trust_pickle)
            features.append(fingerprint_model(model, spec, step=step, batch_size=runtime.batch_size,
                                              progress=runtime.progress))
            model.to("cpu")
        fa, fb = features
        evidence = find_controls(spec, [], [(sa, model_a)], num_controls=num_controls, runtime=runtime)
        del model_a, model_b
    _check_same_width(fa, fb, names)
    chosen = rule_for_base(fa.step, rule, alpha)
    rule_name = rule if rule != "auto" else ("birth" if fa.step == 0 else "custody")
    verdict = judge(fa.features, fb.features, evidence, chosen, **test_kwargs)
    return Comparison(a=sa, b=sb, spec=spec, verdict=verdict, evidence=evidence, rule_name=rule_name)


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "step": self.step, "z": self.z, "log10_p": self.log10_p,
            "tau_mean": self.tau_mean, "k": self.k, "related": self.related, "verdict": verdict_word(self.related),
            "threshold": self.threshold, "control_z": list(self.verdict.control_z) if self.verdict else [],
            "n": self.result.n, "alpha": self.result.alpha,
            "reason": self.verdict.reason if self.verdict else self.result.reason,
        }


def audit_checkpoints(
    reference: Fingerprint,
    checkpoints: Sequence[str | Path | Source],
    *,
    runtime: ProbeRuntime = ProbeRuntime(),
    evidence: Evidence | None = None,
    rule: VerdictRule | None = None,
    **test_kwargs: Any,
) -> list[AuditRow]:
    """Test each checkpoint against ``reference`` with the callback's verdict.

    ``evidence`` holds the controls (default: those stored in the reference, else none);
    ``rule`` defaults to :func:`rule_for_base` of the reference's step.

    Every checkpoint is probed with the reference's spec (one model in memory at a time);
    directories expand as in :func:`expand_checkpoints`. Rows come in that order. The first
    checkpoint that cannot be loaded or probed raises (nothing is silently skipped).
    """
    if evidence is None:
        evidence = (Evidence(reference.controls, f"{reference.controls.shape[0]} fresh-init controls stored with "
                                                 "the reference")
                    if reference.controls is not None else Evidence(None, "no controls: analytic threshold and "
                                                                          "effect-size margin only"))
    rule = rule or rule_for_base(reference.step, "auto", test_kwargs.pop("alpha", 0.01))
    expanded = expand_checkpoints(checkpoints, trust_pickle=runtime.trust_pickle)
    items: Iterable[tuple[Source, int | None]] = expanded
    if runtime.progress:
        import sys

        from tqdm.auto import tqdm

        items = tqdm(expanded, desc="checkpoints", unit="ckpt", file=sys.stderr)
    rows: list[AuditRow] = []
    for source, step in items:
        fp = fingerprint_source(source, reference.spec, step=step, runtime=runtime)
        reference.check_comparable(fp)
        _check_same_width(reference, fp, ("the reference", str(source.path)))
        verdict = judge(reference.features, fp.features, evidence, rule, **test_kwargs)
        result = verdict.result
        rows.append(AuditRow(
            name=source.name, kind=source.kind, step=step if step is not None else fp.step, z=result.z,
            log10_p=result.log10_p, tau_mean=result.tau_mean, k=result.k, related=verdict.related,
            threshold=verdict.threshold, result=result, verdict=verdict,
        ))
    return rows


def format_audit_table(rows: Sequence[AuditRow]) -> str:
    """A plain-text table of the rows (one line each)."""
    header = ("checkpoint", "step", "z", "threshold", "log10 p", "tau_mean", "k", "verdict")
    body = [
        (row.name, "-" if row.step is None else str(row.step), f"{row.z:.2f}", f"{row.threshold:.2f}",
         _fmt_log10_p(row.log10_p), f"{row.tau_mean:.4f}", str(row.k), verdict_word(row.related))
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = []
    for line in [header, *body]:
        cells = [line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _fmt_log10_p(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) and abs(value) >= 100 else f"{value:.2f}"
