"""Model snapshots: safetensors weights + a JSON config, written atomically, read without pickle.

A snapshot is what a probe step needs to be re-run later without the user's code or training data:
the source model's weights (in its own naming, e.g. nanoGPT's), the name of the converter that maps
them to TransformerLens, and that converter's ``model_config``. The fixed probe batches of a run are
written once per snapshot root (:func:`save_probe_inputs`), so ``lens-probe`` re-probes a snapshot
with exactly the inputs the live callback used.

Layout of a snapshot root::

    root/
      probe_inputs.safetensors   the fixed probe batches ("repeated", "text"), int64
      probe_inputs.json          their settings + the SHA-256 of probe_inputs.safetensors
      step-00000100/
        model.safetensors        weights, contiguous CPU tensors, source naming, each storage once
        config.json              format_version, converter, model_config, step, dtype, aliases,
                                 metadata, versions, created
        COMPLETE                 written last: a directory without it is ignored / refused
      .tmp-*/                    an interrupted write (ignored; safe to delete), but for
      .tmp-old-*/previous        a step's earlier snapshot that a re-save of the step was replacing
                                 when the process died between its two renames: if the step's
                                 directory is missing, rename it back

Writes follow Lightning's ``cloud_io._atomic_save``: write the weights, ``config.json`` and then the
``COMPLETE`` marker into a temporary directory in ``root``, ``fsync``, and ``os.replace`` it to its
final name in one step. Nothing here unpickles: weights are safetensors, the rest JSON,
and names read from files are never used to build paths (only ``step``, an int, is).
"""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save, save_file
from torch import Tensor
from transformer_lens import HookedTransformer

from lens_callback.convert import (
    Converter,
    available_converters,
    build_hooked_transformer,
    get_converter,
    strip_prefixes,
)
from lens_callback.convert.base import check_device_and_dtype
from lens_callback.fileio import atomic_write, fsync_dir, new_temp_dir
from lens_callback.layout import (
    COMPLETE_FILE,
    CONFIG_FILE,
    MAX_STEP,
    PROBE_INPUTS_CONFIG,
    PROBE_INPUTS_WEIGHTS,
    ROOT_FILE_RE,
    STEP_DIR_RE,
    TMP_PREFIX,
    WEIGHTS_FILE,
)
from lens_callback.probes import ProbeInputs
from lens_callback.schedule import integer_or_none
from lens_callback.tokenizer import TOKENIZER_KEY, attach_tokenizer, check_tokenizer_spec

__all__ = [
    "FORMAT_VERSION",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotPruneError",
    "SnapshotWriteError",
    "is_runs_snapshot",
    "list_snapshots",
    "load_probe_inputs",
    "load_snapshot",
    "load_snapshot_weights",
    "probe_inputs_sha256",
    "prune_snapshots",
    "read_snapshot_config",
    "read_snapshot_header",
    "save_probe_inputs",
    "save_snapshot",
    "scan_snapshots",
    "snapshot_json",
    "snapshot_dirname",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the snapshot format written here; readers accept versions up to this one."""

_PROBE_BATCHES = ("repeated", "text")
_VERSIONED = {
    "torch": "torch",
    "transformer_lens": "transformer-lens",
    "lightning": "lightning",
    "lens_callback": "lens-callback",
}


class SnapshotError(ValueError):
    """A snapshot (or probe-inputs file) that is incomplete, corrupt or unusable; names the path."""


class UnknownConverterError(SnapshotError):
    """A snapshot naming a converter that is not registered (`snapshot_converter`): usually every snapshot of
    its root, so `lens-probe` says it once for them all (`message` of their names), where it repeated the
    same advice for each one (journey review)."""

    def __init__(self, snapshot: str | os.PathLike[str], converter: str) -> None:
        self.converter = converter
        super().__init__(self.message([Path(snapshot).name], str(snapshot)))

    def message(self, names: list[str], where: str | None = None) -> str:
        """The refusal of one snapshot (at ``where``) or of the snapshots ``names``, by step, named by the
        first and last."""
        one = where is not None
        which = (f"{where}: unknown converter" if one else
                 f"{len(names)} snapshots ({names[0]} {'and' if len(names) == 2 else 'to'} {names[-1]}) name an "
                 f"unknown converter")
        return (f"{which} {self.converter!r}; available: {available_converters()}. If "
                f"{'the snapshot was' if one else 'they were'} written with your own converter, import the module "
                f"that registers it (lens_callback.register_converter) first (lens-probe: --import MODULE).")


class SnapshotWriteError(OSError):
    """Writing a snapshot failed for a reason other than an ``OSError`` (which is re-raised as is).

    An ``OSError`` subclass, so one ``except OSError`` in the caller covers every failed write.
    """


class SnapshotPruneError(OSError):
    """:func:`prune_snapshots` stopped at a snapshot it could not move aside.

    Attributes:
        removed: The steps removed before it, ascending (gone from the listing: count them as removed).
        step: The step of the snapshot it stopped at (still listed, as are those after it).

    The ``OSError`` that stopped it is the ``__cause__``.
    """

    def __init__(self, message: str, *, removed: list[int], step: int) -> None:
        super().__init__(message)
        self.removed = removed
        self.step = step


@dataclass(frozen=True)
class SnapshotInfo:
    """A complete snapshot found by :func:`list_snapshots`.

    Attributes:
        step: The training step (``global_step``) the snapshot was taken at.
        path: The snapshot directory.
        converter: Registry name of the converter that loads it.
        created: ISO-8601 UTC time of writing.
        dtype: The weights' dtype (``"float32"``, ...; ``"mixed"`` if they differ).
        format_version: The snapshot format version.
        metadata: ``config.json``'s ``metadata`` (the callback's: ``probe_settings``, ``run_id``, ...).
    """

    step: int
    path: Path
    converter: str
    created: str
    dtype: str
    format_version: int
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# -- helpers -------------------------------------------------------------------------------------
def snapshot_dirname(step: int) -> str:
    """``"step-{step:08d}"``, the directory name of the snapshot of ``step``.

    Raises:
        ValueError: if ``step`` is not a non-negative integer.
    """
    return f"step-{check_step(step):08d}"




def check_step(step: Any) -> int:
    """``step`` as an int: a non-negative integer (numpy and 0-d tensor integers too, not bools), at
    most `MAX_STEP`."""
    value = integer_or_none(step)
    if value is None or not 0 <= value <= MAX_STEP:
        raise ValueError(f"step must be a non-negative int of at most 2**63 - 1, got {step!r}")
    return value


@lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, dist in _VERSIONED.items():
        try:
            out[key] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[key] = None
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_summary(floating: Iterable[str]) -> str:
    """``config.json``'s ``dtype`` for weights of these floating-point dtype names: the one dtype,
    ``"mixed"`` or ``"none"``."""
    names = sorted(set(floating))
    return names[0] if len(names) == 1 else ("mixed" if names else "none")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def snapshot_json(data: Mapping[str, Any], what: str) -> bytes:
    """``data`` as a snapshot's JSON files hold it (sorted keys, no NaN).

    Raises:
        ValueError: naming ``what``, for values that are not plain JSON (e.g. numpy scalars, dtypes)
            or keys that cannot be sorted.
    """
    try:
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must hold plain JSON values (str, int, float, bool, None, lists, dicts): {err}") from err
    encoded = (text + "\n").encode("utf-8")
    if len(encoded) > _MAX_JSON_BYTES:  # the readers refuse it unread
        raise ValueError(f"{what} takes {len(encoded)} bytes as JSON, more than a snapshot's JSON file may hold "
                         f"({_MAX_JSON_BYTES})")
    return encoded


def json_change(data: Any, what: str) -> str | None:
    """Where ``data`` would not come back equal from a snapshot's JSON, or ``None`` if it would.

    ``json`` writes a dict's int, float, bool or ``None`` keys as strings and a tuple as a list, so a
    value written that way reloads different: a converter that reads ``config["kinds"][0]`` works
    on the live dict and fails (or reads something else) on the snapshot's. Values that JSON cannot
    hold at all are `snapshot_json`'s to refuse.
    """
    if isinstance(data, Mapping):
        for key, value in data.items():
            if not isinstance(key, str):
                return f"{what} has the {type(key).__name__} key {key!r}, which JSON stores as the string {json.dumps(key)!r}"
            if (change := json_change(value, f"{what}[{key!r}]")) is not None:
                return change
    elif isinstance(data, (list, tuple)):
        if isinstance(data, tuple):
            return f"{what} is a tuple, which JSON stores as a list"
        for i, value in enumerate(data):
            if (change := json_change(value, f"{what}[{i}]")) is not None:
                return change
    return None


def _host_tensors(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Contiguous CPU copies of ``state_dict`` with each shared storage kept once.

    Sharing is found on the tensors' own device, by storage (``untyped_storage().data_ptr()``) and
    view (offset, shape, stride, dtype), never by name: two names for the same view (tied weights)
    become one tensor plus an alias; two different views of one storage are stored separately.

    Returns:
        ``(tensors, aliases)`` where ``aliases`` maps a dropped name to the stored name it equals.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}  # (device, storage ptr, offset, shape, stride, dtype) -> name
    storages: set[tuple] = set()
    for name, value in state_dict.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise ValueError(f"state_dict must map str to Tensor, got {name!r}: {type(value).__name__}")
        tensor = value.detach()
        shared_storage = False
        if tensor.numel() > 0:
            ptr = tensor.untyped_storage().data_ptr()
            storage = (str(tensor.device), ptr)
            view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
            if view in views:
                aliases[name] = views[view]
                continue
            views[view] = name
            shared_storage = storage in storages
            storages.add(storage)
        if tensor.device.type == "cpu":
            # safetensors refuses two saved tensors on one storage: copy a second, different view
            tensor = tensor.clone(memory_format=torch.contiguous_format) if shared_storage else tensor.contiguous()
        else:
            tensor = tensor.to("cpu").contiguous()  # a fresh storage per tensor
        tensors[name] = tensor
    return tensors, aliases


# -- save ----------------------------------------------------------------------------------------
def _is_tokenizer_record(spec: Any) -> bool:
    """Whether ``metadata["tokenizer"]`` is read as a tokenizer record (`save_snapshot` checks it, `load_snapshot`
    attaches it, warning if it gives no tokenizer): a dict with a ``"kind"``, as every record has. Another value is a
    key of the user's own, saved before it was a record's ({"name": "gpt2"}): loaded without a tokenizer."""
    return isinstance(spec, Mapping) and "kind" in spec


def save_snapshot(
    root: str | os.PathLike[str],
    step: int,
    *,
    converter: str | Converter,
    model_config: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Writes the snapshot of ``step`` as ``root/step-{step:08d}``, atomically.

    This is the format's writer: it does not check that ``converter`` is registered or can build a
    model from ``model_config`` and these weights, which only `load_snapshot` finds out (the callback
    checks the conversion when training starts; a meta-device check costs 18 ms per snapshot for the
    default model and 90 ms for GPT-2 small on a 2-core CPU). Writing snapshots by hand, check once
    first with ``lens_callback.convert.base.checked_source_weights(get_converter(converter),
    model_config, state_dict)``.

    Args:
        root: The snapshot root (created if missing).
        step: The training step; a non-negative int and the only input used to build the path.
        converter: Registry name (or instance) of the converter that loads these weights.
        model_config: The converter's ``model_config`` (plain JSON values).
        state_dict: The source model's weights in its own naming, on any device. ``torch.compile``
            / DDP prefixes are stripped. Tensors sharing a view (tied weights) are stored once and
            recorded in ``config.json["aliases"]``. Not modified.
        metadata: Extra plain JSON values (the callback stores ``{"probe_settings": ...}``). A
            ``"tokenizer"`` dict with a ``"kind"`` is read back by `load_snapshot` as a tokenizer record
            (`lens_callback.tokenizer`), so one that is not a record, which would load without a tokenizer,
            is refused here.

    Returns:
        The snapshot directory.

    Raises:
        ValueError: for a bad ``step``, an empty state dict, values that are not plain JSON, or a tokenizer
            record that is not one (checked before anything is written).
        OSError: when writing fails (the original error, or :class:`SnapshotWriteError`); partial
            files are removed and an earlier snapshot of the same step is kept where possible.
    """
    name = snapshot_dirname(step)
    step = check_step(step)
    converter_name = converter.name if isinstance(converter, Converter) else converter
    if not isinstance(converter_name, str) or not converter_name:
        raise ValueError(f"converter must be a registered converter's name, got {converter!r}")
    source = strip_prefixes(state_dict)
    if not source:
        raise ValueError("state_dict is empty: nothing to snapshot")
    # validate everything JSON before touching the disk (a programming error, not an I/O failure)
    snapshot_json({"model_config": dict(model_config), "metadata": dict(metadata or {})}, "model_config/metadata")
    spec = (metadata or {}).get(TOKENIZER_KEY)
    if _is_tokenizer_record(spec):  # what load_snapshot reads as a record: dropped there, so refused here
        try:
            check_tokenizer_spec(spec)
        except ValueError as err:
            raise ValueError(f"metadata[{TOKENIZER_KEY!r}]: {err} (load_snapshot would load the snapshot without a "
                             f"tokenizer)") from err
    if (change := json_change(dict(model_config), "model_config")) is not None:
        raise ValueError(f"{change}: the snapshot would reload with another model_config (use str keys and lists)")

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_dir(root, f"{TMP_PREFIX}{name}-")
    final = root / name
    try:
        tensors, aliases = _host_tensors(source)
        config = {
            "format_version": FORMAT_VERSION,
            "converter": converter_name,
            "model_config": dict(model_config),
            "step": step,
            "dtype": _dtype_summary(_dtype_name(t.dtype) for t in tensors.values() if t.is_floating_point()),
            "aliases": dict(sorted(aliases.items())),
            "metadata": dict(metadata or {}),
            "versions": _versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        _fsync_file(tmp / WEIGHTS_FILE)
        _write_bytes(tmp / CONFIG_FILE, snapshot_json(config, "config"))
        # safetensors writes 0600 whatever the umask: give the weights the config's (the umask's) mode
        os.chmod(tmp / WEIGHTS_FILE, stat.S_IMODE((tmp / CONFIG_FILE).stat().st_mode))
        # the marker inside the hidden temporary directory, then one rename publishes the whole
        # snapshot: a failure before it (a full disk) leaves an earlier snapshot of the step as it was
        _write_bytes(tmp / COMPLETE_FILE, f"{step}\n".encode())
        fsync_dir(tmp)
        _move_into_place(tmp, final)
    except BaseException as err:
        _remove_tree(tmp)
        if isinstance(err, OSError) or not isinstance(err, Exception):
            raise
        raise SnapshotWriteError(f"writing snapshot {final} failed: {type(err).__name__}: {err}") from err
    return final


SNAPSHOT_FILES = frozenset({WEIGHTS_FILE, CONFIG_FILE, COMPLETE_FILE})
"""The files of one snapshot directory."""


def _is_litter(entry: Path) -> bool:
    """Whether ``entry`` is a plain file a file browser or NFS adds on its own: macOS's ``.DS_Store`` and
    ``._*`` AppleDouble files, KDE's ``.directory``, NFS's ``.nfs*`` (a deleted file still open)."""
    name = entry.name
    litter = name in (".DS_Store", ".directory") or name.startswith(("._", ".nfs"))
    return litter and entry.is_file() and not entry.is_symlink()


def _move_into_place(tmp: Path, final: Path) -> None:
    """``os.replace(tmp, final)``, first moving an existing ``final`` aside (renames need an empty target).

    Only an earlier snapshot of the step (a directory holding nothing but snapshot files, complete or
    not, and the files a file browser or NFS adds, `_is_litter`) is replaced; anything else at that name
    (a hidden folder of the user's too) is the user's and raises `FileExistsError`."""
    old: Path | None = None
    if final.exists() or final.is_symlink():
        if final.is_symlink() or not final.is_dir() or any(
                c.name not in SNAPSHOT_FILES and not _is_litter(c) for c in final.iterdir()):
            raise FileExistsError(f"{final} exists and holds files other than a snapshot's: move it away or "
                                  f"choose another snapshot_dir; it is left as it is")
        old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-", dir=final.parent))
        os.replace(final, old / "previous")
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:  # put the previous snapshot back
            with contextlib.suppress(OSError):
                os.replace(old / "previous", final)
            _remove_tree(old)
        raise
    fsync_dir(final.parent)
    if old is not None:
        _remove_tree(old)


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)


# -- list / prune --------------------------------------------------------------------------------
def _check_format_version(file: Path, version: Any) -> None:
    """Raises `SnapshotError` naming ``file`` unless ``version`` is one this code reads (1..`FORMAT_VERSION`)."""
    integer = isinstance(version, int) and not isinstance(version, bool)
    if integer and 1 <= version <= FORMAT_VERSION:
        return
    newer = integer and version > FORMAT_VERSION
    raise SnapshotError(
        f"{file}: unsupported format_version {version!r} (this lens_callback reads 1..{FORMAT_VERSION}; "
        + ("the file was written by a newer lens_callback)" if newer else
           "the file is not one lens_callback wrote, or is damaged)")
    )


_MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file of a snapshot read (the callback's are a few KB): a shared directory's file that
is a link to ``/dev/zero`` or a huge file is refused, not read until memory runs out."""


def _read_json(file: Path) -> Any:
    """``file``'s JSON value. Raises `SnapshotError` naming it if it is not a regular file of at most
    `_MAX_JSON_BYTES` (a FIFO would block the read, a device never end it) or cannot be read or
    decoded (``json.loads`` raises a plain ``ValueError`` for an int over 4,300 digits and
    ``RecursionError`` for deep nesting); a missing file raises ``FileNotFoundError``."""
    try:
        info = file.stat()
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotError(f"{file}: not a regular file")
        if info.st_size > _MAX_JSON_BYTES:
            raise SnapshotError(f"{file}: {info.st_size} bytes, more than a snapshot's JSON file holds "
                                f"(at most {_MAX_JSON_BYTES})")
        return json.loads(file.read_text(encoding="utf-8"))
    except (FileNotFoundError, SnapshotError):
        raise
    except (OSError, ValueError, RecursionError) as err:
        raise SnapshotError(f"{file}: unreadable or corrupt ({err})") from err


def _read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of the snapshot at ``path``, checked; raises :class:`SnapshotError` naming it."""
    file = path / CONFIG_FILE
    try:
        config = _read_json(file)
    except FileNotFoundError:
        raise SnapshotError(f"{file}: missing; {path} is not a snapshot") from None
    if not isinstance(config, dict):
        raise SnapshotError(f"{file}: expected a JSON object, got {type(config).__name__}")
    _check_format_version(file, config.get("format_version"))
    checks = {
        "converter": lambda v: isinstance(v, str) and bool(v),
        "model_config": lambda v: isinstance(v, dict),
        "step": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_STEP,
        "aliases": lambda v: isinstance(v, dict) and all(isinstance(a, str) and isinstance(b, str) for a, b in v.items()),
        "metadata": lambda v: isinstance(v, dict),
    }
    for key, ok in checks.items():
        if key not in config or not ok(config[key]):
            raise SnapshotError(f"{file}: missing or invalid {key!r} ({config.get(key)!r})")
    return config


def _is_complete(path: Path) -> bool:
    """Whether ``path`` holds the `COMPLETE_FILE` marker; an ``OSError`` other than a missing file
    (``EACCES``: a directory this user may not read) is raised."""
    return (path / COMPLETE_FILE).is_file()


def _unreadable(path: Path, err: OSError) -> str:
    """Why the step directory ``path``, whose marker cannot be looked at, is skipped (naming it, as the
    other reasons name their file)."""
    return f"{path / COMPLETE_FILE}: cannot be read ({type(err).__name__}: {err.strerror or err})"


_WARNED_SKIPS: set[tuple[str, str]] = set()
"""``(snapshot directory, reason)`` pairs `list_snapshots` has warned about in this process."""


def list_snapshots(root: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """The complete snapshots under ``root``, sorted by step.

    Directories without ``COMPLETE``, ``.tmp-*`` directories and anything not named
    ``step-NNNNNNNN`` are skipped; a complete snapshot whose ``config.json`` is unreadable or
    disagrees with its directory name is skipped with a logged warning, once per process for the
    same directory and reason (the callback lists its directory at every snapshot step). Never
    raises for junk; a missing root gives ``[]`` with a logged warning (a mistyped path), and so does
    a snapshot directory itself (with a logged warning naming its parent, the root to list).
    """
    found, skipped = scan_snapshots(root)
    if not found:
        _warn_about_root(root)
    for path, reason in skipped:
        _warn_skipped(path, reason)
    return found


def _warn_about_root(root: str | os.PathLike[str]) -> None:
    """`list_snapshots`'s warnings for a root that holds no snapshot: a missing one, or a snapshot itself."""
    if not Path(root).is_dir():
        key = (str(root), "no such directory")
        if key not in _WARNED_SKIPS:
            _WARNED_SKIPS.add(key)
            log.warning("list_snapshots(%s): no such directory, so no snapshots", root)
    with contextlib.suppress(OSError):  # an unreadable root: what listing it found (nothing) says enough
        if not (STEP_DIR_RE.fullmatch(Path(root).name) and _is_complete(Path(root))):
            return
        key = (str(root), "a snapshot, not a root")
        if key not in _WARNED_SKIPS:
            _WARNED_SKIPS.add(key)
            log.warning("list_snapshots(%s): that is a snapshot directory, not a root of snapshots; list its "
                        "parent, %s", root, Path(root).parent)


def _warn_skipped(path: Path, reason: str) -> None:
    """Logs that the complete snapshot ``path`` is skipped for ``reason``, once per process and reason."""
    key = (str(path), reason)
    if key not in _WARNED_SKIPS:
        _WARNED_SKIPS.add(key)
        log.warning("skipping snapshot %s: %s", path, reason)


def scan_snapshots(root: str | os.PathLike[str]) -> tuple[list[SnapshotInfo], list[tuple[Path, str]]]:
    """`list_snapshots` without the warnings: ``(complete snapshots by step, [(directory, reason), ...])``,
    the second list holding the complete snapshots that cannot be read (``reason`` names the file)."""
    root = Path(root)
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    found: list[SnapshotInfo] = []
    skipped: list[tuple[Path, str]] = []
    for entry in entries:
        match = STEP_DIR_RE.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        try:
            if not _is_complete(path):
                continue
        except OSError as err:  # e.g. another user's snapshot, written under umask 077 (faults review)
            skipped.append((path, _unreadable(path, err)))
            continue
        info = _snapshot_info(path, int(match.group(1)))
        if isinstance(info, str):
            skipped.append((path, info))
        else:
            found.append(info)
    return sorted(found, key=lambda info: info.step), skipped


def _snapshot_info(path: Path, step: int) -> SnapshotInfo | str:
    """The complete snapshot ``path``, named for ``step``, as listed, or why it is skipped (its
    ``config.json`` unreadable, or not ``step``'s in ``step``'s directory)."""
    try:
        config = _read_config(path)
    except SnapshotError as err:
        return str(err)
    if config["step"] != step or path.name != snapshot_dirname(step):
        return _step_mismatch(path, config, step)
    return SnapshotInfo(
        step=step,
        path=path,
        converter=config["converter"],
        created=str(config.get("created", "")),
        dtype=str(config.get("dtype", "")),
        format_version=config["format_version"],
        metadata=config["metadata"],
    )


def is_runs_snapshot(metadata: Mapping[str, Any], run_id: str) -> bool:
    """Whether a snapshot whose ``config.json`` holds ``metadata`` is run ``run_id``'s: it carries that
    id, or none (written before run ids: the caller's list of the run's steps decides those)."""
    return metadata.get("run_id") in (run_id, None)


def prune_snapshots(
    root: str | os.PathLike[str], keep_last: int, protect: Iterable[int] = (), among: Iterable[int] | None = None,
    run_id: str | None = None,
) -> list[int]:
    """Removes the oldest complete snapshots, keeping the newest ``keep_last`` and every protected one.

    Each removed snapshot is first renamed to a ``.tmp-prune-*`` name (so it never looks complete
    while half-deleted), and counts as removed from then on; the renamed directory is then deleted
    best-effort: one that cannot be (a file an NFS client holds open) is left behind and named in
    one logged warning per call (safe to delete by hand). Incomplete directories are left alone.

    Args:
        root: The snapshot root.
        keep_last: How many of the newest complete snapshots to keep (``>= 0``).
        protect: Steps never removed (e.g. where an event was detected).
        among: If given, only these steps count and may go (e.g. the current run's); other
            snapshots under ``root`` are left alone.
        run_id: If given, only snapshots whose ``metadata.run_id`` is this one, or that carry none
            (written before run ids), count and may go: a run writing into the same root at the same
            time may have replaced one of ``among``'s steps with its own.

    Returns:
        The removed steps, ascending.

    Raises:
        ValueError: if ``keep_last`` is not a non-negative integer (a numpy one too; not a bool).
        SnapshotPruneError: an ``OSError``, if a snapshot cannot be moved aside; pruning stops there,
            and its ``removed`` lists the steps removed before it.
    """
    count = integer_or_none(keep_last)  # a numpy integer too
    if count is None or count < 0:
        raise ValueError(f"keep_last must be a non-negative int, got {keep_last!r}")
    keep_last = count
    protected = {check_step(s) for s in protect}
    steps = None if among is None else {check_step(s) for s in among}
    candidates = _prune_candidates(Path(root), keep_last, protected, steps, run_id)
    removed: list[int] = []
    left: list[tuple[Path, OSError]] = []
    try:
        for info in candidates:
            if info.step in protected:
                continue
            trash: Path | None = None
            try:
                trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}prune-", dir=info.path.parent))
                os.replace(info.path, trash / "snapshot")
            except OSError as err:
                if trash is not None:
                    with contextlib.suppress(OSError):
                        trash.rmdir()
                raise SnapshotPruneError(
                    f"removing snapshot {info.path} failed ({err}); removed before it: {removed}",
                    removed=removed, step=info.step,
                ) from err
            removed.append(info.step)
            try:
                shutil.rmtree(trash)
            except OSError as err:
                left.append((trash, err))
    finally:
        if left:
            log.warning(
                "could not delete the pruned snapshot(s) moved aside to %s (%s); they are no longer "
                "listed as snapshots and are safe to delete by hand",
                ", ".join(str(path) for path, _ in left), left[0][1],
            )
    return removed


def _prune_candidates(root: Path, keep_last: int, protected: set[int], among: set[int] | None,
                      run_id: str | None) -> list[SnapshotInfo]:
    """The snapshots `prune_snapshots` removes, ascending: of the listed snapshots (`list_snapshots`)
    in ``among`` and of run ``run_id`` (when given), all but the newest ``keep_last``, less the
    protected ones.

    The callback prunes at every snapshot step, and its root may hold hundreds of snapshots kept for
    events (and other runs'): reading every ``config.json`` each time made a run's snapshot steps
    quadratic. The step directories are found by name, newest first, and a ``config.json`` is read
    only where it decides something: until ``keep_last`` snapshots that count are found (a complete
    directory whose config is unreadable, or another run's, does not count, as the listing skips it),
    then for each older unprotected one (a protected one stays whatever it holds). Unreadable ones
    read are warned about as `list_snapshots` warns."""
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    dirs: list[tuple[int, str]] = []
    for entry in entries:
        match = STEP_DIR_RE.fullmatch(entry.name)
        if match is None:
            continue
        step = int(match.group(1))
        # a name that is not step's own (more digits) is skipped by the listing, whatever its config says
        if (among is not None and step not in among) or step > MAX_STEP or entry.name != snapshot_dirname(step):
            continue
        if entry.is_dir(follow_symlinks=False):
            dirs.append((step, entry.path))
    if not dirs:
        _warn_about_root(root)
    dirs.sort(reverse=True)
    kept = 0
    candidates: list[SnapshotInfo] = []
    for step, name in dirs:
        if kept >= keep_last and step in protected:
            continue  # older than the kept ones and never removed: its config decides nothing
        path = Path(name)
        try:
            if not _is_complete(path):
                continue
        except OSError as err:  # not this user's to read, so not this run's to remove: it does not count
            _warn_skipped(path, _unreadable(path, err))
            continue
        info = _snapshot_info(path, step)
        if isinstance(info, str):
            _warn_skipped(path, info)
            continue
        if run_id is not None and not is_runs_snapshot(info.metadata, run_id):
            continue
        if kept < keep_last:
            kept += 1
        else:
            candidates.append(info)
    return candidates[::-1]


# -- load ----------------------------------------------------------------------------------------
def read_snapshot_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of the complete snapshot ``path``, checked; `SnapshotError` for anything else."""
    path = Path(path)
    if not path.is_dir():
        gone = "" if path.exists() else " (it does not exist: a mistyped path, or one pruned since it was listed)"
        raise SnapshotError(f"{path}: not a snapshot directory{gone}")
    if not _is_complete(path):
        inside = [info.path.name for info in list_snapshots(path)]
        if inside or not (path / CONFIG_FILE).exists():  # e.g. the snapshot root itself
            hint = f" (it holds {len(inside)} snapshots: pass one, e.g. {path / inside[-1]})" if inside else ""
            raise SnapshotError(f"{path}: not a snapshot directory{hint}")
        raise SnapshotError(
            f"{path}: incomplete snapshot (no {COMPLETE_FILE} marker): its write was interrupted; refusing to load it"
        )
    config = _read_config(path)
    match = STEP_DIR_RE.fullmatch(path.name)
    if match is not None and config["step"] != int(match.group(1)):  # as the listing refuses it
        raise SnapshotError(_step_mismatch(path, config, int(match.group(1))))
    return config


def _step_mismatch(path: Path, config: Mapping[str, Any], step: int) -> str:
    """Why the snapshot in ``path``, named for ``step``, is not listed as that step's."""
    if config["step"] == step:  # a non-canonical name (more digits): not where the writer puts that step
        return f"{path.name} is not step {step}'s directory name, {snapshot_dirname(step)}"
    return f"{path / CONFIG_FILE} says step {config['step']!r}, in the directory of step {step}"


_SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
                       "F8_E5M2FNUZ": "float8_e5m2fnuz"}
"""safetensors' names of the floating-point dtypes (its header's ``dtype``), as `_dtype_name` writes them;
a name neither here nor in `_SAFETENSORS_OTHERS` (a newer format) leaves the header's dtype check out."""


def _check_dtypes(path: Path, config: Mapping[str, Any], floating: Iterable[str]) -> None:
    """The floating-point dtypes of the stored tensors against ``config.json``'s ``dtype`` (what
    `save_snapshot` wrote: the one dtype, ``"mixed"`` or ``"none"``): weights rewritten in another dtype
    (integers, booleans) would otherwise be cast into a model without a word."""
    names = sorted(set(floating))
    found = _dtype_summary(names)
    said = config.get("dtype")
    if isinstance(said, str) and said != found:
        raise SnapshotError(f"{path / CONFIG_FILE}: dtype {said!r}, but {WEIGHTS_FILE} holds "
                            f"{'floating-point tensors of ' + ', '.join(names) if names else 'no floating-point tensor'}")


def _check_aliases(path: Path, config: Mapping[str, Any], stored: Iterable[str]) -> None:
    stored = set(stored)
    for alias, target in config["aliases"].items():
        if alias in stored or target not in stored:
            raise SnapshotError(
                f"{path / CONFIG_FILE}: alias {alias!r} -> {target!r} does not match {WEIGHTS_FILE}"
            )


def read_snapshot_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Checks a snapshot without reading its tensors: ``(config.json as a dict, {name: meta tensor})``.

    The names, shapes and dtypes come from ``model.safetensors``'s header (aliases re-expanded), as
    tensors on the meta device (no data; a dtype this torch lacks reads as float32); reading it also
    checks that the file is as long as the header says, so a truncated file is found here.

    Raises:
        SnapshotError: as :func:`load_snapshot_weights` does, for everything but tensor data that
            is corrupt while the file keeps its length.
    """
    path = Path(path)
    config = read_snapshot_config(path)
    with _reading_weights(path / WEIGHTS_FILE) as file, safe_open(file, framework="pt") as weights:
        slices = {name: weights.get_slice(name) for name in weights.keys()}
        headers = {name: (tuple(part.get_shape()), part.get_dtype()) for name, part in slices.items()}
    tensors = {name: torch.empty(shape, dtype=_torch_dtype(dtype), device="meta") for name, (shape, dtype) in headers.items()}
    # as load_snapshot_weights checks them, unless a format this code does not know (read as float32) is there
    if all(d in _SAFETENSORS_FLOATS or d in _SAFETENSORS_OTHERS for _, d in headers.values()):
        _check_dtypes(path, config, (_dtype_name(t.dtype) for t in tensors.values() if t.is_floating_point()))
    return config, _with_aliases(path, config, tensors)


_SAFETENSORS_OTHERS = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                       "U32": "uint32", "I64": "int64", "U64": "uint64", "C64": "complex64"}
"""safetensors' names of the other dtypes it stores, as torch names them (complex is not floating point:
the writer and the loader leave it out of ``dtype``, as a rotary table of a half-precision model)."""


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors header's ``dtype`` name (float32 for one this torch lacks)."""
    found = getattr(torch, _SAFETENSORS_FLOATS.get(name) or _SAFETENSORS_OTHERS.get(name) or "", None)
    return found if isinstance(found, torch.dtype) else torch.float32


@contextlib.contextmanager
def _reading_weights(file: Path) -> Iterator[Path]:
    """Turns a failure to read ``file`` (a snapshot's weights) into a `SnapshotError` naming it; a file
    that is not a regular one (a FIFO would block the read) is refused unread."""
    try:
        if not stat.S_ISREG(file.stat().st_mode):
            raise SnapshotError(f"{file}: not a regular file")
        yield file
    except FileNotFoundError:
        raise SnapshotError(f"{file}: missing") from None
    except SnapshotError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SnapshotError(f"{file}: unreadable, truncated or corrupt ({err})") from err


def _with_aliases(path: Path, config: Mapping[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (by stored tensor name) with each alias of ``config`` added, after checking them."""
    _check_aliases(path, config, values)
    for alias, target in config["aliases"].items():
        values[alias] = values[target]
    return values


def load_snapshot_weights(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Reads a snapshot: ``(config.json as a dict, state dict with aliases re-expanded)``.

    The tensors are on the CPU; aliased names (tied weights) are the same tensor again.

    Raises:
        SnapshotError: naming the path or file, for a directory without ``COMPLETE``, a missing,
            truncated or corrupt ``config.json`` / ``model.safetensors``, or bad aliases.
    """
    path = Path(path)
    config = read_snapshot_config(path)
    with _reading_weights(path / WEIGHTS_FILE) as file:
        state_dict = load_file(file, device="cpu")
    _check_dtypes(path, config, (_dtype_name(t.dtype) for t in state_dict.values() if t.is_floating_point()))
    return config, _with_aliases(path, config, state_dict)


def snapshot_converter(path: str | os.PathLike[str], config: Mapping[str, Any]) -> Converter:
    """The registered converter the snapshot at ``path`` names (``config`` is its ``config.json``).

    Raises:
        SnapshotError: naming the snapshot, for a converter that is not registered (the message lists
            the registered ones and says how to register one's own).
    """
    try:
        return get_converter(config["converter"])  # a registry key, never a path or import
    except ValueError as err:
        raise UnknownConverterError(path, config["converter"]) from err


def load_snapshot(
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Loads a snapshot as a ``HookedTransformer`` (eval mode), through the converter registry.

    A snapshot that records how its ids map to text (``metadata.tokenizer``, written for a run on
    `nanogpt_model.TextDataModule` or a datamodule with a ``tokenizer_spec()``) loads with a tokenizer
    built from that record (`lens_callback.tokenizer.attach_tokenizer`: nothing is downloaded), so
    ``to_tokens(text)`` gives the run's ids, without a BOS token; any other loads without one.

    Args:
        path: A snapshot directory (``root/step-NNNNNNNN``).
        device: Device of the model; the CPU by default.
        dtype: Parameter dtype of the model.

    Raises:
        SnapshotError: for an incomplete or corrupt snapshot, or a converter that is not
            registered (the message lists the registered ones), or one that fails on the snapshot's
            weights or model_config. A tokenizer record that gives no tokenizer (a dict with a ``"kind"``
            that is not a record, such as a later version's kind, or one that does not fit the model) and
            another value there (a key of the user's own) load the weights without a tokenizer, with a
            warning.
    """
    check_device_and_dtype(device, dtype, "load_snapshot")
    config, state_dict = load_snapshot_weights(path)
    converter = snapshot_converter(path, config)
    try:
        hooked = build_hooked_transformer(
            converter, config["model_config"], state_dict, device=device or "cpu", dtype=dtype
        )
    except (ValueError, TypeError, OverflowError) as err:  # OverflowError: a size too large for a tensor
        raise SnapshotError(f"{path}: converter {converter.name!r} cannot build a model from this snapshot: {err}") from err
    spec = config["metadata"].get(TOKENIZER_KEY)
    if spec is not None and not _is_tokenizer_record(spec):
        what = type(spec).__name__ + (" without a 'kind'" if isinstance(spec, Mapping) else "")
        warnings.warn(f"{path}: {CONFIG_FILE} metadata.{TOKENIZER_KEY} holds {what}, not a tokenizer "
                      f"record (a {{'kind': ...}} dict; a key of your own, from save_snapshot(metadata=...)?): loaded "
                      f"without a tokenizer", UserWarning, stacklevel=2)
    elif spec is not None:
        try:
            attach_tokenizer(hooked, spec)
        except Exception as err:  # noqa: BLE001 - the record costs the tokenizer, never the weights
            # it raised a SnapshotError (a record of a later version's kind, a hand-edited one, one that does not fit
            # the model), or what the tokenizers library raised, and the weights could not be loaded at all
            hooked.tokenizer = None  # set_tokenizer may have failed half-way
            warnings.warn(f"{path}: {CONFIG_FILE} metadata.{TOKENIZER_KEY} gives no tokenizer for this model "
                          f"({type(err).__name__}: {err}): loaded without a tokenizer; pass token ids, or attach one "
                          f"with lens_callback.tokenizer.attach_tokenizer(model, record)", UserWarning, stacklevel=2)
    return hooked


# -- probe inputs --------------------------------------------------------------------------------
def _probe_input_files(inputs: ProbeInputs, settings: Mapping[str, Any]) -> tuple[bytes, bytes]:
    tensors = {
        name: getattr(inputs, name).detach().to("cpu", torch.int64).contiguous()
        for name in _PROBE_BATCHES
        if getattr(inputs, name) is not None
    }
    if not tensors:
        raise ValueError("inputs holds no probe batch (both repeated and text are None)")
    weights = save(tensors, metadata={"format": "pt"})
    config = {
        "format_version": FORMAT_VERSION,
        "batches": {name: list(t.shape) for name, t in tensors.items()},
        "sha256": hashlib.sha256(weights).hexdigest(),
        "settings": dict(settings),
    }
    return weights, snapshot_json(config, "settings")


def _read_if_exists(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def probe_inputs_sha256(inputs: ProbeInputs) -> str:
    """The SHA-256 of the ``probe_inputs.safetensors`` that `save_probe_inputs` writes for ``inputs``;
    each snapshot records it (``metadata.probe_inputs_sha256``) so re-probing finds its own inputs."""
    return hashlib.sha256(_probe_input_files(inputs, {})[0]).hexdigest()


_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _archived_probe_inputs(root: Path, sha256: str) -> tuple[Path, Path]:
    stem = f"{PROBE_INPUTS_WEIGHTS.split('.')[0]}-{sha256[:16]}"
    return root / f"{stem}.safetensors", root / f"{stem}.json"


def save_probe_inputs(
    root: str | os.PathLike[str], inputs: ProbeInputs, settings: Mapping[str, Any]
) -> Path:
    """Writes a run's fixed probe batches once per snapshot root (atomically).

    Files: ``probe_inputs.safetensors`` (int64 ``repeated`` / ``text``) and ``probe_inputs.json``
    (``settings`` plus the SHA-256 of the tensors file, which ties the two files together). Identical
    existing files are left untouched; different ones (another run's, in the same root) are first
    kept as ``probe_inputs-<first 16 hex digits of their SHA-256>.safetensors/.json``, so that
    snapshots written with them still re-probe on their own inputs, then replaced, each atomically.

    Returns:
        The path of ``probe_inputs.safetensors``.

    Raises:
        ValueError: if ``inputs`` is empty or ``settings`` is not plain JSON (before any write).
        OSError: if writing fails.
    """
    root = Path(root)
    weights, config = _probe_input_files(inputs, settings)
    root.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = root / PROBE_INPUTS_WEIGHTS, root / PROBE_INPUTS_CONFIG
    old_weights = _read_if_exists(weights_path)
    if old_weights is not None and old_weights != weights:
        try:
            old_digest = _load_probe_input_pair(weights_path, config_path)[2]  # only an intact pair is kept
        except (OSError, SnapshotError):
            pass
        else:
            archived = _archived_probe_inputs(root, old_digest)
            if not archived[0].exists():
                atomic_write(archived[1], config_path.read_bytes(), durable=True, prefix=TMP_PREFIX)
                atomic_write(archived[0], old_weights, durable=True, prefix=TMP_PREFIX)
    if old_weights != weights:
        atomic_write(weights_path, weights, durable=True, prefix=TMP_PREFIX)
    if _read_if_exists(config_path) != config:
        atomic_write(config_path, config, durable=True, prefix=TMP_PREFIX)
    return weights_path


def load_probe_inputs(
    root: str | os.PathLike[str], sha256: str | None = None
) -> tuple[ProbeInputs, dict[str, Any]]:
    """Reads the probe batches written by :func:`save_probe_inputs`: ``(ProbeInputs, settings)``.

    Args:
        root: The snapshot root.
        sha256: The inputs a snapshot was probed on (its ``metadata.probe_inputs_sha256``): the
            root's current ones if they match, else those kept when another run replaced them.

    Raises:
        FileNotFoundError: if ``root`` holds no probe inputs.
        SnapshotError: naming the file, if either file is corrupt or they do not belong together,
            or if the inputs of ``sha256`` are not in ``root``.
    """
    root = Path(root)
    current = root / PROBE_INPUTS_WEIGHTS, root / PROBE_INPUTS_CONFIG
    if sha256 is None:
        return _load_probe_input_pair(*current)[:2]
    if not (isinstance(sha256, str) and _SHA256_RE.fullmatch(sha256)):  # it becomes part of a file name
        raise SnapshotError(f"probe inputs' sha256 {sha256!r} is not a SHA-256 digest (64 lowercase hex digits)")
    weights_path, config_path = _archived_probe_inputs(root, sha256)
    if not (weights_path.is_file() and config_path.is_file()):  # not replaced: the root's own pair
        inputs, settings, digest = _load_probe_input_pair(*current)
        if digest == sha256:
            return inputs, settings
        raise SnapshotError(
            f"{root}: the snapshot was probed on other inputs (sha256 {sha256[:16]}...) than the ones this "
            f"directory holds ({digest[:16]}...): another run wrote its probe inputs here; re-probing it "
            f"would not reproduce its logged values (pass inputs= to probe other batches)")
    inputs, settings, digest = _load_probe_input_pair(weights_path, config_path)
    if digest != sha256:
        raise SnapshotError(f"{weights_path}: holds inputs {digest[:16]}..., not {sha256[:16]}...")
    return inputs, settings


def _load_probe_input_pair(weights_path: Path, config_path: Path) -> tuple[ProbeInputs, dict[str, Any], str]:
    for file in (weights_path, config_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no probe inputs (LensCallback writes them at its first snapshot)")
    try:
        config = _read_json(config_path)
    except FileNotFoundError as err:  # removed since the check above
        raise SnapshotError(f"{config_path}: unreadable or corrupt ({err})") from err
    if not isinstance(config, dict) or not isinstance(config.get("settings"), dict):
        raise SnapshotError(f"{config_path}: expected an object with a 'settings' object")
    _check_format_version(config_path, config.get("format_version"))
    data = weights_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != config.get("sha256"):
        raise SnapshotError(f"{weights_path}: does not match the checksum in {config_path} (truncated or mixed up)")
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise SnapshotError(f"{weights_path}: corrupt ({err})") from err
    unknown = sorted(set(tensors) - set(_PROBE_BATCHES))
    if unknown:
        raise SnapshotError(f"{weights_path}: unexpected tensors {unknown} (expected {list(_PROBE_BATCHES)})")
    try:
        inputs = ProbeInputs(repeated=tensors.get("repeated"), text=tensors.get("text"))
    except ValueError as err:
        raise SnapshotError(f"{weights_path}: {err}") from err
    return inputs, config["settings"], digest

