"""Negative controls and the identity verdict (no Lightning)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from seedprints_lightning import IdentityVerdict, InputError, LineageResult, ProbeSpec, decide_identity
from seedprints_lightning.controls import (
    CONTROL_SEED_BASE,
    DEFAULT_CONTROL_MARGIN,
    build_control_model,
    control_seeds,
    load_controls,
    preserve_rng_state,
    probe_controls,
    save_controls,
)
from seedprints_lightning.stats import z_threshold

TAGS = {
    "seedprints/z", "seedprints/log10_p", "seedprints/tau_mean", "seedprints/identity_dims", "seedprints/related",
    "seedprints/control_z_max", "seedprints/control_z_mean", "seedprints/threshold", "seedprints/probe_seconds",
}


def result(z: float, related: bool | None = None, alpha: float = 0.01, reason: str | None = None) -> LineageResult:
    if related is None and reason is None:
        related = z > z_threshold(alpha)
    return LineageResult(z=z, log10_p=-z if related is not None else 0.0, p_value=0.5, tau_mean=0.1, k=32, n=200,
                         related=related, alpha=alpha, reason=reason)


def undetermined(reason: str = "only 1 identity dimension(s) in common") -> LineageResult:
    return LineageResult(z=0.0, log10_p=0.0, p_value=1.0, tau_mean=0.0, k=1, n=200, related=None, alpha=0.01,
                         reason=reason)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    with preserve_rng_state():
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


SPEC = ProbeSpec(kind="token", num_samples=40, length=8, vocab_size=64)


# ------------------------------------------------------------------ decide_identity


def test_no_controls_uses_the_analytic_threshold():
    v = decide_identity(result(5.0), (), alpha=0.01, control_margin=2.33)
    assert v.related is True and v.reason is None
    assert v.threshold == pytest.approx(z_threshold(0.01))
    assert v.control_z_max == 0.0 and v.control_z_mean == 0.0
    v = decide_identity(result(1.0), (), alpha=0.01, control_margin=2.33)
    assert v.related is False and "not significant" in v.reason


def test_controls_below_keep_identity():
    v = decide_identity(result(17.7), [result(1.7), result(3.1), result(4.9)], alpha=0.01, control_margin=2.33)
    assert v.related is True
    assert v.control_z_max == pytest.approx(4.9)
    assert v.control_z_mean == pytest.approx((1.7 + 3.1 + 4.9) / 3)
    assert v.threshold == pytest.approx(4.9 + 2.33)


def test_controls_above_flag_a_significant_but_inflated_z():
    # method.md: a swapped model at z = 4.1 with controls 2.3 .. 6.2 passes the analytic test alone.
    swapped = result(4.1)
    assert swapped.related is True
    v = decide_identity(swapped, [result(2.3), result(6.2), result(3.0)], alpha=0.01, control_margin=2.33)
    assert v.related is False
    assert v.threshold == pytest.approx(6.2 + 2.33)
    assert "controls" in v.reason


def test_margin_edge_is_strict():
    v = decide_identity(result(7.0), [result(4.0)], alpha=0.01, control_margin=3.0)
    assert v.related is False  # z must be strictly above control_z_max + margin
    v = decide_identity(result(7.01), [result(4.0)], alpha=0.01, control_margin=3.0)
    assert v.related is True


def test_negative_controls_do_not_lower_the_threshold():
    v = decide_identity(result(2.5), [result(-3.0), result(-1.0)], alpha=0.01, control_margin=2.33)
    assert v.threshold == pytest.approx(z_threshold(0.01))
    assert v.related is True


def test_undetermined_reference_gives_none_with_reason_and_finite_metrics():
    v = decide_identity(undetermined("every identity column is constant"), [result(1.0)], alpha=0.01,
                        control_margin=2.33)
    assert v.related is None and "constant" in v.reason
    metrics = v.to_metrics(0.5)
    assert set(metrics) == TAGS
    assert all(math.isfinite(x) for x in metrics.values())
    assert metrics["seedprints/related"] == 0.0 and metrics["seedprints/z"] == 0.0


def test_undetermined_controls_are_left_out_and_all_undetermined_is_undetermined():
    v = decide_identity(result(10.0), [undetermined(), result(2.0)], alpha=0.01, control_margin=2.33)
    assert v.control_z_max == pytest.approx(2.0) and v.control_z_mean == pytest.approx(2.0)
    assert v.related is True
    v = decide_identity(result(10.0), [undetermined(), undetermined()], alpha=0.01, control_margin=2.33)
    assert v.related is None and "null cannot be measured" in v.reason


def test_to_metrics_has_exactly_the_tags():
    v = decide_identity(result(9.0), [result(1.0), result(3.0)], alpha=0.01, control_margin=2.33)
    m = v.to_metrics(probe_seconds=1.25)
    assert set(m) == TAGS
    assert m["seedprints/related"] == 1.0
    assert m["seedprints/probe_seconds"] == 1.25
    assert m["seedprints/control_z_max"] == 3.0 and m["seedprints/control_z_mean"] == 2.0
    assert m["seedprints/identity_dims"] == 32.0
    assert isinstance(v, IdentityVerdict) and "identity kept" in v.summary()


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": 1.5}, "alpha"),
    ({"control_margin": -1.0}, "control_margin"),
    ({"control_margin": float("nan")}, "control_margin"),
])
def test_decide_identity_validates(kwargs, match):
    args = {"alpha": 0.01, "control_margin": 2.33} | kwargs
    with pytest.raises(InputError, match=match):
        decide_identity(result(3.0), (), **args)


def test_decide_identity_rejects_non_results():
    with pytest.raises(InputError, match="control_results"):
        decide_identity(result(3.0), [3.0], alpha=0.01, control_margin=2.33)


def test_default_margin_sits_between_measured_unrelated_and_own_gaps():
    # docs/benchmarks.md (calibration, n = 1000, 4 controls): unrelated pairs stood at most
    # 8.8 above their largest control (peers), own lineage at least 22.1 above.
    assert 8.8 < DEFAULT_CONTROL_MARGIN < 22.1
    from seedprints_lightning import SeedPrintsCallback

    assert SeedPrintsCallback().control_margin == DEFAULT_CONTROL_MARGIN


# ------------------------------------------------------------------ controls


def test_control_seeds_are_fixed_and_distinct():
    assert control_seeds(3) == (CONTROL_SEED_BASE, CONTROL_SEED_BASE + 1, CONTROL_SEED_BASE + 2)
    assert control_seeds(0) == ()
    assert len(set(control_seeds(10))) == 10
    with pytest.raises(InputError, match="num_controls"):
        control_seeds(-1)


def test_build_control_model_is_deterministic_and_leaves_rng_alone():
    live = tiny_llama(0)
    live.train()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state().clone())
    a = build_control_model(live, 1_000_003)
    b = build_control_model(live, 1_000_003)
    c = build_control_model(live, 1_000_004)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.random.get_rng_state(), before[2])
    assert type(a) is type(live) and not a.training and live.training
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, live.model.embed_tokens.weight)


def test_build_control_follows_live_dtype():
    live = tiny_llama(0).to(torch.bfloat16)
    control = build_control_model(live, 7)
    assert next(control.parameters()).dtype == torch.bfloat16


def test_probe_controls_same_seed_same_features_rng_untouched(tmp_path):
    live = tiny_llama(0)
    torch.manual_seed(123)
    state = torch.random.get_rng_state().clone()
    first = probe_controls(live, SPEC, control_seeds(2), batch_size=16)
    second = probe_controls(live, SPEC, control_seeds(2), batch_size=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.shape == (2, 40, 32) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert not torch.equal(first[0], first[1])
    path = save_controls(tmp_path / "controls.safetensors", first, control_seeds(2), SPEC)
    features, seeds, spec = load_controls(path)
    assert torch.equal(features, first) and seeds == control_seeds(2) and spec == SPEC


def test_probe_controls_needs_resolved_spec():
    with pytest.raises(InputError, match="resolved"):
        probe_controls(tiny_llama(0), ProbeSpec(num_samples=10, length=4), [1])
