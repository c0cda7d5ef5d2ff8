"""SeedPrintsCallback on a GPU: FSDP1, FSDP2 over a one-rank mesh, DeepSpeed ZeRO-3, and the CUDA test.

Marked ``gpu`` and skipped without CUDA (CI has none): run them on a GPU machine with
``pytest -m gpu tests/test_gpu.py`` after ``pip install --no-deps -e .``. Each fit is small (a
LLaMA of hidden 128, 2 layers, 30 steps of random tokens) so the module takes about a minute
on one GPU. What they check, as asserts:

* the probe goes through the strategy's root wrapper (parameters gathered) and gives the same
  figures as a plain probe of the same weights, within bf16 rounding;
* every link of the own run holds; another seed's weights copied in raise ``IdentityLostError``;
* a resume from a checkpoint restores the reference and controls bit for bit and links at once;
* ``lineage_test`` on CUDA gives the CPU's z;
* torchtitan's ``Trainer`` with the face (``seedprints_lightning.faces.torchtitan``) trains its debug model
  with FlexAttention on CUDA: every link holds, each save is bound and its checkpoint, rebuilt offline,
  holds those weights and gives the live features; weights swapped for a fresh init raise.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]

SIZE = dict(arch="llama", vocab_size=256, hidden_size=128, num_layers=2, num_heads=4)
STEPS, EVERY = 30, 10


def _module(seed: int = 1, sharded: bool = False):
    from seedprints_lightning.train import CausalLMModule

    if not sharded:
        return CausalLMModule(init_seed=seed, lr=1e-3, **SIZE)

    class FullyShardedLM(CausalLMModule):
        """FSDP2: every decoder layer, then the root causal LM, ``fully_shard``-ed over the data-parallel mesh."""

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    return FullyShardedLM(init_seed=seed, lr=1e-3, **SIZE)


def _loader():
    ids = torch.randint(0, SIZE["vocab_size"], (STEPS * 8, 65), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def _strategy(name: str):
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if name == "fsdp":
        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    return DeepSpeedStrategy(stage=3)


def _fit(root: Path, strategy: str, callbacks: list, *, seed: int = 1, ckpt_path: str | None = None,
         max_steps: int = STEPS):
    import pytorch_lightning as pl

    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=_strategy(strategy), precision="bf16-mixed",
                         max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root), callbacks=callbacks)
    trainer.fit(_module(seed, sharded=strategy == "fsdp2"), _loader(), ckpt_path=ckpt_path)
    return trainer


def _needs(strategy: str) -> None:
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed)")


@pytest.fixture(params=["fsdp", "fsdp2", "deepspeed"])
def strategy(request) -> str:
    _needs(request.param)
    return request.param


def test_sharded_fit_keeps_custody_and_probes_like_a_plain_forward(tmp_path, strategy):
    from seedprints_lightning import ProbeSpec, SeedPrintsCallback, extract_features, lineage_test
    from seedprints_lightning.core.ledger import storage_features
    from seedprints_lightning.core.verify import verify_chain

    cb = SeedPrintsCallback(every_n_steps=EVERY, probe=ProbeSpec(num_samples=500, length=16))
    trainer = _fit(tmp_path, strategy, [cb])
    assert [h["step"] for h in cb.history][-3:] == [10, 20, 30]
    assert all(h["related"] is True for h in cb.history), [(h["step"], h["reason"]) for h in cb.history]
    assert verify_chain(cb.save_dir).ok
    # The reference equals a plain probe of the same init under the same autocast (bf16 rounding apart).
    init = _module(1).model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = storage_features(extract_features(init, cb.reference.spec)).float()
    assert lineage_test(plain, cb.reference.features).z > 0.9 * lineage_test(plain, plain).z
    assert trainer.global_step == STEPS


def test_sharded_swap_raises(tmp_path, strategy):
    import pytorch_lightning as pl
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from seedprints_lightning import IdentityLostError, ProbeSpec, SeedPrintsCallback

    class Swap(pl.Callback):
        """At step 15, another seed's full weights into the wrapped (sharded) module, on every rank."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 15:
                set_model_state_dict(trainer.strategy.model, _module(7).state_dict(),
                                     options=StateDictOptions(full_state_dict=True))

    if strategy == "deepspeed":
        pytest.skip("a full state dict is not loaded into ZeRO-3 partitions this way")
    cb = SeedPrintsCallback(every_n_steps=EVERY, probe=ProbeSpec(num_samples=500, length=16), patience=1,
                            on_identity_lost="raise")
    with pytest.raises(IdentityLostError, match="lost its lineage identity"):
        _fit(tmp_path, strategy, [cb, Swap()])
    assert cb.history[-1]["step"] > 15 and cb.history[-1]["related"] is False
    assert all(h["related"] is True for h in cb.history[:-1])


def test_fsdp1_resume_restores_the_chain(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from seedprints_lightning import ProbeSpec, SeedPrintsCallback

    spec = ProbeSpec(num_samples=500, length=16)
    cb = SeedPrintsCallback(every_n_steps=EVERY, probe=spec)
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=20, save_top_k=-1)
    _fit(tmp_path, "fsdp", [cb, saver], max_steps=20)
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    resumed = SeedPrintsCallback(every_n_steps=EVERY, probe=spec)
    _fit(tmp_path, "fsdp", [resumed], ckpt_path=str(ckpt))
    assert torch.equal(resumed.reference.features, cb.reference.features)
    assert torch.equal(resumed.chain.control_features, cb.chain.control_features)
    first = next(h for h in resumed.history if h["event"] == "resume")
    assert first["step"] == 20 and first["related"] is True


def test_lineage_test_on_cuda_matches_the_cpu():
    from seedprints_lightning import lineage_test

    g = torch.Generator().manual_seed(0)
    base = torch.randn(2000, 512, generator=g)
    target = base + 0.5 * torch.randn(2000, 512, generator=g)
    cpu = lineage_test(base, target)
    cuda = lineage_test(base.cuda(), target.cuda())
    assert cuda.k == cpu.k and cuda.z == pytest.approx(cpu.z, rel=1e-9)


# --------------------------------------------------------------------------------------
# torchtitan: the face's Trainer subclass on the debug model, FlexAttention compiled for CUDA
# --------------------------------------------------------------------------------------


@pytest.fixture()
def titan_rank(monkeypatch):
    """One rank for torchtitan's trainer (it initialises NCCL itself from these variables); torn down after."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:  # a free port for the one-rank rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _titan_config(dump: Path, *, steps: int, **seedprints):
    """``llama3_debugmodel`` through the face's config entry, as torchtitan runs it on a GPU (FlexAttention,
    FSDP2, CUDA graphs), on seeded random documents (tests/titan_cpu.py's tokenizer and data: no files)."""
    pytest.importorskip("torchtitan")
    import titan_cpu

    import seedprints_lightning.faces.torchtitan as face

    config = face.llama3_debugmodel()
    config.training.seq_len = 256
    config.training.local_batch_size = 4
    config.training.steps = steps
    config.validator.enable = False
    config.tokenizer = titan_cpu.TinyTokenizer.Config()
    config.dataloader = titan_cpu.RandomTokens.Config()
    config.dump_folder = str(dump)
    config.checkpoint.enable = True
    config.checkpoint.interval = 3
    for name, value in {"every_n_steps": 3, "adaptive_schedule": False, "num_controls": 2,
                        "on_identity_lost": "raise", **seedprints}.items():
        setattr(config.seedprints, name, value)
    from seedprints_lightning import ProbeSpec

    config.seedprints.probe = ProbeSpec(num_samples=64, length=32)
    return config


def test_torchtitan_face_trains_the_debug_model_and_binds_its_saves(tmp_path, titan_rank):
    from seedprints_lightning.core.titan import extract_features_titan
    from seedprints_lightning.core.verify import verify_chain
    from seedprints_lightning.core.weights import weights_digest
    from seedprints_lightning.offline.titan import load_titan_model

    trainer = _titan_config(tmp_path / "out", steps=6).build()
    trainer.train()
    face, model = trainer.seedprints, trainer.model_parts[0]
    assert [(h["step"], h["related"]) for h in face.history] == [(3, True), (6, True)]
    run = tmp_path / "out" / "seedprints"
    assert verify_chain(run).ok
    records = [json.loads(line) for line in (run / "custody.jsonl").read_text().splitlines() if line.strip()]
    saves = [r for r in records if r.get("kind") == "save"]
    assert [r["step"] for r in saves] == [3, 6]
    # The checkpoint holds exactly the bound weights; its model, rebuilt offline and probed whole on the GPU,
    # gives the live sharded model's (gathered block by block) features.
    offline = load_titan_model(tmp_path / "out" / "checkpoint" / "step-6")
    assert weights_digest(offline.state_dict()) == saves[-1]["weights_sha256"]
    spec = face.reference.spec
    live = extract_features_titan(model, spec)
    rebuilt = extract_features_titan(offline.cuda(), spec)
    assert torch.allclose(live, rebuilt, rtol=1e-5, atol=1e-5), (live - rebuilt).abs().max()
    trainer.close()


def test_torchtitan_face_raises_on_swapped_weights(tmp_path, titan_rank):
    from seedprints_lightning import IdentityLostError

    trainer = _titan_config(tmp_path / "out", steps=6, every_n_steps=1, patience=1).build()
    face, model = trainer.seedprints, trainer.model_parts[0]
    after_step = face.after_step

    def swap_at_step_2(step, *, last):
        if step == 2:  # torchtitan's own init of the sharded model under another seed
            with torch.no_grad():
                torch.manual_seed(7)
                model.init_states(buffer_device=None)
        after_step(step, last=last)

    face.after_step = swap_at_step_2
    with pytest.raises(IdentityLostError, match="at step 2"):
        trainer.train()
    trainer.close()
    assert [h["related"] for h in face.history] == [True, False]
