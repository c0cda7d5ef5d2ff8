"""SeedPrintsCallback in real (tiny, CPU) Lightning fits."""

from __future__ import annotations

import io
import math
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_tiny_lm
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from seedprints_lightning import (
    Fingerprint,
    IdentityLostError,
    InputError,
    ModelNotFoundError,
    ProbeSpec,
    SeedPrintsCallback,
    extract_features,
    fingerprint_model,
    verify_chain,
)
from seedprints_lightning.core.controls import preserve_rng_state
from seedprints_lightning.faces._lightning import measure_features
from seedprints_lightning.faces.lightning import METRIC_TAGS, IdentityWarning

VOCAB = 64
SPEC = ProbeSpec(kind="token", num_samples=200, length=8)

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:pytorch_lightning", "ignore::UserWarning:lightning", "ignore::UserWarning:lightning_fabric",
    "ignore:.*does not have many workers.*", "ignore:.*LitLogger.*",
)


# ------------------------------------------------------------------ tiny models and data


_MODULE_CLASSES: dict[str, type] = {}


def module_class(package=pl) -> type:
    """The tiny LightningModule, built on ``package.LightningModule`` (two import names)."""
    key = package.__name__
    if key not in _MODULE_CLASSES:
        class TinyLM(package.LightningModule):
            def __init__(self, arch: str = "llama", seed: int = 0, lr: float = 3e-3, dropout: float = 0.0):
                super().__init__()
                # conftest's tiny model (vocab VOCAB), in train mode: Lightning keeps a submodule's mode.
                self.model = make_tiny_lm(seed, arch, vocab_size=VOCAB, attention_dropout=dropout).train()
                self.lr = lr

            def training_step(self, batch, batch_idx):
                ids = batch[0]
                return self.model(input_ids=ids, labels=ids).loss

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=self.lr)

        _MODULE_CLASSES[key] = TinyLM
    return _MODULE_CLASSES[key]


def TinyLM(*args, **kwargs):
    return module_class(pl)(*args, **kwargs)


def loader(n: int = 240, length: int = 16, batch_size: int = 8, shuffle: bool = True) -> torch.utils.data.DataLoader:
    # The shuffle has its own seeded generator: a fit's data order, and so its figures, never depend on
    # what earlier tests left in the global RNG (the swap tests' margins are measured per data order).
    data = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(1) if shuffle else None)


def make_trainer(root: Path, *, package=pl, logger=False, callbacks=(), **kwargs):
    args = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=logger,
                enable_checkpointing=False, default_root_dir=str(root), callbacks=list(callbacks))
    args.update(kwargs)
    return package.Trainer(**args)


class SwapWeights(pl.Callback):
    """At optimizer step ``at``, overwrite the model with a different-seed init."""

    def __init__(self, at: int, seed: int = 7, arch: str = "llama"):
        self.at, self.seed, self.arch, self.done = at, seed, arch, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at and not self.done:
            self.done = True
            pl_module.model.load_state_dict(make_tiny_lm(self.seed, self.arch, vocab_size=VOCAB).state_dict())


def callback(**kwargs) -> SeedPrintsCallback:
    # A fixed interval keeps the probe steps of these tests exact; the adaptive schedule (the
    # default) has its own tests below.
    args = dict(every_n_steps=10, probe=SPEC, num_controls=3, adaptive_schedule=False)
    args.update(kwargs)
    return SeedPrintsCallback(**args)


# ------------------------------------------------------------------ constructor


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_steps": 0}, "every_n_steps"),
    ({"every_n_steps": 2.5}, "every_n_steps"),
    ({"every_n_steps": True}, "every_n_steps"),
    ({"probe": "token"}, "probe must be a"),
    ({"alpha": 0}, "alpha"),
    ({"alpha": 1.0}, "alpha"),
    ({"alpha": "0.01"}, "alpha"),
    ({"patience": 0}, "patience"),
    ({"on_identity_lost": "crash"}, "on_identity_lost"),
    ({"num_controls": -1}, "num_controls"),
    ({"num_controls": 1000}, "num_controls"),
    ({"birth_z_margin": -0.5}, "birth_z_margin"),
    ({"link_z_margin": float("inf")}, "link_z_margin"),
    ({"link_tau_margin": -0.1}, "link_tau_margin"),
    ({"link_tau_margin": True}, "link_tau_margin"),
    ({"fail_on": "loss"}, "fail_on"),
    ({"adaptive_schedule": "yes"}, "adaptive_schedule"),
    ({"control_factory": 3}, "control_factory must be callable"),
    ({"reference": 3}, "reference must be"),
    ({"feature_fn": "abc", "num_controls": 0}, "feature_fn must be callable"),
    ({"feature_fn": lambda m, b: b, "num_controls": 2}, "control_factory"),
    ({"save_dir": 5}, "save_dir"),
    ({"probe_batch_size": 0}, "probe_batch_size"),
    ({"identity_ratio": 0.0}, "identity_ratio"),
    ({"identity_ratio": 1.5}, "identity_ratio"),
    ({"identity_mode": "both"}, "identity_mode"),
])
def test_constructor_validates(kwargs, match):
    with pytest.raises(InputError, match=match):
        SeedPrintsCallback(**kwargs)


def test_constructor_reference_path_and_probe_conflict(tmp_path):
    from seedprints_lightning.core.errors import FingerprintFileError

    with pytest.raises(FingerprintFileError, match="does not exist"):
        SeedPrintsCallback(reference=tmp_path / "missing.safetensors")
    fp = fingerprint_model(make_tiny_lm(0), ProbeSpec(num_samples=20, length=4))
    path = fp.save(tmp_path / "parent.safetensors")
    cb = SeedPrintsCallback(reference=path)
    assert cb.reference_source == "explicit" and torch.equal(cb.reference.features, fp.features)
    with pytest.raises(InputError, match="leave probe=None"):
        SeedPrintsCallback(reference=path, probe=ProbeSpec(num_samples=30))


def test_no_model_found_raises_at_fit_start(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0].float()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 4)), batch_size=4)
    with pytest.raises(ModelNotFoundError, match="feature_fn"):
        make_trainer(tmp_path, max_steps=2, callbacks=[callback()]).fit(Plain(), data)


def test_model_built_in_configure_model(tmp_path):
    class Late(module_class(pl)):
        def __init__(self):
            pl.LightningModule.__init__(self)
            self.lr, self.model = 3e-3, None

        def configure_model(self):
            if self.model is None:
                self.model = make_tiny_lm(0, vocab_size=VOCAB).train()

    cb = callback(every_n_steps=3, num_controls=0, probe=ProbeSpec(num_samples=60, length=8))
    make_trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(Late(), loader())
    assert [(h["step"], h["related"]) for h in cb.history] == [(3, True)]


def test_incompatible_explicit_reference_raises_at_fit_start(tmp_path):
    wide = fingerprint_model(make_tiny_lm(0, hidden_size=48, intermediate_size=96), ProbeSpec(num_samples=20, length=4))
    with pytest.raises(InputError, match="hidden size is 32"):
        make_trainer(tmp_path, max_steps=2, callbacks=[callback(reference=wide, probe=None)]).fit(TinyLM(), loader())


# ------------------------------------------------------------------ identity kept, logs


def read_scalars(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_identity_kept_llama_logs_tags_and_files(tmp_path):
    cb = callback()
    logger = TensorBoardLogger(str(tmp_path), name="logs")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="seedprints/related", mode="max", every_n_train_steps=10)
    trainer = make_trainer(tmp_path, logger=logger, max_steps=30, callbacks=[cb, ckpt], enable_checkpointing=True)
    module = TinyLM("llama", seed=0, lr=3e-3)
    init = make_tiny_lm(0, vocab_size=VOCAB).model.embed_tokens.weight.clone()
    trainer.fit(module, loader())
    assert not torch.equal(module.model.model.embed_tokens.weight, init)  # training moved the weights

    assert [h["step"] for h in cb.history] == [10, 20, 30]
    assert [h["related"] for h in cb.history] == [True, True, True]
    assert all(h["link_z"] > h["link_threshold"] for h in cb.history)
    assert [h["anchor_step"] for h in cb.history] == [0, 10, 20]  # each held link becomes the next anchor
    assert cb.last_verdict.related is True and cb.reference_source == "step0" and cb.chain.failures.consecutive == 0
    for tag in METRIC_TAGS:
        value = trainer.callback_metrics[tag]
        assert isinstance(value, torch.Tensor) and math.isfinite(float(value))
    assert float(trainer.callback_metrics["seedprints/related"]) == 1.0
    assert ckpt.best_model_path  # ModelCheckpoint could monitor a seedprints tag

    log_dir = Path(logger.log_dir)
    seedprints_dir = log_dir / "seedprints"
    reference = Fingerprint.load(seedprints_dir / "reference.safetensors")
    assert reference.step == 0 and reference.spec.vocab_size == VOCAB
    assert torch.equal(reference.features, cb.reference.features)
    assert (seedprints_dir / "controls.safetensors").is_file()

    acc = read_scalars(log_dir)
    for tag in METRIC_TAGS:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [10, 20, 30], tag
        assert all(math.isfinite(e.value) for e in events), tag
    assert [e.value for e in acc.Scalars("seedprints/related")] == [1.0, 1.0, 1.0]
    z = [e.value for e in acc.Scalars("seedprints/z")]
    assert z == pytest.approx([h["z"] for h in cb.history], rel=1e-6)

    from tensorboard.plugins.custom_scalar import layout_pb2

    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    proto = acc.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    charts = {chart.title: set(chart.multiline.tag) for chart in layout.category[0].chart}
    assert {r"^seedprints/z$", r"^seedprints/control_z_max$", r"^seedprints/threshold$"} <= set().union(
        *charts.values()
    )
    assert {r"^seedprints/link_z$", r"^seedprints/link_threshold$"} in charts.values()

    # The custody ledger: one record per probe, and it re-verifies offline.
    from seedprints_lightning.core.verify import verify_chain

    audit = verify_chain(seedprints_dir)
    assert audit.ok, audit.problems
    # One record per probe, and one per checkpoint save binding its weights (ModelCheckpoint saved at step 10
    # only: related stayed 1, which never improves on the best).
    probes = [(r, v) for r, v in zip(audit.records, audit.recomputed) if r.get("kind") != "save"]
    assert [r["step"] for r, _ in probes] == [10, 20, 30]
    assert [r["step"] for r in audit.records if r.get("kind") == "save"] == [10]
    assert [v.link.z for _, v in probes] == pytest.approx([h["link_z"] for h in cb.history], rel=1e-6)


def test_identity_kept_qwen2(tmp_path, capsys):
    cb = callback()
    module = module_class(pl)("qwen2", seed=3, lr=3e-3)
    make_trainer(tmp_path, max_steps=30, callbacks=[cb]).fit(module, loader())
    # The step-0 work shows progress, one rank-zero line per control (minutes for a large model).
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[seedprints] control")]
    assert [line.split(" probed")[0] for line in progress] == [
        f"[seedprints] control {i}/3 (init seed {1_000_003 + i - 1}, streamed block by block)" for i in (1, 2, 3)]
    assert [h["step"] for h in cb.history] == [10, 20, 30]
    assert all(h["related"] is True for h in cb.history)
    assert cb.reference.model_class == "Qwen2ForCausalLM"


# ------------------------------------------------------------------ swapped weights


def test_default_callback_probes_densely_and_warns_after_two_failed_links(tmp_path):
    """What the defaults do (only the probe is shrunk): the adaptive schedule probes every step at
    first, 4 fresh-init controls, alpha 0.01 with the birth and custody rules, the custody link as the
    verdict, and a warning (not a stop) from the second consecutive failure on."""
    from seedprints_lightning.core.schedule import ProbeSchedule
    from seedprints_lightning.core.stats import z_threshold
    from seedprints_lightning.core.verdict import BIRTH_RULE, CUSTODY_RULE

    cb = SeedPrintsCallback(probe=SPEC)
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[cb, SwapWeights(at=5)])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(TinyLM(), loader())
    steps = [h["step"] for h in cb.history]
    assert steps == list(range(1, 11))  # dense start; failed links keep the interval at 1
    # Each probe fell where the default schedule put it after the previous probe's link.
    schedule, (first, interval) = ProbeSchedule(), ProbeSchedule().first()
    assert first == steps[0]
    for previous, current in zip(cb.history, cb.history[1:]):
        expected, interval = schedule.after(previous["step"], interval, previous["link_related"],
                                            previous["link_z"] / previous["link_threshold"])
        assert current["step"] == previous["next_step"] == expected

    # The swap after step 5 is flagged at the first probe after it; a failed link never becomes the anchor.
    assert [h["related"] for h in cb.history] == [True] * 5 + [False] * 5
    assert [h["related"] for h in cb.history] == [h["link_related"] for h in cb.history]  # fail_on="custody"
    assert [h["anchor_step"] for h in cb.history] == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5]
    assert [h["consecutive_failures"] for h in cb.history] == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
    lost = [str(w.message) for w in record if w.category is IdentityWarning and "lost its lineage" in str(w.message)]
    assert [m.split(" at step ")[1].split(" ")[0] for m in lost] == ["7", "8", "9", "10"]  # patience 2, then each
    assert "custody link from step 5" in lost[0] and "controls z [" in lost[0]
    assert trainer.global_step == 10 and not trainer.should_stop  # warned, not stopped

    # Four controls, tested at every probe; the verdicts used alpha 0.01 and the documented rules.
    assert cb.chain.control_features.shape == (4, SPEC.num_samples, 32)
    assert all(len(h["control_z"]) == 4 and h["control_z_max"] == max(h["control_z"]) for h in cb.history)
    assert (cb.last_verdict.birth.rule, cb.last_verdict.link.rule) == (BIRTH_RULE, CUSTODY_RULE)
    for h in cb.history:
        assert h["threshold"] == pytest.approx(max(z_threshold(0.01), h["control_z_max"] + BIRTH_RULE.z_margin),
                                               abs=1e-3)
        assert h["link_threshold"] >= z_threshold(0.01)


def test_swap_with_raise(tmp_path):
    # Margin, measured over 30 data orders at these sizes (n = 200, D = 32): the swapped-in model's link z
    # at steps 15 and 20 stayed <= 4.1 against thresholds >= 5.0, while the own links stood at z 65-90.
    cb = callback(every_n_steps=5, patience=2, on_identity_lost="raise")
    trainer = make_trainer(tmp_path, max_steps=40, callbacks=[cb, SwapWeights(at=12)])
    with pytest.raises(IdentityLostError, match=r"at step 20 \(2 consecutive.*custody link from step 10 z="):
        trainer.fit(TinyLM(), loader())
    assert [(h["step"], h["related"]) for h in cb.history] == [(5, True), (10, True), (15, False), (20, False)]


def test_swap_with_stop(tmp_path):
    cb = callback(patience=1, on_identity_lost="stop", num_controls=1)
    trainer = make_trainer(tmp_path, max_steps=60, callbacks=[cb, SwapWeights(at=12)])
    with pytest.warns(IdentityWarning, match="Stopping the run"):
        trainer.fit(TinyLM(), loader())
    assert trainer.should_stop and trainer.global_step == 20 < 60
    assert trainer.state.status == "finished"
    assert cb.history[-1]["step"] == 20 and cb.history[-1]["related"] is False


# ------------------------------------------------------------------ resume


def _fit_and_save(root: Path, seed: int, steps: int, save_dir: Path) -> tuple[SeedPrintsCallback, Path]:
    cb = callback(save_dir=save_dir, num_controls=2)
    trainer = make_trainer(root, max_steps=steps, callbacks=[cb])
    trainer.fit(TinyLM(seed=seed), loader())
    path = root / f"seed{seed}.ckpt"
    trainer.save_checkpoint(path)
    return cb, path


class SavedRun(NamedTuple):
    """A finished fit: its callback, its checkpoint and its seedprints run directory."""

    cb: SeedPrintsCallback
    ckpt: Path
    run_dir: Path

    def copy_to(self, parent: Path) -> Path:
        """A private copy of the run directory at ``parent / "seedprints"``, safe to resume into or edit."""
        return Path(shutil.copytree(self.run_dir, parent / "seedprints"))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> SavedRun:
    """Run A: seed 0, 20 steps (probes at 10 and 20), 2 controls; fitted once for the module."""
    root = tmp_path_factory.mktemp("run_a")
    return SavedRun(*_fit_and_save(root, 0, 20, root / "seedprints"), root / "seedprints")


@pytest.fixture(scope="module")
def run_b(tmp_path_factory) -> SavedRun:
    """Run B: another init (seed 5), 10 steps; fitted once for the module."""
    root = tmp_path_factory.mktemp("run_b")
    return SavedRun(*_fit_and_save(root, 5, 10, root / "seedprints"), root / "seedprints")


def _without_callback_state(ckpt: Path, out: Path) -> Path:
    raw = torch.load(ckpt, weights_only=False)
    for key in [k for k in raw["callbacks"] if k.startswith("SeedPrintsCallback")]:
        del raw["callbacks"][key]
    torch.save(raw, out)
    return out


def test_checkpoint_state_is_weights_only_and_cpu(run_a):
    assert [h["step"] for h in run_a.cb.history] == [10, 20]
    # The state survives a weights-only load and holds only CPU tensors / plain types.
    state = torch.load(run_a.ckpt, weights_only=True)["callbacks"][run_a.cb.state_key]
    assert state["format_version"] == 2 and state["last_probed_step"] == 20
    assert state["anchor_step"] == 20 and state["anchor_features"].dtype == torch.float16
    buffer = io.BytesIO()
    torch.save(run_a.cb.state_dict(), buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True)["reference_features"], run_a.cb.reference.features)


@pytest.mark.slow
def test_resume_restores_reference_and_controls_and_continues_the_chain(tmp_path, run_a):
    # Reference and controls bit for bit, history continues, no new reference.
    dir_a, cb_a = run_a.copy_to(tmp_path / "a"), run_a.cb
    cb = callback(save_dir=dir_a, num_controls=2)
    file_mtime = (dir_a / "reference.safetensors").stat().st_mtime_ns
    make_trainer(tmp_path, max_steps=30, callbacks=[cb]).fit(TinyLM(seed=0), loader(), ckpt_path=run_a.ckpt)
    assert cb.reference_source == "checkpoint"
    assert torch.equal(cb.reference.features, cb_a.reference.features)
    assert cb.reference.created == cb_a.reference.created and cb.reference.step == 0
    assert torch.equal(cb.chain.control_features, cb_a.chain.control_features)
    # The resumed run first links the loaded weights to the last probe before the save.
    assert [(h["step"], h["event"]) for h in cb.history] == [(10, "interval"), (20, "interval"), (20, "resume"),
                                                               (30, "interval")]
    assert cb.history[:2] == cb_a.history
    assert cb.history[2]["anchor_step"] == 20 and cb.history[2]["link_span"] == 0.0
    assert all(h["related"] is True for h in cb.history)
    assert (dir_a / "reference.safetensors").stat().st_mtime_ns == file_mtime
    from seedprints_lightning.core.verify import verify_chain

    audit = verify_chain(dir_a)
    assert audit.ok, audit.problems
    assert [r["event"] for r in audit.records] == ["interval", "interval", "resume", "interval"]


@pytest.mark.slow
def test_resume_without_callback_state_is_refused(tmp_path, run_a):
    # A clear error, and no reference taken from trained weights.
    dir_a = run_a.copy_to(tmp_path / "a")
    stripped = _without_callback_state(run_a.ckpt, tmp_path / "stripped.ckpt")
    cb = callback(save_dir=dir_a)
    with pytest.raises(InputError, match=r"no SeedPrintsCallback state \(state_key 'SeedPrintsCallback\{.*reference="):
        make_trainer(tmp_path, max_steps=30, callbacks=[cb]).fit(TinyLM(seed=0), loader(), ckpt_path=stripped)
    assert cb.history == []


@pytest.mark.slow
def test_resume_of_another_runs_checkpoint_into_this_run_dir_is_refused(tmp_path, run_a, run_b):
    # Run B's checkpoint resumed into run A's directory: the two references differ.
    dir_a = run_a.copy_to(tmp_path / "a")
    with pytest.raises(InputError, match=r"differs from .*a[/\\]seedprints[/\\]reference\.safetensors"):
        make_trainer(tmp_path, max_steps=30, callbacks=[callback(save_dir=dir_a)]).fit(
            TinyLM(seed=5), loader(), ckpt_path=run_b.ckpt)


@pytest.mark.slow
def test_another_runs_weights_with_this_runs_reference_fail_at_the_first_probe(tmp_path, run_a, run_b):
    # Run B's weights with run A's reference (state stripped, reference= given): caught at the first probe.
    dir_a = run_a.copy_to(tmp_path / "a")
    stripped = _without_callback_state(run_b.ckpt, tmp_path / "stripped.ckpt")
    cb = callback(save_dir=dir_a, reference=dir_a / "reference.safetensors", probe=None, patience=1,
                  on_identity_lost="raise", num_controls=2)
    with pytest.raises(IdentityLostError, match="at step 10"):
        make_trainer(tmp_path, max_steps=30, callbacks=[cb]).fit(TinyLM(seed=5), loader(), ckpt_path=stripped)
    assert cb.history[-1]["event"] == "train_start" and cb.history[-1]["related"] is False


# ------------------------------------------------------------------ accumulation, observer effect


def test_gradient_accumulation_probes_once_per_interval(tmp_path):
    calls = []

    class Spy(SeedPrintsCallback):
        def _probe(self, trainer, pl_module, event):
            calls.append((trainer.global_step, event))
            return super()._probe(trainer, pl_module, event)

    cb = Spy(every_n_steps=2, probe=ProbeSpec(num_samples=60, length=8), num_controls=0, adaptive_schedule=False)
    batches = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            batches.append(trainer.global_step)

    make_trainer(tmp_path, max_steps=6, accumulate_grad_batches=3, callbacks=[cb, Count()]).fit(TinyLM(), loader())
    assert batches.count(2) == 3  # the hook really fires 3 times per optimizer step
    assert calls == [(2, "interval"), (4, "interval"), (6, "interval")]
    assert [h["step"] for h in cb.history] == [2, 4, 6]


@pytest.mark.slow
def test_no_observer_effect(tmp_path):
    def run(with_callback: bool) -> dict[str, torch.Tensor]:
        pl.seed_everything(1234, verbose=False)
        module = TinyLM(seed=0, dropout=0.3)  # dropout draws from the global RNG every step
        callbacks = (
            [callback(every_n_steps=3, num_controls=2, probe=ProbeSpec(num_samples=50, length=8))]
            if with_callback
            else []
        )
        make_trainer(tmp_path / str(with_callback), max_steps=12, callbacks=callbacks).fit(module, loader(n=48))
        if with_callback:
            assert [h["step"] for h in callbacks[0].history] == [3, 6, 9, 12]
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    without, with_cb = run(False), run(True)
    assert without.keys() == with_cb.keys()
    for name in without:
        assert torch.equal(without[name], with_cb[name]), name


# ------------------------------------------------------------------ two import names, fast_dev_run


def test_lightning_pytorch_trainer_accepts_and_runs_it(tmp_path):
    lpl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger as LTensorBoardLogger

    cb = callback(every_n_steps=3, num_controls=1, probe=ProbeSpec(num_samples=60, length=8))
    logger = LTensorBoardLogger(str(tmp_path), name="l")
    trainer = make_trainer(tmp_path, package=lpl, logger=logger, max_steps=6, callbacks=[cb])
    trainer.fit(module_class(lpl)(), loader())
    assert [h["step"] for h in cb.history] == [3, 6] and all(h["related"] for h in cb.history)
    acc = read_scalars(Path(logger.log_dir))
    assert [e.step for e in acc.Scalars("seedprints/z")] == [3, 6]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_bf16_mixed_precision(tmp_path):
    cb = callback(every_n_steps=3, num_controls=1, probe=ProbeSpec(num_samples=60, length=8))
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[cb], precision="bf16-mixed")
    trainer.fit(TinyLM(), loader())
    assert cb in trainer.callbacks and [h["step"] for h in cb.history] == [3]
    assert cb.history[0]["related"] is True and cb.reference.features.dtype == torch.float32


def test_root_wrapper_route_for_sharded_strategies():
    """The FSDP/DeepSpeed path (untestable here) with a stand-in wrapper: the probe runs inside
    the wrapper's forward and the LightningModule's forward is restored afterwards."""
    import contextlib

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

    from pytorch_lightning.strategies import FSDPStrategy

    class FakeFSDPStrategy(FSDPStrategy):  # recognised by type, as the real one is
        def __init__(self, model):
            self._model = model

        @property
        def model(self):
            return self._model

        def broadcast(self, obj, src=0):
            return obj

    class Precision:
        forward_context = staticmethod(contextlib.nullcontext)

    class FakeTrainer:
        pass

    module = TinyLM()
    trainer = FakeTrainer()
    trainer.strategy, trainer.precision_plugin = FakeFSDPStrategy(Wrapper(module)), Precision()
    cb = callback()
    spec = SPEC.resolve(module.model)
    routed = measure_features(trainer, module, spec, cb.settings.features_of)
    assert trainer.strategy.model.calls == 1 and "forward" not in module.__dict__
    direct = extract_features(module.model, spec)
    assert torch.equal(routed, direct)
    module.forward = marker = lambda *a, **k: "own"  # an instance forward of the user's survives too
    measure_features(trainer, module, spec, cb.settings.features_of)
    assert module.forward is marker and trainer.strategy.model.calls == 2


def test_fast_dev_run_probes_at_end_and_writes_nothing(tmp_path):
    cb = callback(every_n_steps=1000, num_controls=1, probe=ProbeSpec(num_samples=60, length=8))
    trainer = make_trainer(tmp_path, fast_dev_run=3, callbacks=[cb], logger=TensorBoardLogger(str(tmp_path)))
    trainer.fit(TinyLM(), loader())
    assert [(h["step"], h["event"]) for h in cb.history] == [(3, "train_end")]
    assert cb.chain.control_features.shape == (1, 60, 32)
    assert float(trainer.callback_metrics["seedprints/related"]) == 1.0
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("events.out.*"))


# ------------------------------------------------------------------ feature_fn, undetermined


class Bag(pl.LightningModule):
    """A non-transformers model: token embedding + MLP, probed through feature_fn."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with preserve_rng_state():
            torch.manual_seed(seed)
            self.emb = nn.Embedding(VOCAB, 32)
            self.mlp = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
            self.head = nn.Linear(32, VOCAB)

    def features(self, ids):
        return self.mlp(self.emb(ids).mean(dim=1))

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        return nn.functional.cross_entropy(self.head(self.features(ids[:, :-1])), ids[:, -1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_feature_fn_for_a_non_transformers_model(tmp_path):
    spec = ProbeSpec(num_samples=100, length=8, vocab_size=VOCAB)
    cb = SeedPrintsCallback(
        every_n_steps=4,
        probe=spec,
        num_controls=0,
        save_dir=tmp_path / "sp",
        adaptive_schedule=False,
        feature_fn=lambda module, batch: module.features(batch.input_ids.to(module.device)),
    )
    make_trainer(tmp_path, max_steps=8, callbacks=[cb]).fit(Bag(), loader())
    assert [h["step"] for h in cb.history] == [4, 8] and all(h["related"] for h in cb.history)
    assert Fingerprint.load(tmp_path / "sp" / "reference.safetensors").model_class == "Bag"

    unresolved = SeedPrintsCallback(probe=ProbeSpec(num_samples=100, length=8), num_controls=0,
                                    feature_fn=lambda module, batch: module.features(batch.input_ids))
    with pytest.raises(InputError, match="pass a resolved probe"):
        make_trainer(tmp_path, max_steps=2, callbacks=[unresolved]).fit(Bag(), loader())


def _constant_features_callback(**kwargs) -> SeedPrintsCallback:
    spec = ProbeSpec(num_samples=50, length=4, vocab_size=VOCAB)
    return SeedPrintsCallback(every_n_steps=2, probe=spec, num_controls=0, patience=1, on_identity_lost="raise",
                              adaptive_schedule=False, feature_fn=lambda module, batch: torch.zeros(batch.size, 8),
                              **kwargs)


def test_a_model_whose_lineage_cannot_be_measured_is_acted_on(tmp_path):
    cb = _constant_features_callback()
    with pytest.raises(IdentityLostError, match="could not be measured at step 2"):
        make_trainer(tmp_path, max_steps=6, callbacks=[cb]).fit(Bag(), loader())
    assert [h["related"] for h in cb.history] == [None]


def test_count_undetermined_false_warns_once_and_does_not_count(tmp_path):
    cb = _constant_features_callback(count_undetermined=False)
    with pytest.warns(IdentityWarning, match="undetermined") as record:
        trainer = make_trainer(tmp_path, max_steps=6, callbacks=[cb])
        trainer.fit(Bag(), loader())
    assert sum("undetermined" in str(w.message) for w in record) == 1
    assert [h["related"] for h in cb.history] == [None, None, None]
    assert cb.chain.failures.consecutive == 0
    # Nothing measured, nothing logged as a figure; the verdict is its own value.
    assert all(h["z"] is None and h["log10_p"] is None and h["undetermined"] == 1.0 for h in cb.history)
    assert float(trainer.callback_metrics["seedprints/related"]) == -1.0
    assert "seedprints/link_z" not in trainer.callback_metrics


# ------------------------------------------------------------------ custody chain


def test_adaptive_schedule_is_dense_at_start_then_every_n(tmp_path):
    cb = callback(every_n_steps=20, adaptive_schedule=True, num_controls=2)
    make_trainer(tmp_path, max_steps=60, callbacks=[cb]).fit(TinyLM(lr=3e-3), loader(n=600))
    steps = [h["step"] for h in cb.history]
    # The ramp: every step at first, then intervals of at most a quarter of the step.
    assert steps[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12]
    assert steps == sorted(set(steps))
    # Every probe happened where the previous one scheduled it; no multiple of every_n_steps is skipped.
    for previous, current in zip(cb.history, cb.history[1:]):
        assert current["step"] == previous["next_step"]
    assert {20, 40, 60} <= set(steps) and all(h["related"] is True for h in cb.history)
    assert all(b - a <= max(1, a // 4) or b % 20 == 0 for a, b in zip(steps, steps[1:]))


def test_weak_link_shortens_the_interval(tmp_path):
    # An adapt headroom no link can reach: every held link counts as weak, so the interval never grows.
    cb = callback(every_n_steps=8, adaptive_schedule=True, num_controls=0)
    from seedprints_lightning.core.schedule import ProbeSchedule

    cb.chain.schedule = ProbeSchedule(every_n_steps=8, adapt_headroom=1e9)
    make_trainer(tmp_path, max_steps=6, callbacks=[cb]).fit(TinyLM(), loader())
    assert [h["step"] for h in cb.history] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_wrong_weights_at_resume_break_the_chain_at_train_start(tmp_path, run_a, run_b):
    save_dir = run_a.copy_to(tmp_path / "run")
    raw = torch.load(run_a.ckpt, weights_only=False)
    # Run B's trained weights (same architecture, another init): a wrong checkpoint's weights.
    raw["state_dict"] = torch.load(run_b.ckpt, weights_only=False)["state_dict"]
    wrong = tmp_path / "wrong.ckpt"
    torch.save(raw, wrong)
    cb = callback(save_dir=save_dir, num_controls=2, patience=1, on_identity_lost="raise")
    with pytest.raises(IdentityLostError, match="at step 20 .*custody link from step 20"):
        make_trainer(tmp_path, max_steps=40, callbacks=[cb]).fit(TinyLM(seed=0), loader(), ckpt_path=wrong)
    assert cb.history[-1]["event"] == "resume" and cb.history[-1]["related"] is False
    assert cb.history[-1]["link_span"] == 0.0
    from seedprints_lightning.core.verify import verify_chain

    audit = verify_chain(save_dir)
    assert not audit.ok and [p.index for p in audit.broken_links] == [2] and not audit.tampered


def test_birth_fading_is_reported_not_acted_on(tmp_path):
    # A birth margin no test can clear stands in for a faded birth test (ordinary learning rates).
    cb = callback(birth_z_margin=1e6, patience=1, on_identity_lost="raise")
    with pytest.warns(IdentityWarning, match="birth test is no longer detectable.*NOT identity loss") as record:
        make_trainer(tmp_path, max_steps=30, callbacks=[cb]).fit(TinyLM(), loader())
    assert sum("no longer detectable" in str(w.message) for w in record) == 1
    assert [h["birth_detectable"] for h in cb.history] == [False, False, False]
    assert [h["related"] for h in cb.history] == [True, True, True]


@pytest.mark.parametrize("fail_on", ["birth", "either"])
def test_fail_on_birth_acts_on_the_birth_test(tmp_path, fail_on):
    cb = callback(birth_z_margin=1e6, patience=1, on_identity_lost="raise", fail_on=fail_on)
    with pytest.raises(IdentityLostError, match=f"fail_on='{fail_on}'.*birth test"):
        make_trainer(tmp_path, max_steps=30, callbacks=[cb]).fit(TinyLM(), loader())
    assert [h["step"] for h in cb.history] == [10] and cb.history[0]["link_related"] is True


def test_control_factory_gives_feature_fn_models_controls(tmp_path):
    spec = ProbeSpec(num_samples=100, length=8, vocab_size=VOCAB)
    built = []

    def factory(seed):
        built.append(seed)
        return Bag(seed)

    cb = SeedPrintsCallback(
        every_n_steps=4,
        probe=spec,
        num_controls=2,
        control_factory=factory,
        adaptive_schedule=False,
        save_dir=tmp_path / "sp",
        feature_fn=lambda module, batch: module.features(batch.input_ids.to(module.emb.weight.device)),
    )
    make_trainer(tmp_path, max_steps=8, callbacks=[cb]).fit(Bag(), loader())
    from seedprints_lightning.core.controls import control_seeds

    assert built == list(control_seeds(2)) and cb.chain.control_features.shape == (2, 100, 32)
    assert all(h["related"] for h in cb.history) and all(len(h["control_z"]) == 2 for h in cb.history)
    assert not torch.equal(cb.chain.control_features[0], cb.chain.control_features[1])


@pytest.mark.slow
def test_parent_run_directory_continues_its_chain_and_refuses_a_broken_one(tmp_path, run_a):
    parent_dir, ckpt = run_a.copy_to(tmp_path / "parent"), run_a.ckpt
    child_dir = tmp_path / "child" / "seedprints"
    cb = callback(reference=parent_dir, probe=None, save_dir=child_dir, num_controls=2)
    assert cb.chain.anchor_step == 20 and cb.reference.step == 0
    child = TinyLM(seed=3)  # continued training: another init, overwritten by the parent's final weights
    parent_weights = torch.load(ckpt, weights_only=False)["state_dict"]
    child.model.load_state_dict({k[len("model."):]: v for k, v in parent_weights.items()})
    make_trainer(tmp_path, max_steps=10, callbacks=[cb]).fit(child, loader())
    assert [(h["step"], h["anchor_step"]) for h in cb.history] == [(0, 20), (10, 0)]
    assert all(h["related"] is True for h in cb.history)
    from seedprints_lightning.core.verify import verify_chain

    assert verify_chain(child_dir).ok
    # A parent whose ledger was edited cannot be continued.
    ledger = parent_dir / "custody.jsonl"
    lines = ledger.read_text().splitlines()
    ledger.write_text(lines[1] + "\n" + lines[0] + "\n")
    with pytest.raises(InputError, match="custody chain does not verify"):
        callback(reference=parent_dir, probe=None)


# ------------------------------------------------------------------ precomputed controls


def test_precomputed_controls_are_used_instead_of_building_them(tmp_path, monkeypatch):
    from seedprints_lightning.core.controls import ControlSet, probe_controls
    from seedprints_lightning.offline.cli import main as cli_main

    module = TinyLM(seed=0)
    model_dir = tmp_path / "model"
    module.model.save_pretrained(model_dir)
    out = tmp_path / "controls.safetensors"
    assert cli_main(["controls", str(model_dir), "-o", str(out), "--num", "2", "--num-samples", "200",
                     "--length", "8", "-q"]) == 0
    loaded = ControlSet.load(out)
    features, seeds, spec = loaded.features, loaded.seeds, loaded.spec
    assert spec == SPEC.resolve(module.model) and features.shape == (2, 200, 32)
    # The same fresh inits the callback would build itself (float noise only: another attention kernel).
    assert torch.allclose(features, probe_controls(module.model, spec, seeds), atol=1e-5)

    import seedprints_lightning.core.controls as controls_module

    def refuse(*args, **kwargs):
        raise AssertionError("a control was built although controls= was given")

    monkeypatch.setattr(controls_module, "build_control_model", refuse)
    cb = callback(controls=out)
    make_trainer(tmp_path, max_steps=10, callbacks=[cb]).fit(module, loader())
    assert cb.settings.num_controls == 2 and torch.equal(cb.chain.control_features, features)
    assert all(h["related"] is True and len(h["control_z"]) == 2 for h in cb.history)


def test_precomputed_controls_must_match_spec_and_config(tmp_path):
    from seedprints_lightning.core.controls import save_controls

    features = torch.randn(2, 200, 32)
    other_spec = tmp_path / "spec.safetensors"
    save_controls(other_spec, features, (1, 2), ProbeSpec(kind="token", num_samples=200, length=8, vocab_size=32))
    with pytest.raises(InputError, match="another probe"):
        make_trainer(tmp_path, max_steps=2, callbacks=[callback(controls=other_spec)]).fit(TinyLM(), loader())
    other_config = tmp_path / "config.safetensors"
    save_controls(other_config, features, (1, 2), SPEC.resolve(make_tiny_lm(0, vocab_size=VOCAB)),
                  extra={"config_digest": "0" * 64})
    with pytest.raises(InputError, match="another model config"):
        make_trainer(tmp_path, max_steps=2, callbacks=[callback(controls=other_config)]).fit(TinyLM(), loader())
    with pytest.raises(InputError, match="controls must be the path"):
        callback(controls=3)


def test_version_1_state_loads_and_restarts_the_chain_at_the_reference(run_a):
    cb_a = run_a.cb
    state = cb_a.state_dict()
    for key in ("anchor_features", "anchor_step", "anchor_index", "next_probe_step", "interval",
                "ledger_next_index", "ledger_last_sha256", "warned_birth"):
        del state[key]
    state["format_version"] = 1
    cb = callback()
    cb.load_state_dict(state)
    assert cb.chain.anchor is None and cb.chain.anchor_step is None  # the chain restarts at the reference
    assert (cb.chain.next_probe_step, cb.chain.interval) == (20 + cb.settings.every_n_steps, cb.settings.every_n_steps)
    assert torch.equal(cb.reference.features, cb_a.reference.features)
    state["format_version"] = 3
    with pytest.raises(InputError, match="format version 3"):
        callback().load_state_dict(state)


# ------------------------------------------------------------------ state_key per instance


def test_two_callbacks_in_one_trainer_keep_their_own_states(tmp_path):
    token = callback(save_dir=tmp_path / "token", num_controls=0)
    embedding = callback(save_dir=tmp_path / "embedding", num_controls=0,
                         probe=ProbeSpec(kind="embedding", num_samples=200, length=8))
    assert token.state_key != embedding.state_key and token.state_key.startswith("SeedPrintsCallback{")
    assert token.state_key == callback(save_dir=tmp_path / "token", num_controls=0).state_key  # derived, stable
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[token, embedding])
    trainer.fit(TinyLM(seed=0), loader())
    trainer.save_checkpoint(tmp_path / "both.ckpt")
    states = torch.load(tmp_path / "both.ckpt", weights_only=True)["callbacks"]
    assert states[token.state_key]["reference_meta"] != states[embedding.state_key]["reference_meta"]
    for cb in (token, embedding):  # each resumes its own chain: one more probe, linked to its own last one
        again = callback(save_dir=cb.settings.save_dir, num_controls=0, probe=cb.settings.probe)
        make_trainer(tmp_path, max_steps=20, callbacks=[again]).fit(TinyLM(seed=0), loader(),
                                                                    ckpt_path=tmp_path / "both.ckpt")
        assert torch.equal(again.reference.features, cb.reference.features)
        resumed = again.history[len(cb.history):]  # the restored history comes first
        assert resumed[0]["event"] == "resume" and all(h["related"] is True for h in resumed)


def test_a_checkpoint_with_the_former_constant_state_key_still_resumes(tmp_path, run_a):
    dir_a = run_a.copy_to(tmp_path / "a")
    raw = torch.load(run_a.ckpt, weights_only=False)
    raw["callbacks"] = {"SeedPrintsCallback": raw["callbacks"].pop(run_a.cb.state_key)}
    torch.save(raw, tmp_path / "legacy.ckpt")
    cb = callback(save_dir=dir_a, num_controls=2)
    trainer = make_trainer(tmp_path, max_steps=30, callbacks=[cb])
    trainer.fit(TinyLM(seed=0), loader(), ckpt_path=tmp_path / "legacy.ckpt")
    assert cb.chain.restored and torch.equal(cb.reference.features, run_a.cb.reference.features)
    assert [(h["step"], h["event"]) for h in cb.history][2:] == [(20, "resume"), (30, "interval")]  # after 10, 20
    assert all(h["related"] is True for h in cb.history)
    assert verify_chain(dir_a).ok
