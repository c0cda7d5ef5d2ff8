"""Random-init LLaMA checkpoints of any size, written one block at a time (docs/benchmarks.md, "Model size").

    python benchmarks/model_size.py config DIR [--layers 22]        # config.json only (for `seedprints controls`)
    python benchmarks/model_size.py checkpoint DIR --seed S [--layers 22]

The default config is the ~1.1B TinyLlama shape: hidden 2048, 22 layers, MLP 5632, vocabulary 32000,
32 heads, 4 KV heads. ``checkpoint`` writes a sharded ``save_pretrained``-style directory (one
safetensors shard per block, ``model.safetensors.index.json``, ``config.json``) in float32: each block
is drawn with the model's own init (``streamed_block_seed(seed, name)``, as a streamed control),
saved and freed before the next, so the writer's memory is one block (the 262 MB embedding or the
lm_head). The LM head is drawn as the block ``lm_head``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, num_hidden_layers=layers, intermediate_size=5632, vocab_size=32000,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def write_checkpoint(out: Path, seed: int, layers: int) -> None:
    from safetensors.torch import save_file

    from seedprints_lightning.core.layerwise import _FreshInitLoader, empty_model, split_blocks

    config = llama_config(layers)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    model = empty_model(config)
    split = split_blocks(model)
    loader = _FreshInitLoader(split.base, seed, torch.device("cpu"), torch.float32)
    blocks = [(split.name(a), m) for a, m in split.base.named_children() if a not in ("layers", "norm")]
    blocks += [(split.name(f"layers.{i}"), layer) for i, layer in enumerate(split.layers)]
    blocks += [(split.name("norm"), split.base.norm), ("lm_head", model.lm_head)]
    weight_map, total = {}, 0
    for i, (name, module) in enumerate(blocks):
        release = loader(name, module)
        tensors = {f"{name}.{key}": t.contiguous() for key, t in module.state_dict().items()
                   if "inv_freq" not in key}
        if tensors:
            shard = f"model-{i:05d}-of-{len(blocks):05d}.safetensors"
            save_file(tensors, str(out / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        if release is not None:
            release()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    print(f"wrote {out}: {len(weight_map)} tensors, {total / 1e9:.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("config", "checkpoint"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=22)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.what == "config":
        args.out.mkdir(parents=True, exist_ok=True)
        llama_config(args.layers).save_pretrained(args.out)
        print(f"wrote {args.out / 'config.json'}")
    else:
        write_checkpoint(args.out, args.seed, args.layers)
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
