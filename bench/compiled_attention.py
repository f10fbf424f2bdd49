"""Whether ``torch.compile`` makes the attention entropy's text layers cheaper (issue: performance).

On the CPU the default probe step's largest excess over the plain forward is the text batch's
attention: the attention entropy reads its patterns, so each layer builds the ``[batch, head,
query, key]`` pattern and takes ``p log p`` over it, where the plain forward makes one fused
``F.scaled_dot_product_attention`` call (docs/performance.md). This script times one such layer,
interleaved over rounds, three ways:

- ``eager``: the callback's own code: scores by ``matmul`` into a reused buffer, the scale's
  ``div_``, `_mask_future_`, an in-place softmax, ``nan_to_num_``, ``pattern @ v``, and
  `AttentionEntropyProbe.reduce_pattern` on the pattern;
- ``compiled``: the same arithmetic as one function under ``torch.compile`` (inductor generates
  fused loops for the scale, the mask, the softmax and ``p log p``; the pattern is returned, as
  ``hook_pattern`` needs it for the other probes and the user's hooks), and once more without
  returning the pattern (the most a compiled route could save: nothing else may read it);
- ``sdpa``: the plain forward's fused attention, which builds no pattern and no entropy.

It also tries the one route that would give the entropy without a pattern from a public API,
``flex_attention`` with ``return_lse=True`` and values ``[v | k]`` (``H = lse - scale * q . (p @
k)``), and prints why it cannot run where it cannot (PyTorch 2.13 refuses ``return_lse`` under
``torch.compile`` on the CPU).

Usage: ``python bench/compiled_attention.py [--batch 8] [--heads 4] [--seq 256] [--d-head 32]
[--rounds 40]`` (the defaults: the default config's text batch, one layer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lens_callback.probes.attention import _mask_future_  # noqa: E402
from lens_callback.probes.attention_entropy import AttentionEntropyProbe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d-head", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    b, h, t, d = args.batch, args.heads, args.seq, args.d_head
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=generator) for _ in range(3))
    k_t = k.transpose(-1, -2).contiguous()  # (B, nh, hs, T): the callback's key layout
    scale = d ** 0.5  # TransformerLens's attn_scale: scores are divided by it
    ignore = torch.tensor(-torch.inf)
    tokens = torch.zeros(b, t, dtype=torch.long)
    probe = AttentionEntropyProbe()
    scores_buffer = torch.empty(b, h, t, t)
    inv = torch.log1p(torch.arange(1, t, dtype=torch.float32)).reciprocal_().neg_()  # the probe's weights
    future = torch.ones(t, t, dtype=torch.bool).triu_(1)

    def eager() -> tuple[Tensor, Tensor]:
        scores = torch.matmul(q, k_t, out=scores_buffer).div_(scale)
        _mask_future_(scores, ignore)
        pattern = torch.softmax(scores, dim=-1, out=scores).nan_to_num_(nan=0.0)
        z = torch.matmul(pattern, v)
        total, _ = probe.reduce_pattern(pattern, tokens)
        return z, total

    def core(q: Tensor, k_t: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scores = torch.where(future, -torch.inf, torch.matmul(q, k_t) / scale)
        pattern = torch.softmax(scores, dim=-1).nan_to_num(nan=0.0)
        rows = pattern[:, :, 1:]
        total = (torch.xlogy(rows, rows).sum(-1) * inv).sum((0, 2))
        return torch.matmul(pattern, v), total, pattern

    def core_no_pattern(q: Tensor, k_t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        z, total, _ = core(q, k_t, v)
        return z, total

    compiled = torch.compile(core, dynamic=False)
    compiled_no_pattern = torch.compile(core_no_pattern, dynamic=False)
    with torch.inference_mode():
        for name, fn in (("compiled", compiled), ("compiled, no pattern", compiled_no_pattern)):
            start = time.perf_counter()
            fn(q, k_t, v)
            print(f"{name}: first call (compilation) {time.perf_counter() - start:.1f} s")
        z_ref, total_ref = eager()
        z_c, total_c, _ = compiled(q, k_t, v)
        print(f"compiled against eager: z {(z_c - z_ref).abs().max().item():.1e}, "
              f"entropy sums {(total_c - total_ref).abs().max().item():.1e} (of {total_ref.abs().max().item():.0f})")
        variants: dict[str, Callable[[], object]] = {
            "eager (the callback's code)": eager,
            "compiled": lambda: compiled(q, k_t, v),
            "compiled, no pattern": lambda: compiled_no_pattern(q, k_t, v),
            "sdpa (plain forward, no entropy)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["eager (the callback's code)"])
    print(f"\none layer, [{b}, {h}, {t}, {t}] pattern, {args.rounds} interleaved rounds, medians "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads):")
    print(f"| what | median | x eager |\n|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median * 1e3:.2f} ms | {median / base:.2f} |")
    print(flex_lse_route(q, k, v))
    return 0


def flex_lse_route(q: Tensor, k: Tensor, v: Tensor) -> str:
    """Try ``flex_attention(..., return_lse=True)`` with values ``[v | k]``; say what happened."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:  # pragma: no cover - older torch
        return f"flex_attention route: not in this torch ({error})"
    t, d = q.shape[-2], q.shape[-1]
    try:
        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, t, t, device=q.device.type)
        with torch.inference_mode():
            out, lse = torch.compile(flex_attention)(q, k, torch.cat([v, k], -1), block_mask=mask,
                                                     scale=d ** -0.5, return_lse=True)
    except Exception as error:  # noqa: BLE001 - reporting why the route is closed
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"flex_attention route (lse + [v | k]): cannot run here: {type(error).__name__}: {lines[0] if lines else ''}"
    entropy = lse - d ** -0.5 * (q * out[..., d:]).sum(-1)
    return f"flex_attention route (lse + [v | k]): runs; mean row entropy {entropy.mean().item():.4f}"


if __name__ == "__main__":
    raise SystemExit(main())
