"""What the copying probe costs, measured side by side in one run.

``copying`` reads the weights only (`lens_callback.probes.copying`): on the device one ``W_U @ W_E``
(``d_model^2 * d_vocab`` multiply-adds) and each head's ``[d_head, d_head]`` matrix, then, after the probe
step's one transfer, their eigenvalues on the host. This script times, interleaved over rounds on the
callback's own model: the probe run (runner, the one host transfer and the host step, as
``bench/composition_cost.py``) with the config's probes and with ``copying`` added; the probe's two parts,
`copying_matrices` (device) and `eigenvalue_positivity` (host); and TransformerLens's demo route,
``(W_E @ FactoredMatrix(W_V, W_O) @ W_U).eigenvalues`` (on the unprocessed weights: compared for time only;
``--no-transformer-lens`` leaves it out, 2 x 0.7 T multiply-adds and 3.7 GB at GPT-2 small's shape). It prints
the medians, what the probe adds to the probe run, and the speed-up over TransformerLens's route.

Usage: ``python bench/copying_cost.py [--config configs/default.yaml] [--model-config JSON]
[--device cpu|cuda] [--rounds 20] [--no-transformer-lens]``.
"""

from __future__ import annotations

import argparse
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
from lens_callback.probes.copying import copying_matrices, eigenvalue_positivity  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    def more(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--no-transformer-lens", dest="transformer_lens", action="store_false",
                            help="leave out TransformerLens's route (slow and large at GPT-2's vocabulary)")

    args, device, bench = interleaved_bench(argv, __doc__.split("\n")[0], more)
    transformer_lens = args.transformer_lens
    model = bench.cb._hooked
    assert model is not None  # attached by make_bench
    names = [n for n in bench.cb.probes if n != "copying"]
    with torch.inference_mode():
        host_matrices = copying_matrices(model).float().cpu().numpy()

    def device_part() -> None:
        with torch.inference_mode():
            copying_matrices(model).sum().item()

    def host_part() -> None:
        eigenvalue_positivity(host_matrices)

    def theirs() -> None:
        from transformer_lens import FactoredMatrix

        with torch.inference_mode():
            eig = (model.W_E @ FactoredMatrix(model.W_V, model.W_O) @ model.W_U).eigenvalues
            (eig.sum(-1).real / eig.abs().sum(-1)).sum().item()

    tasks: dict[str, Callable[[], None]] = {
        "plain GPT forward": bench.plain_forward,
        "probe run, the config's probes": probe_run(bench, names, True),
        "probe run, + copying": probe_run(bench, names + ["copying"], True),
        "copying_matrices (device part)": device_part,
        "eigenvalue_positivity (host part)": host_part,
    }
    if transformer_lens:
        tasks["TransformerLens FactoredMatrix eigenvalues"] = theirs
    times = interleaved(tasks, args.rounds, device)
    med = print_medians(times, bench, device, args.rounds, details=f" vocab {bench.config.vocab_size}")
    added = [b - a for a, b in zip(times["probe run, the config's probes"], times["probe run, + copying"])]
    base = med["probe run, the config's probes"]
    delta = statistics.median(added)
    line = f"copying adds {delta * 1e3:.2f} ms to the probe run ({delta / base:.1%}; median of per-round differences)"
    if transformer_lens:
        ours = [a + b for a, b in zip(times["copying_matrices (device part)"],
                                      times["eigenvalue_positivity (host part)"])]
        speedup = [t / o for o, t in zip(ours, times["TransformerLens FactoredMatrix eigenvalues"])]
        line += f"; its two parts are {statistics.median(speedup):.1f}x faster than TransformerLens's route"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
