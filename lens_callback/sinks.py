"""Turning probe results into logged values: scalar tags, heatmap images, the custom-scalars layout.

Tag scheme (all under ``lens/``):

* per-head probes (``[n_layers, n_heads]``): ``lens/{probe}/max``, ``lens/{probe}/mean`` and, unless
  switched off, ``lens/{probe}/L{layer}H{head}``; one heatmap image ``lens/{probe}/heatmap``;
* per-layer vectors (logit lens, ``n_layers + 1`` entries, the last after the final block):
  ``lens/logit_lens/L{layer}/{loss,kl,top1}``;
* scalars: ``lens/{name}`` (``lens/icl_score``, ``lens/repeated_loss``, ...).

A probe step goes to a TensorBoard writer as one event (`write_summary`): one ``Summary`` proto
holding every scalar and heatmap, the form TensorBoard's own readers iterate value by value.
``SummaryWriter.add_scalar`` writes one event per value through the writer's 10-slot queue; with
~60 values a step the training thread waited on the writer thread at every slot (4 ms per probe
step on 2 CPU cores, vs 0.05 ms for the one event: ``bench/run.py``, row "of which logging").
"""

from __future__ import annotations

import io
import re
from functools import cache, lru_cache
from typing import Any, Collection, Iterable, Mapping

import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

PREFIX = "lens"


def packed(results: Mapping[str, Tensor]) -> Tensor:
    """Every result flattened into one float32 vector on their device, in ``results``' order: what
    `to_host` copies (``bench/gpu_path.py`` counts its operators)."""
    return torch.cat([tensor.detach().float().reshape(-1) for tensor in results.values()])


def to_host(results: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Moves every result to the host in one transfer (one synchronisation per probe step)."""
    if not results:
        return {}
    host = packed(results).cpu().numpy()
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, tensor in results.items():
        size = tensor.numel()
        out[name] = host[offset : offset + size].reshape(tuple(tensor.shape))
        offset += size
    return out


def scalar_tags(results: Mapping[str, np.ndarray], per_head: Iterable[str], per_head_scalars: bool = True) -> dict[str, float]:
    """Flattens host results into ``{tag: value}`` following the module's tag scheme.

    The tags of a result are the same string objects at every call (`_tags`): the callback keeps each
    step's dict in its history, where fresh strings cost 80.5 KiB a probe step for 12 x 12 heads
    against 31.4 KiB shared."""
    per_head = set(per_head)
    scalars: dict[str, float] = {}
    for name, value in results.items():
        tags = _result_tags(name, value, per_head, per_head_scalars)
        if name in per_head and value.ndim == 2:
            scalars[tags[0]] = float(np.max(value)) if value.size else float("nan")
            scalars[tags[1]] = float(np.mean(value)) if value.size else float("nan")
            values = value.reshape(-1).tolist() if per_head_scalars else []
        elif value.ndim == 0 or value.size == 1:
            values = [value.reshape(()).item()]
        else:
            values = value.reshape(-1).tolist()
        for tag, v in zip(tags[-len(values):] if values else (), values):
            scalars[tag] = float(v)
    return scalars


def _result_tags(name: str, value: np.ndarray, per_head: Collection[str], per_head_scalars: bool) -> tuple[str, ...]:
    """Every tag `scalar_tags` writes for the result ``name``."""
    if name in per_head and value.ndim == 2:
        return _tags(name, "heads" if per_head_scalars else "head-stats", value.shape)
    if value.ndim == 0 or value.size == 1:
        return _tags(name, "scalar", ())
    return _tags(name, "array", value.shape)


def colliding_tags(results: Mapping[str, np.ndarray], per_head: Iterable[str],
                   per_head_scalars: bool = True) -> dict[str, list[str]]:
    """The tags `scalar_tags` would write for more than one result, each with the results writing it.

    Only a probe's own results can collide (every tag starts ``lens/{probe}/``), e.g. a key ``mean``
    beside a per-head main result (``lens/{probe}/mean``, the heads' mean), ``L0H1`` beside it, ``L1``
    beside a vector or ``0_1`` beside a matrix; `scalar_tags` kept the later value, unseen. A key
    ``heatmap`` beside a per-head result takes its heatmap image's tag (``lens/{probe}/heatmap``),
    whose image TensorBoard then dropped: the tag's first value, the scalar, made it a scalar tag.
    """
    per_head = set(per_head)
    by_probe: dict[str, list[str]] = {}
    for name in results:
        by_probe.setdefault(name.partition("/")[0], []).append(name)
    writers: dict[str, list[str]] = {}
    for names in by_probe.values():
        if len(names) < 2:  # one result's tags are distinct
            continue
        for name in names:
            for tag in _result_tags(name, results[name], per_head, per_head_scalars):
                writers.setdefault(tag, []).append(name)
            if name in per_head and results[name].ndim == 2:  # its heatmap image (the callback's `heatmaps`)
                writers.setdefault(heatmap_tag(name), []).append(name)
    return {tag: names for tag, names in writers.items() if len(names) > 1}


def heatmap_tag(name: str) -> str:
    """The tag of the per-head result ``name``'s heatmap image (`LensCallback`'s ``heatmaps``)."""
    return f"{PREFIX}/{name}/heatmap"


@lru_cache(maxsize=1024)
def _tags(name: str, kind: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    """The tags `scalar_tags` gives a result ``name`` of ``shape``, in the order of its values (row
    major), after ``/max`` and ``/mean`` for per-head results (``kind`` ``"heads"``, or
    ``"head-stats"`` without the per-head scalars); cached, so each is one string object."""
    base = f"{PREFIX}/{name}"
    if kind in ("heads", "head-stats"):
        stats = (f"{base}/max", f"{base}/mean")
        if kind == "head-stats":
            return stats
        return stats + tuple(f"{base}/L{layer}H{head}" for layer in range(shape[0]) for head in range(shape[1]))
    if kind == "scalar":
        return (base,)
    if len(shape) == 1:
        probe, _, key = name.partition("/")
        return tuple(f"{PREFIX}/{probe}/L{layer}/{key}" if key else f"{base}/L{layer}" for layer in range(shape[0]))
    return tuple(f"{base}/" + "_".join(map(str, index)) for index in np.ndindex(shape))


@cache
def _viridis() -> np.ndarray:
    """matplotlib's viridis as a ``[256, 3]`` uint8 table (its 256 listed colours)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return (cmap(np.arange(cmap.N))[:, :3] * 255).round().astype(np.uint8)


def _heatmap_indices(values: np.ndarray, vmin: float, vmax: float) -> tuple[np.ndarray, np.ndarray]:
    """Viridis table indices of ``values`` on the fixed ``vmin``..``vmax`` scale, and the NaN mask."""
    v = np.asarray(values, dtype=np.float64)
    norm = np.clip(np.nan_to_num((v - vmin) / max(vmax - vmin, 1e-12)), 0.0, 1.0)
    n = len(_viridis())
    return np.minimum((norm * n).astype(np.int64), n - 1), np.isnan(v)


def _heatmap_rgb(index: np.ndarray, nan: np.ndarray, cell: int) -> np.ndarray:
    """The viridis colours of ``index``, NaN cells grey, each cell ``cell`` x ``cell`` pixels."""
    img = _viridis()[index]
    img[nan] = 128  # grey: round(0.5 * 255)
    return _cells(img, cell)


def _cells(img: np.ndarray, cell: int) -> np.ndarray:
    return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)


HEATMAP_CELL = 24
"""Pixels per head (a square) in the heatmap images, TensorBoard's and W&B's."""


def heatmap_image(values: np.ndarray, cell: int = HEATMAP_CELL, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """A ``[layers*cell, heads*cell, 3]`` uint8 viridis image of a ``[layers, heads]`` array.

    Rows are layers (layer 0 at the top), columns heads. NaN cells are grey. The colour scale is
    fixed (``vmin``..``vmax``) so images of different steps compare. Colours are matplotlib's
    (``colormaps["viridis"](norm)``: the table entry ``min(int(norm * 256), 255)``), looked up
    in a cached table rather than through the colormap call, which costs 0.25 ms per image.
    """
    return _heatmap_rgb(*_heatmap_indices(values, vmin, vmax), cell)


PNG_COMPRESS_LEVEL = 1
"""zlib level of the heatmap PNGs: 0.27 against 0.55 ms per GPT-2-sized ``[12, 12]`` map at PIL's
default level 6 (1.1 ms of a GPT-2 probe step's four maps, logged after its one sync), for 2.7
against 1.6 KB; the default model's ``[2, 4]`` maps take 0.13 ms either way (ninth session)."""


def _heatmap_pil(values: np.ndarray, cell: int, vmin: float, vmax: float) -> Any:
    """`heatmap_image` as a PIL image: 8-bit with the viridis table as its palette (a third of the bytes
    to encode), or RGB where a NaN cell needs the grey the palette has no room for."""
    from PIL import Image

    index, nan = _heatmap_indices(values, vmin, vmax)
    if nan.any():
        return Image.fromarray(_heatmap_rgb(index, nan, cell), mode="RGB")
    image = Image.fromarray(_cells(index.astype(np.uint8), cell), mode="P")
    image.putpalette(_viridis().tobytes())
    return image


def heatmap_png(values: np.ndarray, cell: int = HEATMAP_CELL, vmin: float = 0.0, vmax: float = 1.0) -> Summary.Image:
    """`heatmap_image` as the PNG ``Summary.Image`` TensorBoard shows: the same pixels.

    Encoded as an 8-bit PNG whose palette is the viridis table: one byte per pixel instead of
    three and no float round trips, 0.2 ms against 1.1 ms for ``SummaryWriter.add_image``'s
    encoder on a GPT-2-sized ``[12, 12]`` map (288 x 288 pixels). zlib's fastest level
    (`PNG_COMPRESS_LEVEL`). The palette has no room for the grey of NaN cells, so a map with NaN
    is encoded as RGB.
    """
    image = _heatmap_pil(values, cell, vmin, vmax)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return Summary.Image(height=image.height, width=image.width, colorspace=3,
                         encoded_image_string=buffer.getvalue())


EVENT_COLUMNS = ("step", "event", "detail")
"""The columns of the table of events a W&B run gets at a probe step (`wandb_media`)."""


def wandb_media(heatmaps: Mapping[str, tuple[np.ndarray, tuple[float, float]]],
                events: Iterable[tuple[int, str, str]], step: int | None = None) -> dict[str, Any]:
    """What a W&B run gets beside a probe step's scalars, in the same ``wandb.Run.log`` row: each
    ``[layers, heads]`` result of ``heatmaps`` (with its colour scale's ``(vmin, vmax)``) as a
    ``wandb.Image`` under `heatmap_tag` (the pixels of `heatmap_image`, as TensorBoard gets them),
    captioned ``step {step}`` when a ``step`` is given, and the step's events as a ``wandb.Table`` under
    ``lens/events`` (columns `EVENT_COLUMNS`; TensorBoard gets them as text). Imports ``wandb``, which a
    ``WandbLogger`` has imported already.

    The caption names the optimizer step: W&B's media panels step through the run's own row counter
    (``_step``, which every ``log`` call advances, Lightning's rows too), not ``trainer/global_step``."""
    import wandb

    caption = None if step is None else f"step {step}"
    # a palette image: W&B encodes what it is given at PIL's default level, 3.7 ms per GPT-2-sized RGB map
    media: dict[str, Any] = {heatmap_tag(name): wandb.Image(_heatmap_pil(values, HEATMAP_CELL, *span),
                                                            caption=caption)
                             for name, (values, span) in heatmaps.items()}
    rows = [[step, name, detail] for step, name, detail in events]
    if rows:
        media[f"{PREFIX}/events"] = wandb.Table(columns=list(EVENT_COLUMNS), data=rows)
    return media


def write_summary(
    writer: Any,
    step: int,
    scalars: Mapping[str, float],
    images: Mapping[str, np.ndarray | Summary.Image] | None = None,
    prefix: str = "",
) -> None:
    """Write ``scalars`` and HWC uint8 ``images`` to a ``SummaryWriter`` as one event at ``step``.

    Tags and values are what ``writer.add_scalar(tag, value, step)`` / ``writer.add_image(tag,
    image, step, dataformats="HWC")`` write (``simple_value`` scalars, PNG images); TensorBoard
    and `lens_callback.metrics.read_metrics` read them the same way.

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's), as returned by
            Lightning's ``TensorBoardLogger.experiment``.
        step: The global step.
        scalars: ``{tag: value}``.
        images: ``{tag: [H, W, 3] uint8 array}`` (encoded as ``add_image`` does) or an encoded
            ``Summary.Image`` (e.g. from `heatmap_png`).
        prefix: Put before every tag (``f"{prefix}{tag}"``), e.g. a logger's prefix and separator.
    """
    from torch.utils.tensorboard.summary import image

    values = [Summary.Value(tag=f"{prefix}{tag}", simple_value=float(v)) for tag, v in scalars.items()]
    for tag, img in (images or {}).items():
        if isinstance(img, Summary.Image):
            values.append(Summary.Value(tag=f"{prefix}{tag}", image=img))
        else:
            values.extend(image(f"{prefix}{tag}", img, dataformats="HWC").value)
    writer._get_file_writer().add_summary(Summary(value=values), step)


def custom_scalars_layout(per_head_probes: Iterable[str], scalar_names: Iterable[str], prefix: str = "",
                          unknown: Iterable[str] = (), per_head_lines: bool = True,
                          logit_lens: bool = True, vectors: Mapping[str, int] | None = None) -> dict[str, Any]:
    """TensorBoard's custom-scalars layout: one chart per probe, with per-head lines together.

    ``logit_lens``: whether the logit lens runs (its per-layer charts; without it they would stay
    empty). A category with no chart is left out.

    ``vectors``: other results with more than one entry, by name, and their number of dimensions:
    one chart each, of the tags `scalar_tags` gives them (``lens/{probe}/L{l}`` and
    ``lens/{probe}/L{l}/{key}`` for a vector, ``lens/{name}/{i}_{j}`` otherwise).

    ``unknown``: probes that are not per-head, whose result names are not known (they failed at the
    step the layout is written): one chart each for the probe's tag and every tag below it (its
    sub-results, vectors and matrices alike).
    ``per_head_lines``: whether the per-head tags are logged (``per_head_scalars``); without them a
    per-head probe gets its max / mean chart only, not a chart that stays empty.

    ``prefix`` is put before every tag pattern (a logger's prefix, as in `write_summary`) and every
    category title. TensorBoard reads every pattern as a regular expression that need only match a
    tag's start (``re.match``), so each is escaped and anchored at its end: ``lens/icl_score`` would
    also chart ``lens/icl_score/early_loss``, and a prefix such as ``run+1`` would match nothing.
    """
    base = re.escape(f"{prefix}{PREFIX}")

    def tag(*parts: str) -> str:
        return "/".join((base, *map(re.escape, parts))) + "$"

    probes: dict[str, Any] = {}
    for name in sorted(per_head_probes):
        if per_head_lines:
            probes[f"{name} per head"] = ["Multiline", [rf"{base}/{re.escape(name)}/L\d+H\d+$"]]
        probes[f"{name} max / mean"] = ["Multiline", [tag(name, "max"), tag(name, "mean")]]
    logit = {
        f"logit lens {key}": ["Multiline", [rf"{base}/logit_lens/L\d+/{key}$"]] for key in ("loss", "kl", "top1")
    } if logit_lens else {}
    others = {name: ["Multiline", [tag(name)]] for name in sorted(scalar_names)}
    others.update({name: ["Multiline", [rf"{base}/{re.escape(name)}(/.+)?$"]] for name in sorted(unknown)})
    for name, ndim in sorted((vectors or {}).items()):
        probe, _, key = name.partition("/")
        if ndim == 1:
            others[f"{name} per layer"] = ["Multiline", [
                rf"{base}/{re.escape(probe)}/L\d+{'/' + re.escape(key) if key else ''}$"]]
        else:
            others[f"{name} entries"] = ["Multiline", [rf"{base}/{re.escape(name)}/\d+(_\d+)+$"]]
    others["errors"] = ["Multiline", [tag("errors")]]
    # TensorBoard merges the runs' layouts by category title: a prefix in the title keeps a prefixed run's
    # charts apart from an unprefixed run's (else every chart title showed twice, each copy empty for one run)
    categories = {"lens: heads": probes, "lens: logit lens": logit, "lens: scores": others}
    return {f"{prefix}{title}": charts for title, charts in categories.items() if charts}
