"""``LensCallback``: probes the live model at chosen optimizer steps and logs what it sees.

At a probe step the callback refreshes a persistent ``HookedTransformer`` in place from the live
weights (the converter's views copied into pre-allocated parameters, no re-construction), runs the
enabled probes with one forward per probe batch, moves all results to the host in one transfer,
logs ``lens/...`` scalars, heatmaps and events, and optionally writes a snapshot.

It is an observer: it reads the live model's ``state_dict`` (and, once at train start, the parity
check calls the model on perturbed copies of its weights, putting back its modules' attributes and
training flags), draws from no global
RNG (probe inputs come from a private generator), runs its forward on its own ``HookedTransformer``
under ``no_grad`` with autocast off, and issues no collective that other ranks do not issue too.
A failure inside a probe step is counted (``lens/errors``) and warned once per kind; it stops
training only with ``strict=True``.
"""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import contextlib
import copy
import functools
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, NamedTuple, Sequence, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from transformer_lens import HookedTransformer, HookedTransformerConfig
from typing_extensions import override

from lens_callback.convert import (
    ConversionError,
    Converter,
    WeightCopier,
    available_converters,
    build_hooked_transformer,
    effective_state_dict,
    get_converter,
    infer_converter,
    strip_prefixes,
    unwrap_module,
)
from lens_callback.convert.base import (  # noqa: F401 - dense_cover, weights_finite: the callback's API as before
    NotLogitsError,
    are_logits_for,
    check_runs,
    checked_conversion,
    dense_cover,
    describe_output,
    finite_flag,
    global_rngs_kept,
    holds_parametrized_originals,
    source_logits_call,
    unknown_converter_message,
    weights_finite,
    without_extra_state,
    without_wrapper_names,
)
from lens_callback.convert.parity import (
    PARITY_FEW_TOKENS,
    PARITY_RTOL,
    PARITY_RTOL_LOW_PRECISION,
    HalfPrecisionOutputs,
    compared_logits,
    full_float32_matmuls,
    parity_noise,
    parity_tokens,
    perturbed,
    runs_on_a_few_tokens,
    unmasked_logits,
    unmasked_message,
)
from lens_callback.events import Event, EventDetector, Rule, SteepestRiseRule, ThresholdRule, rule_from_dict
from lens_callback.fileio import atomic_write, make_dirs, new_temp_dir
from lens_callback.measure import DEFAULT_PROBES, Measurement, build_runner, measure
from lens_callback.metrics import RUN_ID_TAG
from lens_callback.probes import ProbeInputs, make_probe_inputs, pack_attention_weights, verify_lean_attention
from lens_callback.probes.attention import has_hooks
from lens_callback.probes.inputs import check_probe_tokens
from lens_callback.probes.base import error_text
from lens_callback.probes.runner import raised_at
from lens_callback.schedule import ProbeSchedule, check_token_min_frequency, integer_or_none, step_list
from lens_callback.snapshots import (
    TMP_PREFIX,
    SnapshotError,
    SnapshotPruneError,
    check_step,
    is_runs_snapshot,
    json_change,
    list_snapshots,
    probe_inputs_sha256,
    prune_snapshots,
    read_snapshot_config,
    save_probe_inputs,
    save_snapshot,
    snapshot_dirname,
    snapshot_json,
)
from lens_callback.sinks import custom_scalars_layout, heatmap_png, heatmap_tag, wandb_media, write_summary
from lens_callback.tokenizer import TOKENIZER_KEY, check_tokenizer_spec, datamodule_tokenizer_spec

FAULT_KINDS = ("probe", "nonfinite", "log", "snapshot")
_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy")
"""Strategies whose ranks each hold a shard of the weights: every rank takes part in gathering them."""

_LIGHTNING_HOMES = {"BatchSizeFinder": "callbacks", "LearningRateFinder": "callbacks", "CSVLogger": "loggers",
                    "TensorBoardLogger": "loggers", "DummyLogger": "loggers.logger", "FSDPStrategy": "strategies",
                    "ModelParallelStrategy": "strategies", "LightningModule": "core", "WandbLogger": "loggers"}
"""Where `_lightning_classes` finds each class, under ``lightning.pytorch`` and ``pytorch_lightning``."""


def _lightning_classes(*names: str) -> tuple[type, ...]:
    """Lightning's classes ``names`` as ``lightning.pytorch`` has them and, where the standalone
    ``pytorch_lightning`` package is imported, as it has them. Lightning ships one code base under both
    names, as two sets of classes; a ``pytorch_lightning.Trainer`` calls this callback's hooks (it checks
    no callback's class) and hands it loggers, strategies and callbacks of its own package, which an
    ``isinstance`` against ``lightning.pytorch``'s classes alone missed: its TensorBoardLogger got no
    heatmaps, no chart layout and no event text. A Trainer of a package not imported cannot exist, so
    it is not imported here."""
    return _classes_of(names, "pytorch_lightning" in sys.modules)


@functools.cache
def _classes_of(names: tuple[str, ...], standalone: bool) -> tuple[type, ...]:
    classes = [getattr(importlib.import_module(f"lightning.pytorch.{_LIGHTNING_HOMES[name]}"), name) for name in names]
    if standalone:  # lightning requires pytorch-lightning without a version: an older one lacks newer classes
        # (ModelParallelStrategy came in 2.3), which its Trainer then cannot hand the callback either; before,
        # their absence raised in every fit's start once the package was imported, a lightning.Trainer's too
        classes += [cls for name in names if (cls := getattr(importlib.import_module(
            f"pytorch_lightning.{_LIGHTNING_HOMES[name]}"), name, None)) is not None]
    return tuple(classes)


_GATHER = object()
"""`LensCallback._maybe_probe`'s default: gather the weights there."""

log = logging.getLogger(__name__)


def _is_sharded(trainer: L.Trainer) -> bool:
    return isinstance(trainer.strategy, _lightning_classes(*_SHARDED_STRATEGIES))


PARITY_SEED_OFFSET = 3
"""The parity check is seeded ``seed + 3``, apart from the probe inputs' ``seed``: its tokens and noise
are `parity_tokens` and `parity_noise` of it, which `check_parity` with ``seed=seed + 3`` draws too."""

INPUT_SETTINGS = ("repeat_length", "repeat_batch", "text_len", "text_batch", "seed", "token_min_frequency")
"""The settings (`LensCallback.probe_settings`) that decide the probe inputs drawn from the data."""


class _NotLogits(Exception):
    """``model(tokens)`` returned something else than ``[batch, positions, d_vocab_out]`` logits."""


class _SourceLogits(nn.Module):
    """``converter.source_logits(model, tokens)`` as a module's forward, so that `torch.func.functional_call`
    runs it on the parity check's weights (under ``model.``)."""

    def __init__(self, model: nn.Module, converter: Converter) -> None:
        super().__init__()
        self.model = model
        self.converter = converter

    @override
    def forward(self, tokens: Tensor) -> Tensor:
        return self.converter.source_logits(self.model, tokens)


class _ParityOutcome(NamedTuple):
    """One comparison of `LensCallback._check_parity`."""

    diff: float  # max |difference| of the logits
    scale: float  # largest |logit| of the model's
    rtol: float  # the tolerance, a fraction of ``scale``
    caveats: list[str]  # how the check_parity call its error names differs from this comparison
    length: int  # tokens per sequence run
    unmasked: int  # entries the model masks that the converted model does not (`unmasked_logits`)

    @property
    def agrees(self) -> bool:
        return self.diff <= self.rtol * self.scale and not self.unmasked


def _draws_a_batch(inputs: ProbeInputs) -> bool:
    """Whether ``inputs`` hold a probe batch: none where every enabled probe reads the weights only."""
    return inputs.repeated is not None or inputs.text is not None


def _inputs_by_batch(record: Any) -> dict[str, tuple[Any, Mapping[str, Any]]]:
    """A probe-inputs record (`LensCallback._record_inputs`, as a checkpoint keeps it) per batch kind: the batch's
    digest and the settings that drew it. A record without ``batch_settings`` (checkpoints before the forty-second
    session) drew every batch it names with its one ``settings``; a record that is not one reads as none."""
    if not isinstance(record, Mapping) or not isinstance(record.get("batches"), Mapping):
        return {}
    settings, batch_settings = record.get("settings"), record.get("batch_settings")
    common: Mapping[str, Any] = settings if isinstance(settings, Mapping) else {}
    own: Mapping[str, Any] = batch_settings if isinstance(batch_settings, Mapping) else {}
    return {name: (digest, drawn if isinstance(drawn := own.get(name), Mapping) else common)
            for name, digest in record["batches"].items()}


class _TooLong(Exception):
    """``model(tokens)`` fails on the parity check's sequences but runs on a few tokens."""


def _raised_on_every_rank(trainer: L.Trainer, work: Callable[[], None], *, every_rank_works: bool = False) -> None:
    """Runs ``work`` on rank 0 (``every_rank_works``: on every rank). With several processes, what it
    raises on rank 0 is broadcast (its type's name and message) and raised on every rank, so that no
    rank goes on to wait in a collective for rank 0: the original exception on rank 0, one of the same
    name (`ConversionError`, ``ValueError``, ``TypeError``, `LensError` with its ``kind``; otherwise
    ``RuntimeError`` naming it) on the others. One small broadcast, which every rank reaches at the
    same hook."""
    if trainer.world_size <= 1:
        if trainer.is_global_zero:
            work()
        return
    problem: tuple[str, str, str | None] | None = None
    error: Exception | None = None
    if trainer.is_global_zero or every_rank_works:
        try:
            work()
        except Exception as err:  # noqa: BLE001 - re-raised below, here and on every other rank
            error = err
            if trainer.is_global_zero:
                problem = (type(err).__name__, str(err), getattr(err, "kind", None))
    problem = trainer.strategy.broadcast(problem, src=0)
    if error is not None:
        raise error
    if problem is not None:
        kinds = {cls.__name__: cls for cls in (ConversionError, ValueError, TypeError, LensError)}
        name, message, kind = problem
        raised = kinds[name](message) if name in kinds else RuntimeError(f"rank 0 raised {name}: {message}")
        if isinstance(raised, LensError):
            raised.kind = kind
        raise raised


def _integer_setting(name: str, value: Any, what: str, minimum: int, limit: int | None = None) -> int:
    """``value`` as a plain int in ``[minimum, limit)``, a numpy integer too (`integer_or_none`: not a bool,
    nor 2.0), else a ValueError saying that ``name`` must be ``what``. Plain: the settings go to the state
    key, checkpoints and snapshots' JSON."""
    number = integer_or_none(value)
    if number is None or number < minimum or (limit is not None and number >= limit):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def min_token_count(fraction: float, n: int) -> int:
    """The fewest occurrences in ``n`` tokens that make up at least ``fraction`` of them (at least 1), in
    exact arithmetic on ``fraction`` as written in decimal: in floats ``0.07 * 100`` is
    7.000000000000001, whose ceiling left out a token making up exactly 7 % (probes review)."""
    return max(1, math.ceil(Fraction(repr(float(fraction))) * n))


def fallback_pool_size(text_len: int) -> int:
    """The length of the random token stream probe inputs are drawn from without data: it depends on
    ``text_len`` only past 1,024 (post hoc, a snapshot's repeated batch depends on it only there)."""
    return max(4096, 4 * text_len)


def _max_steps(trainer: L.Trainer) -> int | None:
    """The fit's ``max_steps``, or ``None`` when it sets none (-1: ``max_epochs`` or ``max_time`` decide)."""
    return trainer.max_steps if isinstance(trainer.max_steps, int) and trainer.max_steps >= 0 else None


def _past_max_steps(pl_module: L.LightningModule) -> str:
    """The caveat of a warning about steps a fit does not reach: under manual optimization a batch that
    steps several optimizers moves ``global_step`` by several, and may pass ``max_steps`` onto one."""
    return ("" if pl_module.automatic_optimization else
            " (unless a batch moves global_step past max_steps onto one: manual optimization with several "
            "optimizer steps per batch)")


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says memory ran out (a GPU's ``OutOfMemoryError``, or the CPU allocator's
    ``RuntimeError``): a passing condition, not a fault of the code or its input."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or any(
        words in str(err) for words in ("out of memory", "can't allocate memory", "not enough memory",
                                        "DefaultCPUAllocator"))


def _spawns_processes(trainer: L.Trainer) -> bool:
    """Whether the fit runs in processes the strategy spawns (``ddp_spawn``, ``ddp_notebook``): they
    return the model's weights to the caller, not the callbacks' attributes."""
    launcher = getattr(trainer.strategy, "launcher", None)
    return type(launcher).__name__ == "_MultiProcessingLauncher"


class _ModuleAttributes:
    """Every module's own attributes (its ``__dict__`` but the parameter, buffer and submodule
    registries), to put back after the parity check's forward: ``training``, and whatever the
    forward sets, e.g. a cache's bookkeeping beside its buffers (nanoGPT's ``rotary_precision``),
    which would otherwise change what the first training step computes. Attributes the forward adds
    are removed; a value changed in place (a list appended to) is not undone."""

    _REGISTRIES = frozenset({"_parameters", "_buffers", "_modules"})

    def __init__(self, model: nn.Module) -> None:
        self._saved = [(module, {k: v for k, v in vars(module).items() if k not in self._REGISTRIES})
                       for module in model.modules()]

    def restore(self) -> None:
        for module, saved in self._saved:
            attributes = vars(module)
            for key in [k for k in attributes if k not in saved and k not in self._REGISTRIES]:
                del attributes[key]
            for key, value in saved.items():
                if attributes.get(key, _MISSING) is not value:
                    attributes[key] = value


_MISSING = object()


class _GetterError(ValueError):
    """`LensCallback._at_model_attr`'s error for a property on ``model_attr``'s path whose getter raised
    ``AttributeError`` (its ``__cause__``)."""


def _read_through_none(err: BaseException) -> bool:
    """Whether ``err`` is a `_GetterError` whose getter read an attribute of ``None`` (a module the
    LightningModule builds later): the interpreter's own lookup error, which names the attribute
    (``name``) and the object (``obj``); one raised by a ``raise`` statement (``get_submodule``'s too)
    names neither."""
    cause = err.__cause__
    return (isinstance(err, _GetterError) and isinstance(cause, AttributeError)
            and getattr(cause, "name", None) is not None and getattr(cause, "obj", 0) is None)


def _snapshot_family_of(trainer: L.Trainer, log_dir: Path) -> Path:
    """The absolute directory that the versions of ``log_dir``'s run share: the first logger's
    ``root_dir`` (``<save_dir>/<name>`` of a TensorBoard or CSV logger) when ``log_dir`` lies in it,
    else ``log_dir`` itself (no versions: a resume logs to the same directory)."""
    log_dir = log_dir.absolute()
    root = getattr(trainer.logger, "root_dir", None) if trainer.logger is not None else None
    if root:
        root = Path(root).absolute()
        if root in log_dir.parents:
            return root
    return log_dir


def _auto_snapshot_base(trainer: L.Trainer) -> tuple[Path, Path, Path | None]:
    """The directory ``snapshot_dir="auto"`` puts ``snapshots`` in, its `_snapshot_family_of`, and the
    directory earlier versions put them in where that differs, as rank 0 resolves them (a broadcast:
    call on every rank). A TensorBoard or CSV first logger: its ``log_dir`` (``sub_dir`` included); no
    logger: ``default_root_dir``. Another first logger (W&B, MLflow, Comet, Neptune, ...):
    ``<save_dir>/<name>/<version>``, where Lightning's ModelCheckpoint puts that run's ``checkpoints``,
    with ``<save_dir>/<name>`` as the family; before, it was ``trainer.log_dir``, such a logger's
    ``save_dir``, which every run shares: each run's snapshots replaced the last one's there (interop
    review). That ``save_dir`` is the third value: a run begun there continues there."""
    first = trainer.loggers[0] if trainer.loggers else None
    if first is None or isinstance(first, _lightning_classes("TensorBoardLogger", "CSVLogger")):
        base = Path(trainer.log_dir or trainer.default_root_dir)
        return base, _snapshot_family_of(trainer, base), None
    resolved: tuple[str, str, str] | None = None
    if trainer.is_global_zero:  # another rank's W&B logger has no run, so no version
        save_dir = Path(first.save_dir if first.save_dir is not None else trainer.default_root_dir).absolute()
        version = first.version if isinstance(first.version, str) else f"version_{first.version}"
        family = save_dir / str(first.name)
        resolved = (str(family / version), str(family), str(save_dir))
    if trainer.world_size > 1:
        resolved = trainer.strategy.broadcast(resolved, src=0)
    assert resolved is not None
    return Path(resolved[0]), Path(resolved[1]), Path(resolved[2])


def _legacy_run_id(state: Mapping[str, Any]) -> str:
    """The run id of a checkpoint state written before run ids were: a digest of the state, the same for
    every resume from that checkpoint."""
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _real_loggers(trainer: L.Trainer) -> list[Logger]:
    """The trainer's loggers; ``fast_dev_run`` puts a DummyLogger in place of the user's: nothing is
    logged there, nothing to warn about."""
    return [lg for lg in trainer.loggers if not isinstance(lg, _lightning_classes("DummyLogger"))]


def _tag_prefix(logger: TensorBoardLogger) -> str:
    """What Lightning's ``TensorBoardLogger.log_metrics`` puts before every tag (its ``prefix``); the
    callback's own summaries carry it too."""
    return f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if getattr(logger, "_prefix", "") else ""


_NOT_FITTING = (TrainerFn.VALIDATING, TrainerFn.TESTING, TrainerFn.PREDICTING)
"""Stages that restore the callbacks from a ``ckpt_path`` but must not take their state (`on_load_checkpoint`)."""


def _is_token_array(data: Any) -> bool:
    """Whether ``data`` is token ids the probe inputs can be drawn from: a 1-D tensor or array."""
    return isinstance(data, (Tensor, np.ndarray)) and data.ndim == 1


class LensError(RuntimeError):
    """A probe-step failure re-raised in ``strict`` mode. ``kind`` says what failed: ``"probe"``,
    ``"nonfinite"``, ``"log"`` or ``"snapshot"`` (the keys of ``LensCallback.errors``)."""

    kind: str | None = None


_PER_HEAD_TAG = re.compile(r"/L\d+H\d+$")  # a per-head scalar's tag (`scalar_tags`), e.g. lens/induction/L1H0


def _rule_from_setting(index: int, rule: Any) -> Rule:
    """``event_rules[index]``: a rule object as it is, a dict through `rule_from_dict`; errors name it."""
    if isinstance(rule, (ThresholdRule, SteepestRiseRule)):
        return rule
    if not isinstance(rule, Mapping):
        raise ValueError(f"event_rules[{index}] must be a dict (kind, tag, ...) or a rule object, got {rule!r}")
    try:
        return rule_from_dict(rule)
    except (TypeError, ValueError) as err:
        raise ValueError(f"event_rules[{index}] ({dict(rule)!r}): {err}") from None


def _listed(name: str, value: Any, what: str) -> list[Any]:
    """``value`` as a list, if it is an iterable that is not a string or a mapping; else a ValueError naming ``name``."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return list(value)


def _training_stops_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether the fit loop ends after the current batch by ``max_steps``, or by ``max_epochs`` at
    the last batch of the last epoch (stops Lightning cannot foresee, e.g. early stopping, are not)."""
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs - 1
            and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch))


def _tunes_at_fit_start(trainer: L.Trainer) -> bool:
    """Whether a tuner callback (``LearningRateFinder``, ``BatchSizeFinder``) will run its search of
    training steps in ``on_fit_start``, where Lightning calls it before every other callback."""
    tuners = _lightning_classes("BatchSizeFinder", "LearningRateFinder")
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # Lightning's Trainer sets it unannotated
    return any(isinstance(cb, tuners) for cb in callbacks)


def _builds_model_later(pl_module: nn.Module) -> bool:
    """Whether ``pl_module`` overrides a hook that Lightning calls after the callbacks' ``setup``."""
    base = next((cls for cls in _lightning_classes("LightningModule") if isinstance(pl_module, cls)), L.LightningModule)
    return any(getattr(type(pl_module), hook, None) is not getattr(base, hook, None)
               for hook in ("setup", "configure_model", "configure_sharded_model"))


class LensCallback(Callback):
    """Watches mechanistic-interpretability signals form while a model trains.

    Args:
        probes: Enabled probes by name (see ``lens_callback.probes.available_probes()``), or one name.
        probe_options: Per-probe constructor options, e.g. ``{"logit_lens": {"max_positions": 32}}``.
        every_n_steps: Probe every this many optimizer steps (``None`` for no fixed cadence).
        steps: Explicit optimizer steps to probe as well.
        log_spaced: Also probe at steps 1, 2, 4, 8, ... (early phase changes).
        at_start: Probe the initial model (step 0) when training starts from scratch.
        at_end: Probe the final model when fit ends.
        repeat_length: ``L`` of the repeated random sequences (``[repeat_batch, 2L]`` tokens).
            Not tied to the context length: see the README on positional heads.
        repeat_batch: Number of repeated sequences.
        text_len: Tokens per window of held-out text (``None``: the model's context, at most 256).
        text_batch: Number of held-out text windows.
        seed: Seed of the private generator that draws the probe inputs (same inputs every step).
        token_min_frequency: Tokens making up at least this fraction of the training data form the
            pool the repeated sequences are drawn from. Tokens the model has (almost) never seen
            have untrained embeddings and dilute every attention score: in the stdlib corpus 66 of
            162 distinct bytes occur fewer than 100 times in 4.7 M. ``0`` admits every token that occurs.
        model_attr: Attribute of the LightningModule holding the model (``"model"`` by
            convention; dotted paths allowed; ``""`` means the LightningModule itself).
        converter: Registered converter name (or a `Converter` instance; with snapshots on, the
            instance registered under its name or one of its class or a subclass (e.g. overriding
            ``source_logits`` only) that converts the model alike, checked
            in `validate`, as snapshots reload by name);
            inferred from the model when ``None``.
        per_head_scalars: Log ``lens/{probe}/L{l}H{h}`` for every head (switch off for big models).
        heatmaps: Log one ``[layers x heads]`` image per per-head probe and probe step.
        custom_scalars: Write a layout for TensorBoard's Custom Scalars tab grouping the probes' scalars,
            with the first probe step. TensorBoard shows one layout per run: switch it off when your
            own code writes a layout (``SummaryWriter.add_custom_scalars``) to the same run.
        snapshot_dir: Where snapshots go; the string ``"auto"`` is ``<log_dir>/snapshots`` (a TensorBoard
            or CSV first logger's ``log_dir``, another first logger's ``<save_dir>/<name>/<version>``
            as for its checkpoints, else ``default_root_dir``; a path object, ``Path("auto")``, is a
            directory of that name); ``None`` disables.
        snapshot_every: Snapshot every k-th probe step (1 = every probe step).
        snapshot_steps: Also snapshot at these optimizer steps (when they are probed; a step that
            ``global_step`` jumps over, e.g. with several optimizers, at the probe step that passed it).
        max_snapshots: Keep at most this many of the run's snapshots; also kept: those around events,
            and those an event not yet detected may need (from each steepest-rise rule's reference on,
            and the one before it); ``None``: all.
        events: Detect circuit-formation events.
        event_rules: The rules, as dicts (``{"kind": "threshold", "tag": ..., "threshold": ...,
            "name": ...}`` or ``{"kind": "steepest_rise", "tag": ..., "name": ..., "min_rise": ...,
            "window": ...}``) or rule objects (``ThresholdRule``, ``SteepestRiseRule``); ``None``
            uses ``lens_callback.default_rules()``.
        max_batch_tokens: Forward at most this many tokens at once during a probe step; ``None``
            sizes chunks by one layer's attention pattern (16 MiB on CPU, 256 MiB elsewhere; see
            ``lens_callback.probes.runner.rows_per_chunk``).
        lean_attention: Run attention through ``lens_callback.probes.attention.lean_attention``:
            TransformerLens's numbers in fewer passes over memory. Checked against
            TransformerLens's own forward when the model is attached; a mismatch there, or a
            probe step that fails with it but not without, warns once and falls back for the
            rest of the run. ``False``: TransformerLens's attention code throughout.
        cuda_graphs: Opt-in, experimental: on a CUDA device, record the probe run as a CUDA
            graph at the first probe step and replay it afterwards (same numbers, one launch
            instead of thousands; see ``lens_callback.probes.graphs``). The graph keeps the probe
            run's activation memory between probe steps. If capture fails, the run stays eager
            with one warning. Ignored on other devices. Its GPU tests (``tests/test_graphs.py``,
            marker ``gpu``) passed on an H200; off by default, since it holds that memory and pays
            off mostly for small, host-bound models (README, Performance).
        parity_check: At train start (``attach``), compare the converted model's logits with the live
            model's (``model(tokens)``, eval mode, no grad, the RNG state restored) on two random
            sequences, with perturbed weights and then with its own, and raise ``ConversionError``
            if they differ by more than 1e-3 of the largest logit (5e-2 in half precision): keys and shapes
            can all match while a converter computes another function. A model that cannot be
            called as ``model(tokens)`` is not checked (one warning). Off: ``False``.
        strict: Re-raise probe-step failures (as `LensError`) instead of counting and warning. A
            failure at the last step is raised from ``on_train_end``, after ``ModelCheckpoint``
            (which Lightning runs after every other callback) has saved the final weights. With
            several processes each probe step then runs inside one small broadcast, so that rank 0's
            failure is raised on every rank.

    Raises:
        ValueError: for invalid settings, naming the field and the accepted values.
        TypeError: for probe options a probe does not take (``probe_options['induction']: ...``).
    """

    def __init__(
        self,
        probes: Sequence[str] | str = DEFAULT_PROBES,
        probe_options: Mapping[str, Mapping[str, Any]] | None = None,
        every_n_steps: int | None = 100,
        steps: Sequence[int] | None = (),
        log_spaced: bool = True,
        at_start: bool = True,
        at_end: bool = True,
        repeat_length: int = 32,
        repeat_batch: int = 16,
        text_len: int | None = None,
        text_batch: int = 8,
        seed: int = 0,
        token_min_frequency: float = 1e-4,
        model_attr: str = "model",
        converter: str | Converter | None = None,
        per_head_scalars: bool = True,
        heatmaps: bool = True,
        custom_scalars: bool = True,
        snapshot_dir: str | None = None,
        snapshot_every: int = 1,
        snapshot_steps: Sequence[int] | None = (),
        max_snapshots: int | None = None,
        events: bool = True,
        event_rules: Sequence[Mapping[str, Any] | Rule] | None = None,
        max_batch_tokens: int | None = None,
        lean_attention: bool = True,
        cuda_graphs: bool = False,
        strict: bool = False,
        parity_check: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(probes, str):
            probes = [probes]
        probes = _listed("probes", probes, "a probe name or a list of probe names")
        # lens-train's probes=a,b or probes+=a,b (lens-probe's --probes takes names so) is one name: say how to list
        joined = next((name for name in probes if isinstance(name, str) and "," in name), None)
        if joined is not None:
            names = [part.strip() for name in probes for part in str(name).split(",") if part.strip()]
            raise ValueError(f"probes: {joined!r} is one name holding commas: give each probe as a name of its own, "
                             f"e.g. probes={names} (on the lens-train command line probes=[{','.join(names)}], or "
                             f"probes+=NAME once per probe)")
        if probe_options is not None and not isinstance(probe_options, Mapping):
            raise ValueError(f"probe_options must map probe names to their options, e.g. "
                             f"{{'logit_lens': {{'max_positions': 32}}}}, got {probe_options!r}")
        steps = _listed("steps", () if steps is None else steps, "a list of optimizer steps")
        snapshot_steps = _listed("snapshot_steps", () if snapshot_steps is None else snapshot_steps,
                                 "a list of optimizer steps")
        self.probes = list(probes)
        self.runner = build_runner(self.probes, probe_options)  # validates names and options
        self.probe_options = {k: dict(v) for k, v in (probe_options or {}).items()}
        if snapshot_dir is not None:  # every snapshot stores them, and lens-probe re-probes with what it reads back
            try:
                snapshot_json(self.probe_options, "probe_options")
            except ValueError as err:
                raise ValueError(f"{err} (e.g. int(n) for a numpy integer): snapshots store the probe options") from err
            if (change := json_change(self.probe_options, "probe_options")) is not None:
                raise ValueError(f"{change}: snapshots would be re-probed with other probe options than this run's "
                                 f"(pass lists and str keys)")
        self.schedule = ProbeSchedule(every_n_steps, tuple(steps), log_spaced, at_start, at_end)
        # numpy integers too (a sweep's np.arange), as every_n_steps and steps take them
        repeat_length, repeat_batch, text_batch, snapshot_every = (
            _integer_setting(name, value, f"an integer >= {minimum}", minimum)
            for name, value, minimum in (("repeat_length", repeat_length, 1), ("repeat_batch", repeat_batch, 0),
                                         ("text_batch", text_batch, 0), ("snapshot_every", snapshot_every, 1)))
        if text_len is not None:
            text_len = _integer_setting("text_len", text_len, "an integer >= 2 or None", 2)
        flags = {"log_spaced": log_spaced, "at_start": at_start, "at_end": at_end, "per_head_scalars": per_head_scalars,
                 "heatmaps": heatmaps, "custom_scalars": custom_scalars, "events": events,
                 "lean_attention": lean_attention, "cuda_graphs": cuda_graphs, "strict": strict,
                 "parity_check": parity_check}
        for name, value in flags.items():  # a YAML "no" or a string "false" must not switch a flag on
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        for name, count, batch in (("repeat_batch", repeat_batch, "repeated"), ("text_batch", text_batch, "text")):
            if count == 0 and batch in self.runner.needed_batches:
                users = [probe.name for probe in self.runner.probes if probe.reads_batch and probe.batch == batch]
                raise ValueError(f"{name} = 0 but the enabled probes {users} read the {batch} batch; "
                                 f"set {name} >= 1 or leave those probes out")
        check_probe_tokens(repeat_batch, 2 * repeat_length, text_batch, text_len or 2)
        seed = _integer_setting("seed", seed, "an integer in [0, 2**63)", 0, 2**63)
        if snapshot_dir is not None and (not isinstance(snapshot_dir, (str, os.PathLike)) or not str(snapshot_dir)):
            raise ValueError(f"snapshot_dir must be a directory path, 'auto' or None, got {snapshot_dir!r}")
        if max_snapshots is not None:
            max_snapshots = _integer_setting("max_snapshots", max_snapshots, "a positive integer or None", 1)
        if max_batch_tokens is not None:
            max_batch_tokens = _integer_setting("max_batch_tokens", max_batch_tokens, "a positive integer or None", 1)
        if isinstance(converter, type) and issubclass(converter, Converter):
            converter = get_converter(converter)  # the instance registered for the class (the decorator returns it)
        if isinstance(converter, Converter):
            registered = get_converter(converter.name) if converter.name in available_converters() else None
            # a subclass keeping the name (say one overriding source_logits only, for a forward returning an
            # object with .logits) may convert as the registered one does: `_check_reloads_alike` checks that
            # on the model before training, as it does another instance of the registered class
            if snapshot_dir is not None and (registered is None or not isinstance(converter, type(registered))):
                raise ValueError(
                    f"converter {converter!r} is not the one registered under {converter.name!r} "
                    f"({registered!r}): snapshots reload by the converter's name; register it with "
                    f"lens_callback.register_converter (under a name of its own), or set snapshot_dir=None")
        elif converter is not None and converter not in available_converters():
            raise ValueError(unknown_converter_message(converter))
        if not isinstance(model_attr, str):
            raise ValueError(f"model_attr must be a string attribute path, got {model_attr!r}")
        snapshot_steps = step_list("snapshot_steps", snapshot_steps)  # numpy integers too (e.g. from np.unique)
        if snapshot_dir is None:
            unused = [f"{name}={value!r}" for name, value, default in (
                ("snapshot_every", snapshot_every, 1), ("snapshot_steps", list(snapshot_steps), []),
                ("max_snapshots", max_snapshots, None)) if value != default]
            if unused:
                raise ValueError(f"{', '.join(unused)} given with snapshot_dir=None, which writes no snapshots: "
                                 f"set snapshot_dir (a directory or 'auto') or leave them out")
        self.repeat_length, self.repeat_batch = repeat_length, repeat_batch
        self.text_len, self.text_batch, self.seed = text_len, text_batch, seed
        self.token_min_frequency = check_token_min_frequency(token_min_frequency)
        self.model_attr, self.converter_name = model_attr, converter
        self.per_head_scalars, self.heatmaps, self.custom_scalars = per_head_scalars, heatmaps, custom_scalars
        # the string "auto" is the keyword; a path object is a path, also one to a directory named auto
        self.snapshot_dir = (None if snapshot_dir is None else snapshot_dir if isinstance(snapshot_dir, str)
                             else os.path.join(os.curdir, "auto") if str(snapshot_dir) == "auto" else str(snapshot_dir))
        self.snapshot_every = snapshot_every
        self.snapshot_steps = sorted(set(snapshot_steps))
        self.max_snapshots, self.max_batch_tokens, self.strict = max_snapshots, max_batch_tokens, strict
        self.lean_attention = self._lean = lean_attention
        self.cuda_graphs = cuda_graphs
        self.parity_check = parity_check
        if event_rules is not None and (isinstance(event_rules, (str, Mapping)) or not isinstance(event_rules, Sequence)):
            raise ValueError(f"event_rules must be a list of rules (dicts or rule objects), got {event_rules!r}")
        if event_rules is not None and not events:
            raise ValueError("event_rules given with events=False, which detects no events: set events=True "
                             "or leave event_rules out")
        rules = None if event_rules is None else [_rule_from_setting(i, rule) for i, rule in enumerate(event_rules)]
        names = [rule.name for rule in rules or []]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ValueError(f"event_rules[{index}] has the name {name!r} of event_rules[{names.index(name)}]: "
                                 f"rule names must be unique (they name the events and their tags)")
        self.detector = EventDetector(rules) if events else None
        self._user_rules = events and event_rules is not None  # their tags are checked once per run
        # what else tells two callbacks apart in `state_key`, where it differs from the default
        settings = dict(
            repeat_batch=repeat_batch, text_len=text_len, text_batch=text_batch,
            token_min_frequency=self.token_min_frequency, at_start=at_start, at_end=at_end,
            converter=converter.name if isinstance(converter, Converter) else converter,
            per_head_scalars=per_head_scalars, heatmaps=heatmaps, snapshot_every=snapshot_every,
            snapshot_steps=tuple(self.snapshot_steps), max_snapshots=max_snapshots, events=events,
            event_rules=None if rules is None else [rule.to_dict() for rule in rules],
        )
        defaults = inspect.signature(LensCallback.__init__).parameters
        self._key_settings = {name: value for name, value in settings.items() if value != defaults[name].default}

        self._new_run()
        self._converter: Converter | None = None
        self._validate_at_fit_start = False  # set by setup when the module may build or change the model after it
        self._snapshots_off = False  # set by setup for a fast_dev_run fit
        self._model_config: dict[str, Any] | None = None
        self._hooked: HookedTransformer | None = None
        self._copier: WeightCopier | None = None  # the private model's parameters, listed once
        self._inputs: ProbeInputs | None = None
        self._inputs_digest: str | None = None  # probe_inputs_sha256(self._inputs), made in attach
        self._inputs_record: dict[str, Any] | None = None  # `_record_inputs`, made in attach
        self._tokenizer_spec: dict[str, Any] | None = None  # how the ids map to text, for the snapshots (train start)
        self._text_len: int | None = None
        self._snapshot_root: Path | None = None

    def _new_run(self) -> None:
        """The state one run accumulates, empty: at construction and when a later ``fit`` starts from
        step 0 (a resumed run gets it back from the checkpoint, which Lightning restores after ``setup``)."""
        self._new_record()
        # runtime
        self.timings: list[float] = []
        self._warned: set[str] = set()
        self._layout_written = False
        self._run_id_logged = False  # in this fit's log (`_log`)
        self._restored_snapshot_root: str | None = None  # from a checkpoint (snapshot_dir="auto")
        # the logger directory ("auto") the snapshot root lies in, and the checkpoint's (`_continue_snapshots_in`)
        self._snapshot_family: Path | None = None
        self._shared_snapshot_base: Path | None = None  # `_auto_snapshot_base`'s third value
        self._restored_snapshot_family: str | None = None
        self._passed = (-1, 0)  # (previous, step]: the steps the last batch end (or train start) passed
        self._restored_passed: int | None = None  # `_passed`'s step in the checkpoint a fit resumes from
        self._passed_known = False  # `_passed` is this fit's (set at train start)
        self._outside_trainer = False  # attach() called by the user, not a Trainer's fit (`_resolve_converter`)
        self._fit_without_datamodule = False  # this fit has no datamodule (`_make_inputs` says where data come from)
        self._restoring_for_fit = True  # whether the checkpoint being restored is a fit's (`on_load_checkpoint`)
        self._restore_notes: list[tuple[str | None, str]] = []  # `_note_at_restore`
        self._state_restored = False  # this fit loaded a checkpoint's state: it continues a run, even at step 0

    def _new_record(self) -> None:
        """The run's record, empty, under a new run id: what a checkpoint keeps (`state_dict`), the
        results so far (``history``) and what depends on them."""
        # kept across resume (state_dict): primitives only
        self.probed_steps: list[int] = []
        self.snapshot_steps_written: list[int] = []
        self.errors: Counter[str] = Counter()
        self.run_id: str = uuid.uuid4().hex  # in every snapshot: which of a directory's snapshots are this run's
        self._restored_inputs: dict[str, Any] | None = None  # a checkpoint's `_kept_inputs_record`
        if self.detector is not None:
            self.detector = EventDetector(self.detector.rules)
        self.history: dict[int, dict[str, float]] = {}
        # the rule tags still to check against logged results: all of the user's at first (`_warn_unlogged_rule_tags`)
        self._check_rule_tags: list[str] = list(self.detector.tags) if self._user_rules and self.detector else []
        self._finished_step: int | None = None  # the step whose final probe and snapshot are done
        self._finish_error: LensError | None = None  # strict mode: a last-step fault, raised in on_train_end
        self._unfinished: tuple[int, int, bool] | None = None  # (passed from, step, final) of a cut-short probe step
        self._unconvertible_step: int | None = None  # the last probe step whose weights did not convert (no snapshot)
        self._earlier_fit_kept = False  # `setup`: this record is an earlier fit's of the same Trainer

    # -- identity and state --------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: the schedule, the probes and their options,
        the repeated batch's length and seed, ``model_attr`` and ``snapshot_dir``, and each other setting
        that changes what is measured or written where it differs from its default (so two callbacks of
        one Trainer that differ only there have two keys; execution choices such as ``strict`` or
        ``max_batch_tokens`` are left out). A resume with other settings: `on_load_checkpoint`."""
        return self._generate_state_key(**self._base_key_settings(), **self._key_settings)

    def _base_key_settings(self) -> dict[str, Any]:
        return dict(
            probes=tuple(self.probes), probe_options=self.probe_options, every_n_steps=self.schedule.every_n_steps,
            steps=self.schedule.steps, log_spaced=self.schedule.log_spaced, repeat_length=self.repeat_length,
            seed=self.seed, model_attr=self.model_attr, snapshot_dir=self.snapshot_dir,
        )

    @property
    def _base_state_key(self) -> str:
        """`state_key` as checkpoints before the sixteenth session's version wrote it (without the
        other settings): what `on_load_checkpoint` takes such a checkpoint's state under."""
        return self._generate_state_key(**self._base_key_settings())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probed_steps": list(self.probed_steps),
            "snapshot_steps_written": list(self.snapshot_steps_written),
            "errors": dict(self.errors),
            "run_id": self.run_id,
            "detector": self.detector.state_dict() if self.detector is not None else None,
            # where snapshot_dir="auto" resolved, so that a resumed run (a new logger version) continues there
            "snapshot_root": self._auto_snapshot_root(),
            # the logger directory it lies in (`<save_dir>/<name>`): a fit in another one is a branch, not a resume
            "snapshot_family": self._auto_snapshot_family(),
            # what a resumed run compares its own inputs with (`_compare_restored_inputs`)
            "probe_inputs": self._kept_inputs_record(),
            # a probe step cut short (`_maybe_probe`): the fit resumed from this checkpoint takes it again
            "unfinished": list(self._unfinished) if self._unfinished is not None else None,
            # the step the last batch end (or train start) reached: a fit resumed at a later step (its last
            # batch end's hooks cut short before this callback's) takes the due steps in between at train start
            # (before this fit's train start: the restored value, or none, not an earlier fit's)
            "passed_step": (self._restored_passed if self._restored_passed is not None
                            else self._passed[1] if self._passed_known else None),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fitting, self._restoring_for_fit = self._restoring_for_fit, True
        if not fitting:  # validate/test/predict(ckpt_path=...): the run's own state stays (`on_load_checkpoint`)
            return
        self.probed_steps = [int(s) for s in state_dict.get("probed_steps", [])]
        if self._earlier_fit_kept:  # this Trainer's earlier fit: its results past the checkpoint are another trajectory's
            self.history = {s: values for s, values in self.history.items() if s in set(self.probed_steps)}
            self._finished_step = self._unconvertible_step = None
        self.snapshot_steps_written = [int(s) for s in state_dict.get("snapshot_steps_written", [])]
        self.errors = Counter({str(k): int(v) for k, v in state_dict.get("errors", {}).items()})
        # a checkpoint from before run ids: this run's snapshots are those its list names (see _claim_snapshots);
        # its id is derived from the state, so that every resume from that checkpoint is one run (lens-report)
        self.run_id = str(state_dict.get("run_id") or _legacy_run_id(state_dict))
        detector_state = state_dict.get("detector")
        if self.detector is not None:
            # a rule new or changed since the checkpoint (or all, from a run with events off) sees only the steps
            # after it: the scalars before are in the logger, not in the checkpoint, so its event could be placed
            # at the first step after the resume, in events.json too, under "events carry on" (events review)
            afresh = (self.detector.load_state_dict(detector_state) if detector_state is not None
                      else [rule.name for rule in self.detector.rules])
            if afresh and self.probed_steps:
                self._note_at_restore(None, f"LensCallback: the event rules {afresh} are not the checkpoint's (new or "
                                            f"changed since, or events were off): they start afresh after step "
                                            f"{self.probed_steps[-1]}, so an event of theirs before it is missed or "
                                            f"found late; lens_callback.events.detect_events on the logged scalars "
                                            f"(read_metrics) sees every step")
        self._restored_snapshot_root = state_dict.get("snapshot_root")
        self._restored_snapshot_family = state_dict.get("snapshot_family")  # absent before the 33rd session
        self._restored_inputs = state_dict.get("probe_inputs")
        unfinished = state_dict.get("unfinished")
        self._unfinished = (int(unfinished[0]), int(unfinished[1]), bool(unfinished[2])) if unfinished else None
        passed = state_dict.get("passed_step")  # absent from checkpoints before the twenty-seventh session
        self._restored_passed = None if passed is None else int(passed)
        self._state_restored = True
        self._continue_snapshots_in(self._restored_snapshot_root)

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A run resumed with other settings (e.g. a new ``every_n_steps``) has another ``state_key``,
        and Lightning would leave its state (probed steps, snapshots written, events) behind. When
        the checkpoint holds exactly one LensCallback state that no callback of this trainer claims,
        and this is the only LensCallback without a state of its own, that state is this one's.

        Only a fit takes the checkpoint's state: ``validate``, ``test`` or ``predict`` with a
        ``ckpt_path`` restores the callbacks too, and would put the run's record (probed steps,
        snapshots written, errors, events) back to that checkpoint's under a fit to come."""
        stage = getattr(getattr(trainer, "state", None), "fn", None)
        self._restoring_for_fit = stage not in _NOT_FITTING  # read by load_state_dict, next
        if not self._restoring_for_fit:
            return
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # Lightning's load_state_dict follows
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # Lightning's Trainer sets it unannotated
        lens = [callback for callback in callbacks if isinstance(callback, LensCallback)]
        current = {callback.state_key for callback in callbacks}
        claimed = current | {cb._base_state_key for cb in lens}
        base = self._base_state_key
        if base in states and base not in current:
            # written before the key held the other settings: the same settings' state, taken as it is
            states[self.state_key] = states.pop(base)  # Lightning's load_state_dict follows
            return
        prefix = f"{type(self).__qualname__}{{"
        orphans = [key for key in states if isinstance(key, str) and key.startswith(prefix) and key not in claimed]
        unmatched = [cb for cb in lens if cb.state_key not in states and cb._base_state_key not in states]
        if len(orphans) == 1 and unmatched == [self]:
            self.load_state_dict(copy.deepcopy(states[orphans[0]]))
            self._note_at_restore(None, f"LensCallback: the checkpoint's LensCallback had other settings ({orphans[0]}); "
                                        f"its state (probed steps, snapshots written, events) carries on under the new ones")
            return
        if orphans:
            self._note_at_restore(None, f"LensCallback: the checkpoint holds LensCallback states no callback of this "
                                        f"Trainer takes ({orphans}); this one starts without one (no probed steps, "
                                        f"snapshots written or events carried over)")

    def _auto_snapshot_root(self) -> str | None:
        """The absolute directory ``snapshot_dir="auto"`` resolved to (or was restored as), else ``None``."""
        if self.snapshot_dir != "auto":
            return None
        if self._snapshot_root is not None:
            return str(self._snapshot_root.absolute())
        return self._restored_snapshot_root

    def _auto_snapshot_family(self) -> str | None:
        """The absolute logger directory (`_snapshot_family_of`) that root lies in, else ``None``."""
        if self.snapshot_dir != "auto":
            return None
        if self._snapshot_root is not None and self._snapshot_family is not None:
            return str(self._snapshot_family)
        return self._restored_snapshot_family

    def _continue_snapshots_in(self, saved_root: str | None) -> None:
        """On resume with ``snapshot_dir="auto"``: the run's snapshots stay in the directory they
        started in, not in the new logger version's (``setup`` made that one; it goes if empty).

        Only a fit logging to the same logger directory (``<save_dir>/<name>``: the run's next version)
        continues there. A fit logging elsewhere branches from the checkpoint (other data, other
        settings) or resumes a copy of the run: followed to the run's directory, it replaced the run's
        snapshots past the checkpoint, and its events.json, with its own under the same run id
        (snapshots review). It writes to its own ``<log_dir>/snapshots`` instead, which for a copy
        resumed into the copied version is the copy's.
        """
        if self.snapshot_dir != "auto" or saved_root is None or self._snapshot_root is None:
            return  # a given directory is used as given; only rank 0 has a snapshot root
        saved, new = Path(saved_root), self._snapshot_root.absolute()
        if saved == new:
            return
        saved_family, family = self._restored_snapshot_family, self._snapshot_family
        shared = self._shared_snapshot_base
        if family is None:  # not resolved by setup (a hand-made state): as before families were saved
            same_run = True
        elif shared is not None and saved == shared / "snapshots":
            # begun before the 34th session under a logger such as W&B, whose runs all wrote to its
            # save_dir's snapshots then (run ids tell them apart): the run continues there (diff review)
            same_run = True
        elif saved_family is None:
            # a checkpoint from before the family was saved: the run's next version lies in the same logger
            # directory (`<family>/version_k[/sub_dir]/snapshots`); without versions the family is the log dir
            same_run = family != new.parent and family in saved.parents
        else:
            same_run = Path(saved_family) == family
        if not same_run:
            self._note_at_restore("snapshot-root", f"LensCallback: the checkpoint's run wrote its snapshots to {saved}; "
                                                   f"this fit logs to another directory ({new.parent}): a branch from "
                                                   f"the checkpoint or a copy of the run, so its snapshots go to {new} "
                                                   f"and those in {saved} are left as they are (snapshot_dir=<a "
                                                   f"directory> chooses another)")
            return
        if not saved.is_dir():
            self._note_at_restore("snapshot-root", f"LensCallback: the resumed run's snapshots were in {saved}, which "
                                                   f"does not exist here; they continue in {self._snapshot_root}")
            return
        with contextlib.suppress(OSError):
            self._snapshot_root.rmdir()  # only if empty
        self._snapshot_root = saved

    # -- locating and converting the model -------------------------------------------------------
    def _at_model_attr(self, pl_module: nn.Module) -> tuple[Any, str | None, str]:
        """``(pl_module.<model_attr>, None, path)``, or ``(the object lacking it, the first missing
        attribute, that object's path)``.

        Raises:
            ValueError: A property (or another attribute its class defines) on the path raised
                ``AttributeError``: the attribute exists and the error is the getter's own, which
                ``hasattr`` would have reported as a missing attribute of the wrong object.
        """
        obj: Any = pl_module
        path = type(pl_module).__name__
        for part in self.model_attr.split(".") if self.model_attr else ():
            try:
                value = getattr(obj, part)
            except AttributeError as err:
                defined = inspect.getattr_static(type(obj), part, _MISSING)
                if defined is _MISSING:
                    return obj, part, path
                # nn.Module.__getattr__ replaces the getter's error with "no attribute": run the getter for it
                getter = getattr(defined, "__get__", None)
                try:
                    if getter is not None:
                        getter(obj, type(obj))
                except AttributeError as own:
                    err = own
                raise _GetterError(f"LensCallback looked for the model at {type(pl_module).__name__}.{self.model_attr}: "
                                   f"reading {path}.{part}, which {type(obj).__name__} defines (a property?), "
                                   f"raised AttributeError: {err}") from err
            obj, path = value, f"{path}.{part}"
        return obj, None, path

    def find_model(self, pl_module: nn.Module) -> nn.Module:
        """The model the callback probes: ``pl_module.<model_attr>`` (wrappers removed)."""
        obj, missing, path = self._at_model_attr(pl_module)
        if missing is not None and obj is None:  # a module on the path not built
            raise ValueError(
                f"LensCallback looked for the model at {type(pl_module).__name__}.{self.model_attr} but {path} is "
                f"None (if your module builds it in configure_model or setup, assign it there); set model_attr "
                f"to the attribute holding your model ('' for the LightningModule itself)")
        if missing is not None:
            raise ValueError(
                f"LensCallback looked for the model at {type(pl_module).__name__}.{self.model_attr} "
                f"but {path} has no attribute {missing!r}; set model_attr to the attribute holding your "
                f"model ('' for the LightningModule itself)"
            )
        if not isinstance(obj, nn.Module):
            later = (" (if your module builds it in configure_model or setup, assign it there)" if obj is None else "")
            raise ValueError(f"{type(pl_module).__name__}.{self.model_attr} is a {type(obj).__name__}, not an "
                             f"nn.Module{later}; set model_attr to the attribute holding your model ('' for the "
                             f"LightningModule itself)")
        return unwrap_module(obj)

    def _resolve_converter(self, model: nn.Module) -> Converter:
        if self.converter_name is not None:
            return get_converter(self.converter_name)
        try:
            return infer_converter(model)
        except ValueError as err:
            if self._outside_trainer:  # attach(model) takes the model as given
                raise ValueError(f"{err}; or, if the model sits inside a wrapper (a LightningModule), pass the "
                                 f"model itself to attach (model_attr is read in a Trainer's fit only)") from None
            raise ValueError(f"{err}; or, if the model sits inside a wrapper, point model_attr at it "
                             f"(now {self.model_attr!r}, dotted paths allowed)") from None

    def _live_state_dict(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The live weights of ``pl_module.<model_attr>``, as it computes with them (`effective_state_dict`,
        `strip_prefixes`: parametrized and pruned weights under their own names; under sharding the pruned
        ones only). Under sharded strategies every rank takes part in the gather, which runs on the
        strategy's root module (FSDP's wrapper, or the LightningModule under ModelParallel): gathering on
        a submodule before the root's first forward marks FSDP's inner units as roots and breaks that
        forward."""
        if not _is_sharded(trainer):
            # parametrized weights evaluated (the live module needed); pruned ones put together by strip_prefixes
            return strip_prefixes(effective_state_dict(self.find_model(pl_module)))
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        root = trainer.strategy.model
        assert root is not None  # a fit's strategy holds the LightningModule from its start
        model = self.find_model(pl_module)
        # the model's name in the root's state dict, found by identity: model_attr may reach it through
        # a property or a name the wrappers also use ("module")
        name = next((without_wrapper_names(n) for n, m in root.named_modules() if m is model), None)
        if name is None:
            raise ValueError(f"LensCallback: the model at model_attr={self.model_attr!r} is not a submodule of the "
                             f"strategy's model ({type(root).__name__}), whose weights are gathered under sharding")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # tensors, and any module's extra state (whatever its type), which strip_prefixes drops
        full: dict[str, Any] = {without_wrapper_names(k): v
                                for k, v in get_model_state_dict(root, options=options).items()}
        if not name:
            return strip_prefixes(full)
        prefix = name + "."
        return strip_prefixes({key[len(prefix):]: value for key, value in full.items() if key.startswith(prefix)})

    # -- validation before step 1 ---------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._outside_trainer = False
        self._restore_notes = []  # this fit's, from the checkpoint restored after setup
        self._state_restored = False  # `load_state_dict` (Lightning restores the checkpoint after setup)
        # a checkpoint saved before this fit's train start records no passed step (or the one restored next)
        self._passed_known, self._restored_passed = False, None
        self._check_no_shared_outputs(trainer)
        if trainer.global_step == 0:  # a run from step 0 (or a resumed one, whose state is restored next)
            self._new_run()
        else:  # a fit continuing this trainer's steps, maybe on other data (or resuming a checkpoint: `on_load_checkpoint`)
            self._earlier_fit_kept = True
            if self._inputs_record is not None:  # the run's last drawing of each batch, not the last fit's alone
                # (a fit resumed drawing some batches kept the checkpoint's others, and lost them here)
                self._restored_inputs = self._kept_inputs_record()
        # Lightning calls the LightningModule's setup and configure_model after this: a model built,
        # replaced or changed there (as FSDP and ModelParallel want; nanoGPT's crop_block_size) is
        # checked in on_fit_start, as it then is, still before step 1
        self._validate_at_fit_start = _builds_model_later(pl_module)
        tuner_problem: Exception | None = None
        if not self._validate_at_fit_start:
            self.validate(self.find_model(pl_module))
        elif _tunes_at_fit_start(trainer) and not _is_sharded(trainer):
            # a LearningRateFinder's or BatchSizeFinder's search runs in its on_fit_start, which Lightning calls
            # before this callback's: what the model the module holds now fails is said before it, as a warning
            # (the module may still build or replace it: the check at fit start decides)
            problem: Exception | None = None
            try:
                held, missing, path = self._at_model_attr(pl_module)
                if missing is not None and held is not None:  # a misspelling, or assigned in setup/configure_model
                    raise ValueError(f"{path} has no attribute {missing!r} at setup (model_attr={self.model_attr!r}): "
                                     f"fine if {type(pl_module).__name__} assigns it in setup or configure_model, "
                                     f"else set model_attr to the attribute holding the model")
                if held is not None:  # None (the model, or a module on its path): built later, nothing to say
                    self.validate(self.find_model(pl_module))
            except Exception as err:  # noqa: BLE001 - a placeholder may fail in any way; fit start decides
                problem = None if _read_through_none(err) else err  # a property reading a module not built yet
            tuner_problem = problem
        # fast_dev_run is a smoke test: Lightning writes no checkpoints and no logs then, and snapshots
        # would land in the working directory ("auto" has no log directory)
        fast_dev_run = trainer.fast_dev_run  # type: ignore[attr-defined]  # Lightning's Trainer sets it unannotated
        self._snapshots_off = bool(fast_dev_run) and self.snapshot_dir is not None
        if self._snapshots_off:
            self._snapshot_root = None
        # "auto" is resolved with a broadcast (trainer.log_dir's or its own): every rank resolves, rank 0 keeps it
        snapshot_root = (self._resolve_snapshot_root(trainer) if self.snapshot_dir is not None and not self._snapshots_off
                         else None)

        def on_rank_zero() -> None:
            if tuner_problem is not None:
                self._warn_once("tuner", f"LensCallback: the model {type(pl_module).__name__} holds at setup does "
                                         f"not pass this callback's checks: {type(tuner_problem).__name__}: "
                                         f"{tuner_problem}. A tuner callback's search at fit start runs before this "
                                         f"callback checks the model again there, and training stops before its first "
                                         f"step if that model fails too (a Tuner call's fit ends after its search: the "
                                         f"check comes with the next fit)")
            self._warn_unreached_steps(trainer, pl_module)
            if self._snapshots_off:
                self._warn_once("fast-dev-run", "LensCallback: fast_dev_run is on: no snapshots are written "
                                                "(as Lightning writes no checkpoints); the probes run as usual")
            if snapshot_root is not None:
                self._use_snapshot_root(snapshot_root)

        # the warnings (rank_zero_warn: rank 0 alone warns, and under a filter that makes warnings errors rank 0
        # alone raised, while the others went on into the next collective: a hang on NCCL) and a strict fault
        # making the snapshot directory are raised on every rank (one small broadcast per fit with several
        # processes, also without a snapshot_dir)
        _raised_on_every_rank(trainer, on_rank_zero)

    def _warn_unreached_steps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warns, before step one, of ``snapshot_steps`` the schedule never probes (a snapshot is taken
        at a probe step only) and of ``steps``/``snapshot_steps`` past the fit's ``max_steps``. Under
        manual optimization a batch can move ``global_step`` past a snapshot step, which is then taken
        if that batch ends at a probe step (known only then): the warning says so."""
        last = _max_steps(trainer)
        # a fit that trains nothing: no train start, no probe step (limit_train_batches=0: Lightning skips the loop)
        limit = next((f"{name}={value}" for name, value in (("max_steps", last), ("max_epochs", trainer.max_epochs),
                                                            ("limit_train_batches", trainer.limit_train_batches))
                      if value == 0), None)
        if limit is not None:
            # said at setup, before Lightning restores a fit's ckpt_path (trainer.ckpt_path is still None, or an
            # earlier fit's, here): the words hold for a fit from scratch and for one resuming a checkpoint
            self._warn_once("no-training", f"LensCallback: {limit}: Lightning trains nothing and calls no train start, so "
                                           f"this fit probes nothing, not even the model it starts from (the initial "
                                           f"model at_start would probe, or the weights of a checkpoint it resumes), "
                                           f"and writes no snapshot; to probe those weights, attach the model and call "
                                           f"probe_step(None, step, model.state_dict()) with their step (0 for an "
                                           f"untrained model; README: a hand-written loop)")
            return
        final = last if self.schedule.at_end else None
        idle = [s for s in self.snapshot_steps
                if not self.schedule.due(s) and s != final and (last is None or s <= last)]
        if idle:
            manual = ("; under manual optimization one is still taken if a batch that moves global_step past it "
                      "ends at a probe step" if not pl_module.automatic_optimization else "")
            self._warn_once("snapshot-steps", f"LensCallback: snapshot_steps {idle} are not probe steps (every_n_steps="
                                              f"{self.schedule.every_n_steps}, log_spaced={self.schedule.log_spaced}, "
                                              f"steps={list(self.schedule.steps)}), and snapshots are taken at probe "
                                              f"steps only: add them to steps to snapshot them{manual}")
        beyond = sorted({s for s in (*self.schedule.steps, *self.snapshot_steps) if last is not None and s > last})
        if beyond:
            self._warn_once("steps-beyond", f"LensCallback: steps/snapshot_steps {beyond} lie past max_steps={last}: "
                                            f"this fit does not reach them{_past_max_steps(pl_module)}")
        self._warn_idle_schedule(pl_module, last, after=-1)

    def _warn_idle_schedule(self, pl_module: L.LightningModule, last: int | None, after: int) -> None:
        """Warns if no step in ``(after, last]`` is a probe step and ``at_end`` is off: ``after`` -1 for a
        run from step 0 (setup), else the step a resumed fit starts at (train start, which may still
        probe that step itself)."""
        schedule = self.schedule
        if last is None or schedule.at_end or schedule.due_between(after, last):
            return
        settings = (f"every_n_steps={schedule.every_n_steps}, log_spaced={schedule.log_spaced}, "
                    f"steps={list(schedule.steps)}")
        if after < 0:
            what = (f"no step up to max_steps={last} is a probe step ({settings}, at_start={schedule.at_start}, "
                    f"at_end=False): this fit probes nothing and writes no snapshot")
        else:
            what = (f"no step after {after} up to max_steps={last} is a probe step ({settings}, at_end=False): "
                    f"this fit probes nothing after step {after}")
        self._warn_once("schedule-idle", f"LensCallback: {what}{_past_max_steps(pl_module)}")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restoring_for_fit = True  # a validate(ckpt_path=...) whose checkpoint held no state of this one
        if stage == "fit" and self._unfinished is not None and not self._passed_known:
            # a fit with no train start: Lightning trains nothing at max_steps (the same Trainer fit again
            # after Ctrl-C in its last probe step, or a checkpoint saved there), so the step is still owed
            _, step, final = self._unfinished
            what = f"probe step {step}{' (the final one, with its snapshot)' if final else ''}"
            self._note_at_restore(None, f"LensCallback: {what} was cut short (Ctrl-C, a strict fault) and is still "
                                        f"owed, but this fit trained no step (global_step={trainer.global_step}, "
                                        f"max_steps={trainer.max_steps}): fit with more steps (raise "
                                        f"trainer.fit_loop.epoch_loop.max_steps, or resume the checkpoint with a "
                                        f"larger max_steps), which takes it at its start, or probe these weights "
                                        f"post hoc (lens_callback.to_hooked_transformer)")
        self._give_restore_notes(raising=False)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restoring_for_fit = True  # Lightning skips teardown when a stage raises
        self._release_fit()  # and on_train_end
        self._give_restore_notes(raising=False)

    def _give_restore_notes(self, *, raising: bool) -> None:
        """Gives the warnings `_note_at_restore` kept, a kind once (`_warn_once`): at train start
        (``raising``: one a filter makes an error is raised, there on every rank), or when a fit ends
        without one (Lightning runs no train start for a fit resumed at its ``max_steps``, nor after an
        error between the restore and it), then logged under such a filter, which would replace the
        fit's own outcome."""
        notes, self._restore_notes = self._restore_notes, []
        for kind, message in notes:
            if kind is None:
                self._warn(message, raising=raising)
            else:
                self._warn_once(kind, message, raising=raising)

    def _release_fit(self) -> None:
        """Gives back what a Trainer's fit kept between probe steps: the runner's buffers and CUDA graphs,
        and the private model (a float32 copy of the weights, on the training device) with its probe
        inputs, which the next fit's train start builds anew (scale review: they stayed alive with the
        callback after ``fit`` returned). A model given to `attach` stays, for the user's next
        ``probe_step``."""
        self.runner.release()
        if not self._outside_trainer:
            self._hooked = self._copier = self._inputs = None

    def _check_no_shared_outputs(self, trainer: L.Trainer) -> None:
        """Raises if another LensCallback of ``trainer`` would write where this one does: to a logger
        (both write ``lens/errors``, ``lens/events`` and the chart layout, and the probes they share)
        or into the same snapshot directory (each would overwrite and prune the other's)."""
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # Lightning's Trainer sets it unannotated
        others = [cb for cb in callbacks if isinstance(cb, LensCallback) and cb is not self]
        if not others:
            return
        advice = ("give one LensCallback all the probes (probes=[...], probe_options per probe) and probe other "
                  "settings post hoc from its snapshots (lens-probe)")
        if _real_loggers(trainer):
            raise ValueError(f"the Trainer has {len(others) + 1} LensCallbacks and a logger: they would write the same "
                             f"tags (lens/errors, lens/events, ...) to every logger; {advice}. (Without a logger each "
                             f"keeps its results in its own history.)")
        roots = [cb._resolve_snapshot_root(trainer).resolve() for cb in (self, *others) if cb.snapshot_dir is not None]
        if len(set(roots)) < len(roots):
            raise ValueError(f"two LensCallbacks of the Trainer write snapshots into one directory "
                             f"({sorted(set(r for r in roots if roots.count(r) > 1))[0]}): each would overwrite and "
                             f"prune the other's; give each its own snapshot_dir, or {advice}")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._validate_at_fit_start:
            return
        self._validate_at_fit_start = False
        if not _is_sharded(trainer):
            self.validate(self.find_model(pl_module))
            return
        # the strategy has sharded the model by now (FSDP1's flat parameters hold one rank's shard, no
        # shapes): every rank takes part in gathering the full weights, rank 0 checks them, and every
        # rank raises what it found, so that none goes on to wait in a collective for the others
        weights = self._gathered_state_dict(trainer, pl_module)
        _raised_on_every_rank(trainer, lambda: self.validate(self.find_model(pl_module), state_dict=weights))

    @global_rngs_kept()  # the converter's and the probes' code may draw from them
    def validate(self, model: nn.Module, state_dict: Mapping[str, Tensor] | None = None) -> None:
        """Checks, before training, that ``model`` converts and the probe settings fit it.

        ``state_dict``: the weights to check, if not ``model``'s own (`effective_state_dict`: parametrized
        weights evaluated; under sharding, the gathered ones). The global RNG states are restored afterwards.

        Raises:
            ValueError: naming the converter problem (missing/unexpected keys, available converters)
                or the probe setting that does not fit the model (e.g. ``2 * repeat_length > n_ctx``).
        """
        model = unwrap_module(model)
        self._converter = self._resolve_converter(model)
        self._model_config = self._converter.model_config(model)
        try:  # snapshots store it (with the snapshot writer's own encoder), and reload without the user's code
            snapshot_json(self._model_config, "model_config")
        except ValueError as err:
            raise ValueError(
                f"converter {self._converter.name!r}: model_config(model) must return plain JSON values (str, int, "
                f"float, bool, None, lists, dicts with str keys; e.g. int(n) for a numpy integer): {err}") from err
        if (change := json_change(self._model_config, "model_config")) is not None:
            raise ValueError(f"converter {self._converter.name!r}: {change}, so its snapshots would reload with another "
                             f"model_config than this run converts with; model_config(model) must return str keys and "
                             f"lists")
        weights = state_dict if state_dict is not None else effective_state_dict(model)
        cfg, converted, skeleton = checked_conversion(self._converter, self._model_config, weights)
        check_runs(self._converter, skeleton)
        if self.snapshot_dir is not None:
            self._check_reloads_alike(cfg, converted, weights)
        self._text_len = self.text_len if self.text_len is not None else min(cfg.n_ctx, 256)
        check_probe_tokens(self.repeat_batch, 2 * self.repeat_length, self.text_batch, self._text_len)
        self.runner.validate(cfg, repeat_length=self.repeat_length, text_len=self._text_len,
                             max_batch_tokens=self.max_batch_tokens, hook_points=skeleton.hook_dict)

    def _check_reloads_alike(self, cfg: HookedTransformerConfig, converted: Mapping[str, Tensor],
                             weights: Mapping[str, Tensor]) -> None:
        """Snapshots reload through the converter registered under this one's name: a converter instance
        that is not that one (another instance of its class, set up otherwise) must convert alike."""
        assert self._converter is not None and self._model_config is not None  # validate, the caller, set them
        name = self._converter.name
        registered = get_converter(name) if name in available_converters() else None
        if registered is None or registered is self._converter:
            return
        try:
            other_cfg, other, _ = checked_conversion(registered, self._model_config, weights)
            same = other_cfg.to_dict() == cfg.to_dict() and other.keys() == converted.keys() and all(
                other[key].shape == value.shape and torch.equal(other[key], value) for key, value in converted.items())
        except Exception:  # noqa: BLE001 - reported as the difference it is
            same = False
        if not same:
            raise ValueError(
                f"converter {self._converter!r} converts this model otherwise than {registered!r}, the one registered "
                f"under {name!r}, through which its snapshots would reload; register it under a name of its own "
                f"(lens_callback.register_converter), or set snapshot_dir=None")

    def attach(self, model: nn.Module, train_data: Any = None, val_data: Any = None, *, parity: bool = True,
               state_dict: Mapping[str, Tensor] | None = None, tokenizer_spec: Mapping[str, Any] | None = None) -> None:
        """Builds the persistent ``HookedTransformer`` and the fixed probe inputs for ``model``.

        ``on_train_start`` calls it with the datamodule's ``train_data``/``val_data``; call it
        yourself to use :meth:`probe_step` from a hand-written training loop. There a
        ``snapshot_dir`` path is made here (``"auto"`` needs a Trainer's log directory: pass a path).
        With ``parity`` and the ``parity_check`` setting, the converted model's logits are compared
        with ``model``'s (`_check_parity`; ``on_train_start`` passes ``False`` under sharded
        strategies, where a forward on one rank alone would wait for the others). ``state_dict``:
        the weights to build from, if not ``model``'s own (`effective_state_dict`; under sharding, the
        gathered ones). ``tokenizer_spec``: how the token ids map to text, recorded in the snapshots'
        metadata (`lens_callback.tokenizer`; under a Trainer it is the datamodule's ``tokenizer_spec()``),
        e.g. ``data.tokenizer_spec()`` of a `nanogpt_model.TextDataModule`.

        Raises:
            ConversionError: if the converted model computes another function than ``model``.
            ValueError: if ``train_data`` or ``val_data`` is given but is not a 1-D array of token ids, or
                ``tokenizer_spec`` is not a tokenizer record that fits the model's vocabulary.
        """
        self._outside_trainer = True
        self._hooked = self._inputs = self._tokenizer_spec = None  # until this attach succeeds: probe_step asks for it again
        try:  # its form before the model is built, its size against the model's vocabulary after
            spec = None if tokenizer_spec is None else check_tokenizer_spec(tokenizer_spec)
        except ValueError as err:
            raise ValueError(f"attach(tokenizer_spec=...): {err}") from None
        self.validate(model)  # the model given now (a second attach may bring another architecture)
        self._attach(model, train_data, val_data, parity=parity, state_dict=state_dict, from_datamodule=False)
        if spec is not None:
            assert self._hooked is not None  # _attach built it, or raised
            try:
                self._tokenizer_spec = check_tokenizer_spec(spec, self._hooked.cfg.d_vocab)
            except ValueError as err:
                self._hooked = self._inputs = None  # refused as a whole: probe_step asks for attach again
                raise ValueError(f"attach(tokenizer_spec=...): {err}") from None

    @global_rngs_kept()  # the converter's code may draw from them
    def _attach(self, model: nn.Module, train_data: Any, val_data: Any, *, parity: bool,
                state_dict: Mapping[str, Tensor] | None, from_datamodule: bool) -> None:
        """`attach`; ``from_datamodule``: the data are a datamodule's attributes (a Trainer's fit), where
        data that are not token ids fall back to random probe inputs with a warning, not an error. The
        global RNG states are restored afterwards."""
        model = unwrap_module(model)
        self._hooked = self._copier = self._inputs = None  # until this attach succeeds: a probe step asks for it again
        self.runner.release()  # buffers of an earlier model's shapes (made anew at the next probe step)
        if self._converter is None:
            self.validate(model)
        if self._snapshot_root is None and self.snapshot_dir is not None and not self._snapshots_off:  # no Trainer's setup ran
            self._hand_loop_snapshot_root()
        device = next(model.parameters()).device
        weights = state_dict if state_dict is not None else effective_state_dict(model)
        assert self._converter is not None and self._model_config is not None  # a validate that passed set them
        try:  # all or nothing: a half-built attach (the model, no inputs) would reach the probe steps as a fault
            self._hooked = build_hooked_transformer(self._converter, self._model_config, weights, device=device)
            self._refuse_made_non_finite(model, weights)
            if parity and self.parity_check:
                self._check_parity(model)
            pack_attention_weights(self._hooked)  # private model: no per-forward weight copies
            self._copier = WeightCopier(self._hooked)  # after packing: the parameters stay these tensors
            self._inputs = self._make_inputs(train_data, val_data, self._hooked.cfg.d_vocab, from_datamodule)
        except BaseException:
            self._hooked = self._copier = self._inputs = None
            raise
        # each snapshot records it; None where the probes read no batch (weights only): none is stored
        self._inputs_digest = probe_inputs_sha256(self._inputs) if _draws_a_batch(self._inputs) else None
        self._inputs_record = self._record_inputs()  # the checkpoints keep it
        self._lean = self.lean_attention
        if self._lean:
            problem = verify_lean_attention(self._hooked)
            if problem is not None:
                self._lean = False
                self._warn_once("lean", f"LensCallback: {problem}; using TransformerLens's attention instead")

    def _datamodule_tokenizer_spec(self, datamodule: Any) -> dict[str, Any] | None:
        """The record of how ``datamodule``'s token ids map to text, for the snapshots' metadata
        (``tokenizer_spec()``, `datamodule_tokenizer_spec`), checked against the attached model's
        vocabulary; ``None`` for none, or one that fails or does not fit, with a warning: a snapshot
        without it loads as one of any other data does."""
        assert self._hooked is not None  # _attach, just before, built it
        try:
            return datamodule_tokenizer_spec(datamodule, self._hooked.cfg.d_vocab)
        except Exception as err:  # noqa: BLE001 - the user's method: its failure costs the record, not the run
            self._warn_once("tokenizer", f"LensCallback: the snapshots record no tokenizer: the datamodule's "
                                         f"tokenizer_spec() raised, or gave a record that does not fit the model "
                                         f"({type(err).__name__}: {err})")
            return None

    def _refuse_made_non_finite(self, model: nn.Module, weights: Mapping[str, Tensor]) -> None:
        """Raises `ConversionError` if the converter made a weight that is not finite while the model's
        parameters are (a -inf bias masking vocabulary ids, folded from a -inf mask buffer or made by
        the converter, or a finite -1e9 that float16 rounds to -inf): every probe step's finite-weights
        check would void its results. Parameters of the model that are not finite (a diverged
        checkpoint) are the probe steps' to report, as faults; buffers (a -inf causal mask) are not
        weights that diverge."""
        assert self._hooked is not None and self._converter is not None  # _attach, the caller, set them
        # exact per-tensor checks, once at attach (the fused route's sums of |x| could overflow for large finite
        # weights, e.g. a float32 mask near its largest value)
        if weights_finite(list(self._hooked.parameters()), fused=False):
            return
        read = strip_prefixes(weights)  # the state dict's entries that are the model's parameters
        names = {without_wrapper_names(name) for name, _ in model.named_parameters()}
        # and the names the pruned (`weight_orig`) and parametrized (`parametrizations.weight.original`) ones are read under
        names |= {re.sub(r"_orig$|(^|\.)parametrizations\.([^.]+)\.original\d*$", r"\1\2", name) for name in names}
        params = [v for k, v in read.items() if k in names and isinstance(v, Tensor) and v.is_floating_point()]
        if not params:  # names that do not line up (a wrapper not known here): what the converter reads
            params = [v for v in self._converter.source_weights(read).values()
                      if isinstance(v, Tensor) and v.is_floating_point()]
        if not weights_finite(params, fused=False):
            return
        made = [name for name, p in self._hooked.named_parameters() if not bool(torch.isfinite(p).all())]
        raise ConversionError(
            f"converter {self._converter.name!r} made weights that are not finite from finite ones ({', '.join(made)}): "
            f"every probe step would be recorded as NaN. To mask vocabulary ids, give unembed.b_U a large negative "
            f"finite value there, one the weights' dtype holds (e.g. -1e4: float16's largest is 65504)")

    def _hand_loop_snapshot_root(self) -> None:
        if self.snapshot_dir == "auto":
            self._warn_once("snapshot-root", "LensCallback: snapshot_dir='auto' is a Trainer's log directory; "
                                             "without a Trainer no snapshots are written (pass a directory)")
            return
        assert self.snapshot_dir is not None  # the caller's condition
        self._use_snapshot_root(Path(self.snapshot_dir))

    def _use_snapshot_root(self, root: Path) -> None:
        """Snapshots go to ``root`` (rank 0), made now; a directory that cannot be made or written to (a
        snapshot is written as a ``.tmp-`` directory there first: one is made and removed now) is a
        fault."""
        self._snapshot_root = root
        try:
            make_dirs(root, "snapshot directory")  # names a file in the way (mkdir says "File exists")
            new_temp_dir(root, f"{TMP_PREFIX}check-").rmdir()  # an existing directory may be read-only
        except OSError as err:
            self._fault("snapshot", f"snapshot directory {root} is not usable: {err}", 0)

    def _resolve_snapshot_root(self, trainer: L.Trainer) -> Path:
        if self.snapshot_dir == "auto":
            base, self._snapshot_family, self._shared_snapshot_base = _auto_snapshot_base(trainer)
            return base / "snapshots"
        assert self.snapshot_dir is not None  # every caller's condition
        return Path(self.snapshot_dir)

    # -- schedule ----------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish_error = None  # a fit that died between the last batch and on_train_end left one
        step = trainer.global_step
        if self._earlier_fit_kept and trainer.ckpt_path is not None and not self._state_restored:
            # this Trainer fit before and now resumes a checkpoint holding no state of this callback (saved
            # without it, or with no callback states at all): the earlier fit's record (steps probed past this
            # one among them, which would not be probed again) is not this checkpoint's. A new run from its
            # step, as a new Trainer given the checkpoint starts one
            self._new_record()
            self._note_at_restore(None, f"LensCallback: the checkpoint {trainer.ckpt_path} holds no state of this "
                                        f"callback: this fit starts a new run from its step {step}, without this "
                                        f"Trainer's earlier record (probed steps, snapshots written, events, history)")
        # a probe step of this step that did not finish (`_maybe_probe`, recorded in the checkpoint) is
        # taken again, with the steps its batch end had passed (snapshot_steps among them) and as the final
        # one if it was; otherwise this step alone, if due
        unfinished, self._unfinished = self._unfinished, None
        resumed = unfinished is not None and unfinished[1] == step
        # a checkpoint saved after the optimizer steps of a batch but before this callback's batch end ran
        # (OnExceptionCheckpoint after another callback raised) passed no steps here: under several
        # optimizers a due step before this one may lie among them, which the batch end would have probed
        passed = self._restored_passed  # what a checkpoint saved before this start finishes records (below)
        after = passed if passed is not None and -1 <= passed < step else step - 1
        if resumed:
            assert unfinished is not None  # what `resumed` checked
            self._passed, due, final = (unfinished[0], step), True, unfinished[2]  # due steps count from _passed[0]
        else:
            self._passed, due, final = (after, step), self.schedule.due_between(after, step), False
        self._run_id_logged = False  # written with this fit's first logged probe step (`_log`)
        sharded = _is_sharded(trainer)
        gathered: dict[str, Tensor] | None = None  # under sharding, the full weights (gathered below)

        def probe() -> None:  # step 0, a due step a run resumes at, or an unfinished probe step (above)
            weights = gathered if sharded else _GATHER
            if resumed and final and self.probed_steps and self.probed_steps[-1] == step:
                if self.snapshot_dir is not None:  # probed; its final snapshot is what did not finish
                    self._final_snapshot(trainer, pl_module, step, state_dict=weights)
            else:
                self._maybe_probe(trainer, pl_module, step, final=final, state_dict=weights)

        def attach_and_probe() -> None:
            self._warn_at_train_start(trainer, pl_module, step)  # on rank 0 (rank_zero_warn): an error, raised on all
            if self._snapshot_root is not None:  # a strict fault listing it: raised on every rank, as the rest
                self._claim_snapshots(trainer.global_step)
            datamodule = getattr(trainer, "datamodule", None)
            self._fit_without_datamodule = datamodule is None
            self._attach(self.find_model(pl_module), getattr(datamodule, "train_data", None),
                         getattr(datamodule, "val_data", None), parity=not sharded, state_dict=gathered,
                         from_datamodule=True)
            self._tokenizer_spec = self._datamodule_tokenizer_spec(datamodule)
            self._compare_restored_inputs(trainer.global_step)
            if due:
                probe()

        # rank 0's checks (the parity check, the probe inputs) and its first probe step (a strict fault):
        # what they raise, every rank raises
        try:  # everything that may raise (a warning turned into an error too) keeps the unfinished step owed
            if sharded:  # the model's own state dict holds this rank's shards: every rank gathers
                gathered = self._gathered_state_dict(trainer, pl_module)
            _raised_on_every_rank(trainer, attach_and_probe)
            if due and not trainer.is_global_zero:
                probe()  # counts the step here (rank 0 probed it)
        except BaseException:
            if resumed and self._unfinished is None:  # stopped before its probe (Ctrl-C in the parity check, ...):
                self._unfinished = unfinished  # the step is still owed, as `_restored_passed` still says
            raise
        # the steps owed at this start are taken: a checkpoint from now on records this fit's passed step
        self._restored_passed, self._passed_known = None, True

    def _note_at_restore(self, kind: str | None, message: str) -> None:
        """A warning about the checkpoint being restored, given at train start (`_warn_at_train_start`), where
        what it raises is raised on every rank: Lightning restores the checkpoint on every rank, and a warning
        made an error by a filter there stopped rank 0 alone (`rank_zero_warn`), while the others went on to
        wait for it in Lightning's next collective (on NCCL until the timeout; NCCL review). ``kind``: warned
        once per kind (`_warn_once`); ``None``: every time."""
        self._restore_notes.append((kind, message))

    def _warn_at_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """What a fit's start says once: spawned processes keep no history here, no logger, and (for a
        resumed fit, whose step is known only now) a schedule with nothing left to probe; first, what the
        restored checkpoint called for (`_note_at_restore`)."""
        self._give_restore_notes(raising=True)
        if trainer.is_global_zero and _spawns_processes(trainer):
            kept = [what for what, there in (("the logger", trainer.loggers), ("the snapshots", self._snapshot_root))
                    if there]
            where = (f"its results are in {' and '.join(kept)} only" if kept else
                     "with no logger and no snapshot_dir its results are lost")
            self._warn_once("spawn", f"LensCallback: this strategy runs the fit in spawned processes, which return "
                                     f"the weights but not this callback's history, errors or events: {where} "
                                     f"(strategy='ddp' keeps them here)")
        elif trainer.is_global_zero and not trainer.loggers:
            why = "barebones=True" if getattr(trainer, "barebones", False) else "logger=False"  # barebones turns the loggers off itself
            # where they go: the snapshots only if there are any (the warning said "(and snapshots)" without them too)
            where = (f"and the snapshots in {str(self._snapshot_root)!r} only" if self._snapshot_root is not None else
                     "only: no snapshot_dir either, so nothing of them is written (give the Trainer a logger, e.g. "
                     "TensorBoardLogger, or the callback a snapshot_dir)")
            self._warn_once("no-logger", f"LensCallback: the Trainer has no logger ({why}): probe results "
                                         f"go to LensCallback.history {where}")
        if step > 0:  # setup warns of a run from step 0
            self._warn_idle_schedule(pl_module, _max_steps(trainer), after=step)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # a due step passed since the last batch end (several optimizers can move global_step by more than one)
        previous = self._passed[1]
        self._passed = (previous, step)  # the steps this batch end passed: (previous, step]
        due = step > 0 and self.schedule.due_between(previous, step)
        last = step > 0 and _training_stops_after_this_batch(trainer)
        final = self.schedule.at_end and last

        def probe() -> None:
            if due and not final:
                self._maybe_probe(trainer, pl_module, step)
            # the final model, here when the loop is known to stop after this batch: ModelCheckpoint
            # (Lightning runs checkpoint callbacks last) then saves the final step with its probe. A due
            # final step is probed once, as the final one: a probe step of it cut short is then recorded
            # as final (`_maybe_probe`), and taken again with its snapshot on resume
            if final:
                self._finish(trainer, pl_module, step)

        try:
            if due or final:
                self._on_every_rank_if_strict(trainer, probe)
        except LensError as err:
            if not last:
                raise
            # strict mode at the last step: raised from on_train_end, once ModelCheckpoint has saved
            # the final weights (raising here would skip that save and lose the run's last steps)
            self._finish_error = err

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        error, self._finish_error = self._finish_error, None
        try:
            if error is not None:
                raise error
            # training stopped otherwise (early stopping, max_time, an interrupted epoch): after the checkpoint
            if self.schedule.at_end and self._finished_step != trainer.global_step:
                self._on_every_rank_if_strict(trainer, lambda: self._finish(trainer, pl_module, trainer.global_step))
        finally:
            self._release_fit()  # the graphs' memory pools, the CPU buffers, the private model: not held between fits

    def _on_every_rank_if_strict(self, trainer: L.Trainer, probe: Callable[[], None]) -> None:
        """Runs a probe step's work on every rank. Under ``strict`` with several processes, inside one
        small broadcast that every rank reaches (the schedule's decisions are every rank's): rank 0's
        fault is raised on every rank, so that none waits for it in the next collective (or in
        ``OnExceptionCheckpoint``'s barrier). Without ``strict`` a probe step raises nothing to share,
        and adds no collective (under sharding every rank still gathers the weights)."""
        if self.strict:
            _raised_on_every_rank(trainer, probe, every_rank_works=True)
        else:
            probe()

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Probes and snapshots the final model once (every rank takes the same branch)."""
        self._finished_step = step
        if self.probed_steps and step == self.probed_steps[-1]:
            # the last step was due anyway and probed as such: its snapshot may not have been
            if self.snapshot_dir is not None and not self._snapshot_due(step):
                self._final_snapshot(trainer, pl_module, step)
        else:
            self._maybe_probe(trainer, pl_module, step, final=True)

    def _final_snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int,
                        state_dict: Any = _GATHER) -> None:
        """The final snapshot of a step probed already (training found to stop only in ``on_train_end``).
        If it does not finish (Ctrl-C, a strict fault) the step is recorded as unfinished, its probe done:
        a fit resumed from the checkpoint saved then writes the snapshot at train start."""
        try:
            if state_dict is _GATHER:
                state_dict = self._gathered_state_dict(trainer, pl_module)
            if state_dict is not None and self._snapshot_root is not None:
                self._snapshot(step, state_dict, final=True)
        except BaseException:
            self._unfinished = (step - 1, step, True)
            raise

    def _maybe_probe(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, final: bool = False,
                     state_dict: Any = _GATHER) -> None:
        """Probes ``step`` once, on the weights gathered here, or on ``state_dict`` if the caller gathered
        them at this step on every rank already (``None`` on ranks other than 0)."""
        # once per optimizer step: under gradient accumulation several batches share a global_step
        if self.probed_steps and step <= self.probed_steps[-1]:
            return
        self.probed_steps.append(step)  # on every rank, so all ranks agree on what is due
        detector = self.detector.state_dict() if self.detector is not None else None
        errors = Counter(self.errors)
        try:
            if state_dict is _GATHER:
                state_dict = self._gathered_state_dict(trainer, pl_module)
            if state_dict is not None:
                self.probe_step(trainer, step, state_dict, final=final)
        except BaseException:
            # a step whose probe step did not finish (Ctrl-C, a strict fault) is not probed, the event rules
            # have not seen it, its faults are not counted, and its results are not in the history (set before
            # the snapshot: a user reading it after Ctrl-C saw a step neither logged nor snapshotted); the
            # checkpoint saved now (OnExceptionCheckpoint; ModelCheckpoint at the last step) records it, with
            # the steps its batch end passed, so that a fit resumed from it probes it at train start as this
            # one would have
            self.probed_steps.pop()
            self.history.pop(step, None)  # a step past the last probed one: no earlier entry
            if self.detector is not None and detector is not None:
                self.detector.load_state_dict(detector)
            self.errors = errors  # the step's faults count once, when it is taken again
            self._unfinished = (self._passed[0] if self._passed[1] == step else step - 1, step, final)
            raise

    def _gathered_state_dict(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor] | None:
        """The live weights on rank 0, ``None`` on the others. Every rank must call it when one does:
        under sharded strategies every rank takes part in gathering the full weights."""
        if not (_is_sharded(trainer) or trainer.is_global_zero):
            return None
        state_dict = self._live_state_dict(trainer, pl_module)
        return state_dict if trainer.is_global_zero else None

    # -- the probe step --------------------------------------------------------------------------
    def _check_parity(self, model: nn.Module) -> None:
        """Raises `ConversionError` if the converted model computes another function than ``model``.

        Both run two random sequences of `_parity_len` tokens (the longest probe sequence, at least
        64, at most ``n_ctx``) on the same weights: ``model``'s, in float32, each floating parameter
        perturbed by Gaussian noise from a private generator (`perturbed`: a correct conversion
        agrees for any weights, and at initialisation biases are zeros and norm gains ones, where a
        dropped or swapped one would not show); and then, if they agree, on ``model``'s weights as
        they are (in float32), where a slip that the noise's larger activations hide shows (a norm's
        eps off by 10x at initialisation, when the residual stream is small). ``model`` runs through
        ``torch.func.functional_call`` on copies of those tensors and clones of its buffers (nothing of it is
        written to; its modules' attributes, ``training`` among them, and the RNG states are restored), eagerly even when it is
        compiled in place, outside any autocast, with full-precision float32 products; the converted
        side is a temporary ``HookedTransformer`` of the same weights. ``model(tokens)``
        gives the logits (the first element of a tuple); if it returns fewer positions than given
        (nanoGPT's last-position shortcut), prefixes of a quarter, a half and three quarters of the
        tokens are run as well, so that some earlier positions are compared too. Tolerance: `PARITY_RTOL` of the largest logit, or
        `PARITY_RTOL_LOW_PRECISION` if ``model`` cast anything into half precision itself (an
        autocast inside its forward; `HalfPrecisionOutputs` watches it), or may have (a forward no mode
        can watch); entries where the model's logits are not finite or masked
        (`masked_logits`: -inf or far below their row's largest, e.g. padding ids at -1e4) are left out of
        the difference and the scale, and the masked ones must be masked in the converted model too
        (`unmasked_logits`). A model the check cannot run (another call signature, not
        enough memory for the copies, no finite logits) is not checked, with one warning; one that
        fails on the check's sequences but runs on a few tokens (a context shorter than the
        converter's ``n_ctx``) stops with `ConversionError`. The model's forward hooks run on these
        calls (with the copies).
        """
        assert self._hooked is not None and self._converter is not None  # _attach, the caller, set them
        try:
            for perturb in (True, False):  # the perturbed weights, then, if they agree, the model's own
                outcome = self._parity_outcome(model, perturb=perturb)
                if isinstance(outcome, str) or not outcome.agrees:
                    break
        except _TooLong as err:
            length, n_ctx = min(self._parity_len(), self._probe_len()), self._hooked.cfg.n_ctx
            raise ConversionError(
                f"the model fails on {length}-token sequences ({err}) but runs on a few tokens: the probes read "
                f"sequences of up to {length} tokens (2 x repeat_length={self.repeat_length}, text_len={self._text_len}) "
                f"and converter {self._converter.name!r} gives n_ctx={n_ctx}. If the model's context is shorter, "
                f"give its length as n_ctx in model_config, or set text_len and repeat_length to fit it; "
                f"parity_check=False skips this check") from None
        except Exception as err:  # noqa: BLE001 - the check is skipped, never the run
            outcome = f"{type(err).__name__}: {err}"
        if isinstance(outcome, str):
            cfg = self._hooked.cfg
            self._warn_once("parity", f"LensCallback could not compare the converted model with model(tokens) "
                                      f"([2, {self._parity_len()}] token ids -> [batch, positions, {cfg.d_vocab_out}] "
                                      f"logits): {outcome}; the conversion is not checked against the model (a "
                                      f"converter's source_logits(model, tokens) says how to call it; "
                                      f"parity_check=False silences this)")
            return
        diff, scale, rtol, caveats, length, unmasked = outcome
        if unmasked:
            raise ConversionError(f"converter {self._converter.name!r}: {unmasked_message(unmasked)}; "
                                  f"parity_check=False skips this check")
        if diff > rtol * scale:
            name = self._converter.name
            caveat = f" ({'; '.join(caveats)})" if caveats else ""
            weights = ("perturbed weights" if perturb else
                       "the model's own weights (with noise added they agree: a slip that shows at the scale "
                       "of these weights, such as a norm's eps)")
            raise ConversionError(
                f"converter {name!r}: the HookedTransformer's logits differ from the model's by up to {diff:.3g} "
                f"(largest logit {scale:.3g}, tolerance {rtol:g} of it) on random tokens and {weights}, so "
                f"the conversion computes another function and every probe would measure it. "
                f"lens_callback.check_parity(model, {name!r}, seq_len={length}, "
                f"seed={self.seed + PARITY_SEED_OFFSET}, atol=0{'' if perturb else ', perturb=False'}) shows the "
                f"first block where they part, on these tokens and {'perturbed' if perturb else 'these'} "
                f"weights{caveat}; parity_check=False skips this check")

    def _parity_len(self) -> int:
        """Tokens per sequence of the parity check: the longest probe sequence (at least 64), at most
        ``n_ctx``, so that every position a probe sees is compared (a slip that shows only past some
        length, e.g. a sliding attention window the converter left out, would not show before it)."""
        assert self._hooked is not None  # the parity check, the caller, runs after _attach built it
        return min(self._hooked.cfg.n_ctx, max(64, self._probe_len()))

    def _probe_len(self) -> int:
        """The longest sequence the enabled probes read."""
        assert self._text_len is not None  # validate set it (the parity check, the caller, runs after it)
        return self.runner.required_seq_len(repeat_length=self.repeat_length, text_len=self._text_len)

    def _parity_outcome(self, model: nn.Module, perturb: bool) -> _ParityOutcome | str:
        """`_check_parity`'s comparison (`_ParityOutcome`) over the entries where the model's logits are
        finite, or the reason it could not run. ``perturb``: on the weights plus noise (`perturbed`),
        else on the weights as they are (in float32)."""
        # _attach set them (the parity check, the caller, runs there)
        assert self._hooked is not None and self._converter is not None and self._model_config is not None
        cfg = self._hooked.cfg
        device = next(model.parameters()).device
        # the tokens and the noise `check_parity(model, seed=seed + PARITY_SEED_OFFSET)` draws, so that the
        # call the error names sees what this check saw
        seed = self.seed + PARITY_SEED_OFFSET
        tokens = parity_tokens(seed, cfg.d_vocab, 2, self._parity_len())
        generator = parity_noise(seed)
        params = dict(model.named_parameters())
        weights = {}
        for name, param in params.items():
            value = param.detach().float() if param.is_floating_point() else param.detach()
            if value.is_floating_point():  # never the parameter itself (.float() of a float32 one is it): a
                # forward may write a weight in place (nn.Embedding's max_norm renormalises the rows it reads)
                value = perturbed(value, generator) if perturb else value.clone()
            weights[name] = value
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # as they are (a model may
        # treat half-precision buffers, e.g. rotary tables, otherwise than float32 ones)
        tokens = tokens.to(device)
        by_id = {id(param): name for name, param in params.items()}
        # not a module's extra state (`get_extra_state`, e.g. an fp8 module's), maybe no tensor: its
        # `.detach()` raised, and the check was skipped with a warning (custom-architecture review)
        source_state = {key: weights[by_id[id(v)]] if id(v) in by_id else v.detach()
                        for key, v in without_extra_state(model.state_dict(keep_vars=True)).items()}
        # parametrized weights (weight_norm, ...) as the model computes them from these copies
        source_state = effective_state_dict(model, source_state)
        attributes = _ModuleAttributes(model)  # the forward may cache or count in plain attributes
        dtypes = HalfPrecisionOutputs()
        # eager even where the user compiled the model in place (Module.compile: a compile here would
        # cost a recompilation at the first training step); full float32 products. The global RNG
        # states the forward may draw from are restored by `_attach`, this check's one caller
        with torch.no_grad(), \
                torch.compiler.set_stance("force_eager"), torch.autocast(device.type, enabled=False), \
                full_float32_matmuls():
            model.eval()
            state = {**weights, **buffers}

            call = _SourceLogits(model, self._converter)  # the converter's source_logits(model, tokens)
            call_state = {f"model.{name}": value for name, value in state.items()}
            where = source_logits_call(self._converter)

            def logits_of(tokens: Tensor) -> Tensor:
                try:
                    logits = dtypes.call(lambda: torch.func.functional_call(call, call_state, (tokens,),
                                                                            tie_weights=True, strict=False))
                except NotLogitsError as err:
                    raise _NotLogits(str(err)) from None
                if not are_logits_for(logits, tokens, cfg.d_vocab_out):
                    raise _NotLogits(f"{where} returned {describe_output(logits)}")
                return logits.float()

            try:
                try:
                    source = logits_of(tokens)
                except _NotLogits:
                    raise
                except Exception as err:  # too long for the model, whose context the converter overstates?
                    if _out_of_memory(err):
                        raise
                    tokens, source = self._parity_within_context(logits_of, tokens, err)
                t = tokens.shape[1]
                # (logits, prefix length) compared at their last positions
                pairs: list[tuple[Tensor, int | None]] = [(source, None)]
                if source.shape[1] < t:  # the last positions only: earlier ones through prefixes
                    pairs += [(logits_of(tokens[:, :n]), n) for n in sorted({max(1, t * k // 4) for k in (1, 2, 3)})]
            except _NotLogits as err:
                return str(err)
            finally:
                attributes.restore()  # the training flags among them
            converted = build_hooked_transformer(self._converter, self._model_config, source_state,
                                                 device=device)(tokens).float()
        diff, scale, finite, unmasked = 0.0, 0.0, 0, 0
        for logits, n in pairs:
            reference = converted[:, :n] if n is not None else converted
            reference = reference[:, -logits.shape[1]:]
            unmasked += unmasked_logits(logits, reference)
            finite += int(torch.isfinite(logits).sum())
            # not those a model masks (padded vocabulary ids at -inf or -1e4), nor those far below their row's
            # largest in a confident or perturbed model: `unmasked_logits` checks them; each row keeps its largest
            kept = compared_logits(logits)
            if not bool(kept.any()):
                continue
            scale = max(scale, float(logits[kept].abs().max()))
            diff = max(diff, float((reference[kept] - logits[kept]).abs().nan_to_num(nan=math.inf).max()))
        if finite < converted.shape[-1]:
            return "the model's logits are not finite"
        rtol = PARITY_RTOL_LOW_PRECISION if dtypes.may_be_half else PARITY_RTOL
        # what check_parity, named in the error, does otherwise
        caveats = ["on a float32 copy (copy.deepcopy(model).float()): this check ran the model's weights in float32"
                   ] if any(p.is_floating_point() and p.dtype != torch.float32 for p in params.values()) else []
        if len(pairs) > 1:
            caveats.append("this check also compared prefixes of the tokens at their last positions (the model "
                           "returns the last position only), which that call does not")
        if tokens.shape[1] != self._parity_len():
            caveats.append(f"this check ran the first {tokens.shape[1]} of its {self._parity_len()} tokens per "
                           f"sequence, within the model's context, where that call draws {tokens.shape[1]} others")
        return _ParityOutcome(diff, scale, rtol, caveats, tokens.shape[1], unmasked)

    def _parity_within_context(self, logits_of: Callable[[Tensor], Tensor], tokens: Tensor,
                               err: Exception) -> tuple[Tensor, Tensor]:
        """After ``model(tokens)`` raised ``err``: ``(tokens, logits)`` at the probes' own longest length if
        that is shorter (the check's 64-token minimum may pass a short context), `_TooLong` if the model
        fails there but runs on a few tokens, else ``err``."""
        # probes that read no batch (weights only) have no length of their own: a few tokens still check the
        # conversion (their length of 0 tried a 0-token forward, and named 0-token sequences in `_TooLong`'s error)
        probe_len = self._probe_len()
        longest = min(tokens.shape[1], probe_len or PARITY_FEW_TOKENS)
        if longest < tokens.shape[1]:
            try:
                return tokens[:, :longest], logits_of(tokens[:, :longest])
            except Exception as shorter:  # noqa: BLE001 - reported below
                err = shorter
        if not probe_len:  # no probe sequence to fit: the check is skipped with the model's error
            raise err from None
        if runs_on_a_few_tokens(logits_of, tokens[:, :longest]) is None:  # not a matter of length: err is the reason
            raise err from None
        raise _TooLong(f"{type(err).__name__}: {err}") from err

    def _make_inputs(self, train: Any, val: Any, vocab_size: int, from_datamodule: bool) -> ProbeInputs:
        text_len = self._text_len
        assert text_len is not None  # validate, before _attach, set it
        needed = self.runner.needed_batches
        odd = [f"{name} ({type(data).__name__})" for name, data in (("train_data", train), ("val_data", val))
               if data is not None and not _is_token_array(data)]
        if odd and not from_datamodule:  # handed to `attach`: a mistake, not a datamodule's other attribute
            raise ValueError(f"LensCallback.attach: {' and '.join(odd)} must be a 1-D array of token ids (a torch "
                             f"tensor, numpy array or np.memmap of integers), or None for random probe inputs")
        if odd:  # e.g. a TensorDataset under the conventional name: not a token stream to draw from
            self._warn_once("inputs-type", f"LensCallback: the datamodule's {', '.join(odd)} is not a 1-D array of "
                                           f"token ids; using random probe inputs instead (see below)")
            train = train if _is_token_array(train) else None
            val = val if _is_token_array(val) else None
        lacking = [(name, what) for name, data, batch, what in (
            ("train_data", train, "repeated", f"repeated sequences draw from the ids of a seeded stream of "
                                              f"{fallback_pool_size(text_len)} token ids, uniform over the "
                                              f"vocabulary (those making up at least token_min_frequency of it)"),
            ("val_data", val, "text", "the text batch is random tokens")) if data is None and batch in needed]
        if lacking:  # only what a batch the probes need is drawn from
            where = ("given to attach" if not from_datamodule else
                     "on the datamodule" if not self._fit_without_datamodule else
                     "(this fit has no datamodule: LensCallback reads them, 1-D token-id arrays, from a "
                     "LightningDataModule passed as fit(..., datamodule=...))")
            names = " and ".join(f"`{n}`" for n, _ in lacking)
            # say how to probe on one's own data: a datamodule yielding dicts of windows (Hugging Face style)
            # has no attribute of these names, and random tokens make the text probes' numbers meaningless
            fix = (f"; to probe on your data, give the datamodule {names} (in __init__ or setup): 1-D arrays of "
                   f"token ids (a tensor, numpy array or np.memmap), e.g. the token stream its datasets cut "
                   f"examples from" if from_datamodule and not self._fit_without_datamodule else
                   f"; to probe on your data, pass them to attach(model, train_data, val_data) as 1-D arrays of "
                   f"token ids" if not from_datamodule else "")
            self._warn_once("inputs", f"LensCallback found no {' or '.join(f'`{n}`' for n, _ in lacking)} {where}: "
                                      f"{' and '.join(what for _, what in lacking)}{fix}")
        origin = "the datamodule" if from_datamodule else "attach"

        def source(name: str, data: Any) -> str:
            if data is not None:
                return f"{origin}'s {name} ({len(data)} tokens)"
            why = (f"the datamodule's {name} is not a 1-D array of token ids" if any(o.startswith(name) for o in odd)
                   else "this fit has no datamodule" if from_datamodule and self._fit_without_datamodule
                   else f"no {name} on the datamodule" if from_datamodule else f"no {name} given to attach")
            return f"a seeded stream of {fallback_pool_size(text_len)} random token ids ({why})"

        sources = [source("train_data", train), source("val_data", val)]
        if train is None or val is None:
            gen = torch.Generator().manual_seed(self.seed + 2)
            fallback = torch.randint(0, vocab_size, (fallback_pool_size(text_len),), generator=gen)
            train = train if train is not None else fallback
            val = val if val is not None else fallback
        try:
            return make_probe_inputs(
                train, val, vocab_size,
                repeat_length=self.repeat_length,
                repeat_batch=self.repeat_batch if "repeated" in needed else 0,
                text_len=text_len,
                text_batch_size=self.text_batch if "text" in needed else 0,
                seed=self.seed,
                min_count=min_token_count(self.token_min_frequency, len(train)),
            )
        except ValueError as err:  # name the settings and data the user controls
            raise ValueError(
                f"LensCallback cannot draw its probe inputs from {sources[0]} and {sources[1]} with repeat_length="
                f"{self.repeat_length}, text_len={text_len}, token_min_frequency={self.token_min_frequency}: {err}"
            ) from err

    def probe_settings(self) -> dict[str, Any]:
        """What post-hoc re-probing needs to reproduce this callback's numbers (plain values): the probe
        settings (`lens_callback.posthoc.ProbeSettings.from_dict` reads them) and the input settings
        (`INPUT_SETTINGS`)."""
        return {
            "probes": list(self.probes),
            "probe_options": self.probe_options,
            "max_batch_tokens": self.max_batch_tokens,
            "per_head_scalars": self.per_head_scalars,
            "repeat_length": self.repeat_length,
            "repeat_batch": self.repeat_batch,
            "text_len": self._text_len,
            "text_batch": self.text_batch,
            "seed": self.seed,
            "token_min_frequency": self.token_min_frequency,
        }

    def probe_step(
        self, trainer: L.Trainer | None, step: int, state_dict: Mapping[str, Tensor], final: bool = False
    ) -> Measurement | None:
        """Refresh, probe, log and snapshot at ``step`` (rank 0). Faults are counted, not raised (with
        ``strict=True``: raised as `LensError`).

        ``trainer=None`` (a hand-written loop after :meth:`attach`) skips logging; results are in
        ``history`` and the returned :class:`Measurement`. ``state_dict``: the model's weights,
        ``model.state_dict()`` (pruned weights, ``X.weight_orig`` and ``X.weight_mask``, are read as their
        product), or `effective_state_dict` for a model with parametrizations.

        Raises:
            RuntimeError: in a hand-written loop, if :meth:`attach` was not called.
            ValueError: in a hand-written loop, if ``step`` is not an integer in ``[0, 2**63)`` (a numpy or
                0-d tensor integer is taken as its int), or is before the run's last probed step (a
                run's steps only go forward: a new loop from step 0 takes a new ``LensCallback``).
            TypeError: in a hand-written loop, if ``state_dict`` is not a mapping (the model itself, say).
        """
        with self._probing():
            return self._probe_step(trainer, step, state_dict, final)

    @contextlib.contextmanager
    def _probing(self) -> Iterator[None]:
        """Marks a probe step, where `_warn_once` logs rather than raises under a warnings-as-errors filter."""
        outer = self.__dict__.get("_in_probe_step", False)
        self.__dict__["_in_probe_step"] = True
        try:
            yield
        finally:
            self.__dict__["_in_probe_step"] = outer

    def _probe_step(
        self, trainer: L.Trainer | None, step: int, state_dict: Mapping[str, Tensor], final: bool
    ) -> Measurement | None:
        """`probe_step`'s work."""
        if trainer is None:  # a Trainer's step is its global_step; a loop's is the user's, checked before it counts
            if self._hooked is None or self._inputs is None:
                # after a Trainer's fit (`_release_fit`) the run's record stays, the private model does not; not
                # after the user's own attach that raised (`_outside_trainer`): no Trainer took part there
                after_fit = (" (a Trainer's fit gives back the model it attached when it ends)"
                             if self.probed_steps and not self._outside_trainer else "")
                raise RuntimeError(f"LensCallback.probe_step(None, ...): call attach(model, train_data, val_data) "
                                   f"first (it has not run, or it raised){after_fit}")
            try:
                step = check_step(step)
            except ValueError:
                raise ValueError(f"LensCallback.probe_step: step must be an int in [0, 2**63) (the optimizer step), "
                                 f"got {step!r}") from None
            if self.probed_steps and step < self.probed_steps[-1]:  # its snapshots would replace the run's
                raise ValueError(f"LensCallback.probe_step: step {step} is before this run's last probed step "
                                 f"{self.probed_steps[-1]} (a run's steps only go forward); a new loop from an "
                                 f"earlier step is a new run: use a new LensCallback")
            if not isinstance(state_dict, Mapping):  # a module passed here was a probe fault, the step used up
                hint = " (pass model.state_dict())" if isinstance(state_dict, nn.Module) else ""
                raise TypeError(f"LensCallback.probe_step: state_dict must be a mapping of the model's weights, got "
                                f"{type(state_dict).__name__}{hint}")
        started = time.perf_counter()
        if trainer is None and (not self.probed_steps or step > self.probed_steps[-1]):
            self.probed_steps.append(step)  # a hand-written loop: counted here (snapshot_every)
        measurement: Measurement | None = None
        try:
            measurement = self._refresh_and_measure(step, state_dict)
        except Exception as err:  # noqa: BLE001 - a probe must never kill training unless strict
            self._fault("probe", f"probe step {step} failed: {error_text(err)}", step, err)
        errors = self.runner.failure_errors  # strict raises from a probe's error; not kept: its frames hold activations
        try:
            for name, what in (measurement.failures if measurement is not None else {}).items():
                # the other probes' results are complete and logged; where a probe raised is the user's first question
                where = raised_at(errors[name]) if name in errors else None
                self._fault("probe", f"probe {name!r} failed at step {step} in {what}{f' (at {where})' if where else ''}",
                            step, errors.get(name))
        finally:
            errors.clear()
        # TransformerLens zeroes NaN attention patterns, so NaN in W_Q/W_K can leave the results finite
        weights_ok = measurement is None or measurement.checks.get("weights_finite", True)
        if measurement is not None and not (measurement.finite() and weights_ok):
            if weights_ok:  # name the probes whose results are not finite
                which = sorted({name.split("/")[0] for name, value in measurement.arrays.items()
                                if not np.isfinite(value).all()})  # a result is '<probe>' or '<probe>/<key>'
                why = f"from probes {which}: NaN/inf activations?"
            else:
                why = "the converted weights are not finite: every result of the step is recorded as NaN"
            self._fault("nonfinite", f"non-finite probe results at step {step} ({why})", step)
            if not weights_ok:
                measurement.void()  # finite-looking scores of a broken model: NaN, skipped live and post hoc alike

        scalars = dict(measurement.scalars) if measurement is not None else {}
        scalars["lens/errors"] = float(sum(self.errors.values()))  # before the rules: one may watch it
        new_events: list[Event] = []
        if self.detector is not None:
            if self._check_rule_tags and measurement is not None:
                self._check_rule_tags = self._warn_unlogged_rule_tags(scalars, measurement.failures)
            new_events = self.detector.update(step, scalars)
        for event in new_events:
            scalars[f"lens/events/{event.name}"] = float(event.value)
        self.history[step] = scalars
        # the snapshot before logging: a step whose snapshot stops the fit (a strict fault, Ctrl-C during a
        # long write) is taken again by the resumed fit, which would log it a second time (logging review)
        if self._snapshot_root is not None and (final or self._snapshot_due(step)):
            self._snapshot(step, state_dict)
        elif self._snapshot_root is not None and new_events:
            self._write_events_index()
        try:
            if trainer is not None:
                self._log(trainer, step, scalars, measurement, new_events)
        except LensError:  # strict: a logger's fault, raised by _log once every logger was written
            raise
        except Exception as err:  # noqa: BLE001
            self._fault("log", f"logging probe results at step {step} failed: {error_text(err)}", step, err)
        self.timings.append(time.perf_counter() - started)
        return measurement

    def _warn_unlogged_rule_tags(self, scalars: Mapping[str, float], failed: Collection[str] = ()) -> list[str]:
        """Warns about the rule tags of `_check_rule_tags` that the enabled probes do not log (a typo
        never fires).

        Returns the tags still undecided: those missing because their probe (``lens/<probe>...``)
        failed at this step (named in ``failed``), which would have logged them; the next step decides.
        """
        unlogged = [tag for tag in self._check_rule_tags if tag not in scalars]
        pending = [tag for tag in unlogged if tag.startswith("lens/") and tag.split("/")[1] in failed]
        missing = [tag for tag in unlogged if tag not in pending]
        if missing:
            known = sorted(tag for tag in scalars if "/L" not in tag)
            # the list leaves the per-head tags out: a rule on one, with them off, would read as a typo (events review)
            heads = ("; per-head tags (lens/<probe>/L<layer>H<head>) are logged with per_head_scalars=True"
                     if not self.per_head_scalars and any(_PER_HEAD_TAG.search(tag) for tag in missing) else "")
            self._warn_once(f"event-rules:{missing}", f"LensCallback: event_rules watch {missing}, which the enabled "
                                                      f"probes do not log; those rules never fire. Logged tags include: "
                                                      f"{known}{heads}")
        return pending

    @global_rngs_kept()
    def _refresh_and_measure(self, step: int, state_dict: Mapping[str, Tensor]) -> Measurement:
        """Copies ``state_dict``'s weights into the private model and runs the probes. With the global
        RNG states restored afterwards: a converter or a user's probe may draw from them (a random
        baseline direction, say), which would change a training run's dropout masks."""
        if self._hooked is None:
            raise RuntimeError("the HookedTransformer was not built (on_train_start did not run on this rank)")
        # validate set the converter and config before the build; attach, the copier with the model
        assert self._converter is not None and self._model_config is not None and self._copier is not None
        try:
            # a hand-written loop may pass a wrapper's state dict (the Trainer path strips it already)
            source = self._converter.source_weights(strip_prefixes(state_dict))
            self._copier(self._converter.convert_weights(self._model_config, source))
        except Exception as err:
            if _out_of_memory(err):  # passing: the weights may well convert, and their snapshot reload
                raise
            self._unconvertible_step = step  # no snapshot (`_snapshot`)
            if holds_parametrized_originals(state_dict):
                # a hand-written loop's model.state_dict(), or a sharded model's gathered one
                raise RuntimeError(
                    f"the weights do not convert: the state dict holds the originals of parametrized weights "
                    f"(torch.nn.utils.parametrize, e.g. weight_norm), not the weights the model computes with; in "
                    f"a hand-written loop pass lens_callback.convert.effective_state_dict(model) instead of "
                    f"model.state_dict() (under sharded strategies parametrizations are not read): "
                    f"{type(err).__name__}: {err}") from err
            raise RuntimeError(
                f"the weights do not convert with the model_config taken when the callback attached (a model "
                f"changed during the fit, e.g. by nanoGPT's crop_block_size: change it before fit, or in "
                f"configure_model; or, in a hand-written loop, the state dict of another module, e.g. a "
                f"LightningModule's, whose keys carry its attribute's name): {type(err).__name__}: {err}") from err
        self._unconvertible_step = None  # a step that failed to convert once converts now
        return self._measure(step)

    def _measure(self, step: int, check_weights: bool = True) -> Measurement:
        """Runs the probes on the refreshed model (and, with ``check_weights``, the finite-weights
        check, read in the same transfer: ``Measurement.checks["weights_finite"]``).

        If they fail with the lean attention path, succeed without it and fail with it again, the
        lean path is dropped for the rest of the run (one warning, no fault). If the second lean run
        succeeds, the first failure was transient (e.g. out of memory): a probe fault (counted, or
        raised under ``strict``), and the step's results are kept. Otherwise the first error
        propagates.
        """
        # the weights' finite check travels to the host with the results, in their one transfer
        checks = {"weights_finite": self._weights_finite_flag()} if check_weights else None
        if self._lean and has_hooks():
            self._warn_once("global-hooks", "LensCallback: a global module hook is registered "
                                            "(torch.nn.modules.module.register_module_forward_hook or its pre-hook "
                                            "twin); it sees every module call, so the lean attention's shortcuts are off "
                                            "while it is (slower probe steps, results equal to float rounding)")

        def run(lean: bool) -> Measurement:
            # _refresh_and_measure, the caller, checked the model; attach sets the inputs with it
            assert self._hooked is not None and self._inputs is not None
            return measure(self._hooked, self.runner, self._inputs, max_batch_tokens=self.max_batch_tokens,
                           per_head_scalars=self.per_head_scalars, lean_attention=lean, cuda_graph=self.cuda_graphs,
                           checks=checks)

        try:
            result = run(self._lean)
            if self.runner.graph_failure is not None:
                self._warn_once("graph", f"LensCallback: the probe run could not be recorded as a CUDA graph "
                                         f"({self.runner.graph_failure}); it runs eagerly (cuda_graphs=False silences this)")
            return result
        except Exception as err:
            if not self._lean:
                raise
            try:  # is it the lean path's fault? Only if TransformerLens's attention gets through
                result = run(False)
            except Exception:
                raise err from None
            try:  # and the lean path fails again: a transient fault (out of memory, ...) is not its fault
                result = run(True)
            except Exception:
                self._lean = False
                self._warn_once("lean", f"LensCallback: lean attention failed at step {step} ({error_text(err)}); "
                                        f"using TransformerLens's attention from now on")
                return result
            self._fault("probe", f"probe step {step} failed once and succeeded when run again: {error_text(err)}",
                        step, err)
            return result

    def _weights_finite_flag(self) -> Tensor:
        """Whether every weight of the refreshed HookedTransformer is finite, on its device (`finite_flag`)."""
        assert self._copier is not None  # _refresh_and_measure, the caller, has just copied the weights with it
        return finite_flag(self._copier.parameters)

    # -- output ----------------------------------------------------------------------------------
    def _log(self, trainer: L.Trainer, step: int, scalars: Mapping[str, float], measurement: Measurement | None,
             events: Sequence[Event]) -> None:
        loggers = _real_loggers(trainer)
        tensorboard, wandb = _lightning_classes("TensorBoardLogger"), _lightning_classes("WandbLogger")
        # lightning.pytorch's or pytorch_lightning's TensorBoardLogger: one code base (`_lightning_classes`)
        tensorboards = cast("list[TensorBoardLogger]", [lg for lg in loggers if isinstance(lg, tensorboard)])
        spans = {probe.name: probe.heatmap_range for probe in self.runner.probes}  # each heatmap's colour scale
        faults: list[str] = []  # each logger is written on its own: one that fails costs the others nothing
        for logger in loggers:
            if not isinstance(logger, tensorboard):  # those get one event below
                try:
                    metrics: dict[str, Any] = dict(scalars)
                    if isinstance(logger, wandb):  # one row per probe step: its scalars, heatmaps and events
                        heatmaps = {name: (measurement.arrays[name], spans[name]) for name in measurement.per_head
                                    } if self.heatmaps and measurement is not None else {}
                        metrics |= wandb_media(heatmaps, [(e.step, e.name, e.detail) for e in events], step)
                    logger.log_metrics(metrics, step=step)
                except Exception as err:  # noqa: BLE001 - a fault, below
                    faults.append(f"{type(logger).__name__}: {type(err).__name__}: {err}")
        if loggers and not any(isinstance(lg, tensorboard + wandb) for lg in loggers) and (self.heatmaps or events):
            self._warn_once("images", "LensCallback: no TensorBoardLogger (or WandbLogger); heatmap images and event "
                                      "text are skipped")
        images = {}
        if tensorboards and self.heatmaps and measurement is not None:  # encoded for TensorBoard only
            images = {heatmap_tag(name): heatmap_png(measurement.arrays[name], vmin=spans[name][0], vmax=spans[name][1])
                      for name in measurement.per_head}
        # the custom-scalars layout (TensorBoard reads one per run), at the first measured step; a probe that
        # failed there gets its charts by name (per-head probes: their heads, not results beside them, whose
        # names are unknown; others: one chart of all their tags)
        layout = self.custom_scalars and not self._layout_written and measurement is not None
        if layout:
            assert measurement is not None  # layout asks for one
            failed = {probe.name: probe.per_head for probe in self.runner.probes if probe.name in measurement.failures}
            per_head = [*measurement.per_head, *(name for name, heads in failed.items() if heads)]
            # single-valued results only: per-layer vectors (logit lens) have their own charts
            scalar_names = [n for n, a in measurement.arrays.items() if n not in measurement.per_head and a.size == 1]
            # its sub-results too; not the logit lens's per-layer results, which have charts of their own
            unknown = [name for name, heads in failed.items() if not heads and name != "logit_lens"]
            logit_lens = any(probe.name == "logit_lens" for probe in self.runner.probes)
            # other results with several entries (a user probe's per-layer vector): a chart each
            vectors = {n: a.ndim for n, a in measurement.arrays.items() if n not in measurement.per_head
                       and a.size > 1 and not (logit_lens and n.partition("/")[0] == "logit_lens")}
        written = 0
        for logger in tensorboards:
            try:
                writer, prefix = logger.experiment, _tag_prefix(logger)
                if not self._run_id_logged:
                    # the run's id, once per fit (kept across a resume): what tells lens-report that event files in
                    # one directory (a fixed logger version) are two runs, and that a resume's version_k is this one
                    writer.add_text(f"{prefix}{RUN_ID_TAG}", self.run_id, step)
                if layout:
                    writer.add_custom_scalars(custom_scalars_layout(per_head, scalar_names, prefix=prefix,
                                                                    unknown=unknown, logit_lens=logit_lens,
                                                                    per_head_lines=self.per_head_scalars,
                                                                    vectors=vectors))
                write_summary(writer, step, scalars, images, prefix=prefix)
                if events:  # one entry per step: TensorBoard's default loader keeps one text per tag and step
                    writer.add_text(f"{prefix}lens/events", "\n\n".join(
                        f"**{event.name}** at step {event.step}: {event.detail}" for event in events), step)
                written += 1
            except Exception as err:  # noqa: BLE001 - a fault, below
                faults.append(f"{type(logger).__name__}: {type(err).__name__}: {err}")
        if written == len(tensorboards):  # else both written again with the next step, to every TensorBoard
            self._layout_written = self._layout_written or (bool(tensorboards) and layout)
            self._run_id_logged = True
        if faults:
            self._fault("log", f"logging probe results at step {step} failed: {'; '.join(faults)}", step)

    def _record_inputs(self) -> dict[str, Any]:
        """The probe inputs' digest per batch drawn (`probe_inputs_sha256` of that batch alone) and the
        settings that drew them (``settings``, and per batch, ``batch_settings``, where `_kept_inputs_record`
        keeps earlier parts' batches): what a resumed run compares its own with."""
        settings = self.probe_settings()
        batches = {name: probe_inputs_sha256(ProbeInputs(**{"repeated": None, "text": None, name: tokens}))
                   for name in ("repeated", "text") if (tokens := getattr(self._inputs, name)) is not None}
        drawn_with = {key: settings[key] for key in INPUT_SETTINGS}
        return {"batches": batches, "settings": drawn_with,
                "batch_settings": {name: dict(drawn_with) for name in batches}}

    def _kept_inputs_record(self) -> dict[str, Any] | None:
        """The probe inputs' record a checkpoint keeps: per batch kind, the last drawing of it in the run, this
        part's (`_record_inputs`) over the earlier parts' (`_restored_inputs`), each batch with the settings
        that drew it, so that a later part drawing a batch again compares it with the run's last one of its kind.
        This part's record alone lost what it did not draw: a part whose probes read the repeated batch only (or
        the weights only) passed on no text batch, and a change of it across that part went unwarned. Before this
        part has attached, the earlier part's record as it was restored."""
        record = self._inputs_record
        if record is None:
            return self._restored_inputs
        kept = {**_inputs_by_batch(self._restored_inputs), **_inputs_by_batch(record)}
        return {"batches": {name: digest for name, (digest, _) in kept.items()}, "settings": record["settings"],
                "batch_settings": {name: dict(settings) for name, (_, settings) in kept.items()}}

    def _compare_restored_inputs(self, step: int) -> None:
        """On resume, or a fit continuing its trainer's steps: a warning if a probe batch both parts draw
        differs from the run's last one of its kind (the checkpoint's, or the previous fit's), naming the
        settings changed since that batch was drawn (a batch the run never drew before, after a change of
        probes, is not compared)."""
        restored, now = _inputs_by_batch(self._restored_inputs), self._inputs_record
        if now is None:
            return
        befores = [restored[name][1] for name, digest in now["batches"].items()
                   if name in restored and restored[name][0] != digest]  # the changed batches' drawing settings
        if not befores:
            return
        changed = list(dict.fromkeys(f"{key} {before[key]!r} -> {now['settings'][key]!r}" for key in INPUT_SETTINGS
                                     for before in befores if key in before and before[key] != now["settings"][key]))
        what = ", ".join(changed) if changed else "the same settings, so the datamodule's train_data/val_data differ"
        # a step the earlier part probed keeps its values (the resumed fit does not probe it again)
        when = f"after step {step}" if step in self.probed_steps else f"from step {step} on"
        # once per change: a fit continuing the same Trainer on other data again changes them at another step
        self._warn_once(f"inputs-changed-{step}", f"LensCallback: the probe inputs differ from the run's earlier "
                                                  f"ones ({what}): values {when} are measured on other sequences than "
                                                  f"before, and the event detector compares across the change")

    def _claim_snapshots(self, step: int) -> None:
        """At train start (rank 0): which snapshots in the directory are this run's.

        A snapshot is this run's if it carries the run's id (``metadata.run_id``), or carries none
        (written before run ids) at a step the run's state lists. From scratch every snapshot there is
        another run's; on resume the state's list keeps only this run's snapshots still on disk
        (pruning, or another run, may have removed or replaced some), with this run's snapshot of the
        resumed step itself if the list lacks it (a final snapshot written after the last checkpoint,
        training having stopped early), and this run's snapshots after the resumed step, written by
        the attempt that died, are named in a warning. Pruning only ever removes steps on that list.
        """
        root = self._snapshot_root
        assert root is not None  # train start, the caller, checked it
        try:
            found = {info.step: info.metadata.get("run_id") for info in list_snapshots(root)}
        except OSError as err:
            self._fault("snapshot", f"listing the snapshot directory {root} failed: {err}", step, err)
            return
        listed = set(self.snapshot_steps_written)
        # a fit from step 0 starts a run, unless it resumes a checkpoint saved there (an interrupt in the first batch)
        continues = step > 0 or self._state_restored
        own = {s for s, run in found.items() if run == self.run_id or (run is None and s in listed)} if continues else set()
        kept = [s for s in self.snapshot_steps_written if s in own and s <= step]
        if continues and found.get(step) == self.run_id and step not in kept:
            # this run's snapshot of the checkpoint's own step, which the checkpoint does not list: the final
            # one, written after the last checkpoint when training stopped early (EarlyStopping, max_time);
            # it holds the weights resumed from, so it is the run's, counted and pruned (resume review)
            kept.append(step)
        self.snapshot_steps_written = kept
        abandoned = sorted(s for s in own if s > step)
        if abandoned:
            self._warn_once("snapshot-abandoned", f"LensCallback: {root} holds this run's snapshots of steps "
                                                  f"{abandoned}, written after the checkpoint it resumes from (step "
                                                  f"{step}) by a fit that ran on from it (an attempt that stopped, or "
                                                  f"a finished run this fit branches from in the same logger directory: "
                                                  f"give a branch its own snapshot_dir); steps written again replace "
                                                  f"theirs, the others stay on disk, not part of this run (delete them "
                                                  f"to keep them out of post-hoc sweeps)")
        others = sorted(s for s in found if s not in own)
        if others:
            index = "" if self.detector is not None else " (none: with events=False it is removed)"
            self._warn_once("snapshot-dir", f"LensCallback: {root} already holds snapshots of "
                                            f"another run (steps {others[:6]}{' ...' if len(others) > 6 else ''}); "
                                            f"this run's go beside them, a step written again replaces its "
                                            f"snapshot, max_snapshots prunes only this run's, and events.json "
                                            f"will list this run's events{index} (a directory per run keeps them "
                                            f"apart)")

    def _snapshot_due(self, step: int) -> bool:
        index = len(self.probed_steps) - 1  # this probe step's position in the run
        # a snapshot step counts at the probe step that reached it, or passed it in one batch (several
        # optimizers move global_step by more than one); a step reached but not probed takes none
        low = self._passed[0] if self._passed[1] == step else step - 1
        return index % self.snapshot_every == 0 or any(low < s <= step for s in self.snapshot_steps)

    def _snapshot(self, step: int, state_dict: Mapping[str, Tensor], final: bool = False) -> None:
        """Writes the snapshot of ``step`` (``final``: the final one, written in ``on_train_end``), prunes
        and rewrites events.json; a fault otherwise. Weights that did not convert at ``step`` (probe_step
        marks them) get none: its config.json would name the model_config of attach, and not reload."""
        assert self._snapshot_root is not None  # both callers checked it
        if step == self._unconvertible_step:
            self._fault("snapshot", f"the {'final ' if final else ''}snapshot of step {step} is not written: its "
                                    f"weights do not convert with the model_config the callback attached with, so "
                                    f"it would not reload", step)
            return
        written = False  # then a failure is pruning's (an unreadable entry in the root) or the index's
        try:
            # a validate that passed set them; an assert inside the try: a fault of this step, not a crash
            assert self._converter is not None and self._model_config is not None, "no converter validated yet"
            if self._inputs is not None and _draws_a_batch(self._inputs):
                save_probe_inputs(self._snapshot_root, self._inputs, self.probe_settings())
            save_snapshot(
                self._snapshot_root, step, converter=self._converter.name, model_config=self._model_config,
                state_dict=without_extra_state(state_dict),
                metadata={"probe_settings": self.probe_settings(), "global_step": step, "run_id": self.run_id,
                          "probe_inputs_sha256": self._inputs_digest,
                          "events": [e.to_dict() for e in (self.detector.events if self.detector else [])],
                          **({TOKENIZER_KEY: self._tokenizer_spec} if self._tokenizer_spec is not None else {})},
            )
            if step not in self.snapshot_steps_written:
                self.snapshot_steps_written.append(step)
            written = True
            if self.max_snapshots is not None:
                try:
                    removed = prune_snapshots(self._snapshot_root, self.max_snapshots,
                                              protect=self._kept_for_events(step), among=self.snapshot_steps_written,
                                              run_id=self.run_id)
                except SnapshotPruneError as err:  # those removed before it are gone: the index (below) must not name them
                    self.snapshot_steps_written = [s for s in self.snapshot_steps_written if s not in err.removed]
                    raise
                self.snapshot_steps_written = [s for s in self.snapshot_steps_written if s not in removed]
            self._write_events_index()
        except LensError:  # strict: events.json could not be written (`_write_events_index` named it)
            raise
        except SnapshotPruneError as err:  # this step's snapshot is written and listed: an older one stayed
            self._write_events_index(quiet=True)
            self._prune_fault(step, str(err), err)
        except Exception as err:  # noqa: BLE001
            # the events found so far reach the index without this snapshot (its snapshot_after: a
            # later one); quietly: a write that fails for the same reason is this one fault, not two
            self._write_events_index(quiet=True)
            if written:  # e.g. pruning could not list the root: the snapshot is there all the same (faults review)
                self._prune_fault(step, error_text(err), err)
                return
            self._fault("snapshot", f"writing the snapshot of step {step} into {self._snapshot_root} failed: {error_text(err)}",
                        step, err)

    def _prune_fault(self, step: int, why: str, err: Exception) -> None:
        """The fault of a prune that failed after step ``step``'s snapshot was written and listed."""
        self._fault("snapshot", f"the snapshot of step {step} is written, but pruning older snapshots "
                                f"(max_snapshots={self.max_snapshots}) failed: {why}", step, err)

    def _kept_for_events(self, step: int) -> set[int]:
        """Snapshot steps pruning must keep at ``step``: those around each event so far, and those an
        event not yet detected may still need. A steepest-rise rule places a later event between two
        consecutive probe steps of an interval that starts at its current reference or after it (a
        window back, or further where NaN values were ignored: `EventDetector.earliest_open_step`), so
        every snapshot from there on, and the one before, stays. A run with ``events=False`` keeps
        those its own ``events.json`` names (written by a first part with events on, which it keeps:
        `_write_events_index`; events review)."""
        events = self.detector.events if self.detector is not None else []
        kept = {s for event in events for s in self._around(event.step) if s is not None}
        if self.detector is None:
            kept.update(self._steps_named_by_own_events_index())
        horizon = self.detector.earliest_open_step() if self.detector is not None else None
        if horizon is not None:
            kept.update(s for s in self.snapshot_steps_written if s >= horizon)
            before = [s for s in self.snapshot_steps_written if s < horizon]
            if before:
                kept.add(max(before))
        return kept

    def _events_index_on_disk(self) -> tuple[dict[str, Any] | None, bool]:
        """``(index, another run's)``: ``<snapshot_dir>/events.json`` as written (``None`` when missing,
        unreadable or not an object) and whether another run (another id) wrote it; one without an id
        (written before ids were recorded) counts as this run's."""
        assert self._snapshot_root is not None  # both callers checked it
        try:
            index = json.loads((self._snapshot_root / "events.json").read_bytes())
        except (OSError, ValueError, RecursionError):
            return None, False
        if not isinstance(index, dict):
            return None, False
        written_by = index.get("run_id")
        return index, isinstance(written_by, str) and written_by != self.run_id

    def _steps_named_by_own_events_index(self) -> set[int]:
        """The snapshot steps this run's ``events.json`` names (``snapshot_before``/``snapshot_after``), or
        one without a run id's (from before ids, which `_write_events_index` keeps too); none if the file
        is missing, unreadable or another run's, and no entry that is not a step."""
        if self._snapshot_root is None:
            return set()
        index, others = self._events_index_on_disk()
        if index is None or others:
            return set()
        try:
            return {event[key] for event in index["events"] for key in ("snapshot_before", "snapshot_after")
                    if isinstance(event.get(key), int) and not isinstance(event.get(key), bool) and event[key] >= 0}
        except (AttributeError, KeyError, TypeError):  # an entry that is no event: the file is unreadable
            return set()

    def _write_events_index(self, quiet: bool = False) -> None:
        """``<snapshot_dir>/events.json``: each event with the snapshots just before and after it.

        It records the run's id. A run with ``events=False`` writes none, and removes one that another run
        (another id) left in the root: it would name snapshots this run replaces, and ``lens-report`` would
        take it for this run's events (guarantees review); its own, from a first part with events on, and
        one without an id (written before ids were recorded) stay. A failed write or removal is a
        ``snapshot`` fault, or with ``quiet`` ignored (the caller reports one).
        """
        if self._snapshot_root is None:
            return
        path = self._snapshot_root / "events.json"
        if self.detector is None:
            try:
                if self._events_index_on_disk()[1]:
                    path.unlink(missing_ok=True)
            except OSError as err:
                if not quiet:
                    self._fault("snapshot", f"removing another run's {path} failed: {err}",
                                max(self.snapshot_steps_written, default=0), err)
            return
        self._forget_replaced_snapshots()
        index = []
        for event in self.detector.events:
            before, after = self._around(event.step)
            index.append({**event.to_dict(), "snapshot_before": before, "snapshot_after": after})
        try:
            atomic_write(path, json.dumps({"run_id": self.run_id, "events": index}, indent=2).encode(), durable=True,
                         prefix=TMP_PREFIX)
        except OSError as err:
            if not quiet:
                self._fault("snapshot", f"writing {path} failed: {err}", index[-1]["step"] if index else 0, err)

    def _forget_replaced_snapshots(self) -> None:
        """Drops from ``snapshot_steps_written`` the snapshots events.json would name that are no longer
        this run's: a run writing into the same directory at the same time may have replaced one with
        its own (or removed it). Reads a few ``config.json`` files, those around the events only."""
        root = self._snapshot_root
        events = self.detector.events if self.detector is not None else []
        while root is not None:
            named = {s for event in events for s in self._around(event.step) if s is not None}
            gone = {s for s in named if not self._owns_snapshot(root / snapshot_dirname(s))}
            if not gone:
                return
            self.snapshot_steps_written = [s for s in self.snapshot_steps_written if s not in gone]

    def _owns_snapshot(self, path: Path) -> bool:
        """Whether the snapshot at ``path`` is this run's (`is_runs_snapshot`); ``False`` if it is not a
        complete, readable snapshot (gone)."""
        try:
            return is_runs_snapshot(read_snapshot_config(path)["metadata"], self.run_id)
        except SnapshotError:
            return False

    def _around(self, step: int) -> tuple[int | None, int | None]:
        """The snapshot steps just before ``step`` (strictly) and at or after it (``None`` if none)."""
        written = sorted(self.snapshot_steps_written)
        before = [s for s in written if s < step]
        after = [s for s in written if s >= step]
        return (before[-1] if before else None), (after[0] if after else None)

    # -- faults ----------------------------------------------------------------------------------
    def _fault(self, kind: str, message: str, step: int, err: BaseException | None = None) -> None:
        if self.strict:
            error = LensError(message)
            error.kind = kind
            raise error from err
        self.errors[kind] += 1
        self._warn_once(kind, f"{message} (LensCallback keeps training; further '{kind}' faults are counted in lens/errors)",
                        fault=True)

    def _warn_once(self, kind: str, message: str, *, fault: bool = False, raising: bool = True) -> None:
        """Warns once per ``kind``. Under a filter that makes warnings errors (pytest's ``-W error``) a
        fault's warning (wherever it happens) and any warning in a probe step (`_probing`) go to this
        module's logger instead, so that they stop no fit; a setting's warning at setup or train start
        raises as the filter says (``raising=False``: logged instead, as a fit's end gives them)."""
        if kind not in self._warned:
            self._warned.add(kind)
            self._warn(message, raising=raising and not (fault or self.__dict__.get("_in_probe_step", False)))

    @staticmethod
    def _warn(message: str, *, raising: bool) -> None:
        """``rank_zero_warn``; under a filter that makes warnings errors, raised if ``raising``, else logged
        to this module's logger."""
        try:
            rank_zero_warn(message, category=UserWarning)
        except Warning:
            if raising:
                raise
            log.warning(message)
