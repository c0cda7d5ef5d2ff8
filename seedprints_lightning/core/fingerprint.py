"""The portable fingerprint: probe features plus what is needed to reproduce and trust them.

A fingerprint file is a ``safetensors`` file with the tensor ``features`` (``[n, D]``
float32), optionally ``controls`` (``[c, n, D]``: the features of ``c`` fresh inits of the
same config on the same probe, so that the file can be judged offline by the same verdict as
the callback, :mod:`.verdict`), and JSON metadata under the key ``seedprints``: format version, the resolved
probe spec, the model class and a digest of its config, the training step, the package
version and the creation time. Nothing in it is pickled, so loading a file from someone
else runs no code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from .controls import built_init_scheme, control_seeds, probe_controls
from .errors import FingerprintFileError, IncompatibleFingerprintsError, InputError
from .files import read_safetensors, save_safetensors
from .probes import ProbeSpec, extract_features, find_causal_lm, hidden_size_of
from .screen import SCREEN_TENSOR, make_screen, screen_metadata
from .stats import LineageResult, lineage_test

__all__ = ["FORMAT_VERSION", "Fingerprint", "fingerprint_model", "config_digest"]

FORMAT_VERSION = 1
_FORMAT_NAME = "seedprints-fingerprint"
_META_KEY = "seedprints"
# Config entries that say nothing about the architecture or the init.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                         "_attn_implementation_autoset", "_attn_implementation", "use_cache", "architectures"}


def config_digest(config: Any) -> str:
    """sha256 of a transformers config's architecture-relevant entries (order-independent)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(eq=False)
class Fingerprint:
    """Features of one model on one probe, with metadata; see the module docstring.

    Compared by identity (``eq=False``): two fingerprints are "the same" when
    :meth:`check_comparable` passes and their features are equal, not by dataclass equality.
    """

    features: torch.Tensor
    spec: ProbeSpec
    model_class: str | None = None
    config_digest: str | None = None
    step: int | None = None
    package_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    controls: torch.Tensor | None = None
    control_seeds: tuple[int, ...] = ()
    #: How the stored controls were drawn (:data:`~seedprints_lightning.core.controls.INIT_STREAMED`,
    #: ``INIT_WHOLE``); ``None`` with no controls, and in files written before 0.6, which did not record it.
    controls_init_scheme: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.features, torch.Tensor) or self.features.dim() != 2:
            raise InputError("Fingerprint.features must be a 2-D [n, D] tensor")
        if not self.spec.is_resolved:
            raise InputError("Fingerprint.spec must be resolved (spec.resolve(model)) so the probe can be reproduced")
        if self.features.shape[0] != self.spec.num_samples:
            raise InputError(
                f"Fingerprint has {self.features.shape[0]} feature rows but its probe spec has num_samples="
                f"{self.spec.num_samples}"
            )
        self.features = self.features.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if self.controls is not None:
            if (not isinstance(self.controls, torch.Tensor) or self.controls.dim() != 3
                    or tuple(self.controls.shape[1:]) != tuple(self.features.shape)
                    or self.controls.shape[0] != len(self.control_seeds)):
                raise InputError(f"Fingerprint.controls must be [len(control_seeds)={len(self.control_seeds)}, "
                                 f"{self.features.shape[0]}, {self.features.shape[1]}]")
            self.controls = self.controls.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.control_seeds = tuple(int(s) for s in self.control_seeds)
        if self.controls is None:
            self.controls_init_scheme = None

    @property
    def num_samples(self) -> int:
        return int(self.features.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.features.shape[1])

    # ------------------------------------------------------------------ comparison
    def check_comparable(self, other: Fingerprint) -> None:
        """Raise unless ``other`` was made with the same probe inputs."""
        if self.spec != other.spec:
            mine, theirs = self.spec.to_dict(), other.spec.to_dict()
            diffs = ", ".join(f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k])
            raise IncompatibleFingerprintsError(
                f"the two fingerprints were made with different probes ({diffs}); re-fingerprint one model with "
                "the other's spec (seedprints fingerprint --spec-from FILE) so both saw the same inputs"
            )

    def check_fits(self, lm: Any) -> None:
        """Raise :class:`InputError` unless the transformers model ``lm`` can be probed and tested against this."""
        hidden = hidden_size_of(lm.config)
        if self.hidden_size != hidden:
            raise InputError(
                f"the reference fingerprint has D={self.hidden_size} features but the model's hidden size is "
                f"{hidden}: the lineage test compares coordinates one to one, so the reference must come from a "
                "model of this width"
            )
        spec = self.spec
        if spec.kind == "token" and spec.vocab_size > int(lm.config.vocab_size):
            raise InputError(
                f"the reference's token probes use vocab_size={spec.vocab_size} but the model's vocabulary has "
                f"{lm.config.vocab_size} tokens; re-fingerprint the parent with vocab_size <= {lm.config.vocab_size}"
            )

    def compare(self, other: Fingerprint, **test_kwargs: Any) -> LineageResult:
        """``lineage_test(self, other)``: is ``other`` descended from ``self``?"""
        self.check_comparable(other)
        return lineage_test(self.features, other.features, **test_kwargs)

    # ------------------------------------------------------------------ file
    def metadata(self) -> dict[str, Any]:
        return {
            "format": _FORMAT_NAME,
            "format_version": self.format_version,
            "spec": self.spec.to_dict(),
            "model_class": self.model_class,
            "config_digest": self.config_digest,
            "step": self.step,
            "package_version": self.package_version,
            "created": self.created,
            "num_samples": self.num_samples,
            "hidden_size": self.hidden_size,
            "extra": self.extra,
            "control_seeds": list(self.control_seeds),
            "controls_init_scheme": self.controls_init_scheme,
        }

    @classmethod
    def from_metadata(cls, features: torch.Tensor, meta: dict[str, Any],
                      controls: torch.Tensor | None = None) -> Fingerprint:
        """Rebuild a fingerprint from its features and :meth:`metadata` (file or callback state)."""
        return cls(
            features=features, spec=ProbeSpec.from_dict(meta["spec"]), model_class=meta.get("model_class"),
            config_digest=meta.get("config_digest"), step=meta.get("step"),
            package_version=meta.get("package_version", "?"), created=meta.get("created", ""),
            extra=dict(meta.get("extra") or {}), format_version=meta.get("format_version", FORMAT_VERSION),
            controls=controls, control_seeds=tuple(meta.get("control_seeds") or ()) if controls is not None else (),
            controls_init_scheme=meta.get("controls_init_scheme"),
        )

    def check_finite(self, name: str | None = None) -> None:
        """Raise :class:`InputError` unless every feature (and control) value is finite.

        A fingerprint with NaN or Inf compares with nothing (every lineage test of it is
        undetermined, and :meth:`load` refuses its file), so none is ever written. ``name`` names
        the model in the message (default: its class and step).
        """
        for what, values in (("features", self.features), ("fresh-init controls", self.controls)):
            if values is None:
                continue
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                model = name or (f"the {self.model_class or 'model'}"
                                 + (f" at step {self.step}" if self.step is not None else ""))
                nan = int(torch.isnan(values).sum())
                raise InputError(
                    f"{model}: {bad} of {values.numel()} {what} values are not finite ({nan} NaN, {bad - nan} Inf), so "
                    "its fingerprint could not be compared with anything and is not written: the model has diverged "
                    "or has NaN/Inf weights (check the checkpoint, the loss curve, or the dtype it was probed in)"
                )

    def save(self, path: str | os.PathLike, *, screen: bool = False) -> Path:
        """Write the file atomically (a crash never leaves a half-written fingerprint).

        Args:
            path: the file to write.
            screen: also store ``identify``'s screen ranks of the features (a run's reference:
                :mod:`~seedprints_lightning.core.screen`), so ``identify`` screens it without an index.

        Non-finite features are refused (:meth:`check_finite`): nothing is written.
        """
        self.check_finite()
        tensors = {"features": self.features}
        if self.controls is not None:
            tensors["controls"] = self.controls
        metadata = {_META_KEY: json.dumps(self.metadata())}
        made = make_screen(self.features) if screen else None
        if made is not None:
            tensors[SCREEN_TENSOR] = made[0]
            metadata.update(screen_metadata(made[1]))
        return save_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Fingerprint:
        path = Path(path)
        tensors, file_meta = read_safetensors(path, "fingerprint file", detail="truncated or not safetensors: ",
                                              hint="; re-create it with `seedprints fingerprint`")
        raw_meta, features, controls = file_meta.get(_META_KEY), tensors.get("features"), tensors.get("controls")
        if raw_meta is None or features is None:
            raise FingerprintFileError(f"{path} is a safetensors file but not a seedprints fingerprint (no "
                                       f"'{_META_KEY}' metadata or 'features' tensor)")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as exc:
            raise FingerprintFileError(f"{path}: the fingerprint metadata is not valid JSON ({exc})") from exc
        if meta.get("format") != _FORMAT_NAME:
            raise FingerprintFileError(f"{path}: metadata format is {meta.get('format')!r}, expected {_FORMAT_NAME!r}")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise FingerprintFileError(
                f"{path}: fingerprint format version {version!r} is not supported by seedprints-lightning "
                f"{__version__} (reads version {FORMAT_VERSION}); upgrade the package or re-create the file"
            )
        if features.dim() != 2 or list(features.shape) != [meta.get("num_samples"), meta.get("hidden_size")]:
            raise FingerprintFileError(
                f"{path}: the features tensor has shape {list(features.shape)} but the metadata says "
                f"[{meta.get('num_samples')}, {meta.get('hidden_size')}]; the file is inconsistent, re-create it"
            )
        if not torch.isfinite(features).all():
            raise FingerprintFileError(f"{path}: the features contain NaN or Inf; re-create the fingerprint")
        try:
            return cls.from_metadata(features, meta, controls=controls)
        except (InputError, KeyError, TypeError) as exc:
            raise FingerprintFileError(f"{path}: the fingerprint metadata is inconsistent ({exc})") from exc


def fingerprint_model(
    model: nn.Module,
    spec: ProbeSpec | None = None,
    *,
    step: int | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
    extra: dict[str, Any] | None = None,
    num_controls: int = 0,
) -> Fingerprint:
    """Probe ``model`` and wrap the features with their metadata.

    ``num_controls > 0`` also probes that many fresh inits of the model's config (the
    callback's control seeds) and stores their features in the fingerprint, so the file can be
    judged offline against the measured null (:mod:`.verdict`).
    """
    lm = find_causal_lm(model)
    spec = (spec or ProbeSpec()).resolve(lm)
    features = extract_features(lm, spec, batch_size=batch_size, device=device, progress=progress)
    seeds = control_seeds(num_controls)
    controls = probe_controls(lm, spec, seeds, batch_size=batch_size, device=device) if seeds else None
    return Fingerprint(
        features=features, spec=spec, model_class=type(lm).__name__, config_digest=config_digest(lm.config),
        step=step, extra=dict(extra or {}), controls=controls, control_seeds=seeds,
        controls_init_scheme=built_init_scheme(lm) if seeds else None,
    )
