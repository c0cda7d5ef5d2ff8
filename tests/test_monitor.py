"""SeedPrintsMonitor in a hand-written loop, and SeedPrintsFabricCallback in a Lightning Fabric loop.

Both faces must write the ledger the Lightning callback writes (``verify_chain`` accepts it), keep
every link of a healthy run, catch a swap, continue the chain across a resume from their own
checkpoints, and leave training bit-identical. ``seedprints audit --chain`` reads their
checkpoints (a ``torch.save`` / ``fabric.save`` file) like a Lightning one.

Sizes: the conftest tiny LLaMA (hidden 32), token probes n = 200, L = 8, 2 controls, lr 3e-3.
Own links of a few steps stand at z 60-90 against thresholds of 5-8 (test_callback.py measures
the same model); another seed's init scores z < 4.1 against them, so each outcome here has a
margin of more than 10 in z.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import count_probed_samples, exit_after_report, lm_step, make_tiny_lm, tokens_at, torchrun_reports
from torch import nn

from seedprints_lightning import IdentityLostError, InputError, ProbeSpec, extract_features, verify_chain
from seedprints_lightning.core.errors import IdentityWarning
from seedprints_lightning.core.probes import submodule_output
from seedprints_lightning.faces.monitor import SeedPrintsMonitor
from seedprints_lightning.offline.cli import EXIT_EXPECT, EXIT_OK
from seedprints_lightning.offline.cli import main as seedprints_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=200, length=8)




def _monitor(tmp_path, **kwargs) -> SeedPrintsMonitor:
    options = dict(every_n_steps=4, probe=SPEC, num_controls=2, save_dir=tmp_path / "seedprints")
    return SeedPrintsMonitor(**{**options, **kwargs})


def _loop(monitor: SeedPrintsMonitor | None, model, optimizer, first: int, last: int, swap_at: int | None = None):
    for step in range(first, last + 1):
        lm_step(model, optimizer, step)
        if step == swap_at:
            model.load_state_dict(make_tiny_lm(7).state_dict())
        if monitor is not None:
            monitor.step(model, step)
            if monitor.should_stop:
                return step
    return last


# ---------------------------------------------------------------------- a hand-written loop
def test_a_healthy_loop_keeps_every_link_and_writes_a_ledger_that_verifies(tmp_path):
    model = make_tiny_lm(0).train()
    init = extract_features(model, SPEC)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = _monitor(tmp_path, log_dir=tmp_path / "tb")
    assert monitor.start(model) is None  # step 0: the reference, nothing to link yet
    _loop(monitor, model, optimizer, 1, 10)
    monitor.end(model)  # step 10 was probed: no second probe
    assert [h["step"] for h in monitor.history] == [1, 2, 3, 4, 5, 6, 7, 8, 10]  # the dense start, then 2 apart
    assert all(h["related"] is True for h in monitor.history)
    assert min(h["link_z"] - h["link_threshold"] for h in monitor.history) > 10
    assert torch.allclose(monitor.reference.features, init, atol=1e-6)
    audit = verify_chain(tmp_path / "seedprints")
    assert audit.ok and len(audit.records) == 9, audit.problems
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in events.Scalars("seedprints/link_z")] == [1, 2, 3, 4, 5, 6, 7, 8, 10]


@pytest.mark.parametrize("action", ["raise", "stop", "warn"])
def test_a_swapped_model_is_caught_at_the_next_probe(tmp_path, action):
    model = make_tiny_lm(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = _monitor(tmp_path, patience=1, on_identity_lost=action)
    monitor.start(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if action == "raise":
            with pytest.raises(IdentityLostError, match="at step 6 .*custody link from step 5"):
                _loop(monitor, model, optimizer, 1, 10, swap_at=6)
        else:
            last = _loop(monitor, model, optimizer, 1, 10, swap_at=6)
            assert (last, monitor.should_stop) == ((6, True) if action == "stop" else (10, False))
    assert [(h["step"], h["related"]) for h in monitor.history][4:6] == [(5, True), (6, False)]
    lost = [w for w in caught if issubclass(w.category, IdentityWarning) and "lost its lineage" in str(w.message)]
    failed = [h["step"] for h in monitor.history if h["related"] is False]
    assert len(lost) == (0 if action == "raise" else 1 if action == "stop" else len(failed))  # warn: every one
    assert failed[0] == 6 and (action != "warn" or failed[-1] == 10)  # the swapped weights never link back
    audit = verify_chain(tmp_path / "seedprints")  # the failed links are recorded, and the audit finds them
    assert not audit.tampered and audit.broken_links[0].index == 5


def _checkpoint(tmp_path, name: str, steps: int) -> tuple[nn.Module, dict]:
    """Train 1..steps with the monitor, then save what a hand-written loop saves."""
    model = make_tiny_lm(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = _monitor(tmp_path)
    monitor.start(model)
    _loop(monitor, model, optimizer, 1, steps)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "seedprints": monitor.state_dict()}
    torch.save(state, tmp_path / name)
    return model, state


def test_a_resume_links_the_loaded_weights_and_continues_the_chain(tmp_path, capsys):
    _, saved = _checkpoint(tmp_path, "step6.pt", 6)
    state = torch.load(tmp_path / "step6.pt", weights_only=True)  # the monitor's state is plain types
    model = make_tiny_lm(3).train()  # a fresh process: another init until the checkpoint is loaded
    model.load_state_dict(state["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    optimizer.load_state_dict(state["optimizer"])
    monitor = _monitor(tmp_path)
    monitor.load_state_dict(state["seedprints"])
    resumed = monitor.start(model, step=6)
    assert resumed is not None and resumed.related is True and resumed.anchor_step == 6
    _loop(monitor, model, optimizer, 7, 12)
    assert [(h["step"], h["event"]) for h in monitor.history][5:] == [
        (6, "interval"), (6, "resume"), (7, "interval"), (8, "interval"), (10, "interval"), (12, "interval")]
    audit = verify_chain(tmp_path / "seedprints")
    assert audit.ok and [r["event"] for r in audit.records].count("resume") == 1
    # The hand-written checkpoint is auditable: the monitor's state says how to rebuild the model.
    assert saved["seedprints"]["model_rebuild"]["state_dict_prefix"] == ""
    assert seedprints_main(["audit", "--chain", str(tmp_path / "seedprints"), str(tmp_path / "step6.pt"), "-q"]) \
        == EXIT_OK
    assert "descends (" in capsys.readouterr().out
    state["model"] = make_tiny_lm(7).state_dict()  # the same file with another init's weights
    torch.save(state, tmp_path / "wrong.pt")
    assert seedprints_main(["audit", "--chain", str(tmp_path / "seedprints"), str(tmp_path / "wrong.pt"), "-q"]) \
        == EXIT_EXPECT
    assert "DOES NOT DESCEND" in capsys.readouterr().out


@pytest.mark.parametrize("bind_saves", [True, False])
def test_bind_saves_false_records_no_save_and_the_checkpoint_is_still_audited(tmp_path, capsys, bind_saves):
    model = make_tiny_lm(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = _monitor(tmp_path, bind_saves=bind_saves)
    monitor.start(model)
    _loop(monitor, model, optimizer, 1, 4)
    torch.save({"model": model.state_dict(), "seedprints": monitor.state_dict(model)}, tmp_path / "last.pt")
    audit = verify_chain(tmp_path / "seedprints")
    assert audit.ok
    assert [r["step"] for r in audit.records if r.get("kind") == "save"] == ([4] if bind_saves else [])
    # Bound or not, the checkpoint descends from the run (its lineage is tested either way).
    assert seedprints_main(["audit", "--chain", str(tmp_path / "seedprints"), str(tmp_path / "last.pt")]) == EXIT_OK
    with pytest.raises(InputError, match=r"bind_saves must be True or False.*got 'no'"):
        _monitor(tmp_path / "other", bind_saves="no")


def test_resuming_another_runs_weights_fails_at_start(tmp_path):
    _checkpoint(tmp_path, "step6.pt", 6)
    state = torch.load(tmp_path / "step6.pt", weights_only=True)
    monitor = _monitor(tmp_path, patience=1, on_identity_lost="raise")
    monitor.load_state_dict(state["seedprints"])
    with pytest.raises(IdentityLostError, match="at step 6"):
        monitor.start(make_tiny_lm(7).train(), step=6)


def test_a_trained_model_without_its_state_is_refused_and_misuse_is_named(tmp_path):
    model = make_tiny_lm(0).train()
    with pytest.raises(InputError, match="no reference at global_step=6.*SeedPrintsMonitor state"):
        _monitor(tmp_path).start(model, step=6)
    with pytest.raises(InputError, match=r"step\(\) before start\(\)"):
        _monitor(tmp_path).step(model, 1)
    monitor = _monitor(tmp_path)
    monitor.start(model)
    with pytest.raises(InputError, match="already called"):
        monitor.start(model)
    with pytest.raises(InputError, match="before start"):
        monitor.load_state_dict(monitor.state_dict())
    with pytest.raises(InputError, match="on_identity_lost"):
        SeedPrintsMonitor(on_identity_lost="explode")
    with pytest.raises(InputError, match="log_dir"):
        SeedPrintsMonitor(log_dir=3)


def test_the_monitor_leaves_training_bit_identical(tmp_path):
    """Dropout on, so a probe that moved the RNG would change every later step."""
    finals = []
    for with_monitor in (False, True):
        torch.manual_seed(123)
        model = make_tiny_lm(0, attention_dropout=0.3, hidden_dropout=0.0).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        monitor = _monitor(tmp_path / str(with_monitor)) if with_monitor else None
        if monitor is not None:
            monitor.start(model)
        _loop(monitor, model, optimizer, 1, 8)
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
        assert model.training  # modes restored
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_fsdp1_whose_shards_a_direct_call_cannot_gather_is_refused_by_name(tmp_path):
    from types import SimpleNamespace

    from seedprints_lightning import SeedPrintsFabricCallback
    from seedprints_lightning.faces.base import sharding_of

    class FSDPStrategy:  # Fabric's FSDP1 strategy, recognised by name
        pass

    fabric = SimpleNamespace(strategy=FSDPStrategy(), loggers=[])
    with pytest.raises(InputError, match=r"sharded by FSDP1 \(FSDPStrategy\).*fully_shard"):
        SeedPrintsFabricCallback(probe=SPEC).on_after_setup(fabric, make_tiny_lm(0))
    assert sharding_of(model=make_tiny_lm(0)) is None  # a plain (or DDP, or fully_shard-ed) model is probed
    assert sharding_of(strategy=type("DeepSpeedStrategy", (), {})()) == "DeepSpeed"  # probed: ZeRO-3 hooks modules


# ---------------------------------------------------------------------- Lightning Fabric
def _fabric(tmp_path, callback, seed: int = 0):
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import TensorBoardLogger

    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback],
                    loggers=TensorBoardLogger(str(tmp_path / "logs"), name="run", version=0))
    model = make_tiny_lm(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = fabric.setup(model, optimizer)
    return fabric, model, optimizer


def _fabric_loop(fabric, callback, model, optimizer, steps: int, swap_at: int | None = None) -> None:
    for _ in range(steps):
        step = (callback.current_step or 0) + 1
        lm_step(model, optimizer, step, fabric.backward)
        if step == swap_at:
            model.load_state_dict(make_tiny_lm(7).state_dict())
        if callback.should_stop:
            break


def test_fabric_callback_takes_the_reference_before_the_first_step_and_logs_through_fabric(tmp_path):
    from seedprints_lightning import SeedPrintsFabricCallback

    callback = SeedPrintsFabricCallback(every_n_steps=4, probe=SPEC, num_controls=2)
    fabric, model, optimizer = _fabric(tmp_path, callback)
    init = extract_features(model, SPEC)
    _fabric_loop(fabric, callback, model, optimizer, 8)
    callback.end()
    fabric.logger.finalize("success")
    assert torch.allclose(callback.reference.features, init, atol=1e-6)  # the init weights, not step 1's
    assert [h["step"] for h in callback.history] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(h["related"] is True for h in callback.history)
    run_dir = tmp_path / "logs" / "run" / "version_0" / "seedprints"  # beside the first logger's files
    assert verify_chain(run_dir).ok
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "run" / "version_0")).Reload()
    assert [e.step for e in events.Scalars("seedprints/z")] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_fabric_resume_from_fabric_save_continues_the_chain_and_is_auditable(tmp_path, capsys):
    from seedprints_lightning import SeedPrintsFabricCallback

    first = SeedPrintsFabricCallback(every_n_steps=4, probe=SPEC, num_controls=2)
    fabric, model, optimizer = _fabric(tmp_path, first)
    _fabric_loop(fabric, first, model, optimizer, 6)
    fabric.save(tmp_path / "last.ckpt", {"model": model, "optimizer": optimizer, "seedprints": first})
    first.close()  # the first process ends (or crashes): its run directory's lock goes with it

    second = SeedPrintsFabricCallback(every_n_steps=4, probe=SPEC, num_controls=2)
    fabric, model, optimizer = _fabric(tmp_path, second, seed=3)  # a new process builds another init first
    fabric.load(tmp_path / "last.ckpt", {"model": model, "optimizer": optimizer, "seedprints": second})
    assert second.current_step == 6
    _fabric_loop(fabric, second, model, optimizer, 4)
    assert [(h["step"], h["event"]) for h in second.history][5:] == [(6, "interval"), (6, "resume"), (7, "interval"),
                                                                     (8, "interval"), (10, "interval")]
    assert all(h["related"] is True for h in second.history)
    run_dir = tmp_path / "logs" / "run" / "version_0" / "seedprints"
    assert verify_chain(run_dir).ok
    assert seedprints_main(["audit", "--chain", str(run_dir), str(tmp_path / "last.ckpt"), "-q"]) == EXIT_OK
    assert "descends (" in capsys.readouterr().out


def test_fabric_swap_raises_on_the_next_probe(tmp_path):
    from seedprints_lightning import SeedPrintsFabricCallback

    callback = SeedPrintsFabricCallback(every_n_steps=4, probe=SPEC, num_controls=2, patience=1,
                                        on_identity_lost="raise")
    fabric, model, optimizer = _fabric(tmp_path, callback)
    with pytest.raises(IdentityLostError, match="at step 4 .*custody link from step 3"):
        _fabric_loop(fabric, callback, model, optimizer, 8, swap_at=3)  # the swap lands after step 3's probe


class LitGPTStyle(nn.Module):
    """What LitGPT's ``GPT`` looks like from outside: ``transformer.{wte, h, ln_f}``, ``lm_head``, ``forward(idx)``."""

    def __init__(self, vocab: int = 64, width: int = 32, layers: int = 2):
        super().__init__()
        blocks = [nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
                  for _ in range(layers)]
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, width), h=nn.ModuleList(blocks),
                                              ln_f=nn.LayerNorm(width)))
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x, src_mask=mask, is_causal=True)
        return self.lm_head(self.transformer.ln_f(x))


def test_fabric_with_a_litgpt_style_model_through_feature_fn(tmp_path):
    from lightning.fabric import Fabric

    from seedprints_lightning import SeedPrintsFabricCallback

    spec = ProbeSpec(kind="token", vocab_size=64, num_samples=200, length=8)
    feature_fn = submodule_output("transformer.ln_f")
    callback = SeedPrintsFabricCallback(every_n_steps=4, probe=spec, feature_fn=feature_fn,
                                        control_factory=lambda seed: LitGPTStyle(),  # seeded by the caller
                                        num_controls=2, patience=1, on_identity_lost="stop",
                                        save_dir=tmp_path / "seedprints")
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    torch.manual_seed(0)
    model, optimizer = fabric.setup(*(lambda m: (m, torch.optim.AdamW(m.parameters(), lr=3e-3)))(LitGPTStyle()))
    torch.manual_seed(7)
    foreign = LitGPTStyle().state_dict()
    with pytest.warns(IdentityWarning, match="Stopping the run"):
        for step in range(1, 11):
            batch = tokens_at(step)
            logits = model(batch[:, :-1])
            fabric.backward(nn.functional.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1)))
            optimizer.step()
            optimizer.zero_grad()
            if step == 6:
                model.load_state_dict(foreign)
            if callback.should_stop:
                break
    assert [(h["step"], h["related"]) for h in callback.history] == [(1, True), (2, True), (3, True), (4, True),
                                                                     (5, True), (6, True), (7, False)]
    held = callback.history[:6]
    assert min(h["link_z"] - h["link_threshold"] for h in held) > 10
    assert callback.history[-1]["link_z"] < callback.history[-1]["link_threshold"]
    audit = verify_chain(tmp_path / "seedprints")
    assert not audit.tampered and [problem.index for problem in audit.broken_links] == [6]
    # Its checkpoint cannot be rebuilt by the auditor, and its state says what to pass instead.
    assert "feature_fn model" in callback.state_dict()["model_rebuild"]["why_not"]


def test_submodule_output_names_a_missing_submodule_and_refuses_embedding_probes():
    feature_fn = submodule_output("transformer.nope")
    batch = next(iter(ProbeSpec(kind="token", vocab_size=64, num_samples=4, length=8).batches(4, 0, 4)))
    with pytest.raises(InputError, match="no submodule 'transformer.nope'"):
        feature_fn(LitGPTStyle(), batch)
    with pytest.raises(InputError, match="dotted name"):
        submodule_output("")


# ---------------------------------------------------------------------- Fabric on 2 processes (torchrun, gloo)
def _fabric_worker(mode: str, out) -> int:
    """One rank of ``torchrun --nproc-per-node 2 tests/test_monitor.py MODE OUT``: writes ``rank<r>.json``."""
    import json
    from pathlib import Path

    from lightning.fabric import Fabric

    from seedprints_lightning import SeedPrintsFabricCallback

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = Path(out)
    probed: list[int] = []
    count_probed_samples(probed)
    raising = mode == "raise"
    callback = SeedPrintsFabricCallback(every_n_steps=4, probe=SPEC, num_controls=2, save_dir=out / "seedprints",
                                        **(dict(patience=1, on_identity_lost="raise") if raising else {}))
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback])
    fabric.launch()
    model = make_tiny_lm(0).train()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    error = None
    try:
        _fabric_loop(fabric, callback, model, optimizer, 8, swap_at=3 if raising else None)
    except IdentityLostError as exc:
        error = str(exc)
    report = {"rank": fabric.global_rank, "world_size": fabric.world_size, "probed": probed, "error": error,
              "history": [{k: v for k, v in h.items() if k != "probe_seconds"} for h in callback.history]}
    (out / f"rank{fabric.global_rank}.json").write_text(json.dumps(report))
    return 0


@pytest.mark.slow
def test_fabric_on_two_processes_probes_half_each_agrees_and_raises_on_every_rank(tmp_path):
    rank0, rank1 = torchrun_reports(__file__, "healthy", tmp_path / "healthy")
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    for report in (rank0, rank1):
        assert [p for p in report["probed"] if p != 200] == [100] * 9, report["probed"]  # reference + 8 probes
        assert all(h["related"] is True for h in report["history"])
    assert rank0["history"] == rank1["history"]
    assert verify_chain(tmp_path / "healthy" / "seedprints").ok
    for report in torchrun_reports(__file__, "raise", tmp_path / "raise"):
        assert report["error"] is not None and "at step 4" in report["error"], report
        assert [(h["step"], h["related"]) for h in report["history"]][-2:] == [(3, True), (4, False)]


if __name__ == "__main__":
    import sys

    exit_after_report(lambda: _fabric_worker(sys.argv[1], sys.argv[2]))
