"""Tests for `lens_callback.tokenizer`: the tokenizer records and the Hugging Face tokenizers built from them.

Real tokenizers on a real (tiny, untrained) ``HookedTransformer``; the snapshot and checkpoint loaders that attach
them are tested in ``tests/test_snapshots.py``, the callback that records them in ``tests/test_callback.py``.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig

from conftest import readme_block
from lens_callback.tokenizer import (
    END_OF_TEXT,
    _byte_stand_ins,
    attach_tokenizer,
    build_tokenizer,
    check_tokenizer_spec,
    datamodule_tokenizer_spec,
)

TEXT = "def café(x):\n    return x + '€😀' <|endoftext|>\n"
CHARS = "".join(sorted(set(TEXT)))


def tiny_model(d_vocab: int) -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=64, d_head=8, n_heads=2, d_vocab=d_vocab,
                                  act_fn="gelu", normalization_type="LN")
    return HookedTransformer(cfg)


def test_the_byte_stand_ins_are_the_byte_level_alphabet() -> None:
    """The 256 characters the byte vocabulary is made of are those the ByteLevel pre-tokenizer turns bytes into."""
    stand_ins = _byte_stand_ins()
    assert len(set(stand_ins)) == 256 and set(stand_ins) == set(pre_tokenizers.ByteLevel.alphabet())
    assert stand_ins[ord("a")] == "a" and stand_ins[0] == chr(256) and stand_ins[ord(" ")] == "Ġ"


@pytest.mark.parametrize("spec", [{"kind": "byte"}, {"kind": "char", "chars": CHARS}], ids=["byte", "char"])
def test_a_tokenizer_encodes_to_the_records_ids_and_decodes_back(spec: dict[str, Any]) -> None:
    """Each character (a UTF-8 byte) to its id, the end-of-text string in the text as its characters, not as the
    special id after the vocabulary (GPT-2's tokenizer would give that id), and back to the same text."""
    tokenizer = build_tokenizer(spec)
    expected = list(TEXT.encode()) if spec["kind"] == "byte" else [CHARS.index(c) for c in TEXT]
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == expected
    assert tokenizer.decode(ids) == TEXT
    size = 256 if spec["kind"] == "byte" else len(CHARS)
    assert tokenizer.eos_token == END_OF_TEXT and tokenizer.eos_token_id == size
    assert tokenizer.pad_token_id < size  # an id the model can embed (test_a_batch_of_texts_of_unequal_length_...)
    assert tokenizer.bos_token is None and tokenizer("")["input_ids"] == []


def test_decoding_keeps_the_spaces_before_punctuation_on_every_transformers() -> None:
    """``generate`` decodes its text with the tokenizer's own ``clean_up_tokenization_spaces``, which
    transformers 4.42 to 4.44 default to ``True`` (below the floor, 4.56, that TransformerLens 3.2 sets, but the
    tokenizer builds there too): "a , b" came back as "a, b", "don 't" as "don't". The tokenizer sets it
    itself, so no release's default reaches the run's text."""
    for spec in ({"kind": "byte"}, {"kind": "char", "chars": " ',.abdnot"}):
        tokenizer = build_tokenizer(spec)
        assert tokenizer.init_kwargs.get("clean_up_tokenization_spaces") is False  # set, not a release's default
        assert tokenizer.clean_up_tokenization_spaces is False
        text = "a , b . don 't"
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_a_character_outside_the_char_vocabulary_raises_rather_than_vanishing() -> None:
    """Without an unknown token the tokenizers library drops such a character without a word."""
    tokenizer = build_tokenizer({"kind": "char", "chars": "abc"})
    assert tokenizer("cab")["input_ids"] == [2, 0, 1]
    with pytest.raises(Exception, match="character outside the run's vocabulary"):
        tokenizer("abz")


@pytest.mark.parametrize("spec", [{"kind": "byte"}, {"kind": "char", "chars": CHARS}], ids=["byte", "char"])
def test_an_attached_tokenizer_gives_the_string_api_the_runs_ids_without_a_bos(spec: dict[str, Any],
                                                                            capsys: pytest.CaptureFixture) -> None:
    model = tiny_model(256 if spec["kind"] == "byte" else len(CHARS))
    attach_tokenizer(model, spec)
    expected = list(TEXT.encode()) if spec["kind"] == "byte" else [CHARS.index(c) for c in TEXT]
    tokens = model.to_tokens(TEXT)
    assert tokens.tolist() == [expected] and int(tokens.max()) < model.cfg.d_vocab
    assert model.to_string(tokens[0]) == TEXT
    # no BOS: asked for one, it put the characters of "<|endoftext|>" first (13 ids of a byte run); TransformerLens
    # 3.8 on prepends nothing for a tokenizer without one (before: a TypeError)
    assert model.tokenizer.bos_token is None
    try:
        with_bos = model.to_tokens(TEXT, prepend_bos=True)
    except TypeError:  # TransformerLens before 3.8 concatenates the missing BOS token to the text
        pass
    else:
        assert with_bos.tolist() == [expected]
    if spec["kind"] == "char":
        assert model.to_str_tokens(TEXT) == list(TEXT)
    out = model.generate("def ", max_new_tokens=5, do_sample=False, verbose=False)
    assert isinstance(out, str) and out.startswith("def ")
    assert model.generate("def ", max_new_tokens=5, verbose=False, return_type="tokens").shape == (1, 4 + 5)
    with warnings.catch_warnings():  # TransformerLens 3.9 deprecates the module users know it from
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens.utils import test_prompt
    test_prompt("def caf", "é", model)  # prints the answer's rank; the prompt and answer are tokenized as the run's
    assert "Tokenized prompt: ['d', 'e', 'f', ' ', 'c', 'a', 'f']" in capsys.readouterr().out


def test_the_readmes_string_api_lines_run_as_written_and_score_the_answer_they_name() -> None:
    """The README's lines for a reloaded model's tokenizer, run as written on a byte-tokenizer model. They
    called ``transformer_lens.utils.test_prompt`` with no import (``import transformer_lens`` does not load
    ``utils``: AttributeError), with TransformerLens's default ``prepend_space_to_answer=True``, which scores
    ``" ("``, two byte tokens, not the ``"("`` the line names, and used an ``ids`` they never set (README review)."""
    block = readme_block("python", "from transformer_lens.utils import test_prompt")
    model = tiny_model(256)
    attach_tokenizer(model, {"kind": "byte"})
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("ignore", DeprecationWarning)  # TransformerLens 3.9 deprecates transformer_lens.utils
        exec(block, {"model": model})  # noqa: S102 - the README's own lines
    assert "Tokenized answer: ['(']" in out.getvalue()


@pytest.mark.parametrize(("spec", "message"), [
    ({"kind": "bpe"}, r"a tokenizer record is \{'kind': 'byte'\}"),
    ("byte", r"a tokenizer record is"),
    ({"kind": "byte", "chars": "ab"}, r"a 'byte' tokenizer record has the keys \['kind'\], got \['chars', 'kind'\]"),
    ({"kind": "char"}, r"a 'char' tokenizer record has the keys \['chars', 'kind'\]"),
    ({"kind": "char", "chars": ""}, r"'chars' is a non-empty string, got ''"),
    ({"kind": "char", "chars": ["a", "b"]}, r"'chars' is a non-empty string"),
    ({"kind": "char", "chars": "abca"}, r"holds \['a'\] more than once"),
])
def test_a_record_that_is_not_one_is_refused_saying_why(spec: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_tokenizer_spec(spec)


def test_a_char_record_holding_a_lone_surrogate_is_refused_when_checked_not_when_a_snapshot_reloads() -> None:
    """A ``str`` can hold a lone surrogate (text read with ``errors="surrogateescape"``, a ``meta.pkl``'s table,
    which pickles them), JSON keeps it, and the check passed it: ``attach(tokenizer_spec=...)`` and the datamodule's
    record took it and the snapshots recorded it, and only the reload raised, a ``TypeError`` from the tokenizers
    library ("failed to extract enum PyVocab"). Now the check refuses it, naming the ids."""
    record = {"kind": "char", "chars": "ab\udcff\n"}
    with pytest.raises(ValueError, match=r"'chars' holds lone surrogates, no Unicode characters, at ids \[2\] "
                                         r"\('\\udcff'"):
        check_tokenizer_spec(record)
    with pytest.raises(ValueError, match=r"lone surrogates"):
        build_tokenizer(record)

    class Surrogates:
        def tokenizer_spec(self) -> Any:
            return record

    with pytest.raises(ValueError, match=r"Surrogates.tokenizer_spec\(\): .*lone surrogates"):
        datamodule_tokenizer_spec(Surrogates(), 4)
    assert build_tokenizer({"kind": "char", "chars": "ab\U0001f600\n"})("a\U0001f600")["input_ids"] == [0, 2]


def test_a_record_with_keys_of_several_types_is_refused_saying_why() -> None:
    """A caller's dict (``attach(tokenizer_spec=...)``) may have a key that is no ``str``: listing the keys raised
    ``TypeError: '<' not supported between instances of 'int' and 'str'``."""
    with pytest.raises(ValueError, match=r"a 'byte' tokenizer record has the keys \['kind'\], got \['kind', 1\]"):
        check_tokenizer_spec({"kind": "byte", 1: 2})


def test_a_record_with_more_ids_than_the_model_has_is_refused() -> None:
    with pytest.raises(ValueError, match=r"the 'byte' tokenizer record has 256 ids, more than the model's "
                                         r"vocabulary d_vocab=64"):
        attach_tokenizer(tiny_model(64), {"kind": "byte"})
    model = tiny_model(300)  # a vocabulary padded past the record's ids is fine
    attach_tokenizer(model, {"kind": "byte"})
    assert model.to_tokens("é").tolist() == [[195, 169]]


@pytest.mark.parametrize("spec", [{"kind": "byte"}, {"kind": "char", "chars": CHARS}], ids=["byte", "char"])
def test_ids_past_the_record_in_a_larger_vocabulary_show_and_never_end_the_text(spec: dict[str, Any]) -> None:
    """A model whose vocabulary is larger than the record's ids (``lens-train`` on ``tokenizer="char"`` text with
    the config's ``vocab_size: 256``, nanoGPT's vocabulary padding) can predict those ids; an early snapshot samples
    them most of the time. They decoded to nothing, and the first of them was the end-of-text id, where
    ``generate`` stopped: ``generate("hello ", max_new_tokens=40)`` of a step-0 snapshot gave "hello av"."""
    size = 256 if spec["kind"] == "byte" else len(CHARS)
    model = tiny_model(size + 3)
    attach_tokenizer(model, spec)
    assert model.tokenizer.eos_token_id == model.cfg.d_vocab  # the id after the model's vocabulary: never predicted
    assert model.to_string(torch.tensor([size - 1, size, size + 2])).endswith(f"<|id{size}|><|id{size + 2}|>")
    if spec["kind"] == "byte":  # the placeholder's text is its characters, never the id
        assert model.to_tokens(f"<|id{size}|>")[0].tolist() == list(f"<|id{size}|>".encode())
    with torch.no_grad():
        model.unembed.b_U[:] = -1e4
        model.unembed.b_U[size:] = 1e4  # a model that predicts only ids past the record
    text = model.generate("def ", max_new_tokens=4, do_sample=False, verbose=False)
    shown = re.fullmatch(r"def ((?:<\|id\d+\|>){4})", text)  # all four ids, none the end of the text
    assert shown and all(size <= int(i) < size + 3 for i in re.findall(r"\d+", shown[1])), text


SHORT_CHARS = "\n !&',.:;?ABCabcdefz"  # Shakespeare's kinds of character: "&" is the only rare symbol


@pytest.mark.parametrize(("spec", "d_vocab", "pad_id"), [
    ({"kind": "byte"}, 256, 0),  # no id past the record: the NUL byte
    ({"kind": "byte"}, 259, 258),  # the model's last id, one no text encodes to
    ({"kind": "char", "chars": SHORT_CHARS}, len(SHORT_CHARS), SHORT_CHARS.index("&")),
    ({"kind": "char", "chars": SHORT_CHARS}, len(SHORT_CHARS) + 3, len(SHORT_CHARS) + 2),
], ids=["byte", "byte-padded-vocab", "char", "char-padded-vocab"])
def test_a_batch_of_texts_of_unequal_length_runs_and_generates_as_each_text_alone(spec: dict[str, Any], d_vocab: int,
                                                                                 pad_id: int) -> None:
    """The padding was the end-of-text id after the vocabulary, which the model cannot embed: ``model(["ab",
    "abcd"])`` and a batched ``generate`` raised an ``IndexError``. Now each text of a right-padded forward gets
    its own logits, and a batched (left-padded, masked) ``generate`` its own greedy continuation, behind its
    padding, which stays in the text: a special padding token would be dropped wherever it stands."""
    model = tiny_model(d_vocab)
    attach_tokenizer(model, spec)
    assert model.tokenizer.pad_token_id == pad_id
    texts = ["ab", "abcd"]
    tokens = model.to_tokens(texts)
    assert tokens[0].tolist() == model.to_tokens("ab")[0].tolist() + [pad_id] * 2
    batch = model(texts)
    for row, text in enumerate(texts):
        torch.testing.assert_close(batch[row, :len(text)], model(text)[0])
    together = model.generate(texts, max_new_tokens=4, do_sample=False, verbose=False)
    alone = [model.generate(text, max_new_tokens=4, do_sample=False, verbose=False) for text in texts]
    padding = model.tokenizer.decode([pad_id])
    assert model.tokenizer.decode([pad_id], skip_special_tokens=True) == padding  # what generate's text goes through
    assert together == [padding * 2 + alone[0], alone[1]]


def test_a_char_run_with_no_spare_id_pads_with_its_rarest_looking_character() -> None:
    """A padding equal to a prompt's own last (first, in a batched ``generate``) token is masked by
    TransformerLens, so the char record's padding is a control character, else a symbol that is not common
    punctuation, else its last character; never the newline at id 0 that a prompt so often ends with."""
    def pad_of(chars: str) -> str:
        model = tiny_model(len(chars))
        attach_tokenizer(model, {"kind": "char", "chars": chars})
        return model.tokenizer.pad_token

    assert pad_of("\n\x00 !&ab") == "\x00"
    assert pad_of("\n !$&',-.3:;?AZaz") == "&"
    assert pad_of("\n !,.abc") == "c"
    assert pad_of("\n\t ") == " "


def test_a_datamodules_record_comes_from_its_tokenizer_spec_method() -> None:
    class Plain:
        pass

    class Recording:
        def __init__(self, spec: Any) -> None:
            self.spec = spec

        def tokenizer_spec(self) -> Any:
            return self.spec

    assert datamodule_tokenizer_spec(Plain()) is None and datamodule_tokenizer_spec(None) is None
    assert datamodule_tokenizer_spec(Recording(None)) is None
    assert datamodule_tokenizer_spec(Recording({"kind": "byte"})) == {"kind": "byte"}
    with pytest.raises(ValueError, match=r"Recording.tokenizer_spec\(\): a tokenizer record is"):
        datamodule_tokenizer_spec(Recording({"kind": "gpt2"}))

    class Attribute:  # the record set as a value, not a method: it was passed over without a word (mutation review)
        tokenizer_spec = {"kind": "char", "chars": "ab"}

    class Property:
        @property
        def tokenizer_spec(self) -> Any:
            return {"kind": "byte"}

    assert datamodule_tokenizer_spec(Attribute()) == {"kind": "char", "chars": "ab"}
    assert datamodule_tokenizer_spec(Property()) == {"kind": "byte"}
    Attribute.tokenizer_spec = "byte"
    with pytest.raises(ValueError, match=r"Attribute.tokenizer_spec: a tokenizer record is"):
        datamodule_tokenizer_spec(Attribute())


def test_a_datamodules_tokenizer_spec_property_that_raises_attribute_error_is_not_taken_for_no_record() -> None:
    """``getattr(datamodule, "tokenizer_spec", None)`` swallowed an ``AttributeError`` raised inside a property (a
    table read before ``setup``): the snapshots recorded no tokenizer and the callback, which warns when the record
    fails, said nothing. Now it propagates, as a method's does (the callback warns, naming it) (tok review)."""
    class Unready:
        @property
        def tokenizer_spec(self) -> Any:
            return {"kind": "char", "chars": "".join(self.itos)}  # type: ignore[attr-defined] - set in setup

    with pytest.raises(AttributeError, match="itos"):
        datamodule_tokenizer_spec(Unready())

    class Instance:  # an attribute of the instance only: missing on another instance means no record
        def __init__(self, spec: Any = None) -> None:
            if spec is not None:
                self.tokenizer_spec = spec

    assert datamodule_tokenizer_spec(Instance()) is None
    assert datamodule_tokenizer_spec(Instance({"kind": "byte"})) == {"kind": "byte"}


def test_a_checked_record_is_a_copy_that_the_callers_dict_cannot_change() -> None:
    """``attach(tokenizer_spec=...)`` keeps the checked record for the snapshots it writes later: a change the
    caller makes to its own dict after the attach must not reach them."""
    record = {"kind": "char", "chars": "abc"}
    checked = check_tokenizer_spec(record, 3)
    record["chars"] = "xyz"
    assert checked == {"kind": "char", "chars": "abc"}


@pytest.mark.parametrize("spec", [{"kind": "byte"}, {"kind": "char", "chars": CHARS}], ids=["byte", "char"])
def test_building_attaching_and_using_a_tokenizer_touches_no_network_and_no_pickle(
        spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The record alone makes the tokenizer (the module docstring): TransformerLens's ``set_tokenizer`` would load a
    tokenizer with a BOS token from the Hub for one that has a BOS token and no ``add_bos_token``, and
    transformers reads a pickled vocabulary for some slow tokenizers. A guard: every socket connection and every
    unpickling raise here and is counted (a library may catch the error and go on), through the attach and the
    string API (tok review)."""
    import pickle
    import socket

    attempts: list[tuple[Any, ...]] = []

    def refused(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise AssertionError("network access or unpickling on the tokenizer's path")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refused)
    for module, name in ((socket, "create_connection"), (socket, "getaddrinfo"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refused)
    model = tiny_model(256 if spec["kind"] == "byte" else len(CHARS) + 2)
    attach_tokenizer(model, spec)
    tokens = model.to_tokens([TEXT, TEXT[:5]])
    assert model.to_string(tokens[0]) == TEXT and model.to_str_tokens("def")[0] == "d"
    assert model.generate("def ", max_new_tokens=3, do_sample=False, verbose=False).startswith("def ")
    assert attempts == []
