"""One-page training report: read a run's TensorBoard scalars, plot how its circuits formed.

``make_report(logdir, "report.png")`` reads the run with
:func:`~lens_callback.metrics.read_metrics`, detects events with
:func:`~lens_callback.events.detect_events` (unless given events), and draws one PNG with a
panel per metric family that was logged:

=========================  ============================================================
panel                      tags
=========================  ============================================================
Loss                       ``train/loss``, ``val/loss``
Induction score            ``lens/induction/max`` (thick), ``.../mean``, ``.../L{l}H{h}`` (thin)
Previous-token score       ``lens/prev_token/...`` (same layout)
Duplicate-token score      ``lens/duplicate_token/...`` (same layout)
Attention entropy          ``lens/attn_entropy/mean`` (thick), ``.../L{l}H{h}`` (thin)
Logit lens loss            ``lens/logit_lens/L{l}/loss``, one line per layer
In-context learning score  ``lens/icl_score`` (late minus early loss: below 0, the model uses context)
Repeated-sequence loss     ``lens/repeated_loss``, ``lens/repeated_loss/first_half``
Composition (best head)    ``lens/{k,q,v}_composition/max``
Copying score              ``lens/copying/...`` (as the induction score)
Induction heads over time  heatmap of ``lens/induction/L{l}H{h}``: x = step, rows = heads
=========================  ============================================================

A panel whose tags were not logged is left out. Every panel shares the step axis, and each event
is a dashed vertical line (labelled in the induction panel, listed in the title). The title names
the run directory and the peak induction score with its step (and head), and the ``lens/{family}``
scalars no panel draws (a probe of one's own).

The x axis is linear unless the probe steps (the steps of ``lens/*`` tags) span more than two
decades (largest / smallest positive step > 100) *and* are log-spaced (median step below a tenth
of the largest, e.g. a 1, 2, 4, ... schedule); then it is symmetric-log, linear below the first
positive probe step. A linear schedule thus keeps a linear axis however long the run.

Rendering uses :class:`matplotlib.figure.Figure` directly with the Agg canvas: no pyplot, no
global state, no display needed.

Console script: ``lens-report LOGDIR -o report.png [--events-json PATH]`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import offset_copy

from lens_callback.events import Event, detect_events
from lens_callback.fileio import atomic_write, make_dirs
from lens_callback.layout import COMPLETE_FILE, STEP_DIR_RE
from lens_callback.metrics import LOGGER_JOIN_CHAR, latest_per_step, listed_runs, read_all_points, read_metrics

__all__ = ["main", "make_report"]

log = logging.getLogger(__name__)

_REPORT_TAGS: tuple[str, ...] = ("train/loss", "val/loss", "lens/*")
_HEAD_RE = re.compile(r"^L(\d+)H(\d+)$")
_LOGIT_LENS_RE = re.compile(r"^lens/logit_lens/L(\d+)/loss$")
_LOG_X_SPAN = 100.0  # two decades
_MAX_LAYER_LEGEND = 4  # per-head lines: one legend entry per layer up to this many layers
_MAX_HEAD_LABELS = 48  # heatmap: label every row up to this many heads, else one label per layer
_PANEL_W, _PANEL_H = 7.0, 3.0  # inches
_DPI = 100

_Series = tuple[np.ndarray, np.ndarray]  # (steps, values), sorted by step


@dataclass
class _RunData:
    """A run's scalars split by tag, with the per-head and per-layer families parsed."""

    series: dict[str, _Series]

    def get(self, tag: str) -> _Series | None:
        """The (steps, values) of ``tag``, or ``None`` if it was not logged."""
        return self.series.get(tag)

    def heads(self, family: str) -> dict[tuple[int, int], _Series]:
        """Per-head series ``lens/{family}/L{l}H{h}`` keyed and sorted by ``(layer, head)``."""
        prefix = f"lens/{family}/"
        found: dict[tuple[int, int], _Series] = {}
        for tag, data in self.series.items():
            if tag.startswith(prefix):
                match = _HEAD_RE.match(tag[len(prefix) :])
                if match:
                    found[(int(match[1]), int(match[2]))] = data
        return dict(sorted(found.items()))

    def logit_lens(self) -> dict[int, _Series]:
        """Logit-lens loss series keyed and sorted by layer index."""
        found = {
            int(m[1]): data for tag, data in self.series.items() if (m := _LOGIT_LENS_RE.match(tag))
        }
        return dict(sorted(found.items()))

    def step_range(self) -> tuple[int, int] | None:
        """The smallest and largest step over all series, or ``None`` if there is no data."""
        if not self.series:
            return None
        lows = [int(steps[0]) for steps, _ in self.series.values()]
        highs = [int(steps[-1]) for steps, _ in self.series.values()]
        return min(lows), max(highs)

    def probe_steps(self) -> np.ndarray:
        """The distinct steps of the ``lens/*`` tags (of all tags if there are none)."""
        chosen = [s for tag, (s, _) in self.series.items() if tag.startswith("lens/")]
        chosen = chosen or [s for s, _ in self.series.values()]
        if not chosen:
            return np.empty(0, dtype=np.int64)
        return np.unique(np.concatenate(chosen))


def _load(df: pd.DataFrame) -> _RunData:
    """Split a ``read_metrics`` frame (sorted by tag then step) into per-tag arrays."""
    series: dict[str, _Series] = {}
    for tag, group in df.groupby("tag", sort=True):
        series[str(tag)] = (group["step"].to_numpy(), group["value"].to_numpy(dtype=float))
    return _RunData(series)


def _head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _plot_heads(ax: Axes, heads: dict[tuple[int, int], _Series], cmap: Colormap) -> None:
    """Thin, translucent per-head lines coloured by layer (one legend entry per layer, or one
    in all when there are more than ``_MAX_LAYER_LEGEND`` layers)."""
    if not heads:
        return
    n_layers = max(layer for layer, _ in heads) + 1
    alpha = 0.7 if len(heads) <= 16 else 0.35
    labelled: set[int] = set()
    for (layer, _head), (steps, values) in heads.items():
        label = None
        if n_layers <= _MAX_LAYER_LEGEND and layer not in labelled:
            label = f"L{layer} heads"
        elif not labelled:
            label = f"heads (colour: layer 0..{n_layers - 1})"
        labelled.add(layer)
        colour = cmap(0.8 * layer / max(n_layers - 1, 1))  # viridis' last fifth is too pale
        ax.plot(steps, values, lw=0.7, alpha=alpha, color=colour, label=label)


def _panel_head_family(
    data: _RunData, family: str, summary: str, title: str, ylabel: str
) -> Callable[[Axes], None] | None:
    """A panel drawer for a per-head probe family, or ``None`` if nothing was logged."""
    heads = data.heads(family)
    main_series = data.get(f"lens/{family}/{summary}")
    mean_series = data.get(f"lens/{family}/mean") if summary != "mean" else None
    if not heads and main_series is None and mean_series is None:
        return None

    def draw(ax: Axes) -> None:
        _plot_heads(ax, heads, colormaps["viridis"])
        if mean_series is not None:
            ax.plot(*mean_series, lw=1.5, ls="--", color="tab:gray", label="mean")
        if main_series is not None:
            ax.plot(*main_series, lw=2.2, color="black", label=summary)
        ax.set_title(title)
        ax.set_ylabel(ylabel)

    return draw


def _panel_loss(data: _RunData) -> Callable[[Axes], None] | None:
    train, val = data.get("train/loss"), data.get("val/loss")
    if train is None and val is None:
        return None

    def draw(ax: Axes) -> None:
        if train is not None:
            ax.plot(*train, lw=0.8, alpha=0.8, color="tab:blue", label="train/loss")
        if val is not None:
            ax.plot(*val, lw=1.8, marker="o", ms=3, color="tab:orange", label="val/loss")
        ax.set_title("Loss")
        ax.set_ylabel("cross-entropy (nats)")

    return draw


def _panel_logit_lens(data: _RunData) -> Callable[[Axes], None] | None:
    layers = data.logit_lens()
    if not layers:
        return None

    def draw(ax: Axes) -> None:
        cmap = colormaps["plasma"]
        last = max(layers)
        for layer, series in layers.items():
            label = f"L{layer} (final)" if layer == last else f"L{layer}"
            ax.plot(*series, lw=1.2, color=cmap(0.85 * layer / max(last, 1)), label=label)
        ax.set_title("Logit lens loss per layer (Ln = after the last block)")
        ax.set_ylabel("loss (nats)")

    return draw


def _panel_single(
    data: _RunData, tags: Sequence[tuple[str, str]], title: str, ylabel: str, zero_line: bool
) -> Callable[[Axes], None] | None:
    present = [(tag, label) for tag, label in tags if data.get(tag) is not None]
    if not present:
        return None

    def draw(ax: Axes) -> None:
        for i, (tag, label) in enumerate(present):
            series = data.get(tag)
            assert series is not None
            ax.plot(*series, lw=1.8 if i == 0 else 1.2, ls="-" if i == 0 else "--", label=label)
        if zero_line:
            ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)

    return draw


_DRAWN_FAMILIES = frozenset(f"lens/{name}" for name in (
    "induction", "prev_token", "duplicate_token", "attn_entropy", "logit_lens", "icl_score", "repeated_loss",
    "k_composition", "q_composition", "v_composition", "copying",  # the panels of `_render`
    "errors", "events",  # the title's fault count and the event lines
))
"""The ``lens/{family}`` scalars the report shows; the others (a probe of one's own) are named in its title."""


def _families(data: _RunData) -> list[str]:
    """The ``lens/{family}`` prefixes of the logged scalars, sorted."""
    return sorted({"/".join(tag.split("/")[:2]) for tag in data.series if tag.startswith("lens/")})


def _named(families: Sequence[str]) -> str:
    """The first three of ``families`` and how many more."""
    return ", ".join(families[:3]) + (f" and {len(families) - 3} more" if len(families) > 3 else "")


def _nothing_drawn(data: _RunData) -> str:
    """What a report without panels says: a log of a probe of one's own only (lens-probe --probes my_probe) holds
    lens scalars, which "no training or lens scalars found" denied."""
    families = _families(data)
    if not families:
        return "no training or lens scalars found"
    return f"no panel draws the scalars logged ({_named(families)}): read them with lens_callback.read_metrics"


def _not_drawn(data: _RunData) -> str:
    """The title's line naming the lens scalars no panel draws (a probe of one's own run beside the shipped ones),
    which a report with panels left out without a word; ``""`` if there are none."""
    families = [family for family in _families(data) if family not in _DRAWN_FAMILIES]
    if not families:
        return ""
    return f"not drawn: {_named(families)} (read them with lens_callback.read_metrics)"


def _literal(text: str) -> str:
    """``text`` as a label matplotlib draws as written: a pair of ``$`` (a run labelled ``lr $5 and $6``, a
    directory ``a$x^$b``) is mathtext to it, drawn as a formula or failing the whole report with a parse error
    (report review)."""
    return text.replace("$", r"\$")


def _scaled_x(ax: Axes, values: np.ndarray | Sequence[float], inverse: bool = False) -> np.ndarray:
    """Map data x values through the axis' scale (identity for linear, log-like for symlog)."""
    flat = np.asarray(values, dtype=float).ravel()
    transform = ax.xaxis.get_transform()
    if transform.input_dims != 1:  # a linear axis: IdentityTransform
        return flat
    if inverse:
        transform = transform.inverted()
    return transform.transform(flat.reshape(-1, 1)).ravel()


def _edges(ax: Axes, steps: np.ndarray) -> np.ndarray:
    """Cell edges around each step for ``pcolormesh``: midpoints between neighbours, measured
    on the axis' scale (so cells look even on a log axis too), half a gap at each end."""
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5], dtype=float)
    x = _scaled_x(ax, steps)
    mids = (x[:-1] + x[1:]) / 2.0
    edges = np.concatenate(([x[0] - (mids[0] - x[0])], mids, [x[-1] + (x[-1] - mids[-1])]))
    return _scaled_x(ax, edges, inverse=True)


def _draw_heatmap(fig: Figure, ax: Axes, heads: dict[tuple[int, int], _Series]) -> None:
    """Induction score per head over time: one row per head, ``L0H0`` at the top.

    Call after the axis' x scale is set: the cell edges depend on it.
    """
    steps = np.unique(np.concatenate([s for s, _ in heads.values()]))
    grid = np.full((len(heads), steps.size), np.nan)
    for row, (head_steps, values) in enumerate(heads.values()):
        grid[row, np.searchsorted(steps, head_steps)] = values
    finite = grid[np.isfinite(grid)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(float(finite.max()), vmin + 1e-6) if finite.size else 1.0
    mesh = ax.pcolormesh(
        _edges(ax, steps), np.arange(len(heads) + 1), np.ma.masked_invalid(grid),
        cmap="viridis", vmin=vmin, vmax=vmax, shading="flat",
    )
    ax.set_ylim(len(heads), 0)  # first head on top
    keys = list(heads)
    if len(keys) <= _MAX_HEAD_LABELS:
        ax.set_yticks(np.arange(len(keys)) + 0.5, [_head_label(*k) for k in keys], fontsize=7)
    else:
        firsts = [i for i, k in enumerate(keys) if i == 0 or k[0] != keys[i - 1][0]]
        ax.set_yticks(np.array(firsts) + 0.5, [f"L{keys[i][0]}" for i in firsts], fontsize=7)
    for i in range(1, len(keys)):
        if keys[i][0] != keys[i - 1][0]:
            ax.axhline(i, color="white", lw=1.0)
    ax.set_title("Induction score per head over time")
    ax.set_xlabel("step")
    fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.03, label="induction score")


def _finite_argmax(values: np.ndarray) -> int:
    """The index of the largest finite value (NaN and infinities, which another writer of the tag may
    log, are not a peak); the first of equal ones."""
    return int(np.argmax(np.where(np.isfinite(values), values, -np.inf)))


def _peak(data: _RunData) -> str:
    """Describe the peak induction score (and the head holding it, if per-head was logged)."""
    heads = data.heads("induction")
    summary = data.get("lens/induction/max")
    if summary is not None and np.isfinite(summary[1]).any():
        idx = _finite_argmax(summary[1])
        step, value = int(summary[0][idx]), float(summary[1][idx])
    elif heads:
        peaks = [
            (float(values[i]), int(steps[i]))
            for steps, values in heads.values()
            if np.isfinite(values).any()
            for i in (_finite_argmax(values),)
        ]
        if not peaks:
            return "peak induction score: n/a"
        value, step = max(peaks, key=lambda p: (p[0], -p[1]))
    else:
        return "no induction score logged"
    where = ""
    at_step = [
        (key, float(values[steps == step][0]))
        for key, (steps, values) in heads.items()
        if (steps == step).any() and np.isfinite(values[steps == step][0])
    ]
    if at_step:
        (layer, head), _ = max(at_step, key=lambda kv: kv[1])
        where = f" ({_head_label(layer, head)})"
    return f"peak induction score {value:.3f} at step {step}{where}"


def _errors(data: _RunData) -> str:
    """The fault count, from ``lens/errors``: the callback's running total, so its largest value."""
    errors = data.get("lens/errors")
    if errors is None or not np.isfinite(errors[1]).any() or np.nanmax(errors[1]) <= 0:
        return ""
    total = float(np.nanmax(errors[1]))
    return f"  |  probe errors logged: {total:g} (check the logs)"


def _log_x_threshold(data: _RunData) -> float | None:
    """The symlog ``linthresh`` if the x axis should be logarithmic, else ``None``.

    Logarithmic when the positive probe steps span more than two decades *and* are log-spaced
    (their median is below a tenth of the largest; a linear schedule's median is about half).
    """
    steps = data.probe_steps()
    positive = steps[steps > 0]
    if positive.size < 3 or positive[-1] / positive[0] <= _LOG_X_SPAN:
        return None
    if np.median(positive) > 0.1 * positive[-1]:
        return None
    return float(positive[0])


_LABEL_ROWS = {0: (0.98, "top", False, 0), 1: (0.98, "top", True, 0), 2: (0.02, "bottom", False, 0)}
"""Where a row of event labels sits: the axes fraction, which end of the vertical text is there,
whether it is right of its line, and how many points further right."""
_LABEL_ROWS_AT_LEFT_EDGE = {0: (0.98, "top", True, 0), 1: (0.02, "bottom", True, 0), 2: (0.98, "top", True, 10)}
"""The rows of labels whose group starts at the panel's left edge, all right of their line (left, they
would be cut off); the third a label's width (7-point text) further right than the first."""
_LABEL_ROWS_AT_RIGHT_EDGE = {0: (0.98, "top", False, 0), 1: (0.02, "bottom", False, 0), 2: (0.98, "top", False, -10)}
"""The mirror of `_LABEL_ROWS_AT_LEFT_EDGE` for a group that reaches the panel's right edge."""


def _label_rows(ax: Axes, steps: Sequence[int]) -> list[int]:
    """A row (0, 1, 2) per event label so labels of nearby events do not overprint."""
    x = _scaled_x(ax, steps)
    lo, hi = _scaled_x(ax, ax.get_xlim())
    width = abs(hi - lo) or 1.0
    rows: list[int] = []
    for i, xi in enumerate(x):
        close = i > 0 and abs(xi - x[i - 1]) < 0.04 * width
        rows.append((rows[-1] + 1) % 3 if close else 0)
    return rows


def _render(logdir: str, data: _RunData, events: Sequence[Event]) -> Figure:
    """Draw the report figure (not saved)."""
    panels = [
        p
        for p in (
            _panel_loss(data),
            _panel_head_family(data, "induction", "max", "Induction score", "score"),
            _panel_head_family(data, "prev_token", "max", "Previous-token score", "score"),
            _panel_head_family(data, "duplicate_token", "max", "Duplicate-token score", "score"),
            _panel_head_family(data, "attn_entropy", "mean", "Attention entropy (normalised)", "H / log(q + 1)"),
            _panel_logit_lens(data),
            _panel_single(
                data,
                [("lens/icl_score", "icl_score")],
                "In-context learning score (< 0: uses context)",  # a falling curve is learning: say so
                "late - early loss (nats)",
                zero_line=True,
            ),
            _panel_single(
                data,
                [
                    ("lens/repeated_loss", "repeated half"),
                    ("lens/repeated_loss/first_half", "first half"),
                ],
                "Loss on a repeated random sequence",
                "loss (nats)",
                zero_line=False,
            ),
            _panel_single(  # opt-in, or re-probed into a log of their own (lens-probe --probes k_composition)
                data,
                [(f"lens/{mode}_composition/max", f"{mode.upper()}-composition") for mode in ("k", "q", "v")],
                "Composition with an earlier layer's head (best head)",
                "composition score",
                zero_line=False,
            ),
            # opt-in too; per head, as induction: which heads copy matters, most heads of a trained model do
            _panel_head_family(data, "copying", "max", "Copying score (OV circuit's eigenvalue positivity)", "score"),
        )
        if p is not None
    ]
    heads = data.heads("induction")
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    heat_h = min(max(1.6, 0.16 * len(heads) + 0.8), 5.0) if heads else 0.0
    height = max(nrows, 1) * _PANEL_H + heat_h + 1.2
    fig = Figure(figsize=(_PANEL_W * 2, height), dpi=_DPI, layout="constrained")

    span = data.step_range()

    def logged(event: Event) -> bool:  # at a step inside the logged ones (another run's events file: not)
        return span is None or span[0] <= event.step <= span[1]

    lines = [logdir, _peak(data) + _errors(data)]
    not_drawn = _not_drawn(data)
    if not_drawn and (panels or heads):  # without panels, `_nothing_drawn` names them all in the page itself
        lines.append(not_drawn)
    if events:
        listed = ", ".join(f"{e.name} @ {e.step}" + ("" if logged(e) else " (outside the logged steps)")
                           for e in sorted(events, key=lambda e: e.step))
        lines.append(f"events: {listed}")
    fig.suptitle("\n".join(lines), fontsize=11, parse_math=False)  # a path's "$5 and $6" is no formula

    if not panels and not heads:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, _nothing_drawn(data), ha="center", va="center", parse_math=False)
        ax.set_axis_off()
        return fig

    ratios = [_PANEL_H] * nrows + ([heat_h] if heads else [])
    grid = fig.add_gridspec(len(ratios), ncols, height_ratios=ratios)
    linthresh = _log_x_threshold(data)
    all_axes: list[Axes] = []
    for i in range(len(panels) + (1 if heads else 0)):
        spec = grid[i // ncols, i % ncols] if i < len(panels) else grid[nrows, :]
        ax = fig.add_subplot(spec, sharex=all_axes[0] if all_axes else None)
        if linthresh is not None:
            ax.set_xscale("symlog", linthresh=linthresh)
        all_axes.append(ax)
    axes = all_axes[: len(panels)]
    heat_ax = all_axes[-1] if heads else None
    for ax, draw in zip(axes, panels, strict=True):
        draw(ax)
        for line in ax.get_lines():
            _mark_isolated_points(line)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    if heat_ax is not None:
        _draw_heatmap(fig, heat_ax, heads)
    if span is not None:
        lo, hi = span
        pad = 0.0 if linthresh is not None else 0.01 * max(hi - lo, 1)
        all_axes[0].set_xlim(lo - pad, hi + pad)  # the axes share x

    # events outside the logged steps (another run's events file) are listed in the title, not drawn: a
    # label far off the axis overflows the text rasteriser
    ordered = [e for e in sorted(events, key=lambda e: (e.step, e.name)) if logged(e)]
    colours = colormaps["tab10"]
    for ax in all_axes:
        for j, event in enumerate(ordered):
            colour = "red" if ax is heat_ax else colours(j % 10)
            ax.axvline(event.step, color=colour, ls="--", lw=1.0, alpha=0.8)
        ax.grid(alpha=0.25)
    # Name the event lines once, in the induction panel if there is one.
    titled = [ax for ax in axes if ax.get_title() == "Induction score"]
    label_ax = titled[0] if titled else all_axes[0]
    rows = _label_rows(label_ax, [e.step for e in ordered])
    to_axes = label_ax.transData + label_ax.transAxes.inverted()
    # a group of close events (rows 1, 2 follow a row 0) takes one table, so that its labels do not meet:
    # left of their lines, unless the group starts at the axes' left edge (an event at the first step),
    # where they would be clipped (report review), or right of them, unless it reaches the right edge
    groups: list[list[int]] = []
    for j, row in enumerate(rows):
        if row == 0 or not groups:
            groups.append([])
        groups[-1].append(j)
    tables: dict[int, dict[int, tuple[float, str, bool, int]]] = {}
    for group in groups:
        xs = [to_axes.transform((ordered[j].step, 0.0))[0] for j in group]
        table = (_LABEL_ROWS_AT_LEFT_EDGE if xs[0] < 0.04 else _LABEL_ROWS_AT_RIGHT_EDGE if max(xs) > 0.96
                 else _LABEL_ROWS)
        tables.update(dict.fromkeys(group, table))
    for j, (event, row) in enumerate(zip(ordered, rows, strict=True)):
        # rows: left of the line from the top down, right of it from the top down, left of it from the
        # bottom up, so that three labels at one step neither overprint nor leave the panel (a third row
        # written down from a third of the panel's height was cut off; report review, diff reviews); at
        # an edge all go away from it, the third a label's width further
        y, va, right, shift = tables[j][row]
        transform = label_ax.get_xaxis_transform()
        if shift:
            transform = offset_copy(transform, fig=fig, x=shift, units="points")
        label_ax.text(
            event.step, y, f" {event.name}",
            transform=transform, rotation=90, va=va, ha="left" if right else "right",
            fontsize=7, color=colours(j % 10), clip_on=True,
        )
    return fig


def _html(logdir: str, png_name: str, png: bytes, events: Sequence[Event]) -> str:
    """A standalone HTML page: the PNG embedded as base64 and a table of the events."""
    rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(cell))}</td>"
            for cell in (e.name, e.kind, e.tag, e.step, f"{e.value:.4g}", e.detail)
        )
        + "</tr>"
        for e in sorted(events, key=lambda e: (e.step, e.name))
    )
    table = (
        "<table>\n<tr><th>name</th><th>kind</th><th>tag</th><th>step</th><th>value</th>"
        f"<th>detail</th></tr>\n{rows}\n</table>"
        if events
        else "<p>No events detected.</p>"
    )
    encoded = base64.b64encode(png).decode("ascii")
    title = html.escape(f"lens report: {logdir}")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{title}</title>\n<style>body{{font-family:sans-serif}}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 6px}</style>"
        f"</head>\n<body>\n<h1>{title}</h1>\n"
        f"<img alt=\"{html.escape(png_name)}\" src=\"data:image/png;base64,{encoded}\">\n"
        f"<h2>Events</h2>\n{table}\n</body></html>\n"
    )


def make_report(
    logdir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    events: Sequence[Event] | None = None,
    prefix: str = "",
    events_run_id: str | None = None,
) -> Path:
    """Render a one-page PNG report of a run (and optionally an HTML page around it).

    Args:
        logdir: The run's TensorBoard log directory (read recursively, see
            :func:`~lens_callback.metrics.read_metrics`).
        output: Where to write. ``*.png``: the PNG only. ``*.html``: the PNG next to it (same
            name, ``.png`` suffix) and an HTML page embedding it (base64) with a table of the
            events. Parent directories are created; files are written atomically.
        events: The events to mark; ``None`` detects them from the logged scalars with
            :func:`~lens_callback.events.detect_events` and the default rules. Pass ``[]`` for no
            event lines.
        prefix: The ``TensorBoardLogger`` prefix the run was logged with, if any (see
            :func:`~lens_callback.metrics.read_metrics`).
        events_run_id: The run id of the run ``events`` are from (an ``events.json``'s ``run_id``),
            if known: a log whose points carry LensCallback run ids, none of them this one, is
            refused, since another run's events would be marked on this run's curves.

    Returns:
        The path written: ``output`` itself.

    Raises:
        FileNotFoundError: If ``logdir`` does not exist or holds no event file.
        ValueError: If ``logdir`` is ``""``, ``output`` does not end with ``.png`` or ``.html``, the run was logged
            with a logger prefix that ``prefix`` does not name (the message names it), ``logdir``
            holds no training or lens scalars yet, it holds several runs (`_check_one_run`), or
            ``events_run_id`` is not the run's.
    """
    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".html"):
        raise ValueError(f"output must end with .png or .html, got {str(output)!r}")
    points = _read_points(logdir, tags=_REPORT_TAGS, prefix=prefix)
    if points.empty:
        _check_no_prefix_missed(logdir, prefix)
        raise ValueError(f"{logdir} holds no training or lens scalars yet (TensorBoard's writer flushes its "
                         f"events every 2 minutes by default: a run that just started may not have written any; "
                         f"one that failed before its first logged step, e.g. in its set-up, wrote none)")
    points = _without_evaluation_logs(points)
    _check_one_run(logdir, points)
    logged_ids = sorted(set(points["run_id"]) - {""})
    if events_run_id and logged_ids and events_run_id not in logged_ids:
        raise ValueError(f"the events given are run {events_run_id[:8]}'s, but {logdir} holds run "
                         f"{logged_ids[0][:8]}'s points: pass the events.json of that run's snapshots")
    df = latest_per_step(points)
    if events is None:
        events = detect_events(df)
    fig = _render(str(logdir), _load(df), list(events))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    png = buffer.getvalue()
    make_dirs(out.parent, f"cannot write {out}")
    png_path = out if suffix == ".png" else out.with_suffix(".png")
    _write(png_path, png)
    if suffix == ".html":
        page = _html(str(logdir), png_path.name, png, list(events))
        _write(out, page.encode("utf-8"))
    log.info("wrote lens report %s", out)
    return out


def _write(path: Path, payload: bytes) -> None:
    """`atomic_write`, whose failure names ``path``: the temporary file's rename named that file alone
    (``[Errno 21] Is a directory: 'out/.report.png.1f0c...tmp' -> 'out/report.png'``), one the user never
    named (report review)."""
    try:
        atomic_write(path, payload)
    except OSError as err:
        raise type(err)(f"cannot write {path}: {err.strerror or err}") from err


def _mark_isolated_points(line: Line2D) -> None:
    """Draws a marker on each finite point of ``line`` with no finite neighbour (a tag logged once, or
    the last values before a run diverged to NaN), which a line alone would not show."""
    if line.get_marker() not in ("None", "", None):
        return
    finite = np.isfinite(np.asarray(line.get_ydata(), dtype=float))
    if not finite.any():
        return
    before = np.concatenate([[False], finite[:-1]])
    after = np.concatenate([finite[1:], [False]])
    isolated = np.flatnonzero(finite & ~before & ~after)
    if isolated.size:
        line.set_marker("o")
        line.set_markevery(isolated.tolist())


def _without_evaluation_logs(points: pd.DataFrame) -> pd.DataFrame:
    """``points`` without those of the event files that hold no training or lens scalar and no run id
    where another file holds some: the log of a ``validate`` (or ``test``) with the run's logger, a
    version of its own whose ``val/loss`` sits at step 0, which `_check_one_run` took for a second run
    starting there and the report would have joined to the run's curve (CLI review). ``points``:
    `read_all_points`'s frame with ``run_ids=True``."""
    if points.empty:
        return points
    training = points["tag"].str.startswith(("train/", "lens/")) | (points["run_id"] != "")
    trained_files = set(points.loc[training, "file"])
    if not trained_files:
        return points  # evaluations only (or tags chosen without training ones): nothing to tell apart
    return points[points["file"].isin(trained_files)]


def _check_one_run(logdir: str | os.PathLike[str], points: pd.DataFrame) -> None:
    """Raises if ``logdir`` holds several runs.

    `read_metrics` keeps one value per tag and step across all event files under a directory, which
    joins a run resumed into a new ``version_k`` to its first part, but would also stitch two runs
    into curves neither run drew (``runs/default`` after two ``make demo``, or two runs written into
    one directory with a fixed logger ``version``). `LensCallback` writes its ``run_id`` (kept across a
    resume by its checkpoint state) into the log with every fit's first probe step (`metrics.RUN_ID_TAG`), so:

    * points under two run ids are two runs, wherever they were written;
    * an event file whose marked points are all one run's: its unmarked points (the training scalars
      logged before the fit's first probe step) are that run's too;
    * for logs without run ids (written without the callback or by an earlier version), each
      event-file directory counts as a part, and parts that each start at the earliest logged step
      are separate runs (two of them in one directory: a run logged without the callback into a
      marked run's fixed ``version``); a part that starts later is taken for a resumed part (steps
      alone cannot tell it from a fresh run with another cadence or ``at_start=False``).

    ``points`` is `read_all_points`'s frame with its ``run_id`` and ``file`` columns (``run_ids=True``).
    """
    if points.empty:
        return
    ids = points["run_id"]
    marked = points[ids != ""].groupby("file")["run_id"].unique()
    only = {name: found[0] for name, found in marked.items() if len(found) == 1}
    keys = ids.where(ids != "", points["file"].map(only)).fillna("")
    if len(set(keys) - {""}) > 1:
        marked_points = points.assign(key=keys)[keys != ""]
        where = {key: sorted(set(group["run"])) for key, group in marked_points.groupby("key")}
        known = sorted(where, key=lambda key: (where[key], marked_points.loc[marked_points["key"] == key, "step"].min()))
        unmarked = sorted(set(points.loc[keys == "", "run"]))  # logs without ids: other runs, maybe
        raise ValueError(f"{logdir} holds {len(known)} runs (LensCallback run ids: {listed_runs(where, known)}): a "
                         f"report shows one run; {_runs_apart_hint(logdir, where, known, unmarked)}")
    parts = keys.where(keys != "", "dir:" + points["run"])
    labels = {key: (sorted(set(points.loc[parts == key, "run"]))[0] if not key.startswith("dir:") else key[4:])
              for key in set(parts)}
    starts = points.groupby(parts)["step"].min().rename(index=labels)
    first = int(starts.min())
    fresh = sorted(starts.index[starts == first])
    if len(fresh) > len(set(fresh)):  # a log without run ids beside a run's in one directory
        shared = sorted({run for run in fresh if fresh.count(run) > 1})
        raise ValueError(f"{logdir} holds {len(fresh)} runs that each start at step {first}, some logged without "
                         f"LensCallback's run id: a report shows one run; runs were written into one directory "
                         f"({', '.join(map(repr, shared))}; a fixed logger version?): give each run a directory of "
                         f"its own")
    if len(fresh) > 1:
        shown = ", ".join(repr(run) for run in fresh[:5]) + (f", ... ({len(fresh) - 5} more)" if len(fresh) > 5 else "")
        resumed = sorted((run, int(step)) for run, step in starts.items() if step > first)
        parts_note = ""
        if resumed:  # a resumed part belongs to one of the runs, which cannot be told from the steps alone
            listed = ", ".join(f"{run!r} from step {step}" for run, step in resumed[:5])
            parts_note = (f"; it also holds parts that start later, resumed runs ({listed}): to report a run with "
                          f"its resumed part, move the two into a directory of their own and pass that")
        raise ValueError(f"{logdir} holds {len(fresh)} runs that each start at step {first} ({shown}): a report shows "
                         f"one run; pass its directory, e.g. {Path(logdir) / fresh[-1]}{parts_note}")


def _runs_apart_hint(logdir: str | os.PathLike[str], where: Mapping[str, list[str]], known: Sequence[str],
                     unmarked: Sequence[str]) -> str:
    """What to do about a log directory holding the runs ``known`` (run id -> its event-file directories
    in ``where``; ``unmarked``: directories of logs without run ids): a directory to pass that holds one
    run alone, never the log directory itself or a parent of another run's events."""
    counts = Counter(run for key in known for run in where[key])
    shared = sorted(run for run, n in counts.items() if n > 1)  # directories holding parts of two runs
    if shared:
        return (f"runs were written into one directory ({', '.join(map(repr, shared))}; a fixed logger version?): "
                f"give each run a directory of its own")

    def below(key: str, dirs: Sequence[str]) -> list[str]:  # those of dirs in or under the run's
        return [o for o in dirs if any(d == "." or o == d or o.startswith(f"{d}/") for d in where[key])]

    def others(key: str) -> list[str]:
        return [d for other in known if other != key for d in where[other]]

    apart = sorted((where[key] for key in known if not below(key, [*others(key), *unmarked])), key=len)
    if apart and len(apart[0]) == 1:
        return f"pass one run's directory, e.g. {Path(logdir) / apart[0][0]}"
    if apart:
        return (f"to report a run with its resumed parts, move them ({', '.join(map(repr, apart[0]))}) into a "
                f"directory of their own and pass that")
    # a run apart from the others but for logs without ids in its directories: name those
    hidden = [(key, below(key, unmarked)) for key in known if not below(key, others(key))]
    if hidden:
        key, logs = hidden[0]
        return (f"{', '.join(map(repr, logs))} holds logs without run ids inside run {key[:8]}'s "
                f"{', '.join(map(repr, where[key]))}: move them out of it, then pass its directory")
    return "move each run's directories into a directory of their own and pass that"


def _read_points(logdir: str | os.PathLike[str], tags: Sequence[str], prefix: str) -> pd.DataFrame:
    """`read_all_points` with run ids; a directory without event files that holds snapshots (a W&B run's, whose
    scalars went to W&B) is told how to get events from them, where "no TensorBoard event file" said no more."""
    try:
        return read_all_points(logdir, tags=tags, prefix=prefix, run_ids=True)
    except FileNotFoundError as err:
        roots = sorted({done.parent.parent for done in Path(logdir).rglob(f"step-*/{COMPLETE_FILE}")
                        if STEP_DIR_RE.fullmatch(done.parent.name)})
        if not roots:
            raise
        more = f" and {len(roots) - 1} more" if len(roots) > 1 else ""
        own = roots[0] / "events.json"  # the run's own events, which the report then marks
        then = f"lens-report OUT --events-json {own}" if own.is_file() else "lens-report OUT"
        raise FileNotFoundError(f"{err}, but it holds snapshots ({roots[0]}{more}): `lens-probe {roots[0]} --logdir OUT` "
                                f"writes their probe values as TensorBoard events, at the original steps, for `{then}`") from None


def _check_no_prefix_missed(logdir: str | os.PathLike[str], prefix: str = "") -> None:
    """Raises if nothing was read under ``prefix`` but ``logdir`` holds lens scalars under another
    logger prefix; the message names what is there."""
    with warnings.catch_warnings():  # only the tag names are read here: several runs are the caller's to refuse
        warnings.simplefilter("ignore")
        found = read_metrics(logdir, tags=["lens/*", f"*{LOGGER_JOIN_CHAR}lens/*"])
    prefixes = {str(tag)[: str(tag).index("lens/")].removesuffix(LOGGER_JOIN_CHAR): str(tag) for tag in found["tag"]}
    if not prefixes or prefix in prefixes:  # nothing logged, or only the wanted tags are missing
        return
    name, example = sorted(prefixes.items())[0]
    if not prefix:
        raise ValueError(f"{logdir} holds no unprefixed scalars, but was logged with a logger prefix "
                         f"({example!r}): pass prefix={name!r} (lens-report --prefix {name})")
    hint = f"pass prefix={name!r} (lens-report --prefix {name})" if name else "leave the prefix out"
    raise ValueError(f"{logdir} holds no scalars under the logger prefix {prefix!r}, but holds e.g. "
                     f"{example!r}: {hint}")


def compare_runs(
    runs: Mapping[str, str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    tags: Sequence[str] = ("lens/induction/max", "val/loss"),
    prefix: str = "",
) -> Path:
    """One PNG comparing several runs, one panel per tag, one line per run.

    Used for the README's 1-layer vs 2-layer contrast. Missing tags leave an empty panel.

    Args:
        runs: Label -> the run's TensorBoard log directory.
        output: A ``.png`` path (written atomically).
        tags: The scalar tags to compare.
        prefix: The ``TensorBoardLogger`` prefix the runs were logged with, if any.

    Raises:
        FileNotFoundError: If a log directory holds no event file.
        ValueError: If ``runs`` is empty, a label starts with ``_`` (matplotlib leaves such labels
            out of the legend), a log directory is ``""``, or ``output`` is not a ``.png``.
    """
    if not runs:
        raise ValueError("runs must name at least one run")
    hidden = [label for label in runs if str(label).startswith("_")]
    if hidden:
        raise ValueError(f"run labels must not start with '_' (matplotlib leaves them out of the legend), got {hidden}")
    empty = [label for label, logdir in runs.items() if not os.fspath(logdir)]
    if empty:
        raise ValueError(f"run(s) {empty}: the log directory is empty (\"\" would read the current directory)")
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"output must end with .png, got {str(output)!r}")
    frames = {}
    for label, logdir in runs.items():
        points = _read_points(logdir, tags=list(tags), prefix=prefix)
        try:
            if points.empty:
                _check_no_prefix_missed(logdir, prefix)
            points = _without_evaluation_logs(points)
            _check_one_run(logdir, points)
        except ValueError as err:
            raise ValueError(f"run {label!r}: {err}") from None
        frames[label] = latest_per_step(points)
    fig = Figure(figsize=(5.5 * len(tags), 4.0), layout="constrained")
    axes = fig.subplots(1, len(tags), squeeze=False)[0]
    for ax, tag in zip(axes, tags):
        for label, df in frames.items():
            rows = df[df["tag"] == tag]
            if len(rows):
                ax.plot(rows["step"], rows["value"], marker=".", markersize=3, label=_literal(label))
        ax.set_title(tag, parse_math=False)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    make_dirs(out.parent, f"cannot write {out}")
    _write(out, buffer.getvalue())
    return out


def _read_events_json(path: Path) -> tuple[list[Event], str | None]:
    """Read events from JSON: a list of ``Event.to_dict()`` or ``{"events": [...]}``, with the ``run_id``
    the callback's ``events.json`` names (``None`` where there is none).

    Extra keys per event (the callback's ``events.json`` adds ``snapshot_before``/``_after``)
    are ignored.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    run_id = None
    if isinstance(data, dict):
        run_id = data.get("run_id") if isinstance(data.get("run_id"), str) else None
        data = data.get("events")
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError(f"expected a list of event objects (or {{'events': [...]}}) in {str(path)!r}")
    return [Event.from_dict(item) for item in data], run_id


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lens-report LOGDIR -o report.png [--events-json PATH]``.

    Args:
        argv: Command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        0 on success, 2 for a missing log directory, no event file, no scalars, several runs in
        one directory, an unreadable events file or an unsupported output suffix (argparse itself
        exits with 2 on bad usage).
    """
    parser = argparse.ArgumentParser(
        prog="lens-report",
        description="Plot a lens-callback run's TensorBoard scalars into one PNG (or HTML) page.",
    )
    parser.add_argument("logdir", nargs="?", help="the run's TensorBoard log directory (searched recursively)")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="LABEL=LOGDIR",
        help="instead of a report, compare runs (induction max and val loss), one line per run; repeatable",
    )
    parser.add_argument(
        "-o", "--output", default="report.png",
        help="output file, .png or .html (HTML embeds the PNG and lists the events; the PNG is also "
        "written beside it, under the same name; --compare writes .png only); an existing file is replaced; "
        "default: %(default)s",
    )
    parser.add_argument(
        "--events-json", type=Path, default=None, metavar="PATH",
        help="mark these events: a JSON list of Event dicts, or {\"events\": [...]} such as the "
        "callback's <snapshot_dir>/events.json; default: LOGDIR/snapshots/events.json (the run's own, "
        "with its own rules, for snapshot_dir='auto') if there is one, else events detected from the "
        "logged scalars with the default rules",
    )
    parser.add_argument(
        "--prefix", default="", metavar="PREFIX",
        help="the TensorBoardLogger prefix the run(s) were logged with (tags PREFIX-lens/...), if any",
    )
    args = parser.parse_args(None if argv is None else list(argv))

    def fail(message: str) -> int:
        sys.stderr.write(f"lens-report: error: {message}\n")
        return 2

    if args.compare:
        if args.logdir is not None:
            return fail(f"give either LOGDIR ({args.logdir}) or --compare LABEL=LOGDIR ..., not both")
        pairs = [item.split("=", 1) for item in args.compare]
        if any(len(pair) != 2 or not pair[0] or not pair[1] for pair in pairs):
            return fail("--compare takes LABEL=LOGDIR, both non-empty")
        if args.events_json is not None:
            return fail("--events-json marks the events of a report (LOGDIR); --compare draws none")
        labels = [label for label, _ in pairs]
        if len(set(labels)) != len(labels):
            return fail(f"--compare labels must differ, got {sorted({lb for lb in labels if labels.count(lb) > 1})} twice")
        try:
            path = compare_runs(dict(pairs), args.output, prefix=args.prefix)
        except (OSError, ValueError) as err:
            return fail(str(err))
        sys.stdout.write(f"wrote {path}\n")
        return 0
    if not args.logdir:  # "" too (an unset shell variable), which would read the current directory
        return fail("give a LOGDIR (or --compare LABEL=LOGDIR ...)")
    if not Path(args.logdir).exists():
        return fail(f"log directory not found: {args.logdir}")
    events: list[Event] | None = None
    events_run_id: str | None = None
    events_json = args.events_json
    source = None  # which events the report marks, said once it is written (not before an error)
    if events_json is None:
        events_json = _runs_own_events(Path(args.logdir))
        source = (f"events from {events_json}\n" if events_json is not None else
                  "events detected from the scalars with the default rules (no snapshots/events.json; "
                  "--events-json names one)\n")
    if events_json is not None:
        try:
            events, events_run_id = _read_events_json(events_json)
        except (OSError, ValueError, TypeError, RecursionError) as err:  # json.JSONDecodeError is a ValueError
            return fail(f"cannot read events from {events_json}: {err}")
    try:
        path = make_report(args.logdir, args.output, events=events, prefix=args.prefix, events_run_id=events_run_id)
    except (OSError, ValueError) as err:
        return fail(str(err))
    path = Path(path)
    written = [path.with_suffix(".png"), path] if path.suffix.lower() == ".html" else [path]
    sys.stdout.write(source or "")
    sys.stdout.write(f"wrote {' and '.join(map(str, written))}\n")
    return 0


def _runs_own_events(logdir: Path) -> Path | None:
    """The callback's ``events.json`` (``snapshot_dir="auto"``): ``LOGDIR/snapshots/events.json``, or for
    a directory holding a run and the ``version_k`` its resume wrote, the one in a subdirectory (the
    run's first part writes it), if there is exactly one."""
    own = logdir / "snapshots" / "events.json"
    if own.is_file():
        return own
    below = sorted(logdir.glob("*/snapshots/events.json"))
    return below[0] if len(below) == 1 else None


if __name__ == "__main__":
    raise SystemExit(main())
