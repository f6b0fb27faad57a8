"""Image classifiers by registry name; each normalizes its [0, 1] inputs in its first layer."""

# Importing the model modules registers their constructors.
from samat.models import deit, preact_resnet, small, wide_resnet  # noqa: F401
from samat.models.normalize import Normalize
from samat.models.registry import create, names, register

__all__ = ["Normalize", "create", "names", "register"]
