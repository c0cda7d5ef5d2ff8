"""A Lightning module that pretrains a small Hugging Face causal LM from scratch.

The model is created in ``__init__`` from ``init_seed`` alone (see
:func:`~seedprints_lightning.train.make_causal_lm`), independently of whatever seeded the
global RNG, so the initialisation a SeedPrints certificate records is a function of the
module's hyperparameters. ``self.model`` is the :class:`~transformers.PreTrainedModel`; the
SeedPrints callback finds it as the module's first ``PreTrainedModel`` attribute.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..checks import check_int, check_number
from ..errors import InputError
from ..files import load_lightning_checkpoint
from ..sources import HF_CONFIG_KEY
from .models import MODEL_SIZE_ARGS, make_causal_lm

__all__ = ["CausalLMModule", "load_causal_lm_from_checkpoint"]

Batch = dict[str, torch.Tensor]


class _LinearWarmup:
    """LR multiplier: rises linearly to 1 over ``warmup_steps`` optimizer steps, then stays at 1.

    A class rather than a closure so the scheduler's state (saved in checkpoints) holds plain
    numbers and the checkpoint loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        # step + 1 so the very first update already moves the weights (a factor of 0 would
        # waste a step and leave the post-step weights equal to the initial ones).
        return min(1.0, (step + 1) / self.warmup_steps)


class CausalLMModule(pl.LightningModule):
    """Next-token pretraining of a randomly initialised causal LM.

    Expects batches from :class:`~seedprints_lightning.train.TextDataModule`: ``input_ids`` and
    ``labels`` of shape ``[batch, seq_len]`` with labels *already shifted*. The loss is computed
    here from the logits rather than by passing ``labels`` to the Hugging Face model, which
    would shift them a second time.

    Args:
        arch, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
            max_position_embeddings: Model shape; see :func:`~seedprints_lightning.train.make_config`.
        init_seed: Seed of the weight initialisation (independent of the global seed).
        lr: Peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay, applied to weight matrices and embeddings
            only; norms and biases are not decayed (decaying a norm's gain toward zero only
            fights the normalisation).
        warmup_steps: Optimizer steps of linear warmup; the learning rate is constant after.
        betas: AdamW ``(beta1, beta2)``.
        eps: AdamW epsilon.
        config_overrides: Extra config fields passed to ``make_causal_lm``.
    """

    def __init__(
        self,
        arch: str = "llama",
        vocab_size: int = 256,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 512,
        init_seed: int = 0,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        config_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("eps", eps, low=0.0, low_open=True)
        warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        betas = tuple(betas)  # YAML and jsonargparse may hand over a list
        if len(betas) != 2:
            raise InputError(f"betas must be two numbers in [0, 1), got {betas!r}")
        for i, beta in enumerate(betas):
            check_number(f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        if config_overrides is not None and not isinstance(config_overrides, dict):
            raise InputError(f"config_overrides must be a dict of config fields, got {type(config_overrides).__name__}")

        self.save_hyperparameters()
        sizes = {name: self.hparams[name] for name in MODEL_SIZE_ARGS}
        self.model: PreTrainedModel = make_causal_lm(arch, seed=init_seed, **sizes, **dict(config_overrides or {}))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return next-token logits ``[batch, seq_len, vocab_size]``."""
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _loss(self, batch: Batch) -> torch.Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        if input_ids.shape != labels.shape:
            raise InputError(
                f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape: "
                "labels must be the inputs shifted by one token, as TextDataModule produces"
            )
        logits = self(input_ids)
        # float32 cross-entropy: under bf16/fp16 mixed precision the log-softmax over the
        # vocabulary loses enough precision to bias the loss.
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].size(0))
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The model's transformers config, as plain JSON types: lets the seedprints library (and
        # any tool) rebuild the model from the checkpoint without this training package.
        checkpoint[HF_CONFIG_KEY] = json.loads(self.model.config.to_json_string())

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LinearWarmup(hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


# Hyperparameters every CausalLMModule checkpoint has; their absence means another module.
_REQUIRED_HPARAMS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "init_seed")


def load_causal_lm_from_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> PreTrainedModel:
    """Load a Lightning checkpoint of :class:`CausalLMModule` on CPU and return its model.

    Args:
        path: A ``.ckpt`` written by a Trainer fitting a ``CausalLMModule``.
        trust_pickle: Checkpoints are read with ``torch.load(weights_only=True)``, which refuses
            arbitrary Python objects. Some callbacks store such objects in the checkpoint; for a
            checkpoint you produced yourself, ``True`` allows them. Never set it for files from
            others: unpickling can run arbitrary code.

    Returns:
        The model with the checkpoint's weights, on CPU, in eval mode.

    Raises:
        InputError: If the file is missing, is not a PyTorch checkpoint, holds objects that
            need ``trust_pickle=True``, or is not a checkpoint of ``CausalLMModule``.
    """
    file = Path(path).expanduser()
    checkpoint = load_lightning_checkpoint(file, trust_pickle=trust_pickle, error=InputError)
    hparams = checkpoint.get("hyper_parameters") or {}
    missing = [key for key in _REQUIRED_HPARAMS if key not in hparams]
    state_dict = checkpoint["state_dict"]
    foreign = [key for key in state_dict if not key.startswith("model.")]
    if missing or foreign or not state_dict:
        detail = f"missing hyperparameters {missing}" if missing else f"unexpected weights {foreign[:3]}"
        raise InputError(
            f"{file} is not a checkpoint of CausalLMModule ({detail or 'no weights'}): pass a checkpoint "
            "saved while training CausalLMModule"
        )

    # Keep only constructor arguments: LightningCLI adds bookkeeping keys (_class_path, ...).
    accepted = inspect.signature(CausalLMModule.__init__).parameters
    kwargs = {key: value for key, value in hparams.items() if key in accepted and key != "self"}
    try:
        module = CausalLMModule(**kwargs)
        module.load_state_dict(state_dict, strict=True)
    except (RuntimeError, InputError) as err:
        raise InputError(f"{file} does not match the CausalLMModule its hyperparameters describe: {err}") from err
    return module.model.eval()
