"""Starting samat as a user does: `python -m samat ...` in a subprocess, with this interpreter.

No console script is needed (the GPU machine has samat on PYTHONPATH, not installed), and the
subprocess gets this environment with the folder that holds the imported samat put first on
PYTHONPATH, so it runs the same samat from any working directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import samat


def samat_env() -> dict[str, str]:
    """This environment, with the folder that holds the imported samat first on PYTHONPATH."""
    root = str(Path(samat.__file__).resolve().parents[1])
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in paths if p != root]])
    return env


def samat_command(*args: str) -> list[str]:
    """`python -m samat ARGS` with this interpreter."""
    return [sys.executable, "-m", "samat", *args]
