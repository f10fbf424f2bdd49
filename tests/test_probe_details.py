"""Details of the probes, their inputs, the lean attention and the converters that the by-hand tests in
test_probes.py, test_attention.py and test_convert.py left open: an unembedding bias and an output
soft-cap in the losses, the logit lens's decoding budget, the ICL bands, the attention the lean path
must refuse, a packed model with some zero biases, the fused norms' eps, the input recipes (the text
seed ``seed + 1`` shared with post-hoc probing), converter keys and parity under dropout. Each was found
by a mutation review: the test fails on the mutated code."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lens_callback.probes.attention as attention_module
import lens_callback.probes.runner as runner_module
from lens_callback import check_parity, to_hooked_transformer
from lens_callback.convert import ConversionError
from lens_callback.probes import (
    MAIN_KEY,
    DiagonalAttentionProbe,
    ICLScoreProbe,
    Probe,
    ProbeInputs,
    ProbeRunner,
    icl_score,
    lean_attention,
    lean_attention_unsupported,
    logit_lens,
    make_probe,
    make_probe_inputs,
    pack_attention_weights,
    induction_score,
    repeated_loss,
    repeated_tokens,
    run_probe,
    text_batch,
    token_pool_from_data,
)
from nanogpt_model import GPT, GPTConfig


def model_(n_ctx: int = 64, **overrides: Any) -> HookedTransformer:
    fields: dict[str, Any] = dict(n_layers=2, d_model=16, n_ctx=n_ctx, d_head=4, n_heads=2, d_mlp=32, d_vocab=29,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    fields.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**fields))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("W_Q", "W_K", "W_E", "W_U", "W_pos")):
                param.mul_(8.0)
    return model.eval()


def toks(b: int, t: int, seed: int = 1) -> Tensor:
    return torch.randint(29, (b, t), generator=torch.Generator().manual_seed(seed))


# -- runner.final_logits: unembedding bias and output soft-cap (N8, N9) ---------------------------
@pytest.mark.parametrize("overrides", [dict(), dict(output_logits_soft_cap=2.0)], ids=["b_U", "softcap"])
def test_loss_probes_use_b_U_and_the_output_soft_cap(overrides: dict[str, Any]) -> None:
    model = model_(**overrides)
    with torch.no_grad():
        model.unembed.b_U.copy_(torch.randn(29, generator=torch.Generator().manual_seed(5)) * 3)
    tokens = toks(3, 10)
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(logit_lens(model, tokens)["loss"][-1], per_token.mean(), atol=1e-5, rtol=0)
    rep = repeated_tokens(torch.arange(29), 3, 5, torch.Generator().manual_seed(0))
    per_rep = model(rep, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(repeated_loss(model, rep), per_rep[:, 5:].mean(), atol=1e-5, rtol=0)


# -- logit lens decoding block bounds all entries together (L7) -----------------------------------
def test_logit_lens_block_counts_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_()
    lens_module = importlib.import_module("lens_callback.probes.logit_lens")
    seen: list[tuple[int, ...]] = []
    real = lens_module.final_log_probs
    monkeypatch.setattr(lens_module, "final_log_probs", lambda m, r: (seen.append(tuple(r.shape)), real(m, r))[1])
    budget = 29 * 3 * 2  # 2 rows of all 3 entries
    monkeypatch.setitem(runner_module.LOGIT_BLOCK_ELEMENTS, "cpu", budget)
    logit_lens(model, toks(2, 8))
    assert seen and all(e * r * 29 <= budget for e, r, _ in seen), seen


# -- ICL score: default band width, adjacent bands, late = T - 1 (I3, I6, I7) ---------------------
def test_icl_default_width_and_band_edges() -> None:
    assert [ICLScoreProbe().band(t) for t in (20, 40, 128, 256)] == [1, 2, 6, 12]
    model, tokens = model_(), toks(2, 40)
    per = model(tokens, return_type="loss", loss_per_token=True)  # early 4, late 38, width 2
    torch.testing.assert_close(icl_score(model, tokens), per[:, 37:39].mean() - per[:, 4:6].mean(), atol=1e-5, rtol=0)
    short = tokens[:, :20]
    per20 = model(short, return_type="loss", loss_per_token=True)
    # adjacent bands [2, 4) and (3, 5] = 4, 5 do not overlap: accepted
    torch.testing.assert_close(icl_score(model, short, early=2, late=5, width=2),
                               per20[:, 4:6].mean() - per20[:, 2:4].mean(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"icl_score late=19 needs text_len"):
        ProbeRunner([ICLScoreProbe(late=19)]).validate(model.cfg, repeat_length=4, text_len=20)


def test_icl_decodes_exactly_its_two_bands() -> None:
    """Mutation review: requesting one position more than the bands (``late - w`` decoded, never
    read) went unnoticed: the numbers stay the same, the cost does not. At the default 256-token
    window the bands are 25 .. 36 and 243 .. 254: the 24 of 255 positions the README promises."""
    assert ICLScoreProbe().loss_positions(256) == [*range(25, 37), *range(243, 255)]
    assert ICLScoreProbe(early=2, late=5, width=2).loss_positions(20) == [2, 3, 4, 5]


# -- lean attention refuses what it cannot compute (A9, A10, A16) ---------------------------------
@pytest.mark.parametrize(("overrides", "reason"), [
    (dict(use_local_attn=True, attn_types=["local", "local"], window_size=3), "local attention"),
    (dict(use_qk_norm=True), "QK norm"),
    pytest.param(dict(use_logn_attn=True), "log-n", marks=pytest.mark.skipif(
        "use_logn_attn" not in HookedTransformerConfig.__dataclass_fields__, reason="TransformerLens before 3.8")),
])
def test_more_unsupported_attention(overrides: dict[str, Any], reason: str) -> None:
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=32, d_head=4, n_heads=2, d_mlp=32, d_vocab=29,
                                  act_fn="gelu", normalization_type="LN", **overrides)
    with torch.device("meta"):
        model = HookedTransformer(cfg, move_to_device=False)
    why = lean_attention_unsupported(model.blocks[0].attn)
    assert why is not None and reason in why


# -- packed QKV with only some biases zero (A5) ---------------------------------------------------
@torch.no_grad()
def test_packed_attention_keeps_a_non_zero_value_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_module, "EXACT_NORM_DEVICES", frozenset({"cpu"}))
    model = model_()
    model.blocks[1].attn.b_V.copy_(torch.randn(2, 4, generator=torch.Generator().manual_seed(3)))
    pack_attention_weights(model)
    tokens = toks(2, 24)
    reference = model(tokens)
    with lean_attention(model):
        torch.testing.assert_close(model(tokens), reference, atol=1e-4, rtol=0)  # packing rounds differently at d_head=4


# -- fused LayerNorm uses the model's eps (A7) ------------------------------------------------------
@torch.no_grad()
def test_fused_norm_uses_the_models_eps() -> None:
    model = model_(eps=0.5)
    tokens = toks(2, 24)
    reference = model(tokens)
    with lean_attention(model):
        torch.testing.assert_close(model(tokens), reference, atol=1e-4, rtol=1e-4)


# -- probe inputs (IN1, IN2, IN5, IN7) -------------------------------------------------------------
def test_probe_input_recipes() -> None:
    val = torch.arange(200) % 29
    inputs = make_probe_inputs(torch.arange(29), val, 29, repeat_length=4, repeat_batch=2, text_len=12,
                               text_batch_size=3, seed=7)
    assert torch.equal(inputs.text, text_batch(val, 3, 12, torch.Generator().manual_seed(8)))  # seed + 1
    assert torch.equal(text_batch(torch.arange(10), 2, 10, torch.Generator()), torch.arange(10).repeat(2, 1))
    with pytest.raises(ValueError, match=r"token id 10 >= vocab_size=10"):
        make_probe_inputs(None, torch.full((64,), 10), 10, repeat_length=2, repeat_batch=0, text_len=8,
                          text_batch_size=2, seed=0)
    pool = torch.tensor([3, 7, 11, 19])
    out = repeated_tokens(pool, 5, 8, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == set(pool.tolist())  # every pool token can be drawn


@pytest.mark.parametrize("numpy_type", [np.int64, np.int32])
def test_probe_inputs_take_numpy_integers_as_ints(numpy_type: type) -> None:
    """``make_probe_inputs(..., seed=np.int64(0))`` was refused with "seed must be an int, got
    seed=np.int64(0)" (s34): every size and the seed take numpy integers and draw what ints draw."""
    n = numpy_type
    val = torch.arange(200) % 29
    plain = make_probe_inputs(torch.arange(29), val, 29, repeat_length=4, repeat_batch=2, text_len=12,
                              text_batch_size=3, seed=7, min_count=1)
    numpy = make_probe_inputs(torch.arange(29), val, n(29), repeat_length=n(4), repeat_batch=n(2), text_len=n(12),
                              text_batch_size=n(3), seed=n(7), min_count=n(1))
    assert torch.equal(numpy.repeated, plain.repeated) and torch.equal(numpy.text, plain.text)
    for bad in (True, np.True_, 7.0, "7"):
        with pytest.raises(ValueError, match=r"seed must be an int"):
            make_probe_inputs(None, None, 29, repeat_length=4, repeat_batch=0, text_len=12, text_batch_size=0,
                              seed=bad)
        with pytest.raises(ValueError, match=r"text_batch_size must be a non-negative int"):
            make_probe_inputs(None, val, 29, repeat_length=4, repeat_batch=0, text_len=12, text_batch_size=bad,
                              seed=0)
    with pytest.raises(ValueError, match=r"length must be a positive int"):
        make_probe_inputs(torch.arange(29), None, 29, repeat_length=n(0), repeat_batch=1, text_len=12,
                          text_batch_size=0, seed=0)


def test_a_huge_token_id_is_refused_before_the_pool_counts_it() -> None:
    """``torch.bincount`` ran before the range check, so a uint32 memmap with a 0xFFFFFFFF padding sentinel
    tried to allocate 34 GB of counters (s26 configs review): the block's largest id is checked first."""
    import numpy as np

    data = (np.arange(10_000) % 50).astype(np.uint32)
    data[-1] = 0xFFFFFFFF
    with pytest.raises(ValueError, match=r"data holds token id 4294967295 >= vocab_size=64"):
        token_pool_from_data(data, vocab_size=64)
    assert token_pool_from_data(data[:-1], vocab_size=64).tolist() == list(range(50))


# -- nanoGPT converter (C6, C13, B6) ---------------------------------------------------------------
def _gpt(**overrides: Any) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**{**dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, bias=True), **overrides}))
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    return gpt.eval()


def test_converted_key_bias_is_the_key_slice() -> None:
    gpt = _gpt()
    hooked = to_hooked_transformer(gpt)
    b = gpt.transformer.h[0].attn.c_attn.bias.detach()
    torch.testing.assert_close(hooked.blocks[0].attn.b_K, b[16:32].view(2, 8))
    torch.testing.assert_close(hooked.blocks[0].attn.b_Q, b[:16].view(2, 8))


def test_untied_model_without_its_head_or_with_biases_it_lacks_is_refused() -> None:
    untied = _gpt(tie_weights=False)
    sd = {k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ConversionError, match="lm_head.weight"):
        to_hooked_transformer(sd, untied.config)
    with pytest.raises(ConversionError, match=r"unexpected keys.*bias"):
        to_hooked_transformer(_gpt(bias=True).state_dict(), GPTConfig(**{**untied.config.to_dict(), "bias": False}))


# -- check_parity puts a training-mode source in eval mode (PA7) ------------------------------------
def test_check_parity_of_a_training_model_with_dropout() -> None:
    gpt = _gpt(dropout=0.5).train()
    report = check_parity(gpt)
    assert report.ok, str(report)
    assert gpt.training


# -- loss_at_positions: NaN where nothing was decoded (X7) ------------------------------------------
def test_unrequested_loss_positions_are_nan() -> None:
    model, tokens = model_(), toks(2, 12)
    index = torch.tensor([1, 5])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        resid = cache["blocks.1.hook_resid_post"][:, index]
        loss = runner_module.loss_at_positions(model, resid, tokens, index)
    nan = torch.ones(2, 11, dtype=torch.bool)
    nan[:, index] = False
    assert loss.isnan().equal(nan)


# -- a pattern probe on some layers is refused also without validate() (X9) --------------------------
def test_a_reordered_pattern_probe_is_refused_by_run_probe() -> None:
    from lens_callback.probes import InductionProbe
    from lens_callback.probes.runner import run_probe

    class Reversed(InductionProbe):
        name = "reversed_induction"

        def hook_names(self, cfg: Any) -> list[str]:
            return [f"blocks.{layer}.attn.hook_pattern" for layer in reversed(range(cfg.n_layers))]

    with pytest.raises(ValueError, match="reads every layer"):
        run_probe(model_(), Reversed(), toks(2, 8))


def test_the_logit_lens_kl_keeps_float32_accuracy_at_a_gpt2_sized_vocabulary() -> None:
    """One matrix-vector product over rows x 50,304 terms accumulated them one after another: 1e-4
    relative off the float64 value of the same definition (probe-numbers review); torch.sum adds in a tree."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from lens_callback.probes import logit_lens
    from lens_callback.probes.logit_lens import evenly_spaced_positions

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=64, d_head=8, n_heads=2, d_vocab=50304,
                                  act_fn="gelu", normalization_type="LN", initializer_range=0.5, seed=0,
                                  dtype=torch.float64)
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(256, (3, 64), generator=torch.Generator().manual_seed(0))
    got = logit_lens(model, tokens)["kl"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    pos = evenly_spaced_positions(64, 64)

    def logp(resid: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model.unembed(model.ln_final(resid[:, pos])).double(), -1)

    final = logp(cache["blocks.0.hook_resid_post"])
    expected = (final.exp() * (final - logp(cache["blocks.0.hook_resid_pre"]))).sum(-1).mean()
    assert abs(got[0].item() / expected.item() - 1) < 1e-5, (got[0].item(), expected.item())


def test_attention_entropy_refuses_a_bidirectional_model() -> None:
    """The entropy reads keys 0..q of row q (the others are 0 under a causal mask): on a bidirectional
    model it dropped most of each row's mass and returned a wrong number (probe-numbers review)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from lens_callback.probes import attention_entropy

    cfg = dict(n_layers=1, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_vocab=32, act_fn="gelu", seed=0)
    tokens = torch.randint(32, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="'attn_entropy' is defined for causal attention.*'bidirectional'"):
        attention_entropy(HookedTransformer(HookedTransformerConfig(**cfg, attention_dir="bidirectional")), tokens)
    assert attention_entropy(HookedTransformer(HookedTransformerConfig(**cfg)), tokens).shape == (1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_entropy_of_a_half_precision_model_stays_in_range(dtype: torch.dtype) -> None:
    """A uniform head scores 1; on a bfloat16 model it scored 1.00035, its rounded rows summing to more
    than 1 (s26 precision review). Rows are renormalised in float32 first; a random head scores as the
    float32 model does, to the rounding of its weights."""
    from lens_callback.probes import attention_entropy

    cfg = dict(n_layers=1, d_model=16, n_ctx=64, d_head=8, n_heads=2, d_vocab=32, act_fn="gelu",
               normalization_type="LN", seed=0)
    tokens = torch.randint(32, (2, 64), generator=torch.Generator().manual_seed(0))
    full = HookedTransformer(HookedTransformerConfig(**cfg)).eval()
    half = HookedTransformer(HookedTransformerConfig(**cfg, dtype=dtype)).eval()
    half.load_state_dict({k: v.to(dtype) for k, v in full.state_dict().items()})
    assert (attention_entropy(half, tokens) - attention_entropy(full, tokens)).abs().max() < 2e-2
    with torch.no_grad():
        half.blocks[0].attn.W_Q.zero_()  # every score 0: uniform attention over the visible keys
    uniform = attention_entropy(half, tokens)
    assert uniform.max() <= 1 and uniform.min() > 1 - 1e-6, uniform


def test_attention_entropy_refuses_sequences_past_a_sliding_window() -> None:
    """Row q of a sliding-window layer sees min(q + 1, window_size) keys, so past the window dividing by
    log(q + 1) scored a head uniform over what it sees at 0.46, not 1 (probe-numbers review); within the
    window the rows see q + 1 keys and the score is exact (diff review: refusing every such model
    refused GPT-Neo's, Mistral's and Gemma-2's at any probe length)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from lens_callback.probes import attention_entropy
    from lens_callback.probes.attention_entropy import AttentionEntropyProbe
    from lens_callback.probes.runner import ProbeRunner

    cfg = dict(n_layers=2, d_model=16, n_ctx=32, d_head=8, n_heads=2, d_vocab=32, act_fn="gelu", seed=0)
    tokens = torch.randint(32, (2, 16), generator=torch.Generator().manual_seed(0))
    every_global = HookedTransformer(HookedTransformerConfig(**cfg))
    for window, refused in ((4, True), (15, True), (16, False), (32, False)):
        local = HookedTransformer(HookedTransformerConfig(**cfg, use_local_attn=True, window_size=window,
                                                          attn_types=["global", "local"]))
        local.load_state_dict(every_global.state_dict(), strict=False)
        if refused:
            with pytest.raises(ValueError, match=rf"'attn_entropy'.*layers \[1\] attend to the last "
                                                 rf"window_size={window} keys.*16-token sequences"):
                attention_entropy(local, tokens)
            with pytest.raises(ValueError, match=rf"window_size={window}"):  # before training, by the runner
                ProbeRunner([AttentionEntropyProbe()]).validate(local.cfg, repeat_length=8, text_len=16)
        else:
            assert torch.equal(attention_entropy(local, tokens), attention_entropy(every_global, tokens))


# -- hooks the probe forward never fires, and hooks others left on the model (probes review) ------
class _ReadsOneHook(Probe):
    """Records the shapes it sees at the hook point ``hook``."""

    name = "reads_one_hook"
    batch = "text"
    hook = ""

    def hook_names(self, cfg: HookedTransformerConfig) -> list[str]:
        return [self.hook]

    def reset(self, cfg: HookedTransformerConfig, device: torch.device) -> None:
        self.seen: list[tuple[int, ...]] = []

    def on_activation(self, hook_name: str, activation: Tensor, tokens: Tensor) -> None:
        self.seen.append(tuple(activation.shape))

    def compute(self) -> dict[str, Tensor]:
        return {MAIN_KEY: torch.tensor(float(len(self.seen)))}


@pytest.mark.parametrize(("hook", "why"), [
    ("unembed.hook_out", "stops before the unembedding"),
    ("unembed.hook_in", "stops before the unembedding"),
    ("blocks.0.attn.hook_result", r"cfg\.use_attn_result=True"),
    ("blocks.1.hook_attn_in", r"cfg\.use_attn_in=True"),
    ("blocks.0.hook_q_input", r"cfg\.use_split_qkv_input=True"),
    ("blocks.0.hook_mlp_in", r"cfg\.use_hook_mlp_in=True"),
])
def test_a_hook_point_the_probe_forward_never_fires_is_refused_before_the_run(hook: str, why: str) -> None:
    """validate() checked only that the model has the hook point: a probe on unembed.hook_out (the
    forward stops before the unembedding) or on a config-gated one saw nothing and logged NaN."""
    model = model_()
    probe = type("Probe", (_ReadsOneHook,), {"hook": hook})()
    runner = ProbeRunner([probe])
    with pytest.raises(ValueError, match=rf"probe 'reads_one_hook' asks for hook point\(s\) that the probe forward "
                                         rf"never fires.*'{hook}'.*{why}"):
        runner.validate(model.cfg, repeat_length=8, text_len=16, hook_points=model.hook_dict)
    with pytest.raises(ValueError, match="never fires"):
        runner.run(model, ProbeInputs(repeated=None, text=toks(2, 16)))


def test_a_config_gated_hook_point_is_accepted_where_its_flag_is_on() -> None:
    model = model_()
    model.set_use_attn_result(True)
    probe = type("Probe", (_ReadsOneHook,), {"hook": "blocks.0.attn.hook_result"})()
    ProbeRunner([probe]).validate(model.cfg, repeat_length=8, text_len=16, hook_points=model.hook_dict)
    ProbeRunner([probe]).run(model, ProbeInputs(repeated=None, text=toks(2, 16)))
    assert probe.seen == [(2, 16, 2, 16)]  # [batch, pos, head, d_model]


def test_a_hook_on_the_unembedding_acts_on_the_probes_losses_as_on_model_tokens() -> None:
    """final_logits decoded with W_U directly: a temperature hook on unembed.hook_out changed model(tokens)'s
    loss, not the probes'."""
    model = model_()
    rep = torch.cat([toks(4, 8), toks(4, 8)], dim=1)
    plain = repeated_loss(model, rep)
    model.add_hook("unembed.hook_out", lambda logits, hook: logits * 3.0)
    with torch.no_grad():
        expected = model(rep, return_type="loss", loss_per_token=True)[:, 8:].mean()
    got = repeated_loss(model, rep)
    assert not torch.allclose(got, plain) and torch.allclose(got, expected, rtol=1e-5)
    # the hook sees [batch, pos, d_vocab]-shaped rows and keeps its tensor: the loss's in-place
    # log-softmax wrote into what a caching hook kept (diff review)
    model.reset_hooks()
    kept: list[Tensor] = []
    model.add_hook("unembed.hook_out", lambda logits, hook: kept.append(logits))
    model.add_hook("unembed.hook_out", lambda logits, hook: logits.index_fill(-1, torch.tensor([0]), -1e9))
    masked = repeated_loss(model, rep)
    assert all(t.dim() == 3 for t in kept) and float(kept[0].logsumexp(-1).abs().min()) > 1e-3  # logits, not log-probs
    with torch.no_grad():
        assert torch.allclose(masked, model(rep, return_type="loss", loss_per_token=True)[:, 8:].mean(), rtol=1e-5)
    logit_lens(model, toks(2, 16))  # the lens's [entries, rows, d_model] decodes pass through the hooks too


@pytest.mark.parametrize("fused", [False, True], ids=["built", "fused"])
def test_a_hook_left_on_the_model_keeps_its_own_layers_activation(monkeypatch: pytest.MonkeyPatch,
                                                                  fused: bool) -> None:
    """On the CPU the probe run writes activations into reused buffers, which a probe knows it borrows;
    a caching hook someone left on the model (model.add_hook) kept layer 0's pattern and MLP output,
    and read layer 1's after the run."""
    monkeypatch.setattr(attention_module, "FUSED_ATTENTION", fused)
    model = model_()
    rep = torch.cat([toks(2, 8), toks(2, 8)], dim=1)
    _, cache = model.run_with_cache(rep)
    kept: dict[str, Tensor] = {}
    names = [f"blocks.{layer}.{point}" for layer in (0, 1) for point in ("attn.hook_pattern", "mlp.hook_post")]
    for name in names:
        model.add_hook(name, lambda activation, hook: kept.__setitem__(hook.name, activation))
    induction_score(model, rep)
    for name in names:
        torch.testing.assert_close(kept[name], cache[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_diagonal_that_starts_before_it_looks_back_is_refused() -> None:
    """A DiagonalAttentionProbe with first < back summed fewer positions than it divided by."""
    class TwoBack(DiagonalAttentionProbe):
        name = "two_back"
        batch = "text"

        def diagonal(self, seq_len: int) -> tuple[int, int]:
            return 2, 1

    with pytest.raises(ValueError, match=r"probe 'two_back': diagonal\(10\) = \(back=2, first=1\) must satisfy "
                                         r"0 <= back <= first < seq_len = 10"):
        run_probe(model_(), TwoBack(), toks(2, 10))
