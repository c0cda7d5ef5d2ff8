"""The README's quickstart against an installed seedprints-lightning: what a user who ran `pip install` gets.

Run by .ci/run with the fresh virtual environment's python, from a directory outside the repository
(so the source tree cannot be imported by accident), as

    python quickstart.py README.md VENV_DIR

It checks that the package is the one installed in VENV_DIR, with py.typed, then runs the README's
Lightning snippet on a tiny LLaMA (the production figures shrunk, as tests/test_readme.py does) and
the README's `seedprints audit --chain lightning_logs/...` line with the installed console script,
then the audit of the checkpoint the fit saved.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path


def main(readme_path: str, venv_dir: str) -> int:
    import seedprints_lightning

    venv = Path(venv_dir).resolve()
    package = Path(seedprints_lightning.__file__).resolve().parent
    assert package.is_relative_to(venv), f"imported {package}, not the wheel installed in {venv}"
    assert (package / "py.typed").is_file(), "py.typed is not installed"
    assert not any("editable" in type(finder).__name__.lower() or "editable" in repr(finder).lower()
                   for finder in sys.meta_path), f"an editable finder is active: {sys.meta_path}"

    readme = Path(readme_path).read_text()
    snippet = next(block for block in re.findall(r"^```python\n(.*?)^```", readme, flags=re.S | re.M)
                   if "pl.Trainer(" in block)
    snippet = (snippet.replace("every_n_steps=1000", "every_n_steps=4, probe=SPEC, num_controls=2")
               .replace("max_steps=100_000", "max_steps=8, enable_progress_bar=False, log_every_n_steps=1"))
    exec(compile(snippet, "README.md", "exec"), _namespace())

    lines = [line.split("#")[0] for block in re.findall(r"^```bash\n(.*?)^```", readme, flags=re.S | re.M)
             for line in block.splitlines() if line.startswith("seedprints audit --chain lightning_logs/")]
    assert lines, "the README has no quickstart audit line"
    script = Path(sys.executable).parent / "seedprints"  # the wheel's console script
    for line in lines:
        argv = shlex.split(line)[1:]
        done = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=300)
        print(f"$ seedprints {shlex.join(argv)}  -> exit {done.returncode}\n{done.stdout.strip()}", flush=True)
        assert done.returncode == 0, done.stderr
    # ... and the checkpoint the fit saved descends from the chain (in this process: one start-up less)
    from seedprints_lightning.offline.cli import main as seedprints

    checkpoint = next(Path("lightning_logs").rglob("*.ckpt"))
    assert seedprints([*shlex.split(lines[0])[1:], str(checkpoint), "-q"]) == 0, f"{checkpoint} does not descend"
    print(f"quickstart: OK with {package}")
    return 0


def _namespace() -> dict:
    """``module`` and ``datamodule`` for the snippet: a tiny LLaMA (from a config: no download) on random tokens."""
    import pytorch_lightning as pl
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from seedprints_lightning import ProbeSpec

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = LlamaForCausalLM(config)

        def training_step(self, batch, batch_idx):
            return self.net(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=4)
    return {"module": Module(), "datamodule": loader, "SPEC": ProbeSpec(num_samples=200, length=8)}


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
