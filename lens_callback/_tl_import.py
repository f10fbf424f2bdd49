"""TransformerLens, imported without the process-wide settings its import makes.

TransformerLens's import sets the ``transformers`` logger to ERROR and adds warning filters, one of
them (from ``accelerate``) hiding every ``UserWarning`` attributed to ``torch.optim.lr_scheduler``:
a script that merely imported this package lost those warnings (observer review). Every module of
the package that imports TransformerLens or ``transformers`` outside ``TYPE_CHECKING`` imports this
module first (tested), so the package itself imports neither until a name that needs them is used:
``import lens_callback`` and ``lens-report`` do not pay TransformerLens's seconds of import time.
Nothing to undo if the user imported TransformerLens first.

torch and Lightning are imported before the guard, as the package's import did: the filters their
imports add stay, those of modules TransformerLens imports too among them (sympy's, which the guard
dropped when TransformerLens came first). Every module here that imports this one imports Lightning
anyway, the tokenizer's alone aside.
"""

from __future__ import annotations

import logging
import sys
import warnings

import lightning  # noqa: F401 - before the guard below: torch's and Lightning's own warning filters stay
import torch  # noqa: F401


def _import_transformer_lens() -> None:
    if "transformer_lens" in sys.modules:
        return
    with warnings.catch_warnings():  # puts the filter list back as it was
        import transformers  # noqa: F401 - its own logging set-up (TRANSFORMERS_VERBOSITY) stays

        level = logging.getLogger("transformers").level
        import transformer_lens  # noqa: F401
    logging.getLogger("transformers").setLevel(level)


_import_transformer_lens()
