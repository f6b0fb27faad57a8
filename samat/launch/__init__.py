"""Launch a grid's runs with submitit (one SLURM array, or local runs) and follow their state.

The submodules are imported on first use: `samat status` needs only `status`."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RunTask", "show_status", "submit_grid"]
_WHERE = {"RunTask": "task", "show_status": "status", "submit_grid": "submit"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'samat.launch' has no attribute {name!r}")
    return getattr(importlib.import_module(f"samat.launch.{_WHERE[name]}"), name)
