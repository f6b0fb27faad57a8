"""samat: SAM vs adversarial training robustness experiments at scale."""

__version__ = "0.1.0"

# The packages whose versions decide a run's numbers: every result records them (see versions()).
RECORDED_PACKAGES = (
    "torch",
    "torchvision",
    "torchattacks",
    "numpy",
    "scipy",
    "scikit-learn",
    "safetensors",
    "pydantic",
    "timm",
    "transformers",
    "submitit",
)


def versions() -> dict[str, str]:
    """samat's, Python's and each recorded package's installed version ('' if not installed)."""
    import platform
    from importlib import metadata

    found = {"samat": __version__, "python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = ""
    return found
