"""DeepSpeed ZeRO-3 on 2 CPU ranks (torchrun, gloo, ``DS_ACCELERATOR=cpu``): one gathered block at a time.

Under ZeRO-3 every parameter's local tensor is empty and each rank keeps a flat slice of it. A probe
gathers one block's parameters with ``deepspeed.zero.GatheredParameters`` on every rank in lockstep
(:mod:`seedprints_lightning.core.sharded`), never the whole model and never the LM head, and a save
record's weights digest is computed one gathered tensor at a time. Tested through
``SeedPrintsMonitor`` on a ``deepspeed.initialize`` engine in a loop of our own, and through the
Hugging Face ``Trainer`` face with ``TrainingArguments(deepspeed=...)``.

This file is also the torchrun script: ``python -m torch.distributed.run --nproc-per-node 2
tests/test_deepspeed.py MODE OUT`` (each rank writes ``OUT/rank<r>.json``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

# The script's ranks run DeepSpeed on the CPU (gloo) even on a GPU machine; set before anything imports deepspeed.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import count_probed_samples, exit_after_report, make_tiny_lm, torchrun_reports  # noqa: E402

from seedprints_lightning import ProbeSpec  # noqa: E402
from seedprints_lightning.core.sharded import (  # noqa: E402
    gathered_input_embedding,
    holds_zero3_params,
    probes_gathered,
    weights_digest_gathered,
)
from seedprints_lightning.core.weights import weights_digest  # noqa: E402
from seedprints_lightning.offline.cli import EXIT_OK  # noqa: E402
from seedprints_lightning.offline.cli import main as seedprints_main  # noqa: E402

SPEC = ProbeSpec(num_samples=60, length=8)
#: ZeRO-3 with every parameter partitioned (the default persistence threshold, 1e5 elements, would keep
#: every weight of the tiny model whole on each rank) and a torch optimizer (DeepSpeed's CPU Adam is a C++ op).
ZERO3 = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def _deepspeed_on_cpu():
    """Import DeepSpeed for the CPU accelerator, without its shared-memory all-reduce op.

    On the CPU accelerator, DeepSpeed's communication backend JIT-compiles ``deepspeed_shm_comm``
    (ninja and a C++ compiler: about 100 s on 2 cores, once per machine) when it starts. That op
    serves only ``inference_all_reduce`` (DeepSpeed-Inference's tensor parallelism), which neither a
    training step nor a probe calls, so the tests skip building it.
    """
    import importlib

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def _history(face) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "probe_seconds"} for h in face.history]


# ---------------------------------------------------------------------- without DeepSpeed


def test_an_unsharded_model_is_not_taken_for_zero3_and_its_gathered_digest_is_the_plain_one():
    model = make_tiny_lm(0)
    assert not holds_zero3_params(model) and not probes_gathered(model)  # called as before
    with gathered_input_embedding(model):  # a no-op context: nothing to gather
        pass
    # The per-tensor walk of weights_digest_gathered is weights_digest's: the same names, dtypes and bytes.
    assert weights_digest_gathered(model, writer=True) == weights_digest(model.state_dict())
    assert weights_digest_gathered(model, writer=False) == ""  # only the writer's digest is recorded


# ---------------------------------------------------------------------- 2 ranks under torchrun


def _check_same_decisions(rank0: dict, rank1: dict, *keys: str) -> None:
    for key in keys:
        assert rank0[key] == rank1[key], key  # every rank tested the same features and decided alike


@pytest.mark.slow
def test_a_zero3_engine_loop_probes_block_by_block_binds_its_save_and_a_swap_raises_on_both_ranks(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    rank0, rank1 = torchrun_reports(__file__, "engine", tmp_path)
    _check_same_decisions(rank0, rank1, "history", "swap_history", "gathered")
    for report in (rank0, rank1):
        assert report["partitioned"] and report["probes_gathered"] and report["still_partitioned"]
        assert report["still_partitioned_in_training"]  # the probes between steps left every weight partitioned
        # Bit for bit the unsharded model's features, for token and embedding probes (equal batches).
        assert report["exact"] == {"token": True, "embedding": True}
        assert report["reference_max_error"] == 0.0  # the monitor's reference, each rank probing half
        assert set(report["paths"]) == {"gathered"}  # never a forward through DeepSpeed's hooks
        keys = report["state_dict_keys"]
        for kind, gathered in report["gathered"].items():
            assert not any(k.startswith("lm_head") for k in gathered)  # the LM head is never gathered
            # Token probes gather the token embedding; embedding probes feed inputs_embeds and never read it.
            expected = [k for k in keys if not k.startswith("lm_head")
                        and (kind == "token" or k != "model.embed_tokens.weight")]
            assert sorted(gathered) == sorted(expected) and len(gathered) == len(set(gathered)), kind
        assert report["client_state_step"] == 4  # the monitor's state came back from engine.load_checkpoint
        assert report["resume"] == ["resume", True]  # and the loaded weights linked to the restored chain
        assert [(h["step"], h["related"]) for h in report["history"]] == [(2, True), (4, True)]
        assert [(h["step"], h["related"]) for h in report["swap_history"]] == [(2, True), (4, False)]
        assert report["error"] is not None and "at step 4" in report["error"]
        assert report["resolved_std"] == report["embedding_std"]  # resolved from the gathered embedding
    # The healthy chain holds, and DeepSpeed's consolidated checkpoint holds exactly the weights the save recorded
    # (digested one gathered tensor at a time on the ranks).
    assert seedprints_main(["audit", "--chain", str(tmp_path / "seedprints"), str(tmp_path / "consolidated")]) \
        == EXIT_OK
    out = capsys.readouterr().out
    assert "holds exactly the weights saved at step 4" in out and "descends (" in out


@pytest.mark.slow
def test_the_hf_trainer_with_zero3_is_probed_block_by_block_and_its_checkpoint_is_recognised(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    rank0, rank1 = torchrun_reports(__file__, "hf", tmp_path)
    _check_same_decisions(rank0, rank1, "history")
    for report in (rank0, rank1):
        assert report["partitioned"]  # built under deepspeed.zero.Init by transformers itself
        assert report["reference_max_error"] == 0.0
        assert set(report["paths"]) == {"gathered"}
        assert [(h["step"], h["related"]) for h in report["history"]] == [(2, True), (4, True)]
    # checkpoint-4 holds the model gathered by DeepSpeed (stage3_gather_16bit_weights_on_model_save) in float32.
    assert seedprints_main(["audit", "--chain", str(tmp_path / "hf" / "seedprints"),
                            str(tmp_path / "hf" / "checkpoint-4")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "holds exactly the weights saved at step 4" in out and "descends (" in out


# ---------------------------------------------------------------------- the torchrun script


def _engine_worker(out: Path) -> int:
    """A loop of our own on a ZeRO-3 engine: the features, a healthy chain with a bound save, then a swap."""
    deepspeed = _deepspeed_on_cpu()
    import torch.distributed as dist

    from seedprints_lightning import IdentityLostError, SeedPrintsMonitor, extract_features
    from seedprints_lightning.core.sharded import GatheredBlockLoader, extract_features_gathered

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    probed: list[int] = []
    paths: list[str] = []
    count_probed_samples(probed, paths)
    data = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(rank))  # each rank its own batch

    def train_step():
        engine.backward(engine(input_ids=data, labels=data).loss)
        engine.step()

    report: dict = {"rank": rank}
    # 1. The gathered probe's features equal the unsharded model's, bit for bit, for both probe kinds.
    model = make_tiny_lm(0).train()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
                                      config=ZERO3)
    lm = engine.module
    report["partitioned"] = all(p.numel() == 0 and hasattr(p, "ds_id") for p in lm.parameters())
    report["probes_gathered"] = probes_gathered(lm)
    unsharded = make_tiny_lm(0)
    report["exact"], report["gathered"] = {}, {}
    for kind in ("token", "embedding"):
        spec = ProbeSpec(kind=kind, num_samples=SPEC.num_samples, length=SPEC.length).resolve(unsharded)
        loader = GatheredBlockLoader(lm)
        features = extract_features_gathered(lm, spec, loader=loader)
        report["exact"][kind] = bool(torch.equal(features, extract_features(unsharded, spec)))
        report["gathered"][kind] = loader.gathered
    report["still_partitioned"] = all(p.numel() == 0 for p in lm.parameters())
    report["state_dict_keys"] = list(lm.state_dict())

    # 2. A healthy run on the same, still untrained engine: the monitor's reference is the unsharded model's
    # features; a save is bound.
    monitor = SeedPrintsMonitor(every_n_steps=2, adaptive_schedule=False, probe=SPEC, num_controls=2,
                                save_dir=out / "seedprints")
    monitor.start(lm)
    report["reference_max_error"] = float((monitor.reference.features - extract_features(unsharded, SPEC))
                                          .abs().max())
    for step in range(1, 5):
        train_step()
        monitor.step(lm, step)
    report["still_partitioned_in_training"] = all(p.numel() == 0 for p in lm.parameters())
    engine.save_checkpoint(str(out / "ds"), tag="step4", client_state={"seedprints": monitor.state_dict(lm)})
    monitor.end(lm)
    report["history"] = _history(monitor)
    if rank == 0:  # the checkpoint consolidated by DeepSpeed's own zero_to_fp32, as a model directory to audit
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        consolidated = make_tiny_lm(0)
        consolidated.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(out / "ds"), tag="step4"))
        consolidated.save_pretrained(out / "consolidated")
    # A resume: the state comes back from engine.load_checkpoint; the loaded weights are linked to the chain at once.
    _, client = engine.load_checkpoint(str(out / "ds"), tag="step4")
    report["client_state_step"] = client["seedprints"]["step"] if client else None
    resumed = SeedPrintsMonitor(every_n_steps=2, adaptive_schedule=False, probe=SPEC, num_controls=2,
                                save_dir=out / "seedprints")
    resumed.load_state_dict(client["seedprints"])
    verdict = resumed.start(lm, step=4)
    report["resume"] = [resumed.history[-1]["event"], bool(verdict.related)]
    train_step()
    resumed.end(lm, 5)
    dist.barrier()

    # 3. Another run's weights swapped in mid-run: raised on both ranks at the next probe. The same engine (one
    # initialize less), its weights trained 4 steps: a new run from them, with a new reference.
    # Embedding probes this time: their mean and std are read from the embedding, gathered for it.
    monitor = SeedPrintsMonitor(every_n_steps=2, adaptive_schedule=False, num_controls=2, patience=1,
                                probe=ProbeSpec(kind="embedding", num_samples=SPEC.num_samples, length=SPEC.length),
                                on_identity_lost="raise", save_dir=out / "swap")
    with deepspeed.zero.GatheredParameters([lm.model.embed_tokens.weight], modifier_rank=None):
        embedding = lm.model.embed_tokens.weight.detach().float()
        report["embedding_std"] = [float(embedding.mean()), float(embedding.std())]
    monitor.start(lm)
    report["resolved_std"] = [monitor.reference.spec.embed_mean, monitor.reference.spec.embed_std]
    foreign = make_tiny_lm(7).state_dict()
    report["error"] = None
    try:
        for step in range(1, 7):
            train_step()
            # Rank 0 writes another run's weights, one gathered tensor at a time, broadcast on exit. Right before the
            # probe: ZeRO-3's optimizer keeps its own fp32 copy of each partition and writes it back at every step.
            if step == 4:
                for name, param in lm.named_parameters():
                    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                        if rank == 0:
                            param.data.copy_(foreign[name])
            monitor.step(lm, step)
    except IdentityLostError as exc:
        report["error"] = str(exc)
    monitor.close()
    report["swap_history"] = _history(monitor)
    report["paths"] = sorted(set(paths))
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


def _hf_worker(out: Path) -> int:
    """The Hugging Face ``Trainer`` with ``TrainingArguments(deepspeed=...)`` and SeedPrintsTrainerCallback."""
    deepspeed = _deepspeed_on_cpu()
    import torch.distributed as dist
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from seedprints_lightning import SeedPrintsTrainerCallback, extract_features

    config = {**ZERO3, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_optimization": {**ZERO3["zero_optimization"], "stage3_gather_16bit_weights_on_model_save": True}}
    args = TrainingArguments(output_dir=str(out / "hf"), deepspeed=config, max_steps=4, per_device_train_batch_size=4,
                             learning_rate=3e-3, lr_scheduler_type="constant", save_strategy="steps", save_steps=4,
                             logging_steps=1, report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True)
    rank = dist.get_rank()
    paths: list[str] = []
    count_probed_samples([], paths)
    # Built after the arguments: transformers builds it under deepspeed.zero.Init, partitioned from the start.
    model = AutoModelForCausalLM.from_config(tiny_config())
    unsharded = make_tiny_lm(0)  # the same weights, whole: copied one gathered tensor at a time
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            unsharded.get_parameter(name).data.copy_(param.data)
    report = {"rank": rank, "partitioned": all(p.numel() == 0 for p in model.parameters())}
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    callback = SeedPrintsTrainerCallback(every_n_steps=2, adaptive_schedule=False, probe=SPEC, num_controls=2)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    report["reference_max_error"] = float((callback.reference.features - extract_features(unsharded, SPEC))
                                          .abs().max())
    report["history"] = _history(callback)
    report["paths"] = sorted(set(paths))
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    workers = {"engine": _engine_worker, "hf": _hf_worker}
    exit_after_report(lambda: workers[sys.argv[1]](Path(sys.argv[2])))
