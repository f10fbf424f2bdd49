"""Fixed probe batches: repeated random tokens and windows of real text.

Probes are only comparable across training steps (and across runs) if they see the same inputs
every time, so every draw here goes through a caller-supplied `torch.Generator` (never the global
RNG), and `make_probe_inputs` seeds private generators from one integer.

* The repeated batch is the classic induction-head input of Olsson et al. (2022), "In-context
  Learning and Induction Heads": a random token sequence followed by an exact copy of itself.
  TransformerLens's Main Demo uses the same construction, also without a BOS token (a token tensor
  gets none), so that position ``q`` of the second half repeats position ``q - L``. Tokens are drawn from the tokens
  that actually occur in the training data, so a model that never saw an id does not get it.
* The text batch is random windows of real text (e.g. the validation split), used by the probes
  that measure the model on its own distribution (attention entropy, logit lens, ICL score).

Token data may be a 1-D tensor or a 1-D numpy array, including the ``uint16`` memmaps nanoGPT
writes (``train.bin`` / ``val.bin``); only the slices needed are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from lens_callback.schedule import integer_or_none

TokenData = Union[Tensor, np.ndarray]
"""A 1-D sequence of token ids: a tensor, or a numpy array / memmap (e.g. nanoGPT's uint16 bins)."""

_SCAN_BLOCK = 1 << 24
"""Tokens read per block when counting token ids (bounds memory when scanning a large memmap)."""


@dataclass(frozen=True)
class ProbeInputs:
    """The probe batches a `ProbeRunner` feeds to the model.

    Attributes:
        repeated: ``[batch, 2L]`` int tokens whose second half repeats the first, or ``None`` if no
            enabled probe consumes the repeated batch.
        text: ``[batch, T]`` int tokens of real text, or ``None`` if no enabled probe consumes it.

    Tokens of any integer dtype are accepted and held as int64 (``torch.long``), the dtype
    TransformerLens's embedding indexes with (uint8 or int16 ids would fail inside it); int64
    tensors are kept as they are, without a copy.
    """

    repeated: Int[Tensor, "batch two_len"] | None
    text: Int[Tensor, "batch seq"] | None

    def __post_init__(self) -> None:
        """Check both batches are 2-D integer tensors with at least one row; hold them as int64.

        Raises:
            ValueError: Naming the offending field and its shape or dtype.
        """
        for field_name in ("repeated", "text"):
            tokens = getattr(self, field_name)
            if tokens is None:
                continue
            if not isinstance(tokens, Tensor):
                raise ValueError(f"ProbeInputs.{field_name} must be a tensor, got {type(tokens)}")
            if tokens.ndim != 2 or tokens.shape[0] < 1:
                raise ValueError(
                    f"ProbeInputs.{field_name} must be [batch >= 1, seq], "
                    f"got shape {tuple(tokens.shape)}"
                )
            if not _holds_integers(tokens):
                raise ValueError(
                    f"ProbeInputs.{field_name} must hold integer token ids, got dtype {tokens.dtype}"
                )
            if tokens.dtype != torch.int64:  # frozen: set the converted field as dataclasses' __init__ does
                object.__setattr__(self, field_name, tokens.to(torch.int64))

    def to(self, device: torch.device | str) -> ProbeInputs:
        """Return a copy with both batches on ``device`` (non-blocking where possible)."""
        return ProbeInputs(
            repeated=None if self.repeated is None else self.repeated.to(device, non_blocking=True),
            text=None if self.text is None else self.text.to(device, non_blocking=True),
        )


def _check_positive(field_name: str, value: int) -> None:
    number = integer_or_none(value)
    if number is None or number < 1:
        raise ValueError(f"{field_name} must be a positive int, got {field_name}={value!r}")


def _holds_integers(data: Tensor | np.ndarray) -> bool:
    """Whether ``data``'s dtype is an integer type (not floating point, complex or bool): token ids."""
    if isinstance(data, Tensor):
        return not (data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool)
    return bool(np.issubdtype(data.dtype, np.integer))


def id_outside_vocab(tokens: Tensor, d_vocab: int) -> int | None:
    """A token id of ``tokens`` outside ``[0, d_vocab)`` (the lowest if one is negative, else the
    highest), or ``None``: the embedding would read a negative id from the end of the vocabulary, as
    another token, and raise on one past it. One host sync."""
    if not tokens.numel():
        return None
    low, high = (int(v) for v in torch.aminmax(tokens))
    return low if low < 0 else high if high >= d_vocab else None


def _check_token_data(field_name: str, data: TokenData) -> int:
    """Check ``data`` is a 1-D tensor or array and return its length."""
    if not isinstance(data, (Tensor, np.ndarray)):
        raise ValueError(f"{field_name} must be a 1-D tensor or numpy array, got {type(data)}")
    if data.ndim != 1:
        raise ValueError(f"{field_name} must be 1-D, got shape {tuple(data.shape)}")
    if not _holds_integers(data):  # cast, 5.7 would be read as token 5
        raise ValueError(f"{field_name} must hold integer token ids, got dtype {data.dtype}")
    return int(data.shape[0])


def _read(data: TokenData, start: int, stop: int, field_name: str = "data") -> Int[Tensor, " n"]:
    """``data[start:stop]`` as an int64 tensor (a copy for numpy input; reads only that slice).

    Raises:
        ValueError: If a uint64 ``data`` holds an id of 2**63 or more there: the cast wraps it around to
            a negative one, which the caller would report as "a negative token id -1".
    """
    if isinstance(data, Tensor):
        block, unsigned64 = data[start:stop].to(torch.int64), data.dtype == torch.uint64
    else:
        block = torch.from_numpy(np.asarray(data[start:stop]).astype(np.int64))
        unsigned64 = data.dtype.kind == "u" and data.dtype.itemsize == 8
    if unsigned64 and block.numel() and (low := int(block.min())) < 0:
        raise ValueError(f"{field_name} holds token id {low + 2**64}, past any vocabulary (ids must be below "
                         f"vocab_size)")
    return block


def one_distinct_token(data: TokenData, vocab_size: int, pool: Tensor, min_count: int) -> bool:
    """Whether ``data`` holds fewer than two distinct tokens, given ``pool``, its tokens occurring at least
    ``min_count`` times (`token_pool_from_data`): then no lower ``min_count`` gives a repeated batch.
    Scans ``data`` again only when ``min_count > 1`` (the pool is then a subset)."""
    distinct = pool if min_count <= 1 else token_pool_from_data(data, vocab_size, 1)
    return distinct.numel() < 2


def token_pool_from_data(
    data: TokenData,
    vocab_size: int,
    min_count: int = 1,
    *,
    max_tokens: int | None = None,
    field_name: str = "data",
) -> Int[Tensor, " pool"]:
    """The distinct token ids that occur in ``data`` at least ``min_count`` times, sorted.

    Reads the data in blocks, so a large memmap is scanned without loading it whole (a full scan
    of a multi-GB memmap still takes a while: pass ``max_tokens`` to count only a prefix).

    Args:
        data: 1-D token ids (tensor or numpy array / memmap), e.g. the training split.
        vocab_size: The model's vocabulary size; every id must be below it.
        min_count: Minimum number of occurrences for a token to enter the pool.
        max_tokens: If given, count only the first ``max_tokens`` tokens.
        field_name: What the errors call ``data`` (`make_probe_inputs`: ``"train_data"``).

    Returns:
        ``[pool]`` int64 token ids, ascending, on ``data``'s device (CPU for numpy input).

    Raises:
        ValueError: If an argument is out of range, ``data`` holds an id outside
            ``[0, vocab_size)``, or no token occurs ``min_count`` times.
    """
    n = _check_token_data(field_name, data)
    _check_positive("vocab_size", vocab_size)
    _check_positive("min_count", min_count)
    if max_tokens is not None:
        _check_positive("max_tokens", max_tokens)
        n = min(n, max_tokens)
    device = data.device if isinstance(data, Tensor) else torch.device("cpu")
    counts = torch.zeros(vocab_size, dtype=torch.int64, device=device)
    for start in range(0, n, _SCAN_BLOCK):
        block = _read(data, start, min(n, start + _SCAN_BLOCK), field_name)
        low, high = (int(v) for v in torch.aminmax(block))
        if low < 0:
            raise ValueError(f"{field_name} holds a negative token id {low}")
        if high >= vocab_size:  # before bincount, which would allocate high + 1 counters (0xFFFFFFFF: 34 GB)
            raise ValueError(f"{field_name} holds token id {high} >= vocab_size={vocab_size}")
        counts += torch.bincount(block, minlength=vocab_size)
    pool = torch.nonzero(counts >= min_count).flatten()
    if pool.numel() == 0:
        raise ValueError(
            f"no token occurs at least min_count={min_count} times in the first {n} tokens of {field_name}"
        )
    return pool


def repeated_tokens(
    token_pool: Int[Tensor, " pool"],
    batch_size: int,
    length: int,
    generator: torch.Generator,
) -> Int[Tensor, "batch two_len"]:
    """Random token sequences followed by an exact copy: ``[batch, 2 * length]``, no BOS.

    Args:
        token_pool: 1-D tensor of token ids to draw from (uniformly, with replacement), e.g. from
            `token_pool_from_data`.
        batch_size: Number of sequences.
        length: ``L``, the length of each half.
        generator: The private generator to draw with; the global RNG is not touched.

    Returns:
        int64 tokens on the generator's device; ``out[:, L:] == out[:, :L]``.

    Raises:
        ValueError: If the pool is not a non-empty 1-D tensor, or a size is not positive.
    """
    if not isinstance(token_pool, Tensor) or token_pool.ndim != 1 or token_pool.numel() == 0:
        shape = tuple(token_pool.shape) if isinstance(token_pool, Tensor) else type(token_pool)
        raise ValueError(f"token_pool must be a non-empty 1-D tensor, got {shape}")
    _check_positive("batch_size", batch_size)
    _check_positive("length", length)
    index = torch.randint(
        token_pool.numel(), (batch_size, length), generator=generator, device=generator.device
    )  # (B, L)
    first = token_pool.to(device=generator.device, dtype=torch.int64)[index]  # (B, L)
    return torch.cat([first, first], dim=1)  # (B, 2L)


def text_batch(
    data: TokenData,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
) -> Int[Tensor, "batch seq"]:
    """Random contiguous windows of ``seq_len`` tokens from ``data``.

    Args:
        data: 1-D token ids (tensor or numpy array / memmap), e.g. the validation split.
        batch_size: Number of windows.
        seq_len: Tokens per window.
        generator: The private (CPU) generator drawing the window starts.

    Returns:
        ``[batch, seq_len]`` int64 tokens, on ``data``'s device (CPU for numpy input).

    Raises:
        ValueError: If a size is not positive or ``data`` is shorter than ``seq_len``.
    """
    n = _check_token_data("data", data)
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    if n < seq_len:
        raise ValueError(f"data has {n} tokens, fewer than seq_len={seq_len}")
    starts = torch.randint(n - seq_len + 1, (batch_size,), generator=generator, device="cpu")
    return torch.stack([_read(data, start, start + seq_len) for start in starts.tolist()])


def make_probe_inputs(
    train_data: TokenData | None,
    val_data: TokenData | None,
    vocab_size: int,
    *,
    repeat_length: int,
    repeat_batch: int,
    text_len: int,
    text_batch_size: int,
    seed: int,
    min_count: int = 1,
) -> ProbeInputs:
    """Build the fixed probe batches, identical for the same arguments on every call.

    The repeated batch draws from the tokens occurring in ``train_data`` with a private
    ``torch.Generator().manual_seed(seed)``; the text windows come from ``val_data`` with a second
    private generator seeded ``seed + 1``, so changing one batch's settings leaves the other batch
    unchanged.

    Args:
        train_data: Training token ids (token pool source); may be ``None`` if ``repeat_batch``
            is 0.
        val_data: Validation token ids (text windows); may be ``None`` if ``text_batch_size`` is 0.
        vocab_size: The model's vocabulary size.
        repeat_length: ``L``, half the length of a repeated sequence.
        repeat_batch: Number of repeated sequences; 0 for no repeated batch.
        text_len: Tokens per text window.
        text_batch_size: Number of text windows; 0 for no text batch.
        seed: Seed of the private generators (``seed`` and ``seed + 1``), in ``[-2**63, 2**64 - 1)``.
        min_count: Minimum occurrences in ``train_data`` for a token to enter the pool (which must
            then hold at least two tokens).

    Returns:
        The probe batches: the repeated one on the CPU (its private generator's device), the text one
        on the CPU, or on ``val_data``'s device for tensor input.

    Raises:
        ValueError: If a size is invalid, the data a requested batch needs is missing, or a token id
            drawn lies outside ``[0, vocab_size)``.
    """
    # plain ints from here on (numpy integers wrap around in arithmetic); the rest are checked where used
    number = integer_or_none(seed)
    if number is None or not -(2**63) <= number < 2**64 - 1:  # seed and seed + 1 go to Generator.manual_seed
        raise ValueError(f"seed must be an int in [-2**63, 2**64 - 1) (torch generators take 64 bits), "
                         f"got seed={seed!r}")
    seed = number
    sizes = []
    for field_name, value in (("repeat_batch", repeat_batch), ("text_batch_size", text_batch_size)):
        number = integer_or_none(value)
        if number is None or number < 0:
            raise ValueError(f"{field_name} must be a non-negative int, got {field_name}={value!r}")
        sizes.append(number)
    repeat_batch, text_batch_size = sizes
    vocab_size, repeat_length, text_len, min_count = (
        v if (n := integer_or_none(v)) is None else n for v in (vocab_size, repeat_length, text_len, min_count))

    repeated = None
    if repeat_batch > 0:
        if train_data is None:
            raise ValueError(f"train_data is None but repeat_batch={repeat_batch} > 0")
        _check_token_data("train_data", train_data)
        _check_positive("repeat_length", repeat_length)  # named here: repeated_tokens would call it length
        pool = token_pool_from_data(train_data, vocab_size, min_count, field_name="train_data")
        if pool.numel() < 2:  # every repeated sequence would be that one token: no position told apart
            if one_distinct_token(train_data, vocab_size, pool, min_count):
                raise ValueError(f"train_data holds one distinct token ({int(pool[0])}), so every repeated sequence "
                                 f"would be that token repeated: the repeated batch needs training data with at "
                                 f"least two")
            raise ValueError(f"only token {int(pool[0])} occurs at least min_count={min_count} times in "
                             f"train_data, so every repeated sequence would be that token repeated; lower "
                             f"min_count (LensCallback's token_min_frequency)")
        generator = torch.Generator().manual_seed(seed)
        repeated = repeated_tokens(pool, repeat_batch, repeat_length, generator)

    text = None
    if text_batch_size > 0:
        if val_data is None:
            raise ValueError(f"val_data is None but text_batch_size={text_batch_size} > 0")
        n_val = _check_token_data("val_data", val_data)
        _check_positive("text_len", text_len)  # named here: text_batch would call it seq_len
        if n_val < text_len:
            raise ValueError(f"val_data has {n_val} tokens, fewer than text_len={text_len}: give more validation "
                             f"data or a smaller text_len")
        generator = torch.Generator().manual_seed(seed + 1)
        text = text_batch(val_data, text_batch_size, text_len, generator)
        low, high = int(text.min()), int(text.max())  # the windows drawn; train_data is checked whole above
        if low < 0 or high >= vocab_size:
            bad = f"a negative token id {low}" if low < 0 else f"token id {high} >= vocab_size={vocab_size}"
            raise ValueError(f"val_data holds {bad} (in the text windows drawn)")

    return ProbeInputs(repeated=repeated, text=text)


MAX_PROBE_TOKENS = 1 << 24
"""The most tokens one probe batch may hold (16.8 M: 128 MiB of int64 ids, hours of probe step for
GPT-2 small). A mistyped batch size past it would fail in the allocator, with an error that names no
setting, or take the machine's memory."""


def check_probe_tokens(repeat_batch: int, repeat_tokens: int, text_batch: int, text_len: int) -> None:
    """Raises a ValueError naming ``repeat_batch`` or ``text_batch`` if its batch would hold more than
    `MAX_PROBE_TOKENS` tokens (``repeat_tokens``: ``2 * repeat_length``)."""
    for name, rows, length in (("repeat_batch", repeat_batch, repeat_tokens), ("text_batch", text_batch, text_len)):
        if rows * length > MAX_PROBE_TOKENS:
            raise ValueError(f"{name} = {rows} rows of {length} tokens = {rows * length:,} tokens, more than a probe "
                             f"batch may hold ({MAX_PROBE_TOKENS:,}): a probe step would read all of them")
