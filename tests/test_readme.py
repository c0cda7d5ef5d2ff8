"""The README's and the docs' commands and snippets stay true: each is run here or by `make demo`.

Every ```python block of README.md and docs/*.md is run by one test below, picked by a marker it
contains (RUNNERS); a block that no test can run is marked, on the line before its fence,
``<!-- not run: REASON -->``, and test_every_python_block_is_run_or_marked fails on any other.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from seedprints_lightning.offline.cli import build_parser
from seedprints_lightning.offline.cli import main as seedprints_main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = (ROOT / "README.md").read_text()
NOT_RUN = re.compile(r"<!-- not run: .+ -->\n$")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    text: str
    not_run: bool  # marked ``<!-- not run: REASON -->`` on the line before its fence

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks(language: str, pages: list[Path] = PAGES) -> list[Block]:
    found = []
    for page in pages:
        text = page.read_text()
        for match in re.finditer(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M):
            before = text[:match.start()]
            last_line = before[before.rfind("\n", 0, len(before) - 1) + 1:]
            found.append(Block(page, before.count("\n") + 1, match.group(1), bool(NOT_RUN.match(last_line))))
    return found


def _code_blocks(language: str, pages: list[Path] = PAGES) -> list[str]:
    return [block.text for block in _blocks(language, pages)]


def _snippets(marker: str) -> list[Block]:
    """Every python block holding ``marker``, for a test's parametrize (it must find one at least)."""
    blocks = [block for block in _blocks("python") if marker in block.text and not block.not_run]
    assert blocks, f"no ```python block of README.md or docs/*.md holds {marker!r}"
    return blocks


def _each(marker: str):
    return pytest.mark.parametrize("block", _snippets(marker), ids=lambda block: block.name)


#: The marker each runner below picks its blocks by.
RUNNERS = ("fingerprint_model", "CustodyChain", "pl.Trainer(", "SeedPrintsTrainerCallback(every_n_steps",
           "fabric.setup(model, optimizer)", 'submodule_output("transformer.ln_f")', "SeedPrintsMonitor(every_n_steps",
           "register_family(ModelFamily(")


def test_every_python_block_is_run_or_marked():
    unclaimed = [block.name for block in _blocks("python")
                 if not block.not_run and not any(marker in block.text for marker in RUNNERS)]
    assert not unclaimed, f"python blocks no test runs (add a runner, or mark them <!-- not run: why -->): {unclaimed}"


def test_the_block_finder_sees_markers_and_languages(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\n<!-- not run: needs a GPU -->\n```python\ny = 2\n```\n"
                    "```bash\nmake demo\n```\n")
    blocks = _blocks("python", [page])
    assert [(b.line, b.text, b.not_run) for b in blocks] == [(3, "x = 1\n", False), (8, "y = 2\n", True)]
    assert _code_blocks("bash", [page]) == ["make demo\n"]


def test_make_targets_named_in_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = re.findall(r"^make (\w+)", "\n".join(_code_blocks("bash")), flags=re.M)
    assert {"demo", "test"} <= set(targets)
    for target in targets:
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"the docs name `make {target}`, the Makefile has none"


def test_readme_set_up_is_the_two_make_commands():
    first = _code_blocks("bash", [ROOT / "README.md"])[0]
    assert [line.split("#")[0].strip() for line in first.splitlines()] == ["make demo", "make test"]


def test_readme_command_lines_parse():
    """The README's command lines are whole commands (no placeholders): argparse takes each as it is."""
    lines = [line.split("#")[0] for block in _code_blocks("bash", [ROOT / "README.md"])
             for line in block.splitlines() if line.startswith("seedprints ")]
    assert len(lines) == 3
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert args.command == shlex.split(line)[1]


def test_every_seedprints_subcommand_in_readme_parses(capsys):
    lines = [line for block in _code_blocks("bash") for line in block.splitlines() if line.startswith("seedprints ")]
    subcommands = {shlex.split(line.split("#")[0])[1] for line in lines}
    assert subcommands == {"fingerprint", "compare", "plot", "audit", "controls", "identify"}
    for sub in sorted(subcommands):
        try:
            code = seedprints_main([sub, "--help"])
        except SystemExit as exit_info:  # argparse's own --help exit
            code = exit_info.code
        assert code == 0
        assert sub in capsys.readouterr().out


def test_configs_named_in_readme_exist():
    for page in PAGES:
        for name in set(re.findall(r"configs/[\w.-]+\.yaml", page.read_text())):
            assert (ROOT / name).is_file(), f"{page.name} names {name}, which does not exist"


@_each("fingerprint_model")
def test_python_api_snippet_runs(block, tmp_path, monkeypatch, tiny_llama):
    snippet = block.text.replace("num_samples=1000, length=32", "num_samples=200, length=8")
    monkeypatch.chdir(tmp_path)
    parent = tiny_llama(1)
    child = tiny_llama(1)
    for param in child.parameters():  # a "fine-tuned" child: the parent plus small noise
        param.data.add_(1e-3 * param.data.std() * __import__("torch").randn_like(param))
    namespace = {"parent_model": parent, "child_model": child}
    exec(compile(snippet, block.name, "exec"), namespace)
    assert namespace["result"].related is True
    assert (tmp_path / "parent.safetensors").is_file()


@_each("CustodyChain")
def test_custody_chain_snippet_runs(block, tmp_path, monkeypatch, tiny_llama):
    import torch

    snippet = block.text.replace("ProbeSpec()", "ProbeSpec(num_samples=200, length=8)")
    monkeypatch.chdir(tmp_path)
    model = tiny_llama(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))

    def train_step(model):
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    namespace = {"model": model, "train_step": train_step, "num_steps": 6}
    exec(compile(snippet, block.name, "exec"), namespace)
    assert [h["step"] for h in namespace["chain"].history] == [1, 2, 3, 4, 5, 6]
    assert all(h["related"] is True for h in namespace["chain"].history)
    assert (tmp_path / "runs/mine/seedprints/custody.jsonl").read_text().count("\n") == 6


# ---------------------------------------------------------------------- one snippet per training loop
def _small(snippet: str) -> str:
    """The README's production figures, shrunk to the tiny model: probes every few steps, small probes."""
    snippet = snippet.replace("every_n_steps=1000", "every_n_steps=4, probe=SPEC, num_controls=2")
    return snippet.replace("max_steps=100_000", "max_steps=8").replace("save_steps=5000", "save_steps=4")


SMALL_SPEC = dict(num_samples=200, length=8)
TOKENS = __import__("torch").randint(0, 64, (32, 16), generator=__import__("torch").Generator().manual_seed(0))


@_each("pl.Trainer(")
def test_lightning_trainer_snippet_runs(block, tmp_path, monkeypatch, tiny_llama):
    import pytorch_lightning as pl
    import torch

    from seedprints_lightning import ProbeSpec

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_llama(0).train()

        def training_step(self, batch, batch_idx):
            return self.net(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    monkeypatch.chdir(tmp_path)
    # the default logger stays: the README's audit line names its directory, lightning_logs/version_0
    snippet = _small(block.text).replace("max_steps=8,", "max_steps=8, enable_progress_bar=False, "
                                                         "enable_checkpointing=False,")
    datamodule = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(TOKENS), batch_size=4)
    namespace = {"module": Module(), "datamodule": datamodule, "SPEC": ProbeSpec(**SMALL_SPEC)}
    exec(compile(snippet, block.name, "exec"), namespace)
    callback = next(cb for cb in namespace["trainer"].callbacks if type(cb).__name__ == "SeedPrintsCallback")
    assert [h["related"] for h in callback.history] == [True] * 8  # steps 1..8
    from seedprints_lightning import verify_chain

    assert verify_chain(tmp_path / "lightning_logs/version_0/seedprints").ok
    audit_lines = [line.split("#")[0] for text in _code_blocks("bash") for line in text.splitlines()
                   if line.startswith("seedprints audit --chain lightning_logs/")]
    assert audit_lines, "the README's quickstart audit line is gone"
    for line in audit_lines:
        assert seedprints_main(shlex.split(line)[1:] + ["-q"]) == 0, line


@_each("SeedPrintsTrainerCallback(every_n_steps")
def test_hugging_face_trainer_snippet_runs(block, tmp_path, monkeypatch, tiny_llama):
    from seedprints_lightning import ProbeSpec, verify_chain

    class Tokens(__import__("torch").utils.data.Dataset):
        def __len__(self):
            return len(TOKENS)

        def __getitem__(self, i):
            return {"input_ids": TOKENS[i], "labels": TOKENS[i]}

    monkeypatch.chdir(tmp_path)
    snippet = _small(block.text).replace(
        "save_steps=4)", "save_steps=4, per_device_train_batch_size=4, learning_rate=3e-3, use_cpu=True, "
                         "report_to='none', disable_tqdm=True)")
    namespace = {"model": tiny_llama(0).train(), "dataset": Tokens(), "SPEC": ProbeSpec(**SMALL_SPEC)}
    exec(compile(snippet, block.name, "exec"), namespace)
    from seedprints_lightning import SeedPrintsTrainerCallback

    callback = next(cb for cb in namespace["trainer"].callback_handler.callbacks
                    if isinstance(cb, SeedPrintsTrainerCallback))
    assert [h["step"] for h in callback.history] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(h["related"] is True for h in callback.history)
    assert verify_chain(tmp_path / "runs/hf/seedprints").ok
    assert (tmp_path / "runs/hf/checkpoint-8/seedprints_state.pt").is_file()


@_each("fabric.setup(model, optimizer)")
def test_fabric_snippet_runs(block, tmp_path, monkeypatch, tiny_llama):

    import torch

    from seedprints_lightning import ProbeSpec, verify_chain

    monkeypatch.chdir(tmp_path)
    model = tiny_llama(0).train()
    namespace = {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=3e-3),
                 "loader": [TOKENS[i:i + 4] for i in range(0, 32, 4)], "SPEC": ProbeSpec(**SMALL_SPEC)}
    exec(compile(_small(block.text), block.name, "exec"), namespace)
    seedprints = namespace["seedprints"]
    assert [h["step"] for h in seedprints.history] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(h["related"] is True for h in seedprints.history)
    assert verify_chain(tmp_path / "runs/fabric/seedprints").ok
    assert seedprints_main(["audit", "--chain", "runs/fabric/seedprints", "runs/fabric/last.ckpt", "-q"]) == 0


@_each('submodule_output("transformer.ln_f")')
def test_litgpt_feature_fn_snippet_runs(block):
    import types

    import torch
    from torch import nn

    from seedprints_lightning import ProbeSpec

    class GPT(nn.Module):  # LitGPT's outline: transformer.{wte, h, ln_f}, lm_head, forward(idx)
        def __init__(self, config):
            super().__init__()
            width = 32
            self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.padded_vocab_size, width),
                                                  h=nn.ModuleList([nn.Linear(width, width)]), ln_f=nn.LayerNorm(width)))
            self.lm_head = nn.Linear(width, config.padded_vocab_size)

        def forward(self, idx):
            x = self.transformer.wte(idx)
            for layer in self.transformer.h:
                x = x + torch.tanh(layer(x))
            return self.lm_head(self.transformer.ln_f(x))

    config = types.SimpleNamespace(padded_vocab_size=64)
    litgpt = {"GPT": GPT, "config": config}
    exec(compile(block.text, block.name, "exec"), litgpt)
    callback = litgpt["seedprints"]
    gpt = GPT(config)
    spec = ProbeSpec(kind="token", vocab_size=64, num_samples=16, length=8)
    from seedprints_lightning import extract_features

    features = extract_features(gpt, spec, forward_fn=lambda batch: callback.settings.feature_fn(gpt, batch))
    expected = gpt.transformer.ln_f(gpt.transformer.wte(next(iter(spec.batches(16, 0, 16))).input_ids)
                                    + torch.tanh(gpt.transformer.h[0](gpt.transformer.wte(
                                        next(iter(spec.batches(16, 0, 16))).input_ids))))[:, -1]
    assert torch.allclose(features, expected.detach(), atol=1e-6)  # the final norm's output, last position
    assert isinstance(callback.settings.control_factory(5), GPT)


@_each("SeedPrintsMonitor(every_n_steps")
def test_own_loop_snippet_runs_and_its_checkpoint_is_audited(block, tmp_path, monkeypatch, tiny_llama):
    import torch

    from seedprints_lightning import ProbeSpec, verify_chain

    monkeypatch.chdir(tmp_path)
    model = tiny_llama(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def train_step(model):
        model(input_ids=TOKENS[:4], labels=TOKENS[:4]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    namespace = {"model": model, "train_step": train_step, "num_steps": 6, "SPEC": ProbeSpec(**SMALL_SPEC)}
    exec(compile(_small(block.text), block.name, "exec"), namespace)
    assert [h["related"] for h in namespace["monitor"].history] == [True] * 6
    assert verify_chain(tmp_path / "runs/mine/seedprints").ok
    audit_line = next(line for block in _code_blocks("bash") for line in block.splitlines()
                      if "runs/mine/last.pt" in line)
    assert seedprints_main(shlex.split(audit_line.split("#")[0])[1:] + ["-q"]) == 0


@_each("register_family(ModelFamily(")
def test_model_family_snippet_runs_and_the_family_is_measured(block, tmp_path, monkeypatch, capsys):
    from seedprints_lightning.core.families import family_named, unregister_family

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    try:
        exec(compile(block.text, block.name, "exec"), namespace)
        assert family_named("tiny-lm").name == "tiny-lm"
        assert namespace["monitor"].measurement.family == "tiny-lm"
        assert "measuring: whole (tiny-lm)" in capsys.readouterr().out
        assert (tmp_path / "runs/tiny/seedprints/reference.safetensors").is_file()
    finally:
        unregister_family("tiny-lm")
