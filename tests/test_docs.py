"""The docs cannot drift from the code: links resolve, and the tables made from one definition match it.

- every relative link of README.md, CHANGELOG.md and docs/*.md names a file that exists and, with
  a ``#fragment``, a heading of it (GitHub's anchors);
- docs/configuration.md's argument table lists exactly ``SeedPrintsFace.__init__``'s parameters,
  in order, with its defaults;
- docs/cli.md's exit-code table is :func:`~seedprints_lightning.offline.exit_codes.markdown_table`,
  and ``--help`` prints every code;
- the README stays one page.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from seedprints_lightning.offline.exit_codes import ExitCode, epilog, markdown_table

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _without_code(text: str) -> str:
    """The page without its fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def _anchors(page: Path) -> set[str]:
    """GitHub's anchor for every heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces as ``-``."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M),
                              flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:  # a repeated heading gets -1, -2, ...
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def _links(page: Path) -> list[str]:
    return [target for target in LINK.findall(_without_code(page.read_text()))
            if not re.match(r"[a-z]+:", target)]  # https:, mailto: are not checked (no network in tests)


def test_the_link_checker_reads_anchors_and_skips_code(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# What `on_identity_lost` does\n## Lightning `Trainer`\n## A, b: c?\n## A, b: c?\n"
                    "[x](other.md#y) `[no](link.md)`\n```\n[no](link2.md)\n# not a heading\n```\n")
    assert _anchors(page) == {"what-on_identity_lost-does", "lightning-trainer", "a-b-c", "a-b-c-1"}
    assert _links(page) == ["other.md#y"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_link_resolves(page):
    broken = []
    for target in _links(page):
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif fragment and linked.suffix == ".md" and fragment not in _anchors(linked):
            broken.append(f"{target}: {linked.name} has no heading #{fragment}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_and_every_docs_page_are_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(ROOT / "README.md")}
    for page in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "CHANGELOG.md", ROOT / "LICENSE"]:
        assert page.resolve() in linked, f"the README does not link {page.relative_to(ROOT)}"


def test_readme_fits_on_a_page_and_carries_no_version_notes():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert not re.search(r"\b(before|since|until|from) \d+\.\d+\b", text), "version notes go to CHANGELOG.md"


# ---------------------------------------------------------------------- configuration, from the signature
def _configuration_rows() -> list[tuple[str, str]]:
    """``(argument, default cell)`` of the face-argument table of docs/configuration.md, in order."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text.split("## Face arguments", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [tuple(cell.strip() for cell in row.strip("|").split("|")[:2]) for row in rows]


def _literal(cell: str) -> object:
    """The first backticked value of a default cell, as Python (``"warn"`` -> 'warn', ``None`` -> None)."""
    match = re.match(r"`([^`]+)`", cell)
    assert match, f"a default cell must start with the Python value in backticks, got {cell!r}"
    return ast.literal_eval(match.group(1))


def test_configuration_table_lists_exactly_the_face_arguments_with_their_defaults():
    from seedprints_lightning.faces.base import SeedPrintsFace

    parameters = [p for name, p in inspect.signature(SeedPrintsFace.__init__).parameters.items() if name != "self"]
    rows = _configuration_rows()
    documented = [argument.strip("`") for argument, _ in rows]
    assert documented == [p.name for p in parameters], (
        "docs/configuration.md's table and SeedPrintsFace.__init__ differ: add, remove or reorder rows")
    for (argument, default), parameter in zip(rows, parameters):
        assert _literal(default) == parameter.default, f"{argument}: the docs say {default}, " \
                                                       f"the signature {parameter.default!r}"
        assert type(_literal(default)) is type(parameter.default), f"{argument}: {default} vs {parameter.default!r}"


def test_probe_spec_table_lists_the_spec_fields():
    from dataclasses import fields

    from seedprints_lightning import ProbeSpec

    text = (ROOT / "docs" / "configuration.md").read_text().split("## `ProbeSpec`", 1)[1].split("\n## ", 1)[0]
    documented = {name for row in text.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert documented == {field.name for field in fields(ProbeSpec)}


# ---------------------------------------------------------------------- exit codes, from the one definition
def test_cli_docs_exit_code_table_is_made_from_the_definition():
    text = (ROOT / "docs" / "cli.md").read_text()
    table = re.search(r"<!-- exit-codes:begin -->\n(.*?)<!-- exit-codes:end -->", text, flags=re.S)
    assert table, "docs/cli.md lost its exit-codes markers"
    assert table.group(1) == markdown_table(), (
        "docs/cli.md's exit codes are out of date: paste `python -m seedprints_lightning.offline.exit_codes` "
        "between its exit-codes markers")


def test_help_prints_every_exit_code(capsys):
    from seedprints_lightning.offline.cli import main

    for argv in (["--help"], ["audit", "--help"], ["identify", "--help"]):
        assert main(argv) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert " ".join(epilog().split()) in out
        for code in ExitCode:
            assert re.search(rf"(^| ){code.value} ", out), f"{argv}: no exit code {code.value}"


def test_every_exit_code_name_is_the_definitions():
    import seedprints_lightning._entry as entry
    from seedprints_lightning.offline import cli

    named = {name.removeprefix("EXIT_"): getattr(cli, name) for name in cli.__all__ if name.startswith("EXIT_")}
    assert named == {code.name: code.value for code in ExitCode}
    assert entry.EXIT_INTERRUPTED == ExitCode.INTERRUPTED
    assert all(code.meaning.strip() for code in ExitCode)
    assert len({code.value for code in ExitCode}) == len(ExitCode)  # no alias hides a code


def test_every_exit_code_the_docs_name_is_defined():
    defined = {code.value for code in ExitCode}
    for page in PAGES:
        text = page.read_text()
        named = {int(n) for n in re.findall(r"\bexits? (\d+)\b", text)}
        named |= {int(n) for n in re.findall(r"\bExit (\d+):", text)}
        assert named <= defined, f"{page.name} names exit codes {sorted(named - defined)} that ExitCode lacks"


# ---------------------------------------------------------------------- what the package ships
def test_the_license_and_the_type_marker_are_there_and_shipped():
    """The wheel and the sdist themselves are built and checked by `.ci/run package` (twine, a fresh venv)."""
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a notice
    assert (ROOT / "seedprints_lightning" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', pyproject, flags=re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, flags=re.M)
    assert re.search(r'^seedprints_lightning = \[.*"py\.typed".*\]$', pyproject, flags=re.M)
