"""Converters: logit parity, key/shape errors, the registry, a user's own architecture, end to end.

Parity is checked on weights scrambled to a useful scale (:func:`scramble`): with nanoGPT's init
(std 0.02) attention is almost uniform, and a swapped ``W_Q``/``W_K`` moves the logits of a tiny
model by only ~3e-4, barely past the 1e-4 tolerance; scrambled, by ~3.
"""

from __future__ import annotations

import functools
import math
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.testing import assert_close
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lens_callback import LensCallback
from lens_callback.callback import PARITY_SEED_OFFSET
from lens_callback.convert import (
    ConversionError,
    Converter,
    ModernNanoGPTConverter,
    NanoGPTConverter,
    NotLogitsError,
    available_converters,
    build_hooked_transformer,
    check_parity,
    convert,
    converter_for_config,
    copy_weights,
    get_converter,
    infer_converter,
    register_converter,
    to_hooked_transformer,
    unregister_converter,
)
from nanogpt_model import GPT, GPTConfig, NanoGPTModule, TextDataModule
from conftest import readme_block, readme_commands

ATOL = 1e-4
PER_BACKEND_FP32_PRECISION = hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")  # torch >= 2.9
REPO = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------
@torch.no_grad()
def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights at a scale where mapping mistakes show: matrices ~ 1/sqrt(fan_in), norm gains
    ~ 1 +- 0.2, biases ~ 0.2. Uses a private generator (the global RNG is left alone)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() >= 2:
            p.copy_(noise / p.shape[-1] ** 0.5)
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.2 * noise)
    return model.eval()


def make_gpt(seed: int = 0, **overrides: Any) -> GPT:
    fields: dict[str, Any] = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, bias=True)
    if overrides.get("architecture") == "modern":
        fields["bias"] = False
    fields.update(overrides)
    return scramble(GPT(GPTConfig(**fields)), seed)


def tokens_for(vocab_size: int, length: int, batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def gpt_logits(model: GPT, idx: Tensor) -> Tensor:
    with torch.no_grad():
        return model(idx, all_positions=True)[0]


def assert_parity(hooked: HookedTransformer, model: GPT, atol: float = ATOL) -> None:
    idx = tokens_for(model.config.vocab_size, model.config.block_size)
    with torch.no_grad():
        got = hooked(idx)
    assert_close(got, gpt_logits(model, idx).float(), atol=atol, rtol=0)


# -- parity of the built-in converters -------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(bias=True, tie_weights=True),
        dict(bias=False, tie_weights=True),
        dict(bias=True, tie_weights=False),
        dict(bias=False, tie_weights=False),
        dict(n_layer=1, n_head=1, n_embd=8, vocab_size=11, block_size=5),
        dict(n_layer=3, n_head=4, n_embd=32, vocab_size=50, block_size=24, mlp_hidden=40, norm_eps=1e-6),
        dict(architecture="modern", tie_weights=True),
        dict(architecture="modern", tie_weights=False),
        dict(architecture="modern", n_layer=3, n_head=4, n_embd=32, mlp_hidden=48, rotary_base=500.0),
    ],
    ids=["bias-tied", "nobias-tied", "bias-untied", "nobias-untied", "1L-1H-8d", "3L-4H-32d",
         "modern-tied", "modern-untied", "modern-3L-4H-32d"],
)
def test_to_hooked_transformer_matches_gpt_logits(overrides: dict[str, Any]) -> None:
    model = make_gpt(**overrides)
    hooked = to_hooked_transformer(model)
    assert_parity(hooked, model)
    modern = model.config.architecture == "modern"
    # no weight processing: the norms are the model's own, not folded ("LNPre") or centred away
    assert hooked.cfg.normalization_type == ("RMS" if modern else "LN")
    assert hooked.cfg.positional_embedding_type == ("rotary" if modern else "standard")
    assert not hooked.training
    assert all(p.dtype == torch.float32 for p in hooked.parameters())


def test_hooked_config_of_the_modern_converter() -> None:
    cfg = get_converter("nanogpt-modern").hooked_config(make_gpt(architecture="modern").config.to_dict())
    assert (cfg.gated_mlp, cfg.act_fn, cfg.rotary_adjacent_pairs, cfg.rotary_dim) == (True, "silu", False, 8)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_prefixed_state_dict_converts_and_is_not_mutated(prefix: str) -> None:
    model = make_gpt(bias=True, tie_weights=False)
    source = {prefix + k: v for k, v in model.state_dict().items()}
    before = [(k, v, v.data_ptr(), v.clone()) for k, v in source.items()]
    hooked = to_hooked_transformer(source, model.config)  # a GPTConfig
    assert_parity(hooked, model)
    assert_parity(to_hooked_transformer(source, model.config.to_dict()), model)  # or its dict
    assert list(source) == [k for k, *_ in before]
    for key, tensor, ptr, values in before:
        assert source[key] is tensor and tensor.data_ptr() == ptr, key
        assert torch.equal(tensor, values), key


def test_hooked_transformer_does_not_share_storage_with_the_model() -> None:
    model = make_gpt(bias=True)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    hooked = to_hooked_transformer(model)
    model_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not model_ptrs & {p.untyped_storage().data_ptr() for p in hooked.parameters()}
    with torch.no_grad():
        for p in hooked.parameters():
            p.add_(1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    hooked_before = {k: v.clone() for k, v in hooked.state_dict().items()}
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.mul_(2.0)
    for key, value in hooked.state_dict().items():
        assert torch.equal(value, hooked_before[key]), key


def test_conversion_leaves_the_global_rng_alone() -> None:
    model = make_gpt(architecture="modern")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    to_hooked_transformer(model)
    to_hooked_transformer(model.state_dict(), model.config)
    check_parity(model)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("architecture", ["gpt2", "modern"])
def test_bf16_weights_convert_to_the_upcast_model(architecture: str) -> None:
    model_bf16 = make_gpt(architecture=architecture, tie_weights=False).to(torch.bfloat16)
    # the bf16 weights in a float32 model (not model_bf16.float(): .to(bf16) also rounded the
    # non-persistent rotary tables, and upcasting does not restore them)
    upcast = GPT(model_bf16.config).eval()
    upcast.load_state_dict({k: v.float() for k, v in model_bf16.state_dict().items()})
    hooked = to_hooked_transformer(model_bf16)  # dtype=float32 by default
    reference = to_hooked_transformer(upcast)
    for (name, got), (_, want) in zip(hooked.state_dict().items(), reference.state_dict().items()):
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert_parity(hooked, upcast)
    # kept in bf16 it is the same bf16 numbers, and close to the bf16 model's own forward
    hooked_bf16 = to_hooked_transformer(model_bf16, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in hooked_bf16.parameters())
    assert torch.equal(hooked_bf16.blocks[0].mlp.W_in, model_bf16.transformer.h[0].mlp.c_fc.weight.T)
    idx = tokens_for(64, 16)
    with torch.no_grad():
        assert_close(hooked_bf16(idx).float(), gpt_logits(model_bf16, idx).float(), atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_torch_compiled_model_and_its_state_dict() -> None:
    model = make_gpt(bias=False, tie_weights=True)
    compiled = torch.compile(model, backend="eager")
    idx = tokens_for(64, 16)
    with torch.no_grad():
        expected = compiled(idx, all_positions=True)[0]  # really traced by dynamo
    state_dict = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state_dict)
    for hooked in (to_hooked_transformer(compiled), to_hooked_transformer(state_dict, model.config)):
        with torch.no_grad():
            assert_close(hooked(idx), expected, atol=ATOL, rtol=0)


def test_check_parity_runs_a_compiled_model_eagerly_whatever_its_tolerance() -> None:
    """``check_parity(torch.compile(model))`` ran the source eagerly only where it watched it for half precision: with
    half-precision parameters or an ``rtol`` given, it compiled the user's model (minutes at size on a GPU) for a
    graph of eval mode and hooks that training could not reuse. The callback's check always runs it eagerly."""
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    for dtype, tolerance in ((torch.float32, {}), (torch.float32, {"rtol": 1e-3}), (torch.bfloat16, {})):
        compiled = torch.compile(make_gpt().to(dtype), backend=counting)
        assert check_parity(compiled, "nanogpt", **tolerance).ok
        assert not graphs, (dtype, tolerance)
    compiled(tokens_for(64, 16))  # the backend does count a compilation
    assert graphs


# -- errors name what is wrong -----------------------------------------------------------------------
def test_missing_key_is_named() -> None:
    model = make_gpt()
    source = dict(model.state_dict())
    del source["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(ConversionError, match=r"missing keys: transformer\.h\.1\.mlp\.c_fc\.weight"):
        to_hooked_transformer(source, model.config)


def test_tied_model_may_store_one_of_its_two_names_but_not_neither() -> None:
    model = make_gpt(tie_weights=True)
    source = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert_parity(to_hooked_transformer(source, model.config), model)
    del source["transformer.wte.weight"]
    with pytest.raises(ConversionError, match=r"missing keys: transformer\.wte\.weight and lm_head\.weight"):
        to_hooked_transformer(source, model.config)


def test_a_state_dict_saved_mid_pruning_converts_to_the_pruned_weights() -> None:
    """torch.nn.utils.prune (Lightning's ModelPruning) stores ``X.weight`` as ``X.weight_orig`` and
    ``X.weight_mask``: such a state dict failed with "missing keys" (pruning review). Pruning one of two
    tied weights unties them in effect: the other keeps the weights as they are."""
    from torch.nn.utils import prune

    model = make_gpt(tie_weights=True)
    prune.l1_unstructured(model.lm_head, "weight", amount=0.3)  # tied: wte keeps the unpruned matrix
    prune.random_unstructured(model.transformer.h[0].attn.c_attn, "weight", amount=0.5)
    prune.l1_unstructured(model.transformer.h[1].ln_2, "bias", amount=0.5)
    source = model.state_dict()
    assert {"lm_head.weight_orig", "lm_head.weight_mask", "transformer.wte.weight"} <= set(source)
    before = {k: v.clone() for k, v in source.items()}
    hooked = to_hooked_transformer(source, model.config)
    assert_parity(hooked, model)  # the model's forward applies the masks
    assert torch.equal(hooked.unembed.W_U, (model.lm_head.weight_orig * model.lm_head.weight_mask).T)
    assert torch.equal(hooked.embed.W_E, model.transformer.wte.weight)
    assert source.keys() == before.keys() and all(torch.equal(source[k], v) for k, v in before.items())
    assert_parity(to_hooked_transformer(model), model)  # the module itself too


class _Halved(nn.Module):
    """A custom parametrization: the weight the module computes with is half its original."""

    def forward(self, weight: Tensor) -> Tensor:
        return 0.5 * weight


def test_parametrized_weights_convert_to_the_weights_the_model_computes_with(recwarn: pytest.WarningsRecorder) -> None:
    """torch.nn.utils.parametrize keeps ``X.parametrizations.weight.original`` (``original0``/``original1``
    for weight_norm) in the state dict, not ``X.weight``: the callback refused the model at setup and
    to_hooked_transformer failed (pruning review). Both read the weights the model computes with, and
    evaluating them changes nothing of the model (spectral_norm in training mode would update its
    power-iteration buffers)."""
    from torch.nn.utils import parametrizations, parametrize

    model = make_gpt(tie_weights=True)
    parametrizations.weight_norm(model.transformer.h[0].mlp.c_fc)
    parametrizations.spectral_norm(model.transformer.h[1].attn.c_proj)
    parametrize.register_parametrization(model.lm_head, "weight", _Halved())  # tied: wte stays as it is
    with torch.no_grad():  # a norm gain of its own, so that the weight is not the one registered
        model.transformer.h[0].mlp.c_fc.parametrizations.weight.original0.mul_(1.5)
    model.train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flags = {name: m.training for name, m in model.named_modules()}
    grad = torch.is_grad_enabled()
    idx = tokens_for(model.config.vocab_size, model.config.block_size)

    hooked = to_hooked_transformer(model)
    model.eval()  # spectral_norm's eval-mode weight (no power iteration) is the one read
    assert_parity(hooked, model)
    expected = gpt_logits(model, idx)
    model.train()

    # the callback: checked at attach (with its parity check, on perturbed originals), refreshed live
    cb = LensCallback(probes=["induction"], repeat_length=4, repeat_batch=2, text_len=16, text_batch=2)
    cb.attach(model)
    assert not [w for w in recwarn if "parity" in str(w.message)], [str(w.message) for w in recwarn]

    from lens_callback.convert import effective_state_dict

    effective = effective_state_dict(model)
    assert not any("parametrizations" in k for k in effective)
    assert torch.equal(effective["lm_head.weight"], 0.5 * effective["transformer.wte.weight"])
    # the same function without parametrizations (untied: the head is no longer the embedding)
    equivalent = GPT(GPTConfig(**{**model.config.to_dict(), "tie_weights": False})).eval()
    equivalent.load_state_dict(effective)
    assert_close(gpt_logits(equivalent, idx), expected, atol=ATOL, rtol=0)

    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.parametrizations.weight.original0.mul_(2.0)
    cb.probe_step(None, 1, effective_state_dict(model))
    assert dict(cb.errors) == {}
    model.eval()
    with torch.no_grad():
        assert_close(cb._hooked(idx), gpt_logits(model, idx), atol=ATOL, rtol=0)
    model.train()
    # a hand-written loop's model.state_dict() holds the originals: the fault says what to pass
    with pytest.warns(UserWarning, match=r"pass lens_callback\.convert\.effective_state_dict\(model\)"):
        cb.probe_step(None, 2, model.state_dict())

    # nothing of the model changed: its buffers (spectral_norm's _u and _v among them), modes, grad mode
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), key
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert torch.is_grad_enabled() == grad


def test_an_untied_state_dict_without_lm_head_is_refused() -> None:
    """An untied model's lm_head is its own weight: a state dict lacking it must not convert with the embedding."""
    model = make_gpt(tie_weights=False)
    source = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ConversionError, match=r"missing keys: lm_head\.weight"):
        to_hooked_transformer(source, model.config)


def test_a_model_args_dict_without_architecture_converts_as_gpt2() -> None:
    """A plain nanoGPT model_args dict (no 'architecture' key) is the GPT-2 layout, as nanoGPT's ckpt.pt has it."""
    model = make_gpt()
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=True, vocab_size=64, dropout=0.0)
    assert_parity(to_hooked_transformer(model.state_dict(), args), model)



def test_a_custom_config_without_a_converter_names_converter_not_gptconfig_fields() -> None:
    """Any dict without 'architecture' was taken for nanoGPT's: a custom snapshot's config gave "unknown
    GPTConfig field(s) [...]", which never named converter= (review). Only GPTConfig fields mean nanoGPT."""
    model = scramble(ToyLM())
    config = ToyConverter().model_config(model)  # d_model, n_ctx, n_heads, n_layers, vocab_size
    with pytest.raises(ValueError, match=r"cannot infer the converter from a config with keys \['d_model', 'n_ctx', "
                                         r"'n_heads', 'n_layers', 'vocab_size'\].*\['d_model', 'n_ctx', 'n_heads', "
                                         r"'n_layers'\] are not nanoGPT GPTConfig fields; pass converter=\.\.\. .*"
                                         r"registered: .*'nanogpt-modern'"):
        to_hooked_transformer(model.state_dict(), config)
    hooked = to_hooked_transformer(model.state_dict(), config, converter=ToyConverter())
    idx = tokens_for(48, 16)
    with torch.no_grad():
        assert_close(hooked(idx), model(idx), atol=ATOL, rtol=0)
    karpathy = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=True, vocab_size=64, dropout=0.0)
    assert converter_for_config(karpathy).name == "nanogpt"  # nanoGPT's own keys: as before
    # a fork's model_args with a key of its own: converter= would not help, the message says what does (diff review)
    with pytest.raises(ValueError, match=r"\['flash'\] are not nanoGPT GPTConfig fields.*drop the keys GPTConfig "
                                         r"lacks, or load its ckpt.pt with load_nanogpt_checkpoint"):
        converter_for_config({**karpathy, "flash": True})
    assert converter_for_config(GPTConfig(architecture="modern", bias=False).to_dict()).name == "nanogpt-modern"


def test_hook_k_is_nanogpts_key_projection_bias_included() -> None:
    """hook_k (and so attention scores) carry the key bias, not the query's: logits cannot show this mistake."""
    model = make_gpt(bias=True, n_layer=1)
    hooked = to_hooked_transformer(model)
    idx = tokens_for(64, 8)
    C = model.config.n_embd
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        _, cache = hooked.run_with_cache(idx)
        ln = model.transformer.h[0].ln_1(model.transformer.wte(idx) + model.transformer.wpe(torch.arange(8)))
        k = attn.c_attn(ln).split(C, dim=2)[1]
    assert_close(cache["blocks.0.attn.hook_k"].flatten(2), k, atol=ATOL, rtol=0)
    assert_close(hooked.blocks[0].attn.b_K, attn.c_attn.bias[C:2 * C].view(2, C // 2), atol=0, rtol=0)


def test_unexpected_key_is_named() -> None:
    model = make_gpt(architecture="modern")
    source = {**model.state_dict(), "transformer.h.0.attn.rel_bias": torch.zeros(3)}
    with pytest.raises(ConversionError, match=r"unexpected keys: transformer\.h\.0\.attn\.rel_bias"):
        to_hooked_transformer(source, model.config)


@pytest.mark.parametrize(
    "key, shape, expected",
    [
        ("transformer.h.0.attn.c_attn.weight", (48, 17), (48, 16)),
        ("transformer.h.1.attn.c_proj.weight", (16, 17), (16, 16)),
        ("transformer.h.0.mlp.c_fc.weight", (16, 64), (64, 16)),
        ("transformer.h.0.attn.c_attn.bias", (47,), (48,)),
    ],
)
def test_wrong_shaped_source_tensor_names_key_and_both_shapes(key: str, shape: tuple[int, ...],
                                                              expected: tuple[int, ...]) -> None:
    model = make_gpt(bias=True)
    source = {**model.state_dict(), key: torch.zeros(shape)}
    with pytest.raises(ConversionError) as info:
        to_hooked_transformer(source, model.config)
    assert f"{key}: got {shape}, expected {expected}" in str(info.value)


class _TransposedWIn(NanoGPTConverter):
    """Forgets that nn.Linear stores (out, in): W_in comes out (d_mlp, d_model)."""

    name = "test-transposed-w-in"

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(model_config, state_dict)
        out["blocks.0.mlp.W_in"] = state_dict["transformer.h.0.mlp.c_fc.weight"]
        return out


class _ForgetsBias(NanoGPTConverter):
    name = "test-forgets-bias"

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(model_config, state_dict)
        del out["blocks.1.mlp.b_out"]
        return out


def test_converter_output_with_wrong_shape_names_weight_and_both_shapes() -> None:
    model = make_gpt()
    with pytest.raises(ConversionError, match=r"blocks\.0\.mlp\.W_in: got \(64, 16\), expected \(16, 64\)"):
        to_hooked_transformer(model, converter=_TransposedWIn())


def test_converter_missing_an_output_weight_names_it() -> None:
    model = make_gpt()
    with pytest.raises(ConversionError, match=r"misses HookedTransformer weights: blocks\.1\.mlp\.b_out"):
        convert(_ForgetsBias(), model.config.to_dict(), model.state_dict())


class _ForgetsAField(ModernNanoGPTConverter):
    """A modern (rotary, RMSNorm, SwiGLU) converter whose ``hooked_config`` leaves out fields: TransformerLens's
    defaults then ask for other weights than the converter makes."""

    name = "test-forgets-a-field"

    def __init__(self, *forgotten: str) -> None:
        self.forgotten = forgotten

    def hooked_config(self, model_config: Mapping[str, Any]) -> HookedTransformerConfig:
        fields = super().hooked_config(model_config).to_dict()
        kept = ("n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab", "act_fn", "gated_mlp",
                "normalization_type", "positional_embedding_type", "rotary_dim", "rotary_adjacent_pairs")
        return HookedTransformerConfig(**{k: fields[k] for k in kept if k not in self.forgotten})


@pytest.mark.parametrize(("forgotten", "message"), [
    (("positional_embedding_type", "rotary_dim", "rotary_adjacent_pairs"),
     r"misses HookedTransformer weights: pos_embed\.W_pos \(.*positional_embedding_type='standard'.*"
     r"a rotary model sets positional_embedding_type='rotary'"),
    (("normalization_type",), r"misses HookedTransformer weights: blocks\.0\.ln1\.b.* \(.*normalization_type='LN'.*"
                              r"an RMSNorm model sets normalization_type='RMS'"),
    (("gated_mlp",), r"produced unknown weights: blocks\.0\.mlp\.W_gate.* \(.*set gated_mlp=True"),
])
def test_weights_a_forgotten_config_field_asks_for_name_the_field(forgotten: tuple[str, ...], message: str) -> None:
    """A converter that forgets a rotary, RMSNorm or gated-MLP setting was told only of the weights the default
    config wants, "misses HookedTransformer weights: pos_embed.W_pos", which reads as a weight to add
    (journey review): the message names the setting."""
    model = make_gpt(architecture="modern")
    assert to_hooked_transformer(model, converter=_ForgetsAField()).cfg.positional_embedding_type == "rotary"
    with pytest.raises(ConversionError, match=message):
        to_hooked_transformer(model, converter=_ForgetsAField(*forgotten))


class _KeepsWPos(ModernNanoGPTConverter):
    """The README's example converter adapted to rotary positions, its ``pos_embed.W_pos`` kept as zeros."""

    name = "test-keeps-w-pos"

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        c = self.config(model_config)
        out = super().convert_weights(model_config, state_dict)
        return {**out, "pos_embed.W_pos": torch.zeros(c.block_size, c.n_embd)}


def test_a_position_embedding_made_for_a_rotary_config_is_named_as_one_to_leave_out() -> None:
    with pytest.raises(ConversionError, match=r"produced unknown weights: pos_embed\.W_pos \(a rotary config has no "
                                              r"position embedding weight: leave pos_embed\.W_pos out\)"):
        to_hooked_transformer(make_gpt(architecture="modern"), converter=_KeepsWPos())


def test_wrong_architecture_for_the_converter_is_refused() -> None:
    model = make_gpt(architecture="modern")
    with pytest.raises(ValueError, match=r"'nanogpt' handles architecture='gpt2', got 'modern'"):
        to_hooked_transformer(model, converter="nanogpt")



def test_a_config_given_with_a_module_is_refused_not_ignored() -> None:
    """A converter name passed second, ``to_hooked_transformer(model, "nanogpt-modern")``, went into the
    ``config`` argument, which a module ignored: the converter was inferred instead, silently (README
    review). It is refused, naming the keyword; so is a config, which the converter reads off the module."""
    model = make_gpt()
    with pytest.raises(TypeError, match=r"config='nanogpt-modern' would be ignored; to choose the converter pass "
                                        r"converter='nanogpt-modern' by keyword"):
        to_hooked_transformer(model, "nanogpt-modern")
    with pytest.raises(TypeError, match=r"config is for a state dict.*would be ignored$"):
        to_hooked_transformer(model, model.config)
    assert_parity(to_hooked_transformer(model.state_dict(), model.config), model)  # the state-dict form takes it

# -- registry --------------------------------------------------------------------------------------
def test_builtins_are_registered_and_inferred() -> None:
    assert {"nanogpt", "nanogpt-modern"} <= set(available_converters())
    assert isinstance(get_converter("nanogpt-modern"), ModernNanoGPTConverter)
    assert infer_converter(make_gpt(architecture="modern")).name == "nanogpt-modern"
    assert infer_converter(make_gpt()).name == "nanogpt"
    assert infer_converter(torch.compile(make_gpt(architecture="modern"))).name == "nanogpt-modern"


def test_duplicate_registration_raises_unless_overwrite() -> None:
    class Dup(_ForgetsBias):
        name = "test-dup"

    first, second = Dup(), Dup()
    register_converter(first)
    try:
        with pytest.raises(ValueError, match=r"'test-dup' is already registered.*overwrite=True"):
            register_converter(second)
        assert get_converter("test-dup") is first
        register_converter(second, overwrite=True)
        assert get_converter("test-dup") is second
        with pytest.raises(ValueError, match=r"'nanogpt' is already registered"):
            register_converter(type("Impostor", (NanoGPTConverter,), {}))
    finally:
        unregister_converter("test-dup")
    assert "test-dup" not in available_converters()
    assert type(get_converter("nanogpt")) is NanoGPTConverter


def test_unregister_converter_takes_the_class_or_instance_it_was_registered_with() -> None:
    """``unregister_converter(MyConv)`` was taken as a name nothing is registered under and removed
    nothing, silently (API review): a class or instance removes its own registration."""

    class Gone(_ForgetsBias):
        name = "test-gone"

    for handle in (Gone, None):
        instance = register_converter(Gone())
        unregister_converter(handle if handle is not None else instance)
        assert "test-gone" not in available_converters()
    unregister_converter(Gone)  # not registered: nothing to do, as for a name
    with pytest.raises(ValueError, match=r"'nanogpt' was registered by NanoGPTConverter, not Impostor; pass the name"):
        unregister_converter(type("Impostor", (NanoGPTConverter,), {}))
    with pytest.raises(TypeError, match="takes a converter's name, class or instance, got 3"):
        unregister_converter(3)
    assert type(get_converter("nanogpt")) is NanoGPTConverter


def test_unknown_converter_lists_the_available_ones() -> None:
    """And says how one's own gets there: a script that named its converter without importing the module that
    registers it was told the built-in names only (journey review)."""
    hint = r"\] \(a converter of your own is registered when the module that defines it.* is imported: import it first\)"
    with pytest.raises(ValueError, match=r"unknown converter 'nope'; available: .*'nanogpt'.*'nanogpt-modern'" + hint):
        get_converter("nope")
    with pytest.raises(ValueError, match=r"unknown converter 'nope'; available: .*'nanogpt-modern'" + hint):
        LensCallback(converter="nope")
    with pytest.raises(ValueError, match=r"unknown converter 'nope'; available: .*'nanogpt-modern'" + hint):
        check_parity(make_gpt(), "nope")
    with pytest.raises(ValueError, match=r"no registered converter matches a Linear.*'nanogpt'"):
        infer_converter(nn.Linear(2, 2))


# -- a user's own architecture, registered from outside the package ---------------------------------
class ToyAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class ToyFFN(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))  # exact (erf) GELU


class ToyBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d_model), ToyAttention(d_model, n_heads)
        self.norm2, self.ffn = nn.LayerNorm(d_model), ToyFFN(d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class ToyBackbone(nn.Module):
    def __init__(self, vocab_size: int, n_ctx: int, d_model: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab_size, d_model), nn.Embedding(n_ctx, d_model)
        self.layers = nn.ModuleList([ToyBlock(d_model, n_heads) for _ in range(n_layers)])
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)


class ToyLM(nn.Module):
    """A nanoGPT variant with its own names: ``backbone.layers.{i}.attn.qkv``, ``head``, ..."""

    def __init__(self, vocab_size: int = 48, n_ctx: int = 16, d_model: int = 32, n_layers: int = 2, n_heads: int = 4) -> None:
        super().__init__()
        self.vocab_size, self.n_ctx, self.d_model, self.n_heads = vocab_size, n_ctx, d_model, n_heads
        self.backbone = ToyBackbone(vocab_size, n_ctx, d_model, n_layers, n_heads)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.backbone(idx))  # (B, T, vocab)


class ToyConverter(Converter):
    """What a user writes: the README's worked example ("Converting a custom architecture") plus the optional
    ``expected_keys`` and ``matches``, applied to :class:`ToyLM`."""

    name = "toy"
    LAYER_KEYS = [f"{m}.{p}" for m in ("norm1", "norm2", "attn.qkv", "attn.out", "ffn.up", "ffn.down")
                  for p in ("weight", "bias")]

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        return dict(vocab_size=model.vocab_size, n_ctx=model.n_ctx, d_model=model.d_model,
                    n_layers=len(model.backbone.layers), n_heads=model.n_heads)

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ToyLM)

    def expected_keys(self, c: Mapping[str, Any]) -> set[str]:
        top = {"backbone.tok_emb.weight", "backbone.pos_emb.weight", "backbone.final_norm.weight",
               "backbone.final_norm.bias", "head.weight"}
        return top | {f"backbone.layers.{i}.{k}" for i in range(c["n_layers"]) for k in self.LAYER_KEYS}

    def hooked_config(self, c: Mapping[str, Any]) -> HookedTransformerConfig:
        return HookedTransformerConfig(
            n_layers=c["n_layers"], d_model=c["d_model"], n_ctx=c["n_ctx"], n_heads=c["n_heads"],
            d_head=c["d_model"] // c["n_heads"], d_mlp=4 * c["d_model"], d_vocab=c["vocab_size"],
            act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
            default_prepend_bos=False,
        )

    def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        nh, d = c["n_heads"], c["d_model"]
        out = {"embed.W_E": sd["backbone.tok_emb.weight"], "pos_embed.W_pos": sd["backbone.pos_emb.weight"],
               "ln_final.w": sd["backbone.final_norm.weight"], "ln_final.b": sd["backbone.final_norm.bias"],
               "unembed.W_U": sd["head.weight"].T, "unembed.b_U": sd["head.weight"].new_zeros(c["vocab_size"])}
        for i in range(c["n_layers"]):
            s, t = f"backbone.layers.{i}", f"blocks.{i}"
            for n, m in (("ln1", "norm1"), ("ln2", "norm2")):
                out[f"{t}.{n}.w"], out[f"{t}.{n}.b"] = sd[f"{s}.{m}.weight"], sd[f"{s}.{m}.bias"]
            ws, bs = sd[f"{s}.attn.qkv.weight"].chunk(3), sd[f"{s}.attn.qkv.bias"].chunk(3)  # (d, d), (d,)
            for x, w, b in zip("QKV", ws, bs):
                out[f"{t}.attn.W_{x}"] = w.view(nh, -1, d).transpose(1, 2)  # (nh, d, hs)
                out[f"{t}.attn.b_{x}"] = b.view(nh, -1)
            out[f"{t}.attn.W_O"] = sd[f"{s}.attn.out.weight"].T.reshape(nh, -1, d)  # (nh, hs, d)
            out[f"{t}.attn.b_O"] = sd[f"{s}.attn.out.bias"]
            out[f"{t}.mlp.W_in"], out[f"{t}.mlp.b_in"] = sd[f"{s}.ffn.up.weight"].T, sd[f"{s}.ffn.up.bias"]
            out[f"{t}.mlp.W_out"], out[f"{t}.mlp.b_out"] = sd[f"{s}.ffn.down.weight"].T, sd[f"{s}.ffn.down.bias"]
        return out


def swap_query_and_key(out: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """A classic mapping mistake: W_Q and W_K exchanged (shapes agree, so only parity can tell)."""
    for i in range(n_layers):
        q, k = f"blocks.{i}.attn.W_Q", f"blocks.{i}.attn.W_K"
        out[q], out[k] = out[k], out[q]
    return out


class SwappedQK(ToyConverter):
    name = "toy-swapped-qk"

    def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return swap_query_and_key(super().convert_weights(c, sd), c["n_layers"])


@pytest.fixture
def toy_converter() -> Iterator[ToyConverter]:
    converter = ToyConverter()
    register_converter(converter)
    yield converter
    unregister_converter(converter.name)


def test_toy_converter_parity(toy_converter: ToyConverter) -> None:
    model = scramble(ToyLM())
    assert "toy" in available_converters()
    assert infer_converter(model) is toy_converter
    report = check_parity(model, "toy")
    assert report.ok and report.first_divergence is None, str(report)
    assert [s for s, _ in report.sites] == ["embed (resid_pre 0)", "block 0 (resid_post)", "block 1 (resid_post)", "logits"]
    idx = tokens_for(48, 16)
    hooked = to_hooked_transformer(model, converter="toy")
    with torch.no_grad():
        assert_close(hooked(idx), model(idx), atol=ATOL, rtol=0)
    assert hooked.cfg.normalization_type == "LN"


def test_wrong_toy_mapping_diverges_at_block_0() -> None:
    model = scramble(ToyLM())
    report = check_parity(model, SwappedQK())  # an instance need not be registered
    assert not report.ok
    assert report.first_divergence == "block 0 (resid_post)", str(report)
    assert report.sites[0] == ("embed (resid_pre 0)", 0.0)  # the embeddings were mapped right
    assert "<-- first divergence" in str(report) and "FAIL" in str(report)
    with pytest.raises(AssertionError, match="block 0"):
        report.raise_if_failed()



def _looped_toy(n_layers: int = 3) -> ToyLM:
    """A weight-shared ("looped") ToyLM: one block listed ``n_layers`` times, run that many times."""
    model = scramble(ToyLM(n_layers=n_layers))
    model.backbone.layers = nn.ModuleList([model.backbone.layers[0]] * n_layers)
    return model


def test_check_parity_compares_each_call_of_a_shared_block() -> None:
    """Each block's hook fired on every call of the shared module and kept its last call's output: a
    correct conversion was reported diverging at the embedding (5.03) though its logits agreed (review)."""
    model = _looped_toy()
    report = check_parity(model, ToyConverter(), atol=0)  # the README's converter, unchanged, maps it
    assert report.ok and report.first_divergence is None, str(report)
    assert [s for s, _ in report.sites] == ["embed (resid_pre 0)", "block 0 (resid_post)", "block 1 (resid_post)",
                                            "block 2 (resid_post)", "logits"]
    assert max(d for _, d in report.sites) < 1e-5, str(report)  # float rounding at every site
    wrong = check_parity(model, SwappedQK(), atol=0)
    assert wrong.first_divergence == "block 0 (resid_post)" and wrong.sites[0][1] == 0.0, str(wrong)


class _TwiceLooped(ToyBackbone):
    def forward(self, idx: Tensor) -> Tensor:  # the shared blocks twice over: 6 calls of 3 listed blocks
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for layer in [*self.layers, *self.layers]:
            x = layer(x)
        return self.final_norm(x)


def test_check_parity_leaves_out_the_blocks_of_a_shared_module_run_more_often_than_listed() -> None:
    model = _looped_toy()
    model.backbone.forward = _TwiceLooped.forward.__get__(model.backbone)
    report = check_parity(model, ToyConverter(), atol=0)
    assert [s for s, _ in report.sites] == ["embed (resid_pre 0)", "logits"]
    assert "3 source blocks at backbone.layers are 1 shared module(s), which ran 6 times" in report.skipped
    assert "note: the per-block sites are left out" in str(report)
    assert not report.ok  # the converter gives 3 layers to a model that runs 6: the logits show it



def test_check_parity_leaves_out_a_listed_block_the_source_forward_never_runs() -> None:
    """A block the forward skips (an early exit) raised a bare KeyError('blocks.2') from check_parity
    (parity review): its site is left out, the note says why, and the logits show the difference."""
    model = scramble(ToyLM(n_layers=3))

    def early_exit(idx: Tensor) -> Tensor:
        backbone = model.backbone
        x = backbone.tok_emb(idx) + backbone.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for layer in list(backbone.layers)[:2]:
            x = layer(x)
        return backbone.final_norm(x)

    model.backbone.forward = early_exit
    report = check_parity(model, ToyConverter(), atol=0)
    assert [s for s, _ in report.sites] == ["embed (resid_pre 0)", "block 0 (resid_post)", "block 1 (resid_post)",
                                            "logits"]
    assert "source blocks [2] at backbone.layers did not run in the source forward" in report.skipped
    assert not report.ok


class _CountsTwoLayers(ToyConverter):
    """The README's converter (no ``expected_keys``, so a block it leaves out is not refused) with a slip
    in ``model_config``: two layers for ToyLM's three."""

    name = "toy-counts-two-layers"
    expected_keys = Converter.expected_keys

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().model_config(model), "n_layers": 2}


def test_check_parity_reports_a_converters_wrong_layer_count_instead_of_asking_for_blocks() -> None:
    """The callback's parity error names a check_parity call, which then raised "found 3 source blocks but
    the converted model has 2 layers; pass blocks=...", also with the right blocks= (review)."""
    model, converter = scramble(ToyLM(n_layers=3)), _CountsTwoLayers()
    with pytest.raises(ConversionError, match=r"check_parity\(model, 'toy-counts-two-layers', seq_len=16, seed=3, atol=0\)"):
        LensCallback(converter=converter, repeat_length=8, repeat_batch=2, text_len=16, text_batch=2).attach(model)
    guessed = check_parity(model, converter, seq_len=16, seed=3, atol=0)
    given = check_parity(model, converter, seq_len=16, seed=3, atol=0, blocks="backbone.layers")
    for report in (guessed, given):  # the sites both sides have agree; the logits show the missing block
        assert [s for s, _ in report.sites] == ["embed (resid_pre 0)", "block 0 (resid_post)", "block 1 (resid_post)",
                                                "logits"]
        assert report.first_divergence == "logits" and not report.ok, str(report)
        assert "FAIL: the converter's hooked config has n_layers=2 but the model has" in str(report)
    assert given.layer_mismatch == ("the converter's hooked config has n_layers=2 but the model has 3 blocks at "
                                    "backbone.layers: check the converter's layer count (the n_layers its "
                                    "model_config gives hooked_config)")
    assert "blocks=" not in given.layer_mismatch  # the blocks were given: a path cannot fix it
    assert re.search(r"no nn.ModuleList or nn.Sequential of 2 modules; its longest nn.ModuleList, at backbone.layers, "
                     r"has 3: if those are the model's blocks, check the converter's layer count.*pass blocks=",
                     guessed.layer_mismatch)
    # a mismatch fails the report even where the logits agree (here: blocks given short of the model's)
    short = check_parity(model, ToyConverter(), atol=0, blocks=list(model.backbone.layers)[:2])
    assert short.max_logit_diff <= short.tolerance and not short.ok
    # the list's length, not the container's: it read "the model has 2 blocks at backbone.layers" (parity review)
    assert "n_layers=3 but blocks= lists 2 blocks (of backbone.layers)" in short.layer_mismatch


class _GQABlock(nn.Module):
    """Pre-norm block whose attention shares ``n_kv`` key/value heads among ``n_heads`` query heads,
    either as Llama's ``repeat_kv`` (``repeat_interleave``) or tiled (``repeat``)."""

    def __init__(self, d: int, n_heads: int, n_kv: int, tile: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.tile = n_heads, n_kv, tile
        self.ln_a, self.ln_m = nn.LayerNorm(d), nn.LayerNorm(d)
        self.wq, self.wkv, self.wo = nn.Linear(d, d), nn.Linear(d, 2 * d * n_kv // n_heads), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        hd, g = d // self.n_heads, self.n_heads // self.n_kv
        q = self.wq(self.ln_a(x)).view(b, t, self.n_heads, hd).transpose(1, 2)
        k, v = (z.view(b, t, self.n_kv, hd).transpose(1, 2) for z in self.wkv(self.ln_a(x)).chunk(2, dim=-1))
        k, v = (z.repeat(1, g, 1, 1) if self.tile else z.repeat_interleave(g, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.wo(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln_m(x))))


class _GQALM(nn.Module):
    def __init__(self, tile: bool, vocab: int = 48, ctx: int = 16, d: int = 32, n_layers: int = 2,
                 n_heads: int = 4, n_kv: int = 2) -> None:
        super().__init__()
        self.c = dict(vocab=vocab, ctx=ctx, d=d, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv)
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(_GQABlock(d, n_heads, n_kv, tile) for _ in range(n_layers))
        self.ln_out, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_out(x))


class _GQAConverter(Converter):
    """The README's grouped-query recipe; ``reorder``: its query-head order for a model that tiles."""

    name = "test-gqa"

    def __init__(self, reorder: bool = False) -> None:
        self.reorder = reorder

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        return dict(model.c)

    def hooked_config(self, c: Mapping[str, Any]) -> HookedTransformerConfig:
        return HookedTransformerConfig(
            n_layers=c["n_layers"], d_model=c["d"], n_ctx=c["ctx"], n_heads=c["n_heads"],
            n_key_value_heads=c["n_kv"], d_head=c["d"] // c["n_heads"], d_mlp=4 * c["d"], d_vocab=c["vocab"],
            act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", default_prepend_bos=False)

    def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        nh, n_kv, d = c["n_heads"], c["n_kv"], c["d"]
        hd, g = d // nh, nh // n_kv
        out = {"embed.W_E": sd["emb.weight"], "pos_embed.W_pos": sd["pos.weight"],
               "ln_final.w": sd["ln_out.weight"], "ln_final.b": sd["ln_out.bias"],
               "unembed.W_U": sd["head.weight"].T, "unembed.b_U": sd["head.weight"].new_zeros(c["vocab"])}
        order = [(j % g) * n_kv + j // g for j in range(nh)] if self.reorder else list(range(nh))
        for i in range(c["n_layers"]):
            s, t = f"blocks.{i}", f"blocks.{i}"
            out[f"{t}.ln1.w"], out[f"{t}.ln1.b"] = sd[f"{s}.ln_a.weight"], sd[f"{s}.ln_a.bias"]
            out[f"{t}.ln2.w"], out[f"{t}.ln2.b"] = sd[f"{s}.ln_m.weight"], sd[f"{s}.ln_m.bias"]
            out[f"{t}.attn.W_Q"] = sd[f"{s}.wq.weight"].view(nh, hd, d).transpose(1, 2)[order]
            out[f"{t}.attn.b_Q"] = sd[f"{s}.wq.bias"].view(nh, hd)[order]
            for x, w, b in zip("KV", sd[f"{s}.wkv.weight"].chunk(2), sd[f"{s}.wkv.bias"].chunk(2)):
                out[f"{t}.attn._W_{x}"] = w.view(n_kv, hd, d).transpose(1, 2)
                out[f"{t}.attn._b_{x}"] = b.view(n_kv, hd)
            out[f"{t}.attn.W_O"] = sd[f"{s}.wo.weight"].T.reshape(nh, hd, d)[order]
            out[f"{t}.attn.b_O"] = sd[f"{s}.wo.bias"]
            out[f"{t}.mlp.W_in"], out[f"{t}.mlp.b_in"] = sd[f"{s}.fc1.weight"].T, sd[f"{s}.fc1.bias"]
            out[f"{t}.mlp.W_out"], out[f"{t}.mlp.b_out"] = sd[f"{s}.fc2.weight"].T, sd[f"{s}.fc2.bias"]
        return out


def test_grouped_query_attention_converts_in_the_readmes_head_order() -> None:
    """README, grouped-query attention: TransformerLens's query head h reads key/value head
    h // (n_heads / n_kv); a model that tiles its key/value heads fails parity until its query heads
    are reordered as the README says."""
    interleaved, tiled = scramble(_GQALM(tile=False)), scramble(_GQALM(tile=True))
    assert check_parity(interleaved, _GQAConverter()).ok
    report = check_parity(tiled, _GQAConverter())
    assert not report.ok and report.first_divergence == "block 0 (resid_post)", str(report)
    assert check_parity(tiled, _GQAConverter(reorder=True)).ok
    assert not check_parity(interleaved, _GQAConverter(reorder=True)).ok


def test_a_mistake_inside_the_blocks_is_found_there_though_the_residual_stream_is_small() -> None:
    """At nanoGPT's initialisation the residual stream is far smaller than the logits: a wrong rotary
    base moves each block by less than ``atol`` in absolute terms, yet more than the logits' relative
    tolerance, so the report points at block 0, not at the logits."""
    from lens_callback.convert.nanogpt import ModernNanoGPTConverter

    class WrongBase(ModernNanoGPTConverter):
        name = "modern-wrong-base"

        def hooked_config(self, c: Mapping[str, Any]) -> HookedTransformerConfig:
            cfg = super().hooked_config(c)
            cfg.rotary_base = 10000
            return cfg

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=512, n_layer=2, n_head=4, n_embd=64, architecture="modern",
                          bias=False, rotary_base=9000.0))
    report = check_parity(model, WrongBase(), perturb=False, rtol=0.0)  # initialisation's weights, atol alone
    assert not report.ok and max(diff for _, diff in report.sites[:-1]) < report.atol
    assert report.first_divergence == "block 0 (resid_post)", str(report)
    assert check_parity(model, "nanogpt-modern", perturb=False).first_divergence is None
    assert check_parity(model, WrongBase(), rtol=0.0).first_divergence == "block 0 (resid_post)"


def test_check_parity_perturbs_the_weights_to_find_a_dropped_bias_and_restores_them() -> None:
    """At initialisation LayerNorm biases are zeros: a converter that drops them agrees with the model
    there. The callback's parity check (which perturbs the weights) stopped such a converter and
    pointed at check_parity, which compared the weights as they were and said OK."""
    from lens_callback.convert.nanogpt import NanoGPTConverter

    class DropsNormBiases(NanoGPTConverter):
        name = "drops-norm-biases"

        def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
            out = super().convert_weights(c, sd)
            return {k: torch.zeros_like(v) if k.endswith(("ln1.b", "ln2.b")) else v for k, v in out.items()}

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32, bias=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert check_parity(model, DropsNormBiases(), perturb=False).ok  # blind at initialisation
    report = check_parity(model, DropsNormBiases())
    assert not report.ok and report.first_divergence == "block 0 (resid_post)", str(report)
    assert check_parity(model, "nanogpt").ok
    for key, value in model.state_dict().items():  # restored bitwise, tied weights included
        assert torch.equal(value, before[key]), key
    assert model.lm_head.weight is model.transformer.wte.weight



def test_check_parity_refuses_arguments_it_would_ignore_or_misread() -> None:
    """With ``tokens=``, ``batch_size``/``seq_len`` were ignored; a NaN or negative tolerance reported a perfect
    conversion as failing at a difference of 0; float or 1-D tokens failed deep inside the model (API review)."""
    model = make_gpt()
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for keywords, match in (({"seq_len": 16}, r"seq_len shape the random tokens; with tokens=.*\(2, 8\)"),
                            ({"batch_size": 5, "seq_len": 4}, "batch_size and seq_len shape the random tokens")):
        with pytest.raises(TypeError, match=match):
            check_parity(model, tokens=tokens, **keywords)
    for bad, what in ((tokens.float(), "2-D torch.float32"), (tokens[0], "1-D torch.int64"), ([[1, 2]], "list")):
        with pytest.raises(TypeError, match=f"tokens must be a \\[batch, pos\\] tensor of integer token ids, got .*{what}"):
            check_parity(model, tokens=bad)
    for keywords in ({"atol": -1.0}, {"atol": math.nan}, {"rtol": -1.0}, {"rtol": math.inf}, {"atol": True}):
        name = next(iter(keywords))
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            check_parity(model, **keywords)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        check_parity(model, batch_size=0)
    assert check_parity(model, tokens=tokens, atol=0.0).max_logit_diff < 1e-4  # atol=0 is a valid tolerance
    assert check_parity(model, batch_size=1, seq_len=8).ok
    # numpy and 0-d tensor numbers, which the rest of the API takes, pass (diff review)
    assert check_parity(model, batch_size=np.int64(1), seq_len=torch.tensor(8), atol=np.float32(1e-4),
                        rtol=torch.tensor(1e-3)).ok
    with pytest.raises(ValueError, match="atol must be a finite number >= 0, got '0.1'"):
        check_parity(model, atol="0.1")

def test_check_parity_leaves_a_pending_backward_runnable() -> None:
    """The perturbation wrote into the parameters and back: their values came back bitwise, but their
    version counters moved, so a loss computed before the check could not be backpropagated
    (observer review). Their ``data`` is now swapped and swapped back."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=16, bias=True))
    tokens = torch.randint(0, 64, (2, 16))
    _, loss = model(tokens, tokens)
    versions = {name: (p._version, p.data_ptr()) for name, p in model.named_parameters()}
    assert check_parity(model, "nanogpt").ok
    assert {name: (p._version, p.data_ptr()) for name, p in model.named_parameters()} == versions
    loss.backward()  # raised "modified by an inplace operation"
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_dropped_query_bias_is_found_on_the_perturbed_weights(seed: int) -> None:
    """A zero bias's noise was 0.5 x 0.02: a converter dropping the query bias agreed to within the
    tolerance (0.88x here, seed 0), passed the callback's check and trained on another model
    (custom-architecture review).
    Vectors now get noise of 0.5 x (rms + 0.2) (`PERTURBATION_FLOOR`)."""
    from lens_callback.convert.nanogpt import NanoGPTConverter

    class DropsQueryBias(NanoGPTConverter):
        name = "drops-query-bias"

        def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
            out = super().convert_weights(c, sd)
            return {k: torch.zeros_like(v) if k.endswith("attn.b_Q") else v for k, v in out.items()}

    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=128, vocab_size=256, n_layer=2, n_head=4, n_embd=128, bias=True))
    report = check_parity(model, DropsQueryBias())
    assert not report.ok and report.max_logit_diff > 1.5 * report.tolerance, str(report)
    correct = check_parity(model, "nanogpt")
    assert correct.ok and correct.max_logit_diff < 1e-2 * correct.tolerance, str(correct)


def test_check_parity_restores_each_modules_training_mode() -> None:
    """check_parity runs the model in eval mode, then gives each module its mode back: training goes on with dropout."""
    model = make_gpt(dropout=0.1).train()
    model.transformer.h[1].eval()  # a mix, as a user's frozen part would be
    before = {name: m.training for name, m in model.named_modules()}
    assert check_parity(model).ok
    assert {name: m.training for name, m in model.named_modules()} == before


def test_a_ddp_wrapped_model_converts(tmp_path: Path) -> None:
    """to_hooked_transformer(DDP(model)) converts the model inside, as the callback meets it under DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is unavailable")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    model = make_gpt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        hooked = to_hooked_transformer(DistributedDataParallel(model))
    finally:
        dist.destroy_process_group()
    assert_parity(hooked, model)


def test_check_parity_finds_blocks_in_a_sequential_beside_lists_of_heads() -> None:
    """Karpathy's "Let's build GPT" layout: blocks in an nn.Sequential, each attention a ModuleList of
    heads; with as many heads as layers the longest ModuleList was a list of heads."""
    from lens_callback.convert.parity import _find_blocks

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*(Block() for _ in range(3)))

    model = Model()
    assert _find_blocks(model, 3) == list(model.blocks)

def test_toy_state_dict_errors_name_the_users_keys(toy_converter: ToyConverter) -> None:
    model = ToyLM()
    c = toy_converter.model_config(model)
    source = {k: v for k, v in model.state_dict().items() if k != "backbone.layers.1.ffn.up.bias"}
    with pytest.raises(ConversionError, match=r"'toy'.*missing keys: backbone\.layers\.1\.ffn\.up\.bias"):
        convert("toy", c, source)

    class Unchecked(ToyConverter):  # no expected_keys: the converter's own KeyError is reported
        name = "toy-unchecked"

        def expected_keys(self, c: Mapping[str, Any]) -> None:
            return None

    with pytest.raises(ConversionError, match=r"'toy-unchecked'.*missing key 'backbone\.layers\.1\.ffn\.up\.bias'"):
        convert(Unchecked(), c, source)


def test_converter_method_mistakes_name_the_method_and_the_fix() -> None:
    """The slips of a first converter: a model_config key misspelt where it is read, a forgotten
    ``return``, a config returned as a dict, a state-dict key misspelt in a converter without
    ``expected_keys``. Each error names the converter, the method and what to fix."""
    model = ToyLM()

    class Unchecked(ToyConverter):
        name = "toy-unchecked"

        def expected_keys(self, c: Mapping[str, Any]) -> None:
            return None

    class ReadsNHead(Unchecked):
        def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return super().convert_weights({**c, "n_heads": c["n_head"]}, sd)

    class ConfigReadsNHead(Unchecked):
        def hooked_config(self, c: Mapping[str, Any]) -> HookedTransformerConfig:
            return super().hooked_config({**c, "n_heads": c["n_head"]})

    class ForgetsReturn(Unchecked):
        def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> Any:
            super().convert_weights(c, sd)

    class ConfigAsDict(Unchecked):
        def hooked_config(self, c: Mapping[str, Any]) -> Any:
            return vars(super().hooked_config(c))

    class MisspeltKey(Unchecked):
        def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
            renamed = {k.replace("ffn.up", "ffn.upp"): v for k, v in sd.items()}
            return super().convert_weights(c, {**sd, **renamed})

    class MisspeltSource(Unchecked):
        def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {**super().convert_weights(c, sd), "embed.W_E": sd["backbone.tok_embed.weight"]}

    c, sd = Unchecked().model_config(model), model.state_dict()
    cases = [
        (ReadsNHead(), r"'toy-unchecked'.*convert_weights.*model_config\['n_head'\].*not set.*n_heads"),
        (ConfigReadsNHead(), r"'toy-unchecked'.*hooked_config.*model_config\['n_head'\].*not set.*n_heads"),
        (ForgetsReturn(), r"'toy-unchecked'.*convert_weights.*must return a dict of tensors, got NoneType"),
        (ConfigAsDict(), r"'toy-unchecked'.*hooked_config.*must return a HookedTransformerConfig, got dict"),
        (MisspeltSource(), r"'toy-unchecked' failed on this state dict: missing key 'backbone\.tok_embed\.weight' "
                           r"\(closest present: 'backbone\.tok_emb\.weight'"),
    ]
    for converter, message in cases:
        with pytest.raises(ConversionError, match=message):
            convert(converter, c, sd)
    convert(MisspeltKey(), c, sd)  # reading keys that are there works as before
    with pytest.raises(ConversionError, match=r"model_config must be a dict.*got list"):
        convert(Unchecked(), [("n_layers", 2)], sd)


class ToyLightningModule(L.LightningModule):
    """Trains ``net`` (by default a scrambled `ToyLM`) on random sequences of its vocabulary, ``n_ctx + 1`` long."""

    def __init__(self, net: nn.Module | None = None) -> None:
        super().__init__()
        self.net = scramble(ToyLM(), seed=3).train() if net is None else net

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (seq,) = batch
        logits = self.net(seq[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        shape = (32, self.net.n_ctx + 1)
        data = torch.randint(0, self.net.vocab_size, shape, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)


@pytest.mark.filterwarnings("ignore:LensCallback found no")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_lens_callback_probes_a_custom_architecture(toy_converter: ToyConverter, tmp_path: Path) -> None:
    from lens_callback import read_metrics

    cb = LensCallback(converter="toy", model_attr="net", every_n_steps=2, log_spaced=False,
                      repeat_length=8, repeat_batch=4, text_batch=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, callbacks=[cb],
                        logger=TensorBoardLogger(tmp_path, name="toy"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(ToyLightningModule())
    assert cb.probed_steps == [0, 2, 4]
    assert dict(cb.errors) == {}
    assert all("lens/induction/max" in cb.history[s] for s in cb.probed_steps)
    logged = read_metrics(tmp_path / "toy", tags="lens/induction/max")
    assert sorted(logged["step"]) == [0, 2, 4]


# -- the modern architecture end to end ------------------------------------------------------------
@pytest.mark.slow
def test_modern_architecture_trains_snapshots_and_reloads(tmp_path: Path, tiny_text_file: Path) -> None:
    from lens_callback.snapshots import list_snapshots, load_snapshot, load_snapshot_weights

    module = NanoGPTModule(
        config=dict(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=32, bias=False,
                    architecture="modern", tie_weights=False),
        learning_rate=1e-2, min_lr=1e-3, warmup_steps=1,
    )
    data = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=4, val_batches=1)
    cb = LensCallback(every_n_steps=2, log_spaced=False, repeat_length=8, repeat_batch=4, text_batch=2,
                      snapshot_dir=str(tmp_path / "snapshots"), snapshot_every=1)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert dict(cb.errors) == {} and cb.probed_steps == [0, 2, 4]

    snapshots = list_snapshots(tmp_path / "snapshots")
    assert [s.step for s in snapshots] == [0, 2, 4]
    assert {s.converter for s in snapshots} == {"nanogpt-modern"}
    hooked = load_snapshot(snapshots[-1].path)
    assert hooked.cfg.normalization_type == "RMS"
    live = module.model.eval()
    assert_parity(hooked, live)
    # the snapshots hold the weights of their own step (training moved them)
    _, first = load_snapshot_weights(snapshots[0].path)
    assert not torch.equal(first["transformer.h.0.mlp.c_gate.weight"], live.transformer.h[0].mlp.c_gate.weight)


# -- configs/modern.yaml ---------------------------------------------------------------------------
def test_modern_config_matches_default_but_the_architecture() -> None:
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    modern = yaml.safe_load((REPO / "configs" / "modern.yaml").read_text())
    assert modern["model"]["config"].pop("architecture") == "modern"
    assert modern["trainer"]["logger"]["init_args"].pop("name") == "modern"
    default["trainer"]["logger"]["init_args"].pop("name")
    assert modern == default  # same callback block, data, schedule and sizes


def test_modern_config_instantiates_a_modern_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lens_callback.cli import build_cli

    monkeypatch.setattr(sys, "argv", ["lens-train"])  # not pytest's own arguments
    # run=False parses and instantiates without a subcommand (LightningCLI rejects "fit" then)
    cli = build_cli(["--config", str(REPO / "configs" / "modern.yaml"),
                     f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)
    model = cli.model.model
    assert isinstance(model, GPT)
    assert model.config.architecture == "modern" and model.config.bias is False
    assert "wpe" not in model.transformer and hasattr(model.transformer.h[0].mlp, "c_gate")
    assert cli.trainer.logger.name == "modern"
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, LensCallback)]
    assert len(callbacks) == 1 and callbacks[0].snapshot_dir == "auto"
    assert infer_converter(model).name == "nanogpt-modern"
    assert check_parity(scramble(model), seq_len=16).ok


def test_missing_biases_are_shared_zeros_that_stay_zero() -> None:
    """A refresh of a bias-free model makes no new zero tensors, and copying out of them never aliases."""
    gpt = GPT(GPTConfig(block_size=16, vocab_size=29, n_layer=2, n_head=2, n_embd=16, bias=False))
    converter = get_converter("nanogpt")
    config = converter.model_config(gpt)
    first = converter.convert_weights(config, gpt.state_dict())
    second = converter.convert_weights(config, gpt.state_dict())
    assert first["blocks.0.attn.b_Q"] is second["blocks.1.attn.b_K"]  # one tensor per shape
    assert first["unembed.b_U"] is second["unembed.b_U"]
    hooked = build_hooked_transformer(converter, config, gpt.state_dict())
    with torch.no_grad():
        hooked.blocks[0].attn.b_Q.add_(1.0)
        hooked.unembed.b_U.add_(1.0)
    assert not first["blocks.0.attn.b_Q"].any() and not first["unembed.b_U"].any()
    copy_weights(hooked, second)
    assert not hooked.blocks[0].attn.b_Q.any() and not hooked.unembed.b_U.any()


def test_copy_weights_puts_the_pairs_of_equal_layout_in_one_multi_tensor_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's multi-tensor copy has a fast route only for lists whose pairs share sizes and strides:
    those pairs go in one call, the transposed views in another; every parameter gets its value."""
    from lens_callback.probes import pack_attention_weights

    gpt = GPT(GPTConfig(block_size=16, vocab_size=29, n_layer=2, n_head=2, n_embd=16, bias=True))
    converter = get_converter("nanogpt")
    config = converter.model_config(gpt)
    hooked = build_hooked_transformer(converter, config, gpt.state_dict())
    pack_attention_weights(hooked)
    with torch.no_grad():
        for param in gpt.parameters():
            param.mul_(-0.5)
    weights = converter.convert_weights(config, gpt.state_dict())
    calls: list[tuple[list[Tensor], list[Tensor]]] = []
    original = torch._foreach_copy_

    def recording(params: list[Tensor], sources: list[Tensor], **kwargs: Any) -> None:
        calls.append((list(params), list(sources)))
        original(params, sources, **kwargs)

    monkeypatch.setattr(torch, "_foreach_copy_", recording)
    copy_weights(hooked, weights)
    assert len(calls) == 2
    (fast_params, fast_sources), (slow_params, slow_sources) = calls
    assert all(p.stride() == s.stride() and p.shape == s.shape for p, s in zip(fast_params, fast_sources))
    assert all(p.stride() != s.stride() for p, s in zip(slow_params, slow_sources))
    assert len(fast_params) + len(slow_params) == len(list(hooked.parameters()))
    for name, param in hooked.named_parameters():
        assert torch.equal(param, weights[name]), name


def test_a_weight_copier_lists_the_parameters_once_and_copies_as_copy_weights_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The callback's refresh: the packed model's parameters listed at construction (no module walk
    per probe step), every later set of weights copied in place, and the same list for the finite check."""
    from lens_callback.convert import WeightCopier
    from lens_callback.probes import pack_attention_weights

    gpt = GPT(GPTConfig(block_size=16, vocab_size=29, n_layer=2, n_head=2, n_embd=16, bias=True))
    converter = get_converter("nanogpt")
    config = converter.model_config(gpt)
    hooked = build_hooked_transformer(converter, config, gpt.state_dict())
    pack_attention_weights(hooked)
    copier = WeightCopier(hooked)
    before = [param.data_ptr() for param in hooked.parameters()]
    assert [p is q for p, q in zip(copier.parameters, hooked.parameters())] == [True] * len(before)
    monkeypatch.setattr(hooked, "named_parameters", lambda *a, **k: pytest.fail("walked the modules again"))
    for scale in (-0.5, 3.0):
        with torch.no_grad():
            for param in gpt.parameters():
                param.mul_(scale)
        weights = converter.convert_weights(config, gpt.state_dict())
        copier(weights)
        for param, ptr in zip(copier.parameters, before):
            assert param.data_ptr() == ptr  # in place
    monkeypatch.undo()
    for name, param in hooked.named_parameters():
        assert torch.equal(param, weights[name]), name


def test_wrapper_names_are_stripped_wherever_a_wrapper_puts_them() -> None:
    """``_orig_mod.`` of a compiled *submodule* sits mid-key; a model's own submodule may be called
    ``module`` (only a prefix on every key is a DDP wrapper's)."""
    from lens_callback.convert import strip_prefixes

    w = torch.zeros(1)
    compiled_block = {"backbone.layers.0._orig_mod.norm1.weight": w, "_orig_mod.head.weight": w}
    assert list(strip_prefixes(compiled_block)) == ["backbone.layers.0.norm1.weight", "head.weight"]
    assert list(strip_prefixes({"module.a.weight": w, "module.b.weight": w})) == ["a.weight", "b.weight"]
    own = {"module.tok_emb.weight": w, "head.weight": w}
    assert list(strip_prefixes(own)) == ["module.tok_emb.weight", "head.weight"]
    assert list(strip_prefixes({f"module.{k}": v for k, v in own.items()})) == list(own)
    # FSDP1's and activation checkpointing's wrappers, as the callback meets them under sharding
    wrapped = {"blocks.0._checkpoint_wrapped_module.attn.weight": w, "_fsdp_wrapped_module.head.weight": w}
    assert list(strip_prefixes(wrapped)) == ["blocks.0.attn.weight", "head.weight"]


def test_a_parity_report_with_nan_names_the_site() -> None:
    from lens_callback.convert import ParityReport

    nan = float("nan")
    report = ParityReport("my-arch", 1e-4, nan, [("embed (resid_pre 0)", 0.0), ("block 0", 7e-9), ("block 1", nan)])
    assert not report.ok and report.first_divergence == "block 1" and report.worst_site == "block 1"
    assert "block 1                      nan  <-- first divergence" in str(report)


# -- found by reviews: key sets, buffers, configs TransformerLens cannot run, keyword blocks, float64
def test_an_optional_key_need_not_be_listed_as_expected(toy_converter: ToyConverter) -> None:
    """``optional_keys`` alone admits a key (the README: "use optional_keys for one of two tied names")."""

    class WithOptionalHead(ToyConverter):
        name = "toy-optional-head"

        def expected_keys(self, c: Mapping[str, Any]) -> set[str]:
            return super().expected_keys(c) - {"head.weight"}

        def optional_keys(self, c: Mapping[str, Any]) -> set[str]:
            return {"head.weight"}

    model = scramble(ToyLM())
    conv = WithOptionalHead()
    cfg, weights = convert(conv, conv.model_config(model), model.state_dict())
    assert torch.equal(weights["unembed.W_U"], model.head.weight.T)


def test_a_karpathy_state_dict_with_causal_mask_buffers_converts() -> None:
    """nanoGPT without flash attention stores ``attn.bias`` masks; every conversion route drops them."""
    model = make_gpt()
    T = model.config.block_size
    source = {**model.state_dict(), **{f"transformer.h.{i}.attn.bias": torch.ones(T, T).tril().view(1, 1, T, T)
                                       for i in range(model.config.n_layer)}}
    assert_parity(to_hooked_transformer(source, model.config), model)
    assert len(source) == len(model.state_dict()) + model.config.n_layer  # input untouched


class _OddRotary(ToyConverter):
    """A config TransformerLens accepts but cannot run: rotary over an odd number of dimensions."""

    name = "toy-odd-rotary"

    def hooked_config(self, c: Mapping[str, Any]) -> HookedTransformerConfig:
        base = super().hooked_config(c)
        fields = {f: getattr(base, f) for f in ("n_layers", "d_model", "n_ctx", "n_heads", "d_head", "d_mlp",
                                                "d_vocab", "act_fn")}
        return HookedTransformerConfig(**fields, positional_embedding_type="rotary", rotary_dim=5,
                                       default_prepend_bos=False)

    def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(c, sd)
        del out["pos_embed.W_pos"]
        return out


def test_a_config_transformer_lens_cannot_run_is_refused_at_setup() -> None:
    cb = LensCallback(converter=_OddRotary(), model_attr="net", repeat_length=4, repeat_batch=2, text_batch=1)
    with pytest.raises(ConversionError, match=r"'toy-odd-rotary': TransformerLens cannot run.*rotary_dim"):
        cb.validate(ToyLM(n_heads=2))  # d_head 16: TransformerLens builds it, its forward fails
    LensCallback(repeat_length=4).validate(make_gpt())  # a runnable config passes
    # check_parity said the same with TransformerLens's bare RuntimeError (custom-architecture review)
    with pytest.raises(ConversionError, match=r"'toy-odd-rotary': TransformerLens cannot run.*rotary_dim"):
        check_parity(ToyLM(n_heads=2), _OddRotary())


class _ActFnFromConfig(ToyConverter):
    """A converter whose ``act_fn`` comes from its ``model_config`` (so a typo there, or in a snapshot's
    ``config.json``, reaches TransformerLens, which checks its fields with asserts)."""

    name = "toy-act-fn"

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().model_config(model), "act_fn": getattr(model, "act_fn", "gelu")}

    def hooked_config(self, c: Mapping[str, Any]) -> HookedTransformerConfig:
        base = super().hooked_config(c)
        base.act_fn = c["act_fn"]
        return HookedTransformerConfig(**{f: getattr(base, f) for f in (
            "n_layers", "d_model", "n_ctx", "n_heads", "d_head", "d_mlp", "d_vocab", "act_fn",
            "normalization_type", "positional_embedding_type", "default_prepend_bos")})


def test_a_field_transformer_lens_asserts_on_is_a_conversion_error_naming_the_converter(tmp_path: Path) -> None:
    model = ToyLM(n_heads=2)
    model.act_fn = "gleu"
    cb = LensCallback(converter=_ActFnFromConfig(), model_attr="net", repeat_length=4, repeat_batch=2, text_batch=1)
    # before: TransformerLens's bare AssertionError ("act_fn=gleu must be one of [...]"), no converter named
    with pytest.raises(ConversionError, match=r"'toy-act-fn': hooked_config\(model_config\) built a "
                                              r"HookedTransformerConfig that TransformerLens refuses: act_fn=gleu "
                                              r"must be one of \{'solu', ") as refused:
        cb.validate(model)
    assert "<function" not in str(refused.value)  # the accepted names, not their functions' reprs

    class SetsTheFieldAfterwards(_ActFnFromConfig):  # a valid config, then a field set on it
        name = "toy-act-fn-after"

        def hooked_config(self, c: Mapping[str, Any]) -> HookedTransformerConfig:
            cfg = super().hooked_config({**c, "act_fn": "gelu"})
            cfg.act_fn = c["act_fn"]
            return cfg

    # was a bare AssertionError from the meta skeleton's rebuilt config (extension review)
    with pytest.raises(ConversionError, match=r"'toy-act-fn-after': hooked_config\(model_config\) built a "
                                              r"HookedTransformerConfig that TransformerLens refuses: act_fn=gleu"):
        LensCallback(converter=SetsTheFieldAfterwards(), model_attr="net", repeat_length=4, repeat_batch=2,
                     text_batch=1).validate(model)
    # a snapshot whose config.json names an unknown act_fn: a SnapshotError, post hoc too
    from lens_callback.posthoc import reprobe
    from lens_callback.probes import make_probe_inputs
    from lens_callback.snapshots import SnapshotError, load_snapshot, save_snapshot

    converter = register_converter(_ActFnFromConfig())
    try:
        model.act_fn = "gelu"
        config = converter.model_config(model)
        path = save_snapshot(tmp_path, 1, converter=converter.name, model_config=config, state_dict=model.state_dict())
        load_snapshot(path)  # gelu: fine
        config_file = path / "config.json"
        config_file.write_text(config_file.read_text().replace('"act_fn": "gelu"', '"act_fn": "gleu"'))
        with pytest.raises(SnapshotError, match=r"TransformerLens refuses: act_fn=gleu"):
            load_snapshot(path)
        with pytest.raises(SnapshotError, match=r"model_config does not fit converter 'toy-act-fn'.*act_fn=gleu"):
            reprobe(path, settings={"probes": ["induction"]}, inputs=make_probe_inputs(
                torch.arange(64), None, 64, repeat_length=4, repeat_batch=2, text_len=0, text_batch_size=0, seed=0))
    finally:
        unregister_converter("toy-act-fn")


def _nanogpt_init(model: nn.Module, eps: float) -> nn.Module:
    """nanoGPT's initialisation (matrices and embeddings N(0, 0.02), zero biases, unit gains) and norms of
    ``eps``: at this scale the residual stream's variance is about 4e-4, where an eps of 1e-6 against
    TransformerLens's default 1e-5 moves every LayerNorm's output by about 1 %."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.eps = eps
    return model


def test_a_slip_the_perturbed_weights_hide_is_caught_on_the_models_own_weights() -> None:
    """The README's converter passes no eps (TransformerLens's 1e-5) for a model whose LayerNorms use
    1e-6: the perturbed weights' large activations hide it (within tolerance), the model's own weights at
    initialisation show it 3-9x past it, and the step-0 probes ran on that model (custom-conversion
    review). The callback's check now compares on both."""
    cb = LensCallback(converter=ToyConverter(), model_attr="net", repeat_length=4, repeat_batch=2, text_batch=1)
    model = _nanogpt_init(ToyLM(), eps=1e-6)
    assert check_parity(model, ToyConverter(), seed=PARITY_SEED_OFFSET, seq_len=16).ok  # perturbed: hidden
    assert not check_parity(model, ToyConverter(), seed=PARITY_SEED_OFFSET, seq_len=16, perturb=False).ok
    with pytest.raises(ConversionError, match=r"on random tokens and the model's own weights \(with noise added "
                                              r"they agree.*check_parity\(model, 'toy', seq_len=16, seed=\d+, atol=0, "
                                              r"perturb=False\)"):
        cb.attach(model)  # as on_train_start does
    cb.attach(_nanogpt_init(ToyLM(), eps=1e-5))  # the same model with TransformerLens's eps passes


def test_parity_reads_blocks_called_with_keyword_arguments(toy_converter: ToyConverter) -> None:
    class KeywordLM(ToyLM):
        def forward(self, idx: Tensor) -> Tensor:
            b = self.backbone
            x = b.tok_emb(idx) + b.pos_emb(torch.arange(idx.shape[1], device=idx.device))
            for layer in b.layers:
                x = layer(x=x)
            return self.head(b.final_norm(x))

    report = check_parity(scramble(KeywordLM()), "toy")
    assert report.ok and report.sites[0] == ("embed (resid_pre 0)", 0.0), str(report)


def test_a_float64_modern_model_converts_to_float64_accuracy() -> None:
    """The rotary tables of a float64 model are computed in float64, as TransformerLens does."""
    model = make_gpt(architecture="modern").double()
    hooked = to_hooked_transformer(model, dtype=torch.float64)
    idx = tokens_for(model.config.vocab_size, model.config.block_size)
    with torch.no_grad():
        assert_close(hooked(idx), model(idx, all_positions=True)[0], atol=1e-10, rtol=0)
    float32 = make_gpt(architecture="modern")  # float32 models keep float32 tables
    assert float32.transformer.h[0].attn.rotary_cos.dtype == torch.float32
    assert_parity(to_hooked_transformer(float32), float32)


@pytest.mark.filterwarnings("ignore:LensCallback found no")
@pytest.mark.parametrize("bias", [True, False])
def test_a_copy_of_karpathys_gpt_converts_when_the_converter_is_named(bias: bool) -> None:
    """Users train his model.py, not nanogpt_model: converter="nanogpt" takes it (by its config's fields);
    his forward's last-position logits and the probes agree with nanogpt_model.GPT of the same weights."""
    from karpathy_gpt import GPT as KarpathyGPT
    from karpathy_gpt import GPTConfig as KarpathyConfig

    torch.manual_seed(0)
    theirs = KarpathyGPT(KarpathyConfig(block_size=48, vocab_size=61, n_layer=2, n_head=2, n_embd=32, bias=bias))
    ours = GPT(GPTConfig(block_size=48, vocab_size=61, n_layer=2, n_head=2, n_embd=32, bias=bias))
    ours.load_state_dict(theirs.state_dict())
    with pytest.raises(ValueError, match="no registered converter matches a GPT"):
        infer_converter(theirs)  # inferred only for nanogpt_model.GPT: a modified copy must be named
    assert get_converter("nanogpt").model_config(theirs) == ours.config.to_dict()
    report = check_parity(theirs, "nanogpt", seq_len=48)
    assert report.ok and report.first_divergence is None, str(report)

    kwargs = dict(converter="nanogpt", every_n_steps=None, log_spaced=False, repeat_length=8, text_len=16, seed=1)
    mine, reference = LensCallback(**kwargs), LensCallback(**kwargs)
    mine.attach(theirs)  # with the parity check, through his last-position shortcut
    reference.attach(ours)
    got, expected = mine.probe_step(None, 1, theirs.state_dict()), reference.probe_step(None, 1, ours.state_dict())
    assert got is not None and mine.errors == {} and got.scalars == expected.scalars

    with pytest.raises(TypeError, match=r"copy of Karpathy's nanoGPT GPT.*Converting a custom architecture"):
        get_converter("nanogpt").model_config(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="copy of Karpathy's nanoGPT GPT"):
        get_converter("nanogpt-modern").model_config(theirs)


def test_a_changed_copy_of_karpathys_gpt_named_nanogpt_fails_the_parity_check() -> None:
    """The config's fields are all the converter reads of a copy: a changed forward is the parity check's."""
    from karpathy_gpt import GPT as KarpathyGPT
    from karpathy_gpt import GPTConfig as KarpathyConfig

    class ParallelGPT(KarpathyGPT):  # attention and MLP in parallel (GPT-J), same names and config
        def __init__(self, config: KarpathyConfig) -> None:
            super().__init__(config)
            for block in self.transformer.h:
                block.forward = lambda x, b=block: x + b.attn(b.ln_1(x)) + b.mlp(b.ln_2(x))

    model = ParallelGPT(KarpathyConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=16))
    with pytest.raises(ConversionError, match="converter 'nanogpt': the HookedTransformer's logits differ"):
        LensCallback(converter="nanogpt", every_n_steps=None, log_spaced=False, repeat_length=4,
                     text_len=16).attach(model)


class LossFirstGPT(GPT):
    """A fork whose forward returns ``(loss, logits)``, every position's logits (``loss`` None without targets)."""

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        logits, loss = super().forward(idx, targets if targets is not None else idx)  # idx: logits at every position
        return (loss if targets is not None else None), logits


class LossFirstConverter(NanoGPTConverter):
    name = "nanogpt-loss-first"

    def source_logits(self, model: nn.Module, tokens: Tensor) -> Tensor:
        return model(tokens)[1]


class NegatedMLP(LossFirstConverter):
    """The MLPs' output weights negated: a slip the key and shape checks cannot see."""

    name = "nanogpt-loss-first-negated"

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(model_config, state_dict)
        for layer in range(model_config["n_layer"]):
            out[f"blocks.{layer}.mlp.W_out"] = -out[f"blocks.{layer}.mlp.W_out"]
        return out


class WrongElement(LossFirstConverter):
    name = "nanogpt-loss-first-wrong"

    def source_logits(self, model: nn.Module, tokens: Tensor) -> Tensor:
        return model(tokens)[0]  # the loss: None without targets


def test_a_converter_says_how_to_call_a_model_whose_forward_returns_the_logits_elsewhere() -> None:
    """`Converter.source_logits` is how both parity checks call the model: with the default one a ``(loss,
    logits)`` model is not checked (the error says what it returned and what to override); with an override
    it is, and a converter's slip stops the callback before training."""
    torch.manual_seed(0)
    model = LossFirstGPT(GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=16, bias=True))
    with pytest.raises(NotLogitsError, match=r"returned a tuple of 2 \(NoneType, Tensor\[2, 32, 40\]\).*"
                                             r"override NanoGPTConverter.source_logits\(model, tokens\)"):
        check_parity(model, "nanogpt")
    lens = dict(every_n_steps=None, log_spaced=False, repeat_length=4, text_len=16)
    with pytest.warns(UserWarning, match=r"could not compare .*model\(tokens\) returned a tuple of 2 \(NoneType, "
                                         r"Tensor.*source_logits\(model, tokens\) says how to call it"):
        LensCallback(converter="nanogpt", **lens).attach(model)
    for converter in (LossFirstConverter, NegatedMLP, WrongElement):
        register_converter(converter)
    try:
        assert check_parity(model, "nanogpt-loss-first").ok
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="LensCallback could not compare")
            LensCallback(converter="nanogpt-loss-first", **lens).attach(model)
        assert not check_parity(model, "nanogpt-loss-first-negated").ok
        with pytest.raises(ConversionError, match="converter 'nanogpt-loss-first-negated': the HookedTransformer's "
                                                  "logits differ"):
            LensCallback(converter="nanogpt-loss-first-negated", **lens).attach(model)
        with pytest.warns(UserWarning, match=r"WrongElement.source_logits\(model, tokens\) returned NoneType"):
            LensCallback(converter="nanogpt-loss-first-wrong", **lens).attach(model)  # the override's slip, named
    finally:
        for converter in (LossFirstConverter, NegatedMLP, WrongElement):
            unregister_converter(converter)


def test_check_parity_refuses_logits_of_another_shape_and_says_which_call_gave_them() -> None:
    """Logits that are not ``[batch, positions <= tokens, d_vocab_out]`` are refused with `NotLogitsError`, as the
    callback's check refuses them: a loss raised a bare IndexError, another vocabulary size a broadcasting
    error, and a ``[batch, vocab]`` row of the last position was broadcast against every position with
    ``batch_size=1``, where a correct conversion failed with the logits named as where it parts."""
    torch.manual_seed(0)
    model = LossFirstGPT(GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=16, bias=True))
    assert check_parity(model, LossFirstConverter(), batch_size=1).ok
    with pytest.raises(NotLogitsError, match=r"logits_fn\(model, tokens\) returned Tensor\[1, 40\] for \[1, 32\] tokens, "
                                             r"not logits \[batch, positions, d_vocab_out\] = \[1, 1 to 32, 40\]"):
        check_parity(model, LossFirstConverter(), batch_size=1, logits_fn=lambda m, t: m(t)[1][:, -1])
    with pytest.raises(NotLogitsError, match=r"WrongElement.source_logits\(model, tokens\) returned NoneType.*"
                                             r"override WrongElement.source_logits"):
        check_parity(model, WrongElement())
    with pytest.raises(NotLogitsError, match=r"returned Tensor\[\] .*make logits_fn return the logits"):
        check_parity(model, LossFirstConverter(), logits_fn=lambda m, t: m(t, targets=t)[0])  # the loss
    padded = lambda m, t: F.pad(m(t)[1], (0, 8), value=-1e4)  # noqa: E731 - 8 more ids than the converter's
    with pytest.raises(NotLogitsError, match=r"the model has 48 logits per position, the HookedTransformer of "
                                             r"converter 'nanogpt-loss-first' 40: check the vocabulary size"):
        check_parity(model, LossFirstConverter(), logits_fn=padded)


def test_register_converter_takes_overwrite_as_a_decorator() -> None:
    @register_converter
    class First(NanoGPTConverter):
        name = "decorated-twice"

    try:
        with pytest.raises(ValueError, match="already registered by .*First; pass overwrite=True"):
            @register_converter
            class Second(NanoGPTConverter):
                name = "decorated-twice"

        @register_converter(overwrite=True)
        class Third(NanoGPTConverter):
            name = "decorated-twice"

        assert isinstance(get_converter("decorated-twice"), Third) and isinstance(Third, type)
    finally:
        unregister_converter("decorated-twice")


class AttentionOnlyBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv, self.out = nn.Linear(d_model, 3 * d_model, bias=False), nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, self.n_heads, -1).transpose(1, 2) for y in self.qkv(x).chunk(3, dim=-1))
        return x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1))


class AttentionOnlyLM(nn.Module):
    """The toy model of induction-head work: attention only, no norms, weights of spread 0.02. Its
    attention scores are ~1e-4 and its logits ~1e-2 at initialisation."""

    def __init__(self, vocab_size: int = 64, n_ctx: int = 32, d_model: int = 32, n_layers: int = 2,
                 n_heads: int = 4, std: float = 0.02) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.tok, self.pos = nn.Embedding(vocab_size, d_model), nn.Embedding(n_ctx, d_model)
        self.blocks = nn.ModuleList(AttentionOnlyBlock(d_model, n_heads) for _ in range(n_layers))
        self.unembed = nn.Linear(d_model, vocab_size, bias=False)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


class AttentionOnlyConverter(Converter):
    name = "attention-only-toy"

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        return dict(vocab_size=model.tok.num_embeddings, n_ctx=model.pos.num_embeddings,
                    d_model=model.tok.embedding_dim, n_layers=len(model.blocks), n_heads=model.n_heads)

    def hooked_config(self, c: Mapping[str, Any]) -> HookedTransformerConfig:
        return HookedTransformerConfig(
            n_layers=c["n_layers"], d_model=c["d_model"], n_ctx=c["n_ctx"], n_heads=c["n_heads"],
            d_head=c["d_model"] // c["n_heads"], d_vocab=c["vocab_size"], attn_only=True, act_fn="gelu",
            normalization_type=None, positional_embedding_type="standard", default_prepend_bos=False)

    def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        n, d = c["n_heads"], c["d_model"]
        zeros = sd["tok.weight"].new_zeros
        out = {"embed.W_E": sd["tok.weight"], "pos_embed.W_pos": sd["pos.weight"],
               "unembed.W_U": sd["unembed.weight"].T, "unembed.b_U": zeros(c["vocab_size"])}
        for i in range(c["n_layers"]):
            for name, w in zip("QKV", sd[f"blocks.{i}.qkv.weight"].chunk(3)):  # [d_out, d_in] -> [head, d_in, d_head]
                out[f"blocks.{i}.attn.W_{name}"] = w.view(n, d // n, d).transpose(1, 2)
                out[f"blocks.{i}.attn.b_{name}"] = zeros(n, d // n)
            out[f"blocks.{i}.attn.W_O"] = sd[f"blocks.{i}.out.weight"].T.reshape(n, d // n, d)
            out[f"blocks.{i}.attn.b_O"] = zeros(d)
        return out


class AttentionOnlyDropsLastLayer(AttentionOnlyConverter):
    name = "attention-only-toy-drops-last-layer"

    def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(c, sd)
        last = f"blocks.{c['n_layers'] - 1}.attn.W_O"
        out[last] = torch.zeros_like(out[last])
        return out


def test_parity_checks_catch_a_dropped_layer_where_the_logits_are_tiny() -> None:
    """In a norm-free model at a small initialisation the logits are far below 1: the tolerance is
    relative to the largest logit (it was to at least 1), so a dropped layer shows."""
    wrong = AttentionOnlyDropsLastLayer
    model = AttentionOnlyLM(std=0.01)
    with torch.no_grad():
        assert float(model(torch.randint(0, 64, (2, 32))).abs().max()) < 0.1
    assert check_parity(model, AttentionOnlyConverter(), seq_len=32, atol=0.0).ok
    assert not check_parity(model, wrong(), seq_len=32, atol=0.0).ok  # atol=1e-4 alone is above these logits
    kwargs = dict(repeat_length=8, repeat_batch=2, text_len=32, text_batch=2)
    LensCallback(converter=AttentionOnlyConverter(), **kwargs).attach(model)
    with pytest.raises(ConversionError, match=rf"converter '{wrong.name}': the HookedTransformer's logits differ"):
        LensCallback(converter=wrong(), **kwargs).attach(model)


class ShortTableLM(AttentionOnlyLM):
    """A model whose position table (a rotary cache, say) covers 16 positions, shorter than the context its
    converter states (32): it fails on longer sequences with a broadcast error."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(16, 1))

    def forward(self, idx: Tensor) -> Tensor:
        return super().forward(idx) + self.table[: idx.shape[1]]


def test_a_model_that_fails_on_the_probe_length_but_runs_on_a_few_tokens_stops_the_run() -> None:
    """Not a call signature the check cannot use (one warning, unchecked): the probes would read positions
    the model cannot compute. The error names the lengths and the settings."""
    kwargs = dict(converter=AttentionOnlyConverter(), repeat_length=8, repeat_batch=2, text_batch=2)
    with pytest.raises(ConversionError, match=r"fails on 32-token sequences .* runs on a few tokens.*"
                                              r"text_len=32.*n_ctx=32.*give its length as n_ctx"):
        LensCallback(**kwargs).attach(ShortTableLM())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # within the table: checked, no parity warning
        LensCallback(text_len=16, **kwargs).attach(ShortTableLM())
    assert not [w for w in caught if "could not compare" in str(w.message)]


def test_check_parity_names_n_ctx_for_a_model_that_fails_on_its_length_but_runs_on_a_few_tokens() -> None:
    """check_parity, the README's first step for a new converter, runs ``min(n_ctx, 512)`` tokens: a converter
    whose ``n_ctx`` exceeds the model's context (a rotary table of ``block_size`` rows) raised the model's own
    ``RuntimeError`` ("shape '[1, 256, 1, 8]' is invalid"), which the callback's check explains (journey review)."""
    with pytest.raises(ConversionError, match=r"fails on 32-token sequences \(RuntimeError: .*\) but runs on 8: "
                                              r".*converter 'attention-only-toy' gives n_ctx=32.*give its length as "
                                              r"n_ctx in model_config.*seq_len="):
        check_parity(ShortTableLM(), AttentionOnlyConverter())
    with pytest.raises(ConversionError, match=r"fails on 24-token sequences .* runs on 8: .*seq_len=24"):
        check_parity(ShortTableLM(), AttentionOnlyConverter(), seq_len=24)
    assert check_parity(ShortTableLM(), AttentionOnlyConverter(), seq_len=16).ok  # within the table
    with pytest.raises(RuntimeError, match="Expected tensor for argument") as raised:  # fails on any length:
        check_parity(ShortTableLM(), AttentionOnlyConverter(), logits_fn=lambda m, t: m(t.float()))  # its own error
    assert not isinstance(raised.value, ConversionError)


def test_the_parity_check_of_a_run_reading_no_batch_retries_on_a_few_tokens() -> None:
    """A run of weights-only probes (``copying``) reads no batch, so no probe length bounds the check's retry after
    the model fails at the check's length: it retried on 0 tokens, and left the conversion unchecked with a warning.
    It retries on a few tokens (`PARITY_FEW_TOKENS`), which still tell a wrong converter."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LensCallback(converter=AttentionOnlyConverter(), probes=["copying"]).attach(ShortTableLM())
    assert not [w for w in caught if "could not compare" in str(w.message)], [str(w.message) for w in caught]
    wrong = AttentionOnlyDropsLastLayer
    with pytest.raises(ConversionError, match=rf"converter '{wrong.name}': the HookedTransformer's logits differ"):
        LensCallback(converter=wrong(), probes=["copying"]).attach(ShortTableLM())


def test_check_parity_takes_a_half_precision_models_rounding_in_its_default_tolerance() -> None:
    """A bfloat16 model computes in bfloat16 against a float32 HookedTransformer: its default relative
    tolerance is the callback's for half precision, so a correct converter passes and a wrong one fails."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=4, n_embd=64)).to(torch.bfloat16)
    report = check_parity(model, seq_len=32)
    assert report.ok and report.rtol == 5e-2, str(report)
    assert not check_parity(model, seq_len=32, rtol=1e-3).ok  # bfloat16's rounding is above float32's tolerance
    assert check_parity(model.float(), seq_len=32).rtol == 1e-3


class _FoldsInPlace(ToyConverter):
    """A converter that scales the unembedding in place: the README forbids it, and it would change the
    model the callback observes (custom-architecture review: the callback's parity check passed it,
    since the scaled copy it converts is exactly what the in-place fold produces)."""

    name = "toy-folds-in-place"

    def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(c, sd)
        out["unembed.W_U"] = sd["head.weight"].mul_(1.0).T  # an in-place op, even one that keeps the values
        return out


def test_a_converter_that_writes_into_the_state_dict_is_refused_before_training(tmp_path: Path) -> None:
    model = scramble(ToyLM())
    with pytest.raises(ConversionError, match=r"toy-folds-in-place' modified its input in place \(head.weight\).*"
                                              r"w \* s rather than w.mul_\(s\).*rebuild or reload the model"):
        to_hooked_transformer(model, converter=_FoldsInPlace())
    with pytest.raises(ConversionError, match="modified its input in place"):
        check_parity(model, _FoldsInPlace())
    cb = LensCallback(converter=_FoldsInPlace(), repeat_length=4, repeat_batch=2, text_batch=0,
                      probes=["induction"])
    with pytest.raises(ValueError, match="modified its input in place"):
        cb.validate(model)
    # a pure converter on the same model, and inference-mode tensors (no version counter), pass
    to_hooked_transformer(model, converter=ToyConverter())
    with torch.inference_mode():
        frozen = {k: v.clone() for k, v in model.state_dict().items()}
    ToyConverter().convert_weights(ToyConverter().model_config(model), frozen)
    from lens_callback.convert.base import checked_conversion

    checked_conversion(ToyConverter(), ToyConverter().model_config(model), frozen)


class _IntKeyedConfig(ToyConverter):
    """model_config with an int-keyed dict: the live run converts with it, a snapshot reloads it with
    str keys (custom-architecture review: every check passed and no snapshot of the run reloaded)."""

    name = "toy-int-keys"

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().model_config(model), "layer_kind": {i: "global" for i in range(len(model.backbone.layers))}}

    def hooked_config(self, c: Mapping[str, Any]) -> HookedTransformerConfig:
        assert [c["layer_kind"][i] for i in range(c["n_layers"])] == ["global"] * c["n_layers"]
        return super().hooked_config(c)


def test_a_model_config_json_would_change_is_refused_when_snapshots_would_store_it(tmp_path: Path) -> None:
    from lens_callback.snapshots import json_change, save_snapshot

    assert json_change({"a": [1, {"b": 2.0}], "c": None}, "model_config") is None
    assert json_change({"a": [1, {3: 2.0}]}, "model_config") == (
        "model_config['a'][1] has the int key 3, which JSON stores as the string '3'")
    assert json_change({"a": {"w": (4, 4)}}, "cfg") == "cfg['a']['w'] is a tuple, which JSON stores as a list"
    model = scramble(ToyLM())
    cb = LensCallback(converter=_IntKeyedConfig(), repeat_length=4, repeat_batch=2, text_batch=0,
                      probes=["induction"])
    with pytest.raises(ValueError, match=r"toy-int-keys': model_config\['layer_kind'\] has the int key 0, which JSON "
                                         r"stores as the string '0', so its snapshots would reload"):
        cb.validate(model)
    with pytest.raises(ValueError, match=r"int key 0.*would reload with another model_config"):
        save_snapshot(tmp_path, 0, converter="toy", model_config=_IntKeyedConfig().model_config(model),
                      state_dict=model.state_dict())
    assert not list(tmp_path.iterdir())  # refused before any write


def test_check_parity_takes_blocks_named_in_a_module_dict() -> None:
    """torchtitan keeps its blocks in an nn.ModuleDict ("0", "1", ...): iterating one gives its keys,
    and blocks="backbone.layers" crashed with AttributeError (custom-architecture review)."""
    model = scramble(ToyLM())
    as_dict = nn.ModuleDict({str(i): layer for i, layer in enumerate(model.backbone.layers)})
    model.backbone.layers = as_dict  # same modules, same order: the forward iterates the dict's keys, so
    model.backbone.forward = lambda idx: _dict_backbone_forward(model.backbone, idx)
    report = check_parity(model, ToyConverter(), blocks="backbone.layers")
    assert report.ok and [s for s, _ in report.sites][1:3] == ["block 0 (resid_post)", "block 1 (resid_post)"]
    with pytest.raises(ValueError, match=r"blocks=\['a', 'b'\] must name or be a container of modules.*str"):
        check_parity(model, ToyConverter(), blocks=["a", "b"])
    # one block, named or given, is no container of them: a bare "'Layer' object is not iterable" before
    layer = type(model.backbone.layers["0"]).__name__
    with pytest.raises(ValueError, match=rf"blocks='backbone.layers.0' names one {layer}, not a container of the "
                                         r"model's blocks: name or pass the nn.ModuleList"):
        check_parity(model, ToyConverter(), blocks="backbone.layers.0")
    with pytest.raises(ValueError, match=rf"blocks= got one {layer}, not a container"):
        check_parity(model, ToyConverter(), blocks=model.backbone.layers["0"])


def _dict_backbone_forward(backbone: nn.Module, idx: Tensor) -> Tensor:
    x = backbone.tok_emb(idx) + backbone.pos_emb(torch.arange(idx.shape[1], device=idx.device))
    for layer in backbone.layers.values():
        x = layer(x)
    return backbone.final_norm(x)


def test_changing_a_conversions_bias_zeros_changes_no_later_conversion() -> None:
    """convert() handed out the one cached zeros tensor the nanoGPT converter uses for every missing bias:
    steering one layer's b_O in the returned dict changed every later conversion of a bias-free model
    (the callback's refresh, to_hooked_transformer, load_snapshot) in the process."""
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=8, bias=False)
    _, weights = convert("nanogpt", config.to_dict(), GPT(config).state_dict())
    assert weights["blocks.0.attn.b_O"] is not weights["blocks.1.attn.b_O"]
    for key in ("blocks.0.attn.b_O", "blocks.1.mlp.b_out", "ln_final.b", "unembed.b_U"):
        weights[key].add_(1.0)
    other = GPT(config)
    _, again = convert("nanogpt", config.to_dict(), other.state_dict())
    assert all(not again[key].any() for key in ("blocks.0.attn.b_O", "blocks.1.mlp.b_out", "ln_final.b", "unembed.b_U"))
    hooked = to_hooked_transformer(other)
    assert not hooked.blocks[1].attn.b_O.any() and not hooked.unembed.b_U.any()


class _AutocastGPT(GPT):
    """Float32 parameters, blocks run under bfloat16 autocast inside forward."""

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = super().forward(idx, targets)
        return logits.float(), loss


class _PaddedGPT(GPT):
    """Masks the last four vocabulary ids with -inf (padded vocabulary rows)."""

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Any:
        logits, loss = super().forward(idx, targets)
        return logits.masked_fill(torch.arange(logits.shape[-1]) >= logits.shape[-1] - 4, float("-inf")), loss


def test_check_parity_takes_the_callbacks_tolerance_for_a_model_that_autocasts_itself() -> None:
    """check_parity chose rtol from the parameters' dtype only: a model with an autocast inside its forward
    failed it (blaming block 0) where the callback's own check, which sees the cast, passed."""
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=64, bias=False)
    model = _AutocastGPT(config)
    scramble(model)
    report = check_parity(model, "nanogpt", seq_len=32)
    assert report.rtol == 5e-2 and report.ok, str(report)
    assert check_parity(GPT(config), "nanogpt", seq_len=32).rtol == 1e-3
    assert not check_parity(model, "nanogpt", seq_len=32, rtol=1e-6).ok  # an explicit rtol is kept
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's, around a model with its own: that one is seen
        assert check_parity(model, "nanogpt", seq_len=32).rtol == 5e-2


class _SwappedQKNanoGPT(NanoGPTConverter):
    """Query and key weights swapped: at nanoGPT's initialisation 3.8x the parity tolerance (seed 0, below)."""

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(model_config, state_dict)
        for layer in range(model_config["n_layer"]):
            q, k = f"blocks.{layer}.attn.W_Q", f"blocks.{layer}.attn.W_K"
            out[q], out[k] = out[k], out[q]
        return out


def test_check_parity_compares_outside_the_callers_autocast() -> None:
    """Called under an autocast (from a bf16-mixed training step, a notebook cell), both sides computed in
    bfloat16, the half-precision watch took the casts for the model's own and gave the 5e-2 tolerance, and
    swapped query and key weights passed. The callback's check runs outside any autocast; so does this one."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64, bias=True))
    plain = check_parity(model, "nanogpt")
    assert not check_parity(model, _SwappedQKNanoGPT()).ok
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = check_parity(model, "nanogpt")
        assert not check_parity(model, _SwappedQKNanoGPT()).ok, "a wrong conversion passed under the caller's autocast"
        assert torch.is_autocast_enabled("cpu")  # the caller's, put back
    assert report.rtol == 1e-3 and report.max_logit_diff == plain.max_logit_diff and report.ok


class _MaskedPadding(NanoGPTConverter):
    """`_PaddedGPT`'s converter: its masked ids get a large negative finite ``b_U``."""

    name = "nanogpt-masked-padding"

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(model_config, state_dict)
        b_U = out["unembed.b_U"].clone()
        b_U[-4:] = -1e4
        return {**out, "unembed.b_U": b_U}


class _FiniteMaskedGPT(GPT):
    """Masks the last four vocabulary ids with a finite -1e4, as many models do instead of -inf."""

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Any:
        logits, loss = super().forward(idx, targets)
        return logits.masked_fill(torch.arange(logits.shape[-1]) >= logits.shape[-1] - 4, -1e4), loss


class _UntransposedWO(NanoGPTConverter):
    """The README's example slip: ``W_O`` from ``c_proj.weight`` without ``.T``."""

    name = "nanogpt-bad-w-o"

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(model_config, state_dict)
        n_heads, d_model = model_config["n_head"], model_config["n_embd"]
        for i in range(model_config["n_layer"]):
            w_o = state_dict[f"transformer.h.{i}.attn.c_proj.weight"]
            out[f"blocks.{i}.attn.W_O"] = w_o.reshape(n_heads, d_model // n_heads, d_model)
        return out


class _MaskedPaddingUntransposedWO(_UntransposedWO, _MaskedPadding):
    """`_MaskedPadding` with `_UntransposedWO`'s slip."""

    name = "nanogpt-masked-padding-bad-w-o"


class _BiasMaskedGPT(GPT):
    """Masks its last four vocabulary ids with -1e4 held in an output-bias parameter."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.out_bias = nn.Parameter(torch.zeros(config.vocab_size))
        with torch.no_grad():
            self.out_bias[-4:] = -1e4

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Any:
        logits, loss = super().forward(idx, targets)
        return logits + self.out_bias, loss


class _BiasMasked(NanoGPTConverter):
    name = "nanogpt-bias-masked"

    def expected_keys(self, model_config: Mapping[str, Any]) -> None:
        return None

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {**super().convert_weights(model_config, state_dict), "unembed.b_U": state_dict["out_bias"].clone()}


class _BiasMaskedUntransposedWO(_UntransposedWO, _BiasMasked):
    name = "nanogpt-bias-masked-bad-w-o"


class _BiasMaskedNoMLPBias(_BiasMasked):
    """Drops the MLP biases: a slip that shows on perturbed weights only (they are zeros at initialisation)."""

    name = "nanogpt-bias-masked-no-mlp-bias"

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(model_config, state_dict)
        return {k: torch.zeros_like(v) if k.endswith(("mlp.b_in", "mlp.b_out")) else v for k, v in out.items()}


class _BiasMaskedNoLN1Bias(_BiasMasked):
    """Drops the first norm's bias in every block (zeros at initialisation, like the MLP biases)."""

    name = "nanogpt-bias-masked-no-ln1-bias"

    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().convert_weights(model_config, state_dict)
        return {k: torch.zeros_like(v) if k.endswith("ln1.b") else v for k, v in out.items()}


@pytest.mark.parametrize("mask", [-1e4, -999.0, -300.0])
def test_a_mask_held_in_a_parameter_does_not_size_the_parity_checks_noise(mask: float) -> None:
    """The perturbation's noise is a fraction of each tensor's root-mean-square, which a -1e4 mask in an
    output-bias parameter set: 625 of noise on every real id, a largest logit of 1.6e3 and a tolerance of
    1.6, under which slips passed on a model at initialisation (diff review). Entries of magnitude 1e3 or
    more were left out of it, and a -999 or -300 mask still let a dropped norm bias pass (diff review
    round 3): entries of magnitude 100 or more, a logit's masked gap, are."""
    from lens_callback.convert.parity import perturbed

    config = GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64, bias=True)
    tokens = torch.arange(4096) % 250
    for converter in (_BiasMasked(), _BiasMaskedNoMLPBias(), _BiasMaskedNoLN1Bias()):
        torch.manual_seed(0)
        model = _BiasMaskedGPT(config)  # as at initialisation: biases zero, gains one
        with torch.no_grad():
            model.out_bias[-4:] = mask
        report = check_parity(model, converter, seq_len=64)
        assert report.tolerance < 0.01 and report.ok == (converter.name == "nanogpt-bias-masked"), str(report)
        cb = LensCallback(converter=converter, repeat_length=8, repeat_batch=2, text_len=16)
        if report.ok:
            cb.attach(model, tokens, tokens)
        else:
            with pytest.raises(ConversionError, match=r"logits differ from the model's by up to"):
                cb.attach(model, tokens, tokens)
    bias = torch.zeros(256)
    bias[-4:] = mask
    noise = perturbed(bias, torch.Generator().manual_seed(0)) - bias
    assert 0.05 < float(noise.std()) < 0.2  # 0.5 x the vector's floor of 0.2: as for a bias without a mask
    gains = torch.full((64,), -mask)  # every entry that large: weights, not a mask, with noise on their scale
    noise = perturbed(gains, torch.Generator().manual_seed(0)) - gains
    assert 0.3 * -mask < float(noise.std()) < 0.7 * -mask  # 0.5 x (the root-mean-square + 0.2)
    # NaN, inf and float32 overflow in the square do not size it either (diff review round 5)
    for values in ([-math.inf] * 6, [-1e4, -1e4, math.nan], [300.0, 300.0, 300.0, math.nan], [300.0, 300.0, -math.inf],
                   [1e20] * 4):
        value = torch.tensor(values)
        out = perturbed(value, torch.Generator().manual_seed(0))
        finite = torch.isfinite(value)
        assert torch.isfinite(out[finite]).all() and torch.equal(torch.isnan(out), torch.isnan(value)), (values, out)
        assert (out[~finite & ~torch.isnan(value)] == value[~finite & ~torch.isnan(value)]).all()


class _NoFloat64(torch.overrides.TorchFunctionMode):
    """Raises, as the MPS backend does, for any operation that makes a float64 tensor."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, Tensor) and out.dtype == torch.float64:
            raise TypeError(f"{func}: cannot convert an MPS tensor to float64 (the MPS framework has no float64)")
        return out


def test_the_parity_noise_of_a_masked_parameter_is_sized_without_float64() -> None:
    """The root-mean-square of a parameter holding a mask was taken with ``.double()`` on the model's device:
    on MPS, which has no float64, attach raised for a model with a weight entry of magnitude 100 or more (a
    -1e4 vocabulary mask, gains of 300) or a NaN (device review). It is taken in float32, scaled so that 1e20
    squared does not overflow, and sizes the noise as before."""
    from lens_callback.convert.parity import perturbed

    for values, rms in (([0.0] * 4 + [-1e4] * 2, 0.0), ([300.0] * 6, 300.0), ([1e20] * 4, 1e20),
                        ([3.0, -4.0, math.nan, -1e4], math.sqrt(12.5)), ([-math.inf, 0.5], 0.5)):
        value = torch.tensor(values)
        with _NoFloat64():
            out = perturbed(value, torch.Generator().manual_seed(0))
        assert torch.equal(out.isnan(), value.isnan())
        noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(0))
        floor = 0.2  # a vector's PERTURBATION_FLOOR
        finite = torch.isfinite(value)
        assert_close(out[finite], value[finite] + noise[finite] * 0.5 * (floor + rms))


def test_the_parity_check_runs_on_models_whose_logits_lie_far_below_their_largest() -> None:
    """Counting the masked logits (more than 100 below their row's largest) out of the compared ones
    made the check skip itself as "the model's logits are not finite" (diff review): for a mask held in
    a bias parameter, whose perturbation puts most real ids 100 below, and for a confident model; the
    wrong converter of a bias-held mask passed so. The check counts the finite logits, as before."""
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    tokens = torch.arange(512) % 60
    for converter in (_BiasMasked(), _BiasMaskedUntransposedWO()):
        model = scramble(_BiasMaskedGPT(config))
        with torch.no_grad():
            model.out_bias.zero_()
            model.out_bias[-4:] = -1e4
        cb = LensCallback(converter=converter, repeat_length=8, repeat_batch=2, text_len=16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "could not compare"
            if converter.name.endswith("bad-w-o"):
                with pytest.raises(ConversionError, match=r"logits differ from the model's by up to"):
                    cb.attach(model, tokens, tokens)
            else:
                cb.attach(model, tokens, tokens)
    confident = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        confident.transformer.ln_f.weight.mul_(300.0)  # rows spread over about 215
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LensCallback(probes=["induction"], repeat_length=8, repeat_batch=2).attach(confident, tokens, tokens)
        with pytest.raises(ConversionError, match=r"logits differ from the model's by up to"):
            LensCallback(converter=_UntransposedWO(), probes=["induction"], repeat_length=8, repeat_batch=2).attach(
                confident, tokens, tokens)


class _ExtraState(nn.Module):
    """A module with extra state in its parent's state dict (``get_extra_state``, as fp8 modules have):
    ``state`` as it is returned, a dict or a tensor (TransformerEngine's fp8 modules keep a uint8 one)."""

    def __init__(self, state: Any) -> None:
        super().__init__()
        self.state = state

    def get_extra_state(self) -> Any:
        return self.state

    def set_extra_state(self, state: Any) -> None:
        pass


@pytest.mark.parametrize("state", [{"amax_history": [1.0, 2.0]}, torch.arange(8, dtype=torch.uint8)],
                         ids=["dict", "uint8 tensor"])
def test_a_models_extra_state_neither_skips_the_parity_check_nor_fails_its_snapshots(tmp_path: Path,
                                                                                      state: Any) -> None:
    """A state dict entry that is no tensor (a module's extra state) made the callback's parity check raise
    in `.detach()`, which it took for a model it cannot run: a wrong converter passed with a warning; and
    every snapshot failed, the writer refusing the entry (custom-architecture review). Only extra state
    that is no tensor was left out then: a uint8 tensor one was handed to the converter, which refused
    its key (diff review)."""
    from safetensors import safe_open

    from lens_callback.snapshots import list_snapshots, load_snapshot

    config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    model = scramble(GPT(config))
    model.fp8_meta = _ExtraState(state)
    assert isinstance(model.state_dict()["fp8_meta._extra_state"], type(state))
    tokens = torch.arange(512) % 60
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not compare" warning
        with pytest.raises(ConversionError, match=r"logits differ from the model's by up to"):
            LensCallback(converter=_UntransposedWO(), repeat_length=8, repeat_batch=2, text_len=16).attach(
                model, tokens, tokens)
    cb = LensCallback(converter="nanogpt", repeat_length=8, repeat_batch=2, text_len=16, snapshot_dir=tmp_path)
    cb.attach(model, tokens, tokens)
    cb.probe_step(None, 0, model.state_dict())
    assert not any(cb.errors.values()) and [s.step for s in list_snapshots(tmp_path)] == [0]
    with safe_open(tmp_path / "step-00000000" / "model.safetensors", "pt") as stored:
        assert "fp8_meta._extra_state" not in stored.keys() and "transformer.wte.weight" in stored.keys()
    reloaded = load_snapshot(tmp_path / "step-00000000")
    assert torch.allclose(reloaded(tokens[None, :16]), cb._hooked(tokens[None, :16]), atol=1e-5)


def test_a_finite_mask_does_not_set_the_parity_tolerance() -> None:
    """A model masking padded ids with a finite -1e4 made that the largest |logit|: the tolerance (1e-3 of
    it) became 10 and a converter with W_O untransposed passed both checks (custom-architecture review).
    Logits more than 100 below their row's largest count as masked, like -inf."""
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    tokens = torch.arange(512) % 60
    for model_class in (_PaddedGPT, _FiniteMaskedGPT):
        model = scramble(model_class(config))
        report = check_parity(model, _MaskedPaddingUntransposedWO(), seq_len=32)
        assert not report.ok and report.tolerance < 0.1 and report.max_logit_diff > 10 * report.tolerance, str(report)
        assert report.first_divergence == "block 0 (resid_post)", str(report)
        cb = LensCallback(converter=_MaskedPaddingUntransposedWO(), repeat_length=8, repeat_batch=2, text_len=16)
        with pytest.raises(ConversionError, match=r"logits differ from the model's by up to"):
            cb.attach(model, tokens, tokens)
        correct = check_parity(model, _MaskedPadding(), seq_len=32)
        assert correct.ok and correct.tolerance < 0.1, str(correct)
        LensCallback(converter=_MaskedPadding(), repeat_length=8, repeat_batch=2, text_len=16).attach(model, tokens,
                                                                                                      tokens)
        unmasked = check_parity(model, "nanogpt", seq_len=32)  # the mask left out: named, as for -inf
        assert not unmasked.ok and unmasked.unmasked == 2 * 4 and unmasked.max_logit_diff < unmasked.tolerance


def test_check_parity_compares_the_finite_logits_and_requires_the_masked_ones_masked() -> None:
    """-inf logits (masked padding ids) made the difference NaN: the check always failed, every block's
    tolerance became 0 and block 0 was named; the finite entries are compared. Leaving them out passed a
    converter that does not mask those ids, whose softmax gives them weight (every loss and logit-lens
    value differs), and the one that masks them with -inf had every probe result voided by the
    finite-weights check (custom-conversion review): a converted logit must be 40 below its row's
    largest where the model's is -inf, and a large negative finite b_U does that."""
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    model = _PaddedGPT(config)
    scramble(model)
    unmasked = check_parity(model, "nanogpt", seq_len=32)
    assert not unmasked.ok and unmasked.unmasked == 2 * 4 and unmasked.max_logit_diff < unmasked.tolerance
    assert unmasked.first_divergence is None and math.isfinite(unmasked.scales[-1]), str(unmasked)
    assert ("8 logits the model masks (-inf, or more than 100 below their row's largest: masked ids, e.g. padded "
            "vocabulary ids) are not masked") in str(unmasked)
    masked = check_parity(model, _MaskedPadding(), seq_len=32)
    assert masked.ok and masked.unmasked == 0, str(masked)

    cb = LensCallback(converter="nanogpt", repeat_length=8, repeat_batch=2, text_batch=1, text_len=16)
    with pytest.raises(ConversionError, match=r"converter 'nanogpt': \d+ logits the model masks \(-inf.* are not "
                                              r"masked in the converted model.*set unembed.b_U to a large negative"):
        cb.attach(model, torch.arange(512) % 60, torch.arange(512) % 60)
    cb = LensCallback(converter=_MaskedPadding(), repeat_length=8, repeat_batch=2, text_batch=1, text_len=16)
    cb.attach(model, torch.arange(512) % 60, torch.arange(512) % 60)
    measurement = cb.probe_step(None, 0, model.state_dict())
    assert measurement is not None and measurement.finite() and not measurement.failures
    assert not any(cb.errors.values()) and math.isfinite(cb.history[0]["lens/logit_lens/L0/kl"])

    class MasksWithInfinity(_MaskedPadding):  # -inf (or -1e9 in float16, which rounds to it) voids every probe step
        def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
            out = super().convert_weights(model_config, state_dict)
            return {**out, "unembed.b_U": out["unembed.b_U"].masked_fill(out["unembed.b_U"] < -1, -math.inf)}

    cb = LensCallback(converter=MasksWithInfinity(), repeat_length=8, repeat_batch=2, text_batch=1, text_len=16)
    with pytest.raises(ConversionError, match=r"made weights that are not finite from finite ones \(unembed.b_U\): "
                                              r"every probe step would be recorded as NaN.*e.g. -1e4"):
        cb.attach(model, torch.arange(512) % 60, torch.arange(512) % 60)
    diverged = _PaddedGPT(config)
    with torch.no_grad():
        diverged.lm_head.weight[0, 0] = math.nan  # the model's own weights not finite: the probe steps report it
    LensCallback(converter=MasksWithInfinity(), repeat_length=8, repeat_batch=2, text_batch=1, text_len=16,
                 parity_check=False).attach(diverged, torch.arange(512) % 60, torch.arange(512) % 60)

    # a -inf buffer the converter drops (an additive causal mask) is not the model's weights being
    # non-finite (diff review: the refusal looked at every floating value of the state dict)
    class WithMask(_PaddedGPT):
        def __init__(self, config: GPTConfig) -> None:
            super().__init__(config)
            self.register_buffer("additive_mask", torch.full((4, 4), -math.inf).triu(1))

    class DropsMask(MasksWithInfinity):
        def source_weights(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {k: v for k, v in super().source_weights(state_dict).items() if k != "additive_mask"}

    cb = LensCallback(converter=DropsMask(), repeat_length=8, repeat_batch=2, text_batch=1, text_len=16,
                      parity_check=False)
    with pytest.raises(ConversionError, match=r"made weights that are not finite from finite ones"):
        cb.attach(WithMask(config), torch.arange(512) % 60, torch.arange(512) % 60)

    # a -inf mask buffer the converter folds into b_U: the parameters are finite, every probe step would
    # be void all the same (multi-process review: a buffer read by the converter switched the check off)
    class VocabMasked(GPT):
        def __init__(self, config: GPTConfig) -> None:
            super().__init__(config)
            self.register_buffer("vocab_mask", torch.where(torch.arange(config.vocab_size) >= config.vocab_size - 4,
                                                           -math.inf, 0.0))

        def forward(self, idx: Tensor, targets: Tensor | None = None) -> Any:
            logits, loss = super().forward(idx, targets)
            return logits + self.vocab_mask, loss

    class FoldsMask(NanoGPTConverter):  # reads the buffer
        name = "nanogpt-folds-mask"

        def expected_keys(self, model_config: Mapping[str, Any]) -> set[str]:
            return super().expected_keys(model_config) | {"vocab_mask"}

        def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
            out = super().convert_weights(model_config, {k: v for k, v in state_dict.items() if k != "vocab_mask"})
            return {**out, "unembed.b_U": state_dict["vocab_mask"].clone()}

    vocab_masked = VocabMasked(config)
    cb = LensCallback(converter=FoldsMask(), repeat_length=8, repeat_batch=2, text_batch=1, text_len=16)
    with pytest.raises(ConversionError, match=r"made weights that are not finite from finite ones \(unembed.b_U\)"):
        cb.attach(vocab_masked, torch.arange(512) % 60, torch.arange(512) % 60)

    class Wrong(NanoGPTConverter):  # a real difference still shows, at its block
        name = "nanogpt-wrong-mlp"

        def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
            out = super().convert_weights(model_config, state_dict)
            return {**out, "blocks.1.mlp.W_in": out["blocks.1.mlp.W_in"] * 1.5}

    broken = check_parity(model, Wrong(), seq_len=32)
    assert not broken.ok and broken.first_divergence == "block 1 (resid_post)", str(broken)


def test_a_converter_making_non_finite_half_precision_weights_is_refused_where_a_fused_sum_overflows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU the finite check defaults to a fused sum of |x|, which in float16 overflowed weights
    whose sum passes 65504: the source looked non-finite, and a converter whose -1e9 float16 rounds to
    -inf was let through (diff review; the GPU default emulated on the CPU). The sum is float32 now."""
    import lens_callback.convert.base as base

    finite_flag = base.finite_flag
    monkeypatch.setattr(base, "finite_flag", lambda params, fused=None: finite_flag(params, True if fused is None
                                                                                    else fused))
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    model = _PaddedGPT(config).half()
    with torch.no_grad():
        model.transformer.wte.weight.fill_(40.0)  # finite, but sum |x| = 81,920 > 65504 in float16
    assert base.weights_finite([model.transformer.wte.weight])  # summed in float32 (`finite_flag`)

    class MinusBillion(_MaskedPadding):
        def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
            out = super().convert_weights(model_config, state_dict)
            b_U = out["unembed.b_U"].clone()
            b_U[-4:] = torch.tensor(-1e9)  # -inf in float16 (a tensor copy casts; a Python number overflows on torch>=2.15)
            return {**out, "unembed.b_U": b_U}

    cb = LensCallback(converter=MinusBillion(), repeat_length=8, repeat_batch=2, text_batch=1, text_len=16,
                      parity_check=False)
    with pytest.raises(ConversionError, match=r"made weights that are not finite from finite ones \(unembed.b_U\)"):
        cb.attach(model, torch.arange(512) % 60, torch.arange(512) % 60)


def test_the_fused_finite_check_sums_float16_weights_in_float32() -> None:
    """The GPU default (``fused``, emulated on the CPU) summed |x| in the tensors' dtype: a float16
    tensor whose sum passes 65504 (GPT-2's embedding sums to about 8e5) read as non-finite, and every
    probe value of a float16 model on a GPU was voided to NaN (``reprobe(dtype=torch.float16)``)."""
    from lens_callback.convert.base import finite_flag

    big = torch.full((64, 64), 20.0, dtype=torch.float16)  # sum |x| = 81,920: inf in float16
    others = [torch.ones(3, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64)]
    assert bool(finite_flag([big, *others], fused=True)) and bool(finite_flag([big], fused=False))
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = big.clone()
        broken[5, 7] = bad
        assert not bool(finite_flag([broken, *others], fused=True))
        assert not bool(finite_flag([big, torch.tensor([1.0, bad], dtype=torch.float64)], fused=True))



@pytest.mark.skipif(not PER_BACKEND_FP32_PRECISION, reason="torch without per-backend fp32_precision (before 2.9)")
def test_full_float32_matmuls_leaves_a_flag_that_follows_its_parent_following() -> None:
    """A matmul flag without a setting of its own reads its parent's; restored as read, it became a setting
    of its own, and a later change of the parent (generic, or oneDNN's) no longer reached the matmuls
    (observer review). Each flag gets back what it had: its own value, or none."""
    from lens_callback.convert.parity import full_float32_matmuls

    b = torch.backends
    nodes = (b, b.cudnn, b.cuda.matmul, b.mkldnn, b.mkldnn.matmul)
    # oneDNN's own flag through torch's (backend, op) setter: torch.backends.mkldnn.fp32_precision writes the
    # generic one (torch 2.13), so setting it would repeat the "generic" case (diff review)
    set_mkldnn = functools.partial(torch._C._set_fp32_precision_setter, "mkldnn", "all")
    saved = [node.fp32_precision for node in nodes]  # all "none" in a fresh process (the tests leave them so)
    try:
        for case in ("generic", "mkldnn", "own", "own equal to its parent"):
            for node in nodes:
                node.fp32_precision = "none"
            set_mkldnn("none")
            if case == "generic":
                b.fp32_precision = "tf32"
            elif case == "mkldnn":
                set_mkldnn("bf16")
                assert b.fp32_precision == "none" and b.mkldnn.matmul.fp32_precision == "bf16"
            elif case == "own":
                b.fp32_precision, b.mkldnn.matmul.fp32_precision = "tf32", "bf16"
            else:
                b.fp32_precision, b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = "tf32", "tf32", "tf32"
            read = [node.fp32_precision for node in nodes]
            with full_float32_matmuls():
                assert (b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision) == ("ieee", "ieee")
            assert [node.fp32_precision for node in nodes] == read, case
            b.fp32_precision = "ieee"  # the user changes the parents later
            set_mkldnn("ieee")
            after = (b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision)
            expected = {"generic": ("ieee", "ieee"), "mkldnn": ("ieee", "ieee"), "own": ("ieee", "bf16"),
                        "own equal to its parent": ("tf32", "tf32")}[case]
            assert after == expected, case
    finally:
        for node in nodes:
            node.fp32_precision = "none"
        set_mkldnn("none")
        for node, value in zip(nodes, saved):
            if value != "none":
                node.fp32_precision = value


@pytest.mark.skipif(not PER_BACKEND_FP32_PRECISION, reason="torch without per-backend fp32_precision (before 2.9)")
def test_check_parity_compares_in_full_float32_and_restores_the_matmul_flags() -> None:
    """The callback's check ran with full float32 products, check_parity under the user's (TF32 on a GPU,
    bfloat16 through oneDNN on a CPU), which round as much as the tolerance."""
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16)
    model = scramble(GPT(config))
    flag = torch.backends.mkldnn.matmul
    seen: list[str] = []

    def logits(m: nn.Module, tokens: Tensor) -> Tensor:
        seen.append(flag.fp32_precision)
        return m(tokens)[0]

    before = flag.fp32_precision
    try:
        flag.fp32_precision = "bf16"
        assert check_parity(model, "nanogpt", logits_fn=logits, seq_len=16).ok
        assert seen == ["ieee"] and flag.fp32_precision == "bf16"
    finally:
        flag.fp32_precision = before


def _flex_forward(self: nn.Module, x: Tensor) -> Tensor:
    """nanoGPT's attention through flex_attention (a higher-order operator) with a causal score_mod."""
    from torch.nn.attention.flex_attention import flex_attention

    def causal(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return torch.where(q >= k, score, -float("inf"))

    B, T, C = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
    return self.c_proj(flex_attention(q, k, v, score_mod=causal).transpose(1, 2).contiguous().view(B, T, C))


def test_check_parity_of_a_model_with_flex_attention() -> None:
    """Watching the source's dtypes runs it under a Python dispatch mode, which a higher-order operator
    (flex_attention) refuses: check_parity raised NotImplementedError (diff review); it runs it unwatched."""
    import types

    gpt = scramble(GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=True)))
    for block in gpt.transformer.h:
        block.attn.forward = types.MethodType(_flex_forward, block.attn)
    report = check_parity(gpt, converter="nanogpt", seq_len=16)
    assert report.ok and report.rtol == 1e-3, str(report)  # float32 throughout: watched at the function level

    def bf16_mlp(self: nn.Module, x: Tensor) -> Tensor:
        def linear(layer: nn.Linear, t: Tensor) -> Tensor:
            return F.linear(t.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16())
        return linear(self.c_proj, self.gelu(linear(self.c_fc, x))).float()

    for block in gpt.transformer.h:
        block.mlp.forward = types.MethodType(bf16_mlp, block.mlp)
    report = check_parity(gpt, converter="nanogpt", seq_len=16)  # diff review: failed at 1e-3, unwatched
    assert report.ok and report.rtol == 5e-2, str(report)

    # at the function level a cast is a half result from a float32 input, however the dtype is named:
    # x.type_as(a bf16 buffer) is one (diff review: missed); a bf16 constant made from nothing is not (taken
    # for one, it gave a float32 model the loose tolerance)
    def type_as_mlp(self: nn.Module, x: Tensor) -> Tensor:
        def linear(layer: nn.Linear, t: Tensor) -> Tensor:
            return F.linear(t.type_as(self.ref), layer.weight.type_as(self.ref), layer.bias.type_as(self.ref))
        return linear(self.c_proj, self.gelu(linear(self.c_fc, x))).float()

    def constant_mlp(self: nn.Module, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x))) * torch.tensor(1.0, dtype=torch.bfloat16)

    for mlp, rtol in ((type_as_mlp, 5e-2), (constant_mlp, 1e-3)):
        for block in gpt.transformer.h:
            block.mlp.register_buffer("ref", torch.zeros((), dtype=torch.bfloat16), persistent=False)
            block.mlp.forward = types.MethodType(mlp, block.mlp)
        report = check_parity(gpt, converter="nanogpt", seq_len=16)
        assert report.ok and report.rtol == rtol, (mlp.__name__, str(report))


def test_zeros_of_many_shapes_are_never_shared_by_a_conversion() -> None:
    """The zeros cache was cleared at 64 shapes, so a conversion past that point returned a zeros tensor
    that stood for several biases uncloned (diff review)."""
    from lens_callback.convert import base

    width = 1000
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=24, bias=False)
    for residue in range(56, 64):  # the old cache was cleared at its 64th entry: at some point mid-conversion
        while len(base._SHARED_ZEROS) % 64 != residue:
            base.shared_zeros(torch.empty(0), width)
            width += 1
        _, weights = convert("nanogpt", config.to_dict(), GPT(config).state_dict())
        zeros = [key for key in weights if key.endswith((".b", "b_O", "b_in", "b_out", "b_U", "b_Q", "b_K", "b_V"))]
        assert len({id(weights[key]) for key in zeros}) == len(zeros), residue


@pytest.mark.parametrize(("name", "fn", "cast"), [
    ("x.to(bf16)", lambda x, b, i: x.to(torch.bfloat16), True),
    ("x.half()", lambda x, b, i: x.half(), True),
    ("x.type_as(bf16 buffer)", lambda x, b, i: x.type_as(b), True),
    ("x.to(bf16 buffer)", lambda x, b, i: x.to(b), True),
    ("int ids.to(bf16)", lambda x, b, i: i.to(torch.bfloat16), True),
    ("arange(dtype=bf16)", lambda x, b, i: torch.arange(4, dtype=torch.bfloat16), True),
    ("bf16 buffer * 0-dim float32", lambda x, b, i: b * x.max(), False),
    ("where(mask, bf16 buffer, 0-dim float32)", lambda x, b, i: torch.where(b > 0, b, x.max()), False),
    ("bf16 buffer.add_(float32)", lambda x, b, i: b.clone().add_(x), False),
    ("bf16 table[ids]", lambda x, b, i: b[i], False),
    ("tensor(1.0, dtype=bf16)", lambda x, b, i: torch.tensor(1.0, dtype=torch.bfloat16), False),
])
def test_the_function_level_cast_watch_sees_what_the_dispatch_level_one_sees(name: str, fn: Any, cast: bool) -> None:
    """The torch-function watch (for forwards a dispatch mode cannot run, e.g. with flex_attention) took a
    bf16 constant, and then a half buffer times a 0-dim float32, for casts, giving float32 models the loose
    tolerance, and missed x.type_as(bf16 buffer) (diff reviews); it now agrees with the dispatch watch."""
    from lens_callback.convert.parity import HalfPrecisionOutputs, _FunctionWatch

    x, b, i = torch.randn(4), torch.randn(4).bfloat16(), torch.arange(4)
    for make in (HalfPrecisionOutputs, lambda: _FunctionWatch(watch := HalfPrecisionOutputs())):
        mode = make()
        seen = mode if isinstance(mode, HalfPrecisionOutputs) else mode.watch
        with mode:
            fn(x, b, i)
        assert seen.half_precision == cast, (name, type(mode).__name__)


@pytest.mark.parametrize("message", [
    "HigherOrderOperator flex_attention has no rule for mode HalfPrecisionOutputs",  # torch >= 2.7's words
    "There was no rule registered for HOP flex_attention and mode HalfPrecisionOutputs",  # torch 2.6's
])
def test_a_forward_no_mode_can_watch_runs_unwatched_whatever_torchs_words(message: str) -> None:
    """Under torch 2.6 a flex-attention model's parity check raised instead of running unwatched: the
    fallback looked for "HigherOrderOperator" in the error (the compat review)."""
    from lens_callback.convert.parity import HalfPrecisionOutputs

    calls: list[bool] = []

    def forward() -> str:
        calls.append(True)
        if len(calls) < 3:  # the dispatch watch, then the function watch
            raise NotImplementedError(message)
        return "ran"

    watch = HalfPrecisionOutputs()
    assert watch.call(forward) == "ran" and len(calls) == 3 and not watch.watched
    with pytest.raises(NotImplementedError, match="something else"):
        HalfPrecisionOutputs().call(lambda: (_ for _ in ()).throw(NotImplementedError("something else")))


def test_an_integer_weight_is_refused_and_a_bool_buffer_with_a_declared_shape_is_not(tmp_path: Path) -> None:
    """A source weight stored as integers was cast into the model without a word; the first check
    for it refused every non-floating tensor with a declared shape, so a converter whose
    ``expected_shapes`` covers the model's whole state dict (as the built-in one's does) failed on a
    model keeping a bool mask buffer, and so did its snapshots (diff review). What is checked is what
    the converter makes: every HookedTransformer weight is floating point."""
    from lens_callback.snapshots import load_snapshot, save_snapshot

    class MaskedToyLM(ToyLM):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.tril(torch.ones(self.n_ctx, self.n_ctx, dtype=torch.bool)))

    class MaskedToyConverter(ToyConverter):
        name = "toy-masked"

        def expected_keys(self, c: Mapping[str, Any]) -> set[str]:
            return super().expected_keys(c) | {"mask"}

        def expected_shapes(self, c: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
            with torch.device("meta"):
                reference = MaskedToyLM()
            return {k: tuple(v.shape) for k, v in reference.state_dict().items()}

    converter = register_converter(MaskedToyConverter())
    try:
        torch.manual_seed(0)
        model = MaskedToyLM()
        config = converter.model_config(model)
        convert(converter.name, config, model.state_dict())
        path = save_snapshot(tmp_path, 10, converter=converter.name, model_config=config, state_dict=model.state_dict())
        load_snapshot(path)
        state = dict(model.state_dict())
        state["backbone.pos_emb.weight"] = (state["backbone.pos_emb.weight"] * 100).round().to(torch.int32)
        with pytest.raises(ConversionError, match=r"converter 'toy-masked' made weights that are not floating point "
                                                  r"\(from source weights stored as integers\?\): pos_embed\.W_pos: int32"):
            convert(converter.name, config, state)
    finally:
        unregister_converter(converter.name)


def test_a_converter_for_a_subclass_of_gpt_is_inferred_over_the_built_in_one() -> None:
    """The built-in nanogpt converter accepts any nanogpt_model.GPT subclass, so a user's converter
    for a variant made "several converters match ... pass converter=..." (custom-architecture review)."""
    from lens_callback.convert import infer_converter
    from lens_callback.convert.nanogpt import NanoGPTConverter

    class VariantGPT(GPT):
        pass

    class VariantConverter(NanoGPTConverter):
        name = "variant-gpt"

        def matches(self, model: nn.Module) -> bool:
            return isinstance(model, VariantGPT)

    class OtherVariantConverter(VariantConverter):
        name = "variant-gpt-2"

    model = VariantGPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    assert infer_converter(model).name == "nanogpt"  # no converter of yours: the built-in one
    register_converter(VariantConverter())
    try:
        assert infer_converter(model).name == "variant-gpt"
        assert infer_converter(GPT(model.config)).name == "nanogpt"
        register_converter(OtherVariantConverter())
        with pytest.raises(ValueError, match=r"several converters match a VariantGPT: \['variant-gpt', 'variant-gpt-2'\]"):
            infer_converter(model)
    finally:
        unregister_converter("variant-gpt")
        unregister_converter("variant-gpt-2")


def test_the_check_parity_call_the_callbacks_error_names_sees_the_same_difference() -> None:
    """The callback's parity error named a check_parity call that drew other tokens and noise and
    added an atol: it could say OK where the callback had failed (custom-architecture review)."""
    import re

    from lens_callback import LensCallback

    class WrongOutput(ToyConverter):
        name = "toy-wrong-output"

        def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
            out = super().convert_weights(c, sd)
            nh, d = c["n_heads"], c["d_model"]
            for i in range(c["n_layers"]):
                out[f"blocks.{i}.attn.W_O"] = sd[f"backbone.layers.{i}.attn.out.weight"].reshape(nh, -1, d)  # no .T
            return out

    converter = register_converter(WrongOutput())
    try:
        torch.manual_seed(0)
        model = ToyLM()
        with pytest.raises(ConversionError) as caught:
            LensCallback(converter=converter.name, every_n_steps=None, log_spaced=False, repeat_length=4, text_len=8,
                         seed=5).attach(model)
        message = str(caught.value)
        call = re.search(r"check_parity\(model, 'toy-wrong-output', seq_len=(\d+), seed=(\d+), atol=0\)", message)
        assert call is not None, message
        diff = re.search(r"differ from the model's by up to (\S+) \(largest logit (\S+),", message)
        report = check_parity(model, converter.name, seq_len=int(call[1]), seed=int(call[2]), atol=0)
        assert not report.ok
        assert f"{report.max_logit_diff:.3g}" == diff[1] and f"{report.scales[-1]:.3g}" == diff[2], (str(report), message)
    finally:
        unregister_converter(converter.name)


def test_a_model_config_key_the_converter_reads_and_the_config_lacks_is_named_with_the_fix() -> None:
    """A snapshot written before its converter read a new key was told to 'add it to model_config',
    which the snapshot's stored config cannot be (custom-architecture review)."""

    class ReadsNewKey(ToyConverter):
        name = "toy-reads-new-key"

        def hooked_config(self, c: Mapping[str, Any]) -> HookedTransformerConfig:
            assert c["qk_norm"] is False
            return super().hooked_config(c)

    model = ToyLM()
    config = ToyConverter().model_config(model)  # as an older converter stored it
    with pytest.raises(ConversionError, match=r"'toy-reads-new-key': hooked_config reads model_config\['qk_norm'\], "
                                              r"which this model_config does not set \(it sets .*n_ctx.*\).*"
                                              r"read a key added later with model_config\.get\('qk_norm', default\)"):
        convert(ReadsNewKey(), config, model.state_dict())
    convert(ReadsNewKey(), {**config, "qk_norm": False}, model.state_dict())


def test_a_model_config_key_read_in_expected_keys_and_missing_is_named_too() -> None:
    """Read in expected_keys, as the README recommends checking keys, a key an older snapshot's
    model_config lacks raised a bare KeyError from load_snapshot (diff review)."""

    class ExpectsNewKey(ToyConverter):
        name = "toy-expects-new-key"

        def expected_keys(self, c: Mapping[str, Any]) -> set[str]:
            assert c["scale_attn"] is True
            return super().expected_keys(c)

    model = ToyLM()
    config = ToyConverter().model_config(model)
    with pytest.raises(ConversionError, match=r"'toy-expects-new-key': expected_keys reads model_config\['scale_attn'\].*"
                                              r"model_config\.get\('scale_attn', default\)"):
        convert(ExpectsNewKey(), config, model.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_callbacks_parity_error_says_how_the_call_it_names_differs(dtype: torch.dtype) -> None:
    """The named check_parity call ran a half-precision model in its own dtype (and said OK where the
    callback, in float32, had failed), and compared no prefixes for nanoGPT's last-position forward
    (diff review): the error now says both."""
    from lens_callback import LensCallback
    from lens_callback.convert.nanogpt import NanoGPTConverter

    class ScalesTheMLP(NanoGPTConverter):
        name = "scales-the-mlp"

        def convert_weights(self, c: Mapping[str, Any], sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
            out = super().convert_weights(c, sd)
            return {k: v * 1.5 if k.endswith("mlp.W_out") else v for k, v in out.items()}

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).to(dtype)
    with pytest.raises(ConversionError) as caught:
        LensCallback(converter=ScalesTheMLP(), every_n_steps=None, log_spaced=False, repeat_length=4,
                     text_len=8).attach(model)
    message = str(caught.value)
    assert "compared prefixes of the tokens at their last positions" in message, message
    assert ("on a float32 copy (copy.deepcopy(model).float())" in message) == (dtype == torch.bfloat16), message


def test_a_missing_key_read_in_optional_keys_is_named_there() -> None:
    """Wrapped with expected_keys, a key optional_keys read was said to be read in expected_keys (diff review)."""

    class OptionalReadsNewKey(ToyConverter):
        name = "toy-optional-new-key"

        def optional_keys(self, c: Mapping[str, Any]) -> set[str]:
            return set() if c["tied"] else set()

    model = ToyLM()
    with pytest.raises(ConversionError, match=r"optional_keys reads model_config\['tied'\]"):
        convert(OptionalReadsNewKey(), ToyConverter().model_config(model), model.state_dict())


# -- the README's custom-architecture guide, as written ----------------------------------------------
@pytest.fixture
def readme_my_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The guide's ``my_arch.py``, as the README prints it, in ``tmp_path`` (the working directory, first on
    ``sys.path``) beside a ``my_model`` whose ``MyGPT`` is this module's `ToyLM`, a model of the state dict the
    README lists; yields the converter's source. Afterwards the guide's converters (``my-arch`` and the tests'
    ``my-arch-wrong``) are unregistered and the modules forgotten."""
    from lens_callback.convert import unregister_converter

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_model.py").write_text("from test_convert import ToyLM as MyGPT  # noqa: F401\n")
    converter = readme_block("python", "# my_arch.py\n")
    (tmp_path / "my_arch.py").write_text(converter)
    try:
        yield converter
    finally:
        unregister_converter("my-arch")
        unregister_converter("my-arch-wrong")
        for name in ("my_arch", "my_arch_wrong", "my_model"):
            sys.modules.pop(name, None)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LensCallback found no")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_the_readmes_custom_architecture_guide_runs_as_written(readme_my_arch: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """README's ``my_arch.py`` converter, its ``check_parity`` lines and its snapshot lines, run as the README
    prints them (``my_model.MyGPT`` is this module's `ToyLM`, a model of the state dict the README lists),
    with a fit by the README's ``LensCallback(...)`` call between them. Other tests use copies of the
    converter (`ToyConverter`), so an edit of the README's own code that broke it went unseen. Then the
    README's ``lens-probe runs/my-arch/snapshots ... --import my_arch`` line re-probes the snapshots."""
    from lens_callback import read_metrics
    from lens_callback.convert import unregister_converter
    from lens_callback.posthoc import main as lens_probe

    scope: dict[str, Any] = {}
    exec(readme_block("python", "report = check_parity("), scope)  # noqa: S102 - the README's own lines
    report = scope["report"]
    assert report.ok and report.converter == "my-arch"
    printed = capsys.readouterr().out
    assert printed.startswith("converter 'my-arch': max |logit diff| = ") and "(OK at " in printed
    sites = [line.strip().split("  ")[0] for line in printed.splitlines()[1:]]
    assert sites == ["embed (resid_pre 0)", "block 0 (resid_post)", "block 1 (resid_post)", "logits"]

    training = readme_block("python", "cb = LensCallback(converter=\"my-arch\"")
    (call,) = re.findall(r"^cb = LensCallback\(.*?\)\n", training, flags=re.S | re.M)
    exec(training.split("\n\n\nclass LitMyGPT")[0], scope)  # noqa: S102 - its imports
    exec(call, scope)  # noqa: S102
    cb = scope["cb"]
    # README's LitMyGPT: its net, with the training step and data its `...` leaves to the reader
    net = scope["MyGPT"](vocab_size=256, n_ctx=128, d_model=128, n_layers=2, n_heads=4)
    L.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=[cb], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(ToyLightningModule(net))
    assert cb.probed_steps == [0, 1, 2] and dict(cb.errors) == {}  # log-spaced early steps, and the last
    written = cb.snapshot_steps_written
    assert written[0] == 0 and written[-1] == 2

    snapshots: dict[str, Any] = {}
    exec(readme_block("python", "hooked = load_snapshot(last.path)"), snapshots)  # noqa: S102
    assert isinstance(snapshots["hooked"], HookedTransformer) and snapshots["last"].step == 2
    assert [step for step, _ in snapshots["results"]] == written
    for step, scalars in snapshots["results"]:  # the live callback's numbers, step by step
        assert scalars["lens/induction/max"] == pytest.approx(cb.history[step]["lens/induction/max"], abs=1e-5)

    # the README's command line for them, as a fresh process runs it: my_arch imported by its --import
    unregister_converter("my-arch")
    sys.modules.pop("my_arch", None)
    (command,) = [words for words in readme_commands("lens-probe", {}) if "--import" in words]
    assert command[0] == "runs/my-arch/snapshots" and lens_probe(command) == 0
    assert sorted(set(read_metrics(command[command.index("--logdir") + 1])["step"])) == written


def _masked_rounding(report: str) -> str:
    """A parity report with its differences at float32 rounding (1e-6 and below) written as ``<rounding>``:
    those depend on the machine's kernels, the others (a slip's, the tolerance) do not."""
    return re.sub(r"\b\d\.\d+e-(0[5-9]|[1-9]\d)\b", "<rounding>", report.strip())


@pytest.mark.slow
def test_the_readmes_parity_reports_are_what_its_check_parity_lines_print(tmp_path: Path, readme_my_arch: str,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """README's two ``check_parity`` outputs, as printed by its ``check_parity`` lines: the first on its
    ``my_arch.py`` converter, the second on the same converter with ``.T`` left off ``W_O`` (README: "here is
    the same converter with .T left off W_O"), registered as ``my-arch-wrong``, whose ``first_divergence``
    the README names too. (``my_model.MyGPT`` is this module's `ToyLM`, as in the guide's test above.)"""
    w_o = 'sd[f"{s}.attn.out.weight"].T.reshape'
    assert readme_my_arch.count(w_o) == 1, "README: the converter's W_O line changed"
    (tmp_path / "my_arch_wrong.py").write_text(
        readme_my_arch.replace(w_o, w_o.replace(".T.", ".")).replace('name = "my-arch"', 'name = "my-arch-wrong"'))
    parity = readme_block("python", "report = check_parity(")
    exec(parity, {})  # noqa: S102 - the README's own lines
    assert _masked_rounding(capsys.readouterr().out) == _masked_rounding(
        readme_block("text", "converter 'my-arch': max |logit diff|"))
    scope: dict[str, Any] = {}
    with pytest.raises(AssertionError) as failed:  # its last line, report.raise_if_failed()
        exec(parity.replace("import my_arch ", "import my_arch_wrong ").replace('"my-arch")', '"my-arch-wrong")'),
             scope)  # noqa: S102
    assert str(failed.value) == str(scope["report"])  # README: "AssertionError with the same text"
    assert _masked_rounding(capsys.readouterr().out) == _masked_rounding(
        readme_block("text", "converter 'my-arch-wrong': max |logit diff|"))
    (named,) = re.findall(r'`report\.first_divergence` \(here\s+`"(.*?)"`\)', (REPO / "README.md").read_text())
    assert scope["report"].first_divergence == named


class _HuggingFaceStyleGPT(GPT):
    """README's nanoGPT "whose forward is Hugging Face style": ``forward(input_ids, labels=None)`` returning an
    object with ``.logits`` (and ``.loss``)."""

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> Any:  # type: ignore[override]
        logits, loss = super().forward(input_ids, labels, all_positions=True)
        return SimpleNamespace(logits=logits, loss=loss)


class _HuggingFaceStyleModule(L.LightningModule):
    """Trains a `_HuggingFaceStyleGPT` held at ``net`` on random sequences, through its ``labels``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _HuggingFaceStyleGPT(GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=16))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (seq,) = batch
        return self.net(seq[:, :-1], labels=seq[:, 1:].contiguous()).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.randint(0, 64, (8, 65), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)


@pytest.mark.filterwarnings("ignore:LensCallback found no")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.filterwarnings("error:LensCallback could not compare")  # README: its check runs the override
def test_the_readmes_hugging_face_style_nanogpt_converter_runs_as_written(tmp_path: Path) -> None:
    """README's ``HFNanoGPT`` lines, as printed: their ``LensCallback(...)`` trains a nanoGPT whose forward is
    Hugging Face style, its parity check run through the ``source_logits`` override, and its snapshots reload
    through the built-in converter, without the subclass (README: "without your code")."""
    from lens_callback import list_snapshots, load_snapshot

    made: list[LensCallback] = []

    def recorded(*args: Any, **kwargs: Any) -> LensCallback:
        made.append(LensCallback(*args, **kwargs))
        return made[-1]

    exec(readme_block("python", "class HFNanoGPT(NanoGPTConverter)"), {"LensCallback": recorded})  # noqa: S102
    (cb,) = made
    module = _HuggingFaceStyleModule()
    L.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=[cb], logger=TensorBoardLogger(tmp_path),
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(module)
    assert cb.probed_steps == [0, 1, 2] and dict(cb.errors) == {}
    last = list_snapshots(tmp_path / "lightning_logs" / "version_0" / "snapshots")[-1]
    assert last.step == 2 and last.converter == "nanogpt"
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(load_snapshot(last.path)(tokens), module.net.eval()(tokens).logits, atol=1e-5, rtol=1e-4)


def test_the_readmes_state_dict_listing_is_toylms() -> None:
    """README's state dict of its worked example (``{i}`` each layer, ``{weight,bias}`` both, ``+ bias`` a bias of
    the weight's first size; a name without a shape has the one before it) is `ToyLM`'s, which the guide's
    test runs as ``my_model.MyGPT``: key for key and shape for shape."""
    vocab, n_ctx, d, n_layers = 48, 16, 32, 2
    sizes = {"vocab": vocab, "n_ctx": n_ctx, "d": d, "3d": 3 * d, "4d": 4 * d}
    listed: dict[str, tuple[int, ...]] = {}
    shape: tuple[int, ...] = ()
    entry = r"((?:backbone|head)\.\S+)(?:\s+\(([^)]*)\))?(\s+\+ bias)?"
    for name, dims, bias in re.findall(entry, readme_block("text", "backbone.tok_emb.weight")):
        shape = tuple(sizes[dim.strip()] for dim in dims.split(",") if dim.strip()) if dims else shape
        for i in range(n_layers):
            for key in {name.replace("{i}", str(i)).replace("{weight,bias}", part) for part in ("weight", "bias")}:
                listed[key] = shape
                if bias:
                    listed[key.replace(".weight", ".bias")] = shape[:1]
    model = ToyLM(vocab, n_ctx, d, n_layers, n_heads=4)
    assert listed == {key: tuple(value.shape) for key, value in model.state_dict().items()}
