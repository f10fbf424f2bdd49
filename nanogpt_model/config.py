"""``GPTConfig``: the architecture of a nanoGPT model, as a validated dataclass of plain values."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

Architecture = Literal["gpt2", "modern"]
ARCHITECTURES: tuple[str, ...] = ("gpt2", "modern")
_MAX_NUMEL = 2**60  # elements of one weight whose byte count (up to 8 per element) int64 still holds


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a :class:`~nanogpt_model.GPT`.

    The defaults are nanoGPT's GPT-2 (124M) configuration. All fields are plain, JSON-serialisable
    values so that a config can be written next to a snapshot and read back.

    Attributes:
        block_size: Maximum context length (learned position embeddings have this many rows).
        vocab_size: Number of token ids.
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block; must divide ``n_embd``.
        n_embd: Width of the residual stream.
        dropout: Dropout probability used in training (attention, residual and embedding dropout).
        bias: Whether Linear and LayerNorm layers carry a bias (nanoGPT's ``bias``).
        architecture: ``"gpt2"`` is Karpathy's nanoGPT (learned positions, LayerNorm, GELU MLP).
            ``"modern"`` is the common "modern nanoGPT" variant: rotary position embeddings,
            RMSNorm, a gated SiLU (SwiGLU) MLP, and no biases (``bias`` must be ``False``).
        tie_weights: Whether ``lm_head.weight`` is the token embedding (nanoGPT always ties).
        mlp_hidden: Hidden width of the MLP; ``None`` means ``4 * n_embd`` for ``"gpt2"`` and
            the SwiGLU convention ``round_up(8 * n_embd / 3, 64)`` for ``"modern"``.
        rotary_base: Base of the rotary frequencies (``"modern"`` only).
        norm_eps: Epsilon of LayerNorm / RMSNorm.
    """

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    architecture: Architecture = "gpt2"
    tie_weights: bool = True
    mlp_hidden: int | None = None
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"GPTConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if self.mlp_hidden is not None and (
            isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int) or self.mlp_hidden <= 0
        ):
            raise ValueError(f"GPTConfig.mlp_hidden must be a positive integer or None, got {self.mlp_hidden!r}")
        for name in ("bias", "tie_weights"):  # a string "false" would read as true
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"GPTConfig.{name} must be True or False, got {value!r}")
        positions = ("block_size x n_embd", self.n_embd) if self.architecture == "gpt2" else (
            "block_size x head size (rotary tables)", self.head_size)
        sizes = {"vocab_size x n_embd": self.vocab_size * self.n_embd, positions[0]: self.block_size * positions[1],
                 "3 x n_embd x n_embd": 3 * self.n_embd * self.n_embd, "MLP width x n_embd": self.hidden_size * self.n_embd}
        for what, numel in sizes.items():  # PyTorch counts a tensor's bytes in int64 (a forged config, not a model)
            if numel > _MAX_NUMEL:
                raise ValueError(f"GPTConfig describes a weight of {what} = {numel} elements, more than a tensor can "
                                 f"hold (2**60)")
        if not 0 < self.norm_eps < math.inf:  # also refuses NaN: every logit would be NaN
            raise ValueError(f"GPTConfig.norm_eps must be a finite positive number, got {self.norm_eps!r}")
        if self.architecture == "modern":
            if self.bias:
                raise ValueError("GPTConfig.bias must be False when architecture='modern' (it has no biases)")
            if self.head_size % 2 != 0:
                raise ValueError(
                    f"rotary embeddings need an even head size, got n_embd/n_head = {self.head_size}"
                )
            if not 0 < self.rotary_base < math.inf:
                raise ValueError(f"GPTConfig.rotary_base must be a finite positive number, got {self.rotary_base!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_size(self) -> int:
        """The MLP's hidden width, with the per-architecture default resolved."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.architecture == "modern":
            return -(-int(8 * self.n_embd / 3) // 64) * 64
        return 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GPTConfig":
        """Builds a config from a mapping, rejecting keys that are not fields (typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; accepted: {sorted(names)}")
        return cls(**dict(data))
