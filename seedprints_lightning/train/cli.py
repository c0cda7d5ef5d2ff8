"""``seedprints-train``: a LightningCLI over :class:`CausalLMModule` and :class:`TextDataModule`.

Usage::

    seedprints-train fit --config configs/demo.yaml
    seedprints-train fit --config configs/demo.yaml --trainer.max_steps=50 --print_config
    seedprints-train fit --config configs/demo.yaml \\
        --trainer.callbacks+=seedprints_lightning.SeedPrintsCallback --trainer.callbacks.every_n_steps=50

Every argument of :class:`~seedprints_lightning.SeedPrintsCallback` is settable from YAML
(``trainer.callbacks: [{class_path: seedprints_lightning.SeedPrintsCallback, init_args: {...}}]``)
and from the command line (``--trainer.callbacks.<arg>=...`` sets the LAST callback of the
list). ``probe:`` takes a mapping of :class:`~seedprints_lightning.ProbeSpec` fields, or the
``{class_path: seedprints_lightning.ProbeSpec, init_args: {...}}`` form; ``reference:`` takes
the path of a fingerprint file.

Additions to the stock LightningCLI:

* ``data.vocab_size`` is linked to ``model.vocab_size`` (set the vocabulary once, on the
  model; the data module checks every token id against it).
* ``--init_from PATH``: start from the WEIGHTS of a ``CausalLMModule`` checkpoint (a parent
  run) with a fresh optimizer, schedule and step counter: continued pretraining. This differs
  from ``--ckpt_path``, which resumes the same run (optimizer, step, callback state).
* Configs are saved next to the logs with ``overwrite=True``, so re-running a config into
  the same log directory does not fail.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from ..core.errors import FingerprintFileError, InputError, SeedPrintsError
from .data import TextDataModule
from .module import CausalLMModule, load_causal_lm_from_checkpoint

__all__ = ["SeedPrintsTrainCLI", "main", "make_cli"]


class SeedPrintsTrainCLI(LightningCLI):
    """LightningCLI with the vocabulary link and ``--init_from`` (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One vocabulary for both: a data module accepting ids the model's embedding table
        # lacks would fail with an index error deep inside the first forward pass.
        parser.link_arguments("model.vocab_size", "data.vocab_size")
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help=(
                "Path of a CausalLMModule checkpoint (.ckpt) whose model weights initialise this run "
                "(continued pretraining from a parent): fresh optimizer and step 0. The model sizes must "
                "match the parent's. Use --ckpt_path instead to resume the same run."
            ),
        )

    def before_instantiate_classes(self) -> None:
        # Fingerprint.load would fail inside jsonargparse's instantiation, whose report buries
        # the one useful line under two tracebacks; check reference paths up front instead.
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        callbacks = config.get("trainer.callbacks") if config is not None else None
        for entry in callbacks or []:
            class_path = str(getattr(entry, "class_path", "") or "")
            init_args = getattr(entry, "init_args", None)
            reference = init_args.get("reference") if init_args is not None else None
            if class_path.endswith("SeedPrintsCallback") and isinstance(reference, str):
                path = Path(reference).expanduser()
                if not (path.is_file() or (path / "reference.safetensors").is_file()):
                    raise FingerprintFileError(
                        f"SeedPrintsCallback reference={reference!r} does not exist: point it at the parent run's "
                        "<save_dir> (its seedprints directory, to continue its custody chain) or a fingerprint file "
                        "(train the parent first, e.g. seedprints-train fit --config configs/demo.yaml), or leave "
                        "reference unset to take this run's own step-0 reference"
                    )

    # LightningCLI calls before_<subcommand>; weights are loaded for every subcommand so that
    # `validate --init_from parent.ckpt` evaluates the parent's weights too.
    def instantiate_classes(self) -> None:
        # Every subcommand (fit, validate, test, predict) starts from --init_from's weights,
        # loaded once the model exists and before the subcommand runs.
        super().instantiate_classes()
        self._init_weights()

    def _init_weights(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        path = config.get("init_from") if config is not None else None
        if path:
            init_model_from_checkpoint(self.model, path)


def init_model_from_checkpoint(module: CausalLMModule, path: str | Path) -> None:
    """Copy the model weights of a ``CausalLMModule`` checkpoint into ``module`` (in place).

    The parameters are updated in place, so an optimizer built afterwards (or before) sees
    them. Raises :class:`InputError` when the file is not such a checkpoint or its model has
    other sizes than ``module``'s.
    """
    if not isinstance(module, CausalLMModule):
        raise InputError(f"--init_from needs a CausalLMModule model, got {type(module).__name__}")
    try:
        parent = load_causal_lm_from_checkpoint(path)
    except InputError as err:
        if "trust_pickle" in str(err):
            raise InputError(
                f"{err} (--init_from reads checkpoints with weights_only=True; load the weights in Python with "
                "load_causal_lm_from_checkpoint(path, trust_pickle=True) if you trust the file)"
            ) from err
        raise
    try:
        with torch.no_grad():
            module.model.load_state_dict(parent.state_dict(), strict=True)
    except RuntimeError as err:
        raise InputError(
            f"--init_from {path}: the parent's model does not fit this run's model (set the same arch and sizes "
            f"as the parent): {err}"
        ) from err


def make_cli(args: list[str] | dict[str, Any] | None = None, *, run: bool = True, **kwargs: Any) -> SeedPrintsTrainCLI:
    """Build (and with ``run=True`` run) the CLI; ``args=None`` reads ``sys.argv``.

    ``run=False`` parses and instantiates without a subcommand (pass ``args=["--config", path]``),
    which is how tests inspect the trainer, model and callbacks a config produces.
    """
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    with warnings.catch_warnings():
        # Lightning warns when ``args`` is given while sys.argv has arguments too (pytest's,
        # for one); ``args`` is then what counts, which is what a caller passing it wants.
        warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
        return SeedPrintsTrainCLI(
            CausalLMModule,
            TextDataModule,
            args=args,
            run=run,
            **kwargs,
        )


def main(args: list[str] | None = None) -> None:
    """Console entry point ``seedprints-train``; returns ``None`` (exit status 0) when the run ends.

    Errors from this package (bad sizes, missing data, a lost identity with
    ``on_identity_lost="raise"``) are printed as one line and exit with status 2.
    """
    try:
        make_cli(args)
    except SeedPrintsError as err:
        print(f"seedprints-train: error: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
