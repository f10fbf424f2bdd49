"""Probe-step peak memory (issue: performance, P4), for a config's model.

P4: a probe step holds one extra copy of the weights (the callback's ``HookedTransformer``) and,
while it runs, no more than the probe forward's own activations. This prints the copy's size and
the peak memory a probe step allocates above what the process already holds:

* on CUDA: ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` before the step;
* on CPU: the resident set sampled every 0.2 ms above its level before the step. glibc keeps freed
  heap memory for reuse, which would hide allocations, so the script re-runs itself with
  ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation over 64 KB is then mapped and unmapped on its
  own, and the resident set follows the live tensors.

Usage: ``python bench/probe_memory.py [--config configs/gpt2_124m.yaml] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import cuda_peak, load_config, without_snapshots  # noqa: E402
from lens_callback import LensCallback  # noqa: E402
from nanogpt_model import GPT, GPTConfig, TextDataModule  # noqa: E402

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_peak(fn: Callable[[], object]) -> int:
    """Peak resident bytes above the level before ``fn`` ran, sampled by a thread."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    gc.collect()
    base = _rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, peak[0] - base)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "gpt2_124m.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and sys.platform.startswith("linux") and _MMAP_ENV not in os.environ:
        os.environ[_MMAP_ENV] = "65536"
        # the allocator reads it at start-up: this script again, with the arguments main was given
        given = list(argv) if argv is not None else sys.argv[1:]
        flags = subprocess._args_from_interpreter_flags()  # -P, -X, -W ... as this process has them
        os.execv(sys.executable, [sys.executable, *flags, str(Path(__file__).resolve()), *given])
    warnings.filterwarnings("ignore")

    model_cfg, data_args, cb_args, _ = load_config(args.config)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict({**model_cfg, "dropout": 0.0})).to(device).eval()
    dm = TextDataModule(block_size=min(int(data_args.get("block_size", 256)), model.config.block_size), batch_size=4)
    dm.setup()
    callback = LensCallback(**without_snapshots(cb_args))
    callback.attach(model, dm.train_data, dm.val_data)
    state_dict = model.state_dict()
    weights = sum(p.numel() * p.element_size() for p in callback._hooked.parameters())

    def step(n: int) -> Callable[[], object]:
        return lambda: callback.probe_step(None, n, state_dict)

    measure = (lambda fn: cuda_peak(fn, device)) if device.type == "cuda" else cpu_peak
    cuda = device.type == "cuda"
    first = measure(step(1))  # includes the buffers kept for later steps
    later = measure(step(2))
    if cuda:  # the opt-in CUDA-graph replay: the memory its pool keeps between probe steps
        callback.cuda_graphs = True
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(device)
        graphed = measure(step(3))  # warm-up + capture
        measure(step(4))
        torch.cuda.empty_cache()  # frees cached blocks, not a live graph's private pool
        held = torch.cuda.memory_reserved(device) - reserved
        callback.runner.release_graphs()
    inputs = callback._inputs
    print(f"device {device}; model {model.config.n_layer}L {model.config.n_head}H {model.config.n_embd}d "
          f"vocab {model.config.vocab_size}; probe batches {tuple(inputs.repeated.shape)} + {tuple(inputs.text.shape)}")
    print(f"HookedTransformer weight copy (kept): {weights / 2**20:.1f} MiB")
    print(f"probe-step peak above the resident process: first step {first / 2**20:.1f} MiB, "
          f"later steps {later / 2**20:.1f} MiB")
    if cuda:
        print(f"cuda_graphs=True: capture step peak {graphed / 2**20:.1f} MiB; held between probe steps by the "
              f"graph (its pool and outputs): {held / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
