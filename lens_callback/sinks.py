"""Turning probe results into logged values: scalar tags, heatmap images, the custom-scalars layout.

Tag scheme (all under ``lens/``):

* per-head probes (``[n_layers, n_heads]``): ``lens/{probe}/max``, ``lens/{probe}/mean`` and, unless
  switched off, ``lens/{probe}/L{layer}H{head}``; one heatmap image ``lens/{probe}/heatmap``;
* per-layer vectors (logit lens, ``n_layers + 1`` entries, the last after the final block):
  ``lens/logit_lens/L{layer}/{loss,kl,top1}``;
* scalars: ``lens/{name}`` (``lens/icl_score``, ``lens/repeated_loss``, ...).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

PREFIX = "lens"


def to_host(results: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Moves every result to the host in one transfer (one synchronisation per probe step)."""
    if not results:
        return {}
    names = list(results)
    flat = [results[n].detach().float().reshape(-1) for n in names]
    host = torch.cat(flat).cpu().numpy()
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, tensor in zip(names, flat):
        size = tensor.numel()
        out[name] = host[offset : offset + size].reshape(tuple(results[name].shape))
        offset += size
    return out


def scalar_tags(results: Mapping[str, np.ndarray], per_head: Iterable[str], per_head_scalars: bool = True) -> dict[str, float]:
    """Flattens host results into ``{tag: value}`` following the module's tag scheme."""
    per_head = set(per_head)
    scalars: dict[str, float] = {}
    for name, value in results.items():
        base = f"{PREFIX}/{name}"
        if name in per_head and value.ndim == 2:
            scalars[f"{base}/max"] = float(np.max(value)) if value.size else float("nan")
            scalars[f"{base}/mean"] = float(np.mean(value)) if value.size else float("nan")
            if per_head_scalars:
                for layer in range(value.shape[0]):
                    for head in range(value.shape[1]):
                        scalars[f"{base}/L{layer}H{head}"] = float(value[layer, head])
        elif value.ndim == 0 or value.size == 1:
            scalars[base] = float(value.reshape(()))
        elif value.ndim == 1:
            probe, _, key = name.partition("/")
            for layer, v in enumerate(value):
                tag = f"{PREFIX}/{probe}/L{layer}/{key}" if key else f"{base}/L{layer}"
                scalars[tag] = float(v)
        else:
            for index in np.ndindex(value.shape):
                scalars[f"{base}/" + "_".join(map(str, index))] = float(value[index])
    return scalars


def heatmap_image(values: np.ndarray, cell: int = 24, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """A ``[layers*cell, heads*cell, 3]`` uint8 viridis image of a ``[layers, heads]`` array.

    Rows are layers (layer 0 at the top), columns heads. NaN cells are grey. The colour scale is
    fixed (``vmin``..``vmax``) so images of different steps compare.
    """
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    norm = np.clip((v - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    rgb = colormaps["viridis"](np.nan_to_num(norm))[..., :3]
    rgb[np.isnan(v)] = 0.5
    img = (rgb * 255).round().astype(np.uint8)
    return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)


def custom_scalars_layout(per_head_probes: Iterable[str], scalar_names: Iterable[str]) -> dict[str, Any]:
    """TensorBoard's custom-scalars layout: one chart per probe, with per-head lines together."""
    probes: dict[str, Any] = {}
    for name in sorted(per_head_probes):
        probes[f"{name} per head"] = ["Multiline", [rf"{PREFIX}/{name}/L\d+H\d+"]]
        probes[f"{name} max / mean"] = ["Multiline", [f"{PREFIX}/{name}/max", f"{PREFIX}/{name}/mean"]]
    logit = {
        f"logit lens {key}": ["Multiline", [rf"{PREFIX}/logit_lens/L\d+/{key}"]] for key in ("loss", "kl", "top1")
    }
    others = {name: ["Multiline", [f"{PREFIX}/{name}"]] for name in sorted(scalar_names)}
    others["errors"] = ["Multiline", [f"{PREFIX}/errors"]]
    return {"lens: heads": probes, "lens: logit lens": logit, "lens: scores": others}
