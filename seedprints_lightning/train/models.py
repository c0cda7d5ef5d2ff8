"""Small, randomly initialised Hugging Face causal language models for tests, demos and benchmarks.

The SeedPrints fingerprint is a property of a model's *random initialisation*, so the one thing
this module must guarantee is that ``make_causal_lm(seed=s)`` produces bit-identical weights for
the same arguments on every call, in every process, whatever the caller did to the global RNG
before, and that it leaves the caller's RNG exactly as it found it. The second half matters
because Lightning's ``seed_everything`` seeds data order and dropout through the global RNG: a
model factory that advanced it would silently change the rest of a run depending on how many
models were built first.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ..core.checks import check_choice, check_int
from ..core.errors import InputError

__all__ = ["ARCHITECTURES", "make_causal_lm", "make_config", "model_from_config"]

#: Architectures :func:`make_causal_lm` can build, mapped to their (config, model) classes.
_REGISTRY: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}
ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)

# torch.manual_seed accepts any value representable as a uint64.
_MAX_SEED = 2**64 - 1

# "eager" is plain matmul + softmax: the same arithmetic on every device and torch build, and
# the only implementation that can return attention maps (probes may ask for them). The
# models built here are tiny, so the speed SDPA would bring does not matter.
_DEFAULT_ATTN_IMPLEMENTATION = "eager"
_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def _check_arch(arch: Any) -> str:
    if not isinstance(arch, str) or arch.lower() not in _REGISTRY:
        # Always raises here: the registry's names are lower case, so an arch that matches none
        # of them case-insensitively matches none exactly either.
        check_choice("arch", arch, ARCHITECTURES, hint="case-insensitive")
    return arch.lower()


#: The size arguments of :func:`make_config`, which ``CausalLMModule`` also takes (LightningCLI
#: needs them spelled out in its signature) and hands through by these names.
MODEL_SIZE_ARGS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                   "max_position_embeddings")


def make_config(
    arch: str = "llama",
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    **config_overrides: Any,
) -> PretrainedConfig:
    """Build the Hugging Face config of a small causal LM, with architecture-neutral size names.

    The size arguments use one vocabulary for every architecture and are translated to each
    config's own field names (``num_layers`` becomes ``n_layer`` for GPT-2, and so on). Values
    that make a model impossible (a hidden size the heads do not divide, more key/value heads
    than query heads, an odd head size under rotary embeddings) raise :class:`InputError` here
    rather than as a shape error deep inside a forward pass.

    Args:
        arch: ``"llama"``, ``"qwen2"`` or ``"gpt2"``.
        vocab_size: Number of token ids; 256 matches :class:`~seedprints_lightning.train.ByteTokenizer`.
        hidden_size: Width of the residual stream; must be divisible by ``num_heads``.
        num_layers: Number of transformer blocks.
        num_heads: Number of attention (query) heads.
        num_kv_heads: Key/value heads for grouped-query attention (llama, qwen2 only); must
            divide ``num_heads``. ``None`` means ``num_heads`` (plain multi-head attention).
        intermediate_size: Width of the MLP; ``None`` means ``4 * hidden_size`` for every arch.
        max_position_embeddings: Longest sequence the model accepts.
        **config_overrides: Any other field of the architecture's config class, passed through
            unchanged (for example ``rms_norm_eps=1e-5`` or ``attn_implementation="sdpa"``).
            Field names the config class does not know raise :class:`InputError`, because
            Hugging Face configs would otherwise store a misspelt field and ignore it.

    Returns:
        A float32 config with bos/eos/pad token ids unset (a byte vocabulary has none), no
        dropout, and, for llama and qwen2, untied input and output embeddings (GPT-2 keeps its
        tied embeddings, which is what that architecture is).
    """
    arch = _check_arch(arch)
    vocab_size = check_int("vocab_size", vocab_size, low=1)
    hidden_size = check_int("hidden_size", hidden_size, low=1)
    num_layers = check_int("num_layers", num_layers, low=1)
    num_heads = check_int("num_heads", num_heads, low=1)
    max_position_embeddings = check_int("max_position_embeddings", max_position_embeddings, low=1)
    if intermediate_size is None:
        intermediate_size = 4 * hidden_size
    intermediate_size = check_int("intermediate_size", intermediate_size, low=1, hint="or None")
    if num_kv_heads is None:
        num_kv_heads = num_heads
    num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1, hint="or None")

    if hidden_size % num_heads:
        raise InputError(
            f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}: pick sizes "
            f"with hidden_size a multiple of num_heads (e.g. "
            f"hidden_size={num_heads * max(1, hidden_size // num_heads)})"
        )
    head_dim = hidden_size // num_heads
    if num_kv_heads > num_heads or num_heads % num_kv_heads:
        raise InputError(
            f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (grouped-query attention "
            "shares each key/value head among an equal number of query heads)"
        )
    if arch == "gpt2" and num_kv_heads != num_heads:
        raise InputError(
            f"gpt2 has no grouped-query attention: leave num_kv_heads unset or equal to num_heads "
            f"(got num_kv_heads={num_kv_heads}, num_heads={num_heads}), or use arch='llama'"
        )
    if arch in ("llama", "qwen2") and head_dim % 2:
        raise InputError(
            f"{arch} uses rotary position embeddings, which need an even head size; "
            f"hidden_size / num_heads = {head_dim}: change hidden_size or num_heads"
        )

    attn_implementation = config_overrides.pop("attn_implementation", _DEFAULT_ATTN_IMPLEMENTATION)
    check_choice("attn_implementation", attn_implementation, _ATTN_IMPLEMENTATIONS,
                 hint="both run on CPU without extra packages")

    config_cls, _ = _REGISTRY[arch]
    if arch == "gpt2":
        fields: dict[str, Any] = {
            "vocab_size": vocab_size,
            "n_embd": hidden_size,
            "n_layer": num_layers,
            "n_head": num_heads,
            "n_inner": intermediate_size,
            "n_positions": max_position_embeddings,
            # Modern pretraining runs without dropout, and dropout would make two forward
            # passes of the same weights differ, which muddles fingerprint comparisons.
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "summary_first_dropout": 0.0,
        }
    else:
        fields = {
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "intermediate_size": intermediate_size,
            "max_position_embeddings": max_position_embeddings,
            "attention_dropout": 0.0,
            # Untied embeddings give the input and output matrices independent random draws,
            # which is how current llama/qwen2 pretraining recipes are set up.
            "tie_word_embeddings": False,
        }
    # The defaults of these ids (e.g. GPT-2's 50256) point outside a 256-token vocabulary.
    fields.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)

    # Catch misspelt overrides: a Hugging Face config stores unknown keyword arguments as
    # plain attributes, so ``rms_norm_epss=1e-5`` would be accepted and silently ignored.
    # Legacy names the config converts and consumes (e.g. ``rope_theta`` in transformers 5)
    # are fine, which is why the check looks at the built config rather than a field list.
    reference = config_cls()
    unknown_candidates = [key for key in config_overrides if not hasattr(reference, key)]
    fields.update(config_overrides)
    try:
        config = config_cls(**fields, attn_implementation=attn_implementation)
    except (TypeError, ValueError) as err:
        raise InputError(f"cannot build a {arch} config from these settings: {err}") from err
    unknown = [key for key in unknown_candidates if key in vars(config)]
    if unknown:
        raise InputError(
            f"unknown {config_cls.__name__} field(s) {', '.join(sorted(unknown))}: check the spelling "
            f"against the {config_cls.__name__} documentation"
        )
    config.dtype = torch.float32
    return config


def make_causal_lm(arch: str = "llama", *, seed: int, **sizes_and_overrides: Any) -> PreTrainedModel:
    """Build a randomly initialised float32 causal LM on CPU, determined entirely by ``seed``.

    Shorthand for ``model_from_config(make_config(arch, **sizes_and_overrides), seed=seed)``:
    :func:`make_config` has the size arguments (``vocab_size``, ``hidden_size``,
    ``num_layers``, ...) and their checks, :func:`model_from_config` the determinism
    guarantees.

    Args:
        arch: ``"llama"``, ``"qwen2"`` or ``"gpt2"``.
        seed: Initialisation seed, an int in ``[0, 2**64 - 1]``.
        **sizes_and_overrides: The keyword arguments of :func:`make_config`.

    Returns:
        The model, in training mode, on CPU.
    """
    seed = _check_seed(seed)
    return model_from_config(make_config(arch, **sizes_and_overrides), seed=seed)


def model_from_config(config: PretrainedConfig, *, seed: int) -> PreTrainedModel:
    """Build a randomly initialised float32 causal LM from a config, determined entirely by ``seed``.

    The weights are drawn from the CPU generator inside :func:`torch.random.fork_rng`, seeded
    with ``seed``: the same config and seed give bit-identical weights on every call, and the
    caller's global RNG state is exactly what it was before the call (CUDA generators are not
    touched at all because nothing is drawn on a GPU). Move the model to a device afterwards.

    Args:
        config: A config made by :func:`make_config`, or the ``model.config`` of a model built
            here (its class must be one of the supported architectures). It is not modified.
        seed: Initialisation seed, an int in ``[0, 2**64 - 1]``.

    Returns:
        The model, in training mode, on CPU.
    """
    seed = _check_seed(seed)
    matches = [model for cfg, model in _REGISTRY.values() if type(config) is cfg]
    if not matches:
        raise InputError(
            f"config is a {type(config).__name__}; only "
            f"{', '.join(cfg.__name__ for cfg, _ in _REGISTRY.values())} can be built here"
        )
    model_cls = matches[0]
    # from_config writes the dtype (and attention choice) back onto the config it is given;
    # work on a copy so the caller's object stays as it was.
    config = copy.deepcopy(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Passing dtype makes from_config create the weights in float32 directly, so nothing
        # is drawn in another precision and then cast.
        model = model_cls._from_config(config, dtype=torch.float32)
    model.train()
    return model


def _check_seed(seed: Any) -> int:
    try:
        return check_int("seed", seed, low=0, high=_MAX_SEED)
    except InputError:
        # check_int would print the upper bound as 1.84467e+19; say it exactly instead.
        raise InputError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}") from None
