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
import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..core.checks import check_choice, check_int, check_number
from ..core.errors import InputError
from ..core.files import load_lightning_checkpoint
from ..core.state import HF_CONFIG_KEY
from .models import MODEL_SIZE_ARGS, make_causal_lm

__all__ = ["CausalLMModule", "load_causal_lm_from_checkpoint"]

Batch = dict[str, torch.Tensor]


LR_SCHEDULES = ("constant", "cosine", "wsd")


class _LRSchedule:
    """LR multiplier per optimizer step: linear warmup, then constant, cosine or warmup-stable-decay.

    * ``constant``: 1 after the warmup;
    * ``cosine``: from 1 after the warmup down to ``min_lr_ratio`` at ``total_steps`` (then flat);
    * ``wsd``: 1 until the last ``decay_fraction`` of ``total_steps``, then linearly down to
      ``min_lr_ratio`` at ``total_steps``.

    A class rather than a closure so the scheduler's state (saved in checkpoints) holds plain
    numbers and the checkpoint loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, warmup_steps: int, kind: str = "constant", total_steps: int = 0, min_lr_ratio: float = 0.1,
                 decay_fraction: float = 0.2) -> None:
        self.warmup_steps, self.kind, self.total_steps = warmup_steps, kind, total_steps
        self.min_lr_ratio, self.decay_fraction = min_lr_ratio, decay_fraction

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            # step + 1 so the very first update already moves the weights (a factor of 0 would
            # waste a step and leave the post-step weights equal to the initial ones).
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        low, total = self.min_lr_ratio, max(self.total_steps, 1)
        if self.kind == "cosine":
            span = max(total - self.warmup_steps, 1)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
        decay_start = total - self.decay_fraction * total
        if step < decay_start:
            return 1.0
        return max(low, 1.0 - (1.0 - low) * (step - decay_start) / max(total - decay_start, 1.0))


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
        warmup_steps: Optimizer steps of linear warmup.
        lr_schedule: After the warmup: ``"constant"`` (default), ``"cosine"`` (down to
            ``min_lr_ratio * lr`` at ``decay_steps``) or ``"wsd"`` (warmup-stable-decay: constant,
            then a linear decay to ``min_lr_ratio * lr`` over the last ``wsd_decay_fraction`` of
            ``decay_steps``), as production pretraining recipes use.
        min_lr_ratio: The final learning rate as a fraction of ``lr`` (cosine, wsd).
        decay_steps: Optimizer steps the decay spans; ``None`` takes the Trainer's
            ``estimated_stepping_batches`` (``max_steps``).
        wsd_decay_fraction: The decayed fraction of ``decay_steps`` under ``"wsd"``.
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
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.1,
        decay_steps: int | None = None,
        wsd_decay_fraction: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        config_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("eps", eps, low=0.0, low_open=True)
        warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        check_number("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0, hint="the final lr / lr")
        if decay_steps is not None:
            check_int("decay_steps", decay_steps, low=1, hint="optimizer steps the decay spans; None = max_steps")
        check_number("wsd_decay_fraction", wsd_decay_fraction, low=0.0, high=1.0, low_open=True)
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
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LRSchedule(
            hp.warmup_steps, hp.lr_schedule, self._decay_steps(), hp.min_lr_ratio, hp.wsd_decay_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _decay_steps(self) -> int:
        hp = self.hparams
        if hp.lr_schedule == "constant" or hp.decay_steps is not None:
            return int(hp.decay_steps or 0)
        try:
            total = self.trainer.estimated_stepping_batches
        except RuntimeError:  # not attached to a Trainer
            total = math.inf
        if not math.isfinite(total):
            raise InputError(f"lr_schedule={hp.lr_schedule!r} decays over the run: give decay_steps=N, or fit with a "
                             "Trainer whose max_steps (or max_epochs with a sized loader) bounds the run")
        return int(total)


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
