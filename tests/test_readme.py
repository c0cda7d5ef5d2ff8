"""The README's commands and snippets stay true: each is run here or by `make demo`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from seedprints_lightning.cli import main as seedprints_main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_make_targets_named_in_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", "\n".join(_code_blocks("bash")), flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README names `make {target}`, the Makefile has none"


def test_every_seedprints_subcommand_in_readme_parses(capsys):
    lines = [line for block in _code_blocks("bash") for line in block.splitlines() if line.startswith("seedprints ")]
    subcommands = {shlex.split(line.split("#")[0])[1] for line in lines}
    assert subcommands == {"fingerprint", "compare", "plot", "audit", "controls"}
    for sub in sorted(subcommands):
        try:
            code = seedprints_main([sub, "--help"])
        except SystemExit as exit_info:  # argparse's own --help exit
            code = exit_info.code
        assert code == 0
        assert sub in capsys.readouterr().out


def test_configs_named_in_readme_exist():
    for name in set(re.findall(r"configs/[\w.-]+\.yaml", README)):
        assert (ROOT / name).is_file(), f"README names {name}, which does not exist"


def test_python_api_snippet_runs(tmp_path, monkeypatch, tiny_llama):
    snippet = next(block for block in _code_blocks("python") if "fingerprint_model" in block)
    snippet = snippet.replace("num_samples=1000, length=32", "num_samples=200, length=8")
    monkeypatch.chdir(tmp_path)
    parent = tiny_llama(1)
    child = tiny_llama(1)
    for param in child.parameters():  # a "fine-tuned" child: the parent plus small noise
        param.data.add_(1e-3 * param.data.std() * __import__("torch").randn_like(param))
    namespace = {"parent_model": parent, "child_model": child}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["result"].related is True
    assert (tmp_path / "parent.safetensors").is_file()


def test_custody_chain_snippet_runs(tmp_path, monkeypatch, tiny_llama):
    import torch

    snippet = next(block for block in _code_blocks("python") if "CustodyChain" in block)
    snippet = snippet.replace("ProbeSpec()", "ProbeSpec(num_samples=200, length=8)")
    monkeypatch.chdir(tmp_path)
    model = tiny_llama(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))

    def train_step(model):
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    namespace = {"model": model, "train_step": train_step, "num_steps": 6}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert [h["step"] for h in namespace["chain"].history] == [1, 2, 3, 4, 5, 6]
    assert all(h["related"] is True for h in namespace["chain"].history)
    assert (tmp_path / "runs/mine/seedprints/custody.jsonl").read_text().count("\n") == 6
