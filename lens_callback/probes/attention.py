"""A lean attention forward for probe runs: TransformerLens's numbers with fewer passes over memory.

TransformerLens's ``AbstractAttention.forward`` builds the ``[batch, head, query, key]`` scores in
seven full-size passes, five of them fresh allocations: ``q @ k``, ``/ attn_scale``, the causal
``torch.where``, ``softmax``, ``torch.isnan``, ``torch.zeros_like`` and ``torch.where`` (to zero
NaN rows). For the small models whose circuits one watches form, those passes, and the page
faults of fresh multi-MB allocations on CPU, cost more than the rest of the forward.

`lean_attention` swaps, for the duration of a ``with`` block, the ``forward`` of every attention
module it can handle for `lean_attention_forward`, which computes the same tensors with the same
operators in one allocation: ``q @ k`` (the allocation), an in-place division by the same
``attn_scale``, the causal mask written in place with the same ``IGNORE`` value (`_mask_future_`),
``softmax`` written
over the scores (into a second allocation instead when a hook is registered on
``hook_attn_scores``, which may keep the scores) and an in-place ``nan_to_num_`` (NaN -> 0; softmax
output holds no infinities).
With the joint query-key-value weights (`packed_qkv`) and no rotary embedding, the product's
output is copied into the layouts the two products read, the query and value heads first in one
copy and the key as ``[batch, head, d_head, pos]`` in another (into the workspace when there is
one): from TransformerLens's ``[batch, pos, head, d_head]`` views ``torch.matmul`` copies each of
the three (GPT-2 small: 24 launches fewer per probe run on a GPU). The copies are the contiguous
operands ``torch.matmul`` would make, so the products run the same kernels on the same bits. A hook
on ``hook_q``, ``hook_k`` or ``hook_v`` turns the joint product off for the call (three products,
TransformerLens's contiguous tensors: a hook may ``.view()`` them). A hook here is a forward hook
or pre-hook of the hook point, or one of PyTorch's global module hooks (`has_hooks`).
Every hook point fires with the value TransformerLens would give it (``hook_q``, ``hook_k``,
``hook_v``, ``hook_rot_q``/``hook_rot_k``, ``hook_attn_scores``, ``hook_pattern``, ``hook_z``) and
a hook's return value replaces the activation as usual. On CPU, with TransformerLens's own norms
(`EXACT_NORM_DEVICES`) and the pattern always built (``FUSED_ATTENTION = False``), the results are
bitwise equal to TransformerLens's forward (tested); with the default fused norms and attention,
equal to float rounding. `verify_lean_attention` checks the live model.

When neither ``hook_attn_scores`` nor ``hook_pattern`` has a hook (a probe batch no probe reads
patterns from), nothing needs the pattern: the module computes ``z`` with one
``F.scaled_dot_product_attention`` call, as nanoGPT does, and builds no ``[batch, head, query,
key]`` tensor (`FUSED_ATTENTION`; equal to float rounding, so the bitwise tests turn it off).

Modules it cannot handle keep TransformerLens's forward: anything but a plain
``transformer_lens.components.Attention`` (grouped-query, T5, BERT, ...), local attention, ALiBi,
relative or shortformer positions, bidirectional attention, soft-capped scores, attention sinks,
QK norms, Q/K/V clipping, log-n scaling, split Q/K/V inputs, ``use_attn_result``, 4-bit weights;
so does any call with a KV cache or an attention mask, or with grad mode on (the lean passes work
in place, which autograd cannot follow). The instance-level ``forward`` override is how
``accelerate``'s hooks wrap modules too; the class is never touched.

The block around a patched attention module calls its ``ln1`` three times on the same tensor (once
each for the query, key and value inputs) and copies two of the results (``+ 0.0``). Within
`lean_attention` a sequential pre-norm block runs `lean_block_forward` instead (``ln1`` once, no
copies; every hook point of the block fires with TransformerLens's value); in other blocks
(parallel attention and MLP, ...) the second and third ``ln1`` calls return the first call's
result (`_shared_norm_forward`), the same numbers computed once. A hook on ``ln1``'s hook points,
or on ``ln1`` itself, or grad mode on, turns either off for the call.

``LayerNorm`` and ``RMSNorm`` modules of float32/float64 models run `lean_norm_forward`: PyTorch's
fused norm (one operator instead of nine; equal to float rounding), except on the device types in
`EXACT_NORM_DEVICES` (none by default), where they keep TransformerLens's own operators.

Plain ``MLP`` modules with a ``gelu``, ``relu`` or ``silu`` activation run `lean_mlp_forward`: the
same ``addmm`` (into a workspace buffer when there is one) and the activation applied in place
unless a hook is on ``hook_pre``. On CPU the fresh ``[tokens, d_mlp]`` tensors cost more in page
faults than their arithmetic (3 ms of a 37 ms probe step of the default model, ``bench/run.py``).
"""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import functools
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

import einops
import torch
import torch.nn.functional as F
import torch.nn.modules.module as torch_module
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.components import MLP, Attention, LayerNorm, RMSNorm, TransformerBlock
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.attention import simple_attn_linear

from lens_callback.convert.base import weights_finite
from lens_callback.probes.base import error_text
from lens_callback.schedule import finite_non_negative

try:
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
except ImportError:  # transformer-lens before 3.x's shared list names them inside TransformerBlock.forward
    POST_NORM_ARCHITECTURES = {"Olmo2ForCausalLM", "Olmo3ForCausalLM"}

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


_M = TypeVar("_M", bound=nn.Module)


def _patchable_as(module: nn.Module, cls: type[_M]) -> _M | str:
    """What every lean forward asks first: exactly ``cls``, and no forward set on the instance.

    Returns ``module`` (typed as ``cls``) if so, else why not.
    """
    if type(module) is not cls:
        return f"{type(module).__name__} is not transformer_lens.components.{cls.__name__}"
    if "forward" in vars(module):
        return "the module's forward is already overridden on the instance"
    return cast(_M, module)


def _joined(checks: dict[str, bool]) -> str | None:
    """The reasons that apply, joined, or ``None``."""
    reasons = [reason for reason, applies in checks.items() if applies]
    return ", ".join(reasons) if reasons else None


def lean_attention_unsupported(module: nn.Module) -> str | None:
    """Why `lean_attention_forward` cannot stand in for ``module``'s forward, or ``None`` if it can."""
    attn = _patchable_as(module, Attention)
    if isinstance(attn, str):
        return attn
    cfg = attn.cfg
    return _joined({
        "local attention": getattr(attn, "attn_type", "global") != "global",
        f"positional_embedding_type={cfg.positional_embedding_type!r}": cfg.positional_embedding_type
        not in ("standard", "rotary"),
        "bidirectional attention": (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) != "causal",
        "split Q/K/V inputs (use_split_qkv_input / use_attn_in)": cfg.use_split_qkv_input or cfg.use_attn_in,
        "use_attn_result": cfg.use_attn_result,
        "4-bit weights": cfg.load_in_4bit,
        "soft-capped attention scores": bool(cfg.attn_scores_soft_cap) and cfg.attn_scores_soft_cap > 0,
        "attention sinks": getattr(cfg, "use_attention_sinks", False),
        "QK norm": cfg.use_qk_norm or cfg.original_architecture in _QK_NORM_ARCHITECTURES,
        "Q/K/V clipping": getattr(cfg, "clip_qkv", None) is not None,
        "log-n attention scaling": getattr(cfg, "use_logn_attn", False),
    })


class AttentionWorkspace:
    """Reusable buffers for the lean forwards, one per shape.

    They hold ``[batch, head, query, key]`` scores and patterns, the query and value heads first
    and the keys as ``[batch, head, d_head, key]`` (`lean_attention_forward`), and
    ``[tokens, d_mlp]`` MLP hidden layers (`lean_mlp_forward`).

    With a workspace, every layer's scores and pattern are written into the same buffer, so the
    pattern a hook receives is **borrowed** (so are ``hook_q``, ``hook_k`` and ``hook_v``'s
    values with joint query-key-value weights, and the MLP's hidden layer): valid during the
    hook call only, overwritten by the next layer. `ProbeRunner` uses one on CPU, where a fresh
    multi-MB tensor per layer costs page faults that the reused buffer does not (measured in
    ``bench/run.py``); its probes reduce each activation inside the hook call. Do not pass one
    when hooks keep activations (e.g. ``run_with_cache``).

    Memory: one buffer per role and distinct chunk shape seen, kept until `clear`.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, tuple[int, ...], torch.dtype, torch.device], Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, role: str = "") -> Tensor:
        """An uninitialised tensor of ``shape`` (the same one every time for that key).

        ``role`` keeps apart buffers that are alive at once and may have the same shape (the
        keys ``[batch, head, d_head, T]`` and the scores ``[batch, head, T, T]`` when
        ``d_head == T``).
        """
        key = (role, tuple(shape), dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drops every buffer."""
        self._buffers.clear()


@functools.lru_cache(maxsize=16)
def _future_mask(seq_len: int, device: torch.device) -> Tensor:
    """``[T, T]`` bool, True above the diagonal (keys after the query), built once per (T, device)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu_(1)


FUSED_ATTENTION = True
"""Whether `lean_attention_forward` computes ``z`` with ``F.scaled_dot_product_attention`` (PyTorch's
fused attention, the call nanoGPT's own forward makes: causal, the module's ``1 / attn_scale``) when
neither ``hook_attn_scores`` nor ``hook_pattern`` has a hook, so the ``[batch, head, query, key]``
scores and pattern are never built. A probe batch no probe reads patterns from (with the default
probes none: the attention entropy reads the text batch's) then costs what the plain forward's
attention costs; ``hook_q``, ``hook_k``, ``hook_v`` and ``hook_z`` fire as before, with the values
equal to float rounding (the fused kernel accumulates in another order); float32 and float64
models only (`FUSED_DTYPES`). One difference beyond rounding: TransformerLens zeroes a pattern row
that is NaN (a non-finite query or key), so its output there is zero; the fused kernel, like
nanoGPT's forward, gives NaN, which the probe step then reports as non-finite. ``False`` builds
the pattern always, as TransformerLens does (the tests that compare bitwise turn it off)."""

MASK_BLOCKS = 4
"""Query-row blocks `_mask_future_` splits the causal mask into on CPU (0.14 vs 0.32 ms for one
``[4, 4, 256, 256]`` float32 ``masked_fill_`` on 2 CPU cores; 8 blocks were slower again). Other
devices use one block: a GPU's eager probe step is bound by kernel launches (an H200 spent 140 ms
of host time per GPT-2 probe step on 63 ms of device work), and the blocks cost 8 launches for 1."""
MASK_BLOCKS_ON: dict[str, int] = {"cpu": MASK_BLOCKS}
"""Mask blocks per device type (`MASK_BLOCKS` on CPU); types not listed take one block."""


def _mask_future_(scores: Float[Tensor, "batch head query key"], ignore: Tensor) -> None:
    """``scores[..., future] = ignore`` in place, ``future`` the keys after each query.

    The masked region is the upper triangle: per block of query rows ``[i0, i1)`` the keys from
    ``i1`` on are filled (a plain ``fill_``) and only the square ``[i0, i1) x [i0, i1)`` on the
    diagonal needs the broadcast boolean mask, which is what made one ``masked_fill_`` over the
    whole ``[T, T]`` the slowest pass of the attention. The same elements get the same value.
    ``torch.where(..., out=)`` rather than ``masked_fill_``, whose tensor-valued form reads the
    value on the host (a device sync per layer on GPU).
    """
    t_q, t_k = scores.shape[-2:]
    if t_q != t_k:  # queries are the last t_q of t_k positions (not reached without a KV cache)
        torch.where(_future_mask(t_k, scores.device)[t_k - t_q :], ignore, scores, out=scores)
        return
    # below 64 rows, or off the CPU, the extra calls cost more than they save
    blocks = MASK_BLOCKS_ON.get(scores.device.type, 1) if t_q >= 64 else 1
    edges = [t_q * i // blocks for i in range(blocks + 1)]
    for i0, i1 in zip(edges[:-1], edges[1:]):
        if i1 == i0:
            continue
        rows = scores[..., i0:i1, :]
        if i1 < t_k:
            rows[..., i1:].fill_(ignore)  # a 0-dim tensor on the same device: a copy, no host sync
        square = rows[..., i0:i1]
        torch.where(_future_mask(i1 - i0, scores.device), ignore, square, out=square)


QKV = ("W_Q", "W_K", "W_V")
QKV_BIASES = ("b_Q", "b_K", "b_V")


def pack_attention_weights(model: nn.Module) -> int:
    """Stores each plain ``Attention`` module's weights so that no forward copies them.

    ``W_Q``, ``W_K``, ``W_V`` (``[n_heads, d_model, d_head]``) keep their values, names and shapes
    but live in one ``[d_model, 3, n_heads, d_head]`` tensor, ``W_O`` (``[n_heads, d_head,
    d_model]``) in a ``[d_model, n_heads, d_head]`` one, and ``b_Q``, ``b_K``, ``b_V`` in one ``[3,
    n_heads, d_head]`` tensor, each seen through a permutation or an index. TransformerLens
    rearranges the matrices to ``[n_heads * d_head, d_model]`` (``simple_attn_linear``) and
    ``[d_model, n_heads * d_head]`` (the output) at every forward: with its own layout those are
    copies (four weight copies per layer per forward, 96 kernel launches of GPT-2 small's probe
    run), with this one views, and the matrix products take the transposed operand as it is
    (bitwise the same results on CPU for the shipped configs' shapes, tested; on others float
    rounding apart, e.g. 8.9e-7 at d_model 16, d_head 4). `lean_attention_forward` computes the query, key and
    value of one input with one matrix product over the joint storage (`packed_qkv`).

    In place, for a model the caller owns (the callback's, a post-hoc sweep's): `copy_weights` and
    ``load_state_dict`` copy into the parameters and keep the layout; ``Module.to`` (to another
    device or dtype) gives ``W_Q``, ``W_K`` and ``W_V`` separate tensors again, each keeping the
    permuted strides (``preserve_format``: dense, not contiguous); the joint layout is checked at
    every forward, so that only costs the one product, hence pack after moving. A user-facing model
    keeps TransformerLens's contiguous parameters, which e.g. safetensors expects (moving a packed
    model does not give them back).

    Returns:
        How many modules were packed.
    """
    packed = 0
    for module in model.modules():
        if type(module) is not Attention or getattr(module.cfg, "load_in_4bit", False):
            continue
        names = (*QKV, "W_O", *QKV_BIASES)
        params = {name: getattr(module, name) for name in names}
        if any(params[name].dim() != 3 for name in (*QKV, "W_O")) or any(params[b].dim() != 2 for b in QKV_BIASES):
            continue
        with torch.no_grad():
            qkv = torch.stack([params[name].permute(1, 0, 2) for name in QKV], dim=1)  # (d_model, 3, nh, hs)
            out = params["W_O"].permute(2, 0, 1).contiguous()  # (d_model, nh, hs)
            biases = torch.stack([params[name] for name in QKV_BIASES])  # (3, nh, hs)
        views = {name: qkv[:, i].permute(1, 0, 2) for i, name in enumerate(QKV)}
        views.update({name: biases[i] for i, name in enumerate(QKV_BIASES)}, W_O=out.permute(1, 2, 0))
        for name in names:
            setattr(module, name, nn.Parameter(views[name], requires_grad=params[name].requires_grad))
        packed += 1
    return packed


def packed_qkv(module: Attention) -> tuple[Tensor, Tensor] | None:
    """``W_Q``, ``W_K``, ``W_V`` as one ``[d_model, 3 * n_heads * d_head]`` matrix and ``b_Q``,
    ``b_K``, ``b_V`` as one vector: views of the storage `pack_attention_weights` gave them, or
    ``None`` if the parameters are laid out otherwise (never packed, or replaced since, e.g. by
    ``Module.to``). Checked at every call, from the parameters themselves."""
    weights = [getattr(module, name) for name in QKV]
    biases = [getattr(module, name) for name in QKV_BIASES]
    heads, d_model, d_head = weights[0].shape
    n = heads * d_head
    for i, (w, b) in enumerate(zip(weights, biases)):
        if (
            w.shape != weights[0].shape
            or w.stride() != (d_head, 3 * n, 1)
            or w.storage_offset() != weights[0].storage_offset() + i * n
            or w.untyped_storage()._cdata != weights[0].untyped_storage()._cdata  # the same storage
            or b.shape != (heads, d_head)
            or b.stride() != (d_head, 1)
            or b.storage_offset() != biases[0].storage_offset() + i * n
            or b.untyped_storage()._cdata != biases[0].untyped_storage()._cdata
            or b.device != w.device
        ):
            return None
    return weights[0].as_strided((d_model, 3 * n), (3 * n, 1)), biases[0].as_strided((3 * n,), (1,))


ZERO_BIAS_DEVICES = frozenset({"cpu"})
"""Device types where a lean forward leaves out a bias that is all zeros (`zero_biases`): a bias-free
nanoGPT converts to TransformerLens modules with zero ``b_Q``, ``b_K``, ``b_V``, ``b_O``, ``b_in``
and ``b_out``, and on the CPU ``addmm`` first writes the broadcast bias over its whole output
(``[tokens, d_model]`` per matrix product) where ``mm`` does not; the sum is the same (adding an
exact zero), tested bitwise. Elsewhere the check would wait for the device, and cuBLAS adds a bias
in the product's epilogue anyway."""

BIAS_NAMES = {Attention: ("b_Q", "b_K", "b_V", "b_O"), MLP: ("b_in", "b_out")}
"""The biases `zero_biases` checks, per module class."""


def zero_biases(module: nn.Module) -> frozenset[str]:
    """Names of ``module``'s biases (`BIAS_NAMES`) that are all zeros on a `ZERO_BIAS_DEVICES` device.

    Read once when `lean_attention` patches the module; a bias changed within the ``with`` block
    (nothing in a probe run changes one) would not be seen.
    """
    names = []
    for name in BIAS_NAMES.get(type(module), ()):
        bias = getattr(module, name, None)
        if isinstance(bias, Tensor) and bias.device.type in ZERO_BIAS_DEVICES and not bool(bias.any()):
            names.append(name)
    return frozenset(names)


def _heads_linear(
    x: Float[Tensor, "batch pos d_model"], w: Float[Tensor, "head_index d_model d_head"], b: Tensor | None
) -> Float[Tensor, "batch pos head_index d_head"]:
    """TransformerLens's ``simple_attn_linear`` without a bias when ``b`` is ``None``."""
    if b is not None:
        return simple_attn_linear(x, w, b)
    if x.device != w.device:
        w = w.to(x.device)
    w2d = einops.rearrange(w, "head_index d_model d_head -> (head_index d_head) d_model")
    return F.linear(x, w2d).reshape(x.shape[0], x.shape[1], w.shape[0], w.shape[2])


def lean_attention_forward(
    self: Attention,
    query_input: Float[Tensor, "batch pos d_model"],
    key_input: Float[Tensor, "batch pos d_model"],
    value_input: Float[Tensor, "batch pos d_model"],
    past_kv_cache_entry: Any = None,
    additive_attention_mask: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_bias: Tensor | None = None,
    *,
    workspace: AttentionWorkspace | None = None,
    skip_biases: frozenset[str] = frozenset(),
) -> Float[Tensor, "batch pos d_model"]:
    """``Attention.forward`` for a causal, cache-free call, in one or two full-size allocations.

    Bound to an ``Attention`` instance by `lean_attention`; a call it does not cover (KV cache,
    masks, position bias, per-head inputs, or grad mode on: the in-place passes and ``out=``
    writes have no autograd) goes to the class's own forward. With a ``workspace`` the scores are
    written into its buffer (see `AttentionWorkspace`). The biases named in ``skip_biases`` (all
    zeros, `zero_biases`) are left out of the matrix products. When no hook reads the scores or the
    pattern (`FUSED_ATTENTION`), ``z`` comes from ``F.scaled_dot_product_attention`` and no
    full-size tensor is built.
    """
    if (
        torch.is_grad_enabled()
        or past_kv_cache_entry is not None
        or additive_attention_mask is not None
        or attention_mask is not None
        or position_bias is not None
        or query_input.ndim != 3
    ):
        return type(self).forward(
            self, query_input, key_input, value_input, past_kv_cache_entry=past_kv_cache_entry,
            additive_attention_mask=additive_attention_mask, attention_mask=attention_mask,
            position_bias=position_bias,
        )
    def bias(name: str) -> Tensor | None:
        return None if name in skip_biases else getattr(self, name)

    fused = _fused_attention_applies(self)  # nobody reads the scores or the pattern: one SDPA call
    # the joint product hands the query, key and value hooks strided views; with a hook on one of
    # them, three products give TransformerLens's own contiguous tensors (a hook may `.view()` them)
    joint = query_input is key_input is value_input and not has_hooks(self.hook_q, self.hook_k, self.hook_v)
    packed = packed_qkv(self) if joint else None
    if packed is not None and packed[0].device == query_input.device:  # one product: (B, T, 3, nh, hs)
        w_qkv, b_qkv = packed
        skip = all(name in skip_biases for name in QKV_BIASES)
        qkv = F.linear(query_input, w_qkv.t(), None if skip else b_qkv)
        qkv = qkv.view(*qkv.shape[:-1], 3, *self.W_Q.shape[::2])  # (B, T, 3, nh, hs)
        if fused or self.cfg.positional_embedding_type == "rotary":
            # views: SDPA reads strided heads as nanoGPT gives them; rotary makes new tensors
            q, k, v = qkv.unbind(-3)
        else:
            # the layouts the products below read, made in two copies instead of torch.matmul's
            # three: q and v heads first, (2, B, nh, T, hs), and k as (B, nh, hs, T). The same
            # contiguous operands as TransformerLens's matmul copies, so the same kernels and bits
            heads = qkv.permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs) view
            qv, k_t = heads[0::2], heads[1].transpose(-1, -2)
            if workspace is not None:
                qv = workspace.get(tuple(qv.shape), qv.dtype, qv.device, "qv").copy_(qv)
                k_t = workspace.get(tuple(k_t.shape), k_t.dtype, k_t.device, "k").copy_(k_t)
            else:
                qv, k_t = qv.contiguous(), k_t.contiguous()
            del qkv, heads  # only the copies stay alive
            q, v = (t.transpose(1, 2) for t in qv.unbind(0))  # (B, T, nh, hs) views
            k = k_t.permute(0, 3, 1, 2)  # (B, T, nh, hs) view
    else:
        q = _heads_linear(query_input, self.W_Q, bias("b_Q"))  # (B, T, nh, hs)
        k = _heads_linear(key_input, self.W_K, bias("b_K"))
        v = _heads_linear(value_input, self.W_V, bias("b_V"))
    q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, 0, None))
        k = self.hook_rot_k(self.apply_rotary(k, 0, None))

    if fused and q.dtype == k.dtype == v.dtype and q.device == k.device == v.device:
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=1.0 / float(self.attn_scale)
        )  # (B, nh, T, hs)
        z = self.hook_z(z.transpose(1, 2))  # (B, T, nh, hs)
    else:
        z = _materialised_attention(self, q, k, v, workspace)
    w = einops.rearrange(self.W_O, "head_index d_head d_model -> d_model (head_index d_head)").contiguous()
    if z.dtype != w.dtype:
        z = z.to(w.dtype)
    return F.linear(z.reshape(z.shape[0], z.shape[1], -1), w, bias("b_O"))  # (B, T, d_model)


def has_hooks(*modules: nn.Module) -> bool:
    """Whether a forward hook or forward pre-hook sees a call of one of ``modules``: one of their own,
    or one of PyTorch's global module hooks (``register_module_forward_hook`` and its pre-hook twin),
    which see every module's call."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks) or any(
        module._forward_hooks or module._forward_pre_hooks for module in modules
    )


FUSED_DTYPES = (torch.float32, torch.float64)
"""Model dtypes the fused attention serves. In half precision TransformerLens's softmax rounds in
the model's dtype and the fused kernel accumulates in float32, a tenth of the logit scale apart on
sharpened bfloat16 test models (each as far from a float64 forward): such models keep the route
that builds the pattern, TransformerLens's numbers. The callback's and the post-hoc models are
float32."""


def _fused_attention_applies(module: Attention) -> bool:
    """Whether `lean_attention_forward` may leave the scores and pattern unbuilt: `FUSED_ATTENTION`
    is on, the model is float32 or float64 (`FUSED_DTYPES`) and no hook sees ``hook_attn_scores``
    or ``hook_pattern`` (`has_hooks`)."""
    return (
        FUSED_ATTENTION
        and module.W_Q.dtype in FUSED_DTYPES
        and not has_hooks(module.hook_attn_scores, module.hook_pattern)
    )


def _materialised_attention(
    self: Attention,
    q: Float[Tensor, "batch pos head_index d_head"],
    k: Float[Tensor, "batch pos head_index d_head"],
    v: Float[Tensor, "batch pos head_index d_head"],
    workspace: AttentionWorkspace | None,
) -> Float[Tensor, "batch pos head_index d_head"]:
    """TransformerLens's scores, pattern and ``z`` in one or two full-size allocations; fires
    ``hook_attn_scores``, ``hook_pattern`` and ``hook_z``."""
    q_, k_ = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1)  # (B, nh, T, hs), (B, nh, hs, T)
    if workspace is None:
        scores = torch.matmul(q_, k_)  # (B, nh, T, T), allocation 1
    else:
        shape = (q_.shape[0], q_.shape[1], q_.shape[2], k_.shape[3])
        scores = torch.matmul(q_, k_, out=workspace.get(shape, torch.result_type(q_, k_), q_.device))
    scores.div_(self.attn_scale)
    _mask_future_(scores, self.IGNORE)
    if has_hooks(self.hook_attn_scores):
        scores = self.hook_attn_scores(scores)
        pattern = F.softmax(scores, dim=-1)  # allocation 2: a hook may hold on to the scores
    else:
        pattern = torch.softmax(scores, dim=-1, out=scores)  # nobody sees the scores: in place
    del scores
    pattern.nan_to_num_(nan=0.0)  # TransformerLens: where(isnan(pattern), 0, pattern)
    pattern = self.hook_pattern(pattern).to(device=v.device, dtype=v.dtype)
    return self.hook_z(torch.matmul(pattern, v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3))  # (B, T, nh, hs)


_IN_PLACE_ACTIVATIONS: dict[Callable[..., Tensor], Callable[[Tensor], Tensor]] = {
    F.gelu: torch.ops.aten.gelu_, F.relu: torch.relu_, F.silu: torch._C._nn.silu_,
}
"""TransformerLens's activation functions (``SUPPORTED_ACTIVATIONS``) with an in-place twin (same kernel)."""


def lean_mlp_unsupported(module: nn.Module) -> str | None:
    """Why `lean_mlp_forward` cannot stand in for ``module``'s forward, or ``None`` if it can."""
    mlp = _patchable_as(module, MLP)
    if isinstance(mlp, str):
        return mlp
    if mlp.cfg.load_in_4bit:
        return "4-bit weights"
    if mlp.cfg.is_layer_norm_activation():
        return "a layer-norm activation (SoLU)"
    if mlp.act_fn not in _IN_PLACE_ACTIVATIONS:
        return f"activation {getattr(mlp.act_fn, '__name__', mlp.act_fn)!r} has no in-place form here"
    return None


def lean_mlp_forward(
    self: MLP,
    x: Float[Tensor, "batch pos d_model"],
    *,
    workspace: AttentionWorkspace | None = None,
    skip_biases: frozenset[str] = frozenset(),
) -> Float[Tensor, "batch pos d_model"]:
    """``MLP.forward`` (``batch_addmm``, activation, ``batch_addmm``) with the hidden layer reused.

    The ``[tokens, d_mlp]`` pre-activation is written into the workspace's buffer for its shape
    (without a workspace, a fresh tensor as in TransformerLens) and the activation overwrites it
    unless a hook on ``hook_pre`` may hold on to it. A bias named in ``skip_biases`` (all zeros,
    `zero_biases`) makes that product an ``mm``. Grad mode or a non-contiguous input runs the
    class's forward.
    """
    if torch.is_grad_enabled() or not x.is_contiguous():
        return type(self).forward(self, x)
    x2d = x.view(-1, x.shape[-1])
    shape = (x2d.shape[0], self.W_in.shape[-1])
    dtype = torch.result_type(x2d, self.W_in)
    out = workspace.get(shape, dtype, x.device) if workspace is not None else None

    def product(a: Tensor, w: Tensor, bias: str, out: Tensor | None = None) -> Tensor:
        """``bias + a @ w``, or ``a @ w`` for a bias in ``skip_biases``."""
        if bias in skip_biases:
            return torch.mm(a, w, out=out)
        return torch.addmm(getattr(self, bias), a, w, out=out)

    pre = product(x2d, self.W_in, "b_in", out).view(*x.shape[:-1], -1)
    pre = self.hook_pre(pre)  # (B, T, d_mlp)
    if has_hooks(self.hook_pre):
        post = self.act_fn(pre)
    else:
        post = _IN_PLACE_ACTIVATIONS[self.act_fn](pre)
    post = self.hook_post(post)
    return product(post.view(-1, post.shape[-1]), self.W_out, "b_out").view(*x.shape[:-1], -1)


EXACT_NORM_DEVICES: frozenset[str] = frozenset()
"""Device types where norms keep TransformerLens's own operators (``x - mean``, ``pow``, ``mean``,
``+ eps``, ``sqrt``, ``/``, ``* w``, ``+ b``, and the first ``mean``), so a probe run there is,
with ``FUSED_ATTENTION = False`` too, bitwise TransformerLens's forward. Empty by default: everywhere `lean_norm_forward` calls PyTorch's
fused ``F.layer_norm`` / ``F.rms_norm``, the same maths to float rounding (tested against a float64
forward). On a GPU the eager probe step is bound by kernel launches (fused norms took GPT-2 small's
probe run from 1,862 to 1,374 operators, meta device, ``bench/profile_probe.py --count-ops``); on
the CPU the nine passes over ``[tokens, d_model]``, three of them broadcasting, cost 2.8 of the
default model's 42 ms probe run (``bench/run.py``). Add ``"cpu"`` (and set ``FUSED_ATTENTION`` to
``False``) to compare with TransformerLens bitwise, as ``tests/test_attention.py`` does."""
_LEAN_NORMS = (LayerNorm, RMSNorm)


def lean_norm_unsupported(module: nn.Module) -> str | None:
    """Why `lean_norm_forward` cannot stand in for ``module``'s forward, or ``None`` if it can."""
    if type(module) not in _LEAN_NORMS:
        return f"{type(module).__name__} is not transformer_lens's LayerNorm or RMSNorm"
    if "forward" in vars(module):
        return "the module's forward is already overridden on the instance"
    if module.cfg.dtype not in (torch.float32, torch.float64):
        return f"dtype {module.cfg.dtype} (normalised in float32, cast back before the affine step)"
    if module.w.device.type in EXACT_NORM_DEVICES:
        return f"on {module.w.device.type}, TransformerLens's own operators (EXACT_NORM_DEVICES)"
    return None


def _norm_runs_as_is(module: nn.Module, hook_points: list[HookPoint]) -> bool:
    """Whether a norm call must be TransformerLens's own: grad mode on, or a hook on the module or
    on one of its hook points."""
    return torch.is_grad_enabled() or has_hooks(module, *hook_points)


def _fused_norm(self: nn.Module, x: Float[Tensor, "... length"]) -> Float[Tensor, "... length"]:
    """A ``LayerNorm`` or ``RMSNorm`` module's output as one fused operator."""
    if type(self) is LayerNorm:
        return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
    norm = cast(RMSNorm, self)  # the other class of `_LEAN_NORMS`
    return F.rms_norm(x, x.shape[-1:], norm.w, norm.eps)


def lean_norm_forward(
    self: nn.Module, x: Float[Tensor, "... length"], *, hook_points: list[HookPoint]
) -> Float[Tensor, "... length"]:
    """``LayerNorm.forward`` / ``RMSNorm.forward`` of a float model as one fused operator.

    With grad mode on, or a hook on the module or its hook points (``hook_scale``,
    ``hook_normalized``), the class's forward runs instead.
    """
    if _norm_runs_as_is(self, hook_points):
        return type(self).forward(self, x)
    return _fused_norm(self, x)


QKV_INPUTS = 3
"""Calls of ``ln1`` per block forward on one tensor: the query, key and value inputs."""


def _shared_norm_forward(
    self: nn.Module, x: Tensor, *, hook_points: list[HookPoint], memo: list, compute: Any
) -> Tensor:
    """``ln1.forward`` computing each input once for the block's three calls on it.

    ``memo`` holds ``[input, its version counter, output, uses]`` between the calls on one input
    and is emptied after the third, so no activation outlives the block. ``compute(self, x)``
    computes an output afresh (`_fused_norm` where `lean_norm_forward` applies, else the class's
    forward). A different input, an in-place change of the input (its version counter moves), grad
    mode, or a hook on the module or on its hook points means TransformerLens's own computation for
    that call.
    """
    if _norm_runs_as_is(self, hook_points):
        memo.clear()
        return type(self).forward(self, x)
    version = None if x.is_inference() else x._version  # inference tensors have no version counter
    if memo and memo[0] is x and memo[1] == version:
        out = memo[2]
        memo[3] += 1
        if memo[3] == QKV_INPUTS:
            memo.clear()
        return out
    out = compute(self, x)
    memo[:] = [x, version, out, 1]
    return out


def _hook_points(module: nn.Module) -> list[HookPoint]:
    return [m for m in module.modules() if isinstance(m, HookPoint)]


def lean_block_unsupported(block: nn.Module) -> str | None:
    """Why `lean_block_forward` cannot stand in for ``block``'s forward, or ``None`` if it can.

    It covers the sequential pre-norm block (GPT-2, nanoGPT, Llama-style): the block's attention
    must be patchable too (`lean_attention_unsupported`).
    """
    if (reason := _block_unsupported(block)) is not None:
        return reason
    return lean_attention_unsupported(cast(TransformerBlock, block).attn)


def _block_unsupported(block: nn.Module) -> str | None:
    """`lean_block_unsupported` but for the block's attention (checked before it was patched)."""
    checked = _patchable_as(block, TransformerBlock)
    if isinstance(checked, str):
        return checked
    cfg = checked.cfg
    return _joined({
        "post-norm": cfg.original_architecture in POST_NORM_ARCHITECTURES,
        "parallel attention and MLP": cfg.parallel_attn_mlp,
        "attention only": cfg.attn_only,
        "use_hook_mlp_in": cfg.use_hook_mlp_in,
        "norms before and after": cfg.use_normalization_before_and_after,
    })


def lean_block_forward(
    self: TransformerBlock,
    resid_pre: Float[Tensor, "batch pos d_model"],
    shortformer_pos_embed: Tensor | None = None,
    past_kv_cache_entry: Any = None,
    attention_mask: Tensor | None = None,
    *,
    ln1_hook_points: list[HookPoint],
) -> Float[Tensor, "batch pos d_model"]:
    """``TransformerBlock.forward`` of a sequential pre-norm block, ``ln1`` computed once.

    TransformerLens's block calls ``ln1`` three times on the residual (query, key and value inputs)
    and adds ``0.0`` to the query and key inputs: two fresh ``[batch, pos, d_model]`` copies per
    block. Here the one normalised residual is every input of the attention; every hook point of
    the block fires with TransformerLens's value. A call with a shortformer embedding, a KV cache or
    an attention mask, grad mode on, or a hook on ``ln1`` or its hook points (which TransformerLens
    fires three times) goes to the class's forward.
    """
    if (
        shortformer_pos_embed is not None
        or past_kv_cache_entry is not None
        or attention_mask is not None
        or _norm_runs_as_is(self.ln1, ln1_hook_points)
    ):
        return type(self).forward(self, resid_pre, shortformer_pos_embed, past_kv_cache_entry, attention_mask)
    resid_pre = self.hook_resid_pre(resid_pre)  # (B, T, d_model)
    normalized = self.ln1(resid_pre)
    attn_out = self.hook_attn_out(self.attn(query_input=normalized, key_input=normalized, value_input=normalized))
    if resid_pre.device != attn_out.device:
        resid_pre = resid_pre.to(attn_out.device)
    resid_mid = self.hook_resid_mid(resid_pre + attn_out)
    mlp_out = self.apply_mlp(self.ln2(resid_mid))
    return self.hook_resid_post(resid_mid + mlp_out)


def _blocks_around(
    modules: list[nn.Module], patched: list[Attention]
) -> tuple[list[TransformerBlock], list[nn.Module]]:
    """The blocks among ``modules`` whose attention is in ``patched``: those `lean_block_forward`
    covers, and the ``ln1`` modules of the other pre-norm ones (their three calls shared,
    `_shared_norm_forward`)."""
    attention = {id(module) for module in patched}
    blocks: list[TransformerBlock] = []
    norms: list[nn.Module] = []
    for block in modules:
        if type(block) is not TransformerBlock or id(block.attn) not in attention:
            continue
        if _block_unsupported(block) is None:
            blocks.append(block)
            continue
        ln1 = block.ln1
        if (
            isinstance(ln1, nn.Identity)
            or "forward" in vars(ln1)
            or block.cfg.original_architecture in POST_NORM_ARCHITECTURES
        ):
            continue
        norms.append(ln1)
    return blocks, norms


@contextmanager
def lean_attention(
    model: nn.Module, enabled: bool = True, workspace: AttentionWorkspace | None = None
) -> Iterator[list[Attention]]:
    """Within the block, every supported attention module of ``model`` runs `lean_attention_forward`.

    Sequential pre-norm blocks around a patched attention module run `lean_block_forward` (``ln1``
    once, no copies of its output); in other blocks around one, ``ln1`` computes its input once for
    the three calls on it (`_shared_norm_forward`). Supported ``MLP`` modules run
    `lean_mlp_forward` and float ``LayerNorm``/``RMSNorm`` modules `lean_norm_forward` (fused).

    Args:
        model: Any module; its supported ``Attention`` and ``MLP`` submodules are patched.
        enabled: ``False`` patches nothing (TransformerLens's forward throughout).
        workspace: Reuse its buffers for the scores and pattern and the MLP hidden layer
            (borrowed activations, see `AttentionWorkspace`).

    Yields the patched attention modules (empty if ``enabled`` is False or none is supported); on
    exit, normal or not, every patched module gets its class's forward back.

    Example::

        with lean_attention(model):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", fn)])
    """
    patched: list[Attention] = []  # attention modules, yielded
    overridden: list[nn.Module] = []  # every module whose forward is replaced

    def override(module: nn.Module, function: Any, **keywords: Any) -> None:
        module.forward = types.MethodType(functools.partial(function, **keywords), module)
        overridden.append(module)

    try:
        if enabled:
            # one walk of the module tree, not three: entering the block took 0.41 -> 0.28 ms for
            # the default model on CPU, 2.1 -> 1.5 ms for GPT-2 small (host time that a GPU's
            # launch-bound probe step pays too)
            modules = list(model.modules())
            for module in modules:
                if lean_attention_unsupported(module) is None:
                    override(module, lean_attention_forward, workspace=workspace, skip_biases=zero_biases(module))
                    patched.append(cast(Attention, module))
                elif lean_mlp_unsupported(module) is None:
                    override(module, lean_mlp_forward, workspace=workspace, skip_biases=zero_biases(module))
            blocks, shared = _blocks_around(modules, patched)
            for block in blocks:
                override(block, lean_block_forward, ln1_hook_points=_hook_points(block.ln1))
            for norm in shared:
                compute = _fused_norm if lean_norm_unsupported(norm) is None else type(norm).forward
                override(norm, _shared_norm_forward, hook_points=_hook_points(norm), memo=[], compute=compute)
            for module in modules:  # the other norms (the shared ones are overridden now)
                if lean_norm_unsupported(module) is None:
                    override(module, lean_norm_forward, hook_points=_hook_points(module))
        yield patched
    finally:
        for module in overridden:
            vars(module).pop("forward", None)


@torch.no_grad()
def verify_lean_attention(model: HookedTransformer, seq_len: int = 16, rtol: float = 1e-4) -> str | None:
    """Runs a short deterministic sequence through ``model`` with and without `lean_attention`.

    Guards against a TransformerLens release changing its attention maths under the lean path, on
    both of its routes: the pattern built (a hook on every ``hook_pattern``) and fused. The
    fused norms round differently from TransformerLens's (a few 1e-5 of the logit scale on the
    sharpened test models of ``tests/test_attention.py``), hence ``rtol``. The
    tokens are ``arange`` (no RNG draws); the model's training flags are left as they were. Both
    forwards run with autocast off, as the probe steps run (`measure`): under a caller's autocast
    (a fit or ``attach`` inside ``torch.autocast``) TransformerLens's forward ran in bfloat16 and the
    lean path's fused attention in float32, a difference that turned the lean path off for the run.

    Returns:
        ``None`` if the logits agree to ``rtol`` of their largest magnitude (or nothing would be
        patched, or TransformerLens's own forward fails or gives non-finite logits, or a weight is
        not finite: then there is nothing to compare, and the probe steps report the problem), otherwise a one-line
        description of the disagreement or of the lean path's error. Never raises for either.

    Raises:
        ValueError: for an ``rtol`` that is negative or not finite (NaN compared as agreeing).
    """
    if not finite_non_negative(rtol):  # numpy or 0-d tensor numbers too
        raise ValueError(f"verify_lean_attention: rtol must be a finite number >= 0, got {rtol!r}")
    seq_len = max(1, min(seq_len, model.cfg.n_ctx))
    device = model.W_E.device
    tokens = (torch.arange(2 * seq_len, device=device) % model.cfg.d_vocab).view(2, seq_len)
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        try:
            with torch.autocast(device.type, enabled=False):
                reference = model(tokens).float()
        except Exception:  # noqa: BLE001 - TransformerLens's own failure is not the lean path's
            return None
        if not bool(torch.isfinite(reference).all()) or not weights_finite(list(model.parameters())):
            # nothing to compare (non-finite weights are reported elsewhere); TransformerLens zeroes
            # NaN pattern rows, which hides a NaN query or key from its logits, where the fused
            # attention (`FUSED_ATTENTION`), as nanoGPT's SDPA, lets it through
            return None
        try:
            with torch.autocast(device.type, enabled=False), lean_attention(model) as patched:
                if not patched:
                    return None
                # both routes: the pattern built (a probe reads it) and, where nothing reads it, fused
                handles = [module.hook_pattern.register_forward_hook(_read_nothing) for module in patched]
                try:
                    built = model(tokens).float()
                finally:
                    for handle in handles:
                        handle.remove()
                fused = model(tokens).float() if FUSED_ATTENTION else built
        except Exception as err:  # noqa: BLE001
            return f"lean attention failed: {error_text(err)}"
    finally:
        for module, flag in training.items():
            module.training = flag
    scale = reference.abs().max().clamp_min(1e-30)
    for route, lean in (("", built), (" (fused, no pattern built)", fused)):
        worst = (lean - reference).abs().max()
        if not bool(torch.isfinite(worst)) or float(worst) > rtol * float(scale):
            return (
                f"lean attention{route} differs from TransformerLens's forward by {float(worst):.3g} "
                f"(logit scale {float(scale):.3g})"
            )
    return None


def _read_nothing(module: nn.Module, args: Any, output: Tensor) -> None:
    """A forward hook that reads nothing: on ``hook_pattern`` it makes the lean forward build the pattern."""
