"""``lens-train``: LightningCLI over :class:`~nanogpt_model.NanoGPTModule` and :class:`~nanogpt_model.TextDataModule`.

Example:
    lens-train fit --config configs/default.yaml --trainer.max_steps=200
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from nanogpt_model import NanoGPTModule, TextDataModule


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Builds the CLI; ``run=False`` parses and instantiates only (used by the config tests)."""
    return LightningCLI(
        NanoGPTModule,
        TextDataModule,
        args=args,
        run=run,
        seed_everything_default=1337,
        # a resumed run writes config.yaml into the same log dir again: overwrite instead of aborting
        save_config_kwargs={"overwrite": True},
    )


def train_main(args: list[str] | None = None) -> None:
    """Entry point of ``lens-train``."""
    build_cli(args)
