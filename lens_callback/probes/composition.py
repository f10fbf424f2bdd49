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
The model itself is not changed, and a model processed already gives the same scores. One departure: a
model built with ``LNPre`` norms (no ``ln1.w``) gets its query, key and value weights centred too, which
``process_weights_``, folding nothing there, leaves as they are: the centred norm output never reads their
mean over ``d_model``, and the scores should not depend on a weight the model does not use. What the scores
leave out, as TransformerLens's do: the normalisation's per-token scale, biases, MLPs, rotary positions (the
rotation between query and key is not in ``W_QK``), and norms inside the attention (``use_qk_norm``'s query
and key norms, ``use_normalization_before_and_after``'s ``ln1_post`` on the head outputs).

No singular value decomposition: a product ``a1 C b2`` of ``[d_model, d_head]``-thin factors has
``||a1 C b2||_F^2 = sum((G_a C) * (C G_b))`` with the ``[d_head, d_head]`` Gram matrices ``G_a = a1^T a1``
and ``G_b = b2 b2^T``, so every pair costs ``d_head^2 * d_model`` multiply-adds (one matrix product per
reader layer, for all its pairs) and nothing synchronises with the host.

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

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

CompositionMode = Literal["q", "k", "v"]

PAIR_BLOCK_ELEMENTS = 2**24
"""The most elements of each ``[writers, readers, d_head, d_head]`` temporary of `composition_scores` (64 MiB in
float32): the writers of a reader layer are taken in blocks that stay within it."""

_CENTRED_NORMS = ("LN", "LNPre")  # a norm that takes out the mean: TransformerLens centres around it
_KNOWN_NORMS = (*_CENTRED_NORMS, "RMS", "RMSPre", None)
_ATTENTION_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O")


def folded_attention_weights(model: HookedTransformer, *names: str) -> tuple[Tensor, ...]:
    """The stacked attention weights named (``"W_Q"``, ``"W_K"``, ``"W_V"`` ``[L, H, d_model, d_head]``, ``"W_O"``
    ``[L, H, d_head, d_model]``), in that order, as ``process_weights_(fold_ln=True, center_writing_weights=True)``
    would leave them, in float32 (float64 for a float64 model), as new tensors: the composition scores' and the
    copying score's (`lens_callback.probes.copying`) weights."""
    cfg = model.cfg
    dtype = torch.float64 if model.blocks[0].attn.W_Q.dtype == torch.float64 else torch.float32
    # copies, changed in place below: TransformerLens stacks the blocks' weights afresh, a subclass might not;
    # one stack at a time, each freed once copied (all four held beside their copies doubled the weights)
    weights = [getattr(model, name).to(dtype, copy=True) for name in names]
    reading = [weight for name, weight in zip(names, weights) if name != "W_O"]  # what reads ln1's output
    gamma = _ln1_scales(model, dtype)
    if gamma is not None:
        for weight in reading:
            weight.mul_(gamma[:, None, :, None])
    if cfg.normalization_type in _CENTRED_NORMS:
        for weight in reading:
            weight.sub_(weight.mean(dim=-2, keepdim=True))
        for name, weight in zip(names, weights):
            if name == "W_O":
                weight.sub_(weight.mean(dim=-1, keepdim=True))
    return tuple(weights)


def _ln1_scales(model: HookedTransformer, dtype: torch.dtype) -> Tensor | None:
    """Every layer's ``ln1`` scale, ``(L, d_model)``, or ``None`` where the norms have none (``LNPre``, ``RMSPre``,
    no norm)."""
    found = [getattr(block.ln1, "w", None) for block in model.blocks]
    scales = [scale for scale in found if isinstance(scale, Tensor)]
    if scales and len(scales) < len(found):
        raise ValueError("composition and copying scores need every layer's ln1 alike: some have a scale (w) and "
                         "some not")
    # what ln1 multiplies by: w in every norm of a HookedTransformer (its Gemma conversion stores 1 + w; a
    # TransformerBridge config's rmsnorm_uses_offset says nothing about this model)
    return torch.stack(scales).to(dtype) if scales else None


def _gram(x: Tensor) -> Tensor:
    """``x^T x`` over the last two dims."""
    return x.transpose(-2, -1) @ x


@torch.no_grad()  # no autograd graph over the model's parameters, which would keep every pair's products
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
    w_q, w_k, w_v, w_o = folded_attention_weights(model, *_ATTENTION_WEIGHTS)
    n_layers, n_heads, d_model, d_head = w_q.shape
    # the writer's W_OV = W_V W_O: left factor W_V, right factor W_O
    gram_v = _gram(w_v)  # (L, H, dh, dh)
    writer_sq = ((gram_v @ w_o) * w_o).sum(dim=(-2, -1))  # ||W_V W_O||_F^2, (L, H)
    # the reader's matrix M = reads @ rest: the product with the writer is W_V (W_O reads) rest
    if kind in ("q", "k"):  # W_Q W_K^T, or its transpose W_K W_Q^T: one norm
        gram_q, gram_k = _gram(w_q), _gram(w_k)
        reads, gram_rest = (w_q, gram_k) if kind == "q" else (w_k, gram_q)
        reader_sq = (gram_q * gram_k).sum(dim=(-2, -1))  # ||W_Q W_K^T||_F^2
    else:  # W_V W_O
        reads, gram_rest = w_v, w_o @ w_o.transpose(-2, -1)
        reader_sq = writer_sq
    scores = w_q.new_zeros(n_layers, n_heads, n_layers, n_heads)
    flat_o, flat_gram_v = w_o.reshape(n_layers * n_heads, d_head, d_model), gram_v.reshape(-1, 1, d_head, d_head)
    # writers per block: the pairs' (dh, dh) temporaries stay within PAIR_BLOCK_ELEMENTS each (one block per
    # layer up to GPT-2 small's shape; a 7B model's last layer held 2 GB per temporary in one)
    block = max(1, PAIR_BLOCK_ELEMENTS // (n_heads * d_head * d_head))
    for layer in range(1, n_layers):
        reader = reads[layer].permute(1, 0, 2).reshape(d_model, n_heads * d_head)
        for start in range(0, layer * n_heads, block):
            stop = min(start + block, layer * n_heads)
            # every (writer, reader) core W_O(w) @ reads(r), (dh, dh), from one matrix product
            core = flat_o[start:stop].reshape(-1, d_model) @ reader
            core = core.view(stop - start, d_head, n_heads, d_head).transpose(1, 2)  # (writers, H, dh, dh)
            left = flat_gram_v[start:stop] @ core
            right = core @ gram_rest[layer].unsqueeze(0)
            product_sq = (left * right).sum(dim=(-2, -1)).clamp_min_(0.0)  # (writers, H); rounding may dip below 0
            norms = (writer_sq.view(-1, 1)[start:stop] * reader_sq[layer].unsqueeze(0)).sqrt_()
            # a head whose matrix is zero composes with nothing: its products are zero too (||AB|| <= ||A|| ||B||),
            # so 0 / tiny = 0 where TransformerLens divides 0 by 0 (NaN), which made every later head's largest NaN
            score = product_sq.sqrt_() / norms.clamp_min_(torch.finfo(norms.dtype).tiny)
            scores.view(n_layers * n_heads, n_layers, n_heads)[start:stop, layer] = score
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
