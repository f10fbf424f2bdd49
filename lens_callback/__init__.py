"""Watch mechanistic-interpretability signals form while a transformer trains.

The main entry points are :class:`LensCallback` (a Lightning callback), :func:`to_hooked_transformer`
(live model or state dict -> ``HookedTransformer``), the probes in :mod:`lens_callback.probes`, the
converter registry (:func:`register_converter`, :func:`check_parity`), snapshots
(:func:`list_snapshots`, :func:`load_snapshot`), :func:`load_nanogpt_checkpoint`, and
:func:`read_metrics` / :func:`make_report` for post-hoc analysis.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from typing import Any

import lightning  # noqa: F401 - before the guard below: torch's and Lightning's own warning filters stay
import torch  # noqa: F401


def _import_transformer_lens() -> None:
    """Imports TransformerLens without the process-wide settings its import makes: it sets the
    ``transformers`` logger to ERROR and adds warning filters, one of them (from ``accelerate``)
    hiding every ``UserWarning`` attributed to ``torch.optim.lr_scheduler``, in a script that merely
    imports this package (observer review). Nothing to undo if the user imported it first."""
    if "transformer_lens" in sys.modules:
        return
    with warnings.catch_warnings():  # puts the filter list back as it was
        import transformers  # noqa: F401 - its own logging set-up (TRANSFORMERS_VERBOSITY) stays

        level = logging.getLogger("transformers").level
        import transformer_lens  # noqa: F401
    logging.getLogger("transformers").setLevel(level)


_import_transformer_lens()

from lens_callback.callback import LensCallback, LensError
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
from lens_callback.events import Event, EventDetector, SteepestRiseRule, ThresholdRule, default_rules, detect_events
from lens_callback.measure import DEFAULT_PROBES, build_runner
from lens_callback.probes import (
    ProbeInputs,
    ProbeRunner,
    available_probes,
    make_probe,
    register_probe,
    unregister_probe,
)
from lens_callback.schedule import ProbeSchedule

# Modules with heavier imports (pandas, matplotlib, safetensors) load on first use.
_LAZY = {
    "read_metrics": "lens_callback.metrics",
    "make_report": "lens_callback.report",
    "save_snapshot": "lens_callback.snapshots",
    "list_snapshots": "lens_callback.snapshots",
    "load_snapshot": "lens_callback.snapshots",
    "load_snapshot_weights": "lens_callback.snapshots",
    "SnapshotError": "lens_callback.snapshots",
    "load_nanogpt_checkpoint": "lens_callback.checkpoints",
    "CheckpointError": "lens_callback.checkpoints",
    "reprobe": "lens_callback.posthoc",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lens_callback' has no attribute {name!r}")


__all__ = [
    "DEFAULT_PROBES",
    "ConversionError",
    "Converter",
    "Event",
    "EventDetector",
    "LensCallback",
    "LensError",
    "NotLogitsError",
    "ParityReport",
    "ProbeInputs",
    "ProbeRunner",
    "ProbeSchedule",
    "SteepestRiseRule",
    "ThresholdRule",
    "available_converters",
    "available_probes",
    "build_hooked_transformer",
    "build_runner",
    "check_parity",
    "default_rules",
    "detect_events",
    "get_converter",
    "make_probe",
    "register_converter",
    "register_probe",
    "to_hooked_transformer",
    "unregister_converter",
    "unregister_probe",
    *sorted(_LAZY),
]
