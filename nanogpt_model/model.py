"""A GPT language model with nanoGPT's parameter names, shapes and numerics.

The ``"gpt2"`` architecture is Karpathy's nanoGPT (itself GPT-2): learned position embeddings,
pre-LayerNorm blocks, GELU MLP, weight tying, and the scaled initialisation of the residual
projections. The ``"modern"`` architecture keeps the same module names and swaps in the usual
"modern nanoGPT" parts: rotary position embeddings (GPT-NeoX convention: the two halves of each
head are rotated against each other), RMSNorm, and a gated SiLU (SwiGLU) MLP, without biases.

References:
    Karpathy, nanoGPT ``model.py``; Radford et al. 2019 (GPT-2); Su et al. 2021 (RoFormer);
    Shazeer 2020 (GLU variants); Zhang & Sennrich 2019 (RMSNorm).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nanogpt_model.config import GPTConfig

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Returns a copy of a nanoGPT state dict with wrapper prefixes and mask buffers removed.

    nanoGPT checkpoints of a ``torch.compile``-d model carry ``_orig_mod.`` on every key and DDP
    ones ``module.``; nanoGPT without flash attention also stores its causal mask as the buffer
    ``transformer.h.{i}.attn.bias``. This helper removes both so that the result loads into
    :class:`GPT` with ``strict=True``. The input mapping is not modified.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    stripped = True
        if name.endswith(".attn.bias") and value.dim() == 4:
            continue  # nanoGPT's causal-mask buffer, not a weight
        out[name] = value
    return out


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain and no bias (Zhang & Sennrich 2019)."""

    def __init__(self, ndim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Written as TransformerLens computes it, so that converted models agree to rounding.
        scale = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        return x / scale * self.weight


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's ``nn.LayerNorm`` has no ``bias=False`` in old releases)."""

    def __init__(self, ndim: int, bias: bool, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def _norm(config: GPTConfig) -> nn.Module:
    if config.architecture == "modern":
        return RMSNorm(config.n_embd, config.norm_eps)
    return LayerNorm(config.n_embd, bias=config.bias, eps=config.norm_eps)


def rotary_tables(
    head_size: int, length: int, base: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Returns ``(cos, sin)`` of shape ``(length, head_size)`` for GPT-NeoX-style rotary embeddings.

    Frequency ``i`` of the first half is paired with the same frequency in the second half.
    Computed in ``dtype``: float32, or float64 for a float64 model (as TransformerLens does).
    """
    pos = torch.arange(length, dtype=dtype)
    dim = torch.arange(head_size // 2, dtype=dtype)
    freq = base ** (dim / (head_size / 2))
    freq = torch.cat([freq, freq])  # (hs,)
    angles = pos[:, None] / freq[None, :]  # (T, hs)
    return torch.cos(angles), torch.sin(angles)


def _table_device(target: torch.device) -> str:
    """Where rotary tables bound for ``target`` are computed: the CPU, so that tables made at any time on
    any device hold the same values, or meta for meta ones (a shapes-only build, e.g. the converter's
    expected shapes, does no arithmetic: diff review)."""
    return "meta" if target.type == "meta" else "cpu"


def _table_precision(dtype: torch.dtype) -> torch.dtype:
    """The precision rotary tables are made in for ``dtype`` (weights, tables or activations): float64
    for float64, else float32, the precision the forward reads them in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates ``x`` of shape ``(B, nh, T, hs)`` by position; ``cos``/``sin`` are ``(T, hs)``."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.rotary = config.architecture == "modern"
        if self.rotary:
            self.rotary_args = (config.head_size, config.block_size, config.rotary_base)
            self.register_buffer("rotary_cos", None, persistent=False)
            self.register_buffer("rotary_sin", None, persistent=False)
            # in the precision of the weights the default dtype gives: the forward then has no tables to
            # remake, which a compiled forward with fullgraph=True cannot do (diff review)
            # where a new tensor goes: torch.get_default_device() ignores a `with torch.device("meta")` before torch 2.7
            self._make_tables(_table_precision(torch.get_default_dtype()), torch.empty(0).device)

    @torch.compiler.disable  # a compiled forward ignored inference_mode(False) here (diff review); a
    # fullgraph compile whose first forward must remake the tables (a meta build loaded with assign=True)
    # stops here: one eager forward, or model.to(device), first
    def _make_tables(self, precision: torch.dtype, device: torch.device) -> None:
        """The rotary tables computed anew in ``precision`` on ``device``: outside inference mode, which
        would make them tensors a later training step cannot save for backward (diff review: a
        ``model.to(device)`` in an ``inference_mode`` helper, or a first forward under ``validate``),
        eagerly, and on the CPU before they move (a ``torch.device("meta")`` default would give them no
        data to copy)."""
        with torch.inference_mode(False), torch.no_grad():
            with torch.device(_table_device(torch.device(device))):
                cos, sin = rotary_tables(*self.rotary_args, dtype=precision)
            self.rotary_cos, self.rotary_sin = cos.to(device), sin.to(device)
        self.rotary_precision = precision

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> CausalSelfAttention:
        """``Module._apply`` (``to``, ``float``, ``half``, ``to_empty``, ...), then the rotary tables made anew
        on their device: a cast rounds them (bf16) and casting back does not undo it, and ``to_empty`` (a
        model built on the meta device, or by Lightning's ``empty_init``) leaves them uninitialised, while
        ``load_state_dict`` never fills them (non-persistent). Computed in float64 where the cast made
        them float64, else in float32, the precision `forward` reads them in (modern review). Meta tables
        beside real weights (a meta-device build loaded with ``load_state_dict(assign=True)``) are made
        on the weights' device first: a move cannot copy a meta tensor (diff review)."""
        if self.rotary and self.rotary_cos.is_meta:
            real = next((p for p in self.parameters() if not p.is_meta), None)
            if real is not None:
                self._make_tables(torch.float32, real.device)
        super()._apply(fn, recurse)
        if self.rotary:
            self._make_tables(_table_precision(self.rotary_cos.dtype), self.rotary_cos.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.rotary:
            # tables in float32, float64 for a float64 forward; `_apply` remakes them after a cast, and
            # this covers tables set otherwise (a float64 forward of a float32 model; meta tables left by
            # a meta-device build loaded with load_state_dict(assign=True))
            precision = _table_precision(q.dtype)
            if (self.rotary_cos.dtype != precision or self.rotary_precision != precision
                    or self.rotary_cos.device != q.device):
                self._make_tables(precision, q.device)
            cos = self.rotary_cos[:T].to(q.dtype)
            sin = self.rotary_sin[:T].to(q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # causal self-attention; (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T), flash where available
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU MLP (``"gpt2"``) or gated SiLU MLP (``"modern"``: ``c_proj(silu(c_gate(x)) * c_fc(x))``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.gated = config.architecture == "modern"
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        if self.gated:
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            h = self.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


if TYPE_CHECKING:

    class _Blocks(nn.ModuleList):
        """``GPT.transformer.h`` for type checkers: an ``nn.ModuleList`` of `Block` (a plain
        ``nn.ModuleList`` at run time)."""

        def __iter__(self) -> Iterator[Block]: ...

    class _Transformer(nn.ModuleDict):
        """``GPT.transformer`` for type checkers, with the types of the modules it holds (an
        ``nn.ModuleDict``'s attributes are typed ``Tensor | Module``). At run time it is the
        ``nn.ModuleDict`` itself, so the model's repr, type and pickles are nanoGPT's."""

        wte: nn.Embedding
        wpe: nn.Embedding  # "gpt2" only: `"wpe" in self.transformer` says whether it is there
        drop: nn.Dropout
        h: _Blocks
        ln_f: nn.Module  # LayerNorm or RMSNorm

else:
    _Transformer = nn.ModuleDict


class GPT(nn.Module):
    """nanoGPT's ``GPT``: ``forward(idx, targets=None) -> (logits, loss)``.

    As in nanoGPT, logits cover every position when ``targets`` is given and only the last
    position otherwise (the inference-time shortcut); ``all_positions=True`` asks for every
    position without targets.

    Example:
        >>> model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=64))
        >>> logits, loss = model(torch.zeros(1, 8, dtype=torch.long))
        >>> logits.shape
        torch.Size([1, 1, 256])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        # nanoGPT's order (wte, wpe, drop, h, ln_f): construction and `_init_weights` draw from the
        # global RNG module by module, so the same seed gives nanoGPT's initial weights bitwise
        modules: dict[str, nn.Module] = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.architecture == "gpt2":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=_norm(config),
        )
        self.transformer = _Transformer(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # with weight tying, torch.compile gives a warning about shared storage: expected
            self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying

        self.apply(self._init_weights)
        # scaled init of the residual projections, per GPT-2 paper
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters; position embeddings are subtracted when ``non_embedding``.

        The token embedding counts (it is the output projection too when tied).
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def crop_block_size(self, block_size: int) -> None:
        """nanoGPT's model surgery: shrink the context to ``block_size`` tokens, in place.

        E.g. to train or probe at 256 tokens a model made for 1024. Keeps the first ``block_size``
        position embeddings (``"gpt2"``) or rotary table rows (``"modern"``); ``config`` becomes a
        copy with the new ``block_size``.

        Raises:
            ValueError: unless ``1 <= block_size <= config.block_size``.
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"block_size must be an integer in [1, {self.config.block_size}], got {block_size!r}")
        self.config = dataclasses.replace(self.config, block_size=block_size)
        if "wpe" in self.transformer:
            wpe = self.transformer.wpe
            wpe.weight = nn.Parameter(wpe.weight[:block_size])
            wpe.num_embeddings = block_size
        for block in self.transformer.h:
            attn = block.attn
            if attn.rotary:
                attn.rotary_args = (attn.rotary_args[0], block_size, attn.rotary_args[2])
                attn.rotary_cos, attn.rotary_sin = attn.rotary_cos[:block_size], attn.rotary_sin[:block_size]

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float = 312e12) -> float:
        """nanoGPT's model FLOPs utilisation: achieved FLOP/s over ``peak_flops`` (default: an A100's
        bfloat16 peak, as in nanoGPT), for ``fwdbwd_per_iter`` sequences of ``block_size`` tokens per
        ``dt`` seconds. FLOPs per token ``6 N + 12 L H Q T`` (PaLM, appendix B)."""
        cfg = self.config
        flops_per_token = 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * cfg.block_size
        return flops_per_token * cfg.block_size * fwdbwd_per_iter / dt / peak_flops

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, all_positions: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(
                f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
            )
        x = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        if "wpe" in self.transformer:
            pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # shape (t)
            x = x + self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        elif all_positions:
            logits, loss = self.lm_head(x), None
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits, loss = self.lm_head(x[:, [-1], :]), None  # note: using list [-1] to preserve the time dim
        return logits, loss

    def load_nanogpt_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Loads a state dict saved by nanoGPT (``_orig_mod.``/``module.`` prefixes accepted).

        See :func:`strip_wrapper_prefixes`. Returns what ``load_state_dict`` returns.
        """
        return self.load_state_dict(strip_wrapper_prefixes(state_dict), strict=strict)

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """nanoGPT's parameter groups: matrices and embeddings decay, biases and norm gains do not."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """nanoGPT's AdamW over :meth:`optim_groups`, fused on CUDA."""
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type == "cuda"
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(self.optim_groups(weight_decay), lr=learning_rate, betas=betas, **extra)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples ``max_new_tokens`` tokens after the conditioning sequence ``idx`` (b, t).

        Put the model in ``eval()`` mode first. Pass a ``generator`` to keep the global RNG untouched.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        for _ in range(max_new_tokens):
            # if the sequence context is growing too long we must crop it at block_size
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def unwrap_model(module: nn.Module) -> nn.Module:
    """Returns the module inside ``torch.compile`` (``_orig_mod``) and DDP (``module``) wrappers."""
    seen: set[int] = set()
    while id(module) not in seen:
        seen.add(id(module))
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
    return module

