"""Previous-token score per head: attention from each token to the one just before it.

The score is the mean, over the batch and the queries ``q >= 1``, of ``pattern[b, h, q, q - 1]``
(``q = 0`` has no previous token). Previous-token heads supply the "previous token" half of the
induction circuit of Olsson et al. (2022), "In-context Learning and Induction Heads"; the diagonal
is the one TransformerLens's ``head_detector`` uses for ``previous_token_head``, which divides by all
``T`` rows (row 0 included), so its score is this one times ``(T - 1) / T``.

The probe reads the repeated batch: that forward runs anyway for the induction and duplicate-token
probes, so the previous-token score costs no extra forward. Random tokens also make the score
about position, not about text statistics.
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
class PreviousTokenProbe(DiagonalAttentionProbe):
    """Mean of ``pattern[b, h, q, q - 1]`` over ``b`` and ``q >= 1``, per head.

    Reads the repeated batch (see the module docstring). Result: ``prev_token``
    ``[n_layers, n_heads]`` in ``[0, 1]``.
    """

    name: ClassVar[str] = "prev_token"
    batch: ClassVar[BatchKind] = "repeated"
    reads_repeats: ClassVar[bool] = False  # any tokens: the key one position back

    @override
    def diagonal(self, seq_len: int) -> tuple[int, int]:
        return 1, 1  # key q - 1 for q >= 1



def previous_token_score(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "n_layers n_heads"]:
    """Previous-token score of every head of ``model`` on ``tokens``.

    Args:
        model: Any `HookedTransformer`.
        tokens: ``[batch, T]``; the probe's own batch is the repeated one, so ``T`` must be even.

    Returns:
        ``[n_layers, n_heads]`` float32 on the model's device.
    """
    return run_probe(model, PreviousTokenProbe(), tokens)[PreviousTokenProbe.name]
