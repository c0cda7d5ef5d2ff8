"""Negative controls and the identity verdict: pure functions, no Lightning.

Why controls exist
------------------
The lineage test's analytic null (``z ~ N(0, 1)`` for unrelated models) is not always
calibrated. ``method.md`` records unrelated pairs at z = 4 to 9.5 (token probes with few
identity dimensions on a 160M LLaMA; embedding probes on a narrow 256-wide model), and
permuting the samples did not remove it: it is a real response shared by every model of the
architecture, not a variance error. A bare ``z > z_threshold(alpha)`` would then call an
unrelated model "related".

The cheapest empirical null inside a training run is a handful of fresh inits of the SAME
config with other seeds ("controls"), probed once. Testing the live model against each of
them (each control as the base, the live model as the target: the "cross" relation)
measures, in real time, the z an unrelated model of this architecture gets. On the narrow
model at step 400 six fresh inits gave z = 1.7, 3.1, 2.3, 2.9, 4.9, 2.4 against the live
model, whose own z was 17.7; against a swapped-in unrelated model (z = 4.1) the controls gave
2.3 to 6.2. So :func:`decide_identity` asks the run to stand clear of its controls by
``control_margin``, not just to pass the analytic threshold.

Everything here is deterministic and leaves every global RNG (Python, NumPy, torch CPU and
CUDA) exactly as it found it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .errors import FingerprintFileError, InputError
from .probes import ProbeSpec, extract_features, find_causal_lm
from .stats import LineageResult, z_threshold

__all__ = [
    "CONTROL_SEED_BASE",
    "DEFAULT_CONTROL_MARGIN",
    "DEFAULT_NUM_CONTROLS",
    "IdentityVerdict",
    "build_control_model",
    "control_seeds",
    "decide_identity",
    "load_controls",
    "preserve_rng_state",
    "probe_controls",
    "save_controls",
]

#: How far (in z) the live model must stand above the largest control z. Measured
#: (docs/benchmarks.md, "Calibration"): with token probes, n = 1000, all dimensions and 4
#: controls, unrelated pairs stood at most 3.6 (cross), 3.7 (fresh-init pairs) and 8.8
#: (peers: other seeds trained on the same data in the same order, a shared response the
#: fresh-init controls cannot see) above their largest control, and own-lineage checkpoints
#: at least 22.1 above. 10 clears every unrelated pair with room on both sides; 2.33 (the
#: bare 1 % quantile) let 2/144 cross and 14/72 peers pairs through. z grows with
#: sqrt(num_samples), so re-measure the margin when you change num_samples a lot.
DEFAULT_CONTROL_MARGIN = 10.0

#: Negative controls per run. 2 controls let larger unrelated excursions through than 4;
#: 6 gained nothing over 4 (docs/benchmarks.md).
DEFAULT_NUM_CONTROLS = 4

#: Control seeds are ``CONTROL_SEED_BASE + i``: a fixed prime far from the seeds people
#: type (0, 1, 42, 123, 1234, 2024, ...), so a control is never the run's own init.
CONTROL_SEED_BASE = 1_000_003

_CONTROLS_FORMAT = "seedprints-controls"
_CONTROLS_FORMAT_VERSION = 1
_META_KEY = "seedprints"


# --------------------------------------------------------------------------------------
# RNG hygiene
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def preserve_rng_state() -> Iterator[None]:
    """Save Python ``random``, NumPy, torch CPU and every initialised CUDA RNG; restore after.

    CUDA states are captured only if CUDA is already initialised (capturing would otherwise
    create a context); ``torch.cuda.get_rng_state_all`` reads generator state without
    launching work, as Lightning's own checkpoint RNG capture does.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.random.get_rng_state()
    cuda_states = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------
# Control models
# --------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def control_seeds(num_controls: int, base: int = CONTROL_SEED_BASE) -> tuple[int, ...]:
    """The init seeds of the negative controls: ``base, base + 1, ..., base + num_controls - 1``.

    Fixed and documented, so every run (and every rank) builds the same controls, and
    distinct from typical user seeds (see :data:`CONTROL_SEED_BASE`).
    """
    num = _check_int("num_controls", num_controls, 0)
    start = _check_int("base", base, 0)
    return tuple(start + i for i in range(num))


def build_control_model(model: nn.Module, seed: int) -> nn.Module:
    """A fresh init of ``model``'s causal LM: same class and config, init seed ``seed``.

    ``type(lm)(lm.config)`` is built on the CPU under ``torch.manual_seed(seed)`` (so the
    control is the same whatever device the live model is on), then moved to the live
    model's device and parameter dtype, in eval mode. Every global RNG is restored after:
    building a control never changes the data order or dropout of the run.

    ``model`` is a ``transformers.PreTrainedModel`` or a module containing one. The control
    holds a full copy of the model's parameters: for very large models that is the cost of a
    control (built one at a time by :func:`probe_controls`, and only when the reference is
    taken).
    """
    seed = _check_int("seed", seed, 0)
    lm = find_causal_lm(model)
    reference_param = next(iter(lm.parameters()), None)
    device = reference_param.device if reference_param is not None else torch.device("cpu")
    dtype = reference_param.dtype if reference_param is not None else torch.float32
    if device.type == "meta":
        raise InputError("the live model is on the meta device; controls need materialised weights")
    with preserve_rng_state():
        torch.manual_seed(seed)
        with torch.device("cpu"):
            control = type(lm)(lm.config)
    control = control.to(device=device, dtype=dtype if dtype.is_floating_point else None)
    control.eval()
    control.requires_grad_(False)
    return control


def probe_controls(
    model: nn.Module,
    spec: ProbeSpec,
    seeds: Sequence[int],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Features ``[c, n, D]`` (CPU float32) of a fresh init per seed on ``spec``'s probes.

    Controls are built one at a time (:func:`build_control_model`), probed with
    :func:`~seedprints_lightning.probes.extract_features` and freed before the next, so at
    most one extra model lives at a time. ``context`` (e.g. a Lightning precision plugin's
    ``forward_context``) wraps each probe. ``spec`` must be resolved (the run's reference
    spec: controls see exactly the reference's inputs). Global RNGs are left untouched.
    """
    if not isinstance(spec, ProbeSpec):
        raise InputError(f"spec must be a ProbeSpec, got {type(spec).__name__}")
    if not spec.is_resolved:
        raise InputError("probe_controls needs a resolved ProbeSpec (the reference's spec); call spec.resolve(model)")
    seeds = [_check_int("seed", s, 0) for s in seeds]
    if not seeds:
        return torch.empty(0, spec.num_samples, 0)
    out = []
    with preserve_rng_state():
        for seed in seeds:
            control = build_control_model(model, seed)
            try:
                with (context() if context is not None else contextlib.nullcontext()):
                    out.append(extract_features(control, spec, batch_size=batch_size, device=device))
            finally:
                del control
    return torch.stack(out)


def save_controls(path: str | os.PathLike, features: torch.Tensor, seeds: Sequence[int], spec: ProbeSpec,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write control features ``[c, n, D]`` with their seeds and spec (safetensors, atomic)."""
    from safetensors.torch import save_file

    features = features.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if features.dim() != 3 or features.shape[0] != len(seeds):
        raise InputError(f"control features must be [len(seeds)={len(seeds)}, n, D], got {tuple(features.shape)}")
    meta = {"format": _CONTROLS_FORMAT, "format_version": _CONTROLS_FORMAT_VERSION, "seeds": [int(s) for s in seeds],
            "spec": spec.to_dict(), "extra": dict(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"features": features}, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_controls(path: str | os.PathLike) -> tuple[torch.Tensor, tuple[int, ...], ProbeSpec]:
    """Read a file written by :func:`save_controls`: ``(features [c, n, D], seeds, spec)``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FingerprintFileError(f"controls file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[_META_KEY])
            features = handle.get_tensor("features")
    except Exception as exc:
        raise FingerprintFileError(f"{path} is not a readable seedprints controls file ({exc})") from exc
    if meta.get("format") != _CONTROLS_FORMAT or meta.get("format_version") != _CONTROLS_FORMAT_VERSION:
        raise FingerprintFileError(f"{path}: not a seedprints controls file of version {_CONTROLS_FORMAT_VERSION}")
    return features, tuple(int(s) for s in meta["seeds"]), ProbeSpec.from_dict(meta["spec"])


# --------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


@dataclass(frozen=True)
class IdentityVerdict:
    """Is the live model still of the reference's lineage, judged against its controls?

    ``related`` is ``True`` (kept), ``False`` (lost) or ``None`` (undetermined: the test
    could not be made; ``reason`` says why). ``reason`` also explains a ``False``.
    ``control_z_max`` / ``control_z_mean`` are over the controls whose test was determined,
    and 0.0 when there are none (never NaN). ``threshold`` is the z the live model had to
    exceed: ``max(z_threshold(alpha), control_z_max + control_margin)``.
    """

    reference: LineageResult
    controls: tuple[LineageResult, ...]
    control_z_max: float
    control_z_mean: float
    threshold: float
    related: bool | None
    reason: str | None
    alpha: float = 0.01
    control_margin: float = DEFAULT_CONTROL_MARGIN

    @property
    def control_z(self) -> tuple[float, ...]:
        """Every control's z (undetermined controls give 0.0)."""
        return tuple(float(c.z) for c in self.controls)

    def to_metrics(self, probe_seconds: float = 0.0) -> dict[str, float]:
        """The callback's log tags, all finite floats.

        An undetermined verdict logs ``z = log10_p = 0`` (no evidence, p = 1, as
        :class:`LineageResult` carries it) and ``related = 0``: ``related`` is 1 only for a
        confirmed lineage.
        """
        ref = self.reference
        return {
            "seedprints/z": _finite(ref.z),
            "seedprints/log10_p": _finite(ref.log10_p),
            "seedprints/tau_mean": _finite(ref.tau_mean),
            "seedprints/identity_dims": float(ref.k),
            "seedprints/related": 1.0 if self.related else 0.0,
            "seedprints/control_z_max": _finite(self.control_z_max),
            "seedprints/control_z_mean": _finite(self.control_z_mean),
            "seedprints/threshold": _finite(self.threshold),
            "seedprints/probe_seconds": _finite(probe_seconds),
        }

    def summary(self) -> str:
        """One readable line with the figures behind the verdict."""
        ref = self.reference
        controls = ", ".join(f"{z:.2f}" for z in self.control_z) or "none"
        state = {True: "identity kept", False: "IDENTITY LOST", None: "undetermined"}[self.related]
        text = (f"{state}: z={ref.z:.2f} (log10 p={ref.log10_p:.2f}, tau_mean={ref.tau_mean:.4f}, k={ref.k}, "
                f"n={ref.n}) vs threshold {self.threshold:.2f} [analytic {z_threshold(self.alpha):.2f} at "
                f"alpha={self.alpha:g}; controls z max {self.control_z_max:.2f} + margin {self.control_margin:g}; "
                f"control z: {controls}]")
        return text + (f"; {self.reason}" if self.reason else "")


def decide_identity(
    reference_result: LineageResult,
    control_results: Sequence[LineageResult] = (),
    *,
    alpha: float = 0.01,
    control_margin: float = DEFAULT_CONTROL_MARGIN,
) -> IdentityVerdict:
    """The identity rule: related iff the run beats the analytic threshold AND its controls.

    ``reference_result`` is ``lineage_test(reference_features, live_features)``;
    ``control_results[i]`` is ``lineage_test(control_i_features, live_features)``, each
    fresh-init control as the base and the live model as the target (the "cross" relation,
    measured in real time).

    Rule::

        threshold = max(z_threshold(alpha), control_z_max + control_margin)   # with controls
        threshold = z_threshold(alpha)                                         # without
        related   = reference_result.related and reference_result.z > control_z_max + control_margin

    Why: ``method.md`` shows the analytic null is inflated for some architectures and probes
    (unrelated pairs at z = 4 to 9.5). Fresh-init controls measure that inflated null: on
    the narrow model they gave z = 1.7-4.9 while the run's own z was 17.7, and 2.3-6.2
    around a swapped-in unrelated model's z = 4.1. The analytic test alone would have called
    the swapped model related (4.1 > 2.33); standing ``control_margin`` clear of the
    controls does not.

    Undetermined cases give ``related = None`` with a reason (they are not failures):
    the reference test itself undetermined, or controls given but none of them testable
    (then the null cannot be measured). Undetermined controls are left out of the max/mean.
    """
    if not isinstance(reference_result, LineageResult):
        raise InputError(f"reference_result must be a LineageResult, got {type(reference_result).__name__}")
    controls = tuple(control_results)
    for i, c in enumerate(controls):
        if not isinstance(c, LineageResult):
            raise InputError(f"control_results[{i}] must be a LineageResult, got {type(c).__name__}")
    analytic = z_threshold(alpha)  # validates alpha
    if isinstance(control_margin, bool) or not isinstance(control_margin, (int, float)) or not (
            math.isfinite(control_margin) and control_margin >= 0):
        raise InputError(f"control_margin must be a finite number >= 0, got {control_margin!r}")
    control_margin = float(control_margin)

    determined = [float(c.z) for c in controls if c.related is not None and math.isfinite(c.z)]
    z_max = max(determined) if determined else 0.0
    z_mean = sum(determined) / len(determined) if determined else 0.0
    threshold = max(analytic, z_max + control_margin) if determined else analytic

    def verdict(related: bool | None, reason: str | None) -> IdentityVerdict:
        return IdentityVerdict(reference=reference_result, controls=controls, control_z_max=z_max,
                               control_z_mean=z_mean, threshold=threshold, related=related, reason=reason,
                               alpha=float(alpha), control_margin=control_margin)

    z = float(reference_result.z)
    if reference_result.related is None:
        return verdict(None, f"the lineage test against the reference was undetermined: {reference_result.reason}")
    if controls and not determined:
        reasons = "; ".join(sorted({str(c.reason) for c in controls}))
        return verdict(None, f"none of the {len(controls)} control tests was determined ({reasons}), so the null "
                             "cannot be measured")
    if not reference_result.related:
        return verdict(False, f"z={z:.2f} is not significant at alpha={alpha:g} (needs > {analytic:.2f})")
    if determined and not z > z_max + control_margin:
        return verdict(False, f"z={z:.2f} does not stand clear of the fresh-init controls (max z {z_max:.2f} + "
                              f"margin {control_margin:g} = {z_max + control_margin:.2f}): the model responds like an "
                              "unrelated init of the same architecture")
    return verdict(True, None)
