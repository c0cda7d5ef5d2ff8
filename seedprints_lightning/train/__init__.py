"""Training infrastructure for demos, the LightningCLI, tests and benchmarks.

Everything here runs offline: models are built from configs (no weight downloads), text comes
from the installed Python standard library or the user's own files, and tokenization is
byte-level (no vocabulary files).
"""

from .corpus import CORPUS_DOMAINS, DEFAULT_MAX_BYTES, build_corpus, default_cache_dir
from .data import TextDataModule
from .models import ARCHITECTURES, make_causal_lm, make_config, model_from_config
from .module import CausalLMModule, load_causal_lm_from_checkpoint
from .tokenizer import (
    DOCUMENT_SEPARATOR_ID,
    MEMMAP_DTYPES,
    TEXT_SUFFIXES,
    ByteTokenizer,
    list_text_files,
    read_memmap,
    tokenize_directory,
    write_memmap,
)

__all__ = [
    "ARCHITECTURES",
    "CORPUS_DOMAINS",
    "DEFAULT_MAX_BYTES",
    "DOCUMENT_SEPARATOR_ID",
    "MEMMAP_DTYPES",
    "TEXT_SUFFIXES",
    "ByteTokenizer",
    "CausalLMModule",
    "TextDataModule",
    "build_corpus",
    "default_cache_dir",
    "list_text_files",
    "load_causal_lm_from_checkpoint",
    "make_causal_lm",
    "make_config",
    "model_from_config",
    "read_memmap",
    "tokenize_directory",
    "write_memmap",
]
