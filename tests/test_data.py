"""``TextDataModule`` and ``WindowBatches``: the three sources, determinism, RNG hygiene, safe ``meta.pkl``."""

from __future__ import annotations

import builtins
import os
import pickle
import shlex
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import lightning as L
import numpy as np
import pytest
import torch

from nanogpt_model import GPTConfig, NanoGPTModule, TextDataModule, default_corpus, read_meta
from nanogpt_model import data as data_module
from nanogpt_model.data import default_corpus_files
from nanogpt_model.data import GPT2_VOCAB_SIZE, WindowBatches


def _is_window(data: np.ndarray, row: np.ndarray) -> bool:
    """Whether ``row`` occurs as a contiguous run of ``data`` (aligned to its item size)."""
    haystack = np.ascontiguousarray(data).tobytes()
    needle = np.ascontiguousarray(row.astype(data.dtype)).tobytes()
    pos = haystack.find(needle)
    while pos != -1:
        if pos % data.itemsize == 0:
            return True
        pos = haystack.find(needle, pos + 1)
    return False


def _check_batches(dm: TextDataModule, n: int = 3) -> None:
    """``n`` training and validation batches are shifted windows of their own split."""
    for loader, split in ((dm.train_dataloader(), dm.train_data), (dm.val_dataloader(), dm.val_data)):
        for _, (x, y) in zip(range(n), loader):
            assert x.shape == y.shape == (dm.batch_size, dm.block_size)
            assert x.dtype == y.dtype == torch.int64
            assert torch.equal(y[:, :-1], x[:, 1:])
            for xr, yr in zip(x.numpy(), y.numpy()):
                assert _is_window(split, np.concatenate([xr, yr[-1:]]))



def test_default_corpus_leaves_out_site_hooks_and_links_out_of_the_stdlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian's stdlib links sitecustomize.py into /etc: machine configuration, not the release."""
    stdlib, etc = tmp_path / "lib", tmp_path / "etc"
    stdlib.mkdir(), etc.mkdir()
    for name in ("abc.py", "os.py", "_sysconfigdata__linux_x86_64-linux-gnu.py", "usercustomize.py"):
        (stdlib / name).write_text("x = 1\n")
    (etc / "sitecustomize.py").write_text("import apport\n")
    (etc / "outside.py").write_text("y = 2\n")
    (stdlib / "sitecustomize.py").symlink_to(etc / "sitecustomize.py")
    (stdlib / "zlink_out.py").symlink_to(etc / "outside.py")
    (stdlib / "os_alias.py").symlink_to(stdlib / "os.py")  # a link within the stdlib stays
    monkeypatch.setattr(data_module.sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    assert [f.name for f in default_corpus_files()] == ["abc.py", "os.py", "os_alias.py"]

# -- the three sources ----------------------------------------------------------------------------
def test_default_corpus_is_deterministic_python_source() -> None:
    corpus = default_corpus()
    assert corpus.dtype == np.uint8 and len(corpus) > 100_000
    assert np.array_equal(corpus, default_corpus())
    text = corpus.tobytes()
    assert b"\ndef " in text and b"\nimport " in text and b"class " in text
    # nothing written by the interpreter's build (its build directory, timestamp and install prefix)
    assert not [f.name for f in default_corpus_files() if f.name.startswith("_sysconfigdata")]

    dm = TextDataModule(block_size=32, batch_size=4, val_fraction=0.1)
    dm.setup()
    assert dm.vocab_size == 256 and dm.source == "stdlib"
    assert np.array_equal(np.concatenate([dm.train_data, dm.val_data]), corpus)
    assert len(dm.val_data) == len(corpus) - int(len(corpus) * 0.9)
    _check_batches(dm)


def test_text_file_byte_level(tiny_text_file: Path) -> None:
    text = tiny_text_file.read_text(encoding="utf-8")
    dm = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=4)
    dm.setup()
    assert dm.vocab_size == 256
    everything = np.concatenate([dm.train_data, dm.val_data])
    assert everything.tobytes() == text.encode("utf-8")
    assert dm.decode(torch.from_numpy(everything.astype(np.int64))) == text
    _check_batches(dm)


def test_text_file_char_level_round_trips(tiny_text_file: Path) -> None:
    text = tiny_text_file.read_text(encoding="utf-8")
    dm = TextDataModule(text_path=str(tiny_text_file), tokenizer="char", block_size=16, batch_size=4)
    dm.setup()
    assert dm.vocab_size == len(set(text)) and dm.itos == sorted(set(text))
    everything = np.concatenate([dm.train_data, dm.val_data])
    assert len(everything) == len(text)  # one id per character, "—" and "é" included
    assert dm.decode(everything.tolist()) == text
    x, _ = next(iter(dm.train_dataloader()))
    assert dm.decode(x[0]) in text
    _check_batches(dm)


def test_char_level_text_with_more_than_256_characters_round_trips(tmp_path: Path) -> None:
    """Char ids go up to vocab_size - 1: a 300-character alphabet (CJK text) must not wrap around at 256."""
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 4
    path = tmp_path / "zh.txt"
    path.write_text(text, encoding="utf-8")
    dm = TextDataModule(text_path=str(path), tokenizer="char", block_size=16, batch_size=2)
    dm.setup()
    everything = np.concatenate([dm.train_data, dm.val_data])
    assert dm.vocab_size == 300 and int(everything.max()) == 299
    assert dm.decode(everything.tolist()) == text


def test_char_level_text_with_more_characters_than_uint16_holds(tmp_path: Path) -> None:
    """Char ids were stored as uint16: 65,537 distinct characters ended in an OverflowError."""
    chars = [chr(c) for c in range(0x20, 0x110000) if not 0xD800 <= c < 0xE000][: (1 << 16) + 1]
    path = tmp_path / "wide.txt"
    path.write_text("".join(chars), encoding="utf-8")
    dm = TextDataModule(text_path=str(path), tokenizer="char", block_size=16, batch_size=2)
    dm.setup()
    everything = np.concatenate([dm.train_data, dm.val_data])
    assert dm.vocab_size == len(chars) and int(everything.max()) == len(chars) - 1
    assert dm.decode(everything[-3:].tolist()) == "".join(chars[-3:])


def test_decode_before_setup_reads_the_character_table(tiny_text_file: Path) -> None:
    """decode() before setup() decoded char ids as bytes (no table loaded yet)."""
    dm = TextDataModule(text_path=str(tiny_text_file), tokenizer="char", block_size=16, batch_size=4)
    text = tiny_text_file.read_text(encoding="utf-8")
    ids = [sorted(set(text)).index(c) for c in text[:20]]
    assert dm.decode(ids) == text[:20]


@pytest.mark.parametrize("size", [0, 7])
def test_a_token_file_of_no_whole_ids_is_refused_naming_it(make_nanogpt_data_dir: Callable[..., Path],
                                                           size: int) -> None:
    root = make_nanogpt_data_dir()
    (root / "val.bin").write_bytes(b"\x01" * size)
    with pytest.raises(ValueError, match=rf"val\.bin holds {size} bytes: .*uint16 token ids"):
        TextDataModule(data_dir=str(root), block_size=16, batch_size=4).setup()


def test_a_missing_data_dir_is_refused_with_its_absolute_path_and_how_to_make_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped configs name relative data dirs (``data/openwebtext``): the refusal says where that
    is and how to make the files, not only what is missing (CLI review)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "openwebtext").mkdir(parents=True)
    (tmp_path / "data" / "openwebtext" / "val.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError) as info:
        TextDataModule(data_dir="data/openwebtext")
    message = str(info.value)
    assert "lacks ['train.bin']" in message
    assert str(tmp_path / "data" / "openwebtext") in message
    assert "data/openwebtext/prepare.py" in message and "--data.data_dir" in message


def test_nanogpt_data_dir(make_nanogpt_data_dir: Callable[..., Path]) -> None:
    root = make_nanogpt_data_dir()
    meta = read_meta(root / "meta.pkl")
    dm = TextDataModule(data_dir=str(root), block_size=16, batch_size=4)
    dm.setup()
    assert dm.vocab_size == meta["vocab_size"]
    assert np.array_equal(dm.train_data, np.fromfile(root / "train.bin", dtype=np.uint16))
    assert np.array_equal(dm.val_data, np.fromfile(root / "val.bin", dtype=np.uint16))
    x, _ = next(iter(dm.train_dataloader()))
    assert dm.decode(x[0]) == "".join(meta["itos"][i] for i in x[0].tolist())
    _check_batches(dm)


def test_nanogpt_data_dir_without_meta_is_gpt2_bpe(make_nanogpt_data_dir: Callable[..., Path]) -> None:
    dm = TextDataModule(data_dir=str(make_nanogpt_data_dir(meta={})), block_size=16, batch_size=2)
    dm.setup()
    assert dm.vocab_size == GPT2_VOCAB_SIZE
    _check_batches(dm, n=1)
    # BPE ids read as bytes gave '' for "Hello world" (15496, 995) and wrong text below 256 (review)
    with pytest.raises(ValueError, match=r"cannot decode the 50257-token ids of .*no meta.pkl, so its ids are GPT-2 BPE"):
        dm.decode([15496, 995])


def test_decode_reads_a_data_dirs_table_or_bytes(make_nanogpt_data_dir: Callable[..., Path]) -> None:
    """A meta.pkl of 256 ids without 'itos' is bytes (the diff review: refused as GPT-2 BPE); an 'itos'
    list is read as a dict is; a larger vocabulary without a table is refused, naming its meta.pkl."""
    text = "hello world, a byte-level text " * 20
    ids = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16)
    cases = (({"vocab_size": 256}, ids, text[:20]), ({"vocab_size": 300}, ids, None),
             ({"vocab_size": 128}, ids, None))  # a character table of 128 without itos: not bytes (second review)
    for meta, tokens, expected in cases:
        root = make_nanogpt_data_dir(name=f"v{meta['vocab_size']}", meta=meta)
        tokens.tofile(root / "train.bin"), tokens.tofile(root / "val.bin")
        dm = TextDataModule(data_dir=str(root), block_size=16, batch_size=2)
        if expected is not None:
            assert dm.decode(tokens[:20].tolist()) == expected
        else:
            with pytest.raises(ValueError, match=rf"cannot decode the {meta['vocab_size']}-token ids .*its meta.pkl "
                                                 r"has no 'itos' or 'stoi'"):
                dm.decode([1])
    chars = sorted(set(text))
    root = make_nanogpt_data_dir(name="itos_list", text=text,
                                 meta={"vocab_size": len(chars), "itos": chars, "stoi": {c: i for i, c in enumerate(chars)}})
    assert TextDataModule(data_dir=str(root), block_size=16, batch_size=2).decode([chars.index("h")]) == "h"
    root = make_nanogpt_data_dir(name="stoi_only", text=text,
                                 meta={"vocab_size": len(chars), "stoi": {c: i for i, c in enumerate(chars)}})
    assert TextDataModule(data_dir=str(root), block_size=16, batch_size=2).decode([chars.index("h")]) == "h"


def test_decode_refuses_ids_outside_the_table(tiny_text_file: Path) -> None:
    """Bytes past 255 were dropped without a word; a character id past the table raised IndexError."""
    for tokenizer, size in (("byte", 256), ("char", None)):
        dm = TextDataModule(text_path=str(tiny_text_file), tokenizer=tokenizer, block_size=16, batch_size=2)
        dm.setup()
        size = size or len(dm.itos)
        assert dm.decode([size - 1]) is not None
        with pytest.raises(ValueError, match=rf"ids \[{size}, -1\] are outside the vocabulary 0\.\.{size - 1}"):
            dm.decode([0, size, -1])


def test_tokenizer_spec_records_the_mapping_decode_uses(tiny_text_file: Path,
                                                       make_nanogpt_data_dir: Callable[..., Path]) -> None:
    """``tokenizer_spec()`` is what LensCallback records in its snapshots: bytes for the default corpus, a byte-level
    text and a data dir of 256 ids without a table; the character table of a char-level text and of a meta.pkl of one
    character per id; nothing for GPT-2 BPE ids or a table of longer strings, which no record describes."""
    text = tiny_text_file.read_text(encoding="utf-8")
    assert TextDataModule(block_size=16).tokenizer_spec() == {"kind": "byte"}
    assert TextDataModule(text_path=str(tiny_text_file), block_size=16).tokenizer_spec() == {"kind": "byte"}
    assert TextDataModule(text_path=str(tiny_text_file), tokenizer="char", block_size=16).tokenizer_spec() == {
        "kind": "char", "chars": "".join(sorted(set(text)))}
    assert TextDataModule(data_dir=str(make_nanogpt_data_dir()), block_size=16).tokenizer_spec() == {
        "kind": "char", "chars": "".join(sorted(set(text)))}  # the fixture's meta.pkl is nanoGPT's shakespeare_char's
    assert TextDataModule(data_dir=str(make_nanogpt_data_dir("bpe", meta={})), block_size=16).tokenizer_spec() is None
    ids = np.frombuffer(b"hello world " * 20, dtype=np.uint8).astype(np.uint16)
    chars = [chr(0x100 + i) for i in range(128)]  # id i is chars[i]
    for name, meta, spec in (("bytes", {"vocab_size": 256}, {"kind": "byte"}),
                             ("words", {"vocab_size": 300, "itos": ["he", "llo", *map(chr, range(298))]}, None),
                             # an itos dict in any order is read by id; an itos list needs no stoi beside it
                             ("by_id", {"vocab_size": 128, "itos": dict(reversed(list(enumerate(chars))))},
                              {"kind": "char", "chars": "".join(chars)}),
                             ("list", {"vocab_size": 128, "itos": chars}, {"kind": "char", "chars": "".join(chars)}),
                             # two ids of one character: text has no one encoding, so no record
                             ("repeated", {"vocab_size": 128, "itos": chars[:127] + chars[:1]}, None),
                             # ids with no entry (nanoGPT looks ids up in the dict, so such a table trains): the
                             # entries were closed up, every id after the gap recorded as the next id's character
                             ("from_1", {"vocab_size": 129, "itos": dict(enumerate(chars, start=1))}, None),
                             ("no_ids", {"vocab_size": 128, "itos": {"a": "a"}}, None),  # no record of no chars
                             ("gap", {"vocab_size": 128, "stoi": {c: i + (i >= 64) for i, c in enumerate(chars[:127])}},
                              None)):
        root = make_nanogpt_data_dir(name, meta=meta)
        ids.tofile(root / "train.bin"), ids.tofile(root / "val.bin")
        assert TextDataModule(data_dir=str(root), block_size=16).tokenizer_spec() == spec


def test_a_stoi_giving_two_characters_one_id_trains_but_decodes_that_id_as_neither(
        make_nanogpt_data_dir: Callable[..., Path]) -> None:
    """The table turned round kept the last of the two characters, unseen: the id decoded, and was recorded in
    the snapshots' tokenizer, as that one (small-items review). Such a table (a case-folding vocabulary) trains
    in nanoGPT, so it still loads, with a warning naming the ids and characters; those ids decode as neither, the
    others as before, and no tokenizer is recorded. An itos beside it says which one an id decodes as."""
    stoi = {"a": 0, "b": 0, "c": 1, "d": 2, "e": 2, "z": 9}  # z: an id outside vocab_size, left out as before
    shared, with_itos = (make_nanogpt_data_dir(name, meta={"vocab_size": 3, "stoi": stoi, **itos}) for name, itos in (
        ("shared_ids", {}), ("with_itos", {"itos": ["a", "c", "d"]})))
    for root in (shared, with_itos):
        np.array([0, 1, 2] * 20, dtype=np.uint16).tofile(root / "train.bin")
        np.array([0, 1, 2] * 20, dtype=np.uint16).tofile(root / "val.bin")
    with pytest.warns(UserWarning, match=r"shared_ids/meta.pkl: its stoi maps several characters to one id "
                                         r"\(id 0: 'a', 'b'; id 2: 'd', 'e'\): such an id decodes as none of "
                                         r"them \(decode refuses it\) and no tokenizer is recorded"):
        data = TextDataModule(data_dir=str(shared), block_size=8)
        assert data.tokenizer_spec() is None  # reads the data dir
    assert data.decode([1, 1]) == "cc"
    with pytest.raises(ValueError, match=r"ids \[0, 2\] have no entry in the table of .*shared_ids's meta.pkl \(a "
                                         r"gap in it, or an id its stoi gives several characters\)"):
        data.decode([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an itos says which character: no warning
        assert TextDataModule(data_dir=str(with_itos), block_size=8).decode([0, 1, 2]) == "acd"


def test_decode_reads_a_meta_tables_ids_as_the_table_gives_them_and_refuses_those_it_lacks(
        make_nanogpt_data_dir: Callable[..., Path]) -> None:
    """A meta.pkl table whose ids have a gap: closed up, id 65 decoded as id 66's character."""
    chars = [chr(0x100 + i) for i in range(127)]
    ids = np.arange(128, dtype=np.uint16).repeat(4)
    stoi = {c: i + (i >= 64) for i, c in enumerate(chars)}  # no id 64
    root = make_nanogpt_data_dir("gap", meta={"vocab_size": 128, "stoi": stoi})
    ids.tofile(root / "train.bin"), ids.tofile(root / "val.bin")
    dm = TextDataModule(data_dir=str(root), block_size=16)
    assert dm.decode([0, 63, 65, 127]) == chars[0] + chars[63] + chars[64] + chars[126]
    with pytest.raises(ValueError, match=r"ids \[64\] have no entry in the table of .*gap's meta.pkl"):
        dm.decode([1, 64])
    # a table ending before vocab_size: its last ids have no entry either, inside the vocabulary (small-items review)
    short = make_nanogpt_data_dir("short", meta={"vocab_size": 130, "stoi": stoi})  # ids 0..127 of 0..129
    ids.tofile(short / "train.bin"), ids.tofile(short / "val.bin")
    dm = TextDataModule(data_dir=str(short), block_size=16)
    assert dm.decode([127]) == chars[126]
    with pytest.raises(ValueError, match=r"ids \[128, 129\] have no entry in the table of .*short's meta.pkl"):
        dm.decode([128, 129])
    with pytest.raises(ValueError, match=r"ids \[130\] are outside the vocabulary 0\.\.129 of .*short"):
        dm.decode([130])


# -- determinism and RNG hygiene ------------------------------------------------------------------
def _batches(dm: TextDataModule, n: int = 3) -> list[torch.Tensor]:
    return [x for _, (x, _) in zip(range(n), dm.train_dataloader())]


def test_same_seed_same_batches_other_seed_differs(tiny_text_file: Path) -> None:
    def make(seed: int) -> TextDataModule:
        return TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=4, seed=seed)

    first, again, other = _batches(make(1)), _batches(make(1)), _batches(make(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0], first[1])  # successive batches differ too


def test_batch_k_is_independent_of_history_and_start_shifts(tiny_text_file: Path) -> None:
    data = np.frombuffer(tiny_text_file.read_bytes(), dtype=np.uint8)
    loader = WindowBatches(data, block_size=8, batch_size=3, seed=5, stream=0, num_batches=6)
    assert len(loader) == 6
    iterated = list(loader)
    assert len(iterated) == 6
    fresh = WindowBatches(data, block_size=8, batch_size=3, seed=5, stream=0, num_batches=6)
    for k in (4, 0, 2):  # out of order, from a fresh object
        assert torch.equal(fresh.batch(k)[0], iterated[k][0])
        assert torch.equal(fresh.batch(k)[1], iterated[k][1])
    assert torch.equal(list(loader)[0][0], iterated[0][0])  # every pass starts at 0 without ``start``

    shifted = WindowBatches(data, block_size=8, batch_size=3, seed=5, stream=0, num_batches=3, start=lambda: 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(shifted, iterated[2:5]))

    other_stream = WindowBatches(data, block_size=8, batch_size=3, seed=5, stream=1, num_batches=1)
    other_rank = WindowBatches(data, block_size=8, batch_size=3, seed=5, stream=0, num_batches=1, rank=1)
    assert not torch.equal(other_stream.batch(0)[0], iterated[0][0])
    assert not torch.equal(other_rank.batch(0)[0], iterated[0][0])


def test_validation_batches_repeat_every_pass(tiny_text_file: Path) -> None:
    dm = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2, val_batches=2)
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(first) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert not torch.equal(first[0][0], next(iter(dm.train_dataloader()))[0])  # separate streams


def _under_trainer(dm: TextDataModule, batches_taken: int = 0, global_rank: int = 0) -> TextDataModule:
    """``dm`` as a ``Trainer`` holds it: only the attributes the loaders read."""
    progress = SimpleNamespace(total=SimpleNamespace(completed=batches_taken))
    dm.trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
                                 global_rank=global_rank, overfit_batches=0,
                                 state=SimpleNamespace(fn="fit", status="running"))
    return dm


def test_a_resumed_loader_starts_after_the_batches_taken(tiny_text_file: Path) -> None:
    dm = _under_trainer(TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2), batches_taken=6)
    loader = dm.train_dataloader()
    assert torch.equal(next(iter(loader))[0], loader.batch(6)[0])


class _TwoOptimizersByHand(NanoGPTModule):
    """Manual optimization, two optimizers: the global step moves by 2 per batch."""

    def __init__(self) -> None:
        super().__init__(GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16), learning_rate=1e-2)
        self.automatic_optimization = False

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        params = list(self.model.parameters())
        return [torch.optim.AdamW(params[:2], lr=1e-2), torch.optim.SGD(params[2:], lr=1e-2)]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.seen.append(int(batch[0][0, 0]))
        first, second = self.optimizers()
        _, loss = self(*batch)
        self.manual_backward(loss)
        first.step(), second.step()
        first.zero_grad(), second.zero_grad()


class _Recording(NanoGPTModule):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(int(batch[0][0, 0]))
        return super().training_step(batch, batch_idx)


class _StopAfterStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_resumed_run_trains_on_the_batches_the_uninterrupted_one_does(
        tiny_text_file: Path, tmp_path: Path, accumulate: int) -> None:
    """The loader started each pass at global_step x accumulate_grad_batches: with two optimizers
    stepped by hand (2 steps per batch) it skipped batches, in a resumed run and at every new epoch
    (observer review); with accumulate_grad_batches=3 over epochs of 4 batches, each epoch's short
    last accumulation (one optimizer step for one batch) skipped two."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(steps: int, ckpt: Path | None = None, stop: int | None = None) -> list[int]:
        L.seed_everything(0, verbose=False)
        module = _TwoOptimizersByHand() if accumulate == 1 else _Recording(
            GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
        module.seen = []
        saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            accumulate_grad_batches=accumulate, callbacks=[saver] + ([_StopAfterStep(stop)] if stop else []))
        dm = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2, batches_per_epoch=4)
        trainer.fit(module, dm, ckpt_path=ckpt)
        return module.seen

    steps, stop_at = (16, 6) if accumulate == 1 else (5, 3)  # mid-epoch: batch 3; batches 4-6 of epoch 2
    whole = fit(steps)
    loader = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2).train_dataloader()
    assert whole == [int(loader.batch(k)[0][0, 0]) for k in range(len(whole))]  # no batch skipped
    fit(steps, stop=stop_at)
    resumed = fit(steps, ckpt=tmp_path / f"step={stop_at}.ckpt")
    assert resumed == whole[len(whole) - len(resumed):] and len(resumed) < len(whole)


def test_overfit_batches_trains_on_the_same_batches_every_epoch_also_when_resumed(
        tiny_text_file: Path, tmp_path: Path) -> None:
    """``Trainer(overfit_batches=n)`` promises the same n batches every epoch (Lightning turns a
    DataLoader's shuffling off for it); the loader started each pass at the training batches taken, so
    every epoch drew new windows and nothing was overfit (Lightning callbacks review)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(ckpt: Path | None = None, stop: int | None = None) -> list[int]:
        L.seed_everything(0, verbose=False)
        module = _Recording(GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
        module.seen = []
        saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = L.Trainer(max_epochs=3, overfit_batches=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[saver] + ([_StopAfterStep(stop)] if stop else []))
        dm = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2, batches_per_epoch=4)
        trainer.fit(module, dm, ckpt_path=ckpt)
        return module.seen

    whole = fit()
    loader = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2).train_dataloader()
    assert whole == [int(loader.batch(k)[0][0, 0]) for k in (0, 1)] * 3
    fit(stop=3)  # mid-epoch: the second epoch's first batch
    assert fit(ckpt=tmp_path / "step=3.ckpt") == whole[3:]


def test_a_loader_passed_without_its_datamodule_draws_new_windows_each_epoch(tiny_text_file: Path,
                                                                             tmp_path: Path) -> None:
    """``fit(model, train_dataloaders=dm.train_dataloader())`` gives the datamodule no trainer: the loader
    started every epoch at batch 0 (each epoch the same windows); it now continues its own count, and a
    resume, which it cannot place, warns that the sequence starts again."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(ckpt: Path | None = None) -> list[int]:
        module = _Recording(GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
        module.seen = []
        dm = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2, batches_per_epoch=3)
        # a validate(datamodule=dm) first leaves dm.trainer set: that finished run's count is not this fit's
        # (diff review: every epoch started at its frozen count again)
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=1).validate(module, datamodule=dm, verbose=False)
        saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
        L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=0, num_sanity_val_steps=0, callbacks=[saver]).fit(
            module, train_dataloaders=dm.train_dataloader(), ckpt_path=ckpt)
        return module.seen

    seen = fit()
    loader = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2).train_dataloader()
    assert seen == [int(loader.batch(k)[0][0, 0]) for k in range(6)]  # epoch 2 draws batches 3-5, not 0-2 again
    with pytest.warns(UserWarning, match=r"no trainer to ask where the checkpoint stopped .*pass datamodule=dm"):
        fit(ckpt=tmp_path / "step=3.ckpt")


def test_a_loader_made_before_the_processes_joined_draws_its_ranks_windows(tiny_text_file: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """dm.train_dataloader() called before fit (no trainer: rank 0) gave every DDP rank the same windows
    (diff review); such a loader asks torch.distributed for the rank when a pass starts."""
    dm = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2)
    loader, val = dm.train_dataloader(), dm.val_dataloader()
    rank_one = _under_trainer(TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2),
                              global_rank=1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    assert torch.equal(next(iter(loader))[0], rank_one.train_dataloader().batch(0)[0])
    assert torch.equal(next(iter(val))[0], next(iter(rank_one.val_dataloader()))[0])


def test_each_rank_validates_on_its_own_windows(tiny_text_file: Path) -> None:
    """Under DDP the ranks' validation batches differ, so val/loss averages over distinct windows, not one copy."""
    def first_val(rank: int) -> torch.Tensor:
        dm = TextDataModule(text_path=str(tiny_text_file), block_size=16, batch_size=2)
        return next(iter(_under_trainer(dm, global_rank=rank).val_dataloader()))[0]

    assert not torch.equal(first_val(0), first_val(1))


def test_global_rngs_are_untouched(tiny_text_file: Path, make_nanogpt_data_dir: Callable[..., Path]) -> None:
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    for kwargs in ({"text_path": str(tiny_text_file)}, {"data_dir": str(make_nanogpt_data_dir())}):
        dm = TextDataModule(block_size=16, batch_size=4, **kwargs)
        dm.setup()
        _batches(dm, n=4)
        list(dm.val_dataloader())
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


# -- meta.pkl safety and token range --------------------------------------------------------------
class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _OpensFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("payload", [_RunsShell, _OpensFile], ids=["os.system", "open"])
def test_malicious_meta_pkl_is_refused_without_running(
    payload: type, make_nanogpt_data_dir: Callable[..., Path], tmp_path: Path
) -> None:
    root = make_nanogpt_data_dir()
    marker = tmp_path / "pwned"
    (root / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "x": payload(marker)}))

    with pytest.raises(ValueError, match="meta.pkl"):
        read_meta(root / "meta.pkl")
    dm = TextDataModule(data_dir=str(root), block_size=16, batch_size=2)
    with pytest.raises(ValueError, match="meta.pkl"):
        dm.setup()
    assert not marker.exists()

    # the payload is live: the standard unpickler would have run it
    control = tmp_path / "control"
    result = pickle.loads(pickle.dumps(payload(control)))
    if hasattr(result, "close"):
        result.close()
    assert control.exists()


@pytest.mark.parametrize(
    "meta", [{"itos": {0: "a"}}, {"vocab_size": 0}, {"vocab_size": True}, {"vocab_size": "65"}, ["vocab_size"]]
)
def test_meta_pkl_needs_a_positive_integer_vocab_size(meta: object, tmp_path: Path) -> None:
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(meta))
    with pytest.raises(ValueError, match="meta.pkl"):
        read_meta(path)


@pytest.mark.parametrize(("blob", "raised"), [(b"\x8c\x01aK\x01a.", "AttributeError"),
                                             (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x80}.", "OverflowError")],
                         ids=["append-to-a-string", "frame-of-2**63-bytes"])
def test_a_damaged_meta_pkl_is_the_documented_value_error(blob: bytes, raised: str, tmp_path: Path) -> None:
    """A damaged stream raises what its opcodes hit: AttributeError (APPEND on a string), OverflowError or
    MemoryError (a frame of 2**63 bytes) escaped read_meta, a traceback where lens-train prints one line
    (s26 configs review)."""
    path = tmp_path / "meta.pkl"
    with pytest.raises(FileNotFoundError):  # a missing file is not a damaged one (diff review)
        read_meta(path)
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=rf"meta.pkl: not a plain-data meta.pkl \({raised}: "):
        read_meta(path)


def test_token_ids_beyond_vocab_are_rejected(make_nanogpt_data_dir: Callable[..., Path]) -> None:
    root = make_nanogpt_data_dir()
    vocab = read_meta(root / "meta.pkl")["vocab_size"]
    val = np.fromfile(root / "val.bin", dtype=np.uint16)
    val[len(val) // 2] = vocab
    val.tofile(root / "val.bin")
    dm = TextDataModule(data_dir=str(root), block_size=16, batch_size=2)
    with pytest.raises(ValueError, match=f"token id {vocab} .*vocab_size={vocab}"):
        dm.setup()
    # refused at every call: a second setup (Lightning's, after the user's own) or a loader does not take the
    # refused splits as loaded
    with pytest.raises(ValueError, match=f"token id {vocab} .*vocab_size={vocab}"):
        dm.train_dataloader()


def test_a_split_too_short_for_the_block_size_is_refused_at_every_call(tiny_text_file: Path) -> None:
    dm = TextDataModule(text_path=str(tiny_text_file), block_size=10_000)
    for call in (dm.setup, dm.setup, dm.val_dataloader, dm.fingerprint):
        with pytest.raises(ValueError, match="tokens, too few for block_size=10000"):
            call()


# -- argument validation --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"text_path": "TEXT", "data_dir": "DIR"}, "text_path and data_dir"),
        ({"text_path": "/nonexistent/input.txt"}, "text_path"),
        ({"data_dir": "/nonexistent/shakespeare_char"}, "data_dir"),
        ({"data_dir": "EMPTY_DIR"}, "data_dir"),
        ({"tokenizer": "bpe"}, "tokenizer"),
        ({"tokenizer": "char"}, "tokenizer"),  # char needs a text file
        ({"block_size": 0}, "block_size"),
        ({"batch_size": -4}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"val_batches": 0}, "val_batches"),
        ({"batches_per_epoch": 2.5}, "batches_per_epoch"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
    ],
)
def test_invalid_arguments_name_the_field(
    kwargs: dict, field: str, tiny_text_file: Path, make_nanogpt_data_dir: Callable[..., Path], tmp_path: Path
) -> None:
    resolved = {
        k: {"TEXT": str(tiny_text_file), "DIR": str(make_nanogpt_data_dir()), "EMPTY_DIR": str(tmp_path)}.get(v, v)
        for k, v in kwargs.items()
    }
    with pytest.raises(ValueError, match=field):
        TextDataModule(**resolved)


def test_split_too_short_for_the_block(tiny_text_file: Path) -> None:
    dm = TextDataModule(text_path=str(tiny_text_file), block_size=1024, val_fraction=0.1)
    with pytest.raises(ValueError, match="block_size=1024"):
        dm.setup()


def test_non_utf8_text_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="UTF-8"):
        TextDataModule(text_path=str(path), block_size=8).setup()


def test_the_fingerprint_tells_apart_corpora_that_differ_anywhere(tmp_path: Path) -> None:
    """It hashed the first 2**22 training tokens only: corpora differing in the training split's tail or
    in the validation split got one fingerprint (model review)."""
    from nanogpt_model import data as data_module

    base = (b"def f(x):\n    return x + 1\n" * 20_000)
    variants = {"base": base, "train tail": base[:400_000] + b"Z" + base[400_001:],
                "val": base[:-100] + b"Z" + base[-99:]}
    prints = {}
    for name, text in variants.items():
        (tmp_path / f"{name}.txt").write_bytes(text)
        dm = TextDataModule(text_path=str(tmp_path / f"{name}.txt"), block_size=16, batch_size=2)
        prints[name] = dm.fingerprint()
    assert len(set(prints.values())) == 3, prints
    assert TextDataModule(text_path=str(tmp_path / "base.txt"), block_size=16, batch_size=2).fingerprint() == prints["base"]
    # a split longer than FINGERPRINT_WHOLE: its head, tail and 64 windows between them
    parts = data_module._fingerprint_parts(10 * data_module.FINGERPRINT_WHOLE)
    assert parts[0].start == 0 and parts[-1].stop == 10 * data_module.FINGERPRINT_WHOLE and len(parts) == 66


def test_a_resume_on_other_data_than_the_checkpoints_is_named(tmp_path: Path) -> None:
    """The default corpus is the standard library of the Python running it: a run resumed under another
    Python trained on other text without a word (upgrade review). The checkpoint keeps the data's
    fingerprint and a resume on other data warns; on the same data it is silent."""
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"def f(x):\n    return x + 1\n" * 400)

    def fit(steps: int, ckpt: Path | None = None) -> TextDataModule:
        module = NanoGPTModule(GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16),
                               warmup_steps=1)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            enable_checkpointing=False, default_root_dir=tmp_path)
        dm = TextDataModule(text_path=str(text), block_size=16, batch_size=2)
        trainer.fit(module, dm, ckpt_path=ckpt)
        if ckpt is None:
            trainer.save_checkpoint(tmp_path / "run.ckpt")
        return dm

    written = fit(2)
    saved = torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=True)
    assert saved["TextDataModule"] == {"fingerprint": written.fingerprint()}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fingerprint")
        fit(3, tmp_path / "run.ckpt")  # the same data: no word
    text.write_bytes(b"def g(y):\n    return y * 2\n" * 400)  # another Python's standard library, say
    with pytest.warns(UserWarning, match=r"fingerprint .* reads other data than the run that wrote the checkpoint"):
        fit(3, tmp_path / "run.ckpt")
    # validate(ckpt_path=...) is warned too, and continues no run: the message does not say it does (diff review)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, default_root_dir=tmp_path)
    module = NanoGPTModule(GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
    with pytest.warns(UserWarning, match=r"corpus.txt here has fingerprint .* reads other data than the run that "
                                         r"wrote the checkpoint \("):
        trainer.validate(module, TextDataModule(text_path=str(text), block_size=16, batch_size=2),
                         ckpt_path=tmp_path / "run.ckpt", verbose=False)


def test_a_split_of_exactly_one_window_is_used() -> None:
    """block_size + 1 tokens hold one window (x = data[:T], y = data[1:T+1]), which nanoGPT samples; it
    was refused (model review). One token fewer is refused."""
    loader = WindowBatches(np.arange(9), block_size=8, batch_size=2, seed=0, stream=0, num_batches=1)
    x, y = next(iter(loader))
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2
    with pytest.raises(ValueError, match="8 tokens, too few for windows of block_size=8"):
        WindowBatches(np.arange(8), block_size=8, batch_size=2, seed=0, stream=0, num_batches=1)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_a_bad_seed_is_refused_by_name_before_training(seed: object) -> None:
    """--data.seed=-1 passed and numpy refused it at the sanity-check batch, after the fit started (CLI review)."""
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer"):
        TextDataModule(block_size=16, batch_size=2, seed=seed)  # type: ignore[arg-type]


def test_a_numpy_integer_seed_is_taken() -> None:
    """The seed check refused np.int64, which numpy's generator takes (diff review)."""
    dm = TextDataModule(block_size=16, batch_size=2, seed=np.int64(7))
    assert dm.seed == 7 and type(dm.seed) is int and dm.hparams["seed"] == 7
