import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff not installed; pip install -e '.[dev]'")
    return ruff


def test_ruff_is_clean():
    proc = subprocess.run([_ruff(), "check", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_clean():
    proc = subprocess.run([_ruff(), "format", "--check", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, "run `ruff format .`:\n" + proc.stdout + proc.stderr
