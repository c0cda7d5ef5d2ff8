"""SeedPrintsCallback under DDP and FSDP2: 2 CPU processes (gloo), run in a subprocess with a timeout.

FSDP2 is Lightning's ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with
``fully_shard`` on every decoder layer and then on the root causal LM in ``configure_model``:
the parameters are DTensors, every probe forward is a collective, and the probe must go through
the root module (calling the inner decoder fails with "mixed torch.Tensor and DTensor").

Slow (two processes importing torch, transformers and Lightning): two small fits in total.
The fit runs this file as a script under ``strategy="ddp"`` (Lightning re-launches the script
for rank 1); each rank writes what it saw to ``<out>/rank<r>.json``, and the test compares
the ranks with each other and with a single-process probe of the same weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
VOCAB = 64
TIMEOUT_S = 420

pytestmark = pytest.mark.slow  # every test spawns a 2-process fit


def make_lm(seed: int):
    """conftest's tiny llama (importable here too: running this file as a script puts tests/ on sys.path)."""
    from conftest import make_tiny_lm

    return make_tiny_lm(seed, vocab_size=VOCAB)


def _worker(mode: str, out: Path) -> int:
    """The DDP script: one fit on 2 CPU processes; every rank writes ``rank<r>.json``."""
    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl

    from seedprints_lightning import IdentityLostError, ProbeSpec, SeedPrintsCallback

    class TinyLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_lm(0).train()  # Lightning keeps a submodule's mode

        def training_step(self, batch, batch_idx):
            ids = batch[0]
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    class Swap(pl.Callback):
        def __init__(self, at: int):
            self.at, self.done = at, False

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.at and not self.done:
                self.done = True
                foreign = make_lm(7).state_dict()
                if mode.startswith("fsdp2"):  # full tensors into the DTensor shards, on every rank
                    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                    set_model_state_dict(pl_module.model, foreign, options=StateDictOptions(full_state_dict=True))
                else:
                    pl_module.model.load_state_dict(foreign)

    class ShardedLM(TinyLM):
        """FSDP2: every decoder layer, then the root causal LM, fully_shard-ed over the data-parallel mesh."""

        def __init__(self):
            pl.LightningModule.__init__(self)
            self.model = None

        def configure_model(self):
            if self.model is not None:
                return
            from torch.distributed.fsdp import fully_shard

            self.model = make_lm(0).train()
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=3e-3)

    # Count the samples each rank probes: with 2 ranks each probes half of them.
    from conftest import count_probed_samples

    probed: list[int] = []
    paths: list[str] = []
    count_probed_samples(probed, paths)
    sharded = mode.startswith("fsdp2")
    common = dict(probe=ProbeSpec(num_samples=120, length=8), num_controls=2, adaptive_schedule=False,
                  save_dir=out / "seedprints")
    if mode.endswith("kept") or mode.endswith("save"):
        cb = SeedPrintsCallback(every_n_steps=3, **common)
        callbacks, max_steps = [cb], 6
    elif mode.endswith("resume"):
        cb = SeedPrintsCallback(every_n_steps=3, **common)
        callbacks, max_steps = [cb], 9
    else:
        cb = SeedPrintsCallback(every_n_steps=2, patience=1, on_identity_lost="raise", **common)
        callbacks, max_steps = [cb, Swap(at=3)], 20
    data = torch.randint(0, VOCAB, (64, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)
    if sharded:
        from pytorch_lightning.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=str(out))
    module = ShardedLM() if sharded else TinyLM()
    error = None
    try:
        # A distributed (sharded) checkpoint directory under FSDP2: the callback state rides in its metadata.
        trainer.fit(module, loader, ckpt_path=str(out / "ckpt") if mode.endswith("resume") else None)
    except IdentityLostError as exc:
        error = exc
    # No rank may be left inside a collective, after a clean end or after IdentityLostError alike: a
    # monitored barrier names the rank that does not arrive (and fails this script) instead of hanging.
    import datetime

    import torch.distributed as dist

    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    if mode.endswith("save"):
        trainer.save_checkpoint(out / "ckpt")
    rank = trainer.global_rank
    report = {"rank": rank, "world_size": trainer.world_size, "global_step": trainer.global_step, "probed": probed,
              "history": cb.history, "paths": sorted(set(paths)), "error": type(error).__name__ if error else None,
              "message": str(error) if error else None, "barrier_after_fit": True}
    if sharded:  # the end probe ran no backward: its forwards' gathered root must have been freed again
        from torch.distributed.tensor import DTensor

        report["root_sharded_after_fit"] = isinstance(module.model.get_input_embeddings().weight, DTensor)
    (out / f"{mode}-rank{rank}.json" if mode.endswith(("save", "resume")) else out / f"rank{rank}.json").write_text(
        json.dumps(report))
    if error is None:
        if sharded:  # gather the full weights (a collective: every rank calls it)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save(state, out / "final_rank0.pt")
        else:
            torch.save(module.model.state_dict(), out / f"final_rank{rank}.pt")
    return 3 if error is not None else 0


def _run(mode: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no network here: keep gloo on the loopback
    proc = subprocess.Popen([sys.executable, str(HERE), mode, str(out)], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # this process group: the script and the rank it launched
        stdout, _ = proc.communicate()
        pytest.fail(f"DDP fit ({mode}) hung for {TIMEOUT_S}s:\n{stdout[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, None)


def _reports(out: Path, result: subprocess.CompletedProcess) -> list[dict]:
    files = sorted(out.glob("rank*.json"))
    assert len(files) == 2, f"expected a report from both ranks, got {files}; output:\n{result.stdout[-4000:]}"
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.parametrize("mode", ["kept", "fsdp2-kept"])
def test_two_cpu_processes_match_single_process(tmp_path, mode):
    from seedprints_lightning import Fingerprint, extract_features, lineage_test
    from seedprints_lightning.core.controls import ControlSet
    from seedprints_lightning.core.ledger import storage_features
    from seedprints_lightning.core.verify import verify_chain

    result = _run(mode, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    rank0, rank1 = _reports(tmp_path, result)
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    assert [h["step"] for h in rank0["history"]] == [3, 6] == [h["step"] for h in rank1["history"]]
    # The probe is split over the ranks: each probed 60 of the 120 samples per measurement (the
    # step-0 reference and two probes); the controls are split over the ranks and drawn block by block.
    for report in (rank0, rank1):
        assert [p for p in report["probed"] if p != 120] == [60, 60, 60], report["probed"]
        if mode.startswith("fsdp2"):  # the probe leaves FSDP2's root sharded, as it found it
            assert report["root_sharded_after_fit"] is True
        # FSDP2 is probed one gathered block at a time, never through its root's forward; DDP calls the model.
        assert report["paths"] == (["gathered"] if mode.startswith("fsdp2") else ["called"])
    assert all(h["related"] is True for h in rank0["history"] + rank1["history"])
    for h0, h1 in zip(rank0["history"], rank1["history"]):
        assert h0["z"] == pytest.approx(h1["z"], rel=1e-9) and h0["control_z"] == pytest.approx(
            h1["control_z"], rel=1e-9
        )

    # The step-0 reference equals a single-process fingerprint of the same init.
    reference = Fingerprint.load(tmp_path / "seedprints" / "reference.safetensors")
    single_init = extract_features(make_lm(0), reference.spec)
    assert torch.allclose(reference.features, single_init, atol=1e-6)

    # The last probe's figures equal a single-process probe of the final (rank-0) weights.
    final = make_lm(0)
    final.load_state_dict(torch.load(tmp_path / "final_rank0.pt", weights_only=True))
    if mode == "kept":
        weights1 = torch.load(tmp_path / "final_rank1.pt", weights_only=True)
        assert all(torch.equal(v, weights1[k]) for k, v in final.state_dict().items())  # DDP kept ranks in sync
    # The callback tests the features as its ledger stores them (fp16-rounded).
    live = storage_features(extract_features(final, reference.spec)).float()
    z = lineage_test(reference.features, live).z
    assert rank0["history"][-1]["z"] == pytest.approx(z, rel=1e-6)
    controls = ControlSet.load(tmp_path / "seedprints" / "controls.safetensors").features
    control_z = [lineage_test(c, live).z for c in controls]
    assert rank0["history"][-1]["control_z"] == pytest.approx(control_z, rel=1e-6)
    audit = verify_chain(tmp_path / "seedprints")  # rank 0 wrote one ledger, and it re-verifies
    assert audit.ok and len(audit.records) == 2, audit.problems


@pytest.mark.parametrize("mode", ["raise", "fsdp2-raise"])
def test_two_cpu_processes_swap_raises_on_every_rank(tmp_path, mode):
    result = _run(mode, tmp_path)
    assert result.returncode == 3, result.stdout[-4000:]
    reports = _reports(tmp_path, result)
    for report in reports:
        assert report["error"] == "IdentityLostError", report
        assert report["barrier_after_fit"] is True  # raising left no rank inside a collective
        assert "at step 4" in report["message"] and "custody link from step 2" in report["message"]
        assert [(h["step"], h["related"]) for h in report["history"]] == [(2, True), (4, False)]
        assert report["global_step"] == 4


if __name__ == "__main__":
    from conftest import exit_after_report  # the script's own folder is on sys.path

    exit_after_report(lambda: _worker(sys.argv[1], Path(sys.argv[2])))


def test_fsdp2_resume_links_to_the_last_probe_before_the_save(tmp_path):
    from seedprints_lightning.core.verify import verify_chain

    saved = _run("fsdp2-save", tmp_path)
    assert saved.returncode == 0, saved.stdout[-4000:]
    resumed = _run("fsdp2-resume", tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    reports = [json.loads((tmp_path / f"fsdp2-resume-rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        history = report["history"]
        # Steps 3 and 6 come back with the state; the resume probe links step 6's weights to step 6's probe.
        assert [(h["step"], h["event"]) for h in history] == [(3, "interval"), (6, "interval"), (6, "resume"),
                                                              (9, "interval")]
        assert history[2]["anchor_step"] == 6 and all(h["related"] is True for h in history)
        assert report["global_step"] == 9
    timeless = [[{k: v for k, v in h.items() if k != "probe_seconds"} for h in r["history"]] for r in reports]
    assert timeless[0] == timeless[1]  # every rank saw the same figures
    audit = verify_chain(tmp_path / "seedprints")
    assert audit.ok and [r["event"] for r in audit.records] == ["interval", "interval", "resume", "interval"]
    # The sharded (DCP) checkpoint directory is audited as it is: its meta.pt holds the callback state,
    # and the shards are gathered offline into the model its config describes.
    from seedprints_lightning.offline.cli import EXIT_OK, main

    assert (tmp_path / "ckpt" / ".metadata").is_file() and (tmp_path / "ckpt" / "meta.pt").is_file()
    assert main(["audit", "--chain", str(tmp_path / "seedprints"), str(tmp_path / "ckpt"), "-q"]) == EXIT_OK
