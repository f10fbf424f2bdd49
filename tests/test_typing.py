"""The packages' annotations hold: mypy over ``lens_callback`` and ``nanogpt_model`` finds no error.

Both packages ship PEP 561's ``py.typed``, so a user's type checker reads their inline annotations
(``LensCallback``'s options, ``load_snapshot``'s, ``NanoGPTModule``'s): an annotation that lies (a
return typed ``dict`` that is a read-only ``Mapping``, an ``int`` that may be ``None``) misleads it.
The settings (`[tool.mypy]` in ``pyproject.toml``) name the third-party modules without stubs; the
version is the minor release ``.[dev]`` holds it to (2.4), as a newer mypy may find more.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check_clean() -> None:
    pytest.importorskip("mypy", reason="mypy comes with the dev extras (pip install -e '.[dev]')")
    out = subprocess.run(
        # plain text whatever the environment says: FORCE_COLOR or MYPY_FORCE_COLOR styles the summary line
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--no-color-output"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert out.stdout.startswith("Success: no issues found in ") and " source files" in out.stdout, out.stdout


@pytest.mark.slow
def test_the_packages_type_check_clean_under_mypy() -> None:
    _check_clean()


@pytest.mark.slow
def test_the_check_holds_where_the_environment_forces_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    """FORCE_COLOR (set by CI services and developers for pytest's colours; mypy reads it too) with a terminal
    type made mypy style its summary, escape codes before "Success": a clean check read as a failure (review)."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("MYPY_FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm")
    _check_clean()
