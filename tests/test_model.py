"""``GPTConfig`` and ``GPT``: logit parity with references written here from raw tensors, loading, init, API."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogpt_model import GPT, GPTConfig, strip_wrapper_prefixes, unwrap_model
from nanogpt_model.model import rotary_tables

VOCAB, BLOCK = 37, 24


# -- independent reference forwards (float64, from the raw state dict only) -----------------------
def _linear(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    y = x @ sd[f"{name}.weight"].T
    bias = sd.get(f"{name}.bias")
    return y if bias is None else y + bias


def _layer_norm(x: Tensor, sd: dict[str, Tensor], name: str, eps: float) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance, as LayerNorm
    y = (x - mu) / torch.sqrt(var + eps) * sd[f"{name}.weight"]
    bias = sd.get(f"{name}.bias")
    return y if bias is None else y + bias


def _rms_norm(x: Tensor, sd: dict[str, Tensor], name: str, eps: float) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * sd[f"{name}.weight"]


def _gelu(x: Tensor, variant: str) -> Tensor:
    if variant == "exact":  # nn.GELU() default: x * Phi(x)
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention written out: ``(B, nh, T, hs) -> (B, nh, T, hs)``."""
    T = q.size(-2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return weights @ v


def _rotate(x: Tensor, base: float, convention: str) -> Tensor:
    """Rotary embedding of ``(B, nh, T, hs)``; ``"neox"`` pairs dim ``i`` with ``i + hs/2``."""
    T, hs = x.shape[-2:]
    inv_freq = 1.0 / base ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    theta = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, hs/2)
    cos, sin = theta.cos(), theta.sin()
    if convention == "neox":
        x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # GPT-J interleaved pairs (the wrong convention here)
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def _n_layer(sd: dict[str, Tensor]) -> int:
    return 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))


def reference_forward(
    state_dict: dict[str, Tensor],
    idx: Tensor,
    n_head: int,
    *,
    architecture: str = "gpt2",
    tie: bool = True,
    eps: float = 1e-5,
    rotary_base: float = 10000.0,
    gelu: str = "exact",
    rotary: str = "neox",
) -> Tensor:
    """Logits at every position, computed in float64 from nanoGPT-named tensors."""
    sd = {k: v.double() for k, v in state_dict.items()}
    B, T = idx.shape
    norm = _layer_norm if architecture == "gpt2" else _rms_norm
    x = sd["transformer.wte.weight"][idx]  # (B, T, C)
    if architecture == "gpt2":
        x = x + sd["transformer.wpe.weight"][:T]
    C = x.size(-1)
    for i in range(_n_layer(sd)):
        p = f"transformer.h.{i}"
        h = norm(x, sd, f"{p}.ln_1", eps)
        q, k, v = (
            t.reshape(B, T, n_head, C // n_head).transpose(1, 2)
            for t in _linear(h, sd, f"{p}.attn.c_attn").split(C, dim=-1)
        )
        if architecture == "modern":
            q, k = _rotate(q, rotary_base, rotary), _rotate(k, rotary_base, rotary)
        y = _causal_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + _linear(y, sd, f"{p}.attn.c_proj")
        h = norm(x, sd, f"{p}.ln_2", eps)
        if architecture == "modern":
            gate = _linear(h, sd, f"{p}.mlp.c_gate")
            hidden = gate * torch.sigmoid(gate) * _linear(h, sd, f"{p}.mlp.c_fc")  # silu(gate) * up
        else:
            hidden = _gelu(_linear(h, sd, f"{p}.mlp.c_fc"), gelu)
        x = x + _linear(hidden, sd, f"{p}.mlp.c_proj")
    x = norm(x, sd, "transformer.ln_f", eps)
    unembed = sd["transformer.wte.weight"] if tie else sd["lm_head.weight"]
    return x @ unembed.T


def random_state_dict(
    n_layer: int, n_embd: int, *, architecture: str = "gpt2", bias: bool = True, tie: bool = True,
    hidden: int | None = None, mask_buffers: bool = False, seed: int = 0,
) -> dict[str, Tensor]:
    """A state dict in nanoGPT's key layout with O(1) logits, so that small numeric errors show.

    ``mask_buffers`` adds nanoGPT's non-flash ``attn.bias`` causal-mask buffers (1, 1, T, T).
    """
    gen = torch.Generator().manual_seed(seed)
    C = n_embd
    H = hidden or 4 * C

    def rnd(*shape: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    def linear(name: str, fan_out: int, fan_in: int, with_bias: bool = bias) -> None:
        sd[f"{name}.weight"] = rnd(fan_out, fan_in, std=fan_in**-0.5)
        if with_bias:
            sd[f"{name}.bias"] = rnd(fan_out, std=0.1)

    def norm(name: str) -> None:
        sd[f"{name}.weight"] = rnd(C, std=0.2, mean=1.0)
        if bias:
            sd[f"{name}.bias"] = rnd(C, std=0.1)

    sd: dict[str, Tensor] = {"transformer.wte.weight": rnd(VOCAB, C, std=0.5)}
    if architecture == "gpt2":
        sd["transformer.wpe.weight"] = rnd(BLOCK, C, std=0.5)
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        norm(f"{p}.ln_1")
        if mask_buffers:
            sd[f"{p}.attn.bias"] = torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK)
        linear(f"{p}.attn.c_attn", 3 * C, C)
        linear(f"{p}.attn.c_proj", C, C)
        norm(f"{p}.ln_2")
        linear(f"{p}.mlp.c_fc", H, C)
        if architecture == "modern":
            linear(f"{p}.mlp.c_gate", H, C, with_bias=False)
        linear(f"{p}.mlp.c_proj", C, H)
    norm("transformer.ln_f")
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if tie else rnd(VOCAB, C, std=0.5)
    return sd


def _tokens(batch: int, length: int, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _all_logits(model: GPT, idx: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        logits, loss = model(idx, all_positions=True)
    assert loss is None
    return logits


# -- logit parity ---------------------------------------------------------------------------------
GPT2_SIZES = [(1, 1, 8), (2, 4, 32), (3, 3, 48)]  # (n_layer, n_head, n_embd)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("n_layer", "n_head", "n_embd"), GPT2_SIZES)
def test_gpt2_matches_reference(n_layer: int, n_head: int, n_embd: int, bias: bool, tie: bool) -> None:
    config = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       bias=bias, tie_weights=tie)
    sd = random_state_dict(n_layer, n_embd, bias=bias, tie=tie, mask_buffers=True, seed=n_embd)
    model = GPT(config)
    model.load_nanogpt_state_dict(sd)
    for length in (BLOCK, 7):
        idx = _tokens(3, length)
        expected = reference_forward(sd, idx, n_head, tie=tie)
        assert expected.abs().max() > 1.0  # logits of order one: an architectural slip cannot hide
        torch.testing.assert_close(_all_logits(model, idx).double(), expected, rtol=1e-5, atol=1e-5)


MODERN_CASES = [  # (n_layer, n_head, n_embd, mlp_hidden, rotary_base, tie)
    (1, 2, 16, None, 10000.0, True),
    (2, 4, 32, None, 10000.0, False),
    (2, 2, 24, 40, 100.0, True),
]


@pytest.mark.parametrize(("n_layer", "n_head", "n_embd", "mlp_hidden", "base", "tie"), MODERN_CASES)
def test_modern_matches_reference(
    n_layer: int, n_head: int, n_embd: int, mlp_hidden: int | None, base: float, tie: bool
) -> None:
    config = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       bias=False, architecture="modern", tie_weights=tie, mlp_hidden=mlp_hidden,
                       rotary_base=base)
    sd = random_state_dict(n_layer, n_embd, architecture="modern", bias=False, tie=tie,
                           hidden=config.hidden_size, seed=n_embd)
    model = GPT(config)
    model.load_state_dict(sd)
    for length in (BLOCK, 5):
        idx = _tokens(2, length)
        expected = reference_forward(sd, idx, n_head, architecture="modern", tie=tie, rotary_base=base)
        torch.testing.assert_close(_all_logits(model, idx).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("architecture", "variant"), [("gpt2", {"gelu": "tanh"}), ("modern", {"rotary": "gptj"})]
)
def test_reference_comparison_detects_a_wrong_variant(architecture: str, variant: dict[str, str]) -> None:
    """The parity tests can fail: the tanh GELU or the GPT-J rotary convention is caught at these scales."""
    bias = architecture == "gpt2"
    config = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, bias=bias,
                       architecture=architecture)  # type: ignore[arg-type]
    sd = random_state_dict(2, 32, architecture=architecture, bias=bias, hidden=config.hidden_size)
    model = GPT(config)
    model.load_state_dict(sd)
    idx = _tokens(2, BLOCK)
    wrong = reference_forward(sd, idx, 4, architecture=architecture, **variant)
    assert (_all_logits(model, idx).double() - wrong).abs().max() > 1e-3


def test_mlp_hidden_defaults() -> None:
    assert GPTConfig(n_embd=128, n_head=4).hidden_size == 512
    assert GPTConfig(n_embd=768, n_head=12, architecture="modern", bias=False).hidden_size == 2048
    assert GPTConfig(n_embd=128, n_head=4, architecture="modern", bias=False).hidden_size == 384  # 341.3 -> 384
    assert GPTConfig(n_embd=128, n_head=4, mlp_hidden=100).hidden_size == 100


# -- loading nanoGPT state dicts ------------------------------------------------------------------
def test_load_accepts_wrapper_prefixes_and_drops_mask_buffers_without_mutating_input() -> None:
    config = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16)
    clean = random_state_dict(2, 16, seed=3)
    raw = random_state_dict(2, 16, seed=3, mask_buffers=True)
    prefixes = ["_orig_mod.", "module.", "module._orig_mod.", ""]
    wrapped = {prefixes[i % len(prefixes)] + k: v for i, (k, v) in enumerate(raw.items())}
    before = [(k, v, v.clone()) for k, v in wrapped.items()]

    stripped = strip_wrapper_prefixes(wrapped)
    assert stripped is not wrapped
    assert set(stripped) == set(clean)
    assert all(torch.equal(stripped[k], clean[k]) for k in clean)

    model, reference = GPT(config), GPT(config)
    model.load_nanogpt_state_dict(wrapped)
    reference.load_state_dict(clean)
    idx = _tokens(2, BLOCK)
    torch.testing.assert_close(_all_logits(model, idx), _all_logits(reference, idx), rtol=0, atol=0)

    assert list(wrapped) == [k for k, _, _ in before]  # nothing popped, renamed or added
    for key, tensor, copy in before:
        assert wrapped[key] is tensor and torch.equal(tensor, copy)


def test_load_checks_the_key_set_exactly() -> None:
    config = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16)
    sd = random_state_dict(1, 16)
    missing = {k: v for k, v in sd.items() if k != "transformer.h.0.mlp.c_fc.bias"}
    with pytest.raises(RuntimeError, match="mlp.c_fc.bias"):
        GPT(config).load_nanogpt_state_dict(missing)
    with pytest.raises(RuntimeError, match="transformer.h.1.ln_1.weight"):
        GPT(config).load_nanogpt_state_dict({**sd, "transformer.h.1.ln_1.weight": torch.ones(16)})


def test_unwrap_model_sees_through_torch_compile() -> None:
    model = GPT(GPTConfig(block_size=8, vocab_size=VOCAB, n_layer=1, n_head=1, n_embd=8))
    assert unwrap_model(model) is model
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    assert unwrap_model(torch.compile(model)) is model  # wrapping compiles nothing until called


# -- config validation ----------------------------------------------------------------------------
_BASE = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_head": -2}, "n_head"),
        ({"block_size": 0}, "block_size"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"n_embd": 0}, "n_embd"),
        ({"n_layer": True}, "n_layer"),
        ({"vocab_size": 64.0}, "vocab_size"),
        ({"mlp_hidden": 0}, "mlp_hidden"),
        ({"mlp_hidden": True}, "mlp_hidden"),
        ({"mlp_hidden": 40.5}, "mlp_hidden"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"norm_eps": float("nan")}, "norm_eps"),  # every logit NaN (model review)
        ({"norm_eps": float("inf")}, "norm_eps"),  # every logit alike
        ({"architecture": "llama"}, "architecture"),
        ({"architecture": "modern", "bias": True}, "bias"),
        ({"architecture": "modern", "bias": False, "n_embd": 18, "n_head": 6}, "n_embd/n_head"),
        ({"architecture": "modern", "bias": False, "rotary_base": 0.0}, "rotary_base"),
        ({"architecture": "modern", "bias": False, "rotary_base": float("nan")}, "rotary_base"),
        ({"architecture": "modern", "bias": False, "rotary_base": float("inf")}, "rotary_base"),
    ],
)
def test_invalid_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("/", ".")):
        GPTConfig(**{**_BASE, **overrides})


def test_from_dict_rejects_unknown_fields_and_round_trips() -> None:
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_dict({**_BASE, "n_layers": 3})
    config = GPTConfig(**_BASE, architecture="modern", bias=False, mlp_hidden=48)
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_layer = 3  # type: ignore[misc]


def test_gpt_rejects_a_plain_dict() -> None:
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(_BASE)  # type: ignore[arg-type]


# -- initialisation -------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["gpt2", "modern"])
def test_nanogpt_init(architecture: str) -> None:
    n_layer = 4
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=n_layer, n_head=4, n_embd=256,
                       bias=architecture == "gpt2", architecture=architecture)  # type: ignore[arg-type]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT(config)
    scaled = 0.02 / math.sqrt(2 * n_layer)
    seen_proj = 0
    for name, param in model.named_parameters():
        data = param.detach()
        if name.endswith("c_proj.weight"):
            seen_proj += 1
            assert data.std().item() == pytest.approx(scaled, rel=0.1), name
            assert abs(data.mean().item()) < 0.1 * scaled, name
        elif data.dim() == 2:  # other Linear and Embedding weights
            assert data.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(data) == 0, name
        else:  # LayerNorm / RMSNorm gains
            assert torch.all(data == 1.0), name
    assert seen_proj == 2 * n_layer
    assert model.lm_head.weight is model.transformer.wte.weight


def _nanogpt_init_sequence(c: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Karpathy's ``GPT.__init__`` replayed as raw draws from the global RNG: construction in module
    order (``wte, wpe, drop, h, ln_f, lm_head``; ``nn.Linear``'s kaiming-uniform weight and uniform
    bias, ``nn.Embedding``'s normal weight), then ``self.apply(_init_weights)`` (children before
    parents, tied ``wte``/``lm_head`` drawn twice), then the scaled ``c_proj`` weights."""
    d, h = c.n_embd, c.hidden_size
    shapes = {"transformer.wte.weight": (c.vocab_size, d), "transformer.wpe.weight": (c.block_size, d)}
    linears = []  # (name, out, in) in construction order
    for i in range(c.n_layer):
        linears += [(f"transformer.h.{i}.attn.c_attn", 3 * d, d), (f"transformer.h.{i}.attn.c_proj", d, d),
                    (f"transformer.h.{i}.mlp.c_fc", h, d), (f"transformer.h.{i}.mlp.c_proj", d, h)]
    out: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for name in shapes:  # construction: embeddings first, then every Linear (the lm_head last)
            out[name] = torch.empty(shapes[name]).normal_()
        for name, n_out, n_in in [*linears, ("lm_head", c.vocab_size, d)]:
            weight = torch.empty(n_out, n_in)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            if c.bias and name != "lm_head":
                nn.init.uniform_(torch.empty(n_out), -1 / math.sqrt(n_in), 1 / math.sqrt(n_in))
        for name in shapes:  # apply(_init_weights), in the same order
            out[name] = torch.empty(shapes[name]).normal_(0.0, 0.02)
        for name, n_out, n_in in linears:
            out[f"{name}.weight"] = torch.empty(n_out, n_in).normal_(0.0, 0.02)
        out["transformer.wte.weight"] = torch.empty(c.vocab_size, d).normal_(0.0, 0.02)  # lm_head, tied
        for name, n_out, n_in in linears:
            if name.endswith("c_proj"):
                out[f"{name}.weight"] = torch.empty(n_out, n_in).normal_(0.0, 0.02 / math.sqrt(2 * c.n_layer))
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_the_same_seed_gives_nanogpts_initial_weights(bias: bool) -> None:
    """Bitwise: the modules are made and initialised in nanoGPT's order (``wpe`` right after ``wte``)."""
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, bias=bias)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        state = GPT(config).state_dict()
    expected = _nanogpt_init_sequence(config, seed=3)
    assert list(state)[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_crop_block_size_keeps_the_function_on_shorter_inputs() -> None:
    """nanoGPT's ``crop_block_size``: the same logits on the first positions, a shorter context after."""
    for architecture in ("gpt2", "modern"):
        config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16, architecture=architecture,
                           bias=architecture == "gpt2")
        model = GPT(config).eval()
        idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        before = _all_logits(model, idx)
        model.crop_block_size(12)
        assert model.config.block_size == 12 and config.block_size == 32  # a new config
        torch.testing.assert_close(_all_logits(model, idx), before, rtol=0, atol=0)
        with pytest.raises(ValueError, match="block size is only 12"):
            model(torch.zeros(1, 13, dtype=torch.long))
        fresh = GPT(model.config)  # the cropped state dict fits a model made at the new size
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(_all_logits(fresh.eval(), idx), before, rtol=0, atol=0)
    for bad in (0, 13, True, 4.0):
        with pytest.raises(ValueError, match="block_size"):
            model.crop_block_size(bad)  # type: ignore[arg-type]


def test_estimate_mfu_is_nanogpts_formula() -> None:
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    n = model.get_num_params()
    flops = (6 * n + 12 * 2 * 2 * 8 * 32) * 32 * 4  # per token x tokens x sequences
    assert model.estimate_mfu(4, 0.5) == pytest.approx(flops / 0.5 / 312e12)
    assert model.estimate_mfu(4, 0.5, peak_flops=1e12) == pytest.approx(flops / 0.5 / 1e12)


def test_get_num_params_is_nanogpts_hand_counted_total() -> None:
    """Mutation review: a ``get_num_params`` that ignored ``non_embedding`` passed, the MFU test above reading
    the count it checks. Counted by hand: wte 64x16 = 1024, wpe 16x16 = 256, per block LN 2x32, c_attn
    16x48 + 48, c_proj 256 + 16, c_fc 16x64 + 64, c_proj 64x16 + 16 (3280), ln_f 32, lm_head tied: 7872,
    7616 without wpe. The modern model (no wpe, no biases, RMSNorm gains, c_gate) has 9296 either way."""
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, bias=True))
    assert (model.get_num_params(non_embedding=False), model.get_num_params()) == (7872, 7616)
    modern = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, bias=False,
                           architecture="modern"))
    assert (modern.get_num_params(non_embedding=False), modern.get_num_params()) == (9296, 9296)


def test_untied_weights_are_separate_parameters(tiny_config: Callable[..., GPTConfig]) -> None:
    model = GPT(tiny_config(tie_weights=False))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert len(list(model.parameters())) == len(model.state_dict())


# -- forward / generate / optimiser contract ------------------------------------------------------
def test_forward_contract(tiny_config: Callable[..., GPTConfig]) -> None:
    config = tiny_config()
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(idx, -1, dims=1)
    targets[0, :4] = -1  # ignored positions, as nanoGPT's ignore_index=-1
    with torch.no_grad():
        logits, loss = model(idx, targets)
        assert logits.shape == (3, 10, config.vocab_size)
        assert loss is not None and loss.dim() == 0
        keep = targets.view(-1) != -1
        expected = F.cross_entropy(logits.view(-1, config.vocab_size)[keep], targets.view(-1)[keep])
        torch.testing.assert_close(loss, expected)

        last, no_loss = model(idx)
        assert no_loss is None and last.shape == (3, 1, config.vocab_size)
        every, _ = model(idx, all_positions=True)
        assert every.shape == (3, 10, config.vocab_size)
        torch.testing.assert_close(last, every[:, -1:])
        torch.testing.assert_close(every, logits)

        with pytest.raises(ValueError, match="block size"):
            model(torch.zeros(1, config.block_size + 1, dtype=torch.long))


def test_generate_uses_only_its_generator(tiny_config: Callable[..., GPTConfig]) -> None:
    config = tiny_config()
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, config.block_size - 2), generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    out = model.generate(idx, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    again = model.generate(idx, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert out.shape == (2, config.block_size + 4)  # longer than block_size: the context is cropped
    assert torch.equal(out[:, : idx.size(1)], idx)
    assert torch.equal(out, again)
    greedy = model.generate(idx, 1, top_k=1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(greedy[:, -1], model(idx)[0][:, -1].argmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 1, temperature=0.0)


def test_generate_past_block_size_conditions_on_the_last_block_size_tokens(
    tiny_config: Callable[..., GPTConfig],
) -> None:
    """Mutation review: a ``generate`` that cropped a long context to its first ``block_size`` tokens instead
    of its last passed the test above, which checks only shapes and determinism there. Each draw past
    ``block_size`` is ``multinomial(softmax(logits))`` of the model on the last ``block_size`` tokens
    (nanoGPT's ``idx[:, -block_size:]``), with the same generator. Sampled, untied and with a sharpened
    output layer: at init a tied model's greedy choice is its last input token under either crop, and its
    near-uniform distributions give the same draw under either."""
    config = tiny_config(tie_weights=False)
    model = GPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    idx = torch.randint(0, config.vocab_size, (4, config.block_size - 1), generator=torch.Generator().manual_seed(0))
    out = model.generate(idx, 6, generator=torch.Generator().manual_seed(1))
    expected, generator = idx, torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(6):
            logits = model(expected[:, -config.block_size :])[0][:, -1]
            draw = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            expected = torch.cat([expected, draw], dim=1)
    assert torch.equal(out, expected)


def test_generate_samples_from_the_softmax_of_the_logits_over_the_temperature(
    tiny_config: Callable[..., GPTConfig],
) -> None:
    """Mutation review: a ``generate`` that multiplied the logits by the temperature instead of dividing passed
    (the tests used a temperature only for determinism). A draw is ``multinomial(softmax(logits / T))`` with
    the same generator, nanoGPT's sampling; at T = 0.05 and T = 20 the two formulas are far apart."""
    config = tiny_config()
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0)).expand(64, 6)
    with torch.no_grad():
        logits = model(idx)[0][:, -1]
    for temperature in (0.05, 20.0):
        probs = F.softmax(logits / temperature, dim=-1)
        expected = torch.multinomial(probs, num_samples=1, generator=torch.Generator().manual_seed(3))
        out = model.generate(idx, 1, temperature=temperature, generator=torch.Generator().manual_seed(3))
        assert torch.equal(out[:, -1:], expected), temperature


@pytest.mark.parametrize(
    "overrides", [{}, {"bias": False}, {"tie_weights": False}, {"architecture": "modern"}],
    ids=["gpt2", "nobias", "untied", "modern"],
)
def test_optim_groups_partition_parameters(tiny_config: Callable[..., GPTConfig], overrides: dict) -> None:
    model = GPT(tiny_config(**overrides))
    decay, no_decay = model.optim_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert len(ids) == len(set(ids))  # no parameter twice (the tied weight included)
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) > 0


def test_modern_rotary_tables_stay_float32_under_bf16() -> None:
    """``model.to(bfloat16)`` rounds every floating buffer; the rotary tables are made anew in fp32, and
    casting back to float32 leaves no rounded table behind (it did: 2.2e-4 of the logits; modern review)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=100, n_layer=1, n_head=4, n_embd=64, architecture="modern", bias=False)
    model = GPT(config).eval()
    tokens = torch.randint(0, 100, (2, 64))
    with torch.no_grad():
        before = model(tokens)[0]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.to(torch.bfloat16)
        attn = model.transformer.h[0].attn
        cos, sin = rotary_tables(config.head_size, config.block_size, config.rotary_base)
        assert attn.rotary_cos.dtype == torch.float32
        torch.testing.assert_close(attn.rotary_cos, cos, atol=0, rtol=0)
        torch.testing.assert_close(attn.rotary_sin, sin, atol=0, rtol=0)
        model(tokens)
        model.float().load_state_dict(state)  # only the tables went through bfloat16
        assert torch.equal(model(tokens)[0], before)


def test_rotary_tables_made_anew_in_inference_mode_still_train_and_a_quantized_model_moves() -> None:
    """`_apply` made the tables anew inside an ``inference_mode`` helper's ``model.to(device)``: inference
    tensors, which the next training step could not save for backward; and it read ``c_attn.weight``,
    a method of a dynamically quantized Linear (diff review)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32, architecture="modern", bias=False)
    model = GPT(config)
    tokens = torch.randint(0, 64, (2, 16))
    with torch.inference_mode():
        model.to("cpu").eval()(tokens)
    assert not model.transformer.h[0].attn.rotary_cos.is_inference()
    model.train()(tokens, tokens)[1].backward()
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None:  # deprecated since torch 2.10 (torchao's now), to be removed
        pytest.skip("this torch has no torch.ao.quantization.quantize_dynamic")
    quantized = quantize_dynamic(GPT(config).eval(), {torch.nn.Linear}, dtype=torch.qint8)
    assert quantized.to("cpu")(tokens)[0].shape == (2, 1, 64)


def test_a_modern_model_built_on_the_meta_device_gets_its_rotary_tables() -> None:
    """``to_empty`` after a meta-device build (Lightning's empty_init) left the non-persistent tables
    uninitialised, and ``load_state_dict`` does not fill them: NaN or garbage logits (modern review)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_embd=64, architecture="modern", bias=False)
    model = GPT(config).eval()
    with torch.device("meta"):
        empty = GPT(config)
    empty.to_empty(device="cpu").load_state_dict(model.state_dict())
    tokens = torch.randint(0, 100, (2, 64))
    with torch.no_grad():
        assert torch.equal(empty.eval()(tokens)[0], model(tokens)[0])
    # load_state_dict(assign=True) leaves the tables meta: a move made them no data to copy, and a first
    # forward under inference mode made them inference tensors that training cannot save (diff review)
    for first in ("move", "inference forward"):
        with torch.device("meta"):
            assigned = GPT(config)
        assigned.load_state_dict(model.state_dict(), assign=True)
        if first == "move":
            assigned.to("cpu")
        with torch.inference_mode():
            assert torch.equal(assigned.eval()(tokens)[0], model(tokens)[0])
        assigned.train()(tokens, tokens)[1].backward()
    # and compiled (inference_mode(False) had no effect in a compiled forward), and moves under a meta
    # default device, where the tables were made on meta with no data to copy (diff review)
    with torch.device("meta"):
        assigned = GPT(config)
        model.to("cpu").float()
    assigned.load_state_dict(model.state_dict(), assign=True)
    compiled = torch.compile(assigned, backend="aot_eager")
    with torch.inference_mode():
        compiled.eval()(tokens)
    compiled.train()(tokens, tokens)[1].backward()


def test_a_modern_model_built_under_a_float64_default_has_float64_tables_and_compiles_whole() -> None:
    """Its tables were float32 beside float64 weights, so the first forward remade them, which a
    ``fullgraph=True`` compile cannot do (diff review)."""
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32, architecture="modern", bias=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = GPT(config)
    finally:
        torch.set_default_dtype(default)
    attention = model.transformer.h[0].attn
    assert attention.rotary_cos.dtype == attention.rotary_precision == torch.float64
    tokens = torch.randint(0, 64, (2, 16))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(tokens, tokens)[1], model(tokens, tokens)[1])


def test_a_modern_model_built_on_the_meta_device_does_no_arithmetic() -> None:
    """The converter builds a GPT on meta for its expected shapes; its rotary tables were computed on the
    CPU and moved to meta (6 GiB allocated for a 32-layer 128k-context model; diff review)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OnCpu(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            self.calls += any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in [out])
            return out

    config = GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_embd=64, architecture="modern", bias=False)
    with OnCpu() as counted, torch.device("meta"):
        model = GPT(config)
        model.double()
    assert counted.calls == 0 and model.transformer.h[0].attn.rotary_cos.is_meta
