"""Tests of `lens_callback.probes` on tiny hand-built `HookedTransformer`s whose attention is known.

Known attention comes from two sources: weights set by hand (zero Q/K weights give uniform causal
attention; a two-layer attention-only model with a previous-token head and an induction head built
from one-hot embeddings), and forward hooks that replace ``hook_pattern`` with a hand-built pattern.
TransformerLens calls hooks in registration order, so a replacing hook added with
``model.add_hook`` before the run is seen by the probes' hooks.
"""

from __future__ import annotations

import gc
import importlib
import math
import re
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformer_lens import HookedTransformer, HookedTransformerConfig
from typing_extensions import override

import lens_callback.probes.runner as runner_module
from lens_callback.probes.base import ERROR_TEXT_CHARS, error_text
from lens_callback.probes.runner import raised_at, run_probe
from conftest import bench_module
from lens_callback.probes.attention import POST_NORM_ARCHITECTURES
from lens_callback.probes import (
    composition_scores,
    copying_scores,
    MAIN_KEY,
    LossProbe,
    PROBES,
    AttentionEntropyProbe,
    DuplicateTokenProbe,
    ICLScoreProbe,
    InductionProbe,
    LogitLensProbe,
    PreviousTokenProbe,
    Probe,
    WeightsProbe,
    ProbeInputs,
    ProbeRunner,
    RepeatedLossProbe,
    attention_entropy,
    available_probes,
    duplicate_token_score,
    evenly_spaced_positions,
    icl_score,
    induction_score,
    logit_lens,
    make_probe,
    make_probe_inputs,
    per_token_loss,
    previous_token_score,
    register_probe,
    unregister_probe,
    repeated_loss,
    repeated_tokens,
    text_batch,
    token_pool_from_data,
)

BUILT_IN = [
    "attn_entropy",
    "copying",
    "duplicate_token",
    "icl_score",
    "induction",
    "k_composition",
    "logit_lens",
    "prev_token",
    "q_composition",
    "repeated_loss",
    "v_composition",
]


# ---------------------------------------------------------------------------------------------
# Models and inputs


def random_model(
    normalization_type: str | None = "LN", n_layers: int = 2, n_ctx: int = 32, d_vocab: int = 29
) -> HookedTransformer:
    """A tiny randomly initialised model (seeded; construction touches the global RNG)."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=16,
        n_ctx=n_ctx,
        d_head=4,
        n_heads=2,
        d_mlp=32,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type=normalization_type,
        seed=0,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():  # larger weights than the default init, so layers differ visibly
        for name, param in model.named_parameters():
            if name.endswith(("W_Q", "W_K", "W_E", "W_U", "W_pos")):
                param.mul_(8.0)
    return model


def zero_qk(model: HookedTransformer) -> HookedTransformer:
    """Zero every query/key weight and bias: every head attends uniformly over keys 0..q."""
    with torch.no_grad():
        for block in model.blocks:
            for param in (block.attn.W_Q, block.attn.W_K, block.attn.b_Q, block.attn.b_K):
                param.zero_()
    return model


# Hand-built two-layer attention-only induction model (Olsson et al. 2022, "Induction heads").
V, N_CTX = 12, 16  # vocabulary, context
TOK, POS, PREV = 0, V, V + N_CTX  # residual subspace offsets: token, position, previous token
C = 12.0  # query/key gain: attention logits C**2 / sqrt(d_head) = 36


def induction_model() -> HookedTransformer:
    """Layer 0 head 0 is a previous-token head, layer 1 head 0 an induction head; heads 1 are zero.

    Residual stream (d_model = 40): one-hot token [0, 12), one-hot position [12, 28), and the
    previous token [28, 40) written by L0H0. L1H0's query reads the current token, its key the
    previous token, so at q in [L, 2L) of a repeated sequence with distinct first-half tokens it
    attends to q - L + 1. A query bias and a key weight keep it off position 0 (whose "previous
    token" is itself).
    """
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=2 * V + N_CTX,
        n_ctx=N_CTX,
        d_head=16,
        n_heads=2,
        d_vocab=V,
        attn_only=True,
        normalization_type=None,
        act_fn="relu",
        seed=0,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.embed.W_E[:, TOK : TOK + V] = torch.eye(V)
        model.pos_embed.W_pos[:, POS : POS + N_CTX] = torch.eye(N_CTX)
        prev = model.blocks[0].attn
        for p in range(N_CTX):
            prev.W_Q[0, POS + p, p] = C  # query at q: C e_q
        for k in range(N_CTX - 1):
            prev.W_K[0, POS + k, k + 1] = C  # key at k: C e_{k+1}
        for t in range(V):
            prev.W_V[0, TOK + t, t] = 1.0  # copy the attended token ...
            prev.W_O[0, t, PREV + t] = 1.0  # ... into the previous-token subspace
        ind = model.blocks[1].attn
        for t in range(V):
            ind.W_Q[0, TOK + t, t] = C  # query: current token
            ind.W_K[0, PREV + t, t] = C  # key: previous token
        ind.b_Q[0, 15] = C
        ind.W_K[0, POS + 0, 15] = -C  # key 0 gets logit -36
        for t in range(V):
            ind.W_V[0, TOK + t, t] = 1.0  # copy the attended token to the output, strongly
            ind.W_O[0, t, TOK + t] = 10.0
        model.unembed.W_U[TOK : TOK + V, :] = torch.eye(V)
    return model


def distinct_repeated(batch: int, half: int, vocab: int, seed: int = 0) -> Tensor:
    """[batch, 2 * half] repeated sequences whose first halves have distinct tokens."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(vocab, generator=gen)[:half] for _ in range(batch)])
    return torch.cat([first, first], dim=1)


def random_tokens(batch: int, seq_len: int, vocab: int, seed: int = 1) -> Tensor:
    return torch.randint(vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def uniform_mean(queries: range) -> float:
    """Mean over queries of 1 / (q + 1): uniform causal attention's weight on any one key."""
    return sum(1.0 / (q + 1) for q in queries) / len(queries)


@pytest.fixture
def hooks_reset() -> Iterator[list[HookedTransformer]]:
    """Models appended to the yielded list get all their hooks removed after the test."""
    models: list[HookedTransformer] = []
    yield models
    for model in models:
        model.reset_hooks(including_permanent=True)


def replace_pattern(
    model: HookedTransformer, layer: int, pattern_fn: Callable[[int], Tensor]
) -> list[weakref.ref[Tensor]]:
    """Replace layer ``layer``'s attention pattern by ``pattern_fn(T)`` ([H, T, T]) for every row.

    Returns weak references to every replacement tensor handed to the model.
    """
    refs: list[weakref.ref[Tensor]] = []

    def hook(pattern: Tensor, hook: Any) -> Tensor:
        new = pattern_fn(pattern.shape[-1]).expand_as(pattern).clone()
        refs.append(weakref.ref(new))
        return new

    model.add_hook(f"blocks.{layer}.attn.hook_pattern", hook)
    return refs


def one_hot_rows(targets: list[int]) -> Tensor:
    """[T, T] pattern with row q one-hot at targets[q]."""
    t = len(targets)
    return F.one_hot(torch.tensor(targets), t).float()


# ---------------------------------------------------------------------------------------------
# Attention-pattern probes


def test_induction_model_scores_by_hand() -> None:
    model = induction_model()
    half = 6
    tokens = distinct_repeated(batch=3, half=half, vocab=V)
    t = 2 * half

    induction = induction_score(model, tokens)
    prev = previous_token_score(model, tokens)
    entropy = attention_entropy(model, tokens)

    assert induction.shape == (2, 2) and induction.dtype == torch.float32
    u_ind = uniform_mean(range(half, t))
    expected_ind = torch.tensor([[0.0, u_ind], [1.0, u_ind]])
    torch.testing.assert_close(induction, expected_ind, atol=1e-5, rtol=0)
    u_prev = uniform_mean(range(1, t))
    torch.testing.assert_close(prev[0], torch.tensor([1.0, u_prev]), atol=1e-5, rtol=0)
    torch.testing.assert_close(prev[1, 1], torch.tensor(u_prev), atol=1e-6, rtol=0)
    # the zero heads attend uniformly: normalised entropy exactly 1
    torch.testing.assert_close(entropy[:, 1], torch.ones(2), atol=1e-6, rtol=0)
    # L0H0 is one-hot at every q >= 1; L1H0 is one-hot in the second half and at q = 1, and
    # uniform over keys 1..q (key 0 is pushed away) at q = 2 .. L-1: entropy log q / log(q + 1)
    first_half = sum(math.log(q) / math.log(q + 1) for q in range(2, half)) / (t - 1)
    torch.testing.assert_close(entropy[:, 0], torch.tensor([0.0, first_half]), atol=1e-5, rtol=0)


def test_induction_matches_independent_run_with_cache() -> None:
    model = random_model()
    tokens = repeated_tokens(torch.arange(29), 4, 7, torch.Generator().manual_seed(3))
    _, cache = model.run_with_cache(tokens)
    half = 7
    expected = torch.zeros(2, 2)
    for layer in range(2):
        pattern = cache["pattern", layer]  # [batch, head, q, k]
        for head in range(2):
            terms = [
                pattern[b, head, q, q - half + 1].item()
                for b in range(tokens.shape[0])
                for q in range(half, 2 * half)
            ]
            expected[layer, head] = sum(terms) / len(terms)
    assert expected.std() > 0.01  # random attention, not a degenerate 0 / 1 case
    torch.testing.assert_close(induction_score(model, tokens), expected, atol=1e-6, rtol=0)


def test_zero_qk_gives_uniform_attention() -> None:
    model = zero_qk(random_model())
    tokens = random_tokens(3, 10, 29)
    entropy = attention_entropy(model, tokens)
    torch.testing.assert_close(entropy, torch.ones(2, 2), atol=1e-6, rtol=0)
    prev = previous_token_score(model, tokens)
    torch.testing.assert_close(prev, torch.full((2, 2), uniform_mean(range(1, 10))), atol=1e-6, rtol=0)
    half = 5
    with pytest.warns(UserWarning, match="second half does not repeat the first"):  # the arithmetic still holds
        ind = induction_score(model, tokens)
    torch.testing.assert_close(ind, torch.full((2, 2), uniform_mean(range(half, 10))), atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="duplicate_token: the tokens' second half"):
        dup = duplicate_token_score(model, tokens)
    torch.testing.assert_close(dup, torch.full((2, 2), uniform_mean(range(half, 10))), atol=1e-6, rtol=0)


def test_hand_built_patterns(hooks_reset: list[HookedTransformer]) -> None:
    model = random_model()
    hooks_reset.append(model)
    half = 5
    t = 2 * half

    def layer0(t: int) -> Tensor:
        # head 0: duplicate token (q - L in the second half, itself before); head 1: previous token
        dup = one_hot_rows([q if q < half else q - half for q in range(t)])
        prev = one_hot_rows([max(q - 1, 0) for q in range(t)])
        return torch.stack([dup, prev])  # [H, T, T]

    def layer1(t: int) -> Tensor:
        # head 0: induction (q - L + 1 in the second half); head 1: one-hot on key 0
        ind = one_hot_rows([q if q < half else q - half + 1 for q in range(t)])
        first = one_hot_rows([0] * t)
        return torch.stack([ind, first])

    replace_pattern(model, 0, layer0)
    replace_pattern(model, 1, layer1)
    tokens = random_tokens(2, t, 29)
    runner = ProbeRunner(
        [DuplicateTokenProbe(), PreviousTokenProbe(), InductionProbe(), AttentionEntropyProbe()]
    )
    out = runner.run(model, ProbeInputs(repeated=tokens, text=tokens))

    # L1H1 (all on key 0) hits q - L = 0 at q = L only (1 of L queries), q - 1 = 0 at q = 1 only
    torch.testing.assert_close(out["duplicate_token"], torch.tensor([[1.0, 0.0], [0.0, 1 / half]]))
    torch.testing.assert_close(out["prev_token"], torch.tensor([[0.0, 1.0], [0.0, 1 / (t - 1)]]))
    torch.testing.assert_close(out["induction"], torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    # one-hot rows have zero entropy
    torch.testing.assert_close(out["attn_entropy"], torch.zeros(2, 2))


def test_pattern_is_not_kept_after_the_forward(hooks_reset: list[HookedTransformer]) -> None:
    model = random_model()
    hooks_reset.append(model)
    per_layer = [
        replace_pattern(model, layer, lambda t: torch.full((2, t, t), 1.0 / t).tril())
        for layer in range(2)
    ]
    runner = ProbeRunner([make_probe(name) for name in ("induction", "prev_token", "attn_entropy")])
    tokens = random_tokens(2, 8, 29)
    out = runner.run(model, ProbeInputs(repeated=tokens, text=tokens))
    gc.collect()
    refs = [ref for layer_refs in per_layer for ref in layer_refs]
    assert len(refs) == 4 and all(ref() is None for ref in refs)  # 2 layers x 2 forwards
    assert set(out) == {"induction", "prev_token", "attn_entropy"}


# ---------------------------------------------------------------------------------------------
# Loss-based probes


@pytest.mark.parametrize("normalization_type", ["LN", "RMS", None])
def test_logit_lens_last_entry_is_the_model_output(normalization_type: str | None) -> None:
    model = random_model(normalization_type)
    tokens = random_tokens(3, 10, 29)
    lens = logit_lens(model, tokens)
    assert set(lens) == {"loss", "kl", "top1"}
    for value in lens.values():
        assert value.shape == (3,) and value.dtype == torch.float32
    model_loss = model(tokens, return_type="loss")
    torch.testing.assert_close(lens["loss"][-1], model_loss, atol=1e-5, rtol=0)
    assert lens["kl"][-1].abs() < 1e-7
    assert lens["top1"][-1] == 1.0
    assert (lens["kl"][:-1] > 1e-3).all()  # earlier layers really differ from the output


def test_logit_lens_kl_reads_a_vocabulary_entry_masked_by_a_minus_infinite_logit_as_probability_0() -> None:
    """A head whose bias is -inf at some ids (a padded vocabulary masked out) gives them probability 0 in every
    entry, which adds 0 to KL(final || entry) (0 log 0): it made every entry's KL NaN, the final one's too."""
    model = random_model("LN")
    tokens = random_tokens(3, 12, 20)  # ids below the masked ones
    with torch.no_grad():
        model.unembed.b_U[20:] = -1e30  # finite: probability 0 as well
    finite = logit_lens(model, tokens)
    with torch.no_grad():
        model.unembed.b_U[20:] = float("-inf")
    masked = logit_lens(model, tokens)
    assert masked["kl"][-1] == 0.0
    torch.testing.assert_close(masked, finite, atol=1e-6, rtol=1e-6)
    assert (masked["kl"][:-1] > 1e-3).all()


def test_logit_lens_recomputes_ln_final_per_layer() -> None:
    model = random_model("LN")
    tokens = random_tokens(2, 9, 29)
    lens = logit_lens(model, tokens)
    _, cache = model.run_with_cache(tokens)
    final_logits = model.unembed(model.ln_final(cache["blocks.1.hook_resid_post"]))
    final_logp = final_logits.log_softmax(-1)[:, :-1]

    def lens_stats(resid: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ln = model.ln_final
        x = (resid - resid.mean(-1, keepdim=True)) / scale * ln.w + ln.b
        logp = (x @ model.W_U + model.b_U).log_softmax(-1)[:, :-1]  # [b, T-1, V]
        loss = -logp.gather(-1, tokens[:, 1:, None]).mean()
        kl = (final_logp.exp() * (final_logp - logp)).sum(-1).mean()
        top1 = (logp.argmax(-1) == final_logp.argmax(-1)).float().mean()
        return loss, kl, top1

    resid = cache["blocks.0.hook_resid_pre"]
    centred = resid - resid.mean(-1, keepdim=True)
    own_scale = (centred.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    loss, kl, top1 = lens_stats(resid, own_scale)
    torch.testing.assert_close(lens["loss"][0], loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lens["kl"][0], kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lens["top1"][0], top1)
    # the pre-#1077 bug (the final residual's cached scale) gives a different answer
    stale_loss, _, _ = lens_stats(resid, cache["ln_final.hook_scale"])
    assert not torch.isclose(lens["loss"][0], stale_loss, atol=1e-3)


def test_logit_lens_subsamples_positions() -> None:
    model = random_model("LN")
    tokens = random_tokens(3, 16, 29)
    positions = evenly_spaced_positions(16, 3)
    assert positions.tolist() == [0, 5, 10]
    lens = logit_lens(model, tokens, max_positions=3)
    per_token = model(tokens, return_type="loss", loss_per_token=True)  # [b, T-1]
    torch.testing.assert_close(lens["loss"][-1], per_token[:, positions].mean(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seq_len", [2, 3, 10, 64, 65, 66, 200])
@pytest.mark.parametrize("max_positions", [1, 7, 64])
def test_evenly_spaced_positions(seq_len: int, max_positions: int) -> None:
    positions = evenly_spaced_positions(seq_len, max_positions).tolist()
    assert len(positions) == min(max_positions, seq_len - 1)
    assert positions == sorted(set(positions))
    assert positions[0] == 0 and positions[-1] <= seq_len - 2


def test_icl_score_by_hand() -> None:
    model = random_model()
    tokens = random_tokens(4, 20, 29)
    per_token = model(tokens, return_type="loss", loss_per_token=True)  # [4, 19]
    expected = per_token[:, 18].mean() - per_token[:, 2].mean()  # late = T - 2, early = T // 10
    torch.testing.assert_close(icl_score(model, tokens), expected, atol=1e-5, rtol=0)
    custom = per_token[:, 10].mean() - per_token[:, 3].mean()
    torch.testing.assert_close(icl_score(model, tokens, early=3, late=10), custom, atol=1e-5, rtol=0)

    out = ProbeRunner([ICLScoreProbe()]).run(model, ProbeInputs(repeated=None, text=tokens))
    assert set(out) == {"icl_score", "icl_score/early_loss", "icl_score/late_loss"}
    torch.testing.assert_close(out["icl_score/early_loss"], per_token[:, 2].mean(), atol=1e-5, rtol=0)

    # bands: [early, early + width) and (late - width, late]; T = 20 gives width 1 by default
    banded = per_token[:, 16:19].mean() - per_token[:, 2:5].mean()
    torch.testing.assert_close(icl_score(model, tokens, width=3), banded, atol=1e-5, rtol=0)
    long_model = random_model(n_ctx=64)
    long_tokens = random_tokens(2, 60, 29)  # default width = 60 // 20 = 3; early 6, late 58
    per_long = long_model(long_tokens, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(
        icl_score(long_model, long_tokens), per_long[:, 56:59].mean() - per_long[:, 6:9].mean(), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="width"):
        ICLScoreProbe(width=0)
    with pytest.raises(ValueError, match="overlap"):
        icl_score(model, tokens, early=3, late=6, width=3)


@pytest.mark.parametrize("numpy_type", [np.int64, np.int32])
def test_probe_options_take_numpy_integers_as_ints(numpy_type: type) -> None:
    """``ICLScoreProbe(width=np.int64(3))`` and ``LogitLensProbe(max_positions=np.int64(8))`` were refused as
    "not a positive int", as LensCallback's own settings were (review); bools and 2.0 still are."""
    icl = ICLScoreProbe(early=numpy_type(2), late=numpy_type(9), width=numpy_type(3))
    assert [(type(v), v) for v in (icl.early, icl.late, icl.width)] == [(int, 2), (int, 9), (int, 3)]
    max_positions = LogitLensProbe(max_positions=numpy_type(8)).max_positions
    assert (type(max_positions), max_positions) == (int, 8)
    for bad in (True, np.bool_(True), 2.0):
        for name in ("width", "early", "late", "max_positions"):
            build = LogitLensProbe if name == "max_positions" else ICLScoreProbe
            with pytest.raises(ValueError, match=rf"{name} must be a .* int.*, got {name}={re.escape(repr(bad))}$"):
                build(**{name: bad})


def test_per_head_means_divide_each_layer_by_its_own_count() -> None:
    model = random_model()
    probe = InductionProbe()
    probe.reset(model.cfg, torch.device("cpu"))
    row = torch.tensor([2.0, 4.0, 6.0, 8.0])
    probe._sums = [[row.clone()], [row.clone()]]
    probe._count = [2, 2]
    torch.testing.assert_close(probe.compute()[MAIN_KEY], torch.stack([row, row]) / 2)
    probe._count = [2, 4]  # a subclass may count layers differently
    torch.testing.assert_close(probe.compute()[MAIN_KEY], torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0]]))


@pytest.mark.parametrize("chunks", [[1, 1], [3, 3], [1, 2]])
def test_per_head_sums_add_up_each_layers_chunks(chunks: list[int]) -> None:
    """One chunk per layer, the same number for every layer, or a different number: each layer's
    chunk sums are added up (in order) and divided by that layer's count."""
    model = random_model()  # 2 layers, 4 heads
    probe = InductionProbe()
    probe.reset(model.cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    sums = [[torch.rand(4, generator=gen) for _ in range(n)] for n in chunks]
    probe._sums = [list(layer) for layer in sums]
    probe._count = [3 * n for n in chunks]
    expected = torch.stack([torch.stack(layer).sum(dim=0) / (3 * len(layer)) for layer in sums])
    torch.testing.assert_close(probe.compute()[MAIN_KEY], expected)


def test_decoding_block_size_changes_nothing_but_the_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss and logit-lens decoding in blocks of a few rows give what one block gives."""
    assert runner_module.logit_block_rows(torch.device("cpu"), 1000) == runner_module.LOGIT_BLOCK_ELEMENTS["cpu"] // 1000
    assert runner_module.logit_block_rows(torch.device("cuda"), 1000) == runner_module.DEFAULT_LOGIT_BLOCK_ELEMENTS // 1000
    assert runner_module.logit_block_rows(torch.device("cpu"), 10**9) == 1
    model = random_model()
    tokens = random_tokens(3, 16, 29)
    probes = [make_probe("logit_lens"), make_probe("repeated_loss"), make_probe("icl_score")]
    inputs = ProbeInputs(repeated=tokens, text=tokens)
    one_block = ProbeRunner(probes).run(model, inputs)
    decoded: list[int] = []
    real = runner_module.final_log_probs

    def spy(model: HookedTransformer, resid: Tensor) -> Tensor:
        decoded.append(resid.shape[-2])
        return real(model, resid)

    monkeypatch.setitem(runner_module.LOGIT_BLOCK_ELEMENTS, "cpu", 29 * 3 * 2)  # 2 rows of 3 entries, 6 rows of loss
    monkeypatch.setattr(runner_module, "final_log_probs", spy)
    # the package's ``logit_lens`` attribute is the function: reach the module itself
    monkeypatch.setattr(importlib.import_module("lens_callback.probes.logit_lens"), "final_log_probs", spy)
    blocks = ProbeRunner(probes).run(model, inputs)
    assert max(decoded) == 6 and len(decoded) > 10
    assert one_block.keys() == blocks.keys()
    for key, value in one_block.items():
        torch.testing.assert_close(blocks[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_repeated_loss_by_hand() -> None:
    model = random_model()
    half = 5
    tokens = repeated_tokens(torch.arange(29), 3, half, torch.Generator().manual_seed(0))
    per_token = model(tokens, return_type="loss", loss_per_token=True)  # [3, 9]; [:, p] -> p + 1
    second = per_token[:, half:].mean()  # tokens 6 .. 9
    first = per_token[:, : half - 1].mean()  # tokens 1 .. 4
    torch.testing.assert_close(repeated_loss(model, tokens), second, atol=1e-5, rtol=0)
    out = ProbeRunner([RepeatedLossProbe()]).run(model, ProbeInputs(repeated=tokens, text=None))
    assert set(out) == {"repeated_loss", "repeated_loss/first_half"}
    torch.testing.assert_close(out["repeated_loss/first_half"], first, atol=1e-5, rtol=0)


def test_induction_model_copies_the_second_half() -> None:
    model = induction_model()
    tokens = distinct_repeated(batch=2, half=6, vocab=V)
    out = ProbeRunner([RepeatedLossProbe()]).run(model, ProbeInputs(repeated=tokens, text=None))
    assert out["repeated_loss"] < 0.5 * out["repeated_loss/first_half"]


# ---------------------------------------------------------------------------------------------
# Runner


def all_probes() -> list[Probe]:
    return [make_probe(name) for name in BUILT_IN]


def test_registry_lists_built_in_probes() -> None:
    assert set(BUILT_IN) <= set(available_probes())
    for name in BUILT_IN:
        probe = make_probe(name)
        assert probe.name == name and isinstance(probe, PROBES[name])
    assert PROBES["induction"].per_head and not PROBES["logit_lens"].per_head
    assert PROBES["icl_score"].needs_loss and not PROBES["induction"].needs_loss


def test_build_runner_takes_one_name_as_a_string_and_names_probe_options_that_are_no_mapping() -> None:
    """A string is a ``Sequence[str]``: ``build_runner("induction")`` looked up each character
    (``unknown probe name(s) ['i', 'n', 'd', ...]``), and options given as a string failed in dict()
    without naming ``probe_options`` (metrics review)."""
    from lens_callback.measure import build_runner

    assert [probe.name for probe in build_runner("induction").probes] == ["induction"]
    with pytest.raises(ValueError, match=r"probe_options must map probe names to their options, .*got 'induction'"):
        build_runner(["induction"], "induction")


def test_runner_result_keys_and_chunking(hooks_reset: list[HookedTransformer]) -> None:
    model = random_model()
    hooks_reset.append(model)
    forwards: list[tuple[int, ...]] = []
    model.add_hook("hook_embed", lambda embed, hook: forwards.append(tuple(embed.shape[:2])))
    inputs = ProbeInputs(
        repeated=repeated_tokens(torch.arange(29), 3, 6, torch.Generator().manual_seed(0)),
        text=random_tokens(3, 16, 29),
    )
    runner = ProbeRunner(all_probes())
    assert runner.needed_batches == {"repeated", "text"}
    whole = runner.run(model, inputs)
    assert forwards == [(3, 12), (3, 16)]  # one forward per batch kind

    forwards.clear()
    chunked = runner.run(model, inputs, max_batch_tokens=31)  # 2 repeated rows, 1 text row
    assert forwards == [(2, 12), (1, 12), (1, 16), (1, 16), (1, 16)]
    assert set(whole) == {
        "attn_entropy",
        "copying",  # its compute() results: [n_layers, n_heads, d_head, d_head], finished on the host
        "duplicate_token",
        "icl_score",
        "icl_score/early_loss",
        "icl_score/late_loss",
        "induction",
        "k_composition",
        "logit_lens/kl",
        "logit_lens/loss",
        "logit_lens/top1",
        "prev_token",
        "q_composition",
        "repeated_loss",
        "repeated_loss/first_half",
        "v_composition",
    }
    assert set(chunked) == set(whole)
    for key, value in whole.items():
        torch.testing.assert_close(chunked[key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_runner_registers_only_needed_hooks(
    hooks_reset: list[HookedTransformer], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = random_model()
    hooks_reset.append(model)
    hooked: list[set[str]] = []

    def spy(embed: Tensor, hook: Any) -> None:  # the first hook of every forward
        hooked.append({name for name, point in model.hook_dict.items() if point.fwd_hooks})

    model.add_hook("hook_embed", spy)
    unembed_calls: list[int] = []  # TransformerLens's Unembed.forward: never (it copies W_U.T)
    unembed_forward = model.unembed.forward  # spied on without a hook, which would make final_logits call it

    def counted(*args: Any) -> Tensor:
        unembed_calls.append(1)
        return unembed_forward(*args)

    model.unembed.forward = counted
    decoded: list[tuple[int, ...]] = []  # the residual rows the runner decodes

    def spy(model: HookedTransformer, resid: Tensor) -> Tensor:
        decoded.append(tuple(resid.shape))
        return real_final_logits(model, resid)

    real_final_logits = runner_module.final_logits
    monkeypatch.setattr(runner_module, "final_logits", spy)
    try:
        tokens = random_tokens(2, 8, 29)
        patterns = {f"blocks.{layer}.attn.hook_pattern" for layer in range(2)}

        ProbeRunner([InductionProbe()]).run(model, ProbeInputs(repeated=tokens, text=None))
        assert hooked == [{"hook_embed"} | patterns]
        assert unembed_calls == [] and decoded == []  # no loss: nothing decoded

        hooked.clear()
        ProbeRunner([InductionProbe(), ICLScoreProbe(early=1, late=6, width=2)]).run(
            model, ProbeInputs(repeated=tokens, text=tokens)
        )
        # one forward per batch; the ICL score decodes only its 2 x 2 band positions of the text
        assert hooked == [{"hook_embed"} | patterns, {"hook_embed", "blocks.1.hook_resid_post"}]
        assert decoded == [(8, 16)]  # 2 rows x positions 1, 2, 5, 6

        hooked.clear()
        decoded.clear()
        ProbeRunner([RepeatedLossProbe()]).run(model, ProbeInputs(repeated=tokens, text=None))
        assert hooked == [{"hook_embed", "blocks.1.hook_resid_post"}]
        assert decoded == [(14, 16)]  # every position but the last: 2 rows x 7
        assert unembed_calls == []

        hooked.clear()
        ProbeRunner([LogitLensProbe()]).run(model, ProbeInputs(repeated=None, text=tokens))
        resid = {f"blocks.{layer}.hook_resid_pre" for layer in range(2)} | {
            "blocks.1.hook_resid_post"
        }
        assert hooked == [{"hook_embed"} | resid]
    finally:
        del model.unembed.forward
    # the runner's hooks are gone, the user's hook is still there
    assert {name for name, point in model.hook_dict.items() if point.fwd_hooks} == {"hook_embed"}


def test_runner_keeps_other_hooks_on_the_points_it_uses(hooks_reset: list[HookedTransformer]) -> None:
    """The runner removes only its own hooks, also from the hook points it shares with the user."""
    model = random_model()
    hooks_reset.append(model)
    seen: list[str] = []
    model.add_hook("blocks.0.attn.hook_pattern", lambda pattern, hook: seen.append("temporary"))
    model.add_perma_hook("blocks.1.attn.hook_pattern", lambda pattern, hook: seen.append("permanent"))
    level = model.context_level
    tokens = random_tokens(2, 8, 29)
    for _ in range(2):
        ProbeRunner([InductionProbe()]).run(model, ProbeInputs(repeated=tokens, text=None))
    assert seen == ["temporary", "permanent"] * 2
    assert model.context_level == level
    assert [len(point.fwd_hooks) for point in (model.blocks[0].attn.hook_pattern, model.blocks[1].attn.hook_pattern)] == [1, 1]
    with pytest.raises(ValueError, match="boom"), runner_module.temporary_hooks(model, [("blocks.0.attn.hook_pattern", lambda p, hook: None)]):
        raise ValueError("boom")
    assert len(model.blocks[0].attn.hook_pattern.fwd_hooks) == 1 and model.context_level == level


class _LossAt(LossProbe):
    """Test probe: the mean per-token loss at fixed positions (``None``: every position)."""

    name: ClassVar[str] = "test_loss_at"
    batch: ClassVar[str] = "text"  # type: ignore[assignment]
    n_sums: ClassVar[int] = 1

    def __init__(self, positions: list[Any] | None) -> None:
        super().__init__()
        self.positions = positions

    def loss_positions(self, seq_len: int) -> list[int] | None:
        return self.positions

    def on_loss(self, token_loss: Tensor, tokens: Tensor) -> None:
        picked = token_loss if self.positions is None else token_loss[:, self.positions]
        self.accumulate([picked.sum()], picked.numel())

    def compute(self) -> dict[str, Tensor]:
        return {MAIN_KEY: self.means()[0]}


def test_per_token_loss_equals_transformer_lens() -> None:
    model = random_model()
    tokens = random_tokens(3, 12, 29)
    expected = model(tokens, return_type="loss", loss_per_token=True)  # [3, 11]
    torch.testing.assert_close(per_token_loss(model(tokens), tokens), expected, atol=1e-6, rtol=0)


def test_loss_at_positions_equals_the_model_loss_and_falls_back_to_all_logits() -> None:
    model = random_model()
    tokens = random_tokens(3, 12, 29)
    per_token = model(tokens, return_type="loss", loss_per_token=True)  # [3, 11]
    picked = ProbeRunner([_LossAt([0, 4, 10]), ICLScoreProbe(early=1, late=9, width=2)]).run(
        model, ProbeInputs(repeated=None, text=tokens), max_batch_tokens=24  # chunks of 2 rows
    )
    torch.testing.assert_close(picked["test_loss_at"], per_token[:, [0, 4, 10]].mean(), atol=1e-6, rtol=0)
    everything = ProbeRunner([_LossAt(None), ICLScoreProbe(early=1, late=9, width=2)]).run(
        model, ProbeInputs(repeated=None, text=tokens)
    )
    torch.testing.assert_close(everything["test_loss_at"], per_token.mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(everything["icl_score"], picked["icl_score"], atol=1e-6, rtol=0)
    for bad in ([11], [-1], [2.0]):
        with pytest.raises(ValueError, match=r"test_loss_at.*loss_positions"):
            ProbeRunner([_LossAt(bad)]).run(model, ProbeInputs(repeated=None, text=tokens))
        with pytest.raises(ValueError, match=r"test_loss_at.*loss_positions"):  # before training
            ProbeRunner([_LossAt(bad)]).validate(model.cfg, repeat_length=4, text_len=12)


def test_runner_restores_grad_mode_and_training_flags(
    hooks_reset: list[HookedTransformer],
) -> None:
    model = random_model()
    hooks_reset.append(model)
    model.train()
    model.blocks[0].eval()  # mixed flags must come back exactly
    model.blocks[1].mlp.eval()
    before = {name: module.training for name, module in model.named_modules()}
    during: list[tuple[bool, bool]] = []

    def spy(pattern: Tensor, hook: Any) -> None:
        during.append((torch.is_grad_enabled(), any(m.training for m in model.modules())))

    model.add_hook("blocks.0.attn.hook_pattern", spy)
    tokens = random_tokens(2, 8, 29)
    assert torch.is_grad_enabled()
    ProbeRunner(all_probes()).run(model, ProbeInputs(repeated=tokens, text=tokens))
    assert torch.is_grad_enabled()
    assert during == [(False, False), (False, False)]
    assert {name: module.training for name, module in model.named_modules()} == before
    with torch.no_grad():
        ProbeRunner([InductionProbe()]).run(model, ProbeInputs(repeated=tokens, text=None))
        assert not torch.is_grad_enabled()


class _FailingProbe(InductionProbe):
    name = "failing"

    @override
    def on_activation(self, hook_name: str, activation: Tensor, tokens: Tensor) -> None:
        raise KeyError("boom")


class _MisshapenProbe(InductionProbe):
    name = "misshapen"

    @override
    def compute(self) -> dict[str, Tensor]:
        return {"score": super().compute()[MAIN_KEY]}  # a per-head result under another key


def test_a_failing_probe_leaves_the_others_results_and_names_itself() -> None:
    model = random_model()
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)
    runner = ProbeRunner([_FailingProbe(), InductionProbe(), _MisshapenProbe(), PreviousTokenProbe()])
    results = runner.run(model, inputs)
    assert set(results) == {"induction", "prev_token"}
    expected = ProbeRunner([InductionProbe(), PreviousTokenProbe()]).run(model, inputs)
    assert all(torch.equal(results[k], expected[k]) for k in expected)
    assert set(runner.failures) == {"failing", "misshapen"}
    assert "on_activation('blocks.0.attn.hook_pattern'): KeyError: 'boom'" in runner.failures["failing"]
    assert "[n_layers, n_heads] = [2, 2]" in runner.failures["misshapen"] and "'score'" in runner.failures["misshapen"]
    runner.run(model, inputs.__class__(repeated=inputs.repeated, text=None))
    assert set(runner.failures) == {"failing", "misshapen"}  # per run


class _HostMeanProbe(InductionProbe):
    """Gives its per-head score twice on the device, ``[n_layers, n_heads, 2]``, and their mean on the host."""

    name = "host_mean"

    @override
    def compute(self) -> dict[str, Tensor]:
        score = super().compute()[MAIN_KEY]
        return {MAIN_KEY: torch.stack([score, 3 * score], dim=-1), "extra": score.sum()}

    @override
    def on_host(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {MAIN_KEY: values[MAIN_KEY].mean(axis=-1), "total": values["extra"] * 2}


class _HostRaisingProbe(_HostMeanProbe):
    name = "host_raising"

    @override
    def on_host(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {MAIN_KEY: values["missing"]}


class _HostMisshapenProbe(_HostMeanProbe):
    name = "host_misshapen"

    @override
    def on_host(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {MAIN_KEY: values[MAIN_KEY]}  # the device's [n_layers, n_heads, 2], not reduced


class _HostEmptyProbe(_HostMeanProbe):
    name = "host_empty"

    @override
    def on_host(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {MAIN_KEY: values[MAIN_KEY].mean(axis=-1), "none": np.zeros((0,))}


class _HostNothingProbe(_HostMeanProbe):
    name = "host_nothing"

    @override
    def on_host(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {}


class _HostComplexProbe(_HostMeanProbe):
    name = "host_complex"

    @override
    def on_host(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rotations = np.array([[0.0, -1.0], [1.0, 0.0]]) * np.ones((2, 2, 1, 1))
        return {MAIN_KEY: np.linalg.eigvals(rotations)[..., 0]}  # i per head: complex, logged as its real part


def test_a_host_step_finishes_its_probes_results_after_the_transfer_and_its_faults_are_that_probes() -> None:
    """`Probe.on_host` gets the probe's compute() results on the host and returns what is logged: the per-head
    shape is checked there, not on the device's intermediate results; a host step that raises or returns what
    cannot be logged fails its probe as compute() would (a `failures` entry naming on_host, its results left
    out, the exception kept for strict), the other probes' results kept, in their order."""
    from lens_callback.measure import measure

    model = random_model()
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)
    runner = ProbeRunner([_HostRaisingProbe(), InductionProbe(), _HostMeanProbe(), _HostMisshapenProbe(),
                          _HostComplexProbe(), _HostEmptyProbe(), _HostNothingProbe(), PreviousTokenProbe()])
    measurement = measure(model, runner, inputs)
    assert list(measurement.arrays) == ["induction", "host_mean", "host_mean/total", "prev_token"]
    induction = ProbeRunner([InductionProbe()]).run(model, inputs)["induction"].numpy()
    np.testing.assert_allclose(measurement.arrays["host_mean"], 2 * induction, rtol=1e-6)
    assert measurement.arrays["host_mean"].dtype == np.float32
    assert measurement.scalars["lens/host_mean/total"] == pytest.approx(2 * induction.sum(), rel=1e-6)
    assert set(measurement.per_head) == {"induction", "host_mean", "prev_token"}
    assert set(measurement.failures) == set(runner.failures) == set(runner.failure_errors) == {
        "host_raising", "host_misshapen", "host_complex", "host_empty", "host_nothing"}
    assert measurement.failures["host_raising"] == "on_host(): KeyError: 'missing'"
    assert measurement.failures["host_misshapen"].startswith(
        "on_host(): ValueError: a per-head probe's main result (key '') must have shape [n_layers, n_heads] = [2, 2]; "
        "got shape (2, 2, 2)")
    assert measurement.failures["host_complex"].startswith(
        "on_host(): TypeError: on_host() must return real numeric arrays (they are logged as float32); got "
        "{'': 'complex128'}")
    assert measurement.failures["host_empty"].startswith(
        "on_host(): ValueError: on_host() returned arrays with no element {'none': [0]}, which would log nothing")
    assert measurement.failures["host_nothing"].startswith(
        "on_host(): ValueError: on_host() returned no results (an empty dict), so nothing would be logged")
    assert raised_at(runner.failure_errors["host_raising"]).endswith("in on_host")  # the probe's line
    # without a host step, the same compute() is a misshapen per-head result there
    plain = type("Plain", (_HostMeanProbe,), {"name": "plain", "on_host": Probe.on_host})()
    assert "must have shape [n_layers, n_heads]" in measure(model, ProbeRunner([plain]), inputs).failures["plain"]



class _HostMaxProbe(_HostMeanProbe):
    """Its host step names a result ``max``, a tag its per-head main result's maximum has."""

    name = "host_max"

    @override
    def on_host(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {MAIN_KEY: values[MAIN_KEY].mean(axis=-1), "max": values["extra"]}


def test_results_of_a_host_step_that_share_a_tag_are_named_as_its_fault_not_compute_s() -> None:
    """The warning said ``compute(): ... results ['host_max', 'host_max/max'] would all be logged as
    'lens/host_max/max'`` for keys compute() never returned (it returned ``''`` and ``extra``): the author was
    sent to the wrong method (review). The key comes from on_host, and the failure names it."""
    from lens_callback.measure import measure

    runner = ProbeRunner([_HostMaxProbe(), InductionProbe()])
    measurement = measure(random_model(), runner, ProbeInputs(repeated=random_tokens(2, 8, 29), text=None))
    assert measurement.failures["host_max"].startswith(
        "on_host(): ValueError: results ['host_max', 'host_max/max'] would all be logged as 'lens/host_max/max'")
    assert list(measurement.arrays) == ["induction"]
    own = ProbeRunner([_OwnMeanProbe()])  # a probe without a host step: its compute() returned the key
    assert measure(random_model(), own, ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)).failures[
        "own_mean"].startswith("compute(): ValueError: results ['own_mean', 'own_mean/mean'] would all be logged")


class _HostTorchProbe(_HostMeanProbe):
    """Finishes its result with torch on the host, noting the modes it ran in."""

    name = "host_torch"

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[tuple[torch.dtype, bool]] = []

    @override
    def on_host(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        heads = torch.from_numpy(values[MAIN_KEY].mean(axis=-1))
        product = heads @ torch.eye(heads.shape[-1])
        self.modes.append((product.dtype, torch.is_grad_enabled()))
        return {MAIN_KEY: product.float().numpy()}


def test_a_host_step_runs_with_autocast_off_and_without_gradients_as_the_probe_run() -> None:
    """``measure`` runs the probes with autocast off and without gradients; the host step ran in the caller's modes
    (review): a hand-written loop probing inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` had a torch host
    step's products in bfloat16. The caller's modes are back afterwards."""
    from lens_callback.measure import measure

    probe = _HostTorchProbe()
    model = random_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measurement = measure(model, ProbeRunner([probe]), ProbeInputs(repeated=random_tokens(2, 8, 29), text=None))
        assert torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
    assert probe.modes == [(torch.float32, False)] and measurement.failures == {}


@pytest.mark.parametrize("probe", [LogitLensProbe, _HostTorchProbe])
def test_run_probe_runs_with_autocast_off_and_without_gradients_as_measure(probe: type[Probe]) -> None:
    """`run_probe` ran in the caller's modes where `measure` turns autocast off (review): inside a hand-written
    loop's ``torch.autocast("cpu", dtype=torch.bfloat16)`` its forward, `compute` and host step ran in bfloat16.
    The caller's modes are back afterwards (an observer leaks no state)."""
    model = random_model()
    tokens = repeated_tokens(torch.arange(29), 2, 4, torch.Generator().manual_seed(0))
    plain = run_probe(model, probe(), tokens)
    modes = probe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run_probe(model, modes, tokens)
        assert torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    assert set(autocast) == set(plain)
    for name, value in plain.items():
        assert autocast[name].dtype == value.dtype == torch.float32
        torch.testing.assert_close(autocast[name], value)
    assert getattr(modes, "modes", [(torch.float32, False)]) == [(torch.float32, False)]


@pytest.mark.parametrize("scores", [lambda model: composition_scores(model, "k"), copying_scores],
                         ids=["composition_scores", "copying_scores"])
def test_the_standalone_weight_scores_run_with_autocast_off_as_their_probes(scores: Callable[..., Tensor]) -> None:
    """``composition_scores`` and ``copying_scores`` (the README's standalone forms of the weights-only probes, which
    do not go through `run_probe`) ran in the caller's autocast: inside ``torch.autocast("cpu", dtype=torch.bfloat16)``
    their products were bfloat16, 2e-3 off the logged numbers (review of probe_modes). They run in `probe_modes`."""
    model = random_model()
    plain = scores(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = scores(model)
        assert torch.is_autocast_enabled("cpu")
    assert autocast.dtype == plain.dtype
    torch.testing.assert_close(autocast, plain)


def test_run_probe_returns_what_a_host_step_gives_and_raises_its_fault() -> None:
    model = random_model()
    tokens = repeated_tokens(torch.arange(29), 2, 4, torch.Generator().manual_seed(0))
    out = run_probe(model, _HostMeanProbe(), tokens)
    induction = induction_score(model, tokens)
    assert set(out) == {"host_mean", "host_mean/total"} and out["host_mean"].device.type == "cpu"
    torch.testing.assert_close(out["host_mean"], 2 * induction)
    out["host_mean"].add_(1)  # its own tensor
    with pytest.raises(RuntimeError, match=r"probe 'host_raising' failed in on_host\(\): KeyError: 'missing'") as raised:
        run_probe(model, _HostRaisingProbe(), tokens)
    assert isinstance(raised.value.__cause__, KeyError)


class _ElsewhereProbe(PreviousTokenProbe):
    """Returns its result on another device (the meta device stands in for a CPU tensor on a GPU run)."""

    name = "elsewhere"

    @override
    def compute(self) -> dict[str, Tensor]:
        return {MAIN_KEY: super().compute()[MAIN_KEY].to("meta")}


def test_a_probe_result_on_another_device_is_that_probes_failure() -> None:
    """Every result travels to the host in one `torch.cat`; one on another device made it raise, and every
    probe's results were lost at every probe step, under a fault naming no probe (faults review)."""
    from lens_callback.measure import measure

    model = random_model()
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)
    runner = ProbeRunner([InductionProbe(), _ElsewhereProbe()])
    measurement = measure(model, runner, inputs)
    assert set(measurement.arrays) == {"induction"} and set(measurement.failures) == {"elsewhere"}
    assert ("compute(): ValueError: compute() must return tensors on the model's device cpu; got {'': 'meta'}"
            in measurement.failures["elsewhere"])
    expected = ProbeRunner([InductionProbe()]).run(model, inputs)["induction"].numpy()
    assert np.array_equal(measurement.arrays["induction"], expected)


class _ComplexProbe(PreviousTokenProbe):
    """Returns its per-head score as a complex tensor (as ``torch.linalg.eigvals`` gives, without ``.real``)."""

    name = "complex_result"

    @override
    def compute(self) -> dict[str, Tensor]:
        score = super().compute()[MAIN_KEY]
        return {MAIN_KEY: torch.complex(score, torch.ones_like(score))}


def test_a_complex_probe_result_is_that_probes_failure() -> None:
    """The results travel to the host as one float32 vector: a complex result was logged as its real part,
    its imaginary part dropped under PyTorch's generic cast warning (custom-probe review)."""
    model = random_model()
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)
    runner = ProbeRunner([InductionProbe(), _ComplexProbe()])
    results = runner.run(model, inputs)
    assert set(results) == {"induction"} and set(runner.failures) == {"complex_result"}
    assert ("compute(): TypeError: compute() must return real tensors (they are logged as float32); "
            "got {'': 'complex64'}") in runner.failures["complex_result"]


class _NoResultProbe(PreviousTokenProbe):
    """Returns an empty dict (a custom probe's ``compute`` whose results were never filled in)."""

    name = "no_result"
    per_head = False

    @override
    def compute(self) -> dict[str, Tensor]:
        return {}


class _NoElementProbe(PreviousTokenProbe):
    """Returns its mean beside a result of no element (e.g. a selection of heads that came out empty)."""

    name = "no_element"
    per_head = False

    @override
    def compute(self) -> dict[str, Tensor]:
        score = super().compute()[MAIN_KEY]
        return {MAIN_KEY: score.mean(), "picked": score[score > 2.0]}  # a probability is never > 2: shape [0]


def test_a_probe_result_of_nothing_is_that_probes_failure() -> None:
    """An empty dict, or a tensor of no element, gives no tag (`sinks.scalar_tags`): the probe logged
    nothing and said nothing, and the user took it to have run (small-items review)."""
    from lens_callback.measure import measure

    model = random_model()
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)
    runner = ProbeRunner([InductionProbe(), _NoResultProbe(), _NoElementProbe()])
    measurement = measure(model, runner, inputs)
    assert set(measurement.arrays) == {"induction"}
    assert set(measurement.failures) == {"no_result", "no_element"}
    assert ("compute(): ValueError: compute() returned no results (an empty dict), so nothing would be logged; "
            "return the headline value under the key '' (MAIN_KEY, logged as lens/no_result)"
            in measurement.failures["no_result"])
    assert ("compute(): ValueError: compute() returned tensors with no element {'picked': [0]}"
            in measurement.failures["no_element"])
    expected = ProbeRunner([InductionProbe()]).run(model, inputs)["induction"].numpy()
    assert np.array_equal(measurement.arrays["induction"], expected)


class _NumberProbe(PreviousTokenProbe):
    """Returns a plain Python number beside its per-head score (a result read off with ``.item()``)."""

    name = "number_result"

    @override
    def compute(self) -> dict[str, Tensor]:
        return {**super().compute(), "count": 3.0}  # type: ignore[dict-item]


def test_a_probe_result_that_is_no_tensor_is_named_by_its_key_and_type() -> None:
    """The failure said "must return a dict of tensors, got dict" for a dict holding one number: it named
    what was right and not what was wrong (guarantees review)."""
    model = random_model()
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)
    runner = ProbeRunner([InductionProbe(), _NumberProbe()])
    assert set(runner.run(model, inputs)) == {"induction"} and set(runner.failures) == {"number_result"}
    assert ("compute(): TypeError: compute() must return a dict of tensors; got {'count': 'float'}"
            in runner.failures["number_result"])


class _KeysOfOneNameProbe(PreviousTokenProbe):
    """Returns results under ``1`` and ``"1"``: two keys that name one tag, ``lens/{probe}/1``."""

    name = "keys_of_one_name"

    @override
    def compute(self) -> dict[str, Tensor]:
        score = super().compute()[MAIN_KEY]
        return {MAIN_KEY: score, 1: score.mean(), "1": score.amax()}  # type: ignore[dict-item]


def test_two_keys_naming_one_result_are_that_probes_failure() -> None:
    """The results are named ``f"{probe}/{key}"``: one of the two was dropped there, unseen, before the
    check for results sharing a tag (guarantees review)."""
    model = random_model()
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)
    runner = ProbeRunner([InductionProbe(), _KeysOfOneNameProbe()])
    assert set(runner.run(model, inputs)) == {"induction"} and set(runner.failures) == {"keys_of_one_name"}
    assert ("compute(): ValueError: compute() returned the keys [1, '1'], which name one result "
            "'keys_of_one_name/1'") in runner.failures["keys_of_one_name"]


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


class _UnprintableFailureProbe(PreviousTokenProbe):
    """Raises an exception whose ``str()`` raises."""

    name = "unprintable_failure"

    @override
    def compute(self) -> dict[str, Tensor]:
        raise _UnprintableError


def test_a_probe_failure_whose_message_cannot_be_made_leaves_the_others_results() -> None:
    """The failure's text, f"{err}", raised in the runner's handler: the whole probe run failed, every
    probe's results lost at that step (guarantees review)."""
    model = random_model()
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)
    runner = ProbeRunner([InductionProbe(), _UnprintableFailureProbe()])
    assert set(runner.run(model, inputs)) == {"induction"} and set(runner.failures) == {"unprintable_failure"}
    assert "compute(): _UnprintableError (its str() raised RuntimeError)" in runner.failures["unprintable_failure"]


class _VerboseFailureProbe(PreviousTokenProbe):
    """Raises with a message of 100,000 characters (a printed tensor, a long repr), what went wrong at its end."""

    name = "verbose_failure"

    @override
    def compute(self) -> dict[str, Tensor]:
        raise ValueError("the activations were " + "x" * 99_947 + "\nsize mismatch: [2, 8] vs [2, 9]")


def test_a_probe_failures_text_quotes_at_most_2000_characters_of_its_message_its_start_and_its_end() -> None:
    """The fault's warning quoted the whole message (s39's list of things left alone); then only its first 2,000
    characters, where a long message's end often says what went wrong (``load_state_dict``'s size mismatches
    follow its key lists): the middle is cut. The exception stays whole in ``failure_errors``, what ``strict``
    raises."""
    runner = ProbeRunner([InductionProbe(), _VerboseFailureProbe()])
    assert set(runner.run(random_model(), ProbeInputs(repeated=random_tokens(2, 8, 29), text=None))) == {"induction"}
    text = runner.failures["verbose_failure"]
    assert text == ("compute(): ValueError: the activations were " + "x" * 1479 + " ... (98,000 characters cut) ... "
                    + "x" * 468 + "\nsize mismatch: [2, 8] vs [2, 9]")
    assert len(str(runner.failure_errors["verbose_failure"])) == 100_000
    short = ValueError("y" * ERROR_TEXT_CHARS)  # a message of the limit's length is quoted whole
    assert error_text(short) == f"ValueError: {'y' * ERROR_TEXT_CHARS}"


class _OwnMeanProbe(PreviousTokenProbe):
    """A per-head probe that also returns its own summary under ``mean``, a tag its heads' mean has."""

    name = "own_mean"

    @override
    def compute(self) -> dict[str, Tensor]:
        heads = super().compute()[MAIN_KEY]
        return {MAIN_KEY: heads, "mean": heads.sum() + 42}


def test_a_probe_whose_results_share_a_tag_is_that_probes_failure() -> None:
    """``lens/own_mean/mean`` was written twice, the heads' mean replaced by the key ``mean``'s value without a
    word (custom-probe review); now the probe's fault, the other probes logged as usual."""
    from lens_callback.measure import measure
    from lens_callback.sinks import colliding_tags

    model = random_model()
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)
    measurement = measure(model, ProbeRunner([InductionProbe(), _OwnMeanProbe()]), inputs)
    assert set(measurement.failures) == {"own_mean"} and set(measurement.arrays) == {"induction"}
    assert ("results ['own_mean', 'own_mean/mean'] would all be logged as 'lens/own_mean/mean'"
            in measurement.failures["own_mean"])
    assert not any(tag.startswith("lens/own_mean") for tag in measurement.scalars)
    assert measurement.per_head == ["induction"] and "lens/induction/max" in measurement.scalars
    # a vector's L{l}, a matrix's {i}_{j}; per-head L{l}H{h} tags only where they are logged
    assert colliding_tags({"v": np.zeros(3), "v/L1": np.zeros(())}, []) == {"lens/v/L1": ["v", "v/L1"]}
    assert colliding_tags({"m": np.zeros((2, 2)), "m/0_1": np.zeros(())}, []) == {"lens/m/0_1": ["m", "m/0_1"]}
    heads = {"h": np.zeros((2, 2)), "h/L0H1": np.zeros(())}
    assert colliding_tags(heads, ["h"]) == {"lens/h/L0H1": ["h", "h/L0H1"]}
    assert colliding_tags(heads, ["h"], per_head_scalars=False) == {}
    # a key "heatmap" takes the per-head result's image tag, with or without the per-head scalars; TensorBoard
    # kept the scalar there and dropped the heatmap (diff review)
    shown = {"h": np.zeros((2, 2)), "h/heatmap": np.zeros(())}
    for per_head_scalars in (True, False):
        assert colliding_tags(shown, ["h"], per_head_scalars) == {"lens/h/heatmap": ["h", "h/heatmap"]}
    assert colliding_tags(shown, []) == {}  # a matrix that is no per-head result has no heatmap
    assert colliding_tags({"a": np.zeros(()), "a/b": np.zeros(()), "b": np.zeros(2)}, []) == {}


class _FailsInReset(InductionProbe):
    name = "fails_in_reset"

    @override
    def reset(self, cfg: Any, device: torch.device) -> None:
        raise torch.OutOfMemoryError("no room for the accumulators")


class _FailsInBind(PreviousTokenProbe):
    name = "fails_in_bind"

    @override
    def bind(self, model: HookedTransformer | None) -> None:
        if model is not None:
            raise RuntimeError("cannot bind")
        super().bind(model)


def test_a_probe_failing_in_reset_or_bind_leaves_the_others_results() -> None:
    """reset() and bind() ran outside the guard: one probe's failure there lost every probe's results
    for the step, and the fault's warning did not name it (observer review)."""
    model = random_model()
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=None)
    runner = ProbeRunner([_FailsInReset(), InductionProbe(), _FailsInBind(), PreviousTokenProbe()])
    results = runner.run(model, inputs)
    expected = ProbeRunner([InductionProbe(), PreviousTokenProbe()]).run(model, inputs)
    assert set(results) == set(expected) and all(torch.equal(results[k], expected[k]) for k in expected)
    assert runner.failures == {"fails_in_reset": "reset(): OutOfMemoryError: no room for the accumulators",
                               "fails_in_bind": "bind(): RuntimeError: cannot bind"}


def test_runner_cleans_up_after_an_error() -> None:
    model = random_model()
    model.train()
    bad = random_tokens(1, 8, 29)
    bad[0, 3] = 10_000  # beyond the vocabulary: the forward itself fails, which is raised
    with pytest.raises(IndexError):
        ProbeRunner([InductionProbe()]).run(model, ProbeInputs(repeated=bad, text=None))
    assert model.training and all(module.training for module in model.modules())
    assert torch.is_grad_enabled()
    assert not any(point.fwd_hooks for point in model.hook_dict.values())


def test_probe_inputs_and_run_leave_global_rng_alone(tmp_path: Path) -> None:
    model = random_model()  # construction seeds the global RNG; snapshot afterwards
    train = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="w+", shape=(500,))
    train[:] = np.arange(500) % 23
    val = np.memmap(tmp_path / "val.bin", dtype=np.uint16, mode="w+", shape=(100,))
    val[:] = np.arange(100) % 29
    state = torch.get_rng_state()
    kwargs = dict(repeat_length=6, repeat_batch=3, text_len=12, text_batch_size=2, seed=7)
    inputs = make_probe_inputs(train, val, 29, **kwargs)
    ProbeRunner(all_probes()).run(model, inputs)
    assert torch.equal(torch.get_rng_state(), state)

    again = make_probe_inputs(train, val, 29, **kwargs)
    assert inputs.repeated is not None and inputs.text is not None
    assert torch.equal(again.repeated, inputs.repeated) and torch.equal(again.text, inputs.text)
    assert inputs.repeated.shape == (3, 12) and inputs.text.shape == (2, 12)
    assert torch.isin(inputs.repeated, torch.arange(23)).all()  # only tokens of train
    other = make_probe_inputs(train, val, 29, **{**kwargs, "seed": 8})
    assert not torch.equal(other.repeated, inputs.repeated)
    no_repeat = make_probe_inputs(None, val, 29, **{**kwargs, "repeat_batch": 0})
    assert no_repeat.repeated is None and torch.equal(no_repeat.text, inputs.text)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_probe_inputs_hold_narrow_integer_tokens_as_int64(dtype: torch.dtype) -> None:
    """Token ids in a narrow integer dtype (a byte stream's uint8, nanoGPT's uint16 ids read as
    int16) become int64, the dtype TransformerLens's embedding indexes with: the same results."""
    model = random_model()
    repeated, text = distinct_repeated(2, 6, 29), random_tokens(2, 12, 29)
    narrow = ProbeInputs(repeated=repeated.to(dtype), text=text.to(dtype))
    assert narrow.repeated is not None and narrow.text is not None
    assert narrow.repeated.dtype == narrow.text.dtype == torch.int64
    assert torch.equal(narrow.repeated, repeated) and torch.equal(narrow.text, text)
    wide = ProbeInputs(repeated=repeated, text=text)
    assert wide.repeated is repeated and wide.text is text  # int64 already: no copy

    expected = ProbeRunner(all_probes()).run(model, wide)
    got = ProbeRunner(all_probes()).run(model, narrow)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)


def test_user_registered_probe() -> None:
    @register_probe
    class ResidNormProbe(Probe):
        name: ClassVar[str] = "test_resid_norm"
        batch: ClassVar[str] = "text"  # type: ignore[assignment]

        def __init__(self, layer: int = 0) -> None:
            self.layer = layer

        def hook_names(self, cfg: HookedTransformerConfig) -> list[str]:
            return [f"blocks.{self.layer}.hook_resid_post"]

        def reset(self, cfg: HookedTransformerConfig, device: torch.device) -> None:
            self.total = torch.zeros((), device=device)
            self.count = 0

        def on_activation(self, hook_name: str, activation: Tensor, tokens: Tensor) -> None:
            self.total += activation.norm(dim=-1).sum()
            self.count += activation.shape[0] * activation.shape[1]

        def compute(self) -> dict[str, Tensor]:
            return {MAIN_KEY: self.total / self.count, "sum": self.total}

    try:
        assert "test_resid_norm" in available_probes()
        model = random_model()
        tokens = random_tokens(2, 8, 29)
        probe = make_probe("test_resid_norm", layer=1)
        out = ProbeRunner([probe, InductionProbe()]).run(
            model, ProbeInputs(repeated=tokens, text=tokens), max_batch_tokens=8
        )
        _, cache = model.run_with_cache(tokens)
        expected = cache["blocks.1.hook_resid_post"].norm(dim=-1).mean()
        torch.testing.assert_close(out["test_resid_norm"], expected)
        assert "test_resid_norm/sum" in out and "induction" in out

        class Impostor(ResidNormProbe):
            pass

        with pytest.raises(ValueError, match="test_resid_norm"):
            register_probe(Impostor)
        # unregister_probe(cls) was taken as a name and removed nothing, silently (API review)
        with pytest.raises(ValueError, match=r"'test_resid_norm' was registered by .*ResidNormProbe, not .*Impostor"):
            unregister_probe(Impostor)
        with pytest.raises(TypeError, match="takes a probe's name or class, got <"):
            unregister_probe(ResidNormProbe())  # an instance
        unregister_probe(ResidNormProbe)
        assert "test_resid_norm" not in available_probes()
        unregister_probe(ResidNormProbe)  # not registered: nothing to do, as for a name
    finally:
        PROBES.pop("test_resid_norm", None)


def test_a_weights_only_probe_reads_the_bound_model() -> None:
    """The README's weight probe, a `WeightsProbe`: no hook points, ``self.model`` the model the run binds; here
    TransformerLens's layer-0 to layer-1 K-composition scores, a matrix-shaped result (custom-probe review). Outside
    a run its model is an error naming bind, not None read as a model."""

    class KComposition(WeightsProbe):
        name: ClassVar[str] = "test_kcomp"
        batch: ClassVar[str] = "text"  # type: ignore[assignment]

        def compute(self) -> dict[str, Tensor]:
            ov = self.model.W_V[0] @ self.model.W_O[0]  # (H, d, d)
            qk_t = self.model.W_K[1] @ self.model.W_Q[1].transpose(-2, -1)  # (W_Q W_K^T)^T
            norms = (ov[:, None] @ qk_t[None]).norm(dim=(-2, -1))
            return {MAIN_KEY: norms / ov.norm(dim=(-2, -1))[:, None] / qk_t.norm(dim=(-2, -1))[None, :]}

    model = random_model()
    probe = KComposition()
    runner = ProbeRunner([probe, InductionProbe()])
    forwarded: list[str] = []
    real_forward = runner._forward
    runner._forward = lambda model, batch, *rest: (forwarded.append(batch), real_forward(model, batch, *rest))[1]
    out = runner.run(model, ProbeInputs(repeated=random_tokens(2, 8, 29), text=random_tokens(2, 8, 29)))
    expected = model.all_composition_scores("K")[0, :, 1, :]
    torch.testing.assert_close(out["test_kcomp"], expected)
    with pytest.raises(RuntimeError, match="probe 'test_kcomp' needs bind\\(model\\) before compute"):
        probe.compute()  # released after the run
    # its text batch fed no probe: not forwarded (it was, for nothing); the induction probe's batch was
    assert forwarded == ["repeated"]
    # it reads no batch: a run without its text batch, or without any batch, still computes it (both raised
    # "inputs.text is None but probes ['test_kcomp'] need it"), and run_probe takes no tokens for it
    assert runner.needed_batches == {"repeated"}
    out = runner.run(model, ProbeInputs(repeated=random_tokens(2, 8, 29), text=None))
    torch.testing.assert_close(out["test_kcomp"], expected)
    alone = ProbeRunner([probe])
    assert alone.needed_batches == frozenset() and alone.required_seq_len(repeat_length=4, text_len=8) == 0
    alone.validate(model.cfg, repeat_length=0, text_len=0)  # no batch length to check
    torch.testing.assert_close(alone.run(model, ProbeInputs(repeated=None, text=None))["test_kcomp"], expected)
    torch.testing.assert_close(run_probe(model, probe)["test_kcomp"], expected)


def test_a_probe_reading_no_batch_may_ask_for_no_hook_point_or_loss() -> None:
    """``reads_batch = False`` (a `WeightsProbe`) runs no forward for the probe: one that still asks for a hook point
    or the loss would see nothing, and is refused before training and at a run, naming what it asked for."""

    class Confused(WeightsProbe):
        name: ClassVar[str] = "test_confused"

        def hook_names(self, cfg: HookedTransformerConfig) -> list[str]:
            return ["blocks.0.attn.hook_pattern"]

        def compute(self) -> dict[str, Tensor]:
            return {MAIN_KEY: self.model.W_E.sum()}

    model = random_model()
    message = (r"probe 'test_confused' sets reads_batch=False \(no batch is forwarded for it\) but asks for hook "
               r"point\(s\) \['blocks.0.attn.hook_pattern'\], which it would never see")
    with pytest.raises(ValueError, match=message):
        ProbeRunner([Confused()]).validate(model.cfg, repeat_length=4, text_len=8)
    with pytest.raises(ValueError, match=message):
        ProbeRunner([Confused()]).run(model, ProbeInputs(repeated=None, text=None))
    with pytest.raises(ValueError, match="probe 'induction' reads the repeated batch: pass its tokens"):
        run_probe(model, InductionProbe())


# ---------------------------------------------------------------------------------------------
# Composition scores (weights only)


def _perturbed(normalization_type: str | None, n_layers: int = 3, **overrides: Any) -> HookedTransformer:
    """A float64 random model whose norm scales and biases are far from 1 and 0, so folding them matters
    (``overrides``: other `HookedTransformerConfig` fields)."""
    cfg = HookedTransformerConfig(**{**dict(n_layers=n_layers, d_model=24, n_ctx=16, d_head=6, n_heads=3, d_mlp=32,
                                            d_vocab=29, act_fn="gelu", normalization_type=normalization_type,
                                            dtype=torch.float64, seed=0), **overrides})
    model = HookedTransformer(cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype))
    return model


def _processed_scores(model: HookedTransformer, mode: str) -> Tensor:
    """TransformerLens's ``all_composition_scores`` on a float64 copy of ``model`` that ``process_weights_``'s
    defaults (``fold_ln``, ``center_writing_weights``) have processed."""
    cfg = HookedTransformerConfig(**{**model.cfg.to_dict(), "dtype": torch.float64})
    processed = HookedTransformer(cfg)
    processed.load_and_process_state_dict({k: v.double() for k, v in model.state_dict().items()}, fold_ln=True,
                                          center_writing_weights=True, center_unembed=False, fold_value_biases=False)
    return processed.all_composition_scores(mode.upper())


@pytest.mark.parametrize("normalization_type", ["LN", "RMS", None])
@pytest.mark.parametrize("mode", ["q", "k", "v"])
def test_composition_scores_are_transformer_lens_s_on_the_processed_weights(
    normalization_type: str | None, mode: str
) -> None:
    """TransformerLens's ``all_composition_scores`` on a copy loaded with ``fold_ln`` and
    ``center_writing_weights`` (its ``from_pretrained`` defaults), computed without SVD and without
    touching the model; on the unprocessed weights TransformerLens's differ wherever there is a norm."""
    model = _perturbed(normalization_type)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    ours = composition_scores(model, mode)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    processed = HookedTransformer(_perturbed(normalization_type).cfg)
    processed.load_and_process_state_dict({k: v.clone() for k, v in before.items()}, fold_ln=True,
                                          center_writing_weights=True, center_unembed=False, fold_value_biases=False)
    expected = processed.all_composition_scores(mode.upper())
    assert ours.shape == (3, 3, 3, 3) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(composition_scores(processed, mode.upper()), ours, rtol=1e-6, atol=1e-7)
    raw = model.all_composition_scores(mode.upper())
    if normalization_type is None:
        torch.testing.assert_close(ours, raw)
    else:
        assert (ours - raw).abs().max() > 1e-3  # the folding is not a no-op
    assert torch.all(ours[1:, :, 0] == 0) and torch.all(ours[2, :, :2] == 0)  # writer not earlier: 0
    assert torch.all(ours[0, :, 1:] > 0)


@pytest.mark.parametrize("overrides", [
    dict(n_heads=4, n_key_value_heads=2),  # grouped-query attention: W_K, W_V repeated over the query heads
    dict(n_heads=4, n_key_value_heads=2, normalization_type="RMS"),
    dict(attn_only=True),
    dict(parallel_attn_mlp=True),  # ln1 read by the MLP too: TransformerLens folds it there as well
    dict(positional_embedding_type="rotary", rotary_dim=6, normalization_type="RMS"),
    dict(n_heads=1, d_head=24),
    dict(n_heads=2, d_head=40),  # d_head > d_model: the Gram matrices are singular
    dict(dtype=torch.bfloat16),  # scored in float32
], ids=["gqa", "gqa-rms", "attn-only", "parallel", "rotary-rms", "one-head", "wide-heads", "bfloat16"])
def test_composition_scores_are_transformer_lens_s_on_the_processed_weights_of_other_architectures(
    overrides: dict[str, Any]
) -> None:
    model = _perturbed(overrides.pop("normalization_type", "LN"), **overrides)
    for mode in "qkv":
        ours = composition_scores(model, mode)
        assert ours.dtype == (torch.float32 if model.cfg.dtype == torch.bfloat16 else torch.float64)
        torch.testing.assert_close(ours.double(), _processed_scores(model, mode), rtol=1e-5, atol=1e-6)


def test_composition_scores_of_an_lnpre_model_centre_what_reads_the_norm_too() -> None:
    """A model built with ``LNPre`` norms has no ``ln1.w``, so ``process_weights_`` folds nothing and, folding
    nothing, centres only ``W_O``: its scores then depend on the mean over ``d_model`` of ``W_Q``, ``W_K``,
    ``W_V``, which the centred norm output never sees (the model's logits do not change when they are centred).
    The scores centre them as for a LayerNorm model, so a model's scores do not depend on that mean."""
    model = _perturbed("LNPre")
    centred = HookedTransformer(model.cfg)
    centred.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in centred.blocks:
            for weight in (block.attn.W_Q, block.attn.W_K, block.attn.W_V):
                weight.sub_(weight.mean(dim=-2, keepdim=True))
    tokens = random_tokens(2, 8, 29)
    torch.testing.assert_close(centred(tokens), model(tokens))
    for mode in "qkv":
        ours = composition_scores(model, mode)
        torch.testing.assert_close(composition_scores(centred, mode), ours, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours, _processed_scores(centred, mode), rtol=1e-6, atol=1e-7)
    assert (composition_scores(model, "k") - _processed_scores(model, "k")).abs().max() > 1e-3  # TL's: not invariant


def test_composition_scores_of_float32_weights_match_float64() -> None:
    model = _perturbed("LN")
    single = HookedTransformer(HookedTransformerConfig(**{**model.cfg.to_dict(), "dtype": torch.float32}))
    single.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    scores = composition_scores(single, "k")
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), composition_scores(model, "k"), rtol=1e-5, atol=1e-6)


def _writing_along_ones(model: HookedTransformer, offset: float) -> HookedTransformer:
    """``model`` with L0H1's ``W_O`` rows constant over ``d_model`` (``offset=0``: it writes along the ones direction
    only, which the next LayerNorm takes out, so its centred ``W_O`` is zero), or every head's ``W_O`` shifted by
    ``offset``, far more than its spread (about 0.5 in `_perturbed`)."""
    with torch.no_grad():
        if offset:
            for block in model.blocks:
                block.attn.W_O.add_(offset)
        else:
            block = model.blocks[0].attn
            block.W_O[1] = torch.linspace(-2.0, 3.0, block.W_O.shape[1], dtype=block.W_O.dtype)[:, None]
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_composition_scores_centre_the_writers_w_o_before_it_meets_the_readers(dtype: torch.dtype) -> None:
    """In a LayerNorm model the writer's ``W_O`` is centred over ``d_model`` (``process_weights_``): read
    un-centred, its mean times the centred readers' sums over ``d_model`` is zero only in exact arithmetic, and the
    rounding of those large terms stayed in the products. A head writing along the ones direction only (its
    centred ``W_OV`` zero, a zero head to the next norm) scored 1e294 in float64 and 1e34 in float32 for 0; a
    float32 model whose ``W_O`` means are 2,000x their spread was 2e-5 off float64 for 5e-8."""
    model = _writing_along_ones(_perturbed("LN").to(dtype), 0.0)
    for mode in "qkv":
        ours = composition_scores(model, mode)
        assert torch.all(ours[0, 1] == 0), ours[0, 1]
        assert ours.max() <= 1, ours.max()
    shifted = _writing_along_ones(_perturbed("LN"), 1000.0)
    single = HookedTransformer(HookedTransformerConfig(**{**shifted.cfg.to_dict(), "dtype": torch.float32}))
    single.load_state_dict({k: v.float() for k, v in shifted.state_dict().items()})
    for mode in "qkv":
        torch.testing.assert_close(composition_scores(single, mode).double(), _processed_scores(shifted, mode),
                                   rtol=1e-5, atol=1e-6)


def test_composition_scores_fold_the_rms_scale_a_hooked_transformer_applies_whatever_its_config_carries() -> None:
    """A ``HookedTransformer``'s ``RMSNorm`` multiplies by ``w`` (its Gemma conversion stores ``1 + w``):
    ``rmsnorm_uses_offset``, which ``HookedTransformerConfig`` does not have and a TransformerBridge config
    does, changes nothing it computes, so it changes no score either (folding ``1 + w`` would)."""
    model = _perturbed("RMS")
    tokens = random_tokens(2, 8, 29)
    logits, scores = model(tokens), composition_scores(model, "k")
    model.cfg.rmsnorm_uses_offset = True
    torch.testing.assert_close(model(tokens), logits, rtol=0, atol=0)
    torch.testing.assert_close(composition_scores(model, "k"), scores, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["q", "k", "v"])
def test_composition_scores_in_blocks_of_writers_are_the_scores_in_one(mode: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The pairs' temporaries are bounded (`PAIR_BLOCK_ELEMENTS`; a 7B model's last layer needed 2 GB each in one
    block): blocks of one writer head, or of two of a layer's three (and then one), give the same scores."""
    import lens_callback.probes.composition as composition

    model = _perturbed("LN", n_layers=4)
    whole = composition_scores(model, mode)
    for writers in (1, 2):
        monkeypatch.setattr(composition, "PAIR_BLOCK_ELEMENTS", writers * 3 * 6 * 6)  # n_heads * d_head**2
        torch.testing.assert_close(composition_scores(model, mode), whole, rtol=1e-12, atol=1e-14)


def test_the_hand_built_induction_head_k_composes_with_the_previous_token_head_alone() -> None:
    """L1H0's key reads what L0H0 writes (the previous token), its query and value the current token:
    K-composition 1/sqrt(12) (two rank-12 matrices that compose perfectly), Q and V nothing; the zero
    heads L0H1 and L1H1 compose with nothing (TransformerLens: NaN, which made every largest score NaN)."""
    model = induction_model()
    runner = ProbeRunner([make_probe("q_composition"), make_probe("k_composition"), make_probe("v_composition")])
    forwards: list[int] = []
    model.add_hook("hook_embed", lambda embed, hook: forwards.append(embed.shape[0]))
    try:
        out = runner.run(model, ProbeInputs(repeated=distinct_repeated(2, 5, V), text=random_tokens(2, 8, V)))
    finally:
        model.reset_hooks()
    assert forwards == []  # weights only: neither batch is forwarded
    expected_k = torch.tensor([[0.0, 0.0], [1 / math.sqrt(12), 0.0]])
    torch.testing.assert_close(out["k_composition"], expected_k)
    torch.testing.assert_close(out["q_composition"], torch.zeros(2, 2))
    torch.testing.assert_close(out["v_composition"], torch.zeros(2, 2))
    full = composition_scores(model, "k")
    assert full[0, 0, 1, 0] == out["k_composition"][1, 0] and torch.all(full[0, 1] == 0)
    assert torch.isnan(model.all_composition_scores("K")[0, 1, 1, 0])  # TransformerLens's 0 / 0


def test_a_composition_probe_is_each_heads_largest_score_with_an_earlier_head() -> None:
    model = _perturbed("LN", n_layers=4)
    tokens = random_tokens(2, 8, 29)
    out = ProbeRunner([make_probe("k_composition")]).run(model, ProbeInputs(repeated=tokens, text=tokens))
    full = composition_scores(model, "k")
    expected = torch.stack([full[:layer, :, layer].amax(dim=(0, 1)) if layer else torch.zeros(3, dtype=full.dtype)
                            for layer in range(4)])
    assert out["k_composition"].dtype == torch.float32
    torch.testing.assert_close(out["k_composition"], expected.float())
    assert torch.all(out["k_composition"][0] == 0) and torch.all(out["k_composition"][1:] > 0)


@pytest.mark.parametrize("name", ["k_composition", "copying"])
def test_run_probe_of_a_weights_only_probe_does_not_warn_about_tokens_it_never_reads(name: str) -> None:
    """`run_probe` warns when a repeated batch's halves differ, for probes whose score reads the repeats; a
    weights-only probe reads no token, so the warning named a problem that was not there."""
    model = _perturbed("LN")
    tokens = random_tokens(2, 8, 29)  # halves that differ
    assert not torch.equal(tokens[:, :4], tokens[:, 4:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run_probe(model, make_probe(name), tokens)
    assert out[name].shape == (3, 3)


def test_composition_refuses_a_one_layer_model_before_training_and_a_mode_it_does_not_know() -> None:
    runner = ProbeRunner([make_probe("induction"), make_probe("k_composition")])
    one_layer = random_model(n_layers=1)
    with pytest.raises(ValueError, match=r"probe 'k_composition' scores heads against heads of earlier layers; a "
                                         r"model of 1 layer has none"):
        runner.validate(one_layer.cfg, repeat_length=4, text_len=8)
    with pytest.raises(ValueError, match=r"mode must be 'q', 'k' or 'v' \(Q-, K- or V-composition\), got mode='o'"):
        composition_scores(random_model(), "o")
    post_norm = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=2, d_vocab=29,
                                        attn_only=True, normalization_type="LN",
                                        original_architecture=sorted(POST_NORM_ARCHITECTURES)[0])
    with pytest.raises(ValueError, match=r"probe 'k_composition': composition scores need pre-norm blocks"):
        runner.validate(post_norm, repeat_length=4, text_len=8)


def test_composition_refuses_norms_it_cannot_fold_and_a_compute_before_bind() -> None:
    """The guards no test reached (diff review): a model whose layers' ``ln1`` differ (some scaled, some not: a
    subclass's, or one block swapped by hand) would fold some scales and not others; a normalisation the scores do
    not know; a probe computed outside a runner, which binds the model."""
    from transformer_lens.components import LayerNormPre

    from lens_callback.probes.composition import KCompositionProbe, check_composition_model

    mixed = _perturbed("LN")
    mixed.blocks[1].ln1 = LayerNormPre(mixed.cfg)
    with pytest.raises(ValueError, match=r"composition and copying scores need every layer's ln1 alike: some have "
                                         r"a scale \(w\) and some not"):
        composition_scores(mixed, "k")
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=2, d_vocab=29, attn_only=True)
    cfg.normalization_type = "BatchNorm"
    with pytest.raises(ValueError, match=r"composition scores fold LN, LNPre, RMS, RMSPre or no normalisation into "
                                         r"the weights, got normalization_type='BatchNorm'"):
        check_composition_model(cfg)
    with pytest.raises(RuntimeError, match=r"probe 'k_composition' needs bind\(model\) before compute\(\)"):
        KCompositionProbe().compute()


# ---------------------------------------------------------------------------------------------
# Copying scores (weights only, eigenvalues on the host)


def _transformer_lens_copying(model: HookedTransformer) -> Tensor:
    """TransformerLens's route (Main_Demo): a copy of ``model`` processed by ``process_weights_``'s defaults
    (``fold_ln``, ``center_writing_weights``, ``center_unembed``), ``W_E @ FactoredMatrix(W_V, W_O) @ W_U``'s
    eigenvalues, ``eig.sum(-1).real / eig.abs().sum(-1)``."""
    from transformer_lens import FactoredMatrix

    processed = HookedTransformer(HookedTransformerConfig(**{**model.cfg.to_dict(), "dtype": torch.float64}))
    processed.load_and_process_state_dict({k: v.double() for k, v in model.state_dict().items()})
    eig = (processed.W_E @ FactoredMatrix(processed.W_V, processed.W_O) @ processed.W_U).eigenvalues
    return (eig.sum(-1).real / eig.abs().sum(-1)).detach()


def _tied(model: HookedTransformer) -> HookedTransformer:
    """``model`` with ``W_U = W_E^T`` (nanoGPT's tied ``wte`` and ``lm_head``)."""
    with torch.no_grad():
        model.unembed.W_U.copy_(model.embed.W_E.T)
    return model


@pytest.mark.parametrize("normalization_type", ["LN", "RMS", None])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_copying_scores_are_transformer_lens_s_on_the_processed_weights(normalization_type: str | None,
                                                                        tied: bool) -> None:
    """The eigenvalue positivity of each head's full OV circuit after ``process_weights_``, as TransformerLens's
    demo computes it, without touching the model; the folding and centring matter (the raw weights' differ)."""
    from transformer_lens import FactoredMatrix

    model = _perturbed(normalization_type)
    if tied:
        _tied(model)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    ours = copying_scores(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert ours.shape == (3, 3) and ours.dtype == torch.float64 and ours.device.type == "cpu"
    torch.testing.assert_close(ours, _transformer_lens_copying(model), rtol=0, atol=1e-6)
    eig = (model.W_E @ FactoredMatrix(model.W_V, model.W_O) @ model.W_U).eigenvalues
    assert (ours - eig.sum(-1).real / eig.abs().sum(-1)).abs().max() > 1e-2  # unprocessed: other numbers
    assert ours.min() < -0.05 and ours.max() > 0.05  # random heads: of either sign


@pytest.mark.parametrize("overrides", [
    dict(n_heads=4, n_key_value_heads=2),  # grouped-query attention: W_V repeated over the query heads
    dict(n_heads=4, n_key_value_heads=2, normalization_type="RMS"),
    dict(attn_only=True),
    dict(normalization_type="LNPre"),  # processed already: nothing to fold, W_E and W_O still centred
    dict(n_heads=2, d_head=40),  # d_head > d_model: the circuit's rank is d_model
    dict(dtype=torch.float32),
], ids=["gqa", "gqa-rms", "attn-only", "lnpre", "wide-heads", "float32"])
def test_copying_scores_are_transformer_lens_s_on_other_architectures(overrides: dict[str, Any]) -> None:
    model = _perturbed(overrides.pop("normalization_type", "LN"), **overrides)
    ours = copying_scores(model)
    torch.testing.assert_close(ours, _transformer_lens_copying(model), rtol=0, atol=1e-5)
    assert ours.std() > 0.05  # heads differ (a repeated KV head's query heads share W_V, not W_O)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_copying_scores_a_head_writing_along_the_ones_direction_only_as_a_zero_head(dtype: torch.dtype) -> None:
    """A LayerNorm model's ``W_O`` is centred over ``d_model``: L0H1's, constant over it, is zero there, a zero
    head (score 0). Centring the circuit in its place (``P C P``), with the heads' ``W_O`` read un-centred, left
    the rounding of its mean times the circuit's sums: 1.0 in float64, 0.26 in float32."""
    model = _writing_along_ones(_perturbed("LN").to(dtype), 0.0)
    ours = copying_scores(model)
    assert ours[0, 1] == 0, ours[0, 1]
    expected = _transformer_lens_copying(model)  # its zero head's 0 / 0 is NaN
    assert torch.isnan(expected[0, 1])
    expected[0, 1] = 0.0
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("normalization_type", ["LN", "RMS", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copying_scores_hold_float32_precision_when_the_embeddings_share_a_large_mean(
        normalization_type: str | None, dtype: torch.dtype) -> None:
    """A trained model's ``W_E`` and ``W_U`` share a large mean over the vocabulary (anisotropic embeddings), which
    changes no score: the centring of ``W_U`` over the vocabulary takes either out. Done as a rank-1 correction of
    the product ``W_U W_E``, it cancelled in float32: with means 200x the spread, scores 1e-2 to 6e-2 off the
    float64 ones of the same weights (review: 3e-4 at 20x, 2e-5 at 4x). The reference is TransformerLens's route
    on a float64 copy whose embeddings are centred over the vocabulary in float64 first (its ``center_unembed``
    left the unembedding's mean at float32's rounding: 1e-5 off, a float64 model's, at 200x)."""
    model = _perturbed(normalization_type, d_vocab=300, dtype=dtype)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        w_e, w_u = model.embed.W_E, model.unembed.W_U
        w_e.copy_(w_e.float() + 200 * w_e.float().std() * torch.randn(w_e.shape[1], generator=generator))
        w_u.copy_(w_u.float() + 200 * w_u.float().std() * torch.randn(w_u.shape[0], 1, generator=generator))
    reference = HookedTransformer(HookedTransformerConfig(**{**model.cfg.to_dict(), "dtype": torch.float64}))
    reference.load_state_dict({name: value.double() for name, value in model.state_dict().items()})
    with torch.no_grad():
        reference.embed.W_E -= reference.embed.W_E.mean(dim=0)
        reference.unembed.W_U -= reference.unembed.W_U.mean(dim=1, keepdim=True)
    expected = _transformer_lens_copying(reference)
    assert expected.abs().max() > 0.1  # heads that copy or suppress, not all near 0
    torch.testing.assert_close(copying_scores(reference), expected, rtol=0, atol=1e-6)  # no mean to cancel
    torch.testing.assert_close(copying_scores(model), expected, rtol=0, atol=1e-5)


def test_the_copying_probe_logs_transformer_lens_s_scores_through_one_transfer_and_a_host_step() -> None:
    """The probe's compute() gives the heads' [d_head, d_head] matrices on the device, the host step their
    scores: ``measure`` logs TransformerLens's numbers (float32 transfer, eigenvalues in float64) as a per-head
    result, with max, mean and a heatmap, and no forward of either batch."""
    from lens_callback.measure import measure

    model = _perturbed("LN", dtype=torch.float32)
    tokens = random_tokens(2, 8, 29)
    forwards: list[int] = []
    model.add_hook("hook_embed", lambda embed, hook: forwards.append(embed.shape[0]))
    try:
        runner = ProbeRunner([make_probe("copying"), make_probe("induction")])
        assert runner.run(model, ProbeInputs(repeated=tokens, text=None))["copying"].shape == (3, 3, 6, 6)
        forwards.clear()
        measurement = measure(model, runner, ProbeInputs(repeated=tokens, text=None))
    finally:
        model.reset_hooks()
    assert forwards == [2]  # the induction probe's forward only
    assert measurement.failures == {} and set(measurement.per_head) == {"copying", "induction"}
    logged = measurement.arrays["copying"]
    assert logged.shape == (3, 3) and logged.dtype == np.float32
    np.testing.assert_allclose(logged, _transformer_lens_copying(model).numpy(), rtol=0, atol=1e-5)
    assert measurement.scalars["lens/copying/L2H1"] == pytest.approx(float(logged[2, 1]))
    assert measurement.scalars["lens/copying/max"] == pytest.approx(float(logged.max()))
    assert PROBES["copying"].heatmap_range == (-1.0, 1.0)
    out = run_probe(model, make_probe("copying"), tokens)  # the standalone route: the logged numbers, on the CPU
    assert set(out) == {"copying"} and out["copying"].dtype == torch.float32
    np.testing.assert_array_equal(out["copying"].numpy(), logged)


def test_a_head_that_copies_scores_1_one_that_suppresses_minus_1_and_a_zero_head_0() -> None:
    """The hand-built induction model's L1H0 writes the attended token's one-hot, times 10, where the unembedding
    reads it: its circuit is 10 x the identity on the (centred) tokens, score 1; negated, -1. L0H0 writes into a
    subspace the unembedding does not read, and heads 1 are zero: their circuits are zero, 0 (TransformerLens's:
    0 / 0, NaN). A rotated copy (W_V Q, Q^T W_O with Q orthogonal) changes no eigenvalue."""
    from transformer_lens import FactoredMatrix

    model = induction_model()
    expected = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(copying_scores(model), expected, rtol=0, atol=1e-6)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        model.blocks[1].attn.W_V[0] = model.blocks[1].attn.W_V[0] @ q
        model.blocks[1].attn.W_O[0] = q.T @ model.blocks[1].attn.W_O[0]
    torch.testing.assert_close(copying_scores(model), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        model.blocks[1].attn.W_O[0].neg_()
    torch.testing.assert_close(copying_scores(model), -expected, rtol=0, atol=1e-6)
    eig = (model.W_E @ FactoredMatrix(model.W_V, model.W_O) @ model.W_U).eigenvalues
    assert torch.isnan(eig.sum(-1).real / eig.abs().sum(-1))[0].all()  # TransformerLens's 0 / 0
    out = ProbeRunner([make_probe("copying")]).run(model, ProbeInputs(repeated=distinct_repeated(2, 5, V), text=None))
    from lens_callback.probes.copying import eigenvalue_positivity

    np.testing.assert_allclose(eigenvalue_positivity(out["copying"].numpy()), -expected.numpy(), atol=1e-6)


def test_a_head_whose_weights_are_not_finite_scores_nan_and_the_others_their_scores() -> None:
    """NumPy's eigvals refuses a matrix holding NaN: the host step would fail the probe for every head, where the
    callback's non-finite handling expects NaN results (and voids a step whose weights are not finite)."""
    from lens_callback.probes.copying import copying_matrices, eigenvalue_positivity

    model = _perturbed("LN")
    matrices = copying_matrices(model).numpy()
    matrices[1, 2, 0, 0] = np.nan
    scores = eigenvalue_positivity(matrices)
    assert np.isnan(scores[1, 2]) and np.isfinite(np.delete(scores.reshape(-1), 5)).all()
    np.testing.assert_allclose(np.delete(scores.reshape(-1), 5),
                               np.delete(copying_scores(model).numpy().reshape(-1), 5), rtol=0, atol=1e-12)


class _LargestFloatOutput(TorchDispatchMode):
    """The most elements of a floating-point tensor an operator allocated (a view allocates nothing) while the mode
    was on."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in () if func.is_view else out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, Tensor) and value.is_floating_point():
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_copying_centres_the_embeddings_a_block_of_the_vocabulary_at_a_time(
        dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """``W_E`` and ``W_U`` are centred over the vocabulary in float32 copies, a block of at most ``d_model`` tokens
    at a time: no copy larger than the ``[d_model, d_model]`` circuit (a bfloat16 or float16 model's were copied
    whole to float32 at every probe step, 2 x 154 MB at GPT-2 small's shape, 2 x 2.1 GB at a 128k-token,
    4,096-wide model's: the step's largest temporaries). ``EMBEDDING_BLOCK_ELEMENTS`` bounds a block further (past
    2,048 wide); blocks of any size give the scores of the whole."""
    import lens_callback.probes.copying as copying
    from lens_callback.probes.copying import copying_matrices

    model = _perturbed("LN", dtype=dtype, d_vocab=300)  # the embeddings larger than the attention weights
    d_model = model.cfg.d_model
    with _LargestFloatOutput() as largest:
        whole = copying_scores(model)  # 24 tokens a block: 12, and one of 12
    assert largest.largest <= d_model * d_model, largest.largest  # no [d_vocab, d_model] copy
    torch.testing.assert_close(whole, _transformer_lens_copying(model), rtol=0, atol=1e-5)
    monkeypatch.setattr(copying, "EMBEDDING_BLOCK_ELEMENTS", 16 * d_model)  # 16 tokens a block: 18, and one of 12
    with _LargestFloatOutput() as largest:
        copying_matrices(model)
    assert largest.largest <= d_model * d_model, largest.largest
    torch.testing.assert_close(copying_scores(model), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("score", ["q", "k", "v", "copying"])
def test_the_weights_only_scores_hold_about_one_layers_folded_weights_not_every_layers(score: str) -> None:
    """Issue P4: a probe step holds one extra copy of the weights. The composition and copying scores folded every
    layer's attention weights at once, float32 ``[n_layers, n_heads, d_model, d_head]`` stacks (and, for the
    composition scores, their Gram matrices and every pair of a reader layer): 29x one layer's four folded weights
    here, at GPT-2 small's shape, and 48x, 12 GB, at an 8B one. On the meta device (no arithmetic, no host
    synchronisation: the GPU's code path), the peak of the tensors they allocate (``bench/gpu_path.py``'s counter)
    stays within twice one layer's four folded weights: the composition scores hold one reader layer's folded
    weight, the pairs' core and its two products (each of one folded weight's size where n_heads * d_head =
    d_model: one layer's weights in all), a writer layer's centred W_O (LayerNorm) and the writers' [n_heads,
    d_head, d_head] Gram matrices ((n_layers - 1) * n_heads * d_head^2 elements: 11/12 of one weight here), 1.55x;
    the copying score its [d_model, d_model] circuit, one layer's folded W_V and W_O, W_O times the circuit and
    the heads' [n_layers, n_heads, d_head, d_head] matrices (five weights' size), 1.25x."""
    from lens_callback.probes.copying import copying_matrices

    live_bytes = bench_module("gpu_path")._LiveBytes
    cfg = HookedTransformerConfig(n_layers=12, n_heads=12, d_model=768, d_head=64, d_vocab=50, n_ctx=8,
                                  act_fn="gelu", normalization_type="LN", device="meta")
    with torch.device("meta"):
        model = HookedTransformer(cfg, move_to_device=False)
    layer_bytes = 4 * cfg.n_heads * cfg.d_model * cfg.d_head * 4  # one layer's W_Q, W_K, W_V and W_O in float32
    with live_bytes() as memory:
        out = copying_matrices(model) if score == "copying" else composition_scores(model, score)
    expected = (12, 12, 64, 64) if score == "copying" else (12, 12, 12, 12)
    assert out.device.type == "meta" and out.shape == expected
    assert memory.peak <= 2 * layer_bytes, f"{memory.peak / layer_bytes:.2f} x one layer's folded weights"


def test_copying_refuses_what_it_cannot_define_before_training() -> None:
    """One line each, from ``validate``: a post-norm model, an output vocabulary other than the input one, an RMS
    final norm after LayerNorm blocks (``process_weights_`` then centres nothing)."""
    runner = ProbeRunner([make_probe("induction"), make_probe("copying")])
    base = dict(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=2, d_vocab=29, attn_only=True,
                normalization_type="LN")
    cases = {
        r"probe 'copying': copying scores need pre-norm blocks; \w+ is post-norm":
            dict(original_architecture=sorted(POST_NORM_ARCHITECTURES)[0]),
        r"probe 'copying': copying scores map each token to itself: they need d_vocab_out == d_vocab, got "
        r"d_vocab_out=31, d_vocab=29": dict(d_vocab_out=31),
        r"probe 'copying': copying scores fold the final norm like the blocks' ones; final_rms=True with "
        r"normalization_type='LN'": dict(final_rms=True),
    }
    for message, overrides in cases.items():
        with pytest.raises(ValueError, match=f"^{message}") as raised:
            runner.validate(HookedTransformerConfig(**{**base, **overrides}), repeat_length=4, text_len=8)
        assert "\n" not in str(raised.value)
    runner.validate(HookedTransformerConfig(**{**base, "final_rms": True, "normalization_type": "RMS"}),
                    repeat_length=4, text_len=8)
    with pytest.raises(RuntimeError, match=r"probe 'copying' needs bind\(model\) before compute\(\)"):
        make_probe("copying").compute()


# ---------------------------------------------------------------------------------------------
# Inputs


def test_repeated_tokens() -> None:
    pool = torch.tensor([3, 7, 11, 19])
    out = repeated_tokens(pool, 5, 8, torch.Generator().manual_seed(0))
    assert out.shape == (5, 16) and out.dtype == torch.int64
    assert torch.equal(out[:, 8:], out[:, :8])
    assert torch.isin(out, pool).all()
    assert len(out.unique()) > 1
    assert torch.equal(out, repeated_tokens(pool, 5, 8, torch.Generator().manual_seed(0)))


def test_token_pool_from_memmap_and_tensor(tmp_path: Path) -> None:
    data = np.memmap(tmp_path / "d.bin", dtype=np.uint16, mode="w+", shape=(6,))
    data[:] = [5, 5, 2, 9, 2, 5]
    assert token_pool_from_data(data, 10).tolist() == [2, 5, 9]
    assert token_pool_from_data(data, 10, min_count=2).tolist() == [2, 5]
    assert token_pool_from_data(data, 10, max_tokens=3).tolist() == [2, 5]
    assert token_pool_from_data(torch.tensor([4, 1, 4]), 5).tolist() == [1, 4]


def test_text_batch_windows(tmp_path: Path) -> None:
    data = np.memmap(tmp_path / "v.bin", dtype=np.uint16, mode="w+", shape=(100,))
    data[:] = np.arange(100)
    out = text_batch(data, 6, 10, torch.Generator().manual_seed(0))
    assert out.shape == (6, 10) and out.dtype == torch.int64
    assert (out[:, 1:] - out[:, :-1] == 1).all()  # contiguous windows
    assert (out[:, 0] <= 90).all()
    assert torch.equal(out, text_batch(torch.arange(100), 6, 10, torch.Generator().manual_seed(0)))


def test_text_batch_can_draw_every_window_the_last_one_included() -> None:
    """Mutation review: window starts drawn from ``[0, n - seq_len)`` instead of ``[0, n - seq_len]``
    (the last window never drawn) went unnoticed. With one token more than a window there are exactly
    two windows, starts 0 and 1, and 64 draws miss one of them with probability 2**-63."""
    out = text_batch(torch.arange(11), 64, 10, torch.Generator().manual_seed(0))
    assert set(out[:, 0].tolist()) == {0, 1}


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ICLScoreProbe(early=-1), "early"),
        (lambda: ICLScoreProbe(late=2.5), "late"),
        (lambda: ICLScoreProbe(early=5, late=5), "early"),
        (lambda: LogitLensProbe(max_positions=0), "max_positions"),
        (lambda: make_probe("logit_lens", max_positions=True), "max_positions"),
        (lambda: make_probe("no_such_probe"), "no_such_probe"),
        (lambda: ProbeRunner([InductionProbe(), InductionProbe()]), "induction"),
        (lambda: repeated_tokens(torch.arange(3), 0, 4, torch.Generator()), "batch_size"),
        (lambda: repeated_tokens(torch.arange(3), 2, 0, torch.Generator()), "length"),
        (lambda: repeated_tokens(torch.tensor([], dtype=torch.long), 2, 3, torch.Generator()), "token_pool"),
        (lambda: text_batch(torch.arange(5), 2, 6, torch.Generator()), "seq_len"),
        (lambda: token_pool_from_data(torch.tensor([1, 12]), 10), "vocab_size"),
        (lambda: token_pool_from_data(torch.tensor([1, 2]), 10, min_count=2), "min_count"),
        (lambda: make_probe_inputs(torch.arange(10), torch.full((64,), 12), 10, repeat_length=2, repeat_batch=1,
                                   text_len=8, text_batch_size=2, seed=0), r"val_data.*token id 12 >= vocab_size=10"),
        (lambda: make_probe_inputs(None, torch.full((64,), -1), 10, repeat_length=2, repeat_batch=0,
                                   text_len=8, text_batch_size=2, seed=0), r"val_data.*negative token id -1"),
        (lambda: make_probe_inputs(torch.arange(10.0), None, 10, repeat_length=2, repeat_batch=1, text_len=8,
                                   text_batch_size=0, seed=0), r"train_data must hold integer token ids.*float32"),
        (lambda: make_probe_inputs(None, np.ones(64, dtype=bool), 10, repeat_length=2, repeat_batch=0, text_len=8,
                                   text_batch_size=2, seed=0), r"val_data must hold integer token ids.*bool"),
        (lambda: ProbeInputs(repeated=torch.zeros(2, 4), text=None), "repeated"),
        (lambda: ProbeInputs(repeated=None, text=torch.zeros(4, dtype=torch.long)), "text"),
    ],
)
def test_bad_options_raise_value_error_naming_the_field(build: Callable[[], object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build()


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_uint64_id_past_int64_is_named_not_read_as_negative(as_tensor: bool) -> None:
    """A uint64 id of 2**63 or more was cast to int64, wrapping it around: ``np.uint64(2**64 - 1)`` in
    train_data was refused as "a negative token id -1", an id the data does not hold (inputs review)."""
    huge = 2**64 - 1
    data = torch.tensor([huge, 3], dtype=torch.uint64) if as_tensor else np.array([huge, 3], dtype=np.uint64)
    with pytest.raises(ValueError, match=f"token id {huge}"):
        token_pool_from_data(data, 10)
    with pytest.raises(ValueError, match=f"token id {huge}"):
        make_probe_inputs(None, np.concatenate([data.numpy() if as_tensor else data] * 4), 10, repeat_length=2,
                          repeat_batch=0, text_len=8, text_batch_size=1, seed=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 2**64 - 1}, r"seed must be an int in \[-2\*\*63, 2\*\*64 - 1\).*seed=18446744073709551615"),
        ({"seed": -(2**63) - 1}, r"seed must be an int in .*seed=-9223372036854775809"),
        ({"text_len": 0}, r"text_len must be a positive int, got text_len=0"),
        ({"text_len": 65}, r"val_data has 64 tokens, fewer than text_len=65"),
        ({"repeat_length": 0}, r"repeat_length must be a positive int, got repeat_length=0"),
    ],
)
def test_make_probe_inputs_names_its_own_arguments_in_errors(change: dict[str, int], message: str) -> None:
    """make_probe_inputs' errors named its helpers' arguments or none: "seq_len must be a positive int" or
    "data has 64 tokens, fewer than seq_len=65" for text_len, "length must be ..." for repeat_length, and
    torch's "Overflow when unpacking long long" for a seed past 64 bits (inputs review)."""
    kwargs = {"repeat_length": 4, "repeat_batch": 2, "text_len": 8, "text_batch_size": 2, "seed": 0, **change}
    with pytest.raises(ValueError, match=message):
        make_probe_inputs(torch.arange(64) % 10, torch.arange(64) % 10, 10, **kwargs)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (torch.arange(64) % 12, r"^train_data holds token id 11 >= vocab_size=10$"),
        (torch.arange(64) % 10 - 1, r"^train_data holds a negative token id -1$"),
        (torch.tensor([], dtype=torch.long), r"in the first 0 tokens of train_data$"),
    ],
)
def test_make_probe_inputs_says_the_bad_ids_are_in_train_data(train: Tensor, message: str) -> None:
    """An id outside the vocabulary in train_data was "data holds token id 11 >= vocab_size=10", while one
    in val_data says "val_data holds ...": which of the two held it was left to guess (inputs review)."""
    with pytest.raises(ValueError, match=message):
        make_probe_inputs(train, torch.arange(64) % 10, 10, repeat_length=4, repeat_batch=2, text_len=8,
                          text_batch_size=2, seed=0)


def test_make_probe_inputs_takes_the_extreme_seeds() -> None:
    """The widest seeds torch's generators take (seed + 1 seeds the text windows) draw their batches."""
    for seed in (-(2**63), 2**64 - 2):
        inputs = make_probe_inputs(torch.arange(64) % 10, torch.arange(64) % 10, 10, repeat_length=4,
                                   repeat_batch=2, text_len=8, text_batch_size=2, seed=seed)
        assert inputs.repeated.shape == (2, 8) and inputs.text.shape == (2, 8)


def test_runner_validation_before_training() -> None:
    cfg = random_model(n_ctx=32).cfg
    runner = ProbeRunner([InductionProbe(), ICLScoreProbe(late=20)])
    assert runner.required_seq_len(repeat_length=10, text_len=24) == 24
    runner.validate(cfg, repeat_length=16, text_len=32)
    with pytest.raises(ValueError, match=r"repeat_length.*40.*n_ctx = 32"):
        runner.validate(cfg, repeat_length=20, text_len=24)
    with pytest.raises(ValueError, match=r"text_len = 33.*n_ctx = 32"):
        runner.validate(cfg, repeat_length=8, text_len=33)
    with pytest.raises(ValueError, match=r"late=20"):
        runner.validate(cfg, repeat_length=8, text_len=16)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        runner.validate(cfg, repeat_length=8, text_len=24, max_batch_tokens=20)
    # only the batches enabled probes consume are checked
    ProbeRunner([LogitLensProbe()]).validate(cfg, repeat_length=100, text_len=32)
    # with L = 1 the induction diagonal is the current token and the duplicate one the previous token
    # (with L = 2 the induction one is the previous token too)
    for probe, least in ((InductionProbe(), 3), (make_probe("duplicate_token"), 2)):
        with pytest.raises(ValueError, match=rf"{probe.name} needs repeat_length >= {least}"):
            ProbeRunner([probe]).validate(cfg, repeat_length=1, text_len=24)
    ProbeRunner([make_probe("prev_token")]).validate(cfg, repeat_length=1, text_len=24)  # still defined


def test_runner_rejects_bad_inputs() -> None:
    model = random_model(n_ctx=32)
    tokens = random_tokens(2, 8, 29)
    with pytest.raises(ValueError, match="inputs.text"):
        ProbeRunner([ICLScoreProbe()]).run(model, ProbeInputs(repeated=tokens, text=None))
    with pytest.raises(ValueError, match="seq_len=7"):
        induction_score(model, tokens[:, :7])
    with pytest.raises(ValueError, match=r"inputs.repeated = 40.*n_ctx = 32"):
        induction_score(model, random_tokens(1, 40, 29))
    with pytest.raises(ValueError, match="max_batch_tokens"):
        ProbeRunner([InductionProbe()]).run(model, ProbeInputs(repeated=tokens, text=None), max_batch_tokens=4)


def test_standalone_probes_refuse_ids_outside_the_vocabulary_and_warn_on_unrepeated_tokens() -> None:
    """A negative id was read from the end of the embedding as another token: ``induction_score`` on
    tokens with 28 written as -1 gave the same scores without a word (API review). The standalone
    functions refuse ids outside ``[0, d_vocab)``, and a repeated-batch probe warns on halves that differ."""
    model = random_model()
    rep = repeated_tokens(torch.arange(29), 3, 6, torch.Generator().manual_seed(0))
    negative = rep.where(rep != 28, -1)
    assert not torch.equal(negative, rep)
    for function, tokens in ((induction_score, negative), (repeated_loss, negative), (attention_entropy, negative),
                             (induction_score, rep.where(rep != 28, 29))):
        with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 29\)"):
            function(model, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        induction_score(model, rep)  # a repeated batch: no warning
        attention_entropy(model, random_tokens(2, 12, 29))  # the text batch is not checked for repeats
        previous_token_score(model, random_tokens(2, 12, 29))  # nor a score that reads no repeat
    altered = rep.clone()
    altered[:, -1] = (altered[:, -1] + 1) % 29
    with pytest.warns(UserWarning, match=r"repeated_loss: the tokens' second half does not repeat the first"):
        repeated_loss(model, altered)


# ---------------------------------------------------------------------------------------------
# The GPU code path, run on the CPU


def test_the_gpu_code_path_run_on_the_cpu_gives_the_cpu_paths_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every branch a GPU takes (no workspace, one forward per batch, one causal-mask block,
    ``xlogy`` entropy blocks, zero biases kept, big logit blocks), switched on for the CPU by its
    per-device setting, gives the CPU path's numbers: the GPU-only branches are checked here on
    values, where no GPU is present (``bench/gpu_path.py`` only counts them on the meta device). The
    settings are switched by ``bench/host_proxy.py``'s `off_cpu_settings`, which times that path."""
    from lens_callback.convert import build_hooked_transformer, get_converter
    from lens_callback.probes import pack_attention_weights
    from nanogpt_model import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=128, vocab_size=29, n_layer=2, n_head=2, n_embd=16, bias=False))
    with torch.no_grad():
        for block in gpt.transformer.h:
            block.attn.c_attn.weight.mul_(30.0)  # peaked patterns: most weights below 1e-3
    converter = get_converter("nanogpt")
    model = build_hooked_transformer(converter, converter.model_config(gpt), gpt.state_dict())
    pack_attention_weights(model)  # as the callback's private model
    forwards: list[tuple[int, ...]] = []
    embed_forward = model.embed.forward  # spied on without a hook: a hook of the test's own would turn the
    # CPU workspace off (`_foreign_hooks`)

    def counted(tokens: Tensor) -> Tensor:
        forwards.append(tuple(tokens.shape[:2]))
        return embed_forward(tokens)

    model.embed.forward = counted
    inputs = ProbeInputs(
        repeated=repeated_tokens(torch.arange(29), 3, 32, torch.Generator().manual_seed(0)),  # T = 64
        text=random_tokens(3, 128, 29),
    )
    # the CPU path, the text batch chunked as the default model's is (budget: one text row's pattern)
    monkeypatch.setitem(runner_module.PATTERN_CHUNK_BYTES, "cpu", 2 * 128 * 128 * 4)
    monkeypatch.setitem(runner_module.LOGIT_BLOCK_ELEMENTS, "cpu", 29 * 8)  # 8 rows per decoded block
    cpu_runner = ProbeRunner(all_probes())
    cpu = cpu_runner.run(model, inputs)
    assert forwards == [(3, 64)] + [(1, 128)] * 3 and cpu_runner.workspace.nbytes > 0

    calls: dict[str, int] = {"xlogy": 0, "where": 0}
    for name in calls:
        original = getattr(torch, name)

        def counting(*args: Any, _name: str = name, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, counting)
    forwards.clear()
    gpu_runner = ProbeRunner(all_probes())
    with bench_module("host_proxy").off_cpu_settings():  # every per-device setting at its off-CPU value
        gpu_path = gpu_runner.run(model, inputs)
    assert forwards == [(3, 64), (3, 128)] and gpu_runner.workspace.nbytes == 0
    assert calls == {"xlogy": 2, "where": 4}  # one entropy block per layer; one mask per layer and batch
    assert set(gpu_path) == set(cpu)
    for key, value in cpu.items():
        torch.testing.assert_close(gpu_path[key], value, atol=1e-5, rtol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------
# GPU: no host-device synchronisation inside the probes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probes_do_not_synchronise(monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model().to("cuda")
    probes = all_probes()

    def no_sync(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return wrapped

    for probe in probes:
        for method in ("reset", "on_activation", "on_loss", "compute"):
            monkeypatch.setattr(probe, method, no_sync(getattr(probe, method)))
    inputs = ProbeInputs(
        repeated=repeated_tokens(torch.arange(29), 3, 6, torch.Generator().manual_seed(0)),
        text=random_tokens(3, 16, 29),
    ).to("cuda")
    out = ProbeRunner(probes).run(model, inputs, max_batch_tokens=16)
    assert all(value.device.type == "cuda" for value in out.values())
    cpu = ProbeRunner(all_probes()).run(model.to("cpu"), inputs.to("cpu"))
    for key, value in cpu.items():
        torch.testing.assert_close(out[key].cpu(), value, atol=1e-4, rtol=1e-4, msg=key)


def test_every_public_name_is_importable() -> None:
    import lens_callback
    import lens_callback.probes

    for module in (lens_callback, lens_callback.probes):
        assert [name for name in module.__all__ if not hasattr(module, name)] == [], module.__name__


def test_no_public_name_hides_a_submodule() -> None:
    # a function exported under its module's name made ``lens_callback.convert`` the function, so
    # ``import lens_callback.convert.parity`` failed and ``import lens_callback.measure as m`` gave the function.
    # (``lens_callback.probes`` names its documented standalone functions after their modules, e.g.
    # ``logit_lens``: those modules have no submodules, and ``from ... import`` reaches them.)
    import importlib
    import pkgutil
    import types

    import lens_callback

    for package in (lens_callback, lens_callback.convert):
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
            assert isinstance(getattr(package, info.name), types.ModuleType), f"{package.__name__}.{info.name}"
    import lens_callback.convert.parity as parity

    assert parity.check_parity is lens_callback.check_parity


class _FinalNormProbe(Probe):
    """Reads ``ln_final``'s output, which a probe run otherwise skips."""

    name: ClassVar[str] = "final_norm_mean"
    batch: ClassVar[str] = "text"  # type: ignore[assignment]

    @override
    def hook_names(self, cfg: HookedTransformerConfig) -> list[str]:
        return ["ln_final.hook_normalized"]

    @override
    def reset(self, cfg: HookedTransformerConfig, device: torch.device) -> None:
        self.total = torch.zeros((), device=device)

    @override
    def on_activation(self, hook_name: str, activation: Tensor, tokens: Tensor) -> None:
        self.total += activation.abs().sum()

    @override
    def compute(self) -> dict[str, Tensor]:
        return {MAIN_KEY: self.total}


def test_a_probe_run_skips_ln_final_unless_a_hook_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model()
    tokens = random_tokens(3, 12, 29)
    calls: list[int] = []
    original = type(model.ln_final).forward

    def counting(self: torch.nn.Module, x: Tensor) -> Tensor:
        calls.append(id(self))
        return original(self, x)

    monkeypatch.setattr(type(model.ln_final), "forward", counting)
    inputs = ProbeInputs(repeated=random_tokens(2, 8, 29), text=tokens)
    # TransformerLens's norms (the lean path's are fused); no probe here decodes logits (those call
    # ln_final on their rows)
    out = ProbeRunner([make_probe(name) for name in ("induction", "attn_entropy")]).run(
        model, inputs, lean_attention=False
    )
    assert calls and id(model.ln_final) not in calls  # ln1, ln2 only
    assert all(bool(torch.isfinite(v).all()) for v in out.values())

    out = ProbeRunner([_FinalNormProbe(), InductionProbe()]).run(
        model, inputs, max_batch_tokens=24, lean_attention=False
    )
    assert calls.count(id(model.ln_final)) == 2  # text batch in two chunks of 2 and 1 rows
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(out["final_norm_mean"], cache["ln_final.hook_normalized"].abs().sum())

    calls.clear()  # a user's own hook on ln_final is served as well
    seen: list[int] = []
    handle = model.ln_final.register_forward_hook(lambda module, args, output: seen.append(1))
    try:
        ProbeRunner([InductionProbe()]).run(model, inputs, lean_attention=False)
    finally:
        handle.remove()
    assert seen and id(model.ln_final) in calls


def test_the_run_is_in_inference_mode_and_standalone_results_are_ordinary_tensors() -> None:
    model = random_model()
    tokens = repeated_tokens(torch.arange(29), 2, 4, torch.Generator().manual_seed(1))
    seen: list[bool] = []

    class _Spy(InductionProbe):
        @override
        def on_activation(self, hook_name: str, activation: Tensor, tokens: Tensor) -> None:
            seen.append(torch.is_inference_mode_enabled() and activation.is_inference())
            super().on_activation(hook_name, activation, tokens)

    raw = ProbeRunner([_Spy()]).run(model, ProbeInputs(repeated=tokens, text=None))
    assert seen and all(seen) and not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert raw["induction"].is_inference()  # documented: clone to change in place
    scores = induction_score(model, tokens)
    assert not scores.is_inference()
    scores += 1.0  # an ordinary tensor: in place outside the run is fine
    scores.requires_grad_(True).sum().backward()
    torch.testing.assert_close(scores.detach() - 1.0, raw["induction"])


def test_option_and_registry_errors_name_the_probe() -> None:
    from lens_callback import LensCallback, register_converter, unregister_converter, unregister_probe
    from lens_callback.convert import NanoGPTConverter

    with pytest.raises(TypeError, match=r"probe_options\['induction'\]: .*'x'.*takes no options"):
        LensCallback(probes=["induction"], probe_options={"induction": {"x": 1}})
    with pytest.raises(TypeError, match=r"probe_options\['logit_lens'\]: .*takes \['max_positions'\]"):
        LensCallback(probes=["logit_lens"], probe_options={"logit_lens": {"max_position": 8}})
    with pytest.raises(ValueError, match=r"probe_options: .*mapping.*\{'logit_lens': 3\}"):
        LensCallback(probes=["logit_lens"], probe_options={"logit_lens": 3})

    class Again(NanoGPTConverter):
        name = "test-again"

        def matches(self, model: Any) -> bool:
            return False

    register_converter(Again)
    try:
        register_converter(Again)  # the same class again (a cell run twice): replaces it
        with pytest.raises(ValueError, match=r"already registered by .*Again; pass overwrite=True"):
            register_converter(type("Other", (Again,), {}))
    finally:
        unregister_converter("test-again")

    @register_probe
    class Temporary(InductionProbe):
        name = "test_temporary"

    assert "test_temporary" in available_probes()
    unregister_probe("test_temporary")
    assert "test_temporary" not in available_probes()
    # a probe named errors logged lens/errors, which the fault count then overwrote (extension review)
    for reserved in ("errors", "events", "run_id"):
        with pytest.raises(ValueError, match=rf"probe name '{reserved}' is reserved: the callback logs lens/{reserved}"):
            register_probe(type("Clash", (InductionProbe,), {"name": reserved}))
        assert reserved not in available_probes()


def test_a_pattern_probe_hooking_some_layers_only_is_rejected_before_step_one() -> None:
    """Its per-layer rows would be mislabelled or empty: the runner's validation names the way out."""

    class LastLayerInduction(InductionProbe):
        name = "last_layer_induction"

        def hook_names(self, cfg: Any) -> list[str]:
            return [f"blocks.{cfg.n_layers - 1}.attn.hook_pattern"]

    model = random_model()
    with pytest.raises(ValueError, match=r"'last_layer_induction': an AttentionPatternProbe reads every layer.*subclass Probe"):
        ProbeRunner([LastLayerInduction()]).validate(model.cfg, repeat_length=4, text_len=8)


def test_induction_needs_repeat_length_3_where_its_diagonal_is_not_the_previous_token() -> None:
    """At L = 2 the induction key q - L + 1 is q - 1: a pure previous-token head scored 1.0 as an
    induction head, and the setting was accepted."""
    model = random_model()
    with pytest.raises(ValueError, match="induction"):
        ProbeRunner([InductionProbe()]).validate(model.cfg, repeat_length=2, text_len=16)
    ProbeRunner([InductionProbe()]).validate(model.cfg, repeat_length=3, text_len=16)


def test_a_standalone_probe_function_raises_what_its_probe_raised() -> None:
    """run_probe (behind induction_score, logit_lens, ...) read no failures: a probe that raised gave
    an empty dict (logit_lens) or a bare KeyError (the per-head functions)."""

    class Broken(InductionProbe):
        name = "broken"

        def compute(self) -> dict[str, Tensor]:
            raise ValueError("the real problem")

    model = random_model()
    tokens = torch.cat([random_tokens(2, 8, model.cfg.d_vocab)] * 2, dim=1)
    with pytest.raises(RuntimeError, match=r"probe 'broken' failed in compute\(\): ValueError: the real problem"):
        run_probe(model, Broken(), tokens)

    class BrokenHook(InductionProbe):
        name = "broken_hook"

        def on_activation(self, name: str, activation: Tensor, tokens: Tensor) -> None:
            raise IndexError("in the hook")

    with pytest.raises(RuntimeError, match=r"probe 'broken_hook' failed in on_activation.*IndexError: in the hook"):
        run_probe(model, BrokenHook(), tokens)


def test_a_standalone_probe_function_chains_what_its_probe_raised() -> None:
    """run_probe raised its RuntimeError without ``from``: the traceback of the probe's own exception, in
    compute or in a hook, was lost (review). The ProbeRunner keeps it (`ProbeRunner.failure_errors`), and
    `raised_at` names the probe's line, not the runner's."""
    class Broken(InductionProbe):
        name = "broken"

        def compute(self) -> dict[str, Tensor]:
            raise ValueError("in compute")

    class BrokenHook(InductionProbe):
        name = "broken_hook"

        def on_activation(self, name: str, activation: Tensor, tokens: Tensor) -> None:
            raise IndexError("in the hook")

    model = random_model()
    tokens = torch.cat([random_tokens(2, 8, model.cfg.d_vocab)] * 2, dim=1)
    for probe, error, method in ((Broken(), ValueError, "compute"), (BrokenHook(), IndexError, "on_activation")):
        with pytest.raises(RuntimeError, match=f"probe '{probe.name}' failed in {method}") as raised:
            run_probe(model, probe, tokens)
        cause = raised.value.__cause__
        assert isinstance(cause, error), repr(cause)
        assert traceback.extract_tb(cause.__traceback__)[-1].name == method
        code = getattr(type(probe), method).__code__
        assert raised_at(cause) == f"{code.co_filename}:{code.co_firstlineno + 1} in {method}"


def test_where_a_probe_failed_names_the_probes_line_before_the_library_frame_that_raised() -> None:
    """A probe calling torch wrongly (softmax over a dimension the tensor lacks) was placed in torch's
    ``functional.py`` only: the probe's own line comes first now, the raising library frame after it
    (diff review)."""
    class BadDim(InductionProbe):
        name = "bad_dim"

        def on_activation(self, name: str, activation: Tensor, tokens: Tensor) -> None:
            torch.nn.functional.softmax(activation, dim=7)

    model = random_model()
    with pytest.raises(RuntimeError) as raised:
        run_probe(model, BadDim(), torch.cat([random_tokens(2, 8, model.cfg.d_vocab)] * 2, dim=1))
    code = BadDim.on_activation.__code__
    where = raised_at(raised.value.__cause__)
    assert where is not None
    assert where.startswith(f"{code.co_filename}:{code.co_firstlineno + 1} in on_activation (raised in ")
    assert "torch" in where.partition("(raised in ")[2]


# -- pinned by the mutation review -------------------------------------------------------------
def test_repeated_loss_refuses_repeat_length_1_before_training() -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    import pytest
    from transformer_lens import HookedTransformerConfig

    from lens_callback.probes import ProbeRunner
    from lens_callback.probes.repeated_loss import RepeatedLossProbe

    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=32, d_head=4, n_heads=2, d_vocab=16, act_fn="gelu")
    with pytest.raises(ValueError, match="repeated_loss needs repeat_length >= 2"):
        ProbeRunner([RepeatedLossProbe()]).validate(cfg, repeat_length=1, text_len=24)


def test_a_negative_training_token_id_is_a_value_error_naming_it() -> None:
    """(mutation review: a mutant of the code this pins survived the suite.)"""
    import pytest, torch
    from lens_callback.probes.inputs import token_pool_from_data

    with pytest.raises(ValueError, match="negative token id -1"):
        token_pool_from_data(torch.tensor([1, -1, 2]), 10)
