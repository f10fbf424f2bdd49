"""Host time of a probe step on the GPU code path, measured on the CPU (issue: performance).

A small model's eager probe step on a GPU is bound by the host: each operator costs its dispatch,
the Python around it and a kernel launch, however little arithmetic it does (the fourth session's
H200 ran the default model's plain forward in 3.0 ms and its probe step in 22.8 ms, 7.6x, with the
device mostly idle). This script times that host work without a GPU: the config's model with its
depth, heads and architecture but heads 8 wide and a 256-token vocabulary, on probe batches of a few
tokens, so that the CPU's arithmetic and memory traffic all but vanish (the same operators run: one
logit block either way), with every per-device setting of a probe run at its value for devices other than the CPU
(`off_cpu_settings`: one forward per batch, no reused buffers, one causal-mask block, the entropy's
``xlogy`` blocks, zero biases kept, the big logit blocks, the multi-tensor finite check), so the same
operators are dispatched as on a GPU (``bench/profile_probe.py --count-ops`` counts them). It prints
the plain ``GPT`` forward of the same tiny batches, the probe step and its phases, interleaved over
rounds (medians), and their ratio: a lower bound for an eager GPU probe step of a model this size,
which adds a kernel launch (a few microseconds) per operator and runs on another host CPU.

Usage: ``python bench/host_proxy.py [--config configs/default.yaml] [--model-config JSON] [--rounds 30]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.profile_probe import print_phases, probe_step_phases  # noqa: E402
from bench.run import interleaved, load_config, scratch_logger  # noqa: E402
from lens_callback import LensCallback  # noqa: E402
from nanogpt_model import GPT, GPTConfig  # noqa: E402
from nanogpt_model.data import TextDataModule  # noqa: E402

TINY_INPUTS: dict[str, Any] = dict(repeat_length=8, repeat_batch=1, text_batch=1, text_len=32,
                                   probe_options={"icl_score": {"early": 2, "late": 30, "width": 2}})
"""The callback's probe inputs here: one repeated sequence of 2 x 8 tokens and one 32-token window."""


@contextmanager
def off_cpu_settings() -> Iterator[None]:
    """Every per-device setting of a probe run and of the callback's finite-weights check at its value
    for devices other than the CPU, on the CPU too; restored on exit."""
    runner = importlib.import_module("lens_callback.probes.runner")
    attention = importlib.import_module("lens_callback.probes.attention")
    entropy = importlib.import_module("lens_callback.probes.attention_entropy")
    callback = importlib.import_module("lens_callback.callback")
    settings = [(runner, "WORKSPACE_DEVICES", frozenset()), (runner, "PATTERN_CHUNK_BYTES", {}),
                (runner, "LOGIT_BLOCK_ELEMENTS", {}), (attention, "MASK_BLOCKS_ON", {}),
                (attention, "ZERO_BIAS_DEVICES", frozenset()), (entropy, "ROW_BLOCKS_ON", {}),
                (callback, "finite_flag", partial(callback.finite_flag, fused=True))]
    saved = [(module, name, getattr(module, name)) for module, name, _ in settings]
    try:
        for module, name, value in settings:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def measure(config_path: Path, model_config: str | None, rounds: int) -> dict[str, float]:
    """Median seconds of the plain forward, the probe step and its phases, on tiny probe batches with
    `off_cpu_settings`, one intra-op thread (a GPU host issues work from one thread)."""
    model_cfg, data_args, _, _ = load_config(config_path)
    if model_config:
        model_cfg = {**model_cfg, **json.loads(model_config)}
    # the operators of the config's model, at a size whose arithmetic the CPU does in no time
    config = GPTConfig.from_dict({**model_cfg, "dropout": 0.0, "vocab_size": 256,
                                  "n_embd": 8 * int(model_cfg.get("n_head", 4))})
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with off_cpu_settings():
            torch.manual_seed(0)
            model = GPT(config).eval()
            dm = TextDataModule(block_size=min(int(data_args.get("block_size", 256)), config.block_size),
                                batch_size=2)
            dm.setup()
            cb = LensCallback(every_n_steps=10, **TINY_INPUTS)
            cb.attach(model, dm.train_data, dm.val_data)
            trainer = L.Trainer(logger=scratch_logger("lens-host-", "proxy"),
                                accelerator="cpu", devices=1, enable_progress_bar=False,
                                enable_checkpointing=False, enable_model_summary=False)
            batches = [cb._inputs.repeated, cb._inputs.text]

            def plain() -> None:
                with torch.no_grad():
                    for b in batches:
                        model(b, all_positions=True)

            tasks = {"plain GPT forward": plain, **probe_step_phases(cb, trainer, model.state_dict())}
            times = interleaved(tasks, rounds, device)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--model-config", type=str, default=None, help="JSON overriding model.config fields")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    result = measure(args.config, args.model_config, args.rounds)
    print(f"host time of the GPU code path on the CPU ({args.config.name}"
          + (f", {args.model_config}" if args.model_config else "")
          + f"; heads 8 wide, vocabulary 256; probe batches (1, 16) and (1, 32); 1 thread; {args.rounds} rounds)")
    print_phases(result)
    print(f"host proxy: probe step / plain forward = {result['probe step (whole)'] / result['plain GPT forward']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
