"""The probe interface, a shared base for attention-pattern probes, and the probe registry.

A probe measures one mechanistic-interpretability signal on a
`transformer_lens.HookedTransformer` and returns named tensors; logging is not its business.
Probes never run the model themselves: a `ProbeRunner` does one forward per probe batch, shared by
every enabled probe, with forward hooks on only the hook points the probes asked for, and
dispatches each activation to the probes that asked for it. A probe reduces what it sees on the
fly into additive sums and counts, so a batch can be fed in chunks and `compute()` gives the same
answer as one big forward.

The call sequence the runner follows, once per run::

    probe.bind(model)            # optional: probes that need model modules in compute()
    probe.reset(cfg, device)     # fresh accumulators on the model's device
    probe.check_seq_len(T)       # before each forward over a batch of length T
    probe.on_activation(...)     # inside the hooks, once per hook point per chunk
    probe.on_loss(...)           # once per chunk, if probe.needs_loss
    probe.compute()              # -> dict[str, Tensor], still on the device
    probe.bind(None)             # drop the model reference
    # every probe's results go to the host in one transfer, then:
    probe.on_host(values)        # optional: dict[str, np.ndarray] -> dict[str, np.ndarray], on the host

Rules for probe authors: stay on the device (no `.item()`, `.cpu()`, or Python branching on tensor
values), do not keep a hook's activation (or a view of it) beyond the hook call, and accumulate in
float32. Python branching on shapes is fine. What cannot stay on the device without synchronising
it with the host (``torch.linalg.eig``, a data-dependent loop) goes into `Probe.on_host`, which gets
the probe's `compute()` results as float32 NumPy arrays after the one transfer of every probe's
results and returns the results that are logged (the copying score's eigenvalues,
`lens_callback.probes.copying`); the checks on a probe's results (a per-head probe's main result
``[n_layers, n_heads]``) hold for what `on_host` returns, and a fault there is the probe's, as in
`compute()`.

The design of a small base class with one probe per file follows tuned-lens (`nn/lenses.py`) and
TransformerLens (`components/`); hook names and shapes are TransformerLens's.
"""

from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Literal, TypeVar, get_args

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from typing_extensions import override

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

BatchKind = Literal["repeated", "text"]
"""Which probe batch a probe consumes.

* ``"repeated"``: ``[batch, 2L]`` tokens whose second half is an exact copy of the first (no BOS),
  built by `lens_callback.probes.inputs.repeated_tokens`.
* ``"text"``: ``[batch, T]`` windows of real text, built by `lens_callback.probes.inputs.text_batch`.
"""

BATCH_KINDS: tuple[BatchKind, ...] = get_args(BatchKind)
"""All batch kinds, in the order the runner processes them."""

MAIN_KEY = ""
"""The key a probe's `compute()` uses for its headline value; reported under ``probe.name`` alone."""


class Probe(ABC):
    """One measurement on a `HookedTransformer`, fed by a `ProbeRunner`.

    Subclasses set the class attributes, declare their hook points in `hook_names`, reduce
    activations in `on_activation` (and/or per-token losses in `on_loss`) into accumulators created
    in `reset`, and turn the accumulators into tensors in `compute`. Options go to ``__init__`` and
    are validated there.

    Attributes:
        name: Registry key and prefix of the result keys (``name`` or ``name/key``). No ``/``.
        batch: The probe batch this probe consumes (see `BatchKind`).
        reads_batch: Whether the probe reads its batch at all (hook points, the loss, the tokens). A probe
            that reads the weights only (`WeightsProbe`) sets ``False``: its ``batch`` then counts for nothing,
            neither the batches a run draws, checks, stores with its snapshots and forwards
            (`ProbeRunner.needed_batches`) nor the sequence lengths (`check_seq_len` is not called), and
            such a probe may ask for no hook point and no loss.
        per_head: Whether the results are shaped ``[n_layers, n_heads]`` (meant for heatmaps).
        needs_loss: Whether the probe needs the per-token next-token loss. If any enabled probe
            does, the runner computes the loss once per chunk and hands it to every such probe.
            The loss is decoded from the last block's output at the union of the loss probes'
            `loss_positions` (every position if one of them names none) with the model's own
            head, in bounded blocks; the model never builds ``[batch, T, d_vocab]`` logits.
        min_repeat_length: For a repeated-batch probe, the shortest half ``L`` it is defined for
            (`check_seq_len` enforces it).
        reads_repeats: For a repeated-batch probe, whether its score depends on the second half
            repeating the first (`run_probe` warns on tokens whose halves differ); the previous-token
            score does not.
        heatmap_range: For a per-head probe, the values its heatmap's colour scale spans, ``(low,
            high)``: fixed, so that the images of different steps compare; a value outside is drawn
            in the end's colour. A signed score sets e.g. ``(-1.0, 1.0)``.
    """

    name: ClassVar[str]
    batch: ClassVar[BatchKind]
    reads_batch: ClassVar[bool] = True
    per_head: ClassVar[bool] = False
    needs_loss: ClassVar[bool] = False
    min_repeat_length: ClassVar[int] = 1
    reads_repeats: ClassVar[bool] = True
    heatmap_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    @abstractmethod
    def hook_names(self, cfg: HookedTransformerConfig) -> list[str]:
        """The TransformerLens hook points whose forward activations this probe needs.

        Args:
            cfg: The model's config.

        Returns:
            Hook names such as ``"blocks.0.attn.hook_pattern"``; empty if the probe only needs the
            loss.
        """

    @abstractmethod
    def reset(self, cfg: HookedTransformerConfig, device: torch.device) -> None:
        """Create fresh accumulators for a new run.

        Args:
            cfg: The model's config.
            device: The model's device; accumulators live there.
        """

    def bind(self, model: HookedTransformer | None) -> None:  # noqa: B027
        """Give the probe the model it is about to read from, or ``None`` to release it.

        The runner calls ``bind(model)`` before `reset` and ``bind(None)`` after `compute`. The
        default does nothing; override it only if `compute` needs model modules (the logit lens
        needs ``ln_final`` and ``unembed``).

        Args:
            model: The model, or ``None`` at the end of a run.
        """

    def loss_positions(self, seq_len: int) -> list[int] | None:
        """The per-token loss positions `on_loss` reads, or ``None`` for all of them (the default).

        Position ``p`` is the loss of predicting token ``p + 1``. When every loss probe of a batch
        names its positions, the runner decodes only their union; the loss handed to `on_loss`
        is NaN at the other positions.

        Args:
            seq_len: Tokens per sequence of the probe batch.
        """
        return None

    def check_config(self, cfg: HookedTransformerConfig) -> None:  # noqa: B027 - optional hook
        """Reject a model this probe cannot handle (beyond its hook points, which the runner checks).

        `ProbeRunner.validate` calls it before training; the base accepts every model.

        Raises:
            ValueError: naming the probe and what it needs.
        """

    def check_seq_len(self, seq_len: int) -> None:
        """Reject a probe-batch sequence length this probe cannot use.

        The runner calls this before every forward; `ProbeRunner.validate` calls it before training.
        The base checks what every probe of the batch kind needs: a repeated batch has an even
        length of at least ``2 * min_repeat_length``, a text batch at least 2 tokens. Subclasses
        extend it.

        Args:
            seq_len: Number of tokens per sequence of the probe batch.

        Raises:
            ValueError: If the length is unusable; the message names the length.
        """
        if self.batch == "repeated":
            if seq_len < 2 or seq_len % 2 != 0:
                raise ValueError(
                    f"probe {self.name!r} needs a repeated batch of even length >= 2 "
                    f"(2 * repeat_length), got seq_len={seq_len}"
                )
            least = self.min_repeat_length
            if seq_len < 2 * least:
                raise ValueError(
                    f"{self.name} needs repeat_length >= {least} (seq_len >= {2 * least}), got seq_len={seq_len}"
                )
        elif seq_len < 2:
            raise ValueError(
                f"probe {self.name!r} needs a text batch of at least 2 tokens, got seq_len={seq_len}"
            )

    def on_activation(
        self, hook_name: str, activation: Tensor, tokens: Int[Tensor, "batch pos"]
    ) -> None:
        """Reduce one hook point's activation for one chunk into the accumulators.

        Called inside the forward hook; must not keep ``activation`` (or a view of it): the
        runner may reuse its memory for the next layer (see
        `lens_callback.probes.attention.AttentionWorkspace`). Copy what must outlive the call.

        Args:
            hook_name: One of the names returned by `hook_names`.
            activation: The hook point's output, e.g. ``[batch, head, q, k]`` for a pattern.
            tokens: The chunk's input tokens, ``[batch, pos]``, on the model's device.
        """
        raise NotImplementedError(
            f"{type(self).__qualname__} asked for hook {hook_name!r} but does not implement "
            "on_activation"
        )

    def on_loss(
        self, token_loss: Float[Tensor, "batch pos_minus_1"], tokens: Int[Tensor, "batch pos"]
    ) -> None:
        """Reduce one chunk's per-token next-token loss into the accumulators.

        Called once per chunk, only if `needs_loss`.

        Args:
            token_loss: ``[batch, T-1]`` float32 cross-entropy; ``token_loss[:, p]`` is the loss of
                predicting ``tokens[:, p + 1]`` from ``tokens[:, : p + 1]``.
            tokens: The chunk's input tokens, ``[batch, T]``.
        """
        raise NotImplementedError(
            f"{type(self).__qualname__} sets needs_loss but does not implement on_loss"
        )

    @abstractmethod
    def compute(self) -> dict[str, Tensor]:
        """Turn the accumulators into results, on the model's device.

        Returns:
            Named tensors, at least one, each of at least one element. The key `MAIN_KEY` (``""``) is
            reported as ``probe.name``, any other key ``k`` as ``f"{probe.name}/{k}"``. For a probe with a
            host step (`on_host`), what that step reads: these need not have the shapes of the logged results.
        """

    def on_host(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Finish the results on the host, after the probe step's one transfer of every result.

        For work that would synchronise the device with the host inside `compute` (an eigenvalue
        decomposition: ``torch.linalg.eig`` copies its result to the host; a loop over a tensor's
        values). The runner calls it once per run with this probe's `compute` results only if the
        probe overrides it; the default returns ``values`` unchanged. It is not part of a recorded
        CUDA graph (``cuda_graph=True`` records `compute` and the steps before it), so it runs after
        every replay too, on the replay's results.

        Args:
            values: The `compute` results by the same keys, as float32 arrays (the transfer's
                precision), this probe's own: free to change.

        Returns:
            The results that are logged, by key (`MAIN_KEY` and others, as `compute`'s; they
            replace all of the probe's `compute` results): real NumPy arrays, stored as float32.
            A per-head probe's main result is ``[n_layers, n_heads]`` here.
        """
        return values


class AttentionPatternProbe(Probe):
    """Base for per-head probes that reduce ``blocks.{l}.attn.hook_pattern`` to a mean per head.

    Subclasses implement `reduce_pattern`, returning a per-head sum and the number of terms it
    added; `compute` returns ``sum / count`` shaped ``[n_layers, n_heads]`` under `MAIN_KEY`.

    The per-chunk sums are kept as they come and added up once, in `compute`: with one chunk per
    batch (the GPU path) that is one ``stack`` for all layers instead of a ``zeros`` and an
    ``add_`` per layer, kernels that a GPU's launch-bound probe step pays in host time.
    """

    per_head: ClassVar[bool] = True

    def __init__(self) -> None:
        self._layer_of: dict[str, int] = {}
        self._sums: list[list[Tensor]] | None = None  # per layer, per chunk: (nh,) float32
        self._count: list[int] = []  # terms added per layer

    @override
    def hook_names(self, cfg: HookedTransformerConfig) -> list[str]:
        return [f"blocks.{layer}.attn.hook_pattern" for layer in range(cfg.n_layers)]

    @override
    def check_config(self, cfg: HookedTransformerConfig) -> None:
        hooks = self.hook_names(cfg)
        if hooks != AttentionPatternProbe.hook_names(self, cfg):
            raise ValueError(
                f"probe {self.name!r}: an AttentionPatternProbe reads every layer's pattern, "
                f"blocks.0..{cfg.n_layers - 1}.attn.hook_pattern in order, got {hooks}; to score some "
                "layers only, subclass Probe (per_head=False) and return what you compute"
            )

    @override
    def reset(self, cfg: HookedTransformerConfig, device: torch.device) -> None:
        self.check_config(cfg)  # also for runs that were never validated (`run_probe`)
        self._layer_of = {hook: layer for layer, hook in enumerate(self.hook_names(cfg))}
        self._sums = [[] for _ in range(cfg.n_layers)]
        self._count = [0] * cfg.n_layers

    @abstractmethod
    def reduce_pattern(
        self,
        pattern: Float[Tensor, "batch head query key"],
        tokens: Int[Tensor, "batch pos"],
    ) -> tuple[Float[Tensor, " head"], int]:
        """Reduce one layer's attention pattern for one chunk.

        Args:
            pattern: ``[batch, head, q, k]`` attention probabilities (rows sum to 1 over k <= q).
            tokens: The chunk's tokens, ``[batch, pos]``.

        Returns:
            The per-head float32 sum of the chunk's terms, and how many terms each head summed.
        """

    @override
    def on_activation(
        self, hook_name: str, activation: Tensor, tokens: Int[Tensor, "batch pos"]
    ) -> None:
        if self._sums is None:
            raise RuntimeError(f"probe {self.name!r}: reset() must be called before on_activation")
        layer = self._layer_of[hook_name]
        total, count = self.reduce_pattern(activation, tokens)  # (nh,), int
        self._sums[layer].append(total)
        self._count[layer] += count

    @override
    def compute(self) -> dict[str, Tensor]:
        if self._sums is None or min(self._count, default=0) == 0:
            raise RuntimeError(f"probe {self.name!r} has seen no attention patterns; run it first")
        if all(len(sums) == 1 for sums in self._sums):  # one chunk per batch (the GPU path)
            total = torch.stack([sums[0] for sums in self._sums])  # (n_layers, nh)
        else:
            total = torch.stack([torch.stack(sums).sum(dim=0) for sums in self._sums])
        # divide by Python ints, no host-to-device copy of the counts; every layer sees the same
        # chunks, so one division (one kernel) unless a subclass counted layers differently
        if len(set(self._count)) == 1:
            return {MAIN_KEY: total / self._count[0]}  # (n_layers, nh)
        return {MAIN_KEY: torch.stack([row / count for row, count in zip(total, self._count)])}


class DiagonalAttentionProbe(AttentionPatternProbe):
    """Base for per-head scores that average one diagonal of the pattern, ``pattern[b, h, q, q - back]``.

    Subclasses give ``(back, first)`` for a sequence length in `diagonal`; the score is the mean
    over ``b`` and ``q`` in ``[first, T)`` of ``pattern[b, h, q, q - back]`` (``first >= back``).
    """

    @abstractmethod
    def diagonal(self, seq_len: int) -> tuple[int, int]:
        """``(back, first)``: how far back the diagonal looks, and the first query position."""

    @override
    def check_seq_len(self, seq_len: int) -> None:
        super().check_seq_len(seq_len)
        back, first = self.diagonal(seq_len)
        if not 0 <= back <= first < seq_len:  # else the slice below would keep other positions than it counts
            raise ValueError(f"probe {self.name!r}: diagonal({seq_len}) = (back={back}, first={first}) must satisfy "
                             f"0 <= back <= first < seq_len = {seq_len}")

    @override
    def reduce_pattern(
        self,
        pattern: Float[Tensor, "batch head query key"],
        tokens: Int[Tensor, "batch pos"],
    ) -> tuple[Float[Tensor, " head"], int]:
        b, _, t, _ = pattern.shape
        back, first = self.diagonal(t)
        # the diagonal k = q - back covers q = back .. T-1; keep q = first .. T-1
        diag = pattern.diagonal(offset=-back, dim1=-2, dim2=-1)[..., first - back :]  # (B, nh, T-first)
        return diag.sum(dim=(0, 2), dtype=torch.float32), b * (t - first)


class LossProbe(Probe):
    """Base for probes that reduce the per-token loss into a few float32 sums (no hooks).

    Subclasses set ``n_sums`` and implement `on_loss` with `accumulate`; `compute` reads
    ``self._sum / self._count``.
    """

    needs_loss: ClassVar[bool] = True
    n_sums: ClassVar[int] = 2

    def __init__(self) -> None:
        self._sum: Tensor | None = None  # (n_sums,) float32
        self._count = 0

    @override
    def hook_names(self, cfg: HookedTransformerConfig) -> list[str]:
        return []

    @override
    def reset(self, cfg: HookedTransformerConfig, device: torch.device) -> None:
        self._sum = torch.zeros(self.n_sums, dtype=torch.float32, device=device)
        self._count = 0

    def accumulate(self, sums: list[Tensor], count: int) -> None:
        """Adds one chunk's sums (0-d tensors, in a fixed order) and its number of terms."""
        if self._sum is None:
            raise RuntimeError(f"probe {self.name!r}: reset() must be called before on_loss")
        self._sum += torch.stack(sums)
        self._count += count

    def means(self) -> Tensor:
        """``sum / count`` per accumulated quantity."""
        if self._sum is None or self._count == 0:
            raise RuntimeError(f"probe {self.name!r} has seen no losses; run it first")
        return self._sum / self._count


class WeightsProbe(Probe):
    """Base for probes that read the model's weights only (the composition and copying scores): no hook point,
    no loss, no token (``reads_batch = False``); `compute` reads `model`, the model `bind` gave.

    The model bound is the one probed (the callback's, refreshed in place at every probe step, its norms not
    folded): a subclass must not change it. `check_config` runs at `reset` too, for runs that were never
    validated (`run_probe`). The class still names a ``batch``, as every registered probe does, but it counts
    for nothing: a run whose other probes read no batch of that kind draws, checks, stores and forwards none
    (``LensCallback(probes=["logit_lens", "k_composition"], repeat_batch=0)`` runs), and `run_probe` takes no
    tokens for it.
    """

    batch: ClassVar[BatchKind] = "repeated"  # named, as every registered probe's; not drawn or read for it
    reads_batch: ClassVar[bool] = False
    reads_repeats: ClassVar[bool] = False  # reads no token: run_probe's warning on halves that differ is moot

    def __init__(self) -> None:
        self._model: HookedTransformer | None = None

    @override
    def hook_names(self, cfg: HookedTransformerConfig) -> list[str]:
        return []

    @override
    def bind(self, model: HookedTransformer | None) -> None:
        self._model = model

    @override
    def reset(self, cfg: HookedTransformerConfig, device: torch.device) -> None:
        self.check_config(cfg)

    @property
    def model(self) -> HookedTransformer:
        """The model bound for this run.

        Raises:
            RuntimeError: outside a run (before `bind`, or after ``bind(None)``).
        """
        if self._model is None:
            raise RuntimeError(f"probe {self.name!r} needs bind(model) before compute()")
        return self._model


ERROR_TEXT_CHARS = 2000
"""The most characters of an exception's message that a fault's text (its warning) quotes, for a probe's failure
and the callback's other faults (logging, a snapshot's write, the lean-attention check): a message holding a
printed tensor or a long repr went into the warning whole (megabytes in a notebook's output). The exception
itself, whole, is in `ProbeRunner.failure_errors` and is what ``strict`` raises."""

ERROR_TEXT_TAIL = 500
"""Of `ERROR_TEXT_CHARS`, the characters quoted from the message's end: a long message often ends with what
went wrong (``load_state_dict``'s size mismatches come after its lists of missing and unexpected keys; a
``f"{tensor} has shape ..."`` after the tensor), its start saying where."""


def error_text(err: Exception) -> str:
    """``"Type: message"`` of a probe's exception, a message longer than `ERROR_TEXT_CHARS` cut in its middle
    (its start and its last `ERROR_TEXT_TAIL` characters kept). Its own ``str()`` may raise (a user's exception
    class): raised in the handler, that failed the whole probe run and every probe's results (guarantees review)."""
    try:
        message = str(err)
    except Exception as broken:  # noqa: BLE001 - the type still names the failure
        return f"{type(err).__name__} (its str() raised {type(broken).__name__})"
    if len(message) > ERROR_TEXT_CHARS:
        head = ERROR_TEXT_CHARS - ERROR_TEXT_TAIL
        message = (f"{message[:head]} ... ({len(message) - ERROR_TEXT_CHARS:,} characters cut) ... "
                   f"{message[-ERROR_TEXT_TAIL:]}")
    return f"{type(err).__name__}: {message}"


# --------------------------------------------------------------------------------------------
# Registry

PROBES: dict[str, type[Probe]] = {}
"""All registered probe classes by `Probe.name`. Filled by `register_probe`."""

P = TypeVar("P", bound=type[Probe])


RESERVED_PROBE_NAMES: tuple[str, ...] = ("errors", "events", "run_id")
"""Names no probe may take: the callback's own tags ``lens/errors`` (the fault count), ``lens/events/...``
and ``lens/run_id`` (a probe's ``lens/errors`` was overwritten by the fault count)."""


def register_probe(cls: P) -> P:
    """Class decorator adding a probe class to `PROBES` under its ``name``.

    Users register their own probes the same way the built-in ones are registered::

        @register_probe
        class MyProbe(Probe):
            name = "my_probe"
            batch = "text"
            ...

    Args:
        cls: A concrete `Probe` subclass.

    Returns:
        ``cls`` unchanged.

    Raises:
        TypeError: If ``cls`` is not a concrete `Probe` subclass.
        ValueError: If its ``name`` is empty, contains ``/``, is one of `RESERVED_PROBE_NAMES` or is
            taken by another class, its ``batch`` is not a `BatchKind`, one of its flags (``reads_batch``,
            ``per_head``, ``needs_loss``, ``reads_repeats``) is not a bool, or its ``heatmap_range`` is
            not two finite numbers, low before high.
    """
    if not (isinstance(cls, type) and issubclass(cls, Probe)) or inspect.isabstract(cls):
        raise TypeError(f"register_probe needs a concrete Probe subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"probe name must be a non-empty string without '/', got name={name!r}")
    if name in RESERVED_PROBE_NAMES:
        raise ValueError(f"probe name {name!r} is reserved: the callback logs lens/{name} itself "
                         f"(reserved: {', '.join(RESERVED_PROBE_NAMES)})")
    batch = getattr(cls, "batch", None)
    if batch not in BATCH_KINDS:
        raise ValueError(f"probe {name!r}: batch must be one of {BATCH_KINDS}, got batch={batch!r}")
    flags = {flag: getattr(cls, flag) for flag in ("reads_batch", "per_head", "needs_loss", "reads_repeats")}
    not_bools = {flag: value for flag, value in flags.items() if not isinstance(value, bool)}
    if not_bools:  # a "no" or 0 read as truth decides what is drawn, forwarded and logged (reads_batch="no" read a batch)
        raise ValueError(f"probe {name!r}: {', '.join(not_bools)} must be True or False, got "
                         f"{', '.join(f'{flag}={value!r}' for flag, value in not_bools.items())}")
    span = cls.heatmap_range
    if not (isinstance(span, tuple) and len(span) == 2
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in span)
            and span[0] < span[1]):
        raise ValueError(f"probe {name!r}: heatmap_range must be a tuple (low, high) of finite numbers with "
                         f"low < high, got heatmap_range={span!r}")
    existing = PROBES.get(name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise ValueError(
            f"probe name={name!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}"
        )
    PROBES[name] = cls
    return cls


def unregister_probe(name: str | type[Probe]) -> None:
    """Removes the probe registered as ``name`` (if any), e.g. a notebook's earlier version of it, or the
    probe class given (under its ``name``: a class registered there by another is kept, with a ``ValueError``).

    Raises:
        TypeError: for anything but a string or a `Probe` subclass (a class passed before was taken
            as a name that nothing is registered under, and nothing was removed).
    """
    if isinstance(name, str):
        PROBES.pop(name, None)
        return
    if not (isinstance(name, type) and issubclass(name, Probe)):
        raise TypeError(f"unregister_probe takes a probe's name or class, got {name!r}")
    key = getattr(name, "name", None)
    if not isinstance(key, str) or (existing := PROBES.get(key)) is None:
        return
    if (existing.__module__, existing.__qualname__) != (name.__module__, name.__qualname__):  # or defined again
        raise ValueError(f"the probe named {key!r} was registered by {existing.__qualname__}, not "
                         f"{name.__qualname__}; pass the name to remove it")
    del PROBES[key]


def available_probes() -> list[str]:
    """The names of all registered probes, sorted."""
    return sorted(PROBES)


def make_probe(name: str, **options: object) -> Probe:
    """Build a registered probe by name.

    Args:
        name: A key of `PROBES`, e.g. ``"induction"``.
        **options: Passed to the probe's ``__init__`` (e.g. ``max_positions=32`` for the logit
            lens); the probe validates them.

    Returns:
        A fresh probe instance.

    Raises:
        ValueError: If ``name`` is not registered, or an option is invalid.
        TypeError: If the probe does not take one of the options.
    """
    cls = PROBES.get(name)
    if cls is None:
        raise ValueError(f"unknown probe name={name!r}; available: {available_probes()}")
    factory: Callable[..., Probe] = cls
    try:
        return factory(**options)
    except TypeError as err:  # an option the probe does not take: name the probe and what it takes
        accepted = [n for n in inspect.signature(cls).parameters if n not in ("self", "args", "kwargs")]
        raise TypeError(f"probe_options[{name!r}]: {err}; {cls.__name__} takes {accepted or 'no options'}") from err
    except ValueError as err:
        raise ValueError(f"probe_options[{name!r}]: {err}") from err
