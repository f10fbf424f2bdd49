"""``bench/gpu_path.py`` (``bench/profile_probe.py --count-ops``): the GPU code path's operators and peak
memory, measured without a GPU."""

from __future__ import annotations

import importlib
import re
import time
import warnings
from pathlib import Path
from typing import Any
import sys

import pytest
import torch

from conftest import ROOT, bench_module, readme_commands


@pytest.mark.slow
def test_count_ops_counts_a_probe_run_on_the_meta_device(capsys: pytest.CaptureFixture[str]) -> None:
    main = bench_module("profile_probe").main
    placement = sys.modules["transformer_lens.HookedTransformer"].get_device_for_block_index
    assert main(["--count-ops", "--top", "50"]) == 0
    assert sys.modules["transformer_lens.HookedTransformer"].get_device_for_block_index is placement  # restored
    out = capsys.readouterr().out
    match = re.search(r"probe run \(([^)]*)\): (\d+); plain GPT forward: (\d+)", out)
    assert match is not None, out
    probes, probe_ops, plain_ops = match.group(1).split(", "), int(match.group(2)), int(match.group(3))
    assert "induction" in probes and "logit_lens" in probes
    assert probe_ops > plain_ops > 0
    counts = dict(re.findall(r"(\w+) (\d+)", out.rsplit("most frequent in the probe run: ", 1)[1]))
    # one chunk per batch (the GPU budget) for a 2-layer model: 2 x 2 attention patterns, and the
    # text batch's loss and logit-lens rows decoded in one block each, the repeated batch's in one
    assert counts["softmax"] == "4"
    assert counts["log_softmax"] == "3"
    peak = re.search(r"peak memory of the probe run's own tensors \(meta device, the GPU path\): ([\d.]+) MiB", out)
    assert peak is not None and float(peak.group(1)) > 1.0
    # the probe run multiplies the same matrices as the plain forward (no second forward; the
    # logit lens and the losses decode about as many rows as the plain forward's head) and moves
    # more bytes (every pattern materialised)
    arithmetic = re.search(r"arithmetic: probe run [\d.,]+ GFLOP, plain GPT forward [\d.,]+ \(([\d.]+)x\); "
                           r"bytes read and written: [\d.,]+ GB, [\d.,]+ GB \(([\d.]+)x\)", out)
    assert arithmetic is not None, out
    assert 0.8 < float(arithmetic.group(1)) < 1.2 and float(arithmetic.group(2)) > 1.5
    floor = re.search(r"probe run ([\d.]+) ms, plain GPT forward ([\d.]+) ms \(([\d.]+)x\)", out)
    assert floor is not None and float(floor.group(1)) > float(floor.group(2)) > 0


def test_live_bytes_tracks_storage_lifetimes() -> None:
    _LiveBytes = bench_module("gpu_path")._LiveBytes
    import torch

    weights = torch.ones(500, device="meta")  # made before the block: not counted
    with _LiveBytes() as memory:
        a = weights + 1  # 2,000 bytes
        view = a[:100]  # a view: no new storage
        a.mul_(2)  # in place: no new storage
        b = a * 2  # a and b alive: 4,000
        del a, view
        c = b.sum()  # b and c: 2,004
        del b
        d = torch.empty(300, device="meta") + c  # c, the empty and d: 2,404
    assert memory.peak == 4000
    assert d.numel() == 300


def test_live_bytes_counts_only_the_output_of_a_fused_attention() -> None:
    """On the meta device SDPA runs its math decomposition, which builds the [B, H, T, T] weights; a
    GPU's fused kernel does not, so only the output counts (the fused probe path's peak)."""
    gpu_path = bench_module("gpu_path")
    import torch.nn.functional as F

    q, k, v = (torch.ones(2, 4, 256, 16, device="meta") for _ in range(3))
    with gpu_path._LiveBytes() as memory, gpu_path._FusedAttention(memory):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        after = out * 2  # still counted outside the fused call
    assert memory.peak == 2 * out.numel() * 4 and after.shape == out.shape
    with gpu_path._LiveBytes() as unmarked:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert unmarked.peak >= 2 * 4 * 256 * 256 * 4  # the decomposition's weights


def test_op_counter_adds_up_arithmetic_traffic_and_the_device_floor() -> None:
    """FLOPs by PyTorch's formulas, bytes read and written (in place: twice; ``out=``: written once;
    broadcast: distinct elements), and per operator the slower of the two at the given peak rates."""
    gpu_path = bench_module("gpu_path")
    import torch
    import torch.nn.functional as F

    meta = {"device": "meta"}
    x, w, b = torch.ones(4, 8, **meta), torch.ones(8, 3, **meta), torch.ones(3, **meta)
    with gpu_path._OpCounter(peak_flops=1.0, peak_bytes_per_s=1.0) as counter:
        torch.addmm(b, x, w)  # 2 * 4 * 8 * 3 FLOPs; reads 3 + 32 + 24, writes 12 floats
    assert (counter.flops, counter.bytes, counter.device_floor) == (192, 284, 284.0)
    a, c, row, full = torch.ones(10, **meta), torch.ones(10, **meta), torch.ones(10, **meta), torch.ones(5, 10, **meta)
    index = torch.zeros(2, dtype=torch.long, **meta)
    cases = (
        (lambda: a.add_(row), 3 * 40),  # a read, row read, a written
        (lambda: torch.add(a, row, out=c), 3 * 40),  # c only written
        (lambda: full + row.expand(5, 10), 200 + 40 + 200),  # the broadcast row read once
        (lambda: full.index_select(1, index), 2 * 40 + 16),  # 5 x 2 floats read and written; the index
    )
    for op, nbytes in cases:
        with gpu_path._OpCounter() as counter:
            op()
        assert counter.bytes == nbytes and counter.flops == 0
        assert counter.device_floor == pytest.approx(nbytes / gpu_path.H200_BYTES_PER_S)
    q = torch.ones(1, 2, 4, 8, **meta)
    with gpu_path._OpCounter() as counter, gpu_path._FusedAttention(counter):
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert counter.counts == {"scaled_dot_product_attention": 1}
    assert counter.flops == 2 * (2 * 2 * 4 * 4 * 8)  # q @ k.T and p @ v, full squares
    assert counter.bytes == 4 * q.numel() * 4


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_composite_operators_count_as_their_kernels_in_either_grad_mode(mode: str) -> None:
    """Under ``torch.inference_mode`` (the probe run's) a dispatch mode sees ``linear`` and ``matmul``
    themselves; the counter and the peak tracker decompose them into the kernels a GPU launches."""
    gpu_path = bench_module("gpu_path")
    _LiveBytes, _OpCounter = gpu_path._LiveBytes, gpu_path._OpCounter
    import torch
    import torch.nn.functional as F

    x, w, b = torch.ones(4, 6, 8, device="meta"), torch.ones(8, 8, device="meta"), torch.ones(8, device="meta")
    q = torch.ones(4, 6, 2, 4, device="meta")
    with getattr(torch, mode)(), _OpCounter() as counter, _LiveBytes() as memory:
        F.linear(x, w, b)  # addmm on the flattened rows
        torch.matmul(q.permute(0, 2, 1, 3), q.permute(0, 2, 3, 1))  # two copies for the batch fold, one bmm
    assert counter.counts == {"addmm": 1, "clone": 2, "bmm": 1}
    assert memory.peak >= 2 * q.numel() * 4  # the copies were seen


def test_multi_tensor_operators_count_one_launch_per_tensor_off_the_fast_route() -> None:
    """CUDA's `_foreach_*` fast route needs dense tensors (and, for two lists, equal strides)."""
    _OpCounter = bench_module("gpu_path")._OpCounter
    import torch

    dst = [torch.ones(4, 6, device="meta"), torch.ones(3, device="meta")]
    same = [torch.ones(4, 6, device="meta"), torch.ones(3, device="meta")]
    transposed = [torch.ones(6, 4, device="meta").t(), torch.ones(3, device="meta")]
    sliced = [torch.ones(4, 12, device="meta")[:, :6], torch.ones(3, device="meta")]
    for sources, launches in ((same, 1), (transposed, 2)):
        with _OpCounter() as counter:
            torch._foreach_copy_(dst, sources)
        assert counter.counts["_foreach_copy_"] == launches
    for tensors, launches in ((dst, 1), (transposed, 1), (sliced, 2)):  # a transposed tensor is dense
        with _OpCounter() as counter:
            torch._foreach_norm(tensors, 1)
        assert counter.counts["_foreach_norm"] == launches


@pytest.mark.slow
def test_per_probe_costs_list_every_enabled_probe(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--per-probe``: a row per default probe with its batch kind, its cost alone and its marginal
    cost (all probes against all but it), beside the plain and the probe-free lean forward."""
    profile_probe = bench_module("profile_probe")
    monkeypatch.setattr(profile_probe, "keep_freed_memory", lambda: True)  # leave this process's malloc alone
    main = profile_probe.main
    from lens_callback.measure import DEFAULT_PROBES
    from lens_callback.probes import make_probe

    real_interleaved, tasks_seen = profile_probe.interleaved, []

    def recording(tasks: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        tasks_seen.append(dict(tasks))
        return real_interleaved(tasks, *args, **kwargs)

    monkeypatch.setattr(profile_probe, "interleaved", recording)
    assert main(["--per-probe", "--rounds", "2"]) == 0
    # the marginals' floor builds no pattern: without the attention entropy the text batch runs fused, so its
    # patterns are in that marginal, and a floor with every pattern counted them twice (bench review)
    assert tasks_seen[0]["lean forward, no probes"].__func__.__name__ == "lean_forward"
    assert tasks_seen[0]["lean forward, every pattern"].__func__.__name__ == "patterns_floor"
    out = capsys.readouterr().out
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| (\S[^|]*?) +\| (\w*) +\| +([\d.]+) \| +(-?[\d.]*) \| +(-?[\d.]+)x \|$", out, re.MULTILINE)}
    assert {"plain GPT forward", "lean forward, no probes", "lean forward, every pattern", "all probes"} <= set(rows), out
    for name in DEFAULT_PROBES:
        batch, alone, marginal, _ = rows[name]
        assert batch == make_probe(name).batch
        assert float(alone) > 0.0
        float(marginal)  # a signed difference of medians: noise can make it negative
    # a probe alone runs its own batch kind only: less than every probe together
    assert float(rows["induction"][1]) < float(rows["all probes"][1])
    assert re.search(r"all probes - lean forward - sum of marginals = -?[\d.]+ ms", out)


def test_profile_lists_the_phases_and_profiles_the_probe_run_beside_the_plain_forward(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    profile_probe = bench_module("profile_probe")
    kept = []
    monkeypatch.setattr(profile_probe, "keep_freed_memory", lambda: kept.append(True) or True)
    assert profile_probe.main(["--rounds", "1", "--top", "3", "--keep-freed-memory"]) == 0
    out = capsys.readouterr().out
    assert kept == [True]
    for table in ("== probe step (3 calls)", "== probe run + host transfer (no refresh, check or logging) (3 calls)",
                  "== plain GPT forward (3 calls)"):
        assert table in out
    assert "probes + host transfer" in out and "refresh (convert + copy_)" in out  # the phase table


def test_minor_faults_counts_pages_touched_for_the_first_time() -> None:
    import mmap

    minor_faults = bench_module("allocator").minor_faults
    if sys.platform != "linux":
        pytest.skip("page-fault counts come from getrusage on Linux")
    pages = 1024
    with mmap.mmap(-1, pages * mmap.PAGESIZE) as fresh:  # anonymous: no page is mapped before it is touched
        before = minor_faults()
        for page in range(pages):
            fresh[page * mmap.PAGESIZE] = 1
        assert minor_faults() - before > 0  # one per page, or per huge page where THP is "always"


def test_keep_freed_memory_stops_page_faults_for_memory_freed_and_taken_again() -> None:
    """In child processes (no torch, so nothing else allocates): two 20 MiB ``malloc`` blocks
    written, then freed, in turn. By default glibc gives the freed heap top back to the kernel, so
    every round faults on every page again; after `keep_freed_memory` the memory stays mapped."""
    import subprocess

    if sys.platform != "linux":
        pytest.skip("glibc malloc tunables")
    child = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from bench.allocator import keep_freed_memory, minor_faults

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 20 << 20

def round_faults():
    before = minor_faults()
    blocks = [libc.malloc(size) for _ in range(2)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
    return minor_faults() - before

kept = keep_freed_memory() if sys.argv[2] == "keep" else None
print(kept, *(round_faults() for _ in range(4)))
"""

    def rounds(mode: str) -> tuple[str, list[int]]:
        out = subprocess.run([sys.executable, "-c", child, str(ROOT), mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], [int(f) for f in out[1:]]

    _, default = rounds("default")
    kept, faults = rounds("keep")
    if kept != "True":
        pytest.skip("not glibc")
    assert min(default[1:]) > 5000, default  # 40 MiB is 10,240 pages, faulted afresh every round
    assert max(faults[1:]) < 64, faults


def test_host_proxy_times_the_gpu_code_path_and_restores_the_cpu_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """``bench/host_proxy.py``: the probe step and its phases against the plain forward on tiny batches,
    under `off_cpu_settings` (a probe run then keeps no CPU workspace), every setting restored after."""
    import torch

    host_proxy = bench_module("host_proxy")
    runner = importlib.import_module("lens_callback.probes.runner")
    attention = importlib.import_module("lens_callback.probes.attention")
    entropy = importlib.import_module("lens_callback.probes.attention_entropy")
    callback = importlib.import_module("lens_callback.callback")
    before = (runner.WORKSPACE_DEVICES, dict(runner.PATTERN_CHUNK_BYTES), dict(runner.LOGIT_BLOCK_ELEMENTS),
              dict(attention.MASK_BLOCKS_ON), attention.ZERO_BIAS_DEVICES, dict(entropy.ROW_BLOCKS_ON),
              callback.finite_flag)
    with host_proxy.off_cpu_settings():
        assert "cpu" not in runner.WORKSPACE_DEVICES and not entropy.ROW_BLOCKS_ON
        assert callback.finite_flag([torch.ones(3)]) and not callback.finite_flag([torch.tensor([float("nan")])])
    after = (runner.WORKSPACE_DEVICES, runner.PATTERN_CHUNK_BYTES, runner.LOGIT_BLOCK_ELEMENTS,
             attention.MASK_BLOCKS_ON, attention.ZERO_BIAS_DEVICES, entropy.ROW_BLOCKS_ON, callback.finite_flag)
    assert after == before

    threads = torch.get_num_threads()
    assert host_proxy.main(["--rounds", "2"]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| +(\S[^|]*?) +\| +([\d.]+) \| +[\d.]+x \|$", out, re.MULTILINE))
    assert set(rows) == {"plain GPT forward", "probe step (whole)", "refresh (convert + copy_)",
                         "probes + host transfer", "finite-weights check", "logging"}, out
    # no comparison of two timings: the whole step and its phase are timed apart, medians of two
    # rounds, and a busy machine inverted them (4.20 against 4.89 ms in the twenty-fourth session)
    assert all(float(value) > 0 for value in rows.values())
    assert re.search(r"^host proxy: probe step / plain forward = [\d.]+$", out, re.MULTILINE)


def test_p3s_plain_loop_trains_the_lightning_rounds_weights_bit_for_bit() -> None:
    """P3 compares one training: the plain loop took AdamW's default ``eps`` and decayed over the
    batches whatever the module's ``lr_decay_steps`` (bench review), so it timed another run than the
    Trainer's whenever a config set them."""
    import copy

    from bench.lightning_vs_plain import _lightning_round, _plain_round
    from nanogpt_model import GPTConfig, NanoGPTModule, default_corpus
    from nanogpt_model.data import WindowBatches

    torch.manual_seed(0)
    module = NanoGPTModule(GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16, dropout=0.0),
                           learning_rate=1e-2, eps=1e-3, warmup_steps=2, lr_decay_steps=6, min_lr=1e-3)
    batches = list(WindowBatches(default_corpus(), 16, 2, seed=0, stream=0, num_batches=10))
    trained, plain = copy.deepcopy(module), copy.deepcopy(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Trainer's notes on a tiny fit
        _lightning_round(trained, batches, torch.device("cpu"))
    _plain_round(plain, batches, torch.device("cpu"))
    before, lightning, loop = (m.model.state_dict() for m in (module, trained, plain))
    assert any(not torch.equal(before[k], lightning[k]) for k in before)  # it trained
    assert [k for k in lightning if not torch.equal(lightning[k], loop[k])] == []


def test_p3_trains_the_overridden_model_and_p2_steps_as_the_config_trains(tmp_path: Path) -> None:
    """bench/run.py --model-config reached every row but P3, which trained the YAML's model (a config
    on another vocabulary crashed there: the batches are the corpus's bytes); P2's train step ignored
    the config's gradient accumulation (GPT-2's 40 micro-batches per optimizer step)."""
    import yaml

    from bench.lightning_vs_plain import measure
    from bench.run import training_settings

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"config": {"block_size": 16, "vocab_size": 65, "n_layer": 1, "n_head": 2, "n_embd": 16}},
        "data": {"block_size": 16, "batch_size": 2},
        "trainer": {"max_steps": 10, "accumulate_grad_batches": 4, "precision": "bf16-mixed"},
    }))
    result = measure(steps=1, rounds=1, warmup=1, config_path=config, model_overrides={"vocab_size": 256})
    assert result["ratio"] > 0
    assert result["log_every_n_steps"] == 50  # Lightning's default, where the config's trainer section has none
    assert training_settings(config, torch.device("cpu")) == {"accumulate_grad_batches": 4}
    assert training_settings(config, torch.device("cuda")) == {"accumulate_grad_batches": 4, "precision": "bf16-mixed"}
    # the module's compile (configs/gpt2_124m.yaml) sets a GPU's step cost too (bench review)
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "model": {**raw["model"], "compile": True}}))
    assert training_settings(config, torch.device("cpu")) == {"accumulate_grad_batches": 4}
    assert training_settings(config, torch.device("cuda"))["compile"] is True
    # the standalone script takes --model-config: a config on another vocabulary crashed it (bench review)
    from bench.lightning_vs_plain import main as p3_main
    assert p3_main(["--config", str(config), "--model-config", '{"vocab_size": 256}', "--steps", "1", "--rounds", "1",
                    "--warmup", "1", "--threads", "1"]) in (0, None)


def test_parity_cost_times_the_check_at_the_probe_length_and_at_64_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    parity_cost = bench_module("parity_cost")
    assert parity_cost.main(["--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "parity check at the config's probe settings: 2 x 256 tokens" in out
    assert "parity check at 64 tokens: 2 x 64 tokens" in out


def test_background_times_a_probe_step_beside_training_on_a_weight_copy(capsys: pytest.CaptureFixture[str]) -> None:
    background = bench_module("background")
    assert background.main(["--rounds", "1", "--k", "1"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^  (train|train \+ probe|train \| probe|probe) +([\d.]+) ms$", out, re.MULTILINE))
    assert set(rows) == {"train", "train + probe", "train | probe", "probe"}, out
    assert re.search(r"^background hidden=-?[\d.]+ train\|probe/train\+probe=[\d.]+$", out, re.MULTILINE), out


def test_fused_attention_times_the_probe_run_with_the_patterns_built_and_only_where_read(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fused_attention = bench_module("fused_attention")
    import lens_callback.probes.attention as attention_module

    monkeypatch.setattr(fused_attention, "keep_freed_memory", lambda: True)  # leave this process's malloc alone
    assert fused_attention.main(["--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| (\S[^|]*?) +\| +([\d.]+) \| +[\d.]+x \|$", out, re.MULTILINE))
    assert set(rows) == {"plain GPT forward"} | {
        f"{label}, patterns {how}" for label in ("config's probes", "without attn_entropy")
        for how in ("always built", "built only where read")}, out
    for label in ("config's probes", "without attn_entropy"):
        assert re.search(rf"^{label}: fused / built = [\d.]+ ", out, re.MULTILINE), out
    assert attention_module.FUSED_ATTENTION is True  # restored


def test_the_fused_and_built_variants_take_their_routes_and_the_meta_peak_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``bench/fused_attention.py``'s rows run the route they name (SDPA calls only in the fused
    ones, only for the text batch once the entropy is off); on the meta device the fused route's
    peak is below the built one's (the SDPA decomposition's weights are not counted)."""
    import argparse

    import torch.nn.functional as F

    fused_attention, gpu_path = bench_module("fused_attention"), bench_module("gpu_path")
    import lens_callback.probes.attention as attention_module
    from lens_callback.measure import build_runner

    parser = argparse.ArgumentParser()
    bench_module("run").add_model_arguments(parser)
    bench = bench_module("run").make_bench(parser.parse_args([]), torch.device("cpu"))
    assert fused_attention.text_pattern_probes(bench) == ["attn_entropy"]
    rest = [name for name in bench.cb.probes if name != "attn_entropy"]
    calls: list[int] = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    counted = {}
    for probes, fused in ((list(bench.cb.probes), True), (rest, False), (rest, True)):
        calls.clear()
        fused_attention.probe_run(bench, probes, fused)()
        counted[(len(probes), fused)] = len(calls)
    n_layers = bench.config.n_layer
    assert counted == {(len(rest) + 1, True): 0, (len(rest), False): 0, (len(rest), True): n_layers}
    monkeypatch.setattr(F, "scaled_dot_product_attention", original)
    bench.cb.runner = build_runner(rest, {k: v for k, v in bench.cb.probe_options.items() if k in rest})
    peaks = {}
    for fused in (False, True):
        monkeypatch.setattr(attention_module, "FUSED_ATTENTION", fused)
        peaks[fused] = gpu_path.measure_gpu_path(bench).peak_bytes
    assert peaks[True] < peaks[False]


@pytest.mark.slow
def test_run_prints_every_row_and_finite_figures_for_the_default_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    """The headline figures' rows on the default config's (GPT-2-style) architecture, P3 and the A/B
    included: no test ran the TransformerLens rows, P1b, P3 inside run.py or the direct A/B (bench review)."""
    run = bench_module("run")
    model = '{"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64}'
    assert run.main(["--config", str(ROOT / "configs" / "default.yaml"), "--model-config", model, "--rounds", "1",
                     "--p3-steps", "1", "--p3-rounds", "1", "--train-steps", "1", "--threads", "1"]) in (0, None)
    out = capsys.readouterr().out
    for row in ("plain GPT forward", "TL route", "model reused", "lean TL forward, no probes", "this project's probe step",
                "Lightning vs plain loop", "direct A/B"):
        assert row in out, (row, out[-1500:])
    last = re.search(r"^P1 probe/forward=([\d.]+) P1b TL-route/probe=([\d.]+) P2 overhead=([\d.]+)% "
                     r"P3 lightning/plain=([\d.]+)$", out, re.M)
    assert last and all(0 < float(x) < 1e6 for x in last.groups()), out[-800:]


@pytest.mark.slow
def test_run_prints_the_table_and_the_last_line_for_the_modern_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/run.py crashed on configs/modern.yaml: its 'TL reused' row called TransformerLens's
    Karpathy-GPT converter (bench review). The TransformerLens rows are left out there; P1b is nan."""
    run = bench_module("run")
    model = '{"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64, "vocab_size": 256}'
    assert run.main(["--config", str(ROOT / "configs" / "modern.yaml"), "--model-config", model, "--rounds", "1",
                     "--skip-p3", "--skip-ab", "--train-steps", "1", "--threads", "1"]) in (0, None)
    out = capsys.readouterr().out
    assert "this project's probe step" in out and "TL route" not in out and "model reused" not in out
    assert "lean TL forward, no probes" in out and "  same, fused attention" in out
    assert re.search(r"^P1 probe/forward=[\d.]+ P1b TL-route/probe=nan P2 overhead=[\d.]+% P3 lightning/plain=nan$",
                     out, re.M), out[-500:]


def test_the_train_step_time_leaves_each_fits_start_up_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/run.py took a train step's time as (a 2n-step fit's wall time - an n-step fit's) / n: a
    start-up that took longer in the first fit than in the second (a busy machine) made it negative, and
    P2 with it (a run beside another test run printed a train step of -2.86 ms and P2 overhead=-17.55%).
    It is the median interval between consecutive optimizer steps of one fit now, one per optimizer step
    under gradient accumulation."""
    from nanogpt_model import GPTConfig, NanoGPTModule, TextDataModule

    run = bench_module("run")
    setups: list[str] = []
    setup = NanoGPTModule.setup

    def slow_second_start_up(self: NanoGPTModule, stage: str) -> None:
        setups.append(stage)
        if len(setups) == 2:  # the first timed fit's start-up
            time.sleep(0.5)
        setup(self, stage)

    monkeypatch.setattr(NanoGPTModule, "setup", slow_second_start_up)
    config = GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=16)
    data = TextDataModule(block_size=32, batch_size=2, val_batches=1)
    step = run._train_step_time(config, data, torch.device("cpu"), 2)
    assert 0 < step < 0.5, step

    clock = run.StepClock(torch.device("cpu"))  # bench/lightning_vs_plain.py's, which P3 uses too
    run._fit(config, data, torch.device("cpu"), 3, [clock], {"accumulate_grad_batches": 2})
    assert len(clock.ends) == 3 and clock.ends == sorted(clock.ends)


def test_a_scratch_logger_is_closed_at_exit_before_its_directory_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benches' TensorBoard writers were left open when ``atexit`` removed their scratch directory: the
    writer's thread, appending queued events by path, printed a FileNotFoundError traceback after the table
    (bench review). ``atexit`` runs the last registration first: the writer's close, then the removal."""
    run = bench_module("run")
    registered: list[Any] = []
    monkeypatch.setattr(run.atexit, "register", lambda fn, *args, **kwargs: registered.append((fn, args, kwargs)))
    logger = run.scratch_logger("lens-test-", "t")
    for step in range(100):
        logger.experiment.add_scalar("x", float(step), step)
    writer = logger.experiment.file_writer.event_writer
    order = []
    for fn, args, kwargs in reversed(registered):  # atexit's order
        fn(*args, **kwargs)
        order.append("removed" if Path(logger.save_dir).exists() is False else "kept")
        if len(order) == 1:
            assert writer._async_writer._closed and Path(logger.log_dir).is_dir()  # closed, directory still there
    assert order == ["kept", "removed"]


def test_prune_cost_times_both_rules_on_the_same_root(capsys: pytest.CaptureFixture[str]) -> None:
    """``bench/prune_cost.py``: the listing rule and ``prune_snapshots``, side by side, on one root per count
    (its own assert checks that the prune removes nothing there)."""
    main = bench_module("prune_cost").main
    assert main(["--counts", "12", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\| 12 \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", out, re.MULTILINE), out


def test_composition_cost_times_the_probes_and_both_routes_on_the_callbacks_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    composition_cost = bench_module("composition_cost")
    # leave this process's malloc alone (the bench is built by fused_attention's interleaved_bench)
    monkeypatch.setattr(bench_module("fused_attention"), "keep_freed_memory", lambda: True)
    assert composition_cost.main(["--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| (\S[^|]*?) +\| +([\d.]+) \| +[\d.]+x \|$", out, re.MULTILINE))
    assert set(rows) == {"plain GPT forward", "probe run, the config's probes", "probe run, + the 3 composition probes",
                         "composition_scores(model, 'k')", "TransformerLens all_composition_scores('K')"}, out
    assert re.search(r"^the 3 composition probes add -?[\d.]+ ms to the probe run \(-?[\d.]+%\); composition_scores "
                     r"is [\d.]+x faster than TransformerLens's all_composition_scores", out, re.MULTILINE), out


@pytest.mark.parametrize("transformer_lens", [True, False], ids=["with-tl", "without-tl"])
def test_copying_cost_times_the_probe_its_parts_and_transformer_lens_s_route(
    transformer_lens: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    copying_cost = bench_module("copying_cost")
    monkeypatch.setattr(bench_module("fused_attention"), "keep_freed_memory", lambda: True)
    assert copying_cost.main(["--rounds", "1"] + ([] if transformer_lens else ["--no-transformer-lens"])) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| (\S[^|]*?) +\| +([\d.]+) \| +[\d.]+x \|$", out, re.MULTILINE))
    expected = {"plain GPT forward", "probe run, the config's probes", "probe run, + copying",
                "copying_matrices (device part)", "eigenvalue_positivity (host part)"}
    assert set(rows) == expected | ({"TransformerLens FactoredMatrix eigenvalues"} if transformer_lens else set())
    assert re.search(r"^copying adds -?[\d.]+ ms to the probe run \(-?[\d.]+%; median of per-round differences\)"
                     + (r"; its two parts are [\d.]+x faster than TransformerLens's route$" if transformer_lens else "$"),
                     out, re.MULTILINE), out


def test_probe_noise_reprobes_a_snapshot_on_several_draws_of_each_batch_size(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``bench/probe_noise.py``: each setting's mean and spread over draws of the probe batches; the draws differ
    (a spread of 0 would mean one batch measured again and again)."""
    from lens_callback import save_snapshot
    from nanogpt_model.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=False))
    save_snapshot(tmp_path, 7, converter="nanogpt", model_config=model.config.to_dict(), state_dict=model.state_dict())
    main = bench_module("probe_noise").main
    assert main([str(tmp_path), "--steps", "7", "--batches", "2x1,4x2", "--draws", "3", "--repeat-length", "8",
                 "--text-len", "32"]) == 0
    rows = re.findall(r"^ +7 +(\d) x (\d) +(.*)$", capsys.readouterr().out, re.MULTILINE)
    assert [(r, t) for r, t, _ in rows] == [("2", "1"), ("4", "2")]
    for _, _, cells in rows:
        spreads = [float(s) for s in re.findall(r"\+- (\S+)", cells)]
        assert len(spreads) == 6, cells
        assert spreads[2] > 0 and spreads[4] > 0, cells  # the ICL score (text batch), the repeated loss (repeated)


@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "bench").glob("*.py") if "Usage:" in p.read_text()))
def test_each_scripts_usage_line_names_exactly_the_flags_its_parser_takes(
        script: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A bench script's docstring ``Usage: ``...`` `` names every flag its command line takes, and no other:
    ``background.py``'s left out ``--device``, ``probe_noise.py``'s ``--repeat-length`` and ``--text-len``,
    ``profile_probe.py``'s ``--keep-freed-memory`` (bench review)."""
    module = bench_module(script)
    usage = re.search(r"Usage: ``(.*?)``", module.__doc__ or "", re.DOTALL)
    assert usage is not None, f"bench/{script}.py: no ``Usage: ``...```` in its docstring"
    monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", "--help"])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 0
    options = re.split(r"\n\S[^\n]*:\n", capsys.readouterr().out)[-1]  # the last section: options
    taken = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", options)) - {"--help"}
    assert set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", usage.group(1))) == taken, usage.group(1)


def test_p2_keeps_two_significant_digits_below_a_tenth_of_a_percent() -> None:
    """bench/run.py printed GPT-2 small's P2 at its cadence as ``P2 overhead=0.00%`` (bench review)."""
    percent = bench_module("run").percent
    assert [percent(x) for x in (3.8249, 0.75, 0.1, 0.0104, 0.000459, 0.0, float("nan"))] == [
        "3.82", "0.75", "0.10", "0.010", "0.00046", "0.00", "nan"]


def test_the_readmes_bench_command_lines_name_scripts_and_options_they_have(capsys: pytest.CaptureFixture[str]) -> None:
    """Every ``python bench/NAME.py ...`` line of the README's prose names a script of ``bench/`` and options its
    ``--help`` lists (``[...]`` marks them optional there; ``...`` and capitals stand for values)."""
    commands = [words for words in readme_commands("python", {"[": "", "]": ""}) if words[:1] != ["-m"]]
    assert commands and all(words[0].startswith("bench/") for words in commands), commands
    for script, *args in commands:
        assert (ROOT / script).is_file(), script
        flags = {word for word in args if word.startswith("-")}
        if flags:
            with pytest.raises(SystemExit):
                bench_module(Path(script).stem).main(["--help"])
            assert flags <= set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", capsys.readouterr().out)), (script, args)
