"""LitGPT's GPT probed block by block (``core/litgpt.py``): layer-major, one gathered block at a time under FSDP2,
and controls drawn block by block, each bit for bit the whole forward's features.

Two tiny architectures from ``litgpt.Config``: pythia-14m's (parallel residual, LayerNorm, a quarter of each head
rotated, biases) with 2 layers, and a LLaMA-like one with 3 layers (GQA: 4 heads over 2 query groups, RMSNorm,
LLaMAMLP, no biases, sequential residual, ``scale_embeddings``). 14 probe samples in batches of 5, so the last
batch is short. Every comparison is ``torch.equal``: the layer-major probe runs the same computations as the
whole forward, on the same batches, in another order.
"""

from __future__ import annotations

import json

import pytest
import torch
from litgpt.config import Config
from litgpt.model import GPT

from seedprints_lightning import InputError, ProbeSpec
from seedprints_lightning.core.litgpt import (
    LitGPTStreamedInit,
    build_litgpt_control,
    extract_features_litgpt_gathered,
    extract_features_litgpt_layerwise,
    litgpt_features,
    probe_litgpt_streamed_control,
    resolve_litgpt_spec,
)
from seedprints_lightning.core.probes import extract_features
from seedprints_lightning.core.sharded import GatheredBlockLoader

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, LENGTH, BATCH = 14, 16, 5
ARCHS = ["pythia", "llama"]


def config(arch: str) -> Config:
    if arch == "pythia":
        return Config.from_name("pythia-14m", n_layer=2, vocab_size=96, padded_vocab_size=96, block_size=64)
    return Config(name="tiny-llama", block_size=64, vocab_size=96, padded_vocab_size=96, n_layer=3, n_head=4,
                  n_query_groups=2, n_embd=64, rotary_percentage=1.0, parallel_residual=False, bias=False,
                  norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128, scale_embeddings=True)


def spec_for(model: torch.nn.Module, kind: str) -> ProbeSpec:
    return resolve_litgpt_spec(ProbeSpec(kind=kind, num_samples=N, length=LENGTH, seed=4), model)


def whole(model: torch.nn.Module, spec: ProbeSpec, batch_size: int = BATCH,
          sample_range: tuple[int, int] | None = None) -> torch.Tensor:
    """The whole-forward features (GPT.forward up to ln_f), the reference of every test here."""
    return extract_features(model, spec, batch_size=batch_size, sample_range=sample_range,
                            forward_fn=lambda batch: litgpt_features(model, batch))


# --------------------------------------------------------------------------------------
# Layer-major probe of an unsharded GPT
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["token", "embedding"])
@pytest.mark.parametrize("arch", ARCHS)
def test_layer_major_features_equal_a_whole_forward_bit_for_bit(arch, kind):
    model = build_litgpt_control(config(arch), 3)
    spec = spec_for(model, kind)
    expected = whole(model, spec)
    got = extract_features_litgpt_layerwise(model, spec, batch_size=BATCH)
    assert got.shape == (N, model.config.n_embd) and got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.equal(got, expected)
    # A slice of the samples (what one rank probes), batches not dividing it either.
    part = extract_features_litgpt_layerwise(model, spec, batch_size=3, sample_range=(4, 11))
    assert torch.equal(part, whole(model, spec, batch_size=3, sample_range=(4, 11)))
    assert torch.equal(part, expected[4:11]) or (part - expected[4:11]).abs().max() < 1e-6  # other batches: floats


def test_a_shorter_max_seq_length_and_a_fabric_wrapped_gpt_are_probed_as_their_forward():
    import lightning as L

    model = build_litgpt_control(config("llama"), 5)
    model.max_seq_length = 20  # litgpt pretrain sets it from train.max_seq_length: a shorter rope cache
    wrapped = L.Fabric(accelerator="cpu", devices=1).setup_module(model)
    spec = spec_for(wrapped, "token")
    assert torch.equal(extract_features_litgpt_layerwise(wrapped, spec, batch_size=BATCH), whole(model, spec))


def test_the_probe_leaves_weights_modes_modules_and_rng_as_they_were():
    model = build_litgpt_control(config("llama"), 6)
    model.train()
    model.transformer.h[1].eval()  # a user's own mode choice, kept
    modes = {name: m.training for name, m in model.named_modules()}
    modules = list(model.modules())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    for kind in ("token", "embedding"):
        extract_features_litgpt_layerwise(model, spec_for(model, kind), batch_size=BATCH)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert list(model.modules()) == modules  # every block and ln_f swapped back
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)


@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_the_loader_is_called_once_per_block_in_forward_order_and_released(kind):
    model = build_litgpt_control(config("llama"), 7)
    calls, released = [], []

    def loader(name, module):
        assert module is model.get_submodule(name)  # named as in the state dict
        calls.append(name)
        return lambda: released.append(name)

    features = extract_features_litgpt_layerwise(model, spec_for(model, kind), batch_size=BATCH, loader=loader)
    blocks = ["transformer.h.0", "transformer.h.1", "transformer.h.2", "transformer.ln_f"]
    # Embedding probes never read wte; the LM head never runs.
    assert calls == (["transformer.wte"] if kind == "token" else []) + blocks
    assert released == calls
    assert torch.equal(features, whole(model, spec_for(model, kind)))


@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_a_meta_twin_filled_block_by_block_from_the_live_gpt_equals_its_whole_forward(kind):
    # The gathered probe's mechanics in one process: nothing to gather, the live tensors are used as they are.
    live = build_litgpt_control(config("pythia"), 8)
    with torch.device("meta"):
        twin = GPT(config("pythia"))
    loader = GatheredBlockLoader(live)
    spec = spec_for(live, kind)
    got = extract_features_litgpt_layerwise(twin, spec, batch_size=BATCH, loader=loader)
    assert torch.equal(got, whole(live, spec))
    assert not any(key.startswith("lm_head") for key in loader.gathered)
    assert all(t.device.type == "meta" for t in twin.state_dict().values())  # emptied again after each block


def test_bad_arguments_are_refused_with_the_fix():
    model = build_litgpt_control(config("pythia"), 0)
    spec = spec_for(model, "token")
    with pytest.raises(InputError, match="must be a ProbeSpec"):
        extract_features_litgpt_layerwise(model, {"kind": "token"})
    with pytest.raises(InputError, match="no LitGPT GPT"):
        extract_features_litgpt_layerwise(torch.nn.Linear(2, 2), spec)
    with pytest.raises(InputError, match="not both"):
        extract_features_litgpt_layerwise(model, spec, loader=lambda *_: None, block_loader=lambda *_: None)
    with pytest.raises(InputError, match="return None or a callable"):
        extract_features_litgpt_layerwise(model, spec, loader=lambda *_: 3)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features_litgpt_layerwise(model, spec, batch_size=0)
    with torch.device("meta"):
        twin = GPT(config("pythia"))
    with pytest.raises(InputError, match="meta device and no loader"):
        extract_features_litgpt_layerwise(twin, spec)
    with pytest.raises(InputError, match="resolved spec"):
        extract_features_litgpt_layerwise(twin, ProbeSpec(kind="embedding"), loader=GatheredBlockLoader(model))
    with pytest.raises(InputError, match="not sharded"):
        extract_features_litgpt_gathered(model, spec)
    assert extract_features_litgpt_layerwise(model, spec, sample_range=(5, 5)).numel() == 0


# --------------------------------------------------------------------------------------
# Controls drawn block by block
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["token", "embedding"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_streamed_control_is_bit_for_bit_the_whole_control(arch, kind):
    cfg = config(arch)
    control = build_litgpt_control(cfg, 1_000_003)
    spec = spec_for(control, kind)  # embedding probes: the run's resolved spec (here the control's own)
    rng = torch.random.get_rng_state()
    streamed = probe_litgpt_streamed_control(cfg, 1_000_003, spec, batch_size=BATCH)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(streamed, whole(control, spec))
    other = probe_litgpt_streamed_control(cfg, 1_000_004, spec, batch_size=BATCH)
    assert not torch.allclose(other, streamed, atol=1e-3)  # another seed, other weights


def test_a_streamed_control_in_bfloat16_equals_the_whole_bfloat16_control():
    cfg = config("llama")
    control = build_litgpt_control(cfg, 9, dtype=torch.bfloat16)
    spec = spec_for(control, "token")
    streamed = probe_litgpt_streamed_control(cfg, 9, spec, batch_size=BATCH, dtype=torch.bfloat16)
    assert torch.equal(streamed, whole(control, spec))


def test_the_stream_draws_every_unit_in_module_order_each_block_alone():
    cfg = config("pythia")
    with torch.device("meta"):
        skeleton = GPT(cfg)
    stream = LitGPTStreamedInit(skeleton, 2)
    live = []  # the units holding real tensors at each block's turn: one at a time

    def unit(key):
        parts = key.split(".")
        return ".".join(parts[:3] if parts[1] == "h" else parts[:2])

    def loader(name, module):
        release = stream(name, module)
        live.append(sorted({unit(key) for key, t in skeleton.state_dict().items() if t.device.type != "meta"}))
        return release

    spec = spec_for(build_litgpt_control(cfg, 2), "embedding")
    extract_features_litgpt_layerwise(skeleton, spec, batch_size=BATCH, loader=loader, device="cpu")
    # The LM head and wte are drawn (the stream passes through them) though an embedding probe runs neither.
    assert stream.drawn == ["lm_head", "transformer.wte", "transformer.h.0", "transformer.h.1", "transformer.ln_f"]
    assert live == [["transformer.h.0"], ["transformer.h.1"], ["transformer.ln_f"]]  # nothing else materialised
    assert all(t.device.type == "meta" for t in skeleton.state_dict().values())
    with pytest.raises(InputError, match="after LitGPT's init stream passed it"):
        stream("transformer.h.0", skeleton.transformer.h[0])


# --------------------------------------------------------------------------------------
# FSDP2 over 2 gloo ranks
# --------------------------------------------------------------------------------------


def _fsdp2_probe(rank: int, world: int, init_file: str, out_dir: str) -> int:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from seedprints_lightning.core.processes import measure_over_ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    report = {}
    for arch in ARCHS:
        for kind in ("token", "embedding"):
            model = build_litgpt_control(config(arch), 11)  # the same weights on both ranks
            model.max_seq_length = 32  # the twin must follow the live rope cache length
            spec = spec_for(model, kind)
            mine = (rank * 7, rank * 7 + 7)
            expected_slice = whole(model, spec, batch_size=3, sample_range=mine)
            expected_all = whole(model, spec, batch_size=7)
            # As Fabric's ModelParallelStrategy / litgpt's parallelize_fn: each block, then the root.
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            local = {k: v.to_local().clone() for k, v in model.state_dict().items() if isinstance(v, DTensor)}
            forwards = []  # any module's forward (an FSDP hook gathers around it) would be counted here
            for module in model.modules():
                module.register_forward_pre_hook(lambda m, args, _f=forwards: _f.append(type(m).__name__))
            unresolved = ProbeSpec(kind=kind, num_samples=N, length=LENGTH, seed=4)
            loader = GatheredBlockLoader(model)
            rng = torch.random.get_rng_state()
            if kind == "token":  # through the layer-major entry (it routes a sharded GPT here)
                got = extract_features_litgpt_layerwise(model, unresolved, batch_size=3, sample_range=mine,
                                                        loader=loader)
            else:  # the embedding spec resolved from the sharded embedding (a collective)
                got = extract_features_litgpt_gathered(model, unresolved, batch_size=3, sample_range=mine,
                                                       loader=loader)
            gathered = loader.gathered
            every = measure_over_ranks(spec, lambda padded, sample_range, _m=model:
                                       extract_features_litgpt_layerwise(_m, padded, batch_size=7,
                                                                         sample_range=sample_range))
            after = model.state_dict()
            report[f"{arch}/{kind}"] = {
                "slice_equal": torch.equal(got, expected_slice),
                "all_equal": torch.equal(every, expected_all),
                "gathered": gathered,
                "state_dict_keys": list(after),
                "forwards": forwards,
                "still_sharded": all(isinstance(p, DTensor) for p in model.parameters()),
                "shards_unchanged": all(torch.equal(after[k].to_local(), v) for k, v in local.items()),
                "rng_unchanged": torch.equal(torch.random.get_rng_state(), rng),
                "samples": int(every.shape[0]),
            }
    report["fabric"] = _fabric_model_parallel_case(rank, world)
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(report, handle)
    return 0


def _fsdp2_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """_fsdp2_probe in a spawned process, ending as every multi-process test does (conftest.exit_after_report)."""
    from conftest import exit_after_report

    exit_after_report(lambda: _fsdp2_probe(rank, world, init_file, out_dir))


def _fabric_model_parallel_case(rank: int, world: int) -> dict:
    """The GPT set up by Fabric's own ModelParallelStrategy (FSDP2 through a parallelize_fn, as litgpt's), probed
    through the ``_FabricModule`` Fabric hands back. The process group exists: Fabric finds it and joins it."""
    import os

    import lightning as L
    from lightning.fabric.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from seedprints_lightning.core.processes import measure_over_ranks

    def parallelize(model, device_mesh):
        mesh = device_mesh["data_parallel"]
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    # What a launcher sets: Fabric then neither launches processes nor creates the (existing) process group.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", RANK=str(rank), WORLD_SIZE=str(world))
    fabric = L.Fabric(accelerator="cpu", devices=world, strategy=ModelParallelStrategy(
        parallelize_fn=parallelize, data_parallel_size=world, tensor_parallel_size=1))
    fabric.launch()
    model = build_litgpt_control(config("llama"), 12)
    spec = spec_for(model, "token")
    expected = whole(model, spec, batch_size=7)
    wrapped = fabric.setup(model)
    got = measure_over_ranks(spec, lambda padded, sample_range: extract_features_litgpt_layerwise(
        wrapped, padded, batch_size=7, sample_range=sample_range))
    return {"equal": torch.equal(got, expected), "wrapper": type(wrapped).__name__,
            "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters())}


@pytest.mark.slow
def test_fsdp2_gpts_are_probed_one_gathered_block_at_a_time_bit_for_bit(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp2_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:  # Fabric's ModelParallelStrategy: a sharded GPT behind a _FabricModule, features equal
        assert report.pop("fabric") == {"equal": True, "wrapper": "_FabricModule", "sharded": True}
    assert sorted(reports[0]) == sorted(f"{a}/{k}" for a in ARCHS for k in ("token", "embedding"))
    for case, rank0 in reports[0].items():
        rank1 = reports[1][case]
        for report in (rank0, rank1):
            # Each rank's slice, and the gathered [n, D] over both, equal the unsharded whole forward bit for bit.
            assert report["slice_equal"] and report["all_equal"] and report["samples"] == N, case
            assert report["forwards"] == [], case  # no FSDP hook ran: the sharded GPT was never called
            assert report["still_sharded"] and report["shards_unchanged"] and report["rng_unchanged"], case
        gathered, keys = rank0["gathered"], rank0["state_dict_keys"]
        assert gathered == rank1["gathered"]  # the same collectives in the same order on every rank
        assert not any(k.startswith("lm_head") for k in gathered), case  # the LM head is never gathered
        # Token probes gather wte; embedding probes never read it. Every other weight once.
        expected = [k for k in keys if not k.startswith("lm_head")
                    and (case.endswith("/token") or not k.startswith("transformer.wte"))]
        assert gathered == expected, case  # in state-dict order: block by block
