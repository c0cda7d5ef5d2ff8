"""Streamed offline reading: checkpoints probed one block at a time equal the whole-model probe."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, GPT2Config

from seedprints_lightning.core.errors import SourceError
from seedprints_lightning.core.probes import ProbeSpec
from seedprints_lightning.offline import sources, streaming
from seedprints_lightning.offline.audit import compare_sources
from seedprints_lightning.offline.cli import EXIT_OK, main
from seedprints_lightning.offline.sources import ProbeRuntime, fingerprint_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=10, length=5)


def _config(arch: str):
    if arch == "llama":
        return tiny_config("llama")
    return GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)


def _model(arch: str, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(_config(arch)).eval()


def _save(tmp_path, arch: str, layout: str, seed: int = 0):
    model = _model(arch, seed)
    path = tmp_path / f"{arch}-{layout}-{seed}"
    if layout == "single":
        model.save_pretrained(path)
        assert (path / "model.safetensors").is_file()
    elif layout == "sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
    elif layout == "ckpt":
        path = path.with_suffix(".ckpt")
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "hf_config": model.config.to_dict(), "global_step": 7}, path)
    elif layout == "dcp":
        import torch.distributed.checkpoint as dcp

        path.mkdir()
        dcp.save({"state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()}},
                 checkpoint_id=str(path), no_dist=True)
        torch.save({"hf_config": model.config.to_dict(), "global_step": 3}, path / "meta.pt")
    return path


def _both(source, spec=SPEC, **kw):
    whole = fingerprint_source(source, spec, runtime=ProbeRuntime(load="whole", batch_size=4), **kw)
    streamed = fingerprint_source(source, spec, runtime=ProbeRuntime(load="streamed", batch_size=4), **kw)
    return whole, streamed


@pytest.mark.parametrize("layout", ["single", "sharded", "ckpt", "dcp"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_features_equal_the_whole_path(tmp_path, arch, layout):
    source = _save(tmp_path, arch, layout)
    whole, streamed = _both(source, num_controls=2)
    assert whole.extra["load"]["path"] == "whole" and streamed.extra["load"]["path"] == "streamed"
    assert whole.spec == streamed.spec and whole.config_digest == streamed.config_digest
    assert whole.model_class == streamed.model_class and whole.step == streamed.step
    torch.testing.assert_close(streamed.features, whole.features, atol=1e-5, rtol=0)
    torch.testing.assert_close(streamed.controls, whole.controls, atol=1e-5, rtol=0)
    assert whole.control_seeds == streamed.control_seeds


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_embedding_probes_take_the_stats_from_the_stored_embedding(tmp_path, arch):
    source = _save(tmp_path, arch, "sharded")
    whole, streamed = _both(source, ProbeSpec(kind="embedding", num_samples=8, length=4))
    assert streamed.spec == whole.spec
    torch.testing.assert_close(streamed.features, whole.features, atol=1e-5, rtol=0)


def test_streamed_blocks_are_read_one_at_a_time_and_freed(tmp_path, monkeypatch):
    source = _save(tmp_path, "llama", "sharded")
    seen: list = []
    original = streaming._StoreLoader.__call__

    def spy(self, name, module):
        # When a decoder layer is read, no earlier layer still holds real weights.
        real = [n for n, m in seen if "layers" in n and any(p.device.type != "meta" for p in m.parameters())]
        assert "layers" not in name or not real, (name, real)
        seen.append((name, module))
        return original(self, name, module)

    monkeypatch.setattr(streaming._StoreLoader, "__call__", spy)
    fingerprint_source(source, SPEC, runtime=ProbeRuntime(load="streamed"))
    names = [name for name, _ in seen]
    assert names == ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm"]
    assert all(p.device.type == "meta" for _, m in seen for p in m.parameters())  # all freed after



def test_a_training_checkpoint_is_mapped_per_block_and_no_mapping_outlives_its_block(tmp_path, monkeypatch):
    """Read pages of a mapping count as resident until it closes: no block's mapping may stay open."""
    source = _save(tmp_path, "llama", "ckpt")
    mapped: list = []  # weakrefs to every tensor a per-block mapping handed out
    original = streaming.StateDictStore.read

    def spy(self, keys):
        assert not self.holds_tensors  # between reads the store keeps shapes only
        remap = self._remap

        def tracked():
            weights = remap()
            mapped.append([weakref.ref(t) for t in weights.values()])
            return weights

        self._remap = tracked
        try:
            return original(self, keys)
        finally:
            self._remap = remap
            gc.collect()
            assert all(ref() is None for ref in mapped[-1]), "a block's mapping outlived its read"

    monkeypatch.setattr(streaming.StateDictStore, "read", spy)
    whole, streamed = _both(source)
    assert streamed.extra["load"]["path"] == "streamed"
    assert len(mapped) >= 4  # embedding, 2 layers, norm: each mapped on its own
    torch.testing.assert_close(streamed.features, whole.features, atol=1e-5, rtol=0)

def test_auto_chooses_by_memory_and_says_so(tmp_path, monkeypatch):
    source = _save(tmp_path, "llama", "single")
    monkeypatch.setattr(streaming, "available_memory", lambda device=None: (10**12, "host memory available"))
    fp = fingerprint_source(source, SPEC)
    assert fp.extra["load"]["path"] == "whole" and fp.extra["load"]["reason"].startswith("auto: fits")
    monkeypatch.setattr(streaming, "available_memory", lambda device=None: (1000, "host memory available"))
    fp = fingerprint_source(source, SPEC)
    assert fp.extra["load"]["path"] == "streamed" and "exceed the memory" in fp.extra["load"]["reason"]


def test_a_class_that_cannot_be_split_falls_back_to_whole_or_errors_naming_it(tmp_path, monkeypatch):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    path = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(path)
    fp = fingerprint_source(path, SPEC, runtime=ProbeRuntime(load="streamed"))
    assert fp.extra["load"]["path"] == "whole" and "GPTNeoXForCausalLM" in fp.extra["load"]["note"]
    monkeypatch.setattr(streaming, "available_memory", lambda device=None: (1000, "host memory available"))
    with pytest.raises(SourceError, match="does not fit in memory.*GPTNeoXForCausalLM"):
        fingerprint_source(path, SPEC)


def test_a_truncated_shard_and_a_missing_tensor_name_the_file_and_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    source = _save(tmp_path, "llama", "sharded")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shard = source / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(SourceError, match=rf"{shard.name} is truncated: tensor '[^']+'"):
        fingerprint_source(source, SPEC, runtime=ProbeRuntime(load="streamed"))
    shard.write_bytes(data)
    single = _save(tmp_path, "llama", "single")
    tensors = load_file(single / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match=r"model\.safetensors: the saved model has no tensor "
                                          r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
        fingerprint_source(single, SPEC, runtime=ProbeRuntime(load="streamed"))
    ckpt = _save(tmp_path, "llama", "ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["state_dict"]["model.model.norm.weight"]
    torch.save(checkpoint, ckpt)
    with pytest.raises(SourceError, match=rf"{ckpt.name}: the saved model has no tensor 'model\.norm\.weight'"):
        fingerprint_source(ckpt, SPEC, runtime=ProbeRuntime(load="streamed"))


@pytest.mark.parametrize("load", ["whole", "streamed"])
def test_compare_never_holds_both_models_whole(tmp_path, monkeypatch, load):
    a, b = _save(tmp_path, "llama", "single", 0), _save(tmp_path, "llama", "sharded", 1)
    loaded: list = []
    original = sources.load_model

    def tracking(source, **kw):
        gc.collect()
        assert all(ref() is None for ref in loaded), "the other model is still alive"
        model = original(source, **kw)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(sources, "load_model", tracking)
    comparison = compare_sources(a, b, num_samples=10, length=5, runtime=ProbeRuntime(load=load), num_controls=2)
    assert len(loaded) == (2 if load == "whole" else 0)
    assert comparison.load_a["path"] == comparison.load_b["path"] == load
    assert comparison.to_dict()["load"]["b"]["path"] == load


def test_cli_compare_streamed_and_whole_give_the_same_z(tmp_path, capsys):
    a, b = _save(tmp_path, "gpt2", "single", 0), _save(tmp_path, "gpt2", "ckpt", 0)
    results = {}
    for load in ("whole", "streamed"):
        code = main(["compare", str(a), str(b), "--num-samples", "10", "--length", "5", "--controls", "2", "-q",
                     "--json", "--load", load])
        assert code in (EXIT_OK, 1)
        results[load] = json.loads(capsys.readouterr().out)
        assert results[load]["load"]["a"]["path"] == load and results[load]["load"]["b"]["path"] == load
    assert results["whole"]["z"] == pytest.approx(results["streamed"]["z"], abs=1e-4)
    assert results["whole"]["verdict"] == results["streamed"]["verdict"] == "related"
    assert main(["compare", str(a), str(b), "--num-samples", "10", "--length", "5", "--controls", "2", "-q",
                 "--load", "streamed"]) == EXIT_OK
    assert "load        A: streamed (--load streamed)" in capsys.readouterr().out


def test_cli_fingerprint_and_audit_report_the_path(tmp_path, capsys):
    ckpt = _save(tmp_path, "llama", "ckpt")
    out = tmp_path / "fp.safetensors"
    assert main(["fingerprint", str(ckpt), "-o", str(out), "--num-samples", "10", "--length", "5", "--controls", "2",
                 "-q", "--load", "streamed"]) == EXIT_OK
    assert "load      streamed (--load streamed)" in capsys.readouterr().out
    assert main(["audit", str(out), str(ckpt), "-q", "--load", "streamed", "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["load"]["path"] == "streamed" and rows[0]["related"]


def test_cli_compare_load_streamed_of_a_class_that_cannot_stream_says_so_and_refuses_when_it_cannot_fit(
        tmp_path, capsys, monkeypatch):
    """``--load streamed`` is an explicit request (issue 27): GPT-NeoX cannot be split, so it is loaded whole only
    when the memory check says that fits, and the JSON says the request was not honoured and why; when it does not
    fit, the request is a refusal (exit 2), never a whole load that would exhaust the machine."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from seedprints_lightning.offline.cli import EXIT_USAGE

    path = tmp_path / "neox"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64)).save_pretrained(path)
    args = ["compare", str(path), str(path), "--num-samples", "10", "--length", "5", "--controls", "1", "-q",
            "--load", "streamed"]
    monkeypatch.setattr(streaming, "available_memory", lambda device=None: (10**12, "host memory available"))
    assert main([*args, "--json"]) == EXIT_OK
    load = json.loads(capsys.readouterr().out)["load"]
    for side in ("a", "b"):
        assert load[side]["requested"] == "streamed" and load[side]["path"] == "whole"
        assert load[side]["honoured"] is False and "NOT honoured" in load[side]["reason"]
        assert "fits" in load[side]["reason"] and "GPTNeoXForCausalLM" in load[side]["note"]
    monkeypatch.setattr(streaming, "available_memory", lambda device=None: (1000, "host memory available"))
    assert main(args) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "--load streamed was asked" in error and "does not fit in memory" in error and "--load whole" in error
    assert main([*args[:-2], "--load", "auto"]) != EXIT_OK  # auto: the same limit, as before (a file error)
    assert main([*args[:-2], "--load", "whole"]) == EXIT_OK  # --load whole tries anyway
