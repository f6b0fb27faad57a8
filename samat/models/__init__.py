"""Image classifiers by registry name; each normalizes its [0, 1] inputs in its first layer.

`NAMES` is known without importing torch (a grid's preflight and `submit --dry-run` check model
names with it); `create`, `names`, `register` and `Normalize` import the model modules, which
register their constructors, on first use.
"""

from __future__ import annotations

from typing import Any

# The registered names, sorted; tests/test_models.py keeps them equal to the registry's.
NAMES = ("deit_small", "deit_tiny", "preact_resnet18", "small_cnn", "wide_resnet28_10")

__all__ = ["NAMES", "Normalize", "create", "names", "register"]


def __getattr__(name: str) -> Any:
    if name not in ("Normalize", "create", "names", "register"):
        raise AttributeError(f"module 'samat.models' has no attribute {name!r}")
    # Importing the model modules registers their constructors.
    from samat.models import deit, preact_resnet, registry, small, wide_resnet  # noqa: F401
    from samat.models.normalize import Normalize

    return Normalize if name == "Normalize" else getattr(registry, name)
