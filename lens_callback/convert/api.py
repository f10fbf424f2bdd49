"""``to_hooked_transformer``: one call from a live model or a state dict to a ``HookedTransformer``."""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import dataclasses
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from lens_callback.convert.base import (
    Converter,
    available_converters,
    build_hooked_transformer,
    effective_state_dict,
    get_converter,
    infer_converter,
    unwrap_module,
)
from nanogpt_model import GPTConfig


def converter_for_config(config: Any) -> Converter:
    """The built-in converter for a ``GPTConfig`` or its dict, by ``architecture``.

    A dict without ``architecture`` is nanoGPT's GPT-2 layout only when its keys are ``GPTConfig``
    fields (nanoGPT's ``ckpt.pt`` ``model_args``, Karpathy's seven among them): taking any dict for
    one sent a custom architecture's snapshot config (``d_model``, ``n_layers``, ...) to
    ``GPTConfig.from_dict``, whose unknown-field error never named ``converter=``.

    Raises:
        ValueError: for a config no built-in converter is known for, naming its keys (or its
            ``architecture``) and the registered converters to pass as ``converter=``.
    """
    available = ", ".join(repr(name) for name in available_converters())
    if isinstance(config, Mapping) and "architecture" not in config:
        unknown = sorted(set(config) - _GPTCONFIG_FIELDS, key=str)
        if unknown:
            fork = ("; if it is a nanoGPT fork's model_args (it has n_layer, n_head and n_embd), drop the keys GPTConfig "
                    "lacks, or load its ckpt.pt with load_nanogpt_checkpoint, which ignores them"
                    if {"n_layer", "n_head", "n_embd"} <= set(config) else "")
            raise ValueError(f"cannot infer the converter from a config with keys {sorted(config, key=str)}: it has no "
                             f"'architecture' and {unknown} are not nanoGPT GPTConfig fields; pass converter=... "
                             f"(the one whose model_config made it; registered: {available}){fork}")
        return get_converter("nanogpt")
    arch = config.get("architecture") if isinstance(config, Mapping) else getattr(config, "architecture", None)
    if arch == "gpt2":
        return get_converter("nanogpt")
    if arch == "modern":
        return get_converter("nanogpt-modern")
    raise ValueError(f"cannot infer a converter for architecture={arch!r}; pass converter=... (registered: {available})")


_GPTCONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(GPTConfig))
"""The keys of a nanoGPT config dict (`converter_for_config`)."""


def to_hooked_transformer(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    config: Any | None = None,
    *,
    converter: str | Converter | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Converts a live model, or a state dict plus its config, into a new ``HookedTransformer``.

    Args:
        model_or_state_dict: A module (``torch.compile``/DDP wrappers are unwrapped; parametrized weights
            are read as their parametrizations compute them, `effective_state_dict`) or a state dict
            (``_orig_mod.``/``module.`` prefixes are stripped, weights pruned by ``torch.nn.utils.prune``
            read as ``X.weight_orig * X.weight_mask``; the dict is never mutated).
        config: For a state dict: the model config (a ``GPTConfig``, its dict, or whatever the
            converter's ``model_config`` produces). Refused for a module, whose config the converter
            reads off the module (``model_config``).
        converter: A registered converter name or instance; inferred when omitted.
        device: Device of the result; defaults to the weights' device.
        dtype: Parameter dtype of the result (weights in bf16 are converted).

    Returns:
        A ``HookedTransformer`` in eval mode with a copy of the weights and no weight processing.

    Raises:
        ConversionError: naming missing/unexpected keys or wrong shapes.
        ValueError: when no converter can be found: for a state dict, a ``config`` that is no nanoGPT
            ``GPTConfig`` (or its dict) without ``converter=`` (`converter_for_config`).
        TypeError: for a ``config`` with a module (a converter name passed as the second positional
            argument, ``to_hooked_transformer(model, "my-arch")``, would otherwise be dropped and the
            converter inferred: pass ``converter=`` by keyword).
    """
    if isinstance(model_or_state_dict, nn.Module):
        if config is not None:
            hint = (f"; to choose the converter pass converter={config!r} by keyword"
                    if isinstance(config, (str, Converter)) else "")
            raise TypeError(f"to_hooked_transformer: config is for a state dict; a module's config is read off the "
                            f"module by its converter (model_config), so config={_short(config)} would be ignored{hint}")
        inner = unwrap_module(model_or_state_dict)
        conv = get_converter(converter) if converter is not None else infer_converter(inner)
        model_config = conv.model_config(inner)
        state_dict: Mapping[str, Tensor] = effective_state_dict(inner)  # parametrized weights evaluated
    else:
        if config is None:
            raise ValueError("config is required when converting a state dict")
        conv = get_converter(converter) if converter is not None else converter_for_config(config)
        model_config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        state_dict = model_or_state_dict
    return build_hooked_transformer(conv, model_config, state_dict, device=device, dtype=dtype)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
