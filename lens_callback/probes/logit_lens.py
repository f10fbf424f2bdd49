"""Logit lens: how close each layer's residual stream already is to the model's final prediction.

The logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens", LessWrong) decodes an
intermediate residual stream with the model's own final norm and unembedding. Here the residual
stream entering each layer (``blocks.{l}.hook_resid_pre``, ``l = 0 .. n_layers - 1``) and after the
last layer (``blocks.{n_layers - 1}.hook_resid_post``) gives ``n_layers + 1`` entries; entry ``l``
is decoded as ``unembed(ln_final(resid))``, with ``ln_final`` recomputed on that residual (not the
cached scale of the final residual: TransformerLens PR #1077 fixed that bug in
``ActivationCache.accumulated_resid``, and PR #1180 (issue #1076) gave ``apply_ln_to_stack`` the
per-slice recomputation) and skipped when ``normalization_type`` is ``None``. The
output soft-cap, if the model has one, is applied as in the model's forward. The last entry is
therefore the model's own output (to float rounding: the head is applied as
``resid @ W_U + b_U``, see `lens_callback.probes.runner.final_logits`).

Per entry, over the sampled positions: ``loss`` is the next-token cross-entropy, ``kl`` is
``KL(final || entry)`` (``final`` the distribution after the last layer; 0 for the last entry),
and ``top1`` the fraction of positions whose argmax agrees with the final argmax (1 for the last).

To bound memory with large vocabularies the hooks keep the residuals at no more than
``max_positions`` evenly spaced positions per sequence (the last position, which has no next
token, is never used) and the unembedding happens in `LogitLensProbe.compute`, all entries of a
block of rows at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from typing_extensions import override

from lens_callback.probes.base import BatchKind, Probe, register_probe
from lens_callback.probes.runner import final_log_probs, logit_block_rows, run_probe
from lens_callback.schedule import integer_or_none

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig


_LOWEST = torch.finfo(torch.float32).min
"""What the KL reads a log-probability of -inf (a probability of 0) as: a finite value, whose terms weigh 0."""


def evenly_spaced_positions(
    seq_len: int, max_positions: int, device: torch.device | str | None = None
) -> Int[Tensor, " n_positions"]:
    """Up to ``max_positions`` distinct, ascending positions in ``[0, seq_len - 2]``.

    All of ``0 .. seq_len - 2`` if there are no more than ``max_positions`` of them, otherwise
    ``p_i = floor(i * (seq_len - 1) / max_positions)`` for ``i < max_positions`` (starts at 0,
    spacing at least 1). The last position ``seq_len - 1`` has no next token and is never used.

    Args:
        seq_len: ``T``, tokens per sequence (at least 2).
        max_positions: The most positions to return (at least 1).
        device: Where to build the int64 index (built there: no host-to-device copy).
    """
    n = seq_len - 1
    if n <= max_positions:
        return torch.arange(n, device=device)
    return torch.arange(max_positions, device=device) * n // max_positions


@register_probe
class LogitLensProbe(Probe):
    """Per-layer next-token loss, KL to the final distribution, and top-1 agreement.

    Results (each ``[n_layers + 1]``, entry ``l < n_layers`` the residual entering layer ``l``,
    the last entry the final residual): ``logit_lens/loss``, ``logit_lens/kl``,
    ``logit_lens/top1``.

    Args:
        max_positions: Most positions per sequence kept in the hooks (evenly spaced, see
            `evenly_spaced_positions`). Bounds memory: ``n_layers + 1`` residuals of
            ``[batch, max_positions, d_model]`` are kept until `compute`.

    Raises:
        ValueError: If ``max_positions`` is not a positive int.
    """

    name: ClassVar[str] = "logit_lens"
    batch: ClassVar[BatchKind] = "text"

    def __init__(self, max_positions: int = 64) -> None:
        # numpy integers too (as LensCallback's settings), kept as an int
        if (number := integer_or_none(max_positions)) is None or number < 1:
            raise ValueError(
                f"max_positions must be a positive int, got max_positions={max_positions!r}"
            )
        self.max_positions = number
        self._model: HookedTransformer | None = None
        self._entry_of: dict[str, int] = {}
        self._resid: list[list[Tensor]] = []  # per entry, per chunk: (b, P, d_model)
        self._targets: list[Tensor] = []  # per chunk: (b, P)
        self._positions: Tensor | None = None  # (P,) on the device, for the current seq_len
        self._positions_for: int = -1  # seq_len the cached positions were built for

    @override
    def hook_names(self, cfg: HookedTransformerConfig) -> list[str]:
        last = cfg.n_layers - 1
        return [f"blocks.{layer}.hook_resid_pre" for layer in range(cfg.n_layers)] + [
            f"blocks.{last}.hook_resid_post"
        ]

    @override
    def bind(self, model: HookedTransformer | None) -> None:
        self._model = model

    @override
    def reset(self, cfg: HookedTransformerConfig, device: torch.device) -> None:
        self._entry_of = {hook: entry for entry, hook in enumerate(self.hook_names(cfg))}
        self._resid = [[] for _ in range(cfg.n_layers + 1)]
        self._targets = []
        self._positions = None
        self._positions_for = -1

    @override
    def on_activation(
        self, hook_name: str, activation: Tensor, tokens: Int[Tensor, "batch pos"]
    ) -> None:
        t = tokens.shape[1]
        if self._positions is None or self._positions_for != t:
            self._positions = evenly_spaced_positions(t, self.max_positions, tokens.device)  # (P,)
            self._positions_for = t
        entry = self._entry_of[hook_name]
        # index_select copies, so the full (B, T, d_model) activation is not kept alive
        self._resid[entry].append(activation.index_select(1, self._positions))  # (b, P, d_model)
        if entry == 0:
            self._targets.append(tokens.index_select(1, self._positions + 1))  # (b, P)

    @override
    def compute(self) -> dict[str, Tensor]:
        model = self._model
        if model is None:
            raise RuntimeError(f"probe {self.name!r} needs bind(model) before compute()")
        if not self._targets:
            raise RuntimeError(f"probe {self.name!r} has seen no residuals; run it first")
        resid = torch.stack([torch.cat(chunks).flatten(0, 1) for chunks in self._resid])  # (E, N, d_model)
        targets = torch.cat(self._targets).flatten()  # (N,)
        n_entries, n_rows = resid.shape[:2]
        final = n_entries - 1
        rows = logit_block_rows(resid.device, model.cfg.d_vocab_out * n_entries)

        sums = []  # per block: (3, n_entries) = loss, kl, top1 sums
        for start in range(0, n_rows, rows):
            block = slice(start, start + rows)
            # every entry decoded at once, each with ln_final's scale recomputed from its own rows
            logp = final_log_probs(model, resid[:, block])  # (E, R, V)
            target = targets[block].expand(n_entries, -1)[..., None]  # (E, R, 1)
            loss = -logp.gather(-1, target).sum(dim=(1, 2))  # (E,)
            top = logp.argmax(dim=-1)  # (E, R)
            top1 = (top == top[final]).sum(dim=1, dtype=torch.float32)  # (E,)
            # a logit of -inf (a vocabulary entry a head's bias masks out) is a probability of 0, whose KL
            # terms are 0 (0 log 0): its log-probability, -inf in every entry, made the terms -inf - -inf and
            # 0 * -inf, NaN, and every entry's KL NaN, the last one's too. At the lowest float32 they are
            # 0 * finite = 0; no finite value changes (the loss and top-1 above read the unclamped values)
            logp.clamp_min_(_LOWEST)
            final_logp = logp[final].clone()  # (R, V)
            # KL(final || entry) = sum p_final * (log p_final - log p_entry): the differences in
            # place over logp (exactly 0 for the final entry), weighted in place, summed by torch.sum,
            # which adds in a tree: a matrix-vector product over R*V terms per entry (one kernel)
            # accumulated them one after another, 1e-4 off at GPT-2's vocabulary
            diff = torch.sub(final_logp, logp, out=logp)  # (E, R, V)
            kl = diff.mul_(final_logp.exp_()).sum(dim=(1, 2))  # (E,)
            sums.append(torch.stack([loss, kl, top1]))  # (3, E)
            # free this block before the next is decoded: the names would keep it alive until
            # reassigned, two blocks at the peak
            del logp, final_logp, diff
        loss, kl, top1 = torch.stack(sums).sum(dim=0) / n_rows  # each (E,)
        return {"loss": loss, "kl": kl, "top1": top1}


def logit_lens(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    *,
    max_positions: int = 64,
) -> dict[str, Float[Tensor, " n_entries"]]:
    """Logit-lens loss, KL to the final distribution, and top-1 agreement per layer.

    Args:
        model: Any `HookedTransformer`.
        tokens: ``[batch, T]`` tokens, ideally real text.
        max_positions: Most positions per sequence used (see `LogitLensProbe`).

    Returns:
        ``{"loss", "kl", "top1"}``, each ``[n_layers + 1]`` float32 on the model's device.
    """
    results = run_probe(model, LogitLensProbe(max_positions=max_positions), tokens)
    prefix = f"{LogitLensProbe.name}/"
    return {key.removeprefix(prefix): value for key, value in results.items()}
