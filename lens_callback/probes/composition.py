"""Q-, K- and V-composition scores: how much a head reads what a head of an earlier layer writes, from the weights.

Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits" (Anthropic): a head of an
earlier layer writes ``x W_OV`` into the residual stream (``W_OV = W_V W_O``, ``[d_model, d_model]``), and
a later head reads the stream through its query (``W_QK = W_Q W_K^T``), its key (``W_QK^T``) or its value
(``W_OV``). The composition score of the pair is

    ||W_OV(writer) @ M(reader)||_F / (||W_OV(writer)||_F * ||M(reader)||_F)

with ``M`` = ``W_QK`` (Q-composition), ``W_QK^T`` (K-composition) or ``W_OV`` (V-composition):
TransformerLens's ``HookedTransformer.all_composition_scores(mode)``, in its layout (writer layer, writer
head, reader layer, reader head; zero where the writer's layer is not earlier). An induction head
K-composes with a previous-token head of an earlier layer (Olsson et al. 2022): its keys read where
each token's predecessor was, so the K-composition of a 2-layer model's induction heads rises with their
induction score.

The scores are taken on the weights as TransformerLens's ``process_weights_`` leaves them (its
defaults, ``fold_ln`` and ``center_writing_weights``): each layer's ``ln1`` scale folded into the query,
key and value weights that read its output and, in a LayerNorm model, those weights centred over
``d_model`` and ``W_O`` centred over its output (the norm takes out the mean, so it writes nothing there).
The model itself is not changed, and a model processed already gives the same scores. The weights are folded
one layer at a time (`folded_attention_weights`), a writer's ``W_O`` too: read un-centred, its mean over
``d_model`` times a centred reader's sums over it is zero only in exact arithmetic, and a head writing along the
ones direction only (its centred ``W_O`` zero) scored 1e34 in float32 where it scores 0. One
departure: a model built with ``LNPre`` norms (no ``ln1.w``) gets its query, key and value weights centred too,
which ``process_weights_``, folding nothing there, leaves as they are: the centred norm output never reads their
mean over ``d_model``, and the scores should not depend on a weight the model does not use. What the scores
leave out, as TransformerLens's do: the normalisation's per-token scale, biases, MLPs, rotary positions (the
rotation between query and key is not in ``W_QK``), and norms inside the attention (``use_qk_norm``'s query
and key norms, ``use_normalization_before_and_after``'s ``ln1_post`` on the head outputs).

No singular value decomposition: a product ``a1 C b2`` of ``[d_model, d_head]``-thin factors has
``||a1 C b2||_F^2 = sum((G_a C) * (C G_b))`` with the ``[d_head, d_head]`` Gram matrices ``G_a = a1^T a1``
and ``G_b = b2 b2^T``, so every pair costs ``d_head^2 * d_model`` multiply-adds (one matrix product per
writer layer and reader layer, for all their pairs) and nothing synchronises with the host.

Memory: one layer's weights at a time, not every layer's (issue P4: a probe step holds one extra copy of the
weights). A reader layer's folded weights and its pairs with one writer layer, whose ``[n_heads, n_heads,
d_head, d_head]`` temporaries are each the size of one folded weight where ``n_heads * d_head = d_model``, and,
across layers, each writer layer's ``[n_heads, d_head, d_head]`` Gram matrices; in a model whose norm centres,
the writer layer's centred ``W_O`` as well (other norms' is read in place): about 1.3x one layer's four folded
weights at GPT-2 small's and an 8B model's shapes with RMSNorm, 12 MiB and 328 MiB, 1.55x with LayerNorm, 14 MiB
and 392 MiB (every layer's stacks, folded at once, peaked at 263 MiB and 12 GB), for ``n_layers^2 / 2`` pair
steps of a few kernels each instead of ``n_layers``.

Reading the numbers: for matrices oriented at random the score is about ``1 / sqrt(d_model)`` whatever
their ranks (0.088 for the default model's 128), and two heads that compose perfectly, each matrix with
``r`` equal singular values, score ``1 / sqrt(r)`` (0.177 for rank 32; the tests' hand-built induction
head, rank 12: 0.289), the most a pair of such matrices can score. Matrices of low effective rank raise
that ceiling: early in the demo run (README) the best K- and V-composition reach 0.23 and 0.27, above ``1 / sqrt(d_head)``.
Compare heads within a step, not a score with 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from typing_extensions import override

from lens_callback.probes.attention import POST_NORM_ARCHITECTURES
from lens_callback.probes.base import MAIN_KEY, WeightsProbe, register_probe
from lens_callback.probes.runner import in_probe_modes

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

CompositionMode = Literal["q", "k", "v"]

PAIR_BLOCK_ELEMENTS = 2**24
"""The most elements of each ``[writers, readers, d_head, d_head]`` temporary of `composition_scores` (64 MiB in
float32): a writer layer's heads are taken in blocks that stay within it (one block a layer up to an 8B model's
32 heads of 128)."""

_CENTRED_NORMS = ("LN", "LNPre")  # a norm that takes out the mean: TransformerLens centres around it
_KNOWN_NORMS = (*_CENTRED_NORMS, "RMS", "RMSPre", None)


def folded_attention_weights(model: HookedTransformer, layer: int, *names: str) -> tuple[Tensor, ...]:
    """Layer ``layer``'s attention weights named (``"W_Q"``, ``"W_K"``, ``"W_V"`` ``[n_heads, d_model, d_head]``,
    ``"W_O"`` ``[n_heads, d_head, d_model]``), in that order, as ``process_weights_(fold_ln=True,
    center_writing_weights=True)`` would leave them, in float32 (float64 for a float64 model), as new tensors.

    One layer at a time: folded for every layer at once, the four ``[n_layers, ...]`` stacks held the weights of
    every layer again, 2 GB each at an 8B model's shape, at every probe step (issue P4: a probe step holds one extra
    copy of the weights). Callers check the model first (`check_composition_model`, `_check_ln1_alike`).
    """
    block = model.blocks[layer]
    dtype = _fold_dtype(model)
    # copies, changed in place below (TransformerLens's grouped-query W_K and W_V are repeated afresh, its
    # other weights are the parameters themselves), one at a time: a grouped-query one is freed once copied
    weights = [getattr(block.attn, name).to(dtype, copy=True) for name in names]
    reading = [weight for name, weight in zip(names, weights) if name != "W_O"]  # what reads ln1's output
    gamma = _ln1_scale(model, layer, dtype)
    if gamma is not None:
        for weight in reading:
            weight.mul_(gamma[:, None])
    if model.cfg.normalization_type in _CENTRED_NORMS:
        for weight in reading:
            weight.sub_(weight.mean(dim=-2, keepdim=True))
        for name, weight in zip(names, weights):
            if name == "W_O":
                weight.sub_(weight.mean(dim=-1, keepdim=True))
    return tuple(weights)


def _fold_dtype(model: HookedTransformer) -> torch.dtype:
    """What the weights-only scores compute in: float64 for a float64 model, else float32."""
    return torch.float64 if model.blocks[0].attn.W_Q.dtype == torch.float64 else torch.float32


def _check_ln1_alike(model: HookedTransformer) -> None:
    """Refuses a model some of whose ``ln1`` norms have a scale (``w``) and some not (a subclass's, or a block
    swapped by hand): the scores fold every layer's alike.

    Raises:
        ValueError: for such a model.
    """
    found = [isinstance(getattr(block.ln1, "w", None), Tensor) for block in model.blocks]
    if any(found) and not all(found):
        raise ValueError("composition and copying scores need every layer's ln1 alike: some have a scale (w) and "
                         "some not")


def _ln1_scale(model: HookedTransformer, layer: int, dtype: torch.dtype) -> Tensor | None:
    """Layer ``layer``'s ``ln1`` scale, ``(d_model,)``, or ``None`` where its norm has none (``LNPre``, ``RMSPre``,
    no norm)."""
    # what ln1 multiplies by: w in every norm of a HookedTransformer (its Gemma conversion stores 1 + w; a
    # TransformerBridge config's rmsnorm_uses_offset says nothing about this model)
    scale = getattr(model.blocks[layer].ln1, "w", None)
    return scale.to(dtype) if isinstance(scale, Tensor) else None


def _gram(x: Tensor) -> Tensor:
    """``x^T x`` over the last two dims."""
    return x.transpose(-2, -1) @ x


@in_probe_modes  # no autograd graph over the parameters (it would keep every pair's products), no caller's autocast
def composition_scores(
    model: HookedTransformer, mode: str
) -> Float[Tensor, "n_layers n_heads n_layers n_heads"]:
    """The Q-, K- or V-composition score of every pair of heads, writer in an earlier layer than reader.

    ``scores[l1, h1, l2, h2]`` is how much head ``h2`` of layer ``l2`` reads (through its query, key or value)
    what head ``h1`` of layer ``l1`` writes, zero unless ``l1 < l2``: TransformerLens's
    ``all_composition_scores(mode.upper())`` on the model's weights after ``process_weights_`` (module
    docstring), without changing the model, except that a pair with a zero matrix (a pruned head) scores 0
    where TransformerLens's is NaN.

    Args:
        model: Any `HookedTransformer` with pre-norm blocks (LayerNorm, RMSNorm, their ``Pre`` forms or none).
        mode: ``"q"``, ``"k"`` or ``"v"`` (either case).

    Returns:
        ``[n_layers, n_heads, n_layers, n_heads]`` on the model's device, float32 (float64 for a float64 model).

    Raises:
        ValueError: for another mode, or a model whose norms the scores cannot fold (`check_composition_model`).
    """
    kind = mode.lower() if isinstance(mode, str) else mode
    if kind not in ("q", "k", "v"):
        raise ValueError(f"mode must be 'q', 'k' or 'v' (Q-, K- or V-composition), got mode={mode!r}")
    check_composition_model(model.cfg)
    _check_ln1_alike(model)
    cfg = model.cfg
    n_layers, n_heads, d_model, d_head = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
    dtype, device = _fold_dtype(model), model.blocks[0].attn.W_O.device
    # one layer folded at a time (`folded_attention_weights`); what later layers need of a writer layer is kept,
    # [n_heads, d_head, d_head] a layer: the Gram matrix of its folded W_V and ||W_V W_O||_F^2 (the last layer
    # writes to no later one). Its W_O is folded again, or read in place, at each pair step (below), so no
    # writer's weights are kept across layers
    gram_v = torch.empty(n_layers - 1, n_heads, d_head, d_head, dtype=dtype, device=device)
    writer_sq = torch.empty(n_layers - 1, n_heads, dtype=dtype, device=device)
    scores = torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=dtype, device=device)
    # a writer layer's heads per block: the pairs' (writers, H, dh, dh) temporaries hold at most one layer's
    # n_heads^2 d_head^2 elements (a folded weight's n_heads d_model d_head where n_heads d_head = d_model) and
    # PAIR_BLOCK_ELEMENTS
    block = max(1, min(n_heads, PAIR_BLOCK_ELEMENTS // (n_heads * d_head * d_head)))
    for layer in range(n_layers):
        # the writer's W_OV = W_V W_O: left factor W_V, right factor W_O
        if layer + 1 < n_layers or (kind == "v" and layer > 0):
            w_v, w_o = folded_attention_weights(model, layer, "W_V", "W_O")
            layer_gram_v = _gram(w_v)  # (H, dh, dh)
            if kind != "v":
                del w_v
            layer_writer_sq = (layer_gram_v @ w_o).mul_(w_o).sum(dim=(-2, -1))  # ||W_V W_O||_F^2, (H,)
            if layer + 1 < n_layers:
                gram_v[layer], writer_sq[layer] = layer_gram_v, layer_writer_sq
            if kind != "v":
                del w_o
        if layer == 0:
            continue
        # the reader's matrix M = reads @ rest: the product with the writer is W_V (W_O reads) rest
        if kind in ("q", "k"):  # W_Q W_K^T, or its transpose W_K W_Q^T: one norm
            w_q, w_k = folded_attention_weights(model, layer, "W_Q", "W_K")
            gram_q, gram_k = _gram(w_q), _gram(w_k)
            reads, gram_rest = (w_q, gram_k) if kind == "q" else (w_k, gram_q)
            reader_sq = (gram_q * gram_k).sum(dim=(-2, -1))  # ||W_Q W_K^T||_F^2
            del w_q, w_k
        else:  # W_V W_O
            reads, gram_rest, reader_sq = w_v, w_o @ w_o.transpose(-2, -1), layer_writer_sq
            del w_v, w_o
        reader = reads.permute(1, 0, 2).reshape(d_model, n_heads * d_head)
        del reads
        for writer_layer in range(layer):
            # the writer's W_O centred over d_model where the norm centres (LN, LNPre), a copy of one layer's; else
            # read in place. Un-centred, its mean times the centred reader's sums over d_model is zero only in exact
            # arithmetic: the rounding of those large terms stayed in the core, so a head writing only along the
            # ones direction (its centred W_OV zero) scored 1e34 in float32 for 0, and a mean 1,000x W_O's spread
            # left 1e-4 where centred first 1e-7
            if cfg.normalization_type in _CENTRED_NORMS:
                (w_o,) = folded_attention_weights(model, writer_layer, "W_O")  # (H, dh, dm)
            else:
                w_o = model.blocks[writer_layer].attn.W_O.to(dtype)  # nothing to centre: read in place
            for start in range(0, n_heads, block):
                stop = min(start + block, n_heads)
                # every (writer, reader) core C = W_O(w) @ reads(r), (dh, dh), from one matrix product:
                # core[w * dh + i, r * dh + j] = C(w, r)[i, j]
                core = w_o[start:stop].reshape(-1, d_model) @ reader
                writers = stop - start
                # G_v(w) C(w, r) and C(w, r) G_rest(r), batched over the writers and over the readers on strided
                # views of the core: a broadcast Gram matrix, or a transposed core, would be copied to the size of
                # the core first, (writers, H, dh, dh)
                left = torch.bmm(gram_v[writer_layer, start:stop], core.view(writers, d_head, n_heads * d_head))
                right = torch.bmm(core.view(writers * d_head, n_heads, d_head).transpose(0, 1), gram_rest)
                del core
                # ||W_V W_O M||_F^2 of each (writer, reader): left is (w, i, r, j), right (r, w, i, j)
                product = left.view(writers, d_head, n_heads, d_head).mul_(
                    right.view(n_heads, writers, d_head, d_head).permute(1, 2, 0, 3))
                del left, right
                torch.sum(product, dim=(1, 3), out=scores[writer_layer, start:stop, layer])  # (writers, H)
                del product
            del w_o
        # the reader layer's norms at once (a few kernels a reader layer, not a writer layer); the products' rounding
        # may dip below 0
        pairs = scores[:layer, :, layer]  # (writer layers, H, H)
        norms = (writer_sq[:layer].unsqueeze(-1) * reader_sq).sqrt_()
        # a head whose matrix is zero composes with nothing: its products are zero too (||AB|| <= ||A|| ||B||), so
        # 0 / tiny = 0 where TransformerLens divides 0 by 0 (NaN), which made every later head's largest NaN
        pairs.clamp_min_(0.0).sqrt_().div_(norms.clamp_min_(torch.finfo(dtype).tiny))
        del reader  # before the next layer's weights are folded
    return scores


def check_composition_model(cfg: HookedTransformerConfig, what: str = "composition scores") -> None:
    """Refuses a model whose weights the composition scores (or ``what``, named in the message) cannot fold like
    ``process_weights_``.

    Raises:
        ValueError: for a post-norm architecture (its attention reads the un-normed stream) or a
            normalisation other than LayerNorm, RMSNorm, their ``Pre`` forms or none.
    """
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        raise ValueError(f"{what} need pre-norm blocks; {cfg.original_architecture} is post-norm")
    if cfg.normalization_type not in _KNOWN_NORMS:
        raise ValueError(f"{what} fold LN, LNPre, RMS, RMSPre or no normalisation into the weights, "
                         f"got normalization_type={cfg.normalization_type!r}")


class CompositionProbe(WeightsProbe):
    """Per head, its largest composition score with any head of an earlier layer (`composition_scores`).

    Result: ``{name}`` ``[n_layers, n_heads]``; layer 0, which has no earlier layer, reads 0 (as
    TransformerLens's masked entries). Reads the weights only: no batch is drawn or forwarded for it.
    """

    per_head: ClassVar[bool] = True
    heatmap_range: ClassVar[tuple[float, float]] = (0.0, 0.3)  # random weights score about 1 / sqrt(d_model)
    mode: ClassVar[CompositionMode]

    @override
    def check_config(self, cfg: HookedTransformerConfig) -> None:
        if cfg.n_layers < 2:
            raise ValueError(f"probe {self.name!r} scores heads against heads of earlier layers; "
                             f"a model of {cfg.n_layers} layer has none")
        try:
            check_composition_model(cfg)
        except ValueError as err:
            raise ValueError(f"probe {self.name!r}: {err}") from None

    @override
    def compute(self) -> dict[str, Tensor]:
        scores = composition_scores(self.model, self.mode)  # (L1, H1, L2, H2)
        return {MAIN_KEY: scores.amax(dim=(0, 1)).float()}  # per reader head; layer 0's row stays 0


@register_probe
class QCompositionProbe(CompositionProbe):
    """Per head, its largest Q-composition score with a head of an earlier layer."""

    name: ClassVar[str] = "q_composition"
    mode: ClassVar[CompositionMode] = "q"


@register_probe
class KCompositionProbe(CompositionProbe):
    """Per head, its largest K-composition score with a head of an earlier layer (an induction head's
    with the previous-token head it reads)."""

    name: ClassVar[str] = "k_composition"
    mode: ClassVar[CompositionMode] = "k"


@register_probe
class VCompositionProbe(CompositionProbe):
    """Per head, its largest V-composition score with a head of an earlier layer."""

    name: ClassVar[str] = "v_composition"
    mode: ClassVar[CompositionMode] = "v"
