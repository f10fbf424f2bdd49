"""The GPU code path of a probe run, measured on the ``meta`` device: operators and peak memory.

The meta device does no arithmetic, and the runner takes the GPU's branch there (one chunk per batch,
none of the CPU-only row blocks or buffers). `measure_gpu_path` counts the operators one probe run and
one plain forward dispatch (each at least one kernel launch on a GPU, whose eager probe step is bound
by launches) and the peak of the probe run's tensor storage (what the CUDA caching allocator counts
as allocated). On the fourth session's code they read 56 operators per plain forward of the default
model and 276 for GPT-2 small, where an H200 counted 56 and 252 kernels, and a GPT-2 probe-run peak
of 236.8 MiB, where the H200 measured 237.1 MiB on the first probe step. Used by
``bench/profile_probe.py --count-ops`` and ``bench/run.py``.

The counter also adds up each operator's arithmetic (``torch.utils.flop_counter``'s formulas: matrix
products and attention; elementwise work is not counted) and the bytes it reads and writes (its
tensor arguments and results; a broadcast argument counts its distinct elements once, an ``out=``
argument only as written, a gather's source only the elements it returns). From them,
`device_floor` is a lower bound on device time at a GPU's peak rates (`H200_FLOPS`,
`H200_BYTES_PER_S`): per operator the slower of its arithmetic and its memory traffic, summed,
with no launch gaps or cache reuse. It is a count, not a timing: on the fourth session's H200 the
plain GPT-2 forward took 39.7 ms where its floor reads 24.9 ms.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from lens_callback.convert.base import finite_flag
from lens_callback.convert.base import is_dense, same_layout
from lens_callback.convert import copy_weights
from lens_callback.probes import ProbeInputs, pack_attention_weights
from lens_callback.sinks import packed

if TYPE_CHECKING:
    from bench.run import Bench


def _decompose(mode: TorchDispatchMode, func: Any, args: tuple, kwargs: dict) -> Any:
    """``func``'s composite decomposition run under ``mode``, or ``NotImplemented`` if it has none.

    Outside inference mode a composite operator (``linear``, ``matmul``, ...) is decomposed before
    it reaches a dispatch mode, which sees the kernels (``addmm``, ``clone``, ``bmm``); under
    ``torch.inference_mode`` (the probe run's) the mode sees the composite call itself and the
    kernels it runs stay hidden. Decomposing here counts the same kernels either way.
    """
    if not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
        return NotImplemented
    with mode:
        return func.decompose(*args, **kwargs)


H200_FLOPS = 67e12
"""An H200 SXM's peak float32 rate without tensor cores (the probe run's and the plain forward's
matrix products are float32; PyTorch leaves TF32 off for them by default), FLOP/s."""
H200_BYTES_PER_S = 4.8e12
"""An H200 SXM's peak HBM3e bandwidth, bytes/s."""


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s distinct elements: a broadcast (stride-0) dimension counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


_GATHERS = {"gather", "index_select", "index", "embedding"}
"""Operators that read from their first argument only the elements they return."""


def _traffic(name: str, args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes an operator reads and writes: its tensor arguments (read; ``out=`` excluded) and its
    results (written). An in-place operator's tensor counts twice: read, then written. A gather
    (`_GATHERS`) reads as many bytes of its source as it writes."""
    inputs = [t for t in pytree.tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"}))
              if isinstance(t, torch.Tensor)]
    outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    written = sum(_distinct_bytes(t) for t in outputs)
    if name in _GATHERS and args and isinstance(args[0], torch.Tensor):
        return written + sum(_distinct_bytes(t) for t in inputs if t is not args[0]) + written
    return sum(_distinct_bytes(t) for t in inputs) + written


class _OpCounter(TorchDispatchMode):
    """Counts the operators dispatched inside the block, views and metadata-only calls excluded,
    with their arithmetic (``flops``), memory traffic (``bytes``) and `device_floor` (seconds).

    ``F.scaled_dot_product_attention`` counts as one: on the meta device it runs PyTorch's math
    decomposition (about ten operators), on a GPU one fused kernel (its FLOPs by
    ``sdpa_flop_count``, its traffic the query, key, value and output).
    """

    def __init__(self, peak_flops: float = H200_FLOPS, peak_bytes_per_s: float = H200_BYTES_PER_S) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.flops = 0
        self.bytes = 0
        self.device_floor = 0.0  # seconds: per operator max(flops / peak, bytes / bandwidth), summed
        self.floor_by_op: Counter[str] = Counter()  # the same, per operator name
        self.peak_flops, self.peak_bytes_per_s = peak_flops, peak_bytes_per_s
        self.fused = 0  # > 0 inside a fused operator

    def add(self, name: str, launches: int, flops: int, nbytes: int) -> None:
        """Records one operator."""
        self.counts[name] += launches
        self.flops += flops
        self.bytes += nbytes
        floor = max(flops / self.peak_flops, nbytes / self.peak_bytes_per_s)
        self.device_floor += floor
        self.floor_by_op[name] += floor

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.fused:
            return func(*args, **kwargs)
        out = _decompose(self, func, args, kwargs)
        if out is not NotImplemented:
            return out
        out = func(*args, **kwargs)
        if not func.is_view and func not in _NOT_KERNELS:
            formula = flop_registry.get(func.overloadpacket)
            flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
            name = str(func.overloadpacket).removeprefix("aten.")
            self.add(name, _launches(func, args), flops, _traffic(name, args, kwargs, out))
        return out


def _launches(func: Any, args: tuple) -> int:
    """1, or for a multi-tensor (``_foreach_*``) operator off its fast route, one per tensor.

    CUDA's ``_foreach_*`` kernels (``can_use_fast_route``) take every tensor of the lists in a few
    launches only when all are dense and of one dtype and, for two lists (``_foreach_copy_``), each
    pair has the same sizes and strides; otherwise the operator runs once per tensor. Counted as 1
    on the fast route (a launch per chunk of tensors, in fact).
    """
    name = str(func.overloadpacket)
    lists = [a for a in args[:2] if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not name.startswith("aten._foreach_") or not lists:
        return 1
    first = lists[0]
    fast = all(is_dense(t) and t.dtype == first[0].dtype for t in first)
    if len(lists) == 2:
        fast = fast and all(same_layout(a, b) for a, b in zip(first, lists[1]))
    return 1 if fast else len(first)


_NOT_KERNELS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.detach.default,
                torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storage created inside the block and alive at once.

    On the meta device this is what a GPU's caching allocator would count as allocated by the block
    (before its rounding to 512-byte blocks): the peak memory of an eager run, without a GPU. Inside
    ``F.scaled_dot_product_attention`` (marked by `_FusedAttention`) only the output counts: the meta
    device runs the math decomposition, which builds the ``[batch, head, query, key]`` weights a
    GPU's fused kernel never holds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.fused = 0  # > 0 inside a fused operator

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.fused:
            return func(*args, **(kwargs or {}))
        out = _decompose(self, func, args, kwargs or {})  # its temporaries count too
        if out is not NotImplemented:
            return out
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # views, in-place and out= results live in storage that existed before
            inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            self.track(t for t in pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs)
        return out

    def track(self, tensors: Any) -> None:
        """Counts the storage of ``tensors`` (new ones) and updates the peak."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))


class _FusedAttention(TorchFunctionMode):
    """Marks calls of ``F.scaled_dot_product_attention`` for `_OpCounter` (counted as one operator)
    or `_LiveBytes` (only its output counts)."""

    def __init__(self, counter: _OpCounter | _LiveBytes) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.counter.fused += 1
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.counter.fused -= 1
        if isinstance(self.counter, _LiveBytes):
            self.counter.track([out])
            return out
        q, k, v = args[:3]
        flops = sdpa_flop_count(q.shape, k.shape, v.shape)
        name = "scaled_dot_product_attention"
        self.counter.add(name, 1, flops, _traffic(name, (q, k, v), {}, out))
        return out


@dataclass
class GpuPath:
    """Operators and peak memory of a probe step's parts on the GPU code path (meta device)."""

    probe_ops: int  # one probe run
    plain_ops: int  # one plain GPT forward of the probe batches
    peak_bytes: int  # the probe run's own tensors alive at once, at most
    probe_flops: int  # arithmetic of one probe run (matrix products and attention)
    plain_flops: int
    probe_traffic: int  # bytes one probe run's operators read and write
    plain_traffic: int
    probe_floor: float  # seconds: device-time lower bound at an H200's peak rates (`_OpCounter`)
    plain_floor: float
    refresh_ops: int  # converting and copying the weights
    finite_ops: int  # the finite-weights check (its flag travels with the results)
    transfer_ops: int  # moving the results to the host
    probe_counts: Counter[str]
    plain_counts: Counter[str]
    probe_floor_by_op: Counter[str]  # seconds of `probe_floor` per operator name


def measure_gpu_path(bench: Bench) -> GpuPath:
    """Moves ``bench``'s model and the callback's ``HookedTransformer`` to the meta device (for good)
    and measures one probe step's parts there."""
    meta = torch.device("meta")
    # TransformerLens moves the residual to its block's device, "meta:0" here: a copy from "meta",
    # where on a GPU the residual is on "cuda:0" already (the package's attribute of that name is
    # the class, hence sys.modules)
    module = sys.modules["transformer_lens.HookedTransformer"]
    placement = module.get_device_for_block_index
    module.get_device_for_block_index = lambda *args, **kwargs: meta
    try:
        return _measure(bench, meta)
    finally:
        module.get_device_for_block_index = placement


def _measure(bench: Bench, meta: torch.device) -> GpuPath:
    cb = bench.cb
    hooked, model = cb._hooked.to(meta), bench.model.to(meta)
    pack_attention_weights(hooked)  # as the callback does on its device: moving the model unpacked it
    inputs = ProbeInputs(**{name: None if t is None else t.to(meta) for name, t in vars(cb._inputs).items()})
    batches = [b.to(meta) for b in bench.batches]
    cb.runner.run(hooked, inputs, cb.max_batch_tokens)  # once: cached index tensors and the like
    with _OpCounter() as probe, _FusedAttention(probe):
        cb.runner.run(hooked, inputs, cb.max_batch_tokens)
    with _OpCounter() as plain, _FusedAttention(plain), torch.no_grad():
        for b in batches:
            model(b, all_positions=True)
    with _OpCounter() as refresh:
        copy_weights(hooked, cb._converter.convert_weights(cb._model_config, model.state_dict()))
    params = list(hooked.parameters())
    with _OpCounter() as finite:
        finite_flag(params, fused=True)  # the check off the CPU; its flag is read with the results
    with _LiveBytes() as memory, _FusedAttention(memory):
        results = cb.runner.run(hooked, inputs, cb.max_batch_tokens)
    with _OpCounter() as transfer:
        packed(results)  # to_host, before its one copy
    total = lambda counter: sum(counter.counts.values())  # noqa: E731
    return GpuPath(total(probe), total(plain), memory.peak, probe.flops, plain.flops, probe.bytes, plain.bytes,
                   probe.device_floor, plain.device_floor, total(refresh), total(finite), total(transfer) + 1,
                   probe.counts, plain.counts, probe.floor_by_op)
