"""Where a probe step's time goes: phase medians and the profiler's top operators (issue: performance).

For a config's model (as in ``bench/run.py``) it times, interleaved over rounds and synchronised on a GPU,
the plain ``GPT`` forward of the probe batches and each phase of ``LensCallback.probe_step``: weight
conversion + in-place copy, the probes (runner + the one host transfer), the finite-weights check (its
kernels; its flag travels in that transfer) and logging. Then ``torch.profiler`` records a few probe steps and a few plain forwards and prints, per call,
the number of kernels launched (GPU) and the operators that cost most host and device time.

``--per-probe`` instead prints what each enabled probe costs inside the probe run (``probe_costs``):
its marginal cost (all probes against all but it, paired within each round, so the machine's drift
cancels) and its cost alone, next to the plain forward and the lean forward without probes (fused: no
pattern built, as the probe run builds none that no probe reads; and with every pattern built). What
all probes cost over the fused lean forward, less the sum of the marginals, is shared by several
probes: the repeated batch's patterns (three probes read them; the text batch's are in the attention
entropy's marginal, since without it that batch runs fused), hooks, the loss decoding, the host
transfer. It first makes glibc's ``malloc`` keep freed memory (`bench.allocator.keep_freed_memory`):
otherwise whichever variant follows one that freed big blocks pays the page faults, which swamped
millisecond differences (sums of marginals were off by 18 ms in a 10 ms total before that change).

``--count-ops`` instead prints the operators and peak memory of the GPU code path, measured on the
``meta`` device without a GPU (``bench/gpu_path.py``, calibrated against an H200 there), with the
arithmetic and memory traffic of the probe run and the plain forward and the device-time floor they
give at an H200's peak rates (a lower bound from counts, not a timing), split by operator.

Usage: ``python bench/profile_probe.py [--config configs/default.yaml] [--model-config JSON]
[--device cpu|cuda] [--rounds 10] [--top 20] [--per-probe] [--count-ops] [--keep-freed-memory]``.
``--keep-freed-memory`` makes glibc keep freed memory for the phase timings too (`--per-probe` always does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch.profiler import ProfilerActivity, profile

if TYPE_CHECKING:
    import lightning as L
    from torch import Tensor

    from lens_callback import LensCallback

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from bench.allocator import keep_freed_memory  # noqa: E402
from bench.gpu_path import measure_gpu_path  # noqa: E402
from bench.run import Bench, add_model_arguments, interleaved, make_bench, with_setting  # noqa: E402
from lens_callback.measure import build_runner, measure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--top", type=int, default=20, help="operators listed per table")
    parser.add_argument("--per-probe", action="store_true", help="each enabled probe's marginal and standalone cost")
    parser.add_argument("--count-ops", action="store_true", help="count operators on the meta device, no timing")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (bench/allocator.py): no page faults from the process's history")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)

    bench = make_bench(args, device)
    if args.count_ops:
        return count_ops(bench, args.top)
    if args.keep_freed_memory and not args.per_probe and not keep_freed_memory():
        print("(glibc not found: page faults stay in the timings)")
    if args.per_probe:
        if not keep_freed_memory():
            print("(glibc not found: page faults stay in the timings)")
        return print_probe_costs(bench, args.rounds)
    config, cb, trainer, batches = bench.config, bench.cb, bench.trainer, bench.batches
    phases = {"plain GPT forward": bench.plain_forward, **probe_step_phases(cb, trainer, bench.model.state_dict())}
    if device.type == "cuda":
        phases["  probes, CUDA-graph replay"] = with_setting(cb, "cuda_graphs", True,
                                                             lambda: cb._measure(1, check_weights=False))
    times = interleaved(phases, args.rounds, device)
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}; model {config.n_layer}L {config.n_head}H {config.n_embd}d; probe batches "
          + ", ".join(str(tuple(b.shape)) for b in batches) + f"; rounds {args.rounds}")
    print_phases({name: statistics.median(values) for name, values in times.items()})
    probe_step = phases["probe step (whole)"]
    plain = bench.plain_forward

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiled = (("probe step", probe_step, 3), ("probe run + host transfer (no refresh, check or logging)",
                                                 phases["  probes + host transfer"], 3), ("plain GPT forward", plain, 3))
    for label, fn, calls in profiled:
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        events = prof.key_averages()
        print(f"\n== {label} ({calls} calls)")
        if device.type == "cuda":
            kernels = sum(e.count for e in prof.events() if e.device_type.name == "CUDA") / calls
            launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
            syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
            print(f"device kernels per call: {kernels:.0f}; launch API calls: {launches / calls:.0f}; "
                  f"sync/memcpy API calls: {syncs / calls:.1f}")
            print(events.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=48))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    return 0


def probe_step_phases(cb: LensCallback, trainer: L.Trainer, state: Mapping[str, Tensor]) -> dict[str, Callable[[], None]]:
    """``cb``'s whole probe step on ``state`` and each of its phases as the step runs them: weight
    conversion + in-place copy, the probes and the one host transfer, the finite-weights check
    (its kernels; its flag travels in that transfer) and logging (of the last probes' results)."""
    measured = {"m": cb._measure(1, check_weights=False)}
    steps = iter(range(1, 10**9))

    def probes() -> None:
        measured["m"] = cb._measure(1, check_weights=False)

    return {
        "probe step (whole)": lambda: cb.probe_step(trainer, next(steps), state),
        "  refresh (convert + copy_)": lambda: cb._copier(cb._converter.convert_weights(cb._model_config, state)),
        "  probes + host transfer": probes,
        "  finite-weights check": cb._weights_finite_flag,  # `interleaved` synchronises a GPU after it
        "  logging": lambda: cb._log(trainer, 1, dict(measured["m"].scalars), measured["m"], []),
    }


def print_phases(medians: Mapping[str, float]) -> None:
    """A table of median seconds in ms and as multiples of ``medians["plain GPT forward"]``."""
    plain = medians["plain GPT forward"]
    print(f"| {'phase':<30} | {'median ms':>9} | {'x plain':>7} |")
    for name, value in medians.items():
        print(f"| {name:<30} | {value * 1e3:>9.2f} | {value / plain:>6.2f}x |")


@dataclass
class ProbeCost:
    """One probe's cost in seconds (medians over rounds)."""

    name: str
    batch: str  # the probe batch kind it reads ("weights" for a probe that reads none)
    alone: float  # a probe run with only this probe (its batch kind's forward included)
    marginal: float  # all probes minus all but this one, paired per round (0 if it is the only one)


def probe_costs(bench: Bench, rounds: int) -> tuple[dict[str, float], list[ProbeCost]]:
    """Times, interleaved over ``rounds``, the callback's probe run with all its probes, without each
    one, and with each one alone, plus the plain forward and the lean forward without probes.

    Every variant is a fresh `ProbeRunner` over the callback's probes and options, run as the
    callback runs its own (`measure`: runner + one host transfer); no weight refresh or logging.

    Returns:
        Medians of ``"plain GPT forward"``, ``"lean forward, no probes"`` (fused: no pattern built),
        ``"lean forward, every pattern"`` and ``"all probes"``, and a `ProbeCost` per enabled probe.
    """
    cb = bench.cb
    device = next(cb._hooked.parameters()).device

    def run(probes: list[str]) -> Callable[[], None]:
        """A probe run over a fresh runner for ``probes``, each with the callback's options for it."""
        runner = build_runner(probes, {k: v for k, v in cb.probe_options.items() if k in probes})
        return lambda: measure(cb._hooked, runner, cb._inputs, max_batch_tokens=cb.max_batch_tokens,
                               per_head_scalars=cb.per_head_scalars, lean_attention=cb._lean)

    names = list(cb.probes)
    # the floor of the marginals' identity is the fused forward: a variant without the attention entropy
    # runs the text batch fused, so the text patterns' cost is in that probe's marginal (bench review)
    tasks: dict[str, Callable[[], None]] = {"plain GPT forward": bench.plain_forward,
                                            "lean forward, no probes": bench.lean_forward,
                                            "lean forward, every pattern": bench.patterns_floor,
                                            "all probes": run(names)}
    for name in names:
        tasks[f"alone {name}"] = run([name])
        rest = [n for n in names if n != name]
        if rest:
            tasks[f"without {name}"] = run(rest)
    times = interleaved(tasks, rounds, device)  # its warm-up makes the workspaces and scratch buffers
    med = {key: statistics.median(values) for key, values in times.items()}
    costs = []
    for probe in cb.runner.probes:
        without = times.get(f"without {probe.name}")
        marginal = 0.0 if without is None else statistics.median(a - b for a, b in zip(times["all probes"], without))
        batch = probe.batch if probe.reads_batch else "weights"  # a weights-only probe reads none
        costs.append(ProbeCost(probe.name, batch, med[f"alone {probe.name}"], marginal))
    keys = ("plain GPT forward", "lean forward, no probes", "lean forward, every pattern", "all probes")
    return {key: med[key] for key in keys}, costs


def print_probe_costs(bench: Bench, rounds: int) -> int:
    """Prints `probe_costs` as a table, in ms and as multiples of the plain forward."""
    totals, costs = probe_costs(bench, rounds)
    plain = totals["plain GPT forward"]
    config = bench.config
    print(f"per-probe cost; model {config.n_layer}L {config.n_head}H {config.n_embd}d; probe batches "
          + ", ".join(str(tuple(b.shape)) for b in bench.batches) + f"; rounds {rounds}")
    print(f"| {'probe':<26} | {'batch':<8} | {'alone ms':>8} | {'marginal ms':>11} | {'marginal x plain':>16} |")
    for key, value in totals.items():
        print(f"| {key:<26} | {'':<8} | {value * 1e3:>8.2f} | {'':>11} | {value / plain:>15.2f}x |")
    for cost in costs:
        print(f"| {cost.name:<26} | {cost.batch:<8} | {cost.alone * 1e3:>8.2f} | {cost.marginal * 1e3:>11.2f} | "
              f"{cost.marginal / plain:>15.2f}x |")
    shared = totals["all probes"] - totals["lean forward, no probes"] - sum(c.marginal for c in costs)
    print(f"all probes - lean forward - sum of marginals = {shared * 1e3:.2f} ms (shared by several probes: the "
          "repeated batch's patterns, hooks, the loss decoding, the host transfer; noise)")
    return 0


def count_ops(bench: Bench, top: int) -> int:
    """Prints `gpu_path.measure_gpu_path`'s figures: operators and peak memory on the meta device."""
    path = measure_gpu_path(bench)
    config = bench.config
    print(f"operators on the meta device (the GPU code path); model {config.n_layer}L {config.n_head}H "
          f"{config.n_embd}d vocab {config.vocab_size}; probe batches " + ", ".join(str(tuple(b.shape)) for b in bench.batches))
    print(f"probe run ({', '.join(p.name for p in bench.cb.runner.probes)}): {path.probe_ops}; "
          f"plain GPT forward: {path.plain_ops}")
    print(f"peak memory of the probe run's own tensors (meta device, the GPU path): {path.peak_bytes / 2**20:.1f} MiB")
    print(f"arithmetic: probe run {path.probe_flops / 1e9:,.1f} GFLOP, plain GPT forward {path.plain_flops / 1e9:,.1f} "
          f"({path.probe_flops / path.plain_flops:.2f}x); bytes read and written: {path.probe_traffic / 1e9:,.2f} GB, "
          f"{path.plain_traffic / 1e9:,.2f} GB ({path.probe_traffic / path.plain_traffic:.2f}x)")
    print(f"device-time floor at an H200's peak rates (per operator the slower of arithmetic and memory, no launch "
          f"gaps; not a timing): probe run {path.probe_floor * 1e3:.2f} ms, plain GPT forward "
          f"{path.plain_floor * 1e3:.2f} ms ({path.probe_floor / path.plain_floor:.2f}x)")
    print("  of the probe run's floor, ms: " + ", ".join(
        f"{n} {t * 1e3:.2f}" for n, t in path.probe_floor_by_op.most_common(top)))
    print(f"rest of a probe step: weight refresh {path.refresh_ops}, finite-weights check {path.finite_ops}, "
          f"host transfer {path.transfer_ops}")
    print("most frequent in the probe run: " + ", ".join(f"{n} {c}" for n, c in path.probe_counts.most_common(top)))
    print("most frequent in the plain forward: " + ", ".join(f"{n} {c}" for n, c in path.plain_counts.most_common(top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
