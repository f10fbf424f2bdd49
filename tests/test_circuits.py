"""A tiny version of the default run: events are detected, logged, indexed, and the report renders.

The real default run takes minutes; here the model and the run are tiny and the event rules are
chosen so that they fire within a few steps, which exercises the same pipeline on real logged data.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import matplotlib.image as mpimg
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from lens_callback import LensCallback, detect_events, list_snapshots, make_report, read_metrics
from lens_callback.events import rule_from_dict
from nanogpt_model import GPTConfig, NanoGPTModule, TextDataModule

ROOT = Path(__file__).resolve().parents[1]
RULES = [
    {"kind": "threshold", "tag": "lens/induction/max", "threshold": 0.0, "name": "always"},
    {"kind": "threshold", "tag": "lens/prev_token/max", "threshold": 0.0, "name": "always_too"},
    {"kind": "steepest_rise", "tag": "lens/prev_token/max", "name": "prev_rise", "min_rise": 0.0},
    {"kind": "threshold", "tag": "lens/induction/max", "threshold": 2.0, "name": "never"},
]


def test_tiny_default_run_detects_logs_and_reports_events(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    (callback_spec,) = config["trainer"]["callbacks"]
    args = dict(callback_spec["init_args"], every_n_steps=5, repeat_length=8, repeat_batch=4,
                text_len=32, text_batch=2, snapshot_dir=str(tmp_path / "snapshots"), event_rules=RULES)
    callback = LensCallback(**args)
    model_cfg = dict(config["model"]["config"], block_size=64, n_embd=32, n_head=2)
    module = NanoGPTModule(GPTConfig(**model_cfg), learning_rate=3e-3, warmup_steps=2)
    data = TextDataModule(block_size=64, batch_size=4, val_batches=2)
    logger = TensorBoardLogger(tmp_path, name="tiny", version=0)
    trainer = L.Trainer(max_steps=20, accelerator="cpu", logger=logger, callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        val_check_interval=10, limit_val_batches=2, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)

    names = {e.name for e in callback.detector.events}
    assert names == {"always", "always_too", "prev_rise"}  # "never" cannot fire
    logdir = Path(logger.log_dir)
    df = read_metrics(logdir)
    assert {"lens/events/always", "lens/events/prev_rise"} <= set(df["tag"])
    assert df[df["tag"] == "lens/events/always"]["step"].tolist() == [0]
    # post hoc, the same rules on the logged scalars find the same events
    rules = [rule_from_dict(r) for r in RULES]
    assert {(e.name, e.step) for e in detect_events(df, rules)} == {(e.name, e.step) for e in callback.detector.events}
    # TensorBoard text entries, and the index next to the snapshots
    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    assert "lens/events/text_summary" in acc.Tags()["tensors"]
    # one text entry per probe step, holding every event found there: TensorBoard's default (Rust) loader
    # keeps one text per tag and step, so a second entry at a step hid the first in its Text tab
    texts = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
             for e in acc.Tensors("lens/events/text_summary")]
    assert len({step for step, _ in texts}) == len(texts), texts
    assert "**always** at step 0" in dict(texts)[0] and "**always_too** at step 0" in dict(texts)[0]
    assert {e.name for e in callback.detector.events} == {
        name for _, text in texts for name in ("always", "always_too", "prev_rise") if f"**{name}**" in text}
    index = json.loads((tmp_path / "snapshots" / "events.json").read_text())["events"]
    snapshot_steps = [s.step for s in list_snapshots(tmp_path / "snapshots")]
    for entry in index:
        before = entry["snapshot_before"]
        assert before is None or (before in snapshot_steps and before < entry["step"])
        assert entry["snapshot_after"] is None or entry["snapshot_after"] >= entry["step"]
    # the report renders from the real run and marks the events
    out = make_report(logdir, tmp_path / "report.png", events=callback.detector.events)
    image = mpimg.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 800 and image.std() > 0.05
