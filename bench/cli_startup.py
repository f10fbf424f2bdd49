"""What the command-line tools and ``import lens_callback`` cost to start, in fresh interpreters.

Until the forty-fifth session ``import lens_callback`` (which every ``lens_callback.*`` import runs
first) imported Lightning and TransformerLens, so ``lens-report`` paid both imports, about 6-7 s on
2 CPU cores, before reading a single event file. The package now loads its names on first use and
the report's modules import neither torch, Lightning nor TransformerLens; ``lens-probe`` parses its
command line (`lens_callback.probe_cli`) before it imports `lens_callback.posthoc`.

This writes a small run (a 1-layer nanoGPT trained 12 steps with `LensCallback`: TensorBoard events
and snapshots) and times, interleaved, in fresh processes: ``import lens_callback``, ``lens-report
RUN -o report.png`` on it, ``lens-report --help``, ``lens-probe --help``, and ``import lightning,
transformer_lens``, the imports every one of them paid before; it prints the medians and
lens-report's time over that import's.

Usage: ``python bench/cli_startup.py [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def write_run(root: Path) -> Path:
    """A short run with the callback: its TensorBoard version directory (snapshots under it)."""
    script = f"""
import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lens_callback import LensCallback
from nanogpt_model import NanoGPTModule, TextDataModule
from nanogpt_model.config import GPTConfig
L.seed_everything(0)
module = NanoGPTModule(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=32))
data = TextDataModule(block_size=32, batch_size=4)
lens = LensCallback(every_n_steps=4, log_spaced=False, repeat_length=8, repeat_batch=4, text_batch=2,
                    snapshot_dir={str(root / "snapshots")!r})
trainer = L.Trainer(max_steps=12, logger=TensorBoardLogger({str(root)!r}, name="run"), callbacks=[lens],
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0)
trainer.fit(module, data)
print(trainer.logger.log_dir)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"writing the run failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = write_run(Path(tmp))
        commands = {
            "import lens_callback": [sys.executable, "-c", "import lens_callback"],
            "lens-report RUN -o report.png": [str(BIN / "lens-report"), str(run), "-o", str(Path(tmp) / "r.png")],
            "lens-report --help": [str(BIN / "lens-report"), "--help"],
            "lens-probe --help": [str(BIN / "lens-probe"), "--help"],
            "import lightning, transformer_lens": [sys.executable, "-c", "import lightning, transformer_lens"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        timed(commands["import lightning, transformer_lens"])  # warm the file cache and the bytecode
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(timed(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"| command (fresh process, median of {args.rounds}) | seconds |")
    print("|---|---|")
    for name, value in medians.items():
        print(f"| `{name}` | {value:.2f} |")
    floor = medians["import lightning, transformer_lens"]
    print(f"lens-report/(import lightning, transformer_lens)={medians['lens-report RUN -o report.png'] / floor:.2f}")


if __name__ == "__main__":
    main()
