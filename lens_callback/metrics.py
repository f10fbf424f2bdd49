"""Read the scalars of a TensorBoard log directory into one tidy DataFrame.

This is the post-hoc entry point of the package: ``read_metrics`` → ``events.detect_events`` →
``report.make_report``. It reads TensorBoard event files directly with TensorBoard's own record
reader (``PyRecordReader_New`` of its TensorFlow stub, which ``event_file_loader`` uses:
CRC-checked) instead of ``EventAccumulator``, for three reasons:

* nothing is sampled away: ``EventAccumulator`` keeps only 10_000 scalars per tag unless told
  otherwise (its reservoir, ``DEFAULT_SIZE_GUIDANCE``), here every point is kept;
* the de-duplication rule for re-logged steps is ours and explicit (latest ``wall_time`` wins),
  where ``EventAccumulator`` keeps every point of the files ``SummaryWriter`` writes (file version
  2: it purges only at a ``SessionLog.START``, which torch never writes; it purged "orphaned" points
  whenever a step went backwards in files without a version);
* it is about 25% faster (measured on 23_400 scalars in one 1.1 MB file: 0.21 s vs 0.28 s), and
  reading per file lets us say which run directory each point came from.

Scalars written by ``torch.utils.tensorboard.SummaryWriter`` / Lightning's ``TensorBoardLogger``
(``simple_value``) and scalars written in the TF2 tensor form (``tensorboard.summary.v2``,
``plugin_name == "scalars"``) are both read; images, text, histograms, etc. are ignored.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pandas as pd
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors as tb_errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
from tensorboard.util import tensor_util

__all__ = ["METRIC_COLUMNS", "RUN_ID_TAG", "find_event_files", "read_metrics"]

log = logging.getLogger(__name__)

METRIC_COLUMNS: tuple[str, ...] = ("step", "tag", "value", "wall_time", "run")
"""Columns of the DataFrame returned by :func:`read_metrics`, in order."""

_SCALARS_PLUGIN = "scalars"
_GLOB_CHARS = frozenset("*?[")


def find_event_files(logdir: str | os.PathLike[str]) -> list[Path]:
    """List the TensorBoard event files under ``logdir``, recursively, sorted by path.

    A file is an event file when its name contains ``"tfevents"`` (TensorBoard's own test,
    ``io_wrapper.IsTensorFlowEventsFile``). Sorting by path keeps one directory's files in the
    order they were written, since their names start with ``events.out.tfevents.<unix time>``.

    Args:
        logdir: A directory (searched recursively) or a single event file.

    Returns:
        The event files, sorted by path. Empty if there are none.

    Raises:
        FileNotFoundError: If ``logdir`` does not exist.
        PermissionError: If ``logdir`` is a directory that cannot be listed (not one without event files).
        ValueError: If ``logdir`` is ``""`` (an unset variable), which ``Path`` reads as the current directory.

    Warns:
        UserWarning: naming the directories below ``logdir`` that cannot be listed (another user's run in a
            shared log directory): their event files, if any, are not read.
    """
    if not os.fspath(logdir):  # lens-report and compare_runs refused it; read_metrics read the current directory
        raise ValueError('the log directory is empty ("" would read the current directory): pass "." for that')
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"log directory not found: {str(root)!r}")
    if root.is_file():
        return [root] if "tfevents" in root.name else []
    errors: list[OSError] = []
    found: list[Path] = []
    # os.walk, not rglob: both descend no directory symlink, but rglob passes over a directory it may not list
    for parent, _, names in os.walk(root, onerror=errors.append):
        found.extend(Path(parent) / name for name in names if "tfevents" in name)
    if errors and errors[0].filename is not None and Path(errors[0].filename) == root:
        err = errors[0]
        raise type(err)(err.errno, f"cannot list the log directory {str(root)!r}: {err.strerror}") from err
    # a directory gone since its parent was listed (a live run's snapshot being written or pruned) held nothing
    unreadable = [err for err in errors if not isinstance(err, (FileNotFoundError, NotADirectoryError))]
    if unreadable:
        shown = "; ".join(f"{err.filename!r} ({err.strerror})" for err in unreadable[:5])
        more = f"; ... ({len(unreadable) - 5} more)" if len(unreadable) > 5 else ""
        warnings.warn(f"{len(unreadable)} director{'y' if len(unreadable) == 1 else 'ies'} under {str(root)!r} cannot "
                      f"be listed; event files in them, if any, are not read: {shown}{more}", UserWarning, stacklevel=2)
    return sorted(p for p in found if p.is_file())


def _compile_filter(tags: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Validate the ``tags`` argument of :func:`read_metrics` into a tuple of patterns."""
    if tags is None:
        return None
    try:
        items = iter((tags,) if isinstance(tags, str) else tags)
    except TypeError:  # tags=5: tuple()'s "'int' object is not iterable" named no argument
        raise ValueError(f"tags must be a tag or pattern, or a list of them, got {tags!r}") from None
    patterns = tuple(items)
    if not patterns:
        raise ValueError(f"tags must name at least one tag or pattern, got {tags!r}")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"tags must be non-empty strings, got {pattern!r} in {tags!r}")
    return patterns


def _tag_matches(tag: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``tag`` equals one of ``patterns`` or matches one used as a glob."""
    for pattern in patterns:
        if tag == pattern:
            return True
        if _GLOB_CHARS.intersection(pattern) and fnmatch.fnmatchcase(tag, pattern):
            return True
    return False


LOGGER_JOIN_CHAR = "-"
"""Lightning's ``TensorBoardLogger`` writes a tag as ``f"{prefix}-{tag}"`` when given a ``prefix``."""

RUN_ID_TAG = "lens/run_id"
"""The text tag under which `LensCallback` writes its ``run_id`` into each TensorBoard log with the first
probe step of every fit (``SummaryWriter.add_text`` stores it as ``lens/run_id/text_summary``): the points
after it in that event file are that run's (`read_all_points` with ``run_ids=True``)."""
_RUN_ID_SUMMARY = f"{RUN_ID_TAG}/text_summary"


def read_metrics(
    logdir: str | os.PathLike[str],
    tags: str | Sequence[str] | None = None,
    *,
    prefix: str = "",
) -> pd.DataFrame:
    """Read every scalar under a TensorBoard log directory into a long-format DataFrame.

    Every event file below ``logdir`` is read (recursively: a Lightning log directory is
    ``root/name/version_k/events.out.tfevents.*``, and a resumed run may write several files into
    one directory). Nothing is downsampled.

    De-duplication: when the same ``(tag, step)`` occurs more than once, in one file or across
    files (a run that crashed and resumed from an earlier checkpoint re-logs the steps after that
    checkpoint), only the point with the latest ``wall_time`` is kept; on equal ``wall_time`` the
    one read last (later file by path, later in its file) wins. Points are merged across *all*
    files found, so point ``logdir`` at one run (for example ``root/name`` of a run whose resume
    went to a new ``version_k``), not at a directory holding several unrelated runs. Points that a
    crashed run logged past its last checkpoint and that the resumed run never re-logged are kept.

    Args:
        logdir: A log directory (searched recursively) or a single event file.
        tags: Which tags to keep; ``None`` keeps all. A string or a sequence of strings, each an
            exact tag or a case-sensitive ``fnmatch`` glob (used as a glob only if it contains
            ``*``, ``?`` or ``[``). ``*`` also matches ``/``, so ``"lens/induction/*"`` selects
            every tag under ``lens/induction/``. A tag is kept if any pattern matches it.
        prefix: A logger ``prefix`` the run was logged with (``TensorBoardLogger(prefix=...)``):
            only tags written under it are read, and they come back without it (``"pre-lens/x"``
            is ``"lens/x"``), so that ``tags``, `detect_events` and the report see the usual names.

    Returns:
        A DataFrame with the columns ``step`` (int64), ``tag`` (str), ``value`` (float64),
        ``wall_time`` (float64, seconds since the epoch) and ``run`` (str: the event file's
        directory relative to ``logdir``, ``"."`` for ``logdir`` itself), sorted by ``tag`` then
        ``step``, with a fresh ``RangeIndex``. Values are as stored by TensorBoard, i.e. float32
        precision for ``simple_value`` scalars. Empty (with those columns) if the files hold no
        matching scalar.

    Raises:
        FileNotFoundError: If ``logdir`` does not exist or holds no event file.
        ValueError: If ``logdir`` is ``""`` (not read as the current directory), or ``tags`` is empty,
            neither a string nor a sequence, or contains an empty or non-string pattern.

    Warns:
        UserWarning: if the points carry more than one `LensCallback` run id (`RUN_ID_TAG`): several
            runs' values were merged into one series, the latest point per step kept (two fits
            logged under one ``name`` land in ``version_0``, ``version_1`` of one directory).
            ``lens-report`` refuses such a directory.

    Example:
        >>> df = read_metrics("lightning_logs/gpt/version_0", tags=["lens/induction/max", "val/loss"])
        >>> df.pivot(index="step", columns="tag", values="value")  # doctest: +SKIP
    """
    points = read_all_points(logdir, tags, prefix=prefix, run_ids=True)
    ids = sorted(set(points["run_id"]) - {""}) if not points.empty else []
    if len(ids) > 1:
        where = {run_id: sorted(set(points.loc[points["run_id"] == run_id, "run"])) for run_id in ids}
        dirs = [d for found in where.values() for d in found]
        advice = ("read one run's directory (e.g. its version_k)" if len(dirs) == len(set(dirs)) else
                  "some share a directory (one logger version for several fits): give each run a directory of its own")
        warnings.warn(f"read_metrics: {logdir} holds the points of {len(ids)} LensCallback runs "
                      f"({listed_runs(where, ids)}); their values are merged into one series per tag, the "
                      f"latest point per step kept: {advice}", stacklevel=2)
    return latest_per_step(points.drop(columns=["run_id", "file"]))


def listed_runs(where: Mapping[str, Sequence[str]], run_ids: Sequence[str], limit: int = 5) -> str:
    """``run_ids`` (the first ``limit``) in words, each with the directories ``where`` holds its points in:
    ``"aaaaaaaa in 'version_0'; bbbbbbbb in 'version_1'"``."""
    shown = "; ".join(f"{run_id[:8]} in {', '.join(map(repr, where[run_id]))}" for run_id in run_ids[:limit])
    return shown + (f", ... ({len(run_ids) - limit} more)" if len(run_ids) > limit else "")


def latest_per_step(frame: pd.DataFrame) -> pd.DataFrame:
    """`read_metrics`'s de-duplication of `read_all_points`'s frame: one row per ``(tag, step)``, the
    latest by ``wall_time`` (the one read last on a tie), sorted by ``tag`` then ``step``."""
    if frame.empty:
        return frame
    # Stable sort keeps read order among equal wall times, so keep="last" means "read last".
    frame = frame.sort_values(["tag", "step", "wall_time"], kind="stable")
    frame = frame.drop_duplicates(subset=["tag", "step"], keep="last")
    return frame.reset_index(drop=True)


def _events(path: Path) -> Iterator[event_pb2.Event]:
    """The events of one file, in order. A truncated last record (a writer killed mid-write, or one
    still writing) ends the file quietly, as in TensorBoard; a record that fails its CRC check (a
    damaged file) ends it with a warning naming the file and how much of it was read, where
    TensorBoard's loader stops without a word."""
    reader = PyRecordReader_New(str(path))
    count = 0
    try:
        while True:
            try:
                reader.GetNext()
            except tb_errors.OutOfRangeError:
                return
            except tb_errors.DataLossError as err:
                if "truncated record" not in str(err):
                    warnings.warn(f"{path} is damaged after its first {count} events ({err}): the rest of the "
                                  f"file is not read", UserWarning, stacklevel=3)
                return
            count += 1
            yield event_pb2.Event.FromString(reader.record())
    finally:
        reader.file_handle.close()


def read_all_points(
    logdir: str | os.PathLike[str],
    tags: str | Sequence[str] | None = None,
    *,
    prefix: str = "",
    run_ids: bool = False,
) -> pd.DataFrame:
    """`read_metrics` without the de-duplication: every point of every event file, in read order
    (files by path, each in its order). Same arguments, columns and errors.

    With ``run_ids=True`` the frame has two more columns: ``run_id`` (str), the `LensCallback` run id
    last written before the point in its event file (`RUN_ID_TAG`, under ``prefix``), ``""`` where
    none was (a log without the callback, or written before run ids were logged); and ``file`` (str),
    that event file's path relative to ``logdir``."""
    patterns = _compile_filter(tags)
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a string, got {prefix!r}")
    join = f"{prefix}{LOGGER_JOIN_CHAR}" if prefix else ""
    files = find_event_files(logdir)
    if not files:
        raise FileNotFoundError(f"no TensorBoard event file under {str(logdir)!r}")
    root = Path(logdir)
    base = root.parent if root.is_file() else root

    steps: list[int] = []
    tag_col: list[str] = []
    values: list[float] = []
    wall_times: list[float] = []
    runs: list[str] = []
    ids: list[str] = []
    file_col: list[str] = []
    keep_cache: dict[str, bool] = {}

    for path in files:
        run = path.parent.relative_to(base).as_posix()
        name = path.relative_to(base).as_posix()
        run_id = ""  # the LensCallback run whose marker came last in this file
        scalar_tensor_tags: set[str] = set()  # TF2-style scalars: metadata only on first write
        for event in _events(path):
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                tag = value.tag
                if join:
                    if not tag.startswith(join):
                        continue
                    tag = tag[len(join):]
                kind = value.WhichOneof("value")
                if tag == _RUN_ID_SUMMARY and kind == "tensor" and value.tensor.string_val:
                    run_id = value.tensor.string_val[0].decode("utf-8", "replace").strip()
                    continue
                if kind == "simple_value":
                    number = float(value.simple_value)
                elif kind == "tensor":
                    if value.metadata.plugin_data.plugin_name == _SCALARS_PLUGIN:
                        scalar_tensor_tags.add(tag)
                    if tag not in scalar_tensor_tags:
                        continue
                    array = tensor_util.make_ndarray(value.tensor)
                    if array.size != 1:
                        continue
                    number = float(array.reshape(()))
                else:
                    continue
                keep = keep_cache.get(tag)
                if keep is None:
                    keep = patterns is None or _tag_matches(tag, patterns)
                    keep_cache[tag] = keep
                if not keep:
                    continue
                steps.append(int(event.step))
                tag_col.append(tag)
                values.append(number)
                wall_times.append(float(event.wall_time))
                runs.append(run)
                ids.append(run_id)
                file_col.append(name)
        log.debug("read %s", path)

    frame = pd.DataFrame(
        {
            "step": pd.Series(steps, dtype="int64"),
            "tag": pd.Series(tag_col, dtype=str),
            "value": pd.Series(values, dtype="float64"),
            "wall_time": pd.Series(wall_times, dtype="float64"),
            "run": pd.Series(runs, dtype=str),
        }
    )
    if run_ids:
        frame["run_id"] = pd.Series(ids, dtype=str)
        frame["file"] = pd.Series(file_col, dtype=str)
    return frame

