"""Probe-step cost, side by side in one process (issue: performance).

For a model config (default: ``configs/default.yaml``'s model on the embedded corpus) it measures,
interleaved over several rounds and reported as medians (P1 from its own loop, below):

* ``plain forward``: ``GPT`` forwards of the same probe batches (all positions, no grad);
* ``TL route``: the documented TransformerLens route: a new ``HookedTransformer``,
  ``convert_nanogpt_weights``, ``load_and_process_state_dict``, ``run_with_cache`` on the probe
  batches, induction scores from the cache;
* ``TL reused``: one ``HookedTransformer`` reused, ``load_state_dict`` + filtered ``run_with_cache``;
* ``patterns floor``: the callback's ``HookedTransformer`` forward over the same batches, as the
  runner runs it (its chunks, inference mode, no ``ln_final``), with the lean attention and no
  probe: the cost of materialising every attention pattern, which any pattern probe pays; and the
  same forward with the fused attention a batch whose patterns no probe reads gets
  (``FUSED_ATTENTION``: one SDPA call per layer);
* ``probe step``: ``LensCallback.probe_step``: in-place refresh, every default probe, logging to a
  real TensorBoard writer (the part spent in logging is reported too); and the same probe step
  with TransformerLens's own attention code (``lean_attention=False``) and, on CUDA, with the
  opt-in CUDA-graph replay (``cuda_graphs=True``);
* ``train step``: one optimizer step under a Lightning ``Trainer`` (no callback), the median interval
  between consecutive optimizer steps of one fit.

The GPU code path's operator count, peak memory, arithmetic and memory traffic against the plain
forward's, and the device-time floor at an H200's peak rates (``bench/gpu_path.py``, on the meta
device) are printed too, with or without a GPU.

P1 comes from a loop of its own that alternates one plain forward and one probe step
(``2 x rounds`` pairs), so each probe step follows what it follows in training, a forward of the
user's model, and the two share one allocator state. In the loop with every row a task follows
the previous row's task, and the big allocations of the TransformerLens routes decide how many
page faults the next task pays (on a 2-core VM the same code read P1 1.35 in one run of that loop
and 1.65 in the next). The pair loop still moves with the process's history: 1.54 in a fresh
process (the plain forward page-faulting 2,700 times), 1.65 after three TransformerLens routes
(no faults on either side), same code, same run. So the P1 line also prints each side's minor page
faults per call (median, `minor_faults`): a reader sees which allocator state a run measured. The
table's other rows come from the loop with every row, against that loop's plain forward.

P2 (training overhead at the default cadence) is computed from the schedule: the default config's
probe steps x probe-step time / (max_steps x train-step time); a direct A/B of short fits with and
without the callback is printed too (noisier). Both leave out snapshot writing (the default config
writes 30 snapshots in 5,000 steps, about 17 ms each for its 0.46 M parameters on the 2-core VM:
about 0.07 % more). P3 comes from ``bench/lightning_vs_plain.py``.

Usage: ``python bench/run.py [--rounds 5] [--device cpu|cuda] [--config configs/default.yaml]
[--model-config '{"n_layer": 12, ...}'] [--skip-p3] [--p3-steps 20] [--p3-rounds 5] [--skip-ab] [--threads N]
[--train-steps N] [--keep-freed-memory]``. ``--keep-freed-memory`` makes glibc keep freed memory in the process
(`bench.allocator.keep_freed_memory`): neither side then pays page faults after the warm-up, and
P1 measures the work alone.
The bench always uses the embedded corpus (byte vocabulary): for a config trained on another
vocabulary pass ``--model-config '{"vocab_size": 256}'`` (e.g. ``configs/shakespeare_char.yaml``). The last line reads
``P1 probe/forward=<x> P1b TL-route/probe=<y> P2 overhead=<z>% P3 lightning/plain=<w>``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions.nanogpt import convert_nanogpt_weights  # noqa: E402

from bench.allocator import keep_freed_memory, minor_faults  # noqa: E402
from bench.gpu_path import measure_gpu_path  # noqa: E402
from bench.lightning_vs_plain import StepClock, trainer_devices  # noqa: E402
from lens_callback import LensCallback  # noqa: E402
import lens_callback.probes.attention as attention_module  # noqa: E402
from lens_callback.probes import lean_attention  # noqa: E402
from lens_callback.probes.runner import rows_per_chunk  # noqa: E402
from nanogpt_model import GPT, GPTConfig, NanoGPTModule, TextDataModule  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(tasks: Mapping[str, Callable[[], Any]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each task: one untimed warm-up call each (buffers, caches), then
    ``rounds`` rounds that run every task in turn, so the machine's drift reaches all of them alike."""
    for fn in tasks.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(rounds):
        for name, fn in tasks.items():
            times[name].append(_timed(fn, device))
    return times


def cuda_peak(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated on ``device`` while ``fn`` runs, above what was allocated before."""
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def without_snapshots(cb_args: dict[str, Any]) -> dict[str, Any]:
    """The callback's arguments with snapshots off (their settings need a ``snapshot_dir``)."""
    return {k: v for k, v in cb_args.items() if not k.startswith("snapshot") and k != "max_snapshots"}


def load_config(path: Path) -> tuple[dict, dict, dict, int]:
    """(model config dict, data init args, callback init args, max_steps) from a LightningCLI YAML."""
    raw = yaml.safe_load(path.read_text())
    model_cfg = raw["model"]["config"]
    data = raw.get("data", {}) or {}
    callback_args: dict = {}
    for cb in raw.get("trainer", {}).get("callbacks", []) or []:
        if cb.get("class_path", "").endswith("LensCallback"):
            callback_args = dict(cb.get("init_args", {}) or {})
    return model_cfg, data, callback_args, int(raw["trainer"]["max_steps"])


def tl_documented_route(model: GPT, tokens: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """TransformerLens's documented nanoGPT route: new model, convert, process, full cache."""
    c = model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.block_size, d_head=c.head_size, n_heads=c.n_head,
        d_mlp=c.hidden_size, d_vocab=c.vocab_size, act_fn="gelu", normalization_type="LN", device=str(device),
    )
    hooked = HookedTransformer(cfg)
    # convert_nanogpt_weights makes the zero biases of a bias=False model on the CPU: move them as a user must
    weights = {name: w.to(device) for name, w in convert_nanogpt_weights(dict(model.state_dict()), cfg).items()}
    hooked.load_and_process_state_dict(weights)
    scores = []
    for batch in tokens:
        _, cache = hooked.run_with_cache(batch)
        half = batch.shape[1] // 2
        pats = torch.stack([cache["pattern", layer] for layer in range(c.n_layer)])  # [L, B, H, T, T]
        scores.append(pats.diagonal(offset=-(half - 1), dim1=-2, dim2=-1)[..., 1:].mean(dim=(1, 3)))
    return torch.stack(scores).cpu()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--model-config`` and ``--device``, shared by the bench scripts."""
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--model-config", type=str, default=None, help="JSON overriding model.config fields")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Bench:
    """A config's model on the embedded corpus with an attached ``LensCallback`` and a logging trainer."""

    config: GPTConfig
    model: GPT
    dm: TextDataModule
    cb: LensCallback
    cb_args: dict[str, Any]  # the callback's arguments (snapshots off)
    trainer: L.Trainer
    batches: list[torch.Tensor]  # the probe batches on the device
    max_steps: int  # the config's training length

    def plain_forward(self) -> None:
        """The baseline: ``GPT`` forwards of the probe batches (all positions, no grad)."""
        with torch.no_grad():
            for b in self.batches:
                self.model(b, all_positions=True)

    def patterns_floor(self) -> None:
        """The callback's ``HookedTransformer`` over the probe batches in the runner's chunks, lean
        attention, no probe, every pattern built (`FUSED_ATTENTION` off): the cost of materialising
        every attention pattern."""
        with_setting(attention_module, "FUSED_ATTENTION", False, self.lean_forward)()

    def lean_forward(self) -> None:
        """The same forward with the probe run's default attention: no hook reads a pattern, so each
        layer makes one fused SDPA call, as the plain forward does (`FUSED_ATTENTION`)."""
        cb, hooked = self.cb, self.cb._hooked
        device = next(hooked.parameters()).device
        workspace = cb.runner.workspace if device.type == "cpu" else None
        # as the runner runs it: inference mode, stopping after the last block (no ln_final)
        with torch.inference_mode(), lean_attention(hooked, workspace=workspace):
            for b in self.batches:
                rows = rows_per_chunk(hooked.cfg, b.shape[0], b.shape[1], device, cb.max_batch_tokens)
                for start in range(0, b.shape[0], rows):
                    hooked(b[start : start + rows], return_type=None, stop_at_layer=hooked.cfg.n_layers)


def with_setting(obj: Any, attr: str, value: Any, fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` run with ``obj.attr = value``, the previous value restored afterwards."""

    def run() -> None:
        previous = getattr(obj, attr)
        setattr(obj, attr, value)
        try:
            fn()
        finally:
            setattr(obj, attr, previous)

    return run


def scratch_dir(prefix: str) -> str:
    """A new temporary directory, removed when the process exits (the benches' loggers write there; a
    test suite calling them many times left hundreds in /tmp)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def scratch_logger(prefix: str, name: str) -> TensorBoardLogger:
    """A TensorBoardLogger in a `scratch_dir`, whose event writer is closed at exit before the directory is
    removed (``atexit`` runs the later registration first): its thread, still writing queued events into
    the removed directory, printed a traceback after the table."""
    logger = TensorBoardLogger(scratch_dir(prefix), name=name)

    def close() -> None:
        if logger._experiment is not None:  # never created: nothing to close
            logger._experiment.close()

    atexit.register(close)
    return logger


def make_bench(args: argparse.Namespace, device: torch.device) -> Bench:
    """Builds what `add_model_arguments` describes: model (seed 0), data, callback, trainer."""
    model_cfg, data_args, cb_args, max_steps = load_config(args.config)
    if args.model_config:
        model_cfg = {**model_cfg, **json.loads(args.model_config)}
    config = GPTConfig.from_dict(model_cfg)
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()  # dropout off for the plain forward; the fits build their own
    dm = TextDataModule(block_size=min(int(data_args.get("block_size", 256)), config.block_size),
                        batch_size=int(data_args.get("batch_size", 16)))
    dm.setup()
    cb_args = without_snapshots(cb_args)
    cb = LensCallback(**cb_args)
    cb.attach(model, dm.train_data, dm.val_data)
    trainer = L.Trainer(logger=scratch_logger("lens-bench-", "bench"),
                        accelerator=device.type, devices=trainer_devices(device), enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    batches = [b.to(device) for b in (cb._inputs.repeated, cb._inputs.text) if b is not None]
    return Bench(config, model, dm, cb, cb_args, trainer, batches, max_steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=20, help="steps per timed fit (train-step cost)")
    parser.add_argument("--skip-p3", action="store_true")
    # 20 x 5: 10 steps x 3 rounds read 0.92-1.06 on the 2-core VM, two runs of 20 x 7 0.971 and 0.982
    parser.add_argument("--p3-steps", type=int, default=20, help="timed steps per P3 round and runner")
    parser.add_argument("--p3-rounds", type=int, default=5, help="P3 rounds (bench/lightning_vs_plain.py)")
    parser.add_argument("--skip-ab", action="store_true", help="skip the direct A/B fits")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for every measurement (1 is steadier on a shared CPU)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (bench/allocator.py): no page faults from the process's history")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.keep_freed_memory and not keep_freed_memory():
        print("--keep-freed-memory: glibc not found, the allocator is unchanged")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    bench = make_bench(args, device)
    config, model, dm, cb, trainer, batches = bench.config, bench.model, bench.dm, bench.cb, bench.trainer, bench.batches
    cb_args_probe, max_steps = bench.cb_args, bench.max_steps
    ntok = sum(b.numel() for b in batches)

    plain = bench.plain_forward
    step_counter = iter(range(10**9))

    def probe_step() -> None:
        cb.probe_step(trainer, next(step_counter) + 1, model.state_dict())

    probe_step_tl_attention = with_setting(cb, "_lean", False, probe_step)
    probe_step_graphed = with_setting(cb, "cuda_graphs", True, probe_step)

    reused = HookedTransformer(cb._hooked.cfg)
    reused_cfg = reused.cfg

    def tl_reused() -> None:
        reused.load_state_dict(convert_nanogpt_weights(dict(model.state_dict()), reused_cfg), strict=False)
        with torch.no_grad():
            for b in batches:
                reused.run_with_cache(b, names_filter=lambda n: n.endswith("hook_pattern"))

    def tl_route() -> None:
        with torch.no_grad():
            tl_documented_route(model, batches, device)

    tasks = {"plain forward": plain, "patterns floor": bench.patterns_floor, "lean fused": bench.lean_forward,
             "probe step": probe_step,
             "probe step, TL attention": probe_step_tl_attention}
    if device.type == "cuda":
        tasks["probe step, CUDA graph"] = probe_step_graphed
    if config.architecture == "gpt2":  # TransformerLens's convert_nanogpt_weights reads Karpathy's GPT only
        tasks["TL route"] = tl_route
        tasks["TL reused"] = tl_reused
    med = {name: statistics.median(v) for name, v in interleaved(tasks, args.rounds, device).items()}
    pairs: dict[str, list[float]] = {"plain forward": [], "probe step": []}
    faults: dict[str, list[int]] = {name: [] for name in pairs}
    for _ in range(2 * args.rounds):  # P1: each probe step right after a plain forward
        for name in pairs:
            before = minor_faults()
            pairs[name].append(_timed(tasks[name], device))
            faults[name].append(minor_faults() - before)
    p1_plain, p1_step = (statistics.median(v) for v in pairs.values())
    p1_faults = {name: statistics.median(v) for name, v in faults.items()}
    log_share = _logging_share(cb, trainer, model, device, args.rounds)
    peak = cuda_peak(probe_step, device) / 2**20 if device.type == "cuda" else None

    training = training_settings(args.config, device)
    train_step = _train_step_time(config, dm, device, args.train_steps, training)
    n_probes = len(cb.schedule.planned(max_steps))
    overhead = n_probes * p1_step / (max_steps * train_step)

    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else _cpu_name()}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: {config.n_layer}L {config.n_head}H {config.n_embd}d block {config.block_size} vocab {config.vocab_size} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params); probe batches: "
          + ", ".join(f"{tuple(b.shape)}" for b in batches) + f" = {ntok} tokens; rounds {args.rounds}")
    print()
    print(f"P1 loop ({2 * args.rounds} pairs): plain GPT forward {p1_plain * 1e3:.2f} ms, probe step "
          f"{p1_step * 1e3:.2f} ms = {p1_step / p1_plain:.2f}x; minor page faults per call (median): "
          f"plain {p1_faults['plain forward']:.0f}, probe step {p1_faults['probe step']:.0f}")
    print()
    print(f"| {'what':<34} | {'median ms':>10} | {'x plain fwd':>11} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 13}|")
    rows = [("plain GPT forward (probe batches)", med["plain forward"])]
    if "TL route" in med:
        rows.append(("documented TL route", med["TL route"]))
    if "TL reused" in med:
        rows.append(("TL, model reused + filtered cache", med["TL reused"]))
    graph_failure = getattr(cb.runner, "graph_failure", None)
    graph_row = "  same, CUDA-graph replay" + (" (capture failed: eager)" if graph_failure else "")
    rows += [("lean TL forward, no probes", med["patterns floor"]),
             ("  same, fused attention", med["lean fused"]),
             ("this project's probe step", med["probe step"]),
             ("  of which logging", med["probe step"] * log_share),
             ("  same, TransformerLens attention", med["probe step, TL attention"]),
             *([(graph_row, med["probe step, CUDA graph"])] if "probe step, CUDA graph" in med else []),
             ("one train step (Lightning)", train_step)]
    for name, value in rows:
        print(f"| {name:<34} | {value * 1e3:>10.2f} | {value / med['plain forward']:>10.2f}x |")
    print()
    print(f"default cadence: {n_probes} probe steps in {max_steps} training steps "
          f"(every_n_steps={cb.schedule.every_n_steps}, log_spaced={cb.schedule.log_spaced})")
    if peak is not None:
        print(f"probe-step peak GPU memory above the resident model: {peak:.1f} MiB")
    if not args.skip_ab:
        direct = _direct_ab(config, dm, device, cb_args_probe, args.train_steps * 5, training)
        print(f"direct A/B over {args.train_steps * 5} steps (incl. early log-spaced probes): "
              f"with/without = {direct:.3f}")
    p3 = float("nan")
    if not args.skip_p3:
        try:
            from bench.lightning_vs_plain import measure as measure_p3

            result = measure_p3(device=str(device), config_path=args.config, steps=args.p3_steps, rounds=args.p3_rounds,
                                threads=args.threads,
                                model_overrides=json.loads(args.model_config) if args.model_config else None)
            p3 = float(result["ratio"])
            print(f"Lightning vs plain loop: {result['lightning_tokens_per_s']:.0f} vs "
                  f"{result['plain_tokens_per_s']:.0f} tokens/s (median of {args.p3_rounds} interleaved rounds)")
        except Exception as err:  # noqa: BLE001
            print(f"P3 not measured: {type(err).__name__}: {err}")
    path = measure_gpu_path(bench)  # last: it moves the bench's models to the meta device
    print(f"GPU code path (meta device, bench/gpu_path.py): a probe run dispatches {path.probe_ops} operators, "
          f"the plain forward {path.plain_ops}; probe-run peak {path.peak_bytes / 2**20:.1f} MiB; "
          f"arithmetic {path.probe_flops / path.plain_flops:.2f}x and memory traffic "
          f"{path.probe_traffic / path.plain_traffic:.2f}x the plain forward's, device-time floor at an H200's peak "
          f"rates {path.probe_floor / path.plain_floor:.2f}x")
    tl_ratio = med["TL route"] / med["probe step"] if "TL route" in med else float("nan")
    print(f"P1 probe/forward={p1_step / p1_plain:.2f} P1b TL-route/probe={tl_ratio:.2f} "
          f"P2 overhead={percent(overhead * 100)}% P3 lightning/plain={p3:.3f}")
    return 0


def percent(value: float) -> str:
    """``value`` (a percentage) with two decimals, or two significant digits where two decimals would show
    fewer: GPT-2's P2 at its cadence (1,221 probe steps in 600,000 steps of 40 micro-batches) read 0.00 %."""
    if not math.isfinite(value) or value == 0:
        return f"{value:.2f}"
    return f"{value:.{max(2, 1 - math.floor(math.log10(abs(value))))}f}"


def _logging_share(cb: LensCallback, trainer: L.Trainer, model: GPT, device: torch.device, rounds: int) -> float:
    """Fraction of a probe step spent in ``_log`` (TensorBoard scalars, images, layout)."""
    original = cb._log
    spent = [0.0]

    def timed_log(*a: Any, **k: Any) -> None:
        start = time.perf_counter()
        original(*a, **k)
        spent[0] += time.perf_counter() - start

    cb._log = timed_log  # type: ignore[method-assign]
    total = 0.0
    try:
        for i in range(rounds):
            total += _timed(lambda: cb.probe_step(trainer, 10**6 + i, model.state_dict()), device)
    finally:
        cb._log = original  # type: ignore[method-assign]
    return spent[0] / total if total else 0.0


def _fit(config: GPTConfig, dm: TextDataModule, device: torch.device, steps: int, callbacks: list,
         training: Mapping[str, Any] | None = None, logdir: str | None = None) -> float:
    """Seconds for a fit of ``steps`` optimizer steps with the config's ``training`` settings
    (`training_settings`) and, with ``logdir``, a TensorBoardLogger there (the callback then logs
    as in a real run: scalars, heatmaps)."""
    torch.manual_seed(0)
    training = dict(training or {})
    module = NanoGPTModule(config, warmup_steps=10, compile=bool(training.pop("compile", False)))
    logger = TensorBoardLogger(logdir, name="ab") if logdir is not None else False
    trainer = L.Trainer(max_steps=steps, accelerator=device.type, devices=trainer_devices(device), logger=logger,
                        callbacks=callbacks,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0, **training)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    _sync(device)
    return time.perf_counter() - start


def _train_step_time(config: GPTConfig, dm: TextDataModule, device: torch.device, steps: int,
                     training: Mapping[str, Any] | None = None) -> float:
    """One optimizer step's time, with the config's gradient accumulation (and precision on a GPU):
    the median of the ``steps`` intervals between consecutive optimizer steps' ends in one fit, after a
    warm-up fit. The fit's start-up and the first step's lazy work stay out, and a step the machine
    descheduled does not move it. (The difference of a ``2 * steps`` fit's and a ``steps`` fit's wall
    times went negative for few steps on a busy machine: start-up jitter exceeded a step.)"""
    _fit(config, dm, device, 3, [], training)  # warm-up
    clock = StepClock(device)
    _fit(config, dm, device, steps + 1, [clock], training)
    return statistics.median(b - a for a, b in zip(clock.ends, clock.ends[1:]))


def training_settings(config_path: Path, device: torch.device) -> dict[str, Any]:
    """The config's settings that set an optimizer step's cost: the Trainer's
    ``accumulate_grad_batches``, and on a GPU its ``precision`` and the module's ``compile`` (a CPU
    runs the eager float32 model, as the bench's other rows do). `_fit` takes ``compile`` to the
    module, the rest to the Trainer."""
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    trainer, model = raw.get("trainer") or {}, raw.get("model") or {}
    settings: dict[str, Any] = {}
    if trainer.get("accumulate_grad_batches"):
        settings["accumulate_grad_batches"] = int(trainer["accumulate_grad_batches"])
    if device.type == "cuda" and trainer.get("precision"):
        settings["precision"] = trainer["precision"]
    if device.type == "cuda" and model.get("compile"):
        settings["compile"] = True
    return settings


def _direct_ab(config: GPTConfig, dm: TextDataModule, device: torch.device, cb_args: dict, steps: int,
               training: Mapping[str, Any] | None = None) -> float:
    ratios = []
    with tempfile.TemporaryDirectory() as logdir:  # both with a TensorBoardLogger: the callback logs as in a run
        for _ in range(2):
            without = _fit(config, dm, device, steps, [], training, logdir)
            with_cb = _fit(config, dm, device, steps, [LensCallback(**cb_args)], training, logdir)
            ratios.append(with_cb / without)
    return statistics.median(ratios)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
