"""Normalised attention entropy per head: how spread out each head's attention is on real text.

For a causal head, query row ``q`` spreads over ``q + 1`` keys, so its entropy is at most
``log(q + 1)``. The score is the mean, over the batch and the queries ``q >= 1``, of
``H(pattern[b, h, q, :]) / log(q + 1)``, in ``[0, 1]``: 1 for uniform attention over the visible
keys, 0 for attention on a single key. Dividing by ``log(q + 1)`` rather than ``log(T)`` keeps
early rows (which cannot reach ``log(T)``) from dragging the mean down. ``q = 0`` (a single key)
is skipped. ``0 * log 0`` is taken as 0 (``torch.xlogy``).

Attention entropy as a head diagnostic is common practice (e.g. Zhai et al. 2023, "Stabilizing
Transformer Training by Preventing Attention Entropy Collapse"); the pattern hook is
TransformerLens's ``blocks.{l}.attn.hook_pattern``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from typing_extensions import override

from lens_callback.probes.base import AttentionPatternProbe, BatchKind, register_probe
from lens_callback.probes.runner import run_probe

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@register_probe
class AttentionEntropyProbe(AttentionPatternProbe):
    """Mean over ``b`` and ``q >= 1`` of the entropy of row ``q`` divided by ``log(q + 1)``.

    Result: ``attn_entropy`` ``[n_layers, n_heads]`` in ``[0, 1]``.
    """

    name: ClassVar[str] = "attn_entropy"
    batch: ClassVar[BatchKind] = "text"

    def __init__(self) -> None:
        super().__init__()
        self._inv_max_entropy: Tensor | None = None  # (T-1,): 1 / log(q + 1) for q = 1 .. T-1

    @override
    def reduce_pattern(
        self,
        pattern: Float[Tensor, "batch head query key"],
        tokens: Int[Tensor, "batch pos"],
    ) -> tuple[Float[Tensor, " head"], int]:
        b, _, t, _ = pattern.shape
        inv = self._inv_max_entropy
        if inv is None or inv.shape[0] != t - 1 or inv.device != pattern.device:
            q = torch.arange(1, t, dtype=torch.float32, device=pattern.device)  # (T-1,)
            inv = self._inv_max_entropy = torch.log1p(q).reciprocal()
        p = pattern[:, :, 1:, :].float()  # (B, nh, T-1, T)
        entropy = torch.special.entr(p).sum(dim=-1)  # (B, nh, T-1); entr(0) = 0, faster than -xlogy(p, p)
        return (entropy * inv).sum(dim=(0, 2)), b * (t - 1)


def attention_entropy(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "n_layers n_heads"]:
    """Normalised attention entropy of every head of ``model`` on ``tokens``.

    Args:
        model: Any `HookedTransformer`.
        tokens: ``[batch, T]`` tokens, ideally real text.

    Returns:
        ``[n_layers, n_heads]`` float32 in ``[0, 1]`` on the model's device.
    """
    return run_probe(model, AttentionEntropyProbe(), tokens)[AttentionEntropyProbe.name]
