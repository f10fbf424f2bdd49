"""``TextDataModule``: token streams for nanoGPT from three sources, none of which needs a network.

Sources, chosen by the init arguments:

1. neither ``text_path`` nor ``data_dir``: the **embedded default corpus**, the Python standard
   library's top-level ``*.py`` modules (``sysconfig.get_paths()["stdlib"]``, without the
   build-specific ``_sysconfigdata_*`` and the site hooks ``sitecustomize``/``usercustomize``)
   read as bytes in sorted file order. It exists wherever the project runs and is source code:
   identifiers repeat within a file, which is what lets induction heads form. It is the same for
   every installation of one CPython release built from python.org's sources as they are (pyenv,
   the official installers); a distribution's build may add or patch a few modules (Debian's adds
   ``_distutils_system_mod.py`` and patches ``sysconfig.py``; conda-forge's patches
   ``sysconfig.py`` too), so its corpus can differ by a few files: `TextDataModule.fingerprint`
   tells corpora apart; Lightning checkpoints keep it, and a resume on other data warns.
2. ``text_path``: any UTF-8 text file, byte-level (vocabulary 256) or character-level (the sorted
   distinct characters, like nanoGPT's ``shakespeare_char``).
3. ``data_dir``: a nanoGPT data directory with ``train.bin``/``val.bin`` (uint16 token ids,
   memory-mapped) and an optional ``meta.pkl`` whose ``vocab_size`` is read by a restricted
   unpickler that admits only plain containers, strings and numbers (nothing that runs code).

Batches are random windows as in nanoGPT's ``get_batch``: ``x = data[i : i + T]``,
``y = data[i + 1 : i + 1 + T]``. Batch ``k`` of a stream depends only on ``(seed, stream, rank, k)``,
drawn from a private NumPy generator, so runs are reproducible, the global RNGs are never touched,
and a run resumed from a checkpoint sees the batches an uninterrupted run would have seen (given
``trainer.fit(model, datamodule=dm)``: the batch count is the trainer's; a loader passed on its own,
``train_dataloaders=dm.train_dataloader()``, counts its own batches, so each epoch draws new windows,
but a resume starts its sequence again, with a warning, and a second fit on the same loader object
continues where the first stopped: make one loader per run). Under ``Trainer(overfit_batches=n)``
every epoch of a fit with the datamodule trains on batches ``0 .. n-1``, as Lightning promises.
"""

from __future__ import annotations

import hashlib
import io
import json
import numbers
import os
import pickle
import sysconfig
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

Tokenizer = Literal["byte", "char"]
GPT2_VOCAB_SIZE = 50257  # nanoGPT's default when a data dir has no meta.pkl (GPT-2 BPE)
_TRAIN, _VAL = 0, 1


GENERATED_STDLIB_FILES = ("_sysconfigdata_*.py", "sitecustomize.py", "usercustomize.py")
"""Top-level stdlib files that are not the release's source, left out of the default corpus:
``_sysconfigdata_*`` is written when the interpreter is built and holds the build directory (with a
timestamp) and the install prefix, so two builds of one Python version would give two corpora;
``sitecustomize``/``usercustomize`` are the machine's own start-up hooks (Debian links
``sitecustomize.py`` to ``/etc/python3.X/``). A symbolic link to a file outside the standard library
is left out too."""


def default_corpus_files() -> list[Path]:
    """The files of the embedded default corpus: the stdlib's top-level ``*.py`` modules, sorted,
    without those that are not the release's source (`GENERATED_STDLIB_FILES`, links out of it)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = stdlib.resolve()
    files = sorted(
        p for p in stdlib.glob("*.py")
        if p.is_file()
        and not any(p.match(pattern) for pattern in GENERATED_STDLIB_FILES)
        and (not p.is_symlink() or p.resolve().is_relative_to(root))
    )
    if not files:
        raise FileNotFoundError(f"no *.py files found in the Python standard library at {stdlib}")
    return files


def default_corpus() -> np.ndarray:
    """The embedded default corpus as a ``uint8`` array of bytes (a few MB)."""
    return np.frombuffer(b"\n".join(p.read_bytes() for p in default_corpus_files()), dtype=np.uint8)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global: only dicts, lists, tuples, str, bytes, numbers load."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: meta.pkl may only hold plain dicts, strings and numbers"
        )


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a nanoGPT ``meta.pkl`` without executing code.

    Raises:
        ValueError: if the file holds anything but plain data, or no positive integer ``vocab_size``.
    """
    path = Path(path)
    blob = path.read_bytes()  # a missing file stays a FileNotFoundError
    try:
        meta = _RestrictedUnpickler(io.BytesIO(blob)).load()
    except Exception as err:  # noqa: BLE001 - a damaged stream raises what its opcodes hit (AttributeError,
        # OverflowError, MemoryError, ...), not only UnpicklingError: each is this file's fault
        raise ValueError(f"{path}: not a plain-data meta.pkl ({type(err).__name__}: {err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: meta.pkl must hold a dict, got {type(meta).__name__}")
    vocab = meta.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"{path}: meta.pkl needs a positive integer 'vocab_size', got {vocab!r}")
    return meta


def meta_itos(meta: dict[str, Any], source: object = "meta.pkl") -> list[Any] | None:
    """The id-to-token table of a `read_meta` dict, entry ``i`` the token of id ``i``: its ``itos`` (a dict
    by id, or a list), else its ``stoi`` turned round; ``None`` without either.

    An id in ``[0, vocab_size)`` the table lacks has the entry ``None`` (nanoGPT looks ids up in the dict, so
    a table with gaps, or one from id 1, trains): `TextDataModule.decode` refuses such an id, and no
    tokenizer record is made of the table (`tokenizer_spec_of`). Before, the entries were closed up, and
    every id after a gap decoded, and was recorded, as the next id's character. Keys that are no such id
    are left out (no token of the data has one: `TextDataModule` checks the ids against ``vocab_size``).

    An id that a ``stoi`` (without an ``itos``) gives several characters (a case-folding vocabulary) has the
    entry ``None`` too, with a warning naming ``source``, the ids and their characters: it decodes as none of
    them for sure (the last was kept before, unseen, and recorded in the snapshots' tokenizer as that id's).
    Such a table still trains, as it does in nanoGPT.
    """
    itos = meta.get("itos")
    if isinstance(itos, (list, tuple)):
        return list(itos)
    if isinstance(itos, dict):
        pairs = list(itos.items())
    elif isinstance(meta.get("stoi"), dict):  # the table the other way round
        pairs = [(i, c) for c, i in meta["stoi"].items()]
    else:
        return None
    pairs = [(i, c) for i, c in pairs if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < meta["vocab_size"]]
    by_id = dict(pairs)
    if len(by_id) < len(pairs):  # only a stoi's ids repeat (an itos dict's are its keys)
        shared: dict[int, list[Any]] = {}
        for i, c in pairs:
            shared.setdefault(i, []).append(c)
        repeated = [(i, chars) for i, chars in shared.items() if len(chars) > 1]
        listed = "; ".join(f"id {i}: {', '.join(map(repr, chars[:5]))}{', ...' if len(chars) > 5 else ''}"
                           for i, chars in repeated[:5]) + (f"; {len(repeated)} ids in all" if len(repeated) > 5 else "")
        warnings.warn(f"{source}: its stoi maps several characters to one id ({listed}): such an id decodes as "
                      f"none of them (decode refuses it) and no tokenizer is recorded in the snapshots; give each "
                      f"character an id of its own (as nanoGPT's prepare.py does), or add an itos table naming the "
                      f"character each id decodes to", stacklevel=2)
        for i, _ in repeated:
            by_id[i] = None
    return [by_id.get(i) for i in range(max(by_id) + 1)] if by_id else []


def meta_stoi(meta: dict[str, Any]) -> dict[str, int] | None:
    """The character-to-id table of a `read_meta` dict, as nanoGPT's ``sample.py`` encodes with it: its ``stoi``,
    else its ``itos`` turned round; ``None`` without a table of one-character strings. Ids outside
    ``[0, vocab_size)`` are left out (no training token has one). Several characters may share an id (a
    case-folding vocabulary): encoding is what training saw, only decoding is ambiguous (`meta_itos`)."""
    if isinstance(meta.get("stoi"), dict):
        pairs = list(meta["stoi"].items())
    elif isinstance(meta.get("itos"), dict):
        pairs = [(c, i) for i, c in meta["itos"].items()]
    elif isinstance(meta.get("itos"), (list, tuple)):
        pairs = [(c, i) for i, c in enumerate(meta["itos"])]
    else:
        return None
    table = {c: i for c, i in pairs if isinstance(c, str) and len(c) == 1
             and isinstance(i, int) and not isinstance(i, bool) and 0 <= i < meta["vocab_size"]}
    return table or None


def tokenizer_spec_of(itos: list[Any] | None, vocab_size: int | None) -> dict[str, Any] | None:
    """`TextDataModule.tokenizer_spec` of data with the id-to-token table ``itos`` (``None``: ids without
    one) and ``vocab_size`` ids."""
    if itos is None:
        return {"kind": "byte"} if vocab_size == 256 else None
    if itos and all(isinstance(c, str) and len(c) == 1 for c in itos) and len(set(itos)) == len(itos):
        return {"kind": "char", "chars": "".join(itos)}
    return None


def _check_token_ids(data: np.ndarray, vocab_size: int, path: Path, chunk: int = 1 << 24) -> None:
    top = 0
    for start in range(0, len(data), chunk):
        top = max(top, int(data[start : start + chunk].max()))
    if top >= vocab_size:
        raise ValueError(f"{path}: token id {top} is out of range for vocab_size={vocab_size}")


FINGERPRINT_WHOLE = 1 << 25
"""Tokens of a split `TextDataModule.fingerprint` hashes whole (64 MiB of uint16 ids)."""


def _fingerprint_parts(n: int) -> list[slice]:
    """The ranges of an ``n``-token split that `TextDataModule.fingerprint` hashes."""
    if n <= FINGERPRINT_WHOLE:
        return [slice(0, n)]
    half, window = FINGERPRINT_WHOLE // 2, 1 << 15
    middle = [slice(start, start + window) for start in np.linspace(half, n - half - window, 64, dtype=np.int64)]
    return [slice(0, half), *middle, slice(n - half, n)]


class WindowBatches:
    """An iterable of ``(x, y)`` batches of random windows; batch ``k`` is a pure function of ``k``.

    Args:
        data: 1-D token ids (NumPy array or memmap).
        block_size: Window length ``T``.
        batch_size: Windows per batch.
        seed, stream, rank: Together with the batch index, the seed of each batch's private generator.
        num_batches: Batches per pass (``len``).
        start: Called at the start of each pass for the index of its first batch (e.g. derived from
            the trainer's global step, so a resumed run continues the same sequence). ``None``
            numbers batches from 0 on every pass (validation: the same batches every time), unless
            ``counting``.
        counting: Each pass continues after the batches this loader has yielded so far (a training
            loader with no trainer to ask, `TextDataModule.train_dataloader` outside a fit).
        rank: ``None``: the process's rank in ``torch.distributed`` when a pass starts (0 without it):
            a loader made before the processes joined.
    """

    def __init__(
        self,
        data: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        stream: int,
        num_batches: int,
        rank: int | None = 0,
        start: Callable[[], int] | None = None,
        counting: bool = False,
    ) -> None:
        if len(data) < block_size + 1:  # one window of T + 1 tokens (x and its targets) at least
            raise ValueError(
                f"the data has {len(data)} tokens, too few for windows of block_size={block_size}"
            )
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.seed, self.stream, self._rank = seed, stream, rank
        self.num_batches, self.start, self.counting = num_batches, start, counting
        self._yielded = 0  # the next batch index, for ``counting``

    def __len__(self) -> int:
        return self.num_batches

    @property
    def rank(self) -> int:
        """The rank whose windows this loader draws (`rank` ``None``: the process's, asked now)."""
        if self._rank is not None:
            return self._rank
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def batch(self, index: int) -> tuple[Tensor, Tensor]:
        """Batch ``index`` of this loader's stream and rank."""
        return self._batch(index, self.rank)

    def _batch(self, index: int, rank: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, rank, index])
        ix = rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        windows = np.stack([np.asarray(self.data[i : i + self.block_size + 1]) for i in ix]).astype(np.int64)
        w = torch.from_numpy(windows)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    # Lightning's stateful-loader protocol. The position is not stored: it is derived from the
    # trainer's global step by ``start`` at each pass, so a resumed run continues the sequence.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.counting:
            warnings.warn("this training loader has no trainer to ask where the checkpoint stopped (it was passed as "
                          "train_dataloaders=dm.train_dataloader(), not through datamodule=dm): the resumed run "
                          "draws its batches from the start of the sequence again; pass datamodule=dm to continue "
                          "where the checkpoint stopped", UserWarning, stacklevel=2)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        first = self._yielded if self.counting else self.start() if self.start is not None else 0
        rank = self.rank
        for k in range(self.num_batches):
            self._yielded = first + k + 1
            yield self._batch(first + k, rank)


def _token_file(path: Path) -> np.ndarray:
    """A nanoGPT ``.bin`` file memory-mapped as uint16 token ids; a ValueError naming the file if it is
    empty or not a whole number of them."""
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise ValueError(f"{path} holds {size} bytes: a nanoGPT token file holds uint16 token ids (2 bytes each), "
                         f"at least one")
    return np.memmap(path, dtype=np.uint16, mode="r")


class TextDataModule(L.LightningDataModule):
    """Language-modelling data for nanoGPT from the embedded corpus, a text file, or a nanoGPT data dir.

    Args:
        text_path: A UTF-8 text file to train on.
        data_dir: A nanoGPT data directory (``train.bin``, ``val.bin``, optional ``meta.pkl``).
        tokenizer: For the default corpus and text files: ``"byte"`` (UTF-8 bytes, vocabulary 256)
            or ``"char"`` (distinct characters of the file; not for the default corpus).
        block_size: Window length ``T``.
        batch_size: Windows per batch.
        val_fraction: For the default corpus and text files, the trailing fraction held out.
        val_batches: Batches per validation pass (always the same batches).
        batches_per_epoch: Training batches per epoch (the windows are random, so this only sets
            when Lightning's epoch-end hooks run).
        seed: Seed of the window sampling.

    Raises:
        ValueError: for both sources given, a missing path, a bad tokenizer, size or seed.
    """

    def __init__(
        self,
        text_path: str | None = None,
        data_dir: str | None = None,
        tokenizer: Tokenizer = "byte",
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        val_batches: int = 20,
        batches_per_epoch: int = 1000,
        seed: int = 1337,
    ) -> None:
        super().__init__()
        if text_path is not None and data_dir is not None:
            raise ValueError("give at most one of text_path and data_dir")
        if text_path is not None and not Path(text_path).is_file():
            raise ValueError(f"text_path {text_path!r} does not exist or is not a file")
        if data_dir is not None:
            missing = [n for n in ("train.bin", "val.bin") if not (Path(data_dir) / n).is_file()]
            if missing:
                where = Path(data_dir).resolve()
                raise ValueError(
                    f"data_dir {data_dir!r} ({where}) lacks {missing}: a nanoGPT data dir holds the train.bin and "
                    f"val.bin that nanoGPT's data/{where.name}/prepare.py writes (run it from "
                    f"a clone of github.com/karpathy/nanoGPT and copy or link that dir here, as the headers of the "
                    f"shipped configs shakespeare_char.yaml and gpt2_124m.yaml show), or name another such dir (--data.data_dir=DIR; in Python TextDataModule(data_dir=DIR))")
        if tokenizer not in ("byte", "char"):
            raise ValueError(f"tokenizer must be 'byte' or 'char', got {tokenizer!r}")
        if tokenizer == "char" and text_path is None:
            raise ValueError("tokenizer='char' needs a text_path (the default corpus and data dirs are byte/token ids)")
        for name, value in (("block_size", block_size), ("batch_size", batch_size),
                            ("val_batches", val_batches), ("batches_per_epoch", batches_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:  # numpy's generator seeds
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        seed = int(seed)
        self.save_hyperparameters()
        self.text_path: str | None = text_path
        self.data_dir: str | None = data_dir
        self.tokenizer: Tokenizer = tokenizer
        self.block_size: int = block_size
        self.batch_size: int = batch_size
        self.val_fraction: float = val_fraction
        self.val_batches: int = val_batches
        self.batches_per_epoch: int = batches_per_epoch
        self.seed: int = seed
        self.train_data: np.ndarray | None = None
        self.val_data: np.ndarray | None = None
        self.vocab_size: int | None = None
        self.itos: list[str] | None = None
        self.source: str = ""
        self._fingerprint: tuple[tuple[int, int], str] | None = None  # (the splits' ids, their fingerprint)

    # -- loading ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        if self.data_dir is not None:
            train, val = self._load_data_dir(Path(self.data_dir))
        else:
            if self.text_path is None:
                tokens = default_corpus()
                self.vocab_size, self.source = 256, "stdlib"
            else:
                tokens = self._encode_file(Path(self.text_path))
            cut = int(len(tokens) * (1.0 - self.val_fraction))
            train, val = tokens[:cut], tokens[cut:]
        for split, data in (("train", train), ("val", val)):
            if len(data) < self.block_size + 1:
                raise ValueError(
                    f"the {split} split of {self.source} has {len(data)} tokens, too few for block_size={self.block_size}"
                )
        self.train_data, self.val_data = train, val  # kept once checked: a refused source is refused at every call

    def _splits(self) -> tuple[np.ndarray, np.ndarray]:
        """The train and val token arrays (`setup` loads them on first use)."""
        self.setup()
        if self.train_data is None or self.val_data is None:  # setup sets both or raises
            raise RuntimeError("TextDataModule.setup left its splits unset")
        return self.train_data, self.val_data

    def _encode_file(self, path: Path) -> np.ndarray:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err})") from err
        self.source = str(path)
        if self.tokenizer == "byte":
            self.vocab_size = 256
            return np.frombuffer(raw, dtype=np.uint8)
        chars = sorted(set(text))
        self.itos = chars
        self.vocab_size = len(chars)
        stoi = {c: i for i, c in enumerate(chars)}
        dtype = np.uint16 if len(chars) <= 1 << 16 else np.uint32  # more distinct characters than uint16 holds
        return np.fromiter((stoi[c] for c in text), dtype=dtype, count=len(text))

    def _load_data_dir(self, root: Path) -> tuple[np.ndarray, np.ndarray]:
        meta_path = root / "meta.pkl"
        if meta_path.is_file():
            meta = read_meta(meta_path)
            self.vocab_size = meta["vocab_size"]
            self.itos = meta_itos(meta, meta_path)
        else:
            self.vocab_size = GPT2_VOCAB_SIZE
        self.source = str(root)
        train, val = _token_file(root / "train.bin"), _token_file(root / "val.bin")
        for name, data in (("train.bin", train), ("val.bin", val)):
            _check_token_ids(data, self.vocab_size, root / name)
        return train, val

    def fingerprint(self) -> str:
        """A short hash of the corpus (the default corpus differs between Python versions, and a
        distribution's build of one may differ from python.org's by a few files): both splits'
        tokens, their lengths and dtype, the vocabulary size and the character table. A split of up
        to `FINGERPRINT_WHOLE` tokens is hashed whole; a larger one (a multi-GB ``train.bin``) by its
        first and last `FINGERPRINT_WHOLE` / 2 tokens and 64 windows spread evenly between them."""
        splits = self._splits()
        digest = hashlib.sha256(json.dumps([self.vocab_size, self.itos]).encode())
        for data in splits:
            digest.update(f"{len(data)} {data.dtype}".encode())
            for part in _fingerprint_parts(len(data)):
                digest.update(np.ascontiguousarray(data[part]).tobytes())
        return digest.hexdigest()[:16]

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a Lightning checkpoint keeps of the data: its `fingerprint`, which a resume compares
        (`load_state_dict`). The batch position is not kept: the loaders derive it from the trainer."""
        return {"fingerprint": self._kept_fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warns when the data are not those of the run that wrote the checkpoint (Lightning calls this on
        a resumed fit, and on ``validate(ckpt_path=...)``): the default corpus is the standard library of
        the Python that runs it, so a resume under another Python version or build trained on other text
        without a word (upgrade review), as does one whose text file or data dir changed."""
        saved = state_dict.get("fingerprint")
        if isinstance(saved, str) and saved != (now := self._kept_fingerprint()):
            # "the run that wrote it": a validate(ckpt_path=...) continues no run (diff review)
            here = "the default corpus (this Python's standard library)" if self.source == "stdlib" else self.source
            rank_zero_warn(f"TextDataModule: the checkpoint was written with data of fingerprint {saved}, and "
                           f"{here} here has fingerprint {now}: this run reads other data than the run that wrote "
                           f"the checkpoint (the default corpus is the standard library of the Python running it, "
                           f"so another Python version or build has another; pass text_path or data_dir to train "
                           f"on the same data everywhere)", category=UserWarning)

    def _kept_fingerprint(self) -> str:
        """`fingerprint`, computed once per pair of splits (a checkpoint is written every few steps)."""
        self.setup()
        key = (id(self.train_data), id(self.val_data))
        if self._fingerprint is None or self._fingerprint[0] != key:
            self._fingerprint = (key, self.fingerprint())
        return self._fingerprint[1]

    def decode(self, ids: Tensor | list[int]) -> str:
        """Text of token ``ids``: through the character table (``tokenizer="char"``, or a data dir's
        ``meta.pkl`` with ``itos``, or ``stoi``) or as UTF-8 bytes (the default corpus,
        ``tokenizer="byte"``, a data dir of 256 ids without a table).

        Raises:
            ValueError: for a data dir of another vocabulary without a table (GPT-2 BPE ids when it has
                no ``meta.pkl``: that tokenizer is not shipped), or an id outside the vocabulary.
        """
        self.setup()  # a character-level source's table is read there
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if self.itos is None and self.data_dir is not None and self.vocab_size != 256:
            what = ("its meta.pkl has no 'itos' or 'stoi' table" if (Path(self.data_dir) / "meta.pkl").is_file() else
                    "it has no meta.pkl, so its ids are GPT-2 BPE tokens (as nanoGPT's openwebtext)")
            raise ValueError(f"cannot decode the {self.vocab_size}-token ids of {self.source}: {what}, and this "
                             "package ships no tokenizer for them; decode them with the one that made them")
        # the vocabulary is vocab_size's: a meta.pkl table may end before it (ids past its last entry have none,
        # as a gap's), and was taken for it ("ids [2] are outside the vocabulary 0..1" of 3 ids: small-items review)
        vocab = 256 if self.itos is None else self.vocab_size or len(self.itos)  # set with itos
        outside = [i for i in ids if not 0 <= i < vocab]
        if outside:
            raise ValueError(f"ids {outside[:5]} are outside the vocabulary 0..{vocab - 1} of {self.source}")
        missing = [] if self.itos is None else [i for i in ids if i >= len(self.itos) or self.itos[i] is None]
        if missing:
            raise ValueError(f"ids {missing[:5]} have no entry in the table of {self.source}'s meta.pkl (a gap in "
                             f"it, or an id its stoi gives several characters)")
        if self.itos is not None:
            return "".join(self.itos[i] for i in ids)
        return bytes(ids).decode("utf-8", errors="replace")

    def tokenizer_spec(self) -> dict[str, Any] | None:
        """How the token ids map to text, as plain JSON (`LensCallback` records it in its snapshots, and
        ``lens_callback.load_snapshot`` gives the reloaded model a tokenizer from it), the mapping `decode`
        uses: ``{"kind": "byte"}`` for UTF-8 bytes (the default corpus, ``tokenizer="byte"``, a data dir of
        256 ids without a table), ``{"kind": "char", "chars": ...}`` where id ``i`` is the character
        ``chars[i]`` (``tokenizer="char"``, a data dir whose ``meta.pkl`` table maps each id to one
        character, as nanoGPT's ``shakespeare_char``); ``None`` for ids no such record describes (GPT-2
        BPE ids, a table of longer strings)."""
        self.setup()  # a character-level source's table is read there
        return tokenizer_spec_of(self.itos, self.vocab_size)

    # -- loaders ---------------------------------------------------------------------------------
    def _running_trainer(self, fitting: bool) -> Any:
        """The Trainer running with this datamodule now (``fitting``: running ``fit``), or ``None``: the
        loader is asked for outside a run (passed to fit as ``train_dataloaders=dm.train_dataloader()``),
        where ``self.trainer`` is unset or an earlier call's (``validate(datamodule=dm)``), whose batch
        count and rank are not this run's."""
        trainer = self.trainer
        state = getattr(trainer, "state", None)
        if state is None or state.status != TrainerStatus.RUNNING or (fitting and state.fn != TrainerFn.FITTING):
            return None
        return trainer

    def train_dataloader(self) -> WindowBatches:
        """The training batches. Under the Trainer fitting with this datamodule the index of the next batch
        is the training batches taken so far, Lightning's own count, which a checkpoint restores: a
        resumed run continues the sequence an uninterrupted one draws (not global_step x
        accumulate_grad_batches: the global step counts optimizer steps, two per batch with two
        optimizers stepped by hand, and one for a short last accumulation of an epoch); under
        ``overfit_batches`` every epoch starts at batch 0 (the same batches each epoch). A loader made
        outside a fit counts its own batches across passes and fits, and draws the windows of the
        process's rank when a pass starts."""
        train_data, _ = self._splits()
        trainer = self._running_trainer(fitting=True)
        if trainer is None:
            return WindowBatches(train_data, self.block_size, self.batch_size, self.seed, _TRAIN,
                                 self.batches_per_epoch, rank=None, counting=True)
        # overfit_batches promises the same batches every epoch: each pass starts at batch 0, a resumed one at
        # the batches its epoch took (read at the pass's first batch, after a restore)
        overfit = trainer.overfit_batches > 0

        def start() -> int:
            progress = trainer.fit_loop.epoch_loop.batch_progress
            return (progress.current if overfit else progress.total).completed

        return WindowBatches(train_data, self.block_size, self.batch_size, self.seed, _TRAIN,
                             self.batches_per_epoch, rank=trainer.global_rank, start=start)

    def val_dataloader(self) -> WindowBatches:
        _, val_data = self._splits()
        trainer = self._running_trainer(fitting=False)
        return WindowBatches(
            val_data, self.block_size, self.batch_size, self.seed, _VAL,
            self.val_batches, rank=None if trainer is None else trainer.global_rank,
        )
