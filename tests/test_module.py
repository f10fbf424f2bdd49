"""``NanoGPTModule`` under a real ``Trainer``: logging, schedule, precision, compile, checkpoints."""

from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nanogpt_model import GPTConfig, NanoGPTModule, TextDataModule
from nanogpt_model.module import RNG_STATE_KEY, warmup_cosine

TINY = dict(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=32, bias=True)
LR, MIN_LR, WARMUP, MAX_STEPS = 1e-2, 1e-3, 2, 6


class _Recorder(L.Callback):
    """Records the learning rate each optimizer step uses and the training losses."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.lrs.append([group["lr"] for group in optimizer.param_groups])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def _trainer(root: Path, max_steps: int = 3, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        gradient_clip_val=1.0, default_root_dir=root,
    )
    return L.Trainer(**{**defaults, **kwargs})


def _data(**kwargs: Any) -> TextDataModule:
    """The embedded default corpus (byte-level), in small batches."""
    return TextDataModule(**{"block_size": 32, "batch_size": 4, "val_batches": 2, **kwargs})


def _module() -> NanoGPTModule:
    """The tiny model with this file's schedule."""
    return NanoGPTModule(GPTConfig(**TINY), learning_rate=LR, warmup_steps=WARMUP, min_lr=MIN_LR)


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag a TensorBoard run directory holds, as ``(step, value)`` pairs."""
    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _expected_lr(step: int) -> float:
    return LR * warmup_cosine(step, WARMUP, MAX_STEPS, MIN_LR / LR)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One short fit: 6 steps, validation at steps 3 and 6, TensorBoard logs and checkpoints."""
    root = tmp_path_factory.mktemp("fit")
    recorder = _Recorder()
    module = _module()
    trainer = _trainer(
        root, max_steps=MAX_STEPS, logger=TensorBoardLogger(root, name="tb"), enable_checkpointing=True,
        limit_val_batches=2, val_check_interval=3, log_every_n_steps=1, callbacks=[recorder],
    )
    trainer.fit(module, _data(batches_per_epoch=MAX_STEPS))
    scalars = _scalars(trainer.logger.log_dir)
    checkpoints = sorted(Path(trainer.logger.log_dir, "checkpoints").glob("*.ckpt"))
    return SimpleNamespace(module=module, trainer=trainer, recorder=recorder, scalars=scalars, checkpoints=checkpoints)


def test_fit_logs_losses_and_lr(run: SimpleNamespace) -> None:
    assert run.trainer.global_step == MAX_STEPS
    for tag in ("train/loss", "train/ppl", "val/loss", "val/ppl", "lr"):
        assert tag in run.scalars, sorted(run.scalars)
        assert all(math.isfinite(value) for _, value in run.scalars[tag])
    assert [step for step, _ in run.scalars["train/loss"]] == list(range(MAX_STEPS))
    assert len(run.scalars["val/loss"]) == 2  # after steps 3 and 6
    for (_, loss), (_, ppl) in zip(run.scalars["train/loss"], run.scalars["train/ppl"]):
        assert ppl == pytest.approx(math.exp(loss), rel=1e-4)
    # the step's train/loss (logged per step, not a running mean) is the loss the Trainer saw
    assert [v for _, v in run.scalars["train/loss"]] == pytest.approx(run.recorder.losses, rel=1e-5)


def test_val_ppl_is_the_exponential_of_each_val_loss(run: SimpleNamespace) -> None:
    """Mutation review: logging the loss itself as ``val/ppl`` passed, the test above checking only that it is
    logged and finite. Each validation's ``val/ppl`` is ``exp(val/loss)``, as ``train/ppl`` is of ``train/loss``."""
    assert run.scalars["val/loss"]
    assert [step for step, _ in run.scalars["val/ppl"]] == [step for step, _ in run.scalars["val/loss"]]
    for (_, loss), (_, ppl) in zip(run.scalars["val/loss"], run.scalars["val/ppl"]):
        assert ppl == pytest.approx(math.exp(loss), rel=1e-5)


def test_lr_follows_warmup_cosine(run: SimpleNamespace) -> None:
    expected = [_expected_lr(step) for step in range(MAX_STEPS)]
    assert expected[0] == pytest.approx(LR / (WARMUP + 1)) and expected[WARMUP] == pytest.approx(LR)
    assert [lrs[0] for lrs in run.recorder.lrs] == pytest.approx(expected, rel=1e-6)
    assert all(len(set(lrs)) == 1 for lrs in run.recorder.lrs)  # both parameter groups
    # the logged lr at step s is the rate the update at step s used
    assert [v for _, v in run.scalars["lr"]] == pytest.approx(expected, rel=1e-6)
    assert [s for s, _ in run.scalars["lr"]] == list(range(MAX_STEPS))


class _Peek(L.Callback):
    """Records ``trainer.callback_metrics["train/loss"]`` at every ``on_train_batch_end``, as a
    ``ModelCheckpoint`` monitoring it would read it."""

    def __init__(self) -> None:
        self.seen: list[float | None] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        value = trainer.callback_metrics.get("train/loss")
        self.seen.append(None if value is None else float(value))


class _StopAt(L.Callback):
    """Stops the fit at the end of optimizer step ``step`` (0-based), from ``on_train_batch_end``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step + 1:
            trainer.should_stop = True


def _fit_counting_logs(root: Path, **trainer_kwargs: Any) -> tuple[L.Trainer, _Recorder, list[str], dict]:
    """A fit of the tiny model with a TensorBoard logger; returns the trainer, a `_Recorder`, the names
    that each ``module.log`` call of the training steps logged, in order, and the logged scalars."""
    recorder = _Recorder()
    module = _module()
    names: list[str] = []
    log = module.log
    module.log = lambda name, *a, **k: (names.append(name), log(name, *a, **k))[1]  # type: ignore[method-assign]
    callbacks = [recorder, *trainer_kwargs.pop("callbacks", [])]
    trainer = _trainer(root, logger=TensorBoardLogger(root, name="tb"), callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, _data(batches_per_epoch=64))
    scalars = _scalars(trainer.logger.log_dir)
    return trainer, recorder, names, scalars


def test_step_metrics_are_logged_at_the_steps_the_loggers_write_only(tmp_path: Path) -> None:
    """train/loss goes through ``self.log`` at every step (the progress bar, monitoring callbacks),
    train/ppl and lr at the steps Lightning writes (every log_every_n_steps), not at every step (with the
    loss through a MeanMetric, they cost about half of Lightning's host time over a plain loop's for a small model),
    with that step's values; a callback that stops the fit at another step makes it a logged step, with
    its own values, not the last logged ones."""
    peek = _Peek()
    trainer, recorder, names, scalars = _fit_counting_logs(
        tmp_path, max_steps=MAX_STEPS, log_every_n_steps=3, callbacks=[peek, _StopAt(4)])
    assert trainer.global_step == 5
    assert names == ["train/loss"] * 3 + ["train/ppl", "lr"] + ["train/loss"] * 2 + ["train/ppl", "lr"]
    assert peek.seen == pytest.approx(recorder.losses, rel=1e-6)  # a monitoring callback sees each step's loss
    for tag in ("train/loss", "train/ppl", "lr"):
        assert [s for s, _ in scalars[tag]] == [2, 4], tag
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([recorder.losses[2], recorder.losses[4]], rel=1e-6)
    assert [v for _, v in scalars["train/ppl"]] == pytest.approx([math.exp(recorder.losses[2]),
                                                                  math.exp(recorder.losses[4])], rel=1e-5)
    assert [v for _, v in scalars["lr"]] == pytest.approx([_expected_lr(2), _expected_lr(4)], rel=1e-6)
    assert float(trainer.progress_bar_metrics["train/loss"]) == pytest.approx(recorder.losses[4], rel=1e-6)


def test_step_metrics_after_a_stop_that_min_steps_overrides_are_each_steps_own(tmp_path: Path) -> None:
    """A stop requested before min_steps does not end the fit, and Lightning writes every step after it:
    each with its own train/ppl and lr (a second result entry, logged from another hook at the stop, had
    frozen them at the stop step's values; diff review)."""
    trainer, recorder, names, scalars = _fit_counting_logs(
        tmp_path, max_steps=MAX_STEPS, min_steps=MAX_STEPS, log_every_n_steps=3, callbacks=[_StopAt(3)])
    assert trainer.global_step == MAX_STEPS
    for tag in ("train/loss", "train/ppl", "lr"):
        assert [s for s, _ in scalars[tag]] == [2, 3, 4, 5], tag
    losses = [v for _, v in scalars["train/loss"]]
    assert losses == pytest.approx(recorder.losses[2:], rel=1e-6)
    assert [v for _, v in scalars["train/ppl"]] == pytest.approx([math.exp(v) for v in losses], rel=1e-5)
    assert [v for _, v in scalars["lr"]] == pytest.approx([_expected_lr(s) for s in range(2, MAX_STEPS)], rel=1e-6)


def test_a_checkpoint_monitoring_train_loss_works_without_a_logger(tmp_path: Path) -> None:
    """train/loss reaches callback_metrics at every step, also with no logger (where no step is written)."""
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", monitor="train/loss", every_n_train_steps=2)
    recorder = _Recorder()
    module = _module()
    trainer = _trainer(tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[recorder, checkpoint])
    trainer.fit(module, _data())
    assert float(checkpoint.best_model_score) == pytest.approx(min(recorder.losses[1], recorder.losses[3]), rel=1e-6)


def test_training_step_runs_outside_a_trainer() -> None:
    """A unit test may call training_step by hand, as Lightning allows (self.log warns and does nothing);
    reading the rate from the Trainer's optimizer had made it raise (self-review)."""
    module = NanoGPTModule(GPTConfig(**TINY))
    x = torch.randint(0, TINY["vocab_size"], (2, 8))
    with pytest.warns(UserWarning, match="trainer"):
        loss = module.training_step((x, x), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_step_metrics_skip_micro_batches_that_only_accumulate(tmp_path: Path) -> None:
    """Under gradient accumulation the micro-batches before an optimizer step log train/ppl and lr at no
    step; the logged loss is the step's last micro-batch's, whose value Lightning wrote before as well."""
    trainer, recorder, names, scalars = _fit_counting_logs(
        tmp_path, max_steps=4, log_every_n_steps=2, accumulate_grad_batches=2)
    assert names.count("train/ppl") == names.count("lr") == 2
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in scalars["train/ppl"]] == [1, 3]
    # the Trainer's outputs["loss"] is the micro-batch's loss over accumulate_grad_batches; the logged one is not
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([2 * recorder.losses[3], 2 * recorder.losses[7]],
                                                                  rel=1e-6)
    assert [v for _, v in scalars["train/ppl"]] == pytest.approx([math.exp(2 * recorder.losses[3]),
                                                                  math.exp(2 * recorder.losses[7])], rel=1e-5)


def test_val_loss_is_the_mean_of_that_validation_only(run: SimpleNamespace) -> None:
    """The second validation's val/loss is its own batches' mean loss, not a running mean over every validation."""
    val_batches = list(run.trainer.datamodule.val_dataloader())
    assert len(val_batches) == 2
    run.module.eval()
    with torch.no_grad():
        expected = torch.stack([run.module(x, y)[1] for x, y in val_batches]).mean().item()
    assert run.scalars["val/loss"][-1][1] == pytest.approx(expected, rel=1e-5)  # the one after step 6
    assert float(run.trainer.callback_metrics["val/loss"]) == pytest.approx(expected, rel=1e-5)


def test_validation_under_ddp_gives_no_per_rank_warning(tmp_path: Path) -> None:
    """Under DDP Lightning warned at every validation that ``val/loss`` and ``val/ppl`` should be
    logged with ``sync_dist=True``, as if each rank logged its own mean; torchmetrics has synchronised
    them already (CLI/DDP review). ``strategy="ddp"`` with one process stands in for DDP (a gloo group
    of one). With ``rank_zero_only=True`` Lightning's own sync is a no-op (the 3 reduces of this fit are
    Lightning's own, with or without the change)."""
    import torch.distributed as dist

    environ = dict(os.environ)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=2, val_check_interval=2, strategy="ddp")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(_module(), _data(val_batches=2))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # Lightning's DDP set LOCAL_RANK, NODE_RANK, MASTER_ADDR/PORT, ... in this process: left there, the
        # multi-process tests' scripts inherited LOCAL_RANK, took their processes for launched externally
        # and waited for a rank 1 never started
        os.environ.clear()
        os.environ.update(environ)
    assert trainer._accelerator_connector.is_distributed  # Lightning would sync what sync_dist asks for
    assert not [w for w in caught if "sync_dist" in str(w.message)]
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))


def test_a_run_resumed_with_more_steps_takes_each_step_at_its_schedules_rate(tmp_path: Path) -> None:
    """Resuming a 3-step run with max_steps=6 (the cosine now decays over 6): step 3 uses the 6-step
    schedule's rate, as an uninterrupted 6-step run does, not the one in the checkpoint's optimizer."""
    def fit(max_steps: int, ckpt: Path | None = None) -> tuple[_Recorder, L.Trainer]:
        L.seed_everything(0)
        recorder = _Recorder()
        trainer = _trainer(tmp_path, max_steps=max_steps, callbacks=[recorder])
        module = _module()
        trainer.fit(module, _data(), ckpt_path=ckpt)
        return recorder, trainer

    full, _ = fit(MAX_STEPS)
    first, trainer = fit(3)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    rest, _ = fit(MAX_STEPS, tmp_path / "mid.ckpt")
    expected = [_expected_lr(step) for step in range(MAX_STEPS)]
    assert [lrs[0] for lrs in full.lrs] == pytest.approx(expected)
    assert [lrs[0] for lrs in first.lrs + rest.lrs] == pytest.approx(expected)
    assert all(len(set(lrs)) == 1 for lrs in first.lrs + rest.lrs)  # both parameter groups


def test_a_fit_continuing_its_trainers_steps_continues_the_schedule(tmp_path: Path) -> None:
    """A second fit on the same Trainer (more steps) rebuilt the scheduler at 0 while global_step went
    on: steps 3.. repeated the warm-up (data review). They take the run's schedule at global_step."""
    recorder = _Recorder()
    trainer = _trainer(tmp_path, max_steps=3, callbacks=[recorder])
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=LR, warmup_steps=WARMUP, min_lr=MIN_LR,
                           lr_decay_steps=MAX_STEPS)
    trainer.fit(module, _data())
    trainer.fit_loop.epoch_loop.max_steps = MAX_STEPS
    trainer.fit(module, _data())
    assert trainer.global_step == MAX_STEPS
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx([_expected_lr(step) for step in range(MAX_STEPS)])


def test_a_run_resumed_with_another_learning_rate_takes_its_own_peak_and_floor(tmp_path: Path) -> None:
    """LambdaLR's base_lrs came back from the checkpoint: a run resumed with a 10x lower learning_rate
    (and min_lr) kept the old peak under the new floor ratio (model review)."""
    def fit(lr: float, max_steps: int, ckpt: Path | None = None) -> _Recorder:
        L.seed_everything(0)
        recorder = _Recorder()
        module = NanoGPTModule(GPTConfig(**TINY), learning_rate=lr, warmup_steps=WARMUP, min_lr=lr * MIN_LR / LR)
        trainer = _trainer(tmp_path, max_steps=max_steps, callbacks=[recorder])
        trainer.fit(module, _data(), ckpt_path=ckpt)
        if ckpt is None:
            trainer.save_checkpoint(tmp_path / "mid.ckpt")
        return recorder

    fit(LR, 3)
    rest = fit(LR / 10, MAX_STEPS, tmp_path / "mid.ckpt")
    assert [lrs[0] for lrs in rest.lrs] == pytest.approx([_expected_lr(step) / 10 for step in range(3, MAX_STEPS)])


def _karpathy_get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """nanoGPT's ``train.py`` ``get_lr``, as he wrote it (his globals made arguments)."""
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > lr_decay_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("resume_at", [None, 3])
def test_each_step_takes_nanogpts_get_lr_bit_for_bit(tmp_path: Path, resume_at: int | None) -> None:
    """The rate of every optimizer step is Karpathy's ``get_lr(it)``, to the bit, from step 0 through the last
    warm-up step and the cosine to past ``lr_decay_steps``, also in a resumed fit. ``LambdaLR``'s
    ``lr * warmup_cosine(...)`` rounded otherwise: 0.003333333333333333 for his 0.0033333333333333335 at step
    0, 0.01 for 0.010000000000000002 at the peak (nanogpt review)."""
    def fit(max_steps: int, ckpt: Path | None = None) -> _Recorder:
        recorder = _Recorder()
        module = NanoGPTModule(GPTConfig(**TINY), learning_rate=LR, warmup_steps=WARMUP, min_lr=MIN_LR,
                               lr_decay_steps=4)
        trainer = _trainer(tmp_path, max_steps=max_steps, callbacks=[recorder])
        trainer.fit(module, _data(), ckpt_path=ckpt)
        if ckpt is None:
            trainer.save_checkpoint(tmp_path / "mid.ckpt")
        return recorder

    if resume_at is None:
        lrs = fit(MAX_STEPS).lrs
    else:
        lrs = fit(resume_at).lrs + fit(MAX_STEPS, tmp_path / "mid.ckpt").lrs
    expected = [_karpathy_get_lr(step, LR, WARMUP, 4, MIN_LR) for step in range(MAX_STEPS)]
    assert lrs == [[rate, rate] for rate in expected]  # both parameter groups, exactly


def test_checkpoint_is_plain_and_reloads(run: SimpleNamespace) -> None:
    assert run.checkpoints, "ModelCheckpoint wrote nothing"
    path = run.checkpoints[-1]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no pickled classes inside
    assert ckpt["global_step"] == MAX_STEPS
    assert ckpt["hyper_parameters"]["config"] == GPTConfig(**TINY).to_dict()
    assert all(k.startswith("model.") for k in ckpt["state_dict"])

    loaded = NanoGPTModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.config == GPTConfig(**TINY)
    assert loaded.hparams.learning_rate == LR and loaded.hparams.min_lr == MIN_LR
    trained = run.module.model.state_dict()
    assert set(loaded.model.state_dict()) == set(trained)
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=key)
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    loaded.eval(), run.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], run.module(idx)[0], rtol=0, atol=0)


def test_a_fit_after_validate_runs(tmp_path: Path) -> None:
    """trainer.validate resets the validation metric under inference mode; the fit after it updated
    that inference tensor in place and stopped ("Inplace update to inference tensor")."""
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, warmup_steps=1)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=1)
    trainer.validate(module, _data())
    trainer.fit(module, _data())
    assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics["val/loss"]))

def test_bf16_mixed_runs_on_cpu(tmp_path: Path) -> None:
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, warmup_steps=1)
    dtypes: list[torch.dtype] = []
    module.model.lm_head.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    recorder = _Recorder()
    _trainer(tmp_path, max_steps=3, precision="bf16-mixed", callbacks=[recorder]).fit(module, _data())
    assert len(recorder.losses) == 3 and all(math.isfinite(v) for v in recorder.losses)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)  # autocast was on
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay fp32


@pytest.mark.parametrize("eps", [1e-8, 1e-6])
def test_16_true_refuses_an_eps_under_the_float16_floor(tmp_path: Path, eps: float) -> None:
    """Under 16-true AdamW's moments are float16. nanoGPT's eps=1e-8 is 0 there: AdamW divided 0 by 0 at
    a byte vocabulary's unused rows and the weights were NaN after the first step. 1e-6, which this
    module's message first advised, moved weights whose (1 - beta2) g**2 underflows by lr * g / eps,
    hundreds of lr, and training stalled (precision review)."""
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, warmup_steps=1, eps=eps)
    with pytest.raises(ValueError, match=rf"eps={eps} is too small for float16 weights .*'16-true'.*--model.eps=0.0011"):
        _trainer(tmp_path, max_steps=3, precision="16-true").fit(module, _data())


def test_a_resumed_fit_takes_its_own_eps_and_checks_it(tmp_path: Path) -> None:
    """A resumed optimizer's groups came back with the checkpoint's eps: a 32-true run's 1e-8 continued
    in 16-true under a module given the float16 floor, past its check, and the weights went NaN (diff
    review). The module's eps is the one AdamW uses, as its learning rate is."""
    from nanogpt_model.module import float16_eps_floor

    L.seed_everything(0)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, warmup_steps=1), _data())
    trainer.save_checkpoint(tmp_path / "fp32.ckpt")
    floor = float16_eps_floor(0.95)
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, warmup_steps=1, eps=floor)
    recorder = _Recorder()
    _trainer(tmp_path, max_steps=5, precision="16-true", callbacks=[recorder]).fit(
        module, _data(), ckpt_path=tmp_path / "fp32.ckpt")
    assert [group["eps"] for group in module.optimizers().optimizer.param_groups] == [floor, floor]
    assert len(recorder.losses) == 3 and all(math.isfinite(v) for v in recorder.losses)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # a 16-true checkpoint whose optimizer holds an eps under the floor, resumed under betas that need more
    trainer = _trainer(tmp_path, max_steps=6, precision="16-true")
    trainer.fit(module, _data(), ckpt_path=tmp_path / "fp32.ckpt")
    trainer.save_checkpoint(tmp_path / "fp16.ckpt")
    assert float16_eps_floor(0.5) < 5e-4 < floor  # enough for the module's betas, not for the checkpoint's
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, warmup_steps=1, eps=5e-4, betas=(0.9, 0.5))
    with pytest.raises(ValueError, match=r"eps=0.0005 is too small for float16 weights.*beta2=0.95.*resuming a checkpoint"):
        _trainer(tmp_path, max_steps=8, precision="16-true").fit(module, _data(), ckpt_path=tmp_path / "fp16.ckpt")


def test_16_true_at_the_float16_eps_floor_moves_no_weight_by_much_more_than_lr(tmp_path: Path) -> None:
    """At `float16_eps_floor` a weight whose second moment underflows moves by at most about lr, as in
    float32 (eps=1e-6 moved one by 760 lr here)."""
    from nanogpt_model.module import float16_eps_floor

    lr = 6e-4
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=lr, warmup_steps=0, weight_decay=0.0,
                           eps=float16_eps_floor(0.95))
    recorder = _Recorder()
    trainer = _trainer(tmp_path, max_steps=1, precision="16-true", callbacks=[recorder])
    before: dict[str, Tensor] = {}

    class _Before(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            before.update({k: v.detach().float().clone() for k, v in pl_module.model.named_parameters()})

    trainer.callbacks.append(_Before())
    trainer.fit(module, _data())
    assert [p.dtype for p in module.parameters()] == [torch.float16] * len(list(module.parameters()))
    assert module.optimizers().optimizer.param_groups[0]["eps"] == float16_eps_floor(0.95)
    excess = []  # each weight's move beyond lr, in units of its float16 spacing (the rounding of the new value)
    for k, p in module.model.named_parameters():
        spacing = torch.finfo(torch.float16).eps * before[k].abs().clamp_min(2.0**-14)
        excess.append(float((((p.detach().float() - before[k]).abs() - 1.1 * lr) / spacing).max()))
    assert max(excess) <= 1.0, max(excess)
    assert len(recorder.losses) == 1 and math.isfinite(recorder.losses[0])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_on_cuda_adamw_is_fused_unless_lightning_clips_under_mixed_precision(
    tmp_path: Path, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nanoGPT's fused AdamW on CUDA; Lightning's MixedPrecision.clip_gradients raises for an optimizer
    that unscales its own gradients, so the configs' bf16-mixed (16-mixed) with gradient_clip_val
    stopped at the first step. No GPU needed: the device is the only input to the choice, and fused
    AdamW runs on CPU parameters too."""
    configure = NanoGPTModule.configure_optimizers

    def configure_as_on_cuda(self: NanoGPTModule) -> dict[str, Any]:
        with monkeypatch.context() as patch:
            patch.setattr(NanoGPTModule, "device", property(lambda _: torch.device("cuda")))
            return configure(self)

    monkeypatch.setattr(NanoGPTModule, "configure_optimizers", configure_as_on_cuda)
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, warmup_steps=1)
    recorder = _Recorder()
    trainer = _trainer(tmp_path, max_steps=2, precision=precision, callbacks=[recorder])
    trainer.fit(module, _data())
    assert len(recorder.losses) == 2
    fused = bool(trainer.optimizers[0].defaults.get("fused"))
    assert fused == (precision == "32-true")
    # without clipping nothing stands in the way of the fused optimizer
    unclipped = _trainer(tmp_path, max_steps=1, precision=precision, gradient_clip_val=None)
    unclipped.fit(NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, warmup_steps=1), _data())
    assert unclipped.optimizers[0].defaults.get("fused") is True


def test_a_run_resumed_with_dropout_continues_as_the_uninterrupted_one(tmp_path: Path) -> None:
    """The dropout masks come from the global torch RNG, which Lightning does not checkpoint: the
    module keeps its state in the checkpoint and restores it, so the weights after a resume are
    bitwise those of the uninterrupted run."""
    def fit(max_steps: int, ckpt: Path | None = None, seed: int = 0) -> tuple[NanoGPTModule, L.Trainer]:
        L.seed_everything(seed)
        module = NanoGPTModule(GPTConfig(**{**TINY, "dropout": 0.2}), learning_rate=LR, warmup_steps=WARMUP)
        trainer = _trainer(tmp_path, max_steps=max_steps)
        trainer.fit(module, _data(), ckpt_path=ckpt)
        return module, trainer

    full, _ = fit(MAX_STEPS)
    _, first = fit(3)
    first.save_checkpoint(tmp_path / "mid.ckpt")
    torch.manual_seed(12345)  # whatever the process drew in between does not matter
    resumed, _ = fit(MAX_STEPS, tmp_path / "mid.ckpt")
    expected = full.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    ckpt = torch.load(tmp_path / "mid.ckpt", map_location="cpu", weights_only=True)
    assert isinstance(ckpt[RNG_STATE_KEY]["cpu"], torch.Tensor)

    # only a resumed fit under the checkpoint's seed: a resume with a new seed draws new masks, and
    # loading a checkpoint for inference leaves the process's RNG alone
    other, _ = fit(MAX_STEPS, tmp_path / "mid.ckpt", seed=1)
    assert any(not torch.equal(value, expected[key]) for key, value in other.model.state_dict().items())
    torch.manual_seed(123)
    NanoGPTModule(GPTConfig(**{**TINY, "dropout": 0.2}))  # what building the module draws
    state = torch.get_rng_state()
    torch.manual_seed(123)
    NanoGPTModule.load_from_checkpoint(tmp_path / "mid.ckpt", map_location="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    L.seed_everything(0)  # the checkpoint's seed: only the trainer's function tells a resume from this
    module, trainer = NanoGPTModule(GPTConfig(**{**TINY, "dropout": 0.2})), _trainer(tmp_path, max_steps=MAX_STEPS)
    data = _data()
    state = torch.get_rng_state()
    trainer.validate(module, data, ckpt_path=tmp_path / "mid.ckpt", verbose=False)  # not a fit: left alone
    assert torch.equal(torch.get_rng_state(), state)

def test_a_resume_gives_every_rank_the_writing_ranks_cuda_rng_state_on_its_own_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP rank 0 writes the checkpoint: its process holds the other devices' CUDA generators as
    seeded, never advanced (each rank draws on its own device). Every rank of the resumed fit takes rank
    0's own device's state into its own device, where ranks seeded alike stand alike; it took its device's
    seeded state from rank 0's process before, and its dropout masks started over. Emulated: no GPU."""
    from lightning.pytorch.trainer.states import TrainerFn

    states = {0: torch.tensor([10], dtype=torch.uint8), 1: torch.tensor([20], dtype=torch.uint8)}
    current = {"device": 0}
    every: list[list[Tensor]] = []
    for name, fake in {"is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 2,
                       "get_rng_state": lambda device="cuda": states[current["device"]].clone(),
                       "set_rng_state": lambda state, device="cuda": states.__setitem__(current["device"], state),
                       "get_rng_state_all": lambda: [states[0].clone(), torch.tensor([99], dtype=torch.uint8)],
                       "set_rng_state_all": lambda all_states: every.append(list(all_states))}.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    module = NanoGPTModule(GPTConfig(**TINY))
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)  # rank 0, on device 0
    states[0] = torch.tensor([11], dtype=torch.uint8)  # the fit goes on drawing
    module._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
    current["device"] = 1  # rank 1 resumes
    module.on_load_checkpoint(checkpoint)
    assert states == {0: torch.tensor([11], dtype=torch.uint8), 1: torch.tensor([10], dtype=torch.uint8)} and not every

    legacy = {RNG_STATE_KEY: {**checkpoint[RNG_STATE_KEY], "cuda": [torch.tensor([1], dtype=torch.uint8)] * 2}}
    del legacy[RNG_STATE_KEY]["cuda_device"]  # a checkpoint written before: every device's states, restored as they were
    module.on_load_checkpoint(legacy)
    assert len(every) == 1 and len(every[0]) == 2


def test_a_resume_on_a_mac_restores_the_mps_rng_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """On MPS dropout draws from MPS's own generator, which Lightning's checkpoint does not keep: a resumed
    fit's dropout masks started over from the seed (device review). Emulated: no MPS device here."""
    from lightning.pytorch.trainer.states import TrainerFn

    state = {"mps": torch.tensor([7], dtype=torch.uint8)}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": state["mps"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda new, device="mps": state.__setitem__("mps", new))
    module = NanoGPTModule(GPTConfig(**TINY))
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)
    state["mps"] = torch.tensor([8], dtype=torch.uint8)  # the fit went on drawing
    module._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
    module.on_load_checkpoint(checkpoint)
    assert torch.equal(state["mps"], torch.tensor([7], dtype=torch.uint8))


def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch build has no torch.compile"
    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python/platform"
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "TorchInductor on CPU needs a C++ compiler and none is on PATH"
    return None


@pytest.mark.slow
def test_compile_trains_and_keeps_nanogpt_keys(tmp_path: Path) -> None:
    """Cold, TorchInductor compiles the tiny model in ~30 s on two cores; seconds with its cache warm."""
    reason = _compile_unavailable()
    if reason:
        pytest.skip(reason)
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, warmup_steps=1, compile=True)
    before = module.model.transformer.wte.weight.detach().clone()
    recorder = _Recorder()
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[recorder])
    trainer.fit(module, _data())
    compiled = module.__dict__["_compiled"]
    assert compiled is not None and compiled._orig_mod is module.model
    assert len(recorder.losses) == 2 and all(math.isfinite(v) for v in recorder.losses)
    assert not torch.equal(before, module.model.transformer.wte.weight)  # the compiled graph trained self.model

    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    keys = list(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    assert keys == list(module.state_dict())
    assert not any("_orig_mod" in k or "_compiled" in k for k in keys)
    assert set(keys) == {f"model.{k}" for k in module.model.state_dict()}


def test_vocab_or_block_mismatch_fails_before_training(tmp_path: Path) -> None:
    small_vocab = NanoGPTModule(GPTConfig(**{**TINY, "vocab_size": 64}))
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=256.*vocab_size=64"):
        trainer.fit(small_vocab, _data())
    assert trainer.global_step == 0

    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match="block_size=64.*block_size=32"):
        trainer.fit(NanoGPTModule(GPTConfig(**TINY)), _data(block_size=64))
    assert trainer.global_step == 0


def test_a_model_one_token_short_of_the_datas_vocab_is_refused(tmp_path: Path) -> None:
    """Byte data (256 ids) and a 255-token model: refused before step 1, not an index error mid-run."""
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=256.*vocab_size=255"):
        trainer.fit(NanoGPTModule(GPTConfig(**{**TINY, "vocab_size": 255})), _data())
    assert trainer.global_step == 0


# -- without a Trainer ----------------------------------------------------------------------------
def test_warmup_cosine() -> None:
    warmup, decay, floor = 10, 110, 0.1
    assert warmup_cosine(0, warmup, decay, floor) == pytest.approx(1 / 11)
    assert warmup_cosine(9, warmup, decay, floor) == pytest.approx(10 / 11)
    assert warmup_cosine(warmup, warmup, decay, floor) == pytest.approx(1.0)
    assert warmup_cosine(60, warmup, decay, floor) == pytest.approx(floor + 0.5 * (1 - floor))
    assert warmup_cosine(decay, warmup, decay, floor) == pytest.approx(floor)
    assert warmup_cosine(decay + 1000, warmup, decay, floor) == floor
    values = [warmup_cosine(s, warmup, decay, floor) for s in range(warmup, decay + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_optimizer_and_schedule_without_trainer() -> None:
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, weight_decay=0.05, warmup_steps=4, min_lr=1e-4)
    setup = module.configure_optimizers()
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert setup["lr_scheduler"]["interval"] == "step"
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert [schedule(s) for s in (0, 3, 4, 10_000)] == pytest.approx([0.2, 0.8, 1.0, 1.0])  # no max_steps: no decay

    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=1e-3, warmup_steps=4, lr_decay_steps=20, min_lr=1e-4)
    schedule = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert [schedule(s) for s in (4, 20, 50)] == pytest.approx([1.0, 0.1, 0.1])


def test_hparams_are_plain_and_config_mapping_accepted() -> None:
    module = NanoGPTModule(dict(TINY), betas=(0.9, 0.99))
    assert module.config == GPTConfig(**TINY)
    assert module.hparams["config"] == GPTConfig(**TINY).to_dict()
    assert type(module.hparams["config"]) is dict
    # what loggers record (hparams.yaml, TensorBoard's HPARAMS) holds the architecture too (data review)
    assert module.hparams_initial["config"] == GPTConfig(**TINY).to_dict() and module.hparams_initial["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="n_layers"):
        NanoGPTModule({**TINY, "n_layers": 2})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),  # was refused naming min_lr
        ({"learning_rate": float("inf"), "min_lr": 0.0}, "learning_rate"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"min_lr": 1.0}, "min_lr"),
        ({"min_lr": -1e-5}, "min_lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"lr_decay_steps": 0}, "lr_decay_steps"),
        ({"warmup_steps": 100, "lr_decay_steps": 50}, r"lr_decay_steps \(50\) must be greater than warmup_steps"),  # API review
        ({"warmup_steps": 100, "lr_decay_steps": 100}, "cosine never running"),
        ({"weight_decay": -0.1}, "weight_decay"),  # AdamW refuses it, but not inside a group (CLI review)
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),  # AdamW takes it and divides 0 by 0 where a gradient is 0
        ({"eps": float("nan")}, "eps"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        NanoGPTModule(GPTConfig(**TINY), **kwargs)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_val_loss_is_averaged_in_float32_under_half_precision(precision: str) -> None:
    """Lightning's half-precision plugins cast the metrics too: val/loss was summed in bfloat16 and read
    4.75 for a true mean of 5.49 over 200 batches (model review)."""
    torch.manual_seed(0)
    module = NanoGPTModule(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
    data = TextDataModule(block_size=32, batch_size=4, val_batches=200)
    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    logged = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    module.eval()
    with torch.no_grad():
        losses = torch.stack([module(x, y)[1].float() for x, y in data.val_dataloader()])
    assert logged == pytest.approx(losses.mean().item(), rel=1e-5)


class _DivergesOnSomeBatches(NanoGPTModule):
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if batch_idx % 4 == 0:  # as a model that overflows on some inputs
            self.val_loss.update(torch.tensor(float("nan")))
        else:
            super().validation_step(batch, batch_idx)


def test_a_nan_validation_loss_makes_val_loss_nan() -> None:
    """The metric's default dropped NaN batches (with a warning) and logged the finite ones' mean: a
    partly diverged model reported a healthy loss (model review)."""
    module = _DivergesOnSomeBatches(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
    data = TextDataModule(block_size=32, batch_size=1, val_batches=8)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert math.isnan(trainer.validate(module, data, verbose=False)[0]["val/loss"])


def test_a_model_cropped_after_construction_saves_a_checkpoint_that_reloads(tmp_path: Path) -> None:
    """crop_block_size replaced GPT.config only: the module's config and hparams kept block 64, the data
    check passed a block the model no longer had, and the checkpoint did not load (model review)."""
    module = NanoGPTModule(GPTConfig(**{**TINY, "block_size": 64}))
    module.model.crop_block_size(16)
    assert module.config.block_size == 16
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="data block_size=32 exceeds the model's config.block_size=16"):
        trainer.fit(module, TextDataModule(block_size=32, batch_size=2))
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, TextDataModule(block_size=16, batch_size=2))
    trainer.save_checkpoint(tmp_path / "cropped.ckpt")
    reloaded = NanoGPTModule.load_from_checkpoint(tmp_path / "cropped.ckpt", weights_only=True)
    assert reloaded.config.block_size == 16
    assert torch.equal(reloaded.model.transformer.wpe.weight, module.model.transformer.wpe.weight)


class _OwnOptimizer(NanoGPTModule):
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)}


def test_a_subclass_with_its_own_optimizer_keeps_its_learning_rate(tmp_path: Path) -> None:
    """on_train_start reset every LambdaLR with one rate to hparams.learning_rate: a subclass's SGD at 0.1
    trained at 6e-4 (diff review). Only the module's own scheduler is reset."""
    recorder = _Recorder()
    _trainer(tmp_path, max_steps=2, callbacks=[recorder]).fit(_OwnOptimizer(GPTConfig(**TINY)), _data())
    assert [lrs[0] for lrs in recorder.lrs] == [0.1, 0.1]


class _OwnOptimizerOnly(_OwnOptimizer):
    """`_OwnOptimizer` without the hyper-parameters of the recipe it replaces (a derived class's
    ``save_hyperparameters(ignore=...)`` removes those its base saved, where Lightning has remove_ignored_hparams)."""

    def __init__(self) -> None:
        super().__init__(GPTConfig(**TINY))
        self.save_hyperparameters(ignore=["config", "learning_rate", "weight_decay", "betas", "warmup_steps",
                                          "lr_decay_steps", "min_lr", "eps"])


class _OwnCompileOnly(NanoGPTModule):
    """The module's recipe with a ``configure_model`` of its own, without the ``compile`` flag it replaces."""

    def __init__(self) -> None:
        super().__init__(GPTConfig(**TINY), learning_rate=LR, warmup_steps=WARMUP, min_lr=MIN_LR)
        self.save_hyperparameters(ignore=["config", "compile"])

    def configure_model(self) -> None:
        pass


@pytest.mark.parametrize("module_class", [_OwnOptimizerOnly, _OwnCompileOnly])
def test_a_subclass_drops_the_hyperparameters_of_the_hook_it_replaces(tmp_path: Path, module_class: type) -> None:
    """Each hook reads the hyper-parameters it uses, as before the typed view (`_hyperparameters`): it read all of
    them, so configure_model (which needs ``compile``) stopped the fit of a subclass with its own optimizer that
    dropped the recipe's, with a KeyError, and configure_optimizers one with its own configure_model (review)."""
    module = module_class()
    dropped = {"learning_rate"} if module_class is _OwnOptimizerOnly else {"compile"}
    if dropped & set(module.hparams):
        pytest.skip("this Lightning keeps the hyper-parameters a base class saved")
    recorder = _Recorder()
    _trainer(tmp_path, max_steps=2, callbacks=[recorder]).fit(module, _data())
    assert len(recorder.lrs) == 2


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_with_clipping_is_bitwise_nanogpts_loop(tmp_path: Path, accumulate: int) -> None:
    """Karpathy's train.py loop (tests/karpathy_gpt.py's model, his AdamW groups and get_lr, gradient
    accumulation, ``clip_grad_norm_(model.parameters(), 1.0)``) against the module under a Trainer, on
    the same batches: the same weights, bit for bit. Lightning's clipping summed the norm over the
    optimizer's groups, matrices first: 3.6e-6 apart after 12 steps (nanogpt review)."""
    from karpathy_gpt import GPT as KarpathyGPT
    from karpathy_gpt import GPTConfig as KarpathyConfig

    steps, warmup, lr, min_lr = 8, 3, 3e-2, 3e-3  # a rate that makes the clip bite at every step
    config = dict(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=True)
    clipped: list[bool] = []

    class Norms(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
            norm = torch.stack([p.grad.norm() for p in pl_module.model.parameters()]).norm()
            clipped.append(bool(norm > 1.0))

    L.seed_everything(1337, verbose=False)
    module = NanoGPTModule(GPTConfig(**config), learning_rate=lr, min_lr=min_lr, warmup_steps=warmup)
    data = _data(batches_per_epoch=steps * accumulate)
    _trainer(tmp_path, max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[Norms()]).fit(module, data)
    assert any(clipped), "the clip never applied: the test would not see its order"

    L.seed_everything(1337, verbose=False)
    model = KarpathyGPT(KarpathyConfig(**config))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    batches = data.train_dataloader()  # batch k as the fit drew it
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _karpathy_get_lr(step, lr, warmup, steps, min_lr)
        for micro in range(accumulate):
            x, y = batches._batch(step * accumulate + micro, 0)
            _, loss = model(x, y)
            (loss / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    ours = module.model.state_dict()
    assert all(torch.equal(value, ours[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize(("per_epoch", "limit", "said"), [
    (10, 1.0, "an epoch of 10 training batches .* accumulate_grad_batches=4: .* a step over 2 micro-batch"),
    (8, 6, "an epoch of 6 training batches"),  # the epoch Lightning runs
    (8, 0.75, "an epoch of 6 training batches"),
    (10, 8, None),  # limit_train_batches makes the epoch whole: nothing to say (diff review)
    (12, 1.0, None),
])
def test_an_epoch_that_is_not_a_whole_number_of_accumulated_steps_is_warned_about(
        tmp_path: Path, per_epoch: int, limit: int | float, said: str | None) -> None:
    """Lightning steps the optimizer at each epoch's last batch: 10 batches per epoch with 4 accumulated
    gave steps over 4, 4 and 2 micro-batches, the last one's gradient half as large (nanogpt review)."""
    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=LR)
    trainer = _trainer(tmp_path, max_steps=4, accumulate_grad_batches=4, limit_train_batches=limit)
    assert _accumulation_warnings(lambda: trainer.fit(module, _data(batches_per_epoch=per_epoch)), said)


def _accumulation_warnings(fit: Any, said: str | None) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    found = [str(w.message) for w in caught if "accumulate_grad_batches" in str(w.message)]
    assert (not found) if said is None else (len(found) == 1 and re.search(said, found[0])), found
    return True


def test_the_short_epoch_warning_sees_a_bare_loader_and_an_accumulation_schedule(tmp_path: Path) -> None:
    """Read from the datamodule's batches_per_epoch in setup, it missed a loader passed without its
    datamodule and the accumulation a GradientAccumulationScheduler sets at epoch start (diff review)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    module = NanoGPTModule(GPTConfig(**TINY), learning_rate=LR)
    loader = _data(batches_per_epoch=10).train_dataloader()
    trainer = _trainer(tmp_path, max_steps=3, accumulate_grad_batches=4)
    assert _accumulation_warnings(lambda: trainer.fit(module, train_dataloaders=loader), "an epoch of 10 training")
    scheduled = _trainer(tmp_path, max_steps=3, callbacks=[GradientAccumulationScheduler({0: 4})])
    assert _accumulation_warnings(lambda: scheduled.fit(module, _data(batches_per_epoch=10)), "=4: ")
    # a later epoch's other remainder is said too; a fit resumed mid-epoch runs no epoch start (diff review)
    changing = _trainer(tmp_path, max_steps=8, callbacks=[GradientAccumulationScheduler({0: 4, 1: 3})])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        changing.fit(module, _data(batches_per_epoch=10))
    said = [str(w.message) for w in caught if "accumulate_grad_batches" in str(w.message)]
    assert [re.search(r"=(\d): .* over (\d) micro", m).groups() for m in said] == [("4", "2"), ("3", "1")], said
    first = _trainer(tmp_path, max_steps=1, accumulate_grad_batches=4, enable_checkpointing=True)
    first.fit(module, _data(batches_per_epoch=10))
    quick = _trainer(tmp_path, fast_dev_run=True, accumulate_grad_batches=4)  # a debug run: its own batch count
    assert _accumulation_warnings(lambda: quick.fit(module, _data(batches_per_epoch=10)), None)
    resumed = _trainer(tmp_path, max_steps=3, accumulate_grad_batches=4)
    assert _accumulation_warnings(lambda: resumed.fit(module, _data(batches_per_epoch=10),
                                                      ckpt_path=first.checkpoint_callback.best_model_path),
                                  "an epoch of 10 training")


def test_lightning_still_refuses_to_clip_a_self_unscaling_optimizer_under_mixed_precision_naming_it(
        tmp_path: Path) -> None:
    """The clipping view of the parameters (`configure_gradient_clipping`) is not handed over here: Lightning's
    refusal named the view's class, ``_InModuleOrder``, instead of the user's optimizer (diff review)."""

    class Fused(NanoGPTModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.model.optim_groups(0.1), lr=1e-3, fused=True)

    trainer = _trainer(tmp_path, max_steps=1, precision="bf16-mixed")
    with pytest.raises(RuntimeError, match=r"The current optimizer, AdamW, does not allow for gradient clipping"):
        trainer.fit(Fused(GPTConfig(**TINY)), _data())
