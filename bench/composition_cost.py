"""What the composition probes cost, measured side by side in one run.

``q_composition``, ``k_composition`` and ``v_composition`` read the weights only
(`lens_callback.probes.composition`). This script times, interleaved over rounds on the callback's
own model: the probe run (runner + the one host transfer, as ``bench/profile_probe.py --per-probe``)
with the config's probes and with the three composition probes added; `composition_scores` for one
mode; and TransformerLens's ``all_composition_scores`` for the same mode (its SVD route, on the
unprocessed weights, so the figures differ by the folding and are compared for time only). It prints
the medians, what the three probes add to the probe run, and the speed-up over TransformerLens's route.

Usage: ``python bench/composition_cost.py [--config configs/default.yaml] [--model-config JSON]
[--device cpu|cuda] [--rounds 20]``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fused_attention import interleaved_bench, print_medians, probe_run  # noqa: E402
from bench.run import interleaved  # noqa: E402
from lens_callback.probes import composition_scores  # noqa: E402

COMPOSITION = ["q_composition", "k_composition", "v_composition"]


def main(argv: list[str] | None = None) -> int:
    args, device, bench = interleaved_bench(argv, __doc__.split("\n")[0])
    model = bench.cb._hooked
    assert model is not None  # attached by make_bench
    names = [n for n in bench.cb.probes if n not in COMPOSITION]

    def ours() -> None:
        with torch.inference_mode():
            composition_scores(model, "k").sum().item()

    def theirs() -> None:
        with torch.inference_mode():
            model.all_composition_scores("K").sum().item()

    tasks: dict[str, Callable[[], None]] = {
        "plain GPT forward": bench.plain_forward,
        # the callback's probe run (runner + host transfer), attention fused where no probe reads a pattern
        "probe run, the config's probes": probe_run(bench, names, True),
        "probe run, + the 3 composition probes": probe_run(bench, names + COMPOSITION, True),
        "composition_scores(model, 'k')": ours,
        "TransformerLens all_composition_scores('K')": theirs,
    }
    times = interleaved(tasks, args.rounds, device)
    med = print_medians(times, bench, device, args.rounds)
    added = [b - a for a, b in zip(times["probe run, the config's probes"],
                                   times["probe run, + the 3 composition probes"])]
    speedup = [t / o for o, t in zip(times["composition_scores(model, 'k')"],
                                     times["TransformerLens all_composition_scores('K')"])]
    base = med["probe run, the config's probes"]
    print(f"the 3 composition probes add {statistics.median(added) * 1e3:.2f} ms to the probe run "
          f"({statistics.median(added) / base:.1%}); composition_scores is {statistics.median(speedup):.1f}x faster "
          f"than TransformerLens's all_composition_scores (medians of per-round differences and ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
