"""Tests of `lens_callback.probes.attention`: the lean attention forward gives TransformerLens's
numbers (bitwise on CPU with TransformerLens's norms and the pattern always built, the `bitwise_lean` fixture;
to rounding with the default fused norms and fused attention) at every hook point, honours replacing hooks, falls back where it must,
and the callback checks it against TransformerLens when it attaches."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformer_lens import HookedTransformer, HookedTransformerConfig, TransformerLensKeyValueCache

import lens_callback.probes.attention as attention_module
from lens_callback import LensCallback, LensError, to_hooked_transformer
from lens_callback.measure import DEFAULT_PROBES, build_runner
from lens_callback.probes import (
    AttentionEntropyProbe,
    AttentionWorkspace,
    ProbeInputs,
    lean_attention,
    lean_attention_unsupported,
    repeated_tokens,
    verify_lean_attention,
)
from lens_callback.convert import copy_weights
from lens_callback.probes.attention import _mask_future_, lean_mlp_unsupported, pack_attention_weights
from lens_callback.probes.runner import rows_per_chunk
from nanogpt_model import GPT, GPTConfig


def tl_model(**overrides: Any) -> HookedTransformer:
    fields: dict[str, Any] = dict(
        n_layers=2, d_model=24, n_ctx=96, d_head=6, n_heads=4, d_mlp=32, d_vocab=29,  # sqrt(6): inexact scale
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    fields.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**fields))
    with torch.no_grad():  # sharper attention than the default init
        for name, param in model.named_parameters():
            if name.endswith(("W_Q", "W_K")):
                param.mul_(8.0)
    return model.eval()


def modern_model() -> HookedTransformer:
    """Rotary (GPT-NeoX halves), RMSNorm, SwiGLU: the "nanogpt-modern" conversion of a GPT."""
    gen = torch.Generator().manual_seed(0)
    gpt = GPT(GPTConfig(block_size=96, vocab_size=29, n_layer=2, n_head=4, n_embd=24, bias=False,
                        architecture="modern"))
    with torch.no_grad():
        for p in gpt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 5.0) + (p.dim() == 1))
    return to_hooked_transformer(gpt).eval()


def biased_model() -> HookedTransformer:
    """Every bias non-zero (TransformerLens initialises them to zeros): the lean forwards keep them."""
    model = tl_model()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("b"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


MODELS = {
    "gpt2-style": lambda: tl_model(),
    "random-biases": biased_model,
    "no-bias-rms": lambda: tl_model(normalization_type="RMS", act_fn="relu"),
    "inverse-layer-scale": lambda: tl_model(scale_attn_by_inverse_layer_idx=True),
    "modern-rotary": modern_model,
    "bfloat16": lambda: tl_model(dtype=torch.bfloat16),
}


def make_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Norms on the CPU keep TransformerLens's own operators and the attention always builds the
    pattern (no fused attention), so the lean path is bitwise comparable with TransformerLens's."""
    monkeypatch.setattr(attention_module, "EXACT_NORM_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(attention_module, "FUSED_ATTENTION", False)


@pytest.fixture
def bitwise_lean(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make_bitwise` for one test."""
    make_bitwise(monkeypatch)


def assert_rounding_level(lean: Tensor, reference: Tensor, truth: Tensor) -> None:
    """``lean`` is as far from the float64 ``truth`` as TransformerLens's own float32 ``reference``, to
    rounding: at most twice its error plus 3e-5 of the largest logit. (Twice alone was a lottery: on
    24 tokens of the gpt2-style model TransformerLens happened to be 2.3e-5 off and the fused norms
    6.1e-5, both rounding at logits of 2.85; a mapping mistake moves them by 1e-3 and more.)"""
    tl_error = (reference.double() - truth).abs().max()
    error = (lean.double() - truth).abs().max()
    assert error <= 2 * tl_error + 3e-5 * truth.abs().max(), (float(error), float(tl_error))


def tokens(batch: int = 3, seq_len: int = 24, vocab: int = 29, seed: int = 1) -> Tensor:
    return torch.randint(vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def count_class_forward_calls(module_class: type[nn.Module], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patches ``module_class.forward`` to record ``id(module)`` of every call into the returned list."""
    calls: list[int] = []
    original = module_class.forward

    def counting(self: nn.Module, x: Tensor) -> Tensor:
        calls.append(id(self))
        return original(self, x)

    monkeypatch.setattr(module_class, "forward", counting)
    return calls


@pytest.mark.usefixtures("bitwise_lean")
@pytest.mark.parametrize("seq_len", [24, 90])  # 90: the causal mask in row blocks (`_mask_future_`)
@pytest.mark.parametrize("kind", list(MODELS))
@torch.no_grad()
def test_every_hook_and_the_logits_are_bitwise_transformer_lens(kind: str, seq_len: int) -> None:
    model = MODELS[kind]()
    toks = tokens(seq_len=seq_len)
    reference, ref_cache = model.run_with_cache(toks)
    plain_reference = model(toks)
    with lean_attention(model) as patched:
        assert len(patched) == model.cfg.n_layers
        logits, cache = model.run_with_cache(toks)  # hooks on attn_scores: the two-allocation path
        plain = model(toks)  # no hooks: softmax written over the scores
        mlp_patched = ["forward" in vars(block.mlp) for block in model.blocks]
        # every hook but ln1's, which TransformerLens fires three times per block: the lean blocks run
        block_logits, block_cache = model.run_with_cache(toks, names_filter=lambda name: ".ln1." not in name)
        assert all("forward" in vars(block) for block in model.blocks)
    assert torch.equal(logits, reference) and torch.equal(plain, plain_reference)
    assert torch.equal(block_logits, reference) and len(block_cache) == len(ref_cache) - 2 * model.cfg.n_layers
    for name in block_cache.keys():
        assert torch.equal(block_cache[name], ref_cache[name]), name
    assert mlp_patched == [kind != "modern-rotary"] * model.cfg.n_layers  # the modern arch's GatedMLP stays
    assert set(cache.keys()) == set(ref_cache.keys())
    for name in ref_cache.keys():
        assert torch.equal(cache[name], ref_cache[name]), name
    assert all("forward" not in vars(module) for module in model.modules())  # class forward back


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 2, 90, 90), (2, 1, 257, 257), (3, 2, 7, 7), (1, 1, 1, 1)])
def test_future_mask_in_row_blocks_equals_one_masked_fill(shape: tuple[int, ...]) -> None:
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ignore = torch.tensor(-torch.inf)
    future = torch.ones(shape[-2:], dtype=torch.bool).triu_(1)
    expected = scores.masked_fill(future, ignore)
    _mask_future_(scores, ignore)
    assert torch.equal(scores, expected)


@pytest.mark.usefixtures("bitwise_lean")
@pytest.mark.parametrize("kind", ["gpt2-style", "no-bias-rms", "modern-rotary", "parallel"])
@torch.no_grad()
def test_ln1_is_computed_once_per_block_unless_it_is_hooked(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequential blocks run `lean_block_forward`; a parallel (GPT-J-style) block keeps
    TransformerLens's forward, whose three ``ln1`` calls share one computation."""
    model = tl_model(parallel_attn_mlp=True) if kind == "parallel" else MODELS[kind]()
    calls = count_class_forward_calls(type(model.blocks[0].ln1), monkeypatch)
    toks = tokens(seq_len=70)
    ln1s = {id(block.ln1) for block in model.blocks}
    reference = model(toks)
    assert sum(c in ln1s for c in calls) == 3 * model.cfg.n_layers  # TransformerLens: query, key, value inputs
    calls.clear()
    with lean_attention(model):
        lean_blocks = ["forward" in vars(block) for block in model.blocks]
        assert lean_blocks == [kind != "parallel"] * model.cfg.n_layers
        assert torch.equal(model(toks), reference)
        assert sum(c in ln1s for c in calls) == model.cfg.n_layers  # once per block
        if kind == "parallel":
            memos = [model.blocks[i].ln1.forward.__func__.keywords["memo"] for i in range(model.cfg.n_layers)]
            assert memos == [[]] * model.cfg.n_layers  # nothing kept after the block

        calls.clear()
        seen: list[Tensor] = []
        model.run_with_hooks(toks, fwd_hooks=[("blocks.0.ln1.hook_normalized", lambda a, hook: seen.append(a))])
        assert len(seen) == 3 and sum(c == id(model.blocks[0].ln1) for c in calls) == 3  # hooked: TL's three calls
        assert sum(c == id(model.blocks[1].ln1) for c in calls) == 1
    assert all("forward" not in vars(module) for module in model.modules())
    assert "parallel attention and MLP" in attention_module.lean_block_unsupported(tl_model(parallel_attn_mlp=True).blocks[0])
    assert "not transformer_lens.components.Attention" in attention_module.lean_block_unsupported(
        tl_model(n_key_value_heads=2).blocks[0]
    )


class _CountClones(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.clones = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.clones += func is torch.ops.aten.clone.default
        return func(*args, **(kwargs or {}))


@pytest.mark.usefixtures("bitwise_lean")
@pytest.mark.parametrize(("n_heads", "d_head"), [(2, 16), (4, 64)])  # 64 = T: the keys' buffer has the scores' shape
@torch.no_grad()
def test_packed_lean_attention_with_a_workspace_is_bitwise_transformer_lens(n_heads: int, d_head: int) -> None:
    """Joint query-key-value weights and a workspace: every hook point and the logits bitwise
    TransformerLens's, on the first run and on the second, which reuses the buffers. The keys'
    buffer keeps its own role when it has the scores' shape (``d_head == T``). (The copies are the
    operands ``torch.matmul`` makes; k as a transposed view instead changed a few probe results
    in the last bit in ``test_snapshots.py``, which compares a packed sweep with the unpacked
    live run.)"""
    model = tl_model(d_model=n_heads * d_head, d_head=d_head, n_heads=n_heads, d_mlp=128, n_ctx=64)
    toks = tokens(batch=4, seq_len=64)
    names = lambda name: name.endswith(("hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z"))  # noqa: E731
    reference, ref_cache = model.run_with_cache(toks, names_filter=names)
    pack_attention_weights(model)
    workspace = AttentionWorkspace()
    seen: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook: Any) -> None:
        seen[hook.name] = activation.clone()  # borrowed from the workspace

    hooks = [(name, keep) for name in ref_cache.keys()]
    for _ in range(2):  # the second run reuses the buffers
        with lean_attention(model, workspace=workspace):
            assert torch.equal(model.run_with_hooks(toks, fwd_hooks=hooks), reference)
        for name in ref_cache.keys():
            assert torch.equal(seen[name], ref_cache[name]), name


@pytest.mark.usefixtures("bitwise_lean")  # counts the materialised path's copies
@pytest.mark.parametrize("kind", list(MODELS))
@torch.no_grad()
def test_packed_attention_weights_give_the_same_bits_without_weight_copies(kind: str) -> None:
    model = MODELS[kind]()
    toks = tokens(seq_len=70)
    before = {name: param.clone() for name, param in model.named_parameters()}
    reference = model(toks)
    not_ln1 = lambda name: ".ln1." not in name  # noqa: E731 - ln1 hooks would turn the lean blocks off
    with lean_attention(model):
        with _CountProducts() as separate, _CountClones() as separate_clones:
            lean_reference = model(toks)
        _, lean_cache = model.run_with_cache(toks, names_filter=not_ln1)
    with _CountClones() as unpacked:
        model(toks)

    assert pack_attention_weights(model) == model.cfg.n_layers
    for name, param in model.named_parameters():
        assert param.shape == before[name].shape and torch.equal(param, before[name]), name
    attn = model.blocks[0].attn
    assert not attn.W_Q.is_contiguous() and not attn.W_O.is_contiguous()
    with _CountClones() as packed:
        assert torch.equal(model(toks), reference)
    assert unpacked.clones - packed.clones == 4 * model.cfg.n_layers  # W_Q, W_K, W_V, W_O rearranged as views
    with lean_attention(model):
        with _CountProducts() as joint, _CountClones() as joint_clones:
            assert torch.equal(model(toks), lean_reference)
        _, cache = model.run_with_cache(toks, names_filter=not_ln1)
    # one product for the query, key and value (`packed_qkv`), the same bits at every hook point
    assert attention_module.packed_qkv(attn) is not None
    assert joint.addmm + joint.mm == separate.addmm + separate.mm - 2 * model.cfg.n_layers
    # no rearranged weight copies (4 per layer) and, without rotary embeddings, two copies of q, k
    # and v (q and v heads first, k transposed) where torch.matmul made three
    fewer = 0 if model.cfg.positional_embedding_type == "rotary" else model.cfg.n_layers
    assert separate_clones.clones - joint_clones.clones == 4 * model.cfg.n_layers + fewer
    for name in lean_cache.keys():
        assert torch.equal(cache[name], lean_cache[name]), name

    # refreshed in place (the callback's copy_weights): new values, same layout, same results as a fresh model
    fresh = MODELS[kind]()
    with torch.no_grad():
        for param in fresh.parameters():
            param.mul_(0.5)
    pointers = {name: param.data_ptr() for name, param in model.named_parameters()}
    copy_weights(model, dict(fresh.named_parameters()))
    assert {name: param.data_ptr() for name, param in model.named_parameters()} == pointers
    assert not model.blocks[0].attn.W_Q.is_contiguous()
    assert torch.equal(model(toks), fresh(toks))
    with lean_attention(fresh):
        fresh_lean = fresh(toks)
    with lean_attention(model):
        assert torch.equal(model(toks), fresh_lean)

    # a parameter replaced (here W_K made contiguous) is no longer part of the joint layout
    attn.W_K = nn.Parameter(attn.W_K.contiguous())
    assert attention_module.packed_qkv(attn) is None
    with lean_attention(model):
        assert torch.equal(model(toks), fresh_lean)


class _CountProducts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.addmm = self.mm = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.addmm += func.overloadpacket is torch.ops.aten.addmm
        self.mm += func.overloadpacket is torch.ops.aten.mm
        return func(*args, **(kwargs or {}))


@pytest.mark.usefixtures("bitwise_lean")
@torch.no_grad()
def test_zero_biases_are_left_out_of_the_products_and_others_kept() -> None:
    toks = tokens(seq_len=40)
    zero, biased = tl_model(), biased_model()
    zero.blocks[1].attn.b_V.data[2, 3] = 0.5  # one non-zero entry: that bias is kept
    assert attention_module.zero_biases(zero.blocks[0].attn) == {"b_Q", "b_K", "b_V", "b_O"}
    assert attention_module.zero_biases(zero.blocks[1].attn) == {"b_Q", "b_K", "b_O"}
    assert attention_module.zero_biases(zero.blocks[0].mlp) == {"b_in", "b_out"}
    assert attention_module.zero_biases(biased.blocks[0].attn) == set()
    assert attention_module.zero_biases(zero.ln_final) == set()  # not a module with matrix products
    products = 1 + 6 * zero.cfg.n_layers  # the unembedding; Q, K, V, O, MLP in and out per layer
    for model, addmm in ((zero, 1 + 1), (biased, products)):  # zero: the unembedding and blocks.1's V
        reference = model(toks)
        with lean_attention(model), _CountProducts() as counted:
            assert torch.equal(model(toks), reference)
        assert counted.addmm == addmm and counted.addmm + counted.mm == products

    # the check is the CPU's: elsewhere it would wait for the device
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_module, "ZERO_BIAS_DEVICES", frozenset({"cuda"}))
        assert attention_module.zero_biases(zero.blocks[0].attn) == set()


def test_the_callback_packs_its_private_model_only() -> None:  # post-hoc sweeps: tests/test_snapshots.py
    gpt = GPT(GPTConfig(block_size=32, vocab_size=29, n_layer=2, n_head=2, n_embd=16))
    cb = LensCallback(every_n_steps=None, repeat_length=4, text_batch=0, probes=["induction"])
    with pytest.warns(UserWarning, match="no `train_data`"):
        cb.attach(gpt)
    assert not cb._hooked.blocks[1].attn.W_K.is_contiguous()
    assert to_hooked_transformer(gpt).blocks[1].attn.W_K.is_contiguous()  # a user's model keeps TL's layout


class _OperatorNames(TorchDispatchMode):
    """Records the name of every ATen operator dispatched and the largest tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.names.add(func.__name__.split(".")[0])
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


QKV_Z = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z")


@pytest.mark.parametrize("kind", [kind for kind in MODELS if kind != "bfloat16"])
@torch.no_grad()
def test_attention_nobody_reads_is_fused_and_equal_to_rounding(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no hook on the scores or the pattern, one SDPA call per layer and no [B, H, T, T]
    tensor: the logits and every query/key/value/z hook as close to a float64 forward as
    TransformerLens's own."""
    model = MODELS[kind]()
    toks = tokens(seq_len=70)
    reference, ref_cache = model.run_with_cache(toks)
    attention_hooks = lambda name: name.rsplit(".", 1)[-1] in QKV_Z  # noqa: E731
    with lean_attention(model):
        with _OperatorNames() as ops:
            fused = model(toks)
        _, cache = model.run_with_cache(toks, names_filter=attention_hooks)
        with _OperatorNames() as hooked_ops:  # a pattern hook on layer 0: that layer builds it
            seen: list[Tensor] = []
            model.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda a, hook: seen.append(a.clone()))])
    batch, seq_len = toks.shape
    square = batch * model.cfg.n_heads * seq_len * seq_len
    assert "_scaled_dot_product_flash_attention_for_cpu" in ops.names and "softmax" not in ops.names
    assert ops.largest < square  # no scores or pattern built
    assert "softmax" in hooked_ops.names and "_scaled_dot_product_flash_attention_for_cpu" in hooked_ops.names
    torch.testing.assert_close(seen[0], ref_cache["blocks.0.attn.hook_pattern"], atol=1e-5, rtol=0)
    assert len(cache) == len([name for name in ref_cache if attention_hooks(name)]) > 0
    # TransformerLens's float32 (or bfloat16) numbers and the fused ones, each against float64
    truth = MODELS[kind]().to(torch.float64)
    truth.cfg.dtype = torch.float64
    truth_logits, truth_cache = truth.run_with_cache(toks)
    for name, value in cache.items():
        assert_rounding_level(value, ref_cache[name], truth_cache[name])
    assert_rounding_level(fused, reference, truth_logits)
    monkeypatch.setattr(attention_module, "FUSED_ATTENTION", False)
    with lean_attention(model), _OperatorNames() as off:
        model(toks)
    assert "_scaled_dot_product_flash_attention_for_cpu" not in off.names and "softmax" in off.names


@torch.no_grad()
def test_a_nan_query_weight_gives_nan_where_transformer_lens_zeroes_the_pattern() -> None:
    """The one difference beyond rounding: TransformerLens zeroes NaN pattern rows (finite logits),
    the fused attention lets the NaN through as nanoGPT's SDPA does; the attach-time check does not
    call that a lean-path failure (the weights are not finite)."""
    model = tl_model()
    model.blocks[0].attn.W_Q[0, 0, 0] = float("nan")
    toks = tokens(seq_len=40)
    assert torch.isfinite(model(toks)).all()
    with lean_attention(model):
        assert torch.isnan(model(toks)).any()
        built = model.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda a, hook: None)])
    assert torch.isfinite(built).all()  # with the pattern built, TransformerLens's zeroing
    assert verify_lean_attention(model) is None


def test_verify_lean_attention_refuses_a_tolerance_that_is_not_a_finite_non_negative_number() -> None:
    """A NaN ``rtol`` compared as agreeing (``None``), a negative one as a mismatch (API review)."""
    model = tl_model()
    for rtol in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
            verify_lean_attention(model, rtol=rtol)
    assert verify_lean_attention(model, rtol=1e-4) is None
    assert verify_lean_attention(model, rtol=np.float32(1e-4)) is None  # numpy numbers pass (diff review)


@torch.no_grad()
def test_a_hook_on_the_scores_alone_is_honoured_with_fused_attention_on() -> None:
    """A hook that replaces layer 1's scores (nothing on the pattern) makes that layer build them:
    the result is TransformerLens's with the same hook, to rounding; layer 0 still runs fused."""
    model = tl_model()
    toks = tokens(seq_len=40)

    def flatten_head_0(scores: Tensor, hook: Any) -> Tensor:
        scores = scores.clone()
        scores[:, 0] = torch.where(torch.isinf(scores[:, 0]), scores[:, 0], torch.zeros_like(scores[:, 0]))
        return scores

    hooks = [("blocks.1.attn.hook_attn_scores", flatten_head_0)]
    reference = model.run_with_hooks(toks, fwd_hooks=hooks)
    assert not torch.allclose(reference, model(toks), atol=1e-3)  # the hook matters
    with lean_attention(model), _OperatorNames() as ops:
        lean = model.run_with_hooks(toks, fwd_hooks=hooks)
    assert "_scaled_dot_product_flash_attention_for_cpu" in ops.names and "_softmax" in ops.names  # out of place
    torch.testing.assert_close(lean, reference, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_a_probe_batch_nobody_reads_patterns_from_runs_fused() -> None:
    """Probes that read no pattern of a batch (the logit lens, the ICL score on the text batch) get
    their results from the fused attention, equal to TransformerLens's to rounding; the repeated
    batch, whose patterns the induction score reads, builds them."""
    model = tl_model()
    inputs = ProbeInputs(
        repeated=repeated_tokens(torch.arange(29), 4, 8, torch.Generator().manual_seed(0)),
        text=tokens(batch=4, seq_len=32),
    )
    runner = build_runner(["induction", "logit_lens", "icl_score"])
    calls: list[tuple[int, ...]] = []
    original = F.scaled_dot_product_attention

    def counting(q: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        calls.append(tuple(q.shape))
        return original(q, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", counting)
        lean = runner.run(model, inputs)
    plain = runner.run(model, inputs, lean_attention=False)
    assert calls == [(4, 4, 32, 6)] * model.cfg.n_layers  # the text batch only
    for key in plain:
        torch.testing.assert_close(lean[key], plain[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("kind", ["gpt2-style", "no-bias-rms", "modern-rotary"])
@torch.no_grad()
def test_fused_norms_match_transformer_lens_to_rounding(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default the norms are PyTorch's fused ones, equal to rounding; a hooked norm keeps
    TransformerLens's forward, whose hook sees its usual value."""
    model = MODELS[kind]()
    toks = tokens(seq_len=70)
    reference = model(toks)
    class_calls = count_class_forward_calls(type(model.ln_final), monkeypatch)
    with lean_attention(model):
        fused = model(toks)
        assert class_calls == []  # ln1 (once per block), ln2 and ln_final all fused
        scales: list[Tensor] = []
        hooked = model.run_with_hooks(toks, fwd_hooks=[("blocks.1.ln2.hook_scale", lambda a, hook: scales.append(a))])
    assert class_calls == [id(model.blocks[1].ln2)] and len(scales) == 1
    # the sharpened test models amplify rounding: measure both against a float64 forward
    monkeypatch.undo()
    truth = MODELS[kind]().to(torch.float64)
    truth.cfg.dtype = torch.float64
    truth = truth(toks)
    for lean in (fused, hooked):
        assert_rounding_level(lean, reference, truth)
    assert not torch.equal(fused, reference)  # really another computation
    assert attention_module.lean_norm_unsupported(tl_model(dtype=torch.bfloat16).ln_final) is not None
    assert attention_module.lean_norm_unsupported(tl_model(normalization_type="LNPre").ln_final) is not None


@pytest.mark.usefixtures("bitwise_lean")
@pytest.mark.parametrize(("act_fn", "reason"), [("gelu", None), ("relu", None), ("silu", None),
                                              ("gelu_new", "no in-place form"), ("solu_ln", "SoLU")])
@torch.no_grad()
def test_lean_mlp_covers_activations_with_an_in_place_twin(act_fn: str, reason: str | None) -> None:
    model = tl_model(act_fn=act_fn)
    why = lean_mlp_unsupported(model.blocks[0].mlp)
    assert why is None if reason is None else reason in why
    toks = tokens(seq_len=40)
    reference = model(toks)
    with lean_attention(model):
        assert ("forward" in vars(model.blocks[0].mlp)) == (reason is None)
        assert torch.equal(model(toks), reference)


@pytest.mark.usefixtures("bitwise_lean")
@torch.no_grad()
def test_workspace_reuses_one_buffer_per_shape_and_gives_the_same_patterns() -> None:
    model = tl_model()
    toks = tokens()
    names = [f"blocks.{layer}.{hook}" for layer in range(2) for hook in ("attn.hook_pattern", "mlp.hook_post")]
    _, ref_cache = model.run_with_cache(toks, names_filter=names)
    seen: dict[str, Tensor] = {}
    pointers: dict[str, set[int]] = {"pattern": set(), "post": set()}

    def keep(activation: Tensor, hook: Any) -> None:
        seen[hook.name] = activation.clone()  # borrowed: copy what must outlive the call
        pointers[hook.name.rsplit("_", 1)[-1]].add(activation.data_ptr())

    workspace = AttentionWorkspace()
    for _ in range(2):
        with lean_attention(model, workspace=workspace):
            model.run_with_hooks(toks, return_type=None, fwd_hooks=[(n, keep) for n in names])
    for name in names:
        assert torch.equal(seen[name], ref_cache[name]), name
    assert [len(p) for p in pointers.values()] == [1, 1]  # both layers, both runs: the same memory
    assert workspace.nbytes == (3 * 4 * 24 * 24 + 3 * 24 * 32) * 4  # [batch, heads, T, T] + [tokens, d_mlp] float32
    workspace.clear()
    assert workspace.nbytes == 0


@pytest.mark.usefixtures("bitwise_lean")
@torch.no_grad()
def test_replacing_hooks_are_honoured() -> None:
    model = tl_model()
    toks = tokens()

    def uniform(pattern: Tensor, hook: Any) -> Tensor:
        t = pattern.shape[-1]
        causal = torch.tril(torch.ones(t, t))
        return (causal / causal.sum(-1, keepdim=True)).expand_as(pattern).clone()

    def shift_scores(scores: Tensor, hook: Any) -> Tensor:
        return scores * 0.5

    for hooks in ([("blocks.1.attn.hook_pattern", uniform)], [("blocks.0.attn.hook_attn_scores", shift_scores)]):
        reference = model.run_with_hooks(toks, fwd_hooks=hooks)
        with lean_attention(model):
            assert torch.equal(model.run_with_hooks(toks, fwd_hooks=hooks), reference)


@pytest.mark.usefixtures("bitwise_lean")
@torch.no_grad()
def test_calls_with_a_mask_or_kv_cache_use_transformer_lens_forward() -> None:
    model = tl_model()
    toks = tokens(batch=2, seq_len=8)
    mask = torch.ones_like(toks)
    mask[0, :3] = 0  # left padding on the first row
    reference = model(toks, attention_mask=mask)

    def with_kv_cache() -> Tensor:  # the prompt, then one token at a time on the cache (as generate does)
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, toks.shape[0])
        chunks = [toks[:, :4]] + [toks[:, i : i + 1] for i in range(4, toks.shape[1])]
        # an explicit all-ones mask: without a tokenizer TransformerLens cannot infer one
        return torch.cat([model(c, past_kv_cache=cache, attention_mask=torch.ones_like(c)) for c in chunks], dim=1)

    cached = with_kv_cache()
    with lean_attention(model):
        assert torch.equal(model(toks, attention_mask=mask), reference)
        again = with_kv_cache()
    assert torch.equal(again, cached)


def test_with_grad_enabled_transformer_lens_forward_runs_and_gradients_flow() -> None:
    model = tl_model()
    toks = tokens()
    reference = model(toks, return_type="loss")
    reference.backward()
    expected = model.blocks[0].attn.W_Q.grad.clone()
    model.zero_grad()
    with lean_attention(model) as patched:
        assert patched
        loss = model(toks, return_type="loss")
        loss.backward()
    assert torch.equal(loss, reference)
    assert torch.equal(model.blocks[0].attn.W_Q.grad, expected)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (dict(attn_scores_soft_cap=30.0), "soft-capped"),
        (dict(positional_embedding_type="alibi"), "alibi"),
        (dict(positional_embedding_type="shortformer"), "shortformer"),
        (dict(use_attn_result=True), "use_attn_result"),
        (dict(use_split_qkv_input=True), "split Q/K/V"),
        (dict(n_key_value_heads=2), "GroupedQueryAttention"),
        (dict(attention_dir="bidirectional"), "bidirectional"),
    ],
)
def test_unsupported_attention_is_left_alone(overrides: dict[str, Any], reason: str) -> None:
    model = tl_model(**overrides)
    why = lean_attention_unsupported(model.blocks[0].attn)
    assert why is not None and reason in why
    with lean_attention(model) as patched:
        assert patched == []
    assert verify_lean_attention(model) is None  # nothing patched, nothing to disagree


def test_forward_is_restored_after_an_exception() -> None:
    model = tl_model()
    with pytest.raises(RuntimeError, match="boom"):
        with lean_attention(model):
            assert "forward" in vars(model.blocks[0].attn)
            raise RuntimeError("boom")
    assert all("forward" not in vars(module) for module in model.modules())


_LEAN_FORWARD = attention_module.lean_attention_forward


def _broken_forward(self: Any, *args: Any, **kwargs: Any) -> Tensor:
    """A lean forward that gets the scale wrong: what a TransformerLens change could cause."""
    self.attn_scale, saved = self.attn_scale * 2.0, self.attn_scale
    try:
        return _LEAN_FORWARD(self, *args, **kwargs)
    finally:
        self.attn_scale = saved


@pytest.mark.parametrize("pattern_read", [False, True], ids=["fused", "built"])
@torch.no_grad()
def test_query_key_value_hooks_get_transformer_lens_contiguous_tensors_from_a_packed_model(pattern_read: bool) -> None:
    """The joint product's strided views are not handed to a hook: one that ``.view()``s its
    activation (fine on TransformerLens's contiguous tensors) works on the callback's packed model."""
    model = tl_model()
    toks = tokens(seq_len=40)
    _, reference = model.run_with_cache(toks, names_filter=lambda name: name.endswith(("hook_q", "hook_k", "hook_v")))
    pack_attention_weights(model)
    seen: dict[str, Tensor] = {}

    def viewing(activation: Tensor, hook: Any) -> None:
        seen[hook.name] = activation.view(-1, activation.shape[-1]).clone().view(activation.shape)

    hooks = [(f"blocks.{layer}.attn.hook_{x}", viewing) for layer in range(model.cfg.n_layers) for x in "qkv"]
    if pattern_read:
        hooks.append(("blocks.0.attn.hook_pattern", lambda a, hook: None))
    with lean_attention(model):
        model.run_with_hooks(toks, fwd_hooks=hooks)
    assert set(seen) == set(reference)
    for name, value in seen.items():  # the fused norms round differently
        torch.testing.assert_close(value, reference[name], atol=1e-4, rtol=1e-5, msg=name)


@torch.no_grad()
def test_pre_hooks_and_global_module_hooks_see_the_scores_and_the_pattern() -> None:
    """A forward pre-hook on a hook point, or one of PyTorch's global module hooks, sees the call as
    under TransformerLens: the pattern is built and both hook points are called."""
    model = tl_model()
    toks = tokens(seq_len=12)
    calls: list[tuple[str, tuple[int, ...]]] = []
    handles = [model.blocks[0].attn.hook_pattern.register_forward_pre_hook(
                   lambda module, args: calls.append(("pattern", tuple(args[0].shape)))),
               model.blocks[1].attn.hook_attn_scores.register_forward_pre_hook(
                   lambda module, args: calls.append(("scores", tuple(args[0].shape))))]
    try:
        with lean_attention(model):
            model(toks)
    finally:
        for handle in handles:
            handle.remove()
    square = (toks.shape[0], model.cfg.n_heads, 12, 12)
    assert sorted(calls) == [("pattern", square), ("scores", square)]
    names: list[str] = []
    hook_points = {module: name for name, module in model.named_modules() if name.endswith(("hook_pattern", "hook_attn_scores"))}
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: names.append(hook_points[module]) if module in hook_points else None)
    try:
        with lean_attention(model):
            model(toks)
    finally:
        handle.remove()
    assert sorted(names) == sorted(hook_points.values())


@torch.no_grad()
def test_a_global_module_hook_sees_transformer_lens_values_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """A global forward hook sees every module call: the MLP's hidden layer is not overwritten in
    place under it, the norms run TransformerLens's own forward (their hook points fire) and the
    runner does not stop before ``ln_final``."""
    from lens_callback.probes.runner import _last_layer_unless_hooked

    model = tl_model()
    toks = tokens(seq_len=24)
    _, reference = model.run_with_cache(toks, names_filter=lambda name: name.endswith("mlp.hook_pre"))
    norm_calls = count_class_forward_calls(type(model.ln_final), monkeypatch)
    kept: dict[str, Tensor] = {}
    names = {module: name for name, module in model.named_modules()}

    def keep(module: nn.Module, args: Any, out: Any) -> None:
        if names.get(module, "").endswith("mlp.hook_pre"):
            kept[names[module]] = out  # a reference, as a global hook may keep it

    assert _last_layer_unless_hooked(model) == model.cfg.n_layers
    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        assert _last_layer_unless_hooked(model) is None
        with lean_attention(model):
            model(toks)
    finally:
        handle.remove()
    assert set(kept) == set(reference)
    for name, value in kept.items():  # not the activation's output written over it
        torch.testing.assert_close(value, reference[name], atol=1e-5, rtol=1e-5, msg=name)
    assert len(norm_calls) == 4 * model.cfg.n_layers + 1  # TransformerLens's blocks: ln1 three times, ln2; ln_final


def test_the_callback_warns_once_while_a_global_module_hook_turns_the_lean_shortcuts_off() -> None:
    gpt = GPT(GPTConfig(block_size=64, vocab_size=29, n_layer=1, n_head=2, n_embd=16))
    callback = LensCallback(every_n_steps=None, log_spaced=False, repeat_length=8, text_len=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        callback.attach(gpt)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for step in (0, 1):
                callback.probe_step(None, step, gpt.state_dict())
    finally:
        handle.remove()
    assert sum("global module hook" in str(w.message) for w in record) == 1
    assert not callback.errors and callback._lean  # a warning, not a fault; the lean path stays on


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_models_keep_the_route_that_builds_the_pattern(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In half precision TransformerLens's softmax rounds in the model's dtype where the fused kernel
    accumulates in float32 (a tenth of the logit scale apart here): such models are not fused, keep
    TransformerLens's bits (with its norms) and pass the attach check; a missing causal mask fails it."""
    for seed in range(3):
        model = tl_model(dtype=dtype, seed=seed)
        assert verify_lean_attention(model) is None, seed
    toks = tokens(seq_len=40)
    reference = model(toks)
    with monkeypatch.context() as patch:
        patch.setattr(attention_module, "EXACT_NORM_DEVICES", frozenset({"cpu"}))
        with lean_attention(model), _OperatorNames() as ops:
            lean = model(toks)
    assert "_scaled_dot_product_flash_attention_for_cpu" not in ops.names and torch.equal(lean, reference)
    monkeypatch.setattr(attention_module, "_mask_future_", lambda scores, ignore: None)
    assert verify_lean_attention(model) is not None


@torch.no_grad()
def test_the_attach_check_covers_both_routes_of_the_lean_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probes' patterns come from the route that builds them, a batch nobody reads from the
    fused one: a mistake in either is caught, and named."""
    model = tl_model()
    assert verify_lean_attention(model) is None
    with monkeypatch.context() as patch:  # the built route loses its causal mask
        patch.setattr(attention_module, "_mask_future_", lambda scores, ignore: None)
        problem = verify_lean_attention(model)
    assert problem is not None and problem.startswith("lean attention differs from"), problem
    original = F.scaled_dot_product_attention

    def not_causal(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
        return original(q, k, v, scale=kwargs.get("scale"))

    with monkeypatch.context() as patch:  # the fused route loses it
        patch.setattr(F, "scaled_dot_product_attention", not_causal)
        problem = verify_lean_attention(model)
        assert problem is not None and problem.startswith("lean attention (fused, no pattern built) differs"), problem
        patch.setattr(attention_module, "FUSED_ATTENTION", False)  # off: the fused route is not checked
        assert verify_lean_attention(model) is None
    assert all(not module.hook_pattern._forward_hooks for module in model.modules() if hasattr(module, "hook_pattern"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_attach_check_ignores_a_callers_autocast(dtype: torch.dtype) -> None:
    """A fit or ``attach`` inside the caller's ``torch.autocast``: TransformerLens's forward ran in
    bfloat16 there and the fused route in float32, and the check turned the lean path off for the run
    with a warning blaming it (precision review); the probe steps run with autocast off."""
    gpt = GPT(GPTConfig(block_size=64, vocab_size=29, n_layer=2, n_head=4, n_embd=32))
    hooked = to_hooked_transformer(gpt)
    with torch.autocast("cpu", dtype=dtype):
        assert verify_lean_attention(hooked) is None
        assert torch.is_autocast_enabled("cpu")  # the caller's mode is kept


def test_a_disagreeing_lean_path_is_detected_and_the_callback_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    gpt = GPT(GPTConfig(block_size=96, vocab_size=29, n_layer=2, n_head=4, n_embd=16))
    hooked = to_hooked_transformer(gpt)
    assert verify_lean_attention(hooked) is None
    monkeypatch.setattr(attention_module, "lean_attention_forward", _broken_forward)
    with torch.no_grad():  # make the scale matter
        for block in hooked.blocks:
            block.attn.W_Q.mul_(20.0)
    problem = verify_lean_attention(hooked)
    assert problem is not None and "differs from TransformerLens" in problem

    def crashing(self: Any, *args: Any, **kwargs: Any) -> Tensor:
        raise AttributeError("'Attention' object has no attribute 'renamed_in_a_new_release'")

    with monkeypatch.context() as patch:
        patch.setattr(attention_module, "lean_attention_forward", crashing)
        problem = verify_lean_attention(hooked)  # does not raise: the callback must keep training
    assert problem is not None and "lean attention failed: AttributeError" in problem
    assert all("forward" not in vars(module) for module in hooked.modules())

    with torch.no_grad():
        for block in gpt.transformer.h:
            block.attn.c_attn.weight.mul_(20.0)
    callback = LensCallback(every_n_steps=None, log_spaced=False, repeat_length=8, text_len=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.attach(gpt)
    assert callback._lean is False
    assert any("using TransformerLens's attention instead" in str(w.message) for w in caught)


@pytest.mark.parametrize("exact", [True, False], ids=["exact-norms", "fused-norms"])
@torch.no_grad()
def test_runner_results_agree_with_and_without_lean_attention(exact: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bitwise with TransformerLens's norms; to float rounding with the default fused ones."""
    if exact:
        make_bitwise(monkeypatch)
    model = tl_model()
    inputs = ProbeInputs(
        repeated=repeated_tokens(torch.arange(29), 4, 8, torch.Generator().manual_seed(0)),
        text=tokens(batch=4, seq_len=32),
    )
    runner = build_runner(DEFAULT_PROBES)
    lean = runner.run(model, inputs)
    plain = runner.run(model, inputs, lean_attention=False)
    assert set(lean) == set(plain)
    for key in plain:
        if exact:
            assert torch.equal(lean[key], plain[key]), key
        else:
            torch.testing.assert_close(lean[key], plain[key], atol=1e-5, rtol=1e-5, msg=key)
    assert exact or any(not torch.equal(lean[key], plain[key]) for key in plain)  # really fused


def test_rows_per_chunk_follows_the_pattern_budget() -> None:
    cfg = tl_model().cfg  # 4 heads, float32
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # one row of a T=256 pattern: 4 * 256 * 256 * 4 B = 1 MiB; the CPU budget is 16 MiB
    assert rows_per_chunk(cfg, 32, 256, cpu) == 16
    assert rows_per_chunk(cfg, 8, 512, cpu) == 4  # 4 MiB per row
    assert rows_per_chunk(cfg, 3, 256, cpu) == 3  # never more than the batch
    assert rows_per_chunk(cfg, 8, 2048, cpu) == 1  # never fewer than one row
    assert rows_per_chunk(cfg, 8, 256, cuda) == 8  # 256 MiB elsewhere
    assert rows_per_chunk(cfg, 8, 256, cpu, max_batch_tokens=512) == 2  # explicit limit wins


@torch.no_grad()
@pytest.mark.parametrize(("blocks", "block_elements"), [(4, None), (None, 1 << 24), (None, 3 * 2 * 37 * 10)])
def test_entropy_row_blocks_equal_the_direct_sum(
    blocks: int | None, block_elements: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU's four row blocks, and the xlogy blocks of other devices (one, and four of 10 rows)."""
    entropy_module = importlib.import_module("lens_callback.probes.attention_entropy")
    monkeypatch.setattr(entropy_module, "ROW_BLOCKS_ON", {} if blocks is None else {"cpu": blocks})
    if block_elements is not None:
        monkeypatch.setattr(entropy_module, "BLOCK_ELEMENTS", block_elements)
    gen = torch.Generator().manual_seed(0)
    b, h, t = 3, 2, 37
    scores = torch.randn(b, h, t, t, generator=gen) * 3
    scores.masked_fill_(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    scores[0, 0, 5:9] = -1e4  # rows with underflowing weights: exact zeros below the diagonal
    scores[0, 0, 5:9, 3] = 0.0
    pattern = scores.softmax(-1)
    assert (pattern[0, 0, 8, :3] == 0).all()
    probe = AttentionEntropyProbe()
    total, count = probe.reduce_pattern(pattern, torch.zeros(b, t, dtype=torch.long))
    direct = torch.special.entr(pattern[:, :, 1:]).sum(-1) / torch.log1p(torch.arange(1, t, dtype=torch.float32))
    torch.testing.assert_close(total, direct.sum(dim=(0, 2)), atol=1e-5, rtol=1e-6)
    assert count == b * (t - 1)
    assert probe._scratch is None if blocks is None else probe._scratch is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_lean_attention_on_cuda_matches_transformer_lens() -> None:
    for kind in ("gpt2-style", "modern-rotary"):
        model = MODELS[kind]().to("cuda")
        toks = tokens().to("cuda")
        reference, ref_cache = model.run_with_cache(toks)
        plain_reference = model(toks)
        with lean_attention(model):
            logits, cache = model.run_with_cache(toks)  # every norm hooked: TransformerLens's norms
            plain = model(toks)  # in-place softmax and fused norms on the device
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
        # fused norms round differently, which the sharpened test models amplify: compare both
        # forwards with a float64 one
        truth = MODELS[kind]().to("cpu").to(torch.float64)  # TransformerLens builds on CUDA where there is one
        truth.cfg.dtype = torch.float64
        truth = truth(toks.cpu())
        assert_rounding_level(plain.cpu(), plain_reference.cpu(), truth)
        for name in ref_cache.keys():
            torch.testing.assert_close(cache[name], ref_cache[name], atol=1e-5, rtol=1e-5, msg=name)
        assert verify_lean_attention(model) is None


@pytest.mark.usefixtures("bitwise_lean")
def test_the_callback_runs_its_probes_through_the_lean_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def counting(self: Any, *args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        return _LEAN_FORWARD(self, *args, **kwargs)

    monkeypatch.setattr(attention_module, "lean_attention_forward", counting)
    gpt = GPT(GPTConfig(block_size=96, vocab_size=29, n_layer=2, n_head=4, n_embd=16))
    callback = LensCallback(every_n_steps=None, log_spaced=False, repeat_length=8, text_len=16)
    callback.attach(gpt)
    calls.clear()  # attach's verify_lean_attention ran it too
    measurement = callback.probe_step(None, 1, gpt.state_dict())
    assert measurement is not None and callback.errors == {}
    # 2 layers x (1 repeated chunk + 1 text chunk)
    assert len(calls) == 4

    off = LensCallback(every_n_steps=None, log_spaced=False, repeat_length=8, text_len=16, lean_attention=False)
    off.attach(gpt)
    calls.clear()
    reference = off.probe_step(None, 1, gpt.state_dict())
    assert calls == [] and reference is not None
    assert reference.scalars == measurement.scalars  # bitwise equal on CPU


def test_a_lean_path_failing_in_a_probe_step_falls_back_without_a_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    gpt = GPT(GPTConfig(block_size=96, vocab_size=29, n_layer=2, n_head=4, n_embd=16))
    callback = LensCallback(every_n_steps=None, log_spaced=False, repeat_length=8, text_len=16, strict=True)
    callback.attach(gpt)  # verified: the lean path agrees
    expected = LensCallback(every_n_steps=None, log_spaced=False, repeat_length=8, text_len=16,
                            lean_attention=False)
    expected.attach(gpt)

    def crashing(self: Any, *args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError("a shape the lean path did not foresee")

    monkeypatch.setattr(attention_module, "lean_attention_forward", crashing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measurement = callback.probe_step(None, 1, gpt.state_dict())  # strict, yet it does not raise
    assert measurement is not None and callback.errors == {} and callback._lean is False
    assert [str(w.message) for w in caught if "lean attention failed at step 1" in str(w.message)]
    assert measurement.scalars == expected.probe_step(None, 1, gpt.state_dict()).scalars


@pytest.mark.parametrize("transient", [False, True], ids=["lean-path-fails", "fails-once"])
def test_a_lean_probe_steps_failure_quotes_at_most_2000_characters_of_its_message(
        monkeypatch: pytest.MonkeyPatch, transient: bool) -> None:
    """A probe fault quotes 2,000 characters of its message (`error_text`), but the lean path's fallback warning
    and the fault of a probe step that failed once quoted it whole (a printed tensor: megabytes) (diff review)."""
    gpt = GPT(GPTConfig(block_size=96, vocab_size=29, n_layer=2, n_head=4, n_embd=16))
    callback = LensCallback(every_n_steps=None, log_spaced=False, repeat_length=8, text_len=16)
    callback.attach(gpt)
    original, calls = attention_module.lean_attention_forward, []

    def failing(self: Any, *args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        if not transient or len(calls) == 1:
            raise RuntimeError("the activations were " + "x" * 100_000 + " (shape [2, 9])")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(attention_module, "lean_attention_forward", failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert callback.probe_step(None, 1, gpt.state_dict()) is not None
    (said,) = [str(w.message) for w in caught if "failed" in str(w.message)]
    assert ("failed once and succeeded when run again" if transient else "lean attention failed at step 1") in said
    assert len(said) < 2_500 and "characters cut" in said and "x (shape [2, 9])" in said


@pytest.mark.parametrize("strict", [False, True])
def test_a_transient_failure_of_a_lean_probe_step_is_a_fault_not_the_lean_paths(
    monkeypatch: pytest.MonkeyPatch, strict: bool
) -> None:
    """A failure that does not repeat (out of memory, ...) keeps the lean path, is counted as a probe
    fault, and is raised under strict: it is not blamed on the lean path."""
    gpt = GPT(GPTConfig(block_size=96, vocab_size=29, n_layer=2, n_head=4, n_embd=16))
    callback = LensCallback(every_n_steps=None, log_spaced=False, repeat_length=8, text_len=16, strict=strict)
    callback.attach(gpt)
    expected = LensCallback(every_n_steps=None, log_spaced=False, repeat_length=8, text_len=16)
    expected.attach(gpt)
    original, calls = attention_module.lean_attention_forward, []

    def once(self: Any, *args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (once)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(attention_module, "lean_attention_forward", once)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if strict:
            with pytest.raises(LensError, match="out of memory"):
                callback.probe_step(None, 1, gpt.state_dict())
            return
        measurement = callback.probe_step(None, 1, gpt.state_dict())
    assert callback._lean is True and callback.errors == {"probe": 1}
    assert not [w for w in caught if "lean attention failed" in str(w.message)]
    assert measurement is not None
    assert measurement.scalars == expected.probe_step(None, 1, gpt.state_dict()).scalars
