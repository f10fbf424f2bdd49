"""``lens-train``: LightningCLI over :class:`~nanogpt_model.NanoGPTModule` and :class:`~nanogpt_model.TextDataModule`.

Example:
    lens-train fit --config configs/default.yaml --trainer.max_steps=200

The repository's run configs ship inside the package (``lens_callback/configs``): a ``--config``
path that does not exist, such as ``configs/default.yaml`` outside a checkout, or a bare name
(``default``), is taken from there.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

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


def with_packaged_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config``/``-c`` value that names no file replaced by the shipped config
    of that name, where there is one (otherwise left for LightningCLI to report)."""

    def resolve(value: str) -> str:
        if Path(value).exists():
            return value
        shipped = packaged_config(value)
        return str(shipped) if shipped is not None else value

    out: list[str] = []
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] in ("--config", "-c"):
            arg = resolve(arg)
        elif arg.startswith("--config="):
            arg = "--config=" + resolve(arg.removeprefix("--config="))
        out.append(arg)
    return out


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Builds the CLI; ``run=False`` parses and instantiates only (used by the config tests)."""
    return LightningCLI(
        NanoGPTModule,
        TextDataModule,
        args=with_packaged_configs(sys.argv[1:] if args is None else list(args)),
        run=run,
        seed_everything_default=1337,
        # a resumed run writes config.yaml into the same log dir again: overwrite instead of aborting
        save_config_kwargs={"overwrite": True},
    )


def train_main(args: list[str] | None = None) -> None:
    """Entry point of ``lens-train``."""
    build_cli(args)
