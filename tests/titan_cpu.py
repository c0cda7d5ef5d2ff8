"""What torchtitan's real ``Trainer`` needs to train on a CPU in the tests (imported by tests/test_titan.py).

torchtitan 0.3.0 trains on accelerators only, for three reasons, each handled here:

- attention: FlexAttention has no CPU backward and ``varlen`` no CPU kernel. :func:`sdpa_on_cpu` swaps
  it, through torchtitan's own public override mechanism (``--override.imports titan_cpu.sdpa_on_cpu``,
  ``config.override.imports``), for torchtitan's ``ScaledDotProductAttention`` (causal, a CPU backward);
  the trainer then passes no attention masks, as for any maskless attention.
- device: ``torchtitan.tools.utils.device_type`` falls back to ``"cuda"`` without an accelerator, and
  several modules copied it at import. :func:`cpu_device` points those module attributes at the CPU
  (a test-only patch through ``monkeypatch``: torchtitan has no public switch; issue #1661).
- data: the debug configs read a tokenizer and the ``c4_test`` data from torchtitan's repository,
  which the wheel does not ship. :class:`TinyTokenizer` and :class:`RandomTokens` are torchtitan
  components (``Configurable``) serving seeded random documents, no files.

With these the debug model (``llama3_debugmodel``: 6 blocks, dim 256, vocabulary 2048) trains for
real: FSDP2 over one gloo rank (DTensor weights), AdamW, DCP checkpoints. :func:`run_rank` is one rank
of the same run under torchrun (``python -m torch.distributed.run --standalone --nproc_per_node 2
tests/titan_cpu.py OUT``), FSDP2 over the ranks, with two more gloo-only settings (named there).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config.override import override
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention


@override(target=FlexAttention.Config, description="torchtitan's causal SDPA: a CPU backward (tests only)")
def sdpa_on_cpu(config: FlexAttention.Config) -> ScaledDotProductAttention.Config:
    return ScaledDotProductAttention.Config()


def _cpu_module() -> Any:
    """The few ``torch.cuda``-like calls torchtitan makes on its device module, answered for the CPU."""
    return types.SimpleNamespace(
        set_device=lambda *args, **kwargs: None, current_device=lambda: 0, device_count=lambda: 1,
        get_device_name=lambda *args, **kwargs: "cpu",
        get_device_properties=lambda *args, **kwargs: types.SimpleNamespace(total_memory=8 << 30, name="cpu"),
        reset_peak_memory_stats=lambda *args, **kwargs: None, empty_cache=lambda *args, **kwargs: None,
        memory_stats=lambda *args, **kwargs: {}, synchronize=lambda *args, **kwargs: None,
        is_available=lambda: True)


def cpu_device(monkeypatch: Any) -> None:
    """Point torchtitan's device globals at the CPU for one test (``monkeypatch`` undoes it)."""
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as tools_utils

    module = _cpu_module()
    for owner in (tools_utils, dist_utils, parallel_dims, metrics):
        if hasattr(owner, "device_type"):
            monkeypatch.setattr(owner, "device_type", "cpu")
        if hasattr(owner, "device_module"):
            monkeypatch.setattr(owner, "device_module", module)
    monkeypatch.setattr(tools_utils, "get_local_device", lambda: torch.device("cpu"))
    # torch 2.13 has no torch.distributed.set_timeout, which torchtitan calls after the first step.
    monkeypatch.setattr(dist_utils, "set_pg_timeouts", lambda *args, **kwargs: None)


class TinyTokenizer(BaseTokenizer):
    """A tokenizer of ``vocab_size`` ids and no text: the trainer only asks for its size and end-of-text id."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        vocab_size: int = 2048

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__()
        self.vocab_size = config.vocab_size
        self.eos_id = 0

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        return []

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return ""

    def get_vocab_size(self) -> int:
        return self.vocab_size


class RandomTokens(BaseDataLoader):
    """Seeded random documents, one per row (``positions`` 0..L-1): batch ``i`` depends on ``seed`` and ``i`` only,
    and its count is the loader's checkpoint state, so a resumed run reads the batches it would have read."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        vocab_size: int = 2048
        seed: int = 0

    def __init__(self, config: Config, *, seq_len: int, local_batch_size: int, dp_rank: int = 0, **kwargs: Any):
        self.config, self.seq_len, self.batch_size, self.rank = config, seq_len, local_batch_size, dp_rank
        self.served = 0

    def __iter__(self):
        while True:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.served * 131 + self.rank)
            self.served += 1
            tokens = torch.randint(0, self.config.vocab_size, (self.batch_size, self.seq_len + 1), generator=generator)
            positions = torch.arange(self.seq_len).expand(self.batch_size, self.seq_len).clone()
            yield {"input": tokens[:, :-1], "positions": positions}, tokens[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"served": self.served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.served = int(state_dict["served"])


def debug_config(dump_folder: str, *, steps: int, interval: int, **seedprints: Any) -> Any:
    """``llama3_debugmodel`` through this package's config entry, shrunk for a CPU: sequence 32, batch 2, no
    validation, no CUDA graphs, checkpoints every ``interval`` steps, the random data, SDPA by the override."""
    import seedprints_lightning.faces.torchtitan as face

    config = face.llama3_debugmodel()  # the entry torchtitan's --config llama3_debugmodel reaches
    config.training.seq_len = 32
    config.training.local_batch_size = 2
    config.training.steps = steps
    config.training.disable_cuda_graphs = True
    config.validator.enable = False
    config.metrics.log_freq = 1
    config.tokenizer = TinyTokenizer.Config()
    config.dataloader = RandomTokens.Config()
    config.dump_folder = dump_folder
    config.checkpoint.enable = True
    config.checkpoint.interval = interval
    config.override.imports = ["titan_cpu.sdpa_on_cpu"]
    for name, value in seedprints.items():
        setattr(config.seedprints, name, value)
    return config


def run_rank(out: str, *, swap_at: int | None = None) -> None:
    """One rank of a torchrun job (``python tests/titan_cpu.py OUT [SWAP_AT]``): the debug model for 4 steps under
    FSDP2 over the ranks (gloo), probes every 2 steps, ``on_identity_lost="raise"``; with ``swap_at`` the
    weights are re-drawn by torchtitan's own init under another seed after that step. Writes
    ``OUT/rank<N>.json`` (the history, whether it raised, the step-0 features)."""
    import json
    import os

    import pytest

    from seedprints_lightning import IdentityLostError, ProbeSpec

    cpu_device(pytest.MonkeyPatch())
    torch.set_num_threads(1)
    config = debug_config(os.path.join(out, "run"), steps=4, interval=2, every_n_steps=2, adaptive_schedule=False,
                          num_controls=2, patience=1, on_identity_lost="raise", probe=ProbeSpec(num_samples=30,
                                                                                                length=16))
    # torchtitan's default SPMD backend ("spmd_types") fails fully_shard over 2 gloo ranks with torch 2.13 ("all
    # parameters must be DTensors on the full SPMD mesh"); its DTensor backend for the parallel axes shards them.
    config.parallelism.spmd_backend = "partial_dtensor"
    trainer = config.build()
    face, model = trainer.seedprints, trainer.model_parts[0]
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # gloo has no PREMUL_SUM, which FSDP2 reduces with at torchtitan's factor 1
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    if swap_at is not None:
        after_step = face.after_step

        def swapped(step: int, *, last: bool) -> None:
            if step == swap_at:
                with torch.no_grad():
                    torch.manual_seed(7)
                    model.init_states(buffer_device=None)
            after_step(step, last=last)

        face.after_step = swapped
    raised = None
    try:
        trainer.train()
    except IdentityLostError as exc:
        raised = str(exc)
    spec = face.reference.spec
    # The final weights probed again by every rank (one gathered block at a time, each rank its slice).
    from seedprints_lightning.core.processes import measure_over_ranks
    from seedprints_lightning.core.titan import extract_features_titan

    final = measure_over_ranks(spec, lambda padded, sample_range: extract_features_titan(
        model, padded, sample_range=sample_range))
    trainer.close()
    rank = int(os.environ["RANK"])
    result = {"raised": raised, "history": [(h["step"], h["event"], h["related"]) for h in face.history],
              "reference": face.reference.features.tolist(), "final": final.tolist(),
              "spec": {"num_samples": spec.num_samples, "length": spec.length, "vocab_size": spec.vocab_size},
              "shards": sum(1 for p in model.parameters() if hasattr(p, "device_mesh"))}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    import sys

    run_rank(sys.argv[1], swap_at=int(sys.argv[2]) if len(sys.argv) > 2 else None)
