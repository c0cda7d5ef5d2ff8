"""OLMo-core checkpoint directories as offline sources: ``compare``, ``audit`` and ``audit --chain RUN CKPT``.

An OLMo-core checkpoint is the directory ``save_folder/stepN/``: ``model_and_optim/`` (a
``torch.distributed.checkpoint`` of the model and optimizer) and ``train/rank<N>.pt`` (the trainer
state, the ``SeedPrintsOLMoCallback`` state among its callbacks'). :func:`open_olmo_checkpoint` opens
one as a model handle with the interface of :class:`~seedprints_lightning.offline.streaming.ModelHandle`
that the audit uses: the model is rebuilt from its ``TransformerConfig`` (the callback state's, or
``config.json``'s ``"model"``) on the meta device, and probed whole once its ``model.*`` tensors are
read (the optimizer state is never read). Controls are OLMo-core's own init under the control seeds
(:func:`~seedprints_lightning.core.olmo.build_olmo_control`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.controls import ControlSet, control_seeds, preserve_rng_state
from ..core.families import plan_measurement
from ..core.fingerprint import Fingerprint
from ..core.olmo import (
    INIT_OLMO,
    build_olmo_control,
    extract_features_olmo,
    load_olmo_model,
    olmo_checkpoint_config,
    olmo_config_digest,
    read_olmo_checkpoint,
    resolve_olmo_spec,
)
from .streaming import LoadDecision, measurement_of

__all__ = ["OLMoCheckpointHandle", "open_olmo_checkpoint"]


@dataclass
class OLMoCheckpointHandle:
    """An OLMo-core checkpoint directory opened without its weights: config and a meta-device model."""

    source: Any  # sources.Source
    config: Any
    meta: nn.Module
    runtime: Any
    store: Any = None
    why_not_streamed: str | None = ("OLMo-core checkpoints are read whole (the model's tensors of model_and_optim, "
                                    "never the optimizer's)")
    _whole: nn.Module | None = field(default=None, repr=False)

    @property
    def lm_class(self) -> str:
        return type(self.meta).__name__

    def decide(self) -> LoadDecision:
        return LoadDecision("whole", "OLMo-core checkpoint: the model's tensors read whole",
                            getattr(self.runtime, "load", "auto"), note=self.why_not_streamed)

    def whole(self) -> nn.Module:
        if self._whole is None:
            self._whole = load_olmo_model(self.source.path, dtype=self.runtime.dtype,
                                          trust_pickle=self.runtime.trust_pickle)
        return self._whole

    def release(self) -> None:
        self._whole = None

    def embedding_stats(self) -> tuple[float, float]:
        weight = self.whole().embeddings.weight.detach().float()
        return float(weight.mean()), float(weight.std())

    def resolve(self, spec: Any) -> Any:
        model = self.whole() if spec is not None and spec.kind == "embedding" and not spec.is_resolved else self.meta
        return resolve_olmo_spec(spec, model)

    def controls(self, spec: Any, num_controls: int) -> ControlSet:
        """``num_controls`` fresh inits of the checkpoint's config (OLMo-core's init), probed on ``spec``."""
        seeds = control_seeds(num_controls)
        if not seeds:
            return ControlSet.none("no controls (--controls 0): analytic threshold and effect-size margin only")
        features = []
        with preserve_rng_state():
            for seed in seeds:
                control = build_olmo_control(self.config, seed, dtype=self.runtime.dtype, device=self.runtime.device)
                features.append(extract_features_olmo(control, spec, batch_size=self.runtime.batch_size))
                del control
        return ControlSet(torch.stack(features), seeds, spec, olmo_config_digest(self.config), self.lm_class,
                          f"{len(seeds)} fresh inits of {self.source.path}'s OLMo-core config (OLMo-core's "
                          f"init_weights, seeds {seeds[0]}..{seeds[-1]})", init_scheme=INIT_OLMO)

    def fingerprint(self, spec: Any, *, step: int | None, num_controls: int = 0,
                    extra: dict[str, Any] | None = None) -> Any:
        decision = self.decide()
        plan = plan_measurement(self.meta, num_controls=num_controls)
        extra = {**dict(extra or {}), "load": decision.to_dict(), "measurement": measurement_of(plan, decision)}
        model = self.whole()
        try:
            spec = resolve_olmo_spec(spec, model)
            if self.runtime.device is not None:
                model.to(self.runtime.device)
                model._device = None
            features = extract_features_olmo(model, spec, batch_size=self.runtime.batch_size)
        finally:
            self.release()
        evidence = self.controls(spec, num_controls) if num_controls else None
        return Fingerprint(features=features, spec=spec, model_class=self.lm_class,
                           config_digest=olmo_config_digest(self.config), step=step, extra=extra,
                           controls=None if evidence is None else evidence.features,
                           control_seeds=() if evidence is None else evidence.seeds,
                           controls_init_scheme=INIT_OLMO if evidence is not None else None)


def open_olmo_checkpoint(source: Any, runtime: Any) -> OLMoCheckpointHandle:
    """An :class:`OLMoCheckpointHandle` of an OLMo-core checkpoint directory (no weights read yet)."""
    state = read_olmo_checkpoint(source.path, trust_pickle=runtime.trust_pickle).get("seedprints")
    config = olmo_checkpoint_config(source.path, state)
    with preserve_rng_state():
        meta = config.build(init_device="meta")
    return OLMoCheckpointHandle(source=source, config=config, meta=meta, runtime=runtime)
