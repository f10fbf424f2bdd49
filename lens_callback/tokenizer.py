"""Text for a reloaded model: how a run's token ids map to text, and a tokenizer built from it offline.

A snapshot of a run on text records the mapping as plain JSON in ``config.json["metadata"]["tokenizer"]``
(`TOKENIZER_KEY`), in one of two kinds, those of `nanogpt_model.TextDataModule`:

- ``{"kind": "byte"}``: id ``i`` is the byte ``i`` of the text's UTF-8 encoding (vocabulary 256);
- ``{"kind": "char", "chars": "..."}``: id ``i`` is the character ``chars[i]`` (nanoGPT's ``itos``).

`LensCallback` takes it from its datamodule's ``tokenizer_spec()`` (`datamodule_tokenizer_spec`), and
`load_snapshot` gives the ``HookedTransformer`` an equivalent Hugging Face tokenizer
(`attach_tokenizer`), built here from the record alone: nothing is downloaded or read from disk. Then
TransformerLens's string API works on the run's own ids: ``to_tokens(text)[0]`` is the training
encoding of ``text`` (no BOS token is prepended: the run trained without one), ``to_string`` inverts
it, and ``generate`` takes and returns text.
"""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import unicodedata
from typing import Any, Mapping

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerFast

__all__ = ["END_OF_TEXT", "TOKENIZER_KEY", "attach_tokenizer", "build_tokenizer", "check_tokenizer_spec",
           "datamodule_tokenizer_spec"]

TOKENIZER_KEY = "tokenizer"
"""The key of a snapshot's ``config.json["metadata"]`` that records how its ids map to text."""

END_OF_TEXT = "<|endoftext|>"
"""The tokenizer's end-of-text token (also its BOS token, as GPT-2's): the id after the model's vocabulary
(past the record's ids and any `_placeholder` ids), one the model never predicts, so ``generate`` runs to
``max_new_tokens``; text holding the string itself is encoded as its characters (``split_special_tokens``),
never as this id. It is not the padding token, which must be an id the model can embed (`_padding_id`)."""

_COMMON_PUNCTUATION = frozenset(".,;:!?'\"-()[]{}")

_OUTSIDE = "<a character outside the run's vocabulary>"
"""The char tokenizer's unknown token, deliberately absent from its vocabulary: the ``tokenizers``
library then raises on a character the run never saw ("Unk token `<a character outside the run's
vocabulary>` not found in the vocabulary") where without one it would drop it without a word."""


def check_tokenizer_spec(spec: Any, d_vocab: int | None = None) -> dict[str, Any]:
    """``spec`` checked as a tokenizer record (the module docstring's kinds), as a new dict.

    Args:
        spec: The record.
        d_vocab: The model's vocabulary size, which the record's ids must fit in (``None``: not checked).

    Raises:
        ValueError: naming what is wrong: another kind, a missing or extra key, a repeated character, a
            lone surrogate (no character: the tokenizer could not be built), or more ids than ``d_vocab``.
    """
    if not isinstance(spec, Mapping) or spec.get("kind") not in ("byte", "char"):
        raise ValueError(f"a tokenizer record is {{'kind': 'byte'}} or {{'kind': 'char', 'chars': ...}}, got {spec!r}")
    keys = {"kind"} if spec["kind"] == "byte" else {"kind", "chars"}
    if set(spec) != keys:
        # sorted by repr: a caller's dict may hold keys of several types ({"kind": "byte", 1: 2} raised a TypeError)
        got = sorted(spec, key=repr)
        raise ValueError(f"a {spec['kind']!r} tokenizer record has the keys {sorted(keys)}, got {got}")
    if spec["kind"] == "byte":
        size = 256
    else:
        chars = spec["chars"]
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"a 'char' tokenizer record's 'chars' is a non-empty string, got {chars!r}")
        if len(set(chars)) != len(chars):
            repeated = sorted({c for c in chars if chars.count(c) > 1})
            raise ValueError(f"a 'char' tokenizer record's 'chars' holds {repeated[:5]!r} more than once: an id per character")
        surrogates = [i for i, c in enumerate(chars) if "\ud800" <= c <= "\udfff"]
        if surrogates:
            # a str of text read with errors="surrogateescape" (or a meta.pkl's, which pickles them) can hold them; the
            # tokenizers library cannot: the record was kept, and load_snapshot raised a TypeError on it
            raise ValueError(f"a 'char' tokenizer record's 'chars' holds lone surrogates, no Unicode characters, at "
                             f"ids {surrogates[:5]} ({ascii(chars[surrogates[0]])}: undecodable bytes of text read "
                             f"with errors='surrogateescape'?): no UTF-8 text holds them: no tokenizer can be built")
        size = len(chars)
    if d_vocab is not None and size > d_vocab:
        raise ValueError(f"the {spec['kind']!r} tokenizer record has {size} ids, more than the model's vocabulary "
                         f"d_vocab={d_vocab}")
    return dict(spec)


def _byte_stand_ins() -> list[str]:
    """The printable characters that stand for the 256 bytes in byte-level tokenizers (GPT-2's
    ``bytes_to_unicode``, the alphabet of the ``tokenizers`` library's ``ByteLevel`` pre-tokenizer and
    decoder): a printable byte stands for itself, the others for 256, 257, ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def _placeholder(token_id: int) -> str:
    """The text of id ``token_id`` of a model's vocabulary that the record does not describe: printable
    ASCII without a space, so that the byte-level decoder passes it through as it is."""
    return f"<|id{token_id}|>"


def _padding_id(spec: Mapping[str, Any], size: int, d_vocab: int | None) -> int:
    """The id that pads a batch of texts of unequal length: one the model can embed (TransformerLens embeds
    the padded batch, and an id past the vocabulary raised an ``IndexError`` in ``model(["ab", "abcd"])`` and
    in a batched ``generate``), and preferably one no text encodes to, because TransformerLens masks every
    trailing (right padding) or leading (left padding: batched ``generate``) token equal to it, a prompt's
    own included, as it does GPT-2's ``<|endoftext|>``. So, in this order:

    - the model's last id past the record (a `_placeholder`: no text encodes to it), where it has one;
    - for a byte record, the NUL byte (0), which text practically never holds;
    - for a char record, its first control character that is not whitespace, else its last character that
      is not a letter, digit, space or common punctuation (Shakespeare's ``&``), else its last character.
    """
    if d_vocab is not None and d_vocab > size:
        return d_vocab - 1
    if spec["kind"] == "byte":
        return 0
    chars = spec["chars"]
    control = [i for i, c in enumerate(chars) if unicodedata.category(c).startswith("C") and not c.isspace()]
    if control:
        return control[0]
    symbols = [i for i, c in enumerate(chars)
               if not (c.isalnum() or c.isspace() or c in _COMMON_PUNCTUATION)]
    return symbols[-1] if symbols else len(chars) - 1


def build_tokenizer(spec: Mapping[str, Any], d_vocab: int | None = None) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer that maps text to the ids of the tokenizer record ``spec`` and back.

    A BPE model without merges gives one id per vocabulary entry: for ``"byte"`` the entries are the
    bytes' stand-ins (`_byte_stand_ins`) behind a byte-level pre-tokenizer, so any text encodes to its
    UTF-8 bytes and decodes back (a lone byte of a longer character decodes to U+FFFD, as
    ``TextDataModule.decode`` does); for ``"char"`` they are the characters themselves, and a character
    outside them raises. A model vocabulary ``d_vocab`` larger than the record's ids (nanoGPT's padding,
    a ``vocab_size`` set above the text's characters) has its other ids as entries `_placeholder`
    (``<|id300|>``), which decode to that text and which no text encodes to (there are no merges to make
    them). `END_OF_TEXT` is the id after them all, one the model cannot predict; batches of texts of
    unequal length are padded with `_padding_id`.

    Raises:
        ValueError: for a record `check_tokenizer_spec` refuses (with ``d_vocab``).
    """
    spec = check_tokenizer_spec(spec, d_vocab)
    size = 256 if spec["kind"] == "byte" else len(spec["chars"])
    # the model's ids past the record: before, they decoded to nothing and the first of them was END_OF_TEXT,
    # where generate stopped (an early snapshot samples them most of the time)
    unused = {_placeholder(i): i for i in range(size, d_vocab or size)}
    if spec["kind"] == "byte":
        backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(_byte_stand_ins())} | unused, merges=[]))
        # no regex split and no prefix space: the text's bytes, every one of them, in order
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
    else:
        backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(spec["chars"])} | unused, merges=[],
                                       unk_token=_OUTSIDE))
        backend.decoder = decoders.Fuse()  # the characters joined as they are (the default joins with spaces)
    ids = backend.get_vocab_size()  # the record's and the placeholders
    backend.add_special_tokens([END_OF_TEXT])
    # clean_up_tokenization_spaces: decode gives the text as it is, whatever a release's default; transformers
    # 4.42 to 4.44 default to True (below the floor, 4.56, but a default may change again), which deletes the
    # space before ",", ".", "!", "?", "'s", "n't" (GPT-2's detokenizer cleanup): TransformerLens's generate
    # decodes with that default, so "a , b" came back as "a, b"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT, split_special_tokens=True,
                                        clean_up_tokenization_spaces=False)
    # The padding is an ordinary token, set after construction (the backend then does not know it as special):
    # decode(skip_special_tokens=True), which HookedTransformer.generate's text goes through, drops special tokens
    # wherever they stand, so a model's own sampled id 299 (or a char run's "&") vanished from it. The cost: a
    # batched generate's texts of shorter prompts start with their left padding.
    pad_id = _padding_id(spec, size, d_vocab)
    tokenizer.pad_token = backend.id_to_token(pad_id)
    if (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) != (ids, pad_id, ids + 1):
        # a library that numbered them otherwise would give the model's ids other meanings
        raise RuntimeError(f"the tokenizer's {END_OF_TEXT} and padding have ids {tokenizer.eos_token_id} and "
                           f"{tokenizer.pad_token_id} of {len(tokenizer)}, not {ids} (the one after the vocabulary) "
                           f"and {pad_id} of {ids + 1}")
    return tokenizer


def attach_tokenizer(model: HookedTransformer, spec: Mapping[str, Any]) -> None:
    """Gives ``model`` the tokenizer of record ``spec`` (`build_tokenizer`) through TransformerLens's
    ``set_tokenizer``, with ``cfg.default_prepend_bos = False``: the run trained without a BOS token, so
    ``to_tokens(text)`` gives the training ids and nothing before them. ``set_tokenizer`` keeps a
    tokenizer without a BOS token as it is (it would otherwise load one with a BOS from the Hub) and then
    names `END_OF_TEXT` its BOS token, which is taken back here: the model has no BOS id, and with one
    ``prepend_bos=True`` put the *text* ``<|endoftext|>`` before the prompt, which encodes as its
    characters (``split_special_tokens``): 13 byte ids of a byte run. Without one, TransformerLens (from 3.8)
    prepends nothing, as for BERT's tokenizer; older releases raise a ``TypeError`` there.

    Raises:
        ValueError: for a record `check_tokenizer_spec` refuses with the model's ``d_vocab``.
    """
    tokenizer = build_tokenizer(spec, model.cfg.d_vocab)
    model.cfg.default_prepend_bos = False
    model.set_tokenizer(tokenizer)
    assert model.tokenizer is not None  # set just now
    model.tokenizer.bos_token = None


def datamodule_tokenizer_spec(datamodule: Any, d_vocab: int | None = None) -> dict[str, Any] | None:
    """The tokenizer record of ``datamodule``: what its ``tokenizer_spec()`` method returns (a
    `TextDataModule`'s, or a user's datamodule's with the same contract), or a ``tokenizer_spec`` attribute
    or property that is not callable, checked (against the model's vocabulary ``d_vocab`` where given);
    ``None`` where it has neither or it gives ``None`` (ids that no record describes).

    Raises:
        ValueError: for a record `check_tokenizer_spec` refuses, naming the datamodule's class; what the
            method or property raises propagates, an ``AttributeError`` included.
    """
    try:
        method = getattr(datamodule, "tokenizer_spec")
    except AttributeError:
        # getattr(..., None) also swallowed the AttributeError of a property's own body (self.itos before setup): the
        # snapshots recorded no tokenizer, without the warning a method's failure gives
        if hasattr(type(datamodule), "tokenizer_spec"):
            raise
        return None
    # a record set as an attribute or a property (dm.tokenizer_spec = {"kind": "byte"}) is taken as it is: it was
    # passed over without a word, and the snapshots had no tokenizer
    spec = method() if callable(method) else method
    if spec is None:
        return None
    try:
        return check_tokenizer_spec(spec, d_vocab)
    except ValueError as err:
        where = "tokenizer_spec()" if callable(method) else "tokenizer_spec"
        raise ValueError(f"{type(datamodule).__name__}.{where}: {err}") from err
