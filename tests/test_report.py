"""Tests for ``read_metrics``, event detection and ``make_report`` on real TensorBoard event files.

The event files are written with ``torch.utils.tensorboard.SummaryWriter`` (what Lightning's
``TensorBoardLogger`` uses) in the tag scheme the callback writes, and read back through our own
reader; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from tensorboard.summary import Writer
from torch.utils.tensorboard import SummaryWriter

from lens_callback.events import (
    Event,
    EventDetector,
    SteepestRiseRule,
    ThresholdRule,
    default_rules,
    detect_events,
    rule_from_dict,
)
from lens_callback.metrics import read_metrics
from lens_callback.report import _load, _render, compare_runs, main, make_report
from conftest import readme_commands

N_LAYERS, N_HEADS = 2, 4
PROBE_EVERY = 10
PROBE_STEPS = list(range(0, 201, PROBE_EVERY))  # 0, 10, ..., 200
CENTRE = 105  # the sigmoid is steepest here: the probe interval [100, 110], midpoint 105
BEST_HEAD = (1, 2)
T0 = 1_700_000_000.0  # wall-time origin of the synthetic run
CRASH_STEP, RESUME_STEP = 160, 130  # first run logged up to 160, the resumed one re-logs from 130
BIG_N = 12_000  # > TensorBoard's default reservoir of 10_000 scalars per tag


def induction_curve(step: int) -> float:
    """Max induction score: a sigmoid rising from ~0.02 to ~0.92 around ``CENTRE``.

    At step 90 it is 0.14, at step 100 0.33: the 0.3 threshold is crossed clearly at 100.
    """
    return 0.02 + 0.9 / (1.0 + math.exp(-(step - CENTRE) / 8.0))


def head_factor(layer: int, head: int) -> float:
    """Per-head scale so that ``BEST_HEAD`` holds the max."""
    return 1.0 if (layer, head) == BEST_HEAD else 0.2 + 0.1 * (layer * N_HEADS + head) / 8


def probe_scalars(step: int) -> dict[str, float]:
    """Every lens scalar the callback would log at one probe step."""
    ind = induction_curve(step)
    values: dict[str, float] = {}
    heads = {(l, h): ind * head_factor(l, h) for l in range(N_LAYERS) for h in range(N_HEADS)}
    for (l, h), v in heads.items():
        values[f"lens/induction/L{l}H{h}"] = v
        values[f"lens/prev_token/L{l}H{h}"] = 0.7 if (l, h) == (0, 1) else 0.1
        values[f"lens/attn_entropy/L{l}H{h}"] = 2.0 - 0.1 * h - ind * l
    values["lens/induction/max"] = max(heads.values())
    values["lens/induction/mean"] = sum(heads.values()) / len(heads)
    values["lens/prev_token/max"] = 0.7 * min(1.0, step / 50 + 0.2)
    values["lens/prev_token/mean"] = 0.2
    values["lens/attn_entropy/mean"] = 1.8 - 0.5 * ind
    for l in range(N_LAYERS + 1):
        values[f"lens/logit_lens/L{l}/loss"] = 6.0 - l - 2.0 * ind
        values[f"lens/logit_lens/L{l}/kl"] = 3.0 - l
        values[f"lens/logit_lens/L{l}/top1"] = 0.1 * l
    values["lens/icl_score"] = -1.5 * ind
    values["lens/repeated_loss"] = 5.0 - 5.0 * ind
    values["lens/repeated_loss/first_half"] = 5.0
    values["lens/errors"] = 0.0
    return values


def write_run(writer: SummaryWriter, steps: range, probe_value_shift: float, t0: float) -> None:
    """Log training metrics every step and probes every ``PROBE_EVERY`` steps in ``steps``."""
    for step in steps:
        wall = t0 + step
        writer.add_scalar("train/loss", 5.0 - 3.0 * step / 200 + probe_value_shift, step, wall)
        writer.add_scalar("lr", 1e-3, step, wall)
        if step % 50 == 0:
            writer.add_scalar("val/loss", 5.2 - 3.0 * step / 200 + probe_value_shift, step, wall)
        if step % PROBE_EVERY == 0:
            for tag, value in probe_scalars(step).items():
                writer.add_scalar(tag, value + probe_value_shift, step, wall)
            image = np.random.default_rng(step).random((3, N_LAYERS * N_HEADS, 16))
            writer.add_image("lens/induction/heatmap", image, step, wall)
    writer.add_text("lens/events", "induction_formed at step 110", 110, t0 + 110)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning-like log dir ``root/gpt/version_0`` holding a crashed and a resumed run.

    The resumed run's file is created first (so it sorts first and is read first), but its wall
    times are later: de-duplication must go by wall time, not by read order. The crashed run
    logged steps 0..160 with values shifted by +10 from step 130 on (stale data the resume
    replaces); the resumed run logs 130..200 correctly.
    """
    root = tmp_path_factory.mktemp("logs")
    version = root / "gpt" / "version_0"
    resumed = SummaryWriter(str(version))
    crashed = SummaryWriter(str(version))
    write_run(crashed, range(0, RESUME_STEP), 0.0, T0)
    write_run(crashed, range(RESUME_STEP, CRASH_STEP + 1), 10.0, T0)  # stale: re-logged later
    write_run(resumed, range(RESUME_STEP, 201), 0.0, T0 + 10_000.0)
    crashed.close()
    resumed.close()
    return root


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with ``BIG_N`` points for ``train/loss`` and a log-spaced probe schedule."""
    root = tmp_path_factory.mktemp("big")
    writer = SummaryWriter(str(root))
    for step in range(BIG_N):
        writer.add_scalar("train/loss", 4.0 / math.sqrt(step + 1), step, T0 + step)
    for step in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192):
        writer.add_scalar("lens/induction/max", min(0.9, step / 4096), step, T0 + step)
    writer.close()
    return root


@pytest.fixture(scope="module")
def metrics(run_dir: Path) -> pd.DataFrame:
    return read_metrics(run_dir)


def expected_series(tag: str) -> pd.Series:
    """The value of ``tag`` per probe step as written (float32, as TensorBoard stores it)."""
    return pd.Series(
        {s: float(np.float32(probe_scalars(s)[tag])) for s in PROBE_STEPS}, name=tag
    )


def consecutive_rules() -> list:
    """The default rules with the steepest rise measured between consecutive probe steps.

    The synthetic run is 200 steps long, shorter than the default rule's 500-step window.
    """
    return [dataclasses.replace(r, window=0) if isinstance(r, SteepestRiseRule) else r for r in default_rules()]


def live_detector_pass(
    steps: list[int], detector: EventDetector | None = None
) -> Iterator[tuple[int, EventDetector]]:
    detector = detector or EventDetector(consecutive_rules())
    for step in steps:
        detector.update(step, probe_scalars(step))
        yield step, detector


# --------------------------------------------------------------------------- read_metrics


def test_read_metrics_columns_order_and_dtypes(metrics: pd.DataFrame) -> None:
    assert list(metrics.columns)[:4] == ["step", "tag", "value", "wall_time"]
    assert metrics["step"].dtype == np.int64
    assert metrics["value"].dtype == np.float64
    assert metrics["wall_time"].dtype == np.float64
    assert metrics["tag"].map(type).eq(str).all()
    ordered = metrics.sort_values(["tag", "step"], kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(metrics, ordered)
    assert not metrics.duplicated(["tag", "step"]).any()
    assert set(metrics["run"]) == {"gpt/version_0"}


def test_read_metrics_reads_recursively_and_ignores_images_and_text(
    metrics: pd.DataFrame,
) -> None:
    tags = set(metrics["tag"])
    assert {"train/loss", "val/loss", "lr", "lens/induction/max", "lens/induction/L1H2"} <= tags
    assert {f"lens/logit_lens/L{l}/loss" for l in range(N_LAYERS + 1)} <= tags
    assert "lens/induction/heatmap" not in tags
    assert "lens/events" not in tags
    assert (metrics["tag"] == "train/loss").sum() == 201


def test_read_metrics_keeps_latest_wall_time_for_relogged_steps(metrics: pd.DataFrame, tmp_path: Path) -> None:
    """The latest wall time wins, whatever the read order; on equal wall times the point read last does
    (later in its file, then the later file by path), as read_metrics' docstring promises."""
    got = metrics[metrics["tag"] == "lens/induction/max"].set_index("step")
    assert list(got.index) == PROBE_STEPS
    np.testing.assert_allclose(got["value"], expected_series("lens/induction/max"), rtol=1e-6)
    relogged = got.loc[RESUME_STEP:CRASH_STEP, "wall_time"]
    assert (relogged >= T0 + 10_000).all()  # from the resumed file, although it was read first
    assert (got.loc[: RESUME_STEP - 1, "wall_time"] < T0 + 10_000).all()
    loss = metrics[metrics["tag"] == "train/loss"].set_index("step")["value"]
    assert loss.max() < 6.0  # none of the stale (+10) values survived

    # equal wall times: step 0 twice in the first file, step 1 once in each file
    tie = tmp_path / "tie"
    for i, points in enumerate((((0, 1.0), (0, 2.0), (1, 3.0)), ((1, 4.0),))):
        writer = SummaryWriter(str(tmp_path / f"w{i}"))
        for step, value in points:
            writer.add_scalar("x", value, step, T0)
        writer.close()
        (written,) = (tmp_path / f"w{i}").iterdir()
        tie.mkdir(exist_ok=True)
        written.rename(tie / f"events.out.tfevents.{i}")  # file 1 sorts, so is read, after file 0
    assert read_metrics(tie)[["step", "value"]].values.tolist() == [[0, 2.0], [1, 4.0]]


def test_read_metrics_returns_every_point_without_downsampling(big_run: Path) -> None:
    df = read_metrics(big_run, tags="train/loss")
    assert len(df) == BIG_N
    assert df["step"].tolist() == list(range(BIG_N))
    np.testing.assert_allclose(df["value"].iloc[-1], 4.0 / math.sqrt(BIG_N), rtol=1e-6)


def test_read_metrics_tag_filter_exact_and_glob(run_dir: Path) -> None:
    exact = read_metrics(run_dir, tags="lens/repeated_loss")
    assert set(exact["tag"]) == {"lens/repeated_loss"}  # an exact tag is not a prefix
    globbed = read_metrics(run_dir, tags=["lens/induction/L*", "val/loss"])
    heads = {f"lens/induction/L{l}H{h}" for l in range(N_LAYERS) for h in range(N_HEADS)}
    assert set(globbed["tag"]) == heads | {"val/loss"}
    assert read_metrics(run_dir, tags="no/such/tag").empty
    assert list(read_metrics(run_dir, tags="no/such/tag").columns)[:4] == [
        "step",
        "tag",
        "value",
        "wall_time",
    ]


def test_read_metrics_tensor_scalars_single_file_and_truncated_tail(tmp_path: Path) -> None:
    writer = Writer(str(tmp_path / "v2"))  # TF2-style scalars: a tensor, plugin "scalars"
    for step in range(5):
        writer.add_scalar("lens/icl_score", -0.5 * step, step=step)
    writer.close()
    df = read_metrics(tmp_path / "v2")
    assert df["value"].tolist() == [-0.5 * s for s in range(5)]

    torn = tmp_path / "torn"
    writer_v1 = SummaryWriter(str(torn))
    for step in range(5):
        writer_v1.add_scalar("train/loss", float(step), step)
    writer_v1.close()
    (event_file,) = torn.iterdir()
    event_file.write_bytes(event_file.read_bytes()[:-7])  # a crash in the middle of a record
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a torn tail is no damage: not a word (unlike a failed CRC check)
        df = read_metrics(event_file)  # a single file works too
    assert df["step"].tolist() == [0, 1, 2, 3] and set(df["run"]) == {"."}


def test_a_damaged_event_file_is_read_up_to_the_damage_with_a_warning(tmp_path: Path) -> None:
    """TensorBoard's loader stops at a record failing its CRC check without a word, as at a torn tail:
    read_metrics says so, naming the file; a torn tail (a crash, a writer still writing) stays quiet."""
    writer = SummaryWriter(str(tmp_path))
    for step in range(40):
        writer.add_scalar("train/loss", float(step), step)
    writer.close()
    (event_file,) = tmp_path.iterdir()
    data = bytearray(event_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte mid-file
    event_file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=rf"{event_file.name} is damaged after its first \d+ events.*crc32"):
        df = read_metrics(tmp_path)
    assert 5 < len(df) < 40 and df["step"].tolist() == list(range(len(df)))


def test_a_report_of_a_run_with_no_scalars_yet_is_an_error_not_a_blank_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    writer = SummaryWriter(str(tmp_path / "run"))  # the file exists, its scalars are not flushed yet
    writer.add_text("note", "started", 0)
    writer.close()
    with pytest.raises(ValueError, match="holds no training or lens scalars yet"):
        make_report(tmp_path / "run", tmp_path / "report.png")
    capsys.readouterr()
    assert main([str(tmp_path / "run"), "-o", str(tmp_path / "report.png")]) == 2
    assert not (tmp_path / "report.png").exists()
    out, err = capsys.readouterr()
    assert out == "" and "holds no training or lens scalars yet" in err  # no line on which events, then an error (s34)
    # a lens-train fit that failed in its set-up leaves such a directory (config.yaml, an events file): said too
    assert "one that failed before its first logged step, e.g. in its set-up, wrote none" in err


def test_read_metrics_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        read_metrics(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        read_metrics(tmp_path / "empty")
    with pytest.raises(ValueError, match="tags"):
        read_metrics(tmp_path, tags=[])
    with pytest.raises(ValueError, match=r"tags must be a tag or pattern, or a list of them, got 5"):
        read_metrics(tmp_path, tags=5)  # type: ignore[arg-type]  # tuple(5)'s TypeError named nothing (metrics review)


def test_a_log_directory_that_cannot_be_listed_is_named_not_read_as_empty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``rglob`` passes over a directory it may not list without a word: another user's private run
    (umask 077) read as "no TensorBoard event file", and one such version among readable ones was left
    out of the frame unsaid (metrics review). A directory gone since its parent was listed (a live
    run's snapshot being pruned) held nothing, and stays quiet."""
    import errno
    import os

    for version, value in (("version_0", 1.0), ("version_1", 2.0), ("version_2", 3.0)):
        writer = SummaryWriter(str(tmp_path / version))
        writer.add_scalar("train/loss", value, 5)
        writer.close()
    listed = os.scandir

    def scandir(path: Any = ".") -> Any:  # this runs as root in CI, where chmod does not bite
        name = Path(path).name
        if name == "version_1":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        if name == "version_2":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return listed(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match=r"cannot list the log directory '.*version_1': Permission denied"):
        read_metrics(tmp_path / "version_1")
    with pytest.warns(UserWarning, match=r"1 directory under .* cannot be listed.*'.*version_1' \(Permission denied\)"):
        df = read_metrics(tmp_path)
    assert df[["run", "value"]].values.tolist() == [["version_0", 1.0]]  # "1 directory": version_2 vanished unsaid


# --------------------------------------------------------------------------- events


def first_step_reaching(threshold: float, tag: str = "lens/induction/max") -> int:
    return min(s for s in PROBE_STEPS if probe_scalars(s)[tag] >= threshold)


def test_detector_threshold_and_steepest_rise_live() -> None:
    *_, (_, detector) = live_detector_pass(PROBE_STEPS)
    by_name = {e.name: e for e in detector.events}
    assert set(by_name) == {"induction_formed", "induction_steepest_rise", "prev_token_formed"}
    formed = by_name["induction_formed"]
    assert formed.step == first_step_reaching(0.3) == 100  # sanity: not a boundary case
    assert formed.kind == "threshold" and formed.value >= 0.3
    rise = by_name["induction_steepest_rise"]
    assert rise.step == CENTRE and rise.kind == "steepest_rise"
    assert "step 100" in rise.detail and "step 110" in rise.detail
    expected_slope = (induction_curve(110) - induction_curve(100)) / 10
    assert rise.value == pytest.approx(expected_slope)
    assert by_name["prev_token_formed"].step == first_step_reaching(0.5, "lens/prev_token/max")
    # The steepest-rise event was superseded on the way up; history keeps each firing once.
    history = [e for e in detector.history if e.name == "induction_steepest_rise"]
    assert len(history) > 1 and history[-1] == rise
    assert [e.step for e in history] == sorted(e.step for e in history)
    assert sum(e.name == "induction_formed" for e in detector.history) == 1


def test_detector_state_dict_round_trip_mid_stream() -> None:
    *_, (_, uninterrupted) = live_detector_pass(PROBE_STEPS)
    cut = PROBE_STEPS.index(CENTRE - 5)  # stop in the middle of the rise
    first = EventDetector(consecutive_rules())
    for step in PROBE_STEPS[: cut + 1]:
        first.update(step, probe_scalars(step))
    state = json.loads(json.dumps(first.state_dict()))  # primitives only
    resumed = EventDetector(consecutive_rules())
    assert resumed.load_state_dict(state) == []  # no rule starts afresh
    assert resumed.events == first.events
    # A resumed run may re-probe the checkpoint step: no duplicate events.
    assert resumed.update(PROBE_STEPS[cut], probe_scalars(PROBE_STEPS[cut])) == []
    for step in PROBE_STEPS[cut + 1 :]:
        resumed.update(step, probe_scalars(step))
    assert resumed.events == uninterrupted.events
    assert resumed.history == uninterrupted.history


def test_detector_state_of_reconfigured_rule_starts_fresh() -> None:
    def rule(name: str, threshold: float = 1.0) -> ThresholdRule:
        return ThresholdRule(tag="x", threshold=threshold, name=name)

    saved = EventDetector([rule("a"), rule("b")])
    saved.update(0, {"x": 2.0})
    changed = EventDetector([rule("b"), rule("a", 5.0), rule("new")])
    # the names the callback warns about on resume (they see only the steps after the checkpoint)
    assert changed.load_state_dict(saved.state_dict()) == ["a", "new"]
    assert [e.name for e in changed.events] == ["b"] and [e.name for e in changed.history] == ["b"]


def test_detector_ignores_nan_and_missing_tags() -> None:
    *_, (_, clean) = live_detector_pass(PROBE_STEPS)
    noisy = EventDetector(consecutive_rules())
    for step in PROBE_STEPS:
        values = probe_scalars(step)
        if step in (30, 60):
            values["lens/induction/max"] = float("nan")  # a failed probe
        noisy.update(step, values)
    assert noisy.events == clean.events
    only_nan = EventDetector(consecutive_rules())
    for step in PROBE_STEPS:
        assert only_nan.update(step, {"lens/induction/max": math.nan, "other": 1.0}) == []
    assert only_nan.events == []


def test_detector_min_rise_and_direction() -> None:
    flat = EventDetector([SteepestRiseRule(tag="x", name="rise", min_rise=0.5)])
    for step, value in enumerate([0.0, 0.1, 0.2, 0.3]):
        flat.update(step, {"x": value})
    assert flat.events == []
    falling = EventDetector(
        [ThresholdRule(tag="loss", threshold=2.0, name="low", direction="below")]
    )
    assert falling.update(5, {"loss": 3.0}) == []
    assert [e.step for e in falling.update(9, {"loss": 1.9})] == [9]
    assert falling.update(12, {"loss": 1.0}) == []  # once


INVALID: dict[str, tuple[Callable[[], object], str]] = {
    "nan threshold": (lambda: ThresholdRule(tag="x", threshold=math.nan, name="a"), "threshold"),
    "str threshold": (lambda: ThresholdRule(tag="x", threshold="0.3", name="a"), "threshold"),
    "empty tag": (lambda: ThresholdRule(tag="", threshold=0.3, name="a"), "tag"),
    "slash in name": (lambda: ThresholdRule(tag="x", threshold=0.3, name="a/b"), "name"),
    "direction": (
        lambda: ThresholdRule(tag="x", threshold=0.3, name="a", direction="up"),
        "direction",
    ),
    "negative min_rise": (lambda: SteepestRiseRule(tag="x", name="a", min_rise=-0.1), "min_rise"),
    "empty name": (lambda: SteepestRiseRule(tag="x", name="", min_rise=0.1), "name"),
    "duplicate name": (
        lambda: EventDetector(
            [ThresholdRule(tag="x", threshold=0.3, name="a"), SteepestRiseRule(tag="y", name="a")]
        ),
        "name",
    ),
    "negative step": (lambda: EventDetector().update(-1, {}), "step"),
    "name with a final newline": (lambda: ThresholdRule(tag="x", threshold=0.3, name="abc\n"), "name"),
    "unknown kind": (lambda: rule_from_dict({"kind": "nope"}), "kind"),
    # a config entry written as a string or a list, not a mapping: an AttributeError ('.items') before (events review)
    "rule not a mapping": (lambda: rule_from_dict("threshold lens/induction/max 0.3"), "mapping"),
    "rule as a list": (lambda: rule_from_dict([("kind", "threshold")]), "mapping"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_validation_names_the_field(case: str) -> None:
    make, field = INVALID[case]
    with pytest.raises(ValueError, match=field):
        make()


def test_event_and_rule_dict_round_trip() -> None:
    event = Event("induction_formed", "lens/induction/max", 100, 0.31, "threshold", "reached")
    data = event.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert Event.from_dict(data) == event
    for rule in default_rules():
        assert rule_from_dict(rule.to_dict()) == rule
    # a hand-edited or foreign events.json: no step 2.7 read as 2, no "2" or true, no name no rule could have
    for key, bad in (("step", 2.7), ("step", "2"), ("step", True), ("step", -1), ("value", "0.3"), ("value", True),
                     ("name", "../../x"), ("name", {"a": 1}), ("tag", "")):
        with pytest.raises(ValueError, match=key):
            Event.from_dict({**data, key: bad})


def test_detect_events_on_dataframe_equals_live_detector(metrics: pd.DataFrame) -> None:
    *_, (_, live) = live_detector_pass(PROBE_STEPS)
    post_hoc = detect_events(metrics, consecutive_rules())
    assert [(e.name, e.step, e.kind) for e in post_hoc] == [
        (e.name, e.step, e.kind) for e in live.events
    ]
    assert [e.value for e in post_hoc] == pytest.approx([e.value for e in live.events], rel=1e-5)
    with pytest.raises(ValueError, match="columns"):
        detect_events(metrics.drop(columns="value"))


def test_detect_events_warns_on_a_rule_tag_the_frame_lacks(metrics: pd.DataFrame) -> None:
    """A rule on a misspelt tag gave ``[]``, which reads as "no circuit formed" (API review): rules you pass
    warn on tags the frame lacks, as the live callback does; the default rules stay silent without their probes."""
    with pytest.warns(UserWarning, match=r"detect_events: no \['induction/max'\] in the frame.*'lens/induction/max'"):
        assert detect_events(metrics, [ThresholdRule("induction/max", 0.0, "x")]) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detect_events(metrics[metrics["tag"] != "lens/prev_token/max"])  # default rules, one probe off
        detect_events(metrics, consecutive_rules())
        detect_events(metrics.iloc[:0], [ThresholdRule("induction/max", 0.0, "x")])  # nothing read: nothing to say
        # the default rules passed explicitly (a callback's detector.rules) stay silent too (diff review)
        detect_events(metrics[metrics["tag"] != "lens/prev_token/max"], default_rules())


def test_read_metrics_warns_when_the_points_hold_several_runs(tmp_path: Path) -> None:
    """Two fits logged under one name (``version_0``, ``version_1``) were merged into one series without a
    word; ``read_metrics("lightning_logs/gpt")``, the docstring's own example, read exactly that (API review)."""
    from lens_callback.metrics import RUN_ID_TAG

    for version, run_id in enumerate(("a" * 32, "b" * 32)):
        writer = SummaryWriter(str(tmp_path / "gpt" / f"version_{version}"))
        writer.add_text(RUN_ID_TAG, run_id, 0)
        for step in range(0, 9, 4):
            writer.add_scalar("lens/induction/max", 0.1 * (version + 1), step)
        writer.close()
    with pytest.warns(UserWarning, match=r"holds the points of 2 LensCallback runs \(aaaaaaaa in 'version_0'; "
                                         r"bbbbbbbb in 'version_1'\); their values are merged"):
        merged = read_metrics(tmp_path / "gpt", "lens/*")
    assert merged.columns.tolist() == ["step", "tag", "value", "wall_time", "run"] and len(merged) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = read_metrics(tmp_path / "gpt" / "version_0", "lens/*")
    assert one["value"].tolist() == pytest.approx([0.1] * 3)
    writer = SummaryWriter(str(tmp_path / "gpt" / "version_0"))  # a third run into a run's directory
    writer.add_text(RUN_ID_TAG, "c" * 32, 0)
    writer.add_scalar("lens/induction/max", 0.3, 0)
    writer.close()
    with pytest.warns(UserWarning, match=r"some share a directory .*give each run a directory of its own"):
        read_metrics(tmp_path / "gpt" / "version_0")


# --------------------------------------------------------------------------- report


def assert_real_png(path: Path, min_width: int = 1000, min_height: int = 600) -> np.ndarray:
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[1] >= min_width and image.shape[0] >= min_height
    rgb = image[..., :3]
    assert float(rgb.std()) > 0.05  # not blank
    assert float((rgb.mean(axis=-1) < 0.9).mean()) > 0.01  # some ink on the page
    return image


def test_make_report_full_run_png(run_dir: Path, tmp_path: Path) -> None:
    out = make_report(run_dir / "gpt", tmp_path / "report.png")
    assert out == tmp_path / "report.png"
    image = assert_real_png(out)
    assert image.shape[1] == 1400  # 14 in at 100 dpi
    assert image.shape[0] > 1200  # four rows of panels and the heatmap strip
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temp file left behind


def test_make_report_html_embeds_png_and_lists_events(run_dir: Path, tmp_path: Path) -> None:
    out = make_report(run_dir, tmp_path / "sub" / "report.html")
    page = out.read_text(encoding="utf-8")
    assert "data:image/png;base64," in page
    assert "induction_formed" in page and "induction_steepest_rise" in page
    assert_real_png(tmp_path / "sub" / "report.png")


def test_make_report_with_missing_tags(tmp_path: Path) -> None:
    only_induction = tmp_path / "partial"
    writer = SummaryWriter(str(only_induction))
    for step in PROBE_STEPS:
        writer.add_scalar("lens/induction/max", induction_curve(step), step)
        writer.add_scalar("val/loss", 3.0 - step / 100, step)
    writer.close()
    assert_real_png(make_report(only_induction, tmp_path / "partial.png"), min_height=300)

    with pytest.raises(ValueError, match="output"):
        make_report(only_induction, tmp_path / "report.jpg")


def test_a_log_of_composition_scores_only_is_drawn_and_one_of_a_probe_of_ones_own_is_named(tmp_path: Path) -> None:
    """``lens-probe <snapshots> --logdir DIR --probes k_composition`` (the README's way to add the composition
    scores to a run trained without them) wrote a log whose report drew nothing and said "no training or lens
    scalars found": the composition scores have a panel, and lens scalars no panel draws are named."""
    for name, tags in (("composition", ["lens/k_composition/max", "lens/v_composition/max"]),
                       ("own", ["lens/my_probe/max", "lens/my_probe/L0H0"])):
        writer = SummaryWriter(str(tmp_path / name))
        for step in PROBE_STEPS:
            for tag in tags:
                writer.add_scalar(tag, 0.1 + step / 1000, step)
        writer.close()
    fig = _render("composition", _load(read_metrics(tmp_path / "composition")), [])
    (ax,) = fig.axes
    assert ax.get_title() == "Composition with an earlier layer's head (best head)"
    assert [line.get_label() for line in ax.get_lines()] == ["K-composition", "V-composition"]
    fig = _render("own", _load(read_metrics(tmp_path / "own")), [])
    assert [text.get_text() for text in fig.axes[0].texts] == [
        "no panel draws the scalars logged (lens/my_probe): read them with lens_callback.read_metrics"]


def test_a_probe_of_ones_own_beside_the_shipped_ones_is_named_in_the_title(tmp_path: Path) -> None:
    """A run of the shipped probes and one of one's own (README: the scalars of a probe of your own are named,
    not drawn) got a report that drew the shipped ones and said nothing of the others: they were named only
    on a page with no panel at all (report review)."""
    writer = SummaryWriter(str(tmp_path / "run"))
    for step in PROBE_STEPS:
        for tag in ("lens/induction/max", "lens/induction/L1H0", "lens/my_probe/L0H0", "lens/my_probe/total",
                    "lens/icl_score/early_loss", "lens/errors", "lens/events/induction_formed"):
            writer.add_scalar(tag, 0.1 + step / 1000, step)
    writer.close()
    title = _render("run", _load(read_metrics(tmp_path / "run")), [])._suptitle.get_text()
    assert title.splitlines()[2:] == ["not drawn: lens/my_probe (read them with lens_callback.read_metrics)"]
    shipped = _render("run", _load(read_metrics(tmp_path / "run", tags=["lens/induction/*", "lens/errors"])), [])
    assert "not drawn" not in shipped._suptitle.get_text()


def test_a_log_of_copying_scores_is_drawn_per_head(tmp_path: Path) -> None:
    """``lens-probe <snapshots> --logdir DIR --probes copying`` writes the copying score's max, mean and heads: a
    panel draws them, as the induction score's (a log of them only said no panel draws them)."""
    writer = SummaryWriter(str(tmp_path / "copying"))
    for step in PROBE_STEPS:
        for tag, value in (("max", 0.8), ("mean", 0.3), ("L0H0", -0.2), ("L1H1", 0.8)):
            writer.add_scalar(f"lens/copying/{tag}", value + step / 1e4, step)
    writer.close()
    fig = _render("copying", _load(read_metrics(tmp_path / "copying")), [])
    (ax,) = fig.axes
    assert ax.get_title() == "Copying score (OV circuit's eigenvalue positivity)"
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[-2:] == ["mean", "max"] and len(labels) == 4, labels


def test_a_log_of_many_probes_no_panel_draws_names_three_and_counts_the_rest(tmp_path: Path) -> None:
    """`_nothing_drawn` names the first three families, sorted, and how many more (a branch no test reached:
    diff review)."""
    writer = SummaryWriter(str(tmp_path / "own"))
    for name in ("probe_d", "probe_b", "probe_a", "probe_c", "probe_e"):
        writer.add_scalar(f"lens/{name}/max", 0.5, 3)
    writer.close()
    fig = _render("own", _load(read_metrics(tmp_path / "own")), [])
    assert [text.get_text() for text in fig.axes[0].texts] == [
        "no panel draws the scalars logged (lens/probe_a, lens/probe_b, lens/probe_c and 2 more): read them with "
        "lens_callback.read_metrics"]


def test_a_series_of_one_point_is_drawn_as_a_marker(tmp_path: Path) -> None:
    """A tag logged once (a short run's train/loss, a probe run once) would be an invisible line."""
    writer = SummaryWriter(str(tmp_path / "short"))
    writer.add_scalar("train/loss", 2.0, 4)
    writer.add_scalar("lens/induction/max", 0.1, 4)
    writer.close()
    fig = _render("short", _load(read_metrics(tmp_path / "short")), [])
    single = [line for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) == 1]
    assert len(single) == 2 and all(line.get_marker() == "o" for line in single)


@pytest.mark.parametrize("steps", [range(0, 101, 10), range(0, 2001, 1)], ids=["linear", "symlog"])
def test_an_event_at_the_first_step_has_its_label_inside_the_panel(tmp_path: Path, steps: range) -> None:
    """A label sits left of its line: at the first step it was half clipped by the panel's edge, or all of it on
    a symlog axis (report review). There it goes right of the line."""
    writer = SummaryWriter(str(tmp_path / "run"))
    for step in steps:  # two panels, side by side
        writer.add_scalar("lens/induction/max", 0.01 * (step % 7), step, T0 + step)
        writer.add_scalar("train/loss", 5.0 - 0.001 * step, step, T0 + step)
    writer.close()
    events = [Event(name=name, tag="lens/induction/max", step=step, value=0.0, kind="threshold", detail="")
              for name, step in (("at_first_step", 0), ("in_the_middle", steps[len(steps) // 2]))]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _render("run", _load(read_metrics(tmp_path / "run")), events)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    labels = {t.get_text().strip(): t for ax in fig.axes for t in ax.texts if t.get_text().strip() in
              ("at_first_step", "in_the_middle")}
    assert set(labels) == {"at_first_step", "in_the_middle"}
    for name, text in labels.items():
        box, panel = text.get_window_extent(renderer), text.axes.get_window_extent(renderer)
        assert panel.x0 <= box.x0 and box.x1 <= panel.x1, name
    # and each event is a vertical line at its own step, in every panel
    for ax in fig.axes:
        drawn = [line.get_xdata() for line in ax.get_lines() if line.get_transform() is ax.get_xaxis_transform()]
        assert sorted(float(x) for x, x_end in drawn if x == x_end) == [0.0, float(steps[len(steps) // 2])]
        assert len(drawn) == 2


def test_three_close_event_labels_are_drawn_whole(tmp_path: Path) -> None:
    """The third of three close labels was written down from a third of the panel's height, and a name
    longer than that was cut off at the panel's bottom (report review: "uction_formed")."""
    writer = SummaryWriter(str(tmp_path / "run"))
    for step in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 5000):  # log-spaced probes
        value = 0.05 + 0.5 / (1 + math.exp(-(step - 1500) / 200))
        writer.add_scalar("lens/induction/max", value, step, T0 + step)
        for head in range(3):
            writer.add_scalar(f"lens/induction/L0H{head}", value * (head + 1) / 3, step, T0 + step)
        writer.add_scalar("lens/prev_token/max", min(1.0, 0.1 + step / 2000), step, T0 + step)
    for step in range(0, 5001, 50):
        writer.add_scalar("train/loss", 5 - step / 2000, step, T0 + step)
    writer.close()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    metrics = read_metrics(tmp_path / "run")
    events = detect_events(metrics)
    fig = _render("run", _load(metrics), events)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (induction,) = [ax for ax in fig.axes if ax.get_title() == "Induction score"]
    panel = induction.get_window_extent(renderer)
    labels = {t.get_text().strip(): t.get_window_extent(renderer) for t in induction.texts}
    assert len(labels) == len(events) == 3, labels
    for name, box in labels.items():
        assert panel.y0 - 0.5 <= box.y0 and box.y1 <= panel.y1 + 0.5, name

    # three at one step (two rules firing at one probe step), and two at the first step, at the panel's
    # left edge: whole, and not printed over each other (diff reviews)
    from matplotlib.transforms import Bbox

    # three at the first step, and a group that starts at the edge with its next event just past it
    # (diff review 7: the centre row met the top one, and the two tables put two labels in one place)
    edge_group = [dataclasses.replace(event, step=step) for event, step in zip(events, (0, 1, 2))]
    # and the mirror cases at the last step, the right edge (diff review 8)
    for steps, count in (((2048,) * 3, 3), ((0,) * 2, 2), ((0,) * 3, 3), ((0, 1, 2), 3), ((5000,) * 2, 2),
                         ((5000,) * 3, 3), ((4096, 5000), 2)):
        placed = [dataclasses.replace(event, step=step) for event, step in zip(events, steps)]
        fig = _render("run", _load(metrics), placed if steps != (0, 1, 2) else edge_group)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        (induction,) = [ax for ax in fig.axes if ax.get_title() == "Induction score"]
        panel = induction.get_window_extent(renderer)
        boxes = [t.get_window_extent(renderer) for t in induction.texts]
        assert len(boxes) == count
        for box in boxes:
            assert panel.y0 - 0.5 <= box.y0 and box.y1 <= panel.y1 + 0.5, steps
            assert panel.x0 - 0.5 <= box.x0 and box.x1 <= panel.x1 + 0.5, steps
        shared = [Bbox.intersection(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]]
        assert not [box for box in shared if box is not None and box.width > 0.5 and box.height > 0.5], steps


def test_an_events_file_with_an_infinite_step_is_refused_in_one_line(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    writer = SummaryWriter(str(tmp_path / "run"))
    for step in range(4):
        writer.add_scalar("lens/induction/max", 0.1 * step, step, T0 + step)
    writer.close()
    events = tmp_path / "events.json"
    events.write_text('{"events": [{"name": "e", "tag": "lens/induction/max", "step": Infinity, "value": 0.1, '
                      '"kind": "threshold"}]}')
    assert main([str(tmp_path / "run"), "--events-json", str(events), "-o", str(tmp_path / "r.png")]) == 2
    assert "event step must be a non-negative integer, got inf" in capsys.readouterr().err
    # an integer literal too large for a float, in the value: exit 2 too, not an OverflowError's traceback
    events.write_text('{"events": [{"name": "e", "tag": "lens/induction/max", "step": 1, "value": 1' + "0" * 400 +
                      ', "kind": "threshold"}]}')
    assert main([str(tmp_path / "run"), "--events-json", str(events), "-o", str(tmp_path / "r.png")]) == 2
    assert "event value must be a number a float holds, got an integer of 401 digits" in capsys.readouterr().err
    # and in a rule's number: the ValueError naming the field that NaN gets
    for rule in ({"kind": "threshold", "name": "big", "tag": "lens/induction/max", "threshold": 10**400},
                 {"kind": "steepest_rise", "name": "big", "tag": "lens/induction/max", "min_rise": 10**400}):
        with pytest.raises(ValueError, match=r"must be finite, got an integer of 401 digits"):
            rule_from_dict(rule)


def test_make_report_many_points_log_axis(big_run: Path, run_dir: Path, tmp_path: Path) -> None:
    assert_real_png(make_report(big_run, tmp_path / "big.png"), min_height=300)
    log_spaced = _render("big", _load(read_metrics(big_run)), [])
    assert {ax.get_xscale() for ax in log_spaced.axes if ax.get_xlabel() == "step"} == {"symlog"}
    linear = _render("run", _load(read_metrics(run_dir)), [])  # every 10 steps: a linear axis
    assert {ax.get_xscale() for ax in linear.axes if ax.get_xlabel() == "step"} == {"linear"}


def test_the_report_title_names_the_peak_and_the_fault_count(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "run"))
    # lens/errors is the callback's running total: one fault at step 20, logged again at 30
    for step, induction, errors in ((0, 0.02, 0.0), (10, 0.4, 0.0), (20, 0.3, 1.0), (30, 0.35, 1.0)):
        writer.add_scalar("lens/induction/max", induction, step, T0 + step)
        writer.add_scalar("lens/induction/L1H0", induction, step, T0 + step)  # the head holding the max
        writer.add_scalar("lens/induction/L0H1", 0.01, step, T0 + step)  # a weak head: not the one named
        writer.add_scalar("lens/errors", errors, step, T0 + step)
    writer.close()
    title = _render("run", _load(read_metrics(tmp_path / "run")), [])._suptitle.get_text()
    assert "peak induction score 0.400 at step 10 (L1H0)" in title
    assert "probe errors logged: 1 (check the logs)" in title
    # an infinity another writer of the tag logged is not the peak
    writer = SummaryWriter(str(tmp_path / "inf"))
    for step, induction in ((0, 0.02), (10, 0.27), (20, math.inf), (30, math.nan)):
        writer.add_scalar("lens/induction/max", induction, step, T0 + step)
        writer.add_scalar("lens/induction/L0H1", induction, step, T0 + step)
    writer.close()
    title = _render("inf", _load(read_metrics(tmp_path / "inf")), [])._suptitle.get_text()
    assert "peak induction score 0.270 at step 10" in title


def test_an_output_that_cannot_be_written_is_named_not_its_temporary_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output path that is a directory failed with the rename of a hidden temporary file the user never
    named (``[Errno 21] Is a directory: '.../.report.png.<hex>.tmp' -> '.../report.png'``; report review)."""
    (tmp_path / "report.png").mkdir()
    (tmp_path / "cmp.png").mkdir()
    assert main([str(run_dir), "-o", str(tmp_path / "report.png")]) == 2
    assert main(["--compare", f"a={run_dir}", "-o", str(tmp_path / "cmp.png")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lens-report: error: cannot write {tmp_path / name}: Is a directory" for name in ("report.png", "cmp.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.png", "report.png"]  # no temporary file left


def test_a_directory_of_snapshots_without_events_is_told_how_to_get_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The snapshots of a run whose scalars went elsewhere (a W&B run) got only "no TensorBoard event file": the
    README's way to report on them (lens-probe SNAPSHOTS --logdir OUT, then lens-report OUT) is named."""
    snapshots = tmp_path / "run" / "snapshots"
    for step in (0, 10):
        (snapshots / f"step-{step:08d}").mkdir(parents=True)
        (snapshots / f"step-{step:08d}" / "COMPLETE").write_text("")
    assert main([str(tmp_path / "run"), "-o", str(tmp_path / "r.png")]) == 2
    assert capsys.readouterr().err == (f"lens-report: error: no TensorBoard event file under {str(tmp_path / 'run')!r}, "
                                       f"but it holds snapshots ({snapshots}): `lens-probe {snapshots} --logdir OUT` "
                                       f"writes their probe values as TensorBoard events, at the original steps, for "
                                       f"`lens-report OUT`\n")
    (snapshots / "events.json").write_text('{"events": []}')  # the run's own events: the report is told to mark them
    with pytest.raises(FileNotFoundError, match=r"no TensorBoard event file under .*, but it holds snapshots \(.*"
                                                r"snapshots\): `lens-probe .*snapshots --logdir OUT` writes their probe "
                                                r"values .* for `lens-report OUT --events-json .*snapshots/events.json`$"):
        make_report(snapshots, tmp_path / "r.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no TensorBoard event file under '[^']*'$"):
        make_report(tmp_path / "empty", tmp_path / "r.png")


def test_dollar_signs_in_a_run_directory_or_label_are_drawn_as_written(run_dir: Path, tmp_path: Path) -> None:
    """matplotlib reads a pair of ``$`` as a formula: a run directory ``cost $5 and $6`` was titled "cost 5and6" in
    italics, and one named ``a$x^$b`` failed the report with mathtext's parse error (report review)."""
    for name in ("cost $5 and $6", "a$x^$b"):
        (tmp_path / name).mkdir()
        for file in (run_dir / "gpt" / "version_0").iterdir():
            (tmp_path / name / file.name).write_bytes(file.read_bytes())
        fig = _render(str(tmp_path / name), _load(read_metrics(tmp_path / name)), [])
        title = fig._suptitle
        assert title._preprocess_math(title.get_text()) == (title.get_text(), False)
        assert title.get_text().startswith(str(tmp_path / name))
        make_report(tmp_path / name, tmp_path / "r.png")  # drawn, not a ParseSyntaxException
    compare_runs({"a$x^$b": tmp_path / "a$x^$b", "cost $5 and $6": tmp_path / "cost $5 and $6"}, tmp_path / "c.png")


def test_cli(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.png"
    assert main([str(run_dir), "-o", str(out)]) == 0
    assert_real_png(out)

    events_json = tmp_path / "events.json"
    event = Event("custom", "lens/icl_score", 42, 1.0, "threshold", "given on the command line")
    # The callback's <snapshot_dir>/events.json shape: {"events": [event dict + extra keys]}.
    indexed = {**event.to_dict(), "snapshot_before": 0, "snapshot_after": None}
    events_json.write_text(json.dumps({"events": [indexed]}), encoding="utf-8")
    html_out = tmp_path / "cli.html"
    capsys.readouterr()
    assert main([str(run_dir), "-o", str(html_out), "--events-json", str(events_json)]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 'cli.png'} and {html_out}\n")  # both files named
    page = html_out.read_text(encoding="utf-8")
    assert "custom" in page and "induction_formed" not in page

    capsys.readouterr()
    assert main([str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "log directory not found" in capsys.readouterr().err
    (tmp_path / "notes").write_text("mine")
    assert main([str(run_dir), "-o", str(tmp_path / "notes" / "r.png")]) == 2
    assert f"cannot write {tmp_path / 'notes' / 'r.png'}: {tmp_path / 'notes'} is a file" in capsys.readouterr().err
    events_json.write_text("{not json", encoding="utf-8")
    assert main([str(run_dir), "-o", str(out), "--events-json", str(events_json)]) == 2


def test_compare_runs_draws_one_line_per_run(tmp_path: Path) -> None:
    """`lens-report --compare` writes one PNG with a line per run (the 1- vs 2-layer contrast)."""
    for name, top in (("two", 0.6), ("one", 0.04)):
        writer = SummaryWriter(str(tmp_path / name))
        for step in range(0, 200, 10):
            writer.add_scalar("lens/induction/max", top * step / 190, step)
            writer.add_scalar("val/loss", 3.0 - step / 100, step)
        writer.close()
    out = tmp_path / "contrast.png"
    assert main(["--compare", f"2 layers={tmp_path / 'two'}", "--compare", f"1 layer={tmp_path / 'one'}", "-o", str(out)]) == 0
    image = mpimg.imread(out)
    assert image.shape[1] > 800 and image.std() > 0.01
    assert main(["--compare", "no-equals-sign", "-o", str(out)]) == 2
    assert main(["--compare", f"x={tmp_path / 'missing'}", "-o", str(out)]) == 2


def test_steepest_rise_over_a_window_sees_a_slow_climb_at_a_fine_cadence() -> None:
    """Probed every 50 steps, a rise of 0.02 per interval is never >= min_rise between consecutive
    steps, but over a 500-step window it is; the event lands where the climb is steepest."""
    steps = list(range(0, 4001, 50))
    values = [0.02 + 0.3 / (1.0 + math.exp(-(s - 2000) / 250)) for s in steps]
    consecutive = EventDetector([SteepestRiseRule(tag="x", name="rise", min_rise=0.05)])
    windowed = EventDetector([SteepestRiseRule(tag="x", name="rise", min_rise=0.05, window=500)])
    half = EventDetector([SteepestRiseRule(tag="x", name="rise", min_rise=0.05, window=500)])
    for i, (step, value) in enumerate(zip(steps, values)):
        consecutive.update(step, {"x": value})
        windowed.update(step, {"x": value})
        if i == 40:  # resume mid-stream from the saved state
            restored = EventDetector([SteepestRiseRule(tag="x", name="rise", min_rise=0.05, window=500)])
            restored.load_state_dict(json.loads(json.dumps(half.state_dict())))
            half = restored
        half.update(step, {"x": value})
    assert consecutive.events == []
    (event,) = windowed.events
    assert abs(event.step - 2000) <= 50
    assert half.events == windowed.events
    with pytest.raises(ValueError, match="window"):
        SteepestRiseRule(tag="x", name="rise", window=-1)


def test_a_jump_sharper_than_the_window_is_placed_where_it_happened() -> None:
    """Every 500-step window over the jump (1,950 -> 2,000) rises as steeply; the earliest wins, and its
    midpoint was 1,750, half a window early, with both snapshots around it before the jump. The event
    is at the midpoint of the window's consecutive probe steps that rose most, also under noise."""
    steps = [*range(0, 33), *range(50, 5001, 50)]
    for seed in range(20):
        noise = np.random.default_rng(seed).normal(0.0, 0.003 if seed else 0.0, len(steps))
        detector = EventDetector(default_rules())
        for step, eps in zip(steps, noise):
            detector.update(step, {"lens/induction/max": (0.02 if step <= 1950 else 0.30) + eps})
        (event,) = [e for e in detector.events if e.kind == "steepest_rise"]
        assert event.step == 1975, (seed, event)
        assert "most between steps 1950 and 2000" in event.detail
        assert 0.26 / 500 < event.value < 0.30 / 500  # the window's rise per step, as before


def test_rule_boundaries_hold_as_documented() -> None:
    """"reaches" is inclusive both ways; equal slopes keep the earlier interval; a window's reference may
    be exactly one window back; a restored detector remembers its steepest slope."""
    detector = EventDetector([ThresholdRule("a", 0.3, "up"), ThresholdRule("b", 2.0, "down", direction="below")])
    assert [e.name for e in detector.update(0, {"a": 0.3, "b": 2.0})] == ["up", "down"]

    ties = EventDetector([SteepestRiseRule("a", "rise", min_rise=0.0)])
    for step, value in ((0, 0.0), (10, 0.5), (20, 1.0)):
        ties.update(step, {"a": value})
    assert [e.step for e in ties.events] == [5]

    windowed = EventDetector([SteepestRiseRule("a", "rise", min_rise=0.05, window=100)])
    for step, value in ((0, 0.0), (50, 0.0), (150, 0.5)):
        windowed.update(step, {"a": value})
    (event,) = windowed.events
    assert event.step == 100 and event.value == pytest.approx(0.005)  # from step 50, not 0

    first = EventDetector([SteepestRiseRule("a", "rise", min_rise=0.05)])
    first.update(0, {"a": 0.0})
    first.update(10, {"a": 1.0})
    resumed = EventDetector([SteepestRiseRule("a", "rise", min_rise=0.05)])
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.update(20, {"a": 1.5}) == [] and [e.step for e in resumed.events] == [5]


def test_an_early_blip_between_close_steps_does_not_outrank_the_phase_change() -> None:
    """Before any probe step is a window old, a rise is still divided by the window: +0.05 between
    the log-spaced steps 0 and 4 is 1e-4 per step, below the later 0.3 over 500 steps."""
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, *range(550, 3001, 50)]
    values = [0.02 if s not in (4, 8) else 0.07 for s in steps[:6]] + [
        0.02 + 0.3 / (1.0 + math.exp(-(s - 2000) / 150)) for s in steps[6:]]
    detector = EventDetector([SteepestRiseRule(tag="x", name="rise", min_rise=0.05, window=500)])
    for step, value in zip(steps, values):
        detector.update(step, {"x": value})
    (event,) = detector.events
    assert abs(event.step - 2000) <= 150, event


def test_lens_report_compare_names_a_repeated_label_and_refuses_a_logdir_beside_it(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "c.png")
    assert main(["--compare", f"a={run_dir}", "--compare", f"a={run_dir}", "-o", out]) == 2
    err = capsys.readouterr().err
    assert "labels must differ" in err and "['a']" in err
    assert main([str(run_dir), "--compare", f"a={run_dir}", "-o", out]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["--compare", f"a={run_dir}", "--compare", f"b={run_dir}", "-o", out]) == 0


def test_steepest_rise_midpoint_rounds_up_and_min_rise_is_inclusive() -> None:
    """An odd interval (5 -> 8) reports step 7, its midpoint rounded up; a rise of exactly
    ``min_rise`` counts."""
    rule = SteepestRiseRule(tag="x", name="rise", min_rise=0.25)
    detector = EventDetector([rule])
    for step, value in ((0, 0.0), (5, 0.0), (8, 0.25), (9, 0.25)):
        detector.update(step, {"x": value})
    (event,) = detector.events
    assert event.step == 7 and event.value == pytest.approx(0.25 / 3)


def test_report_mistakes_exit_2_naming_what_is_there(run_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    version = next(run_dir.rglob("version_0"))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "null_events.json").write_text('{"events": [null]}')
    cases = [
        ([str(version), "--prefix", "wrong", "-o", str(tmp_path / "r.png")],
         "no scalars under the logger prefix 'wrong', but holds e.g. 'lens/"),
        (["--compare", f"a={version}", "--prefix", "wrong", "-o", str(tmp_path / "c.png")], "run 'a': "),
        ([str(version), "-o", str(tmp_path / "a_file" / "r.png")], "a_file"),
        ([str(version), "-o", str(tmp_path / "r.png"), "--events-json", str(tmp_path / "null_events.json")],
         "list of event objects"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "c.png").exists()


def test_compare_leaves_a_missing_tag_empty_and_only_a_wrong_prefix_is_an_error(tmp_path: Path) -> None:
    from lens_callback.report import compare_runs

    for name, tag in (("a", "lens/induction/max"), ("b", "lens/logit_lens/L0/loss"), ("p", "pre-lens/induction/max")):
        writer = SummaryWriter(str(tmp_path / name))
        writer.add_scalar(tag, 0.5, 1)
        writer.close()
    out = compare_runs({"a": tmp_path / "a", "b": tmp_path / "b"}, tmp_path / "c.png")  # b lacks the tags
    assert_real_png(out, min_height=300)
    compare_runs({"p": tmp_path / "p"}, tmp_path / "p.png", prefix="pre")
    with pytest.raises(ValueError, match=r"run 'p': .*logger prefix .*prefix='pre'"):
        compare_runs({"p": tmp_path / "p"}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"run 'b': .*no scalars under the logger prefix 'pre'.*leave the prefix out"):
        compare_runs({"b": tmp_path / "b"}, tmp_path / "x.png", prefix="pre")


def test_lens_report_marks_the_runs_own_events_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """With snapshot_dir="auto" the callback's events.json (its own rules) sits in LOGDIR/snapshots."""
    import lens_callback.report as report

    writer = SummaryWriter(str(tmp_path / "run"))
    writer.add_scalar("lens/induction/max", 0.1, 1)
    writer.close()
    seen: list[Any] = []
    monkeypatch.setattr(report, "make_report", lambda logdir, output, events, prefix, events_run_id: seen.append(events)
                        or output)
    assert main([str(tmp_path / "run"), "-o", str(tmp_path / "r.png")]) == 0
    assert seen == [None]  # no events.json: detected from the scalars
    custom = Event("my_rule", "lens/induction/max", 1, 0.1, "threshold", "a user's rule")
    (tmp_path / "run" / "snapshots").mkdir()
    (tmp_path / "run" / "snapshots" / "events.json").write_text(json.dumps({"events": [custom.to_dict()]}))
    assert main([str(tmp_path / "run"), "-o", str(tmp_path / "r.png")]) == 0
    assert seen[-1] == [custom] and "events from" in capsys.readouterr().out
    # a run and the version_k its resume wrote: the run's events.json is in its first part's snapshots
    (tmp_path / "run" / "snapshots").rename(tmp_path / "version_0")
    (tmp_path / "run").rename(tmp_path / "parent")
    (tmp_path / "parent" / "version_0").mkdir()
    (tmp_path / "version_0").rename(tmp_path / "parent" / "version_0" / "snapshots")
    assert main([str(tmp_path / "parent"), "-o", str(tmp_path / "r.png")]) == 0
    assert seen[-1] == [custom]
    assert f"events from {tmp_path / 'parent' / 'version_0' / 'snapshots' / 'events.json'}" in capsys.readouterr().out
    # two such files below: whose the run is cannot be told, so neither is taken (mutation review: the
    # first of several taken went unnoticed)
    (tmp_path / "parent" / "version_1" / "snapshots").mkdir(parents=True)
    other = Event("other_rule", "lens/induction/max", 1, 0.1, "threshold", "another run's rule")
    (tmp_path / "parent" / "version_1" / "snapshots" / "events.json").write_text(json.dumps({"events": [other.to_dict()]}))
    assert main([str(tmp_path / "parent"), "-o", str(tmp_path / "r.png")]) == 0
    assert seen[-1] is None and "detected from the scalars with the default rules" in capsys.readouterr().out
    (tmp_path / "parent" / "version_1" / "snapshots" / "events.json").unlink()
    (tmp_path / "parent" / "version_0" / "snapshots" / "events.json").unlink()
    assert main([str(tmp_path / "parent"), "-o", str(tmp_path / "r.png")]) == 0
    assert seen[-1] is None and "detected from the scalars with the default rules" in capsys.readouterr().out


def test_the_events_of_another_run_are_refused_naming_both_runs(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``--events-json`` of another run's snapshots (version_1's for version_0, a slip of the finger) drew that
    run's events on this run's curves without a word: the callback's events.json names its run, as the log does."""
    from lens_callback.metrics import RUN_ID_TAG

    writer = SummaryWriter(str(tmp_path / "run"))
    writer.add_text(RUN_ID_TAG, "a" * 32, 0)
    for step in range(0, 50, 10):
        writer.add_scalar("lens/induction/max", 0.1 + step / 100, step)
    writer.close()
    event = Event("induction_formed", "lens/induction/max", 30, 0.4, "threshold", "another run's")
    for name, run_id in (("theirs.json", "b" * 32), ("ours.json", "a" * 32)):
        (tmp_path / name).write_text(json.dumps({"run_id": run_id, "events": [event.to_dict()]}))
    out = tmp_path / "r.png"
    assert main([str(tmp_path / "run"), "--events-json", str(tmp_path / "theirs.json"), "-o", str(out)]) == 2
    assert capsys.readouterr().err == (f"lens-report: error: the events given are run bbbbbbbb's, but {tmp_path / 'run'} "
                                       f"holds run aaaaaaaa's points: pass the events.json of that run's snapshots\n")
    assert not out.exists()
    assert main([str(tmp_path / "run"), "--events-json", str(tmp_path / "ours.json"), "-o", str(out)]) == 0
    (tmp_path / "old.json").write_text(json.dumps([event.to_dict()]))  # a list names no run: taken
    assert main([str(tmp_path / "run"), "--events-json", str(tmp_path / "old.json"), "-o", str(out)]) == 0


def write_induction(run_dir: Path, steps: range, value: float) -> None:
    """One run's ``lens/induction/max``, the same value at each of ``steps``."""
    writer = SummaryWriter(str(run_dir))
    for step in steps:
        writer.add_scalar("lens/induction/max", value, step)
    writer.close()


@pytest.mark.parametrize("first", [0, 1], ids=["step-0-probe", "at_start-false"])
def test_a_directory_of_several_runs_is_refused_a_resumed_run_is_joined(tmp_path: Path, first: int,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """read_metrics keeps one value per tag and step across every event file under LOGDIR: two runs
    from step 0 (runs/default after two `make demo`) were stitched into one report, exit 0; so were
    two runs without the step-0 probe (at_start=False), which start at their first probe step."""
    from lens_callback.report import compare_runs

    def write(run: str, steps: range, value: float) -> None:
        write_induction(tmp_path / "default" / run, steps, value)

    write("version_0", range(first, 17, 4), 0.1)
    write("version_1", range(first, 9, 2), 0.9)
    with pytest.raises(ValueError, match=rf"holds 2 runs that each start at step {first} \('version_0', 'version_1'\).*version_1"):
        make_report(tmp_path / "default", tmp_path / "r.png")
    assert main([str(tmp_path / "default"), "-o", str(tmp_path / "r.png")]) == 2
    assert f"each start at step {first}" in capsys.readouterr().err and not (tmp_path / "r.png").exists()
    with pytest.raises(ValueError, match=r"run 'x': .*2 runs"):
        compare_runs({"x": tmp_path / "default"}, tmp_path / "c.png")
    make_report(tmp_path / "default" / "version_1", tmp_path / "one.png")
    # a resumed part of one of them: named, since the advice to pass one run's directory would drop it
    write("version_2", range(10, 17, 2), 0.95)
    with pytest.raises(ValueError, match=r"parts that start later, resumed runs \('version_2' from step 10\): to "
                                         r"report a run with its resumed part, move the two"):
        make_report(tmp_path / "default", tmp_path / "r.png")

    write("version_2", range(10, 21, 5), 0.5)  # a run resumed at step 10 into a new version: one run
    make_report(tmp_path / "default" / "version_2", tmp_path / "resumed.png")
    (tmp_path / "default" / "version_1").rename(tmp_path / "elsewhere")
    make_report(tmp_path / "default", tmp_path / "chain.png")  # version_0 and its resumed part


def test_a_run_logged_without_the_callback_beside_a_marked_run_in_one_directory_is_refused(tmp_path: Path) -> None:
    """A fixed logger version holding a run logged without the callback (no run id) and, in a second
    event file, a run with it: both start at step 0, so the report refuses them (events review: the
    unmarked file's points were given the other file's run id and the two drawn as one curve)."""
    from lens_callback.metrics import RUN_ID_TAG, read_all_points

    plain = SummaryWriter(str(tmp_path / "run" / "fixed"))
    for step in range(0, 40, 4):
        plain.add_scalar("train/loss", 3.0, step)
    plain.close()
    lens = SummaryWriter(str(tmp_path / "run" / "fixed"))
    lens.add_text(RUN_ID_TAG, "b" * 32, 0)
    for step in range(0, 20, 4):
        lens.add_scalar("lens/induction/max", 0.1, step)
        lens.add_scalar("train/loss", 2.0, step)
    lens.close()
    points = read_all_points(tmp_path / "run" / "fixed", run_ids=True)
    assert points.groupby("file")["run_id"].unique().map(list).sort_values().tolist() == [[""], ["b" * 32]]
    with pytest.raises(ValueError, match=r"holds 2 runs that each start at step 0, some logged without LensCallback's "
                                         r"run id: .*written into one directory"):
        make_report(tmp_path / "run" / "fixed", tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


def test_run_ids_in_one_event_file_part_its_points(tmp_path: Path) -> None:
    """One logger shared by two fits in a process writes both runs into one event file: the points
    after each run-id marker are that run's. A point logged before a directory's only marker (training
    scalars before the fit's first probe step) is that run's, not a run of its own starting at step 0."""
    from lens_callback.metrics import RUN_ID_TAG, read_all_points

    writer = SummaryWriter(str(tmp_path / "shared" / "version_0"))
    writer.add_scalar("lens/induction/max", 0.5, 0)  # before any marker
    for run_id in ("a" * 32, "b" * 32):
        writer.add_text(RUN_ID_TAG, run_id, 0)
        for step in range(0, 9, 4):
            writer.add_scalar("lens/induction/max", 0.1, step)
    writer.close()
    points = read_all_points(tmp_path / "shared", tags="lens/*", run_ids=True)
    assert points["run_id"].tolist() == ["", "a" * 32, "a" * 32, "a" * 32, "b" * 32, "b" * 32, "b" * 32]
    assert "run_id" not in read_all_points(tmp_path / "shared", tags="lens/*").columns
    with pytest.raises(ValueError, match=r"holds 2 runs \(LensCallback run ids: aaaaaaaa in 'version_0'; bbbbbbbb in "
                                         r"'version_0'\): .*written into one directory \('version_0'; a fixed"):
        make_report(tmp_path / "shared", tmp_path / "r.png")

    writer = SummaryWriter(str(tmp_path / "one" / "version_0"))
    writer.add_scalar("lens/induction/max", 0.5, 0)
    writer.add_text(RUN_ID_TAG, "c" * 32, 0)
    writer.add_scalar("lens/induction/max", 0.6, 4)
    writer.close()
    write_induction(tmp_path / "one" / "version_1", range(8, 13, 4), 0.7)  # an unmarked part from step 8
    make_report(tmp_path / "one", tmp_path / "one.png")
    write_induction(tmp_path / "one" / "version_2", range(0, 13, 4), 0.7)  # an unmarked run from step 0
    with pytest.raises(ValueError, match=r"holds 2 runs that each start at step 0 \('version_0', 'version_2'\)"):
        make_report(tmp_path / "one", tmp_path / "r.png")


def test_a_validate_logged_beside_the_run_is_no_second_run(tmp_path: Path) -> None:
    """``lens-train validate`` with the run's logger writes a version of its own holding ``val/loss`` at
    step 0: the report refused the run as two runs starting at step 0 and pointed at the validate's
    version, which holds no lens scalars (CLI review). Such a log is left out; one holding training
    scalars is still a run."""
    from lens_callback.metrics import RUN_ID_TAG, read_all_points
    from lens_callback.report import _without_evaluation_logs, compare_runs

    run = SummaryWriter(str(tmp_path / "default" / "version_0"))
    run.add_text(RUN_ID_TAG, "a" * 32, 0)
    for step in range(0, 21, 4):
        run.add_scalar("lens/induction/max", 0.1 + step / 100, step)
        run.add_scalar("train/loss", 3.0 - step / 10, step)
    run.add_scalar("val/loss", 2.5, 20)
    run.close()
    validate = SummaryWriter(str(tmp_path / "default" / "version_1"))
    validate.add_scalar("val/loss", 9.0, 0)
    validate.close()
    make_report(tmp_path / "default", tmp_path / "r.png")
    compare_runs({"x": tmp_path / "default"}, tmp_path / "c.png", tags=("val/loss", "lens/induction/max"))
    kept = _without_evaluation_logs(read_all_points(tmp_path / "default", run_ids=True))
    assert set(kept["run"]) == {"version_0"} and kept.loc[kept["tag"] == "val/loss", "value"].tolist() == [2.5]
    plain = SummaryWriter(str(tmp_path / "default" / "version_2"))  # a run logged without the callback
    plain.add_scalar("train/loss", 3.0, 0)
    plain.close()
    with pytest.raises(ValueError, match=r"holds 2 runs that each start at step 0"):
        make_report(tmp_path / "default", tmp_path / "r.png")


def test_a_finite_value_between_nans_is_drawn_as_a_marker(tmp_path: Path) -> None:
    """The last values before a run diverged (then NaN) have no finite neighbour: a line alone
    draws nothing for them."""
    from lens_callback.report import _load, _render

    writer = SummaryWriter(str(tmp_path / "run"))
    for step, value in ((0, 5.4), (1, float("nan")), (2, float("nan")), (3, 4.0), (4, 3.5)):
        writer.add_scalar("train/loss", value, step)
        writer.add_scalar("lens/icl_score", value / 10, step)
    writer.close()
    figure = _render("run", _load(read_metrics(tmp_path / "run")), [])
    marked = {line.get_label(): line.get_markevery() for ax in figure.axes for line in ax.get_lines()
              if line.get_label() in ("train/loss", "icl_score", "lens/icl_score")}
    assert marked and all(every == [0] for every in marked.values()), marked  # step 0 only: 3 and 4 are a line


# -- pinned by the mutation review -------------------------------------------------------------
def test_equal_rises_inside_a_window_place_the_event_at_the_earliest() -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    from lens_callback.events import EventDetector, SteepestRiseRule
    det = EventDetector([SteepestRiseRule("x", "rise", min_rise=0.05, window=100)])
    for step, value in ((0, 0.0), (25, 0.25), (50, 0.5), (75, 0.75), (100, 1.0)):
        det.update(step, {"x": value})
    (event,) = det.events
    assert event.step == 13, event   # earliest of the equal rises (0 -> 25), rounded up; mutant: 88


def test_a_run_shorter_than_the_window_still_gets_its_steepest_rise() -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    import math
    from lens_callback.events import EventDetector, SteepestRiseRule
    det = EventDetector([SteepestRiseRule("x", "rise", min_rise=0.05, window=500)])
    det.update(0, {"x": 0.02})
    det.update(100, {"x": 0.40})
    (event,) = det.events   # reference: the first observation, rise divided by the window
    assert event.step == 50 and math.isclose(event.value, 0.38 / 500), event


def test_infinite_values_are_ignored_by_the_event_rules() -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    import math
    from lens_callback.events import EventDetector, SteepestRiseRule, ThresholdRule
    det = EventDetector([ThresholdRule("x", 0.3, "up"), SteepestRiseRule("x", "rise", min_rise=0.05)])
    det.update(0, {"x": 0.0})
    assert det.update(10, {"x": math.inf}) == [] and det.events == []


def test_earliest_open_step_is_the_earliest_over_rules() -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    from lens_callback.events import EventDetector, SteepestRiseRule
    det = EventDetector([SteepestRiseRule("a", "ra", window=100), SteepestRiseRule("b", "rb")])
    for step in (0, 50, 200):
        det.update(step, {"a": 0.0, "b": 0.0})
    assert det.earliest_open_step() == 50  # rule ra's window reference; rule rb's last step is 200


def test_a_restored_detector_continues_the_interval_across_the_resume() -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    from lens_callback.events import EventDetector, SteepestRiseRule
    import json
    first = EventDetector([SteepestRiseRule("a", "rise", min_rise=0.05)])
    first.update(0, {"a": 0.0})
    first.update(10, {"a": 0.1})
    resumed = EventDetector([SteepestRiseRule("a", "rise", min_rise=0.05)])
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [e.step for e in resumed.update(20, {"a": 1.0})] == [15]


def test_before_any_step_is_a_window_old_the_reference_is_the_first_observation() -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    import math
    from lens_callback.events import EventDetector, SteepestRiseRule
    det = EventDetector([SteepestRiseRule("x", "rise", min_rise=0.05, window=500)])
    for step, value in ((0, 0.0), (50, 0.1), (100, 0.4)):
        det.update(step, {"x": value})
    (event,) = det.events
    assert event.step == 75 and math.isclose(event.value, 0.4 / 500), event


def test_an_event_far_outside_the_logged_steps_is_listed_not_drawn(tmp_path: Path) -> None:
    """An events file of another run with an event at step 1,000,000 on a 30-step run made matplotlib's
    text rasteriser overflow (a traceback, exit 1)."""
    write_induction(tmp_path / "run", range(0, 31, 5), 0.5)
    events = tmp_path / "events.json"
    events.write_text(json.dumps([{"name": "far", "step": 1_000_000, "kind": "threshold", "tag": "lens/induction/max",
                                   "value": 1.0, "detail": "d"},
                                  {"name": "near", "step": 10, "kind": "threshold", "tag": "lens/induction/max",
                                   "value": 1.0, "detail": "d"}]))
    assert main([str(tmp_path / "run"), "-o", str(tmp_path / "r.png"), "--events-json", str(events)]) == 0
    assert (tmp_path / "r.png").stat().st_size > 0


def test_two_runs_each_with_a_resumed_part_are_told_to_move_one_apart(tmp_path: Path) -> None:
    from lens_callback.metrics import RUN_ID_TAG

    for run, parts in (("a" * 32, ("v0", "v1")), ("b" * 32, ("v2", "v3"))):
        for index, part in enumerate(parts):
            writer = SummaryWriter(str(tmp_path / "runs" / part))
            writer.add_text(RUN_ID_TAG, run, 4 * index)
            writer.add_scalar("lens/induction/max", 0.5, 4 * index)
            writer.close()
    with pytest.raises(ValueError, match=r"holds 2 runs \(LensCallback run ids: aaaaaaaa in 'v0', 'v1'; bbbbbbbb in "
                                         r"'v2', 'v3'\): .*resumed parts, move them \('v0', 'v1'\) into a directory"):
        make_report(tmp_path / "runs", tmp_path / "r.png")
    make_report(tmp_path / "runs" / "v0", tmp_path / "part.png")


def test_the_hint_for_crossed_nesting_and_a_run_without_ids_inside_a_runs_directory(tmp_path: Path) -> None:
    """Each run with a directory holding the other's gave "written into one directory ()" with nothing
    listed; a directory holding a run without ids below it was named (diff review)."""
    from lens_callback.metrics import RUN_ID_TAG

    def write(root: Path, run: str | None, part: str) -> None:
        writer = SummaryWriter(str(root / part))
        if run is not None:
            writer.add_text(RUN_ID_TAG, run, 0)
        writer.add_scalar("lens/induction/max", 0.5, 0)
        writer.close()

    for run, part in (("a" * 32, "x"), ("a" * 32, "y/resumed"), ("b" * 32, "y"), ("b" * 32, "x/resumed")):
        write(tmp_path / "crossed", run, part)
    with pytest.raises(ValueError, match=r"a report shows one run; move each run's directories into a directory of "
                                         r"their own and pass that$"):
        make_report(tmp_path / "crossed", tmp_path / "r.png")
    for run, part in (("a" * 32, "A"), (None, "A/old"), ("b" * 32, "B")):
        write(tmp_path / "mixed", run, part)
    with pytest.raises(ValueError, match=r"pass one run's directory, e\.g\. .*mixed/B$"):
        make_report(tmp_path / "mixed", tmp_path / "r.png")
    write(tmp_path / "mixed", None, "B/old")  # now no run lies apart: the logs without ids are named
    with pytest.raises(ValueError, match=r"'A/old' holds logs without run ids inside run aaaaaaaa's 'A': move them "
                                         r"out of it, then pass its directory$"):
        make_report(tmp_path / "mixed", tmp_path / "r.png")


@pytest.mark.parametrize("layout", [(".", "v1"), ("A", "A/sub")], ids=["logdir-itself", "nested"])
def test_the_hint_never_names_a_directory_that_holds_another_runs_events(tmp_path: Path,
                                                                          layout: tuple[str, str]) -> None:
    """The hint named the first run with one directory, the logdir itself or a parent of another run's
    directory, which the report refuses again (diff review)."""
    from lens_callback.metrics import RUN_ID_TAG

    for run, part in zip(("a" * 32, "b" * 32), layout):
        writer = SummaryWriter(str(tmp_path / "exp" / part))
        writer.add_text(RUN_ID_TAG, run, 0)
        writer.add_scalar("lens/induction/max", 0.5, 0)
        writer.close()
    with pytest.raises(ValueError, match=rf"pass one run's directory, e\.g\. .*exp/{layout[1]}$"):
        make_report(tmp_path / "exp", tmp_path / "r.png")
    make_report(tmp_path / "exp" / layout[1], tmp_path / "one.png")


# -- report review (nineteenth session) ---------------------------------------------------------
def test_an_empty_logdir_argument_is_refused_not_read_as_the_current_directory(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``lens-report "$LOGDIR"`` with the variable unset, or ``--compare a=``, read everything under
    the current directory and exited 0."""
    monkeypatch.chdir(run_dir)
    out = str(tmp_path / "r.png")
    assert main(["", "-o", out]) == 2
    assert "give a LOGDIR" in capsys.readouterr().err
    assert main(["--compare", "a=", "--compare", f"b={run_dir}", "-o", out]) == 2
    assert "LABEL=LOGDIR, both non-empty" in capsys.readouterr().err
    from lens_callback.report import compare_runs
    with pytest.raises(ValueError, match=r"run\(s\) \['a'\]: the log directory is empty"):
        compare_runs({"a": "", "b": run_dir}, out)
    assert not Path(out).exists()
    with pytest.raises(ValueError, match=r"the log directory is empty \(\"\" would read the current directory\)"):
        read_metrics("")  # read the run in the current directory (metrics review)
    with pytest.raises(ValueError, match="the log directory is empty"):
        make_report("", out)
    assert not read_metrics(".").empty and not Path(out).exists()


def test_a_compare_label_matplotlib_would_hide_is_refused(run_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """matplotlib leaves labels starting with '_' out of the legend: ``--compare _base=A --compare
    treated=B`` drew two lines and named one."""
    out = tmp_path / "c.png"
    assert main(["--compare", f"_base={run_dir}", "--compare", f"treated={run_dir}", "-o", str(out)]) == 2
    assert "must not start with '_'" in capsys.readouterr().err and not out.exists()


def test_events_json_with_compare_is_refused(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--compare draws no events: an --events-json beside it was ignored silently."""
    events = tmp_path / "events.json"
    events.write_text("[]")
    assert main(["--compare", f"a={run_dir}", "--events-json", str(events), "-o", str(tmp_path / "c.png")]) == 2
    assert "--compare draws none" in capsys.readouterr().err


def test_a_negative_step_is_left_out_of_event_detection_not_a_refusal(tmp_path: Path) -> None:
    """A value logged at step -1 (a baseline before training) on a rule's tag made lens-report exit 2
    with 'step must be a non-negative integer' and no report."""
    writer = SummaryWriter(str(tmp_path / "run"))
    writer.add_scalar("lens/induction/max", 0.9, -1)
    for step, value in ((0, 0.0), (10, 0.05), (20, 0.5), (30, 0.55)):
        writer.add_scalar("lens/induction/max", value, step)
    writer.close()
    frame = read_metrics(tmp_path / "run")
    assert -1 in set(frame["step"])
    events = detect_events(frame)
    assert events and all(event.step >= 0 for event in events)
    assert main([str(tmp_path / "run"), "-o", str(tmp_path / "r.png")]) == 0


def test_rules_take_numpy_scalars() -> None:
    """``ThresholdRule(threshold=np.float32(0.3))`` was refused as 'not a real number'."""
    rule = ThresholdRule(tag="t", threshold=np.float32(0.25), name="b")
    assert rule.threshold == 0.25 and type(rule.threshold) is float
    rise = SteepestRiseRule(tag="t", name="r", min_rise=np.float64(0.1), window=np.int64(500))
    assert rise.window == 500 and type(rise.window) is int
    assert EventDetector([rule, rise]).tags == ["t"]
    with pytest.raises(ValueError, match="threshold must be a real number"):
        ThresholdRule(tag="t", threshold="0.3", name="b")


# -- mutation review (h3): what the report draws and says is the run's own numbers ---------------------
def test_the_log_axis_needs_more_than_two_decades_of_probe_steps(tmp_path: Path) -> None:
    """Steps 1 .. 8 then 100 span exactly two decades: "more than two decades" keeps the axis linear;
    one step further (101) makes it symlog. ``<`` for ``<=`` there went unnoticed (mutation review)."""
    for last, scale in ((100, "linear"), (101, "symlog")):
        run = tmp_path / str(last)
        write_induction(run, [*range(1, 9), last], 0.1)  # log-spaced: the median, 5, is below a tenth of the last
        fig = _render(str(run), _load(read_metrics(run)), [])
        assert {ax.get_xscale() for ax in fig.axes if ax.get_xlabel() == "step"} == {scale}, last


def test_the_title_names_the_earliest_of_equal_peaks_without_a_max_tag(tmp_path: Path) -> None:
    """Without ``lens/induction/max`` the peak is read from the per-head tags: two heads reaching 0.5, L0H0
    at step 20 and L1H1 at step 10, give step 10 and L1H1, as `_finite_argmax` takes the first of equal
    values; the later step went unnoticed (mutation review)."""
    writer = SummaryWriter(str(tmp_path / "run"))
    for step, early, late in ((0, 0.0, 0.0), (10, 0.25, 0.5), (20, 0.5, 0.25)):
        writer.add_scalar("lens/induction/L0H0", early, step, T0 + step)
        writer.add_scalar("lens/induction/L1H1", late, step, T0 + step)
    writer.close()
    title = _render("run", _load(read_metrics(tmp_path / "run")), [])._suptitle.get_text()
    assert "peak induction score 0.500 at step 10 (L1H1)" in title


def test_each_panel_draws_its_own_tags(run_dir: Path) -> None:
    """Each panel's labelled lines hold the values written under their tags (float32, as stored), and
    the heatmap's row labelled L{l}H{h} holds that head's scores: the attention-entropy panel's thick
    line read from ``/max`` and the heatmap's rows in reverse went unnoticed (mutation review)."""
    fig = _render("run", _load(read_metrics(run_dir)), [])
    panels = {ax.get_title(): ax for ax in fig.axes}

    def line(title: str, label: str) -> pd.Series:
        (found,) = [ln for ln in panels[title].get_lines() if ln.get_label() == label]
        return pd.Series(np.asarray(found.get_ydata(), dtype=float), index=np.asarray(found.get_xdata()), name=label)

    for title, label, tag in (("Induction score", "max", "lens/induction/max"),
                              ("Induction score", "mean", "lens/induction/mean"),
                              ("Attention entropy (normalised)", "mean", "lens/attn_entropy/mean"),
                              ("In-context learning score (< 0: uses context)", "icl_score", "lens/icl_score")):
        pd.testing.assert_series_equal(line(title, label), expected_series(tag), check_names=False,
                                       check_index_type=False, obj=f"{title}: {label}")
    heat = panels["Induction score per head over time"]
    labels = [t.get_text() for t in heat.get_yticklabels()]
    grid = np.asarray(heat.collections[0].get_array()).reshape(len(labels), len(PROBE_STEPS))
    for row, label in enumerate(labels):
        layer, head = int(label[1]), int(label[3])
        expected = [float(np.float32(probe_scalars(s)[f"lens/induction/{label}"])) for s in PROBE_STEPS]
        np.testing.assert_allclose(grid[row], expected, err_msg=label)
        assert (layer, head) in {(l, h) for l in range(N_LAYERS) for h in range(N_HEADS)}


def test_make_report_detects_events_on_the_latest_value_of_a_relogged_step(tmp_path: Path) -> None:
    """A run that crashed at step 20 (logging 0.9 there) and resumed from step 10 re-logs step 20 as 0.2:
    the report's events come from the latest values, so the 0.3 threshold is reached at step 30, not at
    the crashed run's stale 20. The report reading every point, stale ones too, went unnoticed (mutation
    review). The resumed run's file is written first, so it is read first and the stale point last."""
    resumed, crashed = SummaryWriter(str(tmp_path / "run")), SummaryWriter(str(tmp_path / "run"))
    for step, value in ((0, 0.0), (10, 0.1), (20, 0.9)):
        crashed.add_scalar("lens/induction/max", value, step, T0 + step)
    for step, value in ((20, 0.2), (30, 0.35)):
        resumed.add_scalar("lens/induction/max", value, step, T0 + 1000 + step)
    crashed.close()
    resumed.close()
    page = make_report(tmp_path / "run", tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<td>induction_formed</td><td>threshold</td><td>lens/induction/max</td><td>30</td>" in page


def test_the_readmes_lens_report_command_lines_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Every ``lens-report ...`` line of the README's prose names options lens-report has (its ``--help``), and
    each without a placeholder left (``--prefix ...``) runs as written on runs where its paths name them:
    ``runs/default/version_0`` (also ``LOGDIR`` and ``DIR``, its snapshots' ``events.json`` beside it) and
    ``runs/one_layer/version_0``, from a directory with a ``docs/``, as the project's."""
    monkeypatch.chdir(tmp_path)
    for name in ("default", "one_layer"):
        writer = SummaryWriter(f"runs/{name}/version_0")
        write_run(writer, range(0, 201), 0.0, T0)
        writer.close()
    Path("docs").mkdir()
    run = "runs/default/version_0"
    Path(f"{run}/snapshots").mkdir()
    events = [event.to_dict() for event in detect_events(read_metrics(run))]
    Path(f"{run}/snapshots/events.json").write_text(json.dumps({"events": events}), encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["--help"])
    options = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", capsys.readouterr().out))
    commands = readme_commands("lens-report", {"LOGDIR": run, "DIR": run, "<the run's snapshots>": f"{run}/snapshots"})
    ran = []
    for words in commands:
        assert {word.split("=")[0] for word in words if word.startswith("-")} <= options, words
        if words and "..." not in words:
            assert main(words) == 0, (words, capsys.readouterr().err)
            written = capsys.readouterr().out.splitlines()[-1].removeprefix("wrote ")
            assert written == (words[words.index("-o") + 1] if "-o" in words else "report.png"), words
            assert_real_png(Path(written), min_height=300)
            ran.append(words)
    assert len(ran) == 3 and events
