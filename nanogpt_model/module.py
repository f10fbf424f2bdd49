"""``NanoGPTModule``: nanoGPT's training recipe as a Lightning ``LightningModule``."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, NamedTuple, Sequence, overload

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from torch.optim import Optimizer

from nanogpt_model.config import GPTConfig
from nanogpt_model.model import GPT

RNG_STATE_KEY = "nanogpt_rng_states"
"""Where `NanoGPTModule` keeps the global torch RNG states in a Lightning checkpoint."""


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """nanoGPT's ``get_lr`` as a multiplier of the peak rate: linear warm-up, cosine decay, floor.

    The peak rate times this multiplier is ``get_lr``'s value to rounding only (1-2 ulp apart at about a
    third of the steps); `nanogpt_lr` is that value itself, which `NanoGPTModule` trains with."""
    return nanogpt_lr(step, 1.0, warmup_steps, decay_steps, min_lr_ratio)  # the same operations at a peak of 1


@overload
def nanogpt_lr(step: int, learning_rate: float, warmup_steps: int, decay_steps: int | None, min_lr: float) -> float: ...


@overload
def nanogpt_lr(
    step: int, learning_rate: Tensor, warmup_steps: int, decay_steps: int | None, min_lr: float
) -> float | Tensor: ...


def nanogpt_lr(
    step: int, learning_rate: float | Tensor, warmup_steps: int, decay_steps: int | None, min_lr: float
) -> float | Tensor:
    """The rate of step ``step``, computed as nanoGPT's ``get_lr(it)`` computes it (the same float
    operations, so the same bits): ``learning_rate * (it + 1) / (warmup_iters + 1)`` in the warm-up,
    ``min_lr + coeff * (learning_rate - min_lr)`` on the cosine, ``min_lr`` past ``decay_steps``.
    ``decay_steps=None``: the warm-up, then ``learning_rate`` (no decay). A tensor ``learning_rate`` (an
    optimizer's ``lr=torch.tensor(...)``, which PyTorch takes) gives tensors, but the float ``min_lr`` past
    ``decay_steps``."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / (warmup_steps + 1)
    if decay_steps is None:
        return learning_rate
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """`NanoGPTModule`'s schedule: a ``LambdaLR`` over `warmup_cosine` whose rates are `nanogpt_lr`'s
    of each group's base rate, nanoGPT's ``get_lr`` values bit for bit. ``LambdaLR``'s
    ``base_lr * factor`` rounded 1-2 ulp away from them at about a third of the steps (shakespeare_char's
    step 8: 8.910891089108912e-05 against 8.91089108910891e-05; nanogpt review).

    ``state_dict`` leaves out the schedule's settings: a resumed fit takes its own (another
    ``max_steps``, ``min_lr``), as it takes its own learning rate (`NanoGPTModule.on_train_start`)."""

    _SETTINGS = ("warmup_steps", "decay_steps", "min_lr")

    def __init__(self, optimizer: Optimizer, warmup_steps: int, decay_steps: int | None, min_lr: float) -> None:
        self.warmup_steps, self.decay_steps, self.min_lr = warmup_steps, decay_steps, min_lr
        peak = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        # the multiplier LambdaLR keeps (its lr_lambdas): the rate at a peak of 1, whatever decay_steps
        super().__init__(optimizer, lambda step: nanogpt_lr(step, 1.0, warmup_steps, decay_steps, min_lr / peak))

    def rates(self, step: int) -> list[float | Tensor]:
        """Each group's rate at ``step``."""
        return [nanogpt_lr(step, base, self.warmup_steps, self.decay_steps, self.min_lr) for base in self.base_lrs]

    def get_lr(self) -> list[float | Tensor]:
        return self.rates(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in super().state_dict().items() if key not in self._SETTINGS}


class _InModuleOrder:
    """``optimizer`` with one parameter group listing ``params`` (the model's, in its order), for gradient
    clipping to read (`NanoGPTModule.configure_gradient_clipping`); every other attribute is the
    optimizer's, e.g. what tells Lightning that it unscales its own gradients."""

    def __init__(self, optimizer: Optimizer, params: Sequence[Tensor]) -> None:
        self.optimizer = optimizer
        self.param_groups: list[dict[str, Any]] = [{"params": params}]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


def _loggers_write_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this optimizer step's on-step metrics to the loggers once the step ends:
    every ``log_every_n_steps`` steps, the step at which the fit is told to stop, every step under
    ``fast_dev_run``; not a micro-batch that only accumulates gradients. Lightning's own test, which its
    ``LearningRateMonitor`` reads too (``_LoggerConnector.should_update_logs``); every step where a
    Lightning version lacks it."""
    accumulates = getattr(trainer.fit_loop, "_should_accumulate", None)
    if accumulates is not None and accumulates():
        return False
    fast_dev_run = trainer.fast_dev_run  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
    return bool(fast_dev_run or getattr(trainer._logger_connector, "should_update_logs", True))


def float16_eps_floor(beta2: float) -> float:
    """The smallest AdamW ``eps`` that keeps float16 moments' updates at most about ``lr``.

    Under true float16 (``precision="16-true"``) AdamW's second moment is float16: after a step,
    ``(1 - beta2) * g**2`` rounds to 0 below float16's smallest step ``2**-24``, i.e. for
    ``|g| < sqrt(2**-24 / (1 - beta2))``, while the first moment ``g`` does not, so the update is
    ``lr * g / eps``. An ``eps`` at least that bound keeps it at most ``lr``, Adam's scale; nanoGPT's
    1e-8 (0 in float16: AdamW divided 0 by 0 at a byte vocabulary's unused rows, and the weights
    were NaN after the first step) or 1e-6 moved such weights by hundreds of ``lr`` and stalled
    training (precision review). 1.09e-3 for nanoGPT's ``beta2 = 0.95``.
    """
    return math.sqrt(2.0**-24 / (1.0 - beta2))


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits (1.09e-3 -> 1.1e-3)."""
    unit = 10.0 ** (math.floor(math.log10(value)) - 1)
    return float(f"{math.ceil(value / unit) * unit:.2g}")


class _Hyperparameters(NamedTuple):
    """`NanoGPTModule`'s optimiser and schedule hyper-parameters (those ``configure_optimizers`` reads), typed
    (Lightning types ``hparams`` as a ``MutableMapping``), as its ``hparams`` hold them when read: Lightning's
    learning-rate finder, or a user, may change them after ``__init__``. Not ``compile``, which
    ``configure_model`` reads alone: a subclass that replaces one of the two hooks may drop the other's
    (a derived class's ``save_hyperparameters(ignore=...)`` removes what its base saved)."""

    learning_rate: float
    weight_decay: float
    betas: Sequence[float]  # a list when read back from YAML
    warmup_steps: int
    lr_decay_steps: int | None
    min_lr: float
    eps: float


class NanoGPTModule(L.LightningModule):
    """Trains a :class:`~nanogpt_model.GPT` with nanoGPT's optimiser and schedule.

    The ``GPT`` is ``self.model`` (the convention ``LensCallback`` looks for). Gradient clipping is
    the Trainer's (``gradient_clip_val: 1.0`` in the configs, nanoGPT's ``grad_clip``), by the norm
    over ``self.model.parameters()`` in their order, as nanoGPT's ``clip_grad_norm_`` (Lightning sums
    the optimizer's groups, matrices first, which rounds otherwise: `configure_gradient_clipping`). An
    epoch that is not a whole number of accumulated steps is warned about
    (`_warn_short_accumulation`). On CUDA the
    AdamW is nanoGPT's fused one, except under a mixed-precision Trainer that clips: Lightning
    refuses to clip the gradients of an optimizer that unscales them itself, as fused AdamW does
    (nanoGPT clips after its own ``scaler.unscale_``), so there the default multi-tensor AdamW runs.
    Checkpoints carry the global torch RNG states (CPU, CUDA and MPS), which draw the dropout masks, so
    a run resumed with ``dropout > 0`` continues as the uninterrupted run would (Lightning saves
    the data order and the schedule, not the RNG). They are restored when a fit resumes under the
    seed the checkpoint was written with, only then (`on_load_checkpoint`). A second ``fit`` on the same
    Trainer (more steps) continues the schedule from ``global_step``; Lightning builds the optimizer
    anew for it, so AdamW's moments start from zero there (resume from a checkpoint to keep them).

    Args:
        config: The architecture (a mapping is accepted too, as stored in checkpoints).
        learning_rate: Peak learning rate.
        weight_decay: AdamW decay for matrices and embeddings (biases and norm gains never decay).
        betas: AdamW betas.
        warmup_steps: Linear warm-up steps.
        lr_decay_steps: Step at which the cosine reaches ``min_lr``, after ``warmup_steps``; ``None``
            means the Trainer's ``max_steps`` (or no decay when that is unbounded; a ``max_steps`` within
            the warm-up ends the run there, as in nanoGPT).
        min_lr: Floor of the schedule.
        compile: Wrap the model in ``torch.compile`` at fit start (the parameters are shared, so
            ``self.model`` stays the plain ``GPT`` and ``state_dict`` keys keep nanoGPT's names).
        eps: AdamW's ``eps`` (nanoGPT keeps PyTorch's 1e-8). Under ``precision="16-true"`` the
            weights and AdamW's moments are float16, and an ``eps`` under `float16_eps_floor` is refused
            when the optimizer is built (1.1e-3 for ``betas[1] = 0.95``). A resumed fit takes this
            ``eps``, not the one its checkpoint's optimizer state holds (as it takes its learning rate).
    """

    def __init__(
        self,
        config: GPTConfig | None = None,
        learning_rate: float = 6e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        min_lr: float = 6e-5,
        compile: bool = False,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if config is None:
            config = GPTConfig()
        elif not isinstance(config, GPTConfig):
            config = GPTConfig.from_dict(config)
        if not 0 < learning_rate < math.inf:  # also refuses NaN
            raise ValueError(f"learning_rate must be a finite positive number, got {learning_rate!r}")
        if not 0 <= min_lr <= learning_rate:
            raise ValueError(f"min_lr must be in [0, learning_rate={learning_rate}], got {min_lr!r}")
        if not 0 <= weight_decay < math.inf:  # AdamW refuses a negative one, but not inside a parameter group
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not 0 < eps < math.inf:  # AdamW takes 0, which divides 0 by 0 where a gradient is 0
            raise ValueError(f"eps must be a finite positive number, got {eps!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        if lr_decay_steps is not None and lr_decay_steps <= 0:
            raise ValueError(f"lr_decay_steps must be positive or None, got {lr_decay_steps!r}")
        if lr_decay_steps is not None and lr_decay_steps <= warmup_steps:  # nanoGPT's get_lr has the same cliff
            raise ValueError(f"lr_decay_steps ({lr_decay_steps}) must be greater than warmup_steps ({warmup_steps}): "
                             f"the warm-up would climb to the peak and the rate then drop to min_lr at once, the cosine "
                             f"never running")
        # hparams hold plain values only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["config"])
        # the architecture as plain values, in hparams_initial too: what loggers record (hparams.yaml,
        # TensorBoard's HPARAMS tab)
        self.save_hyperparameters({**self.hparams, "config": config.to_dict()})
        self.model = GPT(config)
        # a NaN loss makes the mean NaN, as nanoGPT's losses.mean() (the default strategy drops NaN
        # batches with a warning and reports the finite ones' mean)
        self.val_loss = torchmetrics.MeanMetric(nan_strategy="disable")
        # the compiled wrapper shares self.model's parameters; kept out of the module tree so that
        # state_dict keys stay nanoGPT's and the callback finds the plain GPT at self.model
        self.__dict__["_compiled"] = None

    @property
    def config(self) -> GPTConfig:
        """The model's config, ``self.model.config`` (which ``crop_block_size`` replaces)."""
        return self.model.config

    def _hyperparameters(self) -> _Hyperparameters:
        """``self.hparams``' values now, typed."""
        return _Hyperparameters(**{name: self.hparams[name] for name in _Hyperparameters._fields})

    def configure_model(self) -> None:
        if self.hparams["compile"] and self.__dict__["_compiled"] is None:  # not `_hyperparameters`' keys
            self.__dict__["_compiled"] = torch.compile(self.model)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        compiled = self.__dict__["_compiled"]
        return (compiled if compiled is not None else self.model)(idx, targets)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        vocab = getattr(datamodule, "vocab_size", None)
        if datamodule is not None and vocab is None and hasattr(datamodule, "setup"):
            datamodule.setup(stage)
            vocab = getattr(datamodule, "vocab_size", None)
        if isinstance(vocab, int) and vocab > self.config.vocab_size:
            raise ValueError(
                f"the data has vocab_size={vocab} but model config.vocab_size={self.config.vocab_size}"
            )
        block = getattr(datamodule, "block_size", None)
        if isinstance(block, int) and block > self.config.block_size:
            raise ValueError(
                f"data block_size={block} exceeds the model's config.block_size={self.config.block_size}"
            )

    def _warn_short_accumulation(self) -> None:
        """Warns when an epoch (Lightning's ``num_training_batches``: the loader's length as
        ``limit_train_batches`` or ``fast_dev_run`` cuts it) is not a whole number of accumulated steps
        at the accumulation in effect (a ``GradientAccumulationScheduler`` sets it at epoch start).
        Lightning steps the optimizer at an epoch's last batch, so such an epoch ends in a step over the
        remainder, its loss still divided by ``accumulate_grad_batches``: a smaller gradient, and a
        schedule step, that nanoGPT's loop does not take (nanogpt review). A warning, not an error: the
        run is sound, only not nanoGPT's. Checked at train start (a fit resumed mid-epoch runs no epoch
        start) and at each epoch start; said once per fit and (epoch length, accumulation) pair. Not
        under ``fast_dev_run``, a debug run whose batch count is its own."""
        trainer = self.trainer
        batches, accumulate = trainer.num_training_batches, trainer.accumulate_grad_batches
        fast_dev_run = trainer.fast_dev_run  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        if (fast_dev_run or not isinstance(accumulate, int) or accumulate <= 1
                or not isinstance(batches, int) or batches <= 0):
            return
        said = self.__dict__.setdefault("_accumulation_warned", set())
        if batches % accumulate and (batches, accumulate) not in said:
            said.add((batches, accumulate))
            rank_zero_warn(
                f"NanoGPTModule: an epoch of {batches} training batches (the loader's length, e.g. the "
                f"datamodule's batches_per_epoch, as limit_train_batches cuts it) is not a multiple of "
                f"accumulate_grad_batches={accumulate}: Lightning steps the optimizer at each epoch's last "
                f"batch, so such an epoch ends in a step over {batches % accumulate} micro-batch(es), a "
                f"smaller gradient than nanoGPT's steps; make the epoch a multiple of {accumulate}")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        _, loss = self(x, y)
        value = loss.detach()
        # every step: the progress bar and callbacks that monitor it (a ModelCheckpoint, EarlyStopping)
        self.log("train/loss", value, on_step=True, on_epoch=False, prog_bar=True)
        # and the rate this step's update uses (the scheduler steps after the optimizer); a training_step
        # called outside a Trainer, as in a unit test, has none
        trainer = self._trainer
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer is not None and trainer.optimizers else None
        self.__dict__["_step_values"] = (value, lr)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Logs ``train/ppl`` and ``lr`` at the steps whose on-step metrics the Trainer's loggers write
        (`_loggers_write_this_step`), not at every step: each ``self.log`` call moves Lightning's stored
        result to the value's device, changed or not, and these two calls per step, with the loss logged
        through a ``MeanMetric``, were about half of Lightning's host time over a plain loop's for a small
        model. Lightning calls this hook after the callbacks' ``on_train_batch_end``, so a stop that one
        of them requests is a logged step with its own values; callbacks see those of the previous
        logged step. The perplexity is the float32 loss's (under ``bf16-true`` it was bfloat16's: 174.0
        for 173.51); the rate goes as a host tensor (a Python float is copied to the module's device, a
        synchronisation on a GPU)."""
        values = self.__dict__.pop("_step_values", None)
        if values is None or not _loggers_write_this_step(self.trainer):
            return
        loss, lr = values
        self.log("train/ppl", torch.exp(loss.float()), on_step=True, on_epoch=False)
        if lr is not None:
            self.log("lr", torch.tensor(lr, dtype=torch.float32), on_step=True, on_epoch=False)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self(x, y)
        self.val_loss.update(loss)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # synchronised across processes by torchmetrics
        self.val_loss.reset()
        # already synchronised: `sync_dist=True` tells Lightning so (under DDP it warned at every validation
        # that each rank logged its own value); with `rank_zero_only=True` its sync is a no-op, no collective
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, rank_zero_only=True)
        self.log("val/ppl", torch.exp(loss), sync_dist=True, rank_zero_only=True)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        h = self._hyperparameters()
        beta1, beta2 = h.betas
        self._check_float16_eps(h.eps, beta2)
        optimizer = torch.optim.AdamW(
            self.model.optim_groups(h.weight_decay), lr=h.learning_rate, betas=(beta1, beta2), eps=h.eps,
            **({"fused": True} if self.device.type == "cuda" and not self._clips_under_mixed_precision() else {}),
        )
        decay_steps = h.lr_decay_steps
        if decay_steps is None:
            max_steps = self.trainer.max_steps if self._trainer is not None else -1
            decay_steps = max_steps if max_steps and max_steps > 0 else None
        scheduler = WarmupCosineLR(optimizer, h.warmup_steps, decay_steps, h.min_lr)
        self.__dict__["_own_scheduler"] = scheduler  # on_train_start resets this one's peak rate, no other
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Lightning's clipping, with the gradient norm summed over the model's parameters in their order,
        as nanoGPT's ``clip_grad_norm_(model.parameters())``: Lightning's precision plugins sum the
        optimizer's groups (the matrices, then the biases and gains), which rounds the norm, so the clip
        factor, otherwise, and training drifted from nanoGPT's bits (3.6e-6 in 12 steps; nanogpt review).
        Only where the optimizer holds exactly the model's parameters; one that unscales its own gradients
        under mixed precision goes to Lightning as it is, which refuses to clip it, naming it."""
        own = list(self.model.parameters())
        held = [p for group in optimizer.param_groups for p in group["params"]]
        # an optimizer that unscales its own gradients under mixed precision: Lightning refuses to clip, and
        # its message names the optimizer's class, which the view would replace (diff review)
        refused = isinstance(self.trainer.precision_plugin, MixedPrecision) and getattr(
            optimizer, "_step_supports_amp_scaling", False)
        clipped: Optimizer | _InModuleOrder = optimizer
        if not refused and len(held) == len(own) and {id(p) for p in held} == {id(p) for p in own}:
            clipped = _InModuleOrder(optimizer, own)
        # Lightning types an Optimizer: the view is no subclass, but has what its clipping reads (param_groups and,
        # the optimizer's, every other attribute)
        self.clip_gradients(clipped, gradient_clip_val, gradient_clip_algorithm)  # type: ignore[arg-type]

    def _check_float16_eps(self, eps: float, beta2: float) -> None:
        """Refuses an AdamW ``eps`` under `float16_eps_floor` where the weights are float16."""
        floor = float16_eps_floor(beta2)
        if eps >= floor or not any(p.dtype == torch.float16 for p in self.model.parameters()):
            return
        resumed = self._trainer is not None and self.trainer.ckpt_path is not None
        raise ValueError(
            f"eps={eps} is too small for float16 weights (the Trainer's precision "
            f"{getattr(self._trainer, 'precision', None)!r}): AdamW keeps its moments in float16, where "
            f"(1 - beta2) * g**2 is 0 for |g| < {floor:.2g}, and such a weight moves by lr * g / eps instead of at "
            f"most about lr (up to {floor / eps:.3g} x lr; at eps=1e-8 the weights go NaN at the first step); pass "
            f"--model.eps={_round_up(floor)} (float16_eps_floor(beta2={beta2})) or train in bf16-true or 16-mixed"
            + (" (resuming a checkpoint, lens-train takes the model's settings from its hyper-parameters over the "
               "command line, as LightningCLI does: build NanoGPTModule(..., eps=...) and call Trainer.fit(module, "
               "ckpt_path=...) from Python, whose eps the resumed optimizer takes)" if resumed else ""))

    def _clips_under_mixed_precision(self) -> bool:
        """Whether the Trainer clips gradients under Lightning's ``MixedPrecision`` plugin (16-mixed,
        bf16-mixed), whose ``clip_gradients`` raises for an optimizer that unscales its own gradients."""
        if self._trainer is None:
            return False
        return bool(self.trainer.gradient_clip_val) and isinstance(self.trainer.precision_plugin, MixedPrecision)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the model's config as it is now: model surgery (crop_block_size) changes it after __init__,
        # and a checkpoint with the constructor's config would not load its own weights
        self.hparams["config"] = self.model.config.to_dict()
        if isinstance(checkpoint.get("hyper_parameters"), dict):
            checkpoint["hyper_parameters"]["config"] = self.model.config.to_dict()
        rng: dict[str, Any] = {"cpu": torch.get_rng_state(), "seed": os.environ.get("PL_GLOBAL_SEED")}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # the writing rank's own device's: under DDP rank 0 writes the checkpoint, and its process
            # holds the other devices' generators as seeded, never advanced (each rank draws on its own
            # device); ranks seeded alike draw alike, so every rank resumes from this one
            rng["cuda_device"] = torch.cuda.get_rng_state()
        if torch.backends.mps.is_available():  # a Mac's dropout draws on MPS's one generator (Lightning keeps
            # only CPU and CUDA states in its own `_collect_rng_states`; device review)
            rng["mps"] = torch.mps.get_rng_state()
        checkpoint[RNG_STATE_KEY] = rng

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the RNG states of a resumed fit, and only there: not for ``load_from_checkpoint``
        or ``validate``/``test(ckpt_path=...)``, and not when the fit was seeded otherwise than the
        run that wrote the checkpoint (``seed_everything``: a resume with a new seed asks for new
        dropout masks)."""
        rng = checkpoint.get(RNG_STATE_KEY)
        if not isinstance(rng, Mapping):  # a checkpoint written before the states were saved
            return
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        if rng.get("seed") != os.environ.get("PL_GLOBAL_SEED"):
            rank_zero_info(f"NanoGPTModule: the run is seeded with {os.environ.get('PL_GLOBAL_SEED')}, its checkpoint "
                           f"with {rng.get('seed')}: the RNG states are not restored (new dropout masks)")
            return
        if isinstance(rng.get("cpu"), Tensor):
            torch.set_rng_state(rng["cpu"])
        if isinstance(rng.get("mps"), Tensor) and torch.backends.mps.is_available():
            torch.mps.set_rng_state(rng["mps"])
        if not torch.cuda.is_available():
            return
        if isinstance(rng.get("cuda_device"), Tensor):
            torch.cuda.set_rng_state(rng["cuda_device"])  # this rank's device (the current one)
            return
        cuda = rng.get("cuda")  # every device's, as checkpoints before the thirty-sixth session hold them
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

    def on_train_epoch_start(self) -> None:
        self._warn_short_accumulation()

    def on_validation_epoch_start(self) -> None:
        # Lightning's half-precision plugins ("bf16-true", "16-true") cast the module, metrics
        # included, with .to(dtype): a bfloat16 running sum of ~5.5-nat losses holds only even
        # numbers past 256, and val/loss came out 13 % low over 200 batches. Sums stay float32
        self.val_loss.set_dtype(torch.float32)

    def on_fit_start(self) -> None:
        # a trainer.validate before this fit ran the metrics' reset under inference mode, which left
        # their states inference tensors that this fit's validation cannot update in place
        self.val_loss.reset()

    def on_train_start(self) -> None:
        self.__dict__["_accumulation_warned"] = set()  # `_warn_short_accumulation`: once per fit and pair
        self._warn_short_accumulation()
        # each step's rate comes from the run's own schedule and peak rate, as nanoGPT's
        # get_lr(iter_num) does with the resumed config's learning_rate: a run resumed with another
        # length would otherwise take its first step at the rate stored in the checkpoint's optimizer
        # state, and one resumed with another learning_rate at the checkpoint's peak (LambdaLR's
        # base_lrs come back from its state), under the new min_lr ratio. A run from step 0 gets
        # the value the scheduler set (the same rate). A fit that continues its trainer's steps (a second fit)
        # gets a new scheduler at 0 from Lightning: it goes on from global_step, not from the warm-up
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                groups = scheduler.optimizer.param_groups
                if scheduler is self.__dict__.get("_own_scheduler"):  # this module's recipe, not a subclass's
                    h = self._hyperparameters()
                    # the run's eps too: a resumed optimizer's groups come back with the checkpoint's, which
                    # configure_optimizers' float16 check never saw (a 1e-8 took 16-true to NaN; diff review)
                    for group in groups:
                        group["eps"] = float(h.eps)
                        self._check_float16_eps(group["eps"], group["betas"][1])
                    scheduler.last_epoch = self.trainer.global_step  # one scheduler step per optimizer step
                    scheduler.base_lrs = [float(h.learning_rate)] * len(groups)
                    for group in groups:
                        group["initial_lr"] = float(h.learning_rate)
                if isinstance(scheduler, WarmupCosineLR):
                    rates = scheduler.rates(scheduler.last_epoch)
                else:
                    rates = [base * factor(scheduler.last_epoch)
                             for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
                for group, rate in zip(groups, rates):
                    group["lr"] = rate

