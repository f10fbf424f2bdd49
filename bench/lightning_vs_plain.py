"""P3: training tokens/s of ``NanoGPTModule`` under a Lightning ``Trainer`` vs a plain PyTorch loop.

Both runners train the same ``GPT`` object on the same pre-generated ``WindowBatches`` (so data cost
is identical and excluded), with nanoGPT's AdamW groups, gradient clipping at 1.0 and the warm-up +
cosine schedule; the Trainer has no logger, checkpointing, progress bar, model summary or validation, and
the config's `log_every_n_steps`, at which `NanoGPTModule` logs its step metrics.
Each round is one short fit per runner; the runners alternate (and swap order every round) in one
process after one untimed round each, and the first ``warmup`` steps of every round are not timed, so
start-up (``Trainer`` construction, ``fit`` set-up and tear-down) is excluded: the ratio compares
steady-state step cost. A step is timed from the end of one optimizer step to the end of the next
(data fetch, hooks, forward, backward, clipping, optimizer, scheduler, logging bookkeeping).

Per round, tokens/s is reported twice: over the wall time of the timed steps (``P3``, the headline),
and over the median step (``ratio_median_step``), which short bursts of other processes move less.
On a CPU shared with other jobs, multi-threaded kernels stall when a thread is descheduled (step
times then swing by 2x or more); ``--threads 1`` gives steady numbers there.

Usage: ``python bench/lightning_vs_plain.py [--steps 20] [--rounds 3] [--warmup 3] [--device cpu]
[--config configs/default.yaml] [--model-config '{"vocab_size": 256}'] [--threads N]``. The batches are the
embedded corpus's bytes: a config trained on another vocabulary needs ``--model-config '{"vocab_size": 256}'``
(e.g. ``configs/shakespeare_char.yaml``). The last line reads ``P3 lightning/plain=<ratio>`` (medians).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping

import lightning as L
import torch
import yaml
from torch import Tensor

from nanogpt_model import GPT, GPTConfig, NanoGPTModule, default_corpus
from nanogpt_model.data import WindowBatches
from nanogpt_model.module import WarmupCosineLR

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
_MODULE_ARGS = ("learning_rate", "weight_decay", "betas", "eps", "warmup_steps", "lr_decay_steps", "min_lr")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Replay:
    """The same pre-generated batches on every pass (a plain ``list`` would be read by Lightning as a
    list of dataloaders)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.batches)


def trainer_devices(device: torch.device) -> int | list[int]:
    """A ``Trainer``'s ``devices`` for ``device``: ``cuda:N`` is GPU N (``devices=1`` would be GPU 0,
    while the plain side runs on N)."""
    return [device.index or 0] if device.type == "cuda" else 1


class StepClock(L.Callback):
    """Records the end time of every optimizer step (after the optimizer and scheduler steps; under
    gradient accumulation, the end of its last micro-batch), synchronised on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []
        self._step = 0  # the global step at the last end recorded; a fit's first step makes it 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            _sync(self.device)
            self.ends.append(time.perf_counter())


def _lightning_round(module: NanoGPTModule, batches: list[tuple[Tensor, Tensor]], device: torch.device,
                     log_every_n_steps: int = 50) -> list[float]:
    """Step end times of one fit over ``batches``; the module logs its step metrics every
    ``log_every_n_steps`` steps (the run config's), as in the run."""
    clock = StepClock(device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else device.type, devices=trainer_devices(device), max_steps=len(batches),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=[clock],
        log_every_n_steps=log_every_n_steps,
    )
    trainer.fit(module, train_dataloaders=_Replay(batches))
    return clock.ends


def _plain_round(module: NanoGPTModule, batches: list[tuple[Tensor, Tensor]], device: torch.device
                 ) -> list[float]:
    """Step end times of nanoGPT's loop over ``module.model``, with the module's hyper-parameters: the
    weights it trains are the Lightning round's bit for bit on the CPU (tested), so P3 compares one training."""
    h = module.hparams
    model: GPT = module.model.to(device).train()
    optimizer = torch.optim.AdamW(model.optim_groups(h.weight_decay), lr=h.learning_rate, betas=tuple(h.betas),
                                  eps=h.eps, **({"fused": True} if device.type == "cuda" else {}))
    # the module's schedule, decaying over the fit's max_steps (here the batches) unless told otherwise
    scheduler = WarmupCosineLR(optimizer, h.warmup_steps, h.lr_decay_steps or len(batches), h.min_lr)
    ends: list[float] = []
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        _sync(device)
        ends.append(time.perf_counter())
    return ends


def measure(
    steps: int = 20,
    rounds: int = 3,
    warmup: int = 3,
    device: str = "cpu",
    config_path: str | Path = DEFAULT_CONFIG,
    seed: int = 0,
    threads: int | None = None,
    model_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measures tokens/s of both runners, interleaved over ``rounds``; returns medians and every round.

    Args:
        steps: Timed optimizer steps per round and runner.
        rounds: Rounds; each runs both runners once, in alternating order.
        warmup: Untimed steps at the start of every round.
        device: ``"cpu"`` or ``"cuda"``.
        config_path: A LightningCLI YAML whose ``model`` and ``data`` sections give the model, its
            optimiser settings, ``block_size`` and ``batch_size``, and whose ``trainer`` section's
            ``log_every_n_steps`` (Lightning's 50 if absent) the Trainer takes (other settings are ignored).
        seed: Seed of the model initialisation and of the batches.
        model_overrides: Fields of the YAML's ``model.config`` to replace (``bench/run.py
            --model-config``), e.g. ``{"vocab_size": 256}`` for a config trained on another
            vocabulary: the batches are the embedded corpus's bytes.
        threads: torch intra-op threads during the measurement (restored after); ``None`` keeps
            torch's setting. On a CPU shared with other jobs, ``1`` avoids the stalls that
            multi-threaded kernels suffer when their threads are descheduled.

    Returns:
        ``ratio`` (median Lightning tokens/s over median plain tokens/s, wall time of the timed
        steps), ``lightning_tokens_per_s``, ``plain_tokens_per_s``, the per-round lists
        ``lightning_rounds`` / ``plain_rounds``, the same from median step times
        (``ratio_median_step``, ``*_rounds_median_step``), and the setup.
    """
    if steps < 1 or rounds < 1 or warmup < 1:
        raise ValueError(f"steps, rounds and warmup must be >= 1, got {steps}, {rounds}, {warmup}")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(steps, rounds, warmup, torch.device(device), Path(config_path), seed, model_overrides)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(steps: int, rounds: int, warmup: int, dev: torch.device, config_path: Path, seed: int,
             model_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(config_path.read_text())
    model_args, data_args = raw.get("model") or {}, raw.get("data") or {}
    config = GPTConfig.from_dict({**(model_args.get("config") or {}), **(model_overrides or {})})
    block_size = min(int(data_args.get("block_size", 256)), config.block_size)
    batch_size = int(data_args.get("batch_size", 16))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = NanoGPTModule(config, **{k: model_args[k] for k in _MODULE_ARGS if k in model_args})
    windows = WindowBatches(default_corpus(), block_size, batch_size, seed=seed, stream=0,
                            num_batches=warmup + steps)
    batches = list(windows)

    log_every = int((raw.get("trainer") or {}).get("log_every_n_steps", 50))
    runners = {"lightning": partial(_lightning_round, log_every_n_steps=log_every), "plain": _plain_round}
    step_times: dict[str, list[list[float]]] = {name: [] for name in runners}  # per round, timed steps
    for run in runners.values():  # one untimed round each: allocator, kernels, lazy imports
        run(module, batches, dev)
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            ends = runners[name](module, batches, dev)
            step_times[name].append([b - a for a, b in zip(ends[warmup - 1 :], ends[warmup:])])
    tokens_per_step = batch_size * block_size
    # per round: tokens / wall time of the timed steps, and tokens / median step (robust to other tenants)
    rounds_wall = {n: [tokens_per_step * len(t) / sum(t) for t in ts] for n, ts in step_times.items()}
    rounds_step = {n: [tokens_per_step / statistics.median(t) for t in ts] for n, ts in step_times.items()}
    median = {n: statistics.median(v) for n, v in rounds_wall.items()}
    median_step = {n: statistics.median(v) for n, v in rounds_step.items()}
    return {
        "ratio": median["lightning"] / median["plain"],
        "ratio_median_step": median_step["lightning"] / median_step["plain"],
        "lightning_tokens_per_s": median["lightning"],
        "plain_tokens_per_s": median["plain"],
        "lightning_rounds": rounds_wall["lightning"],
        "plain_rounds": rounds_wall["plain"],
        "lightning_rounds_median_step": rounds_step["lightning"],
        "plain_rounds_median_step": rounds_step["plain"],
        "steps": steps, "rounds": rounds, "warmup": warmup, "device": str(dev),
        "batch_size": batch_size, "block_size": block_size, "config": config.to_dict(), "log_every_n_steps": log_every,
        "threads": torch.get_num_threads(),
    }


def _table(result: dict[str, Any]) -> str:
    head = ["runner", "measure"] + [f"round {i + 1}" for i in range(result["rounds"])] + ["median tok/s"]
    rows = [
        [name, label] + [f"{v:.0f}" for v in result[f"{name}_rounds{suffix}"]]
        + [f"{statistics.median(result[f'{name}_rounds{suffix}']):.0f}"]
        for suffix, label in (("", "wall"), ("_median_step", "median step"))
        for name in ("lightning", "plain")
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and runner")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--model-config", default=None,
                        help='JSON overriding model.config fields, e.g. \'{"vocab_size": 256}\' for a config on '
                             "another vocabulary (the batches are the embedded corpus's bytes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is steadier on a shared machine")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)  # the Trainer's start-up banners
    try:
        return _report(args)
    finally:  # a caller in the same process (the tests) keeps its level
        lightning_logger.setLevel(level)


def _report(args: argparse.Namespace) -> int:
    result = measure(steps=args.steps, rounds=args.rounds, warmup=args.warmup, device=args.device,
                     config_path=args.config, threads=args.threads,
                     model_overrides=json.loads(args.model_config) if args.model_config else None)
    c = result["config"]
    print(f"device {result['device']}, torch {torch.__version__}, {result['threads']} threads; model "
          f"{c['n_layer']}L {c['n_head']}H {c['n_embd']}d, batch {result['batch_size']} x {result['block_size']} "
          f"tokens; {result['steps']} timed steps after {result['warmup']} per round; step metrics logged every "
          f"{result['log_every_n_steps']} steps")
    print(_table(result))
    print(f"median-step ratio: {result['ratio_median_step']:.3f}")
    print(f"P3 lightning/plain={result['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
