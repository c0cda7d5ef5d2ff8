"""The face arguments are declared once (``FaceArguments``) and cannot drift from what repeats them.

``SeedPrintsFace.__init__`` keeps an explicit signature (LightningCLI and IDEs read it), its
docstring documents each argument under ``Args:``, and docs/configuration.md tabulates them: each
is held here to ``FaceArguments``' fields (names, order, defaults, annotations). The face builds
its ``FaceArguments`` from its own call, and the checks raise the messages they always did.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import numpy as np
import pytest
from test_docs import _configuration_rows, _literal

from seedprints_lightning import InputError, ProbeSpec
from seedprints_lightning.faces.base import SeedPrintsFace
from seedprints_lightning.faces.settings import FaceArguments, FaceSettings

FIELDS = dataclasses.fields(FaceArguments)
PARAMETERS = [p for name, p in inspect.signature(SeedPrintsFace.__init__).parameters.items() if name != "self"]


def _args_section_names() -> list[str]:
    """The argument names of ``SeedPrintsFace``'s ``Args:`` section, in order (``a, b:`` documents two)."""
    doc = inspect.getdoc(SeedPrintsFace)
    section = doc.split("\nArgs:\n", 1)[1].split("\n\n", 1)[0]
    names: list[str] = []
    for line in section.splitlines():
        match = re.match(r"^    (\w+(?:, \w+)*):", line)  # an entry; its continuation lines are indented further
        if match:
            names.extend(match.group(1).split(", "))
    return names


def test_the_signature_repeats_the_dataclass_names_order_defaults_and_annotations():
    assert [p.name for p in PARAMETERS] == [f.name for f in FIELDS]
    for parameter, field in zip(PARAMETERS, FIELDS):
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, parameter.name
        assert parameter.default == field.default and type(parameter.default) is type(field.default), (
            f"{field.name}: the signature's default {parameter.default!r}, the dataclass's {field.default!r}")
        # Both modules postpone annotations: the strings are what IDEs and LightningCLI resolve.
        assert " ".join(str(parameter.annotation).split()) == " ".join(str(field.type).split()), field.name


def test_the_docstring_documents_every_argument_in_order():
    assert _args_section_names() == [f.name for f in FIELDS]


def test_the_docs_table_lists_the_dataclass_fields_in_order_with_their_defaults():
    rows = _configuration_rows()
    assert [argument.strip("`") for argument, _ in rows] == [f.name for f in FIELDS]
    for (argument, default), field in zip(rows, FIELDS):
        assert _literal(default) == field.default and type(_literal(default)) is type(field.default), argument


def test_the_face_builds_its_arguments_from_its_own_call(tmp_path):
    assert SeedPrintsFace().arguments == FaceArguments()
    given = dict(every_n_steps=np.int64(7), probe=ProbeSpec(num_samples=16, length=4), alpha=0.05, patience=3,
                 on_identity_lost="stop", num_controls=0, save_dir=tmp_path / "run", bind_saves=False)
    face = SeedPrintsFace(**given)
    assert face.arguments == FaceArguments(**given)
    assert type(face.arguments.every_n_steps) is int  # a numpy integer is stored as a Python int
    assert isinstance(face.settings, FaceSettings) and face.settings.every_n_steps == 7
    assert face.settings.save_dir == tmp_path / "run" and face.settings.rules.birth_rule.alpha == 0.05


def test_a_signature_that_lost_a_field_is_caught_when_the_arguments_are_built():
    frame = {f.name: f.default for f in FIELDS if f.name != "bind_saves"}
    with pytest.raises(KeyError, match="bind_saves"):
        FaceArguments.from_call(frame)


@pytest.mark.parametrize("kwargs, says", [
    ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1 (optimizer steps between probes), got 0"),
    ({"every_n_steps": True}, "every_n_steps must be an integer >= 1"),
    ({"alpha": 1.5}, "alpha must be a number in (0, 1) (e.g. 0.01), got 1.5"),
    ({"on_identity_lost": "panic"}, "on_identity_lost must be one of 'warn', 'stop', 'raise', got 'panic'"),
    ({"num_controls": 65}, "num_controls must be an integer in [0, 64] (0 turns controls off), got 65"),
    ({"link_tau_margin": -1.0}, "link_tau_margin must be"),
    ({"feature_fn": lambda m, b: m}, "num_controls > 0 with a feature_fn needs control_factory"),
    ({"save_dir": 3}, "save_dir must be a path (str or os.PathLike) or None, got int"),
    ({"reference": 3}, "reference must be a Fingerprint, a path to a fingerprint file, or None, got int"),
    ({"log_dir": 3.0}, "log_dir must be a path (str or os.PathLike) or None, got float"),
])
def test_the_dataclass_and_the_face_refuse_alike(kwargs, says):
    with pytest.raises(InputError) as from_dataclass:
        FaceArguments(**kwargs)
    with pytest.raises(InputError) as from_face:
        SeedPrintsFace(**kwargs)
    assert says in str(from_dataclass.value) and str(from_face.value) == str(from_dataclass.value)


def test_settings_are_resolved_once_and_a_family_may_replace_its_measurement():
    settings = FaceSettings.from_arguments(FaceArguments(num_controls=2))
    assert FaceSettings.from_arguments(num_controls=2) == settings  # keyword arguments, as before
    replaced = dataclasses.replace(settings, feature_fn=lambda module, batch: module, num_controls=2)
    assert replaced.control_factory is None  # not checked again: a family replaces probe, feature_fn and factory
    with pytest.raises(InputError, match="not both"):
        FaceSettings.from_arguments(FaceArguments(), num_controls=2)
