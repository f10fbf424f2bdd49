"""``lens-probe``: re-run the probes on saved snapshots or on a nanoGPT ``ckpt.pt``, after training.

Usage::

    lens-probe PATH [--logdir OUT] [--csv FILE] [--device cpu]

``PATH`` is one of:

* a **snapshot root** (the directory the callback writes snapshots into): every complete snapshot
  is re-probed at its own step. Probe settings come from each snapshot's ``config.json["metadata"]["probe_settings"]``
  (``{"probes", "probe_options", "max_batch_tokens", "per_head_scalars"}``) and the probe batches from
  the root's ``probe_inputs.safetensors``, so the numbers equal those logged live (same
  :func:`~lens_callback.measure.measure`) and no training data is needed;
* a **single snapshot directory** (``root/step-NNNNNNNN``): the same, for that step only;
* a nanoGPT **``ckpt.pt``**: loaded with ``weights_only=True`` (see
  :mod:`lens_callback.checkpoints`) and probed at its ``iter_num`` (or ``--step``). There are no
  saved probe batches, so they are built here: the repeated batch is uniform-random token ids
  (``--repeat-batch`` sequences of ``2 * --repeat-length`` tokens) from a private ``torch.Generator``
  seeded ``--seed``, drawn from the ids making up at least ``--token-min-frequency`` (1e-4) of
  ``--text FILE``, as the callback draws from its training data, or without ``--text`` from the whole
  vocabulary (rare tokens' embeddings are untrained: the induction score reads lower); the text batch (``--text-batch`` windows of
  ``--text-len`` tokens, generator seeded ``--seed + 1``) is drawn from ``--text FILE``: a nanoGPT
  token file (``*.bin``: uint16 ids, e.g. ``data/shakespeare_char/val.bin``), a text file encoded with
  ``--meta`` (the run's ``meta.pkl``, e.g. ``data/shakespeare_char/meta.pkl``), or for a byte-level vocabulary
  (256 ids, ``lens-train``'s byte tokenizer) any file's raw bytes as token ids; raw bytes for another
  vocabulary are refused (for GPT-2's they were ids in range, not the text's tokens). Without ``--text`` the
  default probes are those that need only the repeated batch. ``--probes``, ``--probe-options``,
  ``--max-batch-tokens`` and ``--no-per-head-scalars`` choose the probes. The flags that build the
  probe batches are refused for snapshots (exit 2), which are re-probed on the batches stored beside
  them; ``--probes`` there replaces the probe settings they carry (the other three with it, at their
  defaults where not given), e.g. ``--probes k_composition`` for a run trained without it.

Scalars go to a TensorBoard log directory (``SummaryWriter.add_scalar(tag, value, step)``, the
``lens/...`` tags of the live callback; read them back with :func:`~lens_callback.metrics.read_metrics`)
and/or a CSV file with columns ``step,tag,value``. Exit status: 0 on success, 2 for a bad path,
an unreadable or refused file, or invalid settings (with a message on stderr: one line, or one line
per bad snapshot).

Every snapshot is checked before any is probed (``COMPLETE``, ``config.json``, the weights' header,
which also finds a truncated file, against the converter and ``model_config``, the probe settings
by building the probes, the probe inputs it was probed on); a bad one stops the command before any
probing and nothing is written. A failure that only loading or probing finds (a read error, a probe
raising: `ProbeFailure`, naming the probe, the snapshot and what it raised; Ctrl-C) still writes the
models probed before it, says which, and exits 2 (or re-raises what is not a bad file or setting or
a probe's failure).
"""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import argparse
import csv
import importlib
import io
import json
import os
import shlex
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lens_callback.callback import INPUT_SETTINGS, fallback_pool_size, min_token_count
from lens_callback.checkpoints import CheckpointError, read_nanogpt_checkpoint
from lens_callback.fileio import atomic_write, make_dirs
from lens_callback.convert import (
    Converter,
    build_hooked_transformer,
    convert,
    copy_weights,
    get_converter,
)
from lens_callback.convert.base import (
    ConversionError,
    check_device_and_dtype,
    check_floating,
    checked_source_weights,
    finite_flag,
    global_rngs_kept,
    unavailable_accelerator,
    without_reprs,
)
from lens_callback.measure import DEFAULT_PROBES, build_runner, measure
from lens_callback.metrics import RUN_ID_TAG
from lens_callback.probes import (
    BATCH_KINDS,
    PROBES,
    ProbeInputs,
    available_probes,
    pack_attention_weights,
    repeated_tokens,
    text_batch,
)
from lens_callback.probes.inputs import (
    _check_token_data,
    check_probe_tokens,
    id_outside_vocab,
    one_distinct_token,
    token_pool_from_data,
)
from lens_callback.snapshots import (
    COMPLETE_FILE,
    CONFIG_FILE,
    ROOT_FILE_RE,
    SNAPSHOT_FILES,
    STEP_DIR_RE,
    SnapshotError,
    SnapshotInfo,
    UnknownConverterError,
    check_step,
    load_probe_inputs,
    load_snapshot_weights,
    read_snapshot_header,
    scan_snapshots,
    snapshot_converter,
)
from lens_callback.schedule import check_token_min_frequency, integer_or_none
from nanogpt_model.data import meta_stoi, read_meta

if TYPE_CHECKING:
    from nanogpt_model import GPTConfig

__all__ = ["ProbeSettings", "checkpoint_probe_inputs", "iter_reprobe", "main", "reprobe"]

Scalars = dict[str, float]


@dataclass(frozen=True)
class ProbeSettings:
    """What to measure: the part of the ``probe_settings`` the callback stores in each snapshot's
    metadata that says what is measured (`from_dict` reads the stored dict, whose input settings,
    `INPUT_SETTINGS`, it leaves out: the inputs themselves are stored beside the snapshots).

    Attributes:
        probes: Registered probe names.
        probe_options: ``{probe: {option: value}}`` passed to the probes.
        max_batch_tokens: Chunk size of the probe forwards (``None``: sized by the attention
            pattern, see ``lens_callback.probes.runner.rows_per_chunk``).
        per_head_scalars: Whether per-head probes also log one scalar per head.
    """

    probes: tuple[str, ...] = DEFAULT_PROBES
    probe_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_batch_tokens: int | None = None
    per_head_scalars: bool = True

    def __post_init__(self) -> None:
        """Checks settings built in Python (``reprobe(settings=ProbeSettings(...))``) as `from_dict` checks a
        stored dict's: ``probes="induction"`` was looked up as the probe names 'i', 'n', 'd', ... (one name
        is taken, as `build_runner` and `LensCallback` take it; a list is kept as a tuple), and
        ``per_head_scalars="false"`` logged every head's scalar (a flag that is no bool is refused, as
        `LensCallback` refuses it)."""
        probes = (self.probes,) if isinstance(self.probes, str) else self.probes
        if not isinstance(probes, (list, tuple)) or not all(isinstance(p, str) for p in probes):
            raise ValueError(f"ProbeSettings: probes must be probe names (a tuple of str, or one name), "
                             f"got {self.probes!r}")
        object.__setattr__(self, "probes", tuple(probes))
        options = self.probe_options
        if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
            raise ValueError(f"ProbeSettings: probe_options must map probe names to dicts of options, got {options!r}")
        if self.max_batch_tokens is not None:  # a numpy integer too, kept as a plain int (it goes to JSON)
            if (number := integer_or_none(self.max_batch_tokens)) is None or number < 1:
                raise ValueError(f"ProbeSettings: max_batch_tokens must be a positive int or None, "
                                 f"got {self.max_batch_tokens!r}")
            object.__setattr__(self, "max_batch_tokens", number)
        if not isinstance(self.per_head_scalars, bool):
            raise ValueError(f"ProbeSettings: per_head_scalars must be True or False, got {self.per_head_scalars!r}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "probe_settings", *, strict: bool = False) -> ProbeSettings:
        """Parses the metadata dict; raises ``ValueError`` naming ``where`` and the bad value.

        ``strict``: a key that is not a field is refused, so that a misspelt key is not replaced by its
        default without a word, and so is one of the input settings the callback stores beside them
        (`INPUT_SETTINGS`), which these settings would leave unused. A snapshot's own settings are
        read leniently: they hold the input settings, and a later version may store more."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object, got {data!r}")
        if strict:
            names = [f.name for f in fields(cls)]
            inputs = sorted(str(key) for key in data if key in INPUT_SETTINGS)
            if inputs:
                raise ValueError(f"{where}: {inputs} decide the probe inputs, not what is measured, and would be "
                                 f"left unused: pass inputs= instead (for a nanoGPT checkpoint, built with "
                                 f"checkpoint_probe_inputs), or for a snapshot's stored probe_settings, "
                                 f"ProbeSettings.from_dict(them); probe settings take {names}")
            unknown = sorted(str(key) for key in data if key not in names)
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {unknown}; probe settings take {names}")
        probes = data.get("probes", list(DEFAULT_PROBES))
        if not isinstance(probes, (list, tuple)) or not all(isinstance(p, str) for p in probes):
            raise ValueError(f"{where}: 'probes' must be a list of probe names, got {probes!r}")
        options = data.get("probe_options") or {}
        if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
            raise ValueError(f"{where}: 'probe_options' must map probe names to objects, got {options!r}")
        chunk = data.get("max_batch_tokens")
        if chunk is not None:  # a numpy integer too, stored as a plain int (it goes to JSON)
            if (number := integer_or_none(chunk)) is None or number < 1:
                raise ValueError(f"{where}: 'max_batch_tokens' must be a positive int or null, got {chunk!r}")
            chunk = number
        per_head = data.get("per_head_scalars", True)
        if not isinstance(per_head, bool):
            raise ValueError(f"{where}: 'per_head_scalars' must be true or false, got {per_head!r}")
        return cls(tuple(probes), {k: dict(v) for k, v in options.items()}, chunk, per_head)

    def to_dict(self) -> dict[str, Any]:
        return {
            "probes": list(self.probes),
            "probe_options": {k: dict(v) for k, v in self.probe_options.items()},
            "max_batch_tokens": self.max_batch_tokens,
            "per_head_scalars": self.per_head_scalars,
        }


def _check_settings(settings: ProbeSettings, where: str) -> None:
    """Builds the probes of ``settings`` once, so that a bad name or option fails before any probing.

    Raises:
        ValueError: naming ``where`` (an unknown probe also says how to register one of your own).
    """
    unknown = [name for name in settings.probes if name not in available_probes()]
    if unknown:
        raise ValueError(
            f"{where}: unknown probe(s) {unknown}; available: {available_probes()}. A probe of your own "
            "must be registered (lens_callback.register_probe) before re-probing: import its module first "
            "(lens-probe --import MODULE)"
        )
    try:
        build_runner(settings.probes, settings.probe_options)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from err


def _snapshot_settings(snapshot: Path, config: Mapping[str, Any]) -> ProbeSettings:
    """The probe settings stored in a snapshot's ``config.json``, checked by building its probes.

    Raises:
        SnapshotError: naming the ``config.json``.
    """
    file = snapshot / CONFIG_FILE
    raw = config["metadata"].get("probe_settings")
    if raw is None:
        raise SnapshotError(f"{file}: no metadata.probe_settings (a snapshot LensCallback did not write, e.g. "
                            f"save_snapshot's without metadata): re-probe it in Python with "
                            f"lens_callback.posthoc.reprobe(path, settings=ProbeSettings(...), inputs=ProbeInputs(...)) "
                            f"(inputs= may be left out where the snapshot root holds probe inputs: save_probe_inputs)")
    try:
        settings = ProbeSettings.from_dict(raw, f"{file}: probe_settings")
        _check_settings(settings, f"{file}: probe_settings")
    except ValueError as err:
        raise SnapshotError(str(err)) from err
    return settings


def _snapshot_converter(snapshot: Path, config: Mapping[str, Any]) -> Converter:
    """The registered converter a snapshot names, checked against its ``model_config``.

    Raises:
        SnapshotError: naming the snapshot (an unknown converter) or its ``config.json``.
    """
    converter = snapshot_converter(snapshot, config)
    try:
        with global_rngs_kept():
            converter.hooked_config(config["model_config"])
    except (ValueError, TypeError, KeyError, AssertionError, OverflowError) as err:  # asserts: HookedTransformerConfig's
        raise SnapshotError(f"{snapshot / CONFIG_FILE}: model_config does not fit converter {converter.name!r}: "
                            f"{type(err).__name__}: {without_reprs(str(err))}") from err
    return converter


def _command_line_flags(settings: ProbeSettings) -> str | None:
    """The ``lens-probe`` flags that give ``settings`` (`_command_line_settings`'s reverse), as a shell would read
    them, or ``None`` for probe options JSON cannot hold. On snapshots as on a ckpt.pt: ``--probes`` alone would
    take the other settings at their defaults, not the run's (a failing probe's hint said lens-probe took only a
    snapshot's own settings, untrue since ``--probes`` re-probes snapshots: diff review)."""
    flags = ["--probes", ",".join(settings.probes)]
    if settings.probe_options:
        try:
            flags += ["--probe-options", json.dumps(settings.probe_options)]
        except (TypeError, ValueError):  # an option set in Python (reprobe(settings=)) that JSON cannot hold
            return None
    if settings.max_batch_tokens is not None:
        flags += ["--max-batch-tokens", str(settings.max_batch_tokens)]
    if not settings.per_head_scalars:
        flags.append("--no-per-head-scalars")
    return shlex.join(flags)


class ProbeFailure(RuntimeError):
    """A probe raised while re-probing a model (the runner isolates it, as in training; post hoc the
    sweep stops there, and ``lens-probe`` writes what was probed before it and exits 2)."""


def _measure(hooked: HookedTransformer, settings: ProbeSettings, inputs: ProbeInputs, where: object) -> Scalars:
    """The scalars of one re-probe, as the callback logged them live: every probe value NaN for a
    model whose weights are not finite (`Measurement.void`; TransformerLens's zeroed NaN patterns
    would give finite-looking scores)."""
    runner = build_runner(settings.probes, settings.probe_options)
    result = measure(
        hooked, runner, inputs,
        max_batch_tokens=settings.max_batch_tokens, per_head_scalars=settings.per_head_scalars,
        checks={"weights_finite": finite_flag(list(hooked.parameters()))},
    )
    if result.failures:
        failed = "; ".join(f"probe {name!r} failed in {why}" for name, why in result.failures.items())
        # a probe that failed live too (a counted fault there) stops a sweep here: say how to leave it out, with the
        # other settings as they were (settings= replaces them all: {'probes': [...]} alone re-probed the others with
        # their default options, other numbers than the run's; diff review) and without the left-out probes' options
        others = [name for name in settings.probes if name not in result.failures]
        kept = ProbeSettings(tuple(others), {name: options for name, options in settings.probe_options.items()
                                             if name in others}, settings.max_batch_tokens, settings.per_head_scalars)
        hint = "no other probe to re-probe"
        if others:
            flags = _command_line_flags(kept)
            hint = (f"to re-probe without it: reprobe(path, settings={kept.to_dict()}) in Python"
                    + (f", or on lens-probe's command line {flags}" if flags is not None else ""))
        raise ProbeFailure(f"{where}: {failed} ({hint})")
    if not result.checks["weights_finite"]:
        result.void()
    return result.scalars


# -- what PATH is, and whether every snapshot in it can be re-probed ------------------------------
def _is_snapshot_dir(path: Path) -> bool:
    """A single snapshot: a complete one, or a ``step-NNNNNNNN`` directory (whose missing marker is then
    reported). A root may hold a ``config.json`` of the user's: it stays a root."""
    return (path / COMPLETE_FILE).is_file() or STEP_DIR_RE.fullmatch(path.name) is not None


def _where_snapshots_are(path: Path) -> str:
    """A hint for a directory holding no snapshot `scan_snapshots` lists: its step directories that are
    symbolic links to complete snapshots, which the listing does not follow (nor does pruning delete
    through them), or else the directories below it that hold some (e.g. a run's log directory)."""
    links = sorted(p.name for p in path.glob("step-*")
                   if p.is_symlink() and STEP_DIR_RE.fullmatch(p.name) and (p / COMPLETE_FILE).is_file())
    if links:
        return (f"; {len(links)} step directories here are symbolic links to snapshots ({links[0]}, ...), which "
                f"are not followed: pass one of them itself, or copy the snapshots here")
    candidates = sorted({marker.parent.parent for marker in path.glob(f"*/**/step-*/{COMPLETE_FILE}")})
    below = [root for root in candidates if any(scan_snapshots(root))][:3]  # as the listing finds them
    return f"; snapshots are in {', '.join(map(str, below))}" if below else ""


def _snapshot_dirs(path: Path, run: str | None = None) -> tuple[Path, list[Path], list[tuple[Path, SnapshotError]]]:
    """``(snapshot root, snapshot dirs to probe, [(dir, error)] for the complete snapshots that cannot
    be read)`` for a root (the snapshots of one training run: `_one_run`) or a single snapshot
    directory. Directories without ``COMPLETE`` are not snapshots (a write in progress)."""
    if _is_snapshot_dir(path):
        if run is not None and not _may_be_run(path, run):  # one that names another run, or has an id for "none"
            raise SnapshotError(f"{path}: not a snapshot of run {run!r} (its config.json names "
                                f"{_recorded_run(path)[1] or 'no run'}): --run picks a run's snapshots in a root")
        return path.parent, [path], []
    snapshots, unreadable = scan_snapshots(path)
    if not snapshots and not unreadable:
        raise SnapshotError(f"{path}: no complete snapshot (step-NNNNNNNN with {COMPLETE_FILE}) in this "
                            f"directory{_where_snapshots_are(path)}")
    if gone := [where.name for where, _ in unreadable if not os.path.lexists(where)]:
        # between its COMPLETE marker and its config.json: pruned
        unreadable = [(where, reason) for where, reason in unreadable if os.path.lexists(where)]
        if not snapshots and not unreadable:
            raise _all_removed(path, gone)
        _warn_removed(path, gone)
    if run is not None:  # another run's unreadable snapshot does not stop this one, where its run id can be read
        unreadable = [(where, reason) for where, reason in unreadable if _may_be_run(where, run)]
    errors = [(where, SnapshotError(reason)) for where, reason in unreadable]
    try:
        chosen = _one_run(path, snapshots, run)
    except SnapshotError:
        if run is not None and any(_may_be_run(where, run, surely=True) for where, _ in unreadable):
            return path, [], errors  # the run's snapshots are all unreadable: their errors say why
        raise
    return path, [info.path for info in chosen], errors


def _may_be_run(snapshot: Path, run: str, surely: bool = False) -> bool:
    """Whether ``snapshot`` (an unreadable one in a root, or the one directory given) may belong to the
    run ``--run`` picks: unless its ``config.json`` parses and names another run (for ``"none"``: any
    run). ``surely``: only if it parses and names that run."""
    readable, run_id = _recorded_run(snapshot)
    if not readable:  # it may be this run's
        return not surely
    if run_id is None:  # no id: a run's first part, written before ids (`_one_run`), may be this run's
        return run == "none" or not surely
    return run != "none" and run_id.startswith(run)


def _recorded_run(snapshot: Path) -> tuple[bool, str | None]:
    """``(whether the snapshot's config.json could be read, the run id it records or None)``."""
    try:
        metadata = json.loads((snapshot / CONFIG_FILE).read_text(encoding="utf-8"))["metadata"]
    except Exception:  # noqa: BLE001 - unreadable: reported where it is loaded
        return False, None
    return isinstance(metadata, Mapping), _run_id(metadata)


def _run_id(metadata: Any) -> str | None:
    """The run id a snapshot's ``metadata`` records (``None`` for one written before run ids)."""
    run_id = metadata.get("run_id") if isinstance(metadata, Mapping) else None
    return run_id if isinstance(run_id, str) else None


def _one_run(root: Path, snapshots: list[SnapshotInfo], run: str | None) -> list[SnapshotInfo]:
    """The snapshots of one training run (``metadata.run_id``), chosen before any other check: those of
    ``run`` (its id or the start of it; ``"none"``: those without an id), else all, which must then be
    one run's, or two runs that shared a directory would be probed into one curve. Snapshots without
    an id (written before run ids) that all come before the one run with an id are that run's first
    part: a run resumed from an earlier version's checkpoint, as the callback counts them."""
    runs: dict[str | None, list[SnapshotInfo]] = {}
    for info in snapshots:
        runs.setdefault(_run_id(info.metadata), []).append(info)
    named = [r for r in runs if r is not None]
    if None in runs and len(named) == 1 and max(i.step for i in runs[None]) < min(i.step for i in runs[named[0]]):
        runs = {named[0]: runs[None] + runs[named[0]]}
    listed = "; ".join(f"{r[:12] if r else '(no run id)'} (steps {_few([str(i.step) for i in infos])})"
                       for r, infos in runs.items())
    if run is not None:
        chosen = [None] if run == "none" and None in runs else [r for r in runs if r is not None and r.startswith(run)]
        if len(chosen) != 1:
            raise SnapshotError(f"{root}: {'no run id' if not chosen else 'more than one run id'} starts with "
                                f"{run!r}; its runs: {listed}")
        return runs[chosen[0]]
    if len(runs) > 1:
        raise SnapshotError(f"{root} holds the snapshots of {len(runs)} training runs, whose values would be probed into "
                            f"one curve: {listed}; pick one with --run ID (run= in Python), the start of its id, or "
                            f"'none' for those without one")
    return snapshots


@dataclass(frozen=True)
class _Planned:
    """A snapshot that passed every check made before probing, and what it is probed with."""

    snapshot: Path
    converter: Converter
    settings: ProbeSettings
    inputs: ProbeInputs
    run_id: str | None  # its config.json's ``metadata.run_id``


_LISTED_ERRORS = 20
"""Bad snapshots named one by one in the error; the rest are counted."""


def _check_weights_fit(snapshot: Path, converter: Converter, model_config: Mapping[str, Any],
                       weights: Mapping[str, torch.Tensor]) -> None:
    """The stored names and shapes (the header's meta tensors) against what the converter reads, and the
    dtypes of what it makes of them (`check_floating`), as loading will check them."""
    try:
        source = checked_source_weights(converter, model_config, weights)
    except (NotImplementedError, RuntimeError):  # a converter of your own that reads values: checked when loading
        return
    except (ValueError, TypeError, KeyError, OverflowError) as err:  # OverflowError: a size too large for a tensor
        raise SnapshotError(f"{snapshot}: weights do not fit converter {converter.name!r}: {err}") from err
    try:
        with global_rngs_kept():
            converted = converter.convert_weights(model_config, source)
        if not isinstance(converted, Mapping) or not all(isinstance(v, torch.Tensor) for v in converted.values()):
            return
    except Exception:  # noqa: BLE001 - what the meta tensors cannot show is checked when loading
        return
    try:
        check_floating(converter, converted)
    except ConversionError as err:
        raise SnapshotError(f"{snapshot}: {err}") from err


def _fit_key(converter: Converter, config: Mapping[str, Any], header: Mapping[str, torch.Tensor]) -> tuple[Any, ...]:
    """What `_check_weights_fit` decides from: the converter, the ``model_config``, and the stored names,
    shapes, dtypes and aliases (the header's meta tensors). A sweep's snapshots mostly share it, and the
    check builds the converter's reference model each time (nanoGPT's ``expected_shapes``: a meta-device
    ``GPT``, ~29 ms, a quarter of a 200-snapshot ``lens-probe``), so `_plan` checks each key once."""
    return (converter.name, id(converter), json.dumps(config["model_config"], sort_keys=True),
            json.dumps(config["aliases"], sort_keys=True),
            tuple(sorted((name, tuple(t.shape), str(t.dtype)) for name, t in header.items())))


def _hooked_config(converter: Converter, model_config: Mapping[str, Any]) -> HookedTransformerConfig | None:
    """The config of the model a snapshot builds, or ``None`` if the converter cannot say without the
    weights."""
    try:
        with global_rngs_kept():  # TransformerLens seeds the global RNGs for a config with a seed
            cfg = converter.hooked_config(model_config)
    except Exception:  # noqa: BLE001 - checked when the model is built
        return None
    return cfg if isinstance(cfg, HookedTransformerConfig) else None


def _cannot_run(settings: ProbeSettings, inputs: ProbeInputs, cfg: HookedTransformerConfig | None) -> str | None:
    """Why the probes of ``settings`` cannot run on ``inputs`` in a model of ``cfg``, as the callback
    checks its own before step one (`ProbeRunner.validate`: a sequence longer than ``n_ctx``, a probe
    option the sequences cannot hold, ``max_batch_tokens`` under a sequence, a probe refusing the
    model), or ``None``."""
    if cfg is None:
        return None
    repeated, text = (getattr(inputs, batch) for batch in ("repeated", "text"))
    for batch, tokens in (("repeated", repeated), ("text", text)):
        if tokens is not None and _needs(settings.probes, batch) and tokens.shape[-1] > cfg.n_ctx:
            return f"the {batch} batch has {tokens.shape[-1]} tokens per sequence, more than the model's n_ctx = {cfg.n_ctx}"
    if repeated is not None and _needs(settings.probes, "repeated") and repeated.shape[-1] % 2:
        return (f"the repeated batch has {repeated.shape[-1]} tokens per sequence, an odd number: it holds a sequence "
                f"and its repeat, 2 * repeat_length tokens")
    try:
        build_runner(settings.probes, settings.probe_options).validate(
            cfg, repeat_length=repeated.shape[-1] // 2 if repeated is not None else 0,
            text_len=text.shape[-1] if text is not None else 0, max_batch_tokens=settings.max_batch_tokens)
    except ValueError as err:
        return str(err)
    return None


def _tokens_outside(inputs: ProbeInputs, d_vocab: int | None, probes: Sequence[str]) -> str | None:
    """In words, a token id outside ``[0, d_vocab)`` in a batch one of ``probes`` reads, or ``None``
    (the embedding would raise an IndexError mid-sweep)."""
    if d_vocab is None:
        return None
    for batch in ("repeated", "text"):
        tokens = getattr(inputs, batch)
        if tokens is not None and _needs(probes, batch) and (bad := id_outside_vocab(tokens, d_vocab)) is not None:
            return f"the {batch} batch holds token id {bad}, outside the model's vocabulary [0, {d_vocab})"
    return None


def _missing_batch(settings: ProbeSettings, inputs: ProbeInputs) -> str | None:
    """What the probes of ``settings`` need that ``inputs`` lacks, in words, or ``None``."""
    for batch in ("repeated", "text"):
        users = _needs(settings.probes, batch)
        if users and getattr(inputs, batch) is None:
            return f"probes {users} need the {batch} batch"
    return None


_BATCH_SETTINGS = {"repeated": ("repeat_length", "repeat_batch", "text_len", "seed", "token_min_frequency"),
                   "text": ("text_len", "text_batch", "seed")}
"""The input settings (`INPUT_SETTINGS`) that may decide each probe batch (``text_len`` the repeated
one's too: without train data its token pool is a random stream of `fallback_pool_size` tokens)."""


def _pool_size(text_len: Any) -> Any:
    return fallback_pool_size(text_len) if isinstance(text_len, int) and not isinstance(text_len, bool) else text_len


class _UnknownInputs(SnapshotError):
    """A snapshot without a probe-inputs digest beside kept earlier probe inputs (`_snapshot_inputs`): a fact
    of the root shared by every such snapshot of it, said once for them all (`_plan`)."""

    def __init__(self, snapshot: Path, kept: list[str]) -> None:
        self.kept = kept
        super().__init__(self.message([snapshot.name], f"{snapshot / CONFIG_FILE}"))

    def message(self, names: list[str], where: str | None = None) -> str:
        """The refusal of one snapshot (named by ``where``, its ``config.json``) or of the snapshots ``names``,
        by step, named by the first and last."""
        one = where is not None
        which = (f"{where}: records" if one else
                 f"{len(names)} snapshots ({names[0]} {'and' if len(names) == 2 else 'to'} {names[-1]}) record")
        return (f"{which} no probe-inputs digest (an older lens_callback), and the root "
                f"holds earlier probe inputs besides its probe_inputs.json ({_few(self.kept)}), kept when a later run, "
                f"or {'this' if one else 'their'} run resumed by a newer lens_callback, drew others: which of them "
                f"{'it was' if one else 'each was'} probed on cannot be told, and re-probing "
                f"{'it' if one else 'them'} on the current ones may not reproduce {'its' if one else 'their'} logged "
                f"values; pass inputs=load_probe_inputs(root, sha256=<the sha256 in that file>)[0] (lens-probe: probe "
                f"such snapshots from a root of their own, holding that pair as probe_inputs.*)")


def _snapshot_inputs(root: Path, snapshot: Path, config: Mapping[str, Any],
                     loaded: dict[str | None, tuple[ProbeInputs, Mapping[str, Any]] | SnapshotError]) -> ProbeInputs:
    """The probe batches a snapshot was probed on (``loaded`` caches them with their settings, or the
    error reading them, by digest: a bad file of the root is read, and reported, once). A snapshot
    without a digest (written before it was recorded) takes the root's current inputs only if its
    own probe settings drew them: the input settings of both must agree."""
    if "probe_inputs_sha256" in config["metadata"] and config["metadata"]["probe_inputs_sha256"] is None:
        return _NO_BATCH  # its probes read no batch (weights only): none was stored
    digest = config["metadata"].get("probe_inputs_sha256")  # absent in snapshots before it was recorded
    if digest not in loaded:
        try:
            loaded[digest] = load_probe_inputs(root, sha256=digest if isinstance(digest, str) else None)
        except SnapshotError as err:
            loaded[digest] = err
        except FileNotFoundError as err:  # a snapshot copied out of its root: it said so, and no way on
            which = f" (sha256 {digest[:16]}...)" if isinstance(digest, str) else ""
            weights_only = [name for name in PROBES if not PROBES[name].reads_batch]
            raise FileNotFoundError(
                f"{err}: a snapshot is re-probed on the probe inputs its run wrote beside it{which}; copy "
                f"probe_inputs.json and probe_inputs.safetensors from the directory it was written in into {root}, "
                f"or re-probe it there (probes that read the weights only need none: --probes "
                f"{','.join(weights_only)})") from None
    found = loaded[digest]
    if isinstance(found, SnapshotError):
        raise found
    inputs, drawn_with = found
    if not isinstance(digest, str):
        own = config["metadata"].get("probe_settings")
        own = own if isinstance(own, Mapping) else {}
        listed = own.get("probes")
        probes = [p for p in listed if isinstance(p, str)] if isinstance(listed, list) else list(PROBES)
        drawn = [batch for batch in _BATCH_SETTINGS if _needs(probes, batch)]  # only their settings count

        def effect(key: str, value: Any) -> Any:  # what a setting changes in the batches drawn
            return _pool_size(value) if key == "text_len" and "text" not in drawn else value

        keys = [key for key in INPUT_SETTINGS if any(key in _BATCH_SETTINGS[batch] for batch in drawn)]
        differ = [key for key in keys
                  if key in own and key in drawn_with and effect(key, own[key]) != effect(key, drawn_with[key])]
        if differ:
            raise SnapshotError(
                f"{snapshot / CONFIG_FILE}: records no probe-inputs digest (an older lens_callback), and its "
                f"probe_settings drew other inputs than the root's probe_inputs.json ("
                f"{', '.join(f'{k} {own[k]!r} there, {drawn_with[k]!r} here' for k in differ)}): re-probing it on "
                f"them would measure other batches; pass inputs= (lens-probe: probe such snapshots from a root of "
                f"their own)")
        # inputs kept when a later writer replaced the root's (`save_probe_inputs`): drawn with the same
        # settings by another version's code (a run resumed after an upgrade) they differ, and a snapshot
        # without a digest cannot say which pair it was probed on (upgrade review: the current pair
        # re-probed the older part's snapshots silently, icl_score 0.75 off the logged values)
        kept = sorted(p.name for p in root.glob("probe_inputs-*.json") if ROOT_FILE_RE.fullmatch(p.name))
        if kept:
            raise _UnknownInputs(snapshot, kept)
    return inputs


def _plan(path: Path, settings: ProbeSettings | None, inputs: ProbeInputs | None, run: str | None = None,
          settings_from: str = "settings") -> list[_Planned]:
    """Checks every snapshot under ``path`` before any is probed (reading no tensor data): the
    ``COMPLETE`` marker, ``config.json``, the weights' header against the converter and the
    ``model_config``, the probe settings (by building the probes) and the probe inputs.
    ``settings_from`` names where ``settings`` come from in the errors (``lens-probe``: its command line).

    Raises:
        SnapshotError, FileNotFoundError: the one error found, as it is, or one `SnapshotError`
            naming every bad snapshot; ``settings`` that cannot run on the snapshots' models or
            batches, once (each of a run's snapshots repeated it, on a line of its own).
    """
    root, dirs, unreadable = _snapshot_dirs(path, run)
    errors: list[tuple[Path, SnapshotError | OSError]] = list(unreadable)  # and those found below
    total = len(dirs) + len(errors)
    loaded: dict[str | None, tuple[ProbeInputs, Mapping[str, Any]] | SnapshotError] = {}  # by digest: inputs, settings
    fitting: set[tuple[Any, ...]] = set()  # `_fit_key`s of the snapshots whose weights fit
    planned: list[_Planned] = []
    vanished: list[str] = []
    given: dict[str, list[str]] = {}  # what ``settings`` (the same for every snapshot) cannot run on -> the snapshots
    for snapshot in dirs:
        try:
            config, header = read_snapshot_header(snapshot)
            converter = _snapshot_converter(snapshot, config)
            fit = _fit_key(converter, config, header)
            if fit not in fitting:  # loading checks each snapshot again, with its values
                _check_weights_fit(snapshot, converter, config["model_config"], header)
                fitting.add(fit)
            snap_settings = settings if settings is not None else _snapshot_settings(snapshot, config)
            # probes that read the weights only need no stored batch: a snapshot copied out of its root, or one
            # whose root lost its probe inputs, re-probes with them (it was refused, "no probe inputs")
            snap_inputs = (inputs if inputs is not None else _NO_BATCH if not _reads_a_batch(snap_settings.probes)
                           else _snapshot_inputs(root, snapshot, config, loaded))
            missing = _missing_batch(snap_settings, snap_inputs)
            if missing is not None and settings is not None:
                lacking = ("the probe inputs stored with the snapshots lack (they are re-probed on the batches their "
                           "run drew)" if inputs is None else "inputs= lacks")
                given.setdefault(f"{missing}, which {lacking}", []).append(snapshot.name)
                continue
            if missing is not None:
                lacking = "its probe inputs lack" if inputs is None else "inputs= lacks"
                raise SnapshotError(f"{snapshot / CONFIG_FILE}: probe_settings: {missing}, which {lacking}")
            cfg = _hooked_config(converter, config["model_config"])
            whose = "its probe inputs" if inputs is None else "inputs="
            outside = _tokens_outside(snap_inputs, cfg.d_vocab if cfg is not None else None, snap_settings.probes)
            if outside is not None:
                raise SnapshotError(f"{snapshot}: {whose}: {outside}")
            unrunnable = _cannot_run(snap_settings, snap_inputs, cfg)
            if unrunnable is not None and settings is not None:
                on = "their stored probe inputs" if inputs is None else "inputs="
                given.setdefault(f"cannot run on the snapshots' model and {on}: {unrunnable}", []).append(snapshot.name)
                continue
            if unrunnable is not None:
                raise SnapshotError(f"{snapshot}: its probe settings on {whose} cannot run on its model: {unrunnable}")
        except (SnapshotError, OSError) as err:
            if _removed_since_listed(path, snapshot):
                vanished.append(snapshot.name)
                continue
            errors.append((snapshot, err))
            continue
        planned.append(_Planned(snapshot, converter, snap_settings, snap_inputs, _run_id(config.get("metadata"))))
    if given:  # one line, however many snapshots it concerns
        reason, names = next(iter(given.items()))
        raise SnapshotError(f"{settings_from}: {reason} ({_few(names)} in {root}); nothing was probed")
    if vanished:
        if not planned and not errors:  # a live run with max_snapshots=1: not "probed 0 models", exit 0
            raise _all_removed(root, vanished)
        _warn_removed(root, vanished)
        total -= len(vanished)
    errors.sort(key=lambda item: (len(item[0].name), item[0].name))  # by step (step-NNNNNNNN, 8 digits or more)
    # a bad probe-inputs file of the root is one error object for every snapshot that reads it: said once
    shared = {id(err): [s.name for s, e in errors if e is err] for err in loaded.values() if isinstance(err, SnapshotError)}
    if errors and total == 1:
        snapshot, error = errors[0]
        if id(error) in shared:
            raise SnapshotError(f"{snapshot}: {error}") from error
        raise error
    # a root's digest-less snapshots beside kept inputs: one line for them all (it was one a snapshot, the same
    # words, up to the listing limit)
    unknown = [s.name for s, err in errors if isinstance(err, _UnknownInputs)]
    # and the snapshots that name one unregistered converter (lens-probe without --import): one line for them all
    converters: dict[str, list[str]] = {}
    for snapshot, error in errors:
        if isinstance(error, UnknownConverterError):
            converters.setdefault(repr(error.converter), []).append(snapshot.name)
    messages = list(dict.fromkeys(
        f"{err} (the inputs of {_few(shared[id(err)])})" if id(err) in shared
        else err.message(unknown) if isinstance(err, _UnknownInputs) and len(unknown) > 1
        else err.message(converters[repr(err.converter)]) if isinstance(err, UnknownConverterError)
        and len(converters[repr(err.converter)]) > 1 else str(err)
        for _, err in errors))
    if messages:
        listed = messages[:_LISTED_ERRORS]
        if len(messages) > len(listed):
            listed.append(f"... and {len(messages) - len(listed)} more")
        advice = "" if len(errors) == total else (f" (move them out of {root}, or pass one snapshot directory, "
                                                  f"to probe the others)")
        raise SnapshotError(
            f"{len(errors)} of {total} snapshots cannot be re-probed; nothing was probed{advice}:\n  "
            + "\n  ".join(listed)
        )
    return planned


def _removed_since_listed(path: Path, snapshot: Path) -> bool:
    """Whether ``snapshot``, listed under the root ``path``, is gone: a running fit with ``max_snapshots``
    prunes its root as it goes (faults review: lens-probe on a live run then refused the whole root,
    calling the pruned one "not a snapshot directory"). A snapshot given itself is never skipped."""
    return snapshot != path and not os.path.lexists(snapshot)


def _all_removed(root: Path, names: list[str]) -> SnapshotError:
    return SnapshotError(f"{root}: every snapshot listed ({_few(names)}) was removed before it was read (a running "
                         f"fit's max_snapshots prunes as it goes): nothing was probed")


def _warn_removed(root: Path, names: list[str]) -> None:
    warnings.warn(f"{root}: {len(names)} snapshot(s) removed since they were listed, not probed ({_few(names)}): "
                  f"a running fit's max_snapshots prunes as it goes", UserWarning, stacklevel=3)


def _few(names: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- checkpoints ---------------------------------------------------------------------------------
def checkpoint_probe_inputs(
    vocab_size: int,
    *,
    repeat_length: int,
    repeat_batch: int = 8,
    text: np.ndarray | torch.Tensor | None = None,
    text_len: int | None = None,
    text_batch_size: int = 8,
    seed: int = 0,
    token_min_frequency: float = 1e-4,
) -> ProbeInputs:
    """Probe batches for a model without saved ones (a nanoGPT checkpoint).

    The repeated batch draws token ids uniformly, with a private generator seeded ``seed``: with
    ``text``, from the ids making up at least ``token_min_frequency`` of it, as the callback draws
    from its training data (rare tokens' embeddings are untrained, and with them in the pool the
    induction score reads low); without, from all of ``[0, vocab_size)``. The text batch (only if
    ``text`` is given) takes random windows of ``text`` with a private generator seeded ``seed + 1``.
    The global RNG is not touched.

    Raises:
        ValueError: for a bad size or ``token_min_frequency``, ``text`` holding ids outside
            ``[0, vocab_size)``, fewer than two ids in ``text`` making up ``token_min_frequency`` of it, or a
            ``text`` shorter than ``text_len``.
    """
    check_probe_tokens(repeat_batch, 2 * repeat_length, text_batch_size if text is not None else 0, text_len or 2)
    check_token_min_frequency(token_min_frequency)
    if text is not None:  # 1-D integers: the pool's ValueError below is then that no token is frequent enough
        _check_token_data("text", text)
        if isinstance(text, torch.Tensor) and text.dtype in (torch.uint16, torch.uint32, torch.uint64):
            text = text.cpu().numpy()  # torch has no max() for these (a memmap's uint16 through from_numpy)
    if text is not None and len(text):
        if int(text.max()) >= vocab_size:
            raise ValueError(f"the text holds token id {int(text.max())} >= the model's vocab_size={vocab_size}")
        if int(text.min()) < 0:  # indexing would wrap it to a valid id
            raise ValueError(f"the text holds token id {int(text.min())} < 0")
    repeated = None
    if repeat_batch > 0:
        pool = torch.arange(vocab_size)
        if text is not None and len(text):
            min_count = min_token_count(token_min_frequency, len(text))
            try:
                pool = token_pool_from_data(text, vocab_size, min_count)  # the ids are checked above
            except ValueError:  # no token occurs min_count times
                pool = torch.zeros(0, dtype=torch.int64)
            if pool.numel() < 2:  # none, or every repeated sequence would be that one token
                if one_distinct_token(text, vocab_size, pool, min_count):  # no token_min_frequency helps
                    raise ValueError(f"the text holds one distinct token ({int(text[0])}), so every repeated "
                                     f"sequence would be that token repeated: pass a text with at least two")
                which = "no token makes" if pool.numel() == 0 else f"only token {int(pool[0])} makes"
                raise ValueError(f"{which} up at least token_min_frequency={token_min_frequency} of the text "
                                 f"({len(text)} tokens, min_count={min_count}), too few to draw repeated sequences "
                                 f"from; lower token_min_frequency")
        generator = torch.Generator().manual_seed(seed)
        repeated = repeated_tokens(pool, repeat_batch, repeat_length, generator)
    batch = None
    if text is not None and text_batch_size > 0:
        if text_len is None:
            raise ValueError("text_len is required with text")
        if len(text) < text_len:  # text_batch's words, "data ... seq_len", named neither argument nor flag
            raise ValueError(f"the text has {len(text)} tokens, fewer than text_len={text_len}, one window of the "
                             f"text batch: pass a longer text or a smaller text_len (lens-probe: --text-len)")
        batch = text_batch(text, text_batch_size, text_len, torch.Generator().manual_seed(seed + 1))
    return ProbeInputs(repeated=repeated, text=batch)


def _read_text_tokens(path: Path, vocab_size: int, meta: Path | None = None) -> np.ndarray:
    """``--text``'s token ids for a checkpoint of ``vocab_size`` ids: a ``.bin`` (or ``.BIN``) file's uint16 ids
    (nanoGPT's ``prepare.py``), another file's characters encoded with ``--meta``'s table, or its raw bytes for a
    byte-level vocabulary (256 ids). Raw bytes are refused for another vocabulary: for GPT-2's they were ids in range
    but not the text's tokens (GPT-2's first 256 ids are its bytes in another order), probed without a word."""
    if path.is_dir():  # a nanoGPT data dir, the path at hand: it was "not found"
        raise IsADirectoryError(f"--text {path} is a directory: pass a file in it (a nanoGPT data dir's val.bin, or "
                                f"a text file with --meta and the run's meta.pkl)")
    if not path.is_file():
        raise FileNotFoundError(f"--text file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"--text {path} is empty")
    if path.suffix.lower() == ".bin":  # nanoGPT's prepare.py: uint16 token ids (VAL.BIN too: raw bytes misread them)
        if meta is not None:
            raise ValueError(f"--meta {meta} encodes a text file, but --text {path} holds token ids already (a .bin "
                             f"file is read as nanoGPT's prepare.py writes it): leave --meta out")
        if size % 2:
            raise ValueError(f"--text {path}: {size} bytes is not a whole number of uint16 token ids "
                             f"(a .bin file is read as nanoGPT's prepare.py writes it)")
        return np.memmap(path, dtype=np.uint16, mode="r")
    if meta is not None:
        return _encode_with_meta(path, meta, vocab_size)
    if vocab_size != 256:
        raise ValueError(f"--text {path} would be read as raw bytes, ids 0-255 (a byte-level vocabulary of 256 ids), "
                         f"but the checkpoint's vocab_size is {vocab_size}: pass its data's token file (nanoGPT's "
                         f"prepare.py writes val.bin), or for a character-level run the text with --meta and the "
                         f"run's meta.pkl (e.g. --meta data/shakespeare_char/meta.pkl)")
    return np.fromfile(path, dtype=np.uint8)


def _encode_with_meta(path: Path, meta: Path, vocab_size: int) -> np.ndarray:
    """``path``'s characters as the ids of ``meta``'s table (nanoGPT's ``meta.pkl``, read without unpickling code),
    which must hold every character of the text and no more ids than the checkpoint (a model's vocabulary may be
    padded past its data's, as ``load_nanogpt_checkpoint(meta=)`` accepts)."""
    if meta.is_dir():
        raise IsADirectoryError(f"--meta {meta} is a directory: pass the meta.pkl in it")
    if not meta.is_file():
        raise FileNotFoundError(f"--meta file not found: {meta}")
    table = read_meta(meta)
    if table["vocab_size"] > vocab_size:  # a model's vocabulary may be padded past its data's, not cut short
        raise ValueError(f"--meta {meta} has vocab_size {table['vocab_size']}, more ids than the checkpoint's "
                         f"{vocab_size}: it is another run's table")
    stoi = meta_stoi(table)
    if stoi is None:
        raise ValueError(f"--meta {meta} holds no character table (stoi or itos of one-character strings), so it "
                         f"encodes no text: pass the run's token file (val.bin) instead")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--text {path} is not UTF-8 text ({err})") from None
    if "\r" not in stoi:  # nanoGPT's prepare.py reads with open(...).read(): "\r\n" and "\r" became "\n"
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # a table holding "\r" was made from text read with its carriage returns kept: they are the run's ids
    unknown = sorted(set(text) - stoi.keys())
    if unknown:
        listed = ", ".join(map(repr, unknown[:10])) + (f" ({len(unknown)} in all)" if len(unknown) > 10 else "")
        raise ValueError(f"--text {path} holds characters --meta {meta} has no id for: {listed}; the run never "
                         f"saw them: remove them or pass the run's own text")
    return np.fromiter((stoi[c] for c in text), dtype=np.int64, count=len(text))


def _needs(probes: Sequence[str], batch: str) -> list[str]:
    """The registered ``probes`` that read ``batch``: not those reading the weights only (`Probe.reads_batch`),
    whatever batch they name."""
    return [p for p in probes if p in PROBES and PROBES[p].reads_batch and PROBES[p].batch == batch]


def _reads_a_batch(probes: Sequence[str]) -> bool:
    """Whether one of the registered ``probes`` reads a probe batch (not all read the weights only)."""
    return any(_needs(probes, batch) for batch in BATCH_KINDS)


_NO_BATCH = ProbeInputs(repeated=None, text=None)
"""The inputs of probes that read the weights only (`Probe.reads_batch`): none."""


def _default_checkpoint_probes(has_text: bool) -> tuple[str, ...]:
    if has_text:
        return DEFAULT_PROBES
    text_probes = _needs(DEFAULT_PROBES, "text")
    return tuple(p for p in DEFAULT_PROBES if p not in text_probes)


def _checkpoint_plan(config: GPTConfig, settings: ProbeSettings | None, inputs: ProbeInputs | None,
                     command_line: bool = False) -> tuple[ProbeSettings, ProbeInputs]:
    """The settings and inputs a checkpoint is probed with (the defaults of `reprobe` for those not
    given), checked against each other and the model before it is built: every batch the probes
    need, no longer than ``block_size``, every token id in ``[0, vocab_size)``.

    ``command_line``: ``lens-probe``'s, whose batches its flags drew: the errors name those flags
    (``inputs.repeated has 18 tokens`` answered ``--repeat-length 9``, which named no input).

    Raises:
        ValueError: naming ``inputs=`` or ``settings=`` (or the flags).
    """
    if inputs is None:
        inputs = checkpoint_probe_inputs(config.vocab_size, repeat_length=min(32, config.block_size // 2))
    if settings is None:
        settings = ProbeSettings(probes=_default_checkpoint_probes(inputs.text is not None))
    missing = _missing_batch(settings, inputs)
    if missing is not None:
        raise ValueError(f"settings: {missing}, which inputs= lacks")
    for batch in ("repeated", "text"):
        tokens = getattr(inputs, batch)
        if tokens is not None and _needs(settings.probes, batch) and tokens.shape[-1] > config.block_size:
            if command_line:  # the defaults, min(32, block_size // 2) and min(128, block_size), fit: a flag's
                flag, value, most = (("--repeat-length", tokens.shape[-1] // 2, config.block_size // 2)
                                     if batch == "repeated" else ("--text-len", tokens.shape[-1], config.block_size))
                raise ValueError(f"{flag} {value}: the {batch} batch's sequences would hold {tokens.shape[-1]} tokens, "
                                 f"more than the checkpoint's block_size = {config.block_size}: pass {flag} {most} or "
                                 f"less")
            raise ValueError(f"inputs.{batch} has {tokens.shape[-1]} tokens per sequence, more than the model's "
                             f"block_size = {config.block_size}")
    outside = _tokens_outside(inputs, config.vocab_size, settings.probes)
    if outside is not None:
        raise ValueError(f"inputs=: {outside}")
    unrunnable = _cannot_run(settings, inputs, _hooked_config(get_converter("nanogpt"), config.to_dict()))
    if unrunnable is not None:
        given = "the probe settings on the probe batches" if command_line else "settings= on inputs="
        raise ValueError(f"{given} cannot run on this checkpoint's model: {unrunnable}")
    return settings, inputs


def _probe_checkpoint(
    path: Path,
    loaded: tuple[GPTConfig, dict[str, torch.Tensor], int | None],
    device: torch.device | str,
    dtype: torch.dtype,
    settings: ProbeSettings,
    inputs: ProbeInputs,
    step: int | None,
) -> tuple[int, Scalars]:
    """Probes a loaded nanoGPT checkpoint with the settings and inputs `_checkpoint_plan` checked."""
    config, state_dict, iter_num = loaded
    try:
        hooked = build_hooked_transformer(get_converter("nanogpt"), config.to_dict(), state_dict,
                                          device=device, dtype=dtype)
        pack_attention_weights(hooked)  # measured here, never handed out
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return (step if step is not None else (iter_num or 0), _measure(hooked, settings, inputs, path))


# -- the library entry point ---------------------------------------------------------------------
def reprobe(
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    settings: ProbeSettings | Mapping[str, Any] | None = None,
    inputs: ProbeInputs | None = None,
    step: int | None = None,
    run: str | None = None,
) -> list[tuple[int, Scalars]]:
    """Re-runs the probes on snapshots or a nanoGPT checkpoint: ``[(step, {tag: value}), ...]``.

    Every snapshot is checked before any is probed (see :func:`iter_reprobe`, which also hands out
    each result as soon as it is measured, so that a failure half-way loses none of them).

    Args:
        path: A snapshot root (every complete snapshot, by step), one snapshot directory, or a
            nanoGPT ``ckpt.pt``.
        device: Where to run; the CPU by default.
        dtype: Parameter dtype of the ``HookedTransformer`` (float32 is what the callback uses).
        settings: Overrides the snapshots' ``probe_settings``; for a checkpoint, defaults to the
            default probes that need only the repeated batch (all of them if ``inputs`` has text).
        inputs: Overrides the root's saved probe batches; for a checkpoint, defaults to
            :func:`checkpoint_probe_inputs` with ``repeat_length = min(32, block_size // 2)``.
        step: For a checkpoint, the step to report (default its ``iter_num``, else 0).
        run: For a snapshot root that holds the snapshots of several training runs (each snapshot
            records its run's ``run_id``), the run to probe: its id or the start of it (``"none"``:
            the snapshots without one), chosen before the other checks. Without it such a root is
            refused, naming its runs and their steps.

    Returns:
        One entry per model probed, ascending by step; the scalars are those the live callback
        logs (``measure(...).scalars``).

    Raises:
        FileNotFoundError: if ``path`` (or the root's probe inputs) does not exist.
        SnapshotError, CheckpointError: for incomplete, corrupt or refused files (several bad
            snapshots: one `SnapshotError` naming each).
        ValueError: for invalid settings, or a ``step`` that is not an int in ``[0, 2**63)``.
    """
    return list(iter_reprobe(path, device, dtype=dtype, settings=settings, inputs=inputs, step=step, run=run))


def iter_reprobe(
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    settings: ProbeSettings | Mapping[str, Any] | None = None,
    inputs: ProbeInputs | None = None,
    step: int | None = None,
    run: str | None = None,
) -> Iterator[tuple[int, Scalars]]:
    """:func:`reprobe` one model at a time: an iterator of ``(step, {tag: value})``, ascending by step.

    Everything that can be checked without probing is checked when this is called, before it
    returns: for every snapshot the ``COMPLETE`` marker, ``config.json``, the weights' header (a
    truncated file is found) against the converter and ``model_config``, the probe settings (the
    probes are built) and the probe inputs it was probed on. Every bad snapshot is named in one
    error and nothing is probed. What only loading or probing can find (a read error, a probe
    raising) is raised by the iterator after the results before it were handed out: keep them
    (``lens-probe`` writes them before it exits).

    Takes the arguments of :func:`reprobe` and raises its errors.
    """
    check_device_and_dtype(device, dtype, "reprobe")
    path = Path(path).absolute()  # "." has no parent to find the root's probe inputs in
    device = device or "cpu"
    if isinstance(settings, Mapping):
        settings = ProbeSettings.from_dict(settings, "settings", strict=True)
    if settings is not None:
        _check_settings(settings, "settings")
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_file():
        if run is not None:
            raise ValueError("run= applies to snapshots, not to a nanoGPT checkpoint")
        if step is not None:
            step = check_step(step)  # TensorBoard's steps are int64
        loaded = _read_checkpoint(path)
        settings, inputs = _checkpoint_plan(loaded[0], settings, inputs)  # checked now, probed when asked
        return _probe_checkpoint_lazily(path, loaded, device, dtype, settings, inputs, step)
    if step is not None:  # each snapshot reports its own step (post-hoc review: step= was ignored)
        raise ValueError("step= applies to a nanoGPT checkpoint, not to snapshots (each reports its own step)")
    if settings is not None and inputs is not None and (missing := _missing_batch(settings, inputs)) is not None:
        raise ValueError(f"settings: {missing}, which inputs= lacks")
    return _probe_snapshots(_plan(path, settings, inputs, run), device, dtype)


def _read_checkpoint(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], int | None]:
    """`read_nanogpt_checkpoint`, refusing first a file of a snapshot or of a snapshot root (a natural path to
    give: a snapshot's ``model.safetensors``, which ``torch.load`` reads too, was refused as "not a nanoGPT
    checkpoint", listing its weights, and its ``config.json`` as "not a readable torch checkpoint"), naming the
    directory to pass instead.

    Raises:
        CheckpointError: for such a file, and as `read_nanogpt_checkpoint` raises.
    """
    parent = path.parent
    if path.name in SNAPSHOT_FILES and (STEP_DIR_RE.fullmatch(parent.name) or (parent / COMPLETE_FILE).is_file()):
        raise CheckpointError(f"{path} is a file of the snapshot {parent}, not a nanoGPT ckpt.pt: pass the snapshot "
                              f"directory itself (or its root, {parent.parent}, for all its snapshots)")
    if ROOT_FILE_RE.fullmatch(path.name) and any(scan_snapshots(parent)):
        raise CheckpointError(f"{path} is a file of the snapshot root {parent}, not a nanoGPT ckpt.pt: pass the root "
                              f"itself to re-probe its snapshots")
    return read_nanogpt_checkpoint(path)


def _probe_checkpoint_lazily(*args: Any) -> Iterator[tuple[int, Scalars]]:
    """`_probe_checkpoint` (same arguments) when the iterator is asked for its one result."""
    yield _probe_checkpoint(*args)


def _probe_snapshots(
    plan: list[_Planned], device: torch.device | str, dtype: torch.dtype
) -> Iterator[tuple[int, Scalars]]:
    """Loads and probes the checked snapshots in turn, one ``HookedTransformer`` per architecture."""
    hooked: HookedTransformer | None = None
    built_for: tuple[str, str] | None = None
    probed = 0
    for number, item in enumerate(plan, 1):
        try:
            config, state_dict = load_snapshot_weights(item.snapshot)
        except (SnapshotError, OSError):
            if os.path.lexists(item.snapshot) or (number == len(plan) and not probed):
                raise  # the last of the sweep, none probed: "removed" is then the error itself
            _warn_removed(item.snapshot.parent, [item.snapshot.name])  # pruned since it was checked
            continue
        probed += 1
        converter = item.converter
        key = (converter.name, json.dumps(config["model_config"], sort_keys=True))
        try:
            if hooked is None or key != built_for:
                hooked = build_hooked_transformer(converter, config["model_config"], state_dict,
                                                  device=device, dtype=dtype)
                pack_attention_weights(hooked)  # measured here, never handed out
                built_for = key
            else:  # same architecture: refresh the weights in place instead of rebuilding
                copy_weights(hooked, convert(converter, config["model_config"], state_dict)[1])
        except (ValueError, TypeError) as err:
            raise SnapshotError(f"{item.snapshot}: converter {converter.name!r} cannot build a model from this snapshot: {err}") from err
        yield config["step"], _measure(hooked, item.settings, item.inputs, item.snapshot)


# -- the command ---------------------------------------------------------------------------------
def _check_outputs(logdir: Path | None, table: Path | None, source: Path | None = None) -> None:
    """Makes the output locations before any probing, so that a path that cannot be written fails
    first (``OSError``), not after minutes of probing. The table may not be the input (``source``:
    a checkpoint), a file in a snapshot directory inside the input's root (the root itself for a
    single snapshot), or a file of that root the tools read (`ROOT_FILE_RE`: the probe inputs, earlier
    runs' archived ones, ``events.json``): writing it would change what lens-probe or lens-report read.
    Nor may the log directory be in a snapshot directory: a snapshot directory holding other files is
    one the callback refuses to write again (a resumed run would lose that step's snapshot)."""
    root = None
    if source is not None:
        inside = source.resolve()
        root = inside.parent if _is_snapshot_dir(inside) else inside

    def in_snapshot(where: Path, last: bool) -> bool:
        parts = where.relative_to(root).parts if root is not None and root in where.parents else ()
        return any(STEP_DIR_RE.fullmatch(name) for name in (parts if last else parts[:-1]))

    if table is not None:
        if table.is_dir():
            raise IsADirectoryError(f"--csv {table} is a directory; name a file")
        if logdir is not None and table.resolve() == logdir.resolve():
            raise ValueError(f"--csv and --logdir name the same path, {table}: the table is a file, the log a directory")
        if source is not None and root is not None:
            where, inside = table.resolve(), source.resolve()
            within = root in where.parents
            # a snapshot's own file (inside a step-N directory), or a file of the root the tools read
            snapshot_file = in_snapshot(where, last=False)
            read = where.name in SNAPSHOT_FILES or ROOT_FILE_RE.fullmatch(where.name) is not None
            if where == inside or within and (snapshot_file or read):
                what = ("the input" if where == inside else f"inside a snapshot directory of {root}" if snapshot_file
                        else f"a file of the snapshot root {root} that lens-probe or lens-report reads")
                raise ValueError(f"--csv {table} is {what}: writing it would overwrite what they read; name a file "
                                 f"elsewhere")
        make_dirs(table.parent, f"--csv {table}: cannot make the directory {table.parent}")
        if not os.access(table.parent, os.W_OK):
            raise PermissionError(f"--csv {table}: {table.parent} is not writable")
    if logdir is not None:
        if logdir.exists() and not logdir.is_dir():
            raise NotADirectoryError(f"--logdir {logdir} is a file; name a directory")
        if in_snapshot(logdir.resolve(), last=True):
            raise ValueError(f"--logdir {logdir} is inside a snapshot directory of {root}: its event files would "
                             f"stop the callback from writing that step's snapshot again; name a directory elsewhere")
        make_dirs(logdir, f"--logdir {logdir}: cannot make the directory {logdir}")
        if not os.access(logdir, os.W_OK):
            raise PermissionError(f"--logdir {logdir} is not writable")


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a torch device ({err})") from None
    if (missing := unavailable_accelerator(device)) is not None:  # "mps" gave torch's dispatcher dump, "xpu" a
        # traceback (torch's AssertionError "Torch not compiled with XPU enabled"; device review)
        raise ValueError(f"--device {name!r}: no {missing} device is available here")
    if device.type == "meta":
        raise ValueError("--device 'meta' holds no values to probe")
    try:
        torch.empty(1, device=device)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not usable here ({str(err).splitlines()[0]})") from None


def _given_checkpoint_flags(args: argparse.Namespace) -> dict[str, str]:
    """The checkpoint-only flags given on the command line, ``{dest: flag}`` (each parses with a ``None``
    default, so one given at its default value counts)."""
    return {dest: action.option_strings[0] for dest, (action, _) in args.checkpoint_only.items()
            if getattr(args, dest) is not None}


def _named_probes(value: str) -> tuple[str, ...]:
    """``--probes``'s comma-separated names. None named is an error: on a ckpt.pt ``--probes ""`` ran the default
    probes, and ``--probes ,`` was refused in the words of `reprobe` ("settings= on inputs=")."""
    probes = tuple(name.strip() for name in value.split(",") if name.strip())
    if not probes:
        raise ValueError(f"--probes {value!r} names no probe: give comma-separated probe names, e.g. "
                         f"--probes induction,k_composition")
    return probes


_MEASURED = ("probes", "probe_options", "max_batch_tokens", "no_per_head_scalars")
"""The command line's flags of what is measured (`ProbeSettings`): for snapshots too, the rest for a ckpt.pt only."""


def _command_line_settings(args: argparse.Namespace, probes: Sequence[str]) -> ProbeSettings:
    """``probes`` with ``--probe-options``, ``--max-batch-tokens`` and ``--no-per-head-scalars`` (unset ones at
    their defaults)."""
    try:
        options = json.loads(args.probe_options) if args.probe_options else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"--probe-options {args.probe_options!r} is not valid JSON ({err}): give a JSON object, "
                         f"e.g. '{{\"logit_lens\": {{\"max_positions\": 32}}}}'") from err
    return ProbeSettings.from_dict({
        "probes": list(probes), "probe_options": options,
        "max_batch_tokens": args.max_batch_tokens, "per_head_scalars": not args.no_per_head_scalars,
    }, "command line", strict=True)


def _snapshot_settings_from_args(args: argparse.Namespace) -> ProbeSettings | None:
    """For snapshots: the settings ``--probes`` (and the flags that go with it) give instead of those each
    snapshot carries, or ``None`` without them. The probe batches are the run's stored ones: the flags that
    build a ckpt.pt's are refused."""
    given = _given_checkpoint_flags(args)
    batches = [flag for dest, flag in given.items() if dest not in _MEASURED]
    if batches:
        raise ValueError(f"{', '.join(batches)} appl{'ies' if len(batches) == 1 else 'y'} to a nanoGPT ckpt.pt only: "
                         f"snapshots are re-probed on the probe batches stored beside them, each logged at its own step")
    if not given:
        return None
    if "probes" not in given:
        raise ValueError(f"{', '.join(given.values())} replace{'s' if len(given) == 1 else ''} a snapshot's probe "
                         f"settings only with --probes, which names the probes to run instead of those it carries")
    settings = _command_line_settings(args, _named_probes(args.probes))
    _check_settings(settings, "command line")
    return settings


def _checkpoint_run(args: argparse.Namespace) -> Iterator[tuple[int, Scalars]]:
    given = _given_checkpoint_flags(args)
    for dest, (_, default) in args.checkpoint_only.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    loaded = _read_checkpoint(args.path)
    config = loaded[0]
    if args.meta is not None and args.text is None:
        raise ValueError(f"--meta {args.meta} encodes the --text file, and no --text is given")
    text = _read_text_tokens(args.text, config.vocab_size, args.meta) if args.text is not None else None
    if args.probes is not None:
        probes = _named_probes(args.probes)
    else:
        probes = _default_checkpoint_probes(text is not None)
    if text is None and _needs(probes, "text"):
        raise ValueError(f"probe(s) {_needs(probes, 'text')} need a text batch: pass --text FILE")
    settings = _command_line_settings(args, probes)
    # a flag of a batch that is not drawn is an error, not ignored (a misspelt probe: the plan below names it)
    if all(p in PROBES for p in probes):
        if "token_min_frequency" in given and text is None:
            raise ValueError(f"{given['token_min_frequency']} sets the token pool of the repeated batch drawn from "
                             f"--text FILE; without --text it is the whole vocabulary")
        for batch, dests in (("repeated", ("repeat_length", "repeat_batch", "token_min_frequency")),
                             ("text", ("text_len", "text_batch"))):  # --text also feeds the repeated pool
            unused = [given[dest] for dest in dests if dest in given]
            sets = f"{', '.join(unused)} set{'s' if len(unused) == 1 else ''} the {batch} batch"
            if unused and batch == "text" and text is None:
                raise ValueError(f"{sets}, which is drawn from --text FILE only")
            if unused and not _needs(probes, batch):
                raise ValueError(f"{sets}, which no chosen probe reads (probes: {', '.join(probes)})")
        # probes that read the weights only draw no batch at all: --text and --seed, which every drawn batch
        # reads, would do nothing (they were accepted and ignored, and a --text id outside the vocabulary refused)
        unused = [given[dest] for dest in ("text", "meta", "seed") if dest in given]
        if unused and not _reads_a_batch(probes):
            raise ValueError(f"{', '.join(unused)} set{'s' if len(unused) == 1 else ''} the probe batches, which no "
                             f"chosen probe reads (probes: {', '.join(probes)}, which read the weights only): "
                             f"leave {' and '.join(unused)} out")
    inputs = checkpoint_probe_inputs(
        config.vocab_size,
        repeat_length=args.repeat_length or min(32, config.block_size // 2),
        repeat_batch=args.repeat_batch if _needs(probes, "repeated") else 0,
        text=text,
        text_len=args.text_len or min(128, config.block_size),
        text_batch_size=args.text_batch if _needs(probes, "text") else 0,
        seed=args.seed,
        token_min_frequency=args.token_min_frequency,
    )
    settings, inputs = _checkpoint_plan(config, settings, inputs, command_line=True)  # now, as iter_reprobe does
    # probed when the sweep asks, where a failure, even a probe's sys.exit(0), is reported as for snapshots
    return _probe_checkpoint_lazily(args.path, loaded, args.device, torch.float32, settings, inputs, args.step)


def _write_tensorboard(logdir: Path, results: list[tuple[int, Scalars]], run_id: str | None = None) -> None:
    """Writes the scalars, after the run's id (``RUN_ID_TAG``, at the first step, as the callback writes
    it), so that ``lens-report`` refuses a directory where two runs were re-probed instead of
    stitching their curves."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(logdir))
    try:
        if run_id is not None and results:
            writer.add_text(RUN_ID_TAG, run_id, global_step=results[0][0])
        for step, scalars in results:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()


def _write_csv(path: Path, results: list[tuple[int, Scalars]]) -> None:
    """Writes the table atomically (`atomic_write`): an existing file is replaced whole or not at all."""
    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(["step", "tag", "value"])
    for step, scalars in results:
        for tag, value in scalars.items():
            out.writerow([step, tag, repr(value)])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.getvalue().encode("utf-8"))


def import_user_modules(names: Sequence[str]) -> None:
    """Imports each module of ``names`` (``--import``) as ``python -m`` would find it: the current
    directory first. A console script's ``sys.path`` does not hold it, so ``lens-probe ... --import
    my_arch`` would not find the ``my_arch.py`` beside the user; it is on the path during the imports.

    Raises:
        ValueError: for a file name or path (``my_arch.py``, ``./my_arch``), naming the module to give.
        ModuleNotFoundError: for a module found nowhere, naming the directory searched first (one that a
            module imports is not found: its own error, as Python's).
    """
    cwd = os.getcwd()
    for name in names:  # a file name or path, refused before anything is imported: ``my_arch.py`` imported my_arch
        if name.endswith(".py") or name.startswith(".") or "/" in name or os.sep in name:  # and failed on ".py"
            stem = Path(name).stem
            raise ValueError(f"--import takes a module name, as python -m does: --import {stem}, not a file name "
                             f"or path ({name!r}); run lens-probe from the directory that holds {stem}.py, or put "
                             f"that directory on PYTHONPATH")
    added = bool(names) and cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:  # the module named, not one it imports (whose error is its own)
                if err.name is None or not (name == err.name or name.startswith(f"{err.name}.")):
                    raise
                raise ModuleNotFoundError(
                    f"--import {name}: no module named {err.name!r} in the current directory ({cwd}) or on "
                    f"sys.path; run lens-probe from the directory that holds it, or put that directory on "
                    f"PYTHONPATH", name=err.name) from err
    finally:
        if added:
            sys.path.remove(cwd)


def _steps_text(steps: Sequence[int], shown: int = 3) -> str:
    """``[0, 1, 2]``, or for a long sweep its first and last ``shown`` steps: ``[0, 50, 100, ..., 4900, 5000]``
    (a line per run, not a thousand numbers)."""
    if len(steps) <= 2 * shown + 1:
        return str(list(steps))
    return f"[{', '.join(map(str, steps[:shown]))}, ..., {', '.join(map(str, steps[-shown:]))}]"


_USER_ERRORS = (OSError, SnapshotError, CheckpointError, ValueError, TypeError, ImportError, ProbeFailure)
"""What ``lens-probe`` reports in one line and exits 2 for; anything else is a bug and raised."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lens-probe`` (`lens_callback.probe_cli.main`, which parses the command line before
    importing this module); returns the exit status (0 ok, 2 bad input)."""
    from lens_callback.probe_cli import main as probe_cli_main

    return probe_cli_main(argv)


def run_command(args: argparse.Namespace) -> int:
    """``lens-probe`` on its parsed command line (`lens_callback.probe_cli.build_parser`, ``--logdir`` and/or
    ``--csv`` given); returns the exit status (0 ok, 2 bad input)."""
    try:
        import_user_modules(args.imports)
        if not args.path.exists():
            raise FileNotFoundError(f"no such file or directory: {args.path}")
        _check_device(args.device)
        _check_outputs(args.logdir, args.csv, args.path)
        if args.path.is_file():
            if args.run is not None:
                raise ValueError("--run applies to snapshots, not to a nanoGPT checkpoint")
            probing: Iterator[tuple[int, Scalars]] = iter(_checkpoint_run(args))
            run_id: str | None = None  # a nanoGPT checkpoint records none
        else:
            settings = _snapshot_settings_from_args(args)  # None: each snapshot's own (its config.json)
            # every snapshot checked before any is probed
            plan = _plan(args.path.absolute(), settings, None, args.run, settings_from="command line")
            run_ids = {item.run_id for item in plan if item.run_id is not None}
            run_id = run_ids.pop() if len(run_ids) == 1 else None  # one run (`_one_run`), or none recorded
            probing = _probe_snapshots(plan, args.device, torch.float32)
    except _USER_ERRORS as err:
        print(f"lens-probe: error: {err}", file=sys.stderr)
        return 2
    results: list[tuple[int, Scalars]] = []
    failure: BaseException | None = None
    try:
        results.extend(probing)
    except BaseException as err:  # noqa: BLE001  (even Ctrl-C: what was probed before it is written first)
        failure = err
    if isinstance(failure, SystemExit) and not failure.code:  # a probe's sys.exit(0) mid-sweep is no success
        failure = ProbeFailure(f"probing stopped: sys.exit({failure.code!r}) was called during the sweep")
    if failure is not None and not results:
        if isinstance(failure, _USER_ERRORS):
            print(f"lens-probe: error: {failure}", file=sys.stderr)
            return 2
        raise failure
    steps = _steps_text([step for step, _ in results])
    where = " and ".join(str(p) for p in (args.logdir, args.csv) if p is not None)
    try:
        if args.logdir is not None:
            _write_tensorboard(args.logdir, results, run_id)
        if args.csv is not None:
            _write_csv(args.csv, results)
    except OSError as err:
        print(f"lens-probe: error: writing {where} failed: {err}", file=sys.stderr)
        if failure is not None:
            print(f"lens-probe: error: (probing had stopped after {len(results)} model(s): {failure})", file=sys.stderr)
        return 2
    if failure is not None:
        if isinstance(failure, _USER_ERRORS):
            print(f"lens-probe: error: {failure}", file=sys.stderr)
        print(f"lens-probe: wrote the {len(results)} model(s) probed before it (step(s) {steps}) to {where}",
              file=sys.stderr)
        if not isinstance(failure, _USER_ERRORS):
            raise failure
        return 2
    print(f"lens-probe: probed {len(results)} model(s) at step(s) {steps}; wrote {where}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
