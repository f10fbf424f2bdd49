"""Shared fixtures: tiny model configs and tiny nanoGPT data directories.

Keep this file to fixtures that more than one test file uses; file-local helpers live in their file.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest

from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from lens_callback.metrics import find_event_files
from nanogpt_model import GPTConfig

ROOT = Path(__file__).resolve().parents[1]


_SEED_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture(autouse=True)
def _seed_env_kept() -> Any:
    """Puts back the environment variables ``L.seed_everything`` writes (a config's ``seed_everything``
    too): a later test's Lightning (DDP's ``reset_seed``) and subprocesses would read them."""
    saved = {key: os.environ.get(key) for key in _SEED_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def bench_module(name: str) -> ModuleType:
    """``bench.<name>``, imported with the repository root on ``sys.path`` for the import only."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(f"bench.{name}")
    finally:
        sys.path.remove(str(ROOT))


def readme_block(language: str, containing: str) -> str:
    """The one fenced ```language block of README.md holding ``containing`` (one indented in a list item
    dedented): the README's own lines, so that a test running them fails when an edit of the README breaks them."""
    import textwrap

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [textwrap.dedent(b) for _, b in re.findall(rf"^( *)```{language}\n(.*?)^\1```", readme, flags=re.S | re.M)
              if containing in b]
    assert len(blocks) == 1, f"README: one {language} block with {containing!r} expected, found {len(blocks)}"
    return blocks[0]


def readme_commands(program: str, placeholders: dict[str, str]) -> list[list[str]]:
    """The command lines of README.md's prose that run ``program`` (its inline code spans starting with it),
    split as a shell would after ``placeholders`` (a name such as ``LOGDIR`` or ``<snapshots>``) are
    replaced, one in angle brackets not given kept as one word; without the program's name."""
    import shlex

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    spans = re.findall(rf"(?<!`)`{re.escape(program)}((?:\s[^`]*)?)`", readme)  # not a fence: ```python
    named = re.compile("|".join([*sorted(map(re.escape, placeholders), key=len, reverse=True), "<[^<>`]*>"]))
    return [shlex.split(named.sub(lambda m: placeholders.get(m.group(), shlex.quote(m.group())), span))
            for span in spans]


#: About 4 KB of text with repeated words and a few non-ASCII characters (multi-byte in UTF-8).
TINY_TEXT = "".join(
    f"{name} said: the {noun} is {adj}; so {name} left the {noun} — café.\n"
    for name in ("ROMEO", "JULIET", "MERCUTIO", "TYBALT")
    for noun in ("garden", "wall", "moon", "sword", "feast")
    for adj in ("bright", "cold", "near", "gone")
)


@pytest.fixture
def tiny_config() -> Callable[..., GPTConfig]:
    """A factory of small valid ``GPTConfig``s; keyword arguments override the defaults."""

    def make(**overrides: Any) -> GPTConfig:
        fields: dict[str, Any] = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, bias=True)
        if overrides.get("architecture") == "modern":
            fields["bias"] = False
        fields.update(overrides)
        return GPTConfig(**fields)

    return make


def write_nanogpt_data_dir(
    root: Path, text: str = TINY_TEXT, val_fraction: float = 0.1, meta: dict[str, Any] | None = None
) -> Path:
    """Writes ``text`` as nanoGPT's ``shakespeare_char/prepare.py`` does: char-level uint16 bins + meta.pkl.

    ``meta`` replaces the ``meta.pkl`` contents when given (an empty dict writes no ``meta.pkl``).
    """
    root.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    cut = int(len(ids) * (1 - val_fraction))
    ids[:cut].tofile(root / "train.bin")
    ids[cut:].tofile(root / "val.bin")
    if meta is None:
        meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    if meta:
        with open(root / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)
    return root


@pytest.fixture
def tiny_text_file(tmp_path: Path) -> Path:
    """:data:`TINY_TEXT` as a UTF-8 file."""
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def make_nanogpt_data_dir(tmp_path: Path) -> Callable[..., Path]:
    """A factory of nanoGPT data dirs under ``tmp_path``: ``make(name="data", **kwargs)``.

    ``kwargs`` go to :func:`write_nanogpt_data_dir` (``text``, ``val_fraction``, ``meta``).
    """

    def make(name: str = "nanogpt_data", **kwargs: Any) -> Path:
        return write_nanogpt_data_dir(tmp_path / name, **kwargs)

    return make


class Interrupted(BaseException):
    """Stands in for Ctrl-C in a fit (Lightning's own KeyboardInterrupt handling ignores SIGINT afterwards)."""


class TinyFit:
    """Factories for short real-``Trainer`` runs of a tiny nanoGPT (the callback and observer tests).

    The model is ``GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=32)`` unless
    overridden, the data the embedded corpus in batches of two 64-token windows, and the probe inputs
    of :meth:`lens` are a few short sequences, so one probe step takes a few milliseconds.
    """

    MODEL: dict[str, Any] = dict(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=32)
    PROBE_INPUTS: dict[str, Any] = dict(repeat_length=8, repeat_batch=2, text_len=32, text_batch=2)

    @staticmethod
    def module(compile: bool = False, **config: Any) -> Any:
        from nanogpt_model import NanoGPTModule

        fields = {**TinyFit.MODEL, **config}
        if fields.get("architecture") == "modern":
            fields.setdefault("bias", False)
        return NanoGPTModule(GPTConfig(**fields), learning_rate=1e-2, warmup_steps=2, min_lr=1e-3,
                             lr_decay_steps=100, compile=compile)

    @staticmethod
    def data(**kwargs: Any) -> Any:
        from nanogpt_model import TextDataModule

        return TextDataModule(**{"block_size": 64, "batch_size": 2, "val_batches": 1, **kwargs})

    @staticmethod
    def lens(**kwargs: Any) -> Any:
        """A ``LensCallback`` with tiny probe inputs; ``kwargs`` override any argument."""
        from lens_callback import LensCallback

        return LensCallback(**{**TinyFit.PROBE_INPUTS, **kwargs})

    @staticmethod
    def trainer(root: Path, max_steps: int = 4, **kwargs: Any) -> Any:
        """A quiet single-process CPU ``Trainer`` (no logger, checkpointing or validation unless given)."""
        import lightning as L

        defaults: dict[str, Any] = dict(
            max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, default_root_dir=root, log_every_n_steps=1,
        )
        return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="session")
def tiny_fit() -> type[TinyFit]:
    """:class:`TinyFit`: factories of a tiny ``NanoGPTModule``, data, ``LensCallback`` and ``Trainer``."""
    return TinyFit


def register_fixed_head_probe(probe_name: str, values: Any, span: tuple[float, float] = (0.0, 1.0)) -> type:
    """Registers a per-head probe on the repeated batch that reads no activation and gives ``values`` (a
    ``[n_layers, n_heads]`` tensor) at every probe step, or ``values(n, (n_layers, n_heads))`` at its ``n``-th
    (0, 1, 2, ...) where ``values`` is callable, its heatmap drawn over ``span``; the caller pops it from
    ``lens_callback.probes.PROBES`` afterwards."""
    from lens_callback.probes import Probe, register_probe

    class FixedHeads(Probe):
        name = probe_name
        batch = "repeated"
        per_head = True
        heatmap_range = span
        calls = 0  # compute calls so far, over every instance

        def hook_names(self, cfg: Any) -> list[str]:
            return []

        def reset(self, cfg: Any, device: Any) -> None:
            self.shape = (cfg.n_layers, cfg.n_heads)

        def compute(self) -> dict[str, Any]:
            value = values(type(self).calls, self.shape) if callable(values) else values.clone()
            type(self).calls += 1
            return {"": value}

    return register_probe(FixedHeads)


def raw_scalar_counts(logdir: Path) -> Counter[tuple[str, int]]:
    """How often each ``(tag, step)`` was written, over every event file (no de-duplication)."""
    counts: Counter[tuple[str, int]] = Counter()
    for path in find_event_files(logdir):
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    counts[(value.tag, int(event.step))] += 1
    return counts
