"""Converters for :mod:`nanogpt_model`: ``"nanogpt"`` (Karpathy's GPT-2) and ``"nanogpt-modern"``.

Weight layout (nanoGPT ``nn.Linear`` weights are ``(out, in)``; TransformerLens stores ``(in, out)``
and splits heads)::

    transformer.h.{l}.attn.c_attn.weight (3C, C) -> W_Q, W_K, W_V   (n_head, C, hs)
    transformer.h.{l}.attn.c_proj.weight (C, C)  -> W_O             (n_head, hs, C)
    transformer.h.{l}.mlp.c_fc.weight    (H, C)  -> W_in            (C, H)
    transformer.h.{l}.mlp.c_gate.weight  (H, C)  -> W_gate          (C, H)      modern only
    transformer.h.{l}.mlp.c_proj.weight  (C, H)  -> W_out           (H, C)
    lm_head.weight                       (V, C)  -> W_U             (C, V)

Biases that the source model does not have are zeros in TransformerLens (it always has them).
"""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import dataclasses
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformerConfig

from lens_callback.convert.base import ConversionError, Converter, register_converter, shared_zeros
from nanogpt_model import GPT, GPTConfig, strip_wrapper_prefixes


_KARPATHY_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")
"""The fields of the ``GPTConfig`` in Karpathy's nanoGPT ``model.py``."""


class NanoGPTConverter(Converter):
    """``nanogpt_model.GPT`` with ``architecture="gpt2"`` (and any nanoGPT ``ckpt.pt``)."""

    name = "nanogpt"
    architecture = "gpt2"

    def config(self, model_config: Mapping[str, Any]) -> GPTConfig:
        cfg = GPTConfig.from_dict(model_config)
        if cfg.architecture != self.architecture:
            raise ValueError(
                f"converter {self.name!r} handles architecture={self.architecture!r}, got {cfg.architecture!r}"
            )
        return cfg

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        """``model.config`` as plain values: a `nanogpt_model.GPT`'s, or the ``GPTConfig`` dataclass of
        a copy of Karpathy's ``model.py`` (his seven fields; this converter is then named explicitly,
        ``converter="nanogpt"``, and the parity check confirms the copy computes what his does)."""
        if isinstance(model, GPT):
            return model.config.to_dict()
        config = getattr(model, "config", None)
        if self.architecture == "gpt2" and dataclasses.is_dataclass(config) and not isinstance(config, type):
            fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
            if set(fields) == set(_KARPATHY_FIELDS):
                return GPTConfig.from_dict({**fields, "architecture": self.architecture}).to_dict()
        raise TypeError(
            f"converter {self.name!r} expects a nanogpt_model.GPT or a copy of Karpathy's nanoGPT GPT (a .config "
            f"dataclass with exactly the fields {list(_KARPATHY_FIELDS)}), got {type(model).__name__}; for a "
            f"modified architecture write a converter (README, 'Converting a custom architecture')")

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, GPT) and model.config.architecture == self.architecture

    def expected_keys(self, model_config: Mapping[str, Any]) -> set[str]:
        cfg = self.config(model_config)
        keys = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
        if cfg.architecture == "gpt2":
            keys.add("transformer.wpe.weight")
        names = ["ln_1.weight", "ln_2.weight", "attn.c_attn.weight", "attn.c_proj.weight",
                 "mlp.c_fc.weight", "mlp.c_proj.weight"]
        if cfg.architecture == "modern":
            names.append("mlp.c_gate.weight")
        if cfg.bias:
            keys.add("transformer.ln_f.bias")
            names += ["ln_1.bias", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"]
        keys.update(f"transformer.h.{i}.{n}" for i in range(cfg.n_layer) for n in names)
        return keys

    def expected_shapes(self, model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):  # shapes only: no memory, no RNG draws
            reference = GPT(self.config(model_config))
        return {k: tuple(v.shape) for k, v in reference.state_dict().items()}

    def source_weights(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A nanoGPT state dict as this converter reads it: wrapper prefixes and 4-D causal-mask
        buffers (``attn.bias``, stored by nanoGPT without flash attention) removed; input untouched."""
        return strip_wrapper_prefixes(state_dict)

    def optional_keys(self, model_config: Mapping[str, Any]) -> set[str]:
        # a tied model stores one matrix under two names; a snapshot or checkpoint may keep one
        return {"transformer.wte.weight", "lm_head.weight"} if self.config(model_config).tie_weights else set()

    def hooked_config(self, model_config: Mapping[str, Any]) -> HookedTransformerConfig:
        cfg = self.config(model_config)
        return HookedTransformerConfig(
            **self._shape(cfg),
            act_fn="gelu",  # nn.GELU(): exact erf GELU, not gelu_new
            normalization_type="LN",
            positional_embedding_type="standard",
        )

    def _shape(self, cfg: GPTConfig) -> dict[str, Any]:
        """The fields every nanoGPT architecture shares: sizes, names, no BOS, no weight init."""
        return dict(
            n_layers=cfg.n_layer,
            d_model=cfg.n_embd,
            n_ctx=cfg.block_size,
            d_head=cfg.head_size,
            n_heads=cfg.n_head,
            d_mlp=cfg.hidden_size,
            d_vocab=cfg.vocab_size,
            eps=cfg.norm_eps,
            original_architecture=self.name,
            model_name=f"{self.name}-{cfg.n_layer}L-{cfg.n_embd}d",
            default_prepend_bos=False,
            init_weights=False,
        )

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config(model_config)
        sd = state_dict
        nh, hs, C = cfg.n_head, cfg.head_size, cfg.n_embd
        if "transformer.wte.weight" not in sd and "lm_head.weight" not in sd:
            raise ConversionError("missing keys: transformer.wte.weight and lm_head.weight (a tied model needs one of them)")
        wte = sd["transformer.wte.weight"] if "transformer.wte.weight" in sd else sd["lm_head.weight"]
        head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["transformer.wte.weight"]
        out: dict[str, Tensor] = {
            "embed.W_E": wte,
            "unembed.W_U": head.T,
            "unembed.b_U": shared_zeros(head, cfg.vocab_size),
        }
        if cfg.architecture == "gpt2":
            out["pos_embed.W_pos"] = sd["transformer.wpe.weight"]
        out.update(self._norm("ln_final", "transformer.ln_f", sd, cfg))
        for i in range(cfg.n_layer):
            src, dst = f"transformer.h.{i}", f"blocks.{i}"
            out.update(self._norm(f"{dst}.ln1", f"{src}.ln_1", sd, cfg))
            out.update(self._norm(f"{dst}.ln2", f"{src}.ln_2", sd, cfg))
            w_q, w_k, w_v = sd[f"{src}.attn.c_attn.weight"].split(C, dim=0)  # each (C_out, C_in)
            for name, w in (("W_Q", w_q), ("W_K", w_k), ("W_V", w_v)):
                out[f"{dst}.attn.{name}"] = w.view(nh, hs, C).transpose(1, 2)  # (nh, C, hs)
            w_o = sd[f"{src}.attn.c_proj.weight"]  # (C_out, nh * hs)
            out[f"{dst}.attn.W_O"] = w_o.T.reshape(nh, hs, C)  # (nh, hs, C), a view
            out[f"{dst}.mlp.W_in"] = sd[f"{src}.mlp.c_fc.weight"].T
            out[f"{dst}.mlp.W_out"] = sd[f"{src}.mlp.c_proj.weight"].T
            if cfg.architecture == "modern":
                out[f"{dst}.mlp.W_gate"] = sd[f"{src}.mlp.c_gate.weight"].T
            if cfg.bias:
                b_q, b_k, b_v = sd[f"{src}.attn.c_attn.bias"].split(C, dim=0)
                out[f"{dst}.attn.b_Q"] = b_q.view(nh, hs)
                out[f"{dst}.attn.b_K"] = b_k.view(nh, hs)
                out[f"{dst}.attn.b_V"] = b_v.view(nh, hs)
                out[f"{dst}.attn.b_O"] = sd[f"{src}.attn.c_proj.bias"]
                out[f"{dst}.mlp.b_in"] = sd[f"{src}.mlp.c_fc.bias"]
                out[f"{dst}.mlp.b_out"] = sd[f"{src}.mlp.c_proj.bias"]
            else:
                ref = w_q
                for name in ("b_Q", "b_K", "b_V"):
                    out[f"{dst}.attn.{name}"] = shared_zeros(ref, nh, hs)
                out[f"{dst}.attn.b_O"] = shared_zeros(ref, C)
                out[f"{dst}.mlp.b_in"] = shared_zeros(ref, cfg.hidden_size)
                out[f"{dst}.mlp.b_out"] = shared_zeros(ref, C)
        return out

    def _norm(self, dst: str, src: str, sd: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
        weight = sd[f"{src}.weight"]
        out = {f"{dst}.w": weight}
        if cfg.architecture == "gpt2":  # LayerNorm; RMSNorm has no bias
            out[f"{dst}.b"] = sd[f"{src}.bias"] if cfg.bias else shared_zeros(weight, cfg.n_embd)
        return out


class ModernNanoGPTConverter(NanoGPTConverter):
    """``nanogpt_model.GPT`` with ``architecture="modern"``: rotary, RMSNorm, SwiGLU, no biases.

    Targets TransformerLens's own options: ``positional_embedding_type="rotary"`` with
    ``rotary_adjacent_pairs=False`` (GPT-NeoX halves, as in ``nanogpt_model``), ``"RMS"``
    normalisation, ``gated_mlp=True`` with ``act_fn="silu"``.
    """

    name = "nanogpt-modern"
    architecture = "modern"

    def hooked_config(self, model_config: Mapping[str, Any]) -> HookedTransformerConfig:
        cfg = self.config(model_config)
        return HookedTransformerConfig(
            **self._shape(cfg),
            act_fn="silu",
            gated_mlp=True,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=cfg.head_size,
            rotary_base=cfg.rotary_base,
            rotary_adjacent_pairs=False,
        )


register_converter(NanoGPTConverter())
register_converter(ModernNanoGPTConverter())
