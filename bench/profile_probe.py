"""Where a probe step's time goes: phase medians and the profiler's top operators (issue: performance).

For a config's model (as in ``bench/run.py``) it times, interleaved over rounds and synchronised on a GPU,
the plain ``GPT`` forward of the probe batches and each phase of ``LensCallback.probe_step``: weight
conversion + in-place copy, the probes (runner + the one host transfer), the finite-weights check and
logging. Then ``torch.profiler`` records a few probe steps and a few plain forwards and prints, per call,
the number of kernels launched (GPU) and the operators that cost most host and device time.

``--count-ops`` instead runs on the ``meta`` device (shapes only, no arithmetic), which takes the code
path of a GPU (one chunk per batch, no CPU-only row blocks or workspace), and prints the operators one
probe run and one plain forward dispatch, and the probe run's peak tensor memory. On a GPU each
operator is at least one kernel launch, and the eager probe step is bound by launches; the peak is
what the caching allocator counts as allocated. So both are GPU figures checked without a GPU: for
the code of the fourth session they read 385 and 56 operators for the default model (an H200 counted
549 kernels per probe step, refresh and logging included, and 56 per plain forward) and a peak of
236.8 MiB for GPT-2 small (the H200: 237.1 MiB on the first probe step).

Usage: ``python bench/profile_probe.py [--config configs/default.yaml] [--model-config JSON]
[--device cpu|cuda] [--rounds 10] [--top 20] [--count-ops]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.profiler import ProfilerActivity, profile
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from bench.run import Bench, _timed, add_model_arguments, make_bench, with_setting  # noqa: E402
from lens_callback.probes import ProbeInputs  # noqa: E402
from lens_callback.convert import copy_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--top", type=int, default=20, help="operators listed per table")
    parser.add_argument("--count-ops", action="store_true", help="count operators on the meta device, no timing")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)

    bench = make_bench(args, device)
    if args.count_ops:
        return count_ops(bench, args.top)
    config, cb, trainer, batches = bench.config, bench.cb, bench.trainer, bench.batches
    state = bench.model.state_dict()
    measured: dict[str, Any] = {}

    plain = bench.plain_forward

    def refresh() -> None:
        copy_weights(cb._hooked, cb._converter.convert_weights(cb._model_config, state))

    def probes() -> None:
        measured["m"] = cb._measure(1)

    probes_graphed = with_setting(cb, "cuda_graphs", True, lambda: cb._measure(1))

    def finite() -> None:
        cb._weights_finite()

    def log() -> None:
        cb._log(trainer, 1, dict(measured["m"].scalars), measured["m"], [])

    counter = iter(range(1, 10**9))

    def probe_step() -> None:
        cb.probe_step(trainer, next(counter), state)

    phases: dict[str, Callable[[], None]] = {"plain GPT forward": plain, "probe step (whole)": probe_step,
                                             "  refresh (convert + copy_)": refresh, "  probes + host transfer": probes,
                                             "  finite-weights check": finite, "  logging": log}
    if device.type == "cuda":
        phases["  probes, CUDA-graph replay"] = probes_graphed
    for fn in phases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(args.rounds):
        for name, fn in phases.items():
            times[name].append(_timed(fn, device))
    plain_ms = statistics.median(times["plain GPT forward"]) * 1e3
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}; model {config.n_layer}L {config.n_head}H {config.n_embd}d; probe batches "
          + ", ".join(str(tuple(b.shape)) for b in batches) + f"; rounds {args.rounds}")
    print(f"| {'phase':<30} | {'median ms':>9} | {'x plain':>7} |")
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        print(f"| {name:<30} | {ms:>9.2f} | {ms / plain_ms:>6.2f}x |")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for label, fn, calls in (("probe step", probe_step, 3), ("plain GPT forward", plain, 3)):
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


class _OpCounter(TorchDispatchMode):
    """Counts the operators dispatched inside the block, views and metadata-only calls excluded.

    ``F.scaled_dot_product_attention`` counts as one: on the meta device it runs PyTorch's math
    decomposition (about ten operators), on a GPU one fused kernel.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.fused = 0  # > 0 inside a fused operator

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.fused:
            return func(*args, **kwargs)
        if not func.is_view and func not in _NOT_KERNELS:
            self.counts[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **kwargs)


_NOT_KERNELS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.detach.default,
                torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storage created inside the block and alive at once.

    On the meta device this is what a GPU's caching allocator would count as allocated by the block
    (before its rounding to 512-byte blocks): the peak memory of an eager run, without a GPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # views, in-place and out= results live in storage that existed before
            inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                    storage = t.untyped_storage()
                    self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


class _FusedAttention(TorchFunctionMode):
    """Marks calls of ``F.scaled_dot_product_attention`` for `_OpCounter`, counted as one operator."""

    def __init__(self, counter: _OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.counter.counts["scaled_dot_product_attention"] += 1
        self.counter.fused += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.fused -= 1


def count_ops(bench: Bench, top: int) -> int:
    """Prints the operators and peak memory of one probe run, and the plain forward's operators,
    on the meta device."""
    meta = torch.device("meta")
    # TransformerLens moves the residual to its block's device, "meta:0" here: a copy from "meta",
    # where on a GPU the residual is on "cuda:0" already (the package's attribute of that name is
    # the class, hence sys.modules)
    module = sys.modules["transformer_lens.HookedTransformer"]
    placement = module.get_device_for_block_index
    module.get_device_for_block_index = lambda *args, **kwargs: meta
    try:
        _count_ops(bench, top, meta)
    finally:
        module.get_device_for_block_index = placement
    return 0


def _count_ops(bench: Bench, top: int, meta: torch.device) -> None:
    cb = bench.cb
    hooked, model = cb._hooked.to(meta), bench.model.to(meta)
    inputs = ProbeInputs(**{name: None if t is None else t.to(meta) for name, t in vars(cb._inputs).items()})
    batches = [b.to(meta) for b in bench.batches]
    cb.runner.run(hooked, inputs, cb.max_batch_tokens)  # once: cached index tensors and the like
    with _OpCounter() as probe, _FusedAttention(probe):
        cb.runner.run(hooked, inputs, cb.max_batch_tokens)
    with _OpCounter() as plain, _FusedAttention(plain), torch.no_grad():
        for b in batches:
            model(b, all_positions=True)
    state = model.state_dict()
    with _OpCounter() as refresh:
        copy_weights(hooked, cb._converter.convert_weights(cb._model_config, state))
    params = list(hooked.parameters())
    with _OpCounter() as finite:
        torch.stack(torch._foreach_norm(params, 1)).isfinite().all()  # weights_finite off the CPU, before its sync
    with _LiveBytes() as memory:
        results = cb.runner.run(hooked, inputs, cb.max_batch_tokens)
    with _OpCounter() as transfer:
        torch.cat([v.detach().float().reshape(-1) for v in results.values()])  # to_host, before its one copy
    config = bench.config
    print(f"operators on the meta device (the GPU code path); model {config.n_layer}L {config.n_head}H "
          f"{config.n_embd}d vocab {config.vocab_size}; probe batches " + ", ".join(str(tuple(b.shape)) for b in batches))
    print(f"probe run ({', '.join(p.name for p in cb.runner.probes)}): {sum(probe.counts.values())}; "
          f"plain GPT forward: {sum(plain.counts.values())}")
    print(f"peak memory of the probe run's own tensors (meta device, the GPU path): {memory.peak / 2**20:.1f} MiB")
    print(f"rest of a probe step: weight refresh {sum(refresh.counts.values())}, finite-weights check "
          f"{sum(finite.counts.values())}, host transfer {sum(transfer.counts.values()) + 1}")
    print("most frequent in the probe run: " + ", ".join(f"{name} {n}" for name, n in probe.counts.most_common(top)))
    print("most frequent in the plain forward: " + ", ".join(f"{name} {n}" for name, n in plain.counts.most_common(top)))


if __name__ == "__main__":
    raise SystemExit(main())
