"""Circuit-formation events: when did an induction head (or another circuit) appear?

Pure logic: no logging, no Lightning, no file format. The same :class:`EventDetector` runs live
(the callback feeds it each probe step's scalars) and post hoc (:func:`detect_events` replays a
:func:`lens_callback.metrics.read_metrics` DataFrame through it), so both give the same answer.

Two rule kinds:

* :class:`ThresholdRule`: the first probe step at which a scalar reaches a threshold. Fires once.
* :class:`SteepestRiseRule`: the interval over which a scalar rose fastest (rise per step): between
  two consecutive probe steps, or with a ``window`` (the default rule's 500 steps) from the latest
  probe step at least that far back; the event is placed at the midpoint of the consecutive probe
  steps inside it with the largest rise. The best interval can still move later in training, so this rule
  fires again each time a strictly steeper interval (with a rise of at least ``min_rise``) is seen;
  each firing supersedes the previous one. :attr:`EventDetector.events` holds only the latest
  firing per rule, so once training is over it *is* the step of steepest rise;
  :attr:`EventDetector.history` keeps every firing.

Example:
    >>> detector = EventDetector([ThresholdRule(tag="lens/induction/max", threshold=0.3,
    ...                                         name="induction_formed")])
    >>> detector.update(100, {"lens/induction/max": 0.1})
    []
    >>> [e.step for e in detector.update(200, {"lens/induction/max": 0.4})]
    [200]
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias

import pandas as pd

from lens_callback.schedule import integer_or_none

__all__ = [
    "Event",
    "EventDetector",
    "EventKind",
    "Rule",
    "SteepestRiseRule",
    "ThresholdRule",
    "default_rules",
    "detect_events",
    "rule_from_dict",
]

EventKind: TypeAlias = Literal["threshold", "steepest_rise"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_STATE_VERSION = 1


def _check_name(name: object) -> str:
    """Validate an event name: it becomes the TensorBoard tag ``lens/events/{name}``."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):  # match() let a final newline through
        raise ValueError(
            f"name must be a non-empty string of letters, digits, '_', '.' or '-', got {name!r}"
        )
    return name


def _check_tag(tag: object) -> str:
    """Validate a scalar tag a rule watches."""
    if not isinstance(tag, str) or not tag.strip():
        raise ValueError(f"tag must be a non-empty string, got {tag!r}")
    return tag


def _check_finite(field_name: str, value: object) -> float:
    """Validate a finite real number and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars too
        raise ValueError(f"{field_name} must be a real number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float (10**400 in a config): not finite either
        raise ValueError(f"{field_name} must be finite, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(number):
        raise ValueError(f"{field_name} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class Event:
    """One detected circuit-formation event.

    Attributes:
        name: The rule's name, e.g. ``"induction_formed"``; logged as ``lens/events/{name}``.
        tag: The scalar tag the rule watched, e.g. ``"lens/induction/max"``.
        step: The training step (optimizer step, ``global_step``) at which the event happened.
            For a threshold event, the first probe step with the value past the threshold. For a
            steepest-rise event, the midpoint (rounded up) of the steepest probe interval; the
            interval's ends are in ``detail``. The detector may report an event at a later
            ``update`` call than ``step`` (a steepest-rise event is known only at the interval's
            end).
        value: For a threshold event, the scalar's value at ``step``; for a steepest-rise event,
            the rise per step: the rise over the interval divided by its length, or by the rule's
            ``window`` where that is longer (`SteepestRiseRule`).
        kind: ``"threshold"`` or ``"steepest_rise"``.
        detail: A human-readable sentence describing the event.
    """

    name: str
    tag: str
    step: int
    value: float
    kind: EventKind
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a dict of primitives (JSON- and checkpoint-safe)."""
        return {
            "name": self.name,
            "tag": self.tag,
            "step": int(self.step),
            "value": float(self.value),
            "kind": self.kind,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Build an event from :meth:`to_dict` output.

        Args:
            data: A mapping with the keys written by :meth:`to_dict`.

        Returns:
            The event.

        Raises:
            ValueError: If a key is missing, ``kind`` is unknown, or a value has the wrong type
                (a step that is not a non-negative integer, a name a rule could not have).
        """
        missing = [k for k in ("name", "tag", "step", "value", "kind") if k not in data]
        if missing:
            raise ValueError(f"event dict is missing keys {missing}: {dict(data)!r}")
        kind = data["kind"]
        if kind not in ("threshold", "steepest_rise"):
            raise ValueError(f"kind must be 'threshold' or 'steepest_rise', got {kind!r}")
        step = integer_or_none(data["step"])  # not 2.7 read as 2, nor "2" or true (hostile-input review)
        if step is None or step < 0:
            raise ValueError(f"event step must be a non-negative integer, got {data['step']!r}")
        if isinstance(data["value"], (bool, str)):
            raise ValueError(f"event value must be a number, got {data['value']!r}")
        try:
            value = float(data["value"])
        except OverflowError:  # an integer literal too large for a float in a hand-edited file
            raise ValueError(f"event value must be a number a float holds, got an integer of "
                             f"{len(str(data['value']))} digits") from None
        return cls(
            name=_check_name(data["name"]),
            tag=_check_tag(data["tag"]),
            step=step,
            value=value,
            kind=kind,
            detail=str(data.get("detail", "")),
        )


@dataclass(frozen=True)
class ThresholdRule:
    """Fire once, at the first probe step where ``tag`` reaches ``threshold``.

    Attributes:
        tag: The scalar tag to watch, e.g. ``"lens/induction/max"``.
        threshold: The value to reach (finite).
        name: The event's name (letters, digits, ``_``, ``.``, ``-``), unique within a detector.
        direction: ``"above"`` fires when ``value >= threshold``; ``"below"`` when
            ``value <= threshold`` (e.g. ``lens/repeated_loss`` falling under a level; the callback
            feeds its rules its own ``lens/...`` scalars, not the module's ``train/loss``).
    """

    tag: str
    threshold: float
    name: str
    direction: Literal["above", "below"] = "above"

    kind: ClassVar[EventKind] = "threshold"

    def __post_init__(self) -> None:
        _check_tag(self.tag)
        object.__setattr__(self, "threshold", _check_finite("threshold", self.threshold))
        _check_name(self.name)
        if self.direction not in ("above", "below"):
            raise ValueError(f"direction must be 'above' or 'below', got {self.direction!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the rule as a dict of primitives, including its ``kind``."""
        return {
            "kind": self.kind,
            "tag": self.tag,
            "threshold": self.threshold,
            "name": self.name,
            "direction": self.direction,
        }


@dataclass(frozen=True)
class SteepestRiseRule:
    """Track the probe interval over which ``tag`` rose fastest (largest rise per step).

    Between consecutive probe steps ``s0 < s1`` with values ``v0, v1``, the slope is
    ``(v1 - v0) / (s1 - s0)``. The rule fires whenever an interval has a strictly larger slope
    than every earlier one and a positive rise ``v1 - v0 >= min_rise``; a later firing supersedes
    an earlier one (ties keep the earlier interval). The event's ``step`` is the interval's
    midpoint, rounded up (a jump between steps ``s`` and ``s + 1`` is at ``s + 1``, the first step
    that shows it, so the snapshots just before the event and at or after it bracket the jump); with
    a ``window``, the midpoint of the consecutive probe steps inside the interval whose value rose
    most (the earliest of equal rises), so a jump sharper than the window is placed where it
    happened. Intervals join consecutive *observed* steps: a probe step whose value
    was ignored (NaN) or missing is skipped over, not treated as zero.

    Rises only: on a scalar that falls as a circuit forms (``lens/icl_score``, ``lens/repeated_loss``)
    this rule finds the steepest rise, not the drop; a :class:`ThresholdRule` with
    ``direction="below"`` watches such a scalar.

    Attributes:
        tag: The scalar tag to watch, e.g. ``"lens/induction/max"``.
        name: The event's name (letters, digits, ``_``, ``.``, ``-``), unique within a detector.
        min_rise: The smallest absolute rise over one interval that counts (finite, ``>= 0``);
            it keeps noise between close probe steps from being reported as a rise.
        window: ``0`` compares consecutive probe steps. ``> 0`` compares each probe step with the
            latest one at least ``window`` steps earlier (the first observation while none is, the
            rise then divided by ``window`` all the same, not by the shorter interval), so the rule
            measures the rise over a fixed stretch of training whatever the probe cadence:
            with a probe every 50 steps a phase change rises by a few hundredths per interval and
            would never pass ``min_rise`` between consecutive steps.
    """

    tag: str
    name: str
    min_rise: float = 0.05
    window: int = 0

    kind: ClassVar[EventKind] = "steepest_rise"

    def __post_init__(self) -> None:
        _check_tag(self.tag)
        _check_name(self.name)
        min_rise = _check_finite("min_rise", self.min_rise)
        if min_rise < 0:
            raise ValueError(f"min_rise must be >= 0, got {self.min_rise!r}")
        object.__setattr__(self, "min_rise", min_rise)
        if isinstance(self.window, bool) or not isinstance(self.window, numbers.Integral) or self.window < 0:
            raise ValueError(f"window must be an integer >= 0, got {self.window!r}")
        object.__setattr__(self, "window", int(self.window))

    def to_dict(self) -> dict[str, Any]:
        """Return the rule as a dict of primitives, including its ``kind``."""
        return {"kind": self.kind, "tag": self.tag, "name": self.name, "min_rise": self.min_rise,
                "window": self.window}


Rule: TypeAlias = ThresholdRule | SteepestRiseRule


def rule_from_dict(data: Mapping[str, Any]) -> Rule:
    """Build a rule from its ``to_dict`` output (e.g. a YAML/JSON config entry).

    Args:
        data: A mapping with ``kind`` (``"threshold"`` or ``"steepest_rise"``) and the rule's
            fields.

    Returns:
        The rule.

    Raises:
        ValueError: If ``data`` is not a mapping, ``kind`` is unknown or a field is missing or invalid.
    """
    if not isinstance(data, Mapping):  # a config entry written as a string or a list
        raise ValueError(f"a rule must be a mapping with 'kind' and the rule's fields, got {data!r}")
    fields = {k: v for k, v in data.items() if k != "kind"}
    kind = data.get("kind")
    try:
        if kind == ThresholdRule.kind:
            return ThresholdRule(**fields)
        if kind == SteepestRiseRule.kind:
            return SteepestRiseRule(**fields)
    except TypeError as err:  # missing or unexpected field
        raise ValueError(f"invalid {kind} rule {dict(data)!r}: {err}") from err
    raise ValueError(f"kind must be 'threshold' or 'steepest_rise', got {kind!r}")


def default_rules() -> list[Rule]:
    """The rules the callback and the report use unless told otherwise.

    * ``induction_formed``: ``lens/induction/max`` reaches 0.3 (the best head puts 30% of its
      attention on the token after the previous occurrence of the current token; a head attending
      uniformly scores the mean of ``1 / (q + 1)`` over ``q`` in ``[L, 2L)``, about ``ln 2 / L``:
      0.021 at the default ``repeat_length`` 32).
    * ``induction_steepest_rise``: the steepest rise of ``lens/induction/max`` over 500 training
      steps, ignoring stretches that rise by less than 0.05 (the phase change itself).
    * ``prev_token_formed``: ``lens/prev_token/max`` reaches 0.5 (a head attending mostly to the
      previous token, the first half of the induction circuit).

    Returns:
        A new list of rules (safe to modify).
    """
    return [
        ThresholdRule(tag="lens/induction/max", threshold=0.3, name="induction_formed"),
        SteepestRiseRule(tag="lens/induction/max", name="induction_steepest_rise", min_rise=0.05, window=500),
        ThresholdRule(tag="lens/prev_token/max", threshold=0.5, name="prev_token_formed"),
    ]


@dataclass
class _Tracker:
    """Per-rule detection state (mutable, private to :class:`EventDetector`)."""

    rule: Rule
    last_step: int | None = None
    prev_value: float | None = None
    best_slope: float | None = None
    current: Event | None = None
    fired: bool = False
    history: list[list[float]] = field(default_factory=list)  # [step, value] within the window

    def observe(self, step: int, value: float) -> Event | None:
        """Feed one finite observation; return the event it triggers, if any."""
        if self.last_step is not None and step <= self.last_step:
            return None  # already seen (a resumed run re-probing a step) or out of order
        prev_step, prev_value = self.last_step, self.prev_value
        self.last_step, self.prev_value = step, value
        rule = self.rule
        if isinstance(rule, ThresholdRule):
            if self.fired:
                return None
            if rule.direction == "above":
                reached = value >= rule.threshold
            else:
                reached = value <= rule.threshold
            if not reached:
                return None
            self.fired = True
            relation = ">=" if rule.direction == "above" else "<="
            self.current = Event(
                name=rule.name,
                tag=rule.tag,
                step=step,
                value=value,
                kind=rule.kind,
                detail=(
                    f"{rule.tag} reached {value:.4g} {relation} {rule.threshold:.4g} "
                    f"at step {step}"
                ),
            )
            return self.current
        if rule.window > 0:
            prev_step, prev_value = self._window_reference(step, value, rule.window)
        if prev_step is None or prev_value is None:
            return None
        rise = value - prev_value
        # over at least the window: an early rise between close log-spaced steps (before any step
        # is a window old) must not outrank a phase change measured over the whole window
        slope = rise / max(step - prev_step, rule.window)
        if rise <= 0 or rise < rule.min_rise:
            return None
        if self.best_slope is not None and slope <= self.best_slope:
            return None
        self.best_slope = slope
        # where in the interval the scalar rose: the consecutive probe steps with the largest rise (the
        # earliest of equal ones); a jump sharper than the window is placed at the jump, not up to half
        # a window before it, so the snapshots around the event bracket it
        start, end = prev_step, step
        if rule.window > 0:
            inside = [h for h in self.history if h[0] >= prev_step]
            if len(inside) >= 2:
                a, b = max(zip(inside, inside[1:]), key=lambda pair: pair[1][1] - pair[0][1])
                start, end = int(a[0]), int(b[0])
        where = f", most between steps {start} and {end}" if (start, end) != (prev_step, step) else ""
        self.current = Event(
            name=rule.name,
            tag=rule.tag,
            step=start + (end - start + 1) // 2,  # rounded up: after a one-step jump, where it shows
            value=slope,
            kind=rule.kind,
            detail=(
                f"{rule.tag} rose {rise:.4g} from {prev_value:.4g} at step {prev_step} "
                f"to {value:.4g} at step {step} ({slope:.4g} per step{where})"
            ),
        )
        return self.current

    def _window_reference(self, step: int, value: float, window: int) -> tuple[int | None, float | None]:
        """The latest observation at least ``window`` steps before ``step`` (else the first one)."""
        self.history.append([step, value])
        older = [h for h in self.history[:-1] if h[0] <= step - window]
        if older:
            self.history = [h for h in self.history if h[0] >= older[-1][0]]
            ref = older[-1]
        elif len(self.history) > 1:
            ref = self.history[0]
        else:
            return None, None
        return int(ref[0]), float(ref[1])

    def state_dict(self) -> dict[str, Any]:
        """Return this tracker's state as primitives."""
        return {
            "history": [list(h) for h in self.history],
            "rule": self.rule.to_dict(),
            "last_step": self.last_step,
            "prev_value": self.prev_value,
            "best_slope": self.best_slope,
            "fired": self.fired,
            "current": None if self.current is None else self.current.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` output; missing keys take their defaults."""
        last_step = state.get("last_step")
        prev_value = state.get("prev_value")
        best_slope = state.get("best_slope")
        current = state.get("current")
        self.last_step = None if last_step is None else int(last_step)
        self.prev_value = None if prev_value is None else float(prev_value)
        self.best_slope = None if best_slope is None else float(best_slope)
        self.fired = bool(state.get("fired", False))
        self.current = None if current is None else Event.from_dict(current)
        self.history = [[int(h[0]), float(h[1])] for h in state.get("history", [])]


class EventDetector:
    """Detect circuit-formation events from the scalars of successive probe steps.

    Call :meth:`update` once per probe step with that step's scalars (a mapping from tag to
    value; tags no rule watches are ignored, missing tags are simply not observed). Non-finite
    values (NaN, a probe that failed; ±inf) are ignored. Each rule only looks at steps strictly
    after the last step it observed, so replaying a step already seen, e.g. after resuming from a
    checkpoint, cannot produce a duplicate event.

    Args:
        rules: The rules to apply; ``None`` uses :func:`default_rules`. Rule names must be unique.

    Raises:
        ValueError: If two rules share a ``name`` or an item is not a rule.

    Example:
        >>> detector = EventDetector()
        >>> for step, score in [(0, 0.02), (100, 0.05), (200, 0.35), (300, 0.5)]:
        ...     new = detector.update(step, {"lens/induction/max": score})
        >>> [(e.name, e.step) for e in detector.events]
        [('induction_steepest_rise', 150), ('induction_formed', 200)]
    """

    def __init__(self, rules: Sequence[Rule] | None = None) -> None:
        rules = default_rules() if rules is None else list(rules)
        self._trackers: dict[str, _Tracker] = {}
        for rule in rules:
            if not isinstance(rule, (ThresholdRule, SteepestRiseRule)):
                raise ValueError(f"rules must be ThresholdRule or SteepestRiseRule, got {rule!r}")
            if rule.name in self._trackers:
                raise ValueError(f"name must be unique among rules, got {rule.name!r} twice")
            self._trackers[rule.name] = _Tracker(rule)
        self._history: list[Event] = []

    @property
    def rules(self) -> list[Rule]:
        """The detector's rules, in the order given."""
        return [tracker.rule for tracker in self._trackers.values()]

    @property
    def tags(self) -> list[str]:
        """The distinct tags the rules watch, in rule order."""
        return list(dict.fromkeys(rule.tag for rule in self.rules))

    @property
    def events(self) -> list[Event]:
        """The current answer: at most one event per rule, sorted by ``(step, name)``.

        A threshold event appears once it fired; a steepest-rise event is the latest (steepest)
        one, superseding the earlier firings still listed in :attr:`history`.
        """
        current = [t.current for t in self._trackers.values() if t.current is not None]
        return sorted(current, key=lambda e: (e.step, e.name))

    def earliest_open_step(self) -> int | None:
        """The earliest step a steepest-rise event this detector finds later may still be placed
        after: a windowed rule's current reference (a later interval starts there or after it; a
        stretch of ignored NaN values keeps it far back), else a rule's last observed step; ``None``
        without a steepest-rise rule that has seen a value."""
        steps = [int(t.history[0][0]) if t.rule.window > 0 and t.history else t.last_step
                 for t in self._trackers.values() if isinstance(t.rule, SteepestRiseRule)]
        return min((s for s in steps if s is not None), default=None)

    @property
    def history(self) -> list[Event]:
        """Every event returned by :meth:`update` so far, in the order returned."""
        return list(self._history)

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        """Observe one probe step's scalars and return the events they trigger.

        Args:
            step: The training step (``global_step``) of these values, ``>= 0``.
            values: Scalar values by tag (floats, or anything ``float()`` accepts, e.g. a 0-d
                tensor). Non-finite values are ignored.

        Returns:
            The events triggered at this step, in rule order (empty most of the time). A
            steepest-rise event here supersedes that rule's earlier one.

        Raises:
            ValueError: If ``step`` is not a non-negative integer.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        step = int(step)
        new: list[Event] = []
        for tracker in self._trackers.values():
            raw = values.get(tracker.rule.tag)
            if raw is None:
                continue
            value = float(raw)
            if not math.isfinite(value):
                continue
            event = tracker.observe(step, value)
            if event is not None:
                new.append(event)
        self._history.extend(new)
        return new

    def state_dict(self) -> dict[str, Any]:
        """Return the detection state as primitives (for a Lightning callback checkpoint).

        Returns:
            ``{"version": 1, "rules": {name: {...}}, "history": [event dicts]}``.
        """
        return {
            "version": _STATE_VERSION,
            "rules": {name: tracker.state_dict() for name, tracker in self._trackers.items()},
            "history": [event.to_dict() for event in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> list[str]:
        """Restore the state saved by :meth:`state_dict`, so detection continues exactly.

        A rule's state is restored only if a rule with the same name *and* the same
        configuration was saved; a rule that is new or was reconfigured since starts afresh, and
        saved state of rules no longer configured is dropped (with their history entries).

        Args:
            state: The output of :meth:`state_dict`.

        Returns:
            The names of the rules that start afresh, in rule order: they see only the steps from here
            on, so an event they would have found earlier is found late or not at all (the callback
            warns; `detect_events` on the logged scalars sees every step).

        Raises:
            ValueError: If ``state`` is not such a mapping.
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("rules", {}), Mapping):
            raise ValueError(f"state must be an EventDetector.state_dict(), got {state!r}")
        saved_rules: Mapping[str, Any] = state.get("rules", {})
        restored: set[str] = set()
        for name, tracker in self._trackers.items():
            fresh = _Tracker(tracker.rule)
            saved = saved_rules.get(name)
            if isinstance(saved, Mapping) and saved.get("rule") == tracker.rule.to_dict():
                fresh.load_state_dict(saved)
                restored.add(name)
            self._trackers[name] = fresh
        self._history = [
            Event.from_dict(item)
            for item in state.get("history", [])
            if item.get("name") in restored
        ]
        return [name for name in self._trackers if name not in restored]


def detect_events(df: pd.DataFrame, rules: Sequence[Rule] | None = None) -> list[Event]:
    """Run an :class:`EventDetector` post hoc over a ``read_metrics`` DataFrame.

    The frame's rows for the rules' tags are grouped by step and fed to
    :meth:`EventDetector.update` in increasing step order, exactly as the callback does live.
    Rows at a negative step (a value a script logged before training, e.g. at step -1), which no
    training step has, are left out.
    The answer matches live detection up to TensorBoard's float32 storage of scalars (a value
    within float32 rounding of a threshold, or two slopes tied within it, may resolve
    differently), and for the points the frame holds: a run resumed into the same log version from
    an earlier checkpoint keeps the points its stopped attempt logged past that checkpoint at steps
    the resumed fit does not log again, which live detection never saw (report review).

    Args:
        df: A frame with at least the columns ``step``, ``tag`` and ``value``.
        rules: The rules to apply; ``None`` uses :func:`default_rules`.

    Returns:
        :attr:`EventDetector.events` after the last step: at most one event per rule.

    Raises:
        ValueError: If ``df`` lacks one of the required columns, or a rule is invalid.

    Warns:
        UserWarning: if a rule given in ``rules`` (other than a default one) watches a tag that a
            non-empty ``df`` lacks (a misspelt tag, a logger prefix left on: `read_metrics`'s
            ``prefix`` removes it).
    """
    detector = EventDetector(rules)
    missing = [c for c in ("step", "tag", "value") if c not in df.columns]
    if missing:
        raise ValueError(f"df is missing columns {missing}; it has {list(df.columns)}")
    # rules you pass watch tags that must be there: an empty list would read as "no circuit formed" (the
    # live callback warns alike); the default rules stay silent without their probes, as live
    defaults = default_rules()  # given explicitly (a callback's detector.rules) they stay silent too
    watched = dict.fromkeys(rule.tag for rule in detector.rules if rule not in defaults) if rules is not None else {}
    in_frame = set(df["tag"])
    absent = [tag for tag in watched if tag not in in_frame]
    if absent and in_frame:
        present = sorted(tag for tag in in_frame if "/L" not in tag)  # not per head or per layer
        warnings.warn(f"detect_events: no {absent} in the frame, so the rules watching them cannot fire (a tag "
                      f"misspelt, a logger prefix left on, or a probe not run?); tags present include "
                      f"{[t for t in present if t.startswith('lens/')][:12] or present[:12]}", stacklevel=2)
    rows = df.loc[df["tag"].isin(detector.tags) & (df["step"] >= 0), ["step", "tag", "value"]]
    if rows.empty:
        return []
    rows = rows.sort_values("step", kind="stable")
    for step, group in rows.groupby("step", sort=True):
        detector.update(int(step), dict(zip(group["tag"], group["value"], strict=True)))
    return detector.events
