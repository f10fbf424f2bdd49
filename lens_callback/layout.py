"""The names of a snapshot root's files and directories (`lens_callback.snapshots` writes them).

A module of its own, with no imports beyond the standard library: `lens-report` finds a log
directory's snapshot roots by these names without importing TransformerLens.
"""

from __future__ import annotations

import re

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
COMPLETE_FILE = "COMPLETE"
PROBE_INPUTS_WEIGHTS = "probe_inputs.safetensors"
PROBE_INPUTS_CONFIG = "probe_inputs.json"
TMP_PREFIX = ".tmp-"

ROOT_FILE_RE = re.compile(r"probe_inputs(-[0-9a-f]{16})?\.(json|safetensors)|events\.json")
"""The files of a snapshot root that the tools read: the probe inputs, earlier runs' archived ones
(`save_probe_inputs`) and the callback's ``events.json``."""

MAX_STEP = 2**63 - 1
"""The largest step: TensorBoard's and Lightning's steps are int64."""

STEP_DIR_RE = re.compile(r"step-(\d{8,})")
"""A snapshot directory's name (`snapshot_dirname`); the group is the step."""
