"""``lens-probe``'s command line, parsed before anything heavy is imported.

`lens_callback.posthoc` needs torch and TransformerLens (seconds to import); this module imports
neither, so ``lens-probe --help`` and a usage error answer at once, and `main` imports
`lens_callback.posthoc` only for a command line that parses (`lens_callback.posthoc.run_command`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lens_callback.defaults import DEFAULT_PROBES
from lens_callback.layout import MAX_STEP
from lens_callback.schedule import check_token_min_frequency

__all__ = ["build_parser", "main"]


def token_min_frequency_arg(text: str) -> float:
    """``--token-min-frequency``: a float in ``[0, 1)``, as `check_token_min_frequency` takes it."""
    try:
        value = float(text)
        check_token_min_frequency(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    return value


def int_at_least(low: int, below: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"must be >= {low}{f' and < {below}' if below is not None else ''}, "
                                             f"got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """``lens-probe``'s parser. Checkpoint-only flags parse with a ``None`` default (their defaults in
    ``checkpoint_only``), so one given at its default value is seen as given."""
    parser = argparse.ArgumentParser(
        prog="lens-probe",
        description="Re-run lens probes on saved snapshots (a snapshot root or one step-NNNNNNNN dir) "
        "or on a nanoGPT ckpt.pt, and write the lens/... scalars to TensorBoard and/or CSV.",
    )
    parser.add_argument("path", type=Path, help="snapshot root, snapshot directory, or nanoGPT ckpt.pt")
    parser.add_argument("--logdir", type=Path, help="TensorBoard log directory to write scalars into")
    parser.add_argument("--csv", type=Path, help="CSV file to write (columns step,tag,value)")
    parser.add_argument("--device", default="cpu", help="torch device to probe on (default: cpu)")
    parser.add_argument("--run", metavar="ID", help="snapshots only: in a root that holds several training runs' "
                                                    "snapshots, the run to probe (its run_id, or the start of it; "
                                                    "'none': those without one)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (e.g. the module registering your own converter); repeatable")
    measured = parser.add_argument_group(
        "what to measure (for snapshots: the settings they carry; with --probes, these four flags instead, those "
        "not given at their defaults)")
    group = parser.add_argument_group("nanoGPT ckpt.pt only (snapshots carry their own probe batches)")
    checkpoint_only: dict[str, tuple[argparse.Action, Any]] = {}  # dest -> (action, default)
    parser.set_defaults(checkpoint_only=checkpoint_only)  # given on snapshots: an error, not ignored

    def ckpt_option(*args: Any, default: Any = None, into: argparse._ArgumentGroup = group, **kwargs: Any) -> None:
        # parsed with a None default, so that a flag given with its default value is seen as given
        action = into.add_argument(*args, default=None, **kwargs)
        checkpoint_only[action.dest] = (action, default)

    ckpt_option("--probes", into=measured, help=f"comma-separated probe names (default for a ckpt.pt: "
                f"{', '.join(DEFAULT_PROBES)}, without the text probes unless --text is given; for snapshots: "
                "those they were probed with, e.g. --probes k_composition re-probes them with that probe alone)")
    ckpt_option("--probe-options", into=measured, help='JSON object, e.g. \'{"logit_lens": {"max_positions": 32}}\'')
    ckpt_option("--repeat-length", type=int_at_least(1), help="half length L of the repeated sequences "
                "(default: min(32, block_size // 2))")
    ckpt_option("--repeat-batch", type=int_at_least(1), default=8, help="number of repeated sequences (default: 8)")
    ckpt_option("--text", type=Path, help="token file for the text batch and the repeated batch's token pool: "
                "*.bin = nanoGPT uint16 ids; another file: its characters encoded with --meta, or its raw bytes as "
                "ids for a byte-level vocabulary of 256")
    ckpt_option("--meta", type=Path, help="with --text FILE of text: the run's nanoGPT meta.pkl (e.g. "
                "data/shakespeare_char/meta.pkl), whose stoi table encodes it (read without unpickling code)")
    ckpt_option("--text-len", type=int_at_least(2), help="tokens per text window (default: min(128, block_size))")
    ckpt_option("--text-batch", type=int_at_least(1), default=8, help="number of text windows (default: 8)")
    ckpt_option("--token-min-frequency", type=token_min_frequency_arg, default=1e-4,
                help="with --text: the repeated sequences draw from the token ids making up at least this fraction "
                     "of it, as LensCallback's token_min_frequency (default: 1e-4); without --text, from the whole "
                     "vocabulary")
    ckpt_option("--seed", type=int_at_least(0, 2**63), default=0,
                help="seed of the private generators, in [0, 2**63) as LensCallback's (default: 0)")
    ckpt_option("--max-batch-tokens", into=measured, type=int_at_least(1),
                help="forward at most this many tokens at once")
    ckpt_option("--no-per-head-scalars", into=measured, action="store_true", default=False,
                help="log only max/mean of per-head probes")
    ckpt_option("--step", type=int_at_least(0, MAX_STEP + 1), help="step to log at (default: the checkpoint's iter_num)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lens-probe``; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's own usage errors (2) and --help (0)
        return int(exit_.code or 0)
    if args.logdir is None and args.csv is None:
        print("lens-probe: error: give --logdir and/or --csv", file=sys.stderr)
        return 2
    from lens_callback.posthoc import run_command

    return run_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
