"""Duplicate-token score per head: attention from a repeated token to its earlier copy.

On a sequence of ``L`` random tokens followed by an exact copy (``[batch, 2L]``, no BOS), a
duplicate-token head at query ``q`` in the second half attends to ``q - L``, the earlier occurrence
of the same token. The score is the mean, over the batch and the queries ``q`` in ``[L, 2L)``, of
``pattern[b, h, q, q - L]``. Duplicate-token heads are one of the head classes of Wang et al.
(2022), "Interpretability in the Wild" (IOI); TransformerLens's ``head_detector`` looks for them on
the same kind of repeated sequence but scores attention to every earlier equal token over all ``2L``
rows: about half this score for a head that attends only to ``q - L`` (0.63x on the demo's trained
heads), but chance repeats inside a sequence add to it, so on diffuse heads or small token pools it
can exceed this score (uniform heads: 0.9-1.1x with the default run's 90-token pool, by the draw, 11x with 4 tokens).
Batch construction follows Olsson et al. (2022), "In-context Learning and Induction Heads".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from jaxtyping import Float, Int
from torch import Tensor
from typing_extensions import override

from lens_callback.probes.base import BatchKind, DiagonalAttentionProbe, register_probe
from lens_callback.probes.runner import run_probe

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@register_probe
class DuplicateTokenProbe(DiagonalAttentionProbe):
    """Mean of ``pattern[b, h, q, q - L]`` over ``b`` and ``q`` in ``[L, 2L)``, per head.

    Result: ``duplicate_token`` ``[n_layers, n_heads]`` in ``[0, 1]``.
    """

    name: ClassVar[str] = "duplicate_token"
    batch: ClassVar[BatchKind] = "repeated"
    min_repeat_length: ClassVar[int] = 2  # L = 1: the diagonal would be the previous token

    @override
    def diagonal(self, seq_len: int) -> tuple[int, int]:
        half = seq_len // 2  # L
        return half, half  # key q - L for q in [L, 2L)



def duplicate_token_score(
    model: HookedTransformer, tokens: Int[Tensor, "batch two_len"]
) -> Float[Tensor, "n_layers n_heads"]:
    """Duplicate-token score of every head of ``model`` on repeated ``tokens``.

    Args:
        model: Any `HookedTransformer`.
        tokens: ``[batch, 2L]``, the second half an exact copy of the first (no BOS).

    Returns:
        ``[n_layers, n_heads]`` float32 on the model's device.
    """
    return run_probe(model, DuplicateTokenProbe(), tokens)[DuplicateTokenProbe.name]
