"""In-context-learning score: how much lower the loss is late in the context than early on.

Olsson et al. (2022), "In-context Learning and Induction Heads", define the in-context learning
score as the loss at a late token position minus the loss at an early one (the 500th minus the
50th token of a 512-token context); it drops sharply when induction heads form. Negative means the
model makes use of context. Here the positions scale with the text batch length ``T``: by default
``early = T // 10`` and ``late = T - 2``, both configurable. Olsson et al. average over a whole
dataset; a probe batch holds a few windows, so each side averages a band of ``width`` positions
(default ``max(1, T // 20)``): ``[early, early + width)`` and ``(late - width, late]``. With one
position per side and 8 windows, the score of the default run swung by +-0.1 between probe steps.

A position ``p`` indexes the per-token loss: the loss at ``p`` is that of predicting token
``p + 1`` from tokens ``0 .. p`` (``p + 1`` tokens of context), so ``late = T - 2`` is the last
prediction in the window.

Only the ``2 * width`` band positions are decoded (`loss_positions`): the text batch needs no
full ``[batch, T, d_vocab]`` logits, which for GPT-2's vocabulary and a 1,024-token window would
be 206 MB per sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from jaxtyping import Float, Int
from torch import Tensor
from typing_extensions import override

from lens_callback.probes.base import MAIN_KEY, BatchKind, LossProbe, register_probe
from lens_callback.probes.runner import run_probe
from lens_callback.schedule import integer_or_none

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@register_probe
class ICLScoreProbe(LossProbe):
    """Mean loss at position ``late`` minus mean loss at position ``early`` on real text.

    Results (scalars): ``icl_score`` (late minus early), ``icl_score/early_loss``,
    ``icl_score/late_loss``.

    Args:
        early: Early position (index into the per-token loss, see the module docstring); default
            ``T // 10``.
        late: Late position; default ``T - 2``, the last prediction of a ``T``-token window.
        width: Positions averaged on each side: ``[early, early + width)`` and
            ``(late - width, late]``; default ``max(1, T // 20)``.

    Raises:
        ValueError: If a position is not a non-negative int or ``early >= late``; checked against
            ``T`` by `check_seq_len` (``late <= T - 2``).
    """

    name: ClassVar[str] = "icl_score"
    batch: ClassVar[BatchKind] = "text"

    def __init__(self, early: int | None = None, late: int | None = None, width: int | None = None) -> None:
        # numpy integers too (as LensCallback's settings), kept as ints
        if width is not None and ((number := integer_or_none(width)) is None or number < 1):
            raise ValueError(f"width must be a positive int or None, got width={width!r}")
        width = None if width is None else number
        positions = []
        for field_name, value in (("early", early), ("late", late)):
            if value is not None and ((number := integer_or_none(value)) is None or number < 0):
                raise ValueError(
                    f"{field_name} must be a non-negative int or None, got {field_name}={value!r}"
                )
            positions.append(None if value is None else number)
        early, late = positions
        if early is not None and late is not None and early >= late:
            raise ValueError(f"early must be < late, got early={early}, late={late}")
        super().__init__()
        self.early = early
        self.late = late
        self.width = width

    def positions(self, seq_len: int) -> tuple[int, int]:
        """The ``(early, late)`` positions used for a text batch of ``seq_len`` tokens."""
        early = seq_len // 10 if self.early is None else self.early
        late = seq_len - 2 if self.late is None else self.late
        return early, late

    def band(self, seq_len: int) -> int:
        """Positions averaged on each side for a text batch of ``seq_len`` tokens."""
        return max(1, seq_len // 20) if self.width is None else self.width

    @override
    def check_seq_len(self, seq_len: int) -> None:
        super().check_seq_len(seq_len)
        early, late = self.positions(seq_len)
        if late > seq_len - 2:
            raise ValueError(
                f"icl_score late={late} needs text_len >= late + 2 = {late + 2}, got {seq_len}"
            )
        if early >= late:
            raise ValueError(
                f"icl_score early={early} must be < late={late} (text_len={seq_len})"
            )
        width = self.band(seq_len)
        if early + width > late - width + 1:
            raise ValueError(
                f"icl_score bands overlap: early={early}, late={late}, width={width} (text_len={seq_len})"
            )

    @override
    def loss_positions(self, seq_len: int) -> list[int]:
        early, late = self.positions(seq_len)
        w = self.band(seq_len)
        return [*range(early, early + w), *range(late - w + 1, late + 1)]

    @override
    def on_loss(
        self, token_loss: Float[Tensor, "batch pos_minus_1"], tokens: Int[Tensor, "batch pos"]
    ) -> None:
        early, late = self.positions(tokens.shape[1])
        w = self.band(tokens.shape[1])
        early_band = token_loss[:, early : early + w]  # (B, w)
        late_band = token_loss[:, late - w + 1 : late + 1]  # (B, w)
        self.accumulate([early_band.sum(), late_band.sum()], early_band.numel())

    @override
    def compute(self) -> dict[str, Tensor]:
        early_loss, late_loss = self.means()
        return {MAIN_KEY: late_loss - early_loss, "early_loss": early_loss, "late_loss": late_loss}


def icl_score(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    *,
    early: int | None = None,
    late: int | None = None,
    width: int | None = None,
) -> Float[Tensor, ""]:
    """In-context-learning score of ``model`` on ``tokens``: late-position minus early loss.

    Args:
        model: Any `HookedTransformer`.
        tokens: ``[batch, T]`` tokens of real text.
        early: Early position; default ``T // 10``.
        late: Late position; default ``T - 2``.
        width: Positions averaged on each side; default ``max(1, T // 20)``.

    Returns:
        A float32 scalar on the model's device; negative when the model uses context.
    """
    return run_probe(model, ICLScoreProbe(early=early, late=late, width=width), tokens)[ICLScoreProbe.name]
