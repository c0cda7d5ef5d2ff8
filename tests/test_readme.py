"""The README's commands and snippets stay true: each is run here or by `make demo`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from seedprints_lightning.offline.cli import main as seedprints_main

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
    assert subcommands == {"fingerprint", "compare", "plot", "audit", "controls", "identify"}
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


# ---------------------------------------------------------------------- one snippet per training loop
def _snippet(marker: str) -> str:
    return next(block for block in _code_blocks("python") if marker in block)


def _small(snippet: str) -> str:
    """The README's production figures, shrunk to the tiny model: probes every few steps, small probes."""
    snippet = snippet.replace("every_n_steps=1000", "every_n_steps=4, probe=SPEC, num_controls=2")
    return snippet.replace("max_steps=100_000", "max_steps=8").replace("save_steps=5000", "save_steps=4")


SMALL_SPEC = dict(num_samples=200, length=8)
TOKENS = __import__("torch").randint(0, 64, (32, 16), generator=__import__("torch").Generator().manual_seed(0))


def test_lightning_trainer_snippet_runs(tmp_path, monkeypatch, tiny_llama):
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
    snippet = _small(_snippet("pl.Trainer(")).replace("max_steps=8,", "max_steps=8, logger=False, "
                                                        "enable_progress_bar=False, enable_checkpointing=False,")
    datamodule = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(TOKENS), batch_size=4)
    namespace = {"module": Module(), "datamodule": datamodule, "SPEC": ProbeSpec(**SMALL_SPEC)}
    exec(compile(snippet, "README.md", "exec"), namespace)
    callback = namespace["trainer"].callbacks[0]
    assert [h["related"] for h in callback.history] == [True] * 8  # steps 1..8
    from seedprints_lightning import verify_chain

    assert verify_chain(tmp_path / "seedprints").ok


def test_hugging_face_trainer_snippet_runs(tmp_path, monkeypatch, tiny_llama):
    from seedprints_lightning import ProbeSpec, verify_chain

    class Tokens(__import__("torch").utils.data.Dataset):
        def __len__(self):
            return len(TOKENS)

        def __getitem__(self, i):
            return {"input_ids": TOKENS[i], "labels": TOKENS[i]}

    monkeypatch.chdir(tmp_path)
    snippet = _small(_snippet("SeedPrintsTrainerCallback(every_n_steps")).replace(
        "save_steps=4)", "save_steps=4, per_device_train_batch_size=4, learning_rate=3e-3, use_cpu=True, "
                         "report_to='none', disable_tqdm=True)")
    namespace = {"model": tiny_llama(0).train(), "dataset": Tokens(), "SPEC": ProbeSpec(**SMALL_SPEC)}
    exec(compile(snippet, "README.md", "exec"), namespace)
    from seedprints_lightning import SeedPrintsTrainerCallback

    callback = next(cb for cb in namespace["trainer"].callback_handler.callbacks
                    if isinstance(cb, SeedPrintsTrainerCallback))
    assert [h["step"] for h in callback.history] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(h["related"] is True for h in callback.history)
    assert verify_chain(tmp_path / "runs/hf/seedprints").ok
    assert (tmp_path / "runs/hf/checkpoint-8/seedprints_state.pt").is_file()


def test_fabric_snippets_run(tmp_path, monkeypatch, tiny_llama):
    import types

    import torch
    from torch import nn

    from seedprints_lightning import ProbeSpec, verify_chain

    monkeypatch.chdir(tmp_path)
    model = tiny_llama(0).train()
    namespace = {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=3e-3),
                 "loader": [TOKENS[i:i + 4] for i in range(0, 32, 4)], "SPEC": ProbeSpec(**SMALL_SPEC)}
    exec(compile(_small(_snippet("fabric.setup(model, optimizer)")), "README.md", "exec"), namespace)
    seedprints = namespace["seedprints"]
    assert [h["step"] for h in seedprints.history] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(h["related"] is True for h in seedprints.history)
    assert verify_chain(tmp_path / "runs/fabric/seedprints").ok
    assert seedprints_main(["audit", "--chain", "runs/fabric/seedprints", "runs/fabric/last.ckpt", "-q"]) == 0

    class GPT(nn.Module):  # LitGPT's outline: transformer.{wte, h, ln_f}, lm_head, forward(idx)
        def __init__(self, config):
            super().__init__()
            width = 32
            self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.padded_vocab_size, width),
                                                  h=nn.ModuleList([nn.Linear(width, width)]), ln_f=nn.LayerNorm(width)))
            self.lm_head = nn.Linear(width, config.padded_vocab_size)

        def forward(self, idx):
            x = self.transformer.wte(idx)
            for block in self.transformer.h:
                x = x + torch.tanh(block(x))
            return self.lm_head(self.transformer.ln_f(x))

    config = types.SimpleNamespace(padded_vocab_size=64)
    litgpt = {"GPT": GPT, "config": config}
    exec(compile(_snippet('submodule_output("transformer.ln_f")'), "README.md", "exec"), litgpt)
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


def test_own_loop_snippet_runs_and_its_checkpoint_is_audited(tmp_path, monkeypatch, tiny_llama):
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
    exec(compile(_small(_snippet("SeedPrintsMonitor(every_n_steps")), "README.md", "exec"), namespace)
    assert [h["related"] for h in namespace["monitor"].history] == [True] * 6
    assert verify_chain(tmp_path / "runs/mine/seedprints").ok
    audit_line = next(line for block in _code_blocks("bash") for line in block.splitlines()
                      if "runs/mine/last.pt" in line)
    assert seedprints_main(shlex.split(audit_line.split("#")[0])[1:] + ["-q"]) == 0
