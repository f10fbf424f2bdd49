"""``lens-train``: LightningCLI over :class:`~nanogpt_model.NanoGPTModule` and :class:`~nanogpt_model.TextDataModule`.

Example:
    lens-train fit --config configs/default.yaml --trainer.max_steps=200

The repository's run configs ship inside the package (``lens_callback/configs``): a ``--config``
path that does not exist, such as ``configs/default.yaml`` outside a checkout, or a bare name
(``default``), is taken from there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import NoReturn

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import Logger

from lens_callback.callback import LensError
from nanogpt_model import NanoGPTModule, TextDataModule


def packaged_config(name: str) -> Path | None:
    """The shipped run config called ``name`` (``default``, ``default.yaml`` or ``configs/default.yaml``)."""
    stem = Path(name).name
    folder = resources.files("lens_callback") / "configs"
    for candidate in (stem, f"{stem}.yaml"):
        entry = folder / candidate
        if entry.is_file():
            return Path(str(entry))
    return None


def _config_option(arg: str) -> tuple[bool, str | None]:
    """Whether ``arg`` is ``--config`` as argparse reads it, and its attached value (``None``: the value
    is the next argument): ``-c``, ``-cVALUE``, ``-c=VALUE``, ``--config`` and the abbreviations
    argparse accepts (``--conf``, ``--co=VALUE``; the root's other options, ``--help`` and
    ``--print_config``, share no prefix with it; under a subcommand an ambiguous one, ``--c`` beside
    ``--ckpt_path``, is argparse's to refuse). `_config_values` reads the arguments with it."""
    if arg.startswith("--"):
        name, eq, value = arg[2:].partition("=")
        if name and "config".startswith(name):
            return True, value if eq else None
        return False, None
    if arg.startswith("-c"):
        return True, arg[2:].removeprefix("=") or None
    return False, None


def _config_values(args: list[str]) -> Iterator[tuple[int, int, str]]:
    """Each ``--config`` option in ``args`` that has a value (`_config_option`), as ``(option's index,
    value's index, value)``: the indices are equal for an attached value (``--config=NAME``,
    ``-cNAME``), and a value taken from the next argument is stepped over, as argparse steps over it
    (in ``--config -cfoo`` the value is ``-cfoo``, no second option). `with_packaged_configs`,
    `_missing_config_refusal` and `_root_config_refusal` all walk the arguments with it."""
    i = 0
    while i < len(args):
        is_config, value = _config_option(args[i])
        if is_config and value is None and i + 1 < len(args):  # the value is the next argument
            yield i, i + 1, args[i + 1]
            i += 2
            continue
        if is_config and value is not None:
            yield i, i, value
        i += 1


def _may_be_shipped(value: str) -> bool:
    """Whether a ``--config`` value has the form of a shipped config's name, ``NAME``, ``NAME.yaml`` or
    ``configs/NAME``, and is no inline YAML: what `with_packaged_configs` resolves, and
    `_missing_config_refusal` refuses when it names nothing."""
    return Path(value).parent in (Path("."), Path("configs")) and "\n" not in value and ":" not in value


def with_packaged_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config`` value (`_config_option`) that names no file and reads ``configs/NAME``,
    ``NAME.yaml`` or ``NAME`` replaced by the shipped config ``NAME``, where there is one (a note on
    stderr says so); anything else (a missing file elsewhere, inline YAML) is left for LightningCLI."""

    def resolve(value: str) -> str:
        if not _may_be_shipped(value):
            return value
        try:
            if Path(value).is_file():  # a directory of that name (runs/default, which the default config writes) is no config
                return value
        except OSError:  # e.g. a name too long for the file system: not a file
            return value
        shipped = packaged_config(value)
        if shipped is None:
            return value
        print(f"lens-train: {value} not found here; using the shipped config {shipped}", file=sys.stderr)
        return str(shipped)

    out = list(args)
    for _, at, value in _config_values(args):
        # the value ends the argument at `at`: the whole next argument, or an attached one's end
        # (--config=NAME, -cNAME, -c=NAME)
        out[at] = out[at][: len(out[at]) - len(value)] + resolve(value)
    return out


def shipped_config_names() -> list[str]:
    """The names of the shipped run configs (``default``, ``modern``, ...), sorted."""
    folder = resources.files("lens_callback") / "configs"
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def _missing_config_refusal(args: list[str]) -> str | None:
    """Why a ``--config`` value (`_config_option`) left as `with_packaged_configs` reads it, a bare name or
    ``configs/NAME``, names nothing, or ``None``: neither a file here nor a shipped config
    (``--config defualt`` was jsonargparse's usage text and ``File does not exist: '/cwd/defualt'``,
    which named no config that does exist: cli review)."""
    for _, _, value in _config_values(args):
        if not value or value.startswith(("-", "{", "[")) or not _may_be_shipped(value):
            continue
        try:
            if Path(value).exists():
                continue
        except (OSError, ValueError):  # a name too long for the file system, a NUL: LightningCLI's to report
            continue
        return (f"--config {value}: no such file here ({Path.cwd()}), and no shipped config of that name; "
                f"the shipped configs: {', '.join(shipped_config_names())} (--config NAME, or a path to a YAML file)")
    return None


_SUBCOMMANDS = ("fit", "validate")
_ROOT_KEYS = (*_SUBCOMMANDS, "subcommand")
"""The keys a config given before the subcommand may hold (jsonargparse reads ``subcommand`` there)."""


def _root_config_refusal(args: list[str], env: Mapping[str, str] | None = None) -> str | None:
    """Why a config given before the subcommand would be lost, or ``None``. There LightningCLI reads a
    config of subcommands (``fit: {trainer: ...}``), and jsonargparse drops every other key without a
    word: ``lens-train --config configs/default.yaml fit`` trained the default model with the
    defaults, the run config unread. Inline YAML is read as jsonargparse reads it; a file or string
    that is no mapping is left to LightningCLI. With ``JSONARGPARSE_DEFAULT_ENV=true`` the root's
    ``PL_CONFIG`` is such a config too."""
    env = os.environ if env is None else env
    options = list(_config_values(args))
    taken = {at for option, at, _ in options if at != option}  # values of a --config: no subcommand
    subcommand_at = next((i for i, arg in enumerate(args) if arg in _SUBCOMMANDS and i not in taken), None)
    if subcommand_at is None:
        return None  # no subcommand: LightningCLI says so itself (or run=False, where configs are flat)
    subcommand = args[subcommand_at]
    configs = [(f"--config {value}", value) for option, _, value in options if option < subcommand_at]
    if env.get("JSONARGPARSE_DEFAULT_ENV", "").lower() == "true" and env.get("PL_CONFIG"):
        configs.insert(0, (f"PL_CONFIG={env['PL_CONFIG']}", env["PL_CONFIG"]))
    for given, value in configs:
        try:
            is_file = Path(value).is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL: inline YAML then
            is_file = False
        try:
            loaded = yaml.safe_load(Path(value).read_text(encoding="utf-8") if is_file else value)
        except (OSError, ValueError, yaml.YAMLError):  # unreadable, bad YAML: LightningCLI's to report
            continue
        if not isinstance(loaded, dict):
            continue
        lost = [str(key) for key in loaded if key not in _ROOT_KEYS]
        if lost:
            return (f"{given} comes before the subcommand, where LightningCLI reads a config of subcommands "
                    f"({{{subcommand}: {{trainer: ..., model: ...}}}}) and ignores anything else, so its {lost} "
                    f"would not be used: give it after the subcommand, `lens-train {subcommand} --config {value}`")
    return None


def _raised_by_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "jsonargparse" in Path(tb.tb_frame.f_code.co_filename).parts


def _class_refusal(err: BaseException) -> BaseException:
    """The outermost exception of ``err``'s chain that jsonargparse did not raise: the class's own (a
    class that wraps a raw error, naming the setting, is heard, not the raw error)."""
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        if not _raised_by_jsonargparse(link):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return err


_REFUSALS = (ValueError, MisconfigurationException)  # the classes' refusals; the Trainer's are the latter


def _refuse(err: BaseException, shown: BaseException | None = None) -> NoReturn:
    """``shown`` (by default ``err``) as one line on stderr and exit status 2 (``JSONARGPARSE_DEBUG=true``:
    ``err`` raised as it is)."""
    if os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true":  # as jsonargparse reads it
        raise err
    shown = shown or err
    print(f"lens-train: error: {type(shown).__name__}: {shown}", file=sys.stderr)
    raise SystemExit(2) from err


def _not_a_lightning_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """Why the torch file ``path`` cannot be resumed from, or ``None`` if it is a Lightning checkpoint:
    a dict with Lightning's version key, which the Trainer reads first when it restores (else a
    ``KeyError`` at fit start). Memory-mapped where the file is in torch's zip format, so a large file
    is not read into memory again (LightningCLI has just loaded it for its hyper-parameters)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # torch's legacy format cannot be mapped
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "pytorch-lightning_version" in checkpoint:
        return None
    if isinstance(checkpoint, dict) and "model" in checkpoint and "model_args" in checkpoint:
        return (f"it is a nanoGPT ckpt.pt, weights without Lightning's training state: probe it with "
                f"`lens-probe {path} --csv probes.csv` (or --logdir), or load it with "
                f"lens_callback.load_nanogpt_checkpoint")
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return ("it is a state dict, weights without Lightning's training state or model settings: lens-train "
                "resumes only what a Lightning Trainer saved (ModelCheckpoint, OnExceptionCheckpoint); for "
                "lens-probe, save the weights as nanoGPT's train.py does, {'model': state_dict, 'model_args': "
                "{'n_layer': ..., 'n_head': ..., 'n_embd': ..., 'block_size': ..., 'bias': ..., 'vocab_size': ...}}")
    return "it holds no 'pytorch-lightning_version', which every checkpoint a Lightning Trainer saves has"


class _SetUpWatch(L.Callback):
    """Whether a fit is still setting up: no training batch has started and no validation runs (the
    model's validation step, where an error is the code's, not a setting's: the sanity check, or the
    validation a fit resumed from a checkpoint saved in one finishes before its first batch)."""

    def __init__(self) -> None:
        self.setting_up = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.setting_up = False

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.setting_up = True  # on_train_start (LensCallback's attach) follows

    def on_train_batch_start(self, *args: object) -> None:
        self.setting_up = False


_SET_UP_FILES = re.compile(r"config\.yaml|hparams\.yaml|events\.out\.tfevents\..*")
"""What a fit writes into its run directory before its first batch: LightningCLI's ``config.yaml``, a
logger's ``hparams.yaml`` and TensorBoard's event file."""


def _run_roots(trainer: L.Trainer) -> list[tuple[Logger, Path, frozenset[str]]]:
    """Each local logger's folder of runs (``save_dir/name``: TensorBoard's and CSV's) with what it holds
    now, read before a fit begins: a run directory that is not among them is the fit's own."""
    roots = []
    for logger in trainer.loggers:
        root = logger.root_dir  # None for a logger without one (W&B's: runs kept by W&B)
        if not isinstance(root, (str, os.PathLike)) or "://" in str(root):
            continue
        try:
            held = frozenset(os.listdir(root))
        except FileNotFoundError:  # not there yet
            held = frozenset()
        except OSError:  # unreadable: what it held is unknown, so nothing in it is taken for the fit's own
            continue
        roots.append((logger, Path(root), held))
    return roots


def _remove_set_up_leftovers(roots: list[tuple[Logger, Path, frozenset[str]]]) -> list[Path]:
    """Removes the run directories a fit refused while it set up made (`_run_roots` names the folders and
    what they held before), where they hold nothing but what set-up writes (`_SET_UP_FILES`, and empty
    folders such as the snapshot directory): the next run takes their version number (``version_0``,
    which README's post-hoc lines read), and TensorBoard lists no empty run. A directory that was there
    before (a resumed run's, a fixed ``version``) or that holds anything else is left. Returns those
    removed."""
    removed = []
    for logger, root, held in roots:
        log_dir = logger.log_dir
        if log_dir is None:
            continue
        try:
            top = Path(log_dir).relative_to(root).parts[0]  # version_N (TensorBoard's may hold a sub_dir)
        except (ValueError, IndexError):  # not inside root
            continue
        folder = root / top
        if top in held or not folder.is_dir():
            continue
        try:
            entries = list(folder.rglob("*"))
        except OSError:
            continue
        if all(entry.is_dir() or _SET_UP_FILES.fullmatch(entry.name) for entry in entries):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


_REGISTRY = re.compile(r"registry(:.*)?", re.IGNORECASE | re.DOTALL)
"""A ``ckpt_path`` naming a model registry entry, as Lightning's ``_is_registry`` reads it (Lightning takes
it for one only where ``litmodels`` is installed, a file path otherwise)."""


class LensCLI(LightningCLI):
    """LightningCLI whose setting refused by a class is a one-line error with exit status 2, as a
    misspelt key is, instead of tracebacks (``JSONARGPARSE_DEBUG=true`` shows them): refused when the
    class is built (``LensCallback(every_n_steps=0)``, a ``GPTConfig`` whose ``n_embd`` the heads do
    not divide, ``Trainer(devices=0)``; jsonargparse's namespace dump goes too), or while the fit
    sets up, before its first training batch (a callback setting the model cannot take, data that
    do not fit the model)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate``: ``NanoGPTModule`` has no ``test_step`` or ``predict_step``, so the
        ``test`` and ``predict`` LightningCLI offers always failed, with a traceback (cli review)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the hyper-parameters of ``--ckpt_path`` before building the classes; a file
        that is missing or no checkpoint is a one-line error with exit status 2, as a missing ``--config``
        is (it was a traceback: cli review). Lightning's keywords (``last``, ``best``, ``hpc``,
        ``registry...`` where ``litmodels`` is installed), remote URLs and directories (a sharded
        checkpoint) are left to the Trainer; ``~`` is the home directory, as for Lightning's loader
        (diff review)."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        registry = _REGISTRY.fullmatch(str(path)) and importlib.util.find_spec("litmodels") is not None
        if (not isinstance(path, (str, os.PathLike)) or "://" in str(path) or str(path) in ("last", "best", "hpc")
                or registry):
            super()._parse_ckpt_path()  # none, a keyword, a remote URL: the Trainer's to resolve
            return
        if str(path).startswith("~"):  # the file LightningCLI reads the hyper-parameters of (diff review)
            path = self.config[subcommand]["ckpt_path"] = os.path.expanduser(path)
        if not os.path.exists(path):  # False, not OSError, for a name too long for the file system
            _refuse(FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file or directory"))
        try:
            super()._parse_ckpt_path()
        except Exception as err:  # noqa: BLE001 - torch.load's: EOFError, UnpicklingError, RuntimeError (zip)
            _refuse(err, ValueError(f"--ckpt_path {path} cannot be read as a checkpoint (torch.load failed: it is no "
                                    f"file torch.save wrote, or a damaged one): {type(err).__name__}: {err}"))
        if os.path.isfile(path) and (why := _not_a_lightning_checkpoint(path)) is not None:
            _refuse(ValueError(f"--ckpt_path {path} is not a Lightning checkpoint: {why}"))

    def before_validate(self) -> None:
        """A warning that ``validate`` without ``--ckpt_path`` measures the model as built, its initial
        weights: the command line has no other way to give it trained ones (it printed a validation loss
        near ln(vocab_size) without a word: cli review)."""
        if self.config["validate"].get("ckpt_path") is None:
            warnings.warn(
                "lens-train validate without --ckpt_path validates the untrained model (its initial weights, "
                "seed_everything's): pass --ckpt_path PATH, a checkpoint a fit saved (e.g. "
                "runs/default/version_0/checkpoints/*.ckpt)", UserWarning, stacklevel=2)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _REFUSALS as err:
            _refuse(err, _class_refusal(err))

    def _run_subcommand(self, subcommand: str) -> None:
        watch = _SetUpWatch()
        # read anew in `finally`: fit gives the trainer a new list (the model's configure_callbacks)
        self.trainer.callbacks.append(watch)  # type: ignore[attr-defined]  # Lightning's Trainer sets it unannotated
        roots = _run_roots(self.trainer) if subcommand == "fit" else []
        try:
            super()._run_subcommand(subcommand)
        except (*_REFUSALS, LensError) as err:  # strict: a snapshot directory that cannot be used is refused too
            if subcommand != "fit" or not watch.setting_up or (isinstance(err, LensError) and err.kind != "snapshot"):
                raise
            if self.trainer.is_global_zero:
                for folder in _remove_set_up_leftovers(roots):
                    print(f"lens-train: removed {folder}, which this fit made before it was refused (nothing "
                          f"trained)", file=sys.stderr)
            _refuse(err)
        finally:
            self.trainer.callbacks.remove(watch)  # type: ignore[attr-defined]  # as above


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Builds the CLI; ``run=False`` parses and instantiates only (used by the config tests).

    ``args=None`` reads the command line (``sys.argv``), with `with_packaged_configs` applied to it
    in place for the call: LightningCLI warns that "args" is meant for use from Python whenever it
    gets both ``args`` and a command line, which every ``lens-train`` run would have printed.
    """
    def make(cli_args: list[str] | None) -> LightningCLI:
        return LensCLI(
            NanoGPTModule,
            TextDataModule,
            args=cli_args,
            run=run,
            seed_everything_default=1337,
            # a resumed run writes config.yaml into the same log dir again: overwrite instead of aborting
            save_config_kwargs={"overwrite": True},
        )

    resolved = with_packaged_configs(list(sys.argv[1:] if args is None else args))
    if (why := _missing_config_refusal(resolved)) is not None:
        _refuse(FileNotFoundError(why))
    if run and (why := _root_config_refusal(resolved)) is not None:
        _refuse(ValueError(why))
    if args is not None:
        return make(resolved)
    argv = sys.argv
    sys.argv = [argv[0], *resolved]
    try:
        return make(None)
    finally:
        sys.argv = argv


def train_main(args: list[str] | None = None) -> None:
    """Entry point of ``lens-train``."""
    build_cli(args)


if __name__ == "__main__":  # python -m lens_callback.cli, as lens-train
    train_main()
