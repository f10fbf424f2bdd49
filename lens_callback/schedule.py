"""``ProbeSchedule``: at which optimizer steps the callback probes."""

from __future__ import annotations

import math
import numbers
import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def _is_bool(value: Any) -> bool:
    """Whether ``value`` is a Python, numpy or torch bool (a bool tensor of any shape). torch is not
    imported for it (`lens_callback.events` and so `lens-report` use this module): a tensor exists only
    where torch was imported."""
    torch = sys.modules.get("torch")
    return isinstance(value, (bool, np.bool_)) or (
        torch is not None and isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def integer_or_none(value: Any) -> int | None:
    """``value`` as an int if it is an integer (Python, numpy or a 0-d integer tensor: anything with
    ``__index__``) and not a bool (nor a bool tensor, whose ``__index__`` gives 0 or 1), else ``None``."""
    # numpy's bool has __index__ before numpy 2.3 (the last numpy for Python 3.10 among them)
    if _is_bool(value):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def finite_non_negative(value: Any) -> bool:
    """Whether ``value`` is a real number (a Python, numpy or 0-d tensor one; not a bool or a string) in
    ``[0, inf)``, as a tolerance must be."""
    if isinstance(value, (str, bytes)) or _is_bool(value):
        return False
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        return False
    return 0 <= number < math.inf


def check_token_min_frequency(value: Any) -> float:
    """``value`` as a float if it is a real number in ``[0, 1)`` (a numpy one too, e.g. from ``np.logspace``;
    not a bool; NaN is not), else raises ``ValueError``."""
    # typeshed's numbers.Real declares no comparison with a float, which every real number has
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:  # type: ignore[operator]
        raise ValueError(f"token_min_frequency must be in [0, 1), got {value!r}")
    return float(value)


def step_list(name: str, values: Iterable[Any]) -> list[int]:
    """``values`` (read once) as ints (`integer_or_none`); a ValueError naming ``name`` lists those that
    are not non-negative integers, or says that ``values`` is no list of steps: ``ProbeSchedule(steps=5)``
    met a TypeError of ``list(5)`` that named no argument, and ``steps="100"`` was the steps ``'1', '0', '0'``."""
    try:
        if isinstance(values, (str, bytes, Mapping)):
            raise TypeError
        items = iter(values)
    except TypeError:  # not iterable (an int, a 0-d array)
        raise ValueError(f"{name} must be a list of non-negative integers, got {values!r}") from None
    values = list(items)
    ints = [integer_or_none(v) for v in values]
    bad = [v for v, i in zip(values, ints) if i is None or i < 0]
    if bad:
        raise ValueError(f"{name} must be non-negative integers, got {bad!r}")
    return [i for i in ints if i is not None]  # all of them, past the check


@dataclass(frozen=True)
class ProbeSchedule:
    """The union of a fixed cadence, explicit steps, and log-spaced early steps.

    Steps are Lightning's ``global_step``: the number of optimizer steps taken. Step 0 is the initial
    model (``at_start``); the final model is probed at fit end (``at_end``) whatever its step.

    Attributes:
        every_n_steps: Probe every this many optimizer steps (``None``: no cadence).
        steps: Explicit steps to probe.
        log_spaced: Also probe at steps 1, 2, 4, 8, ... (powers of two): phase changes come early,
            when a fixed cadence is too coarse.
        at_start: Probe the initial model (step 0) when training starts from scratch.
        at_end: Probe the final model when fit ends.
    """

    every_n_steps: int | None = 100
    steps: Sequence[int] = field(default_factory=tuple)
    log_spaced: bool = True
    at_start: bool = True
    at_end: bool = True

    def __post_init__(self) -> None:
        for name in ("log_spaced", "at_start", "at_end"):  # a string "false" is true: it must not switch a flag on
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        n = self.every_n_steps
        if n is not None:
            n = integer_or_none(n)
            if n is None or n <= 0:
                raise ValueError(f"every_n_steps must be a positive integer or None, got {self.every_n_steps!r}")
            object.__setattr__(self, "every_n_steps", n)
        object.__setattr__(self, "steps", tuple(sorted(set(step_list("steps", self.steps)))))
        if n is None and not self.steps and not self.log_spaced and not self.at_start and not self.at_end:
            raise ValueError(
                "the schedule is empty: set every_n_steps, steps, log_spaced, at_start or at_end"
            )

    def due(self, step: int) -> bool:
        """Whether ``step`` (a ``global_step`` after an optimizer step) is scheduled."""
        if step == 0:
            return self.at_start or 0 in self.steps
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return True
        if self.log_spaced and step & (step - 1) == 0:
            return True
        return step in self.steps

    def due_between(self, after: int, upto: int) -> bool:
        """Whether any step in ``(after, upto]`` is scheduled (`due`). Under manual optimization with
        several optimizers ``global_step`` moves by more than one per batch, so a due step can pass
        between two batch ends; the callback then probes at the batch end that passed it."""
        if upto <= after:
            return False
        if after < 0 and self.due(0):
            return True
        lo = max(after, 0)  # the steps left are lo + 1 .. upto, all >= 1
        if upto <= lo:
            return False
        n = self.every_n_steps
        if n is not None and upto // n > lo // n:
            return True
        if self.log_spaced and 1 << (upto.bit_length() - 1) > lo:  # the largest power of two <= upto
            return True
        return any(lo < s <= upto for s in self.steps)

    def planned(self, max_steps: int) -> list[int]:
        """Every scheduled step up to ``max_steps`` (the final step included when ``at_end``)."""
        planned = [s for s in range(max_steps + 1) if self.due(s)]
        if self.at_end and max_steps > 0 and (not planned or planned[-1] != max_steps):
            planned.append(max_steps)
        return planned
