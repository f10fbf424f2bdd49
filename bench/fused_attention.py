"""What the fused attention buys a probe run (issue: performance), measured side by side in one run.

A probe batch that no enabled probe reads attention patterns from runs each attention layer as one
``F.scaled_dot_product_attention`` call instead of building the ``[batch, head, query, key]``
scores and pattern (``lens_callback.probes.attention.FUSED_ATTENTION``). With the default probes
both batches are read (the attention entropy reads the text batch's patterns), so nothing changes;
without the entropy, the text batch runs fused. This script times, interleaved over rounds, the
callback's probe run (runner + the one host transfer, as ``bench/profile_probe.py --per-probe``)
for the config's probes and for the same probes without those that read the text batch's
patterns, each with ``FUSED_ATTENTION`` on and off, next to the plain ``GPT`` forward of the probe
batches, and prints each pair's ratio.

Usage: ``python bench/fused_attention.py [--config configs/default.yaml] [--model-config JSON]
[--device cpu|cuda] [--rounds 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lens_callback.probes.attention as attention_module  # noqa: E402
from bench.allocator import keep_freed_memory  # noqa: E402
from bench.run import Bench, add_model_arguments, interleaved, make_bench, with_setting  # noqa: E402
from lens_callback.measure import build_runner, measure  # noqa: E402
from lens_callback.probes import AttentionPatternProbe  # noqa: E402


def text_pattern_probes(bench: Bench) -> list[str]:
    """The enabled probes that read the text batch's attention patterns (hook ``hook_pattern``)."""
    cfg = bench.cb._hooked.cfg
    return [p.name for p in bench.cb.runner.probes
            if p.batch == "text" and (isinstance(p, AttentionPatternProbe)
                                      or any(name.endswith(("hook_pattern", "hook_attn_scores")) for name in p.hook_names(cfg)))]


def probe_run(bench: Bench, probes: list[str], fused: bool) -> Callable[[], None]:
    """The callback's probe run over a fresh runner for ``probes``, with `FUSED_ATTENTION` = ``fused``."""
    cb = bench.cb
    runner = build_runner(probes, {k: v for k, v in cb.probe_options.items() if k in probes})

    def run() -> None:
        measure(cb._hooked, runner, cb._inputs, max_batch_tokens=cb.max_batch_tokens,
                per_head_scalars=cb.per_head_scalars, lean_attention=cb._lean)

    return with_setting(attention_module, "FUSED_ATTENTION", fused, run)


def print_medians(times: dict[str, list[float]], bench: Bench, device: torch.device, rounds: int,
                  details: str = "") -> dict[str, float]:
    """Prints the machine and model line (``details`` after the model) and a table of each row's median and its
    ratio to the ``"plain GPT forward"`` row, as ``bench/composition_cost.py`` and ``bench/copying_cost.py`` do;
    returns the medians."""
    med = {key: statistics.median(values) for key, values in times.items()}
    plain = med["plain GPT forward"]
    config = bench.config
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; model {config.n_layer}L "
          f"{config.n_head}H {config.n_embd}d{details}; rounds {rounds}")
    print(f"| {'what':<45} | {'median ms':>9} | {'x plain':>7} |")
    for key, value in med.items():
        print(f"| {key:<45} | {value * 1e3:>9.2f} | {value / plain:>6.2f}x |")
    return med


def interleaved_bench(argv: list[str] | None, description: str,
                      more: Callable[[argparse.ArgumentParser], None] | None = None,
                      ) -> tuple[argparse.Namespace, torch.device, Bench]:
    """The command line (`add_model_arguments`, ``--rounds`` and what ``more`` adds) and bench of a script that
    interleaves its rows over rounds, as this one and ``bench/composition_cost.py``: warnings off, freed memory
    kept on a CPU."""
    parser = argparse.ArgumentParser(description=description)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=20)
    if more is not None:
        more(parser)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cpu" and not keep_freed_memory():
        print("(glibc not found: page faults stay in the timings)")
    return args, device, make_bench(args, device)


def main(argv: list[str] | None = None) -> int:
    args, device, bench = interleaved_bench(argv, __doc__.split("\n")[0])
    names = list(bench.cb.probes)
    readers = text_pattern_probes(bench)
    rest = [n for n in names if n not in readers]
    variants = {"config's probes": names}
    if readers and rest:
        variants[f"without {', '.join(readers)}"] = rest
    tasks: dict[str, Callable[[], None]] = {"plain GPT forward": bench.plain_forward}
    for label, probes in variants.items():
        tasks[f"{label}, fused"] = probe_run(bench, probes, True)
        tasks[f"{label}, built"] = probe_run(bench, probes, False)
    times = interleaved(tasks, args.rounds, device)
    med = {key: statistics.median(values) for key, values in times.items()}
    plain = med["plain GPT forward"]
    config = bench.config
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; model {config.n_layer}L "
          f"{config.n_head}H {config.n_embd}d; probe batches " + ", ".join(str(tuple(b.shape)) for b in bench.batches)
          + f"; rounds {args.rounds}")
    print(f"| {'probe run (runner + transfer)':<58} | {'median ms':>9} | {'x plain':>7} |")
    print(f"| {'plain GPT forward':<58} | {plain * 1e3:>9.2f} | {1.0:>6.2f}x |")
    for label in variants:
        for how in ("built", "fused"):
            key = f"{label}, {how}"
            what = f"{label}, patterns {'always built' if how == 'built' else 'built only where read'}"
            print(f"| {what:<58} | {med[key] * 1e3:>9.2f} | {med[key] / plain:>6.2f}x |")
    for label in variants:
        pairs = [f / b for f, b in zip(times[f"{label}, fused"], times[f"{label}, built"])]
        print(f"{label}: fused / built = {statistics.median(pairs):.3f} (median of per-round ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
