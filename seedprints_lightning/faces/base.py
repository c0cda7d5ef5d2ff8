"""``SeedPrintsFace``: the one base under every face, holding the settings, the chain and the probe cycle.

A probe is the same in every loop::

    measure (the face's adapter) -> CustodyChain.observe -> log -> warn the notes -> agree over ranks -> act

and so are the set-up at train start (:func:`~seedprints_lightning.core.opening.open_chain`), the
end of a run (the lock released) and the checkpoint state. What differs between loops is a few
adapters, each a short method a face overrides:

==========================  ==================================================================
``_processes()``            which processes there are (one :class:`Processes` per face)
``_measure(model, spec)``   the live model's ``[n, D]`` features under the loop's strategy
``_run_model_code(m, fn)``  code that needs the model's parameters (resolving the probe spec)
``_forward_context()``      the loop's autocast for control forwards (``None``: none)
``_log(metrics, step)``     where the metrics go
``_warn(message)``          how the writing process warns
``_stop()``                 how the loop is asked to stop
==========================  ==================================================================

The defaults are those of a loop with no trainer: ``torch.distributed`` when it is initialised
(each rank probes its slice), a TensorBoard writer at ``log_dir``, Python warnings, and
:attr:`should_stop`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..core.controls import DEFAULT_NUM_CONTROLS, preserve_rng_state
from ..core.errors import IdentityLostError, IdentityWarning, InputError
from ..core.families import MeasurementPlan
from ..core.fingerprint import Fingerprint
from ..core.ledger import RunDirectory
from ..core.opening import close_chain, open_chain, probe_spec_differs
from ..core.probes import ProbeBatch, ProbeSpec, find_causal_lm_or_none
from ..core.processes import Processes, measure_over_ranks, torch_processes
from ..core.sharded import gathered_input_embedding, holds_dtensors, holds_zero3_params, weights_digest_gathered
from ..core.state import FaceState, model_rebuild_info
from ..core.verdict import (
    CUSTOM_SCALARS_LAYOUT,
    DEFAULT_BIRTH_Z_MARGIN,
    DEFAULT_LINK_TAU_MARGIN,
    DEFAULT_LINK_Z_MARGIN,
    ProbeVerdict,
)
from ..core.weights import weights_digest
from .messages import identity_lost_message, note_message, probe_spec_message, unrecorded_save_message
from .settings import FaceArguments, FaceSettings

__all__ = ["SeedPrintsFace", "act_on_identity_lost", "refuse_unprobeable_sharding", "sharding_of", "write_layout"]


def act_on_identity_lost(action: str, message: str, *, stop: Callable[[], None], warn: Callable[[str], None]) -> None:
    """What every face does when the chain says the identity is lost: raise, stop (``stop()``) and warn, or warn."""
    if action == "raise":
        raise IdentityLostError(message)
    if action == "stop":
        stop()
        message += " Stopping the run (on_identity_lost='stop')."
    warn(message)


#: Strategies (Lightning's and Fabric's, either package name, or a subclass) that shard parameters, by class name.
_SHARDING_STRATEGIES = {"FSDPStrategy": "FSDP1 (FSDPStrategy)", "DeepSpeedStrategy": "DeepSpeed",
                        "ModelParallelStrategy": "FSDP2 (ModelParallelStrategy)"}


def sharding_of(*, strategy: Any = None, model: nn.Module | None = None) -> str | None:
    """The sharding of a Lightning or Fabric ``strategy``, or of a ``model`` wrapped by FSDP1; ``None`` when unsharded.

    Strategies are told by class name along their MRO, so both ``pytorch_lightning`` and
    ``lightning`` classes (and their subclasses) are recognised without importing either.
    """
    if strategy is not None:
        for cls in type(strategy).__mro__:
            if cls.__name__ in _SHARDING_STRATEGIES:
                return _SHARDING_STRATEGIES[cls.__name__]
    if model is not None:
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
        except ImportError:  # pragma: no cover - torch built without distributed
            return None
        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return "FSDP1 (FullyShardedDataParallel)"
    return None


def refuse_unprobeable_sharding(sharding: str | None) -> None:
    """Refuse FSDP1 in a face that probes by calling the model: FSDP1 gathers a unit only in its wrapper's forward.

    FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3 hook the modules themselves, so calling the model
    gathers its shards (a collective, which every rank makes alike).
    """
    if sharding is not None and sharding.startswith("FSDP1"):
        raise InputError(
            f"the model is sharded by {sharding}, whose shards a probe from outside the training step cannot gather: "
            "this face probes by calling the model itself. Shard with FSDP2 (torch.distributed.fsdp.fully_shard, "
            "Lightning's ModelParallelStrategy, accelerate's fsdp_version=2), or train with the Lightning Trainer "
            "and SeedPrintsCallback, which probes through the strategy's root wrapper"
        )


def write_layout(writer: Any, written: set[int]) -> None:
    """Give a TensorBoard ``SummaryWriter`` the custom-scalars layout once (``written`` remembers which writers)."""
    if writer is None or id(writer) in written or not hasattr(writer, "add_custom_scalars"):
        return
    writer.add_custom_scalars(CUSTOM_SCALARS_LAYOUT)
    written.add(id(writer))


def _device_of(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def release_gathered_parameters(model: nn.Module) -> None:
    """Reshard every FSDP2 (``fully_shard``) module of ``model``: the probe leaves memory as it found it.

    FSDP2 reshards a module after its forward, except the root (``reshard_after_forward`` is
    off for it: the backward would gather it again). A probe runs forwards with no backward, so the
    root's unsharded parameters (the embedding, final norm and LM head) would stay allocated until
    the next training backward: at step 0 that held 250 MB per rank on a 200M-parameter LLaMA
    (``benchmarks/step0_memory.py --strategy fsdp2``). Resharding an already sharded module does
    nothing; the next training forward gathers the root again, as it does after every backward.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class SeedPrintsFace:
    """Probe a model's SeedPrints lineage during training; act when its custody breaks.

    The base of every face; its arguments are every face's. They are declared, with their types,
    defaults and checks, once: :class:`~seedprints_lightning.faces.settings.FaceArguments`; this
    signature repeats them for LightningCLI and IDEs, and ``tests/test_face_arguments.py`` holds the
    two, these ``Args:`` and docs/configuration.md to one another. A face adds its loop's hooks and
    adapters (module docstring).

    Args:
        every_n_steps: the longest interval between probes, in optimizer steps (gradient
            accumulation does not multiply probes).
        probe: the :class:`~seedprints_lightning.ProbeSpec`; ``None`` = ``ProbeSpec()``.
            Ignored when ``reference`` is given (a different ``probe`` is an error). On a resume
            the restored chain's spec is used, whatever ``probe`` says: the run's reference and
            every recorded probe were taken with it. A ``probe`` that sets another value is
            warned about once, naming both specs: construct the face with the checkpoint's
            spec to silence it, or start a new run (a new ``save_dir``, from step 0) to probe
            with the new one.
        alpha: significance level of the one-sided lineage tests.
        patience: consecutive failed probes before acting; a held verdict resets the count.
        on_identity_lost: ``"warn"``, ``"stop"`` (the loop is asked to stop, on every rank,
            after reducing the decision) or ``"raise"``
            (:class:`~seedprints_lightning.IdentityLostError` on every rank).
        fail_on: which verdict is the run's identity: ``"custody"`` (the link to the last good
            probe; default), ``"birth"`` (the step-0 test itself must stay detectable) or
            ``"either"`` (both must hold).
        num_controls: fresh-init negative controls; 0 turns them off (the verdicts then use
            the analytic threshold and the effect-size margin alone).
        birth_z_margin: z over the largest control z that the birth test must clear.
        link_z_margin, link_tau_margin: what a custody link must clear over the controls, in
            z and in ``tau_mean`` (effect size). See :mod:`seedprints_lightning.core.verdict`.
        adaptive_schedule: dense probes at the start and closer probes when a link weakens
            (:class:`~seedprints_lightning.core.schedule.ProbeSchedule`); ``False`` probes every
            ``every_n_steps`` only (custody then needs a gentle learning rate: docs/benchmarks.md).
        reference: a parent's :class:`~seedprints_lightning.Fingerprint`, its file path, or the
            parent run's ``seedprints`` directory: then the birth test uses the parent's step-0
            reference and the custody chain continues from the parent's last held probe (its
            ledger is re-verified first), as continued training needs.
        feature_fn: ``feature_fn(module, batch: ProbeBatch) -> [b, D]`` for models that are not
            ``transformers`` PreTrainedModels.
        control_factory: ``control_factory(seed) -> nn.Module``: a fresh init of the model with
            that seed, for controls of models the face cannot rebuild itself (needed with
            ``feature_fn`` and ``num_controls > 0``).
        controls: a controls file precomputed with ``seedprints controls``: loaded instead of
            building the controls inside the run. It must match the run's probe spec and, when it
            records one, the model's config digest; its control count replaces ``num_controls``.
        save_dir: the run's ``seedprints`` directory (checked now: not a file, writable); the
            default depends on the face.
        probe_batch_size: probe samples per forward: the probe's activation memory is one batch.
        identity_ratio, identity_mode: identity dimensions of the birth test (links always use
            ``"coset"``): see :func:`~seedprints_lightning.lineage_test`.
        count_undetermined: an undetermined probe (the lineage could not be measured: NaN or
            constant hidden states of a diverged run, or of a swapped-in degenerate model)
            counts towards ``patience`` like a failed one, so a model the chain cannot measure
            is acted on rather than vouched for. ``False`` only reports it (once).
        signing_key: a PEM Ed25519 private key file (default: ``$SEEDPRINTS_SIGNING_KEY``): every
            ledger record is signed with it (the ``[sign]`` extra). Checked now; the key is read
            again when the ledger opens and is never logged, kept in a checkpoint or copied.
        log_dir: a TensorBoard directory for the metrics (rank 0), for faces whose loop has no
            logger of its own; the Lightning face logs through the Trainer's loggers instead.
        bind_saves: record a save in the ledger at each checkpoint save, with the digest of the
            weights it holds (``seedprints audit --chain RUN CKPT`` then names the save). The
            writing process hashes the whole unsharded model each time; ``False`` records no save
            (checkpoints are still audited by lineage). FSDP-sharded weights are never bound;
            DeepSpeed ZeRO-3 weights are, hashed one gathered tensor at a time on every rank. A save
            record that cannot be written (a read-only or full run directory) never stops the
            save: the face warns and lists the save in its state's ``unrecorded_saves``.

    Attributes:
        arguments: the :class:`~seedprints_lightning.faces.settings.FaceArguments` given, checked.
        settings: the :class:`~seedprints_lightning.faces.settings.FaceSettings` they resolve to.
        chain: the :class:`~seedprints_lightning.core.chain.CustodyChain` (reference, controls,
            anchor, schedule position, failure count, ledger); its state is this face's.
        history: one plain dict per probe (``step``, ``event``, the logged metrics under short
            names, ``related``, ``birth_detectable``, ``anchor_step``, ``control_z``,
            ``reason``, ``record_index``, ``consecutive_failures``, ``next_step``).
        last_verdict: the latest :class:`~seedprints_lightning.core.verdict.ProbeVerdict`.
        reference, reference_source (``"explicit"``, ``"checkpoint"`` or ``"step0"``).
        should_stop: set on every rank when the identity is lost with ``on_identity_lost="stop"``.
        unrecorded_saves: the saves whose ledger record could not be written (``step``,
            ``checkpoint``, ``weights_sha256``, ``error``); kept in the checkpoint state.
    """

    #: What a resumed run without a restored state is missing, for the error that says so.
    missing_state = "SeedPrints state"

    def __init__(
        self,
        every_n_steps: int = 1000,
        probe: ProbeSpec | None = None,
        alpha: float = 0.01,
        patience: int = 2,
        on_identity_lost: Literal["warn", "stop", "raise"] = "warn",
        fail_on: Literal["custody", "birth", "either"] = "custody",
        num_controls: int = DEFAULT_NUM_CONTROLS,
        birth_z_margin: float = DEFAULT_BIRTH_Z_MARGIN,
        link_z_margin: float = DEFAULT_LINK_Z_MARGIN,
        link_tau_margin: float = DEFAULT_LINK_TAU_MARGIN,
        adaptive_schedule: bool = True,
        reference: Fingerprint | str | os.PathLike | None = None,
        feature_fn: Callable[[nn.Module, ProbeBatch], torch.Tensor] | None = None,
        control_factory: Callable[[int], nn.Module] | None = None,
        controls: str | os.PathLike | None = None,
        save_dir: str | os.PathLike | None = None,
        probe_batch_size: int = 64,
        identity_ratio: float | None = None,
        identity_mode: Literal["coset", "base"] = "coset",
        count_undetermined: bool = True,
        signing_key: str | os.PathLike | None = None,
        log_dir: str | os.PathLike | None = None,
        bind_saves: bool = True,
    ) -> None:
        # First statement: locals() are exactly the parameters above (and self), so they are not listed a third time.
        self.arguments = FaceArguments.from_call(locals())
        self.settings = FaceSettings.from_arguments(self.arguments)
        self.chain = self.settings.new_chain()
        self.save_dir: Path | None = self.settings.save_dir
        self.log_dir: Path | None = self.settings.log_dir
        self.should_stop = False
        self.started = False
        self.current_step: int | None = None
        self._model_rebuild: dict[str, Any] = {}
        #: How the model is measured (decided when the chain opens; ``None`` before).
        self.measurement: MeasurementPlan | None = None
        self._process_group: Processes | None = None
        self._writer: Any = None
        self._layouts: set[int] = set()
        #: The (asked, used) probe specs already warned about: a resume's spec warning is given once.
        self._spec_warned: tuple[ProbeSpec | None, ProbeSpec] | None = None
        #: Saves whose ledger record could not be written (kept in the state: UNRECORDED_SAVES_KEY).
        self.unrecorded_saves: list[dict[str, Any]] = []
        self._check_arguments()

    def _check_arguments(self) -> None:
        """A face refuses here the arguments its loop cannot honour (the base takes them all)."""

    # ------------------------------------------------------------------ the chain's figures, read-only
    @property
    def history(self) -> list[dict[str, Any]]:
        return self.chain.history

    @property
    def reference(self) -> Fingerprint | None:
        return self.chain.reference

    @property
    def reference_source(self) -> str | None:
        return self.chain.reference_source

    @property
    def last_verdict(self) -> ProbeVerdict | None:
        return self.chain.last_verdict

    # ------------------------------------------------------------------ the cycle
    def _open(self, model: nn.Module, step: int, run: RunDirectory | None, origin: str) -> ProbeVerdict | None:
        """Open the chain at ``step`` (reference, files, controls, ledger); the first link's verdict, if any.

        At step 0 without a restored state the model's features become the reference; with a
        restored state (a resume) or a parent's ``reference=``, the loaded weights are probed
        and linked to the chain at once, so resuming the wrong weights fails here.
        """
        lm = self.settings.check_model(model, self.reference.spec if self.reference is not None else None,
                                       face=type(self).__name__)
        self._warn_other_spec(origin)
        processes = self._processes()
        self.measurement = self.settings.plan(model, strategy_wrapper=self._forwards_in_wrapper())
        if processes.is_writer:  # once per run, when the chain opens: how the model is measured, and why
            print(f"[seedprints] {self.measurement.line()}", flush=True)
        fresh = open_chain(
            self.chain, step=step, run=run, processes=processes,
            take_reference=lambda: self._take_reference(model, step),
            controls=self.settings.controls_source(model, device=_device_of(model), is_writer=processes.is_writer,
                                                   context=self._forward_context()),
            origin=origin, warn=self._warn, missing_state=self.missing_state,
            signer=self.settings.signer() if run is not None and processes.is_writer else None)
        self._model_rebuild = model_rebuild_info(model, lm, feature_fn=self.settings.feature_fn is not None)
        self.started, self.current_step = True, step
        self._log_layout()  # the Custom Scalars layout goes in before the first point
        if fresh:
            return None
        return self._probe(model, step, "resume" if self.chain.restored else "train_start")

    def _warn_other_spec(self, origin: str) -> None:
        """Warn once when this face asks for another probe spec than its restored chain's; the chain's is used.

        One rule for every face: the chain's spec wins. The run's reference and every recorded probe
        were taken with it, so probing on other inputs would end the run's comparability. A
        ``reference=`` given explicitly was already checked against ``probe`` at construction.
        """
        ref = self.reference
        if ref is None or self.reference_source == "explicit":
            return
        asked = self.settings.probe
        if not probe_spec_differs(asked, ref.spec) or self._spec_warned == (asked, ref.spec):
            return
        self._spec_warned = (asked, ref.spec)
        self._warn(probe_spec_message(type(self).__name__, asked, ref.spec, origin))

    def _probe(self, model: nn.Module, step: int, event: str) -> ProbeVerdict:
        start = time.perf_counter()
        features = self._measure_and_release(model, self.chain.reference.spec)
        observed = self.chain.observe(step, features, event, measure_seconds=time.perf_counter() - start)
        self.current_step = step
        self._log(observed.metrics, step)
        for note in observed.notes:
            self._warn(note_message(note))
        # Every rank judged the same features; the reduction makes sure no rank acts alone.
        if self._processes().any_rank(observed.identity_lost):
            act_on_identity_lost(self.settings.on_identity_lost, identity_lost_message(self.chain, observed.verdict),
                                 stop=self._stop, warn=self._warn)
        return observed.verdict

    def _end(self, model: nn.Module | None, step: int | None) -> ProbeVerdict | None:
        """Probe the final weights unless ``step`` was just probed, then :meth:`_close` (also on an error)."""
        try:
            if (self.started and model is not None and step is not None and self.reference is not None
                    and self.chain.last_probed_step != step):
                return self._probe(model, step, "train_end")
            return None
        finally:
            self._close()

    def _close(self) -> None:
        """The run ended: release the run directory's lock and close this face's own writer."""
        close_chain(self.chain)
        self.started = False  # a later fit or start() opens the chain again, and may load a state first
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _take_reference(self, model: nn.Module, step: int) -> Fingerprint:
        spec = self.settings.probe or ProbeSpec()
        if not spec.is_resolved:
            unresolved = spec
            spec = self._run_model_code(model, lambda: self.settings.resolve_spec(unresolved, model))
        spec = self._processes().broadcast(spec)
        return Fingerprint(features=self._measure_and_release(model, spec), spec=spec, step=step,
                           extra={"source": f"{type(self).__name__} step-0 reference"},
                           **self.settings.model_identity(model))

    def _bind_save(self, model: nn.Module | None, step: int, checkpoint: str | None = None) -> int | None:
        """Bind the checkpoint being saved: a ledger record of the digest of the weights it holds.

        ``seedprints audit --chain RUN CKPT`` then says whether CKPT holds exactly the weights of
        a recorded save. The digest is of the transformers model's ``state_dict()`` (the weights
        as a checkpoint holds them), computed by the writing process only; every process numbers
        the record alike. Weights a face's strategy shards (``_shards_weights``: FSDP1, and FSDP2 under
        the Lightning, HF and Fabric faces) are not bound: the lineage test still audits those
        checkpoints. DeepSpeed ZeRO-3 weights, and DTensor weights where the face binds them
        (torchtitan), are: each tensor is gathered alone on every rank (a collective: every rank must
        save, as ``engine.save_checkpoint`` and ``dcp.save`` require) and hashed by the writer.
        """
        if not self.settings.bind_saves or not self.started or model is None or not self.chain.cursor.numbered \
                or self._shards_weights(model):
            return None
        lm = self._bound_weights(model)
        if lm is None:  # a feature_fn model: the audit cannot rebuild it, so there is nothing to compare
            return None
        writer = self._processes().is_writer
        if holds_zero3_params(lm) or holds_dtensors(lm):  # sharded: hash the gathered tensors, one at a time
            digest = weights_digest_gathered(lm, writer=writer)
        else:
            digest = weights_digest(lm.state_dict()) if writer else ""
        try:
            return self.chain.record_save(int(step), digest, checkpoint=checkpoint)
        except (OSError, InputError) as exc:
            # The ledger could not take the record (a read-only or full directory, its lock taken by another
            # writer): the user's save must go on. Only the writer writes, so only it gets here; its cursor did
            # not move (the record was not chained). The other processes numbered the record (no collective
            # here: a save hook may run on the writer alone) until the chain opens again.
            if not writer:
                raise
            self.unrecorded_saves.append({"step": int(step), "checkpoint": checkpoint, "weights_sha256": digest,
                                          "error": f"{type(exc).__name__}: {exc}"})
            self._warn(unrecorded_save_message(int(step), self.save_dir, exc))
            return None

    def _bound_weights(self, model: nn.Module) -> nn.Module | None:
        """The module whose ``state_dict()`` a save record hashes (``None``: a model the audit cannot rebuild).

        A transformers causal LM here; a face for another model family returns that family's model.
        """
        return find_causal_lm_or_none(model)

    def _shards_weights(self, model: nn.Module) -> bool:
        """True when the weights are sharded over ranks (FSDP1, or FSDP2's DTensor parameters)."""
        return sharding_of(model=model) is not None or holds_dtensors(model)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The chain's state, the step it stands at, and how to rebuild the model (for audits of the checkpoint).

        CPU tensors and plain types only: it loads with ``torch.load(weights_only=True)``.
        """
        return FaceState(self.chain.state(), self.current_step, dict(self._model_rebuild),
                         [dict(save) for save in self.unrecorded_saves]).to_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (any version's: :meth:`~seedprints_lightning.core.state.FaceState.from_dict`)."""
        if self.started:
            raise InputError(f"{type(self).__name__}.load_state_dict() after the chain opened: restore the state "
                             "before start() (before the first optimizer step)")
        restored = FaceState.from_dict(state_dict)
        self.chain.load_state_dict(restored.chain)
        self.current_step = restored.step
        self.unrecorded_saves = restored.unrecorded_saves

    # ------------------------------------------------------------------ a loop's adapters (module docstring)
    def _processes(self) -> Processes:
        if self._process_group is None:
            self._process_group = torch_processes()
        return self._process_group

    def _measure_and_release(self, model: nn.Module, spec: ProbeSpec) -> torch.Tensor:
        """:meth:`_measure`, then free what FSDP2 gathered for the probe (:func:`release_gathered_parameters`)."""
        try:
            return self._measure(model, spec)
        finally:
            release_gathered_parameters(model)

    def _measure(self, model: nn.Module, spec: ProbeSpec) -> torch.Tensor:
        with preserve_rng_state():
            return measure_over_ranks(spec, lambda padded, sample_range: self.settings.features_of(
                model, padded, sample_range))

    def _forwards_in_wrapper(self) -> bool:
        """Whether the probe's forwards run inside a sharding strategy's root wrapper (the Lightning face's FSDP1)."""
        return False

    def _run_model_code(self, model: nn.Module, fn: Callable[[], Any]) -> Any:
        # Under ZeRO-3 the embedding's local tensor is empty: an embedding probe's mean and std read it gathered.
        with preserve_rng_state(), gathered_input_embedding(model):
            return fn()

    def _forward_context(self) -> Callable[[], Any] | None:
        return None

    def _log(self, metrics: dict[str, float], step: int) -> None:
        writer = self._own_writer()
        if writer is not None:
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
            writer.flush()

    def _log_layout(self) -> None:
        self._own_writer()

    def _warn(self, message: str) -> None:
        if self._processes().is_writer:
            warnings.warn(message, IdentityWarning, stacklevel=3)

    def _stop(self) -> None:
        self.should_stop = True

    def _own_writer(self) -> Any:
        """This face's TensorBoard writer at ``log_dir`` (the writing process only), or ``None``."""
        if self.log_dir is None or not self._processes().is_writer:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
            write_layout(self._writer, self._layouts)
        return self._writer
