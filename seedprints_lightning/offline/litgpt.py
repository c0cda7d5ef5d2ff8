"""LitGPT checkpoints offline: ``lit_model.pth`` rebuilt into LitGPT's ``GPT`` and fingerprinted, with no user code.

A checkpoint is a LitGPT one when its SeedPrints state records the ``Config``
(:data:`~seedprints_lightning.core.litgpt.LITGPT_CONFIG_KEY`, what ``SeedPrintsLitGPTCallback`` saves), or
when it holds a GPT's weights (``model``, or the raw state dict ``litgpt download``/``convert`` write) and
LitGPT's ``model_config.yaml`` lies beside it. :func:`~seedprints_lightning.offline.sources.fingerprint_source`
asks :func:`fingerprint_litgpt_checkpoint` first, so ``fingerprint``, ``audit``, ``audit --chain RUN CKPT``
and ``identify`` read them. The model is loaded whole (the layer-by-layer path splits transformers models only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.controls import control_seeds
from ..core.errors import IncompatibleFingerprintsError, InputError, SourceError
from ..core.families import plan_measurement
from ..core.fingerprint import Fingerprint
from ..core.litgpt import (
    INIT_LITGPT,
    LITGPT_CONFIG_FILE,
    LITGPT_CONFIG_KEY,
    build_litgpt_control,
    litgpt_config_digest,
    litgpt_features,
    resolve_litgpt_spec,
)
from ..core.probes import ProbeSpec, extract_features
from ..core.state import MODEL_STATE_KEY
from .sources import seedprints_state

__all__ = ["fingerprint_litgpt_checkpoint", "litgpt_checkpoint_rebuild", "load_litgpt_checkpoint"]


def litgpt_config_from_dict(data: dict[str, Any], where: str) -> Any:
    """``litgpt.Config(**data)``, or :class:`SourceError` naming ``where``."""
    try:
        from litgpt.config import Config
    except ImportError as exc:
        raise SourceError(f"{where} is a LitGPT checkpoint: install litgpt to rebuild it "
                          "(pip install 'seedprints-lightning[litgpt]')") from exc
    try:
        return Config(**data)
    except Exception as exc:  # a Config of another LitGPT version: unknown or missing fields
        raise SourceError(f"{where}: its LitGPT config is not readable by the installed litgpt "
                          f"({type(exc).__name__}: {exc})") from exc


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def litgpt_checkpoint_rebuild(checkpoint: dict[str, Any], path: Path) -> tuple[dict[str, Any], str] | None:
    """``(LitGPT config dict, the GPT's prefix in the model's state dict)`` of a LitGPT checkpoint, or ``None``.

    The config the face's state recorded, else ``model_config.yaml`` beside the file (LitGPT
    writes it with every ``lit_model.pth``) when the checkpoint holds a GPT's weights (``model``,
    or the raw state dict ``litgpt download``/``convert`` writes).
    """
    rebuild = (seedprints_state(checkpoint) or {}).get(MODEL_STATE_KEY)
    if isinstance(rebuild, dict) and isinstance(rebuild.get(LITGPT_CONFIG_KEY), dict):
        return dict(rebuild[LITGPT_CONFIG_KEY]), str(rebuild.get("state_dict_prefix", ""))
    config_file = Path(path).parent / LITGPT_CONFIG_FILE
    weights = checkpoint.get("model") if _tensor_dict(checkpoint.get("model")) else checkpoint
    if not config_file.is_file() or not _tensor_dict(weights) or "transformer.wte.weight" not in weights:
        return None
    import yaml

    try:
        data = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SourceError(f"{config_file} (the LitGPT config of {path}) is not readable YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{config_file} (the LitGPT config of {path}) is not a mapping of Config fields")
    return data, ""


def _read_checkpoint(path: Path, trust_pickle: bool) -> dict[str, Any] | None:
    """The checkpoint's dict, memory-mapped, or ``None`` when it cannot be read (the other readers say why).

    Not :func:`~seedprints_lightning.core.files.load_lightning_checkpoint`: it refuses a file with neither a
    ``state_dict`` nor a SeedPrints state, which LitGPT checkpoints saved without SeedPrints are. Read with
    ``weights_only=True`` unless ``trust_pickle``, as every reader here.
    """
    import zipfile

    if not zipfile.is_zipfile(path):
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except Exception as exc:
        if (path.parent / LITGPT_CONFIG_FILE).is_file() and not trust_pickle:
            raise SourceError(
                f"{path} (a LitGPT checkpoint: {LITGPT_CONFIG_FILE} lies beside it) holds objects that "
                f"torch.load(weights_only=True) refuses ({type(exc).__name__}: {str(exc)[:200]}); pass --trust-pickle "
                "if you trust the file (unpickling can run code), e.g. a pretrain run whose train dataloader is "
                "not stateful") from exc
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def load_litgpt_checkpoint(path: Path, *, trust_pickle: bool = False,
                           dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """The GPT a LitGPT checkpoint holds, rebuilt on the CPU in ``dtype`` (eval mode), or ``None`` if it is not one."""
    checkpoint = _read_checkpoint(Path(path), trust_pickle)
    found = None if checkpoint is None else litgpt_checkpoint_rebuild(checkpoint, path)
    if found is None:
        return None
    data, prefix = found
    config = litgpt_config_from_dict(data, str(path))
    # The raw state dict itself, else pretrain's "model" entry, else any other dict of tensors (a user's key).
    model_entry = checkpoint.get("model")
    candidates = [checkpoint] if _tensor_dict(checkpoint) else [model_entry] if _tensor_dict(model_entry) else []
    candidates += [value for value in checkpoint.values() if _tensor_dict(value) and value is not model_entry]
    weights = next((c for c in candidates if any(key.startswith(prefix) for key in c)), {})
    weights = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
    from litgpt.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    try:
        model.load_state_dict(weights, strict=True)
    except Exception as exc:
        raise SourceError(f"{path}: the weights do not match the LitGPT Config it records "
                          f"({type(exc).__name__}: {exc})") from exc
    model.reset_parameters()  # GPT's own: the rope cache (not in the state dict)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def fingerprint_litgpt_checkpoint(path: Path, spec: ProbeSpec | None, *, step: int | None, runtime: Any,
                                  num_controls: int = 0, extra: dict[str, Any] | None = None) -> Any:
    """Fingerprint a LitGPT checkpoint (``None`` when ``path`` is not one): the GPT rebuilt whole, then probed.

    Controls are :func:`build_litgpt_control` of the checkpoint's config. ``extra["load"]`` says the
    model was loaded whole (the layer-by-layer path reads transformers models only).
    """
    model = load_litgpt_checkpoint(path, trust_pickle=runtime.trust_pickle, dtype=runtime.dtype)
    if model is None:
        return None
    if step is None:  # no SeedPrints state: LitGPT's own optimizer-step count (pretrain.py's "step_count")
        count = (_read_checkpoint(Path(path), runtime.trust_pickle) or {}).get("step_count")
        step = count if isinstance(count, int) and not isinstance(count, bool) else None
    requested = getattr(runtime, "load", "auto")
    note = None if requested != "streamed" else "LitGPT checkpoints are read whole: --load streamed is not honoured"
    load = {"path": "whole", "reason": "LitGPT checkpoint: rebuilt whole from its Config", "requested": requested,
            "honoured": requested in ("auto", "whole"), "note": note}
    plan = plan_measurement(model, num_controls=num_controls)
    measurement = {**plan.to_dict(), "reason": f"{plan.reason} ({load['reason']})"}
    try:
        resolved = resolve_litgpt_spec(spec, model)
    except InputError as exc:
        raise IncompatibleFingerprintsError(f"{path} cannot be probed with this probe spec: {exc}") from exc
    if spec is not None and spec.is_resolved and resolved != spec:
        raise IncompatibleFingerprintsError(f"{path} cannot be probed with this probe spec")
    device = runtime.device
    if device is not None:
        model.to(device)
    features = extract_features(model, resolved, batch_size=runtime.batch_size, progress=runtime.progress,
                                forward_fn=lambda batch: litgpt_features(model, batch))
    seeds = control_seeds(num_controls)
    controls = None
    if seeds:
        controls = torch.stack([
            extract_features(control, resolved, batch_size=runtime.batch_size,
                             forward_fn=lambda batch, control=control: litgpt_features(control, batch))
            for control in (build_litgpt_control(model.config, seed, dtype=runtime.dtype, device=device)
                            for seed in seeds)])
    return Fingerprint(features=features, spec=resolved, model_class=type(model).__name__,
                       config_digest=litgpt_config_digest(model.config), step=step,
                       extra={**dict(extra or {}), "load": load, "measurement": measurement}, controls=controls,
                       control_seeds=seeds,
                       controls_init_scheme=INIT_LITGPT if seeds else None)
