"""Launch a grid's runs with submitit (one SLURM array, or local runs) and follow their state."""

from samat.launch.status import show_status
from samat.launch.submit import submit_grid
from samat.launch.task import RunTask

__all__ = ["RunTask", "show_status", "submit_grid"]
