"""Induction score per head: attention from a repeated token to the token after its first copy.

On a sequence of ``L`` random tokens followed by an exact copy (``[batch, 2L]``, no BOS), an
induction head at query ``q`` in the second half attends to ``q - L + 1``: the token that followed
the earlier occurrence of the current token, which it then predicts. The score is the mean, over
the batch and the queries ``q`` in ``[L, 2L)``, of ``pattern[b, h, q, q - L + 1]``: the
prefix-matching score of Olsson et al. (2022), "In-context Learning and Induction Heads"
(Anthropic), on one repeat where they use several. TransformerLens's Main Demo takes the same
diagonal but also counts ``q = L - 1``, whose "induction" key ``0`` is not a repeat. A token that
recurs by chance within the first half has several keys after an earlier occurrence, and only
``q - L + 1`` counts: from a small token pool a perfect head scores below 1 (README, "Probe inputs").
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
class InductionProbe(DiagonalAttentionProbe):
    """Mean of ``pattern[b, h, q, q - L + 1]`` over ``b`` and ``q`` in ``[L, 2L)``, per head.

    Result: ``induction`` ``[n_layers, n_heads]`` in ``[0, 1]``.
    """

    name: ClassVar[str] = "induction"
    batch: ClassVar[BatchKind] = "repeated"
    min_repeat_length: ClassVar[int] = 3  # L = 1: the current token; L = 2: the previous one (prev_token's)

    @override
    def diagonal(self, seq_len: int) -> tuple[int, int]:
        half = seq_len // 2  # L
        return half - 1, half  # key q - L + 1 for q in [L, 2L)



def induction_score(
    model: HookedTransformer, tokens: Int[Tensor, "batch two_len"]
) -> Float[Tensor, "n_layers n_heads"]:
    """Induction score of every head of ``model`` on repeated ``tokens``.

    Args:
        model: Any `HookedTransformer`.
        tokens: ``[batch, 2L]``, the second half an exact copy of the first (no BOS), e.g. from
            `lens_callback.probes.inputs.repeated_tokens`.

    Returns:
        ``[n_layers, n_heads]`` float32 on the model's device.
    """
    return run_probe(model, InductionProbe(), tokens)[InductionProbe.name]
