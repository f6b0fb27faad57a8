"""samat: SAM vs adversarial training robustness experiments at scale."""

__version__ = "0.1.0"
