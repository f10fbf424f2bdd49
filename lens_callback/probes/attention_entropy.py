"""Normalised attention entropy per head: how spread out each head's attention is on real text.

For a causal head, query row ``q`` spreads over ``q + 1`` keys, so its entropy is at most
``log(q + 1)``. The score is the mean, over the batch and the queries ``q >= 1``, of
``H(pattern[b, h, q, :]) / log(q + 1)``, in ``[0, 1]``: 1 for uniform attention over the visible
keys, 0 for attention on a single key. Dividing by ``log(q + 1)`` rather than ``log(T)`` keeps
early rows (which cannot reach ``log(T)``) from dragging the mean down. ``q = 0`` (a single key)
is skipped. ``0 * log 0`` is taken as 0. A bidirectional model is refused, and so are sequences
longer than the window of a model with sliding-window layers (``use_local_attn``: row ``q`` sees
``min(q + 1, window_size)`` keys). A half-precision pattern (bfloat16, float16) is renormalised row
by row in float32 first: its rounded rows miss 1 by up to 4e-3 (bfloat16; float16 5e-4), which put a
uniform bfloat16 head at 1.00035.

Cost, on CPU: ``p * log(max(p, tiny))`` (``tiny`` the smallest normal float32, so ``0 * log 0`` is
an exact 0 and ``p < tiny`` contributes below 1e-36) uses the vectorised ``log``;
``torch.special.entr`` is a scalar loop on CPU and took 1.8x as long, ``torch.xlogy`` 1.8x too.
Keys after the query hold exact zeros (causal mask), so rows are taken in `ROW_BLOCKS` blocks,
block ``[a, e)`` reading keys ``[0, e)`` only (62.5 % of the elements for 4 blocks), in one reused
float32 scratch buffer. On other devices (types not in `ROW_BLOCKS_ON`) one ``torch.xlogy``
kernel per block and blocks of at most `BLOCK_ELEMENTS` elements: a GPU's eager probe step is bound
by kernel launches, and one ``xlogy`` pass moves less memory than three. GPT-2 small's text batch
(8 x 512 tokens) takes two blocks per layer, 10 kernels instead of 28, and the blocks' temporaries
stay below half the pattern (meta-device count and peak, ``bench/profile_probe.py --count-ops``).

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
    from transformer_lens import HookedTransformer, HookedTransformerConfig


ROW_BLOCKS = 4
"""Row blocks per pattern on CPU: block ``[a, e)`` reads keys ``< e`` only."""
ROW_BLOCKS_ON: dict[str, int] = {"cpu": ROW_BLOCKS}
"""Row blocks per device type; types not listed take ``torch.xlogy`` in blocks of `BLOCK_ELEMENTS`."""
BLOCK_ELEMENTS = 1 << 24
"""Off the CPU: most pattern elements per ``xlogy`` block (64 MB of float32)."""
_TINY = torch.finfo(torch.float32).tiny
_HALF = (torch.bfloat16, torch.float16)  # patterns whose rows `reduce_pattern` renormalises in float32


@register_probe
class AttentionEntropyProbe(AttentionPatternProbe):
    """Mean over ``b`` and ``q >= 1`` of the entropy of row ``q`` divided by ``log(q + 1)``.

    Result: ``attn_entropy`` ``[n_layers, n_heads]`` in ``[0, 1]``.
    """

    name: ClassVar[str] = "attn_entropy"
    batch: ClassVar[BatchKind] = "text"

    def __init__(self) -> None:
        super().__init__()
        self._neg_inv_max_entropy: Tensor | None = None  # (T-1,): -1 / log(q + 1) for q = 1 .. T-1
        self._scratch: Tensor | None = None  # flat float32, reused for p * log p
        self._local: tuple[list[int], int] | None = None  # sliding-window layers and their window (check_config)

    @override
    def check_config(self, cfg: HookedTransformerConfig) -> None:
        super().check_config(cfg)
        if cfg.attention_dir != "causal":  # row q spreads over every key, not q + 1 of them
            raise ValueError(f"probe {self.name!r} is defined for causal attention (row q over keys 0..q, normalised "
                             f"by log(q + 1)); this model's attention_dir is {cfg.attention_dir!r}")
        local = [layer for layer, kind in enumerate(cfg.attn_types or []) if kind == "local"]
        # sliding-window layers: row q sees min(q + 1, window_size) keys, q + 1 up to the window only
        window = cfg.window_size  # TransformerLens's config requires one with use_local_attn
        self._local = (local, window) if cfg.use_local_attn and local and window is not None else None

    @override
    def check_seq_len(self, seq_len: int) -> None:
        """Also refuses sequences longer than a sliding-window layer's window (`check_config`): its rows
        past the window see ``window_size`` keys, not ``q + 1``, so dividing by ``log(q + 1)`` would score
        a head uniform over what it sees below 1 (the runner calls this before it runs a batch)."""
        super().check_seq_len(seq_len)
        if self._local is not None and seq_len > self._local[1]:
            layers, window = self._local
            raise ValueError(f"probe {self.name!r} normalises row q by log(q + 1), the keys a causal row sees; this "
                             f"model's layers {layers} attend to the last window_size={window} keys only "
                             f"(use_local_attn), so on {seq_len}-token sequences the rows from q = {window} on see "
                             f"{window} keys and a head uniform over them would score below 1: use text sequences "
                             f"of at most {window} tokens (text_len)")

    @override
    def reduce_pattern(
        self,
        pattern: Float[Tensor, "batch head query key"],
        tokens: Int[Tensor, "batch pos"],
    ) -> tuple[Float[Tensor, " head"], int]:
        b, _, t, _ = pattern.shape
        # the entropy's sign rides on the weights: sum(p log p) * (-1 / log(q + 1)), no negation
        inv = self._neg_inv_max_entropy
        if inv is None or inv.shape[0] != t - 1 or inv.device != pattern.device:
            q = torch.arange(1, t, dtype=torch.float32, device=pattern.device)  # (T-1,)
            inv = self._neg_inv_max_entropy = torch.log1p(q).reciprocal_().neg_()
        blocks = ROW_BLOCKS_ON.get(pattern.device.type)
        if blocks is None:  # xlogy: one kernel for p log p, blocks bounded in elements
            step = max(1, BLOCK_ELEMENTS // (b * pattern.shape[1] * t))
        else:
            step = -(-(t - 1) // blocks)
        total = None
        for start in range(1, t, step):
            end = min(t, start + step)
            p = pattern[:, :, start:end, :end].float()  # (B, nh, rows, end); keys >= end are 0
            if pattern.dtype in _HALF:  # rows rounded to 8 or 11 bits miss 1 by up to 4e-3
                p.div_(p.sum(dim=-1, keepdim=True).clamp_min_(_TINY))  # `p` is a float32 copy here
            if blocks is None:
                p_log_p = torch.xlogy(p, p)
            else:
                p_log_p = torch.clamp_min(p, _TINY, out=self._scratch_like(p)).log_().mul_(p)
            neg_entropy = p_log_p.sum(dim=-1)  # (B, nh, rows)
            del p_log_p  # before the next block's
            block_total = torch.matmul(neg_entropy, inv[start - 1 : end - 1]).sum(dim=0)  # (nh,)
            total = block_total if total is None else total.add_(block_total)
        assert total is not None  # t >= 2 (check_seq_len): at least one block
        return total, b * (t - 1)

    def _scratch_like(self, p: Tensor) -> Tensor:
        """A float32 tensor shaped like ``p`` in the reused scratch buffer."""
        n = p.numel()
        scratch = self._scratch
        if scratch is None or scratch.numel() < n or scratch.device != p.device:
            scratch = self._scratch = torch.empty(n, dtype=torch.float32, device=p.device)
        return scratch[:n].view(p.shape)

    @override
    def compute(self) -> dict[str, Tensor]:
        if self._scratch is not None and self._scratch.device.type != "cpu":
            self._scratch = None  # the device's caching allocator reuses memory; CPU pays page faults
        return super().compute()


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
