"""Would a probe step on a background thread, over a copy of the weights, hide its cost from training?

The issue "Performance" lists background execution (a CUDA side stream, or a thread over a weight
copy) among the places to look. This measures the CPU case side by side in one process, interleaved
over ``--rounds`` rounds (medians), for a config's model on the embedded corpus:

* ``train``: ``--k`` optimizer steps of the config's ``GPT`` (AdamW, fixed batches, plain loop);
* ``train + probe``: the same steps, then one ``LensCallback.probe_step`` (what the callback does);
* ``train | probe``: the weights copied, a thread running ``probe_step`` on the copy while the
  main thread takes the same ``--k`` steps, joined at the end;
* ``probe``: the probe step alone.

``hidden`` is the share of the probe step that running it beside training saved:
``(train + probe - train | probe) / probe``; 1 would be a probe step for free, 0 no gain, below 0 a
loss. PyTorch's intra-op threads serve both Python threads, so on a machine whose cores training
already keeps busy there is nothing to hide the probe in.

Usage: ``python bench/background.py [--k 2] [--rounds 9] [--threads N] [--config ...] [--model-config ...]
[--device cpu|cuda]``.
The last line reads ``background hidden=<x> train|probe/train+probe=<y>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import add_model_arguments, interleaved, make_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--k", type=int, default=2, help="training steps beside one probe step (default: 2)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bench = make_bench(args, device)
    model = bench.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = iter(bench.dm.train_dataloader())
    batches = [tuple(t.to(device) for t in next(loader)) for _ in range(4)]
    count = [0]

    def train() -> None:
        for _ in range(args.k):
            x, y = batches[count[0] % len(batches)]
            count[0] += 1
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def probe(state: dict[str, torch.Tensor]) -> None:
        bench.cb.probe_step(bench.trainer, 10**6 + count[0], state)

    def sequential() -> None:
        train()
        probe(model.state_dict())

    def concurrent() -> None:
        copy = {name: t.detach().clone() for name, t in model.state_dict().items()}
        failed: list[BaseException] = []

        def run() -> None:
            try:
                probe(copy)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                failed.append(err)

        thread = threading.Thread(target=run)
        thread.start()
        train()
        thread.join()
        if failed:
            raise failed[0]

    tasks: dict[str, Callable[[], Any]] = {"train": train, "train + probe": sequential,
                                          "train | probe": concurrent,
                                          "probe": lambda: probe(model.state_dict())}
    times = interleaved(tasks, args.rounds, device)  # a warm-up call each (buffers, caches, the writer), then rounds
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.config.name}, {args.k} training step(s) per probe step, {torch.get_num_threads()} intra-op "
          f"thread(s), {args.rounds} rounds, medians")
    for name, value in median.items():
        print(f"  {name:14s} {value * 1e3:9.1f} ms")
    hidden = statistics.median((s - c) / p for s, c, p in zip(times["train + probe"], times["train | probe"],
                                                               times["probe"]))
    ratio = statistics.median(c / s for c, s in zip(times["train | probe"], times["train + probe"]))
    print(f"background hidden={hidden:.2f} train|probe/train+probe={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
