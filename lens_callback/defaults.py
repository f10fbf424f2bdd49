"""The callback's default probes, in a module with no imports: `lens-probe --help` lists them
before anything heavy is imported (`lens_callback.probe_cli`)."""

from __future__ import annotations

DEFAULT_PROBES: tuple[str, ...] = (
    "induction",
    "prev_token",
    "duplicate_token",
    "attn_entropy",
    "logit_lens",
    "icl_score",
    "repeated_loss",
)
"""What `LensCallback` probes unless told otherwise (``probes=``), in the order they are logged."""
