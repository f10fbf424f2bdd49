"""A reference nanoGPT (Karpathy's architecture and names) for Lightning, with data that needs no network."""

from nanogpt_model.config import ARCHITECTURES, GPTConfig
from nanogpt_model.data import TextDataModule, default_corpus, read_meta
from nanogpt_model.model import GPT, strip_wrapper_prefixes, unwrap_model
from nanogpt_model.module import NanoGPTModule

__all__ = [
    "ARCHITECTURES",
    "GPT",
    "GPTConfig",
    "NanoGPTModule",
    "TextDataModule",
    "default_corpus",
    "read_meta",
    "strip_wrapper_prefixes",
    "unwrap_model",
]
