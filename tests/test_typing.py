"""The packages' annotations hold: mypy over ``lens_callback`` and ``nanogpt_model`` finds no error.

Both packages ship PEP 561's ``py.typed``, so a user's type checker reads their inline annotations
(``LensCallback``'s options, ``load_snapshot``'s, ``NanoGPTModule``'s): an annotation that lies (a
return typed ``dict`` that is a read-only ``Mapping``, an ``int`` that may be ``None``) misleads it.
The settings (`[tool.mypy]` in ``pyproject.toml``) name the third-party modules without stubs; the
version is the one ``.[dev]`` pins, as a newer mypy may find more.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_packages_type_check_clean_under_mypy() -> None:
    pytest.importorskip("mypy", reason="mypy comes with the dev extras (pip install -e '.[dev]')")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert out.stdout.startswith("Success: no issues found in ") and " source files" in out.stdout, out.stdout
