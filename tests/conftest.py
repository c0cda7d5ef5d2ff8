"""Shared, generic test fixtures (keep this file minimal: several test modules use it).

``pytest -m "not slow"`` gives the fast subset (no subprocesses, no multi-fit tests); ``make test`` runs all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

#: The one tiny causal LM of the suite (llama sizes); :func:`make_tiny_lm` starts from it.
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

#: What each architecture changes on top of :data:`TINY_LLAMA` (qwen2: grouped-query attention, 2 kv heads).
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {"llama": {}, "qwen2": {"num_key_value_heads": 2}}


def tiny_config(arch: str = "llama", **overrides: Any):
    """The config of the tiny ``arch`` model: :data:`TINY_LLAMA`, then the arch's defaults, then ``overrides``."""
    from transformers import LlamaConfig, Qwen2Config

    if arch not in _ARCH_DEFAULTS:
        raise ValueError(f"arch must be one of {sorted(_ARCH_DEFAULTS)}, got {arch!r}")
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return config_cls(**{**TINY_LLAMA, **_ARCH_DEFAULTS[arch], **overrides})


def make_tiny_lm(seed: int = 0, arch: str = "llama", **overrides: Any) -> torch.nn.Module:
    """A tiny causal LM in eval mode whose weights depend only on ``seed`` and the config.

    ``arch`` is ``"llama"`` or ``"qwen2"``; ``overrides`` are config fields (e.g. ``vocab_size=48``,
    ``attention_dropout=0.3``). The global torch RNG is restored afterwards. Call ``.train()`` on
    it for a Lightning fit: Lightning leaves submodules in the mode they were given.
    """
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    config = tiny_config(arch, **overrides)
    model_cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def make_tiny_llama(seed: int) -> torch.nn.Module:
    """``make_tiny_lm(seed)``: the tiny LlamaForCausalLM."""
    return make_tiny_lm(seed)


@pytest.fixture()
def tiny_llama() -> Callable[[int], torch.nn.Module]:
    """Factory: ``tiny_llama(seed)`` -> a fresh tiny Llama causal LM in eval mode."""
    return make_tiny_llama


@pytest.fixture()
def tiny_lm() -> Callable[..., torch.nn.Module]:
    """Factory: ``tiny_lm(seed, arch="llama", **config_overrides)`` -> :func:`make_tiny_lm`."""
    return make_tiny_lm


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one intra-op thread, restoring the count after.

    Tiny matrices gain nothing from a second thread, and on a shared 2-core machine
    oversubscribed threads were measured 10-40x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def drawn_figures(monkeypatch) -> list[tuple[str, Any]]:
    """Every figure ``plot_drift`` / ``plot_audit`` draw during the test, as ``(function name, Figure)``.

    The drawing functions are wrapped, not replaced: the PNG is still written from the same figure.
    """
    from seedprints_lightning.offline import plotting

    drawn: list[tuple[str, Any]] = []
    for name in ("draw_drift", "draw_audit"):
        original = getattr(plotting, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            fig = _original(*args, **kwargs)
            drawn.append((_name, fig))
            return fig

        monkeypatch.setattr(plotting, name, recording)
    return drawn


def torchrun_reports(script: str, mode: str, out, timeout_s: int = 420) -> list[dict[str, Any]]:
    """Run ``script MODE OUT`` on 2 CPU processes under ``torchrun`` (gloo); each rank's ``OUT/rank<r>.json``.

    The script writes its report and ends with :func:`exit_after_report`.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no network here: keep gloo on the loopback
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, mode,
               str(out)]
    Path(out).mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    reports = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0 and len(reports) == 2, f"expected a report from both ranks; output:\n{output}"
    return reports


def count_probed_samples(probed: list[int], paths: list[str] | None = None) -> None:
    """Record in ``probed`` how many samples each probe forward of any face asks for (its slice under several ranks),
    and in ``paths`` how it was probed: ``"called"`` (the model's forward) or ``"gathered"`` (one sharded block at a
    time, :mod:`seedprints_lightning.core.sharded`)."""
    import seedprints_lightning.core.families as families_module  # where every face's measurement plan probes

    def counting(original, path):
        def count(model, spec, **kwargs):
            start, stop = kwargs.get("sample_range") or (0, spec.num_samples)
            probed.append(stop - start)
            if paths is not None:
                paths.append(path)
            return original(model, spec, **kwargs)

        return count

    families_module.extract_features = counting(families_module.extract_features, "called")
    families_module.extract_features_gathered = counting(families_module.extract_features_gathered, "gathered")


def exit_after_report(worker: Callable[[], int]) -> None:
    """A multi-process test script's end: run ``worker``, barrier, flush, ``os._exit`` (no gloo teardown at exit).

    gloo's C++ threads can die during interpreter shutdown (or the process group's destruction)
    and abort the process ("terminate called without an active exception", exit -6), at random:
    ``destroy_process_group()`` made it rarer, not gone (CI saw it once in about 60 runs). Every
    report is written before this point, so ``os._exit`` loses nothing. A worker that raised
    exits 1 after its traceback, without the barrier (another rank may never reach it).
    """
    import os
    import sys
    import traceback

    import torch.distributed as dist

    try:
        code = worker()
        if dist.is_initialized():  # no rank leaves while another is inside a collective
            if dist.get_backend() == "gloo":  # names a rank that never arrives instead of hanging
                import datetime

                dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
            else:
                dist.barrier()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def open_test_chain(model: torch.nn.Module, run_dir, spec, *, num_controls: int = 1, every_n_steps: int = 4,
                    patience: int = 1, signer: Any = None):
    """A hand-written loop's chain (``open_chain`` at step 0 into ``run_dir``), as a test drives it without a face."""
    from seedprints_lightning import CustodyChain, Fingerprint, extract_features
    from seedprints_lightning.core.controls import ControlSet, build_control_model
    from seedprints_lightning.core.ledger import RunDirectory
    from seedprints_lightning.core.opening import ControlsSource, open_chain
    from seedprints_lightning.core.processes import Processes
    from seedprints_lightning.core.schedule import ProbeSchedule

    chain = CustodyChain(schedule=ProbeSchedule(every_n_steps=every_n_steps), patience=patience)

    def build(seeds, s):
        return ControlSet.build(lambda seed: build_control_model(model, seed), seeds, s,
                                lambda control: extract_features(control, s))

    open_chain(chain, step=0, run=RunDirectory(run_dir), processes=Processes(),
               take_reference=lambda: Fingerprint(features=extract_features(model, spec), spec=spec, step=0),
               controls=ControlsSource(num_controls, build), origin="test", warn=lambda _: None, signer=signer)
    return chain


#: Seeded token rows the single-process training tests step through, 4 per step (``lm_step``).
TOKENS = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))


def tokens_at(step: int) -> torch.Tensor:
    """The 4 rows of :data:`TOKENS` that ``step`` trains on (cycling every 16 steps)."""
    return TOKENS[(step * 4) % 64:(step * 4) % 64 + 4]


def lm_step(model: torch.nn.Module, optimizer: Any, step: int, backward: Callable[[torch.Tensor], Any] | None = None
            ) -> None:
    """One optimizer step of a causal LM on :func:`tokens_at` ``(step)``; ``backward`` is e.g. ``fabric.backward``."""
    batch = tokens_at(step)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward() if backward is None else backward(loss)
    optimizer.step()
    optimizer.zero_grad()


def train_and_probe(model: torch.nn.Module, optimizer: torch.optim.Optimizer, monitor: Any, steps) -> None:
    """One optimizer step on a fixed batch per step in ``steps``, each followed by ``monitor.step``."""
    data = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    for step in steps:
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(model, step)


def train_and_observe(model: torch.nn.Module, optimizer: torch.optim.Optimizer, chain: Any, spec, steps, *,
                      seed: int = 0, after: Callable[[int], None] | None = None) -> None:
    """Optimizer steps on seeded batches of 4; ``chain.observe`` when due, then ``after(step)`` (a save, say)."""
    from seedprints_lightning import extract_features

    data = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(seed))
    for step in steps:
        ids = data[(step * 4) % 60:(step * 4) % 60 + 4]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if chain.due(step):
            chain.observe(step, extract_features(model, spec))
        if after is not None:
            after(step)
