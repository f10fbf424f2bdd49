"""One probe measurement: probes on a ``HookedTransformer`` -> host arrays -> ``lens/`` scalars.

Shared by the live callback and post-hoc ``lens-probe``, so a snapshot re-probed later gives the
numbers that were logged live at its step (on the same attention path: ``lens-probe`` takes the lean
one, so a run that trained with ``lean_attention=False``, or fell back from it, re-probes to float
rounding; a model whose weights are not finite gives NaN both ways, `Measurement.void`).
"""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformer_lens import HookedTransformer

from lens_callback.defaults import DEFAULT_PROBES
from lens_callback.probes import ProbeInputs, ProbeRunner, available_probes, make_probe
from lens_callback.probes.runner import has_host_step, probe_modes
from lens_callback.sinks import colliding_tags, scalar_tags, to_host


def build_runner(probes: Sequence[str], probe_options: Mapping[str, Mapping[str, Any]] | None = None) -> ProbeRunner:
    """A :class:`ProbeRunner` over the named probes, each built with its options.

    ``probes`` may be one name (as `LensCallback`'s ``probes``): a string is a ``Sequence[str]`` too, whose
    characters were taken for names (``unknown probe name(s) ['i', 'n', 'd', ...]``).

    Raises:
        ValueError: naming unknown probes (and the available ones, and how to register one of your own),
            options for a probe that is not enabled, or ``probe_options`` that is not a mapping.
    """
    probes = [probes] if isinstance(probes, str) else list(probes)
    if not probes:
        raise ValueError(f"probes must name at least one probe; available: {available_probes()}")
    unknown = [p for p in probes if p not in available_probes()]
    if unknown:
        # lens-train has no --import (lens-probe's): LightningCLI's way is a script of the user's that imports the
        # module first, which a DDP launcher also re-runs on every rank
        raise ValueError(f"probes: unknown probe name(s) {unknown}; available: {available_probes()}. A probe of your "
                         f"own must be registered (lens_callback.register_probe) first: import its module (lens-probe: "
                         f"--import MODULE; for lens-train, run a script that imports it and then calls "
                         f"lens_callback.cli.train_main(), as `python SCRIPT fit ...`)")
    if probe_options is not None and not isinstance(probe_options, Mapping):  # dict() of a string failed unnamed
        raise ValueError(f"probe_options must map probe names to their options, e.g. "
                         f"{{'logit_lens': {{'max_positions': 32}}}}, got {probe_options!r}")
    options = dict(probe_options or {})
    not_dicts = {name: value for name, value in options.items() if not isinstance(value, Mapping)}
    if not_dicts:
        raise ValueError(f"probe_options: each probe's options must be a mapping of option -> value, got {not_dicts}")
    stray = sorted(set(options) - set(probes))
    if stray:
        raise ValueError(f"probe_options: options given for probe(s) {stray} that are not enabled (probes={probes})")
    return ProbeRunner([make_probe(name, **dict(options.get(name, {}))) for name in probes])


@dataclass
class Measurement:
    """The outcome of one probe step: host arrays per result key, the flattened scalars, and the
    outcome of each check `measure` was given."""

    arrays: dict[str, np.ndarray]
    scalars: dict[str, float]
    per_head: list[str]
    checks: dict[str, bool] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # probe name -> what it raised (`ProbeRunner.failures`) or
    # which of its results would share a tag (`sinks.colliding_tags`)

    def finite(self) -> bool:
        return all(np.isfinite(v) for v in self.scalars.values())

    def void(self) -> None:
        """Every result NaN: for a model whose weights are not finite, whose attention scores
        TransformerLens keeps finite by zeroing NaN patterns (they would read as real values)."""
        self.arrays = {name: np.full(np.shape(a), np.nan, dtype=np.float32) for name, a in self.arrays.items()}
        self.scalars = {tag: math.nan for tag in self.scalars}


_CHECK = "/check/"
"""Prefix of a check's key in the transfer: a result key starts with a probe name, which is not
empty and has no ``/`` (`register_probe`)."""


def measure(
    hooked: HookedTransformer,
    runner: ProbeRunner,
    inputs: ProbeInputs,
    *,
    max_batch_tokens: int | None = None,
    per_head_scalars: bool = True,
    lean_attention: bool = True,
    cuda_graph: bool = False,
    checks: Mapping[str, torch.Tensor] | None = None,
) -> Measurement:
    """Runs the probes (one forward per probe batch), moves every result to the host at once, and there
    finishes the results of the probes with a host step (`ProbeRunner.host_step`).

    Runs with autocast disabled and without gradients (`probe_modes`, as `run_probe` runs), the host step too
    (`ProbeRunner.host_step`, with the CPU's autocast off); the caller's modes are restored on exit.
    ``cuda_graph`` replays a recorded run on CUDA (`ProbeRunner.run`); the results are copied to
    the host before the next replay can overwrite them. ``checks`` are 0-dim boolean tensors on
    the device (e.g. the callback's finite-weights check) read in the same transfer, so that the
    step synchronises once; they come back as ``Measurement.checks``.
    """
    device_type = next(hooked.parameters()).device.type
    with probe_modes(device_type):
        results = runner.run(hooked, inputs, max_batch_tokens=max_batch_tokens, lean_attention=lean_attention,
                             cuda_graph=cuda_graph)
    checks = dict(checks or {})
    arrays = to_host({**results, **{_CHECK + name: flag for name, flag in checks.items()}})
    passed = {name: bool(arrays.pop(_CHECK + name)) for name in checks}
    # after the one transfer: what cannot stay on the device, on the host (in the probe run's modes: `host_step`)
    arrays = runner.host_step(arrays, hooked.cfg)
    per_head = [p.name for p in runner.probes if p.per_head and p.name in arrays]
    failures = dict(runner.failures)
    # a probe's results written under one tag: the later replaced the earlier in the scalars, unseen (custom-probe
    # review: a per-head probe's key "mean" took the heads' mean's place); that probe's fault, as a misshapen result
    # the keys are on_host's where a probe has a host step (it returns what is logged): that method is named
    host_steps = {probe.name for probe in runner.probes if has_host_step(probe)}
    for tag, names in colliding_tags(arrays, per_head, per_head_scalars).items():
        probe = names[0].partition("/")[0]
        where = "on_host()" if probe in host_steps else "compute()"
        failures.setdefault(probe, f"{where}: ValueError: results {names} would all be logged as {tag!r} (rename "
                                   f"the key: lens/{{probe}}/max, /mean, /heatmap and /L{{l}}H{{h}} are a per-head "
                                   f"result's, /L{{l}} a vector's, /{{i}}_{{j}} a matrix's)")
    if len(failures) > len(runner.failures):
        arrays = {name: value for name, value in arrays.items() if name.partition("/")[0] not in failures}
        per_head = [name for name in per_head if name in arrays]
    return Measurement(arrays, scalar_tags(arrays, per_head, per_head_scalars), per_head, passed, failures)

