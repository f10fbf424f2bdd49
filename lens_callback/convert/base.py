"""Converters: pure maps from (model config, state dict) to a TransformerLens model, and their registry.

A :class:`Converter` describes one architecture to TransformerLens. It has three pure parts:

* ``model_config(model)``: the architecture of a live module as plain JSON values (written into
  snapshots, so a snapshot reloads without the user's code);
* ``hooked_config(model_config)``: the ``HookedTransformerConfig`` that computes the same function;
* ``convert_weights(model_config, state_dict)``: the TransformerLens state dict. It never mutates
  its input and may return views of it (the callback copies them into pre-allocated parameters).

Everything else (prefix stripping, the exact key-set and shape checks, building and refreshing the
``HookedTransformer``) is shared here, so a user's converter is a few lines (see the README).
"""

from __future__ import annotations

import lens_callback._tl_import  # noqa: F401 - first: TransformerLens without its import's process-wide settings

import contextlib
import dataclasses
import difflib
import random
import re
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformer_lens import HookedTransformer, HookedTransformerConfig


class ConversionError(ValueError):
    """A state dict or converter output that does not match the architecture (names the keys)."""


class NotLogitsError(TypeError):
    """`Converter.source_logits` found no logits in the model's output."""


def describe_output(out: Any) -> str:
    """A model output in a few words, for errors: ``a tuple of 2 (NoneType, Tensor[2, 64, 256])``."""
    if isinstance(out, Tensor):
        return f"Tensor{list(out.shape)}"
    if isinstance(out, (tuple, list)):
        items = ", ".join(describe_output(o) for o in out[:4])
        return f"a {type(out).__name__} of {len(out)} ({items}{', ...' if len(out) > 4 else ''})"
    if isinstance(out, Mapping):
        keys = [repr(k) for k in list(out)[:6]]
        return f"a {type(out).__name__} with keys {', '.join(keys)}{', ...' if len(out) > 6 else ''}"
    return type(out).__name__


def are_logits_for(logits: Any, tokens: Tensor, d_vocab_out: int) -> bool:
    """Whether a source model's ``logits`` are ``[batch, positions, d_vocab_out]`` for ``tokens``, with
    between 1 and all of their positions (the last ones: nanoGPT's shortcut), as both parity checks
    (`LensCallback`'s, `check_parity`) require."""
    return (isinstance(logits, Tensor) and logits.dim() == 3 and logits.shape[0] == tokens.shape[0]
            and 1 <= logits.shape[1] <= tokens.shape[1] and logits.shape[2] == d_vocab_out)


def source_logits_call(converter: Converter) -> str:
    """The call that gives ``converter``'s source logits, for errors: ``model(tokens)`` with the default
    `Converter.source_logits`, else the override."""
    if type(converter).source_logits is Converter.source_logits:
        return "model(tokens) (its first element, if a tuple)"
    return f"{type(converter).__name__}.source_logits(model, tokens)"


WRAPPER_NAMES = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
"""Attribute names wrappers (``torch.compile``, FSDP1, activation checkpointing) insert into module
paths and state-dict keys, at any depth."""


def without_wrapper_names(path: str) -> str:
    """A module path or state-dict key without the names in `WRAPPER_NAMES`."""
    return ".".join(part for part in path.split(".") if part not in WRAPPER_NAMES)


def without_extra_state(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """``state_dict`` without modules' extra state (``get_extra_state``: the entries PyTorch names
    ``<module>._extra_state``, whatever their type, e.g. TransformerEngine's fp8 metadata as a uint8
    tensor) and without any other entry that is no tensor: no weight to convert, compare or store
    (custom-architecture review: converters refused its key, the snapshot writer its value)."""
    suffix = "_extra_state"  # torch.nn.Module's key for it (its private _EXTRA_STATE_KEY_SUFFIX)
    return {key: value for key, value in state_dict.items()
            if isinstance(value, Tensor) and key != suffix and not key.endswith("." + suffix)}


def strip_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A new dict without the names wrappers add: `WRAPPER_NAMES` wherever they are (a compiled
    submodule puts ``_orig_mod.`` mid-key), and a DDP-style ``module.`` prefix when every key has it
    (a model's own submodule may be called ``module``); `without_extra_state`; and pruned weights
    under their own names (`with_pruning_masks_applied`)."""
    state_dict = without_extra_state(state_dict)
    keys = [without_wrapper_names(key) for key in state_dict]
    while keys and all(key.startswith("module.") for key in keys):
        keys = [key[len("module."):] for key in keys]
    return with_pruning_masks_applied(dict(zip(keys, state_dict.values())))


def with_pruning_masks_applied(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with each weight that ``torch.nn.utils.prune`` (Lightning's ``ModelPruning``)
    splits into ``<k>_orig`` and ``<k>_mask`` put back as the weight the model computes with,
    ``<k>_orig * <k>_mask`` (a new tensor, in ``<k>_orig``'s dtype), under ``<k>``, where ``<k>_orig``'s
    entry was; only where both exist and ``<k>`` does not. The input is not mutated; without such
    pairs the result holds the same entries.

    The pruned module's ``<k>`` attribute is no substitute: pruning's forward pre-hook sets it at each
    forward, so after an optimizer step it still holds the weights from before that step.
    """
    pairs = {key[:-len("_mask")] for key in state_dict if key.endswith("_mask")}
    pruned = {key for key in pairs if key + "_orig" in state_dict and key not in state_dict}
    if not pruned:
        return dict(state_dict)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("_orig") and key[:-len("_orig")] in pruned:
            base = key[:-len("_orig")]
            mask = state_dict[base + "_mask"]
            with torch.no_grad():
                out[base] = value * mask.to(dtype=value.dtype)
        elif not (key.endswith("_mask") and key[:-len("_mask")] in pruned):
            out[key] = value
    return out


def holds_parametrized_originals(keys: Iterable[Any]) -> bool:
    """Whether a state dict with ``keys`` holds the originals of parametrized tensors
    (``torch.nn.utils.parametrize``: ``<module>.parametrizations.<name>.original``) rather than the
    values the model computes with (`effective_state_dict`)."""
    return any(isinstance(key, str) and (".parametrizations." in key or key.startswith("parametrizations."))
               for key in keys)


def effective_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``model``'s state dict (or ``state_dict``, one of ``model``'s keyed as its ``state_dict()`` is, e.g.
    with other tensors) with every parametrized tensor (``torch.nn.utils.parametrize``:
    ``parametrizations.weight_norm``, ``spectral_norm``, ``orthogonal``, a user's own) as the value the
    model computes with, under its own name (``<module>.weight``), in place of the originals and the
    parametrizations' buffers (``<module>.parametrizations.weight.original``, ``original0``, ``_u``, ...).
    Pruned weights are left as they are here (`with_pruning_masks_applied`, which `strip_prefixes`
    applies, puts them together).

    A parametrization is evaluated as in eval mode (``spectral_norm`` runs no power iteration, which
    would update its buffers), without gradients, with the global RNG states restored; the training
    flags are put back, and nothing of ``model`` is written. With ``state_dict`` given, the value is
    computed from its tensors (``torch.func.functional_call`` on the parametrization), not the
    module's.
    """
    state = model.state_dict() if state_dict is None else dict(state_dict)
    if not holds_parametrized_originals(state):
        return state  # no module is parametrized (the common case: no walk of the module tree)
    computed: dict[str, tuple[str, Tensor]] = {}  # entry replaced -> (the tensor's own name, its value)
    with torch.no_grad(), global_rngs_kept():
        for prefix, module in model.named_modules(remove_duplicate=False):
            if not parametrize.is_parametrized(module):
                continue
            path = f"{prefix}." if prefix else ""
            for name, parametrization in module.parametrizations.items():
                inner = f"{path}parametrizations.{name}."
                own = {key[len(inner):]: state[key] for key in state if key.startswith(inner)}
                if not own:
                    continue
                flags = [(m, m.training) for m in parametrization.modules()]
                try:
                    for m, _ in flags:
                        m.training = False
                    value = parametrization() if state_dict is None else torch.func.functional_call(
                        parametrization, own, (), strict=False)
                finally:
                    for m, training in flags:
                        m.training = training
                computed.update({inner + key: (path + name, value.detach()) for key in own})
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in computed:
            out[key] = value
        elif computed[key][0] not in out:  # where its first original was
            out[computed[key][0]] = computed[key][1]
    return out


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` (``_orig_mod``) and DDP/FSDP-style (``module``) wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "module", None) if type(module).__name__ in (
                "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"
            ) else None
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def _format_keys(keys: set[str] | list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class Converter(ABC):
    """Maps one architecture's weights onto a ``HookedTransformer``.

    Subclasses set ``name`` and implement the three abstract methods; ``expected_keys`` enables the
    exact input key check (recommended), ``matches`` lets the callback infer the converter.
    """

    name: ClassVar[str]

    @abstractmethod
    def model_config(self, model: nn.Module) -> dict[str, Any]:
        """The architecture of ``model`` (already unwrapped) as JSON-serialisable values."""

    @abstractmethod
    def hooked_config(self, model_config: Mapping[str, Any]) -> HookedTransformerConfig:
        """A ``HookedTransformerConfig`` computing the same function (``init_weights=False``)."""

    @abstractmethod
    def convert_weights(self, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """TransformerLens parameter name -> tensor, one entry per ``HookedTransformer`` parameter."""

    def expected_keys(self, model_config: Mapping[str, Any]) -> set[str] | None:
        """The exact source keys ``convert_weights`` consumes; ``None`` skips the check."""
        return None

    def optional_keys(self, model_config: Mapping[str, Any]) -> set[str]:
        """Source keys that may be absent (e.g. one of two tied weights); with ``expected_keys``, a key
        listed here only is accepted too."""
        return set()

    def source_weights(self, state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The state dict as ``convert_weights`` reads it, after prefix stripping: override to drop
        entries that are not weights (e.g. nanoGPT's causal-mask buffers). Must not mutate its input;
        the default returns it unchanged."""
        return state_dict

    def expected_shapes(self, model_config: Mapping[str, Any]) -> Mapping[str, tuple[int, ...]] | None:
        """Source key -> shape, checked before ``convert_weights`` runs; ``None`` skips the check."""
        return None

    def matches(self, model: nn.Module) -> bool:
        """Whether this converter handles ``model`` (used to infer the converter)."""
        return False

    def source_logits(self, model: nn.Module, tokens: Tensor) -> Tensor:
        """The source model's next-token logits for ``tokens`` (``[batch, pos]`` ids): ``[batch, pos,
        d_vocab_out]``, or the last positions only (nanoGPT's ``GPT`` without targets). The parity
        checks (`LensCallback`'s at train start, `check_parity`) compare them with the converted
        model's; ``model`` is in eval mode, its weights those the check runs it with.

        The default calls ``model(tokens)`` and takes a tuple's or list's first element. Override it
        for a forward that wants other arguments or returns the logits elsewhere (a dict, a ``(loss,
        logits)`` pair), e.g. ``return model(tokens, targets=None)["logits"]``; with the default, such
        a model is not checked (`NotLogitsError`: one warning from the callback)."""
        out = model(tokens)
        logits = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(logits, Tensor):
            # the class by its module path, so the message says what to import and subclass
            cls = type(self)
            raise NotLogitsError(f"model(tokens) returned {describe_output(out)}, not a logits tensor or a tuple "
                                 f"starting with one: override {cls.__name__}.source_logits(model, tokens) to return "
                                 f"the logits, in a subclass of {cls.__module__}.{cls.__qualname__} (e.g. `return "
                                 f"model(tokens).logits`, or `model(tokens)[1]` for a (loss, logits) pair), and pass "
                                 f"an instance of it as converter=")
        return logits

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# -- registry ------------------------------------------------------------------------------------
_REGISTRY: dict[str, Converter] = {}


def register_converter(converter: Converter | type[Converter] | None = None, *, overwrite: bool = False):
    """Registers a converter (an instance or a class, which is instantiated) under its ``name``.

    Usable as a class decorator, also as ``@register_converter(overwrite=True)``. Returns its
    argument. Registering the same class again (a module imported twice, a notebook cell run again)
    replaces the earlier registration; a second instance does not.

    Raises:
        ValueError: if the name is missing or taken by another class (unless ``overwrite``).
    """
    if converter is None:  # @register_converter(overwrite=True)
        return lambda decorated: register_converter(decorated, overwrite=overwrite)
    instance = converter() if isinstance(converter, type) else converter
    if not isinstance(instance, Converter):
        raise TypeError(f"register_converter expects a Converter, got {type(instance).__name__}")
    name = getattr(instance, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(instance).__name__} needs a non-empty string `name`")
    existing = _REGISTRY.get(name)
    # a class decorated again (its module imported twice, a notebook cell run again) replaces itself;
    # two instances, which may be configured differently, do not
    same_class = isinstance(converter, type) and existing is not None and (
        type(existing).__module__, type(existing).__qualname__) == (converter.__module__, converter.__qualname__)
    if existing is not None and not (overwrite or same_class):
        raise ValueError(f"a converter named {name!r} is already registered by {type(existing).__qualname__}; "
                         f"pass overwrite=True to replace it")
    _REGISTRY[name] = instance
    return converter


def unregister_converter(name: str | Converter | type[Converter]) -> None:
    """Removes the converter registered as ``name`` (if any), or the one a class or instance registered
    (under its ``name``: a converter another class registered there is kept, with a ``ValueError``).

    Raises:
        TypeError: for anything but a string, a `Converter` subclass or instance (a typo'd class passed
            before was taken as a name that nothing is registered under, and nothing was removed).
    """
    if isinstance(name, str):
        _REGISTRY.pop(name, None)
        return
    cls = name if isinstance(name, type) else type(name)
    if not issubclass(cls, Converter):
        raise TypeError(f"unregister_converter takes a converter's name, class or instance, got {name!r}")
    key = getattr(name, "name", None)
    if not isinstance(key, str) or (existing := _REGISTRY.get(key)) is None:
        return
    # the class itself, or the same class defined again (its module imported twice), as register_converter allows
    same = (type(existing).__module__, type(existing).__qualname__) == (cls.__module__, cls.__qualname__)
    if existing is not name and not same:
        raise ValueError(f"the converter named {key!r} was registered by {type(existing).__qualname__}, not "
                         f"{cls.__qualname__}; pass the name to remove it")
    del _REGISTRY[key]


def available_converters() -> list[str]:
    return sorted(_REGISTRY)


def get_converter(name: str | Converter | type[Converter]) -> Converter:
    """The registered converter called ``name`` (a converter instance is returned as is; a converter
    class, the instance registered for it, as `register_converter` used as a decorator returns the class)."""
    if isinstance(name, Converter):
        return name
    if isinstance(name, type) and issubclass(name, Converter):
        key = getattr(name, "name", None)
        registered = _REGISTRY.get(key) if isinstance(key, str) else None
        if registered is None or type(registered) is not name:
            raise ValueError(f"converter class {name.__qualname__} is not registered (registered: "
                             f"{available_converters()}); register it with lens_callback.register_converter, or "
                             f"pass an instance")
        return registered
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(unknown_converter_message(name)) from None


def unknown_converter_message(name: Any) -> str:
    """Why ``name`` is not a registered converter, and the usual fix: a converter of one's own registers when
    its module is imported, and a script that named it without that import was told only the built-in names
    (journey review)."""
    return (f"unknown converter {name!r}; available: {available_converters()} (a converter of your own is "
            f"registered when the module that defines it, with lens_callback.register_converter, is imported: "
            f"import it first)")


def infer_converter(model: nn.Module) -> Converter:
    """The registered converter whose ``matches`` accepts ``model`` (unwrapped first). Where one of
    yours and built-in ones both accept it (a subclass of ``nanogpt_model.GPT``, which the built-in
    ``nanogpt`` converters accept too), yours is taken."""
    inner = unwrap_module(model)
    found = [c for c in _REGISTRY.values() if c.matches(inner)]
    if len(found) > 1:
        yours = [c for c in found if not type(c).__module__.startswith("lens_callback.")]
        found = yours or found
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"no registered converter matches a {type(inner).__name__}; available converters: "
            f"{available_converters()} (register one with lens_callback.register_converter, or pass converter=...)"
        )
    raise ValueError(f"several converters match a {type(inner).__name__}: {[c.name for c in found]}; pass converter=...")


# -- conversion ----------------------------------------------------------------------------------
def check_source_keys(converter: Converter, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> None:
    """Raises :class:`ConversionError` naming missing and unexpected source keys."""
    with _reported(converter, "expected_keys"):
        expected = converter.expected_keys(model_config)
    if expected is None:
        return
    with _reported(converter, "optional_keys"):
        optional = converter.optional_keys(model_config)
    present = set(state_dict)
    missing = expected - present - optional
    unexpected = present - expected - optional
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise ConversionError(f"state dict does not match converter {converter.name!r}: " + "; ".join(parts))


def check_source_shapes(converter: Converter, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> None:
    """Raises :class:`ConversionError` naming each source key whose shape is not the expected one."""
    with _reported(converter, "expected_shapes"):
        shapes = converter.expected_shapes(model_config)
    if shapes is None:
        return
    wrong = [
        f"{k}: got {tuple(v.shape)}, expected {tuple(shapes[k])}"
        for k, v in state_dict.items()
        if k in shapes and tuple(v.shape) != tuple(shapes[k])
    ]
    if wrong:
        raise ConversionError(f"state dict does not match converter {converter.name!r}: wrong shapes: " + "; ".join(wrong[:8]))


def check_floating(converter: Converter, weights: Mapping[str, Tensor]) -> None:
    """Raises :class:`ConversionError` naming each converted weight that is not floating point: every
    ``HookedTransformer`` parameter is, and an integer one (a source weight stored as integers) would
    be cast into the model without a word."""
    integral = [f"{k}: {str(v.dtype).removeprefix('torch.')}" for k, v in weights.items() if not v.is_floating_point()]
    if integral:
        raise ConversionError(f"converter {converter.name!r} made weights that are not floating point (from source "
                              f"weights stored as integers?): " + "; ".join(integral[:8]))


def _config_hints(cfg: Any, missing: set[str], unexpected: set[str]) -> dict[str, str]:
    """What ``missing`` and ``unexpected`` weights say of ``cfg`` (a ``HookedTransformerConfig``), as
    `` (...)`` to put after each list: a converter that forgets a rotary, RMSNorm or gated-MLP setting gets
    TransformerLens's default, which wants other weights, and "misses HookedTransformer weights:
    pos_embed.W_pos" alone read as a weight to add (journey review)."""
    said: dict[str, list[str]] = {"missing": [], "unexpected": []}
    if cfg is not None:
        positions, norm = getattr(cfg, "positional_embedding_type", None), getattr(cfg, "normalization_type", None)
        norm_biases = {k for k in missing | unexpected if re.fullmatch(r"(blocks\.\d+\.ln[12]|ln_final)\.b", k)}
        if "pos_embed.W_pos" in missing and positions == "standard":
            said["missing"].append(
                "pos_embed.W_pos is the learned position embedding of positional_embedding_type='standard', "
                "TransformerLens's default: a rotary model sets positional_embedding_type='rotary' with rotary_dim "
                "and rotary_adjacent_pairs, one without position embedding returns zeros")
        if "pos_embed.W_pos" in unexpected and positions == "rotary":
            said["unexpected"].append("a rotary config has no position embedding weight: leave pos_embed.W_pos out")
        if norm_biases & missing and norm == "LN":
            said["missing"].append(
                "normalization_type='LN', TransformerLens's default, has biases: an RMSNorm model sets "
                "normalization_type='RMS' (weights only), a LayerNorm without biases returns zeros")
        if norm_biases & unexpected and norm == "RMS":
            said["unexpected"].append("normalization_type='RMS' norms have a weight only: leave their .b out")
        if any(k.endswith(".mlp.W_gate") for k in unexpected) and not getattr(cfg, "gated_mlp", True):
            said["unexpected"].append("W_gate is a gated MLP's: set gated_mlp=True (act_fn='silu' for SwiGLU)")
    return {k: f" ({'; '.join(v)})" if v else "" for k, v in said.items()}


def check_converted(converter: Converter, weights: Mapping[str, Tensor], hooked: nn.Module) -> None:
    """Raises :class:`ConversionError` unless ``weights`` has exactly ``hooked``'s parameters and shapes,
    all floating point (`check_floating`)."""
    params = dict(hooked.named_parameters())
    missing = set(params) - set(weights)
    unexpected = set(weights) - set(params)
    wrong = [
        f"{k}: got {tuple(weights[k].shape)}, expected {tuple(p.shape)}"
        for k, p in params.items()
        if k in weights and tuple(weights[k].shape) != tuple(p.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        hints = _config_hints(getattr(hooked, "cfg", None), missing, unexpected)
        if missing:
            parts.append(f"misses HookedTransformer weights: {_format_keys(missing)}{hints['missing']}")
        if unexpected:
            parts.append(f"produced unknown weights: {_format_keys(unexpected)}{hints['unexpected']}")
        if wrong:
            parts.append("wrong shapes: " + "; ".join(wrong[:8]))
        raise ConversionError(f"converter {converter.name!r} " + "; ".join(parts))
    check_floating(converter, weights)


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        yield


@contextlib.contextmanager
def global_rngs_kept() -> Iterator[None]:
    """Restores the global RNG states of torch (the CPU's and every initialised device's of the
    accelerator: CUDA, MPS, XPU), NumPy and Python's ``random`` on exit.

    A ``HookedTransformerConfig`` built with a ``seed`` (TransformerLens's docs suggest one) seeds all
    three in ``__post_init__`` (and queues CUDA's and XPU's seeds while they are not initialised, which
    are put back too): a converter's ``hooked_config`` runs inside this, so that it cannot
    re-seed a training run (the seed is not used: models are built with ``seed=None``,
    `finalize_config`). `LensCallback` also runs its train-start set-up and every probe step's refresh
    and probes inside it, where a converter's or a user probe's own code may draw from the three (about
    0.2 ms on the 2-core CPU).
    """
    # NumPy's state as a dict: set_state takes it in half the time of the legacy tuple (98 vs 184 us)
    python_state, numpy_state = random.getstate(), np.random.get_state(legacy=False)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    # before CUDA or XPU is initialised, torch.manual_seed only queues its seed (applied at initialisation;
    # XPU's was left queued: device review)
    pending = [tracker for backend in (torch.cuda, torch.xpu)
               if not (backend.is_available() and backend.is_initialized())
               and (tracker := getattr(backend, "_lazy_seed_tracker", None)) is not None]
    queued = [dict(vars(tracker)) for tracker in pending]
    # the accelerator's generators, whichever it is: torch.manual_seed seeds MPS's and XPU's too, and a
    # probe may draw on the model's device; forking only CUDA's left an MPS training run's dropout
    # re-seeded by a seeded config (device review). A device not initialised has no generator to keep yet
    # (asked directly: torch.accelerator.current_accelerator raises where there is none before torch 2.7)
    if torch.backends.mps.is_available():  # one device, initialised with the process
        kind, devices = "mps", [0]
    elif torch.xpu.is_available():
        kind, devices = "xpu", list(range(torch.xpu.device_count())) if torch.xpu.is_initialized() else []
    else:
        kind, devices = "cuda", list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices, device_type=kind):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            for tracker, calls in zip(pending, queued):
                vars(tracker).update(calls)


def finalize_config(
    cfg: HookedTransformerConfig, device: torch.device | str | None, dtype: torch.dtype | None
) -> HookedTransformerConfig:
    """A copy of ``cfg`` with weight init off, no seeding, and the given device and dtype (input untouched)."""
    changes: dict[str, Any] = {"init_weights": False, "seed": None}
    if device is not None:
        changes["device"] = str(device)
    if dtype is not None:
        changes["dtype"] = dtype
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    fields.update(changes)
    return HookedTransformerConfig(**fields)


_SHARED_ZEROS: dict[tuple[tuple[int, ...], torch.dtype, torch.device], Tensor] = {}


def shared_zeros(like: Tensor, *shape: int) -> Tensor:
    """Zeros of ``shape`` on ``like``'s dtype and device for a bias the source model lacks: one tensor
    per shape, dtype and device, shared by every conversion in the process.

    A refresh converts the weights at every probe step; fresh zeros would cost one kernel each (17
    of the default bias-free model's refresh). The tensor must only ever be a copy source: `convert`,
    which hands a conversion to the user, gives copies in its place.
    """
    key = (shape, like.dtype, like.device)
    zeros = _SHARED_ZEROS.get(key)
    if zeros is None:  # kept for the process: a model has a few bias shapes (each a row of zeros), and an
        # eviction in the middle of a conversion would leave `convert` a shared tensor it cannot tell
        zeros = _SHARED_ZEROS[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
    return zeros


def convert(
    converter: str | Converter, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> tuple[HookedTransformerConfig, dict[str, Tensor]]:
    """Checks and converts a state dict: ``(HookedTransformerConfig, TransformerLens state dict)``.

    The input is not mutated; prefixes ``_orig_mod.``/``module.`` are stripped first and the
    converter's ``source_weights`` applied. The output is checked key by key and shape by shape
    against a ``HookedTransformer`` built on the meta device. Its tensors may be views of the input
    (``W_E`` is the token embedding itself); the zeros that stand for biases the source lacks are
    fresh tensors, so that changing one changes no other conversion.
    """
    cfg, weights, _ = checked_conversion(converter, model_config, state_dict)
    shared = {id(zeros) for zeros in _SHARED_ZEROS.values()}
    return cfg, {key: value.clone() if id(value) in shared else value for key, value in weights.items()}


def checked_source_weights(
    converter: Converter, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> Mapping[str, Tensor]:
    """What ``converter.convert_weights`` reads from ``state_dict`` (prefixes ``_orig_mod.``/``module.``
    stripped, ``source_weights`` applied), its keys and shapes checked (`check_source_keys`,
    `check_source_shapes`); works on meta tensors."""
    source = converter.source_weights(strip_prefixes(state_dict))
    config_view = _NamedKeys(model_config, "model_config")  # a key read and missing is named (`_reported`)
    check_source_keys(converter, config_view, source)
    check_source_shapes(converter, config_view, source)
    return source


def checked_conversion(
    converter: str | Converter, model_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> tuple[HookedTransformerConfig, dict[str, Tensor], HookedTransformer]:
    """`convert`, also returning the meta-device ``HookedTransformer`` it checked against."""
    conv = get_converter(converter)
    if not isinstance(model_config, Mapping):
        raise ConversionError(f"converter {conv.name!r}: model_config must be a dict (what model_config(model) "
                              f"returns), got {type(model_config).__name__}")
    versions = _versions(state_dict)
    source = checked_source_weights(conv, model_config, state_dict)
    config_view = _NamedKeys(model_config, "model_config")
    with _reported(conv, "hooked_config"), global_rngs_kept():
        cfg = conv.hooked_config(config_view)
    if not isinstance(cfg, HookedTransformerConfig):
        raise ConversionError(f"converter {conv.name!r}: hooked_config(model_config) must return a "
                              f"HookedTransformerConfig, got {type(cfg).__name__}")
    with _reported(conv, "convert_weights"):
        weights = conv.convert_weights(config_view, _NamedKeys(source, "state dict"))
    changed = [key for key, version in versions.items() if state_dict[key]._version != version]
    if changed:
        raise ConversionError(
            f"converter {conv.name!r} modified its input in place ({_format_keys(changed)}): source_weights and "
            f"convert_weights must not write into the state dict, whose tensors are the model's own weights (use "
            f"out-of-place operations, e.g. w * s rather than w.mul_(s)); those weights have been changed, so "
            f"rebuild or reload the model before training it")
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise ConversionError(f"converter {conv.name!r}: convert_weights(model_config, state_dict) must return a "
                              f"dict of tensors, got {type(weights).__name__}")
    # the skeleton's config is rebuilt from cfg's fields, which runs TransformerLens's asserts again: a field
    # hooked_config set after building cfg (cfg.act_fn = ...) is refused here, naming the converter
    with _reported(conv, "hooked_config"):
        skeleton = meta_skeleton(cfg)
    check_converted(conv, weights, skeleton)
    return cfg, weights, skeleton


def _versions(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """Each tensor's version counter (bumped by every in-place write, shared with the parameter a
    ``state_dict()`` entry detaches from); inference tensors have none and are left out."""
    return {key: value._version for key, value in state_dict.items()
            if isinstance(value, Tensor) and not value.is_inference()}


class _MissingKey(KeyError):
    """A key a converter method read from a `_NamedKeys` mapping that lacks it (a ``KeyError``, so
    converter code that catches ``KeyError`` for optional keys works as before)."""

    def __init__(self, key: Any, keys: _NamedKeys) -> None:
        super().__init__(key)
        self.key, self.keys = key, keys


class _NamedKeys(dict):
    """A dict copy of a converter method's input that says which input a missing key was read from."""

    def __init__(self, data: Mapping[str, Any], what: str) -> None:
        super().__init__(data)
        self.what = what

    def __missing__(self, key: Any) -> Any:
        raise _MissingKey(key, self)


@contextlib.contextmanager
def _reported(converter: Converter, method: str) -> Iterator[None]:
    """Turns a missing key read by ``converter.method`` into a `ConversionError` naming its source, and a
    ``HookedTransformerConfig`` field TransformerLens refuses (its checks are asserts, e.g. an unknown
    ``act_fn``) into one naming the converter."""
    try:
        yield
    except _MissingKey as err:
        present = [k for k in err.keys if isinstance(k, str)]
        if err.keys.what == "model_config":
            raise ConversionError(
                f"converter {converter.name!r}: {method} reads model_config[{err.key!r}], which this model_config "
                f"does not set (it sets {_format_keys(present)}): read one of those, or add it to model_config(model); "
                f"a snapshot written before the converter read it lacks it, so read a key added later with "
                f"model_config.get({err.key!r}, default)"
            ) from err
        close = difflib.get_close_matches(str(err.key), present, n=3, cutoff=0.6)
        hint = f" (closest present: {', '.join(map(repr, close))})" if close else ""
        raise ConversionError(
            f"converter {converter.name!r} failed on this state dict: missing key {err.key!r}{hint}; {method} "
            f"reads it, and the converter has no expected_keys to check the keys up front"
        ) from err
    except KeyError as err:  # from a copy of an input, or a converter's own dict
        raise ConversionError(
            f"converter {converter.name!r} failed in {method}: KeyError: missing key {err.args[0] if err.args else err!r}"
        ) from err
    except AssertionError as err:  # HookedTransformerConfig checks its fields with asserts
        if method != "hooked_config":
            raise
        raise ConversionError(
            f"converter {converter.name!r}: hooked_config(model_config) built a HookedTransformerConfig that "
            f"TransformerLens refuses: {without_reprs(str(err)) or 'AssertionError'}"
        ) from err


def without_reprs(message: str) -> str:
    """``message`` without the ``: <function f at 0x...>`` values of a printed dict of functions
    (TransformerLens lists its activations so), leaving their names."""
    return re.sub(r": <(?:built-in )?function [^<>]*>", "", message)


def check_runs(converter: Converter, skeleton: HookedTransformer) -> None:
    """Runs ``skeleton`` (a meta-device model) on two meta tokens: shapes only, no arithmetic.

    A ``HookedTransformerConfig`` that TransformerLens accepts but cannot run (an odd ``rotary_dim``,
    a ``d_head`` that does not match the weights' use) fails here, before training, instead of in
    every probe step. An operator without a meta implementation proves nothing and is let pass.

    Raises:
        ConversionError: naming the converter and TransformerLens's error.
    """
    tokens = torch.zeros(1, min(2, skeleton.cfg.n_ctx), dtype=torch.long, device="meta")
    try:
        with torch.inference_mode():
            skeleton(tokens, return_type=None)
    except NotImplementedError:
        return
    except (RuntimeError, ValueError, IndexError, AssertionError, TypeError) as err:
        if "meta" in str(err).lower():  # data-dependent code (.item(), nonzero) cannot run on meta
            return
        raise ConversionError(
            f"converter {converter.name!r}: TransformerLens cannot run the HookedTransformerConfig it "
            f"returns ({type(err).__name__}: {err}); check hooked_config (e.g. rotary_dim, d_head, n_heads)"
        ) from err


def meta_skeleton(cfg: HookedTransformerConfig) -> HookedTransformer:
    """A ``HookedTransformer`` for ``cfg`` on the meta device: its parameter names and shapes and its
    hook points, without memory or initialisation."""
    with torch.device("meta"), _quiet_deprecation():
        return HookedTransformer(finalize_config(cfg, "meta", None), move_to_device=False)


def copy_weights(hooked: HookedTransformer, weights: Mapping[str, Tensor]) -> None:
    """Copies converted weights into ``hooked``'s existing parameters (no reallocation).

    Two ``torch._foreach_copy_`` calls. On a GPU the multi-tensor kernels copy many tensors per
    launch, but only when every pair in the list has the same sizes, strides and dtype and is
    dense; one pair that is not sends the whole list through a copy per tensor. Converted weights
    are often transposed views of the source's ``[out, in]`` matrices, laid out unlike the
    parameters, so the pairs that match (embeddings, norms, biases, ``W_O``: 137 of GPT-2's 198
    in the callback's packed model) go in one call and the rest in another, a copy each
    (``bench/profile_probe.py --count-ops``). To copy into the same model again and again, keep a
    `WeightCopier`.
    """
    WeightCopier(hooked)(weights)


class WeightCopier:
    """`copy_weights` into one model, whose parameters are listed once.

    Listing a ``HookedTransformer``'s parameters walks its whole module tree, every hook point
    included. The callback refreshes its private model at every probe step, and on the GPU code
    path's host time (``bench/host_proxy.py``) keeping the list took 0.27 ms off the default
    model's 7.4 ms probe step and 1.3 off 36.1 ms for GPT-2 small's layers (medians of paired
    differences, ninth session), the finite-weights check reading the same list.

    The parameters must stay the tensors they were when the copier was made: ``Module.to``,
    ``load_state_dict(assign=True)`` or `lens_callback.probes.pack_attention_weights` after it
    replace them, and a copier made before would fill the old ones. The pairs are still grouped at
    every call, from the weights' layouts.
    """

    def __init__(self, hooked: HookedTransformer) -> None:
        self._params = [(name, param, is_dense(param)) for name, param in hooked.named_parameters()]

    @property
    def parameters(self) -> list[Tensor]:
        """The model's parameters, in ``named_parameters`` order."""
        return [param for _, param, _ in self._params]

    @torch.no_grad()
    def __call__(self, weights: Mapping[str, Tensor]) -> None:
        """Copies ``weights`` (a converter's output, by TransformerLens name) into the parameters."""
        fast: tuple[list[Tensor], list[Tensor]] = ([], [])
        slow: tuple[list[Tensor], list[Tensor]] = ([], [])
        for name, param, dense in self._params:
            source = weights[name]
            group = fast if dense and same_layout(param, source) else slow
            group[0].append(param)
            group[1].append(source)
        for params, sources in (fast, slow):
            if params:
                torch._foreach_copy_(params, sources, non_blocking=True)


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same sizes, strides, dtype and device: what a pair of a multi-tensor (``_foreach_*``) kernel's
    two lists needs, besides density, for PyTorch's fast route."""
    return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device


def is_dense(tensor: Tensor) -> bool:
    """Whether ``tensor``'s elements fill a block of memory without gaps or overlaps, in any order of
    dimensions (ATen's ``is_non_overlapping_and_dense``, which Python does not expose)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(tensor.shape, tensor.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@torch.no_grad()
def finite_flag(params: Sequence[Tensor], fused: bool | None = None) -> Tensor:
    """Whether every element of ``params`` is finite, as a 0-dim bool tensor on their device (no sync).

    The probe step moves it to the host with the probe results, in their one transfer.

    ``fused`` (default: on any device but the CPU) takes one ``torch._foreach_norm`` of ``sum |x|``
    per tensor (as ``clip_grad_norm_`` does): a few multi-tensor kernels on a GPU instead of one
    reduction per tensor (GPT-2: 148 launches). The sum is finite exactly when every element is
    (NaN and inf propagate), unless finite weights of order 1e32 overflow it. On the CPU each
    tensor's ``aminmax`` is cheaper (GPT-2: 16 vs 43 ms; the default model: 0.12 vs 0.19 ms) and
    exact: a tensor's min and max are non-finite exactly when an element is. Neither allocates a
    tensor-sized temporary (``torch.isfinite(p).all()`` allocated 260 MB for GPT-2's embedding).
    The sums of float16 tensors are taken in float32: in float16 they overflow past 65504 (GPT-2's
    embedding sums to about 8e5), and every probe step of a float16 model on a GPU was voided as
    non-finite (``reprobe(..., device="cuda", dtype=torch.float16)`` gave only NaN).
    """
    if not params:
        return torch.tensor(True)
    if fused is None:
        fused = params[0].device.type != "cpu"
    if fused:
        cover = dense_cover(params)
        halves = [t for t in cover if t.dtype == torch.float16]
        others = [t for t in cover if t.dtype != torch.float16]
        sums = [*(torch._foreach_norm(halves, 1, dtype=torch.float32) if halves else ()),
                *(torch._foreach_norm(others, 1) if others else ())]
        return torch.stack(sums).isfinite().all()
    filled = [p for p in params if p.numel()]  # aminmax refuses an empty tensor, which holds nothing non-finite
    if not filled:
        return torch.tensor(True, device=params[0].device)
    return torch.stack([torch.stack(torch.aminmax(p)) for p in filled]).isfinite().all()


def weights_finite(params: Sequence[Tensor], fused: bool | None = None) -> bool:
    """`finite_flag` read on the host (one sync)."""
    return bool(finite_flag(params, fused))


def dense_cover(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The same elements as ``tensors``, in tensors that are all non-overlapping and dense.

    PyTorch's multi-tensor (``_foreach_*``) kernels take their fast route only when every tensor of
    the list is dense; one that is not sends the whole list through one kernel per tensor. The
    callback's private model has such tensors: `pack_attention_weights` keeps ``W_Q``, ``W_K`` and
    ``W_V`` (and their biases) in one storage, each a strided slice of it. A group of tensors that
    are not dense is replaced by one flat view of the storage they share when together they hold
    exactly its elements (sizes add up to it); otherwise they are kept as they are.
    """
    dense: list[Tensor] = []
    sharing: dict[tuple[int, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        if is_dense(tensor):
            dense.append(tensor)
        else:
            # the storage itself (its address would be 0 for every tensor on the meta device)
            sharing.setdefault((tensor.untyped_storage()._cdata, tensor.dtype), []).append(tensor)
    for group in sharing.values():
        numel = group[0].untyped_storage().nbytes() // group[0].element_size()
        if sum(t.numel() for t in group) == numel:
            dense.append(group[0].as_strided((numel,), (1,), 0))
        else:
            dense.extend(group)
    return dense


ACCELERATORS: dict[str, tuple[str, Callable[[], bool]]] = {
    "cuda": ("CUDA", lambda: torch.cuda.is_available()),
    "mps": ("MPS", lambda: torch.backends.mps.is_available()),
    "xpu": ("XPU", lambda: torch.xpu.is_available()),
}
"""The accelerator device types whose availability torch reports without initialising them: the name an
error gives each, and its check."""


def unavailable_accelerator(device: torch.device) -> str | None:
    """The name of ``device``'s type (`ACCELERATORS`) where torch reports no such device available, else
    None (available, or a type torch is left to refuse when it is used)."""
    name, available = ACCELERATORS.get(device.type, (None, None))
    return name if available is not None and not available() else None


def check_device_and_dtype(device: Any, dtype: Any, caller: str) -> None:
    """Refuses, before anything is read or built, a ``dtype`` that is not a floating-point ``torch.dtype``
    (an integer one failed inside TransformerLens: "Only Tensors of floating point ... can require
    gradients"; a string was blamed on the snapshot) and a ``torch.dtype`` passed as ``device`` (the
    second positional argument of the loaders: ``load_snapshot(path, torch.float16)``).

    A ``device`` torch cannot parse, or an accelerator (CUDA, MPS, XPU) where none of its type is
    available, is refused here too (it failed inside TransformerLens, after every snapshot had been read).

    Raises:
        TypeError: naming ``caller`` and the value.
        ValueError: for a device that is not a torch device or not available here.
    """
    if isinstance(device, torch.dtype):
        raise TypeError(f"{caller}: device={device} is a dtype (the second positional argument is the device); "
                        f"pass dtype={device} by keyword")
    if device is not None:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"{caller}: device={device!r} is not a torch device ({err})") from None
        if (missing := unavailable_accelerator(parsed)) is not None:
            raise ValueError(f"{caller}: device={device!r}, but no {missing} device is available here")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):  # None: float32
        raise TypeError(f"{caller}: dtype must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")


def build_hooked_transformer(
    converter: str | Converter,
    model_config: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """A new ``HookedTransformer`` holding a copy of ``state_dict``'s weights, in eval mode.

    No weight processing (LayerNorm folding, centring) is applied: the model computes exactly what
    the source model does. The global RNG is not used (``init_weights=False``).

    Raises:
        TypeError: for a ``dtype`` that is not a floating-point ``torch.dtype`` (`check_device_and_dtype`).
    """
    check_device_and_dtype(device, dtype, "build_hooked_transformer")
    cfg, weights = convert(converter, model_config, state_dict)
    if device is None:
        device = next(iter(state_dict.values())).device if state_dict else "cpu"
    with _quiet_deprecation():
        hooked = HookedTransformer(finalize_config(cfg, device, dtype), move_to_device=True)
    copy_weights(hooked, weights)
    return hooked.eval()
