"""How much the logged probe values move with the draw of the probe batches, by batch size.

A run's probe batches are one draw (``seed``); a value that moves by more between draws than between
probe steps is the batch's, not the model's. For snapshots of a run on the default corpus, this
re-probes each given step on ``--draws`` draws of the probe batches (seeds 1000, 1001, ...) at each
``repeat_batch x text_batch`` setting, with the default probes, and prints the mean and standard
deviation over the draws of a few scalars. Set against ``bench/run.py --config`` with the same batch
sizes, it says what a larger probe batch costs (P1, P2) and what it buys (docs/performance.md,
"Larger probe batches").

Usage: ``python bench/probe_noise.py SNAPSHOT_ROOT [--steps 2048,5000] [--batches 16x8,32x16,32x24]
[--draws 12] [--repeat-length 32] [--text-len 256]``, e.g. ``runs/default/version_0/snapshots`` after ``make demo``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lens_callback import DEFAULT_PROBES, build_runner, load_snapshot
from lens_callback.callback import min_token_count
from lens_callback.measure import measure
from lens_callback.probes.inputs import make_probe_inputs
from nanogpt_model.data import TextDataModule

KEYS = ("lens/induction/max", "lens/prev_token/max", "lens/icl_score", "lens/attn_entropy/mean",
        "lens/repeated_loss", "lens/logit_lens/L0/kl")


def _batches(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        repeat, _, windows = item.partition("x")
        pairs.append((int(repeat), int(windows)))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a snapshot root of a run on the default corpus")
    parser.add_argument("--steps", default="2048,5000", help="comma-separated snapshot steps")
    parser.add_argument("--batches", type=_batches, default=_batches("16x8,32x16,32x24"),
                        help="comma-separated REPEATxTEXT batch sizes")
    parser.add_argument("--draws", type=int, default=12, help="draws of the probe batches per setting")
    parser.add_argument("--repeat-length", type=int, default=32)
    parser.add_argument("--text-len", type=int, default=256)
    args = parser.parse_args(argv)

    data = TextDataModule(block_size=args.text_len)
    data.setup()
    train, val = data.train_data, data.val_data
    assert train is not None and val is not None  # setup loaded them
    runner = build_runner(DEFAULT_PROBES)
    print("step  repeat x text  " + "  ".join(key.removeprefix("lens/") for key in KEYS) + "  (mean +- std over draws)")
    for step in (int(s) for s in args.steps.split(",")):
        model = load_snapshot(args.root / f"step-{step:08d}")
        for repeat_batch, text_batch in args.batches:
            values: dict[str, list[float]] = {key: [] for key in KEYS}
            for draw in range(args.draws):
                inputs = make_probe_inputs(
                    train, val, model.cfg.d_vocab, repeat_length=args.repeat_length, repeat_batch=repeat_batch,
                    text_len=args.text_len, text_batch_size=text_batch, seed=1000 + draw,
                    min_count=min_token_count(1e-4, len(train)))
                scalars = measure(model, runner, inputs).scalars
                for key in KEYS:
                    values[key].append(scalars[key])
            cells = "  ".join(f"{np.mean(v):.3f} +- {np.std(v):.3f}" for v in values.values())
            print(f"{step:>5}  {repeat_batch:>3} x {text_batch:<3}     {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
