"""LensCallback under the standalone ``pytorch_lightning`` package.

Lightning ships one code base under two names, ``lightning.pytorch`` and ``pytorch_lightning`` (a
dependency of ``lightning`` 2.6), as two sets of classes. Much research code trains with ``import
pytorch_lightning as pl``; its ``Trainer`` calls this callback's hooks as its own, and hands it
loggers, strategies and callbacks of its own package.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lens_callback import LensCallback
from lens_callback.snapshots import list_snapshots
from nanogpt_model import GPT, GPTConfig, TextDataModule

pl = pytest.importorskip("pytorch_lightning")

MODEL = dict(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
PER_HEAD_PROBES = ("induction", "prev_token", "duplicate_token", "attn_entropy")


def _module_and_data(namespace: ModuleType) -> tuple[Any, Any]:
    """The same GPT and token streams as a LightningModule and a datamodule of ``namespace``
    (``lightning.pytorch`` or ``pytorch_lightning``)."""

    class Module(namespace.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = GPT(GPTConfig(**MODEL))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(*batch)[1]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    class Data(namespace.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.text = TextDataModule(block_size=32, batch_size=2, val_batches=1)

        def setup(self, stage: str) -> None:
            self.text.setup(stage)
            self.train_data, self.val_data = self.text.train_data, self.text.val_data

        def train_dataloader(self) -> Any:
            return self.text.train_dataloader()

    return Module(), Data()


def _fit(namespace: ModuleType, root: Path) -> tuple[LensCallback, Any, Path]:
    lens = LensCallback(every_n_steps=2, repeat_length=8, repeat_batch=2, text_len=32, text_batch=2,
                        snapshot_dir="auto")
    logger = namespace.loggers.TensorBoardLogger(root, name="run", version=0, sub_dir="lens")  # log_dir: in sub_dir
    trainer = namespace.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=logger, callbacks=[lens],
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1)
    torch.manual_seed(0)
    module, data = _module_and_data(namespace)
    trainer.fit(module, datamodule=data)
    return lens, module, Path(logger.log_dir)


def test_a_pytorch_lightning_trainer_gets_what_a_lightning_one_does(tmp_path: Path,
                                                                      recwarn: pytest.WarningsRecorder) -> None:
    """Its TensorBoardLogger was taken for another logger: no heatmaps, no chart layout, no event text, a
    warning that there was no TensorBoardLogger (and ``snapshot_dir="auto"`` resolved as for a W&B-style
    logger, without TensorBoard's ``sub_dir``)."""
    ours, ours_module, ours_dir = _fit(lightning.pytorch, tmp_path / "lightning")
    theirs, theirs_module, theirs_dir = _fit(pl, tmp_path / "pytorch_lightning")

    assert theirs.probed_steps == ours.probed_steps == [0, 1, 2, 4]
    assert theirs.history == ours.history  # the same values, bit for bit
    for name, value in ours_module.state_dict().items():  # and the same training (dropout 0.1)
        assert torch.equal(theirs_module.state_dict()[name], value), name
    assert not [w for w in recwarn if "TensorBoardLogger" in str(w.message)]

    acc = EventAccumulator(str(theirs_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {f"lens/{probe}/heatmap" for probe in PER_HEAD_PROBES}
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    assert [s.step for s in list_snapshots(theirs_dir / "snapshots")] == [0, 1, 2, 4]


def test_a_pytorch_lightning_fast_dev_run_and_wandb_logger_are_recognised(tmp_path: Path,
                                                                       recwarn: pytest.WarningsRecorder) -> None:
    """``fast_dev_run`` swaps a ``pytorch_lightning`` Trainer's logger for that package's DummyLogger, which
    is not "no TensorBoardLogger"; its WandbLogger gets a probe step's heatmaps and events in the row of its
    scalars, as ``lightning.pytorch``'s does (``tests/test_wandb.py``)."""
    wandb = pytest.importorskip("wandb")

    class Run:  # what WandbLogger(experiment=...) calls on a wandb.Run
        id = name = "a1b2c3"

        def __init__(self) -> None:
            self.logged: list[dict[str, Any]] = []
            self.config = type("Config", (), {"update": staticmethod(lambda *args, **kwargs: None)})()

        def log(self, data: dict[str, Any]) -> None:
            self.logged.append(data)

    run = Run()
    for logger, length in ((pl.loggers.TensorBoardLogger(tmp_path / "tb"), {"fast_dev_run": 2}),
                           (pl.loggers.WandbLogger(experiment=run, save_dir=str(tmp_path)), {"max_steps": 2})):
        lens = LensCallback(probes=["induction"], every_n_steps=1, repeat_length=8, repeat_batch=2, text_len=32)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[lens], enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0, log_every_n_steps=1, **length)
        trainer.fit(*_module_and_data(pl))
        assert lens.probed_steps == [0, 1, 2] and not lens.errors
    assert not [w for w in recwarn if "TensorBoardLogger" in str(w.message)]
    rows = [row for row in run.logged if "lens/errors" in row]
    assert [row["trainer/global_step"] for row in rows] == [0, 1, 2]
    assert all(isinstance(row["lens/induction/heatmap"], wandb.Image) for row in rows)


def test_pytorch_lightnings_tuners_and_modules_are_recognised() -> None:
    """What the callback asks of a Trainer's strategy, callbacks and module holds for either package's
    classes: an FSDP strategy is sharded (every rank gathers the weights), a LearningRateFinder searches
    before the other callbacks' fit start, a module's own ``configure_model`` builds its model later."""
    from lens_callback.callback import _builds_model_later, _is_sharded, _tunes_at_fit_start

    for namespace in (lightning.pytorch, pl):
        strategy = namespace.strategies.FSDPStrategy.__new__(namespace.strategies.FSDPStrategy)
        assert _is_sharded(type("Trainer", (), {"strategy": strategy})())
        assert not _is_sharded(type("Trainer", (), {"strategy": namespace.strategies.SingleDeviceStrategy("cpu")})())
        finder = namespace.callbacks.LearningRateFinder()
        assert _tunes_at_fit_start(type("Trainer", (), {"callbacks": [finder]})())
        module, _ = _module_and_data(namespace)
        assert not _builds_model_later(module)
        type(module).configure_model = lambda self: None
        assert _builds_model_later(module)


def test_pytorch_lightnings_cli_takes_the_callback_from_its_own_module(tmp_path: Path) -> None:
    """``pytorch_lightning``'s LightningCLI refuses a ``class_path`` that is not a subclass of its own
    ``Callback`` ("Import path does not correspond to a subclass of Callback");
    ``lens_callback.pytorch_lightning.LensCallback`` is one, and the same callback."""
    from pytorch_lightning.cli import LightningCLI

    from lens_callback.pytorch_lightning import LensCallback as StandaloneLensCallback

    module, data = _module_and_data(pl)
    args = ["--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks=CLASS",
            "--trainer.callbacks.every_n_steps=1", "--trainer.callbacks.repeat_length=8",
            "--trainer.callbacks.text_len=32"]
    refused = [a.replace("CLASS", "lens_callback.LensCallback") for a in args]
    with pytest.raises(SystemExit):
        LightningCLI(type(module), type(data), run=False, args=refused)

    taken = [a.replace("CLASS", "lens_callback.pytorch_lightning.LensCallback") for a in args]
    cli = LightningCLI(type(module), type(data), run=False, args=taken)
    (lens,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LensCallback)]
    assert isinstance(lens, StandaloneLensCallback) and isinstance(lens, pl.Callback)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert lens.probed_steps == [0, 1, 2] and lens.history[2]


def test_an_older_standalone_package_beside_lightning_costs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lightning`` requires ``pytorch-lightning`` without a version: an environment that pins an older one (2.0 to
    2.2 have no ModelParallelStrategy, added in 2.3) and imports it, for any reason, made every fit crash in the
    callback's fit start ("module 'pytorch_lightning.strategies' has no attribute 'ModelParallelStrategy'"), a
    ``lightning.Trainer``'s too. A class the standalone package lacks is one its Trainer cannot hand the callback."""
    from lens_callback.callback import _classes_of

    monkeypatch.delattr(pl.strategies, "ModelParallelStrategy")  # as pytorch_lightning 2.2 has it
    _classes_of.cache_clear()
    try:
        lens, _, _ = _fit(lightning.pytorch, tmp_path / "lightning")
        assert lens.probed_steps == [0, 1, 2, 4] and not lens.errors
        theirs, _, _ = _fit(pl, tmp_path / "pytorch_lightning")
        assert theirs.history == lens.history
    finally:
        _classes_of.cache_clear()  # the next test's classes are the installed package's
