"""`LensCallback` for a ``pytorch_lightning.cli.LightningCLI``.

Lightning ships one code base under two names, ``lightning.pytorch`` and the standalone
``pytorch_lightning``, as two sets of classes. A ``pytorch_lightning.Trainer`` takes
`lens_callback.LensCallback` as it is (it calls a callback's hooks without checking its class), but
``pytorch_lightning``'s LightningCLI checks that a ``trainer.callbacks`` entry's ``class_path`` names a
subclass of *its* ``Callback`` and refuses the other package's. This module's `LensCallback` is the
same callback, a subclass of both packages' ``Callback``::

    trainer:
      callbacks:
        - class_path: lens_callback.pytorch_lightning.LensCallback
          init_args: {every_n_steps: 50, snapshot_dir: auto}

Importing this module imports ``pytorch_lightning``.
"""

from __future__ import annotations

import pytorch_lightning

from lens_callback.callback import LensCallback as _LensCallback

__all__ = ["LensCallback"]


# mypy sees two unrelated Callback classes whose hooks name each other's Trainer and LightningModule types
class LensCallback(_LensCallback, pytorch_lightning.Callback):  # type: ignore[misc]
    """`lens_callback.LensCallback` that ``pytorch_lightning``'s LightningCLI accepts as a callback.

    Both bases define the same hooks (one code base under two names); every hook resolves to
    `lens_callback.LensCallback`'s or, where it defines none, to ``lightning.pytorch``'s no-op.
    """
