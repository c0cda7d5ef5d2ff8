"""The one place where each face leans on a library's behaviour that the library does not document.

Each face reaches its loop through the library's documented hooks, except in one function each,
kept because the library offers no documented way (the function's docstring says why):

- the Hugging Face face finds the ``Trainer`` that calls its hooks on the call stack
  (:func:`~seedprints_lightning.faces.hf.calling_trainer`), to log through ``trainer.log``;
- the Fabric face opens its chain in torch's process-global optimizer step pre-hook
  (:func:`~seedprints_lightning.faces.fabric.open_before_first_step`): Fabric calls no hook between
  ``setup`` (and the loads after it) and the first step;
- the Lightning face runs a probe inside the strategy's root wrapper by giving the LightningModule
  an instance ``forward`` for one call (:func:`~seedprints_lightning.faces._lightning.call_inside_wrapper`),
  as Lightning's own strategies reach ``training_step``.

These tests fail with a message that names the library, its version and the assumption, so an
upgrade that breaks one of them is caught here and not by a run whose metrics quietly went nowhere.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import make_tiny_lm
from torch import nn

from seedprints_lightning import InputError, ProbeSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=60, length=8)
DATA = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))


def _versions(*names: str) -> str:
    import importlib

    return ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in names)


# ---------------------------------------------------------------------- Hugging Face Trainer
class _TokenData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return len(DATA)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": DATA[index], "labels": DATA[index]}


def test_the_hf_face_finds_the_trainer_that_calls_its_hooks(tmp_path):
    """A real ``Trainer.train()``: every hook the face uses finds this Trainer; a callback it does not hold, none."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from seedprints_lightning.faces.hf import calling_trainer

    stranger = TrainerCallback()  # held by no Trainer: the Trainer on the stack is not its caller

    class Spy(TrainerCallback):
        found: dict[str, tuple[object, object]] = {}

        def _look(self, event: str) -> None:
            self.found[event] = (calling_trainer(self), calling_trainer(stranger))

        def on_train_begin(self, args, state, control, **kwargs):
            self._look("on_train_begin")

        def on_step_end(self, args, state, control, **kwargs):
            self._look("on_step_end")

        def on_save(self, args, state, control, **kwargs):
            self._look("on_save")

        def on_train_end(self, args, state, control, **kwargs):
            self._look("on_train_end")

    spy = Spy()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                             save_strategy="steps", save_steps=1, use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=make_tiny_lm(0).train(), args=args, train_dataset=_TokenData(), callbacks=[spy])
    trainer.train()
    assumption = (f"{_versions('transformers')}: SeedPrintsTrainerCallback finds the Trainer that calls its hooks "
                  "on the call stack (faces/hf.py::calling_trainer assumes a method of the Trainer is a caller of "
                  "CallbackHandler.call_event); it no longer does, so the face's metrics would reach no report_to "
                  "integration. Re-read transformers' trainer.py / trainer_callback.py for a supported way")
    assert sorted(spy.found) == ["on_save", "on_step_end", "on_train_begin", "on_train_end"], assumption
    for event, (found, for_stranger) in spy.found.items():
        assert found is trainer, f"{event}: {assumption}"
        assert for_stranger is None, f"{event}: a Trainer that does not hold the callback was taken for its caller"


def test_outside_a_trainer_no_trainer_is_found():
    from transformers import TrainerCallback

    from seedprints_lightning.faces.hf import calling_trainer

    assert calling_trainer(TrainerCallback()) is None


# ---------------------------------------------------------------------- Lightning Fabric
def _fabric_setup(callback, seed: int = 0):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    model = make_tiny_lm(seed).train()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    return fabric, model, optimizer


def _fabric_step(fabric, model, optimizer, step: int = 0) -> None:
    batch = DATA[(step * 4) % 16:(step * 4) % 16 + 4]
    fabric.backward(model(input_ids=batch, labels=batch).loss)
    optimizer.step()
    optimizer.zero_grad()


def test_a_fabric_optimizer_step_calls_the_global_pre_hook_and_the_face_removes_it(tmp_path):
    from seedprints_lightning import SeedPrintsFabricCallback

    callback = SeedPrintsFabricCallback(every_n_steps=4, probe=SPEC, num_controls=1, save_dir=tmp_path / "sp")
    fabric, model, optimizer = _fabric_setup(callback)
    assert callback._hook is not None and not callback.started
    _fabric_step(fabric, model, optimizer)
    assumption = (f"{_versions('torch', 'lightning')}: the step of an optimizer set up by fabric.setup no longer "
                  "calls torch's global optimizer step pre-hooks (torch.optim.optimizer."
                  "register_optimizer_step_pre_hook) with the torch optimizer that holds the model's parameters; "
                  "SeedPrintsFabricCallback opens its chain there (faces/fabric.py::open_before_first_step)")
    assert callback.started and callback._optimizer is optimizer.optimizer, assumption
    assert callback.current_step == 1 and [h["step"] for h in callback.history] == [1]
    assert callback._hook is None  # removed at the first step of the model's optimizer

    # The hook is gone: another optimizer's step in this process reaches the face no more.
    other = nn.Linear(2, 2)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    seen = []
    callback._before_optimizer_step = seen.append
    other(torch.ones(1, 2)).sum().backward()
    other_optimizer.step()
    assert seen == []
    callback.end()


def test_a_fabric_face_that_never_stepped_is_not_kept_alive_by_its_hook(tmp_path):
    from seedprints_lightning import SeedPrintsFabricCallback

    callback = SeedPrintsFabricCallback(probe=SPEC, num_controls=1, save_dir=tmp_path / "sp")
    fabric, model, optimizer = _fabric_setup(callback)
    assert callback._hook is not None
    alive = weakref.ref(callback)
    del callback, fabric, model, optimizer
    gc.collect()
    assert alive() is None, "the process-global pre-hook keeps a dropped Fabric face (and its model) alive"
    other = nn.Linear(2, 2)  # a later step in the process meets the dead face's hook, which removes itself
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(1, 2)).sum().backward()
    optimizer.step()


def test_a_fabric_face_closed_before_its_first_step_leaves_no_hook(tmp_path):
    from seedprints_lightning import SeedPrintsFabricCallback

    callback = SeedPrintsFabricCallback(probe=SPEC, num_controls=1, save_dir=tmp_path / "sp")
    _fabric_setup(callback)
    callback.close()
    assert callback._hook is None


def test_a_step_of_the_models_optimizer_the_pre_hook_did_not_see_raises(tmp_path):
    """Never an unprobed run that looks probed: the chain could not open before the weights changed."""
    from seedprints_lightning import SeedPrintsFabricCallback

    callback = SeedPrintsFabricCallback(probe=SPEC, num_controls=1, save_dir=tmp_path / "sp")
    fabric, model, optimizer = _fabric_setup(callback)
    callback._hook.remove()  # as if torch no longer called it for this optimizer
    with pytest.raises(InputError, match=r"took a step before the SeedPrints chain opened.*SeedPrintsMonitor"):
        _fabric_step(fabric, model, optimizer)
    assert not callback.started and not callback.history


# ---------------------------------------------------------------------- Lightning Trainer
def _lightning_module():
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x):
            return self.layer(x)

        def training_step(self, x, batch_idx):
            return {"step_ran": True}

    return Module()


class _Wrapper(nn.Module):
    """What FSDP1's ``FullyShardedDataParallel`` and DeepSpeed's engine do on a call: call the wrapped module."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[bool] = []

    def forward(self, *args, **kwargs):
        self.calls.append("forward" in self.inner.__dict__)  # an instance forward routes the call
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("strategy_name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_lightning_routes_its_own_steps_through_the_wrapper_as_the_probe_does(strategy_name):
    """The canary: Lightning reaches ``training_step`` under these strategies by an instance ``forward``, the
    route :func:`call_inside_wrapper` takes for the probe. If Lightning changes it, re-check the probe's route."""
    import pytorch_lightning.strategies as strategies

    if strategy_name == "DeepSpeedStrategy":
        pytest.importorskip("deepspeed")
    strategy = getattr(strategies, strategy_name)()
    module = _lightning_module()
    strategy.connect(module)
    strategy.model = wrapper = _Wrapper(module)
    output = strategy.training_step(torch.ones(1, 3), 0)
    assumption = (f"{_versions('pytorch_lightning')}: {strategy_name}.training_step no longer reaches the "
                  "LightningModule's training_step by setting an instance forward on it and calling the root "
                  "wrapper; SeedPrintsCallback runs its probes inside that wrapper the same way "
                  "(faces/_lightning.py::call_inside_wrapper): re-check that route against this version")
    assert output == {"step_ran": True} and wrapper.calls == [True], assumption


def test_the_probe_runs_inside_the_wrapper_and_the_module_is_left_as_it_was():
    from seedprints_lightning.faces._lightning import call_inside_wrapper

    module = _lightning_module()
    wrapper = _Wrapper(module)
    assert call_inside_wrapper(wrapper, module, lambda: "probed") == "probed"
    assert wrapper.calls == [True] and "forward" not in module.__dict__
    module.forward = own = lambda *a, **k: "own"  # an instance forward of the user's is put back
    assert call_inside_wrapper(wrapper, module, lambda: 7) == 7
    assert module.forward is own


def test_a_wrapper_that_never_calls_the_module_raises_naming_lightning():
    from seedprints_lightning.faces._lightning import call_inside_wrapper

    class Elsewhere(nn.Module):  # a wrapper that routes somewhere else than the module's forward
        def forward(self, *args, **kwargs):
            return torch.zeros(())

    module = _lightning_module()
    with pytest.raises(RuntimeError, match=r"did not call the LightningModule's forward \(pytorch_lightning \d"):
        call_inside_wrapper(Elsewhere(), module, lambda: "probed")
    assert "forward" not in module.__dict__
