"""LensCallback with Lightning's ``WandbLogger`` (W&B comes with transformer-lens).

No W&B process is started: the logger is given a run object that records what Lightning's
``WandbLogger`` hands it (``WandbLogger(experiment=...)``, Lightning's way to log into a run the
user made), so what is checked is what the real logger passes to ``wandb.Run.log``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import register_fixed_head_probe

from lens_callback.events import ThresholdRule
from lens_callback.sinks import heatmap_image

wandb = pytest.importorskip("wandb")
from lightning.pytorch.loggers import WandbLogger  # noqa: E402 - after the skip

N_LAYER, N_HEAD = 2, 2  # TinyFit.MODEL
PER_HEAD_PROBES = ("induction", "prev_token", "duplicate_token", "attn_entropy")


class RecordingRun:
    """What Lightning's ``WandbLogger`` calls on a ``wandb.Run`` during a fit."""

    id = name = "a1b2c3"

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.config = SimpleNamespace(update=lambda *args, **kwargs: None)

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(data)


def test_a_wandb_logger_gets_the_heatmaps_and_events_with_the_scalars(
    tmp_path: Path, tiny_fit: Any, recwarn: pytest.WarningsRecorder
) -> None:
    """Before, a W&B run got the scalars only, with a warning that there was no TensorBoardLogger. Each heatmap
    is captioned with its optimizer step (before, none: W&B's media panels step through the run's own row
    counter, which Lightning's rows advance too, so an image did not say which step it showed)."""
    run = RecordingRun()
    always = ThresholdRule(tag="lens/induction/max", threshold=-1.0, name="always")
    also = ThresholdRule(tag="lens/prev_token/max", threshold=-1.0, name="also")  # two events: a row each
    lens = tiny_fit.lens(every_n_steps=1, log_spaced=False, event_rules=[always, also])
    logger = WandbLogger(experiment=run, save_dir=str(tmp_path))
    tiny_fit.trainer(tmp_path, max_steps=2, logger=logger, callbacks=[lens]).fit(tiny_fit.module(), tiny_fit.data())

    assert not [w for w in recwarn if "TensorBoardLogger" in str(w.message)]
    rows = {row["trainer/global_step"]: row for row in run.logged if "lens/errors" in row}
    assert sorted(rows) == lens.probed_steps == [0, 1, 2]  # one row per probe step: scalars, images, events
    for step, row in rows.items():
        assert {tag: row[tag] for tag in lens.history[step]} == lens.history[step]
        for probe in PER_HEAD_PROBES:
            image = row[f"lens/{probe}/heatmap"]
            assert isinstance(image, wandb.Image)
            assert image._caption == f"step {step}"
            heads = np.array([[lens.history[step][f"lens/{probe}/L{layer}H{head}"] for head in range(N_HEAD)]
                              for layer in range(N_LAYER)])
            np.testing.assert_array_equal(np.asarray(image.image.convert("RGB")), heatmap_image(heads))  # TensorBoard's pixels
    (first,) = [row for row in rows.values() if "lens/events" in row]  # the event fires once, at step 0
    assert first["trainer/global_step"] == 0
    table = first["lens/events"]
    assert isinstance(table, wandb.Table) and table.columns == ["step", "event", "detail"]
    assert [row[:2] for row in table.data] == [[0, "always"], [0, "also"]]


def test_a_wandb_heatmap_spans_its_probes_heatmap_range_and_heatmaps_off_logs_none(
    tmp_path: Path, tiny_fit: Any
) -> None:
    """A signed probe's ``heatmap_range`` colours its W&B image as it does TensorBoard's (a W&B image drawn
    on 0..1 gave every negative head the colour of 0), and ``heatmaps=False`` keeps the images out of the
    W&B rows as it keeps them out of TensorBoard."""
    import torch

    from lens_callback.probes import PROBES

    signed = torch.tensor([[-1.0, -0.5], [0.25, 1.0]])  # [N_LAYER, N_HEAD]
    Signed = register_fixed_head_probe("test_wandb_signed", signed, (-1.0, 1.0))
    runs = {}
    try:
        for heatmaps in (True, False):
            runs[heatmaps] = RecordingRun()
            lens = tiny_fit.lens(probes=["induction", Signed.name], every_n_steps=1, heatmaps=heatmaps)
            logger = WandbLogger(experiment=runs[heatmaps], save_dir=str(tmp_path))
            tiny_fit.trainer(tmp_path, max_steps=1, logger=logger, callbacks=[lens]).fit(tiny_fit.module(),
                                                                                      tiny_fit.data())
    finally:
        PROBES.pop(Signed.name, None)
    (row,) = [row for row in runs[True].logged if row.get("trainer/global_step") == 1 and "lens/errors" in row]
    pixels = np.asarray(row[f"lens/{Signed.name}/heatmap"].image.convert("RGB"))
    np.testing.assert_array_equal(pixels, heatmap_image(signed.numpy(), vmin=-1.0, vmax=1.0))
    assert "lens/induction/heatmap" in row
    rows = [row for row in runs[False].logged if "lens/errors" in row]
    assert rows and not [tag for row in rows for tag in row if tag.endswith("/heatmap")]
