"""What a face's checkpoint state holds beside the chain's own (:meth:`CustodyChain.state_dict`).

One place for the keys that the faces write and the offline readers (:mod:`~seedprints_lightning.offline.sources`)
read, so neither imports the other.
"""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["HF_CONFIG_KEY", "HF_TRAINER_STATE_FILE", "LEGACY_STATE_KEY", "MODEL_STATE_KEY", "STEP_STATE_KEY",
           "model_rebuild_info"]

#: Checkpoint key under which a LightningModule stores its model's transformers config
#: (``CausalLMModule.on_save_checkpoint`` does; any module can).
HF_CONFIG_KEY = "hf_config"
#: Key, in a face's checkpoint state, of what rebuilds the model from any module's checkpoint:
#: ``{"hf_config": ..., "state_dict_prefix": ...}`` or ``{"why_not": ...}``.
MODEL_STATE_KEY = "model_rebuild"
#: Key, in a face's checkpoint state, of the optimizer step the state was saved at.
STEP_STATE_KEY = "step"
#: The file in a Hugging Face ``Trainer`` checkpoint directory (``checkpoint-N/``) that holds the
#: ``SeedPrintsTrainerCallback`` state.
HF_TRAINER_STATE_FILE = "seedprints_state.pt"
#: The Lightning ``state_key`` of every ``SeedPrintsCallback`` before it was derived from the
#: callback's arguments: checkpoints written with it still resume and audit.
LEGACY_STATE_KEY = "SeedPrintsCallback"
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def model_rebuild_info(module: torch.nn.Module, lm: torch.nn.Module | None, *, feature_fn: bool) -> dict[str, Any]:
    """What a checkpoint of ``module`` needs to rebuild its transformers model ``lm`` offline.

    The config as plain JSON types and the prefix of ``lm``'s weights in the module's state dict
    (``"net."`` for ``self.net = LlamaForCausalLM(...)``; wrapper segments that sharded strategies
    add to module names are not in a saved state dict, so they are dropped). Without a
    transformers model (a ``feature_fn`` model) it says why the checkpoint cannot be rebuilt.
    """
    if lm is None:
        what = "a feature_fn model" if feature_fn else "a module without a transformers model"
        return {"why_not": f"the run probed {what}, which this package cannot rebuild from a checkpoint: fingerprint "
                           "its features yourself (Fingerprint(features=extract_features(model, spec, forward_fn=...), "
                           "spec=spec).save(...)) and pass that fingerprint file instead of the checkpoint"}
    name = next((n for n, m in module.named_modules() if m is lm), None)
    if name is None:
        return {"why_not": "the transformers model is not a submodule of the LightningModule"}
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return {"hf_config": json.loads(lm.config.to_json_string()), "state_dict_prefix": f"{name}." if name else ""}
