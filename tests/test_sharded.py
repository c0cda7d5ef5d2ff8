"""The layer-major probe of sharded models (``core/sharded.py``): one gathered block at a time, the LM head never.

The single-process tests run the twin-and-loader mechanics on unsharded models (nothing to
gather); the gloo test shards every supported architecture with FSDP2 over 2 CPU processes.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_layerwise import ARCHS, _model
from torch import nn

from seedprints_lightning.core.errors import InputError
from seedprints_lightning.core.probes import ProbeSpec, extract_features
from seedprints_lightning.core.sharded import (
    GatheredBlockLoader,
    extract_features_gathered,
    holds_dtensors,
    probes_gathered,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(kind: str, model: nn.Module) -> ProbeSpec:
    return ProbeSpec(kind=kind, num_samples=14, length=6, seed=3).resolve(model)


@pytest.mark.parametrize("kind", ["token", "embedding"])
@pytest.mark.parametrize("arch", ARCHS)
def test_twin_probe_of_an_unsharded_model_equals_the_whole_model_probe(arch, kind):
    model = _model(arch)
    spec = _spec(kind, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = GatheredBlockLoader(model)
    got = extract_features_gathered(model, spec, batch_size=5, loader=loader)
    assert torch.allclose(got, extract_features(model, spec), atol=1e-5)
    assert loader.gathered == []  # nothing is sharded: every tensor is used in place, no copy
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is only read
    # The twin is back on meta after the probe: it holds none of the model's weights between probes.
    from seedprints_lightning.core.sharded import _TWINS

    assert all(t.device.type == "meta" for t in _TWINS[model].parameters())


def test_a_slice_of_the_samples_is_that_slice_of_the_features():
    model = _model("qwen2")
    spec = _spec("token", model)
    whole = extract_features(model, spec)
    assert torch.allclose(extract_features_gathered(model, spec, sample_range=(4, 11), batch_size=3), whole[4:11],
                          atol=1e-5)


def test_a_model_changed_after_it_was_built_is_refused_by_key_and_left_as_it_was():
    model = _model("llama")
    model.model.layers[1].mlp.down_proj = nn.Linear(64, 16, bias=False)  # no longer what the config builds
    spec = _spec("token", model)
    with pytest.raises(InputError, match=r"shape \(16, 64\) at 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        extract_features_gathered(model, spec)
    from seedprints_lightning.core.sharded import _TWINS

    assert all(t.device.type == "meta" for t in _TWINS[model].parameters())  # the failed block was put back


def test_only_sharded_splittable_models_take_the_gathered_path():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    llama = _model("llama")
    assert not holds_dtensors(llama) and not probes_gathered(llama)  # unsharded: called as before
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=64))
    assert not probes_gathered(neox)


# ------------------------------------------------------------------ FSDP2 over 2 gloo processes

SHARDED_ARCHS = ["llama", "llama-tied-eager", "qwen2-sliding", "gpt2"]


def _fsdp2_probe(rank: int, world: int, init_file: str, out_dir: str) -> int:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from seedprints_lightning.core.layerwise import split_blocks
    from seedprints_lightning.core.processes import measure_over_ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    report = {}
    for arch in SHARDED_ARCHS:
        for kind in ("token", "embedding"):
            model = _model(arch)
            spec = _spec(kind, model)
            whole = extract_features(model, spec)
            split = split_blocks(model)
            for layer in split.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            forwards = []  # any FSDP module's forward (its hooks gather) would be counted here
            for module in model.modules():
                module.register_forward_pre_hook(lambda m, args, _f=forwards: _f.append(type(m).__name__))
            loader = GatheredBlockLoader(model)
            features = measure_over_ranks(spec, lambda padded, sample_range, _m=model, _l=loader:
                                          extract_features_gathered(_m, padded, sample_range=sample_range,
                                                                    batch_size=4, loader=_l))
            report[f"{arch}/{kind}"] = {
                "max_error": float((features - whole).abs().max()),
                "gathered": loader.gathered,
                "state_dict_keys": list(model.state_dict()),
                "forwards": forwards,
                "still_sharded": all(isinstance(p, DTensor) for p in model.parameters()),
                "samples": int(features.shape[0]),
            }
    # Row-block gathers equal DTensor.full_tensor(): uneven shards, a rank with no rows, steps of 1 row and more.
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import Replicate, Shard

    from seedprints_lightning.core.sharded import gather_full_tensor

    exact = []
    for shape, placement, step_bytes in [((7, 3), Shard(0), 1), ((7, 3), Shard(0), 10**6), ((1, 4), Shard(0), 8),
                                         ((6,), Shard(0), 8), ((4, 6), Shard(1), 8), ((5, 2), Replicate(), 8)]:
        full = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
        gathered = gather_full_tensor(distribute_tensor(full, mesh, [placement]), step_bytes=step_bytes)
        exact.append(torch.equal(gathered, full))
    report["row_gathers_exact"] = exact
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(report, handle)
    return 0


def _fsdp2_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """_fsdp2_probe in a spawned process, ending as every multi-process test does (conftest.exit_after_report)."""
    from conftest import exit_after_report

    exit_after_report(lambda: _fsdp2_probe(rank, world, init_file, out_dir))


@pytest.mark.slow
def test_fsdp2_models_are_probed_one_gathered_block_at_a_time(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp2_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report.pop("row_gathers_exact") == [True] * 6
    for case, rank0 in reports[0].items():
        rank1 = reports[1][case]
        # Both ranks test the same features (rank 0's, broadcast), equal to the unsharded model's: float tolerance.
        assert rank0["max_error"] == rank1["max_error"] and rank0["max_error"] < 1e-5, case
        assert rank0["samples"] == 14
        gathered, keys = rank0["gathered"], rank0["state_dict_keys"]
        assert gathered == rank1["gathered"]  # the same collectives in the same order on every rank
        assert not any(k.startswith("lm_head") for k in gathered), case  # the LM head is never gathered
        token_embedding = "transformer.wte.weight" if case.startswith("gpt2") else "model.embed_tokens.weight"
        # Token probes gather the token embedding; embedding probes feed inputs_embeds and never read it.
        assert (token_embedding in gathered) == case.endswith("/token"), case
        expected = [k for k in keys if not k.startswith("lm_head")
                    and (case.endswith("/token") or k != token_embedding)]
        assert sorted(gathered) == sorted(expected), case  # every other weight once
        assert len(gathered) == len(set(gathered))
        assert rank0["forwards"] == [] and rank0["still_sharded"], case  # no FSDP hook ran; nothing was unsharded


# ------------------------------------------------------------------ a hand-written FSDP2 loop (SeedPrintsMonitor)


def _monitor_run(rank: int, world: int, init_file: str, out_dir: str, swap_at: int | None) -> int:
    import warnings

    import torch.distributed as dist
    from conftest import count_probed_samples, make_tiny_lm
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from seedprints_lightning import IdentityLostError, SeedPrintsMonitor

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    probed: list[int] = []
    paths: list[str] = []
    count_probed_samples(probed, paths)
    mesh = init_device_mesh("cpu", (world,))
    model = make_tiny_lm(0).train()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = SeedPrintsMonitor(every_n_steps=2, adaptive_schedule=False, probe=ProbeSpec(num_samples=60, length=8),
                                num_controls=2, save_dir=f"{out_dir}/seedprints",
                                **(dict(patience=1, on_identity_lost="raise") if swap_at else {}))
    data = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    error = None
    monitor.start(model)
    try:
        for step in range(1, 7):
            model(input_ids=data, labels=data).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == swap_at:  # another run's full weights into every rank's shards
                set_model_state_dict(model, make_tiny_lm(7).state_dict(),
                                     options=StateDictOptions(full_state_dict=True))
            monitor.step(model, step)
        monitor.end(model)
    except IdentityLostError as exc:
        error = str(exc)
    dist.barrier()
    report = {"probed": probed, "paths": sorted(set(paths)), "error": error,
              "history": [{k: v for k, v in h.items() if k != "probe_seconds"} for h in monitor.history]}
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(report, handle)
    return 0


def _monitor_worker(rank: int, world: int, init_file: str, out_dir: str, swap_at: int | None) -> None:
    """_monitor_run in a spawned process, ending as every multi-process test does (conftest.exit_after_report)."""
    from conftest import exit_after_report

    exit_after_report(lambda: _monitor_run(rank, world, init_file, out_dir, swap_at))


@pytest.mark.slow
@pytest.mark.parametrize("swap_at", [None, 3])
def test_an_own_fsdp2_loop_keeps_its_chain_and_a_swap_raises_on_every_rank(tmp_path, swap_at):
    import torch.multiprocessing as mp

    from seedprints_lightning.core.verify import verify_chain

    mp.spawn(_monitor_worker, args=(2, str(tmp_path / "init"), str(tmp_path), swap_at), nprocs=2, join=True)
    rank0, rank1 = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert rank0["history"] == rank1["history"]  # every rank tested the same features and decided alike
    for report in (rank0, rank1):
        assert report["paths"] == ["gathered"]  # never a forward through FSDP2's root
        assert set(report["probed"]) == {30}  # each rank probes half of the 60 samples
    steps = [(h["step"], h["related"]) for h in rank0["history"]]
    if swap_at is None:
        assert steps == [(2, True), (4, True), (6, True)] and rank0["error"] is None
        audit = verify_chain(tmp_path / "seedprints")
        assert audit.ok and len(audit.records) == 3, audit.problems
    else:
        assert steps == [(2, True), (4, False)]
        assert all("at step 4" in report["error"] for report in (rank0, rank1))
