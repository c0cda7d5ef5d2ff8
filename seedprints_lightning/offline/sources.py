"""Sources: the paths a user points the command line or the audit at, and how each becomes a fingerprint.

Three kinds of *source*:

* a fingerprint file written by :meth:`Fingerprint.save` (any suffix but ``.ckpt``),
* a ``save_pretrained`` model directory (it has a ``config.json``),
* a Lightning ``.ckpt`` whose model can be rebuilt: it carries the transformers config, either
  under :data:`HF_CONFIG_KEY` with the weights under ``model.*`` (``CausalLMModule`` stores it), or
  in ``SeedPrintsCallback``'s state (:data:`MODEL_STATE_KEY`: any module the callback ran on);
  a LitGPT ``lit_model.pth`` is rebuilt as LitGPT's ``GPT`` (:mod:`.litgpt`).

Models are loaded on CPU (``local_files_only``: nothing is downloaded), cast to the runtime's
``dtype`` (float32 by default, so fingerprints made on different machines agree), moved to its
``device`` only while they are probed, and released afterwards. Lightning checkpoints are read
with ``torch.load(weights_only=True)`` unless ``trust_pickle=True``, always by
:func:`~seedprints_lightning.core.files.load_lightning_checkpoint`. What is done with the fingerprints
(compare, audit) is in :mod:`.audit`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..core.checks import check_int
from ..core.controls import load_config
from ..core.errors import IncompatibleFingerprintsError, InputError, SeedPrintsError, SourceError
from ..core.families import TRANSFORMERS, ModelFamily, families, family_of, family_of_checkpoint
from ..core.files import is_distributed_checkpoint, is_seedprints_state, load_lightning_checkpoint
from ..core.fingerprint import Fingerprint
from ..core.layerwise import empty_model
from ..core.probes import ProbeSpec, find_causal_lm
from ..core.state import (
    HF_CONFIG_KEY,
    HF_TRAINER_STATE_FILE,
    LEGACY_STATE_KEY,
    MODEL_STATE_KEY,
    STEP_STATE_KEY,
    model_rebuild_info,
)
from ..core.verify import ledger_head_of
from .streaming import (
    DistributedCheckpointStore,
    FamilyCheckpointHandle,
    ModelHandle,
    SafetensorsStore,
    StateDictStore,
    WeightStore,
    check_fits,
    why_not_streamed,
)

__all__ = [
    "CHECKPOINT_SUFFIX",
    "HF_CONFIG_KEY",
    "MODEL_STATE_KEY",
    "ProbeRuntime",
    "Source",
    "SourceKind",
    "check_fits",
    "checkpoint_config",
    "checkpoint_ledger_head",
    "checkpoint_state",
    "classify_source",
    "expand_checkpoints",
    "fingerprint_source",
    "load_model",
    "load_source_fingerprint",
    "model_rebuild_info",
    "open_model",
    "read_checkpoint",
    "source_step",
    "spec_for_models",
]

SourceKind = Literal["fingerprint", "model_dir", "checkpoint"]
CHECKPOINT_SUFFIX = ".ckpt"
#: Training checkpoints (``torch.save`` archives): Lightning's ``.ckpt``, and what Fabric and
#: hand-written loops name theirs.
CHECKPOINT_SUFFIXES = (CHECKPOINT_SUFFIX, ".pt", ".pth")
_KIND_WORDS = {"fingerprint": "fingerprint file", "model_dir": "model directory", "checkpoint": "training checkpoint"}


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A path the user named, and what kind of thing it is."""

    path: Path
    kind: SourceKind

    @property
    def name(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"{self.path} ({_KIND_WORDS[self.kind]})"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind}


def classify_source(path: str | Path | Source) -> Source:
    """Tell what ``path`` is; raise :class:`SourceError` (naming it) when it is none of them."""
    if isinstance(path, Source):
        return path
    path = Path(path).expanduser()
    if not path.exists():
        raise SourceError(f"{path} does not exist")
    if path.is_dir():
        if family_of_checkpoint(path) is not None:  # before config.json: OLMo-core's ConfigSaverCallback writes one
            return Source(path, "checkpoint")
        if (path / "config.json").is_file():
            return Source(path, "model_dir")
        if is_distributed_checkpoint(path):
            return Source(path, "checkpoint")
        hint = ""
        if any(path.glob(f"*{CHECKPOINT_SUFFIX}")):
            hint = f"; it holds {CHECKPOINT_SUFFIX} files: name one of them"
        raise SourceError(f"{path} is a directory but not a save_pretrained model directory (no config.json){hint}")
    if path.suffix in CHECKPOINT_SUFFIXES:
        return Source(path, "checkpoint")
    return Source(path, "fingerprint")


def _checkpoint_reader(path: Path, entry: str) -> Any:
    """The ``entry`` function of the family whose checkpoint ``path`` is (:func:`family_of_checkpoint`), or ``None``."""
    family = family_of_checkpoint(path)
    return None if family is None else family.checkpoint.get(entry)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_checkpoint(source: Source, *, trust_pickle: bool = False) -> dict[str, Any] | None:
    """A Lightning checkpoint's dict, memory-mapped (the weights are not read), or ``None`` when unreadable.

    For what a checkpoint says about itself (its step, its callback state); loading its model
    goes through :func:`load_model`, which explains what is wrong with an unreadable file.
    """
    try:
        read_state = _checkpoint_reader(source.path, "read_state")
        if read_state is not None:  # a family's own checkpoint: its trainer state (step, callback states), no weights
            return read_state(source.path, trust_pickle=trust_pickle)
        return load_lightning_checkpoint(source.path, trust_pickle=trust_pickle, error=SourceError, mmap=True)
    except SourceError:
        return None


def seedprints_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The SeedPrints state a training checkpoint holds, whichever loop wrote it, or ``None``.

    Lightning: ``checkpoint["callbacks"][<a SeedPrintsCallback's state_key>]`` (the first one).
    Fabric and hand-written loops: the value saved under any key
    (``fabric.save(path, {"model": model, "seedprints": callback})``).
    """
    callbacks = checkpoint.get("callbacks") or {}
    # The former constant key, or a key derived from the callback's arguments ("SeedPrintsCallback{...}").
    state = callbacks.get(LEGACY_STATE_KEY)
    if isinstance(state, dict):
        return state
    state = next((value for key, value in callbacks.items() if isinstance(key, str)
                  and key.startswith(LEGACY_STATE_KEY + "{") and isinstance(value, dict)), None)
    if state is not None:
        return state
    return next((value for value in checkpoint.values() if is_seedprints_state(value)), None)


def _hf_trainer_state(source: Source) -> dict[str, Any] | None:
    path = source.path / HF_TRAINER_STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: no ledger head, so the audit cannot tell whether records were cut from the end
        return None
    return state if isinstance(state, dict) else None


def checkpoint_state(source: Source, *, trust_pickle: bool = False) -> dict[str, Any] | None:
    """A checkpoint's SeedPrints state (what the custody chain's ``state_dict()`` saved), if it has one.

    A training checkpoint's state (:func:`seedprints_state`, read memory-mapped), or a Hugging
    Face ``Trainer`` checkpoint directory's ``seedprints_state.pt``; ``None`` for anything else.
    """
    if source.kind == "checkpoint":
        state = seedprints_state(read_checkpoint(source, trust_pickle=trust_pickle) or {})
    elif source.kind == "model_dir":
        state = _hf_trainer_state(source)
    else:
        return None
    return state if isinstance(state, dict) else None


def checkpoint_ledger_head(source: Source, *, trust_pickle: bool = False) -> tuple[int, str] | None:
    """``(records, last record's sha256)`` from a checkpoint's SeedPrints state, if it has one."""
    return ledger_head_of(checkpoint_state(source, trust_pickle=trust_pickle))


def source_step(source: Source, *, trust_pickle: bool = False) -> int | None:
    """The training step a source records, if any.

    ``global_step`` of a Lightning checkpoint (read memory-mapped, without loading the
    weights), ``global_step`` of a Hugging Face Trainer's ``trainer_state.json`` next to a
    model directory, or the step stored in a fingerprint file. ``None`` when unknown.
    """
    if source.kind == "checkpoint":
        checkpoint = read_checkpoint(source, trust_pickle=trust_pickle) or {}
        step = checkpoint.get("global_step", (seedprints_state(checkpoint) or {}).get(STEP_STATE_KEY))
    elif source.kind == "model_dir":
        state = _read_json(source.path / "trainer_state.json")
        step = state.get("global_step") if isinstance(state, dict) else None
    else:
        try:
            step = Fingerprint.load(source.path).step
        except SeedPrintsError:
            step = None
    return int(step) if isinstance(step, int) and not isinstance(step, bool) else None


def expand_checkpoints(paths: Iterable[str | Path], *, trust_pickle: bool = False) -> list[tuple[Source, int | None]]:
    """Resolve checkpoint arguments to ``(source, step)`` pairs.

    A file or a model directory stands for itself, in the order given. Any other directory
    expands to the ``.ckpt`` files and ``save_pretrained`` model directories directly inside
    it, sorted by their recorded step (unknown steps last, then by name).
    """
    out: list[tuple[Source, int | None]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir() and not (path / "config.json").is_file() and not is_distributed_checkpoint(path) \
                and family_of_checkpoint(path) is None:
            members = [Source(p, "checkpoint") for p in path.iterdir()
                       if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
            members += [Source(p, "model_dir") for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file()]
            members += [Source(p, "checkpoint") for p in path.iterdir() if is_distributed_checkpoint(p)
                        or family_of_checkpoint(p) is not None]
            if not members:
                raise SourceError(
                    f"{path} is a directory with no config.json and no {CHECKPOINT_SUFFIX} files or model "
                    "directories in it"
                )
            stepped = [(member, source_step(member, trust_pickle=trust_pickle)) for member in members]
            stepped.sort(key=lambda item: (item[1] is None, item[1] if item[1] is not None else 0, item[0].path.name))
            out.extend(stepped)
        else:
            source = classify_source(path)
            out.append((source, source_step(source, trust_pickle=trust_pickle)))
    return out


def weights_of(checkpoint: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The transformers model's weights in a checkpoint: keys under ``prefix``, with it removed.

    A Lightning checkpoint has one ``state_dict``; a Fabric or hand-written one has the model's
    state dict under a key of the user's choosing, so every tensor dict among its values is tried.
    """
    candidates = [checkpoint["state_dict"]] if isinstance(checkpoint.get("state_dict"), dict) else [
        value for value in checkpoint.values()
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())]
    for weights in candidates:
        found = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
        if found:
            return found
    return {}


def checkpoint_config(checkpoint: dict[str, Any], path: Path) -> tuple[Any, str]:
    """``(transformers config, weights prefix)`` of the model a training checkpoint holds, or :class:`SourceError`.

    The config under :data:`HF_CONFIG_KEY` (weights under ``model.``), else the one the SeedPrints
    state records with its prefix (:data:`MODEL_STATE_KEY`). Reads no weights.
    """
    from transformers import AutoConfig

    config_dict, prefix = checkpoint.get(HF_CONFIG_KEY), "model."
    rebuild = (seedprints_state(checkpoint) or {}).get(MODEL_STATE_KEY) or {}
    if not isinstance(config_dict, dict) and isinstance(rebuild, dict):
        if rebuild.get("why_not"):
            raise SourceError(f"{path} cannot be rebuilt into a model: {rebuild['why_not']}")
        config_dict, prefix = rebuild.get("hf_config"), rebuild.get("state_dict_prefix", "model.")
    if not isinstance(config_dict, dict) and isinstance(rebuild, dict) and rebuild.get("litgpt_config"):
        raise SourceError(  # fingerprint_source rebuilds LitGPT checkpoints (offline/litgpt.py); this path cannot
            f"{path} is a LitGPT checkpoint, read only as a fingerprint source here: fingerprint it first "
            f"(seedprints fingerprint {path} -o FILE) and pass FILE")
    if not isinstance(config_dict, dict):
        raise SourceError(
            f"{path} has no '{HF_CONFIG_KEY}' entry, so the model cannot be rebuilt from it: "
            "train with SeedPrintsCallback (its checkpoint state records the model's config), save the checkpoint "
            f"with seedprints_lightning.train.CausalLMModule (or store the config under checkpoint['{HF_CONFIG_KEY}'] "
            "in on_save_checkpoint), or export the model with save_pretrained"
        )
    config_dict = dict(config_dict)
    try:
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    except Exception as exc:
        raise SourceError(f"{path}: its '{HF_CONFIG_KEY}' is not a readable transformers config "
                          f"({type(exc).__name__}: {exc})") from exc
    return config, prefix


def _model_from_checkpoint(path: Path, trust_pickle: bool) -> torch.nn.Module:
    """Rebuild the transformers model of a training checkpoint from its config and weights.

    Needs no training code: the SeedPrints state of every face records the model's config and
    where its weights sit (``CausalLMModule`` also stores the config itself; another
    LightningModule can too, with ``checkpoint["hf_config"] = json.loads(model.config.to_json_string())``
    in ``on_save_checkpoint``).
    """
    from transformers import AutoModelForCausalLM

    checkpoint = load_lightning_checkpoint(path, trust_pickle=trust_pickle, error=SourceError)
    has_config = isinstance(checkpoint.get(HF_CONFIG_KEY), dict) or isinstance(
        ((seedprints_state(checkpoint) or {}).get(MODEL_STATE_KEY) or {}).get("hf_config"), dict)
    rebuild = (seedprints_state(checkpoint) or {}).get(MODEL_STATE_KEY) or {}
    if isinstance(rebuild, dict) and rebuild.get("why_not") and not isinstance(checkpoint.get(HF_CONFIG_KEY), dict):
        raise SourceError(f"{path} cannot be rebuilt into a model: {rebuild['why_not']}")
    prefix = "model."
    if not isinstance(checkpoint.get(HF_CONFIG_KEY), dict) and isinstance(rebuild, dict):
        prefix = rebuild.get("state_dict_prefix", "model.")
    state_dict = weights_of(checkpoint, prefix)
    if not has_config or not state_dict:
        raise SourceError(
            f"{path} has no '{HF_CONFIG_KEY}' entry or no '{prefix}*' weights, so the model cannot be rebuilt from it: "
            "train with SeedPrintsCallback (its checkpoint state records the model's config), save the checkpoint "
            f"with seedprints_lightning.train.CausalLMModule (or store the config under checkpoint['{HF_CONFIG_KEY}'] "
            "in on_save_checkpoint), or export the model with save_pretrained"
        )
    config, prefix = checkpoint_config(checkpoint, path)
    try:
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state_dict, strict=True)
    except Exception as exc:
        raise SourceError(f"{path}: the weights do not match the model its '{HF_CONFIG_KEY}' describes "
                          f"({type(exc).__name__}: {exc})") from exc
    return model


def load_model(
    source: str | Path | Source, *, dtype: torch.dtype = torch.float32, trust_pickle: bool = False
) -> torch.nn.Module:
    """Load the causal LM of a model directory or checkpoint, on CPU, in eval mode."""
    source = classify_source(source)
    if source.kind == "fingerprint":
        raise SourceError(f"{source.path} is a fingerprint file, not a model")
    family = family_of_checkpoint(source.path) if source.kind == "checkpoint" else None
    if family is not None:  # a family's own checkpoint (OLMo-core, torchtitan): rebuilt by the family
        load = family.checkpoint.get("load_model")
        model = None if load is None else load(source.path, dtype=dtype, trust_pickle=trust_pickle)
        if model is None:
            raise SourceError(f"{source.path} is a {family.name} checkpoint, which this installation cannot rebuild "
                              "into a model yet")
        return model
    if source.kind == "checkpoint":
        model = _model_from_checkpoint(source.path, trust_pickle)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(source.path), local_files_only=True, dtype=dtype)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, safetensors errors...
            raise SourceError(
                f"{source.path} could not be loaded as a save_pretrained model ({type(exc).__name__}: {exc})"
            ) from exc
    lm = find_causal_lm(model)
    return lm.to(dtype=dtype).eval()


@dataclass(frozen=True)
class ProbeRuntime:
    """How sources are loaded and probed (not what is probed), shared by every entry point here.

    ``dtype`` is what models are cast to (float32 by default, so fingerprints made on
    different machines agree); ``device`` where each is moved while probed (None: stays on
    CPU); ``trust_pickle`` allows full-pickle ``.ckpt`` files; ``progress`` shows bars. ``load``
    chooses how a model is read (:mod:`.streaming`): ``"whole"`` (loaded, then probed),
    ``"streamed"`` (one block at a time from disk), or ``"auto"`` (whole when it fits the memory).
    """

    batch_size: int = 64
    device: str | torch.device | None = None
    dtype: torch.dtype = torch.float32
    trust_pickle: bool = False
    progress: bool = False
    load: Literal["auto", "whole", "streamed"] = "auto"

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, low=1)
        if self.load not in ("auto", "whole", "streamed"):
            raise InputError(f"load must be 'auto', 'whole' or 'streamed', got {self.load!r}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise InputError(f"dtype must be a floating torch.dtype such as torch.float32, got {self.dtype!r}")


def fingerprint_source(
    source: str | Path | Source,
    spec: ProbeSpec | None = None,
    *,
    step: int | None = None,
    runtime: ProbeRuntime = ProbeRuntime(),
    num_controls: int = 0,
) -> Fingerprint:
    """Fingerprint a model directory or checkpoint (a fingerprint file is just loaded).

    ``num_controls`` fresh inits of the model's config are probed and stored with it. The model is
    read whole or one block at a time as ``runtime.load`` says (:meth:`.streaming.ModelHandle.decide`);
    the fingerprint's ``extra["load"]`` records which path was taken and why.

    With a resolved ``spec`` the model must accept its inputs (vocabulary, width), else
    :class:`IncompatibleFingerprintsError`; an unresolved or missing spec is resolved from
    the model. A fingerprint file is returned as it is: check it with
    :meth:`Fingerprint.check_comparable`.
    """
    source = classify_source(source)
    if source.kind == "fingerprint":
        return Fingerprint.load(source.path)
    if step is None:
        step = source_step(source, trust_pickle=runtime.trust_pickle)
    if source.kind == "checkpoint" and source.path.is_file():
        # A family that recognises its checkpoint files by reading them (LitGPT's lit_model.pth, its Config in the
        # SeedPrints state or model_config.yaml beside it: offline/litgpt.py) fingerprints them; None: not one.
        for family in families():
            fingerprint = family.checkpoint.get("fingerprint")
            fp = None if fingerprint is None else fingerprint(
                source.path, spec, step=step, runtime=runtime, num_controls=num_controls,
                extra={"source": str(source.path)})
            if fp is not None:
                return fp
    handle = open_model(source, runtime)
    return handle.fingerprint(spec, step=step, num_controls=num_controls, extra={"source": str(source.path)})


def load_source_fingerprint(path: str | Path | Source) -> Fingerprint:
    """Load a fingerprint file, with a clear error when the path is a model instead."""
    source = classify_source(path)
    if source.kind != "fingerprint":
        raise SourceError(f"{source.path} is a {_KIND_WORDS[source.kind]}, not a fingerprint file")
    return Fingerprint.load(source.path)


def _family(model: torch.nn.Module) -> ModelFamily:
    """``model``'s family; a model no family finds is asked as a transformers model (whose error names it)."""
    return family_of(model) or TRANSFORMERS


def _model_sizes(model: torch.nn.Module) -> tuple[int, int]:
    return _family(model).sizes(model)


def spec_for_models(
    base: torch.nn.Module,
    target: torch.nn.Module,
    *,
    kind: Literal["token", "embedding"] = "token",
    num_samples: int | None = None,
    length: int | None = None,
    seed: int | None = None,
    vocab_size: int | None = None,
    names: tuple[str, str] = ("A", "B"),
    embed_stats: tuple[float, float] | None = None,
) -> ProbeSpec:
    """The probe both models see (docs/method.md step 1).

    Token probes draw ids from ``[0, V)``, ``V`` the smaller vocabulary of the two (or
    ``vocab_size``, which must fit both). Embedding probes take the mean and std of the
    BASE model's input-embedding matrix (or ``embed_stats``, when ``base`` is a meta-device model)
    and need equal hidden sizes.
    """
    fields: dict[str, Any] = {"kind": kind}
    for key, value in (("num_samples", num_samples), ("length", length), ("seed", seed)):
        if value is not None:
            fields[key] = value
    (vocab_a, hidden_a), (vocab_b, hidden_b) = _model_sizes(base), _model_sizes(target)
    if kind == "token":
        smallest = min(vocab_a, vocab_b)
        if vocab_size is not None and vocab_size > smallest:
            raise IncompatibleFingerprintsError(
                f"--vocab-size {vocab_size} exceeds the smaller vocabulary of the two models ({names[0]}: {vocab_a}, "
                f"{names[1]}: {vocab_b}); use at most {smallest}"
            )
        fields["vocab_size"] = smallest if vocab_size is None else vocab_size
    elif vocab_size is not None:
        raise InputError("--vocab-size applies to token probes only")
    if kind == "embedding" and hidden_a != hidden_b:
        raise IncompatibleFingerprintsError(
            f"embedding probes need one hidden size, but {names[0]} has {hidden_a} and {names[1]} has {hidden_b}; "
            "use token probes (--kind token) across widths"
        )
    if kind == "embedding" and embed_stats is not None:
        fields["embed_mean"], fields["embed_std"] = embed_stats
    return _family(base).resolve_spec(ProbeSpec(**fields), base)


def open_model(source: Any, runtime: Any) -> ModelHandle:
    """A :class:`ModelHandle` of a model directory or training checkpoint, no weights read yet.

    A model family's own checkpoint (:func:`~seedprints_lightning.core.families.family_of_checkpoint`:
    OLMo-core, torchtitan) is opened by its family (its ``open``, else a :class:`FamilyCheckpointHandle`).
    """
    source = classify_source(source)
    if source.kind == "fingerprint":
        raise SourceError(f"{source.path} is a fingerprint file, not a model")
    family = family_of_checkpoint(source.path) if source.kind == "checkpoint" else None
    if family is not None:
        opener = family.checkpoint.get("open")
        return opener(source, runtime) if opener is not None else FamilyCheckpointHandle(source, family, runtime)
    store: WeightStore | None = None
    why_not: str | None = None
    if source.kind == "model_dir":
        try:
            config = load_config(source.path)
        except Exception as exc:
            raise SourceError(f"{source.path} could not be loaded as a save_pretrained model ({exc})") from exc
        meta = empty_model(config)
        prefixes = (f"{meta.base_model_prefix}.",) if getattr(meta, "base_model_prefix", "") else ()
        if (source.path / "model.safetensors").is_file() or (source.path / "model.safetensors.index.json").is_file():
            store = SafetensorsStore(source.path, prefixes)
        else:
            why_not = (f"{source.path} holds no safetensors weights (model.safetensors or "
                       "model.safetensors.index.json); only those are read one block at a time")
    else:
        checkpoint = load_lightning_checkpoint(source.path, trust_pickle=runtime.trust_pickle, error=SourceError,
                                               mmap=True)
        config, prefix = checkpoint_config(checkpoint, source.path)
        meta = empty_model(config)
        if is_distributed_checkpoint(source.path):
            store = DistributedCheckpointStore(source.path, prefix)
        else:
            def remap(path=source.path, trust=runtime.trust_pickle, prefix=prefix) -> dict[str, torch.Tensor]:
                return weights_of(load_lightning_checkpoint(path, trust_pickle=trust, error=SourceError, mmap=True),
                                  prefix)

            store = StateDictStore(weights_of(checkpoint, prefix), f"{source.path}", (), remap=remap)
        del checkpoint
    if why_not is None:
        why_not = why_not_streamed(meta)
    # load_model is looked up when the whole model is asked for (a test may replace it meanwhile).
    return ModelHandle(source=source, config=config, meta=meta, store=store, why_not_streamed=why_not,
                       runtime=runtime, load_whole=lambda: load_model(source, dtype=runtime.dtype,
                                                                      trust_pickle=runtime.trust_pickle))
