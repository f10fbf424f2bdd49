"""Watch mechanistic-interpretability signals form while a transformer trains.

The main entry points are :class:`LensCallback` (a Lightning callback), :func:`to_hooked_transformer`
(live model or state dict -> ``HookedTransformer``), the probes in :mod:`lens_callback.probes`, the
converter registry (:func:`register_converter`, :func:`check_parity`), snapshots
(:func:`list_snapshots`, :func:`load_snapshot`), :func:`load_nanogpt_checkpoint`, and
:func:`read_metrics` / :func:`make_report` for post-hoc analysis.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Every name loads its module on first use: `import lens_callback` imports neither Lightning nor
# TransformerLens (seconds each), so `lens-report` and `read_metrics` start in about a second. The
# modules that need TransformerLens import it through `lens_callback._tl_import`, which keeps its
# import's process-wide settings out of the user's process.
_LAZY = {
    "LensCallback": "lens_callback.callback",
    "LensError": "lens_callback.callback",
    **dict.fromkeys(
        ("ConversionError", "Converter", "NotLogitsError", "ParityReport", "available_converters",
         "build_hooked_transformer", "check_parity", "get_converter", "register_converter",
         "to_hooked_transformer", "unregister_converter"),
        "lens_callback.convert"),
    **dict.fromkeys(
        ("Event", "EventDetector", "SteepestRiseRule", "ThresholdRule", "default_rules", "detect_events"),
        "lens_callback.events"),
    "DEFAULT_PROBES": "lens_callback.defaults",
    "build_runner": "lens_callback.measure",
    **dict.fromkeys(
        ("ProbeInputs", "ProbeRunner", "available_probes", "make_probe", "register_probe", "unregister_probe"),
        "lens_callback.probes"),
    "ProbeSchedule": "lens_callback.schedule",
    "read_metrics": "lens_callback.metrics",
    "make_report": "lens_callback.report",
    **dict.fromkeys(
        ("save_snapshot", "list_snapshots", "load_snapshot", "load_snapshot_weights", "SnapshotError"),
        "lens_callback.snapshots"),
    "load_nanogpt_checkpoint": "lens_callback.checkpoints",
    "CheckpointError": "lens_callback.checkpoints",
    "reprobe": "lens_callback.posthoc",
}

_SUBMODULES = frozenset((
    "callback", "checkpoints", "cli", "convert", "defaults", "events", "fileio", "layout", "measure", "metrics",
    "posthoc", "probe_cli", "probes", "pytorch_lightning", "report", "schedule", "sinks", "snapshots", "tokenizer"))
"""The public modules, imported on first use as attributes too: ``import lens_callback`` then
``lens_callback.snapshots.load_probe_inputs(root)``, as the package's eager import allowed."""

if TYPE_CHECKING:  # what type checkers and IDEs see: the names themselves
    from lens_callback.callback import LensCallback, LensError
    from lens_callback.checkpoints import CheckpointError, load_nanogpt_checkpoint
    from lens_callback.convert import (
        ConversionError,
        Converter,
        NotLogitsError,
        ParityReport,
        available_converters,
        build_hooked_transformer,
        check_parity,
        get_converter,
        register_converter,
        to_hooked_transformer,
        unregister_converter,
    )
    from lens_callback.defaults import DEFAULT_PROBES
    from lens_callback.events import Event, EventDetector, SteepestRiseRule, ThresholdRule, default_rules, detect_events
    from lens_callback.measure import build_runner
    from lens_callback.metrics import read_metrics
    from lens_callback.posthoc import reprobe
    from lens_callback.probes import (
        ProbeInputs,
        ProbeRunner,
        available_probes,
        make_probe,
        register_probe,
        unregister_probe,
    )
    from lens_callback.report import make_report
    from lens_callback.schedule import ProbeSchedule
    from lens_callback.snapshots import (
        SnapshotError,
        list_snapshots,
        load_snapshot,
        load_snapshot_weights,
        save_snapshot,
    )


if not TYPE_CHECKING:  # hidden from type checkers: they then flag a name the package does not have

    def __getattr__(name: str) -> Any:
        if name in _LAZY:
            value = getattr(importlib.import_module(_LAZY[name]), name)
            globals()[name] = value  # looked up once
            return value
        if name in _SUBMODULES:
            return importlib.import_module(f"{__name__}.{name}")  # which sets it as the package's attribute
        raise AttributeError(f"module 'lens_callback' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = sorted(_LAZY)
