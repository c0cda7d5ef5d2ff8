"""The OLMo-core family and ``SeedPrintsOLMoCallback``, with OLMo-core's REAL ``Trainer`` running real steps on CPU.

A tiny ``TransformerConfig.olmo2_1M`` model (d_model 12, 4 blocks, vocabulary 128) trains on a token file the
test writes. Probes: 200 token samples of length 16 and 2 controls: the run's own link z is 30-70 and an
unrelated model's is below 3 (seeded runs, so the margins are fixed: printed by the audit in each test).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig  # noqa: E402
from olmo_core.nn.transformer import TransformerConfig  # noqa: E402
from olmo_core.optim import AdamWConfig  # noqa: E402
from olmo_core.train import Duration, TrainerConfig  # noqa: E402
from olmo_core.train.callbacks import Callback, CheckpointerCallback, ConsoleLoggerCallback  # noqa: E402
from olmo_core.train.train_module import TransformerTrainModuleConfig  # noqa: E402

from seedprints_lightning import IdentityLostError, InputError, ProbeSpec, SeedPrintsOLMoCallback  # noqa: E402
from seedprints_lightning.core.olmo import (  # noqa: E402
    build_olmo_control,
    extract_features_olmo,
    extract_features_olmo_layerwise,
    read_olmo_weights,
    resolve_olmo_spec,
)
from seedprints_lightning.core.records import SaveRecord, read_ledger  # noqa: E402
from seedprints_lightning.core.sharded import GatheredBlockLoader  # noqa: E402
from seedprints_lightning.core.weights import weights_digest  # noqa: E402
from seedprints_lightning.offline.cli import main as seedprints_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 128
SEQ = 32
SPEC = ProbeSpec(num_samples=200, length=16)


def model_config() -> TransformerConfig:
    return TransformerConfig.olmo2_1M(vocab_size=VOCAB)


@dataclass
class Swap(Callback):
    """Replaces every weight with a fresh init (another seed) after the optimizer step of ``at``."""

    priority: ClassVar[int] = 5  # before SeedPrintsOLMoCallback's post_step
    at: int = 3

    def post_step(self) -> None:
        if self.step == self.at:
            fresh = build_olmo_control(model_config(), 123)
            with torch.no_grad():
                for live, new in zip(self.trainer.train_module.model.parameters(), fresh.parameters()):
                    live.copy_(new)


@dataclass
class MetricSpy(Callback):
    """What OLMo-core hands its loggers (console, W&B, Comet): the seedprints metrics, by step."""

    seen: dict[int, dict[str, float]] | None = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        kept = {k: v for k, v in metrics.items() if k.startswith("seedprints/")}
        if kept:
            self.seen.setdefault(step, {}).update(kept)


def make_trainer(tmp: Path, steps: int, callback: SeedPrintsOLMoCallback, *extra: tuple[str, Callback],
                 save_interval: int = 3) -> Any:
    """A real OLMo-core Trainer: tiny model, AdamW, a numpy token file, checkpoints every ``save_interval`` steps."""
    tokens = tmp / "tokens.npy"
    if not tokens.exists():
        np.random.default_rng(0).integers(0, VOCAB, size=64 * 40, dtype=np.uint16).tofile(tokens)
    model = model_config().build(init_device="cpu")
    train_module = TransformerTrainModuleConfig(rank_microbatch_size=4 * SEQ, max_sequence_length=SEQ,
                                                optim=AdamWConfig(lr=1e-3)).build(model)
    dataset = NumpyFSLDatasetConfig(paths=[str(tokens)], sequence_length=SEQ,
                                    tokenizer=TokenizerConfig(vocab_size=VOCAB, eos_token_id=VOCAB - 1,
                                                              pad_token_id=VOCAB - 1),
                                    work_dir=str(tmp / "work")).build()
    loader = NumpyDataLoaderConfig(global_batch_size=4 * SEQ, seed=0, num_workers=0).build(dataset)
    config = TrainerConfig(save_folder=str(tmp / "run"), max_duration=Duration.steps(steps),
                           metrics_collect_interval=1).with_callback("seedprints", callback)
    config = config.with_callback("checkpointer", CheckpointerCallback(save_interval=save_interval, save_async=False))
    for name, cb in extra:
        config = config.with_callback(name, cb)
    return config.build(train_module, loader)


def face(**kwargs: Any) -> SeedPrintsOLMoCallback:
    defaults = dict(every_n_steps=2, probe=SPEC, num_controls=2, adaptive_schedule=False, probe_batch_size=100,
                    model_config=model_config())
    return SeedPrintsOLMoCallback(**{**defaults, **kwargs})


def audit(*args: str) -> tuple[int, dict[str, Any]]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = seedprints_main(["audit", "--json", *args])
    return code, json.loads(out.getvalue())


# --------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_layer_major_features_equal_a_whole_forward_bit_for_bit(kind):
    config = model_config()
    model = build_olmo_control(config, 7)
    spec = resolve_olmo_spec(ProbeSpec(kind=kind, num_samples=40, length=16), model)
    whole = extract_features_olmo(model, spec, batch_size=16)
    assert whole.shape == (40, 12)
    assert torch.equal(extract_features_olmo_layerwise(model, spec, batch_size=16), whole)
    # The path a sharded model takes: a meta twin of the config, each block filled from the live model.
    twin = config.build(init_device="meta")
    via_twin = extract_features_olmo_layerwise(twin, spec, batch_size=16, block_loader=GatheredBlockLoader(model),
                                               device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(via_twin, whole)
    # A batch size that splits the samples otherwise gives the same features (per-sample inputs).
    assert torch.allclose(extract_features_olmo(model, spec, batch_size=7), whole, atol=1e-6)


def test_embedding_probes_bypass_the_embedding_table():
    model = build_olmo_control(model_config(), 7)
    spec = resolve_olmo_spec(ProbeSpec(kind="embedding", num_samples=20, length=8), model)
    before = extract_features_olmo(model, spec, batch_size=20)
    with torch.no_grad():
        model.embeddings.weight.mul_(3.0)  # never read by an embedding probe (its statistics were resolved before)
    assert torch.equal(extract_features_olmo(model, spec, batch_size=20), before)


def test_controls_are_olmo_core_inits_under_other_seeds(tmp_path):
    config = model_config()
    a, b = build_olmo_control(config, 5), build_olmo_control(config, 5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(build_olmo_control(config, 6).embeddings.weight, a.embeddings.weight)
    # From a copy of a live model instead of the config: the same init.
    copied = build_olmo_control(build_olmo_control(config, 9), 5)
    assert all(torch.equal(x, y) for x, y in zip(copied.state_dict().values(), a.state_dict().values()))
    # The scheme is the run's own: seed = the config's init_seed gives the weights the train module starts from.
    trainer = make_trainer(tmp_path, 1, face())
    live = trainer.train_module.model
    own = build_olmo_control(config, config.init_seed)
    assert all(torch.equal(x, y) for x, y in zip(live.state_dict().values(), own.state_dict().values()))


def test_bad_arguments_are_refused():
    with pytest.raises(InputError, match="drop feature_fn"):
        SeedPrintsOLMoCallback(feature_fn=lambda module, batch: batch.input_ids.float())
    with pytest.raises(InputError, match="TransformerConfig"):
        SeedPrintsOLMoCallback(model_config={"d_model": 12})
    with pytest.raises(InputError, match="exceeds the model's vocabulary"):
        resolve_olmo_spec(ProbeSpec(vocab_size=VOCAB + 1), build_olmo_control(model_config(), 1))


# --------------------------------------------------------------------------------------
# The callback in OLMo-core's Trainer
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_healthy_run_keeps_every_link_logs_through_olmo_core_and_audits(tmp_path):
    spy = MetricSpy(seen={})
    trainer = make_trainer(tmp_path, 7, face(), ("spy", spy))
    trainer.fit()
    cb = trainer.callbacks["seedprints"]
    probes = [(h["step"], h["event"]) for h in cb.history]
    assert probes == [(2, "interval"), (4, "interval"), (6, "interval"), (7, "train_end")]
    assert all(h["related"] for h in cb.history)
    # The metrics went through trainer.record_metric to OLMo-core's loggers, at each probe's step.
    assert sorted(spy.seen) == [2, 4, 6, 7] and spy.seen[2]["seedprints/link_z"] > 10
    console = next(c for c in trainer.callbacks.values() if isinstance(c, ConsoleLoggerCallback))
    assert "seedprints/*" in console.metrics
    run = tmp_path / "run" / "seedprints"
    records = [json.loads(line) for line in (run / "custody.jsonl").read_text().splitlines()]
    saves = [(r["step"], Path(r["checkpoint"]).name) for r in records if r.get("kind") == "save"]
    assert saves == [(0, "step0"), (3, "step3"), (6, "step6"), (7, "step7")]  # the final save is bound too

    code, report = audit("--chain", str(run))
    assert code == 0 and report["ok"]
    code, report = audit("--chain", str(run), str(tmp_path / "run" / "step6"))
    assert code == 0 and report["ok"], report["problems"]
    assert report["checkpoint"]["related"] and report["checkpoint"]["z"] > 10
    assert [s["step"] for s in report["checkpoint_weights"]["saved_at"]] == [6]  # the recorded save is recognised
    # The checkpoint of step 0 holds other weights than step 6's save.
    code, report = audit("--chain", str(run), str(tmp_path / "run" / "step0"))
    assert code == 0 and [s["step"] for s in report["checkpoint_weights"]["saved_at"]] == [0]


@pytest.mark.slow
@pytest.mark.parametrize("action", ["stop", "raise"])
def test_weights_swapped_mid_run_are_acted_on_at_the_next_probe(tmp_path, action):
    trainer = make_trainer(tmp_path, 10, face(on_identity_lost=action, patience=1), ("swap", Swap(at=3)))
    if action == "raise":
        with pytest.raises(IdentityLostError, match="lost its lineage identity at step 4"):
            trainer.fit()
    else:
        with pytest.warns(Warning, match="Stopping the run"):
            trainer.fit()
        assert trainer.is_canceled and trainer.global_step == 4  # cancel_run ended the run at the failed probe
    cb = trainer.callbacks["seedprints"]
    last = cb.history[-1]
    assert last["step"] == 4 and last["related"] is False
    code, _ = audit("--chain", str(tmp_path / "run" / "seedprints"))
    assert code != 0  # the ledger records the broken link


@pytest.mark.slow
def test_resume_from_an_olmo_core_checkpoint_continues_the_chain(tmp_path):
    first = make_trainer(tmp_path, 6, face())
    first.fit()
    first_records = len((tmp_path / "run" / "seedprints" / "custody.jsonl").read_text().splitlines())
    # A new process's trainer on the same save folder: OLMo-core loads step6 (and this callback's state) in fit().
    second = make_trainer(tmp_path, 10, face())
    second.fit()
    cb = second.callbacks["seedprints"]  # its history goes on from the restored one
    assert [(h["step"], h["event"]) for h in cb.history] == [(2, "interval"), (4, "interval"), (6, "interval"),
                                                             (6, "resume"), (8, "interval"), (10, "interval")]
    assert all(h["related"] for h in cb.history)
    lines = (tmp_path / "run" / "seedprints" / "custody.jsonl").read_text().splitlines()
    assert len(lines) > first_records + 2
    code, report = audit("--chain", str(tmp_path / "run" / "seedprints"), str(tmp_path / "run" / "step10"))
    assert code == 0 and report["ok"] and [s["step"] for s in report["checkpoint_weights"]["saved_at"]] == [10]


@pytest.mark.slow
def test_a_resume_without_the_callback_state_is_refused(tmp_path):
    first = make_trainer(tmp_path, 3, face())
    first.fit()
    second = make_trainer(tmp_path, 6, face())
    second.callbacks.pop("seedprints")  # a state saved under another name is not restored
    lost = face()
    second.add_callback("other_name", lost)
    with pytest.raises(InputError, match="no reference at global_step=3"):
        second.fit()


# --------------------------------------------------------------------------------------
# FSDP2 over 2 gloo ranks (torchrun): this file is the worker script
# --------------------------------------------------------------------------------------


def _fsdp_worker(out: Path) -> int:
    """Both legs in one launch: a healthy FSDP2 run (features of the sharded model against an unsharded copy of
    the same weights), then a run whose local shards are overwritten after step 1 (``"raise"`` on every rank)."""
    import torch.distributed as dist
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.train import prepare_training_environment
    from olmo_core.train.train_module import TransformerDataParallelConfig

    from seedprints_lightning.core.sharded import holds_dtensors

    prepare_training_environment(backend="gloo", seed=0)
    torch.set_num_threads(1)
    rank = dist.get_rank()
    report: dict[str, Any] = {"rank": rank}
    dp = TransformerDataParallelConfig(name=DataParallelType.fsdp)

    def trainer_for(root: Path, steps: int, callback: SeedPrintsOLMoCallback, *extra: tuple[str, Callback]) -> Any:
        tokens = out / "tokens.npy"
        model = model_config().build(init_device="meta")
        train_module = TransformerTrainModuleConfig(rank_microbatch_size=2 * SEQ, max_sequence_length=SEQ,
                                                    optim=AdamWConfig(lr=1e-3), dp_config=dp).build(model)
        dataset = NumpyFSLDatasetConfig(paths=[str(tokens)], sequence_length=SEQ,
                                        tokenizer=TokenizerConfig(vocab_size=VOCAB, eos_token_id=VOCAB - 1,
                                                                  pad_token_id=VOCAB - 1),
                                        work_dir=str(root / "work")).build()
        loader = NumpyDataLoaderConfig(global_batch_size=4 * SEQ, seed=0, num_workers=0).build(dataset)
        config = TrainerConfig(save_folder=str(root / "run"), max_duration=Duration.steps(steps),
                               metrics_collect_interval=1).with_callback("seedprints", callback)
        config = config.with_callback("checkpointer", CheckpointerCallback(save_interval=100, save_async=False))
        for name, cb in extra:
            config = config.with_callback(name, cb)
        return config.build(train_module, loader)

    if rank == 0:
        np.random.default_rng(0).integers(0, VOCAB, size=64 * 40, dtype=np.uint16).tofile(out / "tokens.npy")
    dist.barrier()

    healthy = trainer_for(out / "healthy", 4, face())
    live = healthy.train_module.model
    report["dtensors"] = holds_dtensors(live)
    full = {key: value.full_tensor() for key, value in live.state_dict().items()}  # the same weights, whole
    copy_ = model_config().build(init_device="meta")
    copy_.load_state_dict(full, assign=True)
    copy_._device = None
    spec = resolve_olmo_spec(SPEC, copy_)
    report["features_equal"] = torch.equal(extract_features_olmo(live, spec, batch_size=100, config=model_config()),
                                           extract_features_olmo(copy_, spec, batch_size=100))
    healthy.fit()
    cb = healthy.callbacks["seedprints"]
    report["history"] = [[h["step"], h["event"], h["related"]] for h in cb.history]
    # The final save under FSDP2 is bound; the test reads the checkpoint back in one process (read_olmo_weights
    # is not for a distributed run) and checks the recorded digest.
    ledger = read_ledger(out / "healthy" / "run" / "seedprints" / "custody.jsonl")
    report["saves"] = [[record.checkpoint, record.weights_sha256] for record in ledger
                       if isinstance(record, SaveRecord)]

    @dataclass
    class Scramble(Callback):
        priority: ClassVar[int] = 5

        def post_step(self) -> None:
            if self.step == 1:
                generator = torch.Generator().manual_seed(123 + rank)
                with torch.no_grad():
                    for param in self.trainer.train_module.model.parameters():
                        local = param.to_local()
                        local.copy_(torch.randn(local.shape, generator=generator) * 0.02)

    import olmo_core.distributed.parallel as parallel

    parallel._WORLD_MESH = None  # OLMo-core builds one world mesh per process; the second leg is a second run
    swapped = trainer_for(out / "swapped", 6, face(on_identity_lost="raise", patience=1), ("scramble", Scramble()))
    try:
        swapped.fit()
        report["raised"] = None
    except IdentityLostError as exc:
        report["raised"] = str(exc)[:120]
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


@pytest.mark.slow
def test_fsdp2_on_two_gloo_ranks_probes_gathered_blocks_and_a_swap_raises_on_both(tmp_path):
    from conftest import torchrun_reports

    reports = torchrun_reports(__file__, "fsdp", tmp_path)
    for report in reports:
        assert report["dtensors"] is True  # a real sharded model (FSDP2's DTensor weights)
        assert report["features_equal"] is True, report  # gathered block by block == an unsharded forward
        assert report["history"] == [[2, "interval", True], [4, "interval", True]], report
        assert report["raised"] and "lost its lineage identity at step 2" in report["raised"], report
    saves = reports[0]["saves"]
    assert [Path(path).name for path, _ in saves] == ["step0", "step4"] and reports[1]["saves"] == saves
    for path, digest in saves:  # each save's sharded weights, read back as saved, are the recorded ones
        assert digest == weights_digest(read_olmo_weights(path)), path


if __name__ == "__main__":
    import sys

    from conftest import exit_after_report

    exit_after_report(lambda: _fsdp_worker(Path(sys.argv[2])))
