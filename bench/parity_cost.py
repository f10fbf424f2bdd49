"""What the callback's train-start parity check costs (``parity_check=True``), for a config's model.

The check (``LensCallback._check_parity``) runs the live model and a second converted model on two
random sequences as long as the longest probe sequence, on perturbed float32 copies of the weights.
This times it (median of ``--rounds`` calls, after the converted model is built) and reports the
peak resident memory it adds above the process (Linux: ``VmHWM`` after resetting it through
``/proc/self/clear_refs``; ``nan`` elsewhere), at the config's probe settings and, for comparison,
at 64 tokens (the check's length before the thirteenth session).

Usage: ``python bench/parity_cost.py [--config configs/default.yaml] [--model-config JSON]
[--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.run import load_config, without_snapshots  # noqa: E402
from lens_callback import LensCallback  # noqa: E402
from lens_callback.convert import build_hooked_transformer  # noqa: E402
from nanogpt_model import GPT, GPTConfig  # noqa: E402


def _status_mib(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def parity_cost(model: GPT, callback_args: dict, rounds: int) -> tuple[int, float, float]:
    """``(tokens per sequence, median seconds, peak MiB above the resident set)`` of the parity check."""
    cb = LensCallback(**callback_args)
    cb.validate(model)
    cb._hooked = build_hooked_transformer(cb._converter, cb._model_config, model.state_dict())
    times, peaks = [], []
    for _ in range(rounds):
        reset = _reset_peak()
        resident = _status_mib("VmRSS")
        start = time.perf_counter()
        cb._check_parity(model)
        times.append(time.perf_counter() - start)
        peaks.append(_status_mib("VmHWM") - resident if reset else float("nan"))
    return cb._parity_len(), statistics.median(times), max(peaks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--model-config", help="JSON overriding model.config fields")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    model_cfg, _, cb_args, _ = load_config(args.config)
    if args.model_config:
        model_cfg = {**model_cfg, **json.loads(args.model_config)}
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(model_cfg))
    cb_args = without_snapshots(cb_args)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    for label, overrides in (("the config's probe settings", {}), ("64 tokens", {"text_len": 64, "repeat_length": 32})):
        length, seconds, peak = parity_cost(model, {**cb_args, **overrides}, args.rounds)
        print(f"parity check at {label}: 2 x {length} tokens, {seconds:.3f} s (median of {args.rounds}), "
              f"peak {peak:.0f} MiB above the resident set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
