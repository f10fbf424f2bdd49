"""CUDA-graph replay of a probe run: one launch instead of thousands of kernel launches.

A probe step is the same computation every time: the same probe batches through the same
``HookedTransformer``, whose parameters are refreshed in place (`copy_weights`), with the same hooks
and the same probe reductions. Only the weights' values change. On a GPU the eager run is bound by
the host: on the fourth session's code the default model's probe step launched ~550 kernels (GPT-2
small: ~3,950) against 56 (252) for the plain forward, and on an H200 the host spent 140 ms per
GPT-2 probe step issuing work the device finished in 63 (``bench/profile_probe.py``); the probe run
is down to 170 operators (GPT-2: 778) since, by the meta-device count, still three times the plain
forward's. `ProbeGraphs` records the whole run once as
a ``torch.cuda.CUDAGraph`` and replays it afterwards, following PyTorch's recipe (CUDA semantics,
"CUDA Graphs"): an eager warm-up on a side stream, then capture on that stream.

* The first call for a key (model, parameter storage, staged input tensors, chunking, attention
  path) runs eagerly on the side stream (its results are that call's answer) and then captures the
  same run. Later calls replay it and return the graph's output tensors, which the next replay
  overwrites.
* Capture uses ``capture_error_mode="thread_local"``, so other threads of the process (a data
  loader's pin-memory thread, the TensorBoard writer) are unaffected. Nothing random runs inside, so
  the CUDA generator's state is unchanged by capture and replay. The capture runs with the device's
  default generator on a copy of its state (`_generator_state_copied`): before PyTorch's per-capture RNG
  state, a failed capture left the training's generator marked as capturing.
* If capture fails (a custom probe that synchronises, say) the key is marked and stays eager;
  `failure` says why, and the caller decides whether to warn.
* Memory: the graph keeps its private pool, about the eager run's peak activation memory (GPT-2
  small with the default batches: ``bench/probe_memory.py``), between probe steps. At most
  `MAX_GRAPHS` graphs are kept; the oldest is dropped first.

Opt-in (``LensCallback(cuda_graphs=True)``, ``ProbeRunner.run(..., cuda_graph=True)``): the replay
tests in ``tests/test_graphs.py`` need a GPU; they passed on an H200 (twenty-second session).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lens_callback.probes import attention

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from lens_callback.probes.base import BatchKind

MAX_GRAPHS = 2
"""Graphs kept per runner (e.g. the lean and TransformerLens attention paths of one model)."""

GraphKey = tuple


@dataclass
class _Captured:
    model: weakref.ref
    graph: torch.cuda.CUDAGraph
    outputs: dict[str, Tensor]
    keep: tuple[Tensor, ...] = ()  # tensors the recorded kernels read that only a bounded cache holds


@contextlib.contextmanager
def _generator_state_copied(device: torch.device) -> Iterator[None]:
    """The device's default CUDA generator on a copy of its state (same seed and offset) within the block;
    its own state object, untouched, is put back on exit, whatever happened inside.

    Before PyTorch's per-capture RNG state (pytorch/pytorch#176752, 2026; the wheels this project allows
    from 2.6 on mostly predate it), ``capture_begin`` registered the current device's default generator
    with every graph and flagged its state as capturing until ``capture_end`` had recorded the graph. A
    capture that fails (a probe that synchronises invalidates it, and ``capture_end`` raises before it
    clears the flag) left the flag set, and the training's next CUDA random op outside a capture (nanoGPT's
    dropout) raised "Offset increment outside graph capture encountered unexpectedly". The copy takes the
    flag and the graph's registration instead; with the per-capture state nothing is registered unless
    something random runs, and the copy is dropped unused."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    own = generator.graphsafe_get_state()  # shares the state object, which the training's ops advance
    generator.graphsafe_set_state(generator.clone_state())
    try:
        yield
    finally:
        generator.graphsafe_set_state(own)


class ProbeGraphs:
    """Captured probe runs of one `ProbeRunner`, keyed by what the recorded kernels depend on."""

    def __init__(self) -> None:
        self._graphs: OrderedDict[GraphKey, _Captured] = OrderedDict()
        self._eager: set[GraphKey] = set()  # keys whose capture failed
        self.failure: str | None = None

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drops every graph (and its memory pool) and forgets failed keys."""
        self._graphs.clear()
        self._eager.clear()
        self.failure = None

    @staticmethod
    def key(model: HookedTransformer, batches: Mapping[BatchKind, Tensor], max_batch_tokens: int | None,
            lean_attention: bool) -> GraphKey:
        """What a recorded run depends on besides tensor values: the model, where its parameters and
        the input batches live (and their shapes), the chunking and the attention path."""
        return (
            id(model),
            tuple((p.data_ptr(), p.dtype, tuple(p.shape)) for p in model.parameters()),
            tuple((name, t.data_ptr(), tuple(t.shape)) for name, t in batches.items()),
            max_batch_tokens,
            lean_attention,
            lean_attention and attention.FUSED_ATTENTION,  # which route a recorded lean run took
        )

    def run(
        self,
        model: HookedTransformer,
        batches: Mapping[BatchKind, Tensor],
        max_batch_tokens: int | None,
        lean_attention: bool,
        run_eager: Callable[[], dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Replays the recorded run for this key, or runs ``run_eager`` and records it."""
        key = self.key(model, batches, max_batch_tokens, lean_attention)
        captured = self._graphs.get(key)
        if captured is not None and captured.model() is model:
            self._graphs.move_to_end(key)
            captured.graph.replay()
            return captured.outputs
        self._drop_others(key)
        if key in self._eager:
            return run_eager()
        device = next(model.parameters()).device
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                results = run_eager()  # the warm-up is this call's answer
            current.wait_stream(side)
            for tensor in results.values():
                tensor.record_stream(current)  # made on the side stream, read on the current one
            try:
                graph = torch.cuda.CUDAGraph()
                # torch.cuda.graph's __exit__ skips restoring the stream when capture_end raises (an
                # invalidated capture): this outer context puts the caller's stream back regardless
                with _generator_state_copied(device), torch.cuda.stream(side), \
                        torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    outputs = run_eager()
            except Exception as err:  # noqa: BLE001 - any capture failure leaves the run eager
                self._eager.add(key)
                # capture_end's "previous error during capture" hides the cause it was raised over; a probe's own
                # handled exception further down the chain is not it
                root: BaseException = err
                while root.__context__ is not None and "during capture" in str(root):
                    root = root.__context__
                self.failure = f"{type(root).__name__}: {root}"
                torch.cuda.synchronize(device)
                return results
            # the causal masks the lean attention read live in an LRU cache (`attention._future_mask`): an
            # eviction would free memory the graph reads
            keep = tuple(attention._future_mask(t.shape[1], device) for t in batches.values())
        self._graphs[key] = _Captured(weakref.ref(model), graph, outputs, keep)
        self._graphs.move_to_end(key)
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return results

    def note_eager_run(self, model: HookedTransformer, batches: Mapping[BatchKind, Tensor],
                       max_batch_tokens: int | None, lean_attention: bool) -> None:
        """Called before an eager run of the same probes: see `_drop_others`."""
        if self._graphs:
            self._drop_others(self.key(model, batches, max_batch_tokens, lean_attention))

    def _drop_others(self, key: GraphKey) -> None:
        """Drops graphs recorded for another model, other inputs or other chunking.

        An eager run may replace tensors that probes cache between runs (e.g. the entropy probe's
        ``1 / log(q + 1)`` row for another sequence length); a graph recorded earlier would read
        the freed memory. Graphs that differ only in the attention path share those caches and stay.
        """
        for other in [k for k in self._graphs if k[:4] != key[:4]]:
            del self._graphs[other]
