"""Every YAML in ``configs/`` parses and instantiates through ``lens-train``'s CLI; a tiny fit and its resume."""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lens_callback.callback import LensError
from lens_callback.cli import build_cli
from conftest import readme_block, readme_commands
from nanogpt_model import GPTConfig, NanoGPTModule, TextDataModule

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when pytest's own command line sits in ``sys.argv`` beside ``args``."""
    monkeypatch.setattr(sys, "argv", ["lens-train"])


def _portable_overrides(config: dict[str, Any], tmp_path: Path, make_data_dir: Callable[..., Path]) -> list[str]:
    """Overrides that let a config instantiate here: absent data paths and GPU-only accelerators."""
    args: list[str] = []
    data = config.get("data") or {}
    if data.get("data_dir") is not None:
        found = REPO_ROOT / data["data_dir"]
        args.append(f"--data.data_dir={found if found.is_dir() else make_data_dir()}")
    if data.get("text_path") is not None:
        found = REPO_ROOT / data["text_path"]
        if not found.is_file():
            found = tmp_path / "text.txt"
            found.write_text("To be, or not to be, that is the question.\n" * 50, encoding="utf-8")
        args.append(f"--data.text_path={found}")
    accelerator = (config.get("trainer") or {}).get("accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        args.append("--trainer.accelerator=cpu")
    return args


def test_configs_are_found() -> None:
    names = {path.name for path in CONFIGS}
    assert {"default.yaml", "one_layer.yaml", "shakespeare_char.yaml", "gpt2_124m.yaml"} <= names


def test_a_misspelt_model_config_key_is_a_parse_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The parser knows GPTConfig's fields: a typo (TransformerLens's ``n_layers``) stops at parse time, as
    a trainer or callback key does, not with a traceback once fit starts."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        build_cli(["--config", str(REPO_ROOT / "configs" / "default.yaml"), "--model.config.n_layers=1"], run=False)
    assert "n_layers" in capsys.readouterr().err
    cli = build_cli(["--config", str(REPO_ROOT / "configs" / "default.yaml"), "--model.config.n_layer=1",
                     "--trainer.logger=false"], run=False)
    assert cli.model.config.n_layer == 1


@pytest.mark.parametrize("override, message", [
    ("--trainer.callbacks.init_args.every_n_steps=0", "ValueError: every_n_steps must be a positive integer"),
    ("--model.config.n_head=3", "GPTConfig.n_embd (128) must be divisible by GPTConfig.n_head (3)"),
    # the class's own wrapper, naming the setting, not the raw error it wraps (diff review)
    ("--trainer.devices=0", "MisconfigurationException: `Trainer(devices='0')` value is not a valid input"),
    ('--trainer.callbacks.init_args.probe_options={"logit_lens": {"max_pos": 3}}',
     "TypeError: probe_options['logit_lens']: LogitLensProbe.__init__() got an unexpected keyword argument "
     "'max_pos'; LogitLensProbe takes ['max_positions']"),
])
def test_a_value_a_class_refuses_is_a_one_line_error_with_exit_2(
    override: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """(validation review: exit 1 and two tracebacks with jsonargparse's union errors and a namespace dump.)"""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        build_cli(["--config", str(REPO_ROOT / "configs" / "default.yaml"), override, "--trainer.logger=false"],
                  run=False)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "lens-train: error: " in err and message in err
    assert "Traceback" not in err and "Namespace(" not in err and len(err.strip().splitlines()) == 1


_USER_PROBES = """
import torch
from lens_callback.probes.base import AttentionPatternProbe, register_probe

CALLS = []  # the patterns reduced

@register_probe
class SinkProbe(AttentionPatternProbe):
    name = "test_cli_sink"
    batch = "text"

    def reduce_pattern(self, pattern, tokens):
        CALLS.append(pattern.shape)
        return pattern[:, :, 1:, 0].sum(dim=(0, 2), dtype=torch.float32), pattern.shape[0] * (pattern.shape[2] - 1)

"""


#: Overrides that cut a ``configs/default.yaml`` fit to one step writing nothing.
_ONE_QUIET_STEP = ["--trainer.logger=false", "--trainer.max_steps=1", "--trainer.enable_checkpointing=false",
                   "--trainer.limit_val_batches=0", "--trainer.callbacks.init_args.snapshot_dir=null",
                   "--trainer.callbacks.init_args.snapshot_every=1"]


def _run_train_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, probes: tuple[str, str],
                      argv: list[str]) -> list[Any]:
    """``python train.py ARGV`` in ``tmp_path``, ``script`` its ``train.py``, beside a module ``probes[0]``
    registering `_USER_PROBES`'s probe as ``probes[1]``; returns what the probe reduced (empty: never run)."""
    import runpy

    from lens_callback.probes.base import PROBES

    module, name = probes
    (tmp_path / f"{module}.py").write_text(_USER_PROBES.replace("test_cli_sink", name), encoding="utf-8")
    (tmp_path / "train.py").write_text(script, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))  # python train.py puts the script's directory first
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "train.py"), *argv])
    try:
        runpy.run_path(str(tmp_path / "train.py"), run_name="__main__")
        return sys.modules[module].CALLS
    finally:
        PROBES.pop(name, None)
        sys.modules.pop(module, None)


def test_a_probe_of_your_own_reaches_lens_train_through_a_script_that_imports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """lens-train has no ``--import``: an unknown probe's refusal said neither that a probe of one's own must be
    registered first nor how to import its module for the command line (custom-probe review); the way the
    README and the message give, a script importing it before ``train_main()``, trains with it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    args = ["fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"), *_ONE_QUIET_STEP,
            "--trainer.callbacks.init_args.probes=[test_cli_sink]"]
    with pytest.raises(SystemExit) as info:
        build_cli(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "unknown probe name(s) ['test_cli_sink']" in err
    assert "lens_callback.register_probe" in err and "lens_callback.cli.train_main()" in err
    script = "import lens_user_probes_xyz\nfrom lens_callback.cli import train_main\n\ntrain_main()\n"
    assert _run_train_script(tmp_path, monkeypatch, script, ("lens_user_probes_xyz", "test_cli_sink"), args)


def test_the_readmes_command_for_a_probe_of_your_own_keeps_the_default_probes(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's ``python train.py fit ...`` command with ``my_probe`` runs the default probes and it: ``+=`` on
    the signature's default gives a list of that one probe (diff review), so the README listed all eight; since
    ``configs/default.yaml`` lists the default probes, its ``probes+=my_probe`` adds to them."""
    import shlex

    from lens_callback import LensCallback
    from lens_callback.measure import DEFAULT_PROBES
    from lens_callback.probes.base import PROBES

    command = shlex.split(readme_block("sh", "python train.py fit").replace("\\\n", " "))  # line continuations
    assert command[:3] == ["python", "train.py", "fit"], command
    monkeypatch.chdir(tmp_path)  # configs/default.yaml: the shipped one
    exec(_USER_PROBES.replace("test_cli_sink", "my_probe"), {})  # noqa: S102 - the README's my_probes module
    try:
        cli = build_cli([*command[3:], "--trainer.logger=false"], run=False)
        callback = next(c for c in cli.trainer.callbacks if isinstance(c, LensCallback))
        assert [probe.name for probe in callback.runner.probes] == [*DEFAULT_PROBES, "my_probe"]
    finally:
        PROBES.pop("my_probe", None)


def test_the_readmes_train_script_runs_as_written_with_its_command_and_runs_my_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's ``train.py`` (its lines, as printed), run as its ``python train.py fit ...`` command runs it
    (cut to one step) beside a ``my_probes`` module registering ``my_probe``: the fit's probe steps run it."""
    import shlex

    script = readme_block("python", "# train.py\n")
    command = shlex.split(readme_block("sh", "python train.py fit").replace("\\\n", " "))
    assert command[:2] == ["python", "train.py"], command
    monkeypatch.chdir(tmp_path)  # configs/default.yaml: the shipped one
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    assert _run_train_script(tmp_path, monkeypatch, script, ("my_probes", "my_probe"), [*command[2:], *_ONE_QUIET_STEP])


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_the_readmes_lens_train_command_lines_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every ``lens-train ...`` line of the README's prose, run as written (a fit cut to one step, ``X`` the
    shipped default config, ``PATH`` a checkpoint of that fit): the fit and the validation of the checkpoint
    run, and ``lens-train --config X fit`` exits 2, as the README says."""
    monkeypatch.chdir(tmp_path)  # configs/default.yaml: the shipped one
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    commands = readme_commands("lens-train", {"X": "configs/default.yaml", "PATH": "fit.ckpt"})
    ran = []
    for words in sorted(map(tuple, commands), key=lambda words: words[:1] != ("fit",)):  # the fit writes PATH
        if "--config" not in words or words in ran:  # `lens-train` or `lens-train validate` named in passing
            assert words[:1] in ((), ("fit",), ("validate",)), words
            continue
        if words[0] == "--config":
            with pytest.raises(SystemExit) as info:
                build_cli([*words, "--trainer.logger=false"])
            assert info.value.code == 2 and "comes before the subcommand" in capsys.readouterr().err, words
        else:
            cli = build_cli([*words, *_ONE_QUIET_STEP, f"--trainer.limit_val_batches={int(words[0] == 'validate')}"])
            if words[0] == "fit":
                assert cli.trainer.global_step == 1
                cli.trainer.save_checkpoint("fit.ckpt")
            else:
                assert cli.trainer.state.fn == "validate" and cli.trainer.callback_metrics["val/loss"] > 0, words
        ran.append(words)
    assert sorted(words[0] for words in ran) == ["--config", "fit", "validate"]


def test_the_readmes_probes_flag_appends_to_a_configs_list_and_else_gives_that_one_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's ``--trainer.callbacks.probes+=NAME`` (options notes) as written: after a config that lists
    probes, as every shipped one does (the default probes), it appends NAME; after a config that lists none it
    gives NAME alone (jsonargparse appends only to a list, and the signature's default is a tuple). The
    shipped configs listed none, so ``lens-train fit --config default --trainer.callbacks.probes+=k_composition``
    ran k_composition alone, the seven default probes gone."""
    from lens_callback import DEFAULT_PROBES, LensCallback

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    (flag,) = re.findall(r"on the `lens-train` command line `(--\S+=)NAME` appends to the list a config sets", readme)
    config = yaml.safe_load((REPO_ROOT / "configs" / "default.yaml").read_text(encoding="utf-8"))
    del config["trainer"]["callbacks"][0]["init_args"]["probes"]
    (tmp_path / "unlisted.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for path in CONFIGS:  # every shipped config lists the default probes
        (entry,) = yaml.safe_load(path.read_text(encoding="utf-8"))["trainer"]["callbacks"]
        assert tuple(entry["init_args"]["probes"]) == DEFAULT_PROBES, path.name
    # the configs that build without a nanoGPT data dir of their own (shakespeare_char, gpt2_124m need one)
    for name in ["default", "modern", "one_layer", "unlisted.yaml"]:
        cli = build_cli(["--config", name, f"{flag}k_composition", "--trainer.logger=false"], run=False)
        (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LensCallback)]
        listed = [] if name == "unlisted.yaml" else list(DEFAULT_PROBES)
        assert [probe.name for probe in callback.runner.probes] == [*listed, "k_composition"], name


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_the_readmes_ckpt_path_last_resumes_only_with_its_model_checkpoint_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's ``--ckpt_path last`` with ``configs/default.yaml`` trains from step 0 with a warning; with the
    ``ModelCheckpoint`` it gives (``--trainer.callbacks+=ModelCheckpoint ...``, as written) after a fit's first
    validation, it resumes there. Fits cut to a few steps, validating at step 2."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    (last,) = re.findall(r"`(--ckpt_path last)` finds no checkpoint with these configs", readme)
    (recipe,) = re.findall(r"add a `ModelCheckpoint` that saves one in a fixed place\s*\(`([^`]*)`\)", readme)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    short = [*_ONE_QUIET_STEP, "--trainer.enable_checkpointing=true", "--trainer.max_steps=2",
             "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"]
    with pytest.warns(UserWarning, match="last"):
        assert build_cli(["fit", "--config", "default", *short, *last.split()]).trainer.global_step == 2
    checkpoint = ["fit", "--config", "default", *short, *recipe.split()]  # after the LensCallback's init_args
    assert build_cli(checkpoint).trainer.global_step == 2
    resumed = build_cli([*checkpoint, "--trainer.max_steps=3", *last.split()]).trainer
    assert resumed.global_step == 3 and Path(resumed.ckpt_path) == tmp_path / "runs/default/checkpoints/last.ckpt"


def test_the_readmes_way_to_run_the_default_config_without_snapshots_does(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """README: "To run configs/default.yaml without snapshots, pass `A` with `B` (it sets 4, which needs a
    directory)": both build a callback without a snapshot directory; ``A`` alone is refused."""
    from lens_callback import LensCallback

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    (flags,) = re.findall(r"To run `configs/default.yaml` without snapshots, pass\s+`(\S+)` with\s+`(\S+)` "
                          r"\(it sets 4, which needs a directory\)", readme)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    cli = build_cli(["--config", "default", *flags, "--trainer.logger=false"], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LensCallback)]
    assert callback.snapshot_dir is None
    with pytest.raises(SystemExit) as info:
        build_cli(["--config", "default", flags[0], "--trainer.logger=false"], run=False)
    assert info.value.code == 2 and "snapshot_every" in capsys.readouterr().err


def test_the_readmes_yaml_for_the_callback_builds_it_as_configs_default_does(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's YAML lines for a LightningCLI, as a config of their own, build a ``LensCallback`` with the
    settings they name, which ``configs/default.yaml``'s callback (README: "as in") sets too."""
    from lens_callback import LensCallback

    block = readme_block("yaml", "class_path: lens_callback.LensCallback")
    (tmp_path / "readme.yaml").write_text(block, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", "readme.yaml", "--trainer.logger=false"], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LensCallback)]
    (entry,) = yaml.safe_load(block)["trainer"]["callbacks"]
    assert (callback.schedule.every_n_steps, callback.snapshot_dir) == (entry["init_args"]["every_n_steps"], "auto")
    (shipped,) = yaml.safe_load((REPO_ROOT / "configs" / "default.yaml").read_text())["trainer"]["callbacks"]
    assert shipped["class_path"] == entry["class_path"]
    assert entry["init_args"].items() <= shipped["init_args"].items()


def test_one_probe_named_without_brackets_on_the_command_line_is_that_probe(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``--trainer.callbacks.init_args.probes=induction`` was a 40-line jsonargparse error (a list was expected;
    LensCallback itself takes a name); a list and ``+=`` parse as before."""
    from lens_callback import LensCallback

    monkeypatch.chdir(tmp_path)
    for overrides, expected in [(["probes=k_composition"], ["k_composition"]),
                                (["probes=[induction, prev_token]"], ["induction", "prev_token"]),
                                (["probes=[induction]", "probes+=prev_token"], ["induction", "prev_token"])]:
        cli = build_cli(["--config", str(REPO_ROOT / "configs" / "default.yaml"), "--trainer.logger=false",
                         *(f"--trainer.callbacks.init_args.{override}" for override in overrides)], run=False)
        callback = next(c for c in cli.trainer.callbacks if isinstance(c, LensCallback))
        assert [probe.name for probe in callback.runner.probes] == expected, overrides


def test_probes_named_with_commas_on_the_command_line_are_refused_with_the_list_that_gives_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``probes=induction,k_composition`` (lens-probe's ``--probes`` takes names so) parses as one name since the
    annotation admits a str, and ``probes+=k_composition,q_composition`` appends one: each was refused as an
    unknown probe holding commas (diff review). The error says how to list them."""
    from lens_callback import LensCallback

    monkeypatch.chdir(tmp_path)
    for overrides, message in [
        (["probes=induction,k_composition"],
         "probes: 'induction,k_composition' is one name holding commas: give each probe as a name of its own, e.g. "
         "probes=['induction', 'k_composition'] (on the lens-train command line probes=[induction,k_composition], "
         "or probes+=NAME once per probe)"),
        (["probes=[induction]", "probes+=k_composition,q_composition"],
         "probes: 'k_composition,q_composition' is one name holding commas: give each probe as a name of its own, "
         "e.g. probes=['induction', 'k_composition', 'q_composition'] (on the lens-train command line "
         "probes=[induction,k_composition,q_composition], or probes+=NAME once per probe)"),
    ]:
        with pytest.raises(SystemExit):
            build_cli(["--config", str(REPO_ROOT / "configs" / "default.yaml"), "--trainer.logger=false",
                       *(f"--trainer.callbacks.init_args.{override}" for override in overrides)], run=False)
        err = capsys.readouterr().err
        assert f"lens-train: error: ValueError: {message}" in err, err
    with pytest.raises(ValueError, match=r"probes: ' induction, ' is one name holding commas: .* probes=\['induction'\]"):
        LensCallback(probes=" induction, ")


@pytest.mark.parametrize("override, message", [
    ("--trainer.callbacks.init_args.repeat_length=200",
     "ValueError: 2 * repeat_length (repeat_length=200) = 400 tokens is longer than the model's n_ctx = 256"),
    ("--data.block_size=512", "ValueError: data block_size=512 exceeds the model's config.block_size=256"),
])
def test_a_value_refused_while_the_fit_sets_up_is_a_one_line_error_with_exit_2(
    override: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused in setup, before step 1, but a traceback and exit 1 (data review); an error once training
    runs keeps its traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"), override, "--trainer.logger=false",
                   "--trainer.max_steps=2", "--trainer.enable_checkpointing=false"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"lens-train: error: {message}" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "lens-train: error" in line]) == 1
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")  # jsonargparse refuses "1"
    with pytest.raises(ValueError, match=re.escape(message.removeprefix("ValueError: "))):
        build_cli(["fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"), override, "--trainer.logger=false",
                   "--trainer.max_steps=2", "--trainer.enable_checkpointing=false"])


def test_a_fit_refused_while_it_sets_up_leaves_no_run_directory_and_the_next_run_takes_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fit refused in setup left ``runs/default/version_N`` holding LightningCLI's config.yaml, an empty event
    file and an empty snapshot directory: TensorBoard listed an empty run, and the next run took
    ``version_N+1``, so README's post-hoc lines (``runs/default/version_0``) read the empty one. What was there
    before the fit, a run's own directory or one a fixed ``version`` names, is left."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    earlier = tmp_path / "runs" / "default" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "keep.txt").write_text("an earlier run's")
    args = ["fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--trainer.max_steps=2",
            "--trainer.enable_checkpointing=false", "--trainer.callbacks.init_args.repeat_length=200"]
    with pytest.raises(SystemExit) as info:
        build_cli(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "lens-train: error: ValueError: 2 * repeat_length" in err, err
    assert f"lens-train: removed {Path('runs/default/version_1')}, which this fit made before it was refused" in err
    assert sorted(p.name for p in (tmp_path / "runs" / "default").iterdir()) == ["version_0"]
    assert [p.name for p in earlier.iterdir()] == ["keep.txt"]

    with pytest.raises(SystemExit):  # the directory a fixed version names was there before: left
        build_cli([*args, "--trainer.logger.init_args.version=0"])
    assert "removed" not in capsys.readouterr().err
    assert {"config.yaml", "keep.txt"} <= {p.name for p in earlier.iterdir()}  # and what set-up wrote: not removed
    assert (earlier / "keep.txt").read_text() == "an earlier run's"


def test_set_up_leftovers_are_removed_only_from_a_run_directory_the_fit_made_holding_nothing_else(
    tmp_path: Path
) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lens_callback.cli import _remove_set_up_leftovers

    def made(logger: Any, *files: str) -> Path:
        folder = Path(logger.log_dir)
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("")
        return folder

    tb, csv = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    roots = [(tb, Path(tb.root_dir), frozenset()), (csv, Path(csv.root_dir), frozenset())]
    kept = made(tb, "config.yaml", "events.out.tfevents.1.host.1.0", "checkpoints/last.ckpt")
    removed = made(csv, "hparams.yaml", "snapshots/.keep_me_not")  # a file set-up does not write: kept too
    assert _remove_set_up_leftovers(roots) == [] and kept.is_dir() and removed.is_dir()
    (removed / "snapshots" / ".keep_me_not").unlink()
    (kept / "checkpoints" / "last.ckpt").unlink()
    assert _remove_set_up_leftovers(roots) == [kept, removed] and not kept.exists() and not removed.exists()
    held = made(tb, "config.yaml")
    assert _remove_set_up_leftovers([(tb, Path(tb.root_dir), frozenset({held.name}))]) == [] and held.is_dir()


def test_a_folder_of_runs_that_cannot_be_listed_before_the_fit_is_not_watched(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a folder that is not there yet counts as holding nothing: one that cannot be listed (no read
    permission) may hold earlier runs, which must not be taken for the fit's own."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger

    from lens_callback import cli

    new, listed = TensorBoardLogger(tmp_path, name="new"), TensorBoardLogger(tmp_path, name="unreadable")
    Path(listed.root_dir).mkdir()
    real_listdir = os.listdir

    def listdir(path: Any) -> list[str]:
        if Path(path) == Path(listed.root_dir):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(cli.os, "listdir", listdir)
    roots = cli._run_roots(SimpleNamespace(loggers=[new, listed]))  # type: ignore[arg-type]
    assert [(logger, root, held) for logger, root, held in roots] == [(new, Path(new.root_dir), frozenset())]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
@pytest.mark.parametrize("kind", ["state-dict", "nanogpt-ckpt"])
def test_a_ckpt_path_to_weights_that_are_no_lightning_checkpoint_is_a_one_line_error_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kind: str, legacy: bool
) -> None:
    """A nanoGPT ckpt.pt or a saved state dict reads as a torch file, so the check above let it pass and the
    Trainer's restore stopped on KeyError: 'pytorch-lightning_version', a traceback and exit 1 (s26 fresh
    review), also in torch's legacy format, which cannot be memory-mapped (diff review). The error says
    what to do with each: lens-probe takes a nanoGPT ckpt.pt, and a state dict needs nanoGPT's wrapping."""
    from nanogpt_model import GPT, GPTConfig

    monkeypatch.chdir(tmp_path)  # LightningCLI writes config.yaml to the working directory
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    weights = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=256, bias=False)).state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(weights if kind == "state-dict" else {"model": weights, "model_args": {}, "iter_num": 10}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--trainer.logger=false",
                   "--trainer.max_steps=2", f"--ckpt_path={path}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    assert f"lens-train: error: ValueError: --ckpt_path {path} is not a Lightning checkpoint: it is a " in err, err
    if kind == "nanogpt-ckpt":
        assert f"`lens-probe {path} --csv probes.csv`" in err
    else:
        assert "it is a state dict" in err and "{'model': state_dict, 'model_args':" in err


@pytest.mark.parametrize("name", ["missing.ckpt", "not-a-checkpoint", "registry_runs/last.ckpt", "registry:model",
                                  "x" * 300])  # a registry name is a file path without litmodels; too long a name
def test_a_ckpt_path_that_is_missing_or_no_checkpoint_is_a_one_line_error_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Both were a traceback and exit 1, where a missing --config is one line and exit 2 (cli review)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    (tmp_path / "not-a-checkpoint").write_bytes(b"junk")
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--trainer.logger=false",
                   f"--ckpt_path={name}"])  # relative: cwd is tmp_path
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    assert re.search(rf"lens-train: error: \w+: --ckpt_path \S*{name}(: no such checkpoint file or directory| cannot be read as a "
                     rf"checkpoint \(torch.load failed: it is no file torch.save wrote)", err), err


def test_a_ckpt_path_that_is_a_directory_reaches_the_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded (FSDP, ModelParallel) checkpoint is a directory, which the Trainer loads: it is not
    refused as missing (diff review). This one is empty, so the Trainer's loader fails on it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sharded.ckpt").mkdir()
    with pytest.raises(IsADirectoryError):
        build_cli(["fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--trainer.logger=false",
                   f"--ckpt_path={tmp_path / 'sharded.ckpt'}"])


@pytest.mark.parametrize("form", ["path", "equals", "shipped name", "inline", "attached", "abbreviated",
                                  "abbreviated equals", "long inline", "validate", "environment"])
def test_a_run_config_before_the_subcommand_is_a_one_line_error_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    """Before ``fit`` LightningCLI reads a config of subcommands and jsonargparse dropped every other key
    without a word: `lens-train --config configs/default.yaml fit` trained with the defaults (the model's
    config null, seed 1337), the run config unread. Every form argparse reads as the root's --config
    (diff review: -cFILE, --conf FILE, --co=FILE, inline YAML longer than a file name may be)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    default = str(REPO_ROOT / "configs" / "default.yaml")
    long_inline = "{seed_everything: 7, model: {learning_rate: 0.0123, weight_decay: 0.1}, data: {block_size: 256}, " \
                  "trainer: {max_steps: 1, log_every_n_steps: 1, limit_val_batches: 1, val_check_interval: 1, " \
                  "gradient_clip_val: 1.0, enable_checkpointing: false, enable_model_summary: false}}"
    assert len(long_inline) > 255
    args = {"path": ["--config", default], "equals": [f"--config={default}"], "shipped name": ["-c", "default"],
            "inline": ["--config", "{seed_everything: 7, fit: {trainer: {max_steps: 1}}}"],
            "attached": [f"-c{default}"], "abbreviated": ["--conf", default], "abbreviated equals": [f"--co={default}"],
            "long inline": ["--config", long_inline], "validate": ["--config", default], "environment": []}[form]
    if form == "environment":
        monkeypatch.setenv("JSONARGPARSE_DEFAULT_ENV", "true")
        monkeypatch.setenv("PL_CONFIG", default)
    subcommand = "validate" if form == "validate" else "fit"
    with pytest.raises(SystemExit) as info:
        build_cli([*args, subcommand, "--trainer.logger=false"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    assert "comes before the subcommand" in err and f"lens-train {subcommand} --config" in err, err
    lost = {"inline": "['seed_everything']", "long inline": "['seed_everything', 'model', 'data', 'trainer']"}.get(
        form, "'seed_everything', 'trainer'")
    assert lost in err, err


def test_what_argparse_reads_as_the_config_option() -> None:
    from lens_callback.cli import _config_option

    assert _config_option("--config") == (True, None) and _config_option("--c") == (True, None)
    assert _config_option("--con=a.yaml") == (True, "a.yaml") and _config_option("-ca.yaml") == (True, "a.yaml")
    assert _config_option("-c=a.yaml") == (True, "a.yaml") and _config_option("-c") == (True, None)
    for other in ("--print_config", "--help", "-h", "--configs", "fit", "--"):
        assert _config_option(other) == (False, None), other


def test_a_config_of_subcommands_before_the_subcommand_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The form LightningCLI reads there still works, with the ``subcommand`` key jsonargparse reads there
    too (diff review)."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "nested.yaml"
    config.write_text(yaml.safe_dump({"subcommand": "fit", "fit": {
        "seed_everything": 7,
        "model": {"learning_rate": 0.0123, "config": {"n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 16}},
        "data": {"block_size": 16},
        "trainer": {"logger": False, "max_steps": 0, "accelerator": "cpu", "enable_checkpointing": False}}}),
        encoding="utf-8")
    cli = build_cli(["--config", str(config), "fit"])
    assert cli.config["fit"]["seed_everything"] == 7 and cli.model.hparams.learning_rate == 0.0123


def test_only_the_subcommands_the_module_can_run_are_offered(capsys: pytest.CaptureFixture[str]) -> None:
    """NanoGPTModule has no test_step or predict_step: `lens-train test` and `predict` always failed with a
    traceback (cli review)."""
    with pytest.raises(SystemExit) as info:
        build_cli(["test", "--config", str(REPO_ROOT / "configs" / "default.yaml")])
    assert info.value.code == 2 and "invalid choice: 'test' (choose from 'fit', 'validate')" in capsys.readouterr().err


def test_a_strict_snapshot_directory_refused_in_setup_is_a_one_line_error_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under strict, a snapshot directory that cannot be used is a LensError (a RuntimeError) in setup:
    a traceback and exit 1, against the README's one line and exit 2 (options review). A strict probe
    failure keeps its traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    (tmp_path / "a-file").write_text("")
    args = ["fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--trainer.logger=false",
            "--trainer.max_steps=2", "--trainer.enable_checkpointing=false", "--trainer.callbacks.init_args.strict=true"]
    with pytest.raises(SystemExit) as info:
        build_cli([*args, f"--trainer.callbacks.init_args.snapshot_dir={tmp_path / 'a-file'}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert re.search(r"lens-train: error: LensError: snapshot directory .*a-file is not usable", err), err

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug in a probe")

    monkeypatch.setattr("lens_callback.callback.measure", broken)
    with pytest.raises(LensError, match="probe step 0 failed: ValueError: a bug in a probe"):
        build_cli([*args, "--trainer.callbacks.init_args.snapshot_dir=null",
                   "--trainer.callbacks.init_args.snapshot_every=1"])


def test_an_error_in_a_training_step_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug in the step")

    monkeypatch.setattr(NanoGPTModule, "training_step", broken)
    with pytest.raises(ValueError, match="a bug in the step"):
        build_cli(["fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--trainer.logger=false",
                   "--trainer.max_steps=2", "--trainer.enable_checkpointing=false",
                   "--trainer.callbacks.init_args.snapshot_dir=null", "--trainer.callbacks.init_args.snapshot_every=1"])


def test_an_error_in_the_validation_a_resumed_fit_finishes_first_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fit resumed from a checkpoint saved mid-validation finishes that validation before its first
    batch: an error of the validation step there was a one-line "setting" refusal (diff review)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug in validation_step")

    monkeypatch.setattr(NanoGPTModule, "validation_step", broken)
    args = ["fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--trainer.logger=false",
            "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
            "--trainer.num_sanity_val_steps=0", "--trainer.callbacks.init_args.snapshot_dir=null", "--trainer.callbacks.init_args.snapshot_every=1",
            "--trainer.callbacks+=lightning.pytorch.callbacks.OnExceptionCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}"]
    with pytest.raises(ValueError, match="a bug in validation_step"):
        build_cli(args)
    with pytest.raises(ValueError, match="a bug in validation_step"):
        build_cli([*args, f"--ckpt_path={tmp_path / 'ckpt' / 'on_exception.ckpt'}"])


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_instantiates(
    path: Path, tmp_path: Path, make_nanogpt_data_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = yaml.safe_load(path.read_text())
    overrides = _portable_overrides(config, tmp_path, make_nanogpt_data_dir)
    monkeypatch.chdir(tmp_path)  # relative output dirs (runs/, lightning_logs/) stay out of the repo
    # with run=False the parser has no subcommands: the arguments are fit's without the word "fit"
    cli = build_cli(["--config", str(path), *overrides], run=False)

    assert isinstance(cli.trainer, L.Trainer)
    assert isinstance(cli.model, NanoGPTModule) and isinstance(cli.datamodule, TextDataModule)
    model = config.get("model") or {}
    assert cli.model.config == GPTConfig.from_dict(model.get("config") or {})  # every YAML field arrived
    for key, value in model.items():
        if key != "config":
            got = cli.model.hparams[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    overridden = {arg.split("=")[0].removeprefix("--data.") for arg in overrides if arg.startswith("--data.")}
    for key, value in (config.get("data") or {}).items():
        if key not in overridden:
            assert cli.datamodule.hparams[key] == value, key
    assert cli.datamodule.block_size <= cli.model.config.block_size
    trainer = config.get("trainer") or {}
    if "max_steps" in trainer:
        assert cli.trainer.max_steps == trainer["max_steps"]


# nanoGPT's own numbers (config/train_shakespeare_char.py, config/train_gpt2.py, train.py defaults)
NANOGPT = {
    "shakespeare_char": dict(
        config=dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=False),
        model=dict(learning_rate=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1, betas=[0.9, 0.99]),
        data=dict(batch_size=64, block_size=256, data_dir="data/shakespeare_char"),
        trainer=dict(max_steps=5000, precision="bf16-mixed", accelerator="auto", gradient_clip_val=1.0),
    ),
    "gpt2_124m": dict(
        config=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0, bias=True),
        model=dict(learning_rate=6e-4, min_lr=6e-5, warmup_steps=2000, weight_decay=0.1, compile=True),
        data=dict(block_size=1024, data_dir="data/openwebtext"),
        trainer=dict(precision="bf16-mixed", accelerator="gpu", gradient_clip_val=1.0),
    ),
}


@pytest.mark.parametrize("name", sorted(NANOGPT))
def test_nanogpt_reproductions_keep_nanogpt_settings(name: str) -> None:
    config = yaml.safe_load((REPO_ROOT / "configs" / f"{name}.yaml").read_text())
    expected = NANOGPT[name]
    assert {k: config["model"]["config"][k] for k in expected["config"]} == expected["config"]
    assert {k: config["model"][k] for k in expected["model"]} == expected["model"]
    assert {k: config["data"][k] for k in expected["data"]} == expected["data"]
    assert {k: config["trainer"][k] for k in expected["trainer"]} == expected["trainer"]
    if name == "gpt2_124m":  # ~0.5M tokens per optimizer step, as nanoGPT
        tokens = config["data"]["batch_size"] * config["data"]["block_size"]
        tokens *= config["trainer"]["accumulate_grad_batches"] * config["trainer"].get("devices", 1)
        assert tokens == 491_520


def _tiny_fit_args(save_dir: Path, max_steps: int) -> list[str]:
    return [
        "fit", "--config", str(REPO_ROOT / "configs" / "default.yaml"),
        f"--trainer.max_steps={max_steps}",
        "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.logger.init_args.version=run",
        # a tiny model; block sizes stay the config's (callbacks may size their inputs by them)
        "--model.config.n_embd=32", "--model.config.n_head=2", "--data.batch_size=2",
    ]


def test_validate_without_a_checkpoint_warns_that_it_validates_the_untrained_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lens-train validate --config default` printed the untrained model's loss (about ln 256) without a word
    (cli review); with --ckpt_path it does not warn."""
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", str(REPO_ROOT / "configs" / "default.yaml"), "--trainer.logger=false",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--model.config.n_embd=32",
            "--model.config.n_head=2", "--data.batch_size=2"]
    with pytest.warns(UserWarning, match="without --ckpt_path validates the untrained model"):
        build_cli(args)
    fit = build_cli(["fit", *args[1:], "--trainer.max_steps=1", "--trainer.val_check_interval=1",
                     "--trainer.callbacks.init_args.snapshot_dir=null",
                     "--trainer.callbacks.init_args.snapshot_every=1",
                     "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.init_args.dirpath={tmp_path}"])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    assert ckpt, "the fit saved no checkpoint"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_cli([*args, f"--ckpt_path={ckpt}"])
    assert not [w for w in caught if "untrained" in str(w.message)]


@pytest.mark.slow
def test_cli_fit_writes_tensorboard_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli(_tiny_fit_args(tmp_path / "runs", max_steps=3))
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir == tmp_path / "runs" / "default" / "run"
    assert cli.trainer.global_step == 3 and cli.model.config.n_embd == 32
    assert list(log_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2]
    assert len(events.Scalars("val/loss")) == 1
    assert "max_steps: 3" in (log_dir / "config.yaml").read_text()
    (checkpoint,) = (log_dir / "checkpoints").glob("*.ckpt")
    torch.load(checkpoint, map_location="cpu", weights_only=True)  # CLI-written hparams are plain too

    # resuming into the same log dir rewrites config.yaml instead of aborting on it; a path from the home
    # directory, `~` unexpanded as a shell leaves it in `--ckpt_path=~/...`, as Lightning's loader reads it;
    # LightningCLI builds the model from the checkpoint's hyper-parameters (here not on the command line)
    monkeypatch.setenv("HOME", str(tmp_path))
    resumed = build_cli([arg for arg in _tiny_fit_args(tmp_path / "runs", max_steps=5) if "--model." not in arg]
                        + [f"--ckpt_path=~/{checkpoint.relative_to(tmp_path)}"])
    assert resumed.model.config.n_embd == 32  # its hyper-parameters were not read at first (diff review)
    assert Path(resumed.trainer.log_dir) == log_dir
    assert resumed.trainer.global_step == 5
    assert "max_steps: 5" in (log_dir / "config.yaml").read_text()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert {e.step for e in events.Scalars("train/loss")} == {0, 1, 2, 3, 4}


def test_the_configs_ship_in_the_package_and_resolve_outside_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lens-train fit --config configs/default.yaml`` from anywhere: a --config that names no file
    is taken from ``lens_callback/configs`` (the package data of an installed copy)."""
    from lens_callback.cli import packaged_config, with_packaged_configs

    assert sorted(p.name for p in CONFIGS) == sorted(
        p.name for p in (Path(__import__("lens_callback").__file__).parent / "configs").glob("*.yaml"))
    monkeypatch.chdir(tmp_path)  # no configs/ here
    shipped = packaged_config("configs/default.yaml")
    assert shipped is not None and shipped.read_text() == (REPO_ROOT / "configs" / "default.yaml").read_text()
    assert packaged_config("default") == shipped and packaged_config("no_such_config") is None
    args = with_packaged_configs(["fit", "--config", "configs/default.yaml", "-c", "one_layer", "--config=modern.yaml",
                                  "--config", "missing.yaml", "--trainer.max_steps=1"])
    assert args[:2] == ["fit", "--config"] and Path(args[2]) == shipped
    assert Path(args[4]).name == "one_layer.yaml" and Path(args[5].removeprefix("--config=")).name == "modern.yaml"
    assert args[6:] == ["--config", "missing.yaml", "--trainer.max_steps=1"]  # left for LightningCLI to report
    assert with_packaged_configs(["-c=default"]) == [f"-c={shipped}"]  # was left as is (post-hoc review)
    # every form argparse reads as --config, as the check of a config before the subcommand reads them: -cdefault
    # went to jsonargparse unresolved and, before fit, past that check (diff review)
    assert with_packaged_configs(["-cdefault", "--conf", "one_layer"]) == [f"-c{shipped}", "--conf",
                                                                            str(packaged_config("one_layer"))]
    # only configs/NAME or a bare name: a missing file elsewhere, or inline YAML of any length, is not replaced
    inline = "trainer: {max_steps: 1}  # " + "x" * 300
    for value in ("experiments/default.yaml", "/x/gpt2_124m.yaml", inline):
        assert with_packaged_configs(["--config", value]) == ["--config", value]
    (tmp_path / "default").mkdir()  # a directory of that name, as `runs/default` the default config writes (cli review)
    assert with_packaged_configs(["--config", "default"]) == ["--config", str(shipped)]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text("seed_everything: 7\n")  # a local file wins
    assert with_packaged_configs(["--config", "configs/default.yaml"]) == ["--config", "configs/default.yaml"]
    cli = build_cli(["--config", "one_layer", "--trainer.max_steps=1", "--trainer.logger=false"], run=False)
    assert cli.model.config.n_layer == 1

    # from the command line (lens-train): the shipped config too, without LightningCLI's warning that
    # "args" is for use from Python (printed by every lens-train run when the command line went in as args)
    argv = ["lens-train", "--config", "one_layer", "--trainer.max_steps=1", "--trainer.logger=false"]
    monkeypatch.setattr(sys, "argv", list(argv))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(tensorboard|litlogger|GPU available|TPU available).*")
        cli = build_cli(run=False)
    assert cli.model.config.n_layer == 1 and sys.argv == argv


@pytest.mark.parametrize("value", ["defualt", "configs/defualt.yaml", "one-layer.yaml"])
def test_a_config_name_that_is_no_file_and_not_shipped_is_a_one_line_error_naming_the_shipped_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """``--config defualt`` was jsonargparse's usage text and ``File does not exist: '/cwd/defualt'``, naming
    none of the configs that --config NAME does take (cli review)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        build_cli(["--config", value, "--trainer.logger=false"], run=False)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "usage:" not in err, err
    assert f"--config {value}: no such file here" in err, err
    assert "default, gpt2_124m, modern, one_layer, shakespeare_char" in err, err
    (tmp_path / value).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / value).write_text("trainer: {max_steps: 1}\n", encoding="utf-8")  # a file of that name is read
    assert build_cli(["--config", value, "--trainer.logger=false"], run=False).trainer.max_steps == 1


@pytest.mark.parametrize("option", ["-c=one_layer", "--config=default", "-cdefault"])
def test_a_config_option_given_as_the_value_of_another_is_argparses_to_refuse_not_called_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    """In ``--config -c=one_layer`` argparse reads ``-c=one_layer`` as no value (an option) and says the first
    ``--config`` expects one argument; the check for a missing config read it as a second option and said
    ``--config one_layer: no such file here``, listing ``one_layer`` among the shipped configs, because the
    shipped-name resolution had taken it as the first option's value and left it unresolved. Every walk
    over the arguments now steps over a value as argparse does (`_config_values`)."""
    from lens_callback.cli import _config_values

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    assert list(_config_values(["fit", "--config", option, "-cx.yaml"])) == [(1, 2, option), (3, 3, "x.yaml")]
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", option, "--trainer.logger=false"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no such file here" not in err, err
    assert "argument -c/--config: expected one argument" in err, err


def test_the_readmes_make_commands_are_makefile_targets_doing_what_it_says() -> None:
    """Every ``make TARGET`` of the README (its first block, its prose) is a Makefile target; ``make demo`` is
    the README's ``lens-train fit ...`` line, then ``lens-report`` of that run into its ``report.png``, under
    ``runs/default``; ``make bench`` runs the script the README names."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    block = readme_block("bash", "make demo")
    named = {line.split()[1] for line in block.splitlines()} | {words[0] for words in readme_commands("make", {})}
    assert {"demo", "test", "test-fast", "bench"} <= named <= set(re.findall(r"^([\w-]+):", makefile, flags=re.M))

    def recipe(target: str) -> str:
        found = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
        assert found is not None, target
        return found.group(1)

    (train,) = re.findall(r"`make demo` \(= `lens-train ([^`]*)`, then `lens-report`\)", readme)
    demo = recipe("demo").splitlines()
    assert demo[0].split() == ["$(VENV)/bin/lens-train", *train.split()], demo
    assert "-> runs/default (" in block and "ls -d runs/default/version_*" in demo[1]
    assert "lens-report" in demo[2] and '-o "$$latest/report.png"' in demo[2] and "report.png" in block
    (bench,) = re.findall(r"`make bench` runs `python (bench/\S+)`", readme)
    assert recipe("bench").split() == ["$(PY)", bench]


def test_readme_options_table_lists_every_lens_callback_argument() -> None:
    """The README's options table and ``LensCallback.__init__`` name the same arguments (an option
    added to one only was missed before)."""
    import inspect

    from lens_callback import LensCallback

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Options of `LensCallback`")[1].split("### What is logged")[0]
    documented = {name for line in section.splitlines() if line.startswith("| `")
                  for name in re.findall(r"`(\w+)`", line.split("|")[1])}
    arguments = set(inspect.signature(LensCallback.__init__).parameters) - {"self"}
    assert documented == arguments, (sorted(arguments - documented), sorted(documented - arguments))


def test_readme_options_table_gives_each_lens_callback_arguments_default() -> None:
    """The README's options table's defaults, where the cell is a value (a number, ``true``/``false``, ``none``,
    ``[]``, a quoted string; not a description such as "inferred"), are ``LensCallback.__init__``'s."""
    import ast
    import inspect

    from lens_callback import LensCallback

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Options of `LensCallback`")[1].split("### What is logged")[0]
    parameters = inspect.signature(LensCallback.__init__).parameters
    literals = {"true": True, "false": False, "none": None, "`[]`": ()}
    compared = 0
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names, default = (cell.strip() for cell in line.split("|")[1:3])
        if default in literals:
            value = literals[default]
        elif re.fullmatch(r"[\d.e+-]+|`\"\w*\"`", default):
            value = ast.literal_eval(default.strip("`"))
        else:
            continue  # a description: "inferred", "the seven that read activations", ...
        for name in re.findall(r"`(\w+)`", names):
            actual = parameters[name].default
            assert actual == value or (value == () and actual == []), (name, default, actual)
            compared += 1
    assert compared >= 20

def _project_copy(tmp_path: Path) -> Path:
    """A copy of the project without the checkout's egg-info, whose SOURCES.txt setuptools would add to a build."""
    import shutil

    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE", "Makefile", "lens_callback", "nanogpt_model",
                 "tests", "bench", "configs", "docs"):
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, project / name)
    return project


def test_the_wheel_carries_the_configs_and_the_type_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed copy (``pip install lens-callback``, not a checkout) resolves ``--config configs/default.yaml``
    from ``lens_callback/configs``, a link to the repository's configs/ that the wheel must hold as files; and
    both packages carry PEP 561's ``py.typed``, without which a user's type checker ignores their annotations."""
    import zipfile

    from setuptools import build_meta

    monkeypatch.chdir(_project_copy(tmp_path))
    name = build_meta.build_wheel(str(tmp_path))
    with zipfile.ZipFile(tmp_path / name) as wheel:
        members = set(wheel.namelist())
        shipped = {p.name: wheel.read(f"lens_callback/configs/{p.name}") for p in CONFIGS}
    assert {"lens_callback/py.typed", "nanogpt_model/py.typed"} <= members
    assert shipped == {p.name: p.read_bytes() for p in CONFIGS}
    assert not [m for m in members if m.startswith(("tests/", "bench/")) or "__pycache__" in m]


def test_the_sdist_carries_what_its_test_suite_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """setuptools' default sdist held tests/test_*.py but not tests/conftest.py, the Karpathy reference,
    bench/ or configs/, so the shipped suite could not be collected (s26 fresh-install review); and
    pyproject said MIT with no license file."""
    import tarfile

    from setuptools import build_meta

    monkeypatch.chdir(_project_copy(tmp_path))  # build_meta builds the project in the working directory
    name = build_meta.build_sdist(str(tmp_path))
    with tarfile.open(tmp_path / name) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    wanted = {"LICENSE", "Makefile", "tests/conftest.py", "tests/karpathy_gpt.py", "bench/run.py",
              "lens_callback/py.typed", "nanogpt_model/py.typed",  # a wheel built from the sdist carries them
              *(f"configs/{p.name}" for p in CONFIGS), *(f"tests/{p.name}" for p in (REPO_ROOT / "tests").glob("test_*.py"))}
    assert wanted <= members, sorted(wanted - members)
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]
