"""What ``max_snapshots`` pruning costs per snapshot step, against the number of snapshots in the root.

The callback calls ``prune_snapshots(root, max_snapshots, protect=..., among=..., run_id=...)`` after
each snapshot it writes. Until the thirty-fourth session that call listed the root first
(``list_snapshots``: every complete snapshot's ``config.json`` read, other runs' too), so a run
keeping hundreds of snapshots for its events paid that at every snapshot step, and the run's total
grew with the square of its length. It now finds its candidates by directory name and reads a
``config.json`` only where one decides something.

This writes ``N`` tiny snapshots (half of them another run's) for each ``--counts`` value and times,
interleaved, the listing-based rule (``list_snapshots`` + the filters, the old algorithm's reading
part) and ``prune_snapshots`` itself, both removing nothing (every step protected, as the default
event rules protect a window of recent ones), and prints the medians and their ratio.

Usage: ``python bench/prune_cost.py [--counts 50 200 800] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lens_callback.snapshots import is_runs_snapshot, list_snapshots, prune_snapshots, save_snapshot  # noqa: E402

KEEP_LAST = 10


def listing_rule(root: Path, among: set[int], run_id: str) -> list[int]:
    """The candidates as the listing-based rule found them (every snapshot's config read)."""
    snapshots = [info for info in list_snapshots(root) if info.step in among and is_runs_snapshot(info.metadata, run_id)]
    return [info.step for info in snapshots[: max(len(snapshots) - KEEP_LAST, 0)]]


def write_root(root: Path, count: int) -> set[int]:
    """``count`` snapshots, the even steps this run's and the odd ones another's; returns this run's."""
    weights = {"w": torch.ones(2)}
    ours = set(range(0, count, 2))
    for step in range(count):
        save_snapshot(root, step, converter="nanogpt", model_config={}, state_dict=weights,
                      metadata={"run_id": "ours" if step in ours else "theirs"})
    return ours


def timed(call: object) -> float:
    start = time.perf_counter()
    call()  # type: ignore[operator]
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[50, 200, 800])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    logging.getLogger("lens_callback.snapshots").setLevel(logging.ERROR)
    print("| snapshots in the root | listing rule (ms) | prune_snapshots (ms) | ratio |")
    print("|---|---|---|---|")
    for count in args.counts:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            ours = write_root(root, count)
            listing, pruning = [], []
            for _ in range(args.rounds):  # interleaved: the machine's drift hits both
                listing.append(timed(lambda: listing_rule(root, ours, "ours")))
                pruning.append(timed(lambda: prune_snapshots(root, KEEP_LAST, protect=ours, among=ours, run_id="ours")))
            assert prune_snapshots(root, KEEP_LAST, protect=ours, among=ours, run_id="ours") == []
            a, b = statistics.median(listing), statistics.median(pruning)
            print(f"| {count} | {a:.2f} | {b:.2f} | {a / b:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
