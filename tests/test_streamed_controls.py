"""Streamed controls everywhere: the controls file format (v2, init scheme), in-run == precomputed, the CLI,
and controls split over a run's processes."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import make_tiny_lm, tiny_config
from transformers import GPT2Config

from seedprints_lightning.core.controls import (
    INIT_CUSTOM,
    INIT_STREAMED,
    INIT_WHOLE,
    ControlSet,
    build_control_model,
    control_seeds,
    controls_from_config,
    probe_controls,
    save_controls,
)
from seedprints_lightning.core.errors import FingerprintFileError, InputError
from seedprints_lightning.core.files import save_safetensors
from seedprints_lightning.core.layerwise import build_streamed_control_model
from seedprints_lightning.core.opening import ControlsSource, _build_split, _ensure_controls
from seedprints_lightning.core.probes import ProbeSpec, extract_features
from seedprints_lightning.core.processes import Processes
from seedprints_lightning.offline.cli import EXIT_OK, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=12, length=5, vocab_size=64)


def _gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)


def _file_meta(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["seedprints"])


# ------------------------------------------------------------------ file format


def test_controls_file_v2_records_the_init_scheme_and_v1_files_load_as_whole(tmp_path):
    features = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(0))
    path = save_controls(tmp_path / "new.safetensors", features, (5, 6), SPEC)
    meta = _file_meta(path)
    assert meta["format_version"] == 2 and meta["init_scheme"] == INIT_STREAMED
    assert ControlSet.load(path).init_scheme == INIT_STREAMED
    whole = save_controls(tmp_path / "whole.safetensors", features, (5, 6), SPEC, init_scheme=INIT_WHOLE)
    assert ControlSet.load(whole).init_scheme == INIT_WHOLE
    # A version-1 file, as seedprints-lightning 0.4.0 wrote it (no init_scheme): whole-model inits.
    v1 = {"format": "seedprints-controls", "format_version": 1, "seeds": [5, 6], "spec": SPEC.to_dict(),
          "extra": {"model_class": "LlamaForCausalLM", "config_digest": "abc"}}
    old = save_safetensors(tmp_path / "v1.safetensors", {"features": features}, {"seedprints": json.dumps(v1)})
    loaded = ControlSet.load(old)
    assert loaded.init_scheme == INIT_WHOLE and loaded.seeds == (5, 6) and torch.equal(loaded.features, features)
    assert loaded.config_digest == "abc" and loaded.spec == SPEC
    future = save_safetensors(tmp_path / "v9.safetensors", {"features": features},
                              {"seedprints": json.dumps({**v1, "format_version": 9})})
    with pytest.raises(FingerprintFileError, match=r"format version 9 is not supported .*reads versions 1, 2"):
        ControlSet.load(future)


# ------------------------------------------------------------------ in-run == precomputed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_in_run_control_is_the_precomputed_streamed_control_bit_for_bit(arch):
    config = tiny_config("llama") if arch == "llama" else _gpt2_config()
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        live = AutoModelForCausalLM.from_config(config)
    seed = control_seeds(1)[0]
    control = build_control_model(live, seed)
    assert control.seedprints_init_scheme == INIT_STREAMED and type(control) is type(live)
    twin = build_streamed_control_model(config, seed)
    control_state, twin_state = control.state_dict(), twin.state_dict()
    assert control_state.keys() == twin_state.keys()
    for name, tensor in twin_state.items():
        assert torch.equal(control_state[name], tensor), name
    # The in-run probe (probe_controls: build_control_model + extract_features) and the precomputed file's
    # (controls_from_config: probe_streamed_control, layer-major) are the same model's features.
    info: dict = {}
    precomputed, seeds = controls_from_config(config, SPEC, 2, batch_size=5, info=info)
    in_run = probe_controls(live, SPEC, seeds, batch_size=5)
    assert info["init_scheme"] == INIT_STREAMED
    torch.testing.assert_close(precomputed, in_run, atol=1e-5, rtol=0)



def test_fingerprint_files_record_how_their_controls_were_drawn(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from seedprints_lightning.core.fingerprint import Fingerprint, fingerprint_model

    streamed = fingerprint_model(make_tiny_lm(0), SPEC, num_controls=2)
    assert streamed.controls_init_scheme == INIT_STREAMED
    assert Fingerprint.load(streamed.save(tmp_path / "a.safetensors")).controls_init_scheme == INIT_STREAMED
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=64))
    assert fingerprint_model(neox, SPEC, num_controls=1).controls_init_scheme == INIT_WHOLE
    assert fingerprint_model(make_tiny_lm(0), SPEC).controls_init_scheme is None  # no controls, no scheme
    # A file from before the field: loads, and says it was not recorded.
    meta = streamed.metadata()
    del meta["controls_init_scheme"]
    old = Fingerprint.from_metadata(streamed.features, meta, controls=streamed.controls)
    assert old.controls_init_scheme is None and old.control_seeds == streamed.control_seeds

def test_in_run_control_in_bfloat16_follows_the_streamed_recipe():
    live = make_tiny_lm(0).to(torch.bfloat16)
    control = build_control_model(live, 9)
    twin = build_streamed_control_model(live.config, 9, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(control.state_dict().values(), twin.state_dict().values()))
    assert next(control.parameters()).dtype == torch.bfloat16


def test_whole_flag_and_unsupported_architectures_use_the_whole_recipe():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    info: dict = {}
    whole, seeds = controls_from_config(tiny_config("llama"), SPEC, 1, whole=True, info=info)
    assert info == {"init_scheme": INIT_WHOLE}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds[0])
        from transformers import LlamaForCausalLM

        expected = extract_features(LlamaForCausalLM(tiny_config("llama")), SPEC)
    assert torch.equal(whole[0], expected)  # the old recipe: one RNG stream over the whole model
    neox = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)
    info, lines = {}, []
    controls_from_config(neox, SPEC, 1, info=info, log=lines.append)
    assert info["init_scheme"] == INIT_WHOLE and "gpt_neox" in info["note"] and "built whole" in lines[0]
    control = build_control_model(GPTNeoXForCausalLM(neox), 3)
    assert control.seedprints_init_scheme == INIT_WHOLE



def test_a_face_draws_its_default_controls_block_by_block_and_never_whole(monkeypatch):
    """The in-run default build never holds a whole control: one block at a time, as the precomputed file."""
    from seedprints_lightning.core import controls as controls_module
    from seedprints_lightning.core import layerwise
    from seedprints_lightning.faces.settings import FaceSettings

    def refuse(*args, **kwargs):
        raise AssertionError("a whole control was built in the run")

    monkeypatch.setattr(controls_module, "build_control_model", refuse)
    monkeypatch.setattr(layerwise, "build_streamed_control_model", refuse)
    live = make_tiny_lm(0)
    settings = FaceSettings.from_arguments(num_controls=2, probe_batch_size=5)
    source = settings.controls_source(live, device=torch.device("cpu"), is_writer=False)
    precomputed, seeds = controls_from_config(live.config, SPEC, 2, batch_size=5)
    built = source.build(seeds, SPEC)
    assert built.init_scheme == INIT_STREAMED and built.seeds == seeds and "block by block" in built.description
    assert built.model_class == type(live).__name__
    assert torch.equal(built.features, precomputed)
    # A control_factory (or a feature_fn) is the user's own recipe: built whole, as before.
    custom = FaceSettings.from_arguments(num_controls=1, control_factory=lambda seed: make_tiny_lm(seed))
    assert custom.controls_source(live, device=None, is_writer=False).build(seeds[:1], SPEC).init_scheme == INIT_CUSTOM

def test_control_sets_record_how_their_inits_were_drawn():
    live = make_tiny_lm(0)
    spec = SPEC

    def features_of(model):
        return extract_features(model, spec)

    built = ControlSet.build(lambda seed: build_control_model(live, seed), (1, 2), spec, features_of)
    assert built.init_scheme == INIT_STREAMED
    custom = ControlSet.build(lambda seed: make_tiny_lm(seed), (1,), spec, features_of)
    assert custom.init_scheme == INIT_CUSTOM


# ------------------------------------------------------------------ the CLI


def test_cli_controls_writes_a_streamed_file_and_whole_on_request(tmp_path, capsys):
    model_dir = tmp_path / "model"
    make_tiny_lm(0).save_pretrained(model_dir)
    out = tmp_path / "controls.safetensors"
    args = ["controls", str(model_dir), "-o", str(out), "--num", "2", "--num-samples", "12", "--length", "5", "-q"]
    assert main(args) == EXIT_OK
    printed = capsys.readouterr().out
    assert "init      streamed-v1" in printed
    meta = _file_meta(out)
    assert meta["format_version"] == 2 and meta["init_scheme"] == INIT_STREAMED
    streamed = ControlSet.load(out)
    expected = probe_controls(make_tiny_lm(0), SPEC, control_seeds(2))  # what a run builds in-run
    torch.testing.assert_close(streamed.features, expected, atol=1e-5, rtol=0)
    whole_out = tmp_path / "whole.safetensors"
    assert main([*args[:3], str(whole_out), *args[4:], "--whole"]) == EXIT_OK
    assert "init      whole" in capsys.readouterr().out
    assert ControlSet.load(whole_out).init_scheme == INIT_WHOLE


# ------------------------------------------------------------------ controls split over processes


def _source(built_by: dict, fail_rank: int | None = None, rank_of=None):
    def build(seeds, spec):
        rank = rank_of()
        built_by.setdefault(rank, []).extend(seeds)
        if rank == fail_rank:
            raise RuntimeError("out of memory")
        return ControlSet(features=torch.stack([torch.full((spec.num_samples, 4), float(s)) for s in seeds]),
                          seeds=seeds, spec=spec, init_scheme=INIT_STREAMED, model_class="M")

    return ControlsSource(num_controls=5, build=build)


def _run_ranks(world: int, source_for):
    """``_build_split`` on ``world`` threads joined by an all-gather; per rank: its result or its exception."""
    barrier, box = threading.Barrier(world), [None] * world
    local = threading.local()

    def gather_for(rank):
        def gather(obj):
            box[rank] = obj
            barrier.wait(timeout=20)
            out = list(box)
            barrier.wait(timeout=20)
            return out
        return gather

    results: list = [None] * world
    source = source_for(lambda: local.rank)
    seeds = control_seeds(5)

    def run(rank):
        local.rank = rank
        try:
            processes = Processes(is_writer=rank == 0, rank=rank, world=world, all_gather=gather_for(rank))
            results[rank] = _build_split(source, seeds, SPEC, processes)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a rank is stuck (deadlock)"
    return results


@pytest.mark.parametrize("world", [2, 3, 7])
def test_controls_split_over_ranks_each_builds_its_share_and_all_get_every_control(world):
    built_by: dict = {}
    results = _run_ranks(world, lambda rank_of: _source(built_by, rank_of=rank_of))
    seeds = control_seeds(5)
    for rank in range(world):
        assert built_by.get(rank, []) == list(seeds[rank::world])  # controls i with i % world == rank
    expected = torch.stack([torch.full((SPEC.num_samples, 4), float(s)) for s in seeds])
    for result in results:
        assert isinstance(result, ControlSet) and result.seeds == seeds and torch.equal(result.features, expected)
        assert result.init_scheme == INIT_STREAMED and f"across {world} processes" in result.description


def test_a_rank_that_fails_to_build_raises_on_every_rank_without_deadlock():
    built_by: dict = {}
    results = _run_ranks(2, lambda rank_of: _source(built_by, fail_rank=1, rank_of=rank_of))
    for result in results:
        assert isinstance(result, InputError) and "rank 1: RuntimeError: out of memory" in str(result)


def _chain():
    """A chain whose reference fixes the probe spec and width (what _ensure_controls reads)."""
    from seedprints_lightning import CustodyChain, Fingerprint

    return CustodyChain(Fingerprint(features=torch.zeros(SPEC.num_samples, 4), spec=SPEC, step=0))


def test_single_process_runs_build_every_control_as_before():
    built_by: dict = {}
    source = _source(built_by, rank_of=lambda: 0)
    chain = _chain()
    _ensure_controls(chain, None, Processes(), source)
    assert built_by == {0: list(control_seeds(5))} and len(chain.controls) == 5


def test_one_process_gathers_only_its_own_object_and_a_rank_must_be_in_its_world():
    alone = Processes()
    assert (alone.rank, alone.world, alone.all_gather("x")) == (0, 1, ["x"])
    with pytest.raises(InputError, match="rank 2 of world 2"):
        Processes(rank=2, world=2)


def _gloo_controls(rank: int, world: int, init_file: str, out_dir: str) -> int:
    import torch.distributed as dist

    from seedprints_lightning.core.processes import torch_processes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    built_by: dict = {}
    source = _source(built_by, rank_of=lambda: rank)
    chain = _chain()
    _ensure_controls(chain, None, torch_processes(), source)
    torch.save({"built": built_by.get(rank, []), "features": chain.controls.features,
                "seeds": chain.controls.seeds}, f"{out_dir}/rank{rank}.pt")
    return 0


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """_gloo_controls in a spawned process, ending as every multi-process test does (conftest.exit_after_report)."""
    from conftest import exit_after_report

    exit_after_report(lambda: _gloo_controls(rank, world, init_file, out_dir))


@pytest.mark.slow
def test_ensure_controls_splits_over_real_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    seeds = control_seeds(5)
    assert out[0]["built"] == list(seeds[0::2]) and out[1]["built"] == list(seeds[1::2])
    assert torch.equal(out[0]["features"], out[1]["features"]) and out[0]["seeds"] == seeds
    assert [float(f[0, 0]) for f in out[0]["features"]] == [float(s) for s in seeds]
