"""CUDA-graph replay of probe runs (`lens_callback.probes.graphs`): same numbers as the eager run
after the weights change in place, the CUDA generator untouched, a failed capture left eager.

The replay tests need a GPU; the CPU tests cover what does not: the option's validation, the
recorded run's key, the one-time staging of inputs and index tensors, and both forms of the
finite-weights check (the fused one is what a GPU runs).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor
from typing_extensions import override

import lens_callback.probes.attention as attention_module
from lens_callback import LensCallback
from lens_callback.convert import copy_weights
from lens_callback.measure import measure
from lens_callback.probes import MAIN_KEY, InductionProbe, ProbeInputs, ProbeRunner, make_probe, repeated_tokens
from lens_callback.probes.graphs import ProbeGraphs
from test_probes import BUILT_IN, random_model, random_tokens

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def inputs() -> ProbeInputs:
    return ProbeInputs(
        repeated=repeated_tokens(torch.arange(29), 3, 6, torch.Generator().manual_seed(0)),
        text=random_tokens(3, 16, 29),
    )


def perturbed(model, seed: int) -> dict[str, Tensor]:
    """New weights for every parameter of ``model`` (same shapes, on its device)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (p.detach().cpu() + 0.3 * torch.randn(p.shape, generator=gen)).to(p.device)
            for name, p in model.named_parameters()}


def test_cuda_graphs_option_is_validated() -> None:
    with pytest.raises(ValueError, match="cuda_graphs must be true or false"):
        LensCallback(cuda_graphs="yes")  # type: ignore[arg-type]
    assert LensCallback().cuda_graphs is False  # opt-in


def test_graph_key_follows_parameter_storage_inputs_and_settings() -> None:
    model = random_model()
    batches = {"text": random_tokens(3, 16, 29)}
    key = ProbeGraphs.key(model, batches, None, True)
    assert key == ProbeGraphs.key(model, dict(batches), None, True)
    copy_weights(model, perturbed(model, 1))  # values change, storage does not
    assert key == ProbeGraphs.key(model, batches, None, True)
    assert key != ProbeGraphs.key(model, batches, None, False)
    assert key != ProbeGraphs.key(model, batches, 32, True)
    assert key != ProbeGraphs.key(model, {"text": batches["text"].clone()}, None, True)
    with pytest.MonkeyPatch.context() as patch:  # the lean run's route: a recorded fused run is not replayed
        patch.setattr(attention_module, "FUSED_ATTENTION", False)
        assert key != ProbeGraphs.key(model, batches, None, True)


def test_copy_weights_copies_in_place_on_cpu() -> None:
    model = random_model()
    before = [p.data_ptr() for p in model.parameters()]
    weights = perturbed(model, 2)
    with torch.no_grad():
        copy_weights(model, weights)
    assert [p.data_ptr() for p in model.parameters()] == before
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name


def test_loss_positions_reach_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host-to-device copy per run would synchronise and could not be recorded in a graph."""
    runner = ProbeRunner([make_probe(name) for name in BUILT_IN])
    model, probe_inputs = random_model(), inputs()
    made: list[tuple[int, ...]] = []
    original = torch.tensor

    def counting(data, *args, **kwargs):  # noqa: ANN001, ANN202
        if isinstance(data, (list, tuple)):
            made.append(tuple(data))
        return original(data, *args, **kwargs)

    runner.run(model, probe_inputs)
    monkeypatch.setattr(torch, "tensor", counting)
    first = runner.run(model, probe_inputs)
    second = runner.run(model, probe_inputs)
    assert made == []
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, equal_nan=True, msg=key)


def test_probe_batches_are_copied_to_another_device_once_per_source_version() -> None:
    """`ProbeRunner._stage` keeps the device copy while the source tensor is the same, unmodified:
    a CUDA graph needs fixed input addresses, and an eager run skips a copy per step. (The
    ``meta`` device stands in for a GPU: the copy is made, no data moves.)"""
    runner = ProbeRunner([make_probe(name) for name in BUILT_IN])
    model, probe_inputs, meta = random_model(), inputs(), torch.device("meta")
    first = runner._stage(model, probe_inputs, None, meta)
    assert {name: t.device for name, t in first.items()} == {"repeated": meta, "text": meta}
    again = runner._stage(model, probe_inputs, None, meta)
    assert all(again[name] is first[name] for name in first)
    probe_inputs.text[0, 0] = 1  # modified in place: copied anew
    third = runner._stage(model, probe_inputs, None, meta)
    assert third["text"] is not first["text"] and third["repeated"] is first["repeated"]
    on_model = runner._stage(model, probe_inputs, None, torch.device("cpu"))  # already there: as is
    assert on_model["text"] is probe_inputs.text


# -- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
def test_replay_matches_the_eager_run_after_in_place_weight_changes() -> None:
    model = random_model().to("cuda")
    probe_inputs = inputs()  # on the CPU: staged on the device once
    graphed = ProbeRunner([make_probe(name) for name in BUILT_IN])
    eager = ProbeRunner([make_probe(name) for name in BUILT_IN])
    rng = torch.cuda.get_rng_state()
    for seed in range(4):
        with torch.no_grad():
            copy_weights(model, perturbed(model, seed))
        got = {k: v.clone() for k, v in graphed.run(model, probe_inputs, cuda_graph=True).items()}
        want = eager.run(model, probe_inputs)
        assert set(got) == set(want)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, equal_nan=True, msg=f"{seed} {key}")
    assert graphed.graph_failure is None and len(graphed._graphs) == 1
    assert torch.equal(torch.cuda.get_rng_state(), rng)  # nothing random ran, capture took no offset
    graphed.run(model, probe_inputs, cuda_graph=True, lean_attention=False)  # the other attention path
    assert len(graphed._graphs) == 2
    graphed.run(model, ProbeInputs(repeated=probe_inputs.repeated, text=random_tokens(3, 16, 29, seed=5)), cuda_graph=True)
    assert len(graphed._graphs) == 1  # other inputs: the earlier graphs are dropped
    graphed.run(model, probe_inputs)  # an eager run on yet other (staged) inputs drops it too
    assert len(graphed._graphs) == 0
    graphed.run(model, probe_inputs, cuda_graph=True)
    graphed.release_graphs()
    assert len(graphed._graphs) == 0


@pytest.mark.gpu
@cuda
def test_a_run_of_weights_only_probes_is_recorded_without_a_batch() -> None:
    """The composition and copying probes read no batch: a run of them alone stages none, and its recording (no
    forward, the probes' reductions of the weights) replays their eager numbers after the weights change in place."""
    model = random_model().to("cuda")
    names = ["k_composition", "q_composition", "v_composition", "copying"]
    graphed, eager = (ProbeRunner([make_probe(name) for name in names]) for _ in range(2))
    no_batch = ProbeInputs(repeated=None, text=None)
    for seed in range(3):
        with torch.no_grad():
            copy_weights(model, perturbed(model, seed))
        got = {k: v.clone() for k, v in graphed.run(model, no_batch, cuda_graph=True).items()}
        want = eager.run(model, no_batch)
        assert set(got) == set(want)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=f"{seed} {key}")
    assert graphed.graph_failure is None and len(graphed._graphs) == 1


class _SyncingProbe(InductionProbe):
    """Reads a value on the host in compute(): allowed eagerly, impossible inside a CUDA graph."""

    name = "syncing"

    @override
    def compute(self) -> dict[str, Tensor]:
        out = super().compute()
        if float(out[MAIN_KEY].sum()) > 1e9:  # a host sync
            raise AssertionError("unreachable")
        return out


@pytest.mark.gpu
@cuda
def test_a_probe_that_synchronises_stays_eager_with_the_reason() -> None:
    model = random_model().to("cuda")
    runner = ProbeRunner([_SyncingProbe()])
    reference = ProbeRunner([InductionProbe()]).run(model, inputs())
    for _ in range(2):
        out = runner.run(model, inputs(), cuda_graph=True)
        torch.testing.assert_close(out["syncing"], reference["induction"])
    assert runner.graph_failure is not None and len(runner._graphs) == 0
    # the device is usable afterwards
    torch.testing.assert_close(ProbeRunner([InductionProbe()]).run(model, inputs(), cuda_graph=True)["induction"],
                               reference["induction"])


@pytest.mark.gpu
@cuda
def test_callback_replays_and_logs_the_eager_numbers(tmp_path: Path, tiny_fit) -> None:
    module, cb = tiny_fit.module(), tiny_fit.lens(every_n_steps=2, cuda_graphs=True)

    class Keep(L.Callback):  # after the LensCallback: its private model, which it gives back when the fit ends
        def on_train_batch_end(self, *args: Any) -> None:
            self.hooked, self.inputs = cb._hooked, cb._inputs

    keep = Keep()
    trainer = tiny_fit.trainer(tmp_path, max_steps=6, accelerator="gpu", callbacks=[cb, keep])
    trainer.fit(module, datamodule=tiny_fit.data())
    assert not cb.errors and cb.runner.graph_failure is None
    assert len(cb.runner._graphs) == 0 and cb._hooked is None  # released at the end of training
    last = cb.probed_steps[-1]
    eager = measure(keep.hooked, cb.runner, keep.inputs, max_batch_tokens=cb.max_batch_tokens)
    for tag, value in eager.scalars.items():
        assert cb.history[last][tag] == pytest.approx(value, abs=1e-5, nan_ok=True), tag


@pytest.mark.parametrize("fused", [False, True])
def test_weights_finite_finds_nan_and_inf_in_any_tensor(fused: bool) -> None:
    """Both forms of the finite-weights check (the fused one is the GPU default), run on CPU."""
    from lens_callback.callback import weights_finite

    params = [torch.randn(5, 7), torch.randn(3), torch.randn(2, 2, 2)]
    assert weights_finite(params, fused=fused) and weights_finite([], fused=fused)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for i in range(len(params)):
            broken = [p.clone() for p in params]
            broken[i].view(-1)[-1] = bad
            assert not weights_finite(broken, fused=fused), (bad, i)
    assert weights_finite([torch.full((4,), 3e30)], fused=fused)  # large but finite
    # an empty tensor holds nothing non-finite (aminmax refused it on the CPU route)
    assert weights_finite([torch.empty(0, 4), *params], fused=fused) and weights_finite([torch.empty(0)], fused=fused)
    assert not weights_finite([torch.empty(0), torch.tensor([float("nan")])], fused=fused)


def test_the_fused_check_sees_packed_weights_as_dense_tensors() -> None:
    """The joint W_Q/W_K/W_V storage of a packed model is checked as one dense tensor (PyTorch's
    multi-tensor fast route), with the same elements; a slice that does not cover its storage stays."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from lens_callback.callback import dense_cover, weights_finite
    from lens_callback.convert.base import is_dense
    from lens_callback.probes import pack_attention_weights

    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4,
                                                      d_vocab=11, act_fn="gelu", seed=0))
    pack_attention_weights(model)
    params = list(model.parameters())
    assert not all(is_dense(p) for p in params)
    cover = dense_cover(params)
    assert all(is_dense(t) for t in cover)
    assert sum(t.numel() for t in cover) == sum(p.numel() for p in params) and len(cover) < len(params)
    assert weights_finite(params, fused=True)
    with torch.no_grad():
        model.blocks[1].attn.W_K[2, 3, 1] = float("nan")
    assert not weights_finite(params, fused=True) and not weights_finite(params, fused=False)

    base = torch.zeros(10)
    part = base[::2]  # half of its storage: kept as it is
    kept = dense_cover([part])
    assert len(kept) == 1 and kept[0] is part
    assert is_dense(torch.zeros(3, 4).t()) and is_dense(torch.zeros(2, 1, 3)[:, :, :])
    assert not is_dense(torch.zeros(4, 6)[:, :3]) and not is_dense(torch.zeros(3).expand(2, 3))


def test_a_failed_capture_is_warned_once_and_training_goes_on() -> None:
    """The callback's side of a failed capture (the capture itself needs a GPU): one warning naming
    the reason, no fault counted, results as usual."""
    from nanogpt_model import GPT, GPTConfig

    gpt = GPT(GPTConfig(block_size=32, vocab_size=29, n_layer=2, n_head=2, n_embd=16))
    cb = LensCallback(every_n_steps=None, log_spaced=False, repeat_length=6, text_len=16, cuda_graphs=True)
    cb.attach(gpt)
    cb.runner._graphs.failure = "RuntimeError: operation not permitted when stream is capturing"
    with pytest.warns(UserWarning, match="could not be recorded as a CUDA graph.*not permitted"):
        first = cb.probe_step(None, 1, gpt.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = cb.probe_step(None, 2, gpt.state_dict())
    assert not cb.errors and first is not None and second is not None
    assert first.scalars == second.scalars


class _FakeCapture:
    """torch.cuda's stream and graph calls made no-ops, so that `ProbeGraphs.run` takes its CUDA branch on CPU
    tensors. An op that synchronises inside a capture raises and invalidates it, and the capture's end raises
    too (``cudaStreamEndCapture``), as on a GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import contextlib

        self.capturing = self.invalidated = False

        @contextlib.contextmanager
        def graph(cuda_graph: Any, stream: Any = None, capture_error_mode: str = "global") -> Any:
            # PyTorch before its per-capture RNG state: capture_begin flags the default generator's state as
            # capturing, and only a capture_end that recorded the graph clears the flag
            self.capturing, self.invalidated = True, False
            state = self.generator.state
            state["capturing"] = True
            try:
                yield
            finally:
                self.capturing = False
                if self.invalidated:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
                state["capturing"] = False

        stream = type("Stream", (), {"wait_stream": lambda self, other: None})
        self.generator = _FakeGenerator()
        for name, fake in {"default_generators": (self.generator,), "current_device": lambda: 0,
                           "device": lambda d: contextlib.nullcontext(), "current_stream": lambda d=None: stream(),
                           "Stream": lambda d=None: stream(), "stream": lambda s: contextlib.nullcontext(),
                           "CUDAGraph": type("CUDAGraph", (), {"replay": lambda self: None}), "graph": graph,
                           "synchronize": lambda d=None: None}.items():
            monkeypatch.setattr(torch.cuda, name, fake)
        monkeypatch.setattr(Tensor, "record_stream", lambda tensor, s: None)

    def sync(self) -> None:
        if self.capturing:
            self.invalidated = True
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


class _FakeGenerator:
    """A CUDA default generator's state object (a dict) and the calls that swap it, as PyTorch's
    ``graphsafe_get_state``, ``graphsafe_set_state`` and ``clone_state`` do."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"seed": 7, "offset": 12, "capturing": False}

    def graphsafe_get_state(self) -> Any:
        return type("Handle", (), {"state": self.state})()

    def graphsafe_set_state(self, handle: Any) -> None:
        self.state = handle.state

    def clone_state(self) -> Any:
        return type("Handle", (), {"state": {**self.state, "capturing": False}})()

    def random_op(self) -> None:
        """A CUDA random op outside a capture (PyTorch's ``CUDAGeneratorState::increase``)."""
        if self.state["capturing"]:
            raise RuntimeError("Offset increment outside graph capture encountered unexpectedly.")
        self.state["offset"] += 4


def _graph_run(runner: ProbeRunner, model: Any, probe_inputs: ProbeInputs) -> dict[str, Tensor]:
    """What `ProbeRunner.run` does with ``cuda_graph=True`` on a CUDA model."""
    return runner._graph_run(model, runner._stage(model, probe_inputs, None, model.W_E.device), None, True)


def test_a_failed_capture_reports_the_eager_runs_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe that synchronises fails only inside the capture: its results (from the eager run) are
    returned, so it is not among the runner's failures (the callback counted a probe fault, and raised
    under strict, for a probe it logged). The reason names the cause, not capture_end's error."""
    fake = _FakeCapture(monkeypatch)

    class Syncing(InductionProbe):
        name = "syncing"

        @override
        def compute(self) -> dict[str, Tensor]:
            fake.sync()
            return super().compute()

    runner = ProbeRunner([Syncing(), make_probe("prev_token")])
    model, probe_inputs = random_model(), inputs()
    out = _graph_run(runner, model, probe_inputs)
    assert set(out) == {"syncing", "prev_token"} and runner.failures == {} and runner.failure_errors == {}
    assert "not permitted when stream is capturing" in runner.graph_failure and len(runner._graphs) == 0


@pytest.mark.parametrize("fails", [True, False])
def test_a_capture_leaves_the_default_cuda_generator_as_it_was(monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
    """The capture runs on a copy of the generator's state: before PyTorch's per-capture RNG state, a failed
    capture left the state flagged as capturing, and the training's next dropout on the GPU raised."""
    fake = _FakeCapture(monkeypatch)
    own, copied = fake.generator.state, []

    class Syncing(InductionProbe):
        name = "syncing"

        @override
        def compute(self) -> dict[str, Tensor]:
            if fake.capturing:
                copied.append(fake.generator.state is not own and fake.generator.state["offset"] == own["offset"])
            if fails:
                fake.sync()
            return super().compute()

    runner = ProbeRunner([Syncing()])
    _graph_run(runner, random_model(), inputs())
    assert (runner.graph_failure is not None) == fails and len(runner._graphs) == (0 if fails else 1)
    assert fake.generator.state is own and own == {"seed": 7, "offset": 12, "capturing": False}
    fake.generator.random_op()  # the training's dropout
    assert own["offset"] == 16 and copied == [True]


def test_a_probe_failing_only_while_recorded_is_not_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its replays would lack its results: the run stays eager, the reason naming the probe."""
    fake = _FakeCapture(monkeypatch)

    class Shy(InductionProbe):
        name = "shy"

        @override
        def compute(self) -> dict[str, Tensor]:
            if fake.capturing:
                raise RuntimeError("not while capturing")
            return super().compute()

    runner = ProbeRunner([Shy()])
    out = _graph_run(runner, random_model(), inputs())
    assert set(out) == {"shy"} and runner.failures == {} and len(runner._graphs) == 0
    assert "'shy'" in runner.graph_failure and "not while capturing" in runner.graph_failure


def test_a_recorded_graph_keeps_the_causal_masks_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """`attention._future_mask` is an LRU cache of 16: other lengths evicted a mask a graph still read."""
    import weakref

    _FakeCapture(monkeypatch)
    runner, model, probe_inputs = ProbeRunner([make_probe(name) for name in BUILT_IN]), random_model(), inputs()
    _graph_run(runner, model, probe_inputs)
    assert len(runner._graphs) == 1
    masks = [weakref.ref(attention_module._future_mask(t.shape[1], model.W_E.device))
             for t in (probe_inputs.repeated, probe_inputs.text)]
    for length in range(100, 120):
        attention_module._future_mask(length, model.W_E.device)
    assert all(mask() is not None for mask in masks)


def test_inference_tensors_are_staged_on_another_device() -> None:
    """They have no version counter (``_version`` raises): copied at every call, into the same tensor."""
    runner = ProbeRunner([make_probe(name) for name in BUILT_IN])
    model, meta = random_model(), torch.device("meta")
    with torch.inference_mode():
        probe_inputs = inputs()
    first = runner._stage(model, probe_inputs, None, meta)
    again = runner._stage(model, probe_inputs, None, meta)
    assert all(again[name] is first[name] and first[name].device == meta for name in first)


class _FirstHostStepFails(InductionProbe):
    """Its host step raises the first time only (a fault of one probe step)."""

    name = "flaky_host"

    def __init__(self) -> None:
        super().__init__()
        self.host_steps = 0

    @override
    def compute(self) -> dict[str, Tensor]:
        return {MAIN_KEY: super().compute()[MAIN_KEY] * 2}

    @override
    def on_host(self, values: dict[str, Any]) -> dict[str, Any]:
        self.host_steps += 1
        if self.host_steps == 1:
            raise ValueError("the first step's fault")
        return {MAIN_KEY: values[MAIN_KEY] / 2}


class _ComputeFails(InductionProbe):
    name = "compute_fails"

    @override
    def compute(self) -> dict[str, Tensor]:
        raise KeyError("always")


def test_a_host_step_runs_after_every_replay_and_reports_its_own_faults_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replayed graph returns its recorded outputs and keeps its recording's `failures` (a compute() fault is
    replayed as it was recorded); the host step is not recorded, so it runs on every replay's results: a fault of
    the host step at one step is not reported again at the next, while the recorded compute() fault still is."""
    from lens_callback.probes.copying import copying_matrices, eigenvalue_positivity
    from lens_callback.sinks import to_host

    _FakeCapture(monkeypatch)
    flaky = _FirstHostStepFails()
    runner = ProbeRunner([flaky, _ComputeFails(), make_probe("copying"), make_probe("prev_token")])
    model, probe_inputs = random_model(), inputs()
    first = runner.host_step(to_host(_graph_run(runner, model, probe_inputs)), model.cfg)  # eager run, then capture
    assert len(runner._graphs) == 1 and runner.graph_failure is None
    assert set(runner.failures) == {"flaky_host", "compute_fails"} and set(first) == {"copying", "prev_token"}
    assert runner.failures["flaky_host"] == "on_host(): ValueError: the first step's fault"
    replayed = _graph_run(runner, model, probe_inputs)  # the fake replay: the recorded outputs as they are
    assert replayed["copying"].shape == (2, 2, 4, 4)
    second = runner.host_step(to_host(replayed), model.cfg)
    assert set(runner.failures) == {"compute_fails"} and set(runner.failure_errors) == {"compute_fails"}
    assert set(second) == {"flaky_host", "copying", "prev_token"} and flaky.host_steps == 2
    expected = eigenvalue_positivity(copying_matrices(model).float().numpy())
    torch.testing.assert_close(torch.from_numpy(second["copying"]), torch.from_numpy(expected).float())
    torch.testing.assert_close(torch.from_numpy(second["copying"]), torch.from_numpy(first["copying"]))
    induction = ProbeRunner([InductionProbe()]).run(model, probe_inputs)["induction"]
    torch.testing.assert_close(torch.from_numpy(second["flaky_host"]), induction)
