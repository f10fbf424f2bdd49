"""``check_parity``: does a converter's ``HookedTransformer`` compute what the source model computes?

It compares logits on random tokens and, to find a wrong mapping fast, the residual stream after the
embedding and after every block (forward hooks on the source model's blocks against TransformerLens's
``blocks.{i}.hook_resid_pre`` / ``hook_resid_post``). The first site whose difference exceeds the
tolerance is where the mapping goes wrong. Both run on the model's weights perturbed by noise
(`perturbed`, which `LensCallback`'s own parity check uses too): at initialisation biases are zeros
and norm gains ones, where a dropped or swapped one computes the same function.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, cast

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lens_callback.convert.base import (
    ConversionError,
    Converter,
    NotLogitsError,
    are_logits_for,
    build_hooked_transformer,
    check_runs,
    describe_output,
    effective_state_dict,
    get_converter,
    infer_converter,
    meta_skeleton,
    source_logits_call,
    unwrap_module,
)
from lens_callback.schedule import finite_non_negative, integer_or_none


PARITY_FEW_TOKENS = 8
"""A few tokens per sequence, for the parity check after ``model(tokens)`` failed at its length: what it retries
at where the probes read no batch (weights only) and give no length of their own, and what tells a model that
fails on long sequences only (a context shorter than the converter's ``n_ctx``) from one that fails on any."""


def runs_on_a_few_tokens(run: Callable[[Tensor], Any], tokens: Tensor) -> int | None:
    """After a source model failed on ``tokens``: the number of their first tokens, `PARITY_FEW_TOKENS` or
    fewer (fewer than all), it runs on, or ``None`` if it fails there too (not a matter of length) or
    ``tokens`` are too short to try. What tells a context shorter than the converter's ``n_ctx`` from a
    model that fails on any length, in both parity checks."""
    few = min(PARITY_FEW_TOKENS, tokens.shape[1] - 1)
    if few < 1:
        return None
    try:
        run(tokens[:, :few])
    except Exception:  # noqa: BLE001 - not a matter of length: the caller's first error is the reason
        return None
    return few


def _raise_if_too_long(err: Exception, run: Callable[[Tensor], Any], tokens: Tensor, name: str, n_ctx: int,
                       seq_len_given: bool, tokens_given: bool) -> None:
    """After the source model raised ``err`` on ``tokens``: raises `ConversionError` naming the length and
    where it came from if the model runs on `PARITY_FEW_TOKENS` of them, as `LensCallback`'s check does
    (`check_parity` raised the model's own error, e.g. a rotary table's "shape '[1, 256, 1, 8]' is invalid",
    for a converter whose ``n_ctx`` exceeds the model's context: journey review); returns otherwise, for
    the caller to raise ``err`` (not a matter of length)."""
    length = tokens.shape[1]
    few = runs_on_a_few_tokens(run, tokens)
    if few is None:
        return
    source = ("the tokens given" if tokens_given else f"seq_len={length}" if seq_len_given else
              f"min(n_ctx, 512) tokens, and converter {name!r} gives n_ctx={n_ctx}")
    raise ConversionError(
        f"check_parity: the model fails on {length}-token sequences ({type(err).__name__}: {err}) but runs on "
        f"{few}: it ran {source}. If the model's context is shorter, give its length as n_ctx in model_config (the "
        f"probes read up to n_ctx tokens, and LensCallback's check stops the run the same way), or pass seq_len= to "
        f"compare fewer positions") from err


def _is_half(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dtype in (torch.bfloat16, torch.float16)


class HalfPrecisionOutputs(TorchDispatchMode):
    """Notes whether any operator run under it cast into half precision: returned a float16/bfloat16
    tensor from inputs of which none was (an autocast inside the model's forward, not a half-precision
    buffer's use). Such a model computes in half precision whatever its parameters are, and its parity
    tolerance is `PARITY_RTOL_LOW_PRECISION`."""

    def __init__(self) -> None:
        super().__init__()
        self.half_precision = False
        self.watched = True  # False once a forward ran unwatched (`call`)

    @property
    def may_be_half(self) -> bool:
        """Whether the watched forward cast into half precision, or may have: one that ran unwatched
        (`call`) is given the benefit of the doubt, the low-precision tolerance."""
        return self.half_precision or not self.watched

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.note(out, args, kwargs)
        return out

    def note(self, out: Any, args: Any, kwargs: Any) -> None:
        if not self.half_precision:
            self.half_precision = (any(_is_half(t) for t in pytree.tree_leaves(out))
                                   and not any(_is_half(t) for t in pytree.tree_leaves((args, kwargs or {}))))

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` watched. A forward that cannot run under a Python dispatch mode (a higher-order
        operator such as ``flex_attention`` refuses one) runs again under a torch-function mode, which
        sees casts at the level of Python calls (not inside a higher-order operator's body, e.g. a
        ``torch.cond`` branch); one that cannot run under that either runs unwatched, and
        `may_be_half` says so (``watched`` is False)."""
        for mode in (self, _FunctionWatch(self)):
            try:
                with mode:
                    return fn()
            except NotImplementedError as err:  # torch 2.6 says "no rule registered for HOP flex_attention"
                if not re.search(r"HigherOrderOperator|\bHOP\b", str(err)):
                    raise
            self.half_precision = False
        self.watched = False
        return fn()


class _FunctionWatch(TorchFunctionMode):
    """`HalfPrecisionOutputs`' watch at the torch-function level (higher-order operators such as
    ``flex_attention`` take a torch-function mode, not a Python dispatch mode)."""

    def __init__(self, watch: HalfPrecisionOutputs) -> None:
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        watch = self.watch
        # the dispatch rule (`HalfPrecisionOutputs.note`), with what differs at this level: a cast whose dtype
        # a half tensor names (x.to(bf16_buffer), x.type_as(...)) is one; a constant made from Python data
        # (torch.tensor(c, dtype=bf16)) is none, as at the dispatch level (lift_fresh)
        if func in _CASTS_TO_A_TENSORS_DTYPE:
            if not watch.half_precision and any(_is_half(t) for t in pytree.tree_leaves(out)):
                watch.half_precision = bool(args) and isinstance(args[0], Tensor) and not _is_half(args[0])
        elif func not in _FROM_PYTHON_DATA:
            watch.note(out, args, kwargs)
        return out


_CASTS_TO_A_TENSORS_DTYPE = (Tensor.to, Tensor.type_as)
_FROM_PYTHON_DATA = (torch.tensor, torch.as_tensor)


def _precision(node: tuple[str, str]) -> str:
    return torch._C._get_fp32_precision_getter(*node)


def _set_precision(node: tuple[str, str], value: str) -> None:
    torch._C._set_fp32_precision_setter(*node, value)


def _own_precision(chain: Sequence[tuple[str, str]]) -> str:
    """The ``fp32_precision`` set on the flag ``chain[0]`` (a ``(backend, op)`` pair) itself, ``"none"``
    where it has none and follows its parent ``chain[1]`` (``chain`` runs up to the generic flag). A
    flag reads as its parent's value when it follows it, so where the two read alike the parent is
    flipped for a moment: a follower flips with it. The parent gets back its own setting.

    The ``(backend, op)`` pairs, not ``torch.backends``' attributes: ``torch.backends.mkldnn.
    fp32_precision`` reads oneDNN's flag but writes the generic one (torch 2.13)."""
    value = _precision(chain[0])
    if len(chain) == 1 or value == "none" or _precision(chain[1]) != value:
        return value
    parent, parents_own = chain[1], _own_precision(chain[1:])
    other = "tf32" if value == "ieee" else "ieee"
    _set_precision(parent, other)
    try:
        follows = _precision(chain[0]) == other
    finally:
        _set_precision(parent, parents_own)
    return "none" if follows else value


@contextlib.contextmanager
def full_float32_matmuls() -> Iterator[None]:
    """Float32 matrix products without TF32 within the block, every setting exactly as it was after it.

    Through the per-backend ``fp32_precision`` flags of the CUDA and CPU (oneDNN) matmuls where this
    torch has them, else through ``torch.set_float32_matmul_precision``. Each flag gets back its own
    setting, ``"none"`` included, so that one which followed its parent (the generic flag, or its
    backend's) follows it still (the legacy setter writes both flags; writing back the value a flag
    reads would pin it)."""
    if not hasattr(torch._C, "_get_fp32_precision_getter"):  # before torch 2.9
        legacy = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy)
        return
    generic = ("generic", "all")
    chains = [((backend, "matmul"), (backend, "all"), generic) for backend in ("cuda", "mkldnn")]
    saved = [(chain[0], _own_precision(chain)) for chain in chains]
    try:
        for flag, _ in saved:
            _set_precision(flag, "ieee")
        yield
    finally:
        for flag, value in saved:
            _set_precision(flag, value)


@dataclass
class ParityReport:
    """Result of :func:`check_parity`. ``sites`` is ``[(site, max |difference|), ...]`` in forward order;
    ``scales``, if given, the source model's largest ``|activation|`` at each site (the last: the logits).
    The logits' tolerance is ``atol + rtol x`` their largest ``|value|`` (`tolerance`)."""

    converter: str
    atol: float
    max_logit_diff: float
    sites: list[tuple[str, float]] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    rtol: float = 0.0
    unmasked: int = 0
    """Logits the source masks (`masked_logits`) that the converted model does not mask (`unmasked_logits`)."""
    skipped: str = ""
    """Why sites that `check_parity` compares otherwise are missing (a shared block that ran another number
    of times than it is listed, a listed block that did not run): ``ok`` is not affected, the logits are
    compared as ever."""
    layer_mismatch: str = ""
    """Set when the converted model has another number of layers than the source model has blocks (the
    converter's layer count, or blocks not found): the sites both have are compared, and ``ok`` is False."""

    @property
    def tolerance(self) -> float:
        """``atol + rtol x`` the source's largest ``|logit|`` (``atol`` without ``scales``)."""
        scale = self.scales[-1] if self.scales and math.isfinite(self.scales[-1]) else 0.0
        return self.atol + self.rtol * scale

    @property
    def ok(self) -> bool:
        return self.max_logit_diff <= self.tolerance and not self.unmasked and not self.layer_mismatch  # NaN: False

    @property
    def first_divergence(self) -> str | None:
        """The earliest site whose difference is NaN or exceeds its tolerance (``None`` when all agree).

        The logits' tolerance is `tolerance`. With ``scales``, a residual site's is that scaled by
        the site's largest activation over the logits' largest: the same relative tolerance, so a
        mistake in a block shows there even where the residual stream is much smaller than the
        logits (at nanoGPT's initialisation, ~50x). Without ``scales``, ``atol`` everywhere.
        """
        return next((site for i, (site, diff) in enumerate(self.sites) if not diff <= self._tolerance(i)), None)

    def _tolerance(self, index: int) -> float:
        if len(self.scales) != len(self.sites) or index == len(self.sites) - 1 or not self.scales[-1] > 0:
            return self.tolerance
        return self.tolerance * self.scales[index] / self.scales[-1]

    @property
    def worst_site(self) -> str | None:
        """The site with the largest difference, a NaN one first."""
        return max(self.sites, key=lambda s: math.inf if math.isnan(s[1]) else s[1])[0] if self.sites else None

    def __str__(self) -> str:
        bound = f"atol={self.atol:g}" if not self.rtol else (
            f"{self.tolerance:.3g} = atol {self.atol:g} + rtol {self.rtol:g} x largest |logit| {self.scales[-1]:.3g}"
            if self.scales else f"atol={self.atol:g}")
        lines = [f"converter {self.converter!r}: max |logit diff| = {self.max_logit_diff:.3g} "
                 f"({'OK' if self.ok else 'FAIL'} at {bound})"]
        lines += [f"  {site:<28} {diff:.3g}{'  <-- first divergence' if site == self.first_divergence else ''}"
                  for site, diff in self.sites]
        if self.unmasked:
            lines.append(f"  FAIL: {unmasked_message(self.unmasked)}")
        if self.layer_mismatch:
            lines.append(f"  FAIL: {self.layer_mismatch}")
        if self.skipped:
            lines.append(f"  note: {self.skipped}")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise AssertionError(str(self))


MASKED_MARGIN = 40.0
"""How far below its row's largest logit a converted logit must be where the source's is masked
(`masked_logits`): ``exp(-40)`` is about 4e-18 of the largest probability."""

MASKED_GAP = 100.0
"""A finite logit this far below its row's largest is taken as masked (`masked_logits`): a model masking
padded ids with a large finite value (``masked_fill(..., -1e4)``) instead of -inf. ``exp(-100)`` is
below float32's smallest normal number, so no float32 softmax gives it weight; as the largest
``|logit|`` it would have set the parity tolerance (1e-3 of it: 10 at -1e4), under which a wrong
converter passed (custom-architecture review)."""


def masked_logits(source: Tensor) -> Tensor:
    """Where ``source`` (``[..., vocab]`` logits) masks an id: -inf, or finite and more than `MASKED_GAP`
    below the largest finite logit of its row. NaN and +inf are not masked."""
    finite = torch.isfinite(source)
    row_max = source.masked_fill(~finite, -math.inf).amax(-1, keepdim=True)
    return (source == -math.inf) | (finite & (source < row_max - MASKED_GAP))


def compared_logits(source: Tensor) -> Tensor:
    """The entries of ``source`` a parity check compares: finite and not masked (`masked_logits`)."""
    return torch.isfinite(source) & ~masked_logits(source)


def unmasked_logits(source: Tensor, converted: Tensor) -> int:
    """How many entries ``source`` masks (`masked_logits`: -inf or far below its row's largest, e.g.
    padded vocabulary ids) where ``converted`` is not at least `MASKED_MARGIN` below the largest of its
    row's other entries: there its softmax gives weight to an id the source's never picks, and every
    loss, logit-lens and ICL score differs, though the other logits agree."""
    masked = masked_logits(source)
    if not bool(masked.any()):
        return 0
    converted = converted.float()
    kept_max = converted.masked_fill(masked, -math.inf).amax(-1, keepdim=True)
    return int((masked & (converted > kept_max - MASKED_MARGIN)).sum())


def unmasked_message(count: int) -> str:
    return (f"{count} logits the model masks (-inf, or more than {MASKED_GAP:g} below their row's largest: masked "
            f"ids, e.g. padded vocabulary ids) are not masked in the converted model, whose softmax gives them "
            f"weight: set unembed.b_U to a large negative finite value at those ids, one the weights' dtype holds, "
            f"e.g. -1e4 (not -inf, which the probes' finite-weights check refuses)")


PARITY_RTOL = 1e-3
"""The relative tolerance of parity checks, a fraction of the largest logit: both models compute in
float32, where a correct conversion agrees to about 1e-7-1e-5 of it (measured on the shipped configs at
initialisation and trained, compiled, wrapped, resumed, on perturbed weights); mapping slips at
initialisation were 2e-3 to 0.6 of it."""
PARITY_RTOL_LOW_PRECISION = 5e-2
"""The tolerance when the model computes in half precision (an autocast inside its forward, or its own
half-precision weights): a correct bfloat16 forward is 0.2-1.1 % off."""

PERTURBATION = 0.5
"""`perturbed`'s noise, a fraction of a tensor's root-mean-square value plus `PERTURBATION_FLOOR`."""
PERTURBATION_FLOOR = {1: 0.2}
"""Added to the root-mean-square, by a tensor's number of dimensions (0.02 for those not listed):
vectors (biases, norm parameters) 0.2. A bias is zeros at initialisation, and with the 0.02 of the
matrices its noise was too small to show a dropped query bias on nanoGPT's ``bias=True`` models of
width 64 and 128 (0.54x and 0.88x the tolerance, seed 0; 4.3x at width 384); with 0.2, 0.8-1.1x,
2.3-3.7x and 8.6-10.9x over seeds 0-2 (nineteenth session; 0.5 and 1.0 did little better at width 64,
where the small initialisation mutes everything after the query)."""
MASK_MAGNITUDE = MASKED_GAP
"""Entries of a weight at least this large in magnitude are masks, not weights (a -1e4 at padded
vocabulary ids held in a bias parameter; at `MASKED_GAP`, as large as the gap that makes a logit
masked): `perturbed` leaves them out of the root-mean-square that sizes the noise. They set it (0.5 x
1,250 of noise on every real id of a 256-id bias with four masked), and with it the largest logit and
the tolerance, under which slips passed (diff reviews: at 1e3, a -999 mask still let them pass)."""


def perturbed(value: Tensor, generator: torch.Generator) -> Tensor:
    """``value`` plus Gaussian noise of `PERTURBATION` x (its root-mean-square + `PERTURBATION_FLOOR`), drawn on the CPU
    from ``generator`` (never the global RNG), in ``value``'s dtype and on its device. Entries of
    magnitude `MASK_MAGNITUDE` or more (masks) are left out of the root-mean-square, unless every finite
    entry is; NaN and inf entries always are.

    A correct conversion agrees with its source for any weights; at initialisation biases are zeros
    and norm gains ones, so a converter that drops or swaps one computes the same function there,
    and nowhere else. Parity checks compare on perturbed weights.

    The noise keeps each tensor's scale. A larger one (a floor of 1 on embedding tables and 2 /
    sqrt(fan-in) on other matrices, tried in the fifteenth session) sharpens attention enough to
    show swapped query and key weights in a norm-free model at initialisation, but it makes the
    parity of correct conversions ill-posed elsewhere: a norm-free residual stream grows several-fold
    per layer until softmax picks near-ties by rounding, and an autocast model's bfloat16 rounding
    grows past 5 % of the largest logit. So at a small initialisation, in a model without norms,
    attention is nearly uniform and query/key mistakes do not show (README, "Checking parity").
    """
    floor = PERTURBATION_FLOOR.get(value.dim(), 0.02)
    spread = floor
    if value.numel():
        v = value.detach().float()
        if float(torch.linalg.vector_norm(v, ord=math.inf)) < MASK_MAGNITUDE:  # no mask (no copy of v)
            spread += float(v.pow(2).mean().sqrt())
        else:  # the root-mean-square of the other entries; one with none (every finite entry that large, e.g.
            # gains of 300: weights, not a mask) keeps its own; NaN and inf are no weights (diff reviews)
            finite = v[torch.isfinite(v)]
            kept = finite[finite.abs() < MASK_MAGNITUDE]
            kept = kept if kept.numel() else finite
            spread += _root_mean_square(kept) if kept.numel() else 0.0
    noise = torch.randn(value.shape, generator=generator) * (PERTURBATION * spread)
    return value + noise.to(device=value.device, dtype=value.dtype)


def _root_mean_square(values: Tensor) -> float:
    """The root-mean-square of the finite float32 ``values`` (not empty), in float32 without overflow:
    scaled by their largest magnitude first, as 1e20 squared overflows float32. Not in float64, which
    the MPS backend lacks (``.double()`` of an MPS tensor raises), and ``values`` lie on the model's device."""
    scale = float(values.abs().amax())
    return scale * float((values / scale).pow(2).mean().sqrt()) if scale else 0.0


def parity_tokens(seed: int, d_vocab: int, batch_size: int, length: int) -> Tensor:
    """The random token ids of a parity check seeded ``seed``: `check_parity`'s and `LensCallback`'s."""
    return torch.randint(0, d_vocab, (batch_size, length), generator=torch.Generator().manual_seed(seed))


def parity_noise(seed: int) -> torch.Generator:
    """The private generator of the perturbation (`perturbed`) of a parity check seeded ``seed``, drawn
    from in parameter order: `check_parity`'s and `LensCallback`'s."""
    return torch.Generator().manual_seed(seed + 1)


@contextlib.contextmanager
def _perturbed_parameters(module: nn.Module, seed: int) -> Iterator[None]:
    """``module``'s floating-point parameters `perturbed` (each shared, tied, one once) for the block, with
    the noise of a parity check seeded ``seed`` (`parity_noise`), their own tensors back after it, also
    when it raises. Each parameter's ``data`` is swapped, not written: an in-place write would move its
    version counter, and a loss computed before the check could no longer be backpropagated (observer
    review)."""
    generator = parity_noise(seed)
    originals: list[tuple[Tensor, Tensor]] = []
    try:
        for param in module.parameters():
            if param.is_floating_point():
                originals.append((param, param.data))
                param.data = perturbed(param.detach(), generator)
        yield
    finally:
        for tensor, original in reversed(originals):
            tensor.data = original


def _find_blocks(model: nn.Module, n_layers: int) -> list[nn.Module]:
    """The first ``nn.ModuleList``/``nn.Sequential`` of ``n_layers`` modules in ``modules()`` order (a
    container before the ones inside it: the blocks rather than a block's list of heads), else the
    longest ``nn.ModuleList`` (whose length `check_parity` then reports as not matching)."""
    containers = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    for container in containers:  # modules() lists a container before the ones inside it
        if len(container) == n_layers:
            return list(container)
    lists: list[nn.ModuleList] = [m for m in containers if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"no nn.ModuleList or nn.Sequential of {n_layers} blocks found in {type(model).__name__} "
                         f"(an nn.ModuleDict is not searched: nanoGPT's own `transformer` is one); pass blocks=...")
    longest = max(lists, key=len)
    return list(longest)


def _block_list(blocks: Any, given: Any) -> list[nn.Module]:
    """The modules of ``blocks`` in order: a ``ModuleDict``'s values (iterating it gives its keys), a
    ``ModuleList``'s or ``Sequential``'s or any iterable's items, each checked to be a module. One module
    that is no container (``blocks="transformer.h.0"``, a block) is refused by name: a bare
    ``'Block' object is not iterable`` said neither which argument nor what it should be."""
    try:
        items = list(blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks)
    except TypeError:
        if not isinstance(blocks, nn.Module):
            raise
        what = f"blocks={given!r} names" if isinstance(given, str) else "blocks= got"
        raise ValueError(f"{what} one {type(blocks).__name__}, not a container of the model's blocks: name or pass "
                         f"the nn.ModuleList, nn.ModuleDict or nn.Sequential holding them, or a list of them") from None
    for item in items:
        if not isinstance(item, nn.Module):
            raise ValueError(f"blocks={given!r} must name or be a container of modules (nn.ModuleList, nn.ModuleDict, "
                             f"nn.Sequential or a list), but it holds a {type(item).__name__}")
    return items


def _blocks_path(model: nn.Module, blocks: Any, block_list: Sequence[nn.Module]) -> str:
    """Where ``block_list`` lives in ``model``, for messages: the dotted path given, else that of the module
    holding the first block (``"backbone.layers"``), else ``"the given blocks"``."""
    if isinstance(blocks, str):
        return blocks
    names = {id(m): name for name, m in model.named_modules()}
    name = names.get(id(block_list[0])) if block_list else None
    if name is None:
        return "the given blocks"
    return name.rpartition(".")[0] or f"the top of {type(model).__name__}"


def _layer_mismatch(n_layers: int, n_blocks: int, where: str, guessed: bool, listed: bool = False) -> str:
    """`ParityReport.layer_mismatch`'s message: the converter's layer count is the likely fault, and
    ``blocks=`` is suggested only where the blocks were guessed (`_find_blocks`), which a path could fix.
    ``listed``: ``blocks=`` was a list of modules, whose length is the user's, not the container's at
    ``where`` (it read "the model has 2 blocks at backbone.layers" of a list of two of its three)."""
    check = "check the converter's layer count (the n_layers its model_config gives hooked_config)"
    if listed:
        of = "" if where == "the given blocks" else f" (of {where})"  # where the model holds them, if it does
        return (f"the converter's hooked config has n_layers={n_layers} but blocks= lists {n_blocks} blocks{of}: "
                f"{check}, or list them all")
    if not guessed:
        return f"the converter's hooked config has n_layers={n_layers} but the model has {n_blocks} blocks at {where}: {check}"
    return (f"the converter's hooked config has n_layers={n_layers} but the model has no nn.ModuleList or "
            f"nn.Sequential of {n_layers} modules; its longest nn.ModuleList, at {where}, has {n_blocks}: if those "
            f"are the model's blocks, {check}; if they are not, pass blocks=... (a dotted path or the modules)")


def _check_source_logits(logits: Any, tokens: Tensor, d_vocab_out: int, conv: Converter, own_fn: bool) -> None:
    """Raises `NotLogitsError` unless ``logits`` are ``[batch, positions, d_vocab_out]`` for ``tokens``, with
    between 1 and all of their positions (the last ones: nanoGPT's shortcut), as `LensCallback`'s check
    requires. Without it a loss (0-D) or a ``(loss, logits)`` pair's other element raised a bare
    IndexError or AttributeError, other vocabulary sizes a broadcasting error, and a ``[batch, vocab]``
    last-position row with ``batch_size=1`` was broadcast against every position: a correct
    conversion failed, with the logits named as where it parts (parity review)."""
    if are_logits_for(logits, tokens, d_vocab_out):
        return
    cls = type(conv)
    where = "logits_fn(model, tokens)" if own_fn else source_logits_call(conv)
    wanted = f"[batch, positions, d_vocab_out] = [{tokens.shape[0]}, 1 to {tokens.shape[1]}, {d_vocab_out}]"
    if isinstance(logits, Tensor) and logits.dim() == 3 and logits.shape[0] == tokens.shape[0] \
            and 1 <= logits.shape[1] <= tokens.shape[1]:
        fix = (f"the model has {logits.shape[2]} logits per position, the HookedTransformer of converter "
               f"{conv.name!r} {d_vocab_out}: check the vocabulary size (d_vocab) its model_config gives hooked_config")
    elif own_fn:
        fix = "make logits_fn return the logits of every position, or of the last ones"
    else:
        fix = (f"override {cls.__name__}.source_logits(model, tokens) to return them, in a subclass of "
               f"{cls.__module__}.{cls.__qualname__} (e.g. `return model(tokens).logits`, or `model(tokens)[1]` for a "
               f"(loss, logits) pair), or pass logits_fn=...")
    raise NotLogitsError(f"check_parity: {where} returned {describe_output(logits)} for {list(tokens.shape)} tokens, "
                         f"not logits {wanted}: {fix}")


def _resolve(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _check_parity_arguments(tokens: Tensor | None, batch_size: int | None, seq_len: int | None, atol: float,
                            rtol: float | None) -> None:
    """`check_parity`'s arguments that are refused before anything runs."""
    if tokens is not None:
        given = [name for name, value in (("batch_size", batch_size), ("seq_len", seq_len)) if value is not None]
        if given:
            raise TypeError(f"check_parity: {' and '.join(given)} shape the random tokens; with tokens=..., which has "
                            f"its own shape {tuple(tokens.shape) if isinstance(tokens, Tensor) else '?'}, they would be "
                            f"ignored")
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point() or tokens.is_complex() \
                or tokens.dtype == torch.bool:
            what = f"a {tokens.ndim}-D {tokens.dtype} tensor" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise TypeError(f"check_parity: tokens must be a [batch, pos] tensor of integer token ids, got {what}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and ((size := integer_or_none(value)) is None or size < 1):  # numpy/0-d tensor ints too
            raise ValueError(f"check_parity: {name} must be a positive integer, got {value!r}")
    for name, tolerance in (("atol", atol), ("rtol", rtol)):
        if not (tolerance is None and name == "rtol") and not finite_non_negative(tolerance):
            raise ValueError(f"check_parity: {name} must be a finite number >= 0, got {tolerance!r}")


@torch.no_grad()
def check_parity(
    model: nn.Module,
    converter: str | Converter | None = None,
    *,
    tokens: Tensor | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    blocks: str | Sequence[nn.Module] | None = None,
    logits_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    atol: float = 1e-4,
    rtol: float | None = None,
    seed: int = 0,
    perturb: bool = True,
) -> ParityReport:
    """Builds the ``HookedTransformer`` for ``model`` and reports where the two disagree.

    Both models run with full-precision float32 matrix products (no TF32, which rounds as much as the
    tolerance), every flag restored afterwards (`full_float32_matmuls`), outside any autocast of the
    caller's (one inside the model's forward runs), and the source eagerly, even where it is compiled
    (``torch.compile(model)``: no compilation for the check), as in `LensCallback`'s check.

    Args:
        model: The source model (eval mode is used for the comparison and restored afterwards).
        converter: Registered name or instance; inferred when omitted.
        tokens: ``[batch, pos]`` token ids; by default random ids from a private generator.
        batch_size, seq_len: Shape of the random tokens (``batch_size`` defaults to 2, ``seq_len`` to
            ``n_ctx``, at most 512: the probes' default sequences are 64 and 256 tokens; pass the
            longest your probes use, or ``n_ctx``, to compare every position they see). Refused
            with ``tokens``, which has its own shape.
        blocks: The source model's blocks (a dotted attribute path or modules); by default the
            first ``nn.ModuleList`` or ``nn.Sequential`` in ``model.modules()`` order (a container
            before the ones inside it) with as many modules as the converted model has layers. An
            ``nn.ModuleDict`` of blocks is taken in its order, when given (never searched for). A
            module listed more than once (weight sharing: ``nn.ModuleList([block] * 3)``) is hooked
            once and its calls are taken in order, the i-th call of any listed module being block i;
            if they ran another number of times than listed, the per-block sites are left out
            (``skipped`` says why) and the logits compared. Blocks that number other than the
            converted model's layers (a converter's wrong layer count) fail the report
            (``layer_mismatch`` says so), which still compares the logits and the sites both have. A
            listed block the source forward does not run has its site left out (``skipped`` says which).
        logits_fn: ``(model, tokens) -> logits``; by default the converter's
            `Converter.source_logits` (``model(tokens)``, first element of a tuple, unless the
            converter overrides it). If the source returns fewer positions (nanoGPT's
            last-position shortcut), the last positions are compared.
        atol, rtol: Tolerance on the difference of logits: ``atol + rtol x`` the source's largest
            compared ``|logit|`` (entries where the source's logits are not finite or are masked, e.g.
            padded vocabulary ids set to -inf or -1e4: `compared_logits`, are left out, as in
            `LensCallback`'s check, and masked ones must be masked in the converted model). ``rtol``
            defaults to `LensCallback`'s: 1e-3, or 5e-2 for a model that computes in half precision:
            with float16/bfloat16 parameters, or casting into them in its forward (an autocast inside
            it; to see that, the source runs under a Python dispatch mode, or a torch-function mode
            where a higher-order operator such as ``flex_attention`` refuses the first; a forward that
            takes neither gets 5e-2).
        seed: Seed of the private generator for random tokens and the perturbation.
        perturb: Compare on the model's floating-point parameters plus noise (`perturbed`), as
            `LensCallback`'s parity check does: at initialisation biases are zeros and norm gains
            ones, where a dropped or swapped one would not show. The parameters hold the perturbed
            values for the comparison (their ``data`` swapped; their version counters, and so a
            pending backward, untouched) and their own tensors again before this returns (buffers are
            left as they are). ``False`` compares on the weights as they are.

    Raises:
        TypeError: for ``tokens`` with ``batch_size`` or ``seq_len`` (they were ignored), or tokens that
            are not a 2-D integer tensor.
        NotLogitsError: the logits (``logits_fn``'s or the converter's `Converter.source_logits`) are not
            ``[batch, positions, d_vocab_out]`` for the tokens (`_check_source_logits`).
        ValueError: for a tolerance that is negative or not finite (a perfect conversion was reported
            as failing), or a size that is not a positive integer.
        ConversionError: the source model fails on the tokens but runs on a few of them (a context
            shorter than the converter's ``n_ctx``), naming the length and where it came from.
    """
    _check_parity_arguments(tokens, batch_size, seq_len, atol, rtol)
    inner = unwrap_module(model)
    conv = get_converter(converter) if converter is not None else infer_converter(inner)
    device = next(inner.parameters()).device
    # rtol by default: half-precision parameters, or a forward that casts into half precision (an autocast
    # inside it, which `HalfPrecisionOutputs` sees, as the callback's check does)
    half = rtol is None and any(p.dtype in (torch.float16, torch.bfloat16) for p in inner.parameters())
    watch = HalfPrecisionOutputs()
    # full float32 products on both sides, as the callback's check: TF32 rounding (a GPU's "high" matmul
    # precision) is as large as the tolerance. Outside the caller's autocast, as the callback's check: under one
    # (a call from a bf16-mixed training step or notebook cell) both sides computed in bfloat16, the watch took
    # that for the model's own and gave 5e-2, and swapped query and key weights passed (parity review); an
    # autocast inside the model's forward still runs, and is seen
    with _perturbed_parameters(inner, seed) if perturb else contextlib.nullcontext(), full_float32_matmuls(), \
            torch.autocast(device.type, enabled=False):
        hooked = build_hooked_transformer(conv, conv.model_config(inner), effective_state_dict(inner),
                                          device=device)
        cfg = hooked.cfg
        check_runs(conv, meta_skeleton(cfg))  # a config TransformerLens cannot run: named, as the callback does
        given_tokens = tokens is not None
        if tokens is None:
            tokens = parity_tokens(seed, cfg.d_vocab, integer_or_none(batch_size) or 2,
                                   integer_or_none(seq_len) or min(cfg.n_ctx, 512))
        tokens = tokens.to(device)

        if blocks is None:
            block_list = _find_blocks(inner, cfg.n_layers)
        else:
            block_list = _block_list(_resolve(inner, blocks) if isinstance(blocks, str) else blocks, blocks)
        # another number of blocks than layers is reported, not raised: the converter's layer count is the
        # usual fault (the callback's parity error sends here), and the logits and the sites both sides
        # have (the embedding, the first blocks) still show where the two part
        layer_mismatch = "" if len(block_list) == cfg.n_layers else _layer_mismatch(
            cfg.n_layers, len(block_list), _blocks_path(inner, blocks, block_list), guessed=blocks is None,
            listed=blocks is not None and not isinstance(blocks, (str, nn.Module)))

        source_acts: dict[str, Tensor] = {}
        # a module listed as several blocks (weight sharing, a "looped" model) fires its hook on each of its
        # calls, and an index per hook would keep only its last call's output for every block it stands for:
        # each distinct module is hooked once instead and its outputs are taken in call order, the i-th call
        # of any of them being block i
        distinct = list({id(b): b for b in block_list}.values())
        shared = len(distinct) < len(block_list)
        calls: list[Tensor] = []

        def grab(index: int | None):
            def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
                if index == 0 or (index is None and not calls):  # the first block's input, by position or keyword
                    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
                    if first is not None:
                        source_acts["embed"] = first.detach()
                out = (output[0] if isinstance(output, (tuple, list)) else output).detach()
                if index is None:
                    calls.append(out)
                else:
                    source_acts[f"blocks.{index}"] = out
            return hook

        modes = {m: m.training for m in inner.modules()}
        inner.eval()
        handles = ([b.register_forward_hook(grab(None), with_kwargs=True) for b in distinct] if shared else
                   [b.register_forward_hook(grab(i), with_kwargs=True) for i, b in enumerate(block_list)])

        def forward_on(ids: Tensor) -> Tensor:
            calls.clear()  # `watch.call` may run it again (a forward no mode can watch)
            return logits_fn(model, ids) if logits_fn is not None else conv.source_logits(model, ids)

        def forward() -> Tensor:
            return forward_on(tokens)

        # eager, as the callback's check: a compiled graph would not pass its operators to the watch, and a model
        # compiled by its user (torch.compile(model)) was compiled here when it was not watched (half-precision
        # parameters, rtol given), for a graph of eval mode and hooks that training cannot reuse
        try:
            with torch.compiler.set_stance("force_eager"):
                source_logits = watch.call(forward) if rtol is None and not half else forward()
        except Exception as err:
            with torch.compiler.set_stance("force_eager"):  # the retry on a few tokens too
                _raise_if_too_long(err, forward_on, tokens, conv.name, cfg.n_ctx, seq_len is not None, given_tokens)
            raise
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        _check_source_logits(source_logits, tokens, cfg.d_vocab_out, conv, logits_fn is not None)
        skipped = ""
        if shared and len(calls) == len(block_list):
            source_acts.update({f"blocks.{i}": out for i, out in enumerate(calls)})
        elif shared:
            skipped = (f"the per-block sites are left out: the {len(block_list)} source blocks at "
                       f"{_blocks_path(inner, blocks, block_list)} are {len(distinct)} shared module(s), which ran "
                       f"{len(calls)} times, so their outputs cannot be told apart by block; pass blocks=... "
                       f"listing the modules once per call, in the order they run")

        names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(cfg.n_layers)]
        output, cache = hooked.run_with_cache(tokens, names_filter=lambda n: n in names)
        hooked_logits = cast(Tensor, output)  # the default return_type, "logits"
        sites: list[tuple[str, float]] = []
        scales: list[float] = []

        def compare(site: str, converted: Tensor, source: Tensor) -> float:
            if site != "logits" and converted.shape != source.shape:
                raise ValueError(f"check_parity: at {site} the source model's activation has shape {list(source.shape)}, "
                                 f"the HookedTransformer's {list(converted.shape)}: are the source blocks the model's "
                                 f"transformer blocks? Pass blocks=... (a dotted path or the modules)"
                                 + (f"; {layer_mismatch}" if layer_mismatch else ""))
            source = source.float()
            if site == "logits":  # entries the model masks (padded vocabulary ids: -inf, or a finite -1e4 that
                compared = compared_logits(source)  # would set the tolerance) are left out, as the callback's
                if not bool(compared.all()):  # check leaves them out; `unmasked_logits` checks them
                    converted, source = converted.float()[compared], source[compared]
            scale = source.abs().max().item() if source.numel() else math.nan  # no finite logit: fails
            diff = (converted - source).abs().max().item() if source.numel() else math.nan
            scales.append(scale)
            sites.append((site, diff))
            return diff

        if "embed" in source_acts:
            compare("embed (resid_pre 0)", cache["blocks.0.hook_resid_pre"], source_acts["embed"])
        compared_blocks = range(min(cfg.n_layers, len(block_list)) if not skipped else 0)
        idle = [i for i in compared_blocks if f"blocks.{i}" not in source_acts]
        if idle:  # a listed block the source forward never ran (an early exit, a skipped layer): a bare KeyError before
            skipped = (f"source blocks {idle} at {_blocks_path(inner, blocks, block_list)} did not run in the source "
                       f"forward, so their sites are left out")
        for i in compared_blocks:
            if i not in idle:
                compare(f"block {i} (resid_post)", cache[f"blocks.{i}.hook_resid_post"], source_acts[f"blocks.{i}"])
        if source_logits.shape[1] != hooked_logits.shape[1]:
            hooked_logits = hooked_logits[:, -source_logits.shape[1]:]
        max_diff = compare("logits", hooked_logits, source_logits)
        if rtol is None:
            rtol = PARITY_RTOL_LOW_PRECISION if half or watch.may_be_half else PARITY_RTOL
        return ParityReport(conv.name, atol, max_diff, sites, scales, rtol,
                            unmasked_logits(source_logits.float(), hooked_logits), skipped=skipped,
                            layer_mismatch=layer_mismatch)
