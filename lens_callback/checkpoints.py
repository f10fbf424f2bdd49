"""Import a ``ckpt.pt`` written by Karpathy's nanoGPT ``train.py``, without running its pickles.

nanoGPT saves ``torch.save({"model": state_dict, "optimizer": ..., "model_args": {...},
"iter_num": int, "best_val_loss": tensor, "config": {...}}, "ckpt.pt")``. All of that is plain data
(tensors, numbers, strings, dicts), so it loads with ``torch.load(..., weights_only=True)``, whose
unpickler admits only tensors and primitive containers. A file that needs anything more (any other
class, or a ``__reduce__`` that would call a function) is refused with :class:`CheckpointError`;
there is deliberately no fallback to ``weights_only=False``, which would execute the file's code.
"""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from lens_callback.convert import build_hooked_transformer
from lens_callback.convert.base import check_device_and_dtype, checked_source_weights
from lens_callback.convert.nanogpt import NanoGPTConverter
from lens_callback.snapshots import MAX_STEP
from lens_callback.tokenizer import attach_tokenizer
from nanogpt_model.data import meta_itos, read_meta, tokenizer_spec_of

if TYPE_CHECKING:
    from nanogpt_model import GPTConfig

__all__ = ["CheckpointError", "MODEL_ARGS", "load_nanogpt_checkpoint", "read_nanogpt_checkpoint"]

MODEL_ARGS: tuple[str, ...] = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
"""The ``model_args`` keys of a nanoGPT checkpoint that map onto :class:`~nanogpt_model.GPTConfig`."""


# how a legacy (not zip) torch.save file starts, after the pickle's protocol: torch's magic number
_TORCH_MAGIC = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
_CONVERTER = NanoGPTConverter()  # the nanoGPT knowledge (GPTConfig, key names) lives in the converter


class CheckpointError(ValueError):
    """A checkpoint that is refused (needs arbitrary unpickling) or is not a nanoGPT checkpoint."""


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the class or function the file would have to import ("GLOBAL module.name");
        # any other complaint (an unknown opcode, ...) is a file its safe unpickler cannot read at all
        lines = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        if not lines and _looks_saved_by_torch(path):
            raise CheckpointError(
                f"{path}: torch.load(weights_only=True) cannot read it (torch: {_unpickler_reason(err)}): saved "
                "with a pickle protocol that the safe loader does not read, as torch.save(..., pickle_protocol=4) "
                "does? torch.save's default protocol is read"
            ) from err
        if not lines:
            raise CheckpointError(f"{path}: not a readable torch checkpoint (a file written by torch.save)") from err
        raise CheckpointError(
            f"{path}: refused. The file holds objects that torch.load(weights_only=True) will not "
            "build: loading them would need arbitrary unpickling, which can run any code stored in "
            "the file. A nanoGPT ckpt.pt holds only tensors, numbers, strings and dicts. If you "
            f"trust the file, re-save just its plain parts. (torch: {lines[0]})"
        ) from err
    except Exception as err:  # noqa: BLE001 - torch's unpickler fails on foreign files with any error
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (a file written by torch.save): {type(err).__name__}: {err}"
        ) from err


def _looks_saved_by_torch(path: Path) -> bool:
    """Whether ``path`` starts as torch.save's files do: a zip archive, or (the legacy format) a pickle
    whose first value is torch's magic number (not any pickle, such as nanoGPT's ``meta.pkl``)."""
    try:
        with open(path, "rb") as file:
            head = file.read(32)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and _TORCH_MAGIC in head)


def _unpickler_reason(err: BaseException) -> str:
    """The line of torch's weights-only error that says what it could not read (``Unsupported operand 149``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"  # torch 2.6 puts the reason after it on its line, later torch on the next
    after = [line.partition(marker)[2].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
             for i, line in enumerate(lines) if marker in line]
    after = [reason for reason in after if reason]
    return after[0] if after else (lines[0] if lines else type(err).__name__)


def _gpt_config(model_args: Any, weights: Mapping[str, Tensor], path: Path) -> GPTConfig:
    if not isinstance(model_args, Mapping):
        raise CheckpointError(f"{path}: 'model_args' must be a dict, got {type(model_args).__name__}")
    model_args = {**_args_from_weights(model_args, weights), **model_args}
    missing = [k for k in MODEL_ARGS if k not in model_args and k != "dropout"]
    if missing:
        raise CheckpointError(f"{path}: model_args lacks {missing} (has {sorted(model_args)})")
    fields = {k: model_args[k] for k in MODEL_ARGS if k in model_args}
    try:
        # nanoGPT's GPT is always GPT-2 style with tied embedding and output weights
        return _CONVERTER.config({**fields, "architecture": "gpt2", "tie_weights": True})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: model_args {dict(fields)} is not a valid GPTConfig: {err}") from err


def _args_from_weights(model_args: Mapping[str, Any], weights: Mapping[str, Tensor]) -> dict[str, Any]:
    """``bias`` and ``vocab_size`` read off the weights where ``model_args`` lacks them: nanoGPT's
    ``train.py`` added both keys in 2023, and before its ``bias`` option every linear layer and norm
    had a bias. The depth, width and context are never guessed."""
    inferred: dict[str, Any] = {}
    if "bias" not in model_args:
        inferred["bias"] = "transformer.ln_f.bias" in weights
    embedding = weights.get("transformer.wte.weight")
    if "vocab_size" not in model_args and embedding is not None and embedding.dim() == 2:
        inferred["vocab_size"] = int(embedding.shape[0])
    return inferred


def read_nanogpt_checkpoint(path: str | os.PathLike[str]) -> tuple[GPTConfig, dict[str, Tensor], int | None]:
    """Reads a nanoGPT ``ckpt.pt``: ``(GPTConfig, state dict, iter_num)``.

    ``model_args`` keys ``n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout`` become
    the config (``architecture="gpt2"``, ``tie_weights=True``: nanoGPT always ties); other keys
    (added by forks) are ignored. ``bias`` and ``vocab_size``, which files from before 2023 lack,
    are read off the weights (``transformer.ln_f.bias`` present, ``transformer.wte.weight`` rows).
    Model keys lose ``_orig_mod.``/``module.`` prefixes and the
    causal-mask buffers nanoGPT stores without flash attention.
    The optimizer state is loaded by ``torch.load`` but not returned.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file needs arbitrary unpickling (refused), or is not a nanoGPT
            checkpoint (no ``model``/``model_args``, bad values, weights whose names or shapes do
            not match ``model_args``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise CheckpointError(f"{path}: not a nanoGPT checkpoint (expected 'model' and 'model_args', got "
                              f"{_what_it_holds(checkpoint)})")
    model = checkpoint["model"]
    if not isinstance(model, Mapping) or not all(isinstance(v, Tensor) for v in model.values()):
        raise CheckpointError(f"{path}: 'model' must be a state dict of tensors")
    weights = _CONVERTER.source_weights(model)
    config = _gpt_config(checkpoint["model_args"], weights, path)
    _check_weights(config, weights, path)
    iter_num = checkpoint.get("iter_num")
    if isinstance(iter_num, bool) or not isinstance(iter_num, int) or not 0 <= iter_num <= MAX_STEP:
        iter_num = None
    return config, weights, iter_num


def _what_it_holds(checkpoint: Any, shown: int = 4) -> str:
    """What a file that is no nanoGPT checkpoint holds, in a few words: its type, or a dict's first keys. A bare
    state dict (``torch.save(model.state_dict())``, or a snapshot's ``model.safetensors``, which ``torch.load``
    reads too) listed every weight's name, 148 of them for GPT-2, on the error's one line; it is named as one,
    with the way to make a checkpoint of it."""
    if not isinstance(checkpoint, Mapping):
        return type(checkpoint).__name__
    if not checkpoint:
        return "an empty dict"
    if "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint:  # lens-train's, listed as 14 keys
        return ("a Lightning checkpoint ('state_dict', 'hyper_parameters', ...): a LensCallback run is re-probed from "
                "its snapshots (lens-probe SNAPSHOT_DIR, reprobe(snapshot_dir)); a GPT-2-style model saved as "
                "nanoGPT's train.py saves it, torch.save({'model': state_dict, 'model_args': dict(n_layer=..., "
                "...)}, 'ckpt.pt'), loads here")
    keys = sorted(map(repr, checkpoint))
    listed = ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
    if all(isinstance(value, Tensor) for value in checkpoint.values()):  # not empty: said above
        return (f"a bare state dict of {len(keys)} tensors, {listed}: nanoGPT's train.py saves the state dict as "
                f"'model' beside its shape, 'model_args'; re-save it as torch.save({{'model': state_dict, "
                f"'model_args': dict(n_layer=..., n_head=..., n_embd=..., block_size=..., bias=..., "
                f"vocab_size=...)}}, 'ckpt.pt')")
    return f"the keys {listed}"


def _check_weights(config: GPTConfig, weights: Mapping[str, Tensor], path: Path) -> None:
    """The weights' names and shapes against ``model_args``, before anything is built or drawn from the
    config (`lens-probe` sizes the probe inputs' token pool by ``vocab_size``); the number of blocks
    first, since the key check lists every block's names."""
    blocks = {key.split(".")[2] for key in weights if key.startswith("transformer.h.")}
    if len(blocks) != config.n_layer:
        raise CheckpointError(f"{path}: model_args has n_layer={config.n_layer}, but the weights hold "
                              f"{len(blocks)} blocks (transformer.h.N)")
    try:
        checked_source_weights(_CONVERTER, config.to_dict(), weights)
    except ValueError as err:
        raise CheckpointError(f"{path}: the weights do not match model_args: {err}") from err


def load_nanogpt_checkpoint(
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    meta: str | os.PathLike[str] | None = None,
) -> HookedTransformer:
    """Loads a nanoGPT ``ckpt.pt`` as a ``HookedTransformer`` (eval mode) via the ``"nanogpt"`` converter.

    Args:
        path: The checkpoint file.
        device: Device of the model; the CPU by default.
        dtype: Parameter dtype of the model.
        meta: The ``meta.pkl`` of the data the checkpoint trained on (nanoGPT's
            ``data/shakespeare_char/meta.pkl``), read without unpickling code: the model gets a
            tokenizer from its ``itos``/``stoi`` table (`lens_callback.tokenizer.attach_tokenizer`).
            ``None``: no tokenizer (a ``ckpt.pt`` does not say which data it trained on).

    Raises:
        FileNotFoundError: if ``path`` or ``meta`` does not exist.
        CheckpointError: see :func:`read_nanogpt_checkpoint`, or weights that do not match
            ``model_args`` (names the keys), or a ``meta`` whose table is not one character per id
            or does not fit the model's vocabulary.
        ValueError: for a ``meta`` that is not a plain-data ``meta.pkl`` (`read_meta`).
    """
    check_device_and_dtype(device, dtype, "load_nanogpt_checkpoint")
    table = None if meta is None else read_meta(meta)  # before the weights: its mistakes are quick to find
    itos = None if table is None else meta_itos(table, meta)  # warns of ids its stoi gives several characters
    config, state_dict, _ = read_nanogpt_checkpoint(path)
    try:
        hooked = build_hooked_transformer(
            _CONVERTER, config.to_dict(), state_dict, device=device or "cpu", dtype=dtype
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    if table is not None:
        spec = tokenizer_spec_of(itos, table["vocab_size"])
        if spec is None:
            raise CheckpointError(f"{meta} gives no tokenizer: a tokenizer is built from an itos/stoi table of one "
                                  f"character per id, every id from 0 on, or for 256 byte ids without a table; load "
                                  f"without meta= and pass token ids")
        try:
            attach_tokenizer(hooked, spec)
        except ValueError as err:
            raise CheckpointError(f"{meta} with {path}: {err}") from err
    return hooked
