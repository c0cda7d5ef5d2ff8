"""Tests of CausalLMModule: a short real fit, checkpoints, optimizer setup and errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from transformers import PreTrainedModel

from seedprints_lightning.core.errors import InputError
from seedprints_lightning.train import CausalLMModule, TextDataModule, load_causal_lm_from_checkpoint

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4}


@pytest.fixture()
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TextDataModule:
    monkeypatch.setenv("SEEDPRINTS_CACHE", str(tmp_path / "cache"))
    return TextDataModule(corpus="prose", corpus_max_bytes=30_000, seq_len=32, batch_size=4, val_fraction=0.1)


def _trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    options = {
        "max_steps": 5,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        **kwargs,
    }
    return pl.Trainer(**options)  # type: ignore[arg-type]


def test_model_is_a_pretrained_model_built_from_init_seed() -> None:
    a, b = CausalLMModule(init_seed=4, **TINY), CausalLMModule(init_seed=4, **TINY)
    assert isinstance(a.model, PreTrainedModel)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert a.hparams.init_seed == 4 and a.hparams.hidden_size == 32


def test_initial_loss_is_near_uniform() -> None:
    # At initialisation the logits are near zero, so the loss is close to ln(vocab); a loss far
    # from it would mean labels are misaligned or the loss is computed over the wrong axis.
    module = CausalLMModule(**TINY)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = module._loss({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})  # noqa: SLF001
    assert abs(loss.item() - math.log(256)) < 0.2


def test_labels_are_not_shifted_twice() -> None:
    module = CausalLMModule(**TINY)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    logits = module(inputs)
    expected = torch.nn.functional.cross_entropy(logits[0], labels[0])
    assert torch.allclose(module._loss({"input_ids": inputs, "labels": labels}), expected)  # noqa: SLF001
    # HF's own loss shifts again: it must differ from ours on the same tensors.
    hf = module.model(input_ids=inputs, labels=labels).loss
    assert not torch.allclose(hf, expected)


def test_fit_trains_and_checkpoint_round_trips(tmp_path: Path, data: TextDataModule) -> None:
    module = CausalLMModule(lr=1e-2, warmup_steps=2, **TINY)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = _trainer(tmp_path, val_check_interval=5, limit_val_batches=2)
    trainer.fit(module, datamodule=data)

    assert trainer.global_step == 5
    train_loss = trainer.callback_metrics["train/loss"]
    val_loss = trainer.callback_metrics["val/loss"]
    assert torch.isfinite(train_loss) and torch.isfinite(val_loss)
    final = module.model.state_dict()
    changed = [k for k in initial if not torch.equal(initial[k], final[k])]
    assert len(changed) == len(initial), f"unchanged parameters: {set(initial) - set(changed)}"

    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_causal_lm_from_checkpoint(path)
    assert isinstance(loaded, PreTrainedModel) and not loaded.training
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == final.keys()
    assert all(torch.equal(loaded_state[k], final[k].cpu()) for k in final)


def test_optimizer_warmup_and_decay_groups() -> None:
    module = CausalLMModule(lr=1e-3, weight_decay=0.1, warmup_steps=4, **TINY)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
    assert decays == [0.0, 0.1]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0, got -0.1"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\] must be a number in \[0, 1\), got 1.0"),
        ({"arch": "rwkv"}, r"arch must be one of 'llama', 'qwen2', 'gpt2' \(case-insensitive\), got 'rwkv'"),
        ({"config_overrides": {"no_such_field": 1}}, "unknown LlamaConfig field"),
    ],
)
def test_constructor_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        CausalLMModule(**{**TINY, **kwargs})


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_causal_lm_from_checkpoint(tmp_path / "missing.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        load_causal_lm_from_checkpoint(garbage)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}, "hyper_parameters": {"units": 2}}, other)
    with pytest.raises(InputError, match="not a checkpoint of CausalLMModule.*missing hyperparameters"):
        load_causal_lm_from_checkpoint(other)
    mismatched = tmp_path / "mismatched.ckpt"
    module = CausalLMModule(**TINY)
    state = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {**dict(module.hparams), "hidden_size": 64}}, mismatched)
    with pytest.raises(InputError, match="does not match"):
        load_causal_lm_from_checkpoint(mismatched)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams), "extra": Path("x")}, unsafe)
    with pytest.raises(InputError, match="trust_pickle=True"):
        load_causal_lm_from_checkpoint(unsafe)
    assert isinstance(load_causal_lm_from_checkpoint(unsafe, trust_pickle=True), PreTrainedModel)


def test_module_takes_make_configs_size_arguments_with_its_defaults() -> None:
    # CausalLMModule spells the size arguments out for LightningCLI and hands them through by
    # name: a size added to make_config, or a default changed there, must show up here too.
    import inspect

    from seedprints_lightning.train.models import MODEL_SIZE_ARGS, make_config

    config_params = inspect.signature(make_config).parameters
    module_params = inspect.signature(CausalLMModule).parameters
    keyword_sizes = [n for n, p in config_params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert tuple(keyword_sizes) == MODEL_SIZE_ARGS
    for name in MODEL_SIZE_ARGS:
        assert module_params[name].default == config_params[name].default, name
    module = CausalLMModule(hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, vocab_size=100)
    config = module.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (48, 3, 6)
    assert (config.num_key_value_heads, config.vocab_size) == (2, 100)


def _rates(module: CausalLMModule, steps: int) -> list[float]:
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_schedule_warms_up_then_decays_to_the_minimum() -> None:
    module = CausalLMModule(lr=1e-3, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1, decay_steps=10, **TINY)
    rates = _rates(module, 12)
    assert rates[:2] == pytest.approx([5e-4, 1e-3])
    assert rates[2] == pytest.approx(1e-3)  # the decay starts where the warmup ends
    assert rates[6] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway from step 2 to step 10
    assert rates[10:] == pytest.approx([1e-4, 1e-4])  # the minimum at decay_steps, and after it
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))


def test_wsd_schedule_is_stable_then_decays_linearly() -> None:
    module = CausalLMModule(lr=1e-3, warmup_steps=0, lr_schedule="wsd", min_lr_ratio=0.0, decay_steps=10,
                            wsd_decay_fraction=0.2, **TINY)
    rates = _rates(module, 11)
    assert rates[:8] == pytest.approx([1e-3] * 8)
    assert rates[8:] == pytest.approx([1e-3, 5e-4, 0.0])


def test_a_decaying_schedule_needs_its_length() -> None:
    module = CausalLMModule(lr_schedule="cosine", **TINY)  # no decay_steps and no Trainer
    with pytest.raises(InputError, match="lr_schedule='cosine' decays over the run: give decay_steps"):
        module.configure_optimizers()
    with pytest.raises(InputError, match="lr_schedule must be one of"):
        CausalLMModule(lr_schedule="linear", **TINY)
    with pytest.raises(InputError, match="min_lr_ratio"):
        CausalLMModule(lr_schedule="cosine", min_lr_ratio=1.5, **TINY)
