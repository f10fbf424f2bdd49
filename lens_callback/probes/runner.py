"""Run a set of probes with one shared forward per probe batch.

For each batch kind some enabled probe consumes (``"repeated"``, ``"text"``) the runner does one
forward pass, in chunks of whole sequences, with TransformerLens forward hooks on only the hook
points the probes asked for; each hook hands its activation to every probe that asked for it and
returns nothing, so the activation is freed as soon as the model is done with it. The model always
runs with ``return_type=None``: if a probe needs the per-token loss, the runner keeps the last
block's output at the union of the loss probes' positions (`Probe.loss_positions`; every position
if one of them names none) and decodes those rows with the model's own head (`final_logits`) in
blocks of `logit_block_rows` rows (`LOGIT_BLOCK_ELEMENTS` logits), so no ``[batch, T, d_vocab]`` tensor is built and
the unembedding is not copied (TransformerLens's ``Unembed.forward`` copies ``W_U.T`` per call:
154 MB for GPT-2).

Chunks hold at most ``max_batch_tokens`` tokens if that is given; otherwise as many sequences as
keep one layer's attention pattern (``rows * n_heads * T * T`` elements) within
`PATTERN_CHUNK_BYTES` for the model's device, and at least one: on CPU, chunks of at most 16 MiB of
pattern where one sequence fits (GPT-2 small's 1,024-token window is 48 MiB alone), whose scores
and hidden layers are written into reused buffers instead of being page-faulted in afresh
(measured in ``bench/run.py``); everywhere the budget, or one sequence above it, bounds the probe
step's peak memory.

Attention runs through `lens_callback.probes.attention.lean_attention` (TransformerLens's numbers,
fewer passes over memory) unless ``lean_attention=False``; on CPU each chunk's scores and pattern
are written into the runner's `AttentionWorkspace`, reused buffers per chunk shape (the scores, the
MLP hidden layer, the query/key/value layouts) kept between runs until `ProbeRunner.release` (the
callback's at the end of a fit and at each attach) and shared by the layers:
19.5 MiB for the default model's probe batches, 76.5 MiB for GPT-2 small's shape at its config's
batches. So probes must not keep an activation past their hook call.

The run happens under ``torch.inference_mode()`` (no autograd bookkeeping: no version counters or
view tracking per operator, 2 of the default model's 40 ms CPU probe run, ``bench/run.py``) and
with every submodule in eval mode; the grad mode and each submodule's ``training`` flag are
restored afterwards. So the activations probes see, the tensors they create and the results are
inference tensors: read them, or ``clone()`` outside the run what must be changed in place or take
part in autograd (`run_probe`, behind the standalone probe functions, returns clones). Results stay
on the model's device: the caller moves them to the host in one transfer.

Hook mechanics (``HookPoint.add_hook`` at a fresh context level, hooks called in registration order)
are TransformerLens's; `temporary_hooks` removes only what it added.
"""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import functools
import math
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
try:
    from transformer_lens.utilities import apply_softcap
except ImportError:  # transformer-lens before 3.6 applies the cap inline in HookedTransformer.forward

    def apply_softcap(x: Tensor, cap: float | None) -> Tensor:
        """Gemma's ``cap * tanh(x / cap)`` for a positive ``cap``, else ``x`` (TransformerLens's rule)."""
        return cap * torch.tanh(x / cap) if cap is not None and cap > 0 else x

from lens_callback.probes.attention import AttentionWorkspace, has_hooks
from lens_callback.probes.attention import lean_attention as lean_attention_context
from lens_callback.probes.base import BATCH_KINDS, MAIN_KEY, BatchKind, Probe, error_text
from lens_callback.probes.graphs import ProbeGraphs
from lens_callback.probes.inputs import ProbeInputs, id_outside_vocab

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.hook_points import HookPoint

HookFn = Callable[..., None]

PATTERN_CHUNK_BYTES: dict[str, int] = {"cpu": 16 << 20}
"""Automatic chunk budget per device type: bytes of one layer's attention pattern per chunk. On CPU
16 MiB: every forward chunk costs its own Python and hook calls (about 1 ms for the default model),
and the default model's text batch (8 MiB of pattern per layer) runs in one chunk instead of two;
measured side by side in one process (twelfth session, 2-core VM), its probe step took 1.0-1.8 ms
less than with 4 MiB, the 10.8 M shakespeare-char model's (1.5 MiB per text row) 30-47 ms less
(670 instead of 700 ms). Smaller budgets were slower still (1 MiB: +14 ms for the default model)."""
DEFAULT_PATTERN_CHUNK_BYTES = 256 << 20
"""The budget for device types not in `PATTERN_CHUNK_BYTES` (CUDA, MPS, ...)."""
WORKSPACE_DEVICES = frozenset({"cpu"})
"""Device types where a probe run writes its attention scores, patterns and MLP hidden layers into
the runner's reused `AttentionWorkspace`: on CPU a fresh multi-MB tensor per layer costs page faults;
a GPU's caching allocator reuses memory by itself."""
LOGIT_BLOCK_ELEMENTS: dict[str, int] = {"cpu": 1 << 22}
"""Logits decoded at once (rows * d_vocab) per device type: on CPU 16 MB of float32, 83 rows of
GPT-2's vocabulary."""
DEFAULT_LOGIT_BLOCK_ELEMENTS = 1 << 25
"""The block for device types not in `LOGIT_BLOCK_ELEMENTS`: 128 MB of float32, half the pattern
budget. A GPU's eager probe step is bound by kernel launches, and each block costs ~20 of them: with
the CPU block, GPT-2 small's loss and logit-lens decoding took 73 blocks and a probe run 3,063
operators; with this one, 11 blocks and 1,862 operators (counted on the meta device, which takes the
GPU code path: ``bench/profile_probe.py --count-ops``). One block is alive at a time, and the
decoding comes after the forward's activations are freed: GPT-2 small's probe run peaks at 231.8
MiB there (tensor storage on the meta device; the code before this change: 236.8, and an H200
measured 237.1 MiB for its first probe step)."""


def logit_block_rows(device: torch.device, row_elements: int) -> int:
    """Rows decoded per block on ``device`` when one row holds ``row_elements`` logits (at least 1)."""
    budget = LOGIT_BLOCK_ELEMENTS.get(device.type, DEFAULT_LOGIT_BLOCK_ELEMENTS)
    return max(1, budget // max(1, row_elements))


def rows_per_chunk(
    cfg: HookedTransformerConfig,
    n_rows: int,
    seq_len: int,
    device: torch.device,
    max_batch_tokens: int | None = None,
) -> int:
    """Sequences per forward chunk: ``max_batch_tokens // seq_len``, or the pattern budget's share.

    Args:
        cfg: The model's config (``n_heads`` and ``dtype`` size the pattern).
        n_rows: Sequences in the batch (the result never exceeds it).
        seq_len: ``T``.
        device: Where the forward runs (picks the budget in `PATTERN_CHUNK_BYTES`).
        max_batch_tokens: An explicit token limit, which wins over the budget.
    """
    if max_batch_tokens is not None:
        return max(1, min(n_rows, max_batch_tokens // seq_len))
    budget = PATTERN_CHUNK_BYTES.get(device.type, DEFAULT_PATTERN_CHUNK_BYTES)
    row_bytes = cfg.n_heads * seq_len * seq_len * torch.finfo(cfg.dtype).bits // 8
    return max(1, min(n_rows, budget // max(1, row_bytes)))


class ProbeRunner:
    """Feeds probe batches through a model once and collects every probe's results.

    Args:
        probes: The enabled probes; their names must be unique.

    Raises:
        TypeError: If an element is not a `Probe`.
        ValueError: If two probes share a name.

    Example::

        runner = ProbeRunner([make_probe("induction"), make_probe("logit_lens", max_positions=32)])
        runner.validate(model.cfg, repeat_length=64, text_len=128)
        results = runner.run(model, inputs)  # {"induction": [n_layers, n_heads], "logit_lens/kl": ...}
    """

    def __init__(self, probes: Sequence[Probe]) -> None:
        seen: set[str] = set()
        for probe in probes:
            if not isinstance(probe, Probe):
                raise TypeError(f"ProbeRunner takes Probe instances, got {probe!r}")
            if probe.name in seen:
                raise ValueError(f"probe names must be unique, got name={probe.name!r} twice")
            seen.add(probe.name)
        self.probes: tuple[Probe, ...] = tuple(probes)
        self.workspace = AttentionWorkspace()  # CPU runs only: patterns in reused buffers
        self._graphs = ProbeGraphs()  # CUDA runs with cuda_graph=True
        self._staged: dict[BatchKind, tuple[Tensor, int | None, Tensor]] = {}  # source, its version, device copy
        self._positions: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}  # loss positions on a device
        self.failures: dict[str, str] = {}
        """The probes that raised in the last eager run (``on_activation``, ``on_loss`` or ``compute``,
        or a main result of the wrong shape) or in the last `host_step`, with what they raised. Their
        results are left out of that run's; the other probes' are complete. A replayed CUDA graph keeps
        its recording's, and the host step after it is done anew."""
        self.failure_errors: dict[str, Exception] = {}
        """The exceptions behind `failures`, by probe name: their tracebacks lead to the line of the
        probe's code that raised (the strings do not). Cleared with `failures`; a traceback holds the
        run's frames, activations included, so a caller done with them should clear this dict."""
        self._host_failed: set[str] = set()  # the probes of `failures` that failed in the last host step

    @property
    def needed_batches(self) -> frozenset[BatchKind]:
        """The batch kinds the enabled probes read: a weights-only probe's (``reads_batch = False``) is not one.
        What a run draws, checks, stores and forwards; empty for a run of weights-only probes."""
        return frozenset(probe.batch for probe in self.probes if probe.reads_batch)

    @property
    def needs_loss(self) -> bool:
        """Whether any enabled probe needs the per-token loss (hence logits)."""
        return any(probe.needs_loss for probe in self.probes)

    def required_seq_len(self, *, repeat_length: int, text_len: int) -> int:
        """The longest sequence the enabled probes will feed the model (0 if none reads a batch).

        Args:
            repeat_length: ``L``; repeated sequences have ``2 * L`` tokens.
            text_len: Tokens per text window.
        """
        lengths = {"repeated": 2 * repeat_length, "text": text_len}
        return max((lengths[batch] for batch in self.needed_batches), default=0)

    def validate(
        self,
        cfg: HookedTransformerConfig,
        *,
        repeat_length: int,
        text_len: int,
        max_batch_tokens: int | None = None,
        hook_points: Collection[str] | None = None,
    ) -> None:
        """Reject probe-batch settings the model or a probe cannot handle, before training.

        Only the batches some enabled probe reads are checked; a probe that reads none (`Probe.reads_batch`)
        must ask for no hook point and no loss, which it would never be given.

        Args:
            cfg: The model's config (``n_ctx`` is the limit).
            repeat_length: ``L``; repeated sequences have ``2 * L`` tokens.
            text_len: Tokens per text window.
            max_batch_tokens: The chunk size `run` will be called with, if any.
            hook_points: The model's hook point names (``model.hook_dict``), if known: every hook
                a probe asks for must be one of them. Each probe's `Probe.check_config` runs too.

        Raises:
            ValueError: Naming the offending field and both values, e.g. ``2 * repeat_length``
                longer than ``n_ctx``, or a probe's own constraint (e.g. the ICL score's ``late``,
                a loss position outside the sequence).
        """
        for probe in self.probes:
            _check_reads_nothing(probe, cfg)
            if hook_points is not None:
                self._check_hook_names(probe, cfg, hook_points)
            probe.check_config(cfg)
        fields = {
            "repeated": (f"2 * repeat_length (repeat_length={repeat_length})", 2 * repeat_length),
            "text": ("text_len", text_len),
        }
        for batch in BATCH_KINDS:
            if batch not in self.needed_batches:
                continue
            field_name, seq_len = fields[batch]
            self._check_seq_len(cfg, batch, seq_len, field_name, max_batch_tokens)
            self._loss_positions([p for p in self._probes_for(batch) if p.needs_loss], seq_len)

    def run(
        self,
        model: HookedTransformer,
        inputs: ProbeInputs,
        max_batch_tokens: int | None = None,
        *,
        lean_attention: bool = True,
        cuda_graph: bool = False,
    ) -> dict[str, Tensor]:
        """Run every probe on its batch and return all results.

        Args:
            model: Any `HookedTransformer` (single device).
            inputs: The probe batches; those the probes need must be present. Moved to the model's
                device if they are elsewhere.
            max_batch_tokens: If given, forward at most this many tokens at once (whole sequences
                per chunk, so it must be at least the sequence length); if ``None``, chunks follow
                the attention-pattern budget (see `rows_per_chunk`).
            lean_attention: Run attention through `lean_attention` (same numbers as
                TransformerLens's forward, fewer passes over memory); ``False`` runs
                TransformerLens's own attention code.
            cuda_graph: On a CUDA model, record the whole run (forward, hooks, probe reductions)
                as a CUDA graph and replay it on later calls with the same model, inputs and
                settings (see `lens_callback.probes.graphs`). The returned tensors then belong to
                the graph and are overwritten by the next replay: copy what you keep. Ignored
                on other devices; if the run cannot be captured, it stays eager
                (`graph_failure` says why).

        Returns:
            ``{probe.name: tensor}`` for a probe's headline value and ``{f"{probe.name}/{key}":
            tensor}`` for its other values, all on the model's device; inference tensors (the run
            is under ``torch.inference_mode()``): clone one to change it in place or use it with
            autograd. A probe with a host step (`Probe.on_host`) has its `compute` results here,
            not yet what it logs: move the results to the host (`lens_callback.sinks.to_host`) and
            finish them with `host_step`, as `lens_callback.measure.measure` does.

        Raises:
            ValueError: If a needed batch is missing, longer than ``n_ctx``, unusable by a probe,
                or longer than ``max_batch_tokens``, or a probe asks for a hook the model lacks.
        """
        device = model.W_E.device
        batches = self._stage(model, inputs, max_batch_tokens, device)
        if cuda_graph and device.type == "cuda":
            return self._graph_run(model, batches, max_batch_tokens, lean_attention)
        self._graphs.note_eager_run(model, batches, max_batch_tokens, lean_attention)
        return self._run(model, batches, max_batch_tokens, lean_attention)

    def _graph_run(self, model: HookedTransformer, batches: dict[BatchKind, Tensor], max_batch_tokens: int | None,
                   lean_attention: bool) -> dict[str, Tensor]:
        """`run` through `ProbeGraphs`. A call that runs eagerly returns its first (eager) run's results, so
        `failures` are that run's too, not those of the capture after it: a probe that synchronises fails
        only inside the capture, which then stays eager, and its results are complete. A probe failing
        only while recorded would be missing from every replay, so its capture is refused."""
        runs: list[tuple[dict[str, str], dict[str, Exception]]] = []

        def run_eager() -> dict[str, Tensor]:
            results = self._run(model, batches, max_batch_tokens, lean_attention)
            runs.append((dict(self.failures), dict(self.failure_errors)))
            if len(runs) == 2 and (new := {n: w for n, w in runs[1][0].items() if n not in runs[0][0]}):
                raise RuntimeError("probe(s) failed only while the run was recorded: "
                                   + "; ".join(f"{name!r} in {what}" for name, what in new.items()))
            return results

        results = self._graphs.run(model, batches, max_batch_tokens, lean_attention, run_eager)
        if runs:
            self.failures = dict(runs[0][0])
            self.failure_errors.clear()  # in place, as `_run` does
            self.failure_errors.update(runs[0][1])
        return results

    def host_step(self, arrays: Mapping[str, np.ndarray], cfg: HookedTransformerConfig) -> dict[str, np.ndarray]:
        """Finishes the run's results on the host: each probe with a host step (`Probe.on_host`) turns its
        `compute` results, moved to the host with every other result (``arrays``, named as `run` names
        them), into what it logs; the other results pass unchanged, in their order.

        A probe whose host step raises, or returns what a probe may not log (not real arrays, a per-head main
        result not ``[n_layers, n_heads]``), fails as in `compute`: its results are left out, and it is in
        `failures` and `failure_errors` (where the callback warns, counts, and under ``strict`` raises), under
        ``"on_host(): ..."``. Each host step runs in `probe_modes` on the CPU (autocast off, no gradients), as
        the probe run does. A replayed CUDA graph keeps its recording's `failures`: the failures of the
        host step before it are taken out first, so each step's host step reports its own.

        Args:
            arrays: The run's results on the host (`lens_callback.sinks.to_host`), float32.
            cfg: The model's config (the per-head shape).

        Returns:
            The results to log, by name, float32.
        """
        for name in self._host_failed:
            self.failures.pop(name, None)
            self.failure_errors.pop(name, None)
        self._host_failed.clear()
        finished: dict[str, dict[str, np.ndarray]] = {}  # probe name -> its results to log, by result name
        for probe in self.probes:
            if probe.name in self.failures or not has_host_step(probe):
                continue
            own = {name: name.partition("/")[2] for name in arrays if name.partition("/")[0] == probe.name}
            try:
                # in the probe run's modes, whoever calls (a loop probing inside a CPU autocast had a torch host
                # step's products in bfloat16, review)
                with probe_modes("cpu"):
                    values = probe.on_host({key: arrays[name] for name, key in own.items()})
                checked = _host_results(probe, values, cfg)
            except Exception as err:  # noqa: BLE001 - one probe's fault leaves the others' results
                self.failures[probe.name] = f"on_host(): {error_text(err)}"
                self.failure_errors[probe.name] = err
                self._host_failed.add(probe.name)
                checked = {}
            finished[probe.name] = {_result_name(probe.name, key): value for key, value in checked.items()}
        out: dict[str, np.ndarray] = {}
        placed: set[str] = set()
        for name, value in arrays.items():  # a finished probe's results where its first one was
            owner = name.partition("/")[0]
            if owner not in finished:
                out[name] = value
            elif owner not in placed:  # compute() returned at least one result (`_check_results`)
                out.update(finished[owner])
                placed.add(owner)
        return out

    def release_graphs(self) -> None:
        """Drops the recorded CUDA graphs and their memory; the next ``cuda_graph`` run records anew."""
        self._graphs.clear()

    def release(self) -> None:
        """Drops the CUDA graphs and the CPU workspace's buffers (one set per model and chunk shape run):
        what a run keeps between probe steps, given back when training ends or another model is
        attached; the next run makes them anew."""
        self._graphs.clear()
        self.workspace.clear()

    @property
    def graph_failure(self) -> str | None:
        """Why the last CUDA-graph capture failed (the run stayed eager), or ``None``."""
        return self._graphs.failure

    def _stage(
        self, model: HookedTransformer, inputs: ProbeInputs, max_batch_tokens: int | None, device: torch.device
    ) -> dict[BatchKind, Tensor]:
        """Checks the needed batches against the model and returns them on its device.

        A batch already on the device is used as is; a copy made for an earlier call is reused
        while the source tensor is the same object, unmodified (so a CUDA graph sees fixed inputs).
        """
        cfg = model.cfg
        for probe in self.probes:
            _check_reads_nothing(probe, cfg)
        batches: dict[BatchKind, Tensor] = {}
        for batch in BATCH_KINDS:
            if batch not in self.needed_batches:
                continue
            tokens = getattr(inputs, batch)
            if tokens is None:
                users = [probe.name for probe in self._probes_for(batch)]
                raise ValueError(f"inputs.{batch} is None but probes {users} need it")
            self._check_seq_len(cfg, batch, tokens.shape[1], f"inputs.{batch}", max_batch_tokens)
            for probe in self._probes_for(batch):
                self._check_hook_names(probe, cfg, model.hook_dict)
            if tokens.device == device:
                batches[batch] = tokens
                continue
            staged = self._staged.get(batch)
            # an inference tensor (made under torch.inference_mode()) has no version counter to tell a change:
            # copied at every call, into the same device tensor (a CUDA graph's fixed input)
            version = None if tokens.is_inference() else tokens._version
            if (
                staged is None
                or staged[0] is not tokens
                or staged[2].device != device
                or (version is not None and staged[1] != version)
            ):
                staged = (tokens, version, tokens.to(device, non_blocking=True))
                self._staged[batch] = staged
            elif version is None:
                staged[2].copy_(tokens, non_blocking=True)
            batches[batch] = staged[2]
        return batches

    def _run(
        self,
        model: HookedTransformer,
        batches: dict[BatchKind, Tensor],
        max_batch_tokens: int | None,
        lean_attention: bool,
    ) -> dict[str, Tensor]:
        """The probe run proper: bind and reset the probes, one forward per batch, compute."""
        cfg = model.cfg
        device = model.W_E.device
        self.failures = {}
        self.failure_errors.clear()  # in place: a traceback's frames may hold this dict (a cycle kept till gc)
        self._host_failed.clear()
        # eval mode for the run; setting ``training`` on every module costs more host time than a
        # small model's probes, so a model already in eval mode (the callback's) is left alone
        training = [module for module in model.modules() if module.training]
        try:
            if training:
                model.eval()
            # activations written into reused buffers are borrowed: only probes, which know it, may see them;
            # a hook someone else left on the model (a cache kept by model.add_hook) would keep one layer's
            # activation and read another's
            borrowed = device.type in WORKSPACE_DEVICES and not _foreign_hooks(model)
            workspace = self.workspace if borrowed else None
            with torch.inference_mode(), lean_attention_context(model, lean_attention, workspace):
                for probe in self.probes:  # a probe that fails here is skipped for the run, as in its hooks
                    _guarded(probe, self.failures, self.failure_errors, "bind()", probe.bind, model)
                    _guarded(probe, self.failures, self.failure_errors, "reset()", probe.reset, cfg, device)
                for batch, tokens in batches.items():
                    # a batch whose probes ask for no activation and no loss (a probe reading the weights only
                    # but left at reads_batch=True) gives them nothing: its forward is skipped
                    if any(probe.needs_loss or probe.hook_names(cfg) for probe in self._probes_for(batch)):
                        self._forward(model, batch, tokens, max_batch_tokens)
                results: dict[str, Tensor] = {}
                for probe in self.probes:
                    if probe.name in self.failures:
                        continue
                    try:
                        values = probe.compute()
                        _check_results(probe, values, cfg, device)
                    except Exception as err:  # noqa: BLE001 - one probe's fault leaves the others' results
                        self.failures[probe.name] = f"compute(): {error_text(err)}"
                        self.failure_errors[probe.name] = err
                        continue
                    for key, value in values.items():
                        results[_result_name(probe.name, key)] = value
        finally:
            for probe in self.probes:
                with suppress(Exception):  # cleanup: a failure here must not lose the run's results
                    probe.bind(None)
            for module in training:
                module.training = True
        return results

    @staticmethod
    def _check_hook_names(probe: Probe, cfg: HookedTransformerConfig, hook_points: Collection[str]) -> None:
        names = probe.hook_names(cfg)
        missing = [name for name in names if name not in hook_points]
        if missing:
            raise ValueError(f"probe {probe.name!r} asks for hook point(s) {missing} that the model does not "
                             f"have (e.g. {sorted(hook_points)[:3]})")
        silent = {name: why for name in names if (why := _never_fired(name, cfg)) is not None}
        if silent:
            listed = "; ".join(f"{name!r}: {why}" for name, why in silent.items())
            raise ValueError(f"probe {probe.name!r} asks for hook point(s) that the probe forward never fires, so it "
                             f"would see nothing ({listed})")

    def _probes_for(self, batch: BatchKind) -> list[Probe]:
        """The probes reading ``batch`` (a weights-only probe naming it does not)."""
        return [probe for probe in self.probes if probe.reads_batch and probe.batch == batch]

    def _check_seq_len(
        self,
        cfg: HookedTransformerConfig,
        batch: BatchKind,
        seq_len: int,
        field_name: str,
        max_batch_tokens: int | None,
    ) -> None:
        if seq_len > cfg.n_ctx:
            raise ValueError(
                f"{field_name} = {seq_len} tokens is longer than the model's n_ctx = {cfg.n_ctx}"
            )
        if max_batch_tokens is not None and (
            isinstance(max_batch_tokens, bool)
            or not isinstance(max_batch_tokens, int)
            or max_batch_tokens < seq_len
        ):
            raise ValueError(
                f"max_batch_tokens = {max_batch_tokens!r} must be an int >= the probe sequence "
                f"length ({field_name} = {seq_len} tokens)"
            )
        for probe in self._probes_for(batch):
            probe.check_seq_len(seq_len)

    def _loss_positions(self, probes: list[Probe], seq_len: int) -> list[int] | None:
        """Sorted union of the loss probes' positions, or ``None`` if one of them wants all."""
        union: set[int] = set()
        for probe in probes:
            positions = probe.loss_positions(seq_len)
            if positions is None:
                return None
            bad = [
                p for p in positions if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= seq_len - 2
            ]
            if bad:
                raise ValueError(
                    f"probe {probe.name!r}: loss_positions must be ints in [0, {seq_len - 2}] for "
                    f"{seq_len}-token sequences, got {bad[:5]}"
                )
            union.update(positions)
        return sorted(union)

    def _positions_on(self, positions: tuple[int, ...], device: torch.device) -> Tensor:
        """``positions`` as an index tensor on ``device``, made once (a host-to-device copy per run
        would synchronise, and cannot be recorded in a CUDA graph)."""
        key = (positions, device)
        if key not in self._positions:
            self._positions[key] = torch.tensor(positions, device=device)
        return self._positions[key]

    def _forward(
        self,
        model: HookedTransformer,
        batch: BatchKind,
        tokens: Int[Tensor, "batch pos"],
        max_batch_tokens: int | None,
    ) -> None:
        """One forward over ``tokens`` (in chunks of whole rows), feeding the probes of ``batch``."""
        probes = self._probes_for(batch)
        subscribers: dict[str, list[Probe]] = {}
        for probe in probes:
            for name in probe.hook_names(model.cfg):
                subscribers.setdefault(name, []).append(probe)
        loss_probes = [probe for probe in probes if probe.needs_loss]

        n_rows, seq_len = tokens.shape
        rows = rows_per_chunk(model.cfg, n_rows, seq_len, tokens.device, max_batch_tokens)
        index = None
        if loss_probes:
            positions = self._loss_positions(loss_probes, seq_len)
            if positions is None:
                index = torch.arange(seq_len - 1, device=tokens.device)  # (T-1,)
            else:
                index = self._positions_on(tuple(positions), tokens.device)  # (P,)
        final_hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        for start in range(0, n_rows, rows):
            chunk = tokens[start : start + rows]  # (b, T)
            hooks = [(name, _dispatch_hook(name, subs, chunk, self.failures, self.failure_errors))
                     for name, subs in subscribers.items()]
            if index is None:
                with temporary_hooks(model, hooks):
                    model(chunk, return_type=None, stop_at_layer=_last_layer_unless_hooked(model))
                continue
            final: list[Tensor] = []
            hooks.append((final_hook, _select_hook(index, final)))
            with temporary_hooks(model, hooks):
                model(chunk, return_type=None, stop_at_layer=_last_layer_unless_hooked(model))
            token_loss = loss_at_positions(model, final[0], chunk, index)  # (b, T-1), NaN elsewhere
            for probe in loss_probes:
                _guarded(probe, self.failures, self.failure_errors, "on_loss()", probe.on_loss, token_loss, chunk)


_CONFIG_GATED_HOOKS = {  # hook point name ends -> the HookedTransformerConfig flag without which it never fires
    "hook_attn_in": "use_attn_in",
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "hook_mlp_in": "use_hook_mlp_in",
    "attn.hook_result": "use_attn_result",
    "hook_tokens": "use_hook_tokens",
}


def _check_reads_nothing(probe: Probe, cfg: HookedTransformerConfig) -> None:
    """A probe that reads no batch (``reads_batch = False``) asks for no hook point and no loss: no forward is
    run for it, so it would see neither.

    Raises:
        ValueError: naming the probe and what it asked for.
    """
    if probe.reads_batch:
        return
    asked = ([f"hook point(s) {probe.hook_names(cfg)}"] if probe.hook_names(cfg) else []) + (
        ["the loss (needs_loss=True)"] if probe.needs_loss else [])
    if asked:
        raise ValueError(f"probe {probe.name!r} sets reads_batch=False (no batch is forwarded for it) but asks for "
                         f"{' and '.join(asked)}, which it would never see: set reads_batch=True, or read the "
                         f"weights only")


def _never_fired(name: str, cfg: HookedTransformerConfig) -> str | None:
    """Why hook point ``name`` never fires in a probe forward, or ``None`` if it does: the forward stops
    before the unembedding (the losses decode the last block's output, `final_logits`), and
    TransformerLens fires some hook points only with a config flag on (``cfg.use_attn_result``, ...)."""
    if name.startswith("unembed."):
        return ("the probe forward stops before the unembedding; a probe that needs the logits sets needs_loss "
                "(on_loss gets the per-token loss) or decodes a residual with final_logits")
    for end, flag in _CONFIG_GATED_HOOKS.items():
        if (name == end or name.endswith("." + end)) and not getattr(cfg, flag, False):
            return f"TransformerLens fires it only with cfg.{flag}=True"
    return None


def _foreign_hooks(model: HookedTransformer) -> bool:
    """Whether a hook other than the runner's sees one of ``model``'s hook points (checked before the run
    adds its own): one of theirs, or a global module hook (`has_hooks`)."""
    return has_hooks(*model.hook_dict.values())


def _last_layer_unless_hooked(model: HookedTransformer) -> int | None:
    """``stop_at_layer`` for a ``return_type=None`` forward: ``n_layers``, which skips ``ln_final``
    (its output is unread: the loss is decoded from the last block's output, `final_logits`),
    unless a hook on ``ln_final`` or one of its hook points wants to see it (then ``None``)."""
    ln_final = getattr(model, "ln_final", None)
    if ln_final is not None and has_hooks(*ln_final.modules()):
        return None
    return model.cfg.n_layers


@contextmanager
def temporary_hooks(model: HookedTransformer, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
    """``model.hooks(fwd_hooks)`` for named hook points, removing only what it added.

    TransformerLens's context manager adds each hook at a new context level and, on exit, asks
    every hook point of the model to drop its hooks of that level (``reset_hooks``): for the
    default model that scan cost 0.15 ms per forward chunk, more than a small model's probes. This
    adds the hooks the same way (``HookPoint.add_hook`` at a fresh ``context_level``, so hooks run
    in registration order after any already present) and removes that level's hooks from the
    hook points it touched only. Hooks other code registered, permanent or not, stay.
    """
    model.context_level += 1
    level = model.context_level
    touched: dict[int, HookPoint] = {}
    try:
        for name, hook in fwd_hooks:
            point = model.hook_dict[name]
            point.add_hook(hook, dir="fwd", level=level)
            touched[id(point)] = point
        yield
    finally:
        for point in touched.values():
            point.remove_hooks("fwd", level=level)
        model.context_level -= 1


@contextmanager
def probe_modes(device_type: str) -> Iterator[None]:
    """The modes a probe run and its host step run in: autocast off on ``device_type`` and no gradients;
    the caller's modes are back on exit. A hand-written loop's ``torch.autocast("cpu", dtype=torch.bfloat16)``
    around a probe call then changes no number (the forward, `Probe.compute` and `Probe.on_host` would run in
    bfloat16), and a probe's torch host step builds no autograd graph. `lens_callback.measure.measure` and
    `run_probe` both run in it, as do the weights-only scores' own functions (`composition_scores`,
    `copying_scores`): the standalone numbers are the logged ones."""
    # a device autocast does not know (the meta device of the GPU-path count) has no autocast to turn off: torch
    # raises for it ("unsupported scalarType")
    autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                else nullcontext())
    with autocast, torch.no_grad():
        yield


_T = TypeVar("_T")


def in_probe_modes(function: Callable[..., _T]) -> Callable[..., _T]:
    """Runs ``function(model, ...)`` in `probe_modes` on the model's device, as the probe run runs: without an
    autograd graph over the parameters, and with a caller's autocast off (inside ``torch.autocast("cpu",
    dtype=torch.bfloat16)`` the weights-only scores' products were bfloat16, 2e-3 off the logged numbers), so
    that the standalone scores are the logged ones."""
    @functools.wraps(function)
    def wrapper(model: HookedTransformer, *args: Any, **kwargs: Any) -> _T:
        with probe_modes(model.W_E.device.type):
            return function(model, *args, **kwargs)
    return wrapper


def _guarded(probe: Probe, failures: dict[str, str], errors: dict[str, Exception], where: str,
             method: Callable[..., Any], *args: Any) -> None:
    """Calls one of ``probe``'s methods unless the probe failed already in this run; an exception
    is recorded in ``failures`` (what and where) and ``errors`` (the exception, for its traceback)
    under the probe's name (its later calls are skipped), not raised."""
    if probe.name in failures:
        return
    try:
        method(*args)
    except Exception as err:  # noqa: BLE001 - one probe's fault leaves the others' results
        failures[probe.name] = f"{where}: {error_text(err)}"
        errors[probe.name] = err


_LIBRARIES = frozenset({"torch", "transformer_lens", "numpy", "einops", "jaxtyping", "typeguard", "beartype"}) | frozenset(
    sys.stdlib_module_names)
"""Top-level packages whose frames `raised_at` passes over to name the probe's own line."""


def raised_at(err: BaseException) -> str | None:
    """Where a probe's failure (`ProbeRunner.failure_errors`) was raised, as ``file:line in function``: the
    last frame of its traceback outside this module, in the probe's code or what it called. Where that
    frame is a library's (`_LIBRARIES`: torch's ``softmax`` given a bad ``dim``), the probe's last line
    before it comes first and the library's follows (``... (raised in file:line in function)``). ``None``
    if the runner raised it itself (a result of the wrong shape or device: its message says what is wrong)."""
    frames = [(frame, line) for frame, line in traceback.walk_tb(err.__traceback__)
              if frame.f_globals.get("__name__") != __name__]
    if not frames:
        return None

    def where(frame: Any, line: int) -> str:
        return f"{frame.f_code.co_filename}:{line} in {frame.f_code.co_name}"

    def library(frame: Any) -> bool:
        return str(frame.f_globals.get("__name__", "")).partition(".")[0] in _LIBRARIES

    own = [(frame, line) for frame, line in frames if not library(frame)]
    if not own or own[-1] == frames[-1]:
        return where(*frames[-1])
    return f"{where(*own[-1])} (raised in {where(*frames[-1])})"


def _dispatch_hook(name: str, subscribers: list[Probe], tokens: Tensor, failures: dict[str, str],
                   errors: dict[str, Exception]) -> HookFn:
    """A forward hook for hook point ``name`` handing its activation to each subscribed probe.

    Returns ``None``, so the activation passes on unchanged and nothing keeps it after the call. A
    probe that raises is recorded in ``failures`` and ``errors`` and skipped from then on (see
    `ProbeRunner.failures`).
    """
    where = f"on_activation({name!r})"

    def hook_fn(activation: Tensor, hook: HookPoint) -> None:
        for probe in subscribers:
            _guarded(probe, failures, errors, where, probe.on_activation, name, activation, tokens)

    return hook_fn


def _check_results(probe: Probe, values: Mapping[str, Any], cfg: HookedTransformerConfig, device: torch.device) -> None:
    """A probe's ``compute()`` output: tensors by key, on the model's ``device`` (the results travel to
    the host in one transfer of them all, which a tensor elsewhere broke for every probe: faults
    review), real (a complex one would be logged as its real part); a per-head probe's main one
    ``[n_layers, n_heads]``; at least one, none without elements (either logged nothing, unseen)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"compute() must return a dict of tensors, got {type(values).__name__}")
    if not values:  # logged nothing, and said nothing: the user took the probe to have run (small-items review)
        raise _no_results("compute()", probe)
    # by key: "got dict" named what was right about a dict holding one number (guarantees review)
    not_tensors = {key: type(value).__name__ for key, value in values.items() if not isinstance(value, Tensor)}
    if not_tensors:
        raise TypeError(f"compute() must return a dict of tensors; got {not_tensors}: build each result as a "
                        f"tensor on the model's device (a number as torch.tensor(x, device=...))")
    # a tensor of no element gives no tag (`sinks.scalar_tags`): that result was dropped unseen (small-items review)
    _check_elements("compute()", "tensors", {key: value.shape for key, value in values.items()})
    # results are named f"{probe}/{key}": of two keys with one name (1 and "1") one was dropped there,
    # before `sinks.colliding_tags` could see it (guarantees review)
    names = Counter(str(key) for key in values)
    shared = [key for key in values if names[str(key)] > 1]
    if shared:
        raise ValueError(f"compute() returned the keys {shared}, which name one result "
                         f"{f'{probe.name}/{shared[0]}'!r}: give each result a key of its own (a str)")
    # the results travel as one float32 vector (`sinks.packed`): a complex one lost its imaginary part there,
    # logged as its real part under PyTorch's one generic warning (e.g. eigenvalues returned without .real)
    complex_keys = {key: str(value.dtype).removeprefix("torch.") for key, value in values.items() if value.is_complex()}
    if complex_keys:
        raise TypeError(f"compute() must return real tensors (they are logged as float32); got {complex_keys}: "
                        f"return .real, .imag or .abs() of a complex result, as a key each if you want several")
    elsewhere = {key: str(value.device) for key, value in values.items() if value.device != device}
    if elsewhere:
        raise ValueError(f"compute() must return tensors on the model's device {device}; got {elsewhere} (e.g. "
                         f"torch.tensor(x) makes a CPU tensor: pass device=, or build the result from the activations)")
    if not has_host_step(probe):  # else what its host step returns is checked (`_host_results`)
        _check_per_head_shape(probe, values, cfg)


def _check_per_head_shape(probe: Probe, values: Mapping[str, Any], cfg: HookedTransformerConfig) -> None:
    """A per-head probe's main result, the one it logs: ``[n_layers, n_heads]``."""
    if probe.per_head:
        shape = (cfg.n_layers, cfg.n_heads)
        main = values.get(MAIN_KEY)
        if main is None or tuple(main.shape) != shape:
            got = "no main result" if main is None else f"shape {tuple(main.shape)}"
            raise ValueError(f"a per-head probe's main result (key {MAIN_KEY!r}) must have shape "
                             f"[n_layers, n_heads] = {list(shape)}; got {got} (keys {sorted(values)})")


def _host_results(probe: Probe, values: Any, cfg: HookedTransformerConfig) -> dict[str, np.ndarray]:
    """What a probe's host step (`Probe.on_host`) returned, checked as `_check_results` checks `compute`'s: real
    arrays by str key (a number is taken as a 0-d array), at least one, none without elements, a per-head probe's
    main one ``[n_layers, n_heads]``; as float32, the precision every result is logged in."""
    if not isinstance(values, Mapping):
        raise TypeError(f"on_host() must return a dict of arrays, got {type(values).__name__}")
    if not values:
        raise _no_results("on_host()", probe)
    not_str = [key for key in values if not isinstance(key, str)]
    if not_str:
        raise TypeError(f"on_host() must return str keys (results are logged as {probe.name!r}/key), got {not_str}")
    arrays = {key: np.asarray(value) for key, value in values.items()}
    unfit = {key: str(array.dtype) for key, array in arrays.items()
             if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_)
             or np.issubdtype(array.dtype, np.complexfloating)}
    if unfit:
        raise TypeError(f"on_host() must return real numeric arrays (they are logged as float32); got {unfit}: "
                        f"return .real, .imag or abs() of a complex result, as a key each if you want several")
    _check_elements("on_host()", "arrays", {key: array.shape for key, array in arrays.items()})
    _check_per_head_shape(probe, arrays, cfg)
    return {key: array.astype(np.float32, copy=False) for key, array in arrays.items()}


def _no_results(where: str, probe: Probe) -> ValueError:
    """The error of a probe's ``compute()`` or ``on_host()`` (``where``) that returned an empty dict."""
    return ValueError(f"{where} returned no results (an empty dict), so nothing would be logged; return the headline "
                      f"value under the key {MAIN_KEY!r} (MAIN_KEY, logged as lens/{probe.name}) and any other under a "
                      f"key of its own")


def _check_elements(where: str, kind: str, shapes: Mapping[Any, Sequence[int]]) -> None:
    """Refuses results of ``compute()`` or ``on_host()`` (``where``) holding no element, by their ``shapes``: they
    would log nothing. ``kind`` names what they are (tensors, arrays)."""
    empty = {key: list(shape) for key, shape in shapes.items() if math.prod(shape) == 0}
    if empty:
        raise ValueError(f"{where} returned {kind} with no element {empty}, which would log nothing: return at "
                         f"least one value per key (NaN where there is nothing to measure), or leave the key out")


def has_host_step(probe: Probe) -> bool:
    """Whether ``probe`` finishes its results on the host: its class overrides `Probe.on_host`."""
    return type(probe).on_host is not Probe.on_host


def _result_name(probe: str, key: str) -> str:
    """A result's name: the probe's for `MAIN_KEY`, ``probe/key`` for another key."""
    return probe if key == MAIN_KEY else f"{probe}/{key}"


def _select_hook(index: Tensor, out: list[Tensor]) -> HookFn:
    """A forward hook keeping ``activation[:, index]`` (a copy) in ``out``."""

    def hook_fn(activation: Tensor, hook: HookPoint) -> None:
        out.append(activation.index_select(1, index))

    return hook_fn


def final_logits(model: HookedTransformer, resid: Float[Tensor, "... d_model"]) -> Tensor:
    """The model's own head on residual-stream rows: final norm (if any), unembed, output soft-cap.

    What ``model(tokens)`` computes after the last block (`HookedTransformer.forward`), row for
    row, for any subset of positions; the logit lens and the per-token loss use it. The
    unembedding is ``resid @ W_U + b_U`` on the parameter itself (TransformerLens's
    ``Unembed.forward`` copies ``W_U.T`` first); float32 results agree with the model's logits to
    rounding. Where a hook sees the unembedding (``unembed.hook_in``/``hook_out``, or a global module
    hook), ``Unembed.forward`` runs instead, so the hook acts on the decoded logits as in
    ``model(tokens)``, on the rows decoded here (``resid``'s shape if it is 3-D, else
    ``[1, rows, d_vocab]``), and keeps its tensor (the logits returned are a copy); hooks on
    ``ln_final`` run too.

    Returns:
        ``[..., d_vocab_out]`` logits.
    """
    x = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
    if has_hooks(*model.unembed.modules()):  # someone's hook on the head: TransformerLens's Unembed fires it,
        # on [batch, pos, d_model]-shaped rows, and returns a copy: the caller may write into what it gets
        rows = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        logits = model.unembed(rows).reshape(*x.shape[:-1], -1).clone()
    else:
        logits = torch.matmul(x, model.unembed.W_U)  # (..., V)
        logits += model.unembed.b_U
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def final_log_probs(model: HookedTransformer, resid: Float[Tensor, "... d_model"]) -> Tensor:
    """``log_softmax(final_logits(model, resid))`` in float32, computed in place over the logits.

    `final_logits` returns a fresh tensor (and ``.float()`` a fresh one or that one), so the
    log-softmax overwrites it instead of allocating a second ``[..., d_vocab_out]`` tensor.
    """
    logits = final_logits(model, resid).float()
    return torch.log_softmax(logits, dim=-1, out=logits)


def loss_at_positions(
    model: HookedTransformer,
    final_resid: Float[Tensor, "batch n_positions d_model"],
    tokens: Int[Tensor, "batch pos"],
    index: Int[Tensor, " n_positions"],
) -> Float[Tensor, "batch pos_minus_1"]:
    """`per_token_loss` at the positions in ``index`` only (NaN elsewhere), float32.

    Decodes at most `logit_block_rows` rows at a time.

    Args:
        model: The model whose head decodes the residual rows.
        final_resid: The last block's output at ``index``, ``[batch, P, d_model]``.
        tokens: ``[batch, T]``.
        index: ``P`` positions in ``[0, T - 2]``.
    """
    b, t = tokens.shape
    resid = final_resid.flatten(0, 1)  # (b*P, d_model)
    targets = tokens.index_select(1, index + 1).flatten()  # (b*P,)
    rows = logit_block_rows(resid.device, model.cfg.d_vocab_out)
    losses = []
    for i in range(0, resid.shape[0], rows):
        # cross_entropy(reduction="none") is -log_softmax at the target; the (r, V) block is not
        # bound to a name, so it is freed before the next one is decoded
        logp_at_target = final_log_probs(model, resid[i : i + rows]).gather(1, targets[i : i + rows, None])
        losses.append(logp_at_target.squeeze(1).neg_())  # (r,)
    loss = torch.cat(losses)  # (b*P,)
    token_loss = torch.full((b, t - 1), float("nan"), dtype=torch.float32, device=tokens.device)
    token_loss[:, index] = loss.view(b, -1)
    return token_loss


def per_token_loss(logits: Tensor, tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """Next-token cross-entropy per position, in float32: ``[batch, T-1]``.

    ``out[:, p]`` is the loss of predicting ``tokens[:, p + 1]`` from the logits at position ``p``
    (TransformerLens's ``lm_cross_entropy_loss(..., per_token=True)``).

    Args:
        logits: ``[batch, T, d_vocab]``.
        tokens: ``[batch, T]``.
    """
    b, t, v = logits.shape
    # the last position has no target: ignore it rather than slice the logits, which would copy them
    targets = F.pad(tokens[:, 1:], (0, 1), value=-100)  # (b, T): -100 = cross_entropy's ignore_index
    loss = F.cross_entropy(logits.reshape(b * t, v).float(), targets.reshape(b * t), reduction="none")
    return loss.view(b, t)[:, :-1]


def run_probe(
    model: HookedTransformer,
    probe: Probe,
    tokens: Int[Tensor, "batch pos"] | None = None,
    max_batch_tokens: int | None = None,
    *,
    lean_attention: bool = True,
) -> dict[str, Tensor]:
    """Run a single probe on ``tokens`` (used as its batch kind) and return its result dict.

    A probe that reads no batch (`Probe.reads_batch`: the composition and copying scores) takes no tokens:
    ``tokens`` is then left unread and may be ``None``; any other probe needs them.

    This is what the standalone functions (``induction_score(model, tokens)``, ...) call. The
    results are ordinary tensors (clones of the run's inference tensors), free to change, on the
    model's device; those of a probe with a host step (`Probe.on_host`: ``copying``) are what it
    logs, the host step's float32 arrays as CPU tensors (its `compute` results, moved to the host
    as in `lens_callback.measure.measure` and finished there). It runs as `measure` does (`probe_modes`:
    autocast off, no gradients, the caller's modes back afterwards), so a call inside ``torch.autocast``
    gives the float32 numbers of a call outside it.

    A probe of the repeated batch that reads the repeats (`Probe.reads_repeats`) warns on tokens whose
    second half does not repeat the first (its score reads positions that are repeats only there; the arithmetic is defined, and a
    deliberately altered copy is a valid experiment).

    Raises:
        ValueError: If the probe cannot handle the model (its ``check_config``), ``tokens`` is ``None`` for a
            probe that reads a batch, or a token id is outside ``[0, d_vocab)`` (the embedding would read a
            negative id from the end of the vocabulary, as another token, without an error).
        RuntimeError: If the probe raised (in ``bind``, ``reset``, ``on_activation``, ``on_loss``,
            ``compute`` or ``on_host``), naming where and what; `ProbeRunner` records such a failure and goes on,
            for the callback.
    """
    probe.check_config(model.cfg)
    if not probe.reads_batch:
        results = _run_alone(model, probe, ProbeInputs(repeated=None, text=None), max_batch_tokens, lean_attention)
        return {name: value.clone() for name, value in results.items()}
    if tokens is None:
        raise ValueError(f"probe {probe.name!r} reads the {probe.batch} batch: pass its tokens, [batch, pos] ids "
                         f"(tokens=None is for a probe that reads the weights only)")
    inputs = ProbeInputs(
        repeated=tokens if probe.batch == "repeated" else None,
        text=tokens if probe.batch == "text" else None,
    )
    checked = inputs.repeated if probe.batch == "repeated" else inputs.text  # int64, checked 2-D
    tokens = tokens if checked is None else checked  # the batch kind holds them: not None (for mypy)
    if (bad := id_outside_vocab(tokens, model.cfg.d_vocab)) is not None:
        raise ValueError(f"tokens hold id {bad}, outside the model's vocabulary [0, {model.cfg.d_vocab}): a "
                         f"negative id would be read as another token")
    results = _run_alone(model, probe, inputs, max_batch_tokens, lean_attention)
    half = tokens.shape[1] // 2  # the run has checked the length (even for the repeated batch's probes)
    if probe.batch == "repeated" and probe.reads_repeats and not torch.equal(tokens[:, :half], tokens[:, half:]):
        warnings.warn(f"{probe.name}: the tokens' second half does not repeat the first, so the positions it scores "
                      f"(relative to the copy {half} back) are not repeats; pass [batch, 2L] tokens whose halves are "
                      f"equal (lens_callback.probes.repeated_tokens)", stacklevel=3)
    return {name: value.clone() for name, value in results.items()}


def _run_alone(model: HookedTransformer, probe: Probe, inputs: ProbeInputs, max_batch_tokens: int | None,
               lean_attention: bool) -> dict[str, Tensor]:
    """`run_probe`'s run of one probe, its host step done (`Probe.on_host`); a failure raised, not recorded."""
    runner = ProbeRunner([probe])
    with probe_modes(model.W_E.device.type):  # as `measure` runs it (the caller's autocast left out)
        results = runner.run(model, inputs, max_batch_tokens=max_batch_tokens, lean_attention=lean_attention)
    if probe.name not in runner.failures and has_host_step(probe):  # the results it logs, as `measure` finishes them
        host = {name: value.detach().float().cpu().numpy() for name, value in results.items()}
        results = {name: torch.from_numpy(value) for name, value in runner.host_step(host, model.cfg).items()}
    if probe.name in runner.failures:  # the callback counts a failing probe; a direct call raises
        raise RuntimeError(f"probe {probe.name!r} failed in {runner.failures[probe.name]}") from (
            runner.failure_errors.pop(probe.name, None))  # its traceback shows the probe's line
    return results
