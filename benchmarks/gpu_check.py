"""GPU checks of issues #3 and #5, prepared as ONE command for a session that is lent a GPU.

How to run it with the device tool (one H100, 15 minutes of device time in all, at most
10 minutes a command; the machine already has torch, pytorch-lightning, transformers,
scipy and tensorboard)::

    run(command="pip install --no-deps -e . -q && python benchmarks/gpu_check.py --out $OUT --budget-s 480",
        timeout_s=560)

The report comes back as ``$OUT/gpu_check.md`` and ``$OUT/gpu_check.json`` (also rewritten
after every part, so a run killed at its limit still returns what it finished). Nothing
needs carrying: the corpus is built from the interpreter's standard library on the device
(a few seconds; ``--corpus-max-bytes``).

Locally (no GPU), the same code path at tiny sizes::

    python benchmarks/gpu_check.py --out /tmp/gpu_check --cpu-smoke

Parts, in order; each is time-boxed (a share of ``--budget-s``, time left by a part goes to
the next ones; a SIGALRM stops a part that overruns its box) and wrapped, so a failure is
recorded with its traceback and the next part still runs:

1. ``fsdp``: ``Trainer(accelerator="gpu", devices=1, strategy=FSDPStrategy(auto_wrap_policy=
   {LlamaDecoderLayer}), precision="bf16-mixed")`` fitting ``CausalLMModule`` (llama, hidden
   256, 4 layers) on ``TextDataModule(corpus="prose")`` with ``SeedPrintsCallback(
   every_n_steps=20)``: the callback's FSDP probe path (``_run_model_code``), related at
   every probe; the FSDP probe's z against a plain probe of the same weights (fp32 and bf16
   autocast); a resume from a checkpoint (reference and controls restored bit for bit); a
   swap (another seed's weights copied in at step 30 with ``on_identity_lost="raise"``)
   raising ``IdentityLostError``. FSDP needs CUDA: with ``--cpu-smoke`` (or no GPU) the
   same harness runs with ``strategy="auto"`` on CPU, labelled as NOT an FSDP check.
2. ``toy160m``: the paper's toy configuration (llama, vocab 32000, hidden 768, 12 layers,
   12 heads, intermediate 3072) from seeds 42 and 123, trained in lockstep by a plain
   bf16-autocast AdamW loop (lr 3e-4, batch 8 x 256 byte tokens, same batches in the same
   order for both seeds; byte ids are < 256, so only 256 of the 32000 embedding rows are
   trained), probed (token n=1000 L=32 = ``ProbeSpec()``, and embedding probes) at steps
   0, 100, 500 (as many as fit): own, cross, peers z with 4 fresh-init controls and the
   ``decide_identity`` verdict.
3. ``overhead``: mean training step time of the 160M model, one probe as the callback
   makes it (features + 1 + 4 lineage tests + verdict), the steady-state overhead
   ``probe_s / (every_n_steps * step_s)`` at the default ``every_n_steps=1000`` (target
   <= 1 %), the one-time setup (reference + 4 controls), and ``lineage_test`` on the GPU
   against the CPU and a per-column ``scipy.stats.kendalltau`` loop (n=10000, D=768).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

SHARES = {"fsdp": 0.35, "toy160m": 0.45, "overhead": 0.20}


# --------------------------------------------------------------------------------------
# Harness: time boxes, wrapped parts, incremental reports
# --------------------------------------------------------------------------------------


class PartTimeout(Exception):
    """Raised by SIGALRM when a part overruns its time box."""


@contextlib.contextmanager
def alarm(seconds: float):
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise PartTimeout(f"time box of {seconds:.0f} s exceeded")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return str(value)


class Context:
    """Shared state: arguments, sizes, the device, results, and objects parts hand on."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = bool(args.cpu_smoke)
        self.cuda = torch.cuda.is_available() and not self.smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.out = Path(args.out)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.start = time.monotonic()
        self.budget = float(args.budget_s)
        self.shared: dict[str, Any] = {}
        self.report: dict[str, Any] = {"meta": {}, "parts": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def check(res: dict[str, Any], name: str, ok: bool, detail: str) -> None:
    res.setdefault("checks", {})[name] = {"ok": bool(ok), "detail": detail}


def note(res: dict[str, Any], text: str) -> None:
    res.setdefault("notes", []).append(text)
    print(f"  note: {text}", flush=True)


def run_part(ctx: Context, name: str, fn: Callable[[Context, dict[str, Any]], None], box: float) -> None:
    res: dict[str, Any] = {"status": "running", "time_box_s": round(box, 1)}
    ctx.report["parts"][name] = res
    print(f"=== part {name}: time box {box:.0f} s (elapsed {ctx.elapsed():.0f} s of {ctx.budget:.0f})", flush=True)
    start = time.monotonic()
    res["deadline"] = start + box  # monotonic; removed below
    try:
        with alarm(box + 5.0):  # parts check their deadline themselves; the alarm is the backstop
            fn(ctx, res)
        res["status"] = "ok"
    except PartTimeout as exc:
        res["status"] = "timeout"
        res["error"] = str(exc)
        res["traceback"] = traceback.format_exc()
    except BaseException as exc:  # noqa: BLE001 - a part's failure must not stop the next part
        if isinstance(exc, KeyboardInterrupt):
            raise
        res["status"] = "failed"
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
    finally:
        res.pop("deadline", None)
        res["seconds"] = round(time.monotonic() - start, 2)
        print(f"=== part {name}: {res['status']} in {res['seconds']} s", flush=True)
        if res.get("error"):
            print(res.get("traceback", res["error"]), flush=True)
        write_reports(ctx)


def part_time_left(res: dict[str, Any]) -> float:
    return res["deadline"] - time.monotonic()


# --------------------------------------------------------------------------------------
# Part 1: FSDP fit with SeedPrintsCallback (resume, swap, plain-probe comparison)
# --------------------------------------------------------------------------------------


def _clean_param_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def part_fsdp(ctx: Context, res: dict[str, Any]) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from seedprints_lightning import IdentityLostError, ProbeSpec, extract_features, lineage_test
    from seedprints_lightning.callback import SeedPrintsCallback
    from seedprints_lightning.train import CausalLMModule, TextDataModule, load_causal_lm_from_checkpoint

    use_fsdp = ctx.cuda
    if not use_fsdp:
        res["fsdp_skipped"] = ("FSDP needs CUDA (Lightning refuses FSDPStrategy without a GPU accelerator and torch's "
                               "FSDP needs an accelerator device): the same harness ran with strategy='auto' on CPU, "
                               "precision 32: it checks this script, NOT the callback's FSDP path")
        note(res, res["fsdp_skipped"])
    if ctx.smoke:
        size = dict(hidden_size=64, num_layers=2, num_heads=4)
        steps, every, swap_every, seq, batch = 12, 4, 2, 64, 4
        spec = ProbeSpec(num_samples=200)
    else:
        size = dict(hidden_size=256, num_layers=4, num_heads=4)
        steps, every, swap_every, seq, batch = 60, 20, 10, 128, 8
        spec = ProbeSpec()
    swap_step = steps // 2
    res["config"] = dict(arch="llama", vocab_size=256, **size, seq_len=seq, batch_size=batch, max_steps=steps,
                         every_n_steps=every, probe=f"{spec.kind}, n={spec.num_samples}, L={spec.length}",
                         strategy="FSDP" if use_fsdp else "auto (CPU)",
                         precision="bf16-mixed" if use_fsdp else "32-true")
    root = ctx.work / "fsdp"

    def strategy():
        if not use_fsdp:
            return "auto"
        from pytorch_lightning.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})

    def trainer(max_steps: int, callbacks: list, name: str) -> pl.Trainer:
        return pl.Trainer(
            accelerator="gpu" if use_fsdp else "cpu", devices=1, strategy=strategy(),
            precision="bf16-mixed" if use_fsdp else "32-true", max_steps=max_steps, logger=False,
            callbacks=callbacks, default_root_dir=str(root / name), enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )

    def module(seed: int) -> CausalLMModule:
        return CausalLMModule(arch="llama", vocab_size=256, init_seed=seed, lr=1e-3, **size)

    def data() -> TextDataModule:
        return TextDataModule(corpus="prose", corpus_max_bytes=ctx.args.corpus_max_bytes, seq_len=seq,
                              batch_size=batch, val_fraction=0.0, seed=0, vocab_size=256)

    def brief(history: list[dict]) -> list[dict]:
        keep = ("step", "event", "z", "log10_p", "related", "control_z_max", "threshold", "probe_seconds",
                "consecutive_failures", "reason")
        return [{k: h.get(k) for k in keep} for h in history]

    # --- a) fit with checkpoints every `every` steps
    t0 = time.monotonic()
    cb = SeedPrintsCallback(every_n_steps=every, probe=spec)
    ckpt = ModelCheckpoint(dirpath=str(root / "main" / "ckpt"), every_n_train_steps=every, save_top_k=-1,
                           filename="step{step}", auto_insert_metric_name=False)
    tr = trainer(steps, [cb, ckpt], "main")
    tr.fit(module(1), data())
    res["fit_seconds"] = round(time.monotonic() - t0, 2)
    res["strategy_class"] = type(tr.strategy).__name__
    res["wrapper_class"] = type(tr.strategy.model).__name__
    res["history"] = brief(cb.history)
    related = [h["related"] for h in cb.history]
    check(res, "related_stays_1", bool(related) and all(r is True for r in related),
          f"related at steps {[h['step'] for h in cb.history]}: {related}")
    check(res, "reference_from_step0", cb.reference_source == "step0" and cb.reference.step == 0,
          f"reference_source={cb.reference_source}, step={cb.reference.step}")
    ckpts = sorted((root / "main" / "ckpt").glob("step*.ckpt"), key=lambda p: int(p.stem[4:]))
    res["checkpoints"] = [p.name for p in ckpts]
    final_ckpt = ckpts[-1] if ckpts else None
    mid_ckpt = next((p for p in ckpts if int(p.stem[4:]) == steps - every), None)
    ref_features = cb.reference.features.clone()
    ctl_features = None if cb.control_features is None else cb.control_features.clone()

    # --- b) the FSDP probe against a plain probe of the same weights
    try:
        if final_ckpt is None:
            raise RuntimeError("no checkpoint was written")
        lm = load_causal_lm_from_checkpoint(final_ckpt, trust_pickle=True).to(ctx.device)
        plain_fp32 = extract_features(lm, cb.reference.spec)
        with ctx.autocast():
            plain_amp = extract_features(lm, cb.reference.spec)
        cb_last = cb.history[-1]
        z_fp32 = lineage_test(ref_features, plain_fp32).z
        z_amp = lineage_test(ref_features, plain_amp).z
        init_lm = module(1).model.to(ctx.device)
        init_fp32 = extract_features(init_lm, cb.reference.spec)
        with ctx.autocast():
            init_amp = extract_features(init_lm, cb.reference.spec)

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

        res["plain_vs_fsdp"] = {
            "step": int(cb_last["step"]), "checkpoint": final_ckpt.name,
            "z_callback_probe": float(cb_last["z"]),
            "z_plain_fp32": float(z_fp32), "z_plain_bf16_autocast": float(z_amp),
            "reference_vs_plain_init_fp32_max_rel_diff": rel(ref_features, init_fp32),
            "reference_vs_plain_init_autocast_max_rel_diff": rel(ref_features, init_amp),
            "z_reference_vs_plain_init_fp32": float(lineage_test(init_fp32, ref_features).z),
        }
        tol = max(1.0, 0.05 * abs(float(cb_last["z"])))
        check(res, "fsdp_probe_matches_plain_probe", abs(float(cb_last["z"]) - z_amp) <= tol,
              f"callback z {cb_last['z']:.2f} vs plain bf16-autocast z {z_amp:.2f} vs plain fp32 z {z_fp32:.2f} "
              f"(tolerance {tol:.2f} against the autocast one)")
        del lm, init_lm
    except Exception as exc:  # noqa: BLE001
        res["plain_vs_fsdp_error"] = f"{type(exc).__name__}: {exc}"
        res["plain_vs_fsdp_traceback"] = traceback.format_exc()
        check(res, "fsdp_probe_matches_plain_probe", False, res["plain_vs_fsdp_error"])

    # --- c) resume from the checkpoint one interval before the end
    if part_time_left(res) < 20:
        note(res, "resume and swap checks skipped: part time box spent")
        return
    try:
        if mid_ckpt is None:
            raise RuntimeError(f"no checkpoint at step {steps - every} among {res['checkpoints']}")
        cb2 = SeedPrintsCallback(every_n_steps=every, probe=spec)
        tr2 = trainer(steps, [cb2], "main")  # same directory: the reference file there must match
        tr2.fit(module(1), data(), ckpt_path=str(mid_ckpt))
        same_ref = torch.equal(cb2.reference.features, ref_features)
        same_ctl = (ctl_features is None and cb2.control_features is None) or (
            ctl_features is not None and cb2.control_features is not None
            and torch.equal(cb2.control_features, ctl_features))
        res["resume"] = {"from": mid_ckpt.name, "reference_source": cb2.reference_source,
                         "history": brief(cb2.history)}
        check(res, "resume_restores_reference_bit_for_bit", same_ref and cb2.reference_source == "checkpoint",
              f"torch.equal(reference)={same_ref}, reference_source={cb2.reference_source}")
        check(res, "resume_restores_controls_bit_for_bit", same_ctl, f"torch.equal(controls)={same_ctl}")
        new = [h for h in cb2.history if h["step"] > steps - every]
        check(res, "resume_related_stays_1", bool(new) and all(h["related"] is True for h in new),
              f"after resume: {[(h['step'], round(h['z'], 2), h['related']) for h in new]}")
        orig_last, res_last = cb.history[-1], cb2.history[-1]
        res["resume"]["z_last_original_vs_resumed"] = [orig_last["z"], res_last["z"]]
    except Exception as exc:  # noqa: BLE001
        res["resume_error"] = f"{type(exc).__name__}: {exc}"
        res["resume_traceback"] = traceback.format_exc()
        check(res, "resume_restores_reference_bit_for_bit", False, res["resume_error"])

    # --- d) swap in another seed's weights at swap_step; on_identity_lost="raise"
    if part_time_left(res) < 15:
        note(res, "swap check skipped: part time box spent")
        return
    donor = {k: v.detach().clone() for k, v in module(2).model.state_dict().items()}

    class Swap(pl.Callback):
        def __init__(self) -> None:
            self.done_at: int | None = None
            self.copied = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.done_at is not None or trainer.global_step != swap_step:
                return
            summon = contextlib.nullcontext()
            if use_fsdp:
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                summon = FSDP.summon_full_params(trainer.strategy.model, writeback=True)
            with summon, torch.no_grad():
                for name, param in pl_module.model.named_parameters():
                    param.copy_(donor[_clean_param_name(name)].to(device=param.device, dtype=param.dtype))
                    self.copied += 1
            self.done_at = trainer.global_step

    swap = Swap()
    cb3 = SeedPrintsCallback(every_n_steps=swap_every, probe=spec, on_identity_lost="raise", patience=2)
    tr3 = trainer(steps, [swap, cb3], "swap")
    raised = None
    try:
        tr3.fit(module(1), data())
    except IdentityLostError as exc:
        raised = str(exc)
    res["swap"] = {"swapped_at": swap.done_at, "params_copied": swap.copied, "every_n_steps": swap_every,
                   "raised": raised, "history": brief(cb3.history)}
    before = [h for h in cb3.history if h["step"] < swap_step]
    check(res, "swap_raises_IdentityLostError", raised is not None and swap.done_at == swap_step,
          f"swapped at {swap.done_at} ({swap.copied} tensors); raised={'yes' if raised else 'no'}; probes "
          f"{[(h['step'], round(h['z'], 2), h['related']) for h in cb3.history]}")
    check(res, "swap_run_related_before_swap", bool(before) and all(h["related"] is True for h in before),
          f"{[(h['step'], h['related']) for h in before]}")

    # --- e) an embedding-probe reference: the spec is resolved through the wrapper (under FSDP
    # bf16-mixed the embedding is seen in bf16), so compare it with the fp32 resolution offline.
    if part_time_left(res) < 15:
        note(res, "embedding-spec check skipped: part time box spent")
        return
    cb4 = SeedPrintsCallback(every_n_steps=every, probe=ProbeSpec(kind="embedding", num_samples=spec.num_samples),
                             num_controls=4)
    tr4 = trainer(every, [cb4], "embedding")
    tr4.fit(module(1), data())
    offline = ProbeSpec(kind="embedding", num_samples=spec.num_samples).resolve(module(1).model)
    got = cb4.reference.spec
    res["embedding_spec"] = {"callback": got.to_dict(), "offline_fp32": offline.to_dict(),
                             "history": brief(cb4.history)}
    check(res, "embedding_spec_equals_offline_fp32_spec", got == offline,
          f"callback N({got.embed_mean!r}, {got.embed_std!r}) vs offline N({offline.embed_mean!r}, "
          f"{offline.embed_std!r}); unequal specs make the run's reference.safetensors incomparable with an offline "
          "fingerprint of the same init unless the spec is passed (--spec-from)")
    check(res, "embedding_related_stays_1", bool(cb4.history) and all(h["related"] is True for h in cb4.history),
          f"{[(h['step'], round(h['z'], 2), h['related']) for h in cb4.history]}")


# --------------------------------------------------------------------------------------
# Part 2: the paper's toy configuration, two seeds, same data, same order
# --------------------------------------------------------------------------------------


def toy_sizes(ctx: Context) -> dict[str, Any]:
    if ctx.smoke:
        return dict(vocab_size=32000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)
    return dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)


def toy_batches(ctx: Context):
    from seedprints_lightning.train import TextDataModule

    seq, batch = (64, 4) if ctx.smoke else (256, 8)
    dm = TextDataModule(corpus="prose", corpus_max_bytes=ctx.args.corpus_max_bytes, seq_len=seq, batch_size=batch,
                        val_fraction=0.0, seed=0, vocab_size=32000)
    dm.prepare_data()
    dm.setup("fit")
    epoch = 0
    while True:
        dm.set_epoch(epoch)
        for b in dm.train_dataloader():
            yield b["input_ids"].to(ctx.device, non_blocking=True), b["labels"].to(ctx.device, non_blocking=True)
        epoch += 1


def make_toy(ctx: Context, seed: int):
    from seedprints_lightning.train import make_causal_lm

    attn = "sdpa" if ctx.cuda else "eager"
    model = make_causal_lm("llama", seed=seed, attn_implementation=attn, **toy_sizes(ctx)).to(ctx.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0,
                            **({"fused": True} if ctx.cuda else {}))
    return model, opt


def train_step(ctx: Context, model, opt, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    with ctx.autocast():
        logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def probe(ctx: Context, model, spec) -> torch.Tensor:
    from seedprints_lightning.controls import preserve_rng_state
    from seedprints_lightning.probes import extract_features

    with preserve_rng_state(), ctx.autocast():
        return extract_features(model, spec, batch_size=64)


def part_toy(ctx: Context, res: dict[str, Any]) -> None:
    from seedprints_lightning import ProbeSpec, decide_identity, lineage_test
    from seedprints_lightning.controls import build_control_model, control_seeds

    seeds = (42, 123)
    targets = [0, 10, 30] if ctx.smoke else [0, 100, 500]
    n = 300 if ctx.smoke else 1000
    res["config"] = dict(arch="llama", **toy_sizes(ctx), seeds=list(seeds), lr=3e-4, betas=[0.9, 0.95],
                         grad_clip=1.0, batch="4 x 64" if ctx.smoke else "8 x 256", target_steps=targets,
                         autocast="bf16" if ctx.cuda else "none (fp32, CPU)",
                         attn="sdpa" if ctx.cuda else "eager", probes=f"token and embedding, n={n}, L=32")
    note(res, "byte-level corpus: token ids < 256, so only 256 of the 32000 embedding rows see gradients; the token "
              "probes draw ids from the full 32000 range (mostly untrained rows): the embedding probes bypass that")
    batches = toy_batches(ctx)
    t0 = time.monotonic()
    models = {s: make_toy(ctx, s) for s in seeds}
    res["build_seconds"] = round(time.monotonic() - t0, 2)
    res["num_parameters"] = sum(p.numel() for p in models[42][0].parameters())
    specs = {"token": ProbeSpec(num_samples=n).resolve(models[42][0]),
             "embedding": ProbeSpec(kind="embedding", num_samples=n).resolve(models[42][0])}
    res["specs"] = {k: v.describe() for k, v in specs.items()}
    feats: dict[tuple[int, str, int], torch.Tensor] = {}

    def probe_all(step: int) -> float:
        sync()
        start = time.monotonic()
        for s in seeds:
            for kind, spec in specs.items():
                feats[(s, kind, step)] = probe(ctx, models[s][0], spec)
        sync()
        return time.monotonic() - start

    probe_s = probe_all(0)
    res["probe_all_seconds"] = round(probe_s, 2)
    t0 = time.monotonic()
    controls = {kind: [] for kind in specs}
    seeds_ctl = control_seeds(4)
    for c in seeds_ctl:
        control = build_control_model(models[42][0], c)
        for kind, spec in specs.items():
            controls[kind].append(probe(ctx, control, spec))
        del control
    res["controls_seconds"] = round(time.monotonic() - t0, 2)
    res["control_seeds"] = list(seeds_ctl)
    ctx.shared["toy"] = {"model": models[42][0], "opt": models[42][1], "batches": batches,
                         "spec": specs["token"], "reference": feats[(42, "token", 0)],
                         "controls": torch.stack(controls["token"])}

    results: list[dict[str, Any]] = []
    losses: dict[int, dict[int, float]] = {}

    def evaluate(step: int) -> None:
        for kind in specs:
            ctl = controls[kind]
            pairs = []
            if step > 0:
                pairs += [(f"own {s}", (s, kind, 0), (s, kind, step)) for s in seeds]
            pairs += [("cross 123@t vs 42@0", (42, kind, 0), (123, kind, step)),
                      ("cross 42@t vs 123@0", (123, kind, 0), (42, kind, step)),
                      ("peers 42@t vs 123@t", (42, kind, step), (123, kind, step))]
            for label, base_key, target_key in pairs:
                base, target = feats[base_key], feats[target_key]
                ref = lineage_test(base, target)
                verdict = decide_identity(ref, [lineage_test(c, target) for c in ctl])
                results.append({"step": step, "probe": kind, "relation": label, "z": ref.z,
                                "analytic_related": ref.related, "control_z": [round(z, 2) for z in verdict.control_z],
                                "threshold": verdict.threshold, "verdict_related": verdict.related,
                                "expected": label.startswith("own")})
        res["results"] = results
        res["losses"] = losses

    evaluate(0)
    step_times: list[float] = []
    step = 0
    last = max(targets)
    stopped = None
    while step < last:
        est_step = (statistics.median(step_times[-20:]) if step_times else 1.0)
        needed = 2 * est_step + 2.0 * probe_s + 5.0
        if part_time_left(res) < needed:
            stopped = step
            break
        ids, labels = next(batches)
        sync()
        start = time.monotonic()
        step_losses = {s: train_step(ctx, models[s][0], models[s][1], ids, labels) for s in seeds}
        sync()
        step_times.append((time.monotonic() - start) / len(seeds))
        step += 1
        if step in targets or step % 50 == 0:
            losses[step] = {s: round(float(v), 4) for s, v in step_losses.items()}
        if step in targets:
            probe_s = max(probe_s, probe_all(step))
            evaluate(step)
            res["steps_done"] = step
    if stopped is not None and stopped > 0 and stopped not in targets:
        note(res, f"time box: stopped at step {stopped} of {last}; probed there instead")
        probe_all(stopped)
        evaluate(stopped)
    elif stopped is not None:
        note(res, f"time box: stopped at step {stopped} of {last}")
    res["steps_done"] = step
    res["probed_steps"] = sorted({r["step"] for r in results})
    res["step_seconds_per_model_median"] = statistics.median(step_times[5:] or step_times) if step_times else None
    ctx.shared["toy"]["step_s"] = res["step_seconds_per_model_median"]
    own = [r for r in results if r["expected"]]
    unrelated = [r for r in results if not r["expected"] and r["step"] > 0]
    tok_own = [r for r in own if r["probe"] == "token"]
    tok_unrel = [r for r in unrelated if r["probe"] == "token"]
    check(res, "token_own_related", bool(tok_own) and all(r["verdict_related"] is True for r in tok_own),
          f"{[(r['step'], r['relation'], round(r['z'], 1), r['verdict_related']) for r in tok_own]}")
    check(res, "token_unrelated_not_related",
          bool(tok_unrel) and all(r["verdict_related"] is not True for r in tok_unrel),
          f"{[(r['step'], r['relation'], round(r['z'], 1), r['verdict_related']) for r in tok_unrel]}")


# --------------------------------------------------------------------------------------
# Part 3: overhead of the callback's per-interval work on the 160M model
# --------------------------------------------------------------------------------------


def part_overhead(ctx: Context, res: dict[str, Any]) -> None:
    from seedprints_lightning import ProbeSpec, decide_identity, lineage_test
    from seedprints_lightning.controls import control_seeds, preserve_rng_state, probe_controls

    toy = ctx.shared.get("toy")
    if toy is None or "model" not in toy:
        note(res, "part toy160m left no model: building seed 42 here (setup timed below)")
        model, opt = make_toy(ctx, 42)
        toy = {"model": model, "opt": opt, "batches": toy_batches(ctx)}
    model, opt, batches = toy["model"], toy["opt"], toy["batches"]
    if "reference" not in toy:
        sync()
        t0 = time.monotonic()
        spec = ProbeSpec(num_samples=300 if ctx.smoke else 1000).resolve(model)
        toy["spec"], toy["reference"] = spec, probe(ctx, model, spec)
        with preserve_rng_state():
            toy["controls"] = probe_controls(model, spec, control_seeds(4), context=ctx.autocast)
        sync()
        res["setup_seconds_measured_here"] = round(time.monotonic() - t0, 2)
    spec, reference, controls = toy["spec"], toy["reference"], toy["controls"]
    res["config"] = {"model": "toy 160M config" if not ctx.smoke else "smoke toy config", "probe": spec.describe(),
                     "controls": int(controls.shape[0]), "every_n_steps_default": 1000}

    # Mean step time (training only), then the same steps with one callback-style probe inside.
    n_steps = 5 if ctx.smoke else 40
    for _ in range(3):  # warm-up
        train_step(ctx, model, opt, *next(batches))

    def timed_steps(k: int, probe_at: int | None = None) -> float:
        sync()
        start = time.monotonic()
        for i in range(k):
            train_step(ctx, model, opt, *next(batches))
            if probe_at is not None and i == probe_at:
                callback_probe()
        sync()
        return time.monotonic() - start

    def callback_probe():
        live = probe(ctx, model, spec)
        ref = lineage_test(reference, live)
        ctl = [lineage_test(c, live) for c in controls]
        return decide_identity(ref, ctl), live

    plain = timed_steps(n_steps)
    step_s = plain / n_steps
    probe_times = []
    for _ in range(3):
        if probe_times and part_time_left(res) < 10 + 2 * probe_times[-1]:
            break
        sync()
        start = time.monotonic()
        verdict, _ = callback_probe()
        sync()
        probe_times.append(time.monotonic() - start)
    probe_s = min(probe_times)
    # The parts of one probe: features alone.
    sync()
    start = time.monotonic()
    live = probe(ctx, model, spec)
    sync()
    features_s = time.monotonic() - start
    start = time.monotonic()
    for c in [reference, *controls]:
        lineage_test(c, live)
    tests_s = time.monotonic() - start
    with_probe = timed_steps(n_steps, probe_at=n_steps // 2) if part_time_left(res) > 2 * plain + probe_s + 10 else None
    res["steps_timed"] = n_steps
    res["step_seconds"] = step_s
    res["probe_seconds_best_of"] = [round(t, 4) for t in probe_times]
    res["probe_seconds"] = probe_s
    res["probe_features_seconds"] = features_s
    res["probe_5_lineage_tests_seconds"] = tests_s
    res["verdict_related_at_probe"] = verdict.related
    res["overhead_at_every_1000"] = probe_s / (1000 * step_s)
    res["overhead_at_every_100"] = probe_s / (100 * step_s)
    if with_probe is not None:
        res["steps_with_one_probe_seconds"] = with_probe
        res["steps_without_probe_seconds"] = plain
        res["measured_extra_seconds_of_one_probe"] = with_probe - plain
    toy_setup = ctx.report["parts"].get("toy160m", {})
    if "controls_seconds" in toy_setup:
        res["one_time_setup_note"] = ("one-time setup at train start (reference probe + 4 controls built on CPU "
                                      "and probed, both probe kinds in part toy160m): "
                                      f"{toy_setup['controls_seconds']} s for the controls")
    check(res, "overhead_le_1pct_at_default_interval", res["overhead_at_every_1000"] <= 0.01,
          f"probe {probe_s:.3f} s / (1000 x step {step_s * 1000:.1f} ms) = {100 * res['overhead_at_every_1000']:.3f} %")

    # lineage_test on the GPU vs the CPU vs a per-column scipy loop.
    n, dim = (2000, 64) if ctx.smoke else (10000, 768)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, dim, generator=g)
    target = 0.2 * base + torch.randn(n, dim, generator=g)
    kt: dict[str, Any] = {"n": n, "D": dim}
    res["lineage_test_speed"] = kt
    start = time.monotonic()
    kt["cpu_z"] = lineage_test(base, target, identity_ratio=1.0).z
    kt["cpu_seconds"] = time.monotonic() - start
    if ctx.cuda:
        bg, tg = base.cuda(), target.cuda()
        lineage_test(bg, tg, identity_ratio=1.0)
        sync()
        times = []
        for _ in range(3):
            sync()
            start = time.monotonic()
            z = lineage_test(bg, tg, identity_ratio=1.0).z
            sync()
            times.append(time.monotonic() - start)
        kt["gpu_seconds"], kt["gpu_z"] = min(times), z
    est_scipy = 2.0 * kt["cpu_seconds"] * 30  # generous guess before trying
    if part_time_left(res) > min(60.0, est_scipy) + 5:
        from speed import scipy_reference_z

        start = time.monotonic()
        kt["scipy_z"] = scipy_reference_z(base.numpy(), target.numpy())
        kt["scipy_loop_seconds"] = time.monotonic() - start
        kt["speedup_cpu_vs_scipy"] = kt["scipy_loop_seconds"] / kt["cpu_seconds"]
        if "gpu_seconds" in kt:
            kt["speedup_gpu_vs_scipy"] = kt["scipy_loop_seconds"] / kt["gpu_seconds"]
    else:
        note(res, "scipy loop skipped: not enough time left in the box")
    if "gpu_seconds" in kt:
        kt["speedup_gpu_vs_cpu"] = kt["cpu_seconds"] / kt["gpu_seconds"]


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return str(value)


def render_markdown(ctx: Context) -> str:
    rep = ctx.report
    meta = rep["meta"]
    lines = ["# SeedPrints GPU checks (issues #3, #5)", ""]
    if ctx.smoke:
        lines += ["**CPU SMOKE RUN** at tiny sizes: proves the script runs end to end; no number here is a GPU "
                  "result, and part fsdp ran WITHOUT FSDP.", ""]
    lines += [f"- device: {meta.get('device')}", f"- torch {meta.get('torch')}, pytorch-lightning "
              f"{meta.get('lightning')}, transformers {meta.get('transformers')}, python {meta.get('python')}",
              f"- command: `{meta.get('command')}`", f"- budget {meta.get('budget_s')} s; wall so far "
              f"{meta.get('wall_s')} s", ""]
    lines += ["| part | status | seconds | time box s | checks passed |", "|---|---|---|---|---|"]
    for name, part in rep["parts"].items():
        checks = part.get("checks", {})
        passed = f"{sum(c['ok'] for c in checks.values())}/{len(checks)}" if checks else "-"
        lines.append(f"| {name} | {part.get('status')} | {part.get('seconds', '-')} | {part.get('time_box_s')} | "
                     f"{passed} |")
    lines.append("")
    for name, part in rep["parts"].items():
        lines += [f"## {name}", ""]
        if part.get("config"):
            lines += ["config: " + ", ".join(f"{k}={v}" for k, v in part["config"].items()), ""]
        for text in part.get("notes", []):
            lines.append(f"- note: {text}")
        if part.get("notes"):
            lines.append("")
        if part.get("checks"):
            lines += ["| check | result | detail |", "|---|---|---|"]
            for cname, c in part["checks"].items():
                detail = str(c["detail"]).replace("|", "/")
                lines.append(f"| {cname} | {'PASS' if c['ok'] else 'FAIL'} | {detail} |")
            lines.append("")
        if name == "fsdp":
            lines += _render_fsdp(part)
        elif name == "toy160m":
            lines += _render_toy(part)
        elif name == "overhead":
            lines += _render_overhead(part)
        for key in [k for k in part if k.endswith("error")]:
            tb_key = key.replace("error", "traceback")
            lines += [f"**{key}**: {part[key]}", "", "```", str(part.get(tb_key, "")).rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


def _history_table(history: list[dict]) -> list[str]:
    out = ["| step | event | z | related | control z max | threshold | probe s |", "|---|---|---|---|---|---|---|"]
    for h in history:
        out.append(f"| {h.get('step')} | {h.get('event')} | {fmt(h.get('z'))} | {h.get('related')} | "
                   f"{fmt(h.get('control_z_max'))} | {fmt(h.get('threshold'))} | {fmt(h.get('probe_seconds'), 3)} |")
    return out + [""]


def _render_fsdp(part: dict) -> list[str]:
    out = []
    if "strategy_class" in part:
        out += [f"strategy {part['strategy_class']}, wrapper {part.get('wrapper_class')}, fit "
                f"{part.get('fit_seconds')} s",
                ""]
    if part.get("history"):
        out += ["Callback history (main fit):", ""] + _history_table(part["history"])
    if part.get("plain_vs_fsdp"):
        out += ["Callback probe vs a plain probe of the same weights:", "", "| quantity | value |", "|---|---|"]
        out += [f"| {k} | {fmt(v, 4)} |" for k, v in part["plain_vs_fsdp"].items()] + [""]
    if part.get("resume"):
        out += [f"Resume from {part['resume']['from']} (reference_source {part['resume']['reference_source']}); "
                f"z at the last step, original vs resumed: {part['resume'].get('z_last_original_vs_resumed')}", ""]
        out += _history_table(part["resume"]["history"])
    if part.get("embedding_spec"):
        out += ["Embedding-probe reference spec, callback vs offline fp32 resolution: "
                f"{part['embedding_spec']['callback']} vs {part['embedding_spec']['offline_fp32']}", ""]
    if part.get("swap"):
        sw = part["swap"]
        out += [f"Swap at step {sw['swapped_at']} ({sw['params_copied']} tensors), probes every {sw['every_n_steps']}; "
                f"IdentityLostError raised: {'yes' if sw['raised'] else 'no'}", ""]
        out += _history_table(sw["history"])
    return out


def _render_toy(part: dict) -> list[str]:
    out = [f"parameters {part.get('num_parameters')}, build {part.get('build_seconds')} s, controls "
           f"{part.get('controls_seconds')} s, probes (2 seeds x 2 kinds) {part.get('probe_all_seconds')} s, steps "
           f"done {part.get('steps_done')}, median step per model "
           f"{fmt(part.get('step_seconds_per_model_median'), 4)} s", ""]
    if part.get("losses"):
        out += ["losses: " + "; ".join(f"step {k}: {v}" for k, v in part["losses"].items()), ""]
    if part.get("results"):
        out += ["| step | probe | relation | z | analytic related | control z | threshold | verdict related |",
                "|---|---|---|---|---|---|---|---|"]
        for r in part["results"]:
            out.append(f"| {r['step']} | {r['probe']} | {r['relation']} | {fmt(r['z'])} | {r['analytic_related']} | "
                       f"{r['control_z']} | {fmt(r['threshold'])} | {r['verdict_related']} |")
        out.append("")
    return out


def _render_overhead(part: dict) -> list[str]:
    keys = ["steps_timed", "step_seconds", "probe_seconds", "probe_seconds_best_of", "probe_features_seconds",
            "probe_5_lineage_tests_seconds", "verdict_related_at_probe", "overhead_at_every_1000",
            "overhead_at_every_100", "steps_without_probe_seconds", "steps_with_one_probe_seconds",
            "measured_extra_seconds_of_one_probe", "setup_seconds_measured_here", "one_time_setup_note"]
    out = ["| quantity | value |", "|---|---|"]
    out += [f"| {k} | {fmt(part[k], 4)} |" for k in keys if k in part]
    out.append("")
    if part.get("lineage_test_speed"):
        out += ["lineage_test speed (all dims): " + ", ".join(f"{k}={fmt(v, 4)}" for k, v in
                                                             part["lineage_test_speed"].items()), ""]
    return out


def write_reports(ctx: Context) -> None:
    ctx.report["meta"]["wall_s"] = round(ctx.elapsed(), 1)
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "gpu_check.json").write_text(json.dumps(jsonable(ctx.report), indent=1) + "\n")
    (ctx.out / "gpu_check.md").write_text(render_markdown(ctx))


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.md / gpu_check.json (e.g. $OUT)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total wall-time budget of all parts")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks the script, not the GPU")
    parser.add_argument("--parts", default="fsdp,toy160m,overhead", help="comma-separated subset, in order")
    parser.add_argument("--work", default=None, help="scratch directory for checkpoints (default: a new temp dir, "
                        "kept out of --out so only the reports come back)")
    parser.add_argument("--corpus-max-bytes", type=int, default=1 << 20, help="size cap of the built-in prose corpus")
    args = parser.parse_args(argv)
    ctx = Context(args)
    ctx.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    import pytorch_lightning as pl
    import transformers

    ctx.report["meta"] = {
        "device": torch.cuda.get_device_name(0) if ctx.cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                                  f"{os.cpu_count()} cores)",
        "cuda_available": torch.cuda.is_available(), "cpu_smoke": ctx.smoke,
        "torch": torch.__version__, "lightning": pl.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "budget_s": ctx.budget,
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
    }
    if ctx.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    write_reports(ctx)

    # The corpus is built once here (timed in meta), so no part's box pays for it.
    from seedprints_lightning.train import build_corpus

    t0 = time.monotonic()
    build_corpus("prose", max_bytes=args.corpus_max_bytes)
    ctx.report["meta"]["corpus_build_s"] = round(time.monotonic() - t0, 2)

    parts = {"fsdp": part_fsdp, "toy160m": part_toy, "overhead": part_overhead}
    order = [p.strip() for p in args.parts.split(",") if p.strip()]
    for name in order:
        if name not in parts:
            raise SystemExit(f"unknown part {name!r}; known: {', '.join(parts)}")
    for i, name in enumerate(order):
        remaining_share = sum(SHARES[p] for p in order[i:])
        box = max(0.0, ctx.left()) * SHARES[name] / remaining_share
        if box < 10:
            ctx.report["parts"][name] = {"status": "skipped", "error": f"budget spent ({ctx.left():.0f} s left)"}
            write_reports(ctx)
            continue
        run_part(ctx, name, parts[name], box)
    write_reports(ctx)
    print(f"report: {ctx.out / 'gpu_check.md'} ({ctx.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
