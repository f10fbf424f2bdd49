"""Loss on a repeated random sequence: how well the model copies from its context.

On ``L`` random tokens followed by an exact copy (``[batch, 2L]``, no BOS), the tokens at
positions ``L + 1 .. 2L - 1`` can be predicted by copying (the token at ``L`` cannot: nothing
announces that the sequence restarts). A model with working induction heads gets a low loss on
them while its loss on the random first half stays near ``log(pool size)``. This is the
repeated-tokens experiment of Olsson et al. (2022), "In-context Learning and Induction Heads",
and of TransformerLens's Main Demo (which has no BOS token either).

``repeated_loss`` is the mean next-token loss of the predictions of tokens ``L + 1 .. 2L - 1``;
``repeated_loss/first_half`` is the same for tokens ``1 .. L - 1`` (the same number of
predictions, none of them predictable), for contrast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from jaxtyping import Float, Int
from torch import Tensor
from typing_extensions import override

from lens_callback.probes.base import MAIN_KEY, BatchKind, LossProbe, register_probe
from lens_callback.probes.runner import run_probe

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@register_probe
class RepeatedLossProbe(LossProbe):
    """Mean next-token loss on the copyable second half of a repeated sequence, and the first half.

    Results (scalars): ``repeated_loss`` (predictions of tokens ``L + 1 .. 2L - 1``) and
    ``repeated_loss/first_half`` (predictions of tokens ``1 .. L - 1``). Needs ``L >= 2``.
    """

    name: ClassVar[str] = "repeated_loss"
    batch: ClassVar[BatchKind] = "repeated"
    min_repeat_length: ClassVar[int] = 2

    @override
    def on_loss(
        self, token_loss: Float[Tensor, "batch pos_minus_1"], tokens: Int[Tensor, "batch pos"]
    ) -> None:
        b, t = tokens.shape
        half = t // 2  # L
        # token_loss[:, p] predicts token p + 1
        second = token_loss[:, half:].sum()  # tokens L+1 .. 2L-1: (B, L-1) summed
        first = token_loss[:, : half - 1].sum()  # tokens 1 .. L-1: (B, L-1) summed
        self.accumulate([second, first], b * (half - 1))  # predictions per half

    @override
    def compute(self) -> dict[str, Tensor]:
        second, first = self.means()
        return {MAIN_KEY: second, "first_half": first}


def repeated_loss(
    model: HookedTransformer, tokens: Int[Tensor, "batch two_len"]
) -> Float[Tensor, ""]:
    """Mean next-token loss of ``model`` on the copyable second half of repeated ``tokens``.

    Args:
        model: Any `HookedTransformer`.
        tokens: ``[batch, 2L]``, the second half an exact copy of the first (no BOS), ``L >= 2``.

    Returns:
        A float32 scalar on the model's device (the first-half loss is available from
        `RepeatedLossProbe` through a `ProbeRunner`).
    """
    return run_probe(model, RepeatedLossProbe(), tokens)[RepeatedLossProbe.name]
